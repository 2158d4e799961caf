"""Translator backends: torch (eager / CUDA graphs), onnxruntime, openvino (CPU), tensorrt.

Only the torch backend is imported eagerly; onnxruntime, openvino and tensorrt are imported when their backend
is created, with an error naming the pip extra when missing.
"""

from lanit_rt.backends.base import ArtifactError, Backend, HostSlot, parse_artifact_metadata
from lanit_rt.backends.torch import TorchBackend

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")

__all__ = ["ArtifactError", "BACKENDS", "Backend", "HostSlot", "TorchBackend",
           "parse_artifact_metadata"]
