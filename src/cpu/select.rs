//! Block selection (docs/SPEC.md, selected branch, Eq. 9-11): compressed-attention probabilities
//! summed over the group, mapped to selection blocks with the overlap-centred reading of
//! Eq. 9, forced blocks, then a deterministic top-n (ties to the lower block index).

use crate::config::Config;

/// How many `(a, b)` pairs of Eq. 9 land on offset `k = a + b`, `a < A = l/d`, `b < B = l'/d`.
#[inline]
fn overlap_count(k: usize, a: usize, b: usize) -> f32 {
    let lo = k.saturating_sub(b - 1);
    let hi = k.min(a - 1);
    if hi >= lo {
        (hi - lo + 1) as f32
    } else {
        0.0
    }
}

/// Group score of every candidate block `0..=b` (`blk[..=b]`), from `psum[i]`, the group's
/// summed compressed probabilities over the `psum.len()` visible compressed tokens.
/// Forced blocks get `+inf`.
pub(crate) fn block_scores(cfg: &Config, psum: &[f32], b: usize, blk: &mut [f32]) {
    let (a, bb) = cfg.eq9_strides();
    let (a, bb) = (a as usize, bb as usize);
    let nc = psum.len() as isize;
    for (j, s) in blk[..=b].iter_mut().enumerate() {
        let first = (bb * j) as isize - (a as isize - 1);
        let mut acc = 0f32;
        for k in 0..(a + bb - 1) {
            let i = first + k as isize;
            if i >= 0 && i < nc {
                acc += overlap_count(k, a, bb) * psum[i as usize];
            }
        }
        *s = acc;
    }
    let (init, local) = (cfg.sel_init as usize, cfg.sel_local as usize);
    for s in blk[..=b].iter_mut().take(init) {
        *s = f32::INFINITY;
    }
    for s in blk[(b + 1).saturating_sub(local)..=b].iter_mut() {
        *s = f32::INFINITY;
    }
}

/// Top `min(n, b+1)` blocks of `blk[..=b]`, ties to the lower index, written ascending to
/// `sel[..count]`; returns `count`. `best` is scratch of `n` scores.
pub(crate) fn top_n(blk: &[f32], b: usize, n: usize, best: &mut [f32], sel: &mut [i32]) -> usize {
    let mut count = 0usize;
    for (j, &s) in blk[..=b].iter().enumerate() {
        if count == n && !(s > best[n - 1]) {
            continue;
        }
        // Insert after every score >= s: candidates come in ascending index, so equal
        // scores keep the lower index first.
        let mut pos = count.min(n - 1);
        if count < n {
            count += 1;
        }
        while pos > 0 && best[pos - 1] < s {
            best[pos] = best[pos - 1];
            sel[pos] = sel[pos - 1];
            pos -= 1;
        }
        best[pos] = s;
        sel[pos] = j as i32;
    }
    sel[..count].sort_unstable();
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_counts_sum_to_a_times_b() {
        for (a, b) in [(2, 4), (1, 1), (4, 4), (1, 4), (3, 2)] {
            let total: f32 = (0..a + b - 1).map(|k| overlap_count(k, a, b)).sum();
            assert_eq!(total, (a * b) as f32);
        }
    }

    #[test]
    fn top_n_breaks_ties_to_lower_index() {
        let blk = [1.0, 3.0, 3.0, 2.0, 3.0, 0.5];
        let (mut best, mut sel) = ([0f32; 3], [0i32; 3]);
        let c = top_n(&blk, 5, 3, &mut best, &mut sel);
        assert_eq!((c, sel), (3, [1, 2, 4]));
        let c = top_n(&blk, 5, 2, &mut best[..2], &mut sel[..2]);
        assert_eq!((c, &sel[..2]), (2, &[1, 2][..]));
        let c = top_n(&blk, 1, 3, &mut best, &mut sel);
        assert_eq!((c, &sel[..2]), (2, &[0, 1][..]));
    }

    #[test]
    fn top_n_matches_a_full_sort() {
        let mut x = 0x9e3779b97f4a7c15u64;
        for _ in 0..500 {
            let len = 1 + (x % 40) as usize;
            let blk: Vec<f32> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 7) as f32 // many ties
                })
                .collect();
            let n = 1 + (x % 9) as usize;
            let mut order: Vec<usize> = (0..len).collect();
            order.sort_by(|&i, &j| blk[j].partial_cmp(&blk[i]).unwrap().then(i.cmp(&j)));
            let mut want: Vec<i32> = order.iter().take(n).map(|&i| i as i32).collect();
            want.sort();
            let (mut best, mut sel) = (vec![0f32; n], vec![0i32; n]);
            let c = top_n(&blk, len - 1, n, &mut best, &mut sel);
            assert_eq!(&sel[..c], &want[..], "{blk:?} n={n}");
        }
    }
}
