"""Our rewards as TRL reward functions: TRL's keywords in, our text-batch contract (prompts, completions, answers,
conditions, metadata) to the reward, under its failure policy and normalisation."""

from __future__ import annotations

import numpy as np


def question_text(prompt) -> str:
    """The question text of a conversational prompt (its last user turn's text parts)."""
    for message in reversed(prompt):
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def _completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"])
                   for m in completion if m["role"] == "assistant")  # fmt: skip


def _media_array(frames) -> np.ndarray | None:
    if frames is None:
        return None
    arrays = [np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in frames]
    return arrays[0] if len(arrays) == 1 else np.stack(arrays)


def text_batch(prompts, completions, columns: dict) -> dict:
    """TRL's reward keywords -> our reward contract: the question as `prompts`, the answers as `completions`, the
    dataset's `answer` column as `answers`, the question's image or clip as `conditions`, the other scalar columns as
    `metadata`."""
    n = len(prompts)
    skip = {"image", "images", "answer", "prompt", "trainer_state", "log_extra", "log_metric", "completion_ids",
            "environments"}  # fmt: skip
    scalar = {k: v for k, v in columns.items() if k not in skip and isinstance(v, list) and len(v) == n}
    return {
        "prompts": [question_text(p) for p in prompts],
        "completions": [_completion_text(c) for c in completions],
        "answers": columns.get("answer"),
        "conditions": [_media_array(im) for im in columns["image"]] if "image" in columns else None,
        "metadata": [{k: v[i] for k, v in scalar.items()} for i in range(n)],
    }


class TRLReward:
    """One component of our reward mix as a TRL reward function: TRL calls it with its keywords, it scores the batch
    under the component's failure policy (retries, timeouts, Ray actors, a remote server: as for images), applies
    the component's normalisation and logs its details (per question type for shapes_vqa) through `log_metric`.
    TRL weighs it (`reward_weights`) and returns NaN for None, leaving that reward out for the sample."""

    def __init__(self, component):
        self.component = component
        self.__name__ = component.name  # TRL names the reward's metrics after it: rewards/<name>/mean

    def __call__(self, prompts, completions, log_metric=None, **columns) -> list[float | None]:
        from lance_rl.rewards.failure import score_with_policy

        c = self.component
        out = score_with_policy(c.reward, c.policy, **text_batch(prompts, completions, columns))
        if log_metric is not None:
            for key, values in out.details.items():
                numbers = [
                    v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
                ]
                if numbers:
                    log_metric(f"rewards/{c.name}/{key}/mean", float(np.mean(numbers)))
        return c.normalized(out.scores)
