//! Every bad-input path of the C ABI, driven through the `nsa_get_api` table of the loaded
//! library: each call must return the documented status, leave a last-error message that
//! names the function, the argument and the value, and change nothing (the cache arena,
//! the backend buffer and every output are byte for byte as before).

mod common;
use common::*;
use nsa::{Config, Dtype, Phi, Preset};
use nsa_ffi_tests::*;
use std::ptr::{null, null_mut};

const IO_SIZE: u32 = std::mem::size_of::<nsa_layer_io_t>() as u32;
const CFG_SIZE: u32 = std::mem::size_of::<nsa_config_t>() as u32;

/// Asserts a failure: status, and a message starting with `func` that contains `parts`.
#[track_caller]
fn failed(st: nsa_status, want: nsa_status, func: &str, parts: &[&str]) {
    assert_eq!(status_name(st), status_name(want), "{}", last_error());
    message(func, parts);
}

/// Asserts that the last error starts with `func` and contains `parts`.
#[track_caller]
fn message(func: &str, parts: &[&str]) {
    let msg = last_error();
    assert!(msg.starts_with(&format!("{func}: ")), "message does not name {func}: {msg}");
    for p in parts {
        assert!(msg.contains(p), "message lacks {p:?}: {msg}");
    }
}

fn small_config() -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(4, 2, 16, 16);
    c.dtype = Dtype::F32;
    c.sel_count = 4;
    c.window = 32;
    c.phi = Phi::Weighted;
    c.num_layers = 2;
    c.max_seqs = 4;
    c.max_step_seqs = 4;
    c.max_seq_len = 256;
    c.max_step_tokens = 300;
    c.cpu_threads = 2;
    c.fit_pages();
    c
}

/// An engine with sequences 0 (41 tokens) and 1 (22 tokens) and a planned step of 3
/// tokens whose layers have not run, plus valid arrays for that step.
struct Fx {
    cfg: Config,
    e: CEngine,
    d: LayerData<f32>,
    w: (Vec<f32>, Vec<f32>),
    out: Vec<f32>,
    sel: Vec<i32>,
}

impl Fx {
    fn new() -> Fx {
        Fx::with(small_config())
    }

    fn with(cfg: Config) -> Fx {
        let mut rng = Rng::new(7);
        let e = CEngine::new(&nsa_config_t::from(&cfg));
        let w = phi_weights(&cfg, &mut rng);
        let mut fx = Fx { cfg, e, d: LayerData::random(&cfg, 3, &mut rng), w, out: vec![], sel: vec![] };
        let a = api();
        unsafe {
            ok((a.cache_add)(fx.e.cache, 0));
            ok((a.cache_add)(fx.e.cache, 1));
        }
        fx.step(&[(0, 40), (1, 20)]);
        fx.step(&[(0, 1), (1, 2)]);
        fx.plan(&[(0, 1), (1, 2)]);
        fx
    }

    fn plan(&mut self, entries: &[(u32, u32)]) {
        let e: Vec<nsa_step_seq_t> = entries.iter().map(|&(seq, tokens)| nsa_step_seq_t { seq, tokens }).collect();
        ok(unsafe { (api().cache_plan_step)(self.e.cache, e.as_ptr(), e.len() as u32) });
        let tokens: u32 = entries.iter().map(|e| e.1).sum();
        self.d = LayerData::random(&self.cfg, tokens as usize, &mut Rng::new(tokens as u64));
        let (hq, hkv, _, dv) = dims(&self.cfg);
        self.out = vec![f32::NAN; tokens as usize * hq * dv];
        self.sel = vec![-7; tokens as usize * hkv * self.cfg.sel_count as usize];
    }

    /// Plans and runs a full step.
    fn step(&mut self, entries: &[(u32, u32)]) {
        self.plan(entries);
        for layer in 0..self.cfg.num_layers {
            let io = self.io();
            ok(unsafe { (api().cpu_run_layer)(self.e.cpu, self.e.cache, layer, &io) });
        }
    }

    /// Runs the layers of the planned step that have not run yet.
    fn finish(&mut self, from: u32) {
        for layer in from..self.cfg.num_layers {
            let io = self.io();
            ok(unsafe { (api().cpu_run_layer)(self.e.cpu, self.e.cache, layer, &io) });
        }
    }

    /// Valid arrays for the planned step.
    fn io(&mut self) -> nsa_layer_io_t {
        nsa_layer_io_t {
            struct_size: IO_SIZE,
            dtype: NSA_DTYPE_F32,
            tokens: self.d.tokens as u32,
            flags: 0,
            q: self.d.q.as_ptr().cast(),
            k: self.d.k.as_ptr().cast(),
            v: self.d.v.as_ptr().cast(),
            gates: self.d.gates.as_ptr(),
            out: self.out.as_mut_ptr().cast(),
            selected: self.sel.as_mut_ptr(),
            phi_k: self.w.0.as_ptr(),
            phi_k_len: self.w.0.len(),
            phi_v: self.w.1.as_ptr(),
            phi_v_len: self.w.1.len(),
        }
    }

    fn snapshot(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<i32>) {
        (self.e.arena.bytes().to_vec(), self.e.buf.bytes().to_vec(), bytes(&self.out).to_vec(), self.sel.clone())
    }

