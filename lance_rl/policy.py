"""The policy both trainers and every rollout worker build the same way: Lance with its latent codec, the parameters
that train (LoRA presets or the release's freezing rules), its precision, its EMA and the weights that travel.

    policy = build_policy(PolicySpec(checkpoint, trains="lora", lora=LoraSection(enabled=True)))
    policy.module        the module to train (the PEFT wrapper with LoRA, else the LanceModel itself)
    policy.trainable     {name: parameter} of what trains, in fp32 whatever the precision
    policy.autocast()    the forward context: bf16 autocast in bf16 precision, nothing in fp32

Precision: in "bf16" every frozen weight (the other expert, embeddings, ViT, VAE) is stored in bf16 and the forward
runs under bf16 autocast, while the trainable weights (LoRA adapters, or the expert that trains) stay fp32: they are
the master copies the optimizer updates, and every process (trainer, rollout workers) builds the same layout, so a
rollout and an update on the same weights compute the same log-probabilities. The step and its log-probabilities are
fp32 in every precision (model/schedule.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lance_rl.config import LoraSection, RecipeError

log = logging.getLogger("lance_rl.policy")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ loading
def load_with_codec(checkpoint, vit_dir=None, vae=None, device="cpu", dtype: torch.dtype = torch.float32):
    """(LoadedLance, codec): the checkpoint and the latent codec its config names (a Wan2.2 VAE found inside or
    beside the checkpoint unless `vae` gives its path; the PatchVAE needs no file)."""
    from lance_rl.model.checkpoint import load_lance
    from lance_rl.model.vae import build_vae, find_wan_vae

    loaded = load_lance(checkpoint, vit_dir=vit_dir, device=device, dtype=dtype)
    config = loaded.model.config
    path = vae or (find_wan_vae(Path(checkpoint)) if config.vae == "wan2.2" else None)
    return loaded, build_vae(config, path, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ what trains
_LAYER = r"language_model\.model\.layers\.\d+\."
LORA_PRESETS = {
    "generation": [_LAYER + r"self_attn\.[qkvo]_proj_moe_gen", _LAYER + r"mlp_moe_gen\.(gate|up|down)_proj"],
    "understanding": [_LAYER + r"self_attn\.[qkvo]_proj", _LAYER + r"mlp\.(gate|up|down)_proj"],
}
LORA_PRESETS["both"] = LORA_PRESETS["generation"] + LORA_PRESETS["understanding"]

# Parameters of the generation side outside the decoder layers: the latent embedding and the flow head.
_GENERATION_HEADS = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")


def lora_target_regex(targets: str | list[str]) -> str:
    patterns = LORA_PRESETS[targets] if isinstance(targets, str) else targets
    return "|".join(f"(?:{p})" for p in patterns)


def apply_lora(model, lora: LoraSection):
    """Wrap the model with PEFT LoRA adapters on the target projections; only adapter weights train (and PEFT keeps
    them in fp32 when the base weights are bf16)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora_target_regex(lora.targets), init_lora_weights=True)  # fmt: skip
    return get_peft_model(model, config)


def freeze_for_full_training(model, understanding: bool, generation: bool, freeze_embeddings: bool = True) -> None:
    """The release's rules: the ViT never trains; embeddings frozen by default; each expert as asked (the generation
    heads time_embedder, vae2llm, llm2vae go with the generation expert)."""
    for name, p in model.named_parameters():
        if name.startswith("vit_model."):
            trainable = False
        elif "embed_tokens" in name or "lm_head" in name:
            trainable = not freeze_embeddings
        elif name.startswith("language_model."):
            trainable = generation if "_moe_gen" in name else understanding
        else:
            trainable = generation
        p.requires_grad_(trainable)


def is_generation_parameter(name: str) -> bool:
    """True for the generation expert and its heads (also under PEFT's `base_model.model.` prefix)."""
    name = name.removeprefix("base_model.model.")
    return "_moe_gen" in name or name.startswith(_GENERATION_HEADS)


# ------------------------------------------------------------------------------------------------ the policy
@dataclass(frozen=True)
class PolicySpec:
    """How to build the policy in any process (the trainer and every rollout worker build the same one)."""

    checkpoint: str
    vit_dir: str | None = None
    vae: str | None = None
    trains: Literal["lora", "generation", "understanding", "both"] = "lora"  # LoRA, or which experts train in full
    lora: LoraSection | None = None  # with trains="lora"
    precision: Literal["fp32", "bf16"] = "fp32"
    freeze_embeddings: bool = True  # full training: embed_tokens and lm_head stay frozen (the release's default)
    device: str = "cpu"


