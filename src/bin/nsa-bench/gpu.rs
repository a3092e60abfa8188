//! CUDA decode benchmark (`--gpu`, needs `--features cuda` and a device): for each point,
//! a cache filled to the context length with append-only layer runs, then timed decode
//! steps of NSA (`upload_step` + `run_layer`: append, compress, all branches), of the same
//! step with the layer replayed from a CUDA graph, and of the in-repo full-attention
//! baseline (`attend_full`, attention only) over the same paged cache, in the same run.
//! CUDA events, warm-up, median; the L2 (50 MB on an H100) is flushed before every timed
//! step by a kernel that READS a 128 MiB scratch buffer on the step's stream (`flush.rs`:
//! writing it would leave dirty lines for the timed step to write back); the floor is the
//! step's bytes over the device-to-device bandwidth measured in the run. Then the prefill
//! points (`prefill.rs`).

use cudarc::driver::{result, sys};
use half::bf16;
use nsa::cuda::{CudaBackend, DeviceBuf, DeviceLayerIo};
use nsa::{Cache, HostBuf};

use crate::common::{bf16s, config, each_seq, fill, Shape};
use crate::flush::L2Flush;
use crate::report::{median, Medians, Results, Row, RunInfo};
use crate::rng::Rng;
use crate::Opts;

pub fn cuda(e: cudarc::driver::DriverError, what: &str) -> nsa::NsaError {
    nsa::NsaError::Cuda(format!("{what}: {e:?}"))
}

pub struct Timer {
    a: sys::CUevent,
    b: sys::CUevent,
}

impl Timer {
    pub fn new() -> nsa::Result<Timer> {
        let mk = || result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| cuda(e, "cuEventCreate"));
        Ok(Timer { a: mk()?, b: mk()? })
    }
    /// Milliseconds `f` takes on `stream`.
    pub fn time(&self, stream: sys::CUstream, f: impl FnOnce() -> nsa::Result<()>) -> nsa::Result<f64> {
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

/// `n` bf16 values in [-scale, scale) on the device: up to 64 Mi random ones from the
/// host, repeated on the device past that (prefill inputs run to GBs).
pub fn random_bf16(rng: &mut Rng, n: usize, scale: f32) -> nsa::Result<DeviceBuf> {
    let first = n.min(1 << 26);
    let host: Vec<bf16> = bf16s(rng, first, scale);
    let d = DeviceBuf::new(n * 2)?;
    d.upload(&host)?;
    let (mut have, bytes, stream) = (first * 2, n * 2, std::ptr::null_mut());
    while have < bytes {
        let c = have.min(bytes - have);
        // SAFETY: both ranges lie inside the allocation and do not overlap.
        unsafe { result::memcpy_dtod_async(d.ptr() + have as u64, d.ptr(), c, stream).map_err(|e| cuda(e, "cuMemcpyDtoDAsync"))? };
        have += c;
    }
    // SAFETY: the legacy default stream.
    unsafe { result::stream::synchronize(stream).map_err(|e| cuda(e, "cuStreamSynchronize")) }?;
    Ok(d)
}

/// Layer 0 of a decode step captured once in a CUDA graph, on a stream of its own (the
/// legacy default stream cannot be captured). Replays serve every later decode step of
/// the same batch: grid shapes depend only on the step's token and sequence counts, and
/// the kernels read lengths, positions and page tables from the uploaded plan. The graph
/// bakes in the `DeviceLayerIo` pointers. Destroyed on drop.
struct DecodeGraph {
    stream: sys::CUstream,
    exec: sys::CUgraphExec,
}

impl DecodeGraph {
    /// Captures `run_layer` of the planned step with `io` and runs that step by launching
    /// the graph once.
    fn capture(gpu: &mut CudaBackend, cache: &Cache, io: &DeviceLayerIo) -> nsa::Result<DecodeGraph> {
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(|e| cuda(e, "cuStreamCreate"))?;
        let mut g = DecodeGraph { stream, exec: std::ptr::null_mut() };
        gpu.upload_step(cache, stream)?;
        // SAFETY: the stream is live; the capture is ended on every path; the graph is
        // destroyed once, after instantiation.
        unsafe {
            result::stream::begin_capture(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(|e| cuda(e, "cuStreamBeginCapture"))?;
            let ran = gpu.run_layer(cache, 0, io, stream);
            let graph = result::stream::end_capture(stream).map_err(|e| cuda(e, "cuStreamEndCapture"));
            ran?;
            let graph = graph?;
            let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)).map_err(|e| cuda(e, "cuGraphInstantiate"));
            result::graph::destroy(graph).map_err(|e| cuda(e, "cuGraphDestroy"))?;
            g.exec = exec?;
        }
        g.launch()?;
        gpu.synchronize(stream)?;
        Ok(g)
    }

    fn launch(&self) -> nsa::Result<()> {
        // SAFETY: exec and stream live until drop.
        unsafe { result::graph::launch(self.exec, self.stream) }.map_err(|e| cuda(e, "cuGraphLaunch"))
    }

}