    /// Runs `call`, which must fail with `want` naming `parts`, and checks that the cache
    /// arena, the backend buffer and the layer outputs are unchanged.
    #[track_caller]
    fn fails(&mut self, want: nsa_status, func: &str, parts: &[&str], call: impl FnOnce(&mut Fx) -> nsa_status) {
        let before = self.snapshot();
        let st = call(self);
        failed(st, want, func, parts);
        let after = self.snapshot();
        assert!(before.0 == after.0, "{func}: the cache arena changed on failure");
        assert!(before.1 == after.1, "{func}: the backend buffer changed on failure");
        assert!(before.2 == after.2 && before.3 == after.3, "{func}: outputs written on failure");
    }

    /// `nsa_cpu_run_layer` of layer 0 with `edit` applied to valid arrays.
    fn run_with(&mut self, edit: impl FnOnce(&mut nsa_layer_io_t)) -> nsa_status {
        let mut io = self.io();
        edit(&mut io);
        unsafe { (api().cpu_run_layer)(self.e.cpu, self.e.cache, 0, &io) }
    }
}

#[test]
fn unsupported_abi_versions_get_no_table() {
    let l = lib();
    for v in [0, 1, 3, u32::MAX] {
        assert!((l.get_api)(v).is_null(), "nsa_get_api({v})");
        message("nsa_get_api", &[&format!("abi_version = {v}"), &format!("ABI version {NSA_ABI_VERSION} only")]);
    }
    assert_eq!((l.get_api)(NSA_ABI_VERSION), l.api as *const nsa_api_v2);
}

#[test]
fn config_calls_check_pointers_and_struct_size() {
    let a = api();
    let good = nsa_config_t::from(&small_config());
    let mut size = 0usize;
    unsafe {
        failed((a.config_preset)(NSA_PRESET_PAPER, null_mut()), NSA_STATUS_NULL_POINTER, "nsa_config_preset", &["out is NULL"]);
        failed((a.config_validate)(null()), NSA_STATUS_NULL_POINTER, "nsa_config_validate", &["cfg is NULL"]);
        failed((a.config_fit_pages)(null_mut()), NSA_STATUS_NULL_POINTER, "nsa_config_fit_pages", &["cfg is NULL"]);
        failed((a.cache_arena_size)(null(), &mut size), NSA_STATUS_NULL_POINTER, "nsa_cache_arena_size", &["cfg is NULL"]);
        failed((a.cache_arena_size)(&good, null_mut()), NSA_STATUS_NULL_POINTER, "nsa_cache_arena_size", &["out is NULL"]);
        failed((a.cpu_buffer_size)(null(), &mut size), NSA_STATUS_NULL_POINTER, "nsa_cpu_buffer_size", &["cfg is NULL"]);
        failed((a.cpu_buffer_size)(&good, null_mut()), NSA_STATUS_NULL_POINTER, "nsa_cpu_buffer_size", &["out is NULL"]);
        assert_eq!(size, 0, "out written on failure");

        // Unknown preset: the output is not written.
        let mut c = empty_config();
        let before = c;
        failed((a.config_preset)(99, &mut c), NSA_STATUS_INVALID_ARGUMENT, "nsa_config_preset", &["preset = 99"]);
        assert_eq!(c, before);

        // struct_size too small or implausibly large, on input and output structs.
        for bad in [0u32, 4, CFG_SIZE - 4, 1 << 20] {
            let mut c = good;
            c.struct_size = bad;
            let want = format!("cfg->struct_size = {bad}");
            failed((a.config_validate)(&c), NSA_STATUS_BAD_STRUCT_SIZE, "nsa_config_validate", &[&want, "sizeof(nsa_config_t)"]);
            failed((a.cache_arena_size)(&c, &mut size), NSA_STATUS_BAD_STRUCT_SIZE, "nsa_cache_arena_size", &[&want]);
            failed((a.cpu_buffer_size)(&c, &mut size), NSA_STATUS_BAD_STRUCT_SIZE, "nsa_cpu_buffer_size", &[&want]);
            failed((a.config_fit_pages)(&mut c), NSA_STATUS_BAD_STRUCT_SIZE, "nsa_config_fit_pages", &[&want]);
            let mut o = empty_config();
            o.struct_size = bad;
            let before = o;
            failed((a.config_preset)(NSA_PRESET_FLA, &mut o), NSA_STATUS_BAD_STRUCT_SIZE, "nsa_config_preset", &[&format!("out->struct_size = {bad}")]);
            assert_eq!(o, before, "output written on failure");
        }
        assert_eq!(size, 0, "out written on failure");
    }
}

/// A struct from a newer header: this library's fields followed by more. Zero extra bytes
/// are accepted (on input) and written as zero (on output); non-zero ones are refused.
#[repr(C)]
#[derive(Clone, Copy)]
struct Newer<T> {
    known: T,
    extra: [u32; 4],
}

