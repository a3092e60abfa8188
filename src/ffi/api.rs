//! The function table for hosts that load the library at run time (`dlopen` + one
//! symbol), like ONNX Runtime's `OrtGetApiBase` or PJRT's `GetPjrtApi`.

use std::ffi::{c_char, c_void};

use super::cache::*;
use super::config::*;
use super::cpu::*;
use super::cuda::*;
use super::status::*;
use super::state::*;
use super::version::*;

/// Every function of ABI version 2, for hosts that load the library with `dlopen` and
/// look up only `nsa_get_api`. Each field points to the function of the same name
/// without the `nsa_` prefix; see that function's documentation.
///
/// Versioning: fields are only ever appended within ABI version 2. Before using a field
/// added after the version your code needs, check
/// `api->struct_size >= offsetof(nsa_api_v2, field) + sizeof api->field`.
/// The table is static and immutable: it may be shared by all threads.
#[repr(C)]
pub struct nsa_api_v2 {
    /// `sizeof(nsa_api_v2)` in the loaded library.
    pub struct_size: u32,
    /// `NSA_ABI_VERSION` of the loaded library (2).
    pub abi_version: u32,
    /// `nsa_abi_version`.
    pub abi_version_fn: extern "C" fn() -> u32,
    /// `nsa_version`.
    pub version: extern "C" fn() -> u32,
    /// `nsa_version_string`.
    pub version_string: extern "C" fn() -> *const c_char,
    /// `nsa_status_string`.
    pub status_string: extern "C" fn(status: nsa_status) -> *const c_char,
    /// `nsa_last_error`.
    pub last_error: extern "C" fn() -> *const c_char,
    /// `nsa_config_preset`.
    pub config_preset: unsafe extern "C" fn(preset: nsa_preset, out: *mut nsa_config_t) -> nsa_status,
    /// `nsa_config_fit_pages`.
    pub config_fit_pages: unsafe extern "C" fn(cfg: *mut nsa_config_t) -> nsa_status,
    /// `nsa_config_validate`.
    pub config_validate: unsafe extern "C" fn(cfg: *const nsa_config_t) -> nsa_status,
    /// `nsa_cache_arena_size`.
    pub cache_arena_size: unsafe extern "C" fn(cfg: *const nsa_config_t, out: *mut usize) -> nsa_status,
    /// `nsa_cache_init`.
    pub cache_init: unsafe extern "C" fn(
        cfg: *const nsa_config_t,
        arena: *mut c_void,
        bytes: usize,
        out: *mut *mut nsa_cache,
    ) -> nsa_status,
    /// `nsa_cache_deinit`.
    pub cache_deinit: unsafe extern "C" fn(cache: *mut nsa_cache),
    /// `nsa_cache_add`.
    pub cache_add: unsafe extern "C" fn(cache: *mut nsa_cache, seq: u32) -> nsa_status,
    /// `nsa_cache_fork`.
    pub cache_fork: unsafe extern "C" fn(cache: *mut nsa_cache, src: u32, dst: u32) -> nsa_status,
    /// `nsa_cache_truncate`.
    pub cache_truncate: unsafe extern "C" fn(cache: *mut nsa_cache, seq: u32, new_len: u32) -> nsa_status,
    /// `nsa_cache_remove`.
    pub cache_remove: unsafe extern "C" fn(cache: *mut nsa_cache, seq: u32) -> nsa_status,
    /// `nsa_cache_len`.
    pub cache_len: unsafe extern "C" fn(cache: *const nsa_cache, seq: u32, out: *mut u32) -> nsa_status,
    /// `nsa_cache_stats`.
    pub cache_stats: unsafe extern "C" fn(cache: *const nsa_cache, out: *mut nsa_cache_stats_t) -> nsa_status,
    /// `nsa_cache_config`.
    pub cache_config: unsafe extern "C" fn(cache: *const nsa_cache, out: *mut nsa_config_t) -> nsa_status,
    /// `nsa_cache_check`.
    pub cache_check: unsafe extern "C" fn(cache: *const nsa_cache) -> nsa_status,
    /// `nsa_cache_plan_step`.
    pub cache_plan_step: unsafe extern "C" fn(cache: *mut nsa_cache, entries: *const nsa_step_seq_t, n: u32) -> nsa_status,
    /// `nsa_cpu_buffer_size`.
    pub cpu_buffer_size: unsafe extern "C" fn(cfg: *const nsa_config_t, out: *mut usize) -> nsa_status,
    /// `nsa_cpu_backend_create`.
    pub cpu_backend_create: unsafe extern "C" fn(
        cfg: *const nsa_config_t,
        buf: *mut c_void,
        bytes: usize,
        out: *mut *mut nsa_cpu_backend,
    ) -> nsa_status,
    /// `nsa_cpu_backend_destroy`.
    pub cpu_backend_destroy: unsafe extern "C" fn(backend: *mut nsa_cpu_backend),
    /// `nsa_cpu_run_layer`.
    pub cpu_run_layer: unsafe extern "C" fn(
        backend: *mut nsa_cpu_backend,
        cache: *const nsa_cache,
        layer: u32,
        io: *const nsa_layer_io_t,
    ) -> nsa_status,
    /// `nsa_cuda_probe`.
    pub cuda_probe: unsafe extern "C" fn(device_ordinal: i32, out: *mut nsa_cuda_device_info_t) -> nsa_status,
    /// `nsa_cuda_device_size`.
    pub cuda_device_size: unsafe extern "C" fn(cfg: *const nsa_config_t, out: *mut usize) -> nsa_status,
    /// `nsa_cuda_backend_create`.
    pub cuda_backend_create: unsafe extern "C" fn(
        cfg: *const nsa_config_t,
        opts: *const nsa_cuda_options_t,
        device_ptr: u64,
        bytes: usize,
        out: *mut *mut nsa_cuda_backend,
    ) -> nsa_status,
    /// `nsa_cuda_backend_destroy`.
    pub cuda_backend_destroy: unsafe extern "C" fn(backend: *mut nsa_cuda_backend),
    /// `nsa_cuda_upload_step`.
    pub cuda_upload_step: unsafe extern "C" fn(backend: *mut nsa_cuda_backend, cache: *const nsa_cache, stream: *mut c_void) -> nsa_status,
    /// `nsa_cuda_run_layer`.
    pub cuda_run_layer: unsafe extern "C" fn(
        backend: *mut nsa_cuda_backend,
        cache: *const nsa_cache,
        layer: u32,
        io: *const nsa_layer_io_t,
        stream: *mut c_void,
    ) -> nsa_status,
    /// `nsa_cpu_backend_create_hosted`.
    pub cpu_backend_create_hosted: unsafe extern "C" fn(
        cfg: *const nsa_config_t,
        buf: *mut c_void,
        bytes: usize,
        out: *mut *mut nsa_cpu_backend,
    ) -> nsa_status,
    /// `nsa_cpu_run_layer_part`.
    pub cpu_run_layer_part: unsafe extern "C" fn(
        backend: *const nsa_cpu_backend,
        cache: *const nsa_cache,
        layer: u32,
        io: *const nsa_layer_io_t,
        ith: u32,
        nth: u32,
    ) -> nsa_status,
    /// `nsa_phi_weight_len`.
    pub phi_weight_len: unsafe extern "C" fn(cfg: *const nsa_config_t, side: nsa_phi_side, out: *mut usize) -> nsa_status,
    /// `nsa_cache_sequences`.
    pub cache_sequences: unsafe extern "C" fn(cache: *const nsa_cache, ids: *mut u32, capacity: u32, count: *mut u32) -> nsa_status,
    /// `nsa_cache_state_size`.
    pub cache_state_size: unsafe extern "C" fn(cache: *const nsa_cache, seq: u32, out: *mut usize) -> nsa_status,
    /// `nsa_cpu_state_export`.
    pub cpu_state_export: unsafe extern "C" fn(
        backend: *mut nsa_cpu_backend,
        cache: *const nsa_cache,
        seq: u32,
        buf: *mut c_void,
        bytes: usize,
        written: *mut usize,
    ) -> nsa_status,
    /// `nsa_cpu_state_import`.
    pub cpu_state_import:
        unsafe extern "C" fn(backend: *mut nsa_cpu_backend, cache: *mut nsa_cache, seq: u32, buf: *const c_void, bytes: usize) -> nsa_status,
    /// `nsa_cuda_state_export`.
    pub cuda_state_export: unsafe extern "C" fn(
        backend: *mut nsa_cuda_backend,
        cache: *const nsa_cache,
        seq: u32,
        buf: *mut c_void,
        bytes: usize,
        written: *mut usize,
        stream: *mut c_void,
    ) -> nsa_status,
    /// `nsa_cuda_state_import`.
    pub cuda_state_import: unsafe extern "C" fn(
        backend: *mut nsa_cuda_backend,
        cache: *mut nsa_cache,
        seq: u32,
        buf: *const c_void,
        bytes: usize,
        stream: *mut c_void,
    ) -> nsa_status,
    /// `nsa_cache_abort_step`.
    pub cache_abort_step: unsafe extern "C" fn(cache: *mut nsa_cache) -> nsa_status,
    /// `nsa_cache_mark_layer_run`.
    pub cache_mark_layer_run: unsafe extern "C" fn(cache: *const nsa_cache, layer: u32) -> nsa_status,
}

