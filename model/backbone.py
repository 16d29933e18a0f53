"""The Qwen2 mixture-of-transformers decoder of Lance (spec 1.3), with the official parameter names.

Every token-wise weight exists twice: the understanding expert (text and ViT tokens, the Qwen2.5-VL weights) and the
generation expert (VAE latent tokens, names ending in `_moe_gen`). Routing is by token type, not learned. Only the
attention softmax is shared: each expert projects its own tokens to q/k/v, then one joint attention runs over the whole
sample. Per layer: RMSNorm -> q/k/v projections -> per-head RMSNorm on q and k (QK-norm) -> 3-D rotary -> attention ->
o_proj -> residual; RMSNorm -> SwiGLU MLP -> residual. Final norms: `norm` for und tokens, `norm_moe_gen` for gen tokens.

Shapes: hidden states are [B, L, D]; `gen_mask` [B, L] is True at generation-expert tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttnFn
from .config import LanceConfig


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(x: torch.Tensor, gen_mask: torch.Tensor | None, und: Callable, gen: Callable) -> torch.Tensor:
    """Apply `und` to understanding tokens and `gen` to generation tokens of x [B, L, ...]."""
    if gen_mask is None or not bool(gen_mask.any()):
        return und(x)
    if bool(gen_mask.all()):
        return gen(x)
    und_out, gen_out = und(x[~gen_mask]), gen(x[gen_mask])
    # The experts may answer in different dtypes (a trained fp32 norm beside a frozen bf16 one): keep the wider.
    dtype = torch.promote_types(und_out.dtype, gen_out.dtype)
    out = und_out.new_empty(*x.shape[:2], *und_out.shape[1:], dtype=dtype)
    out[~gen_mask] = und_out.to(dtype)
    out[gen_mask] = gen_out.to(dtype)
    return out


class MoTAttention(nn.Module):
    """Per-expert projections and QK-norms around one joint attention (grouped-query, 2 kv heads in the 3B)."""

    def __init__(self, config: LanceConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        kv = self.num_kv_heads * hd
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, d, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, kv, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, kv, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(d, d, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(hd, config.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(hd, config.rms_norm_eps))

    def _project(self, x, gen_mask, name: str, heads: int) -> torch.Tensor:
        proj, proj_gen = getattr(self, f"{name}_proj"), getattr(self, f"{name}_proj_moe_gen")
        out = route(x, gen_mask, proj, proj_gen).unflatten(-1, (heads, self.head_dim))
        if name in ("q", "k"):
            out = route(out, gen_mask, getattr(self, f"{name}_norm"), getattr(self, f"{name}_norm_moe_gen"))
        return out

    def forward(self, x, gen_mask, cos, sin, attn_fn: AttnFn, cache: "LayerCache | None" = None):
        q = self._project(x, gen_mask, "q", self.num_heads)  # [B, L, H, hd]
        k = self._project(x, gen_mask, "k", self.num_kv_heads)
        v = self._project(x, gen_mask, "v", self.num_kv_heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, hd]
        if cache is not None:
            k, v = cache.extend(k, v)
        out = attn_fn(q, k, v).transpose(1, 2).flatten(2)  # [B, L, D]
        return route(out, gen_mask, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    def __init__(self, config: LanceConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = MoTAttention(config)
        self.mlp = SwiGLU(d, config.intermediate_size)
        self.mlp_moe_gen = SwiGLU(d, config.intermediate_size)
        self.input_layernorm = RMSNorm(d, eps)
        self.input_layernorm_moe_gen = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(d, eps)

    def forward(self, h, gen_mask, cos, sin, attn_fn, cache=None):
        x = route(h, gen_mask, self.input_layernorm, self.input_layernorm_moe_gen)
        h = h + self.self_attn(x, gen_mask, cos, sin, attn_fn, cache)
        x = route(h, gen_mask, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return h + route(x, gen_mask, self.mlp, self.mlp_moe_gen)


# ------------------------------------------------------------------------------------------------ rotary
class MultimodalRotaryEmbedding(nn.Module):
    """Qwen2.5-VL mRoPE: frequency i uses the t, h or w position id according to `mrope_section` ([16, 24, 24])."""

    def __init__(self, config: LanceConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.section = config.mrope_section
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exps)

    def reset_buffers(self, device=None) -> None:
        self.inv_freq = self.compute_inv_freq(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, L] -> cos, sin [B, L, head_dim]."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # [3, B, L, hd/2]
        axis = torch.repeat_interleave(torch.arange(3, device=freqs.device), torch.tensor(self.section, device=freqs.device))
        freqs = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)  # [B, L, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, hd], cos/sin [B, L, hd]; standard rotate-half."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ------------------------------------------------------------------------------------------------ KV cache
@dataclass
class LayerCache:
    """Post-norm, post-rotary keys and values of one layer: [B, kv_heads, cached_len, head_dim]."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    update: bool = True

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        if self.update:
            self.k, self.v = k, v
        return k, v


