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
    println!(
        "nsa-fuzz seed {seed}: {} operations in {:.1} s over {} configs: {} steps, {} calls rejected (state unchanged each time), \
         {} tokens checked against the reference (largest error {:.2e}), {} near-tie selections",
        st.ops,
        t.elapsed().as_secs_f64(),
        st.rounds,
        st.steps,
        st.rejected,
        st.tokens_checked,
        st.max_err,
        st.near_ties
    );
}
