//! Brute-force reference ("oracle") of Native Sparse Attention, written straight from
//! `docs/SPEC.md` and sharing no code with the engine: it reads only the fields of
//! [`Config`] and recomputes everything else (compressed-token counts, visibility, the
//! selection-block mapping, top-n) with plain loops over contiguous arrays, in f64.
//!
//! It is slow on purpose (O(T^2) per head, no caching beyond the compressed tokens) and
//! is meant for tests only: the engine's outputs are compared against [`prefill`], and
//! [`full_attention`] is the plain causal attention that NSA degenerates to when every
//! block is selected or the window covers the whole sequence.
//!
//! Equation numbers refer to the paper (Yuan et al., arXiv 2502.11089) as quoted in
//! `docs/SPEC.md`.

// Index loops mirror the spec's sums one to one; keep them.
#![allow(clippy::needless_range_loop)]

use crate::config::{Config, Dtype, Phi};

/// Inputs of one causal prefill of a single sequence of length `t_len = q.len() / (HQ*DK)`.
pub struct RefInputs<'a> {
    pub cfg: &'a Config,
    /// `[T, HQ, DK]` row-major.
    pub q: &'a [f32],
    /// `[T, HKV, DK]`.
    pub k: &'a [f32],
    /// `[T, HKV, DV]`.
    pub v: &'a [f32],
    /// `[T, HQ, 3]`: `(g_cmp, g_slc, g_win)` per token and query head.
    pub gates: &'a [f32],
    /// phi weights for K (layout in `docs/SPEC.md`, "Weight layouts"); empty for `Phi::Mean`.
    pub phi_k: &'a [f32],
    /// phi weights for V.
    pub phi_v: &'a [f32],
    /// If `Some`, use these selected blocks instead of computing top-n: `[T, HKV, n]`, each
    /// row ascending block indices padded with -1 at the end.
    pub selection: Option<&'a [i32]>,
}

/// Result of [`prefill`].
pub struct RefOutput {
    /// `[T, HQ, DV]`.
    pub out: Vec<f32>,
    /// `[T, HKV, n]`: chosen blocks ascending, -1 padded. Always the reference's OWN top-n
    /// choice, even when `RefInputs::selection` overrides what is attended.
    pub selected: Vec<i32>,
    /// `[T, HKV, NB]`: the group score `s[j]` of Eq. 10 (`f64::INFINITY` for forced blocks,
    /// 0.0 for blocks `j > b = t / l'`).
    pub scores: Vec<f64>,
    /// `NB = ceil(T / l')`.
    pub nb: usize,
}

/// The NSA parameters, read once from the config (no engine helpers).
#[derive(Clone, Copy)]
struct Dims {
    /// Heads per GQA group `G = HQ / HKV`.
    g: usize,
    /// Compression block length `l`.
    l: usize,
    /// Compression stride `d`.
    d: usize,
    /// Selection block length `l'`.
    lp: usize,
    /// Selected blocks per query `n`.
    n: usize,
    n_init: usize,
    n_local: usize,
    /// Window length `w`.
    w: usize,
    scale: f64,
}

/// Rounds a value computed in f64 the way the engine stores it: to f32 first, then to the
/// storage dtype (compressed tokens live in `cfg.dtype`).
fn round_to_dtype(x: f64, dtype: Dtype) -> f64 {
    let x32 = x as f32;
    match dtype {
        Dtype::F32 => x32 as f64,
        Dtype::F16 => half::f16::from_f32(x32).to_f64(),
        Dtype::Bf16 => half::bf16::from_f32(x32).to_f64(),
    }
}

/// `Attn(q, K, V) = softmax(scale * q.K^T) V` (spec "Output"), with max subtraction, in
/// f64. Returns the output (length `dv`) and the softmax probabilities (one per key). An
/// empty key set gives the zero vector and no probabilities (never NaN).
fn attend(q: &[f64], keys: &[&[f64]], vals: &[&[f64]], scale: f64, dv: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(keys.len(), vals.len());
    let mut out = vec![0.0f64; dv];
    if keys.is_empty() {
        return (out, Vec::new());
    }
    let logits: Vec<f64> = keys
        .iter()
        .map(|k| scale * q.iter().zip(k.iter()).map(|(a, b)| a * b).sum::<f64>())
        .collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|x| (x - max).exp()).collect();
    let denom: f64 = exps.iter().sum();
    let probs: Vec<f64> = exps.iter().map(|e| e / denom).collect();
    for (p, v) in probs.iter().zip(vals.iter()) {
        for e in 0..dv {
            out[e] += p * v[e];
        }
    }
    (out, probs)
}

/// Length in f32 elements of one set of phi weights for a head dim `dim` (recomputed
/// here from the spec's table, not taken from the engine).
fn phi_len(cfg: &Config, dim: usize) -> usize {
    let hkv = cfg.num_kv_heads as usize;
    let l = cfg.cmp_block as usize;
    let hid = cfg.phi_hidden as usize;
    let pe = if cfg.phi_pe { hkv * l * dim } else { 0 };
    match cfg.phi {
        Phi::Mean => 0,
        Phi::Weighted => hkv * l,
        Phi::Linear => hkv * l * dim * dim + pe,
        Phi::Mlp => hkv * l * dim * hid + hkv * hid + hkv * hid * dim + hkv * dim + pe,
    }
}

