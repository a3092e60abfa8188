// PTX helpers: tensor-core mma, ldmatrix, cp.async, mbarriers, 1-D bulk copies, tensor-map loads.
#ifndef NSA_PTX_CUH
#define NSA_PTX_CUH

#include "common.cuh"


// Per-block timeline, a diagnostic compiled only with NSA_TIMELINE (`NSA_CUDA_TIMELINE=1`
// at the backend's creation; src/cuda/timeline.rs reads it back): for the first
// NSA_TL_BLOCKS blocks of each kernel slot (the host's `Kernel` index, NSA_TL_SLOT_<stage>),
// NSA_TL_WORDS (12) words: the block's start (thread 0 at entry), the return of its
// `pdl_wait` (thread 0), its end (the last of its warps to return), its multiprocessor,
// and eight marks a kernel may stamp at points of its own (`tl_mark`, thread 0; 0 where
// none), global-timer nanoseconds. `pdl_wait` and `tl_mark` find their kernel's slot
// through `nsa_tl_warp_slot`, indexed by (multiprocessor, warp slot), which the entry
// writes: no shared memory is added.
#ifdef NSA_TIMELINE
__device__ unsigned long long nsa_timeline[NSA_TL_SLOTS * NSA_TL_BLOCKS * NSA_TL_WORDS];
__device__ int nsa_tl_warp_slot[NSA_TL_SMS * 64];
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned tl_smid() {
    unsigned r;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned tl_warp_at() {
    unsigned w;
    asm volatile("mov.u32 %0, %%warpid;" : "=r"(w));
    return (tl_smid() % NSA_TL_SMS) * 64 + (w & 63);
}
// This block's record in `slot`, or null past NSA_TL_BLOCKS.
__device__ __forceinline__ unsigned long long* tl_record(int slot) {
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    return b < NSA_TL_BLOCKS ? nsa_timeline + ((usize)slot * NSA_TL_BLOCKS + b) * NSA_TL_WORDS : nullptr;
}
struct TimelineScope {
    int slot;
    __device__ explicit TimelineScope(int s) : slot(s) {
        if ((threadIdx.x & 31) == 0) nsa_tl_warp_slot[tl_warp_at()] = s;
        unsigned long long* r = tl_record(s);
        if (threadIdx.x == 0 && r) {
            r[0] = global_ns();
            r[3] = tl_smid();
        }
    }
    __device__ ~TimelineScope() {
        unsigned long long* r = tl_record(slot);
        if ((threadIdx.x & 31) == 0 && r) atomicMax(&r[2], global_ns());
    }
};
// Thread 0 stamps word `w` of this block's record (its kernel's slot from the warp table).
__device__ __forceinline__ void tl_stamp(int w) {
    if (threadIdx.x == 0) {
        unsigned long long* r = tl_record(nsa_tl_warp_slot[tl_warp_at()]);
        if (r) r[w] = global_ns();
    }
}
__device__ __forceinline__ void tl_wait_stamp() { tl_stamp(1); }
// Mark K (0..7) of this block: thread 0 stamps it when it passes here.
template <int K>
__device__ __forceinline__ void tl_mark() {
    tl_stamp(4 + K);
}
// Mark K once `v` (a register a load writes) has arrived: the stamp waits on it, so it
// times a load's return rather than its issue. No code in a normal build.
template <int K>
__device__ __forceinline__ void tl_mark_after(float v) {
    asm volatile("" ::"f"(v));
    tl_mark<K>();
}
#define NSA_TIMELINE_SCOPE(stage) TimelineScope nsa_timeline_scope(NSA_TL_SLOT_##stage)
#else
#define NSA_TIMELINE_SCOPE(stage)
__device__ __forceinline__ void tl_wait_stamp() {}
template <int K>
__device__ __forceinline__ void tl_mark() {}
template <int K>
__device__ __forceinline__ void tl_mark_after(float) {}
#endif

// Programmatic dependent launch (sm_90+; no-ops elsewhere and when the launch did not ask
// for it). A kernel launched as a dependent may start while its predecessor on the stream
// still runs: `pdl_wait` blocks until every predecessor grid has finished and its writes
// are visible, so it must come before any read of a predecessor's output and before any
// global write (the next wave reuses the workspace). `pdl_trigger` lets the stream's next
// kernel start launching once every block of this one has called it or exited. Every
// dependent block calls `pdl_wait` before it exits, so a grid's completion implies its
// predecessors' (a kernel two launches later may read what the first one wrote).
__device__ __forceinline__ void pdl_wait_untimed() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
    pdl_wait_untimed();
    tl_wait_stamp();
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// `launch.mode` bit (src/cuda/params.rs MODE_LATE_TRIGGER): the entry lets the next launch
// start only once its own wait has returned (`pdl_wait_then_trigger`), not at entry: the
// next kernel's blocks become resident while this one computes, not while it still waits.
// Measured faster at batch 1-16 for the compressed, selection and selected kernels (why
// is not settled; docs/DECODE_NOTES.md, variants 46-47). Entries and bodies that honour
// it: the tensor-core attention kernels, the selection and the combines.
#define MODE_LATE_TRIGGER 1024
__device__ __forceinline__ void pdl_trigger_at_entry(const Params& p) {
    if (!(p.launch.mode & MODE_LATE_TRIGGER)) pdl_trigger();
}
__device__ __forceinline__ void pdl_wait_then_trigger(const Params& p) {
    pdl_wait();
    if (p.launch.mode & MODE_LATE_TRIGGER) pdl_trigger();
}

// Per-(row, KV head) hand-overs between a wave's launches by counters instead of each
// launch waiting for the whole previous one (docs/DECODE_NOTES.md, variant 76), so the
// work of a pair whose inputs are done runs while the previous launch's slowest
// multiprocessors still stream. `launch.mode` bits (src/cuda/params.rs): MODE_SEL_FLOW,
// the compressed splits to the selection; MODE_SW_FLOW, the selection's chunk blocks to
// the selected units. A producer block counts itself done once its outputs are written
// (`flow_signal`); a consumer block waits for its pair's count (`flow_wait`). Each hand-over
// has two words among the pair's NSA_PAIR_COUNTERS workspace counters (`ws.count`; word 0 is the
// selection's last-block counter): done, then how many consumers saw it complete, the last
// of which sets both back to 0 for the next wave or layer (every other consumer has seen the
// count, and no producer adds to it again in this launch). A block that skips the wait at
// entry still calls `pdl_wait_untimed` before it exits, so the grid's completion keeps
// implying its predecessors' (see above); producers are resident or done before any
// consumer starts (the consumer launch starts only once every producer block has
// triggered), so a consumer never waits on a block that cannot run.
#define MODE_SEL_FLOW 8192
#define MODE_SW_FLOW 16384
// `pf_sel` (kernels/prefill.cuh): the fewest positions of a tile that must have chosen a block
// for it to be copied once for them (0: two; 1: three; 2: all of the tile's positions), in
// bits 15-16 of `launch.mode` (src/cuda/params.rs MODE_PF_SEL_SHARE_MIN_SHIFT).
#define MODE_PF_SEL_SHARE_MIN_SHIFT 15
// `pf_sel` on sm_90a: the blocks all of a tile's positions chose are multiplied by the
// block's warps as one warpgroup (src/cuda/params.rs MODE_PF_SEL_WG).
#define MODE_PF_SEL_WG 131072
// Decode (variant 142, src/cuda/params.rs MODE_WIN_LOCAL): the window's first unit covers exactly
// the forced local blocks' keys, and its partial is the selected branch's for them too (the same
// queries, keys and causal mask: the local blocks lie inside the window), so the selected units
// skip those blocks and the combine counts that unit in both branches.
#define MODE_WIN_LOCAL (1 << 21)
#define FLOW_SPLITS 1  // the words of the splits' hand-over
#define FLOW_LISTS 3   // the words of the selection lists' hand-over
static_assert(FLOW_LISTS + 2 <= NSA_PAIR_COUNTERS, "the hand-overs' words fit the pair's counters");
__device__ __forceinline__ int* flow_counters(const Params& p, usize pair) {
    return (int*)p.ws.count + NSA_PAIR_COUNTERS * pair;
}
// Every thread of the block calls it, after its last global write of the outputs.
__device__ __forceinline__ void flow_signal(int* done) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(done, 1);
}
// Every thread of the block calls it; returns once `need` producers have signalled, their
// writes visible to the whole block (thread 0's acquire load, then the block barrier).
// `consumers`: the blocks that wait on this count in this launch.
__device__ __forceinline__ void flow_wait(int* done, int need, int consumers) {
    if (threadIdx.x == 0) {
        for (;;) {
            int v;
            asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(done) : "memory");
            if (v >= need) break;
            __nanosleep(64);
        }
        if (atomicAdd(done + 1, 1) == consumers - 1) {
            atomicExch(done, 0);
            atomicExch(done + 1, 0);
        }
    }
    __syncthreads();
}

