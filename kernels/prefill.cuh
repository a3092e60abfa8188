// Prefill attention: NSA over tiles of consecutive query positions of one sequence, on
// tensor cores (bf16/f16 storage, f32 accumulation).
//
// Why a path of its own: a decode row shares no K/V load with its neighbours, but in a
// prefill chunk consecutive positions read almost the same keys (the same compressed
// tokens, mostly the same selected blocks, overlapping windows). So a thread block takes
// a tile of query rows = (consecutive positions x the group's heads) of one KV head as the
// matrix M dimension (16 rows per warp, PW = 16 / G positions per warp) and every K/V tile
// it loads into shared memory serves all of them.
//
// Two launches per layer, grid (tiles, HKV), after the step's append launch (a tile is
// up to `warps * 16 / G` consecutive positions of one sequence of the step; the host counts
// the tiles per sequence, the kernels find theirs in the uploaded plan):
//   pf_cmp   compressed branch in two passes over the visible compressed tokens: pass 1
//            keeps each row's running max and sum (log-sum-exp); pass 2 recomputes the
//            logits, turns them into normalised probabilities p, accumulates P.V (so the
//            output needs no rescaling) and sums p over each position's group heads into
//            that position's selection-block scores (Eq. 9 mapping) in shared memory. No
//            logit is written to memory. Then a top-n per position (a warp radix select), with
//            the forced blocks, writes the selection (ascending, -1 padded) and the gated
//            compressed output g_cmp * o_cmp to `out`.
//   pf_sw    selected blocks and sliding window. By default each warp walks only the
//            blocks its own positions chose (`pf_sel_warp`: per-warp copy stages,
//            mma.sync); with `launch.mode & 4` clear the union of the tile's positions'
//            blocks is loaded block-wide, a warp computing on a block only where one of its
//            positions chose it. Then the window as a banded causal attention over the
//            tile's key range. The gated combine is fused: out = out (compressed part) +
//            g_slc * o_slc + g_win * o_win.
//
// Key tiles are NSA_PF_KEYS = 64 keys, one contiguous run of rows of one page (the host
// requires page_size and sel_block to be multiples of it). Rows of a tile past the last
// visible key are zero-filled by the copy, so stale pool rows never meet a zero
// probability (0 * NaN); `pf_cmp_ws`'s tensor-map tiles are not, and its non-finite scans
// cover those rows (kernels/prefill_nonfinite.cuh).
//
// The matrix products come from an MMA policy: `MmaSync` (mma.sync m16n8k16, any sm_80+;
// each warp of 16 rows keeps Q in registers and reads K/V fragments with ldmatrix from
// padded tiles) or `Wgmma` (sm_90a; each warpgroup of 64 rows multiplies Q and K/V straight
// from 128-byte swizzled tiles in shared memory, so the tiles are not re-read through
// registers by every warp). Both hand S and O back in the m16n8k16 accumulator layout per
// warp (warp w owns rows 16w..16w+15 of the block), so everything else is shared. The
// unit of rows that multiply together (16 or 64) is what may skip a tile.

#ifndef NSA_PREFILL_CUH
#define NSA_PREFILL_CUH

#include "prefill_parts.cuh"
#include "prefill_nonfinite.cuh"
#include "prefill_repair.cuh"

// ---------------------------------------------------------------- pf_cmp's parts
// Shared by `pf_cmp` (block-wide stages) and `pf_cmp_ws` (a producer warp and mbarriers):
// what a consumer warp does with one 64-key tile in each pass, and the epilogue.

// The lane's two rows (A = row g, B = row g + 8 of its warp's 16): their positions in the
// tile and how many compressed tokens each sees.
struct PfCmpRows {
    int poA, poB, ncA, ncB;
};
__device__ __forceinline__ PfCmpRows pf_cmp_rows(const Params& p, const PrefillTile& tl, int warp, int g) {
    const int G = p.shape.group_size;
    PfCmpRows r;
    r.poA = (warp * 16 + g) / G;
    r.poB = (warp * 16 + g + 8) / G;
    r.ncA = r.poA < tl.npos ? num_cmp(p, tl.pos0 + r.poA + 1) : 0;
    r.ncB = r.poB < tl.npos ? num_cmp(p, tl.pos0 + r.poB + 1) : 0;
    return r;
}

// Pass 1, one tile of raw logits s for keys k0..k0 + 63 (keys past a row's count
// masked): the running max (raw) and sum of the row's probabilities over the lane's own
// columns, with no shuffle per tile (the four lanes of a row meet once, in
// `pf_lse_final`). `s` is only read: the next tile's products may be in flight into the
// other accumulator set, and a write to an accumulator register (even this one's) makes
// ptxas serialise every product of the kernel.
template <bool MASK>
__device__ __forceinline__ void pf_lse_tile_body(const float (&s)[8][4], int k0, const PfCmpRows& r, float sl2,
                                                 float& mA, float& mB, float& lA, float& lB) {
    const int q4 = threadIdx.x & 3;
    auto at = [&](int n, int e) {  // e < 2: row A, else row B
        const int i = k0 + n * 8 + q4 * 2 + (e & 1);
        return MASK && i >= (e < 2 ? r.ncA : r.ncB) ? NEG_INF : s[n][e];
    };
    float xA = NEG_INF, xB = NEG_INF;
#pragma unroll
    for (int n = 0; n < 8; n++) {
        xA = fmaxf(xA, fmaxf(at(n, 0), at(n, 1)));
        xB = fmaxf(xB, fmaxf(at(n, 2), at(n, 3)));
    }
    const float nA = fmaxf(mA, xA), nB = fmaxf(mB, xB);
    const float uA = nA == NEG_INF ? 0.f : nA * sl2, uB = nB == NEG_INF ? 0.f : nB * sl2;
    // Two chains per row (even and odd columns) for the adds' latency.
    float sA0 = 0.f, sA1 = 0.f, sB0 = 0.f, sB1 = 0.f;
#pragma unroll
    for (int n = 0; n < 8; n++) {
        sA0 += ex2f(fmaf(at(n, 0), sl2, -uA));
        sA1 += ex2f(fmaf(at(n, 1), sl2, -uA));
        sB0 += ex2f(fmaf(at(n, 2), sl2, -uB));
        sB1 += ex2f(fmaf(at(n, 3), sl2, -uB));
    }
    lA = lA * ex2f(fmaf(mA, sl2, -uA)) + (sA0 + sA1);
    lB = lB * ex2f(fmaf(mB, sl2, -uB)) + (sB0 + sB1);
    mA = nA;
    mB = nB;
}
__device__ __forceinline__ void pf_lse_tile(const float (&s)[8][4], int k0, const PfCmpRows& r, float sl2, float& mA,
                                            float& mB, float& lA, float& lB) {
    if (k0 + PF_KT > min(r.ncA, r.ncB))  // masks only where a row's keys end
        pf_lse_tile_body<true>(s, k0, r, sl2, mA, mB, lA, lB);
    else
        pf_lse_tile_body<false>(s, k0, r, sl2, mA, mB, lA, lB);
}

// After pass 1: the four lanes of each row merge their (max, sum) into the row's
// log2-sum-exp2 of the scaled logits; +inf for a row with no visible key makes every p
// exactly 0.
__device__ __forceinline__ void pf_lse_merge(float m, float l, float sl2, float& lse) {
    float x = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    // A lane with no visible key has (m, l) = (-inf, 0): its term is 0.
    l = x == NEG_INF ? 0.f : l * ex2f((m - x) * sl2);
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    lse = l != 0.f ? x * sl2 + __log2f(l) : POS_INF;
}
__device__ __forceinline__ void pf_lse_final(float mA, float mB, float lA, float lB, float sl2, float& lseA,
                                             float& lseB) {
    pf_lse_merge(mA, lA, sl2, lseA);
    pf_lse_merge(mB, lB, sl2, lseB);
}

// Pass 2, one tile: the normalised probabilities of the logits s (masked keys 0).
__device__ __forceinline__ void pf_prob_tile(float (&s)[8][4], int k0, const PfCmpRows& r, float sl2, float lseA,
                                             float lseB) {
    const int q4 = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < 8; n++) {
        s[n][0] = ex2f(fmaf(s[n][0], sl2, -lseA));
        s[n][1] = ex2f(fmaf(s[n][1], sl2, -lseA));
        s[n][2] = ex2f(fmaf(s[n][2], sl2, -lseB));
        s[n][3] = ex2f(fmaf(s[n][3], sl2, -lseB));
    }
    if (k0 + PF_KT > min(r.ncA, r.ncB)) {
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int i = k0 + n * 8 + q4 * 2 + e;
                if (i >= r.ncA) s[n][e] = 0.f;
                if (i >= r.ncB) s[n][2 + e] = 0.f;
            }
    }
}

// One position's selection state in shared memory, `L = n + W` floats: the top-n kept so
// far (scores in slots [0, n), -1 where empty; their blocks in `ix`, ascending) and a
// window of the block scores of blocks [cb, cb + W) being summed (Eq. 9). Once the tiles
// have passed a block its score is final; when the window is full the final ones are
// ranked with the kept n and the window moves on (`pf_sc_flush`), so a position needs
// n + W slots, not one per block of the longest sequence (variant 15,
// docs/PREFILL_NOTES.md). Without a moving window (the block-wide `pf_cmp`, and
// `pf_cmp_ws` where every block fits) n = 0 and W = every block (`pf_nblk`).
struct PfScores {
    float* sc;  // [positions][L()]
    int* ix;    // [positions][n]
    int n, W;
    __device__ __forceinline__ int L() const { return n + W; }
};

// Where block j's score of position po is summed while the window starts at block cb:
// pf_win(S, cb)[po * S.L() + j].
__device__ __forceinline__ float* pf_win(const PfScores& S, int cb) { return S.sc + S.n - cb; }

// Window slots of `pf_cmp_ws<..., WIN = true>`: the plan's (`PrefillPlan::sc_win`: as many
// as the block's shared memory holds, and the host checks a tile's blocks fit in it,
// `src/cuda/prefill.rs`).
// Without WIN every block, as in the block-wide `pf_cmp` (where they fit that is faster: no
// rankings inside the tile loop).
__device__ __forceinline__ int pf_sc_win(const Params& p) { return p.launch.pf_win; }

// Compressed-key tiles of a longest sequence (the page of each is looked up once).
__device__ __forceinline__ int pf_ntl_max(const Params& p) {
    return (num_cmp(p, p.paging.pages_per_seq * p.paging.page_size) + PF_KT - 1) / PF_KT;
}

// log2 of the group size, a power of two on this path (src/cuda/prefill.rs `supported`):
// the per-tile divisions by G as shifts (a runtime division is ~20 dependent instructions,
// and ptxas recomputes such loop invariants inside the tile loops rather than keep them
// in registers).
__device__ __forceinline__ int pf_lg(const Params& p) { return __ffs(p.shape.group_size) - 1; }

// The last selection block whose Eq. 9 sum takes a compressed key of the 64-key tile at k0
// (block j sums keys B*j - (A-1) .. B*j + B - 1; A = l / d, B = l' / d).
__device__ __forceinline__ int pf_tile_last_block(const Params& p, int k0) {
    return fdiv(k0 + PF_KT - 1 + p.shape.eq9_a - 1, p.shape.eq9_b_magic);
}

// Scores +inf for the forced blocks (the first sel_init, the last sel_local up to the
// position's own block b) among blocks cb.. cb + nb - 1, whose scores are at slot[0..nb).
__device__ __forceinline__ void pf_force_blocks(const Params& p, float* slot, int cb, int nb, int b) {
    for (int s = threadIdx.x & 31; s < nb; s += 32) {
        const int j = cb + s;
        if (j < p.shape.sel_init || j > b - p.shape.sel_local) slot[s] = POS_INF;
    }
    __syncwarp();
}

// `pf_top_n` inlined, or as a call (OUTLINE: after the tile loops).
template <bool OUTLINE, class Idx, class Emit>
__device__ __forceinline__ unsigned pf_rank(float* sc, int nb, int n, unsigned* hist, Idx idx, Emit emit) {
    return OUTLINE ? pf_top_n_call(sc, nb, n, hist, idx, emit) : pf_top_n(sc, nb, n, hist, idx, emit);
}

