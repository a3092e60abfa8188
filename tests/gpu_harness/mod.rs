//! Shared support of the GPU tests (tests/gpu_*.rs): runs the CPU backend and the CUDA
//! backend on the same cache and the same random inputs, step by step, and compares.
//!
//! - Outputs are compared per (row, KV head) when both backends selected the same blocks:
//!   `|gpu - cpu| / (1 + |cpu|)` over the group's heads.
//! - Where selections differ, the two sets are scored in f64 from the device's compressed
//!   keys (Eq. 9, summed over the group): they must be equal in total score within a
//!   tolerance (a near-tie), and such rows are counted.
//! - The device output and selection buffers are poisoned before every run (NaN, and
//!   0x7f7f7f7f), so an unwritten element fails the test.
//! - At the end the device pools are downloaded and compared with the CPU pools on every
//!   live row: raw rows bit for bit, compressed rows within one storage rounding.
#![allow(dead_code)]

use std::time::Instant;

use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::cuda::{CUstream, CudaBackend, DeviceBuf, DeviceInfo, DeviceLayerIo};
use nsa::elem::Elem;
use nsa::layout::Layout;
use nsa::{Cache, Config, StepSeq};

use crate::common::{random_weights, Buf, Rng};

/// The device. Every GPU test is `#[ignore]`d (reported as ignored without a device);
/// forced to run (`--include-ignored`) on a machine without one, it fails here instead
/// of passing without having checked anything. (The `Option` keeps the call sites'
/// shape; it is never `None`.)
pub fn device_or_skip(test: &str) -> Option<DeviceInfo> {
    match CudaBackend::probe() {
        Ok(d) => Some(d),
        Err(e) => panic!("{test}: needs a CUDA device: {e}"),
    }
}

/// `NSA_GPU_TEST_SMALL=1` shrinks sizes (for compute-sanitizer runs).
pub fn small() -> bool {
    std::env::var("NSA_GPU_TEST_SMALL").map(|v| v != "0" && !v.is_empty()).unwrap_or(false)
}

/// `full`, or `small_` under `NSA_GPU_TEST_SMALL`.
pub fn sz(full: u32, small_: u32) -> u32 {
    if small() {
        small_
    } else {
        full
    }
}

pub fn threads() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1).clamp(1, 16)
}

/// Results of one harness run, printed as one `RESULT` line for the run table.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub steps: usize,
    pub rows: usize,
    pub groups: usize,
    pub near_ties: usize,
    /// Groups selected differently in steps with `flat_q` (exact ties by construction: the
    /// two engines' last-bit differences order them; each still checked by its score gap).
    pub flat_ties: usize,
    pub max_err: f64,
    pub max_score_gap: f64,
    pub max_pool_err: f64,
    pub pool_rows: usize,
    pub cpu_s: f64,
    pub gpu_s: f64,
}

pub struct Bufs {
    pub arena: Buf,
    pub pool: Buf,
}

impl Bufs {
    pub fn new(cfg: &Config) -> Bufs {
        Bufs { arena: Buf::new(Cache::arena_bytes(cfg).unwrap()), pool: Buf::new(CpuBackend::buffer_bytes(cfg).unwrap()) }
    }
}

/// Output tolerance for a dtype (relative, as `common::max_rel_err`).
pub fn tol(cfg: &Config) -> f64 {
    match cfg.dtype {
        nsa::Dtype::F32 => 1e-3,
        _ => 1e-2,
    }
}

pub struct Harness<T: Elem> {
    pub cfg: Config,
    pub lay: Layout,
    pub cache: Cache<'static>,
    pub cpu: CpuBackend<'static>,
    /// The CPU pools (leaked test memory), read after `cpu` is dropped.
    cpu_pool: (*const u8, usize),
    pub gpu: CudaBackend,
    /// The device buffer under `gpu` when the test poisons the pools (dropped after it).
    _poisoned: Option<DeviceBuf>,
    pub rng: Rng,
    pub stats: Stats,
    pub name: String,
    /// Stream of every device call (null: the legacy default stream).
    pub stream: CUstream,
    w: Vec<(Vec<f32>, Vec<f32>)>,
    d: [DeviceBuf; 8],
    /// When set, `step` appends every layer's device output (as f32) here.
    pub record: Option<Vec<Vec<f32>>>,
    /// When set, queries are all zero: every logit of a row is equal, so block scores tie
    /// (the rankings' paths for many equal keys). Groups the two engines order differently
    /// then count as `flat_ties`, not against the near-tie limit.
    pub flat_q: bool,
    _t: std::marker::PhantomData<T>,
}

