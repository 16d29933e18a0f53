"""The denoising schedule and the one transition every sampler and the RL update share.

Flow convention as the release: x_t = (1 - t) x0 + t eps, t from 1 (noise) to 0 (data), the model predicts
v = eps - x0, so the Euler step is x_next = x_t + (t_next - t) v. `step` serves rollout (draws noise) and training
(scores a stored transition), so both compute the same log-probability by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STEP_KINDS = ("ode", "sde", "cps")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The release's time shift s*t / (1 + (s-1)*t): s > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def sampling_timesteps(num_steps: int, shift: float) -> torch.Tensor:
    """[num_steps + 1] times from 1 to 0: shift(linspace(1, 0, N + 1)); step i goes from t[i] to t[i + 1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return shift_time(torch.linspace(1, 0, num_steps + 1), shift)


# ------------------------------------------------------------------------------------------------ the step
@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x at t_next, [B, N, C]
    log_prob: torch.Tensor  # [B], Gaussian log-density of prev_sample averaged over the moving latent elements
    prev_sample_mean: torch.Tensor  # [B, N, C]
    std_dev_t: torch.Tensor  # [B, 1, 1] per-element std of the transition (0 for a deterministic step)
    noise_std: torch.Tensor  # [B, 1, 1] the step's noise scale as Flow-GRPO reports it: the SDE's sigma_t before the
    # sqrt(|dt|) factor (the transition std for CPS); Flow-GRPO's KL divides by it, so published beta values use it


def step(
    x_t: torch.Tensor,
    v: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    kind: str = "ode",
    noise_level: float = 0.0,
    x_next: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    moving: torch.Tensor | None = None,
) -> StepOutput:
    """One transition from t to t_next, computed in fp32 (bf16 overflows in the SDE mean).

    kind "ode": the release's Euler step. "sde": Flow-GRPO's SDE with sigma_t = noise_level * sqrt(t / (1 - t)) (t = 1
    uses t_next in the denominator) and transition std sigma_t * sqrt(|dt|); with noise_level 0 it is the Euler step
    exactly. "cps": coefficients-preserving
    sampling, std = t_next * sin(noise_level * pi / 2), log-probability without constants (as its authors do).
    With `x_next` given, nothing is drawn and the log-probability of that transition is returned (training); else the
    noise is drawn from `generator` (one per batch row when a list) and the sample is returned (rollout).
    `moving` [N] or [B, N] marks latent tokens that evolve; the others (a clean i2v first frame) are carried over
    unchanged and left out of the log-probability.
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {STEP_KINDS}")
    x, v = x_t.float(), v.float()
    t = _as_rows(t, x)
    t_next = _as_rows(t_next, x)
    dt = t_next - t
    if kind == "ode":
        mean, std = x + dt * v, torch.zeros_like(t)
        sigma = std
    elif kind == "sde":
        sigma = noise_level * torch.sqrt(t / (1 - torch.where(t >= 1, t_next, t)))
        mean = x + dt * (v + sigma**2 / (2 * t) * (x + (1 - t) * v))
        std = sigma * torch.sqrt(-dt)
    else:
        std = t_next * math.sin(noise_level * math.pi / 2)
        x0_hat, x1_hat = x - t * v, x + (1 - t) * v
        mean = x0_hat * (1 - t_next) + x1_hat * torch.sqrt(t_next**2 - std**2)
        sigma = std
    if x_next is None:
        x_next = mean + std * _randn_like(mean, generator) if bool((std > 0).any()) else mean
    x_next = x_next.float()
    if moving is not None:
        keep = ~moving.view(-1 if moving.dim() == 1 else moving.shape[0], moving.shape[-1], 1).expand_as(x)
        x_next = torch.where(keep, x, x_next)
        mean = torch.where(keep, x, mean)
    log_prob = _log_prob(x_next, mean, std, kind, moving)
    return StepOutput(x_next, log_prob, mean, std, sigma)


def _as_rows(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t.reshape(-1, 1, 1) if t.numel() > 1 else t.reshape(1, 1, 1)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device)


def _log_prob(x_next, mean, std, kind: str, moving) -> torch.Tensor:
    if not bool((std > 0).all()):
        return torch.zeros(x_next.shape[0], device=x_next.device)
    sq = (x_next - mean) ** 2
    if kind == "cps":
        per_element = -sq
    else:
        per_element = -sq / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    if moving is None:
        return per_element.mean(dim=(1, 2))
    w = moving.float().view(-1 if moving.dim() == 1 else moving.shape[0], moving.shape[-1], 1).expand_as(per_element)
    return (per_element * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2))
