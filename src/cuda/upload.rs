//! The per-step upload: the planned step (`crate::plan::Step`: its sequences, copies,
//! token rows, compress jobs and page tables) written into a page-locked staging buffer
//! in the device workspace's layout, then copied to the device on the caller's stream.
//! This file only lays the plan out; what the step is (which rows, which compressed
//! tokens complete) is the plan's.

use super::driver::{self, CtxGuard, CUstream};
use super::params::StepHeader;
use super::staging::issue_copies;
use super::step_layout::StepLayout;
use super::CudaBackend;
use crate::cache::Cache;
use crate::error::{NsaError, Result};
use crate::layout::{PageCopy, PlanSeq};

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

impl CudaBackend {
    /// See [`CudaBackend::upload_step`].
    pub(super) fn upload(&mut self, cache: &Cache, stream: CUstream) -> Result<()> {
        if cache.config() != &self.cfg {
            return Err(NsaError::arg("cache", "config", "the cache was made with a different config than the backend"));
        }
        self.binding.check(cache)?;
        let step = cache.step()?;
        let cfg = &self.cfg;
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let nseqs = step.seqs.len();
        // Packed by the step's shape (`step_layout.rs`); offsets from the step region.
        let sl = StepLayout::new(cfg, nseqs, step.tokens as usize, step.copies.len());
        let _g = CtxGuard::push(self.ctx)?;
        let staging = self.staging.as_mut().expect("staging lives until drop");
        let st = staging.next()?;
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
        for (si, ps) in step.seqs.iter().enumerate() {
            put(st, sl.raw_tab + si * pps * 4, step.raw_table(ps.seq));
            put(st, sl.cmp_tab + si * cpps * 4, step.cmp_table(ps.seq));
        }
        let header = StepHeader { seqs: nseqs as i32, tokens: step.tokens as i32, copies: step.copies.len() as i32, jobs: jobs as i32 };
        put(st, 0, &[header]);
        debug_assert_eq!(rows, step.tokens as usize);
        debug_assert!(sl.end <= self.dl.step.bytes);
        // One copy for a decode step (two when a long chunk leaves many job slots unused).
        let (ranges, n) = sl.copy_ranges(jobs);
        self.uploaded = None;
        let (dst, src) = (self.base + self.dl.step.off as u64, staging.current());
        // Even when a copy fails to enqueue, the buffer is reused only after the copies
        // already enqueued ran (`issue_copies`).
        issue_copies(
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
        )?;
        self.step_layout = sl;
        self.uploaded = Some((cache.id(), cache.step_id()));
        Ok(())
    }
}
