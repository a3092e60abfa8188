//! Misuse the header forbids but a host can still commit (issue 13, item 6): overlapping
//! calls on one CPU backend are refused with NSA_STATUS_BUSY (no deadlock, no poisoned
//! lock), and a backend created over a live backend's buffer is refused (its worker
//! threads would leak).

mod common;

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use nsa::{Config, Dtype, Preset};
use nsa_ffi_tests::*;

/// The tests of this file count the process's threads: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn config(threads: u32) -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(8, 2, 64, 64).with_capacity(1, 4096);
    c.dtype = Dtype::F32;
    c.cpu_threads = threads;
    c
}

/// The calling thread's view of the process's thread count (Linux).
fn threads() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

/// The thread count once it stops changing (the same over 50 ms; at most 5 s): the test
/// harness's own threads come and go around the test.
fn stable_threads() -> usize {
    let t0 = std::time::Instant::now();
    let mut n = threads();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let m = threads();
        if m == n || t0.elapsed() > Duration::from_secs(5) {
            return m;
        }
        n = m;
    }
}

/// The thread count once it reaches `want`, or what it is after 5 s. A joined thread
/// leaves the kernel's count a moment after `join` returns (seen once on a loaded 2-core
/// machine: one thread more right after a destroy), so a count is read until it settles;
/// a leaked thread stays and still fails the comparison.
fn threads_settled(want: usize) -> usize {
    let t0 = std::time::Instant::now();
    loop {
        let n = threads();
        if n == want || t0.elapsed() > Duration::from_secs(5) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Raw handles shared with the racing threads (the test serializes everything else).
#[derive(Clone, Copy)]
struct Handles(*mut nsa_cpu_backend, *mut nsa_cache);
unsafe impl Send for Handles {}

#[test]
fn overlapping_layer_runs_on_one_backend_are_refused_as_busy() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (tx, rx) = mpsc::channel();
    // The race runs on its own thread so that a deadlock fails the test instead of hanging.
    let race = std::thread::spawn(move || {
        let a = api();
        let cfg = config(3);
        let e = CEngine::new(&nsa_config_t::from(&cfg));
        ok(unsafe { (a.cache_add)(e.cache, 0) });
        let tokens = 64u32;
        let d = LayerData::<f32>::random(&cfg, tokens as usize, &mut Rng::new(3));
        let (hq, _, _, dv) = dims(&cfg);
        let (mut busy, mut already) = (0, 0);
        for _ in 0..300 {
            ok(unsafe { (a.cache_plan_step)(e.cache, &nsa_step_seq_t { seq: 0, tokens }, 1) });
            let h = Handles(e.cpu, e.cache);
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let d = LayerData { tokens: d.tokens, q: d.q.clone(), k: d.k.clone(), v: d.v.clone(), gates: d.gates.clone() };
                    std::thread::spawn(move || {
                        let h = h;
                        let mut out = vec![0f32; tokens as usize * hq * dv];
                        let io = nsa_layer_io_t {
                            struct_size: std::mem::size_of::<nsa_layer_io_t>() as u32,
                            dtype: NSA_DTYPE_F32,
                            tokens,
                            flags: 0,
                            q: d.q.as_ptr().cast(),
                            k: d.k.as_ptr().cast(),
                            v: d.v.as_ptr().cast(),
                            gates: d.gates.as_ptr(),
                            out: out.as_mut_ptr().cast(),
                            selected: std::ptr::null_mut(),
                            phi_k: std::ptr::null(),
                            phi_k_len: 0,
                            phi_v: std::ptr::null(),
                            phi_v_len: 0,
                        };
                        let st = unsafe { (api().cpu_run_layer)(h.0, h.1, 0, &io) };
                        (st, last_error(), out.iter().all(|x| x.is_finite()))
                    })
                })
                .collect();
            let res: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
            let oks = res.iter().filter(|r| r.0 == NSA_STATUS_OK).count();
            assert_eq!(oks, 1, "exactly one of two racing runs of the layer succeeds: {res:?}");
            for (st, msg, finite) in &res {
                match *st {
                    NSA_STATUS_OK => assert!(finite, "the successful run wrote every output"),
                    NSA_STATUS_BUSY => {
                        busy += 1;
                        assert!(msg.contains("is running another call"), "{msg}");
                    }
                    NSA_STATUS_LAYER_ALREADY_RUN => already += 1,
                    other => panic!("unexpected {}: {msg}", status_name(other)),
                }
            }
            ok(unsafe { (a.cache_check)(e.cache) });
            ok(unsafe { (a.cache_truncate)(e.cache, 0, 0) });
        }
        tx.send((busy, already)).unwrap();
    });
    let (busy, already) = rx.recv_timeout(Duration::from_secs(300)).expect("racing layer runs deadlocked (or panicked)");
    race.join().unwrap(); // its backend's workers are joined before the lock is released
    println!("300 races: {busy} refused as busy, {already} as already run");
    assert!(busy > 0, "no race overlapped: the busy path was not exercised");
}

#[test]
fn a_backend_over_a_live_backends_buffer_is_refused_and_threads_are_not_leaked() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let a = api();
    let ccfg = nsa_config_t::from(&config(4));
    let mut bytes = 0usize;
    ok(unsafe { (a.cpu_buffer_size)(&ccfg, &mut bytes) });
    let mut buf = AlignedBuf::new(bytes + 4096);
    for round in 0..4 {
        let base = stable_threads();
        let mut cpu = std::ptr::null_mut();
        ok(unsafe { (a.cpu_backend_create)(&ccfg, buf.ptr().cast(), bytes, &mut cpu) });
        assert_eq!(threads_settled(base + 3), base + 3, "round {round}: cpu_threads = 4 starts 3 workers");
        let snap = buf.bytes().to_vec();
        for off in [0usize, 64, 2048] {
            let mut other = std::ptr::null_mut();
            let st = unsafe { (a.cpu_backend_create)(&ccfg, buf.ptr().add(off).cast(), bytes, &mut other) };
            assert_eq!(st, NSA_STATUS_INVALID_ARGUMENT, "round {round}, offset {off}: {}", last_error());
            assert!(last_error().contains("overlaps the buffer") && last_error().contains("live nsa_cpu_backend"), "{}", last_error());
            assert!(other.is_null() && buf.bytes() == &snap[..], "a refused create wrote something");
        }
        assert_eq!(threads_settled(base + 3), base + 3, "round {round}: a refused create started threads");
        unsafe { (a.cpu_backend_destroy)(cpu) };
        assert_eq!(threads_settled(base), base, "round {round}: destroy joins every worker");
        // Destroyed twice: ignored.
        unsafe { (a.cpu_backend_destroy)(cpu) };
    }
}
