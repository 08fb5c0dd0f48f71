"""Calibration data is streamed, not loaded whole (issue 7): memory-mapped .npz members, compressed ones read no
further than --max-calib, one-line InputErrors naming the file for anything damaged, and --max-calib on every
command that takes --calib."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from compress.core.errors import InputError
from compress.models.inputs import load_calib
from compress.quantization.calib import CalibReader

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, timeout=600)


def _relu_model(name: str = "x", dims: tuple = (None, 2)) -> onnx.ModelProto:
    """A one-op graph: CalibReader only reads its inputs."""
    shape = [d if d is not None else "n" for d in dims]
    graph = helper.make_graph([helper.make_node("Relu", [name], ["y"])], "g",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ------------------------------------------------------------------------------------------------ memory


MEASURE = """
import json, resource, sys
import numpy as np
from compress.models.inputs import load_calib
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = load_calib(sys.argv[1], max_samples=4)
first = {k: np.array(v) for k, v in data.items()}
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
np.savez(sys.argv[2], **first)
print(json.dumps({"growth_kb": after - before}))
"""


def test_large_stored_npz_costs_only_the_rows_read(tmp_path):
    rows = 26_000
    big = tmp_path / "big.npz"
    np.savez(big, x=np.arange(rows * 1024, dtype=np.int32).reshape(rows, 1024), y=np.arange(rows, dtype=np.float32))
    assert big.stat().st_size > 100e6
    r = subprocess.run([sys.executable, "-c", MEASURE, str(big), str(tmp_path / "first.npz")], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    growth_mb = json.loads(r.stdout)["growth_kb"] / 1024  # ru_maxrss is the peak: a whole read would show
    assert growth_mb < 20, f"peak memory grew {growth_mb:.0f} MB loading 4 rows of a {big.stat().st_size / 1e6:.0f} MB file"
    with np.load(tmp_path / "first.npz") as first:
        assert np.array_equal(first["x"], np.arange(4 * 1024, dtype=np.int32).reshape(4, 1024))
        assert np.array_equal(first["y"], np.arange(4, dtype=np.float32))


def test_compressed_member_is_read_no_further_than_the_cap(tmp_path):
    """Damage the end of a compressed member: the first rows still read, the whole array does not."""
    x = np.random.default_rng(0).standard_normal((1000, 256)).astype(np.float32)
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=x)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("x.npy")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = np.frombuffer(bytes(raw[info.header_offset + 26:info.header_offset + 30]), "<u2")
    end = info.header_offset + 30 + int(name_len) + int(extra_len) + info.compress_size
    raw[end - 2000:end - 1000] = bytes(1000)
    path.write_bytes(bytes(raw))
    assert np.array_equal(load_calib(path, max_samples=4)["x"], x[:4])
    with pytest.raises(InputError, match="c.npz: cannot read array 'x'"):
        load_calib(path)


# ------------------------------------------------------------------------------------------------ equality


ARRAYS = {
    "f32": np.random.default_rng(1).standard_normal((10, 3, 4)).astype(np.float32),
    "fortran": np.asfortranarray(np.random.default_rng(2).integers(-50, 50, (10, 5, 3)).astype(np.int64)),
    "big_endian": np.arange(10, dtype=">f8"),
    "f16": np.linspace(0, 1, 20, dtype=np.float16).reshape(10, 2),
    "bool": np.random.default_rng(3).random((10, 7)) > 0.5,
    "u8": np.arange(40, dtype=np.uint8).reshape(10, 4),
    "empty_rows": np.zeros((10, 0), np.float32),
}


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["savez", "savez_compressed"])
@pytest.mark.parametrize("cap", [None, 1, 4, 10, 1000])
def test_lazy_arrays_equal_np_load(tmp_path, save, cap):
    path = tmp_path / "a.npz"
    save(path, **ARRAYS)
    got = load_calib(path, max_samples=cap)
    with np.load(path) as ref:
        assert list(got) == list(ref.files)
        for k in ref.files:
            want = ref[k][:cap] if cap else ref[k]
            assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
            assert np.array_equal(got[k], want), k
            assert np.array_equal(np.ascontiguousarray(got[k][1:3]), want[1:3]), k


def test_calib_reader_reads_only_graph_inputs_lazily(tmp_path):
    path = tmp_path / "calib.npz"
    x = np.random.default_rng(0).standard_normal((40, 2)).astype(np.float32)
    np.savez(path, x=x, labels=np.array(["a"] * 3))  # a non-numeric array that is not a graph input is ignored
    reader = CalibReader(_relu_model(), path, max_samples=5)
    assert reader.count == 5 and reader.ignored == ["labels"]
    assert np.array_equal(np.concatenate([f["x"] for f in reader.feeds()]), x[:5])


def test_errors_about_loaded_arrays_name_the_file(tmp_path):
    arrays = {"image": np.zeros((4, 3, 16, 32), np.float32)}
    model = _relu_model("image", (1, 3, 32, 32))
    with pytest.raises(InputError, match=r"^calib\.npz: array 'image' has 16 on axis 2"):
        CalibReader(model, arrays, label="calib.npz")
    with pytest.raises(InputError, match=r"^calibration arrays: array 'image'"):
        CalibReader(model, arrays)


# ------------------------------------------------------------------------------------------------ property


_DTYPES = ["float32", "float64", "float16", "int8", "int64", "uint8", "bool", "complex64", "object", "U3", ">f4",
           "datetime64[s]"]


@st.composite
def _npz_files(draw):
    """Bytes of an .npz: random keys, dtypes, shapes (0-d too) and sample counts, maybe damaged, or no zip."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    n = draw(st.integers(0, 4))
    arrays = {}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["x", "y", "a/b", "", "x.npy"]) | st.text("abcxyz_.-", max_size=5))
        dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        if draw(st.booleans()):
            shape = (n, 2)  # what the Relu model takes
        if dtype.kind == "O":
            arr = np.empty(shape, dtype)
            arr[...] = {"pickled": True}
        else:
            arr = np.zeros(shape, dtype)
        arrays[key] = np.asfortranarray(arr) if draw(st.booleans()) else arr
    import io

    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **arrays)
    raw = bytearray(buf.getvalue())
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip" and raw:
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=_npz_files(), cap=st.none() | st.integers(1, 5))
def test_damaged_or_odd_npz_raises_input_error_only(tmp_path, content, cap):
    path = tmp_path / "calib.npz"
    path.write_bytes(content)
    try:
        data = load_calib(path, max_samples=cap)
    except InputError as e:
        assert "\n" not in str(e) and "calib.npz" in str(e)
    else:
        for v in data.values():
            assert v.dtype.kind in "fiub" and v.ndim >= 1
            np.ascontiguousarray(v[:2]).tobytes()  # readable, not just described
    try:
        reader = CalibReader(_relu_model(), path, max_samples=cap)
    except InputError as e:
        assert "\n" not in str(e) and "calib.npz" in str(e)
    else:
        assert all(f["x"].shape == (1, 2) for f in reader.feeds())


