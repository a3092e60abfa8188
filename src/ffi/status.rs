//! Status codes, the thread-local last-error message, and the panic boundary every
//! exported body runs inside.

use std::cell::RefCell;
use std::ffi::c_char;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::NsaError;

/// What every fallible `nsa_*` call returns: `NSA_STATUS_OK` (0) on success, otherwise one
/// of the `NSA_STATUS_*` codes. On failure `nsa_last_error()` describes what was wrong, and
/// nothing was changed: no output parameter was written, and every cache and backend is
/// exactly as before the call. New codes may be added in later versions; treat an unknown
/// non-zero code as a failure.
pub type nsa_status = i32;

/// Success.
pub const NSA_STATUS_OK: nsa_status = 0;
/// An argument is out of range or inconsistent with another (the message names it).
pub const NSA_STATUS_INVALID_ARGUMENT: nsa_status = 1;
/// A pointer argument that must not be NULL is NULL.
pub const NSA_STATUS_NULL_POINTER: nsa_status = 2;
/// A struct's `struct_size` is smaller than this library's struct, implausibly large, or
/// larger with non-zero bytes in the part this library does not know.
pub const NSA_STATUS_BAD_STRUCT_SIZE: nsa_status = 3;
/// A handle argument is not a live handle of its type (never initialized, or already
/// deinitialized/destroyed).
pub const NSA_STATUS_INVALID_HANDLE: nsa_status = 4;
/// A configuration field is out of range or inconsistent with another field.
pub const NSA_STATUS_INVALID_CONFIG: nsa_status = 5;
/// A caller-supplied buffer is smaller than the matching size query returned.
pub const NSA_STATUS_BUFFER_TOO_SMALL: nsa_status = 6;
/// A caller-supplied pointer is not aligned as documented.
pub const NSA_STATUS_MISALIGNED: nsa_status = 7;
/// The sequence id is in range but no sequence lives there.
pub const NSA_STATUS_UNKNOWN_SEQUENCE: nsa_status = 8;
/// The sequence id already holds a live sequence.
pub const NSA_STATUS_SEQUENCE_EXISTS: nsa_status = 9;
/// The raw or compressed page pool has too few free pages for the call.
pub const NSA_STATUS_OUT_OF_PAGES: nsa_status = 10;
/// A sequence would grow past the config's `max_seq_len`.
pub const NSA_STATUS_SEQUENCE_TOO_LONG: nsa_status = 11;
/// A layer was run (or a step aborted) with no step planned, or after a cache operation
/// ended the step.
pub const NSA_STATUS_NO_STEP: nsa_status = 12;
/// The requested backend cannot run on this machine.
pub const NSA_STATUS_BACKEND_UNAVAILABLE: nsa_status = 13;
/// A CUDA driver, NVRTC or kernel error.
pub const NSA_STATUS_CUDA_ERROR: nsa_status = 14;
/// An internal error (a Rust panic caught at the C boundary, so it never unwinds into C):
/// a bug in the engine, please report it with the message. Unlike other failures, the
/// call may have done part of its work: treat its outputs, and the cache or backend it
/// was given, as unusable and initialize them again.
pub const NSA_STATUS_PANIC: nsa_status = 15;
/// `nsa_cache_check` found the cache's bookkeeping inconsistent (its arena was written by
/// someone else, or an engine bug): the message names the first violation. Treat the
/// cache as unusable.
pub const NSA_STATUS_CORRUPT: nsa_status = 16;
/// A step is open (planned, and some layer has not run yet): the call would act on
/// positions that layer has not written. The message names the step, the layers not yet
/// run and the positions. Run the missing layers, or `nsa_cache_abort_step`. Also what
/// `nsa_cache_check` returns for an open step.
pub const NSA_STATUS_STEP_OPEN: nsa_status = 17;
/// The layer already ran in the planned step: each layer runs exactly once per step.
pub const NSA_STATUS_LAYER_ALREADY_RUN: nsa_status = 18;
/// Another call is using the backend right now (calls on one backend must not overlap);
/// the call did nothing.
pub const NSA_STATUS_BUSY: nsa_status = 19;

/// Every status code's name, indexed by code (the one list `nsa_status_string` reads).
const NAMES: [&str; 20] = [
    "NSA_STATUS_OK\0",
    "NSA_STATUS_INVALID_ARGUMENT\0",
    "NSA_STATUS_NULL_POINTER\0",
    "NSA_STATUS_BAD_STRUCT_SIZE\0",
    "NSA_STATUS_INVALID_HANDLE\0",
    "NSA_STATUS_INVALID_CONFIG\0",
    "NSA_STATUS_BUFFER_TOO_SMALL\0",
    "NSA_STATUS_MISALIGNED\0",
    "NSA_STATUS_UNKNOWN_SEQUENCE\0",
    "NSA_STATUS_SEQUENCE_EXISTS\0",
    "NSA_STATUS_OUT_OF_PAGES\0",
    "NSA_STATUS_SEQUENCE_TOO_LONG\0",
    "NSA_STATUS_NO_STEP\0",
    "NSA_STATUS_BACKEND_UNAVAILABLE\0",
    "NSA_STATUS_CUDA_ERROR\0",
    "NSA_STATUS_PANIC\0",
    "NSA_STATUS_CORRUPT\0",
    "NSA_STATUS_STEP_OPEN\0",
    "NSA_STATUS_LAYER_ALREADY_RUN\0",
    "NSA_STATUS_BUSY\0",
];

