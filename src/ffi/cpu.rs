//! `struct nsa_cpu_backend`: the CPU backend (K/V pools and scratch in the caller's buffer,
//! handle included) and the per-layer run.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use half::{bf16, f16};

use super::args::{carve, disjoint, handle, handle_bytes, out_ptr, read_struct, span, Handle, Span, Versioned};
use super::cache::nsa_cache;
use super::config::{nsa_config_t, nsa_dtype, read_config};
use super::status::{guard, nsa_status, FfiResult};
use crate::config::Dtype;
use crate::cpu::{CpuBackend, LayerIo, PhiWeights};
use crate::elem::Elem;
use crate::error::NsaError;
use crate::layout::ARENA_ALIGN;

/// The CPU backend: every layer's K/V pools and each thread's scratch, in the buffer given
/// to `nsa_cpu_backend_create`, plus `cpu_threads - 1` worker threads (none when made by
/// `nsa_cpu_backend_create_hosted`). Opaque; it lives at the start of that buffer.
///
/// Thread safety: one call at a time per backend, except the `nth` calls of one
/// `nsa_cpu_run_layer_part` layer run, made concurrently by the host's threads; an
/// overlapping `nsa_cpu_run_layer` on the same backend is refused with `NSA_STATUS_BUSY`
/// (it does nothing). Different backends are independent and may run concurrently. A
/// backend serves one cache (see `nsa_cache`).
pub struct nsa_cpu_backend {
    magic: u64,
    pub(super) backend: CpuBackend<'static>,
    pub(super) base: usize,
    pub(super) bytes: usize,
    /// 1 while a call uses `backend`; accessed only atomically, through raw pointers, so
    /// that a concurrent caller never forms a reference to `backend`.
    busy: AtomicU64,
}

impl nsa_cpu_backend {
    /// Zeroes the handle's padding bytes in place: no byte of the caller's buffer is left
    /// uninitialised.
    fn zero_padding(&mut self) {
        crate::zero_pad::zero_gaps!(self, nsa_cpu_backend { magic, backend, base, bytes, busy });
        self.backend.zero_padding();
    }
}

/// Buffers of live CPU backends (`[start, end)`): creating a backend over memory a live
/// one uses is refused (its worker threads would otherwise never be joined).
static LIVE: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<(usize, usize)>> {
    // The list stays consistent if a holder panicked: every update is one push or remove.
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Holds a backend for one call; frees it when dropped (also on a panic).
struct Busy<'a>(&'a AtomicU64);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

/// Checks the handle and takes it for one call: `NSA_STATUS_BUSY` while another call holds
/// it. Returns the engine's backend, the span of the caller's buffer, and the hold.
///
/// # Safety
/// A non-NULL `p` points to readable memory of the handle's size.
unsafe fn enter<'a>(p: *mut nsa_cpu_backend) -> FfiResult<(&'a mut CpuBackend<'static>, Span, Busy<'a>)> {
    handle(p.cast_const(), "backend")?;
    // SAFETY: a live handle. Only fields are borrowed, never the whole handle: `busy` is
    // shared (atomic) with concurrent callers, `backend` is exclusive once `busy` is held.
    let busy = &*std::ptr::addr_of!((*p).busy);
    if busy.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return Err(NsaError::Busy(format!("backend {p:p} is running another call (calls on one backend must not overlap)")).into());
    }
    let (base, bytes) = (std::ptr::addr_of!((*p).base).read(), std::ptr::addr_of!((*p).bytes).read());
    let span = Span { arg: "backend buffer", start: base, len: bytes, written: true };
    Ok((&mut *std::ptr::addr_of_mut!((*p).backend), span, Busy(busy)))
}

const CPU_MAGIC: u64 = 0x4e53_415f_4350_5542; // "NSA_CPUB"

impl Handle for nsa_cpu_backend {
    const MAGIC: u64 = CPU_MAGIC;
    const NAME: &'static str = "nsa_cpu_backend";
    unsafe fn magic(p: *const Self) -> u64 {
        std::ptr::addr_of!((*p).magic).read()
    }
}