#[test]
fn larger_struct_size_is_accepted_when_the_unknown_tail_is_zero() {
    let a = api();
    let size = std::mem::size_of::<Newer<nsa_config_t>>() as u32;
    let mut n = Newer { known: nsa_config_t::from(&small_config()), extra: [0; 4] };
    n.known.struct_size = size;
    let (mut with_tail, mut plain) = (0usize, 0usize);
    unsafe {
        ok((a.config_validate)(&n.known));
        ok((a.cache_arena_size)(&n.known, &mut with_tail));
        ok((a.cache_arena_size)(&nsa_config_t::from(&small_config()), &mut plain));
        assert_eq!(with_tail, plain);
        n.extra[2] = 1;
        let byte = CFG_SIZE + 8;
        failed((a.config_validate)(&n.known), NSA_STATUS_BAD_STRUCT_SIZE, "nsa_config_validate", &[&format!("byte {byte} is not zero")]);

        // Output: the library writes its fields, keeps struct_size and zeroes the tail.
        let mut o = Newer { known: empty_config(), extra: [0xdead_beef; 4] };
        o.known.struct_size = size;
        ok((a.config_preset)(NSA_PRESET_FLA, &mut o.known));
        assert_eq!(o.extra, [0; 4]);
        assert_eq!(o.known.struct_size, size);
        let mut want = nsa_config_t::from(&Config::preset(Preset::Fla));
        want.struct_size = size;
        assert_eq!(o.known, want);
    }
    // Layer arrays from a newer header, zero tail: the run goes through.
    let mut fx = Fx::new();
    let mut io = Newer { known: fx.io(), extra: [0; 4] };
    io.known.struct_size = std::mem::size_of::<Newer<nsa_layer_io_t>>() as u32;
    ok(unsafe { (a.cpu_run_layer)(fx.e.cpu, fx.e.cache, 0, &io.known) });
    assert!(fx.out.iter().all(|x| x.is_finite()));
    io.extra[0] = 5;
    let want = format!("byte {IO_SIZE} is not zero");
    fx.fails(NSA_STATUS_BAD_STRUCT_SIZE, "nsa_cpu_run_layer", &[&want], |fx| unsafe { (a.cpu_run_layer)(fx.e.cpu, fx.e.cache, 1, &io.known) });
}

#[test]
fn invalid_configs_name_the_field_and_value() {
    let a = api();
    let base = nsa_config_t::from(&small_config());
    type Edit = fn(&mut nsa_config_t);
    let cases: [(&str, Edit); 6] = [
        ("num_q_heads = 3: must be a multiple of num_kv_heads = 2", |c| c.num_q_heads = 3),
        ("dtype = 7", |c| c.dtype = 7),
        ("phi = 9", |c| c.phi = 9),
        ("phi_pe = 2: must be 0 or 1", |c| c.phi_pe = 2),
        ("page_size = 96: must be a multiple of sel_block = 64", |c| c.page_size = 96),
        ("scale = NaN", |c| c.scale = f32::NAN),
    ];
    for (want, edit) in cases {
        let mut c = base;
        edit(&mut c);
        let mut size = 0usize;
        unsafe {
            failed((a.config_validate)(&c), NSA_STATUS_INVALID_CONFIG, "nsa_config_validate", &["invalid config: ", want]);
            failed((a.cache_arena_size)(&c, &mut size), NSA_STATUS_INVALID_CONFIG, "nsa_cache_arena_size", &[want]);
            failed((a.cpu_buffer_size)(&c, &mut size), NSA_STATUS_INVALID_CONFIG, "nsa_cpu_buffer_size", &[want]);
            let mut arena = AlignedBuf::filled(1 << 20, 0xA5);
            let mut h = 0x1234 as *mut nsa_cache;
            failed((a.cache_init)(&c, arena.ptr().cast(), arena.len(), &mut h), NSA_STATUS_INVALID_CONFIG, "nsa_cache_init", &[want]);
            assert!(arena.bytes().iter().all(|&b| b == 0xA5) && h as usize == 0x1234, "written on failure");
        }
        assert_eq!(size, 0);
    }
    // fit_pages agrees with the Rust API and touches only the two pool sizes.
    let mut c = base;
    c.max_seq_len = 1000;
    c.num_pages = 1;
    ok(unsafe { (a.config_fit_pages)(&mut c) });
    let mut r = small_config();
    r.max_seq_len = 1000;
    r.fit_pages();
    assert_eq!(c, nsa_config_t::from(&r));
}

#[test]
fn cache_init_checks_arena_and_leaves_it_untouched() {
    let a = api();
    let cfg = nsa_config_t::from(&small_config());
    let mut need = 0usize;
    ok(unsafe { (a.cache_arena_size)(&cfg, &mut need) });
    let mut arena = AlignedBuf::filled(need + 64, 0xA5);
    let sentinel = 0x5150 as *mut nsa_cache;
    let mut h = sentinel;
    let untouched = |arena: &AlignedBuf, h: *mut nsa_cache| {
        assert!(arena.bytes().iter().all(|&b| b == 0xA5), "arena written on failure");
        assert_eq!(h, sentinel, "handle written on failure");
    };
    unsafe {
        failed((a.cache_init)(null(), arena.ptr().cast(), need, &mut h), NSA_STATUS_NULL_POINTER, "nsa_cache_init", &["cfg is NULL"]);
        failed((a.cache_init)(&cfg, null_mut(), need, &mut h), NSA_STATUS_NULL_POINTER, "nsa_cache_init", &["arena is NULL"]);
        failed((a.cache_init)(&cfg, arena.ptr().cast(), need, null_mut()), NSA_STATUS_NULL_POINTER, "nsa_cache_init", &["out is NULL"]);
        untouched(&arena, h);
        let small = format!("arena has {} bytes, needs {need}", need - 1);
        failed((a.cache_init)(&cfg, arena.ptr().cast(), need - 1, &mut h), NSA_STATUS_BUFFER_TOO_SMALL, "nsa_cache_init", &[&small]);
        failed((a.cache_init)(&cfg, arena.ptr().cast(), 0, &mut h), NSA_STATUS_BUFFER_TOO_SMALL, "nsa_cache_init", &["arena has 0 bytes"]);
        let odd = arena.ptr().add(8);
        let mis = format!("arena at address {:#x} must be aligned to 16 bytes", odd as usize);
        failed((a.cache_init)(&cfg, odd.cast(), need, &mut h), NSA_STATUS_MISALIGNED, "nsa_cache_init", &[&mis]);
        untouched(&arena, h);
        ok((a.cache_init)(&cfg, arena.ptr().cast(), need, &mut h));
        assert_eq!(h as usize, arena.ptr() as usize, "the handle lives at the start of the arena");
    }
}

