// NSA kernels for the CUDA backend (NSA_SPEC.md is the function computed).
//
// Framework-free CUDA C on raw pointers: no headers, no runtime API. Compiled once per
// device with NVRTC by src/cuda/compile.rs; every kernel takes one `Params` struct by
// value (its Rust twin is `src/cuda/params.rs`; keep the two in the same field order).
//
// Pool layout (same as the CPU backend): per layer `[pool][page][kv_head][token][dim]`;
// the host passes this layer's four pool base pointers. Storage types: f32, f16, bf16
// (16-bit types as raw `unsigned short`); every accumulation is f32.
//
// A layer run is a fixed sequence of launches on the caller's stream:
//   append       new K/V rows into their pages, the step's copy-on-write copies and its
//                finished compressed tokens, every phi, in one launch: none depends on
//                another (grid: (2*tokens + 2*seqs) x HKV x 2, roles by block index)
//   then, per wave of up to `wave_rows` query rows:
//   cmp_partial  compressed attention split across blocks, raw logits kept (rows x HKV x nsplit_c)
//   select       combine split max/sum, Eq. 9 block scores summed over the group, top-n
//                per chunk of blocks (rows x HKV x sel_chunks), merged by the last chunk
//   sw_partial   selected blocks and window chunks, one block per unit (rows x HKV x units)
//   combine      merge every partial, gated sum, store (rows x HQ)
// (an append-only run stops after append). cmp_mma / sw_mma replace cmp_partial /
// sw_partial on tensor cores (bf16/f16, DK and DV multiples of 16); a unit of sw_mma holds
// `spb` selected blocks or lsel * spb window keys. nsplit_c, units_s, units_w and spb are
// per launch (the host picks them from the row count). The full-attention baseline is
// full_partial | full_mma (rows x HKV x nsplit) then full_combine (rows x HQ).
// Lengths and positions are read from the uploaded plan (device side); grid shapes depend
// only on the step's token and sequence counts, so a decode step is graph-capturable.
// All heads of a GQA group share each K/V load (a block owns one KV head).
// Offsets into pools and activations are computed in 64-bit (usize).

typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned long long usize;

struct Params {
    u64 raw_k, raw_v, cmp_k, cmp_v;
    u64 q, k, v, gates, out, selected, phi_k, phi_v;
    u64 hdr, plan, copies, tokmap, jobs, raw_tab, cmp_tab;
    u64 logits, sel, part_ml, part_acc, cand, count;
    u64 tmaps;  // this layer's tensor maps (raw K, raw V, cmp K, cmp V; 128 bytes each), mode & 2
    int hq, hkv, g, dk, dv, page, pps, cpps;
    int cl, cd, lsel, nsel, n_init, n_local, window, phi;
    int phi_hidden, phi_pe, maxc, nb, nsplit_c, split_c, units_s, units_w;
    int wave_rows, row0, hc, mode;
    float scale;
    int spb, sel_chunks, nstage, comb_heads;
};

#define NEG_INF (-__int_as_float(0x7f800000))
#define POS_INF (__int_as_float(0x7f800000))
#define TK 32          // keys per attention tile (one per lane in the softmax step)
#define NT_ATT 128     // threads of the attention kernels (4 warps)
#define MAX_DK_REG 16  // DK <= 512 = 32 lanes * 16 registers

// ---------------------------------------------------------------- storage types

struct EF32 {
    typedef float T;
    static const int MMA = 0;
    static __device__ __forceinline__ float ld(const T* p, usize i) { return p[i]; }
    static __device__ __forceinline__ void st(T* p, usize i, float x) { p[i] = x; }
};
struct EBF16 {
    typedef u16 T;
    static const int MMA = 1;  // mma.sync .bf16
    static __device__ __forceinline__ float ld(const T* p, usize i) {
        return __uint_as_float(((unsigned)p[i]) << 16);
    }
    static __device__ __forceinline__ void st(T* p, usize i, float x) {
        u16 r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
        p[i] = r;
    }
};
struct EF16 {
    typedef u16 T;
    static const int MMA = 2;  // mma.sync .f16
    static __device__ __forceinline__ float ld(const T* p, usize i) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i]));
        return f;
    }
    static __device__ __forceinline__ void st(T* p, usize i, float x) {
        u16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
        p[i] = r;
    }
};

// ---------------------------------------------------------------- small helpers

struct PlanSeq { int seq, old_len, new_len, row; };
struct PageCopy { int pool, src, dst, rows; };

__device__ __forceinline__ int num_cmp(const Params& p, int len) {
    return len < p.cl ? 0 : (len - p.cl) / p.cd + 1;
}

