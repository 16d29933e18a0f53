"""The flow-GRPO recipe on tiny models: on-policy ratios, a reward that rises with Ray workers, exact resume,
surviving a dead worker, LoRA and full policies, video and editing rollouts."""

import json

import numpy as np
import pytest
import torch

from lance_rl.config import RecipeError, load_recipe
from lance_rl.rl import RLRecipe
from lance_rl.rl_config import RLConfig

RECIPE = "recipes/quickstart/rl.yaml"


def small(out, checkpoint, *extra):
    return [f"output_dir={out}", f"model.checkpoint={checkpoint}", "algorithm.name=flow_grpo",
            "prompts.height=16", "prompts.width=16", "sampler.num_steps=6", "sampler.window_size=2", "sampler.window_range=[0, 4]",
            "algorithm.prompts_per_update=2", "algorithm.group_size=4", "eval.num_prompts=4", "eval.num_steps=6",
            "eval.every=0", "rollout.num_workers=0", "train.updates=2", *extra]  # fmt: skip


def run(overrides, resume=False):
    recipe = RLRecipe(load_recipe(RLConfig, RECIPE, overrides), resume=resume)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def sft_model(sft_tiny):
    return sft_tiny / "checkpoints" / "step_0000200" / "model"


def test_first_update_sees_ratio_one_at_every_trained_step(tmp_path, sft_tiny):
    # one batch, one optimizer step: every ratio is computed before any weight moves
    run(small(tmp_path / "r", sft_model(sft_tiny), "train.updates=1", "rewards={jpeg_incompressibility: 1.0}",
              "algorithm.minibatches=1"))
    (row,) = metrics(tmp_path / "r")
    steps = [k for k in row if k.startswith("ratio/step_")]
    assert len(steps) == 2  # the window's two steps were both trained
    assert row["ratio/max_abs_dev"] < 1e-5 and all(abs(row[k] - 1) < 1e-6 for k in steps)


@pytest.mark.timeout(300)
def test_held_out_reward_rises_with_two_ray_workers(tmp_path, sft_tiny):
    out = tmp_path / "ray"
    recipe = run(small(out, sft_model(sft_tiny), "rewards={jpeg_incompressibility: 1.0}", "rollout.num_workers=2",
                       "train.updates=12", "eval.every=12", "algorithm.prompts_per_update=4", "algorithm.minibatches=2",
                       "optim.lr=6e-3", "algorithm.clip_range=0.05"))  # fmt: skip
    rows = metrics(out)
    before, after = rows[0]["eval/reward/mean"], rows[-1]["eval/reward/mean"]
    # Evaluation uses fixed seeds and the ODE sampler, so its noise is the reward's spread across its samples; the
    # gain must clear twice the standard error of their mean (a 16 px JPEG is mostly header: no relative bar).
    scores = json.loads((out / "eval" / "update_00000.json").read_text())["scores"]
    assert after - before > 2 * np.std(scores) / np.sqrt(len(scores)), (before, after, np.std(scores), len(scores))
    assert recipe.rollout.replaced == 0
    assert (out / "eval" / "update_00012.png").is_file()


def trainable_after(out):
    from safetensors.torch import load_file

    step = (out / "latest").read_text().strip()
    return load_file(out / "checkpoints" / step / "adapter" / "adapter_model.safetensors")


def test_a_run_resumed_between_updates_makes_the_same_next_update(tmp_path, sft_tiny):
    base = small(tmp_path / "x", sft_model(sft_tiny), "rewards={jpeg_incompressibility: 1.0}", "checkpoint.every=1",
                 "optim.lr=3e-3")  # fmt: skip
    straight = tmp_path / "straight"
    run([*base, f"output_dir={straight}", "train.updates=3"])
    halves = tmp_path / "halves"
    run([*base, f"output_dir={halves}", "train.updates=2"])  # a run killed after its second update's checkpoint
    run([*base, f"output_dir={halves}", "train.updates=3"], resume=True)
    a, b = trainable_after(straight), trainable_after(halves)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert [r["update"] for r in metrics(halves)] == [1, 2, 3]
    assert metrics(straight)[-1]["reward/mean"] == pytest.approx(metrics(halves)[-1]["reward/mean"], abs=1e-6)


