//! The step lifecycle (issue 13, items 1-4): no call sequence the API allows leaves a
//! sequence counting positions that some layer did not write, and abort_step restores
//! the cache exactly. Outputs after every scenario are checked against the brute-force
//! reference over each sequence's whole history, with pools that start filled with
//! 0x5A bytes (so a row nothing wrote shows up as a huge value, not a plausible one).

mod common;
use common::*;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::reference::{prefill_last, RefInputs};
use nsa::{Cache, Config, Dtype, NsaError, Preset, StepSeq};

fn cfg(layers: u32) -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(4, 2, 16, 8).with_capacity(4, 256);
    c.dtype = Dtype::F32;
    c.num_layers = layers;
    c.cpu_threads = 2;
    c.window = 40;
    c
}

/// Every sequence's whole input history (all layers get the same inputs).
struct Hist {
    cfg: Config,
    seqs: Vec<Option<SeqData>>,
    rng: Rng,
}

impl Hist {
    fn new(cfg: &Config) -> Hist {
        Hist { cfg: *cfg, seqs: vec![None; cfg.max_seqs as usize], rng: Rng::new(13) }
    }

    fn add(&mut self, s: u32) {
        self.seqs[s as usize] = Some(SeqData::random::<f32>(&self.cfg, 0, &mut self.rng));
    }

    fn fork(&mut self, src: u32, dst: u32) {
        self.seqs[dst as usize] = self.seqs[src as usize].clone();
    }

    fn truncate(&mut self, s: u32, len: usize) {
        let (hq, hkv, dk, dv) = dims(&self.cfg);
        let d = self.seqs[s as usize].as_mut().unwrap();
        d.len = len;
        d.q.truncate(len * hq * dk);
        d.k.truncate(len * hkv * dk);
        d.v.truncate(len * hkv * dv);
        d.gates.truncate(len * hq * 3);
    }

    /// New random rows for `step`, appended to the histories; returns the step's arrays.
    fn grow(&mut self, step: &[StepSeq]) -> SeqData {
        let tokens: usize = step.iter().map(|e| e.tokens as usize).sum();
        let rows = SeqData::random::<f32>(&self.cfg, tokens, &mut self.rng);
        let (hq, hkv, dk, dv) = dims(&self.cfg);
        let mut r = 0;
        for e in step {
            let (t, d) = (e.tokens as usize, self.seqs[e.seq as usize].as_mut().unwrap());
            d.q.extend_from_slice(&rows.q[r * hq * dk..(r + t) * hq * dk]);
            d.k.extend_from_slice(&rows.k[r * hkv * dk..(r + t) * hkv * dk]);
            d.v.extend_from_slice(&rows.v[r * hkv * dv..(r + t) * hkv * dv]);
            d.gates.extend_from_slice(&rows.gates[r * hq * 3..(r + t) * hq * 3]);
            d.len += t;
            r += t;
        }
        rows
    }

    /// Checks `out` (the step's rows) against the reference over each history.
    fn check(&self, step: &[StepSeq], out: &[f32], what: &str) {
        let (hq, _, _, dv) = dims(&self.cfg);
        let mut r = 0;
        for e in step {
            let d = self.seqs[e.seq as usize].as_ref().unwrap();
            let t = e.tokens as usize;
            let inp = RefInputs { cfg: &self.cfg, q: &d.q, k: &d.k, v: &d.v, gates: &d.gates, phi_k: &[], phi_v: &[], selection: None };
            let want = prefill_last(&inp, t).out;
            let got = &out[r * hq * dv..(r + t) * hq * dv];
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 2e-4 * (1.0 + w.abs()), "{what}: seq {} output {i}: engine {g}, reference {w}", e.seq);
            }
            r += t;
        }
    }
}

