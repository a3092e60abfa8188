// Prefill's selected branch block-major (docs/PREFILL_NOTES.md, variant 20): for small
// groups the position-major `pf_sw` reads each selected block's K/V once per (position,
// KV head), i.e. G heads of work per 32 KB from L2, which bounds it (G = 4: 550 GB at 64k).
// Here each (KV head, selection block) is visited once per list of the positions that chose
// it: the block's K/V sit in shared memory while the block's warps stream 16-row chunks of
// those positions' queries through it. Every (position, head, slot) gets a partial, its own
// softmax over the block's keys (output normalised, stored in the storage type; log2 of
// its sum of exponentials in f32), merged per (position, head) afterwards.
//
// A single-sequence prefill in chunks of the host's rows (`launch.pf_c0`,
// `launch.pf_rows`: the chunk's first row and its rows, relative to the sequence's first
// new row); per chunk, after `pf_cmp` wrote the selection (`pf_sel`):
//   pfb_count    entries per (KV head, block): ws.pf_cnt[l], l = kvh * max_blocks + block
//                (the host zeroes them first)
//   pfb_scan     one block: each list's first entry (ws.pf_cnt's second half, the fill
//                cursors) and its items (ws.pf_items: KV head, block, first entry, end
//                entry; at most PFB_ITEM entries each), their count after the cursors
//   pfb_fill     every entry (row << 5 | slot) into its list (ws.pf_ent), in no order
//   pfb_attn     the partials (ws.pf_part, ws.pf_lse: [row][query head][slot]), a
//                persistent grid over the items
//   pfb_merge    out += g_slc * o_slc per (row, query head): a warp each
// then `pf_sw` with WINDOW_ONLY (`nsa_pf_sww_*`) runs the window (kernels/prefill.cuh).
#ifndef NSA_PREFILL_BLOCKS_CUH
#define NSA_PREFILL_BLOCKS_CUH

#include "common.cuh"
#include "prefill_parts.cuh"  // pf_sel, PF_KT
#include "prefill_nonfinite.cuh"
#include "prefill_repair.cuh"
#include "ptx.cuh"

#define PFB_WARPS NSA_PFB_WARPS  // warps of pfb_attn's blocks
#define PFB_ITEM NSA_PFB_ITEM    // entries per item at most
#define PFB_KEYS PF_KT           // keys per selection block (the host requires sel_block == PF_KEYS)

// The chunk's entries: (row of the chunk, KV head, slot) triples in pf_sel order.
// The step's only sequence (index 0: its page table is the step's first).
struct PfbChunk {
    int row0;   // the chunk's first row in the step (q, out, gates, pf_sel)
    int pos0;   // its position
    int rows;
    int len;    // the sequence's length after the step: pool rows at or past it are stale
};
__device__ __forceinline__ PfbChunk pfb_chunk(const Params& p) {
    const PlanSeq s = ((const PlanSeq*)p.step.seqs)[0];
    PfbChunk c;
    c.row0 = s.row + p.launch.pf_c0;
    c.pos0 = s.old_len + p.launch.pf_c0;
    c.rows = p.launch.pf_rows;
    c.len = s.new_len;
    return c;
}

// Entry e of the chunk (e < rows * HKV * n): its list, or -1 for an empty slot.
__device__ __forceinline__ int pfb_list(const Params& p, const PfbChunk& c, int e, int& row, int& slot) {
    const int n = p.shape.sel_count, hkv = p.shape.num_kv_heads;
    row = e / (hkv * n);
    const int rest = e - row * hkv * n, kvh = rest / n;
    slot = rest - kvh * n;
    const int j = pf_sel(p)[(usize)(c.row0 + row) * hkv * n + rest];
    return j < 0 ? -1 : kvh * p.ws.max_blocks + j;
}

