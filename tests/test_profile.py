"""Profiling: the device-side runner's JSON contract, the host-side profiler's checks, and `compress profile`.

Models are built here with onnx.helper (no torch). Timing values are only checked for order and sign:
how fast things run belongs in the benchmarks, not in tests on a shared machine.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.core.errors import DeviceError, InputError, UsageError
from devices.schema import DeviceProfile
from runtime import profiler

RUNNER = Path(profiler.__file__).with_name("runner.py")
FAST = {"runs": 5, "warmup": 1}


# ---------------------------------------------------------------------------------------------- models


def _save(graph: onnx.GraphProto, path: Path, meta: dict | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "edge_compress", json.dumps(meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _matmul_graph() -> onnx.GraphProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32), "W")
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "mm_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [w],
    )


@pytest.fixture()
def mm_model(tmp_path: Path) -> Path:
    """MatMul + Relu with a symbolic batch dimension."""
    return _save(_matmul_graph(), tmp_path / "mm.onnx")


@pytest.fixture()
def two_input_model(tmp_path: Path) -> Path:
    """A float input and an int64 index input (Gather from an embedding table), both with symbolic dims."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
            helper.make_node("Add", ["emb", "x"], ["y"], name="add"),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [table],
    )
    return _save(graph, tmp_path / "two.onnx")


def _device(*eps: str, cpu_fallback: bool = True, threads: int = 1) -> DeviceProfile:
    return DeviceProfile(
        name="testdev", description="test device", arch="x86_64", cores=2, threads=threads,
        execution_providers=[{"name": e} for e in eps], cpu_fallback=cpu_fallback,
    )


def _run_runner(model: Path, config: dict, *extra: str) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, str(RUNNER), str(model), "--config", "-", *extra],
                          input=json.dumps(config), capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must be one JSON document, got: {proc.stdout!r}"
    return proc.returncode, json.loads(lines[0]), proc.stderr


# ---------------------------------------------------------------------------------------------- runner

RESULT_KEYS = {
    "schema", "model", "model_size_bytes", "providers", "requested_providers", "threads", "graph_optimization_level",
    "session_config", "runs", "warmup", "latency_ms", "spread", "throughput_per_s", "load_ms", "peak_rss_mb", "inputs", "outputs",
    "onnxruntime_version", "available_providers", "platform", "hotspots",
}


