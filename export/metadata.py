"""The metadata that travels inside every ONNX file we write (metadata_props key `edge_compress`).

Later stages (profiler, quantizer, remote runner) read input specs and provenance from here instead of
reaching into the exporter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

KEY = "edge_compress"
SCHEMA = "edge-compress/onnx/1"


@dataclass
class InputSpec:
    """What a graph input looks like; travels in the ONNX metadata so the profiler feeds realistic data."""

    name: str
    shape: list[int]
    dtype: str
    low: float | None = None
    high: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def input_specs(example: dict[str, Any]) -> list[InputSpec]:
    """Shape, dtype and observed value range of each example input (torch tensors), for the metadata."""
    specs = []
    for name, t in example.items():
        arr = t.detach().float() if t.numel() else t
        low = float(arr.min()) if t.numel() else None
        high = float(arr.max()) if t.numel() else None
        specs.append(InputSpec(name, list(t.shape), str(t.dtype).removeprefix("torch."), low, high))
    return specs


def set_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Store meta as JSON under KEY, replacing an earlier entry."""
    keep = [p for p in model.metadata_props if p.key != KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key, entry.value = KEY, json.dumps({"schema": SCHEMA, **meta}, sort_keys=False)


def get_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    for p in model.metadata_props:
        if p.key == KEY:
            try:
                return json.loads(p.value)
            except json.JSONDecodeError:
                return None
    return None


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """Metadata of an ONNX file, without loading its weights."""
    return get_metadata(onnx.load(str(path), load_external_data=False))
