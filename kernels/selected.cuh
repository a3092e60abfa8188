// Selected blocks + sliding window attention.
#ifndef NSA_SELECTED_CUH
#define NSA_SELECTED_CUH

#include "attend.cuh"
#include "attend_mma.cuh"

// Selected blocks (units 0..nsel) and window chunks of lsel keys (units nsel..).
template <class E>
__device__ void sw_partial(const Params& p) {
    int wr = blockIdx.x, r = p.row0 + wr, kvh = blockIdx.y, u = blockIdx.z;
    int t = ((const int2*)p.tokmap)[r].y;
    int lo, hi;
    if (u < p.units_s) {
        int j = ((const int*)p.sel)[((usize)wr * p.hkv + kvh) * p.nsel + u];
        if (j < 0) {
            lo = hi = 0;
        } else {
            lo = j * p.lsel;
            hi = min(lo + p.lsel, t + 1);
        }
    } else {
        int c = u - p.units_s;
        int wlo = max(0, t + 1 - p.window);
        lo = wlo + c * p.lsel;
        hi = min(lo + p.lsel, t + 1);
        if (hi < lo) hi = lo;
    }
    attend_group<E>(p, r, wr, kvh, lo, hi, false, p.nsplit_c + u);
}

// Selected blocks (units 0..units_s, `spb` blocks each) and window chunks of lsel * spb
// keys (units units_s..), tensor cores.
template <class E, int NVT>
__device__ void sw_mma(const Params& p) {
    int wr = blockIdx.x, r = p.row0 + wr, kvh = blockIdx.y, u = blockIdx.z;
    int2 tm = ((const int2*)p.tokmap)[r];
    int t = tm.y;
    Keys ks;
    ks.t = t;
    ks.first = 0;
    if (u < p.units_s) {
        int b0 = u * p.spb;
        ks.blocks = (const int*)p.sel + ((usize)wr * p.hkv + kvh) * p.nsel + b0;
        ks.lo = 0;
        ks.n = min(p.spb, p.nsel - b0) * p.lsel;
    } else {
        // With tensor maps the window's units start at its first position rounded down
        // to 16 (tiles are whole 16-row boxes); the positions before it are masked.
        int c = u - p.units_s, span = p.lsel * p.spb;
        int wlo = max(0, t + 1 - p.window);
        int lo = ((p.mode & 2) ? wlo & ~(NSA_WINDOW_ALIGN - 1) : wlo) + c * span;
        int hi = min(lo + span, t + 1);
        ks.blocks = 0;
        ks.lo = lo;
        ks.n = hi > lo ? hi - lo : 0;
        ks.first = wlo;
    }
    const int* table = (const int*)p.raw_tab + (usize)tm.x * p.pps;
    for (int h0 = 0; h0 < p.g; h0 += 16) {
        int hcn = min(16, p.g - h0), hg0 = kvh * p.g + h0;
        const u16* q = (const u16*)p.q + ((usize)r * p.hq + hg0) * p.dk;
        attend_mma<E, NVT>(p, (const u16*)p.raw_k, (const u16*)p.raw_v, p.tmaps, p.tmaps + NSA_TMAP_BYTES, table, kvh,
                           ks, hcn, q, wr, hg0, p.nsplit_c + u, (float*)0);
    }
}

#endif  // NSA_SELECTED_CUH
