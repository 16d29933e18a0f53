"""The sampler seam: schedules, the ODE/SDE/CPS step and its log-probabilities, CFG, cached generation and
understanding, checked against the official reference outputs and against exact invariants."""

import math

import pytest
import torch
from safetensors.torch import load_file

from lance_rl.model.checkpoint import load_lance
from lance_rl.model.decoding import generate_text, score_answers
from lance_rl.model.guidance import CFGConfig
from lance_rl.model.prefix import GenerationRequest, encode_prefix
from lance_rl.model.sampling import SamplerConfig, generate, initial_noise, sample, velocity
from lance_rl.model.schedule import sampling_timesteps, step

PROMPT = "a red cube on a wooden table"


@pytest.fixture(scope="module")
def official(parity_dir):
    return load_lance(parity_dir / "tiny_lance", vit_dir=parity_dir / "tiny_qwen2_5_vl_vit")


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return load_lance(tiny_ckpt)


# ------------------------------------------------------------------------------------------------ official parity
def _official_run(official, ref, task, num_steps, cfg, edit_ref=None):
    request = GenerationRequest(task, PROMPT if task == "t2i" else "Make the cube blue.", (1, 4, 4))
    if task == "image_edit":
        request.source_vit = (ref["vit_packed_patches"], (1, 4, 4))
        request.source_latent = ref["edit_source_latent_thwc"]
    prefix = encode_prefix(official.model, official.tokenizer, [request], cfg)
    noise = initial_noise(42, 16, 48, num_condition_tokens=16 if task == "image_edit" else 0)
    torch.testing.assert_close(noise, ref["x_init_vae_tokens"][-16:], atol=0, rtol=0)
    config = SamplerConfig(num_steps=num_steps, shift=3.5, cfg=cfg)
    return prefix, sample(official.model, prefix, noise[None], config)


@pytest.mark.parametrize(
    "fixture,task,steps,scale",
    [
        ("t2i_kvcache_cfg1", "t2i", 4, 1.0),
        ("t2i_kvcache_cfg4", "t2i", 4, 4.0),
        ("extra_t2i_kvcache_cfg4_8steps", "t2i", 8, 4.0),
        ("edit_kvcache_cfg1", "image_edit", 3, 1.0),
        ("extra_edit_kvcache_cfg4", "image_edit", 3, 4.0),
    ],
)
def test_reproduces_the_official_kv_sampler(official, parity_dir, fixture, task, steps, scale):
    ref = load_file(parity_dir / f"{fixture}.safetensors")
    torch.testing.assert_close(sampling_timesteps(steps, 3.5)[:-1], ref["timesteps"], atol=0, rtol=0)
    prefix, out = _official_run(official, ref, task, steps, CFGConfig(scale=scale))
    if scale != 1.0:
        # the noise block (18 tokens) sits just before the trailing <|im_end|> of the uncond stream
        assert torch.equal(prefix.uncond_query_pos[:, 0], ref["position_ids_uncond"][:, -19:-1])
    torch.testing.assert_close(out.latents[0].view(1, 4, 4, 48), ref["final_latent_thwc"], atol=1e-5, rtol=1e-5)


def test_consistent_uncond_positions_match_the_official_non_kv_sampler(official, parity_dir):
    ref = load_file(parity_dir / "t2i_kvcache_cfg4.safetensors")
    nonkv = load_file(parity_dir / "extra_nonkv_validation_gen.safetensors")
    _, out = _official_run(official, ref, "t2i", 4, CFGConfig(scale=4.0, uncond_positions="consistent"))
    torch.testing.assert_close(out.latents[0].view(1, 4, 4, 48), nonkv["t2i_cfg4_nonkv_final_latent_thwc"], atol=1e-5, rtol=1e-5)


def test_reproduces_official_greedy_understanding(official, parity_dir):
    ref = load_file(parity_dir / "und_kvcache_greedy.safetensors")
    out = generate_text(
        official.model, official.tokenizer, ref["vit_packed_patches"], (1, 4, 4),
        "What color is the cube on the table?", max_new_tokens=8,
    )  # fmt: skip
    assert out.ids == ref["generated_ids"].tolist()
    torch.testing.assert_close(out.first_logits, ref["first_step_logits_raw"][:151665], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ the step
def test_sde_at_noise_level_zero_is_the_ode_step_exactly():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 10, 48, generator=g), torch.randn(3, 10, 48, generator=g)
    for t, t_next in ((1.0, 0.9), (0.6, 0.4), (0.2, 0.0)):
        ode = step(x, v, t, t_next, "ode")
        sde = step(x, v, t, t_next, "sde", noise_level=0.0, generator=g)
        assert torch.equal(sde.prev_sample, ode.prev_sample)
        dt = torch.tensor(t) - torch.tensor(t_next)  # float32, as the schedule tensors are
        assert torch.equal(ode.prev_sample, x - v * dt)  # the release's Euler update


