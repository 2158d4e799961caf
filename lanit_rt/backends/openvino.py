"""OpenVINO backend (CPU): runs the exported OUT.onnx, or an OpenVINO IR OUT.xml (+ OUT.bin) written
by `lanit-export --openvino`, and OUT.style.onnx / OUT.style.xml beside it when present.

Metadata. OpenVINO keeps an ONNX graph's metadata_props under the model's rt_info "framework"
section; the IR exporter also writes them under "lanit" (domain texts, config, weights digest).
Either is parsed like the onnxruntime backend's metadata, so a foreign or mismatched artifact fails
the same way.

Precision. `precision` is "fp32", "bf16", "fp16" or "auto", mapped to OpenVINO's
INFERENCE_PRECISION_HINT (f32 / bf16 / f16); inputs and outputs stay float32. OpenVINO silently runs
f32 where the CPU lacks the requested arithmetic, so this backend checks the CPU's
OPTIMIZATION_CAPABILITIES first (BF16: AVX512-BF16 or AMX; FP16: AVX512-FP16 / AMX-FP16) and raises
instead, and checks the compiled model's effective hint after compiling. "auto" is bf16 where the
CPU has BF16 arithmetic, otherwise fp32.

Compilation. The dynamic-batch model is reshaped to a static [n, 3, S, S] batch and compiled once per
batch size n (at most 8 kept); each thread has its own infer request per batch size. `host_slot(n)`
binds preallocated numpy buffers as the request's input and output tensors (shared memory), so a
call is one `infer()` that writes the Translator's own output buffer. `performance_hint` is
"latency" (default) or "throughput"; `threads` sets INFERENCE_NUM_THREADS (None: OpenVINO's choice).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lanit_rt.backends.base import (
    ArtifactError,
    Backend,
    HostSlot,
    check_int8_quality,
    parse_artifact_metadata,
)
from lanit_rt.errors import first_line

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
PERFORMANCE_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
_HINT_TYPES = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_CAPABILITIES = {"bf16": "BF16", "fp16": "FP16"}
_METADATA_SECTIONS = ("lanit", "framework")
_METADATA_KEYS = ("lanit_config", "domains", "lanit_rt_version", "precision", "kind", "io_dtype",
                  "weights_digest", "psnr_db")
_EXPECTED_INPUTS = {"domain_weights": ("image", "domain_weights"), "style": ("image", "style")}
OUTPUT_NAME = "translated"
_MAX_COMPILED = 8


def import_openvino():
    try:
        import openvino
    except ImportError as err:
        raise ImportError("the openvino backend needs OpenVINO: pip install 'lanit-rt[openvino]'") from err
    return openvino


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def kept_signal_stack():
    """Restore the calling thread's alternate signal stack afterwards.

    OpenVINO's CPU plugin (2026.4, Linux), whenever a Core loads it (the first compile, capability
    query or device listing of that Core), moves the calling thread onto a ~10 KB signal stack of
    its own, which is freed with the plugin: the next signal handled on that thread (Ctrl-C,
    SIGTERM) then killed the process with SIGSEGV."""
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    saved = _SignalStack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


_core_lock = threading.Lock()
_shared_core: Any = None


def openvino_core() -> Any:
    """The process's one OpenVINO Core, its CPU plugin loaded under `kept_signal_stack`.

    One Core for everything: every new Core would load the plugin again (and move the thread onto a
    new signal stack), and a Core that is never destroyed keeps any stack it gave a worker thread
    valid."""
    global _shared_core
    with _core_lock:
        if _shared_core is None:
            ov = import_openvino()
            core = ov.Core()
            with kept_signal_stack():
                core.get_versions("CPU")  # loads the CPU plugin now, under the guard
            _shared_core = core
        return _shared_core


def cpu_capabilities(core: Any = None) -> tuple[str, ...]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU, e.g. ("FP32", "INT8", "BF16", ...)."""
    core = core if core is not None else openvino_core()
    with kept_signal_stack():
        return tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def resolve_precision(precision: str, capabilities: tuple[str, ...]) -> str:
    """"auto" -> "bf16" where the CPU has BF16 arithmetic, else "fp32"; a precision the CPU lacks
    raises ValueError (OpenVINO itself would run fp32 without a word)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} for the openvino backend; choose one of "
                         f"{list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if "BF16" in capabilities else "fp32"
    needed = _CAPABILITIES.get(precision)
    if needed is not None and needed not in capabilities:
        raise ValueError(f"this CPU has no {precision} arithmetic (OpenVINO's CPU capabilities: "
                         f"{', '.join(capabilities)}); use precision='fp32', or 'auto' to take bf16 "
                         "only where the CPU has it")
    return precision


def read_metadata(model: Any, path: str) -> dict[str, str]:
    """The LANIT metadata of an OpenVINO model read from an ONNX file or an IR, as strings."""
    for section in _METADATA_SECTIONS:
        if model.has_rt_info([section, "lanit_config"]):
            return {key: model.get_rt_info([section, key]).astype(str) for key in _METADATA_KEYS
                    if model.has_rt_info([section, key])}
    raise ArtifactError(f"{path} is not a LANIT artifact (no 'lanit_config' metadata)")


def style_path(path: str) -> str:
    """OUT.onnx -> OUT.style.onnx, OUT.xml -> OUT.style.xml."""
    stem, suffix = os.path.splitext(path)
    return f"{stem}.style{suffix}"


class _Graph:
    """One model (ONNX or IR), compiled per batch size, with its validated LANIT metadata."""

    def __init__(self, core: Any, path: str, compile_config: dict[str, Any], precision: str):
        if not os.path.exists(path):
            raise ArtifactError(f"no model file at {path}")
        try:
            self.model = core.read_model(path)
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own
            raise ArtifactError(f"{path} is not a model OpenVINO can read: "
                                f"{first_line(err)}") from None
        info = parse_artifact_metadata(read_metadata(self.model, path), path)
        check_int8_quality(info, path)
        self.core = core
        self.path = path
        self.config = info["config"]
        self.kind = info["kind"]
        self.exported_precision = info["precision"]
        self.weights_digest = info["weights_digest"]
        if info["io_dtype"] != "fp32":
            raise ArtifactError(f"{path}: io_dtype {info['io_dtype']!r}; the openvino backend needs float32 I/O")
        inputs = tuple(p.get_any_name() for p in self.model.inputs)
        outputs = tuple(name for p in self.model.outputs for name in p.get_names())
        self.input_names = _EXPECTED_INPUTS[self.kind]
        if sorted(inputs) != sorted(self.input_names) or OUTPUT_NAME not in outputs:
            raise ArtifactError(f"{path}: a '{self.kind}' graph needs inputs {list(self.input_names)} and "
                                f"output '{OUTPUT_NAME}', found inputs {list(inputs)} outputs {list(outputs)}")
        self.compile_config = compile_config
        self.precision = precision
        self._compiled: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _width(self) -> int:
        return self.config.num_domains if self.kind == "domain_weights" else self.config.style_dim

    def compiled(self, n: int) -> Any:
        """The model compiled for batch n (compiled on first use, kept for the next calls)."""
        with self._lock:
            compiled = self._compiled.get(n)
            if compiled is not None:
                self._compiled.move_to_end(n)
                return compiled
            size = self.config.img_size
            model = self.model.clone()
            model.reshape({self.input_names[0]: [n, 3, size, size], self.input_names[1]: [n, self._width()]})
            with kept_signal_stack():
                compiled = self.core.compile_model(model, "CPU", self.compile_config)
            found = compiled.get_property("INFERENCE_PRECISION_HINT")
            if found != getattr(import_openvino().Type, _HINT_TYPES[self.precision]):
                raise ValueError(f"OpenVINO compiled {self.path} for {found.get_type_name()} instead of the "
                                 f"requested {self.precision} (this CPU lacks it?)")
            self._compiled[n] = compiled
            while len(self._compiled) > _MAX_COMPILED:
                self._compiled.popitem(last=False)
            return compiled

    def _request(self, n: int) -> Any:
        """This thread's infer request for batch n. Like the compiled models, at most _MAX_COMPILED
        are kept: a request holds its compiled model, so keeping every batch size a thread has
        seen would keep every model it compiled."""
        compiled = self.compiled(n)
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = OrderedDict()
        entry = requests.get(n)
        if entry is None or entry[0] is not compiled:
            entry = requests[n] = (compiled, compiled.create_infer_request())
        requests.move_to_end(n)
        while len(requests) > _MAX_COMPILED:
            requests.popitem(last=False)
        return entry[1]

    def run(self, images: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        request = self._request(n)
        feeds = {self.input_names[0]: np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy()),
                 self.input_names[1]: np.ascontiguousarray(second.detach().to("cpu", torch.float32).numpy())}
        request.infer(feeds)
        return torch.from_numpy(request.get_tensor(OUTPUT_NAME).data.copy())

    def host_slot(self, n: int) -> HostSlot:
        ov = import_openvino()
        compiled = self.compiled(n)
        request = compiled.create_infer_request()  # the slot's own: a slot serves one thread
        size = self.config.img_size
        image = np.empty((n, 3, size, size), np.float32)
        weights = np.empty((n, self._width()), np.float32)
        output = np.empty((n, 3, size, size), np.float32)
        request.set_tensor(self.input_names[0], ov.Tensor(image, shared_memory=True))
        request.set_tensor(self.input_names[1], ov.Tensor(weights, shared_memory=True))
        request.set_tensor(OUTPUT_NAME, ov.Tensor(output, shared_memory=True))

        def run() -> None:
            request.infer()

        return HostSlot(image, weights, output, run)


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, path: str | os.PathLike, precision: str = "auto",
                 performance_hint: str = "latency", threads: int | None = None):
        import_openvino()
        path = str(path)
        if performance_hint not in PERFORMANCE_HINTS:
            raise ValueError(f"unknown performance_hint {performance_hint!r}; choose one of "
                             f"{list(PERFORMANCE_HINTS)}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise ValueError(f"threads must be a non-negative int (0: OpenVINO's default), got {threads!r}")
        core = openvino_core()
        self.capabilities = cpu_capabilities(core)
        self.precision = resolve_precision(precision, self.capabilities)
        compile_config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINT_TYPES[self.precision],
            "PERFORMANCE_HINT": PERFORMANCE_HINTS[performance_hint],
        }
        if threads:
            compile_config["INFERENCE_NUM_THREADS"] = threads
        self.device = torch.device("cpu")
        first = _Graph(core, path, compile_config, self.precision)
        graphs = {first.kind: first}
        other = style_path(path) if first.kind == "domain_weights" else None
        if other is not None and os.path.exists(other):
            second = _Graph(core, other, compile_config, self.precision)
            if second.kind != "style":
                raise ArtifactError(f"{other} should be a 'style' graph, its metadata says {second.kind!r}")
            if second.config != first.config or (
                    None not in (first.weights_digest, second.weights_digest)
                    and first.weights_digest != second.weights_digest):
                raise ArtifactError(f"{other} and {path} were exported from different models")
            graphs["style"] = second
        self.graphs = graphs
        self.path = Path(path)
        self.config = first.config
        self.weights_digest = first.weights_digest
        self.exported_precision = first.exported_precision
        self.performance_hint = performance_hint
        self.threads = threads
        self.supports_weights = "domain_weights" in graphs
        self.supports_style = "style" in graphs

    def describe(self) -> dict:
        return {"backend": self.name, "device": "cpu", "precision": self.precision,
                "performance_hint": self.performance_hint, "threads": self.threads,
                "graphs": sorted(self.graphs), "artifact": self.path.name}

    def run_weights(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not self.supports_weights:
            raise ArtifactError(f"{self.path} is a style-input graph; domain targets need the "
                                "domain_weights graph")
        return self.graphs["domain_weights"].run(images, weights)

    def run_style(self, images: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if not self.supports_style:
            return super().run_style(images, style)
        return self.graphs["style"].run(images, style)

    def host_slot(self, n: int) -> HostSlot | None:
        graph = self.graphs.get("domain_weights")
        return None if graph is None else graph.host_slot(n)
