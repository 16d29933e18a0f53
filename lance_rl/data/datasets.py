"""Decoded training examples for the SFT trainer: the release's parquet schema (spec 5.4) and a JSON-lines manifest.

Two sources, one output type (`Example`):

* `ParquetDataset` reads the official files, one `dataset_type` per file (``text2image_general``,
  ``text2video_general``, ``image2image``, ``video2video``, ``x2t_general``), inferred from the columns unless given.
  Rows are read one row group at a time with pyarrow, so a file of media bytes never sits in memory whole.
* `ManifestDataset` reads a JSON-lines file whose media are paths relative to it, for people without parquet.

`manifest_to_parquet` / `parquet_to_manifest` convert between the two (media bytes are copied, never re-encoded),
`open_dataset` picks the reader from the path, and `MixedDataset` mixes datasets by normalised weight, the release's
group sampling (spec 5.5).

Both readers share the same contract, which the trainer relies on:

* Iteration goes on forever, epoch after epoch, reshuffled per epoch from ``seed + epoch`` (``repeat=False``: to the
  end of the current epoch only). `next_example()` always continues forever.
* A bad row or line never crashes a run and is never dropped silently: it is skipped, counted in
  ``self.skipped[reason]`` and logged with its origin (the first 10, then every 100th). See `SKIP_REASONS`.
* ``state_dict()`` is the position of the NEXT example (plain JSON-able ints and dicts); a fresh dataset given it by
  ``load_state_dict`` yields exactly the sequence an uninterrupted one would have. Only one iterator per dataset at a
  time: iterators read and advance the dataset's own position (that is what makes the state exact).

Tokenisation, resizing / normalisation (``lance_rl.model.media.vae_tensor`` / ``vit_tensor``) and VAE encoding are the
trainer's job; this module only decodes media to uint8 frames. Sharding across ranks / DataLoader workers is not done
here (the release keeps rows with ``row_idx % (world * workers) == worker_id``); give each worker its own files or seed.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lance_rl.model.media import MediaError, read_image, read_video
from lance_rl.model.tasks import TASKS, is_generation

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# The tasks with a training-data schema in the release: every task but i2v (which the release samples, never trains).
DATA_TASKS = tuple(t for t in TASKS if t != "i2v")

# Video sampling (the release's `multi_clips` frame sampler, spec 5.4): 12 fps, at most 6 s, 4k+1 frames so the
# Wan2.2 VAE (4x temporal compression plus a leading frame) takes them whole. Understanding videos use the release's
# v2t setting, max_duration 2 s; they keep the 4k+1 rule as the release does (the ViT pads to an even count itself,
# see lance_rl.model.media.vit_tensor).
VIDEO_FPS = 12.0
GEN_MAX_SECONDS = 6.0
X2T_MAX_SECONDS = 2.0
FRAME_RULE = "4k+1"

# dataset_type -> columns that must be present. x2t_general also needs image_bytes or video_bytes; its caption_i and
# caption_q are optional (absent = no system text / an empty question).
SCHEMAS: dict[str, tuple[str, ...]] = {
    "text2image_general": ("caption", "image_bytes"),
    "text2video_general": ("caption", "video_bytes"),
    "image2image": ("caption", "input_image_bytes", "output_image_bytes"),
    "video2video": ("caption", "input_video_bytes", "output_video_bytes"),
    "x2t_general": ("caption_a",),
}
X2T_MEDIA = ("image_bytes", "video_bytes")
X2T_TEXT = ("caption_i", "caption_q", "caption_a")

TASK_TO_TYPE = {
    "t2i": "text2image_general",
    "t2v": "text2video_general",
    "image_edit": "image2image",
    "video_edit": "video2video",
    "x2t_image": "x2t_general",
    "x2t_video": "x2t_general",
}

# Manifest keys per task: (required, optional); "task" is always required.
MANIFEST_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "t2i": (("caption", "image"), ()),
    "t2v": (("caption", "video"), ()),
    "image_edit": (("instruction", "source", "target"), ()),
    "video_edit": (("instruction", "source", "target"), ()),
    "x2t_image": (("image", "answer"), ("question", "instruction")),
    "x2t_video": (("video", "answer"), ("question", "instruction")),
}

SKIP_REASONS = {
    "missing_value": "a required column value is null / a required manifest key is absent",
    "wrong_type": "a value of the wrong type (e.g. an int where bytes or a string are expected)",
    "empty_caption": "a generation row with an empty caption / instruction",
    "empty_answer": "an x2t row with an empty answer",
    "ambiguous_media": "an x2t_general row with both image_bytes and video_bytes",
    "undecodable_media": "media bytes / file that cannot be decoded",
    "unreadable_row_group": "a parquet row group pyarrow cannot read (every row in it is counted)",
    "missing_file": "a manifest media path that does not exist",
    "invalid_json": "a manifest line that is not a JSON object",
    "unknown_task": "a manifest line whose task is not one of DATA_TASKS",
    "unknown_key": "a manifest line with a key its task does not allow",
}

_LOG_FIRST = 10  # skip warnings: the first few, then every _LOG_EVERY-th
_LOG_EVERY = 100


@dataclass(eq=False)  # eq=False: ndarray fields have no truth value
class Example:
    task: str  # one of DATA_TASKS
    text: str  # caption (t2i/t2v), edit instruction (edits), or question (x2t; may be "")
    target: np.ndarray | None = None  # uint8 [T, H, W, 3]: the media to generate (generation tasks)
    source: np.ndarray | None = None  # uint8 [T, H, W, 3]: the edit source, or the media to understand (x2t)
    answer: str | None = None  # x2t answer (caption_a)
    instruction: str | None = None  # x2t system text (caption_i)
    origin: str = ""  # "path/to/file.parquet:row 17" or "manifest.jsonl:line 3", for messages


# ---------------------------------------------------------------------------------------------- rows -> examples


class _BadRow(Exception):
    """A row or line to skip; `reason` is a SKIP_REASONS key, the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Raw:
    """One example before decoding; media are bytes (parquet) or paths (manifest). Shared by readers and converters."""

    task: str
    text: str
    target: Any = None
    source: Any = None
    answer: str | None = None
    instruction: str | None = None


