// The compressed branch of large decode waves as one persistent, warp-specialised launch
// (docs/DECODE_NOTES.md, variant 130): `cmp_stream`.
#ifndef NSA_COMPRESSED_STREAM_CUH
#define NSA_COMPRESSED_STREAM_CUH

#include "attend_mma.cuh"
#include "selection.cuh"

// Why: `cmp_mma` gives each block one split of one (row, KV head) pair; a block pays its
// prologue (row, Q, page-table entries, first copies) and its epilogue (the merge of its warps'
// states) with its ring of stages drained, and a launch of such blocks ends when its slowest
// multiprocessor does. Here a grid of NSA_CS_THREADS-thread blocks, two a multiprocessor,
// streams the wave's items (each pair's `nsplit_c` compressed splits, then its window units
// when `MODE_CS_WINDOW` is set), item b, b + grid, ... to block b, through one ring of 16-key
// tiles that is never drained between items:
//
//   warp 5 (scheduler)  prepares items NSA_CS_SLOTS ahead into slots (the row, the Q tile, the
//                       page-table entries and first positions of the first NSA_CS_SRC tiles;
//                       for a selected unit the pair's merged block list first), and merges each
//                       item's four warp states into its partial and the pair's hand-over to
//                       the selection (MODE_SEL_FLOW), as `cmp_mma`'s blocks write them;
//   warp 4 (copier)     copies tile k of the block's stream into stage k % S by 16-byte cp.async
//                       in the swizzled boxes' layout, completing on the stage's full mbarrier;
//   warps 0-3 (math)    tile k goes to warp k % 4, whatever its item: `mma_tile`, then the
//                       stage's empty mbarrier; at an item's end each leaves its state in shared
//                       memory for the scheduler and goes on with the next item's tiles.
//
// With MODE_SW_STREAM (variant 131) the same kernel runs after the selection in `sw_mma`'s
// place: its items are each pair's selected units (the scheduler folds the selection chunks'
// lists into the pair's top n, `cs_pair_list`, and gives a unit its `spb` blocks) and, with
// MODE_CS_WINDOW, its window units; no compressed split, no hand-over (the combine waits for
// the launch). Every kind sees its keys by one rule: key jj of a tile whose first position is
// pos0 is visible iff first <= pos0 + jj <= last.
//
// Hand-overs: a slot's full mbarrier (the scheduler's 32 lanes arrive once it is written;
// item i in slot i % SLOTS, phase (i / SLOTS) & 1); named barrier 1 (the math warps' states
// of an item written: the scheduler waits) and 2 (the scheduler has read them: the math warps
// wait before writing the next item's). A slot is refilled only after its item's states are
// in, by which time the copier is done with it too (every tile of the item was copied before
// the math warps could finish it).

#define CS_MATH_WARPS 4
#define CS_UNIT_BLOCKS 8  // the most selected blocks a unit (the host's `launch::sw_stream_fits`)
#define CS_COPY_WARP 4
#define CS_SCHED_WARP 5
// Launch mode bits (src/cuda/params.rs): MODE_CS_WINDOW, the window's units are items too;
// MODE_SW_STREAM, the launch after the selection (variant 131): each pair's selected units
// (`spb` blocks of its list, the selection chunks' lists merged by the scheduler) are its
// items, in `sw_mma`'s place, and no compressed split.
#define MODE_CS_WINDOW (1 << 18)
#define MODE_SW_STREAM (1 << 19)
static_assert(NSA_CS_THREADS == 32 * (CS_MATH_WARPS + 2), "four math warps, a copier, a scheduler");
static_assert(8 * (NSA_CS_SLOTS + 2 * NSA_CS_MAX_STAGES) <= NSA_CS_BAR_BYTES, "the mbarriers fit their area");

