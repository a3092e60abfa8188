//! CUDA decode benchmark (`--gpu`, needs `--features cuda` and a device): for each point,
//! a cache filled to the context length with append-only layer runs, then timed decode
//! steps of NSA (`upload_step` + `run_layer`: append, compress, all branches) and of the
//! in-repo full-attention baseline (`attend_full`, attention only) over the same paged
//! cache, in the same run. CUDA events on one stream, warm-up, median; the L2 (50 MB on
//! an H100) is flushed before every timed step by writing a 128 MiB scratch buffer; the
//! floor is the step's bytes over the device-to-device bandwidth measured in the run.

use cudarc::driver::{result, sys};
use half::bf16;
use nsa::cuda::{CudaBackend, DeviceBuf, DeviceLayerIo};
use nsa::{Cache, Config, Dtype, HostBuf, Preset, StepSeq};

use crate::report::Row;
use crate::rng::Rng;
use crate::Opts;

fn cuda(e: cudarc::driver::DriverError, what: &str) -> nsa::NsaError {
    nsa::NsaError::Cuda(format!("{what}: {e:?}"))
}

struct Timer {
    a: sys::CUevent,
    b: sys::CUevent,
}

impl Timer {
    fn new() -> nsa::Result<Timer> {
        let mk = || result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| cuda(e, "cuEventCreate"));
        Ok(Timer { a: mk()?, b: mk()? })
    }
    /// Milliseconds `f` takes on `stream`.
    fn time(&self, stream: sys::CUstream, f: impl FnOnce() -> nsa::Result<()>) -> nsa::Result<f64> {
        // SAFETY: events and stream are live for the call.
        unsafe {
            result::event::record(self.a, stream).map_err(|e| cuda(e, "cuEventRecord"))?;
            f()?;
            result::event::record(self.b, stream).map_err(|e| cuda(e, "cuEventRecord"))?;
            result::stream::synchronize(stream).map_err(|e| cuda(e, "cuStreamSynchronize"))?;
            Ok(result::event::elapsed(self.a, self.b).map_err(|e| cuda(e, "cuEventElapsedTime"))? as f64)
        }
    }
}

fn upload_bf16(rng: &mut Rng, n: usize, scale: f32) -> nsa::Result<DeviceBuf> {
    let host: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.unit() * scale)).collect();
    let d = DeviceBuf::new(n * 2)?;
    d.upload(&host)?;
    Ok(d)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Device-to-device copy bandwidth, bytes read + written per second (best of 5 x 1 GiB).
fn bandwidth(stream: sys::CUstream, t: &Timer) -> nsa::Result<f64> {
    let n = 1usize << 30;
    let (a, b) = (DeviceBuf::new(n)?, DeviceBuf::new(n)?);
    let mut best = 0f64;
    for _ in 0..5 {
        // SAFETY: both buffers hold n bytes.
        let ms = t.time(stream, || unsafe { result::memcpy_dtod_async(b.ptr(), a.ptr(), n, stream).map_err(|e| cuda(e, "cuMemcpyDtoDAsync")) })?;
        best = best.max(2.0 * n as f64 / (ms * 1e-3));
    }
    Ok(best)
}