// A warp's lanes with the same list add to its counter once (block 0 and the local blocks
// are every position's: their counters would otherwise take one atomic per entry). Returns
// the lane's index among the counter's previous value's successors.
__device__ __forceinline__ int pfb_add(int* ctr, int l) {
    const unsigned same = __match_any_sync(0xffffffffu, l);
    const int lane = threadIdx.x & 31, leader = __ffs(same) - 1;
    int base = 0;
    if (l >= 0 && lane == leader) base = atomicAdd(ctr + l, __popc(same));
    base = __shfl_sync(0xffffffffu, base, leader);
    return base + __popc(same & ((1u << lane) - 1u));
}

// Every entry of the chunk counted into its list's counter (`ctr`), and with `ent` written
// there as row << 5 | slot at the counter's old value plus its rank: pfb_count (counts,
// the host zeroed them) and pfb_fill (the scan's cursors) are the same walk.
__device__ __forceinline__ void pfb_tally(const Params& p, int* ctr, int* ent) {
    const PfbChunk c = pfb_chunk(p);
    const int total = c.rows * p.shape.num_kv_heads * p.shape.sel_count;
    for (int e0 = blockIdx.x * blockDim.x; e0 < total; e0 += gridDim.x * blockDim.x) {
        const int e = e0 + threadIdx.x;
        int row = 0, slot = 0;
        const int l = e < total ? pfb_list(p, c, e, row, slot) : -1;
        const int at = pfb_add(ctr, l);
        if (ent && l >= 0) ent[at] = row << 5 | slot;
    }
}

template <class E>
__device__ void pfb_count(const Params& p) {
    pfb_tally(p, (int*)p.ws.pf_cnt, (int*)0);
}

// One block: exclusive scans of the lists' entries and pieces, a contiguous run of lists
// per thread (its sums, then a block-wide scan of the threads' sums).
template <class E>
__device__ void pfb_scan(const Params& p) {
    __shared__ int s_ent[1024], s_it[1024];
    const int L = p.shape.num_kv_heads * p.ws.max_blocks, nt = blockDim.x, tid = threadIdx.x;
    int* cnt = (int*)p.ws.pf_cnt;
    int* cur = cnt + L;
    int4* items = (int4*)p.ws.pf_items;
    const int per = (L + nt - 1) / nt, l0 = min(L, tid * per), l1 = min(L, l0 + per);
    int ne = 0, ni = 0;
    for (int l = l0; l < l1; l++) {
        const int k = cnt[l];
        ne += k;
        ni += (k + PFB_ITEM - 1) / PFB_ITEM;
    }
    s_ent[tid] = ne;
    s_it[tid] = ni;
    __syncthreads();
    // Hillis-Steele inclusive scan of the threads' sums (blockDim <= 1024).
    for (int o = 1; o < nt; o <<= 1) {
        const int a = tid >= o ? s_ent[tid - o] : 0, b = tid >= o ? s_it[tid - o] : 0;
        __syncthreads();
        s_ent[tid] += a;
        s_it[tid] += b;
        __syncthreads();
    }
    int e = s_ent[tid] - ne, it = s_it[tid] - ni;
    for (int l = l0; l < l1; l++) {
        const int k = cnt[l];
        cur[l] = e;
        for (int x = 0; x < k; x += PFB_ITEM) items[it++] = make_int4(l / p.ws.max_blocks, l % p.ws.max_blocks, e + x, e + min(k, x + PFB_ITEM));
        e += k;
    }
    if (tid == nt - 1) cur[L] = s_it[tid];  // the item count
}

template <class E>
__device__ void pfb_fill(const Params& p) {
    pfb_tally(p, (int*)p.ws.pf_cnt + p.shape.num_kv_heads * p.ws.max_blocks, (int*)p.ws.pf_ent);
}