static API_V2: nsa_api_v2 = nsa_api_v2 {
    struct_size: std::mem::size_of::<nsa_api_v2>() as u32,
    abi_version: NSA_ABI_VERSION,
    abi_version_fn: nsa_abi_version,
    version: nsa_version,
    version_string: nsa_version_string,
    status_string: nsa_status_string,
    last_error: nsa_last_error,
    config_preset: nsa_config_preset,
    config_fit_pages: nsa_config_fit_pages,
    config_validate: nsa_config_validate,
    cache_arena_size: nsa_cache_arena_size,
    cache_init: nsa_cache_init,
    cache_deinit: nsa_cache_deinit,
    cache_add: nsa_cache_add,
    cache_fork: nsa_cache_fork,
    cache_truncate: nsa_cache_truncate,
    cache_remove: nsa_cache_remove,
    cache_len: nsa_cache_len,
    cache_stats: nsa_cache_stats,
    cache_config: nsa_cache_config,
    cache_check: nsa_cache_check,
    cache_plan_step: nsa_cache_plan_step,
    cpu_buffer_size: nsa_cpu_buffer_size,
    cpu_backend_create: nsa_cpu_backend_create,
    cpu_backend_destroy: nsa_cpu_backend_destroy,
    cpu_run_layer: nsa_cpu_run_layer,
    cuda_probe: nsa_cuda_probe,
    cuda_device_size: nsa_cuda_device_size,
    cuda_backend_create: nsa_cuda_backend_create,
    cuda_backend_destroy: nsa_cuda_backend_destroy,
    cuda_upload_step: nsa_cuda_upload_step,
    cuda_run_layer: nsa_cuda_run_layer,
    cpu_backend_create_hosted: nsa_cpu_backend_create_hosted,
    cpu_run_layer_part: nsa_cpu_run_layer_part,
    phi_weight_len: nsa_phi_weight_len,
    cache_sequences: nsa_cache_sequences,
    cache_state_size: nsa_cache_state_size,
    cpu_state_export: nsa_cpu_state_export,
    cpu_state_import: nsa_cpu_state_import,
    cuda_state_export: nsa_cuda_state_export,
    cuda_state_import: nsa_cuda_state_import,
    cache_abort_step: nsa_cache_abort_step,
    cache_mark_layer_run: nsa_cache_mark_layer_run,
};

