//! The device buffer's layout: pools first (exactly the CPU backend's layout), then the
//! per-step workspace (the uploaded step, the stages' hand-over buffers, the tensor
//! maps). Pure arithmetic, checked for overflow.

use crate::config::Config;
use crate::error::{NsaError, Result};
use super::consts::{MAPS_PER_LAYER, PAIR_COUNTERS, PFB_CHUNK, PFB_ITEM, SPLIT_MIN_KEYS, TMAP_BYTES};
use crate::layout::Layout;

/// The most splits of the compressed branch the workspace holds: one per
/// `SPLIT_MIN_KEYS` keys at the longest context, at most this many (a split is one thread
/// block). Each launch picks its count from the step's rows (`launch.rs`), and the
/// kernels divide the actual lengths (device-side) among them, so grid shapes never
/// depend on lengths.
const CMP_SPLITS_MAX: u32 = 64;
/// Query rows per wave of the attention kernels (bounds the logits workspace).
const WAVE_ROWS_MIN: u32 = 64;
/// Region alignment inside the device buffer.
const ALIGN: usize = 256;

/// One region of the device buffer: byte offset and length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Reg {
    pub off: usize,
    pub bytes: usize,
}

/// Where everything lives in the device buffer, and the fixed launch shapes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DevLayout {
    pub pools: Reg,
    /// Uploaded per step, packed by the step's shape (`step_layout.rs`): header, plan,
    /// token rows, jobs, page tables, copies; sized for the largest step.
    pub step: Reg,
    pub logits: Reg,
    pub sel: Reg,
    /// Selection: the chunk blocks' scores and counters (`select_blocks`).
    pub scores: Reg,
    /// `PAIR_COUNTERS` counters a (row, KV head): the selection's last-block hand-over and
    /// the per-pair hand-overs between launches (kernels/ptx.cuh `flow_counters`).
    pub count: Reg,
    pub tmaps: Reg,
    pub part_ml: Reg,
    pub part_acc: Reg,
    /// Prefill path: the selection of every step row (empty when the config cannot use it).
    pub pf_sel: Reg,
    /// Prefill's block-major selected branch (`prefill::blocks_supported`; empty
    /// otherwise): list counters, cursors and the item count (2 x KV heads x blocks + 1
    /// ints), items (`max_items` x 4 ints), entries, partials (16-bit), their log2 sums.
    pub pf_cnt: Reg,
    pub pf_items: Reg,
    pub pf_ent: Reg,
    pub pf_part: Reg,
    pub pf_lse: Reg,
    /// Prefill path: a byte per (step row, KV head) the repair launch recomputes
    /// (kernels/prefill_repair.cuh), rounded up to whole 4-byte words; zeroed at creation,
    /// every repaired mark cleared again (empty when the config cannot use the path).
    pub pf_fix: Reg,
    /// Rows per chunk of that branch (0: the config cannot use it).
    pub pfb_chunk: u32,
    pub total: usize,
    pub wave_rows: u32,
    pub max_cmp: u32,
    pub nsplit_c: u32,
    pub units_s: u32,
    pub units_w: u32,
}

fn too_big() -> NsaError {
    NsaError::config("capacity", "cuda workspace", "the device buffer it needs overflows the address space; lower the capacity")
}

struct B {
    at: usize,
}

impl B {
    fn take(&mut self, parts: &[usize]) -> Result<Reg> {
        let bytes = parts.iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or_else(too_big)?;
        let off = self.at.div_ceil(ALIGN).checked_mul(ALIGN).ok_or_else(too_big)?;
        self.at = off.checked_add(bytes).ok_or_else(too_big)?;
        Ok(Reg { off, bytes })
    }
}

