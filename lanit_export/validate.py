"""Numerical validation of exported artifacts against the PyTorch generator.

The reference is always the fp32 PyTorch path a user would run: for kind "domain_weights",
`G(x, style=model.domain_style(w))` (mix the style table, then the AdaIN Linear), so the check also
covers the baked AdaIN table; for kind "style", `G(x, style)`. Inputs: random images in [-1, 1] and,
for every batch size (1, 3, 8 by default, all through one artifact), targets that cycle through
multi-hot pairs, one-hot rows, all domains on and random non-negative (unnormalised) weights.
The max abs error over every output element is compared with the precision's tolerance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from lanit_rt.checkpoint import LanitModel
from lanit_rt.config import LanitConfig
from lanit_export.errors import ExportError, require
from lanit_export.graph_spec import OUTPUT_NAME, check_kind, check_precision, input_names, read_metadata

TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}
VALIDATION_BATCHES = (1, 3, 8)

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def validation_targets(num_domains: int, batch: int, seed: int = 0) -> np.ndarray:
    """Target weights [batch, D] float32: multi-hot first (row 0 is a pair), then other patterns.

    Cycle: pair (0, D-1), one-hot per domain, neighbouring pairs (k, k+1), all on, random weights
    in [0.1, 1) (not normalised: the artifact must normalise rows itself).
    """
    d = num_domains
    rows: list[np.ndarray] = []
    pair = np.zeros(d, np.float32)
    pair[[0, d - 1]] = 1
    rows.append(pair)
    for k in range(d):
        rows.append(np.eye(d, dtype=np.float32)[k])
    for k in range(d - 1):
        row = np.zeros(d, np.float32)
        row[k:k + 2] = 1
        rows.append(row)
    rows.append(np.ones(d, np.float32))
    rng = np.random.default_rng(seed)
    rows.append(rng.uniform(0.1, 1.0, d).astype(np.float32))
    # Spread the batch over the cycle so batch 3 and 8 see pairs, one-hots and the all-on row.
    stride = max(1, len(rows) // max(batch, 1))
    return np.stack([rows[(i * stride) % len(rows)] for i in range(batch)])


def validation_inputs(model: LanitModel, kind: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images in [-1, 1] plus targets (domain_weights) or style codes [batch, S] (style)."""
    check_kind(kind)
    config: LanitConfig = model.config
    gen = torch.Generator().manual_seed(seed * 1000 + batch)
    image = torch.rand(batch, 3, config.img_size, config.img_size, generator=gen) * 2 - 1
    names = input_names(kind)
    if kind == "domain_weights":
        second = validation_targets(config.num_domains, batch, seed)
    else:
        # Realistic codes: mixes of the table's domain styles plus noise of the table's scale.
        mix = torch.from_numpy(validation_targets(config.num_domains, batch, seed))
        base = model.domain_style(mix)
        noise = torch.randn(batch, config.style_dim, generator=gen) * base.std().clamp(min=1e-3)
        second = (base + 0.5 * noise).numpy().astype(np.float32)
    return {names[0]: image.numpy().astype(np.float32), names[1]: second}


@torch.no_grad()
def reference_output(model: LanitModel, kind: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The fp32 PyTorch generator's output for the artifact inputs, [N, 3, H, W] float32."""
    generator = model.generator
    device = next(generator.parameters()).device
    image = torch.from_numpy(inputs["image"]).to(device)
    if kind == "domain_weights":
        style = model.domain_style(torch.from_numpy(inputs["domain_weights"]).to(device))
    else:
        style = torch.from_numpy(inputs["style"]).to(device)
    return generator(image, style.float()).float().cpu().numpy()


@dataclass
class ValidationReport:
    kind: str
    precision: str
    tolerance: float
    max_abs_error: dict[int, float] = field(default_factory=dict)  # batch size -> max |artifact - torch|

    @property
    def worst(self) -> float:
        return max(self.max_abs_error.values(), default=float("nan"))

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_error) and all(np.isfinite(e) and e <= self.tolerance
                                                for e in self.max_abs_error.values())

    def describe(self, name: str) -> str:
        errors = ", ".join(f"batch {b}: {e:.3g}" for b, e in self.max_abs_error.items())
        verdict = "ok" if self.passed else "FAILED"
        return (f"{name} [{self.kind}, {self.precision}] max abs error vs PyTorch: {errors} "
                f"(tolerance {self.tolerance:g}) {verdict}")


def validate_artifact(run: Runner, model: LanitModel, kind: str, precision: str,
                      batches: Sequence[int] = VALIDATION_BATCHES, seed: int = 0) -> ValidationReport:
    """Run `run(inputs) -> translated` at each batch size and compare with the PyTorch generator."""
    check_kind(kind)
    check_precision(precision)
    report = ValidationReport(kind, precision, TOLERANCES[precision])
    for batch in batches:
        inputs = validation_inputs(model, kind, batch, seed)
        expected = reference_output(model, kind, inputs)
        got = np.asarray(run(inputs))
        if got.shape != expected.shape:
            raise ExportError(f"artifact output has shape {got.shape}, expected {expected.shape}")
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        report.max_abs_error[batch] = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    return report


def onnx_runner(path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                threads: int | None = None, config: dict[str, str] | None = None) -> Runner:
    """An onnxruntime session wrapped as `run(inputs) -> translated`; `config`: session config
    entries (e.g. {"session.intra_op.allow_spinning": "0"})."""
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return session.run([OUTPUT_NAME], inputs)[0]

    return run


def validate_onnx(path: str | os.PathLike, model: LanitModel, kind: str | None = None,
                  precision: str | None = None, batches: Sequence[int] = VALIDATION_BATCHES,
                  providers: Sequence[str] = ("CPUExecutionProvider",)) -> ValidationReport:
    """Validate an ONNX artifact in onnxruntime; kind/precision default to its metadata."""
    metadata = read_metadata(path)
    kind = kind or metadata.get("kind")
    precision = precision or metadata.get("precision")
    if kind is None or precision is None:
        raise ExportError(f"{path}: no kind/precision metadata; not a lanit-export artifact")
    return validate_artifact(onnx_runner(path, providers), model, kind, precision, batches)
