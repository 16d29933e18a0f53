"""A wrong setting or input fails before any model loads, in one line that names the field or the file, with a
non-zero exit; known failures later on (a reward that keeps failing, a corrupt checkpoint) end the same way."""

import json

import pytest
import yaml

from lance_rl.cli import main

RL = "recipes/quickstart/rl.yaml"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything starts loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe's inputs were checked")

    monkeypatch.setattr("lance_rl.policy.load_with_codec", refuse)
    monkeypatch.setattr("lance_rl.model.checkpoint.load_lance", refuse)


def rl_args(tmp_path, checkpoint, *extra):
    return ["rl", "--config", RL, f"output_dir={tmp_path / 'run'}", f"model.checkpoint={checkpoint}",
            "prompts.height=16", "prompts.width=16", "rollout.num_workers=0", *extra]  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def write(path, content: bytes | str):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["rewards={no_such_reward: 1.0}"], "rewards.no_such_reward: unknown reward 'no_such_reward'"),
        (["rewards={no_such_pkg.mod:score: 1.0}"], "rewards.no_such_pkg.mod:score: reward 'no_such_pkg.mod:score': cannot import"),
        (["rewards={jpeg_compressibility: {kwargs: {qualty: 3}}}"], "rewards.jpeg_compressibility: kwargs ['qualty'] not accepted; it takes quality"),
        (["rewards={shapes: {weight: 1.0, normalize: sometimes}}"], "rewards.shapes: reward 'shapes': normalize must be one of"),
        (["optim.lr=0"], "optim.lr must be positive"),
        (["checkpoint.every=0"], "checkpoint.every must be at least 1"),
        (["logging.every=0"], "logging.every must be at least 1"),
        (["prompts.height=18"], "prompts.height/width/num_frames: PatchVAE needs height and width that are positive multiples of 4"),
        (["prompts.height=1024", "prompts.width=1024"], "beyond the model's"),
        (["algorithm.prompts_per_update=500"], "algorithm.prompts_per_update is 500 but prompts.train holds 72 prompts"),
        (["eval.gold_rewards={nothing_here: 1.0}"], "eval.gold_rewards.nothing_here: unknown reward"),
        (["lora.dropout=0.05"], "lora.dropout is 0.05"),
    ],
)
def test_bad_rl_settings_fail_before_loading(tmp_path, tiny_ckpt, capsys, no_model_load, extra, expected):
    assert main(rl_args(tmp_path, tiny_ckpt, *extra)) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_bad_prompt_files_name_the_file_and_line(tmp_path, tiny_ckpt, capsys, no_model_load):
    cases = {
        "latin1.txt": (b"caf\xe9 au lait\n", "prompts.train: {} is not UTF-8 text"),
        "empty.txt": ("\n\n", "prompts.train: {} holds no prompts"),
        "broken.jsonl": ('{"prompt": "a"}\n{"prompt": \n', "prompts.train: {}:2: not valid JSON"),
        "noprompt.jsonl": ('{"text": "a"}\n', "prompts.train: {}:1: every line needs a non-empty string 'prompt'"),
        "nosource.jsonl": ('{"prompt": "a", "source": "missing.png"}\n', "prompts.train: {}:1: source missing.png does not exist"),
    }
    for name, (content, expected) in cases.items():
        path = write(tmp_path / name, content)
        assert main(rl_args(tmp_path, tiny_ckpt, f"prompts.train={path}", "algorithm.prompts_per_update=1")) == 2
        assert expected.format(path) in one_line_error(capsys), name
    empty = write(tmp_path / "eval.txt", "")
    assert main(rl_args(tmp_path, tiny_ckpt, f"prompts.eval={empty}")) == 2
    assert f"prompts.eval: {empty} holds no prompts" in one_line_error(capsys)
    assert main(rl_args(tmp_path, tmp_path / "nowhere")) == 2
    assert "model.checkpoint:" in one_line_error(capsys)


def test_bad_sft_inputs_fail_before_loading(tmp_path, tiny_ckpt, capsys, no_model_load):
    recipe = {"output_dir": str(tmp_path / "sft"), "model": {"checkpoint": str(tiny_ckpt)},
              "data": {"datasets": [{"path": str(tmp_path / "missing.parquet")}]}, "train": {"steps": 2}}  # fmt: skip
    path = write(tmp_path / "sft.yaml", yaml.safe_dump(recipe))
    assert main(["sft", "--config", str(path)]) == 2
    assert "data.datasets[0].path:" in one_line_error(capsys)
    assert main(["sft", "--config", str(path), "optim.lr=-1"]) == 2
    assert "optim.lr must be positive" in one_line_error(capsys)


def test_a_reward_that_keeps_failing_ends_the_run_in_one_line(tmp_path, sft_tiny, capsys):
    from lance_rl.rewards.registry import REGISTRY, register

    def broken(*, images, **kwargs):
        raise RuntimeError("the scorer's GPU fell off")

    register("test_broken", broken)
    try:
        model = sft_tiny / "checkpoints" / "step_0000200" / "model"
        code = main(rl_args(tmp_path, model, "rewards={test_broken: {weight: 1.0, retries: 0}}", "eval.every=0",
                            "sampler.num_steps=4", "sampler.window_range=[0, 3]", "algorithm.group_size=2",
                            "algorithm.prompts_per_update=1", "train.updates=1"))  # fmt: skip
    finally:
        REGISTRY.pop("test_broken")
    assert code == 2
    err = one_line_error(capsys)
    assert "reward 'test_broken' failed for 2 sample(s)" in err and "the scorer's GPU fell off" in err


def test_export_refuses_a_truncated_checkpoint(tmp_path, tiny_ckpt, capsys):
    """A full checkpoint whose model file was cut short: export names it and exits non-zero, writing nothing usable."""
    import shutil

    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    shutil.copytree(tiny_ckpt, ckpt / "model")
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "run" / "latest").write_text("step_0000001\n")
    weights = ckpt / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    assert "model.safetensors cannot be read" in one_line_error(capsys)


def test_curves_skip_a_corrupt_metrics_row_naming_file_and_line(tmp_path, caplog):
    from lance_rl.curves import read_metrics

    run = tmp_path / "run"
    run.mkdir()
    rows = [json.dumps({"update": 1, "reward/mean": 0.1}), '{"update": 2, "reward/me', json.dumps({"update": 3, "reward/mean": 0.3})]
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    assert [r["update"] for r in read_metrics(run)] == [1, 3]
    assert f"{run / 'metrics.jsonl'}:2: skipping a row that is not JSON" in caplog.text
