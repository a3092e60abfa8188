//! Per-thread scratch of the CPU kernels, carved from the caller's buffer once per task
//! (no allocation). Sizes follow from the config's capacity.

use super::kernels::TILE;
use crate::config::Config;

/// f32 elements of one thread's scratch.
pub(crate) fn floats_per_thread(c: &Config) -> usize {
    let g = c.group_size() as usize;
    let (dk, dv) = (c.head_dim_qk as usize, c.head_dim_v as usize);
    let d = dk.max(dv);
    let maxc = c.num_cmp_tokens(c.max_seq_len) as usize;
    let nb = c.max_sel_blocks() as usize;
    let n = c.sel_count as usize;
    let l = c.cmp_block as usize;
    let parts = [
        g * dk,                              // qf
        g * maxc,                            // sc
        maxc,                                // psum
        nb,                                  // blk
        n,                                   // best
        TILE * dk,                           // kt
        TILE * dv,                           // vt
        g * TILE,                            // st
        2 * 2 * g,                           // m, l of two online states
        3 * g * dv,                          // o_cmp, acc_slc, acc_win
        dv,                                  // out row
        l * d,                               // phi: gathered rows
        l * d + c.phi_hidden as usize,       // phi scratch
        d,                                   // phi out
    ];
    // Each part rounded up to 16 floats (64 bytes) to keep parts cache-line aligned.
    parts.iter().map(|p| p.div_ceil(16) * 16).sum()
}

/// One thread's scratch, split into named parts.
pub(crate) struct Ws<'w> {
    pub qf: &'w mut [f32],
    pub sc: &'w mut [f32],
    pub psum: &'w mut [f32],
    pub blk: &'w mut [f32],
    pub best: &'w mut [f32],
    pub sel: &'w mut [i32],
    pub kt: &'w mut [f32],
    pub vt: &'w mut [f32],
    pub st: &'w mut [f32],
    pub ml: &'w mut [f32],
    pub acc: &'w mut [f32],
    pub orow: &'w mut [f32],
    pub rows: &'w mut [f32],
    pub phi: &'w mut [f32],
    pub phi_out: &'w mut [f32],
}

impl<'w> Ws<'w> {
    pub fn carve(c: &Config, mut buf: &'w mut [f32], sel: &'w mut [i32]) -> Ws<'w> {
        let g = c.group_size() as usize;
        let (dk, dv) = (c.head_dim_qk as usize, c.head_dim_v as usize);
        let d = dk.max(dv);
        let maxc = c.num_cmp_tokens(c.max_seq_len) as usize;
        let l = c.cmp_block as usize;
        let n = c.sel_count as usize;
        let mut take = |len: usize| -> &'w mut [f32] {
            let (a, b) = std::mem::take(&mut buf).split_at_mut(len.div_ceil(16) * 16);
            buf = b;
            &mut a[..len]
        };
        let qf = take(g * dk);
        let sc = take(g * maxc);
        let psum = take(maxc);
        let blk = take(c.max_sel_blocks() as usize);
        let best = take(n);
        Ws {
            qf,
            sc,
            psum,
            blk,
            best,
            sel: &mut sel[..n],
            kt: take(TILE * dk),
            vt: take(TILE * dv),
            st: take(g * TILE),
            ml: take(4 * g),
            acc: take(3 * g * dv),
            orow: take(dv),
            rows: take(l * d),
            phi: take(l * d + c.phi_hidden as usize),
            phi_out: take(d),
        }
    }
}
