"""ONNX export of the LANIT generator with the per-domain AdaIN table baked in.

Two graphs per export, both with a dynamic batch axis named "batch" and fixed H = W = img_size:
- kind "domain_weights": image [N, 3, H, W] fp32 in [-1, 1], domain_weights [N, D] fp32 (multi-hot
  or any non-negative weights with a positive row sum) -> translated [N, 3, H, W] fp32.
  In-graph: w = domain_weights / sum_k domain_weights[:, k]; params = w @ adain_table, where
  adain_table = G.adain_params(style_table) [D, P]. Exact: adain_params is affine and rows of w sum
  to 1, so w @ adain_params(table) == adain_params(w @ table), the PyTorch multi-hot path.
  An all-zero row (which lanit_rt's Translator refuses with a ValueError before any backend runs)
  has a defined output in the graph: equal weights 1/D over every domain, the mean domain style,
  instead of the 0/0 NaN image. Negative weights are not checked in the graph.
- kind "style": image, style [N, S] -> translated; params = G.adain_params(style) (reference-guided).

Precision "fp16": convolution weights and activations are fp16; the graph's inputs and outputs stay
fp32 (cast inside, `io_dtype` metadata says "float32"). Every normalisation statistic is computed in
fp32: the encoder's InstanceNormalization runs on an fp32 cast of its input (fp16 variance of large
activations overflows), and the AdaIN statistics (ReduceMean chains from lanit_kernels.adain_ref) already
cast to fp32. The domain-weight normalisation and the AdaIN table product are tiny and stay fp32.
`check_graph` verifies all of this on the written graph.

The dynamo exporter (torch.onnx.export(dynamo=True), onnxscript) is used at opset >= 18. It emits
InstanceNormalization (which has no training mode: statistics always come from the instance), never
BatchNormalization in training mode as the TorchScript exporter could.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lanit_rt.checkpoint import LanitModel, OutputPathError, check_output_file, publish_file, temp_file_beside
from lanit_rt.config import LanitConfig
from lanit_rt.errors import describe
from lanit_rt.networks import Generator
from lanit_rt.version import __version__ as lanit_rt_version
from lanit_export.errors import ExportError, ValidationError, require
from lanit_export.graph_spec import (BATCH_AXIS, KINDS, OUTPUT_NAME, artifact_metadata, check_kind, check_precision,
                                     input_names)

MIN_OPSET = 18
DEFAULT_OPSET = 18
_MAX_EXPORT_BATCH = 4096
# ONNX TensorProto element types used in the checks (values fixed by the ONNX spec).
_FLOAT, _FLOAT16 = 1, 10


def check_output_path(path: str | os.PathLike) -> None:
    """Raise ExportError unless a file can be written at `path` (its missing folders are made and
    probed: lanit_rt.checkpoint.check_output_file). Run before any tracing, which takes tens of
    seconds, so that an unusable output is reported at once."""
    try:
        check_output_file(path)
    except OutputPathError as err:
        raise ExportError(f"cannot write the output {path}: {err}") from None


def style_graph_path(onnx_path: str | os.PathLike) -> Path:
    """OUT.onnx -> OUT.style.onnx (the reference-guided graph written beside the main one)."""
    path = Path(onnx_path)
    return path.with_name(path.stem + ".style" + path.suffix)


class Fp32InstanceNorm(nn.Module):
    """nn.InstanceNorm2d(affine=True) that normalises in fp32 and returns the input dtype.

    Used only in fp16 exports: the ONNX graph then holds Cast(fp32) -> InstanceNormalization(fp32
    scale/bias initializers) -> Cast(fp16).
    """

    def __init__(self, norm: nn.InstanceNorm2d):
        super().__init__()
        if not norm.affine or norm.track_running_stats:
            raise ExportError("only affine InstanceNorm2d without running stats is supported")
        self.eps = norm.eps
        self.register_buffer("weight", norm.weight.detach().float().clone())
        self.register_buffer("bias", norm.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x.float(), weight=self.weight, bias=self.bias, eps=self.eps).to(x.dtype)


def _replace_instance_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.InstanceNorm2d):
            setattr(module, name, Fp32InstanceNorm(child))
        else:
            _replace_instance_norms(child)


def _export_generator(generator: Generator, precision: str) -> Generator:
    """A detached eval-mode copy of G; for fp16 its convolutions are fp16 and its norms fp32."""
    check_precision(precision)
    trunk = copy.deepcopy(generator).cpu().float().eval().requires_grad_(False)
    if precision == "fp16":
        _replace_instance_norms(trunk)
        for module in trunk.modules():
            if isinstance(module, nn.Conv2d):
                module.half()
    return trunk


class DomainWeightsGenerator(nn.Module):
    """Export-only: (image [N, 3, H, W] fp32, domain_weights [N, D]) -> translated [N, 3, H, W] fp32.

    Holds `adain_table` [D, P] = G.adain_params(style_table) in fp32; the style table itself, the
    mapping network and the style encoder are not part of the graph.
    """

    def __init__(self, generator: Generator, style_table: torch.Tensor, precision: str = "fp32"):
        super().__init__()
        config = generator.config
        if tuple(style_table.shape) != (config.num_domains, config.style_dim):
            raise ExportError(f"style table must be [{config.num_domains}, {config.style_dim}], "
                              f"got {list(style_table.shape)}")
        self.generator = _export_generator(generator, precision)  # fp32 CPU copy; AdaIN Linear fp32
        with torch.no_grad():
            table = self.generator.adain_params(style_table.detach().float().cpu())
        self.register_buffer("adain_table", table.clone())  # [D, P] fp32
        self.compute_dtype = torch.float16 if precision == "fp16" else torch.float32

    def forward(self, image: torch.Tensor, domain_weights: torch.Tensor) -> torch.Tensor:
        total = domain_weights.sum(dim=1, keepdim=True)  # [N, 1]
        empty = total <= 0.0
        # An all-zero row means equal weights over every domain (defined output instead of 0 / 0).
        weights = torch.where(empty, torch.full_like(domain_weights, 1.0 / domain_weights.shape[1]),
                              domain_weights / torch.where(empty, torch.ones_like(total), total))
        params = weights @ self.adain_table  # [N, P], rows of weights sum to 1
        # impl="ref": plain PyTorch ops that the exporter can trace (Triton kernels cannot).
        return self.generator(image.to(self.compute_dtype), adain_params=params,
                              impl="ref").float()


class StyleGenerator(nn.Module):
    """Export-only: (image [N, 3, H, W] fp32, style [N, S] fp32) -> translated [N, 3, H, W] fp32."""

    def __init__(self, generator: Generator, precision: str = "fp32"):
        super().__init__()
        self.generator = _export_generator(generator, precision)
        self.compute_dtype = torch.float16 if precision == "fp16" else torch.float32

    def forward(self, image: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        params = self.generator.adain_params(style)  # [N, P]; the Linear stays fp32
        return self.generator(image.to(self.compute_dtype), adain_params=params,
                              impl="ref").float()


def export_module(model: LanitModel, kind: str, precision: str) -> nn.Module:
    """The eval-mode nn.Module that is traced for (kind, precision)."""
    check_kind(kind)
    if kind == "domain_weights":
        return DomainWeightsGenerator(model.generator, model.style_table, precision).eval()
    return StyleGenerator(model.generator, precision).eval()


def _example_inputs(config: LanitConfig, kind: str, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(batch, 3, config.img_size, config.img_size) * 2 - 1
    if kind == "domain_weights":
        return image, torch.ones(batch, config.num_domains)
    return image, torch.randn(batch, config.style_dim)


def build_onnx_model(model: LanitModel, kind: str = "domain_weights", precision: str = "fp32",
                     opset: int = DEFAULT_OPSET):
    """Trace the export module with the dynamo exporter -> checked onnx.ModelProto with metadata."""
    return _build_checked(model, kind, precision, opset)[0]


def _trace(model: LanitModel, kind: str, precision: str, opset: int):
    onnx = require("onnx", "onnx")
    require("onnxscript", "onnx")
    check_kind(kind)
    check_precision(precision)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: InstanceNorm/Split need opset >= {MIN_OPSET}")
    module = export_module(model, kind, precision)
    names = input_names(kind)
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=_MAX_EXPORT_BATCH)
    # The exporter reports progress on stdout and warns that both inputs share the batch symbol.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, _example_inputs(model.config, kind), None, dynamo=True,
                opset_version=opset, input_names=list(names), output_names=[OUTPUT_NAME],
                dynamic_shapes={names[0]: {0: batch}, names[1]: {0: batch}},
                external_data=False, verbose=False)
        except Exception as err:  # the exporter raises many unrelated types
            raise ExportError(f"torch.onnx.export failed for the {kind} {precision} graph: "
                              f"{describe(err)}") from err
    proto = program.model_proto
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_AXIS
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, artifact_metadata(model.config, precision, kind,
                                                         model.weights_digest()))
    proto.producer_name = "lanit-rt"
    proto.producer_version = lanit_rt_version
    return proto


def _build_checked(model: LanitModel, kind: str, precision: str, opset: int):
    onnx = require("onnx", "onnx")
    proto = _trace(model, kind, precision, opset)
    onnx.checker.check_model(proto)
    return proto, check_graph(proto, model.config, kind, precision)


def _value_types(proto) -> dict[str, int]:
    """Element type of every named value (inputs, outputs, initializers, inferred intermediates)."""
    onnx = require("onnx", "onnx")
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


@dataclass(frozen=True)
class GraphSummary:
    opset: int
    op_counts: dict[str, int]
    instance_norms: int
    reduce_means: int
    fp16_convs: int
    convs: int


def check_graph(proto, config: LanitConfig, kind: str, precision: str) -> GraphSummary:
    """Raise ExportError unless the graph is the artifact the interface promises.

    Checks: opset >= 18; inputs (image [batch, 3, H, W], domain_weights [batch, D] or style
    [batch, S]) and output translated [batch, 3, H, W], all fp32 with axis 0 named "batch"; no
    BatchNormalization or training-mode node; InstanceNormalization scale/bias are initializers
    (TensorRT needs constants); every InstanceNormalization and ReduceMean reads fp32; in fp16
    graphs every Conv reads fp16 (and in fp32 graphs none does).
    """
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ExportError(f"graph opset {opset} < {MIN_OPSET}")
    size, second = config.img_size, (config.num_domains if kind == "domain_weights" else config.style_dim)
    expected = {"image": [3, size, size], input_names(kind)[1]: [second], OUTPUT_NAME: [3, size, size]}
    values = list(proto.graph.input) + list(proto.graph.output)
    found = [v.name for v in values]
    if found != [*input_names(kind), OUTPUT_NAME]:
        raise ExportError(f"graph inputs/outputs are {found}, expected {[*input_names(kind), OUTPUT_NAME]}")
    for value in values:
        tensor = value.type.tensor_type
        dims = tensor.shape.dim
        if tensor.elem_type != _FLOAT:
            raise ExportError(f"graph {value.name!r} must be float32, has element type {tensor.elem_type}")
        if len(dims) == 0 or dims[0].dim_param != BATCH_AXIS:
            raise ExportError(f"graph {value.name!r} has no dynamic '{BATCH_AXIS}' axis")
        if [d.dim_value for d in dims[1:]] != expected[value.name]:
            raise ExportError(f"graph {value.name!r} has dims {[d.dim_value for d in dims[1:]]} after "
                              f"the batch axis, expected {expected[value.name]}")
    initializers = {init.name for init in proto.graph.initializer}
    types = _value_types(proto)
    counts: dict[str, int] = {}
    fp16_convs = 0
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type == "BatchNormalization" or any(
                a.name == "training_mode" and a.i for a in node.attribute):
            raise ExportError(f"node {node.name} ({node.op_type}) is a training-mode normalisation")
        if node.op_type == "InstanceNormalization":
            if not all(name in initializers for name in node.input[1:3]):
                raise ExportError(f"InstanceNormalization {node.name}: scale/bias must be initializers")
        if node.op_type in ("InstanceNormalization", "ReduceMean") and types.get(node.input[0]) != _FLOAT:
            raise ExportError(f"{node.op_type} {node.name} computes statistics in element type "
                              f"{types.get(node.input[0])}, not fp32")
        if node.op_type == "Conv":
            fp16_convs += types.get(node.input[0]) == _FLOAT16
    convs = counts.get("Conv", 0)
    wanted = convs if precision == "fp16" else 0
    if fp16_convs != wanted:
        raise ExportError(f"{precision} graph has {fp16_convs} of {convs} convolutions in fp16, expected {wanted}")
    return GraphSummary(opset, counts, counts.get("InstanceNormalization", 0),
                        counts.get("ReduceMean", 0), fp16_convs, convs)


_NON_COMPUTE_OPS = {"Cast", "Constant", "Shape", "Reshape", "Unsqueeze", "Squeeze", "Split",
                    "Identity", "Concat", "Gather", "Slice"}


def fp32_compute_nodes(proto) -> list[str]:
    """Names of the arithmetic nodes that the graph computes in fp32 (all float outputs fp32).

    In an fp16 graph these are the normalisation statistics and the small fp32 table arithmetic:
    the layers a TensorRT fp16 build must pin to fp32. Layout/cast nodes are left out.
    """
    types = _value_types(proto)
    names = []
    for node in proto.graph.node:
        if node.op_type in _NON_COMPUTE_OPS:
            continue
        out_types = [types.get(o) for o in node.output if o]
        if out_types and all(t == _FLOAT for t in out_types):
            names.append(node.name)
    return names


@dataclass
class OnnxArtifact:
    path: Path
    kind: str
    precision: str
    summary: GraphSummary
    validation: Any = None  # lanit_export.validate.ValidationReport when validated


def export_onnx(model: LanitModel, out_path: str | os.PathLike, precision: str = "fp32",
                opset: int = DEFAULT_OPSET, validate: bool = True,
                log: Callable[[str], None] | None = None,
                kinds: tuple[str, ...] = KINDS) -> list[OnnxArtifact]:
    """Write OUT.onnx (domain_weights) and OUT.style.onnx (style), each validated before it appears.

    `kinds` selects the graphs (both by default; the TensorRT path needs only "domain_weights").

    Both graphs go to temporary names in the destination folder; only when both pass validation
    (lanit_export.validate, tolerance by precision) are they renamed into place, with the permissions a
    plain open() would give (or those of the files they replace). Output paths are checked before
    anything is traced. Any failure removes the temporary files and raises (ExportError /
    ValidationError / MissingDependencyError; OSError for file-system failures during the write).
    """
    onnx = require("onnx", "onnx")
    check_precision(precision)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ExportError(f"the ONNX output must end in .onnx, got {out_path}")
    if validate:
        from lanit_export.validate import validate_onnx  # noqa: PLC0415 (looked up when validating)
        require("onnxruntime", "onnx")
    for kind in kinds:
        check_kind(kind)
    paths = {"domain_weights": out_path, "style": style_graph_path(out_path)}
    targets = {kind: paths[kind] for kind in KINDS if kind in kinds}
    if not targets:
        raise ExportError("nothing to export: `kinds` is empty")
    for final in targets.values():
        check_output_path(final)
    temps: dict[str, Path] = {}
    artifacts: list[OnnxArtifact] = []
    try:
        for kind, final in targets.items():
            proto, summary = _build_checked(model, kind, precision, opset)
            tmp = temp_file_beside(final, suffix=".tmp.onnx")
            temps[kind] = tmp
            onnx.save(proto, str(tmp))
            artifact = OnnxArtifact(final, kind, precision, summary)
            if validate:
                artifact.validation = validate_onnx(tmp, model, kind=kind, precision=precision)
                if log:
                    log(artifact.validation.describe(final.name))
                if not artifact.validation.passed:
                    raise ValidationError(artifact.validation.describe(final.name))
            artifacts.append(artifact)
        for kind, final in targets.items():
            publish_file(temps[kind], final)
            del temps[kind]
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return artifacts
