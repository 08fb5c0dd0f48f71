"""The last step of every ONNX quantizer here: onnxruntime's own quantizer kept quiet while it works, and the
result proven to load in onnxruntime before it atomically replaces the output."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx

from compress.core import ModelError, atomic_dir, save_model, sessions
from compress.core import first_line as _first_line


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's quantizer and optimizer print and log warnings meant for their own CLI; keep them off."""
    import onnxruntime as ort

    buf = io.StringIO()
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        ort.set_default_logger_severity(2)
        logging.disable(logging.NOTSET)


def write_final(model: onnx.ModelProto, work: Path, dst: Path, what: str = "INT8") -> None:
    """Save into the work folder, prove onnxruntime's CPU provider loads it, then rename it into place."""
    stage = work / "final"
    stage.mkdir()
    external = save_model(model, stage / dst.name)
    try:
        sessions.session(stage / dst.name)
    except Exception as e:
        raise ModelError(f"the {what} model does not load in onnxruntime's CPU provider: {_first_line(e)}") from e
    with atomic_dir(dst.parent, last=dst.name) as tmp:
        for f in stage.iterdir():
            shutil.move(str(f), tmp / f.name)
    stale = dst.parent / (dst.name + ".data")
    if not external and stale.exists():
        stale.unlink()
