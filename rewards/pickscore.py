"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic human preferences.

Loaded as its model card does: ``CLIPModel.from_pretrained("yuvalkirstain/PickScore_v1")`` with the processor of
the base model, ``AutoProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")`` (both also take local
directories). Text is padded and truncated to 77 tokens, as in the card.

Score: ``logit_scale.exp() * cosine(image, prompt)``, i.e. the card's logits (about 18-24 for real PickScore; flow_grpo
divides by 26: use a weight of 1/26 to match). Never None. Detail: ``cosine``.
"""

from __future__ import annotations

import torch

from ._hub import as_dtype, hf_image_features, hf_text_features
from .base import Reward


class PickScore(Reward):
    name = "pickscore"
    modalities = ("image",)

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device="cpu", dtype="float32",
                 batch_size: int = 16, clip_model=None, clip_processor=None):  # fmt: skip
        if clip_model is None:
            from transformers import AutoProcessor, CLIPModel

            clip_model = CLIPModel.from_pretrained(model).to(as_dtype(dtype))
            clip_processor = AutoProcessor.from_pretrained(processor)
        self.model = clip_model.to(device).eval().requires_grad_(False)
        self.processor, self.batch_size = clip_processor, batch_size

    @classmethod
    def from_model(cls, clip_model, clip_processor, device="cpu", **kwargs):
        return cls(clip_model=clip_model, clip_processor=clip_processor, device=device, **kwargs)

    @torch.no_grad()
    def score(self, *, prompts, images, **kwargs):
        cos = (hf_image_features(self.model, self.processor, images, self.batch_size)
               * hf_text_features(self.model, self.processor, prompts, self.batch_size)).sum(-1)  # fmt: skip
        scale = self.model.logit_scale.exp().float().item()
        return (scale * cos).tolist(), {"cosine": cos.tolist()}
