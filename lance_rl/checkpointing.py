"""Small pieces both trainers use for their checkpoints: atomic pointers, pruning, EMA weights swapped in."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one rename, so a reader never sees a half-written pointer."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prune(root: Path, pattern: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoint directories matching `pattern` (0 keeps everything)."""
    if keep_last <= 0:
        return
    for old in sorted(p for p in root.glob(pattern) if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def swapped_in(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor] | None):
    """Temporarily copy `values` (EMA weights) into `params`, to save or evaluate with them; None does nothing."""
    if values is None:
        yield
        return
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
