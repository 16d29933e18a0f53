"""The SFT recipe: flow-matching MSE on generation data and cross-entropy on understanding data, LoRA or full.

    lance-rl sft --config recipes/quickstart/sft.yaml [key=value ...] [--resume]

One class, read top to bottom: `setup()` builds the policy (policy.py decides what trains and its precision), the
optimizer and the data, `train()` is the loop, `save_checkpoint()` writes everything a resume needs. Losses follow
the release (spec 5.2): token means of each loss, total `ce_weight * CE + mse_weight * MSE`, timesteps
`shift(sigmoid(N(0, 1)))`, condition tokens at t = 0 and excluded. Settings: `lance_rl/sft_config.py`.

Data-parallel under `train.strategy` (ddp, fsdp2, zero2, zero3; lance_rl/distributed.py wraps, steps and saves the
model), one process per GPU from torchrun or `accelerate launch`, or CPU processes with gloo.

The global batch: a step trains on world * accumulate packs, one from each pack slot. Every slot has its own stream
of samples (its own shuffle of the data), and process r owns slots r * accumulate ... r * accumulate + accumulate - 1,
so N processes with accumulate A train on exactly the packs one process with accumulate N * A trains on. The step's
loss is the mean over those packs of each pack's loss (the release's token means within a pack): each process
back-propagates its pack losses divided by accumulate and the engine averages gradients over processes.

Determinism: every random choice of a sample (dropout, timestep, VAE posterior noise) is seeded from the run seed and
the sample's global index, and the flow noise of a pack from the run seed, the step and the slot, so a resumed run
draws exactly what an uninterrupted run would have drawn, with any split of the slots over processes.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

from lance_rl.config import load_recipe, to_dict
from lance_rl.distributed import barrier, gather_objects, sum_over_processes
from lance_rl.sft_config import DataSection, SFTConfig, TrainSection, check_before_loading
from lance_rl.trainer import (
    MetricsLog,
    read_safetensors,
    read_trainer_state,
    resolve_precision,
    resume_latest,
    run_recipe,
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


# ------------------------------------------------------------------------------------------------ pack slots
class PackStream:
    """The packs of one slot of the global batch: its own shuffle of the data, its own sample indices (every
    `slots`-th global index from `slot`), and a sample that did not fit the previous pack carried to the next."""

    def __init__(self, slot: int, slots: int, cfg: SFTConfig, policy, device):
        from lance_rl.data.datasets import MixedDataset, open_dataset

        self.slot, self.slots, self.cfg, self.policy, self.device = slot, slots, cfg, policy, device
        seed = cfg.train.seed + 1_009 * slot
        sets = [open_dataset(d.path, d.type, seed=seed + i) for i, d in enumerate(cfg.data.datasets)]
        self.data = MixedDataset(sets, [d.weight for d in cfg.data.datasets], seed=seed)
        self.resolutions = [d.resolution for d in cfg.data.datasets]
        self.samples_seen = 0
        self._carry = None  # (sample, data state before it, samples_seen before it) that did not fit the last pack

    def _next_sample(self):
        state = self.data.state_dict()
        example, which = self.data.next_with_source()
        index = self.samples_seen * self.slots + self.slot  # global sample index: distinct per slot
        sample = make_sample(example, index, self.policy.tokenizer, self.policy.codec, self.cfg.data, self.cfg.train,
                             self.resolutions[which], self.device)  # fmt: skip
        self.samples_seen += 1
        return sample, state, self.samples_seen - 1

    def next_pack(self):
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
            (plan, sample_media), _, _ = item
            if plans and tokens + len(plan) > budget:
                self._carry = item
                break
            plans.append(plan)
            media.append(sample_media)
            tokens += len(plan)
            if tokens >= budget:
                break
        c = self.policy.model.config
        packed = pack(plans, media, c.tokens_per_second, c.max_latent_size, latent_channels=c.latent_channels)
        return packed.to(self.device), tokens

    def state_dict(self) -> dict:
        if self._carry is not None:
            return {"data": self._carry[1], "samples": self._carry[2]}
        return {"data": self.data.state_dict(), "samples": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state["data"])
        self.samples_seen, self._carry = state["samples"], None


# ------------------------------------------------------------------------------------------------ the trainer
class SFTRecipe:
    def __init__(self, cfg: SFTConfig, resume: bool = False):
        check_before_loading(cfg)
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.output_dir)
        self.step = 0
        self.metrics = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from lance_rl.distributed import build_engine, init_processes
        from lance_rl.policy import EMA, PolicySpec, build_policy

        c, t = self.cfg, self.cfg.train
        self.rank, self.world, self.device = init_processes(t.strategy, t.device)
        self.main = self.rank == 0
        torch.manual_seed(t.seed)
        self.precision = resolve_precision(t.precision, self.device)
        spec = PolicySpec(c.model.checkpoint, c.model.vit_dir, c.model.vae, c.trains, c.lora if c.lora.enabled else None,
                          self.precision, freeze_embeddings=t.freeze_embeddings, device=str(self.device))  # fmt: skip
        self.policy = build_policy(spec)  # first: LoRA and freezing decide what the optimizer gets
        self.policy.model.attn_backend = c.model.attn_backend
        self.policy.model.language_model.model.gradient_checkpointing = c.model.gradient_checkpointing
        self.engine = build_engine(t.strategy, self.policy, c.optim, t.steps, t.accumulate, self.device)
        self.scheduler = self.engine.scheduler
        self.ema = EMA(self.engine.local_trainable(), t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        self.slots = self.world * t.accumulate
        self.streams = [PackStream(self.rank * t.accumulate + k, self.slots, c, self.policy, self.device)
                        for k in range(t.accumulate)]  # fmt: skip
        count = sum(getattr(p, "ds_numel", p.numel()) for p in self.policy.trainable.values())  # ZeRO-3: p is empty
        log.info("training %s parameters (%s, %s, %s on %d process(es))", f"{count:,}", c.trains, self.precision,
                 t.strategy, self.world)  # fmt: skip
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(c), indent=2) + "\n")
        barrier()
        if self.resume:
            resume_latest(self.out, self._load)
        self.metrics = MetricsLog(self.out, "step", t.steps, c.logging, to_dict(c),
                                  resume_at=self.step if self.resume else None, enabled=self.main)  # fmt: skip

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        from tqdm import tqdm

        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, desc="sft", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty() or not self.main)  # fmt: skip  # logs carry the progress otherwise
        self.engine.module.train()
        last = {}
        while self.step < t.steps:
            started = time.perf_counter()
            self.engine.zero_grad()
            totals = {"loss": 0.0, "mse": 0.0, "ce": 0.0, "tokens": 0}
            for micro, stream in enumerate(self.streams):
                batch, tokens = stream.next_pack()
                self.engine.check_pack(batch)
                noise_gen = torch.Generator().manual_seed(t.seed * 7_919 + self.step * self.slots + stream.slot)
                noise = torch.randn(batch.vae_latents.shape, generator=noise_gen).to(self.device)
                with self.policy.autocast():
                    out = self.engine.module(batch, noise=noise)
                loss, parts = flow_loss(out, t.ce_weight, t.mse_weight)
                finite = sum_over_processes([float(torch.isfinite(loss.detach()))], self.device)[0]
                if finite < self.world:  # any process saw a non-finite loss: every process skips the update
                    log.warning("step %d: non-finite loss %s, skipping the update", self.step, float(loss))
                    self.engine.discard_gradients(started=micro > 0)
                    totals["skipped"] = 1
                    break
                self.engine.backward(loss, last=micro == t.accumulate - 1)
                totals["loss"] += float(loss.detach())
                totals["mse"] += parts["mse"]
                totals["ce"] += parts["ce"]
                totals["tokens"] += tokens
            grad_norm = 0.0
            if "skipped" not in totals:
                grad_norm = self.engine.step()
                if self.ema is not None:
                    self.ema.step(self.engine.local_trainable())
            self.scheduler.step()
            self.step += 1
            last = self._row(totals, grad_norm, time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if self.step % self.cfg.logging.every == 0 or self.step == t.steps:
                self.metrics.write(last)
                self.metrics.progress(last, {"loss": "loss", "mse": "mse", "ce": "ce", "tok/s": "tokens_per_s"})
            if self.step % self.cfg.checkpoint.every == 0 or self.step == t.steps:
                self.save_checkpoint()
        bar.close()
        return last

    def _row(self, totals: dict, grad_norm: float, elapsed: float) -> dict:
        """The step's metrics over the whole global batch: losses are means over its packs, counts are sums."""
        skipped = sum(sum(s.data.skipped.values()) for s in self.streams)
        seen = sum(s.samples_seen for s in self.streams)
        loss, mse, ce, tokens, samples, rows = sum_over_processes(
            [totals["loss"], totals["mse"], totals["ce"], totals["tokens"], seen, skipped], self.device)
        row = {"step": self.step, "loss": loss / self.slots, "mse": mse / self.slots, "ce": ce / self.slots,
               "tokens": int(tokens), "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": tokens / elapsed, "samples_seen": int(samples), "skipped_rows": int(rows)}  # fmt: skip
        if "skipped" in totals:
            row["skipped"] = 1
        return row

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/step_NNNNNNN/ with trainer_state.pt and the model: in the official layout (ddp; or the PEFT
        adapter), or every process's shards under sharded/ (fsdp2, zero2, zero3; `lance-rl export` gathers them).
        Written to a temporary directory and renamed, then `latest` is switched, so a crash never leaves a broken
        latest checkpoint."""
        from lance_rl.checkpointing import commit_checkpoint, prepare_checkpoint

        positions = [p for group in gather_objects([json.dumps(s.state_dict()) for s in self.streams]) for p in group]
        name = f"step_{self.step:07d}"
        tmp = prepare_checkpoint(self.out, name) if self.main else self.out / "checkpoints" / f".tmp_{name}"
        barrier()
        if self.engine.sharded:
            self.engine.save(tmp / "sharded", self.ema)
        elif self.main:
            self._save_whole(tmp)
        if self.main:
            torch.save(self._trainer_state(positions), tmp / "trainer_state.pt")
        barrier()
        if self.main:
            commit_checkpoint(tmp, self.out / "checkpoints" / name, self.out, self.cfg.checkpoint.keep_last)
        barrier()
        return self.out / "checkpoints" / name

    def _save_whole(self, tmp: Path) -> None:
        from lance_rl.model.checkpoint import save_lance

        if self.policy.is_lora:
            self.policy.module.save_pretrained(str(tmp / "adapter"))
            (tmp / "adapter" / "base_checkpoint.txt").write_text(str(Path(self.cfg.model.checkpoint).resolve()) + "\n")
            return
        save_lance(self.policy.model, self.policy.tokenizer, tmp / "model")
        if self.ema is not None:
            with self.ema.swapped_in(self.policy.trainable):
                _save_weights_only(self.policy.model, tmp / "model" / "ema.safetensors")

    def _trainer_state(self, positions: list[str]) -> dict:
        """Everything but the model. The sharded strategies keep AdamW and the EMA shards with their model shards, and
        name the base checkpoint their frozen weights come from (export reads it)."""
        sharded = self.engine.sharded
        m = self.cfg.model
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "positions": positions,
                 "strategy": self.cfg.train.strategy, "world": self.world}  # fmt: skip  # positions: one per slot
        if sharded:
            base = {"checkpoint": str(Path(m.checkpoint).resolve()), "vit_dir": m.vit_dir, "precision": self.precision}
            state.update(base=base, ema_step=self.ema.averager.optimization_step if self.ema else None)
        else:
            state.update(optimizer=self.engine.optimizer.state_dict(), ema=self.ema.state_dict() if self.ema else None)
        return state

    def _load(self, ckpt: Path) -> None:
        """Read every file first (a corrupt one raises before anything changes), then apply. Only the trainable
        weights are read back: the frozen ones are the base checkpoint's."""
        from lance_rl.config import RecipeError

        state = read_trainer_state(ckpt / "trainer_state.pt")
        positions, strategy = state["positions"], state.get("strategy", "ddp")
        if strategy != self.cfg.train.strategy:
            raise RecipeError(f"{ckpt} was written with train.strategy={strategy}; resume it with the same strategy")
        if len(positions) != self.slots:
            raise RecipeError(f"{ckpt} was written for {len(positions)} pack(s) per step (processes x "
                              f"train.accumulate); resume it with as many, not {self.world} x "
                              f"{self.cfg.train.accumulate}")  # fmt: skip
        if self.engine.sharded:
            if strategy != "fsdp2" and state["world"] != self.world:  # DeepSpeed's partitions are per process
                raise RecipeError(f"{ckpt} was written by {state['world']} process(es); {strategy} resumes it with as "
                                  f"many, not {self.world}")  # fmt: skip
            self.engine.load(ckpt / "sharded", self.ema)
            if self.ema is not None and state.get("ema_step") is not None:
                self.ema.averager.optimization_step = int(state["ema_step"])
        else:
            self._load_whole(ckpt, state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        for stream in self.streams:
            stream.load_state_dict(json.loads(positions[stream.slot]))
        log.info("resumed from %s at step %d", ckpt, self.step)

    def _load_whole(self, ckpt: Path, state: dict) -> None:
        from lance_rl.policy import load_trainable_state

        trainable = self.policy.trainable
        if self.policy.is_lora:
            from peft import set_peft_model_state_dict

            weights = read_safetensors(ckpt / "adapter" / "adapter_model.safetensors")
            set_peft_model_state_dict(self.policy.module, weights)
        else:
            weights = read_safetensors(ckpt / "model" / "model.safetensors", keys=list(trainable))
            load_trainable_state(trainable, weights)
        self.engine.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])

    def cleanup(self) -> None:
        from lance_rl.distributed import leave_processes

        if self.metrics is not None:
            self.metrics.close()
        leave_processes()


def _save_weights_only(model, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def recipe_main(config_path: str | None, overrides: list[str], resume: bool = False) -> dict:
    return run_recipe(SFTRecipe(load_recipe(SFTConfig, config_path, overrides), resume=resume))