const DQ: usize = 0;
const DK: usize = 1;
const DV: usize = 2;
const DG: usize = 3;
const DOUT: usize = 4;
const DSEL: usize = 5;
const DWK: usize = 6;
const DWV: usize = 7;

impl<T: Elem> Harness<T> {
    pub fn new(name: &str, cfg: &Config, seed: u64) -> Self {
        let bufs: &'static mut Bufs = Box::leak(Box::new(Bufs::new(cfg)));
        assert_eq!(T::DTYPE, cfg.dtype);
        let mut rng = Rng::new(seed);
        let lay = Layout::new(cfg).unwrap();
        let cache = Cache::new(cfg, bufs.arena.bytes()).unwrap();
        let pool = bufs.pool.bytes();
        let cpu_pool = (pool.as_ptr(), pool.len());
        let cpu = CpuBackend::new(cfg, pool).unwrap();
        let t0 = Instant::now();
        // `NSA_GPU_POISON_POOLS=1`: every pool byte 0xFF (a NaN in f16 and bf16) until
        // written, so a kernel that lets a stale row past a sequence's end meet a zero
        // probability (0 * NaN) fails the comparison instead of passing by luck.
        let (gpu, _poisoned) = if std::env::var("NSA_GPU_POISON_POOLS").is_ok_and(|v| v == "1") {
            let need = CudaBackend::device_bytes(cfg).unwrap();
            let buf = DeviceBuf::new(need).unwrap();
            buf.fill(0xFF).unwrap();
            (CudaBackend::new(cfg, buf.ptr(), need), Some(buf))
        } else {
            (CudaBackend::with_allocation(cfg), None)
        };
        let gpu = gpu.unwrap_or_else(|e| panic!("{name}: CudaBackend: {e}"));
        eprintln!("{name}: backend ready in {:.2}s (head chunk {})", t0.elapsed().as_secs_f64(), gpu.head_chunk());
        let (n, hq, hkv, dk, dv) = (cfg.max_step_tokens as usize, cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
        let es = cfg.dtype.size();
        let wk = cfg.phi_weight_len(cfg.head_dim_qk).max(1) * 4;
        let wv = cfg.phi_weight_len(cfg.head_dim_v).max(1) * 4;
        let d = [
            n * hq * dk * es,
            n * hkv * dk * es,
            n * hkv * dv * es,
            n * hq * 3 * 4,
            n * hq * dv * es,
            n * hkv * cfg.sel_count as usize * 4,
            wk,
            wv,
        ]
        .map(|b| DeviceBuf::new(b).unwrap());
        let w: Vec<_> = (0..cfg.num_layers).map(|_| random_weights(cfg, &mut rng)).collect();
        Harness { cfg: *cfg, lay, cache, cpu, cpu_pool, gpu, _poisoned, rng, stats: Stats::default(), name: name.into(), stream: std::ptr::null_mut(), w, d, record: None, flat_q: false, _t: Default::default() }
    }

    pub fn add(&mut self, seq: u32) {
        self.cache.add_sequence(seq).unwrap();
    }

    /// Plans one step, runs every layer on both backends with fresh random inputs, and
    /// compares outputs and selections.
    pub fn step(&mut self, entries: &[(u32, u32)]) {
        self.step_with(entries, &mut |gpu, cache, layer, io, s| gpu.run_layer(cache, layer, io, s).unwrap());
    }

    /// As `step`, with `exec(gpu, cache, layer, io, stream)` queueing the device work of each
    /// layer (after `upload_step`, before the synchronize).
    pub fn step_with(&mut self, entries: &[(u32, u32)], exec: &mut dyn FnMut(&mut CudaBackend, &Cache<'static>, u32, &DeviceLayerIo, CUstream)) {
        let cfg = self.cfg;
        let es: Vec<StepSeq> = entries.iter().map(|&(seq, tokens)| StepSeq { seq, tokens }).collect();
        self.cache.plan_step(&es).unwrap_or_else(|e| panic!("{}: plan_step {entries:?}: {e}", self.name));
        let (hq, hkv, dv) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim_v as usize);
        let n = self.cache.step().unwrap().tokens as usize;
        let nsel = cfg.sel_count as usize;
        let t0 = Instant::now();
        self.gpu.upload_step(&self.cache, self.stream).unwrap();
        let mut gpu_s = t0.elapsed().as_secs_f64();
        for layer in 0..cfg.num_layers {
            let (q, k, v, g) = self.inputs(n);
            let (wk, wv) = &self.w[layer as usize];
            let mut out_c = vec![T::from_f32(f32::NAN); n * hq * dv];
            let mut sel_c = vec![i32::MIN; n * hkv * nsel];
            let t1 = Instant::now();
            self.cpu
                .run_layer(&self.cache, layer, LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out_c, selected: Some(&mut sel_c) }, PhiWeights { k: wk, v: wv })
                .unwrap();
            self.stats.cpu_s += t1.elapsed().as_secs_f64();

            let io = self.upload_layer(&q, &k, &v, &g, wk, wv);
            let d = &self.d;
            d[DOUT].fill(0xFF).unwrap();
            d[DSEL].fill(0x7F).unwrap();
            let t2 = Instant::now();
            exec(&mut self.gpu, &self.cache, layer, &io, self.stream);
            self.gpu.synchronize(self.stream).unwrap_or_else(|e| panic!("{}: kernel error: {e}", self.name));
            gpu_s += t2.elapsed().as_secs_f64();
            let mut out_g = vec![T::from_f32(0.0); n * hq * dv];
            let mut sel_g = vec![0i32; n * hkv * nsel];
            d[DOUT].download(&mut out_g).unwrap();
            d[DSEL].download(&mut sel_g).unwrap();
            if let Some(r) = self.record.as_mut() {
                r.push(out_g.iter().map(|x| x.to_f32()).collect());
            }
            self.compare(layer, &q, &out_c, &out_g, &sel_c, &sel_g);
        }
        self.stats.gpu_s += gpu_s;
        self.stats.steps += 1;
        self.stats.rows += n;
    }

