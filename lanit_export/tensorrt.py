"""TensorRT 10 and 11 engines built from the exported ONNX graph. The only module that imports tensorrt.

`export_tensorrt(model, OUT.engine, precision, profile)` writes
- OUT.engine: the serialized engine, inputs `image` [N, 3, H, W] fp32 and `domain_weights` [N, D]
  fp32, output `translated` fp32, one optimization profile over N in [min, max] tuned at opt;
- OUT.engine.json: the sidecar, the ONNX metadata keys (same string values) plus min/opt/max batch;
- OUT.engine.timing: the builder's timing cache (reused by later builds on the same GPU/TensorRT).

Precision. Every network is strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED in
TensorRT 10; always so in 11, where the flag is kept but ignored): each tensor has the type the
ONNX graph gives it. fp16 engines are built from the fp16 ONNX graph (lanit_export.onnx_export),
whose explicit casts keep the normalisation statistics and the table arithmetic in fp32
(fp16 variance overflows) and everything else in fp16, so no precision flag or per-layer
constraint is set: BuilderFlag.FP16, OBEY_PRECISION_CONSTRAINTS, ILayer.precision and
set_output_type (removed in TensorRT 11) are never touched. Both precisions clear BuilderFlag.TF32
(on by default), so fp32 convolutions match PyTorch fp32 and the fp16 graph's fp32 statistics and
table arithmetic stay fp32. Anything TensorRT raises while parsing or building becomes one
ExportError line that quotes the first error TensorRT logged (its root cause; later ones wrap it).

The engine is validated against the PyTorch generator (lanit_export.validate, fp32 1e-4 / fp16 2e-2) before
the engine and sidecar are renamed into place; any failure leaves no partial file. Profile arithmetic,
the builder configuration and the sidecar are plain functions, testable without TensorRT.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import lanit_rt
from lanit_rt import LanitConfig, LanitModel
from lanit_rt.checkpoint import atomic_write, publish_file
from lanit_export.errors import ExportError, ValidationError, require
from lanit_export.validate import VALIDATION_BATCHES, validate_artifact
from lanit_export.graph_spec import (OUTPUT_NAME, artifact_metadata, check_precision,
                                     config_from_metadata, input_names, read_metadata)
from lanit_export.onnx_export import check_output_path, export_onnx

ENGINE_KIND = "domain_weights"
DEFAULT_MIN_BATCH = 1
DEFAULT_OPT_BATCH = 8
DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_GIB = 4
SUPPORTED_MAJOR_VERSIONS = (10, 11)


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


def tensorrt_major(trt) -> int:
    """The major version of an imported tensorrt module; ExportError outside 10.x / 11.x."""
    version = str(getattr(trt, "__version__", "?"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = -1
    if major not in SUPPORTED_MAJOR_VERSIONS:
        raise ExportError(f"TensorRT {version} is not supported: lanit-rt builds engines with "
                          f"TensorRT {' or '.join(map(str, SUPPORTED_MAJOR_VERSIONS))}.x")
    return major


def network_flags(trt) -> int:
    """create_network() flags: strongly typed. TensorRT 11 keeps STRONGLY_TYPED as an ignored,
    deprecated member (strong typing is always on); a release without it gets 0."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def configure_builder(trt, builder_config, precision: str, workspace_gib: float) -> list[str]:
    """Set the workspace pool and the precision policy; returns what was set (for the log).

    Strong typing carries the precision, so fp16 needs no flag. TF32 (on by default for fp32
    convolutions and matmuls; 10.x and 11.x both have the flag) is cleared for both precisions:
    the fp16 graph keeps its normalisation statistics and table arithmetic in fp32 on purpose.
    """
    check_precision(precision)
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    settings = [f"workspace {workspace_gib} GiB", "strongly typed"]
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        builder_config.clear_flag(tf32)
        settings.append("TF32 off")
    return settings


