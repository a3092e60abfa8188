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
