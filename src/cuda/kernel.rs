//! The kernels the backend launches, named by one enum: each carries its entry point in
//! `kernels/nsa.cu` (`nsa_<stage>_<dtype>`, tensor-core ones `nsa_<stage>_<dtype>_<nvt>`,
//! prefill ones `nsa_<stage>_<policy>_<dtype>_<dk>_<dv>`), its block size and which
//! shared-memory size it takes. [`Kernels`] is the loaded module: one function handle, one
//! block size and one dynamic shared-memory size per kernel, and the launch.

use std::ffi::{c_void, CString};

use cudarc::driver::sys;

use super::consts::{MMA_WARPS, NT_ATT, NT_SEL, NT_WIDE, PFB_WARPS};
use super::driver::{check, CUstream};
use super::params::Params;
use super::prefill::PrefillPlan;
use crate::config::Dtype;
use crate::error::{NsaError, Result};

/// (DK, DV) pairs the decode tensor-core kernels are also compiled for (`NSA_MMA_ALL` in
/// kernels/nsa.cu): the prefill shapes.
const MMA_SHAPES: [(u32, u32); 3] = super::prefill::SHAPES;

/// Every kernel of a layer run and of the full-attention baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The step's writes: copy-on-write copies, appends, compressed tokens (one launch).
    Append,
    /// The same for steps of at least `APPEND_MIN_TOKENS` new tokens: rows by blocks of
    /// `APPEND_ROWS`, compress blocks bounded by the shape.
    AppendByRows,
    /// Compressed attention, split over blocks (scalar).
    CmpPartial,
    /// Block scores and the top-n of each (row, KV head); chunk blocks at small batch.
    SelectBlocks,
    /// The same with per-chunk lists and group sums fixed at compile time (tensor-core
    /// decode: `DecodeKnobs::sel_lists` and `group_sums`).
    SelectLists,
    /// Selected blocks + window, one block per unit (scalar).
    SwPartial,
    /// Gated combine of every partial, 4 columns per load (`launch::comb_vec_fits`).
    Combine,
    /// The same, a column per thread (the other shapes).
    CombineScalar,
    /// Full causal attention, split over blocks (scalar; the baseline).
    FullPartial,
    /// Merge of the full-attention splits.
    FullCombine,
    /// Tensor-core variants of `CmpPartial`, `SwPartial`, `FullPartial`.
    CmpMma,
    SwMma,
    FullMma,
    /// Prefill path (`prefill.rs`): compressed branch + selection over tiles of positions.
    PfCmp,
    /// Prefill path: selected blocks + window + gated combine.
    PfSw,
    /// Prefill path after the block-major selected branch: the window + gated combine.
    PfSwWindow,
    /// Prefill's selected branch block-major (`prefill::blocks_supported`): entries per
    /// (KV head, block) list, the lists' offsets and items, the entries into their lists.
    PfbCount,
    PfbScan,
    PfbFill,
    /// Partials of every (row, query head, slot), a block per item.
    PfbAttn,
    /// The partials merged into the output.
    PfbMerge,
    /// Prefill's selected branch alone at G = 16, a warp per position, after `PfCmp` did
    /// the window (`PrefillPlan::sel_split`).
    PfSel,
    /// Prefill path, after its last kernel: the (row, KV head) pairs its non-finite scans
    /// marked, recomputed in scalar (kernels/prefill_repair.cuh).
    PfRepair,
}

/// Which of the config-dependent shared-memory sizes ([`SharedMem`]) a kernel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Smem {
    /// Static shared memory only.
    None,
    Compress,
    Attention,
    Selection,
    Combine,
    TensorCore,
    PfCmp,
    PfSw,
    PfbAttn,
    PfSel,
    PfRepair,
}

/// Dynamic shared memory per kernel family, bytes, for one config and device
/// (`build::shared_mem`). `tensor_core` is 0 when the tensor-core kernels are not used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SharedMem {
    pub compress: u32,
    pub attention: u32,
    pub selection: u32,
    pub combine: u32,
    pub tensor_core: u32,
    /// The prefill kernels' (0 when the prefill path is not used).
    pub pf_cmp: u32,
    pub pf_sw: u32,
    /// `pfb_attn`'s (0 when the block-major selected branch is not used).
    pub pfb_attn: u32,
    /// `pf_sel`'s (0 unless `PrefillPlan::sel_split`).
    pub pf_sel: u32,
    /// `pf_repair`'s: the scalar attention's and the gated sums (0 without the prefill path).
    pub pf_repair: u32,
}