// One item, as the scheduler resolved it.
struct CsItem {
    const u16* kpool;
    const u16* vpool;
    const int* table;  // the sequence's page table (compressed or raw)
    float* lg;         // group sums of the item's heads (compressed), else null
    int wr, kvh, lo, n;
    int first, last;  // visible positions (compressed tokens for a compressed split)
    int sel;          // a selected unit: its `spb` blocks (-1: none) in `blocks`
    int blocks[CS_UNIT_BLOCKS];
    int u;      // partial slot
    int pair;   // hand-over to the selection (compressed splits with MODE_SEL_FLOW), else -1
    int ntiles, hcn, hg0;
};
static_assert(sizeof(CsItem) <= NSA_CS_DESC_BYTES, "an item's descriptor fits its slot's head");

// Shared memory (bytes from the dynamic base): mbarriers | slots (descriptor, the first
// NSA_CS_SRC tiles' (z, y, first position) entries, the Q tile of 16 rows of DK + 8) | the math warps' maxima,
// sums, the scheduler's factors, accumulators [4][16][DV + 8] f32 | the ring, from the next
// 1024-byte boundary: S stages of K [DK / 64][16][64] and V [DV / 64][16][64]. The host's
// twin is `build::smem_cmp_stream`.
template <int DK, int DV>
struct CsLayout {
    // The states' rows are padded by 4 floats, not 8: they are written once an item, and the
    // 1 KB this saves keeps 8 ring stages at 128/128 (two-way conflicts on those stores).
    static constexpr int QS = DK + 8, DVP = DV + 4;
    static constexpr int SLOT = NSA_CS_DESC_BYTES + NSA_CS_SRC * 8 + 16 * QS * 2;
    static constexpr int SLOTS_AT = NSA_CS_BAR_BYTES;
    static constexpr int MW_AT = SLOTS_AT + NSA_CS_SLOTS * SLOT;
    static constexpr int LW_AT = MW_AT + CS_MATH_WARPS * 16 * 4;
    static constexpr int FAC_AT = LW_AT + CS_MATH_WARPS * 16 * 4;
    static constexpr int ACC_AT = FAC_AT + CS_MATH_WARPS * 16 * 4;
    static constexpr int END = ACC_AT + CS_MATH_WARPS * 16 * DVP * 4;
    static constexpr int STAGE = NSA_MMA_KEYS * (DK + DV) * 2;
};

// The first position of the item's tile t: from its block for a selected unit (-1 for a
// missing one), else its place in the range.
__device__ __forceinline__ int cs_tile_pos(const Params& p, const CsItem& it, int t) {
    if (!it.sel) return it.lo + t * NSA_MMA_KEYS;
    const int per = p.shape.sel_block / NSA_MMA_KEYS, b = it.blocks[t / per];
    return b >= 0 ? b * p.shape.sel_block + (t - t / per * per) * NSA_MMA_KEYS : -1;
}
// The item's tile t as (z = page * HKV + kvh, y = row in page), y = -1 where none of its keys
// is visible (nothing to copy; the math warps skip it by the same rule, `first..last`).
__device__ __forceinline__ int2 cs_tile_entry(const Params& p, const CsItem& it, int t) {
    const int pos0 = t < it.ntiles ? cs_tile_pos(p, it, t) : -1;
    if (pos0 < 0 || min(pos0 + NSA_MMA_KEYS - 1, it.last) < max(pos0, it.first)) return make_int2(0, -1);
    const int pg = pos0 / p.paging.page_size;
    return make_int2(it.table[pg] * p.shape.num_kv_heads + it.kvh, pos0 - pg * p.paging.page_size);
}

