"""`compress sweep SWEEP.yaml`: a grid of models x devices x run options, each cell one `compress run` as a Ray Tune
trial (the same trial as `compress search`, with its settings fixed), gathered into one table and one plot.

    models:                       # each: model (as compress run takes it), and its inputs
      - model: compress.zoo:shapes_resnet
        calib: calib.npz          # paths are relative to this file; also an image folder, a text file, hf:...
        data: {image_size: [64, 64]}   # how such a calib becomes inputs (compress run's --image-size etc.)
      - model: compress.zoo:resnet_tiny
        input_shape: ["1,3,32,32"]
    devices: [host, rpi4-cortex-a72]
    grid:                         # every combination is one cell; omitted keys take compress run's defaults
      prune: [0.0, 0.25, 0.5]
      quant: [none, int8]
      importance: [l2]
      method: [minmax]            # INT8 calibration
    tolerance: 0.02               # what "within tolerance" means in each cell's recommendation
    runs: 20                      # timed runs per variant (default: adaptive)

Every cell's folder under OUTDIR/cells/ID is a complete run report; OUTDIR/sweep.md, sweep.json and sweep.png
sum them up, one row per cell with the variant its run recommends.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compress.core import InputError, UsageError, claim_folder, write_json
from compress.data import DataOptions
from compress.models import load_run_model, model_inputs
from compress.pipeline import RunOptions
from compress.quantization import format_info
from compress.tuning.results import SWEEP_SCHEMA, SweepSummary
from compress.tuning.space import can_time, label, normalise
from compress.tuning.study import collect, staged_data
from compress.tuning.sweep_report import write_sweep_readable
from compress.tuning.trials import TrialProgress, fit_on_ray, run_cell
from devices import load_profile, parse_yaml, read_text

EXPERIMENT = "sweep"
# What a sweep writes in its -o folder (listed in the folder's manifest before Ray starts).
OWNED = ("ray", "cells", "data", "sweep.json", "sweep.md", "sweep.png")
GRID_KEYS = ("prune", "importance", "quant", "method", "fallback")


class SweepModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    name: Optional[str] = None
    weights: Optional[str] = None
    input_shape: list[str] = Field(default_factory=list)
    calib: Optional[str] = None
    data: DataOptions = Field(default_factory=DataOptions)  # how a calib that is not an .npz becomes inputs


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[SweepModel] = Field(min_length=1)
    devices: list[str] = Field(default_factory=lambda: ["host"], min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    tolerance: float = Field(default=0.01, ge=0.0, lt=1.0)
    runs: Optional[int] = Field(default=None, ge=1)
    max_calib: Optional[int] = Field(default=None, ge=1)

    @field_validator("grid")
    @classmethod
    def _known_keys(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        unknown = sorted(set(grid) - set(GRID_KEYS))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; the grid takes {', '.join(GRID_KEYS)}")
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise ValueError(f"{empty[0]!r} lists no values")
        return grid


def load_sweep(path: str | Path) -> SweepFile:
    """SWEEP.yaml through safe_load and the schema; one-line errors naming the file and the field. Relative paths
    in it are made absolute against the file's folder, so trials find them from any working directory."""
    p = Path(path)
    data = parse_yaml(read_text(p, str(path), "sweep file"), str(path), "sweep file")
    try:
        sweep = SweepFile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "top level"
        raise InputError(f"{path}: field {where!r}: {err.get('msg', 'invalid')}"
                         + (f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else "")) from None
    base = p.resolve().parent

    def here(v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        q = Path(v).expanduser()
        return str(q if q.is_absolute() else base / q)

    for m in sweep.models:
        m.weights, m.calib = here(m.weights), here(m.calib)
        if ".py:" in m.model and not Path(m.model.split(":")[0]).is_absolute():
            file, _, fn = m.model.rpartition(":")
            m.model = f"{base / file}:{fn}"
        if bool(m.input_shape) == bool(m.calib):
            raise InputError(f"{path}: model {m.model}: give either input_shape or calib (exactly one)")
    sweep.devices = [here(d) if d.lower().endswith((".yaml", ".yml")) or "/" in d else d for d in sweep.devices]  # type: ignore[misc]
    return sweep


def cells(sweep: SweepFile) -> list[dict[str, Any]]:
    """Every combination, as trial configs: run options at the top, the model and device under "cell"."""
    keys = [k for k in GRID_KEYS if k in sweep.grid]
    out = []
    for m, dev, values in itertools.product(sweep.models, sweep.devices, itertools.product(*(sweep.grid[k] for k in keys))):
        c: dict[str, Any] = {"prune": 0.0, "quant": RunOptions.default("quant"), **dict(zip(keys, values))}
        c["prune"] = float(c["prune"] or 0.0)
        c["cell"] = {"model": m.model, "name": m.name or m.model, "weights": m.weights, "calib": m.calib,
                     "input_shapes": list(m.input_shape), "device": dev, "tolerance": sweep.tolerance}
        out.append(c)
    return out


def run_sweep(path: str, outdir: str, address: Optional[str] = None, concurrency: int = 1, resume: bool = False,
              command: str = "", on_stage: Callable[[str], None] = lambda m: None,
              on_trial: Callable[[int], None] = lambda n: None) -> SweepSummary:
    from ray import tune

    sweep = load_sweep(path)
    out = Path(outdir).resolve()
    state = out / "ray" / EXPERIMENT
    if state.exists() and not resume:
        raise UsageError(f"-o {outdir} holds an earlier sweep: pass --resume to continue it, or choose another folder")
    if resume and not state.exists():
        raise UsageError(f"--resume: -o {outdir} holds no sweep to continue")
    profiles = {d: load_profile(d) for d in sweep.devices}  # an unknown device fails here, before Ray starts
    for c in cells(sweep):
        quant, device = c.get("quant", "none"), c["cell"]["device"]
        if quant != "none" and not can_time(profiles[device], quant):
            raise UsageError(f"{path}: quant {quant} on device {device!r}, which has no "
                             f"{format_info(quant).needs.upper()} hardware to time it on")
    job = {"outdir": str(out), "trials_dir": "cells", "runs": sweep.runs, "max_calib": sweep.max_calib, "seed": 0,
           "tolerance": sweep.tolerance, "min_fidelity": None}
    with staged_data(out) as stage:  # each model's calib that is not an .npz, read once for all its cells
        for m in sweep.models:
            if m.calib and not m.calib.lower().endswith(".npz"):
                inputs = model_inputs(load_run_model(m.model, m.weights), m.input_shape)
                m.calib = stage.read(m.calib, inputs, m.data, max_samples=sweep.max_calib)
        claim_folder(out, OWNED)
        for m in sweep.models:
            m.calib = stage.keep(m.calib)
    grid = cells(sweep)
    t0 = time.monotonic()

    def make_tuner() -> Any:
        trainable = tune.with_resources(tune.with_parameters(run_cell, job=job), {"cpu": 1})
        if resume:
            return tune.Tuner.restore(str(state), trainable=trainable, resume_unfinished=True, resume_errored=False)
        return tune.Tuner(trainable, param_space={"cfg": tune.grid_search(grid)},
                          tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
                          run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out / "ray"), verbose=0,
                                                    failure_config=tune.FailureConfig(max_failures=0),
                                                    callbacks=[TrialProgress(on_trial)]))

    result, cluster = fit_on_ray(address, list(profiles.values()), out / "cells", make_tuner,
                                 f"sweeping {len(grid)} cells", on_stage)
    records = collect(result, lambda cfg: normalise(cfg.get("cfg", cfg)), lambda cfg: label(cfg))
    rows = [_row(r) for r in records]
    summary = {"schema": SWEEP_SCHEMA, "sweep": str(path), "command": command, "ray": cluster,
               "seconds": round(time.monotonic() - t0, 1), "tolerance": sweep.tolerance, "cells": rows}

    result = SweepSummary.from_json(summary)  # checked before it is written
    write_json(out / "sweep.json", result.to_json())
    write_sweep_readable(summary, out)
    return result


def _row(r: dict[str, Any]) -> dict[str, Any]:
    """One table row: the cell, its status, and the variant its run recommends with that variant's figures."""
    cell = r["config"].get("cell", {})
    row = {"id": r["id"], "model": cell.get("name"), "device": cell.get("device"), "settings": r["label"],
           "status": r["status"], "error": r.get("error"), "report": r.get("report"), "recommended": None}
    if r["status"] == "done":
        rep = json.loads(Path(r["report"]).read_text())
        v = next(v for v in rep["variants"] if v["name"] == rep["recommended"])
        final = rep["variants"][-1]
        row.update({"recommended": rep["recommended"], "reason": rep["reason"],
                    "p50_ms": (v.get("latency_ms") or {}).get("p50"), "speedup_vs_fp32": v.get("speedup_vs_fp32"),
                    "fidelity": v.get("fidelity"), "size_bytes": v.get("size_bytes"),
                    "final": {"name": final["name"], "p50_ms": (final.get("latency_ms") or {}).get("p50"),
                              "speedup_vs_fp32": final.get("speedup_vs_fp32"), "fidelity": final.get("fidelity"),
                              "within_tolerance": final.get("within_tolerance")}})
    return row
