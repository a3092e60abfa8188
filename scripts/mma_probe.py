#!/usr/bin/env python3
"""How fast the prefill selected branch's per-warp loop can run, and what feeds it (a diagnostic).

`pf_sel` (kernels/prefill.cuh `pf_sel_alone`) multiplies each position's 16 query heads
against its selected blocks with mma.sync m16n8k16 (a warp per position: no other rows
share a K/V block with random selections, and a wgmma needs 64). The first forms measure
that loop's ceiling with no memory traffic at all; the rest what bringing its bytes in
costs, and the ways of sharing them that were weighed before building one
(docs/PREFILL_NOTES.md, twenty-eighth and fifty-third sessions):

  mma_regs_C   mma.sync with operands in registers, C independent accumulators a warp
               (the instruction's own rate);
  sel_mma      the per-warp loop's matrix part on a 16-key sub-tile already in shared
               memory: Q K^T (8 ldmatrix.x4, 16 mma, two chains of two), P V (8
               ldmatrix.x4.trans, 16 mma), the same swizzled addresses as pf_sel;
  sel_loop     the same with the online softmax between them (row max over the four
               lanes of a row, 8 exponentials and sums per lane; no rescale, as in the
               common case where the max moves by less than the threshold);
  sel_stream   sel_loop fed as pf_sel feeds it: each warp copies its sub-tiles (16 keys of
               K and of V, 8 KB) by cp.async from scattered 64-key blocks of a 24 MB buffer
               (resident in L2, as the selected blocks mostly are) into its own two stages,
               one sub-tile ahead, so every byte is written into shared memory and read back;
  copy_stream  the same copies and waits with no math: the rate at which these warps
               bring blocks from L2 into shared memory at all (also on half the
               multiprocessors, one block each: whether the rate is the chip's or each SM's);
  copy_bulk    the same sub-tiles by the bulk-copy engine (one lane a warp issues
               cp.async.bulk of the K and V rows, 4 KB each, on an mbarrier a stage);
  copy_mcast   copy_bulk by a cluster of two blocks on two multiprocessors that stream the
  (-4: four    same sub-tiles: each block's warp copies half of each (K or V, 4 KB) into both
  stages)      blocks' stages at once (.multicast::cluster), and a stage is refilled once the
               warps of both blocks are done with it (an mbarrier a stage in each block, armed
               from both): whether one L2 read landing in two multiprocessors doubles the
               bytes a second they take in, the premise of two pf_sel tiles sharing blocks;
  wg_loop      pf_cmp's pass-2 tile step on one warpgroup (wgmma Q K^T from shared memory,
               the exponentials, wgmma P V with P from registers), for --corun;
  wg_loop_rs   the same with Q K^T's Q from registers (32 words a thread): the step reading
               only K and V from shared memory, to tell shared-memory reads from the tensor
               cores as what the stream beside it competes for;
  sel_union_U  (U = 10 x the users a block) pf_sel's loop as a 12-position block would run
               it: 12 warps (a position each) walk one list of 64-key blocks (the union of
               their positions' choices) through a ring of 32 KB stages, each block copied
               once (by the warp that released its stage last) and multiplied by the warps
               whose positions chose it (about U of the 12, at random); no block barrier: an
               mbarrier a stage says its copy landed, a count a stage who is done;
  sel_items_K  the same ring, but a block's work as K items any warp takes in turn (a
               shared counter): an item is one position's 16 heads against the block, its
               accumulators, softmax state and Q fragments loaded from shared memory and its
               accumulators stored back (4 positions' slots), so every warp can work on
               whatever block is in the ring instead of waiting for its own position's next.

Each runs a single wave of resident blocks for a fixed number of iterations: 128 threads and
1 to 4 blocks a multiprocessor (dynamic shared memory chosen so, where the kernel's own
stages fit), or one 12-warp block a multiprocessor for the ring forms. TFLOP/s counts 4,096
FLOPs per m16n8k16. Two steps, since the GPU machine has no compiler:

  python3 scripts/mma_probe.py build DIR   # here: NVRTC -> DIR/*.cubin
  python3 scripts/mma_probe.py run DIR     # on the GPU: the driver through ctypes, a table
                                           # (run DIR --from NAME: that kernel and those after it)
  python3 scripts/mma_probe.py run DIR --corun  # a compute loop and a stream in one block (below)
  python3 scripts/mma_probe.py --self-test # the stages' layout: copies against ldmatrix reads

--corun times a compute-bound loop A and an L2-bound stream B in one block a multiprocessor
(A's warps first, then B's four), each alone (the other part idle) and together: whether the
prefill's two halves could overlap if they shared the multiprocessors. A = mma_regs_8
(tensor cores only), sel_loop (tensor cores and shared-memory reads), wg_loop or wg_loop_rs
on one or two warpgroups (pf_cmp's own step); B = sel_stream or copy_stream (the stream's copies
without its products).
"""
import array
import ctypes
import os
import statistics
import sys

from probe_cuda import Driver, compile_cubin, nvrtc

HEADER = r"""
typedef unsigned u32;
__device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm4(u32 a, u32& b0, u32& b1, u32& b2, u32& b3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(a));
}
__device__ __forceinline__ void ldsm4t(u32 a, u32& b0, u32& b1, u32& b2, u32& b3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(a));
}
__device__ __forceinline__ float ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ u32 pack(float lo, float hi) { u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
// bf16 pairs of about 2^-7 with varied mantissas (random-looking data draws the power real data does).
__device__ __forceinline__ u32 val(u32 i) { return 0x3c003c00u | ((i * 2654435761u) & 0x007f007fu); }
// The stream kernels' scattered block for sub-tile i of warp gw (four 16-key sub-tiles a block).
__device__ __forceinline__ u32 stream_block(u32 gw, int i, u32 nblocks) { return ((gw * 2654435761u) ^ ((u32)(i >> 2) * 40503u)) % nblocks; }
// Spins until the phase of the mbarrier at shared address `bar` with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done)
        asm volatile("{ .reg .pred P; mbarrier.try_wait.parity.shared.b64 P, [%1], %2; selp.u32 %0, 1, 0, P; }"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
"""


