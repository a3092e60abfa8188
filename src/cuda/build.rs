//! Creating a backend, in small steps: check the caller's buffer, size each kernel's
//! shared memory for the config and device, load the module, pick the tensor-core
//! kernels' pipeline depth by occupancy, write the tensor maps and zero the selection
//! counters. `CudaBackend::new_with` runs them in this order.

use std::path::{Path, PathBuf};

use cudarc::driver::sys;

use super::compile;
use super::consts::{MBAR_BYTES, MMA_KEYS, MMA_MAX_STAGES, MMA_WARPS, NT_SEL, NT_WIDE, PFB_ITEM, PFB_WARPS, PF_KEYS, TK};
use super::DeviceInfo;
use super::driver::{self, check};
use super::kernel::{Kernel, Kernels, SharedMem};
use super::prefill::{self, PrefillPlan};
use super::tensor_map;
use super::workspace::DevLayout;
use super::CudaOptions;
use crate::config::{Config, Dtype, Phi};
use crate::error::{NsaError, Result};
use crate::layout::Layout;

/// Dynamic shared memory a kernel may use without raising its limit.
pub(crate) const DEFAULT_SMEM: usize = 48 * 1024;
/// Default of [`DecodeKnobs::small_wave_pairs`]: batch 2 with four KV heads. (H200, 64k:
/// batch 2 and 4 measured slower in the small-wave form when the stages were longer,
/// docs/DECODE_NOTES.md variant 17; batch 2 faster with it and the carve-out since the
/// compile-time entries, variant 64.)
const SMALL_WAVE_PAIRS: u32 = 8;
/// Default of [`DecodeKnobs::win_in_cmp_pairs`]: batch 32 with four KV heads (H200,
/// graph: batch 32 and 64 faster with the window in the compressed launch, batch 16
/// slower; docs/DECODE_NOTES.md, variant 75).
const WIN_IN_CMP_PAIRS: u32 = 128;

/// Default of [`DecodeKnobs::sel_flow_pairs`]: batch 4 with four KV heads. H200, graph,
/// paper presets against the launch-wide wait: batch 64 at 128k -2 to -3%, batch 2-32
/// within -1.5 to +0.5%, batch 1 (4 pairs) 1.3% slower (docs/DECODE_NOTES.md, variant 76).
const SEL_FLOW_PAIRS: u32 = 16;
/// Default of [`DecodeKnobs::sw_flow_pairs`]: batch 32 with four KV heads. With the
/// selection's hand-over, paper presets at 128k: batch 32 -3%, batch 64 -3 to -4% against
/// neither; batch 1-16 up to 3% slower (variant 76).
const SW_FLOW_PAIRS: u32 = 128;
/// Default of [`DecodeKnobs::cmp_large_pairs`]: batch 4 with four KV heads. H200, paper
/// presets: batch 16-64 -1.5 to -3% with the group sums by a tensor-core product; batch 1
/// +1% with that code in its entry, hence a separate one (docs/DECODE_NOTES.md, 119, 119b).
const CMP_LARGE_PAIRS: u32 = 16;
/// Whether the selection's per-chunk lists fit (`DecodeKnobs::sel_lists`): `sel_count <= 32`
/// (kernels/selection.cuh `sel_best32`) and the most chunks a wave takes by default (at
/// least `SEL_CHUNK_MIN` blocks each) within [`sel_lists_max_chunks`].
pub(crate) fn sel_lists_fit(cfg: &Config) -> bool {
    let chunks = cfg.max_sel_blocks().div_ceil(super::consts::SEL_CHUNK_MIN).clamp(1, SEL_LISTS_MAX_CHUNKS);
    cfg.sel_count <= 32 && chunks <= sel_lists_max_chunks(cfg)
}

/// The most selection chunks a launch may use in the lists mode: the lists `sw_mma`'s
/// warps fold (`SEL_LISTS_MAX_CHUNKS`), and every chunk's `sel_count` (score, block) pairs,
/// two words each, within a pair's scores area (`max_sel_blocks` words).
pub(crate) fn sel_lists_max_chunks(cfg: &Config) -> u32 {
    SEL_LISTS_MAX_CHUNKS.min(cfg.max_sel_blocks() / (2 * cfg.sel_count).max(1))
}

/// The most selection chunks whose lists `sw_mma` merges (kernels/selected.cuh
/// `sel_merge_lists`: 4 lists a warp, NSA_MMA_WARPS warps).
pub(crate) const SEL_LISTS_MAX_CHUNKS: u32 = 4 * super::consts::MMA_WARPS;

/// Default of [`DecodeKnobs::l1_wave_pairs`]: batch 2 with four KV heads. (H200, graph
/// replay: batch 1 faster in every shape, paper 128/128 42.0 -> 34.2 us at 64k, variant 20;
/// batch 2 faster too together with the small-wave form, 32.3 -> 30.4 us, variant 64; the
/// carve-out alone is slower there.)
const L1_WAVE_PAIRS: u32 = 8;

