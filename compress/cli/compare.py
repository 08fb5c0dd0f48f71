"""`compress compare`: two profiles or two run reports, figure by figure, and a regression limit for CI."""

from __future__ import annotations

from typing import Any

import click

from compress.core import console

EPILOG = """\b
Examples:
  compress compare base/profile.json new/profile.json
  compress compare base/profile.json new/profile.json --max-regression 5%     (CI: exit 3 on a regression)
  compress compare base-run/ new-run/ --max-regression 3% --json -
"""

@click.command("compare", epilog=EPILOG)
@click.argument("old", metavar="OLD.json|OLD_RUN/")
@click.argument("new", metavar="NEW.json|NEW_RUN/")
@click.option("--max-regression", metavar="PCT", default=None,
              help="Exit 3 when a figure got worse by more than this (5% or 0.05): latency and peak RSS up, "
                   "speedup or --eval accuracy down. A p50 whose two 95% CIs overlap is noise, not a regression.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the comparison as JSON to FILE ('-' for stdout, instead of the table).")
def compare(old: str, new: str, max_regression: str | None, json_out: str | None) -> None:
    """Compare two `compress profile --json` files, or two `compress run` reports (a run's folder or its
    report.json), figure by figure: p50, p99 and peak RSS, and for runs each variant both built, with its
    speedup over fp32 and its --eval score.

    With --max-regression, a figure that moved the wrong way by more than the limit (and, for a p50, outside
    both measurements' confidence intervals) exits 3 with one line naming each regression.
    """
    from compress.api import compare as compare_api
    from compress.core import BudgetMissed, check_output_path, write_json

    result = compare_api(old, new, max_regression=max_regression)
    out_path = check_output_path(json_out, [result.old, result.new], flag="--json") if json_out and json_out != "-" else None
    doc = result.to_json()
    if json_out == "-":
        console.emit_json(doc)
    else:
        if out_path is not None:
            write_json(out_path, doc)
        _print(result)
    regressed = result.regressions()
    if regressed:
        n = len(regressed)
        raise BudgetMissed(f"{result.new} regressed {n} figure{'s' if n > 1 else ''} beyond --max-regression "
                           f"{result.max_regression:.1%} against {result.old}: " + "; ".join(map(str, regressed)))


def _print(result: Any) -> None:
    from rich.table import Table

    t = Table(header_style="bold")
    for col in ("figure", "old", "new", "change", ""):
        t.add_column(col, justify="left" if col in ("figure", "") else "right")
    for c in result.figures:
        ch = c.change
        flag = "REGRESSED" if c.regressed else "within noise" if c.noise and c.worse else "worse" if c.worse else ""
        t.add_row(c.figure, _cell(c.old, c.unit), _cell(c.new, c.unit), f"{ch:+.1%}" if ch is not None else "-", flag)
    console.out_console.print(t)
    rec = result.recommended or {}
    if rec.get("old") != rec.get("new"):
        console.out_console.print(f"recommended: {rec.get('old')} -> {rec.get('new')}")


def _cell(x: float | None, unit: str) -> str:
    return "-" if x is None else f"{x:.4g}{unit}"
