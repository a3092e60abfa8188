#!/usr/bin/env python3
"""What a chain of dependent stages costs with nothing computed in it (a diagnostic).

Issue 12 asks a batch-1 decode step at 64k for <= 10 us; the engine's step is five dependent
launches (append, compressed branch, selection, selected blocks and window, combine) and takes
~25 us on the H200 (docs/DECODE_NOTES.md, variant 103: append + compressed 11.9, selection 5.3,
selected 5.4, combine 3.3). This probe times the skeleton of such a step: the same number of
stages, each with a grid of the engine's size, each reading what the one before wrote (one L2
round trip) and writing a word a block, plus the one stage that carries bytes (the compressed
branch's 8 MB read cold from memory), so that the floor of the structure itself is measured
rather than argued. Every timing is a CUDA graph replayed (as nsa-bench's graph numbers), the
L2 flushed before each replay (by reading a buffer several times its size, outside the timed
events), the median of REPS replays, in microseconds.

  graph     one 4-block kernel that does nothing: what a replayed graph costs at least;
  hops N    N dependent launches of 256 blocks (each waits for the one before, reads 32 of
            its words, writes one), with programmatic dependent launch (`pdl`: each kernel
            lets the next start at its entry and waits with griddepcontrol.wait, as the
            engine's kernels do) and without (`serial`);
  burst     one launch of 256 blocks reading 8 MB (32 KB a block, contiguous, 8 loads of
            16 bytes in flight a thread), cold: the compressed branch's bytes at batch 1;
  step      the five-launch skeleton with pdl: a 128-block hop (the append), the burst,
            three 256-block hops (selection, selected, combine);
  bN Tk     batch N / context T's bytes (16 / 64k, 16 / 128k, 64 / 128k): in one burst, and
            as the step's data flow allows at best (a hop, the compressed keys and the
            window, a hop, the selected blocks, a hop): what issue 12's larger targets leave
            for the computation;
  fused K   one launch of 264 blocks (two a multiprocessor, all resident): the burst, then
            K grid-wide hand-overs (each block counts itself in on a counter, waits for the
            whole grid's count with acquire loads, reads 32 words of other blocks, writes
            one): the one-launch form of the same chain;
  cluster   one launch of clusters (4 of 16 blocks: a cluster per (row, KV head) at batch 1;
            or 8 of 8, 8 of 16, 32 of 8), the burst spread over its blocks, then K hand-overs
            by cluster barriers with each block's word read by the others from its shared
            memory: the per-pair form on chip (docs/DECODE_NOTES.md variant 69);
  bulk      the same with each block's share of the burst put in flight at once by bulk
            copies into its shared memory (64 KB or 128 KB a block), then 0-3 barriers: the
            least a one-launch step with a cluster per (row, KV head) can cost.

Two steps, since the GPU machine has no compiler:

  python3 scripts/chain_probe.py build DIR   # here: NVRTC -> DIR/chain.cubin
  python3 scripts/chain_probe.py run DIR     # on the GPU: the driver through ctypes, a table
  python3 scripts/chain_probe.py --self-test # the hand-over's tickets, the step bytes, no GPU
"""
import ctypes
import os
import statistics
import sys

from probe_cuda import Driver, compile_cubin, nvrtc

