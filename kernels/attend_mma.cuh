// Tensor-core attention core (mma.sync), shared by the compressed, selected + window and full kernels.
#ifndef NSA_ATTEND_MMA_CUH
#define NSA_ATTEND_MMA_CUH

#include "common.cuh"
#include "ptx.cuh"

// ---------------------------------------------------------------- tensor-core attention
// bf16/f16 with DK, DV multiples of 16 (the host checks; other shapes use `attend`).
// A block of NSA_MMA_WARPS warps owns (row, KV head, unit) and up to 16 heads of the group at a time
// (the rows of an m16n8k16 tile; a smaller group pads rows with zero queries). Each warp
// streams its own tiles of NSA_MMA_KEYS = 16 keys (tiles warp, warp + NSA_MMA_WARPS, ...) through `p.launch.nstage`
// (2..NSA_MMA_MAX_STAGES, picked by the host from the occupancy) shared-memory stages with
// cp.async (16-byte copies, zero-filled for masked keys),
// computes S = Q K^T (ldmatrix + mma), an online softmax in registers, O += P V (P
// packed to 16 bits as the A operand, V through ldmatrix.trans), then the warps' states
// are merged in shared memory and stored as the unit's partial (m, l, acc).
// With `p.launch.mode & 1` (sm_90) a tile is loaded by 1-D bulk copies instead, one K or V row
// per lane, completing on the stage's mbarrier; masked keys of a partly valid tile copy a
// valid row of the tile (their scores are masked), fully masked tiles load nothing.
// With `p.launch.mode & 2` (sm_90, DK and DV multiples of 64, 16-aligned pages and blocks) a tile
// is DK/64 + DV/64 boxes of a tensor map instead (16 rows x 128 bytes each, the copy
// engine's 128-byte swizzle, which the ldmatrix addresses undo): a few large requests
// instead of 32 row copies. The copy engine issues requests slowly, so this is what keeps
// enough bytes in flight. Masked keys' V rows are zeroed after arrival.
// MMA_COPY_LDGSTS (compile time, the compressed branch's entries for the same pages) fills
// the same swizzled boxes by cp.async instead, 16 bytes a lane, consecutive lanes on
// consecutive chunks of a row: a stream of 16-byte copies reads DRAM faster than the copy
// engine's boxes (4.4-4.5 against 3.6 TB/s in scripts/stream_probe.py and
// scripts/l2_partition_probe.py on the H200).
// Shared: q_s[16][DK+8] | mbarriers[NSA_MMA_WARPS][NSA_MMA_MAX_STAGES] (128 bytes) | per warp, per stage:
// K[16][DK+8] V[16][DV+8] (16-bit; unpadded K[DK/64][16][64] V[DV/64][16][64] boxes from a
// 1024-byte boundary with tensor maps); after the loop the stages are reused for the
// merge: acc[NSA_MMA_WARPS][16][DV + 8] | m[NSA_MMA_WARPS][16] | l.

// How far a tile's max may exceed a row's softmax reference before the reference (and with
// it the accumulators) moves: P = exp(s - m) stays below e^8 (see the main loop).
constexpr float RESCALE_SLACK = 8.f;

// The keys of one unit: a contiguous range [lo, lo + n), or `n / sel_block` selected blocks
// (`blocks`, -1 = none) of sel_block keys each, masked past position t.
struct Keys {
    const int* blocks;
    int lo, n, t;
    int first;  // contiguous ranges: positions below it are masked (a 16-aligned window start)
    // Nothing this step writes lies in the unit's tiles (block-uniform): the first S - 1
    // copies go out before the wait on the previous launch (kernels/compressed.cuh says
    // when that holds).
    bool ready;
};
__device__ __forceinline__ int key_pos(const Params& p, const Keys& ks, int j) {
    if (j >= ks.n) return -1;
    if (!ks.blocks) return ks.lo + j >= ks.first ? ks.lo + j : -1;
    int b = ks.blocks[j / p.shape.sel_block];
    if (b < 0) return -1;
    int pos = b * p.shape.sel_block + j % p.shape.sel_block;
    return pos <= ks.t ? pos : -1;
}

// Window unit c of a row of length t: `sel_block * spb` keys from the window's first
// position t + 1 - window (rounded down to 16 with tensor maps, whose tiles are whole
// 16-row boxes; the positions before it masked). The window's units of `sw_mma`, and of
// `cmp_mma` when the host puts them in the compressed launch (kernels/compressed.cuh).
// With MODE_WIN_LOCAL (kernels/ptx.cuh) unit 0 is the forced local blocks' keys [L, t] (L a
// multiple of sel_block, inside the window: the host checks window >= sel_local * sel_block
// and that sel_block is a power of two)
// and units 1.. the window's keys below L.
__device__ __forceinline__ int local_start(const Params& p, int t) {
    const int lb = __ffs(p.shape.sel_block) - 1;  // a power of two (the host checks)
    return max(0, (t >> lb) - p.shape.sel_local + 1) << lb;
}
// WL: whether the entry honours MODE_WIN_LOCAL (the compiled-shape entries: in the any-shape ones
// its arithmetic pushed `cmp_mma` past its registers; the host sets the bit only where the
// compiled-shape entries run).
template <bool WL>
__device__ __forceinline__ Keys window_keys(const Params& p, int t, int c) {
    const int span = p.shape.sel_block * p.launch.spb, wlo = max(0, t + 1 - p.shape.window);
    const int base = (p.launch.mode & 2) ? wlo & ~(NSA_WINDOW_ALIGN - 1) : wlo;
    const bool local = WL && (p.launch.mode & MODE_WIN_LOCAL) != 0;
    const int L = local ? local_start(p, t) : t + 1;  // the end of the spans
    const int lo = local && c == 0 ? L : base + (c - local) * span, hi = local && c == 0 ? t + 1 : min(lo + span, L);
    return Keys{0, lo, hi > lo ? hi - lo : 0, t, wlo, false};
}

