"""Reward curves and sample grids (`lance-rl curves RUN ...`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def save_sample_grid(images: np.ndarray, labels: list[str], path: str | Path, columns: int = 8, scale: int = 4) -> Path:
    """uint8 [B, H, W, 3] images in a grid, each upscaled (nearest) with its label (e.g. the reward) underneath."""
    images = np.asarray(images)
    b, h, w, _ = images.shape
    columns = min(columns, b)
    rows = -(-b // columns)
    cell_h, cell_w, text_h = h * scale, w * scale, 12
    canvas = Image.new("RGB", (columns * (cell_w + 2), rows * (cell_h + text_h + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels)):
        r, c = divmod(i, columns)
        x, y = c * (cell_w + 2), r * (cell_h + text_h + 2)
        canvas.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell_h), label, fill=(0, 0, 0))
    path = Path(path)
    canvas.save(path)
    return path
