"""Reward curves and evaluation files; the HTML report is `lance_rl/report.py` (`lance-rl curves`).

Reads each run's `metrics.jsonl` (SFT or RL, finished or still running) and `eval/` samples, and draws one PNG per
chart (several runs overlaid in one legend; by update, and by wall-clock to compare algorithms at an equal budget).
It also writes an RL evaluation's files (`save_eval`): the labelled grid, one PNG per sample and a JSON record.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# A chart: (title, x key, [(metric, std metric or None)], y label). A metric ending in "*" stands for every key with
# that prefix and the "/mean" suffix the rows hold (one line each, no band: a band per component hides the lines).
HELD_OUT_CHARTS = [
    ("Held-out proxy reward", "update", [("eval/reward/mean", None)], "reward"),
    ("Held-out proxy reward by attribute", "update", [("eval/*", None)], "reward"),
    ("Gold rewards (held-out, never trained on)", "update", [("gold/reward/mean", None), ("gold/*", None)], "reward"),
    ("Image statistics", "update", [("eval/signals/saturation", None), ("eval/signals/edge_density", None)], "share"),
    ("Within-group diversity", "update", [("eval/signals/diversity", None)], "RMS pixel distance"),
    # By wall-clock: runs of different algorithms (or machines) compared at equal time, not equal updates.
    ("Held-out proxy reward by wall-clock", "minutes", [("eval/reward/mean", None)], "reward"),
    ("Held-out strict accuracy by wall-clock", "minutes", [("eval/shapes/strict/mean", None)], "all four right"),
    ("Gold reward by wall-clock", "minutes", [("gold/reward/mean", None)], "reward"),
]
TRAINING_CHARTS = [
    ("Training reward", "update", [("reward/mean", "reward/std")], "reward"),
    ("Training reward by component", "update", [("rewards/*", None)], "reward"),
    ("Policy loss", "update", [("policy_loss", None)], "loss"),
    ("KL to the reference", "update", [("kl", None), ("approx_kl", None)], "KL"),
    ("Clip fraction", "update", [("clip_frac", None)], "fraction"),
    ("Importance ratio", "update", [("ratio/mean", "ratio/std")], "ratio"),
    ("Groups without reward spread", "update", [("frac_reward_zero_std", None)], "fraction"),
    ("Gradient norm", "update", [("grad_norm", None)], "norm"),
    ("Throughput", "update", [("samples_per_s/rollout", None), ("samples_per_s/update", None)], "samples / s"),
    ("Seconds per update by stage", "update",
     [("timing/rollout", None), ("timing/score", None), ("timing/update", None), ("timing/sync", None)], "s"),
]  # fmt: skip
SFT_CHARTS = [
    ("SFT loss", "step", [("loss", None), ("mse", None), ("ce", None)], "loss"),
    ("SFT learning rate", "step", [("lr", None)], "lr"),
    ("SFT throughput", "step", [("tokens_per_s", None)], "tokens / s"),
]
# Held-out keys the "attribute" wildcard must not repeat: the total and the signals have their own rows and charts.
SIGNALS = ["eval/signals/saturation", "eval/signals/edge_density", "eval/signals/diversity"]
# Reward details that measure rather than score (the shapes reward's canvas tint: lower is cleaner). The report shows
# their change without calling it a gain or a loss.
MEASUREMENTS = ("background_tint",)
HELD_OUT_NOTE = ("Every evaluation, same prompts and seeds. A proxy that rises while gold falls, saturation or edge "
                 "density that climbs, or diversity that drops are the usual signs of a policy gaming its reward.")
MAX_SAMPLE_PROMPTS = 32  # rows of the first-vs-last table; a 3B evaluation can hold hundreds of prompts


# ------------------------------------------------------------------------------------------------ reading runs
def read_metrics(run: str | Path) -> list[dict]:
    """A run's rows; a corrupt row is skipped with a warning naming the file and line (trainer.read_rows)."""
    from lance_rl.trainer import read_rows

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no metrics.jsonl (is it a run directory?)")
    return read_rows(path)


