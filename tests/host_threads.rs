//! The host-thread entry point (`CpuBackend::layer_parts`, `LayerParts::run(ith, nth)`)
//! against the engine's own runner: the same steps on two caches and backends, one run
//! by `run_layer` / `append_layer` on the backend's worker threads, the other by host
//! threads through `layer_parts` / `append_parts` on a backend that started no thread.
//! Outputs, selections and finally every byte of the K/V pools must be equal, for
//! several `nth`: 1, fewer than the scratch slots, more than the slots, more than the
//! step's (sequence, KV head) tasks.

mod common;

use common::{dims, random_weights, Engine, Rng, SeqData};
use half::bf16;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::layout::Layout;
use nsa::{Cache, Config, Dtype, Phi, Preset, StepSeq};

/// One `nth` per layer: 1, 2, the slot count (3), more than the slots (5), more than
/// any step's tasks (3 sequences x 2 KV heads = 6).
const NTH: [usize; 5] = [1, 2, 3, 5, 11];

fn config() -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(8, 2, 32, 16);
    c.dtype = Dtype::Bf16;
    c.num_layers = NTH.len() as u32;
    c.sel_count = 4;
    c.window = 40;
    c.phi = Phi::Linear;
    c.phi_pe = true;
    c.max_seqs = 4;
    c.max_step_seqs = 4;
    c.max_seq_len = 400;
    c.max_step_tokens = 400;
    c.cpu_threads = 3;
    c.fit_pages();
    c
}

enum Op {
    Add(u32),
    Fork(u32, u32),
    Truncate(u32, u32),
    Remove(u32),
    /// (sequence, tokens) of a step with attention.
    Step(Vec<(u32, u32)>),
    /// An append-only step.
    Append(Vec<(u32, u32)>),
}

fn bits(x: &[bf16]) -> Vec<u16> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn host_threads_match_the_runner_bit_for_bit() {
    let cfg = config();
    let (hq, hkv, dk, dv) = dims(&cfg);
    let n_sel = cfg.sel_count as usize;
    let mut rng = Rng::new(41);
    let data = SeqData::random::<bf16>(&cfg, 400, &mut rng);
    let w = random_weights(&cfg, &mut rng);
    let pw = PhiWeights { k: &w.0, v: &w.1 };
    // Prefill chunks and decodes mixed; a fork whose first appends copy shared pages
    // (copy-on-write in the step), a truncate, a remove, an append-only fill.
    let ops = vec![
        Op::Add(0),
        Op::Add(1),
        Op::Step(vec![(0, 100), (1, 37)]),
        Op::Fork(0, 2),
        Op::Step(vec![(0, 1), (1, 1), (2, 5)]),
        Op::Append(vec![(1, 70), (2, 3)]),
        Op::Truncate(0, 90),
        Op::Add(3),
        Op::Step(vec![(2, 1), (0, 17), (3, 64), (1, 1)]),
        Op::Step(vec![(3, 1)]),
        Op::Remove(0),
        Op::Fork(3, 0),
        Op::Step(vec![(0, 2), (3, 1), (2, 30)]),
    ];

    let (mut ea, mut eb) = (Engine::new(&cfg), Engine::new(&cfg));
    let mut ca = Cache::new(&cfg, ea.arena.bytes()).unwrap();
    let mut cb = Cache::new(&cfg, eb.arena.bytes()).unwrap();
    let mut a = CpuBackend::new(&cfg, ea.pool.bytes()).unwrap();
    let mut b = CpuBackend::new_hosted(&cfg, eb.pool.bytes()).unwrap();
    let (mut checked, mut copies) = (0, 0);
    for op in &ops {
        let entries = match op {
            Op::Add(s) => {
                ca.add_sequence(*s).unwrap();
                cb.add_sequence(*s).unwrap();
                continue;
            }
            Op::Fork(s, d) => {
                ca.fork(*s, *d).unwrap();
                cb.fork(*s, *d).unwrap();
                continue;
            }
            Op::Remove(s) => {
                ca.remove(*s).unwrap();
                cb.remove(*s).unwrap();
                continue;
            }
            Op::Truncate(s, l) => {
                ca.truncate(*s, *l).unwrap();
                cb.truncate(*s, *l).unwrap();
                continue;
            }
            Op::Step(e) | Op::Append(e) => e,
        };
        let steps: Vec<StepSeq> = entries.iter().map(|&(seq, tokens)| StepSeq { seq, tokens }).collect();
        // The step's rows: each sequence's inputs at its current positions.
        let (mut q, mut k, mut v, mut g) = (vec![], vec![], vec![], vec![]);
        for s in &steps {
            let p0 = ca.len(s.seq).unwrap() as usize;
            let t = s.tokens as usize;
            let to = |x: &[f32]| x.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>();
            q.extend(to(&data.q[p0 * hq * dk..(p0 + t) * hq * dk]));
            k.extend(to(&data.k[p0 * hkv * dk..(p0 + t) * hkv * dk]));
            v.extend(to(&data.v[p0 * hkv * dv..(p0 + t) * hkv * dv]));
            g.extend_from_slice(&data.gates[p0 * hq * 3..(p0 + t) * hq * 3]);
        }
        ca.plan_step(&steps).unwrap();
        cb.plan_step(&steps).unwrap();
        copies += cb.step().unwrap().copies.len();
        let tokens: usize = entries.iter().map(|e| e.1 as usize).sum();
        for (layer, &nth) in NTH.iter().enumerate() {
            let layer = layer as u32;
            if matches!(op, Op::Append(_)) {
                a.append_layer(&ca, layer, &k, &v, pw).unwrap();
                let parts = b.append_parts(&cb, layer, &k, &v, pw).unwrap();
                std::thread::scope(|s| {
                    for ith in 0..nth {
                        let parts = &parts;
                        s.spawn(move || parts.run(ith, nth));
                    }
                });
                continue;
            }
            let (mut oa, mut ob) = (vec![bf16::NAN; tokens * hq * dv], vec![bf16::NAN; tokens * hq * dv]);
            let (mut sa, mut sb) = (vec![i32::MIN; tokens * hkv * n_sel], vec![i32::MIN; tokens * hkv * n_sel]);
            a.run_layer(&ca, layer, LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut oa, selected: Some(&mut sa) }, pw).unwrap();
            let parts = b.layer_parts(&cb, layer, LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut ob, selected: Some(&mut sb) }, pw).unwrap();
            assert_eq!(parts.tasks(), steps.len() * hkv);
            std::thread::scope(|s| {
                for ith in 0..nth {
                    let parts = &parts;
                    s.spawn(move || parts.run(ith, nth));
                }
            });
            assert!(oa.iter().all(|x| x.is_finite()), "the runner wrote every output");
            let first_diff = bits(&oa).iter().zip(bits(&ob)).position(|(x, y)| *x != y);
            assert_eq!(first_diff, None, "outputs differ (first element shown): step {entries:?}, layer {layer}, nth {nth}");
            assert!(sa == sb, "selections differ: step {entries:?}, layer {layer}, nth {nth}");
            checked += 1;
        }
        ca.check_invariants().unwrap();
        cb.check_invariants().unwrap();
    }
    assert_eq!(checked, 5 * NTH.len());
    assert!(copies >= 2, "the forks' copy-on-write copies were exercised ({copies})");
    drop((a, b, ca, cb));
    // Every layer's pools: the same bytes (appends, copies, compressed tokens).
    let pool = Layout::new(&cfg).unwrap().pool_bytes;
    assert!(ea.pool.bytes()[..pool] == eb.pool.bytes()[..pool], "K/V pools differ");
}

