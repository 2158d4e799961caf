"""StarGAN v2 networks as LANIT uses them: generator, mapping network, style encoder, discriminator.

Domains are multi-hot. Wherever StarGAN v2 picks one head by a domain index, these networks take
`domain_weights [N, D]` (non-negative, each row with a positive sum) and mix the per-domain heads as
`s = sum_k w_k s_k / sum_k w_k` (lanit_rt.style.mix_styles). The per-domain heads are one wide
Linear, so no Python loop runs over samples or domains.

The generator's AdaIN blocks run through lanit_kernels.adain_conv2d, so `impl="triton"` swaps in the
fused kernels without touching the weights. With any impl other than "ref" the encoder's
IN(affine) + LReLU + conv and the to_rgb IN + LReLU + 1x1 conv go through the same fused op
(gamma = weight - 1, beta = bias); `impl="ref"` runs those nn modules unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import lanit_kernels
from lanit_rt.config import LanitConfig
from lanit_rt.style import mix_styles

LEAKY_SLOPE = 0.2
IN_EPS = 1e-5


def avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """`F.avg_pool2d(x, 2)`, the blocks' downsampling, to the bit.

    Eager on the CPU it runs as strided adds (`_Pool2`), which do ATen's arithmetic in ATen's
    order 2-3x faster than ATen's per-window loops: in training the discriminator's pools took
    5 % of the step. Compiled and exported graphs, other devices, odd sizes and half precisions
    (ATen sums those in fp32 and rounds once) keep the ATen op.
    """
    if (x.dim() != 4 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or x.shape[2] % 2 or x.shape[3] % 2
            or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return F.avg_pool2d(x, 2)
    return _Pool2.apply(x)


def _window_mean(x: torch.Tensor) -> torch.Tensor:
    # ATen's CPU avg_pool2d sums each 2x2 window from zero, row by row, then divides by 4.
    v = x.unflatten(3, (x.shape[3] // 2, 2)).unflatten(2, (x.shape[2] // 2, 2))
    return (((v[:, :, :, 0, :, 0] + v[:, :, :, 0, :, 1]) + v[:, :, :, 1, :, 0]) + v[:, :, :, 1, :, 1]) / 4


def _spread(g: torch.Tensor) -> torch.Tensor:
    # ATen's avg_pool2d_backward: every input of a window gets the window's gradient / 4.
    n, c, h, w = g.shape
    g = (g / 4).unsqueeze(-1).expand(n, c, h, w, 2).reshape(n, c, h, 2 * w)
    return g.unsqueeze(3).expand(n, c, h, 2, 2 * w).reshape(n, c, 2 * h, 2 * w)


class _Pool2(torch.autograd.Function):
    """avg_pool2d(x, 2) whose backward is `_Spread2`, as ATen's is avg_pool2d_backward. The gradient
    keeps a channels_last input's layout, as ATen's does; torch.func transforms work on it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _window_mean(x)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        (x,) = inputs
        ctx.channels_last = x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        spread = _Spread2.apply(grad)
        return spread.contiguous(memory_format=torch.channels_last) if ctx.channels_last else spread


