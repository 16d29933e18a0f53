"""LanceModel: the unified model (spec 1.2) with its training forward and the pieces the cached sampler calls.

    LanceModel
    ├── language_model   Qwen2MoTForCausalLM (dual-expert decoder, untied lm_head)
    ├── time_embedder    TimestepEmbedder
    ├── vae2llm          Linear(48, D): a latent token into the sequence
    ├── llm2vae          Linear(D, 48): the flow head (velocity)
    ├── latent_pos_embed PositionEmbedding3D (recomputed sin-cos, nothing stored)
    └── vit_model        the Qwen2.5-VL vision tower (frozen)

Flow-matching convention (identical in training and sampling): x_t = (1 - t) x0 + t eps, t = 1 is pure noise, and the
model predicts v = eps - x0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import TokenLayout, cached_attention, packed_attention
from .backbone import KVCache, Qwen2MoTForCausalLM
from .config import LanceConfig
from .embeddings import PositionEmbedding3D, TimestepEmbedder
from .packing import PackedBatch


@dataclass
class ForwardOutput:
    mse: torch.Tensor  # [N_target_tokens, C] per element squared error of the velocity
    ce: torch.Tensor  # [N_answer_tokens] per-token cross-entropy
    hidden: torch.Tensor  # [L, D] final-normed hidden states
    noise: torch.Tensor  # [N_vae_tokens, C] the eps used

    def loss(self, ce_weight: float = 0.25, mse_weight: float = 1.0) -> torch.Tensor:
        """The release's total: token means of each loss (single process), 0.25 CE + 1.0 MSE by default."""
        total = self.hidden.new_zeros(())
        if self.mse.numel():
            total = total + mse_weight * self.mse.mean(-1).mean()
        if self.ce.numel():
            total = total + ce_weight * self.ce.mean()
        return total


