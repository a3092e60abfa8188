// Scalar attention core (f32 and shapes the tensor-core path does not take).
#ifndef NSA_ATTEND_CUH
#define NSA_ATTEND_CUH

#include "common.cuh"

// ---------------------------------------------------------------- attention core
// Online softmax of `hcn` heads (pre-scaled f32 queries in q_s, [hcn][DK]) over keys at
// positions [lo, hi) of a paged pool pair. 128 threads. Per tile of NSA_TK keys: each warp
// loads whole K rows into registers and scores them against every head (one K load for
// the group), the V tile is staged in shared memory, then a warp per head updates the
// running max/sum and the block updates the accumulators. With `logit_out` the raw
// (scaled) logits are stored too: logit_out[h * max_cmp + position].
// Shared: q_s[hc*DK] | s_t[hc*NSA_TK] | v_t[NSA_TK*DV] | acc[hc*DV] | m[hc] | l[hc] | corr[hc].

// `attend_keys`' state before the first key: acc = 0, m = -inf, l = 0 (then a barrier).
__device__ __forceinline__ void attend_reset(int hcn, int DV, float* acc, float* m_s, float* l_s) {
    for (int e = threadIdx.x; e < hcn * DV; e += NSA_NT_ATT) acc[e] = 0.f;
    for (int h = threadIdx.x; h < hcn; h += NSA_NT_ATT) {
        m_s[h] = NEG_INF;
        l_s[h] = 0.f;
    }
    __syncthreads();
}

// The online softmax's update over keys [lo, hi), continuing the state in acc, m_s, l_s
// (`attend` from a reset state; the prefill's repair over several ranges of one branch).
template <class E>
__device__ void attend_keys(const Params& p, const typename E::T* kpool, const typename E::T* vpool,
                            const int* table, int kvh, int lo, int hi, int hcn, const float* q_s, float* s_t,
                            float* v_t, float* acc, float* m_s, float* l_s, float* corr, float* logit_out) {
    const int DK = p.shape.head_dim_qk, DV = p.shape.head_dim_v;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = NSA_NT_ATT / 32;
    for (int base = lo; base < hi; base += NSA_TK) {
        int n = min(NSA_TK, hi - base);
        // Stage the V tile (f32).
        for (int e = tid; e < n * DV; e += NSA_NT_ATT) {
            int j = e / DV, c = e - j * DV;
            int pos = base + j;
            int page = table[pos / p.paging.page_size];
            v_t[j * DV + c] = E::ld(vpool, row_at(p, page, kvh, pos % p.paging.page_size, DV) + c);
        }
        // Scores: warp w takes keys w, w+4, ...; the K row lives in registers.
        for (int j = warp; j < NSA_TK; j += nw) {
            if (j >= n) {
                for (int h = lane; h < hcn; h += 32) s_t[h * NSA_TK + j] = NEG_INF;
                continue;
            }
            int pos = base + j;
            int page = table[pos / p.paging.page_size];
            usize at = row_at(p, page, kvh, pos % p.paging.page_size, DK);
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
                if (lane == 0) s_t[h * NSA_TK + j] = s;
            }
        }
        __syncthreads();
        // Online softmax update: a warp per head, a lane per key.
        for (int h = warp; h < hcn; h += nw) {
            float s = s_t[h * NSA_TK + lane];
            if (logit_out && lane < n) logit_out[(usize)h * p.ws.max_cmp + base + lane] = s;
            float tmax = warp_max(s);
            float m_old = m_s[h];
            float m_new = fmaxf(m_old, tmax);
            float pj = lane < n ? expf(s - m_new) : 0.f;
            s_t[h * NSA_TK + lane] = pj;
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
        for (int e = tid; e < hcn * DV; e += NSA_NT_ATT) {
            int h = e / DV, c = e - h * DV;
            float a = acc[e] * corr[h];
            const float* ph = s_t + h * NSA_TK;
            for (int j = 0; j < n; j++) a += ph[j] * v_t[j * DV + c];
            acc[e] = a;
        }
        __syncthreads();
    }
}

