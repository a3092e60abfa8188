//! Pure arithmetic: byte sizes and offsets of every region the engine uses, for the
//! host arena (cache metadata and the step plan) and for the K/V pools (host memory on the
//! CPU backend, device memory on CUDA). No allocation happens here; every size is
//! computed with checked arithmetic so an oversized config is an error, never a wrap.

use crate::config::Config;
use crate::error::{NsaError, Result};

/// Alignment the engine asks of caller buffers (malloc's guarantee on 64-bit hosts).
pub const ARENA_ALIGN: usize = 16;
/// Alignment of each region inside a buffer (a cache line).
const REGION_ALIGN: u64 = 64;

/// One region of a buffer: byte offset and element count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Region {
    pub offset: usize,
    pub len: usize,
    pub bytes: usize,
}

/// Per-sequence slot state in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct SeqSlot {
    /// 1 when the slot holds a live sequence.
    pub active: u32,
    /// Tokens appended so far (positions `0..len`).
    pub len: u32,
}

/// One sequence of the planned step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct PlanSeq {
    /// Sequence id.
    pub seq: u32,
    /// Length before the step; the step appends positions `old_len..new_len`.
    pub old_len: u32,
    /// Length after the step.
    pub new_len: u32,
    /// First row of this sequence's tokens in the step's q/k/v/out arrays.
    pub row: u32,
}

/// Which pool a copy-on-write copy belongs to.
pub const POOL_RAW: u32 = 0;
pub const POOL_CMP: u32 = 1;

/// A copy-on-write page copy every layer must perform before it appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct PageCopy {
    /// `POOL_RAW` or `POOL_CMP`.
    pub pool: u32,
    pub src: u32,
    pub dst: u32,
    /// Rows `0..rows` of the page are live and copied.
    pub rows: u32,
}

/// Header at the start of the metadata arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct ArenaHeader {
    pub magic: u64,
    /// Free raw pages (top of the raw free stack).
    pub raw_free: u32,
    /// Free compressed pages.
    pub cmp_free: u32,
    /// Live sequences.
    pub live_seqs: u32,
    /// Sequences, tokens and copies of the planned step; `step_valid == 0`: none planned.
    pub step_valid: u32,
    pub step_seqs: u32,
    pub step_tokens: u32,
    pub step_copies: u32,
    /// Number of the latest planned step (1 for the first): messages name the open step
    /// by it.
    pub step_id: u32,
}

pub const ARENA_MAGIC: u64 = 0x4e53_4143_4143_4845; // "NSACACHE"

/// Where everything lives, for one validated-shape config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    // --- metadata arena ---
    pub header: Region,
    pub raw_refcount: Region,
    pub raw_free: Region,
    pub cmp_refcount: Region,
    pub cmp_free: Region,
    pub seqs: Region,
    pub raw_tables: Region,
    pub cmp_tables: Region,
    pub plan_seqs: Region,
    pub plan_copies: Region,
    /// Which layers of the planned step have run: word 0 counts them, then one bit per
    /// layer. Last in the arena and only ever accessed atomically (layers of one cache may
    /// run concurrently on different threads through `&Cache`).
    pub step_layers: Region,
    /// Total bytes of the metadata arena.
    pub arena_bytes: usize,

    // --- K/V pools, in elements of the storage dtype ---
    /// Elements of one raw page for one layer, K side: `HKV * P * DK`.
    pub raw_page_k: usize,
    pub raw_page_v: usize,
    /// Offsets (elements) of the four pools inside one layer's slice.
    pub raw_k: usize,
    pub raw_v: usize,
    pub cmp_k: usize,
    pub cmp_v: usize,
    /// Elements per layer.
    pub layer_elems: usize,
    /// Total bytes of the K/V pools, all layers.
    pub pool_bytes: usize,
}

struct Builder {
    at: u64,
}

impl Builder {
    fn region(&mut self, what: &'static str, len: u64, elem: u64) -> Result<Region> {
        let bytes = len.checked_mul(elem).ok_or_else(|| too_big(what))?;
        let offset = self.at.div_ceil(REGION_ALIGN).checked_mul(REGION_ALIGN).ok_or_else(|| too_big(what))?;
        self.at = offset.checked_add(bytes).ok_or_else(|| too_big(what))?;
        if self.at > isize::MAX as u64 {
            return Err(too_big(what));
        }
        Ok(Region { offset: offset as usize, len: len as usize, bytes: bytes as usize })
    }
}

fn too_big(what: &'static str) -> NsaError {
    NsaError::config("capacity", what, "the buffer it needs overflows the address space; lower the capacity")
}

fn mul(what: &'static str, xs: &[u64]) -> Result<u64> {
    xs.iter().try_fold(1u64, |a, &x| a.checked_mul(x)).ok_or_else(|| too_big(what))
}

