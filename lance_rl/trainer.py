"""What every trainer shares: the device and precision, the optimizer and its schedule, the metrics log (JSON lines,
TensorBoard, Weights & Biases, progress lines with an ETA), and resuming from the newest checkpoint that loads.

The recipes (sft.py, rl.py) read as their loops; everything here is a builder or a small object they call.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lance_rl.checkpointing import checkpoint_candidates
from lance_rl.config import LoggingSection, OptimSection

log = logging.getLogger("lance_rl.trainer")


# ------------------------------------------------------------------------------------------------ device, precision
def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 on CUDA (with TF32 for what stays fp32) and fp32 elsewhere; bf16 runs on a CPU too, slowly."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def run_recipe(recipe) -> dict:
    """Set up and train a recipe (SFT, flow-GRPO or x2t), cleaning up whatever set-up got to, failed or not; returns
    the last metrics row."""
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


# ------------------------------------------------------------------------------------------------ optimizer
def build_optimizer(params: list[torch.nn.Parameter], o: OptimSection, total_steps: int):
    """AdamW and its schedule: linear warm-up over `warmup_steps`, then constant or cosine down to `min_lr` at
    `total_steps` (optimizer steps)."""
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        floor = o.min_lr / o.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The total gradient norm, after clipping to `max_norm` (0: measured, not clipped)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))


# ------------------------------------------------------------------------------------------------ metrics
class MetricsLog:
    """One run's metrics: `metrics.jsonl` always (one row per logged step or update), TensorBoard and W&B when the
    recipe asks, and a progress line with an ETA in the log.

    `key` is the row index ("step" for SFT, "update" for RL). A resumed run first drops the rows past its checkpoint,
    so the file holds one row per index however often the run was interrupted.
    """

    def __init__(self, run: Path, key: str, total: int, logging_cfg: LoggingSection, config: dict,
                 resume_at: int | None = None, enabled: bool = True):  # fmt: skip
        self.run, self.key, self.total, self.enabled = Path(run), key, total, enabled
        self.path = self.run / "metrics.jsonl"
        self.tb = self.wandb = None
        self._started, self._first = time.time(), resume_at or 0
        if not enabled:
            return
        self.run.mkdir(parents=True, exist_ok=True)
        if resume_at is not None and self.path.is_file():
            self._truncate_after(resume_at)
        self.file = self.path.open("a")
        if logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("logging.tensorboard needs the tensorboard package: pip install 'lance-rl[tensorboard]'") from e
            # A resumed run hides what the killed one logged past its checkpoint (purge_step), as metrics.jsonl drops
            # those rows: one point per index, the resumed run's.
            purge = resume_at + 1 if resume_at is not None else None
            self.tb = SummaryWriter(str(self.run / "tensorboard"), purge_step=purge)
        if logging_cfg.wandb is not None:
            self.wandb = _start_wandb(self.run, logging_cfg.wandb, config)

    def _truncate_after(self, index: int) -> None:
        kept = []
        for row in read_rows(self.path):
            if row.get(self.key, 0) <= index:
                kept.append(json.dumps(row))
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} | {"time": time.time()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row[self.key]
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in (self.key, "time") and math.isfinite(v)}  # fmt: skip
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        """A uint8 [H, W, 3] picture (a sample grid) with its caption, for the trackers (metrics.jsonl holds none)."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")
            self.tb.add_text(f"{tag}/caption", caption.replace("\n", "  \n"), step)  # Markdown: a line per sample
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image, caption=caption)}, step=step)

    def progress(self, row: dict, shown: dict[str, str]) -> None:
        """'update 12/60 (20%) reward 0.412 ... ETA 3m05s' in the log: `shown` maps a label to a row key."""
        done = row[self.key]
        elapsed = time.time() - self._started
        eta = elapsed / max(done - self._first, 1) * (self.total - done)
        parts = [f"{label} {row[k]:.4g}" for label, k in shown.items() if isinstance(row.get(k), (int, float))]
        log.info("%s %d/%d (%.0f%%) %s, ETA %s", self.key, done, self.total, 100 * done / max(self.total, 1),
                 " ".join(parts), _duration(eta))  # fmt: skip

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run: Path, w, config: dict):
    import uuid

    try:
        import wandb
    except ImportError as e:
        raise ImportError("logging.wandb needs the wandb package: pip install 'lance-rl[wandb]'") from e
    run.mkdir(parents=True, exist_ok=True)
    id_file = run / "wandb_id.txt"  # the same W&B run continues when this run resumes
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:12] + "\n")  # wandb.util.generate_id is not in wandb 0.31
    return wandb.init(project=w.project, name=w.name or run.name, mode=w.mode, dir=str(run), config=config,
                      id=id_file.read_text().strip(), resume="allow")  # fmt: skip


def read_rows(path: Path, warn: bool = True) -> list[dict]:
    """The rows of a metrics.jsonl; a line that does not parse is skipped with a warning naming the file and line
    (a run killed mid-write leaves a partial last line)."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if warn:
                log.warning("%s:%d: skipping a row that is not JSON (%s)", path, number, e.msg)
            continue
        if isinstance(row, dict):
            rows.append(row)
        elif warn:
            log.warning("%s:%d: skipping a row that is not a JSON object", path, number)
    return rows


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------------------------------------ resume
class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read; the message names the file."""


def read_trainer_state(path: Path) -> dict:
    """trainer_state.pt, loaded on the CPU with weights_only=True; a truncated or damaged file names itself."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CorruptCheckpoint(f"{path} is missing") from e
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError or UnpicklingError by damage kind
        raise CorruptCheckpoint(f"{path} cannot be read ({type(e).__name__}: {e})") from e


def read_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file (or only `keys` of it); a missing, truncated or damaged file names itself."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CorruptCheckpoint(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            wanted = list(f.keys()) if keys is None else keys
            missing = [k for k in wanted if k not in f.keys()]
            if missing:
                raise CorruptCheckpoint(f"{path} lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
            return {k: f.get_tensor(k) for k in wanted}
    except CorruptCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError for a truncated header or data
        raise CorruptCheckpoint(f"{path} cannot be read ({type(e).__name__}: {e})") from e


def resume_latest(run: Path, load: Callable[[Path], None]) -> Path | None:
    """Load the newest checkpoint of `run` that reads cleanly; a corrupt one is named and skipped, so a damaged
    latest checkpoint costs the steps since the one before it, never the run. None when there is no checkpoint."""
    from lance_rl.model.checkpoint import CheckpointError

    candidates = checkpoint_candidates(run)
    if not candidates:
        log.info("no checkpoint in %s: starting from scratch", run)
        return None
    for ckpt in candidates:
        try:
            load(ckpt)
        except (CorruptCheckpoint, CheckpointError) as e:
            log.warning("checkpoint %s is corrupt: %s; trying an older one", ckpt.name, e)
            continue
        if ckpt != candidates[0]:
            log.warning("resumed from %s, the newest checkpoint that loads", ckpt)
        return ckpt
    raise CorruptCheckpoint(f"no checkpoint of {run} loads ({', '.join(c.name for c in candidates)} are all corrupt)")