def regs_source(c):
    return HEADER + f"""
extern "C" __global__ void __launch_bounds__(128) mma_regs_{c}(float* sink, int iters) {{
    float acc[{c}][4];
#pragma unroll
    for (int k = 0; k < {c}; k++) acc[k][0] = acc[k][1] = acc[k][2] = acc[k][3] = 0.f;
    const u32 t = threadIdx.x;
    const u32 a0 = val(t), a1 = val(t + 1), a2 = val(t + 2), a3 = val(t + 3), b0 = val(t + 4), b1 = val(t + 5);
    for (int i = 0; i < iters; i++) {{
#pragma unroll
        for (int k = 0; k < {c}; k++) mma(acc[k], a0, a1, a2, a3, b0, b1);
    }}
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < {c}; k++) s += acc[k][0] + acc[k][1] + acc[k][2] + acc[k][3];
    if (s == 1.2345f) sink[threadIdx.x] = s;
}}
"""


def sel_source(name, softmax):
    return HEADER + f"""
extern "C" __global__ void __launch_bounds__(128) {name}(float* sink, int iters) {{
    extern __shared__ __align__(128) unsigned char sm[];
    const int lane = threadIdx.x & 31;
    // Two stages of 16 keys of K then V (128 dims, bf16: 8 KB each), as a pf_sel warp's; the
    // block's warps read the same ones (the data is never written again), so the dynamic
    // shared memory only sets how many blocks share a multiprocessor.
    u32* w = (u32*)sm;
    for (int i = threadIdx.x; i < 4096; i += blockDim.x) w[i] = val(i);
    __syncthreads();
    u32 qa[8][4];
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
#pragma unroll
        for (int e = 0; e < 4; e++) qa[kk][e] = val(lane * 32 + kk * 4 + e);
    const u32 base = (u32)__cvta_generic_to_shared(sm);
    const int krow = (lane & 7) + (lane >> 4) * 8, kc = (lane >> 3) & 1;
    const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vc = lane >> 4;
    const u32 kx = krow * 256 + (((kc ^ krow) & 7) << 4), vx = vrow * 256 + (((vc ^ vrow) & 7) << 4);
    float o[16][4];
#pragma unroll
    for (int d = 0; d < 16; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float lA = 0.f, lB = 0.f, mA = 1.f, mB = 1.f;
    const float sl2 = 0.1275f;
    for (int i = 0; i < iters; i++) {{
        const u32 kt = base + (i & 1) * 8192, vt = kt + 4096;
        float s[2][4], u[2][4];
#pragma unroll
        for (int e = 0; e < 4; e++) s[0][e] = s[1][e] = u[0][e] = u[1][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {{
            u32 b0, b1, b2, b3;
            ldsm4((kt + kx + (kk >> 2) * 128) ^ (((2 * kk) & 7) << 4), b0, b1, b2, b3);
            float(&acc)[2][4] = kk % 2 ? u : s;
            mma(acc[0], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b0, b1);
            mma(acc[1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b2, b3);
        }}
#pragma unroll
        for (int e = 0; e < 4; e++) {{
            s[0][e] += u[0][e];
            s[1][e] += u[1][e];
        }}
        if ({1 if softmax else 0}) {{
            float xA = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
            float xB = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
            xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
            xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
            xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
            xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
            const bool keep = __all_sync(0xffffffffu, (xA - mA) * sl2 <= 8.f && (xB - mB) * sl2 <= 8.f);
            if (!keep) {{ mA = fmaxf(mA, xA); mB = fmaxf(mB, xB); }}
            const float uA = mA * sl2, uB = mB * sl2;
            float sA = 0.f, sB = 0.f;
#pragma unroll
            for (int n = 0; n < 2; n++) {{
                s[n][0] = ex2(fmaf(s[n][0], sl2, -uA));
                s[n][1] = ex2(fmaf(s[n][1], sl2, -uA));
                s[n][2] = ex2(fmaf(s[n][2], sl2, -uB));
                s[n][3] = ex2(fmaf(s[n][3], sl2, -uB));
                sA += s[n][0] + s[n][1];
                sB += s[n][2] + s[n][3];
            }}
            lA += sA;
            lB += sB;
        }}
        const u32 pa0 = pack(s[0][0], s[0][1]), pa1 = pack(s[0][2], s[0][3]), pa2 = pack(s[1][0], s[1][1]), pa3 = pack(s[1][2], s[1][3]);
#pragma unroll
        for (int dp = 0; dp < 8; dp++) {{
            u32 b0, b1, b2, b3;
            ldsm4t((vt + vx + (dp >> 2) * 128) ^ (((2 * dp) & 7) << 4), b0, b1, b2, b3);
            mma(o[2 * dp], pa0, pa1, pa2, pa3, b0, b1);
            mma(o[2 * dp + 1], pa0, pa1, pa2, pa3, b2, b3);
        }}
    }}
    float t = lA + lB;
#pragma unroll
    for (int d = 0; d < 16; d++) t += o[d][0] + o[d][1] + o[d][2] + o[d][3];
    if (t == 1.2345f) sink[threadIdx.x] = t;
}}
"""


# wgmma m64n64k16 with A (Q) from registers and B (K) K-major from shared memory: the RS form
# of Q K^T, which reads only K from shared memory (wg_loop_rs). The probe's own: the engine's
# kernels have no such product (pf_cmp reads Q from shared memory).
WG_RS_QK = """
__device__ __forceinline__ void wg_rs_qk_m64n64k16(float* d, const unsigned* a, u64 db, int acc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %37, 0;\\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0; }"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
#endif
}
"""


