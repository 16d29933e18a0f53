"""SFT then RL as one resumable run, and the report it ends with."""

import json
import re

import yaml

from lance_rl.pipeline import PipelineConfig, run_pipeline


def test_pipeline_runs_both_stages_resumes_and_reports(tmp_path, shapes16):
    from lance_rl.config import load_recipe

    sft_recipe = {
        "output_dir": "ignored",
        "model": {"checkpoint": str(shapes16 / "base")},
        "data": {"datasets": [{"path": str(shapes16 / "train.parquet"), "resolution": 16}], "tokens_per_step": 800},
        "train": {"steps": 3, "timestep_shift": 3.0, "ema_decay": 0.9, "seed": 0},
        "checkpoint": {"every": 3},
        "logging": {"every": 1},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft_recipe))
    rl_overrides = ["prompts.height=16", "prompts.width=16", "sampler.num_steps=4", "sampler.window_size=1",
                    "sampler.window_range=[0, 2]", "algorithm.prompts_per_update=2", "algorithm.group_size=2",
                    "eval.num_prompts=2", "eval.num_steps=4", "eval.every=1", "rollout.num_workers=0",
                    "train.updates=2", "rewards={jpeg_incompressibility: 1.0}"]  # fmt: skip
    pipeline = {"output_dir": str(tmp_path / "run"), "sft": {"recipe": str(tmp_path / "sft.yaml")},
                "rl": {"recipe": "recipes/quickstart/rl.yaml", "overrides": rl_overrides}}  # fmt: skip
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    cfg = load_recipe(PipelineConfig, tmp_path / "pipeline.yaml")
    result = run_pipeline(cfg)
    run = tmp_path / "run"
    assert (run / "sft_export" / "ema.safetensors").exists() is False  # the export holds the EMA weights as the model
    assert json.loads((run / "rl" / "config.json").read_text())["model"]["checkpoint"] == str(run / "sft_export")
    rl_rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rl_rows] == [0, 1, 2]

    # Resuming a finished pipeline repeats nothing.
    run_pipeline(cfg, resume=True)
    assert len((run / "rl" / "metrics.jsonl").read_text().splitlines()) == 3
    assert len((run / "sft" / "metrics.jsonl").read_text().splitlines()) == 3

    # The report embeds every chart and sample, and its headline is the first and last evaluation.
    page = (run / "report.html").read_text()
    images = re.findall(r"<img src='data:image/png;base64,", page)
    assert "Training reward" in page and "SFT loss" in page and "Held-out proxy reward" in page
    assert len(images) >= 8 + 2 * 4  # charts, and the 2 prompts x 2 samples of the first and last evaluation
    for when, row in (("before", rl_rows[0]), ("after", rl_rows[-1])):
        assert f"data-key='eval/reward/mean' data-when='{when}' data-value='{row['eval/reward/mean']!r}'" in page
    assert result["report"].endswith("report.html")
