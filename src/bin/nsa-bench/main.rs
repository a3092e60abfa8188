//! nsa-bench: decode (and, on CUDA, prefill) timings of NSA next to the engine's own
//! full-attention baseline over the same paged cache, measured in one run on one
//! machine, with each time set beside its physical floor.
//!
//! `cargo run --release --bin nsa-bench -- --help` lists the options. Results print as
//! markdown tables (decode, then prefill); `--json FILE` also writes them as JSON,
//! `{"decode": [...], "prefill": [...]}`.

mod common;
mod cpu;
#[cfg(feature = "cuda")]
mod flush;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod prefill;
#[cfg(feature = "cuda")]
mod timeline;
mod report;
#[path = "../../rng.rs"]
mod rng;

use report::Results;

pub struct Opts {
    pub contexts: Vec<u32>,
    pub batches: Vec<u32>,
    pub threads: u32,
    pub reps: usize,
    pub json: Option<String>,
    pub quick: bool,
    pub gpu: bool,
    /// Prefill lengths (CUDA only; empty: no prefill points).
    pub prefill: Vec<u32>,
    /// Dense matrix rate of the prefill floor, FLOP/s.
    pub matrix_rate: f64,
    /// Time the in-repo full attention beside each prefill point (`--no-prefill-full`
    /// skips it: at 64k it takes longer than NSA's own points, and comparing builds
    /// does not need it).
    pub prefill_full: bool,
    /// `--shapes`: the `--gpu` decode shapes (query heads, KV heads, DK, DV), and the prefill
    /// shapes instead of the default set (`None`: the defaults, `gpu.rs`).
    pub shapes: Option<Vec<common::Shape>>,
    /// `--presets`: which presets the `--gpu` points run (default both).
    pub presets: Vec<nsa::Preset>,
}

/// Prefill lengths of a `--gpu` run without `--prefill`.
const PREFILL_DEFAULT: [u32; 4] = [8192, 16384, 32768, 65536];

fn usage() -> ! {
    eprintln!(
        "nsa-bench: NSA vs full attention over the same paged cache\n\n\
         options:\n  --cpu                 CPU decode benchmark (the default)\n  \
         --gpu                 CUDA decode (plain and CUDA-graph replay) and prefill benchmark\n                        (needs --features cuda and a device)\n  \
         --contexts A,B,...    decode context lengths (default 8192,16384,32768; `none`: no decode\n                        points)\n  \
         --batches A,B,...     sequences per decode step (default 1,4)\n  \
         --threads N           CPU threads (default: all cores)\n  \
         --reps N              timed decode steps per point (default 9; the median is reported)\n  \
         --prefill A,B,...     --gpu: prefill lengths, each one fresh sequence in one step, median of\n                        min(reps, 3) after 1 warm-up (default 8192,16384,32768,65536;\n                        `none` or an empty list: no prefill)\n  \
         --matrix-tflops X     dense bf16 matrix rate of the prefill floor, TFLOP/s (default 767,\n                        measured on the H100)\n  \
         --no-prefill-full     --gpu: skip the in-repo full-attention baseline of the prefill points\n                        (its columns read `-`; it is most of a 64k run's time)\n  \
         --shapes S,S,...      --gpu: shapes HQ/HKV/DK/DV (e.g. 64/16/128/128: G = 4), decode and\n                        prefill (default 64/4/128/128,64/4/192/128 for decode, and also\n                        64/16/128/128,64/8/128/128 for prefill)\n  \
         --presets P,P,...     paper, fla or both (default both)\n  \
         --quick               small sizes, for a smoke test\n  \
         --json FILE           also write the results as JSON\n  \
         --precompile DIR      only compile the CUDA kernels into the kernel cache DIR (for\n                        NSA_CUDA_CACHE_DIR; needs NVRTC, no GPU) and exit\n  \
         --arch A,B,...        --precompile: NVRTC targets (default sm_90a)"
    );
    std::process::exit(2)
}

/// The CPU's model name (Linux `/proc/cpuinfo`), and its thread count.
fn cpu_model() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|n| n.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{name} ({} threads)", std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(feature = "cuda")]
fn run_gpu(o: &Opts) -> nsa::Result<Results> {
    gpu::run(o)
}

#[cfg(not(feature = "cuda"))]
fn run_gpu(_: &Opts) -> nsa::Result<Results> {
    Err(nsa::NsaError::BackendUnavailable("nsa-bench was built without --features cuda".into()))
}

fn list(s: &str) -> Vec<u32> {
    s.split(',').map(|x| x.trim().parse().unwrap_or_else(|_| usage())).collect()
}

