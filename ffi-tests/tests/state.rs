//! The calls added for runtimes, through the loaded library's table: saving and restoring
//! one sequence (`nsa_cache_state_size`, `nsa_cpu_state_export` / `_import`), listing the
//! live sequences, phi weight counts, and reading why `nsa_get_api` refused.

mod common;
use common::*;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::{Cache, Config, Dtype, Phi, Preset, StepSeq};
use nsa_ffi_tests::*;

fn config() -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(4, 2, 32, 16);
    c.dtype = Dtype::F32;
    c.num_layers = 2;
    c.sel_count = 4;
    c.window = 40;
    c.phi = Phi::Weighted;
    c.max_seqs = 4;
    c.max_step_seqs = 4;
    c.max_seq_len = 300;
    c.max_step_tokens = 300;
    c.fit_pages();
    c
}

fn io(d: &LayerData<f32>, out: &mut [f32], w: &(Vec<f32>, Vec<f32>)) -> nsa_layer_io_t {
    nsa_layer_io_t {
        struct_size: std::mem::size_of::<nsa_layer_io_t>() as u32,
        dtype: NSA_DTYPE_F32,
        tokens: d.tokens as u32,
        flags: 0,
        q: d.q.as_ptr().cast(),
        k: d.k.as_ptr().cast(),
        v: d.v.as_ptr().cast(),
        gates: d.gates.as_ptr(),
        out: out.as_mut_ptr().cast(),
        selected: std::ptr::null_mut(),
        phi_k: w.0.as_ptr(),
        phi_k_len: w.0.len(),
        phi_v: w.1.as_ptr(),
        phi_v_len: w.1.len(),
    }
}

/// One step of `tokens` for `seq` on both engines, every layer; asserts equal outputs.
fn step(c: &CEngine, cache: &mut Cache, cpu: &mut CpuBackend, seq: u32, tokens: usize, w: &[(Vec<f32>, Vec<f32>)], rng: &mut Rng) {
    let a = api();
    let cfg = *cache.config();
    let (hq, _, _, dv) = dims(&cfg);
    unsafe { ok((a.cache_plan_step)(c.cache, &nsa_step_seq_t { seq, tokens: tokens as u32 }, 1)) };
    cache.plan_step(&[StepSeq { seq, tokens: tokens as u32 }]).unwrap();
    for l in 0..cfg.num_layers {
        let d = LayerData::<f32>::random(&cfg, tokens, rng);
        let (mut co, mut ro) = (vec![f32::NAN; tokens * hq * dv], vec![f32::NAN; tokens * hq * dv]);
        let wl = &w[l as usize];
        unsafe { ok((a.cpu_run_layer)(c.cpu, c.cache, l, &io(&d, &mut co, wl))) };
        let rio = LayerIo { q: &d.q, k: &d.k, v: &d.v, gates: &d.gates, out: &mut ro, selected: None };
        cpu.run_layer(cache, l, rio, PhiWeights { k: &wl.0, v: &wl.1 }).unwrap();
        assert!(ro.iter().all(|x| x.is_finite()));
        assert!(bytes(&co) == bytes(&ro), "seq {seq} layer {l}: the C engine and the Rust engine differ");
    }
}

fn sequences(c: &CEngine) -> Vec<u32> {
    let a = api();
    let mut n = u32::MAX;
    unsafe { ok((a.cache_sequences)(c.cache, std::ptr::null_mut(), 0, &mut n)) };
    let mut ids = vec![u32::MAX; n as usize + 1];
    let mut m = 0;
    unsafe { ok((a.cache_sequences)(c.cache, ids.as_mut_ptr(), ids.len() as u32, &mut m)) };
    assert_eq!(m, n);
    assert_eq!(ids[n as usize], u32::MAX, "wrote past the count");
    ids.truncate(n as usize);
    ids
}

