"""Triton kernels for instance-norm statistics and the fused AdaIN + LeakyReLU.

Both kernels tile a [BLOCK_C channels, BLOCK_HW pixels] block of one sample and loop over the H*W
plane. Statistics are accumulated in fp32 with Chan's parallel update of (mean, M2) per tile, which
avoids the cancellation of sum / sum-of-squares when |mean| >> std (fp16 activations after many
layers). The plane is addressed as `base + c * stride_c + p * stride_p` with p = h * W + w, which
covers both NCHW (stride_p = 1) and channels_last (stride_c = 1); the launcher makes anything else
contiguous first.

This module imports triton at import time: load it only through lanit_kernels.dispatch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _range_stats(base_ptr, offs_c, mask_c, stride_c, stride_p, start, stop,
                 BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """fp32 (mean [BLOCK_C], M2 [BLOCK_C]) over pixels [start, stop) of the planes at base_ptr + c * stride_c."""
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile_start in range(start, stop, BLOCK_HW):
        offs_p = tile_start + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_p < stop)[None, :]
        ptrs = base_ptr + offs_c[:, None] * stride_c + offs_p[None, :] * stride_p
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        # All tiles before this one were full, so `tile_start - start` elements are accumulated.
        count_tile = tl.minimum(stop - tile_start, BLOCK_HW).to(tl.float32)
        count_prev = (tile_start - start) * 1.0
        count_new = count_prev + count_tile
        mean_tile = tl.sum(v, axis=1) / count_tile
        centred = tl.where(mask, v - mean_tile[:, None], 0.0)
        m2_tile = tl.sum(centred * centred, axis=1)
        delta = mean_tile - mean
        mean = mean + delta * (count_tile / count_new)
        m2 = m2 + m2_tile + delta * delta * (count_prev * count_tile / count_new)
    return mean, m2


@triton.jit
def _plane_stats(base_ptr, offs_c, mask_c, stride_c, stride_p, HW,
                 BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """fp32 (mean [BLOCK_C], biased variance [BLOCK_C]) of the planes at base_ptr + c * stride_c."""
    mean, m2 = _range_stats(base_ptr, offs_c, mask_c, stride_c, stride_p, 0, HW, BLOCK_C, BLOCK_HW)
    return mean, m2 / HW


@triton.jit
def _adain_kernel(x_ptr, gamma_ptr, beta_ptr, y_ptr,
                  C, HW,
                  stride_xn, stride_xc, stride_xp,
                  stride_yn, stride_yc, stride_yp,
                  eps, negative_slope,
                  HAS_ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """One program per (sample n, block of BLOCK_C channels): stats pass, then normalise+affine+act."""
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = x_ptr + n * stride_xn
    y_base = y_ptr + n * stride_yn
    mean, var = _plane_stats(x_base, offs_c, mask_c, stride_xc, stride_xp, HW, BLOCK_C, BLOCK_HW)
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(gamma_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = (1.0 + gamma) * rstd
    shift = beta - scale * mean
    for start in range(0, HW, BLOCK_HW):
        offs_p = start + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_p < HW)[None, :]
        v = tl.load(x_base + offs_c[:, None] * stride_xc + offs_p[None, :] * stride_xp,
                    mask=mask, other=0.0).to(tl.float32)
        out = v * scale[:, None] + shift[:, None]
        if HAS_ACT:
            out = tl.where(out >= 0.0, out, out * negative_slope)
        tl.store(y_base + offs_c[:, None] * stride_yc + offs_p[None, :] * stride_yp,
                 out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adain_coeff_kernel(x_ptr, gamma_ptr, beta_ptr, scale_ptr, shift_ptr,
                        C, HW, stride_xn, stride_xc, stride_xp, eps,
                        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """scale = (1 + gamma) * rstd, shift = beta - scale * mean, both [N, C] fp32 (contiguous)."""
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean, var = _plane_stats(x_ptr + n * stride_xn, offs_c, mask_c, stride_xc, stride_xp, HW,
                             BLOCK_C, BLOCK_HW)
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(gamma_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = (1.0 + gamma) * rstd
    tl.store(scale_ptr + n * C + offs_c, scale, mask=mask_c)
    tl.store(shift_ptr + n * C + offs_c, beta - scale * mean, mask=mask_c)


@triton.jit
def _partial_stats_kernel(x_ptr, mean_ptr, m2_ptr, C, HW, CHUNK, stride_xn, stride_xc, stride_xp,
                          BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(mean, M2) of pixel chunk j = program_id(2) per (n, c), into [N, num_chunks, C] fp32 buffers."""
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    chunk = tl.program_id(2)
    start = chunk * CHUNK
    stop = tl.minimum(start + CHUNK, HW)
    mean, m2 = _range_stats(x_ptr + n * stride_xn, offs_c, mask_c, stride_xc, stride_xp, start, stop,
                            BLOCK_C, BLOCK_HW)
    out = (n * tl.num_programs(2) + chunk) * C + offs_c
    tl.store(mean_ptr + out, mean, mask=mask_c)
    tl.store(m2_ptr + out, m2, mask=mask_c)


