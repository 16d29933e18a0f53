"""LAION aesthetic score: the improved-aesthetic-predictor MLP on L2-normalised CLIP ViT-L/14 image features.

Loaded as flow_grpo and DDPO load it: ``CLIPModel.from_pretrained("openai/clip-vit-large-patch14")`` and its
processor, plus the head weights ``sac+logos+ava1-l14-linearMSE.pth`` (a local path, or ``"org/repo:filename"`` on
the hub). Score: the predicted rating, roughly 1-10 (about 5-6 for typical generations). Never None.
"""

from __future__ import annotations

import torch
from torch import nn

from ._hub import as_dtype, hf_image_features, weights_file
from .base import Reward


class AestheticMLP(nn.Module):
    """The head's exact layout (keys layers.0/2/4/6/7), so the released state dict loads strictly."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


class Aesthetic(Reward):
    name = "aesthetic"
    modalities = ("image",)

    def __init__(self, head_path: str | None = None, clip: str = "openai/clip-vit-large-patch14", device="cpu",
                 dtype="float32", batch_size: int = 16, clip_model=None, clip_processor=None, head=None):  # fmt: skip
        if clip_model is None:
            from transformers import CLIPModel, CLIPProcessor

            clip_model = CLIPModel.from_pretrained(clip).to(as_dtype(dtype))
            clip_processor = CLIPProcessor.from_pretrained(clip)
        if head is None:
            if head_path is None:
                raise ValueError("aesthetic needs head_path: the LAION head 'sac+logos+ava1-l14-linearMSE.pth'")
            head = AestheticMLP(clip_model.config.projection_dim)
            head.load_state_dict(torch.load(weights_file(head_path), map_location="cpu", weights_only=True))
        self.model = clip_model.to(device).eval().requires_grad_(False)
        self.head = head.to(device).float().eval().requires_grad_(False)
        self.processor, self.batch_size = clip_processor, batch_size

    @classmethod
    def from_model(cls, clip_model, clip_processor, head: AestheticMLP, device="cpu", **kwargs):
        return cls(clip_model=clip_model, clip_processor=clip_processor, head=head, device=device, **kwargs)

    @torch.no_grad()
    def score(self, *, images, **kwargs):
        embed = hf_image_features(self.model, self.processor, images, self.batch_size)
        return self.head(embed.to(next(self.head.parameters()).device)).squeeze(-1).tolist()
