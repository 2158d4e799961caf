"""INT8 ONNX graphs (onnxruntime static QDQ) and the quality gate the Translator applies to them.

`quantize_onnx_int8` turns an fp32 `domain_weights` graph into a QDQ graph: per-channel int8 weights
and uint8 activations on the convolutions only (instance norms, AdaIN statistics and the style
table product stay fp32), calibrated on real images (`calibration`, uint8 [N, H, W, 3] at the
model size, run with their own domain targets), optionally keeping the first and last
convolutions in fp32 (`keep_ends`). It then measures the PSNR of the int8 output against the fp32
graph on `heldout` images (other images than the calibration ones; PSNR over [-1, 1] outputs,
peak-to-peak 2: 10 log10(4 / MSE)) and records it in the graph's metadata (`precision` "int8",
`psnr_db`, `psnr_images`). The Translator refuses an int8 graph whose recorded PSNR is below
MIN_INT8_PSNR_DB (lanit_rt.backends.base.check_int8_quality), naming the measured figure.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from lanit_export.errors import ExportError, require

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def psnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR of `test` against `reference`, both float in [-1, 1] (clamped first): 10 log10(4 / MSE)."""
    ref = np.clip(reference.astype(np.float64), -1, 1)
    out = np.clip(test.astype(np.float64), -1, 1)
    mse = float(np.mean((ref - out) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse))


def _as_model_batch(images: np.ndarray, what: str, side: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] (H = W = `side` when given) -> float32 [N, 3, H, W] in [-1, 1] (v / 127.5 - 1).
    Anything else is an ExportError naming `what`: float images would calibrate on the wrong scale."""
    shape = getattr(images, "shape", None)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ExportError(f"{what} must be a uint8 numpy array [N, H, W, 3] (0-255 RGB, as images load), "
                          f"got {type(images).__name__} of dtype {getattr(images, 'dtype', None)}")
    if images.ndim != 4 or shape[-1] != 3 or shape[0] < 1:
        raise ExportError(f"{what} must be uint8 [N, H, W, 3] with N >= 1, got shape {shape}")
    if side is not None and shape[1:3] != (side, side):
        raise ExportError(f"{what} must be {side}x{side} images (the graph's size), got {shape[1]}x{shape[2]}")
    return (images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).transpose(0, 3, 1, 2).copy()


def _targets(n: int, num_domains: int) -> np.ndarray:
    """One-hot rows cycling through the domains, then a multi-hot pair every third row."""
    rows = np.zeros((n, num_domains), np.float32)
    for i in range(n):
        rows[i, i % num_domains] = 1
        if i % 3 == 2:
            rows[i, (i + 1) % num_domains] = 1
    return rows


def conv_nodes(onnx_path: str | os.PathLike) -> list[str]:
    """Names of the graph's Conv nodes in graph order (the first reads the image, the last writes RGB)."""
    onnx = require("onnx", "onnx")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return [node.name for node in proto.graph.node if node.op_type == "Conv"]


def quantize_onnx_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray,
                       heldout: np.ndarray, keep_ends: bool = True, method: str = "minmax") -> float:
    """Write the int8 QDQ graph to `out_path` and return its held-out PSNR (dB) against fp32."""
    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    from onnxruntime import quantization as q  # noqa: PLC0415

    if method not in CALIBRATION_METHODS:
        raise ExportError(f"unknown calibration method {method!r}; choose one of {list(CALIBRATION_METHODS)}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    proto = onnx.load(str(fp32_path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("kind") != "domain_weights" or meta.get("precision") != "fp32":
        raise ExportError(f"{fp32_path} is not an fp32 domain_weights graph of lanit-export")
    num_domains = len(proto.graph.input[1].type.tensor_type.shape.dim) and \
        proto.graph.input[1].type.tensor_type.shape.dim[1].dim_value
    side = proto.graph.input[0].type.tensor_type.shape.dim[-1].dim_value or None  # 0: a dynamic size
    calib = _as_model_batch(calibration, "calibration", side)
    held = _as_model_batch(heldout, "heldout", side)
    targets = _targets(len(calib), num_domains)

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self._items = iter([{"image": calib[i:i + 1], "domain_weights": targets[i:i + 1]}
                                for i in range(len(calib))])

        def get_next(self):
            return next(self._items, None)

    convs = conv_nodes(fp32_path)
    exclude = [convs[0], convs[-1]] if keep_ends and len(convs) >= 2 else []
    methods = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
               "entropy": q.CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        tmp = Path(scratch) / "int8.onnx"
        q.quantize_static(str(fp32_path), str(tmp), Reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8, op_types_to_quantize=["Conv"],
                          nodes_to_exclude=exclude, calibrate_method=methods[method],
                          extra_options={"CalibTensorRangeSymmetric": False})
        held_targets = _targets(len(held), num_domains)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        fp32 = ort.InferenceSession(str(fp32_path), options, providers=["CPUExecutionProvider"])
        int8 = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        feeds = {"image": held, "domain_weights": held_targets}
        psnr = psnr_db(fp32.run(["translated"], feeds)[0], int8.run(["translated"], feeds)[0])
        quantized = onnx.load(str(tmp))
        del quantized.metadata_props[:]
        meta.update(precision="int8", psnr_db=f"{psnr:.2f}", psnr_images=str(len(held)),
                    int8_recipe=f"QDQ per-channel convs, {method} calibration on {len(calib)} images"
                                + (", first/last conv fp32" if exclude else ""))
        onnx.helper.set_model_props(quantized, meta)
        onnx.save(quantized, str(tmp))
        os.replace(tmp, out_path)
    return psnr