class _Spread2(torch.autograd.Function):
    """avg_pool2d_backward; its own backward is avg_pool2d again (R1 differentiates through it)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: torch.Tensor) -> torch.Tensor:
        return _spread(grad)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _Pool2.apply(grad)


class ResBlk(nn.Module):
    """Pre-activation residual block: [IN(affine)] -> LReLU -> conv3x3 -> [avgpool] -> [IN] -> LReLU -> conv3x3.

    The 1x1 learned shortcut runs before the pool; the sum is scaled by 1/sqrt(2).
    """

    def __init__(self, dim_in: int, dim_out: int, normalize: bool = False, downsample: bool = False):
        super().__init__()
        self.normalize = normalize
        self.downsample = downsample
        self.conv1 = nn.Conv2d(dim_in, dim_in, 3, 1, 1)
        self.conv2 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
        if normalize:
            self.norm1 = nn.InstanceNorm2d(dim_in, affine=True, eps=IN_EPS)
            self.norm2 = nn.InstanceNorm2d(dim_in, affine=True, eps=IN_EPS)
        self.conv1x1 = nn.Conv2d(dim_in, dim_out, 1, 1, 0, bias=False) if dim_in != dim_out else None

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1x1 is not None:
            x = self.conv1x1(x)
        return avg_pool2(x) if self.downsample else x

    def _residual(self, x: torch.Tensor, impl: str = "ref") -> torch.Tensor:
        if self.normalize and impl != "ref":
            # IN(affine) + LReLU + conv is the fused AdaIN conv with gamma = weight - 1, beta = bias.
            h = _norm_leaky_conv(x, self.norm1, self.conv1, impl)
            if self.downsample:
                h = avg_pool2(h)
            return _norm_leaky_conv(h, self.norm2, self.conv2, impl)
        if self.normalize:
            x = self.norm1(x)
        x = self.conv1(F.leaky_relu(x, LEAKY_SLOPE))
        if self.downsample:
            x = avg_pool2(x)
        if self.normalize:
            x = self.norm2(x)
        return self.conv2(F.leaky_relu(x, LEAKY_SLOPE))

    def forward(self, x: torch.Tensor, impl: str = "ref") -> torch.Tensor:
        """`impl="ref"` runs the nn modules as they are; otherwise normalised convs use kernels."""
        return (self._shortcut(x) + self._residual(x, impl)) / math.sqrt(2)


def _norm_leaky_conv(x: torch.Tensor, norm: nn.InstanceNorm2d, conv: nn.Conv2d, impl: str,
                     negative_slope: float = LEAKY_SLOPE) -> torch.Tensor:
    """conv(LReLU(norm(x))) through lanit_kernels.adain_conv2d; x [N, C, H, W], norm affine over C.

    InstanceNorm's affine `weight * x_hat + bias` is AdaIN's `(1 + gamma) * x_hat + beta` with
    gamma = weight - 1 and beta = bias, the same for every sample (expanded to [N, C]).
    """
    n, c = x.shape[:2]
    gamma = (norm.weight - 1.0).unsqueeze(0).expand(n, c)
    beta = norm.bias.unsqueeze(0).expand(n, c)
    return lanit_kernels.adain_conv2d(x, gamma, beta, conv.weight, conv.bias, eps=norm.eps,
                                negative_slope=negative_slope, impl=impl)


class AdainResBlk(nn.Module):
    """AdaIN -> LReLU -> [nearest x2] -> conv3x3 -> AdaIN -> LReLU -> conv3x3, plus a shortcut.

    `gamma, beta` for both AdaINs come from outside (Generator.adain_params), so a precomputed
    per-domain table can feed them directly. The 1x1 shortcut runs before the upsample: a 1x1 conv
    commutes with nearest upsampling, and the low-resolution conv is 4x cheaper.
    """

    def __init__(self, dim_in: int, dim_out: int, upsample: bool = False):
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        self.upsample = upsample
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, 1, 1)
        self.conv1x1 = nn.Conv2d(dim_in, dim_out, 1, 1, 0, bias=False) if dim_in != dim_out else None

    @property
    def adain_channels(self) -> tuple[int, int]:
        return self.dim_in, self.dim_out

    def forward(self, x: torch.Tensor, gammas_betas: tuple[torch.Tensor, ...], impl: str = "ref"):
        gamma1, beta1, gamma2, beta2 = gammas_betas
        h = lanit_kernels.adain_conv2d(x, gamma1, beta1, self.conv1.weight, self.conv1.bias,
                                 upsample=self.upsample, eps=IN_EPS, negative_slope=LEAKY_SLOPE,
                                 impl=impl)
        h = lanit_kernels.adain_conv2d(h, gamma2, beta2, self.conv2.weight, self.conv2.bias,
                                 eps=IN_EPS, negative_slope=LEAKY_SLOPE, impl=impl)
        shortcut = x if self.conv1x1 is None else self.conv1x1(x)
        if self.upsample:
            shortcut = F.interpolate(shortcut, scale_factor=2, mode="nearest")
        return (h + shortcut) / math.sqrt(2)


class Generator(nn.Module):
    """conv3x3 from RGB -> encoder (ResBlks with IN) to 16x16 -> AdaIN decoder -> IN + LReLU + 1x1 conv to RGB.

    forward(x [N, 3, H, W] in [-1, 1], style [N, S]) -> [N, 3, H, W]. The style enters only through
    the AdaIN affine maps, which are all gathered in one Linear: `adain_params(style) -> [N, P]`.
    Because that map is affine, mixing styles with weights that sum to 1 and mixing the resulting
    AdaIN parameters give the same result; exporters bake a [D, P] parameter table.
    """

    def __init__(self, config: LanitConfig):
        super().__init__()
        self.config = config
        dim = config.stem_dim
        self.from_rgb = nn.Conv2d(3, dim, 3, 1, 1)  # StarGAN v2's 3x3 stem (checkpoint format 2)
        encode, decode = [], []
        for _ in range(config.generator_downsamples):
            dim_out = min(dim * 2, config.max_dim)
            encode.append(ResBlk(dim, dim_out, normalize=True, downsample=True))
            decode.insert(0, AdainResBlk(dim_out, dim, upsample=True))
            dim = dim_out
        for _ in range(2):
            encode.append(ResBlk(dim, dim, normalize=True))
            decode.insert(0, AdainResBlk(dim, dim))
        self.encode = nn.ModuleList(encode)
        self.decode = nn.ModuleList(decode)
        out_dim = config.stem_dim
        self.to_rgb = nn.Sequential(
            nn.InstanceNorm2d(out_dim, affine=True, eps=IN_EPS),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(out_dim, 3, 1, 1, 0),
        )
        # One Linear for every AdaIN of the decoder: per block [gamma1, beta1, gamma2, beta2].
        self._adain_sizes = [c for blk in self.decode for c in
                             (blk.dim_in, blk.dim_in, blk.dim_out, blk.dim_out)]
        self.style_to_adain = nn.Linear(config.style_dim, sum(self._adain_sizes))

    @property
    def adain_dim(self) -> int:
        """P, the width of the flat AdaIN parameter vector."""
        return sum(self._adain_sizes)

    def adain_params(self, style: torch.Tensor) -> torch.Tensor:
        """style [N, S] -> flat [gamma1, beta1, gamma2, beta2] of every decoder block, [N, P]."""
        return self.style_to_adain(style)

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None, *,
                adain_params: torch.Tensor | None = None, impl: str = "ref") -> torch.Tensor:
        if (style is None) == (adain_params is None):
            raise ValueError("pass exactly one of `style` [N, S] or `adain_params` [N, P]")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(x.shape)}")
        size = self.config.img_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"expected {size}x{size} images, got {tuple(x.shape[-2:])}")
        params = self.adain_params(style) if adain_params is None else adain_params
        if params.shape != (x.shape[0], self.adain_dim):
            raise ValueError(f"AdaIN params must be [{x.shape[0]}, {self.adain_dim}], "
                             f"got {tuple(params.shape)}")
        return self.render(self.content(x, impl), params, impl)

    def content(self, x: torch.Tensor, impl: str = "ref") -> torch.Tensor:
        """The encoder alone: images [N, 3, H, W] -> content features [N, C, h, w]. No style enters
        before the decoder, so one content pass can be rendered in several styles."""
        h = self.from_rgb(x)
        for block in self.encode:
            h = block(h, impl=impl)
        return h

    def render(self, h: torch.Tensor, adain_params: torch.Tensor, impl: str = "ref") -> torch.Tensor:
        """The decoder alone: content features [N, C, h, w] and AdaIN params [N, P] -> images."""
        chunks = torch.split(adain_params, self._adain_sizes, dim=1)
        for i, block in enumerate(self.decode):
            h = block(h, chunks[4 * i: 4 * i + 4], impl=impl)
        if impl == "ref":
            return self.to_rgb(h)
        norm, act, conv = self.to_rgb
        return _norm_leaky_conv(h, norm, conv, impl, act.negative_slope)


class MappingNetwork(nn.Module):
    """z [N, latent] -> shared 4-layer ReLU MLP -> per-domain 3-layer ReLU MLP + Linear -> style [N, D, S].

    Per-domain heads are evaluated together as grouped matmuls (weights [D, in, out]).
    """

    def __init__(self, config: LanitConfig):
        super().__init__()
        self.config = config
        hidden, d = config.mapping_dim, config.num_domains
        layers: list[nn.Module] = [nn.Linear(config.latent_dim, hidden), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.shared = nn.Sequential(*layers)
        dims = [hidden, hidden, hidden, hidden, config.style_dim]
        self.head_weights = nn.ParameterList()
        self.head_biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per domain
            self.head_weights.append(nn.Parameter(torch.empty(d, fan_in, fan_out).uniform_(-bound, bound)))
            self.head_biases.append(nn.Parameter(torch.empty(d, 1, fan_out).uniform_(-bound, bound)))

    def all_styles(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, latent] -> one style per domain, [N, D, S]."""
        h = self.shared(z).unsqueeze(0).expand(self.config.num_domains, -1, -1)  # [D, N, H]
        last = len(self.head_weights) - 1
        for i, (w, b) in enumerate(zip(self.head_weights, self.head_biases)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = F.relu(h)
        return h.transpose(0, 1)

    def forward(self, z: torch.Tensor, domain_weights: torch.Tensor) -> torch.Tensor:
        """z [N, latent], domain_weights [N, D] -> mixed style [N, S]."""
        return mix_styles(self.all_styles(z), domain_weights)


def _trunk(config: LanitConfig) -> tuple[nn.Sequential, int]:
    """Style encoder / discriminator trunk: conv3x3 -> ResBlks down to 4x4 -> LReLU -> conv4x4 -> LReLU."""
    dim = config.stem_dim
    blocks: list[nn.Module] = [nn.Conv2d(3, dim, 3, 1, 1)]
    for _ in range(int(math.log2(config.img_size)) - 2):
        dim_out = min(dim * 2, config.max_dim)
        blocks.append(ResBlk(dim, dim_out, downsample=True))
        dim = dim_out
    blocks += [nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(dim, dim, 4, 1, 0), nn.LeakyReLU(LEAKY_SLOPE)]
    return nn.Sequential(*blocks), dim


class StyleEncoder(nn.Module):
    """Image [N, 3, H, W] -> trunk -> one Linear(C -> S) head per domain -> style [N, D, S]."""

    def __init__(self, config: LanitConfig):
        super().__init__()
        self.config = config
        self.trunk, dim = _trunk(config)
        self.heads = nn.Linear(dim, config.num_domains * config.style_dim)

    def all_styles(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x).flatten(1)
        return self.heads(h).view(x.shape[0], self.config.num_domains, self.config.style_dim)

    def forward(self, x: torch.Tensor, domain_weights: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W], domain_weights [N, D] -> mixed style [N, S]."""
        return mix_styles(self.all_styles(x), domain_weights)


class Discriminator(nn.Module):
    """Image -> trunk -> 1x1 conv with one real/fake logit per domain, [N, D]."""

    def __init__(self, config: LanitConfig):
        super().__init__()
        self.config = config
        self.trunk, dim = _trunk(config)
        self.head = nn.Conv2d(dim, config.num_domains, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).flatten(1)
