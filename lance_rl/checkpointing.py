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


def commit_checkpoint(tmp: Path, final: Path, run: Path, pattern: str, keep_last: int) -> Path:
    """Make a fully written checkpoint directory visible: rename it into place, then switch the run's `latest`
    pointer, then prune old ones. A crash at any point leaves `latest` naming a complete checkpoint."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(run / "latest", final.name + "\n")
    prune(final.parent, pattern, keep_last)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint directory a run's `latest` pointer names, or None before the first checkpoint."""
    latest = Path(run) / "latest"
    return Path(run) / "checkpoints" / latest.read_text().strip() if latest.is_file() else None


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
