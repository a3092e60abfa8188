//! Per-step planning: which sequences append how many tokens, which pages they need,
//! which shared pages must be copied first (copy-on-write). Planning is host-side
//! bookkeeping done once per step; every layer then runs against the same plan.
//!
//! The plan lives in the arena's staging regions (no allocation). A plan is all or
//! nothing: arguments are checked and pages counted exactly before the first write.

use crate::cache::Cache;
use crate::config::Config;
use crate::error::{NsaError, Result};
use crate::layout::{PageCopy, PlanSeq, POOL_CMP, POOL_RAW};

/// One sequence's part of a step: append `tokens` new tokens (1 for decode, more for a
/// prefill chunk). Its rows in the step's q/k/v/out arrays follow the previous entry's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct StepSeq {
    pub seq: u32,
    pub tokens: u32,
}

/// Read-only view of the planned step, for the backends.
#[derive(Clone, Copy)]
pub struct Step<'c> {
    pub(crate) cfg: &'c Config,
    /// The step's sequences in order.
    pub seqs: &'c [PlanSeq],
    /// Copy-on-write copies to perform (every layer) before appending.
    pub copies: &'c [PageCopy],
    /// Total new tokens (rows of q/k/v/out).
    pub tokens: u32,
    pub(crate) raw_tables: &'c [i32],
    pub(crate) cmp_tables: &'c [i32],
}

/// One new token of the step: row `row` of the step's q/k/v/out arrays is position
/// `pos` of the step's `seq_index`-th sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRow {
    pub row: u32,
    pub seq_index: u32,
    pub pos: u32,
}

/// One compressed token the step completes: compressed token `cmp_token` of the step's
/// `seq_index`-th sequence (it covers positions `cmp_token * cmp_stride ..+ cmp_block`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressJob {
    pub seq_index: u32,
    pub cmp_token: u32,
}

/// The compressed tokens a sequence growing from `old_len` to `new_len` completes: those
/// whose last position is now present (the completion rule, `Config::num_cmp_tokens`).
pub fn completed_cmp_tokens(cfg: &Config, old_len: u32, new_len: u32) -> std::ops::Range<u32> {
    cfg.num_cmp_tokens(old_len)..cfg.num_cmp_tokens(new_len)
}

/// The most compressed tokens a step of `tokens` new tokens over `seqs` sequences can
/// complete, from the shape alone (a captured CUDA graph replays one launch grid for any
/// lengths): a sequence's n new tokens complete at most n / stride + 1, one each time the
/// length passes l + k * stride.
pub fn max_compress_jobs(cfg: &Config, tokens: u32, seqs: u32) -> u32 {
    if cfg.num_cmp_tokens(cfg.max_seq_len) == 0 {
        0
    } else {
        tokens / cfg.cmp_stride + seqs
    }
}

impl<'c> Step<'c> {
    /// The compressed tokens step sequence `ps` completes.
    pub fn completed(&self, ps: &PlanSeq) -> std::ops::Range<u32> {
        completed_cmp_tokens(self.cfg, ps.old_len, ps.new_len)
    }

    /// Every new token, in row order (sequences in plan order, positions ascending).
    pub fn token_rows(&self) -> impl Iterator<Item = TokenRow> + 'c {
        self.seqs.iter().enumerate().flat_map(|(si, ps)| {
            (ps.old_len..ps.new_len).map(move |pos| TokenRow { row: ps.row + pos - ps.old_len, seq_index: si as u32, pos })
        })
    }

    /// Every compressed token the step completes (sequences in plan order, tokens ascending).
    pub fn compress_jobs(&self) -> impl Iterator<Item = CompressJob> + 'c {
        let cfg = self.cfg;
        self.seqs.iter().enumerate().flat_map(move |(si, ps)| {
            completed_cmp_tokens(cfg, ps.old_len, ps.new_len).map(move |cmp_token| CompressJob { seq_index: si as u32, cmp_token })
        })
    }

    /// Raw page table of a step sequence (covers `new_len`).
    pub fn raw_table(&self, seq: u32) -> &'c [i32] {
        let pps = self.cfg.pages_per_seq() as usize;
        &self.raw_tables[seq as usize * pps..][..pps]
    }

    /// Compressed page table of a step sequence.
    pub fn cmp_table(&self, seq: u32) -> &'c [i32] {
        let cpps = self.cfg.cmp_pages_per_seq() as usize;
        &self.cmp_tables[seq as usize * cpps..][..cpps]
    }
}

