//! `struct nsa_cuda_backend`: the CUDA backend through the C ABI. The functions exist in
//! every build, so the header is one header: a library built without the `cuda` cargo
//! feature, or running where no CUDA driver or device is usable, answers
//! `NSA_STATUS_BACKEND_UNAVAILABLE` with the reason, and never crashes.

use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;

use super::args::{handle, handle_mut, out_ptr, out_struct, read_struct, Handle, Versioned};
use super::cache::nsa_cache;
use super::config::{nsa_config_t, read_config};
use super::cpu::nsa_layer_io_t;
use super::status::{guard, guard_infallible, nsa_status, FfiResult};
use crate::cuda::{CudaBackend, CudaOptions, DeviceLayerIo};
use crate::error::NsaError;

/// The CUDA backend: kernels compiled for the device, and the host side of the step
/// upload. Opaque; created by `nsa_cuda_backend_create`, which allocates this host-side
/// state once (the per-step calls allocate nothing), freed by `nsa_cuda_backend_destroy`.
///
/// Thread safety: one call at a time per backend (calls enqueue work on the stream the
/// caller passes). Different backends are independent.
pub struct nsa_cuda_backend {
    magic: u64,
    /// Without the `cuda` feature, the stub's `CudaBackend` (no value: never created).
    pub(super) backend: CudaBackend,
}

const CUDA_MAGIC: u64 = 0x4e53_415f_4355_4441; // "NSA_CUDA"

impl Handle for nsa_cuda_backend {
    const MAGIC: u64 = CUDA_MAGIC;
    const NAME: &'static str = "nsa_cuda_backend";
    unsafe fn magic(p: *const Self) -> u64 {
        std::ptr::addr_of!((*p).magic).read()
    }
}

/// What `nsa_cuda_probe` found: the device of the ordinal asked for.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nsa_cuda_device_info_t {
    /// `sizeof(nsa_cuda_device_info_t)` as the caller compiled it.
    pub struct_size: u32,
    /// Device ordinal (the one asked for).
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

/// Options of `nsa_cuda_backend_create`; NULL there means all defaults. Set
/// `struct_size = sizeof(nsa_cuda_options_t)` and zero what you do not set.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nsa_cuda_options_t {
    /// `sizeof(nsa_cuda_options_t)` as the caller compiled it.
    pub struct_size: u32,
    /// The CUDA device (ordinal) whose primary context holds the device buffer and runs
    /// the kernels (default 0). Backends on different devices are independent: one
    /// process may run one per GPU (e.g. each with its share of the KV heads).
    pub device_ordinal: i32,
    /// Directory of the on-disk cache of compiled kernels, a NUL-terminated path read
    /// during the call; NULL: the environment variable `NSA_CUDA_CACHE_DIR` if set, else
    /// no disk cache.
    pub cache_dir: *const c_char,
}

// SAFETY: repr(C), struct_size first, then an i32 and a pointer (no padding on 64-bit
// targets; on 32-bit the pointer follows at offset 8 too); any bit pattern is valid.
unsafe impl Versioned for nsa_cuda_options_t {
    const NAME: &'static str = "nsa_cuda_options_t";
}

/// The Rust options from the C ones (NULL: defaults).
unsafe fn read_options(opts: *const nsa_cuda_options_t) -> FfiResult<CudaOptions> {
    if opts.is_null() {
        return Ok(CudaOptions::default());
    }
    let o = read_struct(opts, "opts")?;
    let cache_dir = if o.cache_dir.is_null() {
        None
    } else {
        let dir = CStr::from_ptr(o.cache_dir).to_str().map_err(|_| NsaError::arg("opts->cache_dir", "(not UTF-8)", "must be a UTF-8 path"))?;
        Some(PathBuf::from(dir))
    };
    Ok(CudaOptions { cache_dir, device_ordinal: o.device_ordinal })
}

