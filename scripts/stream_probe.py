#!/usr/bin/env python3
"""How fast the GPU's memory streams with no attention around it (a diagnostic).

The decode floor nsa-bench prints divides a step's bytes by a device-to-device copy's rate
(bytes read plus written, the best of 5 copies of 64 MiB). The decode kernels only read, so
what matters for them is the best rate a read-only stream reaches; scripts/l2_partition_probe.py
measured 3.1-3.8 TB/s for streams of bulk copies and of 16-byte loads claimed in groups from
a counter. This probe asks the plainest kernels the same question, so that a bound stated
against "the best read-only stream" rests on kernels with nothing else to do:

  read   a grid-stride loop of 16-byte loads, U independent loads a thread in flight, over
         a 2 GiB buffer (40x the L2), its words (pseudo-random, written
         by a hash kernel first) folded into one register; three cache
         operators: ld.global.cg (L2 only), ld.global.nc with L1::no_allocate and the
         256-byte L2 prefetch hint, ld.global.nc;
  pieces the buffer as 4 KB pieces handed to 256-thread blocks in address order, as one
         contiguous run a block (as the decode kernels read a page's rows) or in a random
         order, U pieces a block in flight, into registers or into shared memory by cp.async;
  copy   the same loop storing what it loads into a second buffer (read + write bytes);
  write  the same loop storing zeros (write bytes);
  memcpy cuMemcpyDtoD of 64 MiB (the benchmark's floor) and of 2 GiB (read + write bytes);
  launch one launch the size of a decode step's compressed launch (LAUNCHES: its blocks,
         each a contiguous run by cp.async), timed back to back: the ramp and the tail a
         launch of that size pays without any attention around it.

What it found on the H200 (docs/bench/stream-probe-calls2-4-2026-12-04-session38.txt): loads
stream at 4.5-4.6 TB/s (the 256-byte L2 prefetch hint costs ~9%), 4 KB pieces in any order
4.3-4.5 into registers or by cp.async, while the copy engine's streams (l2_partition_probe.py
step E and F on the same machines) reach 3.1-3.6: the decode kernels' tile copies moved
from the copy engine to cp.async on that evidence (docs/DECODE_NOTES.md variant 112). The
`launch` step (docs/bench/stream-probe-launch-calls3-5-2026-12-04-session39.txt): a bare launch
of the batch-16 / 64k compressed launch's shape (256 blocks of 512 KB) takes 32.7 us (4.1 TB/s),
of batch 64 / 128k's (1.07 GB in one, two or four splits a pair) 237-244 us (4.4-4.5 TB/s).

Each form over several block sizes and blocks per multiprocessor; each timing is three
passes over the buffer between two events, the best of five after a warm-up, in GB/s.
Two steps, since the GPU machine has no compiler:

  python3 scripts/stream_probe.py build DIR   # here: NVRTC -> DIR/stream.cubin
  python3 scripts/stream_probe.py run DIR     # on the GPU: the driver through ctypes, a table
  python3 scripts/stream_probe.py run DIR launch  # only the decode-sized launches (below)
  python3 scripts/stream_probe.py --self-test # the piece orders, no GPU (run by scripts/test.sh)
"""
import ctypes
import os
import random
import sys

from probe_cuda import Driver, compile_cubin, nvrtc

