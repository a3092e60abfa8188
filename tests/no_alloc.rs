//! "No allocation per step", proved: a counting global allocator wraps the system one,
//! and the per-step calls (plan_step, run_layer on 3 threads, attend_full, layer_parts
//! with its (ith, nth) shares) and the
//! sequence operations (add, fork, truncate, remove) run after init with the counter
//! watched. One test in this binary, so no other test allocates concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;
use common::*;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::{Cache, Config, Dtype, Phi, Preset, StepSeq};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.realloc(p, l, n)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn count<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCS.load(Ordering::SeqCst);
    let r = f();
    (r, ALLOCS.load(Ordering::SeqCst) - before)
}

#[test]
fn per_step_calls_allocate_nothing() {
    let mut rng = Rng::new(5);
    for (phi, dtype) in [(Phi::Mean, Dtype::Bf16), (Phi::Mlp, Dtype::F32)] {
        let mut cfg = Config::preset(Preset::Paper).with_shape(8, 2, 64, 64);
        cfg.dtype = dtype;
        cfg.phi = phi;
        cfg.phi_hidden = 16;
        cfg.max_seqs = 4;
        cfg.max_step_seqs = 4;
        cfg.max_seq_len = 2048;
        cfg.max_step_tokens = 600;
        cfg.cpu_threads = 3;
        cfg.num_layers = 2;
        cfg.fit_pages();
        let (hq, hkv, dk, dv) = dims(&cfg);
        let mut eng = Engine::new(&cfg);
        let mut cache = Cache::new(&cfg, eng.arena.bytes()).unwrap();
        let mut cpu = CpuBackend::new(&cfg, eng.pool.bytes()).unwrap();
        let w = random_weights(&cfg, &mut rng);
        // Inputs sized for the largest step, made before counting.
        let tok = cfg.max_step_tokens as usize;
        let q: Vec<f32> = rng.vec(tok * hq * dk, 1.0);
        let k: Vec<f32> = rng.vec(tok * hkv * dk, 1.0);
        let v: Vec<f32> = rng.vec(tok * hkv * dv, 1.0);
        let g: Vec<f32> = vec![0.3; tok * hq * 3];
        let mut out = vec![0f32; tok * hq * dv];
        let mut sel = vec![0i32; tok * hkv * cfg.sel_count as usize];
        let (qb, kb, vb): (Vec<half::bf16>, Vec<half::bf16>, Vec<half::bf16>) = (
            q.iter().map(|&x| half::bf16::from_f32(x)).collect(),
            k.iter().map(|&x| half::bf16::from_f32(x)).collect(),
            v.iter().map(|&x| half::bf16::from_f32(x)).collect(),
        );
        let mut outb = vec![half::bf16::ZERO; tok * hq * dv];
        let steps: Vec<Vec<StepSeq>> = vec![
            vec![StepSeq { seq: 0, tokens: 300 }, StepSeq { seq: 1, tokens: 250 }],
            vec![StepSeq { seq: 0, tokens: 1 }, StepSeq { seq: 1, tokens: 1 }, StepSeq { seq: 2, tokens: 1 }],
            vec![StepSeq { seq: 2, tokens: 40 }, StepSeq { seq: 0, tokens: 1 }],
        ];

        // After each round's steps, seq 3 is forked from seq 0 and both append a token: a
        // step with two copy-on-write copies of the shared partial page (checked below).
        let cow_step = vec![StepSeq { seq: 0, tokens: 1 }, StepSeq { seq: 3, tokens: 1 }];
        let mut copies = 0;
        let (_, n) = count(|| {
            for s in 0..3 {
                cache.add_sequence(s).unwrap();
            }
            for round in 0..4 {
                for (i, st) in steps.iter().chain([&cow_step]).enumerate() {
                    if i == steps.len() {
                        cache.fork(0, 3).unwrap();
                    }
                    cache.plan_step(st).unwrap();
                    copies += cache.step().unwrap().copies.len();
                    let t: usize = st.iter().map(|e| e.tokens as usize).sum();
                    let wts = PhiWeights { k: &w.0, v: &w.1 };
                    if dtype == Dtype::F32 {
                        let (qs, ks, vs, gs) = (&q[..t * hq * dk], &k[..t * hkv * dk], &v[..t * hkv * dv], &g[..t * hq * 3]);
                        let io = LayerIo {
                            q: qs,
                            k: ks,
                            v: vs,
                            gates: gs,
                            out: &mut out[..t * hq * dv],
                            selected: Some(&mut sel[..t * hkv * cfg.sel_count as usize]),
                        };
                        cpu.run_layer(&cache, 0, io, wts).unwrap();
                        cpu.attend_full(&cache, 0, &q[..t * hq * dk], &mut out[..t * hq * dv]).unwrap();
                        // Layer 1 as a host would run it: every (ith, nth) share (here in turn).
                        let io = LayerIo { q: qs, k: ks, v: vs, gates: gs, out: &mut out[..t * hq * dv], selected: None };
                        let parts = cpu.layer_parts(&cache, 1, io, wts).unwrap();
                        (0..4).for_each(|ith| parts.run(ith, 4));
                    } else {
                        let io = LayerIo {
                            q: &qb[..t * hq * dk],
                            k: &kb[..t * hkv * dk],
                            v: &vb[..t * hkv * dv],
                            gates: &g[..t * hq * 3],
                            out: &mut outb[..t * hq * dv],
                            selected: None,
                        };
                        cpu.run_layer(&cache, 0, io, wts).unwrap();
                        let parts = cpu.append_parts(&cache, 1, &kb[..t * hkv * dk], &vb[..t * hkv * dv], wts).unwrap();
                        (0..2).for_each(|ith| parts.run(ith, 2));
                    }
                }
                // Sequence operations between steps.
                cache.truncate(3, 100 + round).unwrap();
                cache.remove(3).unwrap();
                cache.truncate(1, 200).unwrap();
            }
        });
        println!("{phi:?}/{dtype:?}: {n} heap allocations in 16 planned steps, 32 layer runs (layer 1 in host-thread parts), {copies} copy-on-write copies, 4 fork/truncate/remove rounds");
        assert!(copies >= 8, "{phi:?}/{dtype:?}: the fork rounds must copy pages ({copies} copies)");
        assert_eq!(n, 0, "{phi:?}/{dtype:?}: per-step calls allocated {n} times");
    }
}
