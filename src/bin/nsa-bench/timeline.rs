//! Per-kernel timelines of decode steps (`NSA_CUDA_TIMELINE=1`: the engine's kernels then
//! stamp each block's start, the return of its wait on the previous launch and its end,
//! `nsa::cuda::KernelSpan`). For each decode point, after its timed reps, three steps
//! replayed from the graph and three launched from the host, each printed to stderr as one
//! line per kernel, microseconds from the step's first block start: where the launches of a
//! step overlap and where they wait. With `NSA_TIMELINE_CSV=path` every block's stamps are
//! appended there too (label, run, kernel, block, sm, start, wait, end, marks 0 to 7).
//! Kernels that stamp marks of their own (`tl_mark`, thread 0) get their ranges printed after
//! the end, m0 to m7, and their phases below: the attention kernels after their wait and
//! prep (m0), their first copies (m1), their first tile's arrival (m2), their tile loop
//! (m3), the warps' merge (m4) and the (m, l) stores (m5), the selected units' block lists
//! loaded (m6) and merged (m7), and before its wait the compressed branch's row and step
//! header arrived (m6) and its Q tile staged with its first copies issued (m7); the selection's group sums returned (m0), its (m, l) merged
//! (m1), its scores (m2), its first sorted list (m3) and its sort (m4); the combine's (m, l)
//! loaded (m0) and merged (m1), its first accumulator returned (m2), thread 0's sums (m3),
//! the parts' meeting (m4). Prefill points get one such step each; a kernel of more than
//! `TIMELINE_BLOCKS` blocks shows its first ones only (marked `+`).

use std::io::Write;

use nsa::cuda::{CudaBackend, KernelSpan, TIMELINE_BLOCKS};

/// Whether the timeline stamps were asked for (the engine reads the same variable when
/// it compiles its kernels).
pub fn wanted() -> bool {
    std::env::var("NSA_CUDA_TIMELINE").is_ok_and(|v| v == "1")
}

/// Runs `step` `runs` times between a reset and a read of the stamps and prints each
/// run's spans under `label`.
pub fn print(gpu: &mut CudaBackend, stream: nsa::cuda::CUstream, label: &str, runs: usize, mut step: impl FnMut(&mut CudaBackend) -> nsa::Result<()>) -> nsa::Result<()> {
    for run in 0..runs {
        gpu.timeline_reset(stream)?;
        step(gpu)?;
        let spans = gpu.timeline_read(stream)?;
        eprintln!("timeline {label} run {run}:{}", lines(&spans));
        if let Ok(path) = std::env::var("NSA_TIMELINE_CSV") {
            csv(&path, label, run, &spans).map_err(|e| nsa::NsaError::Cuda(format!("writing {path}: {e}")))?;
        }
    }
    Ok(())
}

/// The step's first block start.
fn origin(spans: &[KernelSpan]) -> u64 {
    spans.iter().map(|s| s.range(|b| b.start).0).min().unwrap_or(0)
}

/// One line per kernel: first..last block start, first..last wait return, first..last
/// block end, in microseconds from the earliest start; then the step's span.
fn lines(spans: &[KernelSpan]) -> String {
    if spans.is_empty() {
        return " no kernel stamped".into();
    }
    let t0 = origin(spans);
    let us = |t: u64| if t == 0 || t == u64::MAX { f64::NAN } else { t.saturating_sub(t0) as f64 * 1e-3 };
    let mut out = String::new();
    let mut end = t0;
    for s in spans {
        let (a, w, e) = (s.range(|b| b.start), s.range(|b| b.wait), s.range(|b| b.end));
        let marks: Vec<(u64, u64)> = (0..8).map(|k| s.range(|b| b.marks[k])).collect();
        end = end.max(e.1);
        out += &format!(
            "\n  {:<16} {:>5}{} blocks  start {:7.2} .. {:7.2}  wait {:7.2} .. {:7.2}  end {:7.2} .. {:7.2}",
            s.kernel,
            s.blocks.len(),
            if s.blocks.len() >= TIMELINE_BLOCKS { "+" } else { "" },
            us(a.0),
            us(a.1),
            us(w.0),
            us(w.1),
            us(e.0),
            us(e.1)
        );
        for (k, m) in marks.iter().enumerate() {
            if m.1 != 0 {
                out += &format!("  m{k} {:7.2} .. {:7.2}", us(m.0), us(m.1));
            }
        }
        out += &phases(s);
    }
    out + &format!("\n  {:<16} {:7.2} us", "step", us(end))
}