// Bytes of dynamic shared memory this launch was given.
__device__ __forceinline__ unsigned dyn_smem_bytes() {
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned smem_u32(const void* ptr) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(ptr));
    return r;
}
// Plain shared-memory loads at a 32-bit shared address (volatile: the tiles they read are
// written by copies the compiler does not see).
__device__ __forceinline__ unsigned lds32(unsigned a) {
    unsigned r;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r) : "r"(a) : "memory");
    return r;
}
__device__ __forceinline__ uint4 lds128(unsigned a) {
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a) : "memory");
    return r;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// cp_async16 from src + OFF bytes, the offset an immediate of the instruction: unrolled copies
// of rows at fixed strides then share one 64-bit address register (prefill variant 22b).
template <int OFF>
__device__ __forceinline__ void cp_async16_at(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1+%3], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes), "n"(OFF) : "memory");
}
// A whole 16-byte cp.async, with the L2 eviction policy `pol` when it is not 0.
__device__ __forceinline__ void cp_async16_pol(unsigned dst, const void* src, unsigned long long pol) {
    if (pol)
        asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "l"(pol) : "memory");
    else
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm4(unsigned a, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a)
                 : "memory");
}
__device__ __forceinline__ void ldsm4t(unsigned a, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a)
                 : "memory");
}
template <int MMA>
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
    if (MMA == 1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}