/// A diagnosis knob read at backend creation: set to `1`.
pub(crate) fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// A numeric knob read at backend creation, when set to a number.
pub(crate) fn env_num(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The device buffer `device_ptr..+bytes` must be device memory of the current context
/// covering the whole range.
pub(crate) fn check_buffer(device_ptr: u64, bytes: usize, ordinal: i32) -> Result<()> {
    let (mut abase, mut asize) = (0u64, 0usize);
    // SAFETY: plain query on a caller-supplied address.
    let r = unsafe { sys::cuMemGetAddressRange_v2(&mut abase, &mut asize, device_ptr) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(NsaError::arg(
            "device_ptr",
            format!("{device_ptr:#x}"),
            format!("is not device memory of device {ordinal}'s primary context ({r:?})"),
        ));
    }
    if device_ptr + bytes as u64 > abase + asize as u64 {
        return Err(NsaError::arg(
            "bytes",
            bytes,
            format!("runs past the end of the allocation holding device_ptr ({asize} bytes at {abase:#x})"),
        ));
    }
    Ok(())
}

/// What the kernels' shared memory and the device allow, decided once per backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Shared memory per kernel family (the tensor-core size at `stages_fit` stages).
    pub smem: SharedMem,
    /// Heads per pass of the scalar attention kernels.
    pub head_chunk: u32,
    /// Tensor-core kernels used; with 1-D bulk copies; with tensor maps.
    pub mma: bool,
    pub bulk: bool,
    pub tma: bool,
    /// The most pipeline stages whose shared memory fits.
    pub stages_fit: usize,
    /// The prefill kernels' shape, when the config and device can use them (`prefill.rs`).
    pub prefill: Option<PrefillPlan>,
    /// The prefill's selected branch runs block-major (kernels/prefill_blocks.cuh) on
    /// single-sequence prefills (`prefill::blocks_supported`; `NSA_CUDA_PF_BLOCKS=0` off).
    pub blocks: bool,
    /// The most compressed splits a launch may use: the workspace's count, or fewer with
    /// `NSA_CUDA_CMP_SPLITS=N` (a tuning knob for measurements).
    pub cmp_splits: u32,
    /// The decode launches' tuned choices and their measurement knobs (`NSA_CUDA_SEL_CHUNKS=N`,
    /// `NSA_CUDA_COMB_HEADS=N`, `NSA_CUDA_MMA_GENERIC=1`, `NSA_CUDA_SMALL_WAVE_PAIRS=N`,
    /// `NSA_CUDA_L1_WAVE_PAIRS=N`, `NSA_CUDA_L1_KERNELS`, `NSA_CUDA_L2_HINTS`,
    /// `NSA_CUDA_L2_KERNELS`, `NSA_CUDA_CMP_WAVES=N`, `NSA_CUDA_NO_GROUP_SUMS=1`,
    /// `NSA_CUDA_COMB_VEC=0`, `NSA_CUDA_PFB_ROWS=N`, `NSA_CUDA_SEL_HALF`,
    /// `NSA_CUDA_SEL_LISTS=0`, `NSA_CUDA_SPB=N`, `NSA_CUDA_APPEND_PREFETCH=0`,
    /// `NSA_CUDA_WIN_IN_CMP=N`, `NSA_CUDA_SEL_FLOW=N`, `NSA_CUDA_SW_FLOW=N`,
    /// `NSA_CUDA_FULL_TABLES=1`, `NSA_CUDA_CMP_LARGE=N`, `NSA_CUDA_WIN_LOCAL=0`): see
    /// [`DecodeKnobs`]'s fields.
    pub knobs: DecodeKnobs,
}

