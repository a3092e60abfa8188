//! Property tests of the paged cache over random operation sequences: add, fork,
//! truncate, remove, plan_step, layer claims (what a backend's layer run does first,
//! including skipped and repeated layers) and abort_step, mostly valid and mixed with
//! deliberately bad calls. An independent shadow model (`common/shadow.rs`) predicts the
//! outcome of every call, success or which error, and the state after it. After every
//! operation: the outcome is the predicted one; lengths and free pages match the model;
//! the cache's invariants hold; a failing call left the arena byte for byte as it was;
//! an abort restored the bookkeeping as it was before the plan. Removing everything
//! frees every page.

mod common;
#[path = "common/shadow.rs"]
mod shadow;

use common::*;
use nsa::{Cache, CacheBinding, Config, NsaError, Preset, StepSeq};
use shadow::{Kind, Op, Shadow};


fn tiny(preset: Preset, rng: &mut Rng) -> Config {
    let mut c = Config::preset(preset).with_shape(2, 1, 8, 8);
    c.max_seqs = 6;
    c.max_step_seqs = 4;
    c.max_seq_len = 600;
    c.max_step_tokens = 300;
    c.num_layers = rng.pick(&[1, 2, 3, 40]);
    c.fit_pages();
    // Overcommit so that out-of-pages happens.
    c.num_pages = (c.num_pages / rng.range(2, 4) as u32).max(1);
    c.num_cmp_pages = (c.num_cmp_pages / rng.range(1, 3) as u32).max(1);
    c
}

fn kind(e: &NsaError) -> Kind {
    match e {
        NsaError::InvalidArgument { .. } => Kind::InvalidArgument,
        NsaError::UnknownSequence { .. } => Kind::UnknownSequence,
        NsaError::SequenceExists { .. } => Kind::SequenceExists,
        NsaError::OutOfPages { .. } => Kind::OutOfPages,
        NsaError::SequenceTooLong { .. } => Kind::SequenceTooLong,
        NsaError::NoStep => Kind::NoStep,
        NsaError::StepOpen { .. } => Kind::StepOpen,
        NsaError::LayerAlreadyRun { .. } => Kind::LayerAlreadyRun,
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn random_operation_sequences_match_the_shadow_model() {
    let mut rng = Rng::new(21);
    let (mut ops, mut fails, mut changes, mut cows, mut aborts) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut kinds = std::collections::BTreeMap::new();
    for round in 0..60 {
        let cfg = tiny(if round % 2 == 0 { Preset::Paper } else { Preset::Fla }, &mut rng);
        let mut buf = Buf::new(Cache::arena_bytes(&cfg).unwrap());
        let mut cache = Cache::new(&cfg, buf.bytes()).unwrap();
        let mut backend = CacheBinding::new(&cfg);
        let mut sh = Shadow::new(&cfg);
        let mut before_plan = vec![];
        for _ in 0..400 {
            let op = sh.random_op(&mut |n| rng.below(n));
            let before = cache.state_bytes().to_vec();
            let bookkeeping = cache.bookkeeping();
            let want = sh.apply(&op);
            let got = match &op {
                Op::Add(s) => cache.add_sequence(*s),
                Op::Fork(a, b) => cache.fork(*a, *b),
                Op::Truncate(s, n) => cache.truncate(*s, *n),
                Op::Remove(s) => cache.remove(*s),
                Op::Plan(e) => {
                    let e: Vec<StepSeq> = e.iter().map(|&(seq, tokens)| StepSeq { seq, tokens }).collect();
                    let r = cache.plan_step(&e);
                    if r.is_ok() {
                        cows += cache.step().unwrap().copies.len();
                    }
                    r
                }
                Op::Run(l) => cache.claim_layer(&mut backend, *l).map(|_| ()),
                Op::Abort => cache.abort_step(),
            };
            ops += 1;
            let at = format!("round {round} op {ops} {op:?}");
            match (&want, &got) {
                (Ok(()), Ok(())) => changes += 1,
                (Err(k), Err(e)) => {
                    assert_eq!(*k, kind(e), "{at}: {e}");
                    *kinds.entry(format!("{k:?}")).or_insert(0usize) += 1;
                    fails += 1;
                    assert!(cache.state_bytes() == &before[..], "{at}: failing call changed the cache: {e}");
                }
                _ => panic!("{at}: the model predicts {want:?}, the cache returned {got:?}"),
            }
            match (&op, &got) {
                (Op::Plan(_), Ok(())) => before_plan = bookkeeping,
                (Op::Abort, Ok(())) => {
                    aborts += 1;
                    assert!(cache.bookkeeping() == before_plan, "{at}: abort did not restore the bookkeeping");
                }
                _ => {}
            }
            cache.check_invariants().unwrap_or_else(|e| panic!("{at}: {e}"));
            assert_eq!(cache.step_open(), sh.open(), "{at}");
            let checked = cache.check();
            assert_eq!(checked.is_err(), sh.open(), "{at}: check says {checked:?}");
            for s in 0..cfg.max_seqs {
                assert_eq!(cache.len(s).ok(), sh.len(s), "{at}: slot {s}");
            }
            let st = cache.stats();
            assert_eq!((st.raw_free, st.cmp_free), (sh.raw_free(), sh.cmp_free()), "{at}: free pages");
        }
        if sh.planned() {
            cache.abort_step().unwrap();
        }
        for s in sh.live() {
            cache.remove(s).unwrap();
        }
        let st = cache.stats();
        assert_eq!((st.raw_free, st.cmp_free, st.live_seqs), (cfg.num_pages, cfg.num_cmp_pages, 0), "pages leaked");
        cache.check_invariants().unwrap();
    }
    println!("{ops} operations: {changes} state changes, {fails} rejected ({kinds:?}), {cows} copy-on-write copies, {aborts} aborts");
    assert!(changes * 2 >= ops, "at least half the operations must be successful state changes");
    assert!(cows > 50 && aborts > 50, "the mix must exercise copy-on-write and aborts");
    for k in ["InvalidArgument", "UnknownSequence", "SequenceExists", "OutOfPages", "SequenceTooLong", "NoStep", "StepOpen", "LayerAlreadyRun"] {
        assert!(kinds.get(k).copied().unwrap_or(0) > 5, "the mix must exercise {k}: {kinds:?}");
    }
}
