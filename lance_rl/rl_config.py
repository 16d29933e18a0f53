"""The RL recipe's settings (`RLConfig`, read from YAML with command-line overrides) and every check that needs no
weights, run before the model loads (`check_before_loading`): a wrong setting fails in the time it takes to read the
recipe, naming the field, never minutes into a 3B load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lance_rl.config import (
    CheckpointSection,
    LoggingSection,
    LoraSection,
    ModelSection,
    OptimSection,
    RecipeError,
)


@dataclass
class PromptSection:
    """Where prompts come from: "shapes" / "shapes-heldout" (the shapes world's splits), a .txt file (one prompt a
    line) or a .jsonl file ({"prompt": ..., "source": media path for editing / i2v})."""

    train: str = "shapes"
    eval: str = "shapes-heldout"
    task: Literal["t2i", "t2v", "i2v", "image_edit", "video_edit"] = "t2i"
    height: int = 32
    width: int = 32
    num_frames: int = 1  # video tasks: frames of the output

    def __post_init__(self):
        if self.height < 1 or self.width < 1 or self.num_frames < 1:
            raise RecipeError("prompts.height, prompts.width and prompts.num_frames must be positive")


@dataclass
class SamplerSection:
    """Rollout sampling. Flow-GRPO's values: 10 steps, SDE noise level 0.7 (CPS 0.8), CFG 4.5 on SD3."""

    num_steps: int = 10
    shift: float = 3.0
    kind: Literal["sde", "cps"] = "sde"
    noise_level: float = 0.7
    window_size: int = 0  # 0: every step but the last is stochastic and trained; k: a random window of k steps
    window_range: tuple[int, int] | None = None  # where the window may start and end (default: all but the last step;
    # diffusion_nft may end it at num_steps, training the last step's timestep too)
    cfg_scale: float = 4.0  # 1 gives the CFG-free recipe (RL as CFG distillation)
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm: Literal["global", "channel", "none"] = "global"  # the release's: the guided velocity is scaled down
    # to the conditional one's norm (spec 3.3); "none" for models it starves of denoising (the quickstart's, measured)
    same_noise_in_group: bool = False  # every group member starts from the same noise (Flow-GRPO's same_latent)

    def __post_init__(self):
        if self.num_steps < 2:
            raise RecipeError(f"sampler.num_steps must be at least 2 (the last step is never stochastic), got {self.num_steps}")
        if not self.noise_level > 0 or not self.shift > 0:
            raise RecipeError("sampler.noise_level and sampler.shift must be positive")
        if self.cfg_scale < 1:
            raise RecipeError(f"sampler.cfg_scale must be >= 1 (1 turns guidance off), got {self.cfg_scale}")
        if self.window_size < 0:
            raise RecipeError(f"sampler.window_size must be >= 0, got {self.window_size}")

    @property
    def trained_range(self) -> tuple[int, int]:
        """[first, stop) of the steps an algorithm may train: `window_range`, or every step but the last."""
        return tuple(self.window_range or (0, self.num_steps - 1))


@dataclass
class MixSection:
    """MixGRPO's sliding window: `sampler.window_size` SDE steps starting at the first step of `sampler.window_range`
    and moving `stride` steps later every `shift_every` updates (wrapping around); the authors move 1 step every
    25 iterations (20 for MixGRPO-Flash)."""

    shift_every: int = 25
    stride: int = 1

    def __post_init__(self):
        if self.shift_every < 1 or self.stride < 0:
            raise RecipeError("algorithm.mix.shift_every must be at least 1 and algorithm.mix.stride >= 0")


@dataclass
class NFTSection:
    """DiffusionNFT: `beta` mixes the implicit policies (the authors: 1.0; 0.1 for OCR and reward mixes); the old
    policy that samples trails the trained one: old <- eta old + (1 - eta) theta after each update, with
    eta = min(old_decay_rate * (optimizer steps - old_decay_flat), old_decay_max) (the authors: 0.001, 0.5, 0)."""

    beta: float = 1.0
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    old_decay_flat: int = 0

    def __post_init__(self):
        if not self.beta > 0 or self.old_decay_rate < 0 or not 0 <= self.old_decay_max < 1 or self.old_decay_flat < 0:
            raise RecipeError("algorithm.nft: beta > 0, old_decay_rate >= 0, 0 <= old_decay_max < 1, old_decay_flat >= 0")


