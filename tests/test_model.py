"""Behaviour of the model core on a tiny random checkpoint: gradients, routing, caching, plans, tokenizer."""

import pytest
import torch

from lance_rl.model.checkpoint import load_lance
from lance_rl.model.packing import SampleMedia, pack
from lance_rl.model.positions import latent_position_ids, sample_positions
from lance_rl.model.sequence import CAPTION, generation_plan, latent_grid, understanding_plan, vit_grid
from lance_rl.model.tokenizer import IM_END, build_tiny_tokenizer, render_chat, system_prompt


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return load_lance(tiny_ckpt)


def x2t_sample(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(16, 1176, generator=g)
    plan = understanding_plan(tok, "x2t_image", (1, 2, 2), "how many red circles are there?", "two")
    return plan, SampleMedia(vit_patches=[patches], vit_grids=[(1, 4, 4)])


def t2i_sample(tok, t=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    plan = generation_plan(tok, "t2i", "two red circles on the left", (1, 2, 3), training=True)
    return plan, SampleMedia(latents=[torch.randn(1, 2, 3, 48, generator=g)], timesteps=[t])


def test_losses_train_the_right_expert(tiny):
    model, tok = tiny.model, tiny.tokenizer
    model.train()
    p1, m1 = t2i_sample(tok)
    p2, m2 = x2t_sample(tok)
    out = model(pack([p1, p2], [m1, m2]))
    assert out.mse.shape == (6, 48) and out.ce.shape == (len(tok.encode("two")) + 1,)  # the answer + <|im_end|>
    out.mse.mean().backward()
    first, last = model.language_model.model.layers[0], model.language_model.model.layers[-1]
    assert first.mlp_moe_gen.up_proj.weight.grad.abs().sum() > 0
    # The target reads the prefix's keys and values, so earlier und layers get gradient from the MSE; the last und MLP
    # only feeds text outputs and gets none. The ViT never trains.
    assert first.mlp.up_proj.weight.grad.abs().sum() > 0
    assert last.mlp.up_proj.weight.grad is None or last.mlp.up_proj.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in model.vit_model.parameters())
    model.zero_grad(set_to_none=True)
    out = model(pack([p1, p2], [m1, m2]))
    out.ce.mean().backward()
    assert last.mlp.up_proj.weight.grad.abs().sum() > 0
    # Text never attends to a noisy target, so the answer's loss cannot reach the generation expert.
    gen = [p for n, p in model.named_parameters() if "_moe_gen" in n]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in gen)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_samples_in_one_pack_do_not_see_each_other(tiny):
    model, tok = tiny.model, tiny.tokenizer
    p1, m1 = t2i_sample(tok, seed=1)
    p2, m2 = x2t_sample(tok, seed=2)
    p3, m3 = t2i_sample(tok, seed=3)
    noise = torch.randn(12, 48)
    with torch.no_grad():
        alone = model(pack([p1], [m1]), noise=noise[:6])
        packed = model(pack([p1, p2, p3], [m1, m2, m3]), noise=noise)
    torch.testing.assert_close(packed.mse[:6], alone.mse, atol=1e-5, rtol=1e-5)


def test_noisy_target_is_invisible_to_later_text(tiny):
    """Changing the target latent changes nothing outside the target block (the mask hides it)."""
    model, tok = tiny.model, tiny.tokenizer
    plan, media = t2i_sample(tok)
    other = SampleMedia(latents=[media.latents[0] + 5], timesteps=media.timesteps)
    with torch.no_grad():
        a = model(pack([plan], [media]), noise=torch.zeros(6, 48)).hidden
        b = model(pack([plan], [other]), noise=torch.zeros(6, 48)).hidden
    target = plan.noise_blocks[0]
    outside = torch.ones(len(plan), dtype=torch.bool)
    outside[target.start - 1 : target.stop + 1] = False  # the block's two markers belong to its split
    torch.testing.assert_close(a[outside], b[outside])
    assert not torch.allclose(a[target.start : target.stop], b[target.start : target.stop])


