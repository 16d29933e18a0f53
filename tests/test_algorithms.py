"""The four policy updates: each one's defining invariant on plain tensors, and each one raising the held-out reward
of the tiny model from the same rollouts, rewards and evaluation; DiffusionNFT resumes exactly.

The held-out shapes score needs a model that draws shapes, which takes minutes of SFT (the quickstart's, whose
comparison of the four is in the README); the tiny model the suite trains in seconds draws coloured noise, on which
the shapes checker scores 0 everywhere. So the rise is shown here with JPEG incompressibility, a reward with signal
from the first update."""

import json

import numpy as np
import pytest
import torch

from lance_rl.config import RecipeError, load_recipe
from lance_rl.grpo import nft_loss, optimality_probability, ratio_norm_log_ratio
from lance_rl.model.schedule import sampling_timesteps, step
from lance_rl.rl import RLRecipe, recipe_main
from lance_rl.rl_config import RLConfig, SamplerSection

RECIPE = "recipes/quickstart/rl.yaml"


def test_nft_loss_is_flow_matching_when_every_advantage_is_equal_and_positive():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 16, 48), torch.randn(3, 16, 48)
    t = torch.tensor([0.9, 0.5, 0.2])
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v = torch.randn(3, 16, 48, requires_grad=True)
    r = optimality_probability(torch.full((3,), 5.0), adv_clip=5.0)  # the largest advantage: r = 1
    assert torch.equal(r, torch.ones(3))
    out = nft_loss(v, v.detach(), x0, x_t, t, r, beta=1.0, scale=5.0)
    # On-policy (v_old = v) with r = 1 the loss is 5 t^2 |v - (eps - x0)|^2 / w with the constant weight w.
    error = t[:, None, None] * (v - (eps - x0))
    weight = error.detach().abs().mean(dim=(1, 2))
    expected = 5.0 * (error**2).mean(dim=(1, 2)) / weight
    torch.testing.assert_close(out.per_sample, expected)
    (g_nft,) = torch.autograd.grad(out.per_sample.sum(), v)
    (g_fm,) = torch.autograd.grad(expected.sum(), v)
    torch.testing.assert_close(g_nft, g_fm)


def test_nft_gives_no_gradient_without_a_preference():
    """At v == v_old the gradient is (2r - 1) times the flow-matching one: zero for r = 1/2 (advantage 0)."""
    torch.manual_seed(1)
    x0, eps, t = torch.randn(2, 8, 48), torch.randn(2, 8, 48), torch.tensor([0.7, 0.3])
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v = torch.randn(2, 8, 48, requires_grad=True)
    out = nft_loss(v, v.detach(), x0, x_t, t, optimality_probability(torch.zeros(2), 5.0))
    (g,) = torch.autograd.grad(out.per_sample.sum(), v)
    assert g.abs().max() < 1e-6


def test_grpo_guard_ratio_has_unit_mean_at_every_step_while_the_raw_ratio_drifts_low():
    torch.manual_seed(2)
    times = sampling_timesteps(10, 3.0)
    raw_means, guarded_means = [], []
    for i in range(9):
        t, t_next = times[i], times[i + 1]
        x = torch.randn(512, 4, 48)
        v_old = torch.randn(512, 4, 48)
        old = step(x, v_old, t, t_next, "sde", 0.7)
        on = step(x, v_old, t, t_next, "sde", 0.7, x_next=old.prev_sample)
        on_policy = ratio_norm_log_ratio(on.log_prob, old.log_prob, on.prev_sample_mean, old.prev_sample_mean, on.std_dev_t)
        assert torch.equal(on_policy, torch.zeros_like(on_policy))  # exactly 1 on-policy
        new = step(x, v_old + 0.3 * torch.randn_like(v_old), t, t_next, "sde", 0.7, x_next=old.prev_sample)
        raw_means.append(float(torch.exp(new.log_prob - old.log_prob).mean()))
        guarded = ratio_norm_log_ratio(new.log_prob, old.log_prob, new.prev_sample_mean, old.prev_sample_mean, new.std_dev_t)
        guarded_means.append(float(torch.exp(guarded).mean()))
    assert max(abs(m - 1) for m in guarded_means) < 2e-3, guarded_means
    assert raw_means[-1] < 0.98 and raw_means[-1] < raw_means[0], raw_means  # Flow-GRPO's ratio sinks at low noise