// The page-table entries of keys [lo, lo + max(n, 1)) into L2 (each tile's page lookup
// comes after the wait: the lookup is then not a DRAM round trip on the step's chain; the
// table is the step's upload, written before the layer's first kernel).
__device__ __forceinline__ void prefetch_pages(const Params& p, const int* table, int lo, int n) {
    const int e0 = max(lo, 0) / p.paging.page_size, e1 = (lo + max(n, 1) - 1) / p.paging.page_size;
    prefetch_range((usize)(table + e0), (usize)(e1 + 1 - e0) * sizeof(int));
}

// Calls f(hcn, hg0, q) for each chunk of at most 16 of row r's query heads of KV head kvh
// (the rows of one mma tile): hcn heads from global head hg0, whose queries start at q.
template <class F>
__device__ __forceinline__ void for_head_chunks(const Params& p, int r, int kvh, F f) {
    for (int h0 = 0; h0 < p.shape.group_size; h0 += 16) {
        const int hcn = min(16, p.shape.group_size - h0), hg0 = kvh * p.shape.group_size + h0;
        f(hcn, hg0, (const u16*)p.io.q + ((usize)r * p.shape.num_q_heads + hg0) * p.shape.head_dim_qk);
    }
}

// DKT, DVT: the head dims when compiled for one shape (the unrolled steps then use constant
// shared-memory offsets and need no branches), 0 to read them from `p.shape`.
// Work a caller runs right after the wait, before the first tile (every thread calls it;
// a block barrier follows when it returns true, which must be block-uniform): `NoPrep`
// none; `Prep<F>` calls F (selected units build their block list there,
// kernels/selected.cuh). With `own_wait` (block-uniform) the kernel only triggers its
// dependents there and F does whatever waiting the unit needs (MODE_SW_FLOW, kernels/ptx.cuh).
struct NoPrep {
    static constexpr bool active = false;
    static constexpr bool own_wait = false;
    __device__ bool operator()() const { return false; }
};
template <class F>
struct Prep {
    static constexpr bool active = true;
    F f;
    bool own_wait;
    __device__ bool operator()() const { return f(); }
};

