#!/usr/bin/env python3
"""Build (once) and cache an aarch64 Python with onnxruntime and numpy, run on this machine under qemu.

The device-side runner (runtime/runner.py) is meant for ARM boards; this gives the test suite an aarch64
Linux to run it on without one, through user-mode emulation:

  - the emulator is Debian's `qemu-aarch64-static`, called directly (no binfmt_misc needed);
  - the sysroot is Debian's arm64 python3.X-minimal, libpython3.X-stdlib and libstdc++6 (plus their
    dependencies), fetched with a private apt configuration (its own state, cache and empty status file,
    the machine's own source lists) and unpacked with `dpkg-deb -x`; the machine's dpkg state is untouched;
  - onnxruntime and numpy are PyPI's aarch64 wheels, pinned to the versions installed next to this tool, so
    the emulated device runs the same onnxruntime as the host;
  - qemu passes the host's x86 /proc/cpuinfo through, which makes `import onnxruntime` crash on aarch64;
    an ARM-style cpuinfo is written to <sysroot>/proc/cpuinfo, which `-L <sysroot>` makes the emulated
    process read instead. (`-L` redirects every absolute path that exists under the sysroot, so keep models
    outside /usr, /etc, /lib and /var; /tmp and home directories are fine.)
  - Python inside the emulator cannot start subprocesses (no binfmt_misc): the runner stays one process.

Latency measured under emulation says nothing about any real device and must never be reported as one.

Usage:
    python tools/arm64_sysroot.py [--cache DIR] [--rebuild] [--verify] [--json]

Prints the path of a wrapper script that runs the aarch64 Python (`WRAPPER runner.py MODEL --config -`), or
with --json a document with the wrapper, the raw qemu command, its environment and the versions. Progress
goes to stderr. The cache (default $EDGE_COMPRESS_ARM64_CACHE, else ~/.cache/edge-compress/arm64) holds
one directory per (python, onnxruntime, numpy) key; a directory is only ever complete: it is built under a
temporary name and renamed into place, and one without a matching manifest is rebuilt.

Exit status: 0 ready, 1 the build failed (network, apt, pip), 2 usage or a missing host tool (qemu, apt).
Standard library only; Linux hosts with apt-get and dpkg-deb (Debian, Ubuntu).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

LAYOUT = 1  # bump when the directory layout or the wrapper changes: old caches are then rebuilt
QEMU = "qemu-aarch64-static"
INSTALL_QEMU = "apt-get install -y qemu-user-static"
WRAPPER_NAME = "python3-aarch64"
MANIFEST = "manifest.json"
ENV_CACHE = "EDGE_COMPRESS_ARM64_CACHE"
NOT_A_DEVICE = "latency under qemu user-mode emulation is not a device figure"

# What /proc/cpuinfo says on an arm64 kernel (a Neoverse-N1 core). The "model name" line is not one a real
# arm64 kernel writes; runner.py reports it as the processor, so emulated results say what they are.
CPUINFO_ENTRY = """processor\t: {n}
model name\t: QEMU user-mode emulation (aarch64), not a device
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""

SMOKE = r"""
import json, platform, sys
import numpy, onnxruntime
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                  "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__,
                  "providers": onnxruntime.get_available_providers()}))
"""


class BuildError(Exception):
    """The sysroot could not be built (exit status 1)."""


class UsageError(Exception):
    """Bad arguments or a missing host tool (exit status 2)."""


def log(msg: str) -> None:
    sys.stderr.write(f"arm64-sysroot: {msg}\n")
    sys.stderr.flush()


def default_cache() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge-compress" / "arm64"


def installed_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise UsageError(f"{dist} is not installed for {sys.executable}: run this tool with the project's "
                         f"virtualenv python, or pass --{dist} VERSION") from None


def find_qemu(given: str | None) -> str:
    qemu = shutil.which(given or QEMU)
    if qemu is None:
        raise UsageError(f"{given or QEMU} not found; install it with `{INSTALL_QEMU}` (Debian/Ubuntu, as root)")
    return os.path.abspath(qemu)