pub fn run(o: &Opts) -> nsa::Result<Vec<Row>> {
    let info = CudaBackend::probe()?;
    // The engine works in device 0's primary context (pushing it around each call); the
    // bench's own events and copies need it current on this thread too.
    // SAFETY: plain driver calls; the retained context lives until the process exits.
    unsafe {
        result::init().map_err(|e| cuda(e, "cuInit"))?;
        let dev = result::device::get(0).map_err(|e| cuda(e, "cuDeviceGet"))?;
        let ctx = result::primary_ctx::retain(dev).map_err(|e| cuda(e, "cuDevicePrimaryCtxRetain"))?;
        result::ctx::set_current(ctx).map_err(|e| cuda(e, "cuCtxSetCurrent"))?;
    }
    eprintln!("GPU: {} (sm_{}{}), {} SMs", info.name, info.compute_capability.0, info.compute_capability.1, info.multiprocessors);
    let stream: sys::CUstream = std::ptr::null_mut();
    let mut rows = vec![];
    let mut rng = Rng::new(3);
    let flush = DeviceBuf::new(128 << 20)?;
    let timer = Timer::new()?;
    let bw = bandwidth(stream, &timer)?;
    let shapes: &[(usize, usize, usize, usize)] = if o.quick { &[(16, 2, 64, 64)] } else { &[(64, 4, 128, 128), (64, 4, 192, 128)] };
    for &(hq, hkv, dk, dv) in shapes {
        for preset in [Preset::Paper, Preset::Fla] {
            for &ctx in &o.contexts {
                for &batch in &o.batches {
                    let b = batch as usize;
                    let chunk = (65536 / b).clamp(1, 4096) as u32;
                    let mut c = Config::preset(preset).with_shape(hq as u32, hkv as u32, dk as u32, dv as u32).with_capacity(batch, ctx + o.reps as u32 + 8);
                    c.dtype = Dtype::Bf16;
                    c.max_step_tokens = chunk * batch;
                    let mut arena = HostBuf::new(Cache::arena_bytes(&c)?);
                    let mut cache = Cache::new(&c, arena.bytes())?;
                    let mut gpu = CudaBackend::with_allocation(&c)?;
                    for s in 0..batch {
                        cache.add_sequence(s)?;
                    }
                    // Fill: append-only layer runs over one random chunk of K/V, reused.
                    let rows_max = (chunk * batch) as usize;
                    let (k, v) = (upload_bf16(&mut rng, rows_max * hkv * dk, 1.0)?, upload_bf16(&mut rng, rows_max * hkv * dv, 1.0)?);
                    let mut done = 0;
                    while done < ctx {
                        let n = chunk.min(ctx - done);
                        let entries: Vec<StepSeq> = (0..batch).map(|s| StepSeq { seq: s, tokens: n }).collect();
                        cache.plan_step(&entries)?;
                        gpu.upload_step(&cache, stream)?;
                        gpu.run_layer(&cache, 0, &DeviceLayerIo { k: k.ptr(), v: v.ptr(), ..Default::default() }, stream)?;
                        done += n;
                    }
                    gpu.synchronize(stream)?;
                    // Decode steps: fresh q each of 4 rotations.
                    let qs: Vec<DeviceBuf> = (0..4).map(|_| upload_bf16(&mut rng, b * hq * dk, 2.0)).collect::<nsa::Result<_>>()?;
                    let gates = DeviceBuf::new(b * hq * 3 * 4)?;
                    gates.upload(&vec![1.0f32 / 3.0; b * hq * 3])?;
                    let out = DeviceBuf::new(b * hq * dv * 2)?;
                    let (mut t_nsa, mut t_full) = (vec![], vec![]);
                    for rep in 0..o.reps + 3 {
                        let entries: Vec<StepSeq> = (0..batch).map(|s| StepSeq { seq: s, tokens: 1 }).collect();
                        cache.plan_step(&entries)?;
                        let q = qs[rep % 4].ptr();
                        let io = DeviceLayerIo { q, k: k.ptr(), v: v.ptr(), gates: gates.ptr(), out: out.ptr(), ..Default::default() };
                        flush.fill((rep % 251) as u8)?;
                        let tn = timer.time(stream, || {
                            gpu.upload_step(&cache, stream)?;
                            gpu.run_layer(&cache, 0, &io, stream)
                        })?;
                        flush.fill((rep % 253) as u8)?;
                        let tf = timer.time(stream, || gpu.attend_full(&cache, 0, q, out.ptr(), stream))?;
                        if rep >= 3 {
                            t_nsa.push(tn);
                            t_full.push(tf);
                        }
                    }
                    rows.push(Row::decode("cuda", &c, preset, batch, ctx, median(t_nsa) * 1e-3, median(t_full) * 1e-3, bw));
                    eprintln!("  done: {hq}q/{hkv}kv {dk}/{dv} {preset:?} context {ctx} batch {batch}");
                }
            }
        }
    }
    Ok(rows)
}
