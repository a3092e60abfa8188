//! The per-step upload: the planned step (`crate::plan::Step`: its sequences, copies,
//! token rows, compress jobs and page tables) written into a page-locked staging buffer
//! in the device workspace's layout, then copied to the device on the caller's stream.
//! This file only lays the plan out; what the step is (which rows, which compressed
//! tokens complete) is the plan's.

use super::driver::{self, CtxGuard, CUstream};
use super::params::StepHeader;
use super::staging::issue_copies;
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
        let dl = self.dl;
        // Offsets below are relative to the start of the uploaded range (`meta`).
        let m0 = dl.meta.off;
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let _g = CtxGuard::push(self.ctx)?;
        let staging = self.staging.as_mut().expect("staging lives until drop");
        let st = staging.next()?;
        put(st, dl.meta.off + dl.plan_off - m0, step.seqs);
        put(st, dl.meta.off + dl.copies_off - m0, step.copies);
        let mut rows = 0usize;
        for t in step.token_rows() {
            put(st, dl.rows.off - m0 + t.row as usize * 8, &[[t.seq_index as i32, t.pos as i32]]);
            rows += 1;
        }
        let mut jobs = 0usize;
        for (i, j) in step.compress_jobs().enumerate() {
            put(st, dl.jobs.off - m0 + i * 8, &[[j.seq_index as i32, j.cmp_token as i32]]);
            jobs += 1;
        }
        for (si, ps) in step.seqs.iter().enumerate() {
            put(st, dl.raw_tab.off - m0 + si * pps * 4, step.raw_table(ps.seq));
            put(st, dl.cmp_tab.off - m0 + si * cpps * 4, step.cmp_table(ps.seq));
        }
        let header = StepHeader { seqs: step.seqs.len() as i32, tokens: step.tokens as i32, copies: step.copies.len() as i32, jobs: jobs as i32 };
        put(st, 0, &[header]);
        debug_assert_eq!(rows, step.tokens as usize);
        let nseqs = step.seqs.len();
        let regions = [
            (dl.meta.off, dl.meta.bytes),
            (dl.rows.off, rows * 8),
            (dl.jobs.off, jobs * 8),
            (dl.raw_tab.off, nseqs * pps * 4),
            (dl.cmp_tab.off, nseqs * cpps * 4),
        ];
        self.uploaded = None;
        let (base, src) = (self.base, staging.current());
        // Even when a copy fails to enqueue, the buffer is reused only after the copies
        // already enqueued ran (`issue_copies`).
        issue_copies(
            staging,
            stream,
            regions.len(),
            |i| {
                let (off, n) = regions[i];
                // SAFETY: every region lies inside the caller's buffer (checked at creation)
                // and inside the staging mirror, which stays untouched until these copies ran.
                unsafe { driver::htod(base + off as u64, src.add(off - m0).cast(), n, stream) }
            },
        )?;
        self.uploaded = Some((cache.id(), cache.step_id()));
        Ok(())
    }
}
