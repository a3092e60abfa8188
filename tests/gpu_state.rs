//! Per-sequence state export/import on the CUDA backend (`src/cuda/state.rs`): a state
//! moves between the CPU and CUDA backends unchanged, a sequence restored on the device
//! continues decoding as the CPU engine does, and bad buffers change nothing. Every test
//! needs a device: they are ignored without `--include-ignored`, and fail when forced on a
//! machine without one (scripts/gpu-run.sh runs them on the GPU machine).
#![cfg(feature = "cuda")]

mod common;
mod gpu_harness;

use common::{Buf, Engine, Rng, SeqData};
use gpu_harness::*;
use half::bf16;
use nsa::cpu::{CpuBackend, PhiWeights};
use nsa::cuda::CudaBackend;
use nsa::{Cache, Dtype, NsaError, Preset, StepSeq};

/// The device: these tests are `#[ignore]`d without one, so reaching here without one is
/// a failure, never a silent pass.
fn device() {
    if let Err(e) = CudaBackend::probe() {
        panic!("this test needs a CUDA device (run it with --include-ignored only on a GPU machine): {e}");
    }
}

fn config() -> nsa::Config {
    let mut c = cfg_for(Preset::Paper, 8, 2, 64, 64, Dtype::Bf16, 4, 2048, 1024);
    c.num_layers = 2;
    c.fit_pages();
    c
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn a_cpu_state_goes_through_the_device_unchanged_and_bad_buffers_change_nothing() {
    device();
    let c = config();
    // A sequence of 333 tokens on the CPU (partial last pages, several compressed pages).
    let mut e = Engine::new(&c);
    let mut cache = Cache::new(&c, e.arena.bytes()).unwrap();
    let mut cpu = CpuBackend::new(&c, e.pool.bytes()).unwrap();
    let mut rng = Rng::new(71);
    cache.add_sequence(1).unwrap();
    cache.plan_step(&[StepSeq { seq: 1, tokens: 333 }]).unwrap();
    for l in 0..c.num_layers {
        let d = SeqData::random::<bf16>(&c, 333, &mut rng);
        let to = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
        cpu.append_layer(&cache, l, &to(&d.k), &to(&d.v), PhiWeights::default()).unwrap();
    }
    let mut cbuf = vec![0u8; cache.sequence_state_bytes(1).unwrap()];
    cpu.export_sequence(&cache, 1, &mut cbuf).unwrap();

    // Into slot 2 of a device cache, and back out: the same bytes.
    let mut gpu = CudaBackend::with_allocation(&c).unwrap();
    let stream = std::ptr::null_mut();
    let mut garena = Buf::new(Cache::arena_bytes(&c).unwrap());
    let mut gcache = Cache::new(&c, garena.bytes()).unwrap();
    gcache.add_sequence(0).unwrap();
    let before = gcache.state_bytes().to_vec();
    let mut bad = cbuf.clone();
    bad[16 + 4 * 3] ^= 1; // head_dim_v
    let err = gpu.import_sequence(&mut gcache, 2, &bad, stream).unwrap_err();
    assert!(matches!(err, NsaError::InvalidArgument { .. }) && err.to_string().contains("head_dim_v"), "{err}");
    assert!(matches!(gpu.import_sequence(&mut gcache, 0, &cbuf, stream), Err(NsaError::SequenceExists { seq: 0 })));
    assert!(gcache.state_bytes() == before.as_slice(), "a refused import changed the cache");

    gpu.import_sequence(&mut gcache, 2, &cbuf, stream).unwrap();
    gcache.check_invariants().unwrap();
    assert_eq!(gcache.len(2).unwrap(), 333);
    let mut gbuf = vec![0xEEu8; cbuf.len()];
    assert_eq!(gpu.export_sequence(&gcache, 2, &mut gbuf, stream).unwrap(), cbuf.len());
    assert!(gbuf == cbuf, "the state changed on its way through the device");
    let mut small = vec![0u8; cbuf.len() - 1];
    assert!(matches!(gpu.export_sequence(&gcache, 2, &mut small, stream), Err(NsaError::BufferTooSmall { .. })));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn a_sequence_restored_on_the_device_decodes_as_the_cpu_engine() {
    device();
    let c = config();
    let mut h = Harness::<bf16>::new("state_restore", &c, 72);
    h.add(0);
    h.add(1);
    h.step(&[(0, 500), (1, 90)]);
    for _ in 0..5 {
        h.step(&[(0, 1), (1, 1)]);
    }
    let n = h.cache.sequence_state_bytes(0).unwrap();
    let (mut gbuf, mut cbuf) = (vec![0u8; n], vec![0u8; n]);
    h.gpu.export_sequence(&h.cache, 0, &mut gbuf, h.stream).unwrap();
    h.cpu.export_sequence(&h.cache, 0, &mut cbuf).unwrap();
    assert_eq!(gbuf[..nsa::cache::STATE_HEADER_BYTES], cbuf[..nsa::cache::STATE_HEADER_BYTES], "headers differ");
    // Remove it; slot 1 grows into its pages, overwriting them on both backends.
    h.cache.remove(0).unwrap();
    h.step(&[(1, 600)]);
    // Restore into slot 3 on the device, then (same pages: remove gives them back in the
    // order import took them) on the CPU, so both backends hold the sequence.
    h.gpu.import_sequence(&mut h.cache, 3, &gbuf, h.stream).unwrap();
    let pages = (h.cache.raw_pages(3).unwrap().to_vec(), h.cache.cmp_pages(3).unwrap().to_vec());
    h.cache.remove(3).unwrap();
    h.cpu.import_sequence(&mut h.cache, 3, &cbuf).unwrap();
    assert_eq!(pages, (h.cache.raw_pages(3).unwrap().to_vec(), h.cache.cmp_pages(3).unwrap().to_vec()));
    // Decoding continues on both; the harness compares every output and selection.
    for _ in 0..40 {
        h.step(&[(3, 1), (1, 1)]);
    }
    let s = h.finish();
    println!("RESULT state_restore: {} rows, max err {:e}, {} near ties, max pool err {:e}", s.rows, s.max_err, s.near_ties, s.max_pool_err);
}
