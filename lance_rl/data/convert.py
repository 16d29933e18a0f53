"""Converters between the official parquet files and JSON-lines manifests: media bytes are copied, never re-encoded;
invalid lines and missing media are skipped with a warning, as the readers do."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Callable, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from lance_rl.data.datasets import _parse_manifest_line
from lance_rl.data.schema import (
    TASK_TO_TYPE,
    _BadRow,
    _check_text,
    _find_parquet,
    _inspect,
    _log_skip,
    _Raw,
    _row_to_raw,
    logger,
)

PathLike = Union[str, os.PathLike]

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


