"""TensorRT backend: runs a serialized engine (OUT.engine) described by its sidecar OUT.engine.json.

The sidecar carries the same keys as the ONNX metadata (`lanit_config`, `domains`, `precision`,
`kind`, `io_dtype`, `lanit_rt_version`) plus the engine's batch range (`min_batch`, `opt_batch`,
`max_batch`). The sidecar is validated before TensorRT is imported, so a foreign or mismatched
artifact fails the same way on every machine.

Execution uses the name-based TensorRT 10 API on torch CUDA tensors: per batch size, input and output
buffers are allocated once and their addresses bound to one execution context; a call copies into
the input buffers, enqueues on a private stream and copies the output out. One lock serialises calls
(an execution context must not run two batches at once).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from lanit_rt.backends.base import ArtifactError, Backend, parse_artifact_metadata

SIDECAR_SUFFIX = ".json"
_MAX_CACHED_BATCH_SIZES = 8


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise ImportError("the tensorrt backend needs TensorRT: pip install 'lanit-rt[tensorrt]' "
                          "(on a machine with CUDA)") from err
    return tensorrt


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """OUT.engine -> parsed OUT.engine.json (validated LANIT metadata + batch range)."""
    engine_path = Path(engine_path)
    sidecar = Path(str(engine_path) + SIDECAR_SUFFIX)
    if not engine_path.exists():
        raise ArtifactError(f"no TensorRT engine at {engine_path}")
    if not sidecar.exists():
        raise ArtifactError(f"no sidecar {sidecar} beside the engine; it carries the model's config")
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{sidecar} is not a JSON object: {err}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{sidecar} is not a JSON object")
    info = parse_artifact_metadata(data, str(sidecar))
    for key in ("min_batch", "opt_batch", "max_batch"):
        value = data.get(key)
        try:
            info[key] = int(value) if value is not None else None
        except (TypeError, ValueError):
            raise ArtifactError(f"{sidecar}: {key} is {value!r}, not a batch size") from None
    info["tensorrt_version"] = data.get("tensorrt_version")
    return info


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cuda"):
        info = read_sidecar(path)
        trt = import_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("the tensorrt backend needs a CUDA device")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.config = info["config"]
        self.kind = info["kind"]
        self.precision = info["precision"]
        self.weights_digest = info["weights_digest"]
        self.path = Path(path)
        self.supports_weights = self.kind == "domain_weights"
        self.supports_style = self.kind == "style"
        self._second_input = "domain_weights" if self.supports_weights else "style"

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                built = info["tensorrt_version"]
                raise ArtifactError(
                    f"{self.path} could not be deserialised by this TensorRT {trt.__version__}"
                    f" (it was built {f'by TensorRT {built}' if built else 'by another version'}"
                    " or for another GPU model: an engine runs only under the TensorRT version"
                    " and on the GPU model it was built for)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self.device)
        self._dtypes, self.min_batch, self.max_batch = inspect_engine(
            trt, self.engine, self.path, self._second_input)
        self._slots: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "kind": self.kind, "batch_range": [self.min_batch, self.max_batch]}

    def run_weights(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not self.supports_weights:
            raise ArtifactError(f"{self.path} is a style-input engine; domain targets need the "
                                "domain_weights engine")
        return self._run(images, weights)

    def run_style(self, images: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if not self.supports_style:
            return super().run_style(images, style)
        return self._run(images, style)

    def _run(self, images: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if not self.min_batch <= n <= self.max_batch:
            raise ValueError(f"{self.path} was built for batch sizes {self.min_batch}..{self.max_batch}, "
                             f"got {n}; split the batch or rebuild the engine")
        with self._lock, torch.cuda.device(self.device):
            slot = self._slot(n, second.shape[1])
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                slot["image"].copy_(images, non_blocking=True)
                slot[self._second_input].copy_(second, non_blocking=True)
                for name, tensor in slot.items():
                    self.context.set_tensor_address(name, tensor.data_ptr())
                self.context.set_input_shape("image", tuple(slot["image"].shape))
                self.context.set_input_shape(self._second_input, tuple(slot[self._second_input].shape))
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError(f"TensorRT failed to run {self.path} at batch {n}")
                # Copied out on the engine's stream, before the lock is released: a later call from
                # any stream cannot overwrite the buffer while the copy still reads it.
                out = slot["translated"].to(torch.float32, copy=True)
            current.wait_stream(self.stream)
            out.record_stream(current)
            return out

    def _slot(self, n: int, width: int) -> dict[str, torch.Tensor]:
        slot = self._slots.get(n)
        if slot is not None:
            self._slots.move_to_end(n)
            return slot
        size = self.config.img_size
        shapes = {"image": (n, 3, size, size), self._second_input: (n, width),
                  "translated": (n, 3, size, size)}
        slot = {name: torch.empty(shape, device=self.device, dtype=self._dtypes[name])
                for name, shape in shapes.items()}
        self._slots[n] = slot
        while len(self._slots) > _MAX_CACHED_BATCH_SIZES:
            self._slots.popitem(last=False)
        return slot


def inspect_engine(trt, engine, path: Path, second_input: str) -> tuple[dict[str, torch.dtype], int, int]:
    """A deserialised engine's I/O dtypes by tensor name and its profile's batch range; ArtifactError
    when its tensors are not `image`, `second_input` and `translated`."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    expected = {"image", second_input, "translated"}
    if set(names) != expected or len(names) != len(expected):
        raise ArtifactError(f"{path}: engine tensors {names} differ from the expected {sorted(expected)}")
    dtypes = {name: torch_dtype(trt, engine.get_tensor_dtype(name)) for name in names}
    low, _, high = engine.get_tensor_profile_shape("image", 0)
    return dtypes, int(low[0]), int(high[0])


def torch_dtype(trt, dtype) -> torch.dtype:
    """The torch dtype of a TensorRT engine I/O dtype (float32, float16, bfloat16)."""
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise ArtifactError(f"unsupported engine I/O dtype {dtype}")
    return table[dtype]
