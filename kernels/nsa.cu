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
//   copy_pages   copy-on-write copies of the step (grid: 2*seqs x HKV, exits past n_copies)
//   append       new K/V rows into their pages (grid: tokens x HKV)
//   compress     finished compressed tokens, every phi (grid: tokens x HKV x 2, exits past n_jobs)
//   then, per wave of up to `wave_rows` query rows:
//   cmp_partial  compressed attention split across blocks, raw logits kept (rows x HKV x nsplit_c)
//   select       combine split max/sum, Eq. 9 block scores summed over the group, top-n
//   sw_partial   selected blocks and window chunks, one block per unit (rows x HKV x units)
//   combine      merge every partial, gated sum, store (rows x HQ)
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
    u64 logits, psum, sel, part_ml, part_acc;
    int hq, hkv, g, dk, dv, page, pps, cpps;
    int cl, cd, lsel, nsel, n_init, n_local, window, phi;
    int phi_hidden, phi_pe, maxc, nb, nsplit_c, split_c, units_s, units_w;
    int wave_rows, row0, hc, pad0;
    float scale;
    int pad1;
};

#define NEG_INF (-__int_as_float(0x7f800000))
#define POS_INF (__int_as_float(0x7f800000))
#define TK 32          // keys per attention tile (one per lane in the softmax step)
#define NT_ATT 128     // threads of the attention kernels (4 warps)
#define MAX_DK_REG 16  // DK <= 512 = 32 lanes * 16 registers

// ---------------------------------------------------------------- storage types

