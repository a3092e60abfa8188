// The prefill kernels' building blocks (kernels/prefill.cuh has the kernels and the
// design): a block's tile, the tile copies, the MMA policies (MmaSync: mma.sync on any
// sm_80+; Wgmma: warpgroup MMA on sm_90a), the online softmax in the log2 domain, the
// group-head sums and the warp-parallel top-n.

#ifndef NSA_PREFILL_PARTS_CUH
#define NSA_PREFILL_PARTS_CUH

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

// pf_load_tile (below) for any block size: an address per granule.
template <int D, bool SW>
__device__ __forceinline__ void pf_load_tile_generic(unsigned dst, const u16* src, int k0, int kend) {
    constexpr int CPR = D / 8;
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

// Granules e = t + NT J of a tile (NT threads, t the thread): the tile's 64 rows are
// consecutive in its page, so granule e's source is the tile's address plus 16 e bytes, an
// immediate of the copy (prefill variant 22d; 22b did the same for the per-warp sub-tiles);
// its row r = e / CPR gives the destination and the zero fill (rows at or past `vis`).
template <int D, bool SW, int NT, int J>
__device__ __forceinline__ void pf_load_tile_at(unsigned dst, const u16* s0, int t, int vis) {
    constexpr int CPR = D / 8;
    static_assert(PF_KT * CPR % NT == 0, "whole rounds of granules");
    if constexpr (J * NT < PF_KT * CPR) {
        const int e = t + J * NT, r = e / CPR, c = e - r * CPR;
        const unsigned off = SW ? sw128_off(r, c, PF_KT) : (unsigned)(r * (D + 8) + c * 8) * 2u;
        cp_async16_at<J * NT * 16>(dst + off, s0, r < vis ? 16 : 0);
        pf_load_tile_at<D, SW, NT, J + 1>(dst, s0, t, vis);
    }
}

// Copies keys [k0, k0 + 64) of a paged pool (rows of D 16-bit elements; `page` holds them,
// looked up ahead of time: a dependent page-table load here would stall every copy) with
// cp.async into a tile at shared address `dst`: swizzled (SW) or with rows padded to D + 8
// elements. Rows at or past `kend` are zero-filled. All threads of the block call it; with
// IMM, blocks of 128 or 256 threads take one source address per thread.
template <int D, bool SW, bool IMM>
__device__ __forceinline__ void pf_load_tile(const Params& p, unsigned dst, const u16* pool, int page,
                                             int kvh, int k0, int kend) {
    const u16* src = pool + row_at(p, page, kvh, k0 % p.paging.page_size, D);
    const int t = threadIdx.x;
    if (!IMM)
        pf_load_tile_generic<D, SW>(dst, src, k0, kend);
    else if (blockDim.x == 128)
        pf_load_tile_at<D, SW, 128, 0>(dst, src + t * 8, t, kend - k0);
    else if (blockDim.x == 256)
        pf_load_tile_at<D, SW, 256, 0>(dst, src + t * 8, t, kend - k0);
    else
        pf_load_tile_generic<D, SW>(dst, src, k0, kend);
}

// Keys [k0, k0 + 64) of `page` by the copy engine, issued by the 32 lanes of one warp
// (`lane`): 16-row boxes of the decode kernels' tensor maps (map indices: 0 raw K, 1 raw
// V, 2 cmp K, 3 cmp V), 4 per 64 columns, K to `kd` and V to `vd` (none when DV is 0), as
// 128-byte swizzled tiles, completing on the mbarrier `bar` (this call arms it with the
// tile's bytes).
template <int DK, int DV>
__device__ __forceinline__ void pf_tma_tile(const Params& p, int lane, unsigned bar, unsigned kd, int kmap, unsigned vd,
                                            int vmap, int page, int kvh, int k0) {
    constexpr int KB = 4 * (DK / 64), NB = KB + 4 * (DV / 64);  // 16-row boxes
    static_assert(NB <= 32, "a lane per box");
    fence_async_smem();  // this stage's earlier generic accesses before the copy engine's writes
    if (lane == 0) mbar_expect(bar, (unsigned)(PF_KT * (DK + DV) * 2));
    __syncwarp();
    if (lane < NB) {
        const bool isk = lane < KB;
        const int bb = isk ? lane : lane - KB, cb = bb >> 2, r0 = (bb & 3) * 16;
        tma_load3((isk ? kd : vd) + cb * PF_KT * 128 + r0 * 128, p.paging.tmaps + (isk ? kmap : vmap) * NSA_TMAP_BYTES,
                  cb * 64, k0 % p.paging.page_size + r0, page * p.shape.num_kv_heads + kvh, bar);
    }
}

// K/V tile copies of the prefill kernels into NS shared-memory stages. With TMA (the
// `WgmmaTma` policy's kernels, which the host picks for one-warpgroup blocks) and tensor
// maps (`launch.mode & 2`) lanes of warp 0 copy a tile as 16-row boxes of the decode
// kernels' maps (4 per 64 columns of K and of V), completing on the stage's mbarrier, so
// the other threads issue nothing and compute no address;
// otherwise every thread copies 16-byte granules with cp.async (`pf_load_tile`). A tile's
// rows past `kend` are zeros with cp.async but whatever the page holds with tensor maps:
// `wait` zeroes those rows of V (their scores are masked, but P = 0 times NaN is NaN).
// The caller's loop keeps its order: load ahead, commit, wait, fence_async_smem and
// __syncthreads, compute, __syncthreads.
// TMA is a template argument so that the other kernels carry none of it: as a run-time
// choice it made the 8-warp blocks, which gain nothing from it, 4-5% slower (registers
// and branches in the tile loop; docs/PREFILL_NOTES.md, variant 7).
template <int NS, bool SW, bool TMA>
struct PfCopy {
    bool tma;
    unsigned bar0, phase;  // stage st's mbarrier at bar0 + 8 st; bit st: the parity it waits for

    // Every thread calls it; the caller's next __syncthreads publishes the barriers.
    __device__ void init(const Params& p) {
        __shared__ __align__(8) unsigned long long bars[NS];
        static_assert(!TMA || SW, "tensor-map boxes land as 128-byte swizzled tiles");
        tma = TMA && (p.launch.mode & 2) != 0;
        bar0 = smem_u32(bars);
        phase = 0u;
        if (tma && threadIdx.x == 0) {
            for (int st = 0; st < NS; st++) mbar_init(bar0 + 8 * st, 1);
            fence_mbar_init();
        }
    }

    // The tile of keys [k0, k0 + PF_KT) of `page` (map indices: 0 raw K, 1 raw V, 2 cmp K,
    // 3 cmp V) into stage `st`: K to `kd`, and V to `vd` unless DV is 0.
    template <int DK, int DV>
    __device__ void load(const Params& p, int st, unsigned kd, const u16* kpool, int kmap, unsigned vd, const u16* vpool,
                         int vmap, int page, int kvh, int k0, int kend) {
        if (tma) {
            if (threadIdx.x < 32) pf_tma_tile<DK, DV>(p, threadIdx.x, bar0 + 8 * st, kd, kmap, vd, vmap, page, kvh, k0);
            return;
        }
        // One address per thread where the copies are the tile path (swizzled tiles without
        // tensor maps: the wgmma kernels at DK = 192); the tensor-map kernels' fallback and
        // the mma.sync path keep an address per granule (the unrolled offsets made ptxas
        // spill there).
        constexpr bool IMM = SW && !TMA;
        pf_load_tile<DK, SW, IMM>(p, kd, kpool, page, kvh, k0, kend);
        if constexpr (DV > 0) pf_load_tile<DV, SW, IMM>(p, vd, vpool, page, kvh, k0, kend);
    }

    __device__ void commit() {
        if (!tma) cp_commit();
    }

    // Stage st holds its tile (this thread's view): `vg` is the stage's V (generic
    // address; unused when DV is 0), the tile's keys [k0, k0 + PF_KT) of which `kend` on
    // are not visible.
    template <int DV>
    __device__ void wait(int st, unsigned char* vg, int k0, int kend) {
        if (!tma) {
            cp_wait<NS - 1>();
            return;
        }
        mbar_wait(bar0 + 8 * st, (phase >> st) & 1u);
        phase ^= 1u << st;
        if constexpr (DV > 0) {
            if (k0 + PF_KT > kend) {
                const int r0 = max(kend - k0, 0);
                for (int e = threadIdx.x; e < (PF_KT - r0) * (DV / 8); e += blockDim.x) {
                    const int r = r0 + e / (DV / 8), c = e % (DV / 8);
                    *(uint4*)(vg + sw128_off(r, c, PF_KT)) = make_uint4(0u, 0u, 0u, 0u);
                }
            }
        }
    }
};

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
    static constexpr bool TMA = false;
    static constexpr bool SW = false;
    static constexpr bool ACC_REGS = false;  // no registers to spare: the partial output in shared memory
    static constexpr unsigned KTILE = PF_KT * (DK + 8) * 2, VTILE = PF_KT * (DV + 8) * 2;
    static __host__ __device__ constexpr unsigned q_bytes(int) { return 0; }  // Q staged through the K/V stages
    // Shared address of 16-byte granule c of key r in a V tile at vt (padded rows).
    static __device__ __forceinline__ unsigned v_gran(unsigned vt, int r, int c) { return vt + (r * (DV + 8) + c * 8) * 2; }
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

    // The warp's Q as the A fragment of k16 step kk (m16n8k16 layout).
    __device__ __forceinline__ void q_frag(int kk, unsigned& a0, unsigned& a1, unsigned& a2, unsigned& a3) const {
        a0 = qf[kk][0];
        a1 = qf[kk][1];
        a2 = qf[kk][2];
        a3 = qf[kk][3];
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
    static constexpr bool TMA = false;
    static constexpr bool SW = true;
    static constexpr bool ACC_REGS = true;
    static constexpr unsigned KTILE = PF_KT * DK * 2, VTILE = PF_KT * DV * 2;
    static __host__ __device__ constexpr unsigned q_bytes(int rows) { return (unsigned)rows * DK * 2; }
    // Shared address of 16-byte granule c of key r in a V tile at vt (swizzled, MN-major).
    static __device__ __forceinline__ unsigned v_gran(unsigned vt, int r, int c) { return vt + sw128_off(r, c, PF_KT); }
    unsigned qaddr;
    int rows;
    u64 qdesc;  // this warpgroup's 64 rows of the Q tile

    // The block's Q rows (`nrows`: 16 per warp unless given) into the Q region; every
    // thread of the block calls it (it ends with a block barrier). By cp.async, so a
    // thread's granules are all in flight at once (a load and a store each took a global
    // round trip per granule: ~2% of pf_cmp's samples, prefill variant 29); rows past the
    // tile's positions are zero-filled.
    __device__ void load_q(const Params& p, const PrefillTile& tl, int kvh, unsigned q_at, unsigned char*, int nrows = 0) {
        constexpr int CPR = DK / 8;
        rows = nrows ? nrows : blockDim.x / 2;
        qaddr = q_at;
        qdesc = wg_desc(q_at + (threadIdx.x >> 7) * 64 * 128, 16, 1024);
        const int G = p.shape.group_size;
        for (int e = threadIdx.x; e < rows * CPR; e += blockDim.x) {
            const int r = e / CPR, c = e - r * CPR, po = r / G, h = r - po * G;
            const bool in = po < tl.npos;
            const u16* src = (const u16*)p.io.q + ((usize)(tl.row0 + (in ? po : 0)) * p.shape.num_q_heads + kvh * G + h) * DK + c * 8;
            cp_async16(q_at + sw128_off(r, c, rows), src, in ? 16 : 0);
        }
        cp_commit();
        cp_wait<0>();
        fence_async_smem();
        __syncthreads();
    }

    // The warp's Q as the A fragment of k16 step kk (m16n8k16 layout), by ldmatrix from
    // the swizzled Q tile.
    __device__ __forceinline__ void q_frag(int kk, unsigned& a0, unsigned& a1, unsigned& a2, unsigned& a3) const {
        const int lane = threadIdx.x & 31, r = (threadIdx.x >> 5) * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldsm4(qaddr + sw128_off(r, kk * 2 + (lane >> 4), rows), a0, a1, a2, a3);
    }

    // WAIT = false leaves the products in flight (one commit group): the caller waits with
    // wg_wait<N> before it touches `s`, or the tile's stage, again.
    template <bool WAIT = true>
    __device__ void qk(unsigned kt, float (&s)[8][4]) {
        const u64 kdesc = wg_desc(kt, 16, 1024);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) {
            // k16 step kk: 32 bytes into its 64-column chunk; chunks are a tile apart.
            const u64 da = wg_desc_at(qdesc, (kk >> 2) * rows * 128 + (kk & 3) * 32);
            const u64 db = wg_desc_at(kdesc, (kk >> 2) * PF_KT * 128 + (kk & 3) * 32);
            if (kk == 0)
                wg_ss_m64n64k16_first<E::MMA>(&s[0][0], da, db);
            else
                wg_ss_m64n64k16<E::MMA>(&s[0][0], da, db, 1);
        }
        wg_commit();
        if (WAIT) wg_wait<0>();
    }

    // P (NT x 8 keys of the tile at vt from key `k0` on, a multiple of 16) times those V rows.
    // Static: it needs no Q tile (`pf_sel`'s warpgroup products call it without one).
    template <bool WAIT = true, int NT>
    static __device__ void pv(const float (&pr)[NT][4], unsigned vt, float (&o)[DV / 8][4], int k0 = 0) {
        static_assert(NT % 2 == 0 && NT <= 8, "whole k16 steps of a 64-key tile");
        constexpr int KS = NT / 2;
        unsigned a[KS][4];
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            a[ks][0] = pack2<E::MMA>(pr[2 * ks][0], pr[2 * ks][1]);
            a[ks][1] = pack2<E::MMA>(pr[2 * ks][2], pr[2 * ks][3]);
            a[ks][2] = pack2<E::MMA>(pr[2 * ks + 1][0], pr[2 * ks + 1][1]);
            a[ks][3] = pack2<E::MMA>(pr[2 * ks + 1][2], pr[2 * ks + 1][3]);
        }
        // V is MN-major: 8-key groups 1024 bytes apart, 64-column chunks a tile apart.
        const u64 vdesc = wg_desc(vt + k0 * 128, PF_KT * 128, 1024);
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            const u64 db = wg_desc_at(vdesc, ks * 16 * 128);
            if constexpr (DV == 128)
                wg_rs_m64n128k16_tb<E::MMA>(&o[0][0], a[ks][0], a[ks][1], a[ks][2], a[ks][3], db);
            else
                wg_rs_m64n64k16_tb<E::MMA>(&o[0][0], a[ks][0], a[ks][1], a[ks][2], a[ks][3], db);
        }
        wg_commit();
        if (WAIT) wg_wait<0>();
    }
};

