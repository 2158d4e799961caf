"""Dispatchers: one public function per op, choosing the reference or the Triton kernel.

`impl="ref"` always runs the PyTorch reference (differentiable, any device). `impl="triton"` runs
the fused kernel or raises KernelUnsupportedError saying why it cannot. `impl="auto"` runs the
kernel when it can and the reference otherwise. The kernel can run when:

- triton is installed (`pip install 'lanit-rt[triton]'`);
- the tensors are on a CUDA device (CPU tensors only under TRITON_INTERPRET=1 and only with
  `impl="triton"`: the interpreter is a test tool, 100x+ slower than the reference);
- autograd does not need gradients (the kernels have no backward);
- x is 4-D fp32 / fp16 / bf16 and every tensor has fewer than 2**31 elements (int32 indexing);
- the GPU can compile it: compute capability 7.0+ (Triton's tl.dot), 8.0+ for bf16 (fp32 runs
  TF32 dots only from 8.0, IEEE fp32 below: see triton_conv._dot_precision).

Argument shapes are checked for every impl: a bad shape is a ValueError, never a silent broadcast.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType

import torch

from lanit_kernels import reference

IMPLS = ("auto", "ref", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_SIZE = 7
_INT32_LIMIT = 2**31
_MAX_BATCH = 65535 // 4  # the conv grid's z-axis holds (sample, upsampling phase)


class KernelUnsupportedError(RuntimeError):
    """impl="triton" was requested for a call the Triton kernels cannot run."""


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_modules() -> tuple[ModuleType, ModuleType]:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the Triton kernels need the `triton` package: pip install 'lanit-rt[triton]'"
        ) from err
    from lanit_kernels import triton_adain, triton_conv

    return triton_adain, triton_conv


def triton_available() -> bool:
    """True when `import triton` works (says nothing about a GPU being present)."""
    try:
        _triton_modules()
    except ImportError:
        return False
    return True


def _device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for other devices (the interpreter has no limits)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def capability_blocker(dtype: torch.dtype, capability: tuple[int, int] | None) -> str | None:
    """Why kernels in `dtype` cannot compile for a GPU of this compute capability, or None."""
    if capability is None:
        return None
    name = f"sm_{capability[0]}{capability[1]}"
    if capability < (7, 0):
        return f"{name} is older than sm_70, the oldest GPU Triton's tl.dot supports"
    if dtype == torch.bfloat16 and capability < (8, 0):
        return f"bf16 tensor-core dots need sm_80 or newer, this GPU is {name}"
    return None


def _reach(t: torch.Tensor) -> int:
    """How many elements from its first one a tensor's last element lies, plus one: a view's
    numel says nothing of how far into its storage it reaches, and the kernels' offsets must fit."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _blocker(x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...], out_numel: int) -> str | None:
    """Why the Triton kernel cannot run on these tensors, or None when it can."""
    present = [t for t in tensors if t is not None]
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype} is not one of {TRITON_DTYPES}"
    if any(t.device != x.device for t in present):
        return "tensors are on different devices"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreting()):
        return f"tensors are on {x.device.type}, not CUDA (CPU needs TRITON_INTERPRET=1)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return "autograd needs gradients and the Triton kernels have no backward"
    if x.dim() == 4 and 0 in x.shape[2:]:
        return f"the images are empty ({x.shape[2]}x{x.shape[3]})"
    if x.shape[0] > _MAX_BATCH:
        return f"batch {x.shape[0]} exceeds {_MAX_BATCH} (CUDA grid z-dimension)"
    if max([out_numel] + [_reach(t) for t in present]) >= _INT32_LIMIT:
        return ("a tensor spans 2**31 or more elements of memory (kernels index with int32; for a "
                "strided view of a larger tensor, pass .contiguous())")
    return capability_blocker(x.dtype, _device_capability(x.device))


@contextlib.contextmanager
def record_packed_weights():
    """Collects every packed conv weight the Triton kernels read while the block runs.

    The packed copies live in a bounded cache (triton_conv.pack_weight) that may drop them later;
    whoever keeps device pointers beyond the call (a captured CUDA graph) must hold the list this
    yields for as long as it replays. Without triton the list stays empty.
    """
    kept: list[torch.Tensor] = []
    try:
        _, triton_conv = _triton_modules()
    except ImportError:
        yield kept
        return
    triton_conv._PACK_RECORDERS.append(kept)
    try:
        yield kept
    finally:
        # By identity: list.remove compares contents, and tensors have no single truth value.
        recorders = triton_conv._PACK_RECORDERS
        recorders.pop(next(i for i, r in enumerate(recorders) if r is kept))


