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
//            logit is written to memory. Then a warp-parallel top-n per position, with the
//            forced blocks, writes the selection (ascending, -1 padded) and the gated
//            compressed output g_cmp * o_cmp to `out`.
//   pf_sw    selected blocks and sliding window: the union of the tile's positions'
//            selected blocks is loaded once, block by block; a warp computes on a block only
//            where one of its positions chose it (others' rows masked). Then the window as
//            a banded causal attention over the tile's key range. The gated combine is
//            fused: out = out (compressed part) + g_slc * o_slc + g_win * o_win.
//
// Key tiles are NSA_PF_KEYS = 64 keys, one contiguous run of rows of one page (the host
// requires page_size and sel_block to be multiples of it). Rows of a tile past the last
// visible key are zero-filled by the copy, so stale pool rows never meet a zero
// probability (0 * NaN).
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

#define PF_KT NSA_PF_KEYS

// A block's tile: up to `tp` consecutive positions of one step sequence.
struct PrefillTile {
    int seq;   // index of the sequence in the step (its page tables)
    int row0;  // first row of the tile in the step's q/out arrays
    int pos0;  // position of that row
    int npos;  // positions in the tile (0: past the step's last tile)
};

// Tile `x` of the step: sequences in plan order, each cut into ceil(tokens / tp) tiles
// (the host sizes the grid with the same count, `CudaBackend::prefill_tiles`).
__device__ __forceinline__ PrefillTile pf_tile(const Params& p, int x, int tp) {
    const PlanSeq* seqs = (const PlanSeq*)p.step.seqs;
    const int n = ((const StepHeader*)p.step.header)->seqs;
    PrefillTile t = {0, 0, 0, 0};
    for (int i = 0; i < n; i++) {
        PlanSeq s = seqs[i];
        int tok = s.new_len - s.old_len, nt = (tok + tp - 1) / tp;
        if (x < nt) {
            t.seq = i;
            t.row0 = s.row + x * tp;
            t.pos0 = s.old_len + x * tp;
            t.npos = min(tp, tok - x * tp);
            return t;
        }
        x -= nt;
    }
    return t;
}

// Score slots per position in shared memory: every selection block of a longest sequence.
__device__ __forceinline__ int pf_nblk(const Params& p) {
    return p.paging.pages_per_seq * p.paging.page_size / p.shape.sel_block;
}

// Where the selection goes: the caller's `selected` when given, else the workspace's
// per-row buffer ([rows, HKV, sel_count] i32 either way).
__device__ __forceinline__ int* pf_sel(const Params& p) {
    return (int*)(p.io.selected ? p.io.selected : p.ws.pf_sel);
}

