"""The flow-GRPO recipe for Lance, readable top to bottom.

    lance-rl rl --config recipes/quickstart/rl.yaml [key=value ...] [--resume]

Each update: pick prompts -> roll out a group per prompt with the SDE sampler (Ray workers, or the trainer itself)
-> score the decoded media (scoring of one batch overlaps the next worker's sampling) -> group advantages -> for
every recorded step, recompute the log-probability of the stored transition under the current policy with the same
`step` function, clipped ratio loss (+ KL to the reference) -> optimizer step -> send the new trainable weights to the
workers -> evaluate on held-out prompts every few updates -> checkpoint.

Determinism: the prompts, seeds and SDE window of update k come from (seed, k), so a resumed run repeats exactly what
an uninterrupted run would have done next.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
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
from lance_rl.grpo import clipped_policy_loss, gaussian_kl, group_advantages

log = logging.getLogger("lance_rl.rl")


# ------------------------------------------------------------------------------------------------ the recipe
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


@dataclass
class SamplerSection:
    """Rollout sampling. Flow-GRPO's values: 10 steps, SDE noise level 0.7 (CPS 0.8), CFG 4.5 on SD3."""

    num_steps: int = 10
    shift: float = 3.0
    kind: Literal["sde", "cps"] = "sde"
    noise_level: float = 0.7
    window_size: int = 0  # 0: every step but the last is stochastic and trained; k: a random window of k steps
    window_range: tuple[int, int] | None = None  # where the window may start and end (default: all but the last step)
    cfg_scale: float = 4.0  # 1 gives the CFG-free recipe (RL as CFG distillation)
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    same_noise_in_group: bool = False  # every group member starts from the same noise (Flow-GRPO's same_latent)


@dataclass
class AlgorithmSection:
    """GRPO on denoising steps (spec: flow-grpo-and-peers.md 1.2-1.4)."""

    group_size: int = 8  # samples per prompt; advantages compare within a group
    prompts_per_update: int = 8
    inner_epochs: int = 1  # passes over each rollout batch
    clip_range: float = 1e-4  # Flow-GRPO's default
    clip_range_high: float | None = None  # asymmetric clipping (GRPO-Guard); None = symmetric
    adv_clip_max: float = 5.0
    global_std: bool = True  # divide by the batch's reward std (Flow-GRPO default) instead of the group's
    beta: float = 0.0  # KL weight to the reference policy; Flow-GRPO uses 0.004-0.04 for long runs
    minibatches: int = 1  # optimizer steps per pass over a rollout batch (the groups are split evenly); with more
    # than one, later minibatches see ratios away from 1 and the clip range starts to act
    skip_zero_std: bool = True  # groups without reward spread carry no signal: skip their update
    reuse_prefix: bool = True  # reuse the rollout-time prefix cache in the update (exact when only the generation
    # expert trains and the prompt has no VAE condition block; edit tasks recompute it with gradients)

    def __post_init__(self):
        if self.group_size < 2:
            raise RecipeError("algorithm.group_size must be at least 2: advantages compare samples within a group")


@dataclass
class RolloutSection:
    num_workers: int = 2  # Ray actors sampling in parallel; 0 = colocated (the trainer samples itself)
    num_cpus_per_worker: float = 0.5  # fractional, so Ray can still schedule other tasks on a small machine
    num_gpus_per_worker: float = 0.0
    ray_address: str | None = None  # join a cluster; None starts Ray locally


@dataclass
class EvalSection:
    every: int = 5  # updates between evaluations (and one before training and one at the end)
    num_prompts: int = 24
    samples_per_prompt: int = 2
    num_steps: int = 10
    seed: int = 1234  # fixed seeds: every evaluation samples from the same noise
    gold_rewards: dict[str, Any] = field(default_factory=dict)  # scored at evaluation only, never trained on