// Wgmma with K/V tiles copied by the copy engine (`PfCopy`): the 4-warp blocks' policy
// when tensor maps are in use (measured faster only there).
template <class E, int DK, int DV>
struct WgmmaTma : Wgmma<E, DK, DV> {
    static constexpr bool TMA = true;
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

// The maxima of the lane's two rows (A: s[n][0..1], B: s[n][2..3]) over a tile of NT x 8
// keys, across the row's four lanes.
template <int NT>
__device__ __forceinline__ void pf_tile_max(const float (&s)[NT][4], float& xA, float& xB) {
    xA = NEG_INF;
    xB = NEG_INF;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        xA = fmaxf(xA, fmaxf(s[n][0], s[n][1]));
        xB = fmaxf(xB, fmaxf(s[n][2], s[n][3]));
    }
    xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
    xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
    xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
    xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
}

// Online-softmax update of one tile of NT x 8 keys for the lane's two rows (A = row g,
// B = row g + 8): s holds raw logits, masked ones -inf; the maxima mA, mB are raw too,
// sl2 = scale * log2(e). Turns s into probabilities relative to the (new) max and rescales
// o and l where it moved.
// Lazy rescale: while no row of the warp gains more than 8 in log2 units over its kept
// max, the kept maxima stay, so the probabilities are at most 2^8 (exact enough in f32,
// and within bf16's range for P.V) and o and l need no multiply (DV / 2 per lane, 64 at
// DV = 128); the decision is warp-uniform. The final o / l is the same either way
// (docs/PREFILL_NOTES.md, variant 11c).
template <int NT, int DV>
__device__ __forceinline__ void pf_online(float (&s)[NT][4], float sl2, float& mA, float& mB, float& lA, float& lB,
                                          float (&o)[DV / 8][4]) {
    float xA, xB;
    pf_tile_max<NT>(s, xA, xB);
    // A row with nothing in this tile (x = -inf) keeps its max whatever it is; a first
    // finite max (x - m = +inf) rescales.
    const bool keep = __all_sync(0xffffffffu, (xA == NEG_INF || (xA - mA) * sl2 <= 8.f) && (xB == NEG_INF || (xB - mB) * sl2 <= 8.f));
    const float nA = keep ? mA : fmaxf(mA, xA), nB = keep ? mB : fmaxf(mB, xB);
    const float uA = nA == NEG_INF ? 0.f : nA * sl2, uB = nB == NEG_INF ? 0.f : nB * sl2;
    float sA = 0.f, sB = 0.f;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        s[n][0] = ex2f(fmaf(s[n][0], sl2, -uA));
        s[n][1] = ex2f(fmaf(s[n][1], sl2, -uA));
        s[n][2] = ex2f(fmaf(s[n][2], sl2, -uB));
        s[n][3] = ex2f(fmaf(s[n][3], sl2, -uB));
        sA += s[n][0] + s[n][1];
        sB += s[n][2] + s[n][3];
    }
    if (keep) {
        lA += sA;
        lB += sB;
        return;
    }
    const float cA = ex2f(fmaf(mA, sl2, -uA)), cB = ex2f(fmaf(mB, sl2, -uB));
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

