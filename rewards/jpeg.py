"""JPEG (in)compressibility, DDPO's first reward: the size of the image saved as JPEG at quality 95.

``jpeg_compressibility`` = -size in kB (<= 0; higher = simpler images), ``jpeg_incompressibility`` = +size in kB
(>= 0; higher = more detail). kB = 1000 bytes, as in DDPO. Never None. Detail: ``kb``.
"""

from __future__ import annotations

import io

from PIL import Image

from .base import Reward


def jpeg_kb(image, quality: int = 95) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


class JpegIncompressibility(Reward):
    name = "jpeg_incompressibility"
    modalities = ("image",)
    sign = 1.0

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score(self, *, images, **kwargs):
        kb = [jpeg_kb(im, self.quality) for im in images]
        return [self.sign * k for k in kb], {"kb": kb}


class JpegCompressibility(JpegIncompressibility):
    name = "jpeg_compressibility"
    sign = -1.0