// Element offset of row `off` of head `kvh` in page `page` (dim `d`).
__device__ __forceinline__ usize row_at(const Params& p, int page, int kvh, int off, int d) {
    return (((usize)page * (usize)p.hkv + (usize)kvh) * (usize)p.page + (usize)off) * (usize)d;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Partial softmax state index of (wave row, query head, unit).
__device__ __forceinline__ usize part_at(const Params& p, int wr, int h, int u) {
    int units = p.nsplit_c + p.units_s + p.units_w;
    return ((usize)wr * (usize)p.hq + (usize)h) * (usize)units + (usize)u;
}

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

// ---------------------------------------------------------------- attention core
// Online softmax of `hcn` heads (pre-scaled f32 queries in q_s, [hcn][DK]) over keys at
// positions [lo, hi) of a paged pool pair. 128 threads. Per tile of TK keys: each warp
// loads whole K rows into registers and scores them against every head (one K load for
// the group), the V tile is staged in shared memory, then a warp per head updates the
// running max/sum and the block updates the accumulators. With `logit_out` the raw
// (scaled) logits are stored too: logit_out[h * maxc + position].
// Shared: q_s[hc*DK] | s_t[hc*TK] | v_t[TK*DV] | acc[hc*DV] | m[hc] | l[hc] | corr[hc].

template <class E>
__device__ void attend(const Params& p, const typename E::T* kpool, const typename E::T* vpool,
                       const int* table, int kvh, int lo, int hi, int hcn, const float* q_s, float* s_t,
                       float* v_t, float* acc, float* m_s, float* l_s, float* corr, float* logit_out) {
    const int DK = p.dk, DV = p.dv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = NT_ATT / 32;
    for (int e = tid; e < hcn * DV; e += NT_ATT) acc[e] = 0.f;
    for (int h = tid; h < hcn; h += NT_ATT) {
        m_s[h] = NEG_INF;
        l_s[h] = 0.f;
    }
    __syncthreads();
    for (int base = lo; base < hi; base += TK) {
        int n = min(TK, hi - base);
        // Stage the V tile (f32).
        for (int e = tid; e < n * DV; e += NT_ATT) {
            int j = e / DV, c = e - j * DV;
            int pos = base + j;
            int page = table[pos / p.page];
            v_t[j * DV + c] = E::ld(vpool, row_at(p, page, kvh, pos % p.page, DV) + c);
        }
        // Scores: warp w takes keys w, w+4, ...; the K row lives in registers.
        for (int j = warp; j < TK; j += nw) {
            if (j >= n) {
                for (int h = lane; h < hcn; h += 32) s_t[h * TK + j] = NEG_INF;
                continue;
            }
            int pos = base + j;
            int page = table[pos / p.page];
            usize at = row_at(p, page, kvh, pos % p.page, DK);
            float kr[MAX_DK_REG];
#pragma unroll
            for (int x = 0; x < MAX_DK_REG; x++) {
                int dd = lane + 32 * x;
                kr[x] = dd < DK ? E::ld(kpool, at + dd) : 0.f;
            }
            for (int h = 0; h < hcn; h++) {
                const float* qh = q_s + h * DK;
                float s = 0.f;
#pragma unroll
                for (int x = 0; x < MAX_DK_REG; x++) {
                    int dd = lane + 32 * x;
                    if (dd < DK) s += kr[x] * qh[dd];
                }
                s = warp_sum(s);
                if (lane == 0) s_t[h * TK + j] = s;
            }
        }
        __syncthreads();
        // Online softmax update: a warp per head, a lane per key.
        for (int h = warp; h < hcn; h += nw) {
            float s = s_t[h * TK + lane];
            if (logit_out && lane < n) logit_out[(usize)h * p.maxc + base + lane] = s;
            float tmax = warp_max(s);
            float m_old = m_s[h];
            float m_new = fmaxf(m_old, tmax);
            float pj = lane < n ? expf(s - m_new) : 0.f;
            s_t[h * TK + lane] = pj;
            float ls = warp_sum(pj);
            __syncwarp();
            if (lane == 0) {
                float cr = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                corr[h] = cr;
                l_s[h] = l_s[h] * cr + ls;
                m_s[h] = m_new;
            }
        }
        __syncthreads();
        for (int e = tid; e < hcn * DV; e += NT_ATT) {
            int h = e / DV, c = e - h * DV;
            float a = acc[e] * corr[h];
            const float* ph = s_t + h * TK;
            for (int j = 0; j < n; j++) a += ph[j] * v_t[j * DV + c];
            acc[e] = a;
        }
        __syncthreads();
    }
}

// Loads the scaled queries of heads h0..h0+hcn of KV head kvh, row r.
template <class E>
__device__ void load_q(const Params& p, int r, int kvh, int h0, int hcn, float* q_s) {
    const typename E::T* q = (const typename E::T*)p.q;
    usize base = ((usize)r * p.hq + (usize)kvh * p.g + h0) * p.dk;
    for (int e = threadIdx.x; e < hcn * p.dk; e += blockDim.x) q_s[e] = E::ld(q, base + e) * p.scale;
}

__device__ __forceinline__ void store_partial(const Params& p, int wr, int hglob0, int hcn, int u,
                                              const float* acc, const float* m_s, const float* l_s) {
    float* ml = (float*)p.part_ml;
    float* pa = (float*)p.part_acc;
    for (int h = threadIdx.x; h < hcn; h += blockDim.x) {
        usize at = part_at(p, wr, hglob0 + h, u);
        ml[2 * at] = m_s[h];
        ml[2 * at + 1] = l_s[h];
    }
    for (int e = threadIdx.x; e < hcn * p.dv; e += blockDim.x) {
        int h = e / p.dv, c = e - h * p.dv;
        pa[part_at(p, wr, hglob0 + h, u) * p.dv + c] = acc[e];
    }
}

// Runs `attend` over [lo, hi) for every head chunk of the group and stores the partials
// of unit u (empty ranges store m = -inf, l = 0, acc = 0).
template <class E>
__device__ void attend_group(const Params& p, int r, int wr, int kvh, int lo, int hi, bool cmp, int u) {
    extern __shared__ float smem[];
    int hc = p.hc;
    float* q_s = smem;
    float* s_t = q_s + hc * p.dk;
    float* v_t = s_t + hc * TK;
    float* acc = v_t + TK * p.dv;
    float* m_s = acc + hc * p.dv;
    float* l_s = m_s + hc;
    float* corr = l_s + hc;
    typedef typename E::T T;
    int si = ((const int2*)p.tokmap)[r].x;
    const int* table = cmp ? (const int*)p.cmp_tab + (usize)si * p.cpps : (const int*)p.raw_tab + (usize)si * p.pps;
    const T* kpool = (const T*)(cmp ? p.cmp_k : p.raw_k);
    const T* vpool = (const T*)(cmp ? p.cmp_v : p.raw_v);
    for (int h0 = 0; h0 < p.g; h0 += hc) {
        int hcn = min(hc, p.g - h0);
        int hglob0 = kvh * p.g + h0;
        load_q<E>(p, r, kvh, h0, hcn, q_s);
        __syncthreads();
        float* lo_out = cmp ? (float*)p.logits + ((usize)wr * p.hq + hglob0) * p.maxc : (float*)0;
        attend<E>(p, kpool, vpool, table, kvh, lo, hi, hcn, q_s, s_t, v_t, acc, m_s, l_s, corr, lo_out);
        store_partial(p, wr, hglob0, hcn, u, acc, m_s, l_s);
        __syncthreads();
    }
}

// ---------------------------------------------------------------- decode/prefill stages

// Split `split` of `nsplit` over [0, n): chunks of ceil(n / nsplit) rounded up to 16 keys,
// at least 64 (lengths are device-side: a fixed grid divides the actual length; splits past
// the end get empty ranges and store empty partials).
__device__ __forceinline__ void split_range(int n, int nsplit, int split, int& lo, int& hi) {
    int ch = max(((n + nsplit - 1) / nsplit + 15) & ~15, 64);
    lo = min(split * ch, n);
    hi = min(lo + ch, n);
}

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
// [0, t] over the raw pools; partials as the NSA units (unit = split).
template <class E>
__device__ void full_partial(const Params& p) {
    int wr = blockIdx.x, r = p.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int t = ((const int2*)p.tokmap)[r].y;
    int lo, hi;
    split_range(t + 1, p.nsplit_c, split, lo, hi);
    attend_group<E>(p, r, wr, kvh, lo, hi, false, split);
}

// Eq. 9 overlap count of offset k: pairs (a, b), a < A, b < B, a + b = k.
__device__ __forceinline__ float overlap_count(int k, int A, int B) {
    int lo = k - (B - 1);
    if (lo < 0) lo = 0;
    int hi = min(k, A - 1);
    return hi >= lo ? (float)(hi - lo + 1) : 0.f;
}

// Fast exp on the SFU (ex2.approx, flush-to-zero): exp(-inf) = 0. Used where the
// result feeds a softmax or a ranking, whose error budget (1e-2 relative in 16-bit
// outputs, near-tie tolerance in selection) dwarfs its ~2 ulp.
__device__ __forceinline__ float fexp(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
}

// Selection, split over chunks of selection blocks: grid rows x HKV x sel_chunks, 256
// threads. A chunk of `cb` blocks (at least SEL_MIN_CHUNK; the host launches enough
// chunks that it is exactly that, `SEL_CHUNK` in params.rs): merges the compressed
// splits' (m, l) of the group's heads, sums the group's normalised probabilities over the
// compressed tokens its blocks overlap (Eq. 8), scores its blocks (Eq. 9, forced blocks
// +inf), ranks them (a thread per block counts the better ones: ties to the lower index)
// and stores its best n, best first, -1 padded. The last chunk block of the (row, KV
// head) to finish (a counter in the workspace, reset by that block) merges the chunks'
// lists (the true top n are all in their lists: every better block is in its own list's
// best n): up to SEL_RANK_ALL candidates each ranked against all, else merged as sorted
// lists by one warp. Output ascending, -1 padded.
// Shared: chunk phase m[g] | inv[g] | blk[cb] | ps[cb*B + A - 1];
//         merge phase cand[chunks * n] (int2) | heads[chunks] | pick[n].
#define SEL_MIN_CHUNK 64
#define SEL_RANK_ALL 512  // the final merge ranks every candidate up to this many

__device__ __forceinline__ bool better(float s1, int j1, float s2, int j2) {
    if (j1 < 0) return false;
    if (j2 < 0) return true;
    return s1 > s2 || (s1 == s2 && j1 < j2);
}

template <class E>
__device__ void select_blocks(const Params& p) {
    extern __shared__ float smem[];
    __shared__ int last;
    const int wr = blockIdx.x, r = p.row0 + wr, kvh = blockIdx.y, ch = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int t = ((const int2*)p.tokmap)[r].y;
    const int nc = num_cmp(p, t + 1);
    const int A = p.cl / p.cd, B = p.lsel / p.cd, n = p.nsel;
    const int nblk = t / p.lsel + 1, b = nblk - 1;
    const int cb = max(SEL_MIN_CHUNK, (nblk + p.sel_chunks - 1) / p.sel_chunks);
    const int nlists = (nblk + cb - 1) / cb;
    const usize pair = (usize)wr * p.hkv + kvh;
    int2* lists = (int2*)p.cand + pair * p.sel_chunks * n;
    const int j0 = min(ch * cb, nblk), j1 = min(j0 + cb, nblk);
    if (j0 < j1) {
        float* mh = smem;
        float* inv = mh + p.g;
        float* blk = inv + p.g;
        float* ps = blk + cb;
        const float* ml = (const float*)p.part_ml;
        // Softmax (m, l) of every head over all compressed splits: a warp per head, one
        // pass (each lane merges its splits online, then the lanes' states merge).
        for (int h = warp; h < p.g; h += nwarps) {
            int hg = kvh * p.g + h;
            float m = NEG_INF, l = 0.f;
            for (int u = lane; u < p.nsplit_c; u += 32) {
                float2 x = ((const float2*)ml)[part_at(p, wr, hg, u)];
                if (x.y > 0.f) {
                    float mn = fmaxf(m, x.x);
                    l = l * fexp(m - mn) + x.y * fexp(x.x - mn);
                    m = mn;
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                float mo = __shfl_xor_sync(0xffffffffu, m, o), lo = __shfl_xor_sync(0xffffffffu, l, o);
                float mn = fmaxf(m, mo);
                l = (l > 0.f ? l * fexp(m - mn) : 0.f) + (lo > 0.f ? lo * fexp(mo - mn) : 0.f);
                m = mn;
            }
            if (lane == 0) {
                mh[h] = m;
                inv[h] = l > 0.f ? 1.0f / l : 0.f;
            }
        }
        __syncthreads();
        // Group-summed probabilities of compressed tokens i0 .. i0 + span (0 outside [0, nc)).
        const int i0 = B * j0 - (A - 1), span = B * (j1 - j0) + A - 1;
        const float* lg = (const float*)p.logits + ((usize)wr * p.hq + (usize)kvh * p.g) * p.maxc;
        for (int x = tid; x < span; x += blockDim.x) {
            int i = i0 + x;
            float a = 0.f;
            if (i >= 0 && i < nc) {
                // 16 heads' loads in flight at once (one latency round for a group of 16).
                const float* li = lg + i;  // head h's logit of token i: li[h * maxc]
                for (int h0 = 0; h0 < p.g; h0 += 16) {
                    float v[16];
#pragma unroll
                    for (int k = 0; k < 16; k++) v[k] = h0 + k < p.g ? li[(h0 + k) * p.maxc] : 0.f;
#pragma unroll
                    for (int k = 0; k < 16; k++)
                        if (h0 + k < p.g) a += fexp(v[k] - mh[h0 + k]) * inv[h0 + k];
                }
            }
            ps[x] = a;
        }
        __syncthreads();
        // Block scores (Eq. 9: overlap counts of the A x B pairs), forced blocks +inf.
        for (int j = j0 + tid; j < j1; j += blockDim.x) {
            const float* pj = ps + B * (j - j0);
            float acc = 0.f;
            for (int k = 0; k < A + B - 1; k++) acc += overlap_count(k, A, B) * pj[k];
            if (j < p.n_init || j > b - p.n_local) acc = POS_INF;
            blk[j - j0] = acc;
        }
        __syncthreads();
        // This chunk's best n, best first.
        int2* mine = lists + (usize)ch * n;
        const int cn = j1 - j0;
        for (int x = tid; x < cn; x += blockDim.x) {
            float s = blk[x];
            int rank = 0;
#pragma unroll 8
            for (int k = 0; k < cn; k++) {
                float o = blk[k];  // the same address across the warp: a broadcast
                rank += (o > s) | ((o == s) & (k < x));
            }
            if (rank < n) mine[rank] = make_int2(__float_as_int(s), j0 + x);
        }
        // Padding (-inf, INT_MAX) sorts after every real block (scores are sums of
        // probabilities or +inf) under the plain (score desc, index asc) order.
        for (int k = (j1 - j0) + tid; k < n; k += blockDim.x) mine[k] = make_int2(__float_as_int(NEG_INF), 0x7fffffff);
    }
    // The last chunk block to finish merges (classic threadfence + counter pattern).
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        int done = atomicAdd((int*)p.count + pair, 1);
        last = done == p.sel_chunks - 1;
        if (last) atomicExch((int*)p.count + pair, 0);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    int2* cs = (int2*)smem;
    int* heads = (int*)(cs + nlists * n);
    int* pick = heads + nlists;
    for (int x = tid; x < nlists * n; x += blockDim.x) {
        // Written by other blocks of this launch: read through L2 (volatile), not L1.
        const volatile int* src = (const volatile int*)(lists + x);
        cs[x] = make_int2(src[0], src[1]);
    }
    for (int l = tid; l < nlists; l += blockDim.x) heads[l] = 0;
    const int count = min(n, nblk);
    __syncthreads();
    if (nlists * n <= SEL_RANK_ALL) {
        // Few candidates: each thread ranks its own against all of them (every thread reads
        // the same candidate at each step: shared-memory broadcasts, no serial rounds).
        for (int x = tid; x < nlists * n; x += blockDim.x) {
            int2 me = cs[x];
            if (me.y == 0x7fffffff) continue;
            float s = __int_as_float(me.x);
            int rank = 0;
#pragma unroll 8
            for (int y = 0; y < nlists * n; y++) {
                int2 o = cs[y];
                float os = __int_as_float(o.x);
                rank += (os > s) | ((os == s) & (o.y < me.y));
            }
            if (rank < count) pick[rank] = me.y;
        }
    } else if (warp == 0) {
        // Merge of sorted lists by one warp: each round takes the best list head (a lane
        // scans its lists' heads, then a warp argmax) and advances that list.
        for (int k = 0; k < count; k++) {
            float bs = 0.f;
            int bj = -1, bl = -1;
            for (int l = lane; l < nlists; l += 32) {
                int h = heads[l];
                if (h < n) {
                    int2 c = cs[l * n + h];
                    if (better(__int_as_float(c.x), c.y, bs, bj)) {
                        bs = __int_as_float(c.x);
                        bj = c.y;
                        bl = l;
                    }
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                float os = __shfl_xor_sync(0xffffffffu, bs, o);
                int oj = __shfl_xor_sync(0xffffffffu, bj, o);
                int ol = __shfl_xor_sync(0xffffffffu, bl, o);
                if (better(os, oj, bs, bj)) {
                    bs = os;
                    bj = oj;
                    bl = ol;
                }
            }
            if (lane == 0) pick[k] = bj;
            if (bl >= 0 && lane == (bl & 31)) heads[bl] += 1;
            __syncwarp();
        }
    }
    __syncthreads();
    int* wsel = (int*)p.sel + pair * n;
    int* usel = p.selected ? (int*)p.selected + ((usize)r * p.hkv + kvh) * n : (int*)0;
    for (int k = tid; k < n; k += blockDim.x) {
        if (k < count) {
            int me = pick[k], pos = 0;
            for (int k2 = 0; k2 < count; k2++) pos += pick[k2] < me;
            wsel[pos] = me;
            if (usel) usel[pos] = me;
        } else {
            wsel[k] = -1;
            if (usel) usel[k] = -1;
        }
    }
}

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

// sum over units u0..u1 of col[u * stride] * f[u], f[u] == 0 skipped; loads 16 at a time.
__device__ __forceinline__ float unit_sum(const float* col, int stride, const float* f, int u0, int u1) {
    float a = 0.f;
    for (int u = u0; u < u1; u += 16) {
        float x[16];
#pragma unroll
        for (int k = 0; k < 16; k++) x[k] = (u + k < u1 && f[u + k] != 0.f) ? col[(usize)(u + k) * stride] : 0.f;
#pragma unroll
        for (int k = 0; k < 16; k++)
            if (u + k < u1 && f[u + k] != 0.f) a += x[k] * f[u + k];
    }
    return a;
}

// (max, sum) of the partial softmax states u0..u1 (m[u], l[u]; l = 0: empty) by one warp.
__device__ __forceinline__ float2 merge_ml(const float* mu, const float* lu, int u0, int u1, int lane) {
    float m = NEG_INF;
    for (int u = u0 + lane; u < u1; u += 32)
        if (lu[u] > 0.f) m = fmaxf(m, mu[u]);
    m = warp_max(m);
    float l = 0.f;
    if (m != NEG_INF)
        for (int u = u0 + lane; u < u1; u += 32)
            if (lu[u] > 0.f) l += lu[u] * expf(mu[u] - m);
    return make_float2(m, warp_sum(l));
}

// Gated combine of `p.comb_heads` consecutive query heads of one row per block (the host
// picks more heads per block when rows are many, so blocks stay few and long, and one
// head per block at batch 1, so the work spreads over SMs). Per head: each branch's
// (max, sum) over its units (a warp per (head, branch)), the per-unit merge factors
// exp(m_u - m_branch) in shared memory, then per output column the branch sums of the
// units' accumulators; with one head per block, P = blockDim / DV parts of the block sum
// slices of the units (P independent load streams per column) and their sums are added.
// Shared: m[H][U] | f[H][U] (l_u, then the factor) | gm[H][3] | gl[H][3] | red[3][P][DV].
template <class E>
__device__ void combine(const Params& p) {
    extern __shared__ float smem[];
    const int wr = blockIdx.x, r = p.row0 + wr, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int H = p.comb_heads, hg0 = blockIdx.y * H;
    const int s0 = p.nsplit_c, s1 = s0 + p.units_s, U = s1 + p.units_w;
    const int DV = p.dv, P = H == 1 ? max(1, (int)blockDim.x / DV) : 1;
    float* mu = smem;
    float* fu = mu + H * U;
    float* gm = fu + H * U;
    float* gl = gm + 3 * H;
    float* red = gl + 3 * H;
    const float* ml = (const float*)p.part_ml;
    const float* pa = (const float*)p.part_acc;
    for (int x = tid; x < H * U; x += blockDim.x) {
        int hh = x / U, u = x - hh * U;
        float2 v = ((const float2*)ml)[part_at(p, wr, hg0 + hh, u)];
        mu[x] = v.x;
        fu[x] = v.y;
    }
    __syncthreads();
    for (int task = warp; task < 3 * H; task += blockDim.x >> 5) {
        int hh = task / 3, br = task - hh * 3;
        int u0 = br == 0 ? 0 : (br == 1 ? s0 : s1);
        int u1 = br == 0 ? s0 : (br == 1 ? s1 : U);
        float2 v = merge_ml(mu + hh * U, fu + hh * U, u0, u1, lane);
        if (lane == 0) {
            gm[task] = v.x;
            gl[task] = v.y;
        }
    }
    __syncthreads();
    for (int x = tid; x < H * U; x += blockDim.x) {
        int hh = x / U, u = x - hh * U;
        int grp = hh * 3 + (u < s0 ? 0 : (u < s1 ? 1 : 2));
        fu[x] = (fu[x] > 0.f && gm[grp] != NEG_INF) ? expf(mu[x] - gm[grp]) : 0.f;
    }
    __syncthreads();
    typename E::T* out = (typename E::T*)p.out;
    const int bounds[4] = {0, s0, s1, U};
    if (P > 1) {
        // One head (H = 1): P parts per column, then their sums are added.
        usize base = part_at(p, wr, hg0, 0) * DV;
        for (int e = tid; e < P * DV; e += blockDim.x) {
            int c = e % DV, part = e / DV;
#pragma unroll
            for (int br = 0; br < 3; br++) {
                int n = bounds[br + 1] - bounds[br];
                int lo = bounds[br] + n * part / P, hi = bounds[br] + n * (part + 1) / P;
                red[(br * P + part) * DV + c] = unit_sum(pa + base + c, DV, fu, lo, hi);
            }
        }
        __syncthreads();
    }
    // Every unit's accumulator is written (0 for empty units, whose factor is 0).
    for (int e = tid; e < H * DV; e += blockDim.x) {
        int hh = e / DV, c = e - hh * DV, hg = hg0 + hh;
        usize base = part_at(p, wr, hg, 0) * DV;
        float a[3];
#pragma unroll
        for (int br = 0; br < 3; br++) {
            float x = 0.f;
            if (P > 1)
                for (int part = 0; part < P; part++) x += red[(br * P + part) * DV + c];
            else
                x = unit_sum(pa + base + c, DV, fu + hh * U, bounds[br], bounds[br + 1]);
            a[br] = x;
        }
        const float* gt = (const float*)p.gates + ((usize)r * p.hq + hg) * 3;
        const float* g3 = gl + hh * 3;
        float o = 0.f;
        float ocmp = g3[0] > 0.f ? a[0] * (1.0f / g3[0]) : 0.f;
        o = o + gt[0] * ocmp;
        if (g3[1] > 0.f) o = o + (gt[1] / g3[1]) * a[1];
        if (g3[2] > 0.f) o = o + (gt[2] / g3[2]) * a[2];
        E::st(out, ((usize)r * p.hq + hg) * DV + c, o);
    }
}

// Full attention: merge the splits of one (row, query head), normalise, store.
// Shared: m[U] | f[U] | gm | gl.
template <class E>
__device__ void full_combine(const Params& p) {
    extern __shared__ float smem[];
    int wr = blockIdx.x, r = p.row0 + wr, hg = blockIdx.y, tid = threadIdx.x;
    int U = p.nsplit_c;
    float* mu = smem;
    float* fu = mu + U;
    float* gm = fu + U;
    const float* ml = (const float*)p.part_ml;
    const float* pa = (const float*)p.part_acc;
    for (int u = tid; u < U; u += blockDim.x) {
        usize at = part_at(p, wr, hg, u);
        mu[u] = ml[2 * at];
        fu[u] = ml[2 * at + 1];
    }
    __syncthreads();
    if (tid < 32) {
        float2 ml_ = merge_ml(mu, fu, 0, U, tid);
        if (tid == 0) {
            gm[0] = ml_.x;
            gm[1] = ml_.y;
        }
    }
    __syncthreads();
    for (int u = tid; u < U; u += blockDim.x) fu[u] = (fu[u] > 0.f && gm[0] != NEG_INF) ? expf(mu[u] - gm[0]) : 0.f;
    __syncthreads();
    float inv = gm[1] > 0.f ? 1.0f / gm[1] : 0.f;
    typename E::T* out = (typename E::T*)p.out;
    usize base = part_at(p, wr, hg, 0) * p.dv;
    for (int c = tid; c < p.dv; c += blockDim.x) {
        float a = unit_sum(pa + base + c, p.dv, fu, 0, U);
        E::st(out, ((usize)r * p.hq + hg) * p.dv + c, a * inv);
    }
}

// ---------------------------------------------------------------- tensor-core attention
// bf16/f16 with DK, DV multiples of 16 (the host checks; other shapes use `attend`).
// A block of MW warps owns (row, KV head, unit) and up to 16 heads of the group at a time
// (the rows of an m16n8k16 tile; a smaller group pads rows with zero queries). Each warp
// streams its own tiles of MK = 16 keys (tiles warp, warp + MW, ...) through `p.nstage`
// (2..MAX_STAGES, picked by the host from the occupancy) shared-memory stages with
// cp.async (16-byte copies, zero-filled for masked keys),
// computes S = Q K^T (ldmatrix + mma), an online softmax in registers, O += P V (P
// packed to 16 bits as the A operand, V through ldmatrix.trans), then the warps' states
// are merged in shared memory and stored as the unit's partial (m, l, acc).
// With `p.mode & 1` (sm_90) a tile is loaded by 1-D bulk copies instead, one K or V row
// per lane, completing on the stage's mbarrier; masked keys of a partly valid tile copy a
// valid row of the tile (their scores are masked), fully masked tiles load nothing.
// With `p.mode & 2` (sm_90, DK and DV multiples of 64, 16-aligned pages and blocks) a tile
// is DK/64 + DV/64 boxes of a tensor map instead (16 rows x 128 bytes each, the copy
// engine's 128-byte swizzle, which the ldmatrix addresses undo): a few large requests
// instead of 32 row copies. The copy engine issues requests slowly, so this is what keeps
// enough bytes in flight. Masked keys' V rows are zeroed after arrival.
// Shared: q_s[16][DK+8] | mbarriers[MW][MAX_STAGES] (128 bytes) | per warp, per stage:
// K[16][DK+8] V[16][DV+8] (16-bit; unpadded K[DK/64][16][64] V[DV/64][16][64] boxes from a
// 1024-byte boundary with tensor maps); after the loop the stages are reused for the
// merge: acc[MW][16][DV] | m[MW][16] | l | f.
#define MW 4
#define MK 16
#define TMAP_BYTES 128
#define MAX_STAGES 4  // the 128 bytes of mbarriers hold MW x MAX_STAGES

__device__ __forceinline__ unsigned smem_u32(const void* ptr) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(ptr));
    return r;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm4(unsigned a, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a)
                 : "memory");
}
__device__ __forceinline__ void ldsm4t(unsigned a, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a)
                 : "memory");
}
template <int MMA>
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
    if (MMA == 1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}
