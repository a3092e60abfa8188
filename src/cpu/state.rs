//! Per-sequence state export/import on the CPU backend: the pools are the first
//! `Layout::pool_bytes` of the backend's buffer (format and checks: `cache/state.rs`).

use super::CpuBackend;
use crate::cache::{Cache, PoolBytes};
use crate::error::Result;

/// The backend's pools as bytes.
struct HostPools<'b>(&'b mut [u8]);

impl PoolBytes for HostPools<'_> {
    fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        dst.copy_from_slice(&self.0[off..off + dst.len()]);
        Ok(())
    }
    fn write(&mut self, off: usize, src: &[u8]) -> Result<()> {
        self.0[off..off + src.len()].copy_from_slice(src);
        Ok(())
    }
}

impl CpuBackend<'_> {
    /// Writes the live sequence `seq`'s state (every layer's K/V rows and compressed tokens,
    /// its length) to `out`, which needs [`Cache::sequence_state_bytes`] bytes; returns the
    /// bytes written. See [`Cache::export_sequence`] for the format and rules.
    pub fn export_sequence(&mut self, cache: &Cache, seq: u32, out: &mut [u8]) -> Result<usize> {
        cache.check_backend_config(&self.cfg)?;
        cache.export_sequence(seq, &HostPools(self.pool_bytes_mut()), out)
    }

    /// Restores a state from [`CpuBackend::export_sequence`] (or the CUDA backend's) into
    /// the free slot `seq` of `cache`. Fails, changing nothing, as
    /// [`Cache::import_sequence`] says.
    pub fn import_sequence(&mut self, cache: &mut Cache, seq: u32, state: &[u8]) -> Result<()> {
        cache.check_backend_config(&self.cfg)?;
        cache.import_sequence(seq, &mut HostPools(self.pool_bytes_mut()), state)
    }
}
