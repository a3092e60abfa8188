// The prefill kernels' guard for non-finite values in V (the engine's non-finite policy: a
// NaN or infinity reaches exactly the outputs the reference computes it into, no others).
//
// A K/V tile in shared memory serves several rows, and a row that must not see one of its
// keys gets probability 0 there; the tensor-core product still multiplies that 0 by the
// key's V row, and 0 x NaN and 0 x inf are NaN: a non-finite V element would reach rows
// that never see its key. Most copies zero-fill a tile's rows past its last visible key
// (`pf_cmp_ws`'s tensor-map tiles do not: its scans cover those rows too), but not the
// keys that some of a tile's rows see and others do not: the diagonal's keys
// past the first position, the window's lower edge, the compressed tokens completed among
// the tile's positions, a selected block that some of a warp's positions did not choose.
// So on a tile that masks, before its P V, those V rows are scanned (`pf_nf_rows`: a
// 16-byte load per lane and row of 256 bytes; `pf_cmp_ws` scans the tile's frontier in
// every consumer warp, `pf_cmp` and `pf_sw` each unit of rows that multiply together, a
// warp with mma.sync or a warpgroup with wgmma, `pfb_attn` each thread its own copies into
// a row mask; `pf_sel` shares no block with such keys instead), and where one holds a
// non-finite element the unit takes that tile's P V in scalar (`pf_pv_exact`), each
// product only where the row sees the key, which is what the reference computes (p x NaN
// = NaN, p x inf = inf, and NaN again where a row that sees the key has p = 0). Every warp
// that decides for a unit scans the same rows of the same tile, so the unit agrees
// without a barrier. Measured on the H200 the guard costs the prefill 3-11%, mostly from
// the scalar path's code in the tile loops, not the scans (docs/PREFILL_NOTES.md,
// twenty-ninth session).
#ifndef NSA_PREFILL_NONFINITE_CUH
#define NSA_PREFILL_NONFINITE_CUH

#include "common.cuh"
#include "prefill_parts.cuh"  // PF_KT
#include "ptx.cuh"

// Whether a word of two 16-bit elements holds a NaN or an infinity (exponent all ones).
template <class E>
__device__ __forceinline__ bool pf_nf_word(unsigned w) {
    constexpr unsigned X = E::MMA == 1 ? 0x7f80u : 0x7c00u;  // bf16 : f16
    return (w & X) == X || ((w >> 16) & X) == X;
}

// Whether a 16-byte granule of eight 16-bit elements holds a NaN or an infinity.
template <class E>
__device__ __forceinline__ bool pf_nf_granule(uint4 x) {
    return pf_nf_word<E>(x.x) || pf_nf_word<E>(x.y) || pf_nf_word<E>(x.z) || pf_nf_word<E>(x.w);
}

// Whether rows r0..r1 (inclusive; none when r1 < r0) of a V tile of DV columns hold a
// non-finite element; `gran(r, c)` is the shared address of 16-byte granule c of row r.
// Warp-uniform (every lane returns the warp's answer).
template <class E, int DV, class Gran>
__device__ __forceinline__ bool pf_nf_rows(Gran gran, int r0, int r1) {
    constexpr int C = DV / 8;
    static_assert((C & (C - 1)) == 0, "a power-of-two number of granules per row");
    bool bad = false;
#pragma unroll 1
    for (int e = threadIdx.x & 31; e < (r1 - r0 + 1) * C; e += 32) {
        bad |= pf_nf_granule<E>(lds128(gran(r0 + e / C, e % C)));
    }
    return __any_sync(0xffffffffu, bad);
}

// acc += p x v, in program order (see `pf_pv_exact`).
__device__ __forceinline__ void pf_fma(float p, float v, float& acc) {
    asm volatile("fma.rn.f32 %0, %1, %2, %0;" : "+f"(acc) : "f"(p), "f"(v));
}