SRC = r"""
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Reads n 16-byte words (grid-stride, 4 in flight a thread) so that the L2 holds none of the
// probe's data afterwards.
extern "C" __global__ void flush(const uint4* a, long long n, unsigned* sink) {
    const long long T = (long long)gridDim.x * blockDim.x;
    unsigned acc = 0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += 4 * T) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const long long j = i + k * T;
            if (j < n) {
                const uint4 v = __ldcg(a + j);
                acc ^= v.x ^ v.y ^ v.z ^ v.w;
            }
        }
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}

// A block's word from the previous stage's words: 32 lanes of warp 0 read 32 of them (one L2
// round trip), fold them, and thread 0 writes the block's own. Block barrier before the store
// so the whole block's work is on the chain, as in a real stage.
__device__ __forceinline__ void hop_body(const unsigned* in, int nin, unsigned* out, unsigned salt) {
    __shared__ unsigned w;
    if (threadIdx.x < 32) {
        unsigned v = nin > 0 ? __ldcg(in + (blockIdx.x * 7u + threadIdx.x * 13u) % (unsigned)nin) : 0u;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v ^= __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0) w = v + salt;
    }
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = w;
}

extern "C" __global__ void hop(const unsigned* in, int nin, unsigned* out, int pdl) {
    if (pdl) {
        pdl_trigger();
        pdl_wait();
    }
    hop_body(in, nin, out, 1u);
}

// The block's word from its threads' (valid in thread 0); ends with a block barrier, so shared
// memory the threads read before it may be written again.
__device__ __forceinline__ unsigned block_fold(unsigned acc) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ unsigned w[32];
    if ((threadIdx.x & 31) == 0) w[threadIdx.x >> 5] = acc;
    __syncthreads();
    unsigned v = 0;
    if (threadIdx.x == 0)
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) v ^= w[i];
    __syncthreads();
    return v;
}

// Block b reads its `per` 16-byte words of a (contiguous), 8 loads in flight a thread; returns
// their fold to thread 0.
__device__ __forceinline__ unsigned burst_body(const uint4* a, int per) {
    const uint4* p = a + (long long)blockIdx.x * per;
    unsigned acc = 0;
    for (int i = threadIdx.x; i < per; i += 8 * blockDim.x) {
        uint4 v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int j = i + k * blockDim.x;
            v[k] = j < per ? __ldcg(p + j) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int k = 0; k < 8; k++) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    return block_fold(acc);
}

extern "C" __global__ void burst(const uint4* a, int per, unsigned* out, int pdl) {
    if (pdl) {
        pdl_trigger();
        pdl_wait();
    }
    const unsigned v = burst_body(a, per);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// The grid-wide hand-over: every block takes a ticket on the counter; a block's round is
// ticket / grid, and the round is complete once the counter reaches (round + 1) * grid. The
// counter is never reset, so graph replays need no memset (2^32 / grid rounds before it wraps).
__device__ __forceinline__ void grid_handover(unsigned* counter) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned ticket = atomicAdd(counter, 1u);
        const unsigned target = (ticket / gridDim.x + 1u) * gridDim.x;
        while ((int)(ld_acquire(counter) - target) < 0) {
        }
    }
    __syncthreads();
}

// The burst by bulk copies (the tensor memory accelerator's
// `cp.async.bulk`): warp 0 puts the block's whole share in flight at once, chunks of at most
// 16 KB into dynamic shared memory on one mbarrier, so a block's bytes in flight are its share
// (up to 128 KB), not 8 loads a thread; then every thread folds its part of the staged share.
// What a one-launch batch-1 step's compressed phase costs at best when one cluster of 16
// multiprocessors owns a (row, KV head) (`cluster_chain` with `bulk`). `bar`: an mbarrier
// of one arrival in its first phase.
__device__ __forceinline__ unsigned bulk_fold(const uint4* src, int per, unsigned bar) {
    extern __shared__ __align__(128) uint4 stage[];
    const unsigned bytes = (unsigned)per * 16u;
    const unsigned chunk = 16384u;
    if (threadIdx.x < 32) {
        if (threadIdx.x == 0) {
            // The stage's previous contents were read by the generic proxy (the fold below,
            // before a block barrier); the bulk copies write it through the async proxy.
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
        }
        __syncwarp();
        const unsigned dst = (unsigned)__cvta_generic_to_shared(stage);
        for (unsigned off = threadIdx.x * chunk; off < bytes; off += 32u * chunk) {
            const unsigned n = bytes - off < chunk ? bytes - off : chunk;
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         :: "r"(dst + off), "l"((const char*)src + off), "r"(n), "r"(bar) : "memory");
        }
    }
    asm volatile("{\n\t.reg .pred p;\n"
                 "CHAIN_BULK_WAIT%=:\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0;\n\t"
                 "@!p bra CHAIN_BULK_WAIT%=;\n}" :: "r"(bar) : "memory");
    unsigned acc = 0;
    for (int i = threadIdx.x; i < per; i += blockDim.x) {
        const uint4 v = stage[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    return block_fold(acc);  // its closing barrier: the stage's reads done before a refill
}

// The per-pair form on chip: a cluster of blocks reads its share of the burst, then K
// hand-overs by cluster barriers, each block reading every other block's word of the cluster
// from its shared memory (distributed shared memory) and publishing its next one; a last
// barrier keeps every block's shared memory alive until the others have read it.
//
// `bulk`: the burst by bulk copies (`bulk_fold`). `dep` (with `bulk`, 16-byte words): after the
// first hand-over every block reads `dep` more words, cold, from an address that depends on the
// word the hand-over gave it, as the selected blocks are read after the selection: the
// one-launch step's second memory phase, on the chain.
extern "C" __global__ void cluster_chain(const uint4* a, int per, unsigned* out, int stages, int bulk, int dep) {
    __shared__ unsigned pub[2];
    __shared__ __align__(8) unsigned long long bars[2];
    const unsigned bar0 = (unsigned)__cvta_generic_to_shared(&bars[0]);
    if (bulk) {
        if (threadIdx.x == 0) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar0) : "memory");
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar0 + 8u) : "memory");
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
    }
    const unsigned v0 = bulk ? bulk_fold(a + (long long)blockIdx.x * per, per, bar0) : burst_body(a, per);
    if (threadIdx.x == 0) pub[0] = v0;
    unsigned n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    for (int s = 0; s < stages; s++) {
        asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
        if (threadIdx.x < 32) {
            unsigned v = 0;
            if (threadIdx.x < n) {
                unsigned ra;
                const unsigned la = (unsigned)__cvta_generic_to_shared(&pub[s & 1]);
                asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(la), "r"(threadIdx.x));
                asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(ra) : "memory");
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v ^= __shfl_xor_sync(0xffffffffu, v, o);
            if (threadIdx.x == 0) pub[(s + 1) & 1] = v + s;
        }
        __syncthreads();
        if (s == 0 && bulk && dep > 0) {
            // A slot of `dep` words past the burst's bytes (the grid's `per` words a block),
            // chosen by the hand-over's word.
            const unsigned slot = ((pub[1] ^ blockIdx.x) * 2654435761u) % 4096u;
            const unsigned v = bulk_fold(a + (long long)gridDim.x * per + (long long)slot * dep, dep, bar0 + 8u);
            if (threadIdx.x == 0) pub[1] ^= v;
            __syncthreads();
        }
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    if (threadIdx.x == 0) out[blockIdx.x] = pub[stages & 1];
}

extern "C" __global__ void fused(const uint4* a, int per, unsigned* words, unsigned* counters, int stages) {
    const unsigned v = burst_body(a, per);
    if (threadIdx.x == 0) words[blockIdx.x] = v;
    for (int s = 0; s < stages; s++) {
        grid_handover(counters + 32 * s);
        hop_body(words + s * gridDim.x, gridDim.x, words + (s + 1) * gridDim.x, s + 2u);
    }
}
"""

