//! Which page-table entries the device's step region already holds, so that a step whose
//! tables only grew uploads the entries its sequences gained (a decode step: a new page
//! every `page_size` tokens a sequence) instead of every table in full. The tables are
//! most of a large step's upload: at batch 64 and 128k tokens ~0.5 MB, 45-67 us a step on
//! the H200 (docs/DECODE_NOTES.md, variant 105).
//!
//! The region's tables sit at the step sequence's index (`StepLayout::raw_tab`,
//! `cmp_tab`), so what the region holds serves a later step when that step's layout puts
//! them at the same offsets, lists the same sequences in the same order, copies no page
//! (a copy-on-write copy replaces an entry) and its cache changed no table since but by
//! growth (`Cache::tables_epoch`). Anything else uploads every table, and the record
//! starts again from that upload. Entries past a sequence's length are never read by the
//! kernels; those the region holds stay as the last full upload wrote them (-1).
//!
//! Host bookkeeping only: sized once for `max_step_seqs`, nothing allocated per step.

use super::step_layout::StepLayout;
use crate::config::Config;
use crate::plan::Step;

/// The most separate entry runs a patched upload copies; past it (many sequences gaining a
/// page in the same step) one copy of every table costs less than a copy per run.
pub(crate) const MAX_RUNS: usize = 4;

/// Entries a sequence's tables must hold for a step: (raw, compressed).
fn needed(cfg: &Config, new_len: u32) -> (u32, u32) {
    (new_len.div_ceil(cfg.page_size), cfg.num_cmp_tokens(new_len).div_ceil(cfg.page_size))
}

/// What a full upload or the runs of a patched one leave in the region (the tables'
/// offsets also fix the step's sequence count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    cache: u64,
    epoch: u64,
    raw_tab: usize,
    cmp_tab: usize,
}

/// The entries of the step region's tables that are current (see the module docs).
#[derive(Debug)]
pub(crate) struct TableShadow {
    held: Option<Held>,
    /// Per step sequence index: the cache's sequence id and how many of its raw and
    /// compressed entries the region holds.
    slot: Vec<u32>,
    raw: Vec<u32>,
    cmp: Vec<u32>,
}

/// The entry runs one patched upload copies, as (byte offset in the step region, first
/// entry, entries, raw table (else compressed), step sequence index).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Run {
    pub off: usize,
    pub first: usize,
    pub len: usize,
    pub raw: bool,
    pub si: usize,
}

impl Run {
    /// The entries this run copies, from `step`'s tables.
    pub fn entries<'s>(&self, step: &Step<'s>) -> &'s [i32] {
        let seq = step.seqs[self.si].seq;
        let t = if self.raw { step.raw_table(seq) } else { step.cmp_table(seq) };
        &t[self.first..self.first + self.len]
    }
}

impl TableShadow {
    pub fn new(cfg: &Config) -> TableShadow {
        let n = cfg.max_step_seqs as usize;
        TableShadow { held: None, slot: vec![0; n], raw: vec![0; n], cmp: vec![0; n] }
    }

    /// Nothing in the region is known to be current (an upload's copy failed to enqueue:
    /// the region may hold a mix).
    pub fn forget(&mut self) {
        self.held = None;
    }

    /// The runs that bring the region's tables up to `step` (at most `MAX_RUNS`; none when
    /// nothing grew), or `None` when every table must be uploaded.
    pub fn runs(&self, cfg: &Config, cache: u64, epoch: u64, step: &Step, sl: &StepLayout) -> Option<([Run; MAX_RUNS], usize)> {
        let h = self.held?;
        let now = Held { cache, epoch, raw_tab: sl.raw_tab, cmp_tab: sl.cmp_tab };
        if h != now || !step.copies.is_empty() {
            return None;
        }
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let mut runs = [Run::default(); MAX_RUNS];
        let mut n = 0;
        for (si, ps) in step.seqs.iter().enumerate() {
            if self.slot[si] != ps.seq {
                return None;
            }
            let (raw, cmp) = needed(cfg, ps.new_len);
            for (have, want, raw, at, per) in [(self.raw[si], raw, true, sl.raw_tab, pps), (self.cmp[si], cmp, false, sl.cmp_tab, cpps)] {
                if want < have {
                    return None; // shrunk: only an epoch change can do that, but be safe
                }
                if want > have {
                    if n == MAX_RUNS {
                        return None;
                    }
                    let first = have as usize;
                    runs[n] = Run { off: at + (si * per + first) * 4, first, len: (want - have) as usize, raw, si };
                    n += 1;
                }
            }
        }
        Some((runs, n))
    }

    /// Records a full upload of `step`'s tables.
    pub fn uploaded_all(&mut self, cfg: &Config, cache: u64, epoch: u64, step: &Step, sl: &StepLayout) {
        for (si, ps) in step.seqs.iter().enumerate() {
            let (raw, cmp) = needed(cfg, ps.new_len);
            (self.slot[si], self.raw[si], self.cmp[si]) = (ps.seq, raw, cmp);
        }
        self.held = Some(Held { cache, epoch, raw_tab: sl.raw_tab, cmp_tab: sl.cmp_tab });
    }

