//! One sequence's cache state as a self-describing byte buffer: export it, drop the
//! sequence (or the whole process), and import it later into any free slot of a cache with
//! the same config, on any backend. What llama.cpp-style runtimes do with
//! `llama_state_seq_get_data` / `set_data` to persist prompts and move sequences.
//!
//! The cache knows which pages a sequence holds; the backend owns the pages' bytes. A
//! backend hands its pools in as [`PoolBytes`] (host memory on the CPU, device memory on
//! CUDA), so the format and every check live here once.
//!
//! Format (version 1), little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `"NSASEQST"` |
//! | 8..12 | format version (1) |
//! | 12..16 | header bytes (128) |
//! | 16..88 | the config fingerprint: 18 `u32` fields, [`FINGERPRINT`] order |
//! | 88..92 | `len`: tokens of the sequence |
//! | 92..96 | `ncmp`: its compressed tokens (`num_cmp_tokens(len)`) |
//! | 96..104 | payload bytes (`u64`) |
//! | 104..128 | zero |
//!
//! The payload, for each layer in order: the sequence's raw pages of the K pool, then of
//! the V pool, then its compressed pages of the K pool, then of the V pool. Each page is
//! its whole block `[HKV][page_size][D]` in the config's dtype (the pools' own layout),
//! with the rows past the sequence's end zeroed (they hold nothing of it).

use super::pool::PoolMut;
use super::Cache;
use crate::config::Config;
use crate::error::{NsaError, Result};
use crate::layout::{Layout, SeqSlot};

/// The first bytes of every state buffer.
pub const STATE_MAGIC: [u8; 8] = *b"NSASEQST";
/// The format version this library writes and reads.
pub const STATE_VERSION: u32 = 1;
/// Bytes of the header before the payload.
pub const STATE_HEADER_BYTES: usize = 128;

const FP_AT: usize = 16;
const LEN_AT: usize = FP_AT + 4 * FINGERPRINT.len();
const NCMP_AT: usize = LEN_AT + 4;
const PAYLOAD_AT: usize = NCMP_AT + 4;

/// The config fields a state must agree on to be imported: everything that shapes the
/// stored rows or what they mean. Capacity (slots, lengths, pool sizes, step limits) and
/// `cpu_threads` may differ. `scale` is compared as the value in effect.
#[allow(clippy::type_complexity)]
pub const FINGERPRINT: [(&str, fn(&Config) -> u32); 18] = [
    ("num_q_heads", |c| c.num_q_heads),
    ("num_kv_heads", |c| c.num_kv_heads),
    ("head_dim_qk", |c| c.head_dim_qk),
    ("head_dim_v", |c| c.head_dim_v),
    ("dtype", |c| c.dtype as u32),
    ("cmp_block", |c| c.cmp_block),
    ("cmp_stride", |c| c.cmp_stride),
    ("sel_block", |c| c.sel_block),
    ("sel_count", |c| c.sel_count),
    ("sel_init", |c| c.sel_init),
    ("sel_local", |c| c.sel_local),
    ("window", |c| c.window),
    ("scale (bits of the scale in effect)", |c| c.softmax_scale().to_bits()),
    ("phi", |c| c.phi as u32),
    ("phi_hidden", |c| c.phi_hidden),
    ("phi_pe", |c| c.phi_pe as u32),
    ("page_size", |c| c.page_size),
    ("num_layers", |c| c.num_layers),
];

/// A backend's K/V pools (every layer, [`Layout`]'s byte offsets) as bytes.
pub trait PoolBytes {
    /// Copies pool bytes `off..off + dst.len()` into `dst`.
    fn read(&self, off: usize, dst: &mut [u8]) -> Result<()>;
    /// Copies `src` into pool bytes `off..off + src.len()`.
    fn write(&mut self, off: usize, src: &[u8]) -> Result<()>;
}

/// One page block of the payload: where it is in the pools, its rows in use.
struct Block {
    pool_off: usize,
    bytes: usize,
    rows_used: usize,
    row_bytes: usize,
}

/// The payload's blocks in order, for a sequence of `len` tokens whose raw and compressed
/// pages are `raw` and `cmp` (or, on import, the pages it will get).
fn blocks<'x>(cfg: &'x Config, lay: &'x Layout, len: u32, raw: &'x [i32], cmp: &'x [i32]) -> impl Iterator<Item = Block> + 'x {
    let es = cfg.dtype.size();
    let p = cfg.page_size as usize;
    let ncmp = cfg.num_cmp_tokens(len) as usize;
    let (dk, dv) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
    let sides = [(lay.raw_k, lay.raw_page_k, dk, raw, len as usize), (lay.raw_v, lay.raw_page_v, dv, raw, len as usize), (lay.cmp_k, lay.raw_page_k, dk, cmp, ncmp), (lay.cmp_v, lay.raw_page_v, dv, cmp, ncmp)];
    (0..cfg.num_layers as usize).flat_map(move |layer| {
        sides.into_iter().flat_map(move |(pool, page_elems, d, pages, rows)| {
            pages.iter().enumerate().map(move |(i, &pg)| Block {
                pool_off: (layer * lay.layer_elems + pool + pg as usize * page_elems) * es,
                bytes: page_elems * es,
                rows_used: (rows - i * p).min(p),
                row_bytes: d * es,
            })
        })
    })
}

