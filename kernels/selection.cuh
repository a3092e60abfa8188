// Selection: block scores (Eq. 8-9) and the top-n of each (row, KV head).
#ifndef NSA_SELECTION_CUH
#define NSA_SELECTION_CUH

#include "common.cuh"
#include "ptx.cuh"

// A radix-select pass's count: key k (when `in`) into the 256-bin histogram of its digit
// at `shift`, with one shared atomic per distinct bin per warp (scores of similar size share
// their top bits, and same-address shared atomics serialise). Every lane of the warp calls it.
__device__ __forceinline__ void radix_count(unsigned* hist, unsigned k, bool in, int shift) {
    const unsigned bin = (k >> shift) & 255u;
    const unsigned same = __match_any_sync(0xffffffffu, in ? bin : 0x100u);
    if (in && (same & ((1u << (threadIdx.x & 31)) - 1u)) == 0u) atomicAdd(&hist[bin], (unsigned)__popc(same));
}

// Exclusive prefix count of `flag` over the block's threads in thread order, and the
// block's total in `total`. Every thread calls it (two barriers); `wt` holds a count per warp.
__device__ __forceinline__ unsigned block_prefix(bool flag, unsigned* wt, unsigned& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const unsigned bal = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) wt[warp] = __popc(bal);
    __syncthreads();
    unsigned before = 0, all = 0;
    for (int w = 0; w < nw; w++) {
        const unsigned c = wt[w];  // the same address across the block: a broadcast
        before += w < warp ? c : 0u;
        all += c;
    }
    __syncthreads();  // wt is reused by the next call
    total = all;
    return before + __popc(bal & ((1u << lane) - 1u));
}

// Candidate order of the top n: the higher score first, then the lower block (the CPU
// engine's tie rule). Padding entries are (0, SEL_PAD): after every real block.
#define SEL_PAD 0x7fffffff
__device__ __forceinline__ bool sel_before(unsigned ka, int ia, unsigned kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}
// One compare-exchange step of a bitonic network over the warp's 32 (key, block) pairs:
// the partner is lane ^ j; within runs of `size` lanes alternate direction (best-first
// where lane & size is 0).
__device__ __forceinline__ void sel_cas(unsigned& k, int& i, int j, int size) {
    const int lane = threadIdx.x & 31;
    const unsigned pk = __shfl_xor_sync(0xffffffffu, k, j);
    const int pi = __shfl_xor_sync(0xffffffffu, i, j);
    const bool lower = (lane & j) == 0, best_first = (lane & size) == 0;
    if (sel_before(pk, pi, k, i) == (lower == best_first)) {
        k = pk;
        i = pi;
    }
}
// Sorts the warp's 32 pairs best-first (lane 0 best).
__device__ __forceinline__ void sel_sort32(unsigned& k, int& i) {
#pragma unroll
    for (int size = 2; size <= 32; size <<= 1)
#pragma unroll
        for (int j = size >> 1; j > 0; j >>= 1) sel_cas(k, i, j, size);
}
// Of two best-first lists (this lane's entry of A, entry 31 - lane of B: `b`), the 32 best,
// sorted best-first.
__device__ __forceinline__ void sel_merge32(unsigned& k, int& i, unsigned bk, int bi) {
    if (sel_before(bk, bi, k, i)) {
        k = bk;
        i = bi;
    }
#pragma unroll
    for (int j = 16; j > 0; j >>= 1) sel_cas(k, i, j, 64);  // a bitonic sequence: one merge pass
}