/// One layer's arrays for the planned step, for both backends. Rows are the step's tokens
/// in plan order (see `nsa_step_seq_t`); `tokens` is their count. All arrays are dense and
/// row-major. For `nsa_cpu_run_layer` they are host memory, read or written during the
/// call only (the engine keeps no pointer). For `nsa_cuda_run_layer` they are device
/// addresses (`CUdeviceptr` values as pointers) in the backend's device's primary context,
/// read or written by the work the call enqueues, so they must stay valid until it ran.
///
/// Activations (`q`, `k`, `v`, `out`) have the config's element type `dtype` and must be
/// aligned to its size; the float and int arrays to 4 bytes. Arrays the engine writes
/// (`out`, `selected`) must not overlap any other array, the cache's arena or the
/// backend's buffer. Set `struct_size = sizeof(nsa_layer_io_t)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nsa_layer_io_t {
    /// `sizeof(nsa_layer_io_t)` as the caller compiled it.
    pub struct_size: u32,
    /// Element type of `q`, `k`, `v` and `out`: must equal the config's `dtype`.
    pub dtype: nsa_dtype,
    /// Rows: must equal the planned step's total tokens.
    pub tokens: u32,
    /// Reserved for options of later versions: must be 0.
    pub flags: u32,
    /// Queries `[tokens][HQ][DK]`. NULL together with `out`: an append-only run (K/V
    /// appended and compressed, no attention; `gates` and `selected` are then ignored).
    pub q: *const c_void,
    /// New keys `[tokens][HKV][DK]` (after RoPE, if the model uses it); appended to the cache.
    pub k: *const c_void,
    /// New values `[tokens][HKV][DV]`; appended to the cache.
    pub v: *const c_void,
    /// Gates `[tokens][HQ][3]`: `(g_cmp, g_slc, g_win)` per token and query head, already in
    /// [0, 1] (the model's sigmoid output); the engine does not normalize them.
    pub gates: *const f32,
    /// Output `[tokens][HQ][DV]`, written: `g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`.
    /// NULL together with `q`: an append-only run.
    pub out: *mut c_void,
    /// NULL, or `[tokens][HKV][sel_count]`, written: each token's selected block indices
    /// (block `j` covers positions `[j*sel_block, (j+1)*sel_block)`), ascending, padded with -1.
    pub selected: *mut i32,
    /// This layer's phi weights for keys, `phi_k_len` floats laid out as docs/SPEC.md
    /// ("Weight layouts") says (NULL with length 0 for `NSA_PHI_MEAN`).
    pub phi_k: *const f32,
    /// Floats at `phi_k`: must be `nsa_phi_weight_len(cfg, NSA_PHI_SIDE_K)`.
    pub phi_k_len: usize,
    /// This layer's phi weights for values (as `phi_k`, with `DV`).
    pub phi_v: *const f32,
    /// Floats at `phi_v`: must be `nsa_phi_weight_len(cfg, NSA_PHI_SIDE_V)`.
    pub phi_v_len: usize,
}

// SAFETY: repr(C), starts with struct_size; four u32 then pointer-sized fields (no padding
// on 32- or 64-bit targets); raw pointers and integers accept any bit pattern.
unsafe impl Versioned for nsa_layer_io_t {
    const NAME: &'static str = "nsa_layer_io_t";
}

impl nsa_layer_io_t {
    /// The checks both backends make before looking at the arrays: `dtype` is the
    /// config's, `flags` is 0, `tokens` is the planned step's.
    pub(crate) fn check_step_fields(&self, cfg: &crate::Config, cache: &crate::Cache) -> FfiResult {
        if self.dtype != cfg.dtype as u32 {
            return Err(NsaError::arg("io->dtype", self.dtype, format!("the config's dtype is {} ({})", cfg.dtype.name(), cfg.dtype as u32)).into());
        }
        if self.flags != 0 {
            return Err(NsaError::arg("io->flags", format!("{:#x}", self.flags), "no flag is defined in this version: must be 0").into());
        }
        let step_tokens = cache.step()?.tokens;
        if self.tokens != step_tokens {
            return Err(NsaError::arg("io->tokens", self.tokens, format!("the planned step has {step_tokens} tokens")).into());
        }
        Ok(())
    }
}

/// Writes to `*out` the bytes of host memory the CPU backend needs (handle, every layer's
/// K/V pools, and scratch for `cpu_threads` threads). Allocate at least that much, aligned
/// to 16 bytes, and pass it to `nsa_cpu_backend_create`.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_buffer_size(cfg: *const nsa_config_t, out: *mut usize) -> nsa_status {
    guard("nsa_cpu_buffer_size", || {
        let out = out_ptr(out, "out")?;
        let cfg = read_config(cfg, "cfg")?;
        out.write(handle_bytes::<nsa_cpu_backend>() + CpuBackend::buffer_bytes(&cfg)?);
        Ok(())
    })
}