/// See [`Plan::knobs`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DecodeKnobs {
    /// `NSA_CUDA_SEL_CHUNKS=N`: selection chunk blocks per (row, KV head), down to 32
    /// blocks a chunk (the default keeps at least `SEL_CHUNK_MIN`); at most
    /// `SEL_LISTS_MAX_CHUNKS` in the lists mode.
    pub sel_chunks: Option<u32>,
    pub comb_heads: Option<u32>,
    /// `NSA_CUDA_MMA_GENERIC=1`: the tensor-core kernels' any-shape entries even where
    /// one is compiled for the config's head dims (for comparisons).
    pub generic_mma: bool,
    /// Waves of at most this many (row, KV head) pairs take the small-wave form
    /// ([`SmallWave`]); `NSA_CUDA_SMALL_WAVE_PAIRS=N` (0: never), else [`SMALL_WAVE_PAIRS`].
    pub small_wave_pairs: u32,
    /// Waves of at most this many pairs (and steps of at most this many token x KV head
    /// pairs, for the append) launch every kernel at the smallest shared-memory
    /// carve-out; `NSA_CUDA_L1_WAVE_PAIRS=N` (0: never), else [`L1_WAVE_PAIRS`].
    pub l1_wave_pairs: u32,
    /// Which kernels of those waves get the carve-out: bit `Kernel as u32`. Every one,
    /// unless `NSA_CUDA_L1_KERNELS` names some by stage (`append,cmp_mma,select_blocks,
    /// sw_mma,combine`, comma-separated): a measurement knob for which kernel's L1 the
    /// gain comes from (docs/DECODE_NOTES.md, "Next" item 3).
    pub l1_kernels: u32,
    /// Waves whose compressed-branch logits (rows x query heads x compressed tokens of
    /// the step's longest sequence x 4 bytes) fit in this many bytes copy their K/V tiles
    /// with an evict-first L2 policy, so the logits and partials the next kernels read
    /// stay in L2: 3/4 of the L2 with tensor maps (H200: batch 16 at 64k -4%, but batch
    /// 64, whose logits do not fit, 3-5% slower; docs/DECODE_NOTES.md variant 22);
    /// `NSA_CUDA_L2_HINTS=0` never, `=1` always.
    pub l2_hint_logits: u64,
    /// Which of those waves' kernels take the policy (`NSA_CUDA_L2_KERNELS=cmp_mma,sw_mma`:
    /// a measurement knob; default both).
    pub l2_kernels: u32,
    /// `NSA_CUDA_CMP_WAVES=N`: compressed splits for N waves of blocks instead of one (a
    /// measurement knob; the workspace's split count still caps it).
    pub cmp_waves: u32,
    /// `cmp_mma` hands the selection two Eq. 9 sums per head and group of B = l' / d
    /// compressed tokens instead of B logits (kernels/attend_mma.cuh): where B is 2, 4 or 8
    /// and l / d <= B + 1 (the paper preset: half the bytes); `NSA_CUDA_NO_GROUP_SUMS=1`
    /// keeps the logits.
    pub group_sums: bool,
    /// The combine reads 4 columns per load at every head count (where DV allows), with
    /// fuller blocks (`launch::comb_heads`); `NSA_CUDA_COMB_VEC=0`: a column per thread
    /// once a block's columns reach its threads, as before variant 25.
    pub comb_vec: bool,
    /// `NSA_CUDA_PFB_ROWS=N`: the block-major prefill selected branch in chunks of at most
    /// N rows (at most the workspace's; a measurement knob).
    pub pfb_rows: Option<u32>,
    /// The selection launch at half its threads, two blocks per multiprocessor
    /// (`launch::sel_threads`): where full blocks would take more than one wave by
    /// default; `NSA_CUDA_SEL_HALF=1` always, `=0` never.
    pub sel_half: Option<bool>,
    /// `NSA_CUDA_SPB=N`: selected blocks per `sw_mma` unit instead of the wave model's
    /// choice (`launch::wave_splits`; a power of two, clamped to 1..=sel_count rounded up
    /// to a power of two; a measurement knob: the timeline shows the selected units as the
    /// tail of batch 16).
    pub spb: Option<u32>,
    /// The selection hands `sw_mma` per-chunk lists of its best `sel_count` blocks
    /// (`MODE_SEL_LISTS`) instead of one list made by the last chunk block: on tensor
    /// cores, with `sel_count <= 32` (the sorting networks) and the lists within the
    /// workspace's scores area; `NSA_CUDA_SEL_LISTS=0` never.
    pub sel_lists: bool,
    /// Kernels (bit `Kernel as u32`; those that honour it, `late_trigger_mask`) launched with
    /// `MODE_LATE_TRIGGER`: by default `cmp_mma`, `select_blocks` and `sw_mma`, so each
    /// stage's dependents become resident only once it runs. H200, graph, against every
    /// kernel triggering at entry: batch 1 at 64k paper 128/128 -7%, fla -16%, batch 2-16
    /// equal or faster; the combine's trigger moved too was no better (docs/DECODE_NOTES.md,
    /// variants 46-47). `NSA_CUDA_LATE_TRIGGER=stage,...` names others, `=none` none.
    pub late_trigger: u32,
    /// The append launch prefetches the new rows' queries and compressed page-table rows
    /// into L2 (`MODE_APPEND_PREFETCH`); `NSA_CUDA_APPEND_PREFETCH=0` off.
    pub append_prefetch: bool,
    /// Waves of at least this many (row, KV head) pairs outside the small-wave form run the
    /// window's units in the compressed launch, after its splits (kernels/compressed.cuh),
    /// and the selected-branch launch only the selected units; `NSA_CUDA_WIN_IN_CMP=N`
    /// (0: never; 1: every wave, the small-wave form included), else [`WIN_IN_CMP_PAIRS`].
    pub win_in_cmp_pairs: u32,
    /// The forced local blocks' selected partial taken from the window's first unit
    /// (`MODE_WIN_LOCAL`, variant 142: the selected units do not read those blocks again); on
    /// tensor cores with per-chunk lists, forced local blocks inside the window and the
    /// window's units within the workspace's ([`super::launch::window_units`]);
    /// `NSA_CUDA_WIN_LOCAL=0` never.
    pub win_local: bool,
    /// Waves of at least this many pairs, with the lists and group sums, hand each pair's
    /// compressed splits to its selection blocks by a counter (`MODE_SEL_FLOW`,
    /// kernels/ptx.cuh) instead of the selection waiting for the whole compressed launch;
    /// `NSA_CUDA_SEL_FLOW=N` (0: never), else [`SEL_FLOW_PAIRS`].
    pub sel_flow_pairs: u32,
    /// Waves of at least this many pairs, with the lists and group sums, hand each pair's
    /// selection lists to its selected units by a counter (`MODE_SW_FLOW`), and the window's
    /// units in `sw_mma` wait for nothing; only where the compressed launch triggers its
    /// dependents after its own wait on the append (`late_trigger`), which is what puts the
    /// window's keys in place before `sw_mma` starts. `NSA_CUDA_SW_FLOW=N` (0: never), else
    /// [`SW_FLOW_PAIRS`].
    pub sw_flow_pairs: u32,
    /// `NSA_CUDA_FULL_TABLES=1`: every upload copies every page table of the step, as
    /// before the uploads of grown tables only (`table_shadow.rs`; a measurement knob).
    pub full_tables: bool,
    /// Waves of at least this many pairs launch the compressed branch's entry for large
    /// waves where one is compiled (`Kernel::large_entry`: the group sums by a tensor-core
    /// product); `NSA_CUDA_CMP_LARGE=N` (0: never), else [`CMP_LARGE_PAIRS`].
    pub cmp_large_pairs: u32,
}

/// A pair-count threshold from its knob's value: 0 never (`u32::MAX`), N from N pairs,
/// unset `default`.
fn pairs_knob(knob: Option<usize>, default: u32) -> u32 {
    match knob {
        Some(0) => u32::MAX,
        Some(n) => n.min(u32::MAX as usize) as u32,
        None => default,
    }
}

