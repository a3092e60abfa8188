//! `struct nsa_cache`: the paged KV cache, placed entirely inside the caller's arena
//! (handle included), with its sequence operations and the step plan.

use std::ffi::c_void;
use std::mem::{align_of, offset_of, size_of};

use super::args::{self, carve, handle, handle_bytes, handle_mut, out_ptr, out_struct, Handle, Versioned};
use super::config::{nsa_config_t, read_config};
use super::status::{guard, guard_infallible, nsa_status};
use crate::cache::Cache;
use crate::layout::ARENA_ALIGN;
use crate::plan::StepSeq;

/// A paged NSA KV cache: page pools, per-sequence page tables and lengths, and the current
/// step plan. Opaque; it lives at the start of the arena given to `nsa_cache_init` and owns
/// nothing outside it.
///
/// Step lifecycle (the same for every backend): `nsa_cache_plan_step` opens a step; each
/// layer `0..num_layers` then runs exactly once, in any order (`nsa_cpu_run_layer`,
/// `nsa_cuda_run_layer`); when the last one has run the step is complete. While a step
/// is open, `nsa_cache_add`, `_fork`, `_truncate`, `_remove` and `_plan_step` refuse with
/// `NSA_STATUS_STEP_OPEN` (the message names the step, the layers not yet run and the
/// positions they have not written), a second run of a layer returns
/// `NSA_STATUS_LAYER_ALREADY_RUN`, and `nsa_cache_abort_step` undoes the step exactly
/// (lengths, page tables, shared pages, free pages: as before the plan). So a sequence
/// never counts a position that some layer has not written.
///
/// Backends: a backend's pools hold the K/V of one cache's pages, so a backend serves one
/// cache only, the first whose layer it runs; any other cache is refused
/// (`NSA_STATUS_INVALID_ARGUMENT`). Give each cache its own backend. (A cache may be
/// mirrored on a second backend, e.g. to compare CPU and GPU: each backend runs each layer
/// once per step, and the cache counts a layer when the first one ran it.) A host that
/// replays a captured layer run (CUDA graph) counts it with `nsa_cache_mark_layer_run`.
///
/// Thread safety: not internally synchronized. Calls that take `nsa_cache*` must not run
/// concurrently with any other call on the same cache; calls that take `const nsa_cache*`
/// (`nsa_cache_len`, `nsa_cache_stats`, `nsa_cache_config`, `nsa_cpu_run_layer`) may run
/// concurrently with each other. Different caches are independent.
pub struct nsa_cache {
    magic: u64,
    cache: Cache<'static>,
    /// The whole arena, handle included (no layer's writable array may overlap it).
    base: usize,
    bytes: usize,
}

const CACHE_MAGIC: u64 = 0x4e53_415f_4341_4348; // "NSA_CACH"

impl Handle for nsa_cache {
    const MAGIC: u64 = CACHE_MAGIC;
    const NAME: &'static str = "nsa_cache";
    unsafe fn magic(p: *const Self) -> u64 {
        std::ptr::addr_of!((*p).magic).read()
    }
}

impl nsa_cache {
    pub(crate) fn cache(&self) -> &Cache<'static> {
        &self.cache
    }
    pub(crate) fn cache_mut(&mut self) -> &mut Cache<'static> {
        &mut self.cache
    }
    /// Zeroes the handle's padding bytes in place: no byte of the caller's arena is left
    /// uninitialised.
    fn zero_padding(&mut self) {
        crate::zero_pad::zero_gaps!(self, nsa_cache { magic, cache, base, bytes });
        self.cache.zero_padding();
    }
    pub(crate) fn span(&self) -> args::Span {
        args::Span { arg: "cache arena", start: self.base, len: self.bytes, written: false }
    }
}

/// One sequence's part of a step: it appends `tokens` new tokens (1 to decode, more to
/// prefill a chunk). The step's rows (of q, k, v, gates, out, selected) are the entries'
/// tokens in entry order: entry 0's `tokens` rows first, then entry 1's, and so on.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct nsa_step_seq_t {
    /// Sequence id (a live sequence, listed at most once per step).
    pub seq: u32,
    /// New tokens, at least 1.
    pub tokens: u32,
}

// The plan reads the caller's array in place as `StepSeq` (no copy, no allocation).
const _: () = {
    assert!(size_of::<nsa_step_seq_t>() == size_of::<StepSeq>());
    assert!(align_of::<nsa_step_seq_t>() == align_of::<StepSeq>());
    assert!(offset_of!(nsa_step_seq_t, seq) == offset_of!(StepSeq, seq));
    assert!(offset_of!(nsa_step_seq_t, tokens) == offset_of!(StepSeq, tokens));
};