// The 16 query rows of a warp chunk (row r: the item's entry e + r / G, head r % G) into
// its shared rows (LD elements apart), entries from the item's copy in shared memory (`es`,
// `ne` of them); rows past the item's end zero-filled. Consecutive lanes take consecutive
// 16-byte pieces of the chunk's rows, so a copy instruction writes whole rows (no bank
// conflicts between neighbouring rows) and reads them coalesced.
template <int DK, int LD>
__device__ __forceinline__ void pfb_load_q(const Params& p, const PfbChunk& c, unsigned qs, const int* es, int e, int ne,
                                           int hq0, int lg, int lane) {
    constexpr int CPR = DK / 8;  // 16-byte pieces per row
#pragma unroll
    for (int x = lane; x < 16 * CPR; x += 32) {
        const int r = x / CPR, cc = x - r * CPR, ei = e + (r >> lg);
        const bool ok = ei < ne;
        const int row = ok ? es[ei] >> 5 : 0;
        const u16* src = (const u16*)p.io.q + ((usize)(c.row0 + row) * p.shape.num_q_heads + hq0 + (r & ((1 << lg) - 1))) * DK;
        cp_async16(qs + (r * LD + cc * 8) * 2, src + cc * 8, ok ? 16 : 0);
    }
}

// Shared: K [64][DK + 8] | V [64][DV + 8] | per warp two query buffers [16][DK + 8] (bf16/f16)
// | the item's entries [PFB_ITEM] (read by every warp: no scattered global loads per row).
template <class E, int DK, int DV>
__device__ void pfb_attn(const Params& p) {
    extern __shared__ __align__(16) unsigned char pfb_smem[];
    __shared__ unsigned long long nfrows;  // the item's V rows with a non-finite element (bit r: key k0 + r)
    constexpr int LK = DK + 8, LV = DV + 8;  // padded rows: ldmatrix without bank conflicts
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const int G = p.shape.group_size, lg = __ffs(G) - 1, pw = 16 >> lg;  // positions per warp chunk
    const int hq_n = p.shape.num_q_heads, n = p.shape.sel_count;
    const PfbChunk c = pfb_chunk(p);
    const unsigned ks = smem_u32(pfb_smem), vs = ks + PFB_KEYS * LK * 2;
    const unsigned qw = vs + PFB_KEYS * LV * 2 + warp * 2 * 16 * LK * 2;
    u16* qw_ptr = (u16*)(pfb_smem + (qw - ks));
    int* es = (int*)(pfb_smem + (PFB_KEYS * LK + PFB_KEYS * LV + PFB_WARPS * 2 * 16 * LK) * 2);
    const int* ent = (const int*)p.ws.pf_ent;
    const int L = p.shape.num_kv_heads * p.ws.max_blocks;
    const int n_items = ((const int*)p.ws.pf_cnt)[2 * L];
    const int4* items = (const int4*)p.ws.pf_items;
    const int* rtab = (const int*)p.paging.raw_tab;  // the only sequence's page table
    const float sl2 = p.shape.scale * 1.4426950408889634f;
    typename E::T* part = (typename E::T*)p.ws.pf_part;
    float* lse = (float*)p.ws.pf_lse;

    for (int it = blockIdx.x; it < n_items; it += gridDim.x) {
        const int4 item = items[it];
        const int kvh = item.x, blk = item.y, e0 = item.z, e1 = item.w;
        const int hq0 = kvh * G, k0 = blk * PFB_KEYS, ne = e1 - e0;
        __syncthreads();  // the previous item's K/V and entries are no longer read
        if (tid == 0) nfrows = 0ull;
        {
            const int page = rtab[k0 / p.paging.page_size], off = k0 % p.paging.page_size;
            const u16* kb = (const u16*)p.paging.raw_k + row_at(p, page, kvh, off, DK);
            const u16* vb = (const u16*)p.paging.raw_v + row_at(p, page, kvh, off, DV);
            // Rows past the sequence's end (the last block's) are zero-filled: a stale pool
            // row may hold a NaN, and its zero probability would not cancel it (0 * NaN).
            for (int x = tid; x < PFB_KEYS * DK / 8; x += PFB_WARPS * 32) {
                const int r = x / (DK / 8), cc = x % (DK / 8);
                cp_async16(ks + (r * LK + cc * 8) * 2, kb + (usize)r * DK + cc * 8, k0 + r < c.len ? 16 : 0);
            }
            for (int x = tid; x < PFB_KEYS * DV / 8; x += PFB_WARPS * 32) {
                const int r = x / (DV / 8), cc = x % (DV / 8);
                cp_async16(vs + (r * LV + cc * 8) * 2, vb + (usize)r * DV + cc * 8, k0 + r < c.len ? 16 : 0);
            }
        }
        // The item's entries, while the K/V copies fly; from here on entries are the
        // item's (0 .. ne). Whether one's position lies inside the block, before its last
        // key: only then are some of its keys unseen by an entry (the non-finite scan below).
        bool inside = false;
        for (int x = tid; x < ne; x += PFB_WARPS * 32) {
            const int en = ent[e0 + x];
            es[x] = en;
            inside |= c.pos0 + (en >> 5) < k0 + PFB_KEYS - 1;
        }
        inside = __syncthreads_or(inside);
        int e = warp * pw, buf = 0;
        if (e < ne) pfb_load_q<DK, LK>(p, c, qw, es, e, ne, hq0, lg, lane);
        cp_commit();
        cp_wait<0>();
        // The non-finite guard (kernels/prefill_nonfinite.cuh): where the block holds keys past
        // an entry's position, each thread checks the V granules it copied (its own copies
        // are complete for it here) and marks their rows in `nfrows`.
        if (inside) {
            bool bad = false;
            unsigned long long rows = 0ull;
            for (int x = tid; x < PFB_KEYS * DV / 8; x += PFB_WARPS * 32) {
                const int r = x / (DV / 8), cc = x % (DV / 8);
                if (k0 + r < c.len && pf_nf_granule<E>(lds128(vs + (r * LV + cc * 8) * 2))) {
                    bad = true;
                    rows |= 1ull << r;
                }
            }
            if (bad) atomicOr(&nfrows, rows);
        }
        __syncthreads();

        for (; e < ne; e += PFB_WARPS * pw) {
            const unsigned qs = qw + buf * 16 * LK * 2;
            const int en = e + PFB_WARPS * pw;
            if (en < ne) pfb_load_q<DK, LK>(p, c, qw + (buf ^ 1) * 16 * LK * 2, es, en, ne, hq0, lg, lane);
            cp_commit();

            // The lane's rows' entries and positions (rows past the entries see every key);
            // whether a loaded key past the warp's first position holds a non-finite value:
            // then the rows are repaired after the step (kernels/prefill_repair.cuh).
            const int eA = e + (g >> lg), eB = e + ((g + 8) >> lg);
            const int rA = eA < ne ? es[eA] : -1, rB = eB < ne ? es[eB] : -1;
            const int tA = rA >= 0 ? c.pos0 + (rA >> 5) : 0x7fffffff, tB = rB >= 0 ? c.pos0 + (rB >> 5) : 0x7fffffff;
            const int tmin = __reduce_min_sync(0xffffffffu, min(tA, tB));
            const bool exact = k0 + PFB_KEYS - 1 > tmin && (nfrows >> max(tmin + 1 - k0, 0)) != 0ull;
            // S = Q K^T: 16 rows x 64 keys.
            float s[8][4];
#pragma unroll
            for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < DK / 32; kk++) {
                unsigned a[2][4];
#pragma unroll
                for (int h = 0; h < 2; h++)
                    ldsm4(qs + ((lane & 15) * LK + kk * 32 + h * 16 + (lane >> 4) * 8) * 2, a[h][0], a[h][1], a[h][2], a[h][3]);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    unsigned b0, b1, b2, b3;
                    ldsm4(ks + ((j * 8 + (lane & 7)) * LK + kk * 32 + (lane >> 3) * 8) * 2, b0, b1, b2, b3);
                    mma16816<E::MMA>(s[j], a[0][0], a[0][1], a[0][2], a[0][3], b0, b1);
                    mma16816<E::MMA>(s[j], a[1][0], a[1][1], a[1][2], a[1][3], b2, b3);
                }
            }
            // Causal mask (only the position's own block reaches past it) and each row's
            // softmax over the block, log2 domain.
            float mA = NEG_INF, mB = NEG_INF;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int key = k0 + j * 8 + tq * 2;
#pragma unroll
                for (int x = 0; x < 2; x++) {
                    s[j][x] = key + x <= tA ? s[j][x] * sl2 : NEG_INF;
                    s[j][2 + x] = key + x <= tB ? s[j][2 + x] * sl2 : NEG_INF;
                    mA = fmaxf(mA, s[j][x]);
                    mB = fmaxf(mB, s[j][2 + x]);
                }
            }
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) {
                mA = fmaxf(mA, __shfl_xor_sync(0xffffffffu, mA, o));
                mB = fmaxf(mB, __shfl_xor_sync(0xffffffffu, mB, o));
            }
            float lA = 0.f, lB = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int x = 0; x < 2; x++) {
                    s[j][x] = ex2f(s[j][x] - mA);
                    s[j][2 + x] = ex2f(s[j][2 + x] - mB);
                    lA += s[j][x];
                    lB += s[j][2 + x];
                }
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) {
                lA += __shfl_xor_sync(0xffffffffu, lA, o);
                lB += __shfl_xor_sync(0xffffffffu, lB, o);
            }
            // O = P V: 16 rows x DV.
            float acc[DV / 8][4];
