"""Translator backends: torch (eager / CUDA graphs), onnxruntime, tensorrt.

Only the torch backend is imported eagerly; onnxruntime and tensorrt are imported when their backend
is created, with an error naming the pip extra when missing.
"""

from lanit_rt.backends.base import ArtifactError, Backend, parse_artifact_metadata
from lanit_rt.backends.torch import TorchBackend

BACKENDS = ("torch", "onnxruntime", "tensorrt")

__all__ = ["ArtifactError", "BACKENDS", "Backend", "TorchBackend",
           "parse_artifact_metadata"]
