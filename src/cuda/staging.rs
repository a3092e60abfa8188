//! Page-locked staging of the per-step upload (plan, token map, compressed-token jobs,
//! page tables). Copies from pageable memory go through a driver bounce buffer and block
//! the host for each region (tens of microseconds per step); from page-locked memory
//! they are true asynchronous DMA on the caller's stream.
//!
//! Asynchronous copies read the host buffer when the stream gets to them, so a buffer may
//! be rewritten only after its last copies ran: two buffers alternate, each with an event
//! recorded after its copies, waited on before the buffer is written again (normally long
//! done: it was two steps ago). Allocated once at backend creation; nothing per step.

use cudarc::driver::sys;

use super::driver::check;
use crate::error::Result;

struct Half {
    ptr: *mut u8,
    event: sys::CUevent,
    /// An event was recorded after this buffer's last copies.
    pending: bool,
}

/// Two page-locked buffers of `bytes` each, used in turn.
pub(crate) struct Staging {
    halves: [Half; 2],
    bytes: usize,
    cur: usize,
}

impl Staging {
    /// Allocates both buffers (zeroed) and their events in the current context.
    pub fn new(bytes: usize) -> Result<Staging> {
        let mut s = Staging {
            halves: [
                Half { ptr: std::ptr::null_mut(), event: std::ptr::null_mut(), pending: false },
                Half { ptr: std::ptr::null_mut(), event: std::ptr::null_mut(), pending: false },
            ],
            bytes: bytes.max(1),
            cur: 0,
        };
        for h in s.halves.iter_mut() {
            let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: plain allocation; freed in Drop (which also runs if a later step fails).
            check(unsafe { sys::cuMemHostAlloc(&mut p, s.bytes, 0) }, "cuMemHostAlloc")?;
            h.ptr = p.cast();
            // SAFETY: `p` holds `bytes` bytes.
            unsafe { std::ptr::write_bytes(h.ptr, 0, s.bytes) };
            // SAFETY: plain event creation; destroyed in Drop.
            check(unsafe { sys::cuEventCreate(&mut h.event, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) }, "cuEventCreate")?;
        }
        Ok(s)
    }

    /// The buffer to fill for the next upload, after its previous copies completed.
    /// The caller's context must be current.
    pub fn next(&mut self) -> Result<&mut [u8]> {
        self.cur ^= 1;
        let h = &mut self.halves[self.cur];
        if h.pending {
            // SAFETY: an event of this context recorded by `copied`.
            check(unsafe { sys::cuEventSynchronize(h.event) }, "cuEventSynchronize")?;
            h.pending = false;
        }
        // SAFETY: `ptr` holds `bytes` bytes, and no copy reads it any more (waited above).
        Ok(unsafe { std::slice::from_raw_parts_mut(h.ptr, self.bytes) })
    }

    /// The current buffer (as filled after `next`), for issuing copies from it.
    pub fn current(&self) -> *const u8 {
        self.halves[self.cur].ptr
    }

    /// Marks the current buffer's copies as issued on `stream`.
    pub fn copied(&mut self, stream: sys::CUstream) -> Result<()> {
        let h = &mut self.halves[self.cur];
        // SAFETY: the event and the caller's stream belong to the current context.
        check(unsafe { sys::cuEventRecord(h.event, stream) }, "cuEventRecord")?;
        h.pending = true;
        Ok(())
    }
}

impl Drop for Staging {
    /// The owner's context must be current (the backend pushes it).
    fn drop(&mut self) {
        for h in &self.halves {
            // SAFETY: created in `new`, released once; waiting first keeps in-flight copies
            // from reading freed memory.
            unsafe {
                if !h.event.is_null() {
                    if h.pending {
                        sys::cuEventSynchronize(h.event);
                    }
                    sys::cuEventDestroy_v2(h.event);
                }
                if !h.ptr.is_null() {
                    sys::cuMemFreeHost(h.ptr.cast());
                }
            }
        }
    }
}
