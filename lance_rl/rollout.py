"""Rollouts: sample groups with the SDE sampler and record what the update needs; run them locally or in Ray actors.

A rollout request is one prompt with one seed per group member; its result holds, per member, the states entering and
leaving every stochastic step, their log-probabilities, the final latent and the decoded media (uint8). Workers hold
their own copy of the policy and receive only the trainable weights after each update (a LoRA adapter is megabytes).
Everything crosses process boundaries as numpy arrays and plain dicts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("lance_rl.rollout")


@dataclass
class PolicySpec:
    """How to build the policy in any process: the checkpoint plus LoRA settings (or None for full training)."""

    checkpoint: str
    vit_dir: str | None
    vae: str | None
    lora: dict | None  # LoraSection fields, or None
    trainable: str  # "lora" | "generation" | "both": which parameters train (and travel)
    device: str = "cpu"


def build_policy(spec: PolicySpec):
    """(policy module, LanceModel, tokenizer, codec). With LoRA the policy is the PEFT wrapper around the model."""
    from lance_rl.config import LoraSection
    from lance_rl.sft import apply_lora, freeze_for_full_training
    from lance_rl.model.checkpoint import load_lance
    from lance_rl.model.vae import build_vae, find_wan_vae

    loaded = load_lance(spec.checkpoint, vit_dir=spec.vit_dir, device=spec.device)
    model = loaded.model
    vae_path = spec.vae or (find_wan_vae(loaded.model_dir) if model.config.vae == "wan2.2" else None)
    codec = build_vae(model.config, vae_path, device=spec.device)
    model.requires_grad_(False)
    if spec.lora is not None:
        policy = apply_lora(model, LoraSection(**spec.lora))
    else:
        policy = model
        freeze_for_full_training(model, understanding=spec.trainable == "both", generation=True)
    return policy, model, loaded.tokenizer, codec


def trainable_state(policy) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().float().numpy() for n, p in policy.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(policy, state: dict[str, np.ndarray]) -> None:
    params = dict(policy.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"weights for unknown parameters: {missing[:5]}")
    for name, value in state.items():
        params[name].copy_(torch.from_numpy(np.asarray(value)).to(params[name].dtype))


def make_request(model, tokenizer, codec, request: dict):
    """A GenerationRequest from a plain dict: {"task", "prompt", "grid", optional "source": path to media}."""
    from lance_rl.model import media
    from lance_rl.model.sampling import GenerationRequest
    from lance_rl.model.vision import patchify_video

    req = GenerationRequest(request["task"], request["prompt"], tuple(request["grid"]))
    if request.get("source"):
        frames = media.read_media(request["source"])[0]
        resolution = request.get("resolution", max(request.get("height", 32), request.get("width", 32)))
        device = model.vae2llm.weight.device
        latent = codec.encode(media.vae_tensor(frames, resolution).to(device), sample=False)
        if req.task == "i2v":
            req.source_latent = latent[:1]
        else:
            # The ViT needs at least one 28 px merged patch; tiny sources are upsampled for it (not for the VAE).
            vit_resolution = resolution if isinstance(resolution, str) else max(int(resolution), 28)
            req.source_vit = patchify_video(media.vit_tensor(frames, vit_resolution))
            req.source_latent = latent
            req.target_grid = tuple(latent.shape[:3])
        request["source_media"] = frames
    return req


@torch.no_grad()
def rollout_groups(model, tokenizer, codec, requests: list[dict], sampler: dict) -> list[dict]:
    """Sample each request's group (one prefix per prompt, broadcast over its group) and decode the outputs.

    sampler: SamplerConfig fields plus "cfg" as CFGConfig fields. Returns one dict of numpy arrays per request.
    """
    from lance_rl.model import media
    from lance_rl.model.sampling import CFGConfig, SamplerConfig, generate

    cfg = SamplerConfig(**{k: v for k, v in sampler.items() if k != "cfg"}, cfg=CFGConfig(**sampler["cfg"]))
    results = []
    for request in requests:
        req = make_request(model, tokenizer, codec, dict(request))
        seeds = list(request["seeds"])
        traj = generate(model, tokenizer, [req], cfg, seeds, group_size=len(seeds), noise_seeds=request.get("noise_seeds"))
        t, h, w = req.target_grid
        pixels = np.stack([media.to_uint8(codec.decode(x.view(t, h, w, -1))) for x in traj.latents])  # [G, T, H, W, 3]
        results.append({
            "request_id": request["request_id"],
            "prompt_index": request["prompt_index"],
            "x_t": traj.x_t.cpu().numpy(),
            "x_next": traj.x_next.cpu().numpy(),
            "log_probs": traj.log_probs.cpu().numpy(),
            "latents": traj.latents.cpu().numpy(),
            "timesteps": traj.timesteps.cpu().numpy(),
            "steps": list(traj.steps),
            "media": pixels,
            "grid": [t, h, w],
        })  # fmt: skip
    return results


class LocalRollout:
    """Colocated mode: the trainer's own policy samples (one GPU, or this CPU without Ray)."""

    def __init__(self, model, tokenizer, codec):
        self.model, self.tokenizer, self.codec = model, tokenizer, codec

    def set_weights(self, state) -> None:  # the trainer's policy is the sampler: nothing to send
        pass

    def rollout(self, requests: list[dict], sampler: dict) -> list[dict]:
        was_training = self.model.training
        self.model.eval()
        try:
            requests = [dict(r, request_id=n) for n, r in enumerate(requests)]
            return rollout_groups(self.model, self.tokenizer, self.codec, requests, sampler)
        finally:
            self.model.train(was_training)

    def close(self) -> None:
        pass


