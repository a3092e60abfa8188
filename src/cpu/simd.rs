//! Run-time selection of the CPU kernels' instruction set. The crate is compiled for
//! baseline x86-64 (one binary for every CPU); on a CPU with AVX2, FMA and F16C the
//! attention kernels run copies compiled for those units (`#[target_feature]` entry
//! points over `#[inline(always)]` generic code), chosen once per process. Other CPUs and
//! other architectures use the portable kernels of `math.rs`.
//!
//! Every kernel computes each output element with a fixed sequence of operations that
//! does not depend on how the work is blocked (which heads or keys share a register
//! block, where a tile starts or ends), so a query's result is the same bits whatever the
//! batch, the chunking or the thread it runs on. The SIMD results differ from the
//! portable ones in the last bits only (FMA rounding, other summation orders, a
//! polynomial `exp`).

use super::math;
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
                unsafe { x86::k_tile(src, dk, out) };
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
                math::scores(q, g, dk, kt, n, out, stride)
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                let np = n.next_multiple_of(KT_ALIGN);
                assert!(kt.len() >= dk * np);
                // SAFETY: the CPU has AVX2+FMA (type invariant); the asserts above cover
                // every row and column the kernel reads or writes.
                unsafe { x86::scores(q.as_ptr(), g, dk, kt.as_ptr(), n, np, out.as_mut_ptr(), stride, pf) };
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
            Level::Portable => math::pv(p, stride, g, v, n, dv, acc),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                // SAFETY: as in `scores`.
                unsafe { x86::pv(p.as_ptr(), stride, g, v.as_ptr(), n, dv, acc.as_mut_ptr(), pf) };
                pf.rest();
            }
        }
    }

    /// Largest element (`-inf` for an empty slice).
    #[inline]
    pub fn max(self, s: &[f32]) -> f32 {
        match self.0 {
            Level::Portable => math::max(s),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 (type invariant); the kernel reads s only.
            Level::Avx2 => unsafe { x86::max(s) },
        }
    }

    /// `s[i] = exp(s[i] - mx)`; returns the sum of the new `s`.
    #[inline]
    pub fn exp_sum(self, s: &mut [f32], mx: f32) -> f32 {
        match self.0 {
            Level::Portable => math::exp_sum(s, mx),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2+FMA (type invariant); the kernel stays within s.
            Level::Avx2 => unsafe { x86::exp_sum(s, mx) },
        }
    }

    /// `s *= f`.
    #[inline]
    pub fn scale(self, s: &mut [f32], f: f32) {
        match self.0 {
            Level::Portable => s.iter_mut().for_each(|x| *x *= f),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 (type invariant); the kernel stays within s.
            Level::Avx2 => unsafe { x86::scale(s, f) },
        }
    }

    /// `acc += p * x` (over `min(acc.len(), x.len())` elements).
    #[inline]
    pub fn axpy(self, acc: &mut [f32], p: f32, x: &[f32]) {
        match self.0 {
            Level::Portable => math::axpy(acc, p, x),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2+FMA (type invariant); the kernel stays within both.
            Level::Avx2 => unsafe { x86::axpy(acc, p, x) },
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
            Level::Portable => math::convert(src, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2+F16C (type invariant); the lengths are equal.
            Level::Avx2 => unsafe { x86::convert(src, out) },
        }
    }
}