/// Pages one entry adds to a pool, given the live rows before and after.
fn new_pages(before: u32, after: u32, p: u32) -> u32 {
    after.div_ceil(p) - before.div_ceil(p)
}

impl Cache<'_> {
    /// Plans a step: every entry's sequence grows by `tokens`. On success the lengths,
    /// page tables and pools already reflect the step, and the step is open: every layer
    /// must then run exactly once, in any order (the layer runs write the K/V rows of the
    /// new positions), or [`Cache::abort_step`] undo it. While it is open, add, fork,
    /// truncate, remove and plan_step refuse with `StepOpen`.
    ///
    /// Fails, changing nothing, on: an open step (`StepOpen`); no entries or more than `max_step_seqs`; an id out of
    /// range, not live, or listed twice; `tokens == 0`; a length past `max_seq_len`; more
    /// than `max_step_tokens` tokens in all; not enough free raw or compressed pages.
    pub fn plan_step(&mut self, entries: &[StepSeq]) -> Result<()> {
        self.refuse_open_step()?;
        let cfg = *self.config();
        let p = cfg.page_size;
        if entries.is_empty() || entries.len() > cfg.max_step_seqs as usize {
            return Err(NsaError::arg(
                "entries.len",
                entries.len(),
                format!("a step has 1..={} sequences (max_step_seqs)", cfg.max_step_seqs),
            ));
        }
        let v = self.view();
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let mut total: u64 = 0;
        let (mut raw_need, mut cmp_need) = (0u32, 0u32);
        for (i, e) in entries.iter().enumerate() {
            if e.seq >= cfg.max_seqs {
                return Err(NsaError::arg("entries[].seq", e.seq, format!("sequence ids are 0..{}", cfg.max_seqs)));
            }
            if v.seqs[e.seq as usize].active == 0 {
                return Err(NsaError::UnknownSequence { seq: e.seq });
            }
            if entries[..i].iter().any(|o| o.seq == e.seq) {
                return Err(NsaError::arg("entries[].seq", e.seq, "listed twice in one step"));
            }
            if e.tokens == 0 {
                return Err(NsaError::arg("entries[].tokens", 0, format!("sequence {} appends no token", e.seq)));
            }
            let old = v.seqs[e.seq as usize].len;
            let new = old as u64 + e.tokens as u64;
            if new > cfg.max_seq_len as u64 {
                return Err(NsaError::SequenceTooLong { seq: e.seq, len: new, max: cfg.max_seq_len });
            }
            total += e.tokens as u64;
            let new = new as u32;
            raw_need += new_pages(old, new, p);
            let cmp = completed_cmp_tokens(&cfg, old, new);
            let (cold, cnew) = (cmp.start, cmp.end);
            cmp_need += new_pages(cold, cnew, p);
            // Copy-on-write: a sequence appending into a partial page that is shared when
            // the step is planned copies it, even when every other holder copies too. So a
            // step never writes a page that was shared, and abort_step can give every
            // holder back the page as it was.
            let cow = |rows: u32, tables: &[i32], per: usize, rc: &[u32]| {
                rows % p != 0 && rc[tables[e.seq as usize * per + (rows / p) as usize] as usize] > 1
            };
            if cow(old, v.raw_tables, pps, v.raw_refcount) {
                raw_need += 1;
            }
            if cnew > cold && cow(cold, v.cmp_tables, cpps, v.cmp_refcount) {
                cmp_need += 1;
            }
        }
        if total > cfg.max_step_tokens as u64 {
            return Err(NsaError::arg("entries[].tokens", total, format!("a step holds at most max_step_tokens = {} tokens", cfg.max_step_tokens)));
        }
        if raw_need > v.hdr.raw_free {
            return Err(NsaError::OutOfPages { pool: "raw", need: raw_need, free: v.hdr.raw_free });
        }
        if cmp_need > v.hdr.cmp_free {
            return Err(NsaError::OutOfPages { pool: "compressed", need: cmp_need, free: v.hdr.cmp_free });
        }

        // --- commit: nothing below can fail ---
        let mut sp = self.split();
        let mut row = 0u32;
        let mut ncopies = 0usize;
        for (i, e) in entries.iter().enumerate() {
            let s = e.seq as usize;
            let old = sp.seqs[s].len;
            let new = old + e.tokens;
            let cmp = completed_cmp_tokens(&cfg, old, new);
            let (cold, cnew) = (cmp.start, cmp.end);
            for (pool_id, before, after, pool, tables, per) in [
                (POOL_RAW, old, new, &mut sp.raw, &mut *sp.raw_tables, pps),
                (POOL_CMP, cold, cnew, &mut sp.cmp, &mut *sp.cmp_tables, cpps),
            ] {
                if after == before {
                    continue;
                }
                let table = &mut tables[s * per..][..per];
                if before % p != 0 {
                    let idx = (before / p) as usize;
                    let src = table[idx] as u32;
                    // Refcounts of pages shared at plan time are unchanged until the loop
                    // ends (the holders are dropped below), so this is the plan-time count.
                    if pool.refcount[src as usize] > 1 {
                        let dst = pool.take();
                        table[idx] = dst as i32;
                        sp.plan_copies[ncopies] = PageCopy { pool: pool_id, src, dst, rows: before % p };
                        ncopies += 1;
                    }
                }
                for slot in &mut table[before.div_ceil(p) as usize..after.div_ceil(p) as usize] {
                    *slot = pool.take() as i32;
                }
            }
            sp.seqs[s].len = new;
            sp.plan_seqs[i] = PlanSeq { seq: e.seq, old_len: old, new_len: new, row };
            row += e.tokens;
        }
        // The copies' sources lose a holder only now: a source every holder copied away
        // from goes back to the pool after every page this step took, so the step never
        // writes it (abort_step hands it back intact).
        for c in &sp.plan_copies[..ncopies] {
            if c.pool == POOL_RAW { &mut sp.raw } else { &mut sp.cmp }.release(c.src);
        }
        *sp.step_seqs = entries.len() as u32;
        *sp.step_tokens = row;
        *sp.step_copies = ncopies as u32;
        self.open_step();
        Ok(())
    }

    /// The planned step (open or complete), or `NoStep` when none is planned or a later
    /// operation ended it.
    pub fn step(&self) -> Result<Step<'_>> {
        let v = self.view();
        if v.hdr.step_valid == 0 {
            return Err(NsaError::NoStep);
        }
        Ok(Step {
            cfg: self.config(),
            seqs: &v.plan_seqs[..v.hdr.step_seqs as usize],
            copies: &v.plan_copies[..v.hdr.step_copies as usize],
            tokens: v.hdr.step_tokens,
            raw_tables: v.raw_tables,
            cmp_tables: v.cmp_tables,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    /// The bound the append launch's grid is sized by holds for every old length and
    /// step length: checked exhaustively for both presets and a stride that does not
    /// divide the block.
    #[test]
    fn max_compress_jobs_bounds_every_step() {
        for preset in [Preset::Paper, Preset::Fla] {
            for stride in [None, Some(24)] {
                let mut cfg = Config::preset(preset);
                if let Some(d) = stride {
                    cfg.cmp_stride = d;
                }
                for old in 0..300u32 {
                    for n in 0..200u32 {
                        let done = completed_cmp_tokens(&cfg, old, old + n).len() as u32;
                        assert!(done <= max_compress_jobs(&cfg, n, 1), "{preset:?} stride {} old {old} n {n}: {done}", cfg.cmp_stride);
                    }
                }
            }
        }
    }
}
