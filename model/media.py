"""Pixels in and out, and the release's preprocessing (spec 3.5, 3.6, 5.4).

Raw frames are uint8 arrays ``[T, H, W, 3]`` (RGB); model inputs are float tensors ``[C, T, H, W]``.

The preprocessing reproduces the official ``ValidationDataset`` / ``VideoTransform`` pipeline:
bucket resize (nearest of six aspect buckets, centre crop + PIL bicubic), centre ``DivisibleCrop``,
normalisation, and the ``MultiClipsFrameSampler`` frame selection. Decoding uses PyAV instead of decord.
"""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from typing import Union

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]


class MediaError(ValueError):
    """A media file that cannot be read, written or fed to the model; the message names the file."""


# preset -> (VAE target area side, ViT target area side); `ValidationDataset.__init__`.
RESOLUTIONS: dict[str, tuple[int, int]] = {
    "video_192p": (256, 224),
    "image_256res": (256, 224),
    "image_512res": (512, 448),
    "image_768res": (768, 672),
    "video_360p": (480, 476),
    "video_480p": (640, 616),
}
ASPECT_RATIOS = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")
VAE_MULTIPLE = 16  # Wan2.2 VAE: 16x spatial downsampling
VIT_MULTIPLE = 28  # Qwen2.5-VL ViT: 14 px patches merged 2x2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Smaller inputs hold less than one VAE latent cell; the release would upscale them blindly.
MIN_SIDE = 16
FRAME_RULES = ("4k+1", "even", None)


# ---------------------------------------------------------------------------------------------- reading


def _name(src: Source) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return str(src)


def _head(src: Source, n: int = 32) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src[:n])
    try:
        with open(src, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise MediaError(f"{_name(src)}: cannot open ({e})") from e


def _stream(src: Source):
    """A fresh file-like object (bytes) or the path itself, for PIL / PyAV."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    return str(src)


def _check_size(name: str, h: int, w: int, min_side: int) -> None:
    if min(h, w) < min_side:
        raise MediaError(f"{name}: {w}x{h} is too small for the model (each side must be >= {min_side} px)")


def _kind(src: Source) -> str:
    """'image', 'gif' or 'video' from the magic bytes (not the extension: parquet rows carry raw bytes)."""
    head = _head(src)
    if not head:
        raise MediaError(f"{_name(src)}: empty file (0 bytes)")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "image"  # HEIF-family stills share the mp4 box layout
    if head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "video"  # mp4/mov, webm/mkv, avi
    image_magic = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
    if head.startswith(image_magic) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    raise MediaError(f"{_name(src)}: unknown media format (header {head[:12]!r})")


def read_image(src: Source, min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode an image to uint8 ``[H, W, 3]``; transparency is composited on white as the release does.

    The release composites RGBA and P (palette) images; LA / PA are composited here too rather than having
    their alpha dropped. Multi-frame files give their first frame. EXIF orientation is ignored, as in the release.
    """
    name = _name(src)
    if not _head(src):
        raise MediaError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(_stream(src)) as im:
            im.load()
            if im.mode == "P" or im.mode == "PA":
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "La", "RGBa"):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
            else:
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{name}: unreadable or corrupt image ({e})") from e
    _check_size(name, arr.shape[0], arr.shape[1], min_side)
    return arr