#[test]
fn cpu_backend_create_checks_buffer_and_leaves_it_untouched() {
    let a = api();
    let cfg = nsa_config_t::from(&small_config());
    let mut need = 0usize;
    ok(unsafe { (a.cpu_buffer_size)(&cfg, &mut need) });
    let mut buf = AlignedBuf::filled(need + 64, 0x3C);
    let sentinel = 0x5150 as *mut nsa_cpu_backend;
    let mut h = sentinel;
    unsafe {
        failed((a.cpu_backend_create)(null(), buf.ptr().cast(), need, &mut h), NSA_STATUS_NULL_POINTER, "nsa_cpu_backend_create", &["cfg is NULL"]);
        failed((a.cpu_backend_create)(&cfg, null_mut(), need, &mut h), NSA_STATUS_NULL_POINTER, "nsa_cpu_backend_create", &["buf is NULL"]);
        failed((a.cpu_backend_create)(&cfg, buf.ptr().cast(), need, null_mut()), NSA_STATUS_NULL_POINTER, "nsa_cpu_backend_create", &["out is NULL"]);
        let small = format!("buf has {} bytes, needs {need}", need - 1);
        failed((a.cpu_backend_create)(&cfg, buf.ptr().cast(), need - 1, &mut h), NSA_STATUS_BUFFER_TOO_SMALL, "nsa_cpu_backend_create", &[&small]);
        failed((a.cpu_backend_create)(&cfg, buf.ptr().add(4).cast(), need, &mut h), NSA_STATUS_MISALIGNED, "nsa_cpu_backend_create", &["buf at address", "aligned to 16"]);
        let mut bad = cfg;
        bad.cpu_threads = 0;
        failed((a.cpu_backend_create)(&bad, buf.ptr().cast(), need, &mut h), NSA_STATUS_INVALID_CONFIG, "nsa_cpu_backend_create", &["cpu_threads = 0"]);
        assert!(buf.bytes().iter().all(|&b| b == 0x3C) && h == sentinel, "written on failure");
        ok((a.cpu_backend_create)(&cfg, buf.ptr().cast(), need, &mut h));
        (a.cpu_backend_destroy)(h);
        (a.cpu_backend_destroy)(h); // already destroyed: ignored
        (a.cpu_backend_destroy)(null_mut());
    }
}

#[test]
fn handles_are_checked() {
    let a = api();
    let mut fx = Fx::new();
    let mut len = 0u32;
    let mut stats = nsa_cache_stats_t { struct_size: std::mem::size_of::<nsa_cache_stats_t>() as u32, ..Default::default() };
    let mut cfg_out = empty_config();
    let e = [nsa_step_seq_t { seq: 0, tokens: 1 }];
    let null_cache = "cache is NULL";
    unsafe {
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_add", &[null_cache], |_| (a.cache_add)(null_mut(), 2));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_fork", &[null_cache], |_| (a.cache_fork)(null_mut(), 0, 2));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_truncate", &[null_cache], |_| (a.cache_truncate)(null_mut(), 0, 1));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_remove", &[null_cache], |_| (a.cache_remove)(null_mut(), 0));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_len", &[null_cache], |_| (a.cache_len)(null(), 0, &mut len));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_stats", &[null_cache], |_| (a.cache_stats)(null(), &mut stats));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_config", &[null_cache], |_| (a.cache_config)(null(), &mut cfg_out));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_plan_step", &[null_cache], |_| (a.cache_plan_step)(null_mut(), e.as_ptr(), 1));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cpu_run_layer", &[null_cache], |fx| {
            let io = fx.io();
            (a.cpu_run_layer)(fx.e.cpu, null(), 0, &io)
        });
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cpu_run_layer", &["backend is NULL"], |fx| {
            let io = fx.io();
            (a.cpu_run_layer)(null_mut(), fx.e.cache, 0, &io)
        });
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cpu_run_layer", &["io is NULL"], |fx| (a.cpu_run_layer)(fx.e.cpu, fx.e.cache, 0, null()));

        // Memory that never held a cache, and a misaligned handle.
        let mut junk = AlignedBuf::new(1 << 12);
        let fake = junk.ptr().cast::<nsa_cache>();
        fx.fails(NSA_STATUS_INVALID_HANDLE, "nsa_cache_add", &[&format!("cache = {fake:p} is not a live nsa_cache")], |_| (a.cache_add)(fake, 2));
        fx.fails(NSA_STATUS_INVALID_HANDLE, "nsa_cache_len", &["not a live nsa_cache"], |_| (a.cache_len)(fake, 0, &mut len));
        let fake_cpu = junk.ptr().cast::<nsa_cpu_backend>();
        fx.fails(NSA_STATUS_INVALID_HANDLE, "nsa_cpu_run_layer", &["backend = ", "not a live nsa_cpu_backend"], |fx| {
            let io = fx.io();
            (a.cpu_run_layer)(fake_cpu, fx.e.cache, 0, &io)
        });
        let odd = fx.e.cache.cast::<u8>().add(4).cast::<nsa_cache>();
        fx.fails(NSA_STATUS_MISALIGNED, "nsa_cache_remove", &["cache at address", "aligned to 8"], |_| (a.cache_remove)(odd, 0));
        assert_eq!(len, 0, "out written on failure");
        assert!(junk.bytes().iter().all(|&b| b == 0));
    }
}