/// A failed call: the status to return and the message for `nsa_last_error`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: nsa_status,
    pub msg: String,
}

pub(crate) type FfiResult<T = ()> = Result<T, Failure>;

impl Failure {
    pub fn new(status: nsa_status, msg: impl Into<String>) -> Failure {
        Failure { status, msg: msg.into() }
    }
    pub fn null(arg: &str) -> Failure {
        Failure::new(NSA_STATUS_NULL_POINTER, format!("null pointer: {arg} is NULL"))
    }
}

impl From<NsaError> for Failure {
    fn from(e: NsaError) -> Failure {
        let status = match &e {
            NsaError::InvalidConfig { .. } => NSA_STATUS_INVALID_CONFIG,
            NsaError::InvalidArgument { .. } => NSA_STATUS_INVALID_ARGUMENT,
            NsaError::BufferTooSmall { .. } => NSA_STATUS_BUFFER_TOO_SMALL,
            NsaError::Misaligned { .. } => NSA_STATUS_MISALIGNED,
            NsaError::UnknownSequence { .. } => NSA_STATUS_UNKNOWN_SEQUENCE,
            NsaError::SequenceExists { .. } => NSA_STATUS_SEQUENCE_EXISTS,
            NsaError::OutOfPages { .. } => NSA_STATUS_OUT_OF_PAGES,
            NsaError::SequenceTooLong { .. } => NSA_STATUS_SEQUENCE_TOO_LONG,
            NsaError::NoStep => NSA_STATUS_NO_STEP,
            NsaError::StepOpen { .. } => NSA_STATUS_STEP_OPEN,
            NsaError::LayerAlreadyRun { .. } => NSA_STATUS_LAYER_ALREADY_RUN,
            NsaError::Busy(_) => NSA_STATUS_BUSY,
            NsaError::BackendUnavailable(_) => NSA_STATUS_BACKEND_UNAVAILABLE,
            NsaError::Cuda(_) => NSA_STATUS_CUDA_ERROR,
            NsaError::Panic(_) => NSA_STATUS_PANIC,
            NsaError::Corrupt(_) => NSA_STATUS_CORRUPT,
        };
        Failure::new(status, e.to_string())
    }
}

thread_local! {
    /// The calling thread's last failure message, NUL-terminated; empty before any failure.
    static LAST_ERROR: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn set_last_error(func: &str, msg: &str) {
    let _ = LAST_ERROR.try_with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        let _ = write!(buf, "{func}: {msg}");
        buf.retain(|&b| b != 0);
        buf.push(0);
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "unknown panic payload".into(),
    }
}

/// The panic boundary of every fallible exported function: runs `body`, maps its error
/// (or a panic) to a status and records the message, prefixed with `func`, as the
/// thread's last error.
pub(crate) fn guard(func: &'static str, body: impl FnOnce() -> FfiResult) -> nsa_status {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return NSA_STATUS_OK,
        Ok(Err(f)) => f,
        Err(payload) => Failure::from(NsaError::Panic(panic_message(&*payload))),
    };
    set_last_error(func, &failure.msg);
    failure.status
}

/// The panic boundary of exported functions that cannot fail: `fallback` on a panic.
pub(crate) fn guard_infallible<T>(func: &'static str, fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        set_last_error(func, &NsaError::Panic(panic_message(&*payload)).to_string());
        fallback
    })
}

/// The name of a status code, such as `"NSA_STATUS_OUT_OF_PAGES"`, or `"NSA_STATUS_UNKNOWN"`
/// for a code this library does not define.
///
/// Returns a static NUL-terminated string (never NULL; do not free it). Thread-safe.
#[no_mangle]
pub extern "C" fn nsa_status_string(status: nsa_status) -> *const c_char {
    guard_infallible("nsa_status_string", "NSA_STATUS_UNKNOWN\0", || {
        usize::try_from(status).ok().and_then(|i| NAMES.get(i)).copied().unwrap_or("NSA_STATUS_UNKNOWN\0")
    })
    .as_ptr()
    .cast()
}