class _Worker:
    """A Ray actor holding a policy copy; only coarse calls cross the boundary."""

    def __init__(self, spec: dict, threads: int = 1):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(threads)
        self.policy, self.model, self.tokenizer, self.codec = build_policy(PolicySpec(**spec))
        self.model.eval()

    def set_weights(self, state: dict) -> bool:
        load_trainable_state(self.policy, state)
        return True

    def rollout(self, requests: list[dict], sampler: dict) -> list[dict]:
        return rollout_groups(self.model, self.tokenizer, self.codec, requests, sampler)

    def pid(self) -> int:
        return os.getpid()


class RayRollout:
    """Rollout workers as Ray actors. Requests are dealt round-robin; a worker that dies is replaced, brought to the
    current weights, and its requests are run again, so nothing is lost."""

    def __init__(self, spec: PolicySpec, num_workers: int, num_cpus: float = 0.5, num_gpus: float = 0.0,
                 ray_address: str | None = None):  # fmt: skip
        import ray

        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            if ray_address:
                ray.init(address=ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        self.ray = ray
        self.spec = dict(spec.__dict__)
        self.actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_Worker)
        self.workers = [self._spawn() for _ in range(num_workers)]
        self.state_ref = None
        self.replaced = 0

    def _spawn(self):
        return self.actor_cls.remote(self.spec)

    def set_weights(self, state: dict) -> None:
        self.state_ref = self.ray.put(state)  # one copy in the object store, read by every worker
        self.ray.get([w.set_weights.remote(self.state_ref) for w in self.workers])

    def rollout(self, requests: list[dict], sampler: dict) -> list[dict]:
        requests = [dict(r, request_id=n) for n, r in enumerate(requests)]
        chunks = [requests[i :: len(self.workers)] for i in range(len(self.workers))]
        pending = {i: self.workers[i].rollout.remote(c, sampler) for i, c in enumerate(chunks) if c}
        results: list[dict] = []
        while pending:
            i, ref = next(iter(pending.items()))
            try:
                results += self.ray.get(ref)
                del pending[i]
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as e:
                log.warning("rollout worker %d died (%s); replacing it and redoing its %d request(s)", i,
                            type(e).__name__, len(chunks[i]))  # fmt: skip
                self.workers[i] = self._spawn()
                self.replaced += 1
                if self.state_ref is not None:
                    self.ray.get(self.workers[i].set_weights.remote(self.state_ref))
                pending[i] = self.workers[i].rollout.remote(chunks[i], sampler)
        return sorted(results, key=lambda r: r["request_id"])

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
