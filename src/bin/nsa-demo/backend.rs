//! The demo's two backends behind one small interface: the CPU backend, and (with
//! `--features cuda` and a usable device) the CUDA backend, which this file feeds from host
//! arrays through device buffers allocated once.

use half::bf16;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::{Cache, Config, HostBuf};
use std::time::Instant;

/// One layer run of the planned step, and the full-attention baseline, on host arrays.
/// Both return the seconds of the engine's own work, timed the same way for the two: on
/// the CPU the whole call; on CUDA from inputs already on the device to the stream's
/// completion (host-launched), without the demo's host-device copies of activations,
/// which a runtime keeps on the device.
pub trait Backend {
    fn name(&self) -> String;
    /// NSA for the step's tokens (append + all branches, and on CUDA the step's upload);
    /// `selected` if given.
    fn run(&mut self, cache: &Cache, q: &[bf16], k: &[bf16], v: &[bf16], gates: &[f32], out: &mut [bf16], selected: Option<&mut [i32]>) -> nsa::Result<f64>;
    /// Full causal attention of the step's queries over the same cache (after `run`).
    fn full(&mut self, cache: &Cache, q: &[bf16], out: &mut [bf16]) -> nsa::Result<f64>;
}

/// Seconds `f` takes, with its result.
fn timed<T>(f: impl FnOnce() -> nsa::Result<T>) -> nsa::Result<(T, f64)> {
    let t0 = Instant::now();
    let r = f()?;
    Ok((r, t0.elapsed().as_secs_f64()))
}

pub struct Cpu<'p> {
    cpu: CpuBackend<'p>,
    threads: u32,
}

impl<'p> Cpu<'p> {
    pub fn new(cfg: &Config, buf: &'p mut HostBuf) -> nsa::Result<Self> {
        Ok(Cpu { cpu: CpuBackend::new(cfg, buf.bytes())?, threads: cfg.cpu_threads })
    }
}

impl Backend for Cpu<'_> {
    fn name(&self) -> String {
        format!("the CPU ({} threads)", self.threads)
    }
    fn run(&mut self, cache: &Cache, q: &[bf16], k: &[bf16], v: &[bf16], gates: &[f32], out: &mut [bf16], selected: Option<&mut [i32]>) -> nsa::Result<f64> {
        Ok(timed(|| self.cpu.run_layer(cache, 0, LayerIo { q, k, v, gates, out, selected }, PhiWeights::default()))?.1)
    }
    fn full(&mut self, cache: &Cache, q: &[bf16], out: &mut [bf16]) -> nsa::Result<f64> {
        Ok(timed(|| self.cpu.attend_full(cache, 0, q, out))?.1)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::Gpu;

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use nsa::cuda::{CudaBackend, DeviceBuf, DeviceLayerIo};

    /// The CUDA backend plus device copies of one step's arrays (sized for the largest step).
    pub struct Gpu {
        gpu: CudaBackend,
        name: String,
        q: DeviceBuf,
        k: DeviceBuf,
        v: DeviceBuf,
        gates: DeviceBuf,
        out: DeviceBuf,
        sel: DeviceBuf,
    }

    impl Gpu {
        pub fn new(cfg: &Config) -> nsa::Result<Self> {
            let info = CudaBackend::probe()?;
            let t = cfg.max_step_tokens as usize;
            let (hq, hkv, dk, dv) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
            Ok(Gpu {
                gpu: CudaBackend::with_allocation(cfg)?,
                name: format!("CUDA ({}, sm_{}{})", info.name, info.compute_capability.0, info.compute_capability.1),
                q: DeviceBuf::new(t * hq * dk * 2)?,
                k: DeviceBuf::new(t * hkv * dk * 2)?,
                v: DeviceBuf::new(t * hkv * dv * 2)?,
                gates: DeviceBuf::new(t * hq * 3 * 4)?,
                out: DeviceBuf::new(t * hq * dv * 2)?,
                sel: DeviceBuf::new(t * hkv * cfg.sel_count as usize * 4)?,
            })
        }
    }

    impl Backend for Gpu {
        fn name(&self) -> String {
            self.name.clone()
        }
        fn run(&mut self, cache: &Cache, q: &[bf16], k: &[bf16], v: &[bf16], gates: &[f32], out: &mut [bf16], selected: Option<&mut [i32]>) -> nsa::Result<f64> {
            let s = std::ptr::null_mut();
            self.q.upload(q)?;
            self.k.upload(k)?;
            self.v.upload(v)?;
            self.gates.upload(gates)?;
            let io = DeviceLayerIo {
                q: self.q.ptr(),
                k: self.k.ptr(),
                v: self.v.ptr(),
                gates: self.gates.ptr(),
                out: self.out.ptr(),
                selected: if selected.is_some() { self.sel.ptr() } else { 0 },
                ..Default::default()
            };
            let gpu = &mut self.gpu;
            let ((), secs) = timed(|| {
                gpu.upload_step(cache, s)?;
                gpu.run_layer(cache, 0, &io, s)?;
                gpu.synchronize(s)
            })?;
            self.out.download(out)?;
            if let Some(sel) = selected {
                self.sel.download(sel)?;
            }
            Ok(secs)
        }
        fn full(&mut self, cache: &Cache, q: &[bf16], out: &mut [bf16]) -> nsa::Result<f64> {
            let s = std::ptr::null_mut();
            self.q.upload(q)?;
            let gpu = &mut self.gpu;
            let (q, o) = (self.q.ptr(), self.out.ptr());
            let ((), secs) = timed(|| {
                gpu.attend_full(cache, 0, q, o, s)?;
                gpu.synchronize(s)
            })?;
            self.out.download(out)?;
            Ok(secs)
        }
    }
}
