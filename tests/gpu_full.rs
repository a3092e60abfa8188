//! CUDA engine vs CPU engine: append-only layer runs (`run_layer` with `q = out = 0`) and
//! the full-attention baseline (`CudaBackend::attend_full`). GPU machine; skips without a
//! device. `NSA_GPU_TEST_SMALL=1` shrinks every size (for compute-sanitizer).
#![cfg(feature = "cuda")]

mod common;
mod gpu_harness;

use gpu_harness::*;
use half::{bf16, f16};
use nsa::elem::Elem;
use nsa::{Config, Dtype, Phi, Preset};

/// Chunked prefill entries: every sequence gets `prompt` tokens in chunks of `chunk`.
fn prefill_steps(seqs: u32, prompt: &[u32], chunk: u32, budget: u32) -> Vec<Vec<(u32, u32)>> {
    let mut done = vec![0u32; seqs as usize];
    let mut steps = vec![];
    loop {
        let mut e = vec![];
        let mut used = 0;
        for s in 0..seqs as usize {
            let want = (prompt[s] - done[s]).min(chunk).min(budget - used);
            if want > 0 {
                e.push((s as u32, want));
                done[s] += want;
                used += want;
            }
        }
        if e.is_empty() {
            return steps;
        }
        steps.push(e);
    }
}