/// Whether CUDA device `device_ordinal` (0 for the first) is usable, and what it is. Loads
/// the CUDA driver and NVRTC at run time (nothing CUDA is linked): on success writes
/// `*out` (set `out->struct_size` first).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_ARGUMENT` (`device_ordinal` not a device the driver sees),
/// `NSA_STATUS_BACKEND_UNAVAILABLE` (built without CUDA, no driver, no device, a device
/// older than compute capability 8.0, or no NVRTC: the message says which).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_probe(device_ordinal: i32, out: *mut nsa_cuda_device_info_t) -> nsa_status {
    guard("nsa_cuda_probe", || {
        let out = out_struct(out, "out")?;
        {
            let d = crate::cuda::probe_device(device_ordinal)?;
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
    })
}

/// Writes to `*out` the bytes of device memory the CUDA backend needs for `cfg`: every
/// layer's K/V pools plus the per-step workspace. Pure arithmetic (no CUDA call). The
/// workspace grows with `max_step_tokens`; with at most 8 query heads per KV head it also
/// holds the prefill's block-major partials for up to 8192 rows: rows x `num_q_heads` x
/// `sel_count` x (2 `head_dim_v` + 4) bytes (2.2 GB at 64 heads, 16 blocks, DV = 128).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG`, `NSA_STATUS_BACKEND_UNAVAILABLE` (built without CUDA).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_device_size(cfg: *const nsa_config_t, out: *mut usize) -> nsa_status {
    guard("nsa_cuda_device_size", || {
        let out = out_ptr(out, "out")?;
        let cfg = read_config(cfg, "cfg")?;
        out.write(CudaBackend::device_bytes(&cfg)?);
        Ok(())
    })
}

/// Creates a CUDA backend on device `opts->device_ordinal` (NULL `opts`: device 0, no
/// kernel cache directory but `NSA_CUDA_CACHE_DIR`) over the caller's device buffer
/// `device_ptr` (`bytes` bytes, at least `nsa_cuda_device_size`, 256-byte aligned,
/// allocated in that device's primary context, e.g. by `cudaMalloc` after
/// `cudaSetDevice`) and writes its handle to `*out`. Compiles the kernels with NVRTC
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
/// `NSA_STATUS_INVALID_CONFIG`, `NSA_STATUS_INVALID_ARGUMENT` (`device_ptr` 0 or not
/// memory of the device, `opts->device_ordinal` not a device, `opts->cache_dir` not UTF-8),
/// `NSA_STATUS_MISALIGNED`, `NSA_STATUS_BUFFER_TOO_SMALL`,
/// `NSA_STATUS_BACKEND_UNAVAILABLE`, `NSA_STATUS_CUDA_ERROR` (compilation or loading).
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_backend_create(
    cfg: *const nsa_config_t,
    opts: *const nsa_cuda_options_t,
    device_ptr: u64,
    bytes: usize,
    out: *mut *mut nsa_cuda_backend,
) -> nsa_status {
    guard("nsa_cuda_backend_create", || {
        let out = out_ptr(out, "out")?;
        let cfg = read_config(cfg, "cfg")?;
        let opts = read_options(opts)?;
        let backend = CudaBackend::new_with(&cfg, device_ptr, bytes, &opts)?;
        out.write(Box::into_raw(Box::new(nsa_cuda_backend { magic: CUDA_MAGIC, backend })));
        Ok(())
    })
}

/// Frees the backend's host-side state (the device buffer stays the caller's). NULL is
/// ignored. The handle must not be used afterwards; work already enqueued on a stream
/// must be finished or synchronized first.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_backend_destroy(backend: *mut nsa_cuda_backend) {
    guard_infallible("nsa_cuda_backend_destroy", (), || {
        if let Ok(b) = handle_mut(backend, "backend") {
            b.magic = 0;
            drop(Box::from_raw(backend));
        }
    })
}