impl SharedMem {
    pub fn of(&self, s: Smem) -> u32 {
        match s {
            Smem::None => 0,
            Smem::Compress => self.compress,
            Smem::Attention => self.attention,
            Smem::Selection => self.selection,
            Smem::Combine => self.combine,
            Smem::TensorCore => self.tensor_core,
            Smem::PfCmp => self.pf_cmp,
            Smem::PfSw => self.pf_sw,
            Smem::PfbAttn => self.pfb_attn,
            Smem::PfSel => self.pf_sel,
            Smem::PfRepair => self.pf_repair,
        }
    }
}

impl Kernel {
    pub const COUNT: usize = 23;
    pub const ALL: [Kernel; Kernel::COUNT] = [
        Kernel::Append,
        Kernel::AppendByRows,
        Kernel::CmpPartial,
        Kernel::SelectBlocks,
        Kernel::SelectLists,
        Kernel::SwPartial,
        Kernel::Combine,
        Kernel::CombineScalar,
        Kernel::FullPartial,
        Kernel::FullCombine,
        Kernel::CmpMma,
        Kernel::SwMma,
        Kernel::FullMma,
        Kernel::PfCmp,
        Kernel::PfSw,
        Kernel::PfSwWindow,
        Kernel::PfbCount,
        Kernel::PfbScan,
        Kernel::PfbFill,
        Kernel::PfbAttn,
        Kernel::PfbMerge,
        Kernel::PfSel,
        Kernel::PfRepair,
    ];