#[test]
fn ended_handles_are_refused() {
    let a = api();
    let mut fx = Fx::new();
    unsafe {
        (a.cache_deinit)(fx.e.cache);
        (a.cache_deinit)(fx.e.cache); // twice: ignored
        (a.cache_deinit)(null_mut());
        let mut len = 0;
        failed((a.cache_len)(fx.e.cache, 0, &mut len), NSA_STATUS_INVALID_HANDLE, "nsa_cache_len", &["not a live nsa_cache"]);
        let io = fx.io();
        failed((a.cpu_run_layer)(fx.e.cpu, fx.e.cache, 0, &io), NSA_STATUS_INVALID_HANDLE, "nsa_cpu_run_layer", &["cache = "]);
        (a.cpu_backend_destroy)(fx.e.cpu);
        failed((a.cpu_run_layer)(fx.e.cpu, fx.e.cache, 0, &io), NSA_STATUS_INVALID_HANDLE, "nsa_cpu_run_layer", &["not a live nsa_cpu_backend"]);
        fx.e.cpu = null_mut();
        // The arena can be initialized again.
        ok((a.cache_init)(&fx.e.cfg, fx.e.arena.ptr().cast(), fx.e.arena.len(), &mut fx.e.cache));
        failed((a.cache_len)(fx.e.cache, 0, &mut len), NSA_STATUS_UNKNOWN_SEQUENCE, "nsa_cache_len", &["0 is not an active sequence"]);
    }
}

#[test]
fn sequence_operations_refuse_bad_ids_and_change_nothing() {
    let a = api();
    let mut fx = Fx::new();
    let mut len = 0u32;
    unsafe {
        // The planned step is open: every mutating call refuses, naming it.
        let open = ["step 3 is still open", "layers 0, 1 of 0..2 have not run", "positions 41..42 of sequence 0, 22..24 of sequence 1"];
        fx.fails(NSA_STATUS_STEP_OPEN, "nsa_cache_add", &open, |fx| (a.cache_add)(fx.e.cache, 2));
        fx.fails(NSA_STATUS_STEP_OPEN, "nsa_cache_fork", &open, |fx| (a.cache_fork)(fx.e.cache, 0, 2));
        fx.fails(NSA_STATUS_STEP_OPEN, "nsa_cache_truncate", &open, |fx| (a.cache_truncate)(fx.e.cache, 0, 41));
        fx.fails(NSA_STATUS_STEP_OPEN, "nsa_cache_remove", &open, |fx| (a.cache_remove)(fx.e.cache, 1));
        fx.fails(NSA_STATUS_STEP_OPEN, "nsa_cache_check", &open, |fx| (a.cache_check)(fx.e.cache));
        let io = fx.io();
        ok((a.cpu_run_layer)(fx.e.cpu, fx.e.cache, 1, &io));
        let open = ["step 3 is still open", "layer 0 of 0..2 has not run"];
        fx.fails(NSA_STATUS_STEP_OPEN, "nsa_cache_add", &open, |fx| (a.cache_add)(fx.e.cache, 2));
        ok(fx.run_with(|_| ()));
        ok((a.cache_check)(fx.e.cache));
        fx.fails(NSA_STATUS_SEQUENCE_EXISTS, "nsa_cache_add", &["sequence 1 already exists"], |fx| (a.cache_add)(fx.e.cache, 1));
        fx.fails(NSA_STATUS_INVALID_ARGUMENT, "nsa_cache_add", &["seq = 4: sequence ids are 0..4"], |fx| (a.cache_add)(fx.e.cache, 4));
        fx.fails(NSA_STATUS_UNKNOWN_SEQUENCE, "nsa_cache_fork", &["3 is not an active sequence"], |fx| (a.cache_fork)(fx.e.cache, 3, 2));
        fx.fails(NSA_STATUS_SEQUENCE_EXISTS, "nsa_cache_fork", &["sequence 1 already exists"], |fx| (a.cache_fork)(fx.e.cache, 0, 1));
        fx.fails(NSA_STATUS_INVALID_ARGUMENT, "nsa_cache_fork", &["dst = 9"], |fx| (a.cache_fork)(fx.e.cache, 0, 9));
        fx.fails(NSA_STATUS_INVALID_ARGUMENT, "nsa_cache_fork", &["src = 4"], |fx| (a.cache_fork)(fx.e.cache, 4, 2));
        fx.fails(NSA_STATUS_UNKNOWN_SEQUENCE, "nsa_cache_truncate", &["2 is not an active sequence"], |fx| (a.cache_truncate)(fx.e.cache, 2, 0));
        fx.fails(NSA_STATUS_INVALID_ARGUMENT, "nsa_cache_truncate", &["new_len = 43: must be <= the sequence's length 42"], |fx| {
            (a.cache_truncate)(fx.e.cache, 0, 43)
        });
        fx.fails(NSA_STATUS_UNKNOWN_SEQUENCE, "nsa_cache_remove", &["3 is not an active sequence"], |fx| (a.cache_remove)(fx.e.cache, 3));
        fx.fails(NSA_STATUS_INVALID_ARGUMENT, "nsa_cache_remove", &["seq = 100"], |fx| (a.cache_remove)(fx.e.cache, 100));
        fx.fails(NSA_STATUS_UNKNOWN_SEQUENCE, "nsa_cache_len", &["2 is not an active sequence"], |fx| (a.cache_len)(fx.e.cache, 2, &mut len));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_len", &["out is NULL"], |fx| (a.cache_len)(fx.e.cache, 0, null_mut()));
        assert_eq!(len, 0, "out written on failure");

        let mut stats = nsa_cache_stats_t { struct_size: 8, raw_free: 77, ..Default::default() };
        fx.fails(NSA_STATUS_BAD_STRUCT_SIZE, "nsa_cache_stats", &["out->struct_size = 8", "sizeof(nsa_cache_stats_t) = 24"], |fx| {
            (a.cache_stats)(fx.e.cache, &mut stats)
        });
        assert_eq!(stats.raw_free, 77, "out written on failure");
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_stats", &["out is NULL"], |fx| (a.cache_stats)(fx.e.cache, null_mut()));
        let mut c = empty_config();
        c.struct_size = 3;
        fx.fails(NSA_STATUS_BAD_STRUCT_SIZE, "nsa_cache_config", &["out->struct_size = 3"], |fx| (a.cache_config)(fx.e.cache, &mut c));
        fx.fails(NSA_STATUS_NULL_POINTER, "nsa_cache_config", &["out is NULL"], |fx| (a.cache_config)(fx.e.cache, null_mut()));

        // None of the failures above ended the complete step: its layers are still
        // counted as run.
        fx.fails(NSA_STATUS_LAYER_ALREADY_RUN, "nsa_cpu_run_layer", &["layer 0 already ran in step 3"], |fx| fx.run_with(|_| ()));
        ok((a.cache_len)(fx.e.cache, 0, &mut len));
        assert_eq!(len, 42);
        c.struct_size = CFG_SIZE;
        ok((a.cache_config)(fx.e.cache, &mut c));
        assert_eq!(c, fx.e.cfg);
    }
}

