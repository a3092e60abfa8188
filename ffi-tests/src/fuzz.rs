//! A seeded fuzzer over random operation sequences, driven through the C ABI table.
//!
//! Each round draws a random config (preset, group size, head dims, phi, window, n,
//! f32/f16/bf16 storage, overcommitted page pools, 1-3 layers) and makes TWO caches, each
//! with its own CPU backend, through `nsa_get_api`. Operations on a random one of them:
//! add, fork, truncate, remove, plan_step, one layer run (any layer, in any order: skipped
//! and repeated layers included), abort_step, drawn mostly valid by the shared shadow
//! model (`tests/common/shadow.rs`) and sometimes bad; plus bad calls (NULL handles and
//! arrays, a wrong struct_size or token count) and a backend run on the other cache (refused:
//! a backend serves one cache). The shadow model predicts every outcome: the exact status
//! of each call, lengths, free pages and the open step. After every operation:
//! - the status is the predicted one, and a failure has a message;
//! - a failing call left the arena, the backend buffer and the outputs byte for byte as
//!   they were;
//! - `nsa_cache_check` is OK, or `NSA_STATUS_STEP_OPEN` exactly while a step is open;
//!   lengths, live sequences and free pages equal the model's;
//! - the first layer run of a step equals the brute-force reference (`nsa::reference`)
//!   over each sequence's whole history, given the engine's selected blocks, and every
//!   selection scores within tolerance of the reference's best; every later layer of the
//!   step (same inputs) gives the same bytes.
//!
//! Any violation panics with the seed and operation number, which reproduce it.

use std::time::{Duration, Instant};

use half::{bf16, f16};

use crate::shadow::{Kind, Op, Shadow};
use crate::{api, last_error, CEngine, Rng};
use nsa::ffi::*;
use nsa::reference::{prefill_last, RefInputs};
use nsa::{Config, Dtype, Phi, Preset};

/// What a run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub ops: u64,
    /// Calls that succeeded and changed a cache (a layer run counts).
    pub changes: u64,
    pub rejected: u64,
    /// Per operation: add, fork, truncate, remove, plan, layer run, abort, bad call, run on
    /// the other cache.
    pub mix: [u64; 9],
    pub steps_completed: u64,
    pub aborts: u64,
    pub tokens_checked: u64,
    pub near_ties: u64,
    pub rounds: u64,
    pub max_err: f64,
}

pub const MIX_NAMES: [&str; 9] = ["add", "fork", "truncate", "remove", "plan", "run_layer", "abort", "bad call", "other cache"];

/// One live sequence's inputs so far (f32 rows, rounded through the storage type) and
/// the engine's selections.
#[derive(Clone, Default)]
struct History {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    gates: Vec<f32>,
    sel: Vec<i32>,
}

impl History {
    fn truncate(&mut self, len: usize, c: &Config) {
        let (hq, hkv, dk, dv, n) = dims(c);
        self.q.truncate(len * hq * dk);
        self.k.truncate(len * hkv * dk);
        self.v.truncate(len * hkv * dv);
        self.gates.truncate(len * hq * 3);
        self.sel.truncate(len * hkv * n);
    }
}

fn dims(c: &Config) -> (usize, usize, usize, usize, usize) {
    (c.num_q_heads as usize, c.num_kv_heads as usize, c.head_dim_qk as usize, c.head_dim_v as usize, c.sel_count as usize)
}

fn random_config(rng: &mut Rng) -> Config {
    let preset = if rng.below(2) == 0 { Preset::Paper } else { Preset::Fla };
    let g = rng.pick(&[1u32, 2, 3, 4]);
    let hkv = rng.pick(&[1u32, 2]);
    let (dk, dv) = rng.pick(&[(8u32, 8u32), (16, 8), (8, 16), (32, 32)]);
    let mut c = Config::preset(preset).with_shape(g * hkv, hkv, dk, dv).with_capacity(rng.pick(&[1, 3, 6]), 320);
    c.dtype = rng.pick(&[Dtype::F32, Dtype::F32, Dtype::F16, Dtype::Bf16]);
    c.phi = if preset == Preset::Fla { Phi::Mean } else { rng.pick(&[Phi::Mean, Phi::Weighted, Phi::Linear, Phi::Mlp]) };
    c.phi_hidden = 8;
    c.phi_pe = rng.below(2) == 0;
    c.sel_count = rng.pick(&[3, 4, 6]);
    c.window = rng.pick(&[8, 33, 100]);
    c.num_layers = rng.pick(&[1, 2, 3]);
    c.max_step_tokens = rng.pick(&[64, 200]);
    c.cpu_threads = rng.pick(&[1, 2, 3]);
    // Overcommit the pools so that steps run out of pages.
    c.num_pages = (c.num_pages / rng.pick(&[1, 2, 3])).max(1);
    c.num_cmp_pages = (c.num_cmp_pages / rng.pick(&[1, 2])).max(1);
    c
}

