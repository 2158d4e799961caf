"""Triton Inference Server model repositories for a LANIT generator.

    REPO/<name>/config.pbtxt
    REPO/<name>/domains.txt            the domain texts, one a line (also parameter "domains", JSON)
    REPO/<name>/warmup/domain_weights  warm-up input: D float32 ones (raw, little-endian)
    REPO/<name>/1/model.onnx           platform "onnxruntime_onnx"    (write_onnx_repository)
    REPO/<name>/1/model.plan           platform "tensorrt_plan"       (write_engine_repository)
    REPO/<name>/1/model.py + artifact  backend "python" over lanit_rt (write_python_repository)

ONNX / engine models speak the graph's own interface: image FP32 [3, S, S] and domain_weights FP32
[D] -> translated FP32 [3, S, S] per batch item (max_batch_size > 0: Triton adds the batch axis).
The Python-backend model speaks the application interface of lanit_rt.triton_model: image UINT8
[H, W, 3] (any size) and either domains BYTES [1] ("name,name") or domain_weights FP32 [D] ->
translated UINT8 [S, S, 3]. It is the one that the tritonserver bundled with PyTriton (Python
backend only) loads, and what `lanit-serve` runs.

Every config.pbtxt is parsed with Triton's ModelConfig protobuf (tritonclient ships
model_config_pb2) and checked field by field against the graph it serves (names, data types, dims,
batch axis) before the model folder is published by a rename; nothing half-written is left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lanit_rt import LanitConfig
from lanit_export.errors import ExportError, MissingDependencyError

ONNX_PLATFORM = "onnxruntime_onnx"
ENGINE_PLATFORM = "tensorrt_plan"
PYTHON_BACKEND = "python"
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.plan"
PYTHON_FILE = "model.py"
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "domains.txt"
WARMUP_DIR = "warmup"
WARMUP_WEIGHTS = "domain_weights"
VERSION = "1"
DEFAULT_NAME = "lanit"
DEFAULT_MAX_BATCH = 16
DEFAULT_QUEUE_DELAY_US = 2000
DEFAULT_MAX_IMAGE_SIDE = 2048
PYTHON_RUNTIMES = ("onnxruntime", "torch")
# Serving-side names of the Python-backend model (lanit_rt.triton_model reads the same names).
APP_IMAGE, APP_DOMAINS, APP_WEIGHTS, APP_OUTPUT = "image", "domains", "domain_weights", "translated"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# ONNX TensorProto element type -> Triton DataType name (values fixed by the ONNX spec).
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 2: "TYPE_UINT8", 6: "TYPE_INT32", 7: "TYPE_INT64",
                   9: "TYPE_BOOL", 11: "TYPE_FP64", 8: "TYPE_STRING"}


def model_config_pb2():
    """Triton's ModelConfig protobuf module, from the installed tritonclient.

    Loaded from its file rather than as tritonclient.grpc.model_config_pb2, whose package import
    needs grpcio: `tritonclient[http]` alone (in lanit-rt's dev extra) is enough to validate configs.
    """
    spec = importlib.util.find_spec("tritonclient")
    path = Path(spec.origin).parent / "grpc" / "model_config_pb2.py" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MissingDependencyError("validating Triton configs needs tritonclient (its ModelConfig "
                                     "protobuf); install it with: pip install 'tritonclient[http]' "
                                     "(lanit-rt[serve] has it too, but pins numpy < 2: give that its "
                                     "own environment)")
    loaded = importlib.util.spec_from_file_location("_lanit_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(loaded)
    try:
        loaded.loader.exec_module(module)
    except Exception as err:  # protobuf runtime/gencode mismatches raise their own types
        raise MissingDependencyError(f"tritonclient's ModelConfig protobuf does not load here ({err}); "
                                     "pip install 'lanit-rt[serve]'") from None
    return module


def parse_config(text: str):
    """config.pbtxt text -> inference.ModelConfig; ExportError naming the line for unknown fields,
    bad enum values or syntax errors."""
    from google.protobuf import text_format  # noqa: PLC0415 (tritonclient brings protobuf)

    pb2 = model_config_pb2()
    message = pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        raise ExportError(f"invalid Triton model config: {err}") from None
    return message


@dataclass(frozen=True)
class TensorSpec:
    """One input/output as Triton sees it: dims exclude the batch axis."""

    name: str
    data_type: str  # Triton DataType name, e.g. "TYPE_FP32"
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ServingOptions:
    """Scheduling options shared by every repository flavour."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    instances: int = 1
    kind: str = "KIND_CPU"  # KIND_CPU | KIND_GPU

    def __post_init__(self) -> None:
        for field, value, low in (("max batch", self.max_batch, 1), ("instances", self.instances, 1),
                                  ("max queue delay (us)", self.max_queue_delay_us, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ExportError(f"{field} must be an integer >= {low}, got {value!r}")
        if self.kind not in ("KIND_CPU", "KIND_GPU"):
            raise ExportError(f"instance kind must be KIND_CPU or KIND_GPU, got {self.kind!r}")

    @property
    def preferred_batch_sizes(self) -> list[int]:
        """Powers of two from 4 up to max_batch, and max_batch itself."""
        sizes = [b for b in (4, 8, 16, 32, 64, 128, 256) if b < self.max_batch]
        return sizes + [self.max_batch]


def graph_specs(proto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph as Triton specs; the first axis must be the dynamic
    batch axis (it is what max_batch_size > 0 stands for)."""
    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = list(tensor.shape.dim)
        if not dims or dims[0].dim_value > 0:
            raise ExportError(f"graph {value.name!r} has no dynamic batch axis; Triton batching needs one")
        if tensor.elem_type not in _ONNX_TO_TRITON:
            raise ExportError(f"graph {value.name!r} has element type {tensor.elem_type}, "
                              "which this writer does not map to Triton")
        return TensorSpec(value.name, _ONNX_TO_TRITON[tensor.elem_type],
                          tuple(d.dim_value if d.dim_value > 0 else -1 for d in dims[1:]))
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [spec(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in proto.graph.output]


def artifact_specs(config: LanitConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """What lanit-export's domain_weights graphs and engines promise (lanit_export.onnx_export)."""
    size = config.img_size
    return ([TensorSpec("image", "TYPE_FP32", (3, size, size)),
             TensorSpec("domain_weights", "TYPE_FP32", (config.num_domains,))],
            [TensorSpec("translated", "TYPE_FP32", (3, size, size))])


def python_specs(config: LanitConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The application interface of the Python-backend model (lanit_rt.triton_model)."""
    size = config.img_size
    return ([TensorSpec(APP_IMAGE, "TYPE_UINT8", (-1, -1, 3)),
             TensorSpec(APP_DOMAINS, "TYPE_STRING", (1,), optional=True),
             TensorSpec(APP_WEIGHTS, "TYPE_FP32", (config.num_domains,), optional=True)],
            [TensorSpec(APP_OUTPUT, "TYPE_UINT8", (size, size, 3))])


def _tensor_block(section: str, specs: Sequence[TensorSpec]) -> str:
    rows = []
    for spec in specs:
        optional = " optional: true" if spec.optional else ""
        rows.append(f'  {{ name: "{spec.name}" data_type: {spec.data_type} '
                    f'dims: [ {", ".join(map(str, spec.dims))} ]{optional} }}')
    return f"{section} [\n" + ",\n".join(rows) + "\n]\n"


def _quoted(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid protobuf text-format string


def config_text(name: str, config: LanitConfig, inputs: Sequence[TensorSpec],
                outputs: Sequence[TensorSpec], options: ServingOptions, *, platform: str | None = None,
                backend: str | None = None, filename: str | None = None,
                parameters: dict[str, str] | None = None) -> str:
    """The config.pbtxt text: I/O, batching, instances, warm-up, the domains as parameters."""
    if (platform is None) == (backend is None):
        raise ExportError("a Triton model has a platform or a backend, exactly one")
    head = f'name: "{name}"\n'
    head += f'platform: "{platform}"\n' if platform else f'backend: "{backend}"\n'
    if filename:
        head += f'default_model_filename: "{filename}"\n'
    head += f"max_batch_size: {options.max_batch}\n"
    body = _tensor_block("input", inputs) + _tensor_block("output", outputs)
    body += ("dynamic_batching {\n"
             f"  preferred_batch_size: [ {', '.join(map(str, options.preferred_batch_sizes))} ]\n"
             f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n"
             "}\n")
    body += f"instance_group [ {{ kind: {options.kind} count: {options.instances} }} ]\n"
    params = {"domains": json.dumps(list(config.domains)), "img_size": str(config.img_size),
              **(parameters or {})}
    for key, value in params.items():
        body += f"parameters {{ key: {_quoted(key)} value: {{ string_value: {_quoted(value)} }} }}\n"
    # Warm-up: one batch of black images to the first domain mix (ones: every domain, equal weight).
    warm_image = next(s for s in inputs if s.name == "image")
    image_dims = [config.img_size if d < 0 else d for d in warm_image.dims]
    body += ("model_warmup [ {\n"
             f'  name: "black_images_all_domains"\n'
             f"  batch_size: {min(options.max_batch, 4)}\n"
             f'  inputs {{ key: "image" value: {{ data_type: {warm_image.data_type} '
             f"dims: [ {', '.join(map(str, image_dims))} ] zero_data: true }} }}\n"
             f'  inputs {{ key: "{WARMUP_WEIGHTS}" value: {{ data_type: TYPE_FP32 '
             f'dims: [ {config.num_domains} ] input_data_file: "{WARMUP_WEIGHTS}" }} }}\n'
             "} ]\n")
    return head + body


def check_config(message, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 options: ServingOptions, config: LanitConfig) -> None:
    """Raise ExportError unless the parsed ModelConfig serves exactly these tensors and options."""
    pb2 = model_config_pb2()
    problems = []
    if message.name != name:
        problems.append(f"name {message.name!r} != {name!r}")
    if message.max_batch_size != options.max_batch:
        problems.append(f"max_batch_size {message.max_batch_size} != {options.max_batch}")

    def compare(section: str, found, wanted: Sequence[TensorSpec]) -> None:
        if [t.name for t in found] != [s.name for s in wanted]:
            problems.append(f"{section} names {[t.name for t in found]} != {[s.name for s in wanted]}")
            return
        for tensor, spec in zip(found, wanted):
            dtype = pb2.DataType.Name(tensor.data_type)
            if dtype != spec.data_type:
                problems.append(f"{section} {spec.name!r} is {dtype}, the graph has {spec.data_type}")
            if tuple(tensor.dims) != spec.dims:
                problems.append(f"{section} {spec.name!r} dims {list(tensor.dims)} != {list(spec.dims)}")
            if section == "input" and tensor.optional != spec.optional:
                problems.append(f"input {spec.name!r} optional={tensor.optional}, expected {spec.optional}")

    compare("input", message.input, inputs)
    compare("output", message.output, outputs)
    batching = message.dynamic_batching
    if not message.HasField("dynamic_batching"):
        problems.append("no dynamic_batching")
    elif (any(not 1 <= b <= options.max_batch for b in batching.preferred_batch_size)
          or batching.max_queue_delay_microseconds != options.max_queue_delay_us):
        problems.append(f"dynamic_batching {list(batching.preferred_batch_size)} / "
                        f"{batching.max_queue_delay_microseconds} us disagrees with the options")
    groups = [(pb2.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in message.instance_group]
    if groups != [(options.kind, options.instances)]:
        problems.append(f"instance_group {groups} != {[(options.kind, options.instances)]}")
    params = {key: value.string_value for key, value in message.parameters.items()}
    if params.get("domains") != json.dumps(list(config.domains)):
        problems.append(f"parameter domains {params.get('domains')!r} != the model's {list(config.domains)}")
    input_names = {s.name: s for s in inputs}
    for warmup in message.model_warmup:
        if not 1 <= warmup.batch_size <= options.max_batch:
            problems.append(f"warm-up batch {warmup.batch_size} outside [1, {options.max_batch}]")
        for key, value in warmup.inputs.items():
            spec = input_names.get(key)
            if spec is None:
                problems.append(f"warm-up input {key!r} is not a model input")
            elif (pb2.DataType.Name(value.data_type) != spec.data_type
                  or any(w != s for w, s in zip(value.dims, spec.dims) if s >= 0)
                  or len(value.dims) != len(spec.dims)):
                problems.append(f"warm-up input {key!r} does not fit {spec}")
    if problems:
        raise ExportError(f"Triton config of {name!r} does not match its model: {'; '.join(problems)}")


@dataclass
class TritonModel:
    """A published model folder."""

    folder: Path
    config_path: Path
    artifact: Path
    config: Any  # inference.ModelConfig


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name or ""):
        raise ExportError(f"model name {name!r} must be letters, digits, '_', '-' or '.', "
                          "not starting with '-' or '.'")


def _stage(repo: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(final folder, hidden staging folder beside it). Refuses to replace an existing model."""
    _check_name(name)
    repo = Path(repo).expanduser()
    final = repo / name
    if final.exists():
        raise ExportError(f"{final} already exists; remove it or pass another --triton-name")
    try:
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    except OSError as err:
        raise ExportError(f"cannot write the Triton repository {repo}: {err}") from None
    return final, staging


def _finish(staging: Path, final: Path, name: str, config: LanitConfig, text: str,
            inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
            options: ServingOptions, artifact_name: str) -> TritonModel:
    """Write config, labels and warm-up data into `staging`, validate, publish as `final`."""
    message = parse_config(text)
    check_config(message, name, inputs, outputs, options, config)
    (staging / CONFIG_FILE).write_text(text, encoding="utf-8")
    (staging / LABELS_FILE).write_text("".join(d + "\n" for d in config.domains), encoding="utf-8")
    (staging / WARMUP_DIR).mkdir()
    np.ones(config.num_domains, dtype="<f4").tofile(staging / WARMUP_DIR / WARMUP_WEIGHTS)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0o700 folders
    os.rename(staging, final)
    return TritonModel(final, final / CONFIG_FILE, final / VERSION / artifact_name, message)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _onnx_io(onnx_path: Path, config: LanitConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's own I/O, which must be the exported interface."""
    from lanit_export.errors import require  # noqa: PLC0415

    onnx = require("onnx", "onnx")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs = graph_specs(proto)
    wanted = artifact_specs(config)
    if (inputs, outputs) != wanted:
        raise ExportError(f"{onnx_path} has I/O {inputs + outputs}, not the lanit-export interface "
                          f"{wanted[0] + wanted[1]}")
    return inputs, outputs


def write_onnx_repository(repo: str | os.PathLike, onnx_path: str | os.PathLike,
                          options: ServingOptions = ServingOptions(), name: str = DEFAULT_NAME
                          ) -> TritonModel:
    """REPO/<name>/1/model.onnx (a copy of the exported domain_weights graph) + config.pbtxt.

    The config's tensors are read from the graph itself and compared with the parsed config.
    """
    from lanit_export.graph_spec import config_from_metadata, read_metadata  # noqa: PLC0415

    onnx_path = Path(onnx_path)
    metadata = read_metadata(onnx_path)
    if metadata.get("kind") != "domain_weights":
        raise ExportError(f"{onnx_path} is a {metadata.get('kind')!r} graph; Triton serves the "
                          "domain_weights graph")
    config = config_from_metadata(metadata)
    inputs, outputs = _onnx_io(onnx_path, config)
    final, staging = _stage(repo, name)
    try:
        (staging / VERSION).mkdir()
        shutil.copyfile(onnx_path, staging / VERSION / ONNX_FILE)
        text = config_text(name, config, inputs, outputs, options, platform=ONNX_PLATFORM,
                           filename=ONNX_FILE, parameters={"precision": metadata.get("precision", "")})
        return _finish(staging, final, name, config, text, inputs, outputs, options, ONNX_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_served_profile(profile, engine: str) -> None:
    """ExportError unless a TensorRT profile starts at batch 1: Triton's dynamic batcher sends any
    batch from 1 up, and TensorRT refuses shapes below the profile."""
    if profile.min != 1:
        raise ExportError(f"{engine}'s profile starts at batch {profile.min}; Triton sends batches "
                          "from 1 up, so a served engine needs --min-batch 1")


def write_engine_repository(repo: str | os.PathLike, engine_path: str | os.PathLike,
                            options: ServingOptions | None = None, name: str = DEFAULT_NAME,
                            onnx_path: str | os.PathLike | None = None) -> TritonModel:
    """REPO/<name>/1/model.plan (a copy of the engine) + config.pbtxt, KIND_GPU.

    The engine's interface comes from its sidecar OUT.engine.json (lanit_export.tensorrt) and, when
    `onnx_path` (the graph it was built from) is given, is checked against that graph too.
    max_batch_size may not exceed the engine profile's max batch. The engine bytes are not opened:
    this works without TensorRT (and is tested with a placeholder file).
    """
    from lanit_export.tensorrt import read_sidecar  # noqa: PLC0415

    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise ExportError(f"no engine at {engine_path}")
    sidecar, config, profile = read_sidecar(engine_path)
    if sidecar.get("kind", "domain_weights") != "domain_weights":
        raise ExportError(f"{engine_path} is not a domain_weights engine")
    check_served_profile(profile, str(engine_path))
    options = options or ServingOptions(max_batch=profile.max, kind="KIND_GPU")
    if options.max_batch > profile.max:
        raise ExportError(f"max batch {options.max_batch} exceeds the engine's profile "
                          f"({profile.min}..{profile.max}); build the engine with --max-batch "
                          f"{options.max_batch}")
    inputs, outputs = artifact_specs(config)
    if onnx_path is not None:
        _onnx_io(Path(onnx_path), config)
    final, staging = _stage(repo, name)
    try:
        (staging / VERSION).mkdir()
        shutil.copyfile(engine_path, staging / VERSION / ENGINE_FILE)
        text = config_text(name, config, inputs, outputs, options, platform=ENGINE_PLATFORM,
                           filename=ENGINE_FILE,
                           parameters={"precision": str(sidecar.get("precision", "")),
                                       "profile": f"{profile.min},{profile.opt},{profile.max}"})
        return _finish(staging, final, name, config, text, inputs, outputs, options, ENGINE_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


PYTHON_MODEL_SOURCE = '''"""Triton Python-backend model: LANIT over lanit_rt (pip install lanit-rt in the server's Python).

Written by lanit-export; the logic lives in lanit_rt.triton_model, versioned with the runtime.
LANIT_SERVE_PYTHONPATH (set by lanit-serve) lists import paths the stub's Python lacks.
"""

import os
import sys

sys.path[:0] = [p for p in os.environ.get("LANIT_SERVE_PYTHONPATH", "").split(os.pathsep)
                if p and p not in sys.path]

from lanit_rt.triton_model import TritonPythonModel  # noqa: E402,F401
'''


def write_python_repository(repo: str | os.PathLike, artifact: str | os.PathLike, runtime: str,
                            options: ServingOptions = ServingOptions(), name: str = DEFAULT_NAME,
                            threads: int = 0, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
                            ) -> TritonModel:
    """REPO/<name>/1/model.py + the artifact the runtime runs + config.pbtxt (backend "python").

    runtime "onnxruntime": `artifact` is an exported OUT.onnx (its OUT.style.onnx is copied too when
    present); "torch": a checkpoint folder or model.safetensors. The model runs
    lanit_rt.Translator inside the Python backend's stub process; `threads` (0: the runtime's
    default) bounds its intra-op threads per instance.
    """
    from lanit_rt.checkpoint import read_checkpoint_config, resolve_model_file  # noqa: PLC0415
    from lanit_export.graph_spec import config_from_metadata, read_metadata  # noqa: PLC0415
    from lanit_export.onnx_export import style_graph_path  # noqa: PLC0415

    if runtime not in PYTHON_RUNTIMES:
        raise ExportError(f"unknown Python-backend runtime {runtime!r}; choose one of {list(PYTHON_RUNTIMES)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ExportError(f"threads must be an integer >= 0, got {threads!r}")
    if isinstance(max_image_side, bool) or not isinstance(max_image_side, int) or max_image_side < 1:
        raise ExportError(f"max image side must be a positive integer, got {max_image_side!r}")
    artifact = Path(artifact)
    copies: list[tuple[Path, str]] = []
    if runtime == "onnxruntime":
        metadata = read_metadata(artifact)
        if metadata.get("kind") != "domain_weights":
            raise ExportError(f"{artifact} is not a domain_weights graph")
        config = config_from_metadata(metadata)
        _onnx_io(artifact, config)
        copies.append((artifact, ONNX_FILE))
        style = style_graph_path(artifact)
        if style.is_file():
            copies.append((style, style_graph_path(ONNX_FILE).name))
        model_file = ONNX_FILE
    else:
        config = read_checkpoint_config(artifact)[0]
        weights = resolve_model_file(artifact)
        copies.append((weights, "model.safetensors"))
        model_file = "model.safetensors"
    inputs, outputs = python_specs(config)
    final, staging = _stage(repo, name)
    try:
        (staging / VERSION).mkdir()
        for source, target in copies:
            shutil.copyfile(source, staging / VERSION / target)
        (staging / VERSION / PYTHON_FILE).write_text(PYTHON_MODEL_SOURCE, encoding="utf-8")
        text = config_text(name, config, inputs, outputs, options, backend=PYTHON_BACKEND,
                           parameters={"runtime": runtime, "artifact": model_file,
                                       "threads": str(threads), "max_image_side": str(max_image_side)})
        return _finish(staging, final, name, config, text, inputs, outputs, options, PYTHON_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
