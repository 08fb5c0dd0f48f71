"""Progress that CI logs can see: with stderr not a terminal, a long step prints a plain line every few seconds."""

from __future__ import annotations

import time

from compress.core import console


def test_plain_lines_while_a_step_lasts(monkeypatch, capfd):
    monkeypatch.setenv("EDGE_COMPRESS_PROGRESS_EVERY", "0.1")
    with console.progress("quantizing", total=4) as step:
        step.update(completed=1, description="calibrating")
        time.sleep(0.35)
    time.sleep(0.2)  # nothing more once the step has ended
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("progress: ")]
    assert 2 <= len(lines) <= 4
    assert lines[0].startswith("progress: calibrating [1/4] ") and lines[-1].endswith("s")


def test_a_short_step_prints_nothing(monkeypatch, capfd):
    monkeypatch.setenv("EDGE_COMPRESS_PROGRESS_EVERY", "5")
    with console.progress("loading model"):
        pass
    assert "progress:" not in capfd.readouterr().err
