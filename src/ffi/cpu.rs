//! `struct nsa_cpu_backend`: the CPU backend (K/V pools and scratch in the caller's buffer,
//! handle included) and the per-layer run.

use std::ffi::c_void;

use half::{bf16, f16};

use super::args::{carve, disjoint, handle, handle_bytes, handle_mut, out_ptr, read_struct, span, Handle, Span, Versioned};
use super::cache::nsa_cache;
use super::config::{nsa_config_t, nsa_dtype, read_config};
use super::status::{guard, guard_infallible, nsa_status, FfiResult};
use crate::config::Dtype;
use crate::cpu::{CpuBackend, LayerIo, PhiWeights};
use crate::elem::Elem;
use crate::error::NsaError;
use crate::layout::ARENA_ALIGN;

/// The CPU backend: every layer's K/V pools and each thread's scratch, in the buffer given
/// to `nsa_cpu_backend_create`, plus `cpu_threads - 1` worker threads. Opaque; it lives at
/// the start of that buffer.
///
/// Thread safety: one call at a time per backend. Different backends are independent and
/// may run concurrently (each with its own cache: a cache's layers all run on one backend).
pub struct nsa_cpu_backend {
    magic: u64,
    backend: CpuBackend<'static>,
    base: usize,
    bytes: usize,
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
    /// Queries `[tokens][HQ][DK]`.
    pub q: *const c_void,
    /// New keys `[tokens][HKV][DK]` (after RoPE, if the model uses it); appended to the cache.
    pub k: *const c_void,
    /// New values `[tokens][HKV][DV]`; appended to the cache.
    pub v: *const c_void,
    /// Gates `[tokens][HQ][3]`: `(g_cmp, g_slc, g_win)` per token and query head, already in
    /// [0, 1] (the model's sigmoid output); the engine does not normalize them.
    pub gates: *const f32,
    /// Output `[tokens][HQ][DV]`, written: `g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`.
    pub out: *mut c_void,
    /// NULL, or `[tokens][HKV][sel_count]`, written: each token's selected block indices
    /// (block `j` covers positions `[j*sel_block, (j+1)*sel_block)`), ascending, padded with -1.
    pub selected: *mut i32,
    /// This layer's phi weights for keys, `phi_k_len` floats laid out as NSA_SPEC.md says
    /// (NULL with length 0 for `NSA_PHI_MEAN`).
    pub phi_k: *const f32,
    /// Floats at `phi_k`: must be the K-side weight count for the config's phi.
    pub phi_k_len: usize,
    /// This layer's phi weights for values (as `phi_k`, with `DV`).
    pub phi_v: *const f32,
    /// Floats at `phi_v`.
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
/// `nsa_cpu_backend_destroy`, which must be called (it joins the worker threads).
///
/// Errors: `NSA_STATUS_NULL_POINTER` (`cfg`, `buf`, `out`), `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG`, `NSA_STATUS_MISALIGNED` (`buf`),
/// `NSA_STATUS_BUFFER_TOO_SMALL` (`bytes`). On failure no thread was started and `buf` is
/// untouched.
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_backend_create(
    cfg: *const nsa_config_t,
    buf: *mut c_void,
    bytes: usize,
    out: *mut *mut nsa_cpu_backend,
) -> nsa_status {
    guard("nsa_cpu_backend_create", || {
        let out = out_ptr(out, "out")?;
        let cfg = read_config(cfg, "cfg")?;
        let need = CpuBackend::buffer_bytes(&cfg)?;
        let pools = carve::<nsa_cpu_backend>(buf.cast(), bytes, need, ARENA_ALIGN, "buf")?;
        let backend = CpuBackend::new(&cfg, pools)?;
        let h = buf.cast::<nsa_cpu_backend>();
        h.write(nsa_cpu_backend { magic: CPU_MAGIC, backend, base: buf as usize, bytes });
        out.write(h);
        Ok(())
    })
}

/// Stops and joins the backend's worker threads and invalidates the handle; afterwards
/// its buffer may be freed. NULL or an already destroyed handle is ignored. Must not run
/// concurrently with another call on the same backend.
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_backend_destroy(backend: *mut nsa_cpu_backend) {
    guard_infallible("nsa_cpu_backend_destroy", (), || {
        if let Ok(b) = handle_mut(backend, "backend") {
            b.magic = 0;
            std::ptr::drop_in_place(&mut b.backend);
        }
    })
}

/// Runs layer `layer` of the planned step on the CPU: copies shared pages the step
/// appends to, appends the step's K/V rows to the layer's pools, emits finished
/// compressed tokens, and writes NSA attention for every new token to `io->out` (and the
/// selected blocks to `io->selected` if not NULL). Run every layer `0..num_layers`
/// exactly once per step, each after `nsa_cache_plan_step`. Uses the backend's worker
/// threads (the calling thread is one of them) and allocates nothing.
///
/// The cache is only read; it must have the backend's config, and the same backend must
/// run all of its layers.
///
/// Errors (nothing is written, the pools are unchanged): `NSA_STATUS_NULL_POINTER`,
/// `NSA_STATUS_INVALID_HANDLE`, `NSA_STATUS_BAD_STRUCT_SIZE`, `NSA_STATUS_NO_STEP`,
/// `NSA_STATUS_MISALIGNED`, `NSA_STATUS_INVALID_ARGUMENT` (`layer` out of range, `dtype`
/// not the config's, `tokens` not the step's, `flags` not 0, wrong phi weight count,
/// overlapping arrays, a cache with another config).
#[no_mangle]
pub unsafe extern "C" fn nsa_cpu_run_layer(
    backend: *mut nsa_cpu_backend,
    cache: *const nsa_cache,
    layer: u32,
    io: *const nsa_layer_io_t,
) -> nsa_status {
    guard("nsa_cpu_run_layer", || {
        let b = handle_mut(backend, "backend")?;
        let c = handle(cache, "cache")?;
        let io = read_struct(io, "io")?;
        let cfg = *b.backend.config();
        io.check_step_fields(&cfg, c.cache())?;
        let span = Span { arg: "backend buffer", start: b.base, len: b.bytes, written: true };
        match cfg.dtype {
            Dtype::F32 => run::<f32>(&mut b.backend, span, c, layer, &io),
            Dtype::F16 => run::<f16>(&mut b.backend, span, c, layer, &io),
            Dtype::Bf16 => run::<bf16>(&mut b.backend, span, c, layer, &io),
        }
    })
}

/// Checks every array of `io` (present, aligned, in range, and none overlapping what the
/// run writes) before making references to them, then runs the layer. `io.tokens` is the
/// planned step's.
unsafe fn run<T: Elem>(b: &mut CpuBackend<'static>, buf: Span, c: &nsa_cache, layer: u32, io: &nsa_layer_io_t) -> FfiResult {
    let cfg = *b.config();
    let t = io.tokens as usize;
    let (hq, hkv) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize);
    let (dk, dv) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
    let n_sel = if io.selected.is_null() { 0 } else { t * hkv * cfg.sel_count as usize };
    let spans = [
        span(io.out.cast::<T>().cast_const(), t * hq * dv, "io->out", true)?,
        span(io.selected.cast_const(), n_sel, "io->selected", true)?,
        span(io.q.cast::<T>(), t * hq * dk, "io->q", false)?,
        span(io.k.cast::<T>(), t * hkv * dk, "io->k", false)?,
        span(io.v.cast::<T>(), t * hkv * dv, "io->v", false)?,
        span(io.gates, t * hq * 3, "io->gates", false)?,
        span(io.phi_k, io.phi_k_len, "io->phi_k", false)?,
        span(io.phi_v, io.phi_v_len, "io->phi_v", false)?,
        buf,
        c.span(),
    ];
    disjoint(&spans)?;
    let [out, selected, q, k, v, gates, phi_k, phi_v, ..] = spans;
    // SAFETY: each span was checked above and the caller promised the ranges are valid;
    // the written ones overlap nothing else.
    let layer_io = LayerIo {
        q: q.slice::<T>(),
        k: k.slice::<T>(),
        v: v.slice::<T>(),
        gates: gates.slice::<f32>(),
        out: out.slice_mut::<T>(),
        selected: (!io.selected.is_null()).then(|| selected.slice_mut::<i32>()),
    };
    let w = PhiWeights { k: phi_k.slice(), v: phi_v.slice() };
    Ok(b.run_layer(c.cache(), layer, layer_io, w)?)
}
