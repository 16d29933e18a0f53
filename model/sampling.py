"""Sampling: shifted schedules, the ODE / SDE / CPS step with log-probabilities, text CFG, and the cached generation
and understanding paths. This is the seam the RL loop stands on:

    prefix = encode_prefix(model, tokenizer, requests, cfg)      # every split before the noisy target, once
    v = velocity(model, x_t, t, prefix, cfg)                     # only the target block runs, batched
    out = step(x_t, v, t, t_next, kind, noise_level, x_next)     # draws noise (rollout) or scores x_next (training)

Flow convention as the release: x_t = (1 - t) x0 + t eps, t from 1 (noise) to 0 (data), the model predicts
v = eps - x0, so the Euler step is x_next = x_t + (t_next - t) v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .backbone import KVCache, LayerCache
from .positions import latent_position_ids, sample_positions
from .sequence import CAPTION, SequencePlan, drop_caption, generation_plan, understanding_plan
from .tokenizer import LanceTokenizer

STEP_KINDS = ("ode", "sde", "cps")


# ------------------------------------------------------------------------------------------------ schedules
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

    kind "ode": the release's Euler step. "sde": Flow-GRPO's SDE with std_t = noise_level * sqrt(t / (1 - t)) (t = 1
    uses t_next in the denominator); with noise_level 0 it is the Euler step exactly. "cps": coefficients-preserving
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
    elif kind == "sde":
        std_t = noise_level * torch.sqrt(t / (1 - torch.where(t >= 1, t_next, t)))
        mean = x + dt * (v + std_t**2 / (2 * t) * (x + (1 - t) * v))
        std = std_t * torch.sqrt(-dt)
    else:
        std = t_next * math.sin(noise_level * math.pi / 2)
        x0_hat, x1_hat = x - t * v, x + (1 - t) * v
        mean = x0_hat * (1 - t_next) + x1_hat * torch.sqrt(t_next**2 - std**2)
    if x_next is None:
        x_next = mean + std * _randn_like(mean, generator) if bool((std > 0).any()) else mean
    x_next = x_next.float()
    if moving is not None:
        keep = ~moving.view(-1 if moving.dim() == 1 else moving.shape[0], moving.shape[-1], 1).expand_as(x)
        x_next = torch.where(keep, x, x_next)
        mean = torch.where(keep, x, mean)
    log_prob = _log_prob(x_next, mean, std, kind, moving)
    return StepOutput(x_next, log_prob, mean, std)


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


# ------------------------------------------------------------------------------------------------ CFG
@dataclass
class CFGConfig:
    """Text classifier-free guidance as the release applies it (spec 3.3).

    scale: 1 turns guidance off (one pass per step). interval: guidance applies when interval[0] < t <= interval[1].
    renorm: "global" rescales the guided velocity so its norm over the whole target does not exceed the conditional
    one; "channel" does so per token; "none" does not. uncond_positions: "official" reproduces the release's KV path,
    whose unconditional prefix is cached with the conditional position ids while its query uses compacted ids (spec
    quirk 9.2); "consistent" uses the compacted ids everywhere, as the release's non-KV sampler and its training data
    do. They differ (0.8 max abs on the tiny reference latent); the default reproduces the released inference.
    """

    scale: float = 4.0
    interval: tuple[float, float] = (0.4, 1.0)
    renorm: str = "global"
    renorm_min: float = 0.0
    uncond_positions: str = "official"

    def __post_init__(self):
        if self.renorm not in ("global", "channel", "none"):
            raise ValueError(f"cfg renorm must be 'global', 'channel' or 'none', got {self.renorm!r}")
        if self.uncond_positions not in ("official", "consistent"):
            raise ValueError(f"cfg uncond_positions must be 'official' or 'consistent', got {self.uncond_positions!r}")

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0

    def active(self, t: float) -> bool:
        return self.enabled and self.interval[0] < t <= self.interval[1]


def combine_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg: CFGConfig) -> torch.Tensor:
    """v = v_uncond + s (v_cond - v_uncond), then renormalised toward the conditional norm. Shapes [B, N, C]."""
    v = v_uncond + cfg.scale * (v_cond - v_uncond)
    if cfg.renorm == "none":
        return v
    dims = (1, 2) if cfg.renorm == "global" else (2,)
    scale = v_cond.norm(dim=dims, keepdim=True) / (v.norm(dim=dims, keepdim=True) + 1e-8)
    return v * scale.clamp(min=cfg.renorm_min, max=1.0)


# ------------------------------------------------------------------------------------------------ requests, prefix
@dataclass
class GenerationRequest:
    """One prompt to generate from.

    target_grid: latent grid (t, h, w) of the output; for editing it must equal the source latent's grid.
    source_vit: (patches [N, F], ViT grid (T/2, H/14, W/14)) of the source media, for editing.
    source_latent: [t, h, w, C] clean VAE latent: the edit source, or for i2v the first frame ([1, h, w, C]).
    """

    task: str
    prompt: str
    target_grid: tuple[int, int, int]
    source_vit: tuple[torch.Tensor, tuple[int, int, int]] | None = None
    source_latent: torch.Tensor | None = None


@dataclass
class Prefix:
    """Cached context for a batch of rows (one per prompt, or per sample after `repeat`)."""

    cond: KVCache
    cond_valid: torch.Tensor | None  # [B, L] False at right padding of shorter prefixes
    uncond: KVCache | None
    uncond_valid: torch.Tensor | None
    query_text: torch.Tensor  # [B, Lq, D] embeddings of the target block's tokens (the two markers are used)
    query_pos: torch.Tensor  # [3, B, Lq]
    uncond_query_pos: torch.Tensor | None
    grid: tuple[int, int, int]
    latent_pos: torch.Tensor  # [N] rows of the 3-D sin-cos table
    clean_mask: torch.Tensor | None = None  # [N] tokens held clean at t = 0 (the i2v first frame)
    clean_latents: torch.Tensor | None = None  # [B, N, C]
    plans: list[SequencePlan] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return self.query_text.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.latent_pos.numel()

    @property
    def moving(self) -> torch.Tensor | None:
        return None if self.clean_mask is None else ~self.clean_mask

    def repeat(self, group_size: int) -> "Prefix":
        """Each row repeated `group_size` times (row i -> rows i*G .. i*G+G-1). A one-row prefix is broadcast as a
        view; the prefix is never recomputed."""

        def rep(x, dim=0):
            if x is None:
                return None
            if x.shape[dim] == 1:
                return x.expand(*[group_size if d == dim else -1 for d in range(x.dim())])
            return x.repeat_interleave(group_size, dim=dim)

        def rep_cache(cache):
            if cache is None:
                return None
            return KVCache([LayerCache(rep(c.k), rep(c.v), c.update) for c in cache.layers])

        return replace(
            self,
            cond=rep_cache(self.cond),
            cond_valid=rep(self.cond_valid),
            uncond=rep_cache(self.uncond),
            uncond_valid=rep(self.uncond_valid),
            query_text=rep(self.query_text),
            query_pos=rep(self.query_pos, 1),
            uncond_query_pos=rep(self.uncond_query_pos, 1),
            clean_latents=rep(self.clean_latents),
            plans=[p for p in self.plans for _ in range(group_size)],
        )


def encode_prefix(
    model, tokenizer: LanceTokenizer, requests: list[GenerationRequest], cfg: CFGConfig | None = None, grad: bool = False
) -> Prefix:
    """Build each request's sequence and run every split before the noisy target block once, into a conditional KV
    cache and, with text CFG, an unconditional one (caption removed). Requests must share one target grid.

    `grad=True` keeps the graph (a policy update whose trainable weights shape the prefix, e.g. an edit source block
    seen by a trained generation expert); otherwise the cache is a constant."""
    with torch.set_grad_enabled(grad):
        return _encode_prefix(model, tokenizer, requests, cfg or CFGConfig(scale=1.0))


def _encode_prefix(model, tokenizer, requests, cfg: CFGConfig) -> Prefix:
    grids = {tuple(r.target_grid) for r in requests}
    if len(grids) != 1:
        raise ValueError(f"requests in one batch must share a target grid, got {sorted(grids)}")
    grid = grids.pop()
    rows = [_encode_one(model, tokenizer, r, cfg) for r in requests]
    cond, cond_valid = _stack_caches([r["cond"] for r in rows])
    uncond, uncond_valid = (None, None)
    if cfg.enabled:
        uncond, uncond_valid = _stack_caches([r["uncond"] for r in rows])
    clean_mask, clean_latents = None, None
    if requests[0].task == "i2v":
        per_frame = grid[1] * grid[2]
        clean_mask = torch.zeros(grid[0] * per_frame, dtype=torch.bool, device=_device(model))
        clean_mask[:per_frame] = True
        clean_latents = torch.zeros(len(requests), clean_mask.numel(), model.config.latent_channels, device=_device(model))
        for i, r in enumerate(requests):
            if r.source_latent is None:
                raise ValueError("i2v needs source_latent: the VAE latent of the first frame, [1, h, w, C]")
            clean_latents[i, :per_frame] = r.source_latent.reshape(per_frame, -1).to(clean_latents)
    return Prefix(
        cond=cond,
        cond_valid=cond_valid,
        uncond=uncond,
        uncond_valid=uncond_valid,
        query_text=torch.cat([r["query_text"] for r in rows]),
        query_pos=torch.cat([r["query_pos"] for r in rows], dim=1),
        uncond_query_pos=torch.cat([r["uncond_query_pos"] for r in rows], dim=1) if cfg.enabled else None,
        grid=grid,
        latent_pos=latent_position_ids(grid, model.config.max_latent_size).to(_device(model)),
        clean_mask=clean_mask,
        clean_latents=clean_latents,
        plans=[r["plan"] for r in rows],
    )


def _device(model) -> torch.device:
    return model.vae2llm.weight.device


def _encode_one(model, tokenizer, request: GenerationRequest, cfg: CFGConfig) -> dict:
    device = _device(model)
    source_vit_grid = None
    if request.source_vit is not None:
        t, h, w = request.source_vit[1]
        source_vit_grid = (t, h // 2, w // 2)
    plan = generation_plan(tokenizer, request.task, request.prompt, tuple(request.target_grid), source_vit_grid)
    pos = sample_positions(plan, model.config.tokens_per_second).to(device)
    ids = torch.tensor(plan.token_ids, device=device)
    uncond_plan = drop_caption(plan) if cfg.enabled else None
    uncond_pos = sample_positions(uncond_plan, model.config.tokens_per_second).to(device) if cfg.enabled else None

    cond = model.new_cache()
    uncond = model.new_cache() if cfg.enabled else None
    start, ustart = 0, 0
    for length, mode in zip(plan.split_lens, plan.attn_modes):
        if mode == "noise":
            break
        h, gen_mask = _embed_split(model, request, ids[start : start + length], mode)
        causal = mode == "causal"
        model.forward_cached(h[None], pos[:, None, start : start + length], gen_mask[None], cond, causal)
        is_caption = plan.modality[start] == CAPTION
        if cfg.enabled and not is_caption:
            # The release caches the unconditional prefix with the conditional ids (quirk 9.2, "official").
            upos = pos[:, start : start + length] if cfg.uncond_positions == "official" else uncond_pos[:, ustart : ustart + length]
            model.forward_cached(h[None], upos[:, None], gen_mask[None], uncond, causal)
            ustart += length
        start += length
    length = plan.split_lens[plan.attn_modes.index("noise")]
    out = {
        "plan": plan,
        "cond": cond,
        "uncond": uncond,
        "query_text": model.embed_text(ids[start : start + length])[None],
        "query_pos": pos[:, None, start : start + length],
        "uncond_query_pos": uncond_pos[:, None, ustart : ustart + length] if cfg.enabled else None,
    }
    return out


def _embed_split(model, request: GenerationRequest, ids: torch.Tensor, mode: str):
    """Input embeddings of one prefix split: text, a ViT block, or a clean VAE block (markers stay text tokens)."""
    h = model.embed_text(ids)
    gen_mask = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
    if mode == "full":
        if request.source_vit is None:
            raise ValueError(f"{request.task} needs source_vit (ViT patches and grid of the source media)")
        patches, vit_grid = request.source_vit
        grid = torch.tensor([vit_grid], device=ids.device)
        h[1:-1] = model.encode_vit(patches.to(ids.device), grid).to(h.dtype)
    elif mode == "full_noise":
        if request.source_latent is None:
            raise ValueError(f"{request.task} needs source_latent (the clean VAE latent of the source)")
        lat = request.source_latent.to(h.device)
        grid = tuple(lat.shape[:3])
        n = ids.numel() - 2
        t0 = torch.zeros(n, device=h.device)
        h[1:-1] = model.embed_latents(lat.reshape(n, -1), t0, latent_position_ids(grid, model.config.max_latent_size).to(h.device))
        gen_mask[1:-1] = True
    return h, gen_mask


def _stack_caches(caches: list[KVCache]) -> tuple[KVCache, torch.Tensor | None]:
    """Stack one-row caches into a batch, right-padding shorter ones (masked out through the valid mask)."""
    lengths = [len(c) for c in caches]
    longest = max(lengths)
    if len(caches) == 1:
        return caches[0], None
    layers = []
    for i in range(len(caches[0].layers)):
        ks, vs = [], []
        for c, n in zip(caches, lengths):
            k, v = c.layers[i].k, c.layers[i].v
            pad = longest - n
            ks.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            vs.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
        layers.append(LayerCache(torch.cat(ks), torch.cat(vs)))
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    if all(n == longest for n in lengths):
        valid = None
    return KVCache(layers), (None if valid is None else valid.to(layers[0].k.device))


# ------------------------------------------------------------------------------------------------ velocity
def velocity(
    model, x_t: torch.Tensor, t: float | torch.Tensor, prefix: Prefix, cfg: CFGConfig | None = None
) -> torch.Tensor:
    """The model's velocity for the target tokens x_t [B, N, C] at time t (a float, or [B]), with text CFG when the
    config enables it and t lies in its interval. Only the target block runs, against the cached prefix."""
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
    xs, nexts, log_probs = [], [], []
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
    device = _device(model)
    noise = torch.stack([initial_noise(s, n, model.config.latent_channels, k, device) for s, k in zip(noise_seeds, cond_tokens)])
    generators = [torch.Generator(device).manual_seed(s + 1) for s in seeds]
    return sample(model, prefix, noise, config, generators if config.kind != "ode" else None, progress)


def _condition_tokens(request: GenerationRequest) -> int:
    """VAE tokens of the sample before the target (the edit source), which the release's noise draw covers too."""
    if request.task in ("image_edit", "video_edit") and request.source_latent is not None:
        t, h, w = request.source_latent.shape[:3]
        return t * h * w
    return 0