def test_sde_log_prob_is_the_gaussian_density_averaged_over_elements():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 6, 48, generator=g), torch.randn(2, 6, 48, generator=g)
    out = step(x, v, 0.7, 0.5, "sde", noise_level=0.7, generator=g)
    std_t = 0.7 * math.sqrt(0.7 / 0.3)
    mean = x * (1 + std_t**2 * -0.2 / 1.4) + v * (1 + std_t**2 * 0.3 / 1.4) * -0.2  # Flow-GRPO's form
    torch.testing.assert_close(out.prev_sample_mean, mean)
    dist = torch.distributions.Normal(mean, std_t * math.sqrt(0.2))
    torch.testing.assert_close(out.log_prob, dist.log_prob(out.prev_sample).mean(dim=(1, 2)))
    first = step(x, v, 1.0, 0.9, "sde", noise_level=0.7, generator=g)  # t = 1 uses t_next in the denominator
    assert torch.isfinite(first.log_prob).all()


def test_cps_step():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 5, 48, generator=g), torch.randn(2, 5, 48, generator=g)
    out = step(x, v, 0.6, 0.4, "cps", noise_level=0.8, generator=g)
    std = 0.4 * math.sin(0.8 * math.pi / 2)
    mean = (x - 0.6 * v) * 0.6 + (x + 0.4 * v) * math.sqrt(0.4**2 - std**2)
    torch.testing.assert_close(out.prev_sample_mean, mean)
    torch.testing.assert_close(out.log_prob, -((out.prev_sample - mean) ** 2).mean(dim=(1, 2)))


def test_scoring_a_stored_transition_returns_the_rollout_log_prob():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 8, 48, generator=g), torch.randn(4, 8, 48, generator=g)
    for kind in ("sde", "cps"):
        rollout = step(x, v, 0.8, 0.6, kind, noise_level=0.9, generator=g)
        scored = step(x, v, 0.8, 0.6, kind, noise_level=0.9, x_next=rollout.prev_sample)
        torch.testing.assert_close(scored.log_prob, rollout.log_prob, atol=0, rtol=0)


def test_window_never_covers_the_final_step():
    assert SamplerConfig(num_steps=10, kind="sde", sde_window=(2, 5)).stochastic_steps() == [2, 3, 4]
    assert SamplerConfig(num_steps=10, kind="sde").stochastic_steps() == list(range(9))
    with pytest.raises(ValueError, match="never the final one"):
        SamplerConfig(num_steps=10, kind="sde", sde_window=(5, 10)).stochastic_steps()
    with pytest.raises(ValueError, match="at least one step"):
        SamplerConfig(num_steps=10, kind="sde", sde_window=(4, 4)).stochastic_steps()


# ------------------------------------------------------------------------------------------------ invariants on a model
def test_rollout_log_probs_are_reproduced_by_rescoring_in_batch_and_singly(tiny):
    model, tok = tiny.model, tiny.tokenizer
    cfg = CFGConfig(scale=3.0)
    config = SamplerConfig(num_steps=6, shift=3.0, kind="sde", noise_level=0.8, sde_window=(1, 4), cfg=cfg)
    requests = [GenerationRequest("t2i", "two red circles on the left", (1, 2, 2))]
    traj = generate(model, tok, requests, config, seeds=[10, 11, 12], group_size=3)
    assert traj.log_probs.shape == (3, 3) and torch.isfinite(traj.log_probs).all()
    prefix = encode_prefix(model, tok, requests, cfg).repeat(3)
    with torch.no_grad():
        for j, i in enumerate(traj.steps):
            t, t_next = traj.timesteps[i], traj.timesteps[i + 1]
            v = velocity(model, traj.x_t[:, j], t, prefix, cfg)
            batch = step(traj.x_t[:, j], v, t, t_next, "sde", 0.8, x_next=traj.x_next[:, j])
            torch.testing.assert_close((batch.log_prob - traj.log_probs[:, j]).exp(), torch.ones(3), atol=1e-5, rtol=0)
            for b in range(3):
                single = encode_prefix(model, tok, requests, cfg)
                vb = velocity(model, traj.x_t[b : b + 1, j], t, single, cfg)
                one = step(traj.x_t[b : b + 1, j], vb, t, t_next, "sde", 0.8, x_next=traj.x_next[b : b + 1, j])
                torch.testing.assert_close(one.log_prob, traj.log_probs[b : b + 1, j], atol=1e-5, rtol=0)


