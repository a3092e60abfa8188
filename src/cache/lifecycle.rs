//! The step lifecycle, enforced by the cache for every backend.
//!
//! `plan_step` opens a step. Each layer run claims its layer once ([`Cache::claim_layer`],
//! the first thing a backend's layer run does after checking its arguments); the step is
//! complete when every layer has run, in any order. While a step is open (planned, not
//! complete), every other mutating call (add, fork, truncate, remove, plan_step) refuses
//! with [`NsaError::StepOpen`], naming the step and the layers not yet run: positions the
//! plan counted are never left unwritten behind a caller's back. [`Cache::abort_step`]
//! undoes an open (or complete) step exactly: lengths, page tables, refcounts and free
//! stacks are byte for byte what they were before `plan_step`.
//!
//! The claims live in the arena's `step_layers` words and are updated atomically through
//! `&Cache`, so layers of one cache may run concurrently on different backends/threads.

use std::fmt::Write;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::Cache;
use crate::error::{NsaError, Result};
use crate::layout::{POOL_CMP, POOL_RAW};
use crate::plan::Step;

/// Source of cache identities: unique within the process, never 0.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(super) fn fresh_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// What a backend knows of its part in the step lifecycle: the cache it serves and the
/// layers it has run in that cache's current step.
///
/// A backend's pools hold the K/V of one cache's pages: it is bound to the first cache
/// whose layer it runs and refuses any other afterwards (two caches on one backend would
/// write their pages into the same pool memory). It runs each layer once per step; the
/// cache counts a layer as run when any backend serving it ran it (a host may mirror a
/// cache on a second backend, as the GPU tests do with the CPU backend; each backend
/// must then run every layer).
///
/// Atomic, so that a layer run over a shared backend (the CPU backend's host-thread parts,
/// where one part claims the layer while the others check it) reads it safely; the claims
/// themselves never race (one whole-layer run per backend at a time, one claiming part).
#[derive(Debug, Default)]
pub struct CacheBinding {
    /// `Cache::id` of the cache served, 0 before the first layer run.
    cache: AtomicU64,
    /// The cache's step the bits below belong to.
    step: AtomicU32,
    /// One bit per layer run in that step (allocated once, at the backend's creation).
    ran: Vec<AtomicU64>,
}

impl CacheBinding {
    /// For a backend of `cfg` (one bit per layer).
    pub fn new(cfg: &crate::config::Config) -> CacheBinding {
        CacheBinding { cache: AtomicU64::new(0), step: AtomicU32::new(0), ran: (0..cfg.num_layers.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Fails unless the backend is unbound or bound to `cache`.
    pub fn check(&self, cache: &Cache) -> Result<()> {
        let served = self.cache.load(Ordering::Acquire);
        if served != 0 && served != cache.id() {
            return Err(NsaError::arg(
                "cache",
                format!("cache #{}", cache.id()),
                format!(
                    "this backend serves cache #{} (bound at its first layer run) and its pools hold that cache's pages; \
                     create another backend for this cache",
                    served
                ),
            ));
        }
        Ok(())
    }

    /// Whether this backend ran `layer` in step `step` of the cache it serves.
    fn ran(&self, step: u32, layer: u32) -> bool {
        self.step.load(Ordering::Acquire) == step
            && self.ran.get((layer / 64) as usize).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (layer % 64)) != 0)
    }

    /// Records a run of `layer` in step `step` of cache `cache`.
    fn record(&self, cache: u64, step: u32, layer: u32) {
        if (self.cache.load(Ordering::Acquire), self.step.load(Ordering::Acquire)) != (cache, step) {
            self.ran.iter().for_each(|w| w.store(0, Ordering::Release));
        }
        self.cache.store(cache, Ordering::Release);
        self.step.store(step, Ordering::Release);
        if let Some(w) = self.ran.get((layer / 64) as usize) {
            w.fetch_or(1 << (layer % 64), Ordering::AcqRel);
        }
    }
}

impl Cache<'_> {
    /// This cache's identity (unique within the process), which backends bind to.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Number of the latest planned step (1 for the first; never reused while the cache
    /// lives, up to wrap-around after 2^32 plans): what a backend that copies the plan
    /// elsewhere (CUDA's `upload_step`) compares to know its copy is current.
    pub fn step_id(&self) -> u32 {
        self.view().hdr.step_id
    }

