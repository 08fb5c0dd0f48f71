"""`compress profile`: latency, spread and memory of an ONNX model as a device profile would run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from compress.cli.options import budget_options
from compress.core import console

EPILOG = """\b
Examples:
  compress profile model.onnx
  compress profile model.onnx --device rpi4-cortex-a72 --hotspots
  compress profile model.onnx --device ./my-board.yaml --runs 200 --threads 2
  compress profile model.onnx --device host --json profile.json
  compress profile bert.onnx --input-shape input_ids=1,128 --input-shape attention_mask=1,128
  compress profile model.onnx --json - | jq .latency_ms.p50
  compress profile model.onnx --device rpi4-cortex-a72 --remote pi@raspberrypi.local --remote-python '~/venv/bin/python'
  compress profile model.onnx --device ./my-pi.yaml            (a profile with a remote: section)
  compress profile model.onnx --device rpi4-cortex-a72 --max-p50-ms 12   (exit 3 when p50 is above 12 ms)
  compress profile decoder.onnx --prompt-len 64 --context-len 256   (from export --with-past: prefill and per token)
"""

_PHASES = {"warmup": "warming up", "timing": "timing", "hotspots": "profiling operators"}


@click.command("profile", epilog=EPILOG)
@click.argument("model", metavar="MODEL.onnx")
@click.option("--device", default="host", show_default=True, metavar="NAME|PATH.yaml", help="Device profile: a bundled name or a YAML file.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]SHAPE[:DTYPE]",
              help="Shape to time an input at, e.g. input_ids=1,128 (repeat per input); needed for symbolic dimensions "
                   "other than the batch that the file's metadata does not fix.")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="Timed runs (default: adaptive, until the p50's 95% CI is within 2%).")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Untimed runs first (default 10).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: the device profile's).")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None, help="Time budget of adaptive timing (default 20).")
@click.option("--prompt-len", type=click.IntRange(min=1), default=None,
              help="A decoder exported with its KV cache (compress export --with-past): prompt tokens of the timed prefill (default 32).")
@click.option("--context-len", type=click.IntRange(min=1), default=None,
              help="Such a decoder: tokens of past before the timed decode step (default 128), within the model's positions.")
@click.option("--hotspots", is_flag=True, help="Also report the slowest operator types and nodes (onnxruntime profiler).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), help="Write the result as JSON to FILE ('-' for stdout, instead of the table).")
@click.option("--remote", "remote_target", metavar="USER@HOST[:PORT]", default=None,
              help="Profile on that machine over SSH (overrides the profile's remote: host, user and port).")
@click.option("--identity", metavar="KEY", type=click.Path(dir_okay=False), default=None,
              help="Private key for --remote (ssh -i; only this key is offered).")
@click.option("--known-hosts", metavar="FILE", type=click.Path(dir_okay=False), default=None,
              help="Verify the device's host key against FILE only (default: ~/.ssh/known_hosts). Unknown or changed keys are refused.")
@click.option("--remote-python", metavar="PATH", default=None,
              help="Python on the device that has onnxruntime and numpy (default: the profile's remote.python, else python3).")
@budget_options(run=False)
def profile(model: str, device: str, input_shapes: tuple[str, ...], runs: int | None, warmup: int | None, threads: int | None,
            max_seconds: float | None, prompt_len: int | None, context_len: int | None, hotspots: bool,
            json_out: str | None, remote_target: str | None,
            identity: str | None, known_hosts: str | None, remote_python: str | None, **limits: float | None) -> None:
    """Time MODEL.onnx with onnxruntime as the device profile configures it.

    By default timing runs for at least 30 runs and 1 s, then until the median's 95% confidence interval
    is within 2% and four time-ordered blocks of runs agree (the machine did not change speed midway),
    for at most --max-seconds; the spread is reported with the figures. If this onnxruntime lacks the
    device's execution provider and the profile allows it, the model is timed on CPU instead and the
    output says so.

    With --remote (or a profile with a remote: section) the model and a small runner are copied over SSH to a
    private temporary folder on the device, timed there by the device's own onnxruntime, and removed. The
    device's host key must already be in known_hosts: unknown or changed keys are refused.

    Budgets (--max-p50-ms, --max-p99-ms, --max-peak-rss-mb) are judged after the figures are printed or
    written: a miss exits with code 3 and one line naming each budget missed and by how much.
    """
    from compress.api import profile as profile_api
    from compress.core import check_output_path, write_json
    from compress.report import Budgets, enforce, profile_misses
    from devices import load_profile
    from runtime import DEFAULT_MAX_SECONDS

    out_path = (check_output_path(json_out, [model, device, identity, known_hosts], flag="--json")
                if json_out and json_out != "-" else None)
    budgets = Budgets(**limits)
    dev = load_profile(device)
    where = f"{dev.name} at {remote_target}" if remote_target else dev.name
    budget = max_seconds if max_seconds is not None else DEFAULT_MAX_SECONDS
    with console.progress(f"profiling on {where}", total=1) as step:
        result = profile_api(model, device, input_shape=input_shapes, runs=runs, warmup=warmup, threads=threads,
                             max_seconds=max_seconds, hotspots=hotspots, remote=remote_target, identity=identity,
                             known_hosts=known_hosts, remote_python=remote_python, prompt_len=prompt_len,
                             context_len=context_len, on_progress=_Bar(step, budget)).to_json()
    if json_out == "-":
        console.emit_json(result)
    else:
        if out_path is not None:
            write_json(out_path, result)
        _print_summary(result)
        if out_path is not None:
            console.info(f"wrote {out_path}")
    enforce(profile_misses(result, budgets), Path(model).name)


class _Bar:
    """Feeds the progress bar: runs out of total where the count is known, else seconds out of the budget.

    Adaptive timing has no run count to aim at, but it has a time limit, so the bar shows how much of
    --max-seconds is spent and the text shows the runs so far.
    """

    def __init__(self, step: console.Step, budget_s: float) -> None:
        self._step, self._budget = step, budget_s
        self._timing_started: float | None = None
        self._which = ""  # the generation phase being timed ("prefill", "decode"), "" for any other model

    def __call__(self, done: int, total: int | None, phase: str) -> None:
        import time

        which, _, what = phase.rpartition(" ")  # "prefill timing", "decode warmup" for a decoder with its cache
        label = (which + " " if which else "") + _PHASES.get(what, what)
        if which != self._which:
            self._timing_started, self._which = None, which  # the decode step's timing has its own budget
        if total is not None:
            self._step.update(completed=done, total=max(total, 1), description=label)
            return
        now = time.monotonic()
        if self._timing_started is None:
            self._timing_started = now
        spent = min(now - self._timing_started, self._budget)
        self._step.update(completed=spent, total=self._budget, description=f"{label} ({done:,} runs, ≤{self._budget:g} s)")


def _print_summary(r: dict[str, Any]) -> None:
    from rich.panel import Panel
    from rich.table import Table

    out = console.out_console
    dev = r.get("device") or {}
    remote = r.get("remote") or {}
    if r.get("fallback"):
        whose = f"the onnxruntime on {remote.get('target')}" if remote else "this onnxruntime"
        out.print(Panel(
            f"[bold]CPU FALLBACK[/bold]: device {dev.get('name')!r} asks for {', '.join(r.get('missing_providers') or [])}, "
            f"which {whose} cannot use. Measured on {', '.join(r.get('providers') or [])}: "
            "these figures are NOT the device's.",
            style="bold red", expand=False))
    lat, sp = r["latency_ms"], r["spread"]
    t = Table(title=f"{r['model']} on {dev.get('name', '?')}", show_header=False, title_justify="left")
    t.add_column("metric", style="bold")
    t.add_column("value")
    g = r.get("generation")
    if g:  # a decoder with its KV cache: the per-token figures first; latency below is the decode step's
        pre, dec = g["prefill"]["latency_ms"], g["decode"]["latency_ms"]
        t.add_row(f"prefill ({g['prompt_len']} tokens)", f"p50 {_ms(pre['p50'])}, p90 {_ms(pre['p90'])}"
                  + (f" ({g['prefill_tokens_per_s']:,.0f} prompt tokens/s)" if g.get("prefill_tokens_per_s") else ""))
        t.add_row(f"decode, per token (after {g['context_len']})", f"p50 {_ms(dec['p50'])}, p90 {_ms(dec['p90'])}"
                  + (f" ({g['tokens_per_s']:,.1f} tokens/s)" if g.get("tokens_per_s") else ""))
    for key in ("p50", "p90", "p99", "mean", "std", "min", "max"):
        t.add_row(f"{'decode step ' if g else ''}latency {key}", _ms(lat[key]))
    t.add_row("p50 95% CI", _ci_text(r))
    cv = f"{sp['cv'] * 100:.1f}%" if sp.get("cv") is not None else "n/a"
    t.add_row("IQR / CV", f"{_ms(sp['iqr_ms'])} / {cv}")
    if sp.get("drift_rel") is not None:
        t.add_row("drift", f"medians of 4 time-ordered blocks within {sp['drift_rel'] * 100:.1f}% of p50")
    load = _load_text(sp)
    if load:
        t.add_row("machine load", load)
    secs = f" in {r['timing_s']:.2f} s" if r.get("timing_s") is not None else ""
    t.add_row("runs (warmup)", f"{r['runs']}{secs} ({r['warmup']} warmup)")
    if r.get("throughput_per_s"):
        t.add_row("throughput", f"{r['throughput_per_s']:.1f} /s")
    providers = ", ".join(r.get("providers") or [])
    t.add_row("providers", f"[bold red]{providers} (fallback)[/bold red]" if r.get("fallback") else providers)
    t.add_row("threads", str(r["threads"]))
    if remote:
        t.add_row("measured on", f"{remote.get('target')} over SSH: {remote.get('cpu') or remote.get('machine') or '?'}, "
                                 f"{remote.get('cpu_count') or '?'} cores; onnxruntime {remote.get('onnxruntime')} "
                                 f"(EPs: {', '.join(remote.get('providers_available') or [])}), Python {remote.get('python_version')}")
    t.add_row("graph optimization", str(r.get("graph_optimization_level")))
    t.add_row("load", f"{r['load_ms']:.1f} ms")
    t.add_row("peak RSS", f"{r['peak_rss_mb']:.1f} MB" if r.get("peak_rss_mb") is not None else "n/a")
    t.add_row("model size", _size(r.get("model_size_bytes")))
    t.add_row("inputs", "; ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in r.get("inputs") or []))
    out.print(t)
    if r.get("hotspots"):
        _print_hotspots(r["hotspots"])


def _print_hotspots(h: dict[str, Any]) -> None:
    from rich.table import Table

    out = console.out_console
    # the profiler's own overhead inflates absolute times; the shares are what to read
    ops = Table(title=f"time per operator type (mean of {h.get('runs', '?')} profiled runs; read the %)", title_justify="left")
    for col in ("op type", "time", "%", "nodes"):
        ops.add_column(col, justify="left" if col == "op type" else "right")
    for row in h.get("by_op_type", []):
        ops.add_row(row["op_type"], _ms(row["ms"]), f"{row['pct']:.1f}", str(row["count"]))
    out.print(ops)
    nodes = Table(title="slowest nodes", title_justify="left")
    for col in ("node", "op type", "time", "%"):
        nodes.add_column(col, justify="right" if col in ("time", "%") else "left")
    for row in h.get("top_nodes", []):
        nodes.add_row(row["name"], row["op_type"], _ms(row["ms"]), f"{row['pct']:.1f}")
    out.print(nodes)


def _ci_text(r: dict[str, Any]) -> str:
    """The CI plus what to do when it is not tight: adaptive runs lack time, fixed runs lack runs."""
    sp = r["spread"]
    lo, hi = sp["p50_ci_ms"]
    rel = f"{sp['p50_ci_rel'] * 100:.1f}%" if sp.get("p50_ci_rel") is not None else "n/a"
    text = f"{_ms(lo)} – {_ms(hi)} (width {rel} of p50)"
    if sp.get("converged"):
        return text + ", converged"
    fix = "raise --max-seconds or quiet the machine" if sp.get("adaptive") else "more --runs, or omit --runs"
    return text + f", [bold yellow]NOT converged[/bold yellow] ({fix})"


def _load_text(sp: dict[str, Any]) -> str:
    other, steal = sp.get("other_cpu_frac"), sp.get("steal_frac")
    if other is None:
        return ""
    text = f"other processes {other * 100:.0f}% of CPU" + (f", hypervisor steal {steal * 100:.0f}%" if steal else "")
    if other + (steal or 0) > 0.1:
        text = f"[bold yellow]{text}: figures may be inflated[/bold yellow]"
    return text


def _ms(v: float | None) -> str:
    """Milliseconds with enough digits for a 20 µs model and a 2 s one alike."""
    if v is None:
        return "n/a"
    if v < 1:
        return f"{v * 1000:.1f} µs"
    if v < 100:
        return f"{v:.3f} ms"
    return f"{v:.1f} ms"


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