/// `phi` of branch 1 (Eq. 7) for KV head `h`: compresses the `l` rows `rows[j]` (each of
/// length `dim`) into one vector of length `dim`, in f64. `weights` is the whole weight
/// buffer for this projection (K or V), all heads, parts in the spec's order.
fn phi(cfg: &Config, weights: &[f32], rows: &[&[f64]], h: usize, dim: usize) -> Vec<f64> {
    let hkv = cfg.num_kv_heads as usize;
    let l = cfg.cmp_block as usize;
    let hid = cfg.phi_hidden as usize;
    assert_eq!(rows.len(), l);
    let w = |i: usize| weights[i] as f64;
    // Row j with the positional term added (x_j + pe[h][j]); `pe_base` is where pe starts.
    let with_pe = |pe_base: usize, j: usize, c: usize| -> f64 {
        let pe = if cfg.phi_pe { w(pe_base + (h * l + j) * dim + c) } else { 0.0 };
        rows[j][c] + pe
    };
    let mut out = vec![0.0f64; dim];
    match cfg.phi {
        // mean_j x_j
        Phi::Mean => {
            for row in rows {
                for c in 0..dim {
                    out[c] += row[c];
                }
            }
            for x in out.iter_mut() {
                *x /= l as f64;
            }
        }
        // sum_j w[h][j] x_j, w: [HKV, l]
        Phi::Weighted => {
            for (j, row) in rows.iter().enumerate() {
                let wj = w(h * l + j);
                for c in 0..dim {
                    out[c] += wj * row[c];
                }
            }
        }
        // out[e] = sum_{j,c} W[h][j*D + c][e] * (x_j[c] + pe[h][j][c]); W: [HKV, l*D, D]
        Phi::Linear => {
            let w_base = h * l * dim * dim;
            let pe_base = hkv * l * dim * dim;
            for j in 0..l {
                for c in 0..dim {
                    let x = with_pe(pe_base, j, c);
                    let row = w_base + (j * dim + c) * dim;
                    for e in 0..dim {
                        out[e] += w(row + e) * x;
                    }
                }
            }
        }
        // hidden[u] = relu(sum_{j,c} W1[h][j*D+c][u] * (x_j[c] + pe) + b1[h][u])
        // out[e]    = sum_u W2[h][u][e] * hidden[u] + b2[h][e]
        Phi::Mlp => {
            let w1_base = 0;
            let b1_base = w1_base + hkv * l * dim * hid;
            let w2_base = b1_base + hkv * hid;
            let b2_base = w2_base + hkv * hid * dim;
            let pe_base = b2_base + hkv * dim;
            let mut hidden = vec![0.0f64; hid];
            for j in 0..l {
                for c in 0..dim {
                    let x = with_pe(pe_base, j, c);
                    let row = w1_base + (h * l * dim + j * dim + c) * hid;
                    for u in 0..hid {
                        hidden[u] += w(row + u) * x;
                    }
                }
            }
            for u in 0..hid {
                hidden[u] = (hidden[u] + w(b1_base + h * hid + u)).max(0.0);
            }
            for e in 0..dim {
                let mut acc = w(b2_base + h * dim + e);
                for u in 0..hid {
                    acc += w(w2_base + (h * hid + u) * dim + e) * hidden[u];
                }
                out[e] = acc;
            }
        }
    }
    out
}

/// Checks that one row of a caller-supplied selection is ascending block indices padded
/// with -1 at the end, and returns the valid (non-negative) entries.
fn selection_row(row: &[i32]) -> Vec<usize> {
    let valid: Vec<usize> = row.iter().take_while(|&&x| x >= 0).map(|&x| x as usize).collect();
    assert!(
        row[valid.len()..].iter().all(|&x| x == -1),
        "selection row {row:?}: entries after the first -1 must all be -1"
    );
    assert!(valid.windows(2).all(|p| p[0] < p[1]), "selection row {row:?} must be strictly ascending");
    valid
}

/// One causal prefill of a single sequence, exactly as `docs/SPEC.md` defines NSA.
pub fn prefill(inp: &RefInputs) -> RefOutput {
    prefill_last(inp, usize::MAX)
}

