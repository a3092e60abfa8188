//! The prefill path: which configs and steps go through the tensor-core prefill kernels
//! (`kernels/prefill.cuh`: `pf_cmp`, then `pf_sw`), their block shape and shared memory,
//! and how many tiles a step has. The launches are in `launch.rs`; the design and the
//! measurements behind the choices here are in docs/PREFILL_NOTES.md.
//!
//! A tile is up to `warps * 16 / G` consecutive positions of one sequence of the step (the
//! block's rows are positions x the group's heads). Sequences are cut into tiles in plan
//! order; the kernels find their tile in the uploaded plan, so the host only counts them.

use super::consts::{PF_KEYS, PF_SEL_WARPS, PF_WS_PRODUCER_WG, PF_WS_STAGES, PF_WS_WARPS};
use super::kernel::Kernel;
use crate::config::{Config, Dtype};
use crate::layout::PlanSeq;

/// (DK, DV) pairs the prefill kernels are compiled for (`PF_SHAPES` in kernels/nsa.cu).
pub(crate) const SHAPES: [(u32, u32); 3] = [(64, 64), (128, 128), (192, 128)];

/// A step goes through the prefill kernels when one of its sequences appends at least this
/// many tokens (its rows then share K/V tiles); the other sequences of such a step ride
/// along as tiles of their own. Steps of single tokens keep the decode kernels, which split
/// each row's keys over many blocks.
pub(crate) const MIN_TOKENS: u32 = 64;

/// Shared memory the kernels may use to align their swizzled tiles to 1024 bytes.
const ALIGN_SLACK: usize = 1024;

/// Static shared memory of `pf_cmp_ws` (its mbarriers: 80 bytes by ptxas), with room: the
/// dynamic shared memory a launch may ask for is the opt-in limit less this (a window
/// sized to the last byte of the limit failed `cuFuncSetAttribute` on the H200).
const WS_STATIC_SMEM: usize = 256;

/// Positions a block's score arrays and selection bit masks hold at most (`u32` masks).
const MAX_POSITIONS: u32 = 32;

/// How the prefill kernels multiply: `mma.sync` (any sm_80+) or warpgroup MMA (sm_90a),
/// the latter with K/V tiles copied by tensor maps (`WgmmaTma`) for 4-warp blocks, or, for
/// `pf_cmp` only, warp-specialised (`WgmmaWs(w, win)`: a producer warp copies by tensor
/// maps into an mbarrier ring for `w` consumer warps, with a moving window of block scores
/// when `win`; one of `WS_FORMS`; `pf_cmp_ws`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    MmaSync,
    Wgmma,
    WgmmaTma,
    WgmmaWs(u32, bool),
}

/// The forms of the warp-specialised `pf_cmp` (consumer warps, moving window), in the
/// host's order of preference: an entry point is compiled for each (`PF_WS_ALL` in
/// kernels/nsa.cu). Twelve warps where three stages fit: with every block's score, else
/// with the moving window; else eight where two stages fit, likewise (measured on the
/// H200, docs/PREFILL_NOTES.md: variant 14c, at G = 16 and 64k twelve warps with three
/// stages beat eight with four by 10%; variant 16, twelve warps with the window beat eight
/// without it by 4% at G = 8 and at 192/128, and where every block's score fits the
/// window's rankings in the loop cost 6%).
pub(crate) const WS_FORMS: [(u32, bool); 4] =
    [(PF_WS_WARPS[0], false), (PF_WS_WARPS[0], true), (PF_WS_WARPS[1], false), (PF_WS_WARPS[1], true)];

impl Policy {
    /// Its name in the kernels' entry points.
    pub fn name(self) -> String {
        match self {
            Policy::MmaSync => "mma".into(),
            Policy::Wgmma => "wg".into(),
            Policy::WgmmaTma => "wgt".into(),
            Policy::WgmmaWs(w, win) => format!("wgs{w}{}", if win { "w" } else { "" }),
        }
    }

    /// The (DK, DV) pairs it is compiled for (`PF_SHAPES`, the `wgt` and `wgs` entries in
    /// kernels/nsa.cu).
    pub fn shapes(self) -> &'static [(u32, u32)] {
        match self {
            Policy::WgmmaTma => &SHAPES[..2],
            _ => &SHAPES,
        }
    }
}

/// The prefill kernels' shape for one backend: each kernel's policy, warps per block,
/// shared memory. Each kernel cuts the step into tiles of its own block's positions (they
/// hand over through per-row buffers, not per tile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PrefillPlan {
    /// `pf_cmp`'s policy.
    pub policy: Policy,
    /// `pf_sw`'s policy: `policy` unless a knob asks for mma.sync there (see [`plan`]).
    pub policy_sw: Policy,
    /// `pf_sw`'s selected branch per warp (`launch.mode & 4`, `pf_sel_warp`): each warp
    /// multiplies only the blocks its positions chose; else the block multiplies the union.
    pub sel_warp: bool,
    /// `pf_sw`'s warps per block, and `pf_cmp`'s unless it is warp-specialised.
    pub warps: u32,
    pub smem_cmp: u32,
    pub smem_sw: u32,
    /// Blocks in `pf_cmp`'s moving window of block scores (`Launch::pf_win`), 0 without one.
    pub sc_win: u32,
    /// The sliding window inside the warp-specialised `pf_cmp`, after its passes
    /// (`MODE_PF_CMP_WINDOW`): its K/V tiles then serve the producer-fed block's rows, and
    /// `pf_sw` (or the block-major branch) does the selected branch alone, with no
    /// window-only launch. Only with `sel_warp` (the union form folds its selected part
    /// when the window begins).
    pub cmp_window: bool,
    /// With `cmp_window` at G = 16: the selected branch in `pf_sel` (a warp per position,
    /// Q in registers, its two 16-key stages and nothing else in shared memory: three
    /// 4-warp blocks per multiprocessor at 128/128 where `pf_sw` runs two) instead of
    /// `pf_sw`; `NSA_CUDA_PF_SEL=0` keeps `pf_sw` (docs/PREFILL_NOTES.md, variants 23, 33).
    pub sel_split: bool,
    /// `pf_sel`'s shared memory ([`sel_shared_mem`]).
    pub smem_sel: u32,
    /// With `sel_split`: the blocks two or more positions of a `pf_sel` tile chose (at least
    /// the forced ones) copied once for those positions, not once each
    /// (`MODE_PF_SEL_SHARE`; knob `NSA_CUDA_PF_SEL_SHARE=0`; docs/PREFILL_NOTES.md, 33c).
    pub sel_share: bool,
    /// With `sel_share`: how many of a tile's positions must have chosen a block for it to be
    /// shared (2 or 3; 4: all of them): 3 at DK > 128, where `pf_sel` runs two blocks per
    /// multiprocessor and a shared block's block barriers idle the warps whose positions
    /// did not choose it (H200, paper 192/128: 8k 2.90 -> 2.74 ms, 16k 6.25 -> 6.10, 64k
    /// unchanged; at 128/128 3 was 2-3% slower at 16k and 64k; docs/PREFILL_NOTES.md,
    /// variant 82). Knob `NSA_CUDA_PF_SEL_SHARE_MIN=2|3|4` (`MODE_PF_SEL_SHARE_MIN_SHIFT`).
    pub sel_share_min: u32,
    /// With `sel_share` on sm_90a (the wgmma policies): the blocks all of a tile's positions
    /// chose (at least the forced ones) are multiplied by `pf_sel`'s four warps as one
    /// warpgroup, Q in registers, K and V read once from shared memory per product instead
    /// of once per warp (`MODE_PF_SEL_WG`; knob `NSA_CUDA_PF_SEL_WG=0`; docs/PREFILL_NOTES.md,
    /// variant 87).
    pub sel_wg: bool,
}

