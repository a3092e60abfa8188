//! A seeded fuzzer over random operation sequences, driven through the C ABI table.
//!
//! Each round draws a random config (preset, group size, head dims, phi, window, n,
//! overcommitted page pools, 1-2 layers), makes a cache and a CPU backend through
//! `nsa_get_api`, and runs random operations: add, fork, truncate, remove, and steps
//! (plan + every layer) over random subsets of the live sequences, mixed with
//! deliberately bad calls (NULL pointers, unknown or out-of-range sequences, duplicate
//! entries, zero tokens, wrong token counts, wrong struct_size, layer out of range, a
//! layer run after the step ended). After every operation it checks:
//! - `nsa_cache_check`: no page leaked or double-freed, refcounts equal references;
//! - lengths and live sequences match a shadow model;
//! - a failing call returned an error status with a message, and left the arena, the
//!   backend buffer and the outputs byte for byte as they were;
//! - every output of every step equals the brute-force reference (`nsa::reference`) over
//!   the sequence's whole history, given the engine's selected blocks, and every
//!   selection scores within tolerance of the reference's best;
//! - both layers of a step (fed the same inputs) give the same outputs.
//!
//! Any violation panics with the seed and operation number, which reproduce it.

use std::time::{Duration, Instant};

use crate::{api, last_error, AlignedBuf, Rng};
use nsa::ffi::*;
use nsa::reference::{prefill_last, RefInputs};
use nsa::{Config, Dtype, Phi, Preset};

/// What a run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub ops: u64,
    pub rejected: u64,
    pub steps: u64,
    pub tokens_checked: u64,
    pub near_ties: u64,
    pub rounds: u64,
    pub max_err: f64,
}

/// One live sequence's inputs so far (f32 rows) and the engine's selections.
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
    c.dtype = Dtype::F32;
    c.phi = if preset == Preset::Fla { Phi::Mean } else { rng.pick(&[Phi::Mean, Phi::Weighted, Phi::Linear, Phi::Mlp]) };
    c.phi_hidden = 8;
    c.phi_pe = rng.below(2) == 0;
    c.sel_count = rng.pick(&[3, 4, 6]);
    c.window = rng.pick(&[8, 33, 100]);
    c.num_layers = rng.pick(&[1, 2]);
    c.max_step_tokens = rng.pick(&[64, 200]);
    c.cpu_threads = rng.pick(&[1, 2, 3]);
    // Overcommit the pools so that steps run out of pages.
    c.num_pages = (c.num_pages / rng.pick(&[1, 2, 3])).max(1);
    c.num_cmp_pages = (c.num_cmp_pages / rng.pick(&[1, 2])).max(1);
    c
}

/// The engine under test, made through the table.
struct Engine {
    cfg: Config,
    ccfg: nsa_config_t,
    arena: AlignedBuf,
    buf: AlignedBuf,
    cache: *mut nsa_cache,
    cpu: *mut nsa_cpu_backend,
    w: (Vec<f32>, Vec<f32>),
}

impl Engine {
    fn new(cfg: Config, rng: &mut Rng) -> Engine {
        let a = api();
        let ccfg = nsa_config_t::from(&cfg);
        let (mut ab, mut bb) = (0usize, 0usize);
        unsafe {
            crate::ok((a.cache_arena_size)(&ccfg, &mut ab));
            crate::ok((a.cpu_buffer_size)(&ccfg, &mut bb));
        }
        let mut e = Engine {
            cfg,
            ccfg,
            arena: AlignedBuf::filled(ab, 0xC3),
            buf: AlignedBuf::filled(bb, 0x3C),
            cache: std::ptr::null_mut(),
            cpu: std::ptr::null_mut(),
            w: (rng.vec(cfg.phi_weight_len(cfg.head_dim_qk), 0.2), rng.vec(cfg.phi_weight_len(cfg.head_dim_v), 0.2)),
        };
        unsafe {
            crate::ok((a.cache_init)(&e.ccfg, e.arena.ptr().cast(), ab, &mut e.cache));
            crate::ok((a.cpu_backend_create)(&e.ccfg, e.buf.ptr().cast(), bb, &mut e.cpu));
        }
        e
    }

