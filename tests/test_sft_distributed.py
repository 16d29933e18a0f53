"""Sharded SFT (train.strategy fsdp2, zero2, zero3) on two CPU processes under torchrun (gloo): the same loss curve and
weights as one process on the same global batch, exact resumes from sharded checkpoints, and an export that gathers
the shards into the official layout, loaded back in one process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lance_rl.sft import recipe_main

PORTS = {"fsdp2": 29541, "zero2": 29543, "zero3": 29545}  # the resumed run uses the next port
COMPARED = ("loss", "mse", "ce", "grad_norm", "lr", "tokens", "samples_seen")


@pytest.fixture(scope="module")
def world(shapes16, tmp_path_factory):
    """The shapes world plus a small understanding set (x2t_image manifest: a coloured square, "what colour?")."""
    from PIL import Image

    root = tmp_path_factory.mktemp("x2t")
    rng, lines = np.random.default_rng(0), []
    for i in range(40):
        image = np.full((56, 56, 3), 255, np.uint8)
        colour = rng.integers(0, 255, 3)
        image[14:42, 14:42] = colour
        Image.fromarray(image).save(root / f"{i}.png")
        row = {"task": "x2t_image", "image": f"{i}.png", "question": "what colour?"}
        lines.append(json.dumps(row | {"answer": "red" if colour[0] > 128 else "blue"}))
    (root / "x2t.jsonl").write_text("\n".join(lines) + "\n")
    return {"base": shapes16 / "base", "t2i": shapes16 / "train.parquet", "x2t": root / "x2t.jsonl"}


def recipe(world, out, data="t2i", **train):
    """10 steps of 4 packs, EMA, a warm-up and cosine schedule and clipping, so the comparison pins the learning rate,
    the clipping and the EMA as well as the gradients. "mixed" data: small packs of generation and understanding
    samples, so the processes' packs often exercise different parts of the model (some without answer tokens, some
    without latents)."""
    datasets = [{"path": str(world["t2i"]), "resolution": 16}]
    if data == "mixed":
        datasets.append({"path": str(world["x2t"]), "resolution": 56})
    config = {
        "output_dir": str(out),
        "model": {"checkpoint": str(world["base"])},
        "data": {"datasets": datasets, "tokens_per_step": 300 if data == "t2i" else 120},
        "train": {"steps": 10, "timestep_shift": 3.0, "freeze_embeddings": False, "seed": 0, "ema_decay": 0.9, **train},
        "optim": {"lr": 1e-3, "eps": 1e-8, "warmup_steps": 2, "schedule": "cosine", "min_lr": 1e-4,
                  "max_grad_norm": 1.0},
        "checkpoint": {"every": 5, "keep_last": 0},
        "logging": {"every": 1},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(path, port, *overrides):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "lance_rl.cli", "sft", "--config",
               str(path), *overrides]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def one_thread():
    """In-process runs use one thread, as each torchrun process does: on a busy 2-core machine two threads per process
    make these tiny steps several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    """The references: one process (ddp, the plain module) with accumulate 4, the global batch of 2 processes x 2, per
    kind of data and training settings (each run once, on first use)."""
    runs = {}

    def run(data: str, **train) -> Path:
        key = (data, *sorted(train.items()))
        if key not in runs:
            out = tmp_path_factory.mktemp(f"one_process_{data}") / "run"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                recipe_main(str(recipe(world, out, data, accumulate=4, **train)), [])
            finally:
                torch.set_num_threads(threads)
            runs[key] = out
        return runs[key]

    return run