impl Layout {
    /// Computes the layout. Fails only on sizes that overflow; call `Config::validate`
    /// for everything else.
    pub fn new(c: &Config) -> Result<Layout> {
        use std::mem::size_of;
        let mut b = Builder { at: 0 };
        let np = c.num_pages as u64;
        let ncp = c.num_cmp_pages as u64;
        let header = b.region("header", 1, size_of::<ArenaHeader>() as u64)?;
        let raw_refcount = b.region("raw_refcount", np, 4)?;
        let raw_free = b.region("raw_free", np, 4)?;
        let cmp_refcount = b.region("cmp_refcount", ncp, 4)?;
        let cmp_free = b.region("cmp_free", ncp, 4)?;
        let seqs = b.region("seqs", c.max_seqs as u64, size_of::<SeqSlot>() as u64)?;
        let pps = c.max_seq_len.div_ceil(c.page_size.max(1)) as u64;
        let cpps = c.num_cmp_tokens(c.max_seq_len).div_ceil(c.page_size.max(1)) as u64;
        let raw_tables = b.region("raw_tables", mul("raw_tables", &[c.max_seqs as u64, pps])?, 4)?;
        let cmp_tables = b.region("cmp_tables", mul("cmp_tables", &[c.max_seqs as u64, cpps])?, 4)?;
        let plan_seqs = b.region("plan_seqs", c.max_step_seqs as u64, size_of::<PlanSeq>() as u64)?;
        let plan_copies = b.region("plan_copies", 2 * c.max_step_seqs as u64, size_of::<PageCopy>() as u64)?;
        let step_layers = b.region("step_layers", 1 + (c.num_layers as u64).div_ceil(32), 4)?;
        let arena_bytes = b.at.div_ceil(REGION_ALIGN) * REGION_ALIGN;

        let (hkv, p, dk, dv) = (c.num_kv_heads as u64, c.page_size as u64, c.head_dim_qk as u64, c.head_dim_v as u64);
        let raw_page_k = mul("pool", &[hkv, p, dk])?;
        let raw_page_v = mul("pool", &[hkv, p, dv])?;
        let raw_k = 0u64;
        let raw_v = mul("pool", &[np, raw_page_k])?;
        let cmp_k = raw_v.checked_add(mul("pool", &[np, raw_page_v])?).ok_or_else(|| too_big("pool"))?;
        let cmp_v = cmp_k.checked_add(mul("pool", &[ncp, raw_page_k])?).ok_or_else(|| too_big("pool"))?;
        let layer_elems = cmp_v.checked_add(mul("pool", &[ncp, raw_page_v])?).ok_or_else(|| too_big("pool"))?;
        let pool_bytes = mul("pool", &[layer_elems, c.num_layers as u64, c.dtype.size() as u64])?;
        if pool_bytes > isize::MAX as u64 {
            return Err(too_big("pool"));
        }
        Ok(Layout {
            header,
            raw_refcount,
            raw_free,
            cmp_refcount,
            cmp_free,
            seqs,
            raw_tables,
            cmp_tables,
            plan_seqs,
            plan_copies,
            step_layers,
            arena_bytes: arena_bytes as usize,
            raw_page_k: raw_page_k as usize,
            raw_page_v: raw_page_v as usize,
            raw_k: raw_k as usize,
            raw_v: raw_v as usize,
            cmp_k: cmp_k as usize,
            cmp_v: cmp_v as usize,
            layer_elems: layer_elems as usize,
            pool_bytes: pool_bytes as usize,
        })
    }

    /// Every arena region, in address order (for the disjointness invariant).
    pub fn arena_regions(&self) -> [Region; 11] {
        [
            self.header,
            self.raw_refcount,
            self.raw_free,
            self.cmp_refcount,
            self.cmp_free,
            self.seqs,
            self.raw_tables,
            self.cmp_tables,
            self.plan_seqs,
            self.plan_copies,
            self.step_layers,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Preset};

    #[test]
    fn regions_are_disjoint_aligned_and_inside() {
        for p in [Preset::Paper, Preset::Fla] {
            let c = Config::preset(p);
            let l = Layout::new(&c).unwrap();
            let rs = l.arena_regions();
            for w in rs.windows(2) {
                assert!(w[0].offset + w[0].bytes <= w[1].offset);
            }
            for r in rs {
                assert_eq!(r.offset % 64, 0);
                assert!(r.offset + r.bytes <= l.arena_bytes);
            }
            assert_eq!(l.raw_tables.len, (c.max_seqs * c.pages_per_seq()) as usize);
            let per_layer = (c.num_pages as usize) * l.raw_page_k
                + (c.num_pages as usize) * l.raw_page_v
                + (c.num_cmp_pages as usize) * (l.raw_page_k + l.raw_page_v);
            assert_eq!(l.layer_elems, per_layer);
            assert_eq!(l.pool_bytes, per_layer * c.num_layers as usize * 2);
        }
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let mut c = Config::preset(Preset::Paper);
        c.num_pages = i32::MAX as u32;
        c.num_layers = u32::MAX;
        let e = Layout::new(&c).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
    }
}
