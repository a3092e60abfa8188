//! Tensor maps of the K/V pools for the copy engine (sm_90): each pool of each layer seen
//! as a 3-D tensor `[page * HKV + kv_head][row in page][dim]` of 16-bit elements, read in
//! boxes of 16 rows x 64 columns (128 bytes) with the 128-byte swizzle, which spreads a
//! box's rows over the shared-memory banks so ldmatrix reads them without conflicts.
//! A tile of the attention kernels (16 consecutive keys of one page) is `DK / 64` such
//! boxes of K and `DV / 64` of V: a few large requests instead of one per row.
//!
//! The maps are encoded once at backend creation and copied into the workspace
//! (`DevLayout::tmaps`), 4 per layer in the order raw K, raw V, compressed K, compressed V.

use cudarc::driver::sys;

use super::driver::check;
use crate::config::Config;
use crate::error::Result;
use crate::layout::Layout;

pub(crate) use super::consts::{MAPS_PER_LAYER, TMAP_BYTES};
/// Box: 64 columns (128 bytes, the swizzle span) x 16 rows (one key tile).
const BOX_COLS: u32 = 64;
const BOX_ROWS: u32 = super::consts::MMA_KEYS;

/// Whether the tensor-map tiles fit `cfg`: 16-bit storage, head dims multiples of 64 (whole
/// boxes), pages and selection blocks multiples of 16 rows (a tile never crosses a page).
pub(crate) fn supported(cfg: &Config) -> bool {
    cfg.dtype.size() == 2
        && cfg.head_dim_qk % BOX_COLS == 0
        && cfg.head_dim_v % BOX_COLS == 0
        && cfg.page_size % BOX_ROWS == 0
        && cfg.sel_block % BOX_ROWS == 0
}

/// One pool's map: `base` is the device address of the pool, `pages` its page count,
/// `dim` its row width (elements).
fn encode(base: u64, pages: u64, hkv: u64, page: u64, dim: u64) -> Result<[u8; TMAP_BYTES]> {
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let dims: [u64; 3] = [dim, page, pages * hkv];
    let strides: [u64; 2] = [dim * 2, page * dim * 2]; // bytes, dims 1 and 2
    let boxes: [u32; 3] = [BOX_COLS, BOX_ROWS, 1];
    let elem: [u32; 3] = [1, 1, 1];
    // SAFETY: every array has the rank's length; the address is device memory of the
    // current context (the caller pushed it) that outlives the backend's launches.
    check(
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
                3,
                base as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        },
        "cuTensorMapEncodeTiled",
    )?;
    let mut out = [0u8; TMAP_BYTES];
    for (i, w) in map.opaque.iter().enumerate() {
        out[8 * i..8 * i + 8].copy_from_slice(&w.to_ne_bytes());
    }
    Ok(out)
}

/// Every layer's 4 maps, concatenated (`num_layers * 4 * TMAP_BYTES` bytes), for pools at
/// `pools` (device address of layer 0's pools, the CPU backend's layout).
pub(crate) fn encode_all(cfg: &Config, lay: &Layout, pools: u64) -> Result<Vec<u8>> {
    let es = 2u64;
    let (hkv, page) = (cfg.num_kv_heads as u64, cfg.page_size as u64);
    let (dk, dv) = (cfg.head_dim_qk as u64, cfg.head_dim_v as u64);
    let (raw_pages, cmp_pages) = (cfg.num_pages as u64, cfg.num_cmp_pages as u64);
    let mut all = Vec::with_capacity(cfg.num_layers as usize * MAPS_PER_LAYER * TMAP_BYTES);
    for layer in 0..cfg.num_layers as u64 {
        let lb = pools + layer * lay.layer_elems as u64 * es;
        let at = |elems: usize| lb + elems as u64 * es;
        for (base, pages, dim) in [
            (at(lay.raw_k), raw_pages, dk),
            (at(lay.raw_v), raw_pages, dv),
            (at(lay.cmp_k), cmp_pages, dk),
            (at(lay.cmp_v), cmp_pages, dv),
        ] {
            // A pool with no pages (no compressed tokens at this capacity) gets no map;
            // its kernels are never launched.
            if pages == 0 {
                all.extend_from_slice(&[0u8; TMAP_BYTES]);
            } else {
                all.extend_from_slice(&encode(base, pages, hkv, page, dim)?);
            }
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dtype, Preset};

    fn cfg(dk: u32, dv: u32, dtype: Dtype) -> Config {
        let mut c = Config::preset(Preset::Paper).with_shape(64, 4, dk, dv).with_capacity(2, 4096);
        c.dtype = dtype;
        c
    }

    #[test]
    fn maps_need_16_bit_whole_boxes_and_16_row_pages() {
        assert!(supported(&cfg(128, 128, Dtype::Bf16)));
        assert!(supported(&cfg(192, 128, Dtype::F16)));
        assert!(!supported(&cfg(128, 128, Dtype::F32)), "f32 rows are not 16-bit boxes");
        assert!(!supported(&cfg(40, 24, Dtype::Bf16)), "DK not a multiple of 64 columns");
        assert!(!supported(&cfg(128, 96, Dtype::Bf16)), "DV not a multiple of 64 columns");
        let mut c = cfg(128, 128, Dtype::Bf16);
        (c.sel_block, c.page_size) = (48, 48);
        assert!(supported(&c), "48-row blocks and pages are whole 16-row tiles");
        (c.cmp_stride, c.sel_block, c.page_size) = (8, 40, 40);
        assert!(!supported(&c), "a 16-row tile would cross a 40-row page");
    }
}