@dataclass
class Run:
    label: str  # unique among the report's runs: the shortest trailing part of the path that tells them apart
    path: Path
    rows: list[dict]

    @property
    def is_rl(self) -> bool:
        return any("update" in r for r in self.rows)

    @property
    def evaluations(self) -> list[dict]:
        """The metric rows of the held-out evaluations, in update order."""
        return [r for r in self.rows if "update" in r and "eval/reward/mean" in r]

    def config(self) -> dict | None:
        path = self.path / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None


def run_labels(paths: list[Path]) -> list[str]:
    """'rl' for one run; 'a/rl' and 'b/rl' for two runs both called rl, so no run hides another in a legend."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def load_runs(paths: list[str | Path]) -> list[Run]:
    paths = [Path(p) for p in paths]
    runs = [Run(label, path, read_metrics(path)) for label, path in zip(run_labels(paths), paths)]
    for run in runs:
        add_minutes(run.rows)
    return runs


def add_minutes(rows: list[dict]) -> None:
    """`minutes`: wall-clock since the run's first logged row (its starting evaluation), the x axis that compares
    algorithms at an equal budget (a resumed run's pause counts too)."""
    timed = [r for r in rows if finite(r.get("time"))]
    for r in timed:
        r["minutes"] = (r["time"] - timed[0]["time"]) / 60


def _series(rows: list[dict], x: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[key]) for r in rows if x in r and finite(r.get(key))]
    if not pts:
        return np.array([]), np.array([])
    xs, ys = zip(*pts)
    return np.array(xs), np.array(ys)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def reward_order(key: str) -> list[str]:
    """'eval/shapes/mean' before 'eval/shapes/color/mean': a reward, then its details."""
    return key.removesuffix("/mean").split("/")


def expand_keys(lines: list[tuple[str, str | None]], rows: list[dict]) -> list[tuple[str, str | None]]:
    """Wildcard metrics ("eval/*") expanded to the keys the rows hold; the signals and totals are left out."""
    present = {k for r in rows for k in r}
    out = []
    for key, std in lines:
        if not key.endswith("*"):
            out.append((key, std))
            continue
        prefix = key[:-1]
        for k in sorted((k for k in present if k.startswith(prefix) and k.endswith("/mean")), key=reward_order):
            if k == prefix + "reward/mean" or k in SIGNALS:
                continue
            out.append((k, None))
    return out


# ------------------------------------------------------------------------------------------------ charts
def chart_lines(lines: list[tuple[str, str | None]], x: str, runs: list[Run]) -> list[dict]:
    """What one chart draws: every (run, metric) with data, as label, points, band and style. One run: a colour per
    metric. Several runs: a colour per run and a line style per metric, so one legend tells both apart."""
    styles = ["-", "--", ":", "-."]
    drawn = []
    for r, run in enumerate(runs):
        for m, (key, std_key) in enumerate(expand_keys(lines, run.rows)):
            xs, ys = _series(run.rows, x, key)
            if not len(xs):
                continue
            band = None
            if std_key:
                sx, sd = _series(run.rows, x, std_key)
                band = sd if len(sx) == len(xs) and np.array_equal(sx, xs) else None
            several = len(runs) > 1
            drawn.append({"label": f"{run.label}: {key}" if several else key, "xs": xs, "ys": ys, "band": band,
                          "color": f"C{r % 10}" if several else f"C{m % 10}",
                          "linestyle": styles[m % len(styles)] if several else "-"})  # fmt: skip
    return drawn


