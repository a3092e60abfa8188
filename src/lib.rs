//! # nsa: an embeddable Native Sparse Attention engine
//!
//! Computes NSA attention (DeepSeek, ACL 2025; the exact function is `NSA_SPEC.md`) over a
//! paged KV cache that lives in caller-provided memory. The host plans each step once
//! ([`Cache::plan_step`]), then runs every layer against that plan on a backend
//! ([`cpu::CpuBackend`], or CUDA with the `cuda` feature). Nothing is allocated per step.
//!
//! Layers of the crate, one concept per module:
//! - [`config`]: the one configuration struct, its presets and validation;
//! - [`layout`]: byte sizes and offsets of every buffer region (pure arithmetic);
//! - [`cache`]: the paged KV manager (page pools, tables, add/fork/truncate/remove);
//! - [`plan`]: per-step bookkeeping that the backends read;
//! - [`cpu`]: the CPU backend (the same kernels the CUDA backend has);
//! - [`reference`]: a brute-force oracle straight from the spec, sharing no code with the engine;
//! - `ffi`: the C ABI (`include/nsa.h`).

pub mod cache;
pub mod config;
pub mod elem;
pub mod error;
pub mod layout;
pub mod plan;
pub mod cpu;
pub mod reference;
mod sync;
pub mod ffi;

pub use cache::Cache;
pub use config::{Config, Dtype, Phi, Preset};
pub use error::{NsaError, Result};
pub use plan::{Step, StepSeq};