def wg_source(name, rs=False):
    """pf_cmp's pass-2 tile step on one warpgroup: S = Q K^T by eight wgmma m64n64k16 from
    shared memory (Q and K tiles of 64 x 128 in the 128-byte swizzled layout), the
    probabilities' exponentials, O += P V by four wgmma m64n128k16 with P from registers,
    each product waited for (kernels/wgmma.cuh, as kernels/prefill_parts.cuh `Wgmma` runs
    them). In a larger block, warpgroup w uses 48 KB of shared memory from w x 48 KB.
    rs: Q K^T with Q's fragments in registers (32 words a thread, loaded once), so the tile
    step reads only K and V from shared memory (half the bytes a FLOP of the Q K^T half)."""
    if rs:
        q_regs = """    u32 qf[8][4];
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
        for (int j = 0; j < 4; j++) qf[kk][j] = val(threadIdx.x * 32 + kk * 4 + j);"""
        qk_step = "            wg_rs_qk_m64n64k16(&sc[0][0], qf[kk], db, kk);"
    else:
        q_regs = ""
        qk_step = """            const u64 da = wg_desc_at(qdesc, (kk >> 2) * 64 * 128 + (kk & 3) * 32);
            if (kk == 0)
                wg_ss_m64n64k16_first<1>(&sc[0][0], da, db);
            else
                wg_ss_m64n64k16<1>(&sc[0][0], da, db, 1);"""
    wg = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "wgmma.cuh")).read()
    return HEADER + "typedef unsigned long long u64;\n" + wg + (WG_RS_QK if rs else "") + f"""
extern "C" __global__ void __launch_bounds__(128) {name}(float* sink, int iters) {{
    extern __shared__ __align__(1024) unsigned char sm[];
    const int wg = threadIdx.x >> 7;
    u32* w = (u32*)(sm + wg * 49152);
    for (int i = threadIdx.x & 127; i < 12288; i += 128) w[i] = val(i);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the generic writes before the products read them
    asm volatile("bar.sync %0, 128;" :: "r"(1 + wg));  // this warpgroup's own barrier
    const u32 q = (u32)__cvta_generic_to_shared(sm) + wg * 49152u, k = q + 16384u, v = q + 32768u;
    const u64 qdesc = wg_desc(q, 16, 1024), kdesc = wg_desc(k, 16, 1024), vdesc = wg_desc(v, 64 * 128, 1024);
    float o[16][4];
#pragma unroll
    for (int d = 0; d < 16; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
{q_regs}
    const float sl2 = 0.1275f;
    for (int i = 0; i < iters; i++) {{
        float sc[8][4];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {{
            const u64 db = wg_desc_at(kdesc, (kk >> 2) * 64 * 128 + (kk & 3) * 32);
{qk_step}
        }}
        wg_commit();
        wg_wait<0>();
        wg_pin(sc);
        u32 a[4][4];
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {{
            a[ks][0] = pack(ex2(sc[2 * ks][0] * sl2), ex2(sc[2 * ks][1] * sl2));
            a[ks][1] = pack(ex2(sc[2 * ks][2] * sl2), ex2(sc[2 * ks][3] * sl2));
            a[ks][2] = pack(ex2(sc[2 * ks + 1][0] * sl2), ex2(sc[2 * ks + 1][1] * sl2));
            a[ks][3] = pack(ex2(sc[2 * ks + 1][2] * sl2), ex2(sc[2 * ks + 1][3] * sl2));
        }}
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ks++) wg_rs_m64n128k16_tb<1>(&o[0][0], a[ks][0], a[ks][1], a[ks][2], a[ks][3], wg_desc_at(vdesc, ks * 16 * 128));
        wg_commit();
        wg_wait<0>();
        wg_pin(o);
    }}
    float t = 0.f;
#pragma unroll
    for (int d = 0; d < 16; d++) t += o[d][0] + o[d][1] + o[d][2] + o[d][3];
    if (t == 1.2345f) sink[threadIdx.x] = t;
}}
"""


STREAM_BLOCKS = 768  # 64-key blocks of K and V (32 KB each at 128/128): a 24 MB buffer


def stream_source(name, math):
    """sel_loop's body (or none) on sub-tiles each warp copies into its own two stages."""
    body = sel_source(name, True)
    # The register-only probe's prologue fills a block-wide 16 KB once; here each warp
    # streams into 16 KB of its own, so the kernel takes the buffer and keeps its layout.
    body = body.replace(f"{name}(float* sink, int iters)", f"{name}(float* sink, int iters, const unsigned char* buf)")
    body = body.replace("""    // Two stages of 16 keys of K then V (128 dims, bf16: 8 KB each), as a pf_sel warp's; the
    // block's warps read the same ones (the data is never written again), so the dynamic
    // shared memory only sets how many blocks share a multiprocessor.
    u32* w = (u32*)sm;
    for (int i = threadIdx.x; i < 4096; i += blockDim.x) w[i] = val(i);
    __syncthreads();""", """    // Two stages of 16 keys of K then V (128 dims, bf16: 8 KB each) a warp, as pf_sel's.
    const int warp = threadIdx.x >> 5;
    const u32 gw = blockIdx.x * 4u + warp;""")
    body = body.replace("const u32 base = (u32)__cvta_generic_to_shared(sm);",
                        "const u32 base = (u32)__cvta_generic_to_shared(sm) + warp * 16384u;")
    # Sub-tile i of warp gw: 16 keys (i & 3) of a scattered block; lane l copies 16-byte chunks
    # l + 32 j of its 512 (K rows then V rows, 16 chunks a 256-byte row), each into its row's
    # chunk c ^ (row & 7): the swizzle the ldmatrix addresses above read.
    copy = f"""
    auto issue = [&](int i) {{
        const u32 blk = stream_block(gw, i, {STREAM_BLOCKS}u);
        const unsigned char* src = buf + (size_t)blk * 32768u + (u32)(i & 3) * 4096u;
        const u32 dst = base + (u32)(i & 1) * 8192u;
#pragma unroll
        for (int j = 0; j < 16; j++) {{
            const int idx = lane + 32 * j, half = idx >> 8, row = (idx >> 4) & 15, c = idx & 15;
            const u32 d = dst + half * 4096u + row * 256u + (u32)((c ^ (row & 7)) << 4);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(d), "l"(src + half * 16384u + row * 256u + c * 16u));
        }}
        asm volatile("cp.async.commit_group;");
    }};
    issue(0);
    for (int i = 0; i < iters; i++) {{
        if (i + 1 < iters) issue(i + 1); else asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group 1;" ::: "memory");
        __syncwarp();"""
    body = body.replace("""    for (int i = 0; i < iters; i++) {
        const u32 kt = base + (i & 1) * 8192, vt = kt + 4096;""", copy + """
        const u32 kt = base + (i & 1) * 8192, vt = kt + 4096;""")
    if not math:
        # Keep the copies and the waits; the math reads one word a sub-tile so nothing is dead.
        start = body.index("        float s[2][4], u[2][4];")
        end = body.index("    float t = lA + lB;")
        body = body[:start] + """        u32 x;
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(x) : "r"(kt + lane * 4));
        lA += __uint_as_float(x & 0x3f800000u);
        __syncwarp();
    }
""" + body[end:]
    else:
        # The stage is rewritten by the copy two iterations on: every lane past its reads first.
        body = body.replace("""            mma(o[2 * dp + 1], pa0, pa1, pa2, pa3, b2, b3);
        }
    }""", """            mma(o[2 * dp + 1], pa0, pa1, pa2, pa3, b2, b3);
        }
        __syncwarp();
    }""")
    return body


