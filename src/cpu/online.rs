//! An online softmax over tiles of keys shared by all heads of a GQA group (each K/V row
//! is loaded once for the whole group), over the kernels of `kernels/`.

use super::kernels::{Isa, Prefetch};
use crate::elem::Elem;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::tests::{close, simd};
    use crate::rng::Rng;

    /// The online softmax of a GQA group over several tiles, SIMD vs portable, bf16 rows.
    #[test]
    fn simd_online_softmax_matches_portable() {
        let Some(isa) = simd() else { return };
        let mut rng = Rng(11);
        for (g, dk, dv) in [(16, 128, 128), (5, 64, 40), (3, 8, 8), (8, 192, 128)] {
            let tiles = [32, 7, 32, 19];
            let total: usize = tiles.iter().sum();
            let q = rng.vec(g * dk, 0.3);
            let bf = |v: Vec<f32>| -> Vec<half::bf16> { v.iter().map(|&x| half::bf16::from_f32(x)).collect() };
            let (k, v) = (bf(rng.vec(total * dk, 1.0)), bf(rng.vec(total * dv, 1.0)));
            let mut outs = vec![];
            for which in [isa, Isa::PORTABLE] {
                let (mut m, mut l, mut acc) = (vec![0f32; g], vec![0f32; g], vec![0f32; g * dv]);
                let mut st = Online { m: &mut m, l: &mut l, acc: &mut acc, dv, isa: which };
                st.reset();
                let (mut kt, mut vt, mut sc) = (vec![0f32; 32 * dk], vec![0f32; 32 * dv], vec![0f32; g * 32]);
                let mut at = 0;
                for &n in &tiles {
                    let kr = &k[at * dk..][..n * dk];
                    let ktile = which.k_tile(kr, dk, &mut kt);
                    st.update(&q, ktile, &v[at * dv..][..n * dv], &mut vt, n, dk, &mut sc, (Prefetch::none(), Prefetch::none()));
                    at += n;
                }
                let mut out = vec![0f32; g * dv];
                for h in 0..g {
                    st.emit(h, 1.0, &mut out[h * dv..][..dv]);
                }
                outs.push(out);
            }
            for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
                // Outputs are convex combinations of values of magnitude <= 1.
                close(*a, *b, 1.0, &format!("online g {g} dk {dk} dv {dv} element {i}"));
            }
        }
    }
}