// 1-D bulk copies (the copy engine, sm_90) completing on an mbarrier.
__device__ __forceinline__ void mbar_init(unsigned bar, int count) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_inval(unsigned bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void mbar_expect(unsigned bar, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
#if __CUDA_ARCH__ >= 900
    unsigned ok = 0;
    while (!ok) {
        asm volatile(
            "{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }"
            : "=r"(ok)
            : "r"(bar), "r"(parity)
            : "memory");
    }
#endif
}
__device__ __forceinline__ void fence_async_smem() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}
__device__ __forceinline__ void fence_mbar_init() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_g2s(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
#endif
}

// A box of a 3-D tensor map (in global memory) into shared memory, completing on an mbarrier.
__device__ __forceinline__ void tma_load3(unsigned dst, u64 map, int x, int y, int z, unsigned bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];" ::"r"(dst),
        "l"(map), "r"(x), "r"(y), "r"(z), "r"(bar)
        : "memory");
#endif
}

template <int MMA>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if (MMA == 1)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The keys of one unit: a contiguous range [lo, lo + n), or `n / lsel` selected blocks
// (`blocks`, -1 = none) of lsel keys each, masked past position t.
struct Keys {
    const int* blocks;
    int lo, n, t;
    int first;  // contiguous ranges: positions below it are masked (a 16-aligned window start)
};
__device__ __forceinline__ int key_pos(const Params& p, const Keys& ks, int j) {
    if (j >= ks.n) return -1;
    if (!ks.blocks) return ks.lo + j >= ks.first ? ks.lo + j : -1;
    int b = ks.blocks[j / p.lsel];
    if (b < 0) return -1;
    int pos = b * p.lsel + j % p.lsel;
    return pos <= ks.t ? pos : -1;
}