// 2^x on the SFU (ex2.approx, flush-to-zero; 2^-inf = 0). The kernels keep softmax state
// in the log2 domain (logit * scale * log2(e)) so that each probability is one FFMA and one
// EX2.
__device__ __forceinline__ float ex2f(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Copies keys [k0, k0 + 64) of a paged pool (rows of D 16-bit elements; `page` holds them,
// looked up ahead of time: a dependent page-table load here would stall every copy) with
// cp.async into a tile at shared address `dst`: swizzled (SW) or with rows padded to D + 8
// elements. Rows at or past `kend` are zero-filled. All threads of the block call it.
template <int D, bool SW>
__device__ __forceinline__ void pf_load_tile(const Params& p, unsigned dst, const u16* pool, int page,
                                             int kvh, int k0, int kend) {
    constexpr int CPR = D / 8;
    const u16* src = pool + row_at(p, page, kvh, k0 % p.paging.page_size, D);
    const bool full = k0 + PF_KT <= kend;
    auto one = [&](int r, int c) {
        bool ok = full || k0 + r < kend;
        unsigned off = SW ? sw128_off(r, c, PF_KT) : (unsigned)(r * (D + 8) + c * 8) * 2u;
        cp_async16(dst + off, ok ? src + r * D + c * 8 : src, ok ? 16 : 0);
    };
    if (blockDim.x % CPR == 0) {
        // Each thread keeps one column of granules: no division per granule.
        const int c = threadIdx.x % CPR, step = blockDim.x / CPR;
        for (int r = threadIdx.x / CPR; r < PF_KT; r += step) one(r, c);
    } else {
        for (int e = threadIdx.x; e < PF_KT * CPR; e += blockDim.x) one(e / CPR, e % CPR);
    }
}

// Row r of the block is position r / G of the tile, head r % G of the group: the 16-byte
// granule c of that row of q, or zeros past the tile.
__device__ __forceinline__ uint4 pf_q_granule(const Params& p, const PrefillTile& tl, int kvh, int r, int c,
                                              int dk) {
    const int G = p.shape.group_size;
    int po = r / G, h = r - po * G;
    if (po >= tl.npos) return make_uint4(0, 0, 0, 0);
    return *(const uint4*)((const u16*)p.io.q + ((usize)(tl.row0 + po) * p.shape.num_q_heads + kvh * G + h) * dk + c * 8);
}

// mma.sync m16n8k16 (sm_80+): Q in registers, K/V fragments by ldmatrix from padded tiles.
template <class E, int DK, int DV>
struct MmaSync {
    static constexpr int UNIT = 16;
    static constexpr bool SW = false;
    static constexpr bool ACC_REGS = false;  // no registers to spare: the partial output in shared memory
    static constexpr unsigned KTILE = PF_KT * (DK + 8) * 2, VTILE = PF_KT * (DV + 8) * 2;
    static __host__ __device__ constexpr unsigned q_bytes(int) { return 0; }  // Q staged through the K/V stages
    unsigned qf[DK / 16][4];

    // `q_at`: the block's Q region (unused), `stage`: the K/V stages (free at this point).
    __device__ void load_q(const Params& p, const PrefillTile& tl, int kvh, unsigned, unsigned char* stage) {
        constexpr int CPR = DK / 8, S = DK + 8;
        const int rows = blockDim.x / 2;
        u16* st = (u16*)stage;
        for (int e = threadIdx.x; e < rows * CPR; e += blockDim.x) {
            int r = e / CPR, c = e - r * CPR;
            *(uint4*)(st + r * S + c * 8) = pf_q_granule(p, tl, kvh, r, c, DK);
        }
        __syncthreads();
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const unsigned qa = smem_u32(st + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8);
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) ldsm4(qa + kk * 32, qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
        __syncthreads();
    }

    // S = Q K^T for one 64-key tile at shared address `kt` (8 n-tiles of 8 keys), unscaled.
    __device__ void qk(unsigned kt, float (&s)[8][4]) {
        constexpr int S = DK + 8;
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        const int krow = (lane & 7) + (lane >> 4) * 8, kc = (lane >> 3) & 1;
        const unsigned ka = kt + (krow * S + kc * 8) * 2;
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) {
#pragma unroll
            for (int np = 0; np < 4; np++) {
                unsigned b0, b1, b2, b3;
                ldsm4(ka + (np * 16 * S + kk * 16) * 2, b0, b1, b2, b3);
                mma16816<E::MMA>(s[2 * np], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], b0, b1);
                mma16816<E::MMA>(s[2 * np + 1], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], b2, b3);
            }
        }
    }

    // O += P V for one 64-key tile at shared address `vt`; P in the S accumulator layout.
    __device__ void pv(const float (&pr)[8][4], unsigned vt, float (&o)[DV / 8][4]) {
        constexpr int S = DV + 8;
        const int lane = threadIdx.x & 31;
        const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vc = lane >> 4;
        const unsigned va = vt + (vrow * S + vc * 8) * 2;
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            unsigned a0 = pack2<E::MMA>(pr[2 * ks][0], pr[2 * ks][1]);
            unsigned a1 = pack2<E::MMA>(pr[2 * ks][2], pr[2 * ks][3]);
            unsigned a2 = pack2<E::MMA>(pr[2 * ks + 1][0], pr[2 * ks + 1][1]);
            unsigned a3 = pack2<E::MMA>(pr[2 * ks + 1][2], pr[2 * ks + 1][3]);
#pragma unroll
            for (int dp = 0; dp < DV / 16; dp++) {
                unsigned b0, b1, b2, b3;
                ldsm4t(va + (ks * 16 * S + dp * 16) * 2, b0, b1, b2, b3);
                mma16816<E::MMA>(o[2 * dp], a0, a1, a2, a3, b0, b1);
                mma16816<E::MMA>(o[2 * dp + 1], a0, a1, a2, a3, b2, b3);
            }
        }
    }
};

// wgmma (sm_90a): a warpgroup of 64 rows multiplies Q (shared, swizzled, resident for the
// whole block) by K tiles, and P (registers) by V tiles, both read by the tensor cores
// straight from swizzled shared memory.
template <class E, int DK, int DV>
struct Wgmma {
    static constexpr int UNIT = 64;
    static constexpr bool SW = true;
    static constexpr bool ACC_REGS = true;
    static constexpr unsigned KTILE = PF_KT * DK * 2, VTILE = PF_KT * DV * 2;
    static __host__ __device__ constexpr unsigned q_bytes(int rows) { return (unsigned)rows * DK * 2; }
    unsigned qaddr;
    int rows;

