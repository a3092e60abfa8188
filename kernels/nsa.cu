// NSA kernels for the CUDA backend: the entry points. The function computed is defined in
// docs/SPEC.md; docs/ARCHITECTURE.md follows a decode step from the C ABI to every launch.
//
// Framework-free CUDA C on raw pointers: no CUDA headers, no runtime API. NVRTC compiles
// this file once per device architecture (src/cuda/compile.rs), with every .cuh below
// passed as a header under its own name, and the constants shared with the host
// (src/cuda/consts.rs) as -D options. Every kernel takes one `Params` by value
// (kernels/common.cuh; its Rust twin is src/cuda/params.rs, size-checked at compile time).
//
// Files, one per stage:
//   common.cuh      types (Params and its groups, StepHeader, PlanSeq, PageCopy), storage
//                   types EF32 / EBF16 / EF16, small helpers (row_at, part_at, warp_sum,
//                   warp_max, fexp, split_range)
//   ptx.cuh         PTX helpers: mma16816, ldsm4 / ldsm4t, pack2, cp_async16 / cp_commit /
//                   cp_wait, mbar_*, bulk_g2s, tma_load3, smem_u32
//   append.cuh      the step's writes: copy-on-write copies, appends, compressed tokens
//   attend.cuh      scalar attention core; attend_mma.cuh: tensor-core attention core
//   compressed.cuh  compressed attention (cmp_partial, cmp_mma)
//   selection.cuh   block scores and the top-n (select_blocks)
//   selected.cuh    selected blocks + window (sw_partial, sw_mma)
//   combine.cuh     gated combine of the partials
//   full.cuh        full causal attention, the in-repo baseline
//   wgmma.cuh       warpgroup MMA (sm_90a): matrix descriptors, swizzled tiles
//   prefill.cuh     the prefill path: pf_cmp (compressed branch + selection) and pf_sw
//                   (selected + window + gated combine) over tiles of positions x heads;
//                   prefill_parts.cuh: its tiles, copies, MMA policies, softmax, top-n;
//                   prefill_nonfinite.cuh: its scans for NaN / infinite V in shared tiles;
//                   prefill_repair.cuh: the exact repair of the rows they mark
//   prefill_blocks.cuh  the prefill's selected branch block-major, for small groups
//                   (pfb_count / pfb_scan / pfb_fill: the selection inverted into lists per
//                   (KV head, block); pfb_attn: partials; pfb_merge: into the output)
//
// Pool layout (same as the CPU backend): per layer `[pool][page][kv_head][token][dim]`;
// the host passes this layer's four pool base pointers (Params.paging). Storage types:
// f32, f16, bf16 (16-bit types as raw `unsigned short`); every accumulation is f32.
//
// A layer run is a fixed sequence of launches on the caller's stream (src/cuda/launch.rs):
//   append        new K/V rows into their pages, the step's copy-on-write copies and its
//                 finished compressed tokens, every phi, in one launch: none depends on
//                 another (grid: (2*tokens + 2*seqs) x HKV x 2, roles by block index)
//   then, per wave of query rows (the workspace holds one wave's hand-over buffers):
//   cmp_partial   compressed attention split across blocks, raw logits kept (rows x HKV x nsplit_c)
//   select_blocks combine split max/sum, Eq. 9 block scores summed over the group, top-n
//                 by sorting networks or a radix select (rows x HKV, NSA_NT_SEL threads: a thread per block)
//   sw_partial    selected blocks and window chunks, one block per unit (rows x HKV x units)
//   combine       merge every partial, gated sum, store (rows x HQ / comb_heads)
// (an append-only run stops after append). cmp_mma / sw_mma replace cmp_partial /
// sw_partial on tensor cores (bf16/f16, DK and DV multiples of 16); a unit of sw_mma holds
// `spb` selected blocks or sel_block * spb window keys. Params.launch (nsplit_c, units_s,
// units_w, spb, ...) is per launch (the host picks it from the row count). The
// full-attention baseline is full_partial | full_mma (rows x HKV x nsplit) then
// full_combine (rows x HQ). Lengths and positions are read from the uploaded step (device
// side); grid shapes depend only on the step's token and sequence counts, so a decode
// step is graph-capturable. All heads of a GQA group share each K/V load (a block owns one
// KV head). Offsets into pools and activations are computed in 64-bit (usize).

