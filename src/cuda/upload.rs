//! The per-step upload: the planned step (`crate::plan::Step`: its sequences, copies,
//! token rows, compress jobs and page tables) written into a page-locked staging buffer
//! in the device workspace's layout, then copied to the device on the caller's stream.
//! This file only lays the plan out; what the step is (which rows, which compressed
//! tokens complete) is the plan's.

use super::driver::{self, CtxGuard, CUstream};
use super::params::StepHeader;
use super::staging::issue_copies;
use super::step_layout::StepLayout;
use super::table_shadow::MAX_RUNS;
use super::CudaBackend;
use crate::cache::Cache;
use crate::config::Config;
use crate::error::{NsaError, Result};
use crate::layout::{PageCopy, PlanSeq};
use crate::plan::Step;

/// Plain `#[repr(C)]` values of 4-byte integers, copied byte for byte into the staging.
trait Pod: Copy {}
impl Pod for StepHeader {}
impl Pod for PlanSeq {}
impl Pod for PageCopy {}
impl Pod for [i32; 2] {}
impl Pod for i32 {}

/// Writes `xs` at byte `off` of `st`.
fn put<T: Pod>(st: &mut [u8], off: usize, xs: &[T]) {
    // SAFETY: the Pod types are repr(C) structs (or arrays) of 4-byte integers with no
    // padding: every byte is initialised; the view covers exactly `xs`.
    let bytes = unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) };
    st[off..off + bytes.len()].copy_from_slice(bytes);
}

/// Writes the step region's head into `st` (its staging mirror, `StepLayout::max` bytes) as
/// the kernels read it, at `sl` (the step's layout, `StepLayout::new`): the header,
/// sequences, copies, token rows and compress jobs. Returns the number of compress jobs.
fn pack_head(step: &Step, sl: &StepLayout, st: &mut [u8]) -> usize {
    let nseqs = step.seqs.len();
    put(st, sl.seqs, step.seqs);
    put(st, sl.copies, step.copies);
    let mut rows = 0usize;
    for t in step.token_rows() {
        put(st, sl.rows + t.row as usize * 8, &[[t.seq_index as i32, t.pos as i32]]);
        rows += 1;
    }
    let mut jobs = 0usize;
    for (i, j) in step.compress_jobs().enumerate() {
        put(st, sl.jobs + i * 8, &[[j.seq_index as i32, j.cmp_token as i32]]);
        jobs += 1;
    }
    let header = StepHeader { seqs: nseqs as i32, tokens: step.tokens as i32, copies: step.copies.len() as i32, jobs: jobs as i32 };
    put(st, 0, &[header]);
    debug_assert_eq!(rows, step.tokens as usize);
    jobs
}

/// The step's page tables at `sl`: indexed by the step's sequence index, `pages_per_seq`
/// (kernels' `Paging::pages_per_seq`) and `cmp_pages_per_seq` entries apart.
fn pack_tables(step: &Step, cfg: &Config, sl: &StepLayout, st: &mut [u8]) {
    let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
    for (si, ps) in step.seqs.iter().enumerate() {
        put(st, sl.raw_tab + si * pps * 4, step.raw_table(ps.seq));
        put(st, sl.cmp_tab + si * cpps * 4, step.cmp_table(ps.seq));
    }
}

