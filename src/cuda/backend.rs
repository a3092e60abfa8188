//! The CUDA backend proper (built with the `cuda` feature): creation (`build.rs`), the
//! per-step upload (`upload.rs`) and the launches (`launch.rs`) are methods of
//! [`CudaBackend`] defined in those files; this file holds its state and public methods.

use cudarc::driver::sys;

use super::build;
use super::device::probe;
use super::driver::{self, stream_sync, CtxGuard, CUstream, DeviceBuf};
use super::kernel::{Kernel, Kernels};
use super::prefill::PrefillPlan;
use super::params::{LaunchSetup, Params};
use super::staging::Staging;
use super::table_shadow::TableShadow;
use super::workspace::DevLayout;
use super::{CudaOptions, DeviceInfo, DeviceLayerIo};
use crate::cache::{Cache, CacheBinding};
use crate::config::Config;
use crate::error::{NsaError, Result};
use crate::layout::Layout;

/// The CUDA backend over one caller-owned device buffer.
pub struct CudaBackend {
    pub(super) cfg: Config,
    pub(super) lay: Layout,
    pub(super) dl: DevLayout,
    pub(super) base: u64,
    pub(super) dev: sys::CUdevice,
    pub(super) ctx: sys::CUcontext,
    /// `None` only while dropping.
    pub(super) kernels: Option<Kernels>,
    pub(super) info: DeviceInfo,
    /// The kernels' argument with every field fixed at creation filled in.
    pub(super) params: Params,
    /// Whether the tensor-core attention kernels are used (bf16/f16, DK and DV multiples
    /// of 16, DV <= 256, shared memory fits; `NSA_CUDA_SCALAR=1` turns them off).
    pub(super) mma: bool,
    /// Blocks of a tensor-core kernel per multiprocessor (occupancy at the picked stages).
    pub(super) mma_per_sm: u32,
    /// The tensor-core kernels' form for small waves (`build::SmallWave`).
    pub(super) small_wave: Option<build::SmallWave>,
    /// The most compressed splits a launch may use (`build::Plan::cmp_splits`).
    pub(super) cmp_splits: u32,
    /// Measurement knobs of the decode launches (`build::Plan::knobs`).
    pub(super) knobs: build::DecodeKnobs,
    /// Tensor-core kernels load tiles as tensor-map boxes (`tensor_map.rs`).
    pub(super) tma: bool,
    /// The prefill kernels' shape, when prefill steps go through them (`prefill.rs`).
    pub(super) prefill: Option<PrefillPlan>,
    /// Blocks of `pfb_attn`'s persistent grid when single-sequence prefills take their
    /// selected branch block-major (`build::Plan::blocks`); 0 when they do not.
    pub(super) pfb_grid: u32,
    /// The cache this backend serves (bound at its first layer run) and the layers it ran
    /// in that cache's step: the backend's part in the step lifecycle.
    pub(super) binding: CacheBinding,
    /// Page-locked host mirrors of the uploaded regions (`None` only while dropping).
    pub(super) staging: Option<Staging>,
    /// The step last uploaded: (`Cache::id`, `Cache::step_id`). The step's number, not its
    /// entries, says whether the copy is current: after an abort or a remove, a new plan
    /// with the same entries can have other page tables.
    pub(super) uploaded: Option<(u64, u32)>,
    /// Which page-table entries the step region already holds (`table_shadow.rs`).
    pub(super) tables: TableShadow,
    pub(super) owned: Option<DeviceBuf>,
}