// The top `count` (<= 32) of the keys `key[0..nb)` when few keys reach the count-th largest
// of the 32 lanes' maxima, T0 (at least `count` keys do: each of those lanes' maxima):
// the keys >= T0 are gathered in slot order into `buf` (keys, then their blocks; at most
// 64), each ranks itself against the others by (key, lower block first: blocks ascend
// with slots) and the top `count` are emitted in slot order. Returns false, having emitted
// nothing, where more than 64 keys reach T0 (ties, adversarial scores): the caller's
// radix select then runs. With random scores ~1-4% of the keys reach T0 (prefill variant
// 27), so this costs about two sweeps over the keys where the radix select makes five.
template <class Idx, class Emit>
__device__ __forceinline__ bool pf_top_few(const unsigned* key, int nb, unsigned count, unsigned mx, unsigned* buf,
                                           Idx idx, Emit emit) {
    const int lane = threadIdx.x & 31;
    const unsigned below = (1u << lane) - 1u;
    // The lane's rank among the 32 maxima (lane order breaks ties): ranks are 0..31.
    unsigned r = 0u;
    for (int l = 0; l < 32; l++) {
        const unsigned o = __shfl_sync(0xffffffffu, mx, l);
        r += o > mx || (o == mx && l < lane);
    }
    const unsigned T0 = max(__shfl_sync(0xffffffffu, mx, __ffs(__ballot_sync(0xffffffffu, r == count - 1u)) - 1), 1u);
    unsigned c = 0u;
    for (int j0 = 0; j0 < nb; j0 += 32) {
        const int j = j0 + lane;
        const unsigned k = j < nb ? key[j] : 0u;
        const bool in = k >= T0;
        const unsigned b = __ballot_sync(0xffffffffu, in);
        if (c + __popc(b) > 64u) return false;  // warp-uniform
        if (in) {
            const unsigned at = c + __popc(b & below);
            buf[at] = k;
            buf[64 + at] = (unsigned)idx(j);
        }
        c += __popc(b);
    }
    __syncwarp();
    const bool v0 = lane < (int)c, v1 = lane + 32 < (int)c;
    const unsigned k0 = v0 ? buf[lane] : 0u, b0 = v0 ? buf[64 + lane] : 0u;
    const unsigned k1 = v1 ? buf[32 + lane] : 0u, b1 = v1 ? buf[96 + lane] : 0u;
    unsigned r0 = 0u, r1 = 0u;
    for (unsigned m = 0; m < c; m++) {
        const unsigned km = buf[m], bm = buf[64 + m];
        r0 += km > k0 || (km == k0 && bm < b0);
        r1 += km > k1 || (km == k1 && bm < b1);
    }
    const bool in0 = v0 && r0 < count, in1 = v1 && r1 < count;
    const unsigned m0 = __ballot_sync(0xffffffffu, in0), m1 = __ballot_sync(0xffffffffu, in1);
    __syncwarp();  // every lane has read `buf` and the slots before an emit may write them
    if (in0) emit(__popc(m0 & below), (int)b0, k0);
    if (in1) emit(__popc(m0) + __popc(m1 & below), (int)b1, k1);
    __syncwarp();
    return true;
}

