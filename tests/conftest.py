"""Shared test fixtures. Nothing here reaches the network."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# The official reference outputs live in ../shared/parity beside the checkout (see its README).
PARITY_DIR = Path(__file__).resolve().parents[2] / "shared" / "parity"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (PARITY_DIR / "README.md").is_file():
        pytest.skip(f"official reference fixtures not found at {PARITY_DIR} (../shared/parity beside the checkout)")
    return PARITY_DIR


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the official layout, written once per test session."""
    from lance_rl.model.checkpoint import init_tiny

    return init_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def shapes16(tmp_path_factory) -> Path:
    """16x16 shapes images (official parquet) and a tiny random base checkpoint."""
    from lance_rl.data.shapes import write_parquet
    from lance_rl.model.checkpoint import init_tiny

    root = tmp_path_factory.mktemp("shapes16")
    init_tiny(root / "base", seed=0)
    write_parquet(root / "train.parquet", 3000, "train", seed=0, size=16)
    return root


@pytest.fixture(scope="session")
def sft_tiny(shapes16) -> Path:
    """The tiny model after 200 SFT steps on 16x16 shapes (~15 s): it draws coloured blobs where the caption says.
    Returns the run directory; the model is at checkpoints/step_0000200/model."""
    import yaml

    from lance_rl.sft import recipe_main

    out = shapes16 / "sft"
    recipe = {
        "output_dir": str(out),
        "model": {"checkpoint": str(shapes16 / "base")},
        "data": {"datasets": [{"path": str(shapes16 / "train.parquet"), "resolution": 16}], "tokens_per_step": 2400},
        "train": {"steps": 200, "timestep_shift": 3.0, "freeze_embeddings": False, "seed": 0},
        "optim": {"lr": 2e-3, "eps": 1e-8, "warmup_steps": 5},
        "checkpoint": {"every": 200, "keep_last": 0},
        "logging": {"every": 10},
    }
    path = shapes16 / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    recipe_main(str(path), [])
    return out
