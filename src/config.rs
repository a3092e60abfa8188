//! The engine's configuration: model shape, NSA parameters (docs/SPEC.md), storage type
//! and capacity. Validated once; everything downstream relies on `validate` having passed.

use crate::error::{NsaError, Result};

/// Storage type of K/V pools and of the per-layer activations (q, k, v, out).
/// Accumulation is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Dtype {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

impl Dtype {
    pub const fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// The compression function `phi` of the compressed branch (docs/SPEC.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Phi {
    /// `mean_j x_j`; no weights.
    Mean = 0,
    /// `sum_j w[j] x_j`; weights `[HKV, l]`.
    Weighted = 1,
    /// `W^T concat_j (x_j + pe_j)`; weights `W: [HKV, l*D, D]`, then `pe: [HKV, l, D]` if `phi_pe`.
    Linear = 2,
    /// `W2^T relu(W1^T concat_j (x_j + pe_j) + b1) + b2`; see `Config::phi_weight_len`.
    Mlp = 3,
}

impl Phi {
    pub const fn name(self) -> &'static str {
        match self {
            Phi::Mean => "mean",
            Phi::Weighted => "weighted",
            Phi::Linear => "linear",
            Phi::Mlp => "mlp",
        }
    }
}

/// The two parameter sets the engine is tested to compute exactly (docs/SPEC.md, "Presets").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The paper's: l=32, d=16, l'=64, n=16 (1 initial + 2 local forced), w=512, phi=mean.
    Paper,
    /// flash-linear-attention's trained setting: l=d=l'=64, phi=mean.
    Fla,
}

/// Full engine configuration. Field names follow docs/SPEC.md's table of names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    // --- model shape ---
    /// Query heads `HQ`.
    pub num_q_heads: u32,
    /// Key/value heads `HKV`; `HQ` must be a multiple (group size `G = HQ/HKV`, any value >= 1).
    pub num_kv_heads: u32,
    /// Query/key head dim `DK`.
    pub head_dim_qk: u32,
    /// Value head dim `DV`.
    pub head_dim_v: u32,
    /// Storage type of pools and activations.
    pub dtype: Dtype,

    // --- NSA parameters ---
    /// Compression block length `l`.
    pub cmp_block: u32,
    /// Compression stride `d`; divides `l` and `l'`.
    pub cmp_stride: u32,
    /// Selection block length `l'`; `l <= l'`.
    pub sel_block: u32,
    /// Selected blocks per query `n`, forced ones included.
    pub sel_count: u32,
    /// Forced initial blocks `n_init`.
    pub sel_init: u32,
    /// Forced local blocks `n_local`.
    pub sel_local: u32,
    /// Sliding window length `w` in keys.
    pub window: u32,
    /// Softmax scale; `0` (the presets' value) means `1/sqrt(DK)`, derived from
    /// `head_dim_qk` when the engine is created, so changing the shape keeps it right.
    /// Read the value in effect with [`Config::softmax_scale`].
    pub scale: f32,
    /// Compression function.
    pub phi: Phi,
    /// Hidden width of `phi = mlp`; ignored otherwise.
    pub phi_hidden: u32,
    /// Whether `phi = linear | mlp` adds a positional term `pe[j]` to each row.
    pub phi_pe: bool,

    // --- paging and capacity ---
    /// Tokens per page `P`; a multiple of `l'`, so a selection block is one contiguous load.
    pub page_size: u32,
    /// Layers whose K/V the pools hold.
    pub num_layers: u32,
    /// Sequence slots; sequence ids are `0..max_seqs`.
    pub max_seqs: u32,
    /// Longest sequence, in tokens.
    pub max_seq_len: u32,
    /// Raw K/V pages in the pool (shared by all sequences).
    pub num_pages: u32,
    /// Compressed K/V pages in the pool (each holds `page_size` compressed tokens).
    pub num_cmp_pages: u32,
    /// Most sequences in one step.
    pub max_step_seqs: u32,
    /// Most new tokens (queries) in one step, over all its sequences.
    pub max_step_tokens: u32,
    /// Threads of the CPU backend's layer runs: 1 (the presets' value) runs everything on
    /// the calling thread; `N > 1` makes `CpuBackend::new` start `N - 1` worker threads
    /// once, which every layer run then shares with the calling thread.
    pub cpu_threads: u32,
}

