//! L2 flush before a timed step, by READING a scratch buffer far larger than the L2
//! (128 MiB; the H100's L2 is 50 MB). Writing it instead (a memset) would leave the L2
//! full of dirty lines, and the timed step would then pay for writing them back to HBM
//! while it reads its own K/V: a bias that matters most for small steps (a batch-16 NSA
//! decode step reads ~185 MB). Reading leaves only clean lines, which are dropped for free.
//!
//! The kernel is compiled at bench start with NVRTC for the device's architecture and
//! loaded into the current context (the bench makes device 0's primary context current).

use std::ffi::{c_char, c_void, CString};

use cudarc::driver::{result, sys};
use cudarc::nvrtc::{result as nr, sys as ns};
use nsa::cuda::DeviceBuf;

use crate::gpu::cuda;

/// Reads `n` 16-byte words (grid-stride loop), xor-accumulates them, and stores one word
/// to `sink` only when the result equals `key`, a kernel argument: the compiler cannot
/// prove the store dead, so it keeps every load. The bench passes a key that a buffer
/// filled with one repeated byte never produces, so nothing is ever written.
const SOURCE: &str = r#"
extern "C" __global__ void l2_flush(const uint4* __restrict__ p, unsigned long long n, unsigned int key, unsigned int* sink) {
    unsigned int acc = 0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == key) *sink = acc;
}
"#;

const BYTES: usize = 128 << 20;
const THREADS: u32 = 256;
/// Not of the form 0 or 0xbbbbbbbb, the only xors of words of one repeated byte.
const KEY: u32 = 0x9e37_79b9;

/// The flush kernel, its module and its buffers; the module is unloaded on drop.
pub struct L2Flush {
    module: sys::CUmodule,
    func: sys::CUfunction,
    buf: DeviceBuf,
    sink: DeviceBuf,
    blocks: u32,
    /// Bytes each flush reads: the buffer's, or fewer with `NSA_BENCH_FLUSH_MIB=N` (0: no
    /// flush; a diagnostic, to see which part of a step is cold memory: not for reports).
    read: usize,
}

impl L2Flush {
    /// Compiles and loads the kernel for `arch` (e.g. "sm_90"), allocates the scratch
    /// buffer and fills it once (so the kernel reads defined data). `sms`: multiprocessors.
    pub fn new(arch: &str, sms: i32) -> nsa::Result<L2Flush> {
        let cubin = compile(arch, false)?;
        // SAFETY: a CUBIN from NVRTC for this device's architecture; the context is current.
        let module = unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) }.map_err(|e| cuda(e, "cuModuleLoadData"))?;
        // SAFETY: the module is loaded; `l2_flush` is its kernel.
        let func = match unsafe { result::module::get_function(module, CString::new("l2_flush").expect("no NUL")) } {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: loaded above, unloaded once.
                let _ = unsafe { result::module::unload(module) };
                return Err(cuda(e, "cuModuleGetFunction"));
            }
        };
        let read = std::env::var("NSA_BENCH_FLUSH_MIB").ok().and_then(|v| v.parse::<usize>().ok()).map_or(BYTES, |m| (m << 20).min(BYTES));
        let f = L2Flush { module, func, buf: DeviceBuf::new(BYTES)?, sink: DeviceBuf::new(4)?, blocks: sms.max(1) as u32 * 8, read };
        f.buf.fill(0x5a)?;
        Ok(f)
    }

    /// Reads the whole scratch buffer on `stream`, then waits for it, so the timed work
    /// that follows starts from an idle device and a cold (clean) L2.
    pub fn run(&self, stream: sys::CUstream) -> nsa::Result<()> {
        if self.read == 0 {
            // SAFETY: a stream of the current context.
            return unsafe { result::stream::synchronize(stream) }.map_err(|e| cuda(e, "cuStreamSynchronize"));
        }
        let (mut p, mut n, mut key, mut sink) = (self.buf.ptr(), (self.read / 16) as u64, KEY, self.sink.ptr());
        let mut args = [
            &mut p as *mut u64 as *mut c_void,
            &mut n as *mut u64 as *mut c_void,
            &mut key as *mut u32 as *mut c_void,
            &mut sink as *mut u64 as *mut c_void,
        ];
        // SAFETY: the arguments match the kernel's signature and outlive the launch call;
        // the buffer holds `n` 16-byte words, the sink one word.
        unsafe {
            result::launch_kernel(self.func, (self.blocks, 1, 1), (THREADS, 1, 1), 0, stream, &mut args).map_err(|e| cuda(e, "cuLaunchKernel(l2_flush)"))?;
            result::stream::synchronize(stream).map_err(|e| cuda(e, "cuStreamSynchronize"))
        }
    }
}

impl Drop for L2Flush {
    fn drop(&mut self) {
        // SAFETY: loaded in `new`, unloaded once; every launch ended with a synchronize.
        let _ = unsafe { result::module::unload(self.module) };
    }
}

/// Compiles `SOURCE` with NVRTC: the CUBIN for `arch` ("sm_90"), or with `ptx` the PTX
/// text for a virtual one ("compute_90"). On a compile error the message carries the log.
fn compile(arch: &str, ptx: bool) -> nsa::Result<Vec<u8>> {
    let err = |call: &str, e: nr::NvrtcError| nsa::NsaError::Cuda(format!("{call} (l2_flush) failed: {:?}", e.0));
    let src = CString::new(SOURCE).expect("no NUL");
    let prog = nr::create_program(&src, Some(c"l2_flush.cu")).map_err(|e| err("nvrtcCreateProgram", e))?;
    // SAFETY: prog is live until destroy_program below; output buffers sized by NVRTC.
    let out = unsafe {
        (|| {
            if let Err(e) = nr::compile_program(prog, &[format!("--gpu-architecture={arch}")]) {
                let log = nr::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                return Err(nsa::NsaError::Cuda(format!("nvrtcCompileProgram (l2_flush) failed: {:?}; log:\n{}", e.0, String::from_utf8_lossy(&log))));
            }
            if ptx {
                let p = nr::get_ptx(prog).map_err(|e| err("nvrtcGetPTX", e))?;
                return Ok(p.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect());
            }
            let mut n = 0usize;
            ns::nvrtcGetCUBINSize(prog, &mut n).result().map_err(|e| err("nvrtcGetCUBINSize", e))?;
            let mut bin = vec![0u8; n];
            ns::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut c_char).result().map_err(|e| err("nvrtcGetCUBIN", e))?;
            Ok(bin)
        })()
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nr::destroy_program(prog) };
    out
}

#[cfg(test)]
mod tests {
    /// Needs libnvrtc (no device): `LD_LIBRARY_PATH=<nvrtc lib dir> cargo test --release
    /// --features cuda --bin nsa-bench -- --include-ignored`.
    #[test]
    #[ignore = "needs libnvrtc"]
    fn flush_kernel_compiles_and_keeps_its_loads() {
        let cubin = super::compile("sm_90", false).expect("CUBIN");
        assert!(cubin.starts_with(b"\x7fELF"), "not an ELF CUBIN");
        let ptx = String::from_utf8(super::compile("compute_90", true).expect("PTX")).expect("PTX text");
        assert!(ptx.contains("ld.global.nc.v4.u32") || ptx.contains("ld.global.nc.v4.b32"), "no 16-byte loads:\n{ptx}");
        assert!(ptx.contains("st.global.u32") || ptx.contains("st.global.b32"), "no guarded store:\n{ptx}");
    }
}