def run(cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run CMD; on failure raise BuildError with the tail of its output, which is where apt and pip say why."""
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        raise UsageError(f"{what}: {cmd[0]} not found (this tool needs a Debian-like host with apt-get and dpkg-deb)")
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: timed out after {timeout:.0f}s: {shlex.join(cmd)}") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------- apt


def apt_config(work: Path) -> Path:
    """A private apt: arm64 as the native architecture, its own lists/archives/status, the host's sources."""
    state, cache = work / "apt-state", work / "apt-cache"
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "apt-log").mkdir(exist_ok=True)
    (state / "status").write_text("")  # nothing installed: apt resolves the whole dependency closure
    lines = [
        'APT::Architecture "arm64";',
        'APT::Architectures { "arm64"; };',
        'APT::Install-Recommends "false";',
        'Acquire::Languages "none";',
        f'Dir::State "{state}";',
        f'Dir::State::status "{state / "status"}";',
        f'Dir::Cache "{cache}";',
        f'Dir::Log "{work / "apt-log"}";',
    ]
    if os.geteuid() == 0:
        lines.append('APT::Sandbox::User "root";')  # _apt may not reach a cache under /root
    conf = work / "apt.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def apt_env(conf: Path) -> dict[str, str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    env["APT_CONFIG"] = str(conf)
    return env


def pick_python(conf: Path, wanted: str, explicit: bool) -> str:
    """python3.X for the sysroot: the host's minor version when the archive has it, else the distro's default."""
    env = apt_env(conf)
    if _apt_has(env, f"python{wanted}-minimal"):
        return wanted
    if explicit:
        raise BuildError(f"the arm64 archive has no python{wanted}-minimal (sources: the host's apt lists)")
    out = run(["apt-cache", "depends", "python3-minimal"], "apt-cache depends python3-minimal", env=env)
    m = re.search(r"Depends:\s*python(3\.\d+)-minimal", out)
    if not m:
        raise BuildError(f"the arm64 archive has neither python{wanted}-minimal nor a python3-minimal to follow")
    log(f"python{wanted} is not in this archive; using python{m.group(1)}")
    return m.group(1)


