//! The paged NSA KV-cache manager: page pools, per-sequence page tables and lengths, all
//! in a host arena the caller provides. It tracks *where* K/V rows and compressed tokens
//! live; the backends (cpu, cuda) own the pools' contents.
//!
//! Invariants kept by every operation (checked by [`Cache::check_invariants`]):
//! - a live sequence of length `len` holds exactly `ceil(len/P)` raw pages and
//!   `ceil(ncmp(len)/P)` compressed pages; every other table entry is -1;
//! - a page's refcount is the number of table entries naming it; free pages are exactly
//!   those with refcount 0, each on the free stack once;
//! - a failing call changes nothing (all checks happen before the first write);
//! - a planned step's sequences have the lengths the plan gave them.
//!
//! The step lifecycle (claims of layers, refusal while a step is open, abort) is in
//! `lifecycle`.

mod arena;
mod lifecycle;
mod pool;
mod state;

pub use lifecycle::CacheBinding;

pub(crate) use arena::View;
use arena::{Arena, Parts};
use pool::PoolMut;
pub use state::{PoolBytes, FINGERPRINT, STATE_HEADER_BYTES, STATE_MAGIC, STATE_VERSION};

use crate::config::Config;
use crate::error::{NsaError, Result};
use crate::layout::{ArenaHeader, Layout, ARENA_MAGIC};

/// A paged NSA KV cache living in caller memory. Not internally synchronized: one
/// thread at a time may call its `&mut self` methods (Rust enforces this).
pub struct Cache<'a> {
    cfg: Config,
    arena: Arena<'a>,
    /// Identity that backends bind to (`lifecycle::fresh_id`).
    id: u64,
    /// Moves whenever a page table may have changed other than by `plan_step`'s growth
    /// (`Cache::tables_epoch`).
    tables_epoch: u64,
}

impl std::fmt::Debug for Cache<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

/// Counts describing the pools, for callers and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub raw_pages: u32,
    pub raw_free: u32,
    pub cmp_pages: u32,
    pub cmp_free: u32,
    pub live_seqs: u32,
}

impl<'a> Cache<'a> {
    /// Bytes of host arena a cache with this config needs (validate the config first).
    pub fn arena_bytes(cfg: &Config) -> Result<usize> {
        cfg.validate()?;
        Ok(Layout::new(cfg)?.arena_bytes)
    }

    /// Initializes an empty cache in `mem` (at least `arena_bytes(cfg)` bytes, 16-byte
    /// aligned). Every page is free, no sequence exists. Allocates nothing.
    pub fn new(cfg: &Config, mem: &'a mut [u8]) -> Result<Self> {
        cfg.validate()?;
        let lay = Layout::new(cfg)?;
        let mut arena = Arena::new(mem, lay)?;
        {
            let p = arena.parts();
            *p.hdr = ArenaHeader { magic: ARENA_MAGIC, ..Default::default() };
            let mut sp = split(p);
            sp.raw.reset();
            sp.cmp.reset();
        }
        let mut c = Cache { cfg: *cfg, arena, id: lifecycle::fresh_id(), tables_epoch: 0 };
        c.end_step();
        let p = c.split();
        p.seqs.fill(Default::default());
        p.raw_tables.fill(-1);
        p.cmp_tables.fill(-1);
        p.plan_seqs.fill(Default::default());
        p.plan_copies.fill(Default::default());
        Ok(c)
    }

    /// Zeroes this value's padding bytes in place (the C handle that holds it lives in
    /// caller memory). The arena view and its layout are all pointers and `usize`s.
    pub(crate) fn zero_padding(&mut self) {
        crate::zero_pad::zero_gaps!(self, Cache { cfg, arena, id, tables_epoch });
        self.cfg.zero_padding();
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn layout(&self) -> &Layout {
        self.arena.layout()
    }

    pub(crate) fn view(&self) -> View<'_> {
        self.arena.view()
    }

