"""The x2t recipe: load the checkpoint as a transformers model, decide what trains, build the data and TRL's
GRPOTrainer, evaluate (accuracy per question type and the generation score), log and checkpoint."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from lance_rl.config import RecipeError, load_recipe, to_dict
from lance_rl.trainer import run_recipe
from lance_rl.x2t.config import (
    NAMED_DATA,
    GenerationSection,
    X2TConfig,
    check_before_loading,
)
from lance_rl.x2t.rewards import TRLReward, question_text, text_batch

log = logging.getLogger("lance_rl.x2t")


# ------------------------------------------------------------------------------------------------ what trains
_LAYER = r"language_model\.model\.layers\.{layer}\."
_UNDERSTANDING = [r"self_attn\.[qkvo]_proj", r"mlp\.(gate|up|down)_proj"]
# Downstream of every key/value a generation token reads: in the last layer, the understanding tokens' queries, their
# attention output and MLP only shape their own outputs, which feed the answer head and nothing else.
_ANSWER_ONLY = [r"self_attn\.[qo]_proj", r"mlp\.(gate|up|down)_proj"]


def lora_targets(cfg: X2TConfig, num_layers: int) -> str:
    """The PEFT target regex: every layer's understanding projections, or (generation.keep answer_only) the last
    layer's, or the recipe's own patterns."""
    if cfg.generation.keep == "answer_only":
        prefix = _LAYER.format(layer=num_layers - 1)
        patterns = [prefix + p for p in _ANSWER_ONLY]
    elif isinstance(cfg.lora.targets, str):
        patterns = [_LAYER.format(layer=r"\d+") + p for p in _UNDERSTANDING]
    else:
        patterns = list(cfg.lora.targets)
    return "|".join(f"(?:{p})" for p in patterns)


def freeze_for_full(model, answer_only: bool, freeze_embeddings: bool, num_layers: int) -> None:
    """Full training of the understanding expert (the ViT, the generation expert and its heads stay frozen), or with
    answer_only of the modules that cannot reach generation: the last layer's q/o/q_norm/post-attention norm/MLP, the
    final understanding norm and lm_head."""
    last = f"language_model.model.layers.{num_layers - 1}."
    answer_only_names = tuple(last + s for s in ("self_attn.q_proj", "self_attn.o_proj", "self_attn.q_norm.",
                                                 "post_attention_layernorm.", "mlp.")) + ("language_model.model.norm.",
                                                                                           "language_model.lm_head.")  # fmt: skip
    for name, p in model.named_parameters():
        if answer_only:
            trains = name.startswith(answer_only_names) and "_moe_gen" not in name
        elif name.startswith("vit_model.") or not name.startswith("language_model.") or "_moe_gen" in name:
            trains = False
        elif "embed_tokens" in name:
            trains = not freeze_embeddings
        else:
            trains = True
        p.requires_grad_(trains)


# ------------------------------------------------------------------------------------------------ data
def build_rows(source: str, count: int, cfg: X2TConfig, heldout: bool) -> list[dict]:
    """Rows TRL reads: a conversational `prompt` (the question; the image part is added by TRL from `image`),
    `image` (a list of PIL frames: one for an image, several for a clip), `answer`, and metadata columns."""
    from PIL import Image

    if source in NAMED_DATA:
        from lance_rl.data.shapes import vqa_examples

        split = "heldout" if source == "shapes-vqa-heldout" else "train"
        seed = cfg.data.seed + (10_007 if heldout else 0)
        examples = vqa_examples(count, split, seed, cfg.data.image_size, all_questions=split == "heldout")
        return [{"prompt": [{"role": "user", "content": e.question}], "image": [Image.fromarray(e.image)],
                 "answer": e.answer, "question_type": e.question_type, "caption": e.caption} for e in examples]  # fmt: skip
    from lance_rl.data.datasets import open_dataset
    from lance_rl.model.tasks import is_understanding

    data = open_dataset(source, seed=cfg.data.seed)
    rows = []
    for example in data:
        if not is_understanding(example.task):
            continue
        prompt = [{"role": "user", "content": example.text}]
        if example.instruction:
            prompt.insert(0, {"role": "system", "content": example.instruction})
        rows.append({"prompt": prompt, "image": [Image.fromarray(f) for f in example.source], "answer": example.answer,
                     "question_type": "", "caption": ""})  # fmt: skip
        if len(rows) == count:
            break
    if not rows:
        raise RecipeError(f"data: {source} holds no understanding (x2t) rows")
    return rows


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generation_score(lance, tokenizer, codec, g: GenerationSection, version: int = 0) -> float:
    """What the t2i quickstart's evaluation measures, on `lance` as it is: ODE samples of the held-out shapes
    captions with fixed seeds and text CFG (the RL recipe's evaluate: the same requests, seeds and sampler), scored
    by the `shapes` reward (the mean of colour, count, position and shape)."""
    from lance_rl.data.prompts import load_prompts
    from lance_rl.model.guidance import CFGConfig
    from lance_rl.model.sampling import SamplerConfig
    from lance_rl.model.vae import latent_grid_of
    from lance_rl.policy import Policy, PolicySpec
    from lance_rl.rewards.shapes import score_images
    from lance_rl.rollout import RolloutRequest, rollout_group

    policy = Policy(lance, lance, tokenizer, codec, PolicySpec(checkpoint="", precision="fp32"))
    grid = latent_grid_of(lance.config.vae, 1, g.height, g.width)
    guidance = CFGConfig(scale=g.cfg_scale, interval=tuple(g.cfg_interval), renorm=g.cfg_renorm)
    sampler = SamplerConfig(num_steps=g.num_steps, shift=g.shift, kind="ode", cfg=guidance)
    was_training = lance.training
    lance.eval()
    scores = []
    for i, record in enumerate(load_prompts(g.prompts, "generation.prompts")[: g.num_prompts]):
        seeds = tuple(g.seed + i * g.samples_per_prompt + j for j in range(g.samples_per_prompt))
        request = RolloutRequest(request_id=i, prompt_index=i, prompt=record["prompt"], task="t2i", grid=grid,
                                 seeds=seeds, resolution=max(g.height, g.width))  # fmt: skip
        media = rollout_group(policy, request, sampler, version).media
        scores += score_images([m[0] for m in media], [record["prompt"]] * len(media))[0]
    lance.train(was_training)
    return _mean(scores)


def generation_score_of(checkpoint: str | Path, g: GenerationSection | None = None, device: str = "cpu") -> float:
    """The generation score of a checkpoint directory (e.g. the model before any understanding training)."""
    from lance_rl.policy import load_with_codec

    loaded, codec = load_with_codec(checkpoint, device=device)
    return generation_score(loaded.model, loaded.tokenizer, codec, g or GenerationSection())


# ------------------------------------------------------------------------------------------------ the recipe
class X2TRecipe:
    def __init__(self, cfg: X2TConfig, resume: bool = False):
        check_before_loading(cfg)
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.update = 0
        self.metrics = None
        self.pending: dict = {}  # the evaluation of the current update, written with TRL's row for it
        self.generation_start: float | None = None
        self.stopped_by_guard = False
        self.resume = resume
        self.resume_from: Path | None = None  # TRL's state in the checkpoint resumed from
        self.last: dict = {}

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from peft import LoraConfig
        from trl import GRPOConfig, GRPOTrainer

        from lance_rl.model.hf import LanceForUnderstanding, LanceProcessor
        from lance_rl.rewards.mix import build_mix
        from lance_rl.trainer import MetricsLog, resolve_precision, resume_latest, select_device

        c, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        self.device = select_device(t.device)
        self.bf16 = resolve_precision(t.precision, self.device) == "bf16"
        self.model = LanceForUnderstanding.from_pretrained(c.model.checkpoint, vit_dir=c.model.vit_dir,
                                                           device=self.device, mape=c.model.mape,
                                                           dtype=torch.bfloat16 if self.bf16 else torch.float32)  # fmt: skip
        self.model.lance.attn_backend = c.model.attn_backend
        self.model.lance.language_model.model.gradient_checkpointing = c.model.gradient_checkpointing
        self.processor = LanceProcessor.from_pretrained(c.model.checkpoint, image_resolution=c.model.resolution,
                                                        video_resolution=c.model.resolution)  # fmt: skip
        layers = self.model.lance.config.num_hidden_layers
        self.model.requires_grad_(False)
        peft_config = None
        if t.policy == "lora":
            peft_config = LoraConfig(r=c.lora.rank, lora_alpha=c.lora.alpha, lora_dropout=c.lora.dropout,
                                     target_modules=lora_targets(c, layers), init_lora_weights=True)  # fmt: skip
        else:
            freeze_for_full(
                self.model,
                c.generation.keep == "answer_only",
                c.model.freeze_embeddings,
                layers,
            )
        self.train_rows = build_rows(c.data.train, c.data.num_train, c, heldout=False)
        self.eval_rows = build_rows(c.data.eval, c.data.num_eval, c, heldout=True)
        self.reward_mix = build_mix(c.rewards)
        self.accuracy = self._accuracy_reward()
        self.codec = self._codec() if c.generation.evaluate else None
        self.trainer = GRPOTrainer(
            model=self.model,
            reward_funcs=[TRLReward(comp) for comp in self.reward_mix.components],
            args=GRPOConfig(**self._grpo_args()),
            train_dataset=_dataset(self.train_rows),
            processing_class=self.processor,
            peft_config=peft_config,
            callbacks=[_callback(self)],
        )
        from transformers import PrinterCallback

        self.trainer.remove_callback(PrinterCallback)  # our metrics log prints the progress lines
        self.trainable = {n: p for n, p in self.trainer.model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise RecipeError("nothing to train: every parameter is frozen (check train.policy, lora.targets)")
        log.info("x2t GRPO: %s, %s trainable parameters, %d training questions, %d held-out", t.policy,
                 f"{sum(p.numel() for p in self.trainable.values()):,}", len(self.train_rows), len(self.eval_rows))  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(to_dict(c), indent=2) + "\n")
        if self.resume:
            resume_latest(self.out, self._load_resumable)
        if self.resume_from is None and (self.out / "metrics.jsonl").is_file():
            log.warning("%s already holds a run: starting over (add --resume to continue it)", self.out)
            (self.out / "metrics.jsonl").unlink()
        self.metrics = MetricsLog(self.out, "update", t.steps, c.logging, to_dict(c),
                                  resume_at=self.update if self.resume_from else None)  # fmt: skip

    def _grpo_args(self) -> dict:
        c, g, o = self.cfg, self.cfg.grpo, self.cfg.optim
        batch = g.prompts_per_step * g.num_generations
        micro = g.micro_batch_size or batch  # TRL generates batch completions, then steps once over batch // micro
        schedule = {"constant": "constant_with_warmup", "cosine": "cosine_with_min_lr"}[o.schedule]
        args = dict(  # noqa: C408 - TRL's GRPOConfig keywords, as they are named there
            output_dir=str(self.out / "trl"), max_steps=c.train.steps, seed=c.train.seed, data_seed=c.train.seed,
            per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
            num_generations=g.num_generations, max_completion_length=g.max_completion_length,
            temperature=g.temperature, top_p=g.top_p, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
            loss_type=g.loss_type, scale_rewards=g.scale_rewards, importance_sampling_level=g.importance_sampling_level,
            num_iterations=g.num_iterations, mask_truncated_completions=g.mask_truncated_completions,
            reward_weights=[comp.weight for comp in self.reward_mix.components],
            learning_rate=o.lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
            weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, lr_scheduler_type=schedule,
            lr_scheduler_kwargs={"min_lr": o.min_lr} if o.schedule == "cosine" else {}, max_grad_norm=o.max_grad_norm,
            use_cpu=self.device.type == "cpu", bf16=self.bf16, fp16=False,  # trained weights are fp32 either way
            gradient_checkpointing=False,  # the decoder's own (model.gradient_checkpointing) recomputes per layer
            logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, log_completions=False,
            dataloader_num_workers=0, remove_unused_columns=False,
        )  # fmt: skip
        unknown = set(g.extra) & set(args)
        if unknown:
            raise RecipeError(f"grpo.extra sets {sorted(unknown)}, which this recipe sets from its own fields")
        return args | dict(g.extra)

    def _accuracy_reward(self):
        """Held-out accuracy: per question type on the shapes world, exact match elsewhere."""
        from lance_rl.rewards.answers import ExactAnswer, ShapesVQA

        return ShapesVQA() if self.cfg.data.eval in NAMED_DATA else ExactAnswer()

    def _codec(self):
        from lance_rl.model.vae import build_vae, find_wan_vae

        config = self.model.lance.config
        path = self.cfg.model.vae or (find_wan_vae(Path(self.cfg.model.checkpoint)) if config.vae == "wan2.2" else None)
        return build_vae(config, path, device=self.device)

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Evaluate the starting point, then TRL's loop; `_Callback` evaluates, logs and checkpoints as it runs."""
        if self.cfg.eval.every > 0 and self.resume_from is None:
            self.metrics.write({"update": 0, **self.evaluate()})
        started = time.perf_counter()
        # TRL restores the adapter (or weights), optimizer, schedule, RNG and data position from its own state.
        self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        log.info("x2t GRPO: %d updates in %.0f s%s", self.update, time.perf_counter() - started,
                 " (stopped by the generation guard)" if self.stopped_by_guard else "")  # fmt: skip
        return self.last

    def on_update(self, step: int) -> str | None:
        """After optimizer step `step`: evaluate when due (the row is written with TRL's log of the step) and guard
        generation. Returns "stop", "save" (TRL writes its state, then `save_checkpoint` runs) or None."""
        self.update = step
        c = self.cfg
        final = step == c.train.steps
        evaluated = c.eval.every > 0 and (step % c.eval.every == 0 or final)
        if evaluated:
            self.pending = self.evaluate()
        if c.generation.keep == "guard" and evaluated:
            score = self.pending.get("gold/reward/mean")
            if score is not None and self.generation_start is not None and \
                    score < self.generation_start - c.generation.max_drop:  # fmt: skip
                log.warning("generation guard: the shapes score fell to %.3f from %.3f (max drop %.3f); stopping at "
                            "update %d, `latest` stays at the last checkpoint within it", score, self.generation_start,
                            c.generation.max_drop, step)  # fmt: skip
                self.stopped_by_guard = True
                self.pending["generation_guard/stopped"] = 1.0
                return "stop"
            return "save"  # under the guard, every evaluation within the bound is a checkpoint
        return "save" if step % c.checkpoint.every == 0 or final else None

    def on_log(self, logs: dict) -> None:
        """One metrics.jsonl row per update: TRL's numbers under the names `lance-rl curves` charts, plus the
        evaluation of the update when there was one."""
        if "loss" not in logs and "reward" not in logs:
            return  # the final train_runtime summary
        row = {
            "update": self.update,
            **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
        }
        for ours, theirs in (("reward/mean", "reward"), ("reward/std", "reward_std"), ("policy_loss", "loss"),
                             ("clip_frac", "clip_ratio/region_mean"), ("lr", "learning_rate")):  # fmt: skip
            if theirs in logs:
                row[ours] = logs[theirs]
        row |= self.pending
        self.pending = {}
        if self.update % self.cfg.logging.every == 0 or any(k.startswith("eval/") for k in row) or \
                self.update == self.cfg.train.steps:  # fmt: skip
            self.metrics.write(row)
            self.metrics.progress(
                row,
                {
                    "reward": "reward/mean",
                    "acc": "eval/accuracy/mean",
                    "gen": "gold/reward/mean",
                },
            )
        self.last = row

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy answers (the release's understanding inference) to the held-out questions: accuracy (per question
        type on the shapes world), the training rewards (raw), an answer grid; and the generation score."""
        rows = self.eval_rows
        answers = self.answer([r["prompt"] for r in rows], [r["image"] for r in rows])
        batch = text_batch(
            [r["prompt"] for r in rows],
            answers,
            {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"},
        )
        row: dict = {}
        accuracy = self.accuracy(**batch)
        row["eval/accuracy/mean"] = _mean(accuracy.scores)
        for key, values in accuracy.details.items():
            if _mean(values) is not None:
                row[f"eval/accuracy/{key}/mean"] = _mean(values)
        mix = self.reward_mix.combine(self.reward_mix.score_components(**batch), normalize=False)
        row["eval/reward/mean"] = _mean(mix.scores)
        for (
            name,
            values,
        ) in mix.details.items():  # each reward's raw scores (their details repeat the accuracy)
            if "/" not in name and _mean(values) is not None:
                row[f"eval/{name}/mean"] = _mean(values)
        if self.cfg.generation.evaluate:
            score = self.generation_score()
            row["gold/reward/mean"] = row["gold/generation_shapes/mean"] = score
            if self.generation_start is None:
                self.generation_start = score
        self._write_eval(rows, answers, accuracy.scores, row)
        return row

    def answer(self, prompts: list, images: list) -> list[str]:
        """Greedy answers of the current policy (LoRA included), in batches."""
        from trl.data_utils import prepare_multimodal_messages

        model = self.model
        was_training = model.training
        model.eval()
        out = []
        size = self.cfg.eval.batch_size
        for start in range(0, len(prompts), size):
            convs = [prepare_multimodal_messages(p, images=[im]) for p, im in
                     zip(prompts[start : start + size], images[start : start + size])]  # fmt: skip
            inputs = self.processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt").to(self.device)  # fmt: skip
            ids = model.generate(**inputs, max_new_tokens=self.cfg.eval.max_new_tokens, do_sample=False)
            out += self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        model.train(was_training)
        return out

    def generation_score(self) -> float:
        """The t2i quickstart's held-out evaluation of this model as it is now (LoRA included)."""
        lance = self.model.lance
        return generation_score(
            lance,
            self.model.lance_tokenizer,
            self.codec,
            self.cfg.generation,
            self.update,
        )

    def _write_eval(self, rows, answers, correct, row) -> None:
        from lance_rl.curves import save_sample_grid

        folder = self.out / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        shown = [i for i, r in enumerate(rows) if len(r["image"]) == 1][:32]
        if shown:
            images = np.stack([np.asarray(rows[i]["image"][0].convert("RGB")) for i in shown])
            labels = [f"{'ok' if correct[i] else 'x'} {answers[i][:10]}" for i in shown]
            save_sample_grid(images, labels, folder / f"update_{self.update:05d}.png", columns=8)
        record = {"update": self.update, **row, "answers": [
            {"question": question_text(r["prompt"]), "answer": a, "reference": r["answer"], "correct": s}
            for r, a, s in zip(rows, answers, correct)]}  # fmt: skip
        (folder / f"update_{self.update:05d}.json").write_text(json.dumps(record) + "\n")

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/update_NNNNN/: trl/ (TRL's save: the weights, optimizer, schedule, RNG, data position) for
        --resume, and the weights alone as `lance-rl export RUN` reads them: adapter/ (+ base_checkpoint.txt) or
        model/ (the official layout). TRL wrote those weights through the same save_pretrained, so they are
        hard-linked from trl/, not written twice (15 GB per checkpoint for full training at 3B)."""
        import shutil

        from lance_rl.checkpointing import new_checkpoint

        name = f"update_{self.update:05d}"
        trl_state = Path(self.trainer.args.output_dir) / f"checkpoint-{self.update}"
        with new_checkpoint(self.out, name, self.cfg.checkpoint.keep_last) as tmp:
            shutil.move(str(trl_state), tmp / "trl")
            weights = tmp / ("adapter" if self.cfg.train.policy == "lora" else "model")
            _link_weights(tmp / "trl", weights)
            if self.cfg.train.policy == "lora":
                (weights / "base_checkpoint.txt").write_text(str(Path(self.cfg.model.checkpoint).resolve()) + "\n")
            torch.save({"update": self.update}, tmp / "trainer_state.pt")
        return self.out / "checkpoints" / name

    def _load_resumable(self, checkpoint: Path) -> None:
        """Where --resume continues: the checkpoint's update, TRL's state in it, the generation score it started from."""
        from lance_rl.trainer import CorruptCheckpoint, read_rows, read_trainer_state

        if not (checkpoint / "trl" / "trainer_state.json").is_file():
            raise CorruptCheckpoint(f"{checkpoint} holds no TRL state (trl/trainer_state.json)")
        self.update = int(read_trainer_state(checkpoint / "trainer_state.pt")["update"])
        self.resume_from = checkpoint / "trl"
        rows = [r for r in read_rows(self.out / "metrics.jsonl") if r.get("update") == 0] if \
            (self.out / "metrics.jsonl").is_file() else []  # fmt: skip
        if rows and rows[0].get("gold/reward/mean") is not None:
            self.generation_start = rows[0]["gold/reward/mean"]
        log.info("resuming the x2t run in %s at update %d", self.out, self.update)

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


# What TRL's save holds besides the weights (transformers' Trainer file names).
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")


def _link_weights(state: Path, weights: Path) -> None:
    """The files of TRL's save other than its training state, hard-linked into `weights` (copied where the filesystem
    cannot link)."""
    import os
    import shutil

    for src in sorted(state.rglob("*")):
        relative = src.relative_to(state)
        if src.is_dir() or relative.as_posix() in TRAINING_STATE:
            continue
        target = weights / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)


def _mean(values) -> float | None:
    numbers = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(numbers)) if numbers else None


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


def _callback(recipe: X2TRecipe):
    """TRL's loop calls back into the recipe after each optimizer step and each log (built here: transformers is
    heavy to import)."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        """TRL's loop calls back into the recipe after each optimizer step and each log."""

        def __init__(self, recipe: X2TRecipe):
            self.recipe = recipe

        def on_step_end(self, args, state, control, **kwargs):
            decision = self.recipe.on_update(state.global_step)
            control.should_training_stop |= decision == "stop"
            control.should_save = decision == "save"  # TRL writes its state; on_save then writes our checkpoint
            return control

        def on_save(self, args, state, control, **kwargs):
            self.recipe.save_checkpoint()
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.recipe.on_log(logs or {})
            return control

    return Callback(recipe)


def recipe_main(config_path: str | None, overrides: list[str], resume: bool = False) -> dict:
    return run_recipe(X2TRecipe(load_recipe(X2TConfig, config_path, overrides), resume=resume))
