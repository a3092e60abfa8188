#!/usr/bin/env python3
"""Whether a persistent grid can stream a decode step's compressed K/V in short items as fast
as one block a split does (a diagnostic for issue 12's batch-16 target).

The persistent decode form (docs/DECODE_NOTES.md, variants 125-129) cut the compressed branch
into items of a sixteenth of a (row, KV head) pair handed out by a device counter, and lost
1.5-2x: each item paid its prologue (the claim, the row, the page-table entries, Q: dependent
round trips at loaded-memory latency) with no copy in flight. A form that could reach the
target needs an item to cost its bytes only. This probe asks that of the memory system alone,
with nothing computed (or a spin standing for it): 128-thread blocks, a ring of U stages of CH bytes filled by a producer
warp (one bulk copy a stage by the copy engine, `cp.async.bulk`, or 16-byte `cp.async` by its 32
lanes: the copy engine streams slower, scripts/stream_probe.py) on mbarriers and released by
consumer warps (three, or two beside a scheduler warp, each taking every third or second stage
as a split's warps take every fourth tile), items
of `run` contiguous bytes claimed from a counter, and before each item's first copy a chain of D
dependent loads from random addresses of a second buffer (the item's prologue). Optionally the
consumers spin a number of cycles on each stage (the tile's math) and, at an item's end, meet
at a barrier and store the item's partial (its (m, l, o): the merge and the stores a compressed
split ends with). Three ways to switch items:

  restart    one thread claims, runs the chain and issues the copies; between items it
             waits until the consumers have released every stage (the ring drained), then
             claims the next (what the persistent form's items did);
  ahead      the same thread claims the next item when it starts the current one and runs
             the chain once the current item's copies are issued, while the ring still holds
             up to U stages of it;
  scheduler  a second warp claims and runs the chains, up to two items ahead, and hands
             (item, source) to the copy thread through a two-entry queue on mbarriers: the
             copy thread never waits on a chain.

Against the `launch` step of scripts/stream_probe.py (one block a split streaming its own run
by cp.async, 32.7 us for batch 16 / 64k's 134 MB on the H200) and the same ring with one item
a block. Each launch over a region of the buffer no earlier launch of the timing read; the
mean of 20 launches back to back, best of 5.

What it found on the H200 (docs/bench/persist-probe-and-timeline-call5-2026-12-05-session43.txt,
against a bare launch of 32.4 us in the same run; two blocks a SM): the ring with one item a
block 34.1-34.2 us (1.05x); items of 128 KB (a sixteenth of a pair) with a prologue of 3
dependent loads restart 39.1-40.6 us (1.21-1.25x), ahead 37.3-38.9, scheduler **35.0-35.7
(1.08-1.10x)**; of 64 KB restart 42.0-48.6 (1.30-1.50x), ahead 41.3-44.7, scheduler **35.3-35.5
(1.09x)**. So short items cost their bytes only when their claims and prologues run on a warp
of their own, ahead of the copies; three blocks a SM streamed no faster. (That run's consumer
warps each waited on every stage, with no math and no partials: commit 460d9f9's form.)

  python3 scripts/persist_probe.py build DIR   # here: NVRTC -> DIR/persist.cubin
  python3 scripts/persist_probe.py run DIR     # on the GPU: a table
  python3 scripts/persist_probe.py --self-test # the claim bookkeeping, no GPU (scripts/test.sh)
"""
import ctypes
import os
import sys

from probe_cuda import Driver, compile_cubin, nvrtc
from stream_probe import BUF, SRC as STREAM_SRC, best_ms

