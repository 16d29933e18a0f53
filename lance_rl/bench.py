"""Benchmarks (`lance-rl bench`): throughput as ratios measured in one run, and memory as bytes counted.

rollout: generating a group of G samples from one prompt with the shared, broadcast prefix cache, against a loop that
    generates them one at a time and re-encodes the prompt for each (what a naive rollout worker does).
train: one policy-update step (forward and backward through every recorded SDE step of a group, LoRA on the
    generation expert) reusing the rollout's prefix cache, against recomputing the prefix with gradients each time.
memory: the activation bytes one update micro-batch saves for backward, counted tensor by tensor with autograd's
    saved-tensor hooks, at the released model's widths (hidden 2048, MLP 11008, 16 heads, 2 KV heads) with a few
    layers and random weights, for the recipes' shapes; reported per token per layer, so that `lance-rl plan` can
    scale them to 36 layers and any micro-batch.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy inits
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _load(checkpoint: str | None):
    """The checkpoint to measure, or a fresh tiny one (seed 0)."""
    from lance_rl.model.checkpoint import init_tiny, load_lance

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_lance(checkpoint or init_tiny(Path(tmp) / "tiny", seed=0))
    return loaded.model, loaded.tokenizer


PROMPT = "two red circles on the left of the image"


def bench_rollout(
    checkpoint: str | None = None,
    group_size: int = 16,
    num_steps: int = 10,
    grid: tuple[int, int, int] = (1, 8, 8),
    cfg_scale: float = 4.0,
    repeats: int = 3,
    **_,
) -> dict:
    from lance_rl.model.guidance import CFGConfig
    from lance_rl.model.prefix import GenerationRequest, encode_prefix
    from lance_rl.model.sampling import SamplerConfig, generate, initial_noise, sample

    model, tok = _load(checkpoint)
    config = SamplerConfig(num_steps=num_steps, shift=3.0, kind="sde", noise_level=0.7, sde_window=(0, num_steps - 1),
                           cfg=CFGConfig(scale=cfg_scale))  # fmt: skip
    request = GenerationRequest("t2i", PROMPT, grid)
    seeds = list(range(group_size))

    def grouped():
        generate(model, tok, [request], config, seeds, group_size=group_size)

    def one_at_a_time():
        for s in seeds:
            prefix = encode_prefix(model, tok, [request], config.cfg)
            noise = initial_noise(s, prefix.num_tokens)[None]
            sample(model, prefix, noise, config, [torch.Generator().manual_seed(s + 1)])

    with torch.no_grad():
        t_group = _timed(grouped, repeats)
        t_loop = _timed(one_at_a_time, repeats)
    return {
        "benchmark": "rollout",
        "checkpoint": str(checkpoint or "tiny (init-tiny, seed 0)"),
        "group_size": group_size,
        "num_steps": num_steps,
        "latent_grid": list(grid),
        "cfg_scale": cfg_scale,
        "grouped_s": round(t_group, 4),
        "one_at_a_time_s": round(t_loop, 4),
        "samples_per_s_grouped": round(group_size / t_group, 2),
        "samples_per_s_one_at_a_time": round(group_size / t_loop, 2),
        "speedup": round(t_loop / t_group, 2),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'cuda' if next(model.parameters()).is_cuda else 'cpu'}, torch {torch.__version__}",
    }


def bench_train(
    checkpoint: str | None = None,
    group_size: int = 16,
    num_steps: int = 10,
    grid: tuple[int, int, int] = (1, 8, 8),
    cfg_scale: float = 4.0,
    repeats: int = 3,
    **_,
) -> dict:
    from lance_rl.config import LoraSection
    from lance_rl.policy import apply_lora
    from lance_rl.model.guidance import CFGConfig
    from lance_rl.model.prefix import GenerationRequest, encode_prefix
    from lance_rl.model.sampling import SamplerConfig, generate, velocity
    from lance_rl.model.schedule import step

    model, tok = _load(checkpoint)
    model.requires_grad_(False)
    policy = apply_lora(model, LoraSection(enabled=True, rank=16, alpha=32.0))
    cfg = CFGConfig(scale=cfg_scale)
    config = SamplerConfig(num_steps=num_steps, shift=3.0, kind="sde", noise_level=0.7, sde_window=(0, num_steps - 1), cfg=cfg)
    request = GenerationRequest("t2i", PROMPT, grid)
    traj = generate(model, tok, [request], config, list(range(group_size)), group_size=group_size)
    cached = encode_prefix(model, tok, [request], cfg).repeat(group_size)

    def update(prefix_of):
        policy.zero_grad(set_to_none=True)
        for j, i in enumerate(traj.steps):
            prefix = prefix_of()
            v = velocity(model, traj.x_t[:, j], traj.timesteps[i], prefix, cfg)
            out = step(traj.x_t[:, j], v, traj.timesteps[i], traj.timesteps[i + 1], "sde", 0.7, x_next=traj.x_next[:, j])
            out.log_prob.mean().backward()

    t_reuse = _timed(lambda: update(lambda: cached), repeats)
    t_fresh = _timed(lambda: update(lambda: encode_prefix(model, tok, [request], cfg, grad=True).repeat(group_size)), repeats)
    return {
        "benchmark": "train",
        "checkpoint": str(checkpoint or "tiny (init-tiny, seed 0)"),
        "group_size": group_size,
        "trained_steps": len(traj.steps),
        "latent_grid": list(grid),
        "cfg_scale": cfg_scale,
        "reuse_prefix_s": round(t_reuse, 4),
        "recompute_prefix_s": round(t_fresh, 4),
        "speedup": round(t_fresh / t_reuse, 2),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cpu, torch {torch.__version__}",
    }


# ------------------------------------------------------------------------------------------------ memory
# The recipes' update shapes at 3B: latent grid of the target and of the edit source (Wan2.2: 16 px, 4 frames).
SHAPES = {
    "t2i_512": {"task": "t2i", "grid": (1, 32, 32)},  # 512x512
    "t2v_33x240x416": {"task": "t2v", "grid": (9, 15, 26)},  # 33 frames of 240x416
    "edit_512": {"task": "image_edit", "grid": (1, 32, 32), "vit_grid": (1, 36, 36)},  # 512x512 source and target
}


def measure_update_activations(config, shape: dict, rows: int = 1, precision: str = "fp32", checkpointing: bool = False,
                               trains: str = "lora", lora_rank: int = 64, cfg_grad: str = "full",
                               prompt: str = PROMPT) -> dict:  # fmt: skip
    """Bytes one update micro-batch of `rows` samples saves for backward (unique storages, parameters excluded),
    counted with saved-tensor hooks over a real forward at `config`'s widths: the target block against the cached
    prefix (both CFG branches with cfg_grad "full"), and for editing the prefix too, which trainable weights shape."""
    from lance_rl.config import LoraSection
    from lance_rl.model.guidance import CFGConfig
    from lance_rl.model.lance import LanceModel
    from lance_rl.model.prefix import GenerationRequest, encode_prefix
    from lance_rl.model.sampling import velocity
    from lance_rl.model.tokenizer import build_tiny_tokenizer
    from lance_rl.model.tasks import is_edit
    from lance_rl.policy import PRECISIONS, PolicySpec, make_trainable

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = LanceModel(config).to(PRECISIONS[precision])
    spec = PolicySpec("-", trains=trains, precision=precision,
                      lora=LoraSection(enabled=True, rank=lora_rank, alpha=2.0 * lora_rank) if trains == "lora" else None)  # fmt: skip
    module = make_trainable(model, spec)
    model.language_model.model.gradient_checkpointing = checkpointing
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    cfg = CFGConfig(scale=4.0)
    request = GenerationRequest(shape["task"], prompt, shape["grid"])
    edit = is_edit(shape["task"])
    if edit:
        t, h, w = shape["vit_grid"]
        request.source_vit = (torch.randn(t * h * w, 3 * 2 * 14 * 14), shape["vit_grid"])
        request.source_latent = torch.randn(*shape["grid"], config.latent_channels)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    counted: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            counted[key] = t.untyped_storage().nbytes()
        return t

    with autocast:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            prefix = encode_prefix(model, tokenizer, [request], cfg, grad=edit)
        prefix_bytes = sum(counted.values())
        target = request.target_grid[0] * request.target_grid[1] * request.target_grid[2]
        x = torch.randn(rows, target, config.latent_channels)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            velocity(model, x, 0.8, prefix.repeat(rows), cfg, uncond_grad=cfg_grad == "full")
    block_bytes = sum(counted.values()) - prefix_bytes
    branches = 2 if cfg_grad == "full" else 1
    layers = config.num_hidden_layers
    prefix_tokens = len(prefix.plans[0]) - target - 2
    return {
        "task": shape["task"], "rows": rows, "precision": precision, "checkpointing": checkpointing, "trains": trains,
        "cfg_grad": cfg_grad, "layers": layers, "target_tokens": target, "prefix_tokens": prefix_tokens,
        "block_bytes": block_bytes, "prefix_bytes": prefix_bytes,
        # Per row, CFG branch, token of the target block and layer: what the planner multiplies back up.
        "activation_bytes_per_token_per_layer": block_bytes / (rows * branches * (target + 2) * layers),
        # The edit prefix: per token of the prefix and layer (with grad for both branches' prefixes).
        "prefix_bytes_per_token_per_layer": prefix_bytes / (branches * prefix_tokens * layers) if edit else 0.0,
    }  # fmt: skip


def bench_memory(layers: int = 2, shapes: list[str] | None = None, rows: int = 1,
                 precisions: tuple[str, ...] = ("fp32", "bf16"), **_) -> dict:  # fmt: skip
    """Measured activation bytes per token per layer at the released widths, with and without checkpointing, in fp32
    and bf16, for each recipe shape; plus the exact parameter counts of the full 36-layer model."""
    from lance_rl.model.config import TINY_VISION, lance_3b
    from lance_rl.plan import activation_figure, parameter_bytes

    full = lance_3b()
    config = dataclasses.replace(full, num_hidden_layers=layers, vocab_size=640,
                                 vision_config=dict(TINY_VISION, out_hidden_size=full.hidden_size))  # fmt: skip
    settings = []
    for name in shapes or list(SHAPES):
        for precision in precisions:
            for checkpointing in (False, True):
                started = time.perf_counter()
                measured = measure_update_activations(config, SHAPES[name], rows, precision, checkpointing)
                seconds = round(time.perf_counter() - started, 1)
                # What `lance-rl plan` predicts for the same block from its small-block measurement.
                figure = activation_figure(full, SHAPES[name]["task"], precision, checkpointing, "lora", 64, "full")
                planned = 2 * rows * (figure.block(measured["target_tokens"] + 2, layers)
                                      + layers * measured["prefix_tokens"] * 2 * full.num_key_value_heads
                                      * full.head_dim * (2 if precision == "bf16" else 4))  # fmt: skip
                settings.append({"shape": name, **measured, "planned_block_bytes": planned,
                                 "planned_over_measured": round(planned / measured["block_bytes"], 3), "seconds": seconds})  # fmt: skip
                print(f"  {name} {precision} checkpointing={checkpointing}: "
                      f"{measured['activation_bytes_per_token_per_layer'] / 1024:.1f} KiB per token per layer; plan / "
                      f"measured {planned / measured['block_bytes']:.3f} ({seconds} s)", flush=True)  # fmt: skip
    return {
        "benchmark": "memory",
        "widths": {"hidden": config.hidden_size, "intermediate": config.intermediate_size, "heads":
                   config.num_attention_heads, "kv_heads": config.num_key_value_heads, "measured_layers": layers},
        "settings": settings,
        "parameters_3b": parameter_bytes(full),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cpu, torch {torch.__version__}",
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ weight sync
class _Sink:
    """A Ray actor holding tensors of the synced shapes, loading buckets as a rollout worker does."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        torch.set_num_threads(1)
        self.params = {n: torch.nn.Parameter(torch.zeros(s), requires_grad=False) for n, s in shapes.items()}
        self.dtypes = {n: torch.float32 for n in shapes}

    def load_bucket(self, bucket: dict) -> None:
        from lance_rl.policy import load_trainable_state
        from lance_rl.rollout import from_bucket

        load_trainable_state(self.params, from_bucket(bucket, self.dtypes))

    def set_version(self, version: int) -> int:
        return version


