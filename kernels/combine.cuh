// Gated combine of the three branches' partials.
#ifndef NSA_COMBINE_CUH
#define NSA_COMBINE_CUH

#include "common.cuh"

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
// Any other l, NaN included, is merged: a NaN score or value propagates, never to zeros
// (fmaxf skips NaN, so a state whose scores were all NaN has m = -inf and l = NaN).
__device__ __forceinline__ float2 merge_ml(const float* mu, const float* lu, int u0, int u1, int lane) {
    float m = NEG_INF;
    for (int u = u0 + lane; u < u1; u += 32)
        if (lu[u] != 0.f) m = fmaxf(m, mu[u]);
    m = warp_max(m);
    float l = 0.f;
    for (int u = u0 + lane; u < u1; u += 32)
        if (lu[u] != 0.f) l += m != NEG_INF ? lu[u] * expf(mu[u] - m) : lu[u];
    return make_float2(m, warp_sum(l));
}

// Gated combine of `p.launch.comb_heads` consecutive query heads of one row per block (the host
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
    const int wr = blockIdx.x, r = p.launch.row0 + wr, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int H = p.launch.comb_heads, hg0 = blockIdx.y * H;
    const int s0 = p.launch.nsplit_c, s1 = s0 + p.launch.units_s, U = s1 + p.launch.units_w;
    const int DV = p.shape.head_dim_v, P = H == 1 ? max(1, (int)blockDim.x / DV) : 1;
    float* mu = smem;
    float* fu = mu + H * U;
    float* gm = fu + H * U;
    float* gl = gm + 3 * H;
    float* red = gl + 3 * H;
    const float* ml = (const float*)p.ws.part_ml;
    const float* pa = (const float*)p.ws.part_acc;
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
        fu[x] = (fu[x] != 0.f && gm[grp] != NEG_INF) ? expf(mu[x] - gm[grp]) : 0.f;
    }
    __syncthreads();
    typename E::T* out = (typename E::T*)p.io.out;
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
        const float* gt = (const float*)p.io.gates + ((usize)r * p.shape.num_q_heads + hg) * 3;
        const float* g3 = gl + hh * 3;
        float o = 0.f;
        float ocmp = g3[0] != 0.f ? a[0] * (1.0f / g3[0]) : 0.f;
        o = o + gt[0] * ocmp;
        if (g3[1] != 0.f) o = o + (gt[1] / g3[1]) * a[1];
        if (g3[2] != 0.f) o = o + (gt[2] / g3[2]) * a[2];
        E::st(out, ((usize)r * p.shape.num_q_heads + hg) * DV + c, o);
    }
}

// Full attention: merge the splits of one (row, query head), normalise, store.

#endif  // NSA_COMBINE_CUH
