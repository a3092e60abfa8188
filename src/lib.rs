//! # nsa: an embeddable Native Sparse Attention engine
//!
//! Computes NSA attention (DeepSeek, ACL 2025; the exact function is `docs/SPEC.md`) over a
//! paged KV cache that lives in caller-provided memory. The host plans each step once
//! ([`Cache::plan_step`]), then runs every layer against that plan on a backend
//! ([`cpu::CpuBackend`], or CUDA with the `cuda` feature). Nothing is allocated per step.
//!
//! ```
//! use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
//! use nsa::{Cache, Config, Dtype, HostBuf, Preset, StepSeq};
//!
//! let mut cfg = Config::preset(Preset::Paper)
//!     .with_shape(8, 2, 64, 64) // HQ, HKV, DK, DV
//!     .with_capacity(2, 4096); // 2 sequences of up to 4096 tokens; pools sized to fit
//! cfg.dtype = Dtype::F32;
//!
//! // The caller owns the memory: ask for the sizes, allocate once.
//! let mut arena = HostBuf::new(Cache::arena_bytes(&cfg)?);
//! let mut pools = HostBuf::new(CpuBackend::buffer_bytes(&cfg)?);
//! let mut cache = Cache::new(&cfg, arena.bytes())?;
//! let mut cpu = CpuBackend::new(&cfg, pools.bytes())?;
//!
//! cache.add_sequence(0)?;
//! let (t, hq, hkv, d) = (100, 8, 2, 64);
//! let q = vec![0.1f32; t * hq * d];
//! let (k, v) = (vec![0.2f32; t * hkv * d], vec![0.3f32; t * hkv * d]);
//! let gates = vec![1.0f32 / 3.0; t * hq * 3];
//! let mut out = vec![0f32; t * hq * d];
//!
//! // Once per step: which sequences append how many tokens.
//! cache.plan_step(&[StepSeq { seq: 0, tokens: t as u32 }])?;
//! // Once per layer: append K/V, emit compressed tokens, attend.
//! let io = LayerIo { q: &q, k: &k, v: &v, gates: &gates, out: &mut out, selected: None };
//! cpu.run_layer(&cache, 0, io, PhiWeights::default())?;
//! // Every value row is 0.3. The last token sees all three branches: 0.3. Token 0 has no
//! // compressed token yet (that branch outputs zero), so it gets 2/3 of 0.3.
//! assert!((out[(t - 1) * hq * d] - 0.3).abs() < 1e-6);
//! assert!((out[0] - 0.2).abs() < 1e-6);
//! # Ok::<(), nsa::NsaError>(())
//! ```
//!
//! Layers of the crate, one concept per module:
//! - [`config`]: the one configuration struct, its presets and validation;
//! - [`layout`]: byte sizes and offsets of every buffer region (pure arithmetic);
//! - [`cache`]: the paged KV manager (page pools, tables, add/fork/truncate/remove);
//! - [`plan`]: per-step bookkeeping that the backends read;
//! - [`cpu`]: the CPU backend (the same kernels the CUDA backend has);
//! - `reference` (cargo feature `reference`, for tests and benchmarks; not in the shipped
//!   library): a brute-force oracle straight from the spec, sharing no code with the engine;
//! - `ffi`: the C ABI (`include/nsa.h`).

pub mod cache;
pub mod config;
pub mod elem;
pub mod error;
mod host_buf;
pub mod layout;
pub mod plan;
pub mod cpu;
pub mod cuda;
#[cfg(feature = "reference")]
pub mod reference;
#[cfg(test)]
mod rng;
mod sync;
mod zero_pad;
pub mod ffi;

pub use cache::{Cache, CacheBinding};
pub use config::{Config, Dtype, Phi, Preset};
pub use error::{NsaError, Result};
pub use host_buf::HostBuf;
pub use plan::{Step, StepSeq};
