"""The device-side runner on aarch64 Linux, under qemu user-mode emulation (`make test-arm64`).

tools/arm64_sysroot.py builds (once, then cached) an arm64 Debian Python with PyPI's aarch64 onnxruntime and
numpy wheels, pinned to this venv's versions, and a wrapper that runs it under `qemu-aarch64-static`. These
tests run runtime/runner.py there and check that it works and returns its schema, and that the aarch64 build
of onnxruntime computes what the x86 one does.

Latency under emulation is hundreds of times slower than any board and means nothing about one: the figures
are only checked for sign and shape here, never compared, printed or stored as device figures.

Without qemu-aarch64-static these tests skip, unless EDGE_COMPRESS_REQUIRE_ARM64 is set (CI sets it), when
they fail; a sysroot that cannot be built (no access to Debian's archive or PyPI) always fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.schema import DeviceProfile
from runtime import profiler

pytestmark = pytest.mark.arm64

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "arm64_sysroot.py"
RUNNER = ROOT / "runtime" / "runner.py"
SCHEMA = "edge-compress/profile/1"
QEMU = "qemu-aarch64-static"
REQUIRE_ENV = "EDGE_COMPRESS_REQUIRE_ARM64"
CONFIG = {"providers": [["CPUExecutionProvider", {}]], "runs": 3, "warmup": 1, "threads": 1}
EMULATED = DeviceProfile(  # named for what it is: no shipped device profile is attached to emulated figures
    name="qemu-aarch64-emulated", description="aarch64 under qemu user-mode emulation (not a device)",
    arch="arm64", cores=1, threads=1, execution_providers=[{"name": "cpu"}], cpu_fallback=False,
)

# Runs one model on the emulated side and prints its outputs as JSON (the runner returns timings only).
OUTPUTS_SCRIPT = """
import json, platform, sys
import numpy as np
import onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.log_severity_level = 3
sess = ort.InferenceSession(sys.argv[1], sess_options=so, providers=["CPUExecutionProvider"])
data = np.load(sys.argv[2])
outs = sess.run(None, {k: data[k] for k in data.files})
print(json.dumps({"machine": platform.machine(), "providers": sess.get_providers(),
                  "outputs": {o.name: v.tolist() for o, v in zip(sess.get_outputs(), outs)}}))
