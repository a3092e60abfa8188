//! Stress: several engines (each a cache + a CPU backend with its own worker threads)
//! run random multi-sequence schedules on several OS threads at once. Every result must
//! equal, bit for bit, the same schedule run alone with one thread: no state leaks
//! between engines or between a backend's workers.

mod common;
use common::*;
use nsa::{Config, Dtype, Phi, Preset};

fn job(seed: u64, threads: u32) -> (Config, Vec<SeqData>, Vec<Vec<(usize, usize)>>, (Vec<f32>, Vec<f32>)) {
    let mut rng = Rng::new(seed);
    let preset = if seed % 2 == 0 { Preset::Paper } else { Preset::Fla };
    let mut c = Config::preset(preset).with_shape(4 * rng.range(1, 3) as u32, 2, 32, 32).with_capacity(8, 500);
    c.dtype = Dtype::F32;
    c.phi = [Phi::Mean, Phi::Weighted][(seed % 2) as usize];
    c.sel_count = 4;
    c.window = 64;
    c.cpu_threads = threads;
    let lens: Vec<usize> = (0..8).map(|_| rng.range(1, 500) as usize).collect();
    let seqs = lens.iter().map(|&l| SeqData::random::<f32>(&c, l, &mut rng)).collect();
    let sched = random_schedule(&lens, 40, &mut rng);
    let w = random_weights(&c, &mut rng);
    (c, seqs, sched, w)
}

#[test]
fn concurrent_engines_match_single_threaded_runs() {
    let seeds: Vec<u64> = (100..106).collect();
    let alone: Vec<Outs> = seeds
        .iter()
        .map(|&s| {
            let (c, seqs, sched, w) = job(s, 1);
            run_schedule::<f32>(&c, &seqs, &sched, &w)
        })
        .collect();
    let together: Vec<Outs> = std::thread::scope(|scope| {
        let hs: Vec<_> = seeds
            .iter()
            .map(|&s| {
                scope.spawn(move || {
                    let (c, seqs, sched, w) = job(s, 3);
                    run_schedule::<f32>(&c, &seqs, &sched, &w)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut tokens = 0;
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        for s in 0..a.out.len() {
            assert!(b.out[s].iter().all(|x| x.is_finite()), "engine {i} seq {s}: unwritten output");
            assert_eq!(a.out[s], b.out[s], "engine {i} seq {s}: outputs differ");
            assert_eq!(a.sel[s], b.sel[s], "engine {i} seq {s}: selections differ");
            tokens += a.sel[s].len();
        }
    }
    println!("{} engines x 3 threads, {tokens} selection rows, identical to single-threaded runs", seeds.len());
}
