//! The non-finite policy (issue 13, item 5): a NaN or infinity in q, k, v or the gates
//! reaches exactly the outputs the brute-force reference says it reaches, as NaN or
//! infinity, never as zeros; every other output still matches the reference.

mod common;
use common::*;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::elem::Elem;
use nsa::reference::{prefill, RefInputs};
use nsa::{Cache, Config, Dtype, Preset, StepSeq};

fn cfg(dtype: Dtype) -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(4, 2, 16, 8).with_capacity(1, 256);
    c.dtype = dtype;
    c.window = 24;
    c.sel_count = 4;
    c.cpu_threads = 2;
    c
}

/// Which input gets the bad value.
#[derive(Debug, Clone, Copy)]
enum Spot {
    Q,
    K,
    V,
    Gate,
}

/// Runs the whole sequence through the engine in `chunks`, returns its outputs (f32).
fn engine<T: Elem>(c: &Config, d: &SeqData, chunks: &[usize]) -> Vec<f32> {
    let (hq, hkv, dk, dv) = dims(c);
    let mut eng = Engine::new(c);
    let mut cache = Cache::new(c, eng.arena.bytes()).unwrap();
    let mut cpu = CpuBackend::new(c, eng.pool.bytes()).unwrap();
    cache.add_sequence(0).unwrap();
    let mut out_all = Vec::new();
    let mut p0 = 0;
    for &t in chunks {
        cache.plan_step(&[StepSeq { seq: 0, tokens: t as u32 }]).unwrap();
        let cv = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
        let (q, k, v) = (cv(&d.q[p0 * hq * dk..(p0 + t) * hq * dk]), cv(&d.k[p0 * hkv * dk..(p0 + t) * hkv * dk]), cv(&d.v[p0 * hkv * dv..(p0 + t) * hkv * dv]));
        let mut out = vec![T::from_f32(0.0); t * hq * dv];
        let io = LayerIo { q: &q, k: &k, v: &v, gates: &d.gates[p0 * hq * 3..(p0 + t) * hq * 3], out: &mut out, selected: None };
        cpu.run_layer(&cache, 0, io, PhiWeights::default()).unwrap();
        out_all.extend(out.iter().map(|x| x.to_f32()));
        p0 += t;
    }
    out_all
}

fn check<T: Elem>(dtype: Dtype, spot: Spot, pos: usize, bad: f32) -> (usize, usize) {
    let c = cfg(dtype);
    let (hq, hkv, dk, dv) = dims(&c);
    let len = 120;
    let mut d = SeqData::random::<T>(&c, len, &mut Rng::new(5 + pos as u64));
    match spot {
        Spot::Q => d.q[(pos * hq + 1) * dk + 3] = bad,
        Spot::K => d.k[(pos * hkv + 1) * dk + 2] = bad,
        Spot::V => d.v[(pos * hkv) * dv + 5] = bad,
        Spot::Gate => d.gates[(pos * hq + 2) * 3 + 1] = bad,
    }
    let inp = RefInputs { cfg: &c, q: &d.q, k: &d.k, v: &d.v, gates: &d.gates, phi_k: &[], phi_v: &[], selection: None };
    let want = prefill(&inp).out;
    let what = format!("{} {spot:?} = {bad} at {pos}", dtype.name());
    let tol = if dtype == Dtype::F32 { 2e-4 } else { 3e-2 };
    let (mut nonfinite, mut finite) = (0, 0);
    for chunks in [vec![len], vec![37, 1, 1, 50, 31], vec![1; len]] {
        let got = engine::<T>(&c, &d, &chunks);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let (t, h, e) = (i / (hq * dv), i / dv % hq, i % dv);
            let at = format!("{what}, chunks {}: token {t} head {h} elem {e}: engine {g}, reference {w}", chunks.len());
            assert_eq!(g.is_nan(), w.is_nan(), "{at}");
            assert_eq!(g.is_finite(), w.is_finite(), "{at}");
            if w.is_finite() {
                assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{at}");
                finite += 1;
            } else {
                if w.is_infinite() {
                    assert_eq!(g, w, "{at}");
                }
                nonfinite += 1;
            }
        }
    }
    assert!(nonfinite > 0, "{what}: the bad value reached no output (the test checks nothing)");
    (nonfinite, finite)
}

/// The cases: a NaN or infinite query before the first compressed token (was an
/// output of exactly 0), and after it; one NaN key (zeroed later tokens' window output).
#[test]
fn nan_and_inf_reach_exactly_the_outputs_the_reference_says() {
    for (spot, pos, bad) in [
        (Spot::Q, 5, f32::NAN),
        (Spot::Q, 5, f32::INFINITY),
        (Spot::Q, 80, f32::NAN),
        (Spot::Q, 80, f32::NEG_INFINITY),
        (Spot::K, 10, f32::NAN),
        (Spot::K, 70, f32::NAN),
        (Spot::K, 70, f32::INFINITY),
        (Spot::V, 3, f32::NAN),
        (Spot::V, 90, f32::INFINITY),
        (Spot::Gate, 40, f32::NAN),
        (Spot::Gate, 2, f32::INFINITY),
    ] {
        let (bad_outs, good_outs) = check::<f32>(Dtype::F32, spot, pos, bad);
        assert!(good_outs > 0, "{spot:?} at {pos}: every output non-finite ({bad_outs})");
    }
}

#[test]
fn half_precision_storage_propagates_the_same_way() {
    check::<half::bf16>(Dtype::Bf16, Spot::Q, 5, f32::NAN);
    check::<half::bf16>(Dtype::Bf16, Spot::K, 70, f32::NAN);
    check::<half::f16>(Dtype::F16, Spot::V, 30, f32::NAN);
    check::<half::f16>(Dtype::F16, Spot::Q, 100, f32::INFINITY);
}
