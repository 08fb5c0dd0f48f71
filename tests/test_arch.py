"""The architecture suite (issue 19, `make test-arch`): every model in bench/arch_list.py — timm's edge families
and ultralytics' YOLO detectors, built from their own code with random weights — through the whole
`compress run --prune 0.3 --quant int8` as a user runs it (the CLI, in its own process), checked for what the run
must deliver on each: a valid report, every variant written and loadable with the model's own outputs (a YOLO
head's boxes and scores at every scale), a real cut, and each block that could not be pruned named with why.

Recovery is off (`--no-recover`: its 60 s budget is a fixed cost that says nothing about the architecture); the
rest is the command's defaults. bench/arch_suite.py --run times the same list with the defaults for the README.

timm, torchvision and ultralytics come from $EDGE_COMPRESS_ARCH_SITE (`make arch-site`). Without it these tests
skip, unless EDGE_COMPRESS_REQUIRE_ARCH is set (CI sets it), when they fail.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from compress.report import check_report

pytestmark = pytest.mark.arch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "bench" / "arch_models.py"
SITE_ENV = "EDGE_COMPRESS_ARCH_SITE"
REQUIRE_ENV = "EDGE_COMPRESS_REQUIRE_ARCH"
MIN_CUT = 0.1  # each model loses at least this share of its parameters at --prune 0.3 (the least, DeiT: 16%)


def _list() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("arch_list", ROOT / "bench" / "arch_list.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.SHAPES


SHAPES = _list()


@pytest.fixture(scope="module")
def site() -> Path:
    path = os.environ.get(SITE_ENV, "")
    if not path or not (Path(path) / "timm").is_dir():
        msg = f"${SITE_ENV} does not name a folder holding timm and ultralytics: run `make test-arch`"
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{msg} ({REQUIRE_ENV} is set, so the architecture suite may not skip)", pytrace=False)
        pytest.skip(msg)
    return Path(path)


def _outputs(path: Path) -> list[tuple[str, list]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [(o.name, o.shape) for o in sess.get_outputs()]


@pytest.mark.parametrize("name", list(SHAPES))
def test_through_compress_run(name, site, tmp_path):
    out, doc = tmp_path / "run", tmp_path / "report.json"
    env = {**os.environ, SITE_ENV: str(site)}
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "run", f"{MODELS}:{name}", "--input-shape", SHAPES[name],
         "--prune", "0.3", "--quant", "int8", "--no-recover", "-o", str(out), "--json", str(doc)],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    stray = {p.name for p in tmp_path.iterdir()} - {"run", "report.json", ".stage-cache"}
    assert not stray, f"written outside the output: {sorted(stray)}"  # the working directory is the user's
    check_run(name, out, json.loads(doc.read_text()))


def check_run(name: str, out: Path, report: dict) -> None:
    """What `compress run` must deliver on every architecture (also applied to bench/arch_suite.py --out)."""
    check_report(report)
    variants = {v["name"]: v for v in report["variants"]}
    assert {"fp32", "pruned", "int8", "int8-unpruned"} <= set(variants)
    assert report["recommended"] in variants

    reference = _outputs(out / variants["fp32"]["onnx"])
    for v in variants.values():  # every variant has the model's own outputs, at their shapes
        assert _outputs(out / v["onnx"]) == reference, v["name"]
        assert v["latency_ms"]["p50"] > 0 and v["speedup_vs_fp32"] > 0
        assert all(math.isfinite(x) for x in v["fidelity"].values() if isinstance(x, float)), v["name"]
    assert variants["pruned"]["params"] <= (1 - MIN_CUT) * variants["fp32"]["params"]
    assert variants["pruned"]["macs"] < variants["fp32"]["macs"]
    parity = variants["pruned"]["parity"]  # the exported pruned model computes what the pruned torch model does
    assert parity and parity["ok"], parity

    structural = report["stages"]["prune"]["structural"]
    notes = " ".join(structural["notes"])
    for block in structural["left_whole"]:  # a block left at full width is named, with why
        assert f"{block} left at full width" in notes
    for stage in ("export", "prune", "quantize", "profile"):
        assert report["stage_seconds"][stage] > 0, stage
    if name.startswith("yolo"):  # boxes (4) and 80 class scores over the three scales' anchors: 40², 20², 10²
        for v in variants.values():
            sess = ort.InferenceSession(str(out / v["onnx"]), providers=["CPUExecutionProvider"])
            x = np.zeros([int(d) for d in SHAPES[name].split(",")], np.float32)
            assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (1, 84, 40 * 40 + 20 * 20 + 10 * 10)
        for stage in ("quantize", "quantize_unpruned"):  # boxes and scores never share one INT8 scale
            joins = report["stages"][stage]["quantizer"].get("float_joins") or []
            assert joins and all(max(j["input_amax"]) > 16 * min(j["input_amax"]) for j in joins), stage
    np.testing.assert_array_less(0, [variants["pruned"]["size_bytes"], variants["int8"]["size_bytes"]])
