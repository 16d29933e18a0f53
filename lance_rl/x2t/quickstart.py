"""The understanding quickstart: `lance-rl quickstart --task x2t`. From the t2i quickstart's SFT result, shapes VQA
data, understanding SFT, GRPO with TRL, and a summary of held-out accuracy and of the generation score."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lance_rl.config import load_recipe
from lance_rl.x2t.recipe import generation_score_of

log = logging.getLogger("lance_rl.x2t")


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
    from lance_rl.pipeline import PipelineConfig, run_pipeline
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
    result = run_pipeline(cfg, resume=resume)  # the shared pipeline: its RL stage is x2t by the recipe's task
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
            "before_x2t": generation_score_of(base, result["rl_config"].generation),
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
