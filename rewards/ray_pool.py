"""A reward hosted in a pool of Ray actors, for heavy models that want their own GPU(s) or process.

Each actor loads the reward once (``load_reward(spec, **reward_kwargs)``); a batch is split into contiguous chunks,
one per actor, scored in parallel and put back in order. Media travel as numpy arrays through Ray's object store.
The pool is itself a ``Reward``, so it goes into a mix like any other (``ray: {...}`` in the recipe)::

    pool = RayRewardPool("pickscore", num_actors=2, num_gpus=0.5, reward_kwargs={"dtype": "float16"})

``num_gpus="auto"`` gives each actor an equal share of the cluster's GPUs (at most one each), or none on a CPU-only
cluster; an actor with a GPU passes ``device="cuda"`` to a reward that takes a ``device`` argument and was given none.
Resources the cluster cannot provide fail at once instead of waiting forever. On a small machine give fractional
CPUs (0.25) so other tasks can still be scheduled.
"""

from __future__ import annotations

import inspect

import numpy as np

from .base import PER_SAMPLE_FIELDS, Reward, RewardOutput


class _RewardActor:
    def __init__(self, spec, reward_kwargs: dict, use_gpu: bool):
        from .registry import load_reward, resolve

        kwargs = dict(reward_kwargs)
        target = resolve(spec) if isinstance(spec, str) else spec
        takes_device = inspect.isclass(target) and "device" in inspect.signature(target).parameters
        if use_gpu and takes_device:
            kwargs.setdefault("device", "cuda")
        self.reward = load_reward(spec, **kwargs)

    def info(self) -> tuple[str, tuple[str, ...]]:
        return self.reward.name, self.reward.modalities

    def score(self, batch: dict) -> RewardOutput:
        return self.reward(**batch)


class RayRewardPool(Reward):
    def __init__(self, reward, num_actors: int = 1, num_cpus: float = 1.0, num_gpus: float | str = 0.0,
                 reward_kwargs: dict | None = None, **actor_options):  # fmt: skip
        import ray

        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        if not ray.is_initialized():
            ray.init()
        available = ray.cluster_resources()
        if num_gpus == "auto":
            num_gpus = min(1.0, available.get("GPU", 0.0) / num_actors)
        for what, per_actor in (("CPU", num_cpus), ("GPU", num_gpus)):
            if per_actor * num_actors > available.get(what, 0.0) + 1e-9:
                raise ValueError(
                    f"reward pool {reward!r}: {num_actors} actor(s) x {per_actor} {what} exceed the Ray cluster's "
                    f"{available.get(what, 0.0):g} {what}; lower num_actors / num_{what.lower()}s"
                )
        actor_options.setdefault("max_restarts", 1)  # a crashed actor (OOM) comes back for the next batch
        cls = ray.remote(_RewardActor).options(num_cpus=num_cpus, num_gpus=num_gpus, **actor_options)
        self.actors = [cls.remote(reward, reward_kwargs or {}, num_gpus > 0) for _ in range(num_actors)]
        try:  # waits for loading, so a reward that cannot load fails here, with its own message
            infos = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayActorError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            raise RuntimeError(f"reward pool {reward!r}: the actors could not load the reward: {lines[-1]}") from e
        self.name, self.modalities = infos[0][0], tuple(infos[0][1])

    def score(self, **batch) -> RewardOutput:
        import ray

        n = len(batch["prompts"])
        if n == 0:
            return RewardOutput([], {})
        chunks = [c.tolist() for c in np.array_split(np.arange(n), min(n, len(self.actors))) if len(c)]
        per_sample = PER_SAMPLE_FIELDS
        refs = []
        for actor, idx in zip(self.actors, chunks):
            part = {k: (v if v is None or k not in per_sample else [v[i] for i in idx]) for k, v in batch.items()}
            refs.append(actor.score.remote(part))
        try:
            outs = ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, Exception):  # the reward's own exception, for a readable failure report
                raise e.cause from e
            raise
        scores = [s for out in outs for s in out.scores]
        keys = dict.fromkeys(k for out in outs for k in out.details)
        details = {k: [v for out in outs for v in out.details.get(k, [None] * len(out))] for k in keys}
        return RewardOutput(scores, details)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
