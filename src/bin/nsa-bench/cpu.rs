//! CPU decode benchmark: a cache filled to each context length (append_layer, no
//! prefill attention), then timed decode steps of NSA (`run_layer`: append + all
//! branches) and of the full-attention baseline (`attend_full`) on the same cache.

use std::time::Instant;

use half::bf16;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::{Cache, HostBuf};

use crate::common::{bf16s, config, each_seq, fill};
use crate::report::{median, Medians, Row};
use crate::rng::Rng;
use crate::Opts;

/// Host memory bandwidth (bytes read + written per second): the best of a few large copies.
pub fn bandwidth() -> f64 {
    let n = 64 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            2.0 * n as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

pub fn run(o: &Opts) -> nsa::Result<Vec<Row>> {
    let bw = bandwidth();
    let (hq, hkv, dk, dv) = if o.quick { (8usize, 2usize, 64usize, 64usize) } else { (64, 4, 128, 128) };
    let mut rows = vec![];
    let mut rng = Rng::new(1);
    for &preset in &o.presets {
        for &ctx in &o.contexts {
            for &batch in &o.batches {
                let mut c = config(preset, (hq, hkv, dk, dv));
                c.max_seqs = batch;
                c.max_step_seqs = batch;
                c.max_seq_len = ctx + o.reps as u32 + 2;
                c.max_step_tokens = 8192.max(batch);
                c.cpu_threads = o.threads;
                c.fit_pages();
                let mut arena = HostBuf::new(Cache::arena_bytes(&c)?);
                let mut pool = HostBuf::new(CpuBackend::buffer_bytes(&c)?);
                let mut cache = Cache::new(&c, arena.bytes())?;
                let mut cpu = CpuBackend::new(&c, pool.bytes())?;
                for s in 0..batch {
                    cache.add_sequence(s)?;
                }
                // Fill every sequence to `ctx` tokens, a chunk of each per step.
                fill(&mut cache, batch, ctx, (8192 / batch).max(1), |cache, n| {
                    let rows_n = (n * batch) as usize;
                    let (k, v) = (bf16s(&mut rng, rows_n * hkv * dk, 1.0), bf16s(&mut rng, rows_n * hkv * dv, 1.0));
                    cpu.append_layer(cache, 0, &k, &v, PhiWeights::default())
                })?;
                let b = batch as usize;
                let gates = vec![1.0f32 / 3.0; b * hq * 3];
                let (mut t_nsa, mut t_full) = (vec![], vec![]);
                let mut out = vec![bf16::ZERO; b * hq * dv];
                for _ in 0..o.reps {
                    cache.plan_step(&each_seq(batch, 1))?;
                    let q = bf16s(&mut rng, b * hq * dk, 2.0);
                    let (k, v) = (bf16s(&mut rng, b * hkv * dk, 1.0), bf16s(&mut rng, b * hkv * dv, 1.0));
                    let t = Instant::now();
                    cpu.run_layer(&cache, 0, LayerIo { q: &q, k: &k, v: &v, gates: &gates, out: &mut out, selected: None }, PhiWeights::default())?;
                    t_nsa.push(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    cpu.attend_full(&cache, 0, &q, &mut out)?;
                    t_full.push(t.elapsed().as_secs_f64());
                }
                let t = Medians { nsa: median(t_nsa), full: median(t_full), graph: None, upload: None };
                rows.push(Row::decode("cpu", &c, preset, batch, ctx, t, bw));
                eprintln!("  done: {preset:?} context {ctx} batch {batch}");
            }
        }
    }
    Ok(rows)
}