#pragma unroll
            for (int j = 0; j < DV / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                const unsigned a0 = pack2<E::MMA>(s[2 * kk][0], s[2 * kk][1]), a1 = pack2<E::MMA>(s[2 * kk][2], s[2 * kk][3]);
                const unsigned a2 = pack2<E::MMA>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                const unsigned a3 = pack2<E::MMA>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int j = 0; j < DV / 16; j++) {
                    unsigned b0, b1, b2, b3;
                    ldsm4t(vs + ((kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LV + j * 16 + (lane >> 4) * 8) * 2, b0, b1, b2, b3);
                    mma16816<E::MMA>(acc[2 * j], a0, a1, a2, a3, b0, b1);
                    mma16816<E::MMA>(acc[2 * j + 1], a0, a1, a2, a3, b2, b3);
                }
            }
            if (exact) {
                if (rA >= 0) pf_fix_mark(p, c.row0 + (rA >> 5), 1, kvh);
                if (rB >= 0) pf_fix_mark(p, c.row0 + (rB >> 5), 1, kvh);
            }
            // The normalised partial through the chunk's (now free) query rows, then
            // 16-byte stores; the log2-sum-exp2 by one lane per row.
            const float iA = 1.f / lA, iB = 1.f / lB;
            u16* qp = qw_ptr + buf * 16 * LK;
            __syncwarp();