/// `DecodeKnobs::late_trigger` from its knob's value: [`LATE_TRIGGER_DEFAULT`] when unset,
/// else the named stages among those that honour the bit (the tensor-core attention
/// kernels, the selection and the combines: `pdl_trigger_at_entry` in kernels/ptx.cuh).
fn late_trigger_mask(names: Option<&str>) -> u32 {
    let honours = |k: &&Kernel| k.tensor_core() || matches!(k, Kernel::SelectBlocks | Kernel::SelectLists | Kernel::Combine | Kernel::CombineScalar | Kernel::FullCombine);
    let allowed = Kernel::ALL.iter().filter(honours).fold(0u32, |m, &k| m | 1 << k as u32);
    names.map_or(LATE_TRIGGER_DEFAULT.iter().fold(0, |m, &k| m | 1 << k as u32), |n| kernel_mask(Some(n)) & allowed)
}

/// The kernels that trigger their dependents late unless `NSA_CUDA_LATE_TRIGGER` says
/// otherwise (`DecodeKnobs::late_trigger`).
const LATE_TRIGGER_DEFAULT: [Kernel; 4] = [Kernel::CmpMma, Kernel::SelectBlocks, Kernel::SelectLists, Kernel::SwMma];

/// A knob's kernel mask (bit `Kernel as u32`) from its stage names (`NSA_CUDA_L1_KERNELS`,
/// `NSA_CUDA_L2_KERNELS`), or every kernel when unset; names that are no kernel's stage
/// select nothing.
fn kernel_mask(names: Option<&str>) -> u32 {
    let Some(names) = names else { return u32::MAX };
    let named = |k: &&Kernel| names.split(',').any(|n| n.trim() == k.stage());
    Kernel::ALL.iter().filter(named).fold(0, |m, &k| m | 1 << k as u32)
}

/// Whether Eq. 9's strides (A, B) suit `cmp_mma`'s group sums: a lane's two keys in one
/// group, a group in one 8-key mma tile (B = 2, 4, 8), and a block's taps in its own group
/// and the one before (A - 1 <= B).
fn group_sums_fit((a, b): (u32, u32)) -> bool {
    matches!(b, 2 | 4 | 8) && a >= 1 && a <= b + 1
}

/// [`DecodeKnobs::l2_hint_logits`] from the tensor-map path, the knob
/// `NSA_CUDA_L2_HINTS` (0: never, 1: always) and the device's L2 bytes.
fn l2_hint_limit(tensor_maps: bool, knob: Option<usize>, l2_bytes: i32) -> u64 {
    match knob {
        _ if !tensor_maps => 0,
        Some(0) => 0,
        Some(1) => u64::MAX,
        _ => l2_bytes.max(0) as u64 * 3 / 4,
    }
}

/// Shared memory of the tensor-core kernels at `stages` pipeline stages: Q tile |
/// mbarriers | per warp and stage K and V tiles (padded rows, or unpadded boxes from a
/// 1024-byte boundary with tensor maps).
pub(crate) fn smem_tensor_core(cfg: &Config, tma: bool, stages: usize) -> usize {
    let (dk, dv, keys) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize, MMA_KEYS as usize);
    let tile = if tma { 2 * keys * (dk + dv) } else { 2 * keys * (dk + dv + 16) };
    2 * 16 * (dk + 8) + MBAR_BYTES as usize + if tma { 1024 } else { 0 } + MMA_WARPS as usize * stages * tile
}

/// Shared memory of `pfb_attn`: a selection block's K and V and two 16-row query buffers
/// per warp, rows padded by 8 elements, and an item's entries (kernels/prefill_blocks.cuh).
fn smem_pfb_attn(cfg: &Config) -> usize {
    let (dk, dv, keys) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize, PF_KEYS as usize);
    2 * (keys * (dk + 8) + keys * (dv + 8) + PFB_WARPS as usize * 2 * 16 * (dk + 8)) + 4 * PFB_ITEM as usize
}