SRC = r"""
#define LD(OP) \
    template <int U> __device__ void rd_##OP(const uint4* a, long long n, unsigned* sink) { \
        const long long T = (long long)gridDim.x * blockDim.x; \
        unsigned acc = 0; \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += U * T) { \
            uint4 v[U]; \
            _Pragma("unroll") for (int k = 0; k < U; k++) { \
                const long long j = i + k * T; \
                if (j < n) asm volatile(OP_##OP : "=r"(v[k].x), "=r"(v[k].y), "=r"(v[k].z), "=r"(v[k].w) : "l"(a + j)); \
                else v[k] = make_uint4(0, 0, 0, 0); \
            } \
            _Pragma("unroll") for (int k = 0; k < U; k++) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w; \
        } \
        if (acc == 0x9e3779b9u) sink[0] = acc; /* keeps the loads (the fold is data-dependent) */ \
    }
#define OP_cg "ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
#define OP_nc256 "ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
#define OP_nc "ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
LD(cg)
LD(nc256)
LD(nc)
#define ENTRY(OP, U) \
    extern "C" __global__ void __launch_bounds__(1024) rd_##OP##_##U(const uint4* a, long long n, unsigned* sink) { rd_##OP<U>(a, n, sink); }
ENTRY(cg, 4) ENTRY(cg, 8) ENTRY(nc256, 4) ENTRY(nc256, 8) ENTRY(nc, 4) ENTRY(nc, 8)

// The buffer as 4 KB pieces (256 x 16 bytes, one a thread of a 256-thread block), block b
// reading pieces order[i * grid + b] for i = 0, 1, ...: U pieces in flight, either into
// registers (`pc`) or into a ring of U stages of shared memory by cp.async (`pa`, waiting for
// each piece as the next goes out), in the order the host lays out (address order, a
// contiguous run a block as the decode kernels read a page, or a random permutation).
template <int U> __device__ void pc(const uint4* a, const int* order, int np, unsigned* sink) {
    unsigned acc = 0;
    for (int i = blockIdx.x; i < np; i += U * gridDim.x) {
        uint4 v[U];
#pragma unroll
        for (int k = 0; k < U; k++) {
            const int j = i + k * gridDim.x;
            v[k] = j < np ? __ldcg(a + (long long)order[j] * 256 + threadIdx.x) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int k = 0; k < U; k++) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
extern "C" __global__ void __launch_bounds__(256) pc_4(const uint4* a, const int* o, int np, unsigned* s) { pc<4>(a, o, np, s); }
extern "C" __global__ void __launch_bounds__(256) pc_8(const uint4* a, const int* o, int np, unsigned* s) { pc<8>(a, o, np, s); }
template <int U> __device__ void pa(const uint4* a, const int* order, int np) {
    extern __shared__ uint4 ring[];  // U stages of 4 KB
    int k = 0;
    for (int i = blockIdx.x; i < np; i += gridDim.x, k = (k + 1) % U) {
        const unsigned dst = (unsigned)__cvta_generic_to_shared(ring + k * 256 + threadIdx.x);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(a + (long long)order[i] * 256 + threadIdx.x) : "memory");
        asm volatile("cp.async.commit_group;" ::: "memory");
        asm volatile("cp.async.wait_group %0;" :: "n"(U - 1) : "memory");
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
}
extern "C" __global__ void __launch_bounds__(256) pa_4(const uint4* a, const int* o, int np) { pa<4>(a, o, np); }
extern "C" __global__ void __launch_bounds__(256) pa_8(const uint4* a, const int* o, int np) { pa<8>(a, o, np); }

// One decode-sized launch: block b streams its own contiguous run of `run` bytes from `a`
// (run a multiple of 16 * blockDim.x) by cp.async into a ring of U stages of blockDim.x
// 16-byte pieces, as a compressed split streams its tiles; the launch's time is what the
// `launch` step measures.
template <int U> __device__ void lr(const uint4* a, long long run) {
    extern __shared__ uint4 ring[];
    const uint4* src = a + (long long)blockIdx.x * (run / 16) + threadIdx.x;
    const long long steps = run / 16 / blockDim.x;
    int k = 0;
    for (long long i = 0; i < steps; i++, k = k + 1 == U ? 0 : k + 1) {
        const unsigned dst = (unsigned)__cvta_generic_to_shared(ring + k * blockDim.x + threadIdx.x);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src + i * blockDim.x) : "memory");
        asm volatile("cp.async.commit_group;" ::: "memory");
        asm volatile("cp.async.wait_group %0;" :: "n"(U - 1) : "memory");
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
}
extern "C" __global__ void __launch_bounds__(256) lr_16(const uint4* a, long long run) { lr<16>(a, run); }
extern "C" __global__ void __launch_bounds__(256) lr_32(const uint4* a, long long run) { lr<32>(a, run); }

template <int U> __device__ void cp(const uint4* a, uint4* b, long long n) {
    const long long T = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += U * T) {
        uint4 v[U];
#pragma unroll
        for (int k = 0; k < U; k++)
            if (i + k * T < n) v[k] = __ldcg(a + i + k * T);
#pragma unroll
        for (int k = 0; k < U; k++)
            if (i + k * T < n) __stcg(b + i + k * T, v[k]);
    }
}
extern "C" __global__ void __launch_bounds__(1024) cp_4(const uint4* a, uint4* b, long long n) { cp<4>(a, b, n); }
extern "C" __global__ void __launch_bounds__(1024) cp_8(const uint4* a, uint4* b, long long n) { cp<8>(a, b, n); }
// Pseudo-random words (a hash of the index), so that no data pattern can make a stream cheaper.
extern "C" __global__ void __launch_bounds__(1024) fill(unsigned* b, long long n) {
    const long long T = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += T) {
        unsigned x = (unsigned)i * 0x9e3779b1u ^ (unsigned)(i >> 32);
        x ^= x >> 15; x *= 0x2c1b3c6du; x ^= x >> 12; x *= 0x297a2d39u; x ^= x >> 15;
        b[i] = x;
    }
}
extern "C" __global__ void __launch_bounds__(1024) wr(uint4* b, long long n) {
    const long long T = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += T) __stcg(b + i, make_uint4(0, 0, 0, 0));
}
"""