/// Producer warps of `pf_cmp_ws` beside `w` consumer warps (the kernels'
/// `PF_WS_PRODUCERS`): at `PF_WS_PRODUCER_WG` a whole warpgroup, whose registers
/// `setmaxnreg` hands to the consumers (only its first warp copies); else one warp.
fn ws_producer_warps(w: u32) -> u32 {
    if w == PF_WS_PRODUCER_WG {
        4
    } else {
        1
    }
}

impl PrefillPlan {
    /// The policy `kernel` (PfCmp, PfSw or PfSwWindow) runs with.
    pub fn policy_of(&self, kernel: super::kernel::Kernel) -> Policy {
        if matches!(kernel, Kernel::PfSw | Kernel::PfSwWindow) {
            self.policy_sw
        } else {
            self.policy
        }
    }

    /// Warps of `kernel`'s blocks that hold rows (`pf_cmp_ws`'s producer warp not counted).
    fn row_warps(&self, kernel: Kernel) -> u32 {
        match self.policy {
            Policy::WgmmaWs(w, _) if kernel == Kernel::PfCmp => w,
            _ => self.warps,
        }
    }

    /// Threads per block of `kernel` (PfCmp or PfSw).
    pub fn threads(&self, kernel: Kernel) -> u32 {
        let producers = match self.policy {
            Policy::WgmmaWs(w, _) if kernel == Kernel::PfCmp => ws_producer_warps(w),
            _ => 0,
        };
        (self.row_warps(kernel) + producers) * 32
    }

    /// Positions per tile of `kernel`.
    pub fn positions(&self, kernel: Kernel, cfg: &Config) -> u32 {
        self.row_warps(kernel) * 16 / cfg.group_size()
    }

    /// `pf_sel`'s grid width: a block per `PF_SEL_WARPS` positions of each sequence.
    pub fn sel_tiles(&self, seqs: &[PlanSeq]) -> u32 {
        tiles_of(seqs, PF_SEL_WARPS)
    }

    /// Tiles of a step's sequences: `kernel`'s grid width.
    pub fn tiles(&self, kernel: Kernel, cfg: &Config, seqs: &[PlanSeq]) -> u32 {
        tiles_of(seqs, self.positions(kernel, cfg))
    }
}

/// Tiles of `tp` positions of each sequence's new tokens (`pf_tile` in the kernels).
fn tiles_of(seqs: &[PlanSeq], tp: u32) -> u32 {
    seqs.iter().map(|s| (s.new_len - s.old_len).div_ceil(tp)).sum()
}

/// Whether the config can use the prefill kernels at all (the device decides the rest):
/// 16-bit storage, a compiled (DK, DV), a power-of-two group of at most 16 heads (one
/// warp's 16 rows hold whole positions), 64-key tiles inside pages and selection blocks,
/// at most 32 selected blocks (one warp's lanes rank them).
pub(crate) fn supported(cfg: &Config) -> bool {
    let g = cfg.group_size();
    cfg.dtype != Dtype::F32
        && SHAPES.contains(&(cfg.head_dim_qk, cfg.head_dim_v))
        && g.is_power_of_two()
        && g <= 16
        && cfg.page_size % PF_KEYS == 0
        && cfg.sel_block % PF_KEYS == 0
        && cfg.sel_count <= 32
}

/// Whether the config takes the prefill's selected branch block-major
/// (kernels/prefill_blocks.cuh): the prefill path (which also keeps a slot in 5 bits),
/// one 64-key tile per selection block, and a group of at most 8 heads. At G = 16 the
/// position-major branch shares each block load among 16 heads and stays. G = 8 lost
/// block-major in the first build (H200, 64k: 63.0 -> 72.7 ms) and won after the merge's
/// and pfb_attn's fixes (61.4 -> 55.0 ms, session 14; docs/PREFILL_NOTES.md, variant 20).
pub(crate) fn blocks_supported(cfg: &Config) -> bool {
    supported(cfg) && cfg.sel_block == PF_KEYS && cfg.group_size() <= 8
}

/// Whether a step with these sequences goes through the prefill kernels.
pub(crate) fn wanted(seqs: &[PlanSeq]) -> bool {
    seqs.iter().any(|s| s.new_len - s.old_len >= MIN_TOKENS)
}

