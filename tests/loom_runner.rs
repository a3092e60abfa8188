//! Model-checks the CPU worker runner with loom: every interleaving of the dispatch,
//! the workers' wake-up and completion, and shutdown. Each job index runs exactly once
//! per dispatch, the caller returns only after every worker finished (so the job it
//! lent by reference is never used after it returns), and drop joins cleanly.
//!
//! Run with: RUSTFLAGS="--cfg loom" cargo test --release --test loom_runner
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use nsa::cpu::Runner;

fn check(threads: usize, dispatches: usize, preemptions: Option<usize>) {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = preemptions;
    model.check(move || {
        let mut runner = Runner::new(threads);
        for round in 0..dispatches {
            let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            runner.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            // run() returned: every worker's share is done and visible.
            for (i, h) in hits.iter().enumerate() {
                assert_eq!(h.load(Ordering::Relaxed), 1, "round {round}: worker {i}");
            }
        }
        drop(runner);
    });
}

#[test]
fn one_worker_two_dispatches() {
    check(2, 2, None);
}

#[test]
fn two_workers_one_dispatch() {
    // Exhaustive takes minutes; three preemptions cover the handoffs that matter.
    check(3, 1, Some(3));
}