/// `HQ/HKV/DK/DV` shapes, comma-separated.
fn shapes(s: &str) -> Option<Vec<common::Shape>> {
    s.split(',')
        .map(|x| {
            let v: Vec<usize> = x.trim().split('/').map(|d| d.trim().parse().ok().filter(|&d: &usize| d > 0)).collect::<Option<_>>()?;
            match v[..] {
                [hq, hkv, dk, dv] => Some((hq, hkv, dk, dv)),
                _ => None,
            }
        })
        .collect()
}

/// `paper` / `fla` names, comma-separated.
fn presets(s: &str) -> Option<Vec<nsa::Preset>> {
    s.split(',')
        .map(|x| match x.trim() {
            "paper" => Some(nsa::Preset::Paper),
            "fla" => Some(nsa::Preset::Fla),
            _ => None,
        })
        .collect()
}

/// A list that may be `none` or empty.
fn maybe_list(s: &str) -> Vec<u32> {
    if s.trim().is_empty() || s.trim() == "none" {
        vec![]
    } else {
        list(s)
    }
}

fn main() {
    let mut o = Opts {
        contexts: vec![8192, 16384, 32768],
        batches: vec![1, 4],
        threads: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        reps: 9,
        json: None,
        quick: false,
        gpu: false,
        prefill: vec![],
        matrix_rate: 767e12,
        prefill_full: true,
        shapes: None,
        presets: vec![nsa::Preset::Paper, nsa::Preset::Fla],
    };
    let mut prefill = None;
    let (mut precompile, mut archs) = (None, vec!["sm_90a".to_string()]);
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match f.as_str() {
            "--cpu" => o.gpu = false,
            "--gpu" => o.gpu = true,
            "--contexts" => o.contexts = maybe_list(&val()),
            "--batches" => o.batches = list(&val()),
            "--threads" => o.threads = val().parse().unwrap_or_else(|_| usage()),
            "--reps" => o.reps = val().parse().unwrap_or_else(|_| usage()),
            "--json" => o.json = Some(val()),
            "--prefill" => prefill = Some(maybe_list(&val())),
            "--matrix-tflops" => o.matrix_rate = val().parse::<f64>().ok().filter(|&x| x > 0.0).unwrap_or_else(|| usage()) * 1e12,
            "--shapes" => o.shapes = Some(shapes(&val()).unwrap_or_else(|| usage())),
            "--presets" => o.presets = presets(&val()).unwrap_or_else(|| usage()),
            "--quick" => o.quick = true,
            "--no-prefill-full" => o.prefill_full = false,
            "--precompile" => precompile = Some(val()),
            "--arch" => archs = val().split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect(),
            _ => usage(),
        }
    }
    if let Some(dir) = precompile {
        for arch in &archs {
            match nsa::cuda::precompile(arch, std::path::Path::new(&dir)) {
                Ok(path) => println!("{arch}: {}", path.display()),
                Err(e) => {
                    eprintln!("error: compiling the kernels for {arch}: {e}");
                    std::process::exit(1);
                }
            }
        }
        return;
    }
    if o.quick {
        o.contexts = vec![2048];
        o.batches = vec![1, 2];
        o.reps = 3;
    }
    o.prefill = match prefill {
        Some(p) if !p.is_empty() && !o.gpu => {
            eprintln!("error: --prefill needs --gpu (the CPU benchmark times decode only)");
            std::process::exit(2)
        }
        Some(p) => p,
        None if o.gpu && o.quick => vec![2048],
        None if o.gpu => PREFILL_DEFAULT.to_vec(),
        None => vec![],
    };
    let result = if o.gpu { run_gpu(&o) } else { cpu::run(&o).map(|decode| Results { run: report::RunInfo::now(cpu_model()), decode, ..Default::default() }) };
    let res = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    report::print(&res);
    if let Some(path) = &o.json {
        if let Err(e) = std::fs::write(path, report::json(&res)) {
            eprintln!("error: writing {path}: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{presets, shapes};
    use nsa::Preset;

    #[test]
    fn shapes_parse_four_positive_dims_each() {
        assert_eq!(shapes("64/16/128/128, 64/8/192/128"), Some(vec![(64, 16, 128, 128), (64, 8, 192, 128)]));
        assert_eq!(shapes("64/16/128"), None, "three dims");
        assert_eq!(shapes("64/16/128/128/1"), None, "five dims");
        assert_eq!(shapes("64/0/128/128"), None, "a zero dim");
        assert_eq!(shapes("64/x/128/128"), None);
    }

    #[test]
    fn presets_parse_by_name() {
        assert_eq!(presets("fla"), Some(vec![Preset::Fla]));
        assert_eq!(presets("paper, fla"), Some(vec![Preset::Paper, Preset::Fla]));
        assert_eq!(presets("paper,nsa"), None);
    }
}