/// Selection blocks of a longest sequence (`pf_nblk` in kernels/prefill_parts.cuh).
fn nblk(cfg: &Config) -> usize {
    (cfg.pages_per_seq() * cfg.page_size / cfg.sel_block) as usize
}

/// Compressed-key tiles of a longest sequence (`pf_ntl_max` in kernels/prefill.cuh).
fn cmp_tiles(cfg: &Config) -> usize {
    cfg.num_cmp_tokens(cfg.pages_per_seq() * cfg.page_size).div_ceil(PF_KEYS) as usize
}

/// Bytes per position of `pf_cmp`'s selection state (`PfScores` in kernels/prefill.cuh: a
/// window of `win` block scores, and with a moving window the kept top-n's scores and
/// blocks) and its tile's head sums.
fn position_bytes(cfg: &Config, win: usize, moving: bool) -> usize {
    (PF_KEYS as usize + if moving { 2 * cfg.sel_count as usize } else { 0 } + win) * 4
}

/// Shared memory of `pf_cmp` and `pf_sw` (the kernels' layouts, from a 1024-byte aligned
/// base): Q (Wgmma) | two K and V stages (for `pf_sw` with `sel_warp`, at least every
/// warp's two 16-key stages) | pf_cmp: per-position head sums of a tile and selection
/// states (a window of every block), the page of each compressed tile | pf_sw: the
/// selected partial output (MmaSync only), block masks, the union list, the page of each
/// visited tile.
pub(crate) fn shared_mem(cfg: &Config, policy: Policy, warps: u32, sel_warp: bool) -> (usize, usize) {
    let (dk, dv, keys) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize, PF_KEYS as usize);
    let (stage, q, acc) = match policy {
        Policy::Wgmma | Policy::WgmmaTma | Policy::WgmmaWs(..) => (keys * (dk + dv) * 2, warps as usize * 16 * dk * 2, 0),
        Policy::MmaSync => (keys * (dk + 8 + dv + 8) * 2, 0, warps as usize * dv * 16 * 4),
    };
    let positions = (warps * 16 / cfg.group_size()) as usize;
    let nblk = nblk(cfg);
    let head = ALIGN_SLACK + q;
    let cmp = head + 2 * stage + positions * position_bytes(cfg, nblk, false) + cmp_tiles(cfg) * 4;
    let tiles = nblk * (cfg.sel_block / PF_KEYS) as usize + (cfg.window / PF_KEYS) as usize + 4;
    // `pf_warp_stages` in kernels/prefill.cuh: two stages of 16 keys of K and V per warp.
    let warp_stages = if sel_warp { warps as usize * 2 * 16 * (dk + dv) * 2 } else { 0 };
    let sw = head + (2 * stage).max(warp_stages) + acc + nblk * 8 + tiles * 4;
    (cmp, sw)
}

/// Shared memory of `pf_sel` (kernels/prefill.cuh): its warps' two 16-key stages of K and V
/// each, from a 1024-byte aligned base.
pub(crate) fn sel_shared_mem(cfg: &Config) -> usize {
    ALIGN_SLACK + PF_SEL_WARPS as usize * 2 * 16 * (cfg.head_dim_qk + cfg.head_dim_v) as usize * 2
}

/// The window of block scores of the warp-specialised `pf_cmp`: every block, or with a
/// moving window (`moving`) at most `cap` blocks, or `None` when a tile's blocks would not
/// fit in that: a 64-key tile reaches blocks up to (B + 61 + A) / B past the window's start
/// after a move (Eq. 9: A = l / d, B = l' / d).
fn ws_window(cfg: &Config, moving: bool, cap: usize) -> Option<usize> {
    if !moving {
        return Some(nblk(cfg));
    }
    let win = nblk(cfg).min(cap);
    let (a, b) = cfg.eq9_strides();
    let (a, b) = (a as usize, b as usize);
    (win == nblk(cfg) || (b + 61 + a) / b < win).then_some(win)
}

/// Shared memory and window of the warp-specialised `pf_cmp` in form (`warps` consumer
/// warps, moving window) (`pf_cmp_ws` in kernels/prefill.cuh, which derives its stage count
/// from it): Q | K and V stages | per-position head sums and selection states | the page of
/// each compressed tile | a 256-word top-n histogram per consumer warp; as many stages
/// (`min_stages` to `PF_WS_STAGES`) as fit in `optin`, or `None`. The moving window is as
/// long as the layout holds with `min_stages` stages, at most `cap` blocks (a knob's, else
/// none) and every block: its rankings cost more than stages gain (measured on the H200,
/// docs/PREFILL_NOTES.md, the window's length: every shorter window was slower). See
/// [`ws_window`] for when it is too short.
pub(crate) fn ws_shared_mem(cfg: &Config, form: (u32, bool), cap: usize, min_stages: u32, optin: usize) -> Option<(usize, usize)> {
    let (dk, dv, keys, warps) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize, PF_KEYS as usize, form.0 as usize);
    let positions = warps * 16 / cfg.group_size() as usize;
    let stage = keys * (dk + dv) * 2;
    let base =
        ALIGN_SLACK + warps * 16 * dk * 2 + positions * position_bytes(cfg, 0, form.1) + (cmp_tiles(cfg) + warps * 256) * 4;
    let optin = optin.checked_sub(WS_STATIC_SMEM)?;
    let win = if form.1 {
        let room = optin.checked_sub(base + min_stages as usize * stage)? / (positions * 4);
        ws_window(cfg, true, cap.min(room))?
    } else {
        nblk(cfg)
    };
    let fixed = base + positions * win * 4;
    let bytes = (min_stages as usize..=PF_WS_STAGES as usize).rev().map(|ns| fixed + ns * stage).find(|&b| b <= optin)?;
    Some((bytes, win))
}

