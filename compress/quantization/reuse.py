"""What INT8 quantization prepares from one source model whatever the include/exclude sets, kept between the
re-quantizations of that model: the fallback, op selection and the float costs quantize the same fp32 model
again and again with another set of layers kept in float.

Each re-quantization otherwise repeated it all: on all-MiniLM-L6-v2 (90 MB, dynamic INT8, AMD EPYC 2 cores)
one took 9.2 s, of which pre-processing 2.7 s, the BERT fusions 1.2 s, the smoothing's activation ranges 1.2 s
and the fp32 reference outputs 0.3 s; a static model recalibrated every time (ORT's calibration pass over all
samples). None of these depends on which layers are quantized: the preprocessed model, the reference outputs,
the fp32 graph rewrites, the per-channel activation ranges for smoothing (per tensor), and the static
activation ranges (onnxruntime calibrates every tensor of a quantizable op type, whatever nodes_to_quantize
says, and its calibration cache holds them, per method and per graph).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx


def _identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def graph_digest(path: Path) -> str:
    """A short digest of the graph's structure (nodes, their inputs and outputs): two preprocessed models of one
    source differ only where a rewrite made them (the pooling moved ahead of an activation for kept layers)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    h = hashlib.sha256()
    for n in graph.node:
        h.update("\0".join([n.op_type, *n.input, ">", *n.output]).encode())
    return h.hexdigest()[:16]


@dataclass
class Prepared:
    """One source model's preparation for quantize_int8 (its `reuse=`), in `folder`, which the caller owns and
    removes. Everything is checked against the source's path, size and modification time: another source
    clears it."""

    folder: Path
    source: Optional[tuple[str, int, int]] = None
    prep: dict[bool, dict[str, Any]] = field(default_factory=dict)  # optimize -> preprocess's account
    reference: Optional[list[list[np.ndarray]]] = None
    equivalent: dict[str, tuple[bool, str]] = field(default_factory=dict)  # graph variant -> _equivalent's answer
    amax: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (graph variant, tensor) -> ranges

    def for_source(self, src: Path) -> "Prepared":
        ident = _identity(src)
        if ident != self.source:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            self.source, self.reference = ident, None
            self.prep.clear()
            self.equivalent.clear()
            self.amax.clear()
        return self

    def preprocessed(self, dst: Path, optimize: bool, make: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """`make(dst)` (preprocess) once per `optimize`; after that the kept copy (with its external data file,
        if any) is copied to `dst`'s folder."""
        kept = self.folder / f"pre-{'opt' if optimize else 'plain'}"
        if optimize not in self.prep:
            info = make(dst)
            kept.mkdir(parents=True, exist_ok=True)
            for f in dst.parent.iterdir():
                if f.name == dst.name or f.name == dst.name + ".data":
                    shutil.copy2(f, kept / f.name)
            self.prep[optimize] = info
            return dict(info)
        for f in kept.iterdir():
            shutil.copy2(f, dst.parent / f.name)
        return dict(self.prep[optimize])

    def ranges(self, model: Path, method: str) -> Path:
        """Where onnxruntime's calibration cache for this graph and method is kept."""
        return self.folder / f"ranges-{method}-{graph_digest(model)}.json"

    def graph_folder(self) -> Path:
        """Where fp32 graph rewrites are built once (they are rebuilt only when the file is missing)."""
        path = self.folder / "graphs"
        path.mkdir(parents=True, exist_ok=True)
        return path
