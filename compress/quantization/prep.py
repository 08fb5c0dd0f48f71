"""Pre-processing before quantization that does not give up when onnxruntime's own pre-processing does.

onnxruntime recommends `quant_pre_process` (symbolic shape inference, ORT's basic graph optimisation, ONNX shape
inference) before quantizing: the quantizer needs tensor shapes and types to decide what it can quantize. On
real transformer exports its symbolic shape inference raises (all-MiniLM-L6-v2 exported by torch's dynamo
exporter: a TypeError in the Expand handler), and users are left with nothing. Here each failure steps down to a
less ambitious recipe, and the step that worked is recorded:

1. `symbolic`     quant_pre_process as onnxruntime intends;
2. `no-symbolic`  quant_pre_process without symbolic shape inference;
3. `onnx-shape`   plain onnx.shape_inference on the model as it is;
4. `ort-basic`    no shape inference at all: onnxruntime's basic optimisation, saved through
                  SessionOptions.optimized_model_filepath (the quantizer then works from ORT's own types).

Every candidate is opened in onnxruntime before it is accepted, so a step that "succeeds" with a broken model
does not end the search. `optimize=False` leaves ORT's optimiser out of steps 1-2: its MatMul+Add -> Gemm fusion
turns transformer projections into Gemms, which dynamic quantization cannot quantize. The source file is only
ever read; outputs go to a temp folder beside `dst` and are renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx

from compress.core import (
    TWO_GB,
    InputError,
    ModelError,
    atomic_dir,
    initializer_bytes,
    save_model,
    sessions,
)
from compress.core import (
    first_line as _first_line,
)

STEPS = ("symbolic", "no-symbolic", "onnx-shape", "ort-basic")
# Per-channel QuantizeLinear/DequantizeLinear (their `axis`) came with opset 13: a model from another toolchain at
# opset 10-12 (PaddleOCR's PP-OCRv4, torch's TorchScript exporter at 12) is upgraded first, or onnxruntime refuses
# the quantized graph ("Unrecognized attribute: axis for operator DequantizeLinear")
MIN_QDQ_OPSET = 13
_PRE_LOGGER = "onnxruntime.quantization.shape_inference"


def upgrade_opset(path: Path, to: int) -> dict[str, int] | None:
    """Rewrite the model at `path` to opset `to` with onnx's version converter when its default-domain opset is
    older; {"from", "to"} when it did, None when nothing was needed. A model the converter cannot carry is a
    ModelError naming both opsets (quantizing it as it is would fail later, less clearly)."""
    model = onnx.load(str(path), load_external_data=False)
    now = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if now is None or now >= to:
        return None
    try:
        from onnx import version_converter

        model = version_converter.convert_version(onnx.load(str(path), load_external_data=True), to)
    except Exception as e:
        raise ModelError(f"{path.name} is at opset {now}; INT8 with per-channel scales needs opset {to}, and onnx's "
                         f"version converter could not upgrade it: {_first_line(e)}") from e
    save_model(model, path)
    return {"from": int(now), "to": to}


def has_external_data(path: str | Path) -> bool:
    """Whether the model keeps any initializer outside the .onnx file (so outputs must too)."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@contextlib.contextmanager