    /// Layers of the planned step that have run (0 when no step is planned).
    pub fn layers_run(&self) -> u32 {
        if self.view().hdr.step_valid == 0 {
            return 0;
        }
        self.arena.step_layers()[0].load(Ordering::Acquire)
    }

    /// Whether `backend` ran `layer` in the planned step (so its pools hold the rows).
    pub fn ran_on(&self, backend: &CacheBinding, layer: u32) -> bool {
        self.view().hdr.step_valid != 0 && backend.cache.load(Ordering::Acquire) == self.id && backend.ran(self.view().hdr.step_id, layer)
    }

    /// Whether `layer` has run in the planned step (on any backend).
    pub fn layer_ran(&self, layer: u32) -> bool {
        let w = &self.arena.step_layers()[1..];
        self.view().hdr.step_valid != 0
            && layer < self.cfg.num_layers
            && w[(layer / 32) as usize].load(Ordering::Acquire) & (1 << (layer % 32)) != 0
    }

    /// Whether a step is planned and some layer has not run yet.
    pub fn step_open(&self) -> bool {
        self.view().hdr.step_valid != 0 && self.layers_run() < self.cfg.num_layers
    }

    /// `StepOpen` while a step is open: what every mutating call checks first.
    pub(crate) fn refuse_open_step(&self) -> Result<()> {
        if !self.step_open() {
            return Ok(());
        }
        let v = self.view();
        let missing: Vec<u32> = (0..self.cfg.num_layers).filter(|&l| !self.layer_ran(l)).collect();
        let mut m = String::new();
        let _ = write!(m, "layer{} ", if missing.len() == 1 { "" } else { "s" });
        for (i, l) in missing.iter().take(8).enumerate() {
            let _ = write!(m, "{}{l}", if i > 0 { ", " } else { "" });
        }
        if missing.len() > 8 {
            let _ = write!(m, ", ... ({} in all)", missing.len());
        }
        let _ = write!(m, " of 0..{} {} not run, so positions ", self.cfg.num_layers, if missing.len() == 1 { "has" } else { "have" });
        let seqs = &v.plan_seqs[..v.hdr.step_seqs as usize];
        for (i, s) in seqs.iter().take(4).enumerate() {
            let _ = write!(m, "{}{}..{} of sequence {}", if i > 0 { ", " } else { "" }, s.old_len, s.new_len, s.seq);
        }
        if seqs.len() > 4 {
            let _ = write!(m, ", ... ({} sequences)", seqs.len());
        }
        m.push_str(" are counted but not written");
        Err(NsaError::StepOpen { step: v.hdr.step_id, missing: m })
    }

    /// Clears the claims: called when a step is planned or dropped.
    fn reset_claims(&self) {
        for w in self.arena.step_layers() {
            w.store(0, Ordering::Release);
        }
    }

    /// Opens the step just planned (numbering it) with no layer run.
    pub(crate) fn open_step(&mut self) {
        self.reset_claims();
        let p = self.split();
        *p.step_id = p.step_id.wrapping_add(1);
        *p.step_valid = 1;
    }

    /// Drops the plan (an add/fork/truncate/remove after a complete step). Every operation
    /// that changes a page table other than by `plan_step`'s growth (fork, truncate,
    /// remove, import, abort) ends the step here, so this is also where `tables_epoch` moves.
    pub(crate) fn end_step(&mut self) {
        self.reset_claims();
        *self.split().step_valid = 0;
        self.tables_epoch = self.tables_epoch.wrapping_add(1);
    }

    /// A number that stays the same from one step to the next while the page tables change
    /// only by `plan_step`'s growth: new pages past a sequence's last, and copy-on-write
    /// copies, which the step lists (`Step::copies`). A backend that keeps a copy of the
    /// tables (CUDA's upload) compares it to know whether uploading the new entries is
    /// enough. Not persistent: a cache made again over the same arena has another `id`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // read by the CUDA upload only
    pub(crate) fn tables_epoch(&self) -> u64 {
        self.tables_epoch
    }

