// Block-major selected attention for prefill (prototype; issue 11's "invert the loop per
// key block" item). Instead of each query position walking its n selected blocks (each
// block's K/V read once per position and KV head: L2-bound, worst at small groups), each
// (KV head, selection block) is visited once per list of the positions that chose it: the
// block's K/V sit in shared memory while warps stream the positions' queries through it.
// Every (position, head, slot) gets a partial (its own softmax over the block's keys:
// the normalised output in bf16 and the log2-sum-exp2 in f32), merged afterwards.
//
// Compile-time: G_ (query heads per KV head, a power of two <= 16), DK_, DV_ (multiples
// of 32). Inputs: q [T][HQ][DK], k [HKV][T][DK], v [HKV][T][DV] (bf16, keys contiguous per
// KV head), entries (position * 16 + slot, grouped by (KV head, block), positions
// ascending), items (KV head, block, first entry, end entry).

typedef unsigned int u32;
typedef unsigned short bf16;  // storage only: conversions below, no CUDA headers needed
typedef unsigned long long usize;
#define INF_F __int_as_float(0x7f800000)

#ifndef G_
#error "G_ is passed by the harness"
#endif
#define NW 4                       // warps per block
#define BK 64                      // keys per selection block
#define LDK (DK_ + 8)              // padded shared rows (bf16 elements): conflict-free ldmatrix
#define LDV (DV_ + 8)
#define PW (16 / G_)               // positions per warp chunk (16 rows = PW positions x G heads)
#define NSLOT 16

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp16(u32 dst, const void* src, bool ok) {
    // 16 bytes global -> shared; zero-filled when !ok (src-size 0).
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm4(u32 a, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a));
}
__device__ __forceinline__ void ldsm4t(u32 a, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a));
}
__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;  // hi in the upper half, lo in the lower (round to nearest even)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float((u32)x << 16); }

// The warp's 16 query rows of one chunk (row r: entry e + r / G_, head r % G_) into its
// shared rows; rows past the item's end are zero-filled.
__device__ __forceinline__ void load_q(bf16* qs, const bf16* q, const int* entries, int e, int e1, int hq0, int HQ,
                                       int lane) {
    const int r = lane >> 1, half = lane & 1, ei = e + r / G_;
    const bool ok = ei < e1;
    const int t = ok ? (entries[ei] >> 4) : 0;
    const bf16* src = q + ((usize)t * HQ + hq0 + (r % G_)) * DK_;
    const u32 dst = smem_u32(qs + r * LDK);
#pragma unroll
    for (int c = half; c < DK_ / 8; c += 2) cp16(dst + c * 16, src + c * 8, ok);
}

extern "C" __global__ void __launch_bounds__(NW * 32) fsa_attn(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                              const bf16* __restrict__ v, const int* __restrict__ entries,
                                                              const int4* __restrict__ items, int n_items, int T, int HQ,
                                                              float sl2, bf16* __restrict__ part, float* __restrict__ lse) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* ks = (bf16*)smem;
    bf16* vs = ks + BK * LDK;
    bf16* qbuf = vs + BK * LDV;  // [NW][2][16][LDK]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tq = lane & 3;
    bf16* qw = qbuf + warp * 2 * 16 * LDK;

    for (int it = blockIdx.x; it < n_items; it += gridDim.x) {
        const int4 item = items[it];
        const int kvh = item.x, blk = item.y, e0 = item.z, e1 = item.w;
        const int hq0 = kvh * G_;
        __syncthreads();  // the previous item's K/V are no longer read
        {
            const bf16* kb = k + ((usize)kvh * T + (usize)blk * BK) * DK_;
            const bf16* vb = v + ((usize)kvh * T + (usize)blk * BK) * DV_;
            for (int x = tid; x < BK * DK_ / 8; x += NW * 32) {
                const int r = x / (DK_ / 8), c = x % (DK_ / 8);
                cp16(smem_u32(ks + r * LDK + c * 8), kb + (usize)r * DK_ + c * 8, blk * BK + r < T);
            }
            for (int x = tid; x < BK * DV_ / 8; x += NW * 32) {
                const int r = x / (DV_ / 8), c = x % (DV_ / 8);
                cp16(smem_u32(vs + r * LDV + c * 8), vb + (usize)r * DV_ + c * 8, blk * BK + r < T);
            }
        }
        // The warp's first chunk's queries in the same group as K/V.
        int e = e0 + warp * PW;
        int buf = 0;
        if (e < e1) load_q(qw, q, entries, e, e1, hq0, HQ, lane);
        cp_commit();
        cp_wait<0>();
        __syncthreads();

        for (; e < e1; e += NW * PW) {
            bf16* qs = qw + buf * 16 * LDK;
            // Next chunk's queries into the other buffer while this one computes.
            const int en = e + NW * PW;
            if (en < e1) load_q(qw + (buf ^ 1) * 16 * LDK, q, entries, en, e1, hq0, HQ, lane);
            cp_commit();

            // S = Q K^T: 16 rows x 64 keys.
            float s[8][4];
#pragma unroll
            for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < DK_ / 32; kk++) {
                u32 a[2][4];
#pragma unroll
                for (int h = 0; h < 2; h++)
                    ldsm4(smem_u32(qs + (lane & 15) * LDK + kk * 32 + h * 16 + (lane >> 4) * 8), a[h][0], a[h][1], a[h][2],
                          a[h][3]);
#pragma unroll
                for (int n = 0; n < 8; n++) {
                    u32 b0, b1, b2, b3;
                    ldsm4(smem_u32(ks + (n * 8 + (lane & 7)) * LDK + kk * 32 + (lane >> 3) * 8), b0, b1, b2, b3);
                    mma(s[n], a[0][0], a[0][1], a[0][2], a[0][3], b0, b1);
                    mma(s[n], a[1][0], a[1][1], a[1][2], a[1][3], b2, b3);
                }
            }
            // Causal mask (only the position's own block has keys past it) and the rows'
            // softmax over the block, log2 domain.
            const int eA = e + g / G_, eB = e + (g + 8) / G_;
            const int tA = eA < e1 ? (entries[eA] >> 4) : 0x7fffffff;
            const int tB = eB < e1 ? (entries[eB] >> 4) : 0x7fffffff;
            float mA = -INF_F, mB = -INF_F;
#pragma unroll
            for (int n = 0; n < 8; n++) {
                const int key = blk * BK + n * 8 + tq * 2;
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    s[n][j] = key + j <= tA ? s[n][j] * sl2 : -INF_F;
                    s[n][2 + j] = key + j <= tB ? s[n][2 + j] * sl2 : -INF_F;
                    mA = fmaxf(mA, s[n][j]);
                    mB = fmaxf(mB, s[n][2 + j]);
                }
            }
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) {
                mA = fmaxf(mA, __shfl_xor_sync(0xffffffffu, mA, o));
                mB = fmaxf(mB, __shfl_xor_sync(0xffffffffu, mB, o));
            }
            float lA = 0.f, lB = 0.f;
