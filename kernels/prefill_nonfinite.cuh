// The prefill kernels' scans for non-finite values in V (the engine's non-finite policy: a
// NaN or infinity reaches exactly the outputs the reference computes it into, no others).
//
// A K/V tile in shared memory serves several rows, and a row that must not see one of its
// keys gets probability 0 there; the tensor-core product still multiplies that 0 by the
// key's V row, and 0 x NaN and 0 x inf are NaN: a non-finite V element would reach rows
// that never see its key. Most copies zero-fill a tile's rows past its last visible key
// (`pf_cmp_ws`'s tensor-map tiles do not: its scans cover those rows too), but not the
// keys that some of a tile's rows see and others do not: the diagonal's keys past the
// first position, the window's lower edge, the compressed tokens completed among the
// tile's positions, a selected block that some of a warp's positions did not choose. So on
// a tile that masks, those V rows are scanned (`pf_nf_rows`: 16-byte loads of 256-byte
// rows), and where one holds a non-finite element the kernel finishes the tile as usual and
// marks the tile's rows for the exact repair after the step (kernels/prefill_repair.cuh).
// The marks need no agreement before the products, so `pf_cmp_ws` splits each tile's scan
// among its consumer warps (each warp marks what its share found); `pf_cmp` and `pf_sw`
// scan per unit of rows that multiply together; `pfb_attn` each thread its own copies,
// only for items whose block holds an entry's position; `pf_sel` shares no block with such
// keys instead. (Until the thirty-first session the unit took such a tile's P V in scalar
// inside the tile loop, every consumer warp scanning the whole frontier to agree on it: the
// scans, not the scalar code, cost the prefill 3-11% on the H200: docs/PREFILL_NOTES.md.)
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
// Warp-uniform (every lane returns the warp's answer). With `parts` > 1 the calling warp
// scans only share `part` of the granules (32 of every 32 x parts): warps that split a
// tile's scan so answer only for their shares (`pf_cmp_ws`, whose marks need no agreement).
template <class E, int DV, class Gran>
__device__ __forceinline__ bool pf_nf_rows(Gran gran, int r0, int r1, int part = 0, int parts = 1) {
    constexpr int C = DV / 8;
    static_assert((C & (C - 1)) == 0, "a power-of-two number of granules per row");
    bool bad = false;
#pragma unroll 1
    for (int e = part * 32 + (threadIdx.x & 31); e < (r1 - r0 + 1) * C; e += parts * 32) {
        bad |= pf_nf_granule<E>(lds128(gran(r0 + e / C, e % C)));
    }
    return __any_sync(0xffffffffu, bad);
}

// A unit's scan of a 64-key tile of MMA policy M (`v_gran`: its V layout) whose V is at
// `vt`: tile rows a0..a1 and b0..b1 (each none when empty), the loaded keys some of the
// unit's rows do not see; share `part` of `parts` as `pf_nf_rows`.
template <class E, int DV, class M>
__device__ __forceinline__ bool pf_tile_nf(unsigned vt, int a0, int a1, int b0 = 0, int b1 = -1, int part = 0, int parts = 1) {
    auto gran = [vt](int r, int c) { return M::v_gran(vt, r, c); };
    return pf_nf_rows<E, DV>(gran, a0, a1, part, parts) || pf_nf_rows<E, DV>(gran, b0, b1, part, parts);
}

// `pf_band_tile_nf`'s band for a tile with no lower edge (a selected block's).
#define PF_NO_BAND 0x40000000

// A banded tile's scan (rows at positions first..hi, each seeing the w keys up to itself):
// of the 64-key tile at k0 (V at vt), the keys below the last row's band (<= hi - w) and
// those past the first row up to `kend`: the last row the copy did not zero-fill
// (`pf_cmp_window`, `pf_sw`).
template <class E, int DV, class M>
__device__ __forceinline__ bool pf_band_tile_nf(unsigned vt, int k0, int first, int hi, int w, int kend, int part = 0, int parts = 1) {
    return (k0 <= hi - w || k0 + PF_KT - 1 > first) &&
           pf_tile_nf<E, DV, M>(vt, 0, min(PF_KT - 1, hi - w - k0), max(first + 1 - k0, 0), min(PF_KT - 1, kend - k0), part, parts);
}

// Pass 2 of the compressed branch (`pf_cmp`, `pf_cmp_ws`): whether the compressed tile at
// k0 (V at vt) has the unit's rows repaired: the tile's loaded rows below `nc_max` (the tile's
// count where the copies zero-filled the rest, else k0 + 64) from `cu`, the count of the
// unit's first position (the fewest: counts grow with the position), are seen by some of
// its rows only, or (past the count) by none.
template <class E, int DV, class M>
__device__ __forceinline__ bool pf_cmp_tile_nf(unsigned vt, int k0, int cu, int nc_max, int part = 0, int parts = 1) {
    return k0 + PF_KT > cu && pf_tile_nf<E, DV, M>(vt, max(cu - k0, 0), min(PF_KT - 1, nc_max - 1 - k0), 0, -1, part, parts);
}

// The compressed-token count of the first position of warp `warp`'s unit of rows (M::UNIT),
// `pf_cmp_tile_nf`'s `cu`; a unit past the tile's positions sees nothing (and stores nothing).
template <class M>
__device__ __forceinline__ int pf_unit_cmp_count(const Params& p, const PrefillTile& tl, int warp) {
    const int u0 = (warp / (M::UNIT / 16)) * (M::UNIT / p.shape.group_size);
    return u0 < tl.npos ? num_cmp(p, tl.pos0 + u0 + 1) : 0x7fffffff;
}

#endif  // NSA_PREFILL_NONFINITE_CUH
