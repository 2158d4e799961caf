"""The Triton Python-backend model of a LANIT repository (lanit_export.triton_repo writes the folder).

Runs inside Triton's Python-backend stub process; `triton_python_backend_utils` (pb_utils) exists
only there and is imported in `initialize`. Per request (Triton adds the batch axis N):

    image           UINT8  [N, H, W, 3]   any H, W up to the max_image_side parameter
    domains         BYTES  [N, 1]         "blond hair,beard": comma-separated domain texts (multi-hot)
    domain_weights  FP32   [N, D]         non-negative weights with a positive row sum
    -> translated   UINT8  [N, S, S, 3]   S = the model's img_size

Exactly one of `domains` / `domain_weights` per request. A bad request (unknown domain, empty batch,
NaN or negative weights, oversized image, both or neither target) gets its own Triton error naming
the problem; the other requests of the same execute() call are still answered. Triton itself refuses
wrong data types and ranks before the model sees them.

Dynamic batching: execute() receives the requests that Triton's batcher gathered; those with images
of one size are stacked and translated in one Translator call, then split back per request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

IMAGE, DOMAINS, WEIGHTS, OUTPUT = "image", "domains", "domain_weights", "translated"
DEFAULT_MAX_IMAGE_SIDE = 2048


def parse_domains(rows: np.ndarray, domains: Sequence[str]) -> np.ndarray:
    """BYTES [N, 1] (or [N]) of comma-separated domain texts -> multi-hot float32 [N, D].

    ValueError for an unknown or repeated text, an empty entry or undecodable bytes."""
    rows = np.asarray(rows, dtype=object).reshape(len(rows), -1)
    if rows.shape[1] != 1:
        raise ValueError(f"'{DOMAINS}' must hold one string per image, got shape {list(rows.shape)}")
    index = {name: i for i, name in enumerate(domains)}
    weights = np.zeros((len(rows), len(domains)), dtype=np.float32)
    for row, item in enumerate(rows[:, 0]):
        try:
            text = item.decode("utf-8") if isinstance(item, (bytes, bytearray)) else str(item)
        except UnicodeDecodeError:
            raise ValueError(f"'{DOMAINS}' row {row} is not UTF-8 text") from None
        names = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not name for name in names):
            raise ValueError(f"'{DOMAINS}' row {row} is {text!r}: give comma-separated domain texts "
                             f"from {list(domains)}")
        for name in names:
            if name not in index:
                raise ValueError(f"unknown domain {name!r} in row {row}; known domains: {list(domains)}")
            if weights[row, index[name]]:
                raise ValueError(f"domain {name!r} is given twice in row {row}")
            weights[row, index[name]] = 1.0
    return weights


def check_weights(weights: np.ndarray, num_domains: int) -> np.ndarray:
    """FP32 [N, D] domain weights -> the same array, or ValueError (NaN/inf, negative, zero rows)."""
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim != 2 or weights.shape[1] != num_domains:
        raise ValueError(f"'{WEIGHTS}' must be [N, {num_domains}], got {list(weights.shape)}")
    if not np.isfinite(weights).all():
        raise ValueError(f"'{WEIGHTS}' holds NaN or infinite values")
    if (weights < 0).any():
        raise ValueError(f"'{WEIGHTS}' must be >= 0")
    if (weights.sum(axis=1) <= 0).any():
        raise ValueError(f"every '{WEIGHTS}' row needs a positive sum (at least one domain)")
    return weights


def parse_request(image: np.ndarray | None, domains: np.ndarray | None, weights: np.ndarray | None,
                  domain_names: Sequence[str], max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One request's tensors -> (images uint8 [N, H, W, 3], weights float32 [N, D]); ValueError with
    a message meant for the client when the request is not a translation this model can run."""
    if image is None:
        raise ValueError(f"missing input '{IMAGE}' (uint8 [N, H, W, 3])")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"'{IMAGE}' must be uint8 [N, H, W, 3], got {image.dtype} {list(image.shape)}")
    n, height, width = image.shape[:3]
    if n == 0:
        raise ValueError("empty batch: the request holds no image")
    if height == 0 or width == 0:
        raise ValueError(f"'{IMAGE}' is empty ({height}x{width})")
    if max(height, width) > max_image_side:
        raise ValueError(f"'{IMAGE}' is {height}x{width}, larger than this server's limit of "
                         f"{max_image_side} pixels a side")
    if (domains is None) == (weights is None):
        raise ValueError(f"give exactly one of '{DOMAINS}' (comma-separated texts) or '{WEIGHTS}'; "
                         f"known domains: {list(domain_names)}")
    if domains is not None:
        target = parse_domains(domains, domain_names)
    else:
        target = check_weights(weights, len(domain_names))
    if target.shape[0] != n:
        raise ValueError(f"{target.shape[0]} targets for {n} images")
    return image, target