// The 32 best of blocks [j0, j1) by their score bits `key` (shared), best-first in warp 0's
// lanes (`k`, `i`: score bits and block, (0, SEL_PAD) past the range's blocks), by sorting
// networks: each warp sorts lists of 32 blocks, then the lists merge pairwise in a tree
// (lists of block numbers in `lists`, shared, at least ceil((j1 - j0) / 32) * 32 ints),
// each merge keeping the 32 best. About 15 + 6 log2(lists) exchange steps on the longest
// path (docs/DECODE_NOTES.md, variant 13). Every thread of the block calls it.
__device__ void sel_best32(const unsigned* key, int* lists, int j0, int j1, unsigned& k, int& i) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int L = (j1 - j0 + 31) >> 5;
    auto load = [&](int slot, unsigned& lk, int& li) {  // a list entry and its score
        li = lists[slot];
        lk = li == SEL_PAD ? 0u : key[li];
    };
    for (int l = warp; l < L; l += nw) {
        const int j = j0 + l * 32 + lane;
        unsigned lk = j < j1 ? key[j] : 0u;
        int li = j < j1 ? j : SEL_PAD;
        sel_sort32(lk, li);
        lists[l * 32 + lane] = li;
    }
    tl_mark<3>();  // the timeline (the selection): thread 0's list of 32 sorted
    // Level s: lists at multiples of 2^s; list m * 2^(s+1) absorbs m * 2^(s+1) + 2^s.
    for (int step = 1; step < L; step <<= 1) {
        __syncthreads();
        for (int a = warp * 2 * step; a < L; a += nw * 2 * step) {
            const int b = a + step;
            if (b >= L) continue;
            unsigned ak, bk;
            int ai, bi;
            load(a * 32 + lane, ak, ai);
            load(b * 32 + 31 - lane, bk, bi);
            sel_merge32(ak, ai, bk, bi);
            lists[a * 32 + lane] = ai;
        }
    }
    __syncthreads();
    k = 0u;
    i = SEL_PAD;
    if (warp == 0 && L > 0) load(lane, k, i);
}

// Warp 0's best-first winners (`i`, the first `count` lanes) in block order, written by
// `put`, -1 padded to n. Every lane of warp 0 calls it.
template <class Put>
__device__ __forceinline__ void sel_put_by_block(int i, int count, int n, Put put) {
    const int lane = threadIdx.x & 31;
    // Sort (0, block) pairs: the losers padded last.
    unsigned k = 0u;
    if (lane >= count) i = SEL_PAD;
    sel_sort32(k, i);
    for (int x = lane; x < n; x += 32) put(x, x < count ? i : -1);
}

// The top `count` (<= n <= 32) of blocks [0, nblk) by their score bits `key` (shared),
// by sorting networks instead of the radix select (`sel_best32`), written in block order.
template <class Put>
__device__ void sel_top_sorted(const unsigned* key, int* lists, int nblk, int count, int n, Put put) {
    unsigned k;
    int i;
    sel_best32(key, lists, 0, nblk, k, i);
    if ((threadIdx.x >> 5) == 0) sel_put_by_block(i, count, n, put);
}

