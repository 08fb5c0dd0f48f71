"""House rules that neither ruff nor import-linter can state:

1. No private name crosses a module boundary. A name that starts with one underscore belongs to its module.
   Ruff's import-private-name (PLC2701) treats every module under one top-level package as the same package,
   so `from compress.quantization.int8 import _quiet` passes it; this check does not.
2. The top of a file says what it depends on: the project's own imports sit at module level, except in the
   modules that must stay light to import (LAZY below: the command modules, so `compress --help` starts in
   0.2 s instead of 2.4 s, and the quantization registry and its backends, whose choices click reads at
   start-up).
3. A room is entered through its door. A room is a subpackage of compress/ (core, models, quantize, ...) or one
   of devices/, export/, runtime/; its __init__ names what others may use. From outside a room, import from
   the room itself (`from compress.quantization import quant_stage`), never from one of its modules.

It reads imports and attribute access on imported modules, for the project's own packages, outside tests and
benchmarks (they may reach in on purpose). Run by `make lint`.

    python tools/house_rules.py            # one line per violation, exit 1 if any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compress", "devices", "export", "runtime")
LAZY = ("compress/cli/", "compress/quantization/registry.py", "compress/quantization/backends/", "compress/zoo/__init__.py")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def room_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "compress" and len(parts) > 1 else parts[0]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str | None, level: int, here: str, is_package: bool) -> str:
    if not level:
        return module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def violations(path: Path, root: Path = ROOT) -> list[str]:
    here = _module_name(path, root)
    tree = ast.parse(path.read_text(), str(path))
    found = []
    modules: dict[str, str] = {}  # local name -> first-party module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _absolute(node.module, node.level, here, path.name == "__init__.py")
            if src.split(".")[0] not in PACKAGES or src == here:
                continue
            if room_of(src) != room_of(here) and src != room_of(src):
                found.append(f"{path.relative_to(root)}:{node.lineno}: imports from {src}, inside the room "
                             f"{room_of(src)}; import from {room_of(src)} (its __init__ names what others may use)")
            for a in node.names:
                if _private(a.name):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: imports private {a.name} from {src}")
                else:
                    modules[a.asname or a.name] = f"{src}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] not in PACKAGES:
                    continue
                if room_of(a.name) != room_of(here) and a.name != room_of(a.name):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: imports {a.name}, inside the room "
                                 f"{room_of(a.name)}; import from {room_of(a.name)}")
                if a.asname:
                    modules[a.asname] = a.name
    rel = path.relative_to(root).as_posix()
    if not rel.startswith(LAZY):
        top = {id(n) for n in tree.body}
        typing_only = {id(x) for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for x in ast.walk(n)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in PACKAGES
                    and id(node) not in top and id(node) not in typing_only):
                found.append(f"{rel}:{node.lineno}: imports {node.module} inside a function; import it at the top")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and _private(node.attr)):
            found.append(f"{path.relative_to(root)}:{node.lineno}: uses private {node.value.id}.{node.attr} "
                         f"of {modules[node.value.id]}")
    return found


def main() -> int:
    bad = [v for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py")) for v in violations(f)]
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
