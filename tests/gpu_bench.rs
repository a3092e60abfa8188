//! Decode timing of the CUDA backend (not a correctness test): one layer of a decode
//! step at the paper's shape (HQ=64, HKV=4, DK=192, DV=128, bf16, l=32 d=16 l'=64 n=16
//! w=512) for batches 1, 16, 64 at contexts 8k and 64k (and batch 16 at 128k), next to
//! the HBM floor (bytes NSA must read / 3.0 TB/s, the copy rate measured on the H100),
//! and, in the same run, the full-attention baseline (`CudaBackend::attend_full`) over the
//! same paged cache and the cost of the append + compress part alone (`run_layer` with
//! `q = out = 0`).
//!
//! Method: pools filled with random values on the device (no prefill); each layer's work
//! is captured once in a CUDA graph; the graphs of `L` layers are replayed back to back,
//! rotating layers so the bytes touched per round exceed the 50 MB L2; CUDA events
//! around a round of replays give the time per layer; the median of 11 rounds is
//! printed. Prints `BENCH` lines; skips without a device or under `NSA_GPU_TEST_SMALL=1`.
//! `NSA_BENCH_ONLY="16x65536,1x8192"` limits the cases; `NSA_BENCH_WHAT="nsa,full,append"`
//! the measurements.
#![cfg(feature = "cuda")]

mod common;
mod gpu_harness;

use common::{Buf, Rng};
use cudarc::driver::sys;
use gpu_harness::*;
use half::bf16;
use nsa::cuda::{CudaBackend, DeviceBuf, DeviceLayerIo};
use nsa::{Cache, Config, Dtype, Preset, StepSeq};

fn ok(r: sys::CUresult, what: &str) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{what}");
}

/// Fills `bytes` at the start of `buf` with random bf16 values: 64 MiB uploaded, then
/// doubled on the device.
fn fill_random(buf: &DeviceBuf, bytes: usize, rng: &mut Rng) {
    let first = bytes.min(64 << 20);
    let chunk: Vec<bf16> = (0..first / 2).map(|_| bf16::from_f32(rng.unit())).collect();
    buf.upload(&chunk).unwrap();
    let mut have = first / 2 * 2;
    while have < bytes {
        let n = have.min(bytes - have);
        // SAFETY: both ranges lie inside the allocation.
        unsafe { ok(sys::cuMemcpyDtoD_v2(buf.ptr() + have as u64, buf.ptr(), n), "cuMemcpyDtoD") };
        have += n;
    }
    unsafe { ok(sys::cuCtxSynchronize(), "cuCtxSynchronize") };
}

/// Captures `work(layer, stream)` for layers 0..n in CUDA graphs, replays them rotating
/// layers, and returns the median time per replay in microseconds.
fn time_graphs(n: u32, s: sys::CUstream, work: &mut dyn FnMut(u32, sys::CUstream)) -> f64 {
    let mut execs = vec![];
    unsafe {
        for layer in 0..n {
            let mut graph: sys::CUgraph = std::ptr::null_mut();
            ok(sys::cuStreamBeginCapture_v2(s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED), "begin capture");
            work(layer, s);
            ok(sys::cuStreamEndCapture(s, &mut graph), "end capture");
            let mut exec: sys::CUgraphExec = std::ptr::null_mut();
            ok(sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0), "instantiate");
            ok(sys::cuGraphDestroy(graph), "graph destroy");
            execs.push(exec);
        }
        let (mut e0, mut e1): (sys::CUevent, sys::CUevent) = (std::ptr::null_mut(), std::ptr::null_mut());
        ok(sys::cuEventCreate(&mut e0, 0), "event");
        ok(sys::cuEventCreate(&mut e1, 0), "event");
        for e in &execs {
            ok(sys::cuGraphLaunch(*e, s), "warm-up launch");
        }
        ok(sys::cuStreamSynchronize(s), "warm-up sync");
        let per_round = (n as usize * 24usize.div_ceil(n as usize)).max(n as usize);
        let mut times = vec![];
        for _ in 0..11 {
            ok(sys::cuEventRecord(e0, s), "record");
            for i in 0..per_round {
                ok(sys::cuGraphLaunch(execs[i % execs.len()], s), "launch");
            }
            ok(sys::cuEventRecord(e1, s), "record");
            ok(sys::cuEventSynchronize(e1), "event sync");
            let mut ms = 0f32;
            ok(sys::cuEventElapsedTime_v2(&mut ms, e0, e1), "elapsed");
            times.push(ms as f64 * 1e3 / per_round as f64);
        }
        for e in execs {
            sys::cuGraphExecDestroy(e);
        }
        sys::cuEventDestroy_v2(e0);
        sys::cuEventDestroy_v2(e1);
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        times[times.len() / 2]
    }
}