REPS = 30
BURST_BYTES = 8 << 20  # the compressed branch's K/V at batch 1, 64k, paper 128/128
FLUSH_BYTES = 1 << 30  # at least, many times the L2
KV_KEY_BYTES = 512  # K and V of one key, DK = DV = 128, bf16


def step_bytes(batch, context):
    """Paper 128/128 at four KV heads: (the compressed keys + the window, the selected blocks),
    the bytes a decode step reads before and after its selection."""
    pairs = 4 * batch
    compressed = (context - 32) // 16 + 1  # blocks of 32 keys, stride 16
    return pairs * (compressed + 512) * KV_KEY_BYTES, pairs * 16 * 64 * KV_KEY_BYTES


SELECTED_BYTES = step_bytes(1, 65536)[1]  # the selected blocks' K/V at batch 1 (2 MB)
SKELETONS = ((16, 65536), (16, 131072), (64, 131072))  # issue 12's larger targets
BIG_BYTES = max(FLUSH_BYTES, max(sum(step_bytes(b, t)) for b, t in SKELETONS) + (64 << 20))
THREADS = 256


def ticket_target(ticket, grid):
    """The count at which the round of `ticket` is complete (the kernel's `grid_handover`)."""
    return (ticket // grid + 1) * grid


def self_test():
    # Every ticket of a round waits for the same count, the round's last ticket completes it,
    # and the next round's tickets wait for the next multiple, whatever the replay.
    for grid in (1, 4, 132, 264):
        for rnd in range(3):
            tickets = range(rnd * grid, (rnd + 1) * grid)
            targets = {ticket_target(t, grid) for t in tickets}
            assert targets == {(rnd + 1) * grid}, (grid, rnd, targets)
            assert max(tickets) + 1 == (rnd + 1) * grid
    # The kernel compares with a signed difference, so a counter that wrapped past 2^32 still
    # compares correctly for targets within 2^31 of it.
    wrap = lambda x: ((x + (1 << 31)) % (1 << 32)) - (1 << 31)
    assert wrap((5 - ((1 << 32) - 3)) % (1 << 32)) > 0
    # The skeletons' bytes are the engine's own count of what a step reads (nsa-bench's
    # `nsa_bytes`, docs/bench/nsa-bench-decode-main-b211a06-call3-h100-2026-12-05-session47.json).
    assert sum(step_bytes(1, 65536)) == 11532288
    assert sum(step_bytes(16, 65536)) == 184516608
    print("chain_probe self-test: ok")


class CUlaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union.
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class CUlaunchConfig(ctypes.Structure):
    _fields_ = [
        ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(CUlaunchAttribute)), ("numAttrs", ctypes.c_uint),
    ]