/// The function table of ABI version `abi_version` (pass `NSA_ABI_VERSION`), or NULL
/// when the loaded library does not implement that version. The one symbol a plugin
/// host needs (`"libnsa.so.0"` is found through the host's rpath, `LD_LIBRARY_PATH` or
/// the ldconfig cache; otherwise pass the full path,
/// `$(pkg-config --variable=libdir nsa)/libnsa.so.0`):
///
/// ```c
/// void *lib = dlopen("libnsa.so.0", RTLD_NOW | RTLD_LOCAL);
/// const nsa_api_v2 *(*get)(uint32_t) =
///     lib ? (const nsa_api_v2 *(*)(uint32_t))dlsym(lib, "nsa_get_api") : NULL;
/// const nsa_api_v2 *api = get ? get(NSA_ABI_VERSION) : NULL;
/// if (get && !api) {
///     // Why: nsa_last_error is exported by every version, so it needs no table.
///     const char *(*why)(void) = (const char *(*)(void))dlsym(lib, "nsa_last_error");
///     fprintf(stderr, "nsa: %s\n", why ? why() : "no nsa_last_error");
/// }
/// ```
///
/// On NULL the calling thread's `nsa_last_error()` names the requested version and the
/// one the library implements; `nsa_last_error` keeps its name and signature in every
/// version, so a host looks it up with `dlsym` as it did `nsa_get_api`.
///
/// The table is static (never free it) and valid while the library stays loaded.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn nsa_get_api(abi_version: u32) -> *const nsa_api_v2 {
    guard_infallible("nsa_get_api", std::ptr::null(), || {
        if abi_version == NSA_ABI_VERSION {
            return &API_V2 as *const nsa_api_v2;
        }
        // Recorded as the thread's last error; the status itself is not returned.
        let _ = guard("nsa_get_api", || {
            Err(crate::error::NsaError::arg("abi_version", abi_version, format!("this library implements ABI version {NSA_ABI_VERSION} only")).into())
        });
        std::ptr::null()
    })
}