/// Sizes every kernel's shared memory for `cfg` on `info`'s device and decides which
/// attention kernels run (`NSA_CUDA_SCALAR=1`, `NSA_CUDA_NO_BULK=1`, `NSA_CUDA_NO_TMA=1`
/// turn paths off). Fails when a kernel cannot fit, naming the config fields to lower.
pub(crate) fn plan(cfg: &Config, dl: &DevLayout, info: &DeviceInfo) -> Result<Plan> {
    let (g, dk, dv) = (cfg.group_size() as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
    let optin = info.max_shared_per_block.max(DEFAULT_SMEM as i32) as usize;
    // Scalar attention: the group's heads in chunks of `head_chunk` so any group size fits.
    let tk = TK as usize;
    let att = |hc: usize| 4 * (hc * dk + hc * tk + tk * dv + hc * dv + 3 * hc);
    let mut hc = g;
    while hc > 1 && att(hc) > DEFAULT_SMEM {
        hc -= 1;
    }
    // Compress: a row and an accumulator, then the MLP's hidden units or l row pointers.
    let hidden = if cfg.phi == Phi::Mlp { cfg.phi_hidden as usize } else { 0 };
    let compress = 4 * (2 * dk.max(dv) + hidden.max(2 * cfg.cmp_block as usize));
    // Selection: each head's (m, 1 / l), the token sums of a run of NT_SEL blocks, a score
    // per selection block of the longest sequence. `A` and `B`: Eq. 9's strides per
    // compressed block and per selection block.
    let (a, b) = cfg.eq9_strides();
    let (a, b) = (a as usize, b as usize);
    // The token sums' area also holds the top-n's block lists (32 per list).
    let mb = cfg.max_sel_blocks() as usize;
    let selection = 4 * (2 * g + (NT_SEL as usize * b + a - 1).max(mb.next_multiple_of(32)) + 1 + mb);
    // Combine: per head of the block m, l over the units, (m, l) per branch, the three
    // gates and the three branch factors, plus the parts' sums (kernels/combine.cuh
    // `combine_heads`: at most 3 branches x 4 columns per thread).
    let units_max = (dl.nsplit_c + dl.units_s + dl.units_w) as usize;
    let combine = 4 * (g * (2 * units_max + 12) + 3 * 4 * NT_WIDE as usize);
    let bulk = info.compute_capability.0 >= 9 && !env_on("NSA_CUDA_NO_BULK");
    let tma = bulk && tensor_map::supported(cfg) && !env_on("NSA_CUDA_NO_TMA");
    let mma = cfg.dtype != Dtype::F32
        && dk % 16 == 0
        && dv % 16 == 0
        && dv <= 256
        && smem_tensor_core(cfg, tma, 2) <= optin
        && !env_on("NSA_CUDA_SCALAR");
    for (what, n) in [
        ("attention (head_dim_qk, head_dim_v)", att(hc)),
        ("compress (phi_hidden)", compress),
        ("selection (max_seq_len / sel_block)", selection),
        ("combine (sel_count + window / sel_block)", combine),
    ] {
        if n > optin {
            return Err(NsaError::config(
                "cuda",
                what,
                format!("the {what} kernel needs {n} bytes of shared memory, the device allows {optin}"),
            ));
        }
    }
    // The tensor-core kernels may use up to MMA_MAX_STAGES stages (the attribute is set
    // for the most that fits); the count is picked by occupancy once loaded.
    let stages_fit = (2..=MMA_MAX_STAGES as usize).filter(|&s| smem_tensor_core(cfg, tma, s) <= optin).max().unwrap_or(2);
    let prefill = prefill::plan(cfg, info.compute_capability, optin, tma && mma);
    // The prefill's selected branch block-major where the workspace has its regions and
    // its block fits (`NSA_CUDA_PF_BLOCKS=0`: position-major as before).
    let pfb_attn = smem_pfb_attn(cfg);
    let blocks = prefill.is_some() && dl.pfb_chunk > 0 && pfb_attn <= optin && env_num("NSA_CUDA_PF_BLOCKS") != Some(0);
    let smem = SharedMem {
        compress: compress as u32,
        attention: att(hc) as u32,
        selection: selection as u32,
        combine: combine as u32,
        tensor_core: if mma { smem_tensor_core(cfg, tma, stages_fit) as u32 } else { 0 },
        pf_cmp: prefill.map_or(0, |p| p.smem_cmp),
        pf_sw: prefill.map_or(0, |p| p.smem_sw),
        pfb_attn: if blocks { pfb_attn as u32 } else { 0 },
        pf_sel: prefill.filter(|p| p.sel_split).map_or(0, |p| p.smem_sel),
        // The scalar attention's area and the gated sums and gates of `hc` heads
        // (kernels/prefill_repair.cuh `pf_repair_pair`): under 48 KiB + 13 KiB at any shape.
        pf_repair: if prefill.is_some() { (att(hc) + 4 * (hc * dv + 3 * hc)) as u32 } else { 0 },
    };
    let cmp_splits = env_num("NSA_CUDA_CMP_SPLITS").map_or(dl.nsplit_c, |n| (n as u32).clamp(1, dl.nsplit_c));
    let sel_lists = mma && sel_lists_fit(cfg) && env_num("NSA_CUDA_SEL_LISTS") != Some(0);
    let generic_mma = env_on("NSA_CUDA_MMA_GENERIC");
    let knobs = DecodeKnobs {
        sel_chunks: env_num("NSA_CUDA_SEL_CHUNKS").map(|n| n as u32),
        comb_heads: env_num("NSA_CUDA_COMB_HEADS").map(|n| n as u32),
        generic_mma,
        small_wave_pairs: env_num("NSA_CUDA_SMALL_WAVE_PAIRS").map_or(SMALL_WAVE_PAIRS, |n| n as u32),
        // The per-launch carve-out is a launch attribute of drivers from CUDA 12.5 on.
        l1_wave_pairs: if info.driver_version >= 12050 { env_num("NSA_CUDA_L1_WAVE_PAIRS").map_or(L1_WAVE_PAIRS, |n| n as u32) } else { 0 },
        l1_kernels: kernel_mask(std::env::var("NSA_CUDA_L1_KERNELS").ok().as_deref()),
        l2_hint_logits: l2_hint_limit(tma && mma, env_num("NSA_CUDA_L2_HINTS"), info.l2_cache_bytes),
        l2_kernels: kernel_mask(std::env::var("NSA_CUDA_L2_KERNELS").ok().as_deref()),
        cmp_waves: env_num("NSA_CUDA_CMP_WAVES").map_or(1, |n| (n as u32).max(1)),
        group_sums: mma && group_sums_fit(cfg.eq9_strides()) && !env_on("NSA_CUDA_NO_GROUP_SUMS"),
        comb_vec: env_num("NSA_CUDA_COMB_VEC") != Some(0),
        pfb_rows: env_num("NSA_CUDA_PFB_ROWS").map(|n| n as u32),
        sel_half: env_num("NSA_CUDA_SEL_HALF").map(|n| n != 0),
        sel_lists,
        spb: env_num("NSA_CUDA_SPB").map(|n| n as u32),
        late_trigger: late_trigger_mask(std::env::var("NSA_CUDA_LATE_TRIGGER").ok().as_deref()),
        append_prefetch: env_num("NSA_CUDA_APPEND_PREFETCH") != Some(0),
        win_in_cmp_pairs: pairs_knob(env_num("NSA_CUDA_WIN_IN_CMP"), WIN_IN_CMP_PAIRS),
        win_local: env_num("NSA_CUDA_WIN_LOCAL") != Some(0)
            && sel_lists
            && cfg.sel_local >= 1
            && cfg.sel_block.is_power_of_two()
            // the compiled-shape entries (kernels/attend_mma.cuh `window_keys<WL>`)
            && Kernel::CmpMma.large_entry(cfg.dtype, (cfg.head_dim_qk, cfg.head_dim_v), generic_mma, tma && mma).is_some()
            && cfg.window >= cfg.sel_local * cfg.sel_block
            && super::launch::window_units(cfg, 1, tma && mma, true) <= dl.units_w,
        sel_flow_pairs: pairs_knob(env_num("NSA_CUDA_SEL_FLOW"), SEL_FLOW_PAIRS),
        sw_flow_pairs: pairs_knob(env_num("NSA_CUDA_SW_FLOW"), SW_FLOW_PAIRS),
        full_tables: env_on("NSA_CUDA_FULL_TABLES"),
        cmp_large_pairs: pairs_knob(env_num("NSA_CUDA_CMP_LARGE"), CMP_LARGE_PAIRS),
    };
    Ok(Plan { smem, head_chunk: hc as u32, mma, bulk, tma: tma && mma, stages_fit, prefill, blocks, cmp_splits, knobs })
}

/// The CUBIN for the device (compiled or from the caches) loaded into the current context.
pub(crate) fn load(cfg: &Config, info: &DeviceInfo, plan: &Plan, opts: &CudaOptions) -> Result<Kernels> {
    let dir: Option<PathBuf> = opts.cache_dir.clone().or_else(|| std::env::var_os("NSA_CUDA_CACHE_DIR").map(PathBuf::from));
    let bin = compile::cubin(&info.arch, dir.as_deref().map(Path::new))?;
    let mut k = Kernels::load(&bin, cfg.dtype, (cfg.head_dim_qk, cfg.head_dim_v), plan)?;
    k.pdl = info.compute_capability.0 >= 9 && !env_on("NSA_CUDA_NO_PDL");
    if let Some(p) = env_num("NSA_CUDA_CARVEOUT") {
        k.set_carveout(p as u32)?;
    }
    Ok(k)
}

/// Pipeline depth of the tensor-core kernels: the depth with the most tiles in flight per
/// multiprocessor (blocks x (stages - 1), each warp's tile chain being serial) among the
/// depths that keep at least two blocks resident (`NSA_CUDA_STAGES` overrides). One
/// block per multiprocessor loses at batch 16 (H200, 192/128: 105 -> 120 us), while
/// 128/128 at three stages and two blocks beats two stages at three blocks (97.9 -> 94.2
/// us; docs/DECODE_NOTES.md variant 18). Sets the kernels' shared memory for it and raises
/// their limit for the small-wave form ([`SmallWave`]).
pub(crate) fn pick_stages(cfg: &Config, plan: &Plan, kernels: &mut Kernels) -> Result<StagePick> {
    if !plan.mma {
        return Ok(StagePick { nstage: 2, per_sm: 1, small: None });
    }
    let smem = |s: usize| smem_tensor_core(cfg, plan.tma, s);
    let (pick, small_stages) =
        choose_stages(plan.stages_fit, env_num("NSA_CUDA_STAGES"), |s| kernels.occupancy(Kernel::CmpMma, smem(s)))?;
    let small = small_stages.map(|s| SmallWave { nstage: s as u32, smem: smem(s) as u32 });
    for k in [Kernel::CmpMma, Kernel::SwMma, Kernel::FullMma] {
        kernels.set_smem(k, smem(pick.0) as u32)?;
        if let Some(w) = small {
            kernels.allow_smem(k, w.smem)?;
        }
    }
    Ok(StagePick { nstage: pick.0 as u32, per_sm: pick.1, small })
}

/// [`pick_stages`]'s choice from the blocks per multiprocessor at each depth
/// (`occupancy`, 2..=`stages_fit` stages), `forced` by `NSA_CUDA_STAGES`: (stages, blocks)
/// and the small-wave form's stages, the fewest beyond the pick at which one block fills
/// a multiprocessor's share (none when the pick already has one block, or when even the
/// deepest pipeline leaves room for two). The pick: the most tiles in flight,
/// blocks x (stages - 1), among depths with at least two blocks (the fewer stages on a
/// tie: more warps); two stages when no depth keeps two blocks.
fn choose_stages(stages_fit: usize, forced: Option<usize>, mut occupancy: impl FnMut(usize) -> Result<u32>) -> Result<((usize, u32), Option<usize>)> {
    let mut pick = (2, occupancy(2)?);
    for s in 3..=stages_fit {
        let blocks = occupancy(s)?;
        if blocks >= 2 && blocks as usize * (s - 1) > pick.1 as usize * (pick.0 - 1) {
            pick = (s, blocks);
        }
    }
    if let Some(s) = forced {
        let s = s.clamp(2, stages_fit);
        pick = (s, occupancy(s)?);
    }
    let mut small = None;
    if pick.1 > 1 {
        for s in pick.0 + 1..=stages_fit {
            if occupancy(s)? == 1 {
                small = Some(s);
                break;
            }
        }
    }
    Ok((pick, small))
}

/// The tensor-core kernels' pipeline depth and residency ([`pick_stages`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StagePick {
    /// Stages at the most blocks per multiprocessor, and those blocks.
    pub nstage: u32,
    pub per_sm: u32,
    /// The form of small waves, if any.
    pub small: Option<SmallWave>,
}

