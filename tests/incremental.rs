//! docs/SPEC.md "Incremental semantics": every way of feeding the same tokens
//! gives the same output. Each query's arithmetic does not depend on how the step was
//! cut, so these compare bit for bit.

mod common;
use common::*;
use half::bf16;
use nsa::{Config, Dtype, Phi, Preset};

fn small(preset: Preset, g: u32, phi: Phi) -> Config {
    let mut c = Config::preset(preset).with_shape(2 * g, 2, 32, 16);
    c.dtype = Dtype::F32;
    c.sel_count = 4;
    c.window = 40;
    c.phi = phi;
    c.phi_hidden = 8;
    c.phi_pe = phi != Phi::Weighted;
    c.max_seqs = 6;
    c.max_step_seqs = 6;
    c.max_seq_len = 400;
    c.max_step_tokens = 2400;
    c.cpu_threads = 3;
    c.fit_pages();
    c
}

fn assert_same(a: &Outs, b: &Outs, what: &str) {
    for s in 0..a.out.len() {
        assert!(a.out[s].iter().all(|x| x.is_finite()), "{what}: seq {s} has unwritten outputs");
        assert_eq!(a.out[s], b.out[s], "{what}: seq {s} outputs differ");
        assert_eq!(a.sel[s], b.sel[s], "{what}: seq {s} selections differ");
    }
}

#[test]
fn decode_token_by_token_equals_one_prefill() {
    let mut rng = Rng::new(1);
    for (preset, g, phi) in [(Preset::Paper, 3, Phi::Mean), (Preset::Fla, 2, Phi::Mean), (Preset::Paper, 1, Phi::Mlp)] {
        let cfg = small(preset, g, phi);
        let lens = [333usize, 170];
        let seqs: Vec<_> = lens.iter().map(|&l| SeqData::random::<f32>(&cfg, l, &mut rng)).collect();
        let w = random_weights(&cfg, &mut rng);
        let prefill = run_schedule::<f32>(&cfg, &seqs, &[vec![(0, 333), (1, 170)]], &w);
        let decode: Vec<Vec<(usize, usize)>> =
            (0..333).map(|t| if t < 170 { vec![(0, 1), (1, 1)] } else { vec![(0, 1)] }).collect();
        let dec = run_schedule::<f32>(&cfg, &seqs, &decode, &w);
        assert_same(&prefill, &dec, &format!("{preset:?} G={g} {phi:?}"));
    }
}

#[test]
fn random_chunks_equal_one_prefill_in_every_dtype() {
    let mut rng = Rng::new(2);
    for round in 0..6 {
        let phi = [Phi::Mean, Phi::Weighted, Phi::Linear, Phi::Mlp][round % 4];
        let cfg = small(if round % 2 == 0 { Preset::Paper } else { Preset::Fla }, 1 + round as u32, phi);
        let lens: Vec<usize> = (0..4).map(|_| rng.range(1, 399) as usize).collect();
        let seqs: Vec<_> = lens.iter().map(|&l| SeqData::random::<bf16>(&cfg, l, &mut rng)).collect();
        let w = random_weights(&cfg, &mut rng);
        let one: Vec<(usize, usize)> = lens.iter().copied().enumerate().collect();
        let sched = random_schedule(&lens, 1 + rng.below(90) as usize, &mut rng);
        let a = run_schedule::<f32>(&cfg, &seqs, &[one.clone()], &w);
        let b = run_schedule::<f32>(&cfg, &seqs, &sched, &w);
        assert_same(&a, &b, &format!("f32 round {round}"));
        let mut c16 = cfg;
        c16.dtype = Dtype::Bf16;
        let a = run_schedule::<bf16>(&c16, &seqs, &[one], &w);
        let b = run_schedule::<bf16>(&c16, &seqs, &sched, &w);
        assert_same(&a, &b, &format!("bf16 round {round}"));
    }
}

#[test]
fn fork_then_different_appends_equals_two_independent_sequences() {
    let mut rng = Rng::new(3);
    for (prefix, pre, phi) in [(100usize, Preset::Paper, Phi::Mean), (128, Preset::Fla, Phi::Mean), (77, Preset::Paper, Phi::Linear), (31, Preset::Paper, Phi::Mean)] {
        let cfg = small(pre, 2, phi);
        let w = random_weights(&cfg, &mut rng);
        let a = SeqData::random::<f32>(&cfg, 300, &mut rng);
        let mut b = SeqData::random::<f32>(&cfg, 260, &mut rng);
        // b shares a's first `prefix` tokens.
        let (hq, hkv, dk, dv) = dims(&cfg);
        b.q[..prefix * hq * dk].copy_from_slice(&a.q[..prefix * hq * dk]);
        b.k[..prefix * hkv * dk].copy_from_slice(&a.k[..prefix * hkv * dk]);
        b.v[..prefix * hkv * dv].copy_from_slice(&a.v[..prefix * hkv * dv]);
        b.gates[..prefix * hq * 3].copy_from_slice(&a.gates[..prefix * hq * 3]);

        let independent = run_schedule::<f32>(&cfg, &[a.clone(), b.clone()], &[vec![(0, 300), (1, 260)]], &w);

        let mut eng = Engine::new(&cfg);
        let mut d = Driver::<f32>::new(&mut eng, vec![a, b.clone(), b], w);
        d.cache.add_sequence(0).unwrap();
        d.step(&[(0, prefix)]);
        d.cache.fork(0, 1).unwrap();
        d.cache.fork(1, 2).unwrap(); // a third holder: copies must not disturb the others
        let shared = d.cache.stats();
        // Interleave: both append in the same steps, in both orders, then decode.
        d.step(&[(1, 7), (0, 5)]);
        d.step(&[(0, 60), (1, 33)]);
        let mut left = [300 - prefix - 65, 260 - prefix - 40];
        while left[0] + left[1] > 0 {
            let mut st = vec![];
            for (s, l) in left.iter_mut().enumerate() {
                if *l > 0 {
                    let t = (*l).min(1 + rng.below(20) as usize);
                    st.push((s, t));
                    *l -= t;
                }
            }
            d.step(&st);
        }
        assert!(d.cache.stats().raw_free < shared.raw_free);
        assert_eq!(&d.out[0], &independent.out[0], "fork at {prefix}: parent output changed");
        assert_eq!(&d.out[1][prefix * hq * dv..], &independent.out[1][prefix * hq * dv..], "fork at {prefix}: child output");
        assert_eq!(&d.sel[1][prefix * hkv * 4..], &independent.sel[1][prefix * hkv * 4..]);
        // The third holder still has the prefix and can continue like b.
        assert_eq!(d.cache.len(2).unwrap() as usize, prefix);
        d.step(&[(2, 260 - prefix)]);
        assert_eq!(&d.out[2][prefix * hq * dv..], &independent.out[1][prefix * hq * dv..], "fork at {prefix}: third holder");
    }
}

