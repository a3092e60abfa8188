//! Decode timing of the CUDA backend (not a correctness test): one layer of a decode
//! step at the paper's shape (HQ=64, HKV=4, DK=192, DV=128, bf16) for batches 1 and 16 at
//! contexts 8k and 64k, next to the HBM floor (bytes NSA must read / 3.0 TB/s, the copy
//! rate measured on the H100). Pools are filled with random values directly (no prefill).
//! Prints `BENCH` lines; skips without a device or under `NSA_GPU_TEST_SMALL=1`.
#![cfg(feature = "cuda")]

mod common;
mod gpu_harness;

use std::time::Instant;

use common::{Buf, Rng};
use gpu_harness::*;
use half::bf16;
use nsa::cuda::{CudaBackend, DeviceBuf, DeviceLayerIo};
use nsa::{Cache, Dtype, Preset, StepSeq};

fn random_bf16(rng: &mut Rng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.unit())).collect()
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_timing_paper_shape_bf16() {
    if device_or_skip("decode_timing_paper_shape_bf16").is_none() || small() {
        return;
    }
    let max_t = 65536u32;
    let batch_max = 16u32;
    let cfg = cfg_for(Preset::Paper, 64, 4, 192, 128, Dtype::Bf16, batch_max, max_t + 64, 8192);
    let need = CudaBackend::device_bytes(&cfg).unwrap();
    let buf = DeviceBuf::new(need).unwrap();
    let mut gpu = CudaBackend::new(&cfg, buf.ptr(), need).unwrap();
    let mut rng = Rng::new(7);
    // Fill the pools with random bf16 values, 64 MiB at a time.
    let chunk = random_bf16(&mut rng, 32 << 20);
    let pools = gpu.pools_bytes();
    let mut off = 0;
    while off < pools {
        let n = (pools - off).min(chunk.len() * 2);
        buf.upload_at(off, &chunk[..n / 2]).unwrap();
        off += n;
    }
    let (hq, hkv, dk, dv) = (64usize, 4usize, 192usize, 128usize);
    let b = batch_max as usize;
    let dq = DeviceBuf::new(b * hq * dk * 2).unwrap();
    let dkk = DeviceBuf::new(b * hkv * dk * 2).unwrap();
    let dvv = DeviceBuf::new(b * hkv * dv * 2).unwrap();
    let dg = DeviceBuf::new(b * hq * 3 * 4).unwrap();
    let dout = DeviceBuf::new(b * hq * dv * 2).unwrap();
    dq.upload(&random_bf16(&mut rng, b * hq * dk)).unwrap();
    dkk.upload(&random_bf16(&mut rng, b * hkv * dk)).unwrap();
    dvv.upload(&random_bf16(&mut rng, b * hkv * dv)).unwrap();
    dg.upload(&(0..b * hq * 3).map(|_| 0.5f32).collect::<Vec<_>>()).unwrap();
    let io = DeviceLayerIo { q: dq.ptr(), k: dkk.ptr(), v: dvv.ptr(), gates: dg.ptr(), out: dout.ptr(), ..Default::default() };
    let s = std::ptr::null_mut();
    for (batch, ctx) in [(1u32, 8192u32), (1, 65536), (16, 8192), (16, 65536)] {
        let mut arena = Buf::new(Cache::arena_bytes(&cfg).unwrap());
        let mut cache = Cache::new(&cfg, arena.bytes()).unwrap();
        for sq in 0..batch {
            cache.add_sequence(sq).unwrap();
            let mut len = 0;
            while len < ctx - 1 {
                let t = (ctx - 1 - len).min(8192);
                cache.plan_step(&[StepSeq { seq: sq, tokens: t }]).unwrap();
                len += t;
            }
        }
        let entries: Vec<StepSeq> = (0..batch).map(|sq| StepSeq { seq: sq, tokens: 1 }).collect();
        cache.plan_step(&entries).unwrap();
        gpu.upload_step(&cache, s).unwrap();
        for _ in 0..3 {
            gpu.run_layer(&cache, 0, &io, s).unwrap();
        }
        gpu.synchronize(s).unwrap();
        let mut times = vec![];
        for _ in 0..30 {
            let t0 = Instant::now();
            gpu.run_layer(&cache, 0, &io, s).unwrap();
            gpu.synchronize(s).unwrap();
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[times.len() / 2];
        let nc = cfg.num_cmp_tokens(ctx) as u64;
        let keys = nc + (cfg.sel_count as u64 * cfg.sel_block as u64).min(ctx as u64) + (cfg.window as u64).min(ctx as u64);
        let bytes = batch as u64 * hkv as u64 * keys * (dk + dv) as u64 * 2;
        let floor = bytes as f64 / 3.0e12 * 1e6;
        println!(
            "BENCH decode one layer, paper shape bf16, batch={batch} ctx={ctx}: median {med:.1} us (min {:.1}), floor {floor:.1} us ({:.1} MB at 3.0 TB/s), {:.1}x the floor",
            times[0],
            bytes as f64 / 1e6,
            med / floor
        );
    }
}