fn wanted(list: &str, item: &str) -> bool {
    match std::env::var(list) {
        Ok(v) if !v.is_empty() => v.split(',').any(|x| x.trim() == item),
        _ => true,
    }
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn decode_timing_paper_shape_bf16() {
    if device_or_skip("decode_timing_paper_shape_bf16").is_none() || small() {
        return;
    }
    let (hq, hkv, dk, dv) = (64usize, 4usize, 192usize, 128usize);
    let mut rng = Rng::new(7);
    let mut stream: sys::CUstream = std::ptr::null_mut();
    let probe = DeviceBuf::new(256).unwrap(); // retains the primary context
    unsafe {
        let mut ctx = std::ptr::null_mut();
        let mut dev = 0;
        ok(sys::cuDeviceGet(&mut dev, 0), "device");
        ok(sys::cuDevicePrimaryCtxRetain(&mut ctx, dev), "retain");
        ok(sys::cuCtxSetCurrent(ctx), "set current");
        ok(sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32), "stream");
    }
    let cases = [(1u32, 8192u32), (1, 65536), (16, 8192), (16, 65536), (16, 131072), (64, 8192), (64, 65536), (64, 131072)];
    for (batch, ctx) in cases {
        if !wanted("NSA_BENCH_ONLY", &format!("{batch}x{ctx}")) {
            continue;
        }
        let mut cfg: Config = cfg_for(Preset::Paper, hq as u32, hkv as u32, dk as u32, dv as u32, Dtype::Bf16, batch, ctx + 64, 8192);
        // Layers rotated so a round touches well over the 50 MB L2 (full attention reads
        // every key; NSA about ctx/16 + 1536 keys per sequence and KV head).
        let nsa_keys = (cfg.num_cmp_tokens(ctx) + cfg.sel_count * cfg.sel_block + cfg.window).min(ctx + cfg.num_cmp_tokens(ctx)) as u64;
        let nsa_bytes = batch as u64 * hkv as u64 * nsa_keys * (dk + dv) as u64 * 2;
        cfg.num_layers = (200_000_000u64.div_ceil(nsa_bytes)).clamp(1, 24) as u32;
        cfg.fit_pages();
        let need = CudaBackend::device_bytes(&cfg).unwrap();
        let buf = DeviceBuf::new(need).unwrap();
        let mut gpu = CudaBackend::new(&cfg, buf.ptr(), need).unwrap();
        fill_random(&buf, gpu.pools_bytes(), &mut rng);
        let b = batch as usize;
        let dq = DeviceBuf::new(b * hq * dk * 2).unwrap();
        let dkk = DeviceBuf::new(b * hkv * dk * 2).unwrap();
        let dvv = DeviceBuf::new(b * hkv * dv * 2).unwrap();
        let dg = DeviceBuf::new(b * hq * 3 * 4).unwrap();
        let dout = DeviceBuf::new(b * hq * dv * 2).unwrap();
        let rb = |rng: &mut Rng, n: usize| -> Vec<bf16> { (0..n).map(|_| bf16::from_f32(rng.unit())).collect() };
        dq.upload(&rb(&mut rng, b * hq * dk)).unwrap();
        dkk.upload(&rb(&mut rng, b * hkv * dk)).unwrap();
        dvv.upload(&rb(&mut rng, b * hkv * dv)).unwrap();
        dg.upload(&(0..b * hq * 3).map(|_| 0.5f32).collect::<Vec<_>>()).unwrap();
        let io = DeviceLayerIo { q: dq.ptr(), k: dkk.ptr(), v: dvv.ptr(), gates: dg.ptr(), out: dout.ptr(), ..Default::default() };
        let mut arena = Buf::new(Cache::arena_bytes(&cfg).unwrap());
        let mut cache = Cache::new(&cfg, arena.bytes()).unwrap();
        for sq in 0..batch {
            cache.add_sequence(sq).unwrap();
            let mut len = 0;
            while len < ctx - 1 {
                let t = (ctx - 1 - len).min(8192);
                cache.plan_step(&[StepSeq { seq: sq, tokens: t }]).unwrap();
                // Timing only: the rows' values do not matter, so no layer runs.
                for l in 0..cfg.num_layers {
                    cache.mark_layer_run(l).unwrap();
                }
                len += t;
            }
        }
        let entries: Vec<StepSeq> = (0..batch).map(|sq| StepSeq { seq: sq, tokens: 1 }).collect();
        cache.plan_step(&entries).unwrap();
        gpu.upload_step(&cache, stream).unwrap();
        gpu.synchronize(stream).unwrap();
        let layers = cfg.num_layers;
        let floor = nsa_bytes as f64 / 3.0e12 * 1e6;
        let head = format!("batch={batch} ctx={ctx} layers={layers}");
        let mut t_nsa = f64::NAN;
        if wanted("NSA_BENCH_WHAT", "nsa") {
            t_nsa = time_graphs(layers, stream, &mut |l, s| gpu.run_layer(&cache, l, &io, s).unwrap());
            println!(
                "BENCH nsa {head} tensor_cores={}: {t_nsa:.1} us, floor {floor:.1} us ({:.1} MB), {:.2}x floor",
                gpu.uses_tensor_cores(),
                nsa_bytes as f64 / 1e6,
                t_nsa / floor
            );
        }
        if wanted("NSA_BENCH_WHAT", "append") {
            // The capture above ran every layer of the step: the same step again.
            cache.abort_step().unwrap();
            cache.plan_step(&entries).unwrap();
            gpu.upload_step(&cache, stream).unwrap();
            let ap = DeviceLayerIo { q: 0, out: 0, ..io };
            let t = time_graphs(layers, stream, &mut |l, s| gpu.run_layer(&cache, l, &ap, s).unwrap());
            println!("BENCH append+compress {head}: {t:.1} us ({:.1}% of the NSA step)", 100.0 * t / t_nsa);
        }
        if wanted("NSA_BENCH_WHAT", "full") {
            let full_bytes = batch as u64 * hkv as u64 * ctx as u64 * (dk + dv) as u64 * 2;
            let ffloor = full_bytes as f64 / 3.0e12 * 1e6;
            let t = time_graphs(layers, stream, &mut |l, s| gpu.attend_full(&cache, l, dq.ptr(), dout.ptr(), s).unwrap());
            println!(
                "BENCH full {head}: {t:.1} us, floor {ffloor:.1} us ({:.1} MB), {:.2}x floor; NSA is {:.1}x faster",
                full_bytes as f64 / 1e6,
                t / ffloor,
                t / t_nsa
            );
        }
        let _ = &mut arena;
    }
    unsafe { sys::cuStreamDestroy_v2(stream) };
    drop(probe);
}
