//! The CUDA backend's API in a build without the `cuda` feature: every call answers
//! `NsaError::BackendUnavailable` ("built without CUDA"). `CudaBackend` has no value, so
//! the methods of a backend can never be reached; they exist so that callers (the C ABI)
//! compile the same way in both builds.

use super::{CudaOptions, DeviceInfo, DeviceLayerIo};
use crate::cache::Cache;
use crate::config::Config;
use crate::error::{NsaError, Result};

/// A CUDA stream handle (`CUstream`), as the real backend takes it.
pub type CUstream = *mut std::ffi::c_void;

fn unavailable() -> NsaError {
    NsaError::BackendUnavailable("this libnsa was built without CUDA support (cargo feature `cuda`)".into())
}

/// Always `BackendUnavailable`.
pub fn probe(_ordinal: i32) -> Result<DeviceInfo> {
    Err(unavailable())
}

/// Always `BackendUnavailable`.
pub fn precompile(_arch: &str, _dir: &std::path::Path) -> Result<std::path::PathBuf> {
    Err(unavailable())
}

/// No value exists: `new` and `new_with` always fail.
pub enum CudaBackend {}

impl CudaBackend {
    pub fn probe() -> Result<DeviceInfo> {
        Err(unavailable())
    }

    pub fn device_bytes(_cfg: &Config) -> Result<usize> {
        Err(unavailable())
    }

    pub fn new(_cfg: &Config, _device_ptr: u64, _bytes: usize) -> Result<Self> {
        Err(unavailable())
    }

    pub fn new_with(_cfg: &Config, _device_ptr: u64, _bytes: usize, _opts: &CudaOptions) -> Result<Self> {
        Err(unavailable())
    }

    pub fn config(&self) -> &Config {
        match *self {}
    }

    pub fn device_info(&self) -> &DeviceInfo {
        match *self {}
    }

    pub fn upload_step(&mut self, _cache: &Cache, _stream: CUstream) -> Result<()> {
        match *self {}
    }

    pub fn run_layer(&mut self, _cache: &Cache, _layer: u32, _io: &DeviceLayerIo, _stream: CUstream) -> Result<()> {
        match *self {}
    }

    pub fn attend_full(&mut self, _cache: &Cache, _layer: u32, _q: u64, _out: u64, _stream: CUstream) -> Result<()> {
        match *self {}
    }

    pub fn synchronize(&self, _stream: CUstream) -> Result<()> {
        match *self {}
    }

    pub fn export_sequence(&self, _cache: &Cache, _seq: u32, _out: &mut [u8], _stream: CUstream) -> Result<usize> {
        match *self {}
    }

    pub fn import_sequence(&mut self, _cache: &mut Cache, _seq: u32, _state: &[u8], _stream: CUstream) -> Result<()> {
        match *self {}
    }
}