// Empties the kept top-n and zeroes the first `nwin` window slots of positions
// po0.. po0 + npo - 1, thread `t` of `nt`.
__device__ __forceinline__ void pf_zero_scores(const PfScores& S, int nwin, int po0, int npo, int t, int nt) {
    const int per = S.n + nwin;
    for (int e = t; e < npo * per; e += nt) {
        int po = e / per, j = e - po * per;
        S.sc[(po0 + po) * S.L() + j] = j < S.n ? -1.f : 0.f;
    }
}

// Eq. 9's block score from a tile's head sums `ps` [PF_KT] for compile-time strides: the
// terms i = f + k (k < A + B - 1, f the block's first offset in the tile) that fall in the
// tile, weighted by overlap_count, summed in k order.
template <int A, int B>
__device__ __forceinline__ float pf_eq9_sum(const float* ps, int f) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < A + B - 1; k++) {
        const int lo = k - (B - 1) > 0 ? k - (B - 1) : 0, hi = k < A - 1 ? k : A - 1;
        if (f + k >= 0 && f + k < PF_KT) acc += (float)(hi - lo + 1) * ps[f + k];
    }
    return acc;
}

// Pass 2, one tile of probabilities s (keys k0..): summed over each position's group
// heads into the warp's `myps` [PW][64], then added to the warp's positions' block scores
// (Eq. 9): block j of position po at win[po * L + j] (`pf_win`). Only the warp's own
// positions are touched (no block barrier needed).
__device__ __forceinline__ void pf_block_scores(const Params& p, const float (&s)[8][4], float* myps, float* win, int L,
                                                int nblk_tile, const PrefillTile& tl, int warp, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
    const int G = p.shape.group_size, lg = pf_lg(p), PW = 16 >> lg;
    // Sum p over each position's heads: rows of one position differ in the low
    // log2(G) bits of the row (lane bits 2.. for g; rows g and g + 8 when G = 16).
    if (G == 16) {
        // One position per warp: add rows g and g + 8, then a transpose-reduce over
        // the 8 lanes of a column group (each level halves the values a lane keeps,
        // 14 shuffles instead of 48); lane (g, q4) ends with two adjacent columns.
        float v[16];
#pragma unroll
        for (int n = 0; n < 8; n++) {
            v[2 * n] = s[n][0] + s[n][2];
            v[2 * n + 1] = s[n][1] + s[n][3];
        }
        pf_fold<8>(v, g & 1, 4);
        pf_fold<4>(v, (g >> 1) & 1, 8);
        pf_fold<2>(v, (g >> 2) & 1, 16);
        const int n = (g & 1) * 4 + ((g >> 1) & 1) * 2 + ((g >> 2) & 1);  // g's bits reversed
        const int A = p.shape.eq9_a, B = p.shape.eq9_b;
        if ((A == 2 && B == 4) || (A == 1 && B == 1)) {
            // The presets' Eq. 9 straight from the registers (prefill variant 30): the lane
            // holds the head sums of columns c, c + 1; with A = 2, B = 4 the lane at c = 4m
            // scores block (k0 + c) / 4 from its pair, the next lane's pair (c + 2, c + 3)
            // and column c - 1 (weights 1, 2, 2, 2, 1: the terms in this tile; column k0 - 1
            // was the previous tile's), and the lane at c = 62 gives the first term of the
            // block starting at k0 + 63. With A = B = 1 a block is a column.
            const int c = n * 8 + q4 * 2, po = warp;
            float* w = win + po * L;
            const bool pos_in = po < tl.npos;
            if (A == 1) {
                if (pos_in && k0 + c < nblk_tile) w[k0 + c] += v[0];
                if (pos_in && k0 + c + 1 < nblk_tile) w[k0 + c + 1] += v[1];
            } else {
                const float an = __shfl_xor_sync(0xffffffffu, v[0], 1), bn = __shfl_xor_sync(0xffffffffu, v[1], 1);
                const int cp = (c - 2) & (PF_KT - 1), np = cp >> 3;  // the lane holding column c - 1
                const int src = ((((np & 1) << 2) | (np & 2) | (np >> 2)) << 2) | ((cp >> 1) & 3);
                const float bp = __shfl_sync(0xffffffffu, v[1], src);
                if ((q4 & 1) == 0) {
                    const int j = (k0 + c) >> 2;
                    const float acc = 2.f * (v[0] + v[1] + an) + bn + (c > 0 ? bp : 0.f);
                    if (pos_in && j < nblk_tile) w[j] += acc;
                } else if (c == PF_KT - 2) {
                    const int j = (k0 + PF_KT) >> 2;
                    if (pos_in && j < nblk_tile) w[j] += v[1];
                }
            }
            __syncwarp();
            return;
        }
        *(float2*)(myps + n * 8 + q4 * 2) = make_float2(v[0], v[1]);
    } else if (G > 1) {
        // G = 2, 4, 8: a position's heads are rows in lanes that differ in the low
        // log2(G) bits of g. The same transpose-reduce over both rows' 32 values: the
        // first level splits rows A and B, each next one halves the columns a lane
        // keeps (16 + 8 + 4 shuffles at G = 8, where summing each value took 96); the
        // sums are those of the pairwise tree, bit for bit.
        float v[32];
#pragma unroll
        for (int n = 0; n < 8; n++) {
            v[2 * n] = s[n][0];
            v[2 * n + 1] = s[n][1];
            v[16 + 2 * n] = s[n][2];
            v[16 + 2 * n + 1] = s[n][3];
        }
        pf_fold<16>(v, g & 1, 4);
        if (G >= 4) pf_fold<8>(v, (g >> 1) & 1, 8);
        if (G >= 8) pf_fold<4>(v, (g >> 2) & 1, 16);
        // The lane keeps row A (g even) or B of its head group, columns n0.. of 32 / G.
        float* dst = myps + ((g + 8 * (g & 1)) >> lg) * PF_KT + q4 * 2;
        const int n0 = (G >= 4 ? 4 * ((g >> 1) & 1) : 0) + (G >= 8 ? 2 * ((g >> 2) & 1) : 0);
#pragma unroll
        for (int i = 0; i < 16; i += 2)
            if (i < (32 >> lg)) *(float2*)(dst + (n0 + i / 2) * 8) = make_float2(v[i], v[i + 1]);
    } else {  // G = 1: a position per row
#pragma unroll
        for (int n = 0; n < 8; n++) {
            *(float2*)(myps + g * PF_KT + n * 8 + q4 * 2) = make_float2(s[n][0], s[n][1]);
            *(float2*)(myps + (g + 8) * PF_KT + n * 8 + q4 * 2) = make_float2(s[n][2], s[n][3]);
        }
    }
    __syncwarp();
    // Block scores (Eq. 9): block j gathers p_i for i = B*j - (A-1) + k, k < A+B-1,
    // weighted by the number of (a, b) pairs with a + b = k. Blocks whose window meets
    // this tile: one lane per (position, block); tiles come in order, so each score
    // is summed in a fixed order.
    const int A = p.shape.eq9_a, B = p.shape.eq9_b;
    const int jlo = fdiv(k0, p.shape.eq9_b_magic);  // first block whose last offset B*j + B - 1 reaches k0
    const int jhi = pf_tile_last_block(p, k0);
    const int nj = jhi - jlo + 1;
    // The lane's (position, block) pairs pw * nj + jj = lane, lane + 32, ..., stepped
    // without a division (nj is the tile's own).
    int pw = 0, jj = lane;
    while (jj >= nj) {
        jj -= nj;
        pw++;
    }
    while (pw < PW) {
        const int po = warp * PW + pw, j = jlo + jj;
        if (po < tl.npos && j < nblk_tile) {
            float acc = 0.f;
            const int first = B * j - (A - 1);
            // The presets' strides with constant weights (paper: A = 2, B = 4; fla: A = B =
            // 1): the runtime-length loop cost divergent branches and their reconvergence
            // per term (SASS samples of pf_cmp, docs/PREFILL_NOTES.md, variants 25, 28).
            // Same terms, same order, same weights.
            if (A == 2 && B == 4)
                acc = pf_eq9_sum<2, 4>(myps + pw * PF_KT, first - k0);
            else if (A == 1 && B == 1)
                acc = pf_eq9_sum<1, 1>(myps + pw * PF_KT, first - k0);
            else
                for (int k = 0; k < A + B - 1; k++) {
                    int i = first + k;
                    if (i >= k0 && i < k0 + PF_KT) acc += overlap_count(k, A, B) * myps[pw * PF_KT + i - k0];
                }
            win[po * L + j] += acc;
        }
        jj += 32;
        while (jj >= nj) {
            jj -= nj;
            pw++;
        }
    }
    __syncwarp();
}

// The factors gate / l that turn the lane's two rows' o into their gated branch output
// (branch 1 selected, 2 window); each row's l is first summed over its four lanes.
__device__ __forceinline__ void pf_gate_over_l(float& lA, float& lB, bool okA, bool okB, const float* gates, usize rA,
                                               usize rB, int branch, float& fA, float& fB) {
    lA += __shfl_xor_sync(0xffffffffu, lA, 1);
    lA += __shfl_xor_sync(0xffffffffu, lA, 2);
    lB += __shfl_xor_sync(0xffffffffu, lB, 1);
    lB += __shfl_xor_sync(0xffffffffu, lB, 2);
    fA = okA && lA != 0.f ? gates[rA * 3 + branch] / lA : 0.f;
    fB = okB && lB != 0.f ? gates[rB * 3 + branch] / lB : 0.f;
}

// out = cur + the lane's two rows' gated branch output, `cur` a word per row and pair of
// columns (what `pf_add_gated` loaded, or what `pf_cmp_ws` kept of its compressed part).
template <class E, int DV>
__device__ __forceinline__ void pf_store_gated(const Params& p, usize rA, usize rB, bool okA, bool okB, float fA, float fB,
                                               const float (&o)[DV / 8][4], const unsigned (&cur)[DV / 8][2]) {
    const int q4 = threadIdx.x & 3;
    typename E::T* out = (typename E::T*)p.io.out;
#pragma unroll
    for (int d = 0; d < DV / 8; d++) {
        const int c = d * 8 + q4 * 2;
        float x, y;
        if (okA) {
            E::upk(cur[d][0], x, y);
            E::st2(out, rA * DV + c, x + fA * o[d][0], y + fA * o[d][1]);
        }
        if (okB) {
            E::upk(cur[d][1], x, y);
            E::st2(out, rB * DV + c, x + fB * o[d][2], y + fB * o[d][3]);
        }
    }
}

// out += the lane's two rows' gated branch output (factors from `pf_gate_over_l`), rows
// rA (if okA) and rB (if okB): the kernels that add a branch to what an earlier one stored.
// A lane's two columns of a row are one word; every word is loaded before any is stored:
// interleaved, each load waited a round trip behind the store before it, which may alias
// it (11% of `pf_cmp`'s stall samples at 64k, docs/PREFILL_NOTES.md, variant 36).
template <class E, int DV>
__device__ __forceinline__ void pf_add_gated(const Params& p, usize rA, usize rB, bool okA, bool okB, float fA, float fB,
                                             const float (&o)[DV / 8][4]) {
    static_assert(sizeof(typename E::T) == 2, "a lane's two columns are one word");
    const int q4 = threadIdx.x & 3;
    typename E::T* out = (typename E::T*)p.io.out;
    unsigned cur[DV / 8][2];
#pragma unroll
    for (int d = 0; d < DV / 8; d++) {
        const int c = d * 8 + q4 * 2;
        cur[d][0] = okA ? *(const unsigned*)(out + rA * DV + c) : 0u;
        cur[d][1] = okB ? *(const unsigned*)(out + rB * DV + c) : 0u;
    }
    pf_store_gated<E, DV>(p, rA, rB, okA, okB, fA, fB, o, cur);
}

// The output (and gates) row of position `po` of the tile, head `h` of KV head kvh's group.
__device__ __forceinline__ usize pf_out_row(const Params& p, const PrefillTile& tl, int po, int h, int kvh) {
    return (usize)(tl.row0 + po) * p.shape.num_q_heads + kvh * p.shape.group_size + h;
}