// `pf_pv_exact`'s step for key j: o += p x V[j] for the lane's rows A (p = pa; where `sa`,
// the row sees the key) and B. A row that does not see the key adds 0 x 0 (its p is 0:
// masked), never 0 x V. The loads and products are volatile, so they stay in order: a few
// registers beside o and P, where the kernels' loops have none to spare (unordered, ptxas
// hoisted the loads and spilled).
template <class E, int DV, class El>
__device__ __forceinline__ void pf_pv_key(float pa, float pb, bool sa, bool sb, int j, El el, float (&o)[DV / 8][4]) {
    const int q4 = threadIdx.x & 3;
    // A key neither row sees is read as key 0 (seen by some row of every tile there is),
    // not as itself: it may be a row past the tile's last key, which a copy zero-filled or
    // left as the page holds it; when another warp zeroed such rows behind an mbarrier,
    // compute-sanitizer's race check reported these loads (it takes no mbarrier as
    // ordering). (A branch around the loads instead made ptxas spill in the tile loops.)
    const int jr = sa || sb ? j : 0;
#pragma unroll
    for (int d = 0; d < DV / 8; d++) {
        float v0, v1;
        E::upk(lds32(el(jr, d * 8 + q4 * 2)), v0, v1);
        pf_fma(pa, sa ? v0 : 0.f, o[d][0]);
        pf_fma(pa, sa ? v1 : 0.f, o[d][1]);
        pf_fma(pb, sb ? v0 : 0.f, o[d][2]);
        pf_fma(pb, sb ? v1 : 0.f, o[d][3]);
    }
}

// The callers' lambdas capture by value: a by-reference capture puts the captured locals
// in local memory, and the kernels' loops spilled.
// O += P V for one tile of NT * 8 keys in scalar, each product only where the row sees the
// key: `sees(b, j)` says whether the lane's row A (b = 0: fragment row g) or B (b = 1: row
// g + 8) sees the tile's key j; P is in the S accumulator layout (f32: not rounded as the
// MMA's operands are); `el(j, c)` is the shared address of V elements c and c + 1 of key
// j (c even). The rare path of `pf_nf_rows`: a shuffle pair and DV / 8 loads per key.
template <class E, int NT, int DV, class El, class Sees>
__device__ __forceinline__ void pf_pv_exact(const float (&s)[NT][4], El el, Sees sees, float (&o)[DV / 8][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2;
    // Key j's p of row g is the S fragment's element [j / 8][j & 1] in lane 4 g + (j & 7) / 2
    // (row g + 8: [j / 8][2 + (j & 1)]), picked by compares with the unrolled n (no run-time
    // index into the fragment).
#pragma unroll 1
    for (int j = 0; j < NT * 8; j++) {
        {
            const int n = j >> 3, src = (g << 2) | ((j & 7) >> 1);
            const bool odd = j & 1;
            float xa = 0.f, xb = 0.f;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                xa = t == n ? (odd ? s[t][1] : s[t][0]) : xa;
                xb = t == n ? (odd ? s[t][3] : s[t][2]) : xb;
            }
            const float pa = __shfl_sync(0xffffffffu, xa, src), pb = __shfl_sync(0xffffffffu, xb, src);
            pf_pv_key<E, DV>(pa, pb, sees(0, j), sees(1, j), j, el, o);
        }
    }
}

// `pf_pv_exact` with P in shared memory (the storage type, rounded as the MMA's operands
// are; [16][NK] at `P`: the warp's 16 rows), for a caller whose S fragment would cost
// registers it has not. `pf_p_to_smem` writes it.
template <class E, int NK, int DV, class El, class Sees>
__device__ __forceinline__ void pf_pv_exact_smem(const u16* P, El el, Sees sees, float (&o)[DV / 8][4]) {
    const int g = (threadIdx.x & 31) >> 2;
#pragma unroll 1
    for (int j = 0; j < NK; j++)
        pf_pv_key<E, DV>(E::cvt(P[g * NK + j]), E::cvt(P[(g + 8) * NK + j]), sees(0, j), sees(1, j), j, el, o);
}

