"""`compress report`: Markdown and PNG from a real `compress run` report.json, validation, and the CLI's errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from compress.errors import InputError
from compress.report_md import render_markdown, validate_report
from compress.report_plot import plot_tradeoff

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One real run (~10 s): fp32, pruned (no recovery: outside tolerance) and simulated fp8 of the pruned model."""
    out = tmp_path_factory.mktemp("run") / "out"
    r = subprocess.run([sys.executable, "-m", "compress.cli", "run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32",
                        "--device", "host", "--prune", "0.5", "--no-recover", "--quant", "fp8", "--simulate", "--runs", "5",
                        "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture()
def rep(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def _rows(md: str) -> dict[str, list[str]]:
    """The variants table: variant name (first word of the first cell, unbolded) -> its cells."""
    section = md.split("## Variants", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].split()[0].strip("*")] = cells
    return rows


def _report_cli(capsys, monkeypatch, *args):
    """`compress report ...` through compress.cli.main, as the installed command runs it (exit codes, one-line errors)."""
    from compress.cli import cli, main
    from compress.cli_report import report

    monkeypatch.delenv("EDGE_COMPRESS_DEBUG", raising=False)
    if "report" not in cli.commands:  # until compress/cli.py registers it itself
        cli.add_command(report)
    with pytest.raises(SystemExit) as e:
        main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    return e.value.code, out, err


# --- Markdown ---------------------------------------------------------------------------------------------


def test_markdown_recommendation_and_variant_rows(rep):
    md = render_markdown(rep)
    head = md.split("## Variants")[0]
    assert f"**Recommended: `{rep['recommended']}`** — {rep['reason']}" in head  # the answer comes first
    assert "**Device:** `host`" in head and f"**Measured on:** {rep['host']['cpu']}" in head
    rows = _rows(md)
    assert list(rows) == ["fp32", "pruned", "fp8"]
    for v in rep["variants"]:
        cells = rows[v["name"]]
        assert cells[4] == f"{v['size_bytes'] / 1e6:.2f}"
        assert cells[5] == f"{v['params'] / 1e3:.1f}K" and cells[6] == f"{v['macs'] / 1e3:.1f}K"  # resnet_tiny: thousands
        if v["latency_ms"]:
            p50 = v["latency_ms"]["p50"]
            assert cells[1] == (f"{p50:.3f}" if p50 < 1 else f"{p50:.2f}")
            assert cells[3].startswith(f"{v['speedup_vs_fp32']:.2f}×")
        if v["name"] != "fp32":
            assert cells[7] == f"top-1 {v['fidelity']['top1_agreement']:.1%}"
            assert cells[8].startswith("✓" if v["within_tolerance"] else "✗")
    assert rows[rep["recommended"]][0].startswith(f"**{rep['recommended']}** ★")
    assert rows["fp32"][3] == "1.00× (baseline)"
    fp8 = rows["fp8"]
    assert "*(simulated)*" in fp8[0] and "(from pruned)" in fp8[0]
    assert fp8[1] == fp8[3] == "— (simulated)" and "fidelity only" in fp8[8]


def test_markdown_sections(rep):
    md = render_markdown(rep, plot="tradeoff.png")
    assert "![speedup vs fidelity](tradeoff.png)" in md
    excluded = rep["variants"][2]["excluded_layers"]
    if excluded:
        assert "## Layers kept in float" in md
        assert f"`{excluded[0]['node']}`" in md and excluded[0]["why"] in md
    assert "### Prune" in md and "none (`--no-recover`)" in md and "50% of channels" in md
    assert "### Quantize" in md and "FP8" in md and "**simulated**" in md
    assert rep["speedup_measure"] in md and "## How the speedup was measured" in md
    assert f"```sh\n{rep['command']}\n```" in md
    assert "random inputs" in md  # no --calib: the reader is told fidelity came from random data


def _mutations(obj, path=()):
    """Every (path, value) below obj, to null or drop one at a time."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path + (k,)
            yield from _mutations(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _mutations(v, path + (i,))


def _apply(rep, path, how):
    r = copy.deepcopy(rep)
    node = r
    for k in path[:-1]:
        node = node[k]
    if how == "drop" and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = None
    return r


def test_markdown_never_crashes_on_missing_or_null_fields(rep):
    rep = copy.deepcopy(rep)
    rep["device"] = {"name": "host", "threads": 2}  # keep the walk short; the full device is covered above
    rep["host"] = {"cpu": "x"}
    paths = [p for p in _mutations(rep) if p[0] != "schema"]
    assert len(paths) > 100
    for p in paths:
        for how in ("null", "drop"):
            r = _apply(rep, p, how)
            assert r.get("schema") and render_markdown(r).startswith("# edge-compress report")


@pytest.mark.parametrize("variants", [[], [{"name": "fp32"}], [{}], [{"name": "fp32", "latency_ms": None, "fidelity": None,
                                                                     "speedup_vs_fp32": None, "size_bytes": None}]])
def test_markdown_minimal_reports(variants):
    md = render_markdown({"schema": "edge-compress/report/1", "variants": variants, "stages": {"prune": {}, "quantize": {}}})
    assert md.startswith("# edge-compress report") and md.endswith("\n")
    if variants:
        assert "n/a" in md


def test_markdown_fp32_only_recommendation():
    md = render_markdown({"schema": "edge-compress/report/1", "recommended": "fp32", "reason": "only fp32 was built",
                          "tolerance": 0.01, "variants": [{"name": "fp32", "latency_ms": {"p50": 12.3456}, "speedup_vs_fp32": 1.0,
                                                           "size_bytes": 46_800_000, "params": 11_689_512, "macs": 1_818_558_976,
                                                           "within_tolerance": True, "simulated": False}]})
    assert "**Recommended: `fp32`** — only fp32 was built" in md
    cells = _rows(md)["fp32"]
    assert cells[1:7] == ["12.35", "n/a", "1.00× (baseline)", "46.8", "11.69M", "1.82G"]
    assert "## Stages" not in md and "## Command" not in md


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("obj,text", [
    ([1, 2], "expected a JSON object"),
    ({"variants": []}, 'no "schema" field'),
    ({"schema": "something/else", "variants": []}, "not an edge-compress report"),
    ({"schema": "edge-compress/report/9", "variants": []}, "not supported"),
    ({"schema": "edge-compress/report/1"}, '"variants"'),
    ({"schema": "edge-compress/report/1", "variants": {"fp32": {}}}, '"variants"'),
    ({"schema": "edge-compress/report/1", "variants": ["fp32"]}, "variants[0]"),
])
def test_validate_report_rejects(obj, text):
    with pytest.raises(InputError) as e:
        validate_report(obj)
    assert text in str(e.value) and "\n" not in str(e.value)


def test_validate_report_accepts_a_real_report(rep):
    validate_report(rep)


# --- plot -------------------------------------------------------------------------------------------------


def _assert_png_alone(folder, name):
    f = folder / name
    assert f.read_bytes()[:8] == PNG_MAGIC and f.stat().st_size > 1000
    assert sorted(p.name for p in folder.iterdir()) == [name]  # no temp files left behind


def test_plot_is_a_png_and_atomic(rep, tmp_path):
    target = tmp_path / "plots" / "tradeoff.png"
    assert plot_tradeoff(rep, target) == target
    _assert_png_alone(tmp_path / "plots", "tradeoff.png")


def test_plot_with_null_or_missing_variant_fields(rep, tmp_path):
    keys = ("name", "speedup_vs_fp32", "fidelity", "within_tolerance", "simulated", "latency_ms")
    for how in ("null", "drop"):
        r = copy.deepcopy(rep)
        for v in r["variants"][1:]:
            for k in keys:
                if how == "null":
                    v[k] = None
                else:
                    v.pop(k, None)
        r["tolerance"] = r["recommended"] = None
        plot_tradeoff(r, tmp_path / f"{how}.png")
        assert (tmp_path / f"{how}.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_odd_reports(rep, tmp_path):
    timed_only = copy.deepcopy(rep)
    timed_only["variants"] = timed_only["variants"][:2]  # no simulated variant: one panel
    plot_tradeoff(timed_only, tmp_path / "a.png")
    bare = {"schema": "edge-compress/report/1", "variants": [{"name": "fp32", "speedup_vs_fp32": None, "fidelity": None}]}
    plot_tradeoff(bare, tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_failed_plot_leaves_the_old_png(rep, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    target = tmp_path / "t.png"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        plot_tradeoff(rep, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["t.png"]


# --- the command ------------------------------------------------------------------------------------------


def test_cli_prints_markdown_for_a_run_folder(run_dir, capsys, monkeypatch):
    rc, out, err = _report_cli(capsys, monkeypatch, run_dir)
    assert rc == 0, err
    assert out.startswith("# edge-compress report") and "## Variants" in out and "*(simulated)*" in out


def test_cli_writes_markdown_and_plot(run_dir, tmp_path, capsys, monkeypatch):
    out_md, png = tmp_path / "pr" / "report.md", tmp_path / "pr" / "img" / "tradeoff.png"
    rc, out, err = _report_cli(capsys, monkeypatch, run_dir / "report.json", "-o", out_md, "--plot", png)
    assert rc == 0, err
    assert out == ""
    md = out_md.read_text()
    assert md == render_markdown(json.loads((run_dir / "report.json").read_text()), plot="img/tradeoff.png")
    _assert_png_alone(tmp_path / "pr" / "img", "tradeoff.png")
    assert sorted(p.name for p in (tmp_path / "pr").iterdir()) == ["img", "report.md"]


def test_cli_json_format_reemits_the_report(run_dir, tmp_path, capsys, monkeypatch):
    rc, out, _ = _report_cli(capsys, monkeypatch, run_dir, "--format", "json")
    assert rc == 0 and json.loads(out) == json.loads((run_dir / "report.json").read_text())
    rc, out, _ = _report_cli(capsys, monkeypatch, run_dir, "--format", "json", "-o", tmp_path / "r.json")
    assert rc == 0 and out == "" and json.loads((tmp_path / "r.json").read_text())["schema"] == "edge-compress/report/1"


@pytest.mark.parametrize("content,text", [
    ('{"name": "not a report"}', 'no "schema" field'),
    ('{"schema": "edge-compress/report/1"}', '"variants"'),
    ("[1,", "not valid JSON"),
    (b"\xff\xfe\x00binary", "not a JSON file"),
])
def test_cli_bad_input_is_one_line_exit_1(tmp_path, capsys, monkeypatch, content, text):
    f = tmp_path / "x.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, out, err = _report_cli(capsys, monkeypatch, f)
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and text in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_paths(tmp_path, capsys, monkeypatch):
    rc, _, err = _report_cli(capsys, monkeypatch, tmp_path / "nope")
    assert rc == 1 and "no such file or folder" in err and err.count("\n") == 1 and "Traceback" not in err
    rc, _, err = _report_cli(capsys, monkeypatch, tmp_path)  # a folder, but not a run's
    assert rc == 1 and "no report.json" in err and "Traceback" not in err


def test_cli_usage_errors(run_dir, tmp_path, capsys, monkeypatch):
    rc, _, err = _report_cli(capsys, monkeypatch, run_dir, "--plot", tmp_path / "t.svg")
    assert rc == 2 and ".png" in err
    rc, _, err = _report_cli(capsys, monkeypatch, run_dir, "-o", run_dir / "report.json")
    assert rc == 2 and "also an input" in err
    assert json.loads((run_dir / "report.json").read_text())["schema"]  # untouched
    rc, _, err = _report_cli(capsys, monkeypatch, run_dir, "-o", tmp_path / "a.png", "--plot", tmp_path / "a.png")
    assert rc == 2 and "same file" in err
    rc, _, err = _report_cli(capsys, monkeypatch, run_dir, "--format", "xml")
    assert rc == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_help_has_examples(capsys, monkeypatch):
    rc, out, _ = _report_cli(capsys, monkeypatch, "--help")
    assert rc == 0 and "Examples:" in out and "compress report out/\n" in out
