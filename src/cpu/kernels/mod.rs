//! Run-time selection of the CPU kernels' instruction set. The crate is compiled for
//! baseline x86-64 (one binary for every CPU); on a CPU with AVX2, FMA and F16C the
//! attention kernels run copies compiled for those units (`#[target_feature]` entry
//! points over `#[inline(always)]` generic code), chosen once per process. Other CPUs and
//! other architectures use the portable kernels of `portable.rs`.
//!
//! Every kernel computes each output element with a fixed sequence of operations that
//! does not depend on how the work is blocked (which heads or keys share a register
//! block, where a tile starts or ends), so a query's result is the same bits whatever the
//! batch, the chunking or the thread it runs on. The SIMD results differ from the
//! portable ones in the last bits only (FMA rounding, other summation orders, a
//! polynomial `exp`).

#[cfg(target_arch = "x86_64")]
mod avx2;
mod portable;
mod prefetch;
#[cfg(test)]
pub(crate) mod tests;

pub(crate) use prefetch::Prefetch;

use crate::elem::Elem;

/// The kernels' instruction set.
///
/// Invariant (what the `unsafe` calls below rely on): a value other than
/// [`Isa::PORTABLE`] is made only by `detect`, after checking that the running CPU has
/// every feature its kernels are compiled for. The field is private to this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Isa(Level);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Portable,
    /// AVX2 + FMA + F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// Columns of a transposed key tile are padded to a multiple of this (zeros).
#[cfg(target_arch = "x86_64")]
const KT_ALIGN: usize = 16;

/// Keys per tile: rows converted to f32 together and scored for every head at once. 32
/// keeps the f32 K and V tiles (2 x 16 KiB at DK = DV = 128) in L1 beside the queries and
/// scores (measured about 5% faster than 64 with the AVX2 kernels).
pub(crate) const TILE: usize = 32;
// A SIMD key tile pads its keys to a multiple of 16 (`Isa::k_tile`): TILE rows must fit.
const _: () = assert!(TILE % 16 == 0);

impl Isa {
    /// The portable kernels (any CPU).
    pub const PORTABLE: Isa = Isa(Level::Portable);

    /// The best instruction set of this CPU, detected on the first call and cached
    /// (no allocation, so it may run inside a step).
    #[inline]
    pub fn get() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::atomic::{AtomicU8, Ordering};
            // 0: not detected yet, 1: portable, 2: AVX2.
            static LEVEL: AtomicU8 = AtomicU8::new(0);
            match LEVEL.load(Ordering::Relaxed) {
                1 => Isa::PORTABLE,
                2 => Isa(Level::Avx2),
                _ => {
                    let isa = Self::detect();
                    LEVEL.store(if isa == Isa::PORTABLE { 1 } else { 2 }, Ordering::Relaxed);
                    isa
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::PORTABLE
    }

    #[cfg(target_arch = "x86_64")]
    fn detect() -> Isa {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            return Isa(Level::Avx2);
        }
        Isa::PORTABLE
    }

