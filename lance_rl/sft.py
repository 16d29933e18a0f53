"""The SFT recipe: flow-matching MSE on generation data and cross-entropy on understanding data, LoRA or full.

    lance-rl sft --config recipes/quickstart/sft.yaml [key=value ...] [--resume]

One class, read top to bottom: `setup()` builds the model, optimizer and data in that order (the optimizer needs the
trainable parameters, which LoRA and the freezing rules decide), `train()` is the loop, `save_checkpoint()` writes
everything a resume needs. Losses follow the release (spec 5.2): token means of each loss, total
`ce_weight * CE + mse_weight * MSE`, timesteps `shift(sigmoid(N(0, 1)))`, condition tokens at t = 0 and excluded.

Determinism: every random choice of a sample (dropout, timestep, VAE posterior noise) is seeded from the run seed and
the sample's global index, and the flow noise of a step from the run seed and the step, so a resumed run draws exactly
what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lance_rl.checkpointing import commit_checkpoint, latest_checkpoint, swapped_in
from lance_rl.config import (
    CheckpointSection,
    LoggingSection,
    LoraSection,
    ModelSection,
    OptimSection,
    RecipeError,
    load_recipe,
    to_dict,
)

log = logging.getLogger("lance_rl.sft")


# ------------------------------------------------------------------------------------------------ the recipe
@dataclass
class DatasetSection:
    path: str  # a .parquet file, a directory or glob of them, or a .jsonl manifest
    type: str = "auto"  # official dataset_type (text2image_general, ...) or "auto"
    weight: float = 1.0  # sampling weight among the datasets
    resolution: int | str = 256  # preprocessing: a preset name (image_768res, video_480p, ...) or an area side


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
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast on CUDA; CPUs run fp32
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise RecipeError(f"train.steps must be at least 1, got {self.steps}")
        if not 0 <= self.ema_decay < 1:
            raise RecipeError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ce_weight < 0 or self.mse_weight < 0:
            raise RecipeError("train.ce_weight and train.mse_weight must be non-negative")


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

    def validate_paths(self) -> None:
        """Inputs must exist before any work starts."""
        if not (Path(self.model.checkpoint) / "llm_config.json").is_file():
            raise RecipeError(f"model.checkpoint: {self.model.checkpoint} is not a Lance checkpoint (no llm_config.json)")
        for i, d in enumerate(self.data.datasets):
            if not Path(d.path).exists() and not glob.glob(d.path):
                raise RecipeError(f"data.datasets[{i}].path: {d.path} does not exist")


# ------------------------------------------------------------------------------------------------ LoRA and freezing
_LAYER = r"language_model\.model\.layers\.\d+\."
LORA_PRESETS = {
    "generation": [_LAYER + r"self_attn\.[qkvo]_proj_moe_gen", _LAYER + r"mlp_moe_gen\.(gate|up|down)_proj"],
    "understanding": [_LAYER + r"self_attn\.[qkvo]_proj", _LAYER + r"mlp\.(gate|up|down)_proj"],
}
LORA_PRESETS["both"] = LORA_PRESETS["generation"] + LORA_PRESETS["understanding"]


def lora_target_regex(targets: str | list[str]) -> str:
    patterns = LORA_PRESETS[targets] if isinstance(targets, str) else targets
    return "|".join(f"(?:{p})" for p in patterns)


def apply_lora(model, lora: LoraSection):
    """Wrap the model with PEFT LoRA adapters on the target projections; only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora_target_regex(lora.targets), init_lora_weights=True)  # fmt: skip
    return get_peft_model(model, config)


def freeze_for_full_training(model, understanding: bool, generation: bool, freeze_embeddings: bool = True) -> None:
    """The release's rules: the ViT never trains; embeddings frozen by default; each expert as asked (the generation
    heads time_embedder, vae2llm, llm2vae go with the generation expert)."""
    for name, p in model.named_parameters():
        if name.startswith("vit_model."):
            trainable = False
        elif "embed_tokens" in name or "lm_head" in name:
            trainable = not freeze_embeddings
        elif name.startswith("language_model."):
            trainable = generation if "_moe_gen" in name else understanding
        else:
            trainable = generation
        p.requires_grad_(trainable)


# ------------------------------------------------------------------------------------------------ samples
def _rng_for(seed: int, index: int) -> tuple[random.Random, torch.Generator]:
    mixed = (seed * 1_000_003 + index) % (2**63)
    return random.Random(mixed), torch.Generator().manual_seed(mixed)


