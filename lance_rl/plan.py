"""`lance-rl plan RECIPE --gpus N [--gpu-memory 80] [--json]`: the per-GPU memory of every role a recipe starts,
before a GPU is rented.

Parameters are counted exactly (the model built on the meta device from the recipe's config, or the released 3B
config when the checkpoint is not on this machine). Activations are measured, not assumed: `activation_figure` runs
one decoder layer at the model's real widths on this CPU for two small target blocks, counts what autograd saves for
backward (saved-tensor hooks, unique storages, parameters excluded) and takes the slope per target token; the plan
multiplies it by the recipe's token count, layers and micro-batch. `lance-rl bench memory` measures the same figure
at the recipes' full shapes, which is how the extrapolation is checked (README, "Memory at 3B").

Roles: the RL trainer (weights, gradients, AdamW, EMA, the KL reference, activations of one update micro-batch,
prefix caches), each rollout worker (weights, VAE, a group's KV cache, sampling and decoding peaks), reward actors
(the scorers' weights); for SFT one data-parallel process per GPU under its strategy; for an x2t recipe (TRL GRPO)
its one process. Each GPU's total is compared
with the GPU's memory less `headroom` (10%: allocator fragmentation, CUDA context, kernels' workspaces).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch

GB = 1e9
BYTES = {"fp32": 4, "bf16": 2}
TEXT_PREFIX_TOKENS = 128  # system prompt, chat template and a caption of up to ~77 tokens, rounded up
# Reward models by registry name: parameters of the scorer (fp32 unless the reward loads half precision).
REWARD_PARAMETERS = {
    "pickscore": 986_000_000,  # CLIP ViT-H/14 (yuvalkirstain/PickScore_v1)
    "hpsv2": 986_000_000,  # open_clip ViT-H/14
    "aesthetic": 428_000_000,  # CLIP ViT-L/14 + LAION MLP head
    "clip_score": 428_000_000,  # open_clip ViT-L/14 (openai)
    "image_similarity": 428_000_000,
    "video_temporal_consistency": 151_000_000,  # ViT-B/32
}


# ------------------------------------------------------------------------------------------------ exact parameters
def model_config(checkpoint: str | None):
    """The checkpoint's LanceConfig, or the released 3B config (with a note) when the checkpoint is not here."""
    from lance_rl.model.config import LanceConfig, lance_3b

    if checkpoint and (Path(checkpoint) / "llm_config.json").is_file():
        return LanceConfig.from_llm_config(checkpoint), f"{checkpoint}/llm_config.json"
    return lance_3b(), "the released Lance 3B config (checkpoint not on this machine)"


def parameter_bytes(config) -> dict:
    """Exact parameter counts by part, from the model built on the meta device."""
    from lance_rl.model.lance import LanceModel

    with torch.device("meta"):
        model = LanceModel(config)
    counts = model.parameter_counts()
    counts.pop("active_per_token", None)
    return counts


def lora_parameters(config, rank: int, targets: str | list[str]) -> int:
    """Exact LoRA parameter count: rank x (in + out) for every Linear the target patterns match."""
    from lance_rl.model.lance import LanceModel
    from lance_rl.policy import lora_target_regex

    pattern = re.compile(lora_target_regex(targets))
    with torch.device("meta"):
        model = LanceModel(dataclasses.replace(config, vision_config=None))
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name))  # fmt: skip


def vae_parameters(kind: str) -> int:
    if kind != "wan2.2":
        return 0
    from lance_rl.model.vae import _autoencoder_kl_wan, wan22_diffusers_config

    with torch.device("meta"):
        return sum(p.numel() for p in _autoencoder_kl_wan()(**wan22_diffusers_config()).parameters())


# ------------------------------------------------------------------------------------------------ measured activations
@dataclasses.dataclass(frozen=True)
class ActivationFigure:
    per_target_token: float  # bytes per target token per decoder layer, per row and CFG branch
    outside_layers: float  # bytes per target token saved once per forward (latent embedding, final norm, flow head)
    per_prefix_token: float  # bytes per prefix token per layer and branch (editing: the prefix carries gradients)

    def block(self, tokens: int, layers: int) -> float:
        """Bytes one row and branch saves for a target block of `tokens` through `layers` layers."""
        return tokens * (layers * self.per_target_token + self.outside_layers)