/// Two harnesses on the same seed: A fills its cache with append-only runs, B with full
/// `run_layer` prefill; both then fork and extend one sequence the same way, and decode.
/// Every decode output of A must equal B's bit for bit (same pools, same inputs), and
/// both match their CPU engines (A's CPU engine filled by `append_layer`).
fn append_then_decode<T: Elem>(name: &str, cfg: &Config, seed: u64, prompt: &[u32], decode_steps: u32) {
    let seqs = prompt.len() as u32;
    let mut a = Harness::<T>::new(&format!("{name}_append_only"), cfg, seed);
    let mut b = Harness::<T>::new(&format!("{name}_run_layer"), cfg, seed);
    for s in 0..seqs {
        a.add(s);
        b.add(s);
    }
    for e in prefill_steps(seqs, prompt, 1000, cfg.max_step_tokens) {
        a.append_step(&e);
        b.step(&e);
    }
    // A fork extended by a multi-token step (copy-on-write of its shared last page).
    let fork = seqs;
    a.cache.fork(0, fork).unwrap();
    b.cache.fork(0, fork).unwrap();
    a.append_step(&[(fork, 37)]);
    b.step(&[(fork, 37)]);
    a.record = Some(vec![]);
    b.record = Some(vec![]);
    for _ in 0..decode_steps {
        let e: Vec<(u32, u32)> = (0..=seqs).map(|s| (s, 1)).collect();
        a.step(&e);
        b.step(&e);
    }
    let (ra, rb) = (a.record.take().unwrap(), b.record.take().unwrap());
    assert_eq!(ra.len(), rb.len());
    for (i, (x, y)) in ra.iter().zip(&rb).enumerate() {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{name}: decode layer run {i}: the append-only-filled cache gives other outputs than the run_layer-filled one");
    }
    println!("RESULT {name}: {} decode layer runs equal bit for bit after append-only vs run_layer fills", ra.len());
    a.finish();
    b.finish();
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn append_only_then_decode_paper_g16_bf16() {
    if device_or_skip("append_only_then_decode_paper_g16_bf16").is_none() {
        return;
    }
    let mut cfg = cfg_for(Preset::Paper, 32, 2, 192, 128, Dtype::Bf16, 4, 4096, 2048);
    cfg.num_layers = 2;
    append_then_decode::<bf16>("append_only_then_decode_paper_g16_bf16", &cfg, 51, &[sz(2900, 300), sz(1300, 150), 77], sz(8, 3));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn append_only_then_decode_phi_mlp_f32() {
    if device_or_skip("append_only_then_decode_phi_mlp_f32").is_none() {
        return;
    }
    let mut cfg = cfg_for(Preset::Paper, 4, 2, 32, 16, Dtype::F32, 3, 1500, 1024);
    cfg.phi = Phi::Mlp;
    cfg.phi_hidden = 24;
    cfg.phi_pe = true;
    append_then_decode::<f32>("append_only_then_decode_phi_mlp_f32", &cfg, 52, &[sz(1200, 200), 65], sz(6, 2));
}

/// Chunked prefill then decodes, every step checking `attend_full` against the CPU's.
fn full_case<T: Elem>(name: &str, cfg: &Config, seed: u64, prompt: &[u32], chunk: u32, decode_steps: u32) {
    let seqs = prompt.len() as u32;
    let mut h = Harness::<T>::new(name, cfg, seed);
    for s in 0..seqs {
        h.add(s);
    }
    for e in prefill_steps(seqs, prompt, chunk, cfg.max_step_tokens) {
        h.full_step(&e);
    }
    for _ in 0..decode_steps {
        let e: Vec<(u32, u32)> = (0..seqs).map(|s| (s, 1)).collect();
        h.full_step(&e);
    }
    let st = h.stats.clone();
    println!(
        "RESULT {name}: full attention dtype={} G={} DK={} DV={} tensor_cores={} steps={} rows={} max_rel_err={:.2e}",
        cfg.dtype.name(),
        cfg.group_size(),
        cfg.head_dim_qk,
        cfg.head_dim_v,
        h.gpu.uses_tensor_cores(),
        st.steps,
        st.rows,
        st.max_err
    );
    h.finish();
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn full_attention_paper_g16_dk192_dv128_bf16() {
    if device_or_skip("full_attention_paper_g16_dk192_dv128_bf16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Paper, 32, 2, 192, 128, Dtype::Bf16, 3, 4096, 2048);
    full_case::<bf16>("full_attention_paper_g16_dk192_dv128_bf16", &cfg, 61, &[sz(3000, 300), sz(700, 90), 5], 800, sz(6, 2));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn full_attention_fla_g5_dk48_dv80_f16() {
    if device_or_skip("full_attention_fla_g5_dk48_dv80_f16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Fla, 10, 2, 48, 80, Dtype::F16, 2, 3000, 1024);
    full_case::<f16>("full_attention_fla_g5_dk48_dv80_f16", &cfg, 62, &[sz(2500, 200), 33], 600, sz(5, 2));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn full_attention_g24_dk256_dv256_bf16() {
    if device_or_skip("full_attention_g24_dk256_dv256_bf16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Fla, 48, 2, 256, 256, Dtype::Bf16, 2, 2048, 1024);
    full_case::<bf16>("full_attention_g24_dk256_dv256_bf16", &cfg, 63, &[sz(1500, 150)], 500, sz(4, 2));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn full_attention_g3_dk40_dv24_f32() {
    if device_or_skip("full_attention_g3_dk40_dv24_f32").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Paper, 6, 2, 40, 24, Dtype::F32, 2, 3000, 1024);
    full_case::<f32>("full_attention_g3_dk40_dv24_f32", &cfg, 64, &[sz(2000, 200), 9], 500, sz(5, 2));
}

/// A long context filled with append-only runs, then decodes checked against the CPU's
/// full attention (many splits per KV head at batch 1).
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn full_attention_long_context_after_append_only_bf16() {
    let name = "full_attention_long_context_after_append_only_bf16";
    if device_or_skip(name).is_none() {
        return;
    }
    let len = sz(40000, 3000);
    let cfg = cfg_for(Preset::Paper, 8, 2, 64, 64, Dtype::Bf16, 1, len + 16, 8192);
    let mut h = Harness::<bf16>::new(name, &cfg, 65);
    h.add(0);
    for e in prefill_steps(1, &[len], 8192, cfg.max_step_tokens) {
        h.append_step(&e);
    }
    for _ in 0..sz(3, 2) {
        h.full_step(&[(0, 1)]);
    }
    println!("RESULT {name}: context {} max_rel_err={:.2e}", len + sz(3, 2), h.stats.max_err);
    h.finish();
}
