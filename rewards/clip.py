"""CLIP rewards on open_clip: text-image agreement (``clip_score``) and image-image similarity (``image_similarity``).

Both load the way open_clip users do: ``open_clip.create_model_and_transforms(model_name, pretrained=...)`` where
``pretrained`` is an open_clip tag (``"openai"``, ``"laion2b_s32b_b82k"``), a local checkpoint file, or None (random
weights), and ``model_name`` may be an ``"hf-hub:org/repo"`` name. ``from_model`` takes an already built model.

- ``clip_score``: cosine similarity of the L2-normalised image and prompt embeddings, in [-1, 1] (about 0.2-0.35
  for a good match with real CLIP). Never None.
- ``image_similarity`` (editing): cosine similarity of the generated image and its condition image, in [-1, 1];
  None for samples without a condition. A condition video is embedded as the mean of its frames' embeddings.

Other scales of the same cosine: torchmetrics' ``CLIPScore`` reports ``max(100 * cos, 0)``; flow_grpo's CLIP reward is
``logits / 30`` = ``100 * cos / 30`` for OpenAI's CLIP (logit scale 100). Images are resized (shortest side, bicubic)
and centre-cropped, as OpenAI's CLIP and torchmetrics do.

Weights tagged as trained with QuickGELU (``"openai"``, and the LAION-400M, MetaCLIP and DFN tags open_clip marks so)
are built with QuickGELU on every open_clip version: 2.24-2.28 did so for ``"openai"`` only; 2.29 and later build
``nn.GELU`` and only warn, which silently changes every score.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .base import Reward


def trained_with_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether the open_clip tag ``pretrained`` names weights trained with QuickGELU (OpenAI's CLIP, some LAION runs).

    False for a checkpoint file, no weights, or an ``hf-hub:``/``local-dir:`` model, whose own config decides."""
    if not pretrained or model_name.startswith(("hf-hub:", "local-dir:")):
        return False
    if pretrained.lower() == "openai":  # open_clip < 2.29 marks no tag, but every OpenAI CLIP used QuickGELU
        return True
    import open_clip

    return bool(open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained).get("quick_gelu", False))


class OpenClip:
    """An open_clip model with its preprocessing and tokenizer: L2-normalised image and text embeddings."""

    def __init__(self, model, preprocess, tokenizer, device: str | torch.device = "cpu", batch_size: int = 32):
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.device, self.batch_size = torch.device(device), batch_size
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def load(cls, model_name: str, pretrained: str | None, device="cpu", precision: str = "fp32", **kwargs):
        import open_clip  # heavy: imported only when a CLIP reward is built

        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, precision=precision, device=device,
            force_quick_gelu=trained_with_quick_gelu(model_name, pretrained),
        )  # fmt: skip
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), device, **kwargs)

    @torch.no_grad()
    def embed_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` images -> ``[N, D]`` float32 unit vectors."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(Image.fromarray(im)) for im in images[i : i + self.batch_size]])
            out.append(self.model.encode_image(x.to(self.device, self.dtype)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


class ClipScore(Reward):
    name = "clip_score"
    modalities = ("image",)

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = "openai", device="cpu",
                 precision: str = "fp32", batch_size: int = 32, clip: OpenClip | None = None):  # fmt: skip
        self.clip = clip or OpenClip.load(model_name, pretrained, device, precision, batch_size=batch_size)

    @classmethod
    def from_model(cls, model, preprocess, tokenizer, device="cpu", **kwargs):
        return cls(clip=OpenClip(model, preprocess, tokenizer, device), **kwargs)

    def score(self, *, prompts, images, **kwargs):
        cos = (self.clip.embed_images(images) * self.clip.embed_texts(prompts)).sum(-1)
        return cos.tolist()


class ImageSimilarity(ClipScore):
    name = "image_similarity"

    def score(self, *, images, conditions=None, **kwargs):
        if conditions is None:
            return [None] * len(images)
        have = [i for i, c in enumerate(conditions) if c is not None]
        scores: list[float | None] = [None] * len(images)
        if not have:
            return scores
        generated = self.clip.embed_images([images[i] for i in have])
        for row, i in enumerate(have):
            frames = conditions[i] if conditions[i].ndim == 4 else conditions[i][None]
            ref = torch.nn.functional.normalize(self.clip.embed_images(list(frames)).mean(0), dim=-1)
            scores[i] = float(generated[row] @ ref)
        return scores
