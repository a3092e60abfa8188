//! The kernels' one argument, `Params`, passed by value to every launch: the twin of
//! `struct Params` in `kernels/common.cuh` (same groups, fields and order; the tests pin
//! the size). Grouped by what the fields describe: the layer's activations (`DeviceLayerIo`,
//! the same struct the Rust API takes), paging, the config's shapes, the uploaded step,
//! the workspace, and the launch. Everything but the layer's pools, its tensor maps, its
//! activations and the launch fields is fixed when the backend is created
//! ([`Params::fixed`]); [`Params::for_layer`] fills in the per-layer part.

use super::consts::{MAPS_PER_LAYER, TMAP_BYTES};
use super::step_layout::StepLayout;
use super::workspace::DevLayout;
use super::DeviceLayerIo;
use crate::config::Config;
use crate::layout::Layout;

/// Where the K/V live (`Paging` in the kernels).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Paging {
    /// This layer's pools `[page][kv_head][token][dim]`.
    pub raw_k: u64,
    pub raw_v: u64,
    pub cmp_k: u64,
    pub cmp_v: u64,
    /// Page tables of the step's sequences, in plan order.
    pub raw_tab: u64,
    pub cmp_tab: u64,
    /// This layer's tensor maps (raw K, raw V, cmp K, cmp V), used when `launch.mode & 2`.
    pub tmaps: u64,
    pub page_size: i32,
    pub pages_per_seq: i32,
    pub cmp_pages_per_seq: i32,
}

/// The config's shapes and NSA parameters, named as in [`Config`] (`Shapes`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Shapes {
    pub num_q_heads: i32,
    pub num_kv_heads: i32,
    pub group_size: i32,
    pub head_dim_qk: i32,
    pub head_dim_v: i32,
    pub cmp_block: i32,
    pub cmp_stride: i32,
    pub sel_block: i32,
    pub sel_count: i32,
    pub sel_init: i32,
    pub sel_local: i32,
    pub window: i32,
    /// `Phi as i32`: 0 mean, 1 weighted, 2 MLP.
    pub phi: i32,
    pub phi_hidden: i32,
    pub phi_pe: i32,
    pub scale: f32,
    /// Eq. 9's strides in compressed tokens per compressed block (`cmp_block /
    /// cmp_stride`) and per selection block (`sel_block / cmp_stride`), and the latter's
    /// [`div_magic`]: the prefill kernels divide by it without a division sequence.
    pub eq9_a: i32,
    pub eq9_b: i32,
    pub eq9_b_magic: u32,
}

/// The multiplier that divides by `d` without a division instruction: for
/// `0 <= n < 2^32 / d`, `n / d == umulhi(n, div_magic(d))` (`fdiv` in kernels/common.cuh),
/// and 0 for `d <= 1` (`fdiv` returns n). Exact because `ceil(2^32 / d) = (2^32 + r) / d`
/// with `r < d`, so the product's error `n r / (d 2^32)` stays below `1 / d` when
/// `n < 2^32 / d`.
pub(crate) fn div_magic(d: u32) -> u32 {
    if d <= 1 {
        0
    } else {
        (1u64 << 32).div_ceil(d as u64) as u32
    }
}

/// The uploaded step's header, the first bytes of the step region (`StepHeader`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StepHeader {
    pub seqs: i32,
    pub tokens: i32,
    pub copies: i32,
    /// Compressed tokens the step completes (one compress job each).
    pub jobs: i32,
}

/// Device addresses of the uploaded step (`StepPlan`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepPlan {
    /// `StepHeader`.
    pub header: u64,
    /// `PlanSeq[header.seqs]`.
    pub seqs: u64,
    /// `PageCopy[header.copies]`.
    pub copies: u64,
    /// Per token row `(step sequence, position)`, `[i32; 2]`.
    pub rows: u64,
    /// Per compress job `(step sequence, compressed token)`, `[i32; 2]`.
    pub jobs: u64,
}

/// The stages' hand-over buffers (`Workspace`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Workspace {
    /// Compressed branch's raw logits, `max_cmp` per (wave row, query head).
    pub logits: u64,
    /// Selected blocks per (wave row, KV head), `sel_count` each.
    pub sel: u64,
    /// Selection: block scores (f32 bits) per (wave row, KV head), `max_blocks` each, from
    /// the chunk blocks to the last one.
    pub scores: u64,
    /// Selection: per (wave row, KV head) the count of finished chunk blocks (0 between launches).
    pub count: u64,
    /// Split partials: (m, l) and the accumulators per (wave row, query head, unit).
    pub part_ml: u64,
    pub part_acc: u64,
    /// Prefill path: selected blocks per step row and KV head, `sel_count` each, where the
    /// caller passes no `selected` (0 when the config cannot use the path).
    pub pf_sel: u64,
    /// Prefill's block-major selected branch (kernels/prefill_blocks.cuh; 0 when the
    /// config cannot use it): list counters, fill cursors and the item count; items;
    /// entries; partials; their log2 sums.
    pub pf_cnt: u64,
    pub pf_items: u64,
    pub pf_ent: u64,
    pub pf_part: u64,
    pub pf_lse: u64,
    /// Prefill path: a byte per (step row, KV head) whose outputs the repair launch
    /// recomputes (kernels/prefill_repair.cuh; 0 when the config cannot use the path).
    pub pf_fix: u64,
    pub max_cmp: i32,
    /// Selection blocks of the longest sequence (`Config::max_sel_blocks`).
    pub max_blocks: i32,
}