#include "common.cuh"
#include "ptx.cuh"
#include "append.cuh"
#include "attend.cuh"
#include "attend_mma.cuh"
#include "compressed.cuh"
#include "selection.cuh"
#include "selected.cuh"
#include "combine.cuh"
#include "full.cuh"
#include "wgmma.cuh"
#include "prefill_parts.cuh"
#include "prefill_nonfinite.cuh"
#include "prefill.cuh"
#include "prefill_blocks.cuh"
#include "prefill_repair.cuh"

// ---------------------------------------------------------------- entry points

// Every entry lets the next launch start early (pdl_trigger) and waits for its predecessors
// (pdl_wait) before its body; the tensor-core attention kernels wait inside `attend_mma`,
// after their prologue (queries, barriers), and the selection and the combines after
// reading the step's rows or the gates, so that part overlaps the previous kernel's tail.
// Those last entries trigger at entry or, with `MODE_LATE_TRIGGER` (kernels/ptx.cuh), once
// their wait has returned.
#define NSA_ENTRY_NT(name, E, suffix, NT)                                                \
    extern "C" __global__ void __launch_bounds__(NT) nsa_##name##_##suffix(const Params p) { \
        NSA_TIMELINE_SCOPE(name);                                                        \
        pdl_trigger();                                                                   \
        pdl_wait();                                                                      \
        name<E>(p);                                                                      \
    }
#define NSA_ENTRY(name, E, suffix) NSA_ENTRY_NT(name, E, suffix, NSA_NT_WIDE)
// Kernels that wait inside their body, after reading what no predecessor writes (the
// step's rows, the gates).
#define NSA_ENTRY_OWN_WAIT_NT(name, E, suffix, NT)                                       \
    extern "C" __global__ void __launch_bounds__(NT) nsa_##name##_##suffix(const Params p) { \
        NSA_TIMELINE_SCOPE(name);                                                        \
        pdl_trigger_at_entry(p);                                                         \
        name<E>(p);                                                                      \
    }
#define NSA_ENTRY_OWN_WAIT(name, E, suffix) NSA_ENTRY_OWN_WAIT_NT(name, E, suffix, NSA_NT_WIDE)

#define NSA_ALL(E, suffix)              \
    NSA_ENTRY(append, E, suffix)        \
    NSA_ENTRY(append_by_rows, E, suffix) \
    NSA_ENTRY(cmp_partial, E, suffix)   \
    NSA_ENTRY_OWN_WAIT_NT(select_blocks, E, suffix, NSA_NT_SEL) \
    NSA_ENTRY_OWN_WAIT_NT(select_lists, E, suffix, NSA_NT_SEL) \
    NSA_ENTRY(sw_partial, E, suffix)    \
    NSA_ENTRY_OWN_WAIT(combine, E, suffix) \
    NSA_ENTRY_OWN_WAIT(combine_scalar, E, suffix) \
    NSA_ENTRY(full_partial, E, suffix)  \
    NSA_ENTRY_OWN_WAIT(full_combine, E, suffix)

NSA_ALL(EF32, f32)
NSA_ALL(EF16, f16)
NSA_ALL(EBF16, bf16)

// Tensor-core attention: nsa_{cmp,sw,full}_mma_{bf16,f16}_{16,32} for any head dims (DV <= 128
// or <= 256), and nsa_{cmp,sw,full}_mma_{bf16,f16}_{DK}_{DV} compiled for one shape (the
// prefill shapes; src/cuda/kernel.rs picks these when the config has one).
// ext: the entry name's ending; then the body's template arguments after the shape: the copy
// path CP (kernels/attend_mma.cuh) and, for the compressed branch, GSM (kernels/compressed.cuh).
#define NSA_MMA_ENTRY_CP(name, E, suffix, NVT, DK, DV, tag, ext, ...)                                                         \
    extern "C" __global__ void __launch_bounds__(NSA_MMA_WARPS * 32) nsa_##name##_##suffix##_##tag##ext(const Params p) { \
        NSA_TIMELINE_SCOPE(name);                                                                                         \
        pdl_trigger_at_entry(p);                                                                                          \
        name<E, NVT, DK, DV, __VA_ARGS__>(p);                                                                             \
    }
