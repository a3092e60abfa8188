//! `struct nsa_cuda_backend`: the CUDA backend through the C ABI. The functions exist in
//! every build, so the header is one header: a library built without the `cuda` cargo
//! feature, or running where no CUDA driver or device is usable, answers
//! `NSA_STATUS_BACKEND_UNAVAILABLE` with the reason, and never crashes.

use std::ffi::{c_char, c_void};

use super::args::{out_ptr, out_struct, read_struct, Versioned};
use super::cache::nsa_cache;
use super::config::{nsa_config_t, nsa_dtype, read_config};
use super::status::{guard, guard_infallible, nsa_status};
#[cfg(not(feature = "cuda"))]
use super::status::FfiResult;
#[cfg(feature = "cuda")]
use super::args::{handle, handle_mut, Handle};
use crate::error::NsaError;

/// The CUDA backend: kernels compiled for the device, and the host side of the step
/// upload. Opaque; created by `nsa_cuda_backend_create`, which allocates this host-side
/// state once (the per-step calls allocate nothing), freed by `nsa_cuda_backend_destroy`.
///
/// Thread safety: one call at a time per backend (calls enqueue work on the stream the
/// caller passes). Different backends are independent.
pub struct nsa_cuda_backend {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    magic: u64,
    #[cfg(feature = "cuda")]
    pub(super) backend: crate::cuda::CudaBackend,
}

#[cfg(feature = "cuda")]
const CUDA_MAGIC: u64 = 0x4e53_415f_4355_4441; // "NSA_CUDA"

#[cfg(feature = "cuda")]
impl Handle for nsa_cuda_backend {
    const MAGIC: u64 = CUDA_MAGIC;
    const NAME: &'static str = "nsa_cuda_backend";
    unsafe fn magic(p: *const Self) -> u64 {
        std::ptr::addr_of!((*p).magic).read()
    }
}

/// What `nsa_cuda_probe` found: the device the CUDA backend uses (ordinal 0).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nsa_cuda_device_info_t {
    /// `sizeof(nsa_cuda_device_info_t)` as the caller compiled it.
    pub struct_size: u32,
    /// Device ordinal (0).
    pub ordinal: i32,
    /// Compute capability, major (9 for an H100).
    pub cc_major: i32,
    /// Compute capability, minor (0 for an H100).
    pub cc_minor: i32,
    /// Streaming multiprocessors.
    pub multiprocessors: i32,
    /// `cuDriverGetVersion`, e.g. 13000.
    pub driver_version: i32,
    /// Device memory in bytes.
    pub total_memory: u64,
    /// The device's name, NUL-terminated (truncated to 127 bytes).
    pub name: [c_char; 128],
}

// SAFETY: repr(C), struct_size first, integers and chars only, no padding (4*6 + 8 + 128).
unsafe impl Versioned for nsa_cuda_device_info_t {
    const NAME: &'static str = "nsa_cuda_device_info_t";
}

/// One layer's device arrays for the planned step: device pointers (`CUdeviceptr`, 0 for
/// an optional array that is absent). Shapes as `nsa_layer_io_t`: `q [tokens, HQ, DK]`,
/// `k [tokens, HKV, DK]`, `v [tokens, HKV, DV]` in the config's `dtype`; `gates
/// [tokens, HQ, 3]` f32; `out [tokens, HQ, DV]` written; `selected [tokens, HKV, n]` int32
/// written when not 0; `phi_k`/`phi_v` the layer's f32 phi weights (`phi_k_len` and
/// `phi_v_len` elements, 0 for phi = mean). All must be device memory of the primary
/// context, read or written only by the work the call enqueues. Set
/// `struct_size = sizeof(nsa_cuda_layer_io_t)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nsa_cuda_layer_io_t {
    /// `sizeof(nsa_cuda_layer_io_t)` as the caller compiled it.
    pub struct_size: u32,
    /// Element type of q, k, v and out: must be the config's dtype.
    pub dtype: nsa_dtype,
    /// Rows: must equal the planned step's token count.
    pub tokens: u32,
    /// Must be 0 (no flag is defined in this version).
    pub flags: u32,
    /// `[tokens, HQ, DK]` queries (required, unless `q` and `out` are both 0: append only).
    pub q: u64,
    /// `[tokens, HKV, DK]` new keys (required).
    pub k: u64,
    /// `[tokens, HKV, DV]` new values (required).
    pub v: u64,
    /// `[tokens, HQ, 3]` f32 gates (compressed, selected, window) (required).
    pub gates: u64,
    /// `[tokens, HQ, DV]` output, written (required).
    pub out: u64,
    /// `[tokens, HKV, n]` int32 selected blocks, written; 0 to skip.
    pub selected: u64,
    /// The layer's f32 phi weights for K; 0 for phi = mean.
    pub phi_k: u64,
    /// The layer's f32 phi weights for V; 0 for phi = mean.
    pub phi_v: u64,
    /// Elements at `phi_k`: `Config::phi_weight_len(DK)` (0 for mean).
    pub phi_k_len: u64,
    /// Elements at `phi_v`: `Config::phi_weight_len(DV)` (0 for mean).
    pub phi_v_len: u64,
}

