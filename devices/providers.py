"""The one registry of onnxruntime execution providers that device profiles may name.

Profiles use the short key (`cpu`, `tensorrt`, ...) or onnxruntime's own name; both resolve here, so a
typo in a profile is caught when the YAML loads, not when a session is built on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProviderSpec:
    key: str
    ort_name: str
    hardware: str  # what runs the kernels: cpu, gpu, npu
    package: str  # the onnxruntime distribution that ships it, for error messages
    default_options: dict[str, Any] = field(default_factory=dict)


PROVIDERS: dict[str, ProviderSpec] = {
    p.key: p
    for p in [
        ProviderSpec("cpu", "CPUExecutionProvider", "cpu", "onnxruntime"),
        ProviderSpec("xnnpack", "XnnpackExecutionProvider", "cpu", "onnxruntime (built with --use_xnnpack)"),
        ProviderSpec("dnnl", "DnnlExecutionProvider", "cpu", "onnxruntime-dnnl"),
        ProviderSpec("openvino", "OpenVINOExecutionProvider", "cpu", "onnxruntime-openvino"),
        ProviderSpec("acl", "ACLExecutionProvider", "cpu", "onnxruntime (built with --use_acl)"),
        ProviderSpec("cuda", "CUDAExecutionProvider", "gpu", "onnxruntime-gpu"),
        ProviderSpec("tensorrt", "TensorrtExecutionProvider", "gpu", "onnxruntime-gpu (with TensorRT libraries)"),
        ProviderSpec("coreml", "CoreMLExecutionProvider", "npu", "onnxruntime (macOS arm64 wheel)"),
        ProviderSpec("qnn", "QNNExecutionProvider", "npu", "onnxruntime-qnn"),
        ProviderSpec("nnapi", "NnapiExecutionProvider", "npu", "onnxruntime-android"),
        ProviderSpec("dml", "DmlExecutionProvider", "gpu", "onnxruntime-directml"),
    ]
}

_BY_ORT_NAME = {p.ort_name.lower(): p for p in PROVIDERS.values()}


def resolve(name: str) -> ProviderSpec:
    """Look a provider up by short key or onnxruntime name, case-insensitively; KeyError if unknown."""
    low = name.strip().lower()
    if low in PROVIDERS:
        return PROVIDERS[low]
    if low in _BY_ORT_NAME:
        return _BY_ORT_NAME[low]
    raise KeyError(name)


def known_names() -> list[str]:
    return sorted(PROVIDERS)
