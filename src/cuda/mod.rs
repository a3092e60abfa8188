//! The CUDA backend: K/V pools and the per-step workspace in one device buffer the caller
//! owns (or that [`CudaBackend::with_allocation`] allocates once), kernels from
//! `kernels/` compiled with NVRTC once per device architecture, launches on the caller's
//! `CUstream` in the primary context of the device the options name (any ordinal; several
//! backends on several devices in one process are independent).
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): without a driver, every entry
//! point returns `NsaError::BackendUnavailable` and nothing panics. [`probe`] says
//! whether a usable device is there. Built without the `cuda` feature, this module is the
//! same API over a stub (`stub.rs`) that answers every call with `BackendUnavailable`
//! ("built without CUDA"), so the C ABI needs no `cfg` of its own.
//!
//! Per step: `Cache::plan_step`, then [`CudaBackend::upload_step`] once (`upload.rs`:
//! the plan and the step's page tables into the workspace), then
//! [`CudaBackend::run_layer`] for every layer (`launch.rs`). Neither allocates on host or
//! device. The device pools use the CPU backend's layout
//! (`[layer][pool][page][kv_head][token][dim]`, offsets from `Layout`), so a download of
//! the pools equals the CPU pools.
//!
//! Files: `backend.rs` (the backend's state and public methods), `device.rs` (probe,
//! architecture), `build.rs` (creation steps), `kernel.rs`
//! (the kernels by name, the module, the launch), `params.rs` (the kernels' argument),
//! `workspace.rs` (the device buffer's layout), `upload.rs`, `launch.rs`, `consts.rs`
//! (constants shared with the kernels), `compile.rs` (NVRTC and the kernel cache),
//! `staging.rs`, `tensor_map.rs`, `driver.rs`, `timeline.rs` (a diagnostic: when each
//! kernel ran). docs/ARCHITECTURE.md follows a decode step
//! through them.
//!
//! Launch sequence of a layer: one launch for the step's writes (copy-on-write copies,
//! appends, compressed tokens), then per wave of query rows: compressed attention split
//! over blocks, selection split over chunks of blocks, selected + window attention split
//! over blocks, gated combine. An append-only run (`q == 0 && out == 0`) stops after the
//! first launch. The attention kernels run on tensor cores (mma.sync; tiles loaded as
//! tensor-map boxes on sm_90 where the config allows, else 1-D bulk copies on sm_90,
//! `cp.async` before) for bf16/f16 with DK and DV multiples of 16, else on the scalar
//! kernels. Split counts are picked per launch from the row count (one wave of blocks);
//! grid shapes depend only on the step's token and sequence counts and the config;
//! lengths are read on the device, so a decode step can be captured in a CUDA graph
//! (upload_step stays outside: it writes host staging buffers and issues copies from
//! them). [`CudaBackend::attend_full`] is the full-attention baseline over the same cache.

// `CUstream` is an opaque driver handle passed through to the driver, never dereferenced here.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

