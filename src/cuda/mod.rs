//! The CUDA backend: K/V pools and the per-step workspace in one device buffer the caller
//! owns (or that [`CudaBackend::with_allocation`] allocates once), kernels from
//! `kernels/nsa.cu` compiled with NVRTC once per device architecture, launches on the
//! caller's `CUstream` in the device's primary context.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): without a driver, every entry
//! point returns [`NsaError::BackendUnavailable`] and nothing panics. [`probe`] says
//! whether a usable device is there.
//!
//! Per step: [`Cache::plan_step`], then [`CudaBackend::upload_step`] once (copies the plan
//! and the page tables of the step's sequences into the workspace), then
//! [`CudaBackend::run_layer`] for every layer. Neither allocates on host or device. The
//! device pools use the CPU backend's layout (`[layer][pool][page][kv_head][token][dim]`,
//! offsets from [`Layout`]), so a download of the pools equals the CPU pools.
//!
//! Launch sequence of a layer (see the kernel file's header): one launch for the step's
//! writes (copy-on-write copies, appends, compressed tokens), then per wave of query
//! rows: compressed attention split over blocks, selection split over chunks of blocks,
//! selected + window attention split over blocks, gated combine. An append-only run
//! (`q == 0 && out == 0`) stops after the first launch. The attention kernels run on
//! tensor cores (mma.sync; tiles loaded as tensor-map boxes on sm_90 where the config
//! allows, else 1-D bulk copies on sm_90, `cp.async` before) for bf16/f16 with DK and DV
//! multiples of 16, else on the scalar kernels. Split counts are picked per launch from
//! the row count (one wave of blocks); grid shapes depend only on the step's token and
//! sequence counts and the config; lengths are read on the device, so a decode step can
//! be captured in a CUDA graph (upload_step stays outside: it writes host staging
//! buffers and issues copies from them).
//! [`CudaBackend::attend_full`] is the full-attention baseline over the same cache.

// `CUstream` is an opaque driver handle passed through to the driver, never dereferenced here.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod compile;
mod consts;
mod driver;
mod params;
mod staging;
mod tensor_map;

use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};

use cudarc::driver::sys;

use crate::cache::Cache;
use crate::config::{Config, Dtype, Phi};
use crate::error::{NsaError, Result};
use crate::layout::{Layout, PageCopy, PlanSeq};
pub use compile::{cache_key, KERNEL_FILES};
use consts::{MBAR_BYTES, MMA_KEYS, MMA_MAX_STAGES, MMA_WARPS, NT_ATT, NT_WIDE, SEL_CHUNK, TK, WINDOW_ALIGN};
use driver::{check, CtxGuard};
pub use driver::{stream_sync, CUdeviceptr, CUstream, DeviceBuf};
use params::{DevLayout, Params};
use staging::Staging;

/// What [`probe`] found: the device the backend would use (ordinal 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: i32,
    pub name: String,
    /// Compute capability (major, minor); the backend needs 8.0 or newer.
    pub compute_capability: (i32, i32),
    /// NVRTC target the kernels are compiled for, e.g. `sm_90`.
    pub arch: String,
    pub multiprocessors: i32,
    pub total_memory: usize,
    /// `cuDriverGetVersion`, e.g. 13000.
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
    /// Opt-in shared memory per block, bytes.
    pub max_shared_per_block: i32,
}

/// Whether a CUDA device is usable: the driver and NVRTC load, a device exists and has
/// compute capability 8.0 or newer. Never panics; the error says why not.
pub fn probe() -> Result<DeviceInfo> {
    match std::panic::catch_unwind(probe_inner) {
        Ok(r) => r,
        Err(_) => Err(NsaError::BackendUnavailable("loading the CUDA libraries panicked".into())),
    }
}