/// Bad arguments fail as `run_layer` fails, before any thread runs, writing nothing.
#[test]
fn layer_parts_checks_like_run_layer() {
    let cfg = config();
    let (hq, hkv, dk, dv) = dims(&cfg);
    let mut e = Engine::new(&cfg);
    let mut cache = Cache::new(&cfg, e.arena.bytes()).unwrap();
    let mut b = CpuBackend::new_hosted(&cfg, e.pool.bytes()).unwrap();
    let (q, k, v, g) = (vec![bf16::ZERO; 2 * hq * dk], vec![bf16::ZERO; 2 * hkv * dk], vec![bf16::ZERO; 2 * hkv * dv], vec![0.5f32; 2 * hq * 3]);
    let mut out = vec![bf16::NAN; 2 * hq * dv];
    let w = random_weights(&cfg, &mut Rng::new(1));
    let pw = PhiWeights { k: &w.0, v: &w.1 };
    macro_rules! io {
        ($out:expr) => {
            LayerIo { q: &q, k: &k, v: &v, gates: &g, out: $out, selected: None }
        };
    }
    let err = b.layer_parts(&cache, 0, io!(&mut out), pw).err().expect("no step planned");
    assert!(err.to_string().contains("step"), "{err}");
    cache.add_sequence(0).unwrap();
    cache.plan_step(&[StepSeq { seq: 0, tokens: 2 }]).unwrap();
    let err = b.layer_parts(&cache, cfg.num_layers, io!(&mut out), pw).err().expect("layer out of range");
    assert!(err.to_string().contains("layer"), "{err}");
    let err = b.layer_parts(&cache, 0, LayerIo { q: &q[1..], k: &k, v: &v, gates: &g, out: &mut out, selected: None }, pw).err().expect("short q");
    assert!(err.to_string().contains("q"), "{err}");
    let err = b.append_parts(&cache, 0, &k, &v, PhiWeights::default()).err().expect("missing phi weights");
    assert!(err.to_string().contains("phi_weights"), "{err}");
    assert!(out.iter().all(|x| x.is_nan()), "a failed call wrote out");
    // And the step still runs afterwards.
    let parts = b.layer_parts(&cache, 0, io!(&mut out), pw).unwrap();
    parts.run(0, 1);
    assert!(out.iter().all(|x| x.is_finite()));
}
