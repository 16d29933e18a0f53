"""lance_rl/data/ (schema.py, datasets.py, convert.py): official parquet schemas, manifests, converters, skip accounting and exact resume.

All data is built in tmp dirs: tiny PNGs and 9-frame MP4 clips from the shapes world.
"""

import itertools
import json
import logging
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lance_rl.data import shapes
from lance_rl.data.convert import manifest_to_parquet, parquet_to_manifest
from lance_rl.data.datasets import ManifestDataset, MixedDataset, ParquetDataset, open_dataset
from lance_rl.data.schema import Example, detect_dataset_type
from lance_rl.model.media import write_mp4


# ---------------------------------------------------------------------------------------------- fixtures


def image(seed: int, size: int = 32) -> np.ndarray:
    prompt = shapes.split_prompts()[0][seed % 100]
    return shapes.render(prompt, size, random.Random(seed))


def png(seed: int) -> bytes:
    return shapes.png_bytes(image(seed))


def mp4(tmp_path, seed: int, num_frames: int = 9) -> bytes:
    prompt = shapes.MotionPrompt("red", "circle", 1 + seed % 2, shapes.DIRECTIONS[seed % 4])
    path = tmp_path / f"clip{seed}_{num_frames}.mp4"
    write_mp4(shapes.render_clip(prompt, num_frames, 32, random.Random(seed)), path, fps=12)
    return path.read_bytes()


def write_table(path, columns: dict, row_group_size=None, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clips")
    return [mp4(tmp, s) for s in range(3)] + [mp4(tmp, 9, num_frames=36)]  # the last lasts 3 s at 12 fps


def same(a: Example, b: Example) -> bool:
    def arr_eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))

    return (a.task, a.text, a.answer, a.instruction) == (b.task, b.text, b.answer, b.instruction) and arr_eq(
        a.target, b.target
    ) and arr_eq(a.source, b.source)


# ---------------------------------------------------------------------------------------------- the five schemas


def test_text2image_general(tmp_path):
    path = shapes.write_parquet(tmp_path / "t2i.parquet", 5)
    ds = ParquetDataset(path, repeat=False)
    assert ds.dataset_type == "text2image_general"
    examples = list(ds)
    assert len(examples) == 5
    for ex in examples:
        assert ex.task == "t2i" and ex.text and ex.source is None and ex.answer is None
        assert ex.target.shape == (1, 32, 32, 3) and ex.target.dtype == np.uint8
        assert ex.origin.startswith(str(path) + ":row ")
    assert not ds.skipped


def test_text2video_general(tmp_path):
    path = shapes.write_video_parquet(tmp_path / "t2v.parquet", 2, num_frames=9)
    ds = ParquetDataset(path, repeat=False)
    assert ds.dataset_type == "text2video_general"
    examples = list(ds)
    assert [ex.task for ex in examples] == ["t2v", "t2v"]
    assert all(ex.target.shape == (9, 32, 32, 3) and "moving" in ex.text for ex in examples)


def test_image2image(tmp_path):
    path = write_table(
        tmp_path / "i2i.parquet",
        {"caption": ["make it blue", "move it left"], "input_image_bytes": [png(0), png(1)],
         "output_image_bytes": [png(2), png(3)]},
    )
    examples = sorted(ParquetDataset(path, repeat=False), key=lambda e: e.text)
    assert [ex.task for ex in examples] == ["image_edit"] * 2
    assert examples[0].text == "make it blue"
    np.testing.assert_array_equal(examples[0].source[0], image(0))  # PNG is lossless
    np.testing.assert_array_equal(examples[0].target[0], image(2))
    np.testing.assert_array_equal(examples[1].target[0], image(3))


def test_video2video(tmp_path, clips):
    path = write_table(
        tmp_path / "v2v.parquet",
        {"caption": ["reverse it"], "input_video_bytes": [clips[0]], "output_video_bytes": [clips[1]]},
    )
    (ex,) = list(ParquetDataset(path, repeat=False))
    assert ex.task == "video_edit" and ex.text == "reverse it"
    assert ex.source.shape == ex.target.shape == (9, 32, 32, 3)