// SAFETY: repr(C), struct_size first, integers only, no padding (4*4 + 8*10).
unsafe impl Versioned for nsa_cuda_layer_io_t {
    const NAME: &'static str = "nsa_cuda_layer_io_t";
}

#[cfg(not(feature = "cuda"))]
pub(super) fn unavailable<T>() -> FfiResult<T> {
    Err(NsaError::BackendUnavailable("this libnsa was built without CUDA support (cargo feature `cuda`)".into()).into())
}

/// Whether a CUDA device is usable, and which. Loads the CUDA driver and NVRTC at run time
/// (nothing CUDA is linked): on success writes `*out` (set `out->struct_size` first).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_BACKEND_UNAVAILABLE` (built without CUDA, no driver, no device, a device
/// older than compute capability 8.0, or no NVRTC: the message says which).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_probe(out: *mut nsa_cuda_device_info_t) -> nsa_status {
    guard("nsa_cuda_probe", || {
        let out = out_struct(out, "out")?;
        #[cfg(feature = "cuda")]
        {
            let d = crate::cuda::CudaBackend::probe()?;
            let mut name = [0 as c_char; 128];
            for (dst, b) in name.iter_mut().zip(d.name.bytes().take(127)) {
                *dst = b as c_char;
            }
            out.write(nsa_cuda_device_info_t {
                struct_size: 0,
                ordinal: d.ordinal,
                cc_major: d.compute_capability.0,
                cc_minor: d.compute_capability.1,
                multiprocessors: d.multiprocessors,
                driver_version: d.driver_version,
                total_memory: d.total_memory as u64,
                name,
            });
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = out;
            unavailable()
        }
    })
}

/// Writes to `*out` the bytes of device memory the CUDA backend needs for `cfg`: every
/// layer's K/V pools plus the per-step workspace. Pure arithmetic (no CUDA call).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG`, `NSA_STATUS_BACKEND_UNAVAILABLE` (built without CUDA).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_device_size(cfg: *const nsa_config_t, out: *mut usize) -> nsa_status {
    guard("nsa_cuda_device_size", || {
        let out = out_ptr(out, "out")?;
        let cfg = read_config(cfg, "cfg")?;
        #[cfg(feature = "cuda")]
        {
            out.write(crate::cuda::CudaBackend::device_bytes(&cfg)?);
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (out, cfg);
            unavailable()
        }
    })
}

/// Creates a CUDA backend over the caller's device buffer `device_ptr` (`bytes` bytes, at
/// least `nsa_cuda_device_size`, 256-byte aligned, allocated in device 0's primary context,
/// e.g. by `cudaMalloc`) and writes its handle to `*out`. Compiles the kernels with NVRTC
/// for the device (once per process and architecture; set `NSA_CUDA_CACHE_DIR` to keep
/// compiled code on disk). Pass the same config to `nsa_cache_init`.
///
/// Ownership: the caller keeps owning the device buffer; it must stay allocated until
/// `nsa_cuda_backend_destroy`. The backend itself allocates, here and only here, its
/// host-side state: two page-locked staging buffers for `nsa_cuda_upload_step` (each the
/// size of the step plan and the step's page tables at `max_step_seqs`) and two events.
/// The workspace part of the device buffer is initialised (its selection counters
/// zeroed, the pools' tensor maps written); the pools are left as they are.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG`, `NSA_STATUS_INVALID_ARGUMENT` (`device_ptr` 0),
/// `NSA_STATUS_MISALIGNED`, `NSA_STATUS_BUFFER_TOO_SMALL`,
/// `NSA_STATUS_BACKEND_UNAVAILABLE`, `NSA_STATUS_CUDA_ERROR` (compilation or loading).
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_backend_create(
    cfg: *const nsa_config_t,
    device_ptr: u64,
    bytes: usize,
    out: *mut *mut nsa_cuda_backend,
) -> nsa_status {
    guard("nsa_cuda_backend_create", || {
        let out = out_ptr(out, "out")?;
        let cfg = read_config(cfg, "cfg")?;
        #[cfg(feature = "cuda")]
        {
            let backend = crate::cuda::CudaBackend::new(&cfg, device_ptr, bytes)?;
            out.write(Box::into_raw(Box::new(nsa_cuda_backend { magic: CUDA_MAGIC, backend })));
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (out, cfg, device_ptr, bytes);
            unavailable()
        }
    })
}