def _check_stats(doc: dict) -> None:
    lat = doc["latency_ms"]
    assert set(lat) >= {"p50", "p90", "p99", "mean", "std", "min", "max"}
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"] and lat["std"] >= 0
    sp = doc["spread"]
    assert set(sp) >= {"iqr_ms", "p50_ci_ms", "p50_ci_rel", "cv", "converged", "drift_rel", "other_cpu_frac"}
    lo, hi = sp["p50_ci_ms"]
    assert lat["min"] <= lo <= lat["p50"] <= hi <= lat["max"]
    assert sp["iqr_ms"] >= 0 and sp["p50_ci_rel"] >= 0 and (sp["drift_rel"] is None or sp["drift_rel"] >= 0) and isinstance(sp["converged"], bool)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_runner_peak_rss_is_its_own_not_its_parents(mm_model: Path) -> None:
    """ru_maxrss survives exec: a runner started by a big process read that process's size (1859 MB for
    MiniLM's runners under compress run). The figure must be the runner's own."""
    ballast = np.ones(600 * 1024 * 1024 // 8)  # 600 MB held by this (parent) process while it runs
    ballast += 1
    rc, doc, _ = _run_runner(mm_model, {"runs": 5, "warmup": 1, "threads": 1})
    assert rc == 0, doc
    assert 0 < doc["peak_rss_mb"] < 400, doc["peak_rss_mb"]
    del ballast


def test_runner_schema_fixed_runs(mm_model: Path) -> None:
    rc, doc, stderr = _run_runner(mm_model, {"runs": 12, "warmup": 2, "threads": 1})
    assert rc == 0, doc
    assert RESULT_KEYS <= set(doc)
    assert doc["schema"] == "edge-compress/profile/1"
    assert doc["runs"] == 12 and doc["warmup"] == 2
    _check_stats(doc)
    assert doc["providers"] == ["CPUExecutionProvider"] == doc["requested_providers"]
    assert doc["inputs"] == [{"name": "x", "shape": [1, 32], "dtype": "float32"}]  # symbolic batch -> 1
    assert doc["outputs"] == ["y"]
    assert doc["model_size_bytes"] == mm_model.stat().st_size
    assert doc["throughput_per_s"] > 0 and doc["load_ms"] > 0 and doc["peak_rss_mb"] > 0
    assert set(doc["platform"]) >= {"machine", "system", "python", "processor"}
    assert doc["hotspots"] is None
    phases = [json.loads(ln)["phase"] for ln in stderr.splitlines() if ln.startswith('{"progress"')]
    assert "warmup" in phases and phases[-1] == "timing"


def test_runner_applies_session_config(mm_model: Path) -> None:
    rc, doc, _ = _run_runner(mm_model, {"runs": 3, "warmup": 0, "session_config": {"session.intra_op.allow_spinning": "0"}})
    assert rc == 0 and doc["session_config"] == {"session.intra_op.allow_spinning": "0"}
    rc, doc, _ = _run_runner(mm_model, {"runs": 3, "session_config": ["not", "a", "mapping"]})
    assert rc == 1 and doc["error"]["kind"] == "config"


def test_runner_adaptive_stops_and_reports_spread(mm_model: Path) -> None:
    rc, doc, _ = _run_runner(mm_model, {"runs": None, "warmup": 1, "min_runs": 20, "min_seconds": 0.1,
                                        "target_ci": 0.5, "max_seconds": 3})
    assert rc == 0, doc
    assert doc["runs"] >= 20
    assert doc["spread"]["adaptive"] is True
    _check_stats(doc)
    if doc["spread"]["converged"]:
        assert doc["spread"]["p50_ci_rel"] <= 0.5


def test_runner_adaptive_time_budget_ends_an_unreachable_target(mm_model: Path) -> None:
    rc, doc, _ = _run_runner(mm_model, {"warmup": 0, "min_runs": 10**6, "max_seconds": 0.3})
    assert rc == 0, doc
    assert doc["spread"]["converged"] is False and 1 <= doc["runs"] < 10**6


def test_runner_hotspots_list_matmul(mm_model: Path) -> None:
    rc, doc, _ = _run_runner(mm_model, {"runs": 5, "warmup": 1, "hotspots": True, "hotspot_runs": 3,
                                        "graph_optimization_level": "disable"})
    assert rc == 0, doc
    ops = {row["op_type"] for row in doc["hotspots"]["by_op_type"]}
    assert "MatMul" in ops
    assert any(n["name"] == "mm" and n["op_type"] == "MatMul" for n in doc["hotspots"]["top_nodes"])
    assert abs(sum(r["pct"] for r in doc["hotspots"]["by_op_type"]) - 100) < 1e-6


def test_runner_input_specs_and_int_ranges(two_input_model: Path) -> None:
    cfg = {**FAST, "inputs": {"x": {"shape": [3, 7, 4]}, "ids": {"shape": [3, 7], "low": 0, "high": 9}}}
    rc, doc, _ = _run_runner(two_input_model, cfg)
    assert rc == 0, doc
    shapes = {i["name"]: (i["shape"], i["dtype"]) for i in doc["inputs"]}
    assert shapes == {"x": ([3, 7, 4], "float32"), "ids": ([3, 7], "int64")}


def test_runner_out_of_range_ids_is_a_runtime_error(two_input_model: Path) -> None:
    rc, doc, _ = _run_runner(two_input_model, {**FAST, "inputs": {"ids": {"low": 50, "high": 60}}})
    assert rc == 1 and doc["error"]["kind"] == "runtime" and "\n" not in doc["error"]["message"]


def test_runner_npz_feeds(two_input_model: Path, tmp_path: Path) -> None:
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.zeros((5, 2, 4), np.float32), ids=np.ones((5, 2), np.int64))
    rc, doc, _ = _run_runner(two_input_model, {**FAST, "inputs_npz": str(npz)})
    assert rc == 0, doc
    assert {i["name"]: i["shape"] for i in doc["inputs"]} == {"x": [1, 2, 4], "ids": [1, 2]}


@pytest.mark.parametrize("config, kind", [
    ({"runs": 0}, "config"),
    ({"warmup": -1}, "config"),
    ({"graph_optimization_level": "max"}, "config"),
    ({"bogus_key": 1}, "config"),
    ({"inputs": {"x": {"shape": [2, 31]}}}, "config"),  # contradicts the fixed dim 32
    ({"providers": [["TensorrtExecutionProvider", {}]]}, "device"),
])
def test_runner_errors_are_one_json_document(mm_model: Path, config: dict, kind: str) -> None:
    rc, doc, stderr = _run_runner(mm_model, config)
    assert rc == 1
    assert doc["schema"] == "edge-compress/profile/1"
    assert doc["error"]["kind"] == kind
    assert "\n" not in doc["error"]["message"] and "Traceback" not in stderr


def test_runner_bad_model_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00junk" * 10)
    rc, doc, stderr = _run_runner(bad, FAST)
    assert rc == 1 and doc["error"]["kind"] == "model" and "Traceback" not in stderr


