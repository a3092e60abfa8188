//! The long fuzz run: `cargo run --release -p nsa-ffi-tests --bin nsa-fuzz -- [OPS] [SEED] [SECONDS]`
//! (defaults: 1,000,000 operations, seed 1, no time limit). Prints what it ran; any
//! violation panics with the seed and operation number that reproduce it.

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: u64| args.get(i).map(|s| s.parse().expect("a number")).unwrap_or(d);
    let (ops, seed, secs) = (arg(0, 1_000_000), arg(1, 1), arg(2, u64::MAX / 2));
    let t = Instant::now();
    let st = nsa_ffi_tests::fuzz::run(seed, ops, Duration::from_secs(secs));
    let secs = t.elapsed().as_secs_f64();
    let mix: Vec<String> = nsa_ffi_tests::fuzz::MIX_NAMES.iter().zip(st.mix).map(|(n, m)| format!("{n} {m}")).collect();
    println!(
        "nsa-fuzz seed {seed}: {} operations in {secs:.1} s ({:.0} ops/s) over {} configs (two caches each)\n  \
         mix: {}\n  {} successful state changes ({:.1}%), {} calls rejected as predicted (state unchanged each time), \
         {} steps completed, {} aborted\n  {} tokens checked against the reference (largest error {:.2e}), {} near-tie selections",
        st.ops,
        st.ops as f64 / secs,
        st.rounds,
        mix.join(", "),
        st.changes,
        100.0 * st.changes as f64 / st.ops.max(1) as f64,
        st.rejected,
        st.steps_completed,
        st.aborts,
        st.tokens_checked,
        st.max_err,
        st.near_ties
    );
}
