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
    PageCopy pc = ((const PageCopy*)p.copies)[c];
    T* kpool = (T*)(pc.pool == 0 ? p.raw_k : p.cmp_k);
    T* vpool = (T*)(pc.pool == 0 ? p.raw_v : p.cmp_v);
    usize nk = (usize)pc.rows * p.dk, nv = (usize)pc.rows * p.dv;
    usize sk = row_at(p, pc.src, kvh, 0, p.dk), dk_ = row_at(p, pc.dst, kvh, 0, p.dk);
    usize sv = row_at(p, pc.src, kvh, 0, p.dv), dv_ = row_at(p, pc.dst, kvh, 0, p.dv);
    for (usize i = threadIdx.x; i < nk; i += blockDim.x) kpool[dk_ + i] = kpool[sk + i];
    for (usize i = threadIdx.x; i < nv; i += blockDim.x) vpool[dv_ + i] = vpool[sv + i];
}

template <class E>
__device__ void append_row(const Params& p, int r, int kvh) {
    typedef typename E::T T;
    int2 tm = ((const int2*)p.tokmap)[r];
    int page = ((const int*)p.raw_tab)[(usize)tm.x * p.pps + tm.y / p.page];
    int off = tm.y % p.page;
    const T* k = (const T*)p.k + ((usize)r * p.hkv + kvh) * p.dk;
    const T* v = (const T*)p.v + ((usize)r * p.hkv + kvh) * p.dv;
    T* kd = (T*)p.raw_k + row_at(p, page, kvh, off, p.dk);
    T* vd = (T*)p.raw_v + row_at(p, page, kvh, off, p.dv);
    for (int i = threadIdx.x; i < p.dk; i += blockDim.x) kd[i] = k[i];
    for (int i = threadIdx.x; i < p.dv; i += blockDim.x) vd[i] = v[i];
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
    const PlanSeq ps = ((const PlanSeq*)p.plan)[si];
    const int D = side == 0 ? p.dk : p.dv;
    if (pos >= ps.old_len)
        return (const T*)(side == 0 ? p.k : p.v) + ((usize)(ps.row + pos - ps.old_len) * p.hkv + h) * D;
    int page = ((const int*)p.raw_tab)[(usize)si * p.pps + pos / p.page];
    const int n_copies = ((const int*)p.hdr)[2];
    const PageCopy* cps = (const PageCopy*)p.copies;
    for (int c = 0; c < n_copies; c++)
        if (cps[c].pool == 0 && cps[c].dst == page) {
            page = cps[c].src;
            break;
        }
    return (const T*)(side == 0 ? p.raw_k : p.raw_v) + row_at(p, page, h, pos % p.page, D);
}

