//! What the CPU and CUDA benchmarks share: model shapes, the bench config, random bf16
//! inputs, the step entries of a batch, and filling a cache to a context length.

use half::bf16;
use nsa::{Cache, Config, Dtype, Preset, StepSeq};

use crate::rng::Rng;

/// Model shape: HQ, HKV, DK, DV.
pub type Shape = (usize, usize, usize, usize);

/// The preset at `shape`, bf16 storage (capacity left to the caller).
pub fn config(preset: Preset, (hq, hkv, dk, dv): Shape) -> Config {
    let mut c = Config::preset(preset).with_shape(hq as u32, hkv as u32, dk as u32, dv as u32);
    c.dtype = Dtype::Bf16;
    c
}

/// `n` bf16 values uniform in [-scale, scale).
pub fn bf16s(rng: &mut Rng, n: usize, scale: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.unit() * scale)).collect()
}

/// A step of `tokens` new tokens for each of the sequences `0..batch`.
pub fn each_seq(batch: u32, tokens: u32) -> Vec<StepSeq> {
    (0..batch).map(|s| StepSeq { seq: s, tokens }).collect()
}

/// Fills sequences `0..batch` to `ctx` tokens, `chunk` tokens of each per step: plans
/// each step, then `append(cache, tokens of each sequence)` runs its append-only layer.
pub fn fill(cache: &mut Cache, batch: u32, ctx: u32, chunk: u32, mut append: impl FnMut(&Cache, u32) -> nsa::Result<()>) -> nsa::Result<()> {
    let mut done = 0;
    while done < ctx {
        let n = chunk.min(ctx - done);
        cache.plan_step(&each_seq(batch, n))?;
        append(cache, n)?;
        done += n;
    }
    Ok(())
}