def _need_text(value, name: str) -> str:
    if value is None:
        raise _BadRow("missing_value", f"{name} is missing (null)")
    if not isinstance(value, str):
        raise _BadRow("wrong_type", f"{name} should be a string, got {type(value).__name__}")
    return value


def _optional_text(value, name: str) -> str | None:
    return None if value is None else _need_text(value, name)


def _need_bytes(value, name: str) -> bytes:
    if isinstance(value, dict) and "bytes" in value:  # Hugging Face `datasets` stores Image columns as {bytes, path}
        value = value["bytes"]
    if value is None:
        raise _BadRow("missing_value", f"{name} is missing (null)")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _BadRow("wrong_type", f"{name} should be bytes, got {type(value).__name__}")
    return bytes(value)


def _row_to_raw(dataset_type: str, get: Callable[[str], Any]) -> _Raw:
    """An official row (``get(column)`` -> python value, None when null or absent) -> _Raw with bytes media."""
    if dataset_type == "text2image_general":
        return _Raw("t2i", _need_text(get("caption"), "caption"), target=_need_bytes(get("image_bytes"), "image_bytes"))
    if dataset_type == "text2video_general":
        return _Raw("t2v", _need_text(get("caption"), "caption"), target=_need_bytes(get("video_bytes"), "video_bytes"))
    if dataset_type in ("image2image", "video2video"):
        kind = "image" if dataset_type == "image2image" else "video"
        return _Raw(
            f"{kind}_edit",
            _need_text(get("caption"), "caption"),
            target=_need_bytes(get(f"output_{kind}_bytes"), f"output_{kind}_bytes"),
            source=_need_bytes(get(f"input_{kind}_bytes"), f"input_{kind}_bytes"),
        )
    if dataset_type == "x2t_general":
        image, video = get("image_bytes"), get("video_bytes")
        if image is not None and video is not None:
            raise _BadRow("ambiguous_media", "both image_bytes and video_bytes are set; an x2t row has one")
        if image is None and video is None:
            raise _BadRow("missing_value", "neither image_bytes nor video_bytes is set")
        column = "image_bytes" if image is not None else "video_bytes"
        return _Raw(
            "x2t_image" if image is not None else "x2t_video",
            _optional_text(get("caption_q"), "caption_q") or "",
            source=_need_bytes(image if image is not None else video, column),
            answer=_need_text(get("caption_a"), "caption_a"),
            instruction=_optional_text(get("caption_i"), "caption_i"),
        )
    raise ValueError(f"unknown dataset_type {dataset_type!r}")


def _check_text(raw: _Raw) -> None:
    """Generation rows need a caption to condition on; x2t rows need an answer to learn."""
    if is_generation(raw.task) and not raw.text.strip():
        raise _BadRow("empty_caption", "empty caption" if raw.task in ("t2i", "t2v") else "empty instruction")
    if raw.task.startswith("x2t") and not (raw.answer or "").strip():
        raise _BadRow("empty_answer", "empty answer")