def test_x2t_general_image_and_video(tmp_path, clips):
    images = write_table(
        tmp_path / "i2t.parquet",
        {"image_bytes": [png(0), png(1)], "caption_i": ["You describe images.", None],
         "caption_q": ["", "What colour?"], "caption_a": ["two red circles", "red"]},
    )
    videos = write_table(
        tmp_path / "v2t.parquet",
        {"video_bytes": [clips[3]], "caption_i": [""], "caption_q": ["What moves?"], "caption_a": ["a circle"]},
    )
    by_answer = {ex.answer: ex for ex in ParquetDataset([images, videos], repeat=False)}
    assert by_answer["two red circles"].task == "x2t_image" and by_answer["two red circles"].text == ""
    assert by_answer["two red circles"].instruction == "You describe images."
    assert by_answer["red"].instruction is None and by_answer["red"].text == "What colour?"
    np.testing.assert_array_equal(by_answer["red"].source[0], image(1))
    video = by_answer["a circle"]
    assert video.task == "x2t_video" and video.target is None
    # 3 s at 12 fps, capped at 2 s -> 24 frames -> 4k+1 -> 21
    assert video.source.shape == (21, 32, 32, 3)


def test_x2t_row_with_both_media_columns_one_null(tmp_path, clips):
    path = write_table(
        tmp_path / "x2t.parquet",
        {"image_bytes": [png(0), None, png(1)], "video_bytes": [None, clips[0], clips[1]],
         "caption_q": ["q", "q", "q"], "caption_a": ["a0", "a1", "a2"]},
    )
    ds = ParquetDataset(path, repeat=False, shuffle=False)
    assert [(ex.task, ex.answer) for ex in ds] == [("x2t_image", "a0"), ("x2t_video", "a1")]
    assert ds.skipped == {"ambiguous_media": 1}


def test_detection_and_errors(tmp_path):
    assert detect_dataset_type(["caption", "image_bytes"]) == "text2image_general"
    assert detect_dataset_type(["caption", "video_bytes"]) == "text2video_general"
    assert detect_dataset_type(["caption", "input_image_bytes", "output_image_bytes"]) == "image2image"
    assert detect_dataset_type(["caption", "input_video_bytes", "output_video_bytes"]) == "video2video"
    assert detect_dataset_type(["video_bytes", "caption_i", "caption_q", "caption_a"]) == "x2t_general"
    path = write_table(tmp_path / "odd.parquet", {"prompt": ["x"], "jpeg": [b"x"]})
    with pytest.raises(ValueError) as err:
        ParquetDataset(path)
    message = str(err.value)
    assert "'jpeg'" in message and "'prompt'" in message and "text2image_general (caption, image_bytes)" in message
    assert "x2t_general" in message
    t2i = shapes.write_parquet(tmp_path / "t2i.parquet", 2)
    with pytest.raises(ValueError, match="do not fit dataset_type 'image2image'"):
        ParquetDataset(t2i, dataset_type="image2image")
    with pytest.raises(ValueError, match="unknown dataset_type"):
        ParquetDataset(t2i, dataset_type="text2img")
    assert ParquetDataset(t2i, dataset_type="text2image_general").dataset_type == "text2image_general"
    with pytest.raises(FileNotFoundError):
        ParquetDataset(tmp_path / "nope.parquet")


def test_paths_dirs_and_globs(tmp_path):
    shapes.write_parquet(tmp_path / "d" / "a.parquet", 2)
    shapes.write_parquet(tmp_path / "d" / "sub" / "b.parquet", 3)
    assert ParquetDataset(tmp_path / "d").num_rows == 5
    assert ParquetDataset(str(tmp_path / "d" / "*.parquet")).num_rows == 2
    assert ParquetDataset([tmp_path / "d", tmp_path / "d" / "a.parquet"]).num_rows == 5  # de-duplicated
    assert isinstance(open_dataset(tmp_path / "d"), ParquetDataset)


# ---------------------------------------------------------------------------------------------- bad rows


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    good = shapes.write_parquet(tmp_path / "good.parquet", 2)
    captions = pq.read_table(good).column("caption").to_pylist()
    bad = write_table(
        tmp_path / "bad.parquet",
        {"caption": [captions[0], "a caption", "", "a caption", None, captions[1]],
         "image_bytes": [png(0), b"not an image", png(1), None, png(2), png(3)]},
    )
    ints = write_table(tmp_path / "ints.parquet", {"caption": ["a caption"], "image_bytes": [7]})
    ds = ParquetDataset([bad, ints], repeat=False, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="lance_rl.data.datasets"):
        examples = list(ds)
    assert [ex.origin for ex in examples] == [f"{bad}:row 0", f"{bad}:row 5"]
    assert [ex.text for ex in examples] == captions
    assert ds.skipped == {"undecodable_media": 1, "empty_caption": 1, "missing_value": 2, "wrong_type": 1}
    text = caplog.text
    assert f"{bad}:row 1" in text and "undecodable_media" in text and f"{ints}:row 0" in text
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 5


