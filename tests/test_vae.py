"""Latent codecs: the lossless PatchVAE, a tiny random Wan2.2-layout VAE, and the official-key conversion."""

import pytest
import torch

from lance_rl.model.config import LanceConfig
from lance_rl.model.vae import (
    WAN22_DIFFUSERS_CONFIG,
    WAN22_LATENT_MEAN,
    WAN22_LATENT_STD,
    PatchVAE,
    WanVAE,
    build_vae,
    convert_official_wan22_vae_state_dict,
    find_wan_vae,
    wan22_diffusers_config,
)

# A small encoder width and a different decoder width, so that a dim/dec_dim mix-up shows as a shape mismatch.
TINY = dict(base_dim=8, decoder_base_dim=12)


def official_wan22_vae_shapes(dim, dec_dim, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                              temporal_downsample=(False, True, True)):  # fmt: skip
    """Key -> shape of the official `WanVAE_` state dict (Lance `modeling/vae/wan/vae2_2.py`), from its structure.

    Encoder/decoder: conv1, then `downsamples.i.downsamples.j` / `upsamples.i.upsamples.j` residual blocks (with a
    1x1x1 `shortcut` when channels change) closed by a `Resample` (`resample.1` 2-D conv, plus `time_conv` when it is
    temporal), a `middle` of residual/attention/residual, and a `head` (norm, SiLU, conv). Between them, `conv1`
    (posterior moments) and `conv2` (before the decoder). The 2x2 pixel patchify makes the image side 12 channels.
    """
    shapes = {}

    def conv(name, cin, cout, kernel):
        shapes[f"{name}.weight"] = (cout, cin, *kernel)
        shapes[f"{name}.bias"] = (cout,)

    def resblock(name, cin, cout):
        shapes[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv(f"{name}.residual.2", cin, cout, (3, 3, 3))
        shapes[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv(f"{name}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{name}.shortcut", cin, cout, (1, 1, 1))

    def middle(prefix, c):
        resblock(f"{prefix}.middle.0", c, c)
        shapes[f"{prefix}.middle.1.norm.gamma"] = (c, 1, 1)
        conv(f"{prefix}.middle.1.to_qkv", c, 3 * c, (1, 1))
        conv(f"{prefix}.middle.1.proj", c, c, (1, 1))
        resblock(f"{prefix}.middle.2", c, c)

    def head(prefix, c, cout):
        shapes[f"{prefix}.head.0.gamma"] = (c, 1, 1, 1)
        conv(f"{prefix}.head.2", c, cout, (3, 3, 3))

    last = len(dim_mult) - 1
    dims = [dim * m for m in (1, *dim_mult)]
    conv("encoder.conv1", 12, dims[0], (3, 3, 3))
    for i in range(len(dim_mult)):
        block, cin = f"encoder.downsamples.{i}.downsamples", dims[i]
        for j in range(num_res_blocks):
            resblock(f"{block}.{j}", cin, dims[i + 1])
            cin = dims[i + 1]
        if i != last:
            conv(f"{block}.{num_res_blocks}.resample.1", cin, cin, (3, 3))
            if temporal_downsample[i]:
                conv(f"{block}.{num_res_blocks}.time_conv", cin, cin, (3, 1, 1))
    middle("encoder", dims[-1])
    head("encoder", dims[-1], 2 * z_dim)
    conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv("conv2", z_dim, z_dim, (1, 1, 1))

    temporal_upsample = tuple(reversed(temporal_downsample))
    dims = [dec_dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
    conv("decoder.conv1", z_dim, dims[0], (3, 3, 3))
    middle("decoder", dims[0])
    for i in range(len(dim_mult)):
        block, cin = f"decoder.upsamples.{i}.upsamples", dims[i]
        for j in range(num_res_blocks + 1):
            resblock(f"{block}.{j}", cin, dims[i + 1])
            cin = dims[i + 1]
        if i != last:
            conv(f"{block}.{num_res_blocks + 1}.resample.1", cin, cin, (3, 3))
            if temporal_upsample[i]:
                conv(f"{block}.{num_res_blocks + 1}.time_conv", cin, 2 * cin, (3, 1, 1))
    head("decoder", dims[-1], 12)
    return shapes


def random_official_state_dict(seed=0, **dims):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(shape, generator=g) for k, shape in official_wan22_vae_shapes(**dims).items()}


@pytest.fixture(scope="module")
def tiny_wan():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return WanVAE(AutoencoderKLWan(**wan22_diffusers_config(**TINY)))


def clip(t=9, h=32, w=32, seed=0):
    return torch.rand(3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------- PatchVAE
@pytest.mark.parametrize("t", [1, 5])
def test_patch_vae_round_trip_is_exact(t):
    vae = PatchVAE()
    x = clip(t, 32, 48)
    z = vae.encode(x)
    assert z.shape == (t, 8, 12, 48) == (*vae.latent_grid(t, 32, 48), vae.z_channels)
    assert torch.equal(vae.decode(z), x)
    assert vae.num_frames(z.shape[0]) == t
    # One latent cell holds one 4x4 RGB block, channel c*16 + dy*4 + dx.
    assert z[0, 1, 2, 16 * 2 + 4 * 3 + 1] == x[2, 0, 4 + 3, 8 + 1]


def test_patch_vae_rejects_bad_sizes():
    vae = PatchVAE()
    with pytest.raises(ValueError, match="multiples of 4.*30x32"):
        vae.latent_grid(1, 30, 32)
    with pytest.raises(ValueError, match="at least one frame"):
        vae.latent_grid(0, 32, 32)
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        vae.encode(torch.zeros(4, 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(3, 1, 30, 32))
    with pytest.raises(ValueError, match=r"\[t, h, w, 48\]"):
        vae.decode(torch.zeros(1, 8, 8, 16))


# ------------------------------------------------------------------------------------------------------------ WanVAE
def test_latent_statistics_are_the_releases():
    assert len(WAN22_LATENT_MEAN) == len(WAN22_LATENT_STD) == 48
    assert WAN22_LATENT_MEAN[:3] == (-0.2289, -0.0052, -0.1323) and WAN22_LATENT_STD[-2:] == (0.7468, 0.7744)
    assert WAN22_DIFFUSERS_CONFIG["latents_mean"] == list(WAN22_LATENT_MEAN)


def test_wan_vae_shapes(tiny_wan):
    assert tiny_wan.latent_grid(121, 480, 848) == (31, 30, 53)
    assert tiny_wan.latent_grid(50, 480, 848) == (13, 30, 53)  # the release's 50-frame VBench setting
    assert tiny_wan.num_frames(13) == 49 and tiny_wan.num_frames(1) == 1
    with pytest.raises(ValueError, match="multiples of 16.*40x32"):
        tiny_wan.latent_grid(9, 40, 32)
    with pytest.raises(ValueError, match="at least one latent frame"):
        tiny_wan.num_frames(0)


def test_wan_vae_encode_decode(tiny_wan):
    x = clip(9)
    z = tiny_wan.encode(x, sample=False)
    assert z.shape == (3, 2, 2, 48) and z.dtype == torch.float32
    assert torch.equal(z, tiny_wan.encode(x, sample=False))  # deterministic posterior mean

    # Frames that do not fill a chunk of 4 are ignored, as in the release.
    assert torch.equal(z, tiny_wan.encode(torch.cat([x, clip(2, seed=1)], dim=1), sample=False))

    video = tiny_wan.decode(z)
    assert video.shape == (3, 9, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert tiny_wan.encode(x[:, :1], sample=False).shape == (1, 2, 2, 48)  # an image is one latent frame


def test_wan_vae_sampling(tiny_wan):
    x = clip(5)
    mean = tiny_wan.encode(x, sample=False)
    a = tiny_wan.encode(x, generator=torch.Generator().manual_seed(1))  # sampling is the default, as in the release
    b = tiny_wan.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    c = tiny_wan.encode(x, sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mean)

    # u = mu_n + exp(0.5 * log_var) * eps, with log_var straight from the encoder (not divided by std).
    moments = tiny_wan.model.encode(x.unsqueeze(0)).latent_dist.parameters[0]
    log_var = moments[48:].permute(1, 2, 3, 0)
    eps = torch.randn(mean.permute(3, 0, 1, 2).shape, generator=torch.Generator().manual_seed(1)).permute(1, 2, 3, 0)
    torch.testing.assert_close(a, mean + torch.exp(0.5 * log_var) * eps)


def test_wan_vae_normalisation(tiny_wan):
    x = clip(1)
    raw_mu = tiny_wan.model.encode(x.unsqueeze(0)).latent_dist.parameters[0, :48, 0].permute(1, 2, 0)  # [h, w, 48]
    z = tiny_wan.encode(x, sample=False)[0]
    mean, std = torch.tensor(WAN22_LATENT_MEAN), torch.tensor(WAN22_LATENT_STD)
    torch.testing.assert_close(z, (raw_mu - mean) / std)
    # decode undoes the normalisation before the diffusers decoder
    expected = tiny_wan.model.decode(raw_mu.permute(2, 0, 1)[None, :, None]).sample[0]
    torch.testing.assert_close(tiny_wan.decode(z[None]), expected)


def test_wan_vae_tiling_runs():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = WanVAE(AutoencoderKLWan(**wan22_diffusers_config(**TINY)), tiling=dict(
        tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16, tile_sample_stride_width=16))
    z = vae.encode(clip(1, 64, 48), sample=False)
    assert z.shape == (1, 4, 3, 48)
    assert vae.decode(z).shape == (3, 1, 64, 48)


def test_wan_vae_rejects_wan21_layout():
    from diffusers import AutoencoderKLWan

    with pytest.raises(ValueError, match="not a Wan2.2 VAE"):
        WanVAE(AutoencoderKLWan(base_dim=8, z_dim=16))


# -------------------------------------------------------------------------------------------------- key conversion
def test_conversion_maps_every_official_key():
    from diffusers import AutoencoderKLWan

    official = random_official_state_dict(dim=8, dec_dim=12)
    assert len(official) == 196
    converted = convert_official_wan22_vae_state_dict(official)
    assert len(converted) == len(official)

    model = AutoencoderKLWan(**wan22_diffusers_config(**TINY))
    expected = model.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_full_size_official_layout_converts():
    from diffusers import AutoencoderKLWan

    shapes = official_wan22_vae_shapes(dim=160, dec_dim=256)
    converted = convert_official_wan22_vae_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        model = AutoencoderKLWan(**WAN22_DIFFUSERS_CONFIG)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == expected


def test_conversion_names_unknown_keys():
    sd = random_official_state_dict(dim=8, dec_dim=12)
    sd["encoder.downsamples.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"encoder\.downsamples\.0\.extra\.weight"):
        convert_official_wan22_vae_state_dict(sd)


def test_from_official_loads_the_pth(tmp_path):
    official = random_official_state_dict(dim=8, dec_dim=12)
    torch.save(official, tmp_path / "Wan2.2_VAE.pth")
    vae = WanVAE.from_official(tmp_path / "Wan2.2_VAE.pth", config=wan22_diffusers_config(**TINY))
    assert torch.equal(vae.model.state_dict()["encoder.conv_in.weight"], official["encoder.conv1.weight"])
    assert torch.equal(vae.model.state_dict()["decoder.up_blocks.0.upsampler.time_conv.weight"],
                       official["decoder.upsamples.0.upsamples.3.time_conv.weight"])  # fmt: skip
    assert vae.decode(vae.encode(clip(5), sample=False)).shape == (3, 5, 32, 32)

    del official["decoder.head.2.bias"]
    torch.save(official, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing: decoder\.conv_out\.bias"):
        WanVAE.from_official(tmp_path / "broken.pth", config=wan22_diffusers_config(**TINY))


def test_from_diffusers_folder(tmp_path, tiny_wan):
    tiny_wan.model.save_pretrained(tmp_path / "vae")
    for folder in (tmp_path / "vae", tmp_path):  # the VAE folder itself, or a pipeline folder with vae/
        vae = build_vae("wan2.2", folder)
        assert isinstance(vae, WanVAE)
        x = clip(5)
        assert torch.equal(vae.encode(x, sample=False), tiny_wan.encode(x, sample=False))


# -------------------------------------------------------------------------------------------------------- builders
def test_build_vae_kinds_and_errors(tmp_path):
    assert isinstance(build_vae("patch"), PatchVAE)
    assert isinstance(build_vae(LanceConfig(vae="patch")), PatchVAE)
    with pytest.raises(FileNotFoundError, match="Wan2.2_VAE.pth"):
        build_vae(LanceConfig())
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_vae("wan2.2", tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="Wan2.2_VAE.pth"):
        build_vae("wan2.2", tmp_path)
    with pytest.raises(ValueError, match="unknown VAE kind"):
        build_vae("sd-vae")


def test_find_wan_vae(tmp_path):
    model_dir = tmp_path / "downloads" / "Lance_3B"
    model_dir.mkdir(parents=True)
    assert find_wan_vae(model_dir) is None
    (tmp_path / "downloads" / "Wan2.2_VAE.pth").touch()
    assert find_wan_vae(model_dir) == tmp_path / "downloads" / "Wan2.2_VAE.pth"
    (model_dir / "Wan2.2_VAE.pth").touch()
    assert find_wan_vae(model_dir) == model_dir / "Wan2.2_VAE.pth"