impl DevLayout {
    pub fn new(cfg: &Config, lay: &Layout) -> Result<DevLayout> {
        let u = |x: u32| x as usize;
        let mut b = B { at: 0 };
        let pools = b.take(&[lay.pool_bytes])?;
        let step = b.take(&[super::step_layout::StepLayout::max(cfg).end])?;
        // Compressed tokens per logits row, rounded up to a multiple of eight: each row starts
        // on a 32-byte sector, so a tile's group sums (four groups of a head, 32 bytes at
        // B = 4) fill one sector instead of straddling two. Rows of an even count only
        // (8 bytes aligned) made three heads in four write partial sectors at the benchmark's
        // lengths; aligned: H100, graph, batch 32-64 0.98-0.99, batch 1-16 unchanged
        // (docs/DECODE_NOTES.md, variant 139).
        let max_cmp = cfg.num_cmp_tokens(cfg.max_seq_len).max(1).next_multiple_of(8);
        let nsplit_c = max_cmp.div_ceil(SPLIT_MIN_KEYS).clamp(1, CMP_SPLITS_MAX);
        let wave_rows = cfg.max_step_tokens.min(cfg.max_step_seqs.max(WAVE_ROWS_MIN));
        let units_s = cfg.sel_count;
        // The window's units at one block a unit, its range started up to WINDOW_ALIGN - 1
        // keys early (tensor maps), the layout without the local unit (variant 142 uses it
        // only where it fits these, `DecodeKnobs::win_local`).
        let units_w = super::launch::window_units(cfg, 1, true, false);
        let units = u(nsplit_c + units_s + units_w);
        let (w, hq, hkv) = (u(wave_rows), u(cfg.num_q_heads), u(cfg.num_kv_heads));
        let logits = b.take(&[w, hq, u(max_cmp), 4])?;
        let sel = b.take(&[w, hkv, u(cfg.sel_count), 4])?;
        let scores = b.take(&[w, hkv, u(cfg.max_sel_blocks()), 4])?;
        let count = b.take(&[w, hkv, PAIR_COUNTERS as usize, 4])?;
        let tmaps = b.take(&[u(cfg.num_layers), MAPS_PER_LAYER, TMAP_BYTES])?;
        let part_ml = b.take(&[w, hq, units, 8])?;
        let part_acc = b.take(&[w, hq, units, u(cfg.head_dim_v), 4])?;
        let pf_rows = if super::prefill::supported(cfg) { u(cfg.max_step_tokens) } else { 0 };
        let pf_sel = b.take(&[pf_rows, hkv, u(cfg.sel_count), 4])?;
        let pfb_chunk = if super::prefill::blocks_supported(cfg) { cfg.max_step_tokens.min(PFB_CHUNK) } else { 0 };
        let (c, n, lists) = (u(pfb_chunk), u(cfg.sel_count), pfb_lists(cfg));
        let on = (pfb_chunk > 0) as usize;
        let pf_cnt = b.take(&[on, 2 * lists + 1, 4])?;
        let pf_items = b.take(&[on, pfb_max_items(lists, c * hkv * n), 16])?;
        let pf_ent = b.take(&[c, hkv, n, 4])?;
        let pf_part = b.take(&[c, hq, n, u(cfg.head_dim_v), 2])?;
        let pf_lse = b.take(&[c, hq, n, 4])?;
        let pf_fix = b.take(&[(pf_rows * hkv).next_multiple_of(4)])?;
        let total = b.at.div_ceil(ALIGN).checked_mul(ALIGN).ok_or_else(too_big)?;
        if total > isize::MAX as usize {
            return Err(too_big());
        }
        Ok(DevLayout {
            pools,
            step,
            logits,
            sel,
            scores,
            count,
            tmaps,
            part_ml,
            part_acc,
            pf_sel,
            pf_cnt,
            pf_items,
            pf_ent,
            pf_part,
            pf_lse,
            pf_fix,
            pfb_chunk,
            total,
            wave_rows,
            max_cmp,
            nsplit_c,
            units_s,
            units_w,
        })
    }
}

/// Lists of the block-major selected branch: one per (KV head, selection block of the
/// longest sequence), the kernels' `num_kv_heads * max_blocks`.
pub(crate) fn pfb_lists(cfg: &Config) -> usize {
    (cfg.num_kv_heads * cfg.max_sel_blocks()) as usize
}