@pytest.mark.timeout(300)
def test_a_killed_rollout_worker_is_replaced_and_nothing_is_lost(tmp_path, sft_tiny):
    import ray

    overrides = small(tmp_path / "k", sft_model(sft_tiny), "rewards={jpeg_incompressibility: 1.0}",
                      "rollout.num_workers=2", "train.updates=1")  # fmt: skip
    recipe = RLRecipe(load_recipe(RLConfig, RECIPE, overrides))
    recipe.setup()
    try:
        recipe.train()
        ray.kill(recipe.rollout.workers[0])  # dies between updates; the next rollout finds it dead
        recipe.cfg.train.updates = 2
        recipe.train()
    finally:
        recipe.cleanup()
    rows = metrics(tmp_path / "k")
    assert [r["update"] for r in rows] == [1, 2] and recipe.rollout.replaced == 1
    # Every group of the update came back and was scored: nothing was dropped or trained as a zero.
    assert rows[-1]["samples_without_reward"] == 0 and rows[-1]["reward/mean"] > 0


def test_a_full_policy_trains_the_generation_expert_only_with_its_kl(tmp_path, sft_tiny):
    from safetensors.torch import load_file

    from lance_rl.model.checkpoint import load_lance

    model = sft_model(sft_tiny)
    out = tmp_path / "full"
    run(small(out, model, "rewards={jpeg_incompressibility: 1.0}", "train.policy=generation", "lora.enabled=false",
              "optim.lr=1e-4", "train.updates=1", "algorithm.beta=0.01"))  # fmt: skip
    trained = load_file(out / "checkpoints" / "update_00001" / "trainable.safetensors")
    base = load_lance(model).model.state_dict()
    assert trained and all("_moe_gen" in k or k.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae") for k in trained)
    assert any(not torch.equal(trained[k], base[k]) for k in trained)  # the expert moved
    (row,) = metrics(out)
    assert row["kl"] >= 0 and row["kl_exact"] >= row["kl"]  # Flow-GRPO's units are the exact KL times |dt| < 1


def test_video_and_edit_rollouts_reach_their_rewards(tmp_path, sft_tiny):
    from lance_rl.model import media
    from lance_rl.rewards.registry import REGISTRY, register

    seen: dict[str, list] = {}

    def record(*, prompts, videos=None, images=None, conditions=None, **kwargs):
        seen.setdefault("videos", []).extend(videos or [])
        seen.setdefault("conditions", []).extend(conditions or [])
        return [0.5 + 0.01 * i for i in range(len(prompts))]

    register("test_record_video", lance_rl_reward(record, ("video",)))
    register("test_record_edit", lance_rl_reward(record, ("image",)))
    try:
        model = sft_model(sft_tiny)
        run(small(tmp_path / "video", model, "rewards={test_record_video: 1.0}", "prompts.task=t2v",
                  "prompts.num_frames=3", "train.updates=1"))  # fmt: skip
        assert seen["videos"] and all(v.shape == (3, 16, 16, 3) for v in seen["videos"])

        image = np.full((16, 16, 3), 255, dtype=np.uint8)
        image[4:12, 2:8] = (220, 30, 30)
        media.write_png(image, tmp_path / "src.png")
        (tmp_path / "edit.jsonl").write_text(json.dumps({"prompt": "make it blue", "source": "src.png"}) + "\n")
        run(small(tmp_path / "edit", model, "rewards={test_record_edit: 1.0}", "prompts.task=image_edit",
                  f"prompts.train={tmp_path / 'edit.jsonl'}", f"prompts.eval={tmp_path / 'edit.jsonl'}",
                  "algorithm.prompts_per_update=1", "train.updates=1"))  # fmt: skip
        # The edit reward sees the source beside every sample (what image_similarity-style rewards compare with).
        assert seen["conditions"] and all(np.array_equal(c, image) for c in seen["conditions"])
        assert metrics(tmp_path / "edit")[-1]["update"] == 1
    finally:
        REGISTRY.pop("test_record_video")
        REGISTRY.pop("test_record_edit")


def lance_rl_reward(fn, modalities):
    from lance_rl.rewards.base import FunctionReward

    return FunctionReward(fn, name=fn.__name__, modalities=modalities)


def test_bad_rl_recipes_fail_early(tmp_path, sft_tiny):
    model = sft_model(sft_tiny)
    with pytest.raises(RecipeError, match="group_size must be at least 2"):
        load_recipe(RLConfig, RECIPE, small(tmp_path, model, "algorithm.group_size=1"))
    with pytest.raises(RecipeError, match="never stochastic"):
        load_recipe(RLConfig, RECIPE, small(tmp_path, model, "sampler.window_range=[0, 6]"))
    with pytest.raises(RecipeError, match="rewards is empty"):
        load_recipe(RLConfig, RECIPE, small(tmp_path, model, "rewards={}"))