/// Waves of at most [`DecodeKnobs::small_wave_pairs`] (row, KV head) pairs launch the tensor-core kernels at
/// `nstage` stages with `smem` bytes: one block per multiprocessor. At batch 1 the step
/// is a chain of five short kernels; with one attention block per multiprocessor the
/// kernels' own times stay the same (ncu) but the chain runs faster (why is not settled:
/// docs/DECODE_NOTES.md, "Next" item 3; with every kernel's carve-out at 100% the gain
/// is gone, variant 18b) (H200, batch 1 at 64k, graph replay:
/// paper 128/128 43.9 -> 41.4 us, 192/128 44.8 -> 38.5, fla 41.3 -> 36.1 and 41.9 ->
/// 35.8; docs/DECODE_NOTES.md variant 17). From batch 2 the blocks' bandwidth matters
/// more: batch 2 and 4 measured slower in this form, and batch 16 at one block per
/// multiprocessor far slower (192/128: 105 -> 120 us).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SmallWave {
    pub nstage: u32,
    pub smem: u32,
}

/// Initialises the workspace of the buffer at `base`: every layer's tensor maps (when
/// used), the selection's counters and the prefill's repair marks (0; each launch leaves
/// them so), then waits.
pub(crate) fn init_workspace(cfg: &Config, lay: &Layout, dl: &DevLayout, base: u64, tma: bool) -> Result<()> {
    if tma {
        let maps = tensor_map::encode_all(cfg, lay, base + dl.pools.off as u64)?;
        // SAFETY: the region holds num_layers * 4 maps and lies inside the buffer.
        unsafe { driver::htod(base + dl.tmaps.off as u64, maps.as_ptr().cast(), maps.len(), std::ptr::null_mut())? };
    }
    // SAFETY: the region lies inside the caller's buffer (checked by `check_buffer`).
    check(unsafe { sys::cuMemsetD8_v2(base + dl.count.off as u64, 0, dl.count.bytes) }, "cuMemsetD8")?;
    if dl.pf_fix.bytes > 0 {
        // SAFETY: as above; the prefill's repair marks start clear (kernels/prefill_repair.cuh).
        check(unsafe { sys::cuMemsetD8_v2(base + dl.pf_fix.off as u64, 0, dl.pf_fix.bytes) }, "cuMemsetD8")?;
    }
    check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
}