/// Rounds through the storage type, as the engine stores values.
fn stored(dtype: Dtype, x: &[f32]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => x.to_vec(),
        Dtype::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        Dtype::Bf16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
    }
}

/// An activation array in the storage type, as bytes (16-byte aligned storage).
struct Typed {
    words: Vec<u128>,
    dtype: Dtype,
    n: usize,
}

impl Typed {
    fn new(dtype: Dtype, x: &[f32]) -> Typed {
        let mut t = Typed { words: vec![0; (x.len() * dtype.size()).div_ceil(16)], dtype, n: x.len() };
        let p = t.words.as_mut_ptr().cast::<u8>();
        for (i, &v) in x.iter().enumerate() {
            // SAFETY: `i * size < words.len() * 16`; unaligned writes of plain bytes.
            unsafe {
                match dtype {
                    Dtype::F32 => p.add(i * 4).cast::<[u8; 4]>().write_unaligned(v.to_ne_bytes()),
                    Dtype::F16 => p.add(i * 2).cast::<[u8; 2]>().write_unaligned(f16::from_f32(v).to_ne_bytes()),
                    Dtype::Bf16 => p.add(i * 2).cast::<[u8; 2]>().write_unaligned(bf16::from_f32(v).to_ne_bytes()),
                }
            }
        }
        t
    }
    fn filled(dtype: Dtype, n: usize) -> Typed {
        Typed::new(dtype, &vec![f32::NAN; n])
    }
    fn ptr(&self) -> *const std::ffi::c_void {
        self.words.as_ptr().cast()
    }
    fn ptr_mut(&mut self) -> *mut std::ffi::c_void {
        self.words.as_mut_ptr().cast()
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `n * size` bytes of the storage.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.n * self.dtype.size()) }
    }
    fn to_f32(&self) -> Vec<f32> {
        self.bytes()
            .chunks(self.dtype.size())
            .map(|b| match self.dtype {
                Dtype::F32 => f32::from_ne_bytes(b.try_into().unwrap()),
                Dtype::F16 => f16::from_ne_bytes(b.try_into().unwrap()).to_f32(),
                Dtype::Bf16 => bf16::from_ne_bytes(b.try_into().unwrap()).to_f32(),
            })
            .collect()
    }
}

/// The planned step's inputs (the same for every layer) and what its first layer gave.
struct StepData {
    entries: Vec<(u32, u32)>,
    q: Typed,
    k: Typed,
    v: Typed,
    gates: Vec<f32>,
    first: Option<(Vec<u8>, Vec<i32>)>,
    /// The histories before the plan (restored by an abort).
    before: Vec<Option<History>>,
}

/// One cache with its own backend, its shadow model and its sequences' histories.
struct Side {
    e: CEngine,
    sh: Shadow,
    hist: Vec<Option<History>>,
    step: Option<StepData>,
    /// The backend has run a layer (it is bound to this cache).
    bound: bool,
    w: (Vec<f32>, Vec<f32>),
}

impl Side {
    fn new(cfg: &Config, rng: &mut Rng) -> Side {
        Side {
            e: CEngine::new(&nsa_config_t::from(cfg)),
            sh: Shadow::new(cfg),
            hist: vec![None; cfg.max_seqs as usize],
            step: None,
            bound: false,
            w: (rng.vec(cfg.phi_weight_len(cfg.head_dim_qk), 0.2), rng.vec(cfg.phi_weight_len(cfg.head_dim_v), 0.2)),
        }
    }

    fn snapshot(&self) -> (Vec<u8>, Vec<u8>) {
        (self.e.arena.bytes().to_vec(), self.e.buf.bytes().to_vec())
    }

