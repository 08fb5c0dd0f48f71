#!/usr/bin/env python3
"""Device-side probe: what this machine is, as one JSON document on stdout.

`compress devices probe --remote USER@HOST` pipes this file into the device's Python (`python3 -`), so it
must stay one file, Python 3.8 syntax, standard library only; onnxruntime is imported if it is there. The
host turns the facts into a device profile (devices/probed.py), reusing the host's cpuinfo parsing, so
the raw /proc/cpuinfo text travels back rather than a second copy of that logic.
"""

import json
import math
import os
import platform
import sys

SCHEMA = "edge-compress/probe/1"
MAX_CPUINFO = 1 << 20  # a 256-core server's cpuinfo is ~1 MB; more is not a CPU description


def _read(path):
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()
    except (OSError, IOError):
        return None


def usable_cores():
    """Cores this process may use: the affinity mask (else cpu_count), capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    text = _read("/sys/fs/cgroup/cpu.max")
    if text:
        parts = text.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                quota, period = int(parts[0]), int(parts[1])
                if quota > 0 and period > 0:
                    cores = min(cores, max(1, int(math.ceil(float(quota) / period))))
            except ValueError:
                pass
    return max(1, cores)


def os_name():
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return "{} {}".format(platform.system(), platform.release()).strip()


def board():
    """Single-board computers name the board in the device tree (e.g. 'Raspberry Pi 4 Model B Rev 1.4')."""
    text = _read("/proc/device-tree/model")
    return text.strip("\x00 \n") if text else None


def mem_total_mb():
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1]) // 1024
            except (IndexError, ValueError):
                return None
    return None


def onnxruntime_facts():
    try:
        import onnxruntime as ort
    except Exception as e:  # ImportError, or a broken native library
        return {"onnxruntime": None, "providers": [], "onnxruntime_error": "{}: {}".format(type(e).__name__, e)[:300]}
    try:
        providers = list(ort.get_available_providers())
    except Exception:
        providers = []
    return {"onnxruntime": getattr(ort, "__version__", None), "providers": providers, "onnxruntime_error": None}


def numpy_version():
    try:
        import numpy
    except Exception:
        return None
    return getattr(numpy, "__version__", None)


def main():
    cpuinfo = _read("/proc/cpuinfo")
    facts = {
        "schema": SCHEMA,
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "os": os_name(),
        "hostname": platform.node(),
        "board": board(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "cpuinfo": cpuinfo[:MAX_CPUINFO] if cpuinfo else None,
        "cpu_count": os.cpu_count(),
        "cores": usable_cores(),
        "mem_total_mb": mem_total_mb(),
        "numpy": numpy_version(),
    }
    facts.update(onnxruntime_facts())
    sys.stdout.write(json.dumps(facts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