def test_a_group_equals_separate_generations_with_the_same_seeds(tiny):
    model, tok = tiny.model, tiny.tokenizer
    config = SamplerConfig(num_steps=4, shift=3.0, kind="sde", noise_level=0.7, cfg=CFGConfig(scale=2.0))
    request = GenerationRequest("t2i", "a yellow triangle at the top", (1, 2, 3))
    group = generate(model, tok, [request], config, seeds=[5, 6, 7], group_size=3)
    for i, seed in enumerate((5, 6, 7)):
        alone = generate(model, tok, [request], config, seeds=[seed])
        torch.testing.assert_close(group.latents[i], alone.latents[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(group.log_probs[i], alone.log_probs[0], atol=1e-5, rtol=1e-5)


def test_prompts_of_different_lengths_batch_like_single_prompts(tiny):
    model, tok = tiny.model, tiny.tokenizer
    config = SamplerConfig(num_steps=3, shift=3.0, cfg=CFGConfig(scale=3.0))
    requests = [
        GenerationRequest("t2i", "red", (1, 2, 2)),
        GenerationRequest("t2i", "three green triangles at the bottom of the image", (1, 2, 2)),
    ]
    both = generate(model, tok, requests, config, seeds=[1, 2])
    for i, r in enumerate(requests):
        alone = generate(model, tok, [r], config, seeds=[i + 1])
        torch.testing.assert_close(both.latents[i], alone.latents[0], atol=1e-5, rtol=1e-5)


def test_i2v_keeps_the_first_frame_clean(tiny):
    model, tok = tiny.model, tiny.tokenizer
    first = torch.randn(1, 2, 2, 48)
    request = GenerationRequest("i2v", "the circle moves", (3, 2, 2), source_latent=first)
    config = SamplerConfig(num_steps=3, shift=3.0, kind="sde", noise_level=0.7, cfg=CFGConfig(scale=1.0))
    out = generate(model, tok, [request], config, seeds=[0])
    torch.testing.assert_close(out.latents[0, :4], first.reshape(4, 48))
    assert not torch.allclose(out.latents[0, 4:8], out.x_t[0, 0, 4:8])


def test_image_edit_and_video_generation_run(tiny):
    model, tok = tiny.model, tiny.tokenizer
    config = SamplerConfig(num_steps=2, shift=3.0, cfg=CFGConfig(scale=2.0))
    edit = GenerationRequest(
        "image_edit", "make it blue", (1, 2, 2), source_vit=(torch.randn(16, 1176), (1, 4, 4)), source_latent=torch.randn(1, 2, 2, 48)
    )
    assert generate(model, tok, [edit], config, seeds=[0]).latents.shape == (1, 4, 48)
    t2v = GenerationRequest("t2v", "a circle moving right", (3, 2, 2))
    assert generate(model, tok, [t2v], config, seeds=[0]).latents.shape == (1, 12, 48)


def test_answer_scores_agree_with_decoding(tiny):
    model, tok = tiny.model, tiny.tokenizer
    patches = torch.randn(16, 1176, generator=torch.Generator().manual_seed(0))
    out = generate_text(model, tok, patches, (1, 4, 4), "is there a red circle?", max_new_tokens=3)
    scores = score_answers(model, tok, patches, (1, 4, 4), "is there a red circle?", ["yes", "no"])
    torch.testing.assert_close(scores.normalized.sum(), torch.tensor(1.0))
    first = torch.log_softmax(out.first_logits, -1)
    yes = tok.encode("yes")
    if len(yes) == 1:
        torch.testing.assert_close(scores.log_probs[0], first[yes[0]], atol=1e-5, rtol=1e-5)
    sampled = generate_text(model, tok, patches, (1, 4, 4), "?", max_new_tokens=4, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert len(sampled.ids) <= 4


def test_cfg_renorm_global_channel_and_none():
    """Spec 3.3: v = v_unc + s (v_cond - v_unc), then scaled by min(1, |v_cond| / |v|) over the whole target
    (global) or per token (channel); none keeps the guided velocity."""
    from lance_rl.model.guidance import combine_cfg

    g = torch.Generator().manual_seed(0)
    v_cond, v_unc = torch.randn(2, 6, 48, generator=g), torch.randn(2, 6, 48, generator=g)
    guided = v_unc + 4.0 * (v_cond - v_unc)
    assert torch.equal(combine_cfg(v_cond, v_unc, CFGConfig(scale=4.0, renorm="none")), guided)
    glob = combine_cfg(v_cond, v_unc, CFGConfig(scale=4.0, renorm="global"))
    torch.testing.assert_close(glob.norm(dim=(1, 2)), v_cond.norm(dim=(1, 2)))  # guidance grew the norm: scaled back
    torch.testing.assert_close(glob / guided, (glob / guided)[:, :1, :1].expand_as(glob))  # one factor per sample
    chan = combine_cfg(v_cond, v_unc, CFGConfig(scale=4.0, renorm="channel"))
    torch.testing.assert_close(chan.norm(dim=2), torch.minimum(v_cond.norm(dim=2), guided.norm(dim=2)))
    assert torch.equal(combine_cfg(v_cond, v_cond * 0.5, CFGConfig(scale=0.5, renorm="global")),
                       v_cond * 0.5 + 0.5 * (v_cond - v_cond * 0.5))  # a norm below the conditional one is kept