def test_runner_counts_external_data(tmp_path: Path) -> None:
    model = helper.make_model(_matmul_graph(), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    rc, doc, _ = _run_runner(path, FAST)
    assert rc == 0, doc
    assert doc["model_size_bytes"] == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size


def test_runner_is_python38_and_imports_only_allowed_modules() -> None:
    src = RUNNER.read_text()
    tree = ast.parse(src, feature_version=(3, 8))
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime"}
    guarded: set[int] = set()  # ids of import nodes inside `try: ... except ImportError`
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the runner travels alone: no relative imports"
            mods = [node.module.split(".")[0]]
        else:
            continue
        for mod in mods:
            if mod == "onnx":
                assert id(node) in guarded, "onnx is optional on devices: import it inside try/except ImportError"
            else:
                assert mod in allowed, f"runner.py imports {mod}, which a bare device may not have"


def test_median_ci_and_drift_statistics() -> None:
    from runtime import runner

    vals = sorted(float(i) for i in range(1, 101))
    lo, hi = runner.median_ci(vals)
    assert (lo, hi) == (40.0, 61.0)  # the textbook ranks for n = 100 (binomial: x(40), x(61))
    assert runner.drift_rel([1.0] * 400) == 0.0
    assert runner.drift_rel([1.0] * 200 + [2.0] * 200) >= 0.3  # the machine halved its speed mid-run
    assert runner.drift_rel([1.0] * 10) is None  # too few runs to split into blocks


def test_parse_trace_skips_the_first_run() -> None:
    from runtime import runner

    def node(name: str, op: str, ts: int, dur: int) -> dict:
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        node("a", "MatMul", 1, 90), node("b", "Relu", 95, 5),  # first run: allocation, skipped
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 20},
        node("a", "MatMul", 201, 15), node("b", "Relu", 216, 5), node("b", "Relu", 216, 0),
    ]
    h = runner.parse_trace(events)
    assert h["runs"] == 1
    assert [r["op_type"] for r in h["by_op_type"]] == ["MatMul", "Relu"]
    assert h["by_op_type"][0]["ms"] == pytest.approx(0.015) and h["by_op_type"][0]["pct"] == pytest.approx(75.0)
    assert h["top_nodes"][0] == {"name": "a", "op_type": "MatMul", "ms": pytest.approx(0.015), "pct": pytest.approx(75.0)}


# -------------------------------------------------------------------------------------------- profiler


def test_profile_model_result(mm_model: Path) -> None:
    seen: list[tuple] = []
    r = profiler.profile_model(mm_model, _device("cpu"), **FAST, on_progress=lambda *a: seen.append(a)).to_json()
    assert r["runs"] == 5 and r["fallback"] is False and r["missing_providers"] == []
    assert r["device"] == {"name": "testdev", "arch": "x86_64", "source": None}
    assert "host" in r
    _check_stats(r)
    assert seen and seen[-1][2] == "timing" and seen[-1][0] == 5


