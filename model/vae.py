"""The latent codecs Lance generates in: the released Wan2.2 VAE and a lossless "PatchVAE" for tiny CPU models.

Every codec has the same small interface (`LatentCodec`): pixel videos `[3, T, H, W]` in [-1, 1] go in, channel-last
latents `[t, h, w, 48]` come out (the layout the official `WanVideoVAE.vae_encode` returns and Lance packs into tokens),
and `decode` inverts it. `latent_grid` and `num_frames` give the shapes without running anything.

- `WanVAE` (spec 1.9): diffusers' `AutoencoderKLWan` in its Wan2.2 configuration, loaded from the official
  `Wan2.2_VAE.pth` (keys converted here) or from a diffusers folder, with the release's per-channel latent
  normalisation and posterior sampling.
- `PatchVAE`: a 4x4 space-to-depth rearrangement, exact and parameter-free. It is NOT Wan2.2; see its docstring.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

WAN_VAE_FILE = "Wan2.2_VAE.pth"

# The release's hard-coded per-channel statistics of the Wan2.2 latent `mu` (`vae2_2.py:Wan2_2_VAE`); diffusers' Wan2.2
# config carries the same 48 values as `latents_mean` / `latents_std`.
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

# `AutoencoderKLWan` arguments for the released Wan2.2 VAE (`WanVAE_(dim=160, dec_dim=256, z_dim=48, ...)`). The
# encoder sees 12 channels and the decoder emits 12 because of the internal 2x2 pixel patchify.
WAN22_DIFFUSERS_CONFIG = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
    latents_mean=list(WAN22_LATENT_MEAN),
    latents_std=list(WAN22_LATENT_STD),
)


def wan22_diffusers_config(**overrides) -> dict:
    """A copy of `WAN22_DIFFUSERS_CONFIG` with `overrides` (e.g. a small `base_dim` for tests)."""
    return {**WAN22_DIFFUSERS_CONFIG, **overrides}


class LatentCodec(Protocol):
    """What Lance needs from a VAE: pixels `[3, T, H, W]` in [-1, 1] <-> latents `[t, h, w, z_channels]`."""

    z_channels: int
    spatial_factor: int  # pixels per latent cell along H and W

    def latent_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]: ...
    def num_frames(self, t_lat: int) -> int: ...
    def encode(self, video: Tensor, sample: bool | None = None, generator: torch.Generator | None = None) -> Tensor: ...
    def decode(self, latents: Tensor) -> Tensor: ...


def _check_video(video: Tensor) -> None:
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W] in [-1, 1], got shape {list(video.shape)}")


def _check_latents(latents: Tensor, z_channels: int) -> None:
    if latents.dim() != 4 or latents.shape[-1] != z_channels:
        raise ValueError(f"expected latents [t, h, w, {z_channels}], got shape {list(latents.shape)}")


def _check_spatial(height: int, width: int, factor: int, name: str) -> None:
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(f"{name} needs height and width that are positive multiples of {factor}, got {height}x{width}")


# Pixels per latent cell (H and W) and frames per latent frame of each codec kind: all a size check needs, so recipes
# are checked against the codec before any weights load.
CODEC_STRIDES = {"patch": (4, 1), "wan2.2": (16, 4)}


def latent_grid_of(kind: str, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The latent grid (t, h, w) codec `kind` gives for an output of `num_frames` x `height` x `width` pixels. Height
    and width must be multiples of the spatial stride; frames beyond the last 4k+1 are dropped, as the release does
    (its 50-frame setting gives 13 latent frames)."""
    if kind not in CODEC_STRIDES:
        raise ValueError(f"unknown VAE kind {kind!r}; expected one of {', '.join(CODEC_STRIDES)}")
    spatial, temporal = CODEC_STRIDES[kind]
    name = "PatchVAE" if kind == "patch" else "Wan2.2 VAE"
    if num_frames < 1:
        raise ValueError(f"{name} needs at least one frame, got {num_frames}")
    _check_spatial(height, width, spatial, name)
    return (num_frames - 1) // temporal + 1, height // spatial, width // spatial