/// Upper bounds that keep every index computation in range (no silent wrap-around).
pub const MAX_HEADS: u32 = 1024;
pub const MAX_HEAD_DIM: u32 = 512;
pub const MAX_SEL_COUNT: u32 = 1024;
pub const MAX_THREADS: u32 = 256;

impl Config {
    /// A preset's NSA parameters with the paper's model shape (HQ=64, HKV=4, DK=192,
    /// DV=128, bf16), `scale = 0` (derived: `1/sqrt(DK)` for whatever DK ends up being),
    /// `cpu_threads = 1` and a small capacity (1 layer, 4 sequences of 8192 tokens).
    /// Change the shape and capacity fields, then call [`Config::fit_pages`].
    pub fn preset(p: Preset) -> Config {
        let (l, d, lp, n, init, local, phi) = match p {
            Preset::Paper => (32, 16, 64, 16, 1, 2, Phi::Mean),
            Preset::Fla => (64, 64, 64, 16, 1, 2, Phi::Mean),
        };
        let mut c = Config {
            num_q_heads: 64,
            num_kv_heads: 4,
            head_dim_qk: 192,
            head_dim_v: 128,
            dtype: Dtype::Bf16,
            cmp_block: l,
            cmp_stride: d,
            sel_block: lp,
            sel_count: n,
            sel_init: init,
            sel_local: local,
            window: 512,
            scale: 0.0,
            phi,
            phi_hidden: 0,
            phi_pe: false,
            page_size: lp,
            num_layers: 1,
            max_seqs: 4,
            max_seq_len: 8192,
            num_pages: 0,
            num_cmp_pages: 0,
            max_step_seqs: 4,
            max_step_tokens: 8192,
            cpu_threads: 1,
        };
        c.fit_pages();
        c
    }

    /// Sets the model shape. `scale` is left as it is: when it is 0 (derived, the
    /// presets' value) it follows the new `dk`.
    pub fn with_shape(mut self, hq: u32, hkv: u32, dk: u32, dv: u32) -> Config {
        self.num_q_heads = hq;
        self.num_kv_heads = hkv;
        self.head_dim_qk = dk;
        self.head_dim_v = dv;
        self
    }

    /// The softmax scale the engine uses: `scale` when set (> 0), else `1/sqrt(DK)`.
    pub fn softmax_scale(&self) -> f32 {
        if self.scale == 0.0 {
            1.0 / (self.head_dim_qk.max(1) as f32).sqrt()
        } else {
            self.scale
        }
    }

    /// Sets the capacity: `seqs` sequence slots of up to `max_len` tokens, all of which
    /// may be in one step, prefill chunks of up to `min(max_len, 8192)` tokens per step;
    /// then sizes both page pools to fit (`fit_pages`). Callers that overcommit pages or
    /// want other step limits set those fields afterwards.
    pub fn with_capacity(mut self, seqs: u32, max_len: u32) -> Config {
        self.max_seqs = seqs;
        self.max_step_seqs = seqs;
        self.max_seq_len = max_len;
        self.max_step_tokens = max_len.min(8192).max(seqs);
        self.fit_pages();
        self
    }

    /// Sizes both page pools so that every sequence slot can reach `max_seq_len`
    /// without sharing: `num_pages = max_seqs * ceil(max_seq_len / P)`, and likewise for
    /// compressed pages. Callers that overcommit set the two fields themselves.
    pub fn fit_pages(&mut self) {
        if self.page_size == 0 || self.cmp_stride == 0 {
            return;
        }
        self.num_pages = self.max_seqs.saturating_mul(self.pages_per_seq());
        self.num_cmp_pages = self.max_seqs.saturating_mul(self.cmp_pages_per_seq());
    }

    /// Zeroes this value's padding bytes in place (it is part of the C handles written
    /// into caller memory).
    pub(crate) fn zero_padding(&mut self) {
        crate::zero_pad::zero_gaps!(self, Config {
            num_q_heads, num_kv_heads, head_dim_qk, head_dim_v, dtype, cmp_block, cmp_stride, sel_block, sel_count,
            sel_init, sel_local, window, scale, phi, phi_hidden, phi_pe, page_size, num_layers, max_seqs, max_seq_len,
            num_pages, num_cmp_pages, max_step_seqs, max_step_tokens, cpu_threads,
        });
    }

