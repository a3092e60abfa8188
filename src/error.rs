//! The engine's one error type. Every message names what was wrong and the value seen,
//! because the C ABI hands these strings straight to the caller (`nsa_last_error`).

use thiserror::Error;

/// Everything that can go wrong in a call. A call that returns an error has changed
/// nothing: no sequence, page or step plan is different from before the call.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NsaError {
    /// A configuration field is out of range or inconsistent with another field.
    #[error("invalid config: {field} = {value}: {reason}")]
    InvalidConfig { field: &'static str, value: String, reason: String },

    /// An argument of a call is out of range, of the wrong size, or inconsistent.
    #[error("invalid argument: {arg} = {value}: {reason}")]
    InvalidArgument { arg: &'static str, value: String, reason: String },

    /// A caller-supplied buffer is smaller than the size query asked for.
    #[error("buffer too small: {what} has {got} bytes, needs {need}")]
    BufferTooSmall { what: &'static str, got: usize, need: usize },

    /// A caller-supplied buffer is not aligned as the engine needs.
    #[error("buffer misaligned: {what} at address {addr:#x} must be aligned to {align} bytes")]
    Misaligned { what: &'static str, addr: usize, align: usize },

    /// The sequence id is in range but no sequence lives there.
    #[error("unknown sequence: {seq} is not an active sequence")]
    UnknownSequence { seq: u32 },

    /// The sequence id already holds a live sequence.
    #[error("sequence {seq} already exists")]
    SequenceExists { seq: u32 },

    /// The page pool cannot satisfy the call.
    #[error("out of {pool} pages: the call needs {need} free pages, {free} are free")]
    OutOfPages { pool: &'static str, need: u32, free: u32 },

    /// A sequence would grow beyond the configured `max_seq_len`.
    #[error("sequence {seq} would reach length {len}, past max_seq_len = {max}")]
    SequenceTooLong { seq: u32, len: u64, max: u32 },

    /// A layer call came without a planned step, or for a step that is no longer current.
    #[error("no step is planned: call plan_step before running layers")]
    NoStep,

    /// A step is planned and not every layer has run: the call would act on positions
    /// some layers have not written. Run the missing layers, or abort the step.
    #[error("step {step} is still open: {missing}; run them, or call abort_step to undo the step")]
    StepOpen { step: u32, missing: String },

    /// The layer already ran in the planned step (each layer runs exactly once per step).
    #[error("layer {layer} already ran in step {step}: each layer runs exactly once per step")]
    LayerAlreadyRun { layer: u32, step: u32 },

    /// Another call is using the object right now (concurrent calls on one backend).
    #[error("busy: {0}")]
    Busy(String),

    /// The backend requested is not usable on this machine (for example CUDA without a driver).
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),

    /// A CUDA driver, NVRTC or kernel error.
    #[error("cuda: {0}")]
    Cuda(String),

    /// The cache's internal invariants do not hold (the arena was overwritten by someone
    /// else, or a bug). Found by `Cache::check_invariants` / `nsa_cache_check`.
    #[error("cache state is corrupt: {0}")]
    Corrupt(String),

    /// A Rust panic was caught at the C boundary (a bug in the engine; please report it).
    #[error("internal error (panic): {0}")]
    Panic(String),
}

impl NsaError {
    pub(crate) fn config(field: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        NsaError::InvalidConfig { field, value: value.to_string(), reason: reason.into() }
    }

    pub(crate) fn arg(arg: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        NsaError::InvalidArgument { arg, value: value.to_string(), reason: reason.into() }
    }
}

pub type Result<T, E = NsaError> = std::result::Result<T, E>;