impl Drop for DecodeGraph {
    fn drop(&mut self) {
        // SAFETY: created in `capture`, destroyed once; the stream is idle (every use ends
        // with a synchronize).
        unsafe {
            if !self.exec.is_null() {
                let _ = result::graph::exec_destroy(self.exec);
            }
            let _ = result::stream::destroy(self.stream);
        }
    }
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

pub fn run(o: &Opts) -> nsa::Result<Results> {
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
    let mut res = Results {
        run: RunInfo::now(format!("{} (CUDA driver API {}, NVRTC {}.{}, {})", info.name, info.driver_version, info.nvrtc_version.0, info.nvrtc_version.1, info.arch)),
        ..Default::default()
    };
    let mut rng = Rng::new(3);
    let flush = L2Flush::new(&info.arch, info.multiprocessors)?;
    let timer = Timer::new()?;
    let bw = bandwidth(stream, &timer)?;
    let default: &[Shape] = if o.quick { &[(16, 2, 64, 64)] } else { &[(64, 4, 128, 128), (64, 4, 192, 128)] };
    let shapes: &[Shape] = o.shapes.as_deref().unwrap_or(default);
    for &(hq, hkv, dk, dv) in shapes {
        for &preset in &o.presets {
            for &ctx in &o.contexts {
                for &batch in &o.batches {
                    let b = batch as usize;
                    let chunk = (65536 / b).clamp(1, 4096) as u32;
                    // Each timed rep decodes two steps (plain and graph), the capture one more.
                    let steps = 2 * (o.reps as u32 + 3) + 1;
                    let mut c = config(preset, (hq, hkv, dk, dv)).with_capacity(batch, ctx + steps + 8);
                    c.max_step_tokens = chunk * batch;
                    let mut arena = HostBuf::new(Cache::arena_bytes(&c)?);
                    let mut cache = Cache::new(&c, arena.bytes())?;
                    let mut gpu = CudaBackend::with_allocation(&c)?;
                    for s in 0..batch {
                        cache.add_sequence(s)?;
                    }
                    // Fill: append-only layer runs over one random chunk of K/V, reused.
                    let rows_max = (chunk * batch) as usize;
                    let (k, v) = (random_bf16(&mut rng, rows_max * hkv * dk, 1.0)?, random_bf16(&mut rng, rows_max * hkv * dv, 1.0)?);
                    fill(&mut cache, batch, ctx, chunk, |cache, _| {
                        gpu.upload_step(cache, stream)?;
                        gpu.run_layer(cache, 0, &DeviceLayerIo { k: k.ptr(), v: v.ptr(), ..Default::default() }, stream)
                    })?;
                    gpu.synchronize(stream)?;
                    // Decode steps: fresh q each of 4 rotations (copied into `gq` for the
                    // graph, whose pointers are fixed at capture).
                    let qs: Vec<DeviceBuf> = (0..4).map(|_| random_bf16(&mut rng, b * hq * dk, 2.0)).collect::<nsa::Result<_>>()?;
                    let gq = DeviceBuf::new(b * hq * dk * 2)?;
                    let gates = DeviceBuf::new(b * hq * 3 * 4)?;
                    gates.upload(&vec![1.0f32 / 3.0; b * hq * 3])?;
                    let out = DeviceBuf::new(b * hq * dv * 2)?;
                    let entries = each_seq(batch, 1);
                    cache.plan_step(&entries)?;
                    let gio = DeviceLayerIo { q: gq.ptr(), k: k.ptr(), v: v.ptr(), gates: gates.ptr(), out: out.ptr(), ..Default::default() };
                    let graph = DecodeGraph::capture(&mut gpu, &cache, &gio)?;
                    let (mut t_nsa, mut t_full, mut t_graph, mut t_upload) = (vec![], vec![], vec![], vec![]);
                    for rep in 0..o.reps + 3 {
                        cache.plan_step(&entries)?;
                        let q = qs[rep % 4].ptr();
                        let io = DeviceLayerIo { q, k: k.ptr(), v: v.ptr(), gates: gates.ptr(), out: out.ptr(), ..Default::default() };
                        flush.run(stream)?;
                        let tn = timer.time(stream, || {
                            gpu.upload_step(&cache, stream)?;
                            gpu.run_layer(&cache, 0, &io, stream)
                        })?;
                        flush.run(stream)?;
                        let tf = timer.time(stream, || gpu.attend_full(&cache, 0, q, out.ptr(), stream))?;
                        cache.plan_step(&entries)?;
                        // On the graph's stream, before the flush that then evicts it.
                        // SAFETY: both buffers hold b * hq * dk bf16 values.
                        unsafe { result::memcpy_dtod_async(gq.ptr(), q, gq.bytes(), graph.stream).map_err(|e| cuda(e, "cuMemcpyDtoDAsync"))? };
                        // The plan's upload (once per step for every layer) is timed apart;
                        // the graph replays the layer alone.
                        let tu = timer.time(graph.stream, || gpu.upload_step(&cache, graph.stream))?;
                        flush.run(graph.stream)?;
                        let tg = timer.time(graph.stream, || graph.launch())?;
                        cache.mark_layer_run(0)?; // the replay did not go through run_layer
                        if rep >= 3 {
                            t_nsa.push(tn);
                            t_full.push(tf);
                            t_graph.push(tg);
                            t_upload.push(tu);
                        }
                    }
                    if crate::timeline::wanted() {
                        let label = format!("{hq}q/{hkv}kv {dk}/{dv} {preset:?} context {ctx} batch {batch}");
                        crate::timeline::print(&mut gpu, graph.stream, &format!("{label} graph"), 3, |gpu| {
                            cache.plan_step(&entries)?;
                            gpu.upload_step(&cache, graph.stream)?;
                            flush.run(graph.stream)?;
                            graph.launch()?;
                            cache.mark_layer_run(0)
                        })?;
                        crate::timeline::print(&mut gpu, stream, &format!("{label} host"), 3, |gpu| {
                            cache.plan_step(&entries)?;
                            flush.run(stream)?;
                            gpu.upload_step(&cache, stream)?;
                            gpu.run_layer(&cache, 0, &gio, stream)
                        })?;
                    }
                    let t = Medians {
                        nsa: median(t_nsa) * 1e-3,
                        full: median(t_full) * 1e-3,
                        graph: Some(median(t_graph) * 1e-3),
                        upload: Some(median(t_upload) * 1e-3),
                    };
                    res.decode.push(Row::decode("cuda", &c, preset, batch, ctx, t, bw));
                    eprintln!("  done: {hq}q/{hkv}kv {dk}/{dv} {preset:?} context {ctx} batch {batch}");
                }
            }
        }
    }
    // Prefill also at the small groups the issue names (G = 4 and 8: 64 query heads over
    // 16 and 8 KV heads), where the decode-shaped kernels pad G to 16 mma rows.
    let mut prefill_shapes = shapes.to_vec();
    if !o.quick && o.shapes.is_none() {
        prefill_shapes.extend([(64, 16, 128, 128), (64, 8, 128, 128)]);
    }
    res.prefill = crate::prefill::run(o, &prefill_shapes, &timer, stream)?;
    Ok(res)
}
