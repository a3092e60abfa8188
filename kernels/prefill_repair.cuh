// The prefill's exact repair of the rows a non-finite V value could have reached wrongly
// (the engine's non-finite policy: a NaN or infinity reaches exactly the outputs the
// reference computes it into, no others).
//
// The tensor-core prefill kernels share a K/V tile in shared memory among rows that see
// different keys of it; a row that must not see a key gets probability 0 there, and the
// product still multiplies that 0 by the key's V row: 0 x NaN and 0 x inf are NaN. So where
// a tile's rows that some of its rows do not see hold a non-finite V element (the scans of
// kernels/prefill_nonfinite.cuh), the kernel finishes the tile as usual and marks the
// tile's positions at that KV head: a byte per (step row, KV head) in `ws.pf_fix`. This
// launch runs after the step's last prefill kernel and recomputes every marked (row, KV
// head) in scalar: each branch over exactly the keys the row sees (the compressed tokens
// up to its position, its selected blocks as `pf_cmp` chose them, its window; `attend`'s
// online softmax), gated and summed as the decode path's combine does (`gated_store`'s
// rules), stored over what the prefill wrote; then it clears the mark. So the fast kernels
// carry no scalar product in their tile loops, and their scans need no agreement among
// the warps that share a tile before its products (`pf_cmp_ws` splits them among its
// warps: docs/PREFILL_NOTES.md, thirty-first session); a step without marks costs one
// scan of the marks. The selection is unaffected by V, so it stands as chosen.
#ifndef NSA_PREFILL_REPAIR_CUH
#define NSA_PREFILL_REPAIR_CUH

#include "attend.cuh"
#include "combine.cuh"        // branch_factor
#include "prefill_parts.cuh"  // pf_sel

// Marks step rows row0 .. row0 + n - 1 (n <= 255, a tile's positions) at KV head kvh for
// the repair: one byte, the most rows any mark there named, at the first row's. Any lane
// may mark; within a launch every mark of a byte names the same rows (a tile's first row is
// no other tile's), and a later launch's mark never shortens an earlier one's. A row
// marked twice is repaired twice, to the same values.
__device__ __forceinline__ void pf_fix_mark(const Params& p, int row0, int n, int kvh) {
    unsigned char* f = (unsigned char*)p.ws.pf_fix + (usize)row0 * p.shape.num_kv_heads + kvh;
    if (*f < n) *f = (unsigned char)n;
}

// The calling warp's flag "a non-finite scan of this block's tiles found one", in shared
// memory (a byte per warp of the block): a tile loop sets it (`pf_nf_note`) and the marks
// follow the loop (`pf_nf_flush`), so no register stays live across the loop for it (in
// `pf_cmp_ws` a flag or the marks' arguments kept in registers made ptxas spill).
__device__ __forceinline__ volatile unsigned char& pf_nf_flag() {
    __shared__ unsigned char flags[32];
    return ((volatile unsigned char*)flags)[threadIdx.x >> 5];
}

// Sets the calling warp's flag where `found` (warp-uniform: a scan's answer); lane 0 stores.
__device__ __forceinline__ void pf_nf_note(bool found) {
    if (found && (threadIdx.x & 31) == 0) pf_nf_flag() = 1;
}

// After a tile loop: the marks of rows row0 .. row0 + n - 1 at kvh if the warp's flag is
// set, and the flag cleared for the next loop (the warp's lanes agree: warp-uniform flag).
__device__ __forceinline__ void pf_nf_flush(const Params& p, int row0, int n, int kvh) {
    __syncwarp();
    if (pf_nf_flag()) pf_fix_mark(p, row0, n, kvh);
    __syncwarp();
    if ((threadIdx.x & 31) == 0) pf_nf_flag() = 0;
}

