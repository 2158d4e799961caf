"""A small client for a LANIT model on Triton (lanit-serve, or a Triton deployment of a Python-backend
repository written by `lanit-export --triton-repo DIR --triton-backend python`).

    from lanit_rt.triton_client import TritonTranslatorClient
    client = TritonTranslatorClient("127.0.0.1:8000")             # or ("127.0.0.1:8001", "grpc")
    out = client.translate(image, "blond hair")                  # uint8 [H, W, 3] -> uint8 [S, S, 3]
    out = client.translate(images, ["beard", "blond hair,beard"])  # one target per image
    out = client.translate(images, weights)                      # float [D] or [N, D] domain weights

tritonclient is imported when a client is made (`pip install 'lanit-rt[serve]'`). Errors the server
returns (bad shape, oversized image ...) are raised as tritonclient.utils.InferenceServerException.

Domain texts are turned into multi-hot `domain_weights` here (the model's domain list is read once
from its config parameter "domains"; an unknown text raises ValueError before anything is sent):
Triton batches only requests that carry the same inputs, so a client that always sends weights lets
the server batch all of its requests together.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Sequence

import numpy as np

PROTOCOLS = ("http", "grpc")


def _tritonclient(protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    try:
        return importlib.import_module(f"tritonclient.{protocol}")
    except ImportError as err:
        raise ImportError(f"the Triton client needs tritonclient[{protocol}]: pip install "
                          f"'lanit-rt[serve]' ({err})") from None


def multi_hot(targets: Sequence[str], domains: Sequence[str]) -> np.ndarray:
    """Comma-separated domain texts, one per image -> float32 [N, D] multi-hot weights."""
    index = {name: i for i, name in enumerate(domains)}
    weights = np.zeros((len(targets), len(domains)), np.float32)
    for row, target in enumerate(targets):
        for name in (part.strip() for part in target.split(",")):
            if name not in index:
                raise ValueError(f"unknown domain {name!r}; the model's domains: {list(domains)}")
            weights[row, index[name]] = 1.0
    return weights


def request_inputs(images: np.ndarray, domains: Any) -> tuple[np.ndarray, str, np.ndarray]:
    """(image uint8 [N, H, W, 3], target name, target array) for one request.

    `domains`: a str (every image; "a,b" is multi-hot), a list of N str, or float weights [D] /
    [N, D]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [H, W, 3] or [N, H, W, 3], got {images.dtype} "
                         f"{list(images.shape)}")
    batch = images if images.ndim == 4 else images[None]
    n = batch.shape[0]
    if isinstance(domains, str):
        return batch, "domains", np.array([[domains.encode()]] * n, dtype=object)
    if isinstance(domains, (list, tuple)) and all(isinstance(d, str) for d in domains):
        if len(domains) != n:
            raise ValueError(f"{len(domains)} domain targets for {n} images")
        return batch, "domains", np.array([[d.encode()] for d in domains], dtype=object)
    weights = np.asarray(domains, dtype=np.float32)
    if weights.ndim == 1:
        weights = np.repeat(weights[None], n, axis=0)
    if weights.ndim != 2 or weights.shape[0] != n:
        raise ValueError(f"domain weights must be [D] or [{n}, D], got {list(weights.shape)}")
    return batch, "domain_weights", np.ascontiguousarray(weights)


class TritonTranslatorClient:
    """Translate uint8 images through a Triton server's LANIT model (KServe v2, HTTP or gRPC)."""

    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http", model: str = "lanit",
                 **client_options: Any):
        self.module = _tritonclient(protocol)
        self.protocol = protocol
        self.model = model
        self.client = self.module.InferenceServerClient(url, **client_options)
        self._domains: tuple[str, ...] | None = None

    @property
    def domains(self) -> tuple[str, ...]:
        """The model's domain texts, from its config (parameter "domains", a JSON list)."""
        if self._domains is None:
            if self.protocol == "grpc":
                config = self.client.get_model_config(self.model, as_json=True)["config"]
            else:
                config = self.client.get_model_config(self.model)
            raw = config.get("parameters", {}).get("domains", {}).get("string_value")
            if not raw:
                raise ValueError(f"model {self.model!r} has no 'domains' parameter: not a LANIT model?")
            self._domains = tuple(json.loads(raw))
        return self._domains

    def ready(self) -> bool:
        return bool(self.client.is_server_ready()) and bool(self.client.is_model_ready(self.model))

    def translate(self, images: np.ndarray, domains: str | Sequence[str] | np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [S, S, 3]; uint8 [N, H, W, 3] -> uint8 [N, S, S, 3]."""
        batch, target_name, target = request_inputs(images, domains)
        if target_name == "domains":  # texts -> weights, so every request has the same inputs
            texts = [row[0].decode() for row in target]
            target_name, target = "domain_weights", multi_hot(texts, self.domains)
        image_input = self.module.InferInput("image", list(batch.shape), "UINT8")
        image_input.set_data_from_numpy(np.ascontiguousarray(batch))
        datatype = "BYTES" if target_name == "domains" else "FP32"
        target_input = self.module.InferInput(target_name, list(target.shape), datatype)
        target_input.set_data_from_numpy(target)
        output = self.module.InferRequestedOutput("translated")
        result = self.client.infer(self.model, [image_input, target_input], outputs=[output])
        translated = result.as_numpy("translated")
        return translated if np.asarray(images).ndim == 4 else translated[0]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "TritonTranslatorClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
