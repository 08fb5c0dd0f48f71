"""The Python API as the README shows it: its "From Python" block run as it stands, and the API's contract
(typed results whose JSON is the CLI's, the project's errors with the CLI's one line)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import compress
from compress.core import InputError, UsageError

README = Path(__file__).resolve().parents[1] / "README.md"
sys.path.insert(0, str(README.parent / "tools"))
import write_schemas  # noqa: E402


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
    pruned, q = scope["pruned"], scope["q"]
    assert pruned.structural["macs_after"] < pruned.structural["macs_before"]
    assert (tmp_path / "tiny.pruned.onnx").is_file() and (tmp_path / "tiny.pruned.int8.onnx").is_file()
    assert q.format == "int8" and 0.9 < q.fidelity.cosine_min <= 1.0 and q.speedup_vs_fp32 > 0
    assert "quantizing" in scope["steps"] and "pruned: " in printed and "steps heard" in printed
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
    _valid(r.to_json(), "export")
    with pytest.raises(UsageError):
        compress.export("compress.zoo:resnet_tiny", output=tmp_path / "none.onnx")  # no --input-shape nor --calib
    assert not (tmp_path / "none.onnx").exists()


def _valid(doc: dict, name: str) -> None:
    """`doc` against the schema shipped for NAME, as a CI user would check it."""
    import json

    import jsonschema

    shipped = next(d for d in write_schemas.DOCS if d.name == name).path
    jsonschema.validate(doc, json.loads(shipped.read_text()))


def test_quantize_and_formats_from_python_return_the_clis_documents(tmp_path, matmul_onnx):
    """compress.quantize / compress.formats: typed results whose JSON is valid against the shipped schema (what
    `--json` prints), the CLI's defaults, and bad options refused before anything is written."""
    from compress.report import FormatAdvice, QuantResult

    model = matmul_onnx(tmp_path / "m.onnx")
    q = compress.quantize(model, to="int8", no_measure=True, output=tmp_path / "m.int8.onnx")
    assert isinstance(q, QuantResult) and q.format == "int8" and q.device == "host"
    assert q.onnx == str(tmp_path / "m.int8.onnx") and (tmp_path / "m.int8.onnx").is_file()
    assert q.latency is None and q.fidelity.cosine_min > 0.99  # no_measure=True: nothing timed
    _valid(q.to_json(), "quantize")
    a = compress.formats(model, "x86-avx512-vnni", max_layers=1, output=tmp_path / "f.md")
    assert isinstance(a, FormatAdvice) and a.recommendation["format"] in a.formats + ["fp32"]
    assert a.markdown == str(tmp_path / "f.md") and (tmp_path / "f.md").read_text().startswith("#")
    _valid(a.to_json(), "formats")
    with pytest.raises(UsageError, match="--tolerance 2"):
        compress.formats(model, "host", tolerance=2)
    with pytest.raises(UsageError):
        compress.quantize(model, to="int4", avg_bits=2, output=tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_prune_from_python_returns_the_clis_document(tmp_path):
    from compress.report import PruneReport

    heard: list[str] = []
    p = compress.prune("compress.zoo:resnet_tiny", input_shape="1,3,32,32", ratio=0.5, no_recover=True,
                       no_measure=True, output=tmp_path / "p.onnx", on_stage=heard.append)
    assert isinstance(p, PruneReport) and p.device == "host" and p.measured is None and p.recovery is None
    assert p.structural["macs_ratio"] > 1.1 and p.structural["params_after"] < p.structural["params_before"] and p.onnx.path == str(tmp_path / "p.onnx") and p.onnx.parity["ok"]
    assert heard[:2] == ["loading model", "preparing inputs"] and "exporting" in heard
    _valid(p.to_json(), "prune")
    with pytest.raises(UsageError):
        compress.prune("compress.zoo:resnet_tiny", input_shape="1,3,32,32", ratio=1.5, output=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_every_command_has_its_function() -> None:
    """The API is the CLI's: each command that builds or measures something is a function of `compress`, with the
    command's options as keyword arguments (click's parameter names, --eval/--metric and --input-shape aside)."""
    import inspect

    from compress.cli.main import cli

    renamed = {"eval_spec": "eval", "metric_spec": "metric", "input_shapes": "input_shape", "quants": "quant",
               "prune_ratio": "prune", "remote_target": "remote"}
    budgets = {"max_p50_ms", "max_p99_ms", "max_peak_rss_mb", "min_speedup", "max_accuracy_drop"}  # exit codes
    for name in ("export", "prune", "quantize", "formats", "profile", "run", "search", "sweep", "compare"):
        fn = getattr(compress, name)
        accepted = set(inspect.signature(fn).parameters)
        cli_only = {"json_out", "config"} | (budgets if name in ("profile", "run") else set())
        wanted = {renamed.get(p.name, p.name) for p in cli.commands[name].params} - cli_only
        assert wanted <= accepted, (name, sorted(wanted - accepted))
        assert fn.__doc__ and ">>> import compress" in fn.__doc__, name


def test_compare_from_python(tmp_path, matmul_onnx):
    import json

    from compress.report import Comparison

    doc = compress.profile(matmul_onnx(tmp_path / "m.onnx"), runs=10, input_shape="x=4,64").to_json()
    (tmp_path / "a.json").write_text(json.dumps(doc))
    c = compress.compare(tmp_path / "a.json", tmp_path / "a.json", max_regression="5%")
    assert isinstance(c, Comparison) and c.kind == "profile" and c.max_regression == 0.05
    assert c.regressions() == [] and {f.figure for f in c.figures} >= {"p50"}
    _valid(c.to_json(), "compare")
    with pytest.raises(UsageError, match="--max-regression lots"):
        compress.compare(tmp_path / "a.json", tmp_path / "a.json", max_regression="lots")
    with pytest.raises(InputError):
        compress.compare(tmp_path / "a.json", tmp_path / "missing.json")