    __device__ void load_q(const Params& p, const PrefillTile& tl, int kvh, unsigned q_at, unsigned char* q_ptr) {
        constexpr int CPR = DK / 8;
        rows = blockDim.x / 2;
        qaddr = q_at;
        for (int e = threadIdx.x; e < rows * CPR; e += blockDim.x) {
            int r = e / CPR, c = e - r * CPR;
            *(uint4*)(q_ptr + sw128_off(r, c, rows)) = pf_q_granule(p, tl, kvh, r, c, DK);
        }
        fence_async_smem();
        __syncthreads();
    }

    __device__ void qk(unsigned kt, float (&s)[8][4]) {
        const int wg = threadIdx.x >> 7;
        const unsigned qa = qaddr + wg * 64 * 128;
#pragma unroll
        for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) {
            u64 da = wg_desc(qa + (kk >> 2) * rows * 128 + (kk & 3) * 32, 16, 1024);
            u64 db = wg_desc(kt + (kk >> 2) * PF_KT * 128 + (kk & 3) * 32, 16, 1024);
            wg_ss_m64n64k16<E::MMA>(&s[0][0], da, db, kk > 0);
        }
        wg_commit();
        wg_wait<0>();
    }

    __device__ void pv(const float (&pr)[8][4], unsigned vt, float (&o)[DV / 8][4]) {
        unsigned a[4][4];
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            a[ks][0] = pack2<E::MMA>(pr[2 * ks][0], pr[2 * ks][1]);
            a[ks][1] = pack2<E::MMA>(pr[2 * ks][2], pr[2 * ks][3]);
            a[ks][2] = pack2<E::MMA>(pr[2 * ks + 1][0], pr[2 * ks + 1][1]);
            a[ks][3] = pack2<E::MMA>(pr[2 * ks + 1][2], pr[2 * ks + 1][3]);
        }
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            // V is MN-major: 8-key groups 1024 bytes apart, 64-column chunks a tile apart.
            u64 db = wg_desc(vt + ks * 16 * 128, PF_KT * 128, 1024);
            if constexpr (DV == 128)
                wg_rs_m64n128k16_tb<E::MMA>(&o[0][0], a[ks][0], a[ks][1], a[ks][2], a[ks][3], db);
            else
                wg_rs_m64n64k16_tb<E::MMA>(&o[0][0], a[ks][0], a[ks][1], a[ks][2], a[ks][3], db);
        }
        wg_commit();
        wg_wait<0>();
    }
};

// The selected branch's gated partial output of a lane's fragments, kept across the window
// loop: in registers, or in shared memory (lane-private slots, so no barrier) where the
// registers are taken.
template <int DV, bool REGS>
struct PfPartial {
    float v[DV / 8][4];
    __device__ PfPartial(float*) {}
    __device__ __forceinline__ float& at(int d, int e) { return v[d][e]; }
};
template <int DV>
struct PfPartial<DV, false> {
    float* p;
    __device__ PfPartial(float* mine) : p(mine) {}
    __device__ __forceinline__ float& at(int d, int e) { return p[(d * 4 + e) * 32]; }
};

// Shared memory of a block: [Q (Wgmma)] [K stages] [V stages] [extras], from a 1024-byte
// aligned base (the swizzled tiles need it; the host adds 1024 bytes of slack).
__device__ __forceinline__ unsigned char* pf_base(unsigned char* raw) {
    unsigned a = smem_u32(raw);
    return raw + (((a + 1023u) & ~1023u) - a);
}