def _apply_frame_rule(n: int, rule: str | None) -> int:
    if rule == "4k+1":  # the VAE compresses time 4x plus a leading frame: largest 4k+1 <= n
        return max(1, (n - 1) // 4 * 4 + 1)
    if rule == "even":  # the ViT patches pairs of frames
        return max(2, n - n % 2)
    if rule is None:
        return max(1, n)
    raise ValueError(f"frame_rule must be one of {FRAME_RULES}, got {rule!r}")


def sample_frame_indices(
    total: int, src_fps: float, fps: float = 12.0, max_seconds: float | None = 6.0, frame_rule: str | None = "4k+1"
) -> np.ndarray:
    """The release's ``MultiClipsFrameSampler`` (one clip, ``assert_seconds=False``, ``truncate=False``).

    n = round(min(total / src_fps, max_seconds) * fps) adjusted to ``frame_rule``; indices =
    ``linspace(0, total - 1, n)`` truncated to int. Note the indices always span the WHOLE video:
    ``max_seconds`` caps the frame count, not the time window (a 20 s clip gives 69 frames across 20 s).
    Where n > total (low-fps sources) frames repeat, as in the release. The release never yields n < 1;
    it would produce a negative count for clips shorter than 1/(2 fps), which is clamped here.
    """
    duration = total / src_fps
    if max_seconds is not None:
        duration = min(duration, max_seconds)
    n = _apply_frame_rule(int(round(duration * fps)), frame_rule)
    return np.linspace(0, total - 1, n, dtype=int)


def _open_video(src: Source, name: str):
    try:
        container = av.open(_stream(src))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{name}: unreadable or corrupt video ({e})") from e
    if not container.streams.video:
        container.close()
        raise MediaError(f"{name}: no video stream")
    return container


def read_video(
    src: Source,
    fps: float = 12.0,
    max_seconds: float | None = 6.0,
    frame_rule: str | None = "4k+1",
    min_side: int = MIN_SIDE,
) -> tuple[np.ndarray, float]:
    """Decode and sample a video (mp4 / webm / gif / anything PyAV reads) -> (uint8 ``[T, H, W, 3]``, fps_used).

    ``frame_rule``: "4k+1" for VAE targets, "even" for the ViT, None for raw counts. (The release feeds the
    ViT the same 4k+1 frames and pads one, see ``vit_tensor``; "even" is for callers that sample for the ViT
    only.) ``fps_used`` is frames returned per second of source time (== ``fps`` when the clip fits in
    ``max_seconds`` and no frame-rule rounding happened); writing them at that rate keeps real-time speed.
    """
    name = _name(src)
    if not _head(src):
        raise MediaError(f"{name}: empty file (0 bytes)")
    if frame_rule not in FRAME_RULES:
        raise ValueError(f"frame_rule must be one of {FRAME_RULES}, got {frame_rule!r}")
    # Two decoding passes: the first counts frames exactly (container counts lie for gif/webm), the second
    # converts only the sampled ones, so long videos never sit in memory as RGB.
    try:
        with _open_video(src, name) as c:
            stream = c.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            total = sum(1 for _ in c.decode(stream))
        # The release rounds the average fps to an integer (decord), with 24 as the fallback.
        src_fps = int(round(float(rate))) if rate else 24
        src_fps = src_fps or 24
        if total == 0:
            raise MediaError(f"{name}: video has zero decodable frames")
        idx = sample_frame_indices(total, src_fps, fps, max_seconds, frame_rule)
        wanted = set(idx.tolist())
        decoded: dict[int, np.ndarray] = {}
        with _open_video(src, name) as c:
            stream = c.streams.video[0]
            for i, frame in enumerate(c.decode(stream)):
                if i in wanted:
                    decoded[i] = frame.to_ndarray(format="rgb24")
                if i >= idx[-1]:
                    break
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: unreadable or corrupt video ({e})") from e
    if len(decoded) != len(wanted):  # second pass decoded fewer frames than the first counted
        raise MediaError(f"{name}: video frames could not be decoded consistently")
    frames = np.stack([decoded[i] for i in idx.tolist()])
    _check_size(name, frames.shape[1], frames.shape[2], min_side)
    fps_used = len(idx) / (total / src_fps)
    return frames, fps_used


def read_media(
    src: Source,
    fps: float = 12.0,
    max_seconds: float | None = 6.0,
    frame_rule: str | None = "4k+1",
    min_side: int = MIN_SIDE,
) -> tuple[np.ndarray, float | None]:
    """Image or video by content -> (uint8 ``[T, H, W, 3]``, fps_used or None for a still image).

    Still images (and single-frame GIFs) give T = 1; animated GIFs and video containers go through
    ``read_video``.
    """
    kind = _kind(src)
    if kind == "gif":
        try:
            with Image.open(_stream(src)) as im:
                kind = "video" if getattr(im, "n_frames", 1) > 1 else "image"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"{_name(src)}: unreadable or corrupt GIF ({e})") from e
    if kind == "image":
        return read_image(src, min_side=min_side)[None], None
    return read_video(src, fps=fps, max_seconds=max_seconds, frame_rule=frame_rule, min_side=min_side)


# ---------------------------------------------------------------------------------------------- writing


