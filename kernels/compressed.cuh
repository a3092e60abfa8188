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
// Blocks past the splits (z >= nsplit_c: the host puts the window's units in this launch
// for large waves, `launch::wave_splits`) run window unit z - nsplit_c instead, into the
// window's partial slot: they then start on the multiprocessors whose splits end first,
// and the selected-branch launch streams only the selected blocks (docs/DECODE_NOTES.md,
// variant 75). One call site of `attend_mma` for both, so the entry holds its code once.
// GSM: the group sums by a tensor-core product (kernels/attend_mma.cuh; the `_ldsg` entries).
template <class E, int NVT, int DKT, int DVT, int CP = MMA_COPY_MODE, bool GSM = false>
__device__ void cmp_mma(const Params& p) {
    int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int2 tm = ((const int2*)p.step.rows)[r];
    const bool win = split >= p.launch.nsplit_c;
    Keys ks;
    const int* table;
    int u;
    if (win) {
        const int c = split - p.launch.nsplit_c;
        ks = window_keys<DKT != 0>(p, tm.y, c);
        u = p.launch.nsplit_c + p.launch.units_s + c;
        table = (const int*)p.paging.raw_tab + (usize)tm.x * p.paging.pages_per_seq;
        prefetch_pages(p, table, ks.lo, ks.n);
    } else {
        int lo, hi;
        split_range(num_cmp(p, tm.y + 1), p.launch.nsplit_c, split, lo, hi);
        // In a step of one new token per sequence and no page copies (its header is uploaded
        // before the layer's first kernel), the append writes no compressed token below
        // num_cmp(t), t the row's length before the step, and no page that holds one: a split
        // below that loads its tiles before waiting on the append (variant 42).
        const StepHeader& hdr = *(const StepHeader*)p.step.header;
        const bool ready = hdr.tokens == hdr.seqs && hdr.copies == 0 && hi <= num_cmp(p, tm.y);
        ks = Keys{0, lo, hi - lo, tm.y, 0, ready};
        u = split;
        table = (const int*)p.paging.cmp_tab + (usize)tm.x * p.paging.cmp_pages_per_seq;
        tl_mark_after<6>(__int_as_float(ready + lo));  // the timeline: the row and the step's header arrived
    }
    const u16* kpool = (const u16*)(win ? p.paging.raw_k : p.paging.cmp_k);
    const u16* vpool = (const u16*)(win ? p.paging.raw_v : p.paging.cmp_v);
    const u64 maps = p.paging.tmaps + (win ? 0 : 2 * NSA_TMAP_BYTES);
    for_head_chunks(p, r, kvh, [&](int hcn, int hg0, const u16* q) {
        float* lg = win ? (float*)0 : (float*)p.ws.logits + ((usize)wr * p.shape.num_q_heads + hg0) * p.ws.max_cmp;
        attend_mma<E, NVT, DKT, DVT, CP, GSM>(p, kpool, vpool, maps, maps + NSA_TMAP_BYTES, table, kvh, ks, hcn, q, wr, hg0, u, lg);
    });
    // The pair's selection may start once its splits are written (MODE_SEL_FLOW, kernels/ptx.cuh).
    if (!win && (p.launch.mode & MODE_SEL_FLOW)) flow_signal(flow_counters(p, (usize)wr * p.shape.num_kv_heads + kvh) + FLOW_SPLITS);
}

#endif  // NSA_COMPRESSED_CUH