#define NSA_MMA_ENTRY(name, E, suffix, NVT, DK, DV, tag) NSA_MMA_ENTRY_CP(name, E, suffix, NVT, DK, DV, tag, , MMA_COPY_MODE)
// The same with the tensor-map copy path fixed at compile time: nsa_{cmp,sw,full}_mma_{bf16,f16}_{DK}_{DV}_tma,
// picked by the host on sm_90 with tensor maps (MMA_COPY_TMA).
#define NSA_MMA_ENTRY_TMA(name, E, suffix, NVT, DK, DV, tag) NSA_MMA_ENTRY_CP(name, E, suffix, NVT, DK, DV, tag, _tma, MMA_COPY_TMA)
// The compressed branch's entry for the same shapes and pages: the boxes' layout filled by
// cp.async (MMA_COPY_LDGSTS), nsa_cmp_mma_{bf16,f16}_{DK}_{DV}_lds: its long stream of
// contiguous tiles reads DRAM faster that way than through the copy engine (docs/DECODE_NOTES.md
// variant 112).
#define NSA_MMA_ENTRY_LDS(name, E, suffix, NVT, DK, DV, tag) NSA_MMA_ENTRY_CP(name, E, suffix, NVT, DK, DV, tag, _lds, MMA_COPY_LDGSTS)
// The same with the group sums by a tensor-core product (variant 119): nsa_cmp_mma_{bf16,f16}_{DK}_{DV}_ldsg,
// which the host launches for waves whose pairs hand over to the selection one by one (16 pairs and
// up): a separate entry, so that the small waves' code stays as it was (the new path cost batch 1 ~1%
// by its presence alone, docs/DECODE_NOTES.md variant 119b).
#define NSA_MMA_ENTRY_LDSG(name, E, suffix, NVT, DK, DV, tag) NSA_MMA_ENTRY_CP(name, E, suffix, NVT, DK, DV, tag, _ldsg, MMA_COPY_LDGSTS, true)
#define NSA_MMA_KINDS(E, suffix, NVT, DK, DV, tag)  \
    NSA_MMA_ENTRY(cmp_mma, E, suffix, NVT, DK, DV, tag) \
    NSA_MMA_ENTRY(sw_mma, E, suffix, NVT, DK, DV, tag)  \
    NSA_MMA_ENTRY(full_mma, E, suffix, NVT, DK, DV, tag)
#define NSA_MMA_KINDS_FIXED(E, suffix, DK, DV, tag)          \
    NSA_MMA_KINDS(E, suffix, 16, DK, DV, tag)                \
    NSA_MMA_ENTRY_LDS(cmp_mma, E, suffix, 16, DK, DV, tag)   \
    NSA_MMA_ENTRY_LDSG(cmp_mma, E, suffix, 16, DK, DV, tag)  \
    NSA_MMA_ENTRY_TMA(sw_mma, E, suffix, 16, DK, DV, tag)    \
    NSA_MMA_ENTRY_TMA(full_mma, E, suffix, 16, DK, DV, tag)
#define NSA_MMA_ALL(E, suffix)                      \
    NSA_MMA_KINDS(E, suffix, 16, 0, 0, 16)           \
    NSA_MMA_KINDS(E, suffix, 32, 0, 0, 32)           \
    NSA_MMA_KINDS_FIXED(E, suffix, 64, 64, 64_64)    \
    NSA_MMA_KINDS_FIXED(E, suffix, 128, 128, 128_128) \
    NSA_MMA_KINDS_FIXED(E, suffix, 192, 128, 192_128)

NSA_MMA_ALL(EF16, f16)
NSA_MMA_ALL(EBF16, bf16)