def _decode(task: str, src, role: str) -> np.ndarray:
    """Media bytes or path -> uint8 [T, H, W, 3] with the task's frame sampling."""
    if isinstance(src, Path) and not src.is_file():
        raise _BadRow("missing_file", f"{role} file {src} does not exist")
    try:
        if task in ("t2i", "image_edit", "x2t_image"):
            return read_image(src)[None]
        max_seconds = X2T_MAX_SECONDS if task == "x2t_video" else GEN_MAX_SECONDS
        return read_video(src, fps=VIDEO_FPS, max_seconds=max_seconds, frame_rule=FRAME_RULE)[0]
    except MediaError as e:
        raise _BadRow("undecodable_media", f"{role}: {e}") from e
    except Exception as e:  # noqa: BLE001 - decoders fed arbitrary bytes raise anything; a long run must not die of it
        raise _BadRow("undecodable_media", f"{role}: {type(e).__name__}: {e}") from e


def _to_example(raw: _Raw, origin: str) -> Example:
    _check_text(raw)
    return Example(
        task=raw.task,
        text=raw.text,
        target=None if raw.target is None else _decode(raw.task, raw.target, "target"),
        source=None if raw.source is None else _decode(raw.task, raw.source, "source"),
        answer=raw.answer,
        instruction=raw.instruction,
        origin=origin,
    )


def _log_skip(counter: collections.Counter, bad: _BadRow, origin: str) -> None:
    counter[bad.reason] += 1
    total = sum(counter.values())
    if total <= _LOG_FIRST or total % _LOG_EVERY == 0:
        logger.warning(
            "skipping %s: %s [%s; %d skipped so far: %s]", origin, bad, bad.reason, total, dict(counter)
        )


# ---------------------------------------------------------------------------------------------- parquet files


def describe_schemas() -> str:
    parts = [f"{name} ({', '.join(cols)})" for name, cols in SCHEMAS.items() if name != "x2t_general"]
    parts.append("x2t_general (image_bytes or video_bytes, caption_i, caption_q, caption_a)")
    return "; ".join(parts)


def _has_schema(dataset_type: str, columns: set[str]) -> bool:
    if not set(SCHEMAS[dataset_type]) <= columns:
        return False
    return dataset_type != "x2t_general" or bool(columns & set(X2T_MEDIA))


def detect_dataset_type(columns: Iterable[str], where: str = "parquet file") -> str:
    """The official dataset_type whose columns these are; ValueError (columns found, schemas known) otherwise."""
    columns = set(columns)
    matches = [t for t in SCHEMAS if _has_schema(t, columns)]
    if "x2t_general" in matches:  # caption_a exists only in x2t rows
        return "x2t_general"
    if len(matches) == 1:
        return matches[0]
    why = "matches several schemas " + str(matches) if matches else "matches no known schema"
    raise ValueError(
        f"{where}: cannot tell the dataset_type from its columns {sorted(columns)} ({why}); "
        f"known schemas: {describe_schemas()}. Pass dataset_type=... explicitly if the columns are right."
    )