/// Per launch (`Launch`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Launch {
    /// First query row of the wave.
    pub row0: i32,
    /// Compressed (or full-attention) splits of this launch.
    pub nsplit_c: i32,
    /// Units of the selected branch and of the window.
    pub units_s: i32,
    pub units_w: i32,
    /// Selected blocks per unit of the tensor-core selected branch (window units span
    /// `sel_block * spb` keys); 1 on the scalar path.
    pub spb: i32,
    /// Chunk blocks per (row, KV head) of the selection launch.
    pub sel_chunks: i32,
    /// Query heads per block of the gated combine (a divisor of the group size).
    pub comb_heads: i32,
    /// Heads per pass of the scalar attention kernels (shared memory bound).
    pub head_chunk: i32,
    /// Tile loads of the tensor-core kernels: bit 0 1-D bulk copies (sm_90), bit 1 tensor maps.
    pub mode: i32,
    /// Copy pipeline stages of the tensor-core kernels.
    pub nstage: i32,
    /// Blocks in the moving window of block scores of the warp-specialised `pf_cmp`
    /// (`PrefillPlan::sc_win`; 0 when its plan has no window).
    pub pf_win: i32,
    /// The block-major selected branch's chunk: its first row (counted from the prefill
    /// sequence's first new row) and its rows.
    pub pf_c0: i32,
    pub pf_rows: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Params {
    pub io: DeviceLayerIo,
    pub paging: Paging,
    pub shape: Shapes,
    pub step: StepPlan,
    pub ws: Workspace,
    pub launch: Launch,
}

/// `Launch::mode` bit: the decode tensor-map copies take an evict-first L2 policy
/// (`DecodeKnobs::l2_hint_logits` decides per wave).
pub(crate) const MODE_L2_EVICT_FIRST: i32 = 8;

/// `Launch::mode` bit: the prefill's sliding window runs in the warp-specialised `pf_cmp`
/// after its two passes (`pf_cmp_window` in kernels/prefill.cuh), which adds it to `out`;
/// `pf_sw` then does the selected branch alone (`PrefillPlan::cmp_window`).
pub(crate) const MODE_PF_CMP_WINDOW: i32 = 16;

/// `Launch::mode` bit: `pf_sel` copies each 64-key block that two or more positions of its
/// tile chose once, a 16-key sub-tile per warp, for those positions (`PrefillPlan::sel_share`).
pub(crate) const MODE_PF_SEL_SHARE: i32 = 64;

/// `Launch::mode` bits 15-16: with `MODE_PF_SEL_SHARE`, the fewest positions of a `pf_sel`
/// tile that must have chosen a block for it to be shared, less 2 (0: two, 1: three, 2: all
/// of the tile's positions; `PrefillPlan::sel_share_min`).
pub(crate) const MODE_PF_SEL_SHARE_MIN_SHIFT: i32 = 15;

/// `Launch::mode` bit: with `MODE_PF_SEL_SHARE` on sm_90a, `pf_sel` multiplies each block
/// that all of its tile's positions chose with warpgroup products (64 rows: the four
/// positions' heads) instead of per warp (`PrefillPlan::sel_wg`).
pub(crate) const MODE_PF_SEL_WG: i32 = 1 << 17;

/// `Launch::mode` bit: `cmp_mma` writes per-head Eq. 9 group sums instead of logits, and
/// the selection reads them (`DecodeKnobs::group_sums`).
pub(crate) const MODE_GROUP_SUMS: i32 = 32;

/// `Launch::mode` bit: each selection chunk block writes its own best `sel_count` blocks and
/// `sw_mma`'s selected units merge the chunks' lists (no counter, no last block; unit 0
/// writes `LayerIo::selected`) (`DecodeKnobs::sel_lists`).
pub(crate) const MODE_SEL_LISTS: i32 = 512;

/// `Launch::mode` bit: the kernel lets the stream's next launch start once its own wait on
/// the previous one has returned, instead of at entry (`DecodeKnobs::late_trigger` picks
/// the kernels; `MODE_LATE_TRIGGER` in kernels/ptx.cuh).
pub(crate) const MODE_LATE_TRIGGER: i32 = 1024;

