//! The CPU backend: host K/V pools in caller memory and the NSA kernels over them.
//!
//! A layer run has three phases, each over independent tasks:
//! 1. copy-on-write page copies of the step (calling thread; rare, after forks);
//! 2. per (sequence, KV head): append the new K/V rows, emit finished compressed tokens;
//! 3. per (sequence, KV head, chunk of queries): NSA attention for every new token.
//!
//! Writes in phases 2 and 3 are disjoint between tasks: a task writes only pages its
//! sequence owns exclusively (planning copied every shared page it appends to) and only
//! its own rows and heads of `out`. That is the invariant behind the raw-pointer views
//! (`LayerStore`, `SharedSlice`).
//!
//! A host with its own thread pool (ggml hands each op `(ith, nth)`, with no barrier
//! inside an op) runs a layer through `LayerParts` instead (`parts.rs`): each thread
//! owns whole (sequence, KV head) tasks, doing that head's copies, append and attention in
//! one go, so no phase has to wait for another thread.

mod append;
mod attend;
mod compress;
mod kernels;
mod online;
mod parts;
mod runner;
pub(crate) mod select;
mod state;
mod store;
mod workspace;

pub use parts::LayerParts;
pub use runner::Runner;

use crate::cache::{Cache, CacheBinding};
use crate::config::Config;
use crate::elem::Elem;
use crate::error::{NsaError, Result};
use crate::layout::{Layout, PageCopy, ARENA_ALIGN, POOL_RAW};
use crate::plan::Step;
use crate::sync::{AtomicUsize, Ordering};
use store::{LayerStore, Pool};

/// Queries per attention task: small enough to spread a prefill chunk over threads.
const QUERY_CHUNK: u32 = 16;

/// One layer's activations for the planned step. Rows are the step's tokens in plan
/// order (all of the first sequence's new tokens, then the second's, ...).
pub struct LayerIo<'x, T> {
    /// `[tokens, HQ, DK]`.
    pub q: &'x [T],
    /// `[tokens, HKV, DK]`: the new keys (post-RoPE if the model uses RoPE).
    pub k: &'x [T],
    /// `[tokens, HKV, DV]`.
    pub v: &'x [T],
    /// `[tokens, HQ, 3]`: `(g_cmp, g_slc, g_win)` per token and query head.
    pub gates: &'x [f32],
    /// `[tokens, HQ, DV]`, written.
    pub out: &'x mut [T],
    /// `[tokens, HKV, n]`, written if given: each token's selected blocks, ascending,
    /// padded with -1.
    pub selected: Option<&'x mut [i32]>,
}

/// One layer's phi weights (f32, `Config::phi_weight_len(DK)` and `(DV)` elements; empty
/// for `Phi::Mean`).
#[derive(Clone, Copy, Default)]
pub struct PhiWeights<'w> {
    pub k: &'w [f32],
    pub v: &'w [f32],
}

/// A mutable slice shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SharedSlice<T> {
    ptr: *mut T,
    len: usize,
}
// SAFETY: tasks write disjoint ranges (module invariant); T is plain data.
unsafe impl<T: Send> Send for SharedSlice<T> {}
unsafe impl<T: Send> Sync for SharedSlice<T> {}

impl<T> SharedSlice<T> {
    fn new(s: &mut [T]) -> Self {
        SharedSlice { ptr: s.as_mut_ptr(), len: s.len() }
    }
    /// # Safety
    /// `ptr..ptr + len` is valid memory for the slice's users, written only in disjoint
    /// parts (module invariant).
    pub(crate) unsafe fn from_raw(ptr: *mut T, len: usize) -> Self {
        SharedSlice { ptr, len }
    }
    /// # Safety
    /// No other task accesses `start..start+len` during the borrow.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}

/// What a layer run does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Copies, append + compress, NSA attention.
    Nsa,
    /// Copies, append + compress; no attention.
    AppendOnly,
    /// Full causal attention over the already-appended cache (the in-repo baseline).
    FullAttend,
}