# ------------------------------------------------------------------------------------------------ CLI


def _conv_model(path: Path) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.random.default_rng(0).standard_normal(108).tolist())
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("content,text", [
    ("shape", "array 'image' has 4 on axis 2"),
    ("junk", "not a readable .npz"),
    ("pickle", "must be numeric"),
])
def test_quantize_bad_calib_is_one_line_naming_the_file(tmp_path, content, text):
    model = _conv_model(tmp_path / "m.onnx")
    bad = tmp_path / "bad.npz"
    if content == "shape":
        np.savez(bad, image=np.zeros((12, 3, 4, 8), np.float32))
    elif content == "junk":
        bad.write_bytes(np.random.default_rng(0).bytes(500))
    else:
        np.savez(bad, image=np.array([{"a": 1}] * 12, dtype=object))
    r = _cli("quantize", str(model), "--calib", str(bad), "--no-measure", "-o", str(tmp_path / "q.onnx"))
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad.npz" in lines[0] and text in lines[0], r.stderr
    assert not (tmp_path / "q.onnx").exists()


@pytest.fixture(scope="module")
def calib64(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib64.npz"
    np.savez(path, image=np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32))
    return path


def test_prune_max_calib(tmp_path, calib64):
    r = _cli("prune", "compress.zoo:resnet_tiny", "--calib", str(calib64), "--max-calib", "8", "--ratio", "0.25",
             "--no-recover", "--no-measure", "--json", "-", "-o", str(tmp_path / "p.onnx"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["calibration"] == {"source": str(calib64), "samples": 8, "train_samples": 6, "held_out": True}


def test_run_max_calib_reaches_prune_inputs_and_quantization(tmp_path, calib64):
    r = _cli("run", "compress.zoo:resnet_tiny", "--calib", str(calib64), "--max-calib", "8", "--quant", "int8",
             "--no-op-select", "--runs", "3", "--json", "-", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["calibration"]["samples"] == 8
    assert rep["stages"]["quantize"]["calibration"] == {"source": str(calib64), "samples": 8, "calibration_samples": 6,
                                                       "held_out": True}
