//! The CUDA backend's API contract: probing never panics, bad arguments fail before any
//! launch and change nothing, the step must be uploaded before layers run. Runs its
//! device-free parts everywhere; the rest skips without a device.
#![cfg(feature = "cuda")]

mod common;
mod gpu_harness;

use common::Buf;
use gpu_harness::*;
use nsa::cuda::{CudaBackend, DeviceBuf, DeviceLayerIo};
use nsa::{Cache, Dtype, NsaError, Preset, StepSeq};

#[test]
fn probe_never_panics_and_names_the_reason() {
    match CudaBackend::probe() {
        Ok(d) => {
            println!("device: {} sm_{}{} {} SMs, {} MiB, driver {}, nvrtc {}.{}", d.name, d.compute_capability.0, d.compute_capability.1, d.multiprocessors, d.total_memory >> 20, d.driver_version, d.nvrtc_version.0, d.nvrtc_version.1);
            assert!(d.compute_capability.0 >= 8);
        }
        Err(NsaError::BackendUnavailable(why)) => {
            println!("SKIP: no CUDA device: {why}");
            assert!(!why.is_empty());
        }
        Err(e) => panic!("probe must report BackendUnavailable, got {e}"),
    }
}

#[test]
fn device_bytes_needs_no_device() {
    let c = cfg_for(Preset::Paper, 8, 2, 64, 64, Dtype::Bf16, 4, 4096, 1024);
    let n = CudaBackend::device_bytes(&c).unwrap();
    assert!(n >= nsa::layout::Layout::new(&c).unwrap().pool_bytes);
    let mut bad = c;
    bad.num_kv_heads = 3;
    assert!(matches!(CudaBackend::device_bytes(&bad), Err(NsaError::InvalidConfig { .. })));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn bad_arguments_fail_before_any_launch() {
    if device_or_skip("bad_arguments_fail_before_any_launch").is_none() {
        return;
    }
    let c = cfg_for(Preset::Paper, 8, 2, 64, 64, Dtype::Bf16, 4, 4096, 1024);
    let need = CudaBackend::device_bytes(&c).unwrap();
    // Buffer too small, misaligned, null, not device memory.
    let buf = DeviceBuf::new(need).unwrap();
    assert!(matches!(CudaBackend::new(&c, buf.ptr(), need - 1), Err(NsaError::BufferTooSmall { .. })));
    assert!(matches!(CudaBackend::new(&c, buf.ptr() + 16, need), Err(NsaError::Misaligned { .. })));
    assert!(matches!(CudaBackend::new(&c, 0, need), Err(NsaError::InvalidArgument { .. })));
    assert!(matches!(CudaBackend::new(&c, 0x1000_0000_0000, need), Err(NsaError::InvalidArgument { .. })));
    let small = DeviceBuf::new(need / 2).unwrap();
    let e = CudaBackend::new(&c, small.ptr(), need).err().unwrap();
    assert!(matches!(e, NsaError::InvalidArgument { .. }), "{e}");

    let mut gpu = CudaBackend::new(&c, buf.ptr(), need).unwrap();
    let mut arena = Buf::new(Cache::arena_bytes(&c).unwrap());
    let mut cache = Cache::new(&c, arena.bytes()).unwrap();
    cache.add_sequence(0).unwrap();
    let s = std::ptr::null_mut();
    let d = DeviceBuf::new(1 << 20).unwrap();
    let io = DeviceLayerIo { q: d.ptr(), k: d.ptr(), v: d.ptr(), gates: d.ptr(), out: d.ptr(), selected: 0, phi_k: 0, phi_v: 0 };
    // No step planned.
    assert!(matches!(gpu.upload_step(&cache, s), Err(NsaError::NoStep)));
    assert!(matches!(gpu.run_layer(&cache, 0, &io, s), Err(NsaError::NoStep)));
    cache.plan_step(&[StepSeq { seq: 0, tokens: 5 }]).unwrap();
    // Planned but not uploaded.
    let e = gpu.run_layer(&cache, 0, &io, s).unwrap_err();
    assert!(e.to_string().contains("upload_step"), "{e}");
    gpu.upload_step(&cache, s).unwrap();
    assert!(matches!(gpu.run_layer(&cache, 1, &io, s), Err(NsaError::InvalidArgument { arg: "layer", .. })));
    let e = gpu.run_layer(&cache, 0, &DeviceLayerIo { q: 0, ..io }, s).unwrap_err();
    assert!(e.to_string().contains("io.q"), "{e}");
    // No layer ran: the step is open until aborted. A new plan invalidates the upload.
    assert!(matches!(cache.plan_step(&[StepSeq { seq: 0, tokens: 1 }]), Err(NsaError::StepOpen { .. })));
    cache.abort_step().unwrap();
    cache.plan_step(&[StepSeq { seq: 0, tokens: 1 }]).unwrap();
    assert!(gpu.run_layer(&cache, 0, &io, s).unwrap_err().to_string().contains("upload_step"));
    gpu.upload_step(&cache, s).unwrap();
    gpu.run_layer(&cache, 0, &io, s).unwrap();
    gpu.synchronize(s).unwrap();
    // Another config's cache is refused.
    let mut c2 = c;
    c2.window = 128;
    let mut arena2 = Buf::new(Cache::arena_bytes(&c2).unwrap());
    let mut cache2 = Cache::new(&c2, arena2.bytes()).unwrap();
    cache2.add_sequence(0).unwrap();
    cache2.plan_step(&[StepSeq { seq: 0, tokens: 1 }]).unwrap();
    assert!(matches!(gpu.upload_step(&cache2, s), Err(NsaError::InvalidArgument { arg: "cache", .. })));
    // Another cache of the same config too: the backend serves `cache` (issue 13, item 3).
    let mut arena3 = Buf::new(Cache::arena_bytes(&c).unwrap());
    let mut cache3 = Cache::new(&c, arena3.bytes()).unwrap();
    cache3.add_sequence(0).unwrap();
    cache3.plan_step(&[StepSeq { seq: 0, tokens: 1 }]).unwrap();
    let e = gpu.upload_step(&cache3, s).unwrap_err();
    assert!(e.to_string().contains(&format!("serves cache #{}", cache.id())), "{e}");
    let e = gpu.run_layer(&cache3, 0, &io, s).unwrap_err();
    assert!(e.to_string().contains(&format!("serves cache #{}", cache.id())), "{e}");
    assert_eq!(cache3.layers_run(), 0);
    // A second run of layer 0 in the step is refused; after the next plan it runs again.
    assert!(matches!(gpu.run_layer(&cache, 0, &io, s), Err(NsaError::LayerAlreadyRun { layer: 0, .. })));
    cache.plan_step(&[StepSeq { seq: 0, tokens: 1 }]).unwrap();
    gpu.upload_step(&cache, s).unwrap();
    gpu.run_layer(&cache, 0, &io, s).unwrap();
    gpu.synchronize(s).unwrap();
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-run.sh runs it with --include-ignored"]
fn kernel_cache_on_disk_is_reused() {
    let Some(info) = device_or_skip("kernel_cache_on_disk_is_reused") else { return };
    let dir = std::env::temp_dir().join(format!("nsa-kcache-{}", std::process::id()));
    let c = cfg_for(Preset::Fla, 4, 2, 32, 32, Dtype::F16, 2, 512, 64);
    let opts = nsa::cuda::CudaOptions { cache_dir: Some(dir.clone()), ..Default::default() };
    let need = CudaBackend::device_bytes(&c).unwrap();
    let buf = DeviceBuf::new(need).unwrap();
    let _b = CudaBackend::new_with(&c, buf.ptr(), need, &opts).unwrap();
    let key = nsa::cuda::cache_key(&info.arch).unwrap();
    // The in-process cache may already hold this architecture (other tests): then the
    // file is not written by this call; compile path tested by the unit test.
    if let Ok(meta) = std::fs::metadata(dir.join(&key)) {
        assert!(meta.len() > 1000);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