/// Creates a CPU backend in the caller's `buf` (`bytes` bytes, at least
/// `nsa_cpu_buffer_size`, 16-byte aligned) and writes its handle to `*out`. Starts
/// `cfg->cpu_threads - 1` worker threads: the backend's only allocation, made here once;
/// layer runs allocate nothing. Pass the same config to `nsa_cache_init` for the cache it
/// will run on.
///
/// Ownership: the caller keeps owning `buf`; it must stay allocated and untouched until
/// `nsa_cpu_backend_destroy`, which must be called (it joins the worker threads). A
/// buffer that overlaps a live backend's is refused: destroy that backend first.
///
/// Errors: `NSA_STATUS_NULL_POINTER` (`cfg`, `buf`, `out`), `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG`, `NSA_STATUS_MISALIGNED` (`buf`),
/// `NSA_STATUS_BUFFER_TOO_SMALL` (`bytes`), `NSA_STATUS_INVALID_ARGUMENT` (`buf` overlaps a
/// live backend's buffer). On failure no thread was started and `buf` is untouched.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_backend_create(
    cfg: *const nsa_config_t,
    buf: *mut c_void,
    bytes: usize,
    out: *mut *mut nsa_cpu_backend,
) -> nsa_status {
    guard("nsa_cpu_backend_create", || create(cfg, buf, bytes, out, CpuBackend::new))
}

/// As `nsa_cpu_backend_create`, for a host that runs layers on its own threads with
/// `nsa_cpu_run_layer_part` (ggml's custom operations, a host thread pool): starts no
/// thread at all. The buffer (same `nsa_cpu_buffer_size`) holds scratch for
/// `cfg->cpu_threads` host threads working on one layer at once: set it to the host's
/// thread count. `nsa_cpu_run_layer` still works on such a backend, on the calling thread
/// alone. Same ownership, errors and `nsa_cpu_backend_destroy` as `nsa_cpu_backend_create`.
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_backend_create_hosted(
    cfg: *const nsa_config_t,
    buf: *mut c_void,
    bytes: usize,
    out: *mut *mut nsa_cpu_backend,
) -> nsa_status {
    guard("nsa_cpu_backend_create_hosted", || create(cfg, buf, bytes, out, CpuBackend::new_hosted))
}

