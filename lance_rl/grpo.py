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


def ratio_norm_log_ratio(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """GRPO-Guard's RatioNorm (its `train_sd3_GRPO_Guard.py`): with s the transition std and delta = mu - mu_old,
    log r~ = (log p - log p_old + mean(delta^2) / (2 s^2)) * s, per sample [B].

    The Gaussian log-ratio of a stored transition x' = mu_old + s eps is mean(eps * delta) / s - mean(delta^2) / (2 s^2):
    its second term biases every ratio below 1, and more so at low noise where s is small. Adding it back and scaling
    by s leaves mean(eps * delta), which is 0 on-policy and has mean 0 off-policy at every step, so clipping acts
    evenly across steps. `mean`s are over latent elements, as the log-probabilities are."""
    s = std.reshape(-1)
    bias = ((mean - old_mean) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * s**2)
    return (log_prob - old_log_prob + bias) * s


@dataclass
class NFTLossOutput:
    per_sample: torch.Tensor  # [B] (r L+ + (1 - r) L-) * scale / beta
    positive: torch.Tensor  # [B] L+ detached
    negative: torch.Tensor  # [B] L- detached


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
    scale: float = 5.0,
) -> NFTLossOutput:
    """DiffusionNFT's negative-aware fine-tuning loss on the forward process (its `train_nft_sd3.py`; paper eq. 8-9).

    x_t = (1 - t) x0 + t eps noises a generated sample x0 [B, N, C] at t [B]; v is the policy's velocity there (with
    gradient) and v_old the old policy's (a constant). The implicit positive and negative policies are
    v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old - beta v; each predicts x0 as x_t - t v, and each
    prediction's squared error is divided by its own (constant) mean absolute error, an adaptive weight. A sample with
    optimality probability r (from its advantage: r = 1/2 + A / (2 adv_clip), clipped to [0, 1]) pulls the positive
    policy toward x0 with weight r and the negative one with 1 - r; `scale` (the advantage clip, 5) and 1/beta follow
    the authors' code. When v == v_old and r == 1 this is the (adaptively weighted) flow-matching loss
    t^2 |v - (eps - x0)|^2 on the policy's own samples."""
    tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
    v_old = v_old.detach()
    dims = tuple(range(1, x0.dim()))

    def weighted_error(v_side: torch.Tensor) -> torch.Tensor:
        error = (x_t - tt * v_side) - x0
        weight = error.detach().abs().double().mean(dim=dims).clamp(min=1e-5).to(error.dtype)
        return (error**2).mean(dim=dims) / weight

    positive = weighted_error(beta * v + (1 - beta) * v_old)
    negative = weighted_error((1 + beta) * v_old - beta * v)
    per_sample = scale * (r * positive + (1 - r) * negative) / beta
    return NFTLossOutput(per_sample, positive.detach(), negative.detach())


def optimality_probability(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """DiffusionNFT's r in [0, 1] from clipped group advantages: 1/2 + A / (2 adv_clip)."""
    return (advantages.clamp(-adv_clip, adv_clip) / (2 * adv_clip) + 0.5).clamp(0, 1)
