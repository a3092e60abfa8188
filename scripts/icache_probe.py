#!/usr/bin/env python3
"""How long a multiprocessor takes to run code it has not run before (a diagnostic).

The decode step at batch 1 is a chain of short kernels; each multiprocessor runs each
kernel's code once per step. This probe separates what fetching that code costs from what
executing it costs: kernels of N straight-line FMUL instructions (an immediate each; eight
independent chains a thread, so warm execution issues about one instruction a cycle), each
timed per block by the global timer, run

  cold:  after an evictor kernel (other code, 64k instructions) and an L2 flush;
  l2:    after the evictor only (the code is then in L2, not in the multiprocessors' caches);
  warm:  right after the same kernel (its code still in the instruction caches, where it fits).

cold - warm is the fetch cost; (cold - warm) / KB of code is what each kilobyte of code on a
kernel's path costs. Two steps, since the GPU machine has no compiler:

  python3 scripts/icache_probe.py build DIR     # here: NVRTC (NSA_NVRTC_LIB or the usual paths) -> DIR/*.cubin
  python3 scripts/icache_probe.py run DIR       # on the GPU: the driver through ctypes, a table
"""
import ctypes
import os
import statistics
import sys

from probe_cuda import Driver, compile_cubin, nvrtc

SIZES = [0, 1024, 2048, 4096, 8192, 16384]
EVICT = 65536
BLOCKS, THREADS = 132, 128


def source(name, n):
    body = []
    for i in range(n):
        c = 1.0 + (i % 977) * 1e-7
        body.append(f"x{i % 8} = x{i % 8} * {c:.9e}f;")
    return (
        "__device__ __forceinline__ unsigned long long gt() { unsigned long long t; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t)); return t; }\n"
        f"extern \"C\" __global__ void __launch_bounds__({THREADS}) {name}(unsigned long long* out, float* sink, float a) {{\n"
        "  unsigned long long t0 = gt();\n"
        "  float x0 = a + threadIdx.x, x1 = x0 + 1.f, x2 = x0 + 2.f, x3 = x0 + 3.f, x4 = x0 + 4.f, x5 = x0 + 5.f, x6 = x0 + 6.f, x7 = x0 + 7.f;\n"
        + "\n".join("  " + b for b in body)
        + "\n  float s = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;\n"
        "  if (s == 123.25f) sink[threadIdx.x] = s;\n"
        "  __syncthreads();\n"
        "  if (threadIdx.x == 0) { out[2 * blockIdx.x] = t0; out[2 * blockIdx.x + 1] = gt(); }\n"
        "}\n"
    )


def build(d):
    lib = nvrtc()
    os.makedirs(d, exist_ok=True)
    for name, n in [(f"probe_{n}", n) for n in SIZES] + [("evict", EVICT)]:
        size = compile_cubin(lib, source(name, n), f"{d}/{name}.cubin")
        print(name, n, "instructions,", size, "bytes of cubin")


def text_bytes(data, name):
    """Size of the ELF section .text.<name> (the kernel's code) in a cubin."""
    import struct
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sec = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    stroff = sec[shstrndx][4]
    for s in sec:
        nm = data[stroff + s[0]:data.index(b"\0", stroff + s[0])].decode()
        if nm == ".text." + name:
            return s[5]
    return 0


def run(d):
    drv = Driver()
    cu, ck = drv.cu, drv.ck
    fns = {}
    code_kb = {}
    for name in [f"probe_{n}" for n in SIZES] + ["evict"]:
        fns[name], data = drv.function(f"{d}/{name}.cubin", name)
        code_kb[name] = text_bytes(data, name) / 1024.0
    out = ctypes.c_uint64()
    sink = ctypes.c_uint64()
    flush = ctypes.c_uint64()
    FLUSH = 256 << 20
    ck(cu.cuMemAlloc_v2(ctypes.byref(out), 16 * BLOCKS), "alloc")
    ck(cu.cuMemAlloc_v2(ctypes.byref(sink), 4 * THREADS), "alloc")
    ck(cu.cuMemAlloc_v2(ctypes.byref(flush), FLUSH), "alloc")

    def launch(name):
        a = ctypes.c_float(0.5)
        args = (ctypes.c_void_p * 3)(ctypes.cast(ctypes.pointer(out), ctypes.c_void_p), ctypes.cast(ctypes.pointer(sink), ctypes.c_void_p),
                                     ctypes.cast(ctypes.pointer(a), ctypes.c_void_p))
        ck(cu.cuLaunchKernel(fns[name], BLOCKS, 1, 1, THREADS, 1, 1, 0, None, args, None), f"launch {name}")

    def times():
        ck(cu.cuCtxSynchronize(), "sync")
        h = (ctypes.c_uint64 * (2 * BLOCKS))()
        ck(cu.cuMemcpyDtoH_v2(h, out, 16 * BLOCKS), "copy")
        return [(h[2 * i + 1] - h[2 * i]) / 1000.0 for i in range(BLOCKS)]

    reps = 7
    rows = []
    for n in SIZES:
        name = f"probe_{n}"
        res = {"cold": [], "l2": [], "warm": []}
        for _ in range(reps):
            ck(cu.cuMemsetD32_v2(flush, 1, FLUSH // 4), "flush")
            launch("evict")
            launch(name)
            res["cold"].append(times())
            launch("evict")
            launch(name)
            res["l2"].append(times())
            launch(name)
            res["warm"].append(times())
        row = [n, code_kb[name]]
        for k in ("cold", "l2", "warm"):
            means = [statistics.mean(t) for t in res[k][1:]]
            maxes = [max(t) for t in res[k][1:]]
            row += [statistics.median(means), statistics.median(maxes)]
        rows.append(row)
    print(f"{BLOCKS} blocks x {THREADS} threads; per block global-timer span, us (median over {reps - 1} reps of the block mean / max)")
    print("| FMULs | KB of code | cold mean | cold max | L2 mean | L2 max | warm mean | warm max | (cold - warm) us per KB | (L2 - warm) us per KB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = rows[0]
    for r in rows:
        kb = r[1]
        per_c = (r[2] - r[6] - (base[2] - base[6])) / (kb - base[1]) if r[0] else 0.0
        per_l = (r[4] - r[6] - (base[4] - base[6])) / (kb - base[1]) if r[0] else 0.0
        print(f"| {r[0]} | {kb:.0f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} | {per_c:.3f} | {per_l:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "run"):
        sys.exit(__doc__)
    (build if sys.argv[1] == "build" else run)(sys.argv[2])