unsafe fn create(
    cfg: *const nsa_config_t,
    buf: *mut c_void,
    bytes: usize,
    out: *mut *mut nsa_cpu_backend,
    make: fn(&crate::config::Config, &'static mut [u8]) -> crate::error::Result<CpuBackend<'static>>,
) -> FfiResult {
    let out = out_ptr(out, "out")?;
    let cfg = read_config(cfg, "cfg")?;
    let need = CpuBackend::buffer_bytes(&cfg)?;
    let pools = carve::<nsa_cpu_backend>(buf.cast(), bytes, need, ARENA_ALIGN, "buf")?;
    let (start, end) = (buf as usize, buf as usize + bytes);
    let mut live = live();
    if let Some(&(a, b)) = live.iter().find(|&&(a, b)| a < end && start < b) {
        return Err(NsaError::arg(
            "buf",
            format!("{start:#x}..{end:#x}"),
            format!("overlaps the buffer {a:#x}..{b:#x} of a live nsa_cpu_backend; destroy that backend first"),
        )
        .into());
    }
    let backend = make(&cfg, pools)?;
    let h = buf.cast::<nsa_cpu_backend>();
    h.write(nsa_cpu_backend { magic: CPU_MAGIC, backend, base: start, bytes, busy: AtomicU64::new(0) });
    (*h).zero_padding();
    live.push((start, end));
    out.write(h);
    Ok(())
}

/// Stops and joins the backend's worker threads and invalidates the handle; afterwards
/// its buffer may be freed. NULL or an already destroyed handle is ignored. Must not run
/// concurrently with another call on the same backend: if one is running, nothing is
/// destroyed (the handle stays valid) and `nsa_last_error` says so.
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_backend_destroy(backend: *mut nsa_cpu_backend) {
    let _ = guard("nsa_cpu_backend_destroy", || {
        if backend.is_null() || handle(backend.cast_const(), "backend").is_err() {
            return Ok(());
        }
        let (b, _, hold) = enter(backend)?;
        std::ptr::drop_in_place(b);
        std::mem::forget(hold); // `busy` stays set: the handle is dead
        std::ptr::addr_of_mut!((*backend).magic).write(0);
        let start = backend as usize;
        live().retain(|&(a, _)| a != start);
        Ok(())
    });
}

/// Runs layer `layer` of the planned step on the CPU: copies shared pages the step
/// appends to, appends the step's K/V rows to the layer's pools, emits finished
/// compressed tokens, and writes NSA attention for every new token to `io->out` (and the
/// selected blocks to `io->selected` if not NULL). With `io->q` and `io->out` both NULL
/// the run is append-only: K/V appended and compressed, no attention (to fill a cache
/// from K/V the host already has). Run every layer `0..num_layers` exactly once per step,
/// each after `nsa_cache_plan_step`. Uses the backend's worker threads (the calling
/// thread is one of them) and allocates nothing.
///
/// The cache's sequences are only read; the run counts `layer` as run in the step (see
/// the lifecycle at `nsa_cache`). The cache must have the backend's config and be the
/// cache this backend serves (the first it ran a layer of).
///
/// Non-finite inputs: a NaN or infinity in `q`, `k`, `v` or `gates` propagates to exactly
/// the outputs whose attention branches read it (as the reference computes them), never
/// to zeros: e.g. a NaN query row makes that token's outputs NaN, a NaN key makes NaN the
/// outputs of every later token whose window, selected blocks or compressed tokens cover
/// it.
///
/// Errors (nothing is written, the pools are unchanged, the layer is not counted):
/// `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_NO_STEP`, `NSA_STATUS_LAYER_ALREADY_RUN`, `NSA_STATUS_BUSY` (another call
/// on this backend is running), `NSA_STATUS_MISALIGNED`, `NSA_STATUS_INVALID_ARGUMENT`
/// (`layer` out of range, `dtype` not the config's, `tokens` not the step's, `flags` not
/// 0, wrong phi weight count, overlapping arrays, a cache with another config, a cache
/// other than the one this backend serves).
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_run_layer(
    backend: *mut nsa_cpu_backend,
    cache: *const nsa_cache,
    layer: u32,
    io: *const nsa_layer_io_t,
) -> nsa_status {
    guard("nsa_cpu_run_layer", || {
        let (b, span, _hold) = enter(backend)?;
        let c = handle(cache, "cache")?;
        let io = read_struct(io, "io")?;
        let dtype = checked_dtype(b, c, &io)?;
        let b = Target::Whole(b);
        match dtype {
            Dtype::F32 => run::<f32>(b, span, c, layer, &io),
            Dtype::F16 => run::<f16>(b, span, c, layer, &io),
            Dtype::Bf16 => run::<bf16>(b, span, c, layer, &io),
        }
    })
}

/// Thread `ith` of `nth`'s share of layer `layer` of the planned step, for a host that
/// drives the engine with its own threads (ggml calls a custom operation once per thread
/// with `(ith, nth)`): every one of the `nth` threads calls this with the same arguments
/// and its own `ith`; the layer is done when all have returned. Same work, arrays,
/// append-only rule and errors as `nsa_cpu_run_layer`, and bit-identical results. The
/// engine starts no thread, allocates nothing and needs no barrier: thread `ith` takes the
/// (sequence, KV head) pairs `ith, ith + nth, ...` of the step and does each one whole
/// (its copy-on-write copies, append, compressed tokens, then attention for the
/// sequence's new tokens), so the call is one graph node with no dependency between
/// threads. At most `cpu_threads` threads work (the backend's scratch slots): with `nth`
/// larger, threads `ith >= cpu_threads` return at once. Parallelism is at most
/// sequences x KV heads of the step.
///
/// Thread safety: the `nth` calls of one layer may run concurrently on one backend and
/// cache (that is the point); nothing else may use that backend or cache until all have
/// returned. Works on backends from either create function (use
/// `nsa_cpu_backend_create_hosted` to have no engine thread at all).
///
/// Step lifecycle: the first of the `nth` calls to arrive claims the layer in the cache (it
/// counts as run once, as after `nsa_cpu_run_layer`) while the others wait for that claim.
/// Every call of a repeated run of the layer in the same step (after `nth` calls of the
/// first run, or after the layer ran as a whole) returns `NSA_STATUS_LAYER_ALREADY_RUN`
/// and writes nothing.
///
/// Errors: as `nsa_cpu_run_layer` (every thread checks the same arguments, so all fail
/// alike and nothing is written), and `NSA_STATUS_INVALID_ARGUMENT` for `nth == 0` or
/// `ith >= nth` (that thread does nothing).
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_run_layer_part(
    backend: *const nsa_cpu_backend,
    cache: *const nsa_cache,
    layer: u32,
    io: *const nsa_layer_io_t,
    ith: u32,
    nth: u32,
) -> nsa_status {
    guard("nsa_cpu_run_layer_part", || {
        let b = handle(backend, "backend")?;
        let c = handle(cache, "cache")?;
        let io = read_struct(io, "io")?;
        if nth == 0 || ith >= nth {
            return Err(NsaError::arg("ith", ith, format!("thread index and count must satisfy ith < nth (nth = {nth})")).into());
        }
        let span = Span { arg: "backend buffer", start: b.base, len: b.bytes, written: true };
        let b = Target::Part(&b.backend, (ith as usize, nth as usize));
        match checked_dtype(b.backend(), c, &io)? {
            Dtype::F32 => run::<f32>(b, span, c, layer, &io),
            Dtype::F16 => run::<f16>(b, span, c, layer, &io),
            Dtype::Bf16 => run::<bf16>(b, span, c, layer, &io),
        }
    })
}

/// The checks of `io`'s scalar fields; returns the config's dtype.
fn checked_dtype(b: &CpuBackend<'static>, c: &nsa_cache, io: &nsa_layer_io_t) -> FfiResult<Dtype> {
    io.check_step_fields(b.config(), c.cache())?;
    Ok(b.config().dtype)
}

/// What a layer call runs: the whole layer on the backend's threads, or one host
/// thread's `(ith, nth)` share.
enum Target<'a> {
    Whole(&'a mut CpuBackend<'static>),
    Part(&'a CpuBackend<'static>, (usize, usize)),
}

