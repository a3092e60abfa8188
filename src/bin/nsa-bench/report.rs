//! Result rows, printed as markdown tables and as JSON (no serde: the rows are flat).

use nsa::{Config, Preset};

/// Keys one NSA query at length `len` attends per KV head: compressed tokens, selected
/// blocks and the window (the window and the local blocks overlap, and a short sequence
/// has fewer selectable keys than `n * l'`, so this bounds the unique keys from above).
pub fn nsa_keys(c: &Config, len: u32) -> u32 {
    c.num_cmp_tokens(len) + (c.sel_count * c.sel_block).min(len) + c.window.min(len)
}

/// K/V bytes one NSA decode step must read per (sequence, KV head) at length `len`: each
/// of `nsa_keys` once.
pub fn nsa_bytes(c: &Config, len: u32) -> f64 {
    nsa_keys(c, len) as f64 * (c.head_dim_qk + c.head_dim_v) as f64 * c.dtype.size() as f64
}

/// FLOPs of the QK and PV products of a prefill of `tokens` tokens of a fresh sequence:
/// query row `t` attends `nsa_keys(t + 1)` keys in each of its `HQ` heads.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn prefill_flops(c: &Config, tokens: u32) -> f64 {
    let keys: f64 = (1..=tokens).map(|len| nsa_keys(c, len) as f64).sum();
    2.0 * c.num_q_heads as f64 * (c.head_dim_qk + c.head_dim_v) as f64 * keys
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn preset_name(p: Preset) -> &'static str {
    if p == Preset::Paper {
        "paper"
    } else {
        "fla"
    }
}

fn shape(c: &Config) -> String {
    format!("{}q/{}kv {}/{}", c.num_q_heads, c.num_kv_heads, c.head_dim_qk, c.head_dim_v)
}

/// Median times of one decode point, seconds.
pub struct Medians {
    /// NSA decode step (append + all branches), one layer.
    pub nsa: f64,
    /// The full-attention baseline over the same cache.
    pub full: f64,
    /// The layer alone replayed from a CUDA graph, the plan's upload excluded (CUDA only).
    pub graph: Option<f64>,
    /// `upload_step` alone: once per step, shared by all layers (CUDA only).
    pub upload: Option<f64>,
}

/// One measured decode point.
pub struct Row {
    pub backend: &'static str,
    pub preset: &'static str,
    pub shape: String,
    pub dtype: &'static str,
    pub batch: u32,
    pub context: u32,
    /// Median time of one NSA decode step (append + all branches), one layer.
    pub nsa_us: f64,
    /// The layer alone (`run_layer` replayed from a CUDA graph, without the plan's
    /// upload); `None` on the CPU.
    pub graph_us: Option<f64>,
    /// `upload_step` alone (once per step for all layers); `None` on the CPU.
    pub upload_us: Option<f64>,
    /// Median time of the full-attention baseline over the same cache.
    pub full_us: f64,
    /// K/V bytes an NSA decode step must read (compressed + selected + window, once).
    pub nsa_bytes: f64,
    /// NSA bytes over the measured memory bandwidth.
    pub floor_us: f64,
    /// Measured memory bandwidth, bytes/s (read + written), used for the floor.
    pub bandwidth: f64,
}

impl Row {
    /// A decode point: the floor from `nsa_bytes` and `bandwidth`.
    pub fn decode(backend: &'static str, c: &Config, preset: Preset, batch: u32, context: u32, t: Medians, bandwidth: f64) -> Row {
        let bytes = nsa_bytes(c, context) * (batch * c.num_kv_heads) as f64;
        Row {
            backend,
            preset: preset_name(preset),
            shape: shape(c),
            dtype: c.dtype.name(),
            batch,
            context,
            nsa_us: t.nsa * 1e6,
            graph_us: t.graph.map(|s| s * 1e6),
            upload_us: t.upload.map(|s| s * 1e6),
            full_us: t.full * 1e6,
            nsa_bytes: bytes,
            floor_us: bytes / bandwidth * 1e6,
            bandwidth,
        }
    }
}

