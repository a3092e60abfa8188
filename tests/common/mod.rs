//! Shared test support: a seeded RNG, caller-owned aligned buffers, random inputs, and a
//! driver that runs a schedule of steps through the cache and the CPU backend.
#![allow(dead_code)]

use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::elem::Elem;
use nsa::reference::{prefill, RefInputs};
use nsa::{Cache, Config, HostBuf, Phi, StepSeq};

/// The tests' caller-owned buffers.
pub type Buf = HostBuf;

#[path = "../../src/rng.rs"]
mod rng;
pub use rng::Rng;
pub mod non_finite;

/// One sequence's full inputs, f32 values already rounded through the storage dtype.
#[derive(Clone)]
pub struct SeqData {
    pub len: usize,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub gates: Vec<f32>,
}

pub fn round<T: Elem>(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| T::from_f32(v).to_f32()).collect()
}

impl SeqData {
    pub fn random<T: Elem>(cfg: &Config, len: usize, rng: &mut Rng) -> SeqData {
        let (hq, hkv, dk, dv) = dims(cfg);
        SeqData {
            len,
            // Larger q makes attention peaky, so selection matters.
            q: round::<T>(&rng.vec(len * hq * dk, 2.0)),
            k: round::<T>(&rng.vec(len * hkv * dk, 1.0)),
            v: round::<T>(&rng.vec(len * hkv * dv, 1.0)),
            gates: (0..len * hq * 3).map(|_| 0.05 + 0.9 * (rng.unit() * 0.5 + 0.5)).collect(),
        }
    }
}

pub fn dims(cfg: &Config) -> (usize, usize, usize, usize) {
    (cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize)
}

/// Random phi weights for one layer (K side, V side), scaled to keep values O(1).
pub fn random_weights(cfg: &Config, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let mk = |d: u32, rng: &mut Rng| {
        let n = cfg.phi_weight_len(d);
        let fan_in = match cfg.phi {
            Phi::Mean => 1.0,
            Phi::Weighted => cfg.cmp_block as f32,
            Phi::Linear | Phi::Mlp => (cfg.cmp_block * d) as f32,
        };
        rng.vec(n, 1.5 / fan_in.sqrt())
    };
    (mk(cfg.head_dim_qk, rng), mk(cfg.head_dim_v, rng))
}

/// An engine owned by a test: arena + CPU buffer.
pub struct Engine {
    pub cfg: Config,
    pub arena: Buf,
    pub pool: Buf,
}

impl Engine {
    pub fn new(cfg: &Config) -> Engine {
        Engine {
            cfg: *cfg,
            arena: Buf::new(Cache::arena_bytes(cfg).unwrap()),
            pool: Buf::new(CpuBackend::buffer_bytes(cfg).unwrap()),
        }
    }
}

/// Per-sequence results of a run: outputs `[len, HQ, DV]` and selections `[len, HKV, n]`.
pub struct Outs {
    pub out: Vec<Vec<f32>>,
    pub sel: Vec<Vec<i32>>,
}

/// Drives one cache + CPU backend over per-slot input data: slot `i` reads `data[i]`
/// at its current length, and outputs land in `out[i]`/`sel[i]` at those positions.
pub struct Driver<'e, T> {
    pub cache: Cache<'e>,
    pub cpu: CpuBackend<'e>,
    pub cfg: Config,
    pub data: Vec<SeqData>,
    pub w: (Vec<f32>, Vec<f32>),
    pub out: Vec<Vec<f32>>,
    pub sel: Vec<Vec<i32>>,
    _t: std::marker::PhantomData<T>,
}

impl<'e, T: Elem> Driver<'e, T> {
    pub fn new(eng: &'e mut Engine, data: Vec<SeqData>, w: (Vec<f32>, Vec<f32>)) -> Self {
        let cfg = eng.cfg;
        let (hq, hkv, _, dv) = dims(&cfg);
        let n = cfg.sel_count as usize;
        Driver {
            cache: Cache::new(&cfg, eng.arena.bytes()).unwrap(),
            cpu: CpuBackend::new(&cfg, eng.pool.bytes()).unwrap(),
            cfg,
            out: data.iter().map(|s| vec![f32::NAN; s.len * hq * dv]).collect(),
            sel: data.iter().map(|s| vec![i32::MIN; s.len * hkv * n]).collect(),
            data,
            w,
            _t: std::marker::PhantomData,
        }
    }

