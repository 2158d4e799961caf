"""onnxruntime backend: runs the exported OUT.onnx (image, domain_weights -> translated) and, when
present beside it, OUT.style.onnx (image, style -> translated).

The config and domain texts come from the graph's metadata_props (`lanit_config`, `domains`,
`precision`, `kind`, `io_dtype`); a graph without them is rejected as foreign. Inputs and outputs are
host numpy arrays (onnxruntime moves them for a GPU provider itself), float32 unless the artifact's
`io_dtype` says otherwise. `InferenceSession.run` is thread-safe and this backend holds no shared
buffers, so it takes no lock.

Host fast path: `host_slot(n)` preallocates numpy input and output buffers for batch n and binds
them once to an onnxruntime IOBinding, so a call is one `run_with_iobinding` that writes the
Translator's own output buffer (no feed dict, no output allocation). Each slot belongs to one
thread (the Translator keeps them per thread).

Session options: `optimization` is the graph optimisation level ("all", the default, is
ORT_ENABLE_ALL; "extended", "basic", "disabled"), `spin_wait` turns the intra-op threads'
spin-waiting on or off (None keeps onnxruntime's default, on): spinning lowers latency on an idle
machine and wastes cores on a loaded one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lanit_rt.backends.base import (
    ArtifactError,
    Backend,
    HostSlot,
    artifact_style_path,
    check_int8_quality,
    parse_artifact_metadata,
)

_IO_NUMPY = {"fp32": np.float32, "fp16": np.float16}
_EXPECTED_INPUTS = {"domain_weights": ("image", "domain_weights"), "style": ("image", "style")}
OUTPUT_NAME = "translated"
OPTIMIZATION_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED",
                       "basic": "ORT_ENABLE_BASIC", "disabled": "ORT_DISABLE_ALL"}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("the onnxruntime backend needs onnxruntime: pip install 'lanit-rt[onnx]' "
                          "(or 'lanit-rt[onnx-gpu]' for CUDA)") from err
    return onnxruntime


def default_providers(device: torch.device | str) -> list[str]:
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError("device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not "
                               "available): pip install 'lanit-rt[onnx-gpu]'")
        wanted.insert(0, "CUDAExecutionProvider")
    return wanted


def check_providers(providers: Any) -> list[Any]:
    """Execution providers as onnxruntime takes them (one name is a list of one); ValueError for a
    provider this onnxruntime does not have (it would fall back to the CPU without a word)."""
    ort = import_onnxruntime()
    if isinstance(providers, (str, tuple)):  # "CPUExecutionProvider" or ("CUDAExecutionProvider", {...})
        providers = [providers]
    providers = list(providers)
    if not providers:
        raise ValueError("providers= is empty; leave it out for the default")
    available = ort.get_available_providers()
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    missing = [name for name in names if name not in available]
    if missing:
        raise ValueError(f"onnxruntime here has no {', '.join(map(str, missing))}; available: {available}")
    return providers


def session_options(threads: int | None = None, optimization: str = "all",
                    spin_wait: bool | None = None):
    """onnxruntime SessionOptions for these settings (see the module docstring)."""
    ort = import_onnxruntime()
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown optimization {optimization!r}; choose one of {list(OPTIMIZATION_LEVELS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads must be a non-negative int (0: onnxruntime's default), got {threads!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
    if threads:
        options.intra_op_num_threads = threads
    if spin_wait is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    return options


class _Graph:
    """One InferenceSession with its validated LANIT metadata."""

    def __init__(self, path: str, providers: Sequence[Any], options):
        ort = import_onnxruntime()
        if not os.path.exists(path):
            raise ArtifactError(f"no ONNX file at {path}")
        try:
            self.session = ort.InferenceSession(path, options, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own exception types for invalid graphs
            raise ArtifactError(f"{path} is not a loadable ONNX graph: {err}") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        info = parse_artifact_metadata(meta, path)
        check_int8_quality(info, path)
        self.path = path
        self.config = info["config"]
        self.kind = info["kind"]
        self.precision = info["precision"]
        self.weights_digest = info["weights_digest"]
        self.io_numpy = _IO_NUMPY.get(info["io_dtype"])
        if self.io_numpy is None:
            raise ArtifactError(f"{path}: io_dtype {info['io_dtype']!r} is not supported by numpy I/O")
        inputs = tuple(i.name for i in self.session.get_inputs())
        outputs = tuple(o.name for o in self.session.get_outputs())
        expected = _EXPECTED_INPUTS[self.kind]
        if sorted(inputs) != sorted(expected) or OUTPUT_NAME not in outputs:
            raise ArtifactError(f"{path}: a '{self.kind}' graph needs inputs {list(expected)} and output "
                                f"'{OUTPUT_NAME}', found inputs {list(inputs)} outputs {list(outputs)}")

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        arrays = {k: v.detach().to("cpu", torch.float32).numpy().astype(self.io_numpy, copy=False)
                  for k, v in feeds.items()}
        (out,) = self.session.run([OUTPUT_NAME], arrays)
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def host_slot(self, n: int) -> HostSlot | None:
        if self.io_numpy is not np.float32:
            return None
        ort = import_onnxruntime()
        size = self.config.img_size
        width = self.config.num_domains
        image = np.empty((n, 3, size, size), np.float32)
        weights = np.empty((n, width), np.float32)
        output = np.empty((n, 3, size, size), np.float32)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(image))
        binding.bind_ortvalue_input("domain_weights", ort.OrtValue.ortvalue_from_numpy(weights))
        binding.bind_ortvalue_output(OUTPUT_NAME, ort.OrtValue.ortvalue_from_numpy(output))
        session = self.session

        def run() -> None:
            session.run_with_iobinding(binding)

        return HostSlot(image, weights, output, run)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu",
                 providers: Sequence[Any] | None = None, threads: int | None = None,
                 optimization: str = "all", spin_wait: bool | None = None):
        path = str(path)
        self.device = torch.device("cpu")  # host arrays in and out, whatever the provider
        options = session_options(threads, optimization, spin_wait)
        providers = check_providers(providers) if providers is not None else default_providers(device)
        first = _Graph(path, providers, options)
        graphs = {first.kind: first}
        other = artifact_style_path(path) if first.kind == "domain_weights" else None
        if other is not None and os.path.exists(other):
            second = _Graph(other, providers, options)
            if second.kind != "style":
                raise ArtifactError(f"{other} should be a 'style' graph, its metadata says {second.kind!r}")
            if second.config != first.config or (
                    None not in (first.weights_digest, second.weights_digest)
                    and first.weights_digest != second.weights_digest):
                raise ArtifactError(f"{other} and {path} were exported from different models")
            graphs["style"] = second
        self.graphs = graphs
        self.config = first.config
        self.path = Path(path)
        self.providers = providers
        self.precision = first.precision
        self.weights_digest = first.weights_digest
        self.supports_weights = "domain_weights" in graphs
        self.supports_style = "style" in graphs
        self.optimization = optimization
        self.spin_wait = spin_wait

    def describe(self) -> dict:
        return {"backend": self.name, "device": "cpu-io", "providers": [str(p) for p in self.providers],
                "precision": self.precision, "graphs": sorted(self.graphs),
                "optimization": self.optimization, "spin_wait": self.spin_wait}

    def host_slot(self, n: int) -> HostSlot | None:
        graph = self.graphs.get("domain_weights")
        return None if graph is None else graph.host_slot(n)

    def run_weights(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not self.supports_weights:
            raise ArtifactError(f"{self.path} is a style-input graph; domain targets need the "
                                "domain_weights graph")
        return self.graphs["domain_weights"].run({"image": images, "domain_weights": weights})

    def run_style(self, images: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if not self.supports_style:
            return super().run_style(images, style)
        return self.graphs["style"].run({"image": images, "style": style})
