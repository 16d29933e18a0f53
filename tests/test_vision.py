"""The Qwen2.5-VL vision tower (model/vision.py) against the official reference fixtures (../shared/parity)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lance_rl.model.vision import build_vit, load_vit_config, patchify_video, vit_config_from_dict

PARITY = Path(__file__).resolve().parents[2] / "shared" / "parity"

# The plain-dict `vision_config` of the released llm_config.json, shrunk (only `in_chans`, as the release writes it).
TINY_DICT = dict(depth=2, hidden_act="silu", hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3,
                 out_hidden_size=64, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
                 fullatt_block_indexes=[1], tokens_per_second=2, temporal_patch_size=2)  # fmt: skip
QWEN25_VL_3B_VISION = dict(TINY_DICT, depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip


def _parity() -> Path:
    if not (PARITY / "README.md").is_file():
        pytest.skip(f"official reference fixtures not found at {PARITY} (../shared/parity beside the checkout)")
    return PARITY


@pytest.fixture(scope="module")
def official_vit():
    """The tiny official ViT, its bf16 weights loaded (losslessly) into a float32 tower."""
    vit_dir = _parity() / "tiny_qwen2_5_vl_vit"
    vit = build_vit(load_vit_config(vit_dir))
    state = {k: v.float() for k, v in load_file(str(vit_dir / "vit.safetensors")).items()}
    vit.load_state_dict(state, strict=True)
    return vit


def test_patchify_matches_official_packing():
    f = load_file(str(_parity() / "train_forward.safetensors"))
    patches, grid = patchify_video(f["vit_pixel_video"])
    assert torch.equal(patches, f["vit_packed_patches"])
    assert list(grid) == f["vit_video_grid_thw"][0].tolist() == [1, 4, 4]


def test_official_vit_output(official_vit):
    f = load_file(str(_parity() / "train_forward.safetensors"))
    patches, grid = patchify_video(f["vit_pixel_video"])
    out = official_vit(patches, f["vit_video_grid_thw"])
    assert out.shape == (4, 64) and not out.requires_grad
    torch.testing.assert_close(out, f["vit_output_embeddings"], rtol=0, atol=1e-5)


def test_official_vit_windowed_image_and_video(official_vit):
    """Two real windows plus empty padding windows (image) and a 2-temporal-patch clip, packed in one call."""
    path = _parity() / "extra_vit_windowed.safetensors"
    with safe_open(str(path), "pt") as f:
        assert {"pixel_image", "pixel_video", "patches", "grid_thw", "output"} <= set(f.keys())
    e = load_file(str(path))
    (p_img, g_img), (p_vid, g_vid) = patchify_video(e["pixel_image"]), patchify_video(e["pixel_video"])
    assert [list(g_img), list(g_vid)] == e["grid_thw"].tolist() == [[1, 8, 12], [2, 4, 6]]
    assert torch.equal(torch.cat([p_img, p_vid]), e["patches"])
    out = official_vit(e["patches"], e["grid_thw"])
    assert out.shape == (36, 64)
    torch.testing.assert_close(out, e["output"], rtol=0, atol=1e-5)


def test_tiny_tower_from_dict_shapes_and_freezing():
    torch.manual_seed(0)
    config = vit_config_from_dict(dict(TINY_DICT, _attn_implementation="flash_attention_2"))
    assert config.in_channels == 3
    vit = build_vit(config)
    vit.train()  # a parent switching to training must not unfreeze the tower
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())

    image = torch.randn(3, 1, 56, 84).repeat(1, 2, 1, 1)  # images are duplicated to 2 frames
    video = torch.randn(3, 2, 56, 56).repeat(1, 2, 1, 1)  # 4 frames whose 2 temporal patches are equal
    (p_img, g_img), (p_vid, g_vid) = patchify_video(image), patchify_video(video)
    assert p_img.shape == (24, 1176) and g_img == (1, 4, 6)
    assert p_vid.shape == (32, 1176) and g_vid == (2, 4, 4)

    out_img, out_vid = vit(p_img, [g_img]), vit(p_vid, [g_vid])
    assert out_img.shape == (6, 64) and out_vid.shape == (8, 64)
    # Tokens come out t-major: equal temporal patches give equal tokens (attention never crosses frames).
    torch.testing.assert_close(out_vid[:4], out_vid[4:])
    # Packing several blocks into one call changes nothing.
    packed = vit(torch.cat([p_img, p_vid]), torch.tensor([g_img, g_vid]))
    torch.testing.assert_close(packed, torch.cat([out_img, out_vid]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "needle"),
    [((3, 3, 56, 56), "(3, 3, 56, 56)"), ((3, 2, 42, 56), "divisible by 28"), ((2, 56, 56), "[C, T, H, W]")],
)
def test_patchify_rejects_bad_shapes(shape, needle):
    with pytest.raises(ValueError) as err:
        patchify_video(torch.zeros(shape))
    assert needle in str(err.value)


def test_real_3b_tower_on_meta_device():
    vit = build_vit(vit_config_from_dict(QWEN25_VL_3B_VISION), device="meta")
    shapes = {k: list(v.shape) for k, v in vit.state_dict().items()}
    assert len(shapes) == 390
    assert sum(p.numel() for p in vit.parameters()) == 668_684_288
    assert list(shapes)[:2] == ["patch_embed.proj.weight", "blocks.0.norm1.weight"]
    assert shapes["patch_embed.proj.weight"] == [1280, 3, 2, 14, 14]
    assert shapes["blocks.0.attn.qkv.weight"] == [3840, 1280]
    assert shapes["merger.mlp.0.weight"] == [5120, 5120]
    assert shapes["merger.mlp.2.weight"] == [2048, 5120]
    if (PARITY / "keys.json").is_file():  # every name and shape of the official model, when the fixtures are here
        official = json.loads((PARITY / "keys.json").read_text())["real_3b"]["state_dict"]
        prefix = "vit_model."
        assert shapes == {k[len(prefix) :]: v for k, v in official.items() if k.startswith(prefix)}
