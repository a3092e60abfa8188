//! The compression function phi (docs/SPEC.md, compressed branch): one compressed K or V row from
//! the `l` raw rows of its block, with the caller's weights.

use super::kernels::Isa;
use crate::config::{Config, Phi};

/// The weights of one KV head for one side (K or V), cut out of the layer's weight array.
#[derive(Clone, Copy)]
pub(crate) enum PhiHead<'w> {
    Mean,
    Weighted(&'w [f32]),
    Linear { w: &'w [f32], pe: Option<&'w [f32]> },
    Mlp { w1: &'w [f32], b1: &'w [f32], w2: &'w [f32], b2: &'w [f32], pe: Option<&'w [f32]> },
}

impl<'w> PhiHead<'w> {
    /// Slices head `h`'s weights for row dim `d` out of `all` (already length-checked
    /// against `Config::phi_weight_len(d)`).
    pub fn cut(cfg: &Config, all: &'w [f32], h: usize, d: usize) -> Self {
        let (hkv, l, hid) = (cfg.num_kv_heads as usize, cfg.cmp_block as usize, cfg.phi_hidden as usize);
        let pe_at = |base: usize| cfg.phi_pe.then(|| &all[base + h * l * d..][..l * d]);
        match cfg.phi {
            Phi::Mean => PhiHead::Mean,
            Phi::Weighted => PhiHead::Weighted(&all[h * l..][..l]),
            Phi::Linear => PhiHead::Linear { w: &all[h * l * d * d..][..l * d * d], pe: pe_at(hkv * l * d * d) },
            Phi::Mlp => {
                let (w1n, w2n) = (l * d * hid, hid * d);
                let b1_at = hkv * w1n;
                let w2_at = b1_at + hkv * hid;
                let b2_at = w2_at + hkv * w2n;
                PhiHead::Mlp {
                    w1: &all[h * w1n..][..w1n],
                    b1: &all[b1_at + h * hid..][..hid],
                    w2: &all[w2_at + h * w2n..][..w2n],
                    b2: &all[b2_at + h * d..][..d],
                    pe: pe_at(b2_at + hkv * d),
                }
            }
        }
    }

    /// `out = phi(x)` for `x: [l, d]` (f32 rows). `scratch` holds at least `l*d + hid`.
    pub fn apply(&self, x: &[f32], d: usize, out: &mut [f32], scratch: &mut [f32]) {
        let l = x.len() / d;
        let isa = Isa::get();
        out.fill(0.0);
        // Adds pe to the concatenated rows when the variant has it.
        let with_pe = |pe: Option<&[f32]>, scratch: &'_ mut [f32]| -> usize {
            let n = l * d;
            match pe {
                Some(pe) => {
                    for ((s, a), b) in scratch[..n].iter_mut().zip(x).zip(pe) {
                        *s = a + b;
                    }
                }
                None => scratch[..n].copy_from_slice(x),
            }
            n
        };
        match *self {
            PhiHead::Mean => {
                for j in 0..l {
                    isa.axpy(out, 1.0, &x[j * d..][..d]);
                }
                isa.scale(out, 1.0 / l as f32);
            }
            PhiHead::Weighted(w) => {
                for j in 0..l {
                    isa.axpy(out, w[j], &x[j * d..][..d]);
                }
            }
            PhiHead::Linear { w, pe } => {
                let n = with_pe(pe, scratch);
                for r in 0..n {
                    isa.axpy(out, scratch[r], &w[r * d..][..d]);
                }
            }
            PhiHead::Mlp { w1, b1, w2, b2, pe } => {
                let hid = b1.len();
                let n = with_pe(pe, scratch);
                let (xin, hidden) = scratch.split_at_mut(n);
                let hidden = &mut hidden[..hid];
                hidden.copy_from_slice(b1);
                for r in 0..n {
                    isa.axpy(hidden, xin[r], &w1[r * hid..][..hid]);
                }
                out.copy_from_slice(b2);
                for (u, hu) in hidden.iter().enumerate() {
                    if *hu > 0.0 {
                        isa.axpy(out, *hu, &w2[u * d..][..d]);
                    }
                }
            }
        }
    }
}
