"""Experiment tracking: a run with `logging.tensorboard` and `logging.wandb` (offline) leaves TensorBoard events and a
W&B run that hold what metrics.jsonl holds, and the evaluation sample grids with their prompts; the reward-hacking
signals logged at every evaluation measure what they say."""

import io
import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lance_rl.config import LoggingSection, WandbSection
from lance_rl.diagnostics import edge_density, group_diversity, saturation, signals
from lance_rl.trainer import MetricsLog

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install 'lance-rl[tensorboard]'")
pytest.importorskip("wandb", reason="the wandb extra is not installed: pip install 'lance-rl[wandb]'")

SIGNAL_KEYS = ["eval/signals/saturation", "eval/signals/edge_density", "eval/signals/diversity"]


# ------------------------------------------------------------------------------------------------ readers
def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def wandb_records(run_dir: Path, timeout: float = 60) -> list:
    """Every record of a finished offline W&B run, once its writer is done: `wandb.finish()` returns before wandb-core
    has written the log, so this waits for the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_log(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_wandb_log(run_dir: Path) -> list:
    """The records of an offline W&B run's `run-<id>.wandb` file, parsed with wandb's own protobuf schema. The file
    is W&B's LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a
    7-byte header (CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail under 7 bytes is padding."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    if len(data) < 7:
        return []  # created, nothing written yet
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """The offline run's history: {step: {key: value}}, values decoded from their JSON."""
    history = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            assert row["_step"] not in history, f"two W&B history rows for step {row['_step']}"
            history[row["_step"]] = row
    return history


def wandb_run(run_dir: Path):
    records = wandb_records(run_dir)
    for record in records:
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {run_dir}: {[r.WhichOneof('record_type') for r in records]}")


def wandb_config(run_dir: Path) -> dict:
    return {item.key: json.loads(item.value_json) for item in wandb_run(run_dir).config.update}


def wandb_run_id(run_dir: Path) -> str:
    return wandb_run(run_dir).run_id


# ------------------------------------------------------------------------------------------------ the signals
def solid(rgb, size=16):
    return np.full((size, size, 3), rgb, dtype=np.uint8)


def test_reward_hacking_signals_measure_what_they_say():
    assert saturation(solid((128, 128, 128))) == 0 and saturation(solid((0, 0, 0))) == 0
    assert saturation(solid((255, 0, 0))) == pytest.approx(1)
    assert saturation(solid((200, 100, 100))) == pytest.approx(0.5)

    checkerboard = (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    step = solid((0, 0, 0))
    step[:, 8:] = 255
    assert edge_density(solid((90, 30, 200))) == 0
    assert edge_density(checkerboard) == 1  # the finest texture an image can hold is all edges
    assert edge_density(step) == pytest.approx(1 / 15)  # one column of edges among the 15 measured

    black, white = solid((0, 0, 0)), solid((255, 255, 255))
    assert group_diversity([black, black, black]) == 0 and group_diversity([black]) == 0
    assert group_diversity([black, white]) == pytest.approx(1)
    # prompt-major batches: the diversity of [black, black] and of [black, white], averaged
    assert signals([black, black, black, white], group_size=2)["diversity"] == pytest.approx(0.5)
    assert np.isnan(signals([black, white], group_size=1)["diversity"])  # one sample per prompt: no spread to measure


# ------------------------------------------------------------------------------------------------ a tracked RL run
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_ckpt):
    """Two RL updates on the tiny random checkpoint, evaluated after each, logged to TensorBoard and offline W&B."""
    from test_rl import RECIPE, small

    from lance_rl.config import load_recipe
    from lance_rl.rl import RLRecipe
    from lance_rl.rl_config import RLConfig
    from lance_rl.trainer import run_recipe

    out = tmp_path_factory.mktemp("tracked") / "run"
    overrides = small(out, tiny_ckpt, "rewards={jpeg_incompressibility: 1.0}", "eval.every=1",
                      "eval.gold_rewards={jpeg_compressibility: 1.0}", "logging.every=1", "logging.tensorboard=true",
                      "logging.wandb={project: lance-rl-tests, name: tracked, mode: offline}")  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_SILENT", "true")
        run_recipe(RLRecipe(load_recipe(RLConfig, RECIPE, overrides)))
    return out


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_evaluation_logs_the_proxy_gold_and_signals_side_by_side(tracked_run):
    rows = metric_rows(tracked_run)
    assert [r["update"] for r in rows] == [0, 1, 2]
    for row in rows:  # every row is an evaluation here (eval.every=1), update 0 included
        assert {"eval/reward/mean", "gold/reward/mean", "gold/jpeg_compressibility/mean", *SIGNAL_KEYS} <= row.keys()
        assert 0 <= row["eval/signals/saturation"] <= 1 and 0 <= row["eval/signals/edge_density"] <= 1
        assert row["eval/signals/diversity"] > 0  # two samples per prompt with different seeds differ


def test_tensorboard_holds_the_metrics_and_the_sample_grids(tracked_run):
    rows = metric_rows(tracked_run)
    events = tensorboard_events(tracked_run / "tensorboard")
    for key in ["reward/mean", "eval/reward/mean", "gold/reward/mean", "policy_loss", *SIGNAL_KEYS]:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(r["update"], r[key]) for r in rows if key in r]
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], abs=1e-6), key
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2]  # one point per update

    grids = events.Images("eval/samples")
    assert [g.step for g in grids] == [0, 1, 2]
    for grid in grids:
        shown = np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)).convert("RGB"))
        saved = np.asarray(Image.open(tracked_run / "eval" / f"update_{grid.step:05d}.png").convert("RGB"))
        assert np.array_equal(shown, saved)  # the very grid the run saved, cells labelled "index: score"
    record = json.loads((tracked_run / "eval" / "update_00002.json").read_text())
    (caption,) = [e for e in events.Tensors("eval/samples/caption/text_summary") if e.step == 2]
    text = caption.tensor_proto.string_val[0].decode()
    assert f"0: {record['prompts'][0]} ({record['scores'][0]:.2f})" in text
    assert f"7: {record['prompts'][7]} ({record['scores'][7]:.2f})" in text  # 4 prompts x 2 samples


