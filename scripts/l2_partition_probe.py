#!/usr/bin/env python3
"""Does it pay to read DRAM through the near half of the L2? (a diagnostic)

Nsight Compute puts the decode's compressed launch at 75-90% of the link between the H200's
two L2 partitions and 65-81% of DRAM (docs/PERFORMANCE.md, thirty-seventh session): most
tile bytes come from DRAM channels that hang off the partition far from the reading SM.
This probe measures what a stream would gain if every SM read only near data:

  A. granularity: one SM times a cold 4-byte load (ld.global.cg, after an L2 flush) at the
     start of every 256-byte piece of a 4 MB region; the latencies fall into two groups
     (near and far DRAM channels; Otsu's threshold), and the run lengths of one group show
     the address granularity at which the partitions alternate;
  A2. the same SM classifies the 4 KB chunks of 64 MB, each by the fastest of 4 loads (a
     DRAM row miss slows single loads);
  B. SM map: every SM times 16 of A2's near chunks and 16 far ones, its own (so no other
     SM warms them); an SM whose near chunks are the fast ones is in A's partition;
  C. the stream buffer's map: the SMs of A's partition classify every 4 KB chunk of a
     512 MB buffer (each SM its own chunks, fastest of 4 loads, after a flush);
  F. (`run DIR sizes`) the compressed decode launch's copies without its math: four warps a
     block on adjacent 16-row tiles of a contiguous run, against one thread copying the run
     in 64-row boxes, the same shared memory;
  E. the buffer streamed by 1-D bulk copies (cp.async.bulk into shared memory) of 4-64 KB
     pieces, and (`run DIR sizes`) by tensor-map boxes of 16-64 rows as the decode kernels
     copy their tiles, in address order: the read-only rate by copy size;
  D. streaming the buffer by bulk copies of 4 KB pieces or 16-byte loads (ld.global.cg) by
     blocks that claim pieces from counters: one list for all (the usual placement), one
     list per partition with each block taking its own SM's partition's list first (near
     reads), or the same with the SMs' partitions swapped (every read far); GB/s of each,
     best of several runs.

What it found on the H200 (docs/bench/l2-partition-probe-calls6-14-2026-12-04-session37.txt):
4 KB granularity, 66 / 66 SMs, every-read-far streams capped at 2.0-2.3 TB/s, near-only
streams no faster than the usual placement (3.1-3.8 TB/s, varying by up to 15% between
machines); one thread's copies of 8 KB and more stream ~5-8% faster than 4 KB ones, but the
compressed decode launch's copy pattern (F: four warps on adjacent 16-row tiles) streams as
fast as 64-row boxes do (3.66 TB/s without the math).

Two steps, since the GPU machine has no compiler:

  python3 scripts/l2_partition_probe.py build DIR   # here: NVRTC -> DIR/probe.cubin
  python3 scripts/l2_partition_probe.py run DIR     # on the GPU: the driver through ctypes
  python3 scripts/l2_partition_probe.py run DIR sizes   # steps E and F alone, their forms alternated
  python3 scripts/l2_partition_probe.py --self-test     # the latency split on synthetic data (no GPU)
"""
import ctypes
import random
import statistics
import sys

from probe_cuda import Driver, compile_cubin, nvrtc