    /// Short name for reports.
    #[cfg(test)]
    pub fn name(self) -> &'static str {
        match self.0 {
            Level::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => "avx2+fma",
        }
    }

    /// `n` key rows (`src`: `[n, dk]`, storage type) as the f32 tile `scores` reads: the
    /// rows themselves (portable; f32 storage is not copied), or for the SIMD kernels the
    /// transpose `[dk, np]`, `np` = `n` rounded up to 16 (zero columns), written to `buf`
    /// (at least `dk * np` floats).
    #[inline]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub fn k_tile<'b, T: Elem>(self, src: &'b [T], dk: usize, buf: &'b mut [f32]) -> &'b [f32] {
        match self.0 {
            Level::Portable => self.to_f32(src, buf),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                let n = src.len() / dk;
                assert_eq!(src.len(), n * dk);
                let out = &mut buf[..dk * n.next_multiple_of(KT_ALIGN)];
                // SAFETY: the CPU has AVX2+F16C (type invariant); out holds dk * np floats.
                unsafe { avx2::k_tile(src, dk, out) };
                out
            }
        }
    }

    /// `out[h * stride + j] = q_h . k_j` for the `g` rows `q_h` of `q` (`[g, dk]`) and
    /// the `n` keys of `kt` (made by `k_tile`). Prefetches `pf` meanwhile (SIMD only).
    #[allow(clippy::too_many_arguments)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub fn scores(self, q: &[f32], g: usize, dk: usize, kt: &[f32], n: usize, out: &mut [f32], stride: usize, pf: &mut Prefetch<'_>) {
        if g == 0 || n == 0 {
            return;
        }
        assert!(q.len() >= g * dk && stride >= n && out.len() >= (g - 1) * stride + n);
        match self.0 {
            Level::Portable => {
                assert!(kt.len() >= n * dk);
                portable::scores(q, g, dk, kt, n, out, stride)
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                let np = n.next_multiple_of(KT_ALIGN);
                assert!(kt.len() >= dk * np);
                // SAFETY: the CPU has AVX2+FMA (type invariant); the asserts above cover
                // every row and column the kernel reads or writes.
                unsafe { avx2::scores(q.as_ptr(), g, dk, kt.as_ptr(), n, np, out.as_mut_ptr(), stride, pf) };
                pf.rest();
            }
        }
    }

    /// `acc_h += sum_j p[h * stride + j] * v_j` for the `g` rows `acc_h` of `acc`
    /// (`[g, dv]`) and the `n` rows `v_j` of `v` (`[n, dv]`), `j` ascending. Prefetches
    /// `pf` meanwhile (SIMD only).
    #[allow(clippy::too_many_arguments)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub fn pv(self, p: &[f32], stride: usize, g: usize, v: &[f32], n: usize, dv: usize, acc: &mut [f32], pf: &mut Prefetch<'_>) {
        if g == 0 || n == 0 {
            return;
        }
        assert!(p.len() >= (g - 1) * stride + n && v.len() >= n * dv && acc.len() >= g * dv);
        match self.0 {
            Level::Portable => portable::pv(p, stride, g, v, n, dv, acc),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                // SAFETY: as in `scores`.
                unsafe { avx2::pv(p.as_ptr(), stride, g, v.as_ptr(), n, dv, acc.as_mut_ptr(), pf) };
                pf.rest();
            }
        }
    }

    /// Largest element (`-inf` for an empty slice).
    #[inline]
    pub fn max(self, s: &[f32]) -> f32 {
        match self.0 {
            Level::Portable => portable::max(s),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 (type invariant); the kernel reads s only.
            Level::Avx2 => unsafe { avx2::max(s) },
        }
    }

    /// `s[i] = exp(s[i] - mx)`; returns the sum of the new `s`.
    #[inline]
    pub fn exp_sum(self, s: &mut [f32], mx: f32) -> f32 {
        match self.0 {
            Level::Portable => portable::exp_sum(s, mx),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2+FMA (type invariant); the kernel stays within s.
            Level::Avx2 => unsafe { avx2::exp_sum(s, mx) },
        }
    }

    /// `s *= f`.
    #[inline]
    pub fn scale(self, s: &mut [f32], f: f32) {
        match self.0 {
            Level::Portable => s.iter_mut().for_each(|x| *x *= f),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 (type invariant); the kernel stays within s.
            Level::Avx2 => unsafe { avx2::scale(s, f) },
        }
    }

    /// `acc += p * x` (over `min(acc.len(), x.len())` elements).
    #[inline]
    pub fn axpy(self, acc: &mut [f32], p: f32, x: &[f32]) {
        match self.0 {
            Level::Portable => portable::axpy(acc, p, x),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2+FMA (type invariant); the kernel stays within both.
            Level::Avx2 => unsafe { avx2::axpy(acc, p, x) },
        }
    }

    /// Storage rows as f32: `src` itself for f32 storage, else converted into `buf`.
    #[inline]
    pub fn to_f32<'b, T: Elem>(self, src: &'b [T], buf: &'b mut [f32]) -> &'b [f32] {
        if let Some(f) = T::as_f32_slice(src) {
            return f;
        }
        let out = &mut buf[..src.len()];
        self.convert(src, out);
        out
    }

    /// `out = src` as f32 (exact); `out.len() == src.len()`.
    #[inline]
    pub fn convert<T: Elem>(self, src: &[T], out: &mut [f32]) {
        assert_eq!(src.len(), out.len());
        match self.0 {
            Level::Portable => portable::convert(src, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2+F16C (type invariant); the lengths are equal.
            Level::Avx2 => unsafe { avx2::convert(src, out) },
        }
    }
}
