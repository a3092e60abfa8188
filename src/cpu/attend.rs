//! The two task kinds of a CPU layer run: append + compress for one (sequence, KV head),
//! and NSA attention for one (sequence, KV head, chunk of queries).

use super::compress::PhiHead;
use super::math::{dot, to_f32, Online, TILE};
use super::select::{block_scores, top_n};
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
        let (c0, c1) = (cfg.num_cmp_tokens(ps.old_len), cfg.num_cmp_tokens(ps.new_len));
        if c1 == c0 {
            return;
        }
        // SAFETY: thread index th is this thread's alone.
        let ws = unsafe { self.ws(th) };
        let ctable = self.step.cmp_table(ps.seq);
        let (l, d) = (cfg.cmp_block as usize, cfg.cmp_stride);
        for (raw, cmp, dim, weights) in [(Pool::RawK, Pool::CmpK, dk, self.weights.k), (Pool::RawV, Pool::CmpV, dv, self.weights.v)] {
            let phi = PhiHead::cut(cfg, weights, kvh, dim);
            for i in c0..c1 {
                let rows = &mut ws.rows[..l * dim];
                for j in 0..l {
                    let pos = i * d + j as u32;
                    // SAFETY: rows below new_len are not written by any other task.
                    let src = unsafe { self.store.rows(raw, table[(pos / p) as usize], kvh, (pos % p) as usize, 1) };
                    for (o, s) in rows[j * dim..][..dim].iter_mut().zip(src) {
                        *o = s.to_f32();
                    }
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
        for t in first..last {
            self.attend_query(&mut ws, &ps, t, kvh);
        }
    }

    fn attend_query(&self, ws: &mut super::workspace::Ws<'_>, ps: &PlanSeq, t: u32, kvh: usize) {
        let cfg = self.cfg;
        let g = cfg.group_size() as usize;
        let (hq, dk, dv) = (cfg.num_q_heads as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
        let r = (ps.row + t - ps.old_len) as usize;
        let h0 = kvh * g;
        for h in 0..g {
            let q = &self.q[(r * hq + h0 + h) * dk..][..dk];
            for (o, x) in ws.qf[h * dk..][..dk].iter_mut().zip(q) {
                *o = x.to_f32() * cfg.scale;
            }
        }
        let table = self.step.raw_table(ps.seq);
        let (acc_cmp, rest) = ws.acc.split_at_mut(g * dv);
        let (acc_slc, acc_win) = rest.split_at_mut(g * dv);
        let (m_slc, rest) = ws.ml.split_at_mut(g);
        let (l_slc, rest) = rest.split_at_mut(g);
        let (m_win, l_win) = rest.split_at_mut(g);
        let mut slc = Online { m: m_slc, l: l_slc, acc: acc_slc, dv };
        let mut win = Online { m: m_win, l: l_win, acc: &mut acc_win[..g * dv], dv };

        if self.mode == super::Mode::FullAttend {
            slc.reset();
            self.attend_range(ws.qf, ws.kt, ws.vt, ws.st, &mut slc, table, kvh, 0, t + 1);
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
        let p = cfg.page_size as usize;
        acc_cmp.fill(0.0);
        let mut i = 0;
        while i < nc {
            let n = (nc - i).min(p - i % p).min(TILE);
            let page = ctable[i / p];
            // SAFETY: compressed rows of this sequence below nc are not written in phase 3.
            let k = to_f32(unsafe { self.store.rows(Pool::CmpK, page, kvh, i % p, n) }, ws.kt);
            for h in 0..g {
                let q = &ws.qf[h * dk..][..dk];
                for j in 0..n {
                    ws.sc[h * maxc + i + j] = dot(q, &k[j * dk..][..dk]);
                }
            }
            i += n;
        }
        for h in 0..g {
            let s = &mut ws.sc[h * maxc..][..nc];
            let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for x in s.iter_mut() {
                *x = (*x - mx).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            s.iter_mut().for_each(|x| *x *= inv);
        }
        let mut i = 0;
        while i < nc {
            let n = (nc - i).min(p - i % p).min(TILE);
            // SAFETY: as above.
            let v = to_f32(unsafe { self.store.rows(Pool::CmpV, ctable[i / p], kvh, i % p, n) }, ws.vt);
            for h in 0..g {
                let acc = &mut acc_cmp[h * dv..][..dv];
                for j in 0..n {
                    super::math::axpy(acc, ws.sc[h * maxc + i + j], &v[j * dv..][..dv]);
                }
            }
            i += n;
        }

        // Branch 2: selection scores summed over the group, top-n, selected attention.
        let psum = &mut ws.psum[..nc];
        psum.fill(0.0);
        for h in 0..g {
            for (a, s) in psum.iter_mut().zip(&ws.sc[h * maxc..][..nc]) {
                *a += s;
            }
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
        slc.reset();
        for &j in &ws.sel[..count] {
            let lo = j as u32 * lp;
            let hi = (lo + lp).min(t + 1);
            self.attend_range(ws.qf, ws.kt, ws.vt, ws.st, &mut slc, table, kvh, lo, hi);
        }

        // Branch 3: sliding window of min(w, t+1) keys.
        win.reset();
        let lo = (t + 1).saturating_sub(cfg.window);
        self.attend_range(ws.qf, ws.kt, ws.vt, ws.st, &mut win, table, kvh, lo, t + 1);

        // Gated combine.
        // SAFETY: this task alone writes rows of its chunk, heads of its group.
        let out = unsafe { self.out.part((r * hq + h0) * dv, g * dv) };
        for h in 0..g {
            let gates = &self.gates[(r * hq + h0 + h) * 3..][..3];
            let o = &mut ws.orow[..dv];
            o.fill(0.0);
            super::math::axpy(o, gates[0], &acc_cmp[h * dv..][..dv]);
            slc.emit(h, gates[1], o);
            win.emit(h, gates[2], o);
            for (d, x) in out[h * dv..][..dv].iter_mut().zip(o.iter()) {
                *d = T::from_f32(*x);
            }
        }
    }

    /// Feeds keys/values at positions `lo..hi` of the sequence (head `kvh`) into `state`,
    /// a tile at a time (tiles never cross a page).
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
        lo: u32,
        hi: u32,
    ) {
        let p = self.cfg.page_size;
        let dk = self.cfg.head_dim_qk as usize;
        let mut pos = lo;
        while pos < hi {
            let n = (hi - pos).min(p - pos % p).min(TILE as u32);
            let page = table[(pos / p) as usize];
            let off = (pos % p) as usize;
            // SAFETY: positions below new_len are written only in phase 2, which is over.
            let (k, v) = unsafe {
                (self.store.rows(Pool::RawK, page, kvh, off, n as usize), self.store.rows(Pool::RawV, page, kvh, off, n as usize))
            };
            let k = to_f32(k, kt);
            let v = to_f32(v, vt);
            state.update(qf, k, v, n as usize, dk, st);
            pos += n;
        }
    }
}