/// `Launch::mode` bit of the append launch (`DecodeKnobs::append_prefetch`): its blocks of
/// new rows prefetch the rows' queries and compressed page-table rows into L2 for the
/// compressed launch (kernels/append.cuh `prefetch_row_inputs`).
pub(crate) const MODE_APPEND_PREFETCH: i32 = 4096;

/// `Launch::mode` bit of a wave's compressed and selection launches
/// (`DecodeKnobs::sel_flow_pairs`): each compressed split block counts itself done per
/// (row, KV head), and the selection blocks of that pair start once its count is complete
/// rather than when the whole compressed launch has ended (`flow_wait` in kernels/ptx.cuh).
pub(crate) const MODE_SEL_FLOW: i32 = 8192;

/// `Launch::mode` bit of a wave's selection and selected-branch launches
/// (`DecodeKnobs::sw_flow_pairs`): each selection chunk block counts itself done per pair,
/// and that pair's selected units start once the count is complete (the window's units at
/// once) rather than when the whole selection launch has ended.
pub(crate) const MODE_SW_FLOW: i32 = 16384;

/// `Launch::mode` bit of a wave's launches (`DecodeKnobs::win_local`, variant 142; `NSA_CUDA_WIN_LOCAL=0` off):
/// the window's first unit covers the forced local blocks' keys and its partial is the
/// selected branch's for them too; the selected units skip those blocks and the combine counts
/// the unit in both branches (`MODE_WIN_LOCAL` in kernels/ptx.cuh).
pub(crate) const MODE_WIN_LOCAL: i32 = 1 << 21;

/// What the backend decided at creation that the kernels need to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaunchSetup {
    pub head_chunk: u32,
    pub bulk: bool,
    pub tma: bool,
    pub nstage: u32,
    /// The prefill path's selected branch per warp (`PrefillPlan::sel_warp`).
    pub pf_sel_warp: bool,
    /// `PrefillPlan::sc_win`.
    pub pf_win: u32,
    /// The prefill's window inside `pf_cmp_ws` (`PrefillPlan::cmp_window`,
    /// [`MODE_PF_CMP_WINDOW`]).
    pub pf_cmp_window: bool,
    /// `pf_sel` loads the blocks two or more of a tile's positions chose once
    /// ([`MODE_PF_SEL_SHARE`]).
    pub pf_sel_share: bool,
    /// `PrefillPlan::sel_share_min`, 2 to 4 ([`MODE_PF_SEL_SHARE_MIN_SHIFT`]).
    pub pf_sel_share_min: u32,
    /// `PrefillPlan::sel_wg` ([`MODE_PF_SEL_WG`]).
    pub pf_sel_wg: bool,
}

impl Params {
    /// Every field that stays the same for the backend's life: shapes, the
    /// workspace addresses in the buffer at `base`, paging sizes, the launch setup.
    pub fn fixed(cfg: &Config, dl: &DevLayout, base: u64, setup: LaunchSetup) -> Params {
        let at = |off: usize| base + off as u64;
        // The block-major prefill's regions: 0 where the config cannot use it.
        let pfb = |r: super::workspace::Reg| if dl.pfb_chunk > 0 { at(r.off) } else { 0 };
        let eq9 = cfg.eq9_strides();
        Params {
            io: DeviceLayerIo::default(),
            paging: Paging {
                page_size: cfg.page_size as i32,
                pages_per_seq: cfg.pages_per_seq() as i32,
                cmp_pages_per_seq: cfg.cmp_pages_per_seq() as i32,
                ..Default::default()
            },
            shape: Shapes {
                num_q_heads: cfg.num_q_heads as i32,
                num_kv_heads: cfg.num_kv_heads as i32,
                group_size: cfg.group_size() as i32,
                head_dim_qk: cfg.head_dim_qk as i32,
                head_dim_v: cfg.head_dim_v as i32,
                cmp_block: cfg.cmp_block as i32,
                cmp_stride: cfg.cmp_stride as i32,
                sel_block: cfg.sel_block as i32,
                sel_count: cfg.sel_count as i32,
                sel_init: cfg.sel_init as i32,
                sel_local: cfg.sel_local as i32,
                window: cfg.window as i32,
                phi: cfg.phi as i32,
                phi_hidden: cfg.phi_hidden as i32,
                phi_pe: cfg.phi_pe as i32,
                scale: cfg.softmax_scale(),
                eq9_a: eq9.0 as i32,
                eq9_b: eq9.1 as i32,
                eq9_b_magic: div_magic(eq9.1),
            },
            step: StepPlan::default(),
            ws: Workspace {
                logits: at(dl.logits.off),
                sel: at(dl.sel.off),
                scores: at(dl.scores.off),
                count: at(dl.count.off),
                part_ml: at(dl.part_ml.off),
                part_acc: at(dl.part_acc.off),
                pf_sel: if dl.pf_sel.bytes > 0 { at(dl.pf_sel.off) } else { 0 },
                pf_cnt: pfb(dl.pf_cnt),
                pf_items: pfb(dl.pf_items),
                pf_ent: pfb(dl.pf_ent),
                pf_part: pfb(dl.pf_part),
                pf_lse: pfb(dl.pf_lse),
                pf_fix: if dl.pf_fix.bytes > 0 { at(dl.pf_fix.off) } else { 0 },
                max_cmp: dl.max_cmp as i32,
                max_blocks: cfg.max_sel_blocks() as i32,
            },
            launch: Launch {
                row0: 0,
                nsplit_c: dl.nsplit_c as i32,
                units_s: dl.units_s as i32,
                units_w: dl.units_w as i32,
                spb: 1,
                sel_chunks: 1,
                comb_heads: 1,
                head_chunk: setup.head_chunk as i32,
                mode: setup.bulk as i32
                    | (setup.tma as i32) << 1
                    | (setup.pf_sel_warp as i32) << 2
                    | if setup.pf_cmp_window { MODE_PF_CMP_WINDOW } else { 0 }
                    | if setup.pf_sel_share { MODE_PF_SEL_SHARE } else { 0 }
                    | (setup.pf_sel_share_min as i32 - 2) << MODE_PF_SEL_SHARE_MIN_SHIFT
                    | if setup.pf_sel_wg { MODE_PF_SEL_WG } else { 0 },
                nstage: setup.nstage as i32,
                pf_win: setup.pf_win as i32,
                pf_c0: 0,
                pf_rows: 0,
            },
        }
    }

