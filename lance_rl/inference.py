"""`lance-rl generate` and `lance-rl understand`: media files in, media files (or text) out, every setting recorded.

The model-side work is `lance_rl.model.sampling` and `lance_rl.model.decoding`; this module only reads and preprocesses the inputs, picks defaults that fit
the checkpoint's latent codec, decodes, and writes the outputs with a JSON record of how they were made.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from lance_rl.model import media
from lance_rl.model.checkpoint import load_lance
from lance_rl.model.decoding import generate_text
from lance_rl.model.guidance import CFGConfig
from lance_rl.model.prefix import GenerationRequest
from lance_rl.model.sampling import SamplerConfig, generate
from lance_rl.model.tasks import GENERATION_TASKS, has_source, is_edit, is_generation, makes_video, reads_video
from lance_rl.model.vision import patchify_video
from lance_rl.policy import load_with_codec

@dataclass
class GenerateSettings:
    checkpoint: str
    task: str
    prompt: str
    out: str
    image: str | None = None
    video: str | None = None
    height: int | None = None  # default: 768 (image) / 480 (video) for Wan2.2, 32 for the PatchVAE
    width: int | None = None  # default: 768 / 848 for Wan2.2, 32 for the PatchVAE
    frames: int | None = None  # video tasks; default 49 (Wan2.2) or 9 (PatchVAE)
    resolution: str | None = None  # preprocessing of the source media: a preset name or an area side
    steps: int = 30
    shift: float = 3.5
    cfg: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm: str = "global"
    cfg_uncond_positions: str = "official"
    seed: int = 42
    num_samples: int = 1
    fps: float = 12.0
    save_latents: bool = False
    vae: str | None = None  # Wan2.2_VAE.pth (default: beside the checkpoint)
    device: str = "cpu"


def _source(path: str, resolution, codec, frame_rule: str | None, is_video: bool, device: str):
    """Read a source image or video and run the release's preprocessing for both the ViT and the VAE."""
    frames = media.read_video(path, frame_rule=frame_rule)[0] if is_video else media.read_image(path)[None]
    vae_in = media.vae_tensor(frames, resolution)  # [3, T, H, W] in [-1, 1]
    patches, vit_grid = patchify_video(media.vit_tensor(frames, resolution))
    latent = codec.encode(vae_in.to(device))  # [t, h, w, C]
    return patches, vit_grid, latent, tuple(vae_in.shape[1:])


def _defaults(s: GenerateSettings, codec) -> tuple[int, int, int, str | int]:
    """Output size and source preprocessing: the release's presets for Wan2.2, small sizes for the PatchVAE."""
    video = makes_video(s.task)
    if type(codec).__name__ == "WanVAE":
        height = s.height or (480 if video else 768)
        width = s.width or (848 if video else 768)
        frames = s.frames or 49
        resolution = s.resolution or ("video_480p" if video else "image_768res")
    else:
        height, width, frames = s.height or 32, s.width or 32, s.frames or 9
        resolution = s.resolution or max(height, width)
    if isinstance(resolution, str) and resolution.isdigit():
        resolution = int(resolution)
    return height, width, (frames if video else 1), resolution


