// Selected blocks + sliding window attention.
#ifndef NSA_SELECTED_CUH
#define NSA_SELECTED_CUH

#include "attend.cuh"
#include "attend_mma.cuh"

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

// Selected blocks (units 0..units_s, `spb` blocks each) and window chunks of sel_block * spb
// keys (units units_s..), tensor cores.
template <class E, int NVT, int DKT, int DVT>
__device__ void sw_mma(const Params& p) {
    int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, u = blockIdx.z;
    int2 tm = ((const int2*)p.step.rows)[r];
    int t = tm.y;
    Keys ks;
    ks.t = t;
    ks.first = 0;
    if (u < p.launch.units_s) {
        int b0 = u * p.launch.spb;
        ks.blocks = (const int*)p.ws.sel + ((usize)wr * p.shape.num_kv_heads + kvh) * p.shape.sel_count + b0;
        ks.lo = 0;
        ks.n = min(p.launch.spb, p.shape.sel_count - b0) * p.shape.sel_block;
    } else {
        // With tensor maps the window's units start at its first position rounded down
        // to 16 (tiles are whole 16-row boxes); the positions before it are masked.
        int c = u - p.launch.units_s, span = p.shape.sel_block * p.launch.spb;
        int wlo = max(0, t + 1 - p.shape.window);
        int lo = ((p.launch.mode & 2) ? wlo & ~(NSA_WINDOW_ALIGN - 1) : wlo) + c * span;
        int hi = min(lo + span, t + 1);
        ks.blocks = 0;
        ks.lo = lo;
        ks.n = hi > lo ? hi - lo : 0;
        ks.first = wlo;
    }
    const int* table = (const int*)p.paging.raw_tab + (usize)tm.x * p.paging.pages_per_seq;
    for (int h0 = 0; h0 < p.shape.group_size; h0 += 16) {
        int hcn = min(16, p.shape.group_size - h0), hg0 = kvh * p.shape.group_size + h0;
        const u16* q = (const u16*)p.io.q + ((usize)r * p.shape.num_q_heads + hg0) * p.shape.head_dim_qk;
        attend_mma<E, NVT, DKT, DVT>(p, (const u16*)p.paging.raw_k, (const u16*)p.paging.raw_v, p.paging.tmaps, p.paging.tmaps + NSA_TMAP_BYTES, table, kvh,
                           ks, hcn, q, wr, hg0, p.launch.nsplit_c + u, (float*)0);
    }
}

#endif  // NSA_SELECTED_CUH
