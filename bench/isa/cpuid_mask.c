/* Run a program as if the CPU had no AVX-512, VNNI or AMX: the x86 ISA of an AVX2-only host (Zen 3, Skylake client).
 *
 * Why: INT8 speed on x86 depends on which kernels onnxruntime's MLAS picks, and MLAS picks them from the CPUID
 * instruction (AVX2's VPMADDUBSW path vs AVX512-VNNI's VPDPBUSD). This lets an AVX-512 VNNI machine measure the
 * AVX2 kernels natively, at full speed, instead of guessing from another CPU's numbers. Linux's CPUID faulting
 * (arch_prctl ARCH_SET_CPUID; the kernel lists `cpuid_fault` in /proc/cpuinfo where the CPU or hypervisor has it)
 * turns every CPUID into SIGSEGV; the handler runs the real CPUID and clears the masked feature bits.
 *
 * Build and use (bench/isa/avx2_only.sh does both, and also hides the bits from /proc/cpuinfo):
 *     cc -O2 -shared -fPIC -o cpuid_mask.so cpuid_mask.c
 *     LD_PRELOAD=$PWD/cpuid_mask.so python ...
 * The fault setting is per thread, inherited by threads and forks, reset by execve (LD_PRELOAD sets it again).
 * CPUIDs run before this library's constructor (the dynamic loader's own, for glibc's memcpy) see the real CPU.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012

static int set_cpuid_faulting(int on) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

/* Leaf 7 subleaf 0 EBX: AVX512F(16) DQ(17) IFMA(21) PF(26) ER(27) CD(28) BW(30) VL(31). */
#define L7_EBX_MASK ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
/* ECX: VBMI(1) VBMI2(6) GFNI-AVX512 n/a, VNNI(11) BITALG(12) VPOPCNTDQ(14). */
#define L7_ECX_MASK ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
/* EDX: 4VNNIW(2) 4FMAPS(3) VP2INTERSECT(8) AMX-BF16(22) AVX512-FP16(23) AMX-TILE(24) AMX-INT8(25). */
#define L7_EDX_MASK ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))
/* Leaf 7 subleaf 1 EAX: AVX-VNNI(4) AVX512-BF16(5) AMX-FP16(21); EDX: AVX-VNNI-INT8(4) AVX10(19). */
#define L71_EAX_MASK ((1u << 4) | (1u << 5) | (1u << 21))
#define L71_EDX_MASK ((1u << 4) | (1u << 19))

static void on_sigsegv(int sig, siginfo_t *info, void *ctx_) {
    ucontext_t *ctx = (ucontext_t *)ctx_;
    greg_t *r = ctx->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    (void)info;
    if (ip[0] != 0x0F || ip[1] != 0xA2) { /* not CPUID: a real fault; let it crash as it would have */
        signal(sig, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    set_cpuid_faulting(0);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid_faulting(1);
    if (leaf == 7 && sub == 0) {
        b &= ~L7_EBX_MASK;
        c &= ~L7_ECX_MASK;
        d &= ~L7_EDX_MASK;
    } else if (leaf == 7 && sub == 1) {
        a &= ~L71_EAX_MASK;
        d &= ~L71_EDX_MASK;
    } else if (leaf == 0x24 || leaf == 0x1D || leaf == 0x1E) {
        a = b = c = d = 0; /* AVX10 and AMX tile leaves */
    }
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsegv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0 || set_cpuid_faulting(1) != 0) {
        fprintf(stderr, "cpuid_mask: CPUID faulting is not available here (no cpuid_fault in /proc/cpuinfo)\n");
        _exit(3);
    }
}
