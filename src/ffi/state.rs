//! One sequence's state (its length, and every layer's K/V rows and compressed tokens)
//! saved to and restored from a caller buffer, like llama.cpp's
//! `llama_state_seq_get_data` / `llama_state_seq_set_data`. The format and its checks are
//! `cache/state.rs`; both backends write and read the same bytes.

use std::ffi::c_void;

use super::args::{disjoint, handle, handle_mut, non_null, out_ptr, span, Span};
use super::cache::nsa_cache;
use super::cpu::nsa_cpu_backend;
use super::cuda::nsa_cuda_backend;
use super::status::{guard, nsa_status, FfiResult};

/// The format version `nsa_*_state_export` writes and `nsa_*_state_import` reads. A state
/// buffer starts with a 128-byte header: the magic `"NSASEQST"`, this version, the config
/// fields the importing cache must share (shape, dtype, NSA parameters, phi kind,
/// `page_size`, `num_layers`; not the capacity or `cpu_threads`), the sequence's length,
/// its compressed-token count and the payload size. The payload is the sequence's pages
/// in the pools' own layout (native endianness: import on a machine of the same byte
/// order). docs/INTEGRATION.md ("Saving and restoring a sequence") shows the calls.
pub const NSA_STATE_VERSION: u32 = crate::cache::STATE_VERSION;

/// Writes to `*out` the bytes `nsa_cpu_state_export` / `nsa_cuda_state_export` write for
/// the live sequence `seq`: the 128-byte header plus, per layer, its raw and compressed
/// pages (`ceil(len/page_size)` and `ceil(ncmp/page_size)` pages of
/// `HKV*page_size*(DK+DV)` elements each).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`,
/// `NSA_STATUS_INVALID_ARGUMENT` (`seq` out of range), `NSA_STATUS_UNKNOWN_SEQUENCE`.
/// Thread safety: reads only; may run concurrently with other `const nsa_cache*` calls.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_state_size(cache: *const nsa_cache, seq: u32, out: *mut usize) -> nsa_status {
    guard("nsa_cache_state_size", || {
        let out = out_ptr(out, "out")?;
        let n = handle(cache, "cache")?.cache().sequence_state_bytes(seq)?;
        out.write(n);
        Ok(())
    })
}

/// The caller's state buffer, checked present and clear of the engine's own memory.
unsafe fn state_span(buf: *const c_void, bytes: usize, written: bool, others: &[Span]) -> FfiResult<Span> {
    non_null(buf.cast::<u8>(), "buf")?;
    let s = span(buf.cast::<u8>(), bytes, "buf", written)?;
    for o in others {
        disjoint(&[s, *o])?;
    }
    Ok(s)
}

/// Saves the live sequence `seq` of `cache` (its length, and every layer's K/V rows and
/// compressed tokens from the CPU backend's pools) into the caller's `buf` (`bytes`
/// bytes, at least `nsa_cache_state_size`; any alignment) and writes the bytes used to
/// `*written`. The cache and pools are only read. Call it when the sequence is not in a
/// half-run step (after every layer of its last step ran). The buffer can be kept (in
/// memory or a file) and restored with `nsa_cpu_state_import` or `nsa_cuda_state_import`
/// into any cache with the same config fields (see `NSA_STATE_VERSION`).
///
/// Errors (nothing written): `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`,
/// `NSA_STATUS_INVALID_ARGUMENT` (`seq` out of range, `buf` overlapping the arena or the
/// backend's buffer, a cache with another config), `NSA_STATUS_UNKNOWN_SEQUENCE`,
/// `NSA_STATUS_BUFFER_TOO_SMALL`. Thread safety: as `nsa_cpu_run_layer`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_state_export(
    backend: *mut nsa_cpu_backend,
    cache: *const nsa_cache,
    seq: u32,
    buf: *mut c_void,
    bytes: usize,
    written: *mut usize,
) -> nsa_status {
    guard("nsa_cpu_state_export", || {
        let written = out_ptr(written, "written")?;
        let b = handle_mut(backend, "backend")?;
        let c = handle(cache, "cache")?;
        let own = Span { arg: "backend buffer", start: b.base, len: b.bytes, written: false };
        let out = state_span(buf, bytes, true, &[own, c.span()])?;
        // SAFETY: `buf` holds `bytes` bytes (the caller's promise), checked non-NULL and
        // overlapping neither the arena nor the backend's buffer.
        let n = b.backend.export_sequence(c.cache(), seq, out.slice_mut::<u8>())?;
        written.write(n);
        Ok(())
    })
}

