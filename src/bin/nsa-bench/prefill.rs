//! CUDA prefill benchmark (`--gpu`, `--prefill T1,T2,...`): for each length T, shape and
//! preset, the T tokens of a fresh sequence in ONE step (`upload_step` + `run_layer`:
//! append, compress, all three branches over T query rows), bf16, batch 1. CUDA events
//! on one stream, median of `min(--reps, 3)` after one warm-up; each rep removes the
//! sequence, adds it again and re-plans, so every rep is a first prefill. No L2 flush:
//! the inputs alone exceed the L2 many times over. The floor is the step's QK and PV
//! FLOPs over the dense matrix rate (`--matrix-tflops`). Beside it, the engine's own full
//! attention of the same step (`attend_full`: causal attention of the T rows over the
//! same cache, with the decode-shaped split-KV tensor-core kernels over waves of rows;
//! timed once per shape and length, the presets share it); the cuDNN and flash baselines
//! are PyTorch's (`scripts/torch_compare.py --prefill`).

use cudarc::driver::{result, sys};
use nsa::cuda::{CudaBackend, DeviceBuf, DeviceLayerIo};
use nsa::{Cache, HostBuf, Preset, StepSeq};

use crate::common::{config, Shape};
use crate::gpu::{cuda, random_bf16, Timer};
use crate::report::{median, PrefillRow};
use crate::rng::Rng;
use crate::Opts;

const GB: f64 = 1e9;

pub fn run(o: &Opts, shapes: &[Shape], timer: &Timer, stream: sys::CUstream) -> nsa::Result<Vec<PrefillRow>> {
    let Some(&tmax) = o.prefill.iter().max() else {
        return Ok(vec![]);
    };
    let reps = o.reps.clamp(1, 3);
    // Inputs and output of the longest prefill at the widest shape, shared by every point
    // (a point reads its first rows).
    let max = |f: fn(&Shape) -> usize| shapes.iter().map(f).max().unwrap_or(0);
    let (hq, hkv, dk, dv) = (max(|s| s.0), max(|s| s.1), max(|s| s.2), max(|s| s.3));
    let n = tmax as usize;
    let mut rng = Rng::new(5);
    let q = random_bf16(&mut rng, n * hq * dk, 2.0)?;
    let k = random_bf16(&mut rng, n * hkv * dk, 1.0)?;
    let v = random_bf16(&mut rng, n * hkv * dv, 1.0)?;
    let gates = DeviceBuf::new(n * hq * 3 * 4)?;
    gates.upload(&vec![1.0f32 / 3.0; n * hq * 3])?;
    let out = DeviceBuf::new(n * hq * dv * 2)?;
    let io = DeviceLayerIo { q: q.ptr(), k: k.ptr(), v: v.ptr(), gates: gates.ptr(), out: out.ptr(), ..Default::default() };
    let io_bytes = [&q, &k, &v, &gates, &out].iter().map(|b| b.bytes()).sum::<usize>();
    eprintln!("prefill: inputs and output of {tmax} tokens: {:.2} GB on the device", io_bytes as f64 / GB);
    let mut rows = vec![];
    for &(hq, hkv, dk, dv) in shapes {
        for &preset in &o.presets {
            for &t in &o.prefill {
                let mut c = config(preset, (hq, hkv, dk, dv)).with_capacity(1, t);
                c.max_step_tokens = t;
                let what = format!("{hq}q/{hkv}kv {dk}/{dv} {preset:?} prefill {t}");
                let need = CudaBackend::device_bytes(&c)?;
                let (free, total) = result::mem_get_info().map_err(|e| cuda(e, "cuMemGetInfo"))?;
                eprintln!("  {what}: device buffer {:.2} GB ({:.1} of {:.1} GB free)", need as f64 / GB, free as f64 / GB, total as f64 / GB);
                if need > free {
                    return Err(nsa::NsaError::Cuda(format!("{what}: the device buffer needs {need} bytes, {free} are free")));
                }
                let mut arena = HostBuf::new(Cache::arena_bytes(&c)?);
                let mut cache = Cache::new(&c, arena.bytes())?;
                let mut gpu = CudaBackend::with_allocation(&c)?;
                let mut times = vec![];
                let mut full = vec![];
                // Sequence 0 fresh, its t tokens planned as one step.
                let fresh = |cache: &mut Cache| -> nsa::Result<()> {
                    if cache.contains(0) {
                        cache.remove(0)?;
                    }
                    cache.add_sequence(0)?;
                    cache.plan_step(&[StepSeq { seq: 0, tokens: t }])
                };
                for rep in 0..=reps {
                    fresh(&mut cache)?;
                    let ms = timer.time(stream, || {
                        gpu.upload_step(&cache, stream)?;
                        gpu.run_layer(&cache, 0, &io, stream)
                    })?;
                    eprintln!("  {what}: {} {ms:.2} ms", if rep == 0 { "warm-up" } else { "rep" });
                    // The full-attention baseline over the step just appended (the same
                    // work for both presets: measured with the first).
                    let fms = if preset == Preset::Paper && o.prefill_full {
                        let f = timer.time(stream, || gpu.attend_full(&cache, 0, io.q, io.out, stream))?;
                        eprintln!("  {what}: full attention {f:.2} ms");
                        f
                    } else {
                        f64::NAN
                    };
                    if rep > 0 {
                        times.push(ms);
                        full.push(fms);
                    }
                }
                if crate::timeline::wanted() {
                    crate::timeline::print(&mut gpu, stream, &what, 1, |gpu| {
                        fresh(&mut cache)?;
                        gpu.upload_step(&cache, stream)?;
                        gpu.run_layer(&cache, 0, &io, stream)
                    })?;
                }
                let full_s = if !o.prefill_full {
                    f64::NAN
                } else if preset == Preset::Paper {
                    median(full) * 1e-3
                } else {
                    // The paper row of the same shape and length, measured just before.
                    rows.iter().rev().find(|r: &&PrefillRow| r.tokens == t && r.preset == "paper").map_or(f64::NAN, |r| r.full_ms * 1e-3)
                };
                rows.push(PrefillRow::new(&c, preset, t, median(times) * 1e-3, full_s, o.matrix_rate));
            }
        }
    }
    Ok(rows)
}
