"""`--eval FILE.py:FN`: the user's own score of an ONNX model (accuracy on their labelled data, mAP, BLEU, ...).

Fidelity to fp32 needs no labels and is what the tools fall back on, but "top-1 agreement 98%" is not what a
user ships against: their metric is. FN receives the path of an ONNX model and returns one number, higher is
better. It may take a second parameter, `session_options`: the onnxruntime SessionOptions the model needs
(FP8 Q/DQ graphs only run at ORT_ENABLE_BASIC on CPU); a one-parameter FN gets the path alone.

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

from compress.errors import ModelError, UsageError
from compress.errors import first_line as _first_line
from compress.loading import load_option_function

EVAL_FORMS = "FILE.py:FUNCTION or package.module:FUNCTION (FUNCTION(model_path) returns a score, higher is better)"


class UserMetric:
    """The loaded --eval function, called with checks: one finite number back, or a one-line error."""

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
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise ModelError(f"--eval {self.spec} returned {type(score).__name__}; it must return one number") from None
        if not math.isfinite(value):
            raise ModelError(f"--eval {self.spec} returned {value} for {Path(path).name}; it must be a finite number")
        return value

    def bind(self, session_options: Optional[Any]) -> Callable[[Path], float]:
        """A one-argument scorer for a model format that needs these session options (None: the defaults)."""
        return lambda path: self(path, session_options=session_options)


def load_metric(spec: Optional[str]) -> Optional[UserMetric]:
    if not spec:
        return None
    return UserMetric(spec, load_option_function(spec, "--eval", EVAL_FORMS))
