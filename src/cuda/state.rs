//! Per-sequence state export/import on the CUDA backend: the pools are the first
//! `Layout::pool_bytes` of the device buffer, in the CPU backend's layout, so a state moves
//! between backends unchanged (format and checks: `cache/state.rs`).

use super::driver::{self, CtxGuard, CUstream};
use super::CudaBackend;
use crate::cache::{Cache, PoolBytes};
use crate::error::Result;

/// The device pools as bytes: page-sized copies on the caller's stream, each waited for
/// (export and import are not on the decode path).
struct DevicePools {
    base: u64,
    bytes: usize,
    stream: CUstream,
}

impl DevicePools {
    fn check(&self, off: usize, n: usize) {
        assert!(off + n <= self.bytes, "state copy outside the pools: {off}+{n} > {}", self.bytes);
    }
}

impl PoolBytes for DevicePools {
    fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        self.check(off, dst.len());
        // SAFETY: the range is inside the pools (checked); dst has dst.len() bytes.
        unsafe { driver::dtoh_sync(dst.as_mut_ptr().cast(), self.base + off as u64, dst.len(), self.stream) }
    }
    fn write(&mut self, off: usize, src: &[u8]) -> Result<()> {
        self.check(off, src.len());
        // SAFETY: as `read`; the copy is waited for before `src` may go away.
        unsafe {
            driver::htod(self.base + off as u64, src.as_ptr().cast(), src.len(), self.stream)?;
        }
        driver::stream_sync(self.stream)
    }
}

impl CudaBackend {
    fn device_pools(&self, cache: &Cache, stream: CUstream) -> Result<DevicePools> {
        cache.check_backend_config(self.config())?;
        Ok(DevicePools { base: self.pools_ptr(), bytes: self.pools_bytes(), stream })
    }

    /// Writes the live sequence `seq`'s state to the host buffer `out`
    /// ([`Cache::sequence_state_bytes`] bytes) after the work queued on `stream`, and
    /// waits for the copies; returns the bytes written. The same format as the CPU
    /// backend's: either backend imports it. See [`Cache::export_sequence`].
    pub fn export_sequence(&self, cache: &Cache, seq: u32, out: &mut [u8], stream: CUstream) -> Result<usize> {
        let pools = self.device_pools(cache, stream)?;
        let _g = CtxGuard::push(self.ctx)?;
        cache.export_sequence(seq, &pools, out)
    }

    /// Restores a state (from either backend) into the free slot `seq` of `cache`, copying
    /// its rows to the device on `stream` (waited for). Fails, changing nothing, as
    /// [`Cache::import_sequence`] says; a failed copy only touched free pages.
    pub fn import_sequence(&mut self, cache: &mut Cache, seq: u32, state: &[u8], stream: CUstream) -> Result<()> {
        let mut pools = self.device_pools(cache, stream)?;
        let _g = CtxGuard::push(self.ctx)?;
        cache.import_sequence(seq, &mut pools, state)
    }
}