#[test]
fn a_sequence_saved_through_c_restores_into_another_slot_and_matches_rust() {
    let a = api();
    let cfg = config();
    let c = CEngine::new(&nsa_config_t::from(&cfg));
    // Filled like CEngine's arena, so bytes the cache never writes (region padding) match.
    let mut arena = AlignedBuf::filled(Cache::arena_bytes(&cfg).unwrap(), 0xA5);
    let mut buf = AlignedBuf::new(CpuBackend::buffer_bytes(&cfg).unwrap());
    let (an, bn) = (arena.len(), buf.len());
    // SAFETY: the buffers outlive the cache and backend.
    let mut cache = Cache::new(&cfg, unsafe { std::slice::from_raw_parts_mut(arena.ptr(), an) }).unwrap();
    let mut cpu = CpuBackend::new(&cfg, unsafe { std::slice::from_raw_parts_mut(buf.ptr(), bn) }).unwrap();
    let mut rng = Rng::new(5);
    let w: Vec<_> = (0..cfg.num_layers).map(|_| phi_weights(&cfg, &mut rng)).collect();

    for s in [1, 0] {
        unsafe { ok((a.cache_add)(c.cache, s)) };
        cache.add_sequence(s).unwrap();
    }
    step(&c, &mut cache, &mut cpu, 1, 40, &w, &mut rng);
    step(&c, &mut cache, &mut cpu, 0, 117, &w, &mut rng);
    step(&c, &mut cache, &mut cpu, 0, 1, &w, &mut rng);
    assert_eq!(sequences(&c), vec![0, 1]);

    let mut size = 0usize;
    unsafe { ok((a.cache_state_size)(c.cache, 0, &mut size)) };
    assert_eq!(size, cache.sequence_state_bytes(0).unwrap());
    let mut saved = vec![0u8; size + 16];
    let mut written = 0usize;
    unsafe { ok((a.cpu_state_export)(c.cpu, c.cache, 0, saved.as_mut_ptr().cast(), saved.len(), &mut written)) };
    assert_eq!(written, size);
    let mut rust_saved = vec![0u8; size];
    cpu.export_sequence(&cache, 0, &mut rust_saved).unwrap();
    assert!(saved[..size] == rust_saved[..], "the C export differs from the Rust export");

    unsafe { ok((a.cache_remove)(c.cache, 0)) };
    cache.remove(0).unwrap();
    step(&c, &mut cache, &mut cpu, 1, 90, &w, &mut rng); // reuses the freed pages
    unsafe { ok((a.cpu_state_import)(c.cpu, c.cache, 3, saved.as_ptr().cast(), written)) };
    cpu.import_sequence(&mut cache, 3, &rust_saved).unwrap();
    assert_eq!(sequences(&c), vec![1, 3]);
    unsafe { ok((a.cache_check)(c.cache)) };
    let handle_bytes = c.arena.len() - an;
    // Every region but the last, the layer-claim words (`Cache::state_bytes`).
    let rb = cache.state_bytes();
    assert!(c.arena.bytes()[handle_bytes..][..rb.len()] == *rb, "cache metadata differs after import");
    for _ in 0..3 {
        step(&c, &mut cache, &mut cpu, 3, 1, &w, &mut rng);
    }
}