// CP: the copy path, MMA_COPY_MODE (from `launch.mode`'s bits 1 and 2 at run time) or
// MMA_COPY_TMA (tensor maps, fixed at compile time: the entries the host picks on sm_90
// with tensor maps, which then hold no code for the other two paths; each multiprocessor
// fetches a kernel's code cold at every step, docs/DECODE_NOTES.md variant 57).
#define MMA_COPY_MODE 0
#define MMA_COPY_TMA 2
// MMA_COPY_LDGSTS: tiles as MMA_COPY_TMA's (16 contiguous rows of a page in the boxes'
// swizzled layout), copied by cp.async and completed by cp.async groups (see above).
#define MMA_COPY_LDGSTS 3
// GSM: the compressed branch's group sums as one more tensor-core product (the compressed
// entries for large waves, `_ldsg`; see below), else per lane with shuffles.
template <class E, int NVT, int DKT, int DVT, int CP = MMA_COPY_MODE, bool GSM = false, class P = NoPrep>
__device__ void attend_mma(const Params& p, const u16* kpool, const u16* vpool, u64 kmap, u64 vmap, const int* table,
                           int kvh, const Keys& ks, int hcn, const u16* qsrc, int wr, int hglob0, int u,
                           float* logit_out, const P& prep = P()) {
    extern __shared__ float smem[];
    const int DK = DKT ? DKT : p.shape.head_dim_qk, DV = DVT ? DVT : p.shape.head_dim_v;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q4 = lane & 3;
    constexpr bool lds = CP == MMA_COPY_LDGSTS;
    const bool bulk = CP == MMA_COPY_TMA || (!lds && (p.launch.mode & 1) != 0),
               tma = CP == MMA_COPY_TMA || lds || (p.launch.mode & 2) != 0;
    // Decode reads each K/V line once: with `mode & 8` its copies go first out of L2, and
    // the logits and partials the kernels after this one read stay there (variant 22).
    const u64 l2pol = (p.launch.mode & 8) ? l2_evict_first() : 0;
    // Compressed branch with `mode & 32`: instead of each head's raw logits, each group of
    // B = eq9_b tokens (B = 2, 4 or 8, A = eq9_a <= B + 1) gets two numbers per head, the
    // log2 of its tokens' Eq. 9-weighted probabilities for its own selection block (x) and
    // for the next one (y), against this warp's softmax reference; the selection rescales
    // them by the head's final (max, sum). Half the bytes of the logits at B = 4.
    const bool groups = logit_out && (p.launch.mode & 32);
    // A lane's weights (the same on every tile: splits start at multiples of 16): token i of
    // group j is tap i + A - 1 of block j and tap i - B + A - 1 of block j + 1.
    float o0 = 0.f, o1 = 0.f, n0 = 0.f, n1 = 0.f;
    // The lane's two heads' rows of group sums (g and g + 8 of the chunk), set once.
    float* const gsA = groups ? logit_out + (usize)g * p.ws.max_cmp : nullptr;
    float* const gsB = groups ? gsA + (usize)8 * p.ws.max_cmp : nullptr;
    if (groups) {
        const int A = p.shape.eq9_a, B = p.shape.eq9_b, i0 = (q4 * 2) & (B - 1);
        o0 = overlap_count(i0 + A - 1, A, B);
        o1 = overlap_count(i0 + A, A, B);
        n0 = overlap_count(i0 - B + A - 1, A, B);
        n1 = overlap_count(i0 - B + A, A, B);
    }
    // GSM: the group sums as one more m16n8k16 product per tile, the tile's probabilities P
    // (16 heads x 16 keys: the A fragments P V takes, here in f16) times a constant matrix W
    // of Eq. 9's overlap counts (16 keys x 8 columns: column 2q group q's own part x, 2q + 1
    // its part y for the next block; small integers, exact in f16), so lane (g, q4) receives
    // group 4t + q4's (x, y) for heads g and g + 8 from n-tile t (B = 2 takes two n-tiles,
    // B = 8 columns 0-3 only). P goes in as f16 hi + lo parts (two products): f16 alone
    // rounds each probability by 2^-11 and moved 2% of the selections past the near-tie
    // limit at 128k; the two parts keep the sums within ~2^-22, as the f32 sums. Per tile at
    // B = 4 it replaces eight multiplies, eight shuffles, eight adds, eight log2s on half
    // the lanes and four stores by two products, twelve conversions, four log2s and two
    // stores (docs/DECODE_NOTES.md, variant 119). `gw[t]`: the lane's B fragments of W.
    unsigned gw[2][2] = {{0u, 0u}, {0u, 0u}};
    if (GSM && groups) {
        const int A = p.shape.eq9_a, B = p.shape.eq9_b;
        auto w = [&](int c, int k) {  // W[k][c]
            return k / B == c / 2 ? overlap_count(k % B + ((c & 1) ? A - 1 - B : A - 1), A, B) : 0.f;
        };
#pragma unroll
        for (int t = 0; t < 2; t++) {
            const int c = 8 * t + g;
            gw[t][0] = EF16::pk(w(c, 2 * q4), w(c, 2 * q4 + 1));
            gw[t][1] = EF16::pk(w(c, 2 * q4 + 8), w(c, 2 * q4 + 9));
        }
    }
    // Tensor-map tiles are unpadded, 128-byte swizzled boxes of 16 rows x 64 columns.
    const int QS = DK + 8, VS = tma ? DV : DV + 8, KS = tma ? DK : QS;
    const int stage_elems = NSA_MMA_KEYS * (KS + VS);
    u16* q_s = (u16*)smem;
    unsigned long long* bars = (unsigned long long*)(q_s + 16 * QS);
    u16* stg = q_s + 16 * QS + NSA_MMA_WARPS * NSA_MMA_MAX_STAGES * 4;  // the mbarriers, 8 bytes each (MBAR_BYTES)
    if (tma) stg = (u16*)smem + ((smem_u32(stg) + 1023u & ~1023u) - smem_u32(smem)) / 2;  // box alignment
    const int S = p.launch.nstage;
    u16* my = stg + warp * S * stage_elems;
    const unsigned bar0 = smem_u32(bars + warp * NSA_MMA_MAX_STAGES);
    if (bulk && lane == 0) {
        for (int st = 0; st < S; st++) mbar_init(bar0 + 8 * st, 1);
        fence_mbar_init();
    }
    // The tensor maps are written once at the backend's creation: their descriptors can
    // come in before the wait, off the chain of a unit whose first copy follows it (the
    // selected units copy only once their block list is known; variant 48).
    if (tma && !lds && tid == 0) {
        prefetch_tensormap(kmap);
        prefetch_tensormap(vmap);
    }
    const int ntiles = (ks.n + NSA_MMA_KEYS - 1) / NSA_MMA_KEYS;
    const int cnt = ntiles > warp ? (ntiles - warp + NSA_MMA_WARPS - 1) / NSA_MMA_WARPS : 0;
    const int ck = DK / 8, cv = DV / 8;
    // Tensor maps: lane l holds the first key position, its row in the page (y) and the box
    // row (z = page * HKV + kvh) of the warp's tiles 32g + l, looked up together once per 32
    // tiles (one round of selection-index and page-table loads and one division, instead
    // of two dependent loads and a division before each tile's copy). Two groups (g even /
    // odd) live at once: the copies run S - 1 tiles ahead of the math, which still reads
    // the previous group.
    int tpos[2] = {-1, -1}, tz[2] = {0, 0}, ty[2] = {0, 0};
    auto tile_src = [&](int li) {  // warp-local tile li = (ti - warp) / NSA_MMA_WARPS, lane's entry
        const int g = (li >> 5) & 1, j0 = (warp + li * NSA_MMA_WARPS) * NSA_MMA_KEYS;
        int pos0 = -1;
        if (j0 < ks.n) {
            if (ks.blocks) {
                int b = ks.blocks[j0 / p.shape.sel_block];
                pos0 = b >= 0 && b * p.shape.sel_block + j0 % p.shape.sel_block <= ks.t ? b * p.shape.sel_block + j0 % p.shape.sel_block : -1;
            } else {
                pos0 = ks.lo + min(j0 + NSA_MMA_KEYS, ks.n) - 1 >= ks.first ? ks.lo + j0 : -1;
            }
        }
        const int pg = pos0 >= 0 ? pos0 / p.paging.page_size : 0;
        const int z = pos0 >= 0 ? table[pg] * p.shape.num_kv_heads + kvh : 0, y = pos0 - pg * p.paging.page_size;
        if (g) {
            tpos[1] = pos0;
            tz[1] = z;
            ty[1] = y;
        } else {
            tpos[0] = pos0;
            tz[0] = z;
            ty[0] = y;
        }
    };
    // First key position of warp-local tile li (a shuffle: call it warp-uniformly).
    auto tile_pos0 = [&](int li) { return __shfl_sync(0xffffffffu, (li >> 5) & 1 ? tpos[1] : tpos[0], li & 31); };
    // Position of key jj (0..15) of warp-local tile li, given its first position, or -1.
    auto tile_key = [&](int li, int pos0, int jj) {
        if (pos0 < 0) return -1;
        int pos = pos0 + jj;
        if (ks.blocks) return pos <= ks.t ? pos : -1;
        return (warp + li * NSA_MMA_WARPS) * NSA_MMA_KEYS + jj < ks.n && pos >= ks.first ? pos : -1;
    };
    auto load = [&](int li, int st) {  // the warp's tile li (block tile warp + li * NSA_MMA_WARPS) into stage st
        const int ti = warp + li * NSA_MMA_WARPS;
        u16* kd = my + st * stage_elems;
        u16* vd = kd + NSA_MMA_KEYS * KS;
        if (tma) {
            // The tile's keys are 16 consecutive rows of one page (the host guarantees
            // 16-aligned ranges, blocks and pages): DK/64 + DV/64 box loads.
            if ((li & 31) == 0) tile_src(li + lane);
            int pos0 = tile_pos0(li);
            int z = __shfl_sync(0xffffffffu, (li >> 5) & 1 ? tz[1] : tz[0], li & 31);
            if (lds) {
                if (pos0 < 0) return;  // nothing to copy (the caller commits an empty group)
                const int y = __shfl_sync(0xffffffffu, (li >> 5) & 1 ? ty[1] : ty[0], li & 31);
                const usize row0 = (usize)z * p.paging.page_size + y;
                // 16 rows of D columns from `src` (contiguous) into boxes at `dst`: chunk cc
                // of row r goes to box cc / 8, 16-byte slot (cc % 8) ^ (r % 8) of its row.
                auto rows = [&](u16* dst, const u16* src, const int D) {
#pragma unroll
                    for (int x = lane; x < NSA_MMA_KEYS * (D / 8); x += 32) {
                        const int r = x / (D / 8), cc = x % (D / 8);
                        cp_async16_pol(smem_u32(dst) + (cc >> 3) * 2048 + r * 128 + (((cc & 7) ^ (r & 7)) << 4), src + (usize)x * 8, l2pol);
                    }
                };
                rows(kd, kpool + row0 * DK, DK);
                rows(vd, vpool + row0 * DV, DV);
                return;
            }
            unsigned bar = bar0 + 8 * st;
            fence_async_smem();
            if (pos0 < 0) {
                if (lane == 0) mbar_expect(bar, 0u);
                return;
            }
            if (lane == 0) mbar_expect(bar, (unsigned)(NSA_MMA_KEYS * (DK + DV) * 2));
            __syncwarp();
            int y = __shfl_sync(0xffffffffu, (li >> 5) & 1 ? ty[1] : ty[0], li & 31);
            int nbk = DK / 64, nbv = DV / 64;
            const bool isv = lane >= nbk;
            const unsigned dst = smem_u32(isv ? vd : kd) + (isv ? lane - nbk : lane) * 2048;
            if (lane < nbk + nbv) {
                if (l2pol)
                    tma_load3_hint(dst, isv ? vmap : kmap, (isv ? lane - nbk : lane) * 64, y, z, bar, l2pol);
                else
                    tma_load3(dst, isv ? vmap : kmap, (isv ? lane - nbk : lane) * 64, y, z, bar);
            }
            return;
        }
        if (bulk) {
            int j = lane & (NSA_MMA_KEYS - 1);
            int pos = key_pos(p, ks, ti * NSA_MMA_KEYS + j);
            unsigned valid = __ballot_sync(0xffffffffu, pos >= 0) & 0xffffu;
            unsigned bar = bar0 + 8 * st;
            fence_async_smem();  // earlier generic accesses of the stage before the copy engine's writes
            if (valid == 0u) {
                if (lane == 0) mbar_expect(bar, 0u);
                return;
            }
            int first = __shfl_sync(0xffffffffu, pos, __ffs(valid) - 1);
            int src = pos >= 0 ? pos : first;
            if (lane == 0) mbar_expect(bar, (unsigned)(NSA_MMA_KEYS * (DK + DV) * 2));
            __syncwarp();
            int page = table[src / p.paging.page_size];
            int off = src % p.paging.page_size;
            if (lane < NSA_MMA_KEYS)
                bulk_g2s(smem_u32(kd + j * QS), kpool + row_at(p, page, kvh, off, DK), (unsigned)(DK * 2), bar);
            else
                bulk_g2s(smem_u32(vd + j * VS), vpool + row_at(p, page, kvh, off, DV), (unsigned)(DV * 2), bar);
            return;
        }
        int pos = lane < NSA_MMA_KEYS ? key_pos(p, ks, ti * NSA_MMA_KEYS + lane) : -1;
        usize rk = 0, rv = 0;
        if (pos >= 0) {
            int page = table[pos / p.paging.page_size];
            int off = pos % p.paging.page_size;
            rk = row_at(p, page, kvh, off, DK);
            rv = row_at(p, page, kvh, off, DV);
        }
        for (int j = 0; j < NSA_MMA_KEYS; j++) {
            int pj = __shfl_sync(0xffffffffu, pos, j);
            usize k0 = __shfl_sync(0xffffffffu, rk, j);
            usize v0 = __shfl_sync(0xffffffffu, rv, j);
            int bytes = pj >= 0 ? 16 : 0;
            for (int c = lane; c < ck; c += 32) cp_async16(smem_u32(kd + j * QS + c * 8), kpool + k0 + c * 8, bytes);
            for (int c = lane; c < cv; c += 32) cp_async16(smem_u32(vd + j * VS + c * 8), vpool + v0 + c * 8, bytes);
        }
    };
    // The pipeline's first S - 1 tiles (every one of them at batch 1), issued here for a
    // unit whose keys the step does not write, so that their DRAM time overlaps the
    // previous launch and the Q loads below; else right after the wait.
    auto fill = [&]() {
        for (int st = 0; st < S - 1; st++) {
            if (st < cnt) load(st, st);
            cp_commit();
        }
    };
    // The Q tile: 16-byte loads, all independent (DK is a multiple of 16, so rows stay
    // aligned), at most QMAX a thread (DK <= 256 at 128 threads), all issued before a ready
    // unit's tile copies so that they do not queue behind them; stored after.
    constexpr int QMAX = 4;
    const int cpr = DK / 8;
    const bool qvec = ((usize)qsrc & 15) == 0 && 16 * cpr <= QMAX * (int)blockDim.x;
    if (qvec) {
        uint4 qx[QMAX];
#pragma unroll
        for (int k = 0; k < QMAX; k++) {
            const int e = tid + k * blockDim.x, h = e / cpr, c = (e - h * cpr) * 8;
            qx[k] = e < 16 * cpr && h < hcn ? *(const uint4*)(qsrc + (usize)h * DK + c) : make_uint4(0, 0, 0, 0);
        }
        if (ks.ready) fill();
#pragma unroll
        for (int k = 0; k < QMAX; k++) {
            const int e = tid + k * blockDim.x, h = e / cpr, c = (e - h * cpr) * 8;
            if (e < 16 * cpr) *(uint4*)(q_s + h * QS + c) = qx[k];
        }
    } else {
        if (ks.ready) fill();
        for (int e = tid; e < 16 * DK; e += blockDim.x) {
            int h = e / DK, c = e - h * DK;
            q_s[h * QS + c] = h < hcn ? qsrc[(usize)h * DK + c] : (u16)0;
        }
    }
    __syncthreads();
    if (logit_out) tl_mark<7>();  // the timeline (compressed branch): Q staged, the first copies issued; the wait next
    // Everything above overlaps the previous kernel (programmatic dependent launch): the
    // K/V pages (but a ready unit's first tiles), the selection and the workspace are read
    // or written only from here.
    if (P::active && prep.own_wait) {
        pdl_trigger();
    } else {
        pdl_wait_then_trigger(p);
    }
    if (P::active && prep()) __syncthreads();
    tl_mark<0>();  // the timeline: after the wait and the caller's prep (a selected unit's list)
    float o[NVT][4];
#pragma unroll
    for (int i = 0; i < NVT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;
    // mA, mB * log2(e): each probability is then one FFMA and one EX2 (docs/DECODE_NOTES.md,
    // variant 96).
    float mA2 = NEG_INF, mB2 = NEG_INF;
    const float scl = p.shape.scale, sl2 = scl * 1.4426950408889634f;
    if (!ks.ready) fill();
    tl_mark<1>();  // the first tiles' copies issued: the tile loop begins
    const unsigned qa = smem_u32(q_s + ((lane & 7) + ((lane >> 3) & 1) * 8) * QS + (lane >> 4) * 8);
    // Stages as running counters (no division by the runtime S per tile): tile i is read
    // from stage `cs` (phase `cph` of its mbarrier), tile i + S - 1 is copied into `ls`.
    int cs = 0, cph = 0, ls = S - 1;
    for (int i = 0; i < cnt; i++) {
        if (i + S - 1 < cnt) load(i + S - 1, ls);
        ls = ls + 1 == S ? 0 : ls + 1;
        const int st = cs;
        if (bulk) mbar_wait(bar0 + 8 * st, (unsigned)cph);
        if (++cs == S) {
            cs = 0;
            cph ^= 1;
        }
        if (!bulk) {
            cp_commit();
            if (S == 2)
                cp_wait<1>();
            else if (S == 3)
                cp_wait<2>();
            else
                cp_wait<3>();
        }
        if (i == 0) tl_mark<2>();  // the timeline: warp 0's first tile has arrived
        __syncwarp();
        const int j0 = (warp + i * NSA_MMA_WARPS) * NSA_MMA_KEYS;
        // A tile with no visible key (a -1 block, a block past t) is skipped: its stage
        // holds no copied rows in bulk mode.
        const int tp0 = tma ? tile_pos0(i) : -1;
        // A tile wholly inside its unit's visible keys (warp-uniform) skips the per-key test.
        const bool whole = tma && tp0 >= 0 && (ks.blocks ? tp0 + NSA_MMA_KEYS - 1 <= ks.t : j0 + NSA_MMA_KEYS <= ks.n && tp0 >= ks.first);
        unsigned vis = whole ? 0xffffu
                             : __ballot_sync(0xffffffffu, (tma ? tile_key(i, tp0, lane & (NSA_MMA_KEYS - 1)) : key_pos(p, ks, j0 + (lane & (NSA_MMA_KEYS - 1)))) >= 0) &
                                   0xffffu;
        if (vis == 0u) continue;
        u16* kt = my + st * stage_elems;
        u16* vt = kt + NSA_MMA_KEYS * KS;
        if (tma && vis != 0xffffu) {
            // Box rows of masked keys hold whatever the page holds there (maybe NaN):
            // zero their V rows, as P = 0 times NaN is NaN. (The next copy into this stage
            // is ordered after these writes by the proxy fence in `load`.)
            for (int x = lane; x < NSA_MMA_KEYS * (DV / 8); x += 32) {
                int r = x & (NSA_MMA_KEYS - 1), c = x >> 4;  // row, 16-byte chunk (any order: whole rows)
                if (!((vis >> r) & 1u)) *(uint4*)(vt + (c >> 3) * 1024 + r * 64 + (c & 7) * 8) = make_uint4(0, 0, 0, 0);
            }
            __syncwarp();
        }
        // S = Q K^T in two pairs of accumulator chains (even and odd 16-column steps) so
        // consecutive mma do not wait on each other.
        float s[2][4], s2[2][4];
#pragma unroll
        for (int e = 0; e < 4; e++) s[0][e] = s[1][e] = s2[0][e] = s2[1][e] = 0.f;
        // ldmatrix row addresses; swizzled boxes: 16-byte chunk c of row r of a box sits
        // at chunk c ^ (r & 7) of the row (the copy engine's 128-byte swizzle).
        const int krow = (lane & 7) + (lane >> 4) * 8, kc = (lane >> 3) & 1;
        const unsigned ka = tma ? smem_u32(kt) + krow * 128 : smem_u32(kt + krow * KS + kc * 8);
        auto qk_step = [&](int kk, float (&acc)[2][4]) {
            unsigned a0, a1, a2, a3, b0, b1, b2, b3;
            ldsm4(qa + kk * 2, a0, a1, a2, a3);
            ldsm4(tma ? ka + ((kk >> 6) << 11) + (((((kk >> 3) & 7) + kc) ^ (krow & 7)) << 4) : ka + kk * 2, b0, b1, b2, b3);
            mma16816<E::MMA>(acc[0], a0, a1, a2, a3, b0, b1);
            mma16816<E::MMA>(acc[1], a0, a1, a2, a3, b2, b3);
        };
#pragma unroll
        for (int kk = 0; kk < DK; kk += 32) {
            qk_step(kk, s);
            if (kk + 16 < DK) qk_step(kk + 16, s2);
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            s[0][e] += s2[0][e];
            s[1][e] += s2[1][e];
        }
        // s holds unscaled logits from here (the scale is > 0, so maxima commute with it):
        // the scale joins log2(e) in each probability's FFMA, and the maxima are scaled once.
        // Keep the raw logits (compressed branch: keys are the contiguous range from
        // ks.lo, so key jj of the tile is position ks.lo + j0 + jj), then mask the keys the
        // tile's visibility bits exclude. A lane's two keys of an n8 tile are adjacent
        // positions: one 8-byte store per head when both are visible and the pair is
        // 8-byte aligned (the host keeps max_cmp even).
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            const int jj = nt * 8 + q4 * 2;
            const bool v0 = (vis >> jj) & 1u, v1 = (vis >> (jj + 1)) & 1u;
            if (logit_out && !groups) {
                const int pos = ks.lo + j0 + jj;
                float* la = logit_out + (usize)g * p.ws.max_cmp + pos;
                float* lb = logit_out + (usize)(g + 8) * p.ws.max_cmp + pos;
                if (v0 && v1 && (pos & 1) == 0) {
                    if (g < hcn) *(float2*)la = make_float2(s[nt][0] * scl, s[nt][1] * scl);
                    if (g + 8 < hcn) *(float2*)lb = make_float2(s[nt][2] * scl, s[nt][3] * scl);
                } else {
                    if (v0 && g < hcn) la[0] = s[nt][0] * scl;
                    if (v1 && g < hcn) la[1] = s[nt][1] * scl;
                    if (v0 && g + 8 < hcn) lb[0] = s[nt][2] * scl;
                    if (v1 && g + 8 < hcn) lb[1] = s[nt][3] * scl;
                }
            }
            if (vis != 0xffffu) {
                if (!v0) s[nt][0] = s[nt][2] = NEG_INF;
                if (!v1) s[nt][1] = s[nt][3] = NEG_INF;
            }
        }
        float xA = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
        float xB = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
        xA *= scl;
        xB *= scl;
        // Lazy rescale: a row's reference max moves only when the tile's max exceeds it by
        // more than RESCALE_SLACK (or it is still -inf), and then every row of the warp
        // moves to its true max. Between moves P = exp(s - m) stays below e^SLACK, well
        // inside f32 and the 16-bit P; l and the accumulators always share the reference,
        // so the partial (m, l, acc) is the same softmax state with fewer rescales (the
        // 64 multiplies of the accumulators are skipped on most tiles).
        if (__any_sync(0xffffffffu, xA > mA + RESCALE_SLACK || xB > mB + RESCALE_SLACK)) {
            const float nA = fmaxf(mA, xA), nB = fmaxf(mB, xB);
            const float cA = mA == NEG_INF ? 0.f : fexp(mA - nA), cB = mB == NEG_INF ? 0.f : fexp(mB - nB);
            lA *= cA;
            lB *= cB;
#pragma unroll
            for (int d = 0; d < NVT; d++) {
                o[d][0] *= cA;
                o[d][1] *= cA;
                o[d][2] *= cB;
                o[d][3] *= cB;
            }
            mA = nA;
            mB = nB;
            mA2 = mA * 1.4426950408889634f;
            mB2 = mB * 1.4426950408889634f;
        }
        // Every row's reference is finite here (a tile with a visible key gives each row a
        // finite max, and the first such tile moved the reference).
        float pr[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            pr[nt][0] = ex2f(fmaf(s[nt][0], sl2, -mA2));
            pr[nt][1] = ex2f(fmaf(s[nt][1], sl2, -mA2));
            pr[nt][2] = ex2f(fmaf(s[nt][2], sl2, -mB2));
            pr[nt][3] = ex2f(fmaf(s[nt][3], sl2, -mB2));
        }
        lA += pr[0][0] + pr[0][1] + pr[1][0] + pr[1][1];
        lB += pr[0][2] + pr[0][3] + pr[1][2] + pr[1][3];
        if (GSM && groups) {
            const int B = p.shape.eq9_b, lb = __ffs(B) - 1;
            // P's f16 hi parts and the f32 remainders' f16 lo parts, in P V's A-fragment order.
            unsigned hi[4], lo[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float a = pr[e >> 1][(e & 1) * 2], b = pr[e >> 1][(e & 1) * 2 + 1];
                float ha, hb;
                hi[e] = EF16::pk(a, b);
                EF16::upk(hi[e], ha, hb);
                lo[e] = EF16::pk(a - ha, b - hb);
            }
#pragma unroll
            for (int t = 0; t < 2; t++) {
                if (t * 8 < 32 / B) {  // the n-tiles holding columns (2 x 16 / B of them)
                    float c[4] = {0.f, 0.f, 0.f, 0.f};
                    mma16816<EF16::MMA>(c, hi[0], hi[1], hi[2], hi[3], gw[t][0], gw[t][1]);
                    mma16816<EF16::MMA>(c, lo[0], lo[1], lo[2], lo[3], gw[t][0], gw[t][1]);
                    // The lane's group, for groups that start inside the split.
                    const int gq = 4 * t + q4, pos = ks.lo + j0 + gq * B;
                    if (gq < (16 >> lb) && pos < ks.lo + ks.n) {
                        const int gi = pos >> lb;
                        if (g < hcn) *(float2*)(gsA + 2 * gi) = make_float2(lg2f(c[0]) + mA2, lg2f(c[1]) + mA2);
                        if (g + 8 < hcn) *(float2*)(gsB + 2 * gi) = make_float2(lg2f(c[2]) + mB2, lg2f(c[3]) + mB2);
                    }
                }
            }
        } else if (groups) {
            // A lane's two keys of an n8 tile lie in one group (B >= 2) and a group in one n8
            // tile (B <= 8; splits start at multiples of 16): B / 2 lanes hold a group.
            const int B = p.shape.eq9_b;
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                const int pos = ks.lo + j0 + nt * 8 + q4 * 2;
                float xa = o0 * pr[nt][0] + o1 * pr[nt][1], ya = n0 * pr[nt][0] + n1 * pr[nt][1];
                float xb = o0 * pr[nt][2] + o1 * pr[nt][3], yb = n0 * pr[nt][2] + n1 * pr[nt][3];
                for (int o = 1; o < B / 2; o <<= 1) {
                    xa += __shfl_xor_sync(0xffffffffu, xa, o);
                    ya += __shfl_xor_sync(0xffffffffu, ya, o);
                    xb += __shfl_xor_sync(0xffffffffu, xb, o);
                    yb += __shfl_xor_sync(0xffffffffu, yb, o);
                }
                // The group's first lane stores, for groups that start inside the split.
                if ((q4 & (B / 2 - 1)) == 0 && pos < ks.lo + ks.n) {
                    const int gi = pos >> (__ffs(B) - 1);
                    if (g < hcn) *(float2*)(gsA + 2 * gi) = make_float2(lg2f(xa) + mA2, lg2f(ya) + mA2);
                    if (g + 8 < hcn) *(float2*)(gsB + 2 * gi) = make_float2(lg2f(xb) + mB2, lg2f(yb) + mB2);
                }
            }
        }
        unsigned pa0 = pack2<E::MMA>(pr[0][0], pr[0][1]), pa1 = pack2<E::MMA>(pr[0][2], pr[0][3]);
        unsigned pa2 = pack2<E::MMA>(pr[1][0], pr[1][1]), pa3 = pack2<E::MMA>(pr[1][2], pr[1][3]);
        const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vc = lane >> 4;
        const unsigned va = tma ? smem_u32(vt) + vrow * 128 : smem_u32(vt + vrow * VS + vc * 8);
#pragma unroll
        for (int dp = 0; dp < NVT / 2; dp++) {
            if (dp * 16 < DV) {
                unsigned b0, b1, b2, b3;
                ldsm4t(tma ? va + ((dp >> 2) << 11) + (((((dp * 2) & 7) + vc) ^ (vrow & 7)) << 4) : va + dp * 32, b0, b1,
                       b2, b3);
                mma16816<E::MMA>(o[2 * dp], pa0, pa1, pa2, pa3, b0, b1);
                mma16816<E::MMA>(o[2 * dp + 1], pa0, pa1, pa2, pa3, b2, b3);
            }
        }
        __syncwarp();
    }
    cp_wait<0>();
    __syncwarp();
    tl_mark<3>();  // warp 0's tiles done: the merge of the warps' states begins
    if (bulk && lane == 0)
        for (int st = 0; st < S; st++) mbar_inval(bar0 + 8 * st);
    lA += __shfl_xor_sync(0xffffffffu, lA, 1);
    lA += __shfl_xor_sync(0xffffffffu, lA, 2);
    lB += __shfl_xor_sync(0xffffffffu, lB, 1);
    lB += __shfl_xor_sync(0xffffffffu, lB, 2);
    __syncthreads();  // every warp is done with the stages
    // Merge of the warps' states. Every thread learns the block's max of its two heads from
    // the warps' maxima and scales its own accumulators by its warp's factor before they go
    // to shared memory (rows padded to DV + 8 floats: the float2 stores of a half warp hit
    // distinct banks); the warps' scaled accumulators are then summed 4 columns at a time.
    // At batch 1 a block holds one tile per warp, so this epilogue is most of its work.
    const int DVP = DV + 8;
    float* area = (float*)stg;
    float* mw = area + NSA_MMA_WARPS * 16 * DVP;
    float* lw = mw + NSA_MMA_WARPS * 16;
    if (q4 == 0) {
        mw[warp * 16 + g] = mA;
        mw[warp * 16 + g + 8] = mB;
        lw[warp * 16 + g] = lA;
        lw[warp * 16 + g + 8] = lB;
    }
    __syncthreads();
    float MA = NEG_INF, MB = NEG_INF;
