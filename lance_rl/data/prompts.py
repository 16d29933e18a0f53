"""Prompt sets for RL: the shapes world's splits by name, a .txt file (one prompt a line) or a .jsonl file
({"prompt": ..., "source": media path for editing / i2v, relative to the file}).

Every problem is reported before any model loads, naming the file and line: a file that is not UTF-8, an empty set,
a JSONL line that does not parse or has no prompt, a source that does not exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from lance_rl.config import RecipeError

NAMED_SETS = ("shapes", "shapes-heldout")


def load_prompts(source: str, field: str = "prompts", seed: int = 0) -> list[dict]:
    """Prompt records {"prompt", optional "source"}; `field` names the recipe field in error messages."""
    if source in NAMED_SETS:
        from lance_rl.data.shapes import split_prompts

        train, heldout = split_prompts(seed)
        return [{"prompt": p.caption} for p in (train if source == "shapes" else heldout)]
    path = Path(source)
    if not path.is_file():
        raise RecipeError(f"{field}: prompt file {source} does not exist (or use one of {', '.join(NAMED_SETS)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{field}: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    rows = _jsonl(path, text, field) if path.suffix == ".jsonl" else [{"prompt": s.strip()} for s in text.splitlines() if s.strip()]
    if not rows:
        raise RecipeError(f"{field}: {path} holds no prompts")
    return rows


def _jsonl(path: Path, text: str, field: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{field}: {path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise RecipeError(f"{where}: every line needs a non-empty string 'prompt'")
        if row.get("source"):
            resolved = (path.parent / row["source"]).resolve()
            if not resolved.is_file():
                raise RecipeError(f"{where}: source {row['source']} does not exist (looked for {resolved})")
            row["source"] = str(resolved)
        rows.append(row)
    return rows