    /// The io of the planned step (or of an empty step when none is planned).
    fn io(&mut self, out: &mut Typed, sel: &mut [i32]) -> nsa_layer_io_t {
        let mut io = empty_io();
        let (dtype, cfg) = (self.e.cfg.dtype, &self.e.cfg);
        io.dtype = dtype;
        if let Some(s) = &self.step {
            io.tokens = s.gates.len() as u32 / (cfg.num_q_heads * 3);
            io.q = s.q.ptr();
            io.k = s.k.ptr();
            io.v = s.v.ptr();
            io.gates = s.gates.as_ptr();
            io.out = out.ptr_mut();
            io.selected = sel.as_mut_ptr();
        }
        io.phi_k = if self.w.0.is_empty() { std::ptr::null() } else { self.w.0.as_ptr() };
        io.phi_k_len = self.w.0.len();
        io.phi_v = if self.w.1.is_empty() { std::ptr::null() } else { self.w.1.as_ptr() };
        io.phi_v_len = self.w.1.len();
        io
    }
}

/// Runs the fuzzer from `seed` until `max_ops` operations or `budget` time, whichever
/// comes first. Panics on any violation.
pub fn run(seed: u64, max_ops: u64, budget: Duration) -> Stats {
    let start = Instant::now();
    let mut rng = Rng::new(seed);
    let mut st = Stats::default();
    while st.ops < max_ops && start.elapsed() < budget {
        st.rounds += 1;
        let ops = 400.min(max_ops - st.ops);
        round(&mut rng, &mut st, seed, ops);
    }
    st
}

fn status_kind(s: nsa_status) -> Option<Kind> {
    Some(match s {
        NSA_STATUS_INVALID_ARGUMENT => Kind::InvalidArgument,
        NSA_STATUS_UNKNOWN_SEQUENCE => Kind::UnknownSequence,
        NSA_STATUS_SEQUENCE_EXISTS => Kind::SequenceExists,
        NSA_STATUS_OUT_OF_PAGES => Kind::OutOfPages,
        NSA_STATUS_SEQUENCE_TOO_LONG => Kind::SequenceTooLong,
        NSA_STATUS_NO_STEP => Kind::NoStep,
        NSA_STATUS_STEP_OPEN => Kind::StepOpen,
        NSA_STATUS_LAYER_ALREADY_RUN => Kind::LayerAlreadyRun,
        _ => return None,
    })
}

fn round(rng: &mut Rng, st: &mut Stats, seed: u64, ops: u64) {
    let cfg = random_config(rng);
    let mut sides = [Side::new(&cfg, rng), Side::new(&cfg, rng)];
    for _ in 0..ops {
        st.ops += 1;
        let where_ = format!("seed {seed}, op {} ({cfg:?})", st.ops);
        let which = rng.below(2) as usize;
        match rng.below(40) {
            0 => bad_call(&mut sides[which], rng, st, &where_),
            1 => other_cache(&mut sides, which, rng, st, &where_),
            _ => {
                let op = sides[which].sh.random_op(&mut |n| rng.below(n));
                apply(&mut sides[which], &op, rng, st, &where_);
            }
        }
        for (i, s) in sides.iter().enumerate() {
            invariants(s, &format!("{where_}, cache {i}"));
        }
    }
    // Ending the step and removing everything returns every page.
    for s in &mut sides {
        let a = api();
        if s.sh.planned() {
            crate::ok(unsafe { (a.cache_abort_step)(s.e.cache) });
        }
        for q in s.sh.live() {
            crate::ok(unsafe { (a.cache_remove)(s.e.cache, q) });
        }
        let stats = stats(s);
        assert_eq!((stats.raw_free, stats.cmp_free, stats.live_seqs), (cfg.num_pages, cfg.num_cmp_pages, 0), "seed {seed}: pages leaked");
    }
}

