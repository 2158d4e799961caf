"""What every Translator backend implements, and the artifact metadata they share.

A backend runs the generator on model-size batches. It sees only tensors that are already validated
and resized: images float32 [N, 3, S, S] in [-1, 1] on `backend.device`, and either normalised
domain weights [N, D] (rows sum to 1) or styles [N, S]. It returns a float32 [N, 3, S, S] tensor
that the caller owns (never a view of a reused buffer).

Backends that run on host memory (onnxruntime, openvino) also offer `host_slot(n)`: preallocated
numpy buffers for one batch size bound once to the engine, which the Translator's uint8 fast path
fills and reads without any per-call allocation besides the returned image.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

import torch

from lanit_rt.checkpoint import CheckpointError
from lanit_rt.config import ConfigError, LanitConfig

ARTIFACT_KINDS = ("domain_weights", "style")
# An int8 graph runs only when its output measured at least this PSNR against the fp32 graph on
# held-out images (recorded as `psnr_db` by lanit_export.quantize).
MIN_INT8_PSNR_DB = 40.0
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16"}


class ArtifactError(CheckpointError):
    """An exported artifact (ONNX graph, TensorRT engine, sidecar) is missing, foreign, or does not
    match what the caller expects."""


@dataclass
class HostSlot:
    """Buffers bound to an engine for one batch size n (S = img_size, D = number of domains):
    image float32 [n, 3, S, S], weights float32 [n, D] (rows sum to 1), output float32 [n, 3, S, S];
    `run()` reads image and weights and overwrites output. A slot serves one thread at a time."""

    image: np.ndarray
    weights: np.ndarray
    output: np.ndarray
    run: Callable[[], None]


class Backend(abc.ABC):
    """One way of running the generator. Subclasses set the attributes below in __init__."""

    name: str
    config: LanitConfig
    device: torch.device
    supports_weights: bool = True
    supports_style: bool = False

    @abc.abstractmethod
    def run_weights(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """images [N, 3, S, S] float32, weights [N, D] normalised -> [N, 3, S, S] float32."""

    def run_style(self, images: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """images [N, 3, S, S] float32, style [N, S] float32 -> [N, 3, S, S] float32."""
        raise ArtifactError(f"the {self.name} backend has no style input (for ONNX, export the "
                            "'.style.onnx' graph beside the main one)")

    def describe(self) -> dict[str, Any]:
        """Plain-data description for benchmarks and logs."""
        return {"backend": self.name, "device": str(self.device)}

    def host_slot(self, n: int) -> HostSlot | None:
        """Host buffers bound to the domain-target graph at batch n, or None (no host fast path)."""
        return None


def parse_artifact_metadata(meta: Mapping[str, str], source: str) -> dict[str, Any]:
    """Read the LANIT keys of an ONNX metadata_props map or an engine sidecar.

    Returns {"config": LanitConfig, "domains": tuple, "precision": str, "kind": str,
    "io_dtype": str, "version": str | None, "weights_digest": str | None (None in artifacts
    exported before it was recorded), "psnr_db": float | None (int8 graphs: measured vs fp32)};
    raises ArtifactError for anything foreign or inconsistent.
    """
    if "lanit_config" not in meta:
        raise ArtifactError(f"{source} is not a LANIT artifact (no 'lanit_config' metadata)")
    raw_config = meta["lanit_config"]
    try:
        if isinstance(raw_config, str):
            config = LanitConfig.from_json(raw_config)
        else:
            config = LanitConfig.from_dict(dict(raw_config))
    except (ConfigError, TypeError) as err:
        raise ArtifactError(f"{source} holds an invalid lanit_config: {err}") from None
    domains = meta.get("domains", None)
    if isinstance(domains, str):
        try:
            domains = json.loads(domains)
        except json.JSONDecodeError:
            raise ArtifactError(f"{source}: 'domains' metadata is not a JSON list") from None
    if domains is not None and tuple(domains) != config.domains:
        raise ArtifactError(f"{source}: 'domains' metadata {list(domains)} disagrees with its "
                            f"lanit_config {list(config.domains)}")
    precision = str(meta.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise ArtifactError(f"{source}: unknown precision {precision!r}; expected one of {PRECISIONS}")
    kind = str(meta.get("kind", "domain_weights"))
    if kind not in ARTIFACT_KINDS:
        raise ArtifactError(f"{source}: unknown kind {kind!r}; expected one of {ARTIFACT_KINDS}")
    io_dtype = str(meta.get("io_dtype", "fp32")).lower()
    io_dtype = _DTYPE_ALIASES.get(io_dtype, io_dtype)
    if io_dtype not in PRECISIONS:
        raise ArtifactError(f"{source}: unknown io_dtype {io_dtype!r}; expected one of {PRECISIONS}")
    digest = meta.get("weights_digest")
    psnr = meta.get("psnr_db")
    try:
        psnr = float(psnr) if psnr is not None else None
    except ValueError:
        raise ArtifactError(f"{source}: 'psnr_db' metadata {psnr!r} is not a number") from None
    return {"config": config, "domains": config.domains, "precision": precision, "kind": kind,
            "io_dtype": io_dtype, "version": meta.get("lanit_rt_version"),
            "weights_digest": str(digest) if digest is not None else None, "psnr_db": psnr}


def check_int8_quality(info: Mapping[str, Any], source: str) -> None:
    """Raise ArtifactError for an int8 artifact without a measured PSNR, or one below MIN_INT8_PSNR_DB."""
    if info["precision"] != "int8":
        return
    psnr = info.get("psnr_db")
    if psnr is None:
        raise ArtifactError(f"{source} is an int8 graph without a measured PSNR against fp32; quantize it "
                            "with lanit_export.quantize, which measures it on held-out images")
    if not psnr >= MIN_INT8_PSNR_DB:
        raise ArtifactError(f"{source} is an int8 graph whose output measured {psnr:.1f} dB PSNR against "
                            f"fp32 on held-out images, below the {MIN_INT8_PSNR_DB:.0f} dB that int8 needs "
                            "to run here; use the fp32 graph (or bf16 in OpenVINO on a CPU that has it)")


def check_same_weights(found: str | None, expected: str, source: str, checkpoint: str, again: str) -> None:
    """Raise ArtifactError when an artifact's weights digest (LanitModel.weights_digest() at export)
    is not the checkpoint's: it was exported from other weights, e.g. before more training.
    Artifacts without a digest (older exports) pass. `again`: the command that exports it anew."""
    if found is not None and found != expected:
        raise ArtifactError(f"{source} was exported from other weights than {checkpoint} (an export "
                            f"from before more training?); export it again: {again}")


def check_expected_domains(found: tuple[str, ...], expected: Any, source: str) -> None:
    """Raise ArtifactError when the caller expects other domain texts than the artifact holds."""
    if expected is None:
        return
    if isinstance(expected, str):
        raise TypeError(f"domains= is a list of domain texts, not one string ({expected!r})")
    expected = tuple(str(d) for d in expected)
    if expected != tuple(found):
        raise ArtifactError(f"{source} was exported for domains {list(found)}, not the expected "
                            f"{list(expected)}")


def check_same_config(found: LanitConfig, expected: LanitConfig, source: str) -> None:
    """Raise ArtifactError when an artifact was exported from a different architecture."""
    if found != expected:
        raise ArtifactError(f"{source} was exported from a different model: its config "
                            f"{found.to_dict()} differs from the checkpoint's {expected.to_dict()}")


def artifact_style_path(path: str) -> str:
    """OUT.onnx -> OUT.style.onnx (the exporter's naming for the style-input graph)."""
    return path[: -len(".onnx")] + ".style.onnx" if path.endswith(".onnx") else path + ".style.onnx"
