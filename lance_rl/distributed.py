"""How the SFT model is wrapped, stepped and saved under each `train.strategy`. One engine per strategy, the same
methods on each, so the loop in sft.py never asks which strategy runs.

    ddp    every process holds the whole model, its gradients and AdamW states; gradients are averaged (torch DDP).
    fsdp2  torch's `fully_shard` on every decoder layer, then on the root (embeddings, ViT, heads): parameters,
           gradients and AdamW states are split over the processes. With bf16 precision (CUDA) each unit is
           all-gathered in bf16 for compute and its gradients reduced in fp32; the shards stay fp32 where they train.
    zero2  DeepSpeed ZeRO-2: gradients and AdamW states split, parameters whole on every process.
    zero3  DeepSpeed ZeRO-3: parameters split too.

    engine = build_engine(strategy, policy, optim, total_steps, accumulate, device)
    out = engine.module(batch, noise=noise)     # the forward
    engine.backward(loss, last=...)            # one pack's loss; the engine weighs it 1 / accumulate
    grad_norm = engine.step()                  # clip to optim.max_grad_norm, update
    engine.local_trainable()                   # this process's share of the trainable weights (what EMA averages)
    engine.save(directory, ema) / engine.load(directory, ema)      # sharded strategies: every process its shards
    read_sharded_weights(directory, strategy)  # one CPU process: the full trainable weights (export)

Why torch and DeepSpeed directly rather than through accelerate's plugins: accelerate turns FSDP and DeepSpeed off on
CPUs (the tests run two gloo processes), and the wrapping (which modules are units, frozen beside trainable weights,
the mixed precision, what a checkpoint holds) is the model's business. accelerate stays the launcher:
`accelerate launch --config_file recipes/accelerate/<strategy>.yaml` starts one process per GPU, and a config that
names a strategy must agree with the recipe's (`launched_strategy`).

The same optimizer everywhere: `lance_rl.trainer.build_optimizer` (torch AdamW and its schedule), handed to DeepSpeed
as a client optimizer, so every strategy makes the same update and the lr schedule is the recipe's. (DeepSpeed's own
CPU Adam would be needed only for optimizer offload, which these recipes do not use.)

Parameters a pack does not use (no answer tokens: lm_head and the last layer's understanding MLP; no latents: the
generation expert) get a zero gradient on that process, so processes whose packs exercise different parts of the
model still reduce the same tensors: DDP finds them (`find_unused_parameters`), FSDP2 reduces zeros for them
(`set_reduce_scatter_unused_params`). Every strategy steps every trainable parameter every step, one that no pack
used with a zero gradient (AdamW's moments decay; with weight decay 0 and no history it does not move), so all four
make the same update. DeepSpeed cannot take packs that differ between processes: its gradient buckets follow the
order in which gradients arrive, and ZeRO-3 gathers a module's weights when that module runs, so every process must
run the same modules in each micro-step. `check_pack` verifies that before the forward (one small all-reduce) and
stops the run with a message when packs differ; fsdp2 has no such restriction.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from lance_rl.config import OptimSection, RecipeError

STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")
SHARDED = ("fsdp2", "zero2", "zero3")
DEEPSPEED_TAG = "state"  # the tag (sub-directory) DeepSpeed writes its files under


# ------------------------------------------------------------------------------------------------ processes
def init_processes(strategy: str, device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Joins the process group torchrun or `accelerate launch` describe
    (NCCL on GPUs, gloo on CPUs); a sharded strategy in a single process started without a launcher gets a group of
    one, so every strategy also runs as `lance-rl sft` alone. Each process takes the GPU its LOCAL_RANK names."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device in ("auto", "cuda") and torch.cuda.is_available():
        place = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        place = torch.device("cpu" if device == "auto" else device)
    if place.type == "cuda":
        torch.cuda.set_device(place)
    if (world > 1 or strategy in SHARDED) and not dist.is_initialized():
        backend = "nccl" if place.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _JOINED.append(True)
    return (dist.get_rank() if dist.is_initialized() else 0), world, place


_JOINED: list[bool] = []  # init_processes created the process group (a caller's own group is left alone)


def leave_processes() -> None:
    """Leave the process group init_processes created (the pipeline runs RL in the same process afterwards)."""
    if _JOINED and dist.is_initialized():
        dist.destroy_process_group()
    _JOINED.clear()


def launched_strategy(env=None) -> str | None:
    """The strategy an `accelerate launch` config announced (its environment variables), or None for a plain launch
    (torchrun, a MULTI_GPU config, no launcher)."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp2" if env.get("FSDP_VERSION") == "2" else f"fsdp{env.get('FSDP_VERSION', '1')}"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"zero{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '')}"
    return None


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_over_processes(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all processes (the values themselves with one process)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj) -> list:
    """`obj` from every process, in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------ the engines
class Engine:
    """The strategy-independent face of a wrapped model. `module` is what the loop calls; `model` is the LanceModel."""

    strategy = "ddp"
    sharded = False

    def __init__(self, policy, accumulate: int, max_grad_norm: float, device: torch.device):
        self.policy, self.model = policy, policy.module
        self.accumulate, self.max_grad_norm, self.device = accumulate, max_grad_norm, device
        self.module = self.model
        self.optimizer = self.scheduler = None

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return self.policy.trainable

    def check_pack(self, batch) -> None:
        """Only DeepSpeed needs the same modules to run on every process."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.accumulate).backward()

    def step(self) -> float:
        from lance_rl.trainer import clip_gradients

        params = list(self.trainable.values())
        for p in params:
            if p.grad is None:  # no pack used it: step it with a zero gradient, as the sharded strategies do
                p.grad = torch.zeros_like(p)
        norm = clip_gradients(params, self.max_grad_norm)
        self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def discard_gradients(self, started: bool) -> None:
        """Drop what this step accumulated (a non-finite loss somewhere: every process skips the update)."""
        self.zero_grad()

    def local_trainable(self) -> dict[str, torch.nn.Parameter]:
        """This process's share of the master weights, updated in place by the optimizer: what EMA averages."""
        return self.trainable

    def save(self, directory: Path, ema) -> None:
        raise NotImplementedError("ddp checkpoints are written whole by process 0 (sft.py)")

    def load(self, directory: Path, ema) -> None:
        raise NotImplementedError("ddp checkpoints are read whole (sft.py)")


