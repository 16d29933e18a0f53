"""Every recipe under recipes/ loads and validates; the quickstart recipes also run in a shortened form."""

import inspect
from pathlib import Path

import pytest
import yaml

from lance_rl.config import load_recipe
from lance_rl.pipeline import PipelineConfig
from lance_rl.rl_config import RLConfig
from lance_rl.sft_config import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
# recipes/accelerate/ holds accelerate launcher configs, not lance-rl recipes.
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


def kind_of(path: Path):
    data = yaml.safe_load(path.read_text())
    if "sft" in data and "rl" in data:
        return PipelineConfig
    return RLConfig if "rewards" in data else SFTConfig


def check_rewards(spec: dict, where: str) -> None:
    """Each reward resolves, takes the given options, and its constructor accepts the given kwargs."""
    from lance_rl.rewards.mix import _OPTION_KEYS
    from lance_rl.rewards.registry import resolve

    for name, value in spec.items():
        value = value if isinstance(value, dict) else {"weight": value}
        assert set(value) <= _OPTION_KEYS, f"{where}: reward {name} has unknown options {set(value) - _OPTION_KEYS}"
        target = resolve(value.get("reward", name))
        params = inspect.signature(target).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in value.get("kwargs") or {}:
            assert takes_any or key in params, f"{where}: reward {name} does not take {key!r} (takes {list(params)})"


def test_the_accelerate_config_is_data_parallel():
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "ddp.yaml").read_text())
    assert config["distributed_type"] == "MULTI_GPU" and config["mixed_precision"] == "no"


def test_there_are_recipes():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"quickstart/sft.yaml", "quickstart/rl.yaml", "quickstart/pipeline.yaml"} <= names
    assert {"lance-3b/t2i_pickscore.yaml", "lance-3b/t2i_ocr.yaml", "lance-3b/t2i_mix.yaml", "lance-3b/t2v_video.yaml",
            "lance-3b/image_edit.yaml", "lance-3b/sft_parquet.yaml", "lance-3b/sft_then_rl.yaml"} <= names  # fmt: skip


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_loads_and_validates(path):
    cls = kind_of(path)
    cfg = load_recipe(cls, path)
    if cls is RLConfig:
        check_rewards(cfg.rewards, str(path))
        check_rewards(cfg.eval.gold_rewards, f"{path} (gold)")
    if cls is PipelineConfig:
        for stage, stage_cls in ((cfg.sft, SFTConfig), (cfg.rl, RLConfig)):
            stage_cfg = load_recipe(stage_cls, ROOT / stage.recipe, stage.overrides)
            if stage_cls is RLConfig:
                check_rewards(stage_cfg.rewards, stage.recipe)


def test_quickstart_sft_recipe_runs_shortened(tmp_path, shapes16):
    from lance_rl.sft import recipe_main

    last = recipe_main(str(ROOT / "recipes/quickstart/sft.yaml"), [
        f"output_dir={tmp_path / 'sft'}", f"model.checkpoint={shapes16 / 'base'}",
        f"data.datasets.0.path={shapes16 / 'train.parquet'}", "data.datasets.0.resolution=16",
        "data.tokens_per_step=600", "train.steps=2", "checkpoint.every=2", "logging.every=1",
    ])  # fmt: skip
    assert last["step"] == 2 and (tmp_path / "sft" / "checkpoints" / "step_0000002" / "model").is_dir()