// The gated compressed output g_cmp * o_cmp of one of the lane's rows (its position `po`
// in the tile, head `h` of the group; fragment columns E0 and E0 + 1: 0 for row A, 2 for
// row B) into `out` (pf_sw adds the other branches to it).
template <class E, int DV, int E0>
__device__ __forceinline__ void pf_cmp_store_row(const Params& p, const PrefillTile& tl, int po, int h, int kvh,
                                                 const float (&o)[DV / 8][4]) {
    const int q4 = threadIdx.x & 3;
    const float* gates = (const float*)p.io.gates;
    typename E::T* out = (typename E::T*)p.io.out;
    if (po < tl.npos) {
        const usize row = pf_out_row(p, tl, po, h, kvh);
        const float gt = gates[row * 3];
#pragma unroll
        for (int d = 0; d < DV / 8; d++) E::st2(out, row * DV + d * 8 + q4 * 2, gt * o[d][E0], gt * o[d][E0 + 1]);
    }
}

// The same values as `pf_cmp_store_row` stores, kept as words (`pf_store_gated`'s `cur`)
// by `pf_cmp_ws` while its window runs: the window then writes out once, with no load.
template <class E, int DV>
__device__ __forceinline__ void pf_cmp_gated_words(const Params& p, const PrefillTile& tl, const PfCmpRows& r, int kvh,
                                                   int warp, const float (&o)[DV / 8][4], unsigned (&cur)[DV / 8][2]) {
    const int g = (threadIdx.x & 31) >> 2, G = p.shape.group_size;
    const float* gates = (const float*)p.io.gates;
    const float gA = r.poA < tl.npos ? gates[pf_out_row(p, tl, r.poA, (warp * 16 + g) % G, kvh) * 3] : 0.f;
    const float gB = r.poB < tl.npos ? gates[pf_out_row(p, tl, r.poB, (warp * 16 + g + 8) % G, kvh) * 3] : 0.f;
#pragma unroll
    for (int d = 0; d < DV / 8; d++) {
        cur[d][0] = E::pk(gA * o[d][0], gA * o[d][1]);
        cur[d][1] = E::pk(gB * o[d][2], gB * o[d][3]);
    }
}

// Both of the lane's rows.
template <class E, int DV>
__device__ __forceinline__ void pf_cmp_store(const Params& p, const PrefillTile& tl, const PfCmpRows& r, int kvh,
                                             int warp, const float (&o)[DV / 8][4]) {
    const int g = (threadIdx.x & 31) >> 2, G = p.shape.group_size;
    const int hA = (warp * 16 + g) % G, hB = (warp * 16 + g + 8) % G;
    pf_cmp_store_row<E, DV, 0>(p, tl, r.poA, hA, kvh, o);
    pf_cmp_store_row<E, DV, 2>(p, tl, r.poB, hB, kvh, o);
}

// The 64-key tiles of the window's band of a tile's positions: [t0, t0 + n), from the first
// position's lowest key to the last position (computed where used: kept live across the
// passes, they cost the 12-warp forms a spilled word).
struct PfWinTiles {
    int t0, n;
};
__device__ __forceinline__ PfWinTiles pf_win_tiles(const Params& p, const PrefillTile& tl) {
    const int t0 = max(0, tl.pos0 - p.shape.window + 1) / PF_KT;
    return {t0, (tl.pos0 + tl.npos - 1) / PF_KT - t0 + 1};
}

