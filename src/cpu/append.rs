//! The append task of a CPU layer run: one (sequence, KV head)'s new K/V rows into their
//! pages, then the compressed tokens those rows complete.

use super::compress::PhiHead;
use super::kernels::Isa;
use super::store::Pool;
use super::LayerRun;
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
}
