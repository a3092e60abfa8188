// Compressed attention: split over blocks, raw logits kept for the selection.
#ifndef NSA_COMPRESSED_CUH
#define NSA_COMPRESSED_CUH

#include "attend.cuh"
#include "attend_mma.cuh"

template <class E>
__device__ void cmp_partial(const Params& p) {
    int wr = blockIdx.x, r = p.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int t = ((const int2*)p.tokmap)[r].y;
    int nc = num_cmp(p, t + 1);
    int lo, hi;
    split_range(nc, p.nsplit_c, split, lo, hi);
    attend_group<E>(p, r, wr, kvh, lo, hi, true, split);
}

// Full causal attention (the in-repo baseline): split `blockIdx.z` of the row's keys

// Compressed branch, tensor cores: split `blockIdx.z` of the visible compressed tokens.
template <class E, int NVT>
__device__ void cmp_mma(const Params& p) {
    int wr = blockIdx.x, r = p.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int2 tm = ((const int2*)p.tokmap)[r];
    int lo, hi;
    split_range(num_cmp(p, tm.y + 1), p.nsplit_c, split, lo, hi);
    Keys ks = {0, lo, hi - lo, tm.y, 0};
    const int* table = (const int*)p.cmp_tab + (usize)tm.x * p.cpps;
    for (int h0 = 0; h0 < p.g; h0 += 16) {
        int hcn = min(16, p.g - h0), hg0 = kvh * p.g + h0;
        const u16* q = (const u16*)p.q + ((usize)r * p.hq + hg0) * p.dk;
        float* lg = (float*)p.logits + ((usize)wr * p.hq + hg0) * p.maxc;
        attend_mma<E, NVT>(p, (const u16*)p.cmp_k, (const u16*)p.cmp_v, p.tmaps + 2 * NSA_TMAP_BYTES,
                           p.tmaps + 3 * NSA_TMAP_BYTES, table, kvh, ks, hcn, q, wr, hg0, split, lg);
    }
}

#endif  // NSA_COMPRESSED_CUH