/// Everything a task of one layer run reads.
struct LayerRun<'a, T> {
    cfg: &'a Config,
    step: Step<'a>,
    store: LayerStore<'a, T>,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    gates: &'a [f32],
    weights: PhiWeights<'a>,
    out: SharedSlice<T>,
    selected: Option<SharedSlice<i32>>,
    ws: SharedSlice<f32>,
    ws_sel: SharedSlice<i32>,
    ws_floats: usize,
    /// Scratch slots: threads that may run tasks of this run at once (`cpu_threads`).
    slots: usize,
    mode: Mode,
}

/// The CPU backend over caller memory: every layer's K/V pools, then each thread's scratch.
pub struct CpuBackend<'p> {
    cfg: Config,
    lay: Layout,
    /// The caller's buffer, borrowed exclusively for `'p`; kept as a pointer so that the
    /// host-thread path (`LayerParts`, `nsa_cpu_run_layer_part`) can share the backend.
    buf: *mut u8,
    buf_len: usize,
    _buf: std::marker::PhantomData<&'p mut [u8]>,
    ws_floats: usize,
    runner: Runner,
    /// The cache this backend serves (bound at its first layer run).
    binding: CacheBinding,
    /// Counts the host-thread parts of the C ABI's layer runs (`parts.rs`).
    gate: parts::PartsGate,
}

// SAFETY: the backend owns its buffer exclusively (the `&'p mut` it was made from) and
// the runner is Send + Sync; shared (`&self`) access writes the buffer only through
// `LayerRun`, whose tasks write disjoint parts (module invariant).
unsafe impl Send for CpuBackend<'_> {}
unsafe impl Sync for CpuBackend<'_> {}

impl std::fmt::Debug for CpuBackend<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend").field("threads", &self.runner.threads()).finish_non_exhaustive()
    }
}

impl<'p> CpuBackend<'p> {
    /// Bytes of host memory the backend needs: K/V pools of every layer plus scratch for
    /// `cpu_threads` threads.
    pub fn buffer_bytes(cfg: &Config) -> Result<usize> {
        cfg.validate()?;
        let lay = Layout::new(cfg)?;
        Ok(Self::parts(cfg, &lay)?.3)
    }

    /// (pool bytes, f32 scratch offset, i32 scratch offset, total), in checked arithmetic.
    fn parts(cfg: &Config, lay: &Layout) -> Result<(usize, usize, usize, usize)> {
        let th = cfg.cpu_threads as usize;
        let too_big = || NsaError::config("cpu_threads", th, "the CPU buffer it needs overflows the address space");
        let ws_off = lay.pool_bytes.div_ceil(64).checked_mul(64).ok_or_else(too_big)?;
        let ws = th.checked_mul(workspace::floats_per_thread(cfg)).and_then(|x| x.checked_mul(4)).ok_or_else(too_big)?;
        let sel_off = ws_off.checked_add(ws).ok_or_else(too_big)?;
        let total = sel_off.checked_add(th * cfg.sel_count as usize * 4).filter(|&t| t <= isize::MAX as usize).ok_or_else(too_big)?;
        Ok((lay.pool_bytes, ws_off, sel_off, total))
    }

    /// Creates the backend over `buf` (at least `buffer_bytes(cfg)` bytes, 16-byte
    /// aligned) and starts `cfg.cpu_threads - 1` worker threads. The pools' contents are
    /// left as they are: rows are written by appends before anything reads them.
    pub fn new(cfg: &Config, buf: &'p mut [u8]) -> Result<Self> {
        Self::create(cfg, buf, cfg.cpu_threads as usize)
    }

    /// As `new`, for a host that runs layers on its own threads (`layer_parts`): starts
    /// no thread. The buffer holds scratch for `cfg.cpu_threads` host threads at once;
    /// `run_layer` and the other whole-layer calls still work, on the calling thread alone.
    pub fn new_hosted(cfg: &Config, buf: &'p mut [u8]) -> Result<Self> {
        Self::create(cfg, buf, 1)
    }