SRC = r"""
__device__ __forceinline__ unsigned sa(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mb_init(unsigned b, unsigned n) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(b), "r"(n) : "memory"); }
__device__ __forceinline__ void mb_expect(unsigned b, unsigned tx) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(b), "r"(tx) : "memory");
}
__device__ __forceinline__ void mb_arrive(unsigned b) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(b) : "memory"); }
// Labels inside a { } block are local to it in PTX, so every inlined copy may use the same.
__device__ __forceinline__ void mb_wait(unsigned b, unsigned parity) {
    asm volatile("{\n .reg .pred P;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n @!P bra WAIT;\n}" :: "r"(b), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk(unsigned dst, const char* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// A claim: atom.inc, whose result the thread reads only where it needs it (ptxas turns a
// one-thread atomicAdd, or an increment bounded at 2^32 - 1, into a warp-aggregated add with a
// shuffle of the result right after it; bounded at 2^31 - 1 it leaves it alone).
__device__ __forceinline__ unsigned claim(unsigned* ctr) {
    unsigned v;
    asm volatile("atom.global.inc.u32 %0, [%1], 0x7fffffff;" : "=r"(v) : "l"(ctr) : "memory");
    return v;
}
__device__ __forceinline__ unsigned ld_cg(const unsigned* p) {
    unsigned v;
    asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// The item's prologue: `deps` dependent loads at random places of `tab` (tmask + 1 words); the
// source address depends on the last one, so the first copy waits for the whole chain.
__device__ __forceinline__ const char* prologue(const char* a, long long run, unsigned item, const unsigned* tab, unsigned tmask, int deps) {
    unsigned x = item * 0x9e3779b1u;
    for (int d = 0; d < deps; d++) x = ld_cg(tab + ((x ^ (unsigned)d * 0x85ebca6bu) & tmask));
    return a + (long long)item * run + (deps > 0 && x == 0xffffffffu ? 16 : 0);
}

// mode 0 restart, 1 ahead, 2 scheduler (see the module's text); lds 0: each stage one bulk
// copy by lane 0 (the copy engine), 1: 16-byte cp.async by the producer warp's 32 lanes, each
// lane's completion counted on the stage's barrier (`cp.async.mbarrier.arrive.noinc`). Items:
// `nitems` runs of `run` bytes (a multiple of ch); claims count from `base` (the claims of
// earlier launches).
__device__ void pw(const char* a, long long run, unsigned nitems, unsigned* ctr, unsigned base,
                   const unsigned* tab, unsigned tmask, int deps, int mode, int lds, int U, unsigned ch,
                   int work, unsigned part, char* out) {
    extern __shared__ __align__(128) uint4 ring_w[];
    char* ring = (char*)ring_w;
    __shared__ __align__(8) unsigned long long full[16], empty[16], qfull[2], qempty[2];
    __shared__ int sitem[16];
    __shared__ int qitem[2];
    __shared__ const char* qsrc[2];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_cons = mode == 2 ? 2 : 1, ncons = (blockDim.x >> 5) - first_cons;
    if (threadIdx.x == 0) {
        for (int s = 0; s < U; s++) {
            // cp.async: the 32 lanes' completions, then lane 0's own arrival, whose release makes
            // its write of the stage's item visible to the consumers' acquiring wait (whether
            // the asynchronous arrivals release a thread's earlier writes is not documented).
            mb_init(sa(&full[s]), lds ? 33 : 1);
            mb_init(sa(&empty[s]), 1);
        }
        for (int s = 0; s < 2; s++) {
            mb_init(sa(&qfull[s]), 1);
            mb_init(sa(&qempty[s]), 1);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int nch = (int)(run / ch);
    if (warp == 0) {
        // The producer warp: lane 0 claims and runs the chains (the lanes wait with it, as a
        // warp whose lane 0 loads does); the copies by lane 0 or by every lane.
        int k = 0;  // fills so far: fill k uses stage k % U in phase (k / U) & 1
        auto stage_free = [&](int j) { mb_wait(sa(&empty[j % U]), ((j / U) & 1) ^ 1); };
        auto put = [&](unsigned item, const char* src) {
            for (int c = 0; c < nch; c++, k++) {
                const int s = k % U;
                stage_free(k);
                if (lane == 0) sitem[s] = (int)item;
                const unsigned dst = sa(ring + (long long)s * ch);
                const char* from = src + (long long)c * ch;
                if (lds) {
                    for (unsigned o = lane * 16; o < ch; o += 512)
                        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst + o), "l"(from + o) : "memory");
                    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(sa(&full[s])) : "memory");
                    if (lane == 0) mb_arrive(sa(&full[s]));
                } else if (lane == 0) {
                    mb_expect(sa(&full[s]), ch);
                    bulk(dst, from, ch, sa(&full[s]));
                }
            }
        };
        auto bcast = [&](unsigned v) { return __shfl_sync(0xffffffffu, v, 0); };
        if (mode == 2) {
            for (unsigned k = 0;; k++) {
                const unsigned q = k & 1, qp = (k >> 1) & 1;
                mb_wait(sa(&qfull[q]), qp);
                const int item = *(volatile int*)&qitem[q];
                const char* src = *(const char* volatile*)&qsrc[q];
                __syncwarp();
                if (lane == 0) mb_arrive(sa(&qempty[q]));
                if (item < 0) break;
                put((unsigned)item, src);
            }
        } else {
            unsigned item = bcast(lane == 0 ? claim(ctr) - base : 0);
            while (item < nitems) {
                const char* src = (const char*)(unsigned long long)__shfl_sync(0xffffffffu,
                    lane == 0 ? (unsigned long long)prologue(a, run, item, tab, tmask, deps) : 0ull, 0);
                unsigned next = 0;
                if (mode == 1 && lane == 0) next = claim(ctr) - base;  // read at the item's end
                put(item, src);
                if (mode == 0) {
                    // The ring drained: every stage of the item released (the consumer warps
                    // release theirs in any order).
                    for (int j = k > U ? k - U : 0; j < k; j++) mb_wait(sa(&empty[j % U]), (j / U) & 1);
                    if (lane == 0) next = claim(ctr) - base;
                }
                item = bcast(next);
            }
        }
        // The end: a stage with no bytes whose item is -1 for each consumer warp.
        for (int c = 0; c < ncons; c++, k++) {
            stage_free(k);
            if (lane == 0) sitem[k % U] = -1;
            __syncwarp();
            if (lds || lane == 0) mb_arrive(sa(&full[k % U]));
            if (lds && lane == 0) mb_arrive(sa(&full[k % U]));
        }
        return;
    }
    if (mode == 2 && warp == 1) {
        if (lane != 0) return;
        for (unsigned k = 0;; k++) {
            const unsigned q = k & 1, qp = (k >> 1) & 1;
            const unsigned item = claim(ctr) - base;
            const bool done = item >= nitems;
            const char* src = done ? a : prologue(a, run, item, tab, tmask, deps);
            mb_wait(sa(&qempty[q]), qp ^ 1);
            qitem[q] = done ? -1 : (int)item;
            qsrc[q] = src;
            mb_arrive(sa(&qfull[q]));
            if (done) break;
        }
        return;
    }
    // Consumers: warp c takes fills c, c + ncons, ... (a split's warps take every ncons-th
    // tile), spins `work` cycles on each (the tile's math) and releases it; when its next fill
    // belongs to another item, the consumer warps meet (named barrier 1: the merge of their
    // states) and each stores its share of the item's partial, `part` bytes, to `out`.
    const int c = warp - first_cons;
    int cur = -1;
    for (int k = c;; k += ncons) {
        const int s = k % U;
        mb_wait(sa(&full[s]), (k / U) & 1);
        const int it = *(volatile int*)&sitem[s];
        if (it != cur) {
            if (cur >= 0 && part) {
                asm volatile("bar.sync 1, %0;" :: "r"(ncons * 32) : "memory");
                for (unsigned o = (c * 32 + lane) * 16; o < part; o += ncons * 512)
                    __stcg((uint4*)(out + (long long)cur * part + o), make_uint4(cur, o, k, 0));
            }
            cur = it;
        }
        if (it < 0) break;
        if (work) {
            const long long t0 = clock64();
            while (clock64() - t0 < work) {
            }
        }
        __syncwarp();
        if (lane == 0) mb_arrive(sa(&empty[s]));
    }
}
extern "C" __global__ void __launch_bounds__(128) persist(const char* a, long long run, unsigned nitems, unsigned* ctr, unsigned base,
                                                          const unsigned* tab, unsigned tmask, int deps, int mode, int lds, int U, unsigned ch,
                                                          int work, unsigned part, char* out) {
    pw(a, run, nitems, ctr, base, tab, tmask, deps, mode, lds, U, ch, work, part, out);
}
"""

