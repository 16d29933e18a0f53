"""Reward-hacking signals, logged beside the proxy reward at every evaluation.

A policy that games its reward model usually drifts in ways a pixel statistic sees before a person does: colours
pushed to saturation (aesthetic and preference models like vivid images), high-frequency texture (edge density), and
a group's samples collapsing onto one image (diversity falls). Each signal is a plain number in [0, 1] per image or
per group, cheap enough for every evaluation.
"""

from __future__ import annotations

import numpy as np


def saturation(image: np.ndarray) -> float:
    """Mean HSV saturation of a uint8 RGB image [H, W, 3] (0: grey, 1: fully saturated)."""
    rgb = image.astype(np.float32) / 255.0
    high, low = rgb.max(-1), rgb.min(-1)
    return float(np.where(high > 0, (high - low) / np.maximum(high, 1e-8), 0.0).mean())


def edge_density(image: np.ndarray, threshold: float = 0.1) -> float:
    """Share of pixels whose luminance gradient (on [0, 1]) exceeds `threshold`. Forward differences, not central
    ones: a central difference is blind to the finest texture there is (a one-pixel checkerboard), the very texture a
    policy gaming its reward tends to paint."""
    grey = image.astype(np.float32).mean(-1) / 255.0
    gx = np.diff(grey, axis=1)[:-1, :]
    gy = np.diff(grey, axis=0)[:, :-1]
    return float((np.hypot(gx, gy) > threshold).mean()) if gx.size else 0.0


def group_diversity(images: list[np.ndarray]) -> float:
    """Mean pairwise RMS distance (pixels on [0, 1]) between the samples of one prompt; 0 when they are identical."""
    flat = [im.astype(np.float32).reshape(-1) / 255.0 for im in images]
    pairs = [np.sqrt(np.mean((a - b) ** 2)) for i, a in enumerate(flat) for b in flat[i + 1 :]]
    return float(np.mean(pairs)) if pairs else 0.0


def signals(images: list[np.ndarray], group_size: int) -> dict[str, float]:
    """The signals of an evaluation batch (images in prompt-major order, `group_size` per prompt)."""
    groups = [images[i : i + group_size] for i in range(0, len(images), group_size)]
    return {
        "saturation": float(np.mean([saturation(im) for im in images])),
        "edge_density": float(np.mean([edge_density(im) for im in images])),
        "diversity": float(np.mean([group_diversity(g) for g in groups])) if group_size > 1 else float("nan"),
    }
