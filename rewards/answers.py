"""Text rewards: answers the understanding expert wrote (`completions=`), scored against references (`answers=`).

    exact_answer   1 when the answer equals the reference (or one of several), after light normalisation
    answer_format  1 when the answer is a short, single-line answer (at most `max_words` words; optional regex)
    shapes_vqa     the shapes world's question answering: 1 when the answer is right for the image's caption, with the
                   forms a person would accept ("two" or "2", "circle" or "circles", "left" or "on the left");
                   details per question type (count, color, position, shape), so accuracy is logged per type

They declare the modality "text": they take `completions` (one string per sample) and optionally `answers` and
`metadata`, and image or video batches are refused with a clear error. Like every reward they return one score per
sample, or None where the reward does not apply (no reference answer, a question that is not a shapes question).
"""

from __future__ import annotations

import re

from .base import Reward
from .shapes import COLORS, COUNTS, POSITIONS, SHAPES, ShapesPrompt

_ARTICLES = re.compile(r"^(a|an|the)\s+")
_EDGE_PUNCTUATION = "\"'`.,;:!?()[]{} \t\n"


def normalize_answer(text: str) -> str:
    """Lower case, surrounding punctuation and quotes stripped, whitespace collapsed, a leading article dropped."""
    text = " ".join(text.lower().split()).strip(_EDGE_PUNCTUATION)
    return _ARTICLES.sub("", text)


def _accepted(answer) -> list[str]:
    return [answer] if isinstance(answer, str) else list(answer)


class ExactAnswer(Reward):
    """1.0 when the completion equals its reference answer (any of them, when a list is given), else 0.0; None where
    a sample has no reference. `normalize=False` compares the raw strings."""

    name = "exact_answer"
    modalities = ("text",)

    def __init__(self, normalize: bool = True):
        self.normalize = normalize

    def score(self, *, completions, answers=None, **kwargs):
        if answers is None:
            return [None] * len(completions)
        norm = normalize_answer if self.normalize else (lambda s: s)
        return [None if ref is None else float(norm(c) in {norm(a) for a in _accepted(ref)})
                for c, ref in zip(completions, answers)]  # fmt: skip


class AnswerFormat(Reward):
    """1.0 for a well-formed short answer: not empty, one line, at most `max_words` words and, if `pattern` is
    given, matching it in full (a regular expression over the stripped answer); else 0.0."""

    name = "answer_format"
    modalities = ("text",)

    def __init__(self, max_words: int = 3, pattern: str | None = None):
        if max_words < 1:
            raise ValueError(f"answer_format: max_words must be at least 1, got {max_words}")
        self.max_words = max_words
        self.pattern = re.compile(pattern) if pattern else None

    def score(self, *, completions, **kwargs):
        return [float(self._well_formed(c)) for c in completions]

    def _well_formed(self, text: str) -> bool:
        stripped = text.strip()
        if not stripped or "\n" in stripped or len(stripped.split()) > self.max_words:
            return False
        return self.pattern is None or self.pattern.fullmatch(stripped) is not None


# ------------------------------------------------------------------------------------------------ the shapes world
QUESTION_TYPES = ("count", "color", "position", "shape")
_NUMBER_WORDS = {v: k for k, v in COUNTS.items()}  # 2 -> "two"
_PLURALS = {s: s + "s" for s in SHAPES}


def question_type(question: str) -> str | None:
    """Which attribute a shapes question asks about: count, color, position or shape (None: not a shapes question)."""
    q = question.lower()
    if "how many" in q:
        return "count"
    if "colour" in q or "color" in q:
        return "color"
    if "side" in q or "where" in q:
        return "position"
    if "shape" in q:
        return "shape"
    return None


def accepted_answers(prompt: ShapesPrompt, kind: str) -> set[str]:
    """Every normalised answer form that is right for `kind` about an image of `prompt`."""
    if kind == "count":
        return {_NUMBER_WORDS[prompt.count], str(prompt.count)}
    if kind == "color":
        return {prompt.color}
    if kind == "position":
        side = prompt.position
        return {side, f"on {side}", f"on the {side}", f"at the {side}", f"{side} side", f"the {side} side"}
    if kind == "shape":
        return {prompt.shape, _PLURALS[prompt.shape]}
    raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


class ShapesVQA(Reward):
    """Right (1.0) or wrong (0.0) for a question about a shapes image. The truth is the image's caption
    (`metadata["caption"]`, "two red circles on the left"), or else the reference answer; the question type is
    `metadata["question_type"]` or read from the question. Details: one key per question type holding the score of
    the samples of that type (None for the others), so `rewards/shapes_vqa/<type>` is the per-type accuracy."""

    name = "shapes_vqa"
    modalities = ("text",)

    def score(self, *, prompts, completions, answers=None, metadata=None, **kwargs):
        scores: list[float | None] = []
        details: dict[str, list] = {k: [] for k in QUESTION_TYPES}
        for i, (question, answer) in enumerate(zip(prompts, completions)):
            meta = metadata[i] if metadata else {}
            kind = meta.get("question_type") or question_type(question)
            truth = self._accepted(meta.get("caption"), kind, answers[i] if answers else None)
            value = None if truth is None else float(normalize_answer(answer) in truth)
            scores.append(value)
            for k in QUESTION_TYPES:
                details[k].append(value if k == kind else None)
        return scores, details

    @staticmethod
    def _accepted(caption: str | None, kind: str | None, reference) -> set[str] | None:
        prompt = ShapesPrompt.parse(caption) if caption else None
        if kind in QUESTION_TYPES and prompt is not None:
            return accepted_answers(prompt, kind)
        if reference is not None:  # no caption: the reference answer(s), normalised
            return {normalize_answer(a) for a in _accepted(reference)}
        return None


__all__ = [
    "COLORS",
    "POSITIONS",
    "QUESTION_TYPES",
    "AnswerFormat",
    "ExactAnswer",
    "ShapesVQA",
    "accepted_answers",
    "normalize_answer",
    "question_type",
]  # fmt: skip
