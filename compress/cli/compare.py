"""`compress compare`: two profiles or two run reports, figure by figure, and a regression limit for CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from compress.cli.report import read_json_file
from compress.core import InputError, UsageError, console

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
    from compress.core import BudgetMissed, check_output_path, write_json
    from compress.report import Comparison, changes, parse_limit

    limit = None
    if max_regression is not None:
        try:
            limit = parse_limit(max_regression)
        except ValueError:
            raise UsageError(f"--max-regression {max_regression}: give a percentage (5%) or a fraction (0.05)") from None
    a, a_path = _read(old)
    b, b_path = _read(new)
    out_path = check_output_path(json_out, [a_path, b_path], flag="--json") if json_out and json_out != "-" else None
    kind, figures = changes(a, b, str(a_path), str(b_path))
    rec = (a.get("recommended"), b.get("recommended")) if kind == "run" else (None, None)
    doc = Comparison(kind=kind, old=str(a_path), new=str(b_path), max_regression=limit,
                     figures=[c.to_json(limit) for c in figures],
                     **({"recommended": {"old": rec[0], "new": rec[1]}} if kind == "run" else {})).to_json()
    if json_out == "-":
        console.emit_json(doc)
    else:
        if out_path is not None:
            write_json(out_path, doc)
        _print(figures, limit, rec)
    regressed = [c for c in figures if limit is not None and c.regressed(limit)]
    if regressed:
        raise BudgetMissed(f"{b_path} regressed {len(regressed)} figure{'s' if len(regressed) > 1 else ''} beyond "
                           f"--max-regression {limit:.1%} against {a_path}: " + "; ".join(map(str, regressed)))


def _read(source: str) -> tuple[dict[str, Any], Path]:
    doc, p = read_json_file(source, "give a profile's JSON, a run's report.json or its folder")
    if not isinstance(doc, dict):
        raise InputError(f"{p}: not a profile or a run report (a JSON {type(doc).__name__})")
    return doc, p


def _print(figures: list[Any], limit: float | None, rec: tuple[Any, Any]) -> None:
    from rich.table import Table

    t = Table(header_style="bold")
    for col in ("figure", "old", "new", "change", ""):
        t.add_column(col, justify="left" if col in ("figure", "") else "right")
    for c in figures:
        ch = c.change
        flag = ("REGRESSED" if limit is not None and c.regressed(limit) else "within noise" if c.noise and c.worse
                else "worse" if c.worse else "")
        t.add_row(c.figure, _cell(c.old, c.unit), _cell(c.new, c.unit), f"{ch:+.1%}" if ch is not None else "-", flag)
    console.out_console.print(t)
    if rec[0] != rec[1]:
        console.out_console.print(f"recommended: {rec[0]} -> {rec[1]}")


def _cell(x: float | None, unit: str) -> str:
    return "-" if x is None else f"{x:.4g}{unit}"