#[test]
fn bad_state_calls_fail_with_their_status_and_change_nothing() {
    let a = api();
    let cfg = config();
    let c = CEngine::new(&nsa_config_t::from(&cfg));
    unsafe {
        ok((a.cache_add)(c.cache, 2));
        ok((a.cache_plan_step)(c.cache, &nsa_step_seq_t { seq: 2, tokens: 70 }, 1));
    }
    let mut rng = Rng::new(6);
    let w: Vec<_> = (0..cfg.num_layers).map(|_| phi_weights(&cfg, &mut rng)).collect();
    for l in 0..cfg.num_layers {
        let d = LayerData::<f32>::random(&cfg, 70, &mut rng);
        let mut out = vec![0f32; 70 * 4 * 16];
        unsafe { ok((a.cpu_run_layer)(c.cpu, c.cache, l, &io(&d, &mut out, &w[l as usize]))) };
    }
    let mut size = 0usize;
    unsafe { ok((a.cache_state_size)(c.cache, 2, &mut size)) };
    let mut good = vec![0u8; size];
    let mut written = 0usize;
    unsafe { ok((a.cpu_state_export)(c.cpu, c.cache, 2, good.as_mut_ptr().cast(), size, &mut written)) };
    // The cache's metadata, after its handle (whose struct padding is never written).
    let meta = c.arena.len() - Cache::arena_bytes(&cfg).unwrap();
    let snapshot = c.arena.bytes()[meta..].to_vec();
    let inside = (c.arena.bytes().as_ptr() as usize + c.arena.len() - 8) as *const u8;
    let expect = |st: nsa_status, want: nsa_status, text: &str, what: &str| {
        assert_eq!(st, want, "{what}: {} ({})", status_name(st), last_error());
        assert!(last_error().contains(text), "{what}: {}", last_error());
        assert!(c.arena.bytes()[meta..] == snapshot[..], "{what}: the arena changed");
    };
    unsafe {
        let mut small = vec![7u8; size - 1];
        let mut w2 = 12345usize;
        expect((a.cpu_state_export)(c.cpu, c.cache, 2, small.as_mut_ptr().cast(), small.len(), &mut w2), NSA_STATUS_BUFFER_TOO_SMALL, "state buffer", "small");
        assert!(small.iter().all(|&b| b == 7) && w2 == 12345, "a failed export wrote its outputs");
        expect((a.cpu_state_export)(c.cpu, c.cache, 2, std::ptr::null_mut(), size, &mut w2), NSA_STATUS_NULL_POINTER, "buf", "null buf");
        expect((a.cpu_state_export)(c.cpu, c.cache, 1, good.as_mut_ptr().cast(), size, &mut w2), NSA_STATUS_UNKNOWN_SEQUENCE, "1", "not live");
        expect((a.cpu_state_import)(c.cpu, c.cache, 0, inside.cast(), 8), NSA_STATUS_INVALID_ARGUMENT, "overlaps", "buf in the arena");
        expect((a.cpu_state_import)(c.cpu, c.cache, 2, good.as_ptr().cast(), size), NSA_STATUS_SEQUENCE_EXISTS, "2", "live slot");
        expect((a.cpu_state_import)(c.cpu, c.cache, 9, good.as_ptr().cast(), size), NSA_STATUS_INVALID_ARGUMENT, "seq = 9", "slot range");
        expect((a.cpu_state_import)(c.cpu, c.cache, 0, good.as_ptr().cast(), size - 1), NSA_STATUS_INVALID_ARGUMENT, "truncated", "truncated");
        let mut bad = good.clone();
        bad[0] = b'X';
        expect((a.cpu_state_import)(c.cpu, c.cache, 0, bad.as_ptr().cast(), size), NSA_STATUS_INVALID_ARGUMENT, "magic", "magic");
        // Another config: a cache of head_dim_qk 64 refuses it, naming the field.
        let mut other = cfg;
        other.head_dim_qk = 64;
        let o = CEngine::new(&nsa_config_t::from(&other));
        let st = (a.cpu_state_import)(o.cpu, o.cache, 0, good.as_ptr().cast(), size);
        assert_eq!(st, NSA_STATUS_INVALID_ARGUMENT);
        assert!(last_error().contains("head_dim_qk = 32") && last_error().contains("64"), "{}", last_error());
        // The CUDA calls exist in every build: without a backend they fail cleanly.
        let st = (a.cuda_state_export)(std::ptr::null_mut(), c.cache, 2, good.as_mut_ptr().cast(), size, &mut w2, std::ptr::null_mut());
        assert!(st == NSA_STATUS_BACKEND_UNAVAILABLE || st == NSA_STATUS_NULL_POINTER, "{}", status_name(st));
        let st = (a.cuda_state_import)(std::ptr::null_mut(), c.cache, 0, good.as_ptr().cast(), size, std::ptr::null_mut());
        assert!(st == NSA_STATUS_BACKEND_UNAVAILABLE || st == NSA_STATUS_NULL_POINTER, "{}", status_name(st));
        assert!(c.arena.bytes()[meta..] == snapshot[..]);
        // The good buffer still restores.
        ok((a.cpu_state_import)(c.cpu, c.cache, 0, good.as_ptr().cast(), size));
    }
}

