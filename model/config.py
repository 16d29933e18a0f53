"""LanceConfig: the shape of a Lance model, read from and written to the official `llm_config.json`.

The official release keeps the language-model hyper-parameters in `llm_config.json` (a Qwen2.5-VL text config plus the
token ids and a plain-dict `vision_config` that its loader needs). The Lance-level settings (`max_latent_size`,
`max_num_frames`, latent channels) are command-line arguments of the official scripts, fixed to the same values in every
released script; we keep them as defaults here and store any non-default value under the extra key `"lance_rl"` in
`llm_config.json`, which the official loader ignores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The Qwen2.5-VL-3B vision tower as injected by the official `hack_qwen2_5_vl_config` (spec 1.1).
QWEN25_VL_3B_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}

# llm_config.json fields we read; anything else in the file is kept verbatim and written back unchanged.
_LLM_FIELDS = {
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "hidden_act",
    "max_position_embeddings",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_config",
}
_REQUIRED_LLM_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


@dataclass
class LanceConfig:
    """Everything needed to build a Lance model. Defaults are the released 3B shape (`Lance_3B`, `Lance_3B_Video`)."""

    # Qwen2 text backbone; both experts share these shapes.
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    vocab_size: int = 151936  # embedding rows; len(tokenizer) (151665 for Qwen2.5) is the usable vocabulary
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # rotary frequencies given to the (t, h, w) position axes
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000

    # Token ids the config carries (the tokenizer is checked against them when both are present).
    image_token_id: int = 151655
    video_token_id: int = 151656  # the placeholder of every visual token, ViT and VAE alike
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    # mRoPE: a visual block's temporal position advances `tokens_per_second` per grid step (second_per_grid_t = 1).
    tokens_per_second: int = 2
    spatial_merge_size: int = 2
    # Vision tower config as a plain dict (Qwen2_5_VLVisionConfig fields); None builds a model without a ViT.
    vision_config: dict | None = field(default_factory=lambda: dict(QWEN25_VL_3B_VISION))

    # Lance generation settings (script arguments in the official code, identical in every released script).
    latent_channels: int = 48  # Wan2.2 z_dim with latent patch (1, 1, 1)
    max_latent_size: int = 64  # latent position ids are t*64*64 + h*64 + w
    max_num_frames: int = 121  # -> 31 latent frames in the sin-cos position table
    vae: str = "wan2.2"  # "wan2.2" (Wan2.2_VAE.pth) or "patch" (lossless space-to-depth codec, tiny models)

    # Fields of llm_config.json we do not interpret, written back as they were.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.mrope_section = tuple(int(x) for x in self.mrope_section)
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        elif 2 * sum(self.mrope_section) != self.head_dim:
            problems.append(
                f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if self.hidden_size % 2:
            problems.append(f"hidden_size {self.hidden_size} must be even (3-D sin-cos latent positions)")
        if self.vae not in ("wan2.2", "patch"):
            problems.append(f"vae must be 'wan2.2' or 'patch', got {self.vae!r}")
        if self.vision_config is not None:
            out = self.vision_config.get("out_hidden_size")
            if out is not None and out != self.hidden_size:
                problems.append(
                    f"vision_config.out_hidden_size {out} must equal hidden_size {self.hidden_size} "
                    "(the released model writes ViT tokens into the sequence without a connector)"
                )
        if problems:
            raise ValueError("invalid LanceConfig: " + "; ".join(problems))

    # ---------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_num_latent_frames(self) -> int:
        return self.max_num_frames // 4 + 1

    # ---------------------------------------------------------------- llm_config.json
    @classmethod
    def from_llm_config(cls, path: str | Path) -> "LanceConfig":
        """Read an official `llm_config.json` (a file, or a checkpoint directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "llm_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no llm_config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "llm_config") -> "LanceConfig":
        missing = [k for k in _REQUIRED_LLM_FIELDS if k not in raw]
        if missing:
            raise ValueError(f"{source} lacks required field(s) {missing}")
        kwargs: dict[str, Any] = {k: raw[k] for k in _LLM_FIELDS if k in raw}
        rope = raw.get("rope_scaling") or {}
        if "mrope_section" in rope:
            kwargs["mrope_section"] = tuple(rope["mrope_section"])
        vc = raw.get("vision_config")
        if isinstance(vc, dict):
            kwargs["tokens_per_second"] = vc.get("tokens_per_second", 2)
            kwargs["spatial_merge_size"] = vc.get("spatial_merge_size", 2)
        elif vc is not None:
            raise ValueError(f"{source}: vision_config must be a plain dict, got {type(vc).__name__}")
        lance = raw.get("lance_rl", {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(lance) - known
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)} under 'lance_rl'")
        kwargs.update(lance)
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in _LLM_FIELDS and k != "lance_rl"}
        return cls(**kwargs)

    def to_llm_config_dict(self) -> dict:
        """The official llm_config.json content (with the fields the released loader needs)."""
        out: dict[str, Any] = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": 32768,
            "max_window_layers": 70,
            "torch_dtype": "bfloat16",
        }
        out.update(self.extra)
        for k in sorted(_LLM_FIELDS - {"vision_config"}):
            out[k] = getattr(self, k)
        rope = dict(out.get("rope_scaling") or {})
        rope.update({"type": "mrope", "mrope_section": list(self.mrope_section)})
        out["rope_scaling"] = rope
        vc = dict(self.vision_config or {})
        vc.update({"tokens_per_second": self.tokens_per_second, "spatial_merge_size": self.spatial_merge_size})
        out["vision_config"] = vc
        lance = {
            k: getattr(self, k)
            for k in ("latent_channels", "max_latent_size", "max_num_frames", "vae")
            if getattr(self, k) != getattr(LanceConfig, k)
        }
        if lance:
            out["lance_rl"] = lance
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "llm_config.json"
        path.write_text(json.dumps(self.to_llm_config_dict(), indent=2) + "\n")
        return path


# ---------------------------------------------------------------- presets
def lance_3b() -> LanceConfig:
    """The released Lance_3B / Lance_3B_Video shape (Qwen2.5-VL-3B text and vision towers, two experts)."""
    return LanceConfig()


TINY_VISION = {
    "depth": 2,
    "hidden_act": "silu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "in_chans": 3,
    "out_hidden_size": 64,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}


def tiny(hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 151936, **overrides: Any) -> LanceConfig:
    """A CPU-sized Lance with the official module structure (the reference fixtures use hidden 64, 2 layers).

    head_dim is fixed at 16 (mrope [2, 3, 3]) so any hidden size that is a multiple of 32 works.
    """
    heads = hidden_size // 16
    vision = dict(TINY_VISION, out_hidden_size=hidden_size)
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=vocab_size,
        mrope_section=(2, 3, 3),
        vision_config=vision,
    )
    kwargs.update(overrides)
    return LanceConfig(**kwargs)


PRESETS = {"lance-3b": lance_3b, "tiny": tiny}