class LanceModel(nn.Module):
    def __init__(self, config: LanceConfig, vit_config=None):
        super().__init__()
        self.config = config
        d, c = config.hidden_size, config.latent_channels
        self.language_model = Qwen2MoTForCausalLM(config)
        self.time_embedder = TimestepEmbedder(d)
        self.vae2llm = nn.Linear(c, d)
        self.llm2vae = nn.Linear(d, c)
        self.latent_pos_embed = PositionEmbedding3D(d, config.max_latent_size, config.max_num_latent_frames)
        if vit_config is None and config.vision_config is not None:
            from .vision import vit_config_from_dict

            vit_config = vit_config_from_dict(config.vision_config)
        if vit_config is not None:
            from .vision import build_vit

            self.vit_model = build_vit(vit_config)
        else:
            self.vit_model = None
        # The usable vocabulary (len(tokenizer)); logits beyond it are cut for CE and masked when decoding.
        self.num_text_tokens = config.vocab_size
        self.attn_backend = "sdpa"

    # ------------------------------------------------------------------ embeddings
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_latents(self, x_t: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """A VAE token's input: vae2llm(x_t) + time_embedder(t) + latent_pos_embed(position). x_t [N, C], t [N]."""
        dtype = self.vae2llm.weight.dtype
        return self.vae2llm(x_t.to(dtype)) + self.time_embedder(t) + self.latent_pos_embed(position_ids, dtype)

    @torch.no_grad()
    def encode_vit(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        if self.vit_model is None:
            raise ValueError("this model was built without a vision tower (vision_config is None)")
        return self.vit_model(patches.to(self.vae2llm.weight.dtype), grid_thw)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head over the usable vocabulary only (ids >= len(tokenizer) can never be produced)."""
        return self.language_model.lm_head(hidden)[..., : self.num_text_tokens]

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden)

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: PackedBatch, noise: torch.Tensor | None = None) -> ForwardOutput:
        """The release's training forward (spec 1.11) on one packed batch.

        Returns the per-element flow-matching MSE on noisy target tokens (target eps - x0) and the per-token CE on
        answer tokens; `noise` [N_vae_tokens, C] fixes eps (drawn with torch.randn otherwise).
        """
        n = len(batch)
        device = batch.input_ids.device

        # 1. text tokens through embed_tokens; visual positions are overwritten below.
        h = self.embed_text(batch.input_ids)

        # 2. ViT tokens (frozen, no grad).
        if batch.vit_index.numel():
            h = h.index_copy(0, batch.vit_index, self.encode_vit(batch.vit_patches, batch.vit_grid_thw).to(h.dtype))

        # 3. VAE tokens: noise the clean latents to each token's t.
        # The flow target and the noising in fp32 whatever the weights' dtype, so every strategy and precision trains
        # toward the same target; only the model's input is cast.
        x0 = batch.vae_latents.float().reshape(-1, self.config.latent_channels)
        if noise is None:
            noise = torch.randn_like(x0)
        noise = noise.float()
        t = batch.vae_timesteps.float()
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
        if batch.vae_index.numel():
            h = h.index_copy(0, batch.vae_index, self.embed_latents(x_t, t, batch.vae_position_ids).to(h.dtype))

        # 4. One joint pass; latent tokens go to the generation expert.
        gen_mask = torch.zeros(n, dtype=torch.bool, device=device)
        gen_mask[batch.vae_index] = True
        layout = TokenLayout.from_splits(batch.sample_lens, batch.split_lens, batch.attn_modes, device=device)
        if self.attn_backend == "sdpa" and len(batch.sample_lens) > 1:
            hidden = self._forward_rows(h, batch, gen_mask)
        else:
            attn_fn = packed_attention(layout, self.attn_backend)
            hidden = self.language_model.model(h[None], batch.position_ids[:, None], gen_mask[None], attn_fn)[0]

        # 5. Losses, per element / per token; reductions belong to the trainer.
        target_rows = batch.vae_index[batch.mse_mask]
        v_pred = self.velocity(hidden[target_rows])
        mse = (v_pred.float() - (noise - x0)[batch.mse_mask].float()) ** 2
        labels = torch.where(batch.ce_labels < self.num_text_tokens, batch.ce_labels, -100)
        logits = self.logits(hidden[batch.ce_index]).float()
        ce = F.cross_entropy(logits, labels, reduction="none") if labels.numel() else logits.new_zeros(0)
        return ForwardOutput(mse=mse, ce=ce, hidden=hidden, noise=noise)

    def _forward_rows(self, h, batch: PackedBatch, gen_mask) -> torch.Tensor:
        """The packed pass with one sample per batch row (padded to the longest), so a dense mask costs
        sum(L_i^2) instead of (sum L_i)^2. Same result as the packed pass: samples never see each other anyway."""
        lens = batch.sample_lens
        b, longest, device = len(lens), max(lens), h.device
        mask = torch.zeros(b, 1, longest, longest, dtype=torch.bool, device=device)
        splits = iter(zip(batch.split_lens, batch.attn_modes))
        for i, n in enumerate(lens):
            split_lens, modes = [], []
            while sum(split_lens) < n:
                length, mode = next(splits)
                split_lens.append(length)
                modes.append(mode)
            mask[i, 0, :n, :n] = TokenLayout.from_splits([n], split_lens, modes, device=device).dense_mask()
            mask[i, 0, n:, n:] = torch.eye(longest - n, dtype=torch.bool, device=device)  # padding sees itself only
        pad = lambda x: torch.nn.utils.rnn.pad_sequence(x.split(lens), batch_first=True)  # noqa: E731
        pos = torch.stack([pad(p) for p in batch.position_ids])  # [3, B, longest]
        attn_fn = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
        )
        out = self.language_model.model(pad(h), pos, pad(gen_mask), attn_fn)
        return torch.cat([out[i, :n] for i, n in enumerate(lens)])

    # ------------------------------------------------------------------ cached path (prefix encoding, decoding)
    def forward_cached(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        gen_mask: torch.Tensor | None,
        cache: KVCache,
        causal: bool,
        prefix_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one query block h [B, Lq, D] (positions [3, B, Lq]) against `cache` and return its hidden states.

        `causal` is True for text splits and False for visual blocks (bidirectional inside). Whether the block is
        appended to the cache is the cache's choice (`KVCache.frozen()` attends without appending).
        """
        attn_fn = cached_attention(h.shape[1], causal, prefix_valid, self.attn_backend)
        return self.language_model.model(h, position_ids, gen_mask, attn_fn, cache)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config.num_hidden_layers)

    # ------------------------------------------------------------------ bookkeeping
    def reset_buffers(self, device=None) -> None:
        """Recompute non-persistent buffers (rotary frequencies) after building on the meta device."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers(device)

    def parameter_counts(self) -> dict[str, int]:
        """Stored parameters by part, and the number active for one token (one expert + embeddings + heads)."""
        counts = {"understanding_expert": 0, "generation_expert": 0, "embeddings": 0, "generation_heads": 0, "vit": 0}
        for name, p in self.named_parameters():
            if name.startswith("vit_model."):
                counts["vit"] += p.numel()
            elif "embed_tokens" in name or "lm_head" in name:
                counts["embeddings"] += p.numel()
            elif name.startswith("language_model."):
                counts["generation_expert" if "_moe_gen" in name else "understanding_expert"] += p.numel()
            else:
                counts["generation_heads"] += p.numel()
        counts["total"] = sum(counts.values())
        counts["active_per_token"] = counts["understanding_expert"] + counts["embeddings"]
        return counts
