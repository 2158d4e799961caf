"""LANIT's loss terms as pure functions of tensors (no networks, no state).

Shapes: logits and labels are [N, D] (D = number of domain texts); labels are multi-hot {0, 1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the active entries of each row, then over rows. values, mask: [N, D]."""
    per_row = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_row.mean()


def adversarial_loss(logits: torch.Tensor, active: torch.Tensor, real: bool,
                     average: str = "pairs") -> torch.Tensor:
    """Non-saturating BCE on the discriminator heads of each sample's active domains.

    logits [N, D] (one real/fake logit per domain head), active [N, D] multi-hot.
    average "pairs" (released LANIT code): the mean over all active (sample, domain) pairs, so a
    sample with three active domains weighs three times one with one; "samples": the mean over
    each sample's active domains, then over samples.
    """
    target = torch.full_like(logits, 1.0 if real else 0.0)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if average == "pairs":
        return (bce * active).sum() / active.sum().clamp(min=1)
    if average == "samples":
        return masked_mean(bce, active)
    raise ValueError(f"average must be 'pairs' or 'samples', got {average!r}")


def r1_penalty(logits: torch.Tensor, active: torch.Tensor, images: torch.Tensor,
               score: str = "sum") -> torch.Tensor:
    """R1: 0.5 * mean_n ||d score / d x_n||^2 on real images x [N, 3, H, W] (which require grad).

    score "sum" (released LANIT code): the sum of each sample's active logits; "mean": their mean.
    """
    if score == "sum":
        per_sample = (logits * active).sum(dim=1)
    elif score == "mean":
        per_sample = (logits * active).sum(dim=1) / active.sum(dim=1).clamp(min=1)
    else:
        raise ValueError(f"score must be 'sum' or 'mean', got {score!r}")
    (grad,) = torch.autograd.grad(per_sample.sum(), images, create_graph=True)
    return 0.5 * grad.pow(2).flatten(1).sum(dim=1).mean()


def lazy_r1_weight(step: int, weight: float, every: int) -> float:
    """R1's weight at `step` when it is computed only every `every` steps (StyleGAN2's lazy
    regularisation): `weight * every` on those steps, so its average pull is unchanged, else 0."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    return weight * every if step % every == 0 else 0.0


def style_reconstruction_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (predicted - target).abs().mean()


def diversity_loss(fake_a: torch.Tensor, fake_b: torch.Tensor) -> torch.Tensor:
    """Mean L1 between two translations of the same source with different styles (maximised)."""
    return (fake_a - fake_b).abs().mean()


def cycle_loss(reconstructed: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return (reconstructed - source).abs().mean()


def identity_loss(own_domain: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """CycleGAN's identity term, L1: a source translated to its own domain(s) is left as it is."""
    return (own_domain - source).abs().mean()


def diversity_weight(step: int, base: float, decay_steps: int) -> float:
    """The diversity weight decays linearly from `base` to 0 over `decay_steps`."""
    if decay_steps <= 0:
        return 0.0
    return base * max(0.0, 1.0 - step / decay_steps)


def ema_beta(step: int, beta: float) -> float:
    """EMA coefficient with a warm-up, so early averages are not dominated by random init:
    min(beta, (1 + step) / (10 + step))."""
    return min(beta, (1.0 + step) / (10.0 + step))


def ablate_targets(targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove one active domain from each target, at random.

    targets [N, D] multi-hot with at least one active domain per row. Returns (ablated [N, D],
    removed [N] long). Where removing the domain would leave no active domain, the ablated target is
    another domain chosen at random, so it never contains the removed one. Vectorised: no loop over
    samples.
    """
    n, d = targets.shape
    if d < 2:
        raise ValueError("ablation needs at least 2 domains")
    noise = torch.rand(n, d, generator=gen).to(targets.device)
    removed = torch.where(targets > 0, noise, torch.full_like(noise, -1.0)).argmax(dim=1)  # [N]
    ablated = targets.clone()
    ablated[torch.arange(n, device=targets.device), removed] = 0
    empty = ablated.sum(dim=1) == 0
    if bool(empty.any()):
        other_noise = torch.rand(n, d, generator=gen).to(targets.device)
        other_noise[torch.arange(n, device=targets.device), removed] = -1.0
        replacement = F.one_hot(other_noise.argmax(dim=1), d).to(targets.dtype)
        ablated = torch.where(empty[:, None], replacement, ablated)
    return ablated, removed


def domain_regularization_loss(scores: torch.Tensor, targets: torch.Tensor,
                               ablated_scores: torch.Tensor, removed: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """LANIT's domain-regularisation loss with a real ablated target.

    scores [N, D]: `cos(f(G(x, s_y)), t_k) - cos(f(G(x, s_y)), t_base)` for the translation to the
    target y [N, D]; ablated_scores [N, D]: the same for the translation to the ablated target (y
    with domain `removed[n]` taken out). The translation must score high exactly on its target
    domains (BCE against y), and the ablated translation must score low on the removed domain.
    `scale` turns cosine differences into logits (the labeler's logit scale).
    """
    present = F.binary_cross_entropy_with_logits(scale * scores, targets.float())
    removed_logit = scale * ablated_scores.gather(1, removed[:, None]).squeeze(1)
    absent = F.binary_cross_entropy_with_logits(removed_logit, torch.zeros_like(removed_logit))
    return present + absent


# sys.float_info.epsilon, the released code's guard inside the log
LOG_EPS = 2.220446049250313e-16


def removed_domain_loss(cosines: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The released LANIT code's domain-regularisation loss: mean_n -log(relu(c[n, k_n]) + eps).

    cosines [N, D]: cos(f(G(x, s_y)), t_k), the raw VL similarity of each translation to each
    domain text (no base-prompt offset); removed [N] long: one active target domain k_n per sample
    (ablate_targets). The translation must look like that domain. The released code's second term
    (the ablated image must not) has a label that is always 0 and so adds nothing; it is left out.
    """
    picked = cosines.gather(1, removed[:, None]).squeeze(1)  # [N]
    return -torch.log(F.relu(picked) + LOG_EPS).mean()