#pragma unroll
            for (int j = 0; j < DV / 8; j++) {
                *(unsigned*)(qp + g * LK + j * 8 + tq * 2) = pack2<E::MMA>(acc[j][0] * iA, acc[j][1] * iA);
                *(unsigned*)(qp + (g + 8) * LK + j * 8 + tq * 2) = pack2<E::MMA>(acc[j][2] * iB, acc[j][3] * iB);
            }
            const int hA = g & (G - 1), hB = (g + 8) & (G - 1);
            if (tq == 0 && rA >= 0) lse[((usize)(rA >> 5) * hq_n + hq0 + hA) * n + (rA & 31)] = mA + __log2f(lA);
            if (tq == 0 && rB >= 0) lse[((usize)(rB >> 5) * hq_n + hq0 + hB) * n + (rB & 31)] = mB + __log2f(lB);
            __syncwarp();
            // Consecutive lanes store consecutive 16-byte pieces of the rows (as pfb_load_q).
            constexpr int CPV = DV / 8;
#pragma unroll
            for (int x = lane; x < 16 * CPV; x += 32) {
                const int r = x / CPV, cc = x - r * CPV, ei = e + (r >> lg);
                if (ei < ne) {
                    const int y = es[ei];
                    typename E::T* dst = part + (((usize)(y >> 5) * hq_n + hq0 + (r & (G - 1))) * n + (y & 31)) * DV;
                    *(uint4*)(dst + cc * 8) = *(const uint4*)(qp + r * LK + cc * 8);
                }
            }
            cp_wait<0>();
            __syncwarp();
            buf ^= 1;
        }
    }
}