#[test]
fn plans_are_checked_and_all_or_nothing() {
    let a = api();
    let mut fx = Fx::new();
    let plan = |fx: &mut Fx, e: &[(u32, u32)]| {
        let e: Vec<nsa_step_seq_t> = e.iter().map(|&(seq, tokens)| nsa_step_seq_t { seq, tokens }).collect();
        unsafe { (a.cache_plan_step)(fx.e.cache, e.as_ptr(), e.len() as u32) }
    };
    let f = "nsa_cache_plan_step";
    fx.fails(NSA_STATUS_STEP_OPEN, f, &["step 3 is still open", "layers 0, 1 of 0..2 have not run"], |fx| plan(fx, &[(0, 1)]));
    fx.finish(0);
    fx.fails(NSA_STATUS_NULL_POINTER, f, &["entries is NULL"], |fx| unsafe { (a.cache_plan_step)(fx.e.cache, null(), 1) });
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["entries.len = 0", "1..=4 sequences"], |fx| plan(fx, &[]));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["entries.len = 5"], |fx| plan(fx, &[(0, 1); 5]));
    fx.fails(NSA_STATUS_UNKNOWN_SEQUENCE, f, &["2 is not an active sequence"], |fx| plan(fx, &[(0, 1), (2, 1)]));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["entries[].seq = 7"], |fx| plan(fx, &[(7, 1)]));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["entries[].seq = 0: listed twice"], |fx| plan(fx, &[(0, 1), (1, 1), (0, 1)]));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["entries[].tokens = 0"], |fx| plan(fx, &[(0, 0)]));
    fx.fails(NSA_STATUS_SEQUENCE_TOO_LONG, f, &["sequence 1 would reach length 257, past max_seq_len = 256"], |fx| plan(fx, &[(0, 1), (1, 233)]));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["entries[].tokens = 301", "max_step_tokens = 300"], |fx| plan(fx, &[(0, 150), (1, 151)]));
    // A failed plan keeps the current (complete) step; a valid plan then opens step 4.
    fx.fails(NSA_STATUS_LAYER_ALREADY_RUN, "nsa_cpu_run_layer", &["layer 0 already ran in step 3"], |fx| fx.run_with(|_| ()));
    fx.step(&[(0, 1), (1, 1)]);
}