SRC = r"""
__device__ __forceinline__ unsigned smid() { unsigned r; asm volatile("mov.u32 %0, %%smid;" : "=r"(r)); return r; }
// The clock read after `v` has arrived: predicated on a test of v.
__device__ __forceinline__ long long clk_after(unsigned v) {
    long long t;
    asm volatile("{ .reg .pred p; setp.eq.u32 p, %1, 0x9e3779b9; @p mov.u64 %0, 0; @!p mov.u64 %0, %%clock64; }" : "=l"(t) : "r"(v) : "memory");
    return t;
}
__device__ __forceinline__ long long clk() { long long t; asm volatile("mov.u64 %0, %%clock64;" : "=l"(t) :: "memory"); return t; }
__device__ __forceinline__ unsigned ldcg(const unsigned* a) {
    unsigned v;
    asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(a) : "memory");
    return v;
}
__device__ __forceinline__ uint4 ldcg4(const uint4* a) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(a) : "memory");
    return v;
}
// One thread per SM (the first block on it to claim it) times a cold load of each piece in
// its list (slot = sm_slot[smid], lists of n pieces, piece p at byte p * piece).
extern "C" __global__ void lat(const unsigned char* buf, const long long* list, int n, const int* sm_slot, unsigned* out,
                               int* claim, long long piece, int sub) {
    if (threadIdx.x) return;
    const unsigned s = smid();
    const int slot = sm_slot[s];
    if (slot < 0 || atomicCAS(claim + s, 0, 1) != 0) return;
    unsigned dep = 0;
    for (int i = 0; i < n; i++) {
        const long long p = list[(long long)slot * n + i];
        if (p < 0) continue;
        // The fastest of `sub` loads spread over the piece (a DRAM row miss slows one load).
        unsigned best = 0xffffffffu;
        for (int k = 0; k < sub; k++) {
            const unsigned* a = (const unsigned*)(buf + p * piece + k * (piece / sub)) + (dep & 1);
            const long long t0 = clk();
            const unsigned v = ldcg(a);
            const long long t1 = clk_after(v);
            dep += v;
            best = min(best, (unsigned)(t1 - t0));
        }
        out[(long long)slot * n + i] = best;
    }
}
// Which SM ids exist (%smid need not be below the SM count).
extern "C" __global__ void smids(int* seen) {
    if (threadIdx.x == 0) seen[smid()] = 1;
}
// Blocks claim GROUP pieces at a time from counter[part] (part: their SM's partition, or 0
// with one list), then from the other list when theirs is done, and read them with 16-byte
// loads (all GROUP pieces' loads of a thread issued before their use).
template <int GROUP>
__device__ void stream_body(const unsigned char* buf, const long long* lists, const int* lens, long long stride, const int* sm_part,
                            int* counters, long long piece, unsigned* sink) {
    __shared__ int base;
    __shared__ long long idx[GROUP];
    const int nv = (int)(piece / 16);
    const int own = sm_part[smid()];
    unsigned acc = 0;
    for (int k = 0; k < 2; k++) {
        const int part = k == 0 ? own : own ^ 1;
        if (part < 0 || part > 1 || lens[part] == 0) continue;
        for (;;) {
            __syncthreads();
            if (threadIdx.x == 0) base = atomicAdd(counters + part, GROUP);
            __syncthreads();
            const int b = base;
            if (b >= lens[part]) break;
            // The group's pieces first (one round trip), then every data load before any use.
            if (threadIdx.x < GROUP) idx[threadIdx.x] = b + (int)threadIdx.x < lens[part] ? lists[part * stride + b + threadIdx.x] : -1;
            __syncthreads();
            for (int e = threadIdx.x; e < nv; e += blockDim.x) {
                uint4 v[GROUP];
#pragma unroll
                for (int g = 0; g < GROUP; g++) {
                    const long long p = idx[g];
                    v[g] = ldcg4((const uint4*)(buf + (p >= 0 ? p : 0) * piece) + e);
                }
#pragma unroll
                for (int g = 0; g < GROUP; g++)
                    if (idx[g] >= 0) acc ^= v[g].x ^ v[g].y ^ v[g].z ^ v[g].w;
            }
        }
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
#define STREAM_ENTRY(G)                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) stream##G(const unsigned char* buf, const long long* lists, const int* lens, \
                                                                long long stride, const int* sm_part, int* counters,            \
                                                                long long piece, unsigned* sink) {                              \
        stream_body<G>(buf, lists, lens, stride, sm_part, counters, piece, sink);                                             \
    }
#define NST_MAX 32
// One thread's ring of `nst` copy stages, each on an mbarrier: `take(n)` is copy n's stage
// once the copy it held before has landed, `drain(n)` waits for the last copies of n.
struct Stages {
    unsigned long long* bar;
    int nst;
    unsigned phase;  // bit i: the parity stage i waits for next
    __device__ void init(unsigned long long* b, int n) {
        bar = b;
        nst = n;
        phase = 0;
        for (int i = 0; i < nst; i++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(addr(i)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __device__ unsigned addr(int st) const { return (unsigned)__cvta_generic_to_shared(bar + st); }
    __device__ void wait(int st) {
        unsigned ok = 0;
        while (!ok)
            asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }"
                         : "=r"(ok) : "r"(addr(st)), "r"((phase >> st) & 1u) : "memory");
        phase ^= 1u << st;
    }
    __device__ int take(long long n) {
        const int st = (int)(n % nst);
        if (n >= nst) wait(st);
        return st;
    }
    __device__ void drain(long long n) {
        for (long long m = n > nst ? n - nst : 0; m < n; m++) wait((int)(m % nst));
    }
    // Stage st's barrier expects `bytes` from the copies issued next.
    __device__ void expect(int st, unsigned bytes) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(addr(st)), "r"(bytes) : "memory");
    }
};
// Rows [y, y + R) of 256 bytes by a tensor map of 64 x R boxes: two boxes, one per half of
// the rows, into `dst` (R rows x 128 bytes each, 128-byte swizzle), completing on `bar`.
__device__ __forceinline__ void copy_rows(unsigned dst, const unsigned long long* tmap, int y, unsigned piece, unsigned bar) {
    for (int h = 0; h < 2; h++)
        asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                     ::"r"(dst + h * (piece / 2)), "l"(tmap), "r"(h * 64), "r"(y), "r"(bar) : "memory");
}
// The same stream by the copy engine (what the decode kernels use): one thread a block
// claims pieces (64 KB a claim) and keeps NST of them in flight as 1-D bulk copies into
// shared memory, nothing else.
extern "C" __global__ void __launch_bounds__(32) bulk(const unsigned char* buf, const long long* lists, const int* lens, long long stride,
                                                      const int* sm_part, int* counters, long long piece, unsigned* sink, int NST) {
    extern __shared__ __align__(128) unsigned char stg[];
    __shared__ __align__(8) unsigned long long bar[NST_MAX];
    if (threadIdx.x != 0) return;
    Stages r;
    r.init(bar, NST);
    const int own = sm_part[smid()];
    long long n = 0;
    for (int k = 0; k < 2; k++) {
        const int part = k == 0 ? own : own ^ 1;
        if (part < 0 || part > 1 || lens[part] == 0) continue;
        for (;;) {
            const int cl = piece >= 65536 ? 1 : (int)(65536 / piece);
            const int b0 = atomicAdd(counters + part, cl);
            if (b0 >= lens[part]) break;
            for (int j = 0; j < cl && b0 + j < lens[part]; j++, n++) {
                const int st = r.take(n);
                const long long p = lists[part * stride + b0 + j];
                const unsigned dst = (unsigned)__cvta_generic_to_shared(stg + (long long)st * piece);
                r.expect(st, (unsigned)piece);
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             ::"r"(dst), "l"(buf + p * piece), "r"((unsigned)piece), "r"(r.addr(st)) : "memory");
            }
        }
    }
    r.drain(n);
    if (stg[0] == 0x5a && stg[1] == 0xa5) sink[0] = 1;
}
// The same by tensor-map boxes, as the decode kernels copy a tile: a piece of R rows of 256
// bytes is two boxes of 64 columns x R rows (`copy_rows`).
extern "C" __global__ void __launch_bounds__(32) tbulk(const unsigned long long* tmap, const long long* lists, const int* lens,
                                                       int rows, unsigned* sink, int NST, int* counters) {
    extern __shared__ __align__(1024) unsigned char stg[];
    __shared__ __align__(8) unsigned long long bar[NST_MAX];
    if (threadIdx.x != 0) return;
    Stages r;
    r.init(bar, NST);
    const unsigned piece = (unsigned)rows * 256u;
    const int cl = piece >= 65536 ? 1 : (int)(65536 / piece);
    long long n = 0;
    for (;;) {
        const int b0 = atomicAdd(counters, cl);
        if (b0 >= lens[0]) break;
        for (int j = 0; j < cl && b0 + j < lens[0]; j++, n++) {
            const int st = r.take(n);
            r.expect(st, piece);
            copy_rows((unsigned)__cvta_generic_to_shared(stg + (long long)st * piece), tmap, (int)(lists[b0 + j] * rows), piece, r.addr(st));
        }
    }
    r.drain(n);
    if (stg[0] == 0x5a && stg[1] == 0xa5) sink[0] = 1;
}
// The decode compressed launch's copy pattern without its math: each block owns a contiguous
// run of 16-row pieces (rows of 256 bytes; a piece = two 2 KB boxes); 4 warps: warp w copies
// pieces w, w + 4, ... of it into NST stages of its own (as cmp_mma's warps do); 1 warp:
// thread 0 copies four adjacent pieces at once as two 64-row boxes into NST stages of 16 KB
// (the shared-stage form). `rows` is the rows a copy covers (16 or 64).
extern "C" __global__ void __launch_bounds__(128) cmpcopy(const unsigned long long* tmap, long long npieces, int rows, unsigned* sink,
                                                          int NST) {
    extern __shared__ __align__(1024) unsigned char stg[];
    __shared__ __align__(8) unsigned long long bar[4][NST_MAX];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane != 0) return;
    const unsigned piece = (unsigned)rows * 256u;  // bytes one copy (two boxes) brings
    const long long per = (npieces + gridDim.x - 1) / gridDim.x;     // 16-row pieces a block
    const long long p0 = blockIdx.x * per, p1 = min(npieces, p0 + per);
    const int step = rows / 16;                                       // 16-row pieces a copy
    unsigned char* mine = stg + (long long)w * NST * piece;
    Stages r;
    r.init(bar[w], NST);
    long long n = 0;
    for (long long q = p0 + (long long)w * step; q < p1; q += (long long)nw * step, n++) {
        const int st = r.take(n);
        r.expect(st, piece);
        copy_rows((unsigned)__cvta_generic_to_shared(mine + (long long)st * piece), tmap, (int)(q * 16), piece, r.addr(st));
    }
    r.drain(n);
    if (mine[0] == 0x5a && mine[1] == 0xa5) sink[0] = 1;
}
STREAM_ENTRY(8)
STREAM_ENTRY(32)
"""

