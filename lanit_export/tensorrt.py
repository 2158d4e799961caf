"""TensorRT 10 engines built from the exported ONNX graph. The only module that imports tensorrt.

`export_tensorrt(model, OUT.engine, precision, profile)` writes
- OUT.engine: the serialized engine, inputs `image` [N, 3, H, W] fp32 and `domain_weights` [N, D]
  fp32, output `translated` fp32, one optimization profile over N in [min, max] tuned at opt;
- OUT.engine.json: the sidecar, the ONNX metadata keys (same string values) plus min/opt/max batch;
- OUT.engine.timing: the builder's timing cache (reused by later builds on the same GPU/TensorRT).

Precision. fp32 engines clear TF32 so convolutions match PyTorch fp32. fp16 engines are built from
the fp16 ONNX graph (lanit_export.onnx_export), whose casts already say which nodes compute in fp32 (the
normalisation statistics, the table arithmetic); those layers, plus every normalization/reduce layer,
get `precision = float32` and fp32 output types, and OBEY_PRECISION_CONSTRAINTS makes TensorRT keep
them (fp16 variance overflows). The FP16 flag lets every other layer run in fp16.

The engine is validated against the PyTorch generator (lanit_export.validate, fp32 1e-4 / fp16 2e-2) before
the engine and sidecar are renamed into place; any failure leaves no partial file. Profile arithmetic,
the choice of pinned layers and the sidecar are plain functions, testable without TensorRT.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

import lanit_rt
from lanit_rt import LanitConfig, LanitModel
from lanit_rt.checkpoint import atomic_write, publish_file
from lanit_export.errors import ExportError, ValidationError, require
from lanit_export.validate import VALIDATION_BATCHES, validate_artifact
from lanit_export.onnx_export import (OUTPUT_NAME, artifact_metadata, check_output_path, check_precision,
                                config_from_metadata, export_onnx, fp32_compute_nodes, input_names,
                                read_metadata)

ENGINE_KIND = "domain_weights"
DEFAULT_MIN_BATCH = 1
DEFAULT_OPT_BATCH = 8
DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_GIB = 4
# TensorRT layer types (trt.LayerType member names) that always compute in fp32 in an fp16 engine.
PINNED_LAYER_TYPES = frozenset({"NORMALIZATION", "REDUCE"})


@dataclass(frozen=True)
class BatchProfile:
    """The batch range of the engine's one optimization profile: min <= opt <= max."""

    min: int
    opt: int
    max: int