// Top-n of one position's candidate scores `sc[0..nb)` (forced blocks already +inf, every
// other score >= 0; a negative or NaN score is never picked) by one warp; ties go to the
// lower slot, and slots are in ascending block order (`idx(slot)`, read for every slot
// before any `emit`), so to the lower block, as the CPU engine's. `emit(r, block, key)` is
// called for the r-th chosen slot in slot order (r <= slot, so it may overwrite sc[r]:
// every lane has read its slot before the sweep's first write); returns how many were
// chosen (min(n, valid scores)).
// A radix select over the score bits (the decode kernel's method, kernels/selection.cuh,
// at warp scale): non-negative floats order as their bits, so four 8-bit passes over a
// 256-bin histogram (`hist`, the warp's own 256 words of shared memory) find the n-th best
// key T; then the slots above T and the lowest ones equal to T are emitted in one
// ordered sweep. About 4 x (nb / 32) + 100 instructions per lane, where n rounds of a warp
// arg-max cost n x (nb / 32) (docs/PREFILL_NOTES.md, variant 11); `pf_top_few` first, which
// settles it in two sweeps where few keys can be in. `sc` becomes the keys (a key k > 0 is
// the score with bits k - 1).
template <class Idx, class Emit>
__device__ __forceinline__ unsigned pf_top_n(float* sc, int nb, int n, unsigned* hist, Idx idx, Emit emit) {
    const int lane = threadIdx.x & 31;
    const unsigned below = (1u << lane) - 1u;
    unsigned* key = (unsigned*)sc;
    // Keys: 0 for a score never picked, else its bits + 1 (both zeros as +0).
    unsigned nvalid = 0u, mx = 0u;
    for (int j = lane; j < nb; j += 32) {
        const float v = sc[j];
        const unsigned k = v > 0.f ? __float_as_uint(v) + 1u : (v == 0.f ? 1u : 0u);
        key[j] = k;
        nvalid += k != 0u;
        mx = max(mx, k);
    }
    nvalid = __reduce_add_sync(0xffffffffu, nvalid);
    const unsigned count = min((unsigned)n, nvalid);
    __syncwarp();  // the keys are written before other lanes gather them
    if (count < nvalid && count > 0u && count <= 32u && pf_top_few(key, nb, count, mx, hist, idx, emit)) return count;
    // T: the count-th largest key (0 when every valid key is in); need: how many keys
    // equal to T belong to the top count.
    unsigned T = 0u, need = 0u;
    if (count < nvalid) {
        need = count;
        for (int pass = 0; pass < 4; pass++) {
            const int shift = 24 - 8 * pass;
            const unsigned hi = pass == 0 ? 0u : 0xffffffffu << (shift + 8);
#pragma unroll
            for (int i = 0; i < 8; i++) hist[lane + 32 * i] = 0u;
            __syncwarp();
            for (int j0 = 0; j0 < nb; j0 += 32) {
                const int j = j0 + lane;
                const unsigned k = j < nb ? key[j] : 0u;
                radix_count(hist, k, k != 0u && (k & hi) == T, shift);
            }
            __syncwarp();
            // Lane L holds bins 255 - 8L - i (largest first); a scan over the lanes finds
            // the bin where the running count reaches `need`.
            unsigned c[8], sum = 0u;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                c[i] = hist[255 - 8 * lane - i];
                sum += c[i];
            }
            unsigned inc = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned x = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += x;
            }
            const unsigned exc = inc - sum;
            const int L = __ffs(__ballot_sync(0xffffffffu, exc < need && need <= inc)) - 1;
            unsigned digit = 0u, left = 0u, e = exc;
            bool found = false;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                if (!found && e + c[i] >= need) {
                    digit = 255u - 8u * lane - i;
                    left = need - e;
                    found = true;
                }
                e += c[i];
            }
            __syncwarp();  // every lane has read hist before the next pass clears it
            T |= __shfl_sync(0xffffffffu, digit, L) << shift;
            need = __shfl_sync(0xffffffffu, left, L);
        }
    }
    // Keys above T are in, and the `need` lowest-slot keys equal to T.
    unsigned base = 0u, eq_seen = 0u;
    for (int j0 = 0; j0 < nb && base < count; j0 += 32) {
        const int j = j0 + lane;
        const unsigned k = j < nb ? key[j] : 0u;
        const int blk = j < nb ? idx(j) : 0;
        const bool eq = j < nb && T != 0u && k == T;
        const unsigned eb = __ballot_sync(0xffffffffu, eq);
        const bool in = k > T || (eq && eq_seen + __popc(eb & below) < need);
        eq_seen += __popc(eb);
        const unsigned ib = __ballot_sync(0xffffffffu, in);
        // A vote orders no memory: every lane's reads of this sweep's slots (key, idx)
        // happen before any lane's emit may overwrite them (the window flush emits into
        // the kept slots it reads, kernels/prefill.cuh `pf_sc_flush`).
        __syncwarp();
        if (in) emit((int)(base + __popc(ib & below)), blk, k);
        base += __popc(ib);
    }
    __syncwarp();
    return count;
}

// `pf_top_n` as a call: where it runs once after the tile loops, its registers then do not
// count against the loops' (the 12-warp pf_cmp_ws has 128 a thread).
template <class Idx, class Emit>
__device__ __noinline__ unsigned pf_top_n_call(float* sc, int nb, int n, unsigned* hist, Idx idx, Emit emit) {
    return pf_top_n(sc, nb, n, hist, idx, emit);
}

#endif  // NSA_PREFILL_PARTS_CUH
