"""The settings of an x2t GRPO recipe (TRL's GRPOConfig fields under `grpo`), and what is checked before loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lance_rl.config import (
    CheckpointSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    RecipeError,
    apply_overrides,
)

NAMED_DATA = ("shapes-vqa", "shapes-vqa-heldout")


@dataclass
class X2TModelSection(ModelSection):
    mape: bool = False  # positions while sampling and updating: False as the release's understanding inference
    # (spec 9.1), True as its training; `lance-rl understand --mape` answers the same way
    resolution: int | str | None = None  # ViT preprocessing (a preset or an area side); None: the release's presets,
    # or 56 px for tiny PatchVAE models (what `lance-rl understand` uses)
    freeze_embeddings: bool = True  # full training: embed_tokens stays frozen (it feeds generation prompts too)


@dataclass
class X2TDataSection:
    """Questions with images. "shapes-vqa" draws fresh shapes images (the training captions) with one question each,
    "shapes-vqa-heldout" the held-out captions with all four questions each; a path is an x2t parquet file (official
    x2t_general schema) or a JSON-lines manifest, read as the SFT trainer reads them."""

    train: str = "shapes-vqa"
    eval: str = "shapes-vqa-heldout"
    num_train: int = 2048  # images (named sets) or rows (files) for training
    num_eval: int = 48  # held-out images (named sets: four questions each) or rows
    image_size: int = 32  # named sets: canvas side in pixels
    seed: int = 1  # named sets: the quickstart's SFT data uses seed 0, so these images are new to the model

    def __post_init__(self):
        if self.num_train < 1 or self.num_eval < 1:
            raise RecipeError("data.num_train and data.num_eval must be at least 1")


@dataclass
class GRPOSection:
    """TRL GRPOConfig fields (same names and meaning, see trl.GRPOConfig); `extra` passes any other field as is."""

    num_generations: int = 8  # answers per question; advantages compare within a group
    prompts_per_step: int = 8  # questions per optimizer step
    max_completion_length: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0  # KL to the reference (LoRA: the adapter disabled); 0 loads no reference
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO's clip-higher
    loss_type: str = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    importance_sampling_level: Literal["token", "sequence"] = "token"  # "sequence" is GSPO (verl-omni's choice)
    num_iterations: int = 1  # optimizer passes over each generated batch
    # Completions per forward/backward: the batch's gradient is accumulated over micro-batches (still one optimizer
    # step per generated batch); 0: the whole batch at once. What bounds activation memory at 3B.
    micro_batch_size: int = 0
    mask_truncated_completions: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_generations < 2:
            raise RecipeError("grpo.num_generations must be at least 2: advantages compare answers within a group")
        batch = self.prompts_per_step * self.num_generations
        if self.micro_batch_size < 0 or (self.micro_batch_size and batch % self.micro_batch_size):
            raise RecipeError(f"grpo.micro_batch_size must divide prompts_per_step x num_generations ({batch}), got "
                              f"{self.micro_batch_size}")  # fmt: skip
        if self.prompts_per_step < 1 or self.max_completion_length < 1 or self.num_iterations < 1:
            raise RecipeError("grpo.prompts_per_step, max_completion_length and num_iterations must be at least 1")


@dataclass
class X2TTrainSection:
    steps: int = 100  # optimizer steps (each one a fresh generated batch when num_iterations is 1)
    policy: Literal["lora", "full"] = "lora"
    seed: int = 0
    device: str = "auto"
    # auto: bf16 on CUDA, fp32 on CPU. bf16: the model's weights in bf16 and TRL's bf16 autocast, the LoRA adapter
    # (PEFT keeps it fp32) or, for full training, fp32 master copies of the trained weights.
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self):
        if self.steps < 1:
            raise RecipeError(f"train.steps must be at least 1, got {self.steps}")


@dataclass
class X2TLoraSection:
    """LoRA through PEFT on the understanding expert: `targets` "understanding" (every decoder layer's q/k/v/o and
    MLP of the Qwen expert) or a list of regular expressions over module names."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | list[str] = "understanding"

    def __post_init__(self):
        if self.rank < 1:
            raise RecipeError(f"lora.rank must be at least 1, got {self.rank}")
        if isinstance(self.targets, str) and self.targets != "understanding":
            raise RecipeError(f"lora.targets {self.targets!r}: use 'understanding' or a list of module-name patterns")