def make_sample(example, index: int, tokenizer, codec, data: DataSection, train: TrainSection, resolution, device):
    """One training sample (plan, media) from a decoded example, with the release's preprocessing and dropout."""
    from lance_rl.model import media
    from lance_rl.model.packing import SampleMedia
    from lance_rl.model.sampling import shift_time
    from lance_rl.model.sequence import build_plan, generation_plan, noise_block, understanding_plan
    from lance_rl.model.tokenizer import system_prompt
    from lance_rl.model.vision import patchify_video

    rng, gen = _rng_for(train.seed, index)
    if example.task.startswith("x2t"):
        patches, vit_grid = patchify_video(media.vit_tensor(example.source, resolution))
        t, h, w = vit_grid
        plan = understanding_plan(tokenizer, example.task, (t, h // 2, w // 2), example.text, example.answer,
                                  example.instruction)  # fmt: skip
        return plan, SampleMedia(vit_patches=[patches], vit_grids=[vit_grid])

    caption = "" if rng.random() < data.text_dropout else example.text
    target = codec.encode(media.vae_tensor(example.target, resolution).to(device), generator=gen).cpu()
    grid = tuple(target.shape[:3])
    t = float(shift_time(torch.sigmoid(torch.randn((), generator=gen)), train.timestep_shift))
    if example.task in ("t2i", "t2v"):
        plan = generation_plan(tokenizer, example.task, caption, grid, training=True)
        return plan, SampleMedia(latents=[target], timesteps=[t])
    # Editing: the source enters as a ViT block and a clean VAE block, both dropped together with visual_dropout.
    if rng.random() < data.visual_dropout:
        plan = build_plan(tokenizer, example.task, system_prompt(example.task), [caption], noise_block(grid),
                          caption=caption)  # fmt: skip
        return plan, SampleMedia(latents=[target], timesteps=[t])
    source = codec.encode(media.vae_tensor(example.source, resolution).to(device), generator=gen).cpu()
    if tuple(source.shape[:3]) != grid:
        raise ValueError(f"{example.origin}: source latent {tuple(source.shape[:3])} and target {grid} differ in size")
    patches, vit_grid = patchify_video(media.vit_tensor(example.source, resolution))
    plan = generation_plan(tokenizer, example.task, caption, grid, (vit_grid[0], vit_grid[1] // 2, vit_grid[2] // 2),
                           training=True)  # fmt: skip
    return plan, SampleMedia(vit_patches=[patches], vit_grids=[vit_grid], latents=[source, target], timesteps=[t])


def flow_loss(out, ce_weight: float, mse_weight: float) -> tuple[torch.Tensor, dict]:
    """Token means of each loss (the release's normalisation on one process) and their weighted sum."""
    zero = out.hidden.new_zeros(())
    mse = out.mse.mean(-1).mean() if out.mse.numel() else zero
    ce = out.ce.mean() if out.ce.numel() else zero
    return mse_weight * mse + ce_weight * ce, {"mse": float(mse.detach()), "ce": float(ce.detach())}


# ------------------------------------------------------------------------------------------------ the trainer
class SFTRecipe:
    def __init__(self, cfg: SFTConfig, resume: bool = False):
        cfg.validate_paths()
        self.cfg = cfg
        self.resume = resume
        self.out = Path(cfg.output_dir)
        self.step = 0
        self.samples_seen = 0

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # CPU processes started by torchrun: accelerate sets up NCCL or MPI itself, but not plain gloo.
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("gloo")
        # One process on a CPU; under `accelerate launch` one per GPU with DDP. Unused parameters are expected: a
        # pack without answers gives the last layer's understanding MLP no gradient.
        self.accelerator = Accelerator(cpu=self.cfg.train.device == "cpu" or not torch.cuda.is_available(),
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])  # fmt: skip
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        torch.manual_seed(self.cfg.train.seed)
        self.device = self._device()
        self._setup_model()  # first: LoRA and freezing decide what the optimizer gets
        self._setup_optimizer()
        self._setup_data()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        if self.resume:
            self._load_latest()
        self.metrics = (self.out / "metrics.jsonl").open("a") if self.main else None
        self.tb = None
        if self.cfg.logging.tensorboard and self.main:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def _device(self) -> torch.device:
        d = self.cfg.train.device
        if d not in ("auto", "cpu"):
            return torch.device(d)
        device = self.accelerator.device
        return torch.device("cpu") if device.type == "cpu" else device  # multi-CPU runs report "cpu:<rank>"

    def _setup_model(self) -> None:
        from lance_rl.model.checkpoint import load_lance
        from lance_rl.model.vae import build_vae, find_wan_vae

        m = self.cfg.model
        loaded = load_lance(m.checkpoint, vit_dir=m.vit_dir, device=self.device)
        self.base, self.tokenizer = loaded.model, loaded.tokenizer
        self.base.attn_backend = m.attn_backend
        self.base.language_model.model.gradient_checkpointing = m.gradient_checkpointing
        vae_path = m.vae or (find_wan_vae(Path(m.checkpoint)) if self.base.config.vae == "wan2.2" else None)
        self.codec = build_vae(self.base.config, vae_path, device=self.device)
        if self.cfg.lora.enabled:
            self.base.requires_grad_(False)
            self.model = apply_lora(self.base, self.cfg.lora)
        else:
            t = self.cfg.train
            freeze_for_full_training(self.base, t.train_understanding, t.train_generation, t.freeze_embeddings)
            self.model = self.base
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.model = self.accelerator.prepare_model(self.model)  # DDP under accelerate launch; as is on one process
        if not self.trainable:
            raise RecipeError("nothing to train: every parameter is frozen (check train.* and lora.*)")
        self.ema = None
        if self.cfg.train.ema_decay > 0:
            self.ema = {n: p.detach().clone() for n, p in self.trainable.items()}
        count = sum(p.numel() for p in self.trainable.values())
        log.info("training %s parameters (%s)", f"{count:,}", "LoRA" if self.cfg.lora.enabled else "full")

    def _setup_optimizer(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)  # fmt: skip
        total, warm = self.cfg.train.steps, o.warmup_steps

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if o.schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            floor = o.min_lr / o.lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def _setup_data(self) -> None:
        from lance_rl.data.datasets import MixedDataset, open_dataset

        # Each process reads its own shuffle of the data and draws its own sample randomness.
        seed = self.cfg.train.seed + 1_009 * self.rank
        sets = [open_dataset(d.path, d.type, seed=seed + i) for i, d in enumerate(self.cfg.data.datasets)]
        self.data = MixedDataset(sets, [d.weight for d in self.cfg.data.datasets], seed=seed)
        self.resolutions = [d.resolution for d in self.cfg.data.datasets]
        self._carry = None  # (sample, dataset state before it) that did not fit the previous pack

    # ---------------------------------------------------------------- data
    def _next_sample(self):
        state = self.data.state_dict()
        example, which = self.data.next_with_source()
        index = self.samples_seen * self.world + self.rank  # global sample index: distinct per process
        sample = make_sample(example, index, self.tokenizer, self.codec, self.cfg.data, self.cfg.train,
                             self.resolutions[which], self.device)  # fmt: skip
        self.samples_seen += 1
        return sample, state, self.samples_seen - 1

    def _next_pack(self):
        """Samples up to the token budget. A sample that does not fit waits for the next pack (and a checkpoint taken
        meanwhile records the data position before it, so a resume draws it again)."""
        from lance_rl.model.packing import pack

        budget = self.cfg.data.tokens_per_step
        plans, media, tokens = [], [], 0
        while True:
            if self._carry is not None:
                item, self._carry = self._carry, None
            else:
                item = self._next_sample()
            (plan, sample_media), state, index = item
            if plans and tokens + len(plan) > budget:
                self._carry = item
                break
            plans.append(plan)
            media.append(sample_media)
            tokens += len(plan)
            if tokens >= budget:
                break
        c = self.base.config
        return pack(plans, media, c.tokens_per_second, c.max_latent_size).to(self.device), tokens

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        from tqdm import tqdm

        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, desc="sft", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())  # fmt: skip  # logs carry the progress when not on a terminal
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=t.precision == "bf16" and self.device.type == "cuda")
        self.model.train()
        self._started, self._first_step = time.time(), self.step
        last = {}
        while self.step < t.steps:
            started = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "mse": 0.0, "ce": 0.0, "tokens": 0}
            for micro in range(t.accumulate):
                batch, tokens = self._next_pack()
                noise_gen = torch.Generator().manual_seed(t.seed * 7_919 + (self.step * t.accumulate + micro) * self.world
                                                          + self.rank)  # fmt: skip
                noise = torch.randn(batch.vae_latents.shape, generator=noise_gen).to(self.device)
                with autocast:
                    out = self.model(batch, noise=noise)
                loss, parts = flow_loss(out, t.ce_weight, t.mse_weight)
                finite = self.accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), "sum")
                if float(finite) < self.world:  # any process saw a non-finite loss: every process skips
                    log.warning("step %d: non-finite loss %s, skipping the update", self.step, float(loss))
                    self.optimizer.zero_grad(set_to_none=True)
                    totals["skipped"] = 1
                    break
                self.accelerator.backward(loss / t.accumulate)
                totals["loss"] += float(loss.detach()) / t.accumulate
                totals["mse"] += parts["mse"] / t.accumulate
                totals["ce"] += parts["ce"] / t.accumulate
                totals["tokens"] += tokens
            grad_norm = 0.0
            if "skipped" not in totals:
                if self.cfg.optim.max_grad_norm > 0:
                    grad_norm = float(self.accelerator.clip_grad_norm_(list(self.trainable.values()),
                                                                       self.cfg.optim.max_grad_norm))  # fmt: skip
                self.optimizer.step()
                self._update_ema()
            self.scheduler.step()
            self.step += 1
            elapsed = time.perf_counter() - started
            last = {"step": self.step, **totals, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": totals["tokens"] / elapsed, "samples_seen": self.samples_seen,
                    "skipped_rows": sum(self.data.skipped.values())}  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if self.step % self.cfg.logging.every == 0 or self.step == t.steps:
                self._log(last)
            if self.step % self.cfg.checkpoint.every == 0 or self.step == t.steps:
                self.save_checkpoint()
        bar.close()
        return last

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.train.ema_decay
        for name, p in self.trainable.items():
            self.ema[name].lerp_(p.detach(), 1 - d)

    def _log(self, row: dict) -> None:
        if not self.main:  # process 0 logs its own pack's numbers
            return
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} | {"time": time.time()}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        done = row["step"] / self.cfg.train.steps
        elapsed = row["time"] - self._started
        eta = elapsed / max(row["step"] - self._first_step, 1) * (self.cfg.train.steps - row["step"])
        log.info("step %d/%d (%.0f%%) loss %.4f mse %.4f ce %.4f %.0f tok/s, ETA %.0f s", row["step"],
                 self.cfg.train.steps, 100 * done, row["loss"], row["mse"], row["ce"], row["tokens_per_s"], eta)  # fmt: skip
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"sft/{k}", v, row["step"])

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/step_NNNNNNN/ with the model (official layout, or the PEFT adapter) and trainer_state.pt;
        written to a temporary directory and renamed, then `latest` is switched, so a crash never leaves a broken
        latest checkpoint."""
        from lance_rl.model.checkpoint import save_lance

        # Every process reports its data position (each reads its own shuffle); process 0 writes everything.
        data_state = self._carry[1] if self._carry is not None else self.data.state_dict()
        samples = self._carry[2] if self._carry is not None else self.samples_seen
        from accelerate.utils import gather_object

        positions = gather_object([json.dumps({"data": data_state, "samples": samples})])
        root = self.out / "checkpoints"
        final = root / f"step_{self.step:07d}"
        if not self.main:
            self.accelerator.wait_for_everyone()
            return final
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp_step_{self.step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if self.cfg.lora.enabled:
            self.accelerator.unwrap_model(self.model).save_pretrained(str(tmp / "adapter"))
            (tmp / "adapter" / "base_checkpoint.txt").write_text(str(Path(self.cfg.model.checkpoint).resolve()) + "\n")
        else:
            save_lance(self.base, self.tokenizer, tmp / "model")
            if self.ema is not None:
                with swapped_in(self.trainable, self.ema):
                    _save_weights_only(self.base, tmp / "model" / "ema.safetensors")
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema,
            "positions": list(positions),  # one JSON string per process: its data state and samples drawn
        }
        torch.save(state, tmp / "trainer_state.pt")
        commit_checkpoint(tmp, final, self.out, "step_*", self.cfg.checkpoint.keep_last)
        self.accelerator.wait_for_everyone()
        return final

    def _load_latest(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            log.info("no checkpoint in %s: starting from scratch", self.out)
            return
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        if self.cfg.lora.enabled:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.accelerator.unwrap_model(self.model),
                                      load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))  # fmt: skip
        else:
            from lance_rl.model.checkpoint import load_lance

            weights = load_lance(ckpt / "model", device=self.device).model.state_dict()
            self.base.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["ema"] is not None:
            self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        positions = state["positions"]
        if len(positions) != self.world:
            raise RecipeError(f"{ckpt} was written by {len(positions)} process(es); resume it with as many, not {self.world}")
        position = json.loads(positions[self.rank])
        self.step, self.samples_seen = state["step"], position["samples"]
        self.data.load_state_dict(position["data"])
        log.info("resumed from %s at step %d", ckpt, self.step)

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()


def _save_weights_only(model, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def recipe_main(config_path: str | None, overrides: list[str], resume: bool = False) -> dict:
    cfg = load_recipe(SFTConfig, config_path, overrides)
    recipe = SFTRecipe(cfg, resume=resume)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()