@dataclass
class TrainSection:
    updates: int = 20
    policy: Literal["lora", "generation", "both"] = "lora"  # LoRA (see lora.*), full generation expert, or both experts
    ema_decay: float = 0.0  # EMA of the trainable weights, used for evaluation and export
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"


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
        if self.train.policy == "lora" and not self.lora.enabled:
            raise RecipeError("train.policy is 'lora' but lora.enabled is false")
        n = self.sampler.num_steps
        first, stop = self.sampler.window_range or (0, n - 1)
        if not 0 <= first < stop <= n - 1 or self.sampler.window_size > stop - first:
            raise RecipeError(
                f"sampler.window_range {(first, stop)} with window_size {self.sampler.window_size} does not fit "
                f"{n} steps (0 <= first < stop <= num_steps - 1; the final step is never stochastic)"
            )

    def validate_paths(self) -> None:
        """Inputs must exist before any work starts (kept apart so recipes for other machines still validate)."""
        if not (Path(self.model.checkpoint) / "llm_config.json").is_file():
            raise RecipeError(f"model.checkpoint: {self.model.checkpoint} is not a Lance checkpoint (no llm_config.json)")
        for name in ("train", "eval"):
            source = getattr(self.prompts, name)
            if source not in ("shapes", "shapes-heldout") and not Path(source).is_file():
                raise RecipeError(f"prompts.{name}: {source} does not exist")


