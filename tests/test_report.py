"""The HTML report as a person reads it: the headline table holds the run's first and last held-out evaluation, charts
overlay several runs in one legend, and, opened in headless Chromium, every chart and sample loads with no console
error, laid out in a grid, with each sample's prompt.

The browser test needs Debian's `chromium` (/usr/bin/chromium, or LANCE_RL_CHROMIUM) and the `playwright` package;
it is skipped, saying which is missing, without them. To retake the README's screenshot from a finished quickstart:

    LANCE_RL_README_RUN=runs/quickstart python -m pytest -q tests/test_report.py -k readme

which checks that run's report in the browser and writes docs/report.png and docs/samples.png.
"""

import html
import json
import os
import re
from pathlib import Path

import pytest

from lance_rl.curves import chart_lines, load_runs
from lance_rl.report import write_report

CHROMIUM = Path(os.environ.get("LANCE_RL_CHROMIUM", "/usr/bin/chromium"))
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "report.png"
README_SAMPLES = README_SCREENSHOT.parent / "samples.png"
# Headless flags that work in containers and reach no network (the report is one self-contained file).
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]  # fmt: skip


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def evaluations(run: Path) -> list[dict]:
    return [r for r in metric_rows(run) if "eval/reward/mean" in r]


# ------------------------------------------------------------------------------------------------ no browser needed
def synthetic_run(folder: Path, rewards: list[float], gold: list[float]) -> Path:
    """An RL run directory with three evaluations and two training rows, as rl.py writes them (no sample images)."""
    folder.mkdir(parents=True)
    rows = []
    for update, (proxy, g) in enumerate(zip(rewards, gold)):
        row = {"update": update, "eval/reward/mean": proxy, "eval/shapes/mean": proxy,
               "eval/shapes/color/mean": proxy / 2, "gold/reward/mean": g, "eval/signals/saturation": 0.2 + update / 10,
               "eval/signals/edge_density": 0.3, "eval/signals/diversity": 0.4 - update / 10,
               "time": 1000.0 + 30 * update}  # fmt: skip
        if update:
            row |= {"reward/mean": proxy - 0.01, "reward/std": 0.1, "policy_loss": 0.01, "timing/rollout": 2.5}
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.json").write_text(json.dumps({"train": {"updates": len(rows) - 1}}))
    return folder


def test_headline_holds_first_and_last_evaluation_of_every_run_and_runs_share_one_legend(tmp_path):
    a = synthetic_run(tmp_path / "a" / "rl", [0.30, 0.35, 0.45], [0.60, 0.58, 0.55])
    b = synthetic_run(tmp_path / "b" / "rl", [0.30, 0.32, 0.31], [0.60, 0.61, 0.62])
    page = write_report([a, b], tmp_path / "report.html").read_text()

    # two runs both called "rl" keep apart by their parent folders, in the table and in every legend
    cells = headline_cells(page)
    assert {c["run"] for c in cells} == {"a/rl", "b/rl"}
    for label, run in (("a/rl", a), ("b/rl", b)):
        first, last = evaluations(run)[0], evaluations(run)[-1]
        for cell in (c for c in cells if c["run"] == label):
            source = first if cell["when"] == "before" else last
            assert cell["value"] == source[cell["key"]] and cell["text"] == f"{source[cell['key']]:.3f}"
    keys = {c["key"] for c in cells}
    assert keys == {"eval/reward/mean", "eval/shapes/mean", "eval/shapes/color/mean", "gold/reward/mean",
                    "eval/signals/saturation", "eval/signals/edge_density", "eval/signals/diversity"}  # fmt: skip
    assert "+0.150" in page and "-0.050" in page  # a's proxy and gold changes
    assert "the proxy rose while the gold reward fell" in page  # run a, and only a
    assert page.count("the proxy rose while the gold reward fell") == 1

    lines = chart_lines([("eval/reward/mean", None)], "update", load_runs([a, b]))
    assert [line["label"] for line in lines] == ["a/rl: eval/reward/mean", "b/rl: eval/reward/mean"]
    assert lines[0]["color"] != lines[1]["color"]  # a colour per run, a line style per metric
    assert "config.json" in page and "1m00s" in page  # each run's config and the time its rows span