BUF = 2 << 30   # bytes a buffer: 40x the H200's L2
PASSES = 3      # passes over the buffer a timing
SHAPES = [(256, 8), (512, 4), (1024, 2), (256, 4), (512, 2), (1024, 1)]  # (threads a block, blocks a SM)


def build(d):
    os.makedirs(d, exist_ok=True)
    n = compile_cubin(nvrtc(), SRC, os.path.join(d, "stream.cubin"))
    print(f"{d}/stream.cubin: {n} bytes")


def piece_orders(npc, grid):
    """The pieces step's orders of `npc` pieces for `grid` blocks, block b reading piece
    order[i * grid + b] at its i-th step: address order (the blocks of a step on adjacent
    pieces), a contiguous run a block (the pieces past grid * (npc // grid) in address
    order), and a random permutation (seeded)."""
    runs = npc // grid
    return {"address order": list(range(npc)),
            "a run a block": [(j % grid) * runs + j // grid if j < runs * grid else j for j in range(npc)],
            "random": random.Random(1).sample(range(npc), npc)}


def self_test():
    """The orders without a GPU: each a permutation of the pieces, each block's run
    contiguous, address order's blocks on adjacent pieces at each step."""
    for npc, grid in ((1000, 7), (64, 8), (5, 8), (528 * 3 + 11, 528)):
        orders = piece_orders(npc, grid)
        for name, order in orders.items():
            assert sorted(order) == list(range(npc)), (name, npc, grid)
        runs = npc // grid
        for b in range(grid):
            mine = [orders["a run a block"][i * grid + b] for i in range(runs)]
            assert mine == list(range(b * runs, (b + 1) * runs)), (npc, grid, b)
        for i in range(npc // grid):
            step = orders["address order"][i * grid:(i + 1) * grid]
            assert step == list(range(i * grid, (i + 1) * grid)), (npc, grid, i)
    assert piece_orders(100, 3)["random"] == piece_orders(100, 3)["random"]  # the same order on every run
    print("stream_probe self-test: ok")


# The `launch` step's decode-sized launches: (what, blocks, bytes a block's run). The
# compressed launch of paper 128/128 (DK = DV = 128, bf16): 4,095 compressed tokens a
# (row, KV head) at 64k, 512 bytes each, K and V; batch 16 has 64 pairs in four splits
# (256 blocks); batch 64 at 128k has 256 pairs of ~4 MB, in one, two or four splits (at most
# two 128-thread blocks run a multiprocessor in the engine; here up to three fit).
LAUNCHES = [("batch 16 / 64k compressed (64 pairs x 4 splits)", 256, 512 << 10),
            ("batch 16 / 128k compressed", 256, 1 << 20),
            ("batch 64 / 128k compressed, one split a pair", 256, 4 << 20),
            ("batch 64 / 128k compressed, two splits a pair", 512, 2 << 20),
            ("batch 64 / 128k compressed, four splits a pair", 1024, 1 << 20),
            ("batch 1 / 64k compressed (4 pairs x 33 splits)", 132, 64 << 10)]


def best_ms(drv, go, reps=1):
    """The best of five timings (ms) of `reps` calls of `go`, after one warm-up call."""
    go()
    drv.sync()
    return min(drv.timed_ms(lambda: [go() for _ in range(reps)]) for _ in range(5))


def launch_rows(drv, cubin, a, sink, nsm):
    """Decode-sized launches, each block a contiguous run (LAUNCHES), 128 threads a block as
    the decode kernels run, U = 16 or 32 pieces of 2 KB in flight a block; 20 launches back
    to back over disjoint regions of the buffer (no launch reads what the L2 kept from the
    one before), the mean time a launch, against the bytes at the 4.5 TB/s of a long stream."""
    N = 20

    def per_launch_us(nb, launch):
        """Mean us of N back-to-back `launch(region_address)` calls over disjoint regions of
        `nb` bytes (best of 5, after one warm-up round)."""
        regions = max(1, min(N, BUF // nb))
        addrs = [a.value + (i % regions) * nb for i in range(N)]
        return best_ms(drv, lambda: [launch(x) for x in addrs]) * 1e3 / N

    rows = []
    for u in (16, 32):
        f, _ = drv.function(cubin, f"lr_{u}")
        drv.set_smem(f, u * 2048)
        for what, grid, run in LAUNCHES:
            us = per_launch_us(grid * run, lambda x: drv.launch(f, grid, 128, [ctypes.c_uint64(x), ctypes.c_longlong(run)], smem=u * 2048))
            rows.append((what, u, grid, grid * run, us))
    # The same bytes by the grid-stride loop of 16-byte loads (1024 threads, 2 blocks a SM):
    # what a launch of that size reaches with no runs or stages at all.
    f, _ = drv.function(cubin, "rd_cg_8")
    for what, grid, run in LAUNCHES:
        nb = grid * run
        us = per_launch_us(nb, lambda x: drv.launch(f, 2 * nsm, 1024, [ctypes.c_uint64(x), ctypes.c_longlong(nb // 16), ctypes.c_uint64(sink.value)]))
        rows.append((what + ", grid-stride loads", 8, 2 * nsm, nb, us))
    print("| launch | pieces in flight a block | blocks | MB | us a launch | GB/s | us at 4.5 TB/s |")
    print("|---|---|---|---|---|---|---|")
    for what, u, grid, nb, us in rows:
        print(f"| {what} | {u} | {grid} | {nb / 1e6:.1f} | {us:.1f} | {nb / us / 1e3:.0f} | {nb / 4.5e6:.1f} |")


def run(d, steps=("all",)):
    drv = Driver()
    nsm = drv.attribute(16)  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    name = ctypes.create_string_buffer(128)
    drv.ck(drv.cu.cuDeviceGetName(name, 128, drv.dev), "name")
    cubin = os.path.join(d, "stream.cubin")
    a, b, sink = drv.alloc(BUF), drv.alloc(BUF), drv.alloc(64)
    fill, _ = drv.function(cubin, "fill")
    for p in (a, b):
        drv.launch(fill, 4 * nsm, 1024, [ctypes.c_uint64(p.value), ctypes.c_longlong(BUF // 4)])
    drv.ck(drv.cu.cuMemsetD8_v2(sink, 0, ctypes.c_size_t(64)), "memset")
    drv.sync()
    n16 = BUF // 16
    if "launch" in steps or "all" in steps:
        launch_rows(drv, cubin, a, sink, nsm)
    if "all" not in steps:
        return

    def best(go, nbytes):
        return PASSES * nbytes / best_ms(drv, go, PASSES) / 1e6  # GB/s

    print(f"GPU: {name.value.decode()}, {nsm} SMs; buffer {BUF >> 20} MiB, {PASSES} passes a timing, best of 5")
    rows = []
    for op in ("cg", "nc256", "nc"):
        for u in (4, 8):
            f, _ = drv.function(cubin, f"rd_{op}_{u}")
            for thr, per in SHAPES:
                args = [ctypes.c_uint64(a.value), ctypes.c_longlong(n16), ctypes.c_uint64(sink.value)]
                rows.append((f"read {op} U={u}", thr, per, best(lambda: drv.launch(f, per * nsm, thr, args), BUF)))
    # The piece orders (4 KB pieces; `grid` blocks of 256 threads): address order, a
    # contiguous run a block, a random permutation.
    npc = BUF // 4096
    order_d = drv.alloc(npc * 4)
    pc = {u: drv.function(cubin, f"pc_{u}")[0] for u in (4, 8)}
    pa = {u: drv.function(cubin, f"pa_{u}")[0] for u in (4, 8)}
    for u, f in pa.items():
        drv.set_smem(f, u * 4096)
    for per in (4, 8):
        grid = per * nsm
        for oname, order in piece_orders(npc, grid).items():
            drv.ck(drv.cu.cuMemcpyHtoD_v2(order_d, (ctypes.c_int * npc)(*order), ctypes.c_size_t(npc * 4)), "h2d")
            for u in (4, 8):
                args = [ctypes.c_uint64(a.value), ctypes.c_uint64(order_d.value), ctypes.c_int(npc), ctypes.c_uint64(sink.value)]
                rows.append((f"4 KB pieces, {oname}, loads U={u}", 256, per, best(lambda: drv.launch(pc[u], grid, 256, args), BUF)))
                args = [ctypes.c_uint64(a.value), ctypes.c_uint64(order_d.value), ctypes.c_int(npc)]
                rows.append((f"4 KB pieces, {oname}, cp.async U={u}", 256, per,
                             best(lambda: drv.launch(pa[u], grid, 256, args, smem=u * 4096), BUF)))
    for u in (4, 8):
        f, _ = drv.function(cubin, f"cp_{u}")
        for thr, per in SHAPES[:3]:
            args = [ctypes.c_uint64(a.value), ctypes.c_uint64(b.value), ctypes.c_longlong(n16)]
            rows.append((f"copy kernel U={u} (r+w)", thr, per, best(lambda: drv.launch(f, per * nsm, thr, args), 2 * BUF)))
    f, _ = drv.function(cubin, "wr")
    for thr, per in SHAPES[:3]:
        args = [ctypes.c_uint64(b.value), ctypes.c_longlong(n16)]
        rows.append(("write kernel", thr, per, best(lambda: drv.launch(f, per * nsm, thr, args), BUF)))
    for nb in (64 << 20, BUF):
        go = lambda nb=nb: drv.ck(drv.cu.cuMemcpyDtoD_v2(b, a, ctypes.c_size_t(nb)), "dtod")
        rows.append((f"cuMemcpyDtoD {nb >> 20} MiB (r+w)", 0, 0, best(go, 2 * nb)))
    print("| form | threads a block | blocks a SM | GB/s |")
    print("|---|---|---|---|")
    for form, thr, per, gbs in rows:
        print(f"| {form} | {thr or '-'} | {per or '-'} | {gbs:.0f} |")
    for kind in ("read", "4 KB pieces, address", "4 KB pieces, a run", "4 KB pieces, random", "copy kernel", "write", "cuMemcpyDtoD 64"):
        sel = [r for r in rows if r[0].startswith(kind)]
        top = max(sel, key=lambda r: r[3])
        print(f"best {kind}: {top[3]:.0f} GB/s ({top[0]}, {top[1]} x {top[2]})")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    if len(sys.argv) < 3 or sys.argv[1] not in ("build", "run") or (sys.argv[1] == "build" and len(sys.argv) != 3):
        sys.exit(__doc__)
    if sys.argv[1] == "build":
        build(sys.argv[2])
    else:
        run(sys.argv[2], tuple(sys.argv[3:]) or ("all",))
