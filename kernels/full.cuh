// Full causal attention, the in-repo baseline over the same paged cache.
#ifndef NSA_FULL_CUH
#define NSA_FULL_CUH

#include "attend.cuh"
#include "attend_mma.cuh"
#include "combine.cuh"

// [0, t] over the raw pools; partials as the NSA units (unit = split).
template <class E>
__device__ void full_partial(const Params& p) {
    int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int t = ((const int2*)p.step.rows)[r].y;
    int lo, hi;
    split_range(t + 1, p.launch.nsplit_c, split, lo, hi);
    attend_group<E>(p, r, wr, kvh, lo, hi, false, split);
}


// Merge of the splits of one (row, query head), normalised: the gated combine's code with
// every split in its first branch and no gates.
template <class E>
__device__ void full_combine(const Params& p) {
    const int wr = blockIdx.x, r = p.launch.row0 + wr, U = p.launch.nsplit_c;
    if (p.shape.head_dim_v % 4 == 0)
        combine_heads<E, 4>(p, wr, r, blockIdx.y, 1, U, U, U, false);
    else
        combine_heads<E, 1>(p, wr, r, blockIdx.y, 1, U, U, U, false);
}


// Full causal attention, tensor cores: split `blockIdx.z` of [0, t].
template <class E, int NVT, int DKT, int DVT, int CP = MMA_COPY_MODE>
__device__ void full_mma(const Params& p) {
    int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int2 tm = ((const int2*)p.step.rows)[r];
    int lo, hi;
    split_range(tm.y + 1, p.launch.nsplit_c, split, lo, hi);
    Keys ks = {0, lo, hi - lo, tm.y, 0, false};
    const int* table = (const int*)p.paging.raw_tab + (usize)tm.x * p.paging.pages_per_seq;
    for_head_chunks(p, r, kvh, [&](int hcn, int hg0, const u16* q) {
        attend_mma<E, NVT, DKT, DVT, CP>(p, (const u16*)p.paging.raw_k, (const u16*)p.paging.raw_v, p.paging.tmaps, p.paging.tmaps + NSA_TMAP_BYTES, table, kvh, ks,
                                     hcn, q, wr, hg0, split, (float*)0);
    });
}

#endif  // NSA_FULL_CUH