    fn snapshot(&self) -> (Vec<u8>, Vec<u8>) {
        (self.arena.bytes().to_vec(), self.buf.bytes().to_vec())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        unsafe { (api().cpu_backend_destroy)(self.cpu) };
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

fn round(rng: &mut Rng, st: &mut Stats, seed: u64, ops: u64) {
    let a = api();
    let cfg = random_config(rng);
    let mut e = Engine::new(cfg, rng);
    let hq = cfg.num_q_heads as usize;
    let slots = cfg.max_seqs;
    let mut shadow: Vec<Option<History>> = vec![None; slots as usize];
    for _ in 0..ops {
        st.ops += 1;
        let where_ = format!("seed {seed}, op {} ({cfg:?})", st.ops);
        let before = e.snapshot();
        let live: Vec<u32> = (0..slots).filter(|&s| shadow[s as usize].is_some()).collect();
        let any_slot = rng.below(slots as u64 + 2) as u32; // sometimes out of range
        let pick = |rng: &mut Rng| if live.is_empty() || rng.below(6) == 0 { any_slot } else { rng.pick(&live) };
        let is_live = |s: u32| s < slots && shadow[s as usize].is_some();
        // (status, whether the call was valid)
        let (status, valid) = match rng.below(20) {
            0..=2 => {
                let s = any_slot;
                let r = unsafe { (a.cache_add)(e.cache, s) };
                let v = s < slots && !is_live(s);
                if r == NSA_STATUS_OK {
                    shadow[s as usize] = Some(History::default());
                }
                (r, v)
            }
            3 => {
                let (src, dst) = (pick(rng), any_slot);
                let v = is_live(src) && dst < slots && !is_live(dst);
                let r = unsafe { (a.cache_fork)(e.cache, src, dst) };
                if r == NSA_STATUS_OK {
                    shadow[dst as usize] = shadow[src as usize].clone();
                }
                (r, v)
            }
            4 => {
                let s = pick(rng);
                let cur = if is_live(s) { shadow[s as usize].as_ref().unwrap().gates.len() / (hq * 3) } else { 5 };
                let to = rng.below(cur as u64 + 3) as usize;
                let v = is_live(s) && to <= cur;
                let r = unsafe { (a.cache_truncate)(e.cache, s, to as u32) };
                if r == NSA_STATUS_OK {
                    shadow[s as usize].as_mut().unwrap().truncate(to, &cfg);
                }
                (r, v)
            }
            5 => {
                let s = pick(rng);
                let v = is_live(s);
                let r = unsafe { (a.cache_remove)(e.cache, s) };
                if r == NSA_STATUS_OK {
                    shadow[s as usize] = None;
                }
                (r, v)
            }
            6 => {
                // Bad calls that must fail: NULL handle, NULL entries, layer run with a
                // NULL io or after the step ended, layer out of range.
                let r = match rng.below(4) {
                    0 => unsafe { (a.cache_add)(std::ptr::null_mut(), 0) },
                    1 => unsafe { (a.cache_plan_step)(e.cache, std::ptr::null(), 1) },
                    2 => unsafe { (a.cpu_run_layer)(e.cpu, e.cache, 0, std::ptr::null()) },
                    _ => {
                        let io = empty_io();
                        unsafe { (a.cpu_run_layer)(e.cpu, e.cache, cfg.num_layers + rng.below(3) as u32, &io) }
                    }
                };
                (r, false)
            }
            _ => {
                // A step over a random subset of live sequences, sometimes with a bad entry.
                let mut entries: Vec<nsa_step_seq_t> = vec![];
                for &s in &live {
                    if rng.below(3) != 0 {
                        entries.push(nsa_step_seq_t { seq: s, tokens: rng.pick(&[1, 1, 1, 2, 9, 31, 64]) });
                    }
                }
                let mut sabotage = false;
                match rng.below(14) {
                    0 if !entries.is_empty() => {
                        entries.push(entries[0]);
                        sabotage = true;
                    }
                    1 if !entries.is_empty() => {
                        entries[0].tokens = 0;
                        sabotage = true;
                    }
                    2 => {
                        entries.push(nsa_step_seq_t { seq: slots + rng.below(3) as u32, tokens: 1 });
                        sabotage = true;
                    }
                    _ => {}
                }
                let r = unsafe { (a.cache_plan_step)(e.cache, entries.as_ptr(), entries.len() as u32) };
                let v = !entries.is_empty() && !sabotage;
                if r != NSA_STATUS_OK {
                    if v {
                        // A valid step may still need more pages or tokens than there are.
                        assert!(
                            [NSA_STATUS_OUT_OF_PAGES, NSA_STATUS_SEQUENCE_TOO_LONG, NSA_STATUS_INVALID_ARGUMENT].contains(&r),
                            "{where_}: valid step failed: {}",
                            last_error()
                        );
                        st.rejected += 1;
                        check_unchanged(&e, &before, &where_);
                        invariants(&e, &shadow, &where_);
                        continue;
                    }
                    (r, v)
                } else {
                    assert!(v, "{where_}: an invalid step was accepted");
                    run_step(&mut e, rng, &entries, &mut shadow, st, &where_);
                    (r, v)
                }
            }
        };
        if valid {
            assert_eq!(status, NSA_STATUS_OK, "{where_}: valid call failed: {}", last_error());
        } else {
            assert_ne!(status, NSA_STATUS_OK, "{where_}: invalid call succeeded");
            assert!(!last_error().is_empty(), "{where_}: failure without a message");
            st.rejected += 1;
            check_unchanged(&e, &before, &where_);
        }
        invariants(&e, &shadow, &where_);
    }
    // Removing everything returns every page.
    for s in 0..slots {
        if shadow[s as usize].is_some() {
            crate::ok(unsafe { (a.cache_remove)(e.cache, s) });
        }
    }
    let stats = stats(&e);
    assert_eq!((stats.raw_free, stats.cmp_free, stats.live_seqs), (cfg.num_pages, cfg.num_cmp_pages, 0), "seed {seed}: pages leaked");
}

fn empty_io() -> nsa_layer_io_t {
    // SAFETY: all fields are integers or pointers; NULL pointers are what we want.
    let mut io: nsa_layer_io_t = unsafe { std::mem::zeroed() };
    io.struct_size = std::mem::size_of::<nsa_layer_io_t>() as u32;
    io
}

fn stats(e: &Engine) -> nsa_cache_stats_t {
    let mut s = nsa_cache_stats_t { struct_size: std::mem::size_of::<nsa_cache_stats_t>() as u32, ..Default::default() };
    crate::ok(unsafe { (api().cache_stats)(e.cache, &mut s) });
    s
}

fn check_unchanged(e: &Engine, before: &(Vec<u8>, Vec<u8>), where_: &str) {
    assert!(e.arena.bytes() == &before.0[..], "{where_}: a failing call changed the cache arena");
    assert!(e.buf.bytes() == &before.1[..], "{where_}: a failing call changed the backend buffer");
}

fn invariants(e: &Engine, shadow: &[Option<History>], where_: &str) {
    let a = api();
    let r = unsafe { (a.cache_check)(e.cache) };
    assert_eq!(r, NSA_STATUS_OK, "{where_}: {}", last_error());
    let hq = e.cfg.num_q_heads as usize;
    for (s, h) in shadow.iter().enumerate() {
        let mut len = 0u32;
        let r = unsafe { (a.cache_len)(e.cache, s as u32, &mut len) };
        match h {
            Some(h) => {
                assert_eq!(r, NSA_STATUS_OK, "{where_}: slot {s}");
                assert_eq!(len as usize, h.gates.len() / (hq * 3), "{where_}: slot {s} length");
            }
            None => assert_eq!(r, NSA_STATUS_UNKNOWN_SEQUENCE, "{where_}: slot {s} should be empty"),
        }
    }
    assert_eq!(stats(e).live_seqs as usize, shadow.iter().filter(|h| h.is_some()).count(), "{where_}");
}

/// Runs every layer of a planned step (with a bad layer call first, sometimes), records
/// the inputs, and checks the outputs against the reference.
fn run_step(e: &mut Engine, rng: &mut Rng, entries: &[nsa_step_seq_t], shadow: &mut [Option<History>], st: &mut Stats, where_: &str) {
    let a = api();
    let cfg = e.cfg;
    let (hq, hkv, dk, dv, n) = dims(&cfg);
    let t: usize = entries.iter().map(|x| x.tokens as usize).sum();
    let (q, k, v) = (rng.vec(t * hq * dk, 2.0), rng.vec(t * hkv * dk, 1.0), rng.vec(t * hkv * dv, 1.0));
    let gates: Vec<f32> = (0..t * hq * 3).map(|_| 0.5 + 0.45 * rng.unit()).collect();
    let mut outs = vec![vec![f32::NAN; t * hq * dv]; cfg.num_layers as usize];
    let mut sels = vec![vec![i32::MIN; t * hkv * n]; cfg.num_layers as usize];
    for layer in 0..cfg.num_layers as usize {
        let mut io = empty_io();
        io.dtype = NSA_DTYPE_F32;
        io.tokens = t as u32;
        io.q = q.as_ptr().cast();
        io.k = k.as_ptr().cast();
        io.v = v.as_ptr().cast();
        io.gates = gates.as_ptr();
        io.out = outs[layer].as_mut_ptr().cast();
        io.selected = sels[layer].as_mut_ptr();
        io.phi_k = if e.w.0.is_empty() { std::ptr::null() } else { e.w.0.as_ptr() };
        io.phi_k_len = e.w.0.len();
        io.phi_v = if e.w.1.is_empty() { std::ptr::null() } else { e.w.1.as_ptr() };
        io.phi_v_len = e.w.1.len();
        if rng.below(4) == 0 {
            // A bad variant first: wrong token count or struct_size; nothing may change.
            let before = e.snapshot();
            let out_before = outs[layer].clone();
            let mut bad = io;
            if rng.below(2) == 0 {
                bad.tokens += 1;
            } else {
                bad.struct_size -= 4;
            }
            let r = unsafe { (a.cpu_run_layer)(e.cpu, e.cache, layer as u32, &bad) };
            assert_ne!(r, NSA_STATUS_OK, "{where_}: bad layer io accepted");
            check_unchanged(e, &before, where_);
            assert!(outs[layer].iter().zip(&out_before).all(|(x, y)| x.to_bits() == y.to_bits()), "{where_}: outputs written on failure");
            st.rejected += 1;
        }
        let r = unsafe { (a.cpu_run_layer)(e.cpu, e.cache, layer as u32, &io) };
        assert_eq!(r, NSA_STATUS_OK, "{where_}: layer {layer}: {}", last_error());
    }
    for l in 1..outs.len() {
        assert!(outs[l] == outs[0] && sels[l] == sels[0], "{where_}: layer {l} differs from layer 0 on the same inputs");
    }
    st.steps += 1;
    // Record and check each sequence of the step.
    let mut row = 0usize;
    for en in entries {
        let tk = en.tokens as usize;
        let h = shadow[en.seq as usize].as_mut().unwrap();
        h.q.extend_from_slice(&q[row * hq * dk..(row + tk) * hq * dk]);
        h.k.extend_from_slice(&k[row * hkv * dk..(row + tk) * hkv * dk]);
        h.v.extend_from_slice(&v[row * hkv * dv..(row + tk) * hkv * dv]);
        h.gates.extend_from_slice(&gates[row * hq * 3..(row + tk) * hq * 3]);
        h.sel.extend_from_slice(&sels[0][row * hkv * n..(row + tk) * hkv * n]);
        let inp = RefInputs { cfg: &cfg, q: &h.q, k: &h.k, v: &h.v, gates: &h.gates, phi_k: &e.w.0, phi_v: &e.w.1, selection: None };
        let own = prefill_last(&inp, tk);
        // Selections: equal, or scoring within tolerance of the reference's best.
        let len = h.gates.len() / (hq * 3);
        for r in 0..tk * hkv {
            let mine = &sels[0][row * hkv * n + r * n..][..n];
            let theirs = &own.selected[r * n..][..n];
            if mine != theirs {
                let sc = &own.scores[r * own.nb..][..own.nb];
                let sum = |s: &[i32]| -> f64 { s.iter().filter(|&&j| j >= 0).map(|&j| sc[j as usize]).filter(|x| x.is_finite()).sum() };
                let valid = mine.iter().filter(|&&j| j >= 0).count() == theirs.iter().filter(|&&j| j >= 0).count();
                assert!(valid && (sum(mine) - sum(theirs)).abs() <= 1e-4, "{where_}: selection {mine:?} vs reference {theirs:?}");
                st.near_ties += 1;
            }
        }
        let forced = prefill_last(&RefInputs { selection: Some(&h.sel), ..inp }, tk);
        let got = &outs[0][row * hq * dv..(row + tk) * hq * dv];
        let err = got.iter().zip(&forced.out).map(|(x, y)| ((x - y).abs() / (1.0 + y.abs())) as f64).fold(0.0, f64::max);
        assert!(err <= 1e-4 && got.iter().all(|x| x.is_finite()), "{where_}: seq {} (len {len}) error {err:e} vs reference", en.seq);
        st.max_err = st.max_err.max(err);
        st.tokens_checked += tk as u64;
        row += tk;
    }
}