// `pf_cmp_ws`'s sliding window (`launch.mode & 16`, `PrefillPlan::cmp_window`): after
// pass 2 the producer streams the band's raw 64-key tiles [wt0, wt0 + nwt) through the same
// ring (ring counters from `it0`), and each warpgroup multiplies those of its positions'
// band (a banded causal attention, online softmax, as `pf_sw`'s window phase), then writes
// the gated compressed part (KEPT: `cur`, kept in registers by the caller; else what the
// caller stored to `out`) + g_win * o_win / l to `out`. So the window's tiles serve the
// warp-specialised block's 192 rows and `pf_sw` keeps the selected branch alone. Every
// consumer warp waits for and releases every tile (a warp's release may count only towards
// the tile's current round).
template <class E, int DK, int DV, bool KEPT, bool SPLIT, class M, class Round>
__device__ __forceinline__ void pf_cmp_window(const Params& p, const PrefillTile& tl, M& m, int kvh,
                                              int warp, int nw, unsigned ks, unsigned vs, unsigned full0, unsigned empty0, int it0,
                                              Round round_of, int NS, float sl2, const unsigned (&cur)[DV / 8][2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3, G = p.shape.group_size, w = p.shape.window;
    const int last = tl.pos0 + tl.npos - 1;
    const PfWinTiles wn = pf_win_tiles(p, tl);
    // The lane's rows' positions (recomputed: `PfCmpRows` kept live to here costs a spill).
    const int poA = (warp * 16 + g) >> pf_lg(p), poB = (warp * 16 + g + 8) >> pf_lg(p);
    const bool okA = poA < tl.npos, okB = poB < tl.npos;
    const int tA = tl.pos0 + poA, tB = tl.pos0 + poB;
    // The warpgroup's positions: tiles outside all of their bands are not multiplied.
    const int PU = M::UNIT / G, unit = warp / (M::UNIT / 16);
    const int umin = tl.pos0 + unit * PU, umax = min(umin + PU - 1, last);
    const bool uok = unit * PU < tl.npos;
    float o[DV / 8][4];
#pragma unroll
    for (int d = 0; d < DV / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;
    for (int i = 0; i < wn.n; i++) {
        const int it = it0 + i, q = round_of(it), s = it - q * NS, k0 = (wn.t0 + i) * PF_KT;
        mbar_wait(full0 + 8 * s, q & 1);
        // Whether a loaded key that some of the tile's rows do not see (below the last
        // position's band, past the first position, and the rows past the last one, which
        // the copies did not zero) holds a non-finite value: then the tile's rows are
        // repaired after the step (kernels/prefill_repair.cuh). With SPLIT (the 12-warp
        // forms) each consumer warp scans its share of those rows, whether its positions
        // need the tile or not, before the tile's products; else every warp whose positions
        // need the tile scans them all before its P V (the 8-warp forms: in the split form
        // ptxas injected a warpgroup arrive at the P V, and in this form the 12-warp ones
        // spilled).
        if (SPLIT) pf_nf_note(pf_band_tile_nf<E, DV, M>(vs + s * M::VTILE, k0, tl.pos0, last, w, k0 + PF_KT - 1, warp, nw));
        if (uok && k0 <= umax && k0 + PF_KT - 1 >= umin - w + 1) {
            float sv[8][4];
            m.qk(ks + s * M::KTILE, sv);
            const bool fullA = okA && k0 >= tA - w + 1 && k0 + PF_KT - 1 <= tA;
            const bool fullB = okB && k0 >= tB - w + 1 && k0 + PF_KT - 1 <= tB;
            if (!__all_sync(0xffffffffu, fullA && fullB)) {  // masks only on tiles a row sees in part
#pragma unroll
                for (int n = 0; n < 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int k = k0 + n * 8 + q4 * 2 + e;
                        if (!(okA && k <= tA && k > tA - w)) sv[n][e] = NEG_INF;
                        if (!(okB && k <= tB && k > tB - w)) sv[n][2 + e] = NEG_INF;
                    }
            }
            pf_online<8, DV>(sv, sl2, mA, mB, lA, lB, o);
            if (!SPLIT) pf_nf_note(pf_band_tile_nf<E, DV, M>(vs + s * M::VTILE, k0, tl.pos0, last, w, k0 + PF_KT - 1));
            m.pv(sv, vs + s * M::VTILE, o);
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty0 + 8 * s);
    }
    pf_nf_flush(p, tl.row0, tl.npos, kvh);
    const int hA = (warp * 16 + g) % G, hB = (warp * 16 + g + 8) % G;
    const usize rA = pf_out_row(p, tl, poA, hA, kvh), rB = pf_out_row(p, tl, poB, hB, kvh);
    float fA, fB;
    pf_gate_over_l(lA, lB, okA, okB, (const float*)p.io.gates, rA, rB, 2, fA, fB);
    if (KEPT)
        pf_store_gated<E, DV>(p, rA, rB, okA, okB, fA, fB, o, cur);
    else
        pf_add_gated<E, DV>(p, rA, rB, okA, okB, fA, fB, o);
}

// Ranks the final window blocks [cb, f) of each of the warp's positions (capped at its
// own block b; forced blocks +inf) with its kept top-n into the new kept top-n; with
// `shift`, the window then starts at block f (the sums of blocks f.. move down, the
// freed slots are zeroed). `hist`: the warp's 256 words. OUTLINE: the ranking as a call
// (`pf_top_n_call`), for the flush after the loops.
template <bool OUTLINE>
__device__ __forceinline__ void pf_sc_flush(const Params& p, const PfScores& S, const PrefillTile& tl, int warp, int cb,
                                            int f, bool shift, unsigned* hist) {
    const int lane = threadIdx.x & 31, PW = 16 >> pf_lg(p), n = S.n;
    for (int pw = 0; pw < PW; pw++) {
        const int po = warp * PW + pw;
        if (po >= tl.npos) break;
        const int b = (tl.pos0 + po) / p.shape.sel_block;
        float* my = S.sc + po * S.L();
        int* ix = S.ix + po * n;
        const int nf = min(min(f, b + 1) - cb, S.W);
        if (nf > 0) {
            pf_force_blocks(p, my + n, cb, nf, b);
            // Captures by value: a by-reference capture would put the locals in local memory.
            auto idx = [=](int s) { return s < n ? ix[s] : cb + s - n; };
            auto emit = [=](int r, int blk, unsigned k) {
                ix[r] = blk;
                my[r] = __uint_as_float(k - 1u);
            };
            const unsigned c = pf_rank<OUTLINE>(my, n + nf, n, hist, idx, emit);
            for (int r = (int)c + lane; r < n; r += 32) my[r] = -1.f;
        }
        if (shift) {
            const int d = f - cb;
            for (int s0 = 0; s0 < S.W; s0 += 32) {
                const int s = s0 + lane;
                const float v = s + d < S.W ? my[n + s + d] : 0.f;
                __syncwarp();
                if (s < S.W) my[n + s] = v;
            }
        }
        __syncwarp();
    }
}

// The selection of the warp's positions into `pf_sel`, ascending and -1 padded. With a
// kept top-n (S.n > 0): the last rankings (every block up to each one's own: blocks past
// the window, which no tile reached, score 0), then the kept blocks. Without (the window
// holds every block from block 0): the forced blocks, then the top-n of blocks 0..b.
template <bool OUTLINE>
__device__ __forceinline__ void pf_cmp_select(const Params& p, const PrefillTile& tl, int kvh, int warp, const PfScores& S,
                                              int cb, unsigned* hist) {
    const int lane = threadIdx.x & 31, PW = 16 / p.shape.group_size, n = p.shape.sel_count;
    if (warp * PW >= tl.npos) return;
    if (S.n > 0) {
        const int bmax = (tl.pos0 + min(tl.npos, (warp + 1) * PW) - 1) / p.shape.sel_block;
        for (;;) {
            const bool more = bmax >= cb + S.W;
            pf_sc_flush<OUTLINE>(p, S, tl, warp, cb, cb + S.W, more, hist);
            if (!more) break;
            cb += S.W;
        }
    }
    for (int pw = 0; pw < PW; pw++) {
        const int po = warp * PW + pw;
        if (po >= tl.npos) break;
        int* dst = pf_sel(p) + ((usize)(tl.row0 + po) * p.shape.num_kv_heads + kvh) * n;
        float* my = S.sc + po * S.L();
        if (S.n > 0) {
            for (int r = lane; r < n; r += 32) dst[r] = my[r] >= 0.f ? S.ix[po * n + r] : -1;
            continue;
        }
        const int b = (tl.pos0 + po) / p.shape.sel_block;
        pf_force_blocks(p, my, 0, b + 1, b);
        auto idx = [](int s) { return s; };
        auto emit = [=](int r, int blk, unsigned) { dst[r] = blk; };
        const unsigned c = pf_rank<OUTLINE>(my, b + 1, n, hist, idx, emit);
        for (int r = (int)c + lane; r < n; r += 32) dst[r] = -1;
        __syncwarp();
    }
}

// pf_cmp's and pf_cmp_ws's shared memory from the 1024-byte aligned base: Q (Wgmma) | K
// stages [ns] | V stages [ns] | per-position head sums [nw*PW][64] f32 | selection states
// (`PfScores`: [nw*PW][n + W] f32, then [nw*PW][n] i32) | the page of each compressed key
// tile [pf_ntl_max] i32 (pf_cmp_ws adds its histograms after them).
template <class M>
struct PfCmpSmem {
    unsigned char* base;
    unsigned qs, ks, vs;  // shared addresses of Q, the K stages, the V stages
    float* ps;
    PfScores S;
    int* pg;
    __device__ __forceinline__ PfCmpSmem(unsigned char* raw, int ns, int nw, int PW, int n, int W) {
        base = pf_base(raw);
        qs = smem_u32(base);
        ks = qs + M::q_bytes(nw * 16);
        vs = ks + ns * M::KTILE;
        ps = (float*)(base + (vs - qs) + ns * M::VTILE);
        S.n = n;
        S.W = W;
        S.sc = ps + nw * PW * PF_KT;
        S.ix = (int*)(S.sc + nw * PW * S.L());
        pg = S.ix + nw * PW * n;
    }
};

// Compressed branch + selection. Shared memory: `PfCmpSmem` with NS stages.
template <class E, int DK, int DV, int NS, class M>
__device__ void pf_cmp(const Params& p) {
    extern __shared__ __align__(16) unsigned char pf_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int g = lane >> 2;
    const int kvh = blockIdx.y, G = p.shape.group_size, PW = 16 / G;
    const PrefillTile tl = pf_tile(p, blockIdx.x, nw * PW);
    if (tl.npos == 0) return;
    const PfCmpSmem<M> sm(pf_smem, NS, nw, PW, 0, pf_nblk(p));
    unsigned char* base = sm.base;
    const unsigned qs = sm.qs, ks = sm.ks, vs = sm.vs;
    float* ps = sm.ps;
    int* pg = sm.pg;

    PfCopy<NS, M::SW, M::TMA> cp;
    cp.init(p);
    M m;
    m.load_q(p, tl, kvh, qs, M::q_bytes(nw * 16) ? base : base + (ks - qs));

    const PfCmpRows rw = pf_cmp_rows(p, tl, warp, g);
    const int nc_max = num_cmp(p, tl.pos0 + tl.npos);
    const int ntl = (nc_max + PF_KT - 1) / PF_KT;
    const int* ctab = (const int*)p.paging.cmp_tab + (usize)tl.seq * p.paging.cmp_pages_per_seq;
    const u16* ck = (const u16*)p.paging.cmp_k;
    const u16* cv = (const u16*)p.paging.cmp_v;
    for (int i = threadIdx.x; i < ntl; i += blockDim.x) pg[i] = ctab[i * PF_KT / p.paging.page_size];
    __syncthreads();

    // Pass 1: running max (raw logits) and sum of every row's probabilities.
    const float sl2 = p.shape.scale * 1.4426950408889634f;
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;
    for (int st = 0; st < NS - 1; st++) {
        if (st < ntl) cp.template load<DK, 0>(p, st, ks + st * M::KTILE, ck, 2, 0u, cv, 3, pg[st], kvh, st * PF_KT, nc_max);
        cp.commit();
    }
    for (int kt = 0; kt < ntl; kt++) {
        const int nx = kt + NS - 1;
        if (nx < ntl) cp.template load<DK, 0>(p, nx % NS, ks + (nx % NS) * M::KTILE, ck, 2, 0u, cv, 3, pg[nx], kvh, nx * PF_KT, nc_max);
        cp.commit();
        cp.template wait<0>(kt % NS, base, kt * PF_KT, nc_max);
        fence_async_smem();
        __syncthreads();
        float s[8][4];
        m.qk(ks + (kt % NS) * M::KTILE, s);
        pf_lse_tile(s, kt * PF_KT, rw, sl2, mA, mB, lA, lB);
        __syncthreads();
    }
    float lseA, lseB;
    pf_lse_final(mA, mB, lA, lB, sl2, lseA, lseB);

    // Pass 2: normalised probabilities -> P.V and the block scores.
    const int nblk_tile = (tl.pos0 + tl.npos - 1) / p.shape.sel_block + 1;
    pf_zero_scores(sm.S, nblk_tile, 0, nw * PW, threadIdx.x, blockDim.x);
    __syncthreads();
    float o[DV / 8][4];
#pragma unroll
    for (int d = 0; d < DV / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    for (int st = 0; st < NS - 1; st++) {
        if (st < ntl) cp.template load<DK, DV>(p, st, ks + st * M::KTILE, ck, 2, vs + st * M::VTILE, cv, 3, pg[st], kvh, st * PF_KT, nc_max);
        cp.commit();
    }
    float* myps = ps + warp * PW * PF_KT;
    const int cu = pf_unit_cmp_count<M>(p, tl, warp);
    bool bad = false;  // the non-finite scan found one: the tile's rows are repaired
    for (int kt = 0; kt < ntl; kt++) {
        const int nx = kt + NS - 1;
        if (nx < ntl)
            cp.template load<DK, DV>(p, nx % NS, ks + (nx % NS) * M::KTILE, ck, 2, vs + (nx % NS) * M::VTILE, cv, 3, pg[nx], kvh, nx * PF_KT,
                            nc_max);
        cp.commit();
        cp.template wait<DV>(kt % NS, base + (vs - qs) + (kt % NS) * M::VTILE, kt * PF_KT, nc_max);
        fence_async_smem();
        __syncthreads();
        float s[8][4];
        m.qk(ks + (kt % NS) * M::KTILE, s);
        pf_prob_tile(s, kt * PF_KT, rw, sl2, lseA, lseB);
        const unsigned vt = vs + (kt % NS) * M::VTILE;
        bad |= pf_cmp_tile_nf<E, DV, M>(vt, kt * PF_KT, cu, nc_max);  // kernels/prefill_nonfinite.cuh
        m.pv(s, vt, o);
        pf_block_scores(p, s, myps, pf_win(sm.S, 0), sm.S.L(), nblk_tile, tl, warp, kt * PF_KT);
        __syncthreads();
    }
    if (bad) pf_fix_mark(p, tl.row0, tl.npos, kvh);  // kernels/prefill_repair.cuh
    pf_cmp_store<E, DV>(p, tl, rw, kvh, warp, o);
    // Each warp's top-n histogram takes 1 KB of the K stages: every warp passed the loop's
    // last barrier, so no copy or product touches them any more.
    static_assert(NS * M::KTILE >= 8 * 256 * sizeof(unsigned), "a histogram per warp in the K stages");
    cp_wait<0>();
    __syncwarp();
    pf_cmp_select<true>(p, tl, kvh, warp, sm.S, 0, (unsigned*)(base + (ks - qs)) + warp * 256);
}

// Compressed branch + selection, warp-specialised (sm_90a, tiles by tensor maps): `nw`
// consumer warps (blockDim / 32 - PWARPS; two or three warpgroups: at G = 16 eight or
// twelve positions, so each K/V tile serves two or three times the rows of a 4-warp block)
// and a producer warp that copies the tiles of both passes into stages ahead of them (in a
// warpgroup of its own beside 12 consumer warps, PWARPS = 4, whose registers go to them).
// Hand-over by mbarriers, no block-wide barrier in the loops: full[s] completes with the
// copy engine's bytes, empty[s] with one arrive per consumer warp after its last read of
// the stage. So one warpgroup's softmax and block scores overlap the other's products and
// the next tiles' copies (docs/PREFILL_NOTES.md, variant 14). A tail tile's V rows past its
// last key are not zeroed (whatever the page holds there, a later position's row or a
// stale one, may be a NaN, and 0 x NaN is NaN): the consumers' non-finite scans take them
// in, so where one holds such a value the tile's rows are recomputed by the exact repair,
// which never multiplies them (kernels/prefill_repair.cuh). (The producer zeroed them until
// the thirtieth session: its stores, or copy-engine copies of zeros, ordered after the
// scans' loads of the stage's previous round only by the empty mbarrier, were what
// compute-sanitizer's race check reported.) Shared memory: `PfCmpSmem`, then histograms
// [nw][256] u32; the stage count ns (2 to NSA_PF_WS_STAGES) is whatever the dynamic shared
// memory the host gave holds
// (src/cuda/prefill.rs sizes it with the same layout). With WIN the rankings are inline
// (a call made ptxas spill in the 12-warp form when it had 128 registers a thread).
template <class E, int DK, int DV, bool WIN, int PWARPS>
__device__ void pf_cmp_ws(const Params& p) {
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    return;  // warpgroup MMA and setmaxnreg: the host takes it on sm_90a only (sm_80's empty body
             // also keeps ptxas from spilling a 128-register allocation of dead code)
#endif
    using M = Wgmma<E, DK, DV>;
    extern __shared__ __align__(16) unsigned char pf_smem[];
    __shared__ __align__(8) unsigned long long bars[2 * NSA_PF_WS_STAGES];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x >> 5) - PWARPS;
    const int g = lane >> 2;
    const int kvh = blockIdx.y, G = p.shape.group_size, PW = 16 / G, n = WIN ? p.shape.sel_count : 0;
    const int W = WIN ? pf_sc_win(p) : pf_nblk(p);
    const PrefillTile tl = pf_tile(p, blockIdx.x, nw * PW);
    if (tl.npos == 0) return;
    const int ntlm = pf_ntl_max(p);
    const unsigned fixed = 1024u + M::q_bytes(nw * 16) + (unsigned)(nw * PW * (PF_KT + 2 * n + W) + ntlm + nw * 256) * 4u;
    const int NS = min((int)((dyn_smem_bytes() - fixed) / (M::KTILE + M::VTILE)), NSA_PF_WS_STAGES);
    // Tile counter i's ring round i / NS by divisions by constants (NS is 2, 3 or 4).
    static_assert(NSA_PF_WS_STAGES <= 4, "round_of covers 2 to 4 stages");
    auto round_of = [NS](int i) { return NS == 4 ? i >> 2 : NS == 2 ? i >> 1 : (int)((unsigned)i / 3u); };
    const PfCmpSmem<M> sm(pf_smem, NS, nw, PW, n, W);
    unsigned char* base = sm.base;
    const unsigned qs = sm.qs, ks = sm.ks, vs = sm.vs;
    float* ps = sm.ps;
    int* pg = sm.pg;
    unsigned* hist = (unsigned*)(pg + ntlm);
    const unsigned full0 = smem_u32(bars), empty0 = full0 + 8 * NSA_PF_WS_STAGES;
    if (threadIdx.x == 0) {
        for (int s = 0; s < NS; s++) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, nw);
        }
        fence_mbar_init();
    }
    M m;
    m.load_q(p, tl, kvh, qs, base, nw * 16);  // ends with a block barrier: publishes the mbarriers

    const int nc_max = num_cmp(p, tl.pos0 + tl.npos);
    const int ntl = (nc_max + PF_KT - 1) / PF_KT;
    const int* ctab = (const int*)p.paging.cmp_tab + (usize)tl.seq * p.paging.cmp_pages_per_seq;
    for (int i = threadIdx.x; i < ntl; i += blockDim.x) pg[i] = ctab[i * PF_KT / p.paging.page_size];
    __syncthreads();

    if (warp >= nw) {
        // With a producer warpgroup (PWARPS = 4) its registers go to the consumers: 32 a
        // thread here, 160 there (4 x 32 + 12 x 160 = the 16 warps' 16 x 128), so the
        // consumers' loops fit without spilling (docs/PREFILL_NOTES.md, variant 26). Only
        // its first warp copies.
        if (PWARPS == 4) setmaxnreg_dec<32>();
        if (warp != nw) return;
        // Producer: pass 1's K tiles, then pass 2's K and V tiles, then the window's raw
        // K and V tiles, through the ring.
        const int* rtab = (const int*)p.paging.raw_tab + (usize)tl.seq * p.paging.pages_per_seq;
        const PfWinTiles wn = pf_win_tiles(p, tl);
        const int wt0 = wn.t0, nwt = (p.launch.mode & 16) ? wn.n : 0;
        for (int it = 0; it < 2 * ntl + nwt; it++) {
            const int q = round_of(it), s = it - q * NS;
            if (it >= NS) mbar_wait(empty0 + 8 * s, (q - 1) & 1);
            const bool raw = it >= 2 * ntl, v = it >= ntl;
            const int kt = raw ? wt0 + it - 2 * ntl : it < ntl ? it : it - ntl, k0 = kt * PF_KT;
            const unsigned kd = ks + s * M::KTILE, vd = vs + s * M::VTILE, bar = full0 + 8 * s;
            if (raw)
                pf_tma_tile<DK, DV>(p, lane, bar, kd, 0, vd, 1, rtab[k0 / p.paging.page_size], kvh, k0);
            else if (v)
                pf_tma_tile<DK, DV>(p, lane, bar, kd, 2, vd, 3, pg[kt], kvh, k0);
            else
                pf_tma_tile<DK, 0>(p, lane, full0 + 8 * s, kd, 2, vd, 3, pg[kt], kvh, k0);
        }
        return;
    }

    if (PWARPS == 4) setmaxnreg_inc<160>();
    if (lane == 0) pf_nf_flag() = 0;  // set by pass 2's and the window's scans
    const PfCmpRows rw = pf_cmp_rows(p, tl, warp, g);
    const float sl2 = p.shape.scale * 1.4426950408889634f;
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;
    if (ntl > 0) {
        // Pass 1 one tile ahead: tile kt + 1's Q K^T is in flight while the lanes sum tile
        // kt (two accumulator sets, swapped by unrolling the loop by two). Straight-line
        // waits in the loop: with the issue or the wait under a condition ptxas could not
        // tell which set a wait completes and serialised every product of the kernel.
        float sa[8][4], sb[8][4];
        auto issue = [&](int kt, float(&sv)[8][4]) {
            const int q = round_of(kt), s = kt - q * NS;
            mbar_wait(full0 + 8 * s, q & 1);
            m.template qk<false>(ks + s * M::KTILE, sv);
        };
        auto sum = [&](int kt, float(&sv)[8][4]) {
            wg_pin(sv);
            __syncwarp();
            if (lane == 0) mbar_arrive(empty0 + 8 * (kt - round_of(kt) * NS));
            pf_lse_tile(sv, kt * PF_KT, rw, sl2, mA, mB, lA, lB);
        };
        issue(0, sa);
        int kt = 0;
        for (; kt + 2 < ntl; kt += 2) {
            issue(kt + 1, sb);
            wg_wait<1>();
            sum(kt, sa);
            issue(kt + 2, sa);
            wg_wait<1>();
            sum(kt + 1, sb);
        }
        if (kt + 1 < ntl) {
            issue(kt + 1, sb);
            wg_wait<1>();
            sum(kt, sa);
            wg_wait<0>();
            sum(kt + 1, sb);
        } else {
            wg_wait<0>();
            sum(kt, sa);
        }
    }
    float lseA, lseB;
    pf_lse_final(mA, mB, lA, lB, sl2, lseA, lseB);

    const int nblk_tile = (tl.pos0 + tl.npos - 1) / p.shape.sel_block + 1;
    pf_zero_scores(sm.S, min(W, nblk_tile), warp * PW, PW, lane, 32);
    __syncwarp();
    // The window's first block (blocks before k0 / B are final once the tiles reach k0).
    int cb = 0;
    float* win = pf_win(sm.S, cb);
    float o[DV / 8][4];
#pragma unroll
    for (int d = 0; d < DV / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float* myps = ps + warp * PW * PF_KT;
    // Compressed tokens the tile's first position sees: later ones some rows do not see
    // (the non-finite scan, each consumer warp its share of the rows).
    const int nc0 = num_cmp(p, tl.pos0 + 1);
    for (int kt = 0; kt < ntl; kt++) {
        const int it = ntl + kt, q = round_of(it), s = it - q * NS, k0 = kt * PF_KT;
        if (WIN && min(pf_tile_last_block(p, k0), nblk_tile - 1) - cb >= W) {
            // The tile will reach past the window: blocks before k0 / B are final (their
            // last key is below k0). Ranked before this tile's products, while only the
            // accumulators are live.
            const int kb = fdiv(k0, p.shape.eq9_b_magic);
            pf_sc_flush<false>(p, sm.S, tl, warp, cb, kb, true, hist + warp * 256);
            cb = kb;
            win = pf_win(sm.S, cb);
        }
        mbar_wait(full0 + 8 * s, q & 1);
        // V's rows some of the tile's rows do not see are scanned before the tile's products
        // (a non-finite value there has the tile's rows repaired after the step:
        // kernels/prefill_repair.cuh; between the products, in the 8-warp forms, ptxas
        // injected a warpgroup arrive).
        const unsigned vt = vs + s * M::VTILE;
        pf_nf_note(pf_cmp_tile_nf<E, DV, M>(vt, k0, nc0, k0 + PF_KT, warp, nw));  // to the tile's end: not zeroed
        float sv[8][4];
        m.qk(ks + s * M::KTILE, sv);
        pf_prob_tile(sv, k0, rw, sl2, lseA, lseB);
        // P.V stays in flight while the probabilities are summed into block scores (it
        // reads V from the stage: the stage is released after the wait).
        m.template pv<false>(sv, vt, o);
        pf_block_scores(p, sv, myps, win, sm.S.L(), nblk_tile, tl, warp, k0);
        wg_wait<0>();
        wg_pin(o);
        __syncwarp();
        if (lane == 0) mbar_arrive(empty0 + 8 * s);
    }
    pf_nf_flush(p, tl.row0, tl.npos, kvh);
    // With the window, the gated compressed part stays in registers (rounded as stored)
    // until the window adds its own, so out is written once; but the moving-window forms
    // spill with those 32 words live at DK = 192 or in 8 warps, and store it first.
    constexpr bool KEPT = !WIN || (DK <= 128 && PWARPS == 4);
    unsigned cur[DV / 8][2];
    if (KEPT && (p.launch.mode & 16))
        pf_cmp_gated_words<E, DV>(p, tl, rw, kvh, warp, o, cur);
    else
        pf_cmp_store<E, DV>(p, tl, rw, kvh, warp, o);
    if (p.launch.mode & 16)
        pf_cmp_window<E, DK, DV, KEPT, PWARPS == 4>(p, tl, m, kvh, warp, nw, ks, vs, full0, empty0, 2 * ntl, round_of, NS, sl2, cur);
    pf_cmp_select<!WIN>(p, tl, kvh, warp, sm.S, cb, hist + warp * 256);
}

// Bytes of a warp's two copy stages in `pf_sel_warp`: 16 keys of K and of V each.
template <int DK, int DV>
__host__ __device__ constexpr unsigned pf_warp_stages() { return 2u * 16u * (DK + DV) * 2u; }
// Shared-memory address of warp w's copy stage st (16 K rows, then 16 V rows at + 16 DK * 2)
// in a per-warp stages area from `base`.
template <int DK, int DV>
__device__ __forceinline__ unsigned pf_warp_stage(unsigned base, int w, int st) {
    return base + (unsigned)w * pf_warp_stages<DK, DV>() + (unsigned)st * (pf_warp_stages<DK, DV>() / 2u);
}

// Byte offset of 16-byte granule c of row r in a warp stage's rows: granules XOR-swizzled
// by r within each 128 bytes, so ldmatrix reads are conflict-free.
__device__ __forceinline__ unsigned pf_swz(int c, int r) { return (unsigned)((c & ~7) | ((c ^ r) & 7)) * 16u; }

// The lane's granules e = lane + 32 J (J < C / 2) of 16 rows of C granules: the rows are
// consecutive in the pool, so granule e's source is one address plus 16 e bytes, an
// immediate of the copy (a 64-bit address per copy was ~100 instructions per 16-key
// sub-tile in the per-warp loop, docs/PREFILL_NOTES.md, variant 22b); its row r = e / C
// gives the destination `at(r, c)` and the zero fill.
template <int C, int J, class At>
__device__ __forceinline__ void pf_warp_rows_at(At at, const u16* s0, int lane, int rmax) {
    if constexpr (J < C / 2) {
        const int e = lane + 32 * J, r = e / C, c = e - r * C;
        cp_async16_at<J * 512>(at(r, c), s0, r <= rmax ? 16 : 0);
        pf_warp_rows_at<C, J + 1>(at, s0, lane, rmax);
    }
}

// 16 consecutive pool rows of D elements from `src` into a warp stage at `dst` by the
// warp's lanes (cp.async, swizzled); rows past `rmax` zero-filled. The sources are one
// address per lane (before variant 11 a 64-bit row_at per granule was ~25% of pf_sw's
// instructions; until 22b an address per granule).
template <int D>
__device__ __forceinline__ void pf_warp_rows(unsigned dst, const u16* src, int rmax) {
    constexpr int C = D / 8;  // granules per row
    static_assert(C >= 2 && C % 2 == 0 && D % 8 == 0, "rows of an even number of 16-byte granules");
    const int lane = threadIdx.x & 31;
    pf_warp_rows_at<C, 0>([dst](int r, int c) { return dst + r * C * 16 + pf_swz(c, r); }, src + lane * 8, lane, rmax);
}

// The same 16 rows as keys 16 w .. 16 w + 15 of a 64-key tile at `tile` in the layout the
// warpgroup products read (`Wgmma`: D / 64 column chunks of 64 rows x 128 bytes, swizzled);
// every row present.
template <int D>
__device__ __forceinline__ void pf_warp_rows_wg(unsigned tile, int w, const u16* src) {
    constexpr int C = D / 8;
    static_assert(D % 64 == 0, "whole 64-column chunks");
    const int lane = threadIdx.x & 31;
    pf_warp_rows_at<C, 0>([tile, w](int r, int c) { return tile + sw128_off(16 * w + r, c, PF_KT); }, src + lane * 8, lane, 15);
}

// The second half of a 16-key sub-tile step of the per-warp selected loops (`pf_sel_warp`,
// `pf_sel_alone`): the online softmax of the masked scores s, then P times the sub-tile's V
// rows into o; `vaddr(dp)` is the ldmatrix address of V's columns 16 dp .. 16 dp + 15 of
// the warp stage's V rows.
template <class E, int DV, class VAddr>
__device__ __forceinline__ void pf_sub_pv(float (&s)[2][4], float sl2, float& mA, float& mB, float& lA, float& lB,
                                          float (&o)[DV / 8][4], VAddr vaddr) {
    pf_online<2, DV>(s, sl2, mA, mB, lA, lB, o);
    const unsigned pa0 = pack2<E::MMA>(s[0][0], s[0][1]), pa1 = pack2<E::MMA>(s[0][2], s[0][3]);
    const unsigned pa2 = pack2<E::MMA>(s[1][0], s[1][1]), pa3 = pack2<E::MMA>(s[1][2], s[1][3]);
#pragma unroll
    for (int dp = 0; dp < DV / 16; dp++) {
        unsigned b0, b1, b2, b3;
        ldsm4t(vaddr(dp), b0, b1, b2, b3);
        mma16816<E::MMA>(o[2 * dp], pa0, pa1, pa2, pa3, b0, b1);
        mma16816<E::MMA>(o[2 * dp + 1], pa0, pa1, pa2, pa3, b2, b3);
    }
}

// The non-finite guard's scan of V rows nf0..nf1 (none when nf1 < nf0) of a warp stage at
// `vt` (the loaded keys some of the warp's rows do not see; kernels/prefill_repair.cuh).
template <class E, int DV>
__device__ __forceinline__ bool pf_sub_nf(unsigned vt, int nf0, int nf1) {
    return nf0 <= nf1 && pf_nf_rows<E, DV>([vt](int r, int c) { return vt + r * DV * 2 + pf_swz(c, r); }, nf0, nf1);
}

// The selected branch of one warp's rows (`launch.mode & 4`): the warp walks the blocks
// its own positions chose (in the block's union list, ascending) as 16-key sub-tiles,
// each copied by the warp's lanes into the warp's own two stages (cp.async, rows
// swizzled: 16-byte granule c of row r at c ^ (r & 7) within its 128 bytes, so ldmatrix
// is conflict-free) and multiplied with mma.sync; no block barrier, and no row multiplies
// a block its position did not choose. With one position per warp (G = 16) that is
// exactly its n blocks, where the block-wide path multiplies the union of four. Leaves
// the online-softmax state (m raw, l per lane) and o of the lane's two rows; returns
// whether a non-finite scan found one (the rows are then repaired after the step:
// kernels/prefill_repair.cuh).
template <class E, int DK, int DV, class M>
__device__ bool pf_sel_warp(const Params& p, const M& m, unsigned wst, const int* ulist, int ucount, const unsigned* bmask,
                            const int* tpage, int kvh, unsigned wbits, bool selA_ok, bool selB_ok, int poA, int poB, int tA,
                            int tB, int last, float sl2, float& mA, float& mB, float& lA, float& lB, float (&o)[DV / 8][4]) {
    const int lane = threadIdx.x & 31, q4 = lane & 3;
    const int nsub = p.shape.sel_block / 16;  // 16-key sub-tiles per selected block
    const int tpb = p.shape.sel_block / PF_KT;
    const u16* rk = (const u16*)p.paging.raw_k;
    const u16* rv = (const u16*)p.paging.raw_v;
    constexpr unsigned KB = 16 * DK * 2;  // a stage: K rows then V rows
    // The next union entry after u that one of the warp's positions chose (ucount: none).
    auto next_u = [&](int u) {
        for (int b = u + 1; b < ucount; b += 32) {
            const int x = b + lane;
            const unsigned bal = __ballot_sync(0xffffffffu, x < ucount && (bmask[ulist[x]] & wbits) != 0u);
            if (bal) return b + __ffs(bal) - 1;
        }
        return ucount;
    };
    // Sub-tile q of union entry u into stage st: 16 rows of K and of V (rows past the
    // tile's last position zero-filled).
    // Sub-tiles are issued in order, a 64-key tile's four in a row, so the offset in the
    // page (a division) is computed once per tile.
    int toff = 0;
    auto issue = [&](int u, int q, int st) {
        const int k0 = ulist[u] * p.shape.sel_block + q * 16;
        const int page = tpage[u * tpb + q / (PF_KT / 16)];
        if (q % (PF_KT / 16) == 0) toff = k0 % p.paging.page_size;
        const int off = toff + (q % (PF_KT / 16)) * 16;  // the tile's rows lie in one page
        const unsigned kd = pf_warp_stage<DK, DV>(wst, 0, st), vd = kd + KB;
        pf_warp_rows<DK>(kd, rk + row_at(p, page, kvh, off, DK), last - k0);
        pf_warp_rows<DV>(vd, rv + row_at(p, page, kvh, off, DV), last - k0);
    };
    int cu = next_u(-1), cq = 0, st = 0;
    bool bad = false;
    if (cu < ucount) issue(cu, cq, 0);
    cp_commit();
    // At DK > 128 the warp's Q fragments stay in registers across its sub-tiles (12 of the
    // loop's 24 ldmatrix per sub-tile at DK = 192): measured on the H200, paper 192/128 64k
    // 51.4 -> 50.2 ms; at DK = 128 the same change cost 2% (ptxas then spent 18% more
    // instructions on the loop), so there Q is read from shared memory per k step
    // (docs/PREFILL_NOTES.md, variant 22c).
    constexpr bool QREG = DK > 128;
    unsigned qa[QREG ? DK / 16 : 1][4];
    if constexpr (QREG) {
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) m.q_frag(kk, qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3]);
    }
    const int krow = (lane & 7) + (lane >> 4) * 8, kc = (lane >> 3) & 1;
    const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vc = lane >> 4;
    while (cu < ucount) {
        int nq = cq + 1, nu = cu;
        if (nq == nsub) {
            nq = 0;
            nu = next_u(cu);
        }
        if (nu < ucount) issue(nu, nq, st ^ 1);
        cp_commit();
        cp_wait<1>();
        __syncwarp();
        const int j = ulist[cu];
        const unsigned bm = bmask[j];
        const bool sA = selA_ok && ((bm >> poA) & 1u), sB = selB_ok && ((bm >> poB) & 1u);
        const int k0 = j * p.shape.sel_block + cq * 16;
        const unsigned kt = pf_warp_stage<DK, DV>(wst, 0, st), vt = kt + KB;
        // Q K^T as four independent chains (even and odd k steps apart, summed after): the
        // per-warp loop is bound by dependent latency (ncu: "wait" stalls lead), and two
        // chains of DK / 16 dependent products were its longest run.
        float s[2][4], t[2][4];
#pragma unroll
        for (int e = 0; e < 4; e++) s[0][e] = s[1][e] = t[0][e] = t[1][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) {
            unsigned a0, a1, a2, a3, b0, b1, b2, b3;
            if constexpr (QREG) {
                a0 = qa[kk][0], a1 = qa[kk][1], a2 = qa[kk][2], a3 = qa[kk][3];
            } else {
                m.q_frag(kk, a0, a1, a2, a3);
            }
            ldsm4(kt + krow * DK * 2 + pf_swz(kk * 2 + kc, krow), b0, b1, b2, b3);
            float(&acc)[2][4] = kk % 2 ? t : s;
            mma16816<E::MMA>(acc[0], a0, a1, a2, a3, b0, b1);
            mma16816<E::MMA>(acc[1], a0, a1, a2, a3, b2, b3);
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            s[0][e] += t[0][e];
            s[1][e] += t[1][e];
        }
        // Rows of positions that did not choose the block, and keys past a row's
        // position, see nothing of it (masks only where some row of the warp needs them).
        // The loaded keys (up to the tile's last position) from the first that some row
        // does not see are the non-finite guard's to scan.
        int nf0 = 16;
        if (!__all_sync(0xffffffffu, sA && sB && k0 + 15 <= min(tA, tB))) {
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int pos = k0 + nt * 8 + q4 * 2 + e;
                    if (!(sA && pos <= tA)) s[nt][e] = NEG_INF;
                    if (!(sB && pos <= tB)) s[nt][2 + e] = NEG_INF;
                }
            nf0 = __reduce_min_sync(0xffffffffu, sA && sB ? max(min(tA, tB) - k0 + 1, 0) : 0);
        }
        pf_sub_pv<E, DV>(s, sl2, mA, mB, lA, lB, o, [&](int dp) { return vt + vrow * DV * 2 + pf_swz(dp * 2 + vc, vrow); });
        bad |= pf_sub_nf<E, DV>(vt, nf0, min(15, last - k0));
        __syncwarp();  // the stage is refilled by the copy issued in the step after next
        cu = nu;
        cq = nq;
        st ^= 1;
    }
    cp_wait<0>();
    __syncwarp();
    return bad;
}