// Prefill path (src/cuda/prefill.rs picks it for steps with prefill chunks):
// nsa_pf_{cmp,sw,sww}_{mma,wg,wgt}_{bf16,f16}_{DK}_{DV} (`sww`: pf_sw with the window only,
// after the block-major selected branch). `mma` (MmaSync, any sm_80+), `wg`
// (Wgmma, sm_90a: elsewhere its body compiles to nothing and the host never picks it) or
// `wgt` (WgmmaTma: Wgmma whose tiles the copy engine loads);
// two copy stages of 64-key tiles (three measured no faster, docs/PREFILL_NOTES.md).
#define PF_ENTRY(E, suffix, DK, DV, M, mname)                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 1) nsa_pf_cmp_##mname##_##suffix##_##DK##_##DV(const Params p) { \
        NSA_TIMELINE_SCOPE(pf_cmp);                                                                                    \
        pdl_trigger();                                                                                         \
        pdl_wait();                                                                                            \
        pf_cmp<E, DK, DV, 2, M<E, DK, DV>>(p);                                                                 \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 1) nsa_pf_sw_##mname##_##suffix##_##DK##_##DV(const Params p) {  \
        NSA_TIMELINE_SCOPE(pf_sw);                                                                                     \
        pdl_trigger();                                                                                         \
        pdl_wait();                                                                                            \
        pf_sw<E, DK, DV, 2, M<E, DK, DV>, false>(p);                                                           \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 1) nsa_pf_sww_##mname##_##suffix##_##DK##_##DV(const Params p) { \
        NSA_TIMELINE_SCOPE(pf_sww);                                                                                    \
        pdl_trigger();                                                                                         \
        pdl_wait();                                                                                            \
        pf_sw<E, DK, DV, 2, M<E, DK, DV>, true>(p);                                                            \
    }
#define PF_SHAPES(E, suffix, M, mname)      \
    PF_ENTRY(E, suffix, 64, 64, M, mname)   \
    PF_ENTRY(E, suffix, 128, 128, M, mname) \
    PF_ENTRY(E, suffix, 192, 128, M, mname)

PF_SHAPES(EBF16, bf16, MmaSync, mma)
PF_SHAPES(EBF16, bf16, Wgmma, wg)
PF_SHAPES(EF16, f16, MmaSync, mma)
PF_SHAPES(EF16, f16, Wgmma, wg)
// `wgt`: Wgmma with tile copies by tensor maps, for one-warpgroup blocks (G = 16, DK <= 128).
PF_ENTRY(EBF16, bf16, 64, 64, WgmmaTma, wgt)
PF_ENTRY(EBF16, bf16, 128, 128, WgmmaTma, wgt)
PF_ENTRY(EF16, f16, 64, 64, WgmmaTma, wgt)
PF_ENTRY(EF16, f16, 128, 128, WgmmaTma, wgt)
// `pf_sel`: the selected branch alone at G = 16, a warp per position, after `pf_cmp_ws` did
// the window (`PrefillPlan::sel_split`): nsa_pf_sel_{bf16,f16}_{DK}_{DV}, blocks of
// NSA_PF_SEL_WARPS warps, as many per multiprocessor as their copy stages allow (MINB: the
// register budget).
#define PF_SEL_ENTRY(E, suffix, DK, DV, MINB)                                                                        \
    extern "C" __global__ void __launch_bounds__(NSA_PF_SEL_WARPS * 32, MINB) nsa_pf_sel_##suffix##_##DK##_##DV(const Params p) { \
        NSA_TIMELINE_SCOPE(pf_sel);                                                                                               \
        pdl_trigger();                                                                                               \
        pdl_wait();                                                                                                  \
        pf_sel_alone<E, DK, DV>(p);                                                                                  \
    }