// Online-softmax update of one tile for the lane's two rows (A = row g, B = row g + 8):
// s holds raw logits, masked ones -inf; the maxima mA, mB are raw too, sl2 = scale *
// log2(e). Turns s into probabilities relative to the new max and rescales o.
template <int DV>
__device__ __forceinline__ void pf_online(float (&s)[8][4], float sl2, float& mA, float& mB, float& lA, float& lB,
                                          float (&o)[DV / 8][4]) {
    float xA = NEG_INF, xB = NEG_INF;
#pragma unroll
    for (int n = 0; n < 8; n++) {
        xA = fmaxf(xA, fmaxf(s[n][0], s[n][1]));
        xB = fmaxf(xB, fmaxf(s[n][2], s[n][3]));
    }
    xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
    xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
    xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
    xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
    float nA = fmaxf(mA, xA), nB = fmaxf(mB, xB);
    float uA = nA == NEG_INF ? 0.f : nA * sl2, uB = nB == NEG_INF ? 0.f : nB * sl2;
    float cA = ex2f(fmaf(mA, sl2, -uA)), cB = ex2f(fmaf(mB, sl2, -uB));
    float sA = 0.f, sB = 0.f;
#pragma unroll
    for (int n = 0; n < 8; n++) {
        s[n][0] = ex2f(fmaf(s[n][0], sl2, -uA));
        s[n][1] = ex2f(fmaf(s[n][1], sl2, -uA));
        s[n][2] = ex2f(fmaf(s[n][2], sl2, -uB));
        s[n][3] = ex2f(fmaf(s[n][3], sl2, -uB));
        sA += s[n][0] + s[n][1];
        sB += s[n][2] + s[n][3];
    }
    lA = lA * cA + sA;
    lB = lB * cB + sB;
    mA = nA;
    mB = nB;
#pragma unroll
    for (int d = 0; d < DV / 8; d++) {
        o[d][0] *= cA;
        o[d][1] *= cA;
        o[d][2] *= cB;
        o[d][3] *= cB;
    }
}

// One level of a transpose-reduce across lanes `mask` apart: the lane keeps the lower
// (hi = 0) or upper half of v[0..2*HALF), adds the partner's copy of that half, and leaves
// the sums in v[0..HALF).
template <int HALF>
__device__ __forceinline__ void pf_fold(float* v, bool hi, int mask) {
#pragma unroll
    for (int i = 0; i < HALF; i++) {
        float send = hi ? v[i] : v[i + HALF], keep = hi ? v[i + HALF] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
    }
}

__device__ __forceinline__ bool pf_better(float s1, int j1, float s2, int j2) {
    if (j1 < 0) return false;
    if (j2 < 0) return true;
    return s1 > s2 || (s1 == s2 && j1 < j2);
}

// Writes a warp's chosen blocks (lane r holds the r-th pick, -1 for none; `count` picks at
// most) ascending, -1 padded, to dst[0..n).
__device__ __forceinline__ void pf_store_sorted(int mine, int count, int n, int* dst) {
    const int lane = threadIdx.x & 31;
    int rank = 0;
    for (int r = 0; r < count; r++) {
        int o = __shfl_sync(0xffffffffu, mine, r);
        rank += (o >= 0 && mine >= 0 && o < mine) ? 1 : 0;
    }
    if (lane < n && lane < count && mine >= 0) dst[rank] = mine;
    int valid = __popc(__ballot_sync(0xffffffffu, lane < count && mine >= 0));
    if (lane < n && lane >= valid) dst[lane] = -1;
}

// One round of a warp arg-max over the lanes' (score, block) bests: ties to the lower block.
__device__ __forceinline__ int pf_warp_argmax(float v, int j) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oj = __shfl_xor_sync(0xffffffffu, j, o);
        if (pf_better(ov, oj, v, j)) {
            v = ov;
            j = oj;
        }
    }
    return j;
}

// Top-n of one position's block scores `sc[0..=b]` (forced blocks already +inf, every
// other score >= 0; a NaN score is never picked), by one warp: n rounds of a warp arg-max
// (ties to the lower block), each lane keeping the best of its strided share. The chosen
// blocks go to dst[0..n) ascending, -1 padded. This version keeps the shares in shared
// memory (any b); it destroys `sc`.
__device__ void pf_top_n(float* sc, int b, int n, int* dst) {
    const int lane = threadIdx.x & 31;
    const int nb = b + 1, count = min(n, nb);
    auto rescan = [&](float& bv, int& bj) {
        bv = NEG_INF;
        bj = -1;
        for (int j = lane; j < nb; j += 32) {
            float v = sc[j];
            if (v >= 0.f && pf_better(v, j, bv, bj)) {
                bv = v;
                bj = j;
            }
        }
    };
    float bv;
    int bj;
    rescan(bv, bj);
    int mine = -1;
    for (int r = 0; r < count; r++) {
        int j = pf_warp_argmax(bv, bj);
        if (lane == r) mine = j;
        if (j < 0) break;  // nothing left (non-finite scores)
        if ((j & 31) == lane) {
            sc[j] = -1.f;
            rescan(bv, bj);
        }
        __syncwarp();
    }
    pf_store_sorted(mine, count, n, dst);
}

