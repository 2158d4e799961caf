"""PyTorch backend: the checkpoint's generator, eager (optionally CUDA-graph replayed).

Per-call work for a text target is one [N, D] x [D, P] matmul: the AdaIN parameter table
`adain_table = G.adain_params(style_table)` [D, P] is computed once, in fp32, and mixed with the
normalised target weights. This equals G(x, mix_styles(style_table, w)) exactly (up to rounding)
because the style -> AdaIN map is affine and the weights sum to 1. The mapping network never runs
for text targets.

Speed: the generator runs in `dtype` (fp16/bf16 keep AdaIN statistics in fp32 inside the kernels),
channels_last on CUDA, the fused kernels with impl="auto", and preallocated input/parameter buffers
per batch size. With `cuda_graphs=True` the forward is captured once per batch size and replayed.

Thread safety: one lock per backend guards the shared buffers and graph replay, so concurrent calls
are serialised on the device stage; callers do host-side pre/post-processing outside it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from lanit_kernels.dispatch import IMPLS, record_packed_weights
from lanit_rt.backends.base import Backend
from lanit_rt.checkpoint import CheckpointError, LanitModel

_MAX_CACHED_BATCH_SIZES = 8
_GRAPH_WARMUP_ITERS = 3


class _Slot:
    """Static tensors for one batch size (and its captured CUDA graph, if any)."""

    def __init__(self, images: torch.Tensor, params: torch.Tensor):
        self.images = images  # [N, 3, S, S], backend dtype
        self.params = params  # [N, P] float32
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        # Packed conv weights the graph reads: the kernels' packing cache is bounded and may drop
        # them, and a replay after that would read freed memory.
        self.graph_weights: list[torch.Tensor] = []


class TorchBackend(Backend):
    name = "torch"
    supports_style = True

    def __init__(self, model: LanitModel, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, impl: str = "auto",
                 channels_last: bool | None = None, cuda_graphs: bool = False):
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        self.config = model.config
        self.dtype = dtype
        self.impl = impl
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.cuda_graphs = cuda_graphs
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

        generator = model.generator
        with torch.no_grad():
            # The style -> AdaIN Linear stays in fp32 (the table and per-call styles go through it).
            self._adain_weight = generator.style_to_adain.weight.detach().float().to(self.device).clone()
            self._adain_bias = generator.style_to_adain.bias.detach().float().to(self.device).clone()
            table = model.latent_table if model.latent_table is not None else model.reference_table
            # [D, P]; None when the checkpoint has no style table (then only style inputs work).
            self.adain_table = (None if table is None else
                                F.linear(table.float().to(self.device), self._adain_weight, self._adain_bias))
        self.supports_weights = self.adain_table is not None
        self.generator = generator.to(device=self.device, dtype=dtype,
                                      memory_format=self.memory_format).eval().requires_grad_(False)
        self._slots: OrderedDict[int, _Slot] = OrderedDict()
        self._lock = threading.Lock()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""),
                "impl": self.impl, "channels_last": self.channels_last, "cuda_graphs": self.cuda_graphs}

    def adain_params_for_style(self, style: torch.Tensor) -> torch.Tensor:
        """style [N, S] -> AdaIN parameters [N, P] in fp32."""
        return F.linear(style.float().to(self.device), self._adain_weight, self._adain_bias)

    def run_weights(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.adain_table is None:
            raise CheckpointError("this checkpoint has no per-domain style table: text targets need "
                                  "one; use reference=, seed= or style= instead")
        params = weights.float().to(self.device) @ self.adain_table  # [N, P]
        return self.run_params(images, params)

    def run_style(self, images: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.run_params(images, self.adain_params_for_style(style))

    def run_params(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """images [N, 3, S, S], AdaIN params [N, P] fp32 -> float32 [N, 3, S, S] owned by the caller."""
        n = images.shape[0]
        with self._lock, torch.inference_mode():
            slot = self._slot(n)
            slot.images.copy_(images)
            slot.params.copy_(params)
            if self.cuda_graphs:
                if slot.graph is None:
                    self._capture(slot)
                slot.graph.replay()
                output = slot.output
            else:
                output = self.generator(slot.images, adain_params=slot.params, impl=self.impl)
            # .float() on an fp32 graph output would alias the static buffer: copy explicitly.
            return output.to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    def _slot(self, n: int) -> _Slot:
        slot = self._slots.get(n)
        if slot is not None:
            self._slots.move_to_end(n)
            return slot
        size = self.config.img_size
        images = torch.empty(n, 3, size, size, device=self.device, dtype=self.dtype)
        images = images.contiguous(memory_format=self.memory_format)
        params = torch.empty(n, self._adain_weight.shape[0], device=self.device, dtype=torch.float32)
        slot = _Slot(images, params)
        self._slots[n] = slot
        while len(self._slots) > _MAX_CACHED_BATCH_SIZES:
            self._slots.popitem(last=False)
        return slot

    def _capture(self, slot: _Slot) -> None:
        """Capture the generator forward on the slot's static buffers (warm-up on a side stream first)."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_GRAPH_WARMUP_ITERS):
                self.generator(slot.images, adain_params=slot.params, impl=self.impl)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may keep converting images on the device while this one captures.
        with record_packed_weights() as graph_weights:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                slot.output = self.generator(slot.images, adain_params=slot.params, impl=self.impl)
        slot.graph_weights = graph_weights
        slot.graph = graph
