"""Two ways to make the training step faster that leave its arithmetic as it is.

`keep_freed_memory()`: glibc hands freed blocks above its mmap threshold back to the kernel and
trims the heap's free top, so the next step's activations of the same sizes land on fresh pages
that fault in one by one. The training step frees and reallocates the same sizes every iteration;
keeping them in the heap removes the faults (a [8, 16, 32, 32] -> 32-channel 3x3 convolution takes
0.95 ms with glibc's defaults and 0.25 ms without the faults on the 2-core machine of
benchmarks/RESULTS.md). `release_freed_memory()` undoes it when training ends, so what follows
(the closing evaluation) starts from a trimmed heap and the run's peak RSS stays where it was.

`compile_blocks(compiled_blocks(generator, style_encoder))`: `torch.compile` (inductor) of the
generator's blocks and the style encoder's trunk, which fuses each block's normalisation, activation, pooling and upsampling into a
few kernels around the convolutions. The discriminator stays eager: R1 needs the gradient of a
gradient through it, which compiled autograd does not support, and compiling it for the other steps
gave no measurable gain. `Module.compile` keeps parameter names, so checkpoints do not change.
`probe_compile(device)` checks first that compiling works here, with inductor's kernels built one
library per compiled graph (training.kernel_batching) where that works too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform

import torch

from lanit_rt.errors import describe
from training.kernel_batching import batched_kernel_builds

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there when freed: every activation of the
# training step up to 128 px at batch 8 (the largest, [8, 64, 128, 128] fp32, is 32 MiB).
MMAP_THRESHOLD_BYTES = 256 << 20
# Free memory at the heap's top is kept up to this much.
TRIM_THRESHOLD_BYTES = 1 << 30

# glibc's starting values of both (they adapt upwards from there, which setting them stops).
GLIBC_DEFAULT_THRESHOLD_BYTES = 128 << 10

# Steps from which "auto" compiles: a cold compile costs about 30-80 s on 2 CPU cores (later runs
# reuse inductor's on-disk cache, ~5 s) and saves 25-100 ms a step at the default 32 px (Zen 5, Zen 4).
COMPILE_MIN_STEPS = 1000


def _glibc():
    """The C library when it is glibc (with mallopt and malloc_trim), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel (see the module
    docstring). Process-wide and idempotent. False where the C library is not glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                                     and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def release_freed_memory() -> bool:
    """Undo keep_freed_memory: glibc's starting thresholds again, and the free memory the heap
    holds handed back to the kernel. False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    gc.collect()  # the nets of a finished run may sit in reference cycles
    restored = (libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD_BYTES)
                and libc.mallopt(_M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD_BYTES))
    libc.malloc_trim(0)
    return bool(restored)


def should_compile(setting: bool | None, device: torch.device, steps: int, world: int) -> bool:
    """The config's `compile` resolved: True / False as given; None ("auto") compiles single-process
    CPU runs of at least COMPILE_MIN_STEPS steps (measured there; on GPUs it has not been)."""
    if setting is not None:
        return setting
    return device.type == "cpu" and world == 1 and steps >= COMPILE_MIN_STEPS


def import_cpp_extension_quietly() -> None:
    """Inductor imports torch.utils.cpp_extension, which warns on import when it finds a CUDA
    toolkit but no GPU; that says nothing about a CPU run, so import it first with the warning off."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)


def compile_unusable_reason(device: torch.device) -> str | None:
    """None when torch.compile works here, else why not, in one line. It compiles and runs a small
    convolution forward and backward, which needs what the training blocks need (on CPUs a C++
    compiler and the Python headers), and checks both against eager mode."""
    import_cpp_extension_quietly()
    try:
        # Its own random numbers: training's draws must not depend on whether, or how many times
        # (probe_compile may probe twice), it probed.
        numbers = torch.Generator().manual_seed(0)
        weight, bias, x = (torch.randn(shape, generator=numbers).to(device)
                           for shape in ((2, 2, 3, 3), (2,), (1, 2, 4, 4)))
        x.requires_grad_(True)

        def probe(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(x, weight, bias, padding=1),
                                                  0.2).mean()

        compiled = torch.compile(probe, dynamic=False)(x)
        compiled.backward()
        grad, x.grad = x.grad, None
        eager = probe(x)
        eager.backward()
        if not (torch.allclose(compiled, eager, rtol=1e-4, atol=1e-6)
                and torch.allclose(grad, x.grad, rtol=1e-4, atol=1e-6)):
            return "the compiled probe's results differ from eager mode's"
    except Exception as err:  # noqa: BLE001 - any failure means: train eagerly
        return describe(err)[:200]
    return None


def probe_compile(device: torch.device) -> tuple[bool, str | None]:
    """Whether torch.compile works here: (batched, None), or (False, why not). It first tries with
    inductor's kernels built one library per graph (training.kernel_batching), and where that
    fails, without: `batched` says which worked."""
    with batched_kernel_builds() as batching:
        reason = compile_unusable_reason(device)
    if reason is None and batching.worked:
        return True, None
    if not batching.active:
        return False, reason
    torch._dynamo.reset()
    return False, compile_unusable_reason(device)


def compiled_blocks(generator, style_encoder) -> dict[str, torch.nn.Module]:
    """The blocks compile_blocks compiles, by name: the generator's encoder and decoder blocks and
    output head, and the style encoder's trunk."""
    blocks = {f"generator.encode.{i}": block for i, block in enumerate(generator.encode)}
    blocks.update({f"generator.decode.{i}": block for i, block in enumerate(generator.decode)})
    blocks["generator.to_rgb"] = generator.to_rgb
    blocks["style_encoder.trunk"] = style_encoder.trunk
    return blocks


def compile_blocks(blocks: dict[str, torch.nn.Module]) -> None:
    """torch.compile, in place, `blocks` (compiled_blocks' dict, or part of it): the one place that
    says how, so the trainer and the child that fills its caches (training.background_compile)
    compile alike. Shapes are static: the step calls each block with a handful of batch sizes,
    each compiled once."""
    for block in blocks.values():
        block.compile(dynamic=False)
