//! A page pool in the arena: a refcount per page and a LIFO free stack. Callers check
//! `free()` before taking pages, so `take` never fails halfway through a call.

/// Mutable view of one pool (raw or compressed).
pub(crate) struct PoolMut<'p> {
    pub refcount: &'p mut [u32],
    pub stack: &'p mut [u32],
    pub free: &'p mut u32,
}

impl PoolMut<'_> {
    /// Puts every page on the free stack, page 0 on top.
    pub fn reset(&mut self) {
        let n = self.refcount.len();
        self.refcount.fill(0);
        for (i, s) in self.stack.iter_mut().enumerate() {
            *s = (n - 1 - i) as u32;
        }
        *self.free = n as u32;
    }

    /// Takes a free page with refcount 1. The caller has checked `*free > 0`.
    pub fn take(&mut self) -> u32 {
        assert!(*self.free > 0, "page pool: take from an empty pool (caller must check)");
        *self.free -= 1;
        let page = self.stack[*self.free as usize];
        debug_assert_eq!(self.refcount[page as usize], 0);
        self.refcount[page as usize] = 1;
        page
    }

    /// Adds a holder to a live page (fork).
    pub fn share(&mut self, page: u32) {
        debug_assert!(self.refcount[page as usize] > 0);
        self.refcount[page as usize] += 1;
    }

    /// Undoes the last `release` of `page` (abort_step): when that release freed it, it is
    /// the top of the free stack.
    pub fn unrelease(&mut self, page: u32) {
        if self.refcount[page as usize] == 0 {
            assert!(*self.free > 0 && self.stack[*self.free as usize - 1] == page, "page pool: unrelease of {page}, not the last freed");
            *self.free -= 1;
        }
        self.refcount[page as usize] += 1;
    }

    /// Drops one holder; the page returns to the free stack when none is left.
    pub fn release(&mut self, page: u32) {
        let rc = &mut self.refcount[page as usize];
        assert!(*rc > 0, "page pool: release of free page {page}");
        *rc -= 1;
        if *rc == 0 {
            self.stack[*self.free as usize] = page;
            *self.free += 1;
        }
    }
}