# ------------------------------------------------------------------------------------------------ understanding
@dataclass
class TextOutput:
    ids: list[int]
    text: str
    first_logits: torch.Tensor  # [V_usable] logits of the first decoding step


def _prefill_understanding(model, tokenizer, task, vit_patches, vit_grid, question, instruction, mape):
    """Encode the x2t context up to (not including) its last token, the "\\n" after "assistant", as the release does;
    returns the cache, that last token id and its position."""
    device = _device(model)
    t, h, w = vit_grid
    plan = understanding_plan(tokenizer, task, (t, h // 2, w // 2), question, None, instruction)
    pos = sample_positions(plan, model.config.tokens_per_second, mape=mape).to(device)
    ids = torch.tensor(plan.token_ids, device=device)
    vit = model.encode_vit(vit_patches.to(device), torch.tensor([vit_grid], device=device))
    cache, start, context = model.new_cache(), 0, len(plan) - 1
    for length, mode in zip(plan.split_lens, plan.attn_modes):
        length = min(length, context - start)
        if length <= 0:
            break
        x = model.embed_text(ids[start : start + length])
        if mode == "full":
            x[1:-1] = vit.to(x.dtype)
        model.forward_cached(x[None], pos[:, None, start : start + length], None, cache, causal=mode == "causal")
        start += length
    return cache, int(ids[-1]), pos[:, -1]


@torch.no_grad()
def generate_text(
    model,
    tokenizer: LanceTokenizer,
    vit_patches: torch.Tensor,
    vit_grid: tuple[int, int, int],
    question: str,
    task: str = "x2t_image",
    instruction: str | None = None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    mape: bool = False,
) -> TextOutput:
    """Answer a question about an image or video with the KV cache: greedy (the release's default) or sampled
    decoding, stopping at <|im_end|>. `mape=False` reproduces the release's understanding inference (spec 9.1)."""
    cache, token, pos = _prefill_understanding(model, tokenizer, task, vit_patches, vit_grid, question, instruction, mape)
    device = pos.device
    out_ids: list[int] = []
    first_logits = None
    for _ in range(max_new_tokens):
        h = model.embed_text(torch.tensor([token], device=device))[None]
        hidden = model.forward_cached(h, pos.view(3, 1, 1), None, cache, causal=True)
        logits = model.logits(hidden[0, -1]).float()
        if first_logits is None:
            first_logits = logits
        token = _pick(logits, do_sample, temperature, top_p, generator)
        if token == tokenizer.im_end_id:
            break
        out_ids.append(token)
        pos = pos + 1
    return TextOutput(out_ids, tokenizer.decode(out_ids), first_logits)


def _pick(logits, do_sample, temperature, top_p, generator) -> int:
    if not do_sample:
        return int(logits.argmax())
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(0) - sorted_p > top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@dataclass
class AnswerScores:
    answers: list[str]
    log_probs: torch.Tensor  # [A] total log-probability of each answer's tokens
    probs: torch.Tensor  # [A] exp(log_probs): the model's probability of each answer as a full continuation
    normalized: torch.Tensor  # [A] softmax over the given answers (e.g. P(yes) among {yes, no})


@torch.no_grad()
def score_answers(
    model,
    tokenizer: LanceTokenizer,
    vit_patches: torch.Tensor,
    vit_grid: tuple[int, int, int],
    question: str,
    answers: list[str],
    task: str = "x2t_image",
    instruction: str | None = None,
    mape: bool = False,
) -> AnswerScores:
    """The probability of each given answer (teacher-forced) after the question: what a self-judge reward needs."""
    if not answers:
        raise ValueError("score_answers needs at least one answer")
    cache, token, pos = _prefill_understanding(model, tokenizer, task, vit_patches, vit_grid, question, instruction, mape)
    device = pos.device
    totals = []
    for answer in answers:
        ans = tokenizer.encode(answer)
        if not ans:
            raise ValueError(f"answer {answer!r} tokenises to nothing")
        ids = torch.tensor([token] + ans[:-1], device=device)
        block_pos = pos.view(3, 1, 1) + torch.arange(len(ans), device=device).view(1, 1, -1)
        hidden = model.forward_cached(model.embed_text(ids)[None], block_pos, None, cache.frozen(), causal=True)
        logp = torch.log_softmax(model.logits(hidden[0]).float(), dim=-1)
        totals.append(logp.gather(1, torch.tensor(ans, device=device)[:, None]).sum())
    log_probs = torch.stack(totals)
    return AnswerScores(list(answers), log_probs, log_probs.exp(), torch.softmax(log_probs, dim=0))
