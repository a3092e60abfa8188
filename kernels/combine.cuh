// Gated combine of the three branches' partials.
#ifndef NSA_COMBINE_CUH
#define NSA_COMBINE_CUH

#include "common.cuh"

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

// Branch sums of one (head, group of V columns) over one part's units (bounds: the
// branches' unit ranges [x, y), [y, z), [z, w), each split into P parts): the part's
// units of all three branches are walked as one list, 8 at a time, every load of a batch
// issued before its sums (batch 1 has ~12 units per part: two latency rounds). Units
// whose factor is 0 are skipped, so an empty or vanished unit never turns a sum into NaN.
// `f` is the head's factors, `col` its unit-0 row at column c.
template <int V>
__device__ __forceinline__ void unit_sums(const float* col, int DV, const float* f, int4 bounds, int part, int P,
                                          float (&a)[3][V]) {
    const int n0 = bounds.y - bounds.x, n1 = bounds.z - bounds.y, n2 = bounds.w - bounds.z;
    const int lo0 = bounds.x + n0 * part / P, hi0 = bounds.x + n0 * (part + 1) / P;
    const int lo1 = bounds.y + n1 * part / P, hi1 = bounds.y + n1 * (part + 1) / P;
    const int lo2 = bounds.z + n2 * part / P, hi2 = bounds.z + n2 * (part + 1) / P;
    const int c0 = hi0 - lo0, c01 = c0 + hi1 - lo1, n = c01 + hi2 - lo2;
#pragma unroll
    for (int br = 0; br < 3; br++)
#pragma unroll
        for (int v = 0; v < V; v++) a[br][v] = 0.f;
    for (int i0 = 0; i0 < n; i0 += 8) {
        float x[8][V], fk[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int i = i0 + k;
            const int u = i < c0 ? lo0 + i : (i < c01 ? lo1 + i - c0 : lo2 + i - c01);
            fk[k] = i < n ? f[u] : 0.f;
            if (fk[k] != 0.f) {
                if (V == 4) {
                    float4 y = *(const float4*)(col + (usize)u * DV);
                    x[k][0] = y.x;
                    x[k][1 % V] = y.y;
                    x[k][2 % V] = y.z;
                    x[k][3 % V] = y.w;
                } else {
                    x[k][0] = col[(usize)u * DV];
                }
            } else {
#pragma unroll
                for (int v = 0; v < V; v++) x[k][v] = 0.f;
            }
        }
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if (fk[k] == 0.f) continue;
            const int i = i0 + k;
#pragma unroll
            for (int v = 0; v < V; v++) {
                if (i < c0)
                    a[0][v] += fk[k] * x[k][v];
                else if (i < c01)
                    a[1][v] += fk[k] * x[k][v];
                else
                    a[2][v] += fk[k] * x[k][v];
            }
        }
    }
}

// The gated sum of one (head, V columns): the branch sums over the softmax sums, times
// the gates, stored.
template <class E, int V>
__device__ __forceinline__ void gated_store(const Params& p, int r, int hg, int c, const float (&a)[3][V], const float* g3) {
    const float* gt = (const float*)p.io.gates + ((usize)r * p.shape.num_q_heads + hg) * 3;
    typename E::T* out = (typename E::T*)p.io.out;
#pragma unroll
    for (int v = 0; v < V; v++) {
        // The CPU backend's order and rules: the compressed branch always contributes (a
        // NaN gate propagates), the others only when they saw a key.
        float o = 0.f;
        float ocmp = g3[0] != 0.f ? a[0][v] * (1.0f / g3[0]) : 0.f;
        o = o + gt[0] * ocmp;
        if (g3[1] != 0.f) o = o + (gt[1] / g3[1]) * a[1][v];
        if (g3[2] != 0.f) o = o + (gt[2] / g3[2]) * a[2][v];
        E::st(out, ((usize)r * p.shape.num_q_heads + hg) * p.shape.head_dim_v + c + v, o);
    }
}

