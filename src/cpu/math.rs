//! f32 building blocks of the CPU kernels: the portable versions of the kernels `Isa`
//! dispatches (dot products, scaled adds, softmax pieces, conversion), and an online
//! softmax over tiles of keys shared by all heads of a GQA group (each K/V row is loaded
//! once for the whole group).

use super::simd::{Isa, Prefetch};
use crate::elem::Elem;

/// Keys per tile: rows converted to f32 together and scored for every head at once. 32
/// keeps the f32 K and V tiles (2 x 16 KiB at DK = DV = 128) in L1 beside the queries and
/// scores (measured about 5% faster than 64 with the AVX2 kernels).
pub(crate) const TILE: usize = 32;
// A SIMD key tile pads its keys to a multiple of 16 (`Isa::k_tile`): TILE rows must fit.
const _: () = assert!(TILE % 16 == 0);

#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    // Eight independent partial sums let the compiler vectorize without reassociating.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `acc += p * x`.
#[inline]
pub(crate) fn axpy(acc: &mut [f32], p: f32, x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += p * v;
    }
}

/// Portable `scores` (see `Isa::scores`): one `dot` per (head, key).
pub(crate) fn scores(q: &[f32], g: usize, dk: usize, k: &[f32], n: usize, out: &mut [f32], stride: usize) {
    for h in 0..g {
        let qh = &q[h * dk..][..dk];
        for (j, o) in out[h * stride..][..n].iter_mut().enumerate() {
            *o = dot(qh, &k[j * dk..][..dk]);
        }
    }
}

/// Portable `pv` (see `Isa::pv`): one `axpy` per (head, key), keys ascending.
pub(crate) fn pv(p: &[f32], stride: usize, g: usize, v: &[f32], n: usize, dv: usize, acc: &mut [f32]) {
    for h in 0..g {
        let a = &mut acc[h * dv..][..dv];
        for (j, &pj) in p[h * stride..][..n].iter().enumerate() {
            axpy(a, pj, &v[j * dv..][..dv]);
        }
    }
}

/// Largest element (`-inf` for an empty slice).
pub(crate) fn max(s: &[f32]) -> f32 {
    s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `s[i] = exp(s[i] - mx)`; returns the sum of the new `s`.
pub(crate) fn exp_sum(s: &mut [f32], mx: f32) -> f32 {
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = (*x - mx).exp();
        sum += *x;
    }
    sum
}

/// Storage elements to f32, one at a time.
pub(crate) fn convert<T: Elem>(src: &[T], out: &mut [f32]) {
    for (o, s) in out.iter_mut().zip(src) {
        *o = s.to_f32();
    }
}

/// Online-softmax state of G heads: running max `m`, sum `l`, and unnormalised output.
pub(crate) struct Online<'w> {
    pub m: &'w mut [f32],
    pub l: &'w mut [f32],
    pub acc: &'w mut [f32],
    pub dv: usize,
    /// The kernels' instruction set.
    pub isa: Isa,
}

impl<'w> Online<'w> {
    pub fn reset(&mut self) {
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        self.acc.fill(0.0);
    }

    /// Attends the G pre-scaled queries `qf` (`[G, DK]`) to `n` keys (`kt`, a `k_tile`)
    /// and their values (`v`: `[n, DV]` storage rows, converted into `vt` after the
    /// scores, so the key tile is still in L1 when it is scored). `scores` is scratch of
    /// at least `G * n`. `next` is the (K, V) rows read after these, prefetched meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub fn update<T: Elem>(
        &mut self,
        qf: &[f32],
        kt: &[f32],
        v: &[T],
        vt: &mut [f32],
        n: usize,
        dk: usize,
        scores: &mut [f32],
        next: (Prefetch<'_>, Prefetch<'_>),
    ) {
        let (mut next_k, mut next_v) = next;
        let (g, dv, isa) = (self.m.len(), self.dv, self.isa);
        // All heads' scores first (each key loaded once per register block of heads),
        // then each head's running max and weights, then P.V for all heads.
        isa.scores(qf, g, dk, kt, n, scores, n, &mut next_k);
        for h in 0..g {
            let s = &mut scores[h * n..][..n];
            let mx = self.m[h].max(isa.max(s));
            let corr = (self.m[h] - mx).exp(); // exp(-inf) = 0 on the first tile
            if corr != 1.0 {
                isa.scale(&mut self.acc[h * dv..][..dv], corr);
            }
            self.l[h] = self.l[h] * corr + isa.exp_sum(s, mx);
            self.m[h] = mx;
        }
        let v = isa.to_f32(v, vt);
        isa.pv(scores, n, g, v, n, dv, self.acc, &mut next_v);
    }

    /// Normalised output of head `h` (zeros if no key was seen), scaled by `gate`, added to `out`.
    /// A NaN sum (a NaN or infinite score or value was seen) propagates: only an empty
    /// key set (`l == 0`) contributes nothing.
    pub fn emit(&self, h: usize, gate: f32, out: &mut [f32]) {
        let l = self.l[h];
        if l != 0.0 {
            let f = gate / l;
            self.isa.axpy(out, f, &self.acc[h * self.dv..][..self.dv]);
        }
    }
}
