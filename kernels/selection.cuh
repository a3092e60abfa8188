// Selection: block scores (Eq. 8-9) and the top-n of one (row, KV head) per thread block.
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

// Selection of one (row, KV head) per block of NSA_NT_SEL threads: grid rows x HKV.
//
// Why one block and not chunks merged by a last block: at batch 1 the step's time is the
// length of its longest dependent chain of instructions, not bandwidth (docs/DECODE_NOTES.md),
// and a chunked ranking followed by a serial merge is two chains; here a thread owns a
// block (or a few, past NSA_NT_SEL blocks), so every phase is a short program run by many
// warps at once.
//
// 1. The group's heads' softmax (m, 1 / l) over all compressed splits (a warp per head).
// 2. Each thread scores its blocks: Eq. 9 overlap weights times the normalised
//    probabilities of the block's compressed tokens, summed over the group (Eq. 8); the
//    forced blocks (initial, local) score +inf. Scores are non-negative, so their float
//    bits order as unsigned integers.
// 3. The n-th best score by a radix select over those bits (four 8-bit passes over a
//    256-bin histogram), then every block better than it plus the lowest-index blocks
//    equal to it (ties to the lower index, as the CPU engine) are written ascending by a
//    block-wide prefix count, -1 padded.
// Shared: m[g] | inv[g] | score bits [blocks].
template <class E>
__device__ void select_blocks(const Params& p) {
    extern __shared__ float smem[];
    __shared__ unsigned hist[256], wt[32];
    __shared__ unsigned s_digit, s_need, s_eq;
    const int wr = blockIdx.x, r = p.launch.row0 + wr, kvh = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int g = p.shape.group_size, n = p.shape.sel_count;
    const int t = ((const int2*)p.step.rows)[r].y;
    const int nc = num_cmp(p, t + 1);
    // Eq. 9's alpha and beta: strides per compressed block and per selection block.
    const int A = p.shape.cmp_block / p.shape.cmp_stride, B = p.shape.sel_block / p.shape.cmp_stride;
    const int span = A + B - 1;
    const int nblk = t / p.shape.sel_block + 1, b = nblk - 1;
    const int count = min(n, nblk);
    float* mh = smem;
    float* inv = mh + g;
    unsigned* key = (unsigned*)(inv + g);
    const usize pair = (usize)wr * p.shape.num_kv_heads + kvh;
    int* wsel = (int*)p.ws.sel + pair * n;
    int* usel = p.io.selected ? (int*)p.io.selected + ((usize)r * p.shape.num_kv_heads + kvh) * n : (int*)0;
    auto put = [&](int k, int j) {
        wsel[k] = j;
        if (usel) usel[k] = j;
    };
    if (nblk <= n) {  // every block is selected
        for (int k = tid; k < n; k += blockDim.x) put(k, k < nblk ? k : -1);
        return;
    }

    // 1. Softmax (m, l) of every head over all compressed splits: a warp per head, one
    // pass (each lane merges its splits online, then the lanes' states merge).
    const float* ml = (const float*)p.ws.part_ml;
    for (int h = warp; h < g; h += nwarps) {
        const int hg = kvh * g + h;
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
            // log2 units: p = 2^(s log2e - m log2e) / l. A head with no visible token
            // (l = 0) contributes 0 (a finite m keeps 2^(-inf - m) from being NaN).
            mh[h] = l != 0.f ? m * 1.4426950408889634f : 0.f;
            inv[h] = l != 0.f ? 1.0f / l : 0.f;
        }
    }
    __syncthreads();

    // 2. Block scores. Block j gathers compressed tokens B*j - (A-1) + k, k < span, with
    // weight overlap_count(k); a head's logits are lg[h * max_cmp + i]. Heads two at a
    // time so that up to 2 * 8 loads are in flight per thread (more spill at 64 registers,
    // the bound of NSA_NT_SEL = 1024 threads, on sm_80).
    const float* lg = (const float*)p.ws.logits + ((usize)wr * p.shape.num_q_heads + (usize)kvh * g) * p.ws.max_cmp;
    for (int j = tid; j < nblk; j += blockDim.x) {
        float acc = 0.f;
        const int first = B * j - (A - 1);
        for (int k0 = 0; k0 < span; k0 += 8) {
            float w[8];
            int ok = 0;  // bit k: token first + k0 + k is visible
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const int i = first + k0 + k;
                w[k] = overlap_count(k0 + k, A, B);
                ok |= (k0 + k < span && i >= 0 && i < nc) << k;
            }
            for (int h0 = 0; h0 < g; h0 += 2) {
                float v[2][8];
#pragma unroll
                for (int hh = 0; hh < 2; hh++)
#pragma unroll
                    for (int k = 0; k < 8; k++)
                        v[hh][k] = h0 + hh < g && ((ok >> k) & 1) ? lg[(usize)(h0 + hh) * p.ws.max_cmp + first + k0 + k] : NEG_INF;
#pragma unroll
                for (int hh = 0; hh < 2; hh++) {
                    if (h0 + hh >= g) break;
                    const float m2 = mh[h0 + hh];
                    float s = 0.f;
#pragma unroll
                    for (int k = 0; k < 8; k++) s += w[k] * ex2f(fmaf(v[hh][k], 1.4426950408889634f, -m2));
                    acc += s * inv[h0 + hh];
                }
            }
        }
        if (j < p.shape.sel_init || j > b - p.shape.sel_local) acc = POS_INF;
        key[j] = __float_as_uint(acc);
    }

    // 3. The count-th largest key T, digit by digit from the top; `need` is how many keys
    // equal to the bits chosen so far still belong to the top count.
    unsigned prefix = 0u, need = (unsigned)count;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        const unsigned hi = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
        for (int j0 = 0; j0 < nblk; j0 += blockDim.x) {
            const int j = j0 + tid;
            const unsigned k = j < nblk ? key[j] : 0u;
            const bool in = j < nblk && (k & hi) == prefix;
            const unsigned bin = (k >> shift) & 255u;
            // One atomic per distinct bin per warp: scores of similar size share their
            // top bits, and same-address shared atomics serialise.
            const unsigned same = __match_any_sync(0xffffffffu, in ? bin : 0x100u);
            if (in && (same & ((1u << lane) - 1u)) == 0u) atomicAdd(&hist[bin], (unsigned)__popc(same));
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l holds bins 255 - 8l - i, i < 8 (the largest first).
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
            unsigned acc = inc - sum;
            if (acc < need && need <= inc) {
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    if (acc + c[i] >= need) {
                        s_digit = 255u - 8u * lane - i;
                        s_need = need - acc;
                        s_eq = c[i];  // keys matching the prefix with this digit
                        break;
                    }
                    acc += c[i];
                }
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

#endif  // NSA_SELECTION_CUH
