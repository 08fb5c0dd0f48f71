"""`--eval`: the user's own score of an ONNX model, higher is better, in one of two forms.

Fidelity to fp32 needs no labels and is what the tools fall back on, but "top-1 agreement 98%" is not what a
user ships against: their metric is.

- `--eval DATA.npz`: labelled data, the model's inputs (keys = input names) plus `y`. The score is top-1
  accuracy of the first output, or `--metric FILE.py:FN` with FN(outputs, y) -> float, where outputs is the
  list of the model's outputs over all samples (first axis = samples).
- `--eval FILE.py:FN`: FN receives the path of an ONNX model and returns one number (mAP, BLEU, ... computed
  however the user likes). It may take `session_options`: the onnxruntime SessionOptions the model needs
  (BASIC, where FP8 Q/DQ run as the ONNX spec says); a one-parameter FN gets the path alone.

    def accuracy(model_path, session_options=None):
        sess = onnxruntime.InferenceSession(model_path, session_options)
        ...
        return correct / total

With --eval, --tolerance is the largest allowed drop of that score from the fp32 model's (absolute: 0.01 is one
point of accuracy when the score is a fraction).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from compress.core import InputError, ModelError, RuntimeFailure, UsageError, sessions
from compress.core import first_line as _first_line
from compress.models import load_calib, load_option_function

EVAL_FORMS = ("DATA.npz (inputs plus labels 'y'), or FILE.py:FUNCTION / package.module:FUNCTION "
              "(FUNCTION(model_path) returns a score, higher is better)")
METRIC_FORMS = "FILE.py:FUNCTION or package.module:FUNCTION (FUNCTION(outputs, y) returns a score, higher is better)"
BATCH = 64  # samples per run when the model's batch axis is free


class Metric:
    """A score of an ONNX model file; `spec` says what it is in reports."""

    spec: str

    def __call__(self, path: str | Path, session_options: Optional[Any] = None) -> float:
        raise NotImplementedError

    def bind(self, session_options: Optional[Any]) -> Callable[[Path], float]:
        """A one-argument scorer for a model format that needs these session options (None: the defaults)."""
        return lambda path: self(path, session_options=session_options)


class UserMetric(Metric):
    """--eval FILE.py:FN: the loaded function, called with checks: one finite number back, or a one-line error."""

    def __init__(self, spec: str, fn: Callable[..., Any]) -> None:
        self.spec, self.fn = spec, fn
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # builtins and C functions: call them and see
            self.takes_options = False
            return
        try:
            sig.bind("model.onnx")
        except TypeError:
            raise UsageError(f"--eval {spec}: FUNCTION must be callable with the model path alone "
                             "(and may take session_options=)") from None
        self.takes_options = "session_options" in sig.parameters or any(
            p.kind == p.VAR_KEYWORD for p in sig.parameters.values())

    def __call__(self, path: str | Path, session_options: Optional[Any] = None) -> float:
        try:
            if self.takes_options:
                score = self.fn(str(path), session_options=session_options)
            else:
                score = self.fn(str(path))
        except Exception as e:
            raise ModelError(f"--eval {self.spec} raised {type(e).__name__} on {Path(path).name}: {_first_line(e)}") from e
        return _check_score(score, f"--eval {self.spec}", path)



def _check_score(score: Any, where: str, model: str | Path) -> float:
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise ModelError(f"{where} returned {type(score).__name__}; it must return one number") from None
    if not math.isfinite(value):
        raise ModelError(f"{where} returned {value} for {Path(model).name}; it must be a finite number")
    return value


class LabelledMetric(Metric):
    """--eval DATA.npz: the model run over labelled samples, scored by top-1 accuracy or --metric FN(outputs, y)."""

    def __init__(self, data_path: str, metric_spec: Optional[str] = None) -> None:
        data = load_calib(data_path)
        if "y" not in data:
            raise InputError(f"--eval {data_path}: no labels: the .npz needs a 'y' array next to the inputs")
        self.y = data.pop("y")
        if not data:
            raise InputError(f"--eval {data_path}: only labels; add the model's inputs (keys = input names)")
        self.inputs, self.data_path, self.metric_spec = data, data_path, metric_spec
        self.fn = load_option_function(metric_spec, "--metric", METRIC_FORMS) if metric_spec else None
        self.spec = f"{data_path} ({metric_spec or 'top-1 accuracy'})"

    def outputs(self, path: str | Path, session_options: Optional[Any] = None) -> list[np.ndarray]:
        try:
            sess = sessions.session(path, session_options)
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load {path}: {_first_line(e)}") from e
        names = [i.name for i in sess.get_inputs()]
        missing = [n for n in names if n not in self.inputs]
        if missing:
            raise InputError(f"--eval {self.data_path}: no array for input(s) {', '.join(missing)} "
                             f"(it has {', '.join(sorted(self.inputs))})")
        first = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
        fixed = isinstance(first, int) and first > 0  # a fixed batch axis is fed whole batches only
        step = first if fixed else BATCH
        n = len(self.y)
        chunks: list[list[np.ndarray]] = []
        for i in range(0, n - n % step if fixed else n, step):
            try:
                chunks.append(sess.run(None, {k: self.inputs[k][i:i + step] for k in names}))
            except Exception as e:
                raise RuntimeFailure(f"onnxruntime failed on --eval samples {i}..{i + step - 1}: {_first_line(e)}") from e
        if not chunks:
            raise InputError(f"--eval {self.data_path}: {n} samples, fewer than the model's fixed batch of {step}")
        return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]

    def __call__(self, path: str | Path, session_options: Optional[Any] = None) -> float:
        outs = self.outputs(path, session_options)
        y = self.y[: len(outs[0])]
        if self.fn is not None:
            try:
                score = self.fn(outs, y)
            except Exception as e:
                raise ModelError(f"--metric {self.metric_spec} raised {type(e).__name__}: {_first_line(e)}") from e
            return _check_score(score, f"--metric {self.metric_spec}", path)
        logits = outs[0]
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise UsageError(f"--eval {self.data_path}: top-1 accuracy needs [N, classes] outputs (got "
                             f"{list(logits.shape)}); pass --metric FILE.py:FN for other outputs")
        return float((logits.argmax(axis=1) == y.reshape(-1)).mean())



def load_metric(eval_spec: Optional[str], metric_spec: Optional[str] = None) -> Optional[Metric]:
    """--eval DATA.npz [--metric FILE.py:FN] or --eval FILE.py:FN; None without --eval."""
    if not eval_spec:
        if metric_spec:
            raise UsageError("--metric scores labelled data: give --eval DATA.npz with it")
        return None
    if eval_spec.lower().endswith(".npz"):
        return LabelledMetric(eval_spec, metric_spec)
    if metric_spec:
        raise UsageError("--metric goes with --eval DATA.npz; a --eval FILE.py:FN computes its score itself")
    return UserMetric(eval_spec, load_option_function(eval_spec, "--eval", EVAL_FORMS))
