// NSA kernels for the CUDA backend (NSA_SPEC.md is the function computed).
//
// Framework-free CUDA C on raw pointers: no headers, no runtime API. Compiled once per
// device with NVRTC by src/cuda/compile.rs; every kernel takes one `Params` struct by
// value (its Rust twin is `src/cuda/params.rs`; keep the two in the same field order).
//
// Pool layout (same as the CPU backend): per layer `[pool][page][kv_head][token][dim]`;
// the host passes this layer's four pool base pointers. Storage types: f32, f16, bf16
// (16-bit types as raw `unsigned short`); every accumulation is f32.
//
// A layer run is a fixed sequence of launches on the caller's stream:
//   append       new K/V rows into their pages, the step's copy-on-write copies and its
//                finished compressed tokens, every phi, in one launch: none depends on
//                another (grid: (2*tokens + 2*seqs) x HKV x 2, roles by block index)
//   then, per wave of up to `wave_rows` query rows:
//   cmp_partial  compressed attention split across blocks, raw logits kept (rows x HKV x nsplit_c)
//   select       combine split max/sum, Eq. 9 block scores summed over the group, top-n
//                per chunk of blocks (rows x HKV x sel_chunks), merged by the last chunk
//   sw_partial   selected blocks and window chunks, one block per unit (rows x HKV x units)
//   combine      merge every partial, gated sum, store (rows x HQ)
// (an append-only run stops after append). cmp_mma / sw_mma replace cmp_partial /
// sw_partial on tensor cores (bf16/f16, DK and DV multiples of 16); a unit of sw_mma holds
// `spb` selected blocks or sel_block * spb window keys. nsplit_c, units_s, units_w and spb are
// per launch (the host picks them from the row count). The full-attention baseline is
// full_partial | full_mma (rows x HKV x nsplit) then full_combine (rows x HQ).
// Lengths and positions are read from the uploaded plan (device side); grid shapes depend
// only on the step's token and sequence counts, so a decode step is graph-capturable.
// All heads of a GQA group share each K/V load (a block owns one KV head).

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

// ---------------------------------------------------------------- entry points

#define NSA_ENTRY(name, E, suffix) \
    extern "C" __global__ void __launch_bounds__(NSA_NT_WIDE) nsa_##name##_##suffix(const Params p) { name<E>(p); }

#define NSA_ALL(E, suffix)              \
    NSA_ENTRY(append, E, suffix)        \
    NSA_ENTRY(cmp_partial, E, suffix)   \
    NSA_ENTRY(select_blocks, E, suffix) \
    NSA_ENTRY(sw_partial, E, suffix)    \
    NSA_ENTRY(combine, E, suffix)       \
    NSA_ENTRY(full_partial, E, suffix)  \
    NSA_ENTRY(full_combine, E, suffix)

NSA_ALL(EF32, f32)
NSA_ALL(EF16, f16)
NSA_ALL(EBF16, bf16)

// Tensor-core attention: nsa_{cmp,sw,full}_mma_{bf16,f16}_{16,32} (DV <= 128 or <= 256).
#define NSA_MMA_ENTRY(name, E, suffix, NVT)                                                        \
    extern "C" __global__ void __launch_bounds__(NSA_MMA_WARPS * 32) nsa_##name##_##suffix##_##NVT(const Params p) { \
        name<E, NVT>(p);                                                                           \
    }
#define NSA_MMA_ALL(E, suffix)             \
    NSA_MMA_ENTRY(cmp_mma, E, suffix, 16)  \
    NSA_MMA_ENTRY(sw_mma, E, suffix, 16)   \
    NSA_MMA_ENTRY(full_mma, E, suffix, 16) \
    NSA_MMA_ENTRY(cmp_mma, E, suffix, 32)  \
    NSA_MMA_ENTRY(sw_mma, E, suffix, 32)   \
    NSA_MMA_ENTRY(full_mma, E, suffix, 32)

NSA_MMA_ALL(EF16, f16)
NSA_MMA_ALL(EBF16, bf16)
