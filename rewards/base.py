"""The reward contract: one batch in, one score per sample and named details out.

A reward is called with keyword arguments only (as TRL calls its reward functions), so a reward reads what it needs
and ignores the rest through ``**kwargs``::

    out = reward(prompts=["a red cube"], images=[img])        # img: uint8 [H, W, 3] RGB
    out.scores   # [0.31]         one float per sample, None where the reward does not apply
    out.details  # {"cosine": [0.31]}   optional named per-sample values, logged as rewards/<name>/<key>

Batch fields (``B`` samples):

- ``prompts``: ``list[str]`` of length B;
- what is scored, exactly one of: ``images``, B uint8 RGB arrays ``[H, W, 3]`` (or one array ``[B, H, W, 3]``);
  ``videos``, B uint8 arrays ``[T, H, W, 3]``; ``completions``, B strings (answers the model wrote, for text rewards);
- ``conditions``: optional, B condition media (editing sources, or the image / video a question was about: uint8
  ``[H, W, 3]`` or ``[T, H, W, 3]``, or None);
- ``answers``: optional with ``completions``, B reference answers (a string, a list of accepted strings, or None);
- ``metadata``: optional, B dicts (the prompt set's per-sample columns).

A reward declares the modalities it scores (``"image"``, ``"video"``, ``"text"``); giving it another raises
``ModalityError``. Image and video rewards never see ``completions`` / ``answers`` (their batches do not carry the
keys), so they need no change. Write a reward as a subclass of ``Reward`` (implement ``score``) or as a plain function,
optionally decorated with ``@reward(name=..., modalities=...)``. Undecorated functions are taken to score images only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODALITIES = ("image", "video", "text")
# Batch fields with one entry per sample (a subset of samples takes the same entries of each).
PER_SAMPLE_FIELDS = ("prompts", "images", "videos", "conditions", "metadata", "completions", "answers")


class ModalityError(ValueError):
    """A reward was given media of a kind it does not declare, or a malformed batch."""


class RewardError(RuntimeError):
    """A reward failed for some samples after its retries; the message names the reward, samples and cause.

    ``reward``: the reward's name; ``indices``: the failed sample indices in the batch; ``reasons``: one message per
    failed index.
    """

    def __init__(self, reward: str, indices: Sequence[int], reasons: Sequence[str]):
        self.reward, self.indices, self.reasons = reward, list(indices), list(reasons)
        by_reason: dict[str, list[int]] = {}
        for i, r in zip(self.indices, self.reasons):
            by_reason.setdefault(r, []).append(i)
        shown = "; ".join(f"samples {_ranges(ix)}: {r}" for r, ix in list(by_reason.items())[:5])
        more = f" (and {len(by_reason) - 5} more errors)" if len(by_reason) > 5 else ""
        super().__init__(f"reward {reward!r} failed for {len(self.indices)} sample(s): {shown}{more}")


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


@dataclass
class RewardOutput:
    """``scores[i]``: a float, or None ("does not apply to sample i"); each ``details`` list has one per sample."""

    scores: list[float | None]
    details: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)


def _as_float(x) -> float | None:
    if x is None:
        return None
    return float(x)  # NaN stays NaN here: the runner's failure policy decides what a NaN means


def as_output(result: Any, n: int, name: str) -> RewardOutput:
    """Normalise a reward's return value (RewardOutput, ``(scores, details)``, list/array/tensor); check its length."""
    if isinstance(result, RewardOutput):
        scores, details = result.scores, result.details
    elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        scores, details = result  # the DDPO / flow_grpo shape: (scores, meta)
    else:
        scores, details = result, {}
    if hasattr(scores, "detach"):  # torch tensor
        scores = scores.detach().float().cpu().numpy()
    if isinstance(scores, np.ndarray):
        scores = scores.reshape(-1).tolist()
    try:
        scores = [_as_float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise TypeError(f"reward {name!r} must return one float or None per sample, got {type(result).__name__}: {e}")
    if len(scores) != n:
        raise ValueError(f"reward {name!r} returned {len(scores)} scores for a batch of {n}")
    out_details = {}
    for key, values in (details or {}).items():
        if hasattr(values, "detach"):
            values = values.detach().cpu().numpy()
        values = list(values.tolist() if isinstance(values, np.ndarray) else values)
        if len(values) != n:
            raise ValueError(f"reward {name!r}: detail {key!r} has {len(values)} entries for a batch of {n}")
        out_details[str(key)] = values
    return RewardOutput(scores, out_details)


# ------------------------------------------------------------------------------------------------ batch checks
def _frames(x, what: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != ndim or x.shape[-1] != 3:
        want = "[H, W, 3]" if ndim == 3 else "[T, H, W, 3]"
        raise ModalityError(f"{what} must be uint8 RGB {want}, got {x.dtype} {tuple(x.shape)}")
    return x


def _media_list(media, n: int, what: str, ndim: int) -> list[np.ndarray]:
    if hasattr(media, "detach") or isinstance(media, np.ndarray):
        media = list(media)  # a stacked [B, ...] array
    if len(media) != n:
        raise ModalityError(f"got {len(media)} {what} for {n} prompts")
    return [_frames(m, f"{what}[{i}]", ndim) for i, m in enumerate(media)]


def check_batch(
    name: str, modalities: Sequence[str], prompts, images=None, videos=None, conditions=None, metadata=None,
    completions=None, answers=None,
) -> dict:
    """Validate a batch against a reward's declared modalities; returns it with media as lists of numpy arrays (and,
    for a text batch, ``completions`` and ``answers`` as lists)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ModalityError(f"reward {name!r}: prompts must be a list of strings, got {type(prompts).__name__}")
    n = len(prompts)
    outputs = [k for k, v in (("images", images), ("videos", videos), ("completions", completions)) if v is not None]
    if len(outputs) != 1:
        got = " and ".join(outputs) if outputs else "neither"
        raise ModalityError(f"reward {name!r}: give exactly one of images= or videos= (or completions= for text "
                            f"rewards), got {got}")  # fmt: skip
    given = {"images": "image", "videos": "video", "completions": "text"}[outputs[0]]
    if given not in modalities:
        hint = ""
        if given == "video":
            hint = " (wrap it with lance_rl.rewards.video.FrameReward, registry name 'frames', to score sampled frames)"
        plural = "texts" if given == "text" else f"{given}s"
        raise ModalityError(f"reward {name!r} scores {', '.join(modalities)} only, but was given {plural}{hint}")
    batch = {"prompts": list(prompts), "images": None, "videos": None, "conditions": None, "metadata": None}
    if images is not None:
        batch["images"] = _media_list(images, n, "images", 3)
    elif videos is not None:
        batch["videos"] = _media_list(videos, n, "videos", 4)
    else:
        batch["completions"] = _texts(completions, n, name)
        batch["answers"] = _answers(answers, n, name)
    if answers is not None and completions is None:
        raise ModalityError(f"reward {name!r}: answers= goes with completions= (reference answers for text outputs)")
    if conditions is not None:
        if len(conditions) != n:
            raise ModalityError(f"reward {name!r}: got {len(conditions)} conditions for {n} prompts")
        batch["conditions"] = [None if c is None else _frames(c, f"conditions[{i}]", 4 if np.ndim(c) == 4 else 3)
                               for i, c in enumerate(conditions)]  # fmt: skip
    if metadata is not None:
        if len(metadata) != n:
            raise ModalityError(f"reward {name!r}: got {len(metadata)} metadata entries for {n} prompts")
        bad = [i for i, m in enumerate(metadata) if m is not None and not isinstance(m, dict)]
        if bad:
            kind = type(metadata[bad[0]]).__name__
            raise ModalityError(f"reward {name!r}: metadata entries must be dicts, got a {kind} at index {bad[0]}")
        batch["metadata"] = [dict(m or {}) for m in metadata]
    return batch


def _texts(completions, n: int, name: str) -> list[str]:
    if isinstance(completions, str) or len(completions) != n:
        count = 1 if isinstance(completions, str) else len(completions)
        raise ModalityError(f"reward {name!r}: got {count} completions for {n} prompts")
    bad = [i for i, c in enumerate(completions) if not isinstance(c, str)]
    if bad:
        kind = type(completions[bad[0]]).__name__
        raise ModalityError(f"reward {name!r}: completions must be strings, got a {kind} at index {bad[0]}")
    return list(completions)


def _answers(answers, n: int, name: str) -> list | None:
    if answers is None:
        return None
    if isinstance(answers, str) or len(answers) != n:
        raise ModalityError(f"reward {name!r}: answers must be a list with one entry per prompt ({n})")
    for i, a in enumerate(answers):
        if not (a is None or isinstance(a, str) or (isinstance(a, (list, tuple)) and all(isinstance(x, str) for x in a))):
            raise ModalityError(f"reward {name!r}: answers[{i}] must be a string, a list of strings or None")
    return list(answers)


# ------------------------------------------------------------------------------------------------ reward forms
class Reward:
    """Base class: set ``name`` and ``modalities``, load the scorer once in ``__init__``, implement ``score``.

    ``__call__`` validates the batch (modalities, lengths, uint8 RGB) and the output (one score per sample).
    ``score`` receives the validated batch as keyword arguments and returns a ``RewardOutput``, a list of floats/None,
    or ``(scores, details)``.
    """

    name: str = "reward"
    modalities: tuple[str, ...] = ("image",)

    def score(self, *, prompts, images=None, videos=None, conditions=None, metadata=None, **kwargs):
        raise NotImplementedError

    def __call__(self, *, prompts, images=None, videos=None, conditions=None, metadata=None, completions=None,
                 answers=None, **kwargs) -> RewardOutput:  # fmt: skip
        batch = check_batch(self.name, self.modalities, prompts, images, videos, conditions, metadata, completions,
                            answers)  # fmt: skip
        return as_output(self.score(**batch, **kwargs), len(batch["prompts"]), self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, modalities={self.modalities})"


class FunctionReward(Reward):
    """A plain function ``fn(*, prompts, images, videos, conditions, metadata, **kwargs)`` (a text reward:
    ``fn(*, prompts, completions, answers, ...)``) as a ``Reward``.

    ``kwargs`` given here are bound to every call (``functools.partial``). A function that does not take ``**kwargs``
    receives only the batch fields it names.
    """

    def __init__(self, fn: Callable, name: str | None = None, modalities: Sequence[str] = ("image",), **kwargs):
        bad = set(modalities) - set(MODALITIES)
        if bad or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {tuple(modalities)}")
        self.fn = functools.partial(fn, **kwargs) if kwargs else fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.modalities = tuple(modalities)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # some builtins and C callables have no signature: pass everything
            params = {}
        self._takes_all = not params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._accepted = set(params)

    def score(self, **batch):
        if not self._takes_all:
            batch = {k: v for k, v in batch.items() if k in self._accepted}
        return self.fn(**batch)


def reward(name: str | None = None, modalities: Sequence[str] = ("image",)):
    """Decorator: turn a plain function into a ``Reward`` with a name and declared modalities.

    >>> @reward(name="brightness", modalities=("image",))
    ... def brightness(*, images, **kwargs):
    ...     return [float(im.mean()) / 255 for im in images]
    >>> brightness(prompts=["x"], images=[np.full((8, 8, 3), 255, np.uint8)]).scores
    [1.0]
    """

    def wrap(fn):
        return functools.update_wrapper(FunctionReward(fn, name=name, modalities=modalities), fn, updated=())

    return wrap


def as_reward(obj, name: str | None = None) -> Reward:
    """A ``Reward`` from a Reward instance, or any callable (its ``modalities`` attribute, else images only)."""
    if isinstance(obj, Reward):
        if name:
            obj.name = name
        return obj
    if callable(obj):
        modalities = getattr(obj, "modalities", ("image",))
        return FunctionReward(obj, name=name or getattr(obj, "name", None), modalities=modalities)
    raise TypeError(f"a reward must be callable, got {type(obj).__name__}")
