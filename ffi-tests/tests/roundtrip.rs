//! The C ABI, loaded with libloading and driven only through `nsa_get_api`'s table, gives
//! bit for bit what the Rust API gives: a multi-sequence prefill + decode loop with forks,
//! truncations and removals, over several layers, dtypes and phi functions. After every
//! operation the cache metadata in the C arena equals the Rust cache's byte for byte.
//! The C side runs layer 0 with `nsa_cpu_run_layer` and layer 1 with
//! `nsa_cpu_run_layer_part` on 1 to 4 host threads (the Rust side always `run_layer`),
//! and one append-only step (q = out = NULL) against `append_layer`.

mod common;
use common::*;
use half::{bf16, f16};
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::elem::Elem;
use nsa::{Cache, Config, Dtype, Phi, Preset, StepSeq};
use nsa_ffi_tests::*;

enum Op {
    Add(u32),
    Fork(u32, u32),
    Truncate(u32, u32),
    Remove(u32),
    Step(Vec<(u32, u32)>),
    /// An append-only step.
    Append(Vec<(u32, u32)>),
}

/// `nsa_layer_io_t` and the handles, shared by the host threads of one layer run.
struct Shared<'a>(&'a nsa_layer_io_t, *mut nsa_cpu_backend, *mut nsa_cache);
// SAFETY: the threads only pass these to nsa_cpu_run_layer_part, which is made for that.
unsafe impl Sync for Shared<'_> {}

fn schedule() -> Vec<Op> {
    use Op::*;
    let mut ops = vec![Add(0), Add(1), Add(2), Step(vec![(0, 150), (1, 33), (2, 250)])];
    ops.extend((0..5).map(|_| Step(vec![(0, 1), (1, 1), (2, 1)])));
    ops.extend([
        Fork(0, 3),
        Step(vec![(0, 1), (3, 1), (1, 1)]),
        Truncate(3, 140),
        Step(vec![(3, 2), (2, 1)]),
        Remove(1),
        Add(1),
        Add(4),
        Append(vec![(4, 90), (0, 2)]),
        Step(vec![(1, 40), (0, 1)]),
        Fork(2, 1 + 4),
        Step(vec![(5, 3), (2, 3)]),
    ]);
    ops.extend((0..4).map(|_| Step(vec![(0, 1), (1, 1), (2, 1), (3, 1), (5, 1)])));
    ops
}

fn config(preset: Preset, dtype: Dtype, phi: Phi, g: u32) -> Config {
    let mut c = Config::preset(preset).with_shape(2 * g, 2, 32, 16);
    c.dtype = dtype;
    c.sel_count = 4;
    c.window = 40;
    c.phi = phi;
    c.phi_hidden = 8;
    c.phi_pe = phi == Phi::Mlp;
    c.num_layers = 2;
    c.max_seqs = 6;
    c.max_step_seqs = 5;
    c.max_seq_len = 400;
    c.max_step_tokens = 512;
    c.cpu_threads = 3;
    c.fit_pages();
    c
}

