//! `nsa_config_t`: the engine configuration as a C struct, its presets and validation.

use super::args::{out_ptr, out_struct, read_struct, Versioned};
use super::status::{guard, nsa_status, FfiResult};
use crate::config::{Config, Dtype, Phi, Preset};
use crate::error::NsaError;

/// Element type of the K/V pools and of a layer's `q`, `k`, `v` and `out` arrays
/// (one of `NSA_DTYPE_*`). Accumulation is always f32.
pub type nsa_dtype = u32;
/// IEEE 754 binary32 (`float`).
pub const NSA_DTYPE_F32: nsa_dtype = 0;
/// IEEE 754 binary16 (`_Float16`, CUDA `__half`), stored as 16-bit patterns.
pub const NSA_DTYPE_F16: nsa_dtype = 1;
/// bfloat16 (the upper 16 bits of a `float`, CUDA `__nv_bfloat16`), stored as 16-bit patterns.
pub const NSA_DTYPE_BF16: nsa_dtype = 2;

/// The compression function phi of NSA's compressed branch (one of `NSA_PHI_*`).
pub type nsa_phi = u32;
/// Mean of the `cmp_block` rows; no weights.
pub const NSA_PHI_MEAN: nsa_phi = 0;
/// `sum_j w[j] x_j`; weights `[HKV, cmp_block]` floats.
pub const NSA_PHI_WEIGHTED: nsa_phi = 1;
/// `W^T concat_j (x_j + pe_j)`; weights `W: [HKV, cmp_block*D, D]`, then `pe: [HKV, cmp_block, D]` if `phi_pe`.
pub const NSA_PHI_LINEAR: nsa_phi = 2;
/// `W2^T relu(W1^T concat_j (x_j + pe_j) + b1) + b2` (the paper's); weights `W1, b1, W2, b2`, then `pe` if `phi_pe`.
pub const NSA_PHI_MLP: nsa_phi = 3;

/// A named parameter set for `nsa_config_preset` (one of `NSA_PRESET_*`).
pub type nsa_preset = u32;
/// The paper's: cmp_block 32, cmp_stride 16, sel_block 64, sel_count 16 (1 initial and 2
/// local blocks forced), window 512, phi mean. The default.
pub const NSA_PRESET_PAPER: nsa_preset = 0;
/// flash-linear-attention's trained setting (`fla.ops.nsa`): cmp_block = cmp_stride =
/// sel_block = 64, phi mean.
pub const NSA_PRESET_FLA: nsa_preset = 1;

