//! A second stream beside the caller's, for work of a layer that does not depend on the
//! launches before it on the caller's stream: the window's attention runs there while the
//! compressed branch and the selection run on the caller's stream (`launch.rs`).
//!
//! The branch is ordered by two events, both created once with the backend (nothing is
//! created per step): `fork` recorded on the caller's stream and waited for by the side
//! stream (the side's work starts after what the caller queued, the layer's append
//! included), `join` recorded on the side stream and waited for by the caller's stream
//! (what comes after, the combine, sees the side's results). Under stream capture both
//! waits become graph edges: the side stream joins the capture at the fork and leaves it
//! at the join, so a captured layer replays with the same branch.

use cudarc::driver::sys;

use super::driver::{check, CUstream};
use crate::error::Result;

/// The side stream and its two events, in the backend's context. Destroy with the
/// context current (the backend's `Drop` does).
pub(crate) struct SideStream {
    stream: CUstream,
    fork: sys::CUevent,
    join: sys::CUevent,
}

impl SideStream {
    /// Creates the stream (non-blocking: it never waits on the legacy default stream by
    /// itself) and the events (no timing) in the current context.
    pub fn new() -> Result<SideStream> {
        let mut s = SideStream { stream: std::ptr::null_mut(), fork: std::ptr::null_mut(), join: std::ptr::null_mut() };
        // SAFETY: plain creation calls in the current context; what was created is
        // destroyed by `s`'s Drop if a later call fails.
        unsafe {
            check(sys::cuStreamCreate(&mut s.stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32), "cuStreamCreate")?;
            check(sys::cuEventCreate(&mut s.fork, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32), "cuEventCreate")?;
            check(sys::cuEventCreate(&mut s.join, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32), "cuEventCreate")?;
        }
        Ok(s)
    }

    /// Orders the side stream after everything queued on `main` so far; returns it.
    pub fn fork(&self, main: CUstream) -> Result<CUstream> {
        // SAFETY: our event and stream; `main` is the caller's stream of this context.
        unsafe {
            check(sys::cuEventRecord(self.fork, main), "cuEventRecord")?;
            check(sys::cuStreamWaitEvent(self.stream, self.fork, 0), "cuStreamWaitEvent")?;
        }
        Ok(self.stream)
    }

    /// Orders what is queued on `main` from now on after everything queued on the side
    /// stream so far.
    pub fn join(&self, main: CUstream) -> Result<()> {
        // SAFETY: as in `fork`.
        unsafe {
            check(sys::cuEventRecord(self.join, self.stream), "cuEventRecord")?;
            check(sys::cuStreamWaitEvent(main, self.join, 0), "cuStreamWaitEvent")
        }
    }
}

impl Drop for SideStream {
    /// The owner's context must be current.
    fn drop(&mut self) {
        // SAFETY: created in `new` (null when that call failed), destroyed once. Work still
        // queued on the stream completes first (cuStreamDestroy does not wait, the
        // driver releases the stream when it is done).
        unsafe {
            for e in [self.fork, self.join] {
                if !e.is_null() {
                    sys::cuEventDestroy_v2(e);
                }
            }
            if !self.stream.is_null() {
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
    }
}
