"""SFT then RL as one run: `lance-rl pipeline --config pipeline.yaml`, and the quickstart built on it.

    run/
    ├── sft/           the SFT run (its recipe's output_dir is set here)
    ├── sft_export/    the SFT result in the official layout (EMA weights when the SFT kept them)
    ├── rl/            the RL run, starting from sft_export
    └── report.html    reward curves and sample grids of both stages

Each stage resumes from its own latest checkpoint, so a pipeline killed at any point continues where it stopped
(`--resume`); a finished stage is not run again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lance_rl.config import RecipeError, load_recipe

log = logging.getLogger("lance_rl.pipeline")


@dataclass
class StageSection:
    recipe: str  # path of the stage's YAML recipe
    overrides: list[str] = field(default_factory=list)  # key=value applied on top of it


@dataclass
class PipelineConfig:
    output_dir: str
    sft: StageSection
    rl: StageSection
    base_checkpoint: str | None = None  # SFT starts here (overrides the SFT recipe's model.checkpoint)
    export_ema: bool = True  # RL starts from the SFT's EMA weights when it kept them


def _finished(run: Path, total: int, key: str) -> bool:
    from lance_rl.trainer import read_rows

    metrics = run / "metrics.jsonl"
    return metrics.is_file() and any(r.get(key) == total for r in read_rows(metrics, warn=False))


def run_pipeline(cfg: PipelineConfig, resume: bool = False) -> dict:
    from lance_rl import sft
    from lance_rl.export import export
    from lance_rl.sft_config import SFTConfig
    from lance_rl.trainer import run_recipe

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    # 1. SFT.
    sft_overrides = [*cfg.sft.overrides, f"output_dir={out / 'sft'}"]
    if cfg.base_checkpoint:
        sft_overrides.append(f"model.checkpoint={cfg.base_checkpoint}")
    sft_cfg = load_recipe(SFTConfig, cfg.sft.recipe, sft_overrides)
    started = time.perf_counter()
    if resume and _finished(out / "sft", sft_cfg.train.steps, "step"):
        log.info("SFT already finished in %s", out / "sft")
    else:
        run_recipe(sft.SFTRecipe(sft_cfg, resume=resume))
    timings["sft_s"] = time.perf_counter() - started

    # 2. The SFT result in the official layout.
    export_dir = out / "sft_export"
    ema = cfg.export_ema and sft_cfg.train.ema_decay > 0 and not sft_cfg.lora.enabled
    export(out / "sft", export_dir, ema=ema)

    # 3. RL from it: flow-GRPO, or TRL's GRPO on the understanding expert when the recipe's task is x2t.
    config_class, recipe_class, total = _rl_stage(cfg.rl)
    rl_cfg = load_recipe(config_class, cfg.rl.recipe, [*cfg.rl.overrides, f"output_dir={out / 'rl'}",
                                                        f"model.checkpoint={export_dir}"])  # fmt: skip
    started = time.perf_counter()
    if resume and _finished(out / "rl", getattr(rl_cfg.train, total), "update"):
        log.info("RL already finished in %s", out / "rl")
        last = {}
    else:
        last = run_recipe(recipe_class(rl_cfg, resume=resume))
    timings["rl_s"] = time.perf_counter() - started

    # 4. The report.
    from lance_rl.report import write_report

    report = write_report([out / "sft", out / "rl"], out / "report.html")
    return {"last": last, "report": str(report), "rl_config": rl_cfg, **timings}


def _rl_stage(stage: StageSection):
    """(config class, recipe class, the train field counting its updates) of a pipeline's RL stage."""
    from lance_rl.model.tasks import is_understanding
    from lance_rl.x2t import recipe_task

    task = recipe_task(stage.recipe, stage.overrides)
    if task is not None and is_understanding(task):
        from lance_rl.x2t import X2TConfig, X2TRecipe

        return X2TConfig, X2TRecipe, "steps"
    from lance_rl.rl import RLRecipe
    from lance_rl.rl_config import RLConfig

    return RLConfig, RLRecipe, "updates"


def pipeline_main(config_path: str, overrides: list[str], resume: bool = False) -> dict:
    cfg = load_recipe(PipelineConfig, config_path, overrides)
    for stage in (cfg.sft, cfg.rl):
        if not Path(stage.recipe).is_file():
            raise RecipeError(f"stage recipe {stage.recipe} does not exist")
    return run_pipeline(cfg, resume=resume)


def quickstart(out: str | Path = "runs/quickstart", resume: bool = True) -> dict:
    """The default main job: build a tiny Lance and the shapes world, SFT, then RL, and report the held-out accuracy
    before and after RL. Every stage is skipped or resumed when its output is already there."""
    from lance_rl.data.shapes import write_parquet
    from lance_rl.model.checkpoint import init_tiny
    from lance_rl.recipes import RECIPES_DIR

    out = Path(out)
    recipes = RECIPES_DIR / "quickstart"
    if not (out / "base" / "llm_config.json").is_file():
        log.info("quickstart 1/4: a tiny random Lance (hidden 128, 4 layers, PatchVAE) in %s", out / "base")
        init_tiny(out / "base", seed=0, hidden_size=128, num_layers=4)
    data = out / "data" / "train.parquet"
    if not data.is_file():
        log.info("quickstart 2/4: 20000 shapes images (32x32) in %s", data)
        write_parquet(data, 20000, "train", seed=0, size=32)
    log.info("quickstart 3/4 and 4/4: SFT, then RL (progress below; metrics in %s/*/metrics.jsonl)", out)
    cfg = load_recipe(PipelineConfig, recipes / "pipeline.yaml", [f"output_dir={out}", f"base_checkpoint={out / 'base'}"])
    cfg.sft.recipe = str(recipes / "sft.yaml")
    cfg.rl.recipe = str(recipes / "rl.yaml")
    cfg.sft.overrides = [f"data.datasets.0.path={data}"]
    result = run_pipeline(cfg, resume=resume)
    evals = [r for r in (json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines())
             if "eval/shapes/strict/mean" in r]  # fmt: skip
    first, last = evals[0], evals[-1]
    e = result["rl_config"].eval
    result["eval"] = {"num_prompts": e.num_prompts, "samples_per_prompt": e.samples_per_prompt}
    result["heldout"] = {
        "after_sft": {k.split("/")[-2]: first[k] for k in first if k.startswith("eval/shapes/") and k.endswith("/mean")},
        "after_rl": {k.split("/")[-2]: last[k] for k in last if k.startswith("eval/shapes/") and k.endswith("/mean")},
    }
    return result
