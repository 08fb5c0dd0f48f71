"""Load device profiles: shipped ones by name, the user's own by path.

Every failure becomes a one-line InputError (the file cannot be read as YAML) or DeviceError (the YAML
is not a valid profile) that names the file and the field, because a profile is usually hand-written
and the user needs to know which line to fix, not a pydantic traceback.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from compress.core import DeviceError, InputError
from devices import host
from devices.schema import DeviceProfile

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
YAML_SUFFIXES = (".yaml", ".yml")
MAX_ERRORS_SHOWN = 2


def _shipped_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.yaml"))}


def profile_names() -> list[str]:
    """Names of the profiles shipped with the package, sorted."""
    return sorted(_shipped_files())


def list_profiles() -> list[DeviceProfile]:
    """All shipped profiles, loaded and validated (so a broken shipped file is reported, not skipped)."""
    return sorted((load_profile(name) for name in profile_names()), key=lambda p: p.name)


def _looks_like_path(arg: str, shipped: dict[str, Path]) -> bool:
    """A YAML suffix or a separator means a path. A bare existing file counts only if it is not also a
    shipped name, so a stray file called `host` in the working directory cannot hijack `--device host`."""
    if arg.lower().endswith(YAML_SUFFIXES):
        return True
    if os.sep in arg or (os.altsep and os.altsep in arg) or "/" in arg:
        return True
    return arg not in shipped and Path(arg).is_file()


def _unknown_name(name: str, known: list[str]) -> DeviceError:
    close = [k for k in known if len(name) >= 3 and name.lower() in k] or difflib.get_close_matches(name.lower(), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return DeviceError(f"unknown device {name!r}; {hint}known: {', '.join(known)} (or pass a path to a .yaml profile)")


# Bounds on what a config file may be and expand to. Shipped profiles are under 2 KB and 60 values; a sweep a
# few hundred values. Past these bounds a file is refused in one line instead of loading for minutes or
# exhausting memory (YAML anchors and aliases let 1 KB expand to billions of values: "billion laughs").
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 50


def read_text(path: Path, shown: str, what: str = "device profile") -> str:
    if not path.exists():
        raise InputError(f"{shown}: no such {what} file")
    if path.is_dir():
        raise InputError(f"{shown}: is a directory, expected a .yaml {what}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InputError(f"{shown}: {size / 1e6:.1f} MB is more than a {what} may be "
                             f"({MAX_CONFIG_BYTES / 1e6:g} MB)")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{shown}: not UTF-8 text (byte {e.start}); a {what} must be a YAML text file") from None
    except OSError as e:
        raise InputError(f"{shown}: cannot read: {e.strerror or e}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _ConfigTooLarge(Exception):
    pass


def _expanded_size(node: yaml.Node, memo: dict[int, tuple[int, int]], depth: int = 0) -> tuple[int, int]:
    """(values, height) of `node` found at `depth`: the values it stands for once every alias is expanded (an
    anchored node counts at each use), without expanding anything: each distinct node is sized once. Its height
    is remembered with its size, so an alias used deep down counts the depth of what it names (nesting aliases
    cannot pile depth past the bound)."""
    if depth > MAX_CONFIG_DEPTH:
        raise _ConfigTooLarge(f"nests deeper than {MAX_CONFIG_DEPTH} levels")
    key = id(node)
    if key not in memo:
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [x for pair in node.value for x in pair]
        else:
            children = []
        sized = [_expanded_size(child, memo, depth + 1) for child in children]
        size, height = 1 + sum(sz for sz, _ in sized), 1 + max((h for _, h in sized), default=0)
        if size > MAX_CONFIG_VALUES:
            raise _ConfigTooLarge(f"expands to more than {MAX_CONFIG_VALUES} values (anchors and aliases repeat "
                                  "what they name)")
        memo[key] = (size, height)
    size, height = memo[key]
    if depth + height - 1 > MAX_CONFIG_DEPTH:
        raise _ConfigTooLarge(f"nests deeper than {MAX_CONFIG_DEPTH} levels")
    return size, height


def _bounded_safe_load(text: str) -> Any:
    """yaml.safe_load, after checking the composed document's expanded size and depth."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_yaml(text: str, shown: str, what: str = "device profile") -> dict[str, Any]:
    """safe_load only: a config must never be able to construct Python objects; and bounded (see
    MAX_CONFIG_VALUES): a config must not be able to expand to more than it could mean."""
    try:
        data = _bounded_safe_load(text)
    except _ConfigTooLarge as e:
        raise InputError(f"{shown}: the YAML {e}; a {what} is a few hundred values") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = _one_line(" ".join(filter(None, [e.context, e.problem]))) or "syntax error"
        raise InputError(f"{shown}: {where}invalid YAML: {what}") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise InputError(f"{shown}: invalid YAML: {_one_line(e) or type(e).__name__}") from None
    if data is None:
        raise InputError(f"{shown}: empty file; expected a mapping of {what} fields")
    if not isinstance(data, dict):
        raise InputError(f"{shown}: the top level must be a mapping of {what} fields, got a YAML {type(data).__name__}")
    return data


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _short_repr(value: Any, limit: int = 40) -> str:
    text = _one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_at(loc: tuple[Any, ...]) -> Optional[type[BaseModel]]:
    """The schema model that holds the last element of loc (list indices skipped), if any."""
    model: Optional[type[BaseModel]] = DeviceProfile
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return None
        model = _find_model(field.annotation)
    return model


