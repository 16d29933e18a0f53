"""Rollouts: sample a group per prompt with the SDE sampler, record what the update needs, and run it in the trainer
itself or in Ray actors.

The seam between the trainer and its workers is typed: a `RolloutRequest` (one prompt, one seed per group member)
and the update's `SamplerConfig` go out; a `RolloutResult` comes back with, per member, the states entering and
leaving every recorded step, their log-probabilities, the decoded media (uint8), and the weights version it was
sampled with. The trainer checks that version, so a result sampled before the latest sync is refused, never trained
on. Workers build the same `Policy` as the trainer and receive only the trainable weights after each update, one
bucket of bounded size at a time (a LoRA adapter is megabytes; a full generation expert is 11 GB in fp32).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from lance_rl.policy import Policy, PolicySpec, build_policy, load_trainable_state

log = logging.getLogger("lance_rl.rollout")


@dataclass(frozen=True)
class RolloutRequest:
    request_id: int  # position in the update's batch
    prompt_index: int  # row of the prompt set (prompts with one index share a prefix)
    prompt: str
    task: str
    grid: tuple[int, int, int]  # the latent grid of the output
    seeds: tuple[int, ...]  # one per group member: its SDE noise (and, by default, its initial noise)
    noise_seeds: tuple[int, ...] | None = None  # initial noise per member (Flow-GRPO's same_latent: all equal)
    source: str | None = None  # source media path (editing, i2v)
    resolution: int | str = 32  # source preprocessing: an area side or a preset name


@dataclass(frozen=True, eq=False)
class RolloutResult:
    request_id: int
    weights_version: int  # the update whose weights sampled it
    x_t: np.ndarray  # [G, S, N, C] state entering each recorded step
    x_next: np.ndarray  # [G, S, N, C] state leaving it
    log_probs: np.ndarray  # [G, S]
    timesteps: np.ndarray  # [num_steps + 1]
    steps: tuple[int, ...]  # indices of the recorded steps
    media: np.ndarray  # [G, T, H, W, 3] uint8
    latents: np.ndarray  # [G, N, C] the final clean latents (DiffusionNFT trains on them)
    source_media: np.ndarray | None = field(default=None)  # [T, H, W, 3] uint8: the edit source, for rewards
    means: np.ndarray | None = field(default=None)  # [G, S, N, C] each recorded step's mean (GRPO-Guard)


class StaleRollout(RuntimeError):
    """A rollout sampled with weights older than the trainer's: training on it would be off-policy by surprise."""


def generation_request(policy: Policy, request: RolloutRequest):
    """The model-side request (with the source media encoded for editing or i2v) and the source pixels."""
    from lance_rl.model import media
    from lance_rl.model.prefix import GenerationRequest
    from lance_rl.model.vision import patchify_video

    req = GenerationRequest(request.task, request.prompt, tuple(request.grid))
    if not request.source:
        return req, None
    frames = media.read_media(request.source)[0]
    device = policy.model.vae2llm.weight.device
    with torch.no_grad():
        latent = policy.codec.encode(media.vae_tensor(frames, request.resolution).to(device), sample=False)
    if request.task == "i2v":
        req.source_latent = latent[:1]
        return req, frames
    # The ViT needs at least one 28 px merged patch; tiny sources are upsampled for it (not for the VAE).
    vit_resolution = request.resolution if isinstance(request.resolution, str) else max(int(request.resolution), 28)
    req.source_vit = patchify_video(media.vit_tensor(frames, vit_resolution))
    req.source_latent = latent
    req.target_grid = tuple(latent.shape[:3])
    return req, frames


@torch.no_grad()
def rollout_group(policy: Policy, request: RolloutRequest, sampler, version: int) -> RolloutResult:
    """Sample one request's group (one prefix, broadcast over the group) and decode the outputs."""
    from lance_rl.model import media
    from lance_rl.model.sampling import generate

    req, source = generation_request(policy, request)
    with policy.autocast():
        traj = generate(policy.model, policy.tokenizer, [req], sampler, list(request.seeds), group_size=len(request.seeds),
                        noise_seeds=list(request.noise_seeds) if request.noise_seeds else None)  # fmt: skip
    t, h, w = req.target_grid
    pixels = np.stack([media.to_uint8(policy.codec.decode(x.view(t, h, w, -1))) for x in traj.latents])
    return RolloutResult(
        request_id=request.request_id,
        weights_version=version,
        x_t=traj.x_t.cpu().numpy(),
        x_next=traj.x_next.cpu().numpy(),
        log_probs=traj.log_probs.cpu().numpy(),
        timesteps=traj.timesteps.cpu().numpy(),
        steps=tuple(traj.steps),
        media=pixels,
        latents=traj.latents.cpu().numpy(),
        source_media=source,
        means=traj.means.cpu().numpy() if traj.means is not None else None,
    )