def _sync_shapes(config, rank: int | None, layers: int) -> dict[str, tuple[int, ...]]:
    """Exact shapes of what a sync moves at the config's widths: LoRA adapters of `rank` on the generation expert,
    or (rank None) the full generation expert, for the first `layers` decoder layers."""
    import re

    from lance_rl.model.lance import LanceModel
    from lance_rl.policy import lora_target_regex

    small = dataclasses.replace(config, num_hidden_layers=layers, vision_config=None, vocab_size=640)
    with torch.device("meta"):
        model = LanceModel(small)
    if rank is None:
        return {n: tuple(p.shape) for n, p in model.named_parameters() if "_moe_gen" in n}
    pattern = re.compile(lora_target_regex("generation"))
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name):
            shapes[f"{name}.lora_A"], shapes[f"{name}.lora_B"] = (rank, m.in_features), (m.out_features, rank)
    return shapes


def bench_sync(layers: int = 4, bucket_mb: float = 512.0, **_) -> dict:
    """Bytes and seconds per weight sync to one Ray worker at the released widths (CPU, local object store): LoRA r64
    on the generation expert, and the full generation expert, measured on `layers` decoder layers and scaled to 36."""
    from lance_rl.model.config import lance_3b
    from lance_rl.rollout import init_ray, send_weights

    import ray

    init_ray(None)
    config = lance_3b()
    rows = {}
    for label, rank in (("lora_r64", 64), ("generation_expert", None)):
        shapes = _sync_shapes(config, rank, layers)
        state = {n: torch.randn(s) for n, s in shapes.items()}
        sink = ray.remote(num_cpus=0.25)(_Sink).remote(shapes)
        ray.get(sink.set_version.remote(0))  # the actor is up before the clock starts
        started = time.perf_counter()
        moved = send_weights(state, [sink], 1, int(bucket_mb * 2**20))
        seconds = time.perf_counter() - started
        scale = config.num_hidden_layers / layers
        rows[label] = {"measured_layers": layers, "measured_bytes": moved["bytes"], "buckets": moved["buckets"],
                       "measured_s": round(seconds, 3), "bytes_at_36_layers": int(moved["bytes"] * scale),
                       "seconds_at_36_layers": round(seconds * scale, 2),
                       "gb_per_s": round(moved["bytes"] / seconds / 1e9, 2)}  # fmt: skip
        ray.kill(sink)
        del state
    return {"benchmark": "sync", "bucket_mb": bucket_mb, **rows,
            "machine": f"{platform.machine()}, cpu, local Ray object store, torch {torch.__version__}"}


BENCHMARKS = {"rollout": bench_rollout, "train": bench_train, "memory": bench_memory, "sync": bench_sync}


def run(names: list[str], out: str | None = None, **kwargs) -> list[dict]:
    results = []
    for name in names:
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
        results.append(BENCHMARKS[name](**kwargs))
    for r in results:
        print(f"\n{r['benchmark']}")
        width = max(len(k) for k in r)
        for k, v in r.items():
            if k != "benchmark":
                print(f"  {k:<{width}}  {v}")
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {out}")
    return results