/// The engine configuration: model shape, NSA parameters, storage type and capacity.
/// Field meanings are those of docs/SPEC.md; `nsa_config_validate` lists every rule.
///
/// Versioning: set `struct_size = sizeof(nsa_config_t)` before passing one in or asking
/// for one. Fields are only ever appended; a library reading a larger struct accepts it
/// if the bytes it does not know are zero, and a library writing one zeroes them.
///
/// Start from `nsa_config_preset`, change the shape and capacity, then call
/// `nsa_config_fit_pages` (or set `num_pages`/`num_cmp_pages` to overcommit).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct nsa_config_t {
    /// `sizeof(nsa_config_t)` as the caller compiled it.
    pub struct_size: u32,
    /// Query heads `HQ` (1..=1024), a multiple of `num_kv_heads`.
    pub num_q_heads: u32,
    /// Key/value heads `HKV`; `HQ / HKV` query heads share each K/V head (GQA).
    pub num_kv_heads: u32,
    /// Query/key head dim `DK`: a multiple of 8 in 8..=512.
    pub head_dim_qk: u32,
    /// Value head dim `DV`: a multiple of 8 in 8..=512.
    pub head_dim_v: u32,
    /// Element type of pools and activations: an `NSA_DTYPE_*` value.
    pub dtype: nsa_dtype,
    /// Compression block length `l`.
    pub cmp_block: u32,
    /// Compression stride `d`; divides `cmp_block` and `sel_block`.
    pub cmp_stride: u32,
    /// Selection block length `l'`; `cmp_block <= sel_block`.
    pub sel_block: u32,
    /// Selected blocks per query `n` (forced ones included), 1..=1024.
    pub sel_count: u32,
    /// Forced initial blocks `n_init`.
    pub sel_init: u32,
    /// Forced local blocks `n_local`; `sel_init + sel_local <= sel_count`.
    pub sel_local: u32,
    /// Sliding window length `w`, in keys.
    pub window: u32,
    /// Softmax scale: finite and > 0, or 0 (the presets' value) for `1/sqrt(head_dim_qk)`,
    /// derived from the config's `head_dim_qk` when the cache and backends are created, so
    /// a preset stays right after you change the shape. Set it only for a model trained
    /// with another scale.
    pub scale: f32,
    /// Compression function: an `NSA_PHI_*` value.
    pub phi: nsa_phi,
    /// Hidden width of `NSA_PHI_MLP` (1..=65536); ignored otherwise.
    pub phi_hidden: u32,
    /// 1: `NSA_PHI_LINEAR`/`NSA_PHI_MLP` add a positional term `pe[j]` to each row; 0: not.
    pub phi_pe: u32,
    /// Tokens per page `P`, a multiple of `sel_block`.
    pub page_size: u32,
    /// Layers whose K/V the pools hold; layers are `0..num_layers`.
    pub num_layers: u32,
    /// Sequence slots; sequence ids are `0..max_seqs`.
    pub max_seqs: u32,
    /// Longest sequence, in tokens (at most 2^30 - 1).
    pub max_seq_len: u32,
    /// Raw K/V pages shared by all sequences (at most INT32_MAX).
    pub num_pages: u32,
    /// Compressed K/V pages (each holds `page_size` compressed tokens).
    pub num_cmp_pages: u32,
    /// Most sequences in one step, `<= max_seqs`.
    pub max_step_seqs: u32,
    /// Most new tokens in one step over all its sequences, `>= max_step_seqs`.
    pub max_step_tokens: u32,
    /// Threads of the CPU backend's layer runs, 1..=256. 1 (the presets' value): every
    /// run works on the calling thread only. `N > 1`: `nsa_cpu_backend_create` starts
    /// `N - 1` worker threads once (joined by `nsa_cpu_backend_destroy`), and each layer
    /// run spreads its work over them and the calling thread. Ignored by the CUDA backend.
    pub cpu_threads: u32,
}

// SAFETY: repr(C), starts with struct_size, 26 four-byte fields (no padding), all plain.
unsafe impl Versioned for nsa_config_t {
    const NAME: &'static str = "nsa_config_t";
}

impl From<&Config> for nsa_config_t {
    fn from(c: &Config) -> Self {
        // Destructured without `..`: a new Config field fails to compile here until the
        // C struct has it too.
        let Config {
            num_q_heads,
            num_kv_heads,
            head_dim_qk,
            head_dim_v,
            dtype,
            cmp_block,
            cmp_stride,
            sel_block,
            sel_count,
            sel_init,
            sel_local,
            window,
            scale,
            phi,
            phi_hidden,
            phi_pe,
            page_size,
            num_layers,
            max_seqs,
            max_seq_len,
            num_pages,
            num_cmp_pages,
            max_step_seqs,
            max_step_tokens,
            cpu_threads,
        } = *c;
        nsa_config_t {
            struct_size: std::mem::size_of::<nsa_config_t>() as u32,
            num_q_heads,
            num_kv_heads,
            head_dim_qk,
            head_dim_v,
            dtype: dtype as u32,
            cmp_block,
            cmp_stride,
            sel_block,
            sel_count,
            sel_init,
            sel_local,
            window,
            scale,
            phi: phi as u32,
            phi_hidden,
            phi_pe: phi_pe as u32,
            page_size,
            num_layers,
            max_seqs,
            max_seq_len,
            num_pages,
            num_cmp_pages,
            max_step_seqs,
            max_step_tokens,
            cpu_threads,
        }
    }
}

impl TryFrom<&nsa_config_t> for Config {
    type Error = NsaError;

