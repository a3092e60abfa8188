// The step's writes: copy-on-write copies, appends and compressed tokens (phi), one launch.
#ifndef NSA_APPEND_CUH
#define NSA_APPEND_CUH

#include "common.cuh"

// ---------------------------------------------------------------- copy-on-write copies + append
// Both run in the step's first launch (see `append` below). They never touch the same
// rows: a copy covers a page's live rows (< the sequence's old length), an append writes
// rows at or past it.

template <class E>
__device__ void copy_rows(const Params& p, int c, int kvh) {
    typedef typename E::T T;
    PageCopy pc = ((const PageCopy*)p.step.copies)[c];
    T* kpool = (T*)(pc.pool == 0 ? p.paging.raw_k : p.paging.cmp_k);
    T* vpool = (T*)(pc.pool == 0 ? p.paging.raw_v : p.paging.cmp_v);
    usize nk = (usize)pc.rows * p.shape.head_dim_qk, nv = (usize)pc.rows * p.shape.head_dim_v;
    usize sk = row_at(p, pc.src, kvh, 0, p.shape.head_dim_qk), dk_ = row_at(p, pc.dst, kvh, 0, p.shape.head_dim_qk);
    usize sv = row_at(p, pc.src, kvh, 0, p.shape.head_dim_v), dv_ = row_at(p, pc.dst, kvh, 0, p.shape.head_dim_v);
    for (usize i = threadIdx.x; i < nk; i += blockDim.x) kpool[dk_ + i] = kpool[sk + i];
    for (usize i = threadIdx.x; i < nv; i += blockDim.x) vpool[dv_ + i] = vpool[sv + i];
}

// Where new row r of the step goes: its page (x) and row in the page (y).
__device__ __forceinline__ int2 append_place(const Params& p, int r) {
    const int2 tm = ((const int2*)p.step.rows)[r];
    return make_int2(((const int*)p.paging.raw_tab)[(usize)tm.x * p.paging.pages_per_seq + tm.y / p.paging.page_size],
                     tm.y % p.paging.page_size);
}

// Row r of the step, both sides, a thread per element (`append`: a block per row).
template <class E>
__device__ void append_row(const Params& p, int r, int kvh) {
    typedef typename E::T T;
    const int2 at = append_place(p, r);
    const int page = at.x, off = at.y;
    const T* k = (const T*)p.io.k + ((usize)r * p.shape.num_kv_heads + kvh) * p.shape.head_dim_qk;
    const T* v = (const T*)p.io.v + ((usize)r * p.shape.num_kv_heads + kvh) * p.shape.head_dim_v;
    T* kd = (T*)p.paging.raw_k + row_at(p, page, kvh, off, p.shape.head_dim_qk);
    T* vd = (T*)p.paging.raw_v + row_at(p, page, kvh, off, p.shape.head_dim_v);
    for (int i = threadIdx.x; i < p.shape.head_dim_qk; i += blockDim.x) kd[i] = k[i];
    for (int i = threadIdx.x; i < p.shape.head_dim_v; i += blockDim.x) vd[i] = v[i];
}

// One row of `bytes` bytes from `src` to `dst` by the 16 lanes of a half-warp: 16-byte
// granules when both are aligned (every lane's loads issued before its stores: one round
// trip for rows up to 512 bytes), else elements.
template <class T>
__device__ __forceinline__ void append_copy_row(T* dst, const T* src, int n, int hl) {
    const int bytes = n * (int)sizeof(T);
    if (((bytes | (int)((usize)dst & 15) | (int)((usize)src & 15)) & 15) == 0) {
        const uint4* s = (const uint4*)src;
        uint4* d = (uint4*)dst;
        const int g = bytes >> 4;
        uint4 a0 = make_uint4(0u, 0u, 0u, 0u), a1 = a0;
        if (hl < g) a0 = s[hl];
        if (hl + 16 < g) a1 = s[hl + 16];
        if (hl < g) d[hl] = a0;
        if (hl + 16 < g) d[hl + 16] = a1;
        for (int i = hl + 32; i < g; i += 16) d[i] = s[i];
    } else {
        for (int e = hl; e < n; e += 16) dst[e] = src[e];
    }
}