// The same with each lane's share (at most R scores: b < 32 * R) held in registers, so the
// n rescans cost no shared-memory round trips.
template <int R>
__device__ void pf_top_n_reg(const float* sc, int b, int n, int* dst) {
    const int lane = threadIdx.x & 31;
    const int nb = b + 1, count = min(n, nb);
    float v[R];
#pragma unroll
    for (int k = 0; k < R; k++) v[k] = lane + 32 * k < nb ? sc[lane + 32 * k] : -1.f;
    auto rescan = [&](float& bv, int& bj) {
        bv = NEG_INF;
        bj = -1;
#pragma unroll
        for (int k = 0; k < R; k++)
            if (v[k] >= 0.f && (bj < 0 || v[k] > bv)) {
                bv = v[k];
                bj = lane + 32 * k;
            }
    };
    float bv;
    int bj;
    rescan(bv, bj);
    int mine = -1;
    for (int r = 0; r < count; r++) {
        int j = pf_warp_argmax(bv, bj);
        if (lane == r) mine = j;
        if (j < 0) break;
        if ((j & 31) == lane) {
#pragma unroll
            for (int k = 0; k < R; k++)
                if (lane + 32 * k == j) v[k] = -1.f;
            rescan(bv, bj);
        }
    }
    pf_store_sorted(mine, count, n, dst);
}

#define PF_TOPN_REG 64  // register shares up to 64 x 32 = 2048 blocks

// Compressed branch + selection. Shared memory (from the aligned base): Q (Wgmma) | K
// stages [NS] | V stages [NS] | psum [warps*PW][64] f32 | scores [warps*PW][nblk] f32 |
// page of each compressed key tile [nblk] i32.
template <class E, int DK, int DV, int NS, class M>
__device__ void pf_cmp(const Params& p) {
    extern __shared__ __align__(16) unsigned char pf_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int g = lane >> 2, q4 = lane & 3;
    const int kvh = blockIdx.y, G = p.shape.group_size, PW = 16 / G, nblk = pf_nblk(p);
    const PrefillTile tl = pf_tile(p, blockIdx.x, nw * PW);
    if (tl.npos == 0) return;
    unsigned char* base = pf_base(pf_smem);
    const unsigned qs = smem_u32(base);
    const unsigned ks = qs + M::q_bytes(nw * 16);
    const unsigned vs = ks + NS * M::KTILE;
    float* ps = (float*)(base + (vs - qs) + NS * M::VTILE);
    float* sc = ps + nw * PW * PF_KT;
    int* pg = (int*)(sc + nw * PW * nblk);  // page of each compressed key tile

    M m;
    m.load_q(p, tl, kvh, qs, M::q_bytes(nw * 16) ? base : base + (ks - qs));

    // The lane's two rows: positions, visible compressed counts.
    const int poA = (warp * 16 + g) / G, poB = (warp * 16 + g + 8) / G;
    const int ncA = poA < tl.npos ? num_cmp(p, tl.pos0 + poA + 1) : 0;
    const int ncB = poB < tl.npos ? num_cmp(p, tl.pos0 + poB + 1) : 0;
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
        if (st < ntl) pf_load_tile<DK, M::SW>(p, ks + st * M::KTILE, ck, pg[st], kvh, st * PF_KT, nc_max);
        cp_commit();
    }
    for (int kt = 0; kt < ntl; kt++) {
        const int nx = kt + NS - 1;
        if (nx < ntl) pf_load_tile<DK, M::SW>(p, ks + (nx % NS) * M::KTILE, ck, pg[nx], kvh, nx * PF_KT, nc_max);
        cp_commit();
        cp_wait<NS - 1>();
        fence_async_smem();
        __syncthreads();
        float s[8][4];
        m.qk(ks + (kt % NS) * M::KTILE, s);
        if ((kt + 1) * PF_KT > min(ncA, ncB)) {  // masks only where a row's keys end
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int i = kt * PF_KT + n * 8 + q4 * 2 + e;
                    if (i >= ncA) s[n][e] = NEG_INF;
                    if (i >= ncB) s[n][2 + e] = NEG_INF;
                }
        }
        float xA = NEG_INF, xB = NEG_INF;
#pragma unroll
        for (int n = 0; n < 8; n++) {
            xA = fmaxf(xA, fmaxf(s[n][0], s[n][1]));
            xB = fmaxf(xB, fmaxf(s[n][2], s[n][3]));
        }
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
        float nA = fmaxf(mA, xA), nB = fmaxf(mB, xB);
        float uA = nA == NEG_INF ? 0.f : nA * sl2, uB = nB == NEG_INF ? 0.f : nB * sl2;
        float sA = 0.f, sB = 0.f;
