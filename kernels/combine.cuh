// Gated combine of the three branches' partials.
#ifndef NSA_COMBINE_CUH
#define NSA_COMBINE_CUH

#include "common.cuh"
#include "ptx.cuh"

// The gated sum of one (head, V columns) from its branch sums `a`, the branches' softmax
// sums `l3`, the gates `g3` and the factors `c3` (1 / l of the compressed branch, gate / l
// of the others: `branch_factor`), stored (`gated`: else the full-attention baseline,
// branch 0 alone, normalised). The CPU backend's order and rules: the compressed branch
// always contributes (a NaN gate propagates), the others only when they saw a key.
template <class E, int V>
__device__ __forceinline__ void gated_store(const Params& p, int r, int hg, int c, const float (&a)[3][V],
                                            const float* l3, const float* g3, const float* c3, bool gated) {
    typename E::T* out = (typename E::T*)p.io.out;
#pragma unroll
    for (int v = 0; v < V; v++) {
        const float ocmp = l3[0] != 0.f ? a[0][v] * c3[0] : 0.f;
        float o = 0.f;
        if (!gated) {
            o = ocmp;
        } else {
            o = o + g3[0] * ocmp;
            if (l3[1] != 0.f) o = o + c3[1] * a[1][v];
            if (l3[2] != 0.f) o = o + c3[2] * a[2][v];
        }
        E::st(out, ((usize)r * p.shape.num_q_heads + hg) * p.shape.head_dim_v + c + v, o);
    }
}
// The factor of branch `br` in `gated_store`, once per (head, branch) rather than a
// division per column: 1 / l for the compressed branch, gate / l for the others (0 where
// l = 0: the branch is then not added).
__device__ __forceinline__ float branch_factor(int br, float l, float gate) {
    return l == 0.f ? 0.f : br == 0 ? 1.0f / l : gate / l;
}

// Units a combine thread loads at once (one L2 round trip for all of them).
#define COMB_BATCH 8