/// One measured prefill point: `tokens` tokens of a fresh sequence in one step.
pub struct PrefillRow {
    pub preset: &'static str,
    pub shape: String,
    pub dtype: &'static str,
    pub tokens: u32,
    /// Median time of the step (`upload_step` + `run_layer`, all three branches).
    pub nsa_ms: f64,
    /// The in-repo full attention (`attend_full`) of the same step's queries over the same
    /// cache: causal attention of all T rows, the decode kernels over waves of rows.
    pub full_ms: f64,
    /// QK and PV FLOPs of the three branches (`prefill_flops`).
    pub flops: f64,
    /// FLOPs over the dense matrix rate.
    pub floor_ms: f64,
    /// The dense matrix rate of the floor, FLOP/s.
    pub matrix_rate: f64,
}

impl PrefillRow {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn new(c: &Config, preset: Preset, tokens: u32, nsa_s: f64, full_s: f64, matrix_rate: f64) -> PrefillRow {
        let flops = prefill_flops(c, tokens);
        PrefillRow {
            preset: preset_name(preset),
            shape: shape(c),
            dtype: c.dtype.name(),
            tokens,
            nsa_ms: nsa_s * 1e3,
            full_ms: full_s * 1e3,
            flops,
            floor_ms: flops / matrix_rate * 1e3,
            matrix_rate,
        }
    }
}

/// Everything one run measured, and where and when: the JSON names the machine (the
/// GPU as the driver reports it, or the CPU), the UTC time and the build.
#[derive(Default)]
pub struct Results {
    pub run: RunInfo,
    pub decode: Vec<Row>,
    pub prefill: Vec<PrefillRow>,
}