template <class E>
__device__ void attend(const Params& p, const typename E::T* kpool, const typename E::T* vpool,
                       const int* table, int kvh, int lo, int hi, int hcn, const float* q_s, float* s_t,
                       float* v_t, float* acc, float* m_s, float* l_s, float* corr, float* logit_out) {
    attend_reset(hcn, p.shape.head_dim_v, acc, m_s, l_s);
    attend_keys<E>(p, kpool, vpool, table, kvh, lo, hi, hcn, q_s, s_t, v_t, acc, m_s, l_s, corr, logit_out);
}

// Loads the scaled queries of heads h0..h0+hcn of KV head kvh, row r.
template <class E>
__device__ void load_q(const Params& p, int r, int kvh, int h0, int hcn, float* q_s) {
    const typename E::T* q = (const typename E::T*)p.io.q;
    usize base = ((usize)r * p.shape.num_q_heads + (usize)kvh * p.shape.group_size + h0) * p.shape.head_dim_qk;
    for (int e = threadIdx.x; e < hcn * p.shape.head_dim_qk; e += blockDim.x) q_s[e] = E::ld(q, base + e) * p.shape.scale;
}

__device__ __forceinline__ void store_partial(const Params& p, int wr, int hglob0, int hcn, int u,
                                              const float* acc, const float* m_s, const float* l_s) {
    float* ml = (float*)p.ws.part_ml;
    float* pa = (float*)p.ws.part_acc;
    for (int h = threadIdx.x; h < hcn; h += blockDim.x) {
        usize at = part_at(p, wr, hglob0 + h, u);
        ml[2 * at] = m_s[h];
        ml[2 * at + 1] = l_s[h];
    }
    for (int e = threadIdx.x; e < hcn * p.shape.head_dim_v; e += blockDim.x) {
        int h = e / p.shape.head_dim_v, c = e - h * p.shape.head_dim_v;
        pa[part_at(p, wr, hglob0 + h, u) * p.shape.head_dim_v + c] = acc[e];
    }
}

// Runs `attend` over [lo, hi) for every head chunk of the group and stores the partials
// of unit u (empty ranges store m = -inf, l = 0, acc = 0).
template <class E>
__device__ void attend_group(const Params& p, int r, int wr, int kvh, int lo, int hi, bool cmp, int u) {
    extern __shared__ float smem[];
    int hc = p.launch.head_chunk;
    float* q_s = smem;
    float* s_t = q_s + hc * p.shape.head_dim_qk;
    float* v_t = s_t + hc * NSA_TK;
    float* acc = v_t + NSA_TK * p.shape.head_dim_v;
    float* m_s = acc + hc * p.shape.head_dim_v;
    float* l_s = m_s + hc;
    float* corr = l_s + hc;
    typedef typename E::T T;
    int si = ((const int2*)p.step.rows)[r].x;
    const int* table = cmp ? (const int*)p.paging.cmp_tab + (usize)si * p.paging.cmp_pages_per_seq : (const int*)p.paging.raw_tab + (usize)si * p.paging.pages_per_seq;
    const T* kpool = (const T*)(cmp ? p.paging.cmp_k : p.paging.raw_k);
    const T* vpool = (const T*)(cmp ? p.paging.cmp_v : p.paging.raw_v);
    for (int h0 = 0; h0 < p.shape.group_size; h0 += hc) {
        int hcn = min(hc, p.shape.group_size - h0);
        int hglob0 = kvh * p.shape.group_size + h0;
        load_q<E>(p, r, kvh, h0, hcn, q_s);
        __syncthreads();
        float* lo_out = cmp ? (float*)p.ws.logits + ((usize)wr * p.shape.num_q_heads + hglob0) * p.ws.max_cmp : (float*)0;
        attend<E>(p, kpool, vpool, table, kvh, lo, hi, hcn, q_s, s_t, v_t, acc, m_s, l_s, corr, lo_out);
        store_partial(p, wr, hglob0, hcn, u, acc, m_s, l_s);
        __syncthreads();
    }
}

#endif  // NSA_ATTEND_CUH