PF_SEL_ENTRY(EBF16, bf16, 64, 64, 4)
PF_SEL_ENTRY(EBF16, bf16, 128, 128, 3)
PF_SEL_ENTRY(EBF16, bf16, 192, 128, 2)
PF_SEL_ENTRY(EF16, f16, 64, 64, 4)
PF_SEL_ENTRY(EF16, f16, 128, 128, 3)
PF_SEL_ENTRY(EF16, f16, 192, 128, 2)
// `wgs8`, `wgs12`: pf_cmp warp-specialised (a producer warp and 8 or 12 consumer warps
// over an mbarrier ring of tensor-map copies; `pf_cmp_ws`), every prefill shape; `wgs12w`,
// `wgs8w` with a moving window of block scores (WIN, for sequences whose blocks' scores do
// not fit). Each its own entry: the launch bound sets the register budget. Producer
// warps (`PF_WS_PRODUCERS`, the host's `ws_producer_warps`): a whole warpgroup beside 12
// consumer warps, which gives its registers to them (`setmaxnreg`: 160 a consumer thread
// where the 16-warp block starts at 128); one warp beside 8 (168 registers a thread).
#define PF_WS_PRODUCERS(W) ((W) == NSA_PF_WS_PRODUCER_WG ? 4 : 1)
#define PF_WS_ENTRY(E, suffix, DK, DV, W, WIN, TAG)                                                            \
    extern "C" __global__ void __launch_bounds__((W + PF_WS_PRODUCERS(W)) * 32, 1) nsa_pf_cmp_wgs##TAG##_##suffix##_##DK##_##DV(const Params p) { \
        NSA_TIMELINE_SCOPE(pf_cmp);                                                                                                               \
        pdl_trigger();                                                                                           \
        pdl_wait();                                                                                              \
        pf_cmp_ws<E, DK, DV, WIN, PF_WS_PRODUCERS(W)>(p);                                                        \
    }
#define PF_WS_ALL(W, WIN, TAG)                     \
    PF_WS_ENTRY(EBF16, bf16, 64, 64, W, WIN, TAG)   \
    PF_WS_ENTRY(EBF16, bf16, 128, 128, W, WIN, TAG) \
    PF_WS_ENTRY(EBF16, bf16, 192, 128, W, WIN, TAG) \
    PF_WS_ENTRY(EF16, f16, 64, 64, W, WIN, TAG)     \
    PF_WS_ENTRY(EF16, f16, 128, 128, W, WIN, TAG)   \
    PF_WS_ENTRY(EF16, f16, 192, 128, W, WIN, TAG)
PF_WS_ALL(8, false, 8)
PF_WS_ALL(8, true, 8w)
PF_WS_ALL(12, false, 12)
PF_WS_ALL(12, true, 12w)

// Block-major selected branch of the prefill (prefill_blocks.cuh): nsa_pfb_{count,scan,fill,
// merge}_{bf16,f16} and nsa_pfb_attn_{bf16,f16}_{DK}_{DV} for the prefill shapes.
#define PFB_ALL(E, suffix)                       \
    NSA_ENTRY(pfb_count, E, suffix)              \
    NSA_ENTRY_NT(pfb_scan, E, suffix, NSA_NT_SEL) \
    NSA_ENTRY(pfb_fill, E, suffix)               \
    NSA_ENTRY(pfb_merge, E, suffix)
PFB_ALL(EBF16, bf16)
PFB_ALL(EF16, f16)
// The prefill's exact repair of the rows its non-finite scans marked (prefill_repair.cuh):
// nsa_pf_repair_{bf16,f16}, any shape.
NSA_ENTRY_NT(pf_repair, EBF16, bf16, NSA_NT_ATT)
NSA_ENTRY_NT(pf_repair, EF16, f16, NSA_NT_ATT)
#define PFB_ATTN(E, suffix, DK, DV)                                                                           \
    extern "C" __global__ void __launch_bounds__(NSA_PFB_WARPS * 32) nsa_pfb_attn_##suffix##_##DK##_##DV(const Params p) { \
        NSA_TIMELINE_SCOPE(pfb_attn);                                                                                      \
        pdl_trigger();                                                                                       \
        pdl_wait();                                                                                          \
        pfb_attn<E, DK, DV>(p);                                                                              \
    }
PFB_ATTN(EBF16, bf16, 64, 64)
PFB_ATTN(EBF16, bf16, 128, 128)
PFB_ATTN(EBF16, bf16, 192, 128)
PFB_ATTN(EF16, f16, 64, 64)
PFB_ATTN(EF16, f16, 128, 128)
PFB_ATTN(EF16, f16, 192, 128)
