// Types, storage types and small helpers every kernel file uses.
#ifndef NSA_COMMON_CUH
#define NSA_COMMON_CUH


// Offsets into pools and activations are computed in 64-bit (usize).

typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned long long usize;

// The kernels' one argument, by value; its Rust twin is `Params` in src/cuda/params.rs
// (same groups, fields and order). Groups by what they describe; names as in the config.

// One layer's activations for the step (device addresses; 0 = absent): the C ABI's
// nsa_layer_io_t, as `DeviceLayerIo` in Rust. Shapes in docs/ARCHITECTURE.md.
struct LayerIo {
    u64 q, k, v, gates, out, selected, phi_k, phi_v;
};

// Where the K/V live: this layer's four pools `[page][kv_head][token][dim]`, the page
// tables of the step's sequences (`pages_per_seq` / `cmp_pages_per_seq` ints each), and
// this layer's tensor maps (raw K, raw V, cmp K, cmp V; NSA_TMAP_BYTES each; launch.mode & 2).
struct Paging {
    u64 raw_k, raw_v, cmp_k, cmp_v;
    u64 raw_tab, cmp_tab;
    u64 tmaps;
    int page_size, pages_per_seq, cmp_pages_per_seq;
};

// The config's shapes and NSA parameters (`phi`: 0 mean, 1 weighted, 2 MLP).
struct Shapes {
    int num_q_heads, num_kv_heads, group_size, head_dim_qk, head_dim_v;
    int cmp_block, cmp_stride, sel_block, sel_count, sel_init, sel_local, window;
    int phi, phi_hidden, phi_pe;
    float scale;
    int eq9_a, eq9_b;      // cmp_block / cmp_stride, sel_block / cmp_stride (Eq. 9's strides)
    unsigned eq9_b_magic;  // fdiv's multiplier for eq9_b (src/cuda/params.rs div_magic)
};

// The uploaded step (src/cuda/upload.rs): its header, sequences, copy-on-write copies,
// one (step sequence, position) per token row, one (step sequence, compressed token) per
// compressed token the step completes.
struct StepHeader {
    int seqs, tokens, copies, jobs;
};
struct StepPlan {
    u64 header;  // StepHeader
    u64 seqs;    // PlanSeq[header.seqs]
    u64 copies;  // PageCopy[header.copies]
    u64 rows;    // int2[header.tokens]
    u64 jobs;    // int2[header.jobs]
};

// The stages' hand-over buffers: compressed logits (`max_cmp` per row and head), the
// selected blocks, the selection chunks' block scores (`max_blocks` per row and KV head)
// and counters, split partials.
struct Workspace {
    u64 logits, sel, scores, count, part_ml, part_acc;
    u64 pf_sel;  // prefill: selected blocks per step row [rows][HKV][sel_count] (io.selected absent)
    // Prefill's block-major selected branch (kernels/prefill_blocks.cuh; 0 when unused): list
    // counters, cursors and the item count | items | entries | partials | their log2 sums.
    u64 pf_cnt, pf_items, pf_ent, pf_part, pf_lse;
    u64 pf_fix;  // prefill: a byte per (step row, KV head) to repair (kernels/prefill_repair.cuh)
    int max_cmp, max_blocks;
};

// Per launch: the wave's first row and the host's split choices; `head_chunk` heads per
// scalar attention pass; tile loads of the tensor-core kernels (`mode` bit 0: 1-D bulk
// copies, bit 1: tensor maps) through `nstage` pipeline stages; bit 2: the prefill path's
// selected branch per warp (`pf_sel_warp`); bit 3: the decode tensor-map copies evict
// their K/V lines from L2 first (`l2_evict_first`); bit 5: `cmp_mma` writes Eq. 9 group
// sums instead of logits, and the selection reads them (kernels/attend_mma.cuh); bit 7: the
// combine reads 4 columns per load at every head count (kernels/combine.cuh).
struct Launch {
    int row0, nsplit_c, units_s, units_w, spb, sel_chunks, comb_heads;
    int head_chunk, mode, nstage;
    int pf_win;  // blocks in pf_cmp_ws's moving window of block scores (0: none)
    int pf_c0, pf_rows;  // the block-major selected branch's chunk: first row (of the sequence's new rows), rows
};