// The selected branch alone, a warp per position (G = 16: the warp's 16 rows are the
// position's heads; `PrefillPlan::sel_split`, prefill variants 23 and 33b): the warp reads
// its position's selected blocks and queries straight from global memory (Q fragments stay
// in registers), walks the blocks as 16-key sub-tiles through its own two copy stages, and
// adds the gated, normalised result to `out`, which holds the compressed branch and the
// window (`pf_cmp_ws` with `launch.mode & 16`). Blocks several of the tile's positions
// chose are copied once for them (33c), and on sm_90a those all of them chose are multiplied
// by the four warps as one warpgroup (87). No Q tile and no window pipeline: a block
// is its warps' stages (16 KB a warp at 128/128), so three blocks fit a multiprocessor
// where `pf_sw`, with the window's registers and tiles, runs two.
template <class E, int DK, int DV>
__device__ void pf_sel_alone(const Params& p) {
    extern __shared__ __align__(16) unsigned char pf_smem[];
    static_assert(NSA_PF_SEL_WARPS * 16 == PF_KT, "a shared 64-key tile is a 16-key sub-tile per warp");
    // 33c: each position's selection; the blocks two or more positions chose (at most
    // 16 * 4 / 2) with a bit per position that chose it; each warp's count of those.
    __shared__ int lists[NSA_PF_SEL_WARPS][32];
    __shared__ int common[32];
    __shared__ unsigned cmask[32];
    __shared__ int ccount[NSA_PF_SEL_WARPS];
    __shared__ int ccount_wg[NSA_PF_SEL_WARPS];  // of those, the ones every position chose (variant 87)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int g = lane >> 2, q4 = lane & 3;
    const int kvh = blockIdx.y, n = p.shape.sel_count, B = p.shape.sel_block;
    const PrefillTile tl = pf_tile(p, blockIdx.x, nw);
    if (tl.npos == 0) return;
    // A warp past the tile's positions only helps copy the common blocks (below).
    const bool live = warp < tl.npos;
    const int last = tl.pos0 + tl.npos - 1, t = live ? tl.pos0 + warp : last;
    const usize row = (usize)tl.row0 + warp;
    const int hq = p.shape.num_q_heads, hkv = p.shape.num_kv_heads;
    // Rows g and g + 8: heads kvh * 16 + g and + 8; the m16n8k16 A fragments of each k step.
    // A warp past the positions holds zeros (it joins the warpgroup products below).
    unsigned qa[DK / 16][4];
    {
        const u16* q = (const u16*)p.io.q + (row * hq + kvh * 16) * DK;
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) {
            const int c = kk * 16 + q4 * 2;
            qa[kk][0] = live ? *(const unsigned*)(q + g * DK + c) : 0u;
            qa[kk][1] = live ? *(const unsigned*)(q + (g + 8) * DK + c) : 0u;
            qa[kk][2] = live ? *(const unsigned*)(q + g * DK + c + 8) : 0u;
            qa[kk][3] = live ? *(const unsigned*)(q + (g + 8) * DK + c + 8) : 0u;
        }
    }
    // Lane i holds the position's i-th selected block (-1: none) and, with one 64-key tile
    // per block, its page: the copies then wait on no dependent load.
    const int* rtab = (const int*)p.paging.raw_tab + (usize)tl.seq * p.paging.pages_per_seq;
    int myblk = live && lane < n ? pf_sel(p)[(row * hkv + kvh) * n + lane] : -1;
    const bool one_tile = B == PF_KT;
    const int nsub = B / 16;
    const u16* rk = (const u16*)p.paging.raw_k;
    const u16* rv = (const u16*)p.paging.raw_v;
    constexpr unsigned KB = 16 * DK * 2, SB = KB + 16 * DV * 2;  // a stage: K rows then V rows
    const unsigned st0 = smem_u32(pf_base(pf_smem)), wst = pf_warp_stage<DK, DV>(st0, warp, 0);
    // The 16 keys at row `off` of `page` into the warp's stage st; rows past `rmax`
    // zero-filled (masked, and a stale row past the sequence's end may hold a NaN).
    auto copy = [&](int page, int off, int st, int rmax) {
        const unsigned kd = pf_warp_stage<DK, DV>(wst, 0, st);
        pf_warp_rows<DK>(kd, rk + row_at(p, page, kvh, off, DK), rmax);
        pf_warp_rows<DV>(kd + KB, rv + row_at(p, page, kvh, off, DV), rmax);
    };
    float o[DV / 8][4];
