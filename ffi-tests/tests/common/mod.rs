//! Test inputs shared by the ffi tests: a seeded generator and one step's layer arrays.
#![allow(dead_code)]

use nsa::elem::Elem;
use nsa::{Config, Phi};

pub use nsa_ffi_tests::Rng;

/// One layer's arrays for a step of `tokens` rows, in the storage type `T`.
pub struct LayerData<T> {
    pub tokens: usize,
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub gates: Vec<f32>,
}

impl<T: Elem> LayerData<T> {
    pub fn random(cfg: &Config, tokens: usize, rng: &mut Rng) -> Self {
        let (hq, hkv, dk, dv) = dims(cfg);
        let cast = |x: Vec<f32>| x.into_iter().map(T::from_f32).collect::<Vec<T>>();
        LayerData {
            tokens,
            q: cast(rng.vec(tokens * hq * dk, 2.0)),
            k: cast(rng.vec(tokens * hkv * dk, 1.0)),
            v: cast(rng.vec(tokens * hkv * dv, 1.0)),
            gates: (0..tokens * hq * 3).map(|_| 0.5 + 0.45 * rng.unit()).collect(),
        }
    }
}

pub fn dims(cfg: &Config) -> (usize, usize, usize, usize) {
    (cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize)
}

/// Random phi weights of one layer (K side, V side).
pub fn phi_weights(cfg: &Config, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let scale = |d: u32| match cfg.phi {
        Phi::Mean | Phi::Weighted => 1.0 / cfg.cmp_block as f32,
        Phi::Linear | Phi::Mlp => 1.0 / ((cfg.cmp_block * d) as f32).sqrt(),
    };
    (rng.vec(cfg.phi_weight_len(cfg.head_dim_qk), scale(cfg.head_dim_qk)), rng.vec(cfg.phi_weight_len(cfg.head_dim_v), scale(cfg.head_dim_v)))
}

/// The bytes of a slice of plain values.
pub fn bytes<T: Copy>(s: &[T]) -> &[u8] {
    // SAFETY: plain data viewed as bytes.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}