def bulk_source(name):
    """copy_stream's sub-tiles by cp.async.bulk (K rows, then V rows: 4 KB each, contiguous
    in the buffer), completion on one mbarrier per stage; the same one-word read of each."""
    return HEADER + f"""
extern "C" __global__ void __launch_bounds__(128) {name}(float* sink, int iters, const unsigned char* buf) {{
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(8) unsigned long long bar[4][2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 gw = blockIdx.x * 4u + warp;
    const u32 base = (u32)__cvta_generic_to_shared(sm) + warp * 16384u;
    const u32 b0 = (u32)__cvta_generic_to_shared(&bar[warp][0]);
    if (lane == 0) {{
        asm volatile("mbarrier.init.shared.b64 [%0], 1;" :: "r"(b0));
        asm volatile("mbarrier.init.shared.b64 [%0], 1;" :: "r"(b0 + 8));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }}
    __syncwarp();
    auto issue = [&](int i) {{
        if (lane != 0) return;
        const u32 blk = stream_block(gw, i, {STREAM_BLOCKS}u);
        const unsigned char* src = buf + (size_t)blk * 32768u + (u32)(i & 3) * 4096u;
        const u32 dst = base + (u32)(i & 1) * 8192u, b = b0 + (u32)(i & 1) * 8u;
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the generic reads of this stage before the async writes
        asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], 8192;" :: "r"(b) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 4096, [%2];"
                     :: "r"(dst), "l"(src), "r"(b) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 4096, [%2];"
                     :: "r"(dst + 4096u), "l"(src + 16384u), "r"(b) : "memory");
    }};
    float acc = 0.f;
    issue(0);
    for (int i = 0; i < iters; i++) {{
        if (i + 1 < iters) issue(i + 1);
        const u32 b = b0 + (u32)(i & 1) * 8u, parity = (u32)(i >> 1) & 1u;
        mbar_wait(b, parity);
        u32 x;
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(x) : "r"(base + (u32)(i & 1) * 8192u + lane * 4));
        acc += __uint_as_float(x & 0x3f800000u);
        __syncwarp();
    }}
    if (acc == 1.2345f) sink[threadIdx.x] = acc;
}}
"""


def mcast_source(name, ns=2):
    """copy_bulk's stream shared by a cluster of two blocks (see the module notes), through
    `ns` stages a warp."""
    return HEADER + f"""
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(128) {name}(float* sink, int iters, const unsigned char* buf) {{
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(8) unsigned long long full[4][{ns}], empty[4][{ns}];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const u32 gw = (blockIdx.x >> 1) * 4u + warp;  // the pair streams the same sub-tiles
    const u32 base = (u32)__cvta_generic_to_shared(sm) + warp * {ns * 8192}u;
    const u32 f0 = (u32)__cvta_generic_to_shared(&full[warp][0]), e0 = (u32)__cvta_generic_to_shared(&empty[warp][0]);
    u32 e0_peer;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(e0_peer) : "r"(e0), "r"(rank ^ 1u));
    if (lane == 0) {{
        for (int st = 0; st < {ns}; st++) {{
            asm volatile("mbarrier.init.shared.b64 [%0], 1;" :: "r"(f0 + 8u * st));
            asm volatile("mbarrier.init.shared.b64 [%0], 2;" :: "r"(e0 + 8u * st));  // both blocks' warp
        }}
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }}
    // Both blocks' barriers exist before either block's copies or arrivals reach them.
    asm volatile("barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned;" ::: "memory");
    auto wait = [&](u32 bar, u32 parity) {{
        u32 done = 0;
        while (!done)
            asm volatile("{{ .reg .pred P; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 P, [%1], %2; selp.u32 %0, 1, 0, P; }}"
                         : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    }};
    // Sub-tile i into stage i % ns of both blocks: this block's half (rank 0 K, rank 1 V), 4 KB,
    // multicast; each block arms its own stage barrier for the 8 KB both halves bring.
    auto issue = [&](int i) {{
        if (lane != 0) return;
        const u32 st = (u32)i % {ns}u;
        if (i >= {ns}) wait(e0 + 8u * st, ((u32)i / {ns}u + 1u) & 1u);  // both blocks' warp read sub-tile i - ns
        const u32 blk = stream_block(gw, i, {STREAM_BLOCKS}u);
        const unsigned char* src = buf + (size_t)blk * 32768u + (u32)(i & 3) * 4096u + rank * 16384u;
        const u32 dst = base + st * 8192u + rank * 4096u, fb = f0 + 8u * st;
        asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], 8192;" :: "r"(fb) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], 4096, [%2], %3;"
                     :: "r"(dst), "l"(src), "r"(fb), "h"((unsigned short)3) : "memory");
    }};
    float acc = 0.f;
    for (int i = 0; i < {ns} - 1 && i < iters; i++) issue(i);
    for (int i = 0; i < iters; i++) {{
        if (i + {ns} - 1 < iters) issue(i + {ns} - 1);
        const u32 st = (u32)i % {ns}u;
        wait(f0 + 8u * st, ((u32)i / {ns}u) & 1u);
        u32 x;
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(x) : "r"(base + st * 8192u + lane * 4));
        acc += __uint_as_float(x & 0x3f800000u);
        __syncwarp();
        if (lane == 0) {{  // this block's warp is done with the stage: tell both blocks' issuers
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            asm volatile("mbarrier.arrive.release.cluster.shared::cta.b64 _, [%0];" :: "r"(e0 + 8u * st) : "memory");
            asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" :: "r"(e0_peer + 8u * st) : "memory");
        }}
    }}
    // Neither block leaves while the other may still copy into it or arrive on its barriers.
    asm volatile("barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned;" ::: "memory");
    if (acc == 1.2345f) sink[threadIdx.x] = acc;
}}
"""


