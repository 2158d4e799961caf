"""Multi-hot style mixing and per-domain style tables.

LANIT's multi-hot rule: for a target with weights y [D] (multi-hot or any non-negative weights),
`s = sum_k y_k s_k / sum_k y_k`. Everything downstream of s that is affine in s (every AdaIN's Linear)
mixes by the same rule, so tables precomputed per domain serve any multi-hot target exactly.
"""

from __future__ import annotations

from typing import Iterable

import torch


def normalize_domain_weights(domain_weights: torch.Tensor) -> torch.Tensor:
    """Rows of non-negative weights [N, D] -> rows summing to 1. Raises on negative or all-zero rows."""
    if domain_weights.dim() != 2:
        raise ValueError(f"domain weights must be [N, D], got {tuple(domain_weights.shape)}")
    w = domain_weights.float()
    if bool((w < 0).any()):
        raise ValueError("domain weights must be non-negative")
    total = w.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("every target needs at least one active domain (a row of weights summed to 0)")
    return w / total


def mix_styles(styles: torch.Tensor, domain_weights: torch.Tensor) -> torch.Tensor:
    """styles [N, D, S] (per-sample) or [D, S] (a table), domain_weights [N, D] -> [N, S].

    s_n = sum_k w_nk styles_nk / sum_k w_nk, computed in the styles' dtype.
    """
    w = normalize_domain_weights(domain_weights).to(styles.dtype)
    if styles.dim() == 2:
        return w @ styles
    if styles.dim() != 3 or styles.shape[:2] != w.shape:
        raise ValueError(f"styles {tuple(styles.shape)} do not match weights {tuple(w.shape)}")
    return torch.einsum("nd,nds->ns", w, styles)


@torch.no_grad()
def latent_style_table(mapping, num_z: int = 1000, seed: int = 0, batch_size: int = 500,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Mean mapping-network style per domain over `num_z` Gaussian latents: [D, S] float32."""
    device = device or next(mapping.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = None
    for start in range(0, num_z, batch_size):
        n = min(batch_size, num_z - start)
        z = torch.randn(n, mapping.config.latent_dim, generator=gen).to(device)
        batch_sum = mapping.all_styles(z).float().sum(dim=0)  # [D, S]
        total = batch_sum if total is None else total + batch_sum
    return (total / num_z).cpu()


@torch.no_grad()
def reference_style_table(style_encoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Mean style-encoder style per domain over the images labelled with that domain: [D, S] float32.

    `batches` yields (images [N, 3, H, W], labels [N, D] multi-hot). Image n contributes its domain-k
    head output to domain k's mean when labels[n, k] is on. A domain with no image raises.
    """
    device = device or next(style_encoder.parameters()).device
    d, s = style_encoder.config.num_domains, style_encoder.config.style_dim
    sums = torch.zeros(d, s, dtype=torch.float64)
    counts = torch.zeros(d, dtype=torch.float64)
    for images, labels in batches:
        styles = style_encoder.all_styles(images.to(device)).double().cpu()  # [N, D, S]
        on = (labels > 0).double().cpu()  # [N, D]
        sums += torch.einsum("nd,nds->ds", on, styles)
        counts += on.sum(dim=0)
    empty = [style_encoder.config.domains[k] for k in range(d) if counts[k] == 0]
    if empty:
        raise ValueError(f"no labelled image for domains {empty}: cannot build their reference styles")
    return (sums / counts[:, None]).float()