/// Page-pool occupancy, from `nsa_cache_stats`. Set `struct_size` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct nsa_cache_stats_t {
    /// `sizeof(nsa_cache_stats_t)` as the caller compiled it.
    pub struct_size: u32,
    /// Raw pages in the pool (`num_pages`).
    pub raw_pages: u32,
    /// Raw pages free.
    pub raw_free: u32,
    /// Compressed pages in the pool (`num_cmp_pages`).
    pub cmp_pages: u32,
    /// Compressed pages free.
    pub cmp_free: u32,
    /// Live sequences.
    pub live_seqs: u32,
}

// SAFETY: repr(C), starts with struct_size, six u32 fields.
unsafe impl Versioned for nsa_cache_stats_t {
    const NAME: &'static str = "nsa_cache_stats_t";
}

/// Writes to `*out` the bytes of host arena a cache with this config needs (handle
/// included). Allocate at least that much, aligned to 16 bytes (what `malloc` returns on
/// 64-bit hosts), and pass it to `nsa_cache_init`.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_arena_size(cfg: *const nsa_config_t, out: *mut usize) -> nsa_status {
    guard("nsa_cache_arena_size", || {
        let out = out_ptr(out, "out")?;
        let cfg = read_config(cfg, "cfg")?;
        out.write(handle_bytes::<nsa_cache>() + Cache::arena_bytes(&cfg)?);
        Ok(())
    })
}

/// Initializes an empty cache in the caller's `arena` (`bytes` bytes, at least
/// `nsa_cache_arena_size`, 16-byte aligned) and writes its handle to `*out`. Every page is
/// free and no sequence exists. Allocates nothing: the handle and all metadata live in
/// the arena, so `*out` points into it.
///
/// Ownership: the caller keeps owning the arena. It must stay allocated and must not be
/// read or written by the caller while the handle is in use; to end the cache, call
/// `nsa_cache_deinit` (optional: the cache holds no other resource), then free the
/// arena. Initializing over a live cache discards it; the new cache is a different one for
/// the backends (a backend serves the cache it first ran a layer of, for its lifetime):
/// create new backends for it.
///
/// Errors: `NSA_STATUS_NULL_POINTER` (`cfg`, `arena`, `out`), `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG`, `NSA_STATUS_MISALIGNED` (`arena`),
/// `NSA_STATUS_BUFFER_TOO_SMALL` (`bytes`). On failure the arena is untouched.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_init(
    cfg: *const nsa_config_t,
    arena: *mut c_void,
    bytes: usize,
    out: *mut *mut nsa_cache,
) -> nsa_status {
    guard("nsa_cache_init", || {
        let out = out_ptr(out, "out")?;
        let cfg = read_config(cfg, "cfg")?;
        let need = Cache::arena_bytes(&cfg)?;
        let meta = carve::<nsa_cache>(arena.cast(), bytes, need, ARENA_ALIGN, "arena")?;
        let cache = Cache::new(&cfg, meta)?;
        let h = arena.cast::<nsa_cache>();
        h.write(nsa_cache { magic: CACHE_MAGIC, cache, base: arena as usize, bytes });
        (*h).zero_padding();
        out.write(h);
        Ok(())
    })
}

/// Ends a cache: afterwards the handle is invalid (calls with it fail with
/// `NSA_STATUS_INVALID_HANDLE` while the arena is still allocated) and the arena may be
/// freed or reused. NULL or an already ended handle is ignored. Must not run concurrently
/// with another call on the same cache.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_deinit(cache: *mut nsa_cache) {
    guard_infallible("nsa_cache_deinit", (), || {
        if let Ok(c) = handle_mut(cache, "cache") {
            c.magic = 0;
        }
    })
}

/// Starts an empty sequence in slot `seq` (`0 <= seq < max_seqs`). Ends a complete step
/// (its plan is dropped).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_STEP_OPEN`,
/// `NSA_STATUS_INVALID_ARGUMENT` (`seq` out of range), `NSA_STATUS_SEQUENCE_EXISTS`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_add(cache: *mut nsa_cache, seq: u32) -> nsa_status {
    guard("nsa_cache_add", || Ok(handle_mut(cache, "cache")?.cache.add_sequence(seq)?))
}

/// Makes `dst` a copy of the live sequence `src`: same length and contents, sharing its
/// pages by reference count (the first append to a shared, partly filled page copies
/// it). Needs no free page. Serves prefix sharing (prefill a prompt once, fork it per
/// request) and speculative decoding (fork, draft, keep or drop). Ends a complete step.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_STEP_OPEN`,
/// `NSA_STATUS_INVALID_ARGUMENT` (an id out of range), `NSA_STATUS_UNKNOWN_SEQUENCE`
/// (`src`), `NSA_STATUS_SEQUENCE_EXISTS` (`dst`).
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_fork(cache: *mut nsa_cache, src: u32, dst: u32) -> nsa_status {
    guard("nsa_cache_fork", || Ok(handle_mut(cache, "cache")?.cache.fork(src, dst)?))
}

