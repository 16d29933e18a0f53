"""Rewards by name or by import path, resolved lazily.

Names map to ``"module:callable"`` strings, so ``import rewards`` never imports open_clip, transformers or
onnxruntime; a built-in's heavy imports happen when it is loaded. A spec is either a registered name
(``"clip_score"``) or an import path ``"package.module:callable"`` naming a ``Reward`` subclass, a reward instance,
or a plain function (its own file, no registration needed)::

    load_reward("jpeg_compressibility")
    load_reward("my_pkg.my_mod:score")                 # a function: kwargs are bound to every call
    load_reward("my_pkg.my_mod:MyReward", device="cuda")  # a class: kwargs go to its constructor
"""

from __future__ import annotations

import importlib
import inspect
import re

from .base import FunctionReward, Reward

REGISTRY: dict[str, str] = {
    "jpeg_compressibility": "lance_rl.rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "lance_rl.rewards.jpeg:JpegIncompressibility",
    "clip_score": "lance_rl.rewards.clip:ClipScore",
    "image_similarity": "lance_rl.rewards.clip:ImageSimilarity",
    "pickscore": "lance_rl.rewards.pickscore:PickScore",
    "aesthetic": "lance_rl.rewards.aesthetic:Aesthetic",
    "hpsv2": "lance_rl.rewards.hpsv2:HPSv2",
    "ocr": "lance_rl.rewards.ocr:OcrReward",
    "video_temporal_consistency": "lance_rl.rewards.video:TemporalConsistency",
    "frames": "lance_rl.rewards.video:FrameReward",
    "self_judge": "lance_rl.rewards.self_judge:SelfJudge",
    "remote": "lance_rl.rewards.remote:RemoteReward",
    "shapes": "lance_rl.rewards.shapes:ShapesReward",
    "exact_answer": "lance_rl.rewards.answers:ExactAnswer",
    "answer_format": "lance_rl.rewards.answers:AnswerFormat",
    "shapes_vqa": "lance_rl.rewards.answers:ShapesVQA",
}

class UnknownRewardError(KeyError):
    """A spec that is neither a registered name nor a ``package.module:callable`` path."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def register(name: str, target: str | object) -> None:
    """Add a name: ``target`` is a ``"module:callable"`` string (resolved lazily) or the callable itself."""
    if name in REGISTRY and REGISTRY[name] != target:
        raise ValueError(f"reward name {name!r} is already registered as {REGISTRY[name]!r}")
    REGISTRY[name] = target


def known_rewards() -> list[str]:
    return sorted(REGISTRY)


def resolve(spec: str):
    """The object a spec names (class, function or instance), importing its module now."""
    target = REGISTRY.get(spec, spec)
    if not isinstance(target, str):
        return target
    if not _PATH.match(target):
        raise UnknownRewardError(
            f"unknown reward {spec!r}: use a registered name ({', '.join(known_rewards())}) "
            f"or an import path 'package.module:callable'"
        )
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        where = f" (registered as {target!r})" if spec in REGISTRY else ""
        raise ImportError(f"reward {spec!r}{where}: cannot import module {module_name!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_reward(spec, **kwargs) -> Reward:
    """A ready ``Reward`` from a name, an import path, a ``Reward`` or a callable.

    Classes are instantiated with ``kwargs``; functions get ``kwargs`` bound to every call. A reward keeps its own
    ``name``; a plain function, or a class that sets none, is named by the spec.
    """
    name = spec if isinstance(spec, str) else None
    obj = resolve(spec) if isinstance(spec, str) else spec
    if inspect.isclass(obj):
        obj, kwargs = obj(**kwargs), {}
        if isinstance(obj, Reward) and obj.name == Reward.name and name:
            obj.name = name
    if isinstance(obj, Reward):
        if kwargs:
            raise TypeError(f"reward {spec!r} is already an instance; it takes no keyword arguments ({sorted(kwargs)})")
        return obj
    if not callable(obj):
        raise TypeError(f"reward {spec!r} resolves to a {type(obj).__name__}, which is not callable")
    modalities = getattr(obj, "modalities", ("image",))
    return FunctionReward(obj, name=getattr(obj, "name", None) or name, modalities=modalities, **kwargs)