def test_onnxruntime_ops_in_the_onnx_domain_are_left_to_onnxruntime(tmp_path: Path) -> None:
    """onnxruntime registers SimplifiedLayerNormalization in the ONNX domain (onnxruntime-genai's models use it);
    onnx's checker does not know it, and the profile used to refuse such a model as 'not a valid ONNX model'.
    A model onnx cannot parse is still refused before any runner starts."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    scale = numpy_helper.from_array(np.ones(64, np.float32), "scale")
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y"], axis=-1, epsilon=1e-6)
    model = helper.make_model(helper.make_graph([node], "rms", [x], [y], [scale]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "rms.onnx"
    onnx.save(model, str(path))
    assert profiler.profile_model(path, _device("cpu"), **FAST).runs == 5
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="is not a valid ONNX model"):
        profiler.profile_model(tmp_path / "junk.onnx", _device("cpu"), **FAST)


def test_profile_model_honours_metadata_input_specs(tmp_path: Path) -> None:
    meta = {"schema": "edge-compress/onnx/1", "inputs": [{"name": "x", "shape": [4, 32], "dtype": "float32", "low": -1.0, "high": 1.0}]}
    path = _save(_matmul_graph(), tmp_path / "meta.onnx", meta)
    r = profiler.profile_model(path, _device("cpu"), **FAST).to_json()
    assert r["inputs"][0]["shape"] == [4, 32]
    # an explicit spec wins over the metadata
    r = profiler.profile_model(path, _device("cpu"), **FAST, inputs={"x": {"shape": [2, 32]}}).to_json()
    assert r["inputs"][0]["shape"] == [2, 32]


def test_metadata_shape_the_graph_contradicts_is_dropped(tmp_path: Path) -> None:
    meta = {"inputs": [{"name": "x", "shape": [4, 99]}, {"name": "gone", "shape": [1]}]}
    path = _save(_matmul_graph(), tmp_path / "stale.onnx", meta)
    r = profiler.profile_model(path, _device("cpu"), **FAST).to_json()
    assert r["inputs"][0]["shape"] == [1, 32]


def test_missing_model_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        profiler.profile_model(tmp_path / "nope.onnx", _device("cpu"), **FAST)


def test_junk_model_is_input_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not protobuf \xff\xfe\x00\x01" * 8)
    with pytest.raises(InputError, match="is not a valid ONNX model") as exc:
        profiler.profile_model(junk, _device("cpu"), **FAST)
    assert "\n" not in str(exc.value)


def test_truncated_model_is_input_error(mm_model: Path) -> None:
    data = mm_model.read_bytes()
    mm_model.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="is not a valid ONNX model"):
        profiler.profile_model(mm_model, _device("cpu"), **FAST)


def test_missing_ep_without_fallback_is_device_error(mm_model: Path) -> None:
    with pytest.raises(DeviceError) as exc:
        profiler.profile_model(mm_model, _device("tensorrt", "cpu", cpu_fallback=False), **FAST)
    msg = str(exc.value)
    assert "TensorrtExecutionProvider" in msg and "onnxruntime-gpu" in msg and "CPUExecutionProvider" in msg


def test_missing_ep_with_fallback_runs_on_cpu(mm_model: Path, capsys: pytest.CaptureFixture) -> None:
    r = profiler.profile_model(mm_model, _device("tensorrt", cpu_fallback=True), **FAST).to_json()
    assert r["fallback"] is True
    assert r["missing_providers"] == ["TensorrtExecutionProvider"]
    assert r["providers"] == ["CPUExecutionProvider"]
    err = capsys.readouterr().err
    assert "TensorrtExecutionProvider" in err and "not the device's" in err


def test_runner_error_document_maps_to_edge_error(mm_model: Path) -> None:
    with pytest.raises(UsageError, match="does not fit"):
        profiler.profile_model(mm_model, _device("cpu"), **FAST, inputs={"x": {"shape": [1, 5]}})


def test_runner_crash_is_runtime_failure(mm_model: Path, tmp_path: Path) -> None:
    from compress.core.errors import RuntimeFailure

    crasher = tmp_path / "python"
    crasher.write_text("#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")
    crasher.chmod(0o755)
    with pytest.raises(RuntimeFailure, match="status 139.*Segmentation fault"):
        profiler.run_runner(mm_model, {"runs": 1}, python=str(crasher))


# ------------------------------------------------------------------------------------------------- CLI


def _cli():
    pytest.importorskip("devices.loader")
    from compress.cli import cli

    return cli


DEVICE_YAML = """\
name: tiny-test
description: a test device
arch: x86_64
cores: 2
threads: 1
execution_providers:
  - name: cpu
"""


def test_cli_profile_writes_json(mm_model: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    cli = _cli()
    dev = tmp_path / "dev.yaml"
    dev.write_text(DEVICE_YAML)
    out = tmp_path / "out.json"
    res = CliRunner().invoke(cli, ["profile", str(mm_model), "--device", str(dev), "--runs", "5", "--warmup", "1",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["runs"] == 5 and doc["device"]["name"] == "tiny-test"
    assert "p50" in res.output


def test_cli_profile_json_stdout(mm_model: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    cli = _cli()
    dev = tmp_path / "dev.yaml"
    dev.write_text(DEVICE_YAML)
    res = CliRunner().invoke(cli, ["profile", str(mm_model), "--device", str(dev), "--runs", "5", "--warmup", "0",
                                   "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["runs"] == 5


def test_cli_profile_default_device_is_host(mm_model: Path) -> None:
    from click.testing import CliRunner

    cli = _cli()
    res = CliRunner().invoke(cli, ["profile", str(mm_model), "--runs", "5", "--warmup", "0", "--threads", "1", "--json", "-"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["device"]["name"] == "host" and doc["fallback"] is False
    # the host's pool takes every core, so workers must not spin (see devices.host.session_defaults)
    assert doc["session_config"] == {"session.intra_op.allow_spinning": "0"}


def test_cli_profile_missing_model_exits_1(tmp_path: Path) -> None:
    from click.testing import CliRunner

    cli = _cli()
    res = CliRunner().invoke(cli, ["profile", str(tmp_path / "nope.onnx"), "--runs", "5"])
    assert res.exit_code == 1 and isinstance(res.exception, InputError)


@pytest.mark.parametrize("args", [["--runs", "0"], ["--warmup", "-1"], ["--threads", "0"]])
def test_cli_profile_rejects_bad_counts(mm_model: Path, args: list[str]) -> None:
    from click.testing import CliRunner

    cli = _cli()
    res = CliRunner().invoke(cli, ["profile", str(mm_model), *args])
    assert res.exit_code == 2
