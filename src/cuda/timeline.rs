//! A diagnostic: when each block of each kernel of a run started, got past its wait on the
//! previous launch and ended, on the device. With `NSA_CUDA_TIMELINE=1` when the kernels
//! are compiled (and the backend created), every entry point stamps the GPU's global timer
//! into `nsa_timeline` (kernels/ptx.cuh). nsa-bench prints them for decode steps replayed
//! from a CUDA graph, where no profiler shows how the launches overlap
//! (docs/DECODE_NOTES.md). The stamps cost a few stores per block, so a normal build has
//! none of this code (another kernel-cache key: the option is part of it).

use std::ffi::{c_void, CString};

use cudarc::driver::sys;

use super::backend::CudaBackend;
use super::build::env_on;
use super::driver::{check, dtoh_sync, CtxGuard, CUstream};
use super::kernel::Kernel;
use crate::error::{NsaError, Result};

/// The device array's name in the module.
const SYMBOL: &str = "nsa_timeline";
/// Blocks recorded per kernel (the first ones by linear block index); a kernel with more
/// shows only these.
pub const TIMELINE_BLOCKS: usize = 32768;
const BLOCKS: usize = TIMELINE_BLOCKS;
/// Multiprocessors the warp-slot table covers (ids past it wrap).
const SMS: usize = 256;
/// Words per block: start, wait return, end, multiprocessor, eight marks.
const WORDS: usize = 12;

/// Whether the kernels are compiled with the timeline stamps (`NSA_CUDA_TIMELINE=1`).
pub(crate) fn enabled() -> bool {
    env_on("NSA_CUDA_TIMELINE")
}

/// The NVRTC options that turn the stamps on: the switch, the array's shape and each
/// stage's slot (its `Kernel` index), or nothing when [`enabled`] is false.
pub(crate) fn defines() -> Vec<String> {
    if enabled() {
        stamp_defines()
    } else {
        Vec::new()
    }
}

/// The options of a stamped build (see [`defines`]).
fn stamp_defines() -> Vec<String> {
    let mut d = vec![
        "-DNSA_TIMELINE".to_string(),
        format!("-DNSA_TL_SLOTS={}", Kernel::COUNT),
        format!("-DNSA_TL_BLOCKS={BLOCKS}"),
        format!("-DNSA_TL_WORDS={WORDS}"),
        format!("-DNSA_TL_SMS={SMS}"),
    ];
    d.extend(Kernel::ALL.iter().enumerate().map(|(i, k)| format!("-DNSA_TL_SLOT_{}={i}", k.stage())));
    d
}

/// One block's stamps, global-timer nanoseconds (`wait` 0 when thread 0 never waited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStamp {
    /// Linear block index (x fastest).
    pub block: u32,
    pub start: u64,
    pub wait: u64,
    pub end: u64,
    /// The multiprocessor it ran on.
    pub sm: u32,
    /// The kernel's own marks (`tl_mark` in kernels/ptx.cuh: e.g. where `attend_mma`'s tile
    /// loop begins and ends), 0 where it stamps none.
    pub marks: [u64; 8],
}

/// One kernel's blocks in a timeline run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSpan {
    /// The kernel's stage name (`cmp_mma`, `select_blocks`, ...).
    pub kernel: &'static str,
    /// Its stamped blocks, in block order (at most the first `TIMELINE_BLOCKS`).
    pub blocks: Vec<BlockStamp>,
}

impl KernelSpan {
    /// (earliest, latest) of a stamp over the blocks that have it.
    pub fn range(&self, f: impl Fn(&BlockStamp) -> u64) -> (u64, u64) {
        let v = self.blocks.iter().map(f).filter(|&t| t != 0);
        v.fold((u64::MAX, 0), |(lo, hi), t| (lo.min(t), hi.max(t)))
    }
}

/// The kernels that ran, from the raw words (`BLOCKS * WORDS` per `Kernel::ALL` slot; a
/// block with no start stamp did not run), earliest start first.
fn spans(words: &[u64]) -> Vec<KernelSpan> {
    let mut v: Vec<KernelSpan> = Kernel::ALL
        .iter()
        .zip(words.chunks_exact(BLOCKS * WORDS))
        .map(|(k, w)| KernelSpan {
            kernel: k.stage(),
            blocks: w
                .chunks_exact(WORDS)
                .enumerate()
                .filter(|(_, b)| b[0] != 0)
                .map(|(i, b)| BlockStamp { block: i as u32, start: b[0], wait: b[1], end: b[2], sm: b[3] as u32, marks: [b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]] })
                .collect(),
        })
        .filter(|s| !s.blocks.is_empty())
        .collect();
    v.sort_by_key(|s| s.range(|b| b.start).0);
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
        if bytes != Kernel::COUNT * BLOCKS * WORDS * 8 {
            return Err(NsaError::Corrupt(format!("{SYMBOL} holds {bytes} bytes, expected {}", Kernel::COUNT * BLOCKS * WORDS * 8)));
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
    /// [`timeline_reset`](Self::timeline_reset), earliest start first (~63 MB read back).
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
    fn spans_keep_stamped_blocks_and_order_by_start() {
        let mut w = vec![0u64; Kernel::COUNT * BLOCKS * WORDS];
        let at = |k: Kernel, b: usize| (k as usize * BLOCKS + b) * WORDS;
        // Select: blocks 0 and 2 ran 100..180 (block 1 has no stamp); append: block 0 at 50.
        w[at(Kernel::SelectBlocks, 0)..][..6].copy_from_slice(&[110, 120, 150, 7, 130, 140]);
        w[at(Kernel::SelectBlocks, 0) + 7] = 145;
        w[at(Kernel::SelectBlocks, 2)..][..4].copy_from_slice(&[100, 0, 180, 9]);
        w[at(Kernel::Append, 0)..][..4].copy_from_slice(&[50, 55, 90, 1]);
        let s = spans(&w);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].kernel, "append");
        assert_eq!(s[1].kernel, "select_blocks");
        assert_eq!(s[1].blocks.len(), 2);
        assert_eq!(s[1].blocks[0], BlockStamp { block: 0, start: 110, wait: 120, end: 150, sm: 7, marks: [130, 140, 0, 145, 0, 0, 0, 0] });
        assert_eq!(s[1].blocks[1], BlockStamp { block: 2, start: 100, wait: 0, end: 180, sm: 9, marks: [0; 8] });
        assert_eq!(s[1].range(|b| b.marks[1]), (140, 140));
        assert_eq!(s[1].range(|b| b.start), (100, 110));
        // A block that never waited leaves the wait range to the others.
        assert_eq!(s[1].range(|b| b.wait), (120, 120));
        assert_eq!(s[1].range(|b| b.end), (150, 180));
    }

    /// The stamped build compiles (every kernel, sm_90a) and holds the array the host
    /// reads. Needs libnvrtc like the kernel compile test (scripts/test.sh runs both);
    /// forced to run without NVRTC, it fails.
    #[test]
    #[ignore = "needs libnvrtc: scripts/test.sh runs it when NSA_NVRTC_DIR is set"]
    fn timeline_kernels_compile() {
        let extra = stamp_defines();
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        let (bin, _) = crate::cuda::compile::compile_with("sm_90a", &extra).unwrap_or_else(|e| panic!("{e}"));
        assert!(bin.starts_with(b"\x7fELF"), "a CUBIN is an ELF file");
        assert!(bin.windows(SYMBOL.len()).any(|w| w == SYMBOL.as_bytes()), "the CUBIN names {SYMBOL}");
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
