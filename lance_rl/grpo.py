"""The flow-GRPO maths as pure tensor functions: group advantages, the clipped policy loss, the Gaussian KL.

Everything here is testable without a model, Ray or a GPU (verl's `core_algos.py` is the model for this file).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor  # [B] clipped advantages; 0 where the sample has no reward or its group no spread
    valid: torch.Tensor  # [B] bool: the sample has a reward (None / NaN rewards are left out of everything)
    zero_std: torch.Tensor  # [B] bool: the sample's group has no spread among its rewarded samples
    group_mean: torch.Tensor  # [B] mean of the rewarded samples of the sample's group
    std: torch.Tensor  # [B] the std each advantage was divided by

    def trained(self, skip_zero_std: bool = True) -> torch.Tensor:
        """[B] bool: the samples whose terms enter the loss (rewarded, and in a group with spread when skipping)."""
        return self.valid & ~self.zero_std if skip_zero_std else self.valid


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, global_std: bool = True, clip: float = 5.0, eps: float = 1e-4
) -> Advantages:
    """Per-prompt advantages: (r - mean of its group) / (std + eps), std over the group or over the whole batch
    (Flow-GRPO's `global_std`, its default in most recipes), then clipped to [-clip, clip].

    rewards [B] floats with NaN where a sample has no reward (None: not applicable, or failed under
    `on_failure: none`): such a sample is left out of its group's mean, of the std and of the loss, and its
    group-mates are normalised among themselves. groups [B] integer group ids (one per prompt). A group whose rewarded
    samples are all equal (exactly: max == min) has zero advantage and is flagged in `zero_std`.
    """
    rewards = rewards.double()  # the statistics in float64, so a constant group has exactly zero spread
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    ids, inverse = torch.unique(groups, return_inverse=True)
    k = len(ids)
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, valid.double())
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, r) / count.clamp(min=1)
    centred = torch.where(valid, r - mean[inverse], torch.zeros_like(r))
    var = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, centred**2) / count.clamp(min=1)
    high = torch.full((k,), -torch.inf, dtype=torch.float64).scatter_reduce_(
        0, inverse, torch.where(valid, r, torch.full_like(r, -torch.inf)), "amax")  # fmt: skip
    low = torch.full((k,), torch.inf, dtype=torch.float64).scatter_reduce_(
        0, inverse, torch.where(valid, r, torch.full_like(r, torch.inf)), "amin")  # fmt: skip
    zero = (high <= low)[inverse]  # also true for a group with one rewarded sample or none
    if global_std:
        present = r[valid]
        std = (present.std(unbiased=False) if len(present) else torch.zeros((), dtype=torch.float64)).expand_as(r)
    else:
        std = var.sqrt()[inverse]
    values = (centred / (std + eps)).clamp(-clip, clip)
    values = torch.where(zero | ~valid, torch.zeros_like(values), values)
    return Advantages(values.float(), valid, zero, mean[inverse].float(), std.float())


@dataclass
class PolicyLossOutput:
    per_sample: torch.Tensor  # [B] max(-A r, -A clip(r)): the caller sums the trained ones and divides by its count
    ratio: torch.Tensor  # [B] detached
    clipped: torch.Tensor  # [B] bool: the ratio lay outside the clip range
    log_ratio: torch.Tensor  # [B] detached


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 1e-4,
    clip_high: float | None = None,
) -> PolicyLossOutput:
    """PPO's clipped objective on per-step log-probabilities (Flow-GRPO's default clip range is a tiny 1e-4, because
    one denoising step's log-probability moves a lot per update). `clip_high` allows an asymmetric range. Per sample,
    so that samples without a reward can be masked out and micro-batches sum to the one-pass loss."""
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    with torch.no_grad():
        outside = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
    return PolicyLossOutput(torch.maximum(unclipped, clipped), ratio.detach(), outside, log_ratio.detach())


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """|mu - mu_ref|^2 / (2 std^2) averaged over latent elements: [B, N, C] means, std broadcastable -> [B].

    With `std` the transition's std this is the exact KL between the two Gaussian steps. Flow-GRPO divides by the
    SDE's sigma_t instead (without the sqrt(|dt|) factor), which is the exact KL times |dt|: its published beta values
    (0.004-0.04) are in those units (`StepOutput.noise_std`)."""
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.dim())))