struct Params {
    LayerIo io;
    Paging paging;
    Shapes shape;
    StepPlan step;
    Workspace ws;
    Launch launch;
};
// The Rust twins' sizes, passed by the host: a field added on one side only stops the compile.
static_assert(sizeof(Params) == NSA_PARAMS_BYTES, "Params differs from src/cuda/params.rs");
static_assert(sizeof(StepHeader) == NSA_STEP_HEADER_BYTES, "StepHeader differs from src/cuda/params.rs");

// Constants shared with the host, defined once in src/cuda/consts.rs and passed as -D options.
#ifndef NSA_TK
#error "NSA_TK is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_NT_ATT
#error "NSA_NT_ATT is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_NT_WIDE
#error "NSA_NT_WIDE is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_MMA_WARPS
#error "NSA_MMA_WARPS is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_MMA_KEYS
#error "NSA_MMA_KEYS is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_MMA_MAX_STAGES
#error "NSA_MMA_MAX_STAGES is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_TMAP_BYTES
#error "NSA_TMAP_BYTES is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_NT_SEL
#error "NSA_NT_SEL is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_WINDOW_ALIGN
#error "NSA_WINDOW_ALIGN is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_PFB_ITEM
#error "NSA_PFB_ITEM is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_APPEND_ROWS
#error "NSA_APPEND_ROWS is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_PF_SEL_WARPS
#error "NSA_PF_SEL_WARPS is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_PFB_WARPS
#error "NSA_PFB_WARPS is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_PF_KEYS
#error "NSA_PF_KEYS is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_PF_WS_PRODUCER_WG
#error "NSA_PF_WS_PRODUCER_WG is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_PF_WS_STAGES
#error "NSA_PF_WS_STAGES is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_PAIR_COUNTERS
#error "NSA_PAIR_COUNTERS is passed by the host (src/cuda/consts.rs)"
#endif
#ifndef NSA_SPLIT_MIN_KEYS
#error "NSA_SPLIT_MIN_KEYS is passed by the host (src/cuda/consts.rs)"
#endif

#define NEG_INF (-__int_as_float(0x7f800000))
#define POS_INF (__int_as_float(0x7f800000))
#define MAX_DK_REG 16  // DK <= 512 = 32 lanes * 16 registers

// ---------------------------------------------------------------- storage types

struct EF32 {
    typedef float T;
    static const int MMA = 0;
    static __device__ __forceinline__ float ld(const T* p, usize i) { return p[i]; }
    static __device__ __forceinline__ void st(T* p, usize i, float x) { p[i] = x; }
};
struct EBF16 {
    typedef u16 T;
    static const int MMA = 1;  // mma.sync .bf16
    static __device__ __forceinline__ float cvt(u16 v) { return __uint_as_float(((unsigned)v) << 16); }
    static __device__ __forceinline__ float ld(const T* p, usize i) { return cvt(p[i]); }
    static __device__ __forceinline__ void st(T* p, usize i, float x) {
        u16 r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
        p[i] = r;
    }
    // Elements i and i + 1 (i even: a lane's two accumulator columns) as one word, each
    // rounded as `st` rounds it.
    static __device__ __forceinline__ unsigned pk(float x, float y) {
        unsigned r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(y), "f"(x));
        return r;
    }
    static __device__ __forceinline__ void upk(unsigned v, float& x, float& y) {
        x = __uint_as_float(v << 16);
        y = __uint_as_float(v & 0xffff0000u);
    }
    static __device__ __forceinline__ void st2(T* p, usize i, float x, float y) { *(unsigned*)(p + i) = pk(x, y); }
};
struct EF16 {
    typedef u16 T;
    static const int MMA = 2;  // mma.sync .f16
    static __device__ __forceinline__ float cvt(u16 v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
    }
    static __device__ __forceinline__ float ld(const T* p, usize i) { return cvt(p[i]); }
    static __device__ __forceinline__ void st(T* p, usize i, float x) {
        u16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
        p[i] = r;
    }
    static __device__ __forceinline__ unsigned pk(float x, float y) {
        unsigned r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(y), "f"(x));
        return r;
    }
    static __device__ __forceinline__ void upk(unsigned v, float& x, float& y) {
        x = cvt((u16)(v & 0xffffu));
        y = cvt((u16)(v >> 16));
    }
    static __device__ __forceinline__ void st2(T* p, usize i, float x, float y) { *(unsigned*)(p + i) = pk(x, y); }
};