# ---------------------------------------------------------------------------------------------------------- PatchVAE
class PatchVAE:
    """A lossless space-to-depth codec with Wan2.2's latent width, for tiny CPU models and the quickstart.

    Layout: every frame is its own latent frame (no temporal compression: `t = T`, `num_frames(t) = t`), and each 4x4
    pixel block of the 3 RGB planes becomes one latent cell of 3*4*4 = 48 channels, ordered like `pixel_unshuffle`
    (channel `c*16 + dy*4 + dx`). A 32x32 image gives a `[1, 8, 8, 48]` latent; a `[3, 5, 32, 32]` clip gives
    `[5, 8, 8, 48]`. Frame counts are not restricted, but a Lance model can only place as many latent frames as its
    position table has (`LanceConfig.max_num_latent_frames`, 31 by default), so PatchVAE videos are short.

    Normalisation: none. The latents are the pixel values themselves, already in [-1, 1] (std about 0.5 for natural
    images), which is close enough to unit scale for flow matching and keeps `decode(encode(x)) == x` bit-exact.
    `decode` clamps to [-1, 1] like the Wan VAE, which leaves valid inputs unchanged.

    This is NOT the Wan2.2 VAE: its latents mean something else, its grid is 4x (not 16x) in space and 1x (not 4x) in
    time. A model trained on PatchVAE latents is incompatible with the released Lance weights and vice versa.
    """

    z_channels = 48
    spatial_factor = 4
    patch = 4

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PatchVAE":
        if dtype is not None:
            self.dtype = dtype
        return self  # no parameters; tensors stay on the device they come in on

    def latent_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return latent_grid_of("patch", num_frames, height, width)

    def num_frames(self, t_lat: int) -> int:
        if t_lat < 1:
            raise ValueError(f"need at least one latent frame, got {t_lat}")
        return t_lat

    def encode(self, video: Tensor, sample: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
        """`[3, T, H, W]` -> `[T, H/4, W/4, 48]`. `sample` and `generator` are accepted and ignored (deterministic)."""
        _check_video(video)
        self.latent_grid(*video.shape[1:])
        frames = video.to(self.dtype).transpose(0, 1)  # [T, 3, H, W]
        return F.pixel_unshuffle(frames, self.patch).permute(0, 2, 3, 1).contiguous()  # [T, h, w, 48]

    def decode(self, latents: Tensor) -> Tensor:
        """`[t, h, w, 48]` -> `[3, t, 4h, 4w]`, clamped to [-1, 1]."""
        _check_latents(latents, self.z_channels)
        frames = F.pixel_shuffle(latents.to(self.dtype).permute(0, 3, 1, 2), self.patch)  # [T, 3, H, W]
        return frames.transpose(0, 1).clamp(-1.0, 1.0).contiguous()


# ----------------------------------------------------------------------------------- official -> diffusers key names
# A residual block's parts: official `residual` is Sequential(norm, SiLU, conv, norm, SiLU, Dropout, conv).
_RESNET_PARTS = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_RES = "(" + "|".join(re.escape(p) for p in _RESNET_PARTS) + ")"
_WB = r"(weight|bias)"

# (official key pattern, diffusers key template) for the Wan2.2 (residual up/down block) layout. In the official
# blocks the resample layer is the last entry of the same Sequential as the residual blocks (index num_res_blocks in the
# encoder, num_res_blocks + 1 in the decoder); diffusers keeps it apart as `downsampler` / `upsampler`.
_KEY_RULES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(rf"conv1\.{_WB}"), lambda m: f"quant_conv.{m[1]}"),
    (re.compile(rf"conv2\.{_WB}"), lambda m: f"post_quant_conv.{m[1]}"),
    (re.compile(rf"(encoder|decoder)\.conv1\.{_WB}"), lambda m: f"{m[1]}.conv_in.{m[2]}"),
    (re.compile(r"(encoder|decoder)\.head\.0\.gamma"), lambda m: f"{m[1]}.norm_out.gamma"),
    (re.compile(rf"(encoder|decoder)\.head\.2\.{_WB}"), lambda m: f"{m[1]}.conv_out.{m[2]}"),
    # middle = Sequential(ResidualBlock, AttentionBlock, ResidualBlock)
    (re.compile(rf"(encoder|decoder)\.middle\.([02])\.{_RES}"),
     lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.{_RESNET_PARTS[m[3]]}"),
    (re.compile(r"(encoder|decoder)\.middle\.1\.(norm\.gamma|to_qkv\.weight|to_qkv\.bias|proj\.weight|proj\.bias)"),
     lambda m: f"{m[1]}.mid_block.attentions.0.{m[2]}"),
    (re.compile(rf"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.{_RES}"),
     lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}"),
    (re.compile(rf"encoder\.downsamples\.(\d+)\.downsamples\.\d+\.(resample\.1|time_conv)\.{_WB}"),
     lambda m: f"encoder.down_blocks.{m[1]}.downsampler.{m[2]}.{m[3]}"),
    (re.compile(rf"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.{_RES}"),
     lambda m: f"decoder.up_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}"),
    (re.compile(rf"decoder\.upsamples\.(\d+)\.upsamples\.\d+\.(resample\.1|time_conv)\.{_WB}"),
     lambda m: f"decoder.up_blocks.{m[1]}.upsampler.{m[2]}.{m[3]}"),
]  # fmt: skip


