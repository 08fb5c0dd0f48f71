"""The one way this package opens an onnxruntime session on the host.

Every session here is quiet (onnxruntime's warnings about unused initializers and the like are for its own
developers, not our users), names its optimisation level in words, and pins threads the same way the
profiler does (intra-op N, inter-op 1). Device sessions are built by runtime/runner.py on the device itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx

CPU = ("CPUExecutionProvider",)

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def session_options(*, level: str | None = None, threads: int | None = None,
                    config: Mapping[str, str] | None = None, optimized_path: str | Path | None = None,
                    profile_prefix: str | None = None) -> Any:
    """onnxruntime SessionOptions with our defaults. level: disable/basic/extended/all (onnxruntime's default,
    all, when None); threads: intra-op threads, inter-op then 1; config: session config entries."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if level is not None:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return so


def session(model: str | Path | bytes | onnx.ModelProto, options: Any = None, *,
            providers: Sequence[Any] = CPU, **option_kw: Any) -> Any:
    """An InferenceSession on a path, serialized bytes or a ModelProto; `options` (SessionOptions) or the
    keywords of session_options(); the CPU provider unless told otherwise."""
    import onnxruntime as ort

    if options is None:
        options = session_options(**option_kw)
    elif option_kw:
        raise TypeError("give SessionOptions or session_options() keywords, not both")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src if isinstance(src, bytes) else str(src), options, providers=list(providers))