/// What a run's record says about itself.
#[derive(Default)]
pub struct RunInfo {
    /// The device: `NVIDIA H200 (CUDA driver API 13000, NVRTC 13.0, sm_90a)`, or the CPU's model name.
    pub machine: String,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`, when the run started.
    pub date: String,
    /// The build: `NSA_BENCH_COMMIT`, else `commit.txt` beside the executable (the staging
    /// scripts write it), else `unknown`.
    pub commit: String,
}

impl RunInfo {
    pub fn now(machine: String) -> RunInfo {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let commit = std::env::var("NSA_BENCH_COMMIT")
            .ok()
            .or_else(|| {
                let exe = std::env::current_exe().ok()?;
                std::fs::read_to_string(exe.parent()?.join("commit.txt")).ok()
            })
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "unknown".into());
        RunInfo { machine, date: utc(secs), commit }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (civil-from-days, proleptic Gregorian).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A JSON string literal of `s`.
fn quoted(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

pub fn print(res: &Results) {
    let rows = &res.decode;
    // The graph columns only where some point has them (CUDA runs).
    let graph = rows.iter().any(|r| r.graph_us.is_some());
    let (gh, gs) = if graph { (" NSA graph us | upload us |", "---|---|") } else { ("", "") };
    let (fh, fs) = if graph { (" graph/floor |", "---|") } else { ("", "") };
    if !rows.is_empty() {
        println!("| backend | preset | shape | dtype | batch | context | NSA us |{gh} full us | full/NSA | NSA MB read | floor us | NSA/floor |{fh}");
        println!("|---|---|---|---|---|---|---|{gs}---|---|---|---|---|{fs}");
    }
    for r in rows {
        let (gt, gr) = match (graph, r.graph_us) {
            (false, _) => (String::new(), String::new()),
            (true, Some(g)) => (format!(" {g:.1} | {:.1} |", r.upload_us.unwrap_or(f64::NAN)), format!(" {:.1}x |", g / r.floor_us)),
            (true, None) => (" - | - |".into(), " - |".into()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} |{gt} {:.1} | {:.1}x | {:.2} | {:.1} | {:.1}x |{gr}",
            r.backend,
            r.preset,
            r.shape,
            r.dtype,
            r.batch,
            r.context,
            r.nsa_us,
            r.full_us,
            r.full_us / r.nsa_us,
            r.nsa_bytes / 1e6,
            r.floor_us,
            r.nsa_us / r.floor_us,
        );
    }
    if let Some(r) = rows.first() {
        println!("\nfloor = NSA bytes / {:.1} GB/s (memory bandwidth measured in this run)", r.bandwidth / 1e9);
    }
    if graph {
        println!(
            "NSA us = upload_step + run_layer, launched from the host; NSA graph = run_layer alone replayed from a CUDA \
             graph (launch overhead removed); upload = upload_step alone (once per step, shared by every layer)"
        );
    }
    if let Some(p) = res.prefill.first() {
        println!("\n| preset | shape | dtype | tokens | NSA prefill ms | full (in-repo) ms | full/NSA | TFLOP | NSA TFLOP/s | floor ms | NSA/floor |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &res.prefill {
            // Without the baseline (`--no-prefill-full`) its columns read `-`.
            let (full, ratio) = if r.full_ms.is_finite() {
                (format!("{:.2}", r.full_ms), format!("{:.1}x", r.full_ms / r.nsa_ms))
            } else {
                ("-".to_string(), "-".to_string())
            };
            println!(
                "| {} | {} | {} | {} | {:.2} | {} | {} | {:.2} | {:.1} | {:.2} | {:.1}x |",
                r.preset,
                r.shape,
                r.dtype,
                r.tokens,
                r.nsa_ms,
                full,
                ratio,
                r.flops / 1e12,
                r.flops / r.nsa_ms * 1e-9,
                r.floor_ms,
                r.nsa_ms / r.floor_ms,
            );
        }
        println!(
            "\nprefill: one fresh sequence, all tokens in one step; FLOPs = QK + PV of the three branches \
             (selected keys an upper bound); floor = FLOPs / {:.0} TFLOP/s (dense bf16 matrix rate, --matrix-tflops); \
             full = the engine's attend_full over the same step (decode-shaped split-KV kernels, not a prefill kernel)",
            p.matrix_rate / 1e12
        );
    }
}

pub fn json(res: &Results) -> String {
    let decode: Vec<String> = res
        .decode
        .iter()
        .map(|r| {
            format!(
                "{{\"backend\":\"{}\",\"preset\":\"{}\",\"shape\":\"{}\",\"dtype\":\"{}\",\"batch\":{},\"context\":{},\"nsa_us\":{:.3},\"full_us\":{:.3},\"speedup\":{:.3},\"nsa_bytes\":{:.0},\"floor_us\":{:.3},\"bandwidth\":{:.0},\"graph_us\":{},\"upload_us\":{}}}",
                r.backend,
                r.preset,
                r.shape,
                r.dtype,
                r.batch,
                r.context,
                r.nsa_us,
                r.full_us,
                r.full_us / r.nsa_us,
                r.nsa_bytes,
                r.floor_us,
                r.bandwidth,
                r.graph_us.map_or("null".into(), |g| format!("{g:.3}")),
                r.upload_us.map_or("null".into(), |g| format!("{g:.3}")),
            )
        })
        .collect();
    let prefill: Vec<String> = res
        .prefill
        .iter()
        .map(|r| {
            // JSON has no NaN: a skipped baseline is null.
            let full = if r.full_ms.is_finite() { format!("{:.4}", r.full_ms) } else { "null".into() };
            format!(
                "{{\"preset\":\"{}\",\"shape\":\"{}\",\"dtype\":\"{}\",\"tokens\":{},\"nsa_ms\":{:.4},\"full_ms\":{},\"flops\":{:.0},\"floor_ms\":{:.4},\"matrix_rate\":{:.0}}}",
                r.preset, r.shape, r.dtype, r.tokens, r.nsa_ms, full, r.flops, r.floor_ms, r.matrix_rate
            )
        })
        .collect();
    let list = |v: &[String]| if v.is_empty() { "[]".to_string() } else { format!("[\n  {}\n ]", v.join(",\n  ")) };
    let run = &res.run;
    format!(
        "{{\n \"run\": {{\"machine\":{},\"date\":{},\"commit\":{}}},\n \"decode\": {},\n \"prefill\": {}\n}}\n",
        quoted(&run.machine),
        quoted(&run.date),
        quoted(&run.commit),
        list(&decode),
        list(&prefill)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_record_dates_and_quotes() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_042_096), "2026-11-30T12:34:56Z");
        assert_eq!(quoted("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        let res = Results { run: RunInfo { machine: "GPU \"x\"".into(), date: utc(0), commit: "abc".into() }, ..Default::default() };
        let j = json(&res);
        assert!(j.contains("\"run\": {\"machine\":\"GPU \\\"x\\\"\",\"date\":\"1970-01-01T00:00:00Z\",\"commit\":\"abc\"}"), "{j}");
    }

    /// The floor the issue states for the paper preset (64 query / 4 KV heads, 128/128,
    /// bf16): (L - 32) / 16 + 1 compressed + 16 x 64 selected + 512 window keys, read once
    /// per (sequence, KV head); at batch 16 and 64k about 61 us at 3.0 TB/s.
    #[test]
    fn decode_bytes_match_the_issue_floor() {
        let c = {
            let mut c = Config::preset(Preset::Paper).with_shape(64, 4, 128, 128).with_capacity(16, 65536);
            c.dtype = nsa::Dtype::Bf16;
            c
        };
        let keys = (65536 - 32) / 16 + 1 + 16 * 64 + 512;
        assert_eq!(nsa_keys(&c, 65536), keys);
        let bytes = nsa_bytes(&c, 65536) * 16.0 * 4.0;
        assert_eq!(bytes, (keys * 256 * 2 * 16 * 4) as f64);
        let floor_us = bytes / 3.0e12 * 1e6;
        assert!((floor_us - 61.5).abs() < 0.1, "{floor_us}");
        // Short contexts read every key once per branch at most.
        assert_eq!(nsa_keys(&c, 100), (100 - 32) / 16 + 1 + 100 + 100);
    }

    /// A prefill point without its full-attention baseline (`--no-prefill-full`) writes
    /// `null` in the JSON (which has no NaN), and a measured one its value.
    #[test]
    fn skipped_prefill_baseline_is_null_in_json() {
        let c = Config::preset(Preset::Paper).with_shape(8, 2, 64, 64).with_capacity(1, 4096);
        let mut res = Results::default();
        res.prefill.push(PrefillRow::new(&c, Preset::Paper, 1024, 0.002, f64::NAN, 767e12));
        res.prefill.push(PrefillRow::new(&c, Preset::Paper, 2048, 0.003, 0.0125, 767e12));
        let j = json(&res);
        assert!(j.contains("\"tokens\":1024,\"nsa_ms\":2.0000,\"full_ms\":null,"), "{j}");
        assert!(j.contains("\"tokens\":2048,\"nsa_ms\":3.0000,\"full_ms\":12.5000,"), "{j}");
        assert!(!j.contains("NaN"), "{j}");
    }

    /// Prefill FLOPs are the per-row decode keys summed: 2 FLOPs per multiply-add of QK
    /// (DK) and PV (DV) per head.
    #[test]
    fn prefill_flops_sum_the_rows() {
        let c = Config::preset(Preset::Fla).with_shape(8, 2, 64, 32).with_capacity(1, 4096);
        let rows: u64 = (1..=300u32).map(|t| nsa_keys(&c, t) as u64).sum();
        assert_eq!(prefill_flops(&c, 300), (2 * 8 * (64 + 32)) as f64 * rows as f64);
        assert_eq!(prefill_flops(&c, 1), (2 * 8 * 96) as f64 * 2.0); // 0 compressed + 1 selected + 1 window
    }
}