    /// The stage's name in its entry points.
    pub fn stage(self) -> &'static str {
        match self {
            Kernel::Append => "append",
            Kernel::AppendByRows => "append_by_rows",
            Kernel::CmpPartial => "cmp_partial",
            Kernel::SelectBlocks => "select_blocks",
            Kernel::SelectLists => "select_lists",
            Kernel::SwPartial => "sw_partial",
            Kernel::Combine => "combine",
            Kernel::CombineScalar => "combine_scalar",
            Kernel::FullPartial => "full_partial",
            Kernel::FullCombine => "full_combine",
            Kernel::CmpMma => "cmp_mma",
            Kernel::SwMma => "sw_mma",
            Kernel::FullMma => "full_mma",
            Kernel::PfCmp => "pf_cmp",
            Kernel::PfSw => "pf_sw",
            Kernel::PfSwWindow => "pf_sww",
            Kernel::PfbCount => "pfb_count",
            Kernel::PfbScan => "pfb_scan",
            Kernel::PfbFill => "pfb_fill",
            Kernel::PfbAttn => "pfb_attn",
            Kernel::PfbMerge => "pfb_merge",
            Kernel::PfSel => "pf_sel",
            Kernel::PfRepair => "pf_repair",
        }
    }

    /// The prefill path's kernels: loaded only with a [`PrefillPlan`], block size from it.
    pub fn prefill(self) -> bool {
        matches!(self, Kernel::PfCmp | Kernel::PfSw | Kernel::PfSwWindow)
    }

    /// The block-major selected branch's kernels: loaded only where the workspace has its
    /// regions (`DevLayout::pfb_chunk`), 16-bit storage only.
    pub fn prefill_blocks(self) -> bool {
        matches!(self, Kernel::PfbCount | Kernel::PfbScan | Kernel::PfbFill | Kernel::PfbAttn | Kernel::PfbMerge | Kernel::PfSwWindow)
    }

    /// Tensor-core kernels: bf16/f16 only, one entry per V tile width (`nvt`).
    pub fn tensor_core(self) -> bool {
        matches!(self, Kernel::CmpMma | Kernel::SwMma | Kernel::FullMma)
    }

    /// Threads per block (the kernels' `__launch_bounds__` allow it); the prefill
    /// kernels' come from the backend's [`PrefillPlan`].
    pub fn block(self, prefill: Option<&PrefillPlan>) -> u32 {
        match self {
            Kernel::Append | Kernel::AppendByRows | Kernel::Combine | Kernel::CombineScalar | Kernel::PfbCount | Kernel::PfbFill | Kernel::PfbMerge => NT_WIDE,
            Kernel::SelectBlocks | Kernel::SelectLists | Kernel::PfbScan => NT_SEL,
            Kernel::PfbAttn => PFB_WARPS * 32,
            Kernel::PfSel => super::consts::PF_SEL_WARPS * 32,
            Kernel::CmpPartial | Kernel::SwPartial | Kernel::FullPartial | Kernel::FullCombine | Kernel::PfRepair => NT_ATT,
            Kernel::CmpMma | Kernel::SwMma | Kernel::FullMma => MMA_WARPS * 32,
            Kernel::PfCmp | Kernel::PfSw => prefill.map_or(0, |p| p.threads(self)),
            Kernel::PfSwWindow => prefill.map_or(0, |p| p.threads(Kernel::PfSw)),
        }
    }

    /// Which shared-memory size it takes.
    pub fn smem(self) -> Smem {
        match self {
            Kernel::Append | Kernel::AppendByRows => Smem::Compress,
            Kernel::PfbCount | Kernel::PfbScan | Kernel::PfbFill | Kernel::PfbMerge => Smem::None,
            Kernel::PfbAttn => Smem::PfbAttn,
            Kernel::PfSel => Smem::PfSel,
            Kernel::PfRepair => Smem::PfRepair,
            Kernel::CmpPartial | Kernel::SwPartial | Kernel::FullPartial => Smem::Attention,
            Kernel::SelectBlocks | Kernel::SelectLists => Smem::Selection,
            Kernel::Combine | Kernel::CombineScalar | Kernel::FullCombine => Smem::Combine,
            Kernel::CmpMma | Kernel::SwMma | Kernel::FullMma => Smem::TensorCore,
            Kernel::PfCmp => Smem::PfCmp,
            Kernel::PfSw | Kernel::PfSwWindow => Smem::PfSw,
        }
    }

    /// Entry point of a prefill kernel for `policy`, `dtype` and the head dims.
    pub fn prefill_entry(self, policy: super::prefill::Policy, dtype: Dtype, dk: u32, dv: u32) -> String {
        let suffix = if dtype == Dtype::F16 { "f16" } else { "bf16" };
        format!("nsa_{}_{}_{suffix}_{dk}_{dv}", self.stage(), policy.name())
    }

    /// Entry point for storage type `dtype` and head dims `dk`, `dv`. The tensor-core
    /// kernels have entries compiled for the shapes in [`MMA_SHAPES`] (unless `generic`)
    /// and entries for any head dims by V tile width.
    pub fn entry(self, dtype: Dtype, (dk, dv): (u32, u32), generic: bool, tma: bool) -> String {
        let suffix = match dtype {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        };
        // Compiled per (DK, DV): the prefill's block-major and selected-only kernels always,
        // the tensor-core decode kernels for MMA_SHAPES.
        let per_shape = matches!(self, Kernel::PfbAttn | Kernel::PfSel);
        let mma_fixed = self.mma_fixed(dk, dv, generic);
        if mma_fixed && tma {
            // The copy path fixed at compile time for tensor-map pages (kernels/nsa.cu):
            // tensor-map boxes, or for the compressed branch cp.async into the boxes' layout.
            let ext = if self == Kernel::CmpMma { "lds" } else { "tma" };
            format!("nsa_{}_{suffix}_{dk}_{dv}_{ext}", self.stage())
        } else if per_shape || mma_fixed {
            format!("nsa_{}_{suffix}_{dk}_{dv}", self.stage())
        } else if self.tensor_core() {
            // V columns per lane group: 16 up to DV = 128, else 32 (DV <= 256).
            let nvt = if dv <= 128 { 16 } else { 32 };
            format!("nsa_{}_{suffix}_{nvt}", self.stage())
        } else {
            format!("nsa_{}_{suffix}", self.stage())
        }
    }

    /// The compressed branch's entry for large waves, where one is compiled (the shapes of
    /// [`MMA_SHAPES`] with tensor-map pages): its group sums by a tensor-core product
    /// (kernels/nsa.cu `_ldsg`), launched where [`LaunchOpts::large`] asks for it.
    pub fn large_entry(self, dtype: Dtype, dims: (u32, u32), generic: bool, tma: bool) -> Option<String> {
        let fixed = self == Kernel::CmpMma && tma && dtype != Dtype::F32 && self.mma_fixed(dims.0, dims.1, generic);
        fixed.then(|| self.entry(dtype, dims, generic, tma) + "g")
    }

    /// A tensor-core kernel with an entry compiled for these head dims ([`MMA_SHAPES`],
    /// unless `generic` asks for the any-shape entries).
    fn mma_fixed(self, dk: u32, dv: u32, generic: bool) -> bool {
        self.tensor_core() && !generic && MMA_SHAPES.contains(&(dk, dv))
    }

    /// Every entry point compiled for this kernel (all storage types and tile widths).
    #[cfg(test)]
    pub fn entries(self) -> Vec<String> {
        use super::prefill::Policy;
        if self.prefill() {
            let mut v = Vec::new();
            let ws = super::prefill::WS_FORMS.map(|(w, win)| Policy::WgmmaWs(w, win));
            for policy in [Policy::MmaSync, Policy::Wgmma, Policy::WgmmaTma].into_iter().chain(ws) {
                if matches!(policy, Policy::WgmmaWs(..)) && self != Kernel::PfCmp {
                    continue; // pf_cmp only
                }
                for d in [Dtype::F16, Dtype::Bf16] {
                    v.extend(policy.shapes().iter().map(|&(dk, dv)| self.prefill_entry(policy, d, dk, dv)));
                }
            }
            return v;
        }
        if matches!(self, Kernel::PfbAttn | Kernel::PfSel) {
            return super::prefill::SHAPES.iter().flat_map(|&s| [Dtype::F16, Dtype::Bf16].map(|d| self.entry(d, s, false, false))).collect();
        }
        if self.prefill_blocks() || self == Kernel::PfRepair {
            return [Dtype::F16, Dtype::Bf16].map(|d| self.entry(d, (0, 0), false, false)).to_vec();
        }
        if self.tensor_core() {
            let dims = MMA_SHAPES.iter().flat_map(|&s| [(s, false, false), (s, false, true)]).chain([((128, 128), true, false), ((256, 256), true, false)]);
            let large = MMA_SHAPES.iter().flat_map(|&s| [Dtype::F16, Dtype::Bf16].map(move |d| self.large_entry(d, s, false, true))).flatten();
            dims.flat_map(|(s, generic, tma)| [Dtype::F16, Dtype::Bf16].map(|d| self.entry(d, s, generic, tma))).chain(large).collect()
        } else {
            [Dtype::F32, Dtype::F16, Dtype::Bf16].iter().map(|&d| self.entry(d, (0, 0), false, false)).collect()
        }
    }
}

