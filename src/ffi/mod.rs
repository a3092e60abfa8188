//! The C ABI (`include/nsa.h`, generated from this module by cbindgen; `tests/header.rs`
//! checks it is current). One concept per file:
//!
//! - `status`: status codes, the thread-local last error, the panic boundary;
//! - `args`: checks of pointers, ranges, handles and `struct_size`-versioned structs;
//! - `version`: ABI and library versions;
//! - `config`: `nsa_config_t`, presets, validation;
//! - `cache`: `struct nsa_cache` in the caller's arena, sequence operations, the step plan;
//! - `cpu`: `struct nsa_cpu_backend` in the caller's buffer, the per-layer run;
//! - `cuda`: `struct nsa_cuda_backend`, the CUDA backend (or its `BACKEND_UNAVAILABLE` stubs);
//! - `state`: one sequence's state saved to and restored from a caller buffer;
//! - `api`: the versioned function table returned by `nsa_get_api`.
//!
//! Conventions (docs/ARCHITECTURE.md, "C ABI conventions"): every fallible call returns an
//! `nsa_status` and writes its outputs only on success; every body runs inside
//! `status::guard`, so a panic becomes `NSA_STATUS_PANIC` and never unwinds into C; every
//! pointer, range and struct size is checked before the core is called, and the core
//! changes nothing when it fails, so a failing call leaves the cache as it was.
#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)] // the safety contract is written in nsa.h, for C callers

// Declaration order is the order of the header's items.
pub mod version;
pub mod status;
pub mod config;
pub mod cache;
pub mod cpu;
pub mod cuda;
pub mod state;
pub mod api;
mod args;

pub use api::*;
pub use cache::*;
pub use config::*;
pub use cpu::*;
pub use cuda::*;
pub use state::*;
pub use status::*;
pub use version::*;