// The top `sel_count` blocks of the pair (wr, kvh), best-first, lane x holding the x-th (-1
// past the count), by this warp alone folding the selection chunks' lists (`sel_merge_lists`'
// result: the top n of the union is the same whatever the fold's order); written in block
// order to `usel` too where given (the caller's selection). Every lane calls it.
__device__ int cs_pair_list(const Params& p, int wr, int kvh, int t, int* usel) {
    const int lane = threadIdx.x & 31, n = p.shape.sel_count, nch = p.launch.sel_chunks;
    const int nblk = t / p.shape.sel_block + 1, count = min(n, nblk);
    if (nblk <= n) {  // every block (the selection wrote no lists)
        if (usel && lane < n) usel[lane] = lane < nblk ? lane : -1;
        return lane < nblk ? lane : -1;
    }
    const unsigned* lists = (const unsigned*)p.ws.scores + ((usize)wr * p.shape.num_kv_heads + kvh) * p.ws.max_blocks;
    auto entry = [&](int c, int e, unsigned& k, int& i) {  // chunk c's entry e (pads past n)
        k = e < n ? lists[2 * (c * n + e)] : 0u;
        i = e < n ? (int)lists[2 * (c * n + e) + 1] : SEL_PAD;
    };
    unsigned k;
    int i;
    entry(0, lane, k, i);
    for (int c = 1; c < nch; c++) {
        unsigned bk;
        int bi;
        entry(c, 31 - lane, bk, bi);
        sel_merge32(k, i, bk, bi);
    }
    const int best = lane < count && i != SEL_PAD ? i : -1;
    if (usel) sel_put_by_block(i, count, n, [&](int x, int j) { usel[x] = j; });
    return best;
}

// The scheduler's preparation of the block's item `id` into `slot` (the whole warp): the row
// and the Q loads first (they need the item's index only), the item's keys, its first tiles'
// page-table entries; then the slot's mbarrier. Reads only what the step's upload and the
// caller wrote before the layer's first kernel, so it may run before the wait on the append.
template <int DK, int DV>
__device__ void cs_prepare(const Params& p, unsigned char* slot, int id, int per_pair, unsigned bar) {
    using L = CsLayout<DK, DV>;
    const int lane = threadIdx.x & 31, HKV = p.shape.num_kv_heads;
    const int pair = id / per_pair, j = id - pair * per_pair;
    const int wr = pair / HKV, kvh = pair - wr * HKV, r = p.launch.row0 + wr;
    const int hcn = min(16, p.shape.group_size), hg0 = kvh * p.shape.group_size;
    const u16* qsrc = (const u16*)p.io.q + ((usize)r * p.shape.num_q_heads + hg0) * DK;
    constexpr int CPR = DK / 8, QN = (16 * CPR + 31) / 32;
    uint4 qx[QN];
#pragma unroll
    for (int k = 0; k < QN; k++) {
        const int e = lane + 32 * k, h = e / CPR, c = (e - h * CPR) * 8;
        qx[k] = e < 16 * CPR && h < hcn ? *(const uint4*)(qsrc + (usize)h * DK + c) : make_uint4(0, 0, 0, 0);
    }
    const int2 tm = ((const int2*)p.step.rows)[r];
    CsItem it;
    it.wr = wr;
    it.kvh = kvh;
    it.hcn = hcn;
    it.hg0 = hg0;
    const bool sw = (p.launch.mode & MODE_SW_STREAM) != 0;
    const int ncmp = sw ? 0 : p.launch.nsplit_c;  // the launch's compressed items a pair
    it.sel = sw && j < p.launch.units_s;
    if (it.sel) {
        // Selected unit j: blocks j * spb.. of the pair's list, its partial slot nsplit_c + j.
        int* usel = j == 0 && p.io.selected ? (int*)p.io.selected + ((usize)r * HKV + kvh) * p.shape.sel_count : (int*)0;
        const int best = cs_pair_list(p, wr, kvh, tm.y, usel);
        const int b0 = j * p.launch.spb;
        it.kpool = (const u16*)p.paging.raw_k;
        it.vpool = (const u16*)p.paging.raw_v;
        it.table = (const int*)p.paging.raw_tab + (usize)tm.x * p.paging.pages_per_seq;
        it.lg = nullptr;
        it.lo = 0;
        it.n = min(p.launch.spb, p.shape.sel_count - b0) * p.shape.sel_block;
        it.first = 0;
        it.last = tm.y;
        it.u = p.launch.nsplit_c + j;
        it.pair = -1;
#pragma unroll
        for (int x = 0; x < CS_UNIT_BLOCKS; x++) it.blocks[x] = __shfl_sync(0xffffffffu, best, min(b0 + x, 31));
    } else if (j < ncmp) {
        int lo, hi;
        split_range(num_cmp(p, tm.y + 1), p.launch.nsplit_c, j, lo, hi);
        it.kpool = (const u16*)p.paging.cmp_k;
        it.vpool = (const u16*)p.paging.cmp_v;
        it.table = (const int*)p.paging.cmp_tab + (usize)tm.x * p.paging.cmp_pages_per_seq;
        it.lg = (float*)p.ws.logits + ((usize)wr * p.shape.num_q_heads + hg0) * p.ws.max_cmp;
        it.lo = lo;
        it.n = hi - lo;
        it.first = 0;
        it.last = hi - 1;
        it.u = j;
        it.pair = (p.launch.mode & MODE_SEL_FLOW) ? pair : -1;
    } else {
        const int c = j - (sw ? p.launch.units_s : ncmp);
        const Keys ks = window_keys(p, tm.y, c);
        it.kpool = (const u16*)p.paging.raw_k;
        it.vpool = (const u16*)p.paging.raw_v;
        it.table = (const int*)p.paging.raw_tab + (usize)tm.x * p.paging.pages_per_seq;
        it.lg = nullptr;
        it.lo = ks.lo;
        it.n = ks.n;
        it.first = ks.first;
        it.last = ks.lo + ks.n - 1;
        it.u = p.launch.nsplit_c + p.launch.units_s + c;
        it.pair = -1;
    }
    it.ntiles = (it.n + NSA_MMA_KEYS - 1) / NSA_MMA_KEYS;
    // The descriptor first: the entries index its block list (shared, not a local array).
    if (lane == 0) *(CsItem*)slot = it;
    __syncwarp();
    const int2 e = cs_tile_entry(p, *(const CsItem*)slot, lane);
    u16* q = (u16*)(slot + NSA_CS_DESC_BYTES + NSA_CS_SRC * 8);
#pragma unroll
    for (int k = 0; k < QN; k++) {
        const int x = lane + 32 * k, h = x / CPR, c = (x - h * CPR) * 8;
        if (x < 16 * CPR) *(uint4*)(q + h * L::QS + c) = qx[k];
    }
    static_assert(NSA_CS_SRC == 32, "a lane's entry a tile");
    ((int2*)(slot + NSA_CS_DESC_BYTES))[lane] = e;
    __syncwarp();
    mbar_arrive(bar);
}

