//! A layer run driven by the host's threads: every thread of the host calls
//! [`LayerParts::run`] with its index `(ith, nth)`, as ggml calls a custom operation. The
//! engine starts no thread, allocates nothing and needs no barrier: thread `ith` takes the
//! (sequence, KV head) tasks `ith, ith + nth, ...` and does each one whole — that head's
//! copy-on-write copies, its append and compressed tokens, then attention for every new
//! token of the sequence. A task reads only its own sequence's pages of its own head, which
//! only it writes, so it never waits for another thread.
//!
//! Results are the same bits as the engine's own runner: every query is computed by the
//! same code from the same rows, whatever thread or order runs it.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{CpuBackend, LayerIo, LayerRun, Mode, PhiWeights, SharedSlice, QUERY_CHUNK};
use crate::cache::{Cache, CacheBinding};
use crate::elem::Elem;
use crate::error::{NsaError, Result};

/// The step lifecycle for the C ABI's host-thread parts, where the `nth` calls of one layer
/// run arrive concurrently with nothing tying them together: per layer one word, `(step id
/// << 32) | state`, counts the parts of the current step's run. The first part to arrive
/// claims the layer in the cache while the others wait for the outcome, so the layer
/// counts once; a part arriving after `nth` parts (a repeated run), or after a refused
/// claim (the layer already ran, e.g. as a whole run), is refused, so such a run writes
/// nothing at all. (The Rust `LayerParts` claims once when it is made and needs none of
/// this.) One word per layer, allocated when the backend is made.
pub(super) struct PartsGate {
    words: Vec<AtomicU64>,
}

/// State bits of a gate word: the first part is claiming; the claim was refused.
const CLAIMING: u64 = 1 << 31;
const REFUSED: u64 = 1 << 30;
const COUNT: u64 = REFUSED - 1;

impl PartsGate {
    pub(super) fn new(layers: u32) -> PartsGate {
        PartsGate { words: (0..layers).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Admits one of the `nth` parts of `layer`'s run in the cache's planned step, or
    /// refuses it (`LayerAlreadyRun`) when the layer already ran in this step.
    fn enter(&self, cache: &Cache, binding: &CacheBinding, layer: u32, nth: usize) -> Result<()> {
        let step = cache.step_id();
        let w = &self.words[layer as usize];
        let refused = || NsaError::LayerAlreadyRun { layer, step };
        loop {
            let v = w.load(Ordering::Acquire);
            let st = if (v >> 32) as u32 == step { v & 0xffff_ffff } else { 0 };
            let word = |s: u64| ((step as u64) << 32) | s;
            if st & REFUSED != 0 || (st & COUNT) as usize >= nth {
                return Err(refused());
            }
            if st & CLAIMING != 0 {
                std::hint::spin_loop(); // the first part's claim is a few atomic operations
                continue;
            }
            if st == 0 {
                if w.compare_exchange(v, word(CLAIMING | 1), Ordering::AcqRel, Ordering::Acquire).is_err() {
                    continue;
                }
                return match cache.claim_layer(binding, layer) {
                    Ok(_) => {
                        w.store(word(1), Ordering::Release);
                        Ok(())
                    }
                    Err(e) => {
                        w.store(word(REFUSED), Ordering::Release);
                        Err(e)
                    }
                };
            }
            if w.compare_exchange(v, word(st + 1), Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Ok(());
            }
        }
    }
}

/// One layer of the planned step, checked and ready for the host's threads. Made by
/// [`CpuBackend::layer_parts`] or [`CpuBackend::append_parts`]; the layer is done when
/// every `ith` in `0..nth` has returned from `run(ith, nth)` (with the same `nth`).
pub struct LayerParts<'a, T> {
    run: LayerRun<'a, T>,
}

// SAFETY: threads of one run write disjoint parts (the module contract of `cpu/`); the
// borrowed arrays are plain data.
unsafe impl<T: Send + Sync> Sync for LayerParts<'_, T> {}

impl<'p> CpuBackend<'p> {
    /// Checks one layer of the planned step as `run_layer` does (same errors, nothing
    /// written on failure) and returns it for the host's threads to run with
    /// [`LayerParts::run`]. The result is bit-identical to `run_layer`'s.
    pub fn layer_parts<'a, T: Elem>(&'a mut self, cache: &'a Cache, layer: u32, io: LayerIo<'a, T>, w: PhiWeights<'a>) -> Result<LayerParts<'a, T>> {
        let (out, selected) = (SharedSlice::new(io.out), io.selected.map(SharedSlice::new));
        // SAFETY: out and selected are exclusive borrows for 'a; `&'a mut self` excludes
        // other runs on this backend while the parts live.
        let run = unsafe { self.layer_run(cache, layer, (io.q, io.k, io.v, io.gates), out, selected, w, Mode::Nsa, true)? };
        Ok(LayerParts { run })
    }