// The gated combine of H consecutive query heads hg0.. of wave row wr (query row r):
// units [0, s0) are the compressed branch's, [s0, s1) the selected blocks', [s1, U) the
// window's (`gated` false: the full-attention baseline, every unit in branch 0, no gates).
//
// Shaped as one round trip and three barriers (docs/DECODE_NOTES.md, variants 35, 35b): at
// batch 1 the combine is a chain of dependent steps, not a stream of bytes. Threads are
// (part, head, group of V columns); a part takes units part, part + P, ... (at most
// COMB_BATCH per part where the threads allow it). Each thread issues the loads of its
// units' accumulators together with the block's loads of every unit's (m, l), before it
// knows which units count: every unit's partial is written (empty ranges store l = 0 and
// zeros), and a unit whose factor is 0 is never added, so an empty or vanished unit never
// turns a sum into NaN. Then a warp per (head, branch) merges the units' (m, l) online;
// each thread scales and sums its own units; the parts meet in shared memory.
// Shared: m[H][U] | l[H][U] | (m, l) per (head, branch) [H][3] x 2 | gates [H][3] |
// factors [H][3] | parts' sums [P][3][H * DV] (P * H * DV <= 4 * blockDim;
// src/cuda/build.rs sizes it).
template <class E, int V>
__device__ void combine_heads(const Params& p, int wr, int r, int hg0, int H, int s0, int s1, int U, bool gated) {
    extern __shared__ float smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const int DV = p.shape.head_dim_v, gpr = DV / V, NG = H * gpr;
    const int P = max(1, min((int)blockDim.x / NG, (U + COMB_BATCH - 1) / COMB_BATCH));
    float* mu = smem;
    float* lu = mu + H * U;
    float* gm = lu + H * U;
    float* gl = gm + 3 * H;
    float* g3 = gl + 3 * H;
    float* cf = g3 + 3 * H;
    float* red = cf + 3 * H;
    // The gates are the layer's inputs, not an earlier kernel's output: read before the wait.
    if (tid < 3 * H) g3[tid] = gated ? ((const float*)p.io.gates)[((usize)r * p.shape.num_q_heads + hg0) * 3 + tid] : 0.f;
    // Thread slot x: part x / NG, head and column group x % NG. A slot per thread when they
    // fit (then its loads are issued before the (m, l) merge); otherwise (one part) each
    // thread walks slots tid, tid + blockDim, ... after the merge.
    const bool early = P * NG <= (int)blockDim.x;
    float x[COMB_BATCH][V];
    auto load = [&](const float* col, int part, int b0) {  // the part's units b0.. of its own
#pragma unroll
        for (int k = 0; k < COMB_BATCH; k++) {
            const int u = part + (b0 + k) * P;
            if (u < U) {
                if (V == 4) {
                    const float4 y = *(const float4*)(col + (usize)u * DV);
                    x[k][0] = y.x;
                    x[k][1 % V] = y.y;
                    x[k][2 % V] = y.z;
                    x[k][3 % V] = y.w;
                } else {
                    x[k][0] = col[(usize)u * DV];
                }
            }
        }
    };
    // Unit u of head hh at column c: col + u * DV; its (m, l): ml[hh * U + u] (U is the
    // launch's units: `part_at`'s head stride).
    auto column = [&](int hh, int c) { return (const float*)p.ws.part_acc + part_at(p, wr, hg0 + hh, 0) * DV + c; };
    const int part0 = tid / NG, gi0 = tid - part0 * NG, hh0 = gi0 / gpr;
    pdl_wait_then_trigger(p);
    if (early && tid < P * NG) load(column(hh0, (gi0 - hh0 * gpr) * V), part0, 0);
    const float2* ml = (const float2*)p.ws.part_ml + part_at(p, wr, hg0, 0);
    for (int i = tid; i < H * U; i += blockDim.x) {
        const float2 v = ml[i];
        mu[i] = v.x;
        lu[i] = v.y;
    }
    __syncthreads();
    tl_mark<0>();  // the timeline: the units' (m, l) are in (their accumulators in flight)
    // MODE_WIN_LOCAL (kernels/ptx.cuh): unit s1, the window's first, is the selected branch's too.
    const bool wl = gated && (p.launch.mode & MODE_WIN_LOCAL) != 0 && s1 < U;
    // Each (head, branch): its units' (m, l) merged, each lane its own units, then the lanes.
    for (int task = warp; task < 3 * H; task += nw) {
        const int h = task / 3, br = task - 3 * h;
        const int u0 = br == 0 ? 0 : br == 1 ? s0 : s1, u1 = br == 0 ? s0 : br == 1 ? s1 + wl : U;
        float m = NEG_INF, l = 0.f;
        for (int u = u0 + lane; u < u1; u += 32)
            if (lu[h * U + u] != 0.f) ml_merge(m, l, mu[h * U + u], lu[h * U + u]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float mo = __shfl_xor_sync(0xffffffffu, m, o), lo = __shfl_xor_sync(0xffffffffu, l, o);
            ml_merge(m, l, mo, lo);
        }
        if (lane == 0) {
            gm[task] = m;
            gl[task] = l;
            cf[task] = branch_factor(br, l, g3[task]);
        }
    }
    __syncthreads();
    tl_mark<1>();  // the branches' (m, l) merged: the sums begin
    // Slot xs's units, each scaled to its branch's max and summed per branch; stored when
    // the block has one part, else left in `red` for the parts' meeting.
    auto slot = [&](int xs, bool loaded) {
        const int part = xs / NG, gi = xs - part * NG, hh = gi / gpr, c = (gi - hh * gpr) * V;
        const float* col = column(hh, c);
        if (!loaded) load(col, part, 0);
        tl_mark_after<2>(x[0][0]);  // the timeline: thread 0's first accumulator arrived
        float a[3][V];
#pragma unroll
        for (int br = 0; br < 3; br++)
#pragma unroll
            for (int v = 0; v < V; v++) a[br][v] = 0.f;
        const float M0 = gm[3 * hh], M1 = gm[3 * hh + 1], M2 = gm[3 * hh + 2];
        for (int b0 = 0;;) {
#pragma unroll
            for (int k = 0; k < COMB_BATCH; k++) {
                // Branch-free: the factor, then the product added under the unit's branch
                // predicate (a product whose factor is 0 is added nowhere).
                const int u = part + (b0 + k) * P;
                const int br = u < s0 ? 0 : u < s1 ? 1 : 2;
                const float M = br == 0 ? M0 : br == 1 ? M1 : M2;
                const float lv = u < U ? lu[hh * U + u] : 0.f;
                const float f = lv != 0.f && M != NEG_INF ? fexp(mu[hh * U + u] - M) : 0.f;
                const bool p0 = f != 0.f && br == 0, p1 = f != 0.f && br == 1, p2 = f != 0.f && br == 2;
                // The shared unit, also to the selected branch at that branch's max.
                const float fs = wl && u == s1 && lv != 0.f && M1 != NEG_INF ? fexp(mu[hh * U + u] - M1) : 0.f;
#pragma unroll
                for (int v = 0; v < V; v++) {
                    const float t = f * x[k][v];
                    if (p0) a[0][v] += t;
                    if (p1) a[1][v] += t;
                    if (p2) a[2][v] += t;
                    if (fs != 0.f) a[1][v] += fs * x[k][v];
                }
            }
            b0 += COMB_BATCH;
            if (part + b0 * P >= U) break;
            load(col, part, b0);
        }
        if (P == 1) {
            gated_store<E, V>(p, r, hg0 + hh, c, a, gl + 3 * hh, g3 + 3 * hh, cf + 3 * hh, gated);
        } else {
#pragma unroll
            for (int br = 0; br < 3; br++)
#pragma unroll
                for (int v = 0; v < V; v++) red[(part * 3 + br) * NG * V + gi * V + v] = a[br][v];
        }
    };
    if (early) {
        if (tid < P * NG) slot(tid, true);
    } else {
        for (int xs = tid; xs < NG; xs += blockDim.x) slot(xs, false);  // P = 1 here
    }
    tl_mark<3>();  // thread 0's slot summed: the parts' meeting begins
    if (P == 1) return;
    const int E3 = 3 * NG * V;  // entries (branch, head, column) of a part
    __syncthreads();
    tl_mark<4>();  // every part summed
    // A thread per (head, column): the parts' sums of its three branches, gated.
    for (int e = tid; e < NG * V; e += blockDim.x) {
        float s[3][1] = {{0.f}, {0.f}, {0.f}};
        for (int q = 0; q < P; q++)
#pragma unroll
            for (int br = 0; br < 3; br++) s[br][0] += red[q * E3 + br * NG * V + e];
        const int h = e / DV;
        gated_store<E, 1>(p, r, hg0 + h, e - h * DV, s, gl + 3 * h, g3 + 3 * h, cf + 3 * h, gated);
    }
}

// Gated combine of `p.launch.comb_heads` consecutive query heads of one row per block (the
// host picks more heads per block when rows are many, so blocks stay few and long, and one
// head per block at batch 1, so the work spreads over SMs), V columns per load. Two entries,
// `combine` (V = 4, where DV allows) and `combine_scalar` (a column per thread), which the
// host picks (src/cuda/launch.rs `comb_vec_fits`): one width per kernel, so a
// multiprocessor fetches only the code it runs, cold at every step (a kernel holding both
// took 1.7 us longer at batch 1: docs/DECODE_NOTES.md, variant 57).
template <class E, int V>
__device__ void combine_v(const Params& p) {
    const int wr = blockIdx.x, r = p.launch.row0 + wr, H = p.launch.comb_heads;
    const int s0 = p.launch.nsplit_c, s1 = s0 + p.launch.units_s, U = s1 + p.launch.units_w;
    combine_heads<E, V>(p, wr, r, blockIdx.y * H, H, s0, s1, U, true);
}
template <class E>
__device__ void combine(const Params& p) {
    combine_v<E, 4>(p);
}
template <class E>
__device__ void combine_scalar(const Params& p) {
    combine_v<E, 1>(p);
}

#endif  // NSA_COMBINE_CUH
