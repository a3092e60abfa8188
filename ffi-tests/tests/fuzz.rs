//! The bounded fuzz run of CI: random operation sequences through the C ABI from a few
//! seeds, each capped in operations and time (see `nsa_ffi_tests::fuzz`). The long run
//! is `cargo run --release -p nsa-ffi-tests --bin nsa-fuzz`.

use std::time::Duration;

use nsa_ffi_tests::{api, fuzz, last_error, AlignedBuf, NSA_STATUS_CORRUPT, NSA_STATUS_OK, NSA_STATUS_STEP_OPEN};

#[test]
fn random_operations_through_the_c_abi() {
    let mut total = 0;
    for seed in 1..=4 {
        let st = fuzz::run(seed, 15_000, Duration::from_secs(40));
        println!("seed {seed}: {st:?}");
        assert!(
            st.steps_completed > 100 && st.aborts > 50 && st.rejected > 100 && st.tokens_checked > 1000 && st.mix.iter().all(|&m| m > 10),
            "seed {seed}: too little exercised: {st:?}"
        );
        assert!(st.changes * 2 >= st.ops, "seed {seed}: fewer than half the operations changed a cache: {st:?}");
        total += st.ops;
    }
    println!("{total} operations");
}

#[test]
fn cache_check_reports_a_corrupted_arena() {
    let a = api();
    let mut cfg = nsa_ffi_tests::preset(nsa_ffi_tests::NSA_PRESET_PAPER);
    cfg.max_seq_len = 1024;
    nsa_ffi_tests::ok(unsafe { (a.config_fit_pages)(&mut cfg) });
    let mut bytes = 0usize;
    nsa_ffi_tests::ok(unsafe { (a.cache_arena_size)(&cfg, &mut bytes) });
    let mut arena = AlignedBuf::new(bytes);
    let mut cache = std::ptr::null_mut();
    nsa_ffi_tests::ok(unsafe { (a.cache_init)(&cfg, arena.ptr().cast(), bytes, &mut cache) });
    nsa_ffi_tests::ok(unsafe { (a.cache_add)(cache, 0) });
    let step = nsa_ffi_tests::nsa_step_seq_t { seq: 0, tokens: 100 };
    nsa_ffi_tests::ok(unsafe { (a.cache_plan_step)(cache, &step, 1) });
    // Consistent, but the step's positions are counted and not written yet.
    assert_eq!(unsafe { (a.cache_check)(cache) }, NSA_STATUS_STEP_OPEN, "{}", last_error());
    assert!(last_error().contains("positions 0..100 of sequence 0 are counted but not written"), "{}", last_error());
    nsa_ffi_tests::ok(unsafe { (a.cache_abort_step)(cache) });
    assert_eq!(unsafe { (a.cache_check)(cache) }, NSA_STATUS_OK);
    nsa_ffi_tests::ok(unsafe { (a.cache_plan_step)(cache, &step, 1) });
    // Scribble over the tail of the arena (page tables and pools' bookkeeping).
    let n = arena.len();
    for b in &mut arena.bytes_mut()[n / 2..] {
        *b = 0x77;
    }
    assert_eq!(unsafe { (a.cache_check)(cache) }, NSA_STATUS_CORRUPT);
    assert!(last_error().contains("corrupt"), "{}", last_error());
}