def ring_refill(stages):
    """The ring kernels' `refill(u)`: block u of the list into stage u % stages by the calling
    warp (64 16-byte cp.async a lane, swizzled as the ldmatrix addresses read), each lane
    arriving on the stage's mbarrier once its copies land (init count 32); `gen[stage]` = u
    says the copy is issued."""
    return f"""    auto refill = [&](u32 u) {{
        const u32 st = u % {stages}u, dst = base + st * 32768u;
        const u32 blk = ((blockIdx.x * 2654435761u) ^ (u * 40503u)) % {STREAM_BLOCKS}u;
        const unsigned char* src = buf + (size_t)blk * 32768u;
        if (lane == 0) gen[st] = u;
#pragma unroll 8
        for (int j = 0; j < 64; j++) {{
            const int idx = lane + 32 * j, half = idx >> 10, row = (idx >> 4) & 63, c = idx & 15;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst + half * 16384u + row * 256u + (u32)((c ^ (row & 7)) << 4)),
                         "l"(src + half * 16384u + row * 256u + c * 16u));
        }}
        asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];" :: "r"((u32)__cvta_generic_to_shared(&full[st])) : "memory");
    }};
"""


UNION_STAGES = 6  # 32 KB stages: 192 KB of one block a multiprocessor
UNION_WARPS = 12


def union_source(name, users):
    """sel_loop's step on a ring of whole-block stages shared by 12 warps (see the module
    notes); `users`: the mean number of warps that multiply each block."""
    body = sel_source(name, True)
    prologue = body[body.index("    u32 qa[8][4];"):body.index("    for (int i = 0; i < iters; i++) {")]
    prologue = prologue.replace("const u32 base = (u32)__cvta_generic_to_shared(sm);", "const u32 base = (u32)__cvta_generic_to_shared(sm);\n    const int warp = threadIdx.x >> 5;")
    a = body.index("        float s[2][4], u[2][4];")
    b = body.index("    float t = lA + lB;")
    step = body[a:b].rstrip()
    assert step.endswith("}\n    }"), step[-40:]
    step = step[: step.rindex("}")]  # the loop's closing brace is not part of the step
    epilogue = body[b:]
    thr = min(65535, int(65536 * users / UNION_WARPS))
    return HEADER + f"""
extern "C" __global__ void __launch_bounds__({UNION_WARPS * 32}, 1) {name}(float* sink, int iters, const unsigned char* buf, unsigned long long* used) {{
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(8) unsigned long long full[{UNION_STAGES}];
    __shared__ int cnt[{UNION_STAGES}];
    __shared__ volatile u32 gen[{UNION_STAGES}];  // the block whose copy was last issued into each stage
    const int lane = threadIdx.x & 31;
{prologue}
    // Which of the 12 warps multiply block u: each with probability users / 12 (one at least).
    auto mask_of = [&](u32 u) {{
        const u32 h = (u * 2654435761u) ^ (blockIdx.x * 40503u);
        u32 m = 0;
#pragma unroll
        for (int w = 0; w < {UNION_WARPS}; w++) m |= (((h ^ (w * 0x9E3779B9u)) * 0x85EBCA6Bu) >> 16 < {thr}u ? 1u : 0u) << w;
        return m ? m : 1u << (u % {UNION_WARPS}u);
    }};
{ring_refill(UNION_STAGES)}    if (threadIdx.x < {UNION_STAGES}) {{
        asm volatile("mbarrier.init.shared.b64 [%0], 32;" :: "r"((u32)__cvta_generic_to_shared(&full[threadIdx.x])));
        cnt[threadIdx.x] = 0;
        gen[threadIdx.x] = 0xffffffffu;
    }}
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    const u32 total = (u32)iters;
    if (warp < {UNION_STAGES} && (u32)warp < total) refill((u32)warp);
    unsigned long long mine = 0;
    for (u32 ub = 0; ub < total; ub++) {{
        const u32 m = mask_of(ub);
        if (!((m >> warp) & 1u)) continue;
        const u32 st = ub % {UNION_STAGES}u, parity = (ub / {UNION_STAGES}u) & 1u, fb = (u32)__cvta_generic_to_shared(&full[st]);
        // A warp that skipped blocks may reach block ub while its stage still waits for an
        // earlier block's copy (whose phase has the other parity... or the same, two back):
        // first wait until ub's copy is issued (its stage's earlier users are then all done,
        // so the mbarrier is at ub's phase), then on the phase's parity.
        while (gen[st] != ub) {{ }}
        mbar_wait(fb, parity);
        for (int q = 0; q < 4; q++) {{
            const u32 kt = base + st * 32768u + q * 4096u, vt = kt + 16384u;
{step}
        }}
        mine++;
        // Every lane's reads of the stage are done; the warp that counts the block's last
        // user copies block ub + S into the stage.
        __syncwarp();
        int last = 0;
        if (lane == 0) {{
            last = atomicAdd(&cnt[st], 1) + 1 == __popc(m);
            if (last) cnt[st] = 0;
        }}
        last = __shfl_sync(0xffffffffu, last, 0);
        if (last && ub + {UNION_STAGES}u < total) refill(ub + {UNION_STAGES}u);
    }}
    if (lane == 0) atomicAdd(used, mine);
{epilogue}"""


ITEM_STAGES = 5  # 160 KB of ring, then 4 positions' Q (4 KB each) and accumulators (8.5 KB each)
ITEM_POS = 4


