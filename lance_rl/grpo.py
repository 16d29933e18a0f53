"""The flow-GRPO maths as pure tensor functions: group advantages, the clipped policy loss, the Gaussian KL.

Everything here is testable without a model, Ray or a GPU (verl's `core_algos.py` is the model for this file).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor  # [B] clipped advantages
    zero_std: torch.Tensor  # [B] bool: the sample's group had no reward spread (its advantage carries no signal)
    group_mean: torch.Tensor  # [B]
    std: torch.Tensor  # [B] the std each advantage was divided by


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, global_std: bool = True, clip: float = 5.0, eps: float = 1e-4
) -> Advantages:
    """Per-prompt advantages: (r - mean of its group) / (std + eps), std over the group or over the whole batch
    (Flow-GRPO's `global_std`, its default in most recipes), then clipped to [-clip, clip].

    rewards [B] floats, groups [B] integer group ids (one per prompt). A group whose rewards are all equal has zero
    advantage everywhere, flagged in `zero_std` so the trainer can skip it and report the fraction.
    """
    rewards = rewards.float()
    ids, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(len(ids)).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(len(ids)).index_add_(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    var = torch.zeros(len(ids)).index_add_(0, inverse, centred**2) / count
    group_std = var.sqrt()[inverse]
    std = rewards.std(unbiased=False).expand_as(rewards) if global_std else group_std
    values = (centred / (std + eps)).clamp(-clip, clip)
    zero = group_std <= 1e-12
    values = torch.where(zero, torch.zeros_like(values), values)
    return Advantages(values, zero, mean[inverse], std)


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar: mean over the batch of max(-A r, -A clip(r))
    ratio: torch.Tensor  # [B] detached
    clip_frac: torch.Tensor  # scalar: share of samples whose ratio was clipped
    approx_kl: torch.Tensor  # scalar: 0.5 * mean((logp - logp_old)^2), Flow-GRPO's diagnostic


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 1e-4,
    clip_high: float | None = None,
) -> PolicyLossOutput:
    """PPO's clipped objective on per-step log-probabilities (Flow-GRPO's default clip range is a tiny 1e-4, because
    one denoising step's log-probability moves a lot per update). `clip_high` allows an asymmetric range."""
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_frac = ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).float().mean()
        approx_kl = 0.5 * (log_ratio.detach() ** 2).mean()
    return PolicyLossOutput(loss, ratio.detach(), clip_frac, approx_kl)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussians of equal std per element, averaged over latent elements: |mu - mu_ref|^2 / (2 std^2).
    [B, N, C] means, std broadcastable -> [B]."""
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.dim())))
