//! A layer's launches: checks of the call, then per wave of query rows the split choices
//! ([`CudaBackend::wave_splits`]) and the fixed sequence of kernels (see the module doc of
//! `mod.rs` and docs/ARCHITECTURE.md). Launches only: nothing is allocated.

use super::consts::{APPEND_MIN_TOKENS, APPEND_ROWS, NT_ATT, NT_SEL, NT_WIDE, SEL_CHUNK_MIN};
use super::driver::{zero_u32_async, CtxGuard, CUstream};
use super::build::sel_lists_max_chunks;
use super::kernel::{Kernel, LaunchOpts};
use super::params::{Launch, Params, MODE_APPEND_PREFETCH, MODE_GROUP_SUMS, MODE_L2_EVICT_FIRST, MODE_LATE_TRIGGER, MODE_SEL_FLOW, MODE_SEL_LISTS, MODE_SW_FLOW, MODE_WIN_LOCAL};
use super::step_layout::StepLayout;
use super::DeviceLayerIo;
use super::CudaBackend;
use crate::cache::Cache;
use crate::config::Phi;
use crate::error::{NsaError, Result};
use crate::plan::Step;

/// Query heads per combine block (`NT_WIDE` threads): the most (a divisor of the group
/// size `g`) that still leaves two blocks per multiprocessor, or with 4 columns per load
/// (`vec`, `comb_vec_fits`; `dv` columns per head) the most whose 4-column groups the
/// threads cover once, with at least 3 blocks per 2 multiprocessors: fewer, fuller blocks
/// issue fewer instructions for the same loads (H200, graph, paper 128/128 at 64k: batch 8
/// 65.2 -> 60.3 us, batch 64 278.3 -> 269.5 against a column per thread; with 16 heads
/// instead of 8 batch 64 was no faster; docs/DECODE_NOTES.md variant 25).
fn comb_heads(g: u32, heads: u32, sms: u32, vec: Option<u32>) -> u32 {
    let fits = |h: u32| match vec {
        Some(dv) => h * dv / 4 <= NT_WIDE && heads / h >= 3 * sms / 2,
        None => heads / h >= 2 * sms,
    };
    (1..=g).filter(|&h| g % h == 0 && fits(h)).max().unwrap_or(1)
}

/// Whether the combine of `heads` query heads per block of `NT_WIDE` threads, `dv` V columns
/// a head, reads 4 columns per load (the `combine` entry) rather than one per thread
/// (`combine_scalar`): where DV allows, and with `vec` (`DecodeKnobs::comb_vec`) at every
/// head count, else only while a block's columns are fewer than its threads (a column per
/// thread then keeps every thread busy).
fn comb_vec_fits(dv: u32, heads: u32, vec: bool) -> bool {
    dv % 4 == 0 && (heads * dv < NT_WIDE || vec)
}

/// The window's units of `sel_block * spb` keys: with tensor maps its range starts up to
/// WINDOW_ALIGN - 1 keys early. With `win_local` (variant 142, `MODE_WIN_LOCAL`) unit 0 is the
/// forced local blocks' keys and the others cover the window below them: at least
/// (sel_local - 1) * sel_block + 1 keys fewer (the last block holds at least one key).
pub(crate) fn window_units(cfg: &crate::Config, spb: u32, tma: bool, win_local: bool) -> u32 {
    let wkeys = if tma { cfg.window + super::consts::WINDOW_ALIGN - 1 } else { cfg.window };
    if win_local {
        let rest = wkeys.saturating_sub((cfg.sel_local - 1) * cfg.sel_block + 1);
        rest.div_ceil(cfg.sel_block * spb) + 1
    } else {
        wkeys.div_ceil(cfg.sel_block * spb)
    }
}

/// `NSA_CUDA_SPB=k` as a selected-blocks-per-unit count: the largest power of two at most
/// `k`, within 1..=`sel_count` rounded up to a power of two (the wave model's range).
fn spb_knob(k: u32, sel_count: u32) -> u32 {
    let k = k.clamp(1, sel_count.next_power_of_two());
    1 << (31 - k.leading_zeros())
}

