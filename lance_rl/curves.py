"""Reward curves and the report: `lance-rl curves RUN [RUN ...] [--out report.html]`.

Reads each run's `metrics.jsonl` (SFT or RL, finished or still running), its `eval/` samples and `config.json`, draws
one PNG per chart (several runs overlaid in one legend) and writes a single self-contained HTML file that answers "did
the run work?" from the top down:

1. the headline: held-out proxy and gold rewards, each reward attribute and the reward-hacking signals at the first
   and the last evaluation, with the change (the table `lance-rl quickstart` prints);
2. the held-out curves (proxy, gold, image statistics, diversity) side by side;
3. the first and last evaluation's samples for the same prompts and seeds, with each prompt and score;
4. the training curves (rewards, optimisation, throughput) and SFT;
5. every evaluation's sample grid, then each run's config and timings.

It also writes an RL evaluation's files (`save_eval`): the labelled grid, one PNG per sample and a JSON record.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
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
    times = [r["time"] for r in rows if _finite(r.get("time"))]
    for r in rows:
        if times and _finite(r.get("time")):
            r["minutes"] = (r["time"] - times[0]) / 60


def _series(rows: list[dict], x: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[key]) for r in rows if x in r and _finite(r.get(key))]
    if not pts:
        return np.array([]), np.array([])
    xs, ys = zip(*pts)
    return np.array(xs), np.array(ys)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reward_order(key: str) -> list[str]:
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
        for k in sorted((k for k in present if k.startswith(prefix) and k.endswith("/mean")), key=_reward_order):
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
    tiles = [_fit(Image.fromarray(im), cell) for im in images]
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


def _fit(image: Image.Image, side: int) -> Image.Image:
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


# ------------------------------------------------------------------------------------------------ HTML pieces
def _uri(png: Path | bytes) -> str:
    data = png if isinstance(png, bytes) else png.read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _thumbnail(png: Path, side: int = 160) -> tuple[str, int, int]:
    """A sample for the page: its data URI and display size. Small images are shown enlarged by a whole factor (the
    CSS keeps pixels sharp); large ones are shrunk so a row of samples fits the screen and the file stays small."""
    image = Image.open(png)
    if max(image.size) <= side:
        factor = max(1, min(4, side // 2 // max(image.size)))
        return _uri(png), image.width * factor, image.height * factor
    image = _fit(image.convert("RGB"), side)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _uri(buffer.getvalue()), image.width, image.height


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value) -> str:
    return f"{value:.3f}" if _finite(value) else "–"


def _label(key: str) -> str:
    """'eval/shapes/color/mean' -> 'shapes/color'; the totals get their plain names."""
    names = {"eval/reward/mean": "proxy reward (total)", "gold/reward/mean": "gold reward (total)",
             "eval/signals/saturation": "mean saturation", "eval/signals/edge_density": "edge density",
             "eval/signals/diversity": "within-group diversity"}  # fmt: skip
    if key in names:
        return names[key]
    return key.split("/", 1)[1].removesuffix("/mean")


def headline_groups(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """The headline's rows: (group title, metric keys) for the keys any run's evaluations hold."""
    keys = {k for run in runs for r in run.evaluations for k in r if _finite(r.get(k))}

    def with_prefix(prefix: str) -> list[str]:
        return sorted((k for k in keys if k.startswith(prefix) and k.endswith("/mean") and k != prefix + "reward/mean"
                       and k not in SIGNALS), key=_reward_order)  # fmt: skip

    groups = [("Held-out proxy reward (the training rewards on prompts never trained on)",
               [k for k in ["eval/reward/mean"] if k in keys] + with_prefix("eval/")),
              ("Gold rewards (held-out, never trained on)",
               [k for k in ["gold/reward/mean"] if k in keys] + with_prefix("gold/")),
              ("Reward-hacking signals", [k for k in SIGNALS if k in keys])]  # fmt: skip
    return [(title, group) for title, group in groups if group]


def headline_table(runs: list[Run]) -> str:
    """Before (first evaluation) and after (last evaluation) of every held-out number, with the change, for each RL
    run; each number cell carries its exact value and origin in data- attributes (the browser test reads them)."""
    runs = [run for run in runs if run.evaluations]
    if not runs:
        return ""
    head1 = "".join(f"<th colspan='3' class='run'>{_esc(run.label)}</th>" for run in runs)
    head2 = "".join(f"<th>before<br><small>update {run.evaluations[0]['update']}</small></th><th>after<br><small>"
                    f"update {run.evaluations[-1]['update']}</small></th><th>change</th>" for run in runs)  # fmt: skip
    body = []
    for title, keys in headline_groups(runs):
        body.append(f"<tr class='group'><th colspan='{1 + 3 * len(runs)}'>{_esc(title)}</th></tr>")
        for key in keys:
            cells = [f"<th class='metric' title='{_esc(key)}'>{_esc(_label(key))}</th>"]
            for run in runs:
                cells.extend(_headline_cells(run, key))
            body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table class='headline' id='headline-table'><thead><tr><th rowspan='2'>held-out metric</th>{head1}</tr>"
            f"<tr>{head2}</tr></thead><tbody>{''.join(body)}</tbody></table>")  # fmt: skip


def _headline_cells(run: Run, key: str) -> list[str]:
    first, last = run.evaluations[0], run.evaluations[-1]
    before, after = first.get(key), last.get(key)
    cells = []
    for when, value in (("before", before), ("after", after)):
        data = f" data-value='{value!r}'" if _finite(value) else ""
        cells.append(f"<td class='num' data-run='{_esc(run.label)}' data-key='{_esc(key)}' data-when='{when}'{data}>"
                     f"{_fmt(value)}</td>")  # fmt: skip
    change = after - before if _finite(before) and _finite(after) and len(run.evaluations) > 1 else None
    # Up is good for a reward; a signal's direction is neither good nor bad by itself, so it stays grey.
    cells.append(_change_cell(change, coloured=key not in SIGNALS))
    return cells


def _change(change: float | None, coloured: bool = True) -> tuple[str, str]:
    """The CSS class and text of a change: green up, red down, grey when not a reward or too small to show."""
    tone = "" if change is None or not coloured or abs(change) < 5e-4 else ("up" if change > 0 else "down")
    return f"change {tone}", "–" if change is None else f"{change:+.3f}"


def _change_cell(change: float | None, coloured: bool = True) -> str:
    css, text = _change(change, coloured)
    return f"<td class='num {css}'>{text}</td>"


def _change_span(change: float | None) -> str:
    css, text = _change(change)
    return f"<span class='{css}'>{text}</span>"


def verdict(run: Run) -> list[str]:
    """Plain sentences under the table: what moved, and the two patterns worth a look at the samples."""
    evals = run.evaluations
    if len(evals) < 2:
        return [f"{run.label}: one evaluation so far (update {evals[0]['update']})."] if evals else []
    first, last = evals[0], evals[-1]
    lines = []
    span = f"updates {first['update']}–{last['update']}"
    proxy = last["eval/reward/mean"] - first["eval/reward/mean"] if _finite(first.get("eval/reward/mean")) and \
        _finite(last.get("eval/reward/mean")) else None  # fmt: skip
    if proxy is not None:
        lines.append(f"{run.label}: the held-out proxy reward went from {_fmt(first['eval/reward/mean'])} to "
                     f"{_fmt(last['eval/reward/mean'])} ({proxy:+.3f}) over {span}.")  # fmt: skip
    gold_keys = [k for k in ("gold/reward/mean",) if _finite(first.get(k)) and _finite(last.get(k))]
    if not gold_keys:
        lines.append(f"{run.label}: no gold reward is configured (eval.gold_rewards), so nothing scores the policy "
                     "from outside its training reward: the signals and the samples below are the check.")  # fmt: skip
    for key in gold_keys:
        gold = last[key] - first[key]
        lines.append(f"{run.label}: the gold reward went from {_fmt(first[key])} to {_fmt(last[key])} ({gold:+.3f}).")
        if proxy is not None and proxy > 0 and gold < 0:
            lines.append(f"{run.label}: the proxy rose while the gold reward fell, the pattern of reward hacking: "
                         "look at the samples below.")  # fmt: skip
    d0, d1 = first.get("eval/signals/diversity"), last.get("eval/signals/diversity")
    if _finite(d0) and _finite(d1) and d0 > 0 and d1 < 0.5 * d0:
        lines.append(f"{run.label}: within-group diversity fell by more than half ({_fmt(d0)} to {_fmt(d1)}): "
                     "the samples of a prompt may be collapsing onto one image.")  # fmt: skip
    return lines


def headline_section(rl_runs: list[Run], summary: list[str]) -> str:
    table = headline_table(rl_runs) or "<p class='note'>No held-out evaluation in these runs yet.</p>"
    lines = "".join(f"<li>{_esc(s)}</li>" for s in summary)
    return (f"<section id='headline'><h2>Did the run work?</h2><div class='headline-row'>{table}"
            f"<ul class='verdict'>{lines}</ul></div></section>")  # fmt: skip


def sft_summary(run: Run) -> str:
    rows = [r for r in run.rows if "step" in r and _finite(r.get("loss"))]
    if not rows:
        return ""
    return (f"{run.label} (SFT): loss {_fmt(rows[0]['loss'])} at step {rows[0]['step']} to {_fmt(rows[-1]['loss'])} "
            f"at step {rows[-1]['step']}.")  # fmt: skip


def charts_section(title: str, anchor: str, figures: list[tuple[str, Path]], note: str = "") -> str:
    if not figures:
        return ""
    items = "".join(f"<figure class='chart'><img src='{_uri(png)}' alt='{_esc(name)}' title='{_esc(name)}'></figure>"
                    for name, png in figures)  # fmt: skip
    note = f"<p class='note'>{note}</p>" if note else ""
    return f"<section id='{anchor}'><h2>{_esc(title)}</h2>{note}<div class='grid charts'>{items}</div></section>"


def _sample_cell(ev: Evaluation, index: int, prompt: str) -> tuple[str, int]:
    """One sample as a figure (score underneath, prompt and score on hover) and its display width."""
    score = ev.record["scores"][index]
    uri, w, h = _thumbnail(ev.samples[index])
    tip = f"{prompt} | sample {index} | score {_fmt(score)} | update {ev.update}"
    return (f"<figure class='sample'><img src='{uri}' width='{w}' height='{h}' alt='{_esc(prompt)}' "
            f"title='{_esc(tip)}'><figcaption>{_fmt(score)}</figcaption></figure>"), w  # fmt: skip


def _comparable(first: Evaluation, last: Evaluation) -> bool:
    """Both evaluations hold one PNG and one score per sample, for the same prompts in the same order."""
    a, b = first.record, last.record
    return (bool(first.samples) and a.get("prompts") == b.get("prompts") and a.get("prompts") is not None
            and len(first.samples) == len(last.samples) == len(a["prompts"]) == len(a.get("scores", [])))  # fmt: skip


def samples_section(run: Run) -> str:
    """First and last evaluation side by side: one row per held-out prompt, its samples before and after (same seeds),
    each with its score, the prompt written out and on hover."""
    evals = read_evaluations(run.path)
    if not evals:
        return ""
    first, last = evals[0], evals[-1]
    title = f"Samples: first and last evaluation ({_esc(run.label)})"
    if not _comparable(first, last):
        return _grids_side_by_side(run, first, last, title)
    prompts, per = first.record["prompts"], int(first.record.get("samples_per_prompt") or 1)
    groups = [list(range(i, min(i + per, len(prompts)))) for i in range(0, len(prompts), per)]
    shown = groups[:MAX_SAMPLE_PROMPTS]
    cards, width = [], 0
    for number, group in enumerate(shown):
        prompt = prompts[group[0]]
        change = _mean_score(last, group) - _mean_score(first, group) if len(evals) > 1 else None
        sides = []
        for ev in (first, last):
            cells = [_sample_cell(ev, i, prompt) for i in group]
            width = max(width, sum(w for _, w in cells))
            sides.append(f"<div class='side'><div class='when'>update {ev.update}</div>"
                         f"{''.join(cell for cell, _ in cells)}</div>")  # fmt: skip
        cards.append(f"<div class='comparison'><div class='prompt'><span class='index'>{number}</span>"
                     f"<span class='prompt-text'>{_esc(prompt)}</span>{_change_span(change)}</div>"
                     f"<div class='sides'>{''.join(sides)}</div></div>")  # fmt: skip
    # A card holds both sides' samples in one line; the grid fits as many cards per row as the screen allows.
    card = max(260, 2 * (width + 4 * per) + 48)  # two sides of samples with their margins, the gap and padding
    more = f" Showing {len(shown)} of {len(groups)} prompts." if len(shown) < len(groups) else ""
    return (f"<section id='samples-{_esc(run.label)}'><h2>{title}</h2><p class='note'>The evaluation samples the same "
            f"held-out prompts with the same seeds every time (ODE sampler, no noise), so each card shows what "
            f"training changed for one prompt: update {first.update} on the left, update {last.update} on the right, "
            f"the proxy reward under each sample and the change of the prompt's mean.{more}</p>"
            f"<div class='grid comparisons' style='grid-template-columns:repeat(auto-fill,minmax({card}px,1fr))'>"
            f"{''.join(cards)}</div></section>")  # fmt: skip


def _mean_score(ev: Evaluation, indexes: list[int]) -> float:
    scores = [ev.record["scores"][i] for i in indexes if ev.record["scores"][i] is not None]
    return float(np.mean(scores)) if scores else float("nan")


def _grids_side_by_side(run: Run, first: Evaluation, last: Evaluation, title: str) -> str:
    """Runs written before per-sample images: the two labelled grids, the prompts listed by cell."""
    figures = "".join(f"<figure class='grid-image'><img src='{_uri(ev.grid)}' alt='update {ev.update}'><figcaption>"
                      f"update {ev.update}</figcaption></figure>" for ev in (first, last))  # fmt: skip
    prompts = first.record.get("prompts") or []
    listing = "".join(f"<li value='{i}'>{_esc(p)}</li>" for i, p in enumerate(prompts))
    return (f"<section id='samples-{_esc(run.label)}'><h2>{title}</h2><div class='pair'>{figures}</div>"
            f"<ol class='cells'>{listing}</ol></section>")  # fmt: skip


def all_evaluations_section(runs: list[Run]) -> str:
    """Every evaluation's grid, folded away: cells are labelled 'index: score', and the prompts are listed by index."""
    parts = []
    for run in runs:
        evals = read_evaluations(run.path)
        if not evals:
            continue
        figures = []
        for ev in evals:
            proxy, gold = ev.record.get("eval/reward/mean"), ev.record.get("gold/reward/mean")
            caption = f"update {ev.update}: proxy {_fmt(proxy)}" + (f", gold {_fmt(gold)}" if _finite(gold) else "")
            figures.append(f"<figure class='grid-image'><img src='{_uri(ev.grid)}' alt='{_esc(caption)}'>"
                           f"<figcaption>{_esc(caption)}</figcaption></figure>")  # fmt: skip
        prompts = evals[-1].record.get("prompts") or []
        listing = "".join(f"<li value='{i}'>{_esc(p)}</li>" for i, p in enumerate(prompts))
        parts.append(f"<details><summary>{_esc(run.label)}: {len(evals)} evaluations (cells: sample index and proxy "
                     f"reward)</summary><div class='grid grids'>{''.join(figures)}</div>"
                     f"<ol class='cells'>{listing}</ol></details>")  # fmt: skip
    if not parts:
        return ""
    return f"<section id='evaluations'><h2>Every evaluation</h2>{''.join(parts)}</section>"