def _apt_has(env: dict[str, str], pkg: str) -> bool:
    proc = subprocess.run(["apt-cache", "policy", pkg], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    m = re.search(r"Candidate:\s*(\S+)", proc.stdout)
    return proc.returncode == 0 and m is not None and m.group(1) != "(none)"


def fetch_debs(conf: Path, pyver: str) -> list[Path]:
    env = apt_env(conf)
    pkgs = [f"python{pyver}-minimal", f"libpython{pyver}-stdlib", "libstdc++6"]
    run(["apt-get", "install", "-y", "-q", "--download-only", "--no-install-recommends", *pkgs],
        "apt-get install --download-only " + " ".join(pkgs), env=env)
    debs = sorted((conf.parent / "apt-cache" / "archives").glob("*.deb"))
    if not any(d.name.startswith(f"python{pyver}-minimal_") for d in debs):
        raise BuildError(f"apt downloaded no python{pyver}-minimal package")
    return debs


def glibc_version(debs: list[Path]) -> tuple[int, int]:
    for d in debs:
        m = re.match(r"libc6_(?:\d+%3a)?(\d+)\.(\d+)", d.name)
        if m:
            return int(m.group(1)), int(m.group(2))
    raise BuildError("no libc6 among the downloaded packages; cannot tell which manylinux wheels fit")


# ------------------------------------------------------------------------------------------------- pip


def wheel_flags(pyver: str, glibc: tuple[int, int]) -> list[str]:
    """manylinux tags this sysroot's glibc satisfies, newest first (pip needs every one it may accept)."""
    flags = ["--only-binary=:all:", "--python-version", pyver, "--implementation", "cp"]
    for minor in range(glibc[1], 16, -1):
        flags += ["--platform", f"manylinux_{glibc[0]}_{minor}_aarch64"]
    return flags + ["--platform", "manylinux2014_aarch64"]


def fetch_wheels(work: Path, site: Path, pins: list[str], flags: list[str]) -> None:
    wheels = work / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run(pip + ["download", "--no-deps", "-d", str(wheels), *flags, *pins], "pip download " + " ".join(pins))
    run(pip + ["install", "--no-deps", "--no-index", "--find-links", str(wheels), "--target", str(site), *flags, *pins],
        "pip install --target (aarch64 wheels)")


# ------------------------------------------------------------------------------------------------ build


def key_for(pyver: str, ort: str, np: str) -> str:
    return f"py{pyver}-ort{ort}-np{np}-layout{LAYOUT}"


def wrapper_text(qemu: str, sysroot: Path, python: Path, site: Path) -> str:
    q = shlex.quote
    return (
        "#!/bin/sh\n"
        "# aarch64 Python under qemu user-mode emulation; written by tools/arm64_sysroot.py.\n"
        f"# {NOT_A_DEVICE}.\n"
        "unset PYTHONHOME\n"
        f"PYTHONPATH={q(str(site))}; export PYTHONPATH\n"
        "PYTHONNOUSERSITE=1; export PYTHONNOUSERSITE\n"
        f"exec {q(qemu)} -L {q(str(sysroot))} {q(str(python))} \"$@\"\n"
    )


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cpuinfo_text() -> str:
    return "".join(CPUINFO_ENTRY.format(n=n) for n in range(max(1, os.cpu_count() or 1)))


def smoke(qemu: str, sysroot: Path, python: Path, site: Path) -> dict[str, Any]:
    """Start the emulated Python and import onnxruntime: the step that crashes when anything is off."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    out = run([qemu, "-L", str(sysroot), str(python), "-c", SMOKE], "the emulated python's smoke test", env=env, timeout=300)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BuildError(f"the emulated python's smoke test printed no JSON: {out.strip()[-400:]!r}") from None


def build(cache: Path, key: str, qemu: str, pyver: str, pyver_explicit: bool, ort: str, np: str) -> Path:
    """Build into a temporary directory beside the final one, then rename it into place (the commit)."""
    final = cache / key
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache))
    try:
        t0 = time.monotonic()
        conf = apt_config(work)
        log("apt-get update (arm64, private state)")
        out = run(["apt-get", "update", "-q"], "apt-get update (arm64)", env=apt_env(conf))
        if not list((work / "apt-state" / "lists").glob("*_Packages*")):  # apt-get update exits 0 when offline
            tail = "\n".join([ln for ln in out.strip().splitlines() if ln.startswith(("W:", "E:"))][-6:])
            raise BuildError(f"apt-get update fetched no arm64 package lists (no access to the Debian archive "
                             f"named in /etc/apt/sources.list*?)\n{tail}")
        pyver = pick_python(conf, pyver, pyver_explicit)
        if pyver != key.split("-")[0][2:]:
            key = key_for(pyver, ort, np)
            final = cache / key
        log(f"downloading python{pyver} and its libraries for arm64")
        debs = fetch_debs(conf, pyver)
        sysroot = work / "sysroot"
        sysroot.mkdir()
        for deb in debs:
            run(["dpkg-deb", "-x", str(deb), str(sysroot)], f"dpkg-deb -x {deb.name}")
        python = sysroot / "usr" / "bin" / f"python{pyver}"
        if not python.is_file():
            raise BuildError(f"{python} missing after unpacking the packages")
        (sysroot / "proc").mkdir(exist_ok=True)
        (sysroot / "proc" / "cpuinfo").write_text(cpuinfo_text())
        glibc = glibc_version(debs)
        pins = [f"onnxruntime=={ort}", f"numpy=={np}"]
        log(f"downloading aarch64 wheels {' '.join(pins)} (cp{pyver.replace('.', '')}, glibc {glibc[0]}.{glibc[1]})")
        site = work / "site"
        fetch_wheels(work, site, pins, wheel_flags(pyver, glibc))
        log("smoke test: import onnxruntime under qemu")
        facts = smoke(qemu, sysroot, python, site)
        if facts.get("machine") != "aarch64" or facts.get("onnxruntime") != ort or facts.get("numpy") != np:
            raise BuildError(f"the emulated python reports {facts}, expected aarch64 with onnxruntime {ort}, numpy {np}")
        for tmp in ("apt-state", "apt-cache", "apt-log", "apt.conf", "wheels"):
            p = work / tmp
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        (work / "bin").mkdir()
        manifest = {
            "key": key, "layout": LAYOUT, "python_version": pyver, "onnxruntime": ort, "numpy": np,
            "glibc": f"{glibc[0]}.{glibc[1]}", "debs": [d.name for d in debs], "smoke": facts,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.monotonic() - t0, 1),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(work, 0o755)  # mkdtemp made it private; the cache may be shared (CI runners, other users)
        if final.exists():
            shutil.rmtree(final)  # stale or partial (no manifest, other layout): replaced whole
        os.rename(work, final)
        return final
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def load_manifest(final: Path, key: str) -> dict[str, Any] | None:
    """The cached directory's manifest when it is complete and for this key; None means rebuild."""
    try:
        manifest = json.loads((final / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key or manifest.get("layout") != LAYOUT:
        return None
    pyver = manifest.get("python_version")
    needed = [final / "sysroot" / "usr" / "bin" / f"python{pyver}", final / "sysroot" / "proc" / "cpuinfo",
              final / "site" / "onnxruntime" / "__init__.py", final / "site" / "numpy" / "__init__.py"]
    return manifest if all(p.is_file() for p in needed) else None


def ensure(cache: Path, qemu: str, pyver: str, pyver_explicit: bool, ort: str, np: str, rebuild: bool,
           verify: bool) -> dict[str, Any]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; a second caller then reuses its result
        for stale in cache.glob(".build-*"):  # left by a killed build (we hold the lock: nobody is building)
            shutil.rmtree(stale, ignore_errors=True)
        key = key_for(pyver, ort, np)
        final = cache / key
        manifest = None if rebuild else load_manifest(final, key)
        if manifest is None and not pyver_explicit:  # a fallback python from an earlier build counts too
            for other in sorted(cache.glob(f"py*-ort{ort}-np{np}-layout{LAYOUT}")):
                manifest = None if rebuild else load_manifest(other, other.name)
                if manifest is not None:
                    final = other
                    break
        built = manifest is None
        t0 = time.monotonic()
        if built:
            if final.exists():
                log(f"{final} is incomplete or stale: rebuilding")
            final = build(cache, key, qemu, pyver, pyver_explicit, ort, np)
            manifest = json.loads((final / MANIFEST).read_text())
        pyver = manifest["python_version"]
        sysroot, site = final / "sysroot", final / "site"
        python = sysroot / "usr" / "bin" / f"python{pyver}"
        wrapper = final / "bin" / WRAPPER_NAME
        text = wrapper_text(qemu, sysroot, python, site)
        if not wrapper.is_file() or wrapper.read_text() != text:  # qemu may have moved since the build
            wrapper.parent.mkdir(exist_ok=True)
            write_atomic(wrapper, text, 0o755)
        facts = manifest.get("smoke")
        if verify and not built:
            facts = smoke(qemu, sysroot, python, site)
    return {
        "wrapper": str(wrapper),
        "command": [qemu, "-L", str(sysroot), str(python)],
        "env": {"PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"},
        "sysroot": str(sysroot),
        "site": str(site),
        "python_version": pyver,
        "onnxruntime": manifest["onnxruntime"],
        "numpy": manifest["numpy"],
        "providers": (facts or {}).get("providers"),
        "built": built,
        "seconds": round(time.monotonic() - t0, 1),
        "note": NOT_A_DEVICE,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="arm64_sysroot.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None, help=f"cache directory (default ${ENV_CACHE}, else ~/.cache/edge-compress/arm64)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even when a complete cached sysroot exists")
    ap.add_argument("--verify", action="store_true", help="re-run the smoke test (import onnxruntime) on a cached sysroot")
    ap.add_argument("--json", action="store_true", help="print a JSON document instead of the wrapper's path")
    ap.add_argument("--python-version", default=None, help="aarch64 Python X.Y (default: this interpreter's, if the archive has it)")
    ap.add_argument("--onnxruntime", default=None, help="onnxruntime version (default: the one installed here)")
    ap.add_argument("--numpy", default=None, help="numpy version (default: the one installed here)")
    ap.add_argument("--qemu", default=None, help=f"the emulator (default: {QEMU} on PATH)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not sys.platform.startswith("linux"):
            raise UsageError("qemu user-mode emulation needs a Linux host")
        qemu = find_qemu(args.qemu)
        pyver = args.python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
        if not re.fullmatch(r"3\.\d+", pyver):
            raise UsageError(f"--python-version must look like 3.11 (got {pyver!r})")
        ort = args.onnxruntime or installed_version("onnxruntime")
        np = args.numpy or installed_version("numpy")
        info = ensure((args.cache or default_cache()).expanduser().resolve(), qemu, pyver, args.python_version is not None,
                      ort, np, args.rebuild, args.verify)
    except UsageError as e:
        log(f"error: {e}")
        return 2
    except BuildError as e:
        log(f"error: cannot build the aarch64 sysroot: {e}")
        return 1
    log(("built" if info["built"] else "reusing") + f" aarch64 python {info['python_version']} with onnxruntime "
        f"{info['onnxruntime']}, numpy {info['numpy']} ({info['seconds']}s); {NOT_A_DEVICE}")
    print(json.dumps(info, indent=2) if args.json else info["wrapper"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