#pragma unroll
        for (int n = 0; n < 8; n++) {
            sA += ex2f(fmaf(s[n][0], sl2, -uA)) + ex2f(fmaf(s[n][1], sl2, -uA));
            sB += ex2f(fmaf(s[n][2], sl2, -uB)) + ex2f(fmaf(s[n][3], sl2, -uB));
        }
        lA = lA * ex2f(fmaf(mA, sl2, -uA)) + sA;
        lB = lB * ex2f(fmaf(mB, sl2, -uB)) + sB;
        mA = nA;
        mB = nB;
        __syncthreads();
    }
    lA += __shfl_xor_sync(0xffffffffu, lA, 1);
    lA += __shfl_xor_sync(0xffffffffu, lA, 2);
    lB += __shfl_xor_sync(0xffffffffu, lB, 1);
    lB += __shfl_xor_sync(0xffffffffu, lB, 2);
    // log2-sum-exp2 of the scaled logits; +inf for a row with no visible key makes every
    // p exactly 0.
    const float lseA = lA != 0.f ? mA * sl2 + __log2f(lA) : POS_INF;
    const float lseB = lB != 0.f ? mB * sl2 + __log2f(lB) : POS_INF;

    // Pass 2: normalised probabilities -> P.V and the block scores.
    const int nblk_tile = (tl.pos0 + tl.npos - 1) / p.shape.sel_block + 1;
    for (int e = threadIdx.x; e < nw * PW * nblk_tile; e += blockDim.x) {
        int po = e / nblk_tile, j = e - po * nblk_tile;
        sc[po * nblk + j] = 0.f;
    }
    __syncthreads();
    const int A = p.shape.cmp_block / p.shape.cmp_stride, B = p.shape.sel_block / p.shape.cmp_stride;
    float o[DV / 8][4];
