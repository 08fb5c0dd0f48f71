"""bench/isa/avx2_only.sh: the AVX2 figures in the README are only as good as the masking, so check that a
process under it sees an AVX2-only CPU everywhere the project and its kernels look (CPUID for numpy, torch and
onnxruntime; /proc/cpuinfo for the host profile), and that it leaves everything else alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "isa" / "avx2_only.sh"


def _has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _can_mask() -> bool:
    if not (sys.platform.startswith("linux") and _has_avx512() and "cpuid_fault" in Path("/proc/cpuinfo").read_text()
            and shutil.which("cc") and shutil.which("unshare") and os.geteuid() == 0):
        return False
    # root in a container may still lack the right to make a mount namespace
    return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0


pytestmark = pytest.mark.skipif(not _can_mask(), reason="needs an x86 Linux host with AVX-512 and CPUID faulting, a C "
                                "compiler and root that may make a mount namespace")

PROBE = """
import json
from numpy._core._multiarray_umath import __cpu_features__ as f
from devices.host import detect, quant_defaults, channel_multiple
h = detect()
q = quant_defaults(h.arch, h.isa)
print(json.dumps({"numpy_avx512f": f["AVX512F"], "numpy_avx2": f["AVX2"], "isa": h.isa, "cpu": h.model,
                  "reduce_range": q.reduce_range, "multiple": channel_multiple(h.arch, h.isa)}))
"""


def _probe(masked: bool) -> dict:
    import json

    cmd = [sys.executable, "-c", PROBE]
    if masked:
        cmd = ["sh", str(SCRIPT), *cmd]
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[2])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_avx2_only_hides_avx512_vnni_and_amx_from_cpuid_and_cpuinfo():
    plain, masked = _probe(False), _probe(True)
    assert plain["numpy_avx512f"] and "avx512" in plain["isa"] and plain["multiple"] == 16
    assert not masked["numpy_avx512f"] and masked["numpy_avx2"]
    assert masked["isa"] == [f for f in plain["isa"] if f in ("sse4_2", "avx", "avx2", "fma", "f16c")]
    assert masked["reduce_range"] is True and masked["multiple"] == 8
    assert "AVX2 kernels" in masked["cpu"] and "AVX2 kernels" not in plain["cpu"]


def test_onnxruntime_integer_results_are_exact_under_it(tmp_path):
    """Every CPUID goes through the signal handler, and onnxruntime's AVX2 QGEMM path replaces its own: the
    integer result must still be exact (the speed difference is the benchmarks' business)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-64, 63, (64, 32)).astype(np.int8), "w")
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [16, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [16, 32])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    a = rng.integers(0, 255, (16, 64)).astype(np.uint8)
    np.save(tmp_path / "a.npy", a)
    code = ("import numpy as np, onnxruntime as ort, sys; d = sys.argv[1]; "
            "s = ort.InferenceSession(d + '/m.onnx', providers=['CPUExecutionProvider']); "
            "np.save(d + '/y.npy', s.run(None, {'a': np.load(d + '/a.npy')})[0])")
    subprocess.run(["sh", str(SCRIPT), sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    want = a.astype(np.int32) @ numpy_helper.to_array(w).astype(np.int32)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
