"""Ctrl-C, and the SIGTERM/SIGHUP that CI runners, `timeout`, systemd and Kubernetes send, that libraries cannot
swallow.

torch.export catches every exception while tracing, KeyboardInterrupt included, and re-raises it as a
TorchExportError; our exporter then took that for an export failure, fell back to TorchScript and wrote the
output the user had just cancelled. So the CLI's SIGINT handler also records the interrupt, and the places
that commit an output (atomic renames) and the broad `except` blocks around library calls ask
`check_interrupted` / `reraise_if_interrupted`: a cancelled command stops at the latest before it writes.
SIGTERM and SIGHUP take the same path (every `finally` that removes a partial output or stops a runner
process runs); the CLI then exits with 128 + the signal's number, as a shell reports a killed command.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, NoReturn

_interrupted = threading.Event()
_received: list[int] = []  # the first signal that stopped the command
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum: int, frame: Any) -> NoReturn:
    if not _received:
        _received.append(signum)
    _interrupted.set()
    raise KeyboardInterrupt


def install() -> None:
    """Record Ctrl-C, SIGTERM and SIGHUP, and raise KeyboardInterrupt for each, as Python's own handler does for
    Ctrl-C. Main thread only."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _on_signal)


def interrupted() -> bool:
    return _interrupted.is_set()


def received() -> int:
    """The signal that stopped the command (SIGINT when it was a KeyboardInterrupt from elsewhere)."""
    return _received[0] if _received else int(signal.SIGINT)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even when a library caught it: call before committing."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def reraise_if_interrupted(e: BaseException) -> None:
    """In `except Exception as e` around library code: an exception that wraps a Ctrl-C is a Ctrl-C."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            raise KeyboardInterrupt from e
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    check_interrupted()
