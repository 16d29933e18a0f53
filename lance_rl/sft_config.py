"""The SFT recipe's settings (`SFTConfig`, read from YAML with command-line overrides) and the checks that need no
weights (`check_before_loading`), run before the model loads."""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lance_rl.config import (
    CheckpointSection,
    LoggingSection,
    LoraSection,
    ModelSection,
    OptimSection,
    RecipeError,
)


@dataclass
class DatasetSection:
    path: str  # a .parquet file, a directory or glob of them, or a .jsonl manifest
    type: str = "auto"  # official dataset_type (text2image_general, ...) or "auto"
    weight: float = 1.0  # sampling weight among the datasets
    resolution: int | str = 256  # preprocessing: a preset name (image_768res, video_480p, ...) or an area side

    def __post_init__(self):
        if not self.weight > 0:
            raise RecipeError(f"data.datasets[].weight must be positive, got {self.weight}")


@dataclass
class DataSection:
    datasets: list[DatasetSection]
    tokens_per_step: int = 4096  # packing budget: samples are added while the pack stays within it
    text_dropout: float = 0.1  # caption dropped (for CFG), as the release
    visual_dropout: float = 0.1  # edit source (its ViT and VAE blocks) dropped, as the release

    def __post_init__(self):
        if not self.datasets:
            raise RecipeError("data.datasets is empty: list at least one dataset")
        for name in ("text_dropout", "visual_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise RecipeError(f"data.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.tokens_per_step < 1:
            raise RecipeError(f"data.tokens_per_step must be at least 1, got {self.tokens_per_step}")


@dataclass
class TrainSection:
    steps: int
    ce_weight: float = 0.25  # the release's weights
    mse_weight: float = 1.0
    timestep_shift: float = 4.0  # t = shift(sigmoid(N(0, 1))); the release trains with 4
    accumulate: int = 1  # packs per optimizer step
    train_understanding: bool = True  # full mode: the Qwen expert trains too (the release trains both)
    train_generation: bool = True
    freeze_embeddings: bool = True  # embed_tokens and lm_head frozen, as the release
    ema_decay: float = 0.0  # 0 turns EMA off; the release uses 0.9999
    ema_warmup: bool = False  # False: the fixed decay from the first step (the release); True: Flow-GRPO's ramp
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU (policy.py: what is bf16)
    # How the model is spread over the processes (lance_rl/distributed.py): ddp replicates it; fsdp2 (torch
    # fully_shard), zero2 and zero3 (DeepSpeed) shard it. Any of them runs with one process too.
    strategy: Literal["ddp", "fsdp2", "zero2", "zero3"] = "ddp"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise RecipeError(f"train.steps must be at least 1, got {self.steps}")
        if self.accumulate < 1:
            raise RecipeError(f"train.accumulate must be at least 1, got {self.accumulate}")
        if not 0 <= self.ema_decay < 1:
            raise RecipeError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ce_weight < 0 or self.mse_weight < 0:
            raise RecipeError("train.ce_weight and train.mse_weight must be non-negative")
        if not self.timestep_shift > 0:
            raise RecipeError(f"train.timestep_shift must be positive, got {self.timestep_shift}")


@dataclass
class SFTConfig:
    output_dir: str
    model: ModelSection
    data: DataSection
    train: TrainSection
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self):
        t = self.train
        if not self.lora.enabled and not (t.train_understanding or t.train_generation):
            raise RecipeError("nothing to train: lora.enabled is false and train.train_understanding and "
                              "train.train_generation are both false")  # fmt: skip
        if self.lora.enabled and t.strategy != "ddp":
            raise RecipeError(f"lora.enabled: true needs train.strategy: ddp, not {t.strategy}: the sharded strategies "
                              "are for full fine-tuning, and LoRA (adapters of ~120 M parameters at 3B) fits one GPU "
                              "per process with ddp")  # fmt: skip

    @property
    def trains(self) -> str:
        """What the policy trains, in `PolicySpec` terms."""
        if self.lora.enabled:
            return "lora"
        t = self.train
        return {(True, True): "both", (True, False): "understanding", (False, True): "generation"}[
            (t.train_understanding, t.train_generation)]  # fmt: skip


def check_before_loading(cfg: SFTConfig) -> None:
    """Inputs exist before any work starts: the checkpoint is a Lance directory and every dataset path exists; an
    `accelerate launch` config that names a strategy names the recipe's."""
    from lance_rl.distributed import launched_strategy

    launched = launched_strategy()
    if launched is not None and launched != cfg.train.strategy:
        raise RecipeError(f"train.strategy is {cfg.train.strategy}, but accelerate launch was given a {launched} "
                          f"config: set train.strategy={launched}, or launch with "
                          f"recipes/accelerate/{cfg.train.strategy}.yaml")  # fmt: skip
    if not (Path(cfg.model.checkpoint) / "llm_config.json").is_file():
        raise RecipeError(f"model.checkpoint: {cfg.model.checkpoint} is not a Lance checkpoint (no llm_config.json)")
    for i, d in enumerate(cfg.data.datasets):
        if not Path(d.path).exists() and not glob.glob(d.path):
            raise RecipeError(f"data.datasets[{i}].path: {d.path} does not exist")