/// Items of a chunk of the block-major selected branch, at most: its `entries` cut into
/// runs of at most `PFB_ITEM` per list (`pfb_scan` in kernels/prefill_blocks.cuh), every
/// list's last run possibly short.
pub(crate) fn pfb_max_items(lists: usize, entries: usize) -> usize {
    lists + entries.div_ceil(PFB_ITEM as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;
    use crate::cuda::consts::WINDOW_ALIGN;

    #[test]
    fn workspace_shapes_fit_the_kernels() {
        for preset in [Preset::Paper, Preset::Fla] {
            // The benchmark's lengths (a context plus its steps) give odd compressed counts.
            for len in [1000u32, 65536, 65571, 131072, 131107] {
                let c = Config::preset(preset).with_shape(64, 4, 192, 128).with_capacity(4, len);
                let lay = Layout::new(&c).unwrap();
                let dl = DevLayout::new(&c, &lay).unwrap();
                // Logits rows start on 32-byte sectors (whole-sector group-sum stores) and hold
                // every compressed token.
                assert_eq!(dl.max_cmp % 8, 0);
                assert_eq!(dl.logits.off % 32, 0);
                assert!(dl.max_cmp >= c.num_cmp_tokens(c.max_seq_len));
                // Selection: a score per block of the longest sequence and a counter per pair.
                let pairs = (dl.wave_rows * c.num_kv_heads) as usize;
                assert_eq!(dl.scores.bytes, pairs * c.max_sel_blocks() as usize * 4);
                assert_eq!(dl.count.bytes, pairs * PAIR_COUNTERS as usize * 4);
                // Window units cover a window that starts up to 15 keys early (16-aligned tiles).
                assert!(dl.units_w * c.sel_block >= c.window + WINDOW_ALIGN - 1);
                assert_eq!(dl.tmaps.bytes, c.num_layers as usize * MAPS_PER_LAYER * TMAP_BYTES);
                // Regions do not overlap and stay in order.
                let regs = [
                    dl.pools, dl.step, dl.logits, dl.sel, dl.scores, dl.count, dl.tmaps, dl.part_ml, dl.part_acc, dl.pf_sel,
                    dl.pf_cnt, dl.pf_items, dl.pf_ent, dl.pf_part, dl.pf_lse, dl.pf_fix,
                ];
                for w in regs.windows(2) {
                    assert!(w[0].off + w[0].bytes <= w[1].off, "{:?} overlaps {:?}", w[0], w[1]);
                }
                assert!(dl.pf_fix.off + dl.pf_fix.bytes <= dl.total);
                // The prefill path's selection holds every row of a step, its repair marks a
                // byte per (row, KV head) in whole words.
                assert_eq!(dl.pf_sel.bytes, (c.max_step_tokens * c.num_kv_heads * c.sel_count) as usize * 4);
                assert_eq!(dl.pf_fix.bytes, ((c.max_step_tokens * c.num_kv_heads) as usize).next_multiple_of(4));
                // G = 16: no block-major selected branch, no room for it.
                assert_eq!(dl.pfb_chunk, 0);
                assert_eq!(dl.pf_cnt.bytes + dl.pf_items.bytes + dl.pf_ent.bytes + dl.pf_part.bytes + dl.pf_lse.bytes, 0);
            }
        }
    }

    /// With G <= 8 the block-major selected branch's regions hold a chunk: a partial of DV
    /// 16-bit values and a log2 sum per (row, query head, slot), an entry per (row, KV
    /// head, slot), every list's runs of at most PFB_ITEM entries.
    #[test]
    fn block_major_regions_hold_a_chunk() {
        for (hkv, len, step) in [(8u32, 65536u32, 65536u32), (32, 8192, 1000), (16, 131072, 4096)] {
            let mut c = Config::preset(Preset::Paper).with_shape(64, hkv, 128, 128).with_capacity(2, len);
            c.max_step_tokens = step;
            let dl = DevLayout::new(&c, &Layout::new(&c).unwrap()).unwrap();
            let rows = step.min(PFB_CHUNK) as usize;
            assert_eq!(dl.pfb_chunk as usize, rows);
            let (hq, n, lists) = (64usize, c.sel_count as usize, (hkv * c.max_sel_blocks()) as usize);
            assert_eq!(dl.pf_cnt.bytes, (2 * lists + 1) * 4);
            assert_eq!(dl.pf_ent.bytes, rows * hkv as usize * n * 4);
            assert_eq!(dl.pf_part.bytes, rows * hq * n * 128 * 2);
            assert_eq!(dl.pf_lse.bytes, rows * hq * n * 4);
            // The most items: every entry of the chunk in one list plus a short run per list.
            let entries = rows * hkv as usize * n;
            assert!(dl.pf_items.bytes >= (entries.div_ceil(PFB_ITEM as usize) + lists) * 16);
            for w in [dl.pf_sel, dl.pf_cnt, dl.pf_items, dl.pf_ent, dl.pf_part, dl.pf_lse].windows(2) {
                assert!(w[0].off + w[0].bytes <= w[1].off);
            }
            assert!(dl.pf_lse.off + dl.pf_lse.bytes <= dl.total);
        }
    }
}