@dataclass
class KVCache:
    """Per-layer key/value cache for prefix encoding and incremental decoding.

    A prefix encoded once can serve a group of G samples: `repeat(G)` broadcasts a one-row cache without copying.
    """

    layers: list[LayerCache] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls([LayerCache() for _ in range(num_layers)])

    def __len__(self) -> int:
        first = self.layers[0] if self.layers else None
        return 0 if first is None or first.k is None else first.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def frozen(self) -> "KVCache":
        """A view that attends to the cached prefix without appending new tokens (the denoising query)."""
        return KVCache([LayerCache(c.k, c.v, update=False) for c in self.layers])

    def repeat(self, group_size: int) -> "KVCache":
        """Each row repeated `group_size` times (row i -> rows i*G .. i*G+G-1); a one-row cache as a view."""
        return KVCache([LayerCache(repeat_rows(c.k, group_size), repeat_rows(c.v, group_size), c.update)
                        for c in self.layers])  # fmt: skip

    def rows(self, index: slice) -> "KVCache":
        """A view of some rows (a micro-batch of a group)."""
        return KVCache([LayerCache(c.k[index], c.v[index], c.update) for c in self.layers])


def repeat_rows(x: torch.Tensor | None, group_size: int, dim: int = 0) -> torch.Tensor | None:
    """Repeat each entry along `dim` `group_size` times: a broadcast view when there is one entry, else a copy."""
    if x is None:
        return None
    if x.shape[dim] == 1:
        return x.expand(*[group_size if d == dim else -1 for d in range(x.dim())])
    return x.repeat_interleave(group_size, dim=dim)


# ------------------------------------------------------------------------------------------------ the decoder
class Qwen2MoTModel(nn.Module):
    """`language_model.model`: shared token embedding, the dual-expert layers, the two final norms, mRoPE."""

    def __init__(self, config: LanceConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MultimodalRotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        gen_mask: torch.Tensor | None,
        attn_fn: AttnFn,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """h [B, L, D] input embeddings, position_ids [3, B, L] -> final-normed hidden states [B, L, D]."""
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self._recompute(layer_cache):
                h = torch.utils.checkpoint.checkpoint(layer, h, gen_mask, cos, sin, attn_fn, layer_cache, use_reentrant=False)
            else:
                h = layer(h, gen_mask, cos, sin, attn_fn, layer_cache)
        return route(h, gen_mask, self.norm, self.norm_moe_gen)


    def _recompute(self, layer_cache: "LayerCache | None") -> bool:
        """Activation checkpointing per layer: when asked and a graph is being built, on the packed training pass and
        on a query block against a frozen cache (the RL update's denoising block: the prefix K/V are inputs to it).
        A block that appends to the cache is never recomputed, since recomputing would append twice."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return False
        return layer_cache is None or not layer_cache.update


class Qwen2MoTForCausalLM(nn.Module):
    """`language_model`: the decoder plus the untied `lm_head`."""

    def __init__(self, config: LanceConfig):
        super().__init__()
        self.model = Qwen2MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def init_moe(self) -> None:
        """Copy every understanding-expert weight into its `_moe_gen` twin (the release does this before loading)."""
        params = dict(self.named_parameters())
        for name, p in params.items():
            if "_moe_gen" in name:
                p.copy_(params[name.replace("_moe_gen", "")])