def _use_triton(op: str, impl: str, x: torch.Tensor, tensors: tuple, out_numel: int) -> bool:
    _check_impl(impl)
    if impl == "ref":
        return False
    reason = _blocker(x, tensors, out_numel)
    if impl == "auto":
        # The interpreter is for tests only: "auto" never picks it for CPU tensors.
        return reason is None and x.device.type == "cuda" and triton_available()
    if reason is not None:
        raise KernelUnsupportedError(f"{op}(impl='triton') cannot run: {reason}")
    _triton_modules()  # raises ImportError naming the extra when triton is missing
    return True


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's (a model on cuda:1 would otherwise
    launch on cuda:0 with cuda:1 pointers)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _check_x(op: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")


def _check_per_channel(op: str, name: str, t: torch.Tensor, n: int, c: int) -> None:
    if tuple(t.shape) != (n, c):
        raise ValueError(f"{op}: {name} must be [N, C] = [{n}, {c}], got {tuple(t.shape)}")


def _check_weight(op: str, weight: torch.Tensor, c_in: int, bias: torch.Tensor | None) -> int:
    if weight.dim() != 4 or weight.shape[1] != c_in or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{op}: weight must be [C_out, {c_in}, k, k], got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if k % 2 == 0 or k > MAX_KERNEL_SIZE:
        raise ValueError(f"{op}: kernel size must be odd and <= {MAX_KERNEL_SIZE}, got {k}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    return weight.shape[0]


def adain(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5,
          negative_slope: float | None = 0.2, impl: str = "auto") -> torch.Tensor:
    """LeakyReLU((1 + gamma) * instance_norm(x) + beta); x [N, C, H, W], gamma/beta [N, C].

    Statistics (biased variance, like nn.InstanceNorm2d) and the affine run in fp32; the result
    has x's dtype and memory format. `negative_slope=None` skips the activation.
    """
    _check_x("adain", x)
    n, c = x.shape[:2]
    _check_per_channel("adain", "gamma", gamma, n, c)
    _check_per_channel("adain", "beta", beta, n, c)
    if _use_triton("adain", impl, x, (x, gamma, beta), x.numel()):
        triton_adain, _ = _triton_modules()
        with _on_device(x):
            return triton_adain.adain_triton(x, gamma, beta, eps, negative_slope)
    return reference.adain_ref(x, gamma, beta, eps, negative_slope)


def adain_conv2d(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, upsample: bool = False, eps: float = 1e-5,
                 negative_slope: float | None = 0.2, impl: str = "auto") -> torch.Tensor:
    """conv2d(upsample?(adain(x, gamma, beta)), weight, bias, padding=k // 2).

    x [N, C_in, H, W]; gamma, beta [N, C_in]; weight [C_out, C_in, k, k], k odd; bias [C_out] or
    None; nearest x2 upsample when `upsample`. Output [N, C_out, H', W'] in x's dtype. The Triton
    path is a statistics kernel plus one convolution whose prologue normalises, applies the style
    affine and LeakyReLU (and upsamples) while loading, so the activation never reaches memory.
    """
    _check_x("adain_conv2d", x)
    n, c_in, h, w = x.shape
    _check_per_channel("adain_conv2d", "gamma", gamma, n, c_in)
    _check_per_channel("adain_conv2d", "beta", beta, n, c_in)
    c_out = _check_weight("adain_conv2d", weight, c_in, bias)
    out_numel = n * c_out * h * w * (4 if upsample else 1)
    if _use_triton("adain_conv2d", impl, x, (x, gamma, beta, weight, bias), out_numel):
        triton_adain, triton_conv = _triton_modules()
        with _on_device(x):
            scale, shift = triton_adain.adain_coefficients_triton(x, gamma, beta, eps)
            return triton_conv.conv2d_prologue_triton(x, weight, bias, scale, shift, negative_slope,
                                                      upsample, out_scale=None)
    return reference.adain_conv2d_ref(x, gamma, beta, weight, bias, upsample, eps, negative_slope)


def modconv2d(x: torch.Tensor, weight: torch.Tensor, style: torch.Tensor, demodulate: bool = True,
              impl: str = "auto") -> torch.Tensor:
    """Batched StyleGAN2 modulated convolution; x [N, C_in, H, W], style [N, C_in].

    y[n] = conv2d(x[n] * style[n], weight, padding=k//2) * dcoef[n] with
    dcoef[n, o] = rsqrt(sum_i style[n, i]^2 * sum_kk weight[o, i]^2 + 1e-8) (when demodulating).
    The Triton path scales activations in the conv prologue (shared weights, no per-sample weight
    tensor) and multiplies by dcoef in the epilogue. In fp16 the scaled activations x * style are
    fp16 operands of the tensor-core dot, so they must stay within fp16's range (|x * style| <
    65504; the reference computes them in fp32): scale huge styles into the weight, or use bf16.
    """
    _check_x("modconv2d", x)
    n, c_in = x.shape[:2]
    _check_per_channel("modconv2d", "style", style, n, c_in)
    c_out = _check_weight("modconv2d", weight, c_in, None)
    out_numel = n * c_out * x.shape[2] * x.shape[3]
    if _use_triton("modconv2d", impl, x, (x, weight, style), out_numel):
        _, triton_conv = _triton_modules()
        style32 = style.float()
        dcoef = None
        if demodulate:
            w2 = weight.float().square().sum(dim=(2, 3))  # [C_out, C_in]
            dcoef = torch.rsqrt(style32.square() @ w2.t() + 1e-8)  # [N, C_out]
        with _on_device(x):
            return triton_conv.conv2d_prologue_triton(x, weight, None, style32, None, None, False,
                                                      out_scale=dcoef)
    return reference.modconv2d_ref(x, weight, style, demodulate)