#[test]
fn truncate_then_reappend_equals_never_having_appended() {
    let mut rng = Rng::new(4);
    for (pre, phi) in [(Preset::Paper, Phi::Mean), (Preset::Fla, Phi::Mean), (Preset::Paper, Phi::Weighted)] {
        let cfg = small(pre, 3, phi);
        let w = random_weights(&cfg, &mut rng);
        let a = SeqData::random::<f32>(&cfg, 350, &mut rng);
        let junk = SeqData::random::<f32>(&cfg, 350, &mut rng);
        let want = run_schedule::<f32>(&cfg, &[a.clone()], &[vec![(0, 350)]], &w);
        for cut in [0usize, 1, 31, 32, 47, 64, 65, 200] {
            let mut eng = Engine::new(&cfg);
            let mut d = Driver::<f32>::new(&mut eng, vec![a.clone()], w.clone());
            d.cache.add_sequence(0).unwrap();
            if cut > 0 {
                d.step(&[(0, cut)]);
            }
            // Append garbage past the cut (speculative tokens), then reject it.
            d.data[0] = splice(&a, &junk, cut);
            d.step(&[(0, 97)]);
            d.cache.truncate(0, cut as u32).unwrap();
            d.cache.check_invariants().unwrap();
            assert_eq!(d.cache.cmp_len(0).unwrap(), cfg.num_cmp_tokens(cut as u32));
            d.data[0] = a.clone();
            d.step(&[(0, 350 - cut)]);
            assert_eq!(d.out[0], want.out[0], "{pre:?} {phi:?} cut at {cut}");
            assert_eq!(d.sel[0], want.sel[0], "{pre:?} {phi:?} cut at {cut}");
        }
    }
}

/// `a` up to `cut`, then `b`.
fn splice(a: &SeqData, b: &SeqData, cut: usize) -> SeqData {
    let mut s = b.clone();
    let per = |v: &Vec<f32>| v.len() / a.len;
    for (dst, src) in [(&mut s.q, &a.q), (&mut s.k, &a.k), (&mut s.v, &a.v), (&mut s.gates, &a.gates)] {
        let n = per(src) * cut;
        dst[..n].copy_from_slice(&src[..n]);
    }
    s
}

#[test]
fn append_only_fill_then_decode_equals_full_prefill_then_decode() {
    use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
    use nsa::{Cache, StepSeq};
    let mut rng = Rng::new(6);
    let cfg = small(Preset::Paper, 4, Phi::Linear);
    let w = random_weights(&cfg, &mut rng);
    let d = SeqData::random::<f32>(&cfg, 390, &mut rng);
    let want = run_schedule::<f32>(&cfg, &[d.clone()], &[vec![(0, 370)], vec![(0, 20)]], &w);
    let (hq, hkv, dk, dv) = dims(&cfg);
    let mut eng = Engine::new(&cfg);
    let mut cache = Cache::new(&cfg, eng.arena.bytes()).unwrap();
    let mut cpu = CpuBackend::new(&cfg, eng.pool.bytes()).unwrap();
    let pw = PhiWeights { k: &w.0, v: &w.1 };
    cache.add_sequence(0).unwrap();
    for (start, n) in [(0usize, 200usize), (200, 170)] {
        cache.plan_step(&[StepSeq { seq: 0, tokens: n as u32 }]).unwrap();
        cpu.append_layer(&cache, 0, &d.k[start * hkv * dk..(start + n) * hkv * dk], &d.v[start * hkv * dv..(start + n) * hkv * dv], pw).unwrap();
    }
    assert_eq!(cache.cmp_len(0).unwrap(), cfg.num_cmp_tokens(370));
    cache.plan_step(&[StepSeq { seq: 0, tokens: 20 }]).unwrap();
    let mut out = vec![f32::NAN; 20 * hq * dv];
    let io = LayerIo {
        q: &d.q[370 * hq * dk..],
        k: &d.k[370 * hkv * dk..],
        v: &d.v[370 * hkv * dv..],
        gates: &d.gates[370 * hq * 3..],
        out: &mut out,
        selected: None,
    };
    cpu.run_layer(&cache, 0, io, pw).unwrap();
    assert_eq!(&out[..], &want.out[0][370 * hq * dv..]);
}