#pragma unroll
    for (int w = 0; w < NSA_MMA_WARPS; w++) {
        MA = fmaxf(MA, mw[w * 16 + g]);
        MB = fmaxf(MB, mw[w * 16 + g + 8]);
    }
    const float fA = (MA == NEG_INF || mA == NEG_INF) ? 0.f : fexp(mA - MA);
    const float fB = (MB == NEG_INF || mB == NEG_INF) ? 0.f : fexp(mB - MB);
    float* mine = area + warp * 16 * DVP;
#pragma unroll
    for (int d = 0; d < NVT; d++) {
        if (d * 8 < DV) {
            int c = d * 8 + q4 * 2;
            *(float2*)(mine + g * DVP + c) = make_float2(o[d][0] * fA, o[d][1] * fA);
            *(float2*)(mine + (g + 8) * DVP + c) = make_float2(o[d][2] * fB, o[d][3] * fB);
        }
    }
    tl_mark<4>();  // the states scaled into shared memory: the partials' stores begin
    // Unit u's partials of heads hglob0.. : (m, l) pairs and rows of DV floats, `hs` apart.
    const usize at0 = part_at(p, wr, hglob0, u), hs = part_at(p, wr, hglob0 + 1, u) - at0;
    if (tid < hcn) {
        float m = NEG_INF, l = 0.f;
        for (int w = 0; w < NSA_MMA_WARPS; w++) m = fmaxf(m, mw[w * 16 + tid]);
        for (int w = 0; w < NSA_MMA_WARPS; w++) {
            float mwv = mw[w * 16 + tid];
            l += (m == NEG_INF || mwv == NEG_INF) ? 0.f : fexp(mwv - m) * lw[w * 16 + tid];
        }
        float* ml = (float*)p.ws.part_ml + 2 * (at0 + tid * hs);
        ml[0] = l != 0.f ? m : NEG_INF;
        ml[1] = l;
    }
    __syncthreads();
    tl_mark<5>();  // the (m, l) stored: the warps' accumulators are summed and stored
    // DV is a multiple of 16 here: rows of DV / 4 float4 groups, `per` rows per pass.
    const int gpr = DV / 4, per = blockDim.x / gpr;
    float* pacc = (float*)p.ws.part_acc + at0 * DV;
    if (tid < per * gpr) {
        const int c = (tid % gpr) * 4;
        for (int h = tid / gpr; h < hcn; h += per) {
            float4 a = *(const float4*)(area + h * DVP + c);
#pragma unroll
            for (int w = 1; w < NSA_MMA_WARPS; w++) {
                float4 b = *(const float4*)(area + (w * 16 + h) * DVP + c);
                a.x += b.x;
                a.y += b.y;
                a.z += b.z;
                a.w += b.w;
            }
            *(float4*)(pacc + h * hs * DV + c) = a;
        }
    }
    __syncthreads();  // the shared memory is reused by the next head chunk
}

#endif  // NSA_ATTEND_MMA_CUH