// Warp 4: every tile of the block's stream into the ring.
template <int DK, int DV>
__device__ void cs_copier(const Params& p, unsigned char* slots, u16* ring, unsigned bar_slot, unsigned bar_full, unsigned bar_empty,
                          int count) {
    using L = CsLayout<DK, DV>;
    const int lane = threadIdx.x & 31, S = p.launch.nstage;
    // One copy form with a policy always: with `cp_async16_pol`'s two forms chosen at run time,
    // NVRTC 13.0's ptxas gave the 192/128 entries LDGSTS with an odd descriptor register
    // (desc[UR1]), which the H200 faults on as an illegal instruction (docs/DECODE_NOTES.md,
    // the forty-fifth session).
    const u64 pol = (p.launch.mode & 8) ? l2_evict_first() : l2_evict_normal();
    // Tile k of the stream sits in stage `st` (k % S), round `round` (k / S).
    int st = 0, round = 0;
    for (int i = 0; i < count; i++) {
        const int s = i % NSA_CS_SLOTS;
        mbar_wait(bar_slot + 8 * s, (unsigned)((i / NSA_CS_SLOTS) & 1));
        const unsigned char* slot = slots + s * L::SLOT;
        const CsItem it = *(const CsItem*)slot;
        int2 e = ((const int2*)(slot + NSA_CS_DESC_BYTES))[lane];
        for (int t = 0; t < it.ntiles; t++) {
            // Later rounds of 32 tiles (contiguous items only: the host keeps a selected unit
            // within 32 tiles): the lane's entry looked up here (the ring holds a few
            // microseconds of tiles, more than the page table's round trip).
            if (t > 0 && (t & 31) == 0) e = cs_tile_entry(p, *(const CsItem*)slot, t + lane);
            const int z = __shfl_sync(0xffffffffu, e.x, t & 31), y = __shfl_sync(0xffffffffu, e.y, t & 31);
            if (round > 0) mbar_wait(bar_empty + 8 * st, (unsigned)((round - 1) & 1));
            if (y >= 0) {
                u16* kd = ring + st * (L::STAGE / 2);
                const usize row0 = (usize)z * p.paging.page_size + y;
                box_rows_async<true>(kd, it.kpool + row0 * DK, DK, pol);
                box_rows_async<true>(kd + NSA_MMA_KEYS * DK, it.vpool + row0 * DV, DV, pol);
            }
            cp_async_mbar_arrive(bar_full + 8 * st);
            if (++st == S) {
                st = 0;
                round++;
            }
        }
    }
    // The copies land before the warp leaves (the math warps wait on them).
    cp_wait<0>();
}

