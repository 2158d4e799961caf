"""PyTorch references: the executable specification of every fused op in this package.

Each function here is differentiable, runs on any device and dtype, and is what the Triton kernels
are tested against. Statistics are always computed in fp32, whatever the storage dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def instance_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) mean and reciprocal std (biased variance, like nn.InstanceNorm2d), in fp32.

    x: [N, C, H, W] -> (mean, rstd), each [N, C] float32.
    """
    x32 = x.float()
    var, mean = torch.var_mean(x32, dim=(2, 3), unbiased=False)
    return mean, torch.rsqrt(var + eps)


def _leaky(x: torch.Tensor, negative_slope: float | None) -> torch.Tensor:
    return x if negative_slope is None else F.leaky_relu(x, negative_slope)


def adain_ref(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-5,
    negative_slope: float | None = 0.2,
) -> torch.Tensor:
    """LeakyReLU((1 + gamma) * instance_norm(x) + beta).

    x: [N, C, H, W] (any float dtype, any memory format); gamma, beta: [N, C].
    The result has x's dtype; normalisation and affine run in fp32.
    """
    mean, rstd = instance_stats(x, eps)
    scale = (1.0 + gamma.float()) * rstd  # [N, C]
    shift = beta.float() - scale * mean
    y = x.float() * scale[:, :, None, None] + shift[:, :, None, None]
    return _leaky(y, negative_slope).to(x.dtype)


def adain_conv2d_ref(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    upsample: bool = False,
    eps: float = 1e-5,
    negative_slope: float | None = 0.2,
) -> torch.Tensor:
    """conv2d(upsample?(adain(x, gamma, beta)), weight, bias, padding=k // 2).

    x: [N, C_in, H, W]; weight: [C_out, C_in, k, k] with k odd; output [N, C_out, H', W'] where
    H' = 2H when `upsample` (nearest) else H.
    """
    h = adain_ref(x, gamma, beta, eps, negative_slope)
    if upsample:
        h = F.interpolate(h, scale_factor=2, mode="nearest")
    return F.conv2d(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype),
                    padding=weight.shape[-1] // 2)


def modconv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    style: torch.Tensor,
    demodulate: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution, batched form (shared weights, activations scaled).

    x: [N, C_in, H, W]; weight: [C_out, C_in, k, k]; style: [N, C_in].
    y[n] = conv2d(x[n] * style[n], weight) * dcoef[n], with
    dcoef[n, o] = rsqrt(sum_{i,kh,kw} (weight[o, i, kh, kw] * style[n, i])^2 + eps) when demodulating.
    Identical to convolving x[n] with the per-sample weight w[o, i] * style[n, i] * dcoef[n, o].
    """
    style32 = style.float()
    y = F.conv2d((x.float() * style32[:, :, None, None]), weight.float(), padding=weight.shape[-1] // 2)
    if demodulate:
        w2 = weight.float().square().sum(dim=(2, 3))  # [C_out, C_in]
        dcoef = torch.rsqrt(style32.square() @ w2.t() + eps)  # [N, C_out]
        y = y * dcoef[:, :, None, None]
    return y.to(x.dtype)
