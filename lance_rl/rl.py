"""The flow-GRPO recipe for Lance, readable top to bottom.

    lance-rl rl --config recipes/quickstart/rl.yaml [key=value ...] [--resume]

Each update: pick prompts (without replacement) -> roll out a group per prompt with the SDE sampler (Ray workers, or
the trainer itself) -> score each group the moment its rollout arrives, while the others still sample -> group
advantages (samples without a reward are left out of the statistics and the loss) -> for every recorded step,
recompute the log-probability of the stored transition under the current policy with the same `step` function,
clipped ratio loss (+ KL to the reference) in micro-batches -> optimizer step -> send the new trainable weights to
the workers with a new version -> evaluate on held-out prompts every few updates -> checkpoint.

Determinism: the prompts, seeds and SDE window of update k come from (seed, k), so a resumed run repeats exactly what
an uninterrupted run would have done next. Settings: `lance_rl/rl_config.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lance_rl.algorithms import ALGORITHMS
from lance_rl.config import load_recipe, to_dict
from lance_rl.grpo import group_advantages
from lance_rl.rl_config import RLConfig, check_before_loading
from lance_rl.rollout import RolloutRequest, RolloutResult, StaleRollout
from lance_rl.trainer import (
    MetricsLog,
    build_optimizer,
    clip_gradients,
    read_safetensors,
    read_trainer_state,
    resolve_precision,
    resume_latest,
    run_recipe,
    select_device,
)

log = logging.getLogger("lance_rl.rl")


class RLRecipe:
    def __init__(self, cfg: RLConfig, resume: bool = False):
        from lance_rl.model.guidance import CFGConfig

        self.inputs = check_before_loading(cfg)  # every check that needs no weights, before any loads
        self.cfg, self.resume = cfg, resume
        # One guidance setting for the rollouts, the update and the evaluation.
        self.cfg_guidance = CFGConfig(scale=cfg.sampler.cfg_scale, interval=tuple(cfg.sampler.cfg_interval),
                                      renorm=cfg.sampler.cfg_renorm)
        self.algorithm = ALGORITHMS[cfg.algorithm.name](self)  # the update's loss and how rollouts sample
        self.out = Path(cfg.output_dir)
        self.update = 0
        self.metrics = None
        self._prefixes: dict = {}  # during an update: prefix encodings that depend only on frozen weights, per prompt
        self._requests: dict = {}  # during an update: model-side requests (source media encoded), per prompt

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from lance_rl.policy import EMA, PolicySpec, build_policy, frozen_copy
        from lance_rl.rewards.mix import build_mix
        from lance_rl.rewards.runner import RewardRunner
        from lance_rl.trainer_group import TrainerGroup

        c, t, a = self.cfg, self.cfg.train, self.cfg.algorithm
        torch.manual_seed(t.seed)
        self.group = TrainerGroup(t.num_trainers)
        self.device = select_device(t.device if t.device != "auto" or not torch.cuda.is_available()
                                    else f"cuda:{self.group.local_rank}")  # fmt: skip
        self.precision = resolve_precision(t.precision, self.device)
        scores_here = self.group.main or c.rollout.num_workers == 0  # colocated: every rank scores its own groups
        drives_workers = c.rollout.num_workers > 0 and self.group.main
        if drives_workers or (scores_here and (_uses_ray(c.rewards) or _uses_ray(c.eval.gold_rewards))):
            from lance_rl.rollout import init_ray

            # First, so reward actors and rollout workers join the same cluster; the trainers' GPUs stay theirs.
            init_ray(c.rollout.ray_address, self.group.local_world if self.device.type == "cuda" else 0)
        self.spec = PolicySpec(c.model.checkpoint, c.model.vit_dir, c.model.vae, t.policy,
                               c.lora if t.policy == "lora" else None, self.precision, device=str(self.device))  # fmt: skip
        self.policy = build_policy(self.spec)
        self.policy.model.attn_backend = c.model.attn_backend
        self.policy.model.language_model.model.gradient_checkpointing = c.model.gradient_checkpointing
        self.trainable = self.policy.trainable
        # Full training's KL reference: the initial trainable weights, swapped in when needed (no second model).
        self.reference_weights = frozen_copy(self.trainable, self.precision) if a.beta > 0 and not self.policy.is_lora else None
        self.ema = EMA(self.trainable, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        self.algorithm.start()
        steps = t.updates * a.inner_epochs * a.minibatches
        self.optimizer, self.scheduler = build_optimizer(list(self.trainable.values()), c.optim, steps)
        # Reward models where scoring happens: rank 0 in split mode (it scores every group), every rank colocated.
        self.reward_mix = build_mix(c.rewards) if scores_here else None
        self.scorer = RewardRunner(self.reward_mix, max_workers=4) if scores_here else None
        self.gold = build_mix(c.eval.gold_rewards) if c.eval.gold_rewards and self.group.main else None
        self.rollout = self._workers() if self.group.main or c.rollout.num_workers == 0 else None
        log.info("policy: %s (%s), %s trainable parameters", t.policy, self.precision,
                 f"{sum(p.numel() for p in self.trainable.values()):,}")  # fmt: skip
        if self.group.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(c), indent=2) + "\n")
        if self.resume:
            resume_latest(self.out, self._load)
        self.metrics = MetricsLog(self.out, "update", t.updates, c.logging, to_dict(c),
                                  resume_at=self.update if self.resume else None, enabled=self.group.main)  # fmt: skip
        self.sync = self._sync()

    def _sync(self) -> dict:
        """The policy's weights (or the algorithm's sampling weights) to the rollout workers, as version `update`."""
        if self.rollout is None:  # a rank other than 0 in split mode: rank 0 drives the workers
            return {"bytes": 0, "buckets": 0}
        return self.rollout.set_weights(self.policy, self.update, self.algorithm.sampling_weights())

    def _workers(self):
        from lance_rl.rollout import LocalRollout, RayRollout

        r = self.cfg.rollout
        if r.num_workers == 0:
            return LocalRollout(self.policy)
        worker_spec = replace(self.spec, device="cuda" if r.num_gpus_per_worker > 0 else "cpu")
        return RayRollout(worker_spec, r.num_workers, r.num_cpus_per_worker, r.num_gpus_per_worker, r.sync_bucket_mb)

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        from tqdm import tqdm

        t, a = self.cfg.train, self.cfg.algorithm
        if self.update == 0 and self.cfg.eval.every > 0 and self.group.main:
            self.metrics.write({"update": 0, **self.evaluate()})  # the starting point of every eval curve
        bar = tqdm(total=t.updates, initial=self.update, desc="rl", unit="update", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())  # fmt: skip  # logs carry the progress when not on a terminal
        last: dict = {}
        while self.update < t.updates:
            # 1-2. Prompts and seeds for this update; roll out a group per prompt and score each as it arrives.
            requests, sampler = self._plan_update(self.update)
            results, scored, timing = self._rollout_and_score(requests, sampler)

            # 3. Group advantages; samples without a reward (None) are left out of the statistics and the loss. With
            # several trainer ranks the rewards of every rank's groups are gathered first, so all compute the same.
            rewards = self.group.gather_rewards({g: out.scores for g, out in scored.items()}, len(requests), a.group_size)
            groups = torch.arange(len(requests)).repeat_interleave(a.group_size)
            adv = group_advantages(rewards, groups, a.global_std, a.adv_clip_max)
            trained = adv.trained(a.skip_zero_std)

            # 4. Policy update: every recorded step of every trained sample, one optimizer step per minibatch.
            started = time.perf_counter()
            stats = self._update(results, requests, sampler, adv.values, trained, groups)
            timing["update"] = time.perf_counter() - started

            # 5. New weights to the workers, under the next version.
            started = time.perf_counter()
            self.update += 1
            self.sync = self._sync()
            timing["sync"] = time.perf_counter() - started

            last = self._row(list(scored.values()), rewards, adv, trained, groups, stats, timing)
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward/mean']:.3f}", clip=f"{last.get('clip_frac', 0):.2f}")
            # 6. Evaluate (rank 0), log and checkpoint.
            evaluated = self.cfg.eval.every > 0 and (self.update % self.cfg.eval.every == 0 or self.update == t.updates)
            if evaluated and self.group.main:
                last |= self.evaluate()
            if evaluated or self.update % self.cfg.logging.every == 0 or self.update == t.updates:
                self.metrics.write(last)
                self.metrics.progress(last, {"reward": "reward/mean", "eval": "eval/reward/mean", "kl": "kl",
                                             "clip": "clip_frac"})  # fmt: skip
            if self.update % self.cfg.checkpoint.every == 0 or self.update == t.updates:
                self.save_checkpoint()
        bar.close()
        return last

    def _plan_update(self, k: int):
        """The prompts, seeds and sampler settings of update k, derived from (seed, k) only."""
        from lance_rl.model.sampling import SamplerConfig

        a, s, p = self.cfg.algorithm, self.cfg.sampler, self.cfg.prompts
        rng = random.Random(self.cfg.train.seed * 1_000_003 + k)
        chosen = rng.sample(range(len(self.inputs.train_prompts)), a.prompts_per_update)  # without replacement
        requests = []
        for i, index in enumerate(chosen):
            base = rng.randrange(2**31)
            record = self.inputs.train_prompts[index]
            requests.append(RolloutRequest(
                request_id=i, prompt_index=index, prompt=record["prompt"], task=p.task, grid=self.inputs.grid,
                seeds=tuple(base + 7919 * j for j in range(a.group_size)),
                noise_seeds=(base,) * a.group_size if s.same_noise_in_group else None,
                source=record.get("source"), resolution=max(p.height, p.width),
            ))  # fmt: skip
        sampler = SamplerConfig(num_steps=s.num_steps, shift=s.shift, kind=s.kind, noise_level=s.noise_level,
                                cfg=self.cfg_guidance)  # fmt: skip
        return requests, self.algorithm.sampler(sampler, k, rng)  # the algorithm decides the window and the solver

    def _rollout_and_score(self, requests, sampler):
        """Roll out the requests this rank samples; each result goes to the reward runner the moment it arrives, so
        scoring overlaps the sampling of the groups still running. Returns {group: result} and {group: scores} of
        this rank's groups, and the timings. In split mode rank 0 samples and scores every group through the
        workers, then hands each rank its groups."""
        colocated = self.cfg.rollout.num_workers == 0
        mine = [r for r in requests if self.group.owns(r.request_id)] if colocated else requests
        results: dict[int, RolloutResult] = {}
        futures, submitted = {}, {}
        started = time.perf_counter()
        if colocated or self.group.main:
            for result in self.rollout.stream(mine, sampler):
                if result.weights_version != self.update:
                    raise StaleRollout(f"request {result.request_id} was sampled with the weights of update "
                                       f"{result.weights_version}, but the trainer is at update {self.update}: a "
                                       "weight sync did not reach its worker")  # fmt: skip
                results[result.request_id] = result
                submitted[result.request_id] = time.perf_counter()
                futures[result.request_id] = self.scorer.submit(**self._reward_batch(result, requests[result.request_id]))
        rollout_done = time.perf_counter()
        scored = {g: futures[g].result() for g in sorted(futures)}
        done = time.perf_counter()
        if not colocated:
            results = self.group.share_results(results, len(requests))
        first = min(submitted.values(), default=done)
        timing = {"rollout": rollout_done - started, "score": done - first, "score_after_rollout": done - rollout_done}
        return results, scored, timing

    def _reward_batch(self, result: RolloutResult, request: RolloutRequest) -> dict:
        media = result.media
        batch: dict = {"prompts": [request.prompt] * len(media)}
        if media.shape[1] == 1:
            batch["images"] = [m[0] for m in media]
        else:
            batch["videos"] = list(media)
        if result.source_media is not None:
            source = result.source_media[0] if result.source_media.shape[0] == 1 else result.source_media
            batch["conditions"] = [source] * len(media)
        return batch

    # ---------------------------------------------------------------- the update
    def _update(self, results, requests, sampler, advantages, trained, groups) -> dict:
        """The algorithm's loss over every trained sample, one optimizer step per minibatch of groups."""
        a = self.cfg.algorithm
        stats: dict = {k: [] for k in ("policy_loss", "kl", "kl_exact", "log_ratio", "clipped", "ratio", "grad_norm",
                                       "nft_positive", "nft_negative")} | {"ratio_by_step": {}}  # fmt: skip
        with_signal = [g for g in range(len(requests)) if bool(trained[groups == g].any())]
        per_sample = self.algorithm.terms_per_sample(next(iter(results.values())), sampler)
        self.policy.module.train()
        for _ in range(a.inner_epochs):
            for chunk in np.array_split(np.array(with_signal, dtype=int), a.minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                terms = sum(int(trained[groups == g].sum()) for g in chunk) * per_sample  # over every rank's groups
                for g in (g for g in chunk.tolist() if self.group.owns(g)):
                    rows = groups == g
                    self.algorithm.group_loss(results[g], requests[g], sampler, advantages[rows], trained[rows], terms,
                                              stats)  # fmt: skip
                self.group.all_reduce_gradients(list(self.trainable.values()))
                self._optimizer_step(stats)
        self.algorithm.after_update(self.scheduler.last_epoch)
        self._prefixes, self._requests = {}, {}
        return stats

    def prefix(self, req: RolloutRequest, grad: bool, reference: bool = False):
        """The request's prefix encoding (one row). Without gradients it depends only on frozen weights (or is the
        reference's own), so one encoding per prompt serves the whole update."""
        from lance_rl.model.prefix import encode_prefix
        from lance_rl.rollout import generation_request

        key = (req.prompt_index, req.source, reference)
        if not grad and self.cfg.algorithm.reuse_prefix and key in self._prefixes:
            return self._prefixes[key]
        if (req.prompt_index, req.source) not in self._requests:  # the source media is encoded once per update
            self._requests[(req.prompt_index, req.source)] = generation_request(self.policy, req)[0]
        gen_request = self._requests[(req.prompt_index, req.source)]
        context = self.policy.reference(self.reference_weights) if reference else contextlib.nullcontext()
        with context, self.policy.autocast():
            prefix = encode_prefix(self.policy.model, self.policy.tokenizer, [gen_request], self.cfg_guidance, grad=grad)
        if not grad and self.cfg.algorithm.reuse_prefix:
            self._prefixes[key] = prefix
        return prefix

    def _optimizer_step(self, stats: dict) -> None:
        norm = clip_gradients(list(self.trainable.values()), self.cfg.optim.max_grad_norm)
        if np.isfinite(norm):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.step(self.trainable)
        else:
            log.warning("update %d: non-finite gradient norm, skipping the step", self.update)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        stats["grad_norm"].append(norm)

    def _row(self, scored, rewards, adv, trained, groups, stats, timing) -> dict:
        valid = rewards[adv.valid].float()
        group_zero = [bool(adv.zero_std[groups == g].all()) for g in groups.unique()]
        row = {"update": self.update,
               "reward/mean": float(valid.mean()) if len(valid) else float("nan"),
               "reward/std": float(valid.std(unbiased=False)) if len(valid) else float("nan"),
               "frac_reward_zero_std": float(np.mean(group_zero)), "samples_without_reward": int((~adv.valid).sum()),
               "skipped_samples": int((~trained).sum()), "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": float(np.mean(stats["grad_norm"])) if stats["grad_norm"] else 0.0,
               "sync/bytes": self.sync["bytes"], "sync/buckets": self.sync["buckets"]}  # fmt: skip
        if self.ema is not None:
            row["ema_decay"] = self.ema.decay
        # Per-sample values of this rank's groups, summarised over every rank's (rank 0 writes the row).
        names = {name for out in scored for name in out.details}
        values = {f"rewards/{name}": torch.tensor([float(v) for out in scored for v in out.details.get(name, [])
                                                   if isinstance(v, (int, float)) and not isinstance(v, bool)])
                  for name in names}  # fmt: skip
        values |= {key: torch.cat(stats[key]).float() for key in ("policy_loss", "kl", "kl_exact", "ratio", "clipped",
                                                                   "nft_positive", "nft_negative") if stats[key]}  # fmt: skip
        if stats["log_ratio"]:
            values["approx_kl"] = 0.5 * torch.cat(stats["log_ratio"]).float() ** 2
        values |= {f"ratio/step_{i}": torch.cat(rs).float() for i, rs in stats["ratio_by_step"].items()}
        summary = self.group.summarize(values)
        for name, s in summary.items():
            if name.startswith("rewards/"):
                row[f"{name}/mean"], row[f"{name}/std"] = s["mean"], s["std"]
            elif name.startswith("ratio/step_"):
                row[f"{name}/mean"] = s["mean"]
            elif name == "ratio":
                row |= {"ratio/mean": s["mean"], "ratio/std": s["std"],
                        "ratio/max_abs_dev": max(s["max"] - 1, 1 - s["min"])}  # fmt: skip
            else:
                row["clip_frac" if name == "clipped" else name] = s["mean"]
        for stage, seconds in timing.items():
            row[f"timing/{stage}"] = seconds
        for stage in ("rollout", "update", "sync"):
            row[f"samples_per_s/{stage}"] = len(rewards) / timing[stage] if timing[stage] > 0 else float("inf")
        return row

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """ODE sampling (no noise) on held-out prompts with fixed seeds, EMA weights when kept, scored by the training
        rewards (raw, no normalisation) and the gold rewards, with the reward-hacking signals; writes a sample grid."""
        from lance_rl.diagnostics import signals
        from lance_rl.model.sampling import SamplerConfig

        e, p = self.cfg.eval, self.cfg.prompts
        requests = [RolloutRequest(request_id=i, prompt_index=i, prompt=r["prompt"], task=p.task, grid=self.inputs.grid,
                                   seeds=tuple(e.seed + i * e.samples_per_prompt + j for j in range(e.samples_per_prompt)),
                                   source=r.get("source"), resolution=max(p.height, p.width))
                    for i, r in enumerate(self.inputs.eval_prompts)]  # fmt: skip
        sampler = SamplerConfig(num_steps=e.num_steps, shift=self.cfg.sampler.shift, kind="ode", cfg=self.cfg_guidance)
        results = self._sample_for_evaluation(requests, sampler)
        batches = [self._reward_batch(res, req) for res, req in zip(results, requests)]
        batch = {k: [x for b in batches for x in b[k]] for k in batches[0]}
        row: dict = {}
        for label, mix in (("eval", self.reward_mix), ("gold", self.gold)):
            if mix is None:
                continue
            out = mix.combine(mix.score_components(**batch), normalize=False)  # leaves the running statistics alone
            row[f"{label}/reward/mean"] = float(np.nanmean([np.nan if x is None else x for x in out.scores]))
            for name, values in out.details.items():
                nums = [v for v in values if isinstance(v, (int, float)) and v is not None]
                if nums:
                    row[f"{label}/{name}/mean"] = float(np.mean(nums))
            if label == "eval":
                scores = out.scores
        first_frames = [m[0] for res in results for m in res.media]
        row |= {f"eval/signals/{k}": v for k, v in signals(first_frames, e.samples_per_prompt).items()}
        self._write_eval(np.stack(first_frames), batch["prompts"], scores, row)
        return row

    def _sample_for_evaluation(self, requests, sampler) -> list:
        """The evaluated weights (EMA when kept) sample on the rollout workers in split mode, then the workers get
        the training weights back; colocated, the trainer samples with them swapped in."""
        from lance_rl.rollout import rollout_group

        weights = self.ema.weights() if self.ema is not None else None
        if self.cfg.rollout.num_workers > 0:
            if weights is not None:
                self.rollout.set_weights(self.policy, self.update, weights)
            results = sorted(self.rollout.stream(requests, sampler), key=lambda r: r.request_id)
            if weights is not None:
                self.sync = self._sync()
            return results
        was_training = self.policy.module.training
        self.policy.module.eval()
        with self.ema.swapped_in(self.trainable) if self.ema is not None else contextlib.nullcontext():
            results = [rollout_group(self.policy, r, sampler, self.update) for r in requests]
        self.policy.module.train(was_training)
        return results

    def _write_eval(self, frames, prompts, scores, row) -> None:
        from lance_rl.curves import save_eval

        grid, caption = save_eval(self.out / "eval", self.update, frames, prompts, scores, row,
                                  self.cfg.eval.samples_per_prompt)  # fmt: skip
        if self.metrics is not None:
            self.metrics.image("eval/samples", grid, self.update, caption)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/update_NNNNN/ with the trainable weights (a PEFT adapter for LoRA), optimizer, schedule, EMA
        and the reward normaliser; written by rank 0 under a temporary name and renamed, then `latest` is switched.
        Every rank holds the same weights and optimizer state, so one copy serves them all."""
        if self.group.main:
            self._write_checkpoint()
        self.group.barrier()
        return self.out / "checkpoints" / f"update_{self.update:05d}"

    def _write_checkpoint(self) -> None:
        from safetensors.torch import save_file

        from lance_rl.checkpointing import new_checkpoint

        base = str(Path(self.cfg.model.checkpoint).resolve()) + "\n"
        with new_checkpoint(self.out, f"update_{self.update:05d}", self.cfg.checkpoint.keep_last) as tmp:
            if self.policy.is_lora:
                self.policy.module.save_pretrained(str(tmp / "adapter"))
                (tmp / "adapter" / "base_checkpoint.txt").write_text(base)
            else:
                save_file({n: p.detach().cpu().contiguous() for n, p in self.trainable.items()}, str(tmp / "trainable.safetensors"))
                (tmp / "base_checkpoint.txt").write_text(base)
            state = {"update": self.update, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                     "reward_mix": json.dumps(_jsonable(self.reward_mix.state_dict())),
                     "algorithm": self.algorithm.state_dict()}  # fmt: skip
            torch.save(state, tmp / "trainer_state.pt")

    def _load(self, ckpt: Path) -> None:
        """Read every file of the checkpoint first (a corrupt one raises before anything changes), then apply."""
        from lance_rl.policy import load_trainable_state

        state = read_trainer_state(ckpt / "trainer_state.pt")
        weights = read_safetensors(ckpt / "adapter" / "adapter_model.safetensors" if self.policy.is_lora
                                   else ckpt / "trainable.safetensors")  # fmt: skip
        if self.policy.is_lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy.module, weights)
        else:
            load_trainable_state(self.trainable, weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.reward_mix is not None:
            self.reward_mix.load_state_dict(json.loads(state["reward_mix"]))
        self.algorithm.load_state_dict(state["algorithm"])
        self.update = state["update"]
        log.info("resumed from %s at update %d", ckpt, self.update)

    def cleanup(self) -> None:
        for part in ("metrics", "scorer", "rollout", "group"):
            if getattr(self, part, None) is not None:
                getattr(self, part).close()


def _uses_ray(rewards: dict) -> bool:
    return any(isinstance(v, dict) and v.get("ray") is not None for v in (rewards or {}).values())


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
    return run_recipe(RLRecipe(load_recipe(RLConfig, config_path, overrides), resume=resume))