def test_skip_warnings_are_rate_limited(tmp_path, caplog):
    path = write_table(tmp_path / "bad.parquet", {"caption": [""] * 120 + ["ok"], "image_bytes": [png(0)] * 121})
    ds = ParquetDataset(path, repeat=False)
    with caplog.at_level(logging.WARNING, logger="lance_rl.data.datasets"):
        assert len(list(ds)) == 1
    assert ds.skipped == {"empty_caption": 120}
    assert len(caplog.records) == 11  # the first 10, then the 100th


def test_all_bad_rows_raise_instead_of_spinning(tmp_path):
    path = write_table(tmp_path / "bad.parquet", {"caption": ["", ""], "image_bytes": [png(0), png(1)]})
    with pytest.raises(RuntimeError, match="every row is unusable"):
        next(iter(ParquetDataset(path)))


# ---------------------------------------------------------------------------------------------- manifests


def write_manifest(tmp_path, clips, extra_lines=()):
    root = tmp_path / "m"
    (root / "img").mkdir(parents=True)
    for i in range(4):
        (root / "img" / f"{i}.png").write_bytes(png(i))
    for i, clip in enumerate(clips[:2]):
        (root / f"{i}.mp4").write_bytes(clip)
    lines = [
        {"task": "t2i", "caption": "two red circles on the left", "image": "img/0.png"},
        {"task": "t2i", "caption": "one blue square on the top", "image": "img/1.png"},
        {"task": "t2v", "caption": "a circle moving right", "video": "0.mp4"},
        {"task": "image_edit", "instruction": "make it green", "source": "img/2.png", "target": "img/3.png"},
        {"task": "video_edit", "instruction": "reverse it", "source": "0.mp4", "target": "1.mp4"},
        {"task": "x2t_image", "image": "img/1.png", "question": "What is it?", "answer": "a square",
         "instruction": "Be brief."},
        {"task": "x2t_image", "image": "img/2.png", "answer": "shapes"},
        {"task": "x2t_video", "video": "1.mp4", "question": "", "answer": "motion"},
    ]
    text = "\n".join([json.dumps(line) for line in lines] + list(extra_lines)) + "\n\n"
    (root / "data.jsonl").write_text(text)
    return root / "data.jsonl"


def test_manifest_reads_every_task(tmp_path, clips):
    ds = ManifestDataset(write_manifest(tmp_path, clips), repeat=False, shuffle=False)
    examples = list(ds)
    assert [ex.task for ex in examples] == ["t2i", "t2i", "t2v", "image_edit", "video_edit", "x2t_image",
                                            "x2t_image", "x2t_video"]
    t2i, _, t2v, edit, vedit, x2t, x2t_bare, x2v = examples
    np.testing.assert_array_equal(t2i.target[0], image(0))
    assert t2v.target.shape == (9, 32, 32, 3) and t2v.source is None
    np.testing.assert_array_equal(edit.source[0], image(2))
    np.testing.assert_array_equal(edit.target[0], image(3))
    assert vedit.source.shape == vedit.target.shape == (9, 32, 32, 3)
    assert (x2t.text, x2t.answer, x2t.instruction, x2t.source.shape) == ("What is it?", "a square", "Be brief.",
                                                                          (1, 32, 32, 3))
    assert (x2t_bare.text, x2t_bare.instruction) == ("", None)
    assert x2v.source.shape == (9, 32, 32, 3) and x2v.target is None
    assert examples[3].origin.endswith("data.jsonl:line 4")
    assert ds.num_rows == 8 and not ds.skipped
    assert isinstance(open_dataset(ds.path), ManifestDataset)


def test_manifest_bad_lines(tmp_path, clips, caplog):
    extra = [
        '{"task": "t2i", "caption": "x", "image": "img/0.png", "colour": "red"}',  # line 9
        "{not json",
        '{"task": "t2x", "caption": "x"}',
        '{"task": "t2i", "caption": "x", "image": "img/missing.png"}',
        '{"task": "t2i", "caption": "", "image": "img/0.png"}',
        '{"task": "t2i", "caption": 3, "image": "img/0.png"}',
        '{"task": "x2t_image", "image": "img/0.png"}',
        '{"task": "t2v", "caption": "x", "video": "img/0.png.broken"}',
    ]
    manifest = write_manifest(tmp_path, clips, extra)
    (manifest.parent / "img" / "0.png.broken").write_bytes(b"\x00" * 64)
    ds = ManifestDataset(manifest, repeat=False, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="lance_rl.data.datasets"):
        assert len(list(ds)) == 8
    assert ds.skipped == {"unknown_key": 1, "invalid_json": 1, "unknown_task": 1, "missing_file": 1,
                          "empty_caption": 1, "wrong_type": 1, "missing_value": 1, "undecodable_media": 1}
    first = caplog.records[0].getMessage()
    assert "data.jsonl:line 9" in first and "'colour'" in first and "allowed keys: task, caption, image" in first
    assert "missing key 'answer'" in caplog.text


