"""Numerical parity of an exported ONNX model against torch on the same inputs.

An export that loads but computes something else is worse than a failed one: it is checked every time,
and the figures travel with the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.core import sessions


@dataclass
class OutputParity:
    name: str
    max_abs: float
    rel: float  # max_abs / max |reference|
    mean_abs: float
    ok: bool


@dataclass
class Parity:
    atol: float
    rtol: float
    outputs: list[OutputParity] = field(default_factory=list)
    cases: int = 0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.rel for o in self.outputs), default=0.0)

    def worst(self) -> OutputParity | None:
        return max(self.outputs, key=lambda o: (not o.ok, o.rel), default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "atol": self.atol, "rtol": self.rtol, "cases": self.cases,
            "max_abs_err": self.max_abs, "max_rel_err": self.max_rel,
            "outputs": [vars(o) for o in self.outputs],
        }


def compare(reference: list[np.ndarray], actual: list[np.ndarray], names: list[str], atol: float, rtol: float) -> list[OutputParity]:
    """Per output: an output passes if its max abs error is within atol, or within rtol of its largest value."""
    res = []
    for name, ref, act in zip(names, reference, actual):
        if ref.shape != act.shape:
            res.append(OutputParity(name, float("inf"), float("inf"), float("inf"), False))
            continue
        if ref.dtype.kind in "iub":
            err = float(np.count_nonzero(ref != act))
            res.append(OutputParity(name, err, err / max(ref.size, 1), err / max(ref.size, 1), err == 0))
            continue
        r, a = ref.astype(np.float64), act.astype(np.float64)
        # NaN/Inf must sit where torch has them (a -inf where torch has -inf is exact); the error is over the rest,
        # so that a model which itself gives log(0) is exported faithfully and judged later for its outputs.
        fin_r, fin_a = np.isfinite(r), np.isfinite(a)
        same_nonfinite = bool(np.array_equal(fin_r, fin_a) and np.array_equal(np.isnan(r), np.isnan(a))
                              and np.array_equal(r[np.isinf(r)], a[np.isinf(a)]))
        if not same_nonfinite:
            res.append(OutputParity(name, float("inf"), float("inf"), float("inf"), False))
            continue
        diff = np.abs(r[fin_r] - a[fin_r])
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(r[fin_r]).max()) if diff.size else 0.0
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        res.append(OutputParity(name, max_abs, rel, float(diff.mean()) if diff.size else 0.0, max_abs <= atol or rel <= rtol))
    return res


def merge(runs: list[list[OutputParity]]) -> list[OutputParity]:
    """Worst case per output over several input cases."""
    merged: dict[str, OutputParity] = {}
    for run in runs:
        for o in run:
            m = merged.get(o.name)
            if m is None:
                merged[o.name] = OutputParity(o.name, o.max_abs, o.rel, o.mean_abs, o.ok)
            else:
                merged[o.name] = OutputParity(o.name, max(m.max_abs, o.max_abs), max(m.rel, o.rel), max(m.mean_abs, o.mean_abs), m.ok and o.ok)
    return list(merged.values())


def check(onnx_path: str | Path, cases: list[tuple[dict[str, np.ndarray], list[np.ndarray]]], output_names: list[str],
          atol: float = 1e-4, rtol: float = 1e-3) -> Parity:
    """Run the ONNX file on CPU for each (feeds, torch outputs) case and compare."""
    sess = sessions.session(onnx_path)
    graph_inputs = {i.name for i in sess.get_inputs()}
    runs = []
    for feeds, ref in cases:
        # The exporter drops inputs the graph does not use (an all-ones mask folded away, say).
        feeds = {k: v for k, v in feeds.items() if k in graph_inputs}
        out = sess.run(None, feeds)
        runs.append(compare(ref, out, output_names, atol, rtol))
    return Parity(atol, rtol, merge(runs), len(cases))
