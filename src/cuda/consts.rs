//! The constants both languages need, defined once: the host sizes shared memory, grids
//! and the workspace with them, and [`nvrtc_defines`] hands them to the kernels as `-D`
//! options at compile time (`kernels/common.cuh` stops the compile if one is missing).
//! Kernel-only tuning (`MAX_DK_REG`) stays in the kernels.

/// Keys per tile of the scalar attention kernels (one per lane in the softmax step).
pub(crate) const TK: u32 = 32;
/// Threads of the scalar attention kernels (4 warps).
pub(crate) const NT_ATT: u32 = 128;
/// Threads of the combine and append launches (their `__launch_bounds__`).
pub(crate) const NT_WIDE: u32 = 256;
/// New K/V rows a block of the append launch copies (a half-warp per row; its blocks
/// once copied one row each, and at a 64k-token prefill their ~1M launches took 1.5 ms for
/// 134 MB: docs/PREFILL_NOTES.md, variant 32).
pub(crate) const APPEND_ROWS: u32 = 16;
/// Steps of at least this many new tokens take the append launch by rows
/// (the `append_by_rows` entry); smaller ones keep a block per row (`append`): with the rows form
/// in the same entry, decode batches 1 and 16 took 1.6-4 us longer a step in graph replay
/// (H200, variant 32).
pub(crate) const APPEND_MIN_TOKENS: u32 = 1024;
/// Warps per block of the tensor-core attention kernels.
pub(crate) const MMA_WARPS: u32 = 4;
/// Keys per warp tile of the tensor-core kernels: the rows of an m16n8k16 tile and of a
/// tensor-map box.
pub(crate) const MMA_KEYS: u32 = 16;
/// The most copy pipeline stages of the tensor-core kernels (their shared memory holds
/// `MMA_WARPS * MMA_MAX_STAGES` mbarriers, `MBAR_BYTES`).
pub(crate) const MMA_MAX_STAGES: u32 = 4;
/// Bytes of the tensor-core kernels' mbarrier area.
pub(crate) const MBAR_BYTES: u32 = 8 * MMA_WARPS * MMA_MAX_STAGES;
/// Bytes of one encoded tensor map.
pub(crate) const TMAP_BYTES: usize = 128;
/// Tensor maps per layer: raw K, raw V, compressed K, compressed V.
pub(crate) const MAPS_PER_LAYER: usize = 4;
/// Threads of the selection launch: a thread per compressed token, then per selection
/// block, of a run of this many blocks.
pub(crate) const NT_SEL: u32 = 1024;
/// Selection blocks per chunk block of the selection launch, at least (batch 1 spreads a
/// (row, KV head) over `max_sel_blocks / SEL_CHUNK_MIN` blocks at most).
pub(crate) const SEL_CHUNK_MIN: u32 = 128;
/// With tensor maps the window's range starts at a multiple of this many keys (whole
/// boxes), up to `WINDOW_ALIGN - 1` keys before its first position (those are masked).
pub(crate) const WINDOW_ALIGN: u32 = MMA_KEYS;
/// Workspace counters per (row, KV head) pair of a wave: the selection's last-block
/// hand-over and the per-pair hand-overs between launches (kernels/ptx.cuh `flow_counters`).
pub(crate) const PAIR_COUNTERS: u32 = 8;
/// Keys per split of the compressed and full branches, at least.
pub(crate) const SPLIT_MIN_KEYS: u32 = 64;
/// Keys per tile of the prefill kernels: one contiguous run of one page (page_size and
/// sel_block must be multiples of it for the prefill path).
pub(crate) const PF_KEYS: u32 = 64;
/// Consumer warps of the warp-specialised `pf_cmp` (two or three warpgroups; its block
/// adds one producer warp), in the host's order of preference (its forms, with and
/// without a moving window: `prefill::WS_FORMS`, `PF_WS_ALL` in kernels/nsa.cu).
pub(crate) const PF_WS_WARPS: [u32; 2] = [12, 8];
/// Consumer warps of the warp-specialised `pf_cmp` beside which its producer is a whole
/// warpgroup that hands its registers to them (`setmaxnreg`); beside fewer, one warp
/// (`prefill::ws_producer_warps`, `PF_WS_PRODUCERS` in kernels/nsa.cu).
pub(crate) const PF_WS_PRODUCER_WG: u32 = 12;
/// The most copy stages of the warp-specialised `pf_cmp` (it holds this many pairs of
/// mbarriers; the stages it uses are what its dynamic shared memory holds).
pub(crate) const PF_WS_STAGES: u32 = 4;
/// Entries (a (position, slot) that chose the block) per item of the block-major selected
/// branch of the prefill, at most: one item is a block of `PFB_WARPS` warps holding one
/// selection block's K/V while they stream these positions' queries through it.
pub(crate) const PFB_ITEM: u32 = 64;
/// Warps per block of `pfb_attn` (16 query rows each).
pub(crate) const PFB_WARPS: u32 = 4;
/// Warps per block of `pf_sel`, the prefill's selected branch alone at G = 16 (a warp per
/// position; `PrefillPlan::sel_split`).
pub(crate) const PF_SEL_WARPS: u32 = 4;
/// Rows of a prefill the block-major selected branch takes per chunk, at most: its
/// partials (rows x query heads x selected blocks x (DV 16-bit values + an f32)) are
/// workspace, 2.2 GB at 64 query heads, 16 blocks, DV = 128. Longer chunks make longer
/// lists, each block's K/V loaded once per chunk (H200, G = 4 at 64k: 74.1 ms with 2048
/// rows, 72.3 with 4096, 71.3 with 8192; docs/PREFILL_NOTES.md, variant 20b).
pub(crate) const PFB_CHUNK: u32 = 8192;