/// A human-readable description of the calling thread's most recent failed `nsa_*` call:
/// the function, then what was wrong, naming the argument or field and the value seen,
/// e.g. `"nsa_cache_fork: unknown sequence: 7 is not an active sequence"`.
///
/// Returns `""` if no call has failed on this thread. Successful calls do not clear it.
/// The string belongs to the library and stays valid until the next failing `nsa_*` call
/// on the same thread or the thread's exit; copy it to keep it. Never NULL.
///
/// Thread safety: the message is per thread, so concurrent failures on other threads do
/// not affect it.
#[no_mangle]
pub extern "C" fn nsa_last_error() -> *const c_char {
    const EMPTY: &[u8] = b"\0";
    guard_infallible("nsa_last_error", EMPTY.as_ptr(), || {
        LAST_ERROR
            .try_with(|buf| {
                let buf = buf.borrow();
                // The Vec's heap block does not move until the next failure rewrites it.
                if buf.is_empty() {
                    EMPTY.as_ptr()
                } else {
                    buf.as_ptr()
                }
            })
            .unwrap_or(EMPTY.as_ptr())
    })
    .cast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        unsafe { CStr::from_ptr(nsa_last_error()) }.to_str().unwrap().to_owned()
    }

    #[test]
    fn names_match_codes() {
        let codes = [
            (NSA_STATUS_OK, "NSA_STATUS_OK"),
            (NSA_STATUS_INVALID_ARGUMENT, "NSA_STATUS_INVALID_ARGUMENT"),
            (NSA_STATUS_NULL_POINTER, "NSA_STATUS_NULL_POINTER"),
            (NSA_STATUS_BAD_STRUCT_SIZE, "NSA_STATUS_BAD_STRUCT_SIZE"),
            (NSA_STATUS_INVALID_HANDLE, "NSA_STATUS_INVALID_HANDLE"),
            (NSA_STATUS_INVALID_CONFIG, "NSA_STATUS_INVALID_CONFIG"),
            (NSA_STATUS_BUFFER_TOO_SMALL, "NSA_STATUS_BUFFER_TOO_SMALL"),
            (NSA_STATUS_MISALIGNED, "NSA_STATUS_MISALIGNED"),
            (NSA_STATUS_UNKNOWN_SEQUENCE, "NSA_STATUS_UNKNOWN_SEQUENCE"),
            (NSA_STATUS_SEQUENCE_EXISTS, "NSA_STATUS_SEQUENCE_EXISTS"),
            (NSA_STATUS_OUT_OF_PAGES, "NSA_STATUS_OUT_OF_PAGES"),
            (NSA_STATUS_SEQUENCE_TOO_LONG, "NSA_STATUS_SEQUENCE_TOO_LONG"),
            (NSA_STATUS_NO_STEP, "NSA_STATUS_NO_STEP"),
            (NSA_STATUS_BACKEND_UNAVAILABLE, "NSA_STATUS_BACKEND_UNAVAILABLE"),
            (NSA_STATUS_CUDA_ERROR, "NSA_STATUS_CUDA_ERROR"),
            (NSA_STATUS_PANIC, "NSA_STATUS_PANIC"),
            (NSA_STATUS_CORRUPT, "NSA_STATUS_CORRUPT"),
            (NSA_STATUS_STEP_OPEN, "NSA_STATUS_STEP_OPEN"),
            (NSA_STATUS_LAYER_ALREADY_RUN, "NSA_STATUS_LAYER_ALREADY_RUN"),
            (NSA_STATUS_BUSY, "NSA_STATUS_BUSY"),
        ];
        assert_eq!(codes.len(), NAMES.len());
        for (code, name) in codes {
            assert_eq!(unsafe { CStr::from_ptr(nsa_status_string(code)) }.to_str().unwrap(), name);
        }
        for bad in [-1, 20, i32::MAX, i32::MIN] {
            assert_eq!(unsafe { CStr::from_ptr(nsa_status_string(bad)) }.to_str().unwrap(), "NSA_STATUS_UNKNOWN");
        }
    }

    #[test]
    fn panics_become_a_status_and_a_message() {
        let st = guard("nsa_test", || panic!("boom {}", 42));
        assert_eq!(st, NSA_STATUS_PANIC);
        assert_eq!(last(), "nsa_test: internal error (panic): boom 42");
        assert_eq!(guard_infallible("nsa_test2", 7, || -> i32 { panic!("static") }), 7);
        assert_eq!(last(), "nsa_test2: internal error (panic): static");
    }

    #[test]
    fn errors_are_per_thread_and_kept_across_successes() {
        let st = guard("nsa_a", || Err(NsaError::UnknownSequence { seq: 3 }.into()));
        assert_eq!(st, NSA_STATUS_UNKNOWN_SEQUENCE);
        assert_eq!(guard("nsa_b", || Ok(())), NSA_STATUS_OK);
        assert_eq!(last(), "nsa_a: unknown sequence: 3 is not an active sequence");
        std::thread::spawn(|| assert_eq!(last(), "")).join().unwrap();
        let st = guard("nsa_c", || Err(Failure::new(NSA_STATUS_INVALID_ARGUMENT, "a\0b")));
        assert_eq!(st, NSA_STATUS_INVALID_ARGUMENT);
        assert_eq!(last(), "nsa_c: ab");
    }
}
