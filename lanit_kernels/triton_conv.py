"""Triton direct convolution (implicit GEMM) with a per-(n, c_in) affine + LeakyReLU input prologue.

GEMM view, one sample per program row of the grid: M = output pixels, N = C_out, K = C_in * k * k,
walked as one runtime loop over (kernel tap, BLOCK_K slice of C_in), tap-major.
While an input tile is loaded it is transformed in fp32 as

    a = act(x * scale[n, c] + shift[n, c])           (AdaIN: scale = (1 + gamma) * rstd, ...)

and only then zero-padded: padding belongs to the normalised activation, not to x. A nearest-x2
upsample is never materialised: a 3x3 conv of the upsampled image is computed as four 2x2 convs of
the low-res activation, one per output phase (row and column parity), with pre-summed phase
weights, which is exact and needs 4/9 of the MACs; other kernel sizes read row uh // 2. The
epilogue optionally multiplies by a per-(n, c_out) factor (StyleGAN2 demodulation) and adds the bias.

This module imports triton at import time: load it only through lanit_kernels.dispatch.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, out_scale_ptr, y_ptr,
                 C_in, H, W, C_out, H_out, W_out,
                 stride_xn, stride_xc, stride_xh, stride_xw,
                 stride_yn, stride_yc, stride_yh, stride_yw,
                 negative_slope,
                 KSIZE: tl.constexpr, NUM_TAPS: tl.constexpr, UPSAMPLE: tl.constexpr,
                 PHASES: tl.constexpr, HAS_SHIFT: tl.constexpr,
                 HAS_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PHASES:
        # Nearest x2 + 3x3 conv as four 2x2 convs on the low-res grid, one per output phase
        # (row parity, column parity); M runs over low-res pixels. Weights are [phase, tap, ...].
        n = tl.program_id(2) // 4
        phase = tl.program_id(2) % 4
        grid_w = W
        num_m = H * W
    else:
        n = tl.program_id(2)
        grid_w = W_out
        num_m = H_out * W_out

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # pixel of the M grid, [BLOCK_M]
    mask_m = offs_m < num_m
    grid_row = offs_m // grid_w
    grid_col = offs_m % grid_w
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel, [BLOCK_N]
    mask_n = offs_n < C_out

    x_base = x_ptr + n * stride_xn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # One runtime loop over (tap, C_in slice), tap-major: the same accumulation order as a loop over
    # taps around a loop over C_in, but the body is compiled once (an unrolled tap loop made ~9x the
    # code and 10x the compile time) and the software pipeliner sees every K step of every tap.
    num_k_blocks = tl.cdiv(C_in, BLOCK_K)
    for step in range(0, NUM_TAPS * num_k_blocks):
        tap = step // num_k_blocks
        k0 = (step - tap * num_k_blocks) * BLOCK_K
        if PHASES:
            # Even output rows read low-res rows (i-1, i), odd ones (i, i+1); same for columns.
            src_h = grid_row + (tap // 2 - 1 + phase // 2)
            src_w = grid_col + (tap % 2 - 1 + phase % 2)
            inside = (src_h >= 0) & (src_h < H) & (src_w >= 0) & (src_w < W) & mask_m
            w_tap = w_ptr + (phase * 4 + tap) * C_in * C_out
        else:
            # Position of this tap in the (possibly upsampled) padded input.
            src_h = grid_row + (tap // KSIZE - KSIZE // 2)
            src_w = grid_col + (tap % KSIZE - KSIZE // 2)
            if UPSAMPLE:
                inside = (src_h >= 0) & (src_h < 2 * H) & (src_w >= 0) & (src_w < 2 * W) & mask_m
                src_h = src_h // 2
                src_w = src_w // 2
            else:
                inside = (src_h >= 0) & (src_h < H) & (src_w >= 0) & (src_w < W) & mask_m
            w_tap = w_ptr + tap * C_in * C_out
        src_h = tl.where(inside, src_h, 0)
        src_w = tl.where(inside, src_w, 0)
        pix_off = src_h * stride_xh + src_w * stride_xw  # [BLOCK_M]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C_in
        a = tl.load(x_base + pix_off[:, None] + offs_k[None, :] * stride_xc,
                    mask=inside[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + n * C_in + offs_k, mask=mask_k, other=0.0)
        a = a * scale[None, :]
        if HAS_SHIFT:
            shift = tl.load(shift_ptr + n * C_in + offs_k, mask=mask_k, other=0.0)
            a = a + shift[None, :]
        if HAS_ACT:
            a = tl.where(a >= 0.0, a, a * negative_slope)
        # Zero padding is applied to the transformed activation (shift would leak into it).
        a = tl.where(inside[:, None], a, 0.0)
        b = tl.load(w_tap + offs_k[:, None] * C_out + offs_n[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = a.to(w_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            # Exact: products of two bf16 values are representable in fp32.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_OUT_SCALE:
        out_scale = tl.load(out_scale_ptr + n * C_out + offs_n, mask=mask_n, other=0.0)
        acc = acc * out_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if PHASES:
        out_h = 2 * grid_row + phase // 2
        out_w = 2 * grid_col + phase % 2
    else:
        out_h = grid_row
        out_w = grid_col
    y_ptrs = (y_ptr + n * stride_yn + out_h[:, None] * stride_yh + out_w[:, None] * stride_yw
              + offs_n[None, :] * stride_yc)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Packed weights in the activation dtype, keyed by the weight tensor's identity, in-place version,
# dtype and form. Parameters live as long as their modules, so re-packing on every call would be
# pure waste at batch 1. A weak reference tells when an id has been recycled.
_PACKED: dict[tuple[int, torch.dtype, bool], tuple[weakref.ref, tuple, torch.Tensor]] = {}
_PACKED_MAX = 256
# Lists (dispatch.record_packed_weights) that collect every packed weight handed to a launch.
_PACK_RECORDERS: list[list[torch.Tensor]] = []

# _PHASE_TAPS[parity, tap, k]: which rows of a 3-tap kernel land on low-res row i - 1 + parity + tap
# when the input was nearest-upsampled x2 (even outputs: k=0 -> i-1, k=1,2 -> i; odd: k=0,1 -> i,
# k=2 -> i+1).
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def _pack(weight: torch.Tensor, dtype: torch.dtype, phases: bool) -> torch.Tensor:
    c_out, c_in, kh, kw = weight.shape
    w = weight.detach()
    if not phases:
        return w.to(dtype).permute(2, 3, 1, 0).reshape(kh * kw, c_in, c_out).contiguous()
    # Sum taps in fp32, round once: [row parity, col parity, row tap, col tap, C_in, C_out].
    taps = _PHASE_TAPS.to(w.device)
    phase_w = torch.einsum("atk,oikl,bsl->abtsio", taps, w.float(), taps)
    return phase_w.reshape(16, c_in, c_out).to(dtype).contiguous()


def pack_weight(weight: torch.Tensor, dtype: torch.dtype, phases: bool = False) -> torch.Tensor:
    """[C_out, C_in, k, k] -> contiguous [k*k, C_in, C_out] in `dtype`, cached per tensor.

    With `phases` (3x3 only): the four 2x2 phase kernels of nearest-x2-then-3x3, [16, C_in, C_out]
    ordered (row parity, col parity, row tap, col tap).

    A cached packing is reused while the tensor's version counter (bumped by every in-place op:
    optimiser steps, EMA lerp_, load_state_dict) and its storage (replaced by `.data = ...`,
    `module.to(...)`) are unchanged. Writes through `.data`'s alias (`w.data.mul_(2)`) bypass the
    version counter, as they bypass autograd: update weights in place under torch.no_grad().
    """
    packed = _cached_pack(weight, dtype, phases)
    for recorder in _PACK_RECORDERS:
        recorder.append(packed)
    return packed


def _cached_pack(weight: torch.Tensor, dtype: torch.dtype, phases: bool) -> torch.Tensor:
    try:
        version = weight._version
    except RuntimeError:  # inference tensors carry no version counter: never cache them
        return _pack(weight, dtype, phases)
    key = (id(weight), dtype, phases)
    state = (version, weight.data_ptr(), weight.device, tuple(weight.shape))
    cached = _PACKED.get(key)
    if cached is not None and cached[0]() is weight and cached[1] == state:
        return cached[2]
    packed = _pack(weight, dtype, phases)
    if len(_PACKED) >= _PACKED_MAX:
        for stale in [k for k, entry in _PACKED.items() if entry[0]() is None] or list(_PACKED):
            del _PACKED[stale]
    _PACKED[key] = (weakref.ref(weight), state, packed)
    return packed


def _blocks(hw_out: int, c_in: int, c_out: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). tl.dot needs every dim >= 16.

    A heuristic rather than triton.autotune: autotuning does not run under the interpreter, and
    every extra config is another compile on the GPU machine. The choices are the ones that compile
    for sm_90 without register spills (`python -m lanit_kernels.aot --arch 90` checks every variant
    the generator uses): the A operand is gathered per element, so each thread holds 64-bit pointers
    for its share of the [BLOCK_M, BLOCK_K] tile; BLOCK_K = 32 and 8 warps from 128 x 64 output
    tiles up keep that share small (128 x 64 x 64 on 4 warps spilled ~300 B in fp16). The
    interpreter pays per program and per op, not per element, so it gets taller M tiles.
    """
    del dtype  # one tile table for fp32, fp16 and bf16 (all spill-free at these sizes)
    max_m = 512 if _interpreting() else 128
    block_m = max(16, min(max_m, triton.next_power_of_2(hw_out)))
    block_n = max(16, min(128, triton.next_power_of_2(c_out)))
    block_k = max(16, min(32, triton.next_power_of_2(c_in)))
    num_warps = 8 if block_m * block_n >= 128 * 64 else 4
    return block_m, block_n, block_k, num_warps, 3


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    # The CPU interpreter (triton 3.8) returns garbage from tl.dot on bf16 operands; upcasting the
    # operands there gives the same products (bf16 x bf16 is exact in fp32) and fp32 accumulation.
    return dtype == torch.bfloat16 and _interpreting()