/// Restores a state saved by `nsa_cpu_state_export` or `nsa_cuda_state_export` into the
/// free slot `seq` of `cache` (`0 <= seq < max_seqs`, not live): takes fresh pages,
/// writes the rows into the CPU backend's pools, then makes `seq` live with the saved
/// length; decoding it continues exactly as the saved sequence would have. `buf` is read
/// during the call only. Ends the planned step, like `nsa_cache_add`.
///
/// Errors (the cache is unchanged: no page taken, no slot live):
/// `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_INVALID_ARGUMENT`
/// (`seq` out of range; a buffer that is not a state of this version, is truncated, or
/// was saved under another config: the message names the header field and both values;
/// a cache with another config than the backend), `NSA_STATUS_SEQUENCE_EXISTS`,
/// `NSA_STATUS_OUT_OF_PAGES`. Thread safety: as `nsa_cpu_run_layer`, and no other call on
/// the cache may overlap it.
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_state_import(
    backend: *mut nsa_cpu_backend,
    cache: *mut nsa_cache,
    seq: u32,
    buf: *const c_void,
    bytes: usize,
) -> nsa_status {
    guard("nsa_cpu_state_import", || {
        let b = handle_mut(backend, "backend")?;
        let c = handle_mut(cache, "cache")?;
        let own = Span { arg: "backend buffer", start: b.base, len: b.bytes, written: true };
        let arena = Span { written: true, ..c.span() };
        let src = state_span(buf, bytes, false, &[own, arena])?;
        // SAFETY: as in export; nothing writes `buf` during the call.
        Ok(b.backend.import_sequence(c.cache_mut(), seq, src.slice::<u8>())?)
    })
}

/// `nsa_cpu_state_export` for the CUDA backend: copies the sequence's pages from the
/// device, after the work queued on `stream` (a `CUstream`; NULL is the default stream),
/// into the host buffer `buf`, and waits for the copies. The bytes are the same format:
/// either backend imports them.
///
/// Errors: as `nsa_cpu_state_export`, and `NSA_STATUS_BACKEND_UNAVAILABLE`,
/// `NSA_STATUS_CUDA_ERROR`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_state_export(
    backend: *mut nsa_cuda_backend,
    cache: *const nsa_cache,
    seq: u32,
    buf: *mut c_void,
    bytes: usize,
    written: *mut usize,
    stream: *mut c_void,
) -> nsa_status {
    guard("nsa_cuda_state_export", || {
        let written = out_ptr(written, "written")?;
        let b = handle_mut(backend, "backend")?;
        let c = handle(cache, "cache")?;
        let out = state_span(buf, bytes, true, &[c.span()])?;
        // SAFETY: as in `nsa_cpu_state_export`.
        let n = b.backend.export_sequence(c.cache(), seq, out.slice_mut::<u8>(), stream.cast())?;
        written.write(n);
        Ok(())
    })
}

/// `nsa_cpu_state_import` for the CUDA backend: copies the state's rows from the host
/// buffer `buf` into free pages of the device pools on `stream` (waited for), then makes
/// `seq` live. A failed copy touched only free pages; the cache is unchanged. Upload the
/// next step (`nsa_cuda_upload_step`) as usual.
///
/// Errors: as `nsa_cpu_state_import`, and `NSA_STATUS_BACKEND_UNAVAILABLE`,
/// `NSA_STATUS_CUDA_ERROR`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cuda_state_import(
    backend: *mut nsa_cuda_backend,
    cache: *mut nsa_cache,
    seq: u32,
    buf: *const c_void,
    bytes: usize,
    stream: *mut c_void,
) -> nsa_status {
    guard("nsa_cuda_state_import", || {
        let b = handle_mut(backend, "backend")?;
        let c = handle_mut(cache, "cache")?;
        let arena = Span { written: true, ..c.span() };
        let src = state_span(buf, bytes, false, &[arena])?;
        // SAFETY: as in `nsa_cpu_state_import`.
        Ok(b.backend.import_sequence(c.cache_mut(), seq, src.slice::<u8>(), stream.cast())?)
    })
}