/// Threads per selection block for a launch of `blocks` blocks on `sms` multiprocessors:
/// half of `NT_SEL` (two blocks per multiprocessor: the kernel is compiled for `NT_SEL`
/// threads at 64 registers, so two half blocks fill the register file exactly) where
/// blocks of `NT_SEL` would take more than one wave, else `NT_SEL` (`None`).
/// `half`: `Some(true)` always half, `Some(false)` never (`NSA_CUDA_SEL_HALF`). (H200,
/// graph, with every selection at 512 threads: batch 64 2-6% faster, batch 16, one wave
/// at 1,024, 3-8% slower; docs/DECODE_NOTES.md variant 38.)
fn sel_threads(blocks: u32, sms: u32, half: Option<bool>) -> Option<u32> {
    half.unwrap_or(blocks > sms).then_some(NT_SEL / 2)
}

/// Selection chunk blocks per (row, KV head) for a wave of `pairs` pairs on `sms`
/// multiprocessors (before the cap by the blocks there are to score): one wave of full
/// blocks (`sms / pairs`; H200: batch 1 nine chunks 14.5 us, one 16.9; batch 16 with one
/// chunk per pair left half the GPU idle, two measured 110.1 -> 104.8 us on paper 128/128
/// at 64k, docs/DECODE_NOTES.md variant 14), and with the lists (`lists`: each chunk's
/// best n to `sw_mma`) one wave of half blocks, twice as many, where full blocks would give
/// a pair at most two chunks: shorter sorts, two blocks a multiprocessor. About 1% (H100,
/// graph, two calls against one wave of full blocks: batch 16 0.99 at 64k and 128k, batch
/// 32 0.98 / 0.995, G = 8 batch 16 0.99, G = 4 batch 4 and 8 0.985; the runs' spread on
/// unchanged points is +-1.5%); doubling four or eight chunks measured 0.987-1.012, so
/// smaller waves keep theirs (docs/DECODE_NOTES.md, variant 134).
fn sel_chunks(sms: u32, pairs: u32, lists: bool) -> u32 {
    let pairs = pairs.max(1);
    let full = sms / pairs;
    if lists && full <= 2 { (2 * sms / pairs).max(1) } else { full.max(1) }
}

/// Whether a tensor-core wave of `pairs` (row, KV head) pairs runs the window's units in
/// the compressed launch (`DecodeKnobs::win_in_cmp_pairs`, `min_pairs`): from that many
/// pairs on, outside the small-wave form (`small`) unless the knob asks for every wave
/// (1). There they start on the multiprocessors whose compressed splits end first, and the
/// selected-branch launch streams only the selected blocks (H200, graph, against main's
/// launches: batch 32 and 64 2-9% faster, batch 1-16 slower; docs/DECODE_NOTES.md,
/// variant 75).
fn window_in_cmp(pairs: u32, small: bool, min_pairs: u32) -> bool {
    pairs >= min_pairs && (!small || min_pairs == 1)
}

/// Blocks per multiprocessor a scalar launch aims for when it picks its split counts.
const BLOCKS_PER_SM: u32 = 2;

