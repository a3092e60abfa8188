//! NVRTC compilation of the kernels (`kernels/nsa.cu` and the headers it includes, see
//! [`KERNEL_FILES`]) to a CUBIN for one architecture: once per (process, architecture) in
//! memory, and optionally on disk in `NSA_CUDA_CACHE_DIR` (or a directory the caller
//! names), keyed by a hash of every source file, the options (the shared constants'
//! `-D`s included) and the NVRTC version, plus the architecture.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result as nr, sys as ns};

use crate::error::{NsaError, Result};

/// The kernels' CUDA C sources, embedded in the library, as (file name, text). The first
/// is the compiled file (the entry points); it includes the others, which NVRTC gets as
/// headers under their file names, so any kernel file can `#include "common.cuh"`.
/// Split by stage; see docs/ARCHITECTURE.md.
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("nsa.cu", include_str!("../../kernels/nsa.cu")),
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("ptx.cuh", include_str!("../../kernels/ptx.cuh")),
    ("append.cuh", include_str!("../../kernels/append.cuh")),
    ("attend.cuh", include_str!("../../kernels/attend.cuh")),
    ("attend_mma.cuh", include_str!("../../kernels/attend_mma.cuh")),
    ("compressed.cuh", include_str!("../../kernels/compressed.cuh")),
    ("selection.cuh", include_str!("../../kernels/selection.cuh")),
    ("selected.cuh", include_str!("../../kernels/selected.cuh")),
    ("combine.cuh", include_str!("../../kernels/combine.cuh")),
    ("full.cuh", include_str!("../../kernels/full.cuh")),
    ("wgmma.cuh", include_str!("../../kernels/wgmma.cuh")),
    ("prefill_parts.cuh", include_str!("../../kernels/prefill_parts.cuh")),
    ("prefill_nonfinite.cuh", include_str!("../../kernels/prefill_nonfinite.cuh")),
    ("prefill.cuh", include_str!("../../kernels/prefill.cuh")),
    ("prefill_blocks.cuh", include_str!("../../kernels/prefill_blocks.cuh")),
    ("prefill_repair.cuh", include_str!("../../kernels/prefill_repair.cuh")),
];

/// The text of kernel file `name` (one of [`KERNEL_FILES`]).
#[cfg(test)]
pub(crate) fn source(name: &str) -> &'static str {
    KERNEL_FILES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s).unwrap_or_else(|| panic!("no kernel file {name}"))
}

/// NVRTC options besides the architecture: the language, then the shared constants
/// (`consts.rs`), then the timeline stamps' switch when asked for (`timeline.rs`).
/// `-lineinfo` (no effect on the code) lets Nsight Compute attribute stalls to source
/// lines.
pub fn options() -> Vec<String> {
    let mut o: Vec<String> = ["-std=c++17", "--fmad=true", "-default-device", "-lineinfo"].iter().map(|s| s.to_string()).collect();
    o.extend(super::consts::nvrtc_defines());
    o.extend(super::timeline::defines());
    o
}

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
    let opts = options().join(" ");
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * KERNEL_FILES.len() + 3);
    for (name, text) in KERNEL_FILES {
        parts.push(name.as_bytes());
        parts.push(text.as_bytes());
    }
    parts.extend([opts.as_bytes(), ver.as_bytes(), arch.as_bytes()]);
    let h = fnv1a(&parts);
    Ok(format!("nsa-{h:016x}-{arch}.cubin"))
}

fn memory_cache() -> &'static Mutex<HashMap<String, std::sync::Arc<Vec<u8>>>> {
    static C: OnceLock<Mutex<HashMap<String, std::sync::Arc<Vec<u8>>>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The CUBIN for `arch` (e.g. "sm_90"): from this process's cache, else from
