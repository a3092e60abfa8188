//! Property tests of the paged cache over random operation sequences (add, plan_step,
//! fork, truncate, remove), mixed with deliberately bad calls. After every operation:
//! the cache's invariants hold (free + used pages == total, refcounts == table
//! references, no page on the free stack twice); lengths match a shadow model; a failing
//! call left the arena byte for byte as it was. Removing everything frees every page.

mod common;
use common::*;
use nsa::{Cache, Config, NsaError, Preset, StepSeq};

fn tiny(preset: Preset, rng: &mut Rng) -> Config {
    let mut c = Config::preset(preset).with_shape(2, 1, 8, 8);
    c.max_seqs = 6;
    c.max_step_seqs = 4;
    c.max_seq_len = 600;
    c.max_step_tokens = 300;
    c.fit_pages();
    // Overcommit so that out-of-pages happens.
    c.num_pages = (c.num_pages / rng.range(2, 4) as u32).max(1);
    c.num_cmp_pages = (c.num_cmp_pages / rng.range(1, 3) as u32).max(1);
    c
}

enum Expect {
    Ok,
    Err,
}

#[test]
fn random_operation_sequences_keep_every_invariant() {
    let mut rng = Rng::new(21);
    let (mut ops, mut fails, mut cows) = (0usize, 0usize, 0usize);
    for round in 0..60 {
        let cfg = tiny(if round % 2 == 0 { Preset::Paper } else { Preset::Fla }, &mut rng);
        let mut buf = Buf::new(Cache::arena_bytes(&cfg).unwrap());
        let mut cache = Cache::new(&cfg, buf.bytes()).unwrap();
        let mut shadow: Vec<Option<u32>> = vec![None; cfg.max_seqs as usize];
        for _ in 0..300 {
            let before = cache.state_bytes().to_vec();
            let slot = rng.below(cfg.max_seqs as u64 + 1) as u32; // sometimes out of range
            let live: Vec<u32> = (0..cfg.max_seqs).filter(|&s| shadow[s as usize].is_some()).collect();
            let pick_live = |rng: &mut Rng| if live.is_empty() || rng.below(8) == 0 { slot } else { rng.pick(&live) };
            let (res, expect): (Result<(), NsaError>, Expect) = match rng.below(10) {
                0 | 1 => {
                    let ok = slot < cfg.max_seqs && shadow[slot as usize].is_none();
                    let r = cache.add_sequence(slot);
                    if r.is_ok() {
                        shadow[slot as usize] = Some(0);
                    }
                    (r, if ok { Expect::Ok } else { Expect::Err })
                }
                2 => {
                    let src = pick_live(&mut rng);
                    let dst = rng.below(cfg.max_seqs as u64 + 1) as u32;
                    let ok = src < cfg.max_seqs && shadow[src as usize].is_some() && dst < cfg.max_seqs && shadow[dst as usize].is_none();
                    let r = cache.fork(src, dst);
                    if r.is_ok() {
                        shadow[dst as usize] = shadow[src as usize];
                    }
                    (r, if ok { Expect::Ok } else { Expect::Err })
                }
                3 => {
                    let s = pick_live(&mut rng);
                    let cur = shadow.get(s as usize).copied().flatten();
                    let new_len = rng.below(cur.unwrap_or(10) as u64 + 3) as u32;
                    let ok = cur.is_some_and(|l| new_len <= l);
                    let r = cache.truncate(s, new_len);
                    if r.is_ok() {
                        shadow[s as usize] = Some(new_len);
                    }
                    (r, if ok { Expect::Ok } else { Expect::Err })
                }
                4 => {
                    let s = pick_live(&mut rng);
                    let ok = shadow.get(s as usize).copied().flatten().is_some();
                    let r = cache.remove(s);
                    if r.is_ok() {
                        shadow[s as usize] = None;
                    }
                    (r, if ok { Expect::Ok } else { Expect::Err })
                }
                _ => {
                    // A step over a random subset, sometimes with a bad entry.
                    let mut entries: Vec<StepSeq> = vec![];
                    for &s in &live {
                        if rng.below(2) == 0 {
                            entries.push(StepSeq { seq: s, tokens: rng.pick(&[1, 1, 1, 7, 16, 33, 64, 150]) });
                        }
                    }
                    match rng.below(12) {
                        0 if !entries.is_empty() => entries.push(entries[0]),         // listed twice
                        1 if !entries.is_empty() => entries[0].tokens = 0,            // no token
                        2 => entries.push(StepSeq { seq: cfg.max_seqs + 3, tokens: 1 }), // out of range
                        3 if !entries.is_empty() => entries[0].tokens = 599,          // too long / too many
                        _ => {}
                    }
                    let r = cache.plan_step(&entries);
                    if let Ok(()) = r {
                        for e in &entries {
                            shadow[e.seq as usize] = Some(shadow[e.seq as usize].unwrap() + e.tokens);
                        }
                        cows += cache.step().unwrap().copies.len();
                    }
                    // Success depends on free pages: checked through the invariants below.
                    let valid = !entries.is_empty()
                        && entries.iter().enumerate().all(|(i, e)| {
                            e.seq < cfg.max_seqs
                                && shadow[e.seq as usize].is_some()
                                && e.tokens > 0
                                && !entries[..i].iter().any(|o| o.seq == e.seq)
                        });
                    let expect = if valid { if r.is_ok() { Expect::Ok } else { Expect::Err } } else { Expect::Err };
                    if valid {
                        if let Err(e) = &r {
                            assert!(
                                matches!(e, NsaError::OutOfPages { .. } | NsaError::SequenceTooLong { .. } | NsaError::InvalidArgument { .. }),
                                "unexpected failure of a valid step: {e}"
                            );
                        }
                    }
                    (r, expect)
                }
            };
            ops += 1;
            match (expect, &res) {
                (Expect::Ok, Ok(())) => {}
                (Expect::Err, Err(e)) => {
                    fails += 1;
                    assert!(!e.to_string().is_empty());
                    assert!(cache.state_bytes() == &before[..], "failing call changed the cache: {e}");
                }
                (Expect::Ok, Err(e)) => panic!("a valid call failed: {e}"),
                (Expect::Err, Ok(())) => panic!("an invalid call succeeded"),
            }
            cache.check_invariants().unwrap_or_else(|e| panic!("after op {ops}: {e}"));
            for (s, l) in shadow.iter().enumerate() {
                assert_eq!(cache.len(s as u32).ok(), *l, "slot {s}");
            }
        }
        for s in 0..cfg.max_seqs {
            if shadow[s as usize].is_some() {
                cache.remove(s).unwrap();
            }
        }
        let st = cache.stats();
        assert_eq!((st.raw_free, st.cmp_free, st.live_seqs), (cfg.num_pages, cfg.num_cmp_pages, 0), "pages leaked");
        cache.check_invariants().unwrap();
    }
    println!("{ops} operations, {fails} rejected (state unchanged each time), {cows} copy-on-write copies");
    assert!(cows > 50 && fails > 1000, "the random mix should exercise copy-on-write and failures");
}