/// Frees the backend's host-side state (the device buffer stays the caller's). NULL is
/// ignored. The handle must not be used afterwards; work already enqueued on a stream
/// must be finished or synchronized first.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_backend_destroy(backend: *mut nsa_cuda_backend) {
    guard_infallible("nsa_cuda_backend_destroy", (), || {
        #[cfg(feature = "cuda")]
        if let Ok(b) = handle_mut(backend, "backend") {
            b.magic = 0;
            drop(Box::from_raw(backend));
        }
        #[cfg(not(feature = "cuda"))]
        let _ = backend;
    })
}

/// Uploads the planned step (its sequences, copy-on-write copies and page tables) into the
/// backend's device workspace, on `stream` (a `CUstream`; NULL is the default stream).
/// Call once per step, after `nsa_cache_plan_step` and before the step's layer runs.
/// Writes the plan into one of the backend's two page-locked staging buffers (first
/// waiting, if need be, until the copies that used it two uploads ago have run) and
/// enqueues asynchronous copies from it; allocates nothing. Stays outside CUDA graphs;
/// the layer runs can be captured.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_NO_STEP`,
/// `NSA_STATUS_INVALID_ARGUMENT` (a cache with another config, or other than the one this
/// backend serves), `NSA_STATUS_BACKEND_UNAVAILABLE`, `NSA_STATUS_CUDA_ERROR`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_upload_step(backend: *mut nsa_cuda_backend, cache: *const nsa_cache, stream: *mut c_void) -> nsa_status {
    guard("nsa_cuda_upload_step", || {
        #[cfg(feature = "cuda")]
        {
            let b = handle_mut(backend, "backend")?;
            let c = handle(cache, "cache")?;
            Ok(b.backend.upload_step(c.cache(), stream.cast())?)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (backend, cache, stream);
            unavailable()
        }
    })
}

/// Enqueues layer `layer` of the planned (and uploaded) step on `stream`: copy-on-write
/// copies, append of the step's K/V rows, compression of finished blocks, NSA attention
/// for every new token into `io->out` (and the selected blocks into `io->selected`).
/// With `io->q` and `io->out` both 0 the run is append-only: K/V appended and
/// compressed, no attention (to fill a cache from K/V the host already has).
/// Allocates nothing; reads lengths on the device, so a decode step's layer runs can be
/// captured in a CUDA graph. Run every layer once per step: the run counts the layer in
/// the cache's step (see `nsa_cache`); a replayed graph does not, so count each replayed
/// layer with `nsa_cache_mark_layer_run`. The backend serves one cache (the first it ran a
/// layer of).
///
/// Errors (nothing is enqueued, the layer is not counted): `NSA_STATUS_NULL_POINTER`,
/// `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_BAD_STRUCT_SIZE`, `NSA_STATUS_NO_STEP` (no step
/// planned or not uploaded), `NSA_STATUS_LAYER_ALREADY_RUN`, `NSA_STATUS_INVALID_ARGUMENT`
/// (`layer`, `dtype`, `tokens`, `flags`, a required pointer 0, a phi weight count, a cache
/// other than the one this backend serves), `NSA_STATUS_BACKEND_UNAVAILABLE`,
/// `NSA_STATUS_CUDA_ERROR` (the launch failed after the layer was counted: abort the step
/// with `nsa_cache_abort_step`).
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_run_layer(
    backend: *mut nsa_cuda_backend,
    cache: *const nsa_cache,
    layer: u32,
    io: *const nsa_cuda_layer_io_t,
    stream: *mut c_void,
) -> nsa_status {
    guard("nsa_cuda_run_layer", || {
        let io = read_struct(io, "io")?;
        #[cfg(feature = "cuda")]
        {
            let b = handle_mut(backend, "backend")?;
            let c = handle(cache, "cache")?;
            let cfg = *b.backend.config();
            super::args::check_layer_header(&cfg, c.cache(), io.dtype, io.flags, io.tokens)?;
            // Required pointers (and the q = out = 0 append-only rule) are checked by the
            // backend; here only what it cannot know: the phi weights' element counts.
            for (arg, p, len, want) in [
                ("io->phi_k_len", io.phi_k, io.phi_k_len, cfg.phi_weight_len(cfg.head_dim_qk)),
                ("io->phi_v_len", io.phi_v, io.phi_v_len, cfg.phi_weight_len(cfg.head_dim_v)),
            ] {
                if len != want as u64 || (want > 0 && p == 0) {
                    return Err(NsaError::arg(arg, len, format!("phi {} needs {want} f32 weights at a non-zero device pointer", cfg.phi.name())).into());
                }
            }
            let dio = crate::cuda::DeviceLayerIo {
                q: io.q,
                k: io.k,
                v: io.v,
                gates: io.gates,
                out: io.out,
                selected: io.selected,
                phi_k: io.phi_k,
                phi_v: io.phi_v,
            };
            Ok(b.backend.run_layer(c.cache(), layer, &dio, stream.cast())?)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (backend, cache, layer, io, stream);
            unavailable()
        }
    })
}