def _captured_errors() -> Iterator[list[str]]:
    """quant_pre_process logs (and swallows) an ORT optimisation failure; catch that so it is reported."""
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                lines.append(record.getMessage())

    log = logging.getLogger(_PRE_LOGGER)
    handler, old = _Keep(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.propagate = old


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """Run from `path`: onnxruntime's symbolic shape inference, where it cannot finish (ultralytics' YOLO),
    saves `sym_shape_infer_temp.onnx` and a copy of the weights under a random name into the current directory
    (the user's) before raising: 3 files and 12.6 MB per YOLOv8n quantization. The process's directory: one
    quantization at a time per process, as the pipeline and Ray trials run them."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _quant_pre_process(src: Path, out: Path, external: bool, *, symbolic: bool, optimize: bool) -> dict[str, Any]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = Path(src).resolve(), Path(out).resolve()
    with _captured_errors() as errors, tempfile.TemporaryDirectory(prefix=".shape-", dir=out.parent) as tmp, \
            _working_dir(Path(tmp)):
        quant_pre_process(str(src), str(out), skip_optimization=not optimize, skip_symbolic_shape=not symbolic,
                          save_as_external_data=external, all_tensors_to_one_file=True,
                          external_data_location=out.name + ".data" if external else None)
    failed = any("Optimization Failed" in e for e in errors)
    return {"optimized": optimize and not failed, **({"optimizer_error": errors[0]} if failed else {})}


def _onnx_shape(src: Path, out: Path, external: bool) -> dict[str, Any]:
    model = onnx.load(str(src), load_external_data=True)
    if initializer_bytes(model) >= TWO_GB:  # the in-memory inference cannot take > 2 GB protobufs
        save_model(model, out, external=True)
        onnx.shape_inference.infer_shapes_path(str(out), str(out))
    else:
        save_model(onnx.shape_inference.infer_shapes(model, strict_mode=False), out, external)
    return {"optimized": False}


def _ort_basic(src: Path, out: Path, external: bool) -> dict[str, Any]:

    config = {"session.optimized_model_external_initializers_file_name": out.name + ".data",
              "session.optimized_model_external_initializers_min_size_in_bytes": "1024"} if external else None
    sessions.session(src, level="basic", optimized_path=out, config=config)
    return {"optimized": True}


def _check_loads(path: Path) -> None:

    sessions.session(path, level="disable")  # only: is it a valid model?


def preprocess(src: str | Path, dst: str | Path, *, optimize: bool = True,
               steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
    """Write a quantization-ready copy of `src` to `dst`; return {"step", "attempts", "external_data", ...}.

    Raises ModelError only when no step yields a model onnxruntime can open (then the model itself is broken).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(f"model {src} not found")
    if src.resolve() == dst.resolve():
        raise InputError(f"pre-processing would overwrite its source {src}; choose another output")
    try:
        external = has_external_data(src)
    except Exception as e:
        raise InputError(f"{src} is not a readable ONNX model: {_first_line(e)}") from e
    runners: dict[str, Callable[[Path, Path], dict[str, Any]]] = {
        "symbolic": lambda s, o: _quant_pre_process(s, o, external, symbolic=True, optimize=optimize),
        "no-symbolic": lambda s, o: _quant_pre_process(s, o, external, symbolic=False, optimize=optimize),
        "onnx-shape": lambda s, o: _onnx_shape(s, o, external),
        "ort-basic": lambda s, o: _ort_basic(s, o, external),
    }
    unknown = [s for s in steps if s not in runners]
    if unknown:
        raise ValueError(f"unknown pre-processing step(s) {unknown}; known: {', '.join(STEPS)}")
    attempts: list[dict[str, str]] = []
    dst.parent.mkdir(parents=True, exist_ok=True)
    for step in steps:
        work = Path(tempfile.mkdtemp(prefix=".quant-prep-", dir=dst.parent))
        try:
            out = work / dst.name
            try:
                info = runners[step](src, out)
                _check_loads(out)
            except Exception as e:  # any failure: the next, less ambitious step
                attempts.append({"step": step, "error": f"{type(e).__name__}: {_first_line(e)}"})
                continue
            with atomic_dir(dst.parent, last=dst.name) as tmp:
                for f in work.iterdir():
                    shutil.move(str(f), tmp / f.name)
            stale = dst.parent / (dst.name + ".data")
            if not external and stale.exists():  # an earlier output's weights must not pose as this one's
                stale.unlink()
            attempts.append({"step": step, "error": ""})
            upgraded = upgrade_opset(dst, MIN_QDQ_OPSET)
            return {"step": step, "attempts": attempts, "external_data": external, "optimize": optimize, **info,
                    **({"opset": upgraded} if upgraded else {})}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    reasons = "; ".join(f"{a['step']}: {a['error']}" for a in attempts)
    raise ModelError(f"cannot prepare {src} for quantization ({reasons})")

