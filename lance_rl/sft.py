"""The SFT recipe: flow-matching MSE on generation data and cross-entropy on understanding data, LoRA or full.

    lance-rl sft --config recipes/quickstart/sft.yaml [key=value ...] [--resume]

One class, read top to bottom: `setup()` builds the policy (policy.py decides what trains and its precision), the
optimizer and the data, `train()` is the loop, `save_checkpoint()` writes everything a resume needs. Losses follow
the release (spec 5.2): token means of each loss, total `ce_weight * CE + mse_weight * MSE`, timesteps
`shift(sigmoid(N(0, 1)))`, condition tokens at t = 0 and excluded. Settings: `lance_rl/sft_config.py`.

Data-parallel through accelerate (DDP; `accelerate launch` on GPUs, or torchrun with gloo on CPUs).

Determinism: every random choice of a sample (dropout, timestep, VAE posterior noise) is seeded from the run seed and
the sample's global index, and the flow noise of a step from the run seed and the step, so a resumed run draws exactly
what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import torch

from lance_rl.config import load_recipe, to_dict
from lance_rl.sft_config import DataSection, SFTConfig, TrainSection, check_before_loading
from lance_rl.trainer import (
    MetricsLog,
    build_optimizer,
    clip_gradients,
    read_safetensors,
    read_trainer_state,
    resolve_precision,
    resume_latest,
    select_device,
)

log = logging.getLogger("lance_rl.sft")


# ------------------------------------------------------------------------------------------------ samples
def _rng_for(seed: int, index: int) -> tuple[random.Random, torch.Generator]:
    mixed = (seed * 1_000_003 + index) % (2**63)
    return random.Random(mixed), torch.Generator().manual_seed(mixed)


def make_sample(example, index: int, tokenizer, codec, data: DataSection, train: TrainSection, resolution, device):
    """One training sample (plan, media) from a decoded example, with the release's preprocessing and dropout."""
    from lance_rl.model import media
    from lance_rl.model.packing import SampleMedia
    from lance_rl.model.schedule import shift_time
    from lance_rl.model.sequence import build_plan, generation_plan, noise_block, understanding_plan
    from lance_rl.model.tasks import is_edit, is_understanding
    from lance_rl.model.tokenizer import system_prompt
    from lance_rl.model.vision import patchify_video

    rng, gen = _rng_for(train.seed, index)
    if is_understanding(example.task):
        patches, vit_grid = patchify_video(media.vit_tensor(example.source, resolution))
        t, h, w = vit_grid
        plan = understanding_plan(tokenizer, example.task, (t, h // 2, w // 2), example.text, example.answer,
                                  example.instruction)  # fmt: skip
        return plan, SampleMedia(vit_patches=[patches], vit_grids=[vit_grid])

    caption = "" if rng.random() < data.text_dropout else example.text
    target = codec.encode(media.vae_tensor(example.target, resolution).to(device), generator=gen).cpu()
    grid = tuple(target.shape[:3])
    t = float(shift_time(torch.sigmoid(torch.randn((), generator=gen)), train.timestep_shift))
    if not is_edit(example.task):
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
        check_before_loading(cfg)
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.output_dir)
        self.step = 0
        self.samples_seen = 0
        self.metrics = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        from lance_rl.policy import EMA, PolicySpec, build_policy

        c, t = self.cfg, self.cfg.train
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # CPU processes started by torchrun: accelerate sets up NCCL or MPI itself, but not plain gloo.
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("gloo")
        # One process on a CPU; under `accelerate launch` one per GPU with DDP. Unused parameters are expected: a
        # pack without answers gives the last layer's understanding MLP no gradient.
        self.accelerator = Accelerator(cpu=t.device == "cpu" or not torch.cuda.is_available(),
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])  # fmt: skip
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        torch.manual_seed(t.seed)
        self.device = self._device()
        self.precision = resolve_precision(t.precision, self.device)
        spec = PolicySpec(c.model.checkpoint, c.model.vit_dir, c.model.vae, c.trains, c.lora if c.lora.enabled else None,
                          self.precision, freeze_embeddings=t.freeze_embeddings, device=str(self.device))  # fmt: skip
        self.policy = build_policy(spec)  # first: LoRA and freezing decide what the optimizer gets
        self.policy.model.attn_backend = c.model.attn_backend
        self.policy.model.language_model.model.gradient_checkpointing = c.model.gradient_checkpointing
        self.trainable = self.policy.trainable
        self.model = self.accelerator.prepare_model(self.policy.module)  # DDP under accelerate launch; as is alone
        self.ema = EMA(self.trainable, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        optimizer, self.scheduler = build_optimizer(list(self.trainable.values()), c.optim, t.steps)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self._setup_data()
        log.info("training %s parameters (%s, %s)", f"{sum(p.numel() for p in self.trainable.values()):,}", c.trains,
                 self.precision)  # fmt: skip
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(c), indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        if self.resume:
            resume_latest(self.out, self._load)
        self.metrics = MetricsLog(self.out, "step", t.steps, c.logging, to_dict(c),
                                  resume_at=self.step if self.resume else None, enabled=self.main)  # fmt: skip

    def _device(self) -> torch.device:
        d = self.cfg.train.device
        if d not in ("auto", "cpu"):
            return select_device(d)
        device = self.accelerator.device
        return torch.device("cpu") if device.type == "cpu" else device  # multi-CPU runs report "cpu:<rank>"

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
        sample = make_sample(example, index, self.policy.tokenizer, self.policy.codec, self.cfg.data, self.cfg.train,
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
        c = self.policy.model.config
        return pack(plans, media, c.tokens_per_second, c.max_latent_size).to(self.device), tokens

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        from tqdm import tqdm

        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, desc="sft", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())  # fmt: skip  # logs carry the progress when not on a terminal
        self.model.train()
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
                with self.policy.autocast():
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
                grad_norm = self._clip()
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.step(self.trainable)
            self.scheduler.step()
            self.step += 1
            elapsed = time.perf_counter() - started
            last = {"step": self.step, **totals, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": totals["tokens"] / elapsed, "samples_seen": self.samples_seen,
                    "skipped_rows": sum(self.data.skipped.values())}  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if self.step % self.cfg.logging.every == 0 or self.step == t.steps:
                self.metrics.write(last)  # process 0 logs its own pack's numbers
                self.metrics.progress(last, {"loss": "loss", "mse": "mse", "ce": "ce", "tok/s": "tokens_per_s"})
            if self.step % self.cfg.checkpoint.every == 0 or self.step == t.steps:
                self.save_checkpoint()
        bar.close()
        return last

    def _clip(self) -> float:
        max_norm = self.cfg.optim.max_grad_norm
        if self.world > 1:  # the accelerator reduces the norm over processes
            return float(self.accelerator.clip_grad_norm_(list(self.trainable.values()), max_norm or float("inf")))
        return clip_gradients(list(self.trainable.values()), max_norm)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/step_NNNNNNN/ with the model (official layout, or the PEFT adapter) and trainer_state.pt;
        written to a temporary directory and renamed, then `latest` is switched, so a crash never leaves a broken
        latest checkpoint."""
        from accelerate.utils import gather_object

        from lance_rl.checkpointing import new_checkpoint
        from lance_rl.model.checkpoint import save_lance

        # Every process reports its data position (each reads its own shuffle); process 0 writes everything.
        data_state = self._carry[1] if self._carry is not None else self.data.state_dict()
        samples = self._carry[2] if self._carry is not None else self.samples_seen
        positions = gather_object([json.dumps({"data": data_state, "samples": samples})])
        name = f"step_{self.step:07d}"
        if self.main:
            base = str(Path(self.cfg.model.checkpoint).resolve()) + "\n"
            with new_checkpoint(self.out, name, self.cfg.checkpoint.keep_last) as tmp:
                if self.policy.is_lora:
                    self.policy.module.save_pretrained(str(tmp / "adapter"))
                    (tmp / "adapter" / "base_checkpoint.txt").write_text(base)
                else:
                    save_lance(self.policy.model, self.policy.tokenizer, tmp / "model")
                    if self.ema is not None:
                        with self.ema.swapped_in(self.trainable):
                            _save_weights_only(self.policy.model, tmp / "model" / "ema.safetensors")
                state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                         "positions": list(positions)}  # fmt: skip  # one JSON string per process
                torch.save(state, tmp / "trainer_state.pt")
        self.accelerator.wait_for_everyone()
        return self.out / "checkpoints" / name

    def _load(self, ckpt: Path) -> None:
        """Read every file first (a corrupt one raises before anything changes), then apply. Only the trainable
        weights are read back: the frozen ones are the base checkpoint's."""
        from lance_rl.config import RecipeError
        from lance_rl.policy import load_trainable_state

        state = read_trainer_state(ckpt / "trainer_state.pt")
        if self.policy.is_lora:
            weights = read_safetensors(ckpt / "adapter" / "adapter_model.safetensors")
        else:
            weights = read_safetensors(ckpt / "model" / "model.safetensors", keys=list(self.trainable))
        positions = state["positions"]
        if len(positions) != self.world:
            raise RecipeError(f"{ckpt} was written by {len(positions)} process(es); resume it with as many, not {self.world}")
        if self.policy.is_lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy.module, weights)
        else:
            load_trainable_state(self.trainable, weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        position = json.loads(positions[self.rank])
        self.step, self.samples_seen = state["step"], position["samples"]
        self.data.load_state_dict(position["data"])
        log.info("resumed from %s at step %d", ckpt, self.step)

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _save_weights_only(model, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def recipe_main(config_path: str | None, overrides: list[str], resume: bool = False) -> dict:
    cfg = load_recipe(SFTConfig, config_path, overrides)
    recipe = SFTRecipe(cfg, resume=resume)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
