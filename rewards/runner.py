"""Scoring in a thread pool, so reward models work while the generator samples the next batches.

Submit each batch as soon as it is sampled and collect the futures later (flow_grpo's pattern); the stateful part of a
mix (running normalisation, the weighted total) is applied in submission order. Failures follow the mix's
per-reward ``FailurePolicy`` (``rewards/failure.py``).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from .base import RewardOutput
from .mix import RewardMix


class RewardRunner:
    """Score batches asynchronously in a thread pool; ``submit`` returns a Future per batch.

    The reward (or mix) is scored concurrently across batches, but the stateful part of a mix (running
    normalisation and the weighted total) is applied in submission order, so results do not depend on which thread
    finished first. Submit a batch right after sampling it and collect the futures after the last sampling batch,
    so reward models run while the generator samples (flow_grpo's pattern).

        with RewardRunner(build_mix({"clip_score": 1.0}), max_workers=4) as runner:
            futures = [runner.submit(prompts=p, images=im) for p, im in batches]
            outputs = [f.result() for f in futures]          # in submission order
    """

    def __init__(self, mix: RewardMix, max_workers: int = 4):
        if not isinstance(mix, RewardMix):
            raise TypeError(f"RewardRunner takes a built RewardMix (rewards.mix.as_mix / build_mix), got {type(mix).__name__}")
        self.mix = mix
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")
        self._turn = threading.Condition()
        self._submitted = 0
        self._combined = 0

    def submit(self, **batch) -> Future:
        """Queue a batch (keyword fields as for a reward); the arrays must not be modified until it is scored."""
        with self._turn:
            seq, self._submitted = self._submitted, self._submitted + 1
        return self._pool.submit(self._job, seq, batch)

    def _job(self, seq: int, batch: dict) -> RewardOutput:
        # Jobs start in FIFO order, so every earlier job is already running when this one waits: no deadlock.
        raw, error = None, None
        try:
            raw = self.mix.score_components(**batch)
        except BaseException as e:  # noqa: BLE001 - re-raised in order below
            error = e
        with self._turn:
            self._turn.wait_for(lambda: self._combined == seq)
            try:
                if error is not None:
                    raise error
                return self.mix.combine(raw)
            finally:
                self._combined += 1
                self._turn.notify_all()

    def score(self, **batch) -> RewardOutput:
        return self.submit(**batch).result()

    def map(self, batches) -> list[RewardOutput]:
        futures = [self.submit(**b) for b in batches]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