def test_an_offline_wandb_run_holds_the_same_scalars_and_the_sample_grids(tracked_run):
    (run_dir,) = (tracked_run / "wandb").glob("offline-run-*")
    assert wandb_run_id(run_dir) == (tracked_run / "wandb_id.txt").read_text().strip()
    history = wandb_history(run_dir)
    rows = metric_rows(tracked_run)
    assert sorted(history) == [0, 1, 2]
    for row in rows:
        logged = history[row["update"]]
        for key in ["reward/mean", "eval/reward/mean", "gold/reward/mean", *SIGNAL_KEYS]:
            if key in row:
                assert logged[key] == pytest.approx(row[key], abs=1e-9), (row["update"], key)
        assert "time" not in logged and "update" not in logged  # the index is W&B's step, not a metric
        image = logged["eval/samples/_type"], logged["eval/samples/path"], logged["eval/samples/caption"]
        assert image[0] == "image-file" and (run_dir / "files" / image[1]).is_file()
        record = json.loads((tracked_run / "eval" / f"update_{row['update']:05d}.json").read_text())
        assert image[2].splitlines()[0] == f"0: {record['prompts'][0]} ({record['scores'][0]:.2f})"
    config = wandb_config(run_dir)
    assert config["train"]["updates"] == 2 and config["rewards"] == {"jpeg_incompressibility": 1.0}


# ------------------------------------------------------------------------------------------------ resuming
def test_a_resumed_run_keeps_one_point_per_index_in_tensorboard_and_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggingSection(every=1, tensorboard=True, wandb=WandbSection(project="lance-rl-tests", mode="offline"))
    first = MetricsLog(tmp_path, "update", 4, cfg, {"seed": 0})
    for update in (1, 2, 3):  # killed after update 3, but its last checkpoint was update 1
        first.write({"update": update, "reward/mean": float(update), "eval/signals/diversity": math.nan, "ok": True})
    first.close()
    resumed = MetricsLog(tmp_path, "update", 4, cfg, {"seed": 0}, resume_at=1)
    for update in (2, 3, 4):
        resumed.write({"update": update, "reward/mean": 10.0 * update})
    resumed.close()

    expected = [(1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    assert [(r["update"], r["reward/mean"]) for r in metric_rows(tmp_path)] == expected
    events = tensorboard_events(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == expected
    # non-finite numbers and flags stay in metrics.jsonl only
    assert "eval/signals/diversity" not in events.Tags()["scalars"] and "ok" not in events.Tags()["scalars"]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert [wandb_run_id(r) for r in runs] == [run_id, run_id]  # one W&B run, continued