MODES = {"restart": 0, "ahead": 1, "scheduler": 2}
TOTAL = 512 << 10 << 8   # batch 16 / 64k's compressed K/V: 64 pairs x 2 MB (stream_probe.LAUNCHES' first row)
CH = 8 << 10             # a stage: one 16-key tile of K and V at DK = DV = 128, bf16
OUT = 16 << 20           # the items' partials: a sixteenth of a pair's (m, l, o) for 16 heads is ~8 KB


def claims(nitems, grid):
    """Claims one launch makes: each item once, and every block (or its scheduler warp) one more
    that finds the queue empty."""
    return nitems + grid


def configs():
    """(mode, item bytes, prologue loads, stages, blocks a SM, copies by cp.async, work cycles
    a stage, partial bytes an item): the streams alone (one item a block's split, as the bare
    launch, a fourth and an eighth of that: a sixteenth and a thirty-second of a pair; prologues
    of 0 and 3 loads; each switch and copy form), then the short items with the consumers'
    math (a spin a stage: 800 cycles, and 3,000, where three consumer warps take about as long
    over a stage as the stream takes to fill it at two blocks a SM) and the item's merge and
    partial store."""
    out = []
    for run in (512 << 10, 128 << 10, 64 << 10):
        for deps in (0, 3):
            for mode in MODES:
                for lds in (0, 1):
                    out.append((mode, run, deps, 8, 2, lds, 0, 0))
    for run in (128 << 10, 64 << 10):
        for mode in ("restart", "scheduler"):
            for lds in (0, 1):
                for work, part in ((800, 0), (0, 8 << 10), (800, 8 << 10), (3000, 8 << 10)):
                    out.append((mode, run, 3, 8, 2, lds, work, part))
    return out


