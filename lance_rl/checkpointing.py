"""Checkpoint directories both trainers use: written under a temporary name and renamed into place, a `latest`
pointer switched only after that, old ones pruned, and the list of candidates a resume tries newest first.

    run/checkpoints/<name>/   (e.g. step_0000200, update_00010)
    run/latest                the name of the newest complete checkpoint
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one rename, so a reader never sees a half-written pointer."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def new_checkpoint(run: Path, name: str, keep_last: int):
    """A temporary directory to write checkpoint `name` into; on leaving the block it is committed (renamed into
    place, `latest` switched, older ones pruned). An exception inside leaves `latest` as it was."""
    tmp = prepare_checkpoint(run, name)
    yield tmp
    commit_checkpoint(tmp, tmp.parent / name, Path(run), keep_last)


def prepare_checkpoint(run: Path, name: str) -> Path:
    """An empty temporary directory for checkpoint `name`, for writers that are several processes (sharded
    training): process 0 prepares it, every process writes its part, process 0 commits it (`commit_checkpoint`)."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(tmp: Path, final: Path, run: Path, keep_last: int) -> Path:
    """Make a fully written checkpoint directory visible: rename it into place, then switch the run's `latest`
    pointer, then prune old ones. A crash at any point leaves `latest` naming a complete checkpoint."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(run / "latest", final.name + "\n")
    prune(final.parent, final.name.rsplit("_", 1)[0] + "_*", keep_last)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint directory a run's `latest` pointer names, or None before the first checkpoint."""
    latest = Path(run) / "latest"
    return Path(run) / "checkpoints" / latest.read_text().strip() if latest.is_file() else None


def checkpoint_candidates(run: Path) -> list[Path]:
    """Complete checkpoints of a run, newest first: the one `latest` names, then the others by name (the names
    carry zero-padded step numbers)."""
    latest = latest_checkpoint(run)
    root = Path(run) / "checkpoints"
    others = sorted((p for p in root.glob("*_*") if p.is_dir() and not p.name.startswith(".")), reverse=True)
    ordered = ([latest] if latest is not None and latest.is_dir() else []) + [p for p in others if p != latest]
    return ordered


def prune(root: Path, pattern: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoint directories matching `pattern` (0 keeps everything)."""
    if keep_last <= 0:
        return
    for old in sorted(p for p in root.glob(pattern) if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