def items_source(name, k):
    """sel_union's ring with each block's work as `k` items taken by any warp (see the
    module notes)."""
    body = sel_source(name, True)
    a = body.index("        float s[2][4], u[2][4];")
    b = body.index("    float t = lA + lB;")
    step = body[a:b].rstrip()
    assert step.endswith("}\n    }"), step[-40:]
    step = step[: step.rindex("}")]
    return HEADER + f"""
extern "C" __global__ void __launch_bounds__({UNION_WARPS * 32}, 1) {name}(float* sink, int iters, const unsigned char* buf, unsigned long long* used) {{
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(8) unsigned long long full[{ITEM_STAGES}];
    __shared__ int cnt[{ITEM_STAGES}];
    __shared__ volatile u32 gen[{ITEM_STAGES}];
    __shared__ int next;
    const int lane = threadIdx.x & 31;
    const u32 base = (u32)__cvta_generic_to_shared(sm);
    const u32 qs = base + {ITEM_STAGES} * 32768u, os = qs + {ITEM_POS} * 4096u;  // Q slots, then (o, m, l) slots
    const int krow = (lane & 7) + (lane >> 4) * 8, kc = (lane >> 3) & 1;
    const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vc = lane >> 4;
    const u32 kx = krow * 256 + (((kc ^ krow) & 7) << 4), vx = vrow * 256 + (((vc ^ vrow) & 7) << 4);
    const float sl2 = 0.1275f;
{ring_refill(ITEM_STAGES)}    // The positions' slots: Q fragments (val()), accumulators 0, (m, l) = (1, 0).
    for (int i = threadIdx.x; i < {ITEM_POS} * 1024; i += blockDim.x) ((u32*)(sm + {ITEM_STAGES} * 32768))[i] = val(i);
    for (int i = threadIdx.x; i < {ITEM_POS} * 2176; i += blockDim.x)
        ((float*)(sm + {ITEM_STAGES} * 32768 + {ITEM_POS} * 4096))[i] = (i % 2176) >= 2048 && (i % 2) == 0 ? 1.f : 0.f;
    if (threadIdx.x < {ITEM_STAGES}) {{
        asm volatile("mbarrier.init.shared.b64 [%0], 32;" :: "r"((u32)__cvta_generic_to_shared(&full[threadIdx.x])));
        cnt[threadIdx.x] = 0;
        gen[threadIdx.x] = 0xffffffffu;
    }}
    if (threadIdx.x == 0) next = 0;
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    const u32 total = (u32)iters, warp = threadIdx.x >> 5;
    if (warp < {ITEM_STAGES}u && warp < total) refill(warp);
    unsigned long long mine = 0;
    for (;;) {{
        int item = 0;
        if (lane == 0) item = atomicAdd(&next, 1);
        item = __shfl_sync(0xffffffffu, item, 0);
        const u32 ub = (u32)item / {k}u;
        if (ub >= total) break;
        const u32 pos = ((u32)item * 2654435761u >> 16) % {ITEM_POS}u;
        const u32 st = ub % {ITEM_STAGES}u, parity = (ub / {ITEM_STAGES}u) & 1u, fb = (u32)__cvta_generic_to_shared(&full[st]);
        while (gen[st] != ub) {{ }}
        mbar_wait(fb, parity);
        // The item's position: Q fragments, accumulators and (m, l) from its slots.
        u32 qa[8][4];
        float o[16][4];
        // A slot's 16-byte pieces lane-interleaved (piece d of lane l at (32 d + l) x 16): each
        // warp access is 512 contiguous bytes, no bank conflict.
        const u32 qp = qs + pos * 4096u + lane * 16u, op = os + pos * 8704u + lane * 16u, mp = os + pos * 8704u + 8192u + lane * 16u;
#pragma unroll
        for (int kk = 0; kk < 8; kk++)
            asm volatile("ld.shared.v4.u32 {{%0, %1, %2, %3}}, [%4];" : "=r"(qa[kk][0]), "=r"(qa[kk][1]), "=r"(qa[kk][2]), "=r"(qa[kk][3]) : "r"(qp + kk * 512u));
#pragma unroll
        for (int d = 0; d < 16; d++)
            asm volatile("ld.shared.v4.f32 {{%0, %1, %2, %3}}, [%4];" : "=f"(o[d][0]), "=f"(o[d][1]), "=f"(o[d][2]), "=f"(o[d][3]) : "r"(op + d * 512u));
        float mA, mB, lA, lB;
        asm volatile("ld.shared.v4.f32 {{%0, %1, %2, %3}}, [%4];" : "=f"(mA), "=f"(mB), "=f"(lA), "=f"(lB) : "r"(mp));
        for (int q = 0; q < 4; q++) {{
            const u32 kt = base + st * 32768u + q * 4096u, vt = kt + 16384u;
{step}
        }}
#pragma unroll
        for (int d = 0; d < 16; d++)
            asm volatile("st.shared.v4.f32 [%0], {{%1, %2, %3, %4}};" :: "r"(op + d * 512u), "f"(o[d][0]), "f"(o[d][1]), "f"(o[d][2]), "f"(o[d][3]) : "memory");
        asm volatile("st.shared.v4.f32 [%0], {{%1, %2, %3, %4}};" :: "r"(mp), "f"(mA), "f"(mB), "f"(lA), "f"(lB) : "memory");
        mine++;
        __syncwarp();
        int last = 0;
        if (lane == 0) {{
            last = atomicAdd(&cnt[st], 1) + 1 == {k};
            if (last) cnt[st] = 0;
        }}
        last = __shfl_sync(0xffffffffu, last, 0);
        if (last && ub + {ITEM_STAGES}u < total) refill(ub + {ITEM_STAGES}u);
    }}
    if (lane == 0) atomicAdd(used, mine);
    if (mine == 0xffffffffull) sink[threadIdx.x] = 0.f;
}}
"""


# (name, source, m16n8k16 per warp per iteration)
KERNELS = [(f"mma_regs_{c}", regs_source(c), c) for c in (2, 4, 8)] + [
    ("sel_mma", sel_source("sel_mma", False), 32),
    ("sel_loop", sel_source("sel_loop", True), 32),
    ("sel_stream", stream_source("sel_stream", True), 32),
    ("copy_stream", stream_source("copy_stream", False), 0),
    ("copy_bulk", bulk_source("copy_bulk"), 0),
    ("copy_mcast", mcast_source("copy_mcast"), 0),
    ("copy_mcast4", mcast_source("copy_mcast4", 4), 0),
    ("wg_loop", wg_source("wg_loop"), 128),
    ("wg_loop_rs", wg_source("wg_loop_rs", rs=True), 128),
] + [(f"sel_union_{round(10 * u)}", union_source(f"sel_union_{round(10 * u)}", u), 128) for u in (1, 1.4, 3.2, 12)] + [
    (f"sel_items_{k}", items_source(f"sel_items_{k}", k), 128) for k in (1, 2, 3, 6, 12)]
