"""What the command line says about inputs before any model is loaded: `--input-shape` parsed, and the rule
that a model runs on shapes or on samples. No torch here, so the CLI can check flags at once."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from compress.core import UsageError

DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"}
_SHAPE_RE = re.compile(r"^(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)=)?(?P<dims>\d+(?:[,x]\d+)*)(?::(?P<dtype>[a-z0-9]+))?$")


@dataclass(frozen=True)
class ShapeArg:
    name: str | None
    shape: tuple[int, ...]
    dtype: str | None


def require_one_input_source(input_shapes: tuple[str, ...] | list[str], calib: str | None) -> None:
    """The model runs on shapes (random data) or on real samples, never on both or neither."""
    if bool(list(input_shapes)) == bool(calib):
        raise UsageError("give either --input-shape or --calib (exactly one)")


def shape_args(input_shape: str | Sequence[str]) -> tuple[str, ...]:
    """--input-shape as the Python API takes it: one NAME=SHAPE string or several."""
    return (input_shape,) if isinstance(input_shape, str) else tuple(input_shape)


def parse_input_shape(text: str) -> ShapeArg:
    """Parse `1,3,224,224`, `input_ids=1,128` or `input_ids=1,128:int64`."""
    m = _SHAPE_RE.match(text.strip().replace(" ", ""))
    if not m:
        raise UsageError(f"--input-shape {text!r}: expected [NAME=]D1,D2,...[:DTYPE], e.g. 1,3,224,224 or input_ids=1,128:int64")
    dims = tuple(int(d) for d in re.split(r"[,x]", m["dims"]))
    if any(d < 1 for d in dims) or any(d > 1_000_000 for d in dims):
        raise UsageError(f"--input-shape {text!r}: every dimension must be between 1 and 1000000")
    if math.prod(dims) > 2**31:
        raise UsageError(f"--input-shape {text!r}: {math.prod(dims)} elements is more than one input may hold")
    dtype = m["dtype"]
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--input-shape {text!r}: unknown dtype {dtype!r}; one of {', '.join(sorted(DTYPES))}")
    return ShapeArg(m["name"], dims, dtype)