def activation_figure(config, task: str, precision: str, checkpointing: bool, trains: str, lora_rank: int,
                      cfg_grad: str) -> ActivationFigure:  # fmt: skip
    """Bytes saved for backward per target token, measured at the config's widths on models of one and two decoder
    layers with target blocks of 16 and 32 tokens: the slope over tokens is the per-token figure (everything saved
    grows linearly with the block once attention runs unmasked, as the cached update's does), the difference
    between the layer counts splits it into the part every layer saves and the part saved once per forward."""
    from lance_rl.bench import measure_update_activations
    from lance_rl.model.config import TINY_VISION
    from lance_rl.model.tasks import is_edit

    lora_rank = lora_rank if trains == "lora" else 0  # the rank matters to LoRA only
    key = json.dumps([config.hidden_size, config.intermediate_size, config.num_attention_heads,
                      config.num_key_value_heads, task, precision, checkpointing, trains, lora_rank, cfg_grad])
    cache = _figure_cache()
    if key in cache:
        return ActivationFigure(**cache[key])
    shapes = [{"task": task, "grid": grid, "vit_grid": (1, 4, 4)} for grid in ((1, 4, 4), (1, 4, 8))]
    if task in ("t2v", "i2v", "video_edit"):
        shapes = [{**s, "task": "t2v" if task != "video_edit" else "image_edit"} for s in shapes]
    branches = 2 if cfg_grad == "full" else 1
    slopes = {}
    for layers in (1, 2):
        small_config = dataclasses.replace(config, num_hidden_layers=layers, vocab_size=640,
                                           vision_config=dict(TINY_VISION, out_hidden_size=config.hidden_size))  # fmt: skip
        small, large = (measure_update_activations(small_config, s, 1, precision, checkpointing, trains, lora_rank,
                                                   cfg_grad) for s in shapes)  # fmt: skip
        tokens = branches * (large["target_tokens"] - small["target_tokens"])
        slopes[layers] = ((large["block_bytes"] - small["block_bytes"]) / tokens,
                          (large["prefix_bytes"] - small["prefix_bytes"]) / max(1, branches * (large["prefix_tokens"] - small["prefix_tokens"])))
    per_layer = slopes[2][0] - slopes[1][0]
    per_prefix = slopes[2][1] - slopes[1][1] if is_edit(task) else 0.0  # the source block and all after it
    figure = ActivationFigure(per_layer, slopes[1][0] - per_layer, per_prefix)
    _save_figure(key, figure)
    return figure


def _cache_path() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lance-rl" / "activation_figures.json"


# Figures for the released widths, measured with `lance-rl plan` on each recipes/lance-3b recipe (x86_64 CPU, 2 cores,
# torch 2.14.1) and shipped, so planning a 3B recipe takes no measurement; other widths are measured and cached.
RELEASE_FIGURES = Path(__file__).with_name("activation_figures.json")


def _figure_cache() -> dict:
    figures = {}
    for path in (RELEASE_FIGURES, _cache_path()):
        try:
            figures |= json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    return figures