/// `disk_dir/<key>` when given and readable, else compiled now. A `disk_dir` that does not
/// hold it yet gets it written (best effort: a failing write is ignored), also when it
/// came from this process's cache.
pub fn cubin(arch: &str, disk_dir: Option<&Path>) -> Result<std::sync::Arc<Vec<u8>>> {
    let key = cache_key(arch)?;
    let path: Option<PathBuf> = disk_dir.map(|d| d.join(&key));
    let cached = memory_cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
    let (bin, on_disk) = match cached {
        Some(c) => (c, path.as_ref().is_some_and(|p| p.is_file())),
        None => {
            let (b, on_disk) = match path.as_ref().and_then(|p| std::fs::read(p).ok()).filter(|b| b.len() > 16) {
                Some(b) => (b, true),
                None => (compile(arch)?, false),
            };
            let b = std::sync::Arc::new(b);
            memory_cache().lock().unwrap_or_else(|e| e.into_inner()).insert(key, b.clone());
            (b, on_disk)
        }
    };
    if let (false, Some(dir), Some(p)) = (on_disk, disk_dir, path.as_ref()) {
        let _ = std::fs::create_dir_all(dir);
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, bin.as_slice()).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(bin)
}

/// Compiles the kernels for `arch` (e.g. `sm_90a`) and returns the CUBIN. On a compile
/// error the message carries NVRTC's log.
pub fn compile(arch: &str) -> Result<Vec<u8>> {
    compile_with(arch, &[]).map(|(bin, _)| bin)
}

