//! The paged CPU engine against the brute-force reference (`nsa::reference`, written
//! straight from docs/SPEC.md, sharing no code with the engine).
//!
//! Selections are compared by score, as the spec asks: where the engine picked a
//! different set than the reference (a near-tie under different float order), the
//! engine's set must score within tolerance of the best, and outputs are then compared
//! given the engine's indices.

mod common;
use common::*;
use half::bf16;
use nsa::reference::full_attention;
use nsa::{Config, Dtype, Phi, Preset};

fn cfg_for(preset: Preset, hkv: u32, g: u32, dk: u32, dv: u32, phi: Phi, rng: &mut Rng) -> Config {
    let mut c = Config::preset(preset).with_shape(hkv * g, hkv, dk, dv);
    c.dtype = Dtype::F32;
    c.phi = phi;
    c.phi_hidden = 16;
    c.phi_pe = rng.below(2) == 0;
    // Scaled down so the sparse branches bite at test lengths.
    c.sel_count = rng.range(3, 6) as u32;
    c.window = rng.pick(&[16, 50, 100]);
    c.max_seqs = 3;
    c.max_step_seqs = 3;
    c.max_seq_len = 700;
    c.max_step_tokens = 2100;
    c.cpu_threads = 2;
    c.fit_pages();
    c
}

#[test]
fn engine_matches_reference_on_random_configs() {
    let mut rng = Rng::new(11);
    let mut worst = 0f64;
    let mut ties = 0;
    let mut cases = 0;
    for &g in &[1u32, 2, 3, 8, 16] {
        for preset in [Preset::Paper, Preset::Fla] {
            let phi = if preset == Preset::Fla { Phi::Mean } else { [Phi::Mean, Phi::Weighted, Phi::Linear, Phi::Mlp][rng.below(4) as usize] };
            let (dk, dv) = rng.pick(&[(64, 64), (64, 32), (32, 64), (192, 128), (128, 64)]);
            let hkv = if g >= 8 { 1 } else { rng.range(1, 3) as u32 };
            let cfg = cfg_for(preset, hkv, g, dk, dv, phi, &mut rng);
            // Lengths that are multiples of no block size, several sequences per step.
            let lens: Vec<usize> = (0..3).map(|_| rng.range(1, 650) as usize | 1).collect();
            let seqs: Vec<_> = lens.iter().map(|&l| SeqData::random::<f32>(&cfg, l, &mut rng)).collect();
            let w = random_weights(&cfg, &mut rng);
            let sched = random_schedule(&lens, 1 + rng.below(200) as usize, &mut rng);
            let outs = run_schedule::<f32>(&cfg, &seqs, &sched, &w);
            for (i, s) in seqs.iter().enumerate() {
                let what = format!("{preset:?} G={g} HKV={hkv} DK={dk} DV={dv} {phi:?} pe={} len={}", cfg.phi_pe, s.len);
                let c = check_seq(&cfg, s, &w, &outs.out[i], &outs.sel[i], 1e-5, &what);
                worst = worst.max(c.max_err);
                ties += c.near_ties;
                cases += 1;
            }
        }
    }
    println!("{cases} sequences, largest error vs reference {worst:e}, {ties} near-tie selections");
}

#[test]
fn paper_preset_at_full_size_matches_reference() {
    // The paper's exact parameters (n=16, w=512, l=32, d=16, l'=64) at a length where all
    // three branches are sparse: 1800 tokens = 28 selection blocks > 16.
    let mut rng = Rng::new(12);
    let mut cfg = Config::preset(Preset::Paper).with_shape(4, 1, 64, 64);
    cfg.dtype = Dtype::F32;
    cfg.max_seqs = 1;
    cfg.max_step_seqs = 1;
    cfg.max_seq_len = 1800;
    cfg.max_step_tokens = 1800;
    cfg.cpu_threads = 2;
    cfg.fit_pages();
    let s = SeqData::random::<f32>(&cfg, 1800, &mut rng);
    let w = (vec![], vec![]);
    let outs = run_schedule::<f32>(&cfg, &[s.clone()], &[vec![(0, 1000)], vec![(0, 800)]], &w);
    let c = check_seq(&cfg, &s, &w, &outs.out[0], &outs.sel[0], 1e-5, "paper full size");
    println!("paper preset, 1800 tokens: largest error {:e}, {} near ties", c.max_err, c.near_ties);
}

#[test]
fn bf16_storage_matches_reference_within_bf16_tolerance() {
    let mut rng = Rng::new(13);
    for preset in [Preset::Paper, Preset::Fla] {
        let mut cfg = cfg_for(preset, 2, 4, 64, 64, Phi::Mean, &mut rng);
        cfg.dtype = Dtype::Bf16;
        let seqs: Vec<_> = [500usize, 321].iter().map(|&l| SeqData::random::<bf16>(&cfg, l, &mut rng)).collect();
        let w = (vec![], vec![]);
        let sched = random_schedule(&[500, 321], 64, &mut rng);
        let outs = run_schedule::<bf16>(&cfg, &seqs, &sched, &w);
        for (i, s) in seqs.iter().enumerate() {
            // Outputs are stored as bf16: 2^-8 relative rounding, plus f32 order effects.
            check_seq(&cfg, s, &w, &outs.out[i], &outs.sel[i], 1e-2, &format!("bf16 {preset:?}"));
        }
    }
}

#[test]
fn sparse_branches_reduce_to_full_attention_when_they_cover_everything() {
    let mut rng = Rng::new(14);
    for (g, gates) in [(3u32, [0.0f32, 1.0, 0.0]), (2, [0.0, 0.0, 1.0]), (1, [0.0, 0.5, 0.5])] {
        let mut cfg = Config::preset(Preset::Paper).with_shape(2 * g, 2, 64, 32);
        cfg.dtype = Dtype::F32;
        let len = 600usize;
        cfg.sel_count = 10; // n * l' = 640 >= T
        cfg.window = 600; // w >= T
        cfg.max_seqs = 1;
        cfg.max_step_seqs = 1;
        cfg.max_seq_len = len as u32;
        cfg.max_step_tokens = len as u32;
        cfg.fit_pages();
        let mut s = SeqData::random::<f32>(&cfg, len, &mut rng);
        for c in s.gates.chunks_mut(3) {
            c.copy_from_slice(&gates);
        }
        let outs = run_schedule::<f32>(&cfg, &[s.clone()], &[vec![(0, 250)], vec![(0, 350)]], &(vec![], vec![]));
        let (hq, hkv, dk, dv) = dims(&cfg);
        let full = full_attention(&s.q, &s.k, &s.v, hq, hkv, dk, dv, cfg.softmax_scale() as f64);
        let err = max_rel_err(&outs.out[0], &full);
        assert!(err < 1e-5, "gates {gates:?}: error vs full attention {err:e}");
    }
}
