"""`lance-rl plan`: exact parameter counts, activations that agree with what autograd saves, and every 3B recipe
fitting 8 x 80 GB with 10% headroom."""

import json
from pathlib import Path

import pytest

from lance_rl.cli import main
from lance_rl.config import load_recipe
from lance_rl.plan import parameter_bytes, plan_rl, lora_parameters
from lance_rl.rl_config import RLConfig

ROOT = Path(__file__).resolve().parents[1]
# flow-GRPO recipes (the x2t recipe runs one process: its own test).
RL_3B = sorted(p for p in (ROOT / "recipes" / "lance-3b").glob("*.yaml")
               if "rewards:" in p.read_text() and "task: x2t" not in p.read_text())  # fmt: skip


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_parameters_are_the_release_counts():
    from lance_rl.model.config import lance_3b

    counts = parameter_bytes(lance_3b())
    # scale-3b.md: 6,845,501,488 parameters (ViT 668,684,288 of them); LoRA r64 on the generation expert: 119.7 M
    assert counts["total"] == 6_845_501_488 and counts["vit"] == 668_684_288
    assert counts["generation_expert"] == counts["understanding_expert"] == 2_774_782_976
    assert lora_parameters(lance_3b(), 64, "generation") == pytest.approx(119.7e6, rel=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_planned_activations_agree_with_saved_tensor_accounting(tmp_path, checkpointing):
    """The plan for a 2-layer tiny-width model against the bytes autograd saves for one micro-batch of 4 rows."""
    from lance_rl.bench import measure_update_activations
    from lance_rl.model.checkpoint import init_tiny
    from lance_rl.model.config import LanceConfig

    ckpt = init_tiny(tmp_path / "tiny", hidden_size=128, num_layers=2)
    cfg = load_recipe(RLConfig, ROOT / "recipes/quickstart/rl.yaml", [
        f"output_dir={tmp_path}", f"model.checkpoint={ckpt}", "algorithm.micro_batch_size=4", "train.precision=fp32",
        f"model.gradient_checkpointing={str(checkpointing).lower()}"])  # fmt: skip
    plan = plan_rl(cfg, gpus=1, gpu_memory_gb=80)
    planned = plan["roles"]["trainer"]["activations (4 rows)"] * 1e9
    config = LanceConfig.from_llm_config(ckpt)
    measured = measure_update_activations(config, {"task": "t2i", "grid": (1, 8, 8)}, rows=4, checkpointing=checkpointing,
                                          trains="lora", lora_rank=16)  # fmt: skip
    expected = measured["block_bytes"]
    if checkpointing:  # backward holds one recomputed layer on top of the checkpoints
        full = measure_update_activations(config, {"task": "t2i", "grid": (1, 8, 8)}, rows=4, trains="lora", lora_rank=16)
        expected += full["block_bytes"] / config.num_hidden_layers
    assert planned == pytest.approx(expected, rel=0.10), (planned, expected)


def test_the_3b_x2t_recipe_fits_one_gpu_and_its_parts_add_up(capsys):
    """TRL GRPO on the understanding expert: one process; LoRA state exact, weights the whole bf16 model."""
    assert main(["plan", str(ROOT / "recipes/lance-3b/x2t_vqa.yaml"), "--gpus", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    trainer = result["roles"]["trainer"]
    assert result["fits"] and result["gpus"][0]["total_gb"] == pytest.approx(sum(trainer.values()), abs=0.01)
    assert trainer["weights"] == pytest.approx(6_845_501_488 * 2 / 1e9 + result["trainable_parameters"] * 4 / 1e9, rel=1e-6)
    assert trainer["optimizer (AdamW)"] == pytest.approx(2 * trainer["gradients"], abs=1e-5)  # GB, rounded to 6 places


@pytest.mark.parametrize("path", RL_3B, ids=lambda p: p.name)
def test_every_3b_rl_recipe_fits_8_gpus_of_80_gb(path, capsys):
    assert main(["plan", str(path), "--gpus", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["max_gpu_gb"] <= 72, result["gpus"]
    workers = [v for k, v in result["roles"].items() if k.startswith("rollout worker")]
    if "t2i" in path.name:
        assert all(sum(w.values()) <= 20 for w in workers)  # a 3B rollout worker for t2i 512x512 in bf16
        micro = next(k for k in result["roles"]["trainer"] if k.startswith("activations"))
        assert result["roles"]["trainer"][micro] <= 20  # the update's activations per micro-batch


def test_a_plan_that_does_not_fit_says_so(capsys):
    args = ["plan", str(ROOT / "recipes/lance-3b/t2i_pickscore.yaml"), "algorithm.micro_batch_size=16",
            "~model.gradient_checkpointing", "--gpus", "8", "--gpu-memory", "16"]  # fmt: skip
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "verdict: does not fit" in out


@pytest.mark.parametrize("strategy, fits", [("fsdp2", True), ("zero3", True), ("ddp", False)])
def test_full_sft_of_both_experts_on_8_gpus(strategy, fits, capsys):
    """Full fine-tuning of both experts (5.55 B trainable) fits 80 GB per GPU when sharded, not as DDP replicas."""
    args = ["plan", str(ROOT / "recipes/lance-3b/sft_parquet.yaml"), f"train.strategy={strategy}", "--gpus", "8", "--json"]
    assert main(args) == (0 if fits else 1)
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] is fits and result["strategy"] == strategy
    assert result["trainable_parameters"] == 5_554_487_344
