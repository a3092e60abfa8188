//! NVRTC compilation of `kernels/nsa.cu` to a CUBIN for one architecture: once per
//! (process, architecture) in memory, and optionally on disk in `NSA_CUDA_CACHE_DIR`
//! (or a directory the caller names), keyed by a hash of the source, the options and the
//! NVRTC version, plus the architecture.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result as nr, sys as ns};

use crate::error::{NsaError, Result};

/// The kernels' CUDA C source, embedded in the library.
pub const KERNEL_SOURCE: &str = include_str!("../../kernels/nsa.cu");

/// NVRTC options besides the architecture. `-lineinfo` (no effect on the code) lets
/// Nsight Compute attribute stalls to source lines.
const OPTIONS: &[&str] = &["-std=c++17", "--fmad=true", "-default-device", "-lineinfo"];

fn nvrtc_err(call: &str, e: nr::NvrtcError) -> NsaError {
    NsaError::Cuda(format!("{call} failed: {:?}", e.0))
}

/// NVRTC's version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut a, mut b) = (0, 0);
    // SAFETY: plain query; the library's presence was checked by the caller.
    unsafe { ns::nvrtcVersion(&mut a, &mut b) }.result().map_err(|e| nvrtc_err("nvrtcVersion", e))?;
    Ok((a, b))
}

/// FNV-1a, 64-bit: a stable hash for the cache key (no dependency, same on every run).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Cache file name for an architecture `sm_XY`.
pub fn cache_key(arch: &str) -> Result<String> {
    let (a, b) = nvrtc_version()?;
    let ver = format!("{a}.{b}");
    let h = fnv1a(&[KERNEL_SOURCE.as_bytes(), OPTIONS.join(" ").as_bytes(), ver.as_bytes(), arch.as_bytes()]);
    Ok(format!("nsa-{h:016x}-{arch}.cubin"))
}

fn memory_cache() -> &'static Mutex<HashMap<String, std::sync::Arc<Vec<u8>>>> {
    static C: OnceLock<Mutex<HashMap<String, std::sync::Arc<Vec<u8>>>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The CUBIN for `arch` (e.g. "sm_90"): from this process's cache, else from
/// `disk_dir/<key>` when given and readable, else compiled now (and then written there,
/// best effort: a failing write is ignored).
pub fn cubin(arch: &str, disk_dir: Option<&Path>) -> Result<std::sync::Arc<Vec<u8>>> {
    let key = cache_key(arch)?;
    if let Some(c) = memory_cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    let path: Option<PathBuf> = disk_dir.map(|d| d.join(&key));
    let bin = match path.as_ref().and_then(|p| std::fs::read(p).ok()).filter(|b| b.len() > 16) {
        Some(b) => b,
        None => {
            let b = compile(arch)?;
            if let (Some(dir), Some(p)) = (disk_dir, path.as_ref()) {
                let _ = std::fs::create_dir_all(dir);
                let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &b).is_ok() {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
            b
        }
    };
    let bin = std::sync::Arc::new(bin);
    memory_cache().lock().unwrap_or_else(|e| e.into_inner()).insert(key, bin.clone());
    Ok(bin)
}

/// Compiles the kernels for `arch` and returns the CUBIN. On a compile error the message
/// carries NVRTC's log.
pub fn compile(arch: &str) -> Result<Vec<u8>> {
    let src = CString::new(KERNEL_SOURCE).expect("kernel source has no NUL");
    let prog = nr::create_program(&src, Some(c"nsa.cu")).map_err(|e| nvrtc_err("nvrtcCreateProgram", e))?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    // SAFETY: prog is live until destroy_program below.
    let res = unsafe { nr::compile_program(prog, &opts) };
    let out = (|| {
        if let Err(e) = res {
            // SAFETY: as above.
            let log = unsafe { nr::get_program_log(prog) }.unwrap_or_default();
            let log: Vec<u8> = log.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            return Err(NsaError::Cuda(format!(
                "nvrtcCompileProgram failed: {:?} for {arch}; log:\n{}",
                e.0,
                String::from_utf8_lossy(&log)
            )));
        }
        let mut n = 0usize;
        // SAFETY: as above; buffer sized by NVRTC.
        unsafe { ns::nvrtcGetCUBINSize(prog, &mut n) }.result().map_err(|e| nvrtc_err("nvrtcGetCUBINSize", e))?;
        let mut bin = vec![0u8; n];
        unsafe { ns::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut c_char) }
            .result()
            .map_err(|e| nvrtc_err("nvrtcGetCUBIN", e))?;
        Ok(bin)
    })();
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nr::destroy_program(prog) };
    out
}
