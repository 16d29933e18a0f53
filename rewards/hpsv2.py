"""HPS v2 / v2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preference pairs.

Loaded as the ``hpsv2`` package does, without its pip dependency: ``open_clip.create_model_and_transforms("ViT-H-14")``
then the HPS checkpoint (``{"state_dict": ...}``) from ``checkpoint``: a local path (``HPS_v2.1_compressed.pt``) or
``"xswu/HPSv2:HPS_v2.1_compressed.pt"`` on the hub. ``pretrained`` is None by default because the HPS checkpoint holds
the whole model (the LAION weights would be overwritten).

Images are preprocessed as ``hpsv2.score`` (and flow_grpo's HPS scorer) do, not as open_clip's standard transform:
the image as a float tensor in [0, 1] is resized (bicubic, antialiased) so that its longest side is 224, padded with
zeros to a centred 224 x 224 square, then normalised. Nothing is cropped away. (``hpsv2.score`` leaves a non-square
image whose longest side is already 224 unpadded, and the ViT then fails; here it is padded like any other.)

Score: cosine similarity of the normalised image and prompt embeddings, as ``hpsv2.score`` returns it, in [-1, 1]
(about 0.2-0.35 for real HPS v2.1; flow_grpo uses it unscaled). Never None.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ._hub import weights_file
from .clip import ClipScore, OpenClip

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class LongestSidePadTransform:
    """PIL image -> ``[3, size, size]``: longest side resized to ``size``, centred in zero padding, normalised."""

    def __init__(self, size: int, mean=OPENAI_MEAN, std=OPENAI_STD):
        self.size, self.mean, self.std = size, list(mean), list(std)

    @classmethod
    def for_model(cls, model) -> LongestSidePadTransform:
        """Sized and normalised for an open_clip model, reading the same attributes ``hpsv2`` reads."""
        size = model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_STD
        return cls(size, mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = TF.to_tensor(image.convert("RGB"))  # resized as floats: no rounding to uint8 after the resize
        height, width = x.shape[-2:]
        scale = self.size / max(height, width)
        new_height, new_width = round(height * scale), round(width * scale)
        if (new_height, new_width) != (height, width):
            x = TF.resize(x, [new_height, new_width], InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = self.size - new_height, self.size - new_width
        # left, top, right, bottom: the odd pixel of padding goes right / bottom
        x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0)
        return TF.normalize(x, self.mean, self.std)


class HPSv2(ClipScore):
    name = "hpsv2"
    modalities = ("image",)

    def __init__(self, checkpoint: str = "xswu/HPSv2:HPS_v2.1_compressed.pt", model_name: str = "ViT-H-14",
                 pretrained: str | None = None, device="cpu", precision: str = "fp32", batch_size: int = 32,
                 clip: OpenClip | None = None):  # fmt: skip
        if clip is None:
            import open_clip

            clip = OpenClip.load(model_name, pretrained, device, precision, batch_size=batch_size)
            open_clip.load_checkpoint(clip.model, weights_file(checkpoint))  # strict: a wrong file fails here
            clip.preprocess = LongestSidePadTransform.for_model(clip.model)
        super().__init__(clip=clip)

    @classmethod
    def from_model(cls, model, preprocess, tokenizer, device="cpu", **kwargs):
        """An already built HPS model; ``preprocess`` is ignored: HPS's own resize-and-pad transform replaces it."""
        return cls(clip=OpenClip(model, LongestSidePadTransform.for_model(model), tokenizer, device), **kwargs)