@dataclass
class GenerationSection:
    """What understanding RL does to generation, measured with the t2i quickstart's evaluation (held-out shapes
    captions, fixed seeds, ODE, CFG), and how to keep it."""

    evaluate: bool = True  # score generation at every evaluation (gold/reward/mean: never trained on)
    keep: Literal["none", "answer_only", "guard"] = "none"
    max_drop: float = 0.05  # guard: the largest fall of the generation score below its start
    prompts: str = "shapes-heldout"
    num_prompts: int = 24
    samples_per_prompt: int = 2
    num_steps: int = 10
    shift: float = 3.0
    cfg_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm: Literal["global", "channel", "none"] = "none"  # as the t2i quickstart's RL recipe samples
    height: int = 32
    width: int = 32
    seed: int = 1234  # the RL recipe's eval seed: the same samples as the t2i quickstart's evaluation

    def __post_init__(self):
        if not self.max_drop >= 0:
            raise RecipeError(f"generation.max_drop must be >= 0, got {self.max_drop}")


@dataclass
class X2TEvalSection:
    every: int = 20  # updates between evaluations (and one before training and one at the end); 0: never
    max_new_tokens: int = 8
    batch_size: int = 64

    def __post_init__(self):
        if self.every < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise RecipeError("eval.every must be >= 0, eval.max_new_tokens and eval.batch_size >= 1")


@dataclass
class X2TConfig:
    task: Literal["x2t_image", "x2t_video"]
    output_dir: str
    model: X2TModelSection
    rewards: dict[str, Any]  # {name or package.module:callable: weight or {weight, kwargs, normalize, ray, ...}}
    data: X2TDataSection = field(default_factory=X2TDataSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    train: X2TTrainSection = field(default_factory=X2TTrainSection)
    lora: X2TLoraSection = field(default_factory=X2TLoraSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4, eps=1e-8))
    generation: GenerationSection = field(default_factory=GenerationSection)
    eval: X2TEvalSection = field(default_factory=X2TEvalSection)
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=50, keep_last=2))
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(every=1))

    def __post_init__(self):
        if not self.rewards:
            raise RecipeError("rewards is empty: list at least one reward, e.g. {shapes_vqa: 1.0}")
        if self.train.policy == "full" and self.grpo.beta > 0:
            raise RecipeError("grpo.beta > 0 with train.policy full: TRL would load a second model through the auto "
                              "classes; use LoRA (the reference is the adapter disabled) or beta 0")  # fmt: skip
        if self.lora.dropout > 0 and self.train.policy == "lora":
            raise RecipeError("lora.dropout must be 0: dropout makes the update's policy differ from the sampler's")
        if self.generation.keep == "guard" and not (self.generation.evaluate and self.eval.every > 0):
            raise RecipeError("generation.keep: guard needs generation.evaluate: true and eval.every > 0")


def recipe_task(config_path: str | Path | None, overrides: list[str] | None = None) -> str | None:
    """The `task` a recipe names (after overrides), without building it: how `lance-rl rl` picks its trainer."""
    import yaml

    data: dict = {}
    if config_path is not None and Path(config_path).is_file():
        try:
            data = yaml.safe_load(Path(config_path).read_text()) or {}
        except yaml.YAMLError:
            return None  # the trainer's own loader reports it, naming the file
    data = apply_overrides(data if isinstance(data, dict) else {}, overrides or [])
    task = data.get("task")
    return task if isinstance(task, str) else None


def check_before_loading(cfg: X2TConfig) -> None:
    """Everything that needs no weights: the checkpoint is a Lance directory, the data sources exist, the rewards
    resolve and take their options, and they score text."""
    from lance_rl.rewards.mix import check_spec

    if not (Path(cfg.model.checkpoint) / "llm_config.json").is_file():
        raise RecipeError(f"model.checkpoint: {cfg.model.checkpoint} is not a Lance checkpoint (no llm_config.json)")
    for name in ("train", "eval"):
        source = getattr(cfg.data, name)
        if source not in NAMED_DATA and not Path(source).exists():
            raise RecipeError(f"data.{name}: {source} is neither {' nor '.join(NAMED_DATA)} nor an existing file")
    try:
        check_spec(cfg.rewards, "rewards")
    except ValueError as e:
        raise RecipeError(str(e)) from None