#[cfg(test)]
mod tests {
    use super::choose_stages;

    /// Blocks per multiprocessor at 2, 3, 4 stages.
    fn table(t: [u32; 3]) -> impl FnMut(usize) -> crate::error::Result<u32> {
        move |s| Ok(t[s - 2])
    }

    #[test]
    fn selection_lists_fit_the_scores_area() {
        use super::sel_lists_fit;
        use crate::config::{Config, Preset};
        let paper = Config::preset(Preset::Paper);
        // 64k tokens: 1,024 blocks, 8 chunks of 16 pairs (2 words each) = 256 words.
        assert!(sel_lists_fit(&paper.clone().with_capacity(1, 65536)));
        // 1,024 tokens: 16 blocks, one chunk of 16 pairs = 32 words > 16.
        assert!(!sel_lists_fit(&paper.clone().with_capacity(1, 1024)));
        // Past 32 selected blocks the radix select keeps the single list.
        let mut wide = paper.clone().with_capacity(1, 65536);
        wide.sel_count = 33;
        assert!(!sel_lists_fit(&wide));
        // A launch's chunks (the NSA_CUDA_SEL_CHUNKS knob may ask for more) stay within
        // the area: 4,096 tokens, 64 blocks, two lists of 16 pairs.
        assert_eq!(super::sel_lists_max_chunks(&paper.clone().with_capacity(1, 4096)), 2);
        assert_eq!(super::sel_lists_max_chunks(&paper.clone().with_capacity(1, 65536)), super::SEL_LISTS_MAX_CHUNKS);
    }

    #[test]
    fn group_sums_take_the_strides_they_can_hold() {
        use super::group_sums_fit;
        assert!(group_sums_fit((2, 4)), "the paper preset (l = 32, d = 16, l' = 64)");
        assert!(group_sums_fit((1, 2)) && group_sums_fit((3, 2)) && group_sums_fit((9, 8)));
        assert!(!group_sums_fit((1, 1)), "fla (l = d = l'): a group per token, no gain");
        assert!(!group_sums_fit((4, 2)), "taps two groups back");
        assert!(!group_sums_fit((2, 16)) && !group_sums_fit((2, 3)), "B = 16 spans two mma tiles; B a power of two");
    }