    /// Uploads one layer's inputs (an empty `q` or `g` is not uploaded) and phi weights, and
    /// returns the layer's arrays over the device buffers, every one set (callers zero the
    /// ones a run omits).
    fn upload_layer(&self, q: &[T], k: &[T], v: &[T], g: &[f32], wk: &[f32], wv: &[f32]) -> DeviceLayerIo {
        let d = &self.d;
        for (i, x) in [(DQ, q), (DK, k), (DV, v)] {
            if !x.is_empty() {
                d[i].upload(x).unwrap();
            }
        }
        for (i, x) in [(DG, g), (DWK, wk), (DWV, wv)] {
            if !x.is_empty() {
                d[i].upload(x).unwrap();
            }
        }
        DeviceLayerIo {
            q: d[DQ].ptr(),
            k: d[DK].ptr(),
            v: d[DV].ptr(),
            gates: d[DG].ptr(),
            out: d[DOUT].ptr(),
            selected: d[DSEL].ptr(),
            phi_k: if wk.is_empty() { 0 } else { d[DWK].ptr() },
            phi_v: if wv.is_empty() { 0 } else { d[DWV].ptr() },
        }
    }

    /// Random inputs of one layer (every step method draws them here, so harnesses with the
    /// same seed stay in step whichever method they call).
    fn inputs(&mut self, n: usize) -> (Vec<T>, Vec<T>, Vec<T>, Vec<f32>) {
        let cfg = self.cfg;
        let (hq, hkv, dk, dv) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
        let rng = &mut self.rng;
        let flat = self.flat_q;
        let q: Vec<T> = (0..n * hq * dk).map(|_| T::from_f32(if flat { 0.0 } else { rng.unit() * 2.0 })).collect();
        let k: Vec<T> = (0..n * hkv * dk).map(|_| T::from_f32(rng.unit())).collect();
        let v: Vec<T> = (0..n * hkv * dv).map(|_| T::from_f32(rng.unit())).collect();
        let g: Vec<f32> = (0..n * hq * 3).map(|_| 0.05 + 0.9 * (rng.unit() * 0.5 + 0.5)).collect();
        (q, k, v, g)
    }

