"""Stage cache for `compress run`: a rerun with the same inputs and options reuses finished stages.

Pruning with recovery, export with its parity check, and quantization with preset/op timing and fallback
take minutes on real models; a user who only changes `--tolerance` or re-profiles after a reboot should not
pay them again. Each stage's entry is keyed by content hashes of everything it depends on (model weights and
structure, example and calibration data, options, device profile, library versions), so a changed input
is a new key, never a stale hit. Latency is never cached: profiling and the interleaved A/B run every time,
because measurements are what a rerun is for.

Entries live in $EDGE_COMPRESS_CACHE (default: $XDG_CACHE_HOME/edge-compress, else ~/.cache/edge-compress),
one folder per key holding the stage's files and meta.json, written to a temp folder and renamed into place;
a folder without meta.json is never read. Nothing is unpickled: files are ONNX models and JSON.
`--force` recomputes every stage and replaces its entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np

from compress import __version__
from compress.core import Result, warn

R = TypeVar("R", bound=Result)

FORMAT = 1  # bump when what an entry holds changes


def cache_root() -> Path:
    env = os.environ.get("EDGE_COMPRESS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "edge-compress"


class Hasher:
    """sha256 over a sequence of typed parts, so ("ab", "c") and ("a", "bc") never collide."""

    def __init__(self, stage: str) -> None:
        self.h = hashlib.sha256()
        self.add("stage", stage, FORMAT, _versions())

    def add(self, *parts: Any) -> "Hasher":
        for p in parts:
            self._one(p)
        return self

    def _one(self, p: Any) -> None:
        if p is None or isinstance(p, (bool, int, float, str)):
            self._bytes(b"j", json.dumps(p).encode())
        elif isinstance(p, bytes):
            self._bytes(b"b", p)
        elif isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            self._bytes(b"n", f"{a.dtype.str}{a.shape}".encode())
            self._bytes(b"d", a.tobytes())
        elif _is_tensor(p):
            t = p.detach().cpu()
            self._one(str(t.dtype))
            self._one((t.float() if str(t.dtype) == "torch.bfloat16" else t).contiguous().numpy())
        elif isinstance(p, Path):
            self._file(p)
        elif isinstance(p, Mapping):
            self._bytes(b"m", str(len(p)).encode())
            for k in sorted(p, key=str):
                self._one(str(k))
                self._one(p[k])
        elif isinstance(p, (list, tuple)):
            self._bytes(b"l", str(len(p)).encode())
            for x in p:
                self._one(x)
        else:
            self._bytes(b"r", repr(p).encode())

    def _bytes(self, tag: bytes, data: bytes) -> None:
        self.h.update(tag + len(data).to_bytes(8, "little") + data)

    def _file(self, path: Path) -> None:
        """A file's content (and an ONNX model's external data beside it), never its name or date."""
        for p in (path, path.parent / (path.name + ".data")):
            if p.is_file():
                with open(p, "rb") as f:
                    self._bytes(b"f", hashlib.file_digest(f, "sha256").digest())

    def module(self, module: Any) -> "Hasher":
        """A torch module by what defines its outputs: class, structure (repr) and every tensor of its state.
        (The class's __module__ is left out: a user's file is imported under a generated module name.)"""
        self.add(type(module).__qualname__, repr(module))
        for name, t in module.state_dict().items():
            self.add(name, t)
        return self

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _is_tensor(p: Any) -> bool:
    return type(p).__module__.startswith("torch") and hasattr(p, "detach")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"edge-compress": __version__, "code": code_digest(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


# the packages whose code decides what a stage writes
CODE_PACKAGES = ("compress", "export", "runtime", "devices")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """This installation's own source files, hashed: a checkout that changed (a pull, an edit) is a new key,
    where the version string alone would reuse what the old code wrote (4 ms for its 120 files)."""
    return tree_digest(Path(__file__).resolve().parents[2])


def tree_digest(top: Path) -> str:
    """sha256 of the .py files (paths and contents) of the CODE_PACKAGES under `top`."""
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for f in sorted((top / pkg).rglob("*.py")):
            h.update(str(f.relative_to(top).as_posix()).encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


class StageCache:
    """get/put of one stage's outputs (files + JSON meta) under a key; disabled, it computes every time."""

    def __init__(self, root: Optional[Path] = None, *, enabled: bool = True, force: bool = False) -> None:
        self.root = root or cache_root()
        self.enabled, self.force = enabled, force
        self.events: dict[str, str] = {}  # stage -> "hit" | "miss" | "forced" | "off"

    def run(self, stage: str, key: str, outputs: Iterable[Path], compute: Callable[[], Any],
            result: Optional[type[R]] = None) -> Any:
        """The stage's result; its files copied to `outputs` (stored under their own names, which an ONNX
        model's external data reference depends on).

        On a miss `compute()` writes the outputs and returns the result (a typed `result`, stored as its JSON
        form; or plain JSON data when `result` is None); a hit reads it back. A cache that cannot be written
        (full disk, read-only home) costs the reuse, never the run.
        """
        entry = self.root / stage / key
        outputs = list(outputs)
        if not self.enabled:
            self.events[stage] = "off"
            return compute()
        if not self.force and (entry / "meta.json").is_file():
            try:
                meta = json.loads((entry / "meta.json").read_text())
                meta = result.from_json(meta) if result is not None else meta
                for dst in outputs:
                    _copy_model(entry / dst.name, dst)
                self.events[stage] = "hit"
                return meta
            except (OSError, ValueError):
                pass  # unreadable entry, or one an older version wrote: recompute and replace it
        meta = compute()
        self.events[stage] = "forced" if self.force else "miss"
        try:
            self._store(entry, meta.to_json() if result is not None else meta, outputs)
        except OSError as e:
            warn(f"stage cache not written ({self.root}): {e.strerror or e}")
        return meta

    def _store(self, entry: Path, meta: dict[str, Any], outputs: list[Path]) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            for src in outputs:
                _copy_model(src, tmp / src.name)
            (tmp / "meta.json").write_text(json.dumps(meta))
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _copy_model(src: Path, dst: Path) -> None:
    """An ONNX file and its external data (`<name>.data`, as export/onnx_export writes it), if any."""
    shutil.copyfile(src, dst)
    data = src.parent / (src.name + ".data")
    if data.is_file():
        shutil.copyfile(data, dst.parent / (dst.name + ".data"))


def key_of(stage: str, parts: Iterable[Any], modules: Iterable[Any] = ()) -> str:
    h = Hasher(stage).add(*parts)
    for m in modules:
        h.module(m)
    return h.hexdigest()