/// Shortens the live sequence `seq` to `new_len` tokens (`new_len <= its length`): pages
/// past the new end return to the pool unless another sequence shares them, and
/// compressed tokens that are no longer complete are dropped. Used to reject draft
/// tokens in speculative decoding (to drop a step whose layers have not all run, use
/// `nsa_cache_abort_step`). Ends a complete step.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_STEP_OPEN`,
/// `NSA_STATUS_INVALID_ARGUMENT` (`seq` out of range, `new_len` too large),
/// `NSA_STATUS_UNKNOWN_SEQUENCE`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_truncate(cache: *mut nsa_cache, seq: u32, new_len: u32) -> nsa_status {
    guard("nsa_cache_truncate", || Ok(handle_mut(cache, "cache")?.cache.truncate(seq, new_len)?))
}

/// Ends the live sequence `seq` and frees its pages (those no other sequence shares);
/// the slot can be added again. Ends a complete step.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_STEP_OPEN`,
/// `NSA_STATUS_INVALID_ARGUMENT` (`seq` out of range), `NSA_STATUS_UNKNOWN_SEQUENCE`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_remove(cache: *mut nsa_cache, seq: u32) -> nsa_status {
    guard("nsa_cache_remove", || Ok(handle_mut(cache, "cache")?.cache.remove(seq)?))
}

/// Writes to `*out` the length (tokens appended so far, planned step included) of the
/// live sequence `seq`. Use `NSA_STATUS_UNKNOWN_SEQUENCE` to test whether a slot is live.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`,
/// `NSA_STATUS_INVALID_ARGUMENT` (`seq` out of range), `NSA_STATUS_UNKNOWN_SEQUENCE`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_len(cache: *const nsa_cache, seq: u32, out: *mut u32) -> nsa_status {
    guard("nsa_cache_len", || {
        let out = out_ptr(out, "out")?;
        let len = handle(cache, "cache")?.cache.len(seq)?;
        out.write(len);
        Ok(())
    })
}

/// Writes the page pools' occupancy to `*out` (set `out->struct_size` first).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`,
/// `NSA_STATUS_BAD_STRUCT_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_stats(cache: *const nsa_cache, out: *mut nsa_cache_stats_t) -> nsa_status {
    guard("nsa_cache_stats", || {
        let out = out_struct(out, "out")?;
        let s = handle(cache, "cache")?.cache.stats();
        out.write(nsa_cache_stats_t {
            struct_size: 0,
            raw_pages: s.raw_pages,
            raw_free: s.raw_free,
            cmp_pages: s.cmp_pages,
            cmp_free: s.cmp_free,
            live_seqs: s.live_seqs,
        });
        Ok(())
    })
}

/// Verifies the cache's internal bookkeeping: every page's refcount equals the number of
/// page-table entries naming it, free pages are on the free list exactly once, free plus
/// used pages make the whole pool, and every live sequence holds exactly the pages its
/// length needs, and a planned step's sequences have the lengths it gave them. Then the
/// lifecycle: while a step is open, positions are counted that some layer has not
/// written, and the check says so. O(pages + table entries): meant for debug builds,
/// tests and fuzzers, not for every step.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_CORRUPT`
/// (the message names the first violation), `NSA_STATUS_STEP_OPEN` (the bookkeeping is
/// consistent but a step is open; the message names its sequences, positions and the
/// layers not yet run).
///
/// Thread safety: reads only; may run concurrently with other `const nsa_cache*` calls.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_check(cache: *const nsa_cache) -> nsa_status {
    guard("nsa_cache_check", || {
        Ok(handle(cache, "cache")?.cache.check()?)
    })
}

/// Writes the config the cache was initialized with to `*out` (set `out->struct_size`
/// first).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`,
/// `NSA_STATUS_BAD_STRUCT_SIZE`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_config(cache: *const nsa_cache, out: *mut nsa_config_t) -> nsa_status {
    guard("nsa_cache_config", || {
        let out = out_struct(out, "out")?;
        let c = nsa_config_t::from(handle(cache, "cache")?.cache.config());
        out.write(c);
        Ok(())
    })
}