// The sums of `combine`: (head, group of V columns) pairs over the threads, each pair's
// units split into P parts when there are threads to spare (independent load streams per
// column). The parts' sums meet in shared memory (`red`, [P][3][NG * V]): every thread
// adds the parts of some (branch, column) entries, then every thread gates some columns.
template <class E, int V>
__device__ void combine_sums(const Params& p, int wr, int r, int hg0, int H, int U, int4 bounds, const float* fu,
                             const float* gl, float* red) {
    const int DV = p.shape.head_dim_v, gpr = DV / V, NG = H * gpr;
    // Parts only while each keeps 8 units or more (fewer make the shared-memory meeting
    // cost more than the loads it spreads: batch 16 measured slower with 4 parts of ~3).
    const int P = max(1, min((int)blockDim.x / NG, U / 8));
    const float* pa = (const float*)p.ws.part_acc;
    for (int x = threadIdx.x; x < P * NG; x += blockDim.x) {
        const int part = x / NG, gi = x - part * NG, hh = gi / gpr, c = (gi - hh * gpr) * V;
        float a[3][V];
        unit_sums<V>(pa + part_at(p, wr, hg0 + hh, 0) * DV + c, DV, fu + hh * U, bounds, part, P, a);
        if (P == 1) {
            gated_store<E, V>(p, r, hg0 + hh, c, a, gl + hh * 3);
        } else {
#pragma unroll
            for (int br = 0; br < 3; br++)
#pragma unroll
                for (int v = 0; v < V; v++) red[(part * 3 + br) * NG * V + gi * V + v] = a[br][v];
        }
    }
    if (P == 1) return;
    __syncthreads();
    const int E3 = 3 * NG * V;  // entries (branch, head, column)
    for (int e = threadIdx.x; e < E3; e += blockDim.x) {
        float x = red[e];
        for (int part = 1; part < P; part++) x += red[part * E3 + e];
        red[e] = x;  // each entry is read and written by its own thread only
    }
    __syncthreads();
    for (int e = threadIdx.x; e < NG * V; e += blockDim.x) {
        const int hh = e / DV, c = e - hh * DV;
        float a[3][1] = {{red[e]}, {red[NG * V + e]}, {red[2 * NG * V + e]}};
        gated_store<E, 1>(p, r, hg0 + hh, c, a, gl + hh * 3);
    }
}

// Gated combine of `p.launch.comb_heads` consecutive query heads of one row per block (the host
// picks more heads per block when rows are many, so blocks stay few and long, and one
// head per block at batch 1, so the work spreads over SMs). Per head: each branch's
// (max, sum) over its units (a warp per (head, branch)), the per-unit merge factors
// exp(m_u - m_branch) in shared memory, then the branch sums of the units' accumulators
// (`combine_sums`, 4 columns per load when DV allows).
// Shared: m[H][U] | f[H][U] (l_u, then the factor) | gm[H][3] | gl[H][3] | red[P][3][H * DV]
// (P * H * DV <= 4 * blockDim).
template <class E>
__device__ void combine(const Params& p) {
    extern __shared__ float smem[];
    const int wr = blockIdx.x, r = p.launch.row0 + wr, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int H = p.launch.comb_heads, hg0 = blockIdx.y * H;
    const int s0 = p.launch.nsplit_c, s1 = s0 + p.launch.units_s, U = s1 + p.launch.units_w;
    float* mu = smem;
    float* fu = mu + H * U;
    float* gm = fu + H * U;
    float* gl = gm + 3 * H;
    float* red = gl + 3 * H;
    const float* ml = (const float*)p.ws.part_ml;
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
    const int4 bounds = make_int4(0, s0, s1, U);  // the branches' units: [x, y), [y, z), [z, w)
    // 4 columns per load when the block's columns are fewer than its threads (one head
    // per block at small batch), else a column per thread keeps every thread busy; with
    // `mode & 128` 4 columns per load always (fewer instructions per column).
    if (p.shape.head_dim_v % 4 == 0 && (H * p.shape.head_dim_v < (int)blockDim.x || (p.launch.mode & 128)))
        combine_sums<E, 4>(p, wr, r, hg0, H, U, bounds, fu, gl, red);
    else
        combine_sums<E, 1>(p, wr, r, hg0, H, U, bounds, fu, gl, red);
}

// Full attention: merge the splits of one (row, query head), normalise, store.

#endif  // NSA_COMBINE_CUH