// Warps 0-3: the block's stream tiles warp, warp + 4, ... through `mma_tile`; at each item's
// end the warp's state into shared memory for the scheduler.
template <class E, int DK, int DV>
__device__ void cs_math(const Params& p, unsigned char* csm, unsigned char* slots, u16* ring, unsigned bar_slot, unsigned bar_full,
                        unsigned bar_empty, int count) {
    using L = CsLayout<DK, DV>;
    constexpr int NVT = 16;
    static_assert(DV <= 8 * NVT, "a lane's accumulators cover DV");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q4 = lane & 3, S = p.launch.nstage;
    const float scl = p.shape.scale, sl2 = scl * 1.4426950408889634f;
    float* mw = (float*)(csm + L::MW_AT);
    float* lw = (float*)(csm + L::LW_AT);
    float* acc = (float*)(csm + L::ACC_AT) + warp * 16 * L::DVP;
    // The warp's next tile k of the stream (stage st, round `round`), and the item's first.
    int k = warp, st = warp, round = 0, kb = 0;
    for (int i = 0; i < count; i++) {
        const int s = i % NSA_CS_SLOTS;
        mbar_wait(bar_slot + 8 * s, (unsigned)((i / NSA_CS_SLOTS) & 1));
        const unsigned char* slot = slots + s * L::SLOT;
        const CsItem it = *(const CsItem*)slot;
        const TileSums ts = tile_sums<true>(p, it.lg);
        const u16* q = (const u16*)(slot + NSA_CS_DESC_BYTES + NSA_CS_SRC * 8);
        const unsigned qa = smem_u32(q + ((lane & 7) + ((lane >> 3) & 1) * 8) * L::QS + (lane >> 4) * 8);
        SoftState<NVT> ss;
        ss.init();
        for (; k < kb + it.ntiles; k += CS_MATH_WARPS) {
            mbar_wait(bar_full + 8 * st, (unsigned)(round & 1));
            // Key jj of the tile is visible iff first <= pos0 + jj <= last (every kind).
            const int tl = k - kb;
            const int pos0 = cs_tile_pos(p, *(const CsItem*)slot, tl);
            const bool whole = pos0 >= 0 && pos0 >= it.first && pos0 + NSA_MMA_KEYS - 1 <= it.last;
            const int pj = pos0 + (lane & (NSA_MMA_KEYS - 1));
            const unsigned vis = whole ? 0xffffu : __ballot_sync(0xffffffffu, pos0 >= 0 && pj >= it.first && pj <= it.last) & 0xffffu;
            if (vis) {
                u16* kt = ring + st * (L::STAGE / 2);
                mma_tile<E, NVT, true>(p, ss, ts, kt, kt + NSA_MMA_KEYS * DK, qa, true, DK, DV, DK, DV, vis, pos0, it.lo + it.n,
                                       it.hcn, scl, sl2);
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(bar_empty + 8 * st);
            st += CS_MATH_WARPS;
            if (st >= S) {
                st -= S;
                round++;
            }
        }
        kb += it.ntiles;
        ss.lA += __shfl_xor_sync(0xffffffffu, ss.lA, 1);
        ss.lA += __shfl_xor_sync(0xffffffffu, ss.lA, 2);
        ss.lB += __shfl_xor_sync(0xffffffffu, ss.lB, 1);
        ss.lB += __shfl_xor_sync(0xffffffffu, ss.lB, 2);
        // The previous item's states read by the scheduler before this one's go in.
        if (i > 0) named_bar_sync(2, 32 * (CS_MATH_WARPS + 1));
        if (q4 == 0) {
            mw[warp * 16 + g] = ss.mA;
            mw[warp * 16 + g + 8] = ss.mB;
            lw[warp * 16 + g] = ss.lA;
            lw[warp * 16 + g + 8] = ss.lB;
        }
#pragma unroll
        for (int d = 0; d < NVT; d++) {
            if (d * 8 < DV) {
                const int c = d * 8 + q4 * 2;
                *(float2*)(acc + g * L::DVP + c) = make_float2(ss.o[d][0], ss.o[d][1]);
                *(float2*)(acc + (g + 8) * L::DVP + c) = make_float2(ss.o[d][2], ss.o[d][3]);
            }
        }
        // The item's group sums visible at the device scope before the scheduler's hand-over.
        if (it.pair >= 0) __threadfence();
        named_bar_arrive(1, 32 * (CS_MATH_WARPS + 1));
    }
}

// Warp 5: items prepared NSA_CS_SLOTS ahead; each item's four states merged into its partial
// ((m, l) and the DV-column accumulator rows of its heads, `cmp_mma`'s layout) and, for a
// compressed split with MODE_SEL_FLOW, the pair's count of finished splits raised.
template <int DK, int DV>
__device__ void cs_scheduler(const Params& p, unsigned char* csm, unsigned char* slots, unsigned bar_slot, int count, int per_pair) {
    using L = CsLayout<DK, DV>;
    const int lane = threadIdx.x & 31;
    const float* mw = (const float*)(csm + L::MW_AT);
    const float* lw = (const float*)(csm + L::LW_AT);
    float* fac = (float*)(csm + L::FAC_AT);
    const float* acc = (const float*)(csm + L::ACC_AT);
    // The compressed items need nothing the previous launch writes before their copies, so
    // the first ones are prepared before the wait; the selected units need the selection's lists.
    const bool sw = (p.launch.mode & MODE_SW_STREAM) != 0;
    if (sw) pdl_wait_then_trigger(p);
    for (int i = 0; i < min(count, NSA_CS_SLOTS); i++)
        cs_prepare<DK, DV>(p, slots + i * L::SLOT, blockIdx.x + i * gridDim.x, per_pair, bar_slot + 8 * i);
    if (!sw) pdl_wait_then_trigger(p);
    for (int i = 0; i < count; i++) {
        const int s = i % NSA_CS_SLOTS;
        const CsItem it = *(const CsItem*)(slots + s * L::SLOT);
        named_bar_sync(1, 32 * (CS_MATH_WARPS + 1));
        const usize at0 = part_at(p, it.wr, it.hg0, it.u), hs = part_at(p, it.wr, it.hg0 + 1, it.u) - at0;
        if (lane < 16) {
            const int h = lane;
            float m = NEG_INF, l = 0.f;
#pragma unroll
            for (int w = 0; w < CS_MATH_WARPS; w++) m = fmaxf(m, mw[w * 16 + h]);
#pragma unroll
            for (int w = 0; w < CS_MATH_WARPS; w++) {
                const float mv = mw[w * 16 + h], f = (m == NEG_INF || mv == NEG_INF) ? 0.f : fexp(mv - m);
                fac[w * 16 + h] = f;
                l += f * lw[w * 16 + h];
            }
            if (h < it.hcn) {
                float* ml = (float*)p.ws.part_ml + 2 * (at0 + h * hs);
                ml[0] = l != 0.f ? m : NEG_INF;
                ml[1] = l;
            }
        }
        __syncwarp();
        float* pacc = (float*)p.ws.part_acc + at0 * DV;
        for (int e = lane; e < it.hcn * (DV / 4); e += 32) {
            const int h = e / (DV / 4), c = (e - h * (DV / 4)) * 4;
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int w = 0; w < CS_MATH_WARPS; w++) {
                const float f = fac[w * 16 + h];
                const float4 b = *(const float4*)(acc + (w * 16 + h) * L::DVP + c);
                a.x += f * b.x;
                a.y += f * b.y;
                a.z += f * b.z;
                a.w += f * b.w;
            }
            *(float4*)(pacc + h * hs * DV + c) = a;
        }
        __syncwarp();
        if (i + 1 < count) named_bar_arrive(2, 32 * (CS_MATH_WARPS + 1));
        if (it.pair >= 0) {
            __threadfence();
            __syncwarp();
            if (lane == 0) atomicAdd(flow_counters(p, it.pair) + FLOW_SPLITS, 1);
        }
        if (i + NSA_CS_SLOTS < count)
            cs_prepare<DK, DV>(p, slots + s * L::SLOT, blockIdx.x + (i + NSA_CS_SLOTS) * gridDim.x, per_pair, bar_slot + 8 * s);
    }
}

