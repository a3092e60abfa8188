//! The two task kinds of a CPU layer run: append + compress for one (sequence, KV head),
//! and NSA attention for one (sequence, KV head, chunk of queries).

use super::compress::PhiHead;
use super::math::{Online, TILE};
use super::select::{block_scores, top_n};
use super::simd::{Isa, Prefetch};
use super::store::Pool;
use super::{LayerRun, QUERY_CHUNK};
use crate::elem::Elem;
use crate::layout::PlanSeq;

impl<T: Elem> LayerRun<'_, T> {
    /// Writes the step's new K/V rows of sequence `si` (index in the plan), head `kvh`,
    /// into their pages, then every compressed token the new rows complete.
    pub(super) fn append_task(&self, th: usize, si: usize, kvh: usize) {
        let cfg = self.cfg;
        let ps: PlanSeq = self.step.seqs[si];
        let (hkv, dk, dv) = (cfg.num_kv_heads as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
        let p = cfg.page_size;
        let table = self.step.raw_table(ps.seq);
        for pos in ps.old_len..ps.new_len {
            let r = (ps.row + pos - ps.old_len) as usize;
            let (page, off) = (table[(pos / p) as usize], (pos % p) as usize);
            // SAFETY: the page holding a new position is exclusively this sequence's
            // (planning copied it if it was shared), and only this task writes head kvh.
            unsafe {
                self.store.rows_mut(Pool::RawK, page, kvh, off, 1).copy_from_slice(&self.k[(r * hkv + kvh) * dk..][..dk]);
                self.store.rows_mut(Pool::RawV, page, kvh, off, 1).copy_from_slice(&self.v[(r * hkv + kvh) * dv..][..dv]);
            }
        }
        let completed = self.step.completed(&ps);
        if completed.is_empty() {
            return;
        }
        // SAFETY: thread index th is this thread's alone.
        let ws = unsafe { self.ws(th) };
        let isa = Isa::get();
        let ctable = self.step.cmp_table(ps.seq);
        let (l, d) = (cfg.cmp_block as usize, cfg.cmp_stride);
        for (raw, cmp, dim, weights) in [(Pool::RawK, Pool::CmpK, dk, self.weights.k), (Pool::RawV, Pool::CmpV, dv, self.weights.v)] {
            let phi = PhiHead::cut(cfg, weights, kvh, dim);
            for i in completed.clone() {
                let rows = &mut ws.rows[..l * dim];
                for j in 0..l {
                    let pos = i * d + j as u32;
                    // SAFETY: rows below new_len are not written by any other task.
                    let src = unsafe { self.store.rows(raw, table[(pos / p) as usize], kvh, (pos % p) as usize, 1) };
                    isa.convert(src, &mut rows[j * dim..][..dim]);
                }
                let out = &mut ws.phi_out[..dim];
                phi.apply(rows, dim, out, ws.phi);
                // SAFETY: as for raw rows: the compressed page is this sequence's alone.
                let dst = unsafe { self.store.rows_mut(cmp, ctable[(i / p) as usize], kvh, (i % p) as usize, 1) };
                for (o, x) in dst.iter_mut().zip(out.iter()) {
                    *o = T::from_f32(*x);
                }
            }
        }
    }

    /// Attention for the `ci`-th query chunk of the step (chunks numbered across
    /// sequences in plan order), KV head `kvh`.
    pub(super) fn attend_task(&self, th: usize, ci: usize, kvh: usize) {
        let mut ci = ci as u32;
        let mut found = None;
        for ps in self.step.seqs {
            let nchunks = (ps.new_len - ps.old_len).div_ceil(QUERY_CHUNK);
            if ci < nchunks {
                found = Some((*ps, ci));
                break;
            }
            ci -= nchunks;
        }
        let (ps, c) = found.expect("chunk index within the step");
        let first = ps.old_len + c * QUERY_CHUNK;
        let last = (first + QUERY_CHUNK).min(ps.new_len);
        // SAFETY: thread index th is this thread's alone.
        let mut ws = unsafe { self.ws(th) };
        let isa = Isa::get();
        for t in first..last {
            self.attend_query(isa, &mut ws, &ps, t, kvh);
        }
    }

    fn attend_query(&self, isa: Isa, ws: &mut super::workspace::Ws<'_>, ps: &PlanSeq, t: u32, kvh: usize) {
        let cfg = self.cfg;
        let g = cfg.group_size() as usize;
        let (hq, dk, dv) = (cfg.num_q_heads as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
        let r = (ps.row + t - ps.old_len) as usize;
        let h0 = kvh * g;
        for h in 0..g {
            let qf = &mut ws.qf[h * dk..][..dk];
            isa.convert(&self.q[(r * hq + h0 + h) * dk..][..dk], qf);
            isa.scale(qf, cfg.scale); // exact conversion, then one rounding: x * scale
        }
        let table = self.step.raw_table(ps.seq);
        let (acc_cmp, rest) = ws.acc.split_at_mut(g * dv);
        let (acc_slc, acc_win) = rest.split_at_mut(g * dv);
        let (m_slc, rest) = ws.ml.split_at_mut(g);
        let (l_slc, rest) = rest.split_at_mut(g);
        let (m_win, l_win) = rest.split_at_mut(g);
        let mut slc = Online { m: m_slc, l: l_slc, acc: acc_slc, dv, isa };
        let mut win = Online { m: m_win, l: l_win, acc: &mut acc_win[..g * dv], dv, isa };

        if self.mode == super::Mode::FullAttend {
            slc.reset();
            self.attend_range(ws.qf, ws.kt, ws.vt, ws.st, &mut slc, table, kvh, (0, t + 1), (0, 0));
            // SAFETY: this task alone writes rows of its chunk, heads of its group.
            let out = unsafe { self.out.part((r * hq + h0) * dv, g * dv) };
            for h in 0..g {
                ws.orow.fill(0.0);
                slc.emit(h, 1.0, ws.orow);
                for (o, x) in out[h * dv..][..dv].iter_mut().zip(ws.orow.iter()) {
                    *o = T::from_f32(*x);
                }
            }
            return;
        }

        // Branch 1: compressed attention over the visible compressed tokens, keeping the
        // probabilities for selection.
        let nc = cfg.num_cmp_tokens(t + 1) as usize;
        let maxc = ws.psum.len();
        let ctable = self.step.cmp_table(ps.seq);
        acc_cmp.fill(0.0);
        let mut i = 0;
        while i < nc {
            // SAFETY: compressed rows of this sequence below nc are not written in phase 3.
            let (k, next) = unsafe {
                let k = self.tile(Pool::CmpK, ctable, kvh, i, nc);
                let n = k.len() / dk;
                (k, if i + n < nc { self.tile(Pool::CmpK, ctable, kvh, i + n, nc) } else { self.tile(Pool::CmpV, ctable, kvh, 0, nc) })
            };
            let n = k.len() / dk;
            let k = isa.k_tile(k, dk, ws.kt);
            isa.scores(ws.qf, g, dk, k, n, &mut ws.sc[i..], maxc, &mut Prefetch::new(next));
            i += n;
        }
        for h in 0..g {
            let s = &mut ws.sc[h * maxc..][..nc];
            let mx = isa.max(s);
            let sum = isa.exp_sum(s, mx);
            isa.scale(s, 1.0 / sum);
        }
        let mut i = 0;
        while i < nc {
            // SAFETY: as above.
            let (v, next) = unsafe {
                let v = self.tile(Pool::CmpV, ctable, kvh, i, nc);
                let n = v.len() / dv;
                (v, if i + n < nc { self.tile(Pool::CmpV, ctable, kvh, i + n, nc) } else { &[] })
            };
            let n = v.len() / dv;
            let v = isa.to_f32(v, ws.vt);
            isa.pv(&ws.sc[i..], maxc, g, v, n, dv, acc_cmp, &mut Prefetch::new(next));
            i += n;
        }

        // Branch 2: selection scores summed over the group, top-n, selected attention.
        let psum = &mut ws.psum[..nc];
        psum.fill(0.0);
        for h in 0..g {
            isa.axpy(psum, 1.0, &ws.sc[h * maxc..][..nc]); // psum + 1 * s: exactly psum + s
        }
        let lp = cfg.sel_block;
        let b = (t / lp) as usize;
        block_scores(cfg, psum, b, ws.blk);
        let n = cfg.sel_count as usize;
        let count = top_n(ws.blk, b, n, ws.best, ws.sel);
        if let Some(sel) = &self.selected {
            // SAFETY: this task alone writes row r, head kvh.
            let dst = unsafe { sel.part((r * cfg.num_kv_heads as usize + kvh) * n, n) };
            dst[..count].copy_from_slice(&ws.sel[..count]);
            dst[count..].fill(-1);
        }
        let window = ((t + 1).saturating_sub(cfg.window), t + 1);
        let block = |j: i32| (j as u32 * lp, (j as u32 * lp + lp).min(t + 1));
        slc.reset();
        for (idx, &j) in ws.sel[..count].iter().enumerate() {
            let next = if idx + 1 < count { block(ws.sel[idx + 1]) } else { window };
            self.attend_range(ws.qf, ws.kt, ws.vt, ws.st, &mut slc, table, kvh, block(j), next);
        }

        // Branch 3: sliding window of min(w, t+1) keys.
        win.reset();
        self.attend_range(ws.qf, ws.kt, ws.vt, ws.st, &mut win, table, kvh, window, (0, 0));

        // Gated combine.
        // SAFETY: this task alone writes rows of its chunk, heads of its group.
        let out = unsafe { self.out.part((r * hq + h0) * dv, g * dv) };
        for h in 0..g {
            let gates = &self.gates[(r * hq + h0 + h) * 3..][..3];
            let o = &mut ws.orow[..dv];
            o.fill(0.0);
            isa.axpy(o, gates[0], &acc_cmp[h * dv..][..dv]);
            slc.emit(h, gates[1], o);
            win.emit(h, gates[2], o);
            for (d, x) in out[h * dv..][..dv].iter_mut().zip(o.iter()) {
                *d = T::from_f32(*x);
            }
        }
    }

    /// Feeds keys/values at positions `lo..hi` of the sequence (head `kvh`) into `state`,
    /// a tile at a time (tiles never cross a page). `next` is the range the caller feeds
    /// after this one (empty if none): its first tile is prefetched during the last tile.
    #[allow(clippy::too_many_arguments)]
    fn attend_range(
        &self,
        qf: &[f32],
        kt: &mut [f32],
        vt: &mut [f32],
        st: &mut [f32],
        state: &mut Online<'_>,
        table: &[i32],
        kvh: usize,
        (lo, hi): (u32, u32),
        next: (u32, u32),
    ) {
        let (dk, dv) = (self.cfg.head_dim_qk as usize, self.cfg.head_dim_v as usize);
        let (mut pos, hi) = (lo as usize, hi as usize);
        while pos < hi {
            // SAFETY: positions below new_len are written only in phase 2, which is over.
            let (k, v, nk, nv) = unsafe {
                let k = self.tile(Pool::RawK, table, kvh, pos, hi);
                let n = k.len() / dk;
                let at = if pos + n < hi { Some((pos + n, hi)) } else { (next.0 < next.1).then_some((next.0 as usize, next.1 as usize)) };
                let (nk, nv) = match at {
                    Some((a, b)) => (self.tile(Pool::RawK, table, kvh, a, b), self.tile(Pool::RawV, table, kvh, a, b)),
                    None => (&[][..], &[][..]),
                };
                (k, self.tile(Pool::RawV, table, kvh, pos, hi), nk, nv)
            };
            let n = k.len() / dk;
            debug_assert_eq!(v.len(), n * dv);
            let k = state.isa.k_tile(k, dk, kt);
            state.update(qf, k, v, vt, n, dk, st, (Prefetch::new(nk), Prefetch::new(nv)));
            pos += n;
        }
    }

    /// Rows of the tile of `pool` that starts at position `pos` of a range ending at `hi`
    /// (`pos < hi`): up to the end of the range, of the page, or TILE rows.
    ///
    /// # Safety
    /// No task writes these rows during the borrow.
    unsafe fn tile(&self, pool: Pool, table: &[i32], kvh: usize, pos: usize, hi: usize) -> &[T] {
        let p = self.cfg.page_size as usize;
        let n = (hi - pos).min(p - pos % p).min(TILE);
        self.store.rows(pool, table[pos / p], kvh, pos % p, n)
    }
}
