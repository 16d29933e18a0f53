"""`lance-rl export RUN --out DIR`: a run's latest checkpoint as an official-layout model directory.

A LoRA checkpoint is merged into its base model; a full checkpoint is copied (with its EMA weights when asked); a
sharded one (train.strategy fsdp2, zero2, zero3) is gathered here, in one CPU process: the trained weights (or their
EMA) from every process's shards, the frozen ones from the base checkpoint the run started from. The result loads in
`lance-rl generate`, in the official inference code, and as `model.checkpoint` of a later recipe.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def checkpoint_of(run: str | Path) -> Path:
    """A run directory's latest checkpoint, or the checkpoint directory itself."""
    from lance_rl.checkpointing import latest_checkpoint

    run = Path(run)
    if (run / "trainer_state.pt").is_file():
        return run
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoint yet (no 'latest' file)")
    return ckpt


def export(run: str | Path, out: str | Path, ema: bool = False) -> Path:
    """Write the run's latest checkpoint as an official-layout directory and verify what was written: every
    safetensors file of the result is read back tensor by tensor, so a truncated source fails here, naming it."""
    from lance_rl.model.checkpoint import load_lance, save_lance

    ckpt = checkpoint_of(run)
    out = Path(out)
    if (ckpt / "sharded").is_dir():
        export_sharded(ckpt, out, ema)
    elif (ckpt / "adapter").is_dir():
        from peft import PeftModel

        verify_safetensors(ckpt / "adapter" / "adapter_model.safetensors")
        base_dir = (ckpt / "adapter" / "base_checkpoint.txt").read_text().strip()
        loaded = load_lance(base_dir)
        merged = PeftModel.from_pretrained(loaded.model, str(ckpt / "adapter")).merge_and_unload()
        save_lance(merged, loaded.tokenizer, out)
    elif ema:
        model_dir = ckpt / "model"
        if not (model_dir / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{model_dir} has no ema.safetensors (train with train.ema_decay > 0)")
        loaded = load_lance(model_dir, weights="ema")
        save_lance(loaded.model, loaded.tokenizer, out)
    else:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(ckpt / "model", out)
        (out / "ema.safetensors").unlink(missing_ok=True)
    for path in sorted(out.rglob("*.safetensors")):
        verify_safetensors(path)
    return out


def export_sharded(ckpt: Path, out: Path, ema: bool = False) -> Path:
    """Gather a sharded checkpoint into the official layout: the base model in the run's precision, its trained
    weights replaced by the gathered fp32 ones (the layout a ddp run writes: frozen weights in the run's precision,
    trained ones fp32)."""
    from lance_rl.distributed import read_sharded_weights
    from lance_rl.model.checkpoint import load_lance, save_lance
    from lance_rl.policy import PRECISIONS
    from lance_rl.trainer import read_trainer_state

    state = read_trainer_state(ckpt / "trainer_state.pt")
    weights = read_sharded_weights(ckpt / "sharded", state["strategy"], ema=ema)
    base = state["base"]
    loaded = load_lance(base["checkpoint"], vit_dir=base["vit_dir"], dtype=PRECISIONS[base["precision"]])
    params = dict(loaded.model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise KeyError(f"{ckpt}: trained weights the base model {base['checkpoint']} lacks: {unknown[:5]}")
    for name, value in weights.items():
        if value.shape != params[name].shape:
            raise ValueError(f"{ckpt}: {name} has shape {tuple(value.shape)}, in the base model "
                             f"{tuple(params[name].shape)}")
        params[name].data = value.float()
    return save_lance(loaded.model, loaded.tokenizer, out)


def verify_safetensors(path: Path) -> None:
    """Read every tensor of a safetensors file, one at a time (constant memory at any size); a truncated or damaged
    file raises CorruptCheckpoint naming it."""
    from safetensors import safe_open

    from lance_rl.trainer import CorruptCheckpoint

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:  # noqa: BLE001 - SafetensorError for a bad header, or a short read
        raise CorruptCheckpoint(f"{path} cannot be read ({type(e).__name__}: {e})") from e
