//! f32 building blocks of the CPU kernels: dot products, scaled adds, and an online
//! softmax over tiles of keys shared by all heads of a GQA group (each K/V row is loaded
//! once for the whole group).

use crate::elem::Elem;

/// Keys per tile: rows converted to f32 together and scored for every head at once.
pub(crate) const TILE: usize = 64;

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

/// Converts `rows` storage rows into f32 (a no-op view for f32 storage).
#[inline]
pub(crate) fn to_f32<'b, T: Elem>(src: &'b [T], buf: &'b mut [f32]) -> &'b [f32] {
    if let Some(f) = T::as_f32_slice(src) {
        return f;
    }
    let out = &mut buf[..src.len()];
    for (o, s) in out.iter_mut().zip(src) {
        *o = s.to_f32();
    }
    out
}

/// Online-softmax state of G heads: running max `m`, sum `l`, and unnormalised output.
pub(crate) struct Online<'w> {
    pub m: &'w mut [f32],
    pub l: &'w mut [f32],
    pub acc: &'w mut [f32],
    pub dv: usize,
}

impl<'w> Online<'w> {
    pub fn reset(&mut self) {
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        self.acc.fill(0.0);
    }

    /// Attends the G pre-scaled queries `qf` (`[G, DK]`) to `n` keys/values (f32 rows).
    /// `scores` is scratch of at least `G * n`.
    pub fn update(&mut self, qf: &[f32], k: &[f32], v: &[f32], n: usize, dk: usize, scores: &mut [f32]) {
        let g = self.m.len();
        let dv = self.dv;
        for h in 0..g {
            let q = &qf[h * dk..][..dk];
            let s = &mut scores[h * n..][..n];
            let mut mx = self.m[h];
            for (j, sj) in s.iter_mut().enumerate() {
                *sj = dot(q, &k[j * dk..][..dk]);
                mx = mx.max(*sj);
            }
            let corr = (self.m[h] - mx).exp(); // exp(-inf) = 0 on the first tile
            let acc = &mut self.acc[h * dv..][..dv];
            if corr != 1.0 {
                acc.iter_mut().for_each(|a| *a *= corr);
            }
            let mut l = self.l[h] * corr;
            for (j, sj) in s.iter().enumerate() {
                let p = (sj - mx).exp();
                l += p;
                axpy(acc, p, &v[j * dv..][..dv]);
            }
            self.m[h] = mx;
            self.l[h] = l;
        }
    }

    /// Normalised output of head `h` (zeros if no key was seen), scaled by `gate`, added to `out`.
    pub fn emit(&self, h: usize, gate: f32, out: &mut [f32]) {
        let l = self.l[h];
        if l > 0.0 {
            let f = gate / l;
            axpy(out, f, &self.acc[h * self.dv..][..self.dv]);
        }
    }
}