    /// As [`append_layer`](Self::append_layer) (append and compress only), for the host's
    /// threads.
    pub fn append_parts<'a, T: Elem>(&'a mut self, cache: &'a Cache, layer: u32, k: &'a [T], v: &'a [T], w: PhiWeights<'a>) -> Result<LayerParts<'a, T>> {
        // SAFETY: nothing is written to out (empty) in an append-only run; as above.
        let run = unsafe { self.layer_run(cache, layer, (&[], k, v, &[]), SharedSlice::new(&mut []), None, w, Mode::AppendOnly, true)? };
        Ok(LayerParts { run })
    }

    /// The C ABI's form of `layer_parts` / `append_parts`: every host thread builds its
    /// own view of the same run from the same raw arrays (an empty `q` and `out` make it
    /// append-only). The parts check the same arguments, then pass the backend's
    /// [`PartsGate`]: the first to arrive claims the layer in the cache's step lifecycle,
    /// and every part of a repeated run is refused.
    ///
    /// # Safety
    /// The arrays are valid for the call; `out` and `selected` are written by nothing
    /// else; every concurrent caller on this backend runs this same layer of this same
    /// step with a distinct `ith` and the same `nth`, and no other call uses the backend or
    /// the cache meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn run_part_raw<T: Elem>(
        &self,
        cache: &Cache,
        layer: u32,
        inputs: (&[T], &[T], &[T], &[f32]),
        out: (*mut T, usize),
        selected: Option<(*mut i32, usize)>,
        w: PhiWeights<'_>,
        (ith, nth): (usize, usize),
    ) -> Result<()> {
        let mode = if inputs.0.is_empty() && out.1 == 0 { Mode::AppendOnly } else { Mode::Nsa };
        let out = SharedSlice::from_raw(out.0, out.1);
        let selected = selected.map(|(p, n)| SharedSlice::from_raw(p, n));
        let run = self.layer_run(cache, layer, inputs, out, selected, w, mode, false)?;
        self.gate.enter(cache, &self.binding, layer, nth)?;
        run.run_part(ith, nth);
        Ok(())
    }
}

impl<T: Elem> LayerParts<'_, T> {
    /// Thread `ith`'s share of the layer (`ith < nth`; a thread with `ith >= nth` does
    /// nothing). Call it once on each of `nth` threads, concurrently or not, with the same
    /// `nth`. At most `cpu_threads` threads work (the scratch slots in the backend's
    /// buffer): with `nth` larger, threads `ith >= cpu_threads` return at once.
    pub fn run(&self, ith: usize, nth: usize) {
        self.run.run_part(ith, nth);
    }

    /// (sequence, KV head) tasks of the layer: more threads than this leaves some idle.
    pub fn tasks(&self) -> usize {
        self.run.step.seqs.len() * self.run.cfg.num_kv_heads as usize
    }
}

impl<T: Elem> LayerRun<'_, T> {
    fn run_part(&self, ith: usize, nth: usize) {
        let workers = nth.min(self.slots);
        if ith >= workers {
            return;
        }
        let hkv = self.cfg.num_kv_heads as usize;
        for t in (ith..self.step.seqs.len() * hkv).step_by(workers) {
            let (si, kvh) = (t / hkv, t % hkv);
            // SAFETY: task (si, kvh) alone touches head kvh of the pages its sequence
            // appends to (see `copy_task`).
            unsafe { self.copy_task(si, kvh) };
            self.append_task(ith, si, kvh);
            if self.mode == Mode::Nsa {
                let ps = self.step.seqs[si];
                for c in 0..(ps.new_len - ps.old_len).div_ceil(QUERY_CHUNK) {
                    self.attend_chunk(ith, &ps, c, kvh);
                }
            }
        }
    }

    /// Head `kvh` of the step's copy-on-write copies into pages of step sequence `si`:
    /// those whose destination is in the sequence's live page tables (a destination is a
    /// fresh page, owned by exactly one sequence).
    ///
    /// # Safety
    /// Only task (si, kvh) calls this, before its append.
    unsafe fn copy_task(&self, si: usize, kvh: usize) {
        let ps = self.step.seqs[si];
        let p = self.cfg.page_size;
        let raw = &self.step.raw_table(ps.seq)[..ps.new_len.div_ceil(p) as usize];
        let cmp = &self.step.cmp_table(ps.seq)[..self.cfg.num_cmp_tokens(ps.new_len).div_ceil(p) as usize];
        for c in self.step.copies {
            let table = if c.pool == crate::layout::POOL_RAW { raw } else { cmp };
            if table.contains(&(c.dst as i32)) {
                self.copy_head(c, kvh);
            }
        }
    }
}
