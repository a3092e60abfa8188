//! Result rows, printed as a markdown table and as JSON (no serde: the rows are flat).

use nsa::Config;

/// K/V bytes one NSA decode step must read per (sequence, KV head) at length `len`:
/// compressed tokens, selected blocks and the window, each once (the window and the local
/// blocks overlap, so this bounds the unique bytes from above).
pub fn nsa_bytes(c: &Config, len: u32) -> f64 {
    let keys = c.num_cmp_tokens(len) + (c.sel_count * c.sel_block).min(len) + c.window.min(len);
    keys as f64 * (c.head_dim_qk + c.head_dim_v) as f64 * c.dtype.size() as f64
}

/// One measured point.
pub struct Row {
    pub backend: &'static str,
    pub preset: &'static str,
    pub shape: String,
    pub dtype: &'static str,
    pub batch: u32,
    pub context: u32,
    /// Median time of one NSA decode step (append + all branches), one layer.
    pub nsa_us: f64,
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
    /// A decode point: medians in seconds; the floor from `nsa_bytes` and `bandwidth`.
    pub fn decode(backend: &'static str, c: &Config, preset: nsa::Preset, batch: u32, context: u32, nsa_s: f64, full_s: f64, bandwidth: f64) -> Row {
        let bytes = nsa_bytes(c, context) * (batch * c.num_kv_heads) as f64;
        Row {
            backend,
            preset: if preset == nsa::Preset::Paper { "paper" } else { "fla" },
            shape: format!("{}q/{}kv {}/{}", c.num_q_heads, c.num_kv_heads, c.head_dim_qk, c.head_dim_v),
            dtype: c.dtype.name(),
            batch,
            context,
            nsa_us: nsa_s * 1e6,
            full_us: full_s * 1e6,
            nsa_bytes: bytes,
            floor_us: bytes / bandwidth * 1e6,
            bandwidth,
        }
    }
}

pub fn print(rows: &[Row]) {
    println!("| backend | preset | shape | dtype | batch | context | NSA us | full us | full/NSA | NSA MB read | floor us | NSA/floor |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1}x | {:.2} | {:.1} | {:.1}x |",
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
}

pub fn json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"backend\":\"{}\",\"preset\":\"{}\",\"shape\":\"{}\",\"dtype\":\"{}\",\"batch\":{},\"context\":{},\"nsa_us\":{:.3},\"full_us\":{:.3},\"speedup\":{:.3},\"nsa_bytes\":{:.0},\"floor_us\":{:.3},\"bandwidth\":{:.0}}}",
                r.backend, r.preset, r.shape, r.dtype, r.batch, r.context, r.nsa_us, r.full_us, r.full_us / r.nsa_us, r.nsa_bytes, r.floor_us, r.bandwidth
            )
        })
        .collect();
    format!("[\n  {}\n]\n", items.join(",\n  "))
}