def load_prompts(source: str, seed: int = 0) -> list[dict]:
    """Prompt records {"prompt", optional "source"} from a named set or a file."""
    if source in ("shapes", "shapes-heldout"):
        from lance_rl.data.shapes import split_prompts

        train, heldout = split_prompts(seed)
        return [{"prompt": p.caption} for p in (train if source == "shapes" else heldout)]
    path = Path(source)
    if not path.is_file():
        raise RecipeError(f"prompt file {source} does not exist")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for i, row in enumerate(rows):
            if "prompt" not in row:
                raise RecipeError(f"{path}:{i + 1}: every line needs a 'prompt'")
            if row.get("source"):
                row["source"] = str((path.parent / row["source"]).resolve())
        return rows
    return [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ the trainer
class RLRecipe:
    def __init__(self, cfg: RLConfig, resume: bool = False):
        cfg.validate_paths()
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.output_dir)
        self.update = 0

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        torch.manual_seed(self.cfg.train.seed)
        d = self.cfg.train.device
        self.device = torch.device("cuda" if d == "auto" and torch.cuda.is_available() else ("cpu" if d == "auto" else d))
        self._setup_model()  # first: the policy decides what the optimizer and the workers get
        self._setup_optimizer()
        self._setup_data()
        self._setup_rewards()
        self._setup_workers()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2) + "\n")
        if self.resume:
            self._load_latest()
        self.rollout.set_weights(self._weights_for_workers())
        self.metrics = (self.out / "metrics.jsonl").open("a")

    def _policy_spec(self):
        from lance_rl.rollout import PolicySpec

        m, t = self.cfg.model, self.cfg.train
        lora = {k: v for k, v in to_dict(self.cfg.lora).items()} if t.policy == "lora" else None
        return PolicySpec(m.checkpoint, m.vit_dir, m.vae, lora, t.policy, device=str(self.device))

    def _setup_model(self) -> None:
        from lance_rl.rollout import build_policy

        self.policy, self.model, self.tokenizer, self.codec = build_policy(self._policy_spec())
        self.model.attn_backend = self.cfg.model.attn_backend
        self.trainable = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        self.reference = None
        if self.cfg.algorithm.beta > 0 and self.cfg.train.policy != "lora":
            import copy

            # Full training needs a frozen copy for the KL; LoRA gets its reference by disabling the adapter.
            self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.ema = {n: p.detach().clone() for n, p in self.trainable.items()} if self.cfg.train.ema_decay > 0 else None
        log.info("policy: %s, %s trainable parameters", self.cfg.train.policy,
                 f"{sum(p.numel() for p in self.trainable.values()):,}")  # fmt: skip

    def _setup_optimizer(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)  # fmt: skip

    def _setup_data(self) -> None:
        p = self.cfg.prompts
        self.train_prompts = load_prompts(p.train)
        self.eval_prompts = load_prompts(p.eval)[: self.cfg.eval.num_prompts]
        if not self.train_prompts:
            raise RecipeError(f"prompts.train {p.train!r} holds no prompts")
        self.grid = self._grid()

    def _grid(self) -> tuple[int, int, int]:
        p = self.cfg.prompts
        frames = p.num_frames if p.task in ("t2v", "i2v") else 1
        return self.codec.latent_grid(frames, p.height, p.width)

    def _setup_rewards(self) -> None:
        from lance_rl.rewards.mix import build_mix
        from lance_rl.rewards.runner import RewardRunner

        self.reward_mix = build_mix(self.cfg.rewards)
        self.scorer = RewardRunner(self.reward_mix, max_workers=4)
        self.gold = build_mix(self.cfg.eval.gold_rewards) if self.cfg.eval.gold_rewards else None

    def _setup_workers(self) -> None:
        from lance_rl.rollout import LocalRollout, RayRollout

        r = self.cfg.rollout
        if r.num_workers == 0:
            self.rollout = LocalRollout(self.model, self.tokenizer, self.codec)
        else:
            self.rollout = RayRollout(self._policy_spec(), r.num_workers, r.num_cpus_per_worker, r.num_gpus_per_worker,
                                      r.ray_address)  # fmt: skip

    def _weights_for_workers(self) -> dict:
        from lance_rl.rollout import trainable_state

        return trainable_state(self.policy)

    # ---------------------------------------------------------------- one update, stage by stage
    def _plan_update(self, k: int) -> tuple[list[dict], dict]:
        """The prompts, seeds and sampler settings of update k, derived from (seed, k) only."""
        a, s, p = self.cfg.algorithm, self.cfg.sampler, self.cfg.prompts
        rng = random.Random(self.cfg.train.seed * 1_000_003 + k)
        chosen = [rng.randrange(len(self.train_prompts)) for _ in range(a.prompts_per_update)]
        requests = []
        for i, index in enumerate(chosen):
            base = rng.randrange(2**31)
            seeds = [base + 7919 * j for j in range(a.group_size)]
            record = self.train_prompts[index]
            requests.append({"prompt_index": index, "prompt": record["prompt"], "source": record.get("source"),
                             "task": p.task, "grid": list(self.grid), "seeds": seeds,
                             "noise_seeds": [base] * a.group_size if s.same_noise_in_group else None,
                             "height": p.height, "width": p.width})  # fmt: skip
        first, stop = s.window_range or (0, s.num_steps - 1)
        window = (first, stop)
        if s.window_size:
            start = rng.randint(first, stop - s.window_size)
            window = (start, start + s.window_size)
        sampler = {"num_steps": s.num_steps, "shift": s.shift, "kind": s.kind, "noise_level": s.noise_level,
                   "sde_window": window,
                   "cfg": {"scale": s.cfg_scale, "interval": tuple(s.cfg_interval)}}  # fmt: skip
        return requests, sampler

    def _score(self, results: list[dict], requests: list[dict]):
        """Submit each group's media to the reward runner as soon as it is there; returns futures in order."""
        futures = []
        for res, req in zip(results, requests):
            media = res["media"]
            batch = {"prompts": [req["prompt"]] * len(media)}
            if media.shape[1] == 1:
                batch["images"] = [m[0] for m in media]
            else:
                batch["videos"] = list(media)
            futures.append(self.scorer.submit(**batch))
        return futures

    def _loss_for_group(self, res: dict, req: dict, adv: torch.Tensor, prefix_cache: dict, stats: dict) -> None:
        """Backward through every recorded step of one group; accumulates gradients (no optimizer step here)."""
        from lance_rl.rollout import make_request
        from lance_rl.model.sampling import CFGConfig, encode_prefix, step, velocity

        s, a = self.cfg.sampler, self.cfg.algorithm
        cfg = CFGConfig(scale=s.cfg_scale, interval=tuple(s.cfg_interval))
        g = len(adv)
        reuse = a.reuse_prefix and req["task"] not in ("image_edit", "video_edit") and self.cfg.train.policy != "both"
        key = (req["prompt_index"], req.get("source"))
        if reuse and key in prefix_cache:
            prefix = prefix_cache[key]
        else:
            gen_request = make_request(self.model, self.tokenizer, self.codec, dict(req))
            prefix = encode_prefix(self.model, self.tokenizer, [gen_request], cfg, grad=not reuse)
            if reuse:
                prefix_cache[key] = prefix
        prefix = prefix.repeat(g)
        # Ray hands back read-only arrays: copy them into tensors.
        x_t = torch.tensor(res["x_t"], device=self.device)  # [G, S, N, C]
        x_next = torch.tensor(res["x_next"], device=self.device)
        old = torch.tensor(res["log_probs"], device=self.device)  # [G, S]
        times = torch.tensor(res["timesteps"], device=self.device)
        steps = res["steps"]
        for j, i in enumerate(steps):
            t, t_next = times[i], times[i + 1]
            v = velocity(self.model, x_t[:, j], t, prefix, cfg)
            out = step(x_t[:, j], v, t, t_next, s.kind, s.noise_level, x_next=x_next[:, j], moving=prefix.moving)
            pl = clipped_policy_loss(out.log_prob, old[:, j], adv, a.clip_range, a.clip_range_high)
            loss = pl.loss
            kl = torch.zeros(())
            if a.beta > 0:
                with torch.no_grad():
                    v_ref = self._reference_velocity(x_t[:, j], t, prefix, cfg)
                    ref = step(x_t[:, j], v_ref, t, t_next, s.kind, s.noise_level, x_next=x_next[:, j], moving=prefix.moving)
                kl = gaussian_kl(out.prev_sample_mean, ref.prev_sample_mean, out.std_dev_t).mean()
                loss = loss + a.beta * kl
            # A prefix built with gradients (edit tasks) is shared by every step: keep its graph until the last one.
            (loss / stats["num_terms"]).backward(retain_graph=not reuse and j < len(steps) - 1)
            stats["policy_loss"].append(float(pl.loss.detach()))
            stats["kl"].append(float(kl))
            stats["approx_kl"].append(float(pl.approx_kl))
            stats["clip_frac"].append(float(pl.clip_frac))
            stats["ratio"].append(pl.ratio.cpu())
            stats["ratio_by_step"].setdefault(i, []).append(pl.ratio.cpu())

    def _reference_velocity(self, x_t, t, prefix, cfg):
        from lance_rl.model.sampling import velocity

        if self.reference is not None:
            return velocity(self.reference, x_t, t, prefix, cfg)
        with self.policy.disable_adapter():  # LoRA: the base model is the reference, no second copy
            return velocity(self.model, x_t, t, prefix, cfg)

    def train(self) -> dict:
        from tqdm import tqdm

        t, a = self.cfg.train, self.cfg.algorithm
        if self.update == 0 and self.cfg.eval.every > 0:
            self._log({"update": 0, **self.evaluate()})  # the starting point of every eval curve
        bar = tqdm(total=t.updates, initial=self.update, desc="rl", unit="update", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())  # fmt: skip  # logs carry the progress when not on a terminal
        last: dict = {}
        while self.update < t.updates:
            timing = {}
            # 1. Prompts and seeds for this update, then roll out a group per prompt.
            requests, sampler = self._plan_update(self.update)
            started = time.perf_counter()
            results = self.rollout.rollout(requests, sampler)
            timing["rollout"] = time.perf_counter() - started

            # 2. Score (the runner works in threads; results come back in submission order).
            started = time.perf_counter()
            scored = [f.result() for f in self._score(results, requests)]
            timing["score"] = time.perf_counter() - started
            rewards = torch.tensor([np.nan if s is None else s for out in scored for s in out.scores], dtype=torch.float32)
            groups = torch.arange(len(results)).repeat_interleave(a.group_size)
            valid = ~torch.isnan(rewards)

            # 3. Group advantages (samples no reward applies to are left out).
            adv = group_advantages(torch.nan_to_num(rewards), groups, a.global_std, a.adv_clip_max)
            skip = ~valid | (adv.zero_std if a.skip_zero_std else torch.zeros_like(valid))

            # 4. Policy update: every recorded step of every group with signal, accumulated into one optimizer step.
            started = time.perf_counter()
            stats = {k: [] for k in ("policy_loss", "kl", "approx_kl", "clip_frac", "ratio")} | {"ratio_by_step": {}}
            trained_groups = [gi for gi in range(len(results)) if not bool(skip[groups == gi].all())]
            self.policy.train()
            prefix_cache: dict = {}
            grad_norm = 0.0
            for _ in range(a.inner_epochs):
                for chunk in np.array_split(np.array(trained_groups, dtype=int), a.minibatches):
                    self.optimizer.zero_grad(set_to_none=True)
                    stats["num_terms"] = max(1, len(chunk) * len(results[0]["steps"]))
                    for gi in chunk.tolist():
                        members = groups == gi
                        self._loss_for_group(results[gi], requests[gi], adv.values[members].to(self.device),
                                             prefix_cache, stats)  # fmt: skip
                    grad_norm = self._optimizer_step()
            timing["update"] = time.perf_counter() - started

            # 5. New weights to the workers.
            started = time.perf_counter()
            self.rollout.set_weights(self._weights_for_workers())
            timing["sync"] = time.perf_counter() - started

            self.update += 1
            last = self._metrics(scored, rewards, adv, skip, stats, grad_norm, timing, len(rewards))
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward/mean']:.3f}", clip=f"{last.get('clip_frac', 0):.2f}")
            # 6. Evaluate and checkpoint.
            if self.cfg.eval.every > 0 and (self.update % self.cfg.eval.every == 0 or self.update == t.updates):
                last |= self.evaluate()
            self._log(last)
            if self.update % self.cfg.checkpoint.every == 0 or self.update == t.updates:
                self.save_checkpoint()
        bar.close()
        return last

    def _optimizer_step(self) -> float:
        grads = [p.grad for p in self.trainable.values() if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.cfg.train.max_grad_norm)
        if not torch.isfinite(norm):
            log.warning("update %d: non-finite gradient norm, skipping the step", self.update)
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    self.ema[n].lerp_(p.detach(), 1 - self.cfg.train.ema_decay)
        return float(norm)

    def _metrics(self, scored, rewards, adv, skip, stats, grad_norm, timing, num_samples) -> dict:
        valid = rewards[~torch.isnan(rewards)]
        row = {"update": self.update, "reward/mean": float(valid.mean()) if len(valid) else float("nan"),
               "reward/std": float(valid.std(unbiased=False)) if len(valid) else float("nan"),
               "frac_reward_zero_std": float(adv.zero_std.float().mean()), "skipped_samples": int(skip.sum()),
               "grad_norm": grad_norm}  # fmt: skip
        for name in scored[0].details:
            values = [v for out in scored for v in out.details.get(name, []) if isinstance(v, (int, float)) and v is not None]
            if values:
                row[f"rewards/{name}/mean"] = float(np.mean(values))
                row[f"rewards/{name}/std"] = float(np.std(values))
        if stats["ratio"]:
            ratio = torch.cat(stats["ratio"])
            row |= {"policy_loss": float(np.mean(stats["policy_loss"])), "kl": float(np.mean(stats["kl"])),
                    "approx_kl": float(np.mean(stats["approx_kl"])), "clip_frac": float(np.mean(stats["clip_frac"])),
                    "ratio/mean": float(ratio.mean()), "ratio/std": float(ratio.std(unbiased=False)),
                    "ratio/max_abs_dev": float((ratio - 1).abs().max())}  # fmt: skip
            for i, rs in stats["ratio_by_step"].items():
                row[f"ratio/step_{i}/mean"] = float(torch.cat(rs).mean())
        for stage, seconds in timing.items():
            row[f"timing/{stage}"] = seconds
            row[f"samples_per_s/{stage}"] = num_samples / seconds if seconds > 0 else float("inf")
        return row

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """ODE sampling (no noise) on held-out prompts with fixed seeds, EMA weights when kept, scored by the training
        rewards and the gold rewards; writes a sample grid with scores under eval/."""
        from lance_rl.rollout import rollout_groups

        e, s = self.cfg.eval, self.cfg.sampler
        requests = [{"request_id": i, "prompt_index": i, "prompt": r["prompt"], "source": r.get("source"),
                     "task": self.cfg.prompts.task, "grid": list(self.grid),
                     "seeds": [e.seed + i * e.samples_per_prompt + j for j in range(e.samples_per_prompt)],
                     "height": self.cfg.prompts.height, "width": self.cfg.prompts.width}
                    for i, r in enumerate(self.eval_prompts)]  # fmt: skip
        sampler = {"num_steps": e.num_steps, "shift": s.shift, "kind": "ode",
                   "cfg": {"scale": s.cfg_scale, "interval": tuple(s.cfg_interval)}}  # fmt: skip
        was_training = self.policy.training
        self.policy.eval()
        with swapped_in(self.trainable, self.ema):
            results = rollout_groups(self.model, self.tokenizer, self.codec, requests, sampler)
        self.policy.train(was_training)
        prompts = [r["prompt"] for r in requests for _ in range(e.samples_per_prompt)]
        media = np.concatenate([r["media"] for r in results])
        batch = {"prompts": prompts, "images": [m[0] for m in media]} if media.shape[1] == 1 else {"prompts": prompts, "videos": list(media)}
        row: dict = {}
        for label, mix in (("eval", self.reward_mix), ("gold", self.gold)):
            if mix is None:
                continue
            out = mix(**batch)
            row[f"{label}/reward/mean"] = float(np.nanmean([np.nan if x is None else x for x in out.scores]))
            for name, values in out.details.items():
                nums = [v for v in values if isinstance(v, (int, float)) and v is not None]
                if nums:
                    row[f"{label}/{name}/mean"] = float(np.mean(nums))
            if label == "eval":
                scores = out.scores
        self._write_eval(media, prompts, scores, row)
        log.info("eval at update %d: %s", self.update, {k: round(v, 4) for k, v in row.items()})
        return row

    def _write_eval(self, media, prompts, scores, row) -> None:
        from lance_rl.curves import save_sample_grid

        folder = self.out / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        save_sample_grid(media[:, 0], [f"{s:.2f}" if s is not None else "-" for s in scores],
                         folder / f"update_{self.update:05d}.png")  # fmt: skip
        record = {"update": self.update, **row, "prompts": prompts, "scores": scores}
        (folder / f"update_{self.update:05d}.json").write_text(json.dumps(record) + "\n")

    def _log(self, row: dict) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} | {"time": time.time()}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if "reward/mean" in row:
            log.info("update %d/%d reward %.4f", row["update"], self.cfg.train.updates, row["reward/mean"])

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/update_NNNNN/ with the trainable weights (a PEFT adapter for LoRA), optimizer, EMA and the
        reward normaliser; written under a temporary name and renamed, then `latest` is switched."""
        from safetensors.torch import save_file

        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final, tmp = root / f"update_{self.update:05d}", root / f".tmp_update_{self.update:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if self.cfg.train.policy == "lora":
            self.policy.save_pretrained(str(tmp / "adapter"))
            (tmp / "adapter" / "base_checkpoint.txt").write_text(str(Path(self.cfg.model.checkpoint).resolve()) + "\n")
        else:
            save_file({n: p.detach().cpu().contiguous() for n, p in self.trainable.items()}, str(tmp / "trainable.safetensors"))
            (tmp / "base_checkpoint.txt").write_text(str(Path(self.cfg.model.checkpoint).resolve()) + "\n")
        state = {"update": self.update, "optimizer": self.optimizer.state_dict(), "ema": self.ema,
                 "reward_mix": json.dumps(_jsonable(self.reward_mix.state_dict()))}  # fmt: skip
        torch.save(state, tmp / "trainer_state.pt")
        return commit_checkpoint(tmp, final, self.out, "update_*", self.cfg.checkpoint.keep_last)

    def _load_latest(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            log.info("no checkpoint in %s: starting from scratch", self.out)
            return
        from safetensors.torch import load_file

        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        if (ckpt / "adapter").is_dir():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
        else:
            weights = load_file(str(ckpt / "trainable.safetensors"))
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(weights[n])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["ema"] is not None:
            self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.reward_mix.load_state_dict(json.loads(state["reward_mix"]))
        self.update = state["update"]
        log.info("resumed from %s at update %d", ckpt, self.update)

    def cleanup(self) -> None:
        self.metrics.close()
        self.scorer.close()
        self.rollout.close()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def recipe_main(config_path: str | None, overrides: list[str], resume: bool = False) -> dict:
    cfg = load_recipe(RLConfig, config_path, overrides)
    recipe = RLRecipe(cfg, resume=resume)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()
