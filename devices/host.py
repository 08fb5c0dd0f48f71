"""What the machine running the tool can do, for the `host` profile and for reports.

Detection is best-effort and never raises: a missing /proc/cpuinfo or sysctl yields fewer ISA features,
which only makes the derived quantization and pruning choices more conservative. The parsing and the
rules that turn ISA features into quantization/pruning preferences are pure functions, so they are
tested with canned cpuinfo text from machines we do not have.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from devices.schema import QuantizationPrefs

# Canonical order of ISA features (the schema's order), so detected lists compare and print stably.
ISA_ORDER = [
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512", "vnni", "avx_vnni", "amx", "bf16",
    "neon", "dotprod", "i8mm", "fp16", "sve", "sve2",
]

# Linux x86 'flags' names -> schema feature names. Only features that change onnxruntime's kernel choice.
X86_FLAGS = {
    "sse4_2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512",
    "avx512_vnni": "vnni",
    "avx_vnni": "avx_vnni",
    "amx_int8": "amx",
    "avx512_bf16": "bf16",
}

# Linux aarch64 'Features' names -> schema feature names ('neon' is what 32-bit kernels report).
ARM_FEATURES = {
    "asimd": "neon",
    "neon": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "asimdhp": "fp16",
    "fphp": "fp16",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
}

# Arm Ltd. (implementer 0x41) 'CPU part' numbers: aarch64 cpuinfo has no model name, only these.
ARM_PARTS = {
    0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57",
    0xD08: "Cortex-A72", 0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1", 0xD0D: "Cortex-A77", 0xD40: "Neoverse-V1", 0xD41: "Cortex-A78",
    0xD42: "Cortex-A78AE", 0xD44: "Cortex-X1", 0xD46: "Cortex-A510", 0xD47: "Cortex-A710",
    0xD48: "Cortex-X2", 0xD49: "Neoverse-N2", 0xD4B: "Cortex-A78C", 0xD4F: "Neoverse-V2",
    0xD80: "Cortex-A520", 0xD81: "Cortex-A720", 0xD82: "Cortex-X4",
}

ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class CpuInfo:
    """What one /proc/cpuinfo text says: the model name and the schema's ISA features."""

    model: str = ""
    isa: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HostInfo:
    arch: str  # normalized: x86_64 / arm64, or the raw platform.machine() value when unsupported
    model: str
    isa: list[str]
    cores: int
    os: str


def normalize_arch(machine: str) -> str:
    """Map platform.machine() spellings onto the schema's Arch; unknown values pass through unchanged."""
    return ARCH_ALIASES.get(machine.strip().lower(), machine.strip())


def _ordered(features: Iterable[str]) -> list[str]:
    found = set(features)
    return [f for f in ISA_ORDER if f in found]


def _field_values(text: str, key: str) -> list[str]:
    """All values of 'key : value' lines (one per logical CPU), case-insensitive on the key."""
    out = []
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == key:
            out.append(value.strip())
    return out


def _arm_model(text: str) -> str:
    """Name an aarch64 core from 'CPU part' (all distinct parts, e.g. big.LITTLE), else 'Hardware'."""
    names: list[str] = []
    implementers = _field_values(text, "cpu implementer")
    for i, part in enumerate(_field_values(text, "cpu part")):
        try:
            num = int(part, 16)
        except ValueError:
            continue
        impl = implementers[i] if i < len(implementers) else "0x41"
        name = ARM_PARTS.get(num) if impl.lower() == "0x41" else None
        name = name or f"part {part} (implementer {impl})"
        if name not in names:
            names.append(name)
    if names:
        return " + ".join(names)
    hardware = _field_values(text, "hardware")
    return hardware[0] if hardware else ""


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse Linux /proc/cpuinfo text (x86 'flags' or ARM 'Features'); pure, for canned-text tests.

    Features are intersected across logical CPUs: on hybrid chips a kernel scheduled on the weaker core
    type must still run, so only what every core has counts.
    """
    models = _field_values(text, "model name")
    flag_lines = _field_values(text, "flags")
    if flag_lines:
        mapping, lines = X86_FLAGS, flag_lines
        model = models[0] if models else ""
    else:
        mapping, lines = ARM_FEATURES, _field_values(text, "features")
        model = _arm_model(text) or (models[0] if models else "")
    common: Optional[set[str]] = None
    for line in lines:
        feats = {mapping[tok] for tok in line.split() if tok in mapping}
        common = feats if common is None else common & feats
    return CpuInfo(model=model, isa=_ordered(common or ()))


def parse_cgroup_cpu_max(text: str) -> Optional[int]:
    """Cores allowed by a cgroup v2 'cpu.max' ('quota period' or 'max period'); None when unlimited.

    Containers often see every core in the affinity mask but are throttled to a quota; using more
    threads than the quota makes latency measurements jittery, not faster.
    """
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def usable_cores() -> int:
    """Cores this process may run on: affinity mask (else cpu_count), capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota = parse_cgroup_cpu_max(Path("/sys/fs/cgroup/cpu.max").read_text())
    except OSError:
        quota = None
    if quota is not None:
        cores = min(cores, quota)
    return max(1, min(cores, 1024))