/// Runs `layer` of the planned step with the step's rows.
fn run(cpu: &mut CpuBackend, cache: &Cache, layer: u32, rows: &SeqData) -> Result<Vec<f32>, NsaError> {
    let (hq, _, _, dv) = dims(cache.config());
    let mut out = vec![f32::NAN; rows.len * hq * dv];
    let io = LayerIo { q: &rows.q, k: &rows.k, v: &rows.v, gates: &rows.gates, out: &mut out, selected: None };
    cpu.run_layer(cache, layer, io, PhiWeights::default())?;
    Ok(out)
}

/// Plans `step`, runs every layer, checks every layer's output against the reference.
fn full_step(cpu: &mut CpuBackend, cache: &mut Cache, h: &mut Hist, step: &[StepSeq], what: &str) {
    cache.plan_step(step).unwrap();
    let rows = h.grow(step);
    for layer in 0..cache.config().num_layers {
        let out = run(cpu, cache, layer, &rows).unwrap();
        h.check(step, &out, &format!("{what}, layer {layer}"));
    }
    cache.check().unwrap();
}

/// A cache, a CPU backend over pools filled with 0x5A bytes, and the histories.
macro_rules! engine {
    ($c:expr => $eng:ident, $cache:ident, $cpu:ident, $h:ident) => {
        let mut $eng = Engine::new(&$c);
        $eng.pool.bytes().fill(0x5A);
        #[allow(unused_mut)]
        let mut $cache = Cache::new(&$c, $eng.arena.bytes()).unwrap();
        let mut $cpu = CpuBackend::new(&$c, $eng.pool.bytes()).unwrap();
        let mut $h = Hist::new(&$c);
    };
}

/// Forks `src` into `dst` in the cache and the histories.
fn fork(cache: &mut Cache, h: &mut Hist, src: u32, dst: u32) {
    cache.fork(src, dst).unwrap();
    h.fork(src, dst);
}

/// Random rows for `step` (drawn as `Hist::grow` would, the histories left as they are).
fn rows_for(h: &Hist, step: &[StepSeq]) -> SeqData {
    let mut scratch = Hist { cfg: h.cfg, seqs: h.seqs.clone(), rng: Rng::new(h.seqs.len() as u64 + 99) };
    scratch.grow(step)
}

fn s(seq: u32, tokens: u32) -> StepSeq {
    StepSeq { seq, tokens }
}

fn step_open(e: NsaError, needles: &[&str]) {
    let msg = e.to_string();
    assert!(matches!(e, NsaError::StepOpen { .. }), "want StepOpen, got {msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} should mention {n:?}");
    }
}

/// Item 1: fork, plan a token for the child (copy-on-write of the shared partial page),
/// then try to end the step without running its layers, as a speculative-decoding
/// rollback would. Refused; abort_step restores every byte, and the child's shared
/// prefix reads the right rows afterwards.
#[test]
fn abandoned_step_after_fork_is_refused_and_abort_restores_the_shared_prefix() {
    let c = cfg(1);
    engine!(c => eng, cache, cpu, h);
    cache.add_sequence(0).unwrap();
    h.add(0);
    full_step(&mut cpu, &mut cache, &mut h, &[s(0, 40)], "prefill");
    fork(&mut cache, &mut h, 0, 1);
    let before = cache.bookkeeping();
    let stats = cache.stats();
    cache.plan_step(&[s(1, 1)]).unwrap();
    assert_eq!(cache.stats().raw_free, stats.raw_free - 1, "the plan takes the child's copy of the shared page");
    step_open(cache.truncate(1, 40).unwrap_err(), &["step 2 is still open", "layer 0 of 0..1 has not run", "40..41 of sequence 1"]);
    step_open(cache.remove(1).unwrap_err(), &["step 2"]);
    step_open(cache.add_sequence(2).unwrap_err(), &["step 2"]);
    step_open(cache.fork(1, 2).unwrap_err(), &["step 2"]);
    step_open(cache.plan_step(&[s(0, 1)]).unwrap_err(), &["step 2"]);
    step_open(cache.check().unwrap_err(), &["positions 40..41 of sequence 1 are counted but not written"]);
    cache.check_invariants().unwrap();
    cache.abort_step().unwrap();
    assert_eq!(cache.bookkeeping(), before, "abort_step must restore the bookkeeping exactly");
    assert_eq!((cache.len(1).unwrap(), cache.stats()), (40, stats));
    assert!(matches!(cache.abort_step(), Err(NsaError::NoStep)), "nothing left to abort");
    cache.check().unwrap();
    // The rollback the issue describes, now legal, then decoding both sequences on.
    cache.truncate(1, 39).unwrap();
    h.truncate(1, 39);
    for i in 0..30 {
        full_step(&mut cpu, &mut cache, &mut h, &[s(0, 1), s(1, 1)], &format!("decode {i}"));
    }
}