    /// Plans a step, runs its first `layers` layers on both backends (random inputs, outputs
    /// not compared), then aborts it: the steps after must still agree.
    pub fn aborted_step(&mut self, entries: &[(u32, u32)], layers: u32) {
        let es: Vec<StepSeq> = entries.iter().map(|&(seq, tokens)| StepSeq { seq, tokens }).collect();
        self.cache.plan_step(&es).unwrap_or_else(|e| panic!("{}: plan_step {entries:?}: {e}", self.name));
        let n = self.cache.step().unwrap().tokens as usize;
        let (hq, dv, hkv, nsel) = (self.cfg.num_q_heads as usize, self.cfg.head_dim_v as usize, self.cfg.num_kv_heads as usize, self.cfg.sel_count as usize);
        self.gpu.upload_step(&self.cache, self.stream).unwrap();
        for layer in 0..layers {
            let (q, k, v, g) = self.inputs(n);
            let (wk, wv) = self.w[layer as usize].clone();
            let (mut out_c, mut sel_c) = (vec![T::from_f32(0.0); n * hq * dv], vec![0i32; n * hkv * nsel]);
            let w = PhiWeights { k: &wk, v: &wv };
            self.cpu.run_layer(&self.cache, layer, LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out_c, selected: Some(&mut sel_c) }, w).unwrap();
            let io = self.upload_layer(&q, &k, &v, &g, &wk, &wv);
            self.gpu.run_layer(&self.cache, layer, &io, self.stream).unwrap();
            self.gpu.synchronize(self.stream).unwrap_or_else(|e| panic!("{}: kernel error: {e}", self.name));
        }
        self.cache.abort_step().unwrap();
    }

    /// An append-only step: the CPU runs `append_layer`, the device `run_layer` with
    /// `q = out = 0` (the output and selection buffers must stay as poisoned: no attention
    /// ran). Draws the same random inputs as `step`.
    pub fn append_step(&mut self, entries: &[(u32, u32)]) {
        let cfg = self.cfg;
        let es: Vec<StepSeq> = entries.iter().map(|&(seq, tokens)| StepSeq { seq, tokens }).collect();
        self.cache.plan_step(&es).unwrap_or_else(|e| panic!("{}: plan_step {entries:?}: {e}", self.name));
        let n = self.cache.step().unwrap().tokens as usize;
        self.gpu.upload_step(&self.cache, self.stream).unwrap();
        for layer in 0..cfg.num_layers {
            let (_q, k, v, _g) = self.inputs(n);
            let (wk, wv) = &self.w[layer as usize];
            self.cpu.append_layer(&self.cache, layer, &k, &v, PhiWeights { k: wk, v: wv }).unwrap();
            let io = DeviceLayerIo { q: 0, out: 0, ..self.upload_layer(&[], &k, &v, &[], wk, wv) };
            let d = &self.d;
            d[DOUT].fill(0xFF).unwrap();
            d[DSEL].fill(0x7F).unwrap();
            self.gpu.run_layer(&self.cache, layer, &io, self.stream).unwrap();
            self.gpu.synchronize(self.stream).unwrap_or_else(|e| panic!("{}: kernel error: {e}", self.name));
            let mut out = vec![0u8; d[DOUT].bytes()];
            d[DOUT].download(&mut out).unwrap();
            assert!(out.iter().all(|&b| b == 0xFF), "{}: an append-only run wrote the output buffer", self.name);
            let mut sel = vec![0u8; d[DSEL].bytes()];
            d[DSEL].download(&mut sel).unwrap();
            assert!(sel.iter().all(|&b| b == 0x7F), "{}: an append-only run wrote the selection buffer", self.name);
        }
        self.stats.steps += 1;
    }

    /// A step whose layers run `run_layer` (appends; NSA outputs not compared) and then the
    /// full-attention baseline on both backends; the device's `attend_full` output must
    /// match the CPU's `attend_full` within the dtype's tolerance on every element.
    pub fn full_step(&mut self, entries: &[(u32, u32)]) {
        let cfg = self.cfg;
        let es: Vec<StepSeq> = entries.iter().map(|&(seq, tokens)| StepSeq { seq, tokens }).collect();
        self.cache.plan_step(&es).unwrap_or_else(|e| panic!("{}: plan_step {entries:?}: {e}", self.name));
        let (hq, hkv, dv) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim_v as usize);
        let n = self.cache.step().unwrap().tokens as usize;
        let nsel = cfg.sel_count as usize;
        self.gpu.upload_step(&self.cache, self.stream).unwrap();
        for layer in 0..cfg.num_layers {
            let (q, k, v, g) = self.inputs(n);
            let (wk, wv) = &self.w[layer as usize];
            let mut out_c = vec![T::from_f32(f32::NAN); n * hq * dv];
            let mut sel_c = vec![i32::MIN; n * hkv * nsel];
            self.cpu
                .run_layer(&self.cache, layer, LayerIo { q: &q, k: &k, v: &v, gates: &g, out: &mut out_c, selected: Some(&mut sel_c) }, PhiWeights { k: wk, v: wv })
                .unwrap();
            let mut full_c = vec![T::from_f32(f32::NAN); n * hq * dv];
            self.cpu.attend_full(&self.cache, layer, &q, &mut full_c).unwrap();
            let io = DeviceLayerIo { selected: 0, ..self.upload_layer(&q, &k, &v, &g, wk, wv) };
            let d = &self.d;
            self.gpu.run_layer(&self.cache, layer, &io, self.stream).unwrap();
            d[DOUT].fill(0xFF).unwrap();
            self.gpu.attend_full(&self.cache, layer, d[DQ].ptr(), d[DOUT].ptr(), self.stream).unwrap();
            self.gpu.synchronize(self.stream).unwrap_or_else(|e| panic!("{}: kernel error: {e}", self.name));
            let mut full_g = vec![T::from_f32(0.0); n * hq * dv];
            d[DOUT].download(&mut full_g).unwrap();
            for (i, (a, b)) in full_g.iter().zip(&full_c).enumerate() {
                let (a, b) = (a.to_f32() as f64, b.to_f32() as f64);
                assert!(a.is_finite(), "{}: layer {layer} full attention element {i} not written ({a})", self.name);
                let e = (a - b).abs() / (1.0 + b.abs());
                assert!(e <= tol(&cfg), "{}: layer {layer} full attention element {i} (row {}, head {}): gpu {a} cpu {b}, error {e:.3e}", self.name, i / (hq * dv), i / dv % hq);
                self.stats.max_err = self.stats.max_err.max(e);
            }
            self.stats.groups += n * hkv;
        }
        self.stats.steps += 1;
        self.stats.rows += n;
    }

    fn compare(&mut self, layer: u32, q: &[T], out_c: &[T], out_g: &[T], sel_c: &[i32], sel_g: &[i32]) {
        let cfg = self.cfg;
        let (hq, hkv, dv) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim_v as usize);
        let g = cfg.group_size() as usize;
        let nsel = cfg.sel_count as usize;
        let step = self.cache.step().unwrap();
        let seqs: Vec<_> = step.seqs.to_vec();
        let mut pools: Option<Vec<T>> = None;
        for ps in &seqs {
            for t in ps.old_len..ps.new_len {
                let r = (ps.row + t - ps.old_len) as usize;
                for kvh in 0..hkv {
                    self.stats.groups += 1;
                    let sc = &sel_c[(r * hkv + kvh) * nsel..][..nsel];
                    let sg = &sel_g[(r * hkv + kvh) * nsel..][..nsel];
                    let b = (t / cfg.sel_block) as usize;
                    let count = nsel.min(b + 1);
                    assert!(
                        sg[..count].windows(2).all(|w| w[0] < w[1]) && sg[count..].iter().all(|&x| x == -1) && sg[..count].iter().all(|&x| x >= 0 && x as usize <= b),
                        "{}: layer {layer} seq {} pos {t} head {kvh}: malformed selection {sg:?} (count {count})",
                        self.name,
                        ps.seq
                    );
                    let o = (r * hq + kvh * g) * dv;
                    let (oc, og) = (&out_c[o..o + g * dv], &out_g[o..o + g * dv]);
                    for (i, x) in og.iter().enumerate() {
                        assert!(x.to_f32().is_finite(), "{}: layer {layer} seq {} pos {t} head {}: output element {} not written (poison left: {})", self.name, ps.seq, kvh * g + i / dv, i % dv, x.to_f32());
                    }
                    if sc == sg {
                        let mut e = 0f64;
                        for (a, b) in og.iter().zip(oc) {
                            let (a, b) = (a.to_f32() as f64, b.to_f32() as f64);
                            e = e.max((a - b).abs() / (1.0 + b.abs()));
                        }
                        assert!(
                            e <= tol(&cfg),
                            "{}: layer {layer} seq {} pos {t} kv head {kvh}: output error {e:.3e} > {:.0e} (same selection)",
                            self.name,
                            ps.seq,
                            tol(&cfg)
                        );
                        self.stats.max_err = self.stats.max_err.max(e);
                    } else {
                        let pools = pools.get_or_insert_with(|| {
                            let mut p = vec![T::from_f32(0.0); self.lay.pool_bytes / cfg.dtype.size()];
                            // SAFETY: plain-data elements viewed as bytes.
                            let bytes = unsafe { std::slice::from_raw_parts_mut(p.as_mut_ptr().cast::<u8>(), self.lay.pool_bytes) };
                            self.gpu.download_pools(bytes, std::ptr::null_mut()).unwrap();
                            p
                        });
                        let cp: Vec<i32> = self.cache.cmp_pages(ps.seq).unwrap().to_vec();
                        let gap = score_gap(&cfg, &self.lay, pools, layer, &cp, q, r, t, kvh, sc, sg);
                        assert!(
                            gap.0 <= 1e-3 * gap.1.max(1.0),
                            "{}: layer {layer} seq {} pos {t} kv head {kvh}: selections differ by score {:.3e} (scale {:.3e}): cpu {sc:?} gpu {sg:?}",
                            self.name,
                            ps.seq,
                            gap.0,
                            gap.1
                        );
                        self.stats.max_score_gap = self.stats.max_score_gap.max(gap.0 / gap.1.max(1.0));
                        if self.flat_q {
                            self.stats.flat_ties += 1;
                        } else {
                            self.stats.near_ties += 1;
                        }
                    }
                }
            }
        }
    }

    /// Downloads the device pools and compares every live row with the CPU pools.
    /// Consumes the harness (the CPU pool buffer is borrowed until then).
    pub fn finish(self) -> Stats {
        let cfg = self.cfg;
        let lay = self.lay;
        let mut stats = self.stats.clone();
        let mut live = vec![];
        for s in 0..cfg.max_seqs {
            if self.cache.contains(s) {
                live.push((self.cache.len(s).unwrap(), self.cache.raw_pages(s).unwrap().to_vec(), self.cache.cmp_pages(s).unwrap().to_vec()));
            }
        }
        // Under compute-sanitizer initcheck, copying out the never-written parts of the
        // pools would be reported; NSA_GPU_SKIP_POOL_DOWNLOAD=1 leaves the pool check out.
        let skip_pools = std::env::var("NSA_GPU_SKIP_POOL_DOWNLOAD").is_ok_and(|v| v == "1");
        let mut gp = vec![0u8; lay.pool_bytes];
        if skip_pools {
            live.clear();
        } else {
            self.gpu.download_pools(&mut gp, std::ptr::null_mut()).unwrap();
        }
        let name = self.name.clone();
        let prefill_kernels = self.gpu.uses_prefill_kernels();
        let (ptr, len) = self.cpu_pool;
        drop(self);
        // SAFETY: leaked test memory; the CPU backend that borrowed it is dropped.
        let cp = unsafe { std::slice::from_raw_parts(ptr, len) };
        let es = cfg.dtype.size();
        let (hkv, p) = (cfg.num_kv_heads as usize, cfg.page_size as usize);
        let (dk, dv) = (cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
        let elem = |b: &[u8], i: usize| -> f32 {
            match cfg.dtype {
                nsa::Dtype::F32 => f32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()),
                nsa::Dtype::F16 => half::f16::from_bits(u16::from_ne_bytes(b[i * 2..i * 2 + 2].try_into().unwrap())).to_f32(),
                nsa::Dtype::Bf16 => half::bf16::from_bits(u16::from_ne_bytes(b[i * 2..i * 2 + 2].try_into().unwrap())).to_f32(),
            }
        };
        for layer in 0..cfg.num_layers as usize {
            let lb = layer * lay.layer_elems;
            for (len, raw, cmp) in &live {
                let ncmp = cfg.num_cmp_tokens(*len) as usize;
                for h in 0..hkv {
                    for (pool_off, d, rows, table, exact) in
                        [(lay.raw_k, dk, *len as usize, raw, true), (lay.raw_v, dv, *len as usize, raw, true), (lay.cmp_k, dk, ncmp, cmp, false), (lay.cmp_v, dv, ncmp, cmp, false)]
                    {
                        for i in 0..rows {
                            let at = lb + pool_off + ((table[i / p] as usize * hkv + h) * p + i % p) * d;
                            if exact {
                                assert_eq!(&gp[at * es..(at + d) * es], &cp[at * es..(at + d) * es], "{name}: layer {layer} raw row {i} head {h} differs");
                            } else {
                                for e in 0..d {
                                    let (a, b) = (elem(&gp, at + e) as f64, elem(&cp, at + e) as f64);
                                    let err = (a - b).abs() / (1.0 + b.abs());
                                    assert!(err <= 1e-2, "{name}: layer {layer} compressed row {i} head {h} elem {e}: gpu {a} cpu {b}");
                                    stats.max_pool_err = stats.max_pool_err.max(err);
                                }
                            }
                            stats.pool_rows += 1;
                        }
                    }
                }
            }
        }
        println!(
            "RESULT {name}: dtype={} G={} DK={} DV={} prefill_kernels={} steps={} rows={} groups={} near_ties={} flat_ties={} max_rel_err={:.2e} max_score_gap={:.1e} pool_rows={} max_pool_err={:.1e} cpu={:.2}s gpu={:.2}s",
            cfg.dtype.name(),
            cfg.group_size(),
            dk,
            dv,
            prefill_kernels,
            stats.steps,
            stats.rows,
            stats.groups,
            stats.near_ties,
            stats.flat_ties,
            stats.max_err,
            stats.max_score_gap,
            stats.pool_rows,
            stats.max_pool_err,
            stats.cpu_s,
            stats.gpu_s
        );
        assert!(
            stats.near_ties * 50 <= stats.groups.max(50),
            "{name}: {} of {} groups selected differently (more than 2%: not near-ties)",
            stats.near_ties,
            stats.groups
        );
        stats
    }
}