def run_generate(s: GenerateSettings) -> dict:
    if not is_generation(s.task):
        raise ValueError(f"--task must be one of {', '.join(GENERATION_TASKS)}, got {s.task!r}")
    if has_source(s.task) and not (s.image or s.video):
        raise ValueError(f"--task {s.task} needs --image or --video (the source media)")
    if reads_video(s.task) and not s.video:
        raise ValueError(f"--task {s.task} needs --video")
    loaded, codec = load_with_codec(s.checkpoint, vae=s.vae, device=s.device)
    model, tok = loaded.model, loaded.tokenizer
    height, width, frames, resolution = _defaults(s, codec)

    # 1. The request: target grid from the codec; the source through the release's preprocessing.
    request = GenerationRequest(s.task, s.prompt, (0, 0, 0))
    source_shape = None
    if s.task == "i2v":
        _, _, latent, source_shape = _source(s.image, resolution, codec, None, False, s.device)
        height, width = source_shape[1:]  # the output takes the bucketed input image's size, as the release
        request.source_latent = latent[:1]
        request.target_grid = codec.latent_grid(frames, height, width)
    elif is_edit(s.task):
        is_video = reads_video(s.task)
        src = s.video if is_video else s.image
        patches, vit_grid, latent, source_shape = _source(src, resolution, codec, "4k+1" if is_video else None, is_video, s.device)
        request.source_vit = (patches, vit_grid)
        request.source_latent = latent
        request.target_grid = tuple(latent.shape[:3])  # the edit keeps the source's size
        frames, height, width = source_shape
    else:
        request.target_grid = codec.latent_grid(frames, height, width)

    # 2. Sample.
    cfg = CFGConfig(scale=s.cfg, interval=tuple(s.cfg_interval), renorm=s.cfg_renorm, uncond_positions=s.cfg_uncond_positions)
    config = SamplerConfig(num_steps=s.steps, shift=s.shift, kind="ode", cfg=cfg)
    seeds = [s.seed + i for i in range(s.num_samples)]  # the benchmarks' convention: seed + sample index
    bar = tqdm(total=s.steps, desc=f"{s.task} x{s.num_samples}", unit="step")
    started = time.perf_counter()
    traj = generate(model, tok, [request], config, seeds, group_size=s.num_samples,
                    progress=lambda i, n: bar.update(1))  # fmt: skip
    bar.close()

    # 3. Decode and write.
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    t, h, w = request.target_grid
    for i, lat in enumerate(traj.latents):
        grid_lat = lat.view(t, h, w, -1)
        pixels = media.to_uint8(codec.decode(grid_lat))  # [T, H, W, 3]
        stem = out / f"sample_{i:03d}"
        if pixels.shape[0] == 1:
            media.write_png(pixels[0], stem.with_suffix(".png"))
            written.append(str(stem.with_suffix(".png")))
        else:
            media.write_mp4(pixels, stem.with_suffix(".mp4"), fps=s.fps)
            media.write_gif(pixels, stem.with_suffix(".gif"), fps=s.fps)
            written += [str(stem.with_suffix(".mp4")), str(stem.with_suffix(".gif"))]
        if s.save_latents:
            save_file({"latents": grid_lat.contiguous().cpu()}, str(stem) + ".latents.safetensors")
    record = {
        "settings": asdict(s) | {"height": height, "width": width, "frames": frames, "resolution": resolution},
        "seeds": seeds,
        "latent_grid": [t, h, w],
        "source_shape": list(source_shape) if source_shape else None,
        "codec": type(codec).__name__,
        "outputs": written,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_understand(checkpoint: str, question: str, image: str | None = None, video: str | None = None,
                   resolution: str | int | None = None, max_new_tokens: int = 256, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, mape: bool = False,
                   device: str = "cpu") -> str:  # fmt: skip
    if bool(image) == bool(video):
        raise ValueError("give exactly one of --image or --video")
    loaded = load_lance(checkpoint, device=device)
    wan = loaded.model.config.vae == "wan2.2"
    if resolution is None:
        resolution = ("video_480p" if video else "image_768res") if wan else 56
    if isinstance(resolution, str) and resolution.isdigit():  # --resolution 112: an area side, as for generate
        resolution = int(resolution)
    frames = media.read_video(video, frame_rule="even", max_seconds=2.0)[0] if video else media.read_image(image)[None]
    patches, vit_grid = patchify_video(media.vit_tensor(frames, resolution))
    out = generate_text(
        loaded.model, loaded.tokenizer, patches, vit_grid, question, task="x2t_video" if video else "x2t_image",
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
        generator=torch.Generator().manual_seed(seed), mape=mape,
    )  # fmt: skip
    return out.text