def convert_official_wan22_vae_key(key: str) -> str | None:
    """The diffusers `AutoencoderKLWan` name of one official `Wan2.2_VAE.pth` key, or None if no rule matches."""
    for pattern, rename in _KEY_RULES:
        m = pattern.fullmatch(key)
        if m:
            return rename(m)
    return None


def convert_official_wan22_vae_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename every key of an official Wan2.2 VAE state dict to diffusers' names; tensors are not copied.

    Raises KeyError naming the keys no rule maps (e.g. a Wan2.1 VAE, whose blocks are laid out differently).
    """
    out, unmapped = {}, []
    for key, value in sd.items():
        new = convert_official_wan22_vae_key(key)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        shown = ", ".join(unmapped[:10]) + (f" (+{len(unmapped) - 10} more)" if len(unmapped) > 10 else "")
        raise KeyError(f"{len(unmapped)} key(s) of the Wan2.2 VAE state dict have no diffusers name: {shown}")
    return out


def _autoencoder_kl_wan():
    from diffusers import AutoencoderKLWan

    # pyproject allows older diffusers; Wan2.2's residual layout arrived in 0.35.
    if "is_residual" not in inspect.signature(AutoencoderKLWan.__init__).parameters:
        raise ImportError("the Wan2.2 VAE needs diffusers >= 0.35 (AutoencoderKLWan with is_residual and patch_size)")
    return AutoencoderKLWan


def _load_exact(model: torch.nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """`load_state_dict(strict=True, assign=True)` with an error that lists missing, unexpected and mis-shaped keys."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    mismatched = [f"{k} {list(sd[k].shape)} (expected {list(want[k].shape)})"
                  for k in sorted(set(sd) & set(want)) if sd[k].shape != want[k].shape]  # fmt: skip
    if missing or unexpected or mismatched:
        parts = [f"{name}: {', '.join(keys[:10])}" + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                 if keys]  # fmt: skip
        raise ValueError(f"{source} does not fit the Wan2.2 VAE: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True, assign=True)


# ------------------------------------------------------------------------------------------------------------ WanVAE
class WanVAE:
    """The released Wan2.2 VAE (spec 1.9) behind the `LatentCodec` interface, on diffusers' `AutoencoderKLWan`.

    Grid: 16x in space (an internal 2x2 patchify, then three 2x downsamples) and 4x in time, causally: the first frame
    is encoded alone, then chunks of 4, so T = 4k+1 frames give k+1 latent frames and t latent frames decode to
    4(t-1)+1 frames. Like the release, `encode` ignores the last (T-1) % 4 frames when T is not of that form (the
    release's i2v path relies on it); `latent_grid` reports the same count.

    Latents are normalised per channel, `(mu - mean) / std` with the release's 48 constants, and `decode` inverts that
    and clamps to [-1, 1]. `encode(sample=True)` (the release's `vae_encode` default, used for training targets and for
    condition latents) returns `mu_n + exp(0.5 * log_var) * eps`: `log_var` comes straight from the encoder, neither
    clamped nor rescaled by `std` (spec quirk 9.8). `sample=False` returns `mu_n`.

    Memory: diffusers decodes one latent frame at a time (and encodes one chunk of 4 frames at a time) with causal
    feature caches, so activations scale with one frame's area, not with the frame count: roughly 10 GB in fp32 at
    480x848 (scaled from a CPU measurement, not measured on a GPU), plus the 0.6 GB output of a 121-frame video and
    2.8 GB of weights.
    `tiling=True` (diffusers' `enable_tiling`; default tiles 256 px, stride 192, with blended seams) bounds them by the
    tile size instead. There is no batch to slice (one video per call). Runs in fp32 by default, on any device; no
    autocast. Never trained: eval mode, no gradients.
    """

    z_channels = 48
    spatial_factor = 16
    temporal_factor = 4

    def __init__(self, model, sample: bool = True, tiling: bool | dict = False) -> None:
        cfg = model.config
        if cfg.z_dim != 48 or cfg.patch_size != 2 or not cfg.is_residual:
            raise ValueError(
                "not a Wan2.2 VAE: expected z_dim 48, patch_size 2, is_residual True, got "
                f"z_dim {cfg.z_dim}, patch_size {cfg.patch_size}, is_residual {cfg.is_residual}"
            )
        mean = getattr(cfg, "latents_mean", None)
        std = getattr(cfg, "latents_std", None)
        if mean is not None and std is not None and (
            len(mean) != 48 or not torch.allclose(torch.tensor(mean), torch.tensor(WAN22_LATENT_MEAN), atol=1e-6)
            or not torch.allclose(torch.tensor(std), torch.tensor(WAN22_LATENT_STD), atol=1e-6)
        ):  # fmt: skip
            logger.warning("the VAE config's latents_mean/std differ from the release's; using the release's values")
        self.model = model.eval().requires_grad_(False)
        self.sample = sample
        self.mean = torch.tensor(WAN22_LATENT_MEAN, dtype=torch.float32)
        self.std = torch.tensor(WAN22_LATENT_STD, dtype=torch.float32)
        if tiling:
            self.enable_tiling(**(tiling if isinstance(tiling, dict) else {}))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_official(cls, path: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
                      config: dict | None = None, **options) -> "WanVAE":  # fmt: skip
        """Load the release's `Wan2.2_VAE.pth` (a plain state dict) into a diffusers `AutoencoderKLWan`.

        `config` overrides `WAN22_DIFFUSERS_CONFIG` (only tests need it); `options` go to `WanVAE(...)`. The module is
        built on the meta device and the file's tensors are assigned into it, so the weights exist once in memory.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Wan2.2 VAE weights not found at {path}")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        converted = convert_official_wan22_vae_state_dict(sd)
        with torch.device("meta"):
            model = _autoencoder_kl_wan()(**(config or WAN22_DIFFUSERS_CONFIG))
        _load_exact(model, converted, str(path))
        return cls(model.to(device=device, dtype=dtype), **options)

    @classmethod
    def from_diffusers(cls, path: str | Path, device="cpu", dtype: torch.dtype = torch.float32, **options) -> "WanVAE":
        """Load a diffusers-format `AutoencoderKLWan` folder (or a pipeline folder holding one in `vae/`), offline."""
        path = Path(path)
        subfolder = "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else None
        model = _autoencoder_kl_wan().from_pretrained(
            path, subfolder=subfolder, local_files_only=True, torch_dtype=dtype
        )
        return cls(model.to(device), **options)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "WanVAE":
        self.model.to(device=device, dtype=dtype)
        return self

    def enable_tiling(self, **kwargs) -> None:
        """Decode (and encode) in overlapping spatial tiles; kwargs as diffusers' `enable_tiling` (pixel sizes)."""
        self.model.enable_tiling(**kwargs)

    def disable_tiling(self) -> None:
        self.model.disable_tiling()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ shapes
    def latent_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return latent_grid_of("wan2.2", num_frames, height, width)

    def num_frames(self, t_lat: int) -> int:
        if t_lat < 1:
            raise ValueError(f"need at least one latent frame, got {t_lat}")
        return 4 * (t_lat - 1) + 1

    # ------------------------------------------------------------------ codec
    @torch.no_grad()
    def encode(self, video: Tensor, sample: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
        """`[3, T, H, W]` in [-1, 1] -> normalised latents `[t, H/16, W/16, 48]` (fp32, on the model's device).

        `sample=None` uses the codec's default (`self.sample`, True like the release). `generator` makes the
        posterior noise reproducible; it may live on any device.
        """
        _check_video(video)
        t_lat, _, _ = self.latent_grid(*video.shape[1:])
        video = video[:, : self.num_frames(t_lat)]  # frames that do not fill a chunk of 4 are never encoded
        x = video.unsqueeze(0).to(device=self.device, dtype=self.dtype)  # [1, 3, T, H, W]
        # The raw moments: diffusers' DiagonalGaussianDistribution would clamp log_var, the release does not.
        moments = self.model.encode(x).latent_dist.parameters.float()  # [1, 96, t, h, w]
        mu, log_var = moments[0].chunk(2, dim=0)  # [48, t, h, w] each
        shape = (-1, 1, 1, 1)
        z = (mu - self.mean.to(mu.device).view(shape)) / self.std.to(mu.device).view(shape)
        if (self.sample if sample is None else sample):
            if generator is None:
                eps = torch.randn_like(z)
            else:
                eps = torch.randn(z.shape, generator=generator, device=generator.device, dtype=z.dtype).to(z.device)
            z = z + torch.exp(0.5 * log_var) * eps
        return z.permute(1, 2, 3, 0).contiguous()  # [t, h, w, 48]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents `[t, h, w, 48]` -> pixels `[3, 4(t-1)+1, 16h, 16w]` in [-1, 1] (fp32)."""
        _check_latents(latents, self.z_channels)
        z = latents.to(device=self.device, dtype=torch.float32).permute(3, 0, 1, 2)  # [48, t, h, w]
        shape = (-1, 1, 1, 1)
        z = z * self.std.to(z.device).view(shape) + self.mean.to(z.device).view(shape)
        video = self.model.decode(z.unsqueeze(0).to(self.dtype)).sample  # [1, 3, T, H, W]
        return video[0].float().clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------- builders
WAN_VAE_DIFFUSERS_DIR = "Wan2.2_VAE"  # a diffusers-format folder (what `init-tiny --vae wan2.2` writes)


def find_wan_vae(model_dir: str | Path) -> Path | None:
    """`Wan2.2_VAE.pth` inside `model_dir` or beside it (the release's `downloads/` layout), or a diffusers-format
    `Wan2.2_VAE/` folder inside it; else None."""
    model_dir = Path(model_dir)
    for candidate in (model_dir / WAN_VAE_FILE, model_dir.parent / WAN_VAE_FILE):
        if candidate.is_file():
            return candidate
    folder = model_dir / WAN_VAE_DIFFUSERS_DIR
    return folder if (folder / "config.json").is_file() else None


def write_tiny_wan_vae(directory: str | Path, seed: int = 0, base_dim: int = 8, decoder_base_dim: int = 12) -> Path:
    """A tiny random Wan2.2-structured VAE in diffusers format (same layout as the release, narrow channels)."""
    torch.manual_seed(seed)
    model = _autoencoder_kl_wan()(**wan22_diffusers_config(base_dim=base_dim, decoder_base_dim=decoder_base_dim))
    model.save_pretrained(str(directory))
    return Path(directory)


def build_vae(config_or_kind, path: str | Path | None = None, device="cpu", dtype: torch.dtype = torch.float32,
              **options) -> LatentCodec:  # fmt: skip
    """The codec a `LanceConfig` (its `.vae`) or a kind name ("wan2.2" | "patch") asks for.

    For "wan2.2", `path` is the official `Wan2.2_VAE.pth`, a directory holding it, or a diffusers-format folder;
    `options` (`sample`, `tiling`) go to `WanVAE`. "patch" needs no file.
    """
    kind = config_or_kind if isinstance(config_or_kind, str) else config_or_kind.vae
    if kind == "patch":
        return PatchVAE(dtype=dtype)
    if kind != "wan2.2":
        raise ValueError(f"unknown VAE kind {kind!r}; expected 'wan2.2' or 'patch'")
    if path is None:
        raise FileNotFoundError(
            f"the Wan2.2 VAE needs its weights: pass the path of {WAN_VAE_FILE} (the release keeps it beside the "
            "model directory, e.g. downloads/Wan2.2_VAE.pth; see find_wan_vae) or of a diffusers-format folder"
        )
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "vae" / "config.json").is_file():
            return WanVAE.from_diffusers(path, device=device, dtype=dtype, **options)
        if (path / WAN_VAE_FILE).is_file():
            return WanVAE.from_official(path / WAN_VAE_FILE, device=device, dtype=dtype, **options)
        raise FileNotFoundError(f"{path} holds neither {WAN_VAE_FILE} nor a diffusers VAE (config.json)")
    if not path.is_file():
        raise FileNotFoundError(f"Wan2.2 VAE weights not found at {path} (expected {WAN_VAE_FILE})")
    if path.suffix != ".pth":
        raise ValueError(f"{path}: expected the official {WAN_VAE_FILE} (a .pth state dict) or a diffusers folder")
    return WanVAE.from_official(path, device=device, dtype=dtype, **options)
