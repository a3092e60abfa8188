//! Page-locked staging of the per-step upload (plan, token map, compressed-token jobs,
//! page tables). Copies from pageable memory go through a driver bounce buffer and block
//! the host for each region (tens of microseconds per step); from page-locked memory
//! they are true asynchronous DMA on the caller's stream.
//!
//! Asynchronous copies read the host buffer when the stream gets to them, so a buffer may
//! be rewritten only after its last copies ran: two buffers alternate, each with an event
//! recorded after its copies, waited on before the buffer is written again (normally long
//! done: it was two steps ago). [`issue_copies`] records that event after the copies that
//! were enqueued even when a later one fails to enqueue (and, if the event cannot be
//! recorded, waits for the stream or makes the next reuse wait for the context).
//! Allocated once at backend creation; nothing per step.

use cudarc::driver::sys;

use super::driver::check;
use crate::error::Result;

struct Half {
    ptr: *mut u8,
    event: sys::CUevent,
    /// An event was recorded after this buffer's last copies.
    pending: bool,
    /// Copies may still read this buffer and no event marks their end (recording one and
    /// waiting for the stream both failed): its reuse waits for the whole context.
    unfenced: bool,
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
                Half { ptr: std::ptr::null_mut(), event: std::ptr::null_mut(), pending: false, unfenced: false },
                Half { ptr: std::ptr::null_mut(), event: std::ptr::null_mut(), pending: false, unfenced: false },
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
        if h.unfenced {
            // SAFETY: plain wait in the current context.
            check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")?;
            h.unfenced = false;
        }
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

}

/// Where the copies' end is marked: an event on the stream, or failing that a wait.
trait Fence {
    /// Marks the end of the copies enqueued so far (an event recorded after them).
    fn record(&mut self) -> Result<()>;
    /// Waits until they ran (when no mark could be recorded).
    fn wait(&mut self) -> Result<()>;
    /// Neither worked: the buffer's next reuse must wait for the whole context.
    fn unfenced(&mut self);
}

struct StreamFence<'a> {
    half: &'a mut Half,
    stream: sys::CUstream,
}

impl Fence for StreamFence<'_> {
    fn record(&mut self) -> Result<()> {
        // SAFETY: the event and the caller's stream belong to the current context.
        check(unsafe { sys::cuEventRecord(self.half.event, self.stream) }, "cuEventRecord")?;
        self.half.pending = true;
        Ok(())
    }
    fn wait(&mut self) -> Result<()> {
        super::driver::stream_sync(self.stream)
    }
    fn unfenced(&mut self) {
        self.half.unfenced = true;
    }
}

/// Enqueues `n` copies from the current staging buffer (`copy(i)` enqueues the i-th on
/// `stream`) and fences the buffer so that `next` hands it out again only after they ran.
/// Stops at the first copy that fails to enqueue and returns its error; the copies
/// enqueued before it still read the buffer, so they are fenced all the same.
pub(crate) fn issue_copies(staging: &mut Staging, stream: sys::CUstream, n: usize, copy: impl FnMut(usize) -> Result<()>) -> Result<()> {
    let cur = staging.cur;
    enqueue_fenced(n, copy, &mut StreamFence { half: &mut staging.halves[cur], stream })
}

fn enqueue_fenced(n: usize, mut copy: impl FnMut(usize) -> Result<()>, fence: &mut impl Fence) -> Result<()> {
    let mut enqueued = 0;
    let mut failed = None;
    for i in 0..n {
        match copy(i) {
            Ok(()) => enqueued += 1,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if enqueued > 0 {
        if let Err(e) = fence.record() {
            if fence.wait().is_err() {
                fence.unfenced();
            }
            failed.get_or_insert(e);
        }
    }
    failed.map_or(Ok(()), Err)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::NsaError;

    #[derive(Default)]
    struct Fake {
        record_fails: bool,
        wait_fails: bool,
        recorded: usize,
        waited: usize,
        unfenced: bool,
    }

    impl Fence for Fake {
        fn record(&mut self) -> Result<()> {
            if self.record_fails {
                return Err(NsaError::Cuda("record".into()));
            }
            self.recorded += 1;
            Ok(())
        }
        fn wait(&mut self) -> Result<()> {
            self.waited += 1;
            if self.wait_fails {
                return Err(NsaError::Cuda("wait".into()));
            }
            Ok(())
        }
        fn unfenced(&mut self) {
            self.unfenced = true;
        }
    }

    fn copies_failing_at(k: usize, log: &mut Vec<usize>) -> impl FnMut(usize) -> Result<()> + '_ {
        move |i| {
            if i == k {
                return Err(NsaError::Cuda(format!("copy {i}")));
            }
            log.push(i);
            Ok(())
        }
    }

    #[test]
    fn all_copies_enqueued_are_fenced() {
        let (mut f, mut log) = (Fake::default(), vec![]);
        enqueue_fenced(5, copies_failing_at(99, &mut log), &mut f).unwrap();
        assert_eq!((log.len(), f.recorded, f.waited), (5, 1, 0));
    }

    #[test]
    fn a_failed_copy_still_fences_the_ones_before_it() {
        let (mut f, mut log) = (Fake::default(), vec![]);
        let e = enqueue_fenced(5, copies_failing_at(3, &mut log), &mut f).unwrap_err();
        assert!(matches!(e, NsaError::Cuda(m) if m == "copy 3"));
        // Copies 0..3 were enqueued and are fenced; copy 4 was never tried.
        assert_eq!((log, f.recorded, f.waited, f.unfenced), (vec![0, 1, 2], 1, 0, false));
    }

    #[test]
    fn nothing_enqueued_needs_no_fence() {
        let (mut f, mut log) = (Fake::default(), vec![]);
        assert!(enqueue_fenced(5, copies_failing_at(0, &mut log), &mut f).is_err());
        assert_eq!((f.recorded, f.waited), (0, 0));
    }

    #[test]
    fn a_failed_record_waits_for_the_copies_or_leaves_the_buffer_unfenced() {
        let (mut f, mut log) = (Fake { record_fails: true, ..Default::default() }, vec![]);
        let e = enqueue_fenced(2, copies_failing_at(99, &mut log), &mut f).unwrap_err();
        assert!(matches!(e, NsaError::Cuda(m) if m == "record"));
        assert_eq!((f.waited, f.unfenced), (1, false));
        let (mut f, mut log) = (Fake { record_fails: true, wait_fails: true, ..Default::default() }, vec![]);
        assert!(enqueue_fenced(2, copies_failing_at(1, &mut log), &mut f).is_err());
        assert_eq!((f.waited, f.unfenced), (1, true));
    }
}
