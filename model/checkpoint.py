"""Read and write the official checkpoint layout (spec 2), with explicit key accounting.

    Lance_3B/                  a model directory
    ├── model.safetensors      the full Lance state dict (or ema.safetensors)
    ├── llm_config.json        Qwen2.5-VL text config + token ids + vision_config dict
    ├── generation_config.json
    ├── tokenizer.json, tokenizer_config.json, vocab.json, merges.txt
    └── Qwen2.5-VL-ViT/        config.json + vit.safetensors (bare ViT keys); the release keeps this folder beside
                               the model directory, so both places are searched
    Wan2.2_VAE.pth             beside (or inside) the model directory, see model/vae.py

Loading follows the official order: ViT weights from `vit.safetensors` first, then `model.safetensors`, whose
`vit_model.*` keys win. `latent_pos_embed.pos_embed` is dropped (recomputed). The model is built on the meta device
and the file tensors are assigned into it, so a 3B checkpoint never exists twice in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LanceConfig, tiny
from .lance import LanceModel
from .tokenizer import LanceTokenizer, build_tiny_tokenizer

WEIGHT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}
VIT_DIR_NAME = "Qwen2.5-VL-ViT"
VIT_PREFIX = "vit_model."
# Keys the release stores but recomputes or never uses: dropped on load, with no error.
DROPPED_KEYS = ("latent_pos_embed.pos_embed",)
DROPPED_PREFIXES = ("vit_pos_embed.", "connector.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the keys and shapes."""


@dataclass
class KeyReport:
    """What loading a checkpoint did with every key."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # key, expected, found
    dropped: list[str] = field(default_factory=list)
    copied_from_und: list[str] = field(default_factory=list)  # gen-expert keys absent from the file (release's init_moe)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self, limit: int = 20) -> str:
        lines = []
        if self.missing:
            lines.append(f"missing {len(self.missing)} key(s): {_few(self.missing, limit)}")
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)} key(s): {_few(self.unexpected, limit)}")
        for key, want, got in self.mismatched[:limit]:
            lines.append(f"shape mismatch for {key}: model expects {want}, checkpoint has {got}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "loaded": len(self.loaded),
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": [{"key": k, "expected": e, "found": f} for k, e, f in self.mismatched],
            "dropped": self.dropped,
            "copied_from_und": self.copied_from_und,
        }


def _few(keys: list[str], limit: int) -> str:
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------------------ locating files
def find_vit_dir(model_dir: Path) -> Path | None:
    for candidate in (model_dir / VIT_DIR_NAME, model_dir.parent / VIT_DIR_NAME):
        if (candidate / "vit.safetensors").is_file():
            return candidate
    return None


def weights_file(model_dir: Path, weights: str = "auto") -> Path:
    """model.safetensors (preferred, as the release) or ema.safetensors; `weights` forces one."""
    if weights == "auto":
        for name in WEIGHT_FILES.values():
            if (model_dir / name).is_file():
                return model_dir / name
        raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor ema.safetensors")
    if weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be 'auto', 'model' or 'ema', got {weights!r}")
    path = model_dir / WEIGHT_FILES[weights]
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {model_dir}")
    return path


def read_header(path: Path, prefix: str = "") -> dict[str, tuple[list[int], str]]:
    """Key -> (shape, dtype) from a safetensors header, without reading tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {prefix + k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"cannot read {path}: {e} (the file is corrupt or not a safetensors file)") from e


def _stored_keys(model_dir: Path, vit_dir: Path | None, weights: str) -> dict[str, tuple[Path, str, list[int], str]]:
    """Every stored tensor in official load order (ViT file first, the model file overrides): key -> source."""
    sources: dict[str, tuple[Path, str, list[int], str]] = {}
    if vit_dir is not None:
        path = vit_dir / "vit.safetensors"
        for key, (shape, dtype) in read_header(path).items():
            sources[VIT_PREFIX + key] = (path, key, shape, dtype)
    path = weights_file(model_dir, weights)
    for key, (shape, dtype) in read_header(path).items():
        sources[key] = (path, key, shape, dtype)
    return sources


