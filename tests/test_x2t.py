"""Understanding GRPO with TRL: text rewards in our contract (local, remote, failure policy), the recipe run through
`lance-rl rl` with a custom reward by import path (the adapter moves toward the reward; export merges it), keeping
generation exactly fixed, the generation guard, and recipe errors."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lance_rl.rewards import (
    FailurePolicy,
    ModalityError,
    build_mix,
    load_reward,
    score_with_policy,
)

CAPTION = "two red circles on the left"


# ------------------------------------------------------------------------------------------------ text rewards
def test_text_rewards_score_answers():
    vqa = load_reward("shapes_vqa")
    questions = [
        "how many shapes are there?",
        "what colour are they?",
        "which side are they on?",
        "what shape are they?",
    ]
    meta = [{"caption": CAPTION}] * 4
    right = vqa(
        prompts=questions,
        completions=["2", "Red.", "on the left", "circles"],
        metadata=meta,
    )
    assert right.scores == [1.0, 1.0, 1.0, 1.0]
    wrong = vqa(
        prompts=questions,
        completions=["three", "blue", "right", "square"],
        metadata=meta,
    )
    assert wrong.scores == [0.0, 0.0, 0.0, 0.0]
    assert right.details["count"] == [
        1.0,
        None,
        None,
        None,
    ]  # per question type: accuracy per type is logged
    assert vqa(prompts=["what is this?"], completions=["x"], metadata=[{}]).scores == [None]  # not a shapes question
    exact = load_reward("exact_answer")
    assert exact(
        prompts=["q"] * 3,
        completions=[" The Left. ", "left", "x"],
        answers=["left", ["right", "up"], None],
    ).scores == [1.0, 0.0, None]
    fmt = load_reward("answer_format", max_words=2)
    assert fmt(prompts=["q"] * 4, completions=["red", "two red", "a b c", ""]).scores == [1.0, 1.0, 0.0, 0.0]
    mix = build_mix(
        {
            "exact_answer": 1.0,
            "answer_format": {"weight": 0.5, "kwargs": {"max_words": 1}},
        }
    )
    out = mix(prompts=["q", "q"], completions=["red", "not red"], answers=["red", "red"])
    assert out.scores == [1.5, 0.0] and out.details["exact_answer"] == [1.0, 0.0]


def test_text_and_media_rewards_refuse_each_others_batches():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ModalityError, match="'shapes' scores image only, but was given texts"):
        load_reward("shapes")(prompts=["a"], completions=["red"])
    with pytest.raises(ModalityError, match="'exact_answer' scores text only, but was given images"):
        load_reward("exact_answer")(prompts=["a"], images=[image])
    with pytest.raises(ModalityError, match="got 1 completions for 2 prompts"):
        load_reward("exact_answer")(prompts=["a", "b"], completions=["x"])
    with pytest.raises(ModalityError, match="answers= goes with completions="):
        load_reward("shapes")(prompts=["a"], images=[image], answers=["x"])
    with pytest.raises(ModalityError, match=r"answers\[0\] must be a string"):
        load_reward("exact_answer")(prompts=["a"], completions=["x"], answers=[3])
    assert load_reward("shapes")(prompts=[CAPTION], images=[image]).scores == [0.0]  # image rewards unchanged


def test_failure_policy_retries_only_the_failed_answers():
    calls = []

    def flaky(*, prompts, completions, answers, **kwargs):
        calls.append(list(completions))
        if len(calls) == 1:
            return [1.0, float("nan"), 0.0]
        return [0.5] * len(completions)

    flaky.modalities = ("text",)
    out = score_with_policy(load_reward(flaky), FailurePolicy(retries=1, backoff=0.0), prompts=["a", "b", "c"],
                            completions=["x", "y", "z"], answers=["x", "y", "q"])  # fmt: skip
    assert out.scores == [1.0, 0.5, 0.0] and calls[1] == ["y"]  # the retry saw only the failed sample's answer


def test_a_text_reward_served_over_http_scores_as_locally():
    from lance_rl.rewards.remote import RemoteReward
    from lance_rl.rewards.server import make_server

    server = make_server(load_reward("shapes_vqa"), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        batch = {"prompts": ["how many shapes are there?", "what colour are they?"], "completions": ["two", "blue"],
                     "answers": ["two", "red"], "metadata": [{"caption": CAPTION}] * 2,
                     "conditions": [np.zeros((8, 8, 3), np.uint8)] * 2}  # fmt: skip
        remote = RemoteReward(server.url, backoff=0.01)(**batch)
        local = load_reward("shapes_vqa")(**batch)
        assert remote.scores == local.scores == [1.0, 0.0] and remote.details == local.details
    finally:
        server.shutdown()
        server.server_close()


def trl_batch():
    """What TRL hands a reward function: conversational prompts and completions, the dataset's columns."""
    from PIL import Image

    image = [Image.fromarray(np.zeros((8, 8, 3), np.uint8))]
    questions = [
        "how many shapes are there?",
        "what colour are they?",
        "which side are they on?",
    ]
    return {
        "prompts": [[{"role": "user", "content": [{"type": "image", "image": image[0]}, {"type": "text", "text": q}]}]
                 for q in questions],
        "completions": [[{"role": "assistant", "content": a}] for a in ("two", "blue", "left")],
        "answer": ["two", "red", "left"], "question_type": ["count", "color", "position"], "caption": [CAPTION] * 3,
        "image": [image] * 3, "completion_ids": [[1]] * 3, "trainer_state": None,
    }  # fmt: skip