// The S fragment s of NT * 8 keys into `P` as `pf_pv_exact_smem` reads it (then __syncwarp).
template <class E, int NT>
__device__ __forceinline__ void pf_p_to_smem(const float (&s)[NT][4], u16* P) {
    const int g = (threadIdx.x & 31) >> 2, q4 = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        *(unsigned*)(P + g * NT * 8 + n * 8 + q4 * 2) = pack2<E::MMA>(s[n][0], s[n][1]);
        *(unsigned*)(P + (g + 8) * NT * 8 + n * 8 + q4 * 2) = pack2<E::MMA>(s[n][2], s[n][3]);
    }
}

// A unit's scan of a 64-key tile of MMA policy M (`v_gran`: its V layout) whose V is at
// `vt`: tile rows a0..a1 and b0..b1 (each none when empty), the loaded keys some of the
// unit's rows do not see.
template <class E, int DV, class M>
__device__ __forceinline__ bool pf_tile_nf(unsigned vt, int a0, int a1, int b0 = 0, int b1 = -1) {
    auto gran = [vt](int r, int c) { return M::v_gran(vt, r, c); };
    return pf_nf_rows<E, DV>(gran, a0, a1) || pf_nf_rows<E, DV>(gran, b0, b1);
}

// `pf_band_tile_nf`'s band for a tile with no lower edge (a selected block's).
#define PF_NO_BAND 0x40000000

// A banded tile's scan (rows at positions first..hi, each seeing the w keys up to itself):
// of the 64-key tile at k0 (V at vt), the keys below the last row's band (<= hi - w) and
// those past the first row up to `kend`: the last row the copy did not zero-fill
// (`pf_cmp_window`, `pf_sw`).
template <class E, int DV, class M>
__device__ __forceinline__ bool pf_band_tile_nf(unsigned vt, int k0, int first, int hi, int w, int kend) {
    return (k0 <= hi - w || k0 + PF_KT - 1 > first) &&
           pf_tile_nf<E, DV, M>(vt, 0, min(PF_KT - 1, hi - w - k0), max(first + 1 - k0, 0), min(PF_KT - 1, kend - k0));
}

// `pf_pv_exact` on a 64-key tile of MMA policy M whose V is at `vt`.
template <class E, int DV, class M, class Sees>
__device__ __forceinline__ void pf_tile_pv_exact(const float (&s)[8][4], unsigned vt, Sees sees, float (&o)[DV / 8][4]) {
    pf_pv_exact<E, 8, DV>(s, [vt](int j, int c) { return M::v_gran(vt, j, c >> 3) + (c & 7) * 2; }, sees, o);
}

// Pass 2 of the compressed branch (`pf_cmp`, `pf_cmp_ws`): whether the unit must take the
// compressed tile at k0 (V at vt) exactly: the tile's loaded rows below `nc_max` (the tile's
// count where the copies zero-filled the rest, else k0 + 64) from `cu`, the count of the
// unit's first position (the fewest: counts grow with the position), are seen by some of
// its rows only, or (past the count) by none.
template <class E, int DV, class M>
__device__ __forceinline__ bool pf_cmp_tile_nf(unsigned vt, int k0, int cu, int nc_max) {
    return k0 + PF_KT > cu && pf_tile_nf<E, DV, M>(vt, max(cu - k0, 0), min(PF_KT - 1, nc_max - 1 - k0));
}

// The compressed-token count of the first position of warp `warp`'s unit of rows (M::UNIT),
// `pf_cmp_tile_nf`'s `cu`; a unit past the tile's positions sees nothing (and stores nothing).
template <class M>
__device__ __forceinline__ int pf_unit_cmp_count(const Params& p, const PrefillTile& tl, int warp) {
    const int u0 = (warp / (M::UNIT / 16)) * (M::UNIT / p.shape.group_size);
    return u0 < tl.npos ? num_cmp(p, tl.pos0 + u0 + 1) : 0x7fffffff;
}

#endif  // NSA_PREFILL_NONFINITE_CUH