PDL_ATTRIBUTE = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
CLUSTER_ATTRIBUTE = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
NON_PORTABLE_CLUSTER = 14  # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED


class Chain:
    """Launches on one stream (pdl or not), captured into graphs and replayed."""

    def __init__(self, d):
        self.d = d
        self.cu = d.cu
        s = ctypes.c_void_p()
        d.ck(self.cu.cuStreamCreate(ctypes.byref(s), 1), "stream")  # CU_STREAM_NON_BLOCKING
        self.stream = s
        self.keep = []

    def launch(self, f, grid, args, pdl, cluster=0, smem=0):
        """`pdl`: programmatic stream serialization; `cluster`: blocks a cluster (0: none);
        `smem`: bytes of dynamic shared memory."""
        attr = CUlaunchAttribute()
        if cluster:
            attr.id = CLUSTER_ATTRIBUTE
            dims = (ctypes.c_uint * 3)(cluster, 1, 1)  # value.clusterDim
            ctypes.memmove(ctypes.addressof(attr) + CUlaunchAttribute.value.offset, ctypes.addressof(dims), 12)
        else:
            attr.id = PDL_ATTRIBUTE
            one = ctypes.c_int(1)  # value.programmaticStreamSerializationAllowed
            ctypes.memmove(ctypes.addressof(attr) + CUlaunchAttribute.value.offset, ctypes.addressof(one), 4)
        cfg = CUlaunchConfig(grid, 1, 1, THREADS, 1, 1, smem, self.stream, ctypes.pointer(attr), 1 if pdl or cluster else 0)
        packed = self.d.pack(args)
        self.keep.append((args, packed, attr, cfg))
        self.d.ck(self.cu.cuLaunchKernelEx(ctypes.byref(cfg), f, packed, None), "cuLaunchKernelEx")

    def graph(self, go):
        """`go()` captured on the stream, instantiated."""
        self.d.ck(self.cu.cuStreamBeginCapture_v2(self.stream, 0), "begin capture")
        go()
        g = ctypes.c_void_p()
        self.d.ck(self.cu.cuStreamEndCapture(self.stream, ctypes.byref(g)), "end capture")
        ex = ctypes.c_void_p()
        self.d.ck(self.cu.cuGraphInstantiateWithFlags(ctypes.byref(ex), g, ctypes.c_ulonglong(0)), "instantiate")
        return ex

    def time_us(self, ex, flush):
        """Median microseconds of a replay of `ex`, each after `flush()` outside the events."""
        e0, e1 = ctypes.c_void_p(), ctypes.c_void_p()
        self.d.ck(self.cu.cuEventCreate(ctypes.byref(e0), 0), "event")
        self.d.ck(self.cu.cuEventCreate(ctypes.byref(e1), 0), "event")
        out = []
        for i in range(REPS + 3):
            flush()
            self.d.ck(self.cu.cuEventRecord(e0, self.stream), "record")
            self.d.ck(self.cu.cuGraphLaunch(ex, self.stream), "graph launch")
            self.d.ck(self.cu.cuEventRecord(e1, self.stream), "record")
            self.d.ck(self.cu.cuEventSynchronize(e1), "sync")
            ms = ctypes.c_float()
            self.d.ck(self.cu.cuEventElapsedTime(ctypes.byref(ms), e0, e1), "elapsed")
            if i >= 3:
                out.append(1000.0 * ms.value)
        return statistics.median(out), min(out)