/// Abort after some or all layers ran, with copies in both pools and new pages, restores
/// the bookkeeping byte for byte; the next steps read the right rows.
#[test]
fn abort_restores_the_bookkeeping_exactly_whatever_ran() {
    let c = cfg(3);
    engine!(c => eng, cache, cpu, h);
    cache.add_sequence(0).unwrap();
    h.add(0);
    full_step(&mut cpu, &mut cache, &mut h, &[s(0, 70)], "prefill");
    fork(&mut cache, &mut h, 0, 1);
    fork(&mut cache, &mut h, 0, 2);
    for ran in [0u32, 1, 3] {
        let before = cache.bookkeeping();
        // Seq 1 and 2 copy the shared raw page and (70 -> 130 crosses compressed tokens)
        // the shared compressed page; seq 2 takes a new raw page too.
        let step = [s(1, 3), s(2, 60), s(0, 1)];
        cache.plan_step(&step).unwrap();
        let rows = rows_for(&h, &step);
        for layer in (0..ran).rev() {
            run(&mut cpu, &cache, layer, &rows).unwrap();
        }
        assert_eq!(cache.layers_run(), ran);
        assert!(cache.bookkeeping() != before);
        cache.abort_step().unwrap();
        assert_eq!(cache.bookkeeping(), before, "ran {ran}");
        cache.check().unwrap();
    }
    for i in 0..3 {
        full_step(&mut cpu, &mut cache, &mut h, &[s(1, 3), s(2, 60), s(0, 1)], &format!("after aborts {i}"));
    }
}

/// Every holder of a shared partial page appends in one step (the fuzzer's case: the
/// last holder used to append in place after the others copied away): after an abort
/// the page is back with its holders, unwritten, and the longer sequence reads its own
/// rows.
#[test]
fn abort_after_every_holder_appended_to_a_shared_page() {
    let c = cfg(1);
    engine!(c => eng, cache, cpu, h);
    cache.add_sequence(1).unwrap();
    h.add(1);
    full_step(&mut cpu, &mut cache, &mut h, &[s(1, 24)], "prefill");
    fork(&mut cache, &mut h, 1, 2);
    cache.truncate(2, 12).unwrap();
    h.truncate(2, 12);
    let before = cache.bookkeeping();
    let step = [s(1, 33), s(2, 7)];
    cache.plan_step(&step).unwrap();
    assert_eq!(cache.step().unwrap().copies.len(), 2, "both holders of the shared page copy it");
    let rows = rows_for(&h, &step);
    run(&mut cpu, &cache, 0, &rows).unwrap();
    cache.abort_step().unwrap();
    assert_eq!(cache.bookkeeping(), before);
    for i in 0..3 {
        full_step(&mut cpu, &mut cache, &mut h, &[s(1, 16), s(2, 1)], &format!("after abort {i}"));
    }
}

