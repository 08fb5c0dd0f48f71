"""Terminal output: rich progress and tables on a TTY, silence otherwise (scripts and CI read --json)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from compress.core.atomic import write_json

err_console = Console(stderr=True, highlight=False)
# Piped output is read by people in logs and CI too; rich's 80-column default folds tables into unreadable cells.
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def interactive() -> bool:
    return sys.stderr.isatty()


def info(msg: str) -> None:
    """A status line for people; dropped when stderr is not a terminal."""
    if interactive():
        err_console.print(msg)


def warn(msg: str) -> None:
    """Warnings always reach stderr: they change what the user should trust."""
    if interactive():
        err_console.print(f"[yellow]warning:[/yellow] {msg}")
    else:  # one unwrapped line per warning, for logs and scripts
        sys.stderr.write(f"warning: {msg}\n")
        sys.stderr.flush()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def report_json(path: str | None, obj: Any) -> bool:
    """--json: '-' prints the JSON on stdout and returns True (the caller then prints nothing else, so scripts can
    parse stdout); FILE writes it atomically and returns False, as does no --json."""
    if path == "-":
        emit_json(obj)
        return True
    if path:
        write_json(path, obj)
    return False


def plain_every() -> float:
    """Seconds between plain progress lines when stderr is not a TTY ($EDGE_COMPRESS_PROGRESS_EVERY, default 5)."""
    try:
        return max(0.05, float(os.environ.get("EDGE_COMPRESS_PROGRESS_EVERY", PLAIN_EVERY)))
    except ValueError:
        return PLAIN_EVERY


PLAIN_EVERY = 5.0


@contextlib.contextmanager
def progress(description: str, total: float | None = None) -> Iterator["Step"]:
    """A progress bar (or spinner when total is None) on stderr. When stderr is not a TTY (CI logs, a script's
    pipe), a plain line instead every few seconds while the step lasts (`progress: STAGE [done/total] 12s`):
    a 10-minute quantization used to print nothing at all until it ended. Steps shorter than that print
    nothing."""
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}")]
    columns.append(TimeElapsedColumn())
    plain = not interactive()
    with Progress(*columns, console=err_console, disable=plain, transient=True) as prog:
        task = prog.add_task(description, total=total)
        stop = threading.Event()
        ticker = threading.Thread(target=_plain_lines, args=(prog, task, stop, plain_every()), daemon=True)
        if plain:
            ticker.start()
        try:
            yield Step(prog, task)
        finally:
            stop.set()
            if plain:
                ticker.join()


def _plain_lines(prog: Progress, task: Any, stop: threading.Event, every: float) -> None:
    t0 = time.monotonic()
    while not stop.wait(every):
        t = next((x for x in prog.tasks if x.id == task), None)
        if t is None:
            return
        done = f" [{t.completed:.0f}/{t.total:.0f}]" if t.total is not None else ""
        sys.stderr.write(f"progress: {t.description}{done} {time.monotonic() - t0:.0f}s\n")
        sys.stderr.flush()


class Step:
    """Handle to one progress task; safe to call when the bar is disabled."""

    def __init__(self, prog: Progress, task: int) -> None:
        self._prog, self._task = prog, task

    def update(self, completed: float | None = None, total: float | None = None, description: str | None = None) -> None:
        kw: dict[str, Any] = {}
        if completed is not None:
            kw["completed"] = completed
        if total is not None:
            kw["total"] = total
        if description is not None:
            kw["description"] = description
        self._prog.update(self._task, **kw)
