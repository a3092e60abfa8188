//! Storage element types (f32, f16, bf16 through `half`) and their conversion to the f32
//! the kernels accumulate in.

use crate::config::Dtype;
use half::{bf16, f16};

/// A storage element. Kernels load elements as f32 and store f32 results rounded to
/// nearest-even.
pub trait Elem: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
    const DTYPE: Dtype;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// The slice itself when the storage type is f32 (no conversion needed).
    #[inline(always)]
    fn as_f32_slice(_s: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for f32 {
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn as_f32_slice(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Elem for f16 {
    const DTYPE: Dtype = Dtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Elem for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Rounds an f32 through a storage type (what storing then loading does).
pub fn round_through(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::F32 => x,
        Dtype::F16 => f16::from_f32(x).to_f32(),
        Dtype::Bf16 => bf16::from_f32(x).to_f32(),
    }
}
