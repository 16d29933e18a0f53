"""The release's training-data schema (spec 5.4): what a parquet row or a manifest line must hold for each task, how
a row becomes a decoded `Example`, and the reasons a bad row is skipped (never silently, never fatally).

The readers are in `datasets.py`, the converters between parquet and manifests in `convert.py`.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lance_rl.model.media import MediaError, read_image, read_video
from lance_rl.model.tasks import TASKS, is_generation

logger = logging.getLogger("lance_rl.data.datasets")  # one logger for every skip message

PathLike = Union[str, os.PathLike]

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