#pragma unroll
            for (int n = 0; n < 8; n++) {
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    s[n][j] = exp2f(s[n][j] - mA);
                    s[n][2 + j] = exp2f(s[n][2 + j] - mB);
                    lA += s[n][j];
                    lB += s[n][2 + j];
                }
            }
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) {
                lA += __shfl_xor_sync(0xffffffffu, lA, o);
                lB += __shfl_xor_sync(0xffffffffu, lB, o);
            }
            // O = P V: 16 rows x DV.
            float acc[DV_ / 8][4];
#pragma unroll
            for (int n = 0; n < DV_ / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                const u32 a0 = pack(s[2 * kk][0], s[2 * kk][1]), a1 = pack(s[2 * kk][2], s[2 * kk][3]);
                const u32 a2 = pack(s[2 * kk + 1][0], s[2 * kk + 1][1]), a3 = pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int n = 0; n < DV_ / 16; n++) {
                    u32 b0, b1, b2, b3;
                    ldsm4t(smem_u32(vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDV + n * 16 + (lane >> 4) * 8),
                           b0, b1, b2, b3);
                    mma(acc[2 * n], a0, a1, a2, a3, b0, b1);
                    mma(acc[2 * n + 1], a0, a1, a2, a3, b2, b3);
                }
            }
            // Normalised partial through the chunk's (now free) query rows, then 16-byte stores.
            const float iA = 1.f / lA, iB = 1.f / lB;
            __syncwarp();
#pragma unroll
            for (int n = 0; n < DV_ / 8; n++) {
                *(u32*)(qs + g * LDK + n * 8 + tq * 2) = pack(acc[n][0] * iA, acc[n][1] * iA);
                *(u32*)(qs + (g + 8) * LDK + n * 8 + tq * 2) = pack(acc[n][2] * iB, acc[n][3] * iB);
            }
            if (tq == 0) {
                if (eA < e1) {
                    const int x = entries[eA];
                    lse[((usize)(x >> 4) * HQ + hq0 + g % G_) * NSLOT + (x & 15)] = mA + __log2f(lA);
                }
                if (eB < e1) {
                    const int x = entries[eB];
                    lse[((usize)(x >> 4) * HQ + hq0 + (g + 8) % G_) * NSLOT + (x & 15)] = mB + __log2f(lB);
                }
            }
            __syncwarp();
            {
                const int r = lane >> 1, ei = e + r / G_;
                if (ei < e1) {
                    const int x = entries[ei];
                    bf16* dst = part + (((usize)(x >> 4) * HQ + hq0 + r % G_) * NSLOT + (x & 15)) * DV_;
#pragma unroll
                    for (int c = (lane & 1); c < DV_ / 8; c += 2) *(uint4*)(dst + c * 8) = *(const uint4*)(qs + r * LDK + c * 8);
                }
            }
            cp_wait<0>();
            __syncwarp();
            buf ^= 1;
        }
    }
}

// Merge of a (position, query head)'s slots: o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)
// over its `count` slots. A warp per (position, head), DV / 32 columns per lane.
extern "C" __global__ void fsa_merge(const bf16* __restrict__ part, const float* __restrict__ lse, int T, int HQ,
                                     int nsel, int sel_block, float* __restrict__ out) {
    const int w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (w >= T * HQ) return;
    const int t = w / HQ;
    const int count = min(nsel, t / sel_block + 1);
    const float* ls = lse + (usize)w * NSLOT;
    float x = lane < count ? ls[lane] : -INF_F;
    float m = x;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float wgt = lane < count ? exp2f(x - m) : 0.f;
    float W = wgt;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) W += __shfl_xor_sync(0xffffffffu, W, o);
    float a[DV_ / 32];
#pragma unroll
    for (int c = 0; c < DV_ / 32; c++) a[c] = 0.f;
    const bf16* p = part + (usize)w * NSLOT * DV_;
    for (int s = 0; s < count; s++) {
        const float ws = __shfl_sync(0xffffffffu, wgt, s);
#pragma unroll
        for (int c = 0; c < DV_ / 32; c++) a[c] += ws * bf2f(p[(usize)s * DV_ + c * 32 + lane]);
    }
#pragma unroll
    for (int c = 0; c < DV_ / 32; c++) out[(usize)w * DV_ + c * 32 + lane] = a[c] / W;
}