# fsdp2: mixed data, so its processes often run different parts of the model (DeepSpeed cannot: the next test), and
# the understanding expert frozen beside the generation expert that trains, in the same decoder-layer units.
# zero2, zero3: both experts train.
CASES = [("fsdp2", "mixed", {"train_understanding": False}), ("zero2", "t2i", {}), ("zero3", "t2i", {})]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy, data, train", CASES, ids=[c[0] for c in CASES])
def test_two_processes_train_as_one_resume_exactly_and_export(strategy, data, train, world, one_process, tmp_path):
    from lance_rl.distributed import read_sharded_weights
    from lance_rl.export import export
    from lance_rl.model.checkpoint import load_lance

    run, reference = tmp_path / strategy, one_process(data, **train)
    path = recipe(world, run, data, strategy=strategy, accumulate=2, **train)
    launch(path, PORTS[strategy])

    # 1. The loss curve (and lr, clipping, counts) of one process on the same global batch, step by step.
    want, got = rows(reference), rows(run)
    assert [r["step"] for r in got] == list(range(1, 11))
    for a, b in zip(want, got):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-9), (strategy, a["step"], key, a[key], b[key])

    # 2. The checkpoints are shards; export gathers them into the official layout, which loads in one process and
    #    holds the trained weights (and their EMA): the gathered shards exactly, the one-process run's to float noise.
    final = run / "checkpoints" / "step_0000010"
    assert (final / "sharded").is_dir() and not (final / "model").exists()
    base = load_lance(world["base"]).model.state_dict()
    for ema in (False, True):
        exported = load_lance(export(run, tmp_path / f"export_ema{ema}", ema=ema)).model.state_dict()
        trained = read_sharded_weights(final / "sharded", strategy, ema=ema)
        whole = load_lance(reference / "checkpoints" / "step_0000010" / "model", weights="ema" if ema else "model")
        one = whole.model.state_dict()
        assert exported.keys() == base.keys()
        for key, value in exported.items():
            assert torch.equal(value, trained[key] if key in trained else base[key]), key
            torch.testing.assert_close(value, one[key], atol=1e-5, rtol=1e-4, msg=key)
        assert sum(not torch.equal(exported[k], base[k]) for k in base) >= 30  # the layers and heads trained

    # 3. A run resumed from the sharded step-5 checkpoint ends exactly where the uninterrupted one did. (The resumed
    #    half recomputes activations in backward, gradient checkpointing, which must not change a bit either.)
    resumed = tmp_path / f"{strategy}_resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000010")
    (resumed / "latest").write_text("step_0000005\n")
    launch(path, PORTS[strategy] + 1, f"output_dir={resumed}", "model.gradient_checkpointing=true", "--resume")
    assert [r["loss"] for r in rows(resumed)] == [r["loss"] for r in got]
    for ema in (False, True):
        a = read_sharded_weights(final / "sharded", strategy, ema=ema)
        b = read_sharded_weights(resumed / "checkpoints" / "step_0000010" / "sharded", strategy, ema=ema)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (strategy, ema, key)


def test_a_sharded_strategy_runs_in_one_process_without_a_launcher(world, one_process, tmp_path, one_thread):
    """fsdp2 alone (a process group of one): the same steps as the reference."""
    run = tmp_path / "fsdp2_alone"
    recipe_main(str(recipe(world, run, "t2i", strategy="fsdp2", accumulate=4, steps=3)), [])
    for a, b in zip(rows(one_process("t2i")), rows(run)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert (run / "checkpoints" / "step_0000003" / "sharded").is_dir()


def test_deepspeed_stops_before_a_forward_whose_modules_differ_between_processes(world, tmp_path, monkeypatch):
    """A t2i pack here, an x2t pack on the other process: zero2 and zero3 stop naming what differs; the same packs
    everywhere pass."""
    from lance_rl import distributed
    from lance_rl.config import load_recipe
    from lance_rl.data.datasets import open_dataset
    from lance_rl.model.checkpoint import load_lance
    from lance_rl.model.packing import pack
    from lance_rl.model.vae import PatchVAE
    from lance_rl.sft import make_sample
    from lance_rl.sft_config import SFTConfig

    cfg = load_recipe(SFTConfig, recipe(world, tmp_path / "check", "mixed"))
    loaded = load_lance(world["base"])

    def one_pack(path, resolution):
        example = open_dataset(path, seed=0).next_example()
        plan, media = make_sample(example, 0, loaded.tokenizer, PatchVAE(), cfg.data, cfg.train, resolution, "cpu")
        return pack([plan], [media])

    t2i, x2t = one_pack(world["t2i"], 16), one_pack(world["x2t"], 56)
    assert distributed.pack_parts(t2i, with_vit=True) == [1.0, 1.0, 0.0, 0.0]
    assert distributed.pack_parts(x2t, with_vit=True) == [0.0, 0.0, 1.0, 1.0]
    engine = distributed.DeepSpeedEngine.__new__(distributed.DeepSpeedEngine)
    engine.device, engine.stage, engine.strategy = torch.device("cpu"), 2, "zero2"
    other = distributed.pack_parts(x2t, with_vit=False)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "sum_over_processes", lambda values, _: [a + b for a, b in zip(values, other)])
    with pytest.raises(RuntimeError, match="generation tokens and flow-matching targets and answer tokens and those"):
        engine.check_pack(t2i)
    other = distributed.pack_parts(t2i, with_vit=False)
    engine.check_pack(t2i)


def test_sharded_recipes_are_checked_before_loading(world, tmp_path, monkeypatch):
    from lance_rl.config import RecipeError, load_recipe
    from lance_rl.sft import SFTRecipe
    from lance_rl.sft_config import SFTConfig

    path = recipe(world, tmp_path / "bad")
    with pytest.raises(RecipeError, match="train.strategy: 'fsdp1' is not allowed"):
        load_recipe(SFTConfig, path, ["train.strategy=fsdp1"])
    with pytest.raises(RecipeError, match="lora.enabled: true needs train.strategy: ddp, not zero3"):
        load_recipe(SFTConfig, path, ["train.strategy=zero3", "lora.enabled=true"])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(RecipeError, match="train.strategy is fsdp2, but accelerate launch was given a zero3 config"):
        SFTRecipe(load_recipe(SFTConfig, path, ["train.strategy=fsdp2"]))
    assert not (tmp_path / "bad").exists()
