"""Throughput benchmarks (`lance-rl bench`): ratios measured in one run, on whatever machine runs them.

rollout: generating a group of G samples from one prompt with the shared, broadcast prefix cache, against a loop that
    generates them one at a time and re-encodes the prompt for each (what a naive rollout worker does).
train: one policy-update step (forward and backward through every recorded SDE step of a group, LoRA on the
    generation expert) reusing the rollout's prefix cache, against recomputing the prefix with gradients each time.
"""

from __future__ import annotations

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


BENCHMARKS = {"rollout": bench_rollout, "train": bench_train}


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