/// The warp-specialised `pf_cmp`'s form, shared memory and moving window (0: none) for
/// `cfg`: the first of `WS_FORMS` that fits (twelve warps with three stages, eight with
/// two), or with `window_only` the first with a moving window of at most `cap` blocks, or
/// with `warps` the first of that many consumer warps.
fn ws_choice(cfg: &Config, optin: usize, cap: usize, window_only: bool, warps: Option<usize>) -> Option<((u32, bool), usize, u32)> {
    let wanted = |f: &&(u32, bool)| (f.1 || !window_only) && warps.map_or(true, |w| w == f.0 as usize);
    WS_FORMS.iter().filter(wanted).find_map(|&f| {
        let (bytes, win) = ws_shared_mem(cfg, f, cap, if f.0 > 8 { 3 } else { 2 }, optin)?;
        Some((f, bytes, if f.1 { win as u32 } else { 0 }))
    })
}

/// The prefill kernels' plan for `cfg` on a device of compute capability `cc` allowing
/// `optin` bytes of shared memory per block, or `None` when the config or the device
/// cannot use them (`NSA_CUDA_NO_PREFILL=1` also turns them off) and prefill steps run on
/// the decode kernels. Measured on the H200 (docs/PREFILL_NOTES.md): 4-warp blocks, two per
/// multiprocessor, are fastest with wgmma at G = 16 and DK <= 128, and with their tiles
/// copied by tensor maps when the backend writes them (`tma`); 8-warp blocks elsewhere.
/// With tensor maps `pf_cmp` is warp-specialised where its shape has maps and its layout
/// fits (`WgmmaWs`; docs/PREFILL_NOTES.md, variant 14).
/// Diagnosis knobs: `NSA_CUDA_PF_MMA=1` runs both kernels with mma.sync (the sm_80 path,
/// so a Hopper GPU can test it), `NSA_CUDA_PF_SW_MMA=1` only `pf_sw` (a warp of mma.sync
/// skips the selected tiles its positions did not choose, a wgmma unit of 64 rows cannot),
/// `NSA_CUDA_PF_NO_WS=1` keeps `pf_cmp` in its block-wide form, `NSA_CUDA_PF_WS_WIN=1`
/// gives it the moving window wherever it is warp-specialised, `NSA_CUDA_PF_SC_WIN=N`
/// makes that window N blocks at most (so small prefills move it: for tests and the
/// sanitizers; a window too short for a tile's blocks leaves the form out), and
/// `NSA_CUDA_PF_WS_WARPS=N` takes only its forms of N consumer warps (8 or 12), and
/// `NSA_CUDA_PF_CMP_WINDOW=0` keeps the sliding window in `pf_sw` (`PrefillPlan::cmp_window`),
/// `NSA_CUDA_PF_SEL=0` the selected branch at G = 16 in `pf_sw` (`PrefillPlan::sel_split`),
/// `NSA_CUDA_PF_SEL_SHARE=0` has `pf_sel` copy every block per warp (`PrefillPlan::sel_share`),
/// `NSA_CUDA_PF_SEL_SHARE_MIN=N` shares the blocks N positions chose (`PrefillPlan::sel_share_min`),
/// `NSA_CUDA_PF_SEL_WG=0` multiplies the blocks all of them chose per warp (`PrefillPlan::sel_wg`).
pub(crate) fn plan(cfg: &Config, cc: (i32, i32), optin: usize, tma: bool) -> Option<PrefillPlan> {
    use super::build::{env_num, env_on};
    let knobs = Knobs {
        off: env_on("NSA_CUDA_NO_PREFILL"),
        mma_all: env_on("NSA_CUDA_PF_MMA"),
        mma_sw: env_on("NSA_CUDA_PF_SW_MMA"),
        union: env_on("NSA_CUDA_PF_UNION"),
        no_ws: env_on("NSA_CUDA_PF_NO_WS"),
        ws_win: env_on("NSA_CUDA_PF_WS_WIN"),
        sc_win: env_num("NSA_CUDA_PF_SC_WIN"),
        ws_warps: env_num("NSA_CUDA_PF_WS_WARPS"),
        sw_window: env_num("NSA_CUDA_PF_CMP_WINDOW") == Some(0),
        no_sel: env_num("NSA_CUDA_PF_SEL") == Some(0),
        no_share: env_num("NSA_CUDA_PF_SEL_SHARE") == Some(0),
        share_min: env_num("NSA_CUDA_PF_SEL_SHARE_MIN"),
        no_wg: env_num("NSA_CUDA_PF_SEL_WG") == Some(0),
    };
    plan_with(cfg, cc, optin, tma, knobs)
}

/// The diagnosis knobs [`plan`] reads (`=1` each but the last): no prefill path, mma.sync
/// for both kernels or for `pf_sw`, the selected branch over the block's union (not per
/// warp), `pf_cmp` without warp specialisation, or always with the moving window, that
/// window's length in blocks, the warp-specialised forms' consumer warps, and the sliding
/// window kept in `pf_sw` (`NSA_CUDA_PF_CMP_WINDOW=0`), no `pf_sel` (`NSA_CUDA_PF_SEL=0`),
/// and no shared copies in it (`NSA_CUDA_PF_SEL_SHARE=0`) or copies shared by N positions
/// (`NSA_CUDA_PF_SEL_SHARE_MIN=N`), and no warpgroup products there (`NSA_CUDA_PF_SEL_WG=0`).
#[derive(Debug, Clone, Copy, Default)]
struct Knobs {
    off: bool,
    mma_all: bool,
    mma_sw: bool,
    union: bool,
    no_ws: bool,
    ws_win: bool,
    sc_win: Option<usize>,
    ws_warps: Option<usize>,
    sw_window: bool,
    no_sel: bool,
    no_share: bool,
    share_min: Option<usize>,
    no_wg: bool,
}

