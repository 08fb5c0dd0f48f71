"""`--config RECIPE.yaml`: every option of a command from a file committed next to the model, flags overriding it.

Why: `compress run` takes about 25 flags, and "how we compress this model for this board" belongs in the
repository beside the model, not in a shell history. The file's keys are the command's own flag names (`prune:
0.3`, `input-shape: [1,3,224,224]`, `no-recover: true`, `model: model.py:build`), so the flags' help is the
file's documentation; its values become click's defaults (ctx.default_map) and go through the same types and
checks as typed flags, and a flag given on the command line overrides its key. Relative paths in the file are
relative to the file (as in a sweep file), so the recipe works from any working directory. The run records the
options it resolved (`recipe` in report.json, paths made absolute), and that mapping written back as YAML
repeats the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import click

from compress.core import UsageError, few

# the options (and the argument) whose values name files or folders
PATH_KEYS = ("model", "weights", "calib", "device", "eval", "metric", "tokenizer", "output", "json")
_OUTPUT_KEYS = ("output", "json")
_FILE_SUFFIXES = (".py", ".onnx", ".npz", ".yaml", ".yml", ".json", ".safetensors", ".pt", ".pth", ".txt", ".jsonl",
                  ".csv", ".png")


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config", metavar="RECIPE.yaml", type=click.Path(dir_okay=False), is_eager=True,
                        expose_value=False, callback=_load,
                        help="Options from a YAML file (keys: this command's flag names, e.g. prune: 0.3; paths "
                             "relative to the file); flags given here override it.")(f)


def keys_of(command: click.Command) -> dict[str, click.Parameter]:
    """Each parameter by the key a recipe uses: an option's long flag names without the dashes (both sides of
    an on/off pair), an argument's name."""
    out: dict[str, click.Parameter] = {}
    for p in command.params:
        if isinstance(p, click.Option):
            for flag in p.opts + p.secondary_opts:
                if flag.startswith("--") and p.name != "config":
                    out[flag[2:]] = p
        elif p.name:
            out[p.name] = p
    return out


def _load(ctx: click.Context, _param: click.Parameter, value: Optional[str]) -> None:
    if value is None:
        return
    from devices import parse_yaml, read_text

    path = Path(value).expanduser()
    data = parse_yaml(read_text(path, value, "recipe"), value, "recipe")
    known = keys_of(ctx.command)
    unknown = sorted(k for k in map(str, data) if k not in known)
    if unknown:
        raise UsageError(f"{value}: no option {few(unknown)} in `compress {ctx.command.name}` (keys are its flag names "
                         f"without the dashes: {few(sorted(known), 6)})")
    base = path.resolve().parent
    defaults: dict[str, Any] = {}
    for key, v in data.items():
        p = known[str(key)]
        if isinstance(p, click.Option) and p.secondary_opts and f"--{key}" in p.secondary_opts:
            if not isinstance(v, bool):
                raise UsageError(f"{value}: {key}: give true or false")
            v = not v  # `no-tune-threads: true` is tune-threads false
        if p.name in defaults:
            raise UsageError(f"{value}: {key} and another key both set --{p.name.replace('_', '-')}")
        v = _located(str(key), v, base)
        if getattr(p, "multiple", False) and not isinstance(v, list):
            v = [v]
        defaults[p.name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _located(key: str, v: Any, base: Path) -> Any:
    """The value of `key` with the files and folders it names relative to `base` made absolute (each of a list)."""
    if key not in PATH_KEYS:
        return v
    always = key in _OUTPUT_KEYS
    return [_here(x, base, always) for x in v] if isinstance(v, list) else _here(v, base, always)


def _here(v: Any, base: Path, always: bool = False) -> Any:
    """A file or folder named relative to the recipe, made absolute; names (device profiles, module:factory,
    hf:dataset, '-') left as they are. `always`: an output, which need not exist yet."""
    if not isinstance(v, str) or v in ("", "-") or v.startswith("hf:"):
        return v
    if ".py:" in v:
        file, _, fn = v.rpartition(":")
        return f"{_here(file, base, always=True)}:{fn}"
    if ":" in v and "/" not in v:
        return v  # package.module:factory
    q = Path(v).expanduser()
    if q.is_absolute():
        return str(q)
    if always or (base / q).exists() or "/" in v or q.suffix.lower() in _FILE_SUFFIXES:
        return str(base / q)
    return v


def resolved(ctx: click.Context) -> dict[str, Any]:
    """The options this invocation resolved, keyed as a recipe file takes them (each option by its first long
    flag; an on/off pair by its "on" side), paths made absolute: the mapping that repeats the run."""
    out: dict[str, Any] = {}
    for p in ctx.command.params:
        if p.name is None or p.name == "config" or p.name not in ctx.params:
            continue
        key = next((f[2:] for f in p.opts if f.startswith("--")), p.name) if isinstance(p, click.Option) else p.name
        v = ctx.params[p.name]
        if v is None:
            continue  # unset: the default, which the recipe then leaves to the command too
        if isinstance(v, tuple):
            v = list(v)
        out[key] = _located(key, v, Path.cwd())
    return out