// out += g_slc * o_slc, o_slc = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M) over the
// row's selected slots (pf_sel >= 0). A warp per (row, query head); each lane owns DV / 32
// consecutive columns (2 or 4: the prefill shapes' DV is 64 or 128) and loads them from 8
// slots at a time, every load of a batch issued before its sums (the first form, a load
// per slot and column summed as it came, took 17.4 ms of a 64k prefill at G = 4: a DRAM
// round trip each).
template <class E>
__device__ void pfb_merge(const Params& p) {
    const PfbChunk c = pfb_chunk(p);
    const int hq_n = p.shape.num_q_heads, n = p.shape.sel_count, DV = p.shape.head_dim_v;
    const int w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (w >= c.rows * hq_n) return;
    const int row = w / hq_n, hq = w - row * hq_n, kvh = hq / p.shape.group_size;
    const int* sel = pf_sel(p) + ((usize)(c.row0 + row) * p.shape.num_kv_heads + kvh) * n;
    const int j = lane < n ? sel[lane] : -1;
    const float x0 = lane < n ? ((const float*)p.ws.pf_lse)[(usize)w * n + lane] : NEG_INF;
    const bool on = j >= 0;
    const float x = on ? x0 : NEG_INF;
    const float m = warp_max(x);
    const float wt = on ? ex2f(x - m) : 0.f;
    const float W = warp_sum(wt);
    const int cols = DV >> 5;
    const u16* pp = (const u16*)p.ws.pf_part + (usize)w * n * DV + lane * cols;
    float a[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s0 = 0; s0 < n; s0 += 8) {
        unsigned lo[8], hi[8];
        float ws[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            ws[k] = __shfl_sync(0xffffffffu, wt, (s0 + k) & 31);
            lo[k] = hi[k] = 0u;
            if (s0 + k < n && ws[k] != 0.f) {
                if (cols == 4) {
                    const uint2 v = *(const uint2*)(pp + (usize)(s0 + k) * DV);
                    lo[k] = v.x;
                    hi[k] = v.y;
                } else {
                    lo[k] = *(const unsigned*)(pp + (usize)(s0 + k) * DV);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < 8; k++) {
            a[0] += ws[k] * E::cvt((u16)(lo[k] & 0xffffu));
            a[1] += ws[k] * E::cvt((u16)(lo[k] >> 16));
            a[2] += ws[k] * E::cvt((u16)(hi[k] & 0xffffu));
            a[3] += ws[k] * E::cvt((u16)(hi[k] >> 16));
        }
    }
    // As the CPU engine: the selected branch adds only where it saw a key (W > 0).
    if (W == 0.f) return;
    const float f = ((const float*)p.io.gates)[((usize)(c.row0 + row) * hq_n + hq) * 3 + 1] / W;
    typename E::T* out = (typename E::T*)p.io.out + ((usize)(c.row0 + row) * hq_n + hq) * DV + lane * cols;
    // The lane's columns as words, all loaded before any store (interleaved, each load
    // would wait behind the store before it).
    unsigned cur[2];
#pragma unroll
    for (int k = 0; k < 2; k++)
        if (2 * k < cols) cur[k] = *(const unsigned*)(out + 2 * k);
#pragma unroll
    for (int k = 0; k < 2; k++)
        if (2 * k < cols) {
            float x, y;
            E::upk(cur[k], x, y);
            E::st2(out, 2 * k, x + f * a[2 * k], y + f * a[2 * k + 1]);
        }
}

#endif  // NSA_PREFILL_BLOCKS_CUH