#pragma unroll
    for (int d = 0; d < DV / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    for (int st = 0; st < NS - 1; st++) {
        if (st < ntl) {
            pf_load_tile<DK, M::SW>(p, ks + st * M::KTILE, ck, pg[st], kvh, st * PF_KT, nc_max);
            pf_load_tile<DV, M::SW>(p, vs + st * M::VTILE, cv, pg[st], kvh, st * PF_KT, nc_max);
        }
        cp_commit();
    }
    float* myps = ps + warp * PW * PF_KT;
    for (int kt = 0; kt < ntl; kt++) {
        const int nx = kt + NS - 1;
        if (nx < ntl) {
            pf_load_tile<DK, M::SW>(p, ks + (nx % NS) * M::KTILE, ck, pg[nx], kvh, nx * PF_KT, nc_max);
            pf_load_tile<DV, M::SW>(p, vs + (nx % NS) * M::VTILE, cv, pg[nx], kvh, nx * PF_KT, nc_max);
        }
        cp_commit();
        cp_wait<NS - 1>();
        fence_async_smem();
        __syncthreads();
        float s[8][4];
        m.qk(ks + (kt % NS) * M::KTILE, s);
#pragma unroll
        for (int n = 0; n < 8; n++) {
            s[n][0] = ex2f(fmaf(s[n][0], sl2, -lseA));
            s[n][1] = ex2f(fmaf(s[n][1], sl2, -lseA));
            s[n][2] = ex2f(fmaf(s[n][2], sl2, -lseB));
            s[n][3] = ex2f(fmaf(s[n][3], sl2, -lseB));
        }
        if ((kt + 1) * PF_KT > min(ncA, ncB)) {
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int i = kt * PF_KT + n * 8 + q4 * 2 + e;
                    if (i >= ncA) s[n][e] = 0.f;
                    if (i >= ncB) s[n][2 + e] = 0.f;
                }
        }
        m.pv(s, vs + (kt % NS) * M::VTILE, o);
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
            const int n = (g & 1) * 4 + ((g >> 1) & 1) * 2 + ((g >> 2) & 1);
            *(float2*)(myps + n * 8 + q4 * 2) = make_float2(v[0], v[1]);
        } else {
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = n * 8 + q4 * 2 + e;
                    float a = s[n][e], b = s[n][2 + e];
                    if (G >= 2) {
                        a += __shfl_xor_sync(0xffffffffu, a, 4);
                        b += __shfl_xor_sync(0xffffffffu, b, 4);
                    }
                    if (G >= 4) {
                        a += __shfl_xor_sync(0xffffffffu, a, 8);
                        b += __shfl_xor_sync(0xffffffffu, b, 8);
                    }
                    if (G >= 8) {
                        a += __shfl_xor_sync(0xffffffffu, a, 16);
                        b += __shfl_xor_sync(0xffffffffu, b, 16);
                    }
                    if ((g & (G - 1)) == 0) {
                        myps[(g / G) * PF_KT + col] = a;
                        myps[((g + 8) / G) * PF_KT + col] = b;
                    }
                }
        }
        __syncwarp();
        // Block scores (Eq. 9): block j gathers p_i for i = B*j - (A-1) + k, k < A+B-1,
        // weighted by the number of (a, b) pairs with a + b = k. Blocks whose window meets
        // this tile: one lane per (position, block); tiles come in order, so each score
        // is summed in a fixed order.
        const int i0 = kt * PF_KT;
        const int jlo = i0 / B;  // first block whose last offset B*j + B - 1 reaches i0
        const int jhi = (i0 + PF_KT - 1 + A - 1) / B;
        const int nj = jhi - jlo + 1;
        for (int it = lane; it < PW * nj; it += 32) {
            int pw = it / nj, j = jlo + it - pw * nj;
            int po = warp * PW + pw;
            if (po >= tl.npos || j >= nblk_tile) continue;
            float acc = 0.f;
            int first = B * j - (A - 1);
            for (int k = 0; k < A + B - 1; k++) {
                int i = first + k;
                if (i >= i0 && i < i0 + PF_KT) acc += overlap_count(k, A, B) * myps[pw * PF_KT + i - i0];
            }
            sc[po * nblk + j] += acc;
        }
        __syncwarp();
        __syncthreads();
    }
    // Gated compressed output.
    {
        const float* gates = (const float*)p.io.gates;
        typename E::T* out = (typename E::T*)p.io.out;
        const int hA = (warp * 16 + g) % G, hB = (warp * 16 + g + 8) % G;
        if (poA < tl.npos) {
            usize r = (usize)(tl.row0 + poA) * p.shape.num_q_heads + kvh * G + hA;
            float gt = gates[r * 3];
#pragma unroll
            for (int d = 0; d < DV / 8; d++) {
                int c = d * 8 + q4 * 2;
                E::st(out, r * DV + c, gt * o[d][0]);
                E::st(out, r * DV + c + 1, gt * o[d][1]);
            }
        }
        if (poB < tl.npos) {
            usize r = (usize)(tl.row0 + poB) * p.shape.num_q_heads + kvh * G + hB;
            float gt = gates[r * 3];
#pragma unroll
            for (int d = 0; d < DV / 8; d++) {
                int c = d * 8 + q4 * 2;
                E::st(out, r * DV + c, gt * o[d][2]);
                E::st(out, r * DV + c + 1, gt * o[d][3]);
            }
        }
    }
    // Forced blocks, then each of the warp's positions' top-n.
    cp_wait<0>();
    __syncwarp();
    for (int pw = 0; pw < PW; pw++) {
        int po = warp * PW + pw;
        if (po >= tl.npos) break;
        int t = tl.pos0 + po, b = t / p.shape.sel_block;
        float* my = sc + po * nblk;
        for (int j = lane; j <= b; j += 32)
            if (j < p.shape.sel_init || j > b - p.shape.sel_local) my[j] = POS_INF;
        __syncwarp();
        int* dst = pf_sel(p) + ((usize)(tl.row0 + po) * p.shape.num_kv_heads + kvh) * p.shape.sel_count;
        if (b < 32 * PF_TOPN_REG)
            pf_top_n_reg<PF_TOPN_REG>(my, b, p.shape.sel_count, dst);
        else
            pf_top_n(my, b, p.shape.sel_count, dst);
        __syncwarp();
    }
}

