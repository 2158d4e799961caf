"""The interface of an exported LANIT graph: its kinds and precisions, input and output names,
batch axis, I/O dtype and metadata. Shared by the exporters (onnx_export, tensorrt, openvino_export),
the validation (validate) and the Triton repositories, below all of them: onnx_export calls validate,
and validate checks against these names.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lanit_rt.config import LanitConfig
from lanit_rt.version import __version__ as lanit_rt_version
from lanit_export.errors import ExportError, require

PRECISIONS = ("fp32", "fp16")
KINDS = ("domain_weights", "style")
OUTPUT_NAME = "translated"
BATCH_AXIS = "batch"
IO_DTYPE = "float32"
METADATA_KEYS = ("lanit_config", "domains", "lanit_rt_version", "precision", "kind", "io_dtype")


def input_names(kind: str) -> tuple[str, str]:
    check_kind(kind)
    return ("image", "domain_weights") if kind == "domain_weights" else ("image", "style")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ExportError(f"unknown export kind {kind!r}; choose one of {list(KINDS)}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")


def artifact_metadata(config: LanitConfig, precision: str, kind: str,
                      weights_digest: str | None = None) -> dict[str, str]:
    """The metadata_props of an exported graph (also the keys of a TensorRT sidecar);
    `weights_digest` is LanitModel.weights_digest() of the exported model."""
    check_precision(precision)
    check_kind(kind)
    meta = {
        "lanit_config": config.to_json(),
        "domains": json.dumps(list(config.domains)),
        "lanit_rt_version": lanit_rt_version,
        "precision": precision,
        "kind": kind,
        "io_dtype": IO_DTYPE,
    }
    if weights_digest is not None:
        meta["weights_digest"] = weights_digest
    return meta


def read_metadata(model_or_path: Any) -> dict[str, str]:
    """metadata_props of an ONNX ModelProto or file as a dict."""
    onnx = require("onnx", "onnx")
    proto = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        try:
            proto = onnx.load(str(model_or_path), load_external_data=False)
        except Exception as err:  # protobuf decode errors have no common public type
            raise ExportError(f"{model_or_path} is not an ONNX file: {type(err).__name__}") from None
    return {p.key: p.value for p in proto.metadata_props}


def config_from_metadata(metadata: dict[str, str]) -> LanitConfig:
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise ExportError(f"not a lanit-rt artifact: metadata lacks {missing}")
    return LanitConfig.from_json(metadata["lanit_config"])
