"""Reward curves and the report: `lance-rl curves RUN [RUN ...] [--out report.html]`.

Reads each run's `metrics.jsonl` (SFT or RL, finished or still running) and its `eval/` sample grids, draws one PNG per
chart (several runs overlaid, mean with a +-std band where the metric has one) and writes a single self-contained HTML
file with every chart and sample grid embedded.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (title, x key, [(metric, std metric or None)], y label)
RL_CHARTS = [
    ("Training reward", "update", [("reward/mean", "reward/std")], "reward"),
    ("Held-out evaluation reward", "update", [("eval/reward/mean", None)], "reward"),
    ("Gold (held-out, untrained) rewards", "update", [("gold/reward/mean", None)], "reward"),
    ("Policy loss", "update", [("policy_loss", None)], "loss"),
    ("KL to the reference", "update", [("kl", None), ("approx_kl", None)], "KL"),
    ("Clip fraction", "update", [("clip_frac", None)], "fraction"),
    ("Importance ratio", "update", [("ratio/mean", "ratio/std")], "ratio"),
    ("Groups without reward spread", "update", [("frac_reward_zero_std", None)], "fraction"),
    ("Throughput", "update", [("samples_per_s/rollout", None), ("samples_per_s/update", None)], "samples / s"),
]
SFT_CHARTS = [
    ("SFT loss", "step", [("loss", None), ("mse", None), ("ce", None)], "loss"),
    ("SFT throughput", "step", [("tokens_per_s", None)], "tokens / s"),
]


def read_metrics(run: str | Path) -> list[dict]:
    """A run's rows; a corrupt row is skipped with a warning naming the file and line (trainer.read_rows)."""
    from lance_rl.trainer import read_rows

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no metrics.jsonl (is it a run directory?)")
    return read_rows(path)


def _series(rows: list[dict], x: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[key]) for r in rows if x in r and isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    if not pts:
        return np.array([]), np.array([])
    xs, ys = zip(*pts)
    return np.array(xs), np.array(ys)


def _per_reward_keys(rows: list[dict], prefix: str) -> list[str]:
    keys = sorted({k for r in rows for k in r if k.startswith(prefix) and k.endswith("/mean")})
    return keys


def draw_chart(title: str, x: str, lines: list[tuple[str, str | None]], ylabel: str, runs: dict[str, list[dict]],
               path: Path) -> Path | None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    drawn = False
    for run_name, rows in runs.items():
        for key, std_key in lines:
            xs, ys = _series(rows, x, key)
            if not len(xs):
                continue
            label = key if len(runs) == 1 else f"{run_name}: {key}"
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
            if std_key:
                sx, sd = _series(rows, x, std_key)
                if len(sx) == len(xs):
                    ax.fill_between(xs, ys - sd, ys + sd, alpha=0.2)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_sample_grid(images: np.ndarray, labels: list[str], path: str | Path, columns: int = 8, scale: int = 4) -> Path:
    """uint8 [B, H, W, 3] images in a grid, each upscaled (nearest) with its label (e.g. the reward) underneath."""
    images = np.asarray(images)
    b, h, w, _ = images.shape
    columns = min(columns, b)
    rows = -(-b // columns)
    cell_h, cell_w, text_h = h * scale, w * scale, 12
    canvas = Image.new("RGB", (columns * (cell_w + 2), rows * (cell_h + text_h + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels)):
        r, c = divmod(i, columns)
        x, y = c * (cell_w + 2), r * (cell_h + text_h + 2)
        canvas.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell_h), label, fill=(0, 0, 0))
    path = Path(path)
    canvas.save(path)
    return path


def _embed(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def write_report(runs: list[str | Path], out: str | Path) -> Path:
    """Charts for every metric the runs have, sample grids from their evaluations, one self-contained HTML file."""
    out = Path(out)
    charts_dir = out.with_suffix("")
    charts_dir = charts_dir.parent / f"{charts_dir.name}_charts"
    charts_dir.mkdir(parents=True, exist_ok=True)
    loaded = {Path(r).name if Path(r).name not in ("", ".") else str(r): read_metrics(r) for r in runs}
    rl_runs = {k: v for k, v in loaded.items() if any("update" in row for row in v)}
    sft_runs = {k: v for k, v in loaded.items() if any("step" in row for row in v)}
    charts = []
    specs = list(RL_CHARTS)
    if rl_runs:
        rows = [row for rs in rl_runs.values() for row in rs]
        train_keys = [k for k in _per_reward_keys(rows, "rewards/") if k.count("/") >= 2]
        eval_keys = [k for k in _per_reward_keys(rows, "eval/") if k != "eval/reward/mean"]
        if train_keys:
            specs.append(("Training reward per component", "update",
                          [(k, k[: -len("mean")] + "std") for k in train_keys], "reward"))  # fmt: skip
        if eval_keys:
            specs.append(("Held-out evaluation per component", "update", [(k, None) for k in eval_keys], "reward"))
    for i, (title, x, lines, ylabel) in enumerate(specs):
        png = draw_chart(title, x, lines, ylabel, rl_runs, charts_dir / f"rl_{i:02d}.png") if rl_runs else None
        if png:
            charts.append((title, png))
    for i, (title, x, lines, ylabel) in enumerate(SFT_CHARTS):
        png = draw_chart(title, x, lines, ylabel, sft_runs, charts_dir / f"sft_{i:02d}.png") if sft_runs else None
        if png:
            charts.append((title, png))
    grids = []
    for run in runs:
        for png in sorted((Path(run) / "eval").glob("update_*.png")):
            meta = png.with_suffix(".json")
            caption = f"{Path(run).name} / {png.stem}"
            if meta.is_file():
                record = json.loads(meta.read_text())
                caption += f": eval reward {record.get('eval/reward/mean', float('nan')):.3f}"
            grids.append((caption, png))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lance-rl report</title>",
        "<style>body{font-family:sans-serif;margin:24px;max-width:1400px}figure{display:inline-block;margin:8px;"
        "vertical-align:top}figcaption{font-size:13px;color:#333}img{border:1px solid #ddd}</style></head><body>",
        f"<h1>lance-rl report</h1><p>Runs: {html.escape(', '.join(str(r) for r in runs))}</p>",
        "<h2>Curves</h2>",
    ]
    for title, png in charts:
        parts.append(f"<figure><img src='{_embed(png)}' alt='{html.escape(title)}'><figcaption>{html.escape(title)}"
                     "</figcaption></figure>")  # fmt: skip
    if grids:
        parts.append("<h2>Evaluation samples over time (label: reward)</h2>")
        for caption, png in grids:
            parts.append(f"<figure><img src='{_embed(png)}' alt='{html.escape(caption)}'><figcaption>"
                         f"{html.escape(caption)}</figcaption></figure>")  # fmt: skip
    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out
