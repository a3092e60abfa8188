//! An independent model of the cache, shared with the ffi-tests crate (`#[path]` include):
//! it predicts the outcome of every operation (success, or which error) and the state
//! after it: lengths, page holders, free pages, and the step lifecycle. Written from the
//! documented semantics, sharing no code with the engine: pages are abstract ids with
//! holder counts; a plan is applied entry by entry (a shared partial page is copied when
//! another holder is left); abort puts back a copy of the state before the plan.
#![allow(dead_code)]

use nsa::Config;

/// One call on a cache (a layer run counts as one call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Add(u32),
    Fork(u32, u32),
    Truncate(u32, u32),
    Remove(u32),
    /// `(seq, tokens)` entries.
    Plan(Vec<(u32, u32)>),
    Run(u32),
    Abort,
}

/// Which error a call returns (the engine's `NsaError` variants / C status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidArgument,
    UnknownSequence,
    SequenceExists,
    OutOfPages,
    SequenceTooLong,
    NoStep,
    StepOpen,
    LayerAlreadyRun,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seq {
    len: u32,
    raw: Vec<u64>,
    cmp: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    seqs: Vec<Option<Seq>>,
    /// Holders of each live page id (raw and compressed ids never collide).
    holders: std::collections::BTreeMap<u64, u32>,
    raw_used: u32,
    cmp_used: u32,
}

#[derive(Debug, Clone)]
struct OpenStep {
    ran: Vec<bool>,
    before: State,
    entries: Vec<(u32, u32)>,
}

#[derive(Debug, Clone)]
pub struct Shadow {
    max_seqs: u32,
    max_seq_len: u32,
    max_step_seqs: u32,
    max_step_tokens: u32,
    page: u32,
    l: u32,
    d: u32,
    raw_pages: u32,
    cmp_pages: u32,
    layers: u32,
    st: State,
    step: Option<OpenStep>,
    next_id: u64,
}

impl Shadow {
    pub fn new(c: &Config) -> Shadow {
        Shadow {
            max_seqs: c.max_seqs,
            max_seq_len: c.max_seq_len,
            max_step_seqs: c.max_step_seqs,
            max_step_tokens: c.max_step_tokens,
            page: c.page_size,
            l: c.cmp_block,
            d: c.cmp_stride,
            raw_pages: c.num_pages,
            cmp_pages: c.num_cmp_pages,
            layers: c.num_layers,
            st: State { seqs: vec![None; c.max_seqs as usize], holders: Default::default(), raw_used: 0, cmp_used: 0 },
            step: None,
            next_id: 0,
        }
    }

    /// Compressed tokens of a sequence of `len` raw tokens: block i ends at i*d + l - 1.
    pub fn ncmp(&self, len: u32) -> u32 {
        if len < self.l {
            0
        } else {
            (len - self.l) / self.d + 1
        }
    }

    pub fn len(&self, s: u32) -> Option<u32> {
        self.st.seqs.get(s as usize)?.as_ref().map(|q| q.len)
    }
    pub fn live(&self) -> Vec<u32> {
        (0..self.max_seqs).filter(|&s| self.len(s).is_some()).collect()
    }
    pub fn free_slots(&self) -> Vec<u32> {
        (0..self.max_seqs).filter(|&s| self.len(s).is_none()).collect()
    }
    pub fn raw_free(&self) -> u32 {
        self.raw_pages - self.st.raw_used
    }
    pub fn cmp_free(&self) -> u32 {
        self.cmp_pages - self.st.cmp_used
    }
    pub fn layers(&self) -> u32 {
        self.layers
    }
    /// A step is planned and some layer has not run.
    pub fn open(&self) -> bool {
        self.step.as_ref().is_some_and(|s| s.ran.iter().any(|r| !r))
    }
    /// A step is planned (open or complete).
    pub fn planned(&self) -> bool {
        self.step.is_some()
    }
    /// Layers of the planned step not run yet.
    pub fn pending_layers(&self) -> Vec<u32> {
        self.step.as_ref().map(|s| (0..self.layers).filter(|&l| !s.ran[l as usize]).collect()).unwrap_or_default()
    }
    /// Entries of the planned step.
    pub fn step_entries(&self) -> &[(u32, u32)] {
        self.step.as_ref().map(|s| &s.entries[..]).unwrap_or(&[])
    }
    /// Whether any two live sequences share a page (copy-on-write is pending somewhere).
    pub fn shares_pages(&self) -> bool {
        self.st.holders.values().any(|&h| h > 1)
    }

    fn new_page(&mut self, raw: bool) -> u64 {
        self.next_id += 1;
        self.st.holders.insert(self.next_id, 1);
        if raw {
            self.st.raw_used += 1;
        } else {
            self.st.cmp_used += 1;
        }
        self.next_id
    }