    /// Checks the enumerated fields only; `Config::validate` checks the rest.
    fn try_from(c: &nsa_config_t) -> Result<Config, NsaError> {
        let dtype = match c.dtype {
            NSA_DTYPE_F32 => Dtype::F32,
            NSA_DTYPE_F16 => Dtype::F16,
            NSA_DTYPE_BF16 => Dtype::Bf16,
            v => return Err(NsaError::config("dtype", v, "must be NSA_DTYPE_F32 (0), NSA_DTYPE_F16 (1) or NSA_DTYPE_BF16 (2)")),
        };
        let phi = match c.phi {
            NSA_PHI_MEAN => Phi::Mean,
            NSA_PHI_WEIGHTED => Phi::Weighted,
            NSA_PHI_LINEAR => Phi::Linear,
            NSA_PHI_MLP => Phi::Mlp,
            v => return Err(NsaError::config("phi", v, "must be NSA_PHI_MEAN (0), _WEIGHTED (1), _LINEAR (2) or _MLP (3)")),
        };
        if c.phi_pe > 1 {
            return Err(NsaError::config("phi_pe", c.phi_pe, "must be 0 or 1"));
        }
        let nsa_config_t {
            struct_size: _,
            num_q_heads,
            num_kv_heads,
            head_dim_qk,
            head_dim_v,
            dtype: _,
            cmp_block,
            cmp_stride,
            sel_block,
            sel_count,
            sel_init,
            sel_local,
            window,
            scale,
            phi: _,
            phi_hidden,
            phi_pe,
            page_size,
            num_layers,
            max_seqs,
            max_seq_len,
            num_pages,
            num_cmp_pages,
            max_step_seqs,
            max_step_tokens,
            cpu_threads,
        } = *c;
        Ok(Config {
            num_q_heads,
            num_kv_heads,
            head_dim_qk,
            head_dim_v,
            dtype,
            cmp_block,
            cmp_stride,
            sel_block,
            sel_count,
            sel_init,
            sel_local,
            window,
            scale,
            phi,
            phi_hidden,
            phi_pe: phi_pe == 1,
            page_size,
            num_layers,
            max_seqs,
            max_seq_len,
            num_pages,
            num_cmp_pages,
            max_step_seqs,
            max_step_tokens,
            cpu_threads,
        })
    }
}

/// Reads and converts a caller's config (struct_size and enumerated fields checked; call
/// `Config::validate`, or a core function that does, for the rest).
///
/// # Safety
/// `p` is NULL or points to `p->struct_size` readable bytes.
pub(crate) unsafe fn read_config(p: *const nsa_config_t, arg: &'static str) -> FfiResult<Config> {
    Ok(Config::try_from(&read_struct(p, arg)?)?)
}

/// Writes a preset's parameters to `*out`: the preset's NSA parameters with the paper's
/// model shape (64 query heads, 4 KV heads, head dims 192/128, bf16), `scale = 0` (the
/// engine uses `1/sqrt(head_dim_qk)` of the final config), `cpu_threads = 1` (layer runs
/// use the calling thread only), and a small capacity (1 layer, 4 sequences of 8192
/// tokens, pools fitted). Change the shape and capacity, then call `nsa_config_fit_pages`.
///
/// `out->struct_size` must be set by the caller. Errors: `NSA_STATUS_NULL_POINTER`,
/// `NSA_STATUS_BAD_STRUCT_SIZE`, `NSA_STATUS_INVALID_ARGUMENT` (unknown preset).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_config_preset(preset: nsa_preset, out: *mut nsa_config_t) -> nsa_status {
    guard("nsa_config_preset", || {
        let out = out_struct(out, "out")?;
        let p = match preset {
            NSA_PRESET_PAPER => Preset::Paper,
            NSA_PRESET_FLA => Preset::Fla,
            v => return Err(NsaError::arg("preset", v, "must be NSA_PRESET_PAPER (0) or NSA_PRESET_FLA (1)").into()),
        };
        out.write(nsa_config_t::from(&Config::preset(p)));
        Ok(())
    })
}