def test_rewards_run_as_trl_reward_functions_locally_and_in_ray_actors():
    """The recipe's adapter: TRL's keywords become our contract (question, answer text, reference answers, the image
    as condition, the other columns as metadata); details go to TRL's log_metric; a Ray-hosted reward scores alike."""
    ray = pytest.importorskip("ray")
    from lance_rl.x2t.rewards import TRLReward

    logged = {}
    local = TRLReward(build_mix({"shapes_vqa": 1.0}).components[0])
    assert local.__name__ == "shapes_vqa"
    assert local(**trl_batch(), log_metric=logged.__setitem__) == [1.0, 0.0, 1.0]
    assert logged == {"rewards/shapes_vqa/count/mean": 1.0, "rewards/shapes_vqa/color/mean": 0.0,
                      "rewards/shapes_vqa/position/mean": 1.0}  # fmt: skip
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        hosted = build_mix({"shapes_vqa": {"ray": {"num_actors": 2, "num_cpus": 0.25}}}).components[0]
        assert TRLReward(hosted)(**trl_batch()) == [
            1.0,
            0.0,
            1.0,
        ]  # split over two actors, put back in order
        hosted.reward.close()
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ the recipe
REWARD_MODULE = '''
from lance_rl.rewards import reward

EARLY = set("abcdefghijklm")


@reward(name="early_letter", modalities=("text",))
def early_letter(*, completions, **kwargs):
    """1 when the answer starts with a letter from a to m: a reward any tokenizer can move toward."""
    return [1.0 if c[:1].lower() in EARLY else 0.0 for c in completions]
'''