#pragma unroll
    for (int d = 0; d < DV / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;
    const float sl2 = p.shape.scale * 1.4426950408889634f;
    const int krow = (lane & 7) + (lane >> 4) * 8, kc = (lane >> 3) & 1;
    const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vc = lane >> 4;
    // The position's 16 heads against the 16 keys k0.. of a stage at kt (K, then V).
    // Its ldmatrix addresses: a row's swizzled granule 2 kk + kc is (the row's base, with
    // granule (kc ^ row) & 7 of its first 128 bytes, + 128 per 8 granules) XOR ((2 kk) & 7)
    // * 16, as the stages are 128-byte aligned: one logic op per load, no address kept per
    // k step (with one kept per step and stage ptxas spilled in the common phase below).
    const unsigned kx = krow * DK * 2 + (((kc ^ krow) & 7) << 4), vx = vrow * DV * 2 + (((vc ^ vrow) & 7) << 4);
    auto attend = [&](unsigned kt, int k0) {
        const unsigned vt = kt + KB;
        // Q K^T as four independent chains (variant 22a).
        float s[2][4], u[2][4];
#pragma unroll
        for (int e = 0; e < 4; e++) s[0][e] = s[1][e] = u[0][e] = u[1][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) {
            unsigned b0, b1, b2, b3;
            ldsm4((kt + kx + (kk >> 2) * 128) ^ (((2 * kk) & 7) << 4), b0, b1, b2, b3);
            float(&acc)[2][4] = kk % 2 ? u : s;
            mma16816<E::MMA>(acc[0], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b0, b1);
            mma16816<E::MMA>(acc[1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b2, b3);
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            s[0][e] += u[0][e];
            s[1][e] += u[1][e];
        }
        if (k0 + 15 > t) {  // the position's own block: keys past it see nothing
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++)
                    if (k0 + nt * 8 + q4 * 2 + e > t) s[nt][e] = s[nt][2 + e] = NEG_INF;
        }
        // Keys past the position are zero-filled rows (its own blocks are copied up to it,
        // and no shared block holds a key past the tile's first position): no non-finite
        // value to guard against.
        pf_sub_pv<E, DV>(s, sl2, mA, mB, lA, lB, o, [&](int dp) { return (vt + vx + (dp >> 2) * 128) ^ (((2 * dp) & 7) << 4); });
    };
    // The block's 64 rows (its four warps' positions, Q in registers) against a whole 64-key
    // tile at kt in `Wgmma`'s layout (K, then V), every key visible to every row: the shared
    // blocks hold no key past the tile's first position. Every warp of the block calls it.
    // By 32-key halves (a whole tile's scores at once made ptxas spill ~64 bytes).
    auto attend_wg = [&](unsigned kt) {
#pragma unroll 1
        for (int h = 0; h < PF_KT; h += 32) {
            float sv[4][4];
#pragma unroll
            for (int e = 0; e < 4; e++) sv[e][0] = sv[e][1] = sv[e][2] = sv[e][3] = 0.f;
            // Keys h.. start h rows into each 64-column chunk of the K tile.
            const u64 kdesc = wg_desc(kt + h * 128, 16, 1024);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < DK / 16; kk++)
                wg_rs_m64n32k16<E::MMA>(&sv[0][0], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3],
                                        wg_desc_at(kdesc, (kk >> 2) * PF_KT * 128 + (kk & 3) * 32), 1);
            wg_commit();
            wg_wait<0>();
            wg_pin(sv);
            pf_online<4, DV>(sv, sl2, mA, mB, lA, lB, o);
            Wgmma<E, DK, DV>::pv(sv, kt + PF_KT * DK * 2, o, h);
            wg_pin(o);
        }
    };

    // The blocks two or more positions of the tile chose (the initial and local blocks, shared
    // by neighbours whatever the scores, and with short sequences many more: 4 random
    // choices of 13 among 64 blocks at 4k share ~36%) leave the warps' own lists: after
    // those each 64-key tile of them is copied once for the block, a 16-key sub-tile per
    // warp, and the positions that chose it read all four (`launch.mode & 64`, prefill
    // variant 33c). In warp order, so the sums' order is fixed. (That phase runs last:
    // before the warps' own loops, with their lists live across it, it made ptxas spill
    // in those loops.)
    const bool share = (p.launch.mode & 64) && one_tile && tl.npos > 1;  // block-uniform
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    const bool sel_wg = (p.launch.mode & MODE_PF_SEL_WG) != 0;
#else
    constexpr bool sel_wg = false;