impl Target<'_> {
    fn backend(&self) -> &CpuBackend<'static> {
        match self {
            Target::Whole(b) => b,
            Target::Part(b, _) => b,
        }
    }
}

/// Checks every array of `io` (present, aligned, in range, and none overlapping what the
/// run writes) before making references to them, then runs the layer or the thread's
/// share. `io.tokens` is the planned step's.
unsafe fn run<T: Elem>(b: Target<'_>, buf: Span, c: &nsa_cache, layer: u32, io: &nsa_layer_io_t) -> FfiResult {
    let cfg = *b.backend().config();
    let t = io.tokens as usize;
    let (hq, hkv) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize);
    let (dk, dv) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
    // Append-only: q and out both NULL; gates and selected are then not read.
    let attends = !(io.q.is_null() && io.out.is_null());
    let (n_q, n_out, n_gates) = if attends { (t * hq * dk, t * hq * dv, t * hq * 3) } else { (0, 0, 0) };
    let n_sel = if io.selected.is_null() || !attends { 0 } else { t * hkv * cfg.sel_count as usize };
    let spans = [
        span(io.out.cast::<T>().cast_const(), n_out, "io->out", true)?,
        span(io.selected.cast_const(), n_sel, "io->selected", true)?,
        span(io.q.cast::<T>(), n_q, "io->q", false)?,
        span(io.k.cast::<T>(), t * hkv * dk, "io->k", false)?,
        span(io.v.cast::<T>(), t * hkv * dv, "io->v", false)?,
        span(io.gates, n_gates, "io->gates", false)?,
        span(io.phi_k, io.phi_k_len, "io->phi_k", false)?,
        span(io.phi_v, io.phi_v_len, "io->phi_v", false)?,
        buf,
        c.span(),
    ];
    disjoint(&spans)?;
    let [out, selected, q, k, v, gates, phi_k, phi_v, ..] = spans;
    let w = PhiWeights { k: phi_k.slice(), v: phi_v.slice() };
    // SAFETY (all three paths): each span was checked above and the caller promised the
    // ranges are valid; the written ones overlap nothing else.
    let b = match b {
        Target::Part(b, ith_nth) => {
            // Every host thread makes its own view of out/selected: raw pointers, no `&mut`.
            let sel = (n_sel > 0).then_some((io.selected, n_sel));
            let inputs = (q.slice::<T>(), k.slice::<T>(), v.slice::<T>(), gates.slice::<f32>());
            return Ok(b.run_part_raw(c.cache(), layer, inputs, (io.out.cast::<T>(), n_out), sel, w, ith_nth)?);
        }
        Target::Whole(b) => b,
    };
    if !attends {
        return Ok(b.append_layer(c.cache(), layer, k.slice::<T>(), v.slice::<T>(), w)?);
    }
    let layer_io = LayerIo {
        q: q.slice::<T>(),
        k: k.slice::<T>(),
        v: v.slice::<T>(),
        gates: gates.slice::<f32>(),
        out: out.slice_mut::<T>(),
        selected: (!io.selected.is_null()).then(|| selected.slice_mut::<i32>()),
    };
    Ok(b.run_layer(c.cache(), layer, layer_io, w)?)
}
