//! Carves the caller's metadata arena into typed, disjoint slices. This is the only
//! place the cache turns raw bytes into typed references.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

use crate::error::{NsaError, Result};
use crate::layout::{ArenaHeader, Layout, PageCopy, PlanSeq, Region, SeqSlot, ARENA_ALIGN};

/// Plain-old-data element types a region may hold: every bit pattern is a valid value
/// and alignment is at most `ARENA_ALIGN`.
///
/// # Safety
/// Implementors must be `repr(C)` or primitive, contain no padding-sensitive invariants,
/// no references, and accept any bit pattern.
pub(crate) unsafe trait Pod: Copy + 'static {}
unsafe impl Pod for u32 {}
unsafe impl Pod for i32 {}
unsafe impl Pod for ArenaHeader {}
unsafe impl Pod for SeqSlot {}
unsafe impl Pod for PlanSeq {}
unsafe impl Pod for PageCopy {}

/// All regions of the arena, borrowed mutably at once (they are disjoint).
pub(crate) struct Parts<'p> {
    pub hdr: &'p mut ArenaHeader,
    pub raw_refcount: &'p mut [u32],
    pub raw_free: &'p mut [u32],
    pub cmp_refcount: &'p mut [u32],
    pub cmp_free: &'p mut [u32],
    pub seqs: &'p mut [SeqSlot],
    pub raw_tables: &'p mut [i32],
    pub cmp_tables: &'p mut [i32],
    pub plan_seqs: &'p mut [PlanSeq],
    pub plan_copies: &'p mut [PageCopy],
}

/// The same regions, borrowed shared.
#[derive(Clone, Copy)]
pub(crate) struct View<'p> {
    pub hdr: &'p ArenaHeader,
    pub raw_refcount: &'p [u32],
    pub raw_free: &'p [u32],
    pub cmp_refcount: &'p [u32],
    pub cmp_free: &'p [u32],
    pub seqs: &'p [SeqSlot],
    pub raw_tables: &'p [i32],
    pub cmp_tables: &'p [i32],
    pub plan_seqs: &'p [PlanSeq],
    pub plan_copies: &'p [PageCopy],
}

/// A checked pointer to the caller's arena: `lay.arena_bytes` bytes at `base`, aligned
/// to `ARENA_ALIGN`, exclusively borrowed for `'a`.
pub(crate) struct Arena<'a> {
    base: NonNull<u8>,
    lay: Layout,
    _mem: PhantomData<&'a mut [u8]>,
}

// No padding: a pointer and `usize`s (it is part of the C cache handle, in caller memory).
const _: () = assert!(std::mem::size_of::<Arena>() == std::mem::size_of::<usize>() + std::mem::size_of::<Layout>());

// SAFETY: the arena is exclusively borrowed memory of plain integers; moving the borrow
// between threads is as safe as moving a `&mut [u8]`.
unsafe impl Send for Arena<'_> {}
unsafe impl Sync for Arena<'_> {}

impl<'a> Arena<'a> {
    pub fn new(mem: &'a mut [u8], lay: Layout) -> Result<Self> {
        if mem.len() < lay.arena_bytes {
            return Err(NsaError::BufferTooSmall { what: "arena", got: mem.len(), need: lay.arena_bytes });
        }
        let addr = mem.as_ptr() as usize;
        if addr % ARENA_ALIGN != 0 {
            return Err(NsaError::Misaligned { what: "arena", addr, align: ARENA_ALIGN });
        }
        Ok(Arena { base: NonNull::from(mem).cast(), lay, _mem: PhantomData })
    }

    pub fn layout(&self) -> &Layout {
        &self.lay
    }

    /// Raw bytes of the arena's bookkeeping: every region but `step_layers` (the last,
    /// written atomically through `&self`, so never borrowed as plain bytes). For state
    /// snapshots in tests and the fuzzer.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `new` checked the buffer holds `arena_bytes` bytes borrowed for 'a; the
        // range ends where `step_layers` starts (it is the last region).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.lay.step_layers.offset) }
    }

    /// The `step_layers` words, shared: the only access to that region.
    pub fn step_layers(&self) -> &[AtomicU32] {
        let r = self.lay.step_layers;
        // SAFETY: the region lies inside the arena, 64-byte aligned (so 4-byte aligned for
        // AtomicU32, which has u32's size and alignment), and no `&`/`&mut` of plain
        // integers ever covers it (`parts`, `view` and `bytes` stop before it).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(r.offset).cast::<AtomicU32>(), r.len) }
    }

    /// # Safety
    /// `r` is one of `self.lay`'s regions, laid out for `T` (offset aligned, `len` elements).
    unsafe fn slice_mut<T: Pod>(&self, r: Region) -> &'a mut [T] {
        debug_assert_eq!(r.bytes, r.len * std::mem::size_of::<T>());
        debug_assert_eq!((self.base.as_ptr() as usize + r.offset) % std::mem::align_of::<T>(), 0);
        std::slice::from_raw_parts_mut(self.base.as_ptr().add(r.offset).cast::<T>(), r.len)
    }

    /// # Safety
    /// As `slice_mut`, and no mutable borrow of the region is live.
    unsafe fn slice<T: Pod>(&self, r: Region) -> &[T] {
        std::slice::from_raw_parts(self.base.as_ptr().add(r.offset).cast::<T>(), r.len)
    }

    pub fn parts(&mut self) -> Parts<'_> {
        let l = self.lay;
        // SAFETY: the layout's regions are disjoint, inside the arena and 64-byte aligned
        // relative to a 16-byte aligned base (tested in layout.rs); all types are Pod, so
        // any bytes the caller's buffer held are valid values. `&mut self` makes the
        // borrows exclusive for their lifetime.
        unsafe {
            Parts {
                hdr: &mut self.slice_mut::<ArenaHeader>(l.header)[0],
                raw_refcount: self.slice_mut(l.raw_refcount),
                raw_free: self.slice_mut(l.raw_free),
                cmp_refcount: self.slice_mut(l.cmp_refcount),
                cmp_free: self.slice_mut(l.cmp_free),
                seqs: self.slice_mut(l.seqs),
                raw_tables: self.slice_mut(l.raw_tables),
                cmp_tables: self.slice_mut(l.cmp_tables),
                plan_seqs: self.slice_mut(l.plan_seqs),
                plan_copies: self.slice_mut(l.plan_copies),
            }
        }
    }

    pub fn view(&self) -> View<'_> {
        let l = self.lay;
        // SAFETY: as in `parts`; `&self` makes these shared borrows, and no `Parts` can
        // exist at the same time because `parts` needs `&mut self`.
        unsafe {
            View {
                hdr: &self.slice::<ArenaHeader>(l.header)[0],
                raw_refcount: self.slice(l.raw_refcount),
                raw_free: self.slice(l.raw_free),
                cmp_refcount: self.slice(l.cmp_refcount),
                cmp_free: self.slice(l.cmp_free),
                seqs: self.slice(l.seqs),
                raw_tables: self.slice(l.raw_tables),
                cmp_tables: self.slice(l.cmp_tables),
                plan_seqs: self.slice(l.plan_seqs),
                plan_copies: self.slice(l.plan_copies),
            }
        }
    }
}