def recipe(tmp_path: Path, checkpoint: Path, **changes) -> Path:
    data = {
        "task": "x2t_image",
        "output_dir": str(tmp_path / "run"),
        "model": {"checkpoint": str(checkpoint), "resolution": 56},
        "rewards": {"x2t_test_rewards:early_letter": 1.0},
        "data": {
            "train": "shapes-vqa",
            "eval": "shapes-vqa-heldout",
            "num_train": 64,
            "num_eval": 4,
        },
        "grpo": {
            "num_generations": 8,
            "prompts_per_step": 4,
            "max_completion_length": 2,
            "temperature": 0.2,
        },
        "train": {"steps": 4, "seed": 0},
        "lora": {"rank": 8, "alpha": 16},
        "optim": {"lr": 1.0e-2, "eps": 1.0e-8},
        "generation": {"num_prompts": 1, "samples_per_prompt": 1, "num_steps": 2},
        "eval": {"every": 4, "max_new_tokens": 2},
        "checkpoint": {"every": 4},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    path = tmp_path / "x2t.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def expected_first_reward(model, processor, rows, temperature: float = 0.2) -> float:
    """E[early_letter] of the answer's first token under the sampling policy, exactly: the probability mass (at the
    recipe's temperature) of tokens whose text starts with a rewarded letter, averaged over the questions."""
    from trl.data_utils import prepare_multimodal_messages

    tok = model.lance_tokenizer
    rewarded = torch.tensor([tok.decode([i])[:1].lower() in set("abcdefghijklm") for i in range(len(tok))])
    convs = [prepare_multimodal_messages(r["prompt"], images=[r["image"]]) for r in rows]
    inputs = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        probs = torch.softmax(model(**inputs).logits[:, -1].float() / temperature, -1)
    return float(probs[:, rewarded].sum(-1).mean())


def test_trl_grpo_moves_the_adapter_toward_a_custom_reward(tiny_ckpt, tmp_path, monkeypatch):
    """`lance-rl rl` on an x2t recipe runs TRL's GRPOTrainer with a reward given by import path; the LoRA adapter on
    the understanding expert moves the policy toward what the reward pays for; the run folder is the usual one and
    `lance-rl export` merges the adapter into the official layout."""
    from lance_rl.model.hf import LanceForUnderstanding, LanceProcessor

    from lance_rl.cli import main
    from lance_rl.config import load_recipe
    from lance_rl.export import export
    from lance_rl.x2t.config import X2TConfig
    from lance_rl.x2t.recipe import build_rows

    (tmp_path / "x2t_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = recipe(tmp_path, tiny_ckpt)
    cfg = load_recipe(X2TConfig, path)
    rows = build_rows("shapes-vqa", 16, cfg, heldout=False)
    processor = LanceProcessor.from_pretrained(tiny_ckpt, image_resolution=56)
    before = expected_first_reward(LanceForUnderstanding.from_pretrained(tiny_ckpt), processor, rows)

    assert main(["rl", "--config", str(path)]) == 0

    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in metrics] == [0, 1, 2, 3, 4]
    assert "eval/accuracy/mean" in metrics[0] and "gold/reward/mean" in metrics[-1]  # before and after
    assert all("reward/mean" in r and "rewards/x2t_test_rewards:early_letter/mean" in r for r in metrics[1:])
    assert (run / "latest").read_text().strip() == "update_00004"
    adapter = run / "checkpoints" / "update_00004" / "adapter"
    assert (adapter / "base_checkpoint.txt").read_text().strip() == str(Path(tiny_ckpt).resolve())

    merged = export(run, tmp_path / "export")
    after = expected_first_reward(LanceForUnderstanding.from_pretrained(merged), processor, rows)
    assert before < 0.2 and after > 0.6, (
        before,
        after,
    )  # the update followed the reward, not only ran
    assert metrics[-1]["reward/mean"] > metrics[1]["reward/mean"]


def test_answer_only_training_leaves_generation_exactly_unchanged(tiny_ckpt):
    """Perturbing every adapter that `generation.keep: answer_only` trains leaves a t2i sample bit for bit the
    same; the same perturbation of the usual understanding adapters changes it."""
    from lance_rl.model.checkpoint import load_lance
    from lance_rl.model.prefix import GenerationRequest
    from lance_rl.model.sampling import SamplerConfig, generate
    from peft import LoraConfig, get_peft_model

    from lance_rl.config import load_recipe
    from lance_rl.x2t.config import X2TConfig
    from lance_rl.x2t.recipe import lora_targets

    def sample(model, tokenizer):
        request = GenerationRequest("t2i", CAPTION, (1, 2, 2))
        return generate(model, tokenizer, [request], SamplerConfig(num_steps=3), seeds=[0]).latents

    outcomes = {}
    for keep in ("answer_only", "none"):
        loaded = load_lance(tiny_ckpt)
        reference = sample(loaded.model, loaded.tokenizer)
        cfg = load_recipe(X2TConfig, None, ["task=x2t_image", "output_dir=x", f"model.checkpoint={tiny_ckpt}",
                                            "rewards={shapes_vqa: 1.0}", f"generation.keep={keep}"])  # fmt: skip
        targets = lora_targets(cfg, loaded.model.config.num_hidden_layers)
        peft = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=targets))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)  # as if trained
        outcomes[keep] = torch.equal(sample(loaded.model, loaded.tokenizer), reference)
    assert outcomes == {"answer_only": True, "none": False}


def test_generation_guard_stops_and_keeps_the_last_checkpoint_within_bounds(tiny_ckpt, tmp_path, monkeypatch):
    from lance_rl.config import load_recipe
    from lance_rl.x2t import X2TConfig, X2TRecipe

    (tmp_path / "x2t_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = recipe(tmp_path, tiny_ckpt, train__steps=5, eval__every=1, generation__keep="guard",
                  generation__max_drop=0.05)  # fmt: skip
    scores = iter([0.50, 0.49, 0.47, 0.40, 0.60, 0.60])  # update 0, 1, 2 within 0.05 of the start; 3 is not
    monkeypatch.setattr(X2TRecipe, "generation_score", lambda self: next(scores))
    run = X2TRecipe(load_recipe(X2TConfig, path))
    run.setup()
    try:
        run.train()
    finally:
        run.cleanup()
    assert run.stopped_by_guard and run.update == 3
    assert (tmp_path / "run" / "latest").read_text().strip() == "update_00002"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["update"] == 3 and rows[-1]["generation_guard/stopped"] == 1.0


def test_recipe_errors_name_the_field(tiny_ckpt, tmp_path):
    from lance_rl.config import RecipeError, load_recipe
    from lance_rl.x2t import X2TConfig, X2TRecipe, recipe_task

    path = recipe(tmp_path, tiny_ckpt)
    assert recipe_task(path) == "x2t_image" and recipe_task(path, ["task=t2i"]) == "t2i"
    with pytest.raises(RecipeError, match="grpo.beta > 0 with train.policy full"):
        load_recipe(X2TConfig, path, ["train.policy=full", "grpo.beta=0.04"])
    with pytest.raises(RecipeError, match="guard needs generation.evaluate"):
        load_recipe(X2TConfig, path, ["generation.keep=guard", "generation.evaluate=false"])
    with pytest.raises(RecipeError, match="data.train: nope.parquet is neither"):
        X2TRecipe(load_recipe(X2TConfig, path, ["data.train=nope.parquet"]))
    with pytest.raises(RecipeError, match="rewards.no_such_reward"):
        X2TRecipe(load_recipe(X2TConfig, path, ["rewards={no_such_reward: 1.0}"]))
    with pytest.raises(RecipeError, match="unknown field 'grpo.num_generation'"):
        load_recipe(X2TConfig, path, ["grpo.num_generation=4"])