/// [`compile`] with `extra` options after the engine's own; returns the CUBIN and NVRTC's
/// log (with `--ptxas-options=-v`, ptxas's per-kernel resource report).
pub(crate) fn compile_with(arch: &str, extra: &[&str]) -> Result<(Vec<u8>, String)> {
    let cstr = |s: &str| CString::new(s).expect("kernel sources have no NUL");
    let (entry_name, entry) = KERNEL_FILES[0];
    let (src, name) = (cstr(entry), cstr(entry_name));
    let headers: Vec<CString> = KERNEL_FILES[1..].iter().map(|(_, t)| cstr(t)).collect();
    let names: Vec<CString> = KERNEL_FILES[1..].iter().map(|(n, _)| cstr(n)).collect();
    let hp: Vec<*const c_char> = headers.iter().map(|c| c.as_ptr()).collect();
    let np: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
    let mut prog: ns::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a NUL-terminated string alive for the call; NVRTC copies them.
    unsafe { ns::nvrtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), hp.len() as i32, hp.as_ptr(), np.as_ptr()) }
        .result()
        .map_err(|e| nvrtc_err("nvrtcCreateProgram", e))?;
    let mut opts = options();
    opts.push(format!("--gpu-architecture={arch}"));
    opts.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: prog is live until destroy_program below.
    let res = unsafe { nr::compile_program(prog, &opts) };
    let out = (|| {
        // SAFETY: as above.
        let log = unsafe { nr::get_program_log(prog) }.unwrap_or_default();
        let log: Vec<u8> = log.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
        let log = String::from_utf8_lossy(&log).into_owned();
        if let Err(e) = res {
            return Err(NsaError::Cuda(format!("nvrtcCompileProgram failed: {:?} for {arch}; log:\n{log}", e.0)));
        }
        let mut n = 0usize;
        // SAFETY: as above; buffer sized by NVRTC.
        unsafe { ns::nvrtcGetCUBINSize(prog, &mut n) }.result().map_err(|e| nvrtc_err("nvrtcGetCUBINSize", e))?;
        let mut bin = vec![0u8; n];
        unsafe { ns::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut c_char) }
            .result()
            .map_err(|e| nvrtc_err("nvrtcGetCUBIN", e))?;
        Ok((bin, log))
    })();
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nr::destroy_program(prog) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ptxas's report of every function in `log`: (name, spill store bytes, spill load bytes).
    fn spills(log: &str) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        let mut name: Option<String> = None;
        for line in log.lines() {
            if let Some(i) = line.find("Function properties for ") {
                name = Some(line[i + "Function properties for ".len()..].trim().to_string());
            } else if let (Some(n), true) = (&name, line.contains("spill stores")) {
                let num = |what: &str| -> u64 {
                    let before = &line[..line.find(what).expect("ptxas report line")];
                    before.split_whitespace().next_back().and_then(|x| x.parse().ok()).expect("a byte count")
                };
                out.push((n.clone(), num("bytes spill stores"), num("bytes spill loads")));
                name = None;
            }
        }
        out
    }

    #[test]
    fn spill_report_is_parsed() {
        let log = "ptxas info    : Function properties for nsa_a_f32\n\
                   ptxas         .     0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n";
        assert_eq!(spills(log), vec![("nsa_a_f32".to_string(), 8, 12)]);
    }

    #[test]
    fn cache_key_covers_every_kernel_file() {
        // The key hashes names and texts of every file: a header's change recompiles.
        assert!(KERNEL_FILES.len() > 2);
        let entry = KERNEL_FILES[0].1;
        for (name, _) in &KERNEL_FILES[1..] {
            assert!(entry.contains(&format!("#include \"{name}\"")), "kernels/nsa.cu does not include {name}");
        }
        let names: std::collections::HashSet<_> = KERNEL_FILES.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), KERNEL_FILES.len());
    }

    /// Tolerated spills: (architecture, entry name, spill store bytes, spill load bytes),
    /// read off the SASS (2026-12-03, thirty-first session): the 8-warp `pf_cmp_ws` forms
    /// (used where the 12-warp ones do not fit) keep one to four words of the gated
    /// compressed part in local memory between their passes and their window, stored and
    /// loaded once a block, and the moving-window ones at 192/128 one 64-bit value, reloaded
    /// once per window tile; `pf_repair` (at 56 registers) one or two loop counters and
    /// row values across its scalar attention passes (a launch that does work only where a
    /// non-finite value was found; force-inlining those passes did not change it). Every
    /// 12-warp form is spill-free. (Earlier tolerated spills, all gone: the non-finite
    /// guard's scalar product in the tile loops cost the 12-warp `pf_cmp_ws` forms,
    /// `pfb_attn` and `pf_sw` at 192/128 4 to 80 bytes from the twenty-ninth session until
    /// it moved into `pf_repair` and `pf_cmp_ws`'s scans were split among its warps in the
    /// thirty-first; the 12-warp warp-specialised pf_cmp kept 6-8 words until its producer
    /// warpgroup handed registers to the consumers, prefill variant 26; the window-only
    /// 192/128 `pf_sww_wg` one 64-bit value until Q was loaded by cp.async, variant 29; the
    /// combine three words around its batch of eight float4 loads from decode variant 25
    /// until variant 35.)
    /// The test fails on any spill not listed and when a listed one changes or disappears.
    const KNOWN_SPILLS: &[(&str, &str, u64, u64)] = &[
        ("sm_90a", "nsa_pf_cmp_wgs8_bf16_128_128", 4, 4),
        ("sm_90a", "nsa_pf_cmp_wgs8_f16_128_128", 12, 12),
        ("sm_90a", "nsa_pf_cmp_wgs8_f16_192_128", 16, 16),
        ("sm_90a", "nsa_pf_cmp_wgs8w_bf16_192_128", 8, 8),
        ("sm_90a", "nsa_pf_cmp_wgs8w_f16_192_128", 8, 8),
        ("sm_90a", "nsa_pf_repair_bf16", 4, 4),
        ("sm_90a", "nsa_pf_repair_f16", 4, 4),
        ("sm_80", "nsa_pf_repair_bf16", 8, 24),
        ("sm_80", "nsa_pf_repair_f16", 8, 24),
    ];

    /// Compiles every kernel with the engine's own options for sm_90a and sm_80 (NVRTC
    /// needs no GPU) and fails on any spill
    /// but the [`KNOWN_SPILLS`]. Needs libnvrtc on the loader path:
    /// scripts/test.sh runs it when `NSA_NVRTC_DIR` names an install (CI installs one);
    /// forced to run without NVRTC, it fails.
    #[test]
    #[ignore = "needs libnvrtc: scripts/test.sh runs it when NSA_NVRTC_DIR is set"]
    fn kernels_compile_without_spills() {
        // SAFETY: only probes for the shared library.
        if !std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false) {
            panic!("libnvrtc not found on the loader path (this test was asked for explicitly)");
        }
        for arch in ["sm_90a", "sm_80"] {
            let (bin, log) = compile_with(arch, &["--ptxas-options=-v"]).unwrap_or_else(|e| panic!("{e}"));
            assert!(bin.len() > 1000);
            // For reading the SASS (nvdisasm) and register counts without a GPU:
            // NSA_SPILL_CUBIN_DIR=dir keeps each CUBIN and its ptxas report.
            if let Some(dir) = std::env::var_os("NSA_SPILL_CUBIN_DIR") {
                std::fs::write(Path::new(&dir).join(format!("nsa-{arch}.cubin")), &bin).expect("writing the CUBIN");
                std::fs::write(Path::new(&dir).join(format!("nsa-{arch}.ptxas.txt")), &log).expect("writing the ptxas report");
            }
            let report = spills(&log);
            for k in super::super::kernel::Kernel::ALL {
                for name in k.entries() {
                    assert!(report.iter().any(|(n, _, _)| *n == name), "{arch}: no ptxas report for {name}");
                }
            }
            let known = |n: &str| KNOWN_SPILLS.iter().find(|(a, k, _, _)| *a == arch && n.starts_with(k)).map(|&(_, _, st, ld)| (st, ld));
            let spilled: Vec<_> = report.iter().filter(|(n, st, ld)| (*st > 0 || *ld > 0 || known(n).is_some()) && known(n) != Some((*st, *ld))).collect();
            assert!(spilled.is_empty(), "{arch}: register spills differ from KNOWN_SPILLS (new spills, or a known one changed or gone: update the list): {spilled:?}");
            // ptxas's "Potential Performance Loss" notes on wgmma (C7510-C7519: products
            // serialised, waits injected) mean a product pipeline silently runs one
            // product at a time (prefill variant 26 found them after a non-wgmma write or
            // a conditional wait).
            let serialised: Vec<&str> = log.lines().filter(|l| l.contains("(C751")).collect();
            assert!(serialised.is_empty(), "{arch}: ptxas serialises wgmma: {serialised:#?}");
            println!("{arch}: {} functions, no spills but the known ones {KNOWN_SPILLS:?}", report.len());
        }
    }

    /// The instructions of `sass` (`cuobjdump -sass` output) whose memory descriptor is an odd
    /// uniform register, as (function, instruction). A descriptor is a 64-bit pair of uniform
    /// registers and must start at an even one: NVRTC 13.0's ptxas once emitted
    /// `LDGSTS [R+UR0], desc[UR1][R.64]` for a cp.async whose shared base it kept in a uniform
    /// register, and the GPU stopped at it with an illegal instruction (docs/DECODE_NOTES.md,
    /// variant 130's 192/128 fault).
    fn odd_descriptors(sass: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut function = String::new();
        for line in sass.lines() {
            if let Some(i) = line.find("Function : ") {
                function = line[i + "Function : ".len()..].trim().to_string();
                continue;
            }
            for after in line.split("desc[UR").skip(1) {
                let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
                if digits.parse::<u32>().is_ok_and(|r| r % 2 == 1) {
                    out.push((function.clone(), line.trim().to_string()));
                }
            }
        }
        out
    }

    #[test]
    fn odd_descriptor_registers_are_found() {
        let sass = "\t\tFunction : nsa_a\n        /*0100*/  LDGSTS.E.BYPASS.LTC128B.128 [R3+UR0], desc[UR1][R4.64] ;  /* 0x0 */\n\
                    \t\tFunction : nsa_b\n        /*0200*/  LDG.E.128 R4, desc[UR4][R2.64] ;\n        /*0210*/  STG.E desc[UR10][R2.64+0x4], R9 ;\n\
                    \t\tFunction : nsa_c\n        /*0300*/  STG.E desc[UR6][R2.64], R1 ; LDG.E R1, desc[UR13][R4.64] ;\n";
        let odd = odd_descriptors(sass);
        assert_eq!(odd.len(), 2, "{odd:?}");
        assert_eq!(odd[0].0, "nsa_a");
        assert!(odd[0].1.contains("desc[UR1]"));
        assert_eq!(odd[1].0, "nsa_c");
        assert!(odd[1].1.contains("desc[UR13]"));
    }

    /// The sm_90a kernels, compiled with the engine's options, disassembled with `cuobjdump
    /// -sass`: no instruction addresses memory through an odd descriptor register (see
    /// `odd_descriptors`). Needs libnvrtc on the loader path and `NSA_CUDA_BIN_DIR` naming a
    /// folder with `cuobjdump` and `nvdisasm` (pip's nvidia-cuda-cuobjdump and
    /// nvidia-cuda-nvdisasm: scripts/test.sh sets it when `NSA_NVRTC_DIR` holds them); forced
    /// to run without them, it fails.
    #[test]
    #[ignore = "needs libnvrtc, cuobjdump and nvdisasm: scripts/test.sh runs it when NSA_NVRTC_DIR holds them"]
    fn kernels_sass_has_no_odd_descriptor_register() {
        let bin_dir = PathBuf::from(std::env::var_os("NSA_CUDA_BIN_DIR").expect("NSA_CUDA_BIN_DIR (cuobjdump and nvdisasm) is not set"));
        for tool in ["cuobjdump", "nvdisasm"] {
            assert!(bin_dir.join(tool).is_file(), "no {tool} in {}", bin_dir.display());
        }
        let (bin, _) = compile_with("sm_90a", &[]).unwrap_or_else(|e| panic!("{e}"));
        let path = std::env::temp_dir().join(format!("nsa-sass-check-{}.cubin", std::process::id()));
        std::fs::write(&path, &bin).expect("writing the CUBIN");
        let mut paths = vec![bin_dir.clone()];
        paths.extend(std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default());
        let run = std::process::Command::new(bin_dir.join("cuobjdump"))
            .arg("-sass")
            .arg(&path)
            .env("PATH", std::env::join_paths(paths).expect("a PATH"))
            .output()
            .expect("running cuobjdump");
        let _ = std::fs::remove_file(&path);
        assert!(run.status.success(), "cuobjdump -sass failed: {}", String::from_utf8_lossy(&run.stderr));
        let sass = String::from_utf8_lossy(&run.stdout);
        // Not vacuous: every entry was disassembled and the kernels do address memory by
        // descriptors.
        for k in super::super::kernel::Kernel::ALL {
            for name in k.entries() {
                assert!(sass.contains(&format!("Function : {name}\n")), "no SASS for {name}");
            }
        }
        assert!(sass.matches("desc[UR").count() > 1000, "the SASS addresses memory by descriptors");
        let odd = odd_descriptors(&sass);
        assert!(odd.is_empty(), "instructions with an odd descriptor register (illegal on the GPU): {odd:#?}");
    }

    /// `cuda::precompile` writes the CUBIN under its cache key, `cubin` then reads that
    /// file for a backend, and a second call finds it. Needs libnvrtc like the test above
    /// (scripts/test.sh runs both); forced to run without NVRTC, it fails.
    #[test]
    #[ignore = "needs libnvrtc: scripts/test.sh runs it when NSA_NVRTC_DIR is set"]
    fn precompile_fills_the_kernel_cache() {
        let dir = std::env::temp_dir().join(format!("nsa-precompile-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = crate::cuda::precompile("sm_80", &dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(path, dir.join(cache_key("sm_80").unwrap()));
        let written = std::fs::read(&path).expect("the cache file");
        assert!(written.len() > 1000 && written.starts_with(b"\x7fELF"), "a CUBIN is an ELF file");
        assert_eq!(*cubin("sm_80", Some(&dir)).unwrap(), written);
        assert_eq!(crate::cuda::precompile("sm_80", &dir).unwrap(), path);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
