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


// Shared: m[U] | f[U] | gm | gl.
template <class E>
__device__ void full_combine(const Params& p) {
    extern __shared__ float smem[];
    int wr = blockIdx.x, r = p.launch.row0 + wr, hg = blockIdx.y, tid = threadIdx.x;
    int U = p.launch.nsplit_c;
    float* mu = smem;
    float* fu = mu + U;
    float* gm = fu + U;
    const float* ml = (const float*)p.ws.part_ml;
    const float* pa = (const float*)p.ws.part_acc;
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
    for (int u = tid; u < U; u += blockDim.x) fu[u] = (fu[u] != 0.f && gm[0] != NEG_INF) ? expf(mu[u] - gm[0]) : 0.f;
    __syncthreads();
    float inv = gm[1] != 0.f ? 1.0f / gm[1] : 0.f;
    typename E::T* out = (typename E::T*)p.io.out;
    usize base = part_at(p, wr, hg, 0) * p.shape.head_dim_v;
    const int4 one_branch = make_int4(0, U, U, U);
    for (int c = tid; c < p.shape.head_dim_v; c += blockDim.x) {
        float a[3][1];
        unit_sums<1>(pa + base + c, p.shape.head_dim_v, fu, one_branch, 0, 1, a);
        E::st(out, ((usize)r * p.shape.num_q_heads + hg) * p.shape.head_dim_v + c, a[0][0] * inv);
    }
}


// Full causal attention, tensor cores: split `blockIdx.z` of [0, t].
template <class E, int NVT, int DKT, int DVT>
__device__ void full_mma(const Params& p) {
    int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, split = blockIdx.z;
    int2 tm = ((const int2*)p.step.rows)[r];
    int lo, hi;
    split_range(tm.y + 1, p.launch.nsplit_c, split, lo, hi);
    Keys ks = {0, lo, hi - lo, tm.y, 0};
    const int* table = (const int*)p.paging.raw_tab + (usize)tm.x * p.paging.pages_per_seq;
    for (int h0 = 0; h0 < p.shape.group_size; h0 += 16) {
        int hcn = min(16, p.shape.group_size - h0), hg0 = kvh * p.shape.group_size + h0;
        const u16* q = (const u16*)p.io.q + ((usize)r * p.shape.num_q_heads + hg0) * p.shape.head_dim_qk;
        attend_mma<E, NVT, DKT, DVT>(p, (const u16*)p.paging.raw_k, (const u16*)p.paging.raw_v, p.paging.tmaps, p.paging.tmaps + NSA_TMAP_BYTES, table, kvh, ks,
                           hcn, q, wr, hg0, split,
                           (float*)0);
    }
}

#endif  // NSA_FULL_CUH