/// f64 block scores of Eq. 9 for one query group, from the device's compressed keys; returns
/// (|score(cpu set) - score(gpu set)|, largest non-forced block score). Forced blocks are
/// left out of both sums (both sets hold them).
#[allow(clippy::too_many_arguments)]
fn score_gap<T: Elem>(cfg: &Config, lay: &Layout, pools: &[T], layer: u32, cmp_pages: &[i32], q: &[T], r: usize, t: u32, kvh: usize, sc: &[i32], sg: &[i32]) -> (f64, f64) {
    let (hq, hkv, dk) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim_qk as usize);
    let g = cfg.group_size() as usize;
    let p = cfg.page_size as usize;
    let nc = cfg.num_cmp_tokens(t + 1) as usize;
    let lb = layer as usize * lay.layer_elems + lay.cmp_k;
    let mut psum = vec![0f64; nc];
    for h in 0..g {
        let qh = &q[(r * hq + kvh * g + h) * dk..][..dk];
        let s: Vec<f64> = (0..nc)
            .map(|i| {
                let at = lb + ((cmp_pages[i / p] as usize * hkv + kvh) * p + i % p) * dk;
                (0..dk).map(|e| (qh[e].to_f32() * cfg.softmax_scale()) as f64 * pools[at + e].to_f32() as f64).sum::<f64>()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for i in 0..nc {
            psum[i] += (s[i] - m).exp() / z;
        }
    }
    let (a, bb) = ((cfg.cmp_block / cfg.cmp_stride) as usize, (cfg.sel_block / cfg.cmp_stride) as usize);
    let b = (t / cfg.sel_block) as usize;
    let forced = |j: usize| j < cfg.sel_init as usize || j + cfg.sel_local as usize > b;
    let blk: Vec<f64> = (0..=b)
        .map(|j| {
            let first = (bb * j) as isize - (a as isize - 1);
            let mut acc = 0.0;
            for k in 0..(a + bb - 1) {
                let i = first + k as isize;
                if i >= 0 && (i as usize) < nc {
                    let lo = k.saturating_sub(bb - 1);
                    let hi = k.min(a - 1);
                    acc += (hi + 1 - lo) as f64 * psum[i as usize];
                }
            }
            acc
        })
        .collect();
    let score = |s: &[i32]| s.iter().filter(|&&j| j >= 0 && !forced(j as usize)).map(|&j| blk[j as usize]).sum::<f64>();
    let scale = (0..=b).filter(|&j| !forced(j)).map(|j| blk[j]).fold(0.0, f64::max);
    ((score(sc) - score(sg)).abs(), scale)
}

/// A small config for the GPU tests: the preset's NSA parameters with the given shape.
pub fn cfg_for(preset: nsa::Preset, hq: u32, hkv: u32, dk: u32, dv: u32, dtype: nsa::Dtype, max_seqs: u32, max_len: u32, step_tokens: u32) -> Config {
    let mut c = Config::preset(preset).with_shape(hq, hkv, dk, dv);
    c.dtype = dtype;
    c.max_seqs = max_seqs;
    c.max_step_seqs = max_seqs;
    c.max_seq_len = max_len;
    c.max_step_tokens = step_tokens.max(max_seqs);
    c.cpu_threads = threads();
    c.fit_pages();
    c
}

/// A schedule: `seqs` sequences get random prompts of 1..=prompt_max tokens, prefilled in
/// random chunks of 1..=chunk_max (sequences whose prompt is done decode one token per
/// step meanwhile, so prefill chunks and decodes share steps); then `decode_steps` steps of
/// one token for every live sequence. With `forks`, after the prompts and half-way through
/// decoding, sequences are forked into the spare slots and one is truncated.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub seqs: u32,
    pub prompt_min: u32,
    pub prompt_max: u32,
    pub chunk_max: u32,
    pub decode_steps: u32,
    pub forks: bool,
}

