"""A device profile skeleton from what `runtime/device_probe.py` found on a device (`compress devices probe`).

The ISA parsing and the rules that turn ISA features into quantization, pruning and session choices are the
ones the `host` profile uses (devices.host), applied to the device's /proc/cpuinfo instead of this machine's.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Optional

from compress.core import DeviceError
from devices import host
from devices import providers as ep_registry
from devices.loader import format_validation_error
from devices.schema import DeviceProfile, RemoteSpec


def profile_name(facts: dict[str, Any], spec: RemoteSpec) -> str:
    """A schema-valid name from the device's host name (else the address it was reached at)."""
    raw = str(facts.get("hostname") or spec.host).lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", raw).strip("-._")
    return name if name and name[0].isalnum() else f"device-{name}".rstrip("-") or "device"


def execution_providers(available: list[str]) -> list[dict[str, Any]]:
    """The device's EPs that profiles can name, in onnxruntime's own priority order; CPU always, last."""
    names = []
    for name in available:
        try:
            spec = ep_registry.resolve(name)
        except KeyError:
            continue  # e.g. AzureExecutionProvider: not a compute device
        if spec.ort_name != "CPUExecutionProvider" and spec.ort_name not in names:
            names.append(spec.ort_name)
    return [{"name": n} for n in [*names, "CPUExecutionProvider"]]


def profile_from_probe(facts: dict[str, Any], spec: RemoteSpec, name: Optional[str] = None) -> DeviceProfile:
    arch = host.normalize_arch(str(facts.get("machine") or ""))
    if arch not in ("x86_64", "arm64"):
        raise DeviceError(f"{facts.get('target', spec.host)} is {facts.get('machine') or 'an unknown architecture'}: device "
                          "profiles support x86_64 and arm64 (a 32-bit OS on a 64-bit board reports armv7l: install a 64-bit OS)")
    cpu = host.parse_cpuinfo(facts.get("cpuinfo") or "")
    cores = max(1, min(int(facts.get("cores") or facts.get("cpu_count") or 1), 1024))
    isa = list(cpu.isa)
    model = cpu.model or "unknown CPU"
    what = ", ".join(str(x) for x in (facts.get("board"), model, facts.get("os")) if x)
    data = {
        "name": name or profile_name(facts, spec),
        "description": f"{what}; probed over SSH",
        "arch": arch,
        "isa": isa,
        "cores": cores,
        "threads": cores,
        "execution_providers": execution_providers(list(facts.get("providers") or [])),
        "session_config": host.session_defaults(cores, cores),
        "quantization": host.quant_defaults(arch, isa).model_dump(exclude={"op_types"}),
        "pruning": {"channel_multiple": host.channel_multiple(arch, isa)},
        "int8_dot": host.int8_dot(isa),
        "remote": spec.model_dump(exclude_none=True),
    }
    try:
        return DeviceProfile.model_validate(data)
    except ValueError as e:  # --name that the schema refuses, mostly
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            raise DeviceError(format_validation_error("probed profile", e)) from None
        raise


def header_lines(facts: dict[str, Any]) -> list[str]:
    """Comment lines for the YAML: where and when it was probed, and what the profile cannot know."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ort = facts.get("onnxruntime")
    lines = [f"# probed from {facts.get('target')} on {when}",
             f"# {facts.get('os') or facts.get('system')} {facts.get('release') or ''}; Python {facts.get('python')} "
             f"({facts.get('python_executable')}); {facts.get('mem_total_mb') or '?'} MB RAM".rstrip()]
    if ort:
        lines.append(f"# onnxruntime {ort}: {', '.join(facts.get('providers') or []) or 'no providers'}; "
                     f"numpy {facts.get('numpy') or 'MISSING (the runner needs it)'}")
    else:
        lines.append(f"# onnxruntime is NOT importable there ({facts.get('onnxruntime_error') or 'not installed'}): install "
                     "onnxruntime and numpy on the device before profiling; the EPs below are CPU only")
    lines.append("# review before use: threads (all usable cores), opset, fp8, and the EP options of GPU/NPU providers")
    return lines
