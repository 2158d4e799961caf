"""lanit_kernels/: references vs plain PyTorch, Triton (interpreter, TRITON_INTERPRET=1) vs references,
dispatcher fallback rules, and the generator with impl="triton" vs impl="ref".

Shapes are deliberately awkward (batch 1, odd H*W, C not a power of two) and tiny: the interpreter
is 100-300x slower than eager PyTorch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lanit_kernels
from lanit_kernels import dispatch, reference

pytest.importorskip("triton")

import triton  # noqa: E402

from lanit_kernels import triton_adain, triton_conv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol) for outputs of magnitude ~1-40. bf16 is loose by one extra ulp because the CPU
# interpreter rounds fp32 -> bf16 toward zero where the reference (and the GPU) rounds to nearest.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
CONV_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 2e-2), torch.bfloat16: (3e-2, 1e-1)}


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def _input(shape, dtype, channels_last=False, mean=1.5, std=2.0) -> torch.Tensor:
    return _layout((torch.randn(shape) * std + mean).to(dtype), channels_last)


def _assert_close(actual, expected, tol) -> None:
    rtol, atol = tol
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# References against plain PyTorch modules
# --------------------------------------------------------------------------------------------

def _adain_modules(x, gamma, beta, eps, slope):
    h = nn.InstanceNorm2d(x.shape[1], eps=eps, affine=False)(x)
    h = (1 + gamma[:, :, None, None]) * h + beta[:, :, None, None]
    return h if slope is None else nn.LeakyReLU(slope)(h)


@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (2, 12, 9, 9)])
@pytest.mark.parametrize("slope", [0.2, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_adain_ref_matches_instance_norm_modules(shape, slope, channels_last):
    x = _input(shape, torch.float32, channels_last)
    gamma, beta = torch.randn(shape[:2]), torch.randn(shape[:2])
    out = reference.adain_ref(x, gamma, beta, 1e-5, slope)
    torch.testing.assert_close(out, _adain_modules(x, gamma, beta, 1e-5, slope), rtol=1e-5, atol=1e-5)
    if slope is None:
        assert (out < 0).any()


def test_instance_stats_match_biased_variance_in_fp32():
    x = _input((2, 5, 7, 5), torch.float16)
    mean, rstd = reference.instance_stats(x, eps=1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    var = x64.var(dim=(2, 3), unbiased=False)
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ksize", [1, 3])
@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_adain_conv2d_ref_matches_module_composition(ksize, upsample, with_bias):
    x = _input((2, 5, 7, 5), torch.float32)
    gamma, beta = torch.randn(2, 5), torch.randn(2, 5) + 3.0  # large shift: padding must stay 0
    conv = nn.Conv2d(5, 6, ksize, padding=ksize // 2, bias=with_bias)
    h = _adain_modules(x, gamma, beta, 1e-5, 0.2)
    if upsample:
        h = F.interpolate(h, scale_factor=2, mode="nearest")
    expected = conv(h)
    out = reference.adain_conv2d_ref(x, gamma, beta, conv.weight, conv.bias, upsample)
    assert out.shape == (2, 6) + ((14, 10) if upsample else (7, 5))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ksize", [1, 3])
def test_modconv2d_ref_matches_per_sample_weights(ksize):
    """The batched form equals StyleGAN2's fused form: one modulated, demodulated weight per sample."""
    n, c_in, c_out = 2, 5, 4
    x = torch.randn(n, c_in, 7, 5)
    weight, style = torch.randn(c_out, c_in, ksize, ksize), torch.randn(n, c_in)
    per_sample = weight[None] * style[:, None, :, None, None]  # [N, C_out, C_in, k, k]
    per_sample = per_sample * (per_sample.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    grouped = F.conv2d(x.reshape(1, n * c_in, 7, 5), per_sample.reshape(n * c_out, c_in, ksize, ksize),
                       padding=ksize // 2, groups=n).reshape(n, c_out, 7, 5)
    torch.testing.assert_close(reference.modconv2d_ref(x, weight, style), grouped, rtol=1e-4, atol=1e-4)
    plain = F.conv2d(x * style[:, :, None, None], weight, padding=ksize // 2)
    torch.testing.assert_close(reference.modconv2d_ref(x, weight, style, demodulate=False), plain,
                               rtol=1e-5, atol=1e-5)


def test_references_are_differentiable_like_the_modules():
    x = _input((2, 5, 7, 5), torch.float32).requires_grad_()
    gamma, beta = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    weight = torch.randn(3, 5, 3, 3, requires_grad=True)
    out = reference.adain_conv2d_ref(x, gamma, beta, weight, None, True)
    grads = torch.autograd.grad(out.square().sum(), (x, gamma, beta, weight))
    h = F.interpolate(_adain_modules(x, gamma, beta, 1e-5, 0.2), scale_factor=2, mode="nearest")
    expected = torch.autograd.grad(F.conv2d(h, weight, padding=1).square().sum(), (x, gamma, beta, weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Triton kernels (interpreter) against the references
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (2, 12, 9, 9)])
def test_adain_triton_matches_ref(dtype, channels_last, shape):
    x = _input(shape, dtype, channels_last)
    gamma, beta = torch.randn(shape[:2]), torch.randn(shape[:2])
    out = lanit_kernels.adain(x, gamma, beta, impl="triton")
    _assert_close(out, reference.adain_ref(x, gamma, beta), TOL[dtype])
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_adain_triton_without_activation_and_custom_eps():
    x = _input((2, 5, 3, 3), torch.float32, std=0.01)  # tiny variance: eps matters
    gamma, beta = torch.randn(2, 5), torch.randn(2, 5)
    out = lanit_kernels.adain(x, gamma, beta, eps=1e-3, negative_slope=None, impl="triton")
    expected = reference.adain_ref(x, gamma, beta, 1e-3, None)
    _assert_close(out, expected, TOL[torch.float32])
    assert (out < 0).any()


@pytest.mark.parametrize("channels_last", [False, True])
def test_adain_triton_partial_tiles_and_large_mean(channels_last):
    """Forced small tiles: several partial HW tiles per plane and a partial channel block; a mean of
    1000 with unit std would lose the variance to cancellation in a sum / sum-of-squares scheme."""
    x = _input((2, 5, 9, 7), torch.float32, channels_last, mean=1000.0, std=1.0)
    gamma, beta = torch.randn(2, 5), torch.randn(2, 5)
    out = triton_adain.adain_triton(x, gamma, beta, 1e-5, 0.2, block_sizes=(2, 16))
    # Against float64 ground truth: x * scale + shift at |x| ~ 1000 carries ~1e-4 of fp32 rounding
    # (the reference too), while a cancelled variance would be off by several percent.
    exact = _adain_modules(x.double(), gamma.double(), beta.double(), 1e-5, 0.2)
    torch.testing.assert_close(out.double(), exact, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_statistics_split_over_pixel_chunks_merge_exactly(channels_last):
    """Chunks of 24 pixels over 63 (the last one partial), tiles of 8 inside them, mean 1000: the
    chunk merge must weigh by the true counts and keep Chan's cancellation-free form."""
    x = _input((2, 5, 9, 7), torch.float32, channels_last, mean=1000.0, std=1.0)
    gamma, beta = torch.randn(2, 5), torch.randn(2, 5)
    scale, shift = triton_adain.adain_coefficients_triton(x, gamma, beta, 1e-5, block_sizes=(4, 8),
                                                          chunk=24)
    x64 = x.double()
    rstd = (x64.var(dim=(2, 3), unbiased=False) + 1e-5).rsqrt()
    want_scale = (1 + gamma.double()) * rstd
    want_shift = beta.double() - want_scale * x64.mean(dim=(2, 3))
    torch.testing.assert_close(scale.double(), want_scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shift.double(), want_shift, rtol=1e-4, atol=1e-3)


def test_statistics_split_only_at_small_batch():
    # batch 1, 64 channels, 256 x 256 channels_last (tiles of 32 channels x 128 pixels): 2 programs
    # unsplit, so the plane is cut into chunks until ~264 programs run; batch 256 stays one pass.
    chunk = triton_adain.stats_chunk(1, 2, 256 * 256, 128)
    assert chunk % 128 == 0 and 2 * triton.cdiv(256 * 256, chunk) >= 256
    assert triton_adain.stats_chunk(256, 2, 256 * 256, 128) == 256 * 256
    assert triton_adain.stats_chunk(1, 1, 35, 64) == 35  # one tile: nothing to split


def test_adain_conv2d_at_batch_one_goes_through_the_split_statistics(monkeypatch):
    launches = []
    original = triton_adain._partial_stats_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return original[grid]

    monkeypatch.setattr(triton_adain, "_partial_stats_kernel", Spy())
    x = _input((1, 6, 40, 40), torch.float32, True)  # 1600 pixels: 7 tiles of 256
    gamma, beta = torch.randn(1, 6), torch.randn(1, 6)
    weight = torch.randn(4, 6, 3, 3) * 0.2
    out = lanit_kernels.adain_conv2d(x, gamma, beta, weight, impl="triton")
    _assert_close(out, reference.adain_conv2d_ref(x, gamma, beta, weight), CONV_TOL[torch.float32])
    assert len(launches) == 1 and launches[0][2] > 1  # several pixel chunks


def test_adain_triton_on_a_strided_view():
    base = _input((2, 8, 9, 9), torch.float32)
    x = base[:, 1:6, ::2, :]  # non-contiguous channels and rows
    gamma, beta = torch.randn(2, 5), torch.randn(2, 5)
    _assert_close(lanit_kernels.adain(x, gamma, beta, impl="triton"), reference.adain_ref(x, gamma, beta),
                  TOL[torch.float32])


def test_views_reaching_past_int32_offsets_are_refused_not_misindexed(monkeypatch):
    """A view's numel says nothing of how far into its storage it reaches; the kernels' offsets are
    int32. The limit is lowered here so a small view stands in for one of a 4 GiB batch."""
    base = _input((4, 8, 6, 6), torch.float32)
    view = base[:, :2]  # 288 elements, reaching 3 * 288 + 72 = 936 into the storage
    gamma, beta = torch.randn(4, 2), torch.randn(4, 2)
    assert dispatch._reach(view) == 936 and dispatch._reach(base) == base.numel()
    assert dispatch._reach(torch.randn(1, 3, 1, 1).expand(8, 3, 5, 5)) == 3  # stride 0: no reach
    monkeypatch.setattr(dispatch, "_INT32_LIMIT", 900)
    with pytest.raises(dispatch.KernelUnsupportedError, match=r"spans 2\*\*31 or more elements of "
                       r"memory .* pass .contiguous\(\)"):
        lanit_kernels.adain(view, gamma, beta, impl="triton")
    _assert_close(lanit_kernels.adain(view.contiguous(), gamma, beta, impl="triton"),
                  reference.adain_ref(view, gamma, beta), TOL[torch.float32])


def test_the_conv_output_keeps_the_references_layout():
    x = _input((2, 3, 1, 1), torch.float32)  # contiguous in both formats
    gamma, beta = torch.randn(2, 3), torch.randn(2, 3)
    weight = torch.randn(4, 3, 3, 3)
    out = lanit_kernels.adain_conv2d(x, gamma, beta, weight, upsample=True, impl="triton")
    expected = reference.adain_conv2d_ref(x, gamma, beta, weight, None, True)
    _assert_close(out, expected, CONV_TOL[torch.float32])
    assert out.stride() == expected.stride() == (16, 4, 2, 1)
    assert out.view(2, -1).shape == (2, 16)
    view = _input((2, 6, 5, 5), torch.float32, channels_last=True)[:, :3]  # channels innermost, strided
    out = lanit_kernels.adain_conv2d(view, gamma, beta, weight, upsample=True, impl="triton")
    expected = reference.adain_conv2d_ref(view, gamma, beta, weight, None, True)
    _assert_close(out, expected, CONV_TOL[torch.float32])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert expected.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("setting, tf32", [
    ({}, True),  # torch's default for cuDNN convolutions
    ({"allow_tf32": False}, False),  # the legacy flag
    ({"conv.fp32_precision": "ieee"}, False),
    ({"conv.fp32_precision": "none", "fp32_precision": "ieee"}, False),  # inherited from cudnn
    ({"conv.fp32_precision": "none", "global": "ieee"}, False),  # inherited from torch.backends
    ({"conv.fp32_precision": "none", "global": "tf32"}, True),
])
def test_fp32_convs_follow_torchs_tf32_setting_in_either_api(setting, tf32):
    """Once the per-op fp32_precision API is used, reading the legacy cudnn.allow_tf32 raises: the
    fp32 Triton conv must still run, with the precision the setting asks for."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.allow_tf32, cudnn.fp32_precision, torch.backends.fp32_precision)
    try:
        for key, value in setting.items():
            if key == "allow_tf32":
                cudnn.allow_tf32 = value
            elif key == "global":
                torch.backends.fp32_precision = value
            elif key == "conv.fp32_precision":
                cudnn.conv.fp32_precision = value
            else:
                cudnn.fp32_precision = value
        assert triton_conv.cudnn_conv_allows_tf32() is tf32
        x, weight = _input((1, 3, 4, 4), torch.float32), torch.randn(5, 3, 3, 3)
        gamma, beta = torch.randn(1, 3), torch.randn(1, 3)
        out = lanit_kernels.adain_conv2d(x, gamma, beta, weight, impl="triton")
        _assert_close(out, reference.adain_conv2d_ref(x, gamma, beta, weight, None, False),
                      CONV_TOL[torch.float32])
    finally:  # the wider settings first, then the legacy flag, which sets conv and rnn alike
        torch.backends.fp32_precision = saved[2]
        cudnn.fp32_precision = saved[1]
        cudnn.allow_tf32 = saved[0]
    assert cudnn.allow_tf32 == saved[0]  # readable again: later tests (torch.export) read it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("upsample", [False, True])
def test_adain_conv2d_triton_matches_ref(dtype, channels_last, upsample):
    x = _input((1, 5, 7, 5), dtype, channels_last)
    gamma, beta = torch.randn(1, 5), torch.randn(1, 5) + 1.0
    weight, bias = (torch.randn(12, 5, 3, 3) * 0.3).to(dtype), torch.randn(12).to(dtype)
    out = lanit_kernels.adain_conv2d(x, gamma, beta, weight, bias, upsample=upsample, impl="triton")
    expected = reference.adain_conv2d_ref(x, gamma, beta, weight, bias, upsample)
    assert out.shape == expected.shape
    _assert_close(out, expected, CONV_TOL[dtype])
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("ksize", [1, 3])
@pytest.mark.parametrize("upsample", [False, True])
def test_adain_conv2d_triton_kernel_sizes_without_bias(ksize, upsample):
    x = _input((2, 3, 9, 9), torch.float32)
    gamma, beta = torch.randn(2, 3), torch.randn(2, 3) - 2.0
    weight = torch.randn(5, 3, ksize, ksize)
    out = lanit_kernels.adain_conv2d(x, gamma, beta, weight, None, upsample=upsample, eps=1e-4,
                               negative_slope=0.1, impl="triton")
    expected = reference.adain_conv2d_ref(x, gamma, beta, weight, None, upsample, 1e-4, 0.1)
    _assert_close(out, expected, CONV_TOL[torch.float32])


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_kernel_partial_tiles_on_every_axis(upsample, channels_last):
    """16x16x16 tiles over C_in = C_out = 20 and 35 / 140 output pixels: every axis has a partial tile."""
    x = _input((1, 20, 5, 7), torch.float32, channels_last)
    gamma, beta = torch.randn(1, 20), torch.randn(1, 20)
    weight, bias = torch.randn(20, 20, 3, 3) * 0.2, torch.randn(20)
    scale, shift = triton_adain.adain_coefficients_triton(x, gamma, beta, 1e-5)
    out = triton_conv.conv2d_prologue_triton(x, weight, bias, scale, shift, 0.2, upsample, None,
                                             block_sizes=(16, 16, 16))
    _assert_close(out, reference.adain_conv2d_ref(x, gamma, beta, weight, bias, upsample),
                  CONV_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modconv2d_triton_matches_ref(dtype, channels_last, demodulate):
    x = _input((2, 5, 7, 5), dtype, channels_last, mean=0.0, std=1.0)
    weight, style = (torch.randn(12, 5, 3, 3) * 0.3).to(dtype), torch.randn(2, 5).to(dtype)
    out = lanit_kernels.modconv2d(x, weight, style, demodulate=demodulate, impl="triton")
    _assert_close(out, reference.modconv2d_ref(x, weight, style, demodulate), CONV_TOL[dtype])


def test_modconv2d_triton_1x1():
    x, weight, style = torch.randn(1, 3, 9, 9), torch.randn(5, 3, 1, 1), torch.randn(1, 3)
    _assert_close(lanit_kernels.modconv2d(x, weight, style, impl="triton"),
                  reference.modconv2d_ref(x, weight, style), CONV_TOL[torch.float32])


def test_packed_weight_cache_follows_in_place_updates():
    x = _input((1, 3, 5, 5), torch.float32)
    gamma, beta = torch.zeros(1, 3), torch.zeros(1, 3)
    weight = torch.randn(4, 3, 3, 3)
    first = lanit_kernels.adain_conv2d(x, gamma, beta, weight, impl="triton")
    weight.mul_(2.0)  # an optimiser step: the cached packed copy must not be reused
    second = lanit_kernels.adain_conv2d(x, gamma, beta, weight, impl="triton")
    _assert_close(second, 2.0 * first, CONV_TOL[torch.float32])
    # New storage without a version bump: `.data = ...` (and module.to(...), which does the same).
    parameter = nn.Parameter(weight.clone(), requires_grad=False)
    lanit_kernels.adain_conv2d(x, gamma, beta, parameter, impl="triton")
    parameter.data = -parameter.data
    third = lanit_kernels.adain_conv2d(x, gamma, beta, parameter, impl="triton")
    _assert_close(third, reference.adain_conv2d_ref(x, gamma, beta, parameter), CONV_TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:var_mean")  # torch's note on statistics over zero pixels
def test_empty_images_fall_back_or_raise():
    x = torch.randn(1, 3, 0, 5)
    gamma, beta = torch.randn(1, 3), torch.randn(1, 3)
    with pytest.raises(dispatch.KernelUnsupportedError, match=r"images are empty \(0x5\)"):
        lanit_kernels.adain(x, gamma, beta, impl="triton")
    assert lanit_kernels.adain(x, gamma, beta, impl="auto").shape == (1, 3, 0, 5)


# --------------------------------------------------------------------------------------------
# Dispatcher rules
# --------------------------------------------------------------------------------------------

@pytest.fixture
def launch_counter(monkeypatch):
    """Counts launches of the Triton adain and conv launchers (still running them)."""
    calls = {"adain": 0, "conv": 0}
    adain_launch, conv_launch = triton_adain.adain_triton, triton_conv.conv2d_prologue_triton

    def adain_spy(*args, **kwargs):
        calls["adain"] += 1
        return adain_launch(*args, **kwargs)

    def conv_spy(*args, **kwargs):
        calls["conv"] += 1
        return conv_launch(*args, **kwargs)

    monkeypatch.setattr(triton_adain, "adain_triton", adain_spy)
    monkeypatch.setattr(triton_conv, "conv2d_prologue_triton", conv_spy)
    return calls


def _adain_args(requires_grad=False):
    x = _input((1, 3, 5, 5), torch.float32).requires_grad_(requires_grad)
    return x, torch.randn(1, 3), torch.randn(1, 3)


def test_auto_uses_the_reference_on_cpu_even_when_interpreting(launch_counter):
    x, gamma, beta = _adain_args()
    out = lanit_kernels.adain(x, gamma, beta, impl="auto")
    assert torch.equal(out, reference.adain_ref(x, gamma, beta))
    weight = torch.randn(4, 3, 3, 3)
    conv_out = lanit_kernels.adain_conv2d(x, gamma, beta, weight, impl="auto")
    assert torch.equal(conv_out, reference.adain_conv2d_ref(x, gamma, beta, weight))
    assert launch_counter == {"adain": 0, "conv": 0}


def test_triton_impl_launches_the_kernels(launch_counter):
    x, gamma, beta = _adain_args()
    lanit_kernels.adain(x, gamma, beta, impl="triton")
    lanit_kernels.adain_conv2d(x, gamma, beta, torch.randn(4, 3, 3, 3), impl="triton")
    lanit_kernels.modconv2d(x, torch.randn(4, 3, 3, 3), torch.randn(1, 3), impl="triton")
    assert launch_counter == {"adain": 1, "conv": 2}


def test_autograd_falls_back_under_auto_and_is_refused_under_triton(launch_counter):
    x, gamma, beta = _adain_args(requires_grad=True)
    out = lanit_kernels.adain(x, gamma, beta, impl="auto")
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()
    with pytest.raises(dispatch.KernelUnsupportedError, match="autograd"):
        lanit_kernels.adain(x, gamma, beta, impl="triton")
    with torch.no_grad():  # no graph is recorded, so the kernel may run
        lanit_kernels.adain(x, gamma, beta, impl="triton")
    assert launch_counter["adain"] == 1


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, gamma, beta = _adain_args()
    with pytest.raises(dispatch.KernelUnsupportedError, match="CUDA"):
        lanit_kernels.adain(x, gamma, beta, impl="triton")
    with pytest.raises(dispatch.KernelUnsupportedError, match="CUDA"):
        lanit_kernels.modconv2d(x, torch.randn(2, 3, 3, 3), torch.randn(1, 3), impl="triton")
    assert torch.equal(lanit_kernels.adain(x, gamma, beta), reference.adain_ref(x, gamma, beta))


def test_compute_capability_gates_the_kernels(monkeypatch, launch_counter):
    assert dispatch.capability_blocker(torch.bfloat16, (9, 0)) is None
    assert dispatch.capability_blocker(torch.float16, (7, 5)) is None
    assert "sm_80" in dispatch.capability_blocker(torch.bfloat16, (7, 5))
    assert "sm_70" in dispatch.capability_blocker(torch.float16, (6, 1))
    # As if the (interpreted) tensors sat on a Turing GPU: bf16 falls back under "auto"
    monkeypatch.setattr(dispatch, "_device_capability", lambda device: (7, 5))
    x = _input((1, 3, 5, 5), torch.bfloat16)
    gamma, beta = torch.randn(1, 3), torch.randn(1, 3)
    with pytest.raises(dispatch.KernelUnsupportedError, match="bf16 tensor-core dots need sm_80"):
        lanit_kernels.adain(x, gamma, beta, impl="triton")
    assert torch.equal(lanit_kernels.adain(x, gamma, beta, impl="auto"), reference.adain_ref(x, gamma, beta))
    lanit_kernels.adain(x.half(), gamma, beta, impl="triton")  # ... while fp16 still runs
    assert launch_counter["adain"] == 1


def test_recorded_packed_weights_outlive_the_packing_cache(tiny_config, launch_counter):
    """What a CUDA graph captures must stay allocated: the recorder holds every packed weight a
    launch read, even after the bounded cache dropped its entries."""
    gen = _generator(tiny_config)
    x, style = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, tiny_config.style_dim)
    with torch.no_grad(), dispatch.record_packed_weights() as kept:
        with dispatch.record_packed_weights() as inner:  # nested (another thread capturing)
            lanit_kernels.adain_conv2d(torch.randn(1, 2, 3, 3), torch.zeros(1, 2),
                                       torch.zeros(1, 2), torch.randn(3, 2, 3, 3), impl="triton")
        gen(x, style, impl="triton")
    assert len(inner) == 1
    assert len(kept) == launch_counter["conv"] > 1
    assert not triton_conv._PACK_RECORDERS  # the recorder is gone after the block
    triton_conv._PACKED.clear()
    convs = [m for m in gen.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert any(torch.equal(kept[1], triton_conv._pack(conv.weight, torch.float32, False))
               for conv in convs)


def test_unsupported_dtype_falls_back_or_raises():
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    gamma, beta = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(dispatch.KernelUnsupportedError, match="dtype"):
        lanit_kernels.adain_conv2d(x, gamma, beta, weight, impl="triton")
    out = lanit_kernels.adain_conv2d(x, gamma, beta, weight, impl="auto")
    assert torch.equal(out, reference.adain_conv2d_ref(x, gamma, beta, weight))


@pytest.mark.parametrize("impl", ["auto", "ref", "triton"])
def test_bad_shapes_raise_value_errors_for_every_impl(impl):
    x, gamma, beta = _adain_args()
    with pytest.raises(ValueError, match="gamma"):
        lanit_kernels.adain(x, gamma[:, :2], beta, impl=impl)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        lanit_kernels.adain(x[0], gamma, beta, impl=impl)
    with pytest.raises(ValueError, match="weight"):
        lanit_kernels.adain_conv2d(x, gamma, beta, torch.randn(4, 2, 3, 3), impl=impl)
    with pytest.raises(ValueError, match="odd"):
        lanit_kernels.adain_conv2d(x, gamma, beta, torch.randn(4, 3, 2, 2), impl=impl)
    with pytest.raises(ValueError, match="bias"):
        lanit_kernels.adain_conv2d(x, gamma, beta, torch.randn(4, 3, 3, 3), torch.randn(3), impl=impl)
    with pytest.raises(ValueError, match="style"):
        lanit_kernels.modconv2d(x, torch.randn(4, 3, 3, 3), torch.randn(1, 4), impl=impl)


def test_unknown_impl_is_rejected():
    x, gamma, beta = _adain_args()
    with pytest.raises(ValueError, match="impl"):
        lanit_kernels.adain(x, gamma, beta, impl="cuda")


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    dispatch._triton_modules.cache_clear()
    try:
        x, gamma, beta = _adain_args()
        with pytest.raises(ImportError, match=r"lanit-rt\[triton\]"):
            lanit_kernels.adain(x, gamma, beta, impl="triton")
        assert not dispatch.triton_available()
        assert torch.equal(lanit_kernels.adain(x, gamma, beta, impl="auto"), reference.adain_ref(x, gamma, beta))
    finally:
        monkeypatch.undo()
        dispatch._triton_modules.cache_clear()
    assert dispatch.triton_available()


# --------------------------------------------------------------------------------------------
# Generator integration
# --------------------------------------------------------------------------------------------

def _generator(config):
    from lanit_rt.networks import Generator

    gen = Generator(config).eval()
    with torch.no_grad():  # non-trivial IN affines so that gamma = weight - 1 is exercised
        for module in gen.modules():
            if isinstance(module, nn.InstanceNorm2d):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    return gen


def test_resblk_ref_path_is_the_modules_bit_for_bit(tiny_config):
    from lanit_rt.networks import LEAKY_SLOPE, ResBlk

    block = _generator(tiny_config).encode[0]
    assert isinstance(block, ResBlk) and block.normalize
    x = torch.randn(2, block.conv1.in_channels, 16, 16)
    h = block.conv1(F.leaky_relu(block.norm1(x), LEAKY_SLOPE))
    h = block.conv2(F.leaky_relu(block.norm2(F.avg_pool2d(h, 2)), LEAKY_SLOPE))
    expected = (block._shortcut(x) + h) / 2**0.5
    assert torch.equal(block(x), expected)
    assert torch.equal(block(x, impl="ref"), expected)


def test_generator_triton_matches_ref(tiny_config, launch_counter):
    gen = _generator(tiny_config)
    x, style = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, tiny_config.style_dim)
    with torch.no_grad():
        expected = gen(x, style)
        out = gen(x, style, impl="triton")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # Every IN/AdaIN + LReLU + conv of the generator went through the fused conv: 2 per ResBlk and
    # AdainResBlk, plus to_rgb.
    assert launch_counter["conv"] == 2 * (len(gen.encode) + len(gen.decode)) + 1


@pytest.mark.slow
def test_generator_triton_fp16_channels_last_matches_ref(tiny_config):
    gen = _generator(tiny_config).half()
    x = _layout((torch.rand(1, 3, 32, 32) * 2 - 1).half(), True)
    style = torch.randn(1, tiny_config.style_dim).half()
    with torch.no_grad():
        expected = gen(x, style)
        out = gen(x, style, impl="triton")
    _assert_close(out, expected, (2e-2, 2e-2))


def test_generator_auto_impl_trains_on_cpu(tiny_config):
    gen = _generator(tiny_config).train()
    x, style = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, tiny_config.style_dim)
    out = gen(x, style, impl="auto")
    torch.testing.assert_close(out, gen(x, style), rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    norm = gen.encode[0].norm1
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert gen.style_to_adain.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# GPU code generation (no GPU needed) and GPU runs (skipped without one)
# --------------------------------------------------------------------------------------------

# benchmarks/gpu.sh at 256 px, batch 1 and 32, fp16 and bf16, generator + two fused convs: per dtype
# 5 convs (3x3 with 64 / 128 output tiles, the same with the x2 upsample phases, the 1x1 to_rgb),
# the split and the single-pass statistics kernels, plus 2 fp32-only chunk merges: 16 compiles.
GPU_SH_VARIANTS = 16


def _aot(*args: str, timeout: int = 600) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "lanit_kernels.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_gpu_sh_needs_a_small_stated_set_of_kernel_variants():
    listed = _aot("--list")
    assert listed["variant_count"] == GPU_SH_VARIANTS
    kernels = [v["kernel"] for v in listed["variants"]]
    assert kernels.count("_conv_kernel") == 10
    # The generator's 13 distinct conv shapes at 256 px (the fused-op rows repeat two of them), at
    # both batch sizes.
    layers = {layer for v in listed["variants"] if v["kernel"] == "_conv_kernel" for layer in v["layers"]}
    assert len(layers) == 2 * 13
    assert {"b1 64x256x256->64 k3", "b1 128x128x128->64 k3 up", "b32 64x256x256->3 k1"} <= layers


@pytest.mark.slow
def test_gpu_sh_kernels_compile_for_hopper_without_spills():
    """The interpreter never checks what only the GPU compiler does (tl.dot tile shapes and dtypes,
    registers, shared memory): compile the bf16 half of gpu.sh's variants for sm_90 ahead of time,
    in a fresh process because under TRITON_INTERPRET=1 @triton.jit yields interpreter-only
    functions. fp16 compiles to the same register and shared-memory figures (aot's full run)."""
    result = _aot("--arch", "90", "--dtypes", "bf16")
    assert result["variant_count"] == (GPU_SH_VARIANTS + 2) // 2
    assert result["max_spill_bytes"] == 0
    for variant in result["variants"]:
        assert variant["spill_stores"] == variant["spill_loads"] == 0, variant
        assert variant["registers"] <= 255 and variant["shared"] <= 227 * 1024  # H100 per block
        if variant["kernel"] == "_conv_kernel":
            assert variant["tensor_cores"], variant  # MMA instructions, not a scalar FMA loop
            assert variant["ptx_lines"] < 8000  # the tap loop is not unrolled (was ~30k lines)


@pytest.mark.slow
def test_blackwell_targets_are_assembled_with_tritons_newer_ptxas():
    """Triton writes sm_100+ PTX in a version only its ptxas-blackwell reads."""
    result = _aot("--arch", "100", "--dtypes", "bf16", "--ops", "adain_conv3x3", "--batches", "1")
    convs = [v for v in result["variants"] if v["kernel"] == "_conv_kernel"]
    assert convs and all(v["target"].startswith("sm_100") and v["registers"] > 0 for v in convs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernels_match_ref():
    """Compiled kernels on the GPU vs the references, every op / dtype / layout and the generator.
    A fresh process: under TRITON_INTERPRET=1 the kernels would be interpreted on the host."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "lanit_kernels.selfcheck"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["auto_launches"] == result["auto_calls"]  # impl="auto" picked Triton on CUDA
    # fp32 convs run in TF32 on both sides by default (torch.backends.cudnn.allow_tf32).
    rel = {"fp32": 1e-2 if result["tf32"] else 1e-4, "fp16": 1e-2, "bf16": 5e-2}
    for record in result["records"]:
        dtype = next(d for d in rel if d in record["check"])
        bound = rel[dtype] * max(1.0, record["max_ref"])
        assert record["max_err"] <= bound, record
