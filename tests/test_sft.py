"""The SFT recipe end to end on tiny models: it learns, it resumes identically, LoRA exports, bad recipes fail early."""

import json

import numpy as np
import pytest
import torch
import yaml

from lance_rl.config import RecipeError, load_recipe
from lance_rl.sft import SFTRecipe, recipe_main
from lance_rl.sft_config import SFTConfig


@pytest.fixture(scope="module")
def world(shapes16):
    """A tiny Lance (hidden 64, 2 layers, PatchVAE) and 16x16 shapes images in the official parquet schema."""
    return shapes16


def recipe(world, out, **sections):
    data = {
        "output_dir": str(out),
        "model": {"checkpoint": str(world / "base")},
        "data": {"datasets": [{"path": str(world / "train.parquet"), "resolution": 16}], "tokens_per_step": 1200},
        "train": {"steps": 4, "timestep_shift": 3.0, "freeze_embeddings": False, "seed": 0},
        "optim": {"lr": 1e-3, "eps": 1e-8, "warmup_steps": 0},
        "checkpoint": {"every": 2, "keep_last": 0},
        "logging": {"every": 1},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def colour_accuracy(model_dir, prompts, seeds=2) -> float:
    """Share of samples whose tint is the prompted colour: the palette colour whose departure from white
    (255 - rgb) points most nearly the way the image's mean departure from white does (a simple pixel measure that
    still works on the blurry samples of a barely trained model)."""
    from lance_rl.model import media
    from lance_rl.model.checkpoint import load_lance
    from lance_rl.model.guidance import CFGConfig
    from lance_rl.model.prefix import GenerationRequest
    from lance_rl.model.sampling import SamplerConfig, generate
    from lance_rl.model.vae import PatchVAE
    from lance_rl.rewards.shapes import COLORS

    loaded = load_lance(model_dir)
    requests = [GenerationRequest("t2i", p.caption, (1, 4, 4)) for p in prompts]
    config = SamplerConfig(num_steps=8, shift=3.0, cfg=CFGConfig(scale=3.0))
    traj = generate(loaded.model, loaded.tokenizer, requests, config, seeds=list(range(len(requests) * seeds)), group_size=seeds)
    names = list(COLORS)
    ink = 255.0 - np.array([COLORS[n] for n in names], dtype=np.float32)
    ink /= np.linalg.norm(ink, axis=1, keepdims=True)
    hits = []
    for latent, prompt in zip(traj.latents, [p for p in prompts for _ in range(seeds)]):
        image = media.to_uint8(PatchVAE().decode(latent.view(1, 4, 4, 48)))[0].astype(np.float32)
        tint = (255.0 - image).reshape(-1, 3).mean(0)
        hits.append(names[int((ink @ tint).argmax())] == prompt.color)
    return float(np.mean(hits))


def test_generation_loss_falls_and_prompted_colours_appear(world, sft_tiny):
    from lance_rl.data.shapes import split_prompts

    rows = [json.loads(line) for line in (sft_tiny / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["mse"] < 0.6 * rows[0]["mse"], (rows[0], rows[-1])
    prompts = split_prompts()[1][:12]  # held-out captions
    before = colour_accuracy(world / "base", prompts)
    after = colour_accuracy(sft_tiny / "checkpoints" / "step_0000200" / "model", prompts)
    assert after >= before + 0.3, (before, after)


def final_weights(out):
    from safetensors.torch import load_file

    step = (out / "latest").read_text().strip()
    return load_file(out / "checkpoints" / step / "model" / "model.safetensors")


def test_a_resumed_run_reaches_the_same_weights(world, tmp_path):
    straight = tmp_path / "straight"
    recipe_main(str(recipe(world, straight, train={"steps": 6, "ema_decay": 0.9}, checkpoint={"every": 6})), [])
    halves = tmp_path / "halves"
    path = recipe(world, halves, train={"steps": 6, "ema_decay": 0.9}, checkpoint={"every": 3})
    recipe_main(str(path), ["train.steps=3"])  # stops after 3 steps, like a killed run's last checkpoint
    recipe_main(str(path), [], resume=True)
    a, b = final_weights(straight), final_weights(halves)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    ema_a = (straight / "checkpoints" / "step_0000006" / "model" / "ema.safetensors")
    ema_b = (halves / "checkpoints" / "step_0000006" / "model" / "ema.safetensors")
    assert ema_a.is_file() and ema_b.is_file()
    lines = (halves / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_lora_trains_adapters_only_and_exports_a_loadable_checkpoint(world, tmp_path):
    from lance_rl.export import export
    from lance_rl.cli import main
    from lance_rl.model.checkpoint import load_lance

    out = tmp_path / "lora"
    recipe_main(str(recipe(world, out, lora={"enabled": True, "rank": 4, "alpha": 8.0}, optim={"lr": 1e-2})), [])
    adapter = out / "checkpoints" / "step_0000004" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    merged_dir = export(out, tmp_path / "merged")
    base, merged = load_lance(world / "base").model.state_dict(), load_lance(merged_dir).model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("_moe_gen" in k for k in changed)  # only the generation expert's targets moved
    assert main(["generate", "--checkpoint", str(merged_dir), "--task", "t2i", "--prompt", "one red circle on the left",
                 "--height", "16", "--width", "16", "--steps", "2", "--out", str(tmp_path / "gen")]) == 0  # fmt: skip
    assert (tmp_path / "gen" / "sample_000.png").is_file()


def test_malformed_recipes_fail_before_any_work_naming_the_field(world, tmp_path):
    path = recipe(world, tmp_path / "bad")
    with pytest.raises(RecipeError, match=r"unknown field 'train.stpes' \(did you mean 'steps'\?\)"):
        load_recipe(SFTConfig, path, ["train.stpes=3"])
    with pytest.raises(RecipeError, match=r"optim.lr: expected float, got 'fast'"):
        load_recipe(SFTConfig, path, ["optim.lr=fast"])
    with pytest.raises(RecipeError, match=r"optim.schedule: 'linear' is not allowed; choose one of 'constant', 'cosine'"):
        load_recipe(SFTConfig, path, ["optim.schedule=linear"])
    with pytest.raises(RecipeError, match=r"data.datasets\[0\].path: .*nowhere.parquet does not exist"):
        SFTRecipe(load_recipe(SFTConfig, path, [f"data.datasets.0.path={tmp_path}/nowhere.parquet"]))
    with pytest.raises(RecipeError, match="missing required field.*train.steps"):
        load_recipe(SFTConfig, path, ["~train.steps"])
    assert not (tmp_path / "bad").exists()  # nothing was started


@pytest.mark.timeout(300)
def test_two_process_data_parallel_sft_runs_and_resumes(world, tmp_path):
    """Two CPU processes under torchrun (torch DDP on gloo, lance_rl/distributed.py): both train on their own data, process 0 writes,
    a resume continues. On GPUs the same code runs under `accelerate launch --config_file recipes/accelerate/ddp.yaml`."""
    import subprocess
    import sys
    from pathlib import Path

    path = recipe(world, tmp_path / "ddp", train={"steps": 2}, checkpoint={"every": 2})
    torchrun = str(Path(sys.executable).parent / "torchrun")
    launch = [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "lance_rl.cli", "sft", "--config",
              str(path)]  # fmt: skip
    first = subprocess.run(launch, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = subprocess.run([*launch, "train.steps=4", "--resume"], capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_0000004" / "trainer_state.pt", weights_only=True)
    assert len(state["positions"]) == 2  # both processes' data positions were recorded
