"""The report: `lance-rl curves RUN [RUN ...] [--out report.html]`.

A single self-contained HTML file (charts from `lance_rl/curves.py`, also kept as PNG beside it) that answers "did
the run work?" from the top down:

1. the headline: held-out proxy and gold rewards, each reward attribute and the reward-hacking signals at the first
   and the last evaluation, with the change (the table `lance-rl quickstart` prints);
2. the held-out curves (proxy, gold, image statistics, diversity), by update and by wall-clock, side by side;
3. the first and last evaluation's samples for the same prompts and seeds, with each prompt and score;
4. the training curves (rewards, optimisation, throughput) and SFT;
5. every evaluation's sample grid, then each run's config and timings.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lance_rl.curves import (
    HELD_OUT_CHARTS,
    HELD_OUT_NOTE,
    MAX_SAMPLE_PROMPTS,
    MEASUREMENTS,
    SFT_CHARTS,
    SIGNALS,
    TRAINING_CHARTS,
    Evaluation,
    Run,
    draw_chart,
    finite,
    fit_image,
    load_runs,
    read_evaluations,
    reward_order,
)


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
    image = fit_image(image.convert("RGB"), side)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _uri(buffer.getvalue()), image.width, image.height


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value) -> str:
    return f"{value:.3f}" if finite(value) else "–"


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
    keys = {k for run in runs for r in run.evaluations for k in r if finite(r.get(k))}

    def with_prefix(prefix: str) -> list[str]:
        return sorted((k for k in keys if k.startswith(prefix) and k.endswith("/mean") and k != prefix + "reward/mean"
                       and k not in SIGNALS), key=reward_order)  # fmt: skip

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
        data = f" data-value='{value!r}'" if finite(value) else ""
        cells.append(f"<td class='num' data-run='{_esc(run.label)}' data-key='{_esc(key)}' data-when='{when}'{data}>"
                     f"{_fmt(value)}</td>")  # fmt: skip
    change = after - before if finite(before) and finite(after) and len(run.evaluations) > 1 else None
    # Up is good for a reward; a signal's or a measurement's direction is neither good nor bad by itself: grey.
    scored = key not in SIGNALS and key.split("/")[-2] not in MEASUREMENTS
    cells.append(_change_cell(change, coloured=scored))
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
    proxy = last["eval/reward/mean"] - first["eval/reward/mean"] if finite(first.get("eval/reward/mean")) and \
        finite(last.get("eval/reward/mean")) else None  # fmt: skip
    if proxy is not None:
        lines.append(f"{run.label}: the held-out proxy reward went from {_fmt(first['eval/reward/mean'])} to "
                     f"{_fmt(last['eval/reward/mean'])} ({proxy:+.3f}) over {span}.")  # fmt: skip
    gold_keys = [k for k in ("gold/reward/mean",) if finite(first.get(k)) and finite(last.get(k))]
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
    if finite(d0) and finite(d1) and d0 > 0 and d1 < 0.5 * d0:
        lines.append(f"{run.label}: within-group diversity fell by more than half ({_fmt(d0)} to {_fmt(d1)}): "
                     "the samples of a prompt may be collapsing onto one image.")  # fmt: skip
    return lines


def headline_section(rl_runs: list[Run], summary: list[str]) -> str:
    table = headline_table(rl_runs) or "<p class='note'>No held-out evaluation in these runs yet.</p>"
    lines = "".join(f"<li>{_esc(s)}</li>" for s in summary)
    return (f"<section id='headline'><h2>Did the run work?</h2><div class='headline-row'>{table}"
            f"<ul class='verdict'>{lines}</ul></div></section>")  # fmt: skip


def sft_summary(run: Run) -> str:
    rows = [r for r in run.rows if "step" in r and finite(r.get("loss"))]
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
            caption = f"update {ev.update}: proxy {_fmt(proxy)}" + (f", gold {_fmt(gold)}" if finite(gold) else "")
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
    times = [r["time"] for r in rows if finite(r.get("time"))]
    if len(times) > 1:
        items.append(("time from the first to the last logged row", _duration(times[-1] - times[0])))
    stage_keys = sorted({k for r in rows for k in r if k.startswith(("timing/", "samples_per_s/", "tokens_per_s"))})
    for k in stage_keys:
        values = [r[k] for r in rows if finite(r.get(k))]
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
