"""The Lance attention rule (spec 1.5) and its backends.

For tokens q, k of a packed sequence:

    allowed(q, k) = same_sample(q, k)
                    and (k <= q  or  (split[q] == split[k] and split[q] is a full/noise split))
                    and not (k is in a noise split other than q's)

so text is causal, ViT and clean VAE blocks are bidirectional inside and visible to everything after them, and a noisy
target block sees everything before it plus itself while no other token sees it.

Backends, all computing the same function:
- "sdpa" (default, CPU and GPU): a dense boolean mask and `F.scaled_dot_product_attention`;
- "flex": torch's flex-attention with a block mask built from the same rule (what the release trains with);
- "flash": flash-attn's varlen kernel for the cached generation path, where every query block is either causal or
  bidirectional against a fully visible prefix (what the release uses for inference). Optional; GPU only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("sdpa", "flex", "flash")


@dataclass
class TokenLayout:
    """Per-token ids the rule needs: sample index, full/noise split index (-1 for causal), noise split index (-1)."""

    document: torch.Tensor
    block: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def from_splits(
        cls, sample_lens: list[int], split_lens: list[int], attn_modes: list[str], device=None
    ) -> "TokenLayout":
        if sum(sample_lens) != sum(split_lens):
            raise ValueError(f"sample_lens sum to {sum(sample_lens)} but split_lens sum to {sum(split_lens)}")
        if len(split_lens) != len(attn_modes):
            raise ValueError(f"{len(split_lens)} split_lens but {len(attn_modes)} attn_modes")
        unknown = set(attn_modes) - {"causal", "full", "full_noise", "noise"}
        if unknown:
            raise ValueError(f"unknown attention mode(s) {sorted(unknown)}")
        lens = torch.tensor(split_lens, device=device)
        split_idx = torch.arange(len(split_lens), device=device)
        is_block = torch.tensor([m != "causal" for m in attn_modes], device=device)
        is_noise = torch.tensor([m == "noise" for m in attn_modes], device=device)
        block = torch.where(is_block, split_idx, -1).repeat_interleave(lens)
        noise = torch.where(is_noise, split_idx, -1).repeat_interleave(lens)
        document = torch.arange(len(sample_lens), device=device).repeat_interleave(torch.tensor(sample_lens, device=device))
        return cls(document, block, noise)

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The rule on broadcastable index tensors (used for the dense mask and as flex's mask_mod)."""
        same_doc = self.document[q] == self.document[k]
        same_block = (self.block[q] == self.block[k]) & (self.block[q] >= 0)
        hidden_noise = (self.noise[k] >= 0) & (self.noise[q] != self.noise[k])
        return same_doc & ((k <= q) | same_block) & ~hidden_noise

    def dense_mask(self) -> torch.Tensor:
        """Boolean [L, L], True where query row may attend to key column."""
        n = self.document.numel()
        idx = torch.arange(n, device=self.document.device)
        return self.allowed(idx[:, None], idx[None, :])


def packed_attention(layout: TokenLayout, backend: str = "sdpa") -> AttnFn:
    """An attention function for one packed sequence (q, k, v: [1, heads, L, head_dim]; k/v may have fewer heads)."""
    if backend == "sdpa":
        mask = layout.dense_mask()[None, None]
        return lambda q, k, v: _sdpa(q, k, v, mask)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = layout.document.numel()

        def mask_mod(b, h, q_idx, kv_idx):
            return layout.allowed(q_idx, kv_idx)

        device = layout.document.device
        block_mask = create_block_mask(mask_mod, 1, None, n, n, device=device)
        # Compiled flex is the fused kernel (GPU); eager flex is a reference implementation, fine for checks on CPU.
        flex = _compiled_flex() if device.type == "cuda" else flex_attention
        return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
    if backend == "flash":
        raise ValueError(
            "the flash backend serves the cached generation path only; the packed training mask needs 'sdpa' or 'flex'"
        )
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def cached_attention(
    query_len: int, causal: bool, prefix_valid: torch.Tensor | None = None, backend: str = "sdpa"
) -> AttnFn:
    """Attention for a query block appended to a KV cache: the prefix is fully visible (except positions marked False
    in `prefix_valid` [B, prefix_len], padding of shorter samples), and inside the block attention is causal or full.

    Keys are laid out [prefix..., block...]; a causal block uses bottom-right alignment (key j visible to query i iff
    j <= prefix_len + i).
    """
    if backend == "flash":
        if prefix_valid is not None and not bool(prefix_valid.all()):
            raise ValueError("the flash backend cannot mask padded prefixes; use 'sdpa'")
        return lambda q, k, v: _flash(q, k, v, causal)
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")

    def attend(q, k, v):
        if not causal and prefix_valid is None:
            # A full block against an unpadded prefix sees everything: no mask, so SDPA picks its fused kernels and
            # the backward saves no [query, key] mask per layer (at 3B t2v that mask alone is 50 MB per row per layer).
            return _sdpa(q, k, v, None)
        kv_len = k.shape[2]
        prefix_len = kv_len - query_len
        qi = torch.arange(query_len, device=q.device)[:, None]
        kj = torch.arange(kv_len, device=q.device)[None, :]
        mask = (kj <= prefix_len + qi) if causal else torch.ones(query_len, kv_len, dtype=torch.bool, device=q.device)
        mask = mask[None, None]
        if prefix_valid is not None:
            valid = torch.cat([prefix_valid, prefix_valid.new_ones(prefix_valid.shape[0], query_len)], dim=1)
            mask = mask & valid[:, None, None, :]
        return _sdpa(q, k, v, mask)

    return attend


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:  # pragma: no cover - GPU machines only
        raise ImportError("attention backend 'flash' needs flash-attn (pip install 'lance-rl[flash]')") from e
    # flash-attn wants [B, L, H, D] in half precision; causal uses bottom-right alignment like the release.
    dtype = q.dtype
    half = torch.bfloat16 if dtype == torch.float32 else dtype
    out = flash_attn_func(*(t.transpose(1, 2).to(half) for t in (q, k, v)), causal=causal)
    return out.transpose(1, 2).to(dtype)
