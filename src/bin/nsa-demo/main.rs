//! The main job: needle in a haystack with NSA.
//!
//! Builds a cache in memory, prefills a long synthetic context with a "needle" (a
//! distinctive key/value) planted at a random depth, then decodes queries that look for
//! it. Reports whether selection picked the needle's block, how close NSA's output is to
//! full attention, and the time per decode step of NSA versus the engine's full-attention
//! baseline on the same cache and machine, both timed the same way.
//!
//! On the CPU it runs a laptop-sized layer (one GQA group of 4 heads, 64/64 dims) over
//! 32k tokens; on CUDA a model's layer (64 query heads, 4 KV heads, 128/128 dims) over
//! 128k tokens, the sizes where each backend is meant to be used.
//!
//! `cargo run --release -- --help` lists the options.

use std::io::IsTerminal;
use std::time::Instant;

use half::bf16;
use nsa::cpu::CpuBackend;
use nsa::{Cache, Config, Dtype, HostBuf, Preset, StepSeq};

mod backend;
use backend::Backend;

#[path = "../../rng.rs"]
mod rng;
use rng::Rng;

struct Args {
    /// Context length; by default 32768 on the CPU, 131072 on CUDA.
    tokens: Option<u32>,
    depth: Option<f64>,
    preset: Preset,
    threads: u32,
    decode_steps: u32,
    seed: u64,
    backend: String,
}

