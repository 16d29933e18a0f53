"""The understanding quickstart: `lance-rl quickstart --task x2t`. From the t2i quickstart's SFT result, shapes VQA
data, understanding SFT, GRPO with TRL, and a summary of held-out accuracy and of the generation score."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lance_rl.config import load_recipe
from lance_rl.x2t.config import X2TConfig
from lance_rl.x2t.recipe import X2TRecipe, generation_score_of

log = logging.getLogger("lance_rl.x2t")


def run_pipeline(cfg, resume: bool = False) -> dict:
    """An x2t pipeline (`lance_rl.pipeline.PipelineConfig`: SFT recipe, then this recipe) in one run folder, laid
    out as the t2i pipeline's: sft/, sft_export/, rl/, report.html. A finished stage is not run again."""
    from lance_rl import sft
    from lance_rl.curves import write_report
    from lance_rl.export import export
    from lance_rl.pipeline import _finished
    from lance_rl.sft_config import SFTConfig

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    # 1. SFT on the understanding data (the SFT trainer: cross-entropy on answers, flow matching on replayed images).
    sft_overrides = [*cfg.sft.overrides, f"output_dir={out / 'sft'}"]
    if cfg.base_checkpoint:
        sft_overrides.append(f"model.checkpoint={cfg.base_checkpoint}")
    sft_cfg = load_recipe(SFTConfig, cfg.sft.recipe, sft_overrides)
    started = time.perf_counter()
    if resume and _finished(out / "sft", sft_cfg.train.steps, "step"):
        log.info("SFT already finished in %s", out / "sft")
    else:
        stage = sft.SFTRecipe(sft_cfg, resume=resume)
        stage.setup()
        try:
            stage.train()
        finally:
            stage.cleanup()
    timings["sft_s"] = time.perf_counter() - started

    # 2. The SFT result in the official layout; 3. GRPO from it.
    ema = cfg.export_ema and sft_cfg.train.ema_decay > 0 and not sft_cfg.lora.enabled
    export(out / "sft", out / "sft_export", ema=ema)
    x2t_cfg = load_recipe(X2TConfig, cfg.rl.recipe, [*cfg.rl.overrides, f"output_dir={out / 'rl'}",
                                                      f"model.checkpoint={out / 'sft_export'}"])  # fmt: skip
    started = time.perf_counter()
    if resume and _finished(out / "rl", x2t_cfg.train.steps, "update"):
        log.info("GRPO already finished in %s", out / "rl")
        last = {}
    else:
        stage = X2TRecipe(x2t_cfg, resume=resume and (out / "rl" / "latest").is_file())
        stage.setup()
        try:
            last = stage.train()
        finally:
            stage.cleanup()
    timings["rl_s"] = time.perf_counter() - started

    report = write_report([out / "sft", out / "rl"], out / "report.html")
    return {
        "last": last,
        "report": str(report),
        "generation": x2t_cfg.generation,
        **timings,
    }


def quickstart(
    out: str | Path = "runs/x2t",
    t2i: str | Path = "runs/quickstart",
    resume: bool = True,
) -> dict:
    """The understanding quickstart: from the t2i quickstart's SFT result (a tiny Lance that draws the shapes world,
    whose understanding expert has never answered anything), write shapes VQA + captioning data, SFT, GRPO with TRL,
    and summarise: held-out accuracy per question type after SFT and after GRPO, and the generation score of the
    model before the understanding SFT, after it and after GRPO."""
    from lance_rl.data.shapes import write_vqa_parquet
    from lance_rl.pipeline import PipelineConfig
    from lance_rl.recipes import RECIPES_DIR

    out, t2i = Path(out), Path(t2i)
    base, images = t2i / "sft_export", t2i / "data" / "train.parquet"
    if not (base / "llm_config.json").is_file() or not images.is_file():
        raise FileNotFoundError(f"{base} or {images} is missing: run the t2i quickstart first (`lance-rl quickstart "
                                f"--out {t2i}`); its SFT result is the model this quickstart teaches to answer")  # fmt: skip
    started = time.perf_counter()
    data = out / "data" / "vqa.parquet"
    if not data.is_file():
        log.info("x2t quickstart 1/3: shapes VQA and captioning data in %s", data)
        write_vqa_parquet(data, 20000, "train", seed=0, size=32, caption_share=0.25)
    recipes = RECIPES_DIR / "quickstart"
    cfg = load_recipe(
        PipelineConfig,
        recipes / "x2t_pipeline.yaml",
        [f"output_dir={out}", f"base_checkpoint={base}"],
    )
    cfg.sft.recipe, cfg.rl.recipe = (
        str(recipes / "x2t_sft.yaml"),
        str(recipes / "x2t_grpo.yaml"),
    )
    cfg.sft.overrides = [
        f"data.datasets.0.path={data}",
        f"data.datasets.1.path={images}",
    ]
    log.info(
        "x2t quickstart 2/3 and 3/3: SFT, then GRPO with TRL (metrics in %s/*/metrics.jsonl)",
        out,
    )
    result = run_pipeline(cfg, resume=resume)
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy/mean" in r]

    def pick(
        row: dict,
    ) -> dict:  # {"all": ..., "count": ..., ...} from eval/accuracy[/<type>]/mean
        return {("all" if k == "eval/accuracy/mean" else k.split("/")[-2]): row[k] for k in row
                if k.startswith("eval/accuracy/") and k.endswith("/mean")}  # fmt: skip

    summary = {
        "heldout_accuracy": {
            "after_sft": pick(evals[0]),
            "after_grpo": pick(evals[-1]),
        },
        "generation_shapes_score": {
            "before_x2t": generation_score_of(base, result["generation"]),
            "after_sft": evals[0].get("gold/reward/mean"),
            "after_grpo": evals[-1].get("gold/reward/mean"),
        },
        "seconds": {
            "total": time.perf_counter() - started,
            "sft": result["sft_s"],
            "grpo": result["rl_s"],
        },
        "report": result["report"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