    /// The identity `cmp_mma`'s group sums rest on (kernels/attend_mma.cuh, variant 24):
    /// with `A - 1 <= B`, Eq. 9's score of block j is x of group j plus y of group j - 1,
    /// where group g holds tokens gB..gB+B and token i of it weighs overlap(i + A - 1) in x
    /// and overlap(i - B + A - 1) in y (the kernel's formula, 0 outside 0..=A+B-2). Checked
    /// against the CPU engine's Eq. 9 (`cpu::select::block_scores`) for every (A, B) that
    /// `group_sums_fit` takes up to B = 8, and lengths that end inside a group.
    #[test]
    fn group_sums_reproduce_eq9() {
        use super::group_sums_fit;
        use crate::config::{Config, Preset};
        let overlap = |k: i32, a: i32, b: i32| {
            let (lo, hi) = ((k - (b - 1)).max(0), k.min(a - 1));
            if hi >= lo { (hi - lo + 1) as f32 } else { 0.0 }
        };
        let mut seed = 0x2545f491u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed >> 8) as f32 / (1u32 << 24) as f32
        };
        let mut checked = 0;
        for b in [2u32, 4, 8] {
            for a in 1..=b + 1 {
                assert!(group_sums_fit((a, b)));
                let mut cfg = Config::preset(Preset::Paper);
                cfg.cmp_stride = 16;
                cfg.cmp_block = 16 * a;
                cfg.sel_block = 16 * b;
                (cfg.sel_init, cfg.sel_local) = (0, 0);
                for nc in [1usize, 5, 16, 37, 64, 101] {
                    let p: Vec<f32> = (0..nc).map(|_| rnd()).collect();
                    let nblk = nc.div_ceil(b as usize) + 1;
                    let mut reference = vec![0f32; nblk];
                    crate::cpu::select::block_scores(&cfg, &p, nblk - 1, &mut reference);
                    let (ai, bi) = (a as i32, b as i32);
                    let group = |g: usize, next: bool| -> f32 {
                        (0..bi)
                            .map(|i| {
                                let t = g * b as usize + i as usize;
                                let w = if next { overlap(i - bi + ai - 1, ai, bi) } else { overlap(i + ai - 1, ai, bi) };
                                if t < nc { w * p[t] } else { 0.0 }
                            })
                            .sum()
                    };
                    for (j, r) in reference.iter().enumerate() {
                        let own = if b as usize * j < nc { group(j, false) } else { 0.0 };
                        let prev = if j >= 1 && b as usize * (j - 1) < nc { group(j - 1, true) } else { 0.0 };
                        assert!((own + prev - r).abs() <= 1e-5 * r.abs().max(1.0), "A {a} B {b} nc {nc} block {j}: {} vs {r}", own + prev);
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, (3 + 5 + 9) * 6);
    }

    #[test]
    fn l2_policy_limit_follows_the_knob() {
        use super::l2_hint_limit;
        let l2 = 50 << 20;
        // Three quarters of the L2 by default; never without tensor maps, whatever the knob.
        assert_eq!(l2_hint_limit(true, None, l2), 3 * (50 << 20) / 4);
        assert_eq!(l2_hint_limit(true, Some(7), l2), 3 * (50 << 20) / 4);
        assert_eq!(l2_hint_limit(true, Some(0), l2), 0);
        assert_eq!(l2_hint_limit(true, Some(1), l2), u64::MAX);
        assert_eq!(l2_hint_limit(false, Some(1), l2), 0);
        assert_eq!(l2_hint_limit(false, None, l2), 0);
    }

    #[test]
    fn l1_kernels_knob_names_stages() {
        use super::{kernel_mask, Kernel};
        assert_eq!(kernel_mask(None), u32::MAX);
        let m = kernel_mask(Some("select_blocks, combine"));
        assert_eq!(m, 1 << Kernel::SelectBlocks as u32 | 1 << Kernel::Combine as u32);
        assert_eq!(kernel_mask(Some("cmp")), 0, "a name that is no stage selects nothing");
    }

    #[test]
    fn late_trigger_knob_has_a_default_and_takes_only_kernels_that_honour_it() {
        use super::{late_trigger_mask, Kernel};
        assert_eq!(
            late_trigger_mask(None),
            1 << Kernel::CmpMma as u32 | 1 << Kernel::SelectBlocks as u32 | 1 << Kernel::SelectLists as u32 | 1 << Kernel::SwMma as u32
        );
        assert_eq!(late_trigger_mask(Some("none")), 0);
        assert_eq!(late_trigger_mask(Some("cmp_mma,select_blocks")), 1 << Kernel::CmpMma as u32 | 1 << Kernel::SelectBlocks as u32);
        assert_eq!(late_trigger_mask(Some("append")), 0, "the append triggers at entry always");
    }

    #[test]
    fn pair_thresholds_read_zero_as_never_and_keep_their_default_unset() {
        use super::pairs_knob;
        assert_eq!(pairs_knob(None, 128), 128);
        assert_eq!(pairs_knob(Some(0), 128), u32::MAX, "0: no wave reaches it");
        assert_eq!(pairs_knob(Some(1), 128), 1, "1: every wave");
        assert_eq!(pairs_knob(Some(64), u32::MAX), 64);
        assert_eq!(pairs_knob(Some(usize::MAX), 1), u32::MAX);
    }

    #[test]
    fn stages_hold_the_most_tiles_in_flight_and_small_waves_take_one_block() {
        // 128/128 on the H200: 3, 2, 1 blocks at 2, 3, 4 stages: 3, 4, (3) tiles in flight.
        assert_eq!(choose_stages(4, None, table([3, 2, 1])).unwrap(), ((3, 2), Some(4)));
        // 192/128: 2, 1, 1: one block per multiprocessor is never the pick.
        assert_eq!(choose_stages(4, None, table([2, 1, 1])).unwrap(), ((2, 2), Some(3)));
        // Depth that costs no block is taken, the deepest wins; no one-block depth: no small form.
        assert_eq!(choose_stages(4, None, table([4, 4, 3])).unwrap(), ((4, 3), None));
        // A tie (6 blocks x 1 tile at two stages, 3 x 2 at three): the fewer stages.
        assert_eq!(choose_stages(3, None, table([6, 3, 1])).unwrap(), ((2, 6), None));
        // One block per multiprocessor at every depth: two stages, nothing smaller to switch to.
        assert_eq!(choose_stages(4, None, table([1, 1, 1])).unwrap(), ((2, 1), None));
        // Fewer stages fit: the search stops there.
        assert_eq!(choose_stages(2, None, table([3, 2, 1])).unwrap(), ((2, 3), None));
        assert_eq!(choose_stages(3, None, table([3, 2, 1])).unwrap(), ((3, 2), None));
        // NSA_CUDA_STAGES: the forced depth (clamped), the small form beyond it.
        assert_eq!(choose_stages(4, Some(2), table([3, 2, 1])).unwrap(), ((2, 3), Some(4)));
        assert_eq!(choose_stages(4, Some(9), table([3, 2, 1])).unwrap(), ((4, 1), None));
    }
}
