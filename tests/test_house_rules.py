"""tools/house_rules.py (run by `make lint`) catches each rule's breach, and the tree itself keeps them."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import house_rules  # noqa: E402


def _write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_each_breach_is_named(tmp_path: Path) -> None:
    bad = _write(tmp_path, "compress/pipeline/x.py", (
        "from compress.quantization.int8 import _quiet\n"          # private name, and a room's inside
        "from compress.quantization.stage import quant_stage\n"    # a room's inside
        "import compress.pruning.structural as st\n"             # a room's inside
        "from compress.core import sessions\n"
        "def f():\n"
        "    from compress.report import write_markdown\n"     # inside a function
        "    return sessions._LEVELS, st\n"))                 # private attribute of another module
    found = house_rules.violations(bad, root=tmp_path)
    text = "\n".join(found)
    assert "imports private _quiet from compress.quantization.int8" in text
    assert "imports from compress.quantization.stage, inside the room compress.quantization" in text
    assert "imports compress.pruning.structural, inside the room compress.pruning" in text
    assert "imports compress.report inside a function" in text
    assert "uses private sessions._LEVELS" in text
    assert len(found) == 6  # _quiet is both private and behind the room's door


def test_same_room_and_light_modules_are_allowed(tmp_path: Path) -> None:
    ok = _write(tmp_path, "compress/quantization/y.py", (
        "from compress.quantization.int8 import quantize_int8\n"   # same room: any module
        "from compress.core import first_line as _first_line\n"  # a public name under a private alias
        "from compress.core import UsageError\n"))
    assert house_rules.violations(ok, root=tmp_path) == []
    cli = _write(tmp_path, "compress/cli/z.py", "def f():\n    from compress.pipeline import run_pipeline\n")
    assert house_rules.violations(cli, root=tmp_path) == []  # command modules import their rooms lazily


def test_the_tree_keeps_the_rules() -> None:
    assert house_rules.main() == 0