    /// The pools (the buffer's first `Layout::pool_bytes`) as bytes, for the state copies.
    pub(super) fn pool_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `buf..buf_len` is the buffer borrowed exclusively for 'p (checked by the
        // constructor to hold the pools); `&mut self` excludes any run writing it meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.lay.pool_bytes) }
    }

    fn create(cfg: &Config, buf: &'p mut [u8], threads: usize) -> Result<Self> {
        let need = Self::buffer_bytes(cfg)?;
        if buf.len() < need {
            return Err(NsaError::BufferTooSmall { what: "cpu buffer", got: buf.len(), need });
        }
        let addr = buf.as_ptr() as usize;
        if addr % ARENA_ALIGN != 0 {
            return Err(NsaError::Misaligned { what: "cpu buffer", addr, align: ARENA_ALIGN });
        }
        Ok(CpuBackend {
            cfg: *cfg,
            lay: Layout::new(cfg)?,
            buf: buf.as_mut_ptr(),
            buf_len: buf.len(),
            _buf: std::marker::PhantomData,
            ws_floats: workspace::floats_per_thread(cfg),
            runner: Runner::new(threads),
            binding: CacheBinding::new(cfg),
            gate: parts::PartsGate::new(cfg.num_layers),
        })
    }

    /// Zeroes this value's padding bytes in place (the C handle that holds it lives in
    /// caller memory). Layout, slices, the runner and the binding have none.
    pub(crate) fn zero_padding(&mut self) {
        crate::zero_pad::zero_gaps!(self, CpuBackend { cfg, lay, buf, buf_len, _buf, ws_floats, runner, binding, gate });
        self.cfg.zero_padding();
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Runs one layer of the planned step: copies shared pages it appends to, appends the
    /// step's K/V rows, emits finished compressed tokens, and writes NSA attention for
    /// every new token to `io.out`. Each layer runs exactly once per step, in any order
    /// (the cache counts them: see [`Cache::claim_layer`]). The backend serves one cache:
    /// the first whose layer it runs.
    ///
    /// Fails, changing nothing, when the cache is not the one this backend serves, no step
    /// is planned, `layer` is out of range or already ran in this step, `T` is not the
    /// config's dtype, or any array has the wrong length.
    ///
    /// Non-finite inputs propagate as the reference's arithmetic says: a NaN or infinity
    /// in q, k, v or the gates makes NaN/infinite exactly the outputs whose branches
    /// read it (never zeros).
    pub fn run_layer<T: Elem>(&mut self, cache: &Cache, layer: u32, io: LayerIo<'_, T>, w: PhiWeights<'_>) -> Result<()> {
        self.run(cache, layer, io, w, Mode::Nsa)
    }

    /// Appends the step's K/V rows of one layer and emits finished compressed tokens,
    /// without computing attention: for filling a cache from K/V the host already has
    /// (a restored session, a prompt cache). `k` is `[tokens, HKV, DK]`, `v`
    /// `[tokens, HKV, DV]`. Same rules and errors as `run_layer` (it counts as the
    /// layer's run in this step).
    pub fn append_layer<T: Elem>(&mut self, cache: &Cache, layer: u32, k: &[T], v: &[T], w: PhiWeights<'_>) -> Result<()> {
        let io = LayerIo { q: &[], k, v, gates: &[], out: &mut [], selected: None };
        self.run(cache, layer, io, w, Mode::AppendOnly)
    }

    /// The in-repo full-attention baseline over the same paged cache: plain causal
    /// attention of every query of the step over all of its sequence's keys, written to
    /// `out` (`[tokens, HQ, DV]`). Appends nothing: run `run_layer` for this layer and step
    /// first, so the step's K/V rows are in the pools (refused otherwise).
    pub fn attend_full<T: Elem>(&mut self, cache: &Cache, layer: u32, q: &[T], out: &mut [T]) -> Result<()> {
        let io = LayerIo { q, k: &[], v: &[], gates: &[], out, selected: None };
        self.run(cache, layer, io, PhiWeights::default(), Mode::FullAttend)
    }

    fn run<T: Elem>(&mut self, cache: &Cache, layer: u32, io: LayerIo<'_, T>, w: PhiWeights<'_>, mode: Mode) -> Result<()> {
        let (out, selected) = (SharedSlice::new(io.out), io.selected.map(SharedSlice::new));
        // SAFETY: `out` and `selected` are exclusive borrows held for the whole run, and
        // `&mut self` excludes every other run on this backend.
        let run = unsafe { self.layer_run(cache, layer, (io.q, io.k, io.v, io.gates), out, selected, w, mode, true)? };
        let (appends, attends) = (mode != Mode::FullAttend, mode != Mode::AppendOnly);
        let (step, hkv) = (run.step, self.cfg.num_kv_heads as usize);
        if appends {
            // Phase 1: copy-on-write copies, before any task writes a page.
            for c in step.copies {
                for h in 0..hkv {
                    // SAFETY: phase 1 runs on one thread before any task.
                    unsafe { run.copy_head(c, h) };
                }
            }
            // Phase 2: append + compress per (sequence, KV head).
            let tasks = step.seqs.len() * hkv;
            self.parallel(tasks, &|th, t| run.append_task(th, t / hkv, t % hkv));
        }
        if !attends {
            return Ok(());
        }
        // Phase 3: attention per (sequence, KV head, query chunk).
        let chunks: usize = step.seqs.iter().map(|s| (s.new_len - s.old_len).div_ceil(QUERY_CHUNK) as usize).sum();
        self.parallel(chunks * hkv, &|th, t| run.attend_task(th, t / hkv, t % hkv));
        Ok(())
    }

    /// Checks a layer run's arguments and builds the view its tasks share: the step, the
    /// layer's pools, the arrays and every scratch slot. Nothing is written here but the
    /// step lifecycle's claim: an appending run with `claim` claims the layer in the cache
    /// (once per layer run: the host-thread parts pass it for one part only).
    ///
    /// # Safety
    /// `out` and `selected` are valid for the run and written by nothing else meanwhile;
    /// no other run on this backend writes its buffer meanwhile (a whole-layer run holds
    /// `&mut self`; host threads of one `LayerParts` run share one run).
    #[allow(clippy::too_many_arguments)]
    unsafe fn layer_run<'a, T: Elem>(
        &'a self,
        cache: &'a Cache,
        layer: u32,
        (q, k, v, gates): (&'a [T], &'a [T], &'a [T], &'a [f32]),
        out: SharedSlice<T>,
        selected: Option<SharedSlice<i32>>,
        w: PhiWeights<'a>,
        mode: Mode,
        claim: bool,
    ) -> Result<LayerRun<'a, T>> {
        let cfg = &self.cfg;
        if cache.config() != cfg {
            return Err(NsaError::arg("cache", "config", "the cache was made with a different config than the backend"));
        }
        if T::DTYPE != cfg.dtype {
            return Err(NsaError::arg("T", T::DTYPE.name(), format!("the config's dtype is {}", cfg.dtype.name())));
        }
        self.binding.check(cache)?;
        let step = cache.step()?;
        if layer >= cfg.num_layers {
            return Err(NsaError::arg("layer", layer, format!("layers are 0..{}", cfg.num_layers)));
        }
        let n = step.tokens as usize;
        let (hq, hkv) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize);
        let (dk, dv) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
        let check = |arg: &'static str, got: usize, want: usize, shape: &str| {
            if got != want {
                Err(NsaError::arg(arg, format!("{got} elements"), format!("must be {want} = {shape} for {n} step tokens")))
            } else {
                Ok(())
            }
        };
        let (appends, attends) = (mode != Mode::FullAttend, mode != Mode::AppendOnly);
        if attends {
            check("q", q.len(), n * hq * dk, "tokens*HQ*DK")?;
            check("out", out.len, n * hq * dv, "tokens*HQ*DV")?;
        }
        if appends {
            check("k", k.len(), n * hkv * dk, "tokens*HKV*DK")?;
            check("v", v.len(), n * hkv * dv, "tokens*HKV*DV")?;
            check("phi_weights.k", w.k.len(), cfg.phi_weight_len(cfg.head_dim_qk), "Config::phi_weight_len(DK)")?;
            check("phi_weights.v", w.v.len(), cfg.phi_weight_len(cfg.head_dim_v), "Config::phi_weight_len(DV)")?;
        }
        if mode == Mode::Nsa {
            check("gates", gates.len(), n * hq * 3, "tokens*HQ*3")?;
            if let Some(s) = &selected {
                check("selected", s.len, n * hkv * cfg.sel_count as usize, "tokens*HKV*n")?;
            }
        }

        // The one call into the cache's step lifecycle, after every argument check and
        // before anything is written.
        let step = if !appends {
            if !cache.ran_on(&self.binding, layer) {
                return Err(NsaError::arg("layer", layer, "has not run on this backend in the planned step: run it before attend_full"));
            }
            step
        } else if claim {
            cache.claim_layer(&self.binding, layer)?
        } else {
            step
        };
        let (pool_bytes, ws_off, sel_off, total) = Self::parts(cfg, &self.lay)?;
        assert!(total <= self.buf_len, "checked by the constructor");
        let slots = cfg.cpu_threads as usize;
        // SAFETY: the constructor checked the buffer's size and 16-byte alignment; ws_off
        // and sel_off are multiples of 4 (64 and whole f32s) and every bit pattern is a
        // valid T/f32/i32; the caller excludes concurrent runs.
        let (store, ws, ws_sel) = unsafe {
            (
                LayerStore::new(cfg, &self.lay, self.buf.cast::<T>(), pool_bytes / std::mem::size_of::<T>(), layer),
                SharedSlice::from_raw(self.buf.add(ws_off).cast::<f32>(), slots * self.ws_floats),
                SharedSlice::from_raw(self.buf.add(sel_off).cast::<i32>(), slots * cfg.sel_count as usize),
            )
        };
        Ok(LayerRun { cfg, step, store, q, k, v, gates, weights: w, out, selected, ws, ws_sel, ws_floats: self.ws_floats, slots, mode })
    }
}