template <class E, int NVT>
__device__ void attend_mma(const Params& p, const u16* kpool, const u16* vpool, u64 kmap, u64 vmap, const int* table,
                           int kvh, const Keys& ks, int hcn, const u16* qsrc, int wr, int hglob0, int u,
                           float* logit_out) {
    extern __shared__ float smem[];
    const int DK = p.dk, DV = p.dv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q4 = lane & 3;
    const bool bulk = (p.mode & 1) != 0, tma = (p.mode & 2) != 0;
    // Tensor-map tiles are unpadded, 128-byte swizzled boxes of 16 rows x 64 columns.
    const int QS = DK + 8, VS = tma ? DV : DV + 8, KS = tma ? DK : QS;
    const int stage_elems = MK * (KS + VS);
    u16* q_s = (u16*)smem;
    unsigned long long* bars = (unsigned long long*)(q_s + 16 * QS);
    u16* stg = q_s + 16 * QS + 64;  // 128 bytes of mbarriers
    if (tma) stg = (u16*)smem + ((smem_u32(stg) + 1023u & ~1023u) - smem_u32(smem)) / 2;  // box alignment
    const int S = p.nstage;
    u16* my = stg + warp * S * stage_elems;
    const unsigned bar0 = smem_u32(bars + warp * MAX_STAGES);
    if (bulk && lane == 0) {
        for (int st = 0; st < S; st++) mbar_init(bar0 + 8 * st, 1);
        fence_mbar_init();
    }
    if (((usize)qsrc & 15) == 0) {
        // 16-byte loads, all independent (DK is a multiple of 16, so rows stay aligned).
        const int cpr = DK / 8;
        for (int e = tid; e < 16 * cpr; e += blockDim.x) {
            int h = e / cpr, c = (e - h * cpr) * 8;
            uint4 x = h < hcn ? *(const uint4*)(qsrc + (usize)h * DK + c) : make_uint4(0, 0, 0, 0);
            *(uint4*)(q_s + h * QS + c) = x;
        }
    } else {
        for (int e = tid; e < 16 * DK; e += blockDim.x) {
            int h = e / DK, c = e - h * DK;
            q_s[h * QS + c] = h < hcn ? qsrc[(usize)h * DK + c] : (u16)0;
        }
    }
    __syncthreads();
    const int ntiles = (ks.n + MK - 1) / MK;
    const int cnt = ntiles > warp ? (ntiles - warp + MW - 1) / MW : 0;
    const int ck = DK / 8, cv = DV / 8;
    // Tensor maps: lane l holds the first key position and the box row (z = page * HKV +
    // kvh) of the warp's tiles 32g + l, looked up together once per 32 tiles (one round of
    // selection-index and page-table loads, instead of two dependent loads before each
    // tile's copy). Two groups (g even / odd) live at once: the copies run S - 1 tiles
    // ahead of the math, which still reads the previous group.
    int tpos[2] = {-1, -1}, tz[2] = {0, 0};
    auto tile_src = [&](int li) {  // warp-local tile li = (ti - warp) / MW, lane's entry
        const int g = (li >> 5) & 1, j0 = (warp + li * MW) * MK;
        int pos0 = -1;
        if (j0 < ks.n) {
            if (ks.blocks) {
                int b = ks.blocks[j0 / p.lsel];
                pos0 = b >= 0 && b * p.lsel + j0 % p.lsel <= ks.t ? b * p.lsel + j0 % p.lsel : -1;
            } else {
                pos0 = ks.lo + min(j0 + MK, ks.n) - 1 >= ks.first ? ks.lo + j0 : -1;
            }
        }
        int z = pos0 >= 0 ? table[pos0 / p.page] * p.hkv + kvh : 0;
        if (g) {
            tpos[1] = pos0;
            tz[1] = z;
        } else {
            tpos[0] = pos0;
            tz[0] = z;
        }
    };
    // First key position of warp-local tile li (a shuffle: call it warp-uniformly).
    auto tile_pos0 = [&](int li) { return __shfl_sync(0xffffffffu, (li >> 5) & 1 ? tpos[1] : tpos[0], li & 31); };
    // Position of key jj (0..15) of warp-local tile li, given its first position, or -1.
    auto tile_key = [&](int li, int pos0, int jj) {
        if (pos0 < 0) return -1;
        int pos = pos0 + jj;
        if (ks.blocks) return pos <= ks.t ? pos : -1;
        return (warp + li * MW) * MK + jj < ks.n && pos >= ks.first ? pos : -1;
    };
    auto load = [&](int ti, int st) {
        u16* kd = my + st * stage_elems;
        u16* vd = kd + MK * KS;
        if (tma) {
            // The tile's keys are 16 consecutive rows of one page (the host guarantees
            // 16-aligned ranges, blocks and pages): DK/64 + DV/64 box loads.
            const int li = (ti - warp) / MW;
            if ((li & 31) == 0) tile_src(li + lane);
            int pos0 = tile_pos0(li);
            int z = __shfl_sync(0xffffffffu, (li >> 5) & 1 ? tz[1] : tz[0], li & 31);
            unsigned bar = bar0 + 8 * st;
            fence_async_smem();
            if (pos0 < 0) {
                if (lane == 0) mbar_expect(bar, 0u);
                return;
            }
            if (lane == 0) mbar_expect(bar, (unsigned)(MK * (DK + DV) * 2));
            __syncwarp();
            int y = pos0 % p.page;
            int nbk = DK / 64, nbv = DV / 64;
            if (lane < nbk)
                tma_load3(smem_u32(kd) + lane * 2048, kmap, lane * 64, y, z, bar);
            else if (lane < nbk + nbv)
                tma_load3(smem_u32(vd) + (lane - nbk) * 2048, vmap, (lane - nbk) * 64, y, z, bar);
            return;
        }
        if (bulk) {
            int j = lane & (MK - 1);
            int pos = key_pos(p, ks, ti * MK + j);
            unsigned valid = __ballot_sync(0xffffffffu, pos >= 0) & 0xffffu;
            unsigned bar = bar0 + 8 * st;
            fence_async_smem();  // earlier generic accesses of the stage before the copy engine's writes
            if (valid == 0u) {
                if (lane == 0) mbar_expect(bar, 0u);
                return;
            }
            int first = __shfl_sync(0xffffffffu, pos, __ffs(valid) - 1);
            int src = pos >= 0 ? pos : first;
            if (lane == 0) mbar_expect(bar, (unsigned)(MK * (DK + DV) * 2));
            __syncwarp();
            int page = table[src / p.page];
            int off = src % p.page;
            if (lane < MK)
                bulk_g2s(smem_u32(kd + j * QS), kpool + row_at(p, page, kvh, off, DK), (unsigned)(DK * 2), bar);
            else
                bulk_g2s(smem_u32(vd + j * VS), vpool + row_at(p, page, kvh, off, DV), (unsigned)(DV * 2), bar);
            return;
        }
        int pos = lane < MK ? key_pos(p, ks, ti * MK + lane) : -1;
        usize rk = 0, rv = 0;
        if (pos >= 0) {
            int page = table[pos / p.page];
            int off = pos % p.page;
            rk = row_at(p, page, kvh, off, DK);
            rv = row_at(p, page, kvh, off, DV);
        }
        for (int j = 0; j < MK; j++) {
            int pj = __shfl_sync(0xffffffffu, pos, j);
            usize k0 = __shfl_sync(0xffffffffu, rk, j);
            usize v0 = __shfl_sync(0xffffffffu, rv, j);
            int bytes = pj >= 0 ? 16 : 0;
            for (int c = lane; c < ck; c += 32) cp_async16(smem_u32(kd + j * QS + c * 8), kpool + k0 + c * 8, bytes);
            for (int c = lane; c < cv; c += 32) cp_async16(smem_u32(vd + j * VS + c * 8), vpool + v0 + c * 8, bytes);
        }
    };
    float o[NVT][4];
#pragma unroll
    for (int i = 0; i < NVT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;
    for (int st = 0; st < S - 1; st++) {
        if (st < cnt) load(warp + st * MW, st);
        cp_commit();
    }
    const unsigned qa = smem_u32(q_s + ((lane & 7) + ((lane >> 3) & 1) * 8) * QS + (lane >> 4) * 8);
    for (int i = 0; i < cnt; i++) {
        int nx = i + S - 1;
        if (nx < cnt) load(warp + nx * MW, nx % S);
        if (bulk) {
            mbar_wait(bar0 + 8 * (i % S), (unsigned)((i / S) & 1));
        } else {
            cp_commit();
            if (S == 2)
                cp_wait<1>();
            else if (S == 3)
                cp_wait<2>();
            else
                cp_wait<3>();
        }
        __syncwarp();
        const int j0 = (warp + i * MW) * MK;
        // A tile with no visible key (a -1 block, a block past t) is skipped: its stage
        // holds no copied rows in bulk mode.
        const int tp0 = tma ? tile_pos0(i) : -1;
        unsigned vis =
            __ballot_sync(0xffffffffu, (tma ? tile_key(i, tp0, lane & (MK - 1)) : key_pos(p, ks, j0 + (lane & (MK - 1)))) >= 0) &
            0xffffu;
        if (vis == 0u) continue;
        u16* kt = my + (i % S) * stage_elems;
        u16* vt = kt + MK * KS;
        if (tma && vis != 0xffffu) {
            // Box rows of masked keys hold whatever the page holds there (maybe NaN):
            // zero their V rows, as P = 0 times NaN is NaN. (The next copy into this stage
            // is ordered after these writes by the proxy fence in `load`.)
            for (int x = lane; x < MK * (DV / 8); x += 32) {
                int r = x & (MK - 1), c = x >> 4;  // row, 16-byte chunk (any order: whole rows)
                if (!((vis >> r) & 1u)) *(uint4*)(vt + (c >> 3) * 1024 + r * 64 + (c & 7) * 8) = make_uint4(0, 0, 0, 0);
            }
            __syncwarp();
        }
        float s[2][4];
#pragma unroll
        for (int e = 0; e < 4; e++) s[0][e] = s[1][e] = 0.f;
        // ldmatrix row addresses; swizzled boxes: 16-byte chunk c of row r of a box sits
        // at chunk c ^ (r & 7) of the row (the copy engine's 128-byte swizzle).
        const int krow = (lane & 7) + (lane >> 4) * 8, kc = (lane >> 3) & 1;
        const unsigned ka = tma ? smem_u32(kt) + krow * 128 : smem_u32(kt + krow * KS + kc * 8);
        for (int kk = 0; kk < DK; kk += 16) {
            unsigned a0, a1, a2, a3, b0, b1, b2, b3;
            ldsm4(qa + kk * 2, a0, a1, a2, a3);
            ldsm4(tma ? ka + ((kk >> 6) << 11) + (((((kk >> 3) & 7) + kc) ^ (krow & 7)) << 4) : ka + kk * 2, b0, b1, b2,
                  b3);
            mma16816<E::MMA>(s[0], a0, a1, a2, a3, b0, b1);
            mma16816<E::MMA>(s[1], a0, a1, a2, a3, b2, b3);
        }
        // Scale, mask, keep the raw logits (compressed branch), online softmax. A lane's
        // two keys of an n8 tile are adjacent positions (ranges are contiguous there):
        // one 8-byte store per head when both are visible (the host keeps maxc even).
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            int pos[2];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int jj = nt * 8 + q4 * 2 + e;
                pos[e] = (vis >> jj) & 1u ? (tma ? tile_key(i, tp0, jj) : key_pos(p, ks, j0 + jj)) : -1;
                s[nt][e] *= p.scale;
                s[nt][2 + e] *= p.scale;
            }
            if (logit_out) {
                float* la = logit_out + (usize)g * p.maxc;
                float* lb = logit_out + (usize)(g + 8) * p.maxc;
                if (pos[0] >= 0 && pos[1] == pos[0] + 1 && (pos[0] & 1) == 0) {
                    if (g < hcn) *(float2*)(la + pos[0]) = make_float2(s[nt][0], s[nt][1]);
                    if (g + 8 < hcn) *(float2*)(lb + pos[0]) = make_float2(s[nt][2], s[nt][3]);
                } else {
#pragma unroll
                    for (int e = 0; e < 2; e++)
                        if (pos[e] >= 0) {
                            if (g < hcn) la[pos[e]] = s[nt][e];
                            if (g + 8 < hcn) lb[pos[e]] = s[nt][2 + e];
                        }
                }
            }
#pragma unroll
            for (int e = 0; e < 2; e++) {
                if (pos[e] < 0) s[nt][e] = s[nt][2 + e] = NEG_INF;
            }
        }
        float xA = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
        float xB = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
        float nA = fmaxf(mA, xA), nB = fmaxf(mB, xB);
        float uA = nA == NEG_INF ? 0.f : nA, uB = nB == NEG_INF ? 0.f : nB;
        float cA = fexp(mA - uA), cB = fexp(mB - uB);
        float pr[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            pr[nt][0] = fexp(s[nt][0] - uA);
            pr[nt][1] = fexp(s[nt][1] - uA);
            pr[nt][2] = fexp(s[nt][2] - uB);
            pr[nt][3] = fexp(s[nt][3] - uB);
        }
        lA = lA * cA + (pr[0][0] + pr[0][1] + pr[1][0] + pr[1][1]);
        lB = lB * cB + (pr[0][2] + pr[0][3] + pr[1][2] + pr[1][3]);
        mA = nA;
        mB = nB;
#pragma unroll
        for (int d = 0; d < NVT; d++) {
            o[d][0] *= cA;
            o[d][1] *= cA;
            o[d][2] *= cB;
            o[d][3] *= cB;
        }
        unsigned pa0 = pack2<E::MMA>(pr[0][0], pr[0][1]), pa1 = pack2<E::MMA>(pr[0][2], pr[0][3]);
        unsigned pa2 = pack2<E::MMA>(pr[1][0], pr[1][1]), pa3 = pack2<E::MMA>(pr[1][2], pr[1][3]);
        const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vc = lane >> 4;
        const unsigned va = tma ? smem_u32(vt) + vrow * 128 : smem_u32(vt + vrow * VS + vc * 8);
#pragma unroll
        for (int dp = 0; dp < NVT / 2; dp++) {
            if (dp * 16 < DV) {
                unsigned b0, b1, b2, b3;
                ldsm4t(tma ? va + ((dp >> 2) << 11) + (((((dp * 2) & 7) + vc) ^ (vrow & 7)) << 4) : va + dp * 32, b0, b1,
                       b2, b3);
                mma16816<E::MMA>(o[2 * dp], pa0, pa1, pa2, pa3, b0, b1);
                mma16816<E::MMA>(o[2 * dp + 1], pa0, pa1, pa2, pa3, b2, b3);
            }
        }
        __syncwarp();
    }
    cp_wait<0>();
    __syncwarp();
    if (bulk && lane == 0)
        for (int st = 0; st < S; st++) mbar_inval(bar0 + 8 * st);
    lA += __shfl_xor_sync(0xffffffffu, lA, 1);
    lA += __shfl_xor_sync(0xffffffffu, lA, 2);
    lB += __shfl_xor_sync(0xffffffffu, lB, 1);
    lB += __shfl_xor_sync(0xffffffffu, lB, 2);
    __syncthreads();  // every warp is done with the stages
    float* area = (float*)stg;
    float* mw = area + MW * 16 * DV;
    float* lw = mw + MW * 16;
    float* fw = lw + MW * 16;
    float* mine = area + warp * 16 * DV;