@dataclass
class AlgorithmSection:
    """The policy update (lance_rl/algorithms.py): flow_grpo, mix_grpo, grpo_guard or diffusion_nft, sharing the
    rollouts, rewards, advantages, evaluation and checkpoints (spec: flow-grpo-and-peers.md 1.2-1.4)."""

    name: Literal["flow_grpo", "mix_grpo", "grpo_guard", "diffusion_nft"] = "flow_grpo"
    mix: MixSection = field(default_factory=MixSection)  # mix_grpo only
    nft: NFTSection = field(default_factory=NFTSection)  # diffusion_nft only
    group_size: int = 8  # samples per prompt; advantages compare within a group
    prompts_per_update: int = 8  # drawn without replacement within an update: one group per prompt
    inner_epochs: int = 1  # passes over each rollout batch
    clip_range: float = 1e-4  # Flow-GRPO's default
    clip_range_high: float | None = None  # asymmetric clipping (GRPO-Guard); None = symmetric
    adv_clip_max: float = 5.0
    global_std: bool = True  # divide by the batch's reward std (Flow-GRPO default) instead of the group's
    beta: float = 0.0  # KL weight to the reference policy; Flow-GRPO uses 0.004-0.04 in its units (kl_units)
    kl_units: Literal["flow_grpo", "exact"] = "flow_grpo"  # flow_grpo: |mu - mu_ref|^2 / (2 sigma_t^2), so published
    # beta values transfer; exact: the transition KL (= flow_grpo / |dt| for the SDE). Both are logged (kl, kl_exact)
    minibatches: int = 1  # optimizer steps per pass over a rollout batch (the groups are split evenly); with more
    # than one, later minibatches see ratios away from 1 and the clip range starts to act
    micro_batch_size: int = 0  # rows of a group per forward/backward (0: the whole group); gradients accumulate,
    # so the update is the same and its activation memory is bounded by this many rows (x2 with CFG)
    cfg_grad: Literal["full", "cond_only"] = "full"  # cond_only: the unconditional CFG branch runs without a graph
    # (Flow-GRPO detaches it), halving the update's activations; full: the gradient also flows through it
    skip_zero_std: bool = True  # groups without reward spread carry no signal: skip their update
    reuse_prefix: bool = True  # reuse one prefix encoding per prompt in the update where the prefix depends only on
    # frozen weights; where trainable weights shape it (editing, or a trained understanding side) it is always
    # recomputed with gradients, and the KL reference builds its own

    def __post_init__(self):
        if self.group_size < 2:
            raise RecipeError("algorithm.group_size must be at least 2: advantages compare samples within a group")
        for name in ("prompts_per_update", "inner_epochs", "minibatches"):
            if getattr(self, name) < 1:
                raise RecipeError(f"algorithm.{name} must be at least 1, got {getattr(self, name)}")
        if not self.clip_range > 0 or (self.clip_range_high is not None and not self.clip_range_high > 0):
            raise RecipeError("algorithm.clip_range (and clip_range_high) must be positive")
        if not self.adv_clip_max > 0 or self.beta < 0 or self.micro_batch_size < 0:
            raise RecipeError("algorithm.adv_clip_max must be positive, beta and micro_batch_size >= 0")
        for section, owner in (("mix", "mix_grpo"), ("nft", "diffusion_nft")):
            value = getattr(self, section)
            if self.name != owner and value != type(value)():
                raise RecipeError(f"algorithm.{section} applies to algorithm.name {owner!r} only (the recipe runs "
                                  f"{self.name!r}); leave it at its defaults")  # fmt: skip


