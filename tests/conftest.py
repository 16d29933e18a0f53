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
    from model.checkpoint import init_tiny

    return init_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)