/// Like `prefill`, but computes only the last `count` queries (all when `count >= T`):
/// outputs are `[count, ...]`, row 0 being query `T - count`. `inp.selection`, if given,
/// is still indexed by absolute position (`[T, HKV, n]`). For checking long contexts,
/// where every query of a prefill would cost O(T^2).
pub fn prefill_last(inp: &RefInputs, count: usize) -> RefOutput {
    let cfg = inp.cfg;
    let hq = cfg.num_q_heads as usize;
    let hkv = cfg.num_kv_heads as usize;
    let dk = cfg.head_dim_qk as usize;
    let dv = cfg.head_dim_v as usize;
    assert!(hq > 0 && hkv > 0 && hq % hkv == 0, "HQ must be a positive multiple of HKV");
    assert!(dk > 0 && dv > 0);
    assert_eq!(inp.q.len() % (hq * dk), 0, "q must be [T, HQ, DK]");
    let t_len = inp.q.len() / (hq * dk);
    let dm = Dims {
        g: hq / hkv,
        l: cfg.cmp_block as usize,
        d: cfg.cmp_stride as usize,
        lp: cfg.sel_block as usize,
        n: cfg.sel_count as usize,
        n_init: cfg.sel_init as usize,
        n_local: cfg.sel_local as usize,
        w: cfg.window as usize,
        scale: cfg.softmax_scale() as f64,
    };
    assert!(dm.l > 0 && dm.d > 0 && dm.lp > 0 && dm.n > 0 && dm.w > 0);
    assert!(dm.l % dm.d == 0 && dm.lp % dm.d == 0, "d must divide l and l'");
    assert_eq!(inp.k.len(), t_len * hkv * dk, "k must be [T, HKV, DK]");
    assert_eq!(inp.v.len(), t_len * hkv * dv, "v must be [T, HKV, DV]");
    assert_eq!(inp.gates.len(), t_len * hq * 3, "gates must be [T, HQ, 3]");
    assert_eq!(inp.phi_k.len(), phi_len(cfg, dk), "phi_k has the wrong length for {:?}", cfg.phi);
    assert_eq!(inp.phi_v.len(), phi_len(cfg, dv), "phi_v has the wrong length for {:?}", cfg.phi);
    if let Some(sel) = inp.selection {
        assert_eq!(sel.len(), t_len * hkv * dm.n, "selection must be [T, HKV, n]");
    }

    // Raw q/k/v widened to f64 once.
    let q: Vec<f64> = inp.q.iter().map(|&x| x as f64).collect();
    let k: Vec<f64> = inp.k.iter().map(|&x| x as f64).collect();
    let v: Vec<f64> = inp.v.iter().map(|&x| x as f64).collect();
    let q_row = |t: usize, h: usize| &q[(t * hq + h) * dk..(t * hq + h + 1) * dk];
    let k_row = |p: usize, h: usize| &k[(p * hkv + h) * dk..(p * hkv + h + 1) * dk];
    let v_row = |p: usize, h: usize| &v[(p * hkv + h) * dv..(p * hkv + h + 1) * dv];

    // ---- Branch 1, Eq. 7: compressed tokens of the whole sequence. ----
    // Token i summarises raw positions [i*d, i*d + l); the sequence has
    // max(0, floor((T - l)/d) + 1) of them. Stored as [NC, HKV, D], rounded to cfg.dtype
    // like the engine's compressed pool.
    let nc = if t_len < dm.l { 0 } else { (t_len - dm.l) / dm.d + 1 };
    let mut kc = vec![0.0f64; nc * hkv * dk];
    let mut vc = vec![0.0f64; nc * hkv * dv];
    for i in 0..nc {
        for h in 0..hkv {
            let krows: Vec<&[f64]> = (0..dm.l).map(|j| k_row(i * dm.d + j, h)).collect();
            let vrows: Vec<&[f64]> = (0..dm.l).map(|j| v_row(i * dm.d + j, h)).collect();
            let kci = phi(cfg, inp.phi_k, &krows, h, dk);
            let vci = phi(cfg, inp.phi_v, &vrows, h, dv);
            for c in 0..dk {
                kc[(i * hkv + h) * dk + c] = round_to_dtype(kci[c], cfg.dtype);
            }
            for c in 0..dv {
                vc[(i * hkv + h) * dv + c] = round_to_dtype(vci[c], cfg.dtype);
            }
        }
    }
    let kc_row = |i: usize, h: usize| &kc[(i * hkv + h) * dk..(i * hkv + h + 1) * dk];
    let vc_row = |i: usize, h: usize| &vc[(i * hkv + h) * dv..(i * hkv + h + 1) * dv];

    let nb = t_len.div_ceil(dm.lp);
    let first = t_len.saturating_sub(count);
    let rows = t_len - first;
    let mut out = vec![0.0f32; rows * hq * dv];
    let mut selected = vec![-1i32; rows * hkv * dm.n];
    let mut scores = vec![0.0f64; rows * hkv * nb];

    for t in first..t_len {
        let r = t - first; // output row
        // Compressed tokens visible to query t: exactly those with i*d + l - 1 <= t.
        let visible: Vec<usize> = (0..nc).filter(|&i| i * dm.d + dm.l - 1 <= t).collect();
        // The query's own selection block b = floor(t / l'); candidates 0..=b.
        let b = t / dm.lp;

        for kh in 0..hkv {
            let heads = kh * dm.g..(kh + 1) * dm.g;

            // ---- Branch 1, Eq. 8: o_cmp and p_cmp for every head of the group. ----
            let kcs: Vec<&[f64]> = visible.iter().map(|&i| kc_row(i, kh)).collect();
            let vcs: Vec<&[f64]> = visible.iter().map(|&i| vc_row(i, kh)).collect();
            let mut o_cmp = Vec::with_capacity(dm.g);
            let mut p_cmp = Vec::with_capacity(dm.g); // p_cmp[h - g*G][i], i over `visible`
            for h in heads.clone() {
                let (o, p) = attend(q_row(t, h), &kcs, &vcs, dm.scale, dv);
                o_cmp.push(o);
                p_cmp.push(p);
            }

            // ---- Branch 2, Eq. 9: p_slc (overlap-centred reading), Eq. 10: group score. ----
            // p_slc[h][j] = sum_{a < l/d} sum_{c < l'/d} p_cmp[h][(l'/d)*j + a + c - (l/d - 1)],
            // out-of-range / not-visible i contributing 0 (`visible` is the prefix 0..len).
            let ld = dm.l / dm.d;
            let lpd = dm.lp / dm.d;
            let mut s = vec![0.0f64; b + 1];
            for (j, sj) in s.iter_mut().enumerate() {
                for p in &p_cmp {
                    for a in 0..ld {
                        for c in 0..lpd {
                            let i = (lpd * j + a + c) as i64 - (ld as i64 - 1);
                            if i >= 0 && (i as usize) < p.len() {
                                *sj += p[i as usize];
                            }
                        }
                    }
                }
            }
            // Forced blocks 0..n_init and b-n_local+1..=b (those that exist) get +inf.
            for j in 0..dm.n_init.min(b + 1) {
                s[j] = f64::INFINITY;
            }
            for j in (b + 1).saturating_sub(dm.n_local)..=b {
                s[j] = f64::INFINITY;
            }
            // A NaN query, key or value makes s NaN; the outputs it reaches are NaN
            // through o_cmp whatever is selected (total_cmp ranks NaN first).
            for j in 0..=b {
                scores[(r * hkv + kh) * nb + j] = s[j];
            }

            // ---- Eq. 11: top min(n, b+1) by score, ties to the lower block index. ----
            let mut order: Vec<usize> = (0..=b).collect();
            order.sort_by(|&x, &y| s[y].total_cmp(&s[x]).then(x.cmp(&y)));
            let mut chosen: Vec<usize> = order[..dm.n.min(b + 1)].to_vec();
            chosen.sort_unstable();
            let row = &mut selected[(r * hkv + kh) * dm.n..(r * hkv + kh + 1) * dm.n];
            for (slot, &j) in row.iter_mut().zip(chosen.iter()) {
                *slot = j as i32;
            }

            // Blocks actually attended: the caller's override, else our own choice.
            let attended: Vec<usize> = match inp.selection {
                Some(sel) => selection_row(&sel[(t * hkv + kh) * dm.n..(t * hkv + kh + 1) * dm.n]),
                None => chosen,
            };

            // ---- Eq. 12: o_slc over every position p <= t inside the attended blocks. ----
            let slc_pos: Vec<usize> = attended
                .iter()
                .flat_map(|&j| j * dm.lp..(j + 1) * dm.lp)
                .filter(|&p| p <= t)
                .collect();
            let ks: Vec<&[f64]> = slc_pos.iter().map(|&p| k_row(p, kh)).collect();
            let vs: Vec<&[f64]> = slc_pos.iter().map(|&p| v_row(p, kh)).collect();

            // ---- Branch 3: sliding window, keys max(0, t-w+1)..=t. ----
            let win_pos: Vec<usize> = ((t + 1).saturating_sub(dm.w)..=t).collect();
            let kw: Vec<&[f64]> = win_pos.iter().map(|&p| k_row(p, kh)).collect();
            let vw: Vec<&[f64]> = win_pos.iter().map(|&p| v_row(p, kh)).collect();

            // ---- Eq. 5: gated sum of the three branches. ----
            for (gi, h) in heads.enumerate() {
                let (o_slc, _) = attend(q_row(t, h), &ks, &vs, dm.scale, dv);
                let (o_win, _) = attend(q_row(t, h), &kw, &vw, dm.scale, dv);
                let gate = |x: usize| inp.gates[(t * hq + h) * 3 + x] as f64;
                let (g_cmp, g_slc, g_win) = (gate(0), gate(1), gate(2));
                for e in 0..dv {
                    let o = g_cmp * o_cmp[gi][e] + g_slc * o_slc[e] + g_win * o_win[e];
                    out[(r * hq + h) * dv + e] = o as f32;
                }
            }
        }
    }
    RefOutput { out, selected, scores, nb }
}