@dataclass
class RolloutSection:
    num_workers: int = 2  # Ray actors sampling in parallel; 0 = colocated (the trainer samples itself)
    num_cpus_per_worker: float = 0.5  # fractional, so Ray can still schedule other tasks on a small machine
    num_gpus_per_worker: float = 0.0
    ray_address: str | None = None  # join a cluster; None starts Ray locally
    sync_bucket_mb: float = 512.0  # weights travel to the workers in objects of at most this size (verl's 512 MB)

    def __post_init__(self):
        if self.num_workers < 0 or self.num_cpus_per_worker < 0 or self.num_gpus_per_worker < 0:
            raise RecipeError("rollout.num_workers and the per-worker resources must be >= 0")
        if not self.sync_bucket_mb > 0:
            raise RecipeError(f"rollout.sync_bucket_mb must be positive, got {self.sync_bucket_mb}")


@dataclass
class EvalSection:
    every: int = 5  # updates between evaluations (and one before training and one at the end); 0: never
    num_prompts: int = 24
    samples_per_prompt: int = 2
    num_steps: int = 10
    seed: int = 1234  # fixed seeds: every evaluation samples from the same noise
    gold_rewards: dict[str, Any] = field(default_factory=dict)  # scored at evaluation only, never trained on

    def __post_init__(self):
        if self.every < 0:
            raise RecipeError(f"eval.every must be >= 0 (0: no evaluation), got {self.every}")
        if self.num_prompts < 1 or self.samples_per_prompt < 1 or self.num_steps < 1:
            raise RecipeError("eval.num_prompts, eval.samples_per_prompt and eval.num_steps must be at least 1")


@dataclass
class TrainSection:
    updates: int = 20
    policy: Literal["lora", "generation", "both"] = "lora"  # LoRA (see lora.*), full generation expert, or both experts
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU (policy.py: what is bf16)
    num_trainers: int = 1  # data-parallel trainer ranks, launched by torchrun (lance_rl/trainer_group.py)
    ema_decay: float = 0.0  # EMA of the trainable weights, used for evaluation and export; 0 turns it off
    ema_warmup: bool = True  # the decay ramps as Flow-GRPO's does: min(ema_decay, k / (9 + k)) at update k >= 2
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.updates < 1 or self.num_trainers < 1:
            raise RecipeError("train.updates and train.num_trainers must be at least 1")
        if not 0 <= self.ema_decay < 1:
            raise RecipeError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class RLConfig:
    output_dir: str
    model: ModelSection
    rewards: dict[str, Any]  # {name or package.module:callable: weight or {weight, kwargs, normalize, ...}}
    prompts: PromptSection = field(default_factory=PromptSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=lambda: LoraSection(enabled=True))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-4, eps=1e-8))
    rollout: RolloutSection = field(default_factory=RolloutSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=10, keep_last=2))
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(every=1))

    def __post_init__(self):
        if not self.rewards:
            raise RecipeError("rewards is empty: list at least one reward, e.g. {shapes: 1.0}")
        if (self.train.policy == "lora") != self.lora.enabled:
            raise RecipeError(f"train.policy is {self.train.policy!r} but lora.enabled is {self.lora.enabled}: LoRA "
                              "training needs both, full training neither")  # fmt: skip
        if self.lora.enabled and self.lora.dropout > 0:
            raise RecipeError(
                f"lora.dropout is {self.lora.dropout}: dropout makes the update's policy differ from the rollout's "
                "(the importance ratio leaves 1 on-policy), so RL needs lora.dropout: 0"
            )
        if self.algorithm.prompts_per_update < self.train.num_trainers:
            raise RecipeError(f"algorithm.prompts_per_update ({self.algorithm.prompts_per_update}) must be at least "
                              f"train.num_trainers ({self.train.num_trainers}): each rank trains whole groups")  # fmt: skip
        if self.algorithm.name == "grpo_guard" and self.sampler.kind != "sde":
            raise RecipeError("algorithm.name grpo_guard normalises the SDE step's ratio: it needs sampler.kind: sde")
        if self.algorithm.name == "diffusion_nft":
            # DiffusionNFT samples with the ODE and has no likelihood ratio: the SDE's and the clip's settings would be
            # accepted and then ignored. A field's default is its class attribute.
            unused = [f"{section}.{name}" for section, obj, name in (
                ("sampler", self.sampler, "kind"), ("sampler", self.sampler, "noise_level"),
                ("algorithm", self.algorithm, "clip_range"), ("algorithm", self.algorithm, "clip_range_high"))
                if getattr(obj, name) != getattr(type(obj), name)]  # fmt: skip
            if unused:
                raise RecipeError(f"{', '.join(unused)} apply to the SDE algorithms; diffusion_nft samples with the ODE "
                                  "and clips no ratio: leave them at their defaults")  # fmt: skip
        n = self.sampler.num_steps
        # The SDE's final step is deterministic, so the SDE algorithms cannot train it. DiffusionNFT noises its samples
        # again at the grid's timesteps, and the final step's (t > 0) is one of them: the authors train 9 of all 10.
        nft = self.algorithm.name == "diffusion_nft"
        first, stop = self.sampler.trained_range
        if not 0 <= first < stop <= (n if nft else n - 1) or self.sampler.window_size > stop - first:
            bound = "num_steps" if nft else "num_steps - 1; the final step is never stochastic"
            raise RecipeError(
                f"sampler.window_range {(first, stop)} with window_size {self.sampler.window_size} does not fit "
                f"{n} steps (0 <= first < stop <= {bound})"
            )