def _recording_logger(trt):
    """A trt.ILogger that keeps TensorRT's errors and warnings, one line each, for ExportError
    messages: `cause()` is the first error (TensorRT logs the root cause first and a generic
    "engine != nullptr" wrapper last), else the last warning (a CUDA set-up failure, e.g. no
    device, is logged as a warning before the bindings raise)."""
    severity = trt.ILogger.Severity

    class RecordingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, level, message):
            line = " ".join(str(message).split())
            if level in (severity.ERROR, severity.INTERNAL_ERROR):
                self.errors.append(line)
            elif level == severity.WARNING:
                self.warnings.append(line)

        def cause(self) -> str | None:
            if self.errors:
                first, last = self.errors[0], self.errors[-1]
                return first if first == last else f"{first} (then: {last})"
            return f"no error logged; last warning: {self.warnings[-1]}" if self.warnings else None

    return RecordingLogger()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def build_engine_bytes(onnx_path: str | os.PathLike, precision: str, profile: BatchProfile,
                       timing_cache: str | os.PathLike | None = None,
                       workspace_gib: float = DEFAULT_WORKSPACE_GIB,
                       log: Callable[[str], None] | None = None) -> tuple[bytes, bytes]:
    """Parse the ONNX graph into a strongly typed network, configure profile and timing cache ->
    (engine, timing cache) bytes.

    The timing cache file (if given and present) seeds the build; the caller writes the updated
    cache, so a build that later fails validation leaves the file untouched. Parser and builder
    failures (a None result, an error logged, or an exception from the bindings) raise ExportError
    with one line.
    """
    trt = import_tensorrt()
    check_precision(precision)
    major = tensorrt_major(trt)
    metadata = read_metadata(onnx_path)
    config = config_from_metadata(metadata)
    if metadata["precision"] != precision or metadata["kind"] != ENGINE_KIND:
        raise ExportError(f"a {precision} engine needs a {precision} '{ENGINE_KIND}' ONNX graph; "
                          f"{onnx_path} is {metadata['precision']} '{metadata['kind']}'")
    logger = _recording_logger(trt)
    stage = "set up the builder"
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        stage = f"parse {onnx_path}"
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}")
        stage = "configure the build"
        builder_config = builder.create_builder_config()
        settings = configure_builder(trt, builder_config, precision, workspace_gib)
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes(profile, config).items():
            trt_profile.set_shape(name, low, opt, high)
        builder_config.add_optimization_profile(trt_profile)
        cache_file = Path(timing_cache) if timing_cache is not None else None
        cache_data = cache_file.read_bytes() if cache_file is not None and cache_file.exists() else b""
        cache = builder_config.create_timing_cache(cache_data)
        if not builder_config.set_timing_cache(cache, False) and cache_data:
            # a cache from another GPU or TensorRT: start a fresh one, which replaces the file
            if log:
                log(f"{cache_file} does not match this GPU / TensorRT; timing from scratch")
            cache = builder_config.create_timing_cache(b"")
            builder_config.set_timing_cache(cache, False)
        if log:
            log(f"TensorRT {trt.__version__} (major {major}): {', '.join(settings)}")
        stage = f"build a {precision} engine from {onnx_path}"
        serialized = builder.build_serialized_network(network, builder_config)
        if serialized is None:
            raise ExportError(f"TensorRT {trt.__version__} failed to {stage}: "
                              f"{logger.cause() or 'no error was logged'}")
        return bytes(serialized), bytes(cache.serialize())
    except ExportError:
        raise
    except Exception as err:  # the bindings raise TypeError/RuntimeError/AttributeError, multi-line
        cause = logger.cause()
        raise ExportError(f"TensorRT {getattr(trt, '__version__', '?')} failed to {stage}: "
                          f"{_one_line(err)}{f' (TensorRT logged: {cause})' if cause else ''}") from None


class EngineRunner:
    """Deserialize once, run many times: `runner(inputs) -> translated` (numpy in, numpy out).

    Buffers are torch CUDA tensors; the engine runs on a private stream (enqueueV3 on the default
    stream costs TensorRT an extra synchronisation and draws a warning).
    """

    def __init__(self, engine: bytes):
        trt = import_tensorrt()
        import torch  # noqa: PLC0415

        from lanit_rt.backends.tensorrt import torch_dtype  # noqa: PLC0415

        require_cuda("running a TensorRT engine")
        self._torch = torch
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine)
        if self._engine is None:
            raise ExportError("TensorRT could not deserialize the engine")
        self._context = self._engine.create_execution_context()
        self._output_dtype = torch_dtype(trt, self._engine.get_tensor_dtype(OUTPUT_NAME))
        self._stream = torch.cuda.Stream()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.cuda.stream(self._stream):
            device_inputs = {name: torch.from_numpy(np.ascontiguousarray(a)).cuda()
                             for name, a in inputs.items()}
            for name, tensor in device_inputs.items():
                if not self._context.set_input_shape(name, tuple(tensor.shape)):
                    raise ExportError(f"TensorRT refused input {name} of shape {tuple(tensor.shape)}")
                self._context.set_tensor_address(name, tensor.data_ptr())
            shape = tuple(self._context.get_tensor_shape(OUTPUT_NAME))
            output = torch.empty(shape, dtype=self._output_dtype, device="cuda")
            self._context.set_tensor_address(OUTPUT_NAME, output.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise ExportError("TensorRT execution failed")
        self._stream.synchronize()
        return output.float().cpu().numpy()


def require_cuda(what: str) -> None:
    """ExportError unless torch sees a CUDA GPU: TensorRT builds and runs engines only on one."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise ExportError(f"{what} needs a CUDA GPU, and torch sees none here")


def validation_batches(profile: BatchProfile) -> list[int]:
    """The batch sizes an engine is checked at: the usual ones clamped to the profile, plus its opt
    and max (kernels TensorRT picks for the largest shapes are run at least once)."""
    clamped = {min(max(b, profile.min), profile.max) for b in VALIDATION_BATCHES}
    return sorted(clamped | {profile.opt, profile.max})


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
    tensorrt_major(import_tensorrt())
    check_precision(precision)
    require_cuda("building a TensorRT engine")
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
            artifact.validation = validate_artifact(EngineRunner(engine), model, ENGINE_KIND, precision,
                                                    validation_batches(profile))
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
