"""Decoded training examples for the SFT trainer: the release's parquet schema (spec 5.4) and a JSON-lines manifest.

Two sources, one output type (`Example`):

* `ParquetDataset` reads the official files, one `dataset_type` per file (``text2image_general``,
  ``text2video_general``, ``image2image``, ``video2video``, ``x2t_general``), inferred from the columns unless given.
  Rows are read one row group at a time with pyarrow, so a file of media bytes never sits in memory whole.
* `ManifestDataset` reads a JSON-lines file whose media are paths relative to it, for people without parquet.

`convert.py`'s `manifest_to_parquet` / `parquet_to_manifest` convert between the two (media bytes are copied, never
re-encoded); the schema, the rows' decoding and the skip reasons are in `schema.py`. `open_dataset` picks the reader
from the path, and `MixedDataset` mixes datasets by normalised weight, the release's
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
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lance_rl.data.schema import (
    DATA_TASKS,
    MANIFEST_KEYS,
    SCHEMAS,
    Example,
    _BadRow,
    _find_parquet,
    _inspect,
    _log_skip,
    _need_text,
    _optional_text,
    _Raw,
    _row_to_raw,
    _to_example,
    describe_schemas,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

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