fn probe_inner() -> Result<DeviceInfo> {
    let unavailable = |e: NsaError| match e {
        NsaError::Cuda(s) => NsaError::BackendUnavailable(s),
        other => other,
    };
    driver::libraries_present().map_err(NsaError::BackendUnavailable)?;
    // SAFETY: the driver library is present; plain driver queries.
    unsafe {
        check(sys::cuInit(0), "cuInit").map_err(unavailable)?;
        let mut n = 0;
        check(sys::cuDeviceGetCount(&mut n), "cuDeviceGetCount").map_err(unavailable)?;
        if n == 0 {
            return Err(NsaError::BackendUnavailable("the CUDA driver sees no device".into()));
        }
        let mut dev = 0;
        check(sys::cuDeviceGet(&mut dev, 0), "cuDeviceGet").map_err(unavailable)?;
        use sys::CUdevice_attribute::*;
        let major = driver::device_attr(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = driver::device_attr(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sms = driver::device_attr(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let smem = driver::device_attr(dev, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let mut name = [0 as std::ffi::c_char; 256];
        check(sys::cuDeviceGetName(name.as_mut_ptr(), 255, dev), "cuDeviceGetName")?;
        let name = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        let mut mem = 0usize;
        check(sys::cuDeviceTotalMem_v2(&mut mem, dev), "cuDeviceTotalMem")?;
        let mut drv = 0;
        check(sys::cuDriverGetVersion(&mut drv), "cuDriverGetVersion")?;
        let nvrtc = compile::nvrtc_version().map_err(unavailable)?;
        if major < 8 {
            return Err(NsaError::BackendUnavailable(format!(
                "device 0 ({name}) has compute capability {major}.{minor}; the CUDA backend needs 8.0 or newer"
            )));
        }
        Ok(DeviceInfo {
            ordinal: 0,
            name,
            compute_capability: (major, minor),
            arch: format!("sm_{major}{minor}"),
            multiprocessors: sms,
            total_memory: mem,
            driver_version: drv,
            nvrtc_version: nvrtc,
            max_shared_per_block: smem,
        })
    }
}

/// One layer's device arrays for the planned step (device pointers; 0 = none). Shapes
/// and meaning as [`crate::cpu::LayerIo`]: `q [tokens, HQ, DK]`, `k [tokens, HKV, DK]`,
/// `v [tokens, HKV, DV]` in the config's dtype; `gates [tokens, HQ, 3]` f32;
/// `out [tokens, HQ, DV]` written; `selected [tokens, HKV, n]` i32, written when not 0;
/// `phi_k`, `phi_v`: the layer's f32 phi weights (`Config::phi_weight_len`), 0 for mean.
///
/// **Append-only runs:** with `q == 0` and `out == 0`, [`CudaBackend::run_layer`] only
/// makes the step's copy-on-write copies, appends `k`/`v` and emits finished compressed
/// tokens (no attention; `gates` and `selected` are ignored), like
/// [`crate::cpu::CpuBackend::append_layer`]: for filling a cache from K/V the host already
/// has, without paying for prefill attention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceLayerIo {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub gates: u64,
    pub out: u64,
    pub selected: u64,
    pub phi_k: u64,
    pub phi_v: u64,
}

/// Options of [`CudaBackend::new_with`].
#[derive(Debug, Clone, Default)]
pub struct CudaOptions {
    /// Directory of the on-disk cache of compiled kernels; `None`: the environment
    /// variable `NSA_CUDA_CACHE_DIR` if set, else no disk cache.
    pub cache_dir: Option<PathBuf>,
}

/// Appends, copy-on-write copies and compression, in one launch.
const K_APPEND: usize = 0;
const K_CMP: usize = 1;
const K_SELECT: usize = 2;
const K_SW: usize = 3;
const K_COMBINE: usize = 4;
const K_FULL: usize = 5;
const K_FULL_COMBINE: usize = 6;
/// Tensor-core variants of K_CMP, K_SW, K_FULL (bf16/f16, DK and DV multiples of 16).
const K_CMP_MMA: usize = 7;
const K_SW_MMA: usize = 8;
const K_FULL_MMA: usize = 9;
const NK: usize = 10;
const KERNELS: [&str; NK] = [
    "append",
    "cmp_partial",
    "select_blocks",
    "sw_partial",
    "combine",
    "full_partial",
    "full_combine",
    "cmp_mma",
    "sw_mma",
    "full_mma",
];
/// Blocks per multiprocessor a launch aims for when it picks its split counts.
const BLOCKS_PER_SM: u32 = 2;
const NT_MMA: u32 = MMA_WARPS * 32;
const NT_SEL: u32 = NT_WIDE;
/// Threads of the gated combine: 256 / DV parts sum slices of the units in parallel.
const NT_COMB: u32 = NT_WIDE;
const NT_MISC: u32 = NT_WIDE;
const DEFAULT_SMEM: usize = 48 * 1024;

/// The CUDA backend over one caller-owned device buffer.
pub struct CudaBackend {
    cfg: Config,
    lay: Layout,
    dl: DevLayout,
    base: u64,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    module: sys::CUmodule,
    funcs: [sys::CUfunction; NK],
    info: DeviceInfo,
    hc: u32,
    smem: [u32; NK],
    /// Whether the tensor-core attention kernels are used (bf16/f16, DK and DV multiples
    /// of 16, DV <= 256, shared memory fits; `NSA_CUDA_SCALAR=1` turns them off).
    mma: bool,
    /// Blocks of a tensor-core kernel per multiprocessor (occupancy at `nstage` stages).
    mma_per_sm: u32,
    /// Copy pipeline stages of the tensor-core kernels (`NSA_CUDA_STAGES` overrides).
    nstage: u32,
    /// Tensor-core kernels load tiles as tensor-map boxes (`tensor_map.rs`; sm_90 and a
    /// config it supports; `NSA_CUDA_NO_TMA=1` at creation turns it off).
    tma: bool,
    /// Tensor-core kernels load tiles with 1-D bulk copies (sm_90+; `NSA_CUDA_NO_BULK=1`
    /// at creation falls back to cp.async).
    bulk: bool,
    /// Page-locked host mirrors of the uploaded regions (meta .. end of cmp tables), two
    /// in turn, allocated once (`None` only while dropping).
    staging: Option<Staging>,
    /// The plan last uploaded (capacity `max_step_seqs`, never grows).
    uploaded: Vec<PlanSeq>,
    uploaded_tokens: u32,
    uploaded_valid: bool,
    owned: Option<DeviceBuf>,
}

// SAFETY: the handles are driver objects usable from any thread; `&mut self` methods
// serialize use of the staging buffer.
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    /// Whether a CUDA device is usable (see [`probe`]).
    pub fn probe() -> Result<DeviceInfo> {
        probe()
    }

    /// Bytes of device memory the backend needs for `cfg`: every layer's K/V pools
    /// (`Layout::pool_bytes`, first, at offset 0) plus the workspace (uploaded plan and
    /// page tables, compressed logits, selection indices, split-KV partials).
    pub fn device_bytes(cfg: &Config) -> Result<usize> {
        cfg.validate()?;
        let lay = Layout::new(cfg)?;
        Ok(DevLayout::new(cfg, &lay)?.total)
    }

    /// Creates the backend over the caller's device buffer `device_ptr..+bytes` (at least
    /// `device_bytes(cfg)`, 256-byte aligned, allocated in device 0's primary context):
    /// compiles the kernels (once per architecture and process), loads them into the
    /// primary context, allocates the page-locked upload staging (`staging.rs`) and
    /// initialises the workspace (selection counters, tensor maps). The pools' contents
    /// are left as they are.
    pub fn new(cfg: &Config, device_ptr: u64, bytes: usize) -> Result<Self> {
        Self::new_with(cfg, device_ptr, bytes, &CudaOptions::default())
    }

    /// [`CudaBackend::new`] with options (the kernel cache directory).
    pub fn new_with(cfg: &Config, device_ptr: u64, bytes: usize, opts: &CudaOptions) -> Result<Self> {
        let need = Self::device_bytes(cfg)?;
        let info = probe()?;
        if device_ptr == 0 {
            return Err(NsaError::arg("device_ptr", 0, "must be a device allocation"));
        }
        if device_ptr % 256 != 0 {
            return Err(NsaError::Misaligned { what: "device buffer", addr: device_ptr as usize, align: 256 });
        }
        if bytes < need {
            return Err(NsaError::BufferTooSmall { what: "device buffer", got: bytes, need });
        }
        let (dev, ctx) = driver::primary_context()?;
        match Self::build(cfg, device_ptr, bytes, opts, info, dev, ctx) {
            Ok(b) => Ok(b),
            Err(e) => {
                driver::release_primary(dev);
                Err(e)
            }
        }
    }

    /// Allocates `device_bytes(cfg)` once with `cuMemAlloc` and creates the backend over it
    /// (freed when the backend drops).
    pub fn with_allocation(cfg: &Config) -> Result<Self> {
        let need = Self::device_bytes(cfg)?;
        probe()?;
        let buf = DeviceBuf::new(need)?;
        let mut b = Self::new(cfg, buf.ptr(), need)?;
        b.owned = Some(buf);
        Ok(b)
    }

    fn build(
        cfg: &Config,
        device_ptr: u64,
        bytes: usize,
        opts: &CudaOptions,
        info: DeviceInfo,
        dev: sys::CUdevice,
        ctx: sys::CUcontext,
    ) -> Result<Self> {
        let lay = Layout::new(cfg)?;
        let dl = DevLayout::new(cfg, &lay)?;
        let _g = CtxGuard::push(ctx)?;
        // The buffer must be device memory of this context covering the whole range.
        let (mut abase, mut asize) = (0u64, 0usize);
        // SAFETY: plain query on a caller-supplied address.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut abase, &mut asize, device_ptr) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(NsaError::arg(
                "device_ptr",
                format!("{device_ptr:#x}"),
                format!("is not device memory of device 0's primary context ({r:?})"),
            ));
        }
        if device_ptr + bytes as u64 > abase + asize as u64 {
            return Err(NsaError::arg(
                "bytes",
                bytes,
                format!("runs past the end of the allocation holding device_ptr ({asize} bytes at {abase:#x})"),
            ));
        }

        // Shared memory of each kernel; the attention kernels take the group's heads in
        // chunks of `hc` so any group size fits.
        let (g, dk, dv) = (cfg.group_size() as usize, cfg.head_dim_qk as usize, cfg.head_dim_v as usize);
        let tk = TK as usize;
        let att = |hc: usize| 4 * (hc * dk + hc * tk + tk * dv + hc * dv + 3 * hc);
        let optin = info.max_shared_per_block.max(DEFAULT_SMEM as i32) as usize;
        let mut hc = g;
        while hc > 1 && att(hc) > DEFAULT_SMEM {
            hc -= 1;
        }
        let smem_att = att(hc);
        // Compress: a row and an accumulator, then the MLP's hidden units or l row pointers.
        let hidden = if cfg.phi == Phi::Mlp { cfg.phi_hidden as usize } else { 0 };
        let smem_cmp = 4 * (2 * dk.max(dv) + hidden.max(2 * cfg.cmp_block as usize));
        // Selection: the chunk phase's floats, or the merge phase's candidate lists.
        let (a_cmp, b_sel) = ((cfg.cmp_block / cfg.cmp_stride) as usize, (cfg.sel_block / cfg.cmp_stride) as usize);
        let (cbmax, n) = (SEL_CHUNK as usize, cfg.sel_count as usize);
        let smem_sel = (4 * (2 * g + cbmax * (b_sel + 1) + a_cmp)).max(dl.sel_chunks as usize * (n * 8 + 4) + 4 * n);
        // Combine: per head of the block m, f over the units and (m, l) per branch, plus the
        // parts' sums (only with one head per block, parts * DV <= NT_COMB).
        let units_max = (dl.nsplit_c + dl.units_s + dl.units_w) as usize;
        let smem_comb = 4 * (g * (2 * units_max + 6) + 3 * (NT_COMB as usize).max(dv));
        let scalar_forced = std::env::var("NSA_CUDA_SCALAR").is_ok_and(|v| v == "1");
        let bulk = info.compute_capability.0 >= 9 && !std::env::var("NSA_CUDA_NO_BULK").is_ok_and(|v| v == "1");
        let tma = bulk && tensor_map::supported(cfg) && !std::env::var("NSA_CUDA_NO_TMA").is_ok_and(|v| v == "1");
        // Q tile | mbarriers | per warp and stage K and V tiles (padded rows, or unpadded
        // boxes from a 1024-byte boundary with tensor maps).
        let smem_mma = |stages: usize| {
            let keys = MMA_KEYS as usize;
            let tile = if tma { 2 * keys * (dk + dv) } else { 2 * keys * (dk + dv + 16) };
            2 * 16 * (dk + 8) + MBAR_BYTES as usize + if tma { 1024 } else { 0 } + MMA_WARPS as usize * stages * tile
        };
        let mma = cfg.dtype != Dtype::F32 && dk % 16 == 0 && dv % 16 == 0 && dv <= 256 && smem_mma(2) <= optin && !scalar_forced;
        let nvt = if dv <= 128 { 16 } else { 32 };
        for (what, n) in [
            ("attention (head_dim_qk, head_dim_v)", smem_att),
            ("compress (phi_hidden)", smem_cmp),
            ("selection (max_seq_len / sel_block)", smem_sel),
            ("combine (sel_count + window / sel_block)", smem_comb),
        ] {
            if n > optin {
                return Err(NsaError::config(
                    "cuda",
                    what,
                    format!("the {what} kernel needs {n} bytes of shared memory, the device allows {optin}"),
                ));
            }
        }
        let mut smem = [0u32; NK];
        smem[K_APPEND] = smem_cmp as u32;
        smem[K_CMP] = smem_att as u32;
        smem[K_SW] = smem_att as u32;
        smem[K_FULL] = smem_att as u32;
        smem[K_SELECT] = smem_sel as u32;
        smem[K_COMBINE] = smem_comb as u32;
        smem[K_FULL_COMBINE] = smem_comb as u32;
        // The tensor-core kernels may use up to MMA_MAX_STAGES stages (the attribute is
        // set for the most that fits); the count is picked by occupancy once loaded.
        let stages_fit = (2..=MMA_MAX_STAGES as usize).filter(|&s| smem_mma(s) <= optin).max().unwrap_or(2);
        for k in [K_CMP_MMA, K_SW_MMA, K_FULL_MMA] {
            smem[k] = if mma { smem_mma(stages_fit) as u32 } else { 0 };
        }

        let dir: Option<PathBuf> = opts.cache_dir.clone().or_else(|| std::env::var_os("NSA_CUDA_CACHE_DIR").map(PathBuf::from));
        let bin = compile::cubin(&info.arch, dir.as_deref().map(Path::new))?;
        let mut module = std::ptr::null_mut();
        // SAFETY: a CUBIN from NVRTC for this device's architecture.
        check(unsafe { sys::cuModuleLoadData(&mut module, bin.as_ptr() as *const c_void) }, "cuModuleLoadData")?;
        let suffix = match cfg.dtype {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        };
        let mut funcs = [std::ptr::null_mut(); NK];
        let loaded = (|| {
            for (i, k) in KERNELS.iter().enumerate() {
                let name = if i >= K_CMP_MMA {
                    if !mma {
                        continue;
                    }
                    CString::new(format!("nsa_{k}_{suffix}_{nvt}")).expect("no NUL")
                } else {
                    CString::new(format!("nsa_{k}_{suffix}")).expect("no NUL")
                };
                // SAFETY: module loaded above; name is a kernel of it.
                check(unsafe { sys::cuModuleGetFunction(&mut funcs[i], module, name.as_ptr()) }, "cuModuleGetFunction")?;
                if smem[i] as usize > DEFAULT_SMEM {
                    // SAFETY: plain attribute on a function of our module.
                    check(
                        unsafe {
                            sys::cuFuncSetAttribute(
                                funcs[i],
                                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                smem[i] as i32,
                            )
                        },
                        "cuFuncSetAttribute",
                    )?;
                }
            }
            // Pipeline depth of the tensor-core kernels: the most stages that keep as many
            // blocks resident (by registers and shared memory) as two stages do. Measured
            // on the H100: resident warps matter more than depth (a warp's tile chain is
            // serial), so depth never costs a block.
            let mut pick = (2usize, 1u32);
            if mma {
                let occupancy = |s: usize| -> Result<u32> {
                    let mut blocks = 0i32;
                    // SAFETY: a loaded function; plain occupancy query.
                    check(
                        unsafe { sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut blocks, funcs[K_CMP_MMA], NT_MMA as i32, smem_mma(s)) },
                        "cuOccupancyMaxActiveBlocksPerMultiprocessor",
                    )?;
                    Ok(blocks.max(1) as u32)
                };
                pick = (2, occupancy(2)?);
                for s in 3..=stages_fit {
                    let b = occupancy(s)?;
                    if b == pick.1 {
                        pick.0 = s;
                    }
                }
                if let Some(s) = std::env::var("NSA_CUDA_STAGES").ok().and_then(|s| s.parse::<usize>().ok()) {
                    let s = s.clamp(2, stages_fit);
                    pick = (s, occupancy(s)?);
                }
                for k in [K_CMP_MMA, K_SW_MMA, K_FULL_MMA] {
                    smem[k] = smem_mma(pick.0) as u32;
                }
            }
            if tma && mma {
                let maps = tensor_map::encode_all(cfg, &lay, device_ptr + dl.pools.off as u64)?;
                // SAFETY: the region holds num_layers * 4 maps and lies inside the buffer.
                unsafe { driver::htod(device_ptr + dl.tmaps.off as u64, maps.as_ptr().cast(), maps.len(), std::ptr::null_mut())? };
            }
            // The selection's per-(row, KV head) counters start at 0 (each launch leaves them so).
            // SAFETY: the region lies inside the caller's buffer (checked above).
            check(unsafe { sys::cuMemsetD8_v2(device_ptr + dl.count.off as u64, 0, dl.count.bytes) }, "cuMemsetD8")?;
            check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")?;
            Ok(pick)
        })();
        let (nstage, mma_per_sm) = match loaded {
            Ok(x) => x,
            Err(e) => {
                // SAFETY: loaded above, unloaded once.
                unsafe { sys::cuModuleUnload(module) };
                return Err(e);
            }
        };
        let staging = match Staging::new(dl.cmp_tab.off + dl.cmp_tab.bytes - dl.meta.off) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: loaded above, unloaded once.
                unsafe { sys::cuModuleUnload(module) };
                return Err(e);
            }
        };
        Ok(CudaBackend {
            cfg: *cfg,
            lay,
            dl,
            base: device_ptr,
            dev,
            ctx,
            module,
            funcs,
            info,
            hc: hc as u32,
            smem,
            mma,
            mma_per_sm,
            nstage: nstage as u32,
            bulk,
            tma: tma && mma,
            staging: Some(staging),
            uploaded: Vec::with_capacity(cfg.max_step_seqs as usize),
            uploaded_tokens: 0,
            uploaded_valid: false,
            owned: None,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device_info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Device address of the K/V pools (all layers, the CPU backend's layout).
    pub fn pools_ptr(&self) -> u64 {
        self.base + self.dl.pools.off as u64
    }

    /// Bytes of the K/V pools (`Layout::pool_bytes`).
    pub fn pools_bytes(&self) -> usize {
        self.lay.pool_bytes
    }

    /// Heads per attention block pass (the group is split into chunks of this size when
    /// shared memory is short).
    pub fn head_chunk(&self) -> u32 {
        self.hc
    }

    /// Whether the attention kernels run on tensor cores (bf16/f16 with DK and DV
    /// multiples of 16 and DV <= 256; `NSA_CUDA_SCALAR=1` at creation turns them off).
    pub fn uses_tensor_cores(&self) -> bool {
        self.mma
    }

    /// Copies the planned step (its sequences, copy-on-write copies, per-token positions,
    /// finished compressed tokens and the page tables of its sequences) into the device
    /// workspace, on `stream`, from a page-locked staging buffer (two alternate; one is
    /// reused only after its previous copies ran). Call once per step, after `plan_step`,
    /// before `run_layer`; issue `run_layer` on the same stream (or order the streams).
    /// Allocates nothing.
    pub fn upload_step(&mut self, cache: &Cache, stream: CUstream) -> Result<()> {
        if cache.config() != &self.cfg {
            return Err(NsaError::arg("cache", "config", "the cache was made with a different config than the backend"));
        }
        let step = cache.step()?;
        let cfg = &self.cfg;
        let dl = self.dl;
        let m0 = dl.meta.off;
        let (pps, cpps) = (cfg.pages_per_seq() as usize, cfg.cmp_pages_per_seq() as usize);
        let _g = CtxGuard::push(self.ctx)?;
        let staging = self.staging.as_mut().expect("staging lives until drop");
        let st = staging.next()?;
        let put_i32 = |st: &mut [u8], off: usize, x: i32| st[off - m0..off - m0 + 4].copy_from_slice(&x.to_ne_bytes());
        // A whole page table in one copy.
        let put_i32s = |st: &mut [u8], off: usize, xs: &[i32]| {
            // SAFETY: any i32 is 4 initialised bytes; the view covers exactly `xs`.
            let bytes = unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) };
            st[off - m0..off - m0 + bytes.len()].copy_from_slice(bytes);
        };
        let mut njobs = 0usize;
        let mut trow = 0usize;
        for (si, ps) in step.seqs.iter().enumerate() {
            let base = dl.meta.off + dl.plan_off + si * std::mem::size_of::<PlanSeq>();
            for (i, x) in [ps.seq, ps.old_len, ps.new_len, ps.row].into_iter().enumerate() {
                put_i32(st, base + 4 * i, x as i32);
            }
            for t in ps.old_len..ps.new_len {
                let o = dl.tokmap.off + trow * 8;
                put_i32(st, o, si as i32);
                put_i32(st, o + 4, t as i32);
                trow += 1;
            }
            for i in cfg.num_cmp_tokens(ps.old_len)..cfg.num_cmp_tokens(ps.new_len) {
                let o = dl.jobs.off + njobs * 8;
                put_i32(st, o, si as i32);
                put_i32(st, o + 4, i as i32);
                njobs += 1;
            }
            put_i32s(st, dl.raw_tab.off + si * pps * 4, step.raw_table(ps.seq));
            put_i32s(st, dl.cmp_tab.off + si * cpps * 4, step.cmp_table(ps.seq));
        }
        for (ci, c) in step.copies.iter().enumerate() {
            let base = dl.meta.off + dl.copies_off + ci * std::mem::size_of::<PageCopy>();
            for (i, x) in [c.pool, c.src, c.dst, c.rows].into_iter().enumerate() {
                put_i32(st, base + 4 * i, x as i32);
            }
        }
        for (i, x) in [step.seqs.len(), step.tokens as usize, step.copies.len(), njobs].into_iter().enumerate() {
            put_i32(st, m0 + 4 * i, x as i32);
        }
        let nseqs = step.seqs.len();
        let regions = [
            (dl.meta.off, dl.meta.bytes),
            (dl.tokmap.off, trow * 8),
            (dl.jobs.off, njobs * 8),
            (dl.raw_tab.off, nseqs * pps * 4),
            (dl.cmp_tab.off, nseqs * cpps * 4),
        ];
        self.uploaded_valid = false;
        for (off, n) in regions {
            // SAFETY: every region lies inside the caller's buffer (checked at creation)
            // and inside the staging mirror, which stays untouched until these copies ran.
            unsafe { driver::htod(self.base + off as u64, staging.current().add(off - m0).cast(), n, stream)? };
        }
        staging.copied(stream)?;
        self.uploaded.clear();
        self.uploaded.extend_from_slice(step.seqs);
        self.uploaded_tokens = step.tokens;
        self.uploaded_valid = true;
        Ok(())
    }

    /// The planned step, after checking what every layer call needs: the cache has this
    /// backend's config, `layer` is in range, and the step is the one last uploaded.
    fn uploaded_step<'c>(&self, cache: &'c Cache, layer: u32, call: &str) -> Result<crate::plan::Step<'c>> {
        let cfg = &self.cfg;
        if cache.config() != cfg {
            return Err(NsaError::arg("cache", "config", "the cache was made with a different config than the backend"));
        }
        if layer >= cfg.num_layers {
            return Err(NsaError::arg("layer", layer, format!("layers are 0..{}", cfg.num_layers)));
        }
        let step = cache.step()?;
        if !self.uploaded_valid || step.tokens != self.uploaded_tokens || step.seqs != self.uploaded.as_slice() {
            return Err(NsaError::arg("step", "not uploaded", format!("call upload_step for the planned step before {call}")));
        }
        Ok(step)
    }

    /// Runs one layer of the uploaded step on `stream`: copy-on-write copies, appends the
    /// step's K/V rows, emits finished compressed tokens, writes NSA attention of every
    /// new token to `io.out` (and the selected blocks to `io.selected` when given).
    /// Launches only; nothing is allocated. Run each layer once per step.
    ///
    /// With `io.q == 0 && io.out == 0` the run is **append-only**: copies, append and
    /// compress, no attention (`io.gates` and `io.selected` are ignored); see
    /// [`DeviceLayerIo`]. It leaves the cache exactly as a full run would.
    ///
    /// Fails, launching nothing, when no step is planned or the planned step is not the
    /// one uploaded, `layer` is out of range, or a required pointer is 0.
    pub fn run_layer(&mut self, cache: &Cache, layer: u32, io: &DeviceLayerIo, stream: CUstream) -> Result<()> {
        let cfg = self.cfg;
        let step = self.uploaded_step(cache, layer, "run_layer")?;
        let append_only = io.q == 0 && io.out == 0;
        let required: &[(&str, u64)] = if append_only {
            &[("io.k", io.k), ("io.v", io.v)]
        } else {
            &[("io.q", io.q), ("io.k", io.k), ("io.v", io.v), ("io.gates", io.gates), ("io.out", io.out)]
        };
        for &(name, p) in required {
            if p == 0 {
                return Err(NsaError::arg(name, 0, "must be a device pointer"));
            }
        }
        if cfg.phi != Phi::Mean {
            for (name, p) in [("io.phi_k", io.phi_k), ("io.phi_v", io.phi_v)] {
                if p == 0 {
                    return Err(NsaError::arg(name, 0, format!("phi = {} needs weights", cfg.phi.name())));
                }
            }
        }
        let p = self.params(layer, io);
        let tokens = step.tokens;
        let nseqs = step.seqs.len() as u32;
        let hkv = cfg.num_kv_heads;
        let _g = CtxGuard::push(self.ctx)?;
        // SAFETY: every pointer in `p` was checked non-null or lies in the caller's buffer;
        // grids and shared memory match the kernels' expectations.
        unsafe {
            // Appends, copies and compressed tokens (K and V sides: z), one launch.
            let sides = if cfg.num_cmp_tokens(cfg.max_seq_len) > 0 { 2 } else { 1 };
            self.launch(K_APPEND, (2 * tokens + 2 * nseqs, hkv, sides), NT_MISC, &p, stream)?;
            if append_only {
                return Ok(());
            }
            let mut row0 = 0u32;
            while row0 < tokens {
                let rows = (tokens - row0).min(self.dl.wave_rows);
                let mut pw = p;
                pw.row0 = row0 as i32;
                self.wave_splits(&mut pw, rows);
                let units = (pw.units_s + pw.units_w) as u32;
                let nsplit = pw.nsplit_c as u32;
                if self.mma {
                    self.launch(K_CMP_MMA, (rows, hkv, nsplit), NT_MMA, &pw, stream)?;
                    self.launch(K_SELECT, (rows, hkv, pw.sel_chunks as u32), NT_SEL, &pw, stream)?;
                    self.launch(K_SW_MMA, (rows, hkv, units), NT_MMA, &pw, stream)?;
                } else {
                    self.launch(K_CMP, (rows, hkv, nsplit), NT_ATT, &pw, stream)?;
                    self.launch(K_SELECT, (rows, hkv, pw.sel_chunks as u32), NT_SEL, &pw, stream)?;
                    self.launch(K_SW, (rows, hkv, units), NT_ATT, &pw, stream)?;
                }
                self.launch(K_COMBINE, (rows, cfg.num_q_heads / pw.comb_heads as u32, 1), NT_COMB, &pw, stream)?;
                row0 += rows;
            }
        }
        Ok(())
    }

    /// Blocks of one attention launch that run at once (one wave).
    fn target_blocks(&self) -> u32 {
        let per_sm = if self.mma { self.mma_per_sm } else { BLOCKS_PER_SM };
        (self.info.multiprocessors.max(1) as u32) * per_sm
    }

    /// Split counts of one wave of `rows` query rows: as many compressed splits as fit in
    /// one wave of blocks (the kernels give each split at least 64 keys of the actual
    /// length); on tensor cores, selected blocks per unit (`spb`) by a wave model: waves
    /// x (keys per unit + 64 keys' worth of per-block overhead), the larger on ties.
    fn wave_splits(&self, p: &mut Params, rows: u32) {
        let cfg = &self.cfg;
        let pairs = rows * cfg.num_kv_heads;
        let slots = self.target_blocks();
        p.nsplit_c = (slots / pairs.max(1)).clamp(1, self.dl.nsplit_c) as i32;
        let mut spb = 1u32;
        if self.mma {
            let units = |spb: u32| cfg.sel_count.div_ceil(spb) + cfg.window.div_ceil(cfg.sel_block * spb);
            let cost = |spb: u32| (pairs * units(spb)).div_ceil(slots) * (spb * cfg.sel_block + 64);
            let mut c = 2 * spb;
            while c <= cfg.sel_count.next_power_of_two() {
                if cost(c) <= cost(spb) {
                    spb = c;
                }
                c *= 2;
            }
        }
        p.spb = spb as i32;
        // Combine: the most heads per block (a divisor of G) that still leaves two blocks
        // per multiprocessor.
        let heads = rows * cfg.num_q_heads;
        let two_waves = 2 * self.info.multiprocessors.max(1) as u32;
        p.comb_heads = (1..=cfg.group_size()).filter(|h| cfg.group_size() % h == 0 && heads / h >= two_waves).max().unwrap_or(1) as i32;
        // Selection: chunks of SEL_CHUNK blocks (chunks past the length exit). Small chunks
        // keep the per-chunk ranking (quadratic in the chunk) and the probability sums short;
        // the final merge reads one list per lane up to 32 chunks.
        p.sel_chunks = self.dl.sel_chunks as i32;
        p.units_s = cfg.sel_count.div_ceil(spb) as i32;
        // With tensor maps the window's range starts up to WINDOW_ALIGN - 1 keys early.
        let wkeys = if self.tma { cfg.window + WINDOW_ALIGN - 1 } else { cfg.window };
        p.units_w = wkeys.div_ceil(cfg.sel_block * spb) as i32;
    }

    /// The full-attention baseline over the same paged cache, on the device: plain causal
    /// attention of every query of the uploaded step over all keys of its sequence
    /// (`0..=position`), written to `out` (`[tokens, HQ, DV]`, the config's dtype) from
    /// `q` (`[tokens, HQ, DK]`). Split across thread blocks (split-KV, then a combine),
    /// every K/V load shared by the group's heads. Appends nothing: run `run_layer` (or an
    /// append-only run) for this layer and step first, so the step's rows are in the
    /// pools. Same checks as `run_layer`; compare with
    /// [`crate::cpu::CpuBackend::attend_full`].
    pub fn attend_full(&mut self, cache: &Cache, layer: u32, q: u64, out: u64, stream: CUstream) -> Result<()> {
        let cfg = self.cfg;
        let step = self.uploaded_step(cache, layer, "attend_full")?;
        for (name, ptr) in [("q", q), ("out", out)] {
            if ptr == 0 {
                return Err(NsaError::arg(name, 0, "must be a device pointer"));
            }
        }
        let io = DeviceLayerIo { q, out, ..Default::default() };
        let p = self.params(layer, &io);
        let tokens = step.tokens;
        let hkv = cfg.num_kv_heads;
        let max_units = self.dl.nsplit_c + self.dl.units_s + self.dl.units_w;
        let _g = CtxGuard::push(self.ctx)?;
        let mut row0 = 0u32;
        while row0 < tokens {
            let rows = (tokens - row0).min(self.dl.wave_rows);
            let mut pw = p;
            pw.row0 = row0 as i32;
            let nsplit = self.target_blocks().div_ceil(rows * hkv).clamp(1, max_units);
            pw.nsplit_c = nsplit as i32;
            pw.units_s = 0;
            pw.units_w = 0;
            // SAFETY: as in run_layer; `nsplit` partials per (row, head) fit the workspace
            // (at most the NSA units it was sized for).
            unsafe {
                if self.mma {
                    self.launch(K_FULL_MMA, (rows, hkv, nsplit), NT_MMA, &pw, stream)?;
                } else {
                    self.launch(K_FULL, (rows, hkv, nsplit), NT_ATT, &pw, stream)?;
                }
                self.launch(K_FULL_COMBINE, (rows, cfg.num_q_heads, 1), NT_ATT, &pw, stream)?;
            }
            row0 += rows;
        }
        Ok(())
    }

    fn params(&self, layer: u32, io: &DeviceLayerIo) -> Params {
        let cfg = &self.cfg;
        let dl = &self.dl;
        let es = cfg.dtype.size() as u64;
        let lb = self.base + dl.pools.off as u64 + layer as u64 * self.lay.layer_elems as u64 * es;
        let at = |off: usize| self.base + off as u64;
        Params {
            raw_k: lb + self.lay.raw_k as u64 * es,
            raw_v: lb + self.lay.raw_v as u64 * es,
            cmp_k: lb + self.lay.cmp_k as u64 * es,
            cmp_v: lb + self.lay.cmp_v as u64 * es,
            q: io.q,
            k: io.k,
            v: io.v,
            gates: io.gates,
            out: io.out,
            selected: io.selected,
            phi_k: io.phi_k,
            phi_v: io.phi_v,
            hdr: at(dl.meta.off),
            plan: at(dl.meta.off + dl.plan_off),
            copies: at(dl.meta.off + dl.copies_off),
            tokmap: at(dl.tokmap.off),
            jobs: at(dl.jobs.off),
            raw_tab: at(dl.raw_tab.off),
            cmp_tab: at(dl.cmp_tab.off),
            logits: at(dl.logits.off),
            sel: at(dl.sel.off),
            part_ml: at(dl.part_ml.off),
            part_acc: at(dl.part_acc.off),
            cand: at(dl.cand.off),
            count: at(dl.count.off),
            hq: cfg.num_q_heads as i32,
            hkv: cfg.num_kv_heads as i32,
            g: cfg.group_size() as i32,
            dk: cfg.head_dim_qk as i32,
            dv: cfg.head_dim_v as i32,
            page: cfg.page_size as i32,
            pps: cfg.pages_per_seq() as i32,
            cpps: cfg.cmp_pages_per_seq() as i32,
            cl: cfg.cmp_block as i32,
            cd: cfg.cmp_stride as i32,
            lsel: cfg.sel_block as i32,
            nsel: cfg.sel_count as i32,
            n_init: cfg.sel_init as i32,
            n_local: cfg.sel_local as i32,
            window: cfg.window as i32,
            phi: cfg.phi as i32,
            phi_hidden: cfg.phi_hidden as i32,
            phi_pe: cfg.phi_pe as i32,
            maxc: dl.maxc as i32,
            nb: cfg.max_sel_blocks() as i32,
            nsplit_c: dl.nsplit_c as i32,
            split_c: dl.split_c as i32,
            units_s: dl.units_s as i32,
            units_w: dl.units_w as i32,
            wave_rows: dl.wave_rows as i32,
            row0: 0,
            hc: self.hc as i32,
            mode: self.bulk as i32 | (self.tma as i32) << 1,
            tmaps: at(dl.tmaps.off + layer as usize * tensor_map::MAPS_PER_LAYER * tensor_map::TMAP_BYTES),
            scale: cfg.scale,
            spb: 1,
            sel_chunks: 1,
            nstage: self.nstage as i32,
            comb_heads: 1,
        }
    }

    /// # Safety
    /// `p` describes valid device memory for the kernel `k`.
    unsafe fn launch(&self, k: usize, grid: (u32, u32, u32), block: u32, p: &Params, stream: CUstream) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut args = [p as *const Params as *mut c_void];
        let r = sys::cuLaunchKernel(
            self.funcs[k],
            grid.0,
            grid.1,
            grid.2,
            block,
            1,
            1,
            self.smem[k],
            stream,
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(NsaError::Cuda(format!("cuLaunchKernel(nsa_{}) failed: {r:?}", KERNELS[k])));
        }
        Ok(())
    }

    /// Copies every layer's K/V pools (`pools_bytes()` bytes, the CPU backend's layout)
    /// into `dst` after the work queued on `stream`, and waits for it.
    pub fn download_pools(&self, dst: &mut [u8], stream: CUstream) -> Result<()> {
        let n = self.lay.pool_bytes;
        if dst.len() < n {
            return Err(NsaError::BufferTooSmall { what: "dst", got: dst.len(), need: n });
        }
        let _g = CtxGuard::push(self.ctx)?;
        // SAFETY: the pools lie inside the caller's buffer; dst has n bytes.
        unsafe { driver::dtoh_sync(dst.as_mut_ptr().cast(), self.pools_ptr(), n, stream) }
    }

    /// Waits for `stream` and reports any asynchronous kernel error as `NsaError::Cuda`.
    pub fn synchronize(&self, stream: CUstream) -> Result<()> {
        let _g = CtxGuard::push(self.ctx)?;
        stream_sync(stream)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Ok(_g) = CtxGuard::push(self.ctx) {
            // The page-locked buffers and events go while the context is current.
            self.staging = None;
            // SAFETY: loaded in `build`, unloaded once.
            unsafe {
                sys::cuModuleUnload(self.module);
            }
        }
        driver::release_primary(self.dev);
        // `owned` (if any) frees its allocation after this, in its own Drop.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    #[test]
    fn params_match_the_kernel_struct_size() {
        // 26 pointers + 33 four-byte fields (+ 4 bytes of tail padding).
        assert_eq!(std::mem::size_of::<Params>(), 26 * 8 + 34 * 4);
    }

    #[test]
    fn device_bytes_covers_pools_and_workspace() {
        for p in [Preset::Paper, Preset::Fla] {
            let c = Config::preset(p);
            let lay = Layout::new(&c).unwrap();
            let n = CudaBackend::device_bytes(&c).unwrap();
            assert!(n > lay.pool_bytes);
            assert_eq!(n % 256, 0);
        }
    }

    #[test]
    fn probe_never_panics() {
        match probe() {
            Ok(d) => assert!(d.compute_capability.0 >= 8),
            Err(NsaError::BackendUnavailable(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
}