impl CudaBackend {
    /// The planned step, after checking what every layer call needs: the cache has this
    /// backend's config, `layer` is in range, and the step is the one last uploaded.
    fn uploaded_step<'c>(&self, cache: &'c Cache, layer: u32, call: &str) -> Result<Step<'c>> {
        let cfg = &self.cfg;
        if cache.config() != cfg {
            return Err(NsaError::arg("cache", "config", "the cache was made with a different config than the backend"));
        }
        if layer >= cfg.num_layers {
            return Err(NsaError::arg("layer", layer, format!("layers are 0..{}", cfg.num_layers)));
        }
        self.binding.check(cache)?;
        let step = cache.step()?;
        if self.uploaded != Some((cache.id(), cache.step_id())) {
            return Err(NsaError::arg("step", "not uploaded", format!("call upload_step for the planned step before {call}")));
        }
        Ok(step)
    }

    /// See [`CudaBackend::run_layer`].
    pub(super) fn launch_layer(&mut self, cache: &Cache, layer: u32, io: &DeviceLayerIo, stream: CUstream) -> Result<()> {
        let cfg = self.cfg;
        let step = self.uploaded_step(cache, layer, "run_layer")?;
        let append_only = io.q == 0 && io.out == 0;
        let required: &[(&str, u64)] = if append_only {
            &[("io.k", io.k), ("io.v", io.v)]
        } else {
            &[("io.q", io.q), ("io.k", io.k), ("io.v", io.v), ("io.gates", io.gates), ("io.out", io.out)]
        };
        for &(name, p) in required {
            if p == 0 {
                return Err(NsaError::arg(name, 0, "must be a device pointer"));
            }
        }
        if cfg.phi != Phi::Mean {
            for (name, p) in [("io.phi_k", io.phi_k), ("io.phi_v", io.phi_v)] {
                if p == 0 {
                    return Err(NsaError::arg(name, 0, format!("phi = {} needs weights", cfg.phi.name())));
                }
            }
        }
        // The step lifecycle: this layer runs once in this step, on the cache this backend
        // serves. A launch error below leaves the layer counted: abort the step.
        cache.claim_layer(&self.binding, layer)?;
        let p = self.params.for_layer(&cfg, &self.lay, &self.dl, self.base, &StepLayout::of(&cfg, &step), layer, io);
        let tokens = step.tokens;
        let nseqs = step.seqs.len() as u32;
        let hkv = cfg.num_kv_heads;
        let sms = self.info.multiprocessors.max(1) as u32;
        let k = self.kernels();
        let _g = CtxGuard::push(self.ctx)?;
        // Small waves run every kernel at the smallest shared-memory carve-out (the most
        // L1): H200, graph replay, paper 128/128 batch 1 42.0 -> 34.2 us at 64k, 46.3 ->
        // 38.6 at 128k; batch 2 measured slower (39.9 -> 44.9) and, with the function-wide
        // knob, batch 16 far slower (one attention block per SM): docs/DECODE_NOTES.md
        // variant 20.
        let l1 = |kernel: Kernel, rows: u32| LaunchOpts {
            carveout: (rows * hkv <= self.knobs.l1_wave_pairs && self.knobs.l1_kernels & 1 << kernel as u32 != 0).then_some(0u32),
            ..LaunchOpts::default()
        };
        // SAFETY: every pointer in `p` was checked non-null or lies in the caller's buffer;
        // grids and shared memory match the kernels' expectations.
        unsafe {
            // Appends, copies and compressed tokens (K and V sides: z), one launch: a block
            // per new row, 2 per sequence for copies, one per possible compressed token;
            // steps of APPEND_MIN_TOKENS or more by blocks of APPEND_ROWS rows and with the
            // compress blocks the shape bounds (a sequence's n new tokens finish at most
            // n / stride + 1; kernels/append.cuh). Shape-only, so a captured graph replays.
            let sides = if cfg.num_cmp_tokens(cfg.max_seq_len) > 0 { 2 } else { 1 };
            let (kernel, grid) = if tokens >= APPEND_MIN_TOKENS {
                let jobs_max = crate::plan::max_compress_jobs(&cfg, tokens, nseqs);
                debug_assert!(step.compress_jobs().count() as u32 <= jobs_max);
                (Kernel::AppendByRows, (tokens.div_ceil(APPEND_ROWS) + 2 * nseqs + jobs_max, hkv, sides))
            } else {
                (Kernel::Append, (2 * tokens + 2 * nseqs, hkv, sides))
            };
            let mut pa = p;
            if self.knobs.append_prefetch && kernel == Kernel::Append {
                pa.launch.mode |= MODE_APPEND_PREFETCH;
            }
            k.launch_with(kernel, grid, k.smem(kernel), &pa, stream, false, l1(kernel, tokens))?;
            if append_only {
                return Ok(());
            }
            // Steps with prefill chunks: two launches over tiles of positions x heads (q
            // read in 16-byte granules, so it must be 16-byte aligned).
            if let Some(pf) = self.prefill.filter(|_| super::prefill::wanted(step.seqs) && io.q % 16 == 0) {
                k.launch(Kernel::PfCmp, (pf.tiles(Kernel::PfCmp, &cfg, step.seqs), hkv, 1), &p, stream, true)?;
                // One sequence: its selected branch block-major, chunk by chunk, then the
                // window alone (unless `pf_cmp` did it: `PrefillPlan::cmp_window`).
                let sw = if let (true, [seq]) = (self.pfb_grid > 0, step.seqs) {
                    self.selected_block_major(&p, seq.new_len - seq.old_len, stream)?;
                    (!pf.cmp_window).then_some(Kernel::PfSwWindow)
                } else if pf.sel_split {
                    // G = 16 with the window in pf_cmp: the selected branch a warp per position.
                    k.launch(Kernel::PfSel, (pf.sel_tiles(step.seqs), hkv, 1), &p, stream, true)?;
                    None
                } else {
                    Some(Kernel::PfSw)
                };
                if let Some(sw) = sw {
                    k.launch(sw, (pf.tiles(Kernel::PfSw, &cfg, step.seqs), hkv, 1), &p, stream, true)?;
                }
                // Last, the (row, KV head) pairs the kernels' non-finite scans marked,
                // recomputed exactly over what they wrote (kernels/prefill_repair.cuh): a
                // block per 4 x NT_ATT marks, at most two per multiprocessor.
                k.launch(Kernel::PfRepair, ((tokens * hkv).div_ceil(4 * NT_ATT).min(2 * sms), 1, 1), &p, stream, true)?;
                return Ok(());
            }
            let (cmp, sw) = if self.mma { (Kernel::CmpMma, Kernel::SwMma) } else { (Kernel::CmpPartial, Kernel::SwPartial) };
            // A row's compressed-branch logits: the query heads x the longest sequence's
            // compressed tokens, f32 (the L2 policy's test, DecodeKnobs::l2_hint_logits).
            let longest = step.seqs.iter().map(|s| s.new_len).max().unwrap_or(0);
            let row_logits = 4 * cfg.num_q_heads as u64 * cfg.num_cmp_tokens(longest) as u64;
            let mut row0 = 0u32;
            while row0 < tokens {
                let rows = (tokens - row0).min(self.dl.wave_rows);
                // The small-wave form: deeper stages whose shared memory keeps one attention
                // block per multiprocessor (build::SmallWave has the measurements).
                let small = self.small_wave.filter(|_| rows * hkv <= self.knobs.small_wave_pairs);
                let win_in_cmp = self.mma && window_in_cmp(rows * hkv, small.is_some(), self.knobs.win_in_cmp_pairs);
                let mut pw = p;
                pw.launch = self.wave_splits(&p.launch, row0, rows, small.map_or(self.mma_per_sm, |_| 1), win_in_cmp);
                if let Some(w) = small {
                    pw.launch.nstage = w.nstage as i32;
                }
                if self.knobs.group_sums {
                    pw.launch.mode |= MODE_GROUP_SUMS;
                }
                if self.knobs.win_local {
                    pw.launch.mode |= MODE_WIN_LOCAL;
                }
                if self.knobs.sel_lists {
                    pw.launch.mode |= MODE_SEL_LISTS;
                    pw.launch.sel_chunks = pw.launch.sel_chunks.min(sel_lists_max_chunks(&cfg) as i32);
                }
                // Waves of `sel_flow_pairs` pairs or more hand each pair's compressed splits to
                // its selection blocks by a counter, so a pair's selection runs as soon as its
                // own splits end (docs/DECODE_NOTES.md, variant 76). Only `select_lists` (lists
                // and group sums) and `cmp_mma` honour the bit and must agree on it: it is set
                // for the whole wave.
                let lists = self.mma && self.knobs.sel_lists && self.knobs.group_sums;
                if lists && rows * hkv >= self.knobs.sel_flow_pairs {
                    pw.launch.mode |= MODE_SEL_FLOW;
                }
                // The same for the lists to the selected units; the window's units in `sw_mma`
                // then wait for nothing, which needs the compressed launch to trigger only
                // once its wait on the append has returned (`DecodeKnobs::sw_flow_pairs`).
                if lists && rows * hkv >= self.knobs.sw_flow_pairs && self.knobs.late_trigger & 1 << Kernel::CmpMma as u32 != 0 {
                    pw.launch.mode |= MODE_SW_FLOW;
                }
                let smem = |kernel| match kernel {
                    Kernel::CmpMma | Kernel::SwMma => small.map_or(k.smem(kernel), |w| w.smem),
                    _ => k.smem(kernel),
                };
                let hint = rows as u64 * row_logits <= self.knobs.l2_hint_logits;
                let go = |kernel: Kernel, grid: (u32, u32, u32)| {
                    let mut pk = pw;
                    if hint && self.knobs.l2_kernels & 1 << kernel as u32 != 0 {
                        pk.launch.mode |= MODE_L2_EVICT_FIRST;
                    }
                    if self.knobs.late_trigger & 1 << kernel as u32 != 0 {
                        pk.launch.mode |= MODE_LATE_TRIGGER;
                    }
                    let mut opts = l1(kernel, rows);
                    opts.large = kernel == Kernel::CmpMma && rows * hkv >= self.knobs.cmp_large_pairs;
                    if matches!(kernel, Kernel::SelectBlocks | Kernel::SelectLists) {
                        opts.threads = sel_threads(grid.0 * grid.1 * grid.2, sms, self.knobs.sel_half);
                    }
                    k.launch_with(kernel, grid, smem(kernel), &pk, stream, true, opts)
                };
                let l = &pw.launch;
                // With the window in the compressed launch, its units are the blocks past the
                // splits there (kernels/compressed.cuh) and `sw_mma` runs the selected ones.
                let (win_c, units) = if win_in_cmp { (l.units_w as u32, l.units_s as u32) } else { (0, (l.units_s + l.units_w) as u32) };
                go(cmp, (rows, hkv, l.nsplit_c as u32 + win_c))?;
                // Lists and group sums fixed at compile time where both are on (one path's code).
                let sel = if self.knobs.sel_lists && self.knobs.group_sums { Kernel::SelectLists } else { Kernel::SelectBlocks };
                go(sel, (rows, hkv, l.sel_chunks as u32))?;
                go(sw, (rows, hkv, units))?;
                let comb = if comb_vec_fits(cfg.head_dim_v, l.comb_heads as u32, self.knobs.comb_vec) { Kernel::Combine } else { Kernel::CombineScalar };
                go(comb, (rows, cfg.num_q_heads / l.comb_heads as u32, 1))?;
                row0 += rows;
            }
        }
        Ok(())
    }

    /// Blocks of one attention launch that run at once (one wave), at `mma_per_sm` blocks
    /// per multiprocessor on tensor cores.
    fn target_blocks(&self, mma_per_sm: u32) -> u32 {
        let per_sm = if self.mma { mma_per_sm } else { BLOCKS_PER_SM };
        (self.info.multiprocessors.max(1) as u32) * per_sm
    }

    /// Launch fields of one wave of `rows` query rows from `row0`: as many compressed
    /// splits as fit in one wave of blocks (the kernels give each split at least
    /// `SPLIT_MIN_KEYS` keys of the actual length); on tensor cores, selected blocks per
    /// unit (`spb`) by a wave model: waves x (keys per unit + 64 keys' worth of per-block
    /// overhead), the larger on ties. `mma_per_sm`: the tensor-core blocks per
    /// multiprocessor of this wave's launches. `win_in_cmp`: the window's units run in the
    /// compressed launch, so the model counts the selected units only.
    fn wave_splits(&self, fixed: &Launch, row0: u32, rows: u32, mma_per_sm: u32, win_in_cmp: bool) -> Launch {
        let cfg = &self.cfg;
        let mut l = *fixed;
        l.row0 = row0 as i32;
        let pairs = rows * cfg.num_kv_heads;
        let slots = self.target_blocks(mma_per_sm);
        l.nsplit_c = (self.knobs.cmp_waves * slots / pairs.max(1)).clamp(1, self.cmp_splits) as i32;
        let mut spb = 1u32;
        if self.mma {
            // The model counts the window's units without the alignment's extra keys (one
            // unit fewer than launched at some spb). Counting them as launched moved batch
            // 16 to spb = 8 and batch 64 to spb = 4 and measured slower (H200, paper
            // 128/128 at 64k: 118.5 vs 115.2 us, 321.6 vs 310.9; docs/DECODE_NOTES.md
            // variant 12), so the model stays as measured.
            let units = |spb: u32| cfg.sel_count.div_ceil(spb) + if win_in_cmp { 0 } else { cfg.window.div_ceil(cfg.sel_block * spb) };
            let cost = |spb: u32| (pairs * units(spb)).div_ceil(slots) * (spb * cfg.sel_block + 64);
            let mut c = 2 * spb;
            while c <= cfg.sel_count.next_power_of_two() {
                if cost(c) <= cost(spb) {
                    spb = c;
                }
                c *= 2;
            }
            if let Some(k) = self.knobs.spb {
                spb = spb_knob(k, cfg.sel_count);
            }
        }
        l.spb = spb as i32;
        // Combine: heads per block (see `comb_heads`).
        let vec = Some(cfg.head_dim_v).filter(|dv| self.knobs.comb_vec && dv % 4 == 0);
        l.comb_heads = comb_heads(cfg.group_size(), rows * cfg.num_q_heads, self.info.multiprocessors.max(1) as u32, vec) as i32;
        if let Some(h) = self.knobs.comb_heads.filter(|&h| h >= 1 && cfg.group_size() % h == 0) {
            l.comb_heads = h as i32;
        }
        // Selection: chunk blocks over the multiprocessors, each scoring at least
        // SEL_CHUNK_MIN blocks of the longest sequence (`sel_chunks`).
        let sms = self.info.multiprocessors.max(1) as u32;
        let max_chunks = |min_blocks: u32| cfg.max_sel_blocks().div_ceil(min_blocks).max(1);
        l.sel_chunks = match self.knobs.sel_chunks {
            // The measurement knob may go down to one sorted list of 32 blocks a chunk.
            Some(k) => k.clamp(1, max_chunks(32)),
            None => sel_chunks(sms, pairs, self.mma && self.knobs.sel_lists).min(max_chunks(SEL_CHUNK_MIN)),
        } as i32;
        l.units_s = cfg.sel_count.div_ceil(spb) as i32;
        l.units_w = window_units(cfg, spb, self.tma, self.knobs.win_local) as i32;
        l
    }

    /// The selected branch of a single-sequence prefill of `rows` new rows, block-major
    /// (kernels/prefill_blocks.cuh), in chunks of the workspace's `pfb_chunk` rows: per
    /// chunk the lists' counters zeroed, the selection inverted into lists (count, scan,
    /// fill), the partials (`pfb_attn`, a persistent grid over the items) and their merge
    /// into the output, which then holds the compressed and the selected branches.
    ///
    /// # Safety
    /// `p` is this layer's launch argument, after `pf_cmp` on the same stream.
    unsafe fn selected_block_major(&self, p: &Params, rows: u32, stream: CUstream) -> Result<()> {
        let (cfg, k) = (&self.cfg, self.kernels());
        let lists = super::workspace::pfb_lists(cfg);
        let mut pc = *p;
        let mut c0 = 0;
        // `NSA_CUDA_PFB_ROWS=N`: shorter chunks than the workspace holds (a measurement knob).
        let chunk = self.knobs.pfb_rows.map_or(self.dl.pfb_chunk, |r| r.clamp(1, self.dl.pfb_chunk));
        while c0 < rows {
            let n = (rows - c0).min(chunk);
            pc.launch.pf_c0 = c0 as i32;
            pc.launch.pf_rows = n as i32;
            let entries = n * cfg.num_kv_heads * cfg.sel_count;
            zero_u32_async(p.ws.pf_cnt, lists, stream)?;
            k.launch(Kernel::PfbCount, (entries.div_ceil(NT_WIDE), 1, 1), &pc, stream, false)?;
            k.launch(Kernel::PfbScan, (1, 1, 1), &pc, stream, true)?;
            k.launch(Kernel::PfbFill, (entries.div_ceil(NT_WIDE), 1, 1), &pc, stream, true)?;
            k.launch(Kernel::PfbAttn, (self.pfb_grid, 1, 1), &pc, stream, true)?;
            k.launch(Kernel::PfbMerge, ((n * cfg.num_q_heads * 32).div_ceil(NT_WIDE), 1, 1), &pc, stream, true)?;
            c0 += n;
        }
        Ok(())
    }

    /// See [`CudaBackend::attend_full`].
    pub(super) fn launch_full(&mut self, cache: &Cache, layer: u32, q: u64, out: u64, stream: CUstream) -> Result<()> {
        let cfg = self.cfg;
        let step = self.uploaded_step(cache, layer, "attend_full")?;
        for (name, ptr) in [("q", q), ("out", out)] {
            if ptr == 0 {
                return Err(NsaError::arg(name, 0, "must be a device pointer"));
            }
        }
        let io = DeviceLayerIo { q, out, ..Default::default() };
        let p = self.params.for_layer(&cfg, &self.lay, &self.dl, self.base, &StepLayout::of(&cfg, &step), layer, &io);
        let tokens = step.tokens;
        let hkv = cfg.num_kv_heads;
        let max_units = self.dl.nsplit_c + self.dl.units_s + self.dl.units_w;
        let full = if self.mma { Kernel::FullMma } else { Kernel::FullPartial };
        let _g = CtxGuard::push(self.ctx)?;
        let mut row0 = 0u32;
        while row0 < tokens {
            let rows = (tokens - row0).min(self.dl.wave_rows);
            let mut pw: Params = p;
            pw.launch.row0 = row0 as i32;
            let nsplit = self.target_blocks(self.mma_per_sm).div_ceil(rows * hkv).clamp(1, max_units);
            pw.launch.nsplit_c = nsplit as i32;
            pw.launch.units_s = 0;
            pw.launch.units_w = 0;
            // SAFETY: as in run_layer; `nsplit` partials per (row, head) fit the workspace
            // (at most the NSA units it was sized for).
            unsafe {
                self.kernels().launch(full, (rows, hkv, nsplit), &pw, stream, row0 > 0)?;
                self.kernels().launch(Kernel::FullCombine, (rows, cfg.num_q_heads, 1), &pw, stream, true)?;
            }
            row0 += rows;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{comb_heads, comb_vec_fits, sel_chunks, sel_threads, spb_knob, window_in_cmp, window_units};
    use crate::cuda::consts::NT_SEL;

    #[test]
    fn selection_chunks_fill_one_wave_of_half_blocks_where_full_ones_give_few() {
        // 132 multiprocessors; pairs = batch x 4 KV heads. With the lists: batch 1-8 keep one
        // wave of full blocks (33, 8, 4 chunks), batch 16 and 32 take one of half blocks.
        let lists = [4, 16, 32, 64, 128, 256, 512].map(|p| sel_chunks(132, p, true));
        assert_eq!(lists, [33, 8, 4, 4, 2, 1, 1]);
        // Without the lists (the last chunk block merges) one wave of full blocks throughout.
        let full = [4, 16, 32, 64, 128, 256, 512].map(|p| sel_chunks(132, p, false));
        assert_eq!(full, [33, 8, 4, 2, 1, 1, 1]);
        // The threshold: two full chunks (44 < pairs <= 66) double, three do not.
        assert_eq!((sel_chunks(132, 44, true), sel_chunks(132, 45, true), sel_chunks(132, 66, true)), (3, 5, 4));
    }

    #[test]
    fn selection_blocks_halve_only_past_one_wave() {
        // H200 (132 SMs): batch 1 (4 pairs x 8 chunks) and batch 16 (64 x 2) fit one wave
        // of full blocks; batch 64 (256 pairs, one chunk each) does not.
        assert_eq!(sel_threads(36, 132, None), None);
        assert_eq!(sel_threads(128, 132, None), None);
        assert_eq!(sel_threads(132, 132, None), None);
        assert_eq!(sel_threads(256, 132, None), Some(NT_SEL / 2));
        assert_eq!(sel_threads(36, 132, Some(true)), Some(NT_SEL / 2));
        assert_eq!(sel_threads(256, 132, Some(false)), None);
    }

    #[test]
    fn window_joins_the_compressed_launch_from_its_pair_count() {
        // The default (128 pairs): batch 32 and up at four KV heads, never a small wave.
        assert!(!window_in_cmp(64, false, 128));
        assert!(window_in_cmp(128, false, 128));
        assert!(window_in_cmp(256, false, 128));
        assert!(!window_in_cmp(4, true, 128));
        // `NSA_CUDA_WIN_IN_CMP=1`: every wave, small ones too; `=0` (u32::MAX): none.
        assert!(window_in_cmp(4, true, 1));
        assert!(window_in_cmp(1, false, 1));
        assert!(!window_in_cmp(256, false, u32::MAX));
    }

    #[test]
    fn window_units_cover_the_window_with_the_local_unit() {
        // Independent of the kernels' layout: count the units that cover [base, L) in spans
        // of sel_block * spb, plus the local one, at every row length, against the host's count.
        use crate::config::{Config, Preset};
        for (window, sel_local) in [(512, 2), (512, 1), (128, 2), (512, 4)] {
            let mut cfg = Config::preset(Preset::Paper);
            cfg.window = window;
            cfg.sel_local = sel_local;
            for spb in [1, 2, 4, 8, 16] {
                for tma in [false, true] {
                    let span = cfg.sel_block * spb;
                    let need = (0..4096u32)
                        .map(|t| {
                            let wlo = (t + 1).saturating_sub(window);
                            let base = if tma { wlo & !15 } else { wlo };
                            let local = (t / cfg.sel_block + 1).saturating_sub(sel_local) * cfg.sel_block;
                            assert!(local >= wlo, "the local blocks lie inside the window");
                            (local - base).div_ceil(span) + 1
                        })
                        .max()
                        .unwrap();
                    assert!(window_units(&cfg, spb, tma, true) >= need, "window {window} local {sel_local} spb {spb} tma {tma}");
                    // Never more than one unit beyond the plain layout's.
                    assert!(window_units(&cfg, spb, tma, true) <= window_units(&cfg, spb, tma, false) + 1);
                }
            }
        }
    }

    #[test]
    fn spb_knob_is_a_power_of_two_in_range() {
        assert_eq!(spb_knob(0, 16), 1);
        assert_eq!(spb_knob(1, 16), 1);
        assert_eq!(spb_knob(3, 16), 2);
        assert_eq!(spb_knob(4, 16), 4);
        assert_eq!(spb_knob(100, 16), 16);
        // sel_count 12: up to 16, as the wave model (a unit past the count is partial).
        assert_eq!(spb_knob(100, 12), 16);
        assert_eq!(spb_knob(9, 12), 8);
    }

    /// The H200's 132 multiprocessors, 64 query heads per row in groups of 16, DV = 128.
    #[test]
    fn comb_heads_fill_blocks_without_a_short_wave() {
        let pick = |rows: u32, vec: bool| comb_heads(16, rows * 64, 132, vec.then_some(128));
        // A column per thread: two blocks per multiprocessor.
        assert_eq!([1, 4, 8, 16, 32, 64].map(|b| pick(b, false)), [1, 1, 1, 2, 4, 8]);
        // 4 columns per load: at most 8 heads (256 threads x 4 columns / 128), 198 blocks.
        assert_eq!([1, 4, 8, 16, 32, 64, 256].map(|b| pick(b, true)), [1, 1, 2, 4, 8, 8, 8]);
        // Odd shapes: a group of 3 (only 1 and 3 divide it), DV = 512 (two heads' groups
        // fill the block), a single row of 16 heads.
        assert_eq!(comb_heads(3, 3 * 1000, 132, Some(128)), 3);
        assert_eq!(comb_heads(16, 64 * 64, 132, Some(512)), 2);
        assert_eq!(comb_heads(16, 16, 132, Some(128)), 1);
    }

    /// The combine's entry: 4 columns per load where DV allows it and either the knob is on
    /// or a block's columns are fewer than its 256 threads.
    #[test]
    fn comb_vec_fits_follows_dv_and_the_knob() {
        assert!(comb_vec_fits(128, 1, false));
        assert!(!comb_vec_fits(128, 2, false), "256 columns: a column per thread");
        assert!(comb_vec_fits(128, 8, true));
        assert!(!comb_vec_fits(24 + 2, 1, true), "DV not a multiple of 4");
        assert!(comb_vec_fits(24, 1, true));
    }
}
