//! The non-finite policy's cases and check, shared by the CPU test (tests/non_finite.rs)
//! and the GPU one (tests/gpu_lifecycle.rs): a NaN or infinity in q, k, v or the gates
//! must reach exactly the outputs the brute-force reference says it reaches, as NaN or
//! infinity, never as zeros; every other output must still match the reference.
#![allow(dead_code)]

use super::{dims, Rng, SeqData};
use nsa::elem::Elem;
use nsa::reference::{prefill, RefInputs};
use nsa::{Config, Dtype, Preset};

/// Which input gets the bad value.
#[derive(Debug, Clone, Copy)]
pub enum Spot {
    Q,
    K,
    V,
    Gate,
}

/// The cases: a NaN or infinite query before the first compressed token (was an
/// output of exactly 0) and after it; one NaN key (zeroed later tokens' window output);
/// NaN and infinite values and gates.
pub const CASES: [(Spot, usize, f32); 11] = [
    (Spot::Q, 5, f32::NAN),
    (Spot::Q, 5, f32::INFINITY),
    (Spot::Q, 80, f32::NAN),
    (Spot::Q, 80, f32::NEG_INFINITY),
    (Spot::K, 10, f32::NAN),
    (Spot::K, 70, f32::NAN),
    (Spot::K, 70, f32::INFINITY),
    (Spot::V, 3, f32::NAN),
    (Spot::V, 90, f32::INFINITY),
    (Spot::Gate, 40, f32::NAN),
    (Spot::Gate, 2, f32::INFINITY),
];

/// The cases on the tensor-core shapes (the GPU's tensor-core kernels, and the CPU engine at
/// the same shapes): a NaN or infinite value at positions 70 and 90, a NaN key at 70.
pub const WIDE_CASES: [(Spot, usize, f32); 3] = [(Spot::V, 70, f32::NAN), (Spot::V, 90, f32::INFINITY), (Spot::K, 70, f32::NAN)];

/// KV heads of the tensor-core shapes' configs: G = 16, 8 and 4 over 16 query heads.
pub const WIDE_HKV: [u32; 3] = [1, 2, 4];

/// A tensor-core shape: paper preset, 16 query heads over `hkv`, head dims 128, bf16.
pub fn wide_cfg(hkv: u32) -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(16, hkv, 128, 128).with_capacity(1, 256);
    c.dtype = Dtype::Bf16;
    c.cpu_threads = 2;
    c
}

/// Tokens of every case's sequence.
pub const LEN: usize = 120;

/// The tensor-core shapes' schedules: one step; a prefill chunk onto a cache that holds 40
/// tokens (its tiles' keys then include cached ones, its compressed tokens cached values);
/// token by token.
pub fn wide_schedules() -> [Vec<usize>; 3] {
    [vec![LEN], vec![40, LEN - 40], vec![1; LEN]]
}

/// Prefill in one step, in uneven chunks, and token by token.
pub fn schedules() -> [Vec<usize>; 3] {
    [vec![LEN], vec![37, 1, 1, 50, 31], vec![1; LEN]]
}

pub fn cfg(dtype: Dtype) -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(4, 2, 16, 8).with_capacity(1, 256);
    c.dtype = dtype;
    c.window = 24;
    c.sel_count = 4;
    c.cpu_threads = 2;
    c
}

/// Random inputs (rounded through `T`) with `bad` at `spot`, position `pos`.
pub fn data<T: Elem>(c: &Config, spot: Spot, pos: usize, bad: f32) -> SeqData {
    let (hq, hkv, dk, dv) = dims(c);
    let mut d = SeqData::random::<T>(c, LEN, &mut Rng::new(5 + pos as u64));
    match spot {
        Spot::Q => d.q[(pos * hq + 1) * dk + 3] = bad,
        Spot::K => d.k[(pos * hkv + 1) * dk + 2] = bad,
        Spot::V => d.v[(pos * hkv) * dv + 5] = bad,
        Spot::Gate => d.gates[(pos * hq + 2) * 3 + 1] = bad,
    }
    d
}

/// Compares an engine's outputs of the whole sequence with the reference: the same
/// elements NaN, the same infinite (with the same sign), the rest within `tol` relative.
/// Returns (non-finite, finite) element counts; fails when nothing is non-finite.
pub fn check(c: &Config, d: &SeqData, got: &[f32], tol: f32, what: &str) -> (usize, usize) {
    let (hq, _, _, dv) = dims(c);
    let inp = RefInputs { cfg: c, q: &d.q, k: &d.k, v: &d.v, gates: &d.gates, phi_k: &[], phi_v: &[], selection: None };
    let want = prefill(&inp).out;
    assert_eq!(got.len(), want.len(), "{what}");
    let (mut nonfinite, mut finite) = (0, 0);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let (t, h, e) = (i / (hq * dv), i / dv % hq, i % dv);
        let at = format!("{what}: token {t} head {h} elem {e}: engine {g}, reference {w}");
        assert_eq!(g.is_nan(), w.is_nan(), "{at}");
        assert_eq!(g.is_finite(), w.is_finite(), "{at}");
        if w.is_finite() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{at}");
            finite += 1;
        } else {
            if w.is_infinite() {
                assert_eq!(g, w, "{at}");
            }
            nonfinite += 1;
        }
    }
    assert!(nonfinite > 0, "{what}: the bad value reached no output (the test checks nothing)");
    assert!(finite > 0, "{what}: every output is non-finite");
    (nonfinite, finite)
}