def batch_profile(min_batch: int | None = None, opt_batch: int | None = None,
                  max_batch: int | None = None) -> BatchProfile:
    """Resolve and check a batch range; unset values default to 1 / 8 (clamped) / max(32, min).

    Raises ExportError for a non-positive size or an empty range (min > max, opt outside it).
    """
    for name, value in (("min", min_batch), ("opt", opt_batch), ("max", max_batch)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ExportError(f"{name} batch must be a positive integer, got {value!r}")
    low = DEFAULT_MIN_BATCH if min_batch is None else min_batch
    high = max(DEFAULT_MAX_BATCH, low) if max_batch is None else max_batch
    if low > high:
        raise ExportError(f"empty batch range: min batch {low} > max batch {high}")
    opt = min(max(DEFAULT_OPT_BATCH, low), high) if opt_batch is None else opt_batch
    if not low <= opt <= high:
        raise ExportError(f"opt batch {opt} is outside the batch range [{low}, {high}]")
    return BatchProfile(low, opt, high)


def profile_shapes(profile: BatchProfile, config: LanitConfig,
                   kind: str = ENGINE_KIND) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per input name: (min_shape, opt_shape, max_shape) for IOptimizationProfile.set_shape."""
    image, second = input_names(kind)
    width = config.num_domains if kind == "domain_weights" else config.style_dim
    size = config.img_size
    return {
        image: tuple((n, 3, size, size) for n in (profile.min, profile.opt, profile.max)),
        second: tuple((n, width) for n in (profile.min, profile.opt, profile.max)),
    }


_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def onnx_nodes_of_layer(metadata: str) -> list[str]:
    """ONNX node names recorded by the parser in ILayer.metadata ("[ONNX Layer: NAME]" entries)."""
    return _ONNX_LAYER.findall(metadata or "")


def layers_to_pin(layers: Sequence[tuple[str, str, str]], fp32_nodes: Iterable[str]) -> list[int]:
    """Indices of the network layers to force to fp32 in an fp16 build.

    `layers` is [(layer name, layer type name, layer metadata)] in network order. A layer is pinned
    when its type is in PINNED_LAYER_TYPES, or when it was created for one of `fp32_nodes` (ONNX
    node names): TensorRT 10's ONNX parser records the source node as "[ONNX Layer: NAME]" in the
    layer's metadata (every helper layer of a node included) and names the first layer after it.
    """
    nodes = set(fp32_nodes)
    pinned = []
    for index, (name, layer_type, metadata) in enumerate(layers):
        if (layer_type in PINNED_LAYER_TYPES or name in nodes
                or any(node in nodes for node in onnx_nodes_of_layer(metadata))):
            pinned.append(index)
    return pinned


def engine_sidecar(config: LanitConfig, precision: str, profile: BatchProfile,
                   kind: str = ENGINE_KIND, weights_digest: str | None = None, **extra) -> dict:
    """The sidecar content: the ONNX metadata keys (same string values) + min/opt/max batch."""
    data: dict = dict(artifact_metadata(config, precision, kind, weights_digest))
    data.update(min_batch=profile.min, opt_batch=profile.opt, max_batch=profile.max)
    data.update(extra)
    return data


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


def timing_cache_path(engine_path: str | os.PathLike) -> Path:
    path = Path(engine_path)
    return path.with_name(path.name + ".timing")


def read_sidecar(engine_path: str | os.PathLike) -> tuple[dict, LanitConfig, BatchProfile]:
    """Read OUT.engine.json -> (raw dict, config, batch profile); ExportError when malformed."""
    path = sidecar_path(engine_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        profile = batch_profile(data["min_batch"], data["opt_batch"], data["max_batch"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{path} is not a lanit-rt engine sidecar: {err}") from None
    return data, config_from_metadata(data), profile


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_sidecar(engine_path: str | os.PathLike, data: dict) -> Path:
    path = sidecar_path(engine_path)
    _write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return path


def import_tensorrt():
    """`import tensorrt`, or MissingDependencyError naming `pip install 'lanit-rt[tensorrt]'`."""
    return require("tensorrt", "tensorrt")


def build_engine_bytes(onnx_path: str | os.PathLike, precision: str, profile: BatchProfile,
                       timing_cache: str | os.PathLike | None = None,
                       workspace_gib: float = DEFAULT_WORKSPACE_GIB,
                       log: Callable[[str], None] | None = None) -> tuple[bytes, bytes]:
    """Parse the ONNX graph, configure precision/profile/timing cache -> (engine, timing cache) bytes.

    The timing cache file (if given and present) seeds the build; the caller writes the updated
    cache, so a build that later fails validation leaves the file untouched.
    """
    trt = import_tensorrt()
    check_precision(precision)
    metadata = read_metadata(onnx_path)
    config = config_from_metadata(metadata)
    if metadata["precision"] != precision or metadata["kind"] != ENGINE_KIND:
        raise ExportError(f"a {precision} engine needs a {precision} '{ENGINE_KIND}' ONNX graph; "
                          f"{onnx_path} is {metadata['precision']} '{metadata['kind']}'")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        builder_config.set_flag(trt.BuilderFlag.FP16)
        builder_config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        onnx = require("onnx", "tensorrt")
        fp32_nodes = fp32_compute_nodes(onnx.load(str(onnx_path)))
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        pinned = layers_to_pin([(layer.name, layer.type.name, getattr(layer, "metadata", ""))
                                for layer in layers], fp32_nodes)
        float_types = (trt.float32, trt.float16)
        for index in pinned:
            layer = layers[index]
            layer.precision = trt.float32
            for out in range(layer.num_outputs):
                if layer.get_output(out).dtype in float_types:
                    layer.set_output_type(out, trt.float32)
        if log:
            log(f"pinned {len(pinned)} of {len(layers)} TensorRT layers to fp32")
    else:
        builder_config.clear_flag(trt.BuilderFlag.TF32)  # TF32 convs would miss the 1e-4 fp32 tolerance
    trt_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(profile, config).items():
        trt_profile.set_shape(name, low, opt, high)
    builder_config.add_optimization_profile(trt_profile)
    cache_file = Path(timing_cache) if timing_cache is not None else None
    cache_data = cache_file.read_bytes() if cache_file is not None and cache_file.exists() else b""
    cache = builder_config.create_timing_cache(cache_data)
    builder_config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build a {precision} engine from {onnx_path}")
    return bytes(serialized), bytes(cache.serialize())


class EngineRunner:
    """Deserialize once, run many times: `runner(inputs) -> translated` (numpy in, numpy out).

    Buffers are torch CUDA tensors; the engine runs on torch's current stream.
    """

    def __init__(self, engine: bytes):
        trt = import_tensorrt()
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise ExportError("running a TensorRT engine needs a CUDA GPU")
        self._torch = torch
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine)
        if self._engine is None:
            raise ExportError("TensorRT could not deserialize the engine")
        self._context = self._engine.create_execution_context()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        device_inputs = {name: torch.from_numpy(np.ascontiguousarray(a)).cuda() for name, a in inputs.items()}
        for name, tensor in device_inputs.items():
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        shape = tuple(self._context.get_tensor_shape(OUTPUT_NAME))
        output = torch.empty(shape, dtype=torch.float32, device="cuda")
        self._context.set_tensor_address(OUTPUT_NAME, output.data_ptr())
        stream = torch.cuda.current_stream()
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        return output.cpu().numpy()


@dataclass
class EngineArtifact:
    path: Path
    sidecar: Path
    timing_cache: Path
    precision: str
    profile: BatchProfile
    validation: object = None  # lanit_export.validate.ValidationReport


def export_tensorrt(model: LanitModel, engine_path: str | os.PathLike, precision: str,
                    profile: BatchProfile | None = None, onnx_path: str | os.PathLike | None = None,
                    validate: bool = True, workspace_gib: float = DEFAULT_WORKSPACE_GIB,
                    log: Callable[[str], None] | None = None) -> EngineArtifact:
    """Build, validate and write OUT.engine + OUT.engine.json (+ the timing cache OUT.engine.timing).

    Without `onnx_path` the matching-precision ONNX graph is exported to a temporary folder first.
    TensorRT is imported before anything is written, so a missing install leaves no file behind.
    """
    import_tensorrt()
    check_precision(precision)
    profile = profile or batch_profile()
    engine_path = Path(engine_path)
    for path in (engine_path, sidecar_path(engine_path), timing_cache_path(engine_path)):
        check_output_path(path)
    digest = model.weights_digest()
    with tempfile.TemporaryDirectory(prefix=".lanit-export-", dir=engine_path.parent) as scratch:
        if onnx_path is None:
            onnx_path = Path(scratch) / "generator.onnx"
            export_onnx(model, onnx_path, precision, validate=True, log=log, kinds=(ENGINE_KIND,))
        elif not Path(onnx_path).is_file():
            raise ExportError(f"no ONNX graph at {onnx_path}")
        else:
            onnx_meta = read_metadata(onnx_path)
            if config_from_metadata(onnx_meta) != model.config:
                raise ExportError(f"{onnx_path} was exported from a different model than the checkpoint")
            if onnx_meta.get("weights_digest", digest) != digest:  # graphs before digests: unchecked
                raise ExportError(f"{onnx_path} was exported from other weights than the checkpoint "
                                  "(an older export?); export the ONNX graph again or leave out --onnx-path")
        engine, cache = build_engine_bytes(onnx_path, precision, profile, timing_cache_path(engine_path),
                                    workspace_gib, log)
        artifact = EngineArtifact(engine_path, sidecar_path(engine_path), timing_cache_path(engine_path),
                                  precision, profile)
        if validate:
            batches = sorted({min(max(b, profile.min), profile.max) for b in VALIDATION_BATCHES})
            artifact.validation = validate_artifact(EngineRunner(engine), model, ENGINE_KIND, precision,
                                                    batches)
            if log:
                log(artifact.validation.describe(engine_path.name))
            if not artifact.validation.passed:
                raise ValidationError(artifact.validation.describe(engine_path.name))
        trt = import_tensorrt()
        sidecar = engine_sidecar(model.config, precision, profile, weights_digest=digest,
                                 tensorrt_version=trt.__version__, lanit_rt_version=lanit_rt.__version__)
        tmp_engine = Path(scratch) / engine_path.name
        tmp_engine.write_bytes(engine)
        write_sidecar(engine_path, sidecar)
        try:
            publish_file(tmp_engine, engine_path)
        except BaseException:
            sidecar_path(engine_path).unlink(missing_ok=True)
            raise
        _write_bytes_atomic(artifact.timing_cache, cache)
    return artifact