def test_diffusion_nft_trains_each_sample_at_its_own_steps_of_the_whole_range():
    from types import SimpleNamespace

    from lance_rl.algorithms import DiffusionNFT

    nft = DiffusionNFT.__new__(DiffusionNFT)
    nft.recipe = SimpleNamespace(cfg=SimpleNamespace(sampler=SamplerSection(num_steps=10, window_size=3, window_range=(0, 9))))
    steps = nft.training_steps(64, torch.Generator().manual_seed(0))
    assert steps.shape == (64, 3) and nft.terms_per_sample(None, None) == 3
    assert all(len(set(row.tolist())) == 3 for row in steps)  # distinct steps within a sample
    assert set(steps.flatten().tolist()) == set(range(9))  # the whole range is trained, not its first steps
    assert len({tuple(row.tolist()) for row in steps}) > 32  # and samples differ
    nft.recipe.cfg.sampler.window_size = 0  # every step of the range, in each sample's own order
    every = nft.training_steps(4, torch.Generator().manual_seed(0))
    assert every.shape == (4, 9) and all(sorted(row.tolist()) == list(range(9)) for row in every)
    nft.recipe.cfg.sampler.window_size, nft.recipe.cfg.sampler.window_range = 9, (0, 10)  # the authors': 9 of all 10
    authors = nft.training_steps(64, torch.Generator().manual_seed(0))
    assert authors.shape == (64, 9) and set(authors.flatten().tolist()) == set(range(10))


def test_mix_grpo_window_slides_from_high_to_low_noise_and_wraps(tmp_path, tiny_ckpt):
    cfg = load_recipe(RLConfig, RECIPE, [f"output_dir={tmp_path}", f"model.checkpoint={tiny_ckpt}", "algorithm.name=mix_grpo",
                                         "algorithm.mix.shift_every=3", "sampler.window_size=2", "sampler.window_range=[0, 6]"])  # fmt: skip
    recipe = RLRecipe(cfg)
    from lance_rl.algorithms import MixGRPO

    mix = MixGRPO.__new__(MixGRPO)
    mix.recipe, mix.cfg = recipe, cfg.algorithm
    windows = [mix.window(u) for u in range(18)]
    assert windows[:3] == [(0, 2)] * 3 and windows[3:6] == [(1, 3)] * 3 and windows[12:15] == [(4, 6)] * 3
    assert windows[15] == (0, 2)  # wrapped to the highest noise again
    with pytest.raises(RecipeError, match="algorithm.mix applies to algorithm.name 'mix_grpo' only"):
        load_recipe(RLConfig, RECIPE, [f"output_dir={tmp_path}", f"model.checkpoint={tiny_ckpt}", "algorithm.mix.stride=2"])
    with pytest.raises(RecipeError, match="grpo_guard normalises the SDE step's ratio"):
        load_recipe(RLConfig, RECIPE, [f"output_dir={tmp_path}", f"model.checkpoint={tiny_ckpt}", "algorithm.name=grpo_guard",
                                       "sampler.kind=cps"])  # fmt: skip
    # The last step's timestep: DiffusionNFT may train it (it noises its samples again), the SDE algorithms may not.
    last = [f"output_dir={tmp_path}", f"model.checkpoint={tiny_ckpt}", "sampler.num_steps=6", "sampler.window_range=[0, 6]"]
    assert load_recipe(RLConfig, RECIPE, [*last, "algorithm.name=diffusion_nft"]).sampler.window_range == (0, 6)
    with pytest.raises(RecipeError, match="never stochastic"):
        load_recipe(RLConfig, RECIPE, [*last, "algorithm.name=flow_grpo"])
    with pytest.raises(RecipeError, match=r"stop <= num_steps\)"):
        load_recipe(RLConfig, RECIPE, [*last[:-1], "sampler.window_range=[0, 7]", "algorithm.name=diffusion_nft"])
    with pytest.raises(RecipeError, match="sampler.noise_level, algorithm.clip_range apply to the SDE algorithms"):
        load_recipe(RLConfig, RECIPE, [f"output_dir={tmp_path}", f"model.checkpoint={tiny_ckpt}", "algorithm.name=diffusion_nft",
                                       "sampler.noise_level=1.0", "algorithm.clip_range=2e-4"])  # fmt: skip