def timings_table(run: Run) -> str:
    """What the rows say about time: the span they cover and the mean seconds or rate per logged row."""
    key = "update" if run.is_rl else "step"
    rows = [r for r in run.rows if key in r]
    if not rows:
        return ""
    items = [(f"{key}s logged", f"{len(rows)} (last {key} {rows[-1][key]})")]
    times = [r["time"] for r in rows if _finite(r.get("time"))]
    if len(times) > 1:
        items.append(("time from the first to the last logged row", _duration(times[-1] - times[0])))
    stage_keys = sorted({k for r in rows for k in r if k.startswith(("timing/", "samples_per_s/", "tokens_per_s"))})
    for k in stage_keys:
        values = [r[k] for r in rows if _finite(r.get(k))]
        if values:
            unit = " s" if k.startswith("timing/") else ""
            items.append((f"mean {k}", f"{np.mean(values):.4g}{unit}"))
    body = "".join(f"<tr><th>{_esc(a)}</th><td>{_esc(b)}</td></tr>" for a, b in items)
    return f"<table class='timings'>{body}</table>"


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"  # fmt: skip


def config_section(runs: list[Run]) -> str:
    parts = []
    for run in runs:
        config = run.config()
        shown = (f"<details><summary>config.json</summary><pre>{_esc(json.dumps(config, indent=2))}</pre></details>"
                 if config is not None else "<p class='note'>no config.json in the run directory</p>")  # fmt: skip
        parts.append(f"<div class='run-config'><h3>{_esc(run.label)}</h3><p class='path'>{_esc(run.path.resolve())}"
                     f"</p>{timings_table(run)}{shown}</div>")  # fmt: skip
    return (f"<section id='config'><h2>Runs: config and timings</h2><div class='grid configs'>{''.join(parts)}</div>"
            "</section>")  # fmt: skip


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:16px 24px;color:#1d1d1f;
     background:#fafafa;line-height:1.35}