def _save_figure(key: str, figure: ActivationFigure) -> None:
    """Measurements are kept per widths, settings and torch version, so a second plan is instant."""
    try:
        cache = _figure_cache() | {key: dataclasses.asdict(figure)}
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        _cache_path().write_text(json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time


# ------------------------------------------------------------------------------------------------ the RL plan
def _tokens(cfg, config) -> tuple[int, int]:
    """(target tokens incl. the two markers, prefix tokens) of one sample of the recipe: the longest prompt's prefix
    when the checkpoint's tokenizer and the prompts are on this machine, else an estimate for a 77-token caption."""
    from lance_rl.model.tasks import is_edit, makes_video
    from lance_rl.model.vae import latent_grid_of

    p = cfg.prompts
    grid = latent_grid_of(config.vae, p.num_frames if makes_video(p.task) else 1, p.height, p.width)
    target = math.prod(grid)
    prefix = _text_prefix_tokens(cfg, grid) or TEXT_PREFIX_TOKENS
    if is_edit(p.task):  # the source as a ViT block (28 px merged patches) and a clean VAE block
        prefix += (p.height // 28) * (p.width // 28) * max(1, (p.num_frames + 1) // 2 if makes_video(p.task) else 1) + target
    return target + 2, prefix


def _text_prefix_tokens(cfg, grid) -> int | None:
    from lance_rl.data.prompts import load_prompts
    from lance_rl.model.sequence import generation_plan
    from lance_rl.model.tasks import is_edit
    from lance_rl.model.tokenizer import LanceTokenizer

    tokenizer_dir = Path(cfg.model.checkpoint)
    if is_edit(cfg.prompts.task) or not (tokenizer_dir / "tokenizer.json").is_file():
        return None
    try:
        prompts = load_prompts(cfg.prompts.train, "prompts.train")[:256]
    except ValueError:
        return None
    tokenizer = LanceTokenizer.from_dir(tokenizer_dir)
    return max(len(generation_plan(tokenizer, cfg.prompts.task, r["prompt"], grid)) - math.prod(grid) - 2 for r in prompts)


def plan_rl(cfg, gpus: int, gpu_memory_gb: float, headroom: float = 0.10, figure: ActivationFigure | None = None) -> dict:
    """Per-GPU memory of the RL recipe `cfg` (an RLConfig) on `gpus` GPUs of `gpu_memory_gb` each."""
    config, source = model_config(cfg.model.checkpoint)
    t, a, s = cfg.train, cfg.algorithm, cfg.sampler
    precision = "bf16" if t.precision in ("auto", "bf16") else "fp32"  # auto is bf16 on the GPUs a plan is for
    e = BYTES[precision]
    counts = parameter_bytes(config)
    total_params = counts["total"]
    if t.policy == "lora":
        trainable = lora_parameters(config, cfg.lora.rank, cfg.lora.targets)
        frozen = total_params
    else:
        trainable = counts["generation_expert"] + counts["generation_heads"]
        if t.policy == "both":
            trainable += counts["understanding_expert"]
        frozen = total_params - trainable
    layers, kv_bytes = config.num_hidden_layers, 2 * config.num_key_value_heads * config.head_dim * e
    target, prefix = _tokens(cfg, config)
    trains = "lora" if t.policy == "lora" else "generation"
    figure = figure or activation_figure(config, cfg.prompts.task, precision, cfg.model.gradient_checkpointing, trains,
                                         cfg.lora.rank, a.cfg_grad)  # fmt: skip
    cfg_on = s.cfg_scale != 1.0
    branches = (2 if a.cfg_grad == "full" else 1) if cfg_on else 1
    recompute = None
    if cfg.model.gradient_checkpointing:  # backward recomputes one layer at a time: its full activations at the peak
        recompute = activation_figure(config, cfg.prompts.task, precision, False, trains, cfg.lora.rank, a.cfg_grad)

    def activations(rows: int) -> float:
        """Saved for backward over the micro-batch, plus the one layer backward recomputes when checkpointing."""
        total = rows * branches * (figure.block(target, layers) + layers * prefix * kv_bytes)
        total += layers * branches * prefix * figure.per_prefix_token
        if recompute is not None:
            total += rows * branches * target * recompute.per_target_token
        return total

    micro = a.micro_batch_size or a.group_size
    weights = frozen * e + trainable * 4
    trainer = {
        "weights": weights,
        "gradients": trainable * 4,
        "optimizer (AdamW)": trainable * 8,
        "EMA": trainable * 4 if t.ema_decay > 0 else 0,
        "KL reference": (trainable * e if t.policy != "lora" else 0) if a.beta > 0 else 0,
        "VAE": vae_parameters(config.vae) * e,
        f"activations ({micro} rows)": activations(micro),
        "prefix caches": a.prompts_per_update * layers * prefix * kv_bytes * (2 if cfg_on else 1),
    }
    g = a.group_size
    frame_bytes = 8 * 256 * (cfg.prompts.height // 2) * (cfg.prompts.width // 2) * e  # the VAE decoder's widest maps
    worker = {
        "weights": weights,
        "VAE": vae_parameters(config.vae) * e,
        "KV cache of a group": layers * prefix * kv_bytes * (2 if cfg_on else 1),
        "sampling peak": g * (2 if cfg_on else 1) * target * (4 * config.hidden_size + 3 * config.intermediate_size) * e,
        "decoding peak": frame_bytes * (4 if cfg.prompts.num_frames > 1 else 1),
    }
    roles = {"trainer": trainer}
    placement: list[tuple[str, float]] = [("trainer", 1.0)]
    r = cfg.rollout
    for i in range(r.num_workers):
        roles[f"rollout worker {i}"] = worker
        placement.append((f"rollout worker {i}", r.num_gpus_per_worker))
    for name, spec in {**cfg.rewards, **cfg.eval.gold_rewards}.items():
        spec = spec if isinstance(spec, dict) else {}
        params = REWARD_PARAMETERS.get(spec.get("reward", name))
        ray = spec.get("ray") or {}
        if params is None or not ray.get("num_gpus"):
            continue  # on CPU actors (OCR, shapes, JPEG) or inside the trainer's process
        for k in range(int(ray.get("num_actors", 1))):
            roles[f"reward {name} {k}"] = {"weights": params * 4, "batch activations": 1.0 * GB}
            placement.append((f"reward {name} {k}", float(ray["num_gpus"])))
    result = _place(roles, placement, gpus, gpu_memory_gb, headroom)
    result |= {"recipe_kind": "rl", "model": source, "precision": precision, "trainable_parameters": trainable,
               "target_tokens": target, "prefix_tokens": prefix,
               "activation_bytes_per_token_per_layer": figure.per_target_token,
               "largest_micro_batch": _largest_micro_batch(result, trainer, activations, micro, g, gpu_memory_gb, headroom)}  # fmt: skip
    return result


def _largest_micro_batch(result, trainer, activations, micro, group, gpu_memory_gb, headroom) -> int:
    """The most rows per micro-batch the trainer's GPU holds with the headroom (0: not even one)."""
    trainer_gpu = next(g for g in result["gpus"] if "trainer" in g["roles"])
    others = trainer_gpu["total_gb"] * GB - sum(trainer.values())
    fixed = sum(v for k, v in trainer.items() if not k.startswith("activations"))
    budget = gpu_memory_gb * GB * (1 - headroom) - others - fixed
    best = 0
    for rows in range(1, group + 1):
        if activations(rows) <= budget:
            best = rows
    return best


# ------------------------------------------------------------------------------------------------ the SFT plan
SFT_STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")


def plan_sft(cfg, gpus: int, gpu_memory_gb: float, headroom: float = 0.10, figure: ActivationFigure | None = None) -> dict:
    """Per-GPU memory of one data-parallel SFT process under its strategy (every GPU holds the same)."""
    config, source = model_config(cfg.model.checkpoint)
    t = cfg.train
    precision = "bf16" if t.precision in ("auto", "bf16") else "fp32"
    e = BYTES[precision]
    strategy = getattr(t, "strategy", "ddp")
    counts = parameter_bytes(config)
    if cfg.lora.enabled:
        trainable = lora_parameters(config, cfg.lora.rank, cfg.lora.targets)
    else:
        trainable = (counts["understanding_expert"] if t.train_understanding else 0) + (
            counts["generation_expert"] + counts["generation_heads"] if t.train_generation else 0)
        trainable += 0 if t.freeze_embeddings else counts["embeddings"]
    frozen = counts["total"] - trainable if not cfg.lora.enabled else counts["total"]
    n = gpus
    layer_params = (counts["understanding_expert"] + counts["generation_expert"]) / config.num_hidden_layers
    root_unit = (counts["embeddings"] + counts["vit"]) * e  # FSDP2's root unit (embeddings, ViT), gathered in bf16
    # lance_rl/distributed.py's engines: trainable weights have fp32 masters; DeepSpeed keeps bf16 working copies.
    parts = {
        "ddp": {"weights": frozen * e + trainable * 4, "gradients": trainable * 4, "optimizer (AdamW)": trainable * 8,
                "EMA": trainable * 4, "gradient buckets": trainable * 4},
        "fsdp2": {"weights": (frozen * e + trainable * 4) / n, "gathered layers and root": 2 * layer_params * e + root_unit,
                  "gradients": trainable * 4 / n + layer_params * (e + 4), "optimizer (AdamW)": trainable * 8 / n,
                  "EMA": trainable * 4 / n},
        "zero2": {"weights": (frozen + trainable) * e + trainable * 4 / n, "gradients": trainable * (e + 4) / n,
                  "optimizer (AdamW)": trainable * 8 / n, "EMA": trainable * 4 / n, "reduce buckets": 2 * GB},
        "zero3": {"weights": (frozen + trainable) * e / n + trainable * 4 / n, "gathered layers": 2 * GB,
                  "gradients": trainable * (e + 4) / n, "optimizer (AdamW)": trainable * 8 / n, "EMA": trainable * 4 / n},
    }[strategy]  # fmt: skip
    if t.ema_decay == 0:
        parts["EMA"] = 0
    figure = figure or activation_figure(config, "t2i", precision, cfg.model.gradient_checkpointing,
                                         "lora" if cfg.lora.enabled else "generation", cfg.lora.rank, "cond_only")  # fmt: skip
    tokens = cfg.data.tokens_per_step
    activations = figure.block(tokens, config.num_hidden_layers)
    if cfg.model.gradient_checkpointing:
        full = activation_figure(config, "t2i", precision, False, "lora" if cfg.lora.enabled else "generation",
                                 cfg.lora.rank, "cond_only")  # fmt: skip
        activations += tokens * full.per_target_token
    process = {**parts, "VAE": vae_parameters(config.vae) * e, f"activations ({tokens} tokens)": activations}
    roles = {f"process {i}": process for i in range(gpus)}
    result = _place(roles, [(name, 1.0) for name in roles], gpus, gpu_memory_gb, headroom)
    return result | {"recipe_kind": "sft", "strategy": strategy, "model": source, "precision": precision,
                     "trainable_parameters": trainable, "activation_bytes_per_token_per_layer": figure.per_target_token}


# ------------------------------------------------------------------------------------------------ the x2t plan
def _vit_tokens(resolution) -> int:
    """Merged ViT tokens of one square image at `resolution` (a preset's ViT side, or an area side; None: the
    release's image_768res)."""
    from lance_rl.model.media import RESOLUTIONS, VIT_MULTIPLE

    side = RESOLUTIONS[resolution][1] if isinstance(resolution, str) else (resolution or RESOLUTIONS["image_768res"][1])
    return (side // VIT_MULTIPLE) ** 2


def plan_x2t(cfg, gpus: int, gpu_memory_gb: float, headroom: float = 0.10, figure: ActivationFigure | None = None) -> dict:
    """Per-GPU memory of an x2t recipe (TRL GRPO on the understanding expert, one process on one GPU). The
    understanding expert has the generation expert's widths, so the measured per-token figure of a decoder layer
    serves for its activations; TRL adds the completions' logits (fp32, with their gradient) and, while it samples,
    the KV cache of the whole generated batch."""
    from lance_rl.x2t.recipe import lora_targets

    config, source = model_config(cfg.model.checkpoint)
    t, g = cfg.train, cfg.grpo
    precision = "bf16" if t.precision in ("auto", "bf16") else "fp32"
    e = BYTES[precision]
    counts = parameter_bytes(config)
    layers = config.num_hidden_layers
    if t.policy == "lora":
        trainable = lora_parameters(config, cfg.lora.rank, [lora_targets(cfg, layers)])
        frozen = counts["total"]
    else:  # the understanding expert and lm_head (embed_tokens too unless frozen)
        head = config.vocab_size * config.hidden_size
        trainable = counts["understanding_expert"] + head + (0 if cfg.model.freeze_embeddings else head)
        frozen = counts["total"] - trainable
    vit = _vit_tokens(cfg.model.resolution) * (2 if cfg.task == "x2t_video" else 1)
    tokens = vit + TEXT_PREFIX_TOKENS + g.max_completion_length  # one completion row
    batch = g.prompts_per_step * g.num_generations
    micro = g.micro_batch_size or batch
    trains = "lora" if t.policy == "lora" else "generation"
    figure = figure or activation_figure(config, "t2i", precision, cfg.model.gradient_checkpointing, trains,
                                         cfg.lora.rank, "cond_only")  # fmt: skip
    activations = micro * figure.block(tokens, layers)
    if cfg.model.gradient_checkpointing:
        full = activation_figure(config, "t2i", precision, False, trains, cfg.lora.rank, "cond_only")
        activations += micro * tokens * full.per_target_token
    kv_bytes = 2 * config.num_key_value_heads * config.head_dim * e
    trainer = {
        "weights": frozen * e + trainable * 4,
        "gradients": trainable * 4,
        "optimizer (AdamW)": trainable * 8,
        f"activations ({micro} completions of {tokens} tokens)": activations,
        "completion logits": micro * g.max_completion_length * config.vocab_size * 4 * 2,
        f"sampling KV cache ({batch} completions)": batch * tokens * layers * kv_bytes,
    }
    result = _place({"trainer": trainer}, [("trainer", 1.0)], gpus, gpu_memory_gb, headroom)
    return result | {"recipe_kind": "x2t", "model": source, "precision": precision, "trainable_parameters": trainable,
                     "tokens_per_completion": tokens, "activation_bytes_per_token_per_layer": figure.per_target_token}


# ------------------------------------------------------------------------------------------------ placement
def _place(roles: dict, placement: list[tuple[str, float]], gpus: int, gpu_memory_gb: float, headroom: float) -> dict:
    """Put roles on GPUs in order (a role asking for a GPU share shares a GPU until it is full; a role with no GPU
    share runs on CPUs) and total each GPU."""
    load = [0.0] * gpus
    members: list[list[str]] = [[] for _ in range(gpus)]
    cpu_roles = []
    for name, share in placement:
        if share <= 0:
            cpu_roles.append(name)
            continue
        gpu = next((i for i in range(gpus) if load[i] + share <= 1.0 + 1e-9), None)
        if gpu is None:
            raise ValueError(f"{name} asks for {share} GPU but the {gpus} GPU(s) are taken; raise --gpus")
        load[gpu] += share
        members[gpu].append(name)
    limit = gpu_memory_gb * (1 - headroom)
    out = []
    for i in range(gpus):
        total = sum(sum(roles[name].values()) for name in members[i]) / GB
        out.append({"gpu": i, "roles": members[i], "total_gb": round(total, 2), "fits": total <= limit})
    return {
        "fits": all(g["fits"] for g in out),
        "max_gpu_gb": max(g["total_gb"] for g in out),
        "gpu_memory_gb": gpu_memory_gb,
        "headroom": headroom,
        "gpus": out,
        "cpu_roles": cpu_roles,
        "roles": {name: {part: round(v / GB, 6) for part, v in parts.items()} for name, parts in roles.items()},
    }


# ------------------------------------------------------------------------------------------------ the command
def plan(recipe: str, gpus: int, gpu_memory_gb: float = 80.0, overrides: list[str] | None = None) -> dict:
    import yaml

    from lance_rl.config import load_recipe

    data = yaml.safe_load(Path(recipe).read_text()) or {}
    if str(data.get("task", "")).startswith("x2t"):
        from lance_rl.x2t.config import X2TConfig

        return plan_x2t(load_recipe(X2TConfig, recipe, overrides), gpus, gpu_memory_gb)
    if "rewards" in data:
        from lance_rl.rl_config import RLConfig

        return plan_rl(load_recipe(RLConfig, recipe, overrides), gpus, gpu_memory_gb)
    if "sft" in data and "rl" in data:
        raise ValueError(f"{recipe} is a pipeline: plan its stages' recipes one by one")
    from lance_rl.sft_config import SFTConfig

    return plan_sft(load_recipe(SFTConfig, recipe, overrides), gpus, gpu_memory_gb)


def format_plan(result: dict) -> str:
    lines = [f"model: {result['model']}; precision {result['precision']}"
             + (f"; strategy {result['strategy']}" if "strategy" in result else ""),
             f"activations: {result['activation_bytes_per_token_per_layer'] / 1024:.1f} KiB per token per layer (measured)"]  # fmt: skip
    for role, parts in result["roles"].items():
        if role.startswith("process ") and role != "process 0":
            continue
        lines.append(f"{role}: " + ", ".join(f"{k} {v:.2f} GB" for k, v in parts.items() if v))
    limit = result["gpu_memory_gb"] * (1 - result["headroom"])
    for g in result["gpus"]:
        verdict = "fits" if g["fits"] else "DOES NOT FIT"
        lines.append(f"GPU {g['gpu']}: {g['total_gb']:.1f} GB of {limit:.0f} GB usable ({verdict}): {', '.join(g['roles'])}")
    if result.get("cpu_roles"):
        lines.append(f"on CPUs: {', '.join(result['cpu_roles'])}")
    if "largest_micro_batch" in result:
        lines.append(f"largest micro-batch that fits the trainer's GPU: {result['largest_micro_batch']} rows")
    lines.append(f"verdict: {'fits' if result['fits'] else 'does not fit'} (fullest GPU {result['max_gpu_gb']:.1f} GB)")
    return "\n".join(lines)


def main(args) -> int:
    result = plan(args.recipe, args.gpus, args.gpu_memory, args.overrides)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0 if result["fits"] else 1