// What the kernels assume of these, checked at compile time: masks of power-of-two
// alignments, the tensor-core block within the launch bound, a warp per 32 threads.
const _: () = {
    assert!(WINDOW_ALIGN.is_power_of_two() && MMA_KEYS.is_power_of_two());
    assert!(MMA_WARPS * 32 <= NT_WIDE && NT_ATT % 32 == 0 && NT_SEL % 32 == 0 && NT_SEL <= 1024);
    // The append launch copies its rows in one round: a half-warp each.
    assert!(APPEND_ROWS * 16 <= NT_WIDE);
};

/// Every constant above the kernels read, with its name there.
const DEFINES: &[(&str, u64)] = &[
    ("NSA_TK", TK as u64),
    ("NSA_NT_ATT", NT_ATT as u64),
    ("NSA_NT_WIDE", NT_WIDE as u64),
    ("NSA_APPEND_ROWS", APPEND_ROWS as u64),
    ("NSA_MMA_WARPS", MMA_WARPS as u64),
    ("NSA_MMA_KEYS", MMA_KEYS as u64),
    ("NSA_MMA_MAX_STAGES", MMA_MAX_STAGES as u64),
    ("NSA_TMAP_BYTES", TMAP_BYTES as u64),
    ("NSA_NT_SEL", NT_SEL as u64),
    ("NSA_WINDOW_ALIGN", WINDOW_ALIGN as u64),
    ("NSA_SPLIT_MIN_KEYS", SPLIT_MIN_KEYS as u64),
    ("NSA_PAIR_COUNTERS", PAIR_COUNTERS as u64),
    ("NSA_PF_KEYS", PF_KEYS as u64),
    ("NSA_PF_WS_STAGES", PF_WS_STAGES as u64),
    ("NSA_PF_WS_PRODUCER_WG", PF_WS_PRODUCER_WG as u64),
    ("NSA_PFB_ITEM", PFB_ITEM as u64),
    ("NSA_PFB_WARPS", PFB_WARPS as u64),
    ("NSA_PF_SEL_WARPS", PF_SEL_WARPS as u64),
];

/// The `-D` options that define the constants in the kernels, and the sizes of the
/// structs both sides share (the kernels `static_assert` their own against them).
pub(crate) fn nvrtc_defines() -> Vec<String> {
    let sizes = [
        ("NSA_PARAMS_BYTES", std::mem::size_of::<super::params::Params>() as u64),
        ("NSA_STEP_HEADER_BYTES", std::mem::size_of::<super::params::StepHeader>() as u64),
    ];
    DEFINES.iter().chain(sizes.iter()).map(|(n, v)| format!("-D{n}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_define_is_checked_by_the_kernels() {
        let common = super::super::compile::source("common.cuh");
        for (name, _) in DEFINES {
            assert!(common.contains(&format!("#ifndef {name}\n")), "kernels/common.cuh does not check {name}");
        }
    }
}
