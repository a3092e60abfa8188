// Selection: block scores (Eq. 8-9) and the top-n, split over chunks of blocks.
#ifndef NSA_SELECTION_CUH
#define NSA_SELECTION_CUH

#include "common.cuh"

// Eq. 9 overlap count of offset k: pairs (a, b), a < A, b < B, a + b = k.
__device__ __forceinline__ float overlap_count(int k, int A, int B) {
    int lo = k - (B - 1);
    if (lo < 0) lo = 0;
    int hi = min(k, A - 1);
    return hi >= lo ? (float)(hi - lo + 1) : 0.f;
}


// Selection, split over chunks of selection blocks: grid rows x HKV x sel_chunks, 256
// threads. A chunk of `cb` blocks (at least NSA_SEL_CHUNK; the host launches enough
// chunks that it is exactly that, `SEL_CHUNK` in params.rs): merges the compressed
// splits' (m, l) of the group's heads, sums the group's normalised probabilities over the
// compressed tokens its blocks overlap (Eq. 8), scores its blocks (Eq. 9, forced blocks
// +inf), ranks them (a thread per block counts the better ones: ties to the lower index)
// and stores its best n, best first, -1 padded. The last chunk block of the (row, KV
// head) to finish (a counter in the workspace, reset by that block) merges the chunks'
// lists (the true top n are all in their lists: every better block is in its own list's
// best n): up to SEL_RANK_ALL candidates each ranked against all, else merged as sorted
// lists by one warp. Output ascending, -1 padded.
// Shared: chunk phase m[g] | inv[g] | blk[cb] | ps[cb*B + A - 1];
//         merge phase cand[chunks * n] (int2) | heads[chunks] | pick[n].
#define SEL_RANK_ALL 512  // the final merge ranks every candidate up to this many

__device__ __forceinline__ bool better(float s1, int j1, float s2, int j2) {
    if (j1 < 0) return false;
    if (j2 < 0) return true;
    return s1 > s2 || (s1 == s2 && j1 < j2);
}