/// [`plan`] with its knobs as arguments.
fn plan_with(cfg: &Config, cc: (i32, i32), optin: usize, tma: bool, k: Knobs) -> Option<PrefillPlan> {
    let Knobs { off, mma_all, mma_sw, union, no_ws, ws_win, sc_win, ws_warps, sw_window, no_sel, no_share, share_min, no_wg } = k;
    if !supported(cfg) || off {
        return None;
    }
    let policy = if cc == (9, 0) && !mma_all { Policy::Wgmma } else { Policy::MmaSync };
    let g = cfg.group_size();
    // pf_cmp warp-specialised wherever tensor maps serve its shape and its layout fits
    // (its window of block scores lets it fit where the block-wide form's scores do not).
    let shape_ok = Policy::WgmmaWs(8, false).shapes().contains(&(cfg.head_dim_qk, cfg.head_dim_v));
    let cap = sc_win.unwrap_or(usize::MAX);
    let ws = (policy != Policy::MmaSync && tma && !no_ws && shape_ok).then(|| ws_choice(cfg, optin, cap, ws_win, ws_warps)).flatten();
    let order = if policy == Policy::Wgmma && g == 16 && cfg.head_dim_qk <= 128 { [4, 8] } else { [8, 4] };
    order.into_iter().find_map(|warps| {
        let tma_fits = tma && warps == 4 && Policy::WgmmaTma.shapes().contains(&(cfg.head_dim_qk, cfg.head_dim_v));
        let policy = if policy == Policy::Wgmma && tma_fits { Policy::WgmmaTma } else { policy };
        let policy_sw = if mma_sw { Policy::MmaSync } else { policy };
        let cmp = shared_mem(cfg, policy, warps, false).0;
        // The selected branch per warp where its stages fit, else over the union.
        let sw_warp = shared_mem(cfg, policy_sw, warps, true).1;
        let sel_warp = !union && sw_warp <= optin;
        let sw = if sel_warp { sw_warp } else { shared_mem(cfg, policy_sw, warps, false).1 };
        let smem_sel = sel_shared_mem(cfg);
        let p = PrefillPlan {
            policy,
            policy_sw,
            sel_warp,
            warps,
            smem_cmp: cmp as u32,
            smem_sw: sw as u32,
            sc_win: 0,
            cmp_window: false,
            sel_split: false,
            smem_sel: smem_sel as u32,
            sel_share: false,
            sel_share_min: share_min.map_or(if cfg.head_dim_qk > 128 { 3 } else { 2 }, |n| n.clamp(2, 4) as u32),
            sel_wg: false,
        };
        let p = match ws {
            Some(((w, moving), b, sc_win)) => {
                let cmp_window = sel_warp && !sw_window;
                let sel_split = cmp_window && g == 16 && !no_sel && smem_sel <= optin;
                let sel_share = sel_split && !no_share;
                let sel_wg = sel_share && !no_wg;
                PrefillPlan { policy: Policy::WgmmaWs(w, moving), smem_cmp: b as u32, sc_win, cmp_window, sel_split, sel_share, sel_wg, ..p }
            }
            None => p,
        };
        (warps * 16 / g <= MAX_POSITIONS && p.smem_cmp as usize <= optin && sw <= optin).then_some(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    /// The default window cap: none.
    const WIN: usize = usize::MAX;

    /// [`ws_shared_mem`]'s bytes.
    fn ws_bytes(cfg: &Config, form: (u32, bool), cap: usize, min_stages: u32, optin: usize) -> Option<usize> {
        ws_shared_mem(cfg, form, cap, min_stages, optin).map(|l| l.0)
    }

    fn cfg(hq: u32, hkv: u32, dk: u32, dv: u32, len: u32) -> Config {
        let mut c = Config::preset(Preset::Paper).with_shape(hq, hkv, dk, dv).with_capacity(4, len);
        c.dtype = Dtype::Bf16;
        c
    }

    /// At G = 16 every `pf_sel` shape (tests/gpu_prefill.rs runs each: 64/64, 128/128,
    /// 192/128) takes the selected branch in `pf_sel` with its warpgroup products on sm_90,
    /// and none on sm_80 (no tensor maps there, so no warp-specialised `pf_cmp` either).
    #[test]
    fn pf_sel_serves_every_g16_shape() {
        let optin = 227 * 1024;
        for (dk, dv) in SHAPES {
            let c = cfg(16, 1, dk, dv, 8192);
            let p = plan_with(&c, (9, 0), optin, true, Knobs::default()).unwrap();
            assert!(p.sel_split && p.sel_share && p.sel_wg, "{dk}/{dv}: {p:?}");
            let p = plan_with(&c, (8, 0), 163 * 1024, false, Knobs::default()).unwrap();
            assert!(!p.sel_split && !p.sel_wg, "{dk}/{dv} on sm_80: {p:?}");
        }
    }

    #[test]
    fn paper_shapes_fit_on_hopper() {
        let optin = 227 * 1024;
        let c = cfg(64, 4, 128, 128, 65536);
        let p = plan_with(&c, (9, 0), optin, true, Knobs { no_ws: true, ..Knobs::default() }).unwrap();
        assert_eq!((p.policy, p.warps), (Policy::WgmmaTma, 4));
        let p = plan(&cfg(64, 4, 128, 128, 65536), (9, 0), optin, false).unwrap();
        assert_eq!((p.policy, p.warps), (Policy::Wgmma, 4));
        // Two blocks of each kernel per multiprocessor (228 KiB of shared memory there).
        assert!(2 * p.smem_cmp as usize <= 228 * 1024 && 2 * p.smem_sw as usize <= 228 * 1024);
        let p = plan_with(&cfg(64, 4, 192, 128, 65536), (9, 0), optin, true, Knobs { no_ws: true, ..Knobs::default() });
        assert_eq!(p.map(|p| (p.policy, p.warps)), Some((Policy::Wgmma, 8)));
        let p = plan_with(&cfg(64, 16, 128, 128, 65536), (9, 0), optin, true, Knobs { no_ws: true, ..Knobs::default() });
        assert_eq!(p.unwrap().positions(Kernel::PfCmp, &cfg(64, 16, 128, 128, 65536)), 16);
        let p = plan(&cfg(64, 4, 128, 128, 65536), (8, 0), optin, true).unwrap();
        assert_eq!(p.policy, Policy::MmaSync);
    }

    #[test]
    fn knobs_pick_mma_sync_on_hopper() {
        let optin = 227 * 1024;
        let c = cfg(64, 4, 128, 128, 65536);
        let no_ws = Knobs { no_ws: true, ..Knobs::default() };
        let p = plan_with(&c, (9, 0), optin, true, Knobs { mma_sw: true, ..no_ws }).unwrap();
        assert_eq!((p.policy, p.policy_sw, p.warps), (Policy::WgmmaTma, Policy::MmaSync, 4));
        assert_eq!(p.policy_of(Kernel::PfCmp), Policy::WgmmaTma);
        assert_eq!(p.policy_of(Kernel::PfSw), Policy::MmaSync);
        // pf_sw's shared memory is the mma.sync layout's (its partial output, no Q tile).
        assert_eq!(p.smem_sw as usize, shared_mem(&c, Policy::MmaSync, 4, true).1);
        let p = plan_with(&c, (9, 0), optin, true, Knobs { mma_all: true, ..Knobs::default() }).unwrap();
        assert_eq!((p.policy, p.policy_sw, p.warps), (Policy::MmaSync, Policy::MmaSync, 8));
        assert!(plan_with(&c, (9, 0), optin, true, Knobs { off: true, ..Knobs::default() }).is_none());
        // The selected branch per warp by default (its stages fit), over the union on request.
        let p = plan_with(&c, (9, 0), optin, true, no_ws).unwrap();
        assert!(p.sel_warp);
        assert_eq!(p.smem_sw as usize, shared_mem(&c, Policy::WgmmaTma, 4, true).1);
        let p = plan_with(&c, (9, 0), optin, true, Knobs { union: true, ..no_ws }).unwrap();
        assert!(!p.sel_warp);
        assert_eq!(p.smem_sw as usize, shared_mem(&c, Policy::WgmmaTma, 4, false).1);
    }

    /// The sliding window runs in the warp-specialised `pf_cmp` wherever that form is
    /// taken and `pf_sw` walks its selected blocks per warp; the knob, the union form and
    /// the block-wide `pf_cmp` keep it in `pf_sw`.
    #[test]
    fn the_window_runs_in_the_warp_specialised_pf_cmp() {
        let optin = 227 * 1024;
        for c in [cfg(64, 4, 128, 128, 65536), cfg(64, 4, 192, 128, 65536), cfg(64, 16, 128, 128, 65536), cfg(64, 8, 128, 128, 16384)] {
            let p = plan_with(&c, (9, 0), optin, true, Knobs::default()).unwrap();
            assert!(matches!(p.policy, Policy::WgmmaWs(..)) && p.sel_warp && p.cmp_window, "{c:?}");
            let keep = |k: Knobs| plan_with(&c, (9, 0), optin, true, k).unwrap().cmp_window;
            assert!(!keep(Knobs { sw_window: true, ..Knobs::default() }));
            assert!(!keep(Knobs { union: true, ..Knobs::default() }));
            assert!(!keep(Knobs { no_ws: true, ..Knobs::default() }));
            assert!(!keep(Knobs { mma_all: true, ..Knobs::default() }));
            // Without tensor maps pf_cmp is not warp-specialised.
            assert!(!plan_with(&c, (9, 0), optin, false, Knobs::default()).unwrap().cmp_window);
            // At G = 16 the selected branch then goes to pf_sel (unless its knob says no).
            assert_eq!(p.sel_split, c.group_size() == 16);
            assert!(!plan_with(&c, (9, 0), optin, true, Knobs { no_sel: true, ..Knobs::default() }).unwrap().sel_split);
            assert!(!plan_with(&c, (9, 0), optin, true, Knobs { sw_window: true, ..Knobs::default() }).unwrap().sel_split);
            // ... which copies the tile's common blocks once (unless its knob says no).
            assert_eq!(p.sel_share, p.sel_split);
            assert!(!plan_with(&c, (9, 0), optin, true, Knobs { no_share: true, ..Knobs::default() }).unwrap().sel_share);
            // ... and multiplies the blocks all of them chose by warpgroup (unless its knob or
            // the share knob says no).
            assert_eq!(p.sel_wg, p.sel_share);
            assert!(!plan_with(&c, (9, 0), optin, true, Knobs { no_wg: true, ..Knobs::default() }).unwrap().sel_wg);
            assert!(!plan_with(&c, (9, 0), optin, true, Knobs { no_share: true, ..Knobs::default() }).unwrap().sel_wg);
            // A block is shared when two of the tile's positions chose it, three at DK > 128
            // (variant 82); the knob's value within 2..=4.
            assert_eq!(p.sel_share_min, if c.head_dim_qk > 128 { 3 } else { 2 }, "{c:?}");
            let share_min = |n| plan_with(&c, (9, 0), optin, true, Knobs { share_min: Some(n), ..Knobs::default() }).unwrap().sel_share_min;
            assert_eq!((share_min(1), share_min(3), share_min(4), share_min(9)), (2, 3, 4, 4));
        }
        // pf_sel's stages: 16 KB a warp at 128/128, so three 4-warp blocks fit a
        // multiprocessor (228 KiB).
        let c = cfg(64, 4, 128, 128, 65536);
        assert_eq!(sel_shared_mem(&c), 1024 + 4 * 16 * 1024);
        assert!(3 * sel_shared_mem(&c) <= 228 * 1024);
        let seqs = [PlanSeq { seq: 0, old_len: 0, new_len: 9, row: 0 }, PlanSeq { seq: 1, old_len: 5, new_len: 6, row: 9 }];
        assert_eq!(plan(&c, (9, 0), optin, true).unwrap().sel_tiles(&seqs), 3 + 1);
    }

    #[test]
    fn pf_cmp_is_warp_specialised_where_tensor_maps_serve_it() {
        let optin = 227 * 1024;
        let stage = |c: &Config| (PF_KEYS * (c.head_dim_qk + c.head_dim_v) * 2) as usize;
        // Paper G = 16 at 64k: twelve consumer warps (twelve positions per pf_cmp block)
        // with three stages; pf_sw unchanged (4-warp blocks, tensor maps).
        let c = cfg(64, 4, 128, 128, 65536);
        let p = plan(&c, (9, 0), optin, true).unwrap();
        assert_eq!((p.policy, p.policy_sw, p.warps), (Policy::WgmmaWs(12, false), Policy::WgmmaTma, 4));
        assert_eq!((p.threads(Kernel::PfCmp), p.threads(Kernel::PfSw)), (16 * 32, 128));
        assert_eq!((p.positions(Kernel::PfCmp, &c), p.positions(Kernel::PfSw, &c)), (12, 4));
        assert_eq!(Some(p.smem_cmp as usize), ws_bytes(&c, (12, false), WIN, 3, optin));
        assert!(ws_bytes(&c, (12, false), WIN, 4, optin).is_none());
        assert_eq!(ws_bytes(&c, (12, false), WIN, 2, p.smem_cmp as usize - 1), Some(p.smem_cmp as usize - stage(&c)));
        // Each kernel cuts the step into its own tiles.
        let seqs = [PlanSeq { seq: 0, old_len: 0, new_len: 100, row: 0 }];
        assert_eq!((p.tiles(Kernel::PfCmp, &c, &seqs), p.tiles(Kernel::PfSw, &c, &seqs)), (9, 25));
        // G = 8 at 64k: twelve warps' 24 positions' scores leave too little room for three
        // stages, twelve warps with the moving window get them (faster than eight warps with
        // every block's score in three stages: docs/PREFILL_NOTES.md, variant 16).
        let c8 = cfg(64, 8, 128, 128, 65536);
        let p = plan(&c8, (9, 0), optin, true).unwrap();
        assert_eq!((p.policy, p.warps, p.positions(Kernel::PfCmp, &c8)), (Policy::WgmmaWs(12, true), 8, 24));
        assert_eq!(Some(p.smem_cmp as usize), ws_bytes(&c8, (12, true), WIN, 3, optin));
        assert!(ws_bytes(&c8, (12, false), WIN, 3, optin).is_none());
        assert!(ws_bytes(&c8, (8, false), WIN, 3, optin).is_some());
        // Its window is as long as the layout holds (640 blocks: one more word a position
        // would not fit), not every block's.
        assert_eq!(p.sc_win as usize, ws_shared_mem(&c8, (12, true), WIN, 3, optin).unwrap().1);
        assert!(p.smem_cmp as usize + 24 * 4 > optin - WS_STATIC_SMEM && (256..1024).contains(&p.sc_win));
        assert_eq!(ws_window(&c8, false, WIN), Some(1024));
        // G = 4: twelve warps (48 positions) at 16k; at 64k no form with every block's
        // score fits (nor the block-wide form beyond 4 warps), eight warps with the window do.
        let c4 = cfg(64, 16, 128, 128, 16384);
        let p = plan(&c4, (9, 0), optin, true).unwrap();
        assert_eq!((p.policy, p.positions(Kernel::PfCmp, &c4)), (Policy::WgmmaWs(12, false), 48));
        let c4 = cfg(64, 16, 128, 128, 65536);
        let p = plan(&c4, (9, 0), optin, true).unwrap();
        assert_eq!((p.policy, p.positions(Kernel::PfCmp, &c4)), (Policy::WgmmaWs(12, true), 48));
        assert_eq!(Some(p.smem_cmp as usize), ws_bytes(&c4, (12, true), WIN, 3, optin));
        assert!(ws_bytes(&c4, (8, false), WIN, 2, optin).is_none());
        // Eight warps with the window on request (`NSA_CUDA_PF_WS_WARPS=8`).
        let p = plan_with(&c4, (9, 0), optin, true, Knobs { ws_warps: Some(8), ..Knobs::default() }).unwrap();
        assert_eq!((p.policy, p.positions(Kernel::PfCmp, &c4)), (Policy::WgmmaWs(8, true), 32));
        assert_eq!(Some(p.smem_cmp as usize), ws_bytes(&c4, (8, true), WIN, 2, optin));
        assert!(shared_mem(&c4, Policy::Wgmma, 8, false).0 > optin);
        // tests/gpu_prefill.rs's moving-window case (G = 4, 128/128, one 61440-token
        // sequence): twelve warps, a window shorter than the sequence's blocks, so it moves
        // (the runner's `window` phase tests eight, scripts/gpu-run.sh).
        for len in [61440 + 16] {
            let mut g4 = Config::preset(Preset::Paper).with_shape(4, 1, 128, 128);
            (g4.dtype, g4.max_seqs, g4.max_step_seqs, g4.max_seq_len, g4.max_step_tokens) = (Dtype::Bf16, 1, 1, len, len);
            g4.fit_pages();
            let p = plan(&g4, (9, 0), optin, true).unwrap();
            assert_eq!(p.policy, Policy::WgmmaWs(12, true), "{len}");
            assert!((p.sc_win as usize) < nblk(&g4));
        }
        // Entry points name the consumer warps.
        assert_eq!(Kernel::PfCmp.prefill_entry(Policy::WgmmaWs(12, false), Dtype::Bf16, 128, 128), "nsa_pf_cmp_wgs12_bf16_128_128");
        assert_eq!(Kernel::PfCmp.prefill_entry(Policy::WgmmaWs(8, true), Dtype::F16, 64, 64), "nsa_pf_cmp_wgs8w_f16_64_64");
        // DK = 192 at 64k: twelve warps' Q, every block's score and three stages do not fit,
        // with the moving window they do; pf_sw keeps its 8-warp blocks.
        let c192 = cfg(64, 4, 192, 128, 65536);
        let p = plan(&c192, (9, 0), optin, true).unwrap();
        assert_eq!((p.policy, p.policy_sw, p.warps), (Policy::WgmmaWs(12, true), Policy::Wgmma, 8));
        assert_eq!(Some(p.smem_cmp as usize), ws_bytes(&c192, (12, true), WIN, 3, optin));
        assert!(ws_bytes(&c192, (12, false), WIN, 3, optin).is_none());
        // Not without tensor maps, not on sm_80, not on request, and not when even two
        // stages of eight warps do not fit.
        assert_eq!(plan(&c, (9, 0), optin, false).unwrap().policy, Policy::Wgmma);
        assert_eq!(plan(&c, (8, 0), optin, true).unwrap().policy, Policy::MmaSync);
        let no_ws = plan_with(&c, (9, 0), optin, true, Knobs { no_ws: true, ..Knobs::default() }).unwrap();
        assert_eq!(no_ws.policy, Policy::WgmmaTma);
        // 256k tokens at G = 4: the block-wide form's scores (16 KB a position) do not fit
        // at all, the windowed one's do (and pf_sw's block masks); with DK = 192 only eight
        // warps' do.
        let big = cfg(64, 16, 128, 128, 1 << 18);
        assert!(shared_mem(&big, Policy::Wgmma, 4, false).0 > optin);
        assert_eq!(plan(&big, (9, 0), optin, true).map(|p| p.policy), Some(Policy::WgmmaWs(12, true)));
        let big192 = cfg(64, 16, 192, 128, 1 << 18);
        assert!(ws_bytes(&big192, (12, true), WIN, 3, optin).is_none());
        assert_eq!(plan(&big192, (9, 0), optin, true).map(|p| p.policy), Some(Policy::WgmmaWs(8, true)));
        assert!(plan(&big, (9, 0), optin, false).is_none());
        // A window that a tile's blocks would overrun is refused: l' = d (B = 1) with
        // l = 256 (A = 4) reaches (1 + 61 + 4) / 1 = 66 blocks, fine; l = 16384 (A = 256)
        // reaches 318, more than a window of 256.
        let mut odd = cfg(64, 16, 128, 128, 1 << 18);
        (odd.cmp_block, odd.cmp_stride, odd.sel_block) = (256, 64, 64);
        assert_eq!(ws_window(&odd, true, 256), Some(256));
        odd.cmp_block = 16384;
        assert_eq!(ws_window(&odd, true, 256), None);
    }

    #[test]
    fn knobs_force_a_short_moving_window() {
        let optin = 227 * 1024;
        let c = cfg(64, 4, 128, 128, 4096); // 64 blocks: no form needs the window
        let p = plan_with(&c, (9, 0), optin, true, Knobs::default()).unwrap();
        assert_eq!((p.policy, p.sc_win), (Policy::WgmmaWs(12, false), 0));
        let forced = |sc_win| plan_with(&c, (9, 0), optin, true, Knobs { ws_win: true, sc_win, ..Knobs::default() }).unwrap();
        assert_eq!((forced(None).policy, forced(None).sc_win), (Policy::WgmmaWs(12, true), 64));
        let p = forced(Some(24));
        assert_eq!((p.policy, p.sc_win), (Policy::WgmmaWs(12, true), 24));
        assert_eq!(Some(p.smem_cmp as usize), ws_bytes(&c, (12, true), 24, 3, optin));
        let k8 = Knobs { ws_win: true, sc_win: Some(24), ws_warps: Some(8), ..Knobs::default() };
        let p = plan_with(&c, (9, 0), optin, true, k8).unwrap();
        assert_eq!((p.policy, p.sc_win), (Policy::WgmmaWs(8, true), 24));
        assert_eq!(Some(p.smem_cmp as usize), ws_bytes(&c, (8, true), 24, 2, optin));
        // A 64-key tile of the paper preset reaches (4 + 61 + 2) / 4 = 16 blocks past the
        // window's start: 17 blocks is the shortest window, a shorter one leaves the form out.
        assert_eq!(forced(Some(17)).sc_win, 17);
        assert_eq!(forced(Some(16)).policy, Policy::WgmmaTma);
        // Without the knob the window is as long as the layout holds where the plan needs
        // it (G = 4 at 64k: 1,024 blocks, twelve warps with three stages hold 274), within
        // the limit less the kernel's static shared memory.
        let c4 = cfg(64, 16, 128, 128, 65536);
        let p = plan(&c4, (9, 0), optin, true).unwrap();
        assert_eq!((p.policy, p.sc_win), (Policy::WgmmaWs(12, true), 274));
        assert!(p.smem_cmp as usize + WS_STATIC_SMEM <= optin);
        assert_eq!(ws_shared_mem(&c4, (12, true), WIN, 3, optin), Some((p.smem_cmp as usize, 274)));
    }

    #[test]
    fn unsupported_configs_keep_the_decode_kernels() {
        let optin = 227 * 1024;
        let mut f32 = cfg(64, 4, 128, 128, 4096);
        f32.dtype = Dtype::F32;
        assert!(plan(&f32, (9, 0), optin, true).is_none());
        assert!(plan(&cfg(64, 4, 96, 96, 4096), (9, 0), optin, true).is_none());
        assert!(plan(&cfg(96, 4, 128, 128, 4096), (9, 0), optin, true).is_none()); // G = 24
        // pf_sw's block masks and union list of a 2M-token sequence do not fit in shared
        // memory.
        assert!(plan(&cfg(64, 4, 128, 128, 1 << 21), (9, 0), optin, true).is_none());
    }

    #[test]
    fn tiles_cut_each_sequence() {
        let c = cfg(64, 4, 128, 128, 4096);
        let p = PrefillPlan {
            policy: Policy::Wgmma,
            policy_sw: Policy::Wgmma,
            sel_warp: true,
            warps: 4,
            smem_cmp: 0,
            smem_sw: 0,
            sc_win: 0,
            cmp_window: false,
            sel_split: false,
            smem_sel: 0,
            sel_share: false,
            sel_share_min: 2,
            sel_wg: false,
        };
        let seqs = [
            PlanSeq { seq: 0, old_len: 0, new_len: 9, row: 0 },
            PlanSeq { seq: 3, old_len: 100, new_len: 101, row: 9 },
            PlanSeq { seq: 1, old_len: 4, new_len: 4 + 64, row: 10 },
        ];
        assert_eq!(p.positions(Kernel::PfSw, &c), 4);
        assert_eq!(p.tiles(Kernel::PfSw, &c, &seqs), 3 + 1 + 16);
        assert!(wanted(&seqs));
        assert!(!wanted(&seqs[..2]));
    }
}