/// Cache lines to prefetch a few at a time while a kernel computes: the rows the caller
/// reads next (the next tile: a page or a selection block, not adjacent to this one in
/// memory, so the hardware prefetcher does not see it coming). Spreading the prefetches
/// over the kernel's loop hides the next tile's memory latency behind this tile's
/// compute without filling the line-fill buffers in one burst.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Prefetch<'a> {
    at: usize,
    bytes: usize,
    per: usize,
    base: *const i8,
    _rows: std::marker::PhantomData<&'a [u8]>,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl<'a> Prefetch<'a> {
    pub fn new<T>(rows: &'a [T]) -> Self {
        Prefetch { at: 0, bytes: std::mem::size_of_val(rows), per: 1, base: rows.as_ptr().cast(), _rows: std::marker::PhantomData }
    }

    #[cfg(test)]
    pub fn none() -> Self {
        Prefetch::new::<u8>(&[])
    }

    /// Prefetches the next cache line, if any is left (a hint: no fault, no effect on
    /// results).
    #[inline(always)]
    pub fn step(&mut self) {
        if self.at < self.bytes {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: at < bytes keeps the address inside the borrowed rows; prefetch is
            // SSE (baseline x86-64) and never faults.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                _mm_prefetch::<_MM_HINT_T1>(self.base.add(self.at));
            }
            self.at += 64;
        }
    }

    /// Spreads the lines left over `units` calls of `tick`.
    #[inline(always)]
    pub fn spread(&mut self, units: usize) {
        self.per = self.bytes.saturating_sub(self.at).div_ceil(64).div_ceil(units.max(1));
    }

    /// Prefetches the next `per` lines (see `spread`).
    #[inline(always)]
    pub fn tick(&mut self) {
        for _ in 0..self.per {
            self.step();
        }
    }

    /// Prefetches every line not prefetched yet.
    pub fn rest(&mut self) {
        while self.at < self.bytes {
            self.step();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 + FMA (+ F16C) kernels. Every function is `unsafe`: callers guarantee the CPU
    //! has those features (`Isa`'s invariant) and, for the pointer kernels, that the rows
    //! they name are in bounds. Helpers are `#[inline(always)]`, so they are compiled
    //! inside the `#[target_feature]` entry points.

    use std::any::TypeId;
    use std::arch::x86_64::*;

    use super::Prefetch;
    use crate::elem::Elem;

    /// f32 lanes of a vector.
    const W: usize = 8;
    /// Score register block: heads x vectors of 8 keys (8 accumulators: 2 FMA ports x
    /// 4 cycles of latency), over the transposed key tile.
    const SH: usize = 4;
    const SV: usize = 2;
    /// P.V register block: heads x vectors of 8 value columns.
    const PH: usize = 4;
    const PD: usize = 2;

    /// Loads `rem < W` floats, zero-filling the rest (no read past `p + rem`).
    #[inline(always)]
    unsafe fn load_part(p: *const f32, rem: usize) -> __m256 {
        let mut buf = [0f32; W];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), rem);
        _mm256_loadu_ps(buf.as_ptr())
    }

    /// Stores the first `rem < W` lanes of `x` to `p..p + rem`.
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, rem: usize, x: __m256) {
        let mut buf = [0f32; W];
        _mm256_storeu_ps(buf.as_mut_ptr(), x);
        std::ptr::copy_nonoverlapping(buf.as_ptr(), p, rem);
    }

    /// Sum of the lanes of `v` (one fixed tree).
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// 8x8 transpose: lane `b` of result `i` is lane `i` of `r[b]`.
    #[inline(always)]
    unsafe fn transpose8(r: &[__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// 8 storage elements at `p` as f32 (exact for every storage type).
    #[inline(always)]
    unsafe fn load8<T: Elem>(p: *const T) -> __m256 {
        if TypeId::of::<T>() == TypeId::of::<half::bf16>() {
            // bf16 is #[repr(transparent)] u16 and the top half of an f32: widen, shift.
            let raw = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
        } else if TypeId::of::<T>() == TypeId::of::<half::f16>() {
            // f16 is #[repr(transparent)] u16; F16C converts exactly (subnormals too).
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        } else if TypeId::of::<T>() == TypeId::of::<f32>() {
            _mm256_loadu_ps(p.cast())
        } else {
            let mut buf = [0f32; W];
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (*p.add(i)).to_f32();
            }
            _mm256_loadu_ps(buf.as_ptr())
        }
    }

    /// # Safety
    /// AVX2+F16C; `src` is `[n, dk]`, `out` holds `dk * np` floats, `np` = `n` rounded up
    /// to `KT_ALIGN`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn k_tile<T: Elem>(src: &[T], dk: usize, out: &mut [f32]) {
        let n = src.len() / dk;
        let np = n.next_multiple_of(super::KT_ALIGN);
        debug_assert!(out.len() >= dk * np);
        let (s, o) = (src.as_ptr(), out.as_mut_ptr());
        let dfull = dk / W * W;
        for j0 in (0..np).step_by(W) {
            let rows = n.saturating_sub(j0).min(W);
            for d0 in (0..dfull).step_by(W) {
                let mut r = [_mm256_setzero_ps(); W];
                for (b, x) in r.iter_mut().enumerate().take(rows) {
                    *x = load8(s.add((j0 + b) * dk + d0));
                }
                for (i, x) in transpose8(&r).iter().enumerate() {
                    _mm256_storeu_ps(o.add((d0 + i) * np + j0), *x);
                }
            }
            for d in dfull..dk {
                for b in 0..W {
                    *o.add(d * np + j0 + b) = if b < rows { (*s.add((j0 + b) * dk + d)).to_f32() } else { 0.0 };
                }
            }
        }
    }

    /// Scores of `HB` heads (rows of `q`, `dk` apart) against the keys of `KV` vectors of
    /// the transposed tile (columns from `kt`, rows `np` apart), `cols <= KV * W` of them
    /// stored (at `out[a * stride + c]`). A score is one FMA chain over `d` ascending,
    /// starting from zero (no horizontal sum): the same bits for any `HB`, `KV`, tile.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_block<const HB: usize, const KV: usize>(
        q: *const f32,
        dk: usize,
        kt: *const f32,
        np: usize,
        out: *mut f32,
        stride: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); KV]; HB];
        let mut kp = kt;
        for d in 0..dk {
            let mut kv = [_mm256_setzero_ps(); KV];
            for (v, x) in kv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(kp.add(v * W));
            }
            for (a, row) in acc.iter_mut().enumerate() {
                let qa = _mm256_broadcast_ss(&*q.add(a * dk + d));
                for (x, kvv) in row.iter_mut().zip(kv) {
                    *x = _mm256_fmadd_ps(qa, kvv, *x);
                }
            }
            kp = kp.add(np);
        }
        for (a, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let c = v * W;
                if c + W <= cols {
                    _mm256_storeu_ps(out.add(a * stride + c), *x);
                } else if c < cols {
                    store_part(out.add(a * stride + c), cols - c, *x);
                }
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_heads<const HB: usize>(q: *const f32, dk: usize, kt: *const f32, n: usize, np: usize, out: *mut f32, stride: usize, pf: &mut Prefetch<'_>) {
        let mut j = 0;
        while j + SV * W <= n {
            pf.tick();
            score_block::<HB, SV>(q, dk, kt.add(j), np, out.add(j), stride, SV * W);
            j += SV * W;
        }
        while j < n {
            score_block::<HB, 1>(q, dk, kt.add(j), np, out.add(j), stride, (n - j).min(W));
            j += W;
        }
    }

    /// # Safety
    /// AVX2+FMA; `q` holds `g * dk` floats, `kt` `dk * np` (a `k_tile`), `out`
    /// `(g-1) * stride + n`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores(q: *const f32, g: usize, dk: usize, kt: *const f32, n: usize, np: usize, out: *mut f32, stride: usize, pf: &mut Prefetch<'_>) {
        pf.spread(g.div_ceil(SH) * (n / (SV * W)));
        let mut h = 0;
        while h + SH <= g {
            score_heads::<SH>(q.add(h * dk), dk, kt, n, np, out.add(h * stride), stride, pf);
            h += SH;
        }
        while h < g {
            score_heads::<1>(q.add(h * dk), dk, kt, n, np, out.add(h * stride), stride, pf);
            h += 1;
        }
    }

    /// `acc[a][..]` += sum_j `p[a * stride + j] * v_j[..]` for `HB` heads over `DB` full
    /// vectors of the value rows from column `col`; each element is one FMA chain over
    /// `j` ascending: the same bits for any `HB`, `DB`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_block<const HB: usize, const DB: usize>(p: *const f32, stride: usize, v: *const f32, n: usize, dv: usize, acc: *mut f32, col: usize) {
        let mut r = [[_mm256_setzero_ps(); DB]; HB];
        for (a, row) in r.iter_mut().enumerate() {
            for (b, x) in row.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(acc.add(a * dv + col + b * W));
            }
        }
        for j in 0..n {
            let mut vv = [_mm256_setzero_ps(); DB];
            for (b, x) in vv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(v.add(j * dv + col + b * W));
            }
            for (a, row) in r.iter_mut().enumerate() {
                let pa = _mm256_broadcast_ss(&*p.add(a * stride + j));
                for (x, vb) in row.iter_mut().zip(vv) {
                    *x = _mm256_fmadd_ps(pa, vb, *x);
                }
            }
        }
        for (a, row) in r.iter().enumerate() {
            for (b, x) in row.iter().enumerate() {
                _mm256_storeu_ps(acc.add(a * dv + col + b * W), *x);
            }
        }
    }

    /// The last `rem < W` columns (from `col`) of `HB` heads, as `pv_block` does them.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_part<const HB: usize>(p: *const f32, stride: usize, v: *const f32, n: usize, dv: usize, acc: *mut f32, col: usize, rem: usize) {
        let mut r = [_mm256_setzero_ps(); HB];
        for (a, x) in r.iter_mut().enumerate() {
            *x = load_part(acc.add(a * dv + col), rem);
        }
        for j in 0..n {
            let vv = load_part(v.add(j * dv + col), rem);
            for (a, x) in r.iter_mut().enumerate() {
                *x = _mm256_fmadd_ps(_mm256_broadcast_ss(&*p.add(a * stride + j)), vv, *x);
            }
        }
        for (a, x) in r.iter().enumerate() {
            store_part(acc.add(a * dv + col), rem, *x);
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_heads<const HB: usize>(p: *const f32, stride: usize, v: *const f32, n: usize, dv: usize, acc: *mut f32, pf: &mut Prefetch<'_>) {
        let (full, rem) = (dv / W, dv % W);
        let mut c = 0;
        while c + PD <= full {
            pf.tick();
            pv_block::<HB, PD>(p, stride, v, n, dv, acc, c * W);
            c += PD;
        }
        while c < full {
            pv_block::<HB, 1>(p, stride, v, n, dv, acc, c * W);
            c += 1;
        }
        if rem != 0 {
            pv_part::<HB>(p, stride, v, n, dv, acc, full * W, rem);
        }
    }

    /// # Safety
    /// AVX2+FMA; `p` holds `(g-1) * stride + n` floats, `v` `n * dv`, `acc` `g * dv`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pv(p: *const f32, stride: usize, g: usize, v: *const f32, n: usize, dv: usize, acc: *mut f32, pf: &mut Prefetch<'_>) {
        pf.spread(g.div_ceil(PH) * (dv / W / PD));
        let mut h = 0;
        while h + PH <= g {
            pv_heads::<PH>(p.add(h * stride), stride, v, n, dv, acc.add(h * dv), pf);
            h += PH;
        }
        while h < g {
            pv_heads::<1>(p.add(h * stride), stride, v, n, dv, acc.add(h * dv), pf);
            h += 1;
        }
    }

    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn max(s: &[f32]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut ch = s.chunks_exact(W);
        for c in &mut ch {
            m = _mm256_max_ps(m, _mm256_loadu_ps(c.as_ptr()));
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let mut mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        for &x in ch.remainder() {
            mx = mx.max(x);
        }
        mx
    }

    /// `exp(x)` for every lane: Cephes' `expf` (range reduction by ln 2 in two parts, a
    /// degree-6 polynomial), within 2 ulp of the true value for `x` in [-87.3, 88];
    /// `x` below is clamped to -87.3 (a result of ~1e-38 instead of 0), NaN propagates.
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        // max/min return their second operand when either is NaN: x comes second.
        let x = _mm256_min_ps(_mm256_set1_ps(88.0), _mm256_max_ps(_mm256_set1_ps(-87.33654), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        // 2^n from the exponent bits (n in [-126, 127] after the clamp).
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    /// # Safety
    /// AVX2+FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(s: &mut [f32], mx: f32) -> f32 {
        let m = _mm256_set1_ps(mx);
        let mut sum = _mm256_setzero_ps();
        let mut ch = s.chunks_exact_mut(W);
        for c in &mut ch {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm256_add_ps(sum, e);
        }
        let rest = ch.into_remainder();
        let mut total = hsum(sum);
        if !rest.is_empty() {
            let e = exp(_mm256_sub_ps(load_part(rest.as_ptr(), rest.len()), m));
            let mut buf = [0f32; W];
            _mm256_storeu_ps(buf.as_mut_ptr(), e);
            for (x, y) in rest.iter_mut().zip(buf) {
                *x = y;
                total += y;
            }
        }
        total
    }

    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn scale(s: &mut [f32], f: f32) {
        let fv = _mm256_set1_ps(f);
        let mut ch = s.chunks_exact_mut(W);
        for c in &mut ch {
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), fv));
        }
        ch.into_remainder().iter_mut().for_each(|x| *x *= f);
    }

    /// # Safety
    /// AVX2+FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(acc: &mut [f32], p: f32, x: &[f32]) {
        let len = acc.len().min(x.len());
        let (acc, x) = (&mut acc[..len], &x[..len]);
        let pv = _mm256_set1_ps(p);
        let mut ca = acc.chunks_exact_mut(W);
        let mut cx = x.chunks_exact(W);
        for (a, b) in (&mut ca).zip(&mut cx) {
            _mm256_storeu_ps(a.as_mut_ptr(), _mm256_fmadd_ps(pv, _mm256_loadu_ps(b.as_ptr()), _mm256_loadu_ps(a.as_ptr())));
        }
        for (a, b) in ca.into_remainder().iter_mut().zip(cx.remainder()) {
            *a = p.mul_add(*b, *a);
        }
    }

    /// # Safety
    /// AVX2+F16C; `out.len() == src.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn convert<T: Elem>(src: &[T], out: &mut [f32]) {
        debug_assert_eq!(src.len(), out.len());
        let mut i = 0;
        while i + W <= src.len() {
            _mm256_storeu_ps(out.as_mut_ptr().add(i), load8(src.as_ptr().add(i)));
            i += W;
        }
        for (o, x) in out[i..].iter_mut().zip(&src[i..]) {
            *o = x.to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::math::Online;

    struct Rng(u64);
    impl Rng {
        fn f(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.f() * scale).collect()
        }
    }

    /// The SIMD kernels of this CPU, or a printed skip.
    fn simd() -> Option<Isa> {
        let isa = Isa::get();
        if isa == Isa::PORTABLE {
            eprintln!("SKIPPED: this CPU has no AVX2+FMA+F16C (or is not x86-64): only the portable kernels exist");
            return None;
        }
        eprintln!("testing the {} kernels against the portable ones", isa.name());
        Some(isa)
    }

    /// |a - b| <= 1e-5 * scale, where `scale` bounds the magnitude of the terms summed
    /// (sum of |products|), so cancellation does not inflate the relative error.
    fn close(a: f32, b: f32, scale: f32, what: &str) {
        assert!((a - b).abs() <= 1e-5 * scale.max(f32::MIN_POSITIVE), "{what}: simd {a} vs portable {b} (scale {scale})");
    }

    fn dims() -> Vec<usize> {
        let mut d: Vec<usize> = (1..=40).collect();
        d.extend((48..=512).step_by(8));
        d.extend([63, 65, 127, 129, 255, 257, 511]);
        d
    }

    #[test]
    fn simd_matches_portable() {
        let Some(isa) = simd() else { return };
        let port = Isa::PORTABLE;
        let mut rng = Rng(0x243f_6a88_85a3_08d3);
        for dim in dims() {
            // 6 heads and 37 keys: full register blocks plus remainders of both.
            let (g, n, stride) = (6, 37, 40);
            let q = rng.vec(g * dim, 1.0);
            let k = rng.vec(n * dim, 1.0);
            let (mut s1, mut s2) = (vec![0f32; g * stride], vec![0f32; g * stride]);
            let mut buf = vec![0f32; 48 * dim];
            isa.scores(&q, g, dim, isa.k_tile(&k, dim, &mut buf), n, &mut s1, stride, &mut Prefetch::new(&k));
            port.scores(&q, g, dim, port.k_tile(&k, dim, &mut buf), n, &mut s2, stride, &mut Prefetch::none());
            for h in 0..g {
                for j in 0..n {
                    let mag: f32 = (0..dim).map(|i| (q[h * dim + i] * k[j * dim + i]).abs()).sum();
                    close(s1[h * stride + j], s2[h * stride + j], mag, &format!("scores dim {dim} h {h} j {j}"));
                }
            }

            let p: Vec<f32> = rng.vec(g * stride, 1.0).iter().map(|x| x.abs()).collect();
            let v = rng.vec(n * dim, 1.0);
            let acc0 = rng.vec(g * dim, 1.0);
            let (mut a1, mut a2) = (acc0.clone(), acc0.clone());
            isa.pv(&p, stride, g, &v, n, dim, &mut a1, &mut Prefetch::none());
            port.pv(&p, stride, g, &v, n, dim, &mut a2, &mut Prefetch::none());
            for h in 0..g {
                for c in 0..dim {
                    let mag = acc0[h * dim + c].abs() + (0..n).map(|j| (p[h * stride + j] * v[j * dim + c]).abs()).sum::<f32>();
                    close(a1[h * dim + c], a2[h * dim + c], mag, &format!("pv dim {dim} h {h} col {c}"));
                }
            }

            let x = rng.vec(dim, 30.0);
            assert_eq!(isa.max(&x), port.max(&x), "max dim {dim}");
            let mx = port.max(&x);
            let (mut e1, mut e2) = (x.clone(), x.clone());
            let (t1, t2) = (isa.exp_sum(&mut e1, mx), port.exp_sum(&mut e2, mx));
            close(t1, t2, t2, &format!("exp sum dim {dim}"));
            for (a, b) in e1.iter().zip(&e2) {
                close(*a, *b, *b, &format!("exp dim {dim}"));
            }

            let (mut y1, mut y2) = (acc0[..dim].to_vec(), acc0[..dim].to_vec());
            isa.axpy(&mut y1, 0.37, &x);
            port.axpy(&mut y2, 0.37, &x);
            for ((a, b), (y0, xi)) in y1.iter().zip(&y2).zip(acc0.iter().zip(&x)) {
                close(*a, *b, y0.abs() + (0.37 * xi).abs(), &format!("axpy dim {dim}"));
            }
            isa.scale(&mut y1, 1.7);
            port.scale(&mut y2, 1.7);
            for (a, b) in y1.iter().zip(&y2) {
                close(*a, *b, 4.0 * b.abs(), &format!("scale dim {dim}"));
            }

            // Conversions are exact: equal bits.
            let hb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let hf: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v * 1e-4)).collect();
            let (mut b1, mut b2) = (vec![0f32; dim], vec![0f32; dim]);
            assert_eq!(isa.to_f32(&hb, &mut b1).to_vec(), port.to_f32(&hb, &mut b2).to_vec(), "bf16 dim {dim}");
            assert_eq!(isa.to_f32(&hf, &mut b1).to_vec(), port.to_f32(&hf, &mut b2).to_vec(), "f16 dim {dim}");
        }
    }

    /// A score or a P.V column gets the same bits whichever keys share its register
    /// block or tile (what keeps a query's output independent of batching and chunking).
    #[test]
    fn simd_blocking_does_not_change_bits() {
        let Some(isa) = simd() else { return };
        let mut rng = Rng(7);
        for dim in [8, 24, 60, 128] {
            for g in [1, 7, 16, 21, 40] {
                let n = 19;
                let q = rng.vec(g * dim, 1.0);
                let k: Vec<half::bf16> = rng.vec(n * dim, 1.0).iter().map(|&x| half::bf16::from_f32(x)).collect();
                let mut buf = vec![0f32; 32 * dim];
                let mut all = vec![0f32; g * n];
                isa.scores(&q, g, dim, isa.k_tile(&k, dim, &mut buf), n, &mut all, n, &mut Prefetch::new(&k));
                for (j0, j1) in [(0, 1), (1, 4), (4, 13), (13, 19)] {
                    let mut part = vec![0f32; g * n];
                    let kt = isa.k_tile(&k[j0 * dim..j1 * dim], dim, &mut buf);
                    isa.scores(&q, g, dim, kt, j1 - j0, &mut part, n, &mut Prefetch::none());
                    for h in 0..g {
                        for j in j0..j1 {
                            assert_eq!(part[h * n + j - j0].to_bits(), all[h * n + j].to_bits(), "dim {dim} g {g} h {h} j {j}");
                        }
                    }
                }
                let v = rng.vec(n * dim, 1.0);
                let mut acc = vec![0f32; g * dim];
                isa.pv(&all, n, g, &v, n, dim, &mut acc, &mut Prefetch::new(&q));
                for h in 0..g {
                    let mut one = vec![0f32; dim];
                    isa.pv(&all[h * n..][..n], n, 1, &v, n, dim, &mut one, &mut Prefetch::none());
                    assert_eq!(one, acc[h * dim..][..dim].to_vec(), "pv dim {dim} g {g} h {h}");
                }
            }
        }
    }

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

    #[test]
    fn exp_is_accurate() {
        let Some(isa) = simd() else { return };
        let mut xs: Vec<f32> = (0..20000).map(|i| -87.0 + i as f32 * (87.0 + 80.0) / 20000.0).collect();
        xs.extend([0.0, -0.0, -1e-30, 1e-30, 88.0]);
        let mut e = xs.clone();
        isa.exp_sum(&mut e, 0.0);
        for (x, y) in xs.iter().zip(&e) {
            let want = (*x as f64).exp();
            assert!(((*y as f64) - want).abs() <= 3.0 * f32::EPSILON as f64 * want, "exp({x}) = {y}, want {want}");
        }
        let mut nan = [f32::NAN; 9];
        assert!(isa.exp_sum(&mut nan, 0.0).is_nan());
    }
}

