"""Packing: sequence plans plus their media tensors -> one packed batch for the training forward.

Samples are laid back to back in one sequence (the attention rule keeps them apart); every per-token quantity the
forward needs is gathered here once, so `LanceModel.forward` is a straight line of tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .positions import latent_position_ids, sample_positions
from .sequence import NOISE, SequencePlan


@dataclass
class SampleMedia:
    """The tensors behind one plan's visual blocks, in block order.

    vit_patches / vit_grids: one entry per ViT block: patchified pixels [N, C*2*14*14] and the ViT grid
        (T/2, H/14, W/14) as `lance_rl.model.vision.patchify_video` returns them.
    latents: one [t, h, w, C] tensor per VAE block (clean condition blocks and the target; the target's values are
        the clean x0 in training and are ignored where t = 1).
    timesteps: one entry per noise block: a float t in [0, 1] for the whole block, or a [t_lat] tensor with one t per
        latent frame (i2v keeps its first frame clean with t = 0). Condition blocks always get t = 0.
    """

    vit_patches: list[torch.Tensor] = field(default_factory=list)
    vit_grids: list[tuple[int, int, int]] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[float | torch.Tensor] = field(default_factory=list)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [L] token ids, visual tokens as <|video_pad|>
    position_ids: torch.Tensor  # [3, L] mRoPE + MaPE
    sample_lens: list[int]
    split_lens: list[int]
    attn_modes: list[str]
    vit_index: torch.Tensor  # [Nv] sequence positions of ViT tokens
    vit_patches: torch.Tensor | None  # [Np, F]
    vit_grid_thw: torch.Tensor  # [num ViT blocks, 3]
    vae_index: torch.Tensor  # [Nz] sequence positions of VAE latent tokens (conditions and targets)
    vae_latents: torch.Tensor  # [Nz, C] clean latents x0
    vae_timesteps: torch.Tensor  # [Nz] t in [0, 1]; 0 for clean tokens
    vae_position_ids: torch.Tensor  # [Nz] rows of the 3-D sin-cos table
    mse_mask: torch.Tensor  # [Nz] bool: noisy target tokens that enter the flow-matching loss
    ce_index: torch.Tensor  # [Nc] positions whose next token is an answer token
    ce_labels: torch.Tensor  # [Nc]

    def __len__(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> "PackedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


def pack(
    plans: list[SequencePlan],
    media: list[SampleMedia],
    tokens_per_second: int = 2,
    max_latent_size: int = 64,
    mape: bool = True,
    latent_channels: int = 48,
) -> PackedBatch:
    """Concatenate samples into one packed batch (positions are computed per sample, as the release does)."""
    if len(plans) != len(media):
        raise ValueError(f"{len(plans)} plans but {len(media)} media entries")
    ids, positions, sample_lens, split_lens, attn_modes = [], [], [], [], []
    vit_index, vit_patches, vit_grids = [], [], []
    vae_index, latents, timesteps, vae_pos, mse_mask = [], [], [], [], []
    ce_index, ce_labels = [], []
    offset = 0
    for n, (plan, m) in enumerate(zip(plans, media)):
        ids.append(torch.tensor(plan.token_ids))
        positions.append(sample_positions(plan, tokens_per_second, mape=mape))
        sample_lens.append(len(plan))
        split_lens += plan.split_lens
        attn_modes += plan.attn_modes
        vit_blocks = [b for b in plan.blocks if b.block.kind == "vit"]
        vae_blocks = [b for b in plan.blocks if b.block.kind != "vit"]
        noise_blocks = [b for b in vae_blocks if b.block.kind == "noise"]
        _check_counts(n, "ViT patch tensors", len(vit_blocks), len(m.vit_patches))
        _check_counts(n, "ViT grids", len(vit_blocks), len(m.vit_grids))
        _check_counts(n, "latents", len(vae_blocks), len(m.latents))
        _check_counts(n, "timesteps", len(noise_blocks), len(m.timesteps))
        for placed, patches, grid in zip(vit_blocks, m.vit_patches, m.vit_grids):
            t, h, w = grid
            llm_grid = (t, h // 2, w // 2)
            if llm_grid != placed.block.grid or patches.shape[0] != t * h * w:
                raise ValueError(
                    f"sample {n}: ViT grid {tuple(grid)} with {patches.shape[0]} patches does not fit the planned "
                    f"block grid {placed.block.grid} (expected ViT grid (t, 2h, 2w) and t*2h*2w patches)"
                )
            vit_index.append(offset + torch.arange(placed.start, placed.stop))
            vit_patches.append(patches)
            vit_grids.append(torch.tensor(grid))
        noise_iter = iter(m.timesteps)
        for placed, lat in zip(vae_blocks, m.latents):
            grid = placed.block.grid
            if tuple(lat.shape[:3]) != grid:
                raise ValueError(
                    f"sample {n}: latent of shape {tuple(lat.shape)} does not fit the planned block grid {grid} "
                    "(expected [t, h, w, C])"
                )
            count = placed.block.num_tokens
            vae_index.append(offset + torch.arange(placed.start, placed.stop))
            latents.append(lat.reshape(count, -1).float())  # (t h w) raster, channel-last
            vae_pos.append(latent_position_ids(grid, max_latent_size))
            if placed.block.modality == NOISE:
                t = torch.as_tensor(next(noise_iter), dtype=torch.float32)
                t = t.expand(grid[0]) if t.ndim == 0 else t
                if t.shape != (grid[0],):
                    raise ValueError(f"sample {n}: timesteps must be a float or one value per latent frame ({grid[0]})")
                t = t.repeat_interleave(grid[1] * grid[2])
                timesteps.append(t)
                mse_mask.append(t > 0)
            else:
                timesteps.append(torch.zeros(count))
                mse_mask.append(torch.zeros(count, dtype=torch.bool))
        idx, labels = plan.ce_targets()
        ce_index.append(offset + torch.tensor(idx, dtype=torch.long))
        ce_labels.append(torch.tensor(labels, dtype=torch.long))
        offset += len(plan)

    def cat(xs, dtype=torch.long, width=None):
        if xs:
            return torch.cat(xs)
        return torch.zeros((0,) if width is None else (0, width), dtype=dtype)

    return PackedBatch(
        input_ids=torch.cat(ids),
        position_ids=torch.cat(positions, dim=1),
        sample_lens=sample_lens,
        split_lens=split_lens,
        attn_modes=attn_modes,
        vit_index=cat(vit_index),
        vit_patches=torch.cat(vit_patches) if vit_patches else None,
        vit_grid_thw=torch.stack(vit_grids) if vit_grids else torch.zeros(0, 3, dtype=torch.long),
        vae_index=cat(vae_index),
        vae_latents=cat(latents, torch.float32, width=latents[0].shape[-1] if latents else latent_channels),
        vae_timesteps=cat(timesteps, torch.float32),
        vae_position_ids=cat(vae_pos),
        mse_mask=cat(mse_mask, torch.bool),
        ce_index=cat(ce_index),
        ce_labels=cat(ce_labels),
    )


def _check_counts(sample: int, what: str, expected: int, got: int) -> None:
    if expected != got:
        raise ValueError(f"sample {sample}: the plan has {expected} block(s) needing {what}, got {got}")
