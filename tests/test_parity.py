"""Reproduce the official implementation's reference outputs on its tiny checkpoint (../shared/parity)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lance_rl.model.checkpoint import load_lance
from lance_rl.model.packing import SampleMedia, pack
from lance_rl.model.positions import latent_position_ids, sample_positions
from lance_rl.model.sequence import generation_plan, understanding_plan


@pytest.fixture(scope="module")
def official(parity_dir):
    return load_lance(parity_dir / "tiny_lance", vit_dir=parity_dir / "tiny_qwen2_5_vl_vit")


def test_official_checkpoint_loads_with_every_key_accounted(official):
    report = official.report
    assert report.ok and not report.copied_from_und
    assert report.dropped == []  # the tiny release folder does not store the sin-cos table
    assert len(report.loaded) == 98  # 68 language-model/head tensors + 30 ViT tensors
    assert len(official.tokenizer) == 151665
    assert official.model.num_text_tokens == 151665


def test_training_forward_t2i_plus_x2t(official, parity_dir):
    ref = load_file(parity_dir / "train_forward.safetensors")
    meta = json.loads((parity_dir / "train_forward.json").read_text())
    tok, model = official.tokenizer, official.model
    t2i = generation_plan(tok, "t2i", "a red cube on a wooden table", (1, 4, 4), training=True)
    x2t = understanding_plan(tok, "x2t_image", (1, 2, 2), "What color is the cube on the table?", "The cube is red.")
    assert t2i.split_lens + x2t.split_lens == meta["split_lens"][:-1]  # the official pack adds a flex pad split
    t = float(ref["timestep_after_sigmoid_shift"].flatten()[0])
    batch = pack(
        [t2i, x2t],
        [
            SampleMedia(latents=[ref["clean_latent_thwc"]], timesteps=[t]),
            SampleMedia(vit_patches=[ref["vit_packed_patches"]], vit_grids=[(1, 4, 4)]),
        ],
    )
    n = len(batch)
    assert torch.equal(batch.input_ids, ref["packed_text_ids"][:n])
    assert torch.equal(batch.position_ids, ref["packed_position_ids_mrope_mape"].reshape(3, -1)[:, :n])
    assert torch.equal(batch.vae_index, ref["packed_vae_token_indexes"])
    assert torch.equal(batch.vit_index, ref["packed_vit_token_indexes"])
    assert torch.equal(batch.ce_index, ref["ce_loss_indexes"])
    assert torch.equal(batch.ce_labels, ref["packed_label_ids"])
    assert torch.equal(batch.vae_position_ids, ref["packed_latent_position_ids"])
    with torch.no_grad():
        out = model(batch, noise=ref["noise"])
    torch.testing.assert_close(out.mse, ref["mse"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.ce, ref["ce"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden, ref["last_hidden_state_real_tokens"], atol=1e-5, rtol=1e-5)
    assert out.loss(ce_weight=0.25, mse_weight=1.0).item() == pytest.approx(6.620337, abs=1e-5)


def test_training_forward_image_edit(official, parity_dir):
    ref = load_file(parity_dir / "extra_train_forward_edit.safetensors")
    meta = json.loads((parity_dir / "extra_train_forward_edit.json").read_text())
    tok, model = official.tokenizer, official.model
    plan = generation_plan(tok, "image_edit", "Make the cube blue.", (1, 4, 4), source_vit_grid=(1, 2, 2), training=True)
    assert plan.split_lens == meta["split_lens"][: len(plan.split_lens)]
    t = float(ref["timestep_after_sigmoid_shift"].flatten()[0])
    media = SampleMedia(
        vit_patches=[ref["vit_packed_patches"]],
        vit_grids=[(1, 4, 4)],
        latents=[ref["edit_source_latent_thwc"], ref["edit_target_clean_latent_thwc"]],
        timesteps=[t],
    )
    batch = pack([plan], [media])
    assert torch.equal(batch.position_ids, ref["packed_position_ids_mrope_mape"].reshape(3, -1)[:, : len(batch)])
    with torch.no_grad():
        out = model(batch, noise=ref["noise"])
    torch.testing.assert_close(out.mse, ref["mse"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden, ref["last_hidden_state_real_tokens"], atol=1e-5, rtol=1e-5)


def test_kv_cache_generation_query_t2i(official, parity_dir):
    ref = load_file(parity_dir / "t2i_kvcache_cfg1.safetensors")
    tok, model = official.tokenizer, official.model
    plan = generation_plan(tok, "t2i", "a red cube on a wooden table", (1, 4, 4))
    assert torch.equal(torch.tensor(plan.token_ids), ref["packed_text_ids"])
    v = _cached_velocities(model, plan, ref, vit=None)
    torch.testing.assert_close(v, ref["v_cond_per_step"], atol=1e-5, rtol=1e-5)


def test_kv_cache_generation_query_image_edit(official, parity_dir):
    ref = load_file(parity_dir / "edit_kvcache_cfg1.safetensors")
    tok, model = official.tokenizer, official.model
    plan = generation_plan(tok, "image_edit", "Make the cube blue.", (1, 4, 4), source_vit_grid=(1, 2, 2))
    assert torch.equal(torch.tensor(plan.token_ids), ref["packed_text_ids"])
    assert torch.equal(sample_positions(plan), ref["position_ids_cond"])
    v = _cached_velocities(model, plan, ref, vit=(ref["vit_packed_patches"], (1, 4, 4)))
    torch.testing.assert_close(v, ref["v_cond_per_step"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def _cached_velocities(model, plan, ref, vit):
    """Prefill split by split up to the noise block (as the release does), then query the noise block at each
    recorded step state against the frozen cache."""
    pos, ids = sample_positions(plan), torch.tensor(plan.token_ids)
    cache, start = model.new_cache(), 0
    source = ref.get("edit_source_latent_thwc")
    for length, mode in zip(plan.split_lens, plan.attn_modes):
        if mode == "noise":
            break
        h = model.embed_text(ids[start : start + length])
        gen_mask = torch.zeros(length, dtype=torch.bool)
        if mode == "full":  # the ViT block, markers stay text
            h[1:-1] = model.encode_vit(vit[0], torch.tensor([vit[1]]))
        elif mode == "full_noise":  # clean source latent at t = 0
            grid = tuple(source.shape[:3])
            h[1:-1] = model.embed_latents(source.reshape(-1, 48), torch.zeros(length - 2), latent_position_ids(grid))
            gen_mask[1:-1] = True
        model.forward_cached(h[None], pos[:, None, start : start + length], gen_mask[None], cache, causal=mode == "causal")
        start += length
    length = plan.split_lens[plan.attn_modes.index("noise")]
    gen_mask = torch.zeros(1, length, dtype=torch.bool)
    gen_mask[0, 1:-1] = True
    velocities = []
    for x_t, t in zip(ref["x_t_per_step"], ref["timesteps"]):
        h = model.embed_text(ids[start : start + length])
        h[1:-1] = model.embed_latents(x_t, t.expand(length - 2), latent_position_ids((1, 4, 4)))
        out = model.forward_cached(h[None], pos[:, None, start : start + length], gen_mask, cache.frozen(), causal=False)
        velocities.append(model.velocity(out[0, 1:-1]))
    return torch.stack(velocities)