    /// These fixed fields with the uploaded step's addresses (`sl`: its packing in the step
    /// region), layer `layer`'s pools and tensor maps and its activations `io`.
    #[allow(clippy::too_many_arguments)]
    pub fn for_layer(&self, cfg: &Config, lay: &Layout, dl: &DevLayout, base: u64, sl: &StepLayout, layer: u32, io: &DeviceLayerIo) -> Params {
        let es = cfg.dtype.size() as u64;
        let lb = base + dl.pools.off as u64 + layer as u64 * lay.layer_elems as u64 * es;
        let mut p = *self;
        p.io = *io;
        p.paging.raw_k = lb + lay.raw_k as u64 * es;
        p.paging.raw_v = lb + lay.raw_v as u64 * es;
        p.paging.cmp_k = lb + lay.cmp_k as u64 * es;
        p.paging.cmp_v = lb + lay.cmp_v as u64 * es;
        p.paging.tmaps = base + (dl.tmaps.off + layer as usize * MAPS_PER_LAYER * TMAP_BYTES) as u64;
        let st = |off: usize| base + (dl.step.off + off) as u64;
        p.step = StepPlan { header: st(0), seqs: st(sl.seqs), copies: st(sl.copies), rows: st(sl.rows), jobs: st(sl.jobs) };
        p.paging.raw_tab = st(sl.raw_tab);
        p.paging.cmp_tab = st(sl.cmp_tab);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, size_of};

    #[test]
    fn params_match_the_kernel_struct() {
        // The kernels' groups: 8 pointers; 7 pointers + 3 ints (+ 4 padding); 15 ints + a
        // float + 3 ints (+ 4 padding); 5 pointers; 13 pointers + 2 ints; 13 ints (+ 4
        // padding at the end).
        assert_eq!(size_of::<DeviceLayerIo>(), 64);
        assert_eq!(size_of::<Paging>(), 7 * 8 + 3 * 4 + 4);
        assert_eq!(size_of::<Shapes>(), 19 * 4);
        assert_eq!(size_of::<StepPlan>(), 5 * 8);
        assert_eq!(size_of::<Workspace>(), 13 * 8 + 2 * 4);
        assert_eq!(size_of::<Launch>(), 13 * 4);
        assert_eq!(size_of::<StepHeader>(), 16);
        assert_eq!(size_of::<Params>(), 64 + 72 + 76 + 4 + 40 + 112 + 52 + 4);
        assert_eq!(align_of::<Params>(), 8);
    }

    /// `div_magic` against the division for every divisor up to 256 (Eq. 9's B is
    /// small) over the range it is used for (compressed tokens of sequences far longer
    /// than any config allows) and at the limit of its contract.
    #[test]
    fn div_magic_divides_exactly() {
        let fdiv = |n: u32, m: u32| if m == 0 { n } else { ((n as u64 * m as u64) >> 32) as u32 };
        for d in 1..=256u32 {
            let m = div_magic(d);
            for n in (0..1u32 << 20).chain([(1u32 << 31) / d - 1, u32::MAX / d - 1]) {
                assert_eq!(fdiv(n, m), n / d, "n = {n}, d = {d}");
            }
        }
    }
}