// New rows r0 .. r0 + n - 1 of the step, side K (0) or V (1), or both when `both`: a
// half-warp per row (16 rows at once in a 256-thread block, so a decode step's few rows
// take one round of dependent loads, as with a block per row).
template <class E>
__device__ void append_rows(const Params& p, int r0, int n, int kvh, int side, bool both) {
    typedef typename E::T T;
    const int hl = threadIdx.x & 15, nh = blockDim.x >> 4;
    for (int i = threadIdx.x >> 4; i < n; i += nh) {
        const int r = r0 + i;
        const int2 at = append_place(p, r);
        const int page = at.x, off = at.y;
        if (both || side == 0)
            append_copy_row<T>((T*)p.paging.raw_k + row_at(p, page, kvh, off, p.shape.head_dim_qk),
                               (const T*)p.io.k + ((usize)r * p.shape.num_kv_heads + kvh) * p.shape.head_dim_qk, p.shape.head_dim_qk, hl);
        if (both || side == 1)
            append_copy_row<T>((T*)p.paging.raw_v + row_at(p, page, kvh, off, p.shape.head_dim_v),
                               (const T*)p.io.v + ((usize)r * p.shape.num_kv_heads + kvh) * p.shape.head_dim_v, p.shape.head_dim_v, hl);
    }
}

// ---------------------------------------------------------------- compress (phi)
// One block per (job = one new compressed token of one sequence, KV head, side K|V).
// Each output column (or hidden unit) is owned by one thread and accumulated in the same
// order as the CPU backend: rows j ascending, elements e ascending. Runs in the step's
// first launch (`append` below).
// Shared memory: row[D] | acc[D] | hidden[max(phi_hidden, 2 * l)] (the mean / weighted
// path keeps the l row pointers there).

// Row `pos` of step sequence `si`, KV head h, side K | V: the step's input row when the
// position is new this step (compress then needs no ordering with the same launch's
// appends), else the pool row, from the source page when its page is a copy-on-write
// destination of this step (the copy runs in the same launch).
template <class E>
__device__ const typename E::T* src_row(const Params& p, int si, int h, int pos, int side) {
    typedef typename E::T T;
    const PlanSeq ps = ((const PlanSeq*)p.step.seqs)[si];
    const int D = side == 0 ? p.shape.head_dim_qk : p.shape.head_dim_v;
    if (pos >= ps.old_len)
        return (const T*)(side == 0 ? p.io.k : p.io.v) + ((usize)(ps.row + pos - ps.old_len) * p.shape.num_kv_heads + h) * D;
    int page = ((const int*)p.paging.raw_tab)[(usize)si * p.paging.pages_per_seq + pos / p.paging.page_size];
    const int n_copies = ((const StepHeader*)p.step.header)->copies;
    const PageCopy* cps = (const PageCopy*)p.step.copies;
    for (int c = 0; c < n_copies; c++)
        if (cps[c].pool == 0 && cps[c].dst == page) {
            page = cps[c].src;
            break;
        }
    return (const T*)(side == 0 ? p.paging.raw_k : p.paging.raw_v) + row_at(p, page, h, pos % p.paging.page_size, D);
}