/// Plain causal full attention (every head of a GQA group attends keys `0..=t` of its KV
/// head), f64 inside. `q: [T, HQ, DK]`, `k: [T, HKV, DK]`, `v: [T, HKV, DV]`; output
/// `[T, HQ, DV]`.
#[allow(clippy::too_many_arguments)]
pub fn full_attention(q: &[f32], k: &[f32], v: &[f32], hq: usize, hkv: usize, dk: usize, dv: usize, scale: f64) -> Vec<f32> {
    assert!(hq > 0 && hkv > 0 && hq % hkv == 0 && dk > 0 && dv > 0);
    assert_eq!(q.len() % (hq * dk), 0);
    let t_len = q.len() / (hq * dk);
    assert_eq!(k.len(), t_len * hkv * dk);
    assert_eq!(v.len(), t_len * hkv * dv);
    let g = hq / hkv;
    let k64: Vec<f64> = k.iter().map(|&x| x as f64).collect();
    let v64: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    let mut out = vec![0.0f32; t_len * hq * dv];
    for t in 0..t_len {
        for h in 0..hq {
            let kh = h / g;
            let qt: Vec<f64> = q[(t * hq + h) * dk..(t * hq + h + 1) * dk].iter().map(|&x| x as f64).collect();
            let ks: Vec<&[f64]> = (0..=t).map(|p| &k64[(p * hkv + kh) * dk..(p * hkv + kh + 1) * dk]).collect();
            let vs: Vec<&[f64]> = (0..=t).map(|p| &v64[(p * hkv + kh) * dv..(p * hkv + kh + 1) * dv]).collect();
            let (o, _) = attend(&qt, &ks, &vs, scale, dv);
            for e in 0..dv {
                out[(t * hq + h) * dv + e] = o[e] as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;
    use crate::rng::Rng;

    fn cfg(p: Preset, hq: u32, hkv: u32, dk: u32, dv: u32) -> Config {
        let mut c = Config::preset(p).with_shape(hq, hkv, dk, dv);
        c.dtype = Dtype::F32;
        c
    }

    /// Config with l = d = l' = 8 for hand-computed cases (1 head, DK = DV = 8).
    fn tiny_cfg() -> Config {
        let mut c = cfg(Preset::Fla, 1, 1, 8, 8);
        c.cmp_block = 8;
        c.cmp_stride = 8;
        c.sel_block = 8;
        c.page_size = 8;
        c.window = 8;
        c
    }

    fn gates(t_len: usize, hq: usize, g: [f32; 3]) -> Vec<f32> {
        (0..t_len * hq).flat_map(|_| g).collect()
    }

    struct Data {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
    }

    fn random_data(c: &Config, t_len: usize, seed: u64) -> Data {
        let mut r = Rng(seed);
        let (hq, hkv, dk, dv) = (c.num_q_heads as usize, c.num_kv_heads as usize, c.head_dim_qk as usize, c.head_dim_v as usize);
        Data { q: r.vec(t_len * hq * dk, 1.0), k: r.vec(t_len * hkv * dk, 1.0), v: r.vec(t_len * hkv * dv, 1.0) }
    }

    fn run(c: &Config, d: &Data, g: &[f32], phi_k: &[f32], phi_v: &[f32], selection: Option<&[i32]>) -> RefOutput {
        prefill(&RefInputs { cfg: c, q: &d.q, k: &d.k, v: &d.v, gates: g, phi_k, phi_v, selection })
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// (1) n*l' >= T and gates (0,1,0): every block 0..=b is selected, so the selected
    /// branch is full causal attention.
    #[test]
    fn selected_branch_covering_everything_is_full_attention() {
        let c = cfg(Preset::Paper, 4, 2, 16, 8);
        let t_len = 200; // n*l' = 16*64 = 1024 >= 200
        let d = random_data(&c, t_len, 1);
        let r = run(&c, &d, &gates(t_len, 4, [0.0, 1.0, 0.0]), &[], &[], None);
        let full = full_attention(&d.q, &d.k, &d.v, 4, 2, 16, 8, c.softmax_scale() as f64);
        let diff = max_abs_diff(&r.out, &full);
        assert!(diff < 1e-6, "max diff {diff}");
        // And the selection is exactly 0..=b, -1 padded.
        for t in 0..t_len {
            let b = t / 64;
            for kh in 0..2 {
                let row = &r.selected[(t * 2 + kh) * 16..(t * 2 + kh + 1) * 16];
                for (s, &x) in row.iter().enumerate() {
                    assert_eq!(x, if s <= b { s as i32 } else { -1 }, "t={t} row={row:?}");
                }
            }
        }
    }

    /// (2) w >= T and gates (0,0,1): the window branch is full causal attention; and with
    /// w = 1 it returns v[t] itself.
    #[test]
    fn window_branch_covering_everything_is_full_attention() {
        let c = cfg(Preset::Paper, 4, 2, 16, 8);
        let t_len = 150; // w = 512
        let d = random_data(&c, t_len, 2);
        let r = run(&c, &d, &gates(t_len, 4, [0.0, 0.0, 1.0]), &[], &[], None);
        let full = full_attention(&d.q, &d.k, &d.v, 4, 2, 16, 8, c.softmax_scale() as f64);
        let diff = max_abs_diff(&r.out, &full);
        assert!(diff < 1e-6, "max diff {diff}");

        let mut c1 = c;
        c1.window = 1;
        let r1 = run(&c1, &d, &gates(t_len, 4, [0.0, 0.0, 1.0]), &[], &[], None);
        for t in 0..t_len {
            for h in 0..4 {
                let kh = h / 2;
                assert_eq!(&r1.out[(t * 4 + h) * 8..(t * 4 + h + 1) * 8], &d.v[(t * 2 + kh) * 8..(t * 2 + kh + 1) * 8]);
            }
        }
        // A window of 3 at t = 100 equals full attention over the 3-key sequence [98, 100].
        let mut c3 = c;
        c3.window = 3;
        let r3 = run(&c3, &d, &gates(t_len, 4, [0.0, 0.0, 1.0]), &[], &[], None);
        let t = 100;
        let sub = |x: &[f32], w: usize| x[(t - 2) * w..(t + 1) * w].to_vec();
        let sub_full = full_attention(&sub(&d.q, 4 * 16), &sub(&d.k, 2 * 16), &sub(&d.v, 2 * 8), 4, 2, 16, 8, c.softmax_scale() as f64);
        let diff = max_abs_diff(&r3.out[t * 4 * 8..(t + 1) * 4 * 8], &sub_full[2 * 4 * 8..]);
        assert!(diff < 1e-6, "max diff {diff}");
    }

    /// (3) fla preset (l = d = l' = 64, phi = mean): p_slc == p_cmp, so the group score of
    /// block j is the sum over the group's heads of the softmax weight of compressed token
    /// j. Keys are constant within each 64-block, so kc_j = k_j and the weights have a
    /// closed form.
    #[test]
    fn fla_scores_equal_compressed_probabilities() {
        let mut c = cfg(Preset::Fla, 2, 1, 8, 8);
        c.sel_init = 0;
        c.sel_local = 0;
        c.sel_count = 1;
        let t_len = 256;
        // Key rows in block j: (c_j, 0, ..., 0) with c = [0.5, -1, 2, 1]; head 0 has
        // q = (a0, 0..), head 1 has q = (a1, 0..).
        let cj = [0.5f32, -1.0, 2.0, 1.0];
        let (a0, a1) = (1.5f32, -0.75f32);
        let mut k = vec![0.0f32; t_len * 8];
        for p in 0..t_len {
            k[p * 8] = cj[p / 64];
        }
        let mut q = vec![0.0f32; t_len * 2 * 8];
        for t in 0..t_len {
            q[(t * 2) * 8] = a0;
            q[(t * 2 + 1) * 8] = a1;
        }
        let v = Rng(3).vec(t_len * 8, 1.0);
        let d = Data { q, k, v };
        let r = run(&c, &d, &gates(t_len, 2, [1.0, 0.0, 0.0]), &[], &[], None);
        assert_eq!(r.nb, 4);
        let scale = c.softmax_scale() as f64;
        for t in 0..t_len {
            let b = t / 64;
            let nvis = (t + 1) / 64; // tokens with 64i + 63 <= t
            let p = |a: f32, j: usize| -> f64 {
                let z: f64 = (0..nvis).map(|i| (scale * a as f64 * cj[i] as f64).exp()).sum();
                (scale * a as f64 * cj[j] as f64).exp() / z
            };
            let mut best = (f64::NEG_INFINITY, 0);
            for j in 0..4 {
                let want = if j < nvis { p(a0, j) + p(a1, j) } else { 0.0 };
                let got = r.scores[t * 4 + j];
                assert!((got - want).abs() < 1e-12, "t={t} j={j}: {got} vs {want}");
                if j <= b && want > best.0 {
                    best = (want, j);
                }
            }
            // Top-1 is the argmax (block 0 when nothing is visible: ties go low).
            assert_eq!(r.selected[t], best.1 as i32, "t={t}");
        }
        // Ties go to the lower index: with q = 0 every visible block scores G/nvis.
        let mut c2 = c;
        c2.sel_count = 2;
        let d0 = Data { q: vec![0.0; t_len * 2 * 8], ..d };
        let r0 = run(&c2, &d0, &gates(t_len, 2, [1.0, 0.0, 0.0]), &[], &[], None);
        let t = 250; // b = 3, 3 visible tokens each with score 2/3, block 3 scores 0
        assert!((r0.scores[t * 4] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r0.scores[t * 4 + 3], 0.0);
        assert_eq!(&r0.selected[t * 2..t * 2 + 2], &[0, 1]);
    }

    /// Paper preset (l = 32, d = 16, l' = 64): the overlap-centred Eq. 9 gives
    /// p_slc[j] = p[4j-1] + 2p[4j] + 2p[4j+1] + 2p[4j+2] + p[4j+3] (a + c counts
    /// 1,2,2,2,1 over a < 2, c < 4). With q = 0 every visible p equals 1/nvis.
    #[test]
    fn paper_score_mapping_by_hand() {
        let mut c = cfg(Preset::Paper, 1, 1, 8, 8);
        c.sel_init = 0;
        c.sel_local = 0;
        let t_len = 200;
        let mut d = random_data(&c, t_len, 4);
        d.q.iter_mut().for_each(|x| *x = 0.0);
        let r = run(&c, &d, &gates(t_len, 1, [1.0, 0.0, 0.0]), &[], &[], None);
        let t = 150; // b = 2; visible tokens: 16i + 31 <= 150 -> i = 0..=7, nvis = 8
        let p = 1.0 / 8.0;
        let want = [
            (2.0 + 2.0 + 2.0 + 1.0) * p, // j=0: p[-1] missing
            8.0 * p,                      // j=1: p[3..=7] all visible
            1.0 * p,                      // j=2: only p[7] (weight 1) visible
        ];
        for j in 0..3 {
            assert!((r.scores[t * r.nb + j] - want[j]).abs() < 1e-12, "j={j}: {}", r.scores[t * r.nb + j]);
        }
        // Random q: the same weights against the probabilities recomputed here.
        let mut d2 = random_data(&c, t_len, 5);
        d2.q.iter_mut().for_each(|x| *x *= 4.0);
        let r2 = run(&c, &d2, &gates(t_len, 1, [1.0, 0.0, 0.0]), &[], &[], None);
        let t = 199; // nvis: 16i + 31 <= 199 -> i <= 10, 11 tokens
        let kc: Vec<Vec<f64>> = (0..11)
            .map(|i| (0..8).map(|e| (0..32).map(|j| d2.k[(16 * i + j) * 8 + e] as f64).sum::<f64>() / 32.0).collect())
            .collect();
        let logits: Vec<f64> =
            kc.iter().map(|kci| c.softmax_scale() as f64 * (0..8).map(|e| d2.q[t * 8 + e] as f64 * kci[e]).sum::<f64>()).collect();
        let z: f64 = logits.iter().map(|x| x.exp()).sum();
        let pc = |i: i64| if (0..11).contains(&i) { logits[i as usize].exp() / z } else { 0.0 };
        for j in 0..=3i64 {
            let want = pc(4 * j - 1) + 2.0 * (pc(4 * j) + pc(4 * j + 1) + pc(4 * j + 2)) + pc(4 * j + 3);
            let got = r2.scores[t * r2.nb + j as usize];
            assert!((got - want).abs() < 1e-6, "j={j}: {got} vs {want}");
        }
    }

    /// (4) l = d = l' = 8, one head: o_cmp by hand. v[p][c] = p + c, so the mean of block
    /// 0 is 3.5 + c and of block 1 is 11.5 + c. Block 0 keys are 0 and block 1 keys are
    /// e_0, q = sqrt(8) ln 3 e_0, so the logits are (0, ln 3) and p = (1/4, 3/4).
    #[test]
    fn compressed_branch_by_hand() {
        let mut c = tiny_cfg();
        c.sel_init = 0;
        c.sel_local = 0;
        c.sel_count = 1;
        let t_len = 16;
        let mut k = vec![0.0f32; t_len * 8];
        for p in 8..16 {
            k[p * 8] = 1.0;
        }
        let mut v = vec![0.0f32; t_len * 8];
        for p in 0..t_len {
            for e in 0..8 {
                v[p * 8 + e] = (p + e) as f32;
            }
        }
        let qa = (8.0f64.sqrt() * 3.0f64.ln()) as f32;
        let mut q = vec![0.0f32; t_len * 8];
        for t in 0..t_len {
            q[t * 8] = qa;
        }
        let d = Data { q, k, v };
        let r = run(&c, &d, &gates(t_len, 1, [1.0, 0.0, 0.0]), &[], &[], None);
        for t in 0..7 {
            assert!(r.out[t * 8..(t + 1) * 8].iter().all(|&x| x == 0.0), "t={t}");
        }
        for t in 7..15 {
            for e in 0..8 {
                assert_eq!(r.out[t * 8 + e], 3.5 + e as f32, "t={t} e={e}");
            }
        }
        for e in 0..8 {
            let got = r.out[15 * 8 + e];
            assert!((got - (9.5 + e as f32)).abs() < 1e-5, "e={e}: {got}");
        }
        // l = d = l': scores are p_cmp itself; top-1 is block 1.
        assert!((r.scores[15 * 2] - 0.25).abs() < 1e-7 && (r.scores[15 * 2 + 1] - 0.75).abs() < 1e-7);
        assert_eq!(r.selected[15], 1);
    }

    /// Compressed tokens are stored in cfg.dtype: with bf16 a single compressed token gives
    /// o_cmp = bf16(f32(mean)) exactly.
    #[test]
    fn compressed_tokens_are_rounded_to_dtype() {
        let mut c = tiny_cfg();
        c.dtype = Dtype::Bf16;
        let t_len = 8;
        let d = random_data(&c, t_len, 6);
        let r = run(&c, &d, &gates(t_len, 1, [1.0, 0.0, 0.0]), &[], &[], None);
        let mut any_rounded = false;
        for e in 0..8 {
            let mean = (0..8).map(|p| d.v[p * 8 + e] as f64).sum::<f64>() / 8.0;
            let want = half::bf16::from_f32(mean as f32).to_f32();
            assert_eq!(r.out[7 * 8 + e], want, "e={e}");
            any_rounded |= want != mean as f32;
        }
        assert!(any_rounded, "test data should exercise the rounding");
    }

    /// The other phi kinds reduce to the mean for the right weights, which checks their
    /// weight layouts (including pe and the MLP biases).
    #[test]
    fn phi_variants_reduce_to_mean() {
        let base = {
            let mut c = cfg(Preset::Paper, 4, 2, 8, 16);
            c.window = 4;
            c.sel_count = 4;
            c
        };
        let t_len = 130;
        let d = random_data(&base, t_len, 7);
        let g = gates(t_len, 4, [0.5, 0.3, 0.2]);
        let want = run(&base, &d, &g, &[], &[], None);
        let (hkv, l) = (2usize, 32usize);

        let mut cw = base;
        cw.phi = Phi::Weighted;
        let w = vec![1.0 / 32.0; hkv * l];
        let r = run(&cw, &d, &g, &w, &w, None);
        assert!(max_abs_diff(&r.out, &want.out) < 1e-6);
        assert_eq!(r.selected, want.selected);

        // Linear: W[h][j*D+c][e] = [c == e] / l, with and without pe (pe = 0 here; a
        // non-zero pe is checked below).
        let lin = |dim: usize, pe: bool| -> Vec<f32> {
            let mut w = vec![0.0f32; hkv * l * dim * dim];
            for h in 0..hkv {
                for j in 0..l {
                    for c in 0..dim {
                        w[h * l * dim * dim + (j * dim + c) * dim + c] = 1.0 / 32.0;
                    }
                }
            }
            if pe {
                w.extend(std::iter::repeat(0.0).take(hkv * l * dim));
            }
            w
        };
        let mut cl = base;
        cl.phi = Phi::Linear;
        let r = run(&cl, &d, &g, &lin(8, false), &lin(16, false), None);
        assert!(max_abs_diff(&r.out, &want.out) < 1e-6);
        cl.phi_pe = true;
        let r = run(&cl, &d, &g, &lin(8, true), &lin(16, true), None);
        assert!(max_abs_diff(&r.out, &want.out) < 1e-6);

        // A non-zero pe on V shifts every compressed value by mean_j pe[h][j]: with q = 0 on
        // the compressed branch only (gates (1,0,0)), o_cmp = mean of visible vc. Compare
        // the pe run to the no-pe run plus the shift.
        let mut linv = lin(16, true);
        let pe_base = hkv * l * 16 * 16;
        for h in 0..hkv {
            for j in 0..l {
                for c in 0..16 {
                    linv[pe_base + (h * l + j) * 16 + c] = (h * 100 + j * 16 + c) as f32 * 0.01;
                }
            }
        }
        let gc = gates(t_len, 4, [1.0, 0.0, 0.0]);
        let r_pe = run(&cl, &d, &gc, &lin(8, true), &linv, None);
        let r_no = run(&cl, &d, &gc, &lin(8, true), &lin(16, true), None);
        for t in 31..t_len {
            for hh in 0..4 {
                let h = hh / 2;
                for e in 0..16 {
                    let shift = (0..l).map(|j| (h * 100 + j * 16 + e) as f64 * 0.01).sum::<f64>() / 32.0;
                    let i = (t * 4 + hh) * 16 + e;
                    assert!((r_pe.out[i] as f64 - r_no.out[i] as f64 - shift).abs() < 1e-5, "t={t} h={hh} e={e}");
                }
            }
        }

        // MLP: W1 = the mean map into `dim` hidden units, b1 = +10 (keeps relu linear),
        // W2 = identity, b2 = -10.
        let mlp = |dim: usize| -> Vec<f32> {
            let hid = dim;
            let mut w = vec![0.0f32; hkv * l * dim * hid];
            for h in 0..hkv {
                for j in 0..l {
                    for c in 0..dim {
                        w[(h * l * dim + j * dim + c) * hid + c] = 1.0 / 32.0;
                    }
                }
            }
            w.extend(std::iter::repeat(10.0).take(hkv * hid)); // b1
            let mut w2 = vec![0.0f32; hkv * hid * dim];
            for h in 0..hkv {
                for u in 0..hid {
                    w2[(h * hid + u) * dim + u] = 1.0;
                }
            }
            w.extend(w2);
            w.extend(std::iter::repeat(-10.0).take(hkv * dim)); // b2
            w
        };
        // phi_hidden must be one value for K and V, so use DK = DV for the MLP check.
        let mut cm = cfg(Preset::Paper, 4, 2, 16, 16);
        cm.window = 4;
        cm.sel_count = 4;
        let dm = random_data(&cm, t_len, 8);
        let want_m = run(&cm, &dm, &g, &[], &[], None);
        cm.phi = Phi::Mlp;
        cm.phi_hidden = 16;
        let r = run(&cm, &dm, &g, &mlp(16), &mlp(16), None);
        assert!(max_abs_diff(&r.out, &want_m.out) < 1e-5, "{}", max_abs_diff(&r.out, &want_m.out));
        assert_eq!(r.selected, want_m.selected);
        // b1 = -10 instead makes relu kill everything: phi = b2 = -10 for every token.
        let mut dead = mlp(16);
        let b1 = hkv * l * 16 * 16;
        dead[b1..b1 + hkv * 16].iter_mut().for_each(|x| *x = -10.0);
        let r = run(&cm, &dm, &gates(t_len, 4, [1.0, 0.0, 0.0]), &dead, &dead, None);
        assert!(r.out[31 * 4 * 16..].iter().all(|&x| (x + 10.0).abs() < 1e-5));
    }

    /// (5) Forced blocks are always selected; every row is ascending, -1 padded, with
    /// exactly min(n, b+1) valid entries, and they are the highest scores.
    #[test]
    fn selection_invariants() {
        let mut c = cfg(Preset::Paper, 6, 2, 16, 8);
        c.sel_count = 5; // n_init = 1, n_local = 2
        let t_len = 700;
        let d = random_data(&c, t_len, 9);
        let mut d2 = Data { q: d.q.iter().map(|x| x * 6.0).collect(), ..d };
        d2.k.iter_mut().for_each(|x| *x *= 2.0);
        let r = run(&c, &d2, &gates(t_len, 6, [0.4, 0.4, 0.2]), &[], &[], None);
        let (n, hkv, nb) = (5usize, 2usize, r.nb);
        assert_eq!(nb, 11);
        for t in 0..t_len {
            let b = t / 64;
            for kh in 0..hkv {
                let row = &r.selected[(t * hkv + kh) * n..(t * hkv + kh + 1) * n];
                let valid: Vec<usize> = row.iter().filter(|&&x| x >= 0).map(|&x| x as usize).collect();
                assert_eq!(valid.len(), n.min(b + 1), "t={t} {row:?}");
                assert!(row[valid.len()..].iter().all(|&x| x == -1), "t={t} {row:?}");
                assert!(valid.windows(2).all(|p| p[0] < p[1]), "t={t} {row:?}");
                assert!(valid.iter().all(|&j| j <= b));
                let forced: Vec<usize> = std::iter::once(0).chain(b.saturating_sub(1)..=b).collect();
                for f in forced {
                    assert!(valid.contains(&f), "t={t} forced {f} missing from {row:?}");
                }
                let s = &r.scores[(t * hkv + kh) * nb..(t * hkv + kh + 1) * nb];
                assert!(s[b + 1..].iter().all(|&x| x == 0.0));
                let min_in = valid.iter().map(|&j| s[j]).fold(f64::INFINITY, f64::min);
                for j in 0..=b {
                    if !valid.contains(&j) {
                        assert!(s[j] <= min_in, "t={t}: unselected {j} beats a selected block");
                    }
                }
            }
        }
        // Passing our own selection back attends the same blocks; passing another one changes
        // the output but not `selected`.
        let own = run(&c, &d2, &gates(t_len, 6, [0.4, 0.4, 0.2]), &[], &[], Some(&r.selected));
        assert_eq!(own.out, r.out);
        let mut other = r.selected.clone();
        for row in other.chunks_mut(n) {
            row.iter_mut().skip(1).for_each(|x| *x = -1);
        }
        let r_other = run(&c, &d2, &gates(t_len, 6, [0.4, 0.4, 0.2]), &[], &[], Some(&other));
        assert_eq!(r_other.selected, r.selected);
        assert!(max_abs_diff(&r_other.out, &r.out) > 1e-3);
    }

    /// (6) A query before any compressed token exists (t < l - 1) with gates (1,0,0)
    /// outputs exactly zeros, never NaN; the first query that sees one does not.
    #[test]
    fn no_compressed_token_yet_gives_zeros() {
        let c = cfg(Preset::Paper, 4, 2, 16, 8);
        let t_len = 40;
        let d = random_data(&c, t_len, 10);
        let r = run(&c, &d, &gates(t_len, 4, [1.0, 0.0, 0.0]), &[], &[], None);
        assert!(r.out[..31 * 4 * 8].iter().all(|&x| x == 0.0));
        assert!(r.out[31 * 4 * 8..32 * 4 * 8].iter().any(|&x| x != 0.0));
        assert!(r.out.iter().all(|x| x.is_finite()));
    }
}