/// The loaded module: a function handle and the dynamic shared memory of each kernel
/// (null / 0 for the tensor-core kernels when they are not used).
pub(crate) struct Kernels {
    module: sys::CUmodule,
    funcs: [sys::CUfunction; Kernel::COUNT],
    /// `CmpMma`'s entry for large waves ([`Kernel::large_entry`]), null where none is
    /// compiled; it takes `CmpMma`'s block size and shared memory.
    cmp_large: sys::CUfunction,
    block: [u32; Kernel::COUNT],
    smem: [u32; Kernel::COUNT],
    /// Dependent launches use programmatic dependent launch (sm_90+, unless
    /// `NSA_CUDA_NO_PDL=1` at creation).
    pub pdl: bool,
}

impl Kernels {
    /// Loads `cubin` into the current context and looks up every kernel for `dtype` and
    /// the head dims `dk`, `dv` that `plan` uses (the tensor-core ones only with
    /// `plan.mma`, and their any-shape entries with `plan.knobs.generic_mma`; the prefill
    /// ones only with `plan.prefill`, the block-major ones only with `plan.blocks`),
    /// raising each one's shared-memory limit where it needs more than the default 48 KiB.
    pub fn load(cubin: &[u8], dtype: Dtype, (dk, dv): (u32, u32), plan: &super::build::Plan) -> Result<Kernels> {
        let (tensor_cores, generic_mma, prefill, blocks, smem) = (plan.mma, plan.knobs.generic_mma, plan.prefill.as_ref(), plan.blocks, &plan.smem);
        let mut module = std::ptr::null_mut();
        // SAFETY: a CUBIN from NVRTC for this device's architecture.
        check(unsafe { sys::cuModuleLoadData(&mut module, cubin.as_ptr() as *const c_void) }, "cuModuleLoadData")?;
        let mut k = Kernels {
            module,
            funcs: [std::ptr::null_mut(); Kernel::COUNT],
            cmp_large: std::ptr::null_mut(),
            block: [0; Kernel::COUNT],
            smem: [0; Kernel::COUNT],
            pdl: false,
        };
        let sel_split = prefill.is_some_and(|p| p.sel_split);
        for (i, kernel) in Kernel::ALL.into_iter().enumerate() {
            if kernel.tensor_core() && !tensor_cores
                || kernel.prefill() && prefill.is_none()
                || kernel.prefill_blocks() && !blocks
                || kernel == Kernel::PfSel && !sel_split
                || kernel == Kernel::PfRepair && prefill.is_none()
            {
                continue;
            }
            let entry = match prefill {
                Some(p) if kernel.prefill() => kernel.prefill_entry(p.policy_of(kernel), dtype, dk, dv),
                _ => kernel.entry(dtype, (dk, dv), generic_mma, plan.tma),
            };
            k.block[i] = kernel.block(prefill);
            let name = CString::new(entry).expect("no NUL");
            // SAFETY: module loaded above; name is a kernel of it. On error `k` drops and unloads.
            check(unsafe { sys::cuModuleGetFunction(&mut k.funcs[i], module, name.as_ptr()) }, "cuModuleGetFunction")?;
            if let Some(large) = kernel.large_entry(dtype, (dk, dv), generic_mma, plan.tma) {
                let name = CString::new(large).expect("no NUL");
                // SAFETY: as above.
                check(unsafe { sys::cuModuleGetFunction(&mut k.cmp_large, module, name.as_ptr()) }, "cuModuleGetFunction")?;
            }
            k.set_smem(kernel, smem.of(kernel.smem()))?;
        }
        Ok(k)
    }

