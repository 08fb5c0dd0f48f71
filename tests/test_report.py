"""`compress report`: Markdown, HTML and PNG from a real `compress run` report.json, validation, and the CLI's errors."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys

import pytest

from compress.core.errors import InputError
from compress.report.html import render_html, write_html
from compress.report.markdown import render_markdown, validate_report
from compress.report.plot import build_figure, pareto_front, plot_tradeoff, render_png, tradeoff_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One real run (~10 s): fp32, pruned (no recovery: outside tolerance) and simulated fp8 of the pruned model."""
    out = tmp_path_factory.mktemp("run") / "out"
    r = subprocess.run([sys.executable, "-m", "compress.cli", "run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32",
                        "--device", "host", "--prune", "0.5", "--no-recover", "--no-backoff", "--quant", "fp8", "--simulate", "--runs", "5",
                        "-o", str(out)], capture_output=True, text=True, timeout=600,
                       # a module fixture is set up before the per-test cache: its own, never ~/.cache's results
                       env={**os.environ, "EDGE_COMPRESS_CACHE": str(out.parent / "cache")})
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture()
def rep(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def _rows(md: str) -> dict[str, dict[str, str]]:
    """The variants table: variant name (first word of the first cell, unbolded) -> its cells by column header
    (the header's first two words: "within tolerance (0.01)" is "within tolerance")."""
    section = md.split("## Variants", 1)[1].split("\n## ", 1)[0]
    rows, header = {}, []
    for line in section.splitlines():
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("| variant"):
            header = [" ".join(c.split()[:2]) for c in cells]
        else:
            rows[cells[0].split()[0].strip("*")] = dict(zip(header, cells))
    return rows


def _report_cli(capsys, monkeypatch, *args):
    """`compress report ...` through compress.cli.main, as the installed command runs it (exit codes, one-line errors)."""
    from compress.cli import cli, main
    from compress.cli.report import report

    monkeypatch.delenv("EDGE_COMPRESS_DEBUG", raising=False)
    if "report" not in cli.commands:  # until compress/cli/main.py registers it itself
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
    chosen = rep["threads_tuning"]["chosen"] if rep.get("threads_tuning") else {}
    for v in rep["variants"]:
        cells = rows[v["name"]]
        assert cells["size MB"] == f"{v['size_bytes'] / 1e6:.2f}"
        assert cells["params"] == f"{v['params'] / 1e3:.1f}K" and cells["MACs"] == f"{v['macs'] / 1e3:.1f}K"  # thousands
        if v["latency_ms"]:
            p50 = v["latency_ms"]["p50"]
            assert cells["p50 ms"] == (f"{p50:.3f}" if p50 < 1 else f"{p50:.2f}")
            assert cells["speedup vs"].startswith(f"{v['speedup_vs_fp32']:.2f}×")
            assert cells.get("threads") == (str(chosen[v["name"]]) if chosen else None)
            assert v["profile"]["threads"] == chosen.get(v["name"], rep["device"]["threads"])  # profiled at that count
        if v["name"] != "fp32":
            assert cells["fidelity vs"] == f"top-1 {v['fidelity']['top1_agreement']:.1%}"
            assert cells["within tolerance"].startswith("✓" if v["within_tolerance"] else "✗")
    assert rows[rep["recommended"]]["variant"].startswith(f"**{rep['recommended']}** ★")
    assert rows["fp32"]["speedup vs"] == "1.00× (baseline)"
    fp8 = rows["fp8"]
    assert "*(simulated)*" in fp8["variant"] and "(from pruned)" in fp8["variant"]
    assert fp8["p50 ms"] == fp8["speedup vs"] == "— (simulated)" and "fidelity only" in fp8["within tolerance"]


def test_markdown_sections(rep):
    md = render_markdown(rep, plot="tradeoff.png")
    assert "](tradeoff.png)" in md and "![p50 latency vs" in md
    excluded = rep["variants"][2]["excluded_layers"]
    if excluded:
        assert "## Layers kept in float" in md
        assert f"`{excluded[0]['node']}`" in md and excluded[0]["why"] in md
    assert "### Prune" in md and "none (`--no-recover`)" in md and "50% of channels" in md
    assert "### Quantize" in md and "FP8" in md and "**simulated**" in md
    steps = rep["stages"]["quantize"]["step_seconds"]  # the stage's own clock, step by step
    assert "quantize" in steps and f"quantize {steps['quantize']:.1f} s" in md.split("### Quantize")[1]
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
            assert "<h1>edge-compress report" in render_html(r)


@pytest.mark.parametrize("variants", [[], [{"name": "fp32"}], [{}], [{"name": "fp32", "latency_ms": None, "fidelity": None,
                                                                     "speedup_vs_fp32": None, "size_bytes": None}]])
def test_markdown_minimal_reports(variants):
    rep = {"schema": "edge-compress/report/1", "variants": variants, "stages": {"prune": {}, "quantize": {}}}
    md = render_markdown(rep)
    assert md.startswith("# edge-compress report") and md.endswith("\n")
    if variants:
        assert "n/a" in md
    page = render_html(rep)
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n") and "<img" not in page


def test_markdown_fp32_only_recommendation():
    md = render_markdown({"schema": "edge-compress/report/1", "recommended": "fp32", "reason": "only fp32 was built",
                          "tolerance": 0.01, "variants": [{"name": "fp32", "latency_ms": {"p50": 12.3456}, "speedup_vs_fp32": 1.0,
                                                           "size_bytes": 46_800_000, "params": 11_689_512, "macs": 1_818_558_976,
                                                           "within_tolerance": True, "simulated": False}]})
    assert "**Recommended: `fp32`** — only fp32 was built" in md
    cells = list(_rows(md)["fp32"].values())
    assert cells[1:7] == ["12.35", "n/a", "1.00× (baseline)", "46.8", "11.69M", "1.82G"]  # no thread tuning: no column
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


def _scored():
    """A hand-made report scored with --eval: `slow-bad` is dominated (int8 is faster and better); fp8 is simulated."""
    def v(name, p50, acc, ok=True, **kw):
        return {"name": name, "latency_ms": {"p50": p50, "p90": p50 * 1.1}, "speedup_vs_fp32": 20.0 / p50, "accuracy": acc,
                "fidelity": {"top1_agreement": acc + 0.05, "cosine_min": 0.99}, "within_tolerance": ok, "simulated": False, **kw}

    return {"schema": "edge-compress/report/1", "tolerance": 0.02, "recommended": "int8", "reason": "fastest within tolerance",
            "eval": "val.npz (top-1 accuracy)", "tolerance_on": "drop of --eval val.npz (top-1 accuracy)",
            "variants": [v("fp32", 20.0, 0.91), v("pruned", 12.0, 0.90), v("int8", 6.0, 0.895), v("slow-bad", 14.0, 0.85, False),
                         v("tiny", 4.0, 0.80, False),
                         {"name": "fp8", "simulated": True, "latency_ms": None, "accuracy": 0.95, "within_tolerance": True}]}


def test_pareto_front_membership():
    data = tradeoff_data(_scored())
    assert [p.name for p in data["front"]] == ["tiny", "int8", "pruned", "fp32"]  # by latency; slow-bad is dominated
    assert [p.name for p in data["untimed"]] == ["fp8"]  # simulated: off the latency axis, off the front, however good
    # the rule itself: dominated needs no worse on both and better on one; equal points stay; no x or y, no part
    P = data["front"][0].__class__
    pts = [P("a", 1.0, 0.9, {}), P("b", 1.0, 0.9, {}), P("c", 1.0, 0.8, {}), P("d", 2.0, 0.9, {}), P("e", 3.0, 0.95, {}),
           P("f", None, 1.0, {}), P("g", 0.5, None, {})]
    assert [p.name for p in pareto_front(pts)] == ["a", "b", "e"]
    assert pareto_front([]) == []


def test_plot_y_is_accuracy_when_every_timed_variant_has_one(tmp_path):
    rep = _scored()
    data = tradeoff_data(rep)
    assert data["y"] == "accuracy"
    assert {p.name: p.y for p in data["timed"]}["int8"] == 0.895 and data["untimed"][0].y == 0.95
    assert data["threshold"] == pytest.approx(0.91 - 0.02)  # fp32's score minus the tolerance
    fig = build_figure(rep)
    ax = fig.axes[0]
    assert "--eval" in ax.get_ylabel() and "val.npz" in ax.get_ylabel() and "latency" in ax.get_xlabel()
    front = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
    assert list(front.get_xdata())[:-1] == [4.0, 6.0, 12.0, 20.0]  # then flat to the right edge
    assert list(front.get_ydata()) == [0.80, 0.895, 0.90, 0.91, 0.91]
    assert any(line.get_ydata()[0] == pytest.approx(0.89) for line in ax.get_lines() if line.get_linestyle() == "--")
    plot_tradeoff(rep, tmp_path / "s.png")
    _assert_png_alone(tmp_path, "s.png")

    del rep["variants"][1]["accuracy"]  # one timed variant unscored: fidelity, like with like
    data = tradeoff_data(rep)
    assert data["y"] == "top1_agreement" and data["threshold"] == pytest.approx(0.98)
    assert {p.name: p.y for p in data["timed"]}["pruned"] == pytest.approx(0.95)


def test_plot_of_a_real_report_uses_p50_and_fidelity(rep):
    data = tradeoff_data(rep)
    assert data["y"] == "top1_agreement"
    assert [(p.name, p.x) for p in data["timed"]] == [(v["name"], v["latency_ms"]["p50"]) for v in rep["variants"][:2]]
    assert [p.name for p in data["untimed"]] == ["fp8"]
    fp32, pruned = data["timed"]
    assert fp32 in data["front"]  # nothing beats fp32 on fidelity
    assert (pruned in data["front"]) == (pruned.x < fp32.x)


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


# --- HTML -------------------------------------------------------------------------------------------------


def test_html_has_the_markdown_content_and_the_plot(rep):
    png = render_png(rep)
    page = render_html(rep, png)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert re.search(r"<(script|link|iframe)\b", page) is None and "http" not in page.split("<main>")[0]  # self-contained
    m = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m and base64.b64decode(m.group(1)) == png
    assert f"<strong>Recommended: <code>{rep['recommended']}</code></strong>" in page
    for v in rep["variants"]:  # one row per variant, its first cell the name
        assert re.search(rf"<tr><td>(<strong>)?{v['name']}\b", page), v["name"]
    md = render_markdown(rep)
    for heading in re.findall(r"^#{2,3} (.+)$", md, flags=re.M):
        assert re.search(rf"<h[23]>{re.escape(heading)}</h[23]>", page), heading
    assert "<em>(simulated)</em>" in page and "<details><summary>Pruned layers</summary>" in page
    assert f'<code class="language-sh">{rep["command"]}</code>' in page
    assert "accuracy (--eval)" not in page


def test_html_accuracy_column_and_escaping():
    rep = _scored()
    rep["variants"][1]["name"] = "<script>alert(1)</script>"
    rep["recommended"] = rep["variants"][1]["name"]
    rep["reason"] = 'because <b onclick="x()">fast</b> & good'
    rep["command"] = "compress run m.py:build --eval '<script>steal()</script>' -o out/"
    page = render_html(rep, b"\x89PNG fake")
    assert "<script" not in page and "<b " not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;script&gt;steal()&lt;/script&gt;" in page
    assert "&lt;b onclick=&quot;x()&quot;&gt;fast&lt;/b&gt; &amp; good" in page
    assert "<th style=\"text-align:right\">accuracy (--eval)</th>" in page
    assert '<td style="text-align:right">0.895</td>' in page  # int8's score, as the Markdown writes it


def test_write_html_is_atomic(rep, tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    target.write_text("old")
    real = type(target).write_text

    def half_then_fail(self, text, *a, **k):
        real(self, text[:10], *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(type(target), "write_text", half_then_fail)
    with pytest.raises(OSError):
        write_html(rep, target)
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.html"]


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


def test_cli_writes_html(run_dir, tmp_path, capsys, monkeypatch):
    page, png = tmp_path / "site" / "report.html", tmp_path / "site" / "t.png"
    rc, out, err = _report_cli(capsys, monkeypatch, run_dir, "--format", "html", "-o", page, "--plot", png)
    assert rc == 0 and out == "", err
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<h2>Variants</h2>" in text
    m = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert m and base64.b64decode(m.group(1)) == png.read_bytes()  # one drawing, in the file and in the page
    assert sorted(p.name for p in page.parent.iterdir()) == ["report.html", "t.png"]  # no temp files left
    rc, out, _ = _report_cli(capsys, monkeypatch, run_dir / "report.json", "--format", "html")
    assert rc == 0 and out.startswith("<!DOCTYPE html>") and "data:image/png;base64," in out


def test_cli_html_without_a_plot_still_renders(run_dir, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def boom(*a, **k):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(Figure, "savefig", boom)
    rc, out, err = _report_cli(capsys, monkeypatch, run_dir, "--format", "html")
    assert rc == 0 and out.startswith("<!DOCTYPE html>") and "<img" not in out
    assert "plot not embedded: no fonts" in err


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


def test_markdown_says_where_the_float_fallback_stopped(rep):
    r = copy.deepcopy(rep)
    r["stages"]["quantize"]["fallback"] = {"metric": "top1", "tolerance": 0.01, "error_before": 0.05, "error": 0.03,
                                           "within_tolerance": False, "max_excluded": 4, "excluded": []}
    md = render_markdown(r)
    assert "stopped at 4 layer(s) in float (error 0.03)" in md and "no faster than its input" in md
    del r["stages"]["quantize"]["fallback"]["max_excluded"]
    assert "did not reach the tolerance" in render_markdown(r)
