"""`compress.compare`: two profiles or two run reports, figure by figure, with a regression limit for CI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from compress.core import InputError, UsageError
from compress.report import Comparison, changes, parse_limit, read_json_file


def compare(old: Union[str, os.PathLike], new: Union[str, os.PathLike], *,
            max_regression: Union[str, float, None] = None) -> Comparison:
    """Compare OLD and NEW (`compress profile --json` files, or `compress run` reports: a run's folder or its
    report.json) figure by figure: p50, p99 and peak RSS, and for runs each variant both built with its speedup
    and --eval score; the compress.report.Comparison. `max_regression` ("5%" or 0.05): each figure says whether
    it moved the wrong way by more than that (a p50 whose two 95% CIs overlap is noise, never a regression);
    `.regressions()` lists them. Reads only the two files: no torch, no model.

        >>> import compress
        >>> c = compress.compare("base/profile.json", "profile.json", max_regression="5%")
        >>> [str(f) for f in c.regressions()]
    """
    limit = None
    if max_regression is not None:
        try:
            limit = parse_limit(str(max_regression))
        except ValueError:
            raise UsageError(f"--max-regression {max_regression}: give a percentage (5%) or a fraction (0.05)") from None
    a, a_path = _read(old)
    b, b_path = _read(new)
    kind, figures = changes(a, b, str(a_path), str(b_path))
    runs = {"recommended": {"old": a.get("recommended"), "new": b.get("recommended")}} if kind == "run" else {}
    return Comparison(kind=kind, old=str(a_path), new=str(b_path), max_regression=limit,
                      figures=[c.to_json(limit) for c in figures], **runs)


def _read(source: Union[str, os.PathLike]) -> tuple[dict[str, Any], Path]:
    doc, p = read_json_file(source, "give a profile's JSON, a run's report.json or its folder")
    if not isinstance(doc, dict):
        raise InputError(f"{p}: not a profile or a run report (a JSON {type(doc).__name__})")
    return doc, p