// Selected blocks + sliding window + gated combine. Shared memory (from the aligned base):
// Q (Wgmma) | K stages [NS] | V stages [NS] | partial outputs [warps][DV/8][4][32] f32
// (unless M::ACC_REGS) | block masks [nblk] u32 | union list [nblk] i32 |
// page of each visited key tile [nblk * sel_block / 64 + window / 64 + 4] i32.
template <class E, int DK, int DV, int NS, class M>
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
    float* acc = (float*)(base + (vs - qs) + NS * M::VTILE);
    unsigned* bmask = (unsigned*)(acc + (M::ACC_REGS ? 0 : nw * (DV / 8) * 4 * 32));
    int* ulist = (int*)(bmask + nblk);
    int* tpage = ulist + nblk;  // page of every key tile the block visits, in order
    __shared__ int ucount;

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

    // The union of the tile's selections, ascending, with a bit per position.
    const int nblk_tile = last / p.shape.sel_block + 1;
    for (int j = threadIdx.x; j < nblk_tile; j += blockDim.x) bmask[j] = 0u;
    __syncthreads();
    for (int e = threadIdx.x; e < tl.npos * p.shape.sel_count; e += blockDim.x) {
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

    // Window key tiles: [wlo, last], 64-aligned.
    const int wlo = max(0, tl.pos0 - p.shape.window + 1);
    const int wt0 = wlo / PF_KT, wt1 = last / PF_KT;
    const int nwin = wt1 - wt0 + 1;
    const int total = nsel_tiles + nwin;
    auto tile_k0 = [&](int it) {
        return it < nsel_tiles ? ulist[it / tpb] * p.shape.sel_block + (it % tpb) * PF_KT : (wt0 + it - nsel_tiles) * PF_KT;
    };
    for (int it = threadIdx.x; it < total; it += blockDim.x) tpage[it] = rtab[tile_k0(it) / p.paging.page_size];
    __syncthreads();
    auto load = [&](int it, int st) {
        int k0 = tile_k0(it);
        pf_load_tile<DK, M::SW>(p, ks + st * M::KTILE, rk, tpage[it], kvh, k0, last + 1);
        pf_load_tile<DV, M::SW>(p, vs + st * M::VTILE, rv, tpage[it], kvh, k0, last + 1);
    };
    PfPartial<DV, M::ACC_REGS> part(acc + warp * (DV / 8) * 4 * 32 + lane);
    const float* gates = (const float*)p.io.gates;
    const int hA = (warp * 16 + g) % G, hB = (warp * 16 + g + 8) % G;
    const usize rA = (usize)(tl.row0 + poA) * p.shape.num_q_heads + kvh * G + hA;
    const usize rB = (usize)(tl.row0 + poB) * p.shape.num_q_heads + kvh * G + hB;

    for (int st = 0; st < NS - 1; st++) {
        if (st < total) load(st, st);
        cp_commit();
    }
    for (int it = 0; it < total; it++) {
        if (it + NS - 1 < total) load(it + NS - 1, (it + NS - 1) % NS);
        cp_commit();
        if (it == nsel_tiles) {
            // Selected branch done: acc = compressed part (already in out) + g_slc * o_slc.
            lA += __shfl_xor_sync(0xffffffffu, lA, 1);
            lA += __shfl_xor_sync(0xffffffffu, lA, 2);
            lB += __shfl_xor_sync(0xffffffffu, lB, 1);
            lB += __shfl_xor_sync(0xffffffffu, lB, 2);
            const typename E::T* out = (const typename E::T*)p.io.out;
            float fA = 0.f, fB = 0.f;
            if (okA && lA != 0.f) fA = gates[rA * 3 + 1] / lA;
            if (okB && lB != 0.f) fB = gates[rB * 3 + 1] / lB;
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
        }
        cp_wait<NS - 1>();
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
            float s[8][4];
            m.qk(ks + (it % NS) * M::KTILE, s);
            const bool selA = it < nsel_tiles ? okA && ((bm >> poA) & 1u) : okA;
            const bool selB = it < nsel_tiles ? okB && ((bm >> poB) & 1u) : okB;
            const int loA = it < nsel_tiles ? 0 : tA - p.shape.window + 1, loB = it < nsel_tiles ? 0 : tB - p.shape.window + 1;
            const bool fullA = selA && k0 >= loA && k0 + PF_KT - 1 <= tA;
            const bool fullB = selB && k0 >= loB && k0 + PF_KT - 1 <= tB;
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
            pf_online<DV>(s, sl2, mA, mB, lA, lB, o);
            m.pv(s, vs + (it % NS) * M::VTILE, o);
        }
        __syncthreads();
    }
    cp_wait<0>();
    // The window always holds the position itself (nwin >= 1): the selected part was
    // folded into acc at it == nsel_tiles.
    lA += __shfl_xor_sync(0xffffffffu, lA, 1);
    lA += __shfl_xor_sync(0xffffffffu, lA, 2);
    lB += __shfl_xor_sync(0xffffffffu, lB, 1);
    lB += __shfl_xor_sync(0xffffffffu, lB, 2);
    typename E::T* out = (typename E::T*)p.io.out;
    float fA = 0.f, fB = 0.f;
    if (okA && lA != 0.f) fA = gates[rA * 3 + 2] / lA;
    if (okB && lB != 0.f) fB = gates[rB * 3 + 2] / lB;
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