/// Uploads the planned step (its sequences, copy-on-write copies and page tables) into the
/// backend's device workspace, on `stream` (a `CUstream`; NULL is the default stream).
/// Call once per step, after `nsa_cache_plan_step` and before the step's layer runs.
/// Writes the plan into one of the backend's two page-locked staging buffers (first
/// waiting, if need be, until the copies that used it two uploads ago have run) and
/// enqueues asynchronous copies from it; allocates nothing. Stays outside CUDA graphs;
/// the layer runs can be captured. When the step lists the same sequences in the same
/// order as the backend's previous upload, copies no page, and the cache changed no page
/// table since but by planning steps (no fork, truncate, remove, import or abort), only
/// the page-table entries the sequences gained are copied (a decode step: an entry a
/// sequence every `page_size` tokens); the rest of the tables is what the earlier uploads
/// left in the workspace. So every upload must run on the device in the order the calls
/// were made (one stream, or streams ordered by events, as the layer runs need anyway).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_NO_STEP`,
/// `NSA_STATUS_INVALID_ARGUMENT` (a cache with another config, or other than the one this
/// backend serves), `NSA_STATUS_BACKEND_UNAVAILABLE`, `NSA_STATUS_CUDA_ERROR`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_upload_step(backend: *mut nsa_cuda_backend, cache: *const nsa_cache, stream: *mut c_void) -> nsa_status {
    guard("nsa_cuda_upload_step", || {
        let b = handle_mut(backend, "backend")?;
        let c = handle(cache, "cache")?;
        Ok(b.backend.upload_step(c.cache(), stream.cast())?)
    })
}

/// Enqueues layer `layer` of the planned (and uploaded) step on `stream`: copy-on-write
/// copies, append of the step's K/V rows, compression of finished blocks, NSA attention
/// for every new token into `io->out` (and the selected blocks into `io->selected`).
/// `io`'s arrays are device addresses of the backend's device (see `nsa_layer_io_t`).
/// With `io->q` and `io->out` both 0 the run is append-only: K/V appended and
/// compressed, no attention (to fill a cache from K/V the host already has).
/// Allocates nothing; reads lengths on the device, so a decode step's layer runs can be
/// captured in a CUDA graph. Run every layer once per step: the run counts the layer in
/// the cache's step (see `nsa_cache`); a replayed graph does not, so count each replayed
/// layer with `nsa_cache_mark_layer_run`. The backend serves one cache (the first it ran a
/// layer of).
/// Stream order: the layer's first kernel starts after everything enqueued before it on
/// `stream`, and work enqueued after the call (without programmatic dependent launch of
/// its own) starts after all of the layer's kernels finished;
/// between themselves the layer's kernels use programmatic dependent launch on sm_90+
/// (each may start while the previous one finishes and waits for it before reading its
/// output; `NSA_CUDA_NO_PDL=1` at backend creation turns this off).
///
/// Non-finite inputs: as `nsa_cpu_run_layer` says (a NaN or infinity reaches exactly the
/// outputs whose branches read it), on every path: where a tile of keys serves several
/// positions of the tensor-core prefill and a value some of them must not see is
/// non-finite (or a stale pool row past a sequence's end holds such bits), the layer's last
/// kernel recomputes those positions' outputs in scalar (slower, only then).
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
    io: *const nsa_layer_io_t,
    stream: *mut c_void,
) -> nsa_status {
    guard("nsa_cuda_run_layer", || {
        let io = read_struct(io, "io")?;
        let b = handle_mut(backend, "backend")?;
        let c = handle(cache, "cache")?;
        let cfg = *b.backend.config();
        io.check_step_fields(&cfg, c.cache())?;
        // Required pointers (and the q = out = 0 append-only rule) are checked by the
        // backend; here only what it cannot know: the phi weights' element counts.
        for (arg, p, len, want) in [
            ("io->phi_k_len", io.phi_k, io.phi_k_len, cfg.phi_weight_len(cfg.head_dim_qk)),
            ("io->phi_v_len", io.phi_v, io.phi_v_len, cfg.phi_weight_len(cfg.head_dim_v)),
        ] {
            if len != want || (want > 0 && p.is_null()) {
                return Err(NsaError::arg(arg, len, format!("phi {} needs {want} f32 weights at a non-zero device pointer", cfg.phi.name())).into());
            }
        }
        let addr = |p: *const c_void| p as usize as u64;
        let dio = DeviceLayerIo {
            q: addr(io.q),
            k: addr(io.k),
            v: addr(io.v),
            gates: addr(io.gates.cast()),
            out: addr(io.out.cast_const()),
            selected: addr(io.selected.cast_const().cast()),
            phi_k: addr(io.phi_k.cast()),
            phi_v: addr(io.phi_v.cast()),
        };
        Ok(b.backend.run_layer(c.cache(), layer, &dio, stream.cast())?)
    })
}