template <class E>
__device__ void select_blocks(const Params& p) {
    extern __shared__ float smem[];
    __shared__ int last;
    const int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y, ch = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int t = ((const int2*)p.step.rows)[r].y;
    const int nc = num_cmp(p, t + 1);
    // Eq. 9's alpha and beta: strides per compressed block and per selection block.
    const int A = p.shape.cmp_block / p.shape.cmp_stride, B = p.shape.sel_block / p.shape.cmp_stride, n = p.shape.sel_count;
    const int nblk = t / p.shape.sel_block + 1, b = nblk - 1;
    const int cb = max(NSA_SEL_CHUNK, (nblk + p.launch.sel_chunks - 1) / p.launch.sel_chunks);
    const int nlists = (nblk + cb - 1) / cb;
    const usize pair = (usize)wr * p.shape.num_kv_heads + kvh;
    int2* lists = (int2*)p.ws.cand + pair * p.launch.sel_chunks * n;
    const int j0 = min(ch * cb, nblk), j1 = min(j0 + cb, nblk);
    if (j0 < j1) {
        float* mh = smem;
        float* inv = mh + p.shape.group_size;
        float* blk = inv + p.shape.group_size;
        float* ps = blk + cb;
        const float* ml = (const float*)p.ws.part_ml;
        // Softmax (m, l) of every head over all compressed splits: a warp per head, one
        // pass (each lane merges its splits online, then the lanes' states merge).
        for (int h = warp; h < p.shape.group_size; h += nwarps) {
            int hg = kvh * p.shape.group_size + h;
            float m = NEG_INF, l = 0.f;
            for (int u = lane; u < p.launch.nsplit_c; u += 32) {
                float2 x = ((const float2*)ml)[part_at(p, wr, hg, u)];
                if (x.y != 0.f) {
                    float mn = fmaxf(m, x.x);
                    l = l * fexp(m - mn) + x.y * fexp(x.x - mn);
                    m = mn;
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                float mo = __shfl_xor_sync(0xffffffffu, m, o), lo = __shfl_xor_sync(0xffffffffu, l, o);
                float mn = fmaxf(m, mo);
                l = (l != 0.f ? l * fexp(m - mn) : 0.f) + (lo != 0.f ? lo * fexp(mo - mn) : 0.f);
                m = mn;
            }
            if (lane == 0) {
                mh[h] = m;
                inv[h] = l != 0.f ? 1.0f / l : 0.f;
            }
        }
        __syncthreads();
        // Group-summed probabilities of compressed tokens i0 .. i0 + span (0 outside [0, nc)).
        const int i0 = B * j0 - (A - 1), span = B * (j1 - j0) + A - 1;
        const float* lg = (const float*)p.ws.logits + ((usize)wr * p.shape.num_q_heads + (usize)kvh * p.shape.group_size) * p.ws.max_cmp;
        // Two tokens per thread and pass (span is 4 * 64 + 1 for the paper's shape: one pass,
        // not a second round for one thread), 8 heads' loads of each in flight at once (16
        // make ptxas spill on sm_80).
        for (int x0 = tid; x0 < span; x0 += 2 * blockDim.x) {
            const int x1 = x0 + blockDim.x;
            const bool ok0 = i0 + x0 >= 0 && i0 + x0 < nc, ok1 = x1 < span && i0 + x1 >= 0 && i0 + x1 < nc;
            const float* l0 = lg + (i0 + x0);  // head h's logit of token i: lg[h * max_cmp + i]
            const float* l1 = lg + (i0 + x1);
            float a0 = 0.f, a1 = 0.f;
            for (int h0 = 0; h0 < p.shape.group_size; h0 += 8) {
                float v0[8], v1[8];
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const bool h = h0 + k < p.shape.group_size;
                    v0[k] = h && ok0 ? l0[(h0 + k) * p.ws.max_cmp] : 0.f;
                    v1[k] = h && ok1 ? l1[(h0 + k) * p.ws.max_cmp] : 0.f;
                }
#pragma unroll
                for (int k = 0; k < 8; k++)
                    if (h0 + k < p.shape.group_size) {
                        a0 += ok0 ? fexp(v0[k] - mh[h0 + k]) * inv[h0 + k] : 0.f;
                        a1 += ok1 ? fexp(v1[k] - mh[h0 + k]) * inv[h0 + k] : 0.f;
                    }
            }
            ps[x0] = a0;
            if (x1 < span) ps[x1] = a1;
        }
        __syncthreads();
        // Block scores (Eq. 9: overlap counts of the A x B pairs), forced blocks +inf.
        for (int j = j0 + tid; j < j1; j += blockDim.x) {
            const float* pj = ps + B * (j - j0);
            float acc = 0.f;
            for (int k = 0; k < A + B - 1; k++) acc += overlap_count(k, A, B) * pj[k];
            if (j < p.shape.sel_init || j > b - p.shape.sel_local) acc = POS_INF;
            blk[j - j0] = acc;
        }
        __syncthreads();
        // This chunk's best n, best first.
        int2* mine = lists + (usize)ch * n;
        const int cn = j1 - j0;
        for (int x = tid; x < cn; x += blockDim.x) {
            float s = blk[x];
            int rank = 0;
#pragma unroll 8
            for (int k = 0; k < cn; k++) {
                float o = blk[k];  // the same address across the warp: a broadcast
                rank += (o > s) | ((o == s) & (k < x));
            }
            if (rank < n) mine[rank] = make_int2(__float_as_int(s), j0 + x);
        }
        // Padding (-inf, INT_MAX) sorts after every real block (scores are sums of
        // probabilities or +inf) under the plain (score desc, index asc) order.
        for (int k = (j1 - j0) + tid; k < n; k += blockDim.x) mine[k] = make_int2(__float_as_int(NEG_INF), 0x7fffffff);
    }
    // The last chunk block to finish merges (classic threadfence + counter pattern).
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        int done = atomicAdd((int*)p.ws.count + pair, 1);
        last = done == p.launch.sel_chunks - 1;
        if (last) atomicExch((int*)p.ws.count + pair, 0);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    int2* cs = (int2*)smem;
    int* heads = (int*)(cs + nlists * n);
    int* pick = heads + nlists;
    for (int x = tid; x < nlists * n; x += blockDim.x) {
        // Written by other blocks of this launch: read through L2 (volatile), not L1.
        const volatile int* src = (const volatile int*)(lists + x);
        cs[x] = make_int2(src[0], src[1]);
    }
    for (int l = tid; l < nlists; l += blockDim.x) heads[l] = 0;
    const int count = min(n, nblk);
    __syncthreads();
    if (nlists * n <= SEL_RANK_ALL) {
        // Few candidates: each thread ranks its own by counting the better ones in every
        // list, a binary search per list (the lists are sorted best first, so the better
        // ones are a prefix): nlists * log2(n) steps instead of nlists * n. The batch-1
        // tail of the step is this block alone, so its work is on the critical path.
        for (int x = tid; x < nlists * n; x += blockDim.x) {
            int2 me = cs[x];
            if (me.y == 0x7fffffff) continue;
            const float s = __int_as_float(me.x);
            int rank = 0;
            for (int l = 0; l < nlists; l++) {
                const int2* ls = cs + l * n;
                int lo = 0, hi = n;
                while (lo < hi) {
                    const int mid = (lo + hi) >> 1;
                    const int2 o = ls[mid];
                    if (better(__int_as_float(o.x), o.y, s, me.y))
                        lo = mid + 1;
                    else
                        hi = mid;
                }
                rank += lo;
            }
            if (rank < count) pick[rank] = me.y;
        }
    } else if (warp == 0) {
        // Merge of sorted lists by one warp: each round takes the best list head (a lane
        // scans its lists' heads, then a warp argmax) and advances that list.
        for (int k = 0; k < count; k++) {
            float bs = 0.f;
            int bj = -1, bl = -1;
            for (int l = lane; l < nlists; l += 32) {
                int h = heads[l];
                if (h < n) {
                    int2 c = cs[l * n + h];
                    if (better(__int_as_float(c.x), c.y, bs, bj)) {
                        bs = __int_as_float(c.x);
                        bj = c.y;
                        bl = l;
                    }
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                float os = __shfl_xor_sync(0xffffffffu, bs, o);
                int oj = __shfl_xor_sync(0xffffffffu, bj, o);
                int ol = __shfl_xor_sync(0xffffffffu, bl, o);
                if (better(os, oj, bs, bj)) {
                    bs = os;
                    bj = oj;
                    bl = ol;
                }
            }
            if (lane == 0) pick[k] = bj;
            if (bl >= 0 && lane == (bl & 31)) heads[bl] += 1;
            __syncwarp();
        }
    }
    __syncthreads();
    int* wsel = (int*)p.ws.sel + pair * n;
    int* usel = p.io.selected ? (int*)p.io.selected + ((usize)r * p.shape.num_kv_heads + kvh) * n : (int*)0;
    for (int k = tid; k < n; k += blockDim.x) {
        if (k < count) {
            int me = pick[k], pos = 0;
            for (int k2 = 0; k2 < count; k2++) pos += pick[k2] < me;
            wsel[pos] = me;
            if (usel) usel[pos] = me;
        } else {
            wsel[k] = -1;
            if (usel) usel[k] = -1;
        }
    }
}

#endif  // NSA_SELECTION_CUH
