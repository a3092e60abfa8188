//! The non-finite policy on the CPU (issue 13, item 5): a NaN or infinity in q, k, v or
//! the gates reaches exactly the outputs the brute-force reference says it reaches, as
//! NaN or infinity, never as zeros; every other output still matches the reference.
//! Cases and check: `common/non_finite.rs` (shared with the GPU test).

mod common;
use common::non_finite::{cfg, check, data, schedules, wide_cfg, Spot, CASES, WIDE_CASES, WIDE_HKV};
use common::*;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::elem::Elem;
use nsa::{Cache, Config, Dtype, StepSeq};

/// Runs the whole sequence through the CPU engine in `chunks`; its outputs as f32.
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

fn case<T: Elem>(dtype: Dtype, spot: Spot, pos: usize, bad: f32) {
    let c = cfg(dtype);
    let d = data::<T>(&c, spot, pos, bad);
    let tol = if dtype == Dtype::F32 { 2e-4 } else { 3e-2 };
    for chunks in schedules() {
        let got = engine::<T>(&c, &d, &chunks);
        check(&c, &d, &got, tol, &format!("cpu {} {spot:?} = {bad} at {pos}, {} chunks", dtype.name(), chunks.len()));
    }
}

#[test]
fn nan_and_inf_reach_exactly_the_outputs_the_reference_says() {
    for (spot, pos, bad) in CASES {
        case::<f32>(Dtype::F32, spot, pos, bad);
    }
}

#[test]
fn half_precision_storage_propagates_the_same_way() {
    case::<half::bf16>(Dtype::Bf16, Spot::Q, 5, f32::NAN);
    case::<half::bf16>(Dtype::Bf16, Spot::K, 70, f32::NAN);
    case::<half::f16>(Dtype::F16, Spot::V, 30, f32::NAN);
    case::<half::f16>(Dtype::F16, Spot::Q, 100, f32::INFINITY);
}

/// The shapes the GPU's tensor-core test uses (tests/gpu_lifecycle.rs): head dims 128, bf16,
/// G = 16, 8, 4, one 120-token step and token by token: the CPU engine's blocked kernels
/// also share K/V rows among positions.
#[test]
fn the_tensor_core_test_shapes_on_the_cpu() {
    for hkv in WIDE_HKV {
        let c = wide_cfg(hkv);
        for (spot, pos, bad) in WIDE_CASES {
            let d = data::<half::bf16>(&c, spot, pos, bad);
            for chunks in common::non_finite::wide_schedules() {
                let got = engine::<half::bf16>(&c, &d, &chunks);
                check(&c, &d, &got, 3e-2, &format!("cpu bf16 G = {} {spot:?} = {bad} at {pos}, {} chunks", 16 / hkv, chunks.len()));
            }
        }
    }
}