def _find_parquet(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> sorted, de-duplicated .parquet paths."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for p in paths:
        text = str(p)
        if any(ch in text for ch in "*?["):
            hits = [Path(h) for h in sorted(glob.glob(text, recursive=True)) if h.endswith(".parquet")]
            if not hits:
                raise FileNotFoundError(f"no .parquet files match {text!r}")
            found += hits
        elif Path(p).is_dir():
            hits = sorted(Path(p).rglob("*.parquet"))
            if not hits:
                raise FileNotFoundError(f"no .parquet files under {text}")
            found += hits
        elif Path(p).is_file():
            found.append(Path(p))
        else:
            raise FileNotFoundError(f"{text}: no such parquet file or directory")
    if not found:
        raise ValueError("no parquet paths given")
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class _ParquetInfo:
    path: Path
    dataset_type: str
    columns: tuple[str, ...]  # the ones to read
    group_rows: tuple[int, ...]
    group_first_row: tuple[int, ...]  # row index in the file of each group's first row, for origins


def _inspect(path: Path, dataset_type: str = "auto") -> _ParquetInfo:
    """Footer only: columns, dataset_type and row-group sizes."""
    try:
        with pq.ParquetFile(path) as pf:
            names = list(pf.schema_arrow.names)
            group_rows = tuple(pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    if dataset_type == "auto":
        dataset_type = detect_dataset_type(names, str(path))
    elif dataset_type not in SCHEMAS:
        raise ValueError(f"unknown dataset_type {dataset_type!r}; known: {describe_schemas()}")
    elif not _has_schema(dataset_type, set(names)):
        raise ValueError(
            f"{path}: columns {sorted(names)} do not fit dataset_type {dataset_type!r}; known: {describe_schemas()}"
        )
    wanted = SCHEMAS[dataset_type] + ((*X2T_MEDIA, *X2T_TEXT) if dataset_type == "x2t_general" else ())
    columns = tuple(c for c in dict.fromkeys(wanted) if c in names)
    first = tuple(int(x) for x in np.cumsum((0,) + group_rows)[:-1])
    return _ParquetInfo(path, dataset_type, columns, group_rows, first)


# ---------------------------------------------------------------------------------------------- datasets


class _Resumable:
    """Shared iteration, skip accounting and state checks; subclasses keep a position and implement `_take`."""

    kind = ""
    num_rows = 0  # rows (or manifest lines) per epoch, good and bad

    def __init__(self, seed: int, shuffle: bool, repeat: bool):
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.repeat = bool(repeat)
        self.skipped: collections.Counter = collections.Counter()
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """The epoch of the next example."""
        return self._epoch

    def __iter__(self) -> Iterator[Example]:
        stop_epoch = None if self.repeat else self._epoch
        while True:
            example = self._next(stop_epoch)
            if example is None:
                return
            yield example

    def next_example(self) -> Example:
        """The next example, rolling over epochs regardless of `repeat` (what MixedDataset uses)."""
        return self._next(None)

    def _take(self) -> tuple[str, Callable[[], Example]]:
        """(origin, make) for the row at the position, with the position already moved past it."""
        raise NotImplementedError

    def _next(self, stop_epoch: int | None) -> Example | None:
        # Any 2 * num_rows consecutive positions cover a whole epoch, so that many bad rows in a row means every row
        # is bad: stop with the counts rather than spin forever.
        for _ in range(2 * self.num_rows):
            if stop_epoch is not None and self._epoch > stop_epoch:
                return None
            origin, make = self._take()  # advance first: a resumed run continues after this row, good or bad
            try:
                return make()
            except _BadRow as bad:
                _log_skip(self.skipped, bad, origin)
        raise RuntimeError(f"{self!r}: every row is unusable; skipped so far: {dict(self.skipped)}")

    def _check_state(self, state: dict, **expected) -> None:
        for key, value in {"kind": self.kind, "seed": self.seed, "shuffle": self.shuffle, **expected}.items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume {self.kind} dataset: state has {key}={state.get(key)!r}, this dataset has "
                    f"{value!r} (a different set of files or settings would give a different sequence)"
                )


class ParquetDataset(_Resumable):
    """Examples from official parquet files (spec 5.4), read one row group at a time.

    ``paths``: file(s), directory(ies) (searched recursively) or globs. ``dataset_type``: one of `SCHEMAS` for every
    file, or "auto" to infer each file's type from its columns (files of different types may then be mixed).
    With ``shuffle``, each epoch visits files in a fresh order, each file's row groups in a fresh order and each group's
    rows in a fresh order (the group is in memory anyway), all drawn from ``(seed, epoch, ...)``.
    """

    kind = "parquet"

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        dataset_type: str = "auto",
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
    ):
        super().__init__(seed, shuffle, repeat)
        if dataset_type != "auto" and dataset_type not in SCHEMAS:
            raise ValueError(f"unknown dataset_type {dataset_type!r}; known: {describe_schemas()}")
        self.files = [_inspect(p, dataset_type) for p in _find_parquet(paths)]
        self.num_rows = sum(sum(f.group_rows) for f in self.files)
        if self.num_rows == 0:
            raise ValueError(f"no rows in {[str(f.path) for f in self.files]}")
        types = {f.dataset_type for f in self.files}
        self.dataset_type = types.pop() if len(types) == 1 else "mixed"
        # Position of the next row: indices into this epoch's file order, that file's group order, that group's row
        # order. Always normalised to a real row (see _settle).
        self._file = self._group = self._row = 0
        self._orders: dict[tuple, np.ndarray] = {}
        self._table_key: tuple | None = None
        self._table: pa.Table | None = None
        self._table_error = ""
        self._settle()

    def __repr__(self) -> str:
        return f"ParquetDataset({len(self.files)} files, {self.num_rows} rows, {self.dataset_type})"

    def _order(self, n: int, *key: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        if key not in self._orders:
            if len(self._orders) > 4096:  # orders are cheap to redraw; keep the cache bounded
                self._orders.clear()
            self._orders[key] = np.random.default_rng([self.seed, *key]).permutation(n)
        return self._orders[key]

    def _file_order(self) -> np.ndarray:
        return self._order(len(self.files), self._epoch, 0)

    def _group_order(self, f: int) -> np.ndarray:
        return self._order(len(self.files[f].group_rows), self._epoch, 1, f)

    def _settle(self) -> None:
        """Roll the position forward past finished groups, files and epochs (terminates: num_rows > 0)."""
        while True:
            files = self._file_order()
            if self._file >= len(files):
                self._epoch, self._file, self._group, self._row = self._epoch + 1, 0, 0, 0
                self._orders.clear()
                continue
            f = int(files[self._file])
            groups = self._group_order(f)
            if self._group >= len(groups):
                self._file, self._group, self._row = self._file + 1, 0, 0
                continue
            if self._row >= self.files[f].group_rows[int(groups[self._group])]:
                self._group, self._row = self._group + 1, 0
                continue
            return

    def _load(self, f: int, g: int) -> pa.Table | None:
        """One row group (only the needed columns); the last one stays cached."""
        if self._table_key != (f, g):
            info = self.files[f]
            self._table, self._table_error = None, ""
            try:
                with pq.ParquetFile(info.path) as pf:
                    self._table = pf.read_row_group(g, columns=list(info.columns))
            except (pa.ArrowException, OSError) as e:
                self._table_error = f"row group {g} cannot be read ({e})"
            self._table_key = (f, g)
        return self._table

    def _take(self) -> tuple[str, Callable[[], Example]]:
        f = int(self._file_order()[self._file])
        g = int(self._group_order(f)[self._group])
        info = self.files[f]
        i = int(self._order(info.group_rows[g], self._epoch, 2, f, g)[self._row])
        table, error = self._load(f, g), self._table_error
        origin = f"{info.path}:row {info.group_first_row[g] + i}"
        self._row += 1
        self._settle()

        def make() -> Example:
            if table is None:
                raise _BadRow("unreadable_row_group", error)

            def get(column: str):
                return table.column(column)[i].as_py() if column in table.column_names else None

            return _to_example(_row_to_raw(info.dataset_type, get), origin)

        return origin, make

    def state_dict(self) -> dict:
        """Position of the next example (file_index / row_group / row index this epoch's shuffled orders)."""
        return {
            "kind": self.kind,
            "epoch": self._epoch,
            "file_index": self._file,
            "row_group": self._group,
            "row": self._row,
            "skipped": dict(self.skipped),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_files": len(self.files),
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, num_files=len(self.files), num_rows=self.num_rows)
        self._epoch, self._file = int(state["epoch"]), int(state["file_index"])
        self._group, self._row = int(state["row_group"]), int(state["row"])
        self.skipped = collections.Counter(state.get("skipped", {}))
        self._orders.clear()
        self._settle()


class ManifestDataset(_Resumable):
    """Examples from a JSON-lines manifest; media paths are relative to the manifest's directory.

    One object per line (blank lines are ignored)::

        {"task": "t2i", "caption": "...", "image": "a.png"}
        {"task": "t2v", "caption": "...", "video": "a.mp4"}
        {"task": "image_edit", "instruction": "...", "source": "in.png", "target": "out.png"}   (video_edit alike)
        {"task": "x2t_image", "image": "a.png", "question": "...", "answer": "...", "instruction": "..."}
        {"task": "x2t_video", "video": "a.mp4", "question": "...", "answer": "..."}

    (question and instruction are optional for x2t). Only line offsets are kept in memory; lines are read on demand.
    """

    kind = "manifest"

    def __init__(self, path: PathLike, seed: int = 0, shuffle: bool = True, repeat: bool = True):
        super().__init__(seed, shuffle, repeat)
        self.path = Path(path)
        offsets, line_numbers, pos = [], [], 0
        with open(self.path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    offsets.append(pos)
                    line_numbers.append(number)
                pos += len(line)
        if not offsets:
            raise ValueError(f"{self.path}: no examples (the manifest is empty)")
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._line_numbers = np.asarray(line_numbers, dtype=np.int64)
        self.num_rows = len(offsets)
        self._line = 0  # index into this epoch's line order of the next line
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"ManifestDataset({self.path}, {self.num_rows} lines)"

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        if self._order_cache is None or self._order_cache[0] != self._epoch:
            order = np.random.default_rng([self.seed, self._epoch]).permutation(self.num_rows)
            self._order_cache = (self._epoch, order)
        return self._order_cache[1]

    def _take(self) -> tuple[str, Callable[[], Example]]:
        k = int(self._order()[self._line])
        with open(self.path, "rb") as fh:
            fh.seek(int(self._offsets[k]))
            text = fh.readline().decode("utf-8", errors="replace")
        origin = f"{self.path}:line {int(self._line_numbers[k])}"
        self._line += 1
        if self._line >= self.num_rows:
            self._epoch, self._line = self._epoch + 1, 0
        return origin, lambda: _to_example(_parse_manifest_line(text, self.path.parent), origin)

    def state_dict(self) -> dict:
        """Position of the next example (line = index into this epoch's shuffled line order)."""
        return {
            "kind": self.kind,
            "epoch": self._epoch,
            "line": self._line,
            "skipped": dict(self.skipped),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_lines": self.num_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, num_lines=self.num_rows)
        self._epoch, self._line = int(state["epoch"]), int(state["line"])
        if self._line >= self.num_rows:
            self._epoch, self._line = self._epoch + 1, 0
        self.skipped = collections.Counter(state.get("skipped", {}))


def _parse_manifest_line(text: str, base_dir: Path) -> _Raw:
    """A manifest line -> _Raw with media as paths; _BadRow naming the offending key and the allowed ones."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _BadRow("invalid_json", f"not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise _BadRow("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    task = obj.get("task")
    if task not in MANIFEST_KEYS:
        raise _BadRow("unknown_task", f"task {task!r} is not one of {', '.join(DATA_TASKS)}")
    required, optional = MANIFEST_KEYS[task]
    allowed = ("task", *required, *optional)
    for key in obj:
        if key not in allowed:
            raise _BadRow("unknown_key", f"unknown key {key!r} for task {task!r}; allowed keys: {', '.join(allowed)}")
    for key in required:
        if key not in obj:
            raise _BadRow("missing_value", f"missing key {key!r} for task {task!r}; required: {', '.join(required)}")

    def media(key: str) -> Path:
        return base_dir / _need_text(obj[key], key)

    if task in ("t2i", "t2v"):
        return _Raw(task, _need_text(obj["caption"], "caption"), target=media("image" if task == "t2i" else "video"))
    if task in ("image_edit", "video_edit"):
        return _Raw(task, _need_text(obj["instruction"], "instruction"), target=media("target"), source=media("source"))
    return _Raw(
        task,
        _optional_text(obj.get("question"), "question") or "",
        source=media("image" if task == "x2t_image" else "video"),
        answer=_need_text(obj["answer"], "answer"),
        instruction=_optional_text(obj.get("instruction"), "instruction"),
    )


def open_dataset(
    path: PathLike | Sequence[PathLike], dataset_type: str = "auto", **kw
) -> ParquetDataset | ManifestDataset:
    """A ManifestDataset for a ``.jsonl`` path, else a ParquetDataset; ``kw``: seed, shuffle, repeat."""
    if isinstance(path, (str, os.PathLike)) and str(path).endswith(".jsonl"):
        if dataset_type != "auto":
            raise ValueError("dataset_type is for parquet files; each manifest line names its own task")
        return ManifestDataset(path, **kw)
    return ParquetDataset(path, dataset_type=dataset_type, **kw)


class MixedDataset:
    """Draws each example from dataset i with probability weights[i] / sum(weights) (the release's group sampling).

    Draw k uses ``default_rng([seed, k])``, so the rng state is just the draw count. Children are advanced with
    `next_example`, i.e. cycled forever whatever their ``repeat``; iteration never ends (stop by count).
    """

    kind = "mixed"

    def __init__(self, datasets: list, weights: list[float], seed: int = 0):
        if not datasets or len(datasets) != len(weights):
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self._bounds = np.cumsum(self.weights)
        self.seed = int(seed)
        self._draws = 0

    def __repr__(self) -> str:
        return f"MixedDataset({self.datasets}, weights={self.weights.round(3).tolist()})"

    @property
    def skipped(self) -> collections.Counter:
        return sum((d.skipped for d in self.datasets), collections.Counter())

    def next_example(self) -> Example:
        return self.next_with_source()[0]

    def next_with_source(self) -> tuple[Example, int]:
        """The next example and the index of the dataset it came from (its preprocessing settings differ)."""
        u = np.random.default_rng([self.seed, self._draws]).random()
        self._draws += 1
        # side="right" never lands on a zero-weight dataset (its bound equals the previous one)
        i = min(int(np.searchsorted(self._bounds, u, side="right")), len(self.datasets) - 1)
        return self.datasets[i].next_example(), i

    def __iter__(self) -> Iterator[Example]:
        while True:
            yield self.next_example()

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "draws": self._draws,
            "weights": self.weights.tolist(),
            "children": [d.state_dict() for d in self.datasets],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or len(state.get("children", ())) != len(self.datasets):
            raise ValueError(f"cannot resume: state is not for a MixedDataset of {len(self.datasets)} datasets")
        if state["seed"] != self.seed or not np.allclose(state["weights"], self.weights):
            raise ValueError(f"cannot resume: state has seed {state['seed']} / weights {state['weights']}, "
                             f"this mix has {self.seed} / {self.weights.tolist()}")
        for child, child_state in zip(self.datasets, state["children"]):
            child.load_state_dict(child_state)
        self._draws = int(state["draws"])


# ---------------------------------------------------------------------------------------------- converters

# Arrow schema of the official row for each task (exact official column names).
_ROW_SCHEMAS: dict[str, pa.Schema] = {
    "t2i": pa.schema([("caption", pa.string()), ("image_bytes", pa.binary())]),
    "t2v": pa.schema([("caption", pa.string()), ("video_bytes", pa.binary())]),
    "image_edit": pa.schema(
        [("caption", pa.string()), ("input_image_bytes", pa.binary()), ("output_image_bytes", pa.binary())]
    ),
    "video_edit": pa.schema(
        [("caption", pa.string()), ("input_video_bytes", pa.binary()), ("output_video_bytes", pa.binary())]
    ),
    **{
        task: pa.schema(
            [(column, pa.binary()), ("caption_i", pa.string()), ("caption_q", pa.string()), ("caption_a", pa.string())]
        )
        for task, column in (("x2t_image", "image_bytes"), ("x2t_video", "video_bytes"))
    },
}
_ROWS_PER_GROUP = 64  # media rows are large: small row groups keep readers' memory small


def _output_name(task: str) -> str:
    # x2t images and videos go to separate files: the release configures image2text and video2text as separate
    # datasets (`is_image`), and a file then has one media column, as in its example data.
    if task == "x2t_image":
        return "x2t_general_image.parquet"
    if task == "x2t_video":
        return "x2t_general_video.parquet"
    return f"{TASK_TO_TYPE[task]}.parquet"


def _read_bytes(path: Path, role: str) -> bytes:
    if not path.is_file():
        raise _BadRow("missing_file", f"{role} file {path} does not exist")
    return path.read_bytes()


def _raw_to_row(raw: _Raw) -> dict:
    """_Raw with path media -> an official row (media read as bytes, not re-encoded)."""
    if raw.task in ("t2i", "t2v"):
        column = "image_bytes" if raw.task == "t2i" else "video_bytes"
        return {"caption": raw.text, column: _read_bytes(raw.target, "target")}
    if raw.task in ("image_edit", "video_edit"):
        kind = raw.task.split("_")[0]
        return {
            "caption": raw.text,
            f"input_{kind}_bytes": _read_bytes(raw.source, "source"),
            f"output_{kind}_bytes": _read_bytes(raw.target, "target"),
        }
    column = "image_bytes" if raw.task == "x2t_image" else "video_bytes"
    return {column: _read_bytes(raw.source, "source"), "caption_i": raw.instruction, "caption_q": raw.text,
            "caption_a": raw.answer}


def manifest_to_parquet(manifest: PathLike, out_dir: PathLike) -> list[Path]:
    """Write the manifest's examples as official parquet files in ``out_dir``, one per dataset_type present.

    Files are named ``<dataset_type>.parquet`` (x2t: ``x2t_general_image`` / ``x2t_general_video``) and overwritten.
    Media files are stored byte for byte (not decoded: an undecodable file is caught when training reads it). Invalid
    lines and missing media files are skipped with a warning, as the datasets do. Returns the written paths, sorted.
    """
    manifest, out_dir = Path(manifest), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, pq.ParquetWriter] = {}
    buffers: dict[str, list[dict]] = collections.defaultdict(list)
    skipped: collections.Counter = collections.Counter()

    def flush(task: str) -> None:
        if buffers[task]:
            if task not in writers:
                writers[task] = pq.ParquetWriter(out_dir / _output_name(task), _ROW_SCHEMAS[task])
            writers[task].write_table(pa.Table.from_pylist(buffers[task], schema=_ROW_SCHEMAS[task]))
            buffers[task].clear()

    try:
        with open(manifest, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    raw = _parse_manifest_line(line, manifest.parent)
                    _check_text(raw)
                    row = _raw_to_row(raw)
                except _BadRow as bad:
                    _log_skip(skipped, bad, f"{manifest}:line {number}")
                    continue
                buffers[raw.task].append(row)
                if len(buffers[raw.task]) >= _ROWS_PER_GROUP:
                    flush(raw.task)
        for task in list(buffers):
            flush(task)
    finally:
        for writer in writers.values():
            writer.close()
    if skipped:
        logger.warning("manifest_to_parquet(%s): skipped %d lines: %s", manifest, sum(skipped.values()), dict(skipped))
    return sorted(out_dir / _output_name(task) for task in writers)


def _media_suffix(data: bytes) -> str:
    """A file extension from the magic bytes (readers sniff content, so this only helps people and other tools)."""
    head = data[:16]
    if head.startswith(b"\x89PNG"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if head[:4] == b"RIFF":
        return {b"WEBP": ".webp", b"AVI ": ".avi"}.get(head[8:12], ".bin")
    if head[4:8] == b"ftyp":
        return ".mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return ".mkv"
    if head[:2] == b"BM":
        return ".bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    return ".bin"


def parquet_to_manifest(parquet_paths: PathLike | Sequence[PathLike], out_dir: PathLike) -> Path:
    """Write ``out_dir/manifest.jsonl`` and its media files (``out_dir/media/...``, bytes as stored) from parquet files.

    Files are read in sorted order, rows in stored order, each file's dataset_type inferred from its columns. Rows
    with null / mistyped values or empty captions are skipped with a warning; media are not decoded.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    skipped: collections.Counter = collections.Counter()
    with open(manifest, "w", encoding="utf-8") as out:
        for index, path in enumerate(_find_parquet(parquet_paths)):
            info = _inspect(path)
            media_dir = out_dir / "media" / f"{index:03d}_{path.stem}"
            media_dir.mkdir(parents=True, exist_ok=True)
            with pq.ParquetFile(path) as pf:
                for g, first in enumerate(info.group_first_row):
                    table = pf.read_row_group(g, columns=list(info.columns))
                    for i in range(table.num_rows):
                        row = first + i

                        def get(column: str, i=i, table=table):
                            return table.column(column)[i].as_py() if column in table.column_names else None

                        def store(key: str, data: bytes, row=row, media_dir=media_dir) -> str:
                            target = media_dir / f"{row:06d}_{key}{_media_suffix(data)}"
                            target.write_bytes(data)
                            return target.relative_to(out_dir).as_posix()

                        try:
                            raw = _row_to_raw(info.dataset_type, get)
                            _check_text(raw)
                        except _BadRow as bad:
                            _log_skip(skipped, bad, f"{path}:row {row}")
                            continue
                        out.write(json.dumps(_raw_to_manifest(raw, store), ensure_ascii=False) + "\n")
    if skipped:
        logger.warning("parquet_to_manifest: skipped %d rows: %s", sum(skipped.values()), dict(skipped))
    return manifest


def _raw_to_manifest(raw: _Raw, store: Callable[[str, bytes], str]) -> dict:
    """_Raw with bytes media -> a manifest object; ``store(key, bytes)`` writes a media file, returns its rel path."""
    if raw.task in ("t2i", "t2v"):
        key = "image" if raw.task == "t2i" else "video"
        return {"task": raw.task, "caption": raw.text, key: store(key, raw.target)}
    if raw.task in ("image_edit", "video_edit"):
        return {"task": raw.task, "instruction": raw.text, "source": store("source", raw.source),
                "target": store("target", raw.target)}
    key = "image" if raw.task == "x2t_image" else "video"
    line = {"task": raw.task, key: store(key, raw.source), "question": raw.text, "answer": raw.answer}
    if raw.instruction is not None:
        line["instruction"] = raw.instruction
    return line


__all__ = [
    "Example", "DATA_TASKS", "SCHEMAS", "TASK_TO_TYPE", "MANIFEST_KEYS", "SKIP_REASONS",
    "VIDEO_FPS", "GEN_MAX_SECONDS", "X2T_MAX_SECONDS", "FRAME_RULE",
    "detect_dataset_type", "describe_schemas", "ParquetDataset", "ManifestDataset", "MixedDataset", "open_dataset",
    "manifest_to_parquet", "parquet_to_manifest",
]
