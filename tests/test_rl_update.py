"""The RL update on the tiny SFT model, piece by piece: micro-batches and activation checkpointing give the one-pass
gradient, bf16 keeps the on-policy ratio at 1, the KL reference of an edit sees its own prefix, a trained
understanding side gets its gradient, prompts are drawn without replacement, scoring overlaps sampling, samples
without a reward are left out, stale rollouts are refused and a corrupt checkpoint costs one update, not the run."""

import json
import logging
import time

import numpy as np
import pytest
import torch

from lance_rl.config import RecipeError, load_recipe
from lance_rl.grpo import group_advantages
from lance_rl.rewards.registry import REGISTRY, register
from lance_rl.rl import RLRecipe, recipe_main
from lance_rl.rl_config import RLConfig
from lance_rl.rollout import StaleRollout

RECIPE = "recipes/quickstart/rl.yaml"


def small(out, checkpoint, *extra):
    return [f"output_dir={out}", f"model.checkpoint={checkpoint}", "algorithm.name=flow_grpo",
            "prompts.height=16", "prompts.width=16", "sampler.num_steps=6", "sampler.window_size=2", "sampler.window_range=[0, 4]",
            "algorithm.prompts_per_update=2", "algorithm.group_size=4", "eval.num_prompts=4", "eval.num_steps=6",
            "eval.every=0", "rollout.num_workers=0", "train.updates=2", "rewards={jpeg_incompressibility: 1.0}",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(sft_tiny):
    return sft_tiny / "checkpoints" / "step_0000200" / "model"


def built(overrides) -> RLRecipe:
    recipe = RLRecipe(load_recipe(RLConfig, RECIPE, overrides))
    recipe.setup()
    return recipe


def rollout_batch(recipe: RLRecipe):
    requests, sampler = recipe._plan_update(0)
    results, scored, _ = recipe._rollout_and_score(requests, sampler)
    rewards = torch.tensor([s for out in scored.values() for s in out.scores], dtype=torch.float64)
    groups = torch.arange(len(results)).repeat_interleave(recipe.cfg.algorithm.group_size)
    adv = group_advantages(rewards, groups)
    return requests, sampler, results, adv, groups


def gradient(recipe: RLRecipe, batch) -> dict[str, torch.Tensor]:
    """The accumulated gradient of one minibatch over every group (no optimizer step)."""
    requests, sampler, results, adv, groups = batch
    recipe.optimizer.zero_grad(set_to_none=True)
    recipe._prefixes, recipe._requests = {}, {}
    trained = torch.ones_like(adv.valid)
    terms = int(trained.sum()) * len(results[0].steps)
    stats = {k: [] for k in ("policy_loss", "kl", "kl_exact", "log_ratio", "clipped", "ratio")} | {"ratio_by_step": {}}
    for g in range(len(results)):
        rows = groups == g
        recipe.algorithm.group_loss(results[g], requests[g], sampler, adv.values[rows], trained[rows], terms, stats)
    return {n: p.grad.detach().clone() for n, p in recipe.trainable.items() if p.grad is not None}


def test_micro_batches_and_checkpointing_give_the_one_pass_gradient(tmp_path, model_dir):
    recipe = built(small(tmp_path / "r", model_dir, "algorithm.beta=0.04"))
    try:
        batch = rollout_batch(recipe)
        with torch.no_grad():  # a moved adapter, so the KL term and the ratio carry gradient everywhere
            for name, p in recipe.trainable.items():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        whole = gradient(recipe, batch)
        recipe.cfg.algorithm.micro_batch_size = 3  # 4 rows: micro-batches of 3 and 1
        micro = gradient(recipe, batch)
        recipe.policy.model.language_model.model.gradient_checkpointing = True
        checkpointed = gradient(recipe, batch)
    finally:
        recipe.cleanup()
    assert whole and whole.keys() == micro.keys() == checkpointed.keys()
    assert any(g.abs().max() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(checkpointed[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_on_the_cached_path_saves_activations(tmp_path, model_dir):
    """Saved tensors of one velocity with gradients: the checkpointed layers keep only their inputs."""
    from lance_rl.model.sampling import velocity

    recipe = built(small(tmp_path / "r", model_dir))
    try:
        requests, sampler, results, _, _ = rollout_batch(recipe)
        res, req = results[0], requests[0]
        prefix = recipe.prefix(req, grad=False).repeat(4)
        x = torch.from_numpy(np.array(res.x_t[:, 0]))

        def saved_bytes() -> int:
            total = 0

            def pack(t):
                nonlocal total
                total += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                velocity(recipe.policy.model, x, float(res.timesteps[0]), prefix, sampler.cfg).sum()
            return total

        plain = saved_bytes()
        recipe.policy.model.language_model.model.gradient_checkpointing = True
        checkpointed = saved_bytes()
    finally:
        recipe.cleanup()
    assert checkpointed < 0.5 * plain, (plain, checkpointed)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 2e-3)])
def test_first_update_sees_ratio_one_in_micro_batches(tmp_path, model_dir, precision, tolerance):
    out = tmp_path / precision
    recipe_main(RECIPE, small(out, model_dir, "train.updates=1", "algorithm.minibatches=1", f"train.precision={precision}",
                              "algorithm.micro_batch_size=2", "algorithm.cfg_grad=cond_only",
                              "model.gradient_checkpointing=true"))  # fmt: skip
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["ratio/max_abs_dev"] < tolerance, row
    assert row["policy_loss"] == pytest.approx(row["policy_loss"])  # finite


def test_the_kl_reference_of_an_edit_sees_a_prefix_built_by_the_reference(tmp_path, model_dir):
    """The edit source is routed to the generation expert, so a trained adapter changes the prefix: the reference
    velocity must come from the base model's own prefix, not from the policy's prefix with the adapter off."""
    from lance_rl.model import media
    from lance_rl.model.checkpoint import load_lance
    from lance_rl.model.prefix import encode_prefix
    from lance_rl.model.sampling import velocity
    from lance_rl.rollout import generation_request

    image = np.full((16, 16, 3), 255, dtype=np.uint8)
    image[4:12, 2:8] = (220, 30, 30)
    media.write_png(image, tmp_path / "src.png")
    (tmp_path / "edit.jsonl").write_text(json.dumps({"prompt": "make it blue", "source": "src.png"}) + "\n")
    recipe = built(small(tmp_path / "e", model_dir, "prompts.task=image_edit", f"prompts.train={tmp_path / 'edit.jsonl'}",
                         f"prompts.eval={tmp_path / 'edit.jsonl'}", "algorithm.prompts_per_update=1",
                         "algorithm.beta=0.04"))  # fmt: skip
    try:
        with torch.no_grad():
            for name, p in recipe.trainable.items():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        requests, _ = recipe._plan_update(0)
        req = requests[0]
        assert recipe.policy.prefix_depends_on_training(req.task)
        recipe._prefixes, recipe._requests = {}, {}
        x = torch.randn(1, 16, 48, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            policy_prefix = recipe.prefix(req, grad=False)  # built with the adapter on
            reference_prefix = recipe.prefix(req, grad=False, reference=True)
            with recipe.policy.reference():
                ours = velocity(recipe.policy.model, x, 0.7, reference_prefix)
                with_policy_prefix = velocity(recipe.policy.model, x, 0.7, policy_prefix)
        base = load_lance(model_dir)
        gen_request, _ = generation_request(recipe.policy, req)
        with torch.no_grad():
            expected = velocity(base.model, x, 0.7, encode_prefix(base.model, base.tokenizer, [gen_request], recipe.cfg_guidance))
    finally:
        recipe.cleanup()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert (with_policy_prefix - expected).abs().max() > 1e-3  # the old way: the adapter's prefix leaks in


def test_a_trained_understanding_side_gets_its_gradient_with_reuse_prefix_on(tmp_path, model_dir):
    recipe = built(small(tmp_path / "u", model_dir, "lora.targets=understanding", "algorithm.reuse_prefix=true",
                         "train.updates=1", "optim.lr=1e-2"))  # fmt: skip
    try:
        assert recipe.policy.trains_understanding and recipe.policy.prefix_depends_on_training("t2i")
        recipe.train()
        moved = [n for n, p in recipe.trainable.items() if "lora_B" in n and p.abs().max() > 0]
    finally:
        recipe.cleanup()
    assert moved, "the understanding adapter never received a gradient"


def test_prompts_are_drawn_without_replacement_within_an_update(tmp_path, model_dir):
    recipe = RLRecipe(load_recipe(RLConfig, RECIPE, small(tmp_path / "p", model_dir, "algorithm.prompts_per_update=16")))
    for k in range(40):
        requests, _ = recipe._plan_update(k)
        indices = [r.prompt_index for r in requests]
        assert len(set(indices)) == len(indices) == 16
    with pytest.raises(RecipeError, match="prompts_per_update is 200 but prompts.train holds 72"):
        RLRecipe(load_recipe(RLConfig, RECIPE, small(tmp_path / "p", model_dir, "algorithm.prompts_per_update=200")))


def test_lora_dropout_is_rejected_in_rl(tmp_path, model_dir):
    with pytest.raises(RecipeError, match="lora.dropout is 0.1: dropout makes the update's policy differ"):
        load_recipe(RLConfig, RECIPE, small(tmp_path, model_dir, "lora.dropout=0.1"))


def test_scoring_overlaps_sampling_and_samples_without_reward_are_left_out(tmp_path, model_dir):
    calls: list[float] = []

    def first_member_unscored(*, images, **kwargs):
        calls.append(time.perf_counter())
        time.sleep(0.3)
        return [None] + [float(im.mean()) / 255 for im in images[1:]]

    name = "test_first_member_unscored"
    register(name, first_member_unscored)
    try:
        recipe = built(small(tmp_path / "o", model_dir, f"rewards={{{name}: 1.0}}", "algorithm.prompts_per_update=3",
                             "train.updates=1"))  # fmt: skip
        ends: list[float] = []
        stream = recipe.rollout.stream

        def timed_stream(*args):
            yield from stream(*args)
            ends.append(time.perf_counter())

        recipe.rollout.stream = timed_stream
        try:
            last = recipe.train()
        finally:
            recipe.cleanup()
    finally:
        REGISTRY.pop(name)
    assert calls[0] < ends[0], "the first group was scored only after every rollout had returned"
    assert last["timing/score_after_rollout"] < last["timing/score"]
    assert last["samples_without_reward"] == 3 and last["skipped_samples"] >= 3


def test_a_rollout_from_stale_weights_is_refused(tmp_path, model_dir):
    recipe = built(small(tmp_path / "s", model_dir, "train.updates=2"))
    recipe.rollout.set_weights = lambda policy, version, weights=None: {"bytes": 0, "buckets": 0}  # never arrives
    try:
        with pytest.raises(StaleRollout, match="sampled with the weights of update 0, but the trainer is at update 1"):
            recipe.train()
    finally:
        recipe.cleanup()


def test_a_corrupt_latest_checkpoint_resumes_from_the_one_before(tmp_path, model_dir, caplog):
    out = tmp_path / "c"
    base = small(out, model_dir, "checkpoint.every=1", "checkpoint.keep_last=3")
    recipe_main(RECIPE, base)
    adapter = out / "checkpoints" / "update_00002" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        last = recipe_main(RECIPE, [*base, "train.updates=3"], resume=True)
    assert last["update"] == 3
    assert f"{adapter}" in caplog.text and "update_00001" in caplog.text
    rows = [json.loads(line)["update"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]  # update 2 was redone and logged once


def test_a_bf16_update_matches_the_fp32_update(tmp_path, model_dir):
    """The same rollout batch, the gradient computed once with fp32 weights and once with bf16 frozen weights under
    bf16 autocast (LoRA stays fp32): the directions agree and the norms within a few percent."""
    # A wide clip range: the two ratios differ by bf16 rounding, and clipping would zero different samples' terms.
    fp32 = built(small(tmp_path / "f", model_dir, "train.precision=fp32", "algorithm.clip_range=1.0"))
    bf16 = built(small(tmp_path / "b", model_dir, "train.precision=bf16", "algorithm.clip_range=1.0"))
    try:
        batch = rollout_batch(fp32)
        for recipe in (fp32, bf16):
            with torch.no_grad():
                for name, p in recipe.trainable.items():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(hash(name) % 2**31)) * 1e-3)
        a, b = gradient(fp32, batch), gradient(bf16, batch)
    finally:
        fp32.cleanup()
        bf16.cleanup()
    ga = torch.cat([a[n].flatten() for n in sorted(a)])
    gb = torch.cat([b[n].flatten() for n in sorted(a)])
    cosine = float(torch.nn.functional.cosine_similarity(ga, gb, dim=0))
    relative = float((ga - gb).norm() / ga.norm())
    assert cosine > 0.99 and relative < 0.15, (cosine, relative)
