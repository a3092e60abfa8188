//! Per-kernel timelines of decode steps (`NSA_CUDA_TIMELINE=1`: the engine's kernels then
//! stamp their blocks' starts and warps' ends, `nsa::cuda::KernelSpan`). For each decode
//! point, after its timed reps, three steps replayed from the graph and three launched
//! from the host, each printed to stderr as one line per kernel, microseconds from the
//! step's first block start: where the launches of a step overlap and where they wait.

use nsa::cuda::{CudaBackend, KernelSpan};

/// Whether the timeline stamps were asked for (the engine reads the same variable when
/// it compiles its kernels).
pub fn wanted() -> bool {
    std::env::var("NSA_CUDA_TIMELINE").is_ok_and(|v| v == "1")
}

/// Runs `step` three times between a reset and a read of the stamps and prints each
/// run's spans under `label`.
pub fn print(gpu: &mut CudaBackend, stream: nsa::cuda::CUstream, label: &str, mut step: impl FnMut(&mut CudaBackend) -> nsa::Result<()>) -> nsa::Result<()> {
    for run in 0..3 {
        gpu.timeline_reset(stream)?;
        step(gpu)?;
        let spans = gpu.timeline_read(stream)?;
        eprintln!("timeline {label} run {run}:{}", lines(&spans));
    }
    Ok(())
}

/// One line per kernel: first..last block start, first..last warp end, in microseconds
/// from the earliest start; then the step's span.
fn lines(spans: &[KernelSpan]) -> String {
    let Some(t0) = spans.iter().map(|s| s.first_start).min() else { return " no kernel stamped".into() };
    let us = |t: u64| t.saturating_sub(t0) as f64 * 1e-3;
    let mut out = String::new();
    for s in spans {
        out += &format!(
            "\n  {:<16} start {:7.2} .. {:7.2}  end {:7.2} .. {:7.2}",
            s.kernel,
            us(s.first_start),
            us(s.last_start),
            us(s.first_end),
            us(s.last_end)
        );
    }
    let end = spans.iter().map(|s| s.last_end).max().unwrap_or(t0);
    out + &format!("\n  {:<16} {:7.2} us", "step", us(end))
}