# ---------------------------------------------------------------------------------------------- converters


def test_manifest_parquet_round_trip(tmp_path, clips):
    manifest = write_manifest(tmp_path, clips)
    files = manifest_to_parquet(manifest, tmp_path / "pq")
    assert [f.name for f in files] == sorted(
        ["text2image_general.parquet", "text2video_general.parquet", "image2image.parquet", "video2video.parquet",
         "x2t_general_image.parquet", "x2t_general_video.parquet"]
    )
    assert pq.read_schema(tmp_path / "pq" / "image2image.parquet").names == [
        "caption", "input_image_bytes", "output_image_bytes"]
    assert pq.read_schema(tmp_path / "pq" / "x2t_general_image.parquet").names == [
        "image_bytes", "caption_i", "caption_q", "caption_a"]

    def key(ex):
        return ex.task, ex.text, ex.answer or ""

    original = sorted(ManifestDataset(manifest, repeat=False), key=key)
    from_parquet = sorted(ParquetDataset(files, repeat=False), key=key)
    assert len(original) == len(from_parquet) == 8
    assert all(same(a, b) for a, b in zip(original, from_parquet))

    back = parquet_to_manifest(tmp_path / "pq", tmp_path / "back")
    again = sorted(ManifestDataset(back, repeat=False), key=key)
    assert len(again) == 8 and all(same(a, b) for a, b in zip(original, again))
    assert json.loads(back.read_text().splitlines()[0])["task"] in {"t2i", "t2v", "image_edit", "video_edit",
                                                                    "x2t_image", "x2t_video"}
    # ... and parquet -> manifest -> parquet gives the same bytes back
    again_files = manifest_to_parquet(back, tmp_path / "pq2")
    for a, b in zip(files, again_files):
        assert a.name == b.name
        ta, tb = pq.read_table(a), pq.read_table(b)
        assert ta.schema == tb.schema and sorted(ta.to_pylist(), key=str) == sorted(tb.to_pylist(), key=str)


def test_converters_skip_bad_entries(tmp_path, clips, caplog):
    manifest = write_manifest(tmp_path, clips, ['{"task": "t2i", "caption": "x", "image": "gone.png"}'])
    with caplog.at_level(logging.WARNING, logger="lance_rl.data.datasets"):
        files = manifest_to_parquet(manifest, tmp_path / "pq")
    assert sum(pq.read_metadata(f).num_rows for f in files) == 8
    assert "missing_file" in caplog.text
    bad = write_table(tmp_path / "bad.parquet", {"caption": ["ok", ""], "image_bytes": [png(0), png(1)]})
    lines = parquet_to_manifest(bad, tmp_path / "back").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["image"].endswith(".png")


# ---------------------------------------------------------------------------------------------- resume


def check_resume(make, n: int, m: int):
    """n examples, save (through JSON), a fresh dataset continues exactly like an uninterrupted one for m more."""
    uninterrupted = make()
    reference = list(itertools.islice(iter(uninterrupted), n + m))
    ds = make()
    it = iter(ds)
    first = list(itertools.islice(it, n))
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(itertools.islice(iter(resumed), m))
    assert all(same(a, b) for a, b in zip(first, reference[:n]))
    assert len(rest) == m and all(same(a, b) for a, b in zip(rest, reference[n:]))
    assert [ex.origin for ex in rest] == [ex.origin for ex in reference[n:]]
    # the interrupted iterator itself goes on identically too
    assert all(same(a, b) for a, b in zip(itertools.islice(it, m), reference[n:]))
    assert resumed.skipped == uninterrupted.skipped  # the skip counter is part of the state
    assert resumed.state_dict() == uninterrupted.state_dict()
    return ds, resumed, state


