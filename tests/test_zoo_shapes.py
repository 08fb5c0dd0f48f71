"""The trained shapes model and its procedural data: deterministic data, real accuracy, data CLI, export."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compress.zoo import shapes_resnet
from compress.zoo.shapes import CALIB_SEED, EVAL_SEED, NUM_CLASSES, WEIGHTS, main, make_shapes


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def eval_set():
    return make_shapes(512, EVAL_SEED)


def test_dataset_is_deterministic_balanced_and_normalised():
    x1, y1 = make_shapes(200, seed=7)
    x2, y2 = make_shapes(200, seed=7)
    x3, y3 = make_shapes(200, seed=8)
    assert x1.shape == (200, 3, 64, 64) and x1.dtype == np.float32
    assert y1.shape == (200,) and y1.dtype == np.int64
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3) and not np.array_equal(y1, y3)
    assert np.bincount(y1, minlength=NUM_CLASSES).tolist() == [20] * NUM_CLASSES
    assert np.isfinite(x1).all()
    # ImageNet-normalised: [0, 1] pixels map to roughly [-2.1, 2.7]
    assert -2.2 < x1.min() < -1.5 and 2.0 < x1.max() < 2.7
    assert make_shapes(0, seed=0)[0].shape == (0, 3, 64, 64)
    assert make_shapes(10, seed=0, size=32)[0].shape == (10, 3, 32, 32)


def test_shipped_model_is_trained(eval_set):
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 3_000_000
    model = shapes_resnet()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    x, y = eval_set
    with torch.inference_mode():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    acc = float((pred == y).mean())
    assert acc >= 0.95, f"top-1 {acc:.3f} on the held-out set"
    # every class is learned, not just most of them
    per_class = [float((pred[y == c] == c).mean()) for c in range(NUM_CLASSES)]
    assert min(per_class) >= 0.8, per_class


def test_data_cli_writes_calib_and_eval(tmp_path):
    calib, ev = tmp_path / "sub" / "calib.npz", tmp_path / "eval.npz"
    proc = _cli("-m", "compress.zoo.shapes", "data", "--calib", str(calib), "--eval", str(ev), "--n-calib", "32",
                "--n-eval", "64")
    assert proc.returncode == 0, proc.stderr
    with np.load(calib, allow_pickle=False) as c:
        assert c.files == ["image"]
        assert c["image"].shape == (32, 3, 64, 64) and c["image"].dtype == np.float32
        np.testing.assert_array_equal(c["image"], make_shapes(32, CALIB_SEED)[0])
    with np.load(ev, allow_pickle=False) as e:
        assert sorted(e.files) == ["image", "y"]
        assert e["image"].shape == (64, 3, 64, 64) and e["image"].dtype == np.float32
        assert e["y"].shape == (64,) and e["y"].dtype == np.int64
        x, y = make_shapes(64, EVAL_SEED)  # drawn with the held-out seed, not the calibration one
        np.testing.assert_array_equal(e["image"], x)
        np.testing.assert_array_equal(e["y"], y)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp files left behind
    with pytest.raises(SystemExit) as exc:  # neither output given: a usage error
        main(["data"])
    assert exc.value.code == 2


def test_export_cli_and_onnx_accuracy(tmp_path, eval_set):
    out = tmp_path / "shapes.onnx"
    proc = _cli("-m", "compress.cli", "export", "compress.zoo:shapes_resnet", "--input-shape", "1,3,64,64", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    x, y = eval_set
    pred = np.array([sess.run(None, {"image": x[i:i + 1]})[0].argmax() for i in range(128)])
    assert (pred == y[:128]).mean() >= 0.9
