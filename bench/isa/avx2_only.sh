#!/bin/sh
# Run a command as on an AVX2-only x86 host (no AVX-512, VNNI, AVX-VNNI or AMX), on an x86 machine that has them:
# onnxruntime, numpy and torch see the masked CPUID (cpuid_mask.c) and pick their AVX2 kernels, and
# /proc/cpuinfo lists the masked flags, so `--device host` detects an AVX2 host too. Needs Linux CPUID faulting
# (`cpuid_fault` in /proc/cpuinfo), a C compiler and root (a private mount namespace for /proc/cpuinfo).
#     sh bench/isa/avx2_only.sh .venv/bin/python bench/quant_int8.py
#     sh bench/isa/avx2_only.sh make demo DEMO_OUT=demo-avx2
# What it measures is this CPU's core running AVX2 code: not a Zen 3's timings, but the same kernels, on the
# same ISA; every figure taken with it says so.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if ! grep -qw cpuid_fault /proc/cpuinfo; then
    echo "avx2_only: this CPU or hypervisor has no CPUID faulting (cpuid_fault); run on a real AVX2-only host" >&2
    exit 3
fi
lib=${TMPDIR:-/tmp}/edge-compress-cpuid-mask-$(id -u).so
if [ ! -e "$lib" ] || [ "$here/cpuid_mask.c" -nt "$lib" ]; then
    cc -O2 -shared -fPIC -o "$lib.$$" "$here/cpuid_mask.c" && mv "$lib.$$" "$lib"
fi
cpuinfo=$(mktemp)
trap 'rm -f "$cpuinfo"' EXIT
# The model name says it too, so every report and bench line that names the CPU names the masking.
sed -E -e '/^flags/ s/ (avx512[a-z0-9_]*|avx_vnni[a-z0-9_]*|amx_[a-z0-9]*)\b//g' \
    -e '/^model name/ s/$/ [AVX-512, VNNI, AMX masked: AVX2 kernels]/' /proc/cpuinfo >"$cpuinfo"
export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
unshare -m sh -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$cpuinfo" "$@"
