"""Declared schema of a device profile (one YAML file per target device).

Unknown fields are errors (extra="forbid") so that a misspelt key never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from devices import providers

Arch = Literal["x86_64", "arm64"]
# ISA features that change which kernels onnxruntime picks (and so what quantization pays).
IsaFeature = Literal[
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512", "vnni", "avx_vnni", "amx", "bf16",
    "neon", "dotprod", "i8mm", "fp16", "sve", "sve2",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExecutionProvider(_Strict):
    """One onnxruntime execution provider, in the profile's priority order, with its provider options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            return providers.resolve(v).ort_name
        except KeyError:
            raise ValueError(f"unknown execution provider {v!r}; known: {', '.join(providers.known_names())}") from None


class QuantizationPrefs(_Strict):
    """What INT8 looks like on this device, following onnxruntime's guidance per CPU family.

    x86 with VNNI: U8S8 QDQ, no reduce_range. x86 without VNNI (AVX2/AVX-512F): U8S8 with reduce_range,
    since VPMADDUBSW saturates. ARM64: S8S8 QDQ, but U8S8 is sometimes faster, so `try_signedness` asks the
    quantizer to time both on the device and keep the faster.
    """

    format: Literal["qdq", "qoperator"] = "qdq"
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    try_signedness: bool = False
    op_types: Optional[list[str]] = None  # None: the quantizer's own default set


class PruningPrefs(_Strict):
    """Channel counts are rounded to this multiple: odd widths fall off the SIMD fast path."""

    channel_multiple: int = Field(8, ge=1, le=256)


class RemoteSpec(_Strict):
    """How to reach the device over SSH (issue: remote profiling). Host keys are always verified."""

    host: str
    user: Optional[str] = None
    port: int = Field(22, ge=1, le=65535)
    identity: Optional[str] = None
    known_hosts: Optional[str] = None
    python: str = "python3"


class DeviceProfile(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str
    arch: Arch
    isa: list[IsaFeature] = Field(default_factory=list)
    cores: int = Field(ge=1, le=1024)
    threads: int = Field(ge=1, le=1024, description="intra-op threads used when profiling")
    execution_providers: list[ExecutionProvider] = Field(min_length=1)
    cpu_fallback: bool = Field(True, description="run on CPU when this onnxruntime lacks the profile's EPs")
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    session_config: dict[str, str] = Field(
        default_factory=dict,
        description="onnxruntime session config entries, e.g. session.intra_op.allow_spinning: '0'",
    )
    opset: int = Field(18, ge=13, le=23)
    generation_opset: int = Field(
        23, ge=13, le=23,
        description="opset of decoders exported with their KV cache (export --with-past, run --generate): at 23 "
                    "the exporter writes Attention, RotaryEmbedding and RMSNormalization, which onnxruntime (1.23 "
                    "and later) runs fused; set it to `opset` where the device's onnxruntime is older",
    )
    quantization: QuantizationPrefs = Field(default_factory=QuantizationPrefs)
    pruning: PruningPrefs = Field(default_factory=PruningPrefs)
    fp8: bool = Field(False, description="the device has FP8 (E4M3/E5M2) tensor hardware")
    int8_dot: bool = Field(False, description="the device has INT8 dot-product units (VNNI, SDOT/UDOT, NPU)")
    remote: Optional[RemoteSpec] = None
    detect: bool = Field(False, description="fill arch/isa/cores from the machine running the tool (the host profile)")
    source: Optional[Path] = Field(None, exclude=True, description="file the profile was loaded from; set by the loader")

    @property
    def provider_names(self) -> list[str]:
        return [ep.name for ep in self.execution_providers]
