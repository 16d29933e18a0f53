"""A weighted mix of rewards: every component's scores and the weighted total.

The recipe form is a mapping from a reward spec (registered name or ``package.module:callable``) to a weight, or to
a dict of options::

    rewards:
      clip_score: 1.0
      my_pkg.my_mod:score: 0.5
      aesthetic:
        weight: 0.2
        normalize: running            # none | batch | running
        kwargs: {head_path: /ckpt/sac+logos+ava1-l14-linearMSE.pth}
        retries: 2                    # FailurePolicy fields: retries, timeout, backoff, on_failure
        ray: {num_actors: 2, num_gpus: 0.5}   # host it in a Ray actor pool (lance_rl.rewards.ray_pool)
      clip_big: {reward: clip_score, kwargs: {model_name: ViT-H-14}, weight: 0.3}   # `reward:` renames a spec

Output: ``scores`` is the weighted total; ``details[name]`` holds each component's raw scores,
``details[f"{name}/{key}"]`` its details, ``details[f"{name}/normalized"]`` its normalised scores where normalised.

None handling: the total for a sample is taken over the components that apply to it, re-weighted so that it equals
the plain weighted sum when all apply: ``sum_k w_k s_k * sum_all|w| / sum_applying|w|``. A sample no component
applies to gets ``None``. Normalisation ignores None scores.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from .base import MODALITIES, Reward, RewardOutput
from .registry import load_reward
from .failure import FailurePolicy, score_with_policy

NORMALIZE = ("none", "batch", "running")
_OPTION_KEYS = {"weight", "normalize", "kwargs", "reward", "ray", "retries", "timeout", "backoff", "on_failure"}


@dataclass
class RunningStats:
    """Mean and variance of every score seen so far (Welford's update, numerically stable)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: list[float]) -> None:
        for x in values:
            self.count += 1
            d = x - self.mean
            self.mean += d / self.count
            self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 0.0


def _zscore(values: list[float | None], mean: float, std: float, eps: float = 1e-6) -> list[float | None]:
    return [None if v is None else (v - mean) / (std + eps) for v in values]


@dataclass
class Component:
    name: str
    reward: Reward
    weight: float = 1.0
    normalize: str = "none"
    policy: FailurePolicy = field(default_factory=FailurePolicy)
    stats: RunningStats = field(default_factory=RunningStats)

    def __post_init__(self):
        if self.normalize not in NORMALIZE:
            raise ValueError(f"reward {self.name!r}: normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"reward {self.name!r}: weight must be a finite number, got {self.weight}")

    def normalized(self, scores: list[float | None]) -> list[float | None]:
        present = [s for s in scores if s is not None]
        if self.normalize == "none" or not present:
            return scores
        if self.normalize == "running":
            self.stats.update(present)  # include this batch, so the very first batch is normalised too
            return _zscore(scores, self.stats.mean, self.stats.std)
        mean = sum(present) / len(present)
        std = math.sqrt(sum((s - mean) ** 2 for s in present) / len(present))
        return _zscore(scores, mean, std)


class RewardMix(Reward):
    """Weighted rewards as one ``Reward``; each component is scored under its own failure policy."""

    name = "mix"

    def __init__(self, components: list[Component]):
        if not components:
            raise ValueError("a reward mix needs at least one reward")
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names in a mix must be unique, got {names}")
        self.components = components
        # The union: each component checks its own modalities and raises a ModalityError naming itself.
        self.modalities = tuple(m for m in MODALITIES if any(m in c.reward.modalities for c in components))
        self._lock = threading.Lock()

    @property
    def weights(self) -> dict[str, float]:
        return {c.name: c.weight for c in self.components}

    def score_components(self, **batch) -> dict[str, RewardOutput]:
        """Each component's raw output (stateless, safe to call from several threads)."""
        return {c.name: score_with_policy(c.reward, c.policy, **batch) for c in self.components}

    def combine(self, raw: dict[str, RewardOutput], normalize: bool = True) -> RewardOutput:
        """Normalise (updating running statistics) and sum into the total; call in submission order.
        `normalize=False` sums the raw scores and leaves the statistics alone (held-out evaluation)."""
        n = len(next(iter(raw.values())).scores)
        total_abs = sum(abs(c.weight) for c in self.components)
        details: dict[str, list] = {}
        weighted, applying = [0.0] * n, [0.0] * n
        with self._lock:
            for c in self.components:
                out = raw[c.name]
                details[c.name] = list(out.scores)
                for key, values in out.details.items():
                    details[f"{c.name}/{key}"] = values
                norm = c.normalized(out.scores) if normalize else out.scores
                if normalize and c.normalize != "none":
                    details[f"{c.name}/normalized"] = norm
                for i, s in enumerate(norm):
                    if s is not None:
                        weighted[i] += c.weight * s
                        applying[i] += abs(c.weight)
        total = [w * total_abs / a if a > 0 else None for w, a in zip(weighted, applying)]
        return RewardOutput(total, details)

    def score(self, **batch) -> RewardOutput:
        return self.combine(self.score_components(**batch))

    def __call__(self, *, prompts, images=None, videos=None, conditions=None, metadata=None, **kwargs) -> RewardOutput:
        # No batch check here: each component checks the batch against its own declared modalities.
        batch = dict(prompts=prompts, images=images, videos=videos, conditions=conditions, metadata=metadata)
        return self.score(**batch, **kwargs)

    def state_dict(self) -> dict:
        """Running normalisation statistics, to save with an RL checkpoint."""
        return {c.name: vars(c.stats).copy() for c in self.components}

    def load_state_dict(self, state: dict) -> None:
        for c in self.components:
            if c.name in state:
                c.stats = RunningStats(**state[c.name])


def _options(name: str, value) -> dict:
    """One recipe entry as its options dict, checked for unknown keys."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"weight": float(value)}
    if not isinstance(value, dict):
        raise TypeError(f"reward {name!r}: expected a weight or a dict of options, got {type(value).__name__}")
    unknown = set(value) - _OPTION_KEYS
    if unknown:
        raise ValueError(f"reward {name!r}: unknown option(s) {sorted(unknown)}; allowed: {sorted(_OPTION_KEYS)}")
    return value


def _failure_policy(value: dict) -> FailurePolicy:
    return FailurePolicy(**{k: value[k] for k in ("retries", "timeout", "backoff", "on_failure") if k in value})


def _component(name: str, value) -> Component:
    value = _options(name, value)
    spec, kwargs = value.get("reward", name), dict(value.get("kwargs") or {})
    if value.get("ray") is not None:
        from .ray_pool import RayRewardPool

        reward = RayRewardPool(spec, reward_kwargs=kwargs, **value["ray"])
    else:
        reward = load_reward(spec, **kwargs)
    return Component(name, reward, float(value.get("weight", 1.0)), value.get("normalize", "none"), _failure_policy(value))


def check_spec(spec: dict, field: str = "rewards") -> None:
    """Everything about a recipe's reward mapping that can be known without loading a model: the options, the weight,
    the failure policy, that each reward resolves (names and import paths, importing its module) and that its
    constructor (or function) accepts the given kwargs. Raises ValueError naming `field.<reward>`."""
    from .ray_pool import RayRewardPool
    from .registry import resolve

    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{field} must be a non-empty mapping {{name: weight}}, got {spec!r}")
    for name, value in spec.items():
        where = f"{field}.{name}"
        try:
            value = _options(str(name), value)
            Component(str(name), None, float(value.get("weight", 1.0)), value.get("normalize", "none"), _failure_policy(value))
            target = value.get("reward", name)
            target = resolve(target) if isinstance(target, str) else target
            _check_kwargs(target, dict(value.get("kwargs") or {}), "kwargs")
            if value.get("ray") is not None:
                _check_kwargs(RayRewardPool, dict(value["ray"]), "ray")
        except (TypeError, ValueError, ImportError, KeyError) as e:
            message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            raise ValueError(f"{where}: {message}") from None


def _check_kwargs(target, kwargs: dict, option: str) -> None:
    import inspect

    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"{option} {unknown} not accepted; it takes {', '.join(p for p in params if p != 'self')}")


def build_mix(spec: dict) -> RewardMix:
    """A ``RewardMix`` from the recipe mapping ``{spec: weight | options}`` (see the module docstring)."""
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"rewards must be a non-empty mapping {{name: weight}}, got {spec!r}")
    return RewardMix([_component(str(k), v) for k, v in spec.items()])


def as_mix(reward, policy: FailurePolicy | None = None) -> RewardMix:
    """A mix as is; a recipe mapping built; a single reward (or spec) as a one-component mix with weight 1."""
    if isinstance(reward, RewardMix):
        return reward
    if isinstance(reward, dict):
        return build_mix(reward)
    r = load_reward(reward)
    return RewardMix([Component(r.name, r, 1.0, "none", policy or FailurePolicy())])