#endif
    // Common blocks: the sum of the warps' counts (read again after the warps' own loops).
    auto ncommon = [&](const int* cnt) {
        int c = 0;
        for (int w = 0; w < NSA_PF_SEL_WARPS; w++) c += cnt[w];
        return c;
    };
    if (share) {
        lists[warp][lane] = myblk;
        __syncthreads();
        // Which positions chose this lane's block; the lowest of them lists it.
        unsigned who = myblk >= 0 ? 1u << warp : 0u;
        bool first = true;
        for (int w = 0; w < tl.npos; w++) {
            if (w == warp || myblk < 0) continue;
            bool found = false;
            for (int j = 0; j < n; j++) found |= lists[w][j] == myblk;
            if (found) {
                who |= 1u << w;
                first &= w > warp;
            }
        }
        // Shared when at least 2, 3 or all of the tile's positions chose it (the host's
        // `PrefillPlan::sel_share_min`: a shared block idles the warps that did not choose it),
        // and when no key of it lies past the tile's first position: a shared block is
        // copied up to the tile's last position, and a position's rows would multiply the
        // keys past it (probability 0) by their V, where 0 x NaN is NaN (the non-finite
        // policy, kernels/prefill_nonfinite.cuh); the warps' own copies zero-fill them.
        const int smin = (p.launch.mode >> MODE_PF_SEL_SHARE_MIN_SHIFT) & 3;
        const bool multi = __popc(who) >= (smin == 2 ? max(tl.npos, 2) : 2 + smin) && myblk * B + B - 1 <= tl.pos0;
        // With `MODE_PF_SEL_WG` on sm_90a the blocks every position chose are listed first
        // (`nwg` of them) and multiplied by the warpgroup; the rest in warp order after them.
        const bool all = sel_wg && who == (1u << tl.npos) - 1u;
        const unsigned mine = __ballot_sync(0xffffffffu, multi && first), mine_wg = __ballot_sync(0xffffffffu, multi && first && all);
        if (lane == 0) {
            ccount[warp] = __popc(mine);
            ccount_wg[warp] = __popc(mine_wg);
        }
        __syncthreads();
        int base = 0, base_wg = 0, nwg = 0;
        for (int w = 0; w < NSA_PF_SEL_WARPS; w++) {
            base += w < warp ? ccount[w] - ccount_wg[w] : 0;
            base_wg += w < warp ? ccount_wg[w] : 0;
            nwg += ccount_wg[w];
        }
        if (multi && first) {
            const unsigned lm = (1u << lane) - 1u;
            const int slot = all ? base_wg + __popc(mine_wg & lm) : nwg + base + __popc(mine & ~mine_wg & lm);
            common[slot] = myblk;
            cmask[slot] = who;
        }
        if (multi) myblk = -1;  // done in the common phase
        __syncthreads();
    }
    {
        // With one 64-key tile per block, lane i also holds its block's page and first row
        // there (a division per lane here, none per sub-tile in the loop).
        const int mypage = myblk >= 0 && one_tile ? rtab[myblk * B / p.paging.page_size] : 0;
        const int myoff = myblk >= 0 && one_tile ? myblk * B % p.paging.page_size : 0;
        unsigned todo = __ballot_sync(0xffffffffu, myblk >= 0);
        // Sub-tile qq of the block in lane `i`.
        auto issue = [&](int i, int qq, int st) {
            const int blk = __shfl_sync(0xffffffffu, myblk, i);
            const int k0 = blk * B + qq * 16;
            if (one_tile)
                copy(__shfl_sync(0xffffffffu, mypage, i), __shfl_sync(0xffffffffu, myoff, i) + qq * 16, st, t - k0);
            else
                copy(rtab[k0 / p.paging.page_size], k0 % p.paging.page_size, st, t - k0);
        };
        int ci = todo ? __ffs(todo) - 1 : 32, cq = 0, st = 0;
        if (ci < 32) issue(ci, 0, 0);
        cp_commit();
        while (ci < 32) {
            // The block's next sub-tile, unless it starts past the position (its own block's
            // sub-tiles past it would be all masked).
            const int kb = __shfl_sync(0xffffffffu, myblk, ci) * B;
            int nq = cq + 1, ni = ci;
            if (nq == nsub || kb + nq * 16 > t) {
                nq = 0;
                todo &= ~(1u << ci);
                ni = todo ? __ffs(todo) - 1 : 32;
            }
            if (ni < 32) issue(ni, nq, st ^ 1);
            cp_commit();
            cp_wait<1>();
            __syncwarp();
            attend(pf_warp_stage<DK, DV>(wst, 0, st), kb + cq * 16);
            __syncwarp();  // the stage is refilled by the copy issued in the step after next
            ci = ni;
            cq = nq;
            st ^= 1;
        }
        cp_wait<0>();
    }
    if (share) {
        // Every warp (also one past the tile's positions) copies its sub-tile of each
        // common block; the warps' own stages are free again once all have passed here.
        __syncthreads();
        const int nc = ncommon(ccount), nwg = ncommon(ccount_wg);
        // The blocks every position chose (variant 87): multiplied by the block's four warps as
        // one warpgroup, 64 rows = the four positions' 16 heads: one product reads each K and
        // V element from shared memory once, where four warps' ldmatrix read it four times.
        // Each is copied as one 64-key tile in the layout `Wgmma` reads, into one of two
        // slots (the stages' bytes, 4 SB each: its K, then its V), a 16-key row group a warp.
        // Its own loop, before the per-warp one (in one loop with it ptxas spilled ~20 bytes,
        // and the per-warp path lost ~5% at 8k).
        if (nwg > 0) {
            auto slot = [&](int c) { return st0 + (c & 1) * (NSA_PF_SEL_WARPS * SB); };
            auto wg_copy = [&](int c) {
                const int k0 = common[c] * B + warp * 16, page = rtab[k0 / p.paging.page_size], off = k0 % p.paging.page_size;
                pf_warp_rows_wg<DK>(slot(c), warp, rk + row_at(p, page, kvh, off, DK));
                pf_warp_rows_wg<DV>(slot(c) + PF_KT * DK * 2, warp, rv + row_at(p, page, kvh, off, DV));
            };
            wg_copy(0);
            cp_commit();
            for (int c = 0; c < nwg; c++) {
                if (c + 1 < nwg) wg_copy(c + 1);
                cp_commit();
                cp_wait<1>();
                fence_async_smem();  // the copies' generic writes before the products' reads
                __syncthreads();     // every warp's rows of block c are in slot c & 1
                attend_wg(slot(c));
                __syncthreads();  // slot c & 1 is refilled by the copy issued in step c + 1
            }
            cp_wait<0>();
        }
        // The rest, a 16-key sub-tile a warp into the warps' stages; the warps whose
        // positions chose a block read all four.
        auto common_copy = [&](int c, int st) {
            const int k0 = common[c] * B + warp * 16;
            copy(rtab[k0 / p.paging.page_size], k0 % p.paging.page_size, st, last - k0);
        };
        if (nwg < nc) common_copy(nwg, 0);
        cp_commit();
        for (int c = nwg; c < nc; c++) {
            const int st = (c - nwg) & 1;
            if (c + 1 < nc) common_copy(c + 1, st ^ 1);
            cp_commit();
            cp_wait<1>();
            __syncthreads();  // every warp's sub-tile of block c is in its stage st
            if (live && ((cmask[c] >> warp) & 1u)) {
                const int k0 = common[c] * B;
                for (int w = 0; w < NSA_PF_SEL_WARPS; w++) attend(pf_warp_stage<DK, DV>(st0, w, st), k0 + w * 16);
            }
            __syncthreads();  // stage st is refilled by the copy issued in step c + 1
        }
        cp_wait<0>();
    }
    if (!live) return;
    // out += gate_slc / l * o, rows g and g + 8.
    const usize rA = row * hq + kvh * 16 + g, rB = rA + 8;
    float fA, fB;
    pf_gate_over_l(lA, lB, true, true, (const float*)p.io.gates, rA, rB, 1, fA, fB);
    pf_add_gated<E, DV>(p, rA, rB, true, true, fA, fB, o);
}