@triton.jit
def _combine_coeff_kernel(mean_ptr, m2_ptr, gamma_ptr, beta_ptr, scale_ptr, shift_ptr,
                          C, HW, CHUNK, NUM_CHUNKS, eps, BLOCK_C: tl.constexpr):
    """Chan's merge of the chunks' (mean, M2) in chunk order, then the AdaIN scale and shift."""
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for chunk in range(0, NUM_CHUNKS):
        src = (n * NUM_CHUNKS + chunk) * C + offs_c
        mean_chunk = tl.load(mean_ptr + src, mask=mask_c, other=0.0)
        m2_chunk = tl.load(m2_ptr + src, mask=mask_c, other=0.0)
        count_chunk = (tl.minimum(HW - chunk * CHUNK, CHUNK)).to(tl.float32)
        count_prev = (chunk * CHUNK) * 1.0  # every earlier chunk was full
        count_new = count_prev + count_chunk
        delta = mean_chunk - mean
        mean = mean + delta * (count_chunk / count_new)
        m2 = m2 + m2_chunk + delta * delta * (count_prev * count_chunk / count_new)
    rstd = 1.0 / tl.sqrt(m2 / HW + eps)
    gamma = tl.load(gamma_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = (1.0 + gamma) * rstd
    tl.store(scale_ptr + n * C + offs_c, scale, mask=mask_c)
    tl.store(shift_ptr + n * C + offs_c, beta - scale * mean, mask=mask_c)


def plane_strides(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(x or a contiguous copy, stride_n, stride_c, stride_p) with the H*W plane addressable as p."""
    n_, c_, h_, w_ = x.shape
    sn, sc, sh, sw = x.stride()
    if h_ > 1 and sh != w_ * sw:
        x = x.contiguous()
        sn, sc, sh, sw = x.stride()
    stride_p = sw if w_ > 1 else (sh if h_ > 1 else 1)
    return x, sn, sc, stride_p


def _blocks(channels: int, hw: int, channels_contiguous: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, num_warps): ~4k elements per tile, the contiguous axis widest."""
    hw_pow2 = triton.next_power_of_2(hw)
    c_pow2 = triton.next_power_of_2(channels)
    if channels_contiguous:
        block_c = min(c_pow2, 32)
        block_hw = max(1, min(hw_pow2, 4096 // block_c))
    else:
        block_hw = min(hw_pow2, 4096)
        block_c = max(1, min(c_pow2, 4096 // block_hw))
    tile = block_c * block_hw
    num_warps = 8 if tile >= 4096 else (4 if tile >= 1024 else 2)
    return block_c, block_hw, num_warps


def adain_triton(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                 negative_slope: float | None,
                 block_sizes: tuple[int, int] | None = None) -> torch.Tensor:
    """LeakyReLU((1 + gamma) * instance_norm(x) + beta) in one launch; y keeps x's memory format.

    `block_sizes` = (BLOCK_C, BLOCK_HW) overrides the heuristic (tests force partial tiles).
    """
    n, c, h, w = x.shape
    x, sxn, sxc, sxp = plane_strides(x)
    y = torch.empty_like(x)
    _, syn, syc, syp = plane_strides(y)
    gamma = gamma.contiguous()
    beta = beta.contiguous()
    block_c, block_hw, num_warps = _blocks(c, h * w, sxc == 1 and c > 1)
    if block_sizes is not None:
        block_c, block_hw = block_sizes
    grid = (n, triton.cdiv(c, block_c))
    _adain_kernel[grid](
        x, gamma, beta, y, c, h * w, sxn, sxc, sxp, syn, syc, syp,
        float(eps), 0.0 if negative_slope is None else float(negative_slope),
        HAS_ACT=negative_slope is not None, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=num_warps,
    )
    return y


# The statistics grid is (N, C / BLOCK_C); below this many programs (about 2 per SM of an H100,
# 132 SMs) the pixels are split into chunks as well: at batch 1, 64 channels and 256 x 256 the
# unsplit grid would run 2 programs on the whole GPU.
_MIN_STATS_PROGRAMS = 264


def stats_chunk(n: int, c_blocks: int, hw: int, block_hw: int) -> int:
    """Pixels per statistics chunk (a multiple of BLOCK_HW); `hw` means one unsplit pass."""
    tiles = triton.cdiv(hw, block_hw)
    programs = n * c_blocks
    if programs >= _MIN_STATS_PROGRAMS or tiles < 2:
        return hw
    chunks = min(tiles, triton.cdiv(_MIN_STATS_PROGRAMS, programs))
    return triton.cdiv(tiles, chunks) * block_hw


def stats_plan(n: int, c: int, hw: int, channels_contiguous: bool,
               block_sizes: tuple[int, int] | None = None, chunk: int | None = None) -> dict:
    """Launch parameters of adain_coefficients_triton (shared with lanit_kernels.aot)."""
    block_c, block_hw, num_warps = _blocks(c, hw, channels_contiguous)
    if block_sizes is not None:
        block_c, block_hw = block_sizes
    c_blocks = triton.cdiv(c, block_c)
    chunk = stats_chunk(n, c_blocks, hw, block_hw) if chunk is None else max(1, min(chunk, hw))
    combine_c = min(triton.next_power_of_2(c), 128)
    return dict(block_c=block_c, block_hw=block_hw, num_warps=num_warps, c_blocks=c_blocks,
                chunk=chunk, num_chunks=triton.cdiv(hw, chunk), combine_c=combine_c,
                combine_warps=1 if combine_c <= 32 else 4)


def adain_coefficients_triton(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                              eps: float, block_sizes: tuple[int, int] | None = None,
                              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) AdaIN affine folded with the instance-norm statistics: (scale, shift) [N, C] fp32.

    adain(x) == x * scale + shift (before the activation). At small N * C the H*W plane is split
    into chunks of `chunk` pixels (default: stats_chunk), one program each, whose (mean, M2) a second
    kernel merges (Chan et al.) in chunk order. `block_sizes` = (BLOCK_C, BLOCK_HW) and `chunk`
    override the heuristics (tests force several partial chunks).
    """
    n, c, h, w = x.shape
    x, sxn, sxc, sxp = plane_strides(x)
    gamma, beta = gamma.contiguous(), beta.contiguous()
    scale = torch.empty((n, c), device=x.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    hw = h * w
    plan = stats_plan(n, c, hw, sxc == 1 and c > 1, block_sizes, chunk)
    if plan["num_chunks"] == 1:
        _adain_coeff_kernel[(n, plan["c_blocks"])](
            x, gamma, beta, scale, shift, c, hw, sxn, sxc, sxp, float(eps),
            BLOCK_C=plan["block_c"], BLOCK_HW=plan["block_hw"], num_warps=plan["num_warps"],
        )
        return scale, shift
    partial_mean = torch.empty((n, plan["num_chunks"], c), device=x.device, dtype=torch.float32)
    partial_m2 = torch.empty_like(partial_mean)
    _partial_stats_kernel[(n, plan["c_blocks"], plan["num_chunks"])](
        x, partial_mean, partial_m2, c, hw, plan["chunk"], sxn, sxc, sxp,
        BLOCK_C=plan["block_c"], BLOCK_HW=plan["block_hw"], num_warps=plan["num_warps"],
    )
    _combine_coeff_kernel[(n, triton.cdiv(c, plan["combine_c"]))](
        partial_mean, partial_m2, gamma, beta, scale, shift, c, hw, plan["chunk"],
        plan["num_chunks"], float(eps), BLOCK_C=plan["combine_c"], num_warps=plan["combine_warps"],
    )
    return scale, shift