    pub(crate) fn split(&mut self) -> Split<'_> {
        split(self.arena.parts())
    }

    /// The arena's bookkeeping bytes (all but which layers of the step ran): equal bytes
    /// mean equal sequences, pages and plan (tests compare snapshots).
    pub fn state_bytes(&self) -> &[u8] {
        self.arena.bytes()
    }

    /// The sequences' bookkeeping, as bytes: pool counts, refcounts, the live part of the
    /// free stacks, slots and page tables (not the step plan, nor the stale slots above
    /// the free stacks' tops). What `abort_step` restores; for tests.
    pub fn bookkeeping(&self) -> Vec<u8> {
        let v = self.view();
        let words = |x: &[u32]| x.iter().flat_map(|w| w.to_ne_bytes()).collect::<Vec<u8>>();
        let mut b = words(&[v.hdr.raw_free, v.hdr.cmp_free, v.hdr.live_seqs]);
        b.extend(words(v.raw_refcount));
        b.extend(words(&v.raw_free[..v.hdr.raw_free as usize]));
        b.extend(words(v.cmp_refcount));
        b.extend(words(&v.cmp_free[..v.hdr.cmp_free as usize]));
        for s in v.seqs {
            b.extend(words(&[s.active, s.len]));
        }
        b.extend(v.raw_tables.iter().chain(v.cmp_tables).flat_map(|w| w.to_ne_bytes()));
        b
    }

    pub fn stats(&self) -> PoolStats {
        let v = self.view();
        PoolStats {
            raw_pages: self.cfg.num_pages,
            raw_free: v.hdr.raw_free,
            cmp_pages: self.cfg.num_cmp_pages,
            cmp_free: v.hdr.cmp_free,
            live_seqs: v.hdr.live_seqs,
        }
    }

    fn check_id(&self, arg: &'static str, seq: u32) -> Result<()> {
        if seq >= self.cfg.max_seqs {
            return Err(NsaError::arg(arg, seq, format!("sequence ids are 0..{} (max_seqs)", self.cfg.max_seqs)));
        }
        Ok(())
    }

    fn check_live(&self, arg: &'static str, seq: u32) -> Result<()> {
        self.check_id(arg, seq)?;
        if self.view().seqs[seq as usize].active == 0 {
            return Err(NsaError::UnknownSequence { seq });
        }
        Ok(())
    }

    /// Whether `seq` is a live sequence.
    pub fn contains(&self, seq: u32) -> bool {
        seq < self.cfg.max_seqs && self.view().seqs[seq as usize].active != 0
    }

    /// Length (tokens appended) of a live sequence.
    pub fn len(&self, seq: u32) -> Result<u32> {
        self.check_live("seq", seq)?;
        Ok(self.view().seqs[seq as usize].len)
    }

    /// Compressed tokens a live sequence has (derived from its length).
    pub fn cmp_len(&self, seq: u32) -> Result<u32> {
        Ok(self.cfg.num_cmp_tokens(self.len(seq)?))
    }

    /// Raw page table of a live sequence: `ceil(len/P)` page ids.
    pub fn raw_pages(&self, seq: u32) -> Result<&[i32]> {
        let len = self.len(seq)?;
        let n = len.div_ceil(self.cfg.page_size) as usize;
        let pps = self.cfg.pages_per_seq() as usize;
        Ok(&self.view_table(true)[seq as usize * pps..][..n])
    }

    /// Compressed page table of a live sequence: `ceil(ncmp(len)/P)` page ids.
    pub fn cmp_pages(&self, seq: u32) -> Result<&[i32]> {
        let n = self.cmp_len(seq)?.div_ceil(self.cfg.page_size) as usize;
        let cpps = self.cfg.cmp_pages_per_seq() as usize;
        Ok(&self.view_table(false)[seq as usize * cpps..][..n])
    }

    fn view_table(&self, raw: bool) -> &[i32] {
        let v = self.arena.view();
        if raw {
            v.raw_tables
        } else {
            v.cmp_tables
        }
    }

    /// Starts an empty sequence in slot `seq`.
    pub fn add_sequence(&mut self, seq: u32) -> Result<()> {
        self.refuse_open_step()?;
        self.check_id("seq", seq)?;
        if self.contains(seq) {
            return Err(NsaError::SequenceExists { seq });
        }
        let p = self.split();
        p.seqs[seq as usize] = crate::layout::SeqSlot { active: 1, len: 0 };
        *p.live_seqs += 1;
        self.end_step();
        Ok(())
    }

    /// Makes `dst` a copy of `src`: same length, same pages (shared by refcount; the first
    /// append to a shared partial page copies it). Needs no free page.
    pub fn fork(&mut self, src: u32, dst: u32) -> Result<()> {
        self.refuse_open_step()?;
        self.check_live("src", src)?;
        self.check_id("dst", dst)?;
        if self.contains(dst) {
            return Err(NsaError::SequenceExists { seq: dst });
        }
        let cfg = self.cfg;
        let len = self.len(src)?;
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let nraw = len.div_ceil(cfg.page_size) as usize;
        let ncmp = cfg.num_cmp_tokens(len).div_ceil(cfg.page_size) as usize;
        let mut p = self.split();
        p.raw_tables.copy_within(src as usize * pps..src as usize * pps + nraw, dst as usize * pps);
        p.cmp_tables.copy_within(src as usize * cpps..src as usize * cpps + ncmp, dst as usize * cpps);
        let (raw_t, cmp_t) = (&p.raw_tables[dst as usize * pps..][..nraw], &p.cmp_tables[dst as usize * cpps..][..ncmp]);
        for &pg in raw_t {
            p.raw.share(pg as u32);
        }
        for &pg in cmp_t {
            p.cmp.share(pg as u32);
        }
        p.seqs[dst as usize] = crate::layout::SeqSlot { active: 1, len };
        *p.live_seqs += 1;
        self.end_step();
        Ok(())
    }

    /// Shortens a live sequence to `new_len <= len`: pages past the new end go back to the
    /// pool (when no other sequence holds them) and compressed tokens that are no longer
    /// complete (`i*d + l - 1 >= new_len`) are dropped.
    pub fn truncate(&mut self, seq: u32, new_len: u32) -> Result<()> {
        self.refuse_open_step()?;
        let len = self.len(seq)?;
        if new_len > len {
            return Err(NsaError::arg("new_len", new_len, format!("must be <= the sequence's length {len}")));
        }
        self.shrink(seq, new_len);
        Ok(())
    }

    /// Ends a sequence and frees its pages (those no other sequence holds).
    pub fn remove(&mut self, seq: u32) -> Result<()> {
        self.refuse_open_step()?;
        self.check_live("seq", seq)?;
        self.shrink(seq, 0);
        let p = self.split();
        p.seqs[seq as usize].active = 0;
        *p.live_seqs -= 1;
        Ok(())
    }

    /// Infallible: `seq` is live and `new_len <= len`.
    fn shrink(&mut self, seq: u32, new_len: u32) {
        let cfg = self.cfg;
        let s = seq as usize;
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let len = self.view().seqs[s].len;
        let (raw_keep, raw_had) = (new_len.div_ceil(cfg.page_size) as usize, len.div_ceil(cfg.page_size) as usize);
        let cmp_keep = cfg.num_cmp_tokens(new_len).div_ceil(cfg.page_size) as usize;
        let cmp_had = cfg.num_cmp_tokens(len).div_ceil(cfg.page_size) as usize;
        self.end_step();
        let mut sp = self.split();
        sp.seqs[s].len = new_len;
        // Release the last page first so the free stack's order is deterministic.
        for e in sp.raw_tables[s * pps..][raw_keep..raw_had].iter_mut().rev() {
            sp.raw.release(*e as u32);
            *e = -1;
        }
        for e in sp.cmp_tables[s * cpps..][cmp_keep..cmp_had].iter_mut().rev() {
            sp.cmp.release(*e as u32);
            *e = -1;
        }
    }

    /// Checks every invariant listed in the module docs. Returns a description of the first
    /// violation. O(pages + table entries); for tests and the fuzzer, not the hot path.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let cfg = &self.cfg;
        let v = self.view();
        if v.hdr.magic != ARENA_MAGIC {
            return Err("arena magic is wrong".into());
        }
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let mut raw_rc = vec![0u32; cfg.num_pages as usize];
        let mut cmp_rc = vec![0u32; cfg.num_cmp_pages as usize];
        let mut live = 0;
        for (s, slot) in v.seqs.iter().enumerate() {
            let (nr, nc) = if slot.active != 0 {
                live += 1;
                if slot.len > cfg.max_seq_len {
                    return Err(format!("seq {s}: len {} > max_seq_len", slot.len));
                }
                (slot.len.div_ceil(cfg.page_size) as usize, cfg.num_cmp_tokens(slot.len).div_ceil(cfg.page_size) as usize)
            } else {
                (0, 0)
            };
            for (tables, per, n, rc, name) in
                [(v.raw_tables, pps, nr, &mut raw_rc, "raw"), (v.cmp_tables, cpps, nc, &mut cmp_rc, "cmp")]
            {
                for (i, &pg) in tables[s * per..][..per].iter().enumerate() {
                    if i < n {
                        if pg < 0 || pg as usize >= rc.len() {
                            return Err(format!("seq {s}: {name} table[{i}] = {pg} is not a page"));
                        }
                        rc[pg as usize] += 1;
                    } else if pg != -1 {
                        return Err(format!("seq {s}: {name} table[{i}] = {pg} past the end (want -1)"));
                    }
                }
            }
        }
        if live != v.hdr.live_seqs {
            return Err(format!("live_seqs = {} but {live} slots are active", v.hdr.live_seqs));
        }
        if v.hdr.step_valid != 0 {
            if v.hdr.step_seqs as usize > v.plan_seqs.len() || v.hdr.step_copies as usize > v.plan_copies.len() {
                return Err(format!("step plan of {} sequences, {} copies is out of range", v.hdr.step_seqs, v.hdr.step_copies));
            }
            for ps in &v.plan_seqs[..v.hdr.step_seqs as usize] {
                let ok = v.seqs.get(ps.seq as usize).is_some_and(|s| s.active != 0 && s.len == ps.new_len && ps.old_len < ps.new_len);
                if !ok {
                    return Err(format!("the planned step's sequence {} ({}..{}) does not match its slot", ps.seq, ps.old_len, ps.new_len));
                }
            }
        }
        for (name, rc, stored, stack, free) in [
            ("raw", &raw_rc, v.raw_refcount, v.raw_free, v.hdr.raw_free),
            ("cmp", &cmp_rc, v.cmp_refcount, v.cmp_free, v.hdr.cmp_free),
        ] {
            if rc.as_slice() != stored {
                let i = rc.iter().zip(stored).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!("{name} page {i}: refcount {} but {} table entries", stored[i], rc[i]));
            }
            let mut on_stack = vec![false; rc.len()];
            for &pg in &stack[..free as usize] {
                let pg = pg as usize;
                if pg >= rc.len() || on_stack[pg] {
                    return Err(format!("{name} free stack holds {pg} twice or out of range"));
                }
                if rc[pg] != 0 {
                    return Err(format!("{name} page {pg} is on the free stack with refcount {}", rc[pg]));
                }
                on_stack[pg] = true;
            }
            let used = rc.iter().filter(|&&c| c > 0).count();
            if used + free as usize != rc.len() {
                return Err(format!("{name}: {used} used + {free} free != {} pages (leak)", rc.len()));
            }
        }
        Ok(())
    }
}

