//! An owned, zeroed, 64-byte aligned host buffer: the simplest way for a Rust caller to
//! own the memory the engine asks for (`Cache::arena_bytes`, `CpuBackend::buffer_bytes`).
//! Allocated once, up front; the engine itself never allocates per step.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;

pub struct HostBuf {
    ptr: NonNull<u8>,
    len: usize,
}

const ALIGN: usize = 64;

/// A 64-byte aligned type, for the dangling pointer of an empty buffer.
#[repr(align(64))]
struct Line;

// SAFETY: HostBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for HostBuf {}
unsafe impl Sync for HostBuf {}

impl HostBuf {
    /// `len` zeroed bytes aligned to 64 (a cache line; the engine asks for 16).
    pub fn new(len: usize) -> HostBuf {
        if len == 0 {
            return HostBuf { ptr: NonNull::<Line>::dangling().cast(), len };
        }
        let layout = Layout::from_size_align(len, ALIGN).expect("HostBuf: size overflows isize");
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        HostBuf { ptr: NonNull::new(p).unwrap_or_else(|| handle_alloc_error(layout)), len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes (or dangling and len 0), owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `new` with this exact layout.
            unsafe { dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.len, ALIGN)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HostBuf;

    #[test]
    fn aligned_zeroed_and_sized() {
        for n in [0usize, 1, 63, 4096, 100_000] {
            let mut b = HostBuf::new(n);
            assert_eq!(b.len(), n);
            assert_eq!(b.bytes().as_ptr() as usize % 64, 0);
            assert!(b.bytes().iter().all(|&x| x == 0));
            b.bytes().fill(7);
        }
    }
}
