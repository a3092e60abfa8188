//! Where one uploaded step lies in the device buffer's step region: header, sequences,
//! token rows, compress jobs, page tables, then copy-on-write copies, packed one after
//! the other so that a decode step is one small contiguous host-to-device copy (each
//! copy costs the stream microseconds whatever its size; five of them were most of the
//! upload's time).
//!
//! The offsets depend only on the step's sequence and token counts (the copies, whose
//! number varies with forks, come last, and the jobs region holds one entry per token, the
//! most a step can complete), so a CUDA graph captured for a step shape stays valid for
//! every step of that shape: the kernels read the actual counts from the header.

use super::params::StepHeader;
use crate::config::Config;
use crate::layout::{PageCopy, PlanSeq};
use crate::plan::Step;

/// Every region starts at a multiple of this many bytes (the largest entry is 16 bytes).
const ALIGN: usize = 16;

/// Byte offsets of a step's regions from the start of the step region (the header is at 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StepLayout {
    pub seqs: usize,
    pub rows: usize,
    pub jobs: usize,
    pub raw_tab: usize,
    pub cmp_tab: usize,
    pub copies: usize,
    /// The end of the copies region for `copies` copies.
    pub end: usize,
}

impl StepLayout {
    /// The layout of a step of `seqs` sequences, `tokens` token rows and `copies`
    /// copy-on-write copies (sizes from the config's page tables).
    pub fn new(cfg: &Config, seqs: usize, tokens: usize, copies: usize) -> StepLayout {
        let up = |x: usize| x.div_ceil(ALIGN) * ALIGN;
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq().max(1) as usize);
        let seqs_at = up(std::mem::size_of::<StepHeader>());
        let rows = up(seqs_at + seqs * std::mem::size_of::<PlanSeq>());
        let jobs = up(rows + tokens * 8);
        let raw_tab = up(jobs + tokens * 8);
        let cmp_tab = up(raw_tab + seqs * pps * 4);
        let copies_at = up(cmp_tab + seqs * cpps * 4);
        StepLayout { seqs: seqs_at, rows, jobs, raw_tab, cmp_tab, copies: copies_at, end: copies_at + copies * std::mem::size_of::<PageCopy>() }
    }

    /// The layout of `step` (what the upload writes and the launches read).
    pub fn of(cfg: &Config, step: &Step) -> StepLayout {
        StepLayout::new(cfg, step.seqs.len(), step.tokens as usize, step.copies.len())
    }

    /// The largest step the config allows (the step region's size): every sequence and
    /// token of a step, and up to two copies per sequence (its raw and compressed tail pages).
    pub fn max(cfg: &Config) -> StepLayout {
        let seqs = cfg.max_step_seqs as usize;
        StepLayout::new(cfg, seqs, cfg.max_step_tokens as usize, 2 * seqs)
    }

    /// The byte ranges one upload copies: the used part of every region, as (offset,
    /// bytes), neighbours merged where the unused bytes between them are few (copying a
    /// small gap costs less than another copy). `jobs` is the step's job count.
    pub fn copy_ranges(&self, jobs: usize) -> ([(usize, usize); 2], usize) {
        const GAP: usize = 16 * 1024;
        let first = (0, self.jobs + jobs * 8);
        let second = (self.raw_tab, self.end - self.raw_tab);
        if second.0 - (first.0 + first.1) <= GAP {
            ([(0, self.end), (0, 0)], 1)
        } else {
            ([first, second], 2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_follow_each_other_aligned_and_only_counts_move_them() {
        let cfg = Config::preset(crate::config::Preset::Paper).with_capacity(16, 65536);
        let a = StepLayout::new(&cfg, 3, 5, 0);
        let regions = [0, a.seqs, a.rows, a.jobs, a.raw_tab, a.cmp_tab, a.copies, a.end];
        assert!(regions.windows(2).all(|w| w[0] <= w[1]), "{a:?}");
        assert!(regions[..7].iter().all(|&o| o % ALIGN == 0), "{a:?}");
        assert!(a.rows >= a.seqs + 3 * std::mem::size_of::<PlanSeq>());
        assert!(a.raw_tab >= a.jobs + 5 * 8);
        assert!(a.copies >= a.cmp_tab + 3 * cfg.cmp_pages_per_seq().max(1) as usize * 4);
        // The copies' count moves nothing but the end (a graph of this shape stays valid).
        let b = StepLayout::new(&cfg, 3, 5, 4);
        assert_eq!(StepLayout { end: a.end, ..b }, a);
        assert_eq!(b.end, b.copies + 4 * std::mem::size_of::<PageCopy>());
        // The largest step holds every other.
        let m = StepLayout::max(&cfg);
        assert!(m.end >= StepLayout::new(&cfg, cfg.max_step_seqs as usize, cfg.max_step_tokens as usize, 2 * cfg.max_step_seqs as usize).end);
    }

    #[test]
    fn a_decode_step_is_one_copy_and_a_long_prefill_two() {
        let cfg = Config::preset(crate::config::Preset::Paper).with_capacity(16, 65536);
        let (r, n) = StepLayout::new(&cfg, 16, 16, 0).copy_ranges(16);
        assert_eq!((n, r[0]), (1, (0, StepLayout::new(&cfg, 16, 16, 0).end)));
        // 8192 tokens completing 512 compressed tokens: the unused job entries are skipped.
        let l = StepLayout::new(&cfg, 1, 8192, 1);
        let (r, n) = l.copy_ranges(512);
        assert_eq!(n, 2);
        assert_eq!(r[0], (0, l.jobs + 512 * 8));
        assert_eq!(r[1], (l.raw_tab, l.end - l.raw_tab));
    }
}