#pragma unroll
    for (int d = 0; d < NVT; d++) {
        if (d * 8 < DV) {
            int c = d * 8 + q4 * 2;
            mine[g * DV + c] = o[d][0];
            mine[g * DV + c + 1] = o[d][1];
            mine[(g + 8) * DV + c] = o[d][2];
            mine[(g + 8) * DV + c + 1] = o[d][3];
        }
    }
    if (q4 == 0) {
        mw[warp * 16 + g] = mA;
        mw[warp * 16 + g + 8] = mB;
        lw[warp * 16 + g] = lA;
        lw[warp * 16 + g + 8] = lB;
    }
    __syncthreads();
    float* ml = (float*)p.part_ml;
    float* pacc = (float*)p.part_acc;
    if (tid < 16) {
        float m = NEG_INF;
        for (int w = 0; w < MW; w++) m = fmaxf(m, mw[w * 16 + tid]);
        float l = 0.f;
        for (int w = 0; w < MW; w++) {
            float f = (m == NEG_INF || mw[w * 16 + tid] == NEG_INF) ? 0.f : fexp(mw[w * 16 + tid] - m);
            fw[w * 16 + tid] = f;
            l += f * lw[w * 16 + tid];
        }
        if (tid < hcn) {
            usize at = part_at(p, wr, hglob0 + tid, u);
            ml[2 * at] = l > 0.f ? m : NEG_INF;
            ml[2 * at + 1] = l;
        }
    }
    __syncthreads();
    for (int e = tid; e < hcn * DV; e += blockDim.x) {
        int h = e / DV, c = e - h * DV;
        float a = 0.f;
        for (int w = 0; w < MW; w++) a += fw[w * 16 + h] * area[(w * 16 + h) * DV + c];
        pacc[part_at(p, wr, hglob0 + h, u) * DV + c] = a;
    }
    __syncthreads();  // the shared memory is reused by the next head chunk
}

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
        attend_mma<E, NVT>(p, (const u16*)p.cmp_k, (const u16*)p.cmp_v, p.tmaps + 2 * TMAP_BYTES,
                           p.tmaps + 3 * TMAP_BYTES, table, kvh, ks, hcn, q, wr, hg0, split, lg);
    }
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
        int lo = ((p.mode & 2) ? wlo & ~15 : wlo) + c * span;
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
        attend_mma<E, NVT>(p, (const u16*)p.raw_k, (const u16*)p.raw_v, p.tmaps, p.tmaps + TMAP_BYTES, table, kvh,
                           ks, hcn, q, wr, hg0, p.nsplit_c + u, (float*)0);
    }
}