def _account(expected: dict[str, list[int]], stored: dict[str, tuple]) -> KeyReport:
    report = KeyReport()
    for key, (_, _, shape, _) in stored.items():
        if key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES):
            report.dropped.append(key)
        elif key not in expected:
            report.unexpected.append(key)
        elif list(expected[key]) != list(shape):
            report.mismatched.append((key, list(expected[key]), list(shape)))
        else:
            report.loaded.append(key)
    for key in expected:
        if key in stored:
            continue
        twin = key.replace("_moe_gen", "")
        if "_moe_gen" in key and twin in stored and list(stored[twin][2]) == list(expected[key]):
            report.copied_from_und.append(key)
        else:
            report.missing.append(key)
    return report


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class LoadedLance:
    model: LanceModel
    tokenizer: LanceTokenizer
    report: KeyReport
    model_dir: Path
    vit_dir: Path | None


def build_model(config: LanceConfig, vit_dir: Path | None = None, device: str | torch.device = "meta") -> LanceModel:
    """Construct the model (default on the meta device: no memory), with the ViT config from `vit_dir` if given."""
    vit_config = None
    if vit_dir is not None:
        from .vision import load_vit_config

        vit_config = load_vit_config(vit_dir)
    with torch.device(device):
        return LanceModel(config, vit_config)


def load_lance(
    path: str | Path,
    vit_dir: str | Path | None = None,
    weights: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedLance:
    """Load an official-layout checkpoint directory. Fails with a CheckpointError naming keys and shapes when the
    files do not fit the config; gen-expert keys absent from the file are copied from their und twins (as the
    release's `init_moe` does) and reported."""
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {model_dir} does not exist")
    config = LanceConfig.from_llm_config(model_dir)
    tokenizer = LanceTokenizer.from_dir(model_dir)
    tokenizer.check_config(config)
    vit_dir = Path(vit_dir) if vit_dir is not None else find_vit_dir(model_dir)
    if config.vision_config is None:
        vit_dir = None
    model = build_model(config, vit_dir)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    stored = _stored_keys(model_dir, vit_dir, weights)
    report = _account(expected, stored)
    if not report.ok:
        raise CheckpointError(f"checkpoint {model_dir} does not fit its llm_config.json:\n{report.problems()}")

    # Assign tensors one at a time (read, cast, move), so peak memory is one copy of the weights.
    state: dict[str, torch.Tensor] = {}
    handles: dict[Path, object] = {}
    try:
        for key in report.loaded:
            file, stored_key, _, _ = stored[key]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            state[key] = handles[file].get_tensor(stored_key).to(device=device, dtype=dtype)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor data from {file}: {e} (the file is truncated or corrupt)") from e
    finally:
        handles.clear()
    for key in report.copied_from_und:
        state[key] = state[key.replace("_moe_gen", "")].clone()
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers(device)
    model.num_text_tokens = len(tokenizer)
    model.eval()
    return LoadedLance(model, tokenizer, report, model_dir, vit_dir)


# ------------------------------------------------------------------------------------------------ saving
GENERATION_CONFIG = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "do_sample": False}