/// One operation on one side: the shadow predicts, the C ABI answers, both must agree.
fn apply(s: &mut Side, op: &Op, rng: &mut Rng, st: &mut Stats, where_: &str) {
    let a = api();
    let cfg = nsa::Config::try_from(&s.e.cfg).unwrap();
    let want = s.sh.apply(op);
    let before = want.is_err().then(|| s.snapshot());
    let (hq, hkv, dk, dv, n) = dims(&cfg);
    let where_ = format!("{where_}: {op:?}");
    let c = s.e.cache;
    let (status, mix) = match op {
        Op::Add(q) => (unsafe { (a.cache_add)(c, *q) }, 0),
        Op::Fork(x, y) => (unsafe { (a.cache_fork)(c, *x, *y) }, 1),
        Op::Truncate(q, l) => (unsafe { (a.cache_truncate)(c, *q, *l) }, 2),
        Op::Remove(q) => (unsafe { (a.cache_remove)(c, *q) }, 3),
        Op::Plan(e) => {
            let entries: Vec<nsa_step_seq_t> = e.iter().map(|&(seq, tokens)| nsa_step_seq_t { seq, tokens }).collect();
            (unsafe { (a.cache_plan_step)(c, entries.as_ptr(), entries.len() as u32) }, 4)
        }
        Op::Abort => (unsafe { (a.cache_abort_step)(c) }, 6),
        Op::Run(layer) => {
            let t = s.step.as_ref().map_or(0, |d| d.gates.len() / (hq * 3));
            let mut out = Typed::filled(cfg.dtype, t * hq * dv);
            let mut sel = vec![i32::MIN; t * hkv * n];
            let mut io = s.io(&mut out, &mut sel);
            if want.is_ok() && rng.below(8) == 0 {
                // A bad variant first: wrong token count or struct_size; nothing may change.
                let snap = s.snapshot();
                let mut bad = io;
                if rng.below(2) == 0 {
                    bad.tokens += 1;
                } else {
                    bad.struct_size -= 4;
                }
                let r = unsafe { (a.cpu_run_layer)(s.e.cpu, c, *layer, &bad) };
                assert!([NSA_STATUS_INVALID_ARGUMENT, NSA_STATUS_BAD_STRUCT_SIZE].contains(&r), "{where_}: bad layer io: {}", last_error());
                check_unchanged(s, &snap, &where_);
                assert!(out.to_f32().iter().all(|x| x.is_nan()), "{where_}: outputs written on failure");
                st.rejected += 1;
                io = s.io(&mut out, &mut sel);
            }
            let r = unsafe { (a.cpu_run_layer)(s.e.cpu, c, *layer, &io) };
            if r == NSA_STATUS_OK {
                s.bound = true;
                layer_ran(s, &cfg, out, sel, st, &where_);
            } else {
                assert!(out.to_f32().iter().all(|x| x.is_nan()) && sel.iter().all(|&x| x == i32::MIN), "{where_}: outputs written on failure");
            }
            (r, 5)
        }
    };
    st.mix[mix] += 1;
    match (want, status) {
        (Ok(()), NSA_STATUS_OK) => st.changes += 1,
        (Err(k), r) if status_kind(r) == Some(k) => {
            assert!(!last_error().is_empty(), "{where_}: failure without a message");
            check_unchanged(s, before.as_ref().unwrap(), &where_);
            st.rejected += 1;
            return;
        }
        (want, r) => panic!("{where_}: the model predicts {want:?}, the library returned {}: {}", crate::status_name(r), last_error()),
    }
    // Success: follow the histories.
    match op {
        Op::Add(q) => s.hist[*q as usize] = Some(History::default()),
        Op::Fork(x, y) => s.hist[*y as usize] = s.hist[*x as usize].clone(),
        Op::Truncate(q, l) => s.hist[*q as usize].as_mut().unwrap().truncate(*l as usize, &cfg),
        Op::Remove(q) => s.hist[*q as usize] = None,
        Op::Abort => {
            st.aborts += 1;
            s.hist = s.step.take().unwrap().before;
        }
        Op::Plan(e) => {
            let t: usize = e.iter().map(|x| x.1 as usize).sum();
            let (q, k, v) = (stored(cfg.dtype, &rng.vec(t * hq * dk, 2.0)), stored(cfg.dtype, &rng.vec(t * hkv * dk, 1.0)), stored(cfg.dtype, &rng.vec(t * hkv * dv, 1.0)));
            let gates: Vec<f32> = (0..t * hq * 3).map(|_| 0.5 + 0.45 * rng.unit()).collect();
            let before = s.hist.clone();
            let mut row = 0;
            for &(seq, tk) in e {
                let (tk, h) = (tk as usize, s.hist[seq as usize].as_mut().unwrap());
                h.q.extend_from_slice(&q[row * hq * dk..(row + tk) * hq * dk]);
                h.k.extend_from_slice(&k[row * hkv * dk..(row + tk) * hkv * dk]);
                h.v.extend_from_slice(&v[row * hkv * dv..(row + tk) * hkv * dv]);
                h.gates.extend_from_slice(&gates[row * hq * 3..(row + tk) * hq * 3]);
                h.sel.extend(std::iter::repeat(-1).take(tk * hkv * n));
                row += tk;
            }
            let typed = |x: &[f32]| Typed::new(cfg.dtype, x);
            s.step = Some(StepData { entries: e.clone(), q: typed(&q), k: typed(&k), v: typed(&v), gates, first: None, before });
        }
        Op::Run(_) => {
            if !s.sh.open() {
                st.steps_completed += 1;
            }
        }
    }
    if !matches!(op, Op::Run(_) | Op::Plan(_) | Op::Abort) {
        s.step = None; // a mutation after a complete step drops its plan
    }
}