STREAMS = ("sel_stream", "copy_stream", "copy_bulk", "copy_mcast", "copy_mcast4")
STAGE_BYTES = {"copy_mcast4": 4 * 32768}  # a block's stages where not four warps' 16 KB
THREADS = 128
SMEM_PER_SM = 228 * 1024


def build(d):
    lib = nvrtc()
    os.makedirs(d, exist_ok=True)
    for name, src, _ in KERNELS:
        size = compile_cubin(lib, src, f"{d}/{name}.cubin")
        print(name, size, "bytes of cubin")
    for a, b, aw in CORUN:
        size = compile_cubin(lib, corun_source(a, b, aw), f"{d}/{corun_name(a, b, aw)}.cubin")
        print(corun_name(a, b, aw), size, "bytes of cubin")


def stream_buffer(drv):
    """The stream kernels' 24 MB of blocks, holding bf16 values as the register probes' val()
    makes them (random-looking mantissas around 2^-7: zeros would draw less power than real data)."""
    buf = drv.alloc(STREAM_BLOCKS * 32768)
    words = array.array("I", (0x3C003C00 | ((i * 2654435761) & 0x007F007F) for i in range(STREAM_BLOCKS * 8192)))
    drv.ck(drv.cu.cuMemcpyHtoD_v2(buf, ctypes.c_void_p(words.buffer_info()[0]), ctypes.c_size_t(len(words) * 4)), "fill")
    return buf