// Selection: grid rows x HKV x sel_chunks, NSA_NT_SEL threads. The chunk blocks of a
// (row, KV head) score a share of its selection blocks each; the last to finish (a counter
// in the workspace, reset by that block) picks the top n over all scores. With one chunk
// (large batches) the block does both and nothing goes through memory.
//
// Why this shape (docs/DECODE_NOTES.md, variant 9): at batch 1 the step's time is the
// length of its longest dependent chain of instructions, so every phase is a short program
// run by many warps: a thread per compressed token, then a thread per block, then a radix
// select instead of sorted lists merged by one block.
//
// 1. The group's heads' softmax (m, 1 / l) over all compressed splits (a warp per head).
//    With group sums and warps to spare, warps of their own load the blocks' sums
//    meanwhile (variant 40: the two round trips after the wait overlap).
// 2. Per run of at most NSA_NT_SEL blocks of the chunk: a thread per compressed token sums
//    the group's normalised probabilities (Eq. 8; coalesced loads, one exp per token and
//    head), then a thread per block applies the Eq. 9 overlap weights; the forced blocks
//    (initial, local) score +inf. Scores are non-negative, so their float bits order as
//    unsigned integers.
// 3. With n <= 32 (and block lists that fit in shared memory), the top n by sorting
//    networks (sel_top_sorted). Otherwise the n-th best score by a radix select over those bits (four 8-bit passes, a 256-bin
//    histogram each, its bins scanned by 8 warps), then every block better than it plus the lowest-index blocks
//    equal to it (ties to the lower index, as the CPU engine) are written ascending by a
//    block-wide prefix count, -1 padded.
// Shared: m[g] | inv[g] | token sums [NSA_NT_SEL * B + A - 1], at least the blocks rounded
// up to 32 (step 3's block lists reuse it) | score bits [blocks].
// SEL: SEL_MODE reads the lists and group-sums forms from `launch.mode` (bits 512 and 32);
// SEL_LISTS_GROUPS fixes both at compile time (the `select_lists` entry the host picks for
// tensor-core decode): no code for the counter hand-over, the sorting networks, the radix
// select or the per-token sums, which every multiprocessor would otherwise fetch cold at
// each step (docs/DECODE_NOTES.md, variant 57).
#define SEL_MODE 0
#define SEL_LISTS_GROUPS 1
template <class E, int SEL = SEL_MODE>
__device__ void select_blocks(const Params& p) {
    extern __shared__ float smem[];
    __shared__ unsigned hist[4][256], wt[32];
    __shared__ unsigned s_digit, s_need, s_eq;
    __shared__ int s_last;
    const int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, ch = blockIdx.z, nch = p.launch.sel_chunks;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int g = p.shape.group_size, n = p.shape.sel_count;
    // The step's rows are uploaded before the layer's first kernel: read before the wait
    // (one round trip off the chain); everything after it reads what cmp_mma wrote.
    const int t = ((const int2*)p.step.rows)[r].y;
    // With MODE_SEL_FLOW (kernels/ptx.cuh) the block waits for its own pair's splits, not
    // for the whole compressed launch; `select_lists` waits for that launch before it exits.
    if (SEL == SEL_LISTS_GROUPS && (p.launch.mode & MODE_SEL_FLOW)) {
        pdl_trigger();
        flow_wait(flow_counters(p, (usize)wr * p.shape.num_kv_heads + kvh) + FLOW_SPLITS, p.launch.nsplit_c, nch);
        tl_wait_stamp();
    } else {
        pdl_wait_then_trigger(p);
    }
    const int nc = num_cmp(p, t + 1);
    // Eq. 9's alpha and beta: strides per compressed block and per selection block (host-computed).
    const int A = p.shape.eq9_a, B = p.shape.eq9_b;
    const int nblk = t / p.shape.sel_block + 1, b = nblk - 1;
    const int count = min(n, nblk);
    float* mh = smem;
    float* inv = mh + g;
    float* ps = inv + g;
    const int ps_len = max(NSA_NT_SEL * B + A - 1, (p.ws.max_blocks + 31) & ~31);  // src/cuda/build.rs sizes it so
    unsigned* key = (unsigned*)(ps + ps_len);
    const usize pair = (usize)wr * p.shape.num_kv_heads + kvh;
    int* wsel = (int*)p.ws.sel + pair * n;
    int* usel = p.io.selected ? (int*)p.io.selected + ((usize)r * p.shape.num_kv_heads + kvh) * n : (int*)0;
    auto put = [&](int k, int j) {
        wsel[k] = j;
        if (usel) usel[k] = j;
    };
    // With `mode & 512` (tensor-core decode) each chunk block hands `sw_mma` its own best
    // n, best-first, and nothing more: no counter, no last block; the selected units merge
    // the chunks' lists (kernels/selected.cuh `sel_merge_lists`) and write `io.selected`.
    const bool lists = SEL == SEL_LISTS_GROUPS || (p.launch.mode & 512) != 0;
    if (nblk <= n) {  // every block is selected (the row's chunks agree: no counter)
        if (lists) return;  // the selected units know it from the row's length
        if (ch == 0)
            for (int k = tid; k < n; k += blockDim.x) put(k, k < nblk ? k : -1);
        return;
    }
    const int cb = (nblk + nch - 1) / nch, j0 = min(ch * cb, nblk), j1 = min(j0 + cb, nblk);

    if (j0 < j1) {
        // 1. Softmax (m, l) of head h over all compressed splits (a warp: each lane merges
        // its splits online, then the lanes' states merge), into mh[h], inv[h].
        const float* ml = (const float*)p.ws.part_ml;
        auto head_ml = [&](int h) {
            const int hg = kvh * g + h;
            float m = NEG_INF, l = 0.f;
            // Two splits a lane per round trip (batch 1 has 33 to 65 splits: a lane with
            // two no longer waits for them one after the other).
            const float2* hml = (const float2*)ml + part_at(p, wr, hg, 0);
            for (int u = lane; u < p.launch.nsplit_c; u += 64) {
                const float2 x0 = hml[u], x1 = u + 32 < p.launch.nsplit_c ? hml[u + 32] : make_float2(NEG_INF, 0.f);
                if (x0.y != 0.f) ml_merge(m, l, x0.x, x0.y);
                if (x1.y != 0.f) ml_merge(m, l, x1.x, x1.y);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ml_merge(m, l, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, l, o));
            if (lane == 0) {
                // log2 units: p = 2^(s log2e - m log2e) / l. A head with no visible token
                // (l = 0) contributes 0 (a finite m keeps 2^(-inf - m) from being NaN).
                mh[h] = l != 0.f ? m * 1.4426950408889634f : 0.f;
                inv[h] = l != 0.f ? 1.0f / l : 0.f;
            }
        };

        // 2. Scores of blocks [s0, s1), runs of at most NSA_NT_SEL: block j gathers tokens
        // B*j - (A-1) + k, k < A + B - 1, with weight overlap_count(k).
        const float* lg = (const float*)p.ws.logits + ((usize)wr * p.shape.num_q_heads + (usize)kvh * g) * p.ws.max_cmp;
        // With group sums (`mode & 32`, kernels/attend_mma.cuh) block j is its group's own
        // part (x of group j) plus the previous group's part (y of group j - 1), per head
        // log2 against the head's max: a thread per block, no token pass. A group's 16
        // heads load in one round trip (32 loads in flight), then score against (mh, inv).
        const bool groups = SEL == SEL_LISTS_GROUPS || (p.launch.mode & 32) != 0;
        auto group_loads = [&](int j, int h0, float (&vx)[16], float (&vy)[16]) {
            const bool own = B * j < nc, prev = j >= 1 && B * (j - 1) < nc;
#pragma unroll
            for (int k = 0; k < 16; k++) {
                const float2* row = (const float2*)(lg + (usize)(h0 + k) * p.ws.max_cmp);
                vx[k] = own && h0 + k < g ? row[j].x : NEG_INF;
                vy[k] = prev && h0 + k < g ? row[j - 1].y : NEG_INF;
            }
        };
        auto group_score = [&](int h0, const float (&vx)[16], const float (&vy)[16]) {
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < 16; k++)
                if (h0 + k < g) acc += (ex2f(vx[k] - mh[h0 + k]) + ex2f(vy[k] - mh[h0 + k])) * inv[h0 + k];
            return acc;
        };
        auto put_key = [&](int j, float acc) {
            if (j < p.shape.sel_init || j > b - p.shape.sel_local) acc = POS_INF;
            key[j] = __float_as_uint(acc);
        };
        // With group sums, at most 16 heads and a warp per head to spare beside a thread per
        // block of the chunk (batch 1 to 16 at 1,024 threads), the two round trips overlap:
        // warps [0, W) load their blocks' sums right after the wait while warps W.. merge
        // the heads' (m, l); one barrier, then the scores (variant 40).
        const int W = (j1 - j0 + 31) >> 5;
#if __CUDA_ARCH__ >= 900
        const bool roles = groups && g <= 16 && W + g <= nwarps;
#else
        const bool roles = false;  // sm_80: the held sums spill at 64 registers (1,024 threads)
#endif
        if (roles) {
            float vx[16], vy[16];
            const int j = j0 + tid;
            if (warp < W && j < j1) {
                group_loads(j, 0, vx, vy);
                tl_mark_after<0>(vx[15]);  // the timeline: the sums' loads returned
            }
            if (warp >= W && warp - W < g) head_ml(warp - W);
            __syncthreads();
            tl_mark<1>();  // the timeline: the heads' (m, l) merged, the group sums loaded
            if (warp < W && j < j1) put_key(j, group_score(0, vx, vy));
        } else {
            for (int h = warp; h < g; h += nwarps) head_ml(h);
            __syncthreads();
            for (int j = j0 + tid; groups && j < j1; j += blockDim.x) {
                float acc = 0.f;
                for (int h0 = 0; h0 < g; h0 += 16) {
                    float vx[16], vy[16];
                    group_loads(j, h0, vx, vy);
                    acc += group_score(h0, vx, vy);
                }
                put_key(j, acc);
            }
        }
        if (groups) __syncthreads();
        for (int s0 = j0; !groups && s0 < j1; s0 += NSA_NT_SEL) {
            const int s1 = min(s0 + NSA_NT_SEL, j1);
            const int i0 = B * s0 - (A - 1), span = B * (s1 - s0) + A - 1;
            for (int x = tid; x < span; x += blockDim.x) {
                const int i = i0 + x;
                float acc = 0.f;
                if (i >= 0 && i < nc) {
                    // Sixteen heads' loads in flight (lanes read consecutive tokens).
                    for (int h0 = 0; h0 < g; h0 += 16) {
                        float v[16];
#pragma unroll
                        for (int k = 0; k < 16; k++) v[k] = h0 + k < g ? lg[(usize)(h0 + k) * p.ws.max_cmp + i] : 0.f;
#pragma unroll
                        for (int k = 0; k < 16; k++)
                            if (h0 + k < g) acc += ex2f(fmaf(v[k], 1.4426950408889634f, -mh[h0 + k])) * inv[h0 + k];
                    }
                }
                ps[x] = acc;
            }
            __syncthreads();
            for (int j = s0 + tid; j < s1; j += blockDim.x) {
                const float* pj = ps + B * (j - s0);
                float acc = 0.f;
                for (int k = 0; k < A + B - 1; k++) acc += overlap_count(k, A, B) * pj[k];
                put_key(j, acc);
            }
            __syncthreads();  // ps is rewritten by the next run
        }
    }
    if (lists) {
        // The chunk's best n (score bits, block), best-first, at [pair][ch * n ..] of the
        // scores area (2 words an entry; (0, SEL_PAD) past the chunk's blocks).
        __syncthreads();  // every score of the chunk is in `key`
        tl_mark<2>();     // the timeline: scores done, the sort begins
        unsigned k;
        int i;
        sel_best32(key, (int*)ps, j0, j1, k, i);
        tl_mark<4>();
        unsigned* out = (unsigned*)p.ws.scores + pair * p.ws.max_blocks + 2 * (ch * n + lane);
        if (warp == 0 && lane < n) {
            out[0] = k;
            out[1] = (unsigned)i;
        }
        return;
    }
    if (nch > 1) {
        // Hand the chunk's scores to the last chunk block of the (row, KV head).
        unsigned* gkey = (unsigned*)p.ws.scores + pair * p.ws.max_blocks;
        for (int j = j0 + tid; j < j1; j += blockDim.x) gkey[j] = key[j];
        __threadfence();
        __syncthreads();
        if (tid == 0) {
            const int done = atomicAdd(flow_counters(p, pair), 1);
            s_last = done == nch - 1;
            if (s_last) atomicExch(flow_counters(p, pair), 0);
        }
        __syncthreads();
        if (!s_last) return;
        __threadfence();
        // Written by other blocks of this launch: read through L2 (volatile), not L1.
        for (int j = tid; j < nblk; j += blockDim.x) key[j] = ((const volatile unsigned*)gkey)[j];
    }

    // 3a. Small n: sorting networks (the block lists where the token sums were).
    if (n <= 32 && ((nblk + 31) & ~31) <= ps_len) {
        __syncthreads();  // ps is free (its last readers were the block-score pass)
        sel_top_sorted(key, (int*)ps, nblk, count, n, put);
        return;
    }
    // 3. The count-th largest key T, digit by digit from the top; `need` is how many keys
    // equal to the bits chosen so far still belong to the top count. A histogram per pass
    // (cleared once), and the bins scanned by 8 warps (a bin per thread, largest first)
    // rather than one: the pass is a few dependent steps, not one warp's serial walk.
    for (int i = tid; i < 4 * 256; i += blockDim.x) hist[i >> 8][i & 255] = 0u;
    __syncthreads();
    unsigned prefix = 0u, need = (unsigned)count;
    for (int pass = 0; pass < 4; pass++) {
        const int shift = 24 - 8 * pass;
        unsigned* hp = hist[pass];
        const unsigned hi = pass == 0 ? 0u : 0xffffffffu << (shift + 8);
        for (int j0 = 0; j0 < nblk; j0 += blockDim.x) {
            const int j = j0 + tid;
            const unsigned k = j < nblk ? key[j] : 0u;
            radix_count(hp, k, j < nblk && (k & hi) == prefix, shift);
        }
        __syncthreads();
        unsigned c = 0u, inc = 0u;
        if (tid < 256) {
            c = hp[255 - tid];
            inc = c;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned x = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += x;
            }
            if (lane == 31) wt[warp] = inc;
        }
        __syncthreads();
        if (tid < 256) {
            for (int w = 0; w < warp; w++) inc += wt[w];
            const unsigned exc = inc - c;
            if (exc < need && need <= inc) {
                s_digit = 255u - tid;
                s_need = need - exc;
                s_eq = c;  // keys matching the prefix with this digit
            }
        }
        __syncthreads();
        prefix |= s_digit << shift;
        need = s_need;
    }
    // Keys above T are in; of the s_eq keys equal to T the `need` lowest-index ones.
    const unsigned T = prefix;
    const bool all_eq = s_eq == need;
    unsigned base = 0u, ebase = 0u;
    for (int j0 = 0; j0 < nblk; j0 += blockDim.x) {
        const int j = j0 + tid;
        const unsigned k = j < nblk ? key[j] : 0u;
        const bool eq = j < nblk && k == T;
        bool in = j < nblk && k > T;
        if (all_eq) {
            in = in || eq;
        } else {  // block-uniform branch: ties at the threshold go to the lower index
            unsigned etot;
            const unsigned er = ebase + block_prefix(eq, wt, etot);
            ebase += etot;
            in = in || (eq && er < need);
        }
        unsigned tot;
        const unsigned pos = base + block_prefix(in, wt, tot);
        base += tot;
        if (in) put(pos, j);
    }
    for (int k = count + tid; k < n; k += blockDim.x) put(k, -1);
}

// The selection with per-chunk lists and group sums fixed at compile time (see SEL above).
// With MODE_SW_FLOW each block then counts itself done for its pair's selected units, and
// with either hand-over it waits for the compressed launch before it exits (the completion
// chain, kernels/ptx.cuh).
template <class E>
__device__ void select_lists(const Params& p) {
    select_blocks<E, SEL_LISTS_GROUPS>(p);
    if (p.launch.mode & MODE_SW_FLOW) flow_signal(flow_counters(p, (usize)blockIdx.x * p.shape.num_kv_heads + blockIdx.y) + FLOW_LISTS);
    if (p.launch.mode & (MODE_SEL_FLOW | MODE_SW_FLOW)) pdl_wait_untimed();
}

#endif  // NSA_SELECTION_CUH