pub fn scenario<T: Elem>(name: &str, cfg: &Config, seed: u64, pl: &Plan) -> Stats {
    let mut h = Harness::<T>::new(name, cfg, seed);
    let max_len = cfg.max_seq_len;
    let mut live: Vec<u32> = (0..pl.seqs).collect();
    let mut target = vec![0u32; cfg.max_seqs as usize];
    for &s in &live {
        h.add(s);
        target[s as usize] = h.rng.range(pl.prompt_min as u64, pl.prompt_max as u64) as u32;
    }
    let budget = cfg.max_step_tokens;
    let mut guard = 0;
    loop {
        let mut entries = vec![];
        let mut used = 0u32;
        let mut pending = false;
        for &s in &live {
            let len = h.cache.len(s).unwrap();
            let want = if len < target[s as usize] {
                pending = true;
                (h.rng.range(1, pl.chunk_max as u64) as u32).min(target[s as usize] - len)
            } else {
                1
            };
            let want = want.min(budget - used).min(max_len - len);
            if want > 0 {
                entries.push((s, want));
                used += want;
            }
        }
        if !pending {
            break;
        }
        h.step(&entries);
        guard += 1;
        assert!(guard < 100_000);
    }
    let fork_round = |h: &mut Harness<T>, live: &mut Vec<u32>| {
        let spare: Vec<u32> = (0..cfg.max_seqs).filter(|s| !h.cache.contains(*s)).take(2).collect();
        for (i, &dst) in spare.iter().enumerate() {
            let src = live[i % live.len()];
            h.cache.fork(src, dst).unwrap();
            live.push(dst);
        }
        if live.len() > 1 {
            let s = live[1];
            let len = h.cache.len(s).unwrap();
            let new_len = h.rng.range(len as u64 / 2, len as u64) as u32;
            h.cache.truncate(s, new_len).unwrap();
        }
    };
    if pl.forks {
        fork_round(&mut h, &mut live);
    }
    for i in 0..pl.decode_steps {
        if pl.forks && i == pl.decode_steps / 2 {
            // Free two slots (the oldest forks' parents stay), then fork again.
            let victims: Vec<u32> = live.iter().rev().take(2.min(live.len() - 1)).copied().collect();
            for v in victims {
                h.cache.remove(v).unwrap();
                live.retain(|&x| x != v);
            }
            fork_round(&mut h, &mut live);
        }
        let entries: Vec<(u32, u32)> = live.iter().filter(|&&s| h.cache.len(s).unwrap() < max_len).map(|&s| (s, 1)).collect();
        if entries.is_empty() {
            break;
        }
        h.step(&entries);
    }
    h.finish()
}
