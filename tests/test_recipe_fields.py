"""Every field of the RL recipe is read by a run: a field that is accepted and never read (a setting that silently
does nothing) fails this test. Reads are recorded while real runs cover the branches: colocated LoRA with every
optional feature on, and a Ray worker with a full-parameter policy."""

import dataclasses

import pytest

from lance_rl.config import load_recipe
from lance_rl.rl import RLRecipe
from lance_rl.rl_config import RLConfig

RECIPE = "recipes/quickstart/rl.yaml"


class FieldReads:
    """Swap every dataclass in a config tree for a subclass that records which fields are read (by dotted path)."""

    def __init__(self):
        self.reads: set[str] = set()
        self.paused = False

    def track(self, obj, path: str = ""):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            names = {f.name for f in dataclasses.fields(obj)}
            reads, recorder = self.reads, self

            def getattribute(instance, name, _path=path, _names=names, _base=type(obj)):
                if name in _names and not recorder.paused:
                    reads.add(f"{_path}{name}")
                return _base.__getattribute__(instance, name)

            obj.__class__ = type(f"Tracked{type(obj).__name__}", (type(obj),), {"__getattribute__": getattribute})
            for name in names:
                self.track(object.__getattribute__(obj, name), f"{path}{name}.")
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                self.track(item, path)
        return obj


def every_field(cls, path: str = "") -> set[str]:
    import typing

    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.add(f"{path}{f.name}")
        inner = [hints[f.name], *typing.get_args(hints[f.name])]
        for tp in inner:
            if dataclasses.is_dataclass(tp):
                out |= every_field(tp, f"{path}{f.name}.")
    return out


def run_tracked(reads: FieldReads, overrides, monkeypatch):
    import lance_rl.rl as rl_module

    to_dict = rl_module.to_dict

    def untracked_to_dict(obj):  # writing config.json reads everything; that is not a use
        reads.paused = True
        try:
            return to_dict(obj)
        finally:
            reads.paused = False

    monkeypatch.setattr(rl_module, "to_dict", untracked_to_dict)
    recipe = RLRecipe(reads.track(load_recipe(RLConfig, RECIPE, overrides)))
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()


@pytest.mark.timeout(400)
def test_every_rl_field_is_read(tmp_path, sft_tiny, monkeypatch):
    model = sft_tiny / "checkpoints" / "step_0000200" / "model"
    common = [f"model.checkpoint={model}", "algorithm.name=flow_grpo", "prompts.height=16", "prompts.width=16",
              "sampler.num_steps=4", "sampler.window_size=1", "sampler.window_range=[0, 3]", "algorithm.prompts_per_update=2",
              "algorithm.group_size=2", "eval.num_prompts=2", "eval.num_steps=3", "train.updates=1",
              "rewards={jpeg_incompressibility: {weight: 1.0, normalize: running}}"]  # fmt: skip
    reads = FieldReads()
    run_tracked(reads, [*common, f"output_dir={tmp_path / 'a'}", "rollout.num_workers=0", "algorithm.beta=0.01",
                        "algorithm.micro_batch_size=1", "algorithm.cfg_grad=cond_only", "algorithm.clip_range_high=3e-4",
                        "model.gradient_checkpointing=true", "sampler.same_noise_in_group=true", "train.ema_decay=0.9",
                        "eval.every=1", "eval.gold_rewards={jpeg_compressibility: 1.0}", "logging.tensorboard=true",
                        "logging.wandb={mode: offline, project: lance-rl-tests}", "checkpoint.keep_last=1",
                        "optim.schedule=cosine", "optim.warmup_steps=1"], monkeypatch)  # fmt: skip
    run_tracked(reads, [*common, f"output_dir={tmp_path / 'b'}", "rollout.num_workers=1", "rollout.num_cpus_per_worker=0.25",
                        "train.policy=generation", "lora.enabled=false", "eval.every=0"], monkeypatch)  # fmt: skip
    for algorithm in ("mix_grpo", "diffusion_nft"):  # their own sections are read by their runs only
        run_tracked(reads, [*common, f"output_dir={tmp_path / algorithm}", "rollout.num_workers=0", "eval.every=0",
                            f"algorithm.name={algorithm}"], monkeypatch)  # fmt: skip
    never = sorted(every_field(RLConfig) - reads.reads)
    assert not never, f"recipe fields accepted but never read: {never}"