impl CudaBackend {
    /// See [`CudaBackend::upload_step`].
    pub(super) fn upload(&mut self, cache: &Cache, stream: CUstream) -> Result<()> {
        if cache.config() != &self.cfg {
            return Err(NsaError::arg("cache", "config", "the cache was made with a different config than the backend"));
        }
        self.binding.check(cache)?;
        let step = cache.step()?;
        let _g = CtxGuard::push(self.ctx)?;
        let cfg = &self.cfg;
        let staging = self.staging.as_mut().expect("staging lives until drop");
        let sl = StepLayout::of(cfg, &step);
        debug_assert!(sl.end <= self.dl.step.bytes);
        // The region's tables grew only (table_shadow.rs): the head and each run of new
        // entries, else the whole step (one copy for a decode step, two when a long chunk
        // leaves many job slots unused).
        let epoch = cache.tables_epoch();
        let patch = if self.knobs.full_tables { None } else { self.tables.runs(cfg, cache.id(), epoch, &step, &sl) };
        let st = staging.next()?;
        let mut ranges = [(0usize, 0usize); 1 + MAX_RUNS];
        let n = match &patch {
            Some((runs, nr)) => {
                let jobs = pack_head(&step, &sl, st);
                ranges[0] = (0, sl.jobs + jobs * 8);
                for (i, r) in runs[..*nr].iter().enumerate() {
                    put(st, r.off, r.entries(&step));
                    ranges[1 + i] = (r.off, r.len * 4);
                }
                1 + nr
            }
            None => {
                let jobs = pack_head(&step, &sl, st);
                pack_tables(&step, cfg, &sl, st);
                let (r, n) = sl.copy_ranges(jobs);
                ranges[..n].copy_from_slice(&r[..n]);
                n
            }
        };
        self.uploaded = None;
        let (dst, src) = (self.base + self.dl.step.off as u64, staging.current());
        // Even when a copy fails to enqueue, the buffer is reused only after the copies
        // already enqueued ran (`issue_copies`).
        let copied = issue_copies(
            staging,
            stream,
            n,
            |i| {
                let (off, bytes) = ranges[i];
                // SAFETY: the range lies inside the step region of the caller's buffer
                // (checked at creation; `sl` is within `StepLayout::max`) and inside the
                // staging mirror, which stays untouched until these copies ran.
                unsafe { driver::htod(dst + off as u64, src.add(off).cast(), bytes, stream) }
            },
        );
        // A copy that failed to enqueue may leave the region's tables half written.
        match (copied, patch) {
            (Err(e), _) => {
                self.tables.forget();
                return Err(e);
            }
            (Ok(()), Some((runs, nr))) => self.tables.uploaded_runs(&runs[..nr]),
            (Ok(()), None) => self.tables.uploaded_all(cfg, cache.id(), epoch, &step, &sl),
        }
        self.uploaded = Some((cache.id(), cache.step_id()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;
    use crate::host_buf::HostBuf;
    use crate::plan::StepSeq;

    /// The whole step as a full upload writes it (`pack_head`, `pack_tables`); returns the
    /// layout and the number of compress jobs.
    fn pack(step: &Step, cfg: &Config, st: &mut [u8]) -> (StepLayout, usize) {
        let sl = StepLayout::of(cfg, step);
        let jobs = pack_head(step, &sl, st);
        pack_tables(step, cfg, &sl, st);
        (sl, jobs)
    }

    fn i32s(b: &[u8], off: usize, n: usize) -> Vec<i32> {
        (0..n).map(|i| i32::from_ne_bytes(b[off + 4 * i..off + 4 * i + 4].try_into().unwrap())).collect()
    }

    /// Unpacks what `pack` wrote, at the offsets and in the entry layouts the kernels read
    /// (kernels/common.cuh: StepHeader, PlanSeq, PageCopy, int2 rows and jobs, i32 tables),
    /// and compares every entry with the plan's own accessors.
    fn check(step: &Step, cfg: &Config) {
        let max = StepLayout::max(cfg);
        let mut st = vec![0xA5u8; max.end];
        let (sl, jobs) = pack(step, cfg, &mut st);
        assert_eq!(sl, StepLayout::new(cfg, step.seqs.len(), step.tokens as usize, step.copies.len()));
        assert!(sl.end <= max.end);
        let h = i32s(&st, 0, 4);
        assert_eq!(h, vec![step.seqs.len() as i32, step.tokens as i32, step.copies.len() as i32, jobs as i32]);
        for (si, ps) in step.seqs.iter().enumerate() {
            let e = i32s(&st, sl.seqs + si * 16, 4);
            assert_eq!(e, vec![ps.seq as i32, ps.old_len as i32, ps.new_len as i32, ps.row as i32]);
            let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
            assert_eq!(i32s(&st, sl.raw_tab + si * pps * 4, pps), step.raw_table(ps.seq));
            assert_eq!(i32s(&st, sl.cmp_tab + si * cpps * 4, cpps), step.cmp_table(ps.seq));
        }
        for t in step.token_rows() {
            assert_eq!(i32s(&st, sl.rows + t.row as usize * 8, 2), vec![t.seq_index as i32, t.pos as i32]);
        }
        let want: Vec<_> = step.compress_jobs().map(|j| vec![j.seq_index as i32, j.cmp_token as i32]).collect();
        assert_eq!(want.len(), jobs);
        for (i, w) in want.iter().enumerate() {
            assert_eq!(&i32s(&st, sl.jobs + i * 8, 2), w);
        }
        for (i, c) in step.copies.iter().enumerate() {
            assert_eq!(i32s(&st, sl.copies + i * 16, 4), vec![c.pool as i32, c.src as i32, c.dst as i32, c.rows as i32]);
        }
        // The copied ranges cover every byte written.
        let (ranges, n) = sl.copy_ranges(jobs);
        let covered = |a: usize, b: usize| ranges[..n].iter().any(|&(o, len)| o <= a && b <= o + len);
        assert!(covered(0, sl.jobs + jobs * 8) && covered(sl.raw_tab, sl.end), "{ranges:?}");
    }

    #[test]
    fn packed_step_reads_back_as_planned() {
        let cfg = Config::preset(Preset::Paper).with_shape(8, 2, 32, 32).with_capacity(4, 2048);
        let mut arena = HostBuf::new(Cache::arena_bytes(&cfg).unwrap());
        let mut cache = Cache::new(&cfg, arena.bytes()).unwrap();
        for s in [0, 2] {
            cache.add_sequence(s).unwrap();
        }
        let run_all = |cache: &Cache| (0..cfg.num_layers).for_each(|l| cache.mark_layer_run(l).unwrap());
        // A prefill step: chunks of different lengths, compressed tokens completing.
        cache.plan_step(&[StepSeq { seq: 0, tokens: 300 }, StepSeq { seq: 2, tokens: 77 }]).unwrap();
        check(&cache.step().unwrap(), &cfg);
        run_all(&cache);
        // Fork mid-page, then a decode step of both holders: copy-on-write copies.
        cache.fork(0, 1).unwrap();
        cache.plan_step(&[StepSeq { seq: 0, tokens: 1 }, StepSeq { seq: 1, tokens: 1 }, StepSeq { seq: 2, tokens: 1 }]).unwrap();
        let step = cache.step().unwrap();
        assert!(!step.copies.is_empty(), "the fork's shared tail page is copied");
        check(&step, &cfg);
    }
}
