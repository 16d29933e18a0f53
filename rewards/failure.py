"""The failure policy of a reward (``FailurePolicy``), applied to each reward on its own so errors name it:

- an exception or a timeout retries the samples still unscored, after ``backoff * 2**k`` seconds;
- a NaN or infinite score counts as a failure of that sample only: the retry re-scores just those samples;
- a ``ModalityError`` (a wrong batch, a programming error) is raised at once, never retried; a ``RewardError``
  raised by the reward itself (it has spent its own retries, like the remote client) is not retried again;
- after the last retry, ``on_failure="raise"`` (the default) raises ``RewardError`` naming the reward, the failed
  sample indices and the last error of each; ``on_failure="none"`` gives those samples ``None`` and records the
  reason in ``details["failed"]`` (None for samples that scored). A failed batch is never scored zero.

Timeouts run the call in a daemon thread and stop waiting for it: Python cannot kill a thread, so a hung call keeps
running in the background (the remote client has real socket timeouts; prefer it for rewards that can hang).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from .base import PER_SAMPLE_FIELDS, ModalityError, Reward, RewardError, RewardOutput

ON_FAILURE = ("raise", "none")


@dataclass
class FailurePolicy:
    retries: int = 2  # extra attempts after the first (0: no retry)
    timeout: float | None = None  # seconds per attempt; None waits as long as the reward takes
    backoff: float = 0.5  # seconds before the first retry, doubling each time
    on_failure: str = "raise"  # "raise": RewardError after the last retry; "none": None + details["failed"]

    def __post_init__(self):
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {self.timeout}")
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {self.on_failure!r}")


def call_with_timeout(fn, timeout: float | None):
    """``fn()``, or TimeoutError if it has not returned within ``timeout`` seconds (the call is abandoned)."""
    if timeout is None:
        return fn()
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="reward-call")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"timed out after {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


_PER_SAMPLE = PER_SAMPLE_FIELDS


def _subset(batch: dict, idx: list[int]) -> dict:
    return {k: v if v is None or k not in _PER_SAMPLE else [v[i] for i in idx] for k, v in batch.items()}


def score_with_policy(reward: Reward, policy: FailurePolicy, **batch) -> RewardOutput:
    """Score a batch with one reward under ``policy`` (see the module docstring)."""
    n = len(batch["prompts"])
    scores: list[float | None] = [None] * n
    details: dict[str, list] = {}
    reasons: dict[int, str] = {}
    pending, last_error = list(range(n)), None
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(policy.backoff * 2 ** (attempt - 1))
        sub = batch if len(pending) == n else _subset(batch, pending)
        try:
            out = call_with_timeout(lambda: reward(**sub), policy.timeout)
        except ModalityError:
            raise
        except RewardError as e:  # the reward already spent its own retries (e.g. the remote client): final
            last_error = e
            inner = {pending[j]: r for j, r in zip(e.indices, e.reasons) if j < len(pending)}
            reasons = {i: inner.get(i, str(e)) for i in pending}
            break
        except Exception as e:  # noqa: BLE001 - any failure of a user's reward is retried, then reported
            last_error = e
            reasons = {i: f"{type(e).__name__}: {e} (attempt {attempt + 1})" for i in pending}
            continue
        still = []
        for j, i in enumerate(pending):
            s = out.scores[j]
            if s is not None and not math.isfinite(s):
                still.append(i)
                reasons[i] = f"returned {s} (attempt {attempt + 1})"
                continue
            scores[i] = s
            for key, values in out.details.items():
                details.setdefault(key, [None] * n)[i] = values[j]
        pending = still
        if not pending:
            break
    if pending:
        failed = [reasons[i] for i in pending]
        if policy.on_failure == "raise":
            raise RewardError(reward.name, pending, failed) from last_error
        details["failed"] = [reasons.get(i) for i in range(n)]
    return RewardOutput(scores, details)