def cudnn_conv_allows_tf32() -> bool:
    """Whether torch's fp32 convolutions may use TF32. torch 2.9+ has a per-backend, per-op
    `fp32_precision` ("tf32" / "ieee" / "none" = inherit); once that API is used, reading the legacy
    `cudnn.allow_tf32` raises, so the new settings are resolved first."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision is None:  # torch before the new API
        return bool(cudnn.allow_tf32)
    for fallback in (cudnn, torch.backends):  # "none": inherit from the wider setting
        if precision != "none":
            break
        precision = getattr(fallback, "fp32_precision", "none")
    # conv's default is "tf32"; "none" all the way up is what `allow_tf32 = False` leaves
    return precision == "tf32"


def _dot_precision(dtype: torch.dtype, device: torch.device | None = None) -> str:
    # fp32 convs follow torch's cuDNN setting (TF32 by default), so "triton" and "ref" agree in kind;
    # GPUs before sm_80 have no TF32 (cuDNN computes fp32 there too).
    if dtype != torch.float32 or not cudnn_conv_allows_tf32():
        return "ieee"
    if device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "ieee"
    return "tf32"


def conv2d_prologue_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           scale: torch.Tensor, shift: torch.Tensor | None,
                           negative_slope: float | None, upsample: bool,
                           out_scale: torch.Tensor | None,
                           block_sizes: tuple[int, int, int] | None = None) -> torch.Tensor:
    """conv2d(upsample?(act(x * scale + shift)), weight, padding=k//2) * out_scale + bias.

    x [N, C_in, H, W] (any strides); weight [C_out, C_in, k, k] (k odd); scale, shift [N, C_in]
    fp32; out_scale [N, C_out] fp32 or None; bias [C_out] or None. The output has x's dtype and
    memory format (channels_last in, channels_last out). `block_sizes` = (BLOCK_M, BLOCK_N,
    BLOCK_K) overrides the heuristic (tests use it to force partial tiles on every axis).
    """
    n, c_in, h, w = x.shape
    c_out, _, k, _ = weight.shape
    h_out, w_out = (2 * h, 2 * w) if upsample else (h, w)
    # Channels innermost (a channels_last tensor or a view of one) gives a channels_last output; a
    # [N, C, 1, 1] tensor is contiguous in both formats and stays NCHW, as the reference keeps it.
    channels_last = x.stride(1) == 1 and c_in > 1 and not x.is_contiguous()
    y = torch.empty((n, c_out, h_out, w_out), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grid, constexprs, options = launch_config(
        n, c_in, h, w, c_out, k, bool(upsample), x.dtype, x.device, has_shift=shift is not None,
        has_act=negative_slope is not None, has_bias=bias is not None,
        has_out_scale=out_scale is not None, block_sizes=block_sizes)
    packed = pack_weight(weight, x.dtype, constexprs["PHASES"])
    scale = scale.float().contiguous()
    shift_arg = scale if shift is None else shift.float().contiguous()
    out_scale_arg = scale if out_scale is None else out_scale.float().contiguous()
    bias_arg = scale if bias is None else bias.contiguous()
    _conv_kernel[grid](
        x, packed, bias_arg, scale, shift_arg, out_scale_arg, y,
        c_in, h, w, c_out, h_out, w_out,
        *x.stride(), *y.stride(),
        0.0 if negative_slope is None else float(negative_slope),
        **constexprs, **options,
    )
    return y


def launch_config(n: int, c_in: int, h: int, w: int, c_out: int, k: int, upsample: bool,
                  dtype: torch.dtype, device: torch.device | None = None, *, has_shift: bool,
                  has_act: bool, has_bias: bool, has_out_scale: bool,
                  block_sizes: tuple[int, int, int] | None = None) -> tuple[tuple, dict, dict]:
    """(grid, constexpr arguments, launch options) of one _conv_kernel call (lanit_kernels.aot
    compiles exactly these)."""
    h_out, w_out = (2 * h, 2 * w) if upsample else (h, w)
    # Nearest x2 + 3x3 runs as four 2x2 phase convs on the low-res input: 4/9 of the MACs.
    phases = upsample and k == 3
    hw_m = h * w if phases else h_out * w_out
    block_m, block_n, block_k, num_warps, num_stages = _blocks(hw_m, c_in, c_out, dtype)
    if block_sizes is not None:
        block_m, block_n, block_k = block_sizes
    grid = (triton.cdiv(hw_m, block_m), triton.cdiv(c_out, block_n), 4 * n if phases else n)
    constexprs = dict(KSIZE=k, NUM_TAPS=4 if phases else k * k, UPSAMPLE=upsample, PHASES=phases,
                      HAS_SHIFT=has_shift, HAS_ACT=has_act, HAS_BIAS=has_bias,
                      HAS_OUT_SCALE=has_out_scale, DOT_PRECISION=_dot_precision(dtype, device),
                      DOT_IN_FP32=_dot_in_fp32(dtype),
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return grid, constexprs, dict(num_warps=num_warps, num_stages=num_stages)