REGION = 4 << 20        # step A's region (256-byte pieces)
REGION_B = 64 << 20     # step A2's region (4 KB chunks)
CHUNK = 4096
PIECE_A = 256
STREAM = 512 << 20      # step D's buffer
FLUSH = 256 << 20       # more than the L2
SMS_MAX = 256


def build(d):
    import os
    os.makedirs(d, exist_ok=True)
    size = compile_cubin(nvrtc(), SRC, f"{d}/probe.cubin")
    print("probe.cubin", size, "bytes")


def two_groups(xs):
    """Threshold between the two groups of latencies (Otsu's: the split of the values below
    the 95th percentile that maximises the between-group variance), or None when the two
    groups' means are less than 50 cycles apart."""
    s = sorted(xs)[: len(xs) * 95 // 100]
    n, tot = len(s), float(sum(s))
    best, cut, acc = -1.0, None, 0.0
    for i in range(1, n):
        acc += s[i - 1]
        if s[i] == s[i - 1]:
            continue
        w0, w1 = i / n, (n - i) / n
        m0, m1 = acc / i, (tot - acc) / (n - i)
        v = w0 * w1 * (m1 - m0) ** 2
        if v > best:
            best, cut, gap = v, (s[i - 1] + s[i]) / 2, m1 - m0
    return cut if cut is not None and gap >= 50 else None


def rows_map(drv, buf, rows):
    """A tensor map of the stream buffer as rows of 256 bytes read in boxes of 64 columns x
    `rows` (UINT16, 128-byte swizzle, 256-byte L2 promotion: as the engine's maps), copied to
    the device. Returns (device address, host buffer kept alive)."""
    raw = (ctypes.c_uint8 * 256)()  # a 64-byte aligned 128-byte map inside it
    tm = (ctypes.c_uint64 * 16).from_address((ctypes.addressof(raw) + 63) & ~63)
    drv.ck(drv.cu.cuTensorMapEncodeTiled(tm, 1, 2, ctypes.c_void_p(buf.value), (ctypes.c_uint64 * 2)(128, STREAM // 256),
                                         (ctypes.c_uint64 * 1)(256), (ctypes.c_uint32 * 2)(64, rows), (ctypes.c_uint32 * 2)(1, 1),
                                         0, 3, 3, 0), "tensor map")
    md = drv.alloc(128)
    drv.ck(drv.cu.cuMemcpyHtoD_v2(md, tm, 128), "h2d")
    return md, raw


def timed_runs(drv, flush_l2, go, cnt_d=None):
    """Seven runs of `go()` (ms), each after an L2 flush (and its claim counters zeroed); the
    first is a warm-up. Returns (best of the other six, all seven)."""
    ts = []
    for _ in range(7):
        if cnt_d is not None:
            drv.ck(drv.cu.cuMemsetD32_v2(cnt_d, 0, 2), "counters")
        flush_l2()
        drv.sync()
        ts.append(drv.timed_ms(go))
    return min(ts[1:]), ts


def sweep(drv, bulk, buf, flush_l2, h2d, lists_d, lens_d, part_d, cnt_d, sink, nsm, rounds, forms):
    """Step E: the buffer streamed by bulk copies of each form (piece bytes, copies in flight
    a block, blocks a SM) in address order, the forms alternated `rounds` times."""
    res = {f: [] for f in forms}
    for _ in range(rounds):
        for piece_e, nst, per_sm in forms:
            n_e = STREAM // piece_e
            h2d(lists_d, (ctypes.c_longlong * n_e)(*range(n_e)))
            h2d(lens_d, (ctypes.c_int * 2)(n_e, 0))
            h2d(part_d, (ctypes.c_int * SMS_MAX)(*([0] * SMS_MAX)))
            drv.set_smem(bulk, nst * piece_e)
            args = [ctypes.c_uint64(buf.value), ctypes.c_uint64(lists_d.value), ctypes.c_uint64(lens_d.value), ctypes.c_longlong(n_e),
                    ctypes.c_uint64(part_d.value), ctypes.c_uint64(cnt_d.value), ctypes.c_longlong(piece_e), ctypes.c_uint64(sink.value),
                    ctypes.c_int(nst)]
            t, _ = timed_runs(drv, flush_l2, lambda: drv.launch(bulk, per_sm * nsm, 32, args, smem=nst * piece_e), cnt_d)
            res[(piece_e, nst, per_sm)].append(STREAM / t / 1e6)
    for (piece_e, nst, per_sm), r in res.items():
        print(f"E. bulk copies of {piece_e >> 10} KB, {nst} in flight a block, {per_sm} blocks a SM ({per_sm * nst * piece_e >> 10} KB a SM): "
              f"GB/s by round {[round(x) for x in r]}, median {statistics.median(r):.0f}")


def tensor_sweep(drv, d, buf, flush_l2, h2d, lists_d, lens_d, cnt_d, sink, nsm, rounds, forms):
    """Step E with tensor-map boxes: the buffer as rows of 256 bytes, each piece R rows (two
    boxes of 64 columns x R rows), forms (R, pieces in flight a block, blocks a SM)."""
    tb, _ = drv.function(f"{d}/probe.cubin", "tbulk")
    res = {f: [] for f in forms}
    maps = {r: rows_map(drv, buf, r) for r, _, _ in forms}
    for _ in range(rounds):
        for r, nst, per_sm in forms:
            piece = r * 256
            n_e = STREAM // piece
            h2d(lists_d, (ctypes.c_longlong * n_e)(*range(n_e)))
            h2d(lens_d, (ctypes.c_int * 2)(n_e, 0))
            drv.set_smem(tb, nst * piece)
            args = [ctypes.c_uint64(maps[r][0].value), ctypes.c_uint64(lists_d.value), ctypes.c_uint64(lens_d.value), ctypes.c_int(r),
                    ctypes.c_uint64(sink.value), ctypes.c_int(nst), ctypes.c_uint64(cnt_d.value)]
            t, _ = timed_runs(drv, flush_l2, lambda: drv.launch(tb, per_sm * nsm, 32, args, smem=nst * piece), cnt_d)
            res[(r, nst, per_sm)].append(STREAM / t / 1e6)
    for (r, nst, per_sm), x in res.items():
        print(f"E. tensor boxes of {r} rows (pieces of {r * 256 >> 10} KB as two boxes of {r * 128 >> 10} KB), {nst} in flight a block, "
              f"{per_sm} blocks a SM: GB/s by round {[round(v) for v in x]}, median {statistics.median(x):.0f}")


def cmp_pattern(drv, d, buf, flush_l2, sink, nsm, rounds):
    """The compressed launch's copies without its math: four warps of 16-row tiles against
    one thread of 64-row boxes a block, the same bytes in flight, two blocks a SM."""
    f, _ = drv.function(f"{d}/probe.cubin", "cmpcopy")
    nrows = STREAM // 256
    maps = {r: rows_map(drv, buf, r) for r in (16, 64)}
    # (name, warps, rows a copy, stages a copier): 96 KB of stages a block either way.
    forms = (("4 warps x 6 stages of 16-row pieces (4 KB)", 4, 16, 6), ("1 thread x 6 stages of 64-row pieces (16 KB)", 1, 64, 6),
             ("4 warps x 3 stages of 16-row pieces", 4, 16, 3), ("1 thread x 3 stages of 64-row pieces", 1, 64, 3))
    res = {x[0]: [] for x in forms}
    for _ in range(rounds):
        for name, warps, r, nst in forms:
            smem = warps * nst * r * 256
            drv.set_smem(f, smem)
            args = [ctypes.c_uint64(maps[r][0].value), ctypes.c_longlong(nrows // 16), ctypes.c_int(r), ctypes.c_uint64(sink.value), ctypes.c_int(nst)]
            t, _ = timed_runs(drv, flush_l2, lambda: drv.launch(f, 2 * nsm, 32 * warps, args, smem=smem))
            res[name].append(STREAM / t / 1e6)
    for name, x in res.items():
        print(f"F. {name}, 2 blocks a SM: GB/s by round {[round(v) for v in x]}, median {statistics.median(x):.0f}")


def run(d, only_e=False):
    drv = Driver()
    cu, ck = drv.cu, drv.ck
    lat, _ = drv.function(f"{d}/probe.cubin", "lat")
    smids_f, _ = drv.function(f"{d}/probe.cubin", "smids")
    streams = {g: drv.function(f"{d}/probe.cubin", f"stream{g}")[0] for g in (8, 32)}
    bulk, _ = drv.function(f"{d}/probe.cubin", "bulk")
    drv.set_smem(bulk, 16 * 4096)
    nsm = drv.attribute(16)  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    buf = drv.alloc(STREAM)
    ck(cu.cuMemsetD32_v2(buf, 0, STREAM // 4), "zero")
    flush = drv.alloc(FLUSH)
    claim = drv.alloc(4 * SMS_MAX)
    slot_d = drv.alloc(4 * SMS_MAX)

    def flush_l2():
        ck(cu.cuMemsetD32_v2(flush, 1, FLUSH // 4), "flush")

    def h2d(dst, arr):
        ck(cu.cuMemcpyHtoD_v2(dst, arr, ctypes.sizeof(arr)), "h2d")

    def hist(xs, w=20):
        h = {}
        for x in xs:
            h[x // w * w] = h.get(x // w * w, 0) + 1
        return " ".join(f"{k}:{v}" for k, v in sorted(h.items()) if v * 200 >= len(xs))

    def probe(sm_lists, piece, passes=1, warm=False, sub=1):
        """sm_lists: {sm: [piece indices]}; each SM's list timed cold, in `passes` passes
        (pass q takes every passes-th entry), an L2 flush before each. {sm: [cycles]}."""
        sms = sorted(sm_lists)
        n = max(len(v) for v in sm_lists.values())
        per = (n + passes - 1) // passes
        res = {s: [0] * len(sm_lists[s]) for s in sms}
        slots = (ctypes.c_int * SMS_MAX)(*([-1] * SMS_MAX))
        for j, s in enumerate(sms):
            slots[s] = j
        h2d(slot_d, slots)
        lst_d = drv.alloc(8 * len(sms) * per)
        out_d = drv.alloc(4 * len(sms) * per)
        for q in range(passes):
            lst = (ctypes.c_longlong * (len(sms) * per))(*([-1] * (len(sms) * per)))
            for j, s in enumerate(sms):
                for i, p in enumerate(sm_lists[s][q::passes]):
                    lst[j * per + i] = p
            h2d(lst_d, lst)
            flush_l2()
            args = [ctypes.c_uint64(buf.value), ctypes.c_uint64(lst_d.value), ctypes.c_int(per), ctypes.c_uint64(slot_d.value),
                    ctypes.c_uint64(out_d.value), ctypes.c_uint64(claim.value), ctypes.c_longlong(piece), ctypes.c_int(sub)]
            # Enough one-warp blocks that every SM gets one (the claim keeps one a SM);
            # warm: the same loads again, their lines now in L2.
            for _ in range(2 if warm else 1):
                ck(cu.cuMemsetD32_v2(claim, 0, SMS_MAX), "claim")
                drv.launch(lat, 8 * nsm, 32, args)
                drv.sync()
            out = (ctypes.c_uint * (len(sms) * per))()
            ck(cu.cuMemcpyDtoH_v2(out, out_d, ctypes.sizeof(out)), "d2h")
            for j, s in enumerate(sms):
                for i, idx in enumerate(range(q, len(sm_lists[s]), passes)):
                    res[s][idx] = out[j * per + i]
        cu.cuMemFree_v2(lst_d)
        cu.cuMemFree_v2(out_d)
        return res

    if only_e:
        part_d = drv.alloc(4 * SMS_MAX)
        cnt_d = drv.alloc(8)
        lens_d = drv.alloc(8)
        lists_d = drv.alloc(8 * (STREAM // 4096))
        sink = drv.alloc(4)
        sweep(drv, bulk, buf, flush_l2, h2d, lists_d, lens_d, part_d, cnt_d, sink, nsm, rounds=2,
              forms=((4096, 16, 3), (16384, 4, 3)))
        tensor_sweep(drv, d, buf, flush_l2, h2d, lists_d, lens_d, cnt_d, sink, nsm, rounds=2,
                     forms=((16, 16, 3), (64, 4, 3)))
        cmp_pattern(drv, d, buf, flush_l2, sink, nsm, rounds=4)
        return
    seen_d = drv.alloc(4 * SMS_MAX)
    ck(cu.cuMemsetD32_v2(seen_d, 0, SMS_MAX), "seen")
    drv.launch(smids_f, 16 * nsm, 32, [ctypes.c_uint64(seen_d.value)])
    drv.sync()
    seen = (ctypes.c_int * SMS_MAX)()
    ck(cu.cuMemcpyDtoH_v2(seen, seen_d, ctypes.sizeof(seen)), "d2h")
    ids = [i for i in range(SMS_MAX) if seen[i]]
    print(f"{nsm} SMs; ids seen {len(ids)}: {ids[0]}..{ids[-1]}")
    sm0 = ids[0]

    # A. granularity, from the first SM.
    n_a = REGION // PIECE_A
    ra = probe({sm0: list(range(n_a))}, PIECE_A, passes=8)[sm0]
    print(f"A. cold, SM {sm0}: {hist(ra)}")
    print(f"   first 64: {ra[:64]}")
    thr = two_groups(ra)
    s = sorted(ra)
    print(f"A. SM {sm0}, cold loads at every {PIECE_A} B of {REGION >> 20} MB: cycles p10 {s[len(s) // 10]}, p50 {s[len(s) // 2]}, "
          f"p90 {s[len(s) * 9 // 10]}; threshold {thr}")
    if thr is None:
        print("no two groups of latencies: nothing to map")
        return
    cls = [1 if x > thr else 0 for x in ra]
    runs, cur, ln = [], cls[0], 0
    for c in cls:
        if c == cur:
            ln += 1
        else:
            runs.append(ln)
            cur, ln = c, 1
    runs.append(ln)
    rl = {}
    for r in runs[1:-1] or runs:
        rl[r] = rl.get(r, 0) + 1
    # Runs of 16 pieces (4 KB) stand out above the short runs a slow load makes.
    print(f"   run lengths of one group (pieces: count): {sorted(rl.items())[:20]}")
    print(f"   first 64 classes: {''.join(map(str, cls[:64]))}")

    # A2. 4 KB chunks of a larger region, each the fastest of 4 loads, from the first SM.
    nb = REGION_B // CHUNK
    r2 = probe({sm0: list(range(nb))}, CHUNK, passes=4, sub=4)[sm0]
    thr2 = two_groups(r2)
    print(f"A2. SM {sm0}, 4 KB chunks of {REGION_B >> 20} MB, fastest of 4 loads: {hist(r2)}; threshold {thr2}")
    if thr2 is None:
        print("no two groups at 4 KB: nothing to map")
        return
    c2 = [1 if x > thr2 else 0 for x in r2]
    near = [i for i, c in enumerate(c2) if c == 0]
    far = [i for i, c in enumerate(c2) if c == 1]
    print(f"    near {len(near)}, far {len(far)}; first 64 classes: {''.join(map(str, c2[:64]))}")

    # B. the SMs' partitions: each SM times 16 of the first SM's near chunks and 16 far
    # ones (its own: no other SM touches them).
    random.seed(1)
    random.shuffle(near)
    random.shuffle(far)
    k = min(16, len(near) // len(ids), len(far) // len(ids))
    refs = {sm: near[j * k:(j + 1) * k] + far[j * k:(j + 1) * k] for j, sm in enumerate(ids)}
    rb = probe(refs, CHUNK, passes=2, sub=4)
    part = {}
    for sm in ids:
        x = rb[sm]
        dn, df = statistics.median(x[:k]), statistics.median(x[k:])
        part[sm] = 0 if dn < df else 1
        if sm in (ids[0], ids[1], ids[len(ids) // 2], ids[-1]):
            print(f"   SM {sm}: median cycles on SM {sm0}'s near chunks {dn}, far chunks {df}")
    groups = [sorted(q for q, v in part.items() if v == g) for g in (0, 1)]
    print(f"B. partitions ({k} + {k} chunks a SM): SM {sm0}'s {len(groups[0])} SMs {groups[0]}, the other {len(groups[1])} SMs {groups[1]}")

    # C. the stream buffer's map in 4 KB chunks, by the first SM's partition, each SM its own chunks.
    piece = CHUNK
    npieces = STREAM // piece
    sms0 = groups[0]
    lists = {sm: list(range(j, npieces, len(sms0))) for j, sm in enumerate(sms0)}
    rc = probe(lists, piece, passes=2, sub=4)
    home = [0] * npieces
    for sm, lst in lists.items():
        for p, t in zip(lst, rc[sm]):
            home[p] = 1 if t > thr2 else 0
    allc = [t for v in rc.values() for t in v]
    print(f"C. {npieces} chunks of {piece} B: {npieces - sum(home)} near the first SM's partition, {sum(home)} far; latencies {hist(allc)}")

    # D. streaming: one list (in address order) against one list per partition.
    best = {}
    part_d = drv.alloc(4 * SMS_MAX)
    cnt_d = drv.alloc(8)
    lens_d = drv.alloc(8)
    lists_d = drv.alloc(8 * 2 * npieces)
    sink = drv.alloc(4)
    occ = 8
    # E. bulk copies of larger pieces (one list, address order): does the piece size set the rate?
    sweep(drv, bulk, buf, flush_l2, h2d, lists_d, lens_d, part_d, cnt_d, sink, nsm, rounds=1,
          forms=((4096, 16, 3), (4096, 24, 2), (8192, 8, 3), (16384, 4, 3), (16384, 6, 2), (32768, 3, 2), (65536, 3, 1)))
    drv.set_smem(bulk, 16 * 4096)
    for g in ("bulk", 8, 32):
        for name in ("one list", "by partition", "by partition, SMs swapped"):
            if name == "one list":
                l0, l1 = list(range(npieces)), []
                parts = [0] * SMS_MAX
            else:
                l0 = [p for p in range(npieces) if home[p] == 0]
                l1 = [p for p in range(npieces) if home[p] == 1]
                swap = name.endswith("swapped")
                parts = [part.get(sm, 0) ^ swap for sm in range(SMS_MAX)]
            arr = (ctypes.c_longlong * (2 * npieces))(*(l0 + [-1] * (npieces - len(l0)) + l1 + [-1] * (npieces - len(l1))))
            h2d(lists_d, arr)
            h2d(lens_d, (ctypes.c_int * 2)(len(l0), len(l1)))
            h2d(part_d, (ctypes.c_int * SMS_MAX)(*parts))
            args = [ctypes.c_uint64(buf.value), ctypes.c_uint64(lists_d.value), ctypes.c_uint64(lens_d.value), ctypes.c_longlong(npieces),
                    ctypes.c_uint64(part_d.value), ctypes.c_uint64(cnt_d.value), ctypes.c_longlong(piece), ctypes.c_uint64(sink.value)]
            if g == "bulk":
                args.append(ctypes.c_int(16))
            best[(g, name)], ts = timed_runs(
                drv, flush_l2, lambda: drv.launch(bulk, 3 * nsm, 32, args, smem=16 * 4096) if g == "bulk" else drv.launch(streams[g], occ * nsm, 256, args),
                cnt_d)
            print(f"D. {g} ({'bulk copies, 16 a block, 3 blocks a SM' if g == 'bulk' else 'loads a thread in flight'}), {name}: {STREAM / best[(g, name)] / 1e6:.0f} GB/s "
                  f"(best of 6: {best[(g, name)] * 1e3:.1f} us; all {[round(t * 1e3, 1) for t in ts]})")
        print(f"   by partition / one list: {best[(g, 'one list')] / best[(g, 'by partition')]:.3f}x the rate")


def self_test():
    """The latency split on synthetic data (no GPU): two groups as the H200 shows them, with
    a tail of slow loads, split between them; one group is not split."""
    rng = random.Random(5)
    two = [int(rng.gauss(520, 15)) for _ in range(4000)] + [int(rng.gauss(700, 25)) for _ in range(4000)]
    two += [900 + rng.randrange(300) for _ in range(200)]
    t = two_groups(two)
    assert t is not None and 560 < t < 660, t
    one = [int(rng.gauss(520, 15)) for _ in range(4000)] + [900 + rng.randrange(300) for _ in range(100)]
    assert two_groups(one) is None, two_groups(one)
    print("l2_partition_probe self-test: ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        sys.exit(0)
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("build", "run"):
        sys.exit(__doc__)
    if sys.argv[1] == "build":
        build(sys.argv[2])
    else:
        run(sys.argv[2], only_e=sys.argv[3:] == ["sizes"])