impl CpuBackend<'_> {
    /// Runs `task(thread, i)` for `i in 0..tasks` over the worker threads, dynamically
    /// balanced (sequences differ in length).
    fn parallel(&self, tasks: usize, task: &(dyn Fn(usize, usize) + Sync)) {
        if tasks <= 1 {
            // One task (a single-sequence decode phase): waking workers costs more than it gives.
            (0..tasks).for_each(|i| task(0, i));
            return;
        }
        let next = AtomicUsize::new(0);
        self.runner.run(&|th| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= tasks {
                break;
            }
            task(th, i);
        });
    }
}

impl<T: Elem> LayerRun<'_, T> {
    /// Copies head `kvh` of a copy-on-write page (K and V sides).
    ///
    /// # Safety
    /// No task reads or writes head `kvh` of page `c.dst` meanwhile (`c.src != c.dst`).
    unsafe fn copy_head(&self, c: &PageCopy, kvh: usize) {
        let sides = if c.pool == POOL_RAW { [Pool::RawK, Pool::RawV] } else { [Pool::CmpK, Pool::CmpV] };
        for side in sides {
            let from = self.store.rows(side, c.src as i32, kvh, 0, c.rows as usize);
            self.store.rows_mut(side, c.dst as i32, kvh, 0, c.rows as usize).copy_from_slice(from);
        }
    }

    /// Thread `th`'s scratch.
    ///
    /// # Safety
    /// Each thread index is used by one thread at a time (the runner's contract).
    unsafe fn ws(&self, th: usize) -> workspace::Ws<'_> {
        let n = self.ws_floats;
        let sel_n = self.cfg.sel_count as usize;
        workspace::Ws::carve(self.cfg, self.ws.part(th * n, n), self.ws_sel.part(th * sel_n, sel_n))
    }
}
