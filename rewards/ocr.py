"""OCR accuracy of the text a prompt asks for (flow_grpo's ``ocr`` reward, on RapidOCR instead of PaddleOCR).

The target is the first double-quoted span of the prompt (``'a sign that says "OPEN"'`` -> ``OPEN``; straight or
curly quotes), or ``metadata["ocr_text"]`` where given. The recognised text joins, in reading order, the boxes whose
confidence is above ``min_confidence`` (default 0: as in flow_grpo, a box read with confidence 0 is dropped). Both
texts are lower-cased with spaces removed, then, as in flow_grpo:

    score = 1 if the target occurs in the recognised text, else 1 - min(edit_distance, len(target)) / len(target)

Range [0, 1]; None when the prompt quotes no text (the reward does not apply). Details: ``ocr_text`` (recognised),
``target``.

The default engine, ``rapidocr-onnxruntime``, ships its PP-OCRv4 ONNX weights inside the wheel, so it runs offline.
Any ``engine(rgb_uint8) -> list[(text, confidence)]`` callable can replace it.
"""

from __future__ import annotations

import re
import threading

import numpy as np

from .base import Reward

_QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d')


def quoted_text(prompt: str) -> str | None:
    m = _QUOTED.search(prompt)
    return (m.group(1) or m.group(2)) if m else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_accuracy(recognised: str, target: str) -> float:
    rec, tgt = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not tgt:
        raise ValueError("empty OCR target text")
    if tgt in rec:
        return 1.0
    return 1.0 - min(edit_distance(rec, tgt), len(tgt)) / len(tgt)


class RapidOcrEngine:
    """RapidOCR (PP-OCRv4 det + rec in ONNX Runtime) as ``engine(rgb) -> [(text, confidence)]``."""

    def __init__(self, **kwargs):
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR(**kwargs)
        self._lock = threading.Lock()  # RapidOCR keeps per-call state on the instance

    def __call__(self, image: np.ndarray) -> list[tuple[str, float]]:
        bgr = np.ascontiguousarray(image[..., ::-1])  # a raw array is taken as OpenCV BGR
        with self._lock:
            result, _ = self.engine(bgr, use_cls=False)
        return [(text, float(conf)) for _, text, conf in (result or [])]


class OcrReward(Reward):
    name = "ocr"
    modalities = ("image",)

    def __init__(self, engine=None, min_confidence: float = 0.0):
        self.engine = engine if engine is not None else RapidOcrEngine()
        self.min_confidence = min_confidence

    def score(self, *, prompts, images, metadata=None, **kwargs):
        scores, recognised, targets = [], [], []
        for i, (prompt, image) in enumerate(zip(prompts, images)):
            target = (metadata[i].get("ocr_text") if metadata else None) or quoted_text(prompt)
            targets.append(target)
            if not target or not target.strip():
                scores.append(None)
                recognised.append(None)
                continue
            text = "".join(t for t, conf in self.engine(image) if conf > self.min_confidence)
            recognised.append(text)
            scores.append(text_accuracy(text, target))
        return scores, {"ocr_text": recognised, "target": targets}