struct EF32 {
    typedef float T;
    static __device__ __forceinline__ float ld(const T* p, usize i) { return p[i]; }
    static __device__ __forceinline__ void st(T* p, usize i, float x) { p[i] = x; }
};
struct EBF16 {
    typedef u16 T;
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

// ---------------------------------------------------------------- copy-on-write copies

template <class E>
__device__ void copy_pages(const Params& p) {
    typedef typename E::T T;
    const int* hdr = (const int*)p.hdr;
    int c = blockIdx.x, kvh = blockIdx.y;
    if (c >= hdr[2]) return;
    PageCopy pc = ((const PageCopy*)p.copies)[c];
    T* kpool = (T*)(pc.pool == 0 ? p.raw_k : p.cmp_k);
    T* vpool = (T*)(pc.pool == 0 ? p.raw_v : p.cmp_v);
    usize nk = (usize)pc.rows * p.dk, nv = (usize)pc.rows * p.dv;
    usize sk = row_at(p, pc.src, kvh, 0, p.dk), dk_ = row_at(p, pc.dst, kvh, 0, p.dk);
    usize sv = row_at(p, pc.src, kvh, 0, p.dv), dv_ = row_at(p, pc.dst, kvh, 0, p.dv);
    for (usize i = threadIdx.x; i < nk; i += blockDim.x) kpool[dk_ + i] = kpool[sk + i];
    for (usize i = threadIdx.x; i < nv; i += blockDim.x) vpool[dv_ + i] = vpool[sv + i];
}

// ---------------------------------------------------------------- append

template <class E>
__device__ void append(const Params& p) {
    typedef typename E::T T;
    const int* hdr = (const int*)p.hdr;
    int r = blockIdx.x, kvh = blockIdx.y;
    if (r >= hdr[1]) return;
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
// order as the CPU backend: rows j ascending, elements e ascending.
// Shared memory: row[D] | acc[D] | hidden[phi_hidden].

template <class E>
__device__ void compress(const Params& p) {
    typedef typename E::T T;
    extern __shared__ float smem[];
    const int* hdr = (const int*)p.hdr;
    int job = blockIdx.x, h = blockIdx.y, side = blockIdx.z;
    if (job >= hdr[3]) return;
    int2 jb = ((const int2*)p.jobs)[job];
    int si = jb.x, ci = jb.y;
    int D = side == 0 ? p.dk : p.dv;
    const T* raw = (const T*)(side == 0 ? p.raw_k : p.raw_v);
    T* cmp = (T*)(side == 0 ? p.cmp_k : p.cmp_v);
    const float* all = (const float*)(side == 0 ? p.phi_k : p.phi_v);
    const int* rtab = (const int*)p.raw_tab + (usize)si * p.pps;
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
    for (int c = threadIdx.x; c < D; c += blockDim.x) acc[c] = 0.f;
    if (p.phi == 3)
        for (int u = threadIdx.x; u < p.phi_hidden; u += blockDim.x) hidden[u] = b1[u];
    for (int j = 0; j < p.cl; j++) {
        int pos = ci * p.cd + j;
        int page = rtab[pos / p.page];
        const T* src = raw + row_at(p, page, h, pos % p.page, D);
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

template <class E>
__device__ void cmp_partial(const Params& p) {
    int wr = blockIdx.x, r = p.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int t = ((const int2*)p.tokmap)[r].y;
    int nc = num_cmp(p, t + 1);
    int lo = split * p.split_c;
    int hi = min(lo + p.split_c, nc);
    if (hi < lo) hi = lo;
    attend_group<E>(p, r, wr, kvh, lo, hi, true, split);
}

// Eq. 9 overlap count of offset k: pairs (a, b), a < A, b < B, a + b = k.
__device__ __forceinline__ float overlap_count(int k, int A, int B) {
    int lo = k - (B - 1);
    if (lo < 0) lo = 0;
    int hi = min(k, A - 1);
    return hi >= lo ? (float)(hi - lo + 1) : 0.f;
}

__device__ __forceinline__ bool better(float s1, int j1, float s2, int j2) {
    if (j1 < 0) return false;
    if (j2 < 0) return true;
    return s1 > s2 || (s1 == s2 && j1 < j2);
}

// Selection for one (row, KV head): 256 threads.
// Shared: blk[nb] | m[g] | inv[g] | pick[nsel] | red_s[32] | red_j[32].
template <class E>
__device__ void select_blocks(const Params& p) {
    extern __shared__ float smem[];
    int wr = blockIdx.x, r = p.row0 + wr, kvh = blockIdx.y;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    int t = ((const int2*)p.tokmap)[r].y;
    int nc = num_cmp(p, t + 1);
    float* blk = smem;
    float* mh = blk + p.nb;
    float* inv = mh + p.g;
    int* pick = (int*)(inv + p.g);
    float* red_s = (float*)(pick + p.nsel);
    int* red_j = (int*)(red_s + 32);
    const float* ml = (const float*)p.part_ml;
    // Combine the compressed splits' max and sum per head.
    for (int h = tid; h < p.g; h += blockDim.x) {
        int hg = kvh * p.g + h;
        float m = NEG_INF;
        for (int u = 0; u < p.nsplit_c; u++) m = fmaxf(m, ml[2 * part_at(p, wr, hg, u)]);
        float l = 0.f;
        if (m != NEG_INF)
            for (int u = 0; u < p.nsplit_c; u++) {
                usize at = part_at(p, wr, hg, u);
                if (ml[2 * at + 1] > 0.f) l += ml[2 * at + 1] * expf(ml[2 * at] - m);
            }
        mh[h] = m;
        inv[h] = l > 0.f ? 1.0f / l : 0.f;
    }
    __syncthreads();
    // Group-summed normalised probabilities of every visible compressed token.
    const float* lg = (const float*)p.logits + ((usize)wr * p.hq + (usize)kvh * p.g) * p.maxc;
    float* ps = (float*)p.psum + ((usize)wr * p.hkv + kvh) * p.maxc;
    for (int i = tid; i < nc; i += blockDim.x) {
        float a = 0.f;
        for (int h = 0; h < p.g; h++) a += expf(lg[(usize)h * p.maxc + i] - mh[h]) * inv[h];
        ps[i] = a;
    }
    __syncthreads();
    // Block scores (Eq. 9 overlap-centred), forced blocks +inf.
    int A = p.cl / p.cd, B = p.lsel / p.cd;
    int b = t / p.lsel;
    for (int j = tid; j <= b; j += blockDim.x) {
        int first = B * j - (A - 1);
        float acc = 0.f;
        for (int k = 0; k < A + B - 1; k++) {
            int i = first + k;
            if (i >= 0 && i < nc) acc += overlap_count(k, A, B) * ps[i];
        }
        if (j < p.n_init || j > b - p.n_local) acc = POS_INF;
        blk[j] = acc;
    }
    __syncthreads();
    // Top-n: repeated block-wide argmax, ties to the lower index; chosen blocks are
    // marked by NaN (never a real score).
    int count = min(p.nsel, b + 1);
    for (int k = 0; k < count; k++) {
        float bs = 0.f;
        int bj = -1;
        for (int j = tid; j <= b; j += blockDim.x) {
            float s = blk[j];
            if (s == s && better(s, j, bs, bj)) {
                bs = s;
                bj = j;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float os = __shfl_xor_sync(0xffffffffu, bs, o);
            int oj = __shfl_xor_sync(0xffffffffu, bj, o);
            if (better(os, oj, bs, bj)) {
                bs = os;
                bj = oj;
            }
        }
        if (lane == 0) {
            red_s[warp] = bs;
            red_j[warp] = bj;
        }
        __syncthreads();
        if (tid == 0) {
            float s0 = red_s[0];
            int j0 = red_j[0];
            for (int w = 1; w < nwarps; w++)
                if (better(red_s[w], red_j[w], s0, j0)) {
                    s0 = red_s[w];
                    j0 = red_j[w];
                }
            pick[k] = j0;
            blk[j0] = __int_as_float(0x7fc00000);
        }
        __syncthreads();
    }
    // Ascending order by rank, -1 padding; to the workspace and the caller's array.
    int* wsel = (int*)p.sel + ((usize)wr * p.hkv + kvh) * p.nsel;
    int* usel = p.selected ? (int*)p.selected + ((usize)r * p.hkv + kvh) * p.nsel : (int*)0;
    for (int k = tid; k < p.nsel; k += blockDim.x) {
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

// Gated combine for one (row, query head): 128 threads, a thread per output column.
// The per-unit merge factors exp(m_u - m_branch) are computed once in shared memory,
// then each column sums its units' accumulators (independent loads).
// Shared: m[U] | f[U] (l_u, then the factor) | gm[3] | gl[3].
template <class E>
__device__ void combine(const Params& p) {
    extern __shared__ float smem[];
    int wr = blockIdx.x, r = p.row0 + wr, hg = blockIdx.y, tid = threadIdx.x;
    int s0 = p.nsplit_c, s1 = s0 + p.units_s, U = s1 + p.units_w;
    float* mu = smem;
    float* fu = mu + U;
    float* gm = fu + U;
    float* gl = gm + 3;
    const float* ml = (const float*)p.part_ml;
    const float* pa = (const float*)p.part_acc;
    for (int u = tid; u < U; u += blockDim.x) {
        usize at = part_at(p, wr, hg, u);
        mu[u] = ml[2 * at];
        fu[u] = ml[2 * at + 1];
    }
    __syncthreads();
    if (tid < 3) {
        int u0 = tid == 0 ? 0 : (tid == 1 ? s0 : s1);
        int u1 = tid == 0 ? s0 : (tid == 1 ? s1 : U);
        float m = NEG_INF;
        for (int u = u0; u < u1; u++)
            if (fu[u] > 0.f) m = fmaxf(m, mu[u]);
        float l = 0.f;
        if (m != NEG_INF)
            for (int u = u0; u < u1; u++)
                if (fu[u] > 0.f) l += fu[u] * expf(mu[u] - m);
        gm[tid] = m;
        gl[tid] = l;
    }
    __syncthreads();
    for (int u = tid; u < U; u += blockDim.x) {
        int grp = u < s0 ? 0 : (u < s1 ? 1 : 2);
        fu[u] = (fu[u] > 0.f && gm[grp] != NEG_INF) ? expf(mu[u] - gm[grp]) : 0.f;
    }
    __syncthreads();
    const float* gt = (const float*)p.gates + ((usize)r * p.hq + hg) * 3;
    typename E::T* out = (typename E::T*)p.out;
    usize base = part_at(p, wr, hg, 0) * p.dv;
    for (int c = tid; c < p.dv; c += blockDim.x) {
        float a0 = 0.f, a1 = 0.f, a2 = 0.f;
        for (int u = 0; u < s0; u++)
            if (fu[u] != 0.f) a0 += pa[base + (usize)u * p.dv + c] * fu[u];
        for (int u = s0; u < s1; u++)
            if (fu[u] != 0.f) a1 += pa[base + (usize)u * p.dv + c] * fu[u];
        for (int u = s1; u < U; u++)
            if (fu[u] != 0.f) a2 += pa[base + (usize)u * p.dv + c] * fu[u];
        float o = 0.f;
        float ocmp = gl[0] > 0.f ? a0 * (1.0f / gl[0]) : 0.f;
        o = o + gt[0] * ocmp;
        if (gl[1] > 0.f) o = o + (gt[1] / gl[1]) * a1;
        if (gl[2] > 0.f) o = o + (gt[2] / gl[2]) * a2;
        E::st(out, ((usize)r * p.hq + hg) * p.dv + c, o);
    }
}

// ---------------------------------------------------------------- entry points

#define NSA_ENTRY(name, E, suffix) \
    extern "C" __global__ void __launch_bounds__(256) nsa_##name##_##suffix(const Params p) { name<E>(p); }

#define NSA_ALL(E, suffix)              \
    NSA_ENTRY(copy_pages, E, suffix)    \
    NSA_ENTRY(append, E, suffix)        \
    NSA_ENTRY(compress, E, suffix)      \
    NSA_ENTRY(cmp_partial, E, suffix)   \
    NSA_ENTRY(select_blocks, E, suffix) \
    NSA_ENTRY(sw_partial, E, suffix)    \
    NSA_ENTRY(combine, E, suffix)

NSA_ALL(EF32, f32)
NSA_ALL(EF16, f16)
NSA_ALL(EBF16, bf16)
