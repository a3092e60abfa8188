//! Typed access to the host K/V pools of one layer, layout `[page][kv_head][token][dim]`
//! (HND): one head's rows of a page are contiguous, so a selection block is one slice.
//!
//! Several threads of one layer run hold the same `LayerStore`; the runner guarantees
//! that writes go only to rows of pages one task owns exclusively (see `cpu/mod.rs`).

use std::marker::PhantomData;

use crate::config::Config;
use crate::elem::Elem;
use crate::layout::Layout;

/// The four pools of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    RawK,
    RawV,
    CmpK,
    CmpV,
}

/// One layer's pools: a raw pointer plus the shape, shared by the tasks of a layer run.
#[derive(Clone, Copy)]
pub(crate) struct LayerStore<'p, T> {
    base: *mut T,
    offsets: [usize; 4],
    pages: [usize; 4],
    dims: [usize; 4],
    hkv: usize,
    page: usize,
    _mem: PhantomData<&'p mut [T]>,
}

// SAFETY: tasks on different threads touch disjoint rows for writing (runner contract);
// shared reads of rows nobody writes during the run are fine.
unsafe impl<T: Send> Send for LayerStore<'_, T> {}
unsafe impl<T: Sync> Sync for LayerStore<'_, T> {}

impl<'p, T: Elem> LayerStore<'p, T> {
    /// `pools` points to every layer's storage, `len` elements
    /// (`lay.pool_bytes / size_of::<T>()`).
    ///
    /// # Safety
    /// `pools..pools + len` is valid memory for `'p`, accessed only through views that
    /// follow the module contract (disjoint writes).
    pub unsafe fn new(cfg: &Config, lay: &Layout, pools: *mut T, len: usize, layer: u32) -> Self {
        let start = layer as usize * lay.layer_elems;
        assert!(start + lay.layer_elems <= len, "layer {layer} outside the pools");
        let (np, ncp) = (cfg.num_pages as usize, cfg.num_cmp_pages as usize);
        let (dk, dv) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
        LayerStore {
            base: pools.add(start),
            offsets: [lay.raw_k, lay.raw_v, lay.cmp_k, lay.cmp_v],
            pages: [np, np, ncp, ncp],
            dims: [dk, dv, dk, dv],
            hkv: cfg.num_kv_heads as usize,
            page: cfg.page_size as usize,
            _mem: PhantomData,
        }
    }

    /// Element offset of `rows` rows starting at `(page, kvh, off)` in `pool`; panics on
    /// any index outside the pool (a corrupted page table must not become a wild access).
    fn at(&self, pool: Pool, page: i32, kvh: usize, off: usize, rows: usize) -> (usize, usize) {
        let i = pool as usize;
        assert!(
            page >= 0 && (page as usize) < self.pages[i] && kvh < self.hkv && off + rows <= self.page,
            "pool access out of range: {pool:?} page {page} head {kvh} rows {off}..{}",
            off + rows
        );
        let d = self.dims[i];
        (self.offsets[i] + ((page as usize * self.hkv + kvh) * self.page + off) * d, rows * d)
    }

    /// Rows `off..off+rows` of one head of one page.
    ///
    /// # Safety
    /// No task writes these rows during the borrow.
    pub unsafe fn rows(&self, pool: Pool, page: i32, kvh: usize, off: usize, rows: usize) -> &'p [T] {
        let (o, n) = self.at(pool, page, kvh, off, rows);
        std::slice::from_raw_parts(self.base.add(o), n)
    }

    /// Mutable rows `off..off+rows` of one head of one page.
    ///
    /// # Safety
    /// The calling task owns these rows exclusively for the borrow (no other task reads
    /// or writes them).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn rows_mut(&self, pool: Pool, page: i32, kvh: usize, off: usize, rows: usize) -> &'p mut [T] {
        let (o, n) = self.at(pool, page, kvh, off, rows);
        std::slice::from_raw_parts_mut(self.base.add(o), n)
    }
}
