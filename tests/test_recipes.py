"""Every recipe under recipes/ loads and validates; the quickstart recipes also run in a shortened form."""

import inspect
from pathlib import Path

import pytest
import yaml

from lance_rl.config import load_recipe
from lance_rl.pipeline import PipelineConfig
from lance_rl.rl_config import RLConfig
from lance_rl.sft_config import SFTConfig
from lance_rl.x2t.config import X2TConfig

ROOT = Path(__file__).resolve().parents[1]
# recipes/accelerate/ holds accelerate launcher configs, not lance-rl recipes.
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


def kind_of(path: Path):
    data = yaml.safe_load(path.read_text())
    if "sft" in data and "rl" in data:
        return PipelineConfig
    if str(data.get("task", "")).startswith("x2t"):
        return X2TConfig  # GRPO on the understanding expert (TRL)
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero2", "zero3"])
def test_each_accelerate_config_launches_its_strategy(strategy, monkeypatch):
    """accelerate reads the file as `accelerate launch` does (no GPU needed to prepare the environment); the trainer
    reads the strategy the launch announces from that environment (ddp.yaml announces none: a plain launch)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from lance_rl.distributed import launched_strategy

    path = ROOT / "recipes" / "accelerate" / f"{strategy}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "lance_rl.cli", "sft"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    assert launched_strategy(env) == (None if strategy == "ddp" else strategy)
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "no"  # the recipe's train.precision decides


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
    if cls is X2TConfig:
        check_rewards(cfg.rewards, str(path))
    if cls is PipelineConfig:
        for stage in (cfg.sft, cfg.rl):
            stage_cls = kind_of(ROOT / stage.recipe)
            stage_cfg = load_recipe(stage_cls, ROOT / stage.recipe, stage.overrides)
            if stage_cls is not SFTConfig:
                check_rewards(stage_cfg.rewards, stage.recipe)


@pytest.mark.parametrize("algorithm", ["flow_grpo", "mix_grpo", "grpo_guard", "diffusion_nft"])
@pytest.mark.parametrize("path", [p for p in RECIPES if kind_of(p) is RLConfig],
                         ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())  # fmt: skip
def test_every_algorithm_validates_on_every_rl_recipe(path, algorithm):
    """`algorithm.name=NAME` on any RL recipe; DiffusionNFT refuses the SDE's settings a recipe moved from their
    defaults (noise level, clip range), naming them, and takes the recipe once they are reset."""
    from lance_rl.config import RecipeError

    overrides = [f"algorithm.name={algorithm}"]
    try:
        cfg = load_recipe(RLConfig, path, overrides)
    except RecipeError as error:  # the fields the error names, back at their defaults
        assert algorithm == "diffusion_nft" and "apply to the SDE algorithms" in str(error), error
        cfg = load_recipe(RLConfig, path, [*overrides, "sampler.noise_level=0.7", "algorithm.clip_range=1e-4"])
    assert cfg.algorithm.name == algorithm


def test_quickstart_sft_recipe_runs_shortened(tmp_path, shapes16):
    from lance_rl.sft import recipe_main

    last = recipe_main(str(ROOT / "recipes/quickstart/sft.yaml"), [
        f"output_dir={tmp_path / 'sft'}", f"model.checkpoint={shapes16 / 'base'}",
        f"data.datasets.0.path={shapes16 / 'train.parquet'}", "data.datasets.0.resolution=16",
        "data.tokens_per_step=600", "train.steps=2", "checkpoint.every=2", "logging.every=1",
    ])  # fmt: skip
    assert last["step"] == 2 and (tmp_path / "sft" / "checkpoints" / "step_0000002" / "model").is_dir()