SHAPES_RUN = ["prompts.height=16", "prompts.width=16", "sampler.num_steps=6", "sampler.window_size=2",
              "sampler.window_range=[0, 4]", "algorithm.prompts_per_update=4", "algorithm.group_size=6",
              "eval.num_prompts=12", "eval.samples_per_prompt=2", "eval.num_steps=6", "rollout.num_workers=0",
              "algorithm.minibatches=2", "rewards={jpeg_incompressibility: 1.0}", "checkpoint.every=100"]  # fmt: skip
SETTINGS = {
    "flow_grpo": ["optim.lr=3e-3", "algorithm.clip_range=0.05"],
    "mix_grpo": ["optim.lr=3e-3", "algorithm.clip_range=0.05", "algorithm.mix.shift_every=2"],
    "grpo_guard": ["optim.lr=3e-3", "algorithm.clip_range=0.01"],
    "diffusion_nft": ["optim.lr=3e-3", "sampler.window_size=2", "algorithm.adv_clip_max=1", "algorithm.nft.beta=0.1"],
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_algorithm_raises_the_held_out_reward(tmp_path, sft_tiny, name):
    out = tmp_path / name
    model = sft_tiny / "checkpoints" / "step_0000200" / "model"
    recipe_main(RECIPE, [f"output_dir={out}", f"model.checkpoint={model}", f"algorithm.name={name}", "train.updates=8",
                         "eval.every=8", *SHAPES_RUN, *SETTINGS[name]])  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0]["eval/reward/mean"], rows[-1]["eval/reward/mean"]
    # Fixed seeds and the ODE at evaluation: the noise of the mean is the prompts' spread over sqrt(24) samples.
    spread = np.std(json.loads((out / "eval" / "update_00000.json").read_text())["scores"]) / np.sqrt(24)
    assert after - before > 2 * spread, (name, before, after, spread)


def test_diffusion_nft_resumes_exactly(tmp_path, sft_tiny):
    from safetensors.torch import load_file

    model = sft_tiny / "checkpoints" / "step_0000200" / "model"
    # window_range [0, 6] of 6 steps: the last step's timestep is trained too.
    base = [f"model.checkpoint={model}", "algorithm.name=diffusion_nft", "checkpoint.every=1", *SHAPES_RUN[:-1],
            "algorithm.prompts_per_update=2", "algorithm.group_size=3", "eval.every=0", "optim.lr=3e-3",
            "algorithm.nft.old_decay_rate=0.2", "sampler.window_range=[0, 6]"]  # fmt: skip
    recipe_main(RECIPE, [*base, f"output_dir={tmp_path / 'a'}", "train.updates=3"])
    recipe_main(RECIPE, [*base, f"output_dir={tmp_path / 'b'}", "train.updates=2"])
    recipe_main(RECIPE, [*base, f"output_dir={tmp_path / 'b'}", "train.updates=3"], resume=True)
    a, b = (load_file(tmp_path / run / "checkpoints" / "update_00003" / "adapter" / "adapter_model.safetensors")
            for run in ("a", "b"))  # fmt: skip
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
