"""Sampling: the velocity against a cached prefix and the denoising loop. This is the seam the RL loop stands on:

    prefix = encode_prefix(model, tokenizer, requests, cfg)      # model/prefix.py: every split before the target
    v = velocity(model, x_t, t, prefix, cfg)                     # only the target block runs, batched
    out = step(x_t, v, t, t_next, kind, noise_level, x_next)     # model/schedule.py: draws noise or scores x_next

Flow convention as the release: x_t = (1 - t) x0 + t eps, t from 1 (noise) to 0 (data), the model predicts
v = eps - x0, so the Euler step is x_next = x_t + (t_next - t) v.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .guidance import CFGConfig, combine_cfg
from .prefix import GenerationRequest, Prefix, encode_prefix, model_device
from .schedule import sampling_timesteps, step
from .tasks import is_edit
from .tokenizer import LanceTokenizer


def velocity(
    model,
    x_t: torch.Tensor,
    t: float | torch.Tensor,
    prefix: Prefix,
    cfg: CFGConfig | None = None,
    uncond_grad: bool = True,
) -> torch.Tensor:
    """The model's velocity for the target tokens x_t [B, N, C] at time t (a float, or [B]), with text CFG when the
    config enables it and t lies in its interval. Only the target block runs, against the cached prefix.

    `uncond_grad=False` runs the unconditional branch without a graph (Flow-GRPO's update detaches it): the policy
    gradient then flows through the conditional branch only, and the update keeps half the activations."""
    b, n, _ = x_t.shape
    t_rows = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1).expand(b)
    v = _velocity_pass(model, x_t, t_rows, prefix, prefix.cond, prefix.cond_valid, prefix.query_pos)
    if cfg is None or not cfg.enabled:
        return v
    active = torch.tensor([cfg.active(float(x)) for x in t_rows], device=x_t.device)
    if not bool(active.any()):
        return v
    if prefix.uncond is None:
        raise ValueError("CFG is enabled but the prefix was encoded without it; pass the same cfg to encode_prefix")
    with torch.set_grad_enabled(uncond_grad and torch.is_grad_enabled()):
        v_uncond = _velocity_pass(model, x_t, t_rows, prefix, prefix.uncond, prefix.uncond_valid, prefix.uncond_query_pos)
    return torch.where(active.view(-1, 1, 1), combine_cfg(v, v_uncond, cfg), v)


def _velocity_pass(model, x_t, t_rows, prefix: Prefix, cache, valid, query_pos) -> torch.Tensor:
    b, n, c = x_t.shape
    t_tok = t_rows[:, None].expand(b, n)
    x_in = x_t
    if prefix.clean_mask is not None:  # i2v: the first frame stays the clean latent at t = 0
        x_in = torch.where(prefix.clean_mask[None, :, None], prefix.clean_latents, x_t)
        t_tok = torch.where(prefix.clean_mask[None], torch.zeros_like(t_tok), t_tok)
    lat = model.embed_latents(x_in.reshape(b * n, c), t_tok.reshape(-1), prefix.latent_pos.repeat(b))
    h = torch.cat([prefix.query_text[:, :1], lat.view(b, n, -1).to(prefix.query_text.dtype), prefix.query_text[:, -1:]], dim=1)
    gen_mask = torch.zeros(b, n + 2, dtype=torch.bool, device=x_t.device)
    gen_mask[:, 1:-1] = True
    out = model.forward_cached(h, query_pos, gen_mask, cache.frozen(), causal=False, prefix_valid=valid)
    return model.velocity(out[:, 1:-1]).float()


# ------------------------------------------------------------------------------------------------ the sampler
@dataclass
class SamplerConfig:
    """How to denoise. The release samples with the ODE (30 steps, shift 3.5, CFG 4); RL rollouts use the SDE on a
    window of steps. `sde_window` = (first, stop) step indices that are stochastic and recorded; the final step
    (t_next = 0) is never stochastic, since noise injected there stays in the image."""

    num_steps: int = 30
    shift: float = 3.5
    kind: str = "ode"
    noise_level: float = 0.7
    sde_window: tuple[int, int] | None = None
    cfg: CFGConfig = field(default_factory=CFGConfig)
    record_means: bool = False  # also record each recorded step's mean (GRPO-Guard's ratio normalisation needs it)

    def stochastic_steps(self) -> list[int]:
        if self.kind == "ode":
            return []
        first, stop = self.sde_window if self.sde_window is not None else (0, self.num_steps - 1)
        if not 0 <= first < stop <= self.num_steps - 1:
            raise ValueError(
                f"sde_window {(first, stop)} must satisfy 0 <= first < stop <= num_steps - 1 = {self.num_steps - 1} "
                "(at least one step, never the final one)"
            )
        return list(range(first, stop))


@dataclass
class Trajectory:
    latents: torch.Tensor  # [B, N, C] the final sample
    timesteps: torch.Tensor  # [num_steps + 1]
    steps: list[int]  # indices of the stochastic (recorded) steps
    x_t: torch.Tensor  # [B, S, N, C] state entering each recorded step
    x_next: torch.Tensor  # [B, S, N, C] state after it
    log_probs: torch.Tensor  # [B, S]
    means: torch.Tensor | None = None  # [B, S, N, C] the mean of each recorded transition, when asked for


def initial_noise(
    seed: int, num_tokens: int, channels: int = 48, num_condition_tokens: int = 0, device=None
) -> torch.Tensor:
    """The release's initial noise for one sample: randn over all its VAE tokens (condition + target) from a CPU
    generator seeded with `seed`, keeping the target rows (spec 3.4, quirk Q6). [num_tokens, C]."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(num_condition_tokens + num_tokens, channels, generator=g)[num_condition_tokens:].to(device)


@torch.no_grad()
def sample(
    model,
    prefix: Prefix,
    noise: torch.Tensor,
    config: SamplerConfig,
    generators: list[torch.Generator] | None = None,
    progress=None,
) -> Trajectory:
    """Denoise `noise` [B, N, C] from t = 1 to 0 against `prefix`, recording the stochastic steps."""
    timesteps = sampling_timesteps(config.num_steps, config.shift).to(noise.device)
    recorded = config.stochastic_steps()
    x = noise.float()
    if prefix.clean_mask is not None:
        x = torch.where(prefix.clean_mask[None, :, None], prefix.clean_latents, x)
    xs, nexts, log_probs, means = [], [], [], []
    for i in range(config.num_steps):
        t, t_next = timesteps[i], timesteps[i + 1]
        v = velocity(model, x, t, prefix, config.cfg)
        stochastic = i in recorded
        kind = config.kind if stochastic else "ode"
        out = step(x, v, t, t_next, kind, config.noise_level, generator=generators, moving=prefix.moving)
        if stochastic:
            xs.append(x)
            nexts.append(out.prev_sample)
            log_probs.append(out.log_prob)
            if config.record_means:
                means.append(out.prev_sample_mean)
        x = out.prev_sample
        if progress is not None:
            progress(i + 1, config.num_steps)
    b, n, c = x.shape
    empty = x.new_zeros(b, 0, n, c)
    return Trajectory(
        latents=x,
        timesteps=timesteps,
        steps=recorded,
        x_t=torch.stack(xs, 1) if xs else empty,
        x_next=torch.stack(nexts, 1) if nexts else empty,
        log_probs=torch.stack(log_probs, 1) if log_probs else x.new_zeros(b, 0),
        means=torch.stack(means, 1) if means else None,
    )


@torch.no_grad()
def generate(
    model,
    tokenizer: LanceTokenizer,
    requests: list[GenerationRequest],
    config: SamplerConfig,
    seeds: list[int],
    group_size: int = 1,
    progress=None,
    noise_seeds: list[int] | None = None,
) -> Trajectory:
    """Sample `group_size` outputs per request (seeds: one per output, request-major). The prefix of each request is
    encoded once and broadcast over its group. Returns latents [B * G, N, C] (reshape to the grid with `prefix.grid`).

    Output i starts from the noise of `noise_seeds[i]` (default `seeds[i]`) and draws its SDE noise from
    `seeds[i] + 1`; equal noise seeds give a group one starting point with different SDE paths."""
    if len(seeds) != len(requests) * group_size:
        raise ValueError(f"need {len(requests) * group_size} seeds (one per output), got {len(seeds)}")
    noise_seeds = seeds if noise_seeds is None else noise_seeds
    prefix = encode_prefix(model, tokenizer, requests, config.cfg)
    if group_size > 1:
        prefix = prefix.repeat(group_size)
    n = prefix.num_tokens
    cond_tokens = [_condition_tokens(r) for r in requests for _ in range(group_size)]
    device = model_device(model)
    noise = torch.stack([initial_noise(s, n, model.config.latent_channels, k, device) for s, k in zip(noise_seeds, cond_tokens)])
    generators = [torch.Generator(device).manual_seed(s + 1) for s in seeds]
    return sample(model, prefix, noise, config, generators if config.kind != "ode" else None, progress)


def _condition_tokens(request: GenerationRequest) -> int:
    """VAE tokens of the sample before the target (the edit source), which the release's noise draw covers too."""
    if is_edit(request.task) and request.source_latent is not None:
        t, h, w = request.source_latent.shape[:3]
        return t * h * w
    return 0
