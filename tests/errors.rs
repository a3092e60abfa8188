//! Every error path of the Rust API: the error names what was wrong, and the cache arena,
//! the K/V pools and the caller's output are byte for byte what they were before.

mod common;
use common::*;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::{Cache, Config, Dtype, NsaError, Phi, Preset, StepSeq};

fn cfg() -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(4, 2, 16, 8);
    c.dtype = Dtype::F32;
    c.max_seqs = 4;
    c.max_step_seqs = 3;
    c.max_seq_len = 256;
    c.max_step_tokens = 200;
    c.num_pages = 5;
    c.num_cmp_pages = 1;
    c
}

/// Asserts `r` failed with a message containing every `needle`.
fn fails<T: std::fmt::Debug>(r: Result<T, NsaError>, needles: &[&str]) -> NsaError {
    let e = r.expect_err("call should fail");
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} should mention {n:?}");
    }
    e
}

#[test]
fn buffers_too_small_or_misaligned_are_refused() {
    let c = cfg();
    let need = Cache::arena_bytes(&c).unwrap();
    let mut b = Buf::new(need + 16);
    fails(Cache::new(&c, &mut b.bytes()[..need - 1]), &["arena", &need.to_string(), &(need - 1).to_string()]);
    fails(Cache::new(&c, &mut b.bytes()[1..need + 1]), &["arena", "aligned to 16"]);
    let need = CpuBackend::buffer_bytes(&c).unwrap();
    let mut p = Buf::new(need + 16);
    assert!(matches!(CpuBackend::new(&c, &mut p.bytes()[..need - 4]), Err(NsaError::BufferTooSmall { .. })));
    assert!(matches!(CpuBackend::new(&c, &mut p.bytes()[8..need + 8]), Err(NsaError::Misaligned { .. })));
    let mut bad = c;
    bad.cmp_stride = 5;
    fails(Cache::arena_bytes(&bad), &["cmp_stride", "5"]);
}

#[test]
fn sequence_operations_reject_bad_arguments_and_change_nothing() {
    let c = cfg();
    let mut eng = Engine::new(&c);
    let mut cache = Cache::new(&c, eng.arena.bytes()).unwrap();
    let mut cpu = CpuBackend::new(&c, eng.pool.bytes()).unwrap();
    cache.add_sequence(0).unwrap();
    cache.plan_step(&[StepSeq { seq: 0, tokens: 70 }]).unwrap();
    let (kz, vz) = (vec![0f32; 70 * 2 * 16], vec![0f32; 70 * 2 * 8]);
    cpu.append_layer(&cache, 0, &kz, &vz, PhiWeights::default()).unwrap();
    let snap = cache.state_bytes().to_vec();
    let same = |cache: &Cache| assert!(cache.state_bytes() == &snap[..], "state changed");

    fails(cache.add_sequence(0), &["sequence 0 already exists"]);
    same(&cache);
    fails(cache.add_sequence(4), &["seq", "4", "0..4"]);
    same(&cache);
    fails(cache.fork(1, 2), &["unknown sequence", "1"]);
    same(&cache);
    fails(cache.fork(0, 0), &["already exists"]);
    same(&cache);
    fails(cache.fork(0, 9), &["dst", "9"]);
    same(&cache);
    fails(cache.truncate(0, 71), &["new_len", "71", "70"]);
    same(&cache);
    fails(cache.truncate(3, 0), &["unknown sequence", "3"]);
    same(&cache);
    fails(cache.remove(2), &["unknown sequence", "2"]);
    same(&cache);
    fails(cache.len(7), &["seq", "7"]);

    // Step planning.
    cache.add_sequence(1).unwrap();
    let snap = cache.state_bytes().to_vec();
    let same = |cache: &Cache| assert!(cache.state_bytes() == &snap[..], "state changed");
    let s = |seq, tokens| StepSeq { seq, tokens };
    let cases: Vec<(Vec<StepSeq>, &[&str])> = vec![
        (vec![], &["entries.len", "0"]),
        (vec![s(0, 1), s(1, 1), s(0, 1), s(1, 1)], &["entries.len", "4", "max_step_seqs"]),
        (vec![s(2, 1)], &["unknown sequence", "2"]),
        (vec![s(5, 1)], &["entries[].seq", "5"]),
        (vec![s(0, 1), s(0, 2)], &["listed twice"]),
        (vec![s(1, 0)], &["tokens", "appends no token"]),
        (vec![s(0, 190)], &["length 260", "max_seq_len = 256"]),
        (vec![s(0, 120), s(1, 120)], &["240", "max_step_tokens = 200"]),
        // Seq 0's 70 tokens hold 2 of the 5 raw pages and the only compressed page.
        (vec![s(1, 193)], &["out of raw pages", "needs 4", "3 are free"]),
        (vec![s(1, 40)], &["out of compressed pages", "needs 1", "0 are free"]),
    ];
    for (entries, needles) in cases {
        fails(cache.plan_step(&entries), needles);
        same(&cache);
    }
}

