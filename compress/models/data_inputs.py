"""What a data source must produce for a model (compress.data.ModelInputs): from a loaded PyTorch model (its
forward() names, --input-shape, its Hugging Face folder, timm's `pretrained_cfg`) or from an ONNX file (its
graph inputs, the folder it lies in)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable, Optional

from compress.core import UsageError
from compress.data import ModelInputs
from compress.models.loading import LoadedModel, load_model
from compress.models.onnx_inputs import onnx_model_inputs
from compress.models.shapes import parse_input_shape
from runtime import check_model


def model_inputs(loaded: LoadedModel, input_shapes: Iterable[str] = ()) -> ModelInputs:
    """What data must give a loaded model (an ONNX one's from its graph, --input-shape filling its free dims)."""
    if loaded.kind == "onnx":
        base = onnx_model_inputs(loaded.source)
        given = {s.name or base.names[0]: tuple(s.shape) for s in map(parse_input_shape, input_shapes)}
        return ModelInputs(names=base.names, required=base.required, dtypes=base.dtypes, folder=base.folder,
                           shapes={**base.shapes, **given}, decoder=base.decoder)
    shapes: dict[str, tuple[Optional[int], ...]] = {}
    dtypes: dict[str, str] = {}
    names = loaded.input_names
    for s in map(parse_input_shape, input_shapes):
        name = s.name or (names[0] if names else None)
        if name is not None:
            shapes[name] = tuple(s.shape)
            if s.dtype:
                dtypes[name] = s.dtype
    cfg: Any = getattr(loaded.module, "pretrained_cfg", None) or {}
    return ModelInputs(names=tuple(names), required=tuple(loaded.required_inputs), shapes=shapes, dtypes=dtypes,
                       folder=loaded.folder,
                       pretrained_cfg=dict(cfg) if isinstance(cfg, dict) else {})


def load_onnx_model(path: str | Path) -> LoadedModel:
    """An ONNX file as compress run takes it: no module (nothing to prune or export), its graph inputs as the
    inputs --calib and --input-shape name, all required."""
    p = Path(path).expanduser()
    check_model(p)
    got = onnx_model_inputs(p)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind) if n in got.required else inspect.Parameter(n, kind, default=None)
              for n in got.names]
    return LoadedModel(module=None, source=str(path), kind="onnx", params=params,  # type: ignore[arg-type]
                       generates=got.decoder)


def load_run_model(spec: str, weights: Optional[str] = None) -> LoadedModel:
    """MODEL as compress run and search take it: an ONNX file (--weights refused) or a PyTorch model."""
    if spec.strip().lower().endswith(".onnx"):
        if weights:
            raise UsageError(f"--weights loads a PyTorch model's state; {spec} is ONNX and holds its weights")
        return load_onnx_model(spec)
    return load_model(spec, weights)