def test_a_measurement_detail_is_shown_without_calling_its_change_a_gain(tmp_path):
    run = synthetic_run(tmp_path / "rl", [0.30, 0.35, 0.45], [0.60, 0.58, 0.55])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):  # the canvas tint rises: worse, but not a reward falling or rising
        row["eval/shapes/background_tint/mean"] = 0.01 + 0.02 * i
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report([run], tmp_path / "report.html").read_text()
    changes = dict(re.findall(r"data-key='([^']*)' data-when='after'[^>]*>[^<]*</td><td class='num change ?(\w*)'", page))
    assert changes["eval/shapes/background_tint/mean"] == "" and changes["eval/shapes/color/mean"] == "up"


def headline_cells(page: str) -> list[dict]:
    """The headline's number cells: run, key, before/after, exact value and shown text."""
    pattern = (r"<td class='num' data-run='([^']*)' data-key='([^']*)' data-when='(before|after)'"
               r"(?: data-value='([^']*)')?>([^<]*)</td>")  # fmt: skip
    return [{"run": html.unescape(r), "key": html.unescape(k), "when": w, "value": float(v) if v else None, "text": t}
            for r, k, w, v, t in re.findall(pattern, page)]  # fmt: skip


# ------------------------------------------------------------------------------------------------ in a browser
def browser():
    """A launched headless Chromium (playwright driving Debian's build), or a skip naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs playwright (pip install playwright; it drives Debian's chromium, no "
                    "browser download)")  # fmt: skip
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LANCE_RL_CHROMIUM); .ci/run installs "
                    "it where apt-get works")  # fmt: skip
    return sync_playwright, CHROMIUM


def open_in_browser(report: Path, screenshot: Path, viewport=(1440, 900), full_page=True, element: str | None = None) -> dict:
    """Load the report in headless Chromium, open every folded section, and return what a reader would see: console
    errors, every image's decoded width, the headline cells as rendered, the chart positions and each sample's
    hover text. Saves a screenshot (of the page, or of the `element` a CSS selector names)."""
    sync_playwright, executable = browser()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(executable), args=BROWSER_ARGS)
        try:
            page = chromium.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            errors = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url[:80]}"))
            page.goto(report.resolve().as_uri(), wait_until="load")
            page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            facts = page.evaluate(
                """() => ({
                images: Array.from(document.images).map(i => ({alt: i.alt, title: i.title, width: i.naturalWidth,
                                                                  cls: i.closest('figure')?.className || ''})),
                charts: Array.from(document.querySelectorAll('#held-out figure.chart')).map(f => {
                    const r = f.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width}; }),
                headline: Array.from(document.querySelectorAll('#headline-table td[data-key]')).map(td => ({
                    run: td.dataset.run, key: td.dataset.key, when: td.dataset.when,
                    value: td.dataset.value === undefined ? null : Number(td.dataset.value), text: td.innerText})),
                prompts: Array.from(document.querySelectorAll('.comparison .prompt-text')).map(e => e.innerText),
                cardRows: new Set(Array.from(document.querySelectorAll('.comparison')).map(
                    c => Math.round(c.getBoundingClientRect().y))).size,
                order: Array.from(document.querySelectorAll('main > section')).map(s => s.id),
                pageWidth: document.documentElement.scrollWidth,
            })"""
            )  # fmt: skip
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            if element:
                page.locator(element).screenshot(path=str(screenshot))
            else:
                page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            chromium.close()
    return {"errors": errors, **facts}


def check_report(facts: dict, rl_run: Path, viewport_width: int) -> None:
    """What every report must show a reader, whatever the run."""
    assert facts["errors"] == []
    broken = [i["alt"] for i in facts["images"] if i["width"] == 0]
    assert not broken, f"images that did not decode: {broken}"
    assert facts["order"][0] == "headline" and facts["order"][-1] == "config"  # the answer first, the details last
    assert facts["pageWidth"] <= viewport_width  # nothing wider than a laptop screen

    # The headline shows the first and last evaluation of the run's metrics.jsonl, exactly.
    first, last = evaluations(rl_run)[0], evaluations(rl_run)[-1]
    assert {c["key"] for c in facts["headline"]} >= {"eval/reward/mean", "eval/signals/diversity"}
    for cell in facts["headline"]:
        source = first if cell["when"] == "before" else last
        assert cell["value"] == source[cell["key"]], cell
        assert cell["text"] == f"{source[cell['key']]:.3f}", cell

    # Held-out charts in a grid: several side by side on a laptop-wide window, not one column.
    charts = facts["charts"]
    assert len(charts) >= 4 and len({round(c["y"]) for c in charts[:3]}) == 1 and charts[1]["x"] > charts[0]["x"]

    # First and last evaluation side by side, each sample with its prompt on hover and in the row.
    record = json.loads(min((rl_run / "eval").glob("update_*.json")).read_text())
    samples = [i for i in facts["images"] if i["cls"] == "sample"]
    per_prompt = record["samples_per_prompt"]
    shown_prompts = record["prompts"][::per_prompt][:32]
    assert len(samples) == 2 * per_prompt * len(shown_prompts)
    assert facts["prompts"] == shown_prompts
    assert facts["cardRows"] < len(shown_prompts) or len(shown_prompts) == 1  # cards share rows: no single column
    for image in samples:
        assert image["title"].startswith(image["alt"] + " | sample ") and image["alt"] in record["prompts"]


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, sft_tiny):
    """SFT (the session's tiny SFT run) then two RL updates from it, evaluated after each; the report of both."""
    from test_rl import RECIPE, small

    from lance_rl.config import load_recipe
    from lance_rl.rl import RLRecipe
    from lance_rl.rl_config import RLConfig
    from lance_rl.trainer import run_recipe

    out = tmp_path_factory.mktemp("reported")
    model = sft_tiny / "checkpoints" / "step_0000200" / "model"
    overrides = small(out / "rl", model, "rewards={jpeg_incompressibility: 1.0}", "eval.every=1",
                      "eval.gold_rewards={jpeg_compressibility: 1.0}", "logging.every=1")  # fmt: skip
    run_recipe(RLRecipe(load_recipe(RLConfig, RECIPE, overrides)))
    return write_report([sft_tiny, out / "rl"], out / "report.html"), out / "rl"


def test_report_reads_right_in_a_browser(reported_run, tmp_path):
    report, rl_run = reported_run
    facts = open_in_browser(report, tmp_path / "report.png", viewport=(1366, 768))
    check_report(facts, rl_run, 1366)
    charts_written = len(list((report.parent / "report_charts").glob("*.png")))
    assert len([i for i in facts["images"] if i["cls"] == "chart"]) == charts_written
    assert {i["alt"] for i in facts["images"]} >= {"Held-out proxy reward", "Gold rewards (held-out, never trained on)",
                                                  "Image statistics", "Within-group diversity", "SFT loss"}  # fmt: skip
    grids = [i for i in facts["images"] if i["cls"] == "grid-image"]
    assert len(grids) == len(list((rl_run / "eval").glob("update_*.png")))  # every evaluation's grid
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.skipif(not os.environ.get("LANCE_RL_README_RUN"), reason="set LANCE_RL_README_RUN=<a finished pipeline "
                    "or quickstart folder> to check its report and retake docs/report.png")  # fmt: skip
def test_readme_screenshot_of_a_finished_run(tmp_path):
    run = Path(os.environ["LANCE_RL_README_RUN"])
    report = write_report([run / "sft", run / "rl"], run / "report.html")  # as the pipeline writes it
    check_report(open_in_browser(report, tmp_path / "full.png"), run / "rl", 1440)
    # The README shows the top of the page, the part that answers "did it work?", at a laptop's size.
    open_in_browser(report, README_SCREENSHOT, viewport=(1440, 1000), full_page=False)
    # And the samples, first and last evaluation side by side, for the README's quickstart section.
    open_in_browser(report, README_SAMPLES, viewport=(1440, 1000), element="#samples-rl")
