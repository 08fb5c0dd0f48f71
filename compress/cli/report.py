"""`compress report`: a `compress run` report.json as Markdown for a PR, a self-contained HTML page, or its JSON
again, plus the latency-vs-fidelity (or accuracy) plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from compress.core import UsageError, console

EPILOG = """\b
Examples:
  compress report out/
  compress report out/report.json -o out/report.md --plot out/tradeoff.png
  compress report out/ --plot tradeoff.png > pr-comment.md
  compress report out/ --format html -o report.html
  compress report out/ --format json | jq .recommended
"""


@click.command("report", epilog=EPILOG)
@click.argument("source", metavar="OUTDIR|REPORT.json")
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]), default="md", show_default=True,
              help="md: the human-readable report; html: the same as one self-contained page, plot included; "
                   "json: the report itself, validated and re-emitted.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="PNG",
              help="Also write the latency-vs-fidelity plot (accuracy with --eval; Pareto front drawn) to this .png "
                   "(linked from the Markdown when -o is a file).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE",
              help="Write to FILE (atomically) instead of stdout ('-' for stdout).")
def report(source: str, fmt: str, plot: str | None, output: str | None) -> None:
    """Render the report of a `compress run`: OUTDIR (its report.json) or the JSON file itself.

    The Markdown puts the recommendation and its reason first, then a table of the variants (latency,
    speedup vs fp32, size, params, MACs, fidelity, --eval accuracy, within tolerance; simulated ones
    marked), the layers kept in float and why, what the prune and quantize stages did, how the speedup was
    measured, and the command that made the run. --format html is the same content as one HTML file with
    the plot embedded. Files are written atomically: a failure leaves an earlier one as it was.
    """
    from compress.core import check_output_path

    rep, path = load_report(source)
    out_path = check_output_path(output, [path]) if output and output != "-" else None
    plot_path = None
    if plot:
        if not plot.lower().endswith(".png"):
            raise UsageError(f"--plot {plot}: the plot is a PNG; give a path ending in .png")
        plot_path = check_output_path(plot, [path])
        if out_path is not None and plot_path.resolve() == out_path.resolve():
            raise UsageError(f"--plot {plot} and -o {output} are the same file; give two paths")

    png = _plot(rep, plot_path, needed=fmt == "html")

    if fmt == "html":
        from compress.report import render_html, write_html

        if out_path is None:
            click.echo(render_html(rep, png), nl=False)
            return
        write_html(rep, out_path, png)
        console.info(f"wrote {out_path}")
        return

    if fmt == "json":
        if out_path is None:
            console.emit_json(rep)
            return
        from compress.core import write_json

        write_json(out_path, rep)
        console.info(f"wrote {out_path}")
        return

    from compress.report import render_markdown, write_markdown

    if out_path is None:
        click.echo(render_markdown(rep), nl=False)
        return
    link = None
    if plot_path is not None:  # relative to the Markdown, so the pair can be moved together
        link = Path(os.path.relpath(plot_path.resolve(), out_path.resolve().parent)).as_posix()
    write_markdown(rep, out_path, plot=link)
    console.info(f"wrote {out_path}")


def _plot(rep: dict[str, Any], plot_path: Path | None, needed: bool) -> bytes | None:
    """Draw the plot when --plot asks for the file (a failure is the command's) or the HTML embeds it (a
    failure costs the picture, with a warning, not the page)."""
    if plot_path is None and not needed:
        return None
    from compress.report import render_png, write_png

    try:
        png = render_png(rep)
    except Exception as e:
        if plot_path is not None:
            raise
        from compress.core import first_line

        console.warn(f"plot not embedded: {first_line(e)}")
        return None
    if plot_path is not None:
        write_png(png, plot_path)
        console.info(f"wrote {plot_path}")
    return png


def load_report(source: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read and validate a run report from its file or from the run's output folder; InputError otherwise."""
    from compress.report import read_json_file, validate_report

    obj, p = read_json_file(source, "give a `compress run` output folder or its report.json")
    validate_report(obj, source=str(p))
    return obj, p


# a profile is a few kB and a run report under 1 MB: a larger file is none of ours
