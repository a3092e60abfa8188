// Selected blocks + sliding window attention.
#ifndef NSA_SELECTED_CUH
#define NSA_SELECTED_CUH

#include "attend.cuh"
#include "attend_mma.cuh"
#include "selection.cuh"

// Selected blocks (units 0..sel_count) and window chunks of sel_block keys (units sel_count..).
template <class E>
__device__ void sw_partial(const Params& p) {
    int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, u = blockIdx.z;
    int t = ((const int2*)p.step.rows)[r].y;
    int lo, hi;
    if (u < p.launch.units_s) {
        int j = ((const int*)p.ws.sel)[((usize)wr * p.shape.num_kv_heads + kvh) * p.shape.sel_count + u];
        if (j < 0) {
            lo = hi = 0;
        } else {
            lo = j * p.shape.sel_block;
            hi = min(lo + p.shape.sel_block, t + 1);
        }
    } else {
        int c = u - p.launch.units_s;
        int wlo = max(0, t + 1 - p.shape.window);
        lo = wlo + c * p.shape.sel_block;
        hi = min(lo + p.shape.sel_block, t + 1);
        if (hi < lo) hi = lo;
    }
    attend_group<E>(p, r, wr, kvh, lo, hi, false, p.launch.nsplit_c + u);
}

// With `mode & 512`: the top n of one (row, KV head) from its chunk blocks' best-n lists
// (kernels/selection.cuh, `lists`), into `sl` (shared, n ints: blocks best-first, -1 past
// the count), and, where `usel` is given, into it in block order, -1 padded. Every thread
// of the block calls it (NSA_MMA_WARPS warps): warp w folds lists w, w + NSA_MMA_WARPS, ...
// (one round trip for all its loads, then a bitonic merge pass per list), warp 0 folds the
// warps' lists. The top n of all blocks lies in the union of the chunks' top n (the same
// order: higher score, then lower block), so the result is the single-list selection's.
__device__ void sel_merge_lists(const Params& p, int wr, int kvh, int t, int* sl, int* usel) {
    __shared__ unsigned wk[NSA_MMA_WARPS][32];
    __shared__ int wi[NSA_MMA_WARPS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n = p.shape.sel_count, nch = p.launch.sel_chunks;
    const int nblk = t / p.shape.sel_block + 1, count = min(n, nblk);
    // MODE_WIN_LOCAL: the forced local blocks (from `lb`) are the window's first unit's (kernels/ptx.cuh):
    // the selected units skip them (`sl` -1), the caller's selection keeps them.
    const int lb = (p.launch.mode & MODE_WIN_LOCAL) ? local_start(p, t) / p.shape.sel_block : 0x7fffffff;
    if (nblk <= n) {  // every block (the selection wrote no lists)
        if (warp == 0) {
            for (int x = lane; x < n; x += 32) {
                sl[x] = x < nblk && x < lb ? x : -1;
                if (usel) usel[x] = x < nblk ? x : -1;
            }
        }
        return;
    }
    const unsigned* lists = (const unsigned*)p.ws.scores + ((usize)wr * p.shape.num_kv_heads + kvh) * p.ws.max_blocks;
    // Entry e of chunk c's list as seen by this lane (pads past n).
    auto entry = [&](int c, int e, unsigned& k, int& i) {
        if (e < n) {
            k = lists[2 * (c * n + e)];
            i = (int)lists[2 * (c * n + e) + 1];
        } else {
            k = 0u;
            i = SEL_PAD;
        }
    };
    unsigned k = 0u;
    int i = SEL_PAD;
    constexpr int MAXL = 4;  // lists a warp folds: NSA_MMA_WARPS * MAXL >= the most chunks (host-checked)
    unsigned ck[MAXL];
    int ci[MAXL];
#pragma unroll
    for (int m = 0; m < MAXL; m++) {
        const int c = warp + m * NSA_MMA_WARPS;
        if (c < nch) entry(c, m == 0 ? lane : 31 - lane, ck[m], ci[m]);
    }
    if (warp < nch) {
        k = ck[0];
        i = ci[0];
    }
    tl_mark_after<6>(__uint_as_float(k));  // the timeline (marks 6, 7: selected units): lists loaded
#pragma unroll
    for (int m = 1; m < MAXL; m++)
        if (warp + m * NSA_MMA_WARPS < nch) sel_merge32(k, i, ck[m], ci[m]);
    wk[warp][lane] = k;
    wi[warp][lane] = i;
    __syncthreads();
    if (warp == 0) {
        for (int w = 1; w < NSA_MMA_WARPS; w++) sel_merge32(k, i, wk[w][31 - lane], wi[w][31 - lane]);
        for (int x = lane; x < n; x += 32) sl[x] = x < count && i != SEL_PAD && i < lb ? i : -1;
        tl_mark<7>();  // the pair's list merged
        if (usel) sel_put_by_block(i, count, n, [&](int x, int j) { usel[x] = j; });
    }
}

// Selected blocks (units 0..units_s, `spb` blocks each) and window chunks of sel_block * spb
// keys (units units_s..), tensor cores.
template <class E, int NVT, int DKT, int DVT, int CP = MMA_COPY_MODE>
__device__ void sw_mma(const Params& p) {
    int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, u = blockIdx.z;
    int2 tm = ((const int2*)p.step.rows)[r];
    int t = tm.y;
    Keys ks;
    __shared__ int sl[32];  // `mode & 512`: the pair's selected blocks (sel_merge_lists)
    const bool lists = (p.launch.mode & 512) != 0 && u < p.launch.units_s;
    // MODE_SW_FLOW (with the lists): a selected unit waits for its pair's selection blocks
    // only, a window unit for nothing (its keys were appended before the selection launch
    // started: every compressed block had returned from its wait on the append).
    const bool flow = (p.launch.mode & (MODE_SW_FLOW | 512)) == (MODE_SW_FLOW | 512);
    const int* table = (const int*)p.paging.raw_tab + (usize)tm.x * p.paging.pages_per_seq;
    if (u < p.launch.units_s) {
        int b0 = u * p.launch.spb;
        ks.blocks = (lists ? sl : (const int*)p.ws.sel + ((usize)wr * p.shape.num_kv_heads + kvh) * p.shape.sel_count) + b0;
        ks.lo = 0;
        ks.n = min(p.launch.spb, p.shape.sel_count - b0) * p.shape.sel_block;
        ks.t = t;
        ks.first = 0;
        ks.ready = false;  // selected units learn their blocks after the wait
        prefetch_pages(p, table, 0, t + 1);  // any page of the row may hold a selected block
    } else {
        ks = window_keys<DKT != 0>(p, t, u - p.launch.units_s);
        prefetch_pages(p, table, ks.lo, ks.n);
    }
    for_head_chunks(p, r, kvh, [&](int hcn, int hg0, const u16* q) {
        // With lists, the first head chunk's wait is followed by the pair's block list (unit
        // 0 also writes the caller's selection: the selection kernel did not).
        int* usel = u == 0 && p.io.selected ? (int*)p.io.selected + ((usize)r * p.shape.num_kv_heads + kvh) * p.shape.sel_count : (int*)0;
        const bool build_now = lists && hg0 == kvh * p.shape.group_size;
        auto build = [&]() {
            if (flow && build_now) {
                flow_wait(flow_counters(p, (usize)wr * p.shape.num_kv_heads + kvh) + FLOW_LISTS, p.launch.sel_chunks, p.launch.units_s);
                tl_wait_stamp();
            }
            if (build_now) sel_merge_lists(p, wr, kvh, t, sl, usel);
            return build_now;
        };
        attend_mma<E, NVT, DKT, DVT, CP>(p, (const u16*)p.paging.raw_k, (const u16*)p.paging.raw_v, p.paging.tmaps, p.paging.tmaps + NSA_TMAP_BYTES, table,
                                     kvh, ks, hcn, q, wr, hg0, p.launch.nsplit_c + u, (float*)0, Prep<decltype(build)>{build, flow});
    });
    if (flow) pdl_wait_untimed();  // the completion chain (kernels/ptx.cuh)
}

#endif  // NSA_SELECTED_CUH