class DataParallelEngine(Engine):
    """torch DDP over the whole model (the module as it is with one process). Unused parameters are expected: a pack
    without answers gives the last layer's understanding MLP no gradient."""

    def __init__(self, policy, optim: OptimSection, total_steps: int, accumulate: int, device: torch.device):
        from lance_rl.trainer import build_optimizer

        super().__init__(policy, accumulate, optim.max_grad_norm, device)
        if world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel
            self.module = ddp(self.model, device_ids=ids, find_unused_parameters=True)
        self.optimizer, self.scheduler = build_optimizer(list(self.trainable.values()), optim, total_steps)


class FullyShardedEngine(Engine):
    """FSDP2. Units: each `MoTDecoderLayer` (both experts, frozen and trainable weights together), then the root
    (embeddings, lm_head, generation heads and the ViT). The ViT stays in the root unit on purpose: it runs only for
    packs with images to understand or edit, and a unit of its own would be all-gathered by some processes and not
    others."""

    strategy = "fsdp2"
    sharded = True

    def __init__(self, policy, optim: OptimSection, total_steps: int, accumulate: int, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lance_rl.trainer import build_optimizer

        super().__init__(policy, accumulate, optim.max_grad_norm, device)
        mesh = init_device_mesh(device.type, (world_size(),))
        layer_policy, root_policy = mixed_precision(policy.spec.precision)
        for layer in self.model.language_model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=layer_policy)
        fully_shard(self.model, mesh=mesh, mp_policy=root_policy)
        self.model.set_reduce_scatter_unused_params(True)
        self.optimizer, self.scheduler = build_optimizer(list(self.trainable.values()), optim, total_steps)

    def step(self) -> float:
        from torch.distributed.tensor import DTensor

        params = [p for p in self.trainable.values() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf")) if params else 0.0
        self.optimizer.step()
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def local_trainable(self) -> dict[str, torch.nn.Parameter]:
        return as_parameters({n: p.data.to_local() for n, p in self.trainable.items()})

    def _state(self, ema) -> dict:
        """What a checkpoint holds, as DTensors: the trainable weights, AdamW and the EMA shards (wrapped with the
        parameters' own layout, so a checkpoint can be read back by any number of processes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        from torch.distributed.tensor import DTensor

        model, optim = get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": model, "optim": optim}
        if ema is not None:
            shadow = ema.weights()
            state["ema"] = {n: DTensor.from_local(shadow[n], p.device_mesh, p.placements, run_check=False,
                                                  shape=p.shape, stride=p.stride())
                            for n, p in self.trainable.items()}  # fmt: skip
        return state

    def save(self, directory: Path, ema) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(ema), checkpoint_id=str(directory))

    def load(self, directory: Path, ema) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state(ema)
        dcp.load(state, checkpoint_id=str(directory))
        # Not strict: the checkpoint holds no frozen weights (they are the base checkpoint's); dcp.load above already
        # failed if a trainable one was missing.
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))  # fmt: skip
        if ema is not None:
            for name, shadow in ema.weights().items():
                shadow.copy_(state["ema"][name].to_local())


def as_parameters(shards: dict[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """Parameters that share the shards' storage: diffusers' EMAModel averages only tensors that require grad (it
    copies the others)."""
    return {n: torch.nn.Parameter(shard, requires_grad=True) for n, shard in shards.items()}


def mixed_precision(precision: str):
    """(decoder-layer policy, root policy). bf16: compute copies in bf16, gradients reduced in fp32; the root keeps
    its inputs as given (the flow noise stays fp32). fp32: nothing is cast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "bf16":
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    layer = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    root = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return layer, root


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2 or ZeRO-3 around the same torch AdamW. With bf16 precision DeepSpeed keeps bf16 weights in the
    module and fp32 master weights in the optimizer (gradients reduced in fp32); in fp32 everything is fp32.

    DeepSpeed updates the weights inside the last micro-step's `backward` (its `step()` is called after every
    micro-step and acts at the accumulation boundary, which this engine sets explicitly); `step()` then reports the
    gradient norm."""

    sharded = True

    def __init__(self, stage: int, policy, optim: OptimSection, total_steps: int, accumulate: int,
                 device: torch.device):  # fmt: skip
        import deepspeed

        from lance_rl.trainer import build_optimizer

        super().__init__(policy, accumulate, optim.max_grad_norm, device)
        self.stage, self.strategy = stage, f"zero{stage}"
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        optimizer, self.scheduler = build_optimizer(list(self.trainable.values()), optim, total_steps)
        config = deepspeed_config(stage, world_size(), accumulate, optim.max_grad_norm, policy.spec.precision)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=config,
                                                             dist_init_required=False)  # fmt: skip
        self.module = self.ds
        policy.model.reset_buffers(device)  # bf16 casts every buffer, the rotary frequencies too: recompute them

    def check_pack(self, batch) -> None:
        """Stop before the forward when the processes' packs would run different modules (see the module docstring)."""
        parts = pack_parts(batch, with_vit=self.stage == 3)
        totals = sum_over_processes(parts, self.device)
        world = world_size()
        mixed = [name for name, total in zip(PACK_PARTS, totals) if 0 < total < world]
        if mixed:
            raise RuntimeError(
                f"train.strategy={self.strategy}: in this micro-step the packs of some processes have "
                f"{' and '.join(mixed)} and those of others do not, so the processes would run different modules, "
                "which DeepSpeed cannot reduce. Use "
                "train.strategy=fsdp2 (no such restriction), or data whose packs all have the same parts "
                "(generation-only or understanding-only datasets; for zero3 also no mix of tasks with and without a "
                "source image, and data.visual_dropout=0 for edits).")  # fmt: skip

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss)  # scaled by 1 / gradient_accumulation_steps = 1 / accumulate
        self.ds.step()  # updates only at the boundary

    def step(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def discard_gradients(self, started: bool) -> None:
        if started:  # DeepSpeed holds partial gradient sums of this step that it offers no way to drop
            raise FloatingPointError(f"train.strategy={self.strategy}: a non-finite loss after {self.accumulate} "
                                     "accumulated packs began; resume from the last checkpoint (--resume)")  # fmt: skip

    def local_trainable(self) -> dict[str, torch.nn.Parameter]:
        return as_parameters({n: shard for n, (_, shard) in self._fp32_shards().items()})

    def _fp32_shards(self) -> dict[str, tuple[int, torch.Tensor]]:
        """name -> (offset in the flattened parameter, this process's slice of its fp32 master weight), views into
        the optimizer's flat partitions."""
        from deepspeed.utils import safe_get_local_fp32_param

        shards = {}
        for name, p in self.trainable.items():
            if self.stage == 3:
                local = safe_get_local_fp32_param(p)
                shards[name] = (dist.get_rank() * local.numel() if dist.is_initialized() else 0, local)
            elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-2: the fragment this process updates, if any
                shards[name] = (p._hp_mapping.lp_fragment_address.start, p._hp_mapping.get_hp_fragment())
        return shards

    def save(self, directory: Path, ema) -> None:
        self.ds.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True, save_latest=False)
        if ema is not None:
            offsets = {n: offset for n, (offset, _) in self._fp32_shards().items()}
            shadow = ema.weights()
            shards = {n: (offsets[n], shadow[n].detach().cpu()) for n in offsets}
            shapes = {n: tuple(self._full_shape(p)) for n, p in self.trainable.items()}
            torch.save({"shards": shards, "shapes": shapes}, directory / f"ema_rank{dist.get_rank():05d}.pt")

    def _full_shape(self, p) -> torch.Size:
        return p.ds_shape if self.stage == 3 else p.shape

    def load(self, directory: Path, ema) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)  # fmt: skip
        if path is None:
            from lance_rl.trainer import CorruptCheckpoint

            raise CorruptCheckpoint(f"{directory} holds no DeepSpeed checkpoint")
        self.policy.model.reset_buffers(self.device)
        if ema is not None:
            saved = torch.load(directory / f"ema_rank{dist.get_rank():05d}.pt", map_location="cpu", weights_only=True)
            for name, shadow in ema.weights().items():
                shadow.copy_(saved["shards"][name][1])


