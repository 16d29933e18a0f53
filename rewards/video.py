"""Video rewards: temporal consistency, and any image reward applied to sampled frames.

- ``video_temporal_consistency``: mean CLIP (open_clip) cosine similarity of neighbouring frames, in [-1, 1]
  (near 1 for smooth video, lower for flicker or cuts). None for a single-frame video. Details: ``min`` (the
  least similar neighbouring pair). ``max_frames`` frames are taken evenly across the video first. The default,
  OpenAI's ViT-B-32, is built with QuickGELU as it was trained (see ``rewards.clip``).
- ``frames``: ``FrameReward(reward, num_frames=4, reduce="mean")`` scores ``num_frames`` evenly spaced frames of
  each video with an image reward (prompts, conditions and metadata repeated per frame) and reduces them with
  ``mean`` or ``min`` over the frames the reward applies to; None where it applies to none. Its range is the image
  reward's. Details: ``frames`` (the per-frame scores).
"""

from __future__ import annotations

import numpy as np

from .base import Reward
from .clip import OpenClip


def frame_indices(total: int, num: int) -> list[int]:
    """``num`` frame indices spread evenly from the first to the last frame (all of them if fewer)."""
    return sorted(set(np.linspace(0, total - 1, min(num, total)).round().astype(int).tolist()))


class TemporalConsistency(Reward):
    name = "video_temporal_consistency"
    modalities = ("video",)

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "openai", device="cpu",
                 precision: str = "fp32", max_frames: int = 16, batch_size: int = 32,
                 clip: OpenClip | None = None):  # fmt: skip
        self.clip = clip or OpenClip.load(model_name, pretrained, device, precision, batch_size=batch_size)
        self.max_frames = max_frames

    @classmethod
    def from_model(cls, model, preprocess, tokenizer, device="cpu", **kwargs):
        return cls(clip=OpenClip(model, preprocess, tokenizer, device), **kwargs)

    def score(self, *, videos, **kwargs):
        scores, worst = [], []
        for video in videos:
            if len(video) < 2:
                scores.append(None)
                worst.append(None)
                continue
            emb = self.clip.embed_images(list(video[frame_indices(len(video), self.max_frames)]))
            sims = (emb[1:] * emb[:-1]).sum(-1)
            scores.append(float(sims.mean()))
            worst.append(float(sims.min()))
        return scores, {"min": worst}


def _reduce(values: list, how: str) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return float(np.mean(present) if how == "mean" else np.min(present))


class FrameReward(Reward):
    modalities = ("video",)
    REDUCE = ("mean", "min")

    def __init__(self, reward="clip_score", num_frames: int = 4, reduce: str = "mean", **reward_kwargs):
        from .registry import load_reward

        if reduce not in self.REDUCE:
            raise ValueError(f"reduce must be one of {self.REDUCE}, got {reduce!r}")
        self.inner = load_reward(reward, **reward_kwargs)
        if "image" not in self.inner.modalities:
            raise ValueError(f"FrameReward needs an image reward; {self.inner.name!r} scores {self.inner.modalities}")
        self.num_frames, self.reduce = num_frames, reduce
        self.name = f"frames({self.inner.name})"

    def score(self, *, prompts, videos, images=None, conditions=None, metadata=None, **kwargs):
        owner, images = [], []
        for i, video in enumerate(videos):
            for t in frame_indices(len(video), self.num_frames):
                owner.append(i)
                images.append(video[t])
        repeat = lambda xs: None if xs is None else [xs[i] for i in owner]  # noqa: E731
        out = self.inner(prompts=repeat(prompts), images=images, conditions=repeat(conditions),
                         metadata=repeat(metadata), **kwargs)  # fmt: skip
        per_video: list[list] = [[] for _ in videos]
        for i, s in zip(owner, out.scores):
            per_video[i].append(s)
        return [_reduce(ss, self.reduce) for ss in per_video], {"frames": per_video}