template <class E>
__device__ void compress(const Params& p, int job, int h, int side) {
    typedef typename E::T T;
    extern __shared__ float smem[];
    int2 jb = ((const int2*)p.step.jobs)[job];
    int si = jb.x, ci = jb.y;
    int D = side == 0 ? p.shape.head_dim_qk : p.shape.head_dim_v;
    T* cmp = (T*)(side == 0 ? p.paging.cmp_k : p.paging.cmp_v);
    const float* all = (const float*)(side == 0 ? p.io.phi_k : p.io.phi_v);
    const int* ctab = (const int*)p.paging.cmp_tab + (usize)si * p.paging.cmp_pages_per_seq;
    usize hkv = p.shape.num_kv_heads, l = p.shape.cmp_block, d = D, hid = p.shape.phi_hidden;
    float* row = smem;
    float* acc = smem + D;
    float* hidden = smem + 2 * D;
    const float* pe = 0;
    const float *w = 0, *w1 = 0, *b1 = 0, *w2 = 0, *b2 = 0;
    if (p.shape.phi == 1) {
        w = all + h * l;
    } else if (p.shape.phi == 2) {
        w = all + h * l * d * d;
        if (p.shape.phi_pe) pe = all + hkv * l * d * d + h * l * d;
    } else if (p.shape.phi == 3) {
        usize w1n = l * d * hid, w2n = hid * d;
        usize b1_at = hkv * w1n, w2_at = b1_at + hkv * hid, b2_at = w2_at + hkv * w2n;
        w1 = all + h * w1n;
        b1 = all + b1_at + h * hid;
        w2 = all + w2_at + h * w2n;
        b2 = all + b2_at + h * d;
        if (p.shape.phi_pe) pe = all + b2_at + hkv * d + h * l * d;
    }
    if (p.shape.phi <= 1) {
        // Mean / weighted: a thread per column, rows in order (the CPU's order); the row
        // addresses first, so the row loads are independent.
        const T** rows = (const T**)hidden;  // l pointers (the host sizes this region for them)
        for (int j = threadIdx.x; j < p.shape.cmp_block; j += blockDim.x) rows[j] = src_row<E>(p, si, h, ci * p.shape.cmp_stride + j, side);
        __syncthreads();
        T* dst = cmp + row_at(p, ctab[ci / p.paging.page_size], h, ci % p.paging.page_size, D);
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float a = 0.f;
            int j = 0;
            // 16 loads in flight per round (a compressed token is 2 rounds at l = 32).
            for (; j + 16 <= p.shape.cmp_block; j += 16) {
                float x[16];
#pragma unroll
                for (int k = 0; k < 16; k++) x[k] = E::ld(rows[j + k], c);
#pragma unroll
                for (int k = 0; k < 16; k++) a = p.shape.phi == 0 ? a + x[k] : a + w[j + k] * x[k];
            }
            for (; j < p.shape.cmp_block; j++) {
                float x = E::ld(rows[j], c);
                a = p.shape.phi == 0 ? a + x : a + w[j] * x;
            }
            E::st(dst, c, p.shape.phi == 0 ? a * (1.0f / (float)p.shape.cmp_block) : a);
        }
        return;
    }
    for (int c = threadIdx.x; c < D; c += blockDim.x) acc[c] = 0.f;
    if (p.shape.phi == 3)
        for (int u = threadIdx.x; u < p.shape.phi_hidden; u += blockDim.x) hidden[u] = b1[u];
    for (int j = 0; j < p.shape.cmp_block; j++) {
        const T* src = src_row<E>(p, si, h, ci * p.shape.cmp_stride + j, side);
        __syncthreads();  // previous row fully consumed
        for (int e = threadIdx.x; e < D; e += blockDim.x) {
            float x = E::ld(src, e);
            if (pe) x = x + pe[(usize)j * d + e];
            row[e] = x;
        }
        __syncthreads();
        if (p.shape.phi == 0) {
            for (int c = threadIdx.x; c < D; c += blockDim.x) acc[c] = acc[c] + row[c];
        } else if (p.shape.phi == 1) {
            float wj = w[j];
            for (int c = threadIdx.x; c < D; c += blockDim.x) acc[c] = acc[c] + wj * row[c];
        } else if (p.shape.phi == 2) {
            for (int c = threadIdx.x; c < D; c += blockDim.x) {
                float a = acc[c];
                const float* wr = w + ((usize)j * d) * d + c;
                for (int e = 0; e < D; e++) a = a + row[e] * wr[(usize)e * d];
                acc[c] = a;
            }
        } else {
            for (int u = threadIdx.x; u < p.shape.phi_hidden; u += blockDim.x) {
                float a = hidden[u];
                const float* wr = w1 + ((usize)j * d) * hid + u;
                for (int e = 0; e < D; e++) a = a + row[e] * wr[(usize)e * hid];
                hidden[u] = a;
            }
        }
    }
    __syncthreads();
    T* dst = cmp + row_at(p, ctab[ci / p.paging.page_size], h, ci % p.paging.page_size, D);
    if (p.shape.phi == 0) {
        float inv = 1.0f / (float)p.shape.cmp_block;
        for (int c = threadIdx.x; c < D; c += blockDim.x) E::st(dst, c, acc[c] * inv);
    } else if (p.shape.phi == 3) {
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float a = b2[c];
            for (int u = 0; u < p.shape.phi_hidden; u++) {
                float hu = hidden[u];
                if (hu > 0.f) a = a + hu * w2[(usize)u * d + c];
            }
            E::st(dst, c, a);
        }
    } else {
        for (int c = threadIdx.x; c < D; c += blockDim.x) E::st(dst, c, acc[c]);
    }
}