/// Sizes both page pools so that every sequence slot can reach `max_seq_len` without
/// sharing pages: sets `cfg->num_pages` and `cfg->num_cmp_pages` from `max_seqs`,
/// `max_seq_len`, `page_size`, `cmp_block` and `cmp_stride`, leaving every other field as
/// it is. Leaves both unchanged when `page_size` or `cmp_stride` is 0 (validation then
/// reports them).
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG` (unknown `dtype`, `phi` or `phi_pe` value). Thread-safe
/// (for distinct `cfg`).
#[no_mangle]
pub unsafe extern "C" fn nsa_config_fit_pages(cfg: *mut nsa_config_t) -> nsa_status {
    guard("nsa_config_fit_pages", || {
        let mut c = read_config(cfg, "cfg")?;
        c.fit_pages();
        (*cfg).num_pages = c.num_pages;
        (*cfg).num_cmp_pages = c.num_cmp_pages;
        Ok(())
    })
}

/// Which side's phi weights `nsa_phi_weight_len` counts (one of `NSA_PHI_SIDE_*`).
pub type nsa_phi_side = u32;
/// The keys' phi (`phi_k` of a layer's io struct; row width `head_dim_qk`).
pub const NSA_PHI_SIDE_K: nsa_phi_side = 0;
/// The values' phi (`phi_v`; row width `head_dim_v`).
pub const NSA_PHI_SIDE_V: nsa_phi_side = 1;

/// Writes to `*out` the number of floats of one layer's phi weights for keys
/// (`side = NSA_PHI_SIDE_K`, row width `D = head_dim_qk`) or values
/// (`NSA_PHI_SIDE_V`, `D = head_dim_v`): what `phi_k_len` / `phi_v_len` of a layer's io
/// struct must be. 0 for `NSA_PHI_MEAN`; `HKV*cmp_block` for weighted;
/// `HKV*cmp_block*D*D` for linear; `HKV*(cmp_block*D*phi_hidden + phi_hidden +
/// phi_hidden*D + D)` for mlp; plus `HKV*cmp_block*D` when `phi_pe` is 1. The parts'
/// order and layouts are in docs/SPEC.md ("Weight layouts").
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG` (the config fails `nsa_config_validate`),
/// `NSA_STATUS_INVALID_ARGUMENT` (unknown `side`). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_phi_weight_len(cfg: *const nsa_config_t, side: nsa_phi_side, out: *mut usize) -> nsa_status {
    guard("nsa_phi_weight_len", || {
        let out = out_ptr(out, "out")?;
        let c = read_config(cfg, "cfg")?;
        c.validate()?;
        let d = match side {
            NSA_PHI_SIDE_K => c.head_dim_qk,
            NSA_PHI_SIDE_V => c.head_dim_v,
            v => return Err(NsaError::arg("side", v, "must be NSA_PHI_SIDE_K (0) or NSA_PHI_SIDE_V (1)").into()),
        };
        out.write(c.phi_weight_len(d));
        Ok(())
    })
}

/// Checks every field of `cfg` and every relation between fields. On failure the message
/// names the first field found wrong and its value, e.g.
/// `"nsa_config_validate: invalid config: num_q_heads = 63: must be a multiple of num_kv_heads = 4"`.
///
/// Errors: `NSA_STATUS_NULL_POINTER`, `NSA_STATUS_BAD_STRUCT_SIZE`,
/// `NSA_STATUS_INVALID_CONFIG`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn nsa_config_validate(cfg: *const nsa_config_t) -> nsa_status {
    guard("nsa_config_validate", || Ok(read_config(cfg, "cfg")?.validate()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_round_trips() {
        for p in [Preset::Paper, Preset::Fla] {
            let mut c = Config::preset(p);
            c.dtype = Dtype::F16;
            c.phi = Phi::Mlp;
            c.phi_pe = true;
            let back = Config::try_from(&nsa_config_t::from(&c)).unwrap();
            assert_eq!(back, c);
        }
        assert_eq!(std::mem::size_of::<nsa_config_t>(), 26 * 4);
    }
}
