"""torch -> ONNX: the dynamo exporter first, the TorchScript exporter where dynamo cannot do the job.

Each candidate export is verified against torch before it is accepted; only a verified model is written,
atomically, with its metadata (source, input specs, opset, parity) inside the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch
from pydantic import Field
from torch import nn

from compress.core import TWO_GB, ModelError, Result, UsageError, atomic_dir, reraise_if_interrupted
from compress.core import first_line as _first_line
from export import metadata, parity

DYNAMO_MIN_OPSET = 18  # the dynamo exporter implements opset 18+; lower requests go to TorchScript
# "quick": TorchScript first, for copies that are only timed: on compress.zoo:shapes_resnet (2-vCPU Xeon) it
# exports in 0.13 s against dynamo's 1.0 s (3.1 s the first time), the same ops but for GlobalAveragePool where
# dynamo writes ReduceMean, and onnxruntime runs the two in 0.378 and 0.390 ms (one thread, interleaved)
EXPORTERS = ("auto", "dynamo", "torchscript", "quick")


class ExportResult(Result):
    """What `compress export` (and compress.export) hands back: the file, the exporter that made it and why the
    others were not used (`attempts`), its inputs and outputs, and its parity with torch."""

    path: Path
    exporter: str
    opset: int
    inputs: list[dict[str, Any]]
    outputs: list[str]
    parity: dict[str, Any]
    size_bytes: int
    external_data: bool
    attempts: list[dict[str, Any]] = Field(default_factory=list)


def flatten_outputs(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Name every tensor in forward()'s result as the exporters flatten it: keys for mappings, indices for sequences."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    items: list[tuple[str, Any]]
    if isinstance(out, Mapping) or hasattr(out, "items") and callable(out.items):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"output_{i}" if not prefix else str(i), v) for i, v in enumerate(out)]
    else:
        return []
    flat = []
    for k, v in items:
        if v is None:
            continue
        flat += flatten_outputs(v, f"{prefix}_{k}" if prefix else k)
    return flat


def run_torch(model: nn.Module, feeds: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    try:
        with torch.no_grad():
            out = model(**feeds)
    except Exception as e:
        raise ModelError(f"forward() failed on the example inputs: {type(e).__name__}: {_first_line(e)}") from e
    flat = flatten_outputs(out)
    if not flat:
        raise ModelError(f"forward() returned {type(out).__name__} with no tensors to export")
    return flat


@contextlib.contextmanager
def silenced(enabled: bool = True, level: int = logging.WARNING) -> Iterator[None]:
    """Exporters (and INC, torchao, torch.export) print progress, warnings and stack dumps: keep them off the
    user's terminal; their failures come back as exceptions. Log records up to `level` are dropped."""
    if not enabled:
        yield
        return
    buf = io.StringIO()
    logging.disable(level)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _export_dynamo(model: nn.Module, feeds: dict[str, torch.Tensor], path: Path, opset: int, out_names: list[str],
                   dynamic_batch: bool, external: bool) -> None:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = {k: {0: batch} if v.dim() else {} for k, v in feeds.items()}
    prog = torch.onnx.export(
        model, (), kwargs=feeds, dynamo=True, opset_version=opset, input_names=list(feeds), output_names=out_names,
        dynamic_shapes=dynamic_shapes, optimize=True, verbose=False, external_data=external,
    )
    if prog is None:
        raise RuntimeError("the dynamo exporter returned nothing")
    prog.save(str(path), external_data=external)


def _export_torchscript(model: nn.Module, feeds: dict[str, torch.Tensor], path: Path, opset: int, out_names: list[str],
                        dynamic_batch: bool, external: bool) -> None:
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {k: {0: "batch"} for k, v in feeds.items() if v.dim()}
        dynamic_axes.update({n: {0: "batch"} for n in out_names})
    torch.onnx.export(
        model, (), str(path), kwargs=feeds, dynamo=False, opset_version=opset, input_names=list(feeds),
        output_names=out_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
    )


_EXPORTERS: dict[str, Callable[..., None]] = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _candidates(exporter: str, opset: int) -> list[str]:
    if exporter not in EXPORTERS:
        raise UsageError(f"exporter {exporter!r}: one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise UsageError(f"the dynamo exporter needs opset {DYNAMO_MIN_OPSET} or newer (asked for {opset})")
    if exporter == "quick":
        return ["torchscript", "dynamo"] if opset >= DYNAMO_MIN_OPSET else ["torchscript"]
    if exporter != "auto":
        return [exporter]
    return ["dynamo", "torchscript"] if opset >= DYNAMO_MIN_OPSET else ["torchscript"]


def _tile_batch(feeds: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) if v.dim() else v for k, v in feeds.items()}


def _to_numpy(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in feeds.items()}