    /// The loaded module (its globals: `timeline.rs`).
    pub(crate) fn module(&self) -> sys::CUmodule {
        self.module
    }

    /// Sets `kernel`'s dynamic shared memory (raising its limit where it and the kernel's
    /// static shared memory pass the default 48 KiB).
    pub fn set_smem(&mut self, kernel: Kernel, bytes: u32) -> Result<()> {
        self.smem[kernel as usize] = bytes;
        let large = if kernel == Kernel::CmpMma { self.cmp_large } else { std::ptr::null_mut() };
        for f in [self.funcs[kernel as usize], large] {
            if !f.is_null() {
                Self::raise_smem(f, bytes)?;
            }
        }
        Ok(())
    }

    /// Raises `f`'s dynamic shared-memory limit to `bytes` where it and the function's
    /// static shared memory pass the default 48 KiB.
    fn raise_smem(f: sys::CUfunction, bytes: u32) -> Result<()> {
        let mut fixed = 0i32;
        // SAFETY: plain attribute query on a function of our module.
        check(
            unsafe { sys::cuFuncGetAttribute(&mut fixed, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f) },
            "cuFuncGetAttribute",
        )?;
        if bytes as usize + fixed.max(0) as usize > super::build::DEFAULT_SMEM {
            // SAFETY: plain attribute on a function of our module.
            check(
                unsafe {
                    sys::cuFuncSetAttribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                },
                "cuFuncSetAttribute",
            )?;
        }
        Ok(())
    }