def test_bf16_keeps_the_frozen_weights_bf16_and_trains_an_fp32_adapter(tiny_ckpt, tmp_path, monkeypatch):
    """train.precision bf16 (the 3B setting): the model loads in bf16, PEFT's adapter stays fp32, TRL runs under bf16
    autocast, and the evaluation (answers and the generation score) runs on the bf16 model."""
    from lance_rl.config import load_recipe
    from lance_rl.x2t import X2TConfig, X2TRecipe

    (tmp_path / "x2t_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_recipe(X2TConfig, recipe(tmp_path, tiny_ckpt), ["train.precision=bf16", "train.steps=1", "eval.every=1"])
    run = X2TRecipe(cfg)
    try:
        run.setup()
        assert run.model.lance.language_model.lm_head.weight.dtype == torch.bfloat16
        assert run.trainable and all(p.dtype == torch.float32 for p in run.trainable.values())
        before = {n: p.detach().clone() for n, p in run.trainable.items()}
        last = run.train()
    finally:
        run.cleanup()
    assert last["update"] == 1 and last["gold/reward/mean"] is not None and "eval/accuracy/mean" in last
    assert any(not torch.equal(before[n], p) for n, p in run.trainable.items())


def test_micro_batches_make_the_whole_batch_update(tiny_ckpt, tmp_path, monkeypatch):
    """grpo.micro_batch_size splits the forward/backward of one generated batch (what bounds memory at 3B); the
    optimizer step is the one the whole batch makes."""
    from safetensors.torch import load_file

    from lance_rl.x2t import recipe_main

    (tmp_path / "x2t_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    adapters, norms = [], []
    for micro in (0, 8):
        out = tmp_path / f"micro{micro}"
        recipe_main(str(recipe(tmp_path, tiny_ckpt)), [f"output_dir={out}", f"grpo.micro_batch_size={micro}",
                                                       "train.steps=1", "eval.every=0", "checkpoint.every=1"])  # fmt: skip
        adapters.append(load_file(out / "checkpoints" / "update_00001" / "adapter" / "adapter_model.safetensors"))
        norms.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["grad_norm"])
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)  # the same gradient, not only the same direction (Adam)
    moved = [k for k in adapters[0] if "lora_B" in k and adapters[0][k].abs().max() > 0]
    assert moved
    for key in adapters[0]:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], atol=2e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("policy", ["lora", "full"])
def test_a_stopped_run_resumes_to_the_uninterrupted_result(tiny_ckpt, tmp_path, monkeypatch, policy):
    """--resume continues from the newest checkpoint with TRL's state (adapter or weights, optimizer, schedule, RNG,
    data position): the run stopped at update 2 and resumed to 4 ends with the weights and rows of the run never
    stopped."""
    from safetensors.torch import load_file

    from lance_rl.x2t import recipe_main

    (tmp_path / "x2t_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = str(recipe(tmp_path, tiny_ckpt))
    common = ["eval.every=2", "checkpoint.every=2", "generation.evaluate=false", f"train.policy={policy}",
              "optim.lr=1e-3"]  # fmt: skip
    recipe_main(path, [f"output_dir={tmp_path / 'whole'}", "train.steps=4", *common])
    recipe_main(path, [f"output_dir={tmp_path / 'parts'}", "train.steps=2", *common])
    recipe_main(path, [f"output_dir={tmp_path / 'parts'}", "train.steps=4", *common], resume=True)

    def weights(run, update=4):
        folder = tmp_path / run / "checkpoints" / f"update_{update:05d}"
        file = folder / "adapter" / "adapter_model.safetensors" if policy == "lora" else folder / "model" / "model.safetensors"
        return load_file(file)

    whole, parts = weights("whole"), weights("parts")
    assert any(not torch.equal(w, weights("whole", 2)[k]) for k, w in whole.items())  # updates 3-4 moved it
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key], atol=1e-6, rtol=1e-5, msg=key)

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert [r["update"] for r in rows("parts")] == [r["update"] for r in rows("whole")] == [0, 1, 2, 3, 4]
    for a, b in zip(rows("whole"), rows("parts"), strict=True):
        assert b.get("reward/mean") == pytest.approx(a.get("reward/mean"), abs=1e-6)
        assert b.get("eval/accuracy/mean") == pytest.approx(a.get("eval/accuracy/mean"), abs=1e-9)