#[test]
fn out_of_pages_changes_nothing() {
    let a = api();
    // Raw pool: 3 pages of 64 tokens, 2 already held (seq 0: 42 tokens, seq 1: 23).
    let mut cfg = small_config();
    cfg.num_pages = 3;
    let mut fx = Fx::with(cfg);
    fx.finish(0);
    let plan = |fx: &mut Fx, e: &[(u32, u32)]| {
        let e: Vec<nsa_step_seq_t> = e.iter().map(|&(seq, tokens)| nsa_step_seq_t { seq, tokens }).collect();
        unsafe { (a.cache_plan_step)(fx.e.cache, e.as_ptr(), e.len() as u32) }
    };
    fx.fails(NSA_STATUS_OUT_OF_PAGES, "nsa_cache_plan_step", &["out of raw pages: the call needs 3 free pages, 1 are free"], |fx| {
        plan(fx, &[(0, 100), (1, 50)])
    });
    // Compressed pool: one page of 64 compressed tokens (enough for 1040 raw positions).
    let mut cfg = small_config();
    cfg.num_cmp_pages = 1;
    cfg.max_seq_len = 2000;
    cfg.max_step_tokens = 2000;
    cfg.fit_pages();
    cfg.num_cmp_pages = 1;
    let mut fx = Fx::with(cfg);
    fx.finish(0);
    fx.fails(NSA_STATUS_OUT_OF_PAGES, "nsa_cache_plan_step", &["out of compressed pages: the call needs 1 free pages, 0 are free"], |fx| {
        plan(fx, &[(0, 1000), (1, 1000)])
    });
    let mut stats = nsa_cache_stats_t { struct_size: std::mem::size_of::<nsa_cache_stats_t>() as u32, ..Default::default() };
    ok(unsafe { (a.cache_stats)(fx.e.cache, &mut stats) });
    assert_eq!((stats.cmp_pages, stats.cmp_free, stats.live_seqs), (1, 0, 2));
}

#[test]
fn a_layer_runs_once_per_step_through_the_host_thread_parts_too() {
    let a = api();
    let mut fx = Fx::new();
    let fp = "nsa_cpu_run_layer_part";
    let part = |fx: &mut Fx, layer: u32, ith: u32, nth: u32| {
        let io = fx.io();
        unsafe { (a.cpu_run_layer_part)(fx.e.cpu, fx.e.cache, layer, &io, ith, nth) }
    };
    // Layer 0 through two parts; every part of a repeated run is refused, writing nothing.
    for ith in 0..2 {
        assert_eq!(part(&mut fx, 0, ith, 2), NSA_STATUS_OK);
    }
    for ith in 0..2 {
        fx.fails(NSA_STATUS_LAYER_ALREADY_RUN, fp, &["layer 0"], |fx| part(fx, 0, ith, 2));
    }
    // Layer 1 as a whole run; parts of it afterwards are refused too.
    let io = fx.io();
    assert_eq!(unsafe { (a.cpu_run_layer)(fx.e.cpu, fx.e.cache, 1, &io) }, NSA_STATUS_OK);
    for ith in 0..3 {
        fx.fails(NSA_STATUS_LAYER_ALREADY_RUN, fp, &["layer 1"], |fx| part(fx, 1, ith, 3));
    }
    // Each layer counted once: the step is complete and the cache takes the next call.
    ok(unsafe { (a.cache_add)(fx.e.cache, 2) });
}