// One marked (step row r, KV head kvh): its G query heads' outputs, `hc` heads at a time.
// Shared (`src/cuda/build.rs` sizes it): `attend`'s area, then the gated sums fo[hc * DV]
// and the gates g3[hc * 3].
template <class E>
__device__ void pf_repair_pair(const Params& p, int r, int kvh) {
    extern __shared__ float smem[];
    typedef typename E::T T;
    const int hc = p.launch.head_chunk, DK = p.shape.head_dim_qk, DV = p.shape.head_dim_v, G = p.shape.group_size;
    float* q_s = smem;
    float* s_t = q_s + hc * DK;
    float* v_t = s_t + hc * NSA_TK;
    float* acc = v_t + NSA_TK * DV;
    float* m_s = acc + hc * DV;
    float* l_s = m_s + hc;
    float* corr = l_s + hc;
    float* fo = corr + hc;
    float* g3 = fo + hc * DV;
    const int2 row = ((const int2*)p.step.rows)[r];  // (step sequence, position)
    const int si = row.x, t = row.y, n = p.shape.sel_count, B = p.shape.sel_block;
    const int* rtab = (const int*)p.paging.raw_tab + (usize)si * p.paging.pages_per_seq;
    const int* ctab = (const int*)p.paging.cmp_tab + (usize)si * p.paging.cmp_pages_per_seq;
    const T *rk = (const T*)p.paging.raw_k, *rv = (const T*)p.paging.raw_v;
    const T *ck = (const T*)p.paging.cmp_k, *cv = (const T*)p.paging.cmp_v;
    const int* sel = pf_sel(p) + ((usize)r * p.shape.num_kv_heads + kvh) * n;
    for (int h0 = 0; h0 < G; h0 += hc) {
        const int hcn = min(hc, G - h0);
        const usize hrow = (usize)r * p.shape.num_q_heads + (usize)kvh * G + h0;  // first head's (row, head)
        load_q<E>(p, r, kvh, h0, hcn, q_s);
        for (int e = threadIdx.x; e < hcn * 3; e += blockDim.x) g3[e] = ((const float*)p.io.gates)[hrow * 3 + e];
        // Branch b's gated part added to fo in the combine's order and rules (`gated_store`,
        // `branch_factor`: kernels/combine.cuh): the compressed branch always (g x 0 where
        // it saw no key: a NaN gate propagates), the others only where they saw a key.
        auto add = [&](int b) {
            for (int e = threadIdx.x; e < hcn * DV; e += blockDim.x) {
                const int h = e / DV;
                const float l = l_s[h], g = g3[h * 3 + b], f = branch_factor(b, l, g);
                if (b == 0)
                    fo[e] = 0.f + g * (l != 0.f ? acc[e] * f : 0.f);
                else if (l != 0.f)
                    fo[e] = fo[e] + f * acc[e];
            }
            __syncthreads();
        };
        attend<E>(p, ck, cv, ctab, kvh, 0, num_cmp(p, t + 1), hcn, q_s, s_t, v_t, acc, m_s, l_s, corr, nullptr);
        add(0);
        attend_reset(hcn, DV, acc, m_s, l_s);
        for (int u = 0; u < n; u++) {
            const int j = sel[u];
            if (j >= 0) attend_keys<E>(p, rk, rv, rtab, kvh, j * B, min(j * B + B, t + 1), hcn, q_s, s_t, v_t, acc, m_s, l_s, corr, nullptr);
        }
        add(1);
        attend<E>(p, rk, rv, rtab, kvh, max(0, t + 1 - p.shape.window), t + 1, hcn, q_s, s_t, v_t, acc, m_s, l_s, corr, nullptr);
        add(2);
        T* out = (T*)p.io.out;
        for (int e = threadIdx.x; e < hcn * DV; e += blockDim.x) E::st(out, hrow * DV + e, fo[e]);
        __syncthreads();  // q_s, g3 and fo are the next head chunk's
    }
}

// The repair launch (`nsa_pf_repair_*`, NSA_NT_ATT threads, a grid of any size): blocks
// stride over the step's (row, KV head) marks four at a time, list the marked ones of each
// stride, repair the rows each one names one after another with the whole block, and clear
// the marks.
template <class E>
__device__ void pf_repair(const Params& p) {
    __shared__ int list[4 * NSA_NT_ATT];
    __shared__ int nlist;
    const int hkv = p.shape.num_kv_heads;
    const int tokens = ((const StepHeader*)p.step.header)->tokens, pairs = tokens * hkv;
    unsigned char* fix = (unsigned char*)p.ws.pf_fix;
    for (int e0 = blockIdx.x * 4 * NSA_NT_ATT; e0 < pairs; e0 += gridDim.x * 4 * NSA_NT_ATT) {
        if (threadIdx.x == 0) nlist = 0;
        __syncthreads();
        const int e = e0 + 4 * threadIdx.x;  // the region is a multiple of 4 bytes (workspace.rs)
        if (e < pairs) {
            const unsigned w = *(const unsigned*)(fix + e);
            for (int b = 0; b < 4; b++)
                if ((w >> (8 * b)) & 0xffu && e + b < pairs) list[atomicAdd(&nlist, 1)] = e + b;
        }
        __syncthreads();
        const int nl = nlist;
        for (int i = 0; i < nl; i++) {
            const int x = list[i], r0 = x / hkv, r1 = min(r0 + fix[x], tokens);
            for (int r = r0; r < r1; r++) pf_repair_pair<E>(p, r, x % hkv);
            if (threadIdx.x == 0) fix[x] = 0;
        }
        __syncthreads();  // `nlist` and `list` are the next stride's
    }
}

#endif  // NSA_PREFILL_REPAIR_CUH