template <class E>
__device__ void compress(const Params& p, int job, int h, int side) {
    typedef typename E::T T;
    extern __shared__ float smem[];
    int2 jb = ((const int2*)p.jobs)[job];
    int si = jb.x, ci = jb.y;
    int D = side == 0 ? p.dk : p.dv;
    T* cmp = (T*)(side == 0 ? p.cmp_k : p.cmp_v);
    const float* all = (const float*)(side == 0 ? p.phi_k : p.phi_v);
    const int* ctab = (const int*)p.cmp_tab + (usize)si * p.cpps;
    usize hkv = p.hkv, l = p.cl, d = D, hid = p.phi_hidden;
    float* row = smem;
    float* acc = smem + D;
    float* hidden = smem + 2 * D;
    const float* pe = 0;
    const float *w = 0, *w1 = 0, *b1 = 0, *w2 = 0, *b2 = 0;
    if (p.phi == 1) {
        w = all + h * l;
    } else if (p.phi == 2) {
        w = all + h * l * d * d;
        if (p.phi_pe) pe = all + hkv * l * d * d + h * l * d;
    } else if (p.phi == 3) {
        usize w1n = l * d * hid, w2n = hid * d;
        usize b1_at = hkv * w1n, w2_at = b1_at + hkv * hid, b2_at = w2_at + hkv * w2n;
        w1 = all + h * w1n;
        b1 = all + b1_at + h * hid;
        w2 = all + w2_at + h * w2n;
        b2 = all + b2_at + h * d;
        if (p.phi_pe) pe = all + b2_at + hkv * d + h * l * d;
    }
    if (p.phi <= 1) {
        // Mean / weighted: a thread per column, rows in order (the CPU's order); the row
        // addresses first, so the row loads are independent.
        const T** rows = (const T**)hidden;  // l pointers (the host sizes this region for them)
        for (int j = threadIdx.x; j < p.cl; j += blockDim.x) rows[j] = src_row<E>(p, si, h, ci * p.cd + j, side);
        __syncthreads();
        T* dst = cmp + row_at(p, ctab[ci / p.page], h, ci % p.page, D);
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float a = 0.f;
            int j = 0;
            // 16 loads in flight per round (a compressed token is 2 rounds at l = 32).
            for (; j + 16 <= p.cl; j += 16) {
                float x[16];
#pragma unroll
                for (int k = 0; k < 16; k++) x[k] = E::ld(rows[j + k], c);
#pragma unroll
                for (int k = 0; k < 16; k++) a = p.phi == 0 ? a + x[k] : a + w[j + k] * x[k];
            }
            for (; j < p.cl; j++) {
                float x = E::ld(rows[j], c);
                a = p.phi == 0 ? a + x : a + w[j] * x;
            }
            E::st(dst, c, p.phi == 0 ? a * (1.0f / (float)p.cl) : a);
        }
        return;
    }
    for (int c = threadIdx.x; c < D; c += blockDim.x) acc[c] = 0.f;
    if (p.phi == 3)
        for (int u = threadIdx.x; u < p.phi_hidden; u += blockDim.x) hidden[u] = b1[u];
    for (int j = 0; j < p.cl; j++) {
        const T* src = src_row<E>(p, si, h, ci * p.cd + j, side);
        __syncthreads();  // previous row fully consumed
        for (int e = threadIdx.x; e < D; e += blockDim.x) {
            float x = E::ld(src, e);
            if (pe) x = x + pe[(usize)j * d + e];
            row[e] = x;
        }
        __syncthreads();
        if (p.phi == 0) {
            for (int c = threadIdx.x; c < D; c += blockDim.x) acc[c] = acc[c] + row[c];
        } else if (p.phi == 1) {
            float wj = w[j];
            for (int c = threadIdx.x; c < D; c += blockDim.x) acc[c] = acc[c] + wj * row[c];
        } else if (p.phi == 2) {
            for (int c = threadIdx.x; c < D; c += blockDim.x) {
                float a = acc[c];
                const float* wr = w + ((usize)j * d) * d + c;
                for (int e = 0; e < D; e++) a = a + row[e] * wr[(usize)e * d];
                acc[c] = a;
            }
        } else {
            for (int u = threadIdx.x; u < p.phi_hidden; u += blockDim.x) {
                float a = hidden[u];
                const float* wr = w1 + ((usize)j * d) * hid + u;
                for (int e = 0; e < D; e++) a = a + row[e] * wr[(usize)e * hid];
                hidden[u] = a;
            }
        }
    }
    __syncthreads();
    T* dst = cmp + row_at(p, ctab[ci / p.page], h, ci % p.page, D);
    if (p.phi == 0) {
        float inv = 1.0f / (float)p.cl;
        for (int c = threadIdx.x; c < D; c += blockDim.x) E::st(dst, c, acc[c] * inv);
    } else if (p.phi == 3) {
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float a = b2[c];
            for (int u = 0; u < p.phi_hidden; u++) {
                float hu = hidden[u];
                if (hu > 0.f) a = a + hu * w2[(usize)u * d + c];
            }
            E::st(dst, c, a);
        }
    } else {
        for (int c = threadIdx.x; c < D; c += blockDim.x) E::st(dst, c, acc[c]);
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
    const int* hdr = (const int*)p.hdr;
    const int x = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const int tokens = hdr[1], copies_end = tokens + 2 * hdr[0];
    if (x < tokens) {
        if (z == 0) append_row<E>(p, x, h);
    } else if (x < copies_end) {
        if (z == 0 && x - tokens < hdr[2]) copy_rows<E>(p, x - tokens, h);
    } else if (x - copies_end < hdr[3]) {
        compress<E>(p, x - copies_end, h, z);
    }
}

#endif  // NSA_APPEND_CUH