    /// Plans and runs one step (one layer), recording outputs, then checks invariants.
    pub fn step(&mut self, step: &[(usize, usize)]) {
        let (hq, hkv, dk, dv) = dims(&self.cfg);
        let n = self.cfg.sel_count as usize;
        let cache = &mut self.cache;
        let entries: Vec<StepSeq> = step.iter().map(|&(s, t)| StepSeq { seq: s as u32, tokens: t as u32 }).collect();
        let starts: Vec<usize> = step.iter().map(|&(s, _)| cache.len(s as u32).unwrap() as usize).collect();
        cache.plan_step(&entries).unwrap();
        let (mut q, mut k, mut v, mut g) = (vec![], vec![], vec![], vec![]);
        for (&(s, t), &p0) in step.iter().zip(&starts) {
            let d = &self.data[s];
            q.extend(d.q[p0 * hq * dk..(p0 + t) * hq * dk].iter().map(|&x| T::from_f32(x)));
            k.extend(d.k[p0 * hkv * dk..(p0 + t) * hkv * dk].iter().map(|&x| T::from_f32(x)));
            v.extend(d.v[p0 * hkv * dv..(p0 + t) * hkv * dv].iter().map(|&x| T::from_f32(x)));
            g.extend_from_slice(&d.gates[p0 * hq * 3..(p0 + t) * hq * 3]);
        }
        let tokens: usize = step.iter().map(|x| x.1).sum();
        let mut out = vec![T::from_f32(f32::NAN); tokens * hq * dv];
        let mut sel = vec![i32::MIN; tokens * hkv * n];
        self.cpu
            .run_layer(
                cache,
                0,
                LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out, selected: Some(&mut sel) },
                PhiWeights { k: &self.w.0, v: &self.w.1 },
            )
            .unwrap();
        let mut row = 0;
        for (&(s, t), &p0) in step.iter().zip(&starts) {
            for (dst, src) in self.out[s][p0 * hq * dv..(p0 + t) * hq * dv].iter_mut().zip(&out[row * hq * dv..]) {
                *dst = src.to_f32();
            }
            self.sel[s][p0 * hkv * n..(p0 + t) * hkv * n].copy_from_slice(&sel[row * hkv * n..(row + t) * hkv * n]);
            row += t;
        }
        cache.check_invariants().unwrap();
    }
}

/// Runs `schedule` (steps of `(slot, tokens)`) over fresh sequences `0..seqs.len()`.
pub fn run_schedule<T: Elem>(cfg: &Config, seqs: &[SeqData], schedule: &[Vec<(usize, usize)>], w: &(Vec<f32>, Vec<f32>)) -> Outs {
    let mut eng = Engine::new(cfg);
    let mut d = Driver::<T>::new(&mut eng, seqs.to_vec(), w.clone());
    for i in 0..seqs.len() {
        d.cache.add_sequence(i as u32).unwrap();
    }
    for step in schedule {
        d.step(step);
    }
    Outs { out: d.out, sel: d.sel }
}

/// One step per sequence chunk: prefill each sequence in chunks of random sizes in
/// `1..=max_chunk`, interleaving sequences in the same steps.
pub fn random_schedule(lens: &[usize], max_chunk: usize, rng: &mut Rng) -> Vec<Vec<(usize, usize)>> {
    let mut done = vec![0usize; lens.len()];
    let mut steps = vec![];
    while done.iter().zip(lens).any(|(d, l)| d < l) {
        let mut step = vec![];
        for (i, (&l, d)) in lens.iter().zip(done.iter_mut()).enumerate() {
            if *d < l && rng.below(4) != 0 {
                let t = (rng.range(1, max_chunk as u64) as usize).min(l - *d);
                step.push((i, t));
                *d += t;
            }
        }
        if !step.is_empty() {
            steps.push(step);
        }
    }
    steps
}

/// Largest |a - b| / (1 + |b|) over two arrays (NaN counts as infinite).
pub fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let e = ((x - y).abs() / (1.0 + y.abs())) as f64;
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

pub struct Checked {
    pub max_err: f64,
    pub near_ties: usize,
}

/// Compares one sequence's engine outputs and selections with the reference: equal
/// selections, or (a near-tie under another float order) sets that score the same within
/// tolerance; outputs then given the engine's indices. Returns the largest error.
pub fn check_seq(cfg: &Config, d: &SeqData, w: &(Vec<f32>, Vec<f32>), out: &[f32], sel: &[i32], tol: f64, what: &str) -> Checked {
    let inp = RefInputs { cfg, q: &d.q, k: &d.k, v: &d.v, gates: &d.gates, phi_k: &w.0, phi_v: &w.1, selection: None };
    let r = prefill(&inp);
    let (_, hkv, _, _) = dims(cfg);
    let n = cfg.sel_count as usize;
    let mut near_ties = 0;
    for t in 0..d.len {
        for h in 0..hkv {
            let row = (t * hkv + h) * n;
            let (mine, theirs) = (&sel[row..row + n], &r.selected[row..row + n]);
            if mine == theirs {
                continue;
            }
            // Different sets: both must be valid and score the same within tolerance.
            let scores = &r.scores[(t * hkv + h) * r.nb..][..r.nb];
            let sum = |s: &[i32]| -> f64 { s.iter().filter(|&&j| j >= 0).map(|&j| scores[j as usize]).filter(|x| x.is_finite()).sum() };
            let count = |s: &[i32]| s.iter().filter(|&&j| j >= 0).count();
            assert_eq!(count(mine), count(theirs), "{what}: t={t} h={h}: selection sizes {mine:?} vs {theirs:?}");
            let forced = |s: &[i32]| s.iter().filter(|&&j| j >= 0 && scores[j as usize].is_infinite()).count();
            assert_eq!(forced(mine), forced(theirs), "{what}: t={t} h={h}: forced blocks missing in {mine:?}");
            let (a, b) = (sum(mine), sum(theirs));
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}: t={t} h={h}: engine picked {mine:?} (score {a}), best is {theirs:?} ({b})");
            near_ties += 1;
        }
    }
    let out_ref = if near_ties > 0 {
        prefill(&RefInputs { selection: Some(sel), ..inp }).out
    } else {
        r.out
    };
    let err = max_rel_err(out, &out_ref);
    assert!(err <= tol, "{what}: max error {err:e} > {tol:e}");
    Checked { max_err: err, near_ties }
}
