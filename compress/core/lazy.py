"""A room's public names, imported when first used.

Each subpackage's __init__ lists what other rooms may use, and nothing else is imported across rooms (tools/
house_rules.py checks it). Importing those names eagerly would make every room as slow to import as its
heaviest module: `compress --help` went from 0.2 s to 2.4 s when compress.core pulled in onnx and
compress.models pulled in torch. So an __init__ declares its names here and each is imported on first access
(PEP 562 module __getattr__), and `from compress.models import load_model` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, table: dict[str, list[str]], modules: tuple[str, ...] = ()
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """(__all__, __getattr__, __dir__) for PACKAGE: `table` maps a submodule to the names it gives out;
    `modules` are submodules given out whole. A name given out must not also be a submodule's name: once that
    submodule is imported, Python sets the package attribute to the module and the name would no longer be
    looked up here."""
    where = {name: sub for sub, names in table.items() for name in names}
    clash = sorted((set(where) - set(modules)) & set(table) | (set(where) & set(modules)))
    if clash:
        raise ImportError(f"{package}: {', '.join(clash)} is both a submodule and a name given out")
    public = sorted(set(where) | set(modules), key=str.lower)

    def __getattr__(name: str) -> Any:
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        sub = where.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{sub}"), name)

    def __dir__() -> list[str]:
        return public

    return public, __getattr__, __dir__