def deepspeed_config(stage: int, world: int, accumulate: int, max_grad_norm: float, precision: str) -> dict:
    """The DeepSpeed configuration built from the recipe: one pack per micro-step, `accumulate` micro-steps."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulate,
        "train_batch_size": world * accumulate,
        "gradient_clipping": max_grad_norm,  # 0: no clipping, as optim.max_grad_norm
        "bf16": {"enabled": precision == "bf16"},
        "communication_data_type": "fp32",  # gradients reduced in fp32, as FSDP2's reduce_dtype
        "zero_optimization": {"stage": stage, "contiguous_gradients": True, "overlap_comm": stage == 3},
        "zero_allow_untested_optimizer": True,  # torch AdamW: the same update as the other strategies
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# What a pack exercises, in the order `pack_parts` reports it.
PACK_PARTS = ("generation tokens", "flow-matching targets", "answer tokens", "ViT tokens")


def pack_parts(batch, with_vit: bool) -> list[float]:
    """1.0 where the packed batch has each of PACK_PARTS (the generation expert and its heads run; llm2vae's output
    enters the loss; lm_head's output does; the ViT runs), 0.0 where not."""
    parts = [batch.vae_index.numel() > 0, bool(batch.mse_mask.any()), batch.ce_index.numel() > 0]
    parts.append(batch.vit_index.numel() > 0 if with_vit else False)
    return [float(p) for p in parts]


def build_engine(strategy: str, policy, optim: OptimSection, total_steps: int, accumulate: int,
                 device: torch.device) -> Engine:  # fmt: skip
    if strategy == "ddp":
        return DataParallelEngine(policy, optim, total_steps, accumulate, device)
    if strategy == "fsdp2":
        return FullyShardedEngine(policy, optim, total_steps, accumulate, device)
    if strategy in ("zero2", "zero3"):
        return DeepSpeedEngine(int(strategy[-1]), policy, optim, total_steps, accumulate, device)
    raise RecipeError(f"train.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")


# ------------------------------------------------------------------------------------------------ gathering
def read_sharded_weights(directory: Path, strategy: str, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full trainable weights (or their EMA) of a sharded checkpoint, assembled in this one process on the CPU
    (no process group needed): name -> fp32 tensor."""
    directory = Path(directory)
    if strategy == "fsdp2":
        return _read_dcp(directory, "ema" if ema else "model")
    if strategy in ("zero2", "zero3"):
        return _read_deepspeed_ema(directory) if ema else _read_deepspeed(directory)
    raise RecipeError(f"{directory}: strategy {strategy!r} writes no sharded checkpoint")


def _read_dcp(directory: Path, section: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from lance_rl.trainer import CorruptCheckpoint

    try:
        metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a missing or damaged .metadata file
        raise CorruptCheckpoint(f"{directory} cannot be read as a torch.distributed.checkpoint ({e})") from e
    prefix = section + "."
    template = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
                for key, meta in metadata.items() if key.startswith(prefix)}  # fmt: skip
    if not template:
        raise FileNotFoundError(f"{directory} holds no {section} weights"
                                + (" (train with train.ema_decay > 0)" if section == "ema" else ""))  # fmt: skip
    state = {section: template}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return state[section]


def _read_deepspeed(directory: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # a line per tensor
        weights = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DEEPSPEED_TAG,
                                                           exclude_frozen_parameters=True)  # fmt: skip
    return {k: v.detach().float() for k, v in weights.items()}


def _read_deepspeed_ema(directory: Path) -> dict[str, torch.Tensor]:
    """EMA shards are (offset, slice) of each flattened parameter, one file per process: lay them side by side."""
    files = sorted(directory.glob("ema_rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no EMA shards (train with train.ema_decay > 0)")
    flat, shapes = {}, {}
    for file in files:
        saved = torch.load(file, map_location="cpu", weights_only=True)
        shapes = saved["shapes"]
        for name, (offset, shard) in saved["shards"].items():
            numel = torch.Size(shapes[name]).numel()
            full = flat.setdefault(name, torch.zeros(numel, dtype=torch.float32))
            n = max(0, min(shard.numel(), numel - offset))  # ZeRO-3 pads the last process's slice
            full[offset : offset + n] = shard.reshape(-1)[:n]
    return {name: flat[name].view(shapes[name]) for name in shapes}
