//! Limits: a sequence past one million tokens, capacities near 2^31 pages, head dims,
//! group sizes and batches at their maxima. Each gives a correct result or a clear
//! error, never a silent wrap-around.

mod common;
use common::*;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::reference::{prefill_last, RefInputs};
use nsa::{Cache, Config, Dtype, NsaError, Preset, StepSeq};

#[test]
fn decode_past_one_million_tokens_matches_reference() {
    let mut rng = Rng::new(31);
    let total = (1usize << 20) + 40;
    let mut c = Config::preset(Preset::Paper).with_shape(2, 1, 8, 8);
    c.dtype = Dtype::F32;
    c.max_seqs = 1;
    c.max_step_seqs = 1;
    c.max_seq_len = total as u32;
    c.max_step_tokens = 1 << 16;
    c.cpu_threads = 2;
    c.fit_pages();
    let d = SeqData::random::<f32>(&c, total, &mut rng);
    let (hq, hkv, dk, dv) = dims(&c);
    let mut eng = Engine::new(&c);
    let mut cache = Cache::new(&c, eng.arena.bytes()).unwrap();
    let mut cpu = CpuBackend::new(&c, eng.pool.bytes()).unwrap();
    cache.add_sequence(0).unwrap();
    let decode = 3;
    let mut pos = 0;
    while pos < total - decode {
        let n = (1usize << 16).min(total - decode - pos);
        cache.plan_step(&[StepSeq { seq: 0, tokens: n as u32 }]).unwrap();
        cpu.append_layer(&cache, 0, &d.k[pos * hkv * dk..(pos + n) * hkv * dk], &d.v[pos * hkv * dv..(pos + n) * hkv * dv], PhiWeights::default())
            .unwrap();
        pos += n;
    }
    let mut got = vec![];
    for _ in 0..decode {
        cache.plan_step(&[StepSeq { seq: 0, tokens: 1 }]).unwrap();
        let mut out = vec![f32::NAN; hq * dv];
        let io = LayerIo {
            q: &d.q[pos * hq * dk..(pos + 1) * hq * dk],
            k: &d.k[pos * hkv * dk..(pos + 1) * hkv * dk],
            v: &d.v[pos * hkv * dv..(pos + 1) * hkv * dv],
            gates: &d.gates[pos * hq * 3..(pos + 1) * hq * 3],
            out: &mut out,
            selected: None,
        };
        cpu.run_layer(&cache, 0, io, PhiWeights::default()).unwrap();
        got.extend(out);
        pos += 1;
    }
    assert_eq!(cache.len(0).unwrap() as usize, total);
    assert_eq!(cache.cmp_len(0).unwrap(), ((total - 32) / 16 + 1) as u32);
    cache.check_invariants().unwrap();
    let inp = RefInputs { cfg: &c, q: &d.q, k: &d.k, v: &d.v, gates: &d.gates, phi_k: &[], phi_v: &[], selection: None };
    let r = prefill_last(&inp, decode);
    let err = max_rel_err(&got, &r.out);
    println!("{total} tokens: decode error vs reference {err:e}");
    assert!(err < 1e-4, "error {err:e} at {total} tokens");
}

#[test]
fn capacities_near_two_to_the_31_are_sized_or_refused_clearly() {
    let mut c = Config::preset(Preset::Paper);
    c.num_pages = i32::MAX as u32;
    c.num_cmp_pages = i32::MAX as u32;
    c.max_seqs = 1024;
    c.max_seq_len = (1 << 30) - 1; // the largest allowed (positions stay far from i32 overflow)
    c.validate().unwrap();
    // The arena for 2^31 pages is a real number (refcounts + free stacks: > 16 GiB), not a wrap.
    let a = Cache::arena_bytes(&c).unwrap();
    assert!(a as u64 > 4 * 4 * (i32::MAX as u64), "arena {a}");
    // Host pools of that size would exceed the address space: a clear error, not a wrap.
    c.num_layers = 1 << 20;
    let e = CpuBackend::buffer_bytes(&c).unwrap_err();
    assert!(matches!(e, NsaError::InvalidConfig { .. }) && e.to_string().contains("overflows"), "{e}");
    // Page ids are int32.
    c.num_layers = 1;
    c.num_pages = i32::MAX as u32 + 1;
    assert!(c.validate().unwrap_err().to_string().contains("num_pages"));
    c.num_pages = 1;
    c.max_seq_len = 1 << 31;
    assert!(c.validate().unwrap_err().to_string().contains("max_seq_len"));
}

#[test]
fn largest_heads_dims_and_batches_match_reference() {
    let mut rng = Rng::new(32);
    // (HQ, HKV, DK, DV, sequences decoding together)
    for (hq, hkv, dk, dv, batch) in [(1024u32, 1u32, 8u32, 8u32, 2usize), (4, 2, 512, 512, 2), (2, 1, 8, 8, 64)] {
        let mut c = Config::preset(Preset::Paper).with_shape(hq, hkv, dk, dv);
        c.dtype = Dtype::F32;
        c.sel_count = 3;
        c.window = 20;
        c.max_seqs = batch as u32;
        c.max_step_seqs = batch as u32;
        c.max_seq_len = 200;
        c.max_step_tokens = (200 * batch) as u32;
        c.cpu_threads = 2;
        c.fit_pages();
        let lens: Vec<usize> = (0..batch).map(|_| rng.range(150, 200) as usize).collect();
        let seqs: Vec<_> = lens.iter().map(|&l| SeqData::random::<f32>(&c, l, &mut rng)).collect();
        // Prefill 140 tokens of each, then decode the rest with every sequence in each step.
        let mut sched = vec![(0..batch).map(|i| (i, 140)).collect::<Vec<_>>()];
        for t in 140..200 {
            let st: Vec<_> = (0..batch).filter(|&i| lens[i] > t).map(|i| (i, 1)).collect();
            if !st.is_empty() {
                sched.push(st);
            }
        }
        let outs = run_schedule::<f32>(&c, &seqs, &sched, &(vec![], vec![]));
        for (i, s) in seqs.iter().enumerate() {
            // Selections against the reference's own (or a near-tie), then outputs.
            let what = format!("HQ={hq} HKV={hkv} DK={dk} DV={dv} batch={batch} seq {i}");
            check_seq(&c, s, &(vec![], vec![]), &outs.out[i], &outs.sel[i], 1e-5, &what);
        }
    }
}
