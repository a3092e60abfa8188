//! CUDA engine vs CPU engine, prefill-heavy schedules: long chunks in the same steps as
//! decodes of other sequences, one long single-step prefill, tiny contexts. Skips without
//! a device; `NSA_GPU_TEST_SMALL=1` shrinks sizes (for compute-sanitizer).
#![cfg(feature = "cuda")]

mod common;
mod gpu_harness;

use gpu_harness::*;
use half::{bf16, f16};
use nsa::{Dtype, Preset};

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_chunks_with_decodes_paper_g8_bf16() {
    if device_or_skip("prefill_chunks_with_decodes_paper_g8_bf16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Paper, 16, 2, 128, 128, Dtype::Bf16, 8, 4096, 4096);
    let pl = Plan { seqs: 6, prompt_min: 1, prompt_max: sz(3000, 300), chunk_max: sz(900, 120), decode_steps: sz(6, 2), forks: true };
    scenario::<bf16>("prefill_chunks_with_decodes_paper_g8_bf16", &cfg, 31, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_chunks_with_decodes_fla_g5_dk48_dv80_f16() {
    if device_or_skip("prefill_chunks_with_decodes_fla_g5_dk48_dv80_f16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Fla, 10, 2, 48, 80, Dtype::F16, 6, 4096, 3000);
    let pl = Plan { seqs: 4, prompt_min: 1, prompt_max: sz(3500, 300), chunk_max: sz(1000, 150), decode_steps: sz(6, 2), forks: true };
    scenario::<f16>("prefill_chunks_with_decodes_fla_g5_dk48_dv80_f16", &cfg, 32, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_one_long_step_paper_g8_bf16() {
    if device_or_skip("prefill_one_long_step_paper_g8_bf16").is_none() {
        return;
    }
    let len = sz(8192, 1024);
    let cfg = cfg_for(Preset::Paper, 8, 1, 64, 64, Dtype::Bf16, 1, len + 16, len);
    let pl = Plan { seqs: 1, prompt_min: len, prompt_max: len, chunk_max: len, decode_steps: 4, forks: false };
    scenario::<bf16>("prefill_one_long_step_paper_g8_bf16", &cfg, 33, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_tiny_contexts_paper_bf16() {
    if device_or_skip("prefill_tiny_contexts_paper_bf16").is_none() {
        return;
    }
    // Lengths 1..40: no compressed token at first, then the first ones appear.
    let cfg = cfg_for(Preset::Paper, 4, 2, 32, 32, Dtype::Bf16, 6, 128, 64);
    let pl = Plan { seqs: 4, prompt_min: 1, prompt_max: 3, chunk_max: 3, decode_steps: 40, forks: true };
    scenario::<bf16>("prefill_tiny_contexts_paper_bf16", &cfg, 34, &pl);
}

// The prefill kernels' main shapes (src/cuda/prefill.rs): G = 16 with DK = DV = 128
// (4-warp blocks on sm_90), DK = 192 (8-warp blocks), G = 4 with the fla preset.

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_chunks_with_decodes_paper_g16_bf16() {
    if device_or_skip("prefill_chunks_with_decodes_paper_g16_bf16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Paper, 32, 2, 128, 128, Dtype::Bf16, 6, 4096, 4096);
    let pl = Plan { seqs: 5, prompt_min: 64, prompt_max: sz(3000, 300), chunk_max: sz(900, 130), decode_steps: sz(6, 2), forks: true };
    scenario::<bf16>("prefill_chunks_with_decodes_paper_g16_bf16", &cfg, 35, &pl);
}

// G = 16 at DK = DV = 64 in f16: the selected branch's other shape of `pf_sel` (its
// warpgroup products of the blocks all of a tile's positions chose at one 64-column chunk,
// P V at N = 64), with chunks that leave tiles of fewer than four positions.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_chunks_with_decodes_paper_g16_dk64_f16() {
    if device_or_skip("prefill_chunks_with_decodes_paper_g16_dk64_f16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Paper, 16, 1, 64, 64, Dtype::F16, 4, 4096, 4096);
    let pl = Plan { seqs: 4, prompt_min: 64, prompt_max: sz(3000, 300), chunk_max: sz(900, 130), decode_steps: sz(6, 2), forks: true };
    scenario::<f16>("prefill_chunks_with_decodes_paper_g16_dk64_f16", &cfg, 41, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_one_long_step_paper_g16_dk192_f16() {
    if device_or_skip("prefill_one_long_step_paper_g16_dk192_f16").is_none() {
        return;
    }
    let len = sz(8192, 1024);
    let cfg = cfg_for(Preset::Paper, 16, 1, 192, 128, Dtype::F16, 1, len + 16, len);
    let pl = Plan { seqs: 1, prompt_min: len, prompt_max: len, chunk_max: len, decode_steps: 4, forks: false };
    scenario::<f16>("prefill_one_long_step_paper_g16_dk192_f16", &cfg, 36, &pl);
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_chunks_with_decodes_fla_g4_bf16() {
    if device_or_skip("prefill_chunks_with_decodes_fla_g4_bf16").is_none() {
        return;
    }
    let cfg = cfg_for(Preset::Fla, 8, 2, 128, 128, Dtype::Bf16, 6, 4096, 4096);
    let pl = Plan { seqs: 4, prompt_min: 64, prompt_max: sz(3500, 300), chunk_max: sz(1000, 150), decode_steps: sz(6, 2), forks: true };
    scenario::<bf16>("prefill_chunks_with_decodes_fla_g4_bf16", &cfg, 37, &pl);
}

// Where every block's score does not fit in shared memory (here G = 4 past ~58k tokens),
// the 8-warp pf_cmp_ws keeps each position's block scores in a window of 256 blocks that
// moves along the tiles, the blocks it leaves ranked with the top-n kept so far
// (src/cuda/prefill.rs `ws_window`; its unit test checks this shape gets that form). G = 4
// with four positions a warp. The same size under the sanitizers (a smaller one would not
// take this form).
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_one_long_step_moving_window_paper_g4_bf16() {
    if device_or_skip("prefill_one_long_step_moving_window_paper_g4_bf16").is_none() {
        return;
    }
    let len = 61440;
    let cfg = cfg_for(Preset::Paper, 4, 1, 128, 128, Dtype::Bf16, 1, len + 16, len);
    let pl = Plan { seqs: 1, prompt_min: len, prompt_max: len, chunk_max: len, decode_steps: 4, forks: false };
    scenario::<bf16>("prefill_one_long_step_moving_window_paper_g4_bf16", &cfg, 38, &pl);
}

// Equal logits (all-zero queries): the interior blocks of a position score the same up to
// the last bits each engine's float order leaves, so the rankings take their path for many
// equal keys (`pf_top_n`'s radix select; random scores take `pf_top_few`) and every
// selection must still be a top-n by the reference's scores (the harness's score-gap
// check; which of the tied blocks each engine picks may differ). Then random queries
// again on the same cache, under the usual near-tie limit.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_equal_scores_paper_g16_bf16() {
    let name = "prefill_equal_scores_paper_g16_bf16";
    if device_or_skip(name).is_none() {
        return;
    }
    let len = sz(8192, 2048);
    let cfg = cfg_for(Preset::Paper, 16, 1, 128, 128, Dtype::Bf16, 1, len + 64, len);
    let mut h = Harness::<bf16>::new(name, &cfg, 39);
    h.add(0);
    h.flat_q = true;
    h.step(&[(0, len / 2)]);
    h.flat_q = false;
    h.step(&[(0, len / 2)]);
    for _ in 0..3 {
        h.step(&[(0, 1)]);
    }
    h.finish();
}

// The fla preset at G = 16 (its Eq. 9 with A = B = 1: a block per compressed token) in one
// long step, then decodes.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn prefill_one_long_step_fla_g16_bf16() {
    if device_or_skip("prefill_one_long_step_fla_g16_bf16").is_none() {
        return;
    }
    let len = sz(16384, 2048);
    let cfg = cfg_for(Preset::Fla, 16, 1, 128, 128, Dtype::Bf16, 1, len + 16, len);
    let pl = Plan { seqs: 1, prompt_min: len, prompt_max: len, chunk_max: len, decode_steps: 4, forks: false };
    scenario::<bf16>("prefill_one_long_step_fla_g16_bf16", &cfg, 40, &pl);
}