/// Plans one step, once per step before running its layers: every entry's sequence grows
/// by its `tokens` (this is how tokens are appended). On success the lengths, page tables
/// and pools already include the step and the step is open (see `nsa_cache`): run every
/// layer exactly once, in any order (`nsa_cpu_run_layer`, `nsa_cuda_run_layer`), which
/// writes the new positions' K/V and attention output, or undo the step with
/// `nsa_cache_abort_step`. `entries` is read during the call only.
///
/// Errors (nothing changes): `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`,
/// `NSA_STATUS_STEP_OPEN` (the previous step has layers not yet run),
/// `NSA_STATUS_INVALID_ARGUMENT` (`n` is 0 or above `max_step_seqs`; an id out of range or
/// listed twice; `tokens` 0; over `max_step_tokens` in all), `NSA_STATUS_UNKNOWN_SEQUENCE`,
/// `NSA_STATUS_SEQUENCE_TOO_LONG`, `NSA_STATUS_OUT_OF_PAGES`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_plan_step(cache: *mut nsa_cache, entries: *const nsa_step_seq_t, n: u32) -> nsa_status {
    guard("nsa_cache_plan_step", || {
        let c = handle_mut(cache, "cache")?;
        if entries.is_null() {
            return Err(super::status::Failure::null("entries"));
        }
        let entries = args::span(entries.cast::<StepSeq>(), n as usize, "entries", false)?;
        Ok(c.cache.plan_step(entries.slice())?)
    })
}

/// Lists the live sequence ids, ascending: writes their number to `*count` and, when
/// `ids` is not NULL, the ids to `ids[0 .. *count]`. `capacity` is the number of
/// `uint32_t` at `ids`. Query the count first with `ids = NULL` (`capacity` is then
/// ignored), or pass `max_seqs` entries, which always suffice.
///
/// Errors (nothing written): `NSA_STATUS_NULL_POINTER` (`cache`, `count`),
/// `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_BUFFER_TOO_SMALL` (`capacity` below the
/// count; the message gives the count).
///
/// Thread safety: reads only; may run concurrently with other `const nsa_cache*` calls.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_sequences(cache: *const nsa_cache, ids: *mut u32, capacity: u32, count: *mut u32) -> nsa_status {
    guard("nsa_cache_sequences", || {
        let count = out_ptr(count, "count")?;
        let c = handle(cache, "cache")?;
        let n = c.cache.stats().live_seqs;
        if !ids.is_null() {
            if capacity < n {
                let need = n as usize * size_of::<u32>();
                return Err(crate::error::NsaError::BufferTooSmall { what: "ids", got: capacity as usize * size_of::<u32>(), need }.into());
            }
            let out = args::span(ids.cast_const(), n as usize, "ids", true)?;
            let spans = [out, c.span()];
            args::disjoint(&spans)?;
            // SAFETY: `ids` holds `capacity >= n` elements (the caller's promise), checked
            // aligned and not overlapping the arena.
            for (slot, id) in out.slice_mut::<u32>().iter_mut().zip(c.cache.sequences()) {
                *slot = id;
            }
        }
        count.write(n);
        Ok(())
    })
}

/// Undoes the planned step, whether or not its layers ran (all, some or none): every
/// sequence of the step gets back its length, page tables and compressed tokens, pages the
/// plan took return to the pool, and pages the plan had copied for copy-on-write are
/// shared again, so the cache's bookkeeping is byte for byte what it was before
/// `nsa_cache_plan_step`. No step is planned afterwards. K/V rows the layers already wrote
/// for the step are dropped with it. Use it to give up a step (an error in the host's
/// forward pass, a cancelled request) before any other cache call.
///
/// On the CUDA backend the host bookkeeping changes at once: issue the next work on the
/// stream the step's layers ran on (or synchronize), as after `nsa_cache_truncate`.
///
/// Errors (nothing changes): `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`,
/// `NSA_STATUS_NO_STEP` (no step is planned, or a later add/fork/truncate/remove ended a
/// complete one).
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_abort_step(cache: *mut nsa_cache) -> nsa_status {
    guard("nsa_cache_abort_step", || Ok(handle_mut(cache, "cache")?.cache.abort_step()?))
}

/// Counts `layer` as run in the planned step, for a host that replays a captured layer
/// run (a CUDA graph of `nsa_cuda_run_layer`) instead of calling the run function, which
/// is what counts layers otherwise. Call it once per replayed layer and step, after
/// queueing the replay; a layer that already counts as run stays counted. Do not use it
/// to skip a layer: a sequence would then count positions that layer never wrote.
///
/// Errors (nothing changes): `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`,
/// `NSA_STATUS_NO_STEP`, `NSA_STATUS_INVALID_ARGUMENT` (`layer` out of range).
///
/// Thread safety: as a layer run; may run concurrently with other `const nsa_cache*` calls.
#[no_mangle]
pub unsafe extern "C" fn nsa_cache_mark_layer_run(cache: *const nsa_cache, layer: u32) -> nsa_status {
    guard("nsa_cache_mark_layer_run", || Ok(handle(cache, "cache")?.cache.mark_layer_run(layer)?))
}