/// Item 2: a skipped layer, planning twice, and a layer run twice are refused.
#[test]
fn skipped_and_repeated_layers_are_refused() {
    let c = cfg(2);
    engine!(c => eng, cache, cpu, h);
    cache.add_sequence(0).unwrap();
    h.add(0);
    full_step(&mut cpu, &mut cache, &mut h, &[s(0, 4)], "prefill");
    // Planning twice without running layers would extend over unwritten positions.
    cache.plan_step(&[s(0, 1)]).unwrap();
    let rows = h.grow(&[s(0, 1)]);
    step_open(cache.plan_step(&[s(0, 1)]).unwrap_err(), &["step 2 is still open", "layers 0, 1 of 0..2 have not run", "4..5 of sequence 0"]);
    assert_eq!(cache.len(0).unwrap(), 5);
    // Only layer 1, then planning the next step: refused, naming layer 0.
    run(&mut cpu, &cache, 1, &rows).unwrap();
    step_open(cache.plan_step(&[s(0, 1)]).unwrap_err(), &["layer 0 of 0..2 has not run"]);
    // Layer 1 again: refused, nothing written.
    let e = run(&mut cpu, &cache, 1, &rows).unwrap_err();
    assert!(matches!(e, NsaError::LayerAlreadyRun { layer: 1, step: 2 }), "{e}");
    let out = run(&mut cpu, &cache, 0, &rows).unwrap();
    h.check(&[s(0, 1)], &out, "layer 0 last");
    assert!(matches!(run(&mut cpu, &cache, 0, &rows), Err(NsaError::LayerAlreadyRun { layer: 0, .. })));
    cache.check().unwrap();
    for i in 0..20 {
        full_step(&mut cpu, &mut cache, &mut h, &[s(0, 1 + i % 3)], &format!("step {i}"));
    }
}

/// Item 3: a backend serves one cache; a second cache of the same config is refused.
#[test]
fn a_backend_refuses_a_second_cache() {
    let c = cfg(1);
    engine!(c => eng, cache, cpu, h);
    let mut arena2 = Buf::new(Cache::arena_bytes(&c).unwrap());
    let mut cache2 = Cache::new(&c, arena2.bytes()).unwrap();
    for ca in [&mut cache, &mut cache2] {
        ca.add_sequence(0).unwrap();
    }
    h.add(0);
    full_step(&mut cpu, &mut cache, &mut h, &[s(0, 50)], "cache 1");
    cache2.plan_step(&[s(0, 50)]).unwrap();
    let rows = SeqData::random::<f32>(&c, 50, &mut Rng::new(3));
    let e = run(&mut cpu, &cache2, 0, &rows).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&format!("cache #{}", cache2.id())) && msg.contains(&format!("serves cache #{}", cache.id())), "{msg}");
    assert_eq!(cache2.layers_run(), 0, "the refused run claimed nothing");
    for i in 0..5 {
        full_step(&mut cpu, &mut cache, &mut h, &[s(0, 1)], &format!("cache 1 after {i}"));
    }
}

/// Item 4: sel_init + sel_local is computed without wrapping.
#[test]
fn forced_block_counts_do_not_wrap() {
    for (init, local) in [(u32::MAX, 2), (2, u32::MAX), (u32::MAX, u32::MAX)] {
        let mut c = cfg(1);
        c.sel_init = init;
        c.sel_local = local;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("sel_count") && msg.contains("sel_init + sel_local"), "{msg}");
    }
    // phi = mlp weights of HKV * (l * D * hidden + ...) elements: 2^65 here, which wraps
    // in 64 bits unless computed with checked arithmetic.
    let mut c = cfg(1).with_shape(1024, 1024, 512, 512);
    c.phi = nsa::Phi::Mlp;
    c.phi_hidden = 65536;
    c.cmp_block = 1 << 30;
    c.sel_block = 1 << 30;
    c.page_size = 1 << 30;
    let msg = c.validate().unwrap_err().to_string();
    assert!(msg.contains("head_dim_qk") && msg.contains("overflow"), "{msg}");
}