def _find_model(annotation: Any) -> Optional[type[BaseModel]]:
    """Unwrap Optional[...] / list[...] down to a pydantic model class."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _suggest_field(loc: tuple[Any, ...]) -> str:
    model = _model_at(loc)
    if model is None or not loc:
        return ""
    names = [n for n in model.model_fields if n != "source"]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe_error(err: dict[str, Any]) -> str:
    """One pydantic error as "field 'a.b': message", worded for someone editing YAML."""
    raw_loc = tuple(err.get("loc", ()))
    loc, kind = _loc(raw_loc), err.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown field {loc!r}{_suggest_field(raw_loc)}"
    if kind == "missing":
        return f"missing required field {loc!r}"
    msg = _one_line(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    show_input = "input" in err and kind != "value_error" and not isinstance(err["input"], (dict, list))
    got = f" (got {_short_repr(err['input'])})" if show_input else ""
    return f"field {loc!r}: {msg}{got}" if loc else f"{msg}{got}"


def format_validation_error(shown: str, exc: ValidationError) -> str:
    """The first few validation errors of a profile as one line, naming the file and each field."""
    errors = [dict(e) for e in exc.errors()]
    missing = [_loc(tuple(e.get("loc", ()))) for e in errors if e.get("type") == "missing"]
    others = [e for e in errors if e.get("type") != "missing"]
    parts = [_describe_error(e) for e in others[:MAX_ERRORS_SHOWN]]
    if missing:  # a new hand-written file usually lacks several: name them all at once
        label = "missing required field" + ("s" if len(missing) > 1 else "")
        parts.insert(0, f"{label} {', '.join(repr(m) for m in missing)}")
    more = len(others) - MAX_ERRORS_SHOWN
    tail = f" (and {more} more)" if more > 0 else ""
    return f"{shown}: {'; '.join(parts)}{tail}"


def _validate(data: dict[str, Any], shown: str) -> DeviceProfile:
    if "source" in data:
        raise DeviceError(f"{shown}: field 'source' is set by the loader; remove it from the YAML")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise DeviceError(format_validation_error(shown, e)) from None
    except (TypeError, ValueError, RecursionError) as e:  # odd YAML (e.g. unhashable keys) pydantic rejects raw
        raise DeviceError(f"{shown}: not a valid device profile: {_one_line(e) or type(e).__name__}") from None


def apply_host_detection(profile: DeviceProfile, shown: str) -> DeviceProfile:
    """Replace a `detect: true` profile's placeholders with this machine's values.

    Quantization and pruning prefs follow from the detected ISA, so they are re-derived too; only the
    quantizer's op_types (a model choice, not a hardware one) is kept from the YAML.
    """
    h = host.detect()
    if h.arch not in ("x86_64", "arm64"):
        raise DeviceError(f"{shown}: cannot detect this machine: architecture {h.arch!r} is not supported (x86_64, arm64)")
    quant = host.quant_defaults(h.arch, h.isa).model_copy(update={"op_types": profile.quantization.op_types})
    data = profile.model_dump()
    data.update(
        arch=h.arch,
        isa=list(h.isa),
        cores=h.cores,
        threads=h.cores,
        quantization=quant.model_dump(),
        pruning={"channel_multiple": host.channel_multiple(h.arch, h.isa)},
        int8_dot=host.int8_dot(h.isa),
        session_config={**host.session_defaults(h.cores, h.cores), **profile.session_config},
    )
    return _validate(data, shown)


def _load_file(path: Path, shown: str) -> DeviceProfile:
    profile = _validate(parse_yaml(read_text(path, shown), shown), shown)
    if profile.detect:
        profile = apply_host_detection(profile, shown)
    profile.source = path
    return profile


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by shipped name (`rpi4-cortex-a72`) or by path to a YAML file (`./my-board.yaml`)."""
    arg = str(name_or_path).strip()
    if not arg:
        raise DeviceError(f"empty device name; known: {', '.join(profile_names())}")
    shipped = _shipped_files()
    if _looks_like_path(arg, shipped):
        path = Path(arg).expanduser()
        return _load_file(path, str(path))
    if arg not in shipped:
        raise _unknown_name(arg, sorted(shipped))
    return _load_file(shipped[arg], str(shipped[arg]))