# ------------------------------------------------------------------------------------------------ weights in buckets
def to_buckets(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Split weights into dicts of at most `max_bytes` (a tensor larger than that travels alone), as numpy arrays
    (bf16 as its 16-bit pattern; numpy has no bf16) so Ray moves them without copies."""
    buckets: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if buckets[-1] and size + nbytes > max_bytes:
            buckets.append({})
            size = 0
        t = tensor.detach().cpu().contiguous()
        buckets[-1][name] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        size += nbytes
    return buckets


def from_bucket(bucket: dict[str, np.ndarray], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    out = {}
    for name, array in bucket.items():
        t = torch.from_numpy(np.array(array))  # Ray hands back read-only arrays
        out[name] = t.view(torch.bfloat16) if dtypes[name] == torch.bfloat16 and t.dtype == torch.int16 else t
    return out


def send_weights(state: dict[str, torch.Tensor], workers: list, version: int, bucket_bytes: int) -> dict:
    """Stream `state` to Ray actors (methods `load_bucket`, `set_version`) one bucket at a time, then switch their
    version; returns the bytes and buckets moved."""
    import ray

    buckets = to_buckets(state, bucket_bytes)
    for bucket in buckets:
        ref = ray.put(bucket)  # one copy in the object store, read by every worker
        ray.get([w.load_bucket.remote(ref) for w in workers])
        del ref
    ray.get([w.set_version.remote(version) for w in workers])
    return {"bytes": sum(a.nbytes for b in buckets for a in b.values()), "buckets": len(buckets)}


# ------------------------------------------------------------------------------------------------ colocated
class LocalRollout:
    """The trainer's own policy samples (one GPU, or this CPU without Ray): always the current weights."""

    def __init__(self, policy: Policy):
        self.policy, self.version, self.weights = policy, 0, None

    def set_weights(self, policy: Policy, version: int, weights: dict | None = None) -> dict:
        """Nothing moves: the trainer's policy is the sampler (or `weights`, swapped in while sampling)."""
        self.version, self.weights = version, weights
        return {"bytes": 0, "buckets": 0}

    def stream(self, requests: list[RolloutRequest], sampler) -> Iterator[RolloutResult]:
        from lance_rl.policy import swap_parameters

        was_training = self.policy.module.training
        self.policy.module.eval()
        try:
            for request in requests:
                with swap_parameters(self.policy.trainable, self.weights):
                    result = rollout_group(self.policy, request, sampler, self.version)
                yield result
        finally:
            self.policy.module.train(was_training)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------ Ray workers
class _Worker:
    """A Ray actor holding its own copy of the policy; only coarse calls cross the boundary."""

    def __init__(self, spec: PolicySpec, threads: int = 1):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(threads)
        self.policy = build_policy(spec)
        self.policy.module.eval()
        self.params = self.policy.trainable
        self.dtypes = {n: p.dtype for n, p in self.params.items()}
        self.version = 0

    def load_bucket(self, bucket: dict) -> None:
        load_trainable_state(self.params, from_bucket(bucket, self.dtypes))

    def set_version(self, version: int) -> int:
        """Called after the last bucket of a sync: from now on results carry this version."""
        self.version = version
        return version

    def rollout(self, request: RolloutRequest, sampler) -> RolloutResult:
        return rollout_group(self.policy, request, sampler, self.version)

    def pid(self) -> int:
        return os.getpid()


class RayRollout:
    """Rollout workers as Ray actors. Each request is one call, dealt round-robin; `stream` yields results as they
    finish, so the trainer scores a group while the next ones sample. A worker that dies is replaced, brought to the
    current weights, and its unfinished requests are run again, so nothing is lost."""

    def __init__(self, spec: PolicySpec, num_workers: int, num_cpus: float = 0.5, num_gpus: float = 0.0,
                 bucket_mb: float = 512.0):  # fmt: skip
        import ray

        self.ray = ray
        self.spec = spec
        self.actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_Worker)
        self.workers = [self._spawn() for _ in range(num_workers)]
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.last_sync: dict | None = None  # the weights of the last sync, to bring a replacement worker up to date
        self.version = 0
        self.replaced = 0

    def _spawn(self):
        return self.actor_cls.remote(self.spec)

    def set_weights(self, policy: Policy, version: int, weights: dict | None = None) -> dict:
        """Send the trainable weights (LoRA only with LoRA), or `weights` of the same names, to every worker, one
        bucket at a time: the object store and each worker hold at most one bucket of `rollout.sync_bucket_mb`
        beyond the weights themselves (a full generation expert is 11 GB in fp32). Returns what moved."""
        state = weights if weights is not None else {n: p.detach() for n, p in policy.trainable.items()}
        moved = self._send(state, self.workers, version)
        self.last_sync, self.version = state, version
        return moved

    def _send(self, state: dict, workers: list, version: int) -> dict:
        return send_weights(state, workers, version, self.bucket_bytes)

    def stream(self, requests: list[RolloutRequest], sampler) -> Iterator[RolloutResult]:
        pending = {}  # ObjectRef -> (worker index, request)
        for n, request in enumerate(requests):
            i = n % len(self.workers)
            pending[self.workers[i].rollout.remote(request, sampler)] = (i, request)
        while pending:
            (ref,), _ = self.ray.wait(list(pending), num_returns=1)
            i, request = pending.pop(ref)
            try:
                yield self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as e:
                self._replace(i, e)
                pending[self.workers[i].rollout.remote(request, sampler)] = (i, request)
                # Calls queued on the dead actor fail too; resubmit them to its replacement now.
                for other, (j, queued) in list(pending.items()):
                    if j == i and other is not ref:
                        del pending[other]
                        pending[self.workers[i].rollout.remote(queued, sampler)] = (i, queued)

    def _replace(self, i: int, error: Exception) -> None:
        log.warning("rollout worker %d died (%s); replacing it and redoing its requests", i, type(error).__name__)
        self.workers[i] = self._spawn()
        self.replaced += 1
        if self.last_sync is not None:
            self._send(self.last_sync, [self.workers[i]], self.version)

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)