    /// Records that `runs` were copied (the region's key stays as it was).
    pub fn uploaded_runs(&mut self, runs: &[Run]) {
        for r in runs {
            let held = if r.raw { &mut self.raw[r.si] } else { &mut self.cmp[r.si] };
            *held = (r.first + r.len) as u32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::config::Preset;
    use crate::host_buf::HostBuf;
    use crate::plan::StepSeq;

    /// Applies what an upload copies to a model of the region (full: every table of the
    /// step; patched: the runs), and checks after each step that the region's first
    /// `needed` entries of every step sequence equal the cache's tables: through growth,
    /// a page boundary, more runs than `MAX_RUNS`, a fork with copy-on-write, a truncate,
    /// an aborted step and another sequence list.
    #[test]
    fn patched_uploads_keep_the_region_equal_to_the_cache() {
        let cfg = Config::preset(Preset::Paper).with_shape(8, 2, 32, 32).with_capacity(8, 4096);
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let mut arena = HostBuf::new(Cache::arena_bytes(&cfg).unwrap());
        let mut cache = Cache::new(&cfg, arena.bytes()).unwrap();
        let mut sh = TableShadow::new(&cfg);
        let mut region = vec![0x5Au8; StepLayout::max(&cfg).end];
        let (full, patched) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let step = |cache: &mut Cache, entries: &[StepSeq], sh: &mut TableShadow, region: &mut [u8]| {
            cache.plan_step(entries).unwrap();
            let st = cache.step().unwrap();
            let sl = StepLayout::of(&cfg, &st);
            let put = |region: &mut [u8], at: usize, xs: &[i32]| {
                for (i, x) in xs.iter().enumerate() {
                    region[at + 4 * i..at + 4 * i + 4].copy_from_slice(&x.to_ne_bytes());
                }
            };
            match sh.runs(&cfg, cache.id(), cache.tables_epoch(), &st, &sl) {
                Some((runs, n)) => {
                    for r in &runs[..n] {
                        put(region, r.off, r.entries(&st));
                    }
                    sh.uploaded_runs(&runs[..n]);
                    patched.set(patched.get() + 1);
                }
                None => {
                    for (si, ps) in st.seqs.iter().enumerate() {
                        put(region, sl.raw_tab + si * pps * 4, st.raw_table(ps.seq));
                        put(region, sl.cmp_tab + si * cpps * 4, st.cmp_table(ps.seq));
                    }
                    sh.uploaded_all(&cfg, cache.id(), cache.tables_epoch(), &st, &sl);
                    full.set(full.get() + 1);
                }
            }
            for (si, ps) in st.seqs.iter().enumerate() {
                let (nr, nc) = needed(&cfg, ps.new_len);
                let got = |at: usize, n: usize| -> Vec<i32> {
                    (0..n).map(|i| i32::from_ne_bytes(region[at + 4 * i..at + 4 * i + 4].try_into().unwrap())).collect()
                };
                assert_eq!(got(sl.raw_tab + si * pps * 4, nr as usize), st.raw_table(ps.seq)[..nr as usize], "raw, seq {}", ps.seq);
                assert_eq!(got(sl.cmp_tab + si * cpps * 4, nc as usize), st.cmp_table(ps.seq)[..nc as usize], "cmp, seq {}", ps.seq);
            }
            (0..cfg.num_layers).for_each(|l| cache.mark_layer_run(l).unwrap());
        };
        let one = |seqs: &[u32]| seqs.iter().map(|&seq| StepSeq { seq, tokens: 1 }).collect::<Vec<_>>();
        for s in 0..6 {
            cache.add_sequence(s).unwrap();
        }
        // Different lengths, so that the sequences cross page boundaries in different steps.
        step(&mut cache, &(0..6).map(|s| StepSeq { seq: s, tokens: 100 + 13 * s }).collect::<Vec<_>>(), &mut sh, &mut region);
        for _ in 0..200 {
            step(&mut cache, &one(&[0, 1, 2, 3, 4, 5]), &mut sh, &mut region);
        }
        assert!(patched.get() >= 150, "decode steps patch the region ({} patched, {} full)", patched.get(), full.get());
        // More than MAX_RUNS sequences gain a page in one step: aligned lengths.
        for s in 0..6 {
            cache.truncate(s, 256).unwrap();
        }
        step(&mut cache, &one(&[0, 1, 2, 3, 4, 5]), &mut sh, &mut region);
        for _ in 0..70 {
            step(&mut cache, &one(&[0, 1, 2, 3, 4, 5]), &mut sh, &mut region);
        }
        // A fork mid-page: its first step copies the shared tail page (a full upload).
        cache.fork(2, 6).unwrap();
        for _ in 0..5 {
            step(&mut cache, &one(&[0, 2, 6]), &mut sh, &mut region);
        }
        // A step that takes a new page for sequence 0, uploaded, then aborted; sequence 1's
        // pages go back to the pool on top of that page, so the same step planned again
        // gives sequence 0 another page for the same entry, at the same length: only the
        // epoch tells the region's entry is stale.
        cache.truncate(0, 319).unwrap();
        step(&mut cache, &one(&[0, 2, 6]), &mut sh, &mut region);
        step(&mut cache, &one(&[0, 2, 6]), &mut sh, &mut region);
        let taken = cache.raw_pages(0).unwrap()[5];
        cache.abort_step().unwrap();
        cache.remove(1).unwrap();
        step(&mut cache, &one(&[0, 2, 6]), &mut sh, &mut region);
        assert_ne!(cache.raw_pages(0).unwrap()[5], taken, "the replanned step took another page");
        for _ in 0..80 {
            step(&mut cache, &one(&[0, 2, 6]), &mut sh, &mut region);
        }
        // Another order of the same sequences.
        step(&mut cache, &one(&[6, 2, 0]), &mut sh, &mut region);
        step(&mut cache, &one(&[6, 2, 0]), &mut sh, &mut region);
        assert!(full.get() >= 5, "{} full uploads", full.get());
    }
}