#[test]
fn sequences_count_query_and_short_buffer() {
    let a = api();
    let c = CEngine::new(&nsa_config_t::from(&config()));
    unsafe {
        for s in [3, 0, 2] {
            ok((a.cache_add)(c.cache, s));
        }
        let mut n = 0u32;
        ok((a.cache_sequences)(c.cache, std::ptr::null_mut(), 0, &mut n));
        assert_eq!(n, 3);
        let mut ids = [u32::MAX; 2];
        let mut m = 99u32;
        let st = (a.cache_sequences)(c.cache, ids.as_mut_ptr(), 2, &mut m);
        assert_eq!(st, NSA_STATUS_BUFFER_TOO_SMALL, "{}", last_error());
        assert_eq!((ids, m), ([u32::MAX; 2], 99), "a failed call wrote its outputs");
        let mut ids = [u32::MAX; 4];
        ok((a.cache_sequences)(c.cache, ids.as_mut_ptr(), 4, &mut m));
        assert_eq!((m, ids), (3, [0, 2, 3, u32::MAX]));
        assert_eq!((a.cache_sequences)(c.cache, ids.as_mut_ptr(), 4, std::ptr::null_mut()), NSA_STATUS_NULL_POINTER);
    }
}

#[test]
fn phi_weight_len_matches_the_rust_config() {
    let a = api();
    for phi in [Phi::Mean, Phi::Weighted, Phi::Linear, Phi::Mlp] {
        for pe in [false, true] {
            let mut cfg = config().with_shape(4, 2, 32, 16);
            cfg.phi = phi;
            cfg.phi_pe = pe;
            cfg.phi_hidden = 24;
            let cc = nsa_config_t::from(&cfg);
            for (side, d) in [(NSA_PHI_SIDE_K, cfg.head_dim_qk), (NSA_PHI_SIDE_V, cfg.head_dim_v)] {
                let mut n = usize::MAX;
                ok(unsafe { (a.phi_weight_len)(&cc, side, &mut n) });
                assert_eq!(n, cfg.phi_weight_len(d), "{phi:?} pe={pe} side {side}");
            }
        }
    }
    // Linear, K side, no pe: HKV * l * DK * DK = 2 * 32 * 32 * 32.
    let mut cfg = config();
    cfg.phi = Phi::Linear;
    let mut n = 0;
    ok(unsafe { (a.phi_weight_len)(&nsa_config_t::from(&cfg), NSA_PHI_SIDE_K, &mut n) });
    assert_eq!(n, 2 * 32 * 32 * 32);
    let st = unsafe { (a.phi_weight_len)(&nsa_config_t::from(&cfg), 2, &mut n) };
    assert_eq!(st, NSA_STATUS_INVALID_ARGUMENT);
    assert!(last_error().contains("side"), "{}", last_error());
}

#[test]
fn presets_derive_scale_from_head_dim() {
    let a = api();
    let mut c = preset(NSA_PRESET_PAPER);
    assert_eq!(c.scale, 0.0);
    assert_eq!(c.cpu_threads, 1);
    c.head_dim_qk = 64;
    ok(unsafe { (a.config_validate)(&c) });
    assert_eq!(Config::try_from(&c).unwrap().softmax_scale(), 0.125);
}

#[test]
fn why_get_api_refused_is_readable_without_the_table() {
    let l = lib();
    assert!((l.get_api)(NSA_ABI_VERSION + 98).is_null());
    let why = l.last_error_by_symbol();
    assert!(why.contains(&format!("abi_version = {}", NSA_ABI_VERSION + 98)) && why.contains("implements ABI version"), "{why}");
}
