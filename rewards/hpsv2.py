"""HPS v2 / v2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preference pairs.

Loaded as the ``hpsv2`` package does, without its pip dependency: ``open_clip.create_model_and_transforms("ViT-H-14")``
then the HPS checkpoint (``{"state_dict": ...}``) from ``checkpoint``: a local path (``HPS_v2.1_compressed.pt``) or
``"xswu/HPSv2:HPS_v2.1_compressed.pt"`` on the hub. ``pretrained`` is None by default because the HPS checkpoint holds
the whole model (the LAION weights would be overwritten).

Score: cosine similarity of the normalised image and prompt embeddings, as ``hpsv2.score`` returns it (about
0.2-0.35 for real HPS v2.1; flow_grpo uses it unscaled). Never None.
"""

from __future__ import annotations

from ._hub import weights_file
from .clip import ClipScore, OpenClip


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
        super().__init__(clip=clip)