fn payload_bytes(cfg: &Config, lay: &Layout, len: u32) -> usize {
    let p = cfg.page_size;
    let (nraw, ncmp) = (len.div_ceil(p) as usize, cfg.num_cmp_tokens(len).div_ceil(p) as usize);
    (nraw + ncmp) * (lay.raw_page_k + lay.raw_page_v) * cfg.dtype.size() * cfg.num_layers as usize
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The next `n` pages `PoolMut::take` would hand out, in order (top of the free stack first).
fn next_free(stack: &[u32], free: u32, n: usize) -> impl Iterator<Item = i32> + '_ {
    stack[..free as usize].iter().rev().take(n).map(|&p| p as i32)
}

impl Cache<'_> {
    /// Refuses a backend made with another config than this cache (`arg` = "cache").
    pub(crate) fn check_backend_config(&self, backend: &Config) -> Result<()> {
        if self.config() != backend {
            return Err(NsaError::arg("cache", "config", "the cache was made with a different config than the backend"));
        }
        Ok(())
    }

    /// The live sequence ids, ascending.
    pub fn sequences(&self) -> impl Iterator<Item = u32> + '_ {
        self.view().seqs.iter().enumerate().filter(|(_, s)| s.active != 0).map(|(i, _)| i as u32)
    }

    /// Bytes [`Cache::export_sequence`] writes for the live sequence `seq` (header and payload).
    pub fn sequence_state_bytes(&self, seq: u32) -> Result<usize> {
        let len = self.len(seq)?;
        Ok(STATE_HEADER_BYTES + payload_bytes(self.config(), self.layout(), len))
    }

    /// Writes the live sequence `seq`'s state (length, K/V rows and compressed tokens of
    /// every layer, read from `pools`) to the start of `out`; returns the bytes written,
    /// [`Cache::sequence_state_bytes`]. Reads only: the cache and pools are unchanged.
    /// Refused with `StepOpen` while a planned step has layers not yet run (their rows are
    /// counted but not written).
    ///
    /// Backends wrap this (`CpuBackend::export_sequence`, CUDA's likewise).
    pub fn export_sequence(&self, seq: u32, pools: &dyn PoolBytes, out: &mut [u8]) -> Result<usize> {
        self.refuse_open_step()?;
        let need = self.sequence_state_bytes(seq)?;
        if out.len() < need {
            return Err(NsaError::BufferTooSmall { what: "state buffer", got: out.len(), need });
        }
        let (cfg, lay) = (self.config(), self.layout());
        let len = self.len(seq)?;
        let (head, mut rest) = out[..need].split_at_mut(STATE_HEADER_BYTES);
        head.fill(0);
        head[..8].copy_from_slice(&STATE_MAGIC);
        head[8..12].copy_from_slice(&STATE_VERSION.to_le_bytes());
        head[12..16].copy_from_slice(&(STATE_HEADER_BYTES as u32).to_le_bytes());
        for (i, (_, f)) in FINGERPRINT.iter().enumerate() {
            head[FP_AT + 4 * i..][..4].copy_from_slice(&f(cfg).to_le_bytes());
        }
        head[LEN_AT..][..4].copy_from_slice(&len.to_le_bytes());
        head[NCMP_AT..][..4].copy_from_slice(&cfg.num_cmp_tokens(len).to_le_bytes());
        head[PAYLOAD_AT..][..8].copy_from_slice(&((need - STATE_HEADER_BYTES) as u64).to_le_bytes());
        for b in blocks(cfg, lay, len, self.raw_pages(seq)?, self.cmp_pages(seq)?) {
            let (dst, tail) = rest.split_at_mut(b.bytes);
            pools.read(b.pool_off, dst)?;
            // Rows past the end belong to no one (or, on a shared page, to a longer fork).
            let p = cfg.page_size as usize;
            for head_rows in dst.chunks_exact_mut(p * b.row_bytes) {
                head_rows[b.rows_used * b.row_bytes..].fill(0);
            }
            rest = tail;
        }
        debug_assert!(rest.is_empty());
        Ok(need)
    }

    /// Restores a state written by [`Cache::export_sequence`] (by this or another cache
    /// with the same [`FINGERPRINT`] fields, on any backend) into the free slot `seq`:
    /// takes fresh pages, writes the rows into `pools`, then makes `seq` live with the
    /// exported length. Ends a completed step's plan, like [`Cache::add_sequence`]; refused
    /// with `StepOpen` while a planned step has layers not yet run.
    ///
    /// Fails, changing nothing, on: a buffer that is not a version-1 state (magic, version,
    /// header size, lengths, payload size, each named); a fingerprint field that differs
    /// from this cache's config (named, with both values); a length past `max_seq_len`;
    /// `seq` out of range or live; too few free pages; a failing pool write (the pages
    /// written were free and stay free).
    pub fn import_sequence(&mut self, seq: u32, pools: &mut dyn PoolBytes, buf: &[u8]) -> Result<()> {
        self.refuse_open_step()?;
        let cfg = *self.config();
        let lay = *self.layout();
        let len = check_header(&cfg, &lay, buf)?;
        self.check_id("seq", seq)?;
        if self.contains(seq) {
            return Err(NsaError::SequenceExists { seq });
        }
        let p = cfg.page_size;
        let (nraw, ncmp) = (len.div_ceil(p) as usize, cfg.num_cmp_tokens(len).div_ceil(p) as usize);
        let v = self.view();
        if nraw > v.hdr.raw_free as usize {
            return Err(NsaError::OutOfPages { pool: "raw", need: nraw as u32, free: v.hdr.raw_free });
        }
        if ncmp > v.hdr.cmp_free as usize {
            return Err(NsaError::OutOfPages { pool: "compressed", need: ncmp as u32, free: v.hdr.cmp_free });
        }
        // Write into the pages the commit below will take: they are free, so nobody reads
        // them, and a failed write leaves the cache as it was.
        let raw: Vec<i32> = next_free(v.raw_free, v.hdr.raw_free, nraw).collect();
        let cmp: Vec<i32> = next_free(v.cmp_free, v.hdr.cmp_free, ncmp).collect();
        let mut rest = &buf[STATE_HEADER_BYTES..];
        for b in blocks(&cfg, &lay, len, &raw, &cmp) {
            let (src, tail) = rest.split_at(b.bytes);
            pools.write(b.pool_off, src)?;
            rest = tail;
        }

        // --- commit: nothing below can fail ---
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let s = seq as usize;
        let sp = self.split();
        let fill = |pool: &mut PoolMut<'_>, table: &mut [i32], want: &[i32]| {
            for (slot, &w) in table.iter_mut().zip(want) {
                let got = pool.take();
                debug_assert_eq!(got as i32, w);
                *slot = got as i32;
            }
        };
        let (mut rawp, mut cmpp) = (sp.raw, sp.cmp);
        fill(&mut rawp, &mut sp.raw_tables[s * pps..][..pps], &raw);
        fill(&mut cmpp, &mut sp.cmp_tables[s * cpps..][..cpps], &cmp);
        sp.seqs[s] = SeqSlot { active: 1, len };
        *sp.live_seqs += 1;
        self.end_step();
        Ok(())
    }
}