// `launch.mode` bit of the append launch (`DecodeKnobs::append_prefetch`): the blocks of
// new rows hint into L2 what the compressed launch reads first (`prefetch_row_inputs`).
#define MODE_APPEND_PREFETCH 4096

// Row r's queries of KV head kvh's group and (from KV head 0's block) its sequence's
// compressed page-table row into L2, hints issued at the step's start, before the
// compressed launch reads them (by each new row's last-side block: the V side's, which has
// nothing else to do, where the launch has two). H200, graph replay, 32 decode points: 0.991
// of the step's time (geometric mean, two rounds; batch 4 0.979), though the compressed
// blocks' prologue it aimed at did not shorten, so where the gain comes from is not
// established (docs/DECODE_NOTES.md, variants 71 and 73). No query pointer (an append-only run): nothing.
template <class E>
__device__ void prefetch_row_inputs(const Params& p, int r, int kvh) {
    if (!p.io.q || !(p.launch.mode & MODE_APPEND_PREFETCH)) return;
    const usize es = sizeof(typename E::T), g = (usize)p.shape.group_size, dk = (usize)p.shape.head_dim_qk;
    prefetch_range(p.io.q + ((usize)r * p.shape.num_q_heads + (usize)kvh * g) * dk * es, g * dk * es);
    if (kvh == 0) {
        const int seq = ((const int2*)p.step.rows)[r].x;
        prefetch_range(p.paging.cmp_tab + (usize)seq * p.paging.cmp_pages_per_seq * 4, (usize)p.paging.cmp_pages_per_seq * 4);
    }
}

// ---------------------------------------------------------------- the step's writes
// One launch for everything a step writes, grid (2*tokens + 2*seqs) x HKV x 2: blocks
// [0, tokens) append the new K/V rows, the next 2*seqs make the copy-on-write copies
// (exiting past n_copies), the rest emit the finished compressed tokens (one block per
// job and side z, exiting past n_jobs; a step finishes at most one per new token). None
// waits for another: appends and copies write disjoint rows, compress reads new rows
// from the step's inputs and copied rows from their source pages (`src_row`), and
// writes compressed rows past the live ones, which cmp copies do not touch.
template <class E>
__device__ void append(const Params& p) {
    const StepHeader& hdr = *(const StepHeader*)p.step.header;
    const int x = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const int tokens = hdr.tokens, copies_end = tokens + 2 * hdr.seqs;
    if (x < tokens) {
        if (z == gridDim.z - 1) prefetch_row_inputs<E>(p, x, h);
        if (z == 0) append_row<E>(p, x, h);
    } else if (x < copies_end) {
        if (z == 0 && x - tokens < hdr.copies) copy_rows<E>(p, x - tokens, h);
    } else if (x - copies_end < hdr.jobs) {
        compress<E>(p, x - copies_end, h, z);
    }
}

// The same writes for steps of at least APPEND_MIN_TOKENS new tokens (prefill chunks; the host
// picks the entry),
// grid (A + 2*seqs + J) x HKV x sides: A = ceil(tokens / NSA_APPEND_ROWS) blocks append
// the new rows (side z, both sides with one z), then the copies as above, then one block
// per compressed token the step can finish (the host's J = tokens / cmp_stride + seqs: a
// sequence's n new tokens finish at most n / stride + 1), exiting past n_jobs. `append`'s
// grid of a block per row took 1.5 ms at a 64k-token prefill, ~1M blocks for 134 MB
// (docs/PREFILL_NOTES.md, variant 32); small steps keep it (its own entry, unchanged).
template <class E>
__device__ void append_by_rows(const Params& p) {
    const StepHeader& hdr = *(const StepHeader*)p.step.header;
    const int x = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const int tokens = hdr.tokens, nab = (tokens + NSA_APPEND_ROWS - 1) / NSA_APPEND_ROWS, copies_end = nab + 2 * hdr.seqs;
    if (x < nab) {
        append_rows<E>(p, x * NSA_APPEND_ROWS, min(NSA_APPEND_ROWS, tokens - x * NSA_APPEND_ROWS), h, z, gridDim.z == 1);
    } else if (x < copies_end) {
        if (z == 0 && x - nab < hdr.copies) copy_rows<E>(p, x - nab, h);
    } else if (x - copies_end < hdr.jobs) {
        compress<E>(p, x - copies_end, h, z);
    }
}

#endif  // NSA_APPEND_CUH