"""


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


@pytest.fixture(scope="module")
def aarch64() -> dict[str, Any]:
    """The emulated Python: build or reuse the cached sysroot, or skip/fail with what to do about it."""
    if shutil.which(QEMU) is None:
        msg = f"{QEMU} not found: install it with `apt-get install -y qemu-user-static`"
        if _required():
            pytest.fail(f"{msg} ({REQUIRE_ENV} is set, so the aarch64 runner test may not skip)", pytrace=False)
        pytest.skip(msg)
    proc = subprocess.run([sys.executable, str(TOOL), "--json"], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"cannot build the aarch64 sysroot (tools/arm64_sysroot.py exited {proc.returncode}; it needs "
                    f"Debian's arm64 archive and PyPI on first use):\n{proc.stderr.strip()[-3000:]}", pytrace=False)
    info = json.loads(proc.stdout)
    assert Path(info["wrapper"]).is_file()
    return info


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("arm64") / "resnet_tiny.onnx"
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "export", "compress.zoo:resnet_tiny",
                           "--input-shape", "1,3,32,32", "-o", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return out


def _emulated(aarch64: dict[str, Any], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([aarch64["wrapper"], *args], input=stdin, capture_output=True, text=True, timeout=600)


def _one_document(stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must be exactly one JSON document, got: {stdout!r}"
    doc = json.loads(lines[0])
    assert isinstance(doc, dict) and doc.get("schema") == SCHEMA
    return doc


def _check_emulated_result(doc: dict[str, Any], runs: int) -> None:
    """Schema and provenance only; latency values are emulation artefacts and checked for sign alone."""
    assert "error" not in doc, doc.get("error")
    assert doc["platform"]["machine"] == "aarch64"
    assert doc["platform"]["system"] == "Linux"
    assert "emulation" in (doc["platform"]["processor"] or "")  # the result says it came from qemu
    assert "CPUExecutionProvider" in doc["providers"]
    assert "CPUExecutionProvider" in doc["available_providers"]
    assert doc["runs"] == runs and doc["warmup"] == 1 and doc["threads"] == 1
    lat = doc["latency_ms"]
    assert set(lat) >= {"p50", "p90", "p99", "mean", "min", "max"}
    assert all(isinstance(v, (int, float)) and v > 0 for v in lat.values() if v is not None)
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert doc["load_ms"] > 0 and doc["model_size_bytes"] > 0
    assert doc["inputs"] == [{"name": doc["inputs"][0]["name"], "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert len(doc["outputs"]) == 1


def test_tool_pins_the_venv_versions(aarch64: dict[str, Any]) -> None:
    import onnxruntime

    assert aarch64["onnxruntime"] == onnxruntime.__version__
    assert aarch64["numpy"] == np.__version__
    assert "CPUExecutionProvider" in (aarch64["providers"] or [])


def test_runner_on_aarch64_config_file(aarch64: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:
    """The runner as a device runs it: `python runner.py MODEL --config FILE`, one JSON document on stdout."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(CONFIG))
    proc = _emulated(aarch64, str(RUNNER), str(tiny_model), "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_emulated_result(_one_document(proc.stdout), runs=3)
    progress = [json.loads(ln) for ln in proc.stderr.splitlines() if ln.startswith('{"progress"')]
    assert progress and progress[-1]["phase"] == "timing" and progress[-1]["progress"] == 3


def test_profile_model_drives_the_aarch64_runner(aarch64: dict[str, Any], tiny_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The host side unchanged (config built by profile_model, sent on stdin, progress and result parsed), with
    the aarch64 Python in place of the host's."""
    real = profiler.run_runner

    def via_qemu(model: Any, config: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        kwargs["python"] = aarch64["wrapper"]
        return real(model, config, *args, **kwargs)

    monkeypatch.setattr(profiler, "run_runner", via_qemu)
    seen: list[tuple[int, int | None, str]] = []
    doc = profiler.profile_model(tiny_model, EMULATED, runs=3, warmup=1, threads=1,
                                 on_progress=lambda done, total, phase: seen.append((done, total, phase))).to_json()
    assert doc["schema"] == SCHEMA
    _check_emulated_result(doc, runs=3)
    assert doc["device"]["name"] == "qemu-aarch64-emulated"
    assert doc["fallback"] is False and doc["missing_providers"] == []
    assert seen and seen[-1] == (3, 3, "timing")


def test_runner_error_document_on_aarch64(aarch64: dict[str, Any], tmp_path: Path) -> None:
    proc = _emulated(aarch64, str(RUNNER), str(tmp_path / "missing.onnx"), "--config", "-", stdin=json.dumps(CONFIG))
    assert proc.returncode == 1
    doc = _one_document(proc.stdout)
    assert doc["error"]["kind"] == "model" and "not found" in doc["error"]["message"]


def test_aarch64_outputs_match_x86(aarch64: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(tiny_model), sess_options=so, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, **{inp.name: x})
    expected = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {inp.name: x})))

    script = tmp_path / "outputs.py"
    script.write_text(OUTPUTS_SCRIPT)
    proc = _emulated(aarch64, str(script), str(tiny_model), str(feeds))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["machine"] == "aarch64" and got["providers"] == ["CPUExecutionProvider"]
    assert set(got["outputs"]) == set(expected)
    for name, want in expected.items():
        arm = np.asarray(got["outputs"][name], dtype=np.float32)
        assert arm.shape == want.shape
        assert np.abs(want).max() > 0  # a model that outputs zeros would agree with anything
        np.testing.assert_allclose(arm, want, rtol=0, atol=1e-4, err_msg=f"output {name!r}: aarch64 vs x86 onnxruntime")