// Selected blocks + sliding window + gated combine (or, WINDOW_ONLY, the window and the
// combine onto an output that holds the other two branches). Shared memory (from the aligned base):
// Q (Wgmma) | K stages [NS] | V stages [NS] | partial outputs [warps][DV/8][4][32] f32
// (unless M::ACC_REGS) | block masks [nblk] u32 | union list [nblk] i32 |
// page of each visited key tile [nblk * sel_block / 64 + window / 64 + 4] i32.
template <class E, int DK, int DV, int NS, class M, bool WINDOW_ONLY>
__device__ void pf_sw(const Params& p) {
    extern __shared__ __align__(16) unsigned char pf_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int g = lane >> 2, q4 = lane & 3;
    const int kvh = blockIdx.y, G = p.shape.group_size, nblk = pf_nblk(p);
    const PrefillTile tl = pf_tile(p, blockIdx.x, nw * 16 / G);
    if (tl.npos == 0) return;
    unsigned char* base = pf_base(pf_smem);
    const unsigned qs = smem_u32(base);
    const unsigned ks = qs + M::q_bytes(nw * 16);
    const unsigned vs = ks + NS * M::KTILE;
    // With the selected branch per warp (launch.mode & 4) the stages area also holds every
    // warp's two sub-tile stages (the host sizes it the same way).
    const bool per_warp = (p.launch.mode & 4) != 0;
    const unsigned stages = max(NS * (M::KTILE + M::VTILE), per_warp ? nw * pf_warp_stages<DK, DV>() : 0u);
    float* acc = (float*)(base + (ks - qs) + stages);
    unsigned* bmask = (unsigned*)(acc + (M::ACC_REGS ? 0 : nw * (DV / 8) * 4 * 32));
    int* ulist = (int*)(bmask + nblk);
    int* tpage = ulist + nblk;  // page of every key tile the block visits, in order
    __shared__ int ucount;

    PfCopy<NS, M::SW, M::TMA> cp;
    cp.init(p);
    M m;
    m.load_q(p, tl, kvh, qs, M::q_bytes(nw * 16) ? base : base + (ks - qs));

    const int poA = (warp * 16 + g) / G, poB = (warp * 16 + g + 8) / G;
    const bool okA = poA < tl.npos, okB = poB < tl.npos;
    const int tA = tl.pos0 + poA, tB = tl.pos0 + poB;
    const int last = tl.pos0 + tl.npos - 1;
    const float sl2 = p.shape.scale * 1.4426950408889634f;
    // The unit of rows that multiply together (a warp or a warpgroup) and its positions.
    const int PU = M::UNIT / G, unit = warp / (M::UNIT / 16);
    const unsigned ubits = (PU >= 32 ? 0xffffffffu : ((1u << PU) - 1u)) << (unit * PU);
    const int* rtab = (const int*)p.paging.raw_tab + (usize)tl.seq * p.paging.pages_per_seq;
    const u16* rk = (const u16*)p.paging.raw_k;
    const u16* rv = (const u16*)p.paging.raw_v;
    const int tpb = p.shape.sel_block / PF_KT;  // key tiles per selection block

    // The union of the tile's selections, ascending, with a bit per position; none when
    // the selected branch ran block-major (WINDOW_ONLY, `nsa_pf_sww_*`: it is already in
    // `out`; a template parameter, since a runtime test cost the other form 3%).
    const bool window_only = WINDOW_ONLY;
    const int nblk_tile = window_only ? 0 : last / p.shape.sel_block + 1;
    for (int j = threadIdx.x; j < nblk_tile; j += blockDim.x) bmask[j] = 0u;
    __syncthreads();
    for (int e = threadIdx.x; !window_only && e < tl.npos * p.shape.sel_count; e += blockDim.x) {
        int po = e / p.shape.sel_count;
        int j = (pf_sel(p))[((usize)(tl.row0 + po) * p.shape.num_kv_heads + kvh) * p.shape.sel_count + (e - po * p.shape.sel_count)];
        if (j >= 0) atomicOr(&bmask[j], 1u << po);
    }
    __syncthreads();
    if (warp == 0) {
        int base = 0;
        for (int j0 = 0; j0 < nblk_tile; j0 += 32) {
            int j = j0 + lane;
            bool on = j < nblk_tile && bmask[j] != 0u;
            unsigned bal = __ballot_sync(0xffffffffu, on);
            if (on) ulist[base + __popc(bal & ((1u << lane) - 1u))] = j;
            base += __popc(bal);
        }
        if (lane == 0) ucount = base;
    }
    __syncthreads();
    const int nsel_tiles = ucount * tpb;

    float o[DV / 8][4];
#pragma unroll
    for (int d = 0; d < DV / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;

    // Window key tiles: [wlo, last], 64-aligned; none where `pf_cmp_ws` did the window
    // (`launch.mode & 16`: `out` holds it with the compressed part).
    const int wlo = max(0, tl.pos0 - p.shape.window + 1);
    const int wt0 = wlo / PF_KT, wt1 = last / PF_KT;
    const int nwin = (p.launch.mode & 16) ? 0 : wt1 - wt0 + 1;
    const int total = nsel_tiles + nwin;
    auto tile_k0 = [&](int it) {
        return it < nsel_tiles ? ulist[it / tpb] * p.shape.sel_block + (it % tpb) * PF_KT : (wt0 + it - nsel_tiles) * PF_KT;
    };
    for (int it = threadIdx.x; it < total; it += blockDim.x) tpage[it] = rtab[tile_k0(it) / p.paging.page_size];
    __syncthreads();
    auto load = [&](int it, int st) {
        int k0 = tile_k0(it);
        cp.template load<DK, DV>(p, st, ks + st * M::KTILE, rk, 0, vs + st * M::VTILE, rv, 1, tpage[it], kvh, k0, last + 1);
    };
    PfPartial<DV, M::ACC_REGS> part(acc + warp * (DV / 8) * 4 * 32 + lane);
    const float* gates = (const float*)p.io.gates;
    const int hA = (warp * 16 + g) % G, hB = (warp * 16 + g + 8) % G;
    const usize rA = pf_out_row(p, tl, poA, hA, kvh), rB = pf_out_row(p, tl, poB, hB, kvh);

    // Selected branch done: acc = compressed part (already in out) + g_slc * o_slc.
    auto fold_selected = [&]() {
        const typename E::T* out = (const typename E::T*)p.io.out;
        float fA, fB;
        pf_gate_over_l(lA, lB, okA, okB, gates, rA, rB, 1, fA, fB);
#pragma unroll
        for (int d = 0; d < DV / 8; d++) {
            int c = d * 8 + q4 * 2;
            part.at(d, 0) = (okA ? E::ld(out, rA * DV + c) : 0.f) + fA * o[d][0];
            part.at(d, 1) = (okA ? E::ld(out, rA * DV + c + 1) : 0.f) + fA * o[d][1];
            part.at(d, 2) = (okB ? E::ld(out, rB * DV + c) : 0.f) + fB * o[d][2];
            part.at(d, 3) = (okB ? E::ld(out, rB * DV + c + 1) : 0.f) + fB * o[d][3];
            o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
        }
        mA = mB = NEG_INF;
        lA = lB = 0.f;
    };
    // Whether a non-finite scan found one: the tile's rows are repaired after the step
    // (kernels/prefill_repair.cuh).
    bool bad = false;
    // Per warp, the selected blocks first; the block's pipeline then runs the window only.
    if (per_warp) {
        const int PW = 16 / G;
        const unsigned wbits = (PW >= 32 ? 0xffffffffu : ((1u << PW) - 1u)) << (warp * PW);
        if (!window_only)
            bad = pf_sel_warp<E, DK, DV>(p, m, pf_warp_stage<DK, DV>(ks, warp, 0), ulist, ucount, bmask, tpage, kvh, wbits, okA,
                                         okB, poA, poB, tA, tB, last, sl2, mA, mB, lA, lB, o);
        fold_selected();
        __syncthreads();  // every warp is done with its stages: the window's tiles go there
    }
    const int it0 = per_warp ? nsel_tiles : 0;
    for (int st = 0; st < NS - 1; st++) {
        if (it0 + st < total) load(it0 + st, st);
        cp.commit();
    }
    for (int it = it0; it < total; it++) {
        if (it + NS - 1 < total) load(it + NS - 1, (it - it0 + NS - 1) % NS);
        cp.commit();
        if (it == nsel_tiles && !per_warp) fold_selected();
        cp.template wait<DV>((it - it0) % NS, base + (vs - qs) + ((it - it0) % NS) * M::VTILE, tile_k0(it), last + 1);
        fence_async_smem();
        __syncthreads();
        const int k0 = tile_k0(it);
        bool work;
        unsigned bm = 0u;
        if (it < nsel_tiles) {
            bm = bmask[k0 / p.shape.sel_block];
            work = (bm & ubits) != 0u;
        } else {
            // Rows of this unit see keys [t - w + 1, t]: skip tiles outside every row's band.
            int tmin = tl.pos0 + unit * PU, tmax = min(tl.pos0 + unit * PU + PU - 1, last);
            work = unit * PU < tl.npos && k0 <= tmax && k0 + PF_KT - 1 >= tmin - p.shape.window + 1;
        }
        if (work) {
            // The loaded keys (up to the tile's last position) some of the unit's rows do
            // not see: a block some of its positions did not choose, all of it; else the
            // keys past its first position, and in the window those below its last
            // position's band. Where one holds a non-finite value the tile's rows are
            // repaired after the step (kernels/prefill_repair.cuh).
            {
                const int umin = tl.pos0 + unit * PU, umax = min(umin + PU - 1, last), kl = min(PF_KT - 1, last - k0);
                const unsigned vt = vs + ((it - it0) % NS) * M::VTILE;
                const unsigned valid = ubits & (tl.npos >= 32 ? 0xffffffffu : (1u << tl.npos) - 1u);
                if (it < nsel_tiles && (bm & valid) != valid)
                    bad |= pf_tile_nf<E, DV, M>(vt, 0, kl);
                else  // a selected block: no lower edge
                    bad |= pf_band_tile_nf<E, DV, M>(vt, k0, umin, umax, it < nsel_tiles ? PF_NO_BAND : p.shape.window, last);
            }
            float s[8][4];
            m.qk(ks + ((it - it0) % NS) * M::KTILE, s);
            const bool selA = it < nsel_tiles ? okA && ((bm >> poA) & 1u) : okA;
            const bool selB = it < nsel_tiles ? okB && ((bm >> poB) & 1u) : okB;
            const int loA = it < nsel_tiles ? 0 : tA - p.shape.window + 1, loB = it < nsel_tiles ? 0 : tB - p.shape.window + 1;
            const bool fullA = selA && k0 >= loA && k0 + PF_KT - 1 <= tA;
            const bool fullB = selB && k0 >= loB && k0 + PF_KT - 1 <= tB;
            if (!__any_sync(0xffffffffu, selA || selB)) {
                // No row of this warp chose the block (a unit of 64 rows multiplies it for
                // another warp's positions): P = 0 leaves m, l and o as they are, without
                // the masks and the softmax.
#pragma unroll
                for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            } else {
                if (!(fullA && fullB)) {  // masks only on tiles a row sees in part
#pragma unroll
                    for (int n = 0; n < 8; n++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            int k = k0 + n * 8 + q4 * 2 + e;
                            if (!(selA && k <= tA && k >= loA)) s[n][e] = NEG_INF;
                            if (!(selB && k <= tB && k >= loB)) s[n][2 + e] = NEG_INF;
                        }
                }
                pf_online<8, DV>(s, sl2, mA, mB, lA, lB, o);
            }
            m.pv(s, vs + ((it - it0) % NS) * M::VTILE, o);
        }
        __syncthreads();
    }
    cp_wait<0>();
    if (bad) pf_fix_mark(p, tl.row0, tl.npos, kvh);  // warp-uniform: the scans' answers
    // The window holds the position itself (nwin >= 1), so the selected part was folded
    // into acc at it == nsel_tiles; or it was done before (nwin = 0), which the host asks
    // only with the selected branch per warp (folded after `pf_sel_warp`).
    typename E::T* out = (typename E::T*)p.io.out;
    float fA, fB;
    pf_gate_over_l(lA, lB, okA, okB, gates, rA, rB, 2, fA, fB);
#pragma unroll
    for (int d = 0; d < DV / 8; d++) {
        int c = d * 8 + q4 * 2;
        if (okA) {
            E::st(out, rA * DV + c, part.at(d, 0) + fA * o[d][0]);
            E::st(out, rA * DV + c + 1, part.at(d, 1) + fA * o[d][1]);
        }
        if (okB) {
            E::st(out, rB * DV + c, part.at(d, 2) + fB * o[d][2]);
            E::st(out, rB * DV + c + 1, part.at(d, 3) + fB * o[d][3]);
        }
    }
}

#endif  // NSA_PREFILL_CUH