def _onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def export_onnx(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    out_path: str | Path,
    *,
    opset: int = 18,
    dynamic_batch: bool = False,
    exporter: str = "auto",
    extra_cases: list[dict[str, torch.Tensor]] = (),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    source: str = "",
    extra_meta: dict[str, Any] | None = None,
    external_data_threshold: int = TWO_GB,
    quiet: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export, verify against torch, and write `out_path` (plus `<name>.data` for models over the threshold)."""
    out_path = Path(out_path)
    stage = on_stage or (lambda s: None)
    model = model.eval()
    stage("running torch")
    ref = run_torch(model, example)
    out_names = [n for n, _ in ref]
    cases = [(_to_numpy(example), [t.detach().cpu().numpy() for _, t in ref])]
    if dynamic_batch:  # prove the batch axis really is free
        tiled = _tile_batch(example, 2)
        cases.append((_to_numpy(tiled), [t.numpy() for _, t in run_torch(model, tiled)]))
    for extra in extra_cases:
        cases.append((_to_numpy(extra), [t.numpy() for _, t in run_torch(model, extra)]))
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    external = weight_bytes >= external_data_threshold
    trace_feeds = _tile_batch(example, 2) if dynamic_batch and _batch_of(example) == 1 else example

    attempts: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix=".export-", dir=_existing_parent(out_path)) as work:
        for name in _candidates(exporter, opset):
            raw = Path(work) / name / "model.onnx"
            raw.parent.mkdir()
            stage(f"exporting with the {name} exporter")
            try:
                with silenced(quiet):
                    _EXPORTERS[name](model, trace_feeds, raw, opset, out_names, dynamic_batch, external)
                proto = onnx.load(str(raw), load_external_data=True)
            except Exception as e:  # any exporter failure: try the next one, keep the reason
                reraise_if_interrupted(e)  # torch.export wraps Ctrl-C in TorchExportError
                attempts.append({"exporter": name, "error": f"{type(e).__name__}: {_first_line(e)}"})
                continue
            got_opset = _onnx_opset(proto)
            graph_outs = [o.name for o in proto.graph.output]
            if len(graph_outs) != len(out_names):
                attempts.append({"exporter": name, "error": f"graph has {len(graph_outs)} outputs, torch returned {len(out_names)}"})
                continue
            if got_opset != opset:
                attempts.append({"exporter": name, "error": f"produced opset {got_opset}, not the requested {opset}"})
                continue
            stage("checking parity with torch")
            try:
                par = parity.check(raw, cases, out_names, atol=atol, rtol=rtol)
            except Exception as e:
                reraise_if_interrupted(e)
                attempts.append({"exporter": name, "error": f"onnxruntime cannot run it: {_first_line(e)}"})
                continue
            if not par.ok:
                w = par.worst()
                attempts.append({"exporter": name, "error": f"output {w.name!r} differs from torch: max abs err {w.max_abs:.3g}, relative {w.rel:.3g} (tolerance atol {atol:g} or rtol {rtol:g})"})
                continue
            attempts.append({"exporter": name, "error": ""})
            graph_in = {i.name for i in proto.graph.input}
            specs = [s.to_json() for s in metadata.input_specs(example) if s.name in graph_in]
            if dynamic_batch:
                for s in specs:
                    s["dynamic_axes"] = {"0": "batch"}
            meta = {
                "source": source, "exporter": name, "opset": got_opset, "inputs": specs, "outputs": out_names,
                "parity": par.to_json(), "torch_version": torch.__version__, "onnx_version": onnx.__version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(extra_meta or {}),
            }
            metadata.set_metadata(proto, meta)
            stage("writing")
            write_model(proto, out_path, external)
            return ExportResult(
                path=out_path, exporter=name, opset=got_opset, inputs=specs, outputs=out_names, parity=par.to_json(),
                size_bytes=size_with_data(out_path), external_data=external, attempts=attempts,
            )
    reasons = "; ".join(f"{a['exporter']}: {a['error']}" for a in attempts)
    raise ModelError(f"export failed ({reasons})")


def write_model(proto: onnx.ModelProto, out_path: Path, external: bool) -> None:
    """Write an ONNX model atomically, its weights in `<name>.data` when `external` (models over 2 GB)."""
    data_name = out_path.name + ".data"
    with atomic_dir(out_path.parent, last=out_path.name) as tmp:
        target = tmp / out_path.name
        if external:
            onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(target))
    stale = out_path.parent / data_name
    if not external and stale.exists():  # an earlier, larger export's data must not pose as this one's
        stale.unlink()


def size_with_data(path: Path) -> int:
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _batch_of(feeds: dict[str, torch.Tensor]) -> int:
    return next((int(v.shape[0]) for v in feeds.values() if v.dim()), 1)


def _existing_parent(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    return parent