// Full causal attention, tensor cores: split `blockIdx.z` of [0, t].
template <class E, int NVT>
__device__ void full_mma(const Params& p) {
    int wr = blockIdx.x, r = p.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int2 tm = ((const int2*)p.tokmap)[r];
    int lo, hi;
    split_range(tm.y + 1, p.nsplit_c, split, lo, hi);
    Keys ks = {0, lo, hi - lo, tm.y, 0};
    const int* table = (const int*)p.raw_tab + (usize)tm.x * p.pps;
    for (int h0 = 0; h0 < p.g; h0 += 16) {
        int hcn = min(16, p.g - h0), hg0 = kvh * p.g + h0;
        const u16* q = (const u16*)p.q + ((usize)r * p.hq + hg0) * p.dk;
        attend_mma<E, NVT>(p, (const u16*)p.raw_k, (const u16*)p.raw_v, p.tmaps, p.tmaps + TMAP_BYTES, table, kvh, ks,
                           hcn, q, wr, hg0, split,
                           (float*)0);
    }
}

// ---------------------------------------------------------------- entry points

#define NSA_ENTRY(name, E, suffix) \
    extern "C" __global__ void __launch_bounds__(256) nsa_##name##_##suffix(const Params p) { name<E>(p); }

#define NSA_ALL(E, suffix)              \
    NSA_ENTRY(append, E, suffix)        \
    NSA_ENTRY(cmp_partial, E, suffix)   \
    NSA_ENTRY(select_blocks, E, suffix) \
    NSA_ENTRY(sw_partial, E, suffix)    \
    NSA_ENTRY(combine, E, suffix)       \
    NSA_ENTRY(full_partial, E, suffix)  \
    NSA_ENTRY(full_combine, E, suffix)

NSA_ALL(EF32, f32)
NSA_ALL(EF16, f16)
NSA_ALL(EBF16, bf16)

// Tensor-core attention: nsa_{cmp,sw,full}_mma_{bf16,f16}_{16,32} (DV <= 128 or <= 256).
#define NSA_MMA_ENTRY(name, E, suffix, NVT)                                                        \
    extern "C" __global__ void __launch_bounds__(MW * 32) nsa_##name##_##suffix##_##NVT(const Params p) { \
        name<E, NVT>(p);                                                                           \
    }
#define NSA_MMA_ALL(E, suffix)             \
    NSA_MMA_ENTRY(cmp_mma, E, suffix, 16)  \
    NSA_MMA_ENTRY(sw_mma, E, suffix, 16)   \
    NSA_MMA_ENTRY(full_mma, E, suffix, 16) \
    NSA_MMA_ENTRY(cmp_mma, E, suffix, 32)  \
    NSA_MMA_ENTRY(sw_mma, E, suffix, 32)   \
    NSA_MMA_ENTRY(full_mma, E, suffix, 32)

NSA_MMA_ALL(EF16, f16)
NSA_MMA_ALL(EBF16, bf16)
