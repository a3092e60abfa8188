//! Software prefetch of the rows a kernel's caller reads next.

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