#[test]
fn layer_runs_reject_bad_arguments_and_touch_nothing() {
    let mut c = cfg();
    c.phi = Phi::Weighted;
    let (hq, hkv, dk, dv) = dims(&c);
    let mut eng = Engine::new(&c);
    let pool_ptr = eng.pool.bytes().as_ptr();
    let pool_len = eng.pool.bytes().len();
    let mut cache = Cache::new(&c, eng.arena.bytes()).unwrap();
    let mut cpu = CpuBackend::new(&c, eng.pool.bytes()).unwrap();
    cache.add_sequence(0).unwrap();
    let mut rng = Rng::new(9);
    let t = 5usize;
    let (q, k, v) = (rng.vec(t * hq * dk, 1.0), rng.vec(t * hkv * dk, 1.0), rng.vec(t * hkv * dv, 1.0));
    let g = vec![0.5f32; t * hq * 3];
    let wk = vec![0.1f32; c.phi_weight_len(c.head_dim_qk)];
    let wv = vec![0.1f32; c.phi_weight_len(c.head_dim_v)];
    let w = PhiWeights { k: &wk, v: &wv };
    let mut out = vec![7.0f32; t * hq * dv];
    let mut sel = vec![7i32; t * hkv * c.sel_count as usize];

    // No step planned yet.
    fails(cpu.run_layer(&cache, 0, LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out, selected: None }, w), &["no step is planned"]);
    cache.plan_step(&[StepSeq { seq: 0, tokens: t as u32 }]).unwrap();

    // SAFETY (test only): read the pools through the pointer the backend also holds,
    // while no call runs, to prove failing calls wrote nothing there.
    let pools = || unsafe { std::slice::from_raw_parts(pool_ptr, pool_len).to_vec() };
    let arena = cache.state_bytes().to_vec();
    let before = pools();
    macro_rules! bad {
        ($io:expr, $w:expr, $layer:expr, $needles:expr) => {{
            fails(cpu.run_layer(&cache, $layer, $io, $w), $needles);
            assert!(cache.state_bytes() == &arena[..]);
            assert!(pools() == before, "pools changed");
            assert!(out.iter().all(|&x| x == 7.0) && sel.iter().all(|&x| x == 7), "outputs written");
        }};
    }
    bad!(LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out, selected: Some(&mut sel) }, w, 1, &["layer", "1", "0..1"]);
    bad!(LayerIo { q: &q[1..], k: &k, v: &v, gates: &g, out: &mut out, selected: Some(&mut sel) }, w, 0, &["q", "tokens*HQ*DK"]);
    bad!(LayerIo { q: &q, k: &k[..8], v: &v, gates: &g, out: &mut out, selected: Some(&mut sel) }, w, 0, &["k", "8 elements"]);
    bad!(LayerIo { q: &q, k: &k, v: &v[1..], gates: &g, out: &mut out, selected: Some(&mut sel) }, w, 0, &["v"]);
    bad!(LayerIo { q: &q, k: &k, v: &v, gates: &g[3..], out: &mut out, selected: Some(&mut sel) }, w, 0, &["gates"]);
    bad!(LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out[1..], selected: Some(&mut sel) }, w, 0, &["out"]);
    bad!(LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out, selected: Some(&mut sel[1..]) }, w, 0, &["selected"]);
    bad!(LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out, selected: Some(&mut sel) }, PhiWeights { k: &wk[1..], v: &wv }, 0, &["phi_weights.k"]);
    bad!(LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out, selected: Some(&mut sel) }, PhiWeights { k: &wk, v: &[] }, 0, &["phi_weights.v"]);
    {
        let qb: Vec<half::bf16> = q.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let kb: Vec<half::bf16> = k.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let vb: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let mut ob = vec![half::bf16::ZERO; out.len()];
        fails(cpu.run_layer(&cache, 0, LayerIo { q: &qb, k: &kb, v: &vb, gates: &g, out: &mut ob, selected: None }, w), &["bf16", "f32"]);
        assert!(pools() == before);
    }

    // A successful run, then a fork ends the step: layers can no longer run against it.
    cpu.run_layer(&cache, 0, LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out, selected: Some(&mut sel) }, w).unwrap();
    assert!(out.iter().all(|x| x.is_finite() && *x != 7.0));
    cache.fork(0, 1).unwrap();
    fails(cpu.run_layer(&cache, 0, LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out, selected: None }, w), &["no step is planned"]);

    // A backend made for another config refuses the cache.
    let mut other = c;
    other.window = 17;
    let mut eng2 = Engine::new(&other);
    let mut cpu2 = CpuBackend::new(&other, eng2.pool.bytes()).unwrap();
    cache.plan_step(&[StepSeq { seq: 0, tokens: t as u32 }]).unwrap();
    fails(cpu2.run_layer(&cache, 0, LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out, selected: None }, w), &["different config"]);
}
