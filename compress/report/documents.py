"""Reading the JSON documents the commands write (a profile, a run's report.json or its folder, a comparison),
with one-line errors for everything a user can hand over by mistake."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compress.core import InputError

MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json_file(source: str | os.PathLike, hint: str) -> tuple[Any, Path]:
    """The JSON document at `source` (a run's output folder means its report.json) and its path; one-line
    InputErrors for a missing path, a folder without report.json, an oversized, non-UTF-8 or invalid file.
    `hint` says what to give instead when nothing is there."""
    p = Path(source).expanduser()
    if not p.exists():
        raise InputError(f"{source}: no such file or folder ({hint})")
    if p.is_dir():
        if not (p / "report.json").is_file():
            raise InputError(f"{source}: no report.json in this folder (is it a `compress run` output folder?)")
        p = p / "report.json"
    try:
        size = p.stat().st_size
        if size > MAX_JSON_BYTES:
            raise InputError(f"{p}: {size / 1e6:.0f} MB is no profile or report (limit {MAX_JSON_BYTES >> 20} MiB)")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a JSON file (not UTF-8 text)") from None
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        return json.loads(text), p
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