def run(d, start=None):
    drv = Driver()
    sms = drv.attribute(16)  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    sink = drv.alloc(4 * THREADS)
    buf = stream_buffer(drv)
    print(f"{sms} multiprocessors; one wave of 128-thread blocks; TFLOP/s = 4,096 FLOPs per m16n8k16, median of 5 launches;")
    print("GB/s: the stream kernels' bytes copied from L2 into shared memory (8 KB a warp an iteration);")
    print("copy_mcast: the bytes landed in shared memory, each byte read from L2 landing in both blocks of a pair")
    print("| kernel | blocks per SM | warps per SM | us per launch | TFLOP/s | GB/s |")
    print("|---|---|---|---|---|---|")
    used = drv.alloc(8)
    names = [k[0] for k in KERNELS]
    first = names.index(start) if start else 0  # `--from NAME`: that kernel and those after it
    for name, _, per_iter in KERNELS[first:]:
        f, _ = drv.function(f"{d}/{name}.cubin", name)
        if name.startswith(("sel_union", "sel_items")):
            # One 12-warp block a multiprocessor, its ring of stages; FLOPs from the blocks the
            # warps multiplied (counted by the kernel), bytes from the blocks copied.
            smem = UNION_STAGES * 32768 if name.startswith("sel_union") else ITEM_STAGES * 32768 + ITEM_POS * (4096 + 8704)
            threads, iters = UNION_WARPS * 32, ctypes.c_int(4000)
            drv.set_smem(f, smem)
            args = [sink, iters, buf, used]
            drv.launch(f, sms, threads, args, smem)  # warm-up
            drv.sync()
            ms = []
            for _ in range(5):
                drv.ck(drv.cu.cuMemsetD8_v2(used, 0, ctypes.c_size_t(8)), "memset")
                ms.append(drv.timed_ms(lambda: drv.launch(f, sms, threads, args, smem)))
            n = ctypes.c_uint64()
            drv.ck(drv.cu.cuMemcpyDtoH_v2(ctypes.byref(n), used, ctypes.c_size_t(8)), "read count")
            t = statistics.median(ms)
            flops, nbytes = n.value * per_iter * 4096.0, sms * iters.value * 32768.0
            print(f"| {name} ({n.value / (sms * iters.value):.2f} {'users' if 'union' in name else 'items'} a block) | 1 | {UNION_WARPS} | {t * 1000:.0f} | {flops / t / 1e9:.0f} | {nbytes / t / 1e6:.0f} |")
            continue
        # (blocks per SM, SMs used): one block on half the SMs too for the copy kernels.
        for per_sm, used_sms in [(1, sms), (2, sms), (3, sms), (4, sms)] + ([(1, sms // 2)] if name.startswith("copy") else []):
            # Shared memory such that exactly `per_sm` blocks fit (1 KB reserved a block).
            smem = SMEM_PER_SM // per_sm - 1024 - 16
            if name in STREAMS:
                need = STAGE_BYTES.get(name, 4 * 16384)
                if smem < need:
                    continue  # the block's four warps' stages do not fit
                smem = need if per_sm == 3 else min(smem, 225 * 1024)  # room for static barriers
            drv.set_smem(f, smem)
            blocks = used_sms * per_sm
            iters = ctypes.c_int(4000 if name.startswith(("sel", "copy")) else 40000)
            args = [sink, iters] + ([buf] if name in STREAMS else [])
            drv.launch(f, blocks, THREADS, args, smem)  # warm-up
            drv.sync()
            ms = [drv.timed_ms(lambda: drv.launch(f, blocks, THREADS, args, smem)) for _ in range(5)]
            t = statistics.median(ms)
            flops = blocks * (THREADS // 32) * iters.value * per_iter * 4096.0
            nbytes = blocks * (THREADS // 32) * iters.value * 8192.0 if name in STREAMS else 0.0
            where = "" if used_sms == sms else f" ({used_sms} SMs)"
            print(f"| {name}{where} | {per_sm} | {per_sm * THREADS // 32} | {t * 1000:.0f} | {flops / t / 1e9:.0f} | {nbytes / t / 1e6:.0f} |")


def as_device(src, name):
    """A probe kernel's source as a __device__ function `name_body` over the first 128
    threads of a larger block: its block-wide barrier becomes named barrier 1 of those 128
    threads, its block-strided loops stride 128."""
    head = src.index('extern "C"')
    body = src[head:]
    body = body.replace(f'extern "C" __global__ void __launch_bounds__(128) {name}(', f"__device__ __forceinline__ void {name}_body(")
    body = body.replace("__syncthreads();", 'asm volatile("bar.sync 1, 128;");').replace("i += blockDim.x", "i += 128")
    return body


# (A, B, warps of A): B's four warps follow A's.
CORUN = [("mma_regs_8", "sel_stream", 4), ("sel_loop", "sel_stream", 4), ("sel_loop", "copy_stream", 4),
         ("wg_loop", "sel_stream", 4), ("wg_loop", "sel_stream", 8), ("wg_loop_rs", "sel_stream", 4),
         ("wg_loop_rs", "sel_stream", 8), ("wg_loop", "copy_stream", 8), ("wg_loop_rs", "copy_stream", 8)]


def corun_name(a, b, aw):
    return f"corun_{a}_{b}" + ("" if aw == 4 else f"_{aw}")


def corun_source(a, b, aw):
    """One block a multiprocessor: warps [0, aw) run kernel a's loop, the next four kernel b's
    (b's stages are its warps' 16 KB each from aw x 16 KB on; a's warpgroups use at most 48 KB
    each below that)."""
    srcs = dict((n, src) for n, src, _ in KERNELS)
    pre = len(HEADER)
    if a.startswith("wg_loop"):
        pre = srcs[a].index('extern "C"')
    return srcs[a][:pre] + as_device(srcs[a][pre:], a) + as_device(srcs[b][len(HEADER):], b) + f"""
extern "C" __global__ void __launch_bounds__({32 * (aw + 4)}, 1) {corun_name(a, b, aw)}(float* sink, int ia, int ib, const unsigned char* buf) {{
    if (threadIdx.x < {32 * aw}) {{
        if (ia > 0) {a}_body(sink, ia{', buf' if a in STREAMS else ''});
    }} else if (ib > 0) {{
        {b}_body(sink, ib{', buf' if b in STREAMS else ''});
    }}
}}
"""


def corun(d):
    drv = Driver()
    sms = drv.attribute(16)
    sink = drv.alloc(4 * 256)
    buf = stream_buffer(drv)
    print(f"{sms} multiprocessors, one block each: A's warps, then B's four; ms, median of 5;")
    print("A alone / B alone: the same block with the other part's iterations 0; A's TFLOP/s alone and together")
    print("| A (warps) | B | A alone ms | B alone ms | together ms | together / (A + B) | together / max(A, B) | A TFLOP/s alone |")
    print("|---|---|---|---|---|---|---|---|")
    # Iterations for ~3 ms each alone (H100 rates of the plain run).
    iters = {"mma_regs_8": 100000, "sel_loop": 7700, "sel_stream": 5300, "copy_stream": 5300, "wg_loop": 4000, "wg_loop_rs": 4000}
    per_iter = dict((n, m) for n, _, m in KERNELS)  # m16n8k16 (4,096 FLOPs) a warp an iteration
    for a, b, aw in CORUN:
        name = corun_name(a, b, aw)
        f, _ = drv.function(f"{d}/{name}.cubin", name)
        threads, smem = 32 * (aw + 4), (aw + 4) * 16384 + 1024  # b's stages from aw x 16 KB on
        drv.set_smem(f, smem)

        def t(ia, ib):
            args = [sink, ctypes.c_int(ia), ctypes.c_int(ib), buf]
            drv.launch(f, sms, threads, args, smem)  # warm-up
            drv.sync()
            return statistics.median([drv.timed_ms(lambda: drv.launch(f, sms, threads, args, smem)) for _ in range(5)])

        ta, tb, tab = t(iters[a], 0), t(0, iters[b]), t(iters[a], iters[b])
        tf = sms * aw * iters[a] * per_iter[a] * 4096.0 / ta / 1e9
        print(f"| {a} ({aw}) | {b} | {ta:.2f} | {tb:.2f} | {tab:.2f} | {tab / (ta + tb):.2f} | {tab / max(ta, tb):.2f} | {tf:.0f} |")


def self_test():
    """The stream kernels' copies place each 16-byte chunk where the ldmatrix addresses of
    sel_source read it: logical chunk L (dims 8L..8L+7) of key row r of a 16-key sub-tile
    lives at r * 256 + (L >> 3) * 128 + ((L & 7) ^ (r & 7)) * 16 of its K or V half."""
    want = lambda r, L: r * 256 + (L >> 3) * 128 + (((L & 7) ^ (r & 7)) << 4)
    placed = {}
    for lane in range(32):
        for j in range(16):  # stream_source's copy: idx -> (half, row, chunk)
            idx = lane + 32 * j
            half, row, c = idx >> 8, (idx >> 4) & 15, idx & 15
            placed[half * 4096 + row * 256 + ((c ^ (row & 7)) << 4)] = (half, row, c)
    assert sorted(placed) == list(range(0, 8192, 16)), "the copies cover the stage's 512 chunks once"
    for (half, row, c) in placed.values():
        assert placed[half * 4096 + want(row, c)] == (half, row, c)
    for lane in range(32):
        # K: ldmatrix.x4 for m16n8k16's B of two n-tiles: matrices (keys 0-7, 8-15) x (dims lo, hi).
        krow, kc = (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1
        kx = krow * 256 + (((kc ^ krow) & 7) << 4)
        # V (.trans): matrices (keys 0-7, 8-15 of the k dimension) x (dims lo, hi).
        vrow, vc = (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4
        vx = vrow * 256 + (((vc ^ vrow) & 7) << 4)
        for kk in range(8):
            assert (kx + (kk >> 2) * 128) ^ (((2 * kk) & 7) << 4) == want(krow, 2 * kk + kc), (lane, kk)
            assert (vx + (kk >> 2) * 128) ^ (((2 * kk) & 7) << 4) == want(vrow, 2 * kk + vc), (lane, kk)
    print("mma_probe self-test: ok (the copies' placement matches the ldmatrix reads)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    if len(sys.argv) == 4 and sys.argv[1] == "run" and sys.argv[3] == "--corun":
        sys.exit(corun(sys.argv[2]))
    if len(sys.argv) == 5 and sys.argv[1] == "run" and sys.argv[3] == "--from":
        sys.exit(run(sys.argv[2], sys.argv[4]))
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "run"):
        sys.exit(__doc__)
    (build if sys.argv[1] == "build" else run)(sys.argv[2])
