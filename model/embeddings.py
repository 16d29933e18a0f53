"""Generation-side embeddings: the timestep embedder and the 3-D sin-cos latent position table (spec 1.7)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (not x1000) -> sinusoid [cos, sin] of width 256 -> Linear -> SiLU -> Linear (keys mlp.0, mlp.2)."""

    frequency_size = 256

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(self.frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class PositionEmbedding3D(nn.Module):
    """The release's frozen 3-D sin-cos table over (t, h, w) latent positions, computed per id instead of stored.

    The official module holds a [frames * M * M, hidden] parameter (`latent_pos_embed.pos_embed`, 260 M numbers for
    the video model) that loaders pop and recompute; we evaluate the same formula (float64, like the release's numpy
    table, then cast) only for the ids a batch uses. Row id = t*M*M + h*M + w. Per-axis widths: hidden//3 rounded down
    to even for t and h, the rest for w; each part is [sin(pos*omega), cos(pos*omega)], omega_k = 10000^(-k/(D/2)).
    """

    def __init__(self, hidden_size: int, max_latent_size: int = 64, max_num_latent_frames: int = 31):
        super().__init__()
        self.hidden_size = hidden_size
        self.max_latent_size = max_latent_size
        self.max_num_latent_frames = max_num_latent_frames
        d = (hidden_size // 3) // 2 * 2
        self.axis_dims = (d, d, hidden_size - 2 * d)

    @property
    def num_rows(self) -> int:
        return self.max_num_latent_frames * self.max_latent_size**2

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m = self.max_latent_size
        ids = position_ids.long()
        axes = (ids // (m * m), (ids // m) % m, ids % m)
        parts = []
        for pos, dim in zip(axes, self.axis_dims):
            omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=ids.device) / (dim / 2.0))
            args = pos.double()[:, None] * omega[None]
            parts += [torch.sin(args), torch.cos(args)]
        return torch.cat(parts, dim=-1).to(dtype)