// 1-D bulk copies (the copy engine, sm_90) completing on an mbarrier.
__device__ __forceinline__ void mbar_init(unsigned bar, int count) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_inval(unsigned bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void mbar_expect(unsigned bar, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// A plain arrive (release, CTA scope): for barriers that count threads, not bytes.
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
#if __CUDA_ARCH__ >= 900
    unsigned ok = 0;
    while (!ok) {
        asm volatile(
            "{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }"
            : "=r"(ok)
            : "r"(bar), "r"(parity)
            : "memory");
    }
#endif
}
__device__ __forceinline__ void fence_async_smem() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}
// Per-warpgroup register budget (sm_90a): every warp of the warpgroup executes the same
// call. `dec` hands registers back to the block's pool, `inc` waits until the pool holds
// enough; ptxas allocates the code after it within the new count.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
#endif
}
__device__ __forceinline__ void fence_mbar_init() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_g2s(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
#endif
}

// A box of a 3-D tensor map (in global memory) into shared memory, completing on an mbarrier.
__device__ __forceinline__ void tma_load3(unsigned dst, u64 map, int x, int y, int z, unsigned bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];" ::"r"(dst),
        "l"(map), "r"(x), "r"(y), "r"(z), "r"(bar)
        : "memory");
#endif
}

// An L2 policy that makes the lines a copy brings in the first to be evicted: for data
// read once (decode's K/V streams), so that what the step writes beside them (logits,
// partials) stays in L2 for the kernels that read it next.
__device__ __forceinline__ u64 l2_evict_first() {
    u64 pol = 0;
#if __CUDA_ARCH__ >= 900
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
#endif
    return pol;
}
// A hint: the 128-byte line at `ptr` into the L2 (no architectural effect, so it may precede
// `pdl_wait` on any address). Into L2, not L1: an L1 prefetch before the wait measured
// nothing (docs/DECODE_NOTES.md, variants 41 and 51).
__device__ __forceinline__ void prefetch_l2(const void* ptr) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}
// The `bytes` bytes at global address `a` into L2 by the block's threads, a line each.
__device__ __forceinline__ void prefetch_range(usize a, usize bytes) {
    const usize end = a + bytes;
    for (a = (a & ~(usize)127) + (usize)threadIdx.x * 128; a < end; a += (usize)blockDim.x * 128) prefetch_l2((const void*)a);
}
// Fetches a tensor map (a generic address of its 128 bytes in global memory) into the
// multiprocessor's descriptor cache ahead of its first copy.
__device__ __forceinline__ void prefetch_tensormap(u64 map) {
#if __CUDA_ARCH__ >= 900
    asm volatile("prefetch.tensormap [%0];" ::"l"(map) : "memory");
#endif
}

// `tma_load3` with an L2 cache policy (`l2_evict_first`).
__device__ __forceinline__ void tma_load3_hint(unsigned dst, u64 map, int x, int y, int z, unsigned bar, u64 pol) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
        "%3, %4}], [%5], %6;" ::"r"(dst),
        "l"(map), "r"(x), "r"(y), "r"(z), "r"(bar), "l"(pol)
        : "memory");
#endif
}

template <int MMA>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return MMA == 1 ? EBF16::pk(lo, hi) : EF16::pk(lo, hi);
}

#endif  // NSA_PTX_CUH