    /// Heads per GQA group `G`.
    pub fn group_size(&self) -> u32 {
        self.num_q_heads / self.num_kv_heads
    }

    /// Number of compressed tokens of a sequence of length `len`:
    /// `max(0, floor((len - l)/d) + 1)`.
    pub fn num_cmp_tokens(&self, len: u32) -> u32 {
        if len < self.cmp_block {
            0
        } else {
            (len - self.cmp_block) / self.cmp_stride + 1
        }
    }

    /// Raw pages a sequence of length `max_seq_len` needs.
    pub fn pages_per_seq(&self) -> u32 {
        self.max_seq_len.div_ceil(self.page_size)
    }

    /// Compressed pages a sequence of length `max_seq_len` needs.
    pub fn cmp_pages_per_seq(&self) -> u32 {
        self.num_cmp_tokens(self.max_seq_len).div_ceil(self.page_size)
    }

    /// Eq. 9's strides `(A, B)`: compressed tokens per compressed block (`l / d`) and per
    /// selection block (`l' / d`); selection block j sums the compressed tokens
    /// `B*j - (A-1) .. B*j + B - 1`.
    pub fn eq9_strides(&self) -> (u32, u32) {
        (self.cmp_block / self.cmp_stride, self.sel_block / self.cmp_stride)
    }

    /// Selection blocks of the longest sequence.
    pub fn max_sel_blocks(&self) -> u32 {
        self.max_seq_len.div_ceil(self.sel_block)
    }

    /// Length in f32 elements of one layer's phi weights for K (`d = DK`) or V (`d = DV`),
    /// laid out as `docs/SPEC.md` ("Weight layouts") says, parts in the order listed
    /// there (`W` or `W1, b1, W2, b2`, then `pe` when `phi_pe`).
    /// `usize::MAX` when the length overflows (a config `validate` rejects).
    pub fn phi_weight_len(&self, d: u32) -> usize {
        self.checked_phi_weight_len(d).unwrap_or(usize::MAX)
    }

    /// `phi_weight_len` with checked arithmetic: `None` on overflow.
    fn checked_phi_weight_len(&self, d: u32) -> Option<usize> {
        let (hkv, l, d, hid) = (self.num_kv_heads as usize, self.cmp_block as usize, d as usize, self.phi_hidden as usize);
        let m = |xs: &[usize]| xs.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
        let pe = if self.phi_pe { m(&[hkv, l, d])? } else { 0 };
        match self.phi {
            Phi::Mean => Some(0),
            Phi::Weighted => m(&[hkv, l]),
            Phi::Linear => m(&[hkv, l, d, d])?.checked_add(pe),
            Phi::Mlp => {
                let per_head = m(&[l, d, hid])?.checked_add(hid)?.checked_add(m(&[hid, d])?)?.checked_add(d)?;
                m(&[hkv, per_head])?.checked_add(pe)
            }
        }
    }