/// Checks a state buffer's header against the cache's config; returns its length.
fn check_header(cfg: &Config, lay: &Layout, buf: &[u8]) -> Result<u32> {
    let bad = |what: &str, reason: String| NsaError::arg("state", what.to_string(), reason);
    if buf.len() < STATE_HEADER_BYTES {
        return Err(bad(&format!("{} bytes", buf.len()), format!("a state buffer starts with a {STATE_HEADER_BYTES}-byte header")));
    }
    if buf[..8] != STATE_MAGIC {
        return Err(bad("magic", "the buffer does not start with \"NSASEQST\": not a sequence state".into()));
    }
    let version = u32_at(buf, 8);
    if version != STATE_VERSION {
        return Err(bad(&format!("version {version}"), format!("this library reads state version {STATE_VERSION}")));
    }
    let hb = u32_at(buf, 12);
    if hb as usize != STATE_HEADER_BYTES {
        return Err(bad(&format!("header bytes {hb}"), format!("version {STATE_VERSION} headers are {STATE_HEADER_BYTES} bytes")));
    }
    for (i, (name, f)) in FINGERPRINT.iter().enumerate() {
        let (theirs, ours) = (u32_at(buf, FP_AT + 4 * i), f(cfg));
        if theirs != ours {
            return Err(bad(name, format!("the state was exported with {name} = {theirs}, this cache's config has {ours}")));
        }
    }
    let len = u32_at(buf, LEN_AT);
    if len > cfg.max_seq_len {
        return Err(bad(&format!("length {len}"), format!("past this cache's max_seq_len = {}", cfg.max_seq_len)));
    }
    let ncmp = u32_at(buf, NCMP_AT);
    if ncmp != cfg.num_cmp_tokens(len) {
        return Err(bad(&format!("ncmp {ncmp}"), format!("a sequence of {len} tokens has {} compressed tokens", cfg.num_cmp_tokens(len))));
    }
    let pb = u64::from_le_bytes(buf[PAYLOAD_AT..PAYLOAD_AT + 8].try_into().expect("8 bytes"));
    let want = payload_bytes(cfg, lay, len);
    if pb != want as u64 {
        return Err(bad(&format!("payload bytes {pb}"), format!("{len} tokens take {want} bytes")));
    }
    if buf.len() < STATE_HEADER_BYTES + want {
        return Err(bad(&format!("{} bytes", buf.len()), format!("the header announces {} bytes (truncated buffer)", STATE_HEADER_BYTES + want)));
    }
    if buf[PAYLOAD_AT + 8..STATE_HEADER_BYTES].iter().any(|&b| b != 0) {
        return Err(bad("header reserved bytes", "must be zero in version 1".into()));
    }
    Ok(len)
}
