//! The portable kernels (any CPU): what `Isa` runs where AVX2+FMA+F16C are missing, and
//! the results the SIMD kernels are tested against.

use crate::elem::Elem;

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