    /// Checks every field and every relation between fields. The error names the first
    /// field found wrong and its value.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let nz = |f: &'static str, v: u32| if v == 0 { Err(NsaError::config(f, v, "must be at least 1")) } else { Ok(()) };
        nz("num_q_heads", c.num_q_heads)?;
        nz("num_kv_heads", c.num_kv_heads)?;
        if c.num_q_heads > MAX_HEADS {
            return Err(NsaError::config("num_q_heads", c.num_q_heads, format!("must be at most {MAX_HEADS}")));
        }
        if c.num_q_heads % c.num_kv_heads != 0 {
            return Err(NsaError::config(
                "num_q_heads",
                c.num_q_heads,
                format!("must be a multiple of num_kv_heads = {}", c.num_kv_heads),
            ));
        }
        for (f, v) in [("head_dim_qk", c.head_dim_qk), ("head_dim_v", c.head_dim_v)] {
            if v == 0 || v % 8 != 0 || v > MAX_HEAD_DIM {
                return Err(NsaError::config(f, v, format!("must be a multiple of 8 in 8..={MAX_HEAD_DIM}")));
            }
        }
        nz("cmp_stride", c.cmp_stride)?;
        nz("cmp_block", c.cmp_block)?;
        nz("sel_block", c.sel_block)?;
        if c.cmp_block % c.cmp_stride != 0 {
            return Err(NsaError::config("cmp_stride", c.cmp_stride, format!("must divide cmp_block = {}", c.cmp_block)));
        }
        if c.sel_block % c.cmp_stride != 0 {
            return Err(NsaError::config("cmp_stride", c.cmp_stride, format!("must divide sel_block = {}", c.sel_block)));
        }
        if c.cmp_block > c.sel_block {
            return Err(NsaError::config("cmp_block", c.cmp_block, format!("must be <= sel_block = {}", c.sel_block)));
        }
        nz("sel_count", c.sel_count)?;
        if c.sel_count > MAX_SEL_COUNT {
            return Err(NsaError::config("sel_count", c.sel_count, format!("must be at most {MAX_SEL_COUNT}")));
        }
        // In u64: sel_init + sel_local may not fit in u32.
        if (c.sel_count as u64) < c.sel_init as u64 + c.sel_local as u64 {
            return Err(NsaError::config(
                "sel_count",
                c.sel_count,
                format!("must be >= sel_init + sel_local = {} + {}", c.sel_init, c.sel_local),
            ));
        }
        nz("window", c.window)?;
        if !(c.scale.is_finite() && c.scale >= 0.0) {
            return Err(NsaError::config("scale", c.scale, "must be finite and > 0, or 0 for 1/sqrt(head_dim_qk)"));
        }
        if c.phi == Phi::Mlp {
            nz("phi_hidden", c.phi_hidden)?;
            if c.phi_hidden > 65536 {
                return Err(NsaError::config("phi_hidden", c.phi_hidden, "must be at most 65536"));
            }
        }
        for (f, dim) in [("head_dim_qk", c.head_dim_qk), ("head_dim_v", c.head_dim_v)] {
            if !matches!(c.checked_phi_weight_len(dim), Some(n) if n <= isize::MAX as usize / 4) {
                return Err(NsaError::config(f, dim, format!("phi = {} weights for it overflow the address space", c.phi.name())));
            }
        }
        nz("page_size", c.page_size)?;
        if c.page_size % c.sel_block != 0 {
            return Err(NsaError::config("page_size", c.page_size, format!("must be a multiple of sel_block = {}", c.sel_block)));
        }
        nz("num_layers", c.num_layers)?;
        nz("max_seqs", c.max_seqs)?;
        nz("max_seq_len", c.max_seq_len)?;
        if c.max_seq_len > (i32::MAX as u32) / 2 {
            return Err(NsaError::config("max_seq_len", c.max_seq_len, format!("must be at most {}", i32::MAX / 2)));
        }
        nz("num_pages", c.num_pages)?;
        if c.num_pages > i32::MAX as u32 {
            return Err(NsaError::config("num_pages", c.num_pages, "must fit in int32 (page ids are int32)"));
        }
        if c.num_cmp_pages > i32::MAX as u32 {
            return Err(NsaError::config("num_cmp_pages", c.num_cmp_pages, "must fit in int32 (page ids are int32)"));
        }
        if c.num_cmp_pages == 0 && c.num_cmp_tokens(c.max_seq_len) > 0 {
            return Err(NsaError::config(
                "num_cmp_pages",
                c.num_cmp_pages,
                "must be at least 1 when max_seq_len >= cmp_block (compressed tokens need pages)",
            ));
        }
        nz("max_step_seqs", c.max_step_seqs)?;
        if c.max_step_seqs > c.max_seqs {
            return Err(NsaError::config("max_step_seqs", c.max_step_seqs, format!("must be <= max_seqs = {}", c.max_seqs)));
        }
        nz("max_step_tokens", c.max_step_tokens)?;
        if c.max_step_tokens < c.max_step_seqs {
            return Err(NsaError::config(
                "max_step_tokens",
                c.max_step_tokens,
                format!("must be >= max_step_seqs = {}", c.max_step_seqs),
            ));
        }
        nz("cpu_threads", c.cpu_threads)?;
        if c.cpu_threads > MAX_THREADS {
            return Err(NsaError::config("cpu_threads", c.cpu_threads, format!("must be at most {MAX_THREADS}")));
        }
        // Pool byte sizes must fit in usize/u64 without overflow (checked in layout too).
        crate::layout::Layout::new(c)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        Config::preset(Preset::Paper).validate().unwrap();
        Config::preset(Preset::Fla).validate().unwrap();
    }

    #[test]
    fn num_cmp_tokens_matches_formula() {
        let c = Config::preset(Preset::Paper);
        assert_eq!(c.num_cmp_tokens(0), 0);
        assert_eq!(c.num_cmp_tokens(31), 0);
        assert_eq!(c.num_cmp_tokens(32), 1);
        assert_eq!(c.num_cmp_tokens(47), 1);
        assert_eq!(c.num_cmp_tokens(48), 2);
        assert_eq!(c.num_cmp_tokens(65536), 4095);
    }

    fn field_of(e: NsaError) -> &'static str {
        match e {
            NsaError::InvalidConfig { field, .. } => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn every_inconsistency_names_its_field() {
        let base = Config::preset(Preset::Paper);
        let cases: Vec<(&str, Box<dyn Fn(&mut Config)>)> = vec![
            ("num_q_heads", Box::new(|c| c.num_q_heads = 0)),
            ("num_kv_heads", Box::new(|c| c.num_kv_heads = 0)),
            ("num_q_heads", Box::new(|c| c.num_q_heads = 63)),
            ("head_dim_qk", Box::new(|c| c.head_dim_qk = 100)),
            ("head_dim_v", Box::new(|c| c.head_dim_v = 0)),
            ("cmp_stride", Box::new(|c| c.cmp_stride = 12)),
            ("cmp_stride", Box::new(|c| { c.cmp_stride = 32; c.cmp_block = 32; c.sel_block = 48; c.page_size = 48 })),
            ("cmp_block", Box::new(|c| c.cmp_block = 128)),
            ("sel_count", Box::new(|c| c.sel_count = 2)),
            ("window", Box::new(|c| c.window = 0)),
            ("scale", Box::new(|c| c.scale = f32::NAN)),
            ("phi_hidden", Box::new(|c| c.phi = Phi::Mlp)),
            ("page_size", Box::new(|c| c.page_size = 96)),
            ("max_seq_len", Box::new(|c| c.max_seq_len = 0)),
            ("num_pages", Box::new(|c| c.num_pages = 0)),
            ("num_cmp_pages", Box::new(|c| c.num_cmp_pages = 0)),
            ("max_step_seqs", Box::new(|c| c.max_step_seqs = 99)),
            ("max_step_tokens", Box::new(|c| c.max_step_tokens = 1)),
            ("cpu_threads", Box::new(|c| c.cpu_threads = 0)),
            // sel_init + sel_local wraps in u32 (issue 13, item 4).
            ("sel_count", Box::new(|c| { c.sel_init = u32::MAX; c.sel_local = 2 })),
            ("sel_count", Box::new(|c| { c.sel_init = 2; c.sel_local = u32::MAX })),
        ];
        for (want, f) in cases {
            let mut c = base;
            f(&mut c);
            let e = c.validate().expect_err(want);
            let msg = e.to_string();
            assert_eq!(field_of(e), want, "{msg}");
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn preset_scale_follows_head_dim_unless_set() {
        let c = Config::preset(Preset::Paper);
        assert_eq!(c.scale, 0.0);
        assert_eq!(c.softmax_scale(), 1.0 / 192f32.sqrt());
        let c = c.with_shape(8, 2, 64, 32);
        assert_eq!(c.softmax_scale(), 0.125);
        let mut c = c;
        c.scale = 0.5;
        assert_eq!(c.with_shape(8, 2, 128, 32).softmax_scale(), 0.5);
        c.scale = -1.0;
        assert!(c.validate().unwrap_err().to_string().contains("scale"));
    }

    #[test]
    fn odd_group_sizes_are_fine() {
        let c = Config::preset(Preset::Paper).with_shape(6, 2, 64, 128);
        c.validate().unwrap();
        assert_eq!(c.group_size(), 3);
    }
}