/// A successful layer run: the first of the step is checked against the reference, the
/// others against the first.
fn layer_ran(s: &mut Side, cfg: &Config, out: Typed, sel: Vec<i32>, st: &mut Stats, where_: &str) {
    let (hq, hkv, _, dv, n) = dims(cfg);
    let step = s.step.as_mut().expect("a layer ran, so a step is planned");
    if let Some((o, sl)) = &step.first {
        assert!(o[..] == out.bytes()[..] && sl[..] == sel[..], "{where_}: this layer differs from the step's first on the same inputs");
        return;
    }
    let got = out.to_f32();
    let (tol, sel_tol) = match cfg.dtype {
        Dtype::F32 => (1e-4, 1e-4),
        Dtype::F16 => (4e-3, 2e-3),
        Dtype::Bf16 => (2e-2, 1e-2),
    };
    let mut row = 0usize;
    for &(seq, tk) in &step.entries {
        let tk = tk as usize;
        let h = s.hist[seq as usize].as_mut().unwrap();
        let len = h.gates.len() / (hq * 3);
        h.sel[(len - tk) * hkv * n..].copy_from_slice(&sel[row * hkv * n..(row + tk) * hkv * n]);
        let inp = RefInputs { cfg, q: &h.q, k: &h.k, v: &h.v, gates: &h.gates, phi_k: &s.w.0, phi_v: &s.w.1, selection: None };
        let own = prefill_last(&inp, tk);
        // Selections: equal, or scoring within tolerance of the reference's best.
        for r in 0..tk * hkv {
            let mine = &sel[row * hkv * n + r * n..][..n];
            let theirs = &own.selected[r * n..][..n];
            if mine != theirs {
                let sc = &own.scores[r * own.nb..][..own.nb];
                let sum = |s: &[i32]| -> f64 { s.iter().filter(|&&j| j >= 0).map(|&j| sc[j as usize]).filter(|x| x.is_finite()).sum() };
                let valid = mine.iter().filter(|&&j| j >= 0).count() == theirs.iter().filter(|&&j| j >= 0).count();
                assert!(valid && (sum(mine) - sum(theirs)).abs() <= sel_tol, "{where_}: selection {mine:?} vs reference {theirs:?}");
                st.near_ties += 1;
            }
        }
        let forced = prefill_last(&RefInputs { selection: Some(&h.sel), ..inp }, tk);
        let got = &got[row * hq * dv..(row + tk) * hq * dv];
        let err = got.iter().zip(&forced.out).map(|(x, y)| ((x - y).abs() / (1.0 + y.abs())) as f64).fold(0.0, f64::max);
        assert!(err <= tol && got.iter().all(|x| x.is_finite()), "{where_}: seq {seq} (len {len}) error {err:e} vs reference");
        st.max_err = st.max_err.max(err);
        st.tokens_checked += tk as u64;
        row += tk;
    }
    step.first = Some((out.bytes().to_vec(), sel));
}

/// Calls that must fail before looking at the cache: NULL handles or arrays.
fn bad_call(s: &mut Side, rng: &mut Rng, st: &mut Stats, where_: &str) {
    let a = api();
    let before = s.snapshot();
    let r = match rng.below(4) {
        0 => unsafe { (a.cache_add)(std::ptr::null_mut(), 0) },
        1 => unsafe { (a.cache_plan_step)(s.e.cache, std::ptr::null(), 1) },
        2 => unsafe { (a.cpu_run_layer)(s.e.cpu, s.e.cache, 0, std::ptr::null()) },
        _ => unsafe { (a.cache_abort_step)(std::ptr::null_mut()) },
    };
    assert_eq!(r, NSA_STATUS_NULL_POINTER, "{where_}: {}", last_error());
    check_unchanged(s, &before, where_);
    st.mix[7] += 1;
    st.rejected += 1;
}

