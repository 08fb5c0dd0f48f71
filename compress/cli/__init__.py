"""The `compress` command line: one module per command (`compress/cli/<command>.py`), each a thin layer that
reads flags and calls the room that does the work; `main` maps errors to one line and an exit code."""

from compress.cli.main import cli, main

__all__ = ["cli", "main"]
