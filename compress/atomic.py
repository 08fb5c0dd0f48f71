"""Atomic outputs: write beside the target, then rename, so a failed run leaves the old output as it was."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from compress.errors import InputError, UsageError


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike] = ()) -> Path:
    """Refuse an output that would overwrite an input, or that lies where nothing can be written."""
    out_p = Path(out).expanduser()
    for inp in inputs:
        if inp is None:
            continue
        try:
            if out_p.resolve() == Path(inp).expanduser().resolve():
                raise UsageError(f"-o {out} is also an input; choose another output path")
        except OSError:
            continue
    parent = out_p.parent if str(out_p.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InputError(f"cannot write {out}: {existing} is not a writable folder")
    return out_p


def check_onnx_output(out: str, inputs: list[str | os.PathLike | None] = ()) -> Path:
    """check_output_path for a command whose -o is one .onnx file."""
    path = check_output_path(out, inputs)
    if not str(out).lower().endswith(".onnx"):
        raise UsageError(f"-o {out}: the output must end in .onnx")
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it onto the target only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    os.chmod(tmp_p, default_mode(0o666))  # mkstemp makes 0600; an output file gets the usual permissions
    try:
        yield tmp_p
        os.replace(tmp_p, target)
    finally:
        if tmp_p.exists():
            tmp_p.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Yield a temp folder beside the target; its files are moved into the target folder on success.

    Used where one output is several files (an ONNX model with external data): each file is renamed
    into place only after all of them were written, and `last` (the file that refers to the others)
    goes last, so a reader never finds it before its data.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target))
    os.chmod(tmp, default_mode(0o777))
    try:
        yield tmp
        for f in sorted(tmp.iterdir(), key=lambda f: (f.name == last, f.name)):
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_mode(base: int) -> int:
    """`base` with the process umask applied, as open()/mkdir() would give."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (indent 2, trailing newline)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