// ---------------------------------------------------------------- small helpers

// The uploaded plan's entries: twins of PlanSeq and PageCopy in src/layout.rs.
struct PlanSeq { int seq, old_len, new_len, row; };
struct PageCopy { int pool, src, dst, rows; };

// n / d for 0 <= n < 2^32 / d by a multiply-high with the host's `div_magic(d)` (`m`,
// 0 for d = 1; src/cuda/params.rs): no division sequence (~20 dependent instructions)
// where d is not a compile-time constant.
__device__ __forceinline__ int fdiv(int n, unsigned m) { return m ? (int)__umulhi((unsigned)n, m) : n; }

// Compressed tokens of a sequence of `len` positions (Config::num_cmp_tokens): token i
// covers positions [i * cmp_stride, i * cmp_stride + cmp_block).

__device__ __forceinline__ int num_cmp(const Params& p, int len) {
    return len < p.shape.cmp_block ? 0 : (len - p.shape.cmp_block) / p.shape.cmp_stride + 1;
}

// Element offset of row `off` of head `kvh` in page `page` (dim `d`).
__device__ __forceinline__ usize row_at(const Params& p, int page, int kvh, int off, int d) {
    return (((usize)page * (usize)p.shape.num_kv_heads + (usize)kvh) * (usize)p.paging.page_size + (usize)off) * (usize)d;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Partial softmax state index of (wave row, query head, unit).
__device__ __forceinline__ usize part_at(const Params& p, int wr, int h, int u) {
    int units = p.launch.nsplit_c + p.launch.units_s + p.launch.units_w;
    return ((usize)wr * (usize)p.shape.num_q_heads + (usize)h) * (usize)units + (usize)u;
}

// Fast exp on the SFU (ex2.approx, flush-to-zero): exp(-inf) = 0. Used where the
// result feeds a softmax or a ranking, whose error budget (1e-2 relative in 16-bit
// outputs, near-tie tolerance in selection) dwarfs its ~2 ulp.
__device__ __forceinline__ float fexp(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
}

// One softmax state (m, l) merged into another (`l` = 0: empty). Both maxima -inf: the sums
// add as they are (a state whose scores were all NaN has m = -inf and l = NaN, and its NaN
// must reach the result); otherwise each sum is scaled to the larger max, so a NaN sum
// still propagates (NaN * 0) and an empty state adds 0.
__device__ __forceinline__ void ml_merge(float& m, float& l, float mo, float lo) {
    const float mn = fmaxf(m, mo);
    l = mn == NEG_INF ? l + lo : l * fexp(m - mn) + lo * fexp(mo - mn);
    m = mn;
}

// 2^x on the SFU (ex2.approx, flush-to-zero; 2^-inf = 0). The kernels keep softmax state
// in the log2 domain (logit * scale * log2(e)) so that each probability is one FFMA and one
// EX2.
__device__ __forceinline__ float ex2f(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// log2(x) on the SFU (lg2.approx, flush-to-zero): for arguments that are 0 or normal, as
// sums of ex2f results are, the same value as __log2f without its denormal fix-up.
__device__ __forceinline__ float lg2f(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Eq. 9 overlap count of offset k: pairs (a, b), a < A, b < B, a + b = k (0 outside
// [0, A + B - 2]).
__device__ __forceinline__ float overlap_count(int k, int A, int B) {
    int lo = k - (B - 1);
    if (lo < 0) lo = 0;
    int hi = min(k, A - 1);
    return hi >= lo ? (float)(hi - lo + 1) : 0.f;
}

// ---------------------------------------------------------------- key-range splits

// Split `split` of `nsplit` over [0, n): chunks of ceil(n / nsplit) rounded up to
// NSA_MMA_KEYS keys, at least NSA_SPLIT_MIN_KEYS (lengths are device-side: a fixed grid divides the actual length; splits past
// the end get empty ranges and store empty partials).
__device__ __forceinline__ void split_range(int n, int nsplit, int split, int& lo, int& hi) {
    int ch = max(((n + nsplit - 1) / nsplit + NSA_MMA_KEYS - 1) & ~(NSA_MMA_KEYS - 1), NSA_SPLIT_MIN_KEYS);
    lo = min(split * ch, n);
    hi = min(lo + ch, n);
}

#endif  // NSA_COMMON_CUH
