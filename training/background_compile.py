"""The first torch.compile in a child process, while the first steps train eagerly.

A cold compile of the training blocks takes about a minute on 2 CPU cores, after an 18 s compile
probe (benchmarks/RESULTS.md), and nearly all of it runs on one core: inductor's Python code
generation, then g++. A trainer that compiles before its first step leaves that time without a
step. Instead:

1. The run's first step runs eagerly and records how it calls each block that
   `training.acceleration.compiled_blocks` names (`record_block_calls`): the shape, strides,
   storage offset and dtype of every tensor argument, which of them and which of the block's
   weights need gradients, and whether gradients are on.
2. A child process (`python -m training.background_compile`) builds a generator and a style
   encoder of the same shapes, compiles their blocks and makes the same calls with random numbers,
   backward included where gradients flow (`replay_block_calls`). That fills inductor's on-disk
   caches with exactly the graphs the trainer will ask for.
3. Meanwhile the trainer goes on eagerly with one thread fewer, leaving a core to the child.
   At a fixed step (`TrainConfig.compile_after`) it waits for the child if it is still running,
   compiles its own blocks, which now load from the caches in seconds, and trains with all its
   threads from there on.

The switch happens at that step however fast the child was, so a seed's run does not depend on
how long the compile took. A graph the child did not make (a call the first step did not show) is
compiled by the trainer itself when it meets it, as before; a child that fails or finds
torch.compile unusable leaves the trainer to say so and train eagerly.

A child that compiled leaves a marker for its request in inductor's cache folder
(`compiled_before` finds it), so a run whose caches already hold its compile can skip the eager
start altogether; the marker goes where the caches go when that folder is cleared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_DTYPES = {str(dtype): dtype for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                           torch.int64, torch.int32, torch.bool, torch.uint8)}


# ----------------------------------------------------------------------------- recording

class _Storages:
    """Numbers the storages a call's tensors view, so views of one tensor stay views of one."""

    def __init__(self) -> None:
        self.layouts: list[list] = []  # [elements, dtype] of each
        self._index: dict[int, int] = {}

    def index(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._index:
            self._index[key] = len(self.layouts)
            self.layouts.append([storage.nbytes() // tensor.element_size(), str(tensor.dtype)])
        return self._index[key]


def _describe(value: Any, storages: _Storages) -> Any:
    """A JSON-able description of a block argument: tensors by their layout, tuples and lists
    element by element, other values as they are (they must be JSON values)."""
    if isinstance(value, torch.Tensor):
        if str(value.dtype) not in _DTYPES:
            raise TypeError(f"a block argument of dtype {value.dtype}")
        return {"tensor": [storages.index(value), list(value.shape), list(value.stride()),
                           value.storage_offset(), str(value.dtype), value.requires_grad]}
    if isinstance(value, (tuple, list)):
        return {"tuple" if isinstance(value, tuple) else "list":
                [_describe(item, storages) for item in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a block argument of type {type(value).__name__}")


@dataclass
class Recording:
    """The distinct calls `record_block_calls` saw (JSON-able, in the order first seen), or why
    they cannot be replayed: an argument it cannot describe (then `calls` is incomplete)."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    unsupported: str | None = None


@contextlib.contextmanager
def record_block_calls(blocks: dict[str, torch.nn.Module]) -> Iterator[Recording]:
    """While open, every call of a block in `blocks` (name -> module) is described in the yielded
    Recording. Recording never fails the call itself."""
    recording = Recording()
    seen: set[str] = set()

    def hook(name: str):
        def record(module, args, kwargs):
            storages = _Storages()
            try:
                call = {"block": name, "grad": torch.is_grad_enabled(),
                        "weights_need_grad": [p.requires_grad for p in module.parameters()],
                        "args": _describe(tuple(args), storages),
                        "kwargs": {key: _describe(value, storages) for key, value in kwargs.items()}}
            except TypeError as err:
                recording.unsupported = f"{name}: {err}"
                return
            call["storages"] = storages.layouts
            key = json.dumps(call, sort_keys=True)
            if key not in seen:
                seen.add(key)
                recording.calls.append(call)
        return record

    handles = [block.register_forward_pre_hook(hook(name), with_kwargs=True)
               for name, block in blocks.items()]
    try:
        yield recording
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- replaying

def _random(size: int, dtype: torch.dtype, numbers: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(size, generator=numbers).to(dtype)
    return torch.zeros(size, dtype=dtype)


def _rebuild(value: Any, storages: list[torch.Tensor]) -> Any:
    if isinstance(value, dict) and "tensor" in value:
        index, shape, stride, offset, dtype, needs_grad = value["tensor"]
        tensor = storages[index].view(_DTYPES[dtype]).as_strided(shape, stride, offset)
        return tensor.detach().requires_grad_(needs_grad) if needs_grad else tensor
    if isinstance(value, dict) and ("tuple" in value or "list" in value):
        items = [_rebuild(item, storages) for item in value.get("tuple", value.get("list"))]
        return tuple(items) if "tuple" in value else items
    return value


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def replay_block_calls(blocks: dict[str, torch.nn.Module], calls: list[dict[str, Any]],
                       device: torch.device) -> None:
    """Make each recorded call of `blocks` (compiled, or any modules of the recorded shapes) with
    random numbers in the recorded layouts, and run backward through it where its output needs
    gradients. Each block's weights get back the requires_grad they had before."""
    numbers = torch.Generator().manual_seed(0)
    for call in calls:
        block = blocks[call["block"]]
        weights = list(block.parameters())
        if len(weights) != len(call["weights_need_grad"]):
            raise ValueError(f"{call['block']} has {len(weights)} weights, the recorded call "
                             f"{len(call['weights_need_grad'])}")
        storages = [_random(size, _DTYPES[dtype], numbers).to(device) for size, dtype in call["storages"]]
        args = _rebuild(call["args"], storages)
        kwargs = {key: _rebuild(value, storages) for key, value in call["kwargs"].items()}
        before = [w.requires_grad for w in weights]
        try:
            for weight, needs_grad in zip(weights, call["weights_need_grad"]):
                weight.requires_grad_(needs_grad)
            with torch.set_grad_enabled(call["grad"]):
                out = block(*args, **kwargs)
                needing = [t for t in _tensors(out) if t.requires_grad]
                if needing:
                    torch.autograd.backward(needing, [torch.ones_like(t) for t in needing])
        finally:
            for weight, needs_grad in zip(weights, before):
                weight.requires_grad_(needs_grad)
                weight.grad = None


# ----------------------------------------------------------------------------- markers

def _marker(request: dict[str, Any]) -> Path:
    """Where the marker of a compiled request lives: in inductor's cache folder (the one the child
    filled, which it shares with the trainer), named by a hash of the request and torch's version.
    OSError where this torch does not say where that folder is."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError as err:  # a private module: the run then compiles in a child every time
        raise OSError(f"no inductor cache folder known ({err})") from None

    keyed = json.dumps({**request, "torch": torch.__version__}, sort_keys=True)
    return Path(cache_dir()) / "lanit-rt" / f"compiled-{hashlib.sha256(keyed.encode()).hexdigest()[:32]}.json"


def compiled_before(model: dict[str, Any], calls: list[dict[str, Any]], device: torch.device,
                    threads: int) -> CompileResult | None:
    """What a child found that compiled the same request before and left its marker (so inductor's
    caches hold every graph of it), or None: never compiled, or its marker is gone or unreadable."""
    try:
        found = json.loads(_marker(_request(model, calls, device, threads)).read_text())
        return CompileResult(bool(found["batched"]), None, found.get("seconds"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _request(model: dict[str, Any], calls: list[dict[str, Any]], device: torch.device,
             threads: int) -> dict[str, Any]:
    return {"model": model, "calls": calls, "device": str(device), "threads": threads}


# ----------------------------------------------------------------------------- the child process

def compile_and_replay(request: dict[str, Any]) -> dict[str, Any]:
    """What the child does: probe torch.compile, compile blocks of the requested model's shapes
    and replay the calls. {"batched": bool, "reason": None or why compiling does not work here,
    "seconds": float}; `batched` says whether inductor's kernels were built one library per graph
    (training.kernel_batching), which the trainer must then do too to find them in the cache."""
    from lanit_rt.config import LanitConfig
    from lanit_rt.networks import Generator, StyleEncoder
    from training.acceleration import compile_blocks, compiled_blocks, probe_compile
    from training.kernel_batching import batched_kernel_builds

    started = time.perf_counter()
    # The trainer's thread count, not the child's share of the cores: inductor writes the count
    # into the kernels it generates, so another count would make other kernels than the trainer's.
    torch.set_num_threads(request["threads"])
    device = torch.device(request["device"])
    batched, reason = probe_compile(device)
    if reason is None:
        config = LanitConfig.from_dict(request["model"])
        blocks = compiled_blocks(Generator(config).to(device), StyleEncoder(config).to(device))
        compile_blocks(blocks)
        with batched_kernel_builds() if batched else contextlib.nullcontext():
            replay_block_calls(blocks, request["calls"], device)
    found = {"batched": batched, "reason": reason, "seconds": round(time.perf_counter() - started, 3)}
    if reason is None and _caches_on():
        _leave_marker(request, found)
    return found


def _caches_on() -> bool:
    """Whether inductor keeps what it compiled on disk (its FX-graph and AOT-autograd caches are
    on unless turned off, e.g. TORCHINDUCTOR_FX_GRAPH_CACHE=0): without them a marker would promise
    a compile that is not there."""
    import torch._functorch.config
    import torch._inductor.config

    return bool(torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache)


def _leave_marker(request: dict[str, Any], found: dict[str, Any]) -> None:
    """The marker compiled_before finds; written whole or not at all, and not at all where the
    cache folder cannot take it (the next run then compiles in a child again)."""
    try:
        path = _marker(request)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(found))
        os.replace(partial, path)
    except OSError:
        pass


def main() -> int:
    """The child process: a request (JSON) on stdin, the result (JSON) as stdout's last line."""
    print(json.dumps(compile_and_replay(json.load(sys.stdin))), flush=True)
    return 0


# ----------------------------------------------------------------------------- the trainer's side

@dataclass
class CompileResult:
    batched: bool
    reason: str | None  # None: compiled; else why torch.compile is not used
    seconds: float | None = None  # the child's own time, from its start to its answer


class BackgroundCompile:
    """The child process, from the trainer's side: started with the recorded calls, then `result()`
    waits for it. `close()` stops it where the trainer ends first (always call it)."""

    def __init__(self, model: dict[str, Any], calls: list[dict[str, Any]], device: torch.device,
                 threads: int):
        import tempfile

        import training

        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        env = dict(os.environ)
        # The child imports this same copy of the package, installed or not.
        root = os.fspath(os.path.dirname(os.path.dirname(os.path.abspath(training.__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        request = _request(model, calls, device, threads)
        self.process = subprocess.Popen([sys.executable, "-m", "training.background_compile"],
                                        stdin=subprocess.PIPE, stdout=self._out, stderr=self._err,
                                        env=env)
        self.process.stdin.write(json.dumps(request).encode())
        self.process.stdin.close()

    def done(self) -> bool:
        return self.process.poll() is not None

    def result(self) -> CompileResult:
        """Wait for the child; what it found. A child that died says why in one line."""
        code = self.process.wait()
        self._out.seek(0)
        lines = self._out.read().decode(errors="replace").strip().splitlines()
        if code == 0 and lines:
            found = json.loads(lines[-1])
            return CompileResult(found["batched"], found["reason"], found.get("seconds"))
        self._err.seek(0)
        errors = [line for line in self._err.read().decode(errors="replace").splitlines() if line.strip()]
        why = errors[-1].strip() if errors else "no message"
        return CompileResult(False, f"its compiling process exited with code {code}: {why}"[:200])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._out.close()
        self._err.close()


if __name__ == "__main__":
    sys.exit(main())