def translate_groups(translator: Any, parsed: Sequence[tuple[np.ndarray, np.ndarray] | None]
                     ) -> list[np.ndarray | Exception | None]:
    """Translate every parsed request; requests whose images share a size run as one batch.

    Returns per request the uint8 [N, S, S, 3] output, the exception of its group, or None for
    entries that were None (already refused)."""
    results: list[Any] = [None] * len(parsed)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(parsed):
        if item is not None:
            groups.setdefault(tuple(item[0].shape[1:3]), []).append(i)
    for members in groups.values():
        images = np.concatenate([parsed[i][0] for i in members]) if len(members) > 1 else parsed[members[0]][0]
        weights = np.concatenate([parsed[i][1] for i in members])
        try:
            output = translator.translate(images, torch.from_numpy(weights))  # uint8 [sum N, S, S, 3]
        except Exception as err:  # noqa: BLE001 (each request must get an answer)
            for i in members:
                results[i] = err
            continue
        start = 0
        for i in members:
            count = parsed[i][0].shape[0]
            results[i] = np.ascontiguousarray(output[start:start + count])
            start += count
    return results


def load_translator(version_folder: Path, runtime: str, artifact: str, threads: int) -> Any:
    """The Translator of a repository's version folder."""
    from lanit_rt.translator import Translator  # noqa: PLC0415

    if threads > 0:
        torch.set_num_threads(threads)
    path = version_folder / artifact
    if runtime == "onnxruntime":
        return Translator.from_onnx(path, threads=threads or None)
    if runtime == "torch":
        return Translator.from_checkpoint(path, backend="torch")
    raise ValueError(f"unknown runtime {runtime!r} in the model config; use onnxruntime or torch")


class TritonPythonModel:
    """Triton Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415 (exists in the stub only)

        self.pb_utils = pb_utils
        model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / str(args["model_version"])
        self.translator = load_translator(folder, params.get("runtime", "onnxruntime"),
                                          params.get("artifact", "model.onnx"),
                                          int(params.get("threads", "0") or 0))
        self.domains = tuple(self.translator.domains)
        if params.get("domains") and tuple(json.loads(params["domains"])) != self.domains:
            raise ValueError(f"the config's domains {params['domains']} differ from the model's "
                             f"{list(self.domains)}")
        self.max_image_side = int(params.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE))
        self.pid = os.getpid()

    def _input(self, request, name: str) -> np.ndarray | None:
        tensor = self.pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def execute(self, requests: list) -> list:
        pb_utils = self.pb_utils
        parsed: list[tuple[np.ndarray, np.ndarray] | None] = []
        errors: list[str | None] = []
        for request in requests:
            try:
                parsed.append(parse_request(self._input(request, IMAGE), self._input(request, DOMAINS),
                                            self._input(request, WEIGHTS), self.domains,
                                            self.max_image_side))
                errors.append(None)
            except ValueError as err:
                parsed.append(None)
                errors.append(str(err))
        outputs = translate_groups(self.translator, parsed)
        responses = []
        for error, output in zip(errors, outputs):
            if isinstance(output, Exception):
                error = f"translation failed: {type(output).__name__}: {output}"
            if error is not None:
                responses.append(pb_utils.InferenceResponse(output_tensors=[],
                                                            error=self._error(error, bad_request=
                                                                              not isinstance(output, Exception))))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, output)]))
        return responses

    def _error(self, message: str, bad_request: bool):
        """A TritonError: INVALID_ARG (HTTP 400) for a bad request, INTERNAL (500) otherwise."""
        error_type = self.pb_utils.TritonError
        code = getattr(error_type, "INVALID_ARG" if bad_request else "INTERNAL", None)
        return error_type(message) if code is None else error_type(message, code)

    def finalize(self) -> None:
        self.translator = None