@torch.no_grad()
def test_incremental_decoding_with_the_cache_equals_the_full_forward(tiny):
    model, tok = tiny.model, tiny.tokenizer
    plan, media = x2t_sample(tok)
    full = model(pack([plan], [media])).hidden
    pos, ids = sample_positions(plan), torch.tensor(plan.token_ids)
    vit = model.encode_vit(media.vit_patches[0], torch.tensor([media.vit_grids[0]]))
    cache, start = model.new_cache(), 0
    prompt_len = plan.answer_start - 1  # everything before the token that starts decoding
    for length, mode in zip(plan.split_lens, plan.attn_modes):
        length = min(length, prompt_len - start)
        h = model.embed_text(ids[start : start + length])
        if mode == "full":
            h[1:-1] = vit
        model.forward_cached(h[None], pos[:, None, start : start + length], None, cache, causal=mode == "causal")
        start += length
        if start == prompt_len:
            break
    assert len(cache) == prompt_len
    for i in range(prompt_len, len(plan)):
        out = model.forward_cached(model.embed_text(ids[i : i + 1])[None], pos[:, None, i : i + 1], None, cache, causal=True)
        torch.testing.assert_close(model.logits(out[0, 0]), model.logits(full[i]), atol=1e-4, rtol=1e-4)
    assert len(cache) == len(plan)


@torch.no_grad()
def test_a_group_shares_one_broadcast_prefix(tiny):
    model, tok = tiny.model, tiny.tokenizer
    plan = generation_plan(tok, "t2i", "a blue square on the right", (1, 2, 2))
    pos, ids = sample_positions(plan), torch.tensor(plan.token_ids)
    noise_at = plan.attn_modes.index("noise")
    prefix = sum(plan.split_lens[:noise_at])
    cache = model.new_cache()
    model.forward_cached(model.embed_text(ids[:prefix])[None], pos[:, None, :prefix], None, cache, causal=True)
    length = plan.split_lens[noise_at]
    x = torch.randn(3, 4, 48)
    h = model.embed_text(ids[prefix : prefix + length]).repeat(3, 1, 1)
    for g in range(3):
        h[g, 1:-1] = model.embed_latents(x[g], torch.full((4,), 0.5), latent_position_ids((1, 2, 2)))
    gen = torch.zeros(3, length, dtype=torch.bool)
    gen[:, 1:-1] = True
    block_pos = pos[:, None, prefix : prefix + length].expand(3, 3, length)
    grouped = model.forward_cached(h, block_pos, gen, cache.frozen().repeat(3), causal=False)
    for g in range(3):
        single = model.forward_cached(h[g : g + 1], block_pos[:, :1], gen[:1], cache.frozen(), causal=False)
        torch.testing.assert_close(grouped[g], single[0], atol=1e-5, rtol=1e-5)
    assert len(cache) == prefix  # the frozen view never grew the cache


def test_plans_for_every_task():
    tok = build_tiny_tokenizer()
    t2v = generation_plan(tok, "t2v", "a red circle moving right", latent_grid(9, 32, 48))
    assert t2v.noise_blocks[0].block.grid == (3, 2, 3) and t2v.attn_modes.count("noise") == 1
    i2v = generation_plan(tok, "i2v", "the circle starts moving", latent_grid(5, 32, 32))
    assert i2v.attn_modes == t2v.attn_modes
    edit = generation_plan(tok, "video_edit", "make it blue", latent_grid(5, 32, 32), source_vit_grid=vit_grid(4, 56, 56))
    assert edit.attn_modes == ["causal", "full", "full_noise", "causal", "causal", "noise", "causal"]
    caption = [tok.decode([i]) for i, m in zip(edit.token_ids, edit.modality) if m == CAPTION]
    assert "".join(caption) == "make it blue"
    und = understanding_plan(tok, "x2t_video", vit_grid(4, 56, 56), "what moves?")
    assert und.answer_start is None and tok.decode(und.token_ids[-3:], skip_special_tokens=False).endswith("assistant\n")
    with pytest.raises(ValueError, match="image_edit needs source_vit_grid"):
        generation_plan(tok, "image_edit", "x", (1, 2, 2))
    with pytest.raises(ValueError, match="4k\\+1"):
        latent_grid(8, 32, 32)
    with pytest.raises(ValueError, match="multiples of 28"):
        vit_grid(1, 30, 28)


def test_tiny_tokenizer_round_trips_and_has_the_qwen_specials():
    tok = build_tiny_tokenizer()
    text = render_chat(system_prompt("t2i"), "three green triangles at the top", "ok")
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids[-1] == tok.im_end_id == tok.token_to_id(IM_END)
    assert tok.decode(tok.encode("unseen words: zebra, 42 Ω")) == "unseen words: zebra, 42 Ω"
    assert system_prompt("t2i", training=True) != system_prompt("t2i")  # the release's train/infer difference
