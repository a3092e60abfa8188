//! CUDA engine vs CPU engine, decode-heavy schedules (GPU machine; skips without a
//! device). Both presets, several group sizes, DK/DV and dtypes, contexts up to 128k
//! tokens, batches up to 64, forks and truncations in between. `NSA_GPU_TEST_SMALL=1`
//! shrinks every size (for compute-sanitizer).
#![cfg(feature = "cuda")]

mod common;
mod gpu_harness;

use gpu_harness::*;
use half::{bf16, f16};
use nsa::{Dtype, Phi, Preset};

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_paper_g16_dk192_dv128_bf16() {
    if device_or_skip("decode_paper_g16_dk192_dv128_bf16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Paper, 32, 2, 192, 128, Dtype::Bf16, 6, 4096, 2048);
    let pl = Plan { seqs: 4, prompt_min: 1, prompt_max: sz(2500, 300), chunk_max: 700, decode_steps: sz(24, 6), forks: true };
    scenario::<bf16>("decode_paper_g16_dk192_dv128_bf16", &cfg, 11, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_fla_g4_dk128_dv128_f16() {
    if device_or_skip("decode_fla_g4_dk128_dv128_f16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Fla, 8, 2, 128, 128, Dtype::F16, 6, 4096, 2048);
    let pl = Plan { seqs: 4, prompt_min: 1, prompt_max: sz(3000, 400), chunk_max: 900, decode_steps: sz(24, 6), forks: true };
    scenario::<f16>("decode_fla_g4_dk128_dv128_f16", &cfg, 12, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_paper_g1_dk64_dv32_bf16_two_layers() {
    if device_or_skip("decode_paper_g1_dk64_dv32_bf16_two_layers").is_none() {
        return;
    }
    let mut cfg = cfg_for(Preset::Paper, 2, 2, 64, 32, Dtype::Bf16, 5, 3000, 1024);
    cfg.num_layers = 2;
    let pl = Plan { seqs: 3, prompt_min: 1, prompt_max: sz(2000, 300), chunk_max: 500, decode_steps: sz(16, 4), forks: true };
    scenario::<bf16>("decode_paper_g1_dk64_dv32_bf16_two_layers", &cfg, 13, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_paper_g3_dk40_dv24_f32() {
    if device_or_skip("decode_paper_g3_dk40_dv24_f32").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Paper, 6, 2, 40, 24, Dtype::F32, 5, 3000, 1024);
    let pl = Plan { seqs: 3, prompt_min: 1, prompt_max: sz(2000, 300), chunk_max: 400, decode_steps: sz(16, 4), forks: true };
    scenario::<f32>("decode_paper_g3_dk40_dv24_f32", &cfg, 14, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_fla_g24_dk256_dv256_bf16_head_chunks() {
    if device_or_skip("decode_fla_g24_dk256_dv256_bf16_head_chunks").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Fla, 48, 2, 256, 256, Dtype::Bf16, 4, 2048, 1024);
    let pl = Plan { seqs: 2, prompt_min: 100, prompt_max: sz(1500, 200), chunk_max: 500, decode_steps: sz(8, 3), forks: true };
    scenario::<bf16>("decode_fla_g24_dk256_dv256_bf16_head_chunks", &cfg, 15, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_batch_64_paper_bf16() {
    if device_or_skip("decode_batch_64_paper_bf16").is_none() {
        return;
    }
    let seqs = sz(64, 8);
    let cfg = cfg_for(Preset::Paper, 8, 2, 64, 64, Dtype::Bf16, seqs + 2, 2048, 4096);
    let pl = Plan { seqs, prompt_min: 1, prompt_max: sz(1200, 200), chunk_max: 300, decode_steps: sz(12, 3), forks: true };
    scenario::<bf16>("decode_batch_64_paper_bf16", &cfg, 16, &pl);
}

/// The compressed branch's group sums at Eq. 9's other strides (kernels/attend_mma.cuh):
/// B = l' / d = 2 (l' = 32) and B = 8 (l' = 128), the paper's l and d otherwise, eight rows
/// of two KV heads a step (the waves the per-pair hand-overs take at their defaults).
fn group_sums_at(name: &str, sel_block: u32, seed: u64) {
    if device_or_skip(name).is_none() {
        return;
    }
    let mut cfg = cfg_for(Preset::Paper, 32, 2, 128, 128, Dtype::Bf16, 10, 4096, 2048);
    cfg.sel_block = sel_block;
    cfg.page_size = sel_block;
    cfg.fit_pages();
    let pl = Plan { seqs: sz(8, 4), prompt_min: 1, prompt_max: sz(3000, 400), chunk_max: 700, decode_steps: sz(16, 4), forks: true };
    scenario::<bf16>(name, &cfg, seed, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_group_sums_b2_bf16() {
    group_sums_at("decode_group_sums_b2_bf16", 32, 31);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_group_sums_b8_bf16() {
    group_sums_at("decode_group_sums_b8_bf16", 128, 32);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_long_context_128k_paper_bf16() {
    if device_or_skip("decode_long_context_128k_paper_bf16").is_none() {
        return;
    }
    let len = sz(131072, 8192);
    let cfg = cfg_for(Preset::Paper, 2, 1, 32, 32, Dtype::Bf16, 1, len + 64, 8192);
    let pl = Plan { seqs: 1, prompt_min: len, prompt_max: len, chunk_max: 8192, decode_steps: sz(8, 2), forks: false };
    scenario::<bf16>("decode_long_context_128k_paper_bf16", &cfg, 17, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_long_context_64k_fla_f16() {
    if device_or_skip("decode_long_context_64k_fla_f16").is_none() {
        return;
    }
    let len = sz(65536, 2048);
    let cfg = cfg_for(Preset::Fla, 4, 1, 64, 64, Dtype::F16, 2, len + 64, 8192);
    let pl = Plan { seqs: 1, prompt_min: len, prompt_max: len, chunk_max: 8192, decode_steps: sz(8, 2), forks: true };
    scenario::<f16>("decode_long_context_64k_fla_f16", &cfg, 18, &pl);
}

fn phi_case<T: nsa::elem::Elem>(phi: Phi, dtype: Dtype, seed: u64) {
    let name = format!("decode_phi_{}_{}", phi.name(), dtype.name());
    if device_or_skip(&name).is_none() {
        return;
    }
    let mut cfg = cfg_for(Preset::Paper, 4, 2, 32, 16, dtype, 4, 1500, 1024);
    cfg.phi = phi;
    cfg.phi_hidden = 24;
    cfg.phi_pe = phi != Phi::Weighted;
    let pl = Plan { seqs: 2, prompt_min: 1, prompt_max: sz(1000, 200), chunk_max: 300, decode_steps: sz(12, 3), forks: true };
    scenario::<T>(&name, &cfg, seed, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_phi_weighted_linear_mlp() {
    phi_case::<f32>(Phi::Weighted, Dtype::F32, 21);
    phi_case::<bf16>(Phi::Linear, Dtype::Bf16, 22);
    phi_case::<f32>(Phi::Mlp, Dtype::F32, 23);
    phi_case::<f16>(Phi::Mlp, Dtype::F16, 24);
}

/// A decode step captured once in a CUDA graph replays correctly for later steps: the
/// kernels read lengths, positions and page tables from the uploaded plan, and grid shapes
/// depend only on the batch. 40 replays cross compressed-token and page boundaries.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_step_replays_from_a_cuda_graph() {
    use cudarc::driver::sys;
    if device_or_skip("decode_step_replays_from_a_cuda_graph").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Paper, 16, 2, 128, 64, Dtype::Bf16, 4, 4096, 2048);
    let mut h = Harness::<bf16>::new("decode_step_replays_from_a_cuda_graph", &cfg, 41);
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: plain driver calls on device 0's primary context, made current on this thread.
    unsafe {
        let mut dev = 0;
        let mut ctx = std::ptr::null_mut();
        assert_eq!(sys::cuDeviceGet(&mut dev, 0), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(sys::cuDevicePrimaryCtxRetain(&mut ctx, dev), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(sys::cuCtxSetCurrent(ctx), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32), sys::CUresult::CUDA_SUCCESS);
    }
    h.stream = stream;
    for s in 0..4 {
        h.add(s);
    }
    h.step(&[(0, sz(700, 200)), (1, 64), (2, 1), (3, sz(333, 100))]);
    let entries = [(0, 1), (1, 1), (2, 1), (3, 1)];
    let mut exec: sys::CUgraphExec = std::ptr::null_mut();
    h.step_with(&entries, &mut |gpu, cache, layer, io, s| unsafe {
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        assert_eq!(sys::cuStreamBeginCapture_v2(s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED), sys::CUresult::CUDA_SUCCESS);
        gpu.run_layer(cache, layer, io, s).unwrap();
        assert_eq!(sys::cuStreamEndCapture(s, &mut graph), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(sys::cuGraphDestroy(graph), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(sys::cuGraphLaunch(exec, s), sys::CUresult::CUDA_SUCCESS);
    });
    let replays = sz(40, 12);
    for _ in 0..replays {
        // Only the plan is uploaded; the layer is the graph's replay.
        h.step_with(&entries, &mut |_, cache, layer, _, s| unsafe {
            assert_eq!(sys::cuGraphLaunch(exec, s), sys::CUresult::CUDA_SUCCESS);
            cache.mark_layer_run(layer).unwrap(); // the replay did not go through run_layer
        });
    }
    let st = h.finish();
    assert_eq!(st.steps, 2 + replays as usize);
    // SAFETY: created above, destroyed once.
    unsafe {
        sys::cuGraphExecDestroy(exec);
        sys::cuStreamDestroy_v2(stream);
    }
}