def self_test():
    """The bookkeeping without a GPU: every config's stages fit the shared memory the run
    allows, items divide into stages, and the claims of a whole run stay below the counter's bound (2^31 - 1)."""
    cs = configs()
    assert cs and all(run % CH == 0 and TOTAL % run == 0 for _, run, *_ in cs)
    assert all(u <= 16 and per * u * CH <= 200 << 10 for _, _, _, u, per, *_ in cs)
    assert CH % 512 == 0  # a cp.async stage: 16 bytes a lane, 32 lanes, whole rounds
    # Every consumer warp sees every item (its merge barrier counts them all): at least one
    # fill each, i.e. as many stages an item as consumer warps (3 at most).
    assert all(run // CH >= 3 for _, run, *_ in cs)
    assert all(part % 16 == 0 and (TOTAL // run) * part <= OUT for _, run, *_, part in cs)
    n = sum(6 * 20 * claims(TOTAL // run, per * 132) for _, run, _, _, per, *_ in cs)
    assert n < 1 << 31, n
    assert claims(1024, 264) == 1288
    print("persist_probe self-test: ok")


def build(d):
    os.makedirs(d, exist_ok=True)
    n = compile_cubin(nvrtc(), STREAM_SRC + SRC, os.path.join(d, "persist.cubin"))
    print(f"{d}/persist.cubin: {n} bytes")


def run(d):
    drv = Driver()
    nsm = drv.attribute(16)
    name = ctypes.create_string_buffer(128)
    drv.ck(drv.cu.cuDeviceGetName(name, 128, drv.dev), "name")
    cubin = os.path.join(d, "persist.cubin")
    a, tab, ctr, out = drv.alloc(BUF), drv.alloc(BUF // 4), drv.alloc(64), drv.alloc(OUT)
    fill, _ = drv.function(cubin, "fill")
    drv.launch(fill, 4 * nsm, 1024, [ctypes.c_uint64(a.value), ctypes.c_longlong(BUF // 4)])
    drv.launch(fill, 4 * nsm, 1024, [ctypes.c_uint64(tab.value), ctypes.c_longlong(BUF // 16)])
    drv.ck(drv.cu.cuMemsetD8_v2(ctr, 0, ctypes.c_size_t(64)), "memset")
    drv.sync()
    tmask = BUF // 16 - 1  # words of the prologue's buffer (a power of two)
    N = 20
    regions = BUF // TOTAL
    addrs = [a.value + (i % regions) * TOTAL for i in range(N)]
    used = [0]  # claims made so far (the counter is never reset)
    print(f"GPU: {name.value.decode()}, {nsm} SMs; {TOTAL / 1e6:.0f} MB a launch, stages of {CH >> 10} KB, "
          f"{N} launches back to back over {regions} regions, best of 5")
    rows = []
    lr, _ = drv.function(cubin, "lr_32")
    drv.set_smem(lr, 32 * 2048)
    bare = best_ms(drv, lambda: [drv.launch(lr, 256, 128, [ctypes.c_uint64(x), ctypes.c_longlong(512 << 10)], smem=32 * 2048)
                                 for x in addrs]) * 1e3 / N
    rows.append(("bare launch (stream_probe lr_32: 256 blocks, a 512 KB run each)", "-", "-", "-", "-", "-", "-", bare))
    f, _ = drv.function(cubin, "persist")
    drv.set_smem(f, 200 << 10)
    for mode, run_b, deps, u, per, lds, work, part in configs():
        grid, nitems = per * nsm, TOTAL // run_b
        # Every launch's arguments built before the timing (the host must not be what is timed):
        # warm-up and five timings of N launches, each with the claims made before it as its base.
        keep, arrays = [], []
        for i in range(6 * N):
            args = [ctypes.c_uint64(addrs[i % N]), ctypes.c_longlong(run_b), ctypes.c_uint(nitems), ctypes.c_uint64(ctr.value),
                    ctypes.c_uint(used[0] & 0xffffffff), ctypes.c_uint64(tab.value), ctypes.c_uint(tmask), ctypes.c_int(deps),
                    ctypes.c_int(MODES[mode]), ctypes.c_int(lds), ctypes.c_int(u), ctypes.c_uint(CH),
                    ctypes.c_int(work), ctypes.c_uint(part), ctypes.c_uint64(out.value)]
            used[0] += claims(nitems, grid)
            keep.append(args)
            arrays.append(drv.pack(args))
        it = iter(arrays)

        def go(grid=grid, u=u):
            for _ in range(N):
                drv.launch(f, grid, 128, None, smem=u * CH, packed=next(it))
        us = best_ms(drv, go) * 1e3 / N
        # Every block ended after exactly one claim past the items: the counter says so.
        got = ctypes.c_uint()
        drv.ck(drv.cu.cuMemcpyDtoH_v2(ctypes.byref(got), ctr, ctypes.c_size_t(4)), "d2h")
        if got.value != used[0]:
            sys.exit(f"{mode} {run_b} {deps} {u} {per} {lds} {work} {part}: the counter reads {got.value}, the launches made {used[0]} claims")
        rows.append((mode + (", cp.async" if lds else ", bulk"), f"{run_b >> 10} KB", deps, f"{u} x {CH >> 10} KB", per,
                     work, part >> 10, us))
    print("| form | item | prologue loads | stages | blocks a SM | cycles a stage | partial KB | us a launch | TB/s | x bare |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for form, item, deps, st, per, work, part, us in rows:
        print(f"| {form} | {item} | {deps} | {st} | {per} | {work} | {part} | {us:.1f} | {TOTAL / us / 1e6:.2f} | {us / bare:.2f} |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "run"):
        sys.exit(__doc__)
    (build if sys.argv[1] == "build" else run)(sys.argv[2])
