"""One error type per failure class, so the CLI can map each to an exit code and a one-line message.

Every message names the file or field at fault and what to do about it; tracebacks are for `--debug`.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class: a failure the user can act on. Exit code 1 unless a subclass says otherwise."""

    exit_code = 1
    kind = "error"


class UsageError(EdgeError):
    """The command line itself is wrong (bad option values, conflicting flags)."""

    exit_code = 2
    kind = "usage"


class InputError(EdgeError):
    """An input file or value is missing, unreadable or does not fit (weights, calibration data, YAML)."""

    kind = "input"


class ModelError(EdgeError):
    """The model cannot be loaded, run, exported, or its export does not match torch."""

    kind = "model"


class DeviceError(EdgeError):
    """A device profile is unknown or invalid, or the device cannot run what the profile asks."""

    kind = "device"


class RuntimeFailure(EdgeError):
    """onnxruntime or a subprocess failed while running a model that loaded fine."""

    kind = "runtime"


class BudgetMissed(EdgeError):
    """The command did its work and wrote its figures, but they miss a budget the caller set (--max-p50-ms and
    the like): exit code 3, so a CI job can tell "over budget" from "failed" (1) and "wrong flags" (2)."""

    exit_code = 3
    kind = "budget"


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message: library errors span lines, ours take one."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(e).__name__


def few(items: list[str], n: int = 3) -> str:
    """The first `n` names of a list for a one-line error, with ', ...' when there are more."""
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