    fn drop_page(&mut self, id: u64, raw: bool) {
        let h = self.st.holders.get_mut(&id).expect("a held page");
        *h -= 1;
        if *h == 0 {
            self.st.holders.remove(&id);
            if raw {
                self.st.raw_used -= 1;
            } else {
                self.st.cmp_used -= 1;
            }
        }
    }

    /// Drops the pages of `s` past `len` raw tokens.
    fn shrink(&mut self, s: u32, len: u32) {
        let (keep_raw, keep_cmp) = (len.div_ceil(self.page) as usize, self.ncmp(len).div_ceil(self.page) as usize);
        let q = self.st.seqs[s as usize].as_mut().unwrap();
        q.len = len;
        let (raw, cmp) = (q.raw.split_off(keep_raw), q.cmp.split_off(keep_cmp));
        for id in raw {
            self.drop_page(id, true);
        }
        for id in cmp {
            self.drop_page(id, false);
        }
    }

    /// Grows one pool's table from `before` to `after` rows: copies a partial page shared
    /// when the step was planned first (its holder is dropped in `dropped`, after the whole
    /// plan), then takes new pages. Returns the pages taken.
    fn grow(&mut self, s: u32, raw: bool, before: u32, after: u32, dropped: &mut Vec<(u64, bool)>) -> u32 {
        if after == before {
            return 0;
        }
        let mut taken = 0;
        let p = self.page;
        if before % p != 0 {
            let idx = (before / p) as usize;
            let q = self.st.seqs[s as usize].as_ref().unwrap();
            let id = if raw { q.raw[idx] } else { q.cmp[idx] };
            if self.st.holders[&id] > 1 {
                let new = self.new_page(raw);
                dropped.push((id, raw));
                let q = self.st.seqs[s as usize].as_mut().unwrap();
                if raw {
                    q.raw[idx] = new;
                } else {
                    q.cmp[idx] = new;
                }
                taken += 1;
            }
        }
        for _ in before.div_ceil(p)..after.div_ceil(p) {
            let new = self.new_page(raw);
            let q = self.st.seqs[s as usize].as_mut().unwrap();
            if raw {
                q.raw.push(new);
            } else {
                q.cmp.push(new);
            }
            taken += 1;
        }
        taken
    }

    fn end_complete_step(&mut self) {
        self.step = None;
    }

    fn check_seq(&self, s: u32) -> Result<(), Kind> {
        if s >= self.max_seqs {
            return Err(Kind::InvalidArgument);
        }
        if self.len(s).is_none() {
            return Err(Kind::UnknownSequence);
        }
        Ok(())
    }

    /// Predicts `op`'s outcome and, when it succeeds, applies it.
    pub fn apply(&mut self, op: &Op) -> Result<(), Kind> {
        let mutating = !matches!(op, Op::Run(_) | Op::Abort);
        if mutating && self.open() {
            return Err(Kind::StepOpen);
        }
        match *op {
            Op::Add(s) => {
                if s >= self.max_seqs {
                    return Err(Kind::InvalidArgument);
                }
                if self.len(s).is_some() {
                    return Err(Kind::SequenceExists);
                }
                self.st.seqs[s as usize] = Some(Seq { len: 0, raw: vec![], cmp: vec![] });
                self.end_complete_step();
            }
            Op::Fork(src, dst) => {
                self.check_seq(src)?;
                if dst >= self.max_seqs {
                    return Err(Kind::InvalidArgument);
                }
                if self.len(dst).is_some() {
                    return Err(Kind::SequenceExists);
                }
                let q = self.st.seqs[src as usize].clone().unwrap();
                for id in q.raw.iter().chain(&q.cmp) {
                    *self.st.holders.get_mut(id).unwrap() += 1;
                }
                self.st.seqs[dst as usize] = Some(q);
                self.end_complete_step();
            }
            Op::Truncate(s, n) => {
                self.check_seq(s)?;
                if n > self.len(s).unwrap() {
                    return Err(Kind::InvalidArgument);
                }
                self.shrink(s, n);
                self.end_complete_step();
            }
            Op::Remove(s) => {
                self.check_seq(s)?;
                self.shrink(s, 0);
                self.st.seqs[s as usize] = None;
                self.end_complete_step();
            }
            Op::Plan(ref entries) => {
                if entries.is_empty() || entries.len() > self.max_step_seqs as usize {
                    return Err(Kind::InvalidArgument);
                }
                let mut total = 0u64;
                for (i, &(s, t)) in entries.iter().enumerate() {
                    self.check_seq(s)?;
                    if entries[..i].iter().any(|e| e.0 == s) || t == 0 {
                        return Err(Kind::InvalidArgument);
                    }
                    if self.len(s).unwrap() as u64 + t as u64 > self.max_seq_len as u64 {
                        return Err(Kind::SequenceTooLong);
                    }
                    total += t as u64;
                }
                if total > self.max_step_tokens as u64 {
                    return Err(Kind::InvalidArgument);
                }
                let before = self.st.clone();
                let next_id = self.next_id;
                let (mut raw_need, mut cmp_need) = (0, 0);
                let mut dropped = vec![];
                for &(s, t) in entries {
                    let old = self.len(s).unwrap();
                    raw_need += self.grow(s, true, old, old + t, &mut dropped);
                    cmp_need += self.grow(s, false, self.ncmp(old), self.ncmp(old + t), &mut dropped);
                    self.st.seqs[s as usize].as_mut().unwrap().len = old + t;
                }
                for (id, raw) in dropped {
                    self.drop_page(id, raw);
                }
                let out = if raw_need > self.raw_pages - before.raw_used {
                    Some(Kind::OutOfPages)
                } else if cmp_need > self.cmp_pages - before.cmp_used {
                    Some(Kind::OutOfPages)
                } else {
                    None
                };
                if let Some(k) = out {
                    self.st = before;
                    self.next_id = next_id;
                    return Err(k);
                }
                self.step = Some(OpenStep { ran: vec![false; self.layers as usize], before, entries: entries.clone() });
            }
            Op::Run(layer) => {
                let Some(step) = self.step.as_mut() else { return Err(Kind::NoStep) };
                if layer >= self.layers {
                    return Err(Kind::InvalidArgument);
                }
                if step.ran[layer as usize] {
                    return Err(Kind::LayerAlreadyRun);
                }
                step.ran[layer as usize] = true;
            }
            Op::Abort => {
                let Some(step) = self.step.take() else { return Err(Kind::NoStep) };
                self.st = step.before;
            }
        }
        Ok(())
    }
}