// SAFETY: the handles are driver objects usable from any thread; `&mut self` methods
// serialize use of the staging buffer.
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    /// Whether CUDA device 0 is usable (see [`probe`]).
    pub fn probe() -> Result<DeviceInfo> {
        probe(0)
    }

    /// Bytes of device memory the backend needs for `cfg`: every layer's K/V pools
    /// (`Layout::pool_bytes`, first, at offset 0) plus the workspace (uploaded plan and
    /// page tables, compressed logits, selection indices, split-KV partials).
    pub fn device_bytes(cfg: &Config) -> Result<usize> {
        cfg.validate()?;
        let lay = Layout::new(cfg)?;
        Ok(DevLayout::new(cfg, &lay)?.total)
    }

    /// Creates the backend on device 0 over the caller's device buffer
    /// `device_ptr..+bytes` (at least `device_bytes(cfg)`, 256-byte aligned, allocated in
    /// the device's primary context): compiles the kernels (once per architecture and
    /// process), loads them into the primary context, allocates the page-locked upload
    /// staging (`staging.rs`) and initialises the workspace (selection counters, tensor
    /// maps). The pools' contents are left as they are.
    pub fn new(cfg: &Config, device_ptr: u64, bytes: usize) -> Result<Self> {
        Self::new_with(cfg, device_ptr, bytes, &CudaOptions::default())
    }

    /// [`CudaBackend::new`] with options (the device, the kernel cache directory).
    pub fn new_with(cfg: &Config, device_ptr: u64, bytes: usize, opts: &CudaOptions) -> Result<Self> {
        let need = Self::device_bytes(cfg)?;
        let info = probe(opts.device_ordinal)?;
        if device_ptr == 0 {
            return Err(NsaError::arg("device_ptr", 0, "must be a device allocation"));
        }
        if device_ptr % 256 != 0 {
            return Err(NsaError::Misaligned { what: "device buffer", addr: device_ptr as usize, align: 256 });
        }
        if bytes < need {
            return Err(NsaError::BufferTooSmall { what: "device buffer", got: bytes, need });
        }
        let (dev, ctx) = driver::primary_context(opts.device_ordinal)?;
        let made = (|| {
            let _g = CtxGuard::push(ctx)?;
            Self::build(cfg, device_ptr, bytes, opts, info, dev, ctx)
        })();
        if made.is_err() {
            driver::release_primary(dev);
        }
        made
    }

    /// Allocates `device_bytes(cfg)` once with `cuMemAlloc` on device 0 and creates the
    /// backend over it (freed when the backend drops).
    pub fn with_allocation(cfg: &Config) -> Result<Self> {
        Self::with_allocation_on(cfg, &CudaOptions::default())
    }

    /// [`CudaBackend::with_allocation`] on the device `opts` names.
    pub fn with_allocation_on(cfg: &Config, opts: &CudaOptions) -> Result<Self> {
        let need = Self::device_bytes(cfg)?;
        probe(opts.device_ordinal)?;
        let buf = DeviceBuf::on_device(opts.device_ordinal, need)?;
        let mut b = Self::new_with(cfg, buf.ptr(), need, opts)?;
        b.owned = Some(buf);
        Ok(b)
    }

    /// The creation steps (`build.rs`), in the device's context (pushed by the caller).
    fn build(cfg: &Config, base: u64, bytes: usize, opts: &CudaOptions, info: DeviceInfo, dev: sys::CUdevice, ctx: sys::CUcontext) -> Result<Self> {
        let lay = Layout::new(cfg)?;
        let dl = DevLayout::new(cfg, &lay)?;
        build::check_buffer(base, bytes, info.ordinal)?;
        let plan = build::plan(cfg, &dl, &info)?;
        // Dropped (module unloaded) on any later error, with the context current.
        let mut kernels = build::load(cfg, &info, &plan, opts)?;
        let stages = build::pick_stages(cfg, &plan, &mut kernels)?;
        build::init_workspace(cfg, &lay, &dl, base, plan.tma)?;
        let pfb_grid = if plan.blocks {
            kernels.occupancy(Kernel::PfbAttn, plan.smem.pfb_attn as usize)? * info.multiprocessors.max(1) as u32
        } else {
            0
        };
        let staging = Staging::new(dl.step.bytes)?;
        let setup = LaunchSetup {
            head_chunk: plan.head_chunk,
            bulk: plan.bulk,
            tma: plan.tma,
            nstage: stages.nstage,
            pf_sel_warp: plan.prefill.is_some_and(|p| p.sel_warp),
            pf_win: plan.prefill.map_or(0, |p| p.sc_win),
            pf_cmp_window: plan.prefill.is_some_and(|p| p.cmp_window),
            pf_sel_share: plan.prefill.is_some_and(|p| p.sel_share),
            pf_sel_share_min: plan.prefill.map_or(2, |p| p.sel_share_min),
            pf_sel_wg: plan.prefill.is_some_and(|p| p.sel_wg),
        };
        Ok(CudaBackend {
            cfg: *cfg,
            lay,
            dl,
            base,
            dev,
            ctx,
            kernels: Some(kernels),
            params: Params::fixed(cfg, &dl, base, setup),
            info,
            mma: plan.mma,
            mma_per_sm: stages.per_sm,
            small_wave: stages.small,
            cmp_splits: plan.cmp_splits,
            knobs: plan.knobs,
            tma: plan.tma,
            prefill: plan.prefill,
            pfb_grid,
            binding: CacheBinding::new(cfg),
            staging: Some(staging),
            uploaded: None,
            tables: TableShadow::new(cfg),
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
        self.params.launch.head_chunk as u32
    }

    /// Whether the attention kernels run on tensor cores (bf16/f16 with DK and DV
    /// multiples of 16 and DV <= 256; `NSA_CUDA_SCALAR=1` at creation turns them off).
    pub fn uses_tensor_cores(&self) -> bool {
        self.mma
    }

    /// Whether steps with prefill chunks (a sequence appending at least 64 tokens) go
    /// through the tensor-core prefill kernels: bf16/f16, (DK, DV) of (64, 64), (128, 128)
    /// or (192, 128), a power-of-two group of at most 16 heads, page_size and sel_block
    /// multiples of 64, sel_count <= 32, and the block scores of a longest sequence fit in
    /// shared memory (`NSA_CUDA_NO_PREFILL=1` at creation turns them off). Otherwise every
    /// step runs on the decode kernels.
    pub fn uses_prefill_kernels(&self) -> bool {
        self.prefill.is_some()
    }

    /// Copies the planned step (its sequences, copy-on-write copies, per-token positions,
    /// finished compressed tokens and the page tables of its sequences) into the device
    /// workspace, on `stream`, from a page-locked staging buffer (two alternate; one is
    /// reused only after its previous copies ran, even when a copy failed to enqueue).
    /// Call once per step, after `plan_step`, before `run_layer`; issue `run_layer` on the
    /// same stream (or order the streams). Allocates nothing. A step whose tables only grew
    /// since the previous upload (same sequences in the same order, no copy, no other table
    /// change: `table_shadow.rs`) copies just the entries they gained, so uploads must run
    /// on the device in call order.
    pub fn upload_step(&mut self, cache: &Cache, stream: CUstream) -> Result<()> {
        self.upload(cache, stream)
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
        self.launch_layer(cache, layer, io, stream)
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
        self.launch_full(cache, layer, q, out, stream)
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

    pub(super) fn kernels(&self) -> &Kernels {
        self.kernels.as_ref().expect("kernels live until drop")
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Ok(_g) = CtxGuard::push(self.ctx) {
            // The page-locked buffers, events and the module go while the context is current.
            self.staging = None;
            self.kernels = None;
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
    fn device_bytes_covers_pools_and_workspace() {
        for p in [Preset::Paper, Preset::Fla] {
            let c = Config::preset(p);
            let lay = Layout::new(&c).unwrap();
            let n = CudaBackend::device_bytes(&c).unwrap();
            assert!(n > lay.pool_bytes);
            assert_eq!(n % 256, 0);
        }
    }
}