/// In-cache rates of the SIMD kernels on one tile (G = 16, DK = DV = 128, TILE keys):
/// `cargo test --release --lib kernel_rates -- --ignored --nocapture`.
#[cfg(test)]
mod rates {
    use super::*;
    use crate::cpu::math::TILE;

    #[test]
    #[ignore]
    fn kernel_rates() {
        let isa = Isa::get();
        let (g, n, d) = (16usize, TILE, 128usize);
        let q: Vec<f32> = (0..g * d).map(|i| (i % 7) as f32 * 0.01).collect();
        let kf: Vec<f32> = (0..n * d).map(|i| (i % 5) as f32 * 0.01).collect();
        let kb: Vec<half::bf16> = kf.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let (mut s, mut acc, mut buf, mut kt) = (vec![0f32; g * n], vec![0f32; g * d], vec![0f32; n * d], vec![0f32; n * d]);
        isa.k_tile(&kf, d, &mut kt);
        println!("{} kernels, {g} heads x {n} keys x {d} dims:", isa.name());
        for which in ["scores", "pv", "exp_sum", "k_tile (bf16)", "to_f32 (bf16)"] {
            let reps = 50_000;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                match which {
                    "scores" => isa.scores(&q, g, d, &kt, n, &mut s, n, &mut Prefetch::none()),
                    "pv" => isa.pv(&s, n, g, &kf, n, d, &mut acc, &mut Prefetch::none()),
                    "exp_sum" => {
                        s.fill(0.5);
                        for h in 0..g {
                            std::hint::black_box(isa.exp_sum(&mut s[h * n..][..n], 1.0));
                        }
                    }
                    "k_tile (bf16)" => {
                        std::hint::black_box(isa.k_tile(&kb, d, &mut buf));
                    }
                    _ => {
                        std::hint::black_box(isa.to_f32(&kb, &mut buf));
                    }
                }
                std::hint::black_box((&mut s, &mut acc));
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            println!("  {which:14} {:6.2} us/tile  ({:.0} GFLOP/s for a G x TILE x D product)", dt * 1e6, (2 * g * n * d) as f64 / dt / 1e9);
        }
    }
}