def _sysctl(name: str) -> Optional[str]:
    """One `sysctl -n` value, or None when sysctl or the key is missing (never raises)."""
    try:
        res = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def _macos_cpu(arch: str) -> CpuInfo:
    """macOS has no /proc/cpuinfo; ask sysctl. Every arm64 Mac has NEON, dot product and FP16."""
    model = _sysctl("machdep.cpu.brand_string") or ""
    if arch == "arm64":
        isa = {"neon", "dotprod", "fp16"}
        for key, feat in (("hw.optional.arm.FEAT_I8MM", "i8mm"), ("hw.optional.arm.FEAT_BF16", "bf16")):
            if _sysctl(key) == "1":
                isa.add(feat)
        return CpuInfo(model=model, isa=_ordered(isa))
    words = " ".join(filter(None, [_sysctl("machdep.cpu.features"), _sysctl("machdep.cpu.leaf7_features")]))
    names = {w.lower().replace(".", "_") for w in words.split()}
    mac_map = {"sse4_2": "sse4_2", "avx1_0": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
               "avx512f": "avx512", "avx512vnni": "vnni"}
    return CpuInfo(model=model, isa=_ordered(mac_map[n] for n in names if n in mac_map))


def _numpy_cpu() -> CpuInfo:
    """Fallback (e.g. Windows): numpy's runtime CPU dispatch table knows the main SIMD extensions."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats  # numpy >= 2
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats  # type: ignore[no-redef]
        except ImportError:
            return CpuInfo(model=platform.processor())
    np_map = {"SSE42": "sse4_2", "AVX": "avx", "AVX2": "avx2", "FMA3": "fma", "F16C": "f16c",
              "AVX512F": "avx512", "AVX512_CLX": "vnni", "ASIMD": "neon", "ASIMDDP": "dotprod",
              "ASIMDHP": "fp16", "SVE": "sve"}
    return CpuInfo(model=platform.processor(), isa=_ordered(v for k, v in np_map.items() if feats.get(k)))


def _detect_cpu(arch: str) -> CpuInfo:
    if sys.platform.startswith("linux"):
        try:
            return parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
        except OSError:
            pass
    if sys.platform == "darwin":
        return _macos_cpu(arch)
    return _numpy_cpu()


@functools.lru_cache(maxsize=1)
def detect() -> HostInfo:
    """This machine, detected once per process (sysctl calls are not free)."""
    arch = normalize_arch(platform.machine())
    cpu = _detect_cpu(arch)
    return HostInfo(arch=arch, model=cpu.model or platform.processor() or "unknown", isa=list(cpu.isa),
                    cores=usable_cores(), os=f"{platform.system()} {platform.release()}".strip())


def quant_defaults(arch: str, isa: Iterable[str]) -> QuantizationPrefs:
    """onnxruntime's documented INT8 guidance for a CPU, as QuantizationPrefs.

    x86 VNNI (AVX512-VNNI / AVX-VNNI) multiplies u8 x s8 at full range. Without VNNI, the AVX2 path
    (VPMADDUBSW) saturates its 16-bit intermediate, so weights must use 7 bits (reduce_range). ARM64
    prefers S8S8, but U8S8 sometimes wins, so the quantizer is asked to time both on the device.
    """
    feats = set(isa)
    if arch == "arm64":
        return QuantizationPrefs(format="qdq", activation_type="int8", weight_type="int8", per_channel=True,
                                 reduce_range=False, try_signedness=True)
    has_vnni = bool(feats & {"vnni", "avx_vnni", "amx"})
    return QuantizationPrefs(format="qdq", activation_type="uint8", weight_type="int8", per_channel=True,
                             reduce_range=not has_vnni, try_signedness=False)


def channel_multiple(arch: str, isa: Iterable[str]) -> int:
    """Channel rounding for pruning: one full SIMD register of fp32 (AVX-512: 16, AVX2 / NEON: 8)."""
    feats = set(isa)
    if arch == "x86_64" and feats & {"avx512", "vnni", "amx"}:
        return 16
    if arch == "arm64" or "avx2" in feats:
        return 8
    return 4


def session_defaults(threads: int, cores: int) -> dict[str, str]:
    """onnxruntime session entries for a thread pool of `threads` on `cores` usable cores.

    When the pool takes every core, a spinning worker competes with everything else on the machine. On
    the project's shared 2-vCPU machines that made the p50 of one encoder flip between two levels
    (11.3 and 13.4 ms) from one second to the next with spinning on, and hold 13.2-13.6 ms with it off
    (measured interleaved; see bench/profile_repeatability.py). Stable figures are worth more there.
    """
    if threads >= cores:
        return {"session.intra_op.allow_spinning": "0"}
    return {}


def int8_dot(isa: Iterable[str]) -> bool:
    """Whether the CPU has INT8 dot-product instructions, the thing that makes INT8 pay on CPU."""
    return bool(set(isa) & {"vnni", "avx_vnni", "amx", "dotprod", "i8mm"})


def _onnxruntime_info() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception:  # noqa: BLE001 - a broken install must not break reports
        return {"onnxruntime": None, "onnxruntime_providers": []}
    return {"onnxruntime": ort.__version__, "onnxruntime_providers": list(ort.get_available_providers())}


def describe_host() -> dict[str, Any]:
    """A JSON-ready description of this machine, for reports that must say where numbers came from."""
    h = detect()
    return {
        "arch": h.arch,
        "cpu": h.model,
        "isa": list(h.isa),
        "cores": h.cores,
        "os": h.os,
        "python": platform.python_version(),
        **_onnxruntime_info(),
    }
