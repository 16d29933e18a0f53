"""Shared loading helpers: weight files from a path or the hub, and transformers CLIP features."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def weights_file(spec: str | os.PathLike) -> str:
    """A local file, or ``"org/repo:filename"`` fetched (or found in the cache) with ``huggingface_hub``."""
    path = os.path.expanduser(str(spec))
    if os.path.isfile(path):
        return path
    if ":" in path and "/" in path.split(":", 1)[0] and not os.path.exists(path.split(":", 1)[0]):
        from huggingface_hub import hf_hub_download

        repo_id, filename = path.split(":", 1)
        return hf_hub_download(repo_id=repo_id, filename=filename)
    raise FileNotFoundError(f"weights file {spec!r} not found (give a local path or 'org/repo:filename' on the hub)")


def _pooled(out) -> torch.Tensor:
    # transformers < 5 returns the projected features; 5.x returns an output whose pooler_output holds them.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def hf_image_features(model, processor, images: list[np.ndarray], batch_size: int = 16) -> torch.Tensor:
    """L2-normalised ``CLIPModel.get_image_features`` for uint8 images, float32 ``[N, D]``."""
    device, dtype = model.device, model.dtype
    out = []
    for i in range(0, len(images), batch_size):
        pil = [Image.fromarray(im) for im in images[i : i + batch_size]]
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(device, dtype)
        out.append(_pooled(model.get_image_features(pixel_values=pixels)).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def hf_text_features(model, processor, texts: list[str], batch_size: int = 16, max_length: int = 77) -> torch.Tensor:
    device = model.device
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = processor(text=list(texts[i : i + batch_size]), padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt")  # fmt: skip
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        out.append(_pooled(model.get_text_features(**tokens)).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)