/// A kernel's phases: for the blocks that waited, the mean time from the wait to each mark
/// it stamped, mark to mark in the order they happened, and to the block's end, in
/// microseconds; one line per sequence of marks (a kernel's blocks may take different
/// paths: `sw_mma`'s selected units stamp m6 and m7 before m0, its window units do not).
/// Marks stamped before the wait come first, from the block's start: start->m6 | m6->wait.
fn phases(s: &KernelSpan) -> String {
    // A path: the marks in time order, `WAIT` standing for the wait among them.
    const WAIT: usize = usize::MAX;
    let mut paths: std::collections::BTreeMap<Vec<usize>, (usize, Vec<f64>)> = Default::default();
    for b in s.blocks.iter().filter(|b| b.wait != 0 && b.marks.iter().any(|&m| m != 0)) {
        let at = |k: usize| if k == WAIT { b.wait } else { b.marks[k] };
        let mut order: Vec<usize> = (0..b.marks.len()).filter(|&k| b.marks[k] != 0).chain(std::iter::once(WAIT)).collect();
        order.sort_by_key(|&k| (at(k), k != WAIT));
        let from_start = order[0] != WAIT;
        let points: Vec<u64> = from_start.then_some(b.start).into_iter().chain(order.iter().map(|&k| at(k))).chain(std::iter::once(b.end)).collect();
        let e = paths.entry(order).or_insert_with(|| (0, vec![0.0; points.len() - 1]));
        e.0 += 1;
        for (sum, w) in e.1.iter_mut().zip(points.windows(2)) {
            *sum += w[1].saturating_sub(w[0]) as f64 * 1e-3;
        }
    }
    let mut out = String::new();
    for (order, (n, sums)) in &paths {
        let name = |k: usize| if k == WAIT { "wait".to_string() } else { format!("m{k}") };
        let names: Vec<String> = (order[0] != WAIT).then(|| "start".to_string()).into_iter().chain(order.iter().map(|&k| name(k))).chain(std::iter::once("end".to_string())).collect();
        let parts: Vec<String> = names.windows(2).zip(sums).map(|(w, t)| format!("{}->{} {:.2}", w[0], w[1], t / *n as f64)).collect();
        out += &format!("\n    phases of {n} blocks (mean, us): {}", parts.join(" | "));
    }
    out
}

/// Appends every block's stamps (nanoseconds from the step's first start; wait and marks -1
/// where the block has none).
fn csv(path: &str, label: &str, run: usize, spans: &[KernelSpan]) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
    let t0 = origin(spans) as i64;
    for s in spans {
        for b in &s.blocks {
            let rel = |t: u64| if t == 0 { -1 } else { t as i64 - t0 };
            let m = b.marks.map(rel);
            let m: Vec<String> = m.iter().map(|t| t.to_string()).collect();
            writeln!(f, "{label},{run},{},{},{},{},{},{},{}", s.kernel, b.block, b.sm, b.start as i64 - t0, rel(b.wait), b.end as i64 - t0, m.join(","))?;
        }
    }
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::phases;
    use nsa::cuda::{BlockStamp, KernelSpan};

    fn block(wait: u64, marks: [u64; 8], end: u64) -> BlockStamp {
        BlockStamp { block: 0, start: 1, wait, end, sm: 0, marks }
    }

    #[test]
    fn phases_follow_each_path_in_time_order() {
        let mut m_sel = [0u64; 8];
        m_sel[6] = 1_100; // the list loaded, before m0
        m_sel[0] = 1_600;
        let mut m_win = [0u64; 8];
        m_win[0] = 1_200;
        let mut m_pre = [0u64; 8];
        m_pre[6] = 401; // stamped before the wait
        m_pre[0] = 1_100;
        let s = KernelSpan {
            kernel: "sw_mma",
            blocks: vec![
                block(1_000, m_sel, 2_000),
                block(2_000, [2_100, 0, 0, 0, 0, 0, 0, 0], 2_500),
                block(1_000, m_win, 1_400),
                block(0, m_win, 1_400), // never waited: left out
                block(1_000, m_pre, 1_300),
            ],
        };
        let out = phases(&s);
        assert!(out.contains("phases of 2 blocks (mean, us): wait->m0 0.15 | m0->end 0.30"), "{out}");
        assert!(out.contains("phases of 1 blocks (mean, us): wait->m6 0.10 | m6->m0 0.50 | m0->end 0.40"), "{out}");
        assert!(out.contains("phases of 1 blocks (mean, us): start->m6 0.40 | m6->wait 0.60 | wait->m0 0.10 | m0->end 0.20"), "{out}");
        assert_eq!(out.matches("phases of").count(), 3);
    }
}
