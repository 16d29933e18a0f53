"""3-D mRoPE position ids (Qwen2.5-VL `get_rope_index`) and Lance's modality-aware shift (MaPE), spec 1.6.

Step 1, per sample: text tokens get one running index on all three axes. A visual block starts at
`s = (max position so far) + 1 + (length of the text run before it, <|vision_start|> included)`, and its token
(ti, hi, wi) gets `(s + ti * tokens_per_second, s + hi, s + wi)`: the temporal axis advances 2 per grid step. The
token after a block (its <|vision_end|> marker) continues from the block's maximum + 1.

Step 2, MaPE (only for samples with a `full` or `full_noise` split): ViT tokens (code 4, markers included) move on the
temporal axis so the first one sits at 1000; reference-image tokens (code 3) likewise to 2000; and when the clean source
block (code 2) has as many tokens as the noisy target (code 1), the target copies the source's ids on all three axes, so
the edited output shares exact positions with its source. Text keeps its step-1 ids (text after a shifted ViT block
continues from the unshifted maximum).
"""

from __future__ import annotations

import torch

from .sequence import NOISE, REFERENCE, SOURCE, VIT, SequencePlan

VIT_TEMPORAL_ORIGIN = 1000
REFERENCE_TEMPORAL_ORIGIN = 2000


def rope_index(plan: SequencePlan, tokens_per_second: int = 2) -> torch.Tensor:
    """Qwen2.5-VL 3-D positions of one sample, before MaPE. Returns LongTensor [3, L]."""
    n = len(plan)
    pos = torch.empty(3, n, dtype=torch.long)
    cursor, next_pos = 0, 0
    for placed in plan.blocks:
        text_len = placed.start - cursor
        pos[:, cursor : placed.start] = next_pos + torch.arange(text_len)
        s = next_pos + text_len
        t, h, w = placed.block.grid
        tt = torch.arange(t).view(t, 1, 1).expand(t, h, w) * tokens_per_second
        hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
        ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
        pos[:, placed.start : placed.stop] = s + torch.stack([tt, hh, ww]).reshape(3, -1)
        next_pos = int(pos[:, placed.start : placed.stop].max()) + 1
        cursor = placed.stop
    pos[:, cursor:] = next_pos + torch.arange(n - cursor)
    return pos


def apply_mape(pos: torch.Tensor, modality: torch.Tensor, attn_modes: list[str]) -> torch.Tensor:
    """The modality-aware shift of one sample (returns a new tensor; `pos` is [3, L], `modality` [L])."""
    if not any(m in ("full", "full_noise") for m in attn_modes):
        return pos
    pos = pos.clone()
    for code, origin in ((VIT, VIT_TEMPORAL_ORIGIN), (REFERENCE, REFERENCE_TEMPORAL_ORIGIN)):
        sel = modality == code
        if sel.any():
            first = int(pos[0, sel.nonzero()[0, 0]])
            pos[0, sel] += origin - first
    source, target = modality == SOURCE, modality == NOISE
    if source.any() and int(source.sum()) == int(target.sum()):
        pos[:, target] = pos[:, source]
    return pos


def sample_positions(plan: SequencePlan, tokens_per_second: int = 2, mape: bool = True) -> torch.Tensor:
    """Position ids of one sample as the official training forward and generation compute them ([3, L]).

    Official understanding inference skips MaPE (spec 9.1); pass `mape=False` to reproduce it.
    """
    pos = rope_index(plan, tokens_per_second)
    if mape:
        pos = apply_mape(pos, torch.tensor(plan.modality), plan.attn_modes)
    return pos


def latent_position_ids(grid: tuple[int, int, int], max_latent_size: int = 64) -> torch.Tensor:
    """Row ids into the 3-D sin-cos table for a latent grid, t-major raster: t*M*M + h*M + w (M = max_latent_size).

    As in the release, h or w beyond M alias into the next row (no error); see `PositionEmbedding3D`.
    """
    t, h, w = grid
    tt = torch.arange(t).view(t, 1, 1) * max_latent_size * max_latent_size
    hh = torch.arange(h).view(1, h, 1) * max_latent_size
    ww = torch.arange(w).view(1, 1, w)
    return (tt + hh + ww).reshape(-1)
