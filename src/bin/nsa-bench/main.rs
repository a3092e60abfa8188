//! nsa-bench: decode (and, on CUDA, prefill) timings of NSA next to the engine's own
//! full-attention baseline over the same paged cache, measured in one run on one
//! machine, with each time set beside its physical floor.
//!
//! `cargo run --release --bin nsa-bench -- --help` lists the options. Results print as a
//! markdown table; `--json FILE` also writes them as JSON.

mod cpu;
#[cfg(feature = "cuda")]
mod gpu;
mod report;
#[path = "../shared/rng.rs"]
mod rng;

use report::Row;

pub struct Opts {
    pub contexts: Vec<u32>,
    pub batches: Vec<u32>,
    pub threads: u32,
    pub reps: usize,
    pub json: Option<String>,
    pub quick: bool,
    pub gpu: bool,
}

fn usage() -> ! {
    eprintln!(
        "nsa-bench: NSA vs full attention over the same paged cache\n\n\
         options:\n  --cpu                 CPU decode benchmark (the default)\n  \
         --gpu                 CUDA decode benchmark (needs --features cuda and a device)\n  \
         --contexts A,B,...    context lengths (default 8192,16384,32768)\n  \
         --batches A,B,...     sequences per decode step (default 1,4)\n  \
         --threads N           CPU threads (default: all cores)\n  \
         --reps N              timed decode steps per point (default 9; the median is reported)\n  \
         --quick               small sizes, for a smoke test\n  \
         --json FILE           also write the results as JSON"
    );
    std::process::exit(2)
}

#[cfg(feature = "cuda")]
fn run_gpu(o: &Opts) -> nsa::Result<Vec<Row>> {
    gpu::run(o)
}

#[cfg(not(feature = "cuda"))]
fn run_gpu(_: &Opts) -> nsa::Result<Vec<Row>> {
    Err(nsa::NsaError::BackendUnavailable("nsa-bench was built without --features cuda".into()))
}

fn list(s: &str) -> Vec<u32> {
    s.split(',').map(|x| x.trim().parse().unwrap_or_else(|_| usage())).collect()
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
    };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match f.as_str() {
            "--cpu" => o.gpu = false,
            "--gpu" => o.gpu = true,
            "--contexts" => o.contexts = list(&val()),
            "--batches" => o.batches = list(&val()),
            "--threads" => o.threads = val().parse().unwrap_or_else(|_| usage()),
            "--reps" => o.reps = val().parse().unwrap_or_else(|_| usage()),
            "--json" => o.json = Some(val()),
            "--quick" => o.quick = true,
            _ => usage(),
        }
    }
    if o.quick {
        o.contexts = vec![2048];
        o.batches = vec![1, 2];
        o.reps = 3;
    }
    let result = if o.gpu { run_gpu(&o) } else { cpu::run(&o) };
    let rows: Vec<Row> = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    report::print(&rows);
    if let Some(path) = &o.json {
        if let Err(e) = std::fs::write(path, report::json(&rows)) {
            eprintln!("error: writing {path}: {e}");
            std::process::exit(1);
        }
    }
}
