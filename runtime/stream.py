"""Runner processes, local or over ssh: start one, send its config as JSON on stdin, forward the progress lines
it writes to stderr, and read the one JSON document it prints (an error document becomes our own error type).

The profiler (local runs) and the SSH transport (remote runs) both drive runner.py through here, so the
protocol between host and device is written once.
"""

from __future__ import annotations

import collections
import json
import subprocess
import threading
from dataclasses import dataclass
from typing import IO, Any, Callable, Optional

from compress.core import DeviceError, EdgeError, ModelError, RuntimeFailure, UsageError

ProgressFn = Callable[[int, Optional[int], str], None]

_ERROR_KINDS: dict[str, type[EdgeError]] = {
    "model": ModelError,
    "device": DeviceError,
    "config": UsageError,
    "runtime": RuntimeFailure,
}


@dataclass
class StreamResult:
    """What a runner process left: its stdout, exit status, the last non-progress stderr lines, and whether
    the timeout killed it."""

    stdout: str
    rc: int
    stderr_tail: list[str]
    timed_out: bool = False

    @property
    def last_line(self) -> str:
        return self.stderr_tail[-1] if self.stderr_tail else ""


def stream_process(cmd: list[str], config: dict[str, Any], on_progress: ProgressFn | None = None, *,
                   timeout: float | None = None, new_session: bool = False, what: str = "the runner") -> StreamResult:
    """Start CMD, send CONFIG as JSON on its stdin, forward its stderr progress lines, wait (at most TIMEOUT s).

    The same code drives the local runner and the remote one (CMD is then an ssh command line, whose
    stderr carries the device's progress lines). new_session keeps Ctrl-C away from the child, so that the
    caller, not the terminal, decides how it stops (ssh must be stopped before the device is cleaned up).
    """
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, encoding="utf-8", errors="replace", start_new_session=new_session)
    except OSError as e:
        raise RuntimeFailure(f"cannot start {what} ({cmd[0]}): {e.strerror or e}") from e
    stdout_chunks: list[str] = []
    reader = threading.Thread(target=lambda: stdout_chunks.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    fired = threading.Event()
    timer = None
    if timeout is not None:
        def expire() -> None:
            fired.set()
            _stop(proc, grace=2)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
    try:
        _send_config(proc, config)
        tail = _pump_stderr(proc.stderr, on_progress)  # type: ignore[arg-type]
        rc = proc.wait()
        reader.join()
    except BaseException:  # Ctrl-C (or a failing on_progress): never leave the runner behind
        _stop(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    return StreamResult("".join(stdout_chunks), rc, tail, fired.is_set())


def _send_config(proc: subprocess.Popen, config: dict[str, Any]) -> None:
    try:
        proc.stdin.write(json.dumps(config))  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    except BrokenPipeError:
        pass  # the runner died before reading; its exit status and stderr say why


def _pump_stderr(stream: IO[str], on_progress: ProgressFn | None, keep: int = 40) -> list[str]:
    """Forward progress lines; keep the last other lines: the last is the best crash message there is, and
    ssh's own diagnostics (host key banners) span several."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    for line in stream:
        line = line.strip()
        if not line:
            continue
        msg = _progress_line(line)
        if msg is None:
            tail.append(line)
        elif on_progress is not None:
            on_progress(*msg)
    return list(tail)


def _progress_line(line: str) -> tuple[int, int | None, str] | None:
    if not line.startswith("{"):
        return None
    try:
        d = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(d, dict) or "progress" not in d:
        return None
    return int(d["progress"]), (int(d["total"]) if d.get("total") is not None else None), str(d.get("phase", ""))


def _stop(proc: subprocess.Popen, grace: float = 5) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_output(stdout: str, rc: int, last_stderr: str) -> dict[str, Any]:
    doc = None
    text = stdout.strip()
    if text:
        try:
            doc = json.loads(text.splitlines()[-1])
        except json.JSONDecodeError:
            doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        cls = _ERROR_KINDS.get(err.get("kind", ""), RuntimeFailure)
        raise cls(str(err.get("message", "the runner failed")))
    if rc != 0 or not isinstance(doc, dict):
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        hint = " (out of memory?)" if rc == -9 else ""
        detail = f": {last_stderr}" if last_stderr else ""
        raise RuntimeFailure(f"the profiling runner {how}{hint} without a result{detail}")
    return doc
