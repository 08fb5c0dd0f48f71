"""The Python API as the README shows it: its "From Python" block run as it stands, and the API's contract
(typed results whose JSON is the CLI's, the project's errors with the CLI's one line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import compress
from compress.core import InputError, UsageError

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block() -> str:
    text = README.read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_block_runs_as_it_stands(tmp_path, monkeypatch, capsys, matmul_onnx):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_block(), "README.md", "exec"), scope)  # noqa: S102 - our own README
    report = scope["report"]
    assert report.recommended in {v.name for v in report.variants} and (tmp_path / "out/tiny/report.json").is_file()
    assert [v.name for v in report.variants] == ["fp32", "int8"]
    assert report.variants[1].speedup_vs_fp32 > 0
    printed = capsys.readouterr().out
    assert report.recommended in printed
    good = matmul_onnx(tmp_path / "good.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    rows = scope["profile_all"]([str(good), str(tmp_path / "broken.onnx")])
    assert rows[str(good)].startswith("p50 ") and "peak RSS" in rows[str(good)]
    assert rows[str(tmp_path / "broken.onnx")].startswith("skipped: ")


def test_results_are_typed_and_their_json_is_the_clis(tmp_path, matmul_onnx):
    r = compress.profile(matmul_onnx(tmp_path / "m.onnx"), runs=10, input_shape=["x=4,64"])
    doc = r.to_json()
    assert doc["schema"] == "edge-compress/profile/1" and doc["runs"] == 10
    assert r.latency_ms.p50 == doc["latency_ms"]["p50"] > 0


def test_bad_options_raise_the_projects_errors(tmp_path):
    with pytest.raises(UsageError, match="--tolerance 2"):
        compress.run("compress.zoo:resnet_tiny", input_shape="1,3,32,32", tolerance=2, output=tmp_path / "o")
    with pytest.raises(UsageError, match="--prune"):
        compress.run("compress.zoo:resnet_tiny", input_shape="1,3,32,32", prune="lots", output=tmp_path / "o")
    with pytest.raises(InputError):
        compress.profile(tmp_path / "missing.onnx")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["profile", "compare"])
def test_profiling_and_comparing_never_import_torch(tmp_path, matmul_onnx, command):
    """What a CI runner that only profiles runs must not need torch (issue 20's light install): profile and
    compare, through the CLI, import neither torch nor anything that pulls it in."""
    import subprocess
    import sys

    model = matmul_onnx(tmp_path / "m.onnx")
    out = tmp_path / "p.json"
    argv = (["profile", str(model), "--runs", "5", "--input-shape", "x=4,64", "--max-p50-ms", "1000", "--json", str(out)]
            if command == "profile" else ["compare", str(out), str(out)])
    if command == "compare":
        assert subprocess.run([sys.executable, "-m", "compress.cli", "profile", str(model), "--runs", "5", "--json",
                               str(out)], capture_output=True).returncode == 0
    code = ("import sys; from compress.cli.main import main\nsys.argv = ['compress'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'ray', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_export_from_python_writes_a_verified_model(tmp_path):
    r = compress.export("compress.zoo:resnet_tiny", input_shape="1,3,32,32", output=tmp_path / "tiny.onnx")
    assert r.path == tmp_path / "tiny.onnx" and r.path.is_file() and r.parity["ok"]
    assert r.to_json()["opset"] == 18
    with pytest.raises(UsageError):
        compress.export("compress.zoo:resnet_tiny", output=tmp_path / "none.onnx")  # no --input-shape nor --calib
    assert not (tmp_path / "none.onnx").exists()