/// The arena's parts regrouped as two pools, the tables, the slots and the staging
/// regions, with the header's fields borrowed disjointly (safe destructuring).
pub(crate) struct Split<'p> {
    pub raw: PoolMut<'p>,
    pub cmp: PoolMut<'p>,
    pub seqs: &'p mut [crate::layout::SeqSlot],
    pub raw_tables: &'p mut [i32],
    pub cmp_tables: &'p mut [i32],
    pub plan_seqs: &'p mut [crate::layout::PlanSeq],
    pub plan_copies: &'p mut [crate::layout::PageCopy],
    pub live_seqs: &'p mut u32,
    pub step_valid: &'p mut u32,
    pub step_seqs: &'p mut u32,
    pub step_tokens: &'p mut u32,
    pub step_copies: &'p mut u32,
    pub step_id: &'p mut u32,
}

pub(crate) fn split(p: Parts<'_>) -> Split<'_> {
    let ArenaHeader { raw_free, cmp_free, live_seqs, step_valid, step_seqs, step_tokens, step_copies, step_id, .. } = p.hdr;
    Split {
        raw: PoolMut { refcount: p.raw_refcount, stack: p.raw_free, free: raw_free },
        cmp: PoolMut { refcount: p.cmp_refcount, stack: p.cmp_free, free: cmp_free },
        seqs: p.seqs,
        raw_tables: p.raw_tables,
        cmp_tables: p.cmp_tables,
        plan_seqs: p.plan_seqs,
        plan_copies: p.plan_copies,
        live_seqs,
        step_valid,
        step_seqs,
        step_tokens,
        step_copies,
        step_id,
    }
}