def as_frames(frames) -> np.ndarray:
    """uint8 [T, H, W, 3] from an [H, W, 3] or [T, H, W, 3] array or tensor; anything else raises ValueError
    naming its dtype and shape."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("no frames")
    return frames


def to_uint8(x) -> np.ndarray:
    """Decoded ``[-1, 1]`` pixels ``[3, T, H, W]`` (or ``[3, H, W]``) -> uint8 ``[T, H, W, 3]``, as the release saves."""
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim == 3:
        x = x[:, None]
    x = ((x.clamp(-1, 1) * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def write_png(frame, path) -> None:
    """Write one ``[H, W, 3]`` (or ``[1, H, W, 3]``) uint8 frame as PNG (lossless)."""
    frames = as_frames(frame)
    if frames.shape[0] != 1:
        raise ValueError(f"write_png takes one frame, got {frames.shape[0]}")
    Image.fromarray(frames[0]).save(path, format="PNG")


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def write_mp4(frames, path, fps: float = 12, crf: int = 18) -> None:
    """H.264 (libx264 through PyAV), yuv420p so every player takes it.

    yuv420p subsamples chroma 2x2, so an odd height / width is padded by one pixel (the last row / column
    repeated); the model's outputs are multiples of 16 and never need it.
    """
    frames = as_frames(frames)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w", format="mp4") as c:
        stream = c.add_stream("libx264", rate=_rate(fps), options={"crf": str(crf)})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            c.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(stream.encode())


def write_gif(frames, path, fps: float = 12) -> None:
    """Animated GIF (looping) through PyAV with an adaptive 256-colour palette per frame.

    PIL's GIF writer is not used because it merges identical consecutive frames, changing the frame count.
    GIF delays are whole centiseconds, so the stored rate is approximate (12 fps -> 80 ms, 12.5 fps).
    """
    frames = as_frames(frames)
    with av.open(str(path), mode="w", format="gif") as c:
        stream = c.add_stream("gif", rate=_rate(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "pal8"
        for f in frames:
            p = Image.fromarray(f).quantize(256)
            pal = np.zeros((256, 3), np.uint8)
            rgb = np.asarray(p.getpalette(), np.uint8).reshape(-1, 3)[:256]
            pal[: len(rgb)] = rgb
            argb = np.concatenate([np.full((256, 1), 255, np.uint8), pal], axis=1)  # PyAV wants A, R, G, B
            c.mux(stream.encode(av.VideoFrame.from_ndarray((np.asarray(p), argb), format="pal8")))
        c.mux(stream.encode())


# ---------------------------------------------------------------------------------------------- preprocessing


def _bucket_for_ratio(name: str, area: float, multiple: int) -> tuple[int, int]:
    """The release's ``BucketResize.init_buckets`` for one aspect name -> (h, w).

    Two candidates: round the width first (w = sqrt(area * r)) and derive the height, or round the height
    first; keep the one whose realised ratio is closer to r, ties going to the area closer to the target.
    """
    a, b = (int(v) for v in name.split(":"))
    r = a / b
    w1 = round(math.sqrt(area * r) / multiple) * multiple
    h1 = round(w1 / r / multiple) * multiple
    h2 = round(math.sqrt(area / r) / multiple) * multiple
    w2 = round(h2 * r / multiple) * multiple
    e1, e2 = abs(w1 / h1 - r), abs(w2 / h2 - r)
    if e1 < e2 or (e1 == e2 and abs(w1 * h1 - area) <= abs(w2 * h2 - area)):
        return h1, w1
    return h2, w2


def buckets(area_side: int, multiple: int = VAE_MULTIPLE) -> dict[str, tuple[int, int]]:
    """Aspect name -> (h, w) bucket for a target area of ``area_side**2``."""
    return {name: _bucket_for_ratio(name, area_side**2, multiple) for name in ASPECT_RATIOS}


def bucket_size(height: int, width: int, area_side: int, multiple: int = VAE_MULTIPLE) -> tuple[int, int]:
    """(h, w) of the bucket whose realised w/h ratio is nearest to the input's (first listed wins ties)."""
    sizes = list(buckets(area_side, multiple).values())
    ratio = width / height
    return min(sizes, key=lambda hw: abs(ratio - hw[1] / hw[0]))