// The entry's body (compiled shapes with 16-aligned pages, sm_90: the host launches it only
// there, with `launch.nstage` stages that keep two blocks a multiprocessor, at least 4).
template <class E, int DK, int DV>
__device__ void cmp_stream(const Params& p) {
#if __CUDA_ARCH__ >= 900
    using L = CsLayout<DK, DV>;
    extern __shared__ __align__(16) unsigned char csm[];
    const int warp = threadIdx.x >> 5, S = p.launch.nstage;
    const unsigned base = smem_u32(csm);
    const unsigned bar_slot = base, bar_full = base + 8 * NSA_CS_SLOTS, bar_empty = bar_full + 8 * NSA_CS_MAX_STAGES;
    unsigned char* slots = csm + L::SLOTS_AT;
    u16* ring = (u16*)(csm + ((base + L::END + 1023u & ~1023u) - base));
    const int per_pair = ((p.launch.mode & MODE_SW_STREAM) ? p.launch.units_s : p.launch.nsplit_c) +
                         ((p.launch.mode & MODE_CS_WINDOW) ? p.launch.units_w : 0);
    const int items = p.launch.rows * p.shape.num_kv_heads * per_pair;
    const int count = (int)blockIdx.x < items ? (items - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
    if (threadIdx.x == 0) {
        for (int s = 0; s < NSA_CS_SLOTS; s++) mbar_init(bar_slot + 8 * s, 32);
        for (int st = 0; st < S; st++) {
            mbar_init(bar_full + 8 * st, 32);
            mbar_init(bar_empty + 8 * st, 1);
        }
        fence_mbar_init();
    }
    __syncthreads();
    if (warp == CS_SCHED_WARP) {
        cs_scheduler<DK, DV>(p, csm, slots, bar_slot, count, per_pair);
    } else {
        pdl_wait_then_trigger(p);
        if (warp == CS_COPY_WARP)
            cs_copier<DK, DV>(p, slots, ring, bar_slot, bar_full, bar_empty, count);
        else
            cs_math<E, DK, DV>(p, csm, slots, ring, bar_slot, bar_full, bar_empty, count);
    }
#endif
}

#endif  // NSA_COMPRESSED_STREAM_CUH