main{max-width:1680px;margin:0 auto}
h1{margin:0 0 4px;font-size:24px} h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:4px 0}
nav a{margin-right:14px;font-size:13px} .note,.path{color:#555;font-size:13px;margin:4px 0 8px}
.grid{display:grid;gap:12px}
.charts{grid-template-columns:repeat(auto-fill,minmax(380px,1fr))}
.grids{grid-template-columns:repeat(auto-fill,minmax(min(100%,900px),1fr))}  /* a grid's labels stay legible */
.configs{grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}
figure{margin:0} figure.chart{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:4px}
figure.chart img{width:100%;height:auto;display:block}
figure.grid-image img{max-width:100%;height:auto;image-rendering:pixelated;border:1px solid #ddd}
figcaption{font-size:12px;color:#333;text-align:center}
table{border-collapse:collapse;background:#fff;font-size:14px}
th,td{border:1px solid #e0e0e0;padding:4px 10px} th{background:#f3f3f3;font-weight:600}
table.headline{margin:8px 0} table.headline th.metric{text-align:left;font-weight:normal;background:#fff}
table.headline tr.group th{text-align:left;background:#eaeef6;font-size:13px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.change.up{color:#0a7a2f;font-weight:600} .change.down{color:#b3261e;font-weight:600}
.headline-row{display:flex;flex-wrap:wrap;gap:8px 32px;align-items:flex-start}
ul.verdict{margin:8px 0 0 0;padding-left:20px;font-size:14px;flex:1 1 360px;max-width:720px}
ul.verdict li{margin-bottom:6px}
.comparison{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:6px 8px}
.comparison .prompt{display:flex;gap:8px;align-items:baseline;font-size:14px;margin-bottom:4px}
.comparison .index{color:#888;font-size:12px} .comparison .prompt-text{flex:1}
.comparison .sides{display:flex;gap:12px} .comparison .side{white-space:nowrap}
.comparison .when{font-size:11px;color:#666}
figure.sample{display:inline-block;margin:2px 4px 0 0;vertical-align:top}
figure.sample img{image-rendering:pixelated;border:1px solid #ccc;display:block}
.pair{display:flex;flex-wrap:wrap;gap:12px}
ol.cells{columns:3 320px;font-size:12px;color:#333}
details{margin:8px 0} summary{cursor:pointer;font-weight:600}
pre{font-size:12px;background:#fff;border:1px solid #e0e0e0;padding:8px;overflow:auto;max-height:480px}
.run-config{min-width:0}
table.timings{font-size:13px;margin:6px 0} table.timings th{text-align:left;font-weight:normal}
"""


# ------------------------------------------------------------------------------------------------ the report
def _draw_all(specs, runs: list[Run], folder: Path, prefix: str) -> list[tuple[str, Path]]:
    figures = []
    for i, (title, x, lines, ylabel) in enumerate(specs):
        png = draw_chart(title, x, lines, ylabel, runs, folder / f"{prefix}_{i:02d}.png") if runs else None
        if png:
            figures.append((title, png))
    return figures


def write_report(runs: list[str | Path], out: str | Path) -> Path:
    """The report of one or more runs (SFT or RL) as one self-contained HTML file; the charts also as PNG files in
    <out>_charts/ beside it."""
    out = Path(out)
    charts_dir = out.parent / f"{out.with_suffix('').name}_charts"
    charts_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs)
    rl_runs = [run for run in loaded if run.is_rl]
    sft_runs = [run for run in loaded if any("step" in r for r in run.rows)]

    held_out = _draw_all(HELD_OUT_CHARTS, rl_runs, charts_dir, "heldout")
    training = _draw_all(TRAINING_CHARTS, rl_runs, charts_dir, "rl")
    sft = _draw_all(SFT_CHARTS, sft_runs, charts_dir, "sft")

    summary = [line for run in rl_runs for line in verdict(run)] + [sft_summary(run) for run in sft_runs]
    sections = [
        headline_section(rl_runs, [s for s in summary if s]),
        charts_section("Held-out: proxy, gold and reward-hacking signals", "held-out", held_out, HELD_OUT_NOTE),
        *[samples_section(run) for run in rl_runs],
        charts_section("Training (RL)", "training", training),
        charts_section("SFT", "sft", sft),
        all_evaluations_section(rl_runs),
        config_section(loaded),
    ]  # fmt: skip
    samples = [(f"samples-{r.label}", f"Samples {r.label}") for r in rl_runs]
    nav = [("headline", "Headline"), ("held-out", "Held-out"), *samples, ("training", "Training"), ("sft", "SFT"),
           ("evaluations", "Every evaluation"), ("config", "Config")]  # fmt: skip
    present = "".join(sections)
    links = "".join(f"<a href='#{_esc(a)}'>{_esc(t)}</a>" for a, t in nav if f"id='{_esc(a)}'" in present)
    names = _esc(", ".join(r.label for r in loaded))
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'><link rel='icon' href='data:,'>"
            f"<title>lance-rl report: {names}</title><style>{STYLE}</style></head><body><main><h1>lance-rl report</h1>"
            f"<p class='note'>Runs: {names}. Written {time.strftime('%Y-%m-%d %H:%M')}.</p><nav>{links}</nav>{present}"
            "</main></body></html>")  # fmt: skip
    out.write_text(page)
    return out