fn usage() -> ! {
    eprintln!(
        "nsa-demo: needle-in-a-haystack with Native Sparse Attention\n\n\
         options:\n  --tokens N        context length (default 32768 on the CPU, 131072 on CUDA)\n  \
         --depth F         needle depth in [0,1] (default: random)\n  \
         --preset P        paper | fla (default paper)\n  \
         --threads N       CPU threads (default: all cores)\n  \
         --decode N        decode steps to time (default 16)\n  \
         --seed N          RNG seed (default 7)\n  \
         --backend B       auto | cpu | cuda (default auto: CUDA when available, else CPU)"
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let mut a = Args {
        tokens: None,
        depth: None,
        preset: Preset::Paper,
        threads: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        decode_steps: 16,
        seed: 7,
        backend: "auto".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--tokens" => a.tokens = Some(val().parse().unwrap_or_else(|_| usage())),
            "--depth" => a.depth = Some(val().parse().unwrap_or_else(|_| usage())),
            "--preset" => {
                a.preset = match val().as_str() {
                    "paper" => Preset::Paper,
                    "fla" => Preset::Fla,
                    _ => usage(),
                }
            }
            "--threads" => a.threads = val().parse().unwrap_or_else(|_| usage()),
            "--decode" => a.decode_steps = val().parse().unwrap_or_else(|_| usage()),
            "--seed" => a.seed = val().parse().unwrap_or_else(|_| usage()),
            "--backend" => a.backend = val(),
            _ => usage(),
        }
    }
    a
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

fn main() {
    let args = parse();
    if !["auto", "cpu", "cuda"].contains(&args.backend.as_str()) {
        usage();
    }
    if let Err(e) = use_cuda(&args.backend).and_then(|cuda| run(&args, cuda)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Whether the demo runs on CUDA: `--backend cuda`, or `auto` when this build has CUDA
/// and a device answers (saying why not otherwise). Decided before the config, whose
/// shape and length follow the backend.
fn use_cuda(which: &str) -> nsa::Result<bool> {
    #[cfg(feature = "cuda")]
    if which != "cpu" {
        match nsa::cuda::CudaBackend::probe() {
            Ok(_) => return Ok(true),
            Err(e) if which == "auto" => eprintln!("  (CUDA not used: {e}; running on the CPU)"),
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(feature = "cuda"))]
    if which == "cuda" {
        return Err(nsa::NsaError::BackendUnavailable("this nsa-demo was built without --features cuda".into()));
    }
    Ok(false)
}

/// The engine: the CUDA backend over its own device allocation, or the CPU backend over
/// `pool`.
fn make_backend<'p>(cuda: bool, cfg: &Config, pool: &'p mut HostBuf) -> nsa::Result<Box<dyn Backend + 'p>> {
    #[cfg(feature = "cuda")]
    if cuda {
        return Ok(Box::new(backend::Gpu::new(cfg)?));
    }
    let _ = cuda;
    Ok(Box::new(backend::Cpu::new(cfg, pool)?))
}

/// The demo on CUDA or on the CPU. With `--backend auto`, a CUDA backend that cannot be
/// created (no memory, no NVRTC to compile its kernels) falls back to the CPU.
fn run(a: &Args, cuda: bool) -> nsa::Result<()> {
    // A laptop-sized layer on the CPU (runs in seconds), a model's layer on CUDA.
    let (hq, hkv, dk, dv) = if cuda { (64usize, 4usize, 128usize, 128usize) } else { (4, 1, 64, 64) };
    let tokens = a.tokens.unwrap_or(if cuda { 131072 } else { 32768 });
    let mut cfg = Config::preset(a.preset).with_shape(hq as u32, hkv as u32, dk as u32, dv as u32);
    cfg.dtype = Dtype::Bf16;
    cfg.max_seqs = 1;
    cfg.max_step_seqs = 1;
    cfg.max_seq_len = tokens + a.decode_steps;
    cfg.max_step_tokens = 1024;
    cfg.cpu_threads = a.threads.max(1);
    cfg.fit_pages();
    cfg.validate()?;

    let mut rng = Rng::new(a.seed);
    let t = tokens as usize;
    let depth = a.depth.unwrap_or_else(|| rng.uniform()).clamp(0.0, 1.0);
    let needle_pos = ((t - 1) as f64 * depth) as usize;
    // The needle: a key pointing along a secret direction u, and a value to retrieve.
    let u: Vec<f32> = {
        let v: Vec<f32> = (0..dk).map(|_| rng.normal()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    };
    let needle_v: Vec<f32> = (0..dv).map(|i| if i % 2 == 0 { 3.0 } else { -3.0 }).collect();
    let key = |rng: &mut Rng, pos: usize| -> Vec<f32> {
        if pos == needle_pos {
            u.iter().map(|x| x * 48.0).collect()
        } else {
            (0..dk).map(|_| rng.normal()).collect()
        }
    };
    let val = |rng: &mut Rng, pos: usize| -> Vec<f32> {
        if pos == needle_pos {
            needle_v.clone()
        } else {
            (0..dv).map(|_| rng.normal()).collect()
        }
    };

    let arena_bytes = Cache::arena_bytes(&cfg)?;
    // K/V pools and scratch: host memory for the CPU backend, one device allocation on CUDA.
    let pool_bytes = if cuda { nsa::cuda::CudaBackend::device_bytes(&cfg)? } else { CpuBackend::buffer_bytes(&cfg)? };
    let mut arena = HostBuf::new(arena_bytes);
    let mut pool = HostBuf::new(if cuda { 0 } else { pool_bytes });
    let mut cache = Cache::new(&cfg, arena.bytes())?;
    let mut engine = match make_backend(cuda, &cfg, &mut pool) {
        Ok(engine) => engine,
        Err(e) if cuda && a.backend == "auto" => {
            eprintln!("  (CUDA not used: {e}; running on the CPU)");
            return run(a, false);
        }
        Err(e) => return Err(e),
    };
    cache.add_sequence(0)?;

    println!("nsa-demo: needle in a haystack, Native Sparse Attention on {}", engine.name());
    println!(
        "  preset {:?}: l={} d={} l'={} n={} w={}; heads {hq}q/{hkv}kv, dims {dk}/{dv}, bf16 storage",
        a.preset, cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.sel_count, cfg.window
    );
    println!("  context {t} tokens, needle at position {needle_pos} (depth {:.2}, block {})", depth, needle_pos / cfg.sel_block as usize);
    println!(
        "  memory: arena {:.1} KiB, K/V pools + scratch {:.1} MiB {} (caller-owned, allocated once)",
        arena_bytes as f64 / 1024.0,
        pool_bytes as f64 / (1 << 20) as f64,
        if cuda { "on the device" } else { "in host memory" }
    );

    // --- prefill, in chunks, with a progress bar on a terminal (a log gets no `\r` line) ---
    let bar_on = std::io::stderr().is_terminal();
    let chunk = cfg.max_step_tokens as usize;
    let gates_prefill = vec![1.0f32 / 3.0; chunk * hq * 3];
    // The prefill's queries only produce outputs nobody checks: one random chunk serves
    // every chunk (drawing 128k x 64 x 128 of them would take longer than the prefill).
    let q_prefill: Vec<bf16> = (0..chunk * hq * dk).map(|_| bf16::from_f32(rng.normal() * 0.5)).collect();
    let mut out = vec![bf16::ZERO; chunk * hq * dv];
    let started = Instant::now();
    let mut done = 0usize;
    while done < t {
        let n = chunk.min(t - done);
        cache.plan_step(&[StepSeq { seq: 0, tokens: n as u32 }])?;
        let (mut k, mut v) = (Vec::with_capacity(n * hkv * dk), Vec::with_capacity(n * hkv * dv));
        for p in done..done + n {
            for _ in 0..hkv {
                k.extend(key(&mut rng, p).into_iter().map(bf16::from_f32));
                v.extend(val(&mut rng, p).into_iter().map(bf16::from_f32));
            }
        }
        engine.run(&cache, &q_prefill[..n * hq * dk], &k, &v, &gates_prefill[..n * hq * 3], &mut out[..n * hq * dv], None)?;
        done += n;
        if bar_on {
            let bar = (done as f64 / t as f64 * 40.0) as usize;
            eprint!("\r  prefill [{}{}] {:>6}/{t} tokens {:>5.1}s", "#".repeat(bar), " ".repeat(40 - bar), done, started.elapsed().as_secs_f64());
        }
    }
    if bar_on {
        eprintln!();
    }
    let prefill_s = started.elapsed().as_secs_f64();
    println!("  prefill: {t} tokens in {prefill_s:.2} s ({:.0} tokens/s, all three branches)", t as f64 / prefill_s);

    // --- decode: queries that look for the needle ---
    let n_sel = cfg.sel_count as usize;
    let needle_block = (needle_pos / cfg.sel_block as usize) as i32;
    let (mut hits, mut cos_nsa, mut cos_full, mut rel) = (0usize, 0f64, 0f64, 0f64);
    let (mut t_nsa, mut t_full) = (vec![], vec![]);
    // Selected branch only (gates 0,1,0): the branch whose job is exact retrieval.
    let gates = [0.0f32, 1.0, 0.0].repeat(hq);
    for _ in 0..a.decode_steps {
        let q: Vec<bf16> = (0..hq).flat_map(|_| u.iter().map(|x| bf16::from_f32(x * 2.5 / (cfg.softmax_scale() * 8.0)))).collect();
        let pos = cache.len(0)? as usize;
        let k: Vec<bf16> = (0..hkv).flat_map(|_| key(&mut rng, pos)).map(bf16::from_f32).collect();
        let v: Vec<bf16> = (0..hkv).flat_map(|_| val(&mut rng, pos)).map(bf16::from_f32).collect();
        let mut o_nsa = vec![bf16::ZERO; hq * dv];
        let mut o_full = vec![bf16::ZERO; hq * dv];
        let mut sel = vec![-1i32; hkv * n_sel];
        cache.plan_step(&[StepSeq { seq: 0, tokens: 1 }])?;
        t_nsa.push(engine.run(&cache, &q, &k, &v, &gates, &mut o_nsa, Some(&mut sel))?);
        t_full.push(engine.full(&cache, &q, &mut o_full)?);
        if sel.contains(&needle_block) {
            hits += 1;
        }
        let (fn_, ff): (Vec<f32>, Vec<f32>) = (o_nsa.iter().map(|x| x.to_f32()).collect(), o_full.iter().map(|x| x.to_f32()).collect());
        cos_nsa += cosine(&fn_[..dv], &needle_v);
        cos_full += cosine(&ff[..dv], &needle_v);
        let num: f64 = fn_.iter().zip(&ff).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        let den: f64 = ff.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
        rel += num / den.max(1e-30);
    }
    let steps = a.decode_steps.max(1) as f64;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (m_nsa, m_full) = (median(&mut t_nsa), median(&mut t_full));
    println!("  decode ({} steps, queries along the needle's key):", a.decode_steps);
    println!("    needle block {needle_block} selected in {hits}/{} steps (top-{n_sel} of {} blocks)", a.decode_steps, cache.len(0)?.div_ceil(cfg.sel_block));
    println!("    cosine(output, needle value): NSA {:.4}, full attention {:.4}", cos_nsa / steps, cos_full / steps);
    println!("    NSA vs full attention output: relative L2 difference {:.2e}", rel / steps);
    // Both timed the same way (backend.rs): the engine's work from inputs in place.
    let ratio = m_full / m_nsa.max(1e-12);
    println!(
        "    time per decode step (median, the engine's work from inputs in place{}): NSA {:.3} ms (append + all branches), full attention {:.3} ms; NSA is {:.1}x {}",
        if cuda { ", host-launched, step upload included in NSA's" } else { "" },
        m_nsa * 1e3,
        m_full * 1e3,
        if ratio >= 1.0 { ratio } else { 1.0 / ratio },
        if ratio >= 1.0 { "faster" } else { "slower" }
    );
    let ok = hits as u32 == a.decode_steps;
    println!("  result: {}", if ok { "PASS: NSA found the needle at every step" } else { "MISS: the needle's block was not always selected" });
    if !ok {
        std::process::exit(3);
    }
    Ok(())
}
