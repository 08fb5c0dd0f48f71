"""The `compress` command: a click group whose subcommands live in small cli_* modules.

`main` maps every EdgeError to a one-line message and its exit code (2 usage, 3 a budget missed, 1 otherwise);
a traceback is shown only with --debug, because users asked for answers, not stack traces.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

import click

from compress import __version__
from compress.core import EdgeError, missing_extra

EPILOG = """\b
Examples:
  compress devices list
  compress export compress.zoo:resnet_demo --input-shape 1,3,224,224 -o out/resnet.onnx
  compress profile out/resnet.onnx --device host --json out/profile.json
  compress prune compress.zoo:resnet_demo --input-shape 1,3,224,224 --ratio 0.5 -o out/pruned.onnx
  compress quantize out/resnet.onnx --to int8 --device host --calib calib.npz -o out/resnet.int8.onnx
  compress formats out/resnet.onnx --device nvidia-h100-trt-fp8 --calib calib.npz --plot formats.png
  compress run compress.zoo:resnet_demo --input-shape 1,3,224,224 --device host -o out/run/
  compress report out/run/ -o out/run/summary.md --plot out/run/tradeoff.png
  compress compare base/profile.json out/profile.json --max-regression 5%
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="EDGE_COMPRESS_DEBUG", help="Show tracebacks on errors.")
@click.version_option(__version__, prog_name="compress")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Prune, quantize, export and profile PyTorch models for edge devices.

    Exit codes: 0 ok, 1 failure, 2 usage, 3 a budget missed (--max-p50-ms and the like on profile and run),
    143 / 129 stopped by SIGTERM / SIGHUP (Ctrl-C: 1).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from compress.cli.compare import compare
    from compress.cli.devices import devices
    from compress.cli.export import export
    from compress.cli.formats import formats
    from compress.cli.profile import profile
    from compress.cli.prune import prune
    from compress.cli.quantize import quantize
    from compress.cli.report import report
    from compress.cli.run import run
    from compress.cli.search import search, sweep

    for cmd in (compare, devices, export, formats, profile, prune, quantize, report, run, search, sweep):
        cli.add_command(cmd)


_register()


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("EDGE_COMPRESS_DEBUG", "") not in ("", "0", "false")


# Libraries that log at import: torchao (pulled in by transformers and INC) warns about CUDA kernels a CPU
# build cannot load, torch about deprecated pytree registrations. Not the user's business unless --debug.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "neural_compressor")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    if not debug:
        import logging

        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    from compress.core import interrupt
    interrupt.install()
    try:
        rc = cli.main(args=argv, prog_name="compress", standalone_mode=False)
        interrupt.check_interrupted()  # a library swallowed Ctrl-C and the command went on: still a cancel
    except (click.exceptions.Abort, KeyboardInterrupt):
        _interrupted()
    except click.ClickException as e:  # usage errors from click itself
        e.show()
        sys.exit(e.exit_code)
    except EdgeError as e:
        if interrupt.interrupted():  # the error is what Ctrl-C left behind (a library wrapped it)
            _interrupted()
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug or an unforeseen failure: still one line unless --debug
        if interrupt.interrupted():
            _interrupted()
        if debug:
            traceback.print_exc()
        extra = missing_extra(e)  # an extra not installed: which one, not the ImportError
        if extra is not None:
            click.echo(f"error: compress {argv[0] if argv else ''}: {extra}", err=True)
            sys.exit(1)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"error: {type(e).__name__}: {msg} (run with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


def _interrupted() -> NoReturn:
    """Ctrl-C: exit 1 (documented); SIGTERM/SIGHUP: 128 + the signal's number, as a shell reports it."""
    import signal

    from compress.core import interrupt

    for sig in interrupt.SIGNALS:  # a second signal must not turn the exit into a traceback
        signal.signal(sig, signal.SIG_IGN)
    # CPython marks a KeyboardInterrupt that left an exec()/eval() of a string (torch.fx, dataclasses and
    # namedtuple run generated code that way) as unhandled, even though we caught it, and under `python -m`
    # then kills itself with SIGINT at exit, whatever code we pass: CI saw -2 for a SIGTERMed export. Any
    # later string exec clears that mark, so this one does.
    exec("None")
    sig = interrupt.received()
    if sig == signal.SIGINT:
        click.echo("error: interrupted", err=True)
        sys.exit(1)
    click.echo(f"error: terminated by {signal.Signals(sig).name}", err=True)
    sys.exit(128 + sig)


if __name__ == "__main__":
    main()