def init_ray(address: str | None, trainer_gpus: int = 0) -> None:
    """One `ray.init` for every Ray user of a run (rollout workers and reward actors), with the recipe's address.

    The trainer ranks' GPUs (0 .. trainer_gpus - 1 of this node) are kept from Ray's scheduler, so no rollout worker
    or reward actor lands on them: a local Ray sees only the other GPUs; on a cluster a placement group holds them."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=False)
        reserve_trainer_gpus(trainer_gpus)
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = ray_visible_gpus(trainer_gpus, torch.cuda.device_count(), saved)
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # the local raylet starts with (and keeps) this view
    try:
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    finally:
        if visible is not None:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES")
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved


def ray_visible_gpus(trainer_gpus: int, count: int, visible: str | None) -> str | None:
    """The CUDA_VISIBLE_DEVICES a local Ray should see: this node's GPUs without the first `trainer_gpus` (None
    when there is nothing to hide)."""
    if trainer_gpus <= 0 or count == 0:
        return None
    devices = visible.split(",") if visible else [str(i) for i in range(count)]
    if trainer_gpus >= len(devices):
        raise ValueError(f"the {trainer_gpus} trainer rank(s) take all {len(devices)} GPUs of this node; none is left "
                         "for rollout workers or reward actors (use rollout.num_workers: 0, colocated)")  # fmt: skip
    return ",".join(devices[trainer_gpus:])


_reservation = None


def reserve_trainer_gpus(trainer_gpus: int):
    """On a Ray cluster, hold this node's trainer GPUs in a placement group for the whole run."""
    global _reservation
    if trainer_gpus <= 0 or not torch.cuda.is_available():
        return None
    import ray
    from ray.util.placement_group import placement_group

    node = f"node:{ray.util.get_node_ip_address()}"
    _reservation = placement_group([{"GPU": 1, node: 0.001}] * trainer_gpus, strategy="STRICT_PACK")
    ray.get(_reservation.ready(), timeout=600)
    return _reservation
