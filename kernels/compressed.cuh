// Compressed attention: split over blocks, raw logits kept for the selection.
#ifndef NSA_COMPRESSED_CUH
#define NSA_COMPRESSED_CUH

#include "attend.cuh"
#include "attend_mma.cuh"

template <class E>
__device__ void cmp_partial(const Params& p) {
    int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int t = ((const int2*)p.step.rows)[r].y;
    int nc = num_cmp(p, t + 1);
    int lo, hi;
    split_range(nc, p.launch.nsplit_c, split, lo, hi);
    attend_group<E>(p, r, wr, kvh, lo, hi, true, split);
}

// Full causal attention (the in-repo baseline): split `blockIdx.z` of the row's keys

// Compressed branch, tensor cores: split `blockIdx.z` of the visible compressed tokens.
template <class E, int NVT, int DKT, int DVT, int CP = MMA_COPY_MODE>
__device__ void cmp_mma(const Params& p) {
    int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int2 tm = ((const int2*)p.step.rows)[r];
    int lo, hi;
    split_range(num_cmp(p, tm.y + 1), p.launch.nsplit_c, split, lo, hi);
    // In a step of one new token per sequence and no page copies (its header is uploaded
    // before the layer's first kernel), the append writes no compressed token below
    // num_cmp(t), t the row's length before the step, and no page that holds one: a split
    // below that loads its tiles before waiting on the append (variant 42).
    const StepHeader& hdr = *(const StepHeader*)p.step.header;
    const bool ready = hdr.tokens == hdr.seqs && hdr.copies == 0 && hi <= num_cmp(p, tm.y);
    Keys ks = {0, lo, hi - lo, tm.y, 0, ready};
    tl_mark_after<6>(__int_as_float(ready + lo));  // the timeline: the row and the step's header arrived
    const int* table = (const int*)p.paging.cmp_tab + (usize)tm.x * p.paging.cmp_pages_per_seq;
    for (int h0 = 0; h0 < p.shape.group_size; h0 += 16) {
        int hcn = min(16, p.shape.group_size - h0), hg0 = kvh * p.shape.group_size + h0;
        const u16* q = (const u16*)p.io.q + ((usize)r * p.shape.num_q_heads + hg0) * p.shape.head_dim_qk;
        float* lg = (float*)p.ws.logits + ((usize)wr * p.shape.num_q_heads + hg0) * p.ws.max_cmp;
        attend_mma<E, NVT, DKT, DVT, CP>(p, (const u16*)p.paging.cmp_k, (const u16*)p.paging.cmp_v, p.paging.tmaps + 2 * NSA_TMAP_BYTES,
                           p.paging.tmaps + 3 * NSA_TMAP_BYTES, table, kvh, ks, hcn, q, wr, hg0, split, lg);
    }
}

#endif  // NSA_COMPRESSED_CUH