@dataclass
class Inputs:
    """What the checks read, handed to the recipe so nothing is read twice."""

    train_prompts: list[dict]
    eval_prompts: list[dict]
    grid: tuple[int, int, int]  # latent grid of every output
    latent_kind: str  # the checkpoint's codec ("patch" | "wan2.2")


def check_before_loading(cfg: RLConfig) -> Inputs:
    """Every check that needs no weights: the checkpoint is a Lance directory, the prompt files read and are large
    enough, the rewards resolve and take their options, and the output size fits the codec and the model."""
    from lance_rl.data.prompts import load_prompts
    from lance_rl.model.config import LanceConfig
    from lance_rl.model.tasks import has_source, makes_video
    from lance_rl.model.vae import latent_grid_of
    from lance_rl.rewards.mix import check_spec

    model_dir = Path(cfg.model.checkpoint)
    if not (model_dir / "llm_config.json").is_file():
        raise RecipeError(f"model.checkpoint: {model_dir} is not a Lance checkpoint (no llm_config.json)")
    train = load_prompts(cfg.prompts.train, "prompts.train")
    evaluation = load_prompts(cfg.prompts.eval, "prompts.eval")[: cfg.eval.num_prompts]
    a = cfg.algorithm
    if a.prompts_per_update > len(train):
        raise RecipeError(
            f"algorithm.prompts_per_update is {a.prompts_per_update} but prompts.train holds {len(train)} prompts: "
            "prompts are drawn without replacement within an update (one group per prompt)"
        )
    if has_source(cfg.prompts.task):
        for field_name, rows in (("prompts.train", train), ("prompts.eval", evaluation)):
            if not all(r.get("source") for r in rows):
                raise RecipeError(f"{field_name}: task {cfg.prompts.task} needs a 'source' on every line (a .jsonl file)")
    try:
        check_spec(cfg.rewards, "rewards")
        if cfg.eval.gold_rewards:
            check_spec(cfg.eval.gold_rewards, "eval.gold_rewards")
    except ValueError as e:
        raise RecipeError(str(e)) from None
    try:
        config = LanceConfig.from_llm_config(model_dir)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise RecipeError(f"model.checkpoint: {model_dir / 'llm_config.json'} cannot be read: {e}") from None
    p = cfg.prompts
    if p.num_frames != 1 and not makes_video(p.task):
        raise RecipeError(f"prompts.num_frames is {p.num_frames} but task {p.task} makes single images (leave it at 1)")
    frames = p.num_frames
    try:
        grid = latent_grid_of(config.vae, frames, p.height, p.width)
    except ValueError as e:
        raise RecipeError(f"prompts.height/width/num_frames: {e}") from None
    if max(grid[1:]) > config.max_latent_size or grid[0] > config.max_num_latent_frames:
        raise RecipeError(
            f"prompts: a {frames}x{p.height}x{p.width} output is a latent grid {grid}, beyond the model's "
            f"{config.max_num_latent_frames} latent frames x {config.max_latent_size} x {config.max_latent_size}"
        )
    if math.prod(grid) == 0:
        raise RecipeError(f"prompts: the output size gives an empty latent grid {grid}")
    return Inputs(train, evaluation, grid, config.vae)
