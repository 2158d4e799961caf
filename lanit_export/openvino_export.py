"""OpenVINO IR export: OUT.xml + OUT.bin (and OUT.style.xml / .bin) from the ONNX graphs.

The ONNX graphs are traced as `export_onnx` traces them (fp32), read by OpenVINO and saved as IR
with fp32 weights (`compress_to_fp16=False`: fp16 weights would change results on every CPU; the
inference precision is chosen at load time by the backend's precision hint). The LANIT metadata
(config, domain texts, weights digest, kind) is written into the model's rt_info under "lanit",
where lanit_rt.backends.openvino reads it. Each IR is validated in OpenVINO (fp32 inference) against
the PyTorch generator with the fp32 tolerance before its files are renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lanit_rt import LanitModel
from lanit_rt.backends.openvino import kept_signal_stack, openvino_core
from lanit_rt.checkpoint import output_file_mode
from lanit_export.errors import ExportError, ValidationError, require
from lanit_export.graph_spec import KINDS, read_metadata
from lanit_export.onnx_export import _build_checked, check_output_path
from lanit_export.validate import ValidationReport, validate_artifact


@dataclass
class OpenVINOArtifact:
    path: Path
    kind: str
    validation: ValidationReport | None = None


def style_ir_path(xml_path: str | os.PathLike) -> Path:
    """OUT.xml -> OUT.style.xml."""
    path = Path(xml_path)
    return path.with_name(path.stem + ".style" + path.suffix)


def openvino_runner(path: str | os.PathLike):
    """An OpenVINO fp32 CPU model wrapped as `run(inputs) -> translated` (reshaped per batch)."""
    require("openvino", "openvino")
    core = openvino_core()
    model = core.read_model(str(path))
    compiled: dict[tuple, object] = {}

    def run(inputs):
        shapes = {name: list(array.shape) for name, array in inputs.items()}
        key = tuple(tuple(v) for v in shapes.values())
        if key not in compiled:
            clone = model.clone()
            clone.reshape(shapes)
            with kept_signal_stack():
                compiled[key] = core.compile_model(clone, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return compiled[key](inputs)["translated"]

    return run


def export_openvino(model: LanitModel, out_path: str | os.PathLike, validate: bool = True,
                    log: Callable[[str], None] | None = None,
                    kinds: tuple[str, ...] = KINDS) -> list[OpenVINOArtifact]:
    """Write OUT.xml/.bin (domain_weights) and OUT.style.xml/.bin (style), each validated first."""
    ov = require("openvino", "openvino")
    onnx = require("onnx", "onnx")
    out_path = Path(out_path)
    if out_path.suffix != ".xml":
        raise ExportError(f"the OpenVINO IR output must end in .xml, got {out_path}")
    paths = {"domain_weights": out_path, "style": style_ir_path(out_path)}
    targets = {kind: paths[kind] for kind in KINDS if kind in kinds}
    if not targets:
        raise ExportError("nothing to export: `kinds` is empty")
    for final in targets.values():
        check_output_path(final)
        check_output_path(final.with_suffix(".bin"))
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    artifacts: list[OpenVINOArtifact] = []
    try:
        for kind, final in targets.items():
            proto, _ = _build_checked(model, kind, "fp32", 18)
            onnx_file = staging / f"{kind}.onnx"
            onnx.save(proto, str(onnx_file))
            metadata = read_metadata(proto)
            ir = openvino_core().read_model(str(onnx_file))
            for key, value in metadata.items():
                ir.set_rt_info(value, ["lanit", key])
            ov.save_model(ir, str(staging / final.name), compress_to_fp16=False)
            artifact = OpenVINOArtifact(final, kind)
            if validate:
                artifact.validation = validate_artifact(openvino_runner(staging / final.name), model,
                                                        kind, "fp32")
                if log:
                    log(artifact.validation.describe(final.name))
                if not artifact.validation.passed:
                    raise ValidationError(artifact.validation.describe(final.name))
            artifacts.append(artifact)
        for kind, final in targets.items():
            # .bin first: an .xml that appears always finds its weights.
            for suffix in (".bin", ".xml"):
                source, target = staging / final.with_suffix(suffix).name, final.with_suffix(suffix)
                os.chmod(source, output_file_mode(target))
                os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return artifacts
