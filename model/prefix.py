"""The cached context of a generation request: every split before the noisy target block, encoded once.

    prefix = encode_prefix(model, tokenizer, requests, cfg)      # conditional (and, with CFG, unconditional) KV caches
    prefix = prefix.repeat(group_size)                           # broadcast over a group, never recomputed
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .backbone import KVCache, LayerCache, repeat_rows
from .guidance import CFGConfig
from .positions import latent_position_ids, sample_positions
from .sequence import CAPTION, SequencePlan, drop_caption, generation_plan
from .tokenizer import LanceTokenizer


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

        return replace(
            self,
            cond=self.cond.repeat(group_size),
            cond_valid=repeat_rows(self.cond_valid, group_size),
            uncond=None if self.uncond is None else self.uncond.repeat(group_size),
            uncond_valid=repeat_rows(self.uncond_valid, group_size),
            query_text=repeat_rows(self.query_text, group_size),
            query_pos=repeat_rows(self.query_pos, group_size, dim=1),
            uncond_query_pos=repeat_rows(self.uncond_query_pos, group_size, dim=1),
            clean_latents=repeat_rows(self.clean_latents, group_size),
            plans=[p for p in self.plans for _ in range(group_size)],
        )

    def rows(self, index: slice) -> "Prefix":
        """The prefix of some rows only (a micro-batch of a repeated group), as views."""
        pick = lambda x, dim=0: None if x is None else x.narrow(dim, index.start, index.stop - index.start)  # noqa: E731
        return replace(
            self,
            cond=self.cond.rows(index),
            cond_valid=pick(self.cond_valid),
            uncond=None if self.uncond is None else self.uncond.rows(index),
            uncond_valid=pick(self.uncond_valid),
            query_text=pick(self.query_text),
            query_pos=pick(self.query_pos, 1),
            uncond_query_pos=pick(self.uncond_query_pos, 1),
            clean_latents=pick(self.clean_latents),
            plans=self.plans[index],
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
        clean_mask = torch.zeros(grid[0] * per_frame, dtype=torch.bool, device=model_device(model))
        clean_mask[:per_frame] = True
        clean_latents = torch.zeros(len(requests), clean_mask.numel(), model.config.latent_channels, device=model_device(model))
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
        latent_pos=latent_position_ids(grid, model.config.max_latent_size).to(model_device(model)),
        clean_mask=clean_mask,
        clean_latents=clean_latents,
        plans=[r["plan"] for r in rows],
    )


def model_device(model) -> torch.device:
    return model.vae2llm.weight.device


def _encode_one(model, tokenizer, request: GenerationRequest, cfg: CFGConfig) -> dict:
    device = model_device(model)
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