#[test]
fn run_layer_checks_every_array_and_argument() {
    let a = api();
    let mut fx = Fx::new();
    let f = "nsa_cpu_run_layer";
    let run = |fx: &mut Fx, layer: u32| {
        let io = fx.io();
        unsafe { (a.cpu_run_layer)(fx.e.cpu, fx.e.cache, layer, &io) }
    };
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["layer = 2: layers are 0..2"], |fx| run(fx, 2));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["layer = 4294967295"], |fx| run(fx, u32::MAX));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["io->dtype = 2: the config's dtype is f32 (0)"], |fx| fx.run_with(|io| io.dtype = NSA_DTYPE_BF16));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["io->dtype = 9"], |fx| fx.run_with(|io| io.dtype = 9));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["io->tokens = 2: the planned step has 3 tokens"], |fx| fx.run_with(|io| io.tokens = 2));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["io->flags = 0x4"], |fx| fx.run_with(|io| io.flags = 4));
    // The host-thread form checks the same arguments, and its thread index.
    let fp = "nsa_cpu_run_layer_part";
    let part = |fx: &mut Fx, layer: u32, ith: u32, nth: u32| {
        let io = fx.io();
        unsafe { (a.cpu_run_layer_part)(fx.e.cpu, fx.e.cache, layer, &io, ith, nth) }
    };
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, fp, &["ith = 2", "ith < nth (nth = 2)"], |fx| part(fx, 0, 2, 2));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, fp, &["ith = 0", "(nth = 0)"], |fx| part(fx, 0, 0, 0));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, fp, &["layer = 2: layers are 0..2"], |fx| part(fx, 2, 0, 1));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, fp, &["io->tokens = 2: the planned step has 3 tokens"], |fx| {
        let mut io = fx.io();
        io.tokens = 2;
        unsafe { (a.cpu_run_layer_part)(fx.e.cpu, fx.e.cache, 0, &io, 0, 1) }
    });
    // Append-only (q and out both NULL) still needs k, v and the phi weights.
    fx.fails(NSA_STATUS_NULL_POINTER, f, &["io->k is NULL"], |fx| fx.run_with(|io| (io.q, io.out, io.k) = (null(), null_mut(), null())));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["phi_weights.v = 0 elements"], |fx| {
        fx.run_with(|io| (io.q, io.out, io.phi_v, io.phi_v_len) = (null(), null_mut(), null(), 0))
    });
    for bad in [0, 12, IO_SIZE - 8, 1 << 16] {
        fx.fails(NSA_STATUS_BAD_STRUCT_SIZE, f, &[&format!("io->struct_size = {bad}"), "sizeof(nsa_layer_io_t)"], |fx| fx.run_with(|io| io.struct_size = bad));
    }
    // Each required array NULL.
    fx.fails(NSA_STATUS_NULL_POINTER, f, &["io->q is NULL"], |fx| fx.run_with(|io| io.q = null()));
    fx.fails(NSA_STATUS_NULL_POINTER, f, &["io->k is NULL"], |fx| fx.run_with(|io| io.k = null()));
    fx.fails(NSA_STATUS_NULL_POINTER, f, &["io->v is NULL"], |fx| fx.run_with(|io| io.v = null()));
    fx.fails(NSA_STATUS_NULL_POINTER, f, &["io->gates is NULL"], |fx| fx.run_with(|io| io.gates = null()));
    fx.fails(NSA_STATUS_NULL_POINTER, f, &["io->out is NULL"], |fx| fx.run_with(|io| io.out = null_mut()));
    fx.fails(NSA_STATUS_NULL_POINTER, f, &["io->phi_k is NULL"], |fx| fx.run_with(|io| io.phi_k = null()));
    fx.fails(NSA_STATUS_NULL_POINTER, f, &["io->phi_v is NULL"], |fx| fx.run_with(|io| io.phi_v = null()));
    // Wrong phi weight counts (the config's phi is weighted: HKV*l = 64 floats each).
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["phi_weights.k = 63 elements: must be 64"], |fx| fx.run_with(|io| io.phi_k_len = 63));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["phi_weights.v = 0 elements"], |fx| fx.run_with(|io| (io.phi_v, io.phi_v_len) = (null(), 0)));
    // Misaligned arrays.
    fx.fails(NSA_STATUS_MISALIGNED, f, &["io->q at address", "aligned to 4 bytes"], |fx| fx.run_with(|io| io.q = unsafe { io.q.byte_add(2) }));
    fx.fails(NSA_STATUS_MISALIGNED, f, &["io->selected at address"], |fx| fx.run_with(|io| io.selected = unsafe { io.selected.byte_add(1) }));
    // Written arrays overlapping others.
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["io->out = 0x", "overlaps io->q"], |fx| fx.run_with(|io| io.out = io.q.cast_mut()));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["io->out", "overlaps io->selected"], |fx| fx.run_with(|io| io.selected = io.out.cast()));
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["io->out", "overlaps cache arena"], |fx| {
        let p = fx.e.arena.ptr();
        fx.run_with(|io| io.out = unsafe { p.add(64) }.cast())
    });
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["overlaps io->k"], |fx| {
        let p = fx.e.buf.ptr();
        fx.run_with(|io| io.k = unsafe { p.add(256) }.cast())
    });
    // A cache made with another config.
    let mut other_cfg = small_config();
    other_cfg.window = 16;
    let other = CEngine::new(&nsa_config_t::from(&other_cfg));
    unsafe {
        ok((a.cache_add)(other.cache, 0));
        ok((a.cache_plan_step)(other.cache, [nsa_step_seq_t { seq: 0, tokens: 3 }].as_ptr(), 1));
    }
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["cache = config: the cache was made with a different config"], |fx| {
        let io = fx.io();
        unsafe { (a.cpu_run_layer)(fx.e.cpu, other.cache, 0, &io) }
    });
    // Another cache of the same config: this backend serves fx's cache (its pools hold
    // that cache's pages), so it refuses the other one.
    let same = CEngine::new(&nsa_config_t::from(&small_config()));
    unsafe {
        ok((a.cache_add)(same.cache, 0));
        ok((a.cache_plan_step)(same.cache, [nsa_step_seq_t { seq: 0, tokens: 3 }].as_ptr(), 1));
    }
    fx.fails(NSA_STATUS_INVALID_ARGUMENT, f, &["cache = cache #", "this backend serves cache #", "create another backend"], |fx| {
        let io = fx.io();
        unsafe { (a.cpu_run_layer)(fx.e.cpu, same.cache, 0, &io) }
    });
    // With every failure behind it, the layer runs; `selected` is optional.
    ok(fx.run_with(|io| io.selected = null_mut()));
    assert!(fx.out.iter().all(|x| x.is_finite()));
    assert!(fx.sel.iter().all(|&s| s == -7), "selected written although NULL was passed");
    // Each layer runs once per step.
    fx.fails(NSA_STATUS_LAYER_ALREADY_RUN, f, &["layer 0 already ran in step 3", "exactly once"], |fx| run(fx, 0));
    ok(run(&mut fx, 1));
    // A cache operation ends the complete step.
    ok(unsafe { (a.cache_add)(fx.e.cache, 2) });
    fx.fails(NSA_STATUS_NO_STEP, f, &["no step is planned"], |fx| run(fx, 1));
}

#[test]
fn last_error_is_per_thread() {
    let a = api();
    failed(unsafe { (a.config_validate)(null()) }, NSA_STATUS_NULL_POINTER, "nsa_config_validate", &["cfg is NULL"]);
    std::thread::spawn(move || {
        assert_eq!(last_error(), "");
        failed(unsafe { (a.cache_add)(null_mut(), 0) }, NSA_STATUS_NULL_POINTER, "nsa_cache_add", &[]);
    })
    .join()
    .unwrap();
    assert!(last_error().starts_with("nsa_config_validate: "), "{}", last_error());
    // Successful calls keep it.
    assert!(!preset(NSA_PRESET_PAPER).scale.is_nan());
    assert!(last_error().starts_with("nsa_config_validate: "));
}
