"""Dispatchers: one public function per op, choosing the reference or the Triton kernel."""

from __future__ import annotations

import torch

from kernels import reference

IMPLS = ("auto", "ref", "triton")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def adain(x, gamma, beta, eps=1e-5, negative_slope=0.2, impl="auto"):
    """LeakyReLU((1 + gamma) * instance_norm(x) + beta); x [N, C, H, W], gamma/beta [N, C]."""
    _check_impl(impl)
    return reference.adain_ref(x, gamma, beta, eps, negative_slope)


def adain_conv2d(x, gamma, beta, weight, bias=None, upsample=False, eps=1e-5, negative_slope=0.2,
                 impl="auto"):
    """conv2d(upsample?(adain(x, gamma, beta)), weight, bias, padding=k // 2)."""
    _check_impl(impl)
    return reference.adain_conv2d_ref(x, gamma, beta, weight, bias, upsample, eps, negative_slope)


def modconv2d(x: torch.Tensor, weight, style, demodulate=True, impl="auto"):
    """Batched StyleGAN2 modulated convolution; x [N, C_in, H, W], style [N, C_in]."""
    _check_impl(impl)
    return reference.modconv2d_ref(x, weight, style, demodulate)