/// The backend's files, compiled only with the `cuda` feature.
macro_rules! cuda_modules {
    ($($m:ident),*) => { $( #[cfg(feature = "cuda")] mod $m; )* };
}
cuda_modules!(backend, build, compile, consts, device, driver, kernel, launch, params, prefill, staging, state, step_layout, table_shadow, tensor_map, timeline, upload, workspace);
#[cfg(not(feature = "cuda"))]
mod stub;

use std::path::PathBuf;

use crate::error::Result;
#[cfg(feature = "cuda")]
pub use backend::CudaBackend;
#[cfg(feature = "cuda")]
pub use compile::{cache_key, KERNEL_FILES};
#[cfg(feature = "cuda")]
pub use device::nvrtc_arch;
#[cfg(feature = "cuda")]
use device::probe as probe_ordinal;
#[cfg(feature = "cuda")]
pub use driver::{stream_sync, CUdeviceptr, CUstream, DeviceBuf, Stream};
#[cfg(feature = "cuda")]
pub use timeline::{BlockStamp, KernelSpan, TIMELINE_BLOCKS};
#[cfg(not(feature = "cuda"))]
pub use stub::{probe as probe_ordinal, CUstream, CudaBackend};

/// Whether CUDA device 0 is usable (see [`probe_device`]).
pub fn probe() -> Result<DeviceInfo> {
    probe_ordinal(0)
}

/// Whether CUDA device `ordinal` is usable: the driver and NVRTC load, the device exists
/// and has compute capability 8.0 or newer. Never panics; the error says why not.
pub fn probe_device(ordinal: i32) -> Result<DeviceInfo> {
    probe_ordinal(ordinal)
}

/// Compiles the kernels for `arch` (an NVRTC target such as `sm_90a` or `sm_80`,
/// [`DeviceInfo::arch`]) into the on-disk kernel cache `dir` (created if missing) and
/// returns the file written, or found there already. Needs NVRTC but no GPU or driver, so
/// a deployment can fill the cache (`NSA_CUDA_CACHE_DIR`, [`CudaOptions::cache_dir`])
/// when it builds an image instead of paying the compile (about a minute) at the first
/// backend of every fresh machine. A cache file is used only by an NVRTC of the same
/// version with the same kernel sources and options (its name is their hash).
#[cfg(feature = "cuda")]
pub fn precompile(arch: &str, dir: &std::path::Path) -> Result<PathBuf> {
    driver::nvrtc_present().map_err(crate::error::NsaError::BackendUnavailable)?;
    compile::cubin(arch, Some(dir))?;
    let path = dir.join(compile::cache_key(arch)?);
    if !path.is_file() {
        return Err(crate::error::NsaError::arg("dir", dir.display(), "the compiled kernels could not be written there"));
    }
    Ok(path)
}
#[cfg(not(feature = "cuda"))]
pub use stub::precompile;

/// Options of [`CudaBackend::new_with`].
#[derive(Debug, Clone, Default)]
pub struct CudaOptions {
    /// Directory of the on-disk cache of compiled kernels; `None`: the environment
    /// variable `NSA_CUDA_CACHE_DIR` if set, else no disk cache.
    pub cache_dir: Option<PathBuf>,
    /// The device (CUDA ordinal) whose primary context holds the device buffer and runs
    /// the kernels; 0 by default.
    pub device_ordinal: i32,
}


/// What [`probe_device`] found: the device a backend with this ordinal would use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: i32,
    pub name: String,
    /// Compute capability (major, minor); the backend needs 8.0 or newer.
    pub compute_capability: (i32, i32),
    /// NVRTC target the kernels are compiled for, e.g. `sm_90a` (`nvrtc_arch`).
    pub arch: String,
    pub multiprocessors: i32,
    pub total_memory: usize,
    /// `cuDriverGetVersion`, e.g. 13000.
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
    /// Opt-in shared memory per block, bytes.
    pub max_shared_per_block: i32,
    /// L2 cache, bytes.
    pub l2_cache_bytes: i32,
    /// Devices the driver sees (valid ordinals are `0..device_count`).
    pub device_count: i32,
}

/// One layer's device arrays for the planned step (device addresses; 0 = none). Shapes
/// and meaning as [`crate::cpu::LayerIo`]: `q [tokens, HQ, DK]`, `k [tokens, HKV, DK]`,
/// `v [tokens, HKV, DV]` in the config's dtype; `gates [tokens, HQ, 3]` f32;
/// `out [tokens, HQ, DV]` written; `selected [tokens, HKV, n]` i32, written when not 0;
/// `phi_k`, `phi_v`: the layer's f32 phi weights (`Config::phi_weight_len`), 0 for mean.
/// The kernels read it as `LayerIo`, unchanged.
///
/// **Append-only runs:** with `q == 0` and `out == 0`, [`CudaBackend::run_layer`]
/// only makes the step's copy-on-write copies, appends `k`/`v` and emits finished
/// compressed tokens (no attention; `gates` and `selected` are ignored), like
/// [`crate::cpu::CpuBackend::append_layer`]: for filling a cache from K/V the host already
/// has, without paying for prefill attention.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceLayerIo {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub gates: u64,
    pub out: u64,
    pub selected: u64,
    pub phi_k: u64,
    pub phi_v: u64,
}