@dataclass
class Policy:
    module: torch.nn.Module  # what trains: the PEFT wrapper, or the LanceModel itself
    model: torch.nn.Module  # the LanceModel (inside the wrapper with LoRA)
    tokenizer: object
    codec: object
    spec: PolicySpec

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    @property
    def is_lora(self) -> bool:
        return self.spec.trains == "lora"

    @property
    def trains_understanding(self) -> bool:
        """Some trainable weight sits outside the generation expert, so text (and ViT) tokens' keys and values, the
        prefix of every generation request, depend on what trains."""
        return any(not is_generation_parameter(n) for n in self.trainable)

    def prefix_depends_on_training(self, task: str) -> bool:
        """Whether the cached prefix of `task` changes with the trainable weights: always when the understanding side
        trains; for editing also when only the generation expert trains (the clean source block is routed to it)."""
        from lance_rl.model.tasks import is_edit

        return self.trains_understanding or (is_edit(task) and bool(self.trainable))

    def autocast(self):
        """The forward's precision context (bf16 autocast on the policy's device type in bf16; nothing in fp32)."""
        if self.spec.precision == "fp32":
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def reference(self, frozen_copy: dict[str, torch.Tensor] | None = None):
        """The KL reference: with LoRA the base model (the adapter disabled, no second copy); in full training the
        initial values of the trainable weights (`frozen_copy`) swapped in for the duration."""
        if self.is_lora:
            return self.module.disable_adapter()
        if frozen_copy is None:
            raise ValueError("full training needs the frozen copy of the initial trainable weights for its reference")
        return swap_parameters(self.trainable, frozen_copy)


def build_policy(spec: PolicySpec) -> Policy:
    """Load the checkpoint in the spec's precision, decide what trains and put the trainable weights in fp32."""
    if spec.trains == "lora" and (spec.lora is None or not spec.lora.enabled):
        raise RecipeError("a LoRA policy needs lora.enabled: true")
    dtype = PRECISIONS[spec.precision]
    loaded, codec = load_with_codec(spec.checkpoint, spec.vit_dir, spec.vae, device=spec.device, dtype=dtype)
    module = make_trainable(loaded.model, spec)
    policy = Policy(module, loaded.model, loaded.tokenizer, codec, spec)
    if not policy.trainable:
        raise RecipeError("nothing to train: every parameter is frozen (check train.* and lora.*)")
    return policy


def make_trainable(model, spec: PolicySpec) -> torch.nn.Module:
    """Freeze what the spec keeps fixed, add LoRA or unfreeze experts, and keep the trainable weights in fp32;
    returns the module to train (the PEFT wrapper with LoRA)."""
    model.requires_grad_(False)
    if spec.trains == "lora":
        module = apply_lora(model, spec.lora)
    else:
        module = model
        freeze_for_full_training(model, understanding=spec.trains in ("understanding", "both"),
                                 generation=spec.trains in ("generation", "both"),
                                 freeze_embeddings=spec.freeze_embeddings)  # fmt: skip
    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights; the forward casts them under autocast
    return module


@contextlib.contextmanager
def swap_parameters(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor] | None):
    """Point each parameter at another tensor of its shape (EMA weights, the reference's initial weights) for the
    duration, then back; nothing is copied, so the swap costs no memory at any size. None swaps nothing."""
    if values is None:
        yield
        return
    saved = {n: p.data for n, p in params.items()}
    try:
        for n, p in params.items():
            p.data = values[n]
        yield
    finally:
        for n, p in params.items():
            p.data = saved[n]


def frozen_copy(params: dict[str, torch.nn.Parameter], precision: str) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable weights (the full-training KL reference, swapped in by `Policy.reference`).
    In bf16 precision a tensor whose values are all exactly bf16 numbers is kept in bf16: a release checkpoint is
    stored in bf16, so the reference is exact at half the memory (2.77 B parameters: 5.5 GB instead of 11 GB)."""
    out = {}
    for n, p in params.items():
        value = p.detach()
        low = value.to(torch.bfloat16)
        exact = precision == "bf16" and torch.equal(low.float(), value.float())
        out[n] = low if exact else value.clone()
    return out


# ------------------------------------------------------------------------------------------------ EMA
class EMA:
    """An exponential moving average of the trainable weights (diffusers' EMAModel does the averaging).

    `warmup=True` ramps the decay as Flow-GRPO does, min(decay, (1 + k) / (10 + k)) after the k-th update, so early
    averages are not dominated by the initial weights; `warmup=False` uses the fixed decay from the first update (the
    release's SFT EMA). Evaluation and saving swap the averaged weights in without copying (`swapped_in`).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, warmup: bool):
        from diffusers.training_utils import EMAModel

        self.names = list(params)
        self.averager = EMAModel(list(params.values()), decay=decay, min_decay=0.0 if warmup else decay, foreach=True)

    @property
    def decay(self) -> float:
        """The decay the last update used."""
        return float(getattr(self.averager, "cur_decay_value", 0.0) or 0.0)

    def step(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.averager.step(list(params.values()))

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.averager.shadow_params))

    def swapped_in(self, params: dict[str, torch.nn.Parameter]):
        return swap_parameters(params, self.weights())

    def state_dict(self) -> dict:
        state = self.averager.state_dict()
        return {"optimization_step": state["optimization_step"], "shadow": self.weights()}

    def load_state_dict(self, state: dict) -> None:
        for current, saved in zip(self.averager.shadow_params, (state["shadow"][n] for n in self.names)):
            current.copy_(saved)
        self.averager.optimization_step = int(state["optimization_step"])


# ------------------------------------------------------------------------------------------------ weights that travel
def trainable_state(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The trainable weights as detached CPU tensors (what a rollout worker needs after an update)."""
    return {n: p.detach().cpu() for n, p in params.items()}


@torch.no_grad()
def load_trainable_state(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    unknown = [n for n in state if n not in params]
    if unknown:
        raise KeyError(f"weights for unknown parameters: {unknown[:5]}")
    for name, value in state.items():
        params[name].copy_(torch.as_tensor(value).to(params[name].dtype))
