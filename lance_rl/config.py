"""Recipes: typed dataclasses read from YAML, with command-line overrides and validation that names the field.

    lance-rl sft --config recipes/quickstart/sft.yaml train.steps=200 lora.rank=16 ~logging.tensorboard

`key=value` sets a (dotted) field, the value parsed as YAML; `~key` resets a field to its default. A wrong field name
or type fails before any work starts, naming the field, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be run as written; the message names the field."""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, where: str) -> Any:
    """Check (and gently convert: int -> float, list -> tuple) `value` against the annotation `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: {value!r} is not allowed; choose one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecipeError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args if args else (Any, Any)
        return {_convert(k, key_t, where): _convert(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a mapping, recursively; unknown keys and wrong types raise RecipeError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"unknown field {_join(where, key)!r}{hint}; {cls.__name__} has: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], _join(where, k)) for k, v in data.items()}
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.init and f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise RecipeError(f"missing required field(s) {', '.join(_join(where, m) for m in missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"{where or cls.__name__}: {e}") from e


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def to_dict(obj) -> dict:
    """The resolved recipe as plain data (what gets logged and saved beside checkpoints)."""
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` (YAML-parsed value) and `~a.b` (back to the default) to a nested mapping."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}  # a deep copy
    for item in overrides:
        if item.startswith("~"):
            path = item[1:].split(".")
            node = data
            for key in path[:-1]:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(path[-1], None)
            continue
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key=value (or ~key to reset a field)")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        node = data
        for part in path[:-1]:
            node = _child(node, part, item)
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(node, list):
            node[_index(node, path[-1], item)] = value
        else:
            node[path[-1]] = value
    return data


def _index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"override {item!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _child(node, part: str, item: str):
    """Step into a section (creating it) or a list element (`datasets.0.path`)."""
    if isinstance(node, list):
        return node[_index(node, part, item)]
    child = node.setdefault(part, {})
    if not isinstance(child, (dict, list)):
        raise RecipeError(f"override {item!r}: {part!r} is not a section")
    return child


def load_recipe(cls, path: str | Path | None, overrides: list[str] | None = None):
    """Read a YAML recipe into `cls`, after applying command-line overrides. Fails before any work is done."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}" if path else str(e)) from None


# ------------------------------------------------------------------------------------------------ shared sections
@dataclasses.dataclass
class ModelSection:
    """Which Lance to start from."""

    checkpoint: str  # an official-layout directory (released Lance_3B, an SFT export, or `lance-rl init-tiny` output)
    vit_dir: str | None = None  # Qwen2.5-VL-ViT folder; None: inside or beside the checkpoint
    vae: str | None = None  # Wan2.2_VAE.pth or a diffusers folder; None: inside or beside (the PatchVAE needs none)
    attn_backend: Literal["sdpa", "flex"] = "sdpa"  # flex is the release's training kernel (GPU, compiled)
    gradient_checkpointing: bool = False  # recompute decoder layers in backward: less memory, ~30% slower


@dataclasses.dataclass
class LoraSection:
    """LoRA through PEFT. `targets`: a preset ("generation": the *_moe_gen projections and MLP, the usual RL choice;
    "understanding": the Qwen expert; "both") or a list of regular expressions over module names."""

    enabled: bool = False
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    targets: str | list[str] = "generation"

    def __post_init__(self):
        if self.rank < 1:
            raise RecipeError(f"lora.rank must be at least 1, got {self.rank}")
        if isinstance(self.targets, str) and self.targets not in ("generation", "understanding", "both"):
            raise RecipeError(
                f"lora.targets {self.targets!r} is not a preset; use 'generation', 'understanding', 'both' or a list "
                "of module-name patterns"
            )


@dataclasses.dataclass
class OptimSection:
    """AdamW with warm-up; the release's values are lr 1e-4, betas (0.9, 0.95), eps 1e-15, no weight decay,
    constant schedule after 500 warm-up steps, gradient clipping at 1.0. Steps are optimizer steps (in RL:
    updates x inner epochs x minibatches)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0  # floor of the cosine schedule
    max_grad_norm: float = 1.0  # 0 turns clipping off

    def __post_init__(self):
        if not self.lr > 0:
            raise RecipeError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise RecipeError(f"optim.min_lr must be in [0, optim.lr = {self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or self.eps <= 0:
            raise RecipeError("optim.warmup_steps, weight_decay and max_grad_norm must be >= 0 and optim.eps > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise RecipeError(f"optim.betas must lie in [0, 1), got {self.betas}")


@dataclasses.dataclass
class CheckpointSection:
    every: int = 500  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # older checkpoints are deleted; 0 keeps all

    def __post_init__(self):
        if self.every < 1:
            raise RecipeError(f"checkpoint.every must be at least 1, got {self.every}")
        if self.keep_last < 0:
            raise RecipeError(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {self.keep_last}")


@dataclasses.dataclass
class WandbSection:
    """Weights & Biases (`pip install lance-rl[wandb]`). mode "offline" writes the run under output_dir/wandb with no
    network (`wandb sync` uploads it later)."""

    project: str = "lance-rl"
    name: str | None = None  # default: the output directory's name
    mode: Literal["online", "offline"] = "online"


@dataclasses.dataclass
class LoggingSection:
    every: int = 10  # steps (SFT) or updates (RL) between metric rows; evaluations are always logged
    tensorboard: bool = False  # also write TensorBoard events under output_dir/tensorboard (`lance-rl[tensorboard]`)
    wandb: WandbSection | None = None  # also log to Weights & Biases

    def __post_init__(self):
        if self.every < 1:
            raise RecipeError(f"logging.every must be at least 1, got {self.every}")