/// A backend run on the other cache (same config): refused once the backend is bound.
fn other_cache(sides: &mut [Side; 2], which: usize, rng: &mut Rng, st: &mut Stats, where_: &str) {
    let (a, b) = if which == 0 { let (x, y) = sides.split_at_mut(1); (&mut x[0], &mut y[0]) } else { let (x, y) = sides.split_at_mut(1); (&mut y[0], &mut x[0]) };
    if !a.bound || !b.sh.planned() {
        return;
    }
    let cfg = nsa::Config::try_from(&b.e.cfg).unwrap();
    let (hq, hkv, _, dv, n) = dims(&cfg);
    let t = b.step.as_ref().unwrap().gates.len() / (hq * 3);
    let mut out = Typed::filled(cfg.dtype, t * hq * dv);
    let mut sel = vec![i32::MIN; t * hkv * n];
    let io = b.io(&mut out, &mut sel);
    let (sa, sb) = (a.snapshot(), b.snapshot());
    let layer = rng.below(cfg.num_layers as u64) as u32;
    let r = unsafe { (api().cpu_run_layer)(a.e.cpu, b.e.cache, layer, &io) };
    assert_eq!(r, NSA_STATUS_INVALID_ARGUMENT, "{where_}: backend run on another cache: {}", last_error());
    assert!(last_error().contains("this backend serves cache #"), "{where_}: {}", last_error());
    check_unchanged(a, &sa, where_);
    check_unchanged(b, &sb, where_);
    assert!(out.to_f32().iter().all(|x| x.is_nan()), "{where_}: outputs written on failure");
    st.mix[8] += 1;
    st.rejected += 1;
}

fn empty_io() -> nsa_layer_io_t {
    // SAFETY: all fields are integers or pointers; NULL pointers are what we want.
    let mut io: nsa_layer_io_t = unsafe { std::mem::zeroed() };
    io.struct_size = std::mem::size_of::<nsa_layer_io_t>() as u32;
    io
}

fn stats(s: &Side) -> nsa_cache_stats_t {
    let mut st = nsa_cache_stats_t { struct_size: std::mem::size_of::<nsa_cache_stats_t>() as u32, ..Default::default() };
    crate::ok(unsafe { (api().cache_stats)(s.e.cache, &mut st) });
    st
}

fn check_unchanged(s: &Side, before: &(Vec<u8>, Vec<u8>), where_: &str) {
    assert!(s.e.arena.bytes() == &before.0[..], "{where_}: a failing call changed the cache arena");
    assert!(s.e.buf.bytes() == &before.1[..], "{where_}: a failing call changed the backend buffer");
}

fn invariants(s: &Side, where_: &str) {
    let a = api();
    let r = unsafe { (a.cache_check)(s.e.cache) };
    let want = if s.sh.open() { NSA_STATUS_STEP_OPEN } else { NSA_STATUS_OK };
    assert_eq!(r, want, "{where_}: nsa_cache_check: {}", last_error());
    for q in 0..s.hist.len() as u32 {
        let mut len = 0u32;
        let r = unsafe { (a.cache_len)(s.e.cache, q, &mut len) };
        match s.sh.len(q) {
            Some(l) => assert_eq!((r, len), (NSA_STATUS_OK, l), "{where_}: slot {q}"),
            None => assert_eq!(r, NSA_STATUS_UNKNOWN_SEQUENCE, "{where_}: slot {q} should be empty"),
        }
        let hq = s.e.cfg.num_q_heads as usize;
        assert_eq!(s.hist[q as usize].as_ref().map(|h| (h.gates.len() / (hq * 3)) as u32), s.sh.len(q), "{where_}: history of slot {q}");
    }
    let st = stats(s);
    assert_eq!((st.raw_free, st.cmp_free, st.live_seqs), (s.sh.raw_free(), s.sh.cmp_free(), s.sh.live().len() as u32), "{where_}: pools");
}