impl Shadow {
    /// A random operation: mostly one this model says is valid (so that at least half of
    /// a run's operations change the state), sometimes a bad one of every kind. `below(n)`
    /// draws uniformly from `0..n`.
    pub fn random_op(&self, below: &mut dyn FnMut(u64) -> u64) -> Op {
        let live = self.live();
        let free = self.free_slots();
        let max = self.max_seqs;
        let pick = |xs: &[u32], below: &mut dyn FnMut(u64) -> u64| xs[below(xs.len() as u64) as usize];
        let any = |below: &mut dyn FnMut(u64) -> u64| below(max as u64 + 2) as u32; // sometimes out of range
        let some_live = |below: &mut dyn FnMut(u64) -> u64| if live.is_empty() || below(10) == 0 { any(below) } else { pick(&live, below) };
        let some_free = |below: &mut dyn FnMut(u64) -> u64| if free.is_empty() || below(6) == 0 { below(max as u64 + 2) as u32 } else { free[below(free.len() as u64) as usize] };
        if self.open() && below(5) != 0 {
            let pending = self.pending_layers();
            return match below(10) {
                0 => Op::Abort,
                1 => Op::Run(below(self.layers as u64 + 1) as u32), // may repeat or be out of range
                _ => Op::Run(pending[below(pending.len() as u64) as usize]),
            };
        }
        if live.is_empty() && below(4) != 0 {
            return Op::Add(some_free(below));
        }
        match below(20) {
            0..=1 => Op::Add(some_free(below)),
            2..=3 => {
                let src = some_live(below);
                Op::Fork(src, some_free(below))
            }
            4..=5 => {
                let s = some_live(below);
                let len = self.len(s).unwrap_or(10);
                let past = if below(6) == 0 { 3 } else { 1 };
                Op::Truncate(s, below(len as u64 + past) as u32)
            }
            6 => Op::Remove(some_live(below)),
            7 => Op::Abort,
            8 => Op::Run(below(self.layers as u64 + 1) as u32),
            _ => {
                let mut entries: Vec<(u32, u32)> = vec![];
                for &s in &live {
                    if below(2) == 0 && entries.len() < self.max_step_seqs as usize {
                        let t = [1, 1, 1, 1, 2, 7, 16, 33, 64, 150][below(10) as usize];
                        entries.push((s, t));
                    }
                }
                if entries.is_empty() && !live.is_empty() {
                    entries.push((live[below(live.len() as u64) as usize], 1));
                }
                match below(16) {
                    0 if !entries.is_empty() => entries.push(entries[0]), // listed twice
                    1 if !entries.is_empty() => entries[0].1 = 0,         // no token
                    2 => entries.push((max + 3, 1)),                      // out of range
                    3 if !entries.is_empty() => entries[0].1 = self.max_seq_len, // too long / too many
                    4 => entries.clear(),
                    _ => {}
                }
                Op::Plan(entries)
            }
        }
    }
}

