"""The Qwen2.5-VL vision tower of the released Lance model (spec 1.8), reusing transformers' implementation.

The tower is `transformers`' `Qwen2_5_VisionTransformerPretrainedModel`, not a re-implementation. `VisionTower`
subclasses it, so its parameter names are the official bare names (`patch_embed.proj.weight`,
`blocks.{i}.attn.qkv.weight`, `merger.mlp.0.weight`, ...) and, registered as `vit_model` on the Lance model, the
checkpoint names `vit_model.*`. No key mapping is needed: transformers 5.23 uses exactly the names that the official
`vit.safetensors` stores (390 tensors for the 3B tower). The only other state is the non-persistent rotary buffer
`rotary_pos_emb.inv_freq` (plus its `original_inv_freq` copy), which no checkpoint stores; `reset_buffers`
recomputes it after building on the meta device.

The tower is always frozen: parameters have `requires_grad=False`, `forward` runs under `torch.no_grad()`, and the
module stays in eval mode even when a parent calls `.train()`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import torch
from transformers import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

# Bookkeeping keys of a saved HF config. The official json says `model_type: qwen2_5_vl` (the full VL model's type),
# which would only make transformers warn.
_IGNORED_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path")


def _flash_attn_usable() -> bool:
    # flash-attn kernels are CUDA-only; sdpa computes the same attention everywhere else.
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def vit_config_from_dict(d: dict) -> Qwen2_5_VLVisionConfig:
    """A `Qwen2_5_VLVisionConfig` from the official `Qwen2.5-VL-ViT/config.json` or the plain-dict `vision_config` of
    `llm_config.json`. Extra keys (`in_chans`, `spatial_patch_size`, ...) are kept as attributes. A requested (or
    missing) attention implementation becomes "sdpa" unless flash-attn can actually run; "eager"/"sdpa" are kept."""
    d = {k: v for k, v in d.items() if k not in _IGNORED_KEYS}
    if "in_chans" in d:  # the official vendored config's name for in_channels
        d.setdefault("in_channels", d["in_chans"])
    requested = d.pop("_attn_implementation", None) or d.pop("attn_implementation", None)
    if requested in (None, "flash_attention_2"):
        requested = "flash_attention_2" if _flash_attn_usable() else "sdpa"
    config = Qwen2_5_VLVisionConfig(**d)
    config._attn_implementation = requested
    return config


def load_vit_config(vit_dir: str | Path) -> Qwen2_5_VLVisionConfig:
    """Read `<vit_dir>/config.json` (never the hub)."""
    return vit_config_from_dict(json.loads((Path(vit_dir) / "config.json").read_text()))


class VisionTower(Qwen2_5_VisionTransformerPretrainedModel):
    """The frozen Qwen2.5-VL ViT: flattened patches in, one merged token per 2x2 spatial patch out."""

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """patches `[N, C*2*14*14]` in merge-window-major order (see `patchify_video`); grid_thw `[n_blocks, 3]` of
        `(T/2, H/14, W/14)` per image/video. Returns `[N/4, out_hidden_size]` in (t, h/28, w/28) raster order per
        block: transformers undoes its window permutation itself."""
        grid = torch.as_tensor(grid_thw, dtype=torch.long, device=patches.device).reshape(-1, 3)
        with torch.no_grad():
            return super().forward(patches, grid).pooler_output

    def train(self, mode: bool = True) -> VisionTower:
        # Frozen: stay in eval mode even when the parent Lance model switches to training.
        return super().train(False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the rotary frequencies (float32), e.g. after the weights were assigned into a meta-built tower."""
        if device is None:
            device = self.patch_embed.proj.weight.device
        if torch.device(device).type == "meta":
            return
        rope = self.rotary_pos_emb
        inv_freq, _ = rope.compute_axial_rope_parameters(self.config, device)
        rope.inv_freq = inv_freq
        rope.original_inv_freq = inv_freq.clone()


def build_vit(
    config: Qwen2_5_VLVisionConfig, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> VisionTower:
    """Build a frozen, eval-mode `VisionTower` (randomly initialised by transformers; load weights afterwards).
    `device="meta"` allocates nothing; call `reset_buffers(device)` once real weights are in place."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        tower = VisionTower(config)
    tower.to(dtype)
    tower.reset_buffers()  # `.to(dtype)` also cast the rotary frequencies; keep them float32
    tower.requires_grad_(False)
    return tower.eval()


def patchify_video(
    video: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The official `patchify_video_with_merge`: normalised `[C, T, H, W]` -> `[T/2 * H/14 * W/14, C*2*14*14]`.

    Patches are ordered (t, h/28, w/28, 2, 2), i.e. each 2x2 merge group is contiguous, which is what the ViT's
    merger expects; features are ordered (C, tp, 14, 14), like the HF Qwen2-VL image processor. Images must already
    be repeated to 2 frames. Returns the patches and the ViT grid `(T/2, H/14, W/14)`.
    """
    if video.dim() != 4:
        raise ValueError(f"patchify_video expects a [C, T, H, W] tensor, got shape {tuple(video.shape)}")
    c, t, h, w = video.shape
    side = patch_size * merge_size
    if t % temporal_patch_size or h % side or w % side:
        raise ValueError(
            f"patchify_video: video of shape {tuple(video.shape)} ([C, T, H, W]) needs T divisible by "
            f"{temporal_patch_size} (repeat a single image to {temporal_patch_size} frames) and H, W divisible by "
            f"{side} (patch {patch_size} x merge {merge_size})"
        )
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = video.reshape(c, gt, temporal_patch_size, gh // merge_size, merge_size, patch_size,
                      gw // merge_size, merge_size, patch_size)  # fmt: skip
    # -> (t, h/28, w/28, merge_h, merge_w, C, tp, p_h, p_w)
    x = x.permute(1, 3, 6, 4, 7, 0, 2, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)
