"""The one registry that turns a device profile's QuantizationPrefs into onnxruntime quantizer arguments.

onnxruntime's own defaults are what leave users with INT8 models slower than FP32: `quantize_static` picks S8S8
per-tensor (1.2x over FP32 for the ResNet-18-style demo on this project's AVX512-VNNI machines, where U8S8
per-channel gives 3.2x), `quantize_dynamic` quantizes embedding Gathers and per-tensor weights (per-sentence
cosine to FP32 down to 0.96 on all-MiniLM-L6-v2). The right arguments depend on the device, which its profile
describes; everything that maps profile fields to quantizer arguments lives here so the choices are made once.

What each target wants (onnxruntime's guidance, and the EPs' documentation):
- x86 with VNNI / AMX: U8S8 QDQ, per-channel, no reduce_range (VPDPBUSD does not saturate).
- x86 without VNNI: U8S8 with reduce_range (7-bit weights), since VPMADDUBSW saturates its 16-bit sums.
- ARM64 CPUs: S8S8 QDQ, but U8S8 is sometimes faster, so `try_signedness` yields both as candidates, timed on
  the device by compress.quantization.int8.try_presets.
- TensorRT: explicit QDQ, signed and symmetric for activations and weights (TensorRT reads scales only).
- QNN (Hexagon HTP): U8U8 per-tensor QDQ with onnxruntime's get_qnn_qdq_config extra options; the HTP runs
  only quantized graphs, so every op it can take is quantized (the op set is not limited to Conv/MatMul).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from compress.core import UsageError
from devices import DeviceProfile

FAMILIES = ("cnn", "transformer", "generic")
SIGNEDNESS = ("U8S8", "S8S8", "U8U8", "S8U8")

# Transformers on CPU: only the weight GEMMs pay; quantizing LayerNorm/Softmax/Gelu/residual Adds adds Q/DQ
# work and error for no speed (measured on all-MiniLM-L6-v2: attention-score MatMuls in int8 made it no faster
# and lost accuracy), so the default set is the projection GEMMs and onnxruntime's fused Attention.
TRANSFORMER_CPU_OPS = ("MatMul", "Gemm", "Attention")

# Execution providers that run only (or best) explicit static QDQ graphs: dynamic quantization's contrib ops
# (DynamicQuantizeMatMul, MatMulIntegerToFloat) would fall back to the CPU there.
STATIC_QDQ_PROVIDERS = {"TensorrtExecutionProvider", "QNNExecutionProvider", "NnapiExecutionProvider",
                        "CoreMLExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider",
                        "OpenVINOExecutionProvider"}

_TYPES = {"uint8": "U8", "int8": "S8"}
_FROM_LETTERS = {"U8": "uint8", "S8": "int8"}


@dataclass(frozen=True)
class Preset:
    """Everything onnxruntime's quantizer needs that depends on the device (not on the model's data).

    `op_types` None means "the family default": onnxruntime's own default set on CNNs and generic
    graphs, TRANSFORMER_CPU_OPS for transformers on CPUs. A profile's explicit op_types always wins.
    """

    name: str
    device: str
    quant_format: str  # "qdq" | "qoperator"
    activation_type: str  # "uint8" | "int8"
    weight_type: str  # "int8" | "uint8"
    per_channel: bool
    reduce_range: bool
    op_types: Optional[tuple[str, ...]] = None
    extra_options: tuple[tuple[str, Any], ...] = ()
    family: Optional[str] = None
    target: str = "cpu"  # what runs the graph: cpu, or the accelerator EP that wants static QDQ
    notes: tuple[str, ...] = field(default_factory=tuple)
    ops_from_profile: bool = False  # op_types were set by the profile (kept for every family)

    @property
    def signedness(self) -> str:
        return _TYPES[self.activation_type] + _TYPES[self.weight_type]

    @property
    def static_only(self) -> bool:
        """True when the target runs only static QDQ graphs (accelerator EPs); CPUs may use dynamic."""
        return self.target != "cpu"

    def options(self) -> dict[str, Any]:
        return dict(self.extra_options)

    def for_family(self, family: str) -> "Preset":
        """This preset with the op types resolved for a model family (cnn, transformer, generic)."""
        if family not in FAMILIES:
            raise UsageError(f"model family {family!r}: one of {', '.join(FAMILIES)}")
        explicit = self.ops_from_profile or (self.op_types is not None and self.family is None)
        ops = self.op_types if explicit and self.op_types is not None else default_op_types(family, self.target)
        return replace(self, family=family, op_types=tuple(ops), ops_from_profile=explicit)

    def static_args(self) -> dict[str, Any]:
        """Keyword arguments for onnxruntime.quantization.quantize_static (less the model, paths and reader)."""
        from onnxruntime.quantization import QuantFormat

        return {
            "quant_format": QuantFormat.QDQ if self.quant_format == "qdq" else QuantFormat.QOperator,
            "activation_type": quant_type(self.activation_type),
            "weight_type": quant_type(self.weight_type),
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "op_types_to_quantize": list(self.op_types) if self.op_types is not None else None,
            "extra_options": self.options(),
        }

    def dynamic_args(self) -> dict[str, Any]:
        """Keyword arguments for quantize_dynamic: activations are always uint8 there (onnxruntime's limit)."""
        extra = {k: v for k, v in self.extra_options if k in _DYNAMIC_OPTIONS}
        extra.setdefault("MatMulConstBOnly", True)
        ops = [o for o in (self.op_types or TRANSFORMER_CPU_OPS) if o in _DYNAMIC_OPS]
        return {
            "weight_type": quant_type(self.weight_type),
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "op_types_to_quantize": ops,
            "extra_options": extra,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "device": self.device, "signedness": self.signedness, "format": self.quant_format,
            "activation_type": self.activation_type, "weight_type": self.weight_type,
            "per_channel": self.per_channel, "reduce_range": self.reduce_range,
            "op_types": list(self.op_types) if self.op_types is not None else None,
            "extra_options": self.options(), "family": self.family, "target": self.target, "notes": list(self.notes),
        }


# quantize_dynamic understands these ops and options; the rest belong to static QDQ.
_DYNAMIC_OPS = {"MatMul", "Attention", "Conv", "LSTM", "Gather", "EmbedLayerNormalization"}
_DYNAMIC_OPTIONS = {"MatMulConstBOnly", "WeightSymmetric", "EnableSubgraph", "ForceQuantizeNoInputCheck"}


def quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def default_op_types(family: str, target: str = "cpu") -> list[str]:
    """The op types quantized by default for a model family, spelled out so reports say what was quantized.

    CNNs and generic graphs get onnxruntime's own default (what quantize_static picks by itself), which quantizes
    Conv/Gemm/MatMul and the data-movement and elementwise ops between them, so activations stay 8-bit from one
    conv to the next. Transformers on a CPU get only the GEMMs (see TRANSFORMER_CPU_OPS); on accelerators, which
    run only quantized graphs, everything the registry knows.
    """
    if family == "transformer" and target == "cpu":
        return list(TRANSFORMER_CPU_OPS)
    from onnxruntime.quantization import registry

    # quantize_static's own default: the union of both registries (QDQ's lacks Add/Mul, which it still handles).
    return sorted(set(registry.QLinearOpsRegistry) | set(registry.QDQRegistry))


def _target(profile: DeviceProfile) -> str:
    """The first EP of the profile that wants static QDQ, else "cpu" (CPU-like EPs run onnxruntime's kernels)."""
    for name in profile.provider_names:
        if name in STATIC_QDQ_PROVIDERS:
            return name
    return "cpu"


def _extra_options(profile: DeviceProfile, target: str, activation: str, weight: str) -> dict[str, Any]:
    if target == "TensorrtExecutionProvider":
        # TensorRT's explicit quantization reads symmetric scales only (zero points must be 0).
        return {"ActivationSymmetric": True, "WeightSymmetric": True}
    if target == "QNNExecutionProvider":
        # As onnxruntime's get_qnn_qdq_config: shared DQ nodes duplicated by ORT, a floor on tiny ranges, and
        # weights symmetric only when signed.
        return {"MinimumRealRange": 0.0001, "DedicatedQDQPair": False, "QDQKeepRemovableActivations": False,
                "ActivationSymmetric": False, "WeightSymmetric": weight == "int8"}
    # CPUs: symmetric weights (zero point 0) are what MLAS's fast "ConvSym"/symmetric-GEMM kernels take (a
    # non-zero weight zero point cost 40% on a 3x3 conv here); activations stay asymmetric, since after a ReLU
    # a symmetric range would waste half of the 8 bits.
    return {"WeightSymmetric": True}


def preset_for(profile: DeviceProfile, signedness: str | None = None, family: str | None = None) -> Preset:
    """The preset a profile asks for; `signedness` ("U8S8", "S8S8", ...) overrides its activation/weight types.

    `family` resolves the op types (see Preset.for_family); without it they stay None (family default).
    """
    prefs = profile.quantization
    activation, weight = prefs.activation_type, prefs.weight_type
    if signedness is not None:
        key = signedness.upper()
        if key not in SIGNEDNESS:
            raise UsageError(f"signedness {signedness!r}: one of {', '.join(SIGNEDNESS)}")
        activation, weight = _FROM_LETTERS[key[:2]], _FROM_LETTERS[key[2:]]
    target = _target(profile)
    notes: list[str] = []
    if not profile.int8_dot and target == "cpu":
        notes.append("no INT8 dot-product instructions on this device: INT8 GEMMs widen to 16 bits and gain less")
    if prefs.reduce_range:
        notes.append("reduce_range: 7-bit weights, since the device's INT8 multiply-add saturates at full range")
    preset = Preset(
        name=f"{_TYPES[activation]}{_TYPES[weight]}-{prefs.format.upper()}" + ("-perchannel" if prefs.per_channel else "-pertensor"),
        device=profile.name,
        quant_format=prefs.format,
        activation_type=activation,
        weight_type=weight,
        per_channel=prefs.per_channel,
        reduce_range=prefs.reduce_range,
        op_types=tuple(prefs.op_types) if prefs.op_types else None,
        ops_from_profile=bool(prefs.op_types),
        extra_options=tuple(sorted(_extra_options(profile, target, activation, weight).items())),
        target="cpu" if target == "cpu" else target,
        notes=tuple(notes),
    )
    return preset.for_family(family) if family is not None else preset


def candidates(profile: DeviceProfile, family: str | None = None) -> list[Preset]:
    """The presets to try on a device: S8S8 and U8S8 when the profile says try_signedness, else its one preset."""
    prefs = profile.quantization
    if not prefs.try_signedness:
        return [preset_for(profile, family=family)]
    first = _TYPES[prefs.activation_type] + _TYPES[prefs.weight_type]
    order = [first] + [s for s in ("S8S8", "U8S8") if s != first]
    return [preset_for(profile, s, family=family) for s in order]