    /// Claims `layer` of the planned step for one layer run by `backend`, binding it to
    /// this cache: the one call a backend's layer run makes into the cache, after checking
    /// its own arguments and before writing anything. Returns the step to run.
    ///
    /// Fails, changing nothing, when the backend serves another cache, no step is planned,
    /// `layer` is out of range, or this backend already ran `layer` in this step.
    pub fn claim_layer(&self, backend: &CacheBinding, layer: u32) -> Result<Step<'_>> {
        backend.check(self)?;
        let step = self.step()?;
        if layer >= self.cfg.num_layers {
            return Err(NsaError::arg("layer", layer, format!("layers are 0..{}", self.cfg.num_layers)));
        }
        let id = self.view().hdr.step_id;
        if backend.cache.load(Ordering::Acquire) == self.id && backend.ran(id, layer) {
            return Err(NsaError::LayerAlreadyRun { layer, step: id });
        }
        self.count_layer(layer);
        backend.record(self.id, id, layer);
        Ok(step)
    }

    /// Counts `layer` as run in the planned step without a backend's layer run: for a host
    /// that replays a captured layer (a CUDA graph of `run_layer`), which does not call
    /// into the cache. Nothing changes when the layer already counts as run (another
    /// backend mirroring the cache ran it). Fails, changing nothing, when no step is
    /// planned or `layer` is out of range.
    pub fn mark_layer_run(&self, layer: u32) -> Result<()> {
        self.step()?;
        if layer >= self.cfg.num_layers {
            return Err(NsaError::arg("layer", layer, format!("layers are 0..{}", self.cfg.num_layers)));
        }
        self.count_layer(layer);
        Ok(())
    }

    /// Sets `layer`'s bit; counts it when no run set it before.
    fn count_layer(&self, layer: u32) {
        let words = self.arena.step_layers();
        let bit = 1u32 << (layer % 32);
        if words[1 + (layer / 32) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            words[0].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Undoes the planned step, whether or not its layers ran: every sequence of the step
    /// gets back its length, page tables and compressed tokens, pages the plan took return
    /// to the free stacks in reverse order, and copy-on-write sources go back to being
    /// shared (the step never wrote them), so [`Cache::bookkeeping`] is what it was before
    /// `plan_step`.
    /// No step is planned afterwards. K/V rows the layers wrote past the old lengths are
    /// simply no longer part of any sequence.
    ///
    /// Fails with `NoStep`, changing nothing, when no step is planned (none was, or a
    /// later add/fork/truncate/remove ended a complete one).
    pub fn abort_step(&mut self) -> Result<()> {
        self.step()?;
        let cfg = self.cfg;
        let p = cfg.page_size;
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let mut sp = self.split();
        let mut ncopies = *sp.step_copies as usize;
        // Exactly the reverse of plan_step's commit, so that every page pushed back lands
        // where it was popped from. Last in the plan: each copy's source lost a holder
        // (and went to the free stack when it was the last).
        for c in sp.plan_copies[..ncopies].iter().rev() {
            let pool = if c.pool == POOL_RAW { &mut sp.raw } else { &mut sp.cmp };
            pool.unrelease(c.src);
        }
        for i in (0..*sp.step_seqs as usize).rev() {
            let ps = sp.plan_seqs[i];
            let s = ps.seq as usize;
            let (old, new) = (ps.old_len, ps.new_len);
            let (cold, cnew) = (cfg.num_cmp_tokens(old), cfg.num_cmp_tokens(new));
            for (pool_id, before, after, pool, tables, per) in [
                (POOL_CMP, cold, cnew, &mut sp.cmp, &mut *sp.cmp_tables, cpps),
                (POOL_RAW, old, new, &mut sp.raw, &mut *sp.raw_tables, pps),
            ] {
                if after == before {
                    continue;
                }
                let table = &mut tables[s * per..][..per];
                for slot in table[before.div_ceil(p) as usize..after.div_ceil(p) as usize].iter_mut().rev() {
                    pool.release(*slot as u32);
                    *slot = -1;
                }
                if before % p != 0 && ncopies > 0 {
                    let c = sp.plan_copies[ncopies - 1];
                    let idx = (before / p) as usize;
                    if c.pool == pool_id && table[idx] == c.dst as i32 {
                        // The plan took `dst` for this sequence's copy of `src`.
                        pool.release(c.dst);
                        table[idx] = c.src as i32;
                        ncopies -= 1;
                    }
                }
            }
            sp.seqs[s].len = old;
        }
        debug_assert_eq!(ncopies, 0, "abort_step: copy-on-write copies left unmatched");
        self.end_step();
        Ok(())
    }

    /// The invariants, then the lifecycle: `Corrupt` when the bookkeeping is inconsistent,
    /// `StepOpen` when a planned step has positions counted that some layer has not
    /// written yet.
    pub fn check(&self) -> Result<()> {
        self.check_invariants().map_err(NsaError::Corrupt)?;
        self.refuse_open_step()
    }
}