def draw_chart(title: str, x: str, lines: list[tuple[str, str | None]], ylabel: str, runs: list[Run],
               path: Path) -> Path | None:  # fmt: skip
    """One PNG, or None when no run has any of the chart's metrics."""
    drawn = chart_lines(lines, x, runs)
    if not drawn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=110)
    for line in drawn:
        few = len(line["xs"]) < 30
        ax.plot(line["xs"], line["ys"], marker="o" if few else None, markersize=3, label=line["label"],
                color=line["color"], linestyle=line["linestyle"])  # fmt: skip
        if line["band"] is not None:
            ax.fill_between(line["xs"], line["ys"] - line["band"], line["ys"] + line["band"], color=line["color"],
                            alpha=0.15)  # fmt: skip
    ax.set_title(title, fontsize=11)
    if x in ("update", "step"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # updates and steps are whole numbers
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ evaluation files
def save_sample_grid(images: np.ndarray, labels: list[str], path: str | Path, columns: int = 8,
                     cell: int = 128) -> Path:  # fmt: skip
    """uint8 [B, H, W, 3] images in a grid with a label (e.g. "3: 0.42") under each. Small images are upscaled by a
    whole factor (nearest, so pixels stay sharp) to about `cell` pixels; large ones are shrunk to fit it."""
    save_image(grid_image(images, labels, columns, cell), path)
    return Path(path)


def grid_image(images: np.ndarray, labels: list[str], columns: int = 8, cell: int = 128) -> np.ndarray:
    images = np.asarray(images)
    b = images.shape[0]
    columns = min(columns, b)
    rows = -(-b // columns)
    tiles = [fit_image(Image.fromarray(im), cell) for im in images]
    tile_w, tile_h = max(t.width for t in tiles), max(t.height for t in tiles)
    text_h, gap = 12, 2
    canvas = Image.new("RGB", (columns * (tile_w + gap), rows * (tile_h + text_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        r, c = divmod(i, columns)
        x, y = c * (tile_w + gap), r * (tile_h + text_h + gap)
        canvas.paste(tile, (x, y))
        draw.text((x + 2, y + tile_h), label, fill=(0, 0, 0))
    return np.asarray(canvas)


def fit_image(image: Image.Image, side: int) -> Image.Image:
    longest = max(image.size)
    if longest <= side:
        factor = max(1, side // longest)
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    scale = side / longest
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def save_image(array: np.ndarray, path: str | Path) -> None:
    Image.fromarray(np.asarray(array)).save(path)


def eval_caption(prompts: list[str], scores: list) -> str:
    """One line per sample, numbered as the grid's cells: '3: two red circles on the left (0.42)'."""
    return "\n".join(f"{i}: {p} ({s:.2f})" if s is not None else f"{i}: {p} (no reward)"
                     for i, (p, s) in enumerate(zip(prompts, scores)))  # fmt: skip


def save_eval(folder: Path, update: int, frames: np.ndarray, prompts: list[str], scores: list, row: dict,
              samples_per_prompt: int) -> tuple[np.ndarray, str]:  # fmt: skip
    """An evaluation's files in `folder`: update_NNNNN.png (the grid, cells labelled "index: score"),
    update_NNNNN/NNN.png (each sample at its own resolution, for the report's first-vs-last view) and
    update_NNNNN.json (the metrics row, the prompt and score of every sample). Returns the grid and its caption,
    for the trackers. The evaluation uses the same prompts and seeds every time, so sample i is comparable across
    evaluations."""
    name = f"update_{update:05d}"
    samples = folder / name
    samples.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        save_image(frame, samples / f"{i:03d}.png")
    labels = [f"{i}: {s:.2f}" if s is not None else f"{i}: -" for i, s in enumerate(scores)]
    grid = grid_image(frames, labels, columns=max(8, samples_per_prompt))
    save_image(grid, folder / f"{name}.png")
    record = {"update": update, **row, "prompts": list(prompts), "scores": list(scores),
              "samples_per_prompt": samples_per_prompt, "samples": f"{name}/"}  # fmt: skip
    (folder / f"{name}.json").write_text(json.dumps(record) + "\n")
    return grid, eval_caption(prompts, scores)


@dataclass
class Evaluation:
    update: int
    grid: Path
    record: dict  # the JSON record (empty when the run predates it)
    samples: list[Path]  # one PNG per sample, in the record's order (empty for runs that predate them)


def read_evaluations(run: Path) -> list[Evaluation]:
    out = []
    for grid in sorted((run / "eval").glob("update_*.png")):
        meta = grid.with_suffix(".json")
        record = json.loads(meta.read_text()) if meta.is_file() else {}
        samples = sorted((grid.parent / grid.stem).glob("*.png"))
        out.append(Evaluation(int(grid.stem.split("_")[1]), grid, record, samples))
    return out
