//! The kernels' argument struct (twin of `struct Params` in kernels/nsa.cu: same fields,
//! same order) and the device buffer's layout: pools first (exactly the CPU backend's
//! layout), then the per-step workspace. Pure arithmetic, checked for overflow.

use crate::config::Config;
use crate::error::{NsaError, Result};
use super::consts::{MAPS_PER_LAYER, SEL_CHUNK, TMAP_BYTES, WINDOW_ALIGN};
use crate::layout::{Layout, PageCopy, PlanSeq};

/// Keys per split of the compressed branch at the longest context, at least (a split is
/// one thread block). The most splits the workspace holds; each launch picks its count
/// from the step's rows (`CudaBackend::run_layer`), and the kernels divide the actual
/// lengths (device-side) among them, so grid shapes never depend on lengths.
const CMP_SPLIT_MIN: u32 = 64;
const CMP_SPLITS_MAX: u32 = 64;
/// Query rows per wave of the attention kernels (bounds the logits workspace).
const WAVE_ROWS_MIN: u32 = 64;
/// Region alignment inside the device buffer.
const ALIGN: usize = 256;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Params {
    pub raw_k: u64,
    pub raw_v: u64,
    pub cmp_k: u64,
    pub cmp_v: u64,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub gates: u64,
    pub out: u64,
    pub selected: u64,
    pub phi_k: u64,
    pub phi_v: u64,
    pub hdr: u64,
    pub plan: u64,
    pub copies: u64,
    pub tokmap: u64,
    pub jobs: u64,
    pub raw_tab: u64,
    pub cmp_tab: u64,
    pub logits: u64,
    pub sel: u64,
    pub part_ml: u64,
    pub part_acc: u64,
    /// Selection: per (wave row, KV head, chunk) the chunk's best n as (score bits, block).
    pub cand: u64,
    /// Selection: per (wave row, KV head) the count of finished chunk blocks (0 between launches).
    pub count: u64,
    /// This layer's 4 tensor maps (`tensor_map.rs`), when `mode & 2`.
    pub tmaps: u64,
    pub hq: i32,
    pub hkv: i32,
    pub g: i32,
    pub dk: i32,
    pub dv: i32,
    pub page: i32,
    pub pps: i32,
    pub cpps: i32,
    pub cl: i32,
    pub cd: i32,
    pub lsel: i32,
    pub nsel: i32,
    pub n_init: i32,
    pub n_local: i32,
    pub window: i32,
    pub phi: i32,
    pub phi_hidden: i32,
    pub phi_pe: i32,
    pub maxc: i32,
    pub nb: i32,
    pub nsplit_c: i32,
    pub split_c: i32,
    pub units_s: i32,
    pub units_w: i32,
    pub wave_rows: i32,
    pub row0: i32,
    pub hc: i32,
    /// Tile loads of the tensor-core kernels: bit 0 1-D bulk copies (sm_90), bit 1 tensor maps.
    pub mode: i32,
    pub scale: f32,
    /// Selected blocks per unit of the tensor-core selected branch (window units span
    /// `sel_block * spb` keys); 1 on the scalar path.
    pub spb: i32,
    /// Chunks of selection blocks per (row, KV head) of the selection launch.
    pub sel_chunks: i32,
    /// Copy pipeline stages of the tensor-core attention kernels.
    pub nstage: i32,
    /// Query heads per block of the gated combine (a divisor of the group size).
    pub comb_heads: i32,
}

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
    /// Uploaded per step: header (4 ints) + plan + copies (one region, uploaded whole).
    pub meta: Reg,
    pub plan_off: usize,
    pub copies_off: usize,
    pub tokmap: Reg,
    pub jobs: Reg,
    pub raw_tab: Reg,
    pub cmp_tab: Reg,
    pub logits: Reg,
    pub sel: Reg,
    pub cand: Reg,
    pub count: Reg,
    pub tmaps: Reg,
    pub part_ml: Reg,
    pub part_acc: Reg,
    pub total: usize,
    pub wave_rows: u32,
    pub maxc: u32,
    pub nsplit_c: u32,
    pub split_c: u32,
    pub units_s: u32,
    pub units_w: u32,
    /// Most chunks of selection blocks per (row, KV head) (`cand` is sized for them).
    pub sel_chunks: u32,
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
        let seqs = u(cfg.max_step_seqs);
        let hdr = 16usize;
        let plan_off = hdr;
        let copies_off = plan_off + seqs * std::mem::size_of::<PlanSeq>();
        let meta = b.take(&[copies_off + 2 * seqs * std::mem::size_of::<PageCopy>()])?;
        let tokmap = b.take(&[u(cfg.max_step_tokens), 8])?;
        let jobs = b.take(&[u(cfg.max_step_tokens), 8])?;
        let raw_tab = b.take(&[seqs, u(cfg.pages_per_seq()), 4])?;
        let cmp_tab = b.take(&[seqs, u(cfg.cmp_pages_per_seq()).max(1), 4])?;
        // Compressed tokens per logits row, rounded up to even (8-byte logit stores).
        let maxc = cfg.num_cmp_tokens(cfg.max_seq_len).max(1).next_multiple_of(2);
        let nsplit_c = maxc.div_ceil(CMP_SPLIT_MIN).clamp(1, CMP_SPLITS_MAX);
        let split_c = maxc.div_ceil(nsplit_c);
        let wave_rows = cfg.max_step_tokens.min(cfg.max_step_seqs.max(WAVE_ROWS_MIN));
        let units_s = cfg.sel_count;
        // With tensor maps the window's range starts WINDOW_ALIGN-aligned, up to
        // WINDOW_ALIGN - 1 keys early.
        let units_w = (cfg.window + WINDOW_ALIGN - 1).div_ceil(cfg.sel_block);
        let units = u(nsplit_c + units_s + units_w);
        let (w, hq, hkv) = (u(wave_rows), u(cfg.num_q_heads), u(cfg.num_kv_heads));
        let logits = b.take(&[w, hq, u(maxc), 4])?;
        let sel = b.take(&[w, hkv, u(cfg.sel_count), 4])?;
        let sel_chunks = cfg.max_sel_blocks().div_ceil(SEL_CHUNK).max(1);
        let cand = b.take(&[w, hkv, u(sel_chunks), u(cfg.sel_count), 8])?;
        let count = b.take(&[w, hkv, 4])?;
        let tmaps = b.take(&[u(cfg.num_layers), MAPS_PER_LAYER, TMAP_BYTES])?;
        let part_ml = b.take(&[w, hq, units, 8])?;
        let part_acc = b.take(&[w, hq, units, u(cfg.head_dim_v), 4])?;
        let total = b.at.div_ceil(ALIGN).checked_mul(ALIGN).ok_or_else(too_big)?;
        if total > isize::MAX as usize {
            return Err(too_big());
        }
        Ok(DevLayout {
            pools,
            meta,
            plan_off,
            copies_off,
            tokmap,
            jobs,
            raw_tab,
            cmp_tab,
            logits,
            sel,
            cand,
            count,
            tmaps,
            part_ml,
            part_acc,
            total,
            wave_rows,
            maxc,
            nsplit_c,
            split_c,
            units_s,
            units_w,
            sel_chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    #[test]
    fn workspace_shapes_fit_the_kernels() {
        for preset in [Preset::Paper, Preset::Fla] {
            for len in [1000u32, 65536, 131072] {
                let c = Config::preset(preset).with_shape(64, 4, 192, 128).with_capacity(4, len);
                let lay = Layout::new(&c).unwrap();
                let dl = DevLayout::new(&c, &lay).unwrap();
                // Logits rows are even (8-byte stores) and hold every compressed token.
                assert_eq!(dl.maxc % 2, 0);
                assert!(dl.maxc >= c.num_cmp_tokens(c.max_seq_len));
                // Selection chunks of SEL_CHUNK blocks cover every block, each with a list of n.
                assert!(dl.sel_chunks * SEL_CHUNK >= c.max_sel_blocks());
                let pairs = (dl.wave_rows * c.num_kv_heads) as usize;
                assert_eq!(dl.cand.bytes, pairs * (dl.sel_chunks * c.sel_count) as usize * 8);
                assert_eq!(dl.count.bytes, pairs * 4);
                // Window units cover a window that starts up to 15 keys early (16-aligned tiles).
                assert!(dl.units_w * c.sel_block >= c.window + WINDOW_ALIGN - 1);
                assert_eq!(dl.tmaps.bytes, c.num_layers as usize * MAPS_PER_LAYER * TMAP_BYTES);
                // Regions do not overlap and stay in order.
                let regs = [dl.pools, dl.meta, dl.tokmap, dl.jobs, dl.raw_tab, dl.cmp_tab, dl.logits, dl.sel, dl.cand, dl.count, dl.tmaps, dl.part_ml, dl.part_acc];
                for w in regs.windows(2) {
                    assert!(w[0].off + w[0].bytes <= w[1].off, "{:?} overlaps {:?}", w[0], w[1]);
                }
                assert!(dl.part_acc.off + dl.part_acc.bytes <= dl.total);
            }
        }
    }
}
