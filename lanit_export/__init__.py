"""Deployment artifacts for the LANIT generator: ONNX graphs, TensorRT engines, the `lanit-export` CLI.

Only the generator is exported. The per-domain style table is folded into a per-domain AdaIN
parameter table `[D, P]` (exact, because the AdaIN Linear is affine and domain weights are normalised
to sum 1), so the mapping network, style encoder and vision-language model never run at inference.

Modules:
- lanit_export.graph_spec: the graphs' interface (kinds, precisions, I/O names, metadata), below the rest.
- lanit_export.onnx_export: the export-only wrappers, `export_onnx`, graph checks.
- lanit_export.validate: every artifact against the PyTorch generator (fp32 1e-4, fp16 2e-2 max abs).
- lanit_export.tensorrt: the only module that imports tensorrt (engine build, profile, sidecar).
- lanit_export.cli: `lanit-export`.
- lanit_export.triton_repo: Triton model repositories (ONNX, engine, Python backend), configs validated.
- lanit_export.serve: `lanit-serve`, PyTriton's bundled tritonserver on a Python-backend repository.

lanit_rt imports only lanit_export.onnx_export, lazily, for Translator.from_checkpoint(export=True);
what that module imports from lanit_rt are its modules, never the package. onnx / onnxruntime /
tensorrt are imported lazily.
"""

from lanit_export.errors import ExportError, MissingDependencyError, ValidationError

__all__ = ["ExportError", "MissingDependencyError", "ValidationError"]