def save_lance(
    model: LanceModel,
    tokenizer: LanceTokenizer,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    weights: str = "model",
) -> Path:
    """Write an official-layout directory atomically: everything goes to a temporary sibling that replaces `out_dir`
    in one rename, so a crash while saving never leaves a half-written checkpoint under the final name."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHT_FILES[weights]), metadata={"format": "pt"})
        model.config.save(tmp)
        gen = dict(GENERATION_CONFIG, bos_token_id=tokenizer.pad_id, pad_token_id=tokenizer.pad_id)
        gen["eos_token_id"] = [tokenizer.im_end_id, tokenizer.pad_id]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tokenizer.save(tmp)
        if model.vit_model is not None:
            vit = tmp / VIT_DIR_NAME
            vit.mkdir()
            vit_state = {k[len(VIT_PREFIX) :]: v for k, v in state.items() if k.startswith(VIT_PREFIX)}
            save_file(vit_state, str(vit / "vit.safetensors"), metadata={"format": "pt"})
            (vit / "config.json").write_text(json.dumps(model.vit_model.config.to_dict(), indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# ------------------------------------------------------------------------------------------------ tiny checkpoints
def init_tiny(
    out_dir: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, vae: str = "patch"
) -> Path:
    """Write a tiny random Lance in the official layout, with an offline-built Qwen-format tokenizer.

    The two experts are initialised independently (so a routing mistake changes outputs), norms to one, the rest with
    PyTorch's default initialisation, all from `seed`.
    """
    tokenizer = build_tiny_tokenizer()
    vocab = -(-len(tokenizer) // 64) * 64  # embedding rows padded to a multiple of 64, as Qwen does
    config = tiny(
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab,
        image_token_id=tokenizer.image_pad_id,
        video_token_id=tokenizer.video_pad_id,
        vision_start_token_id=tokenizer.vision_start_id,
        vision_end_token_id=tokenizer.vision_end_id,
        vae=vae,
    )
    torch.manual_seed(seed)
    model = LanceModel(config)
    out = save_lance(model, tokenizer, out_dir)
    if vae == "wan2.2":
        from .vae import WAN_VAE_DIFFUSERS_DIR, write_tiny_wan_vae

        write_tiny_wan_vae(out / WAN_VAE_DIFFUSERS_DIR, seed=seed)
    return out


# ------------------------------------------------------------------------------------------------ inspection
def inspect_checkpoint(path: str | Path, vit_dir: str | Path | None = None, weights: str = "auto") -> dict:
    """Summarise a checkpoint without loading its tensors: config, parameter counts, key accounting.

    The model is built on the meta device, so this works on the released 3B layout with no memory to speak of.
    """
    model_dir = Path(path)
    config = LanceConfig.from_llm_config(model_dir)
    tokenizer = LanceTokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    vit_dir = Path(vit_dir) if vit_dir is not None else find_vit_dir(model_dir)
    model = build_model(config, vit_dir if config.vision_config is not None else None)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    stored = _stored_keys(model_dir, vit_dir, weights)
    report = _account(expected, stored)
    dtypes: dict[str, int] = {}
    for _, _, shape, dtype in stored.values():
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    stored_params = 0
    for _, _, shape, _ in stored.values():
        count = 1
        for s in shape:
            count *= s
        stored_params += count
    vit_cfg = model.vit_model.config if model.vit_model is not None else None
    from .vae import find_wan_vae

    vae_path = find_wan_vae(model_dir) if config.vae == "wan2.2" else None
    return {
        "checkpoint": str(model_dir),
        "weights_file": weights_file(model_dir, weights).name,
        "vit_dir": str(vit_dir) if vit_dir else None,
        "config": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "mrope_section": list(config.mrope_section),
            "latent_channels": config.latent_channels,
            "max_latent_size": config.max_latent_size,
            "max_num_frames": config.max_num_frames,
            "vae": config.vae,
        },
        "tokenizer": None
        if tokenizer is None
        else {
            "len": len(tokenizer),
            "im_start": tokenizer.im_start_id,
            "im_end": tokenizer.im_end_id,
            "vision_start": tokenizer.vision_start_id,
            "vision_end": tokenizer.vision_end_id,
            "video_pad": tokenizer.video_pad_id,
        },
        "vit": None
        if vit_cfg is None
        else {
            "depth": vit_cfg.depth,
            "hidden_size": vit_cfg.hidden_size,
            "num_heads": vit_cfg.num_heads,
            "out_hidden_size": vit_cfg.out_hidden_size,
            "fullatt_block_indexes": list(vit_cfg.fullatt_block_indexes),
        },
        "vae": {
            "kind": config.vae,
            "weights": str(vae_path) if vae_path else None,
            "note": "lossless space-to-depth codec, not Wan2.2" if config.vae == "patch"
            else ("found" if vae_path else "Wan2.2_VAE.pth not found inside or beside the checkpoint"),
        },
        "parameters": model.parameter_counts(),
        "stored": {"tensors": len(stored), "parameters": stored_params, "dtypes": dtypes},
        "keys": report.as_dict() | {"loaded": len(report.loaded), "expected": len(expected)},
    }