    /// Sets every loaded kernel's preferred shared-memory carve-out to `percent` of the
    /// multiprocessor's unified L1 / shared memory (`NSA_CUDA_CARVEOUT=P`, a measurement
    /// knob: whether kernels that prefer different splits slow the chain of a step).
    pub fn set_carveout(&mut self, percent: u32) -> Result<()> {
        for &f in self.funcs.iter().chain([&self.cmp_large]).filter(|f| !f.is_null()) {
            // SAFETY: plain attribute on a function of our module.
            check(
                unsafe {
                    sys::cuFuncSetAttribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                        percent.min(100) as i32,
                    )
                },
                "cuFuncSetAttribute",
            )?;
        }
        Ok(())
    }

    /// Raises `kernel`'s shared-memory limit to `bytes` (for launches sized by
    /// [`Kernels::launch_with`]) without changing its default size.
    pub fn allow_smem(&mut self, kernel: Kernel, bytes: u32) -> Result<()> {
        let default = self.smem[kernel as usize];
        self.set_smem(kernel, bytes.max(default))?;
        self.smem[kernel as usize] = default;
        Ok(())
    }

    /// `kernel`'s default dynamic shared memory.
    pub fn smem(&self, kernel: Kernel) -> u32 {
        self.smem[kernel as usize]
    }

    /// Blocks of `kernel` resident per multiprocessor with `smem` bytes of shared memory.
    pub fn occupancy(&self, kernel: Kernel, smem: usize) -> Result<u32> {
        let mut blocks = 0i32;
        // SAFETY: a loaded function; plain occupancy query.
        check(
            unsafe { sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut blocks, self.funcs[kernel as usize], self.block[kernel as usize] as i32, smem) },
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        )?;
        Ok(blocks.max(1) as u32)
    }

    /// Launches `kernel` on `grid` with its block size and shared memory; an empty grid
    /// launches nothing. The argument array is fixed (one pointer to `p`): no allocation.
    /// A `dependent` launch may start while the stream's previous kernel still runs
    /// (programmatic dependent launch, when [`Kernels::pdl`] is on): the kernels wait for
    /// their predecessors before touching what those write (`pdl_wait`, kernels/ptx.cuh).
    /// A layer's first launch is never dependent: what ran before it on the caller's
    /// stream knows nothing of this protocol.
    ///
    /// # Safety
    /// `p` describes valid device memory for `kernel`, which was loaded.
    pub unsafe fn launch(&self, kernel: Kernel, grid: (u32, u32, u32), p: &Params, stream: CUstream, dependent: bool) -> Result<()> {
        self.launch_with(kernel, grid, self.smem[kernel as usize], p, stream, dependent, LaunchOpts::default())
    }

    /// [`Kernels::launch`] with `smem` bytes of dynamic shared memory instead of the
    /// kernel's default (at most the limit [`Kernels::allow_smem`] set) and this launch's
    /// [`LaunchOpts`].
    ///
    /// # Safety
    /// As [`Kernels::launch`]; `smem` is what `p`'s launch fields need, within the limit;
    /// `opts.threads`, if any, is a multiple of 32 and at most the kernel's block (its
    /// launch bound), and the kernel reads its thread count from `blockDim`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch_with(
        &self,
        kernel: Kernel,
        grid: (u32, u32, u32),
        smem: u32,
        p: &Params,
        stream: CUstream,
        dependent: bool,
        opts: LaunchOpts,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let i = kernel as usize;
        let mut args = [p as *const Params as *mut c_void];
        // One launch call for every kind: programmatic serialization only for dependent
        // launches, the carve-out only when asked for.
        let mut attrs: [sys::CUlaunchAttribute; 2] = std::mem::zeroed();
        let mut n = 0;
        if dependent && self.pdl {
            attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n].value.programmaticStreamSerializationAllowed = 1;
            n += 1;
        }
        if let Some(c) = opts.carveout {
            attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT;
            attrs[n].value.sharedMemCarveout = c.min(100);
            n += 1;
        }
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: opts.threads.map_or(self.block[i], |t| t.min(self.block[i])),
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: stream,
            attrs: attrs.as_mut_ptr(),
            numAttrs: n as u32,
        };
        let f = if opts.large && kernel == Kernel::CmpMma && !self.cmp_large.is_null() { self.cmp_large } else { self.funcs[i] };
        let r = sys::cuLaunchKernelEx(&cfg, f, args.as_mut_ptr(), std::ptr::null_mut());
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(NsaError::Cuda(format!("cuLaunchKernelEx(nsa_{}) failed: {r:?}", kernel.stage())));
        }
        Ok(())
    }
}

/// Per-launch choices of [`Kernels::launch_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LaunchOpts {
    /// The launch's preferred shared-memory carve-out (percent of the unified L1 / shared
    /// memory; 0 asks for the most L1 the launch's shared memory leaves, which may also
    /// mean fewer resident blocks), or the function's when `None`.
    pub carveout: Option<u32>,
    /// Threads per block, fewer than the kernel's launch bound (more blocks per
    /// multiprocessor), or the kernel's own count when `None`.
    pub threads: Option<u32>,
    /// `CmpMma`: its entry for large waves where one is loaded ([`Kernel::large_entry`]).
    pub large: bool,
}