fn round_trip<T: Elem>(cfg: &Config, seed: u64) {
    let a = api();
    let ccfg = nsa_config_t::from(cfg);
    let c = CEngine::new(&ccfg);
    let meta = Cache::arena_bytes(cfg).unwrap();
    let handle_bytes = c.arena.len() - meta;
    // Filled like CEngine's arena, so bytes the cache never writes (region padding) match.
    let mut r_arena = AlignedBuf::filled(meta, 0xA5);
    let mut r_buf = AlignedBuf::new(CpuBackend::buffer_bytes(cfg).unwrap());
    let (ra, rb) = (r_arena.len(), r_buf.len());
    // SAFETY: the buffers outlive the cache and backend below.
    let mut cache = Cache::new(cfg, unsafe { std::slice::from_raw_parts_mut(r_arena.ptr(), ra) }).unwrap();
    let mut cpu = CpuBackend::new(cfg, unsafe { std::slice::from_raw_parts_mut(r_buf.ptr(), rb) }).unwrap();

    let mut rng = Rng::new(seed);
    let weights: Vec<_> = (0..cfg.num_layers).map(|_| phi_weights(cfg, &mut rng)).collect();
    let (hq, hkv, _, dv) = dims(cfg);
    let n = cfg.sel_count as usize;
    let (mut decoded, mut selection_matters) = (0usize, false);
    for (i, op) in schedule().iter().enumerate() {
        unsafe {
            match op {
                Op::Add(s) => {
                    ok((a.cache_add)(c.cache, *s));
                    cache.add_sequence(*s).unwrap();
                }
                Op::Fork(s, d) => {
                    ok((a.cache_fork)(c.cache, *s, *d));
                    cache.fork(*s, *d).unwrap();
                }
                Op::Truncate(s, l) => {
                    ok((a.cache_truncate)(c.cache, *s, *l));
                    cache.truncate(*s, *l).unwrap();
                }
                Op::Remove(s) => {
                    ok((a.cache_remove)(c.cache, *s));
                    cache.remove(*s).unwrap();
                }
                Op::Step(entries) | Op::Append(entries) => {
                    let append_only = matches!(op, Op::Append(_));
                    let ce: Vec<nsa_step_seq_t> = entries.iter().map(|&(seq, tokens)| nsa_step_seq_t { seq, tokens }).collect();
                    let re: Vec<StepSeq> = entries.iter().map(|&(seq, tokens)| StepSeq { seq, tokens }).collect();
                    ok((a.cache_plan_step)(c.cache, ce.as_ptr(), ce.len() as u32));
                    cache.plan_step(&re).unwrap();
                    let tokens: usize = entries.iter().map(|e| e.1 as usize).sum();
                    for layer in 0..cfg.num_layers {
                        let d = LayerData::<T>::random(cfg, tokens, &mut rng);
                        let (wk, wv) = &weights[layer as usize];
                        let nan = T::from_f32(f32::NAN);
                        let (mut c_out, mut r_out) = (vec![nan; tokens * hq * dv], vec![nan; tokens * hq * dv]);
                        let (mut c_sel, mut r_sel) = (vec![i32::MIN; tokens * hkv * n], vec![i32::MIN; tokens * hkv * n]);
                        let mut io = nsa_layer_io_t {
                            struct_size: std::mem::size_of::<nsa_layer_io_t>() as u32,
                            dtype: cfg.dtype as u32,
                            tokens: tokens as u32,
                            flags: 0,
                            q: d.q.as_ptr().cast(),
                            k: d.k.as_ptr().cast(),
                            v: d.v.as_ptr().cast(),
                            gates: d.gates.as_ptr(),
                            out: c_out.as_mut_ptr().cast(),
                            selected: c_sel.as_mut_ptr(),
                            phi_k: wk.as_ptr(),
                            phi_k_len: wk.len(),
                            phi_v: wv.as_ptr(),
                            phi_v_len: wv.len(),
                        };
                        if append_only {
                            (io.q, io.out) = (std::ptr::null(), std::ptr::null_mut());
                        }
                        if layer == 0 {
                            ok((a.cpu_run_layer)(c.cpu, c.cache, layer, &io));
                        } else {
                            let nth = 1 + i as u32 % 4;
                            let sh = Shared(&io, c.cpu, c.cache);
                            std::thread::scope(|s| {
                                for ith in 0..nth {
                                    let sh = &sh;
                                    s.spawn(move || ok((a.cpu_run_layer_part)(sh.1, sh.2, layer, sh.0, ith, nth)));
                                }
                            });
                        }
                        if append_only {
                            cpu.append_layer(&cache, layer, &d.k, &d.v, PhiWeights { k: wk, v: wv }).unwrap();
                            assert!(c_out.iter().all(|x| x.to_f32().is_nan()) && c_sel.iter().all(|&x| x == i32::MIN), "op {i}: append-only wrote");
                            continue;
                        }
                        let rio = LayerIo { q: &d.q, k: &d.k, v: &d.v, gates: &d.gates, out: &mut r_out, selected: Some(&mut r_sel) };
                        cpu.run_layer(&cache, layer, rio, PhiWeights { k: wk, v: wv }).unwrap();
                        assert!(r_out.iter().all(|x| x.to_f32().is_finite()), "op {i} layer {layer}: unwritten output");
                        assert!(bytes(&c_out) == bytes(&r_out), "op {i} layer {layer}: outputs differ");
                        assert_eq!(c_sel, r_sel, "op {i} layer {layer}: selections differ");
                        // A row whose own block is >= n had more candidates than it selects.
                        selection_matters |= c_sel.chunks(n).any(|r| r[n - 1] >= n as i32);
                    }
                    decoded += tokens;
                }
            }
        }
        // The bookkeeping (all but the atomically updated layer claims at the end).
        let (cm, rm) = (&c.arena.bytes()[handle_bytes..], cache.state_bytes());
        let diff = cm.iter().zip(rm).position(|(x, y)| x != y);
        assert!(cm.len() > rm.len() && diff.is_none(), "op {i}: cache metadata differs at byte {diff:?}");
        cache.check_invariants().unwrap();
        for s in 0..cfg.max_seqs {
            let mut len = u32::MAX;
            let st = unsafe { (a.cache_len)(c.cache, s, &mut len) };
            match cache.len(s) {
                Ok(l) => assert_eq!((st, len), (NSA_STATUS_OK, l), "op {i} seq {s}"),
                Err(_) => assert_eq!((st, len), (NSA_STATUS_UNKNOWN_SEQUENCE, u32::MAX), "op {i} seq {s}"),
            }
        }
        let mut stats = nsa_cache_stats_t { struct_size: std::mem::size_of::<nsa_cache_stats_t>() as u32, ..Default::default() };
        ok(unsafe { (a.cache_stats)(c.cache, &mut stats) });
        let s = cache.stats();
        assert_eq!(
            (stats.raw_pages, stats.raw_free, stats.cmp_pages, stats.cmp_free, stats.live_seqs),
            (s.raw_pages, s.raw_free, s.cmp_pages, s.cmp_free, s.live_seqs)
        );
    }
    assert!(decoded > 450, "the schedule ran {decoded} tokens");
    assert!(selection_matters, "no query had more candidate blocks than sel_count");
}

#[test]
fn f32_paper_weighted_phi_matches_rust_bit_for_bit() {
    round_trip::<f32>(&config(Preset::Paper, Dtype::F32, Phi::Weighted, 2), 1);
}

#[test]
fn bf16_fla_mean_phi_matches_rust_bit_for_bit() {
    round_trip::<bf16>(&config(Preset::Fla, Dtype::Bf16, Phi::Mean, 3), 2);
}

#[test]
fn f16_paper_mlp_phi_matches_rust_bit_for_bit() {
    round_trip::<f16>(&config(Preset::Paper, Dtype::F16, Phi::Mlp, 1), 3);
}

/// Calls on different caches may run at once (nsa.h "Thread safety"): four threads with
/// their own engines give what one thread gives.
#[test]
fn engines_on_different_threads_run_concurrently() {
    let cfg = config(Preset::Paper, Dtype::F32, Phi::Mean, 2);
    let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(move || round_trip::<f32>(&cfg, 9))).collect();
    for t in threads {
        t.join().unwrap();
    }
}
