//! A diagnostic: when each kernel of a run started and ended on the device. With
//! `NSA_CUDA_TIMELINE=1` when the kernels are compiled (and the backend created), every
//! entry point stamps the GPU's global timer into `nsa_timeline` (kernels/ptx.cuh): per
//! kernel, its first and last block start and its first and last warp end. nsa-bench
//! prints them for decode steps replayed from a CUDA graph, where no profiler shows how
//! the launches overlap (docs/DECODE_NOTES.md). The stamps cost a few atomics per block,
//! so a normal build has none of this code (another kernel-cache key: the option is part
//! of it).

use std::ffi::{c_void, CString};

use cudarc::driver::sys;

use super::backend::CudaBackend;
use super::build::env_on;
use super::driver::{check, dtoh_sync, CtxGuard, CUstream};
use super::kernel::Kernel;
use crate::error::{NsaError, Result};

/// The device array's name in the module.
const SYMBOL: &str = "nsa_timeline";
/// Words per kernel slot: first start, last start, first end, last end (minima stored as
/// the maxima of their complements).
const WORDS: usize = 4;

/// Whether the kernels are compiled with the timeline stamps (`NSA_CUDA_TIMELINE=1`).
pub(crate) fn enabled() -> bool {
    env_on("NSA_CUDA_TIMELINE")
}

/// The NVRTC options that turn the stamps on: the switch, the slot count and each
/// stage's slot (its `Kernel` index), or nothing when [`enabled`] is false.
pub(crate) fn defines() -> Vec<String> {
    if !enabled() {
        return Vec::new();
    }
    let mut d = vec!["-DNSA_TIMELINE".to_string(), format!("-DNSA_TL_SLOTS={}", Kernel::COUNT)];
    d.extend(Kernel::ALL.iter().enumerate().map(|(i, k)| format!("-DNSA_TL_SLOT_{}={i}", k.stage())));
    d
}

/// One kernel's stamps in a timeline run, global-timer nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpan {
    /// The kernel's stage name (`cmp_mma`, `select_blocks`, ...).
    pub kernel: &'static str,
    pub first_start: u64,
    pub last_start: u64,
    pub first_end: u64,
    pub last_end: u64,
}

/// The kernels that ran, from the raw words (`WORDS` per `Kernel::ALL` slot; a slot
/// with no stamp is left out), earliest start first.
fn spans(words: &[u64]) -> Vec<KernelSpan> {
    let mut v: Vec<KernelSpan> = Kernel::ALL
        .iter()
        .zip(words.chunks_exact(WORDS))
        .filter(|(_, w)| w[1] != 0)
        .map(|(k, w)| KernelSpan { kernel: k.stage(), first_start: !w[0], last_start: w[1], first_end: !w[2], last_end: w[3] })
        .collect();
    v.sort_by_key(|s| s.first_start);
    v
}

impl CudaBackend {
    /// The stamps' device array and its size in bytes; an error naming the knob when the
    /// kernels were compiled without them.
    fn timeline_array(&self) -> Result<(u64, usize)> {
        let name = CString::new(SYMBOL).expect("no NUL");
        let (mut ptr, mut bytes) = (0u64, 0usize);
        // SAFETY: the module is loaded while the backend lives; out-pointers are locals.
        let r = unsafe { sys::cuModuleGetGlobal_v2(&mut ptr, &mut bytes, self.kernels().module(), name.as_ptr()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(NsaError::InvalidArgument {
                arg: "NSA_CUDA_TIMELINE",
                value: std::env::var("NSA_CUDA_TIMELINE").unwrap_or_default(),
                reason: "the kernels were compiled without timeline stamps: set NSA_CUDA_TIMELINE=1 before creating the backend".into(),
            });
        }
        if bytes != Kernel::COUNT * WORDS * 8 {
            return Err(NsaError::Corrupt(format!("{SYMBOL} holds {bytes} bytes, expected {}", Kernel::COUNT * WORDS * 8)));
        }
        Ok((ptr, bytes))
    }

    /// Clears the timeline stamps on `stream` (before the run to be observed). Diagnostic
    /// only: fails unless the backend was created with `NSA_CUDA_TIMELINE=1`.
    pub fn timeline_reset(&self, stream: CUstream) -> Result<()> {
        let _g = CtxGuard::push(self.ctx)?;
        let (ptr, bytes) = self.timeline_array()?;
        // SAFETY: the module's own array, `bytes` long; stream-ordered before later runs.
        check(unsafe { sys::cuMemsetD8Async(ptr, 0, bytes, stream) }, "cuMemsetD8Async")
    }

    /// Waits for `stream` and returns the stamps of every kernel that ran since the last
    /// [`timeline_reset`](Self::timeline_reset), earliest start first.
    pub fn timeline_read(&self, stream: CUstream) -> Result<Vec<KernelSpan>> {
        let _g = CtxGuard::push(self.ctx)?;
        let (ptr, bytes) = self.timeline_array()?;
        let mut words = vec![0u64; bytes / 8];
        // SAFETY: `words` holds `bytes` bytes; the array is the module's.
        unsafe { dtoh_sync(words.as_mut_ptr() as *mut c_void, ptr, bytes, stream)? };
        Ok(spans(&words))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_decode_complements_and_order_by_start() {
        let mut w = vec![0u64; Kernel::COUNT * WORDS];
        let at = |k: Kernel| k as usize * WORDS;
        // Select ran 100..180 (blocks started 100..110, warps ended 150..180); append
        // 50..90; nothing else.
        w[at(Kernel::SelectBlocks)..at(Kernel::SelectBlocks) + 4].copy_from_slice(&[!100, 110, !150, 180]);
        w[at(Kernel::Append)..at(Kernel::Append) + 4].copy_from_slice(&[!50, 60, !70, 90]);
        let s = spans(&w);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], KernelSpan { kernel: "append", first_start: 50, last_start: 60, first_end: 70, last_end: 90 });
        assert_eq!(s[1].kernel, "select_blocks");
        assert_eq!((s[1].first_start, s[1].last_end), (100, 180));
    }

    #[test]
    fn kernels_stamp_only_known_stages() {
        // Every stage named by an entry's NSA_TIMELINE_SCOPE must have a slot define.
        let src = crate::cuda::compile::source("nsa.cu");
        let stages: Vec<&str> = Kernel::ALL.iter().map(|k| k.stage()).collect();
        let mut seen = 0;
        for part in src.split("NSA_TIMELINE_SCOPE(").skip(1) {
            let name = &part[..part.find(')').expect("closing parenthesis")];
            // `name` is the macro parameter of the generic entries (append, cmp_mma, ...).
            assert!(name == "name" || stages.contains(&name), "no slot for stage {name}");
            seen += 1;
        }
        assert!(seen >= 9, "entries stamped: {seen}");
    }
}