def build(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    n = compile_cubin(nvrtc(), SRC, os.path.join(out_dir, "chain.cubin"))
    print(f"{out_dir}/chain.cubin: {n} bytes")


def run(out_dir):
    d = Driver()
    cubin = os.path.join(out_dir, "chain.cubin")
    f = {k: d.function(cubin, k)[0] for k in ("flush", "hop", "burst", "fused", "cluster_chain")}
    d.ck(d.cu.cuFuncSetAttribute(f["cluster_chain"], NON_PORTABLE_CLUSTER, 1), "non-portable cluster size")
    sms = d.attribute(16)  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    c = Chain(d)
    big = d.alloc(BIG_BYTES)
    d.ck(d.cu.cuMemsetD32_v2(big, ctypes.c_uint(0x5a5a5a5a), ctypes.c_size_t(BIG_BYTES // 4)), "memset")
    words = d.alloc(64 << 20)
    d.ck(d.cu.cuMemsetD32_v2(words, ctypes.c_uint(0), ctypes.c_size_t((64 << 20) // 4)), "memset")
    counters = d.alloc(4096)
    d.ck(d.cu.cuMemsetD32_v2(counters, ctypes.c_uint(0), ctypes.c_size_t(1024)), "memset")
    sink = d.alloc(64)
    # The bursts read from the start of `big`; the flush reads all of it, ending 64 MB past the
    # largest step's bytes, so the L2 holds none of them when a replay starts.
    fl_args = [big, ctypes.c_longlong(BIG_BYTES // 16), sink]

    def flush():
        d.ck(d.cu.cuLaunchKernel(f["flush"], sms * 4, 1, 1, THREADS, 1, 1, 0, c.stream, d.pack(fl_args), None), "flush")

    W = lambda i: ctypes.c_uint64(words.value + i * 4 * 4096)  # stage i's words: 4,096 slots apart

    def hop(i, grid, nin, pdl):
        c.launch(f["hop"], grid, [W(i), ctypes.c_int(nin), W(i + 1), ctypes.c_int(1 if pdl else 0)], pdl)

    g2 = 2 * sms  # two blocks a multiprocessor

    def burst_at(i, offset, nbytes, pdl, grid=g2):
        """Stage i: `grid` blocks read `nbytes` of `big` from `offset`, a contiguous share each."""
        c.launch(f["burst"], grid, [ctypes.c_uint64(big.value + offset), ctypes.c_int(nbytes // 16 // grid), W(i + 1),
                                    ctypes.c_int(1 if pdl else 0)], pdl)

    def burst(i, pdl):
        burst_at(i, 0, BURST_BYTES, pdl, grid=256)

    rows = []

    def measure(name, go, note=""):
        med, lo = c.time_us(c.graph(go), flush)
        rows.append((name, med, lo, note))
        print(f"{name:<28} {med:8.2f} {lo:8.2f}  {note}", flush=True)

    print(f"{'form':<28} {'median':>8} {'min':>8}  (us, graph replay, L2 flushed before each)")
    measure("graph (1 empty kernel)", lambda: hop(0, 4, 0, False))
    for n in (2, 3, 4, 5):
        for pdl in (True, False):
            measure(f"hops {n} {'pdl' if pdl else 'serial'}", lambda n=n, pdl=pdl: [hop(i, 256, 256 if i else 0, pdl and i > 0) for i in range(n)])
    measure("burst 8 MB (256 blocks)", lambda: burst(0, False), f"{BURST_BYTES / 1e6:.1f} MB")
    measure("step skeleton pdl", lambda: [hop(0, 128, 0, False), burst(1, True)] + [hop(2 + i, 256, 256, True) for i in range(3)])
    measure("step skeleton serial", lambda: [hop(0, 128, 0, False), burst(1, False)] + [hop(2 + i, 256, 256, False) for i in range(3)])
    # Batches 16 and 64: the step's bytes in the order the data flow allows at best (the
    # window beside the compressed keys, the selected blocks after the selection), read by bare
    # 16-byte-load bursts of two blocks a multiprocessor; and the same bytes in one burst.
    for b, t in SKELETONS:
        first, second = step_bytes(b, t)
        measure(f"b{b} {t // 1024}k bytes in one burst", lambda first=first, second=second: burst_at(0, 0, first + second, False),
                f"{(first + second) / 1e6:.1f} MB, {g2} blocks")
        measure(f"b{b} {t // 1024}k skeleton pdl",
                lambda b=b, first=first, second=second: [
                    hop(0, 32 * b, 0, False), burst_at(1, 0, first, True), hop(2, 256, g2, True),
                    burst_at(3, first, second, True), hop(4, 256, g2, True)],
                f"{first / 1e6:.1f} MB, hop, {second / 1e6:.1f} MB, hop")
    perf = BURST_BYTES // 16 // g2
    for k in (0, 1, 3):
        measure(f"fused burst + {k} hand-overs",
                lambda k=k: c.launch(f["fused"], g2, [big, ctypes.c_int(perf), words, counters, ctypes.c_int(k)], False),
                f"{g2} blocks")
    def chain(blocks, size, k, bulk, dep=0):
        """`cluster_chain`: the 8 MB burst over `blocks` in clusters of `size`, then `k` cluster
        barriers; `bulk`: the burst by bulk copies (a block's share in its shared memory); `dep`:
        16-byte words a block reads after the first barrier."""
        per_c = BURST_BYTES // 16 // blocks
        c.launch(f["cluster_chain"], blocks,
                 [big, ctypes.c_int(per_c), W(0), ctypes.c_int(k), ctypes.c_int(1 if bulk else 0), ctypes.c_int(dep)],
                 False, cluster=size, smem=per_c * 16 if bulk else 0)

    for blocks, size in ((64, 16), (64, 8), (128, 16), (256, 8)):
        for k in (0, 1, 3):
            measure(f"cluster {blocks}x{size} + {k} barriers", lambda k=k, blocks=blocks, size=size: chain(blocks, size, k, False),
                    f"{blocks // size} clusters of {size}")
    # The bulk-copy burst: a block's whole share in flight at once (at most 128 KB of shared
    # memory a block, so at least 64 blocks), one or two blocks a multiprocessor.
    d.set_smem(f["cluster_chain"], BURST_BYTES // 64)
    for blocks, size in ((64, 16), (64, 8), (128, 16), (128, 8), (256, 8)):
        for k in (0, 1, 2, 3):
            measure(f"bulk {blocks}x{size} + {k} barriers", lambda k=k, blocks=blocks, size=size: chain(blocks, size, k, True),
                    f"{blocks // size} clusters of {size}, {BURST_BYTES // blocks // 1024} KB a block")
    # The one-launch step's whole chain with nothing computed: the burst, a hand-over (the
    # scores' normalisers), the selected blocks' 2 MB read cold after it (16 blocks of 64 keys,
    # K and V, four KV heads: 32 KB a block of 64), a hand-over (the final merge).
    for blocks, size in ((64, 16), (64, 8), (128, 8)):
        dep_c = SELECTED_BYTES // 16 // blocks
        measure(f"bulk {blocks}x{size} + dependent read + 2 barriers",
                lambda blocks=blocks, size=size, dep_c=dep_c: chain(blocks, size, 2, True, dep_c),
                f"{SELECTED_BYTES * 1e-6:.1f} MB after the first, {dep_c * 16 // 1024} KB a block")
    print("\nchain probe table (us):")
    for name, med, lo, note in rows:
        print(f"| {name} | {med:.2f} | {lo:.2f} | {note} |")


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "--self-test":
        self_test()
    elif len(sys.argv) >= 3 and sys.argv[1] == "build":
        build(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "run":
        run(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