impl Drop for Kernels {
    /// The owner's context must be current (the backend pushes it).
    fn drop(&mut self) {
        // SAFETY: loaded in `load`, unloaded once.
        unsafe {
            sys::cuModuleUnload(self.module);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_the_kernel_file_names() {
        assert_eq!(Kernel::SwMma.entry(Dtype::Bf16, (128, 128), true, false), "nsa_sw_mma_bf16_16");
        assert_eq!(Kernel::SwMma.entry(Dtype::Bf16, (128, 128), false, false), "nsa_sw_mma_bf16_128_128");
        assert_eq!(Kernel::CmpMma.entry(Dtype::F16, (192, 128), false, false), "nsa_cmp_mma_f16_192_128");
        assert_eq!(Kernel::SwMma.entry(Dtype::F16, (192, 192), false, false), "nsa_sw_mma_f16_32");
        assert_eq!(Kernel::FullMma.entry(Dtype::Bf16, (96, 64), false, false), "nsa_full_mma_bf16_16");
        // Tensor maps: the compile-time copy path for the compiled shapes only.
        assert_eq!(Kernel::SwMma.entry(Dtype::Bf16, (128, 128), false, true), "nsa_sw_mma_bf16_128_128_tma");
        assert_eq!(Kernel::CmpMma.entry(Dtype::Bf16, (128, 128), false, true), "nsa_cmp_mma_bf16_128_128_lds");
        assert_eq!(Kernel::CmpMma.entry(Dtype::F16, (192, 128), false, true), "nsa_cmp_mma_f16_192_128_lds");
        // The compressed branch's entry for large waves: compiled shapes with tensor maps only.
        assert_eq!(Kernel::CmpMma.large_entry(Dtype::Bf16, (128, 128), false, true).as_deref(), Some("nsa_cmp_mma_bf16_128_128_ldsg"));
        assert_eq!(Kernel::CmpMma.large_entry(Dtype::Bf16, (128, 128), false, false), None);
        assert_eq!(Kernel::CmpMma.large_entry(Dtype::Bf16, (128, 128), true, true), None);
        assert_eq!(Kernel::CmpMma.large_entry(Dtype::F16, (96, 64), false, true), None);
        assert_eq!(Kernel::SwMma.large_entry(Dtype::Bf16, (128, 128), false, true), None);
        assert_eq!(Kernel::SwMma.entry(Dtype::Bf16, (128, 128), true, true), "nsa_sw_mma_bf16_16");
        assert_eq!(Kernel::FullMma.entry(Dtype::Bf16, (96, 64), false, true), "nsa_full_mma_bf16_16");
        assert_eq!(Kernel::Append.entry(Dtype::F32, (64, 64), false, false), "nsa_append_f32");
        assert_eq!(
            Kernel::PfSw.prefill_entry(super::super::prefill::Policy::Wgmma, Dtype::Bf16, 128, 128),
            "nsa_pf_sw_wg_bf16_128_128"
        );
        let all: usize = Kernel::ALL.iter().map(|k| k.entries().len()).sum();
        assert_eq!(Kernel::PfbAttn.entry(Dtype::F16, (192, 128), false, false), "nsa_pfb_attn_f16_192_128");
        assert_eq!(Kernel::PfbScan.entry(Dtype::Bf16, (0, 0), false, false), "nsa_pfb_scan_bf16");
        assert_eq!(Kernel::PfSel.entry(Dtype::Bf16, (128, 128), false, false), "nsa_pf_sel_bf16_128_128");
        // Ten scalar decode kernels (the selection's and the combine's two entries among
        // them) for three types;
        // the tensor-core ones per compiled shape twice (copy path from the launch, or
        // tensor maps) and by V tile width, the compressed one's large-wave entry per compiled
        // shape; pf_cmp also warp-specialised (prefill::WS_FORMS),
        // pf_sww as pf_sw; the block-major kernels: four for both 16-bit types, pfb_attn per
        // prefill shape; pf_sel per prefill shape; pf_repair for both 16-bit types.
        assert_eq!(all, 10 * 3 + 3 * 2 * (2 * MMA_SHAPES.len() + 2) + 2 * MMA_SHAPES.len() + 16 + (16 + 4 * 6) + 16 + 4 * 2 + 2 * 3 + 2 * 3 + 2);
        assert_eq!(Kernel::PfRepair.entry(Dtype::F16, (192, 128), false, false), "nsa_pf_repair_f16");
        for (i, k) in Kernel::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }
}