def _crop_box(height: int, width: int, ratio: float) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision ``RandomResizedCrop(scale=(1, 1), ratio=(r, r))``.

    Its sampling loop only succeeds when the input already has (almost) ratio r, with a random offset of
    at most a pixel or two; we take the centre there. Otherwise it falls back to this centre crop.
    """
    area = height * width
    w = int(round(math.sqrt(area * ratio)))
    h = int(round(math.sqrt(area / ratio)))
    if not (0 < w <= width and 0 < h <= height):
        in_ratio = width / height
        if in_ratio < ratio:
            w, h = width, int(round(width / ratio))
        elif in_ratio > ratio:
            w, h = int(round(height * ratio)), height
        else:
            w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def bucket_resize(frames, area_side: int, multiple: int = VAE_MULTIPLE) -> np.ndarray:
    """Centre crop to the nearest bucket's aspect, then PIL bicubic resize to the bucket: uint8 ``[T, h, w, 3]``.

    Upscales small inputs as the release does (its ``downsample_only`` flag does not reach ``BucketResize``).
    """
    frames = as_frames(frames)
    _, height, width, _ = frames.shape
    bh, bw = bucket_size(height, width, area_side, multiple)
    top, left, h, w = _crop_box(height, width, bw / bh)
    if h < 1 or w < 1:
        raise MediaError(f"{width}x{height} frames are too small to crop to a {bw}x{bh} bucket")
    out = [
        np.asarray(Image.fromarray(f).crop((left, top, left + w, top + h)).resize((bw, bh), Image.BICUBIC))
        for f in frames
    ]
    return np.stack(out)


def divisible_crop(frames, multiple: int) -> np.ndarray:
    """Centre crop H and W down to multiples of ``multiple`` (torchvision ``center_crop`` offsets)."""
    frames = as_frames(frames)
    _, height, width, _ = frames.shape
    h, w = height - height % multiple, width - width % multiple
    if h == 0 or w == 0:
        raise MediaError(f"{width}x{height} frames are smaller than the crop multiple {multiple}")
    top, left = int(round((height - h) / 2.0)), int(round((width - w) / 2.0))
    return frames[:, top : top + h, left : left + w]


def _sides(resolution: str | int) -> tuple[int, int]:
    if isinstance(resolution, str):
        if resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution preset {resolution!r}; known: {sorted(RESOLUTIONS)}")
        return RESOLUTIONS[resolution]
    return int(resolution), int(resolution)


def _normalise(frames: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255)  # T H W C, like to_tensor
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    return ((x - mean_t) / std_t).permute(3, 0, 1, 2).contiguous()  # C T H W


def vae_tensor(frames, resolution: str | int) -> torch.Tensor:
    """VAE input ``[3, T, H, W]`` in [-1, 1], H and W multiples of 16.

    ``resolution``: a ``RESOLUTIONS`` preset name (its VAE side is used) or an area side in pixels.
    """
    x = divisible_crop(bucket_resize(frames, _sides(resolution)[0], VAE_MULTIPLE), VAE_MULTIPLE)
    return _normalise(x, (0.5,) * 3, (0.5,) * 3)


def vit_tensor(frames, resolution: str | int) -> torch.Tensor:
    """ViT input ``[3, T', H, W]``, CLIP-normalised, H and W multiples of 28, T' even.

    Buckets still use multiples of 16 (the release's ViT transform keeps the default stride) before the
    28-crop. The ViT's temporal patch is 2 frames: a single image is duplicated, an odd count gets its last
    frame repeated (both cases are the same operation).
    """
    x = divisible_crop(bucket_resize(frames, _sides(resolution)[1], VAE_MULTIPLE), VIT_MULTIPLE)
    if x.shape[0] % 2:
        x = np.concatenate([x, x[-1:]])
    return _normalise(x, CLIP_MEAN, CLIP_STD)


__all__ = [
    "MediaError", "RESOLUTIONS", "ASPECT_RATIOS", "CLIP_MEAN", "CLIP_STD", "MIN_SIDE",
    "read_image", "read_video", "read_media", "sample_frame_indices",
    "write_png", "write_mp4", "write_gif", "to_uint8", "as_frames",
    "buckets", "bucket_size", "bucket_resize", "divisible_crop", "vae_tensor", "vit_tensor",
]