@pytest.fixture
def resume_parquet(tmp_path):
    a = shapes.write_parquet(tmp_path / "a.parquet", 7, seed=1)
    table = pq.read_table(shapes.write_parquet(tmp_path / "tmp.parquet", 9, seed=2))
    table = table.set_column(1, "image_bytes", pa.array(table.column("image_bytes").to_pylist()[:-1] + [b"junk"]))
    b = tmp_path / "b.parquet"
    pq.write_table(table, b, row_group_size=4)  # 3 row groups, the last row undecodable
    (tmp_path / "tmp.parquet").unlink()
    return [a, b]


def test_parquet_resume_across_epochs(resume_parquet):
    def make():
        return ParquetDataset(resume_parquet, seed=3)

    # 15 good rows (and one bad) per epoch: stop shortly before, exactly at, and after the epoch boundary
    for n in (13, 15, 16):
        ds, resumed, state = check_resume(make, n=n, m=12)
        assert set(state) >= {"epoch", "file_index", "row_group", "row", "skipped"}
        assert resumed.epoch == 1 and resumed.skipped["undecodable_media"] >= 1
    assert state["epoch"] == 1 and ParquetDataset(resume_parquet, seed=3).state_dict()["epoch"] == 0


def test_parquet_resume_mid_epoch_and_shuffle(resume_parquet):
    check_resume(lambda: ParquetDataset(resume_parquet, seed=0), n=4, m=5)
    ordered = [ex.origin for ex in ParquetDataset(resume_parquet, shuffle=False, repeat=False)]
    assert ordered[:7] == [f"{resume_parquet[0]}:row {i}" for i in range(7)] and len(ordered) == 15
    ds = ParquetDataset(resume_parquet, seed=0)
    epoch0 = [ex.origin for ex in itertools.islice(ds, 15)]
    epoch1 = [ex.origin for ex in itertools.islice(ds, 15)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(ordered) and epoch0 != epoch1
    assert [ex.origin for ex in itertools.islice(ParquetDataset(resume_parquet, seed=0), 15)] == epoch0
    # repeat=False: one epoch per pass, passes continue where the last one stopped
    once = ParquetDataset(resume_parquet, seed=0, repeat=False)
    assert [ex.origin for ex in once] == epoch0 and [ex.origin for ex in once] == epoch1


def test_state_for_other_files_is_refused(resume_parquet):
    state = ParquetDataset(resume_parquet).state_dict()
    with pytest.raises(ValueError, match="cannot resume"):
        ParquetDataset(resume_parquet[:1]).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ParquetDataset(resume_parquet, seed=1).load_state_dict(state)


def test_manifest_resume_across_epochs(tmp_path, clips):
    manifest = write_manifest(tmp_path, clips, ['{"task": "t2i", "caption": "x", "image": "gone.png"}'])
    ds, resumed, state = check_resume(lambda: ManifestDataset(manifest, seed=5), n=6, m=7)
    assert set(state) >= {"epoch", "line", "skipped"} and resumed.epoch == 1


def test_mixed_resume_across_epochs(tmp_path, clips, resume_parquet):
    manifest = write_manifest(tmp_path, clips)

    def make():
        return MixedDataset([ParquetDataset(resume_parquet, seed=1), ManifestDataset(manifest, seed=2)], [1, 1], seed=7)

    ds, resumed, state = check_resume(make, n=14, m=10)
    assert state["draws"] == 14 and len(state["children"]) == 2
    assert resumed.datasets[1].epoch >= 1  # the 8-line manifest wrapped around


# ---------------------------------------------------------------------------------------------- mixing


def test_mixed_proportions_and_determinism(tmp_path):
    a = ParquetDataset(shapes.write_parquet(tmp_path / "a.parquet", 4, seed=0))
    b = ParquetDataset(shapes.write_parquet(tmp_path / "b.parquet", 4, seed=1))
    z = ParquetDataset(shapes.write_parquet(tmp_path / "z.parquet", 4, seed=2))

    def draws(seed, n=400):
        mix = MixedDataset([a, b, z], [3.0, 1.0, 0.0], seed=seed)
        return [ex.origin.rsplit(":", 1)[0] for ex in itertools.islice(mix, n)]

    first = draws(0)
    share = first.count(str(tmp_path / "a.parquet")) / len(first)
    assert 0.65 < share < 0.85
    assert str(tmp_path / "z.parquet") not in first
    for d in (a, b, z):
        d.load_state_dict({**d.state_dict(), "epoch": 0, "file_index": 0, "row_group": 0, "row": 0})
    assert draws(0, 50) == first[:50]
    assert draws(1, 50) != first[:50]
    with pytest.raises(ValueError):
        MixedDataset([a, b], [1.0, -1.0])
    with pytest.raises(ValueError):
        MixedDataset([a, b], [1.0])
