//! Thin wrappers over the CUDA driver API (cudarc's `sys`, loaded at run time): every
//! call's result becomes `NsaError::Cuda` naming the call, and the driver library is
//! looked for before the first call, so a machine without CUDA gets an error, never a
//! panic from the loader.

use std::ffi::c_void;

use cudarc::driver::sys;

use crate::error::{NsaError, Result};

pub use sys::{CUdeviceptr, CUstream};

/// Maps a driver result to `NsaError::Cuda("<call>: CUDA_ERROR_...")`.
pub(crate) fn check(r: sys::CUresult, call: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(NsaError::Cuda(format!("{call} failed: {r:?}")))
    }
}

/// Whether `libcuda` (the driver) and `libnvrtc` can be loaded; the reason when not.
pub(crate) fn libraries_present() -> std::result::Result<(), String> {
    // SAFETY: this only tries to open the shared library (libloading), nothing else.
    let cuda = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !cuda {
        return Err("the NVIDIA driver library (libcuda.so.1) was not found by the dynamic loader".into());
    }
    nvrtc_present()
}

/// Whether `libnvrtc` can be loaded (all that compiling the kernels needs); the reason
/// when not.
pub(crate) fn nvrtc_present() -> std::result::Result<(), String> {
    // SAFETY: this only tries to open the shared library (libloading), nothing else.
    let nvrtc = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false);
    if !nvrtc {
        return Err("the NVRTC library (libnvrtc.so.13 or .12) was not found by the dynamic loader".into());
    }
    Ok(())
}

/// Makes a context current for the guard's lifetime and restores the caller's afterwards
/// (push/pop), so the engine never changes the calling thread's CUDA state.
pub(crate) struct CtxGuard(());

impl CtxGuard {
    pub fn push(ctx: sys::CUcontext) -> Result<CtxGuard> {
        // SAFETY: ctx is a retained primary context.
        check(unsafe { sys::cuCtxPushCurrent_v2(ctx) }, "cuCtxPushCurrent")?;
        Ok(CtxGuard(()))
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        let mut old = std::ptr::null_mut();
        // SAFETY: pops the context pushed by `push`.
        unsafe {
            sys::cuCtxPopCurrent_v2(&mut old);
        }
    }
}

/// Host-to-device copy on `stream` (stream-ordered).
///
/// # Safety
/// `dst..dst+bytes` is device memory of the current context; `src` is valid for `bytes`.
pub(crate) unsafe fn htod(dst: CUdeviceptr, src: *const c_void, bytes: usize, stream: CUstream) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    check(sys::cuMemcpyHtoDAsync_v2(dst, src, bytes, stream), "cuMemcpyHtoDAsync")
}

/// Device-to-host copy on `stream`, then waits for the stream.
///
/// # Safety
/// As `htod`, reversed.
pub(crate) unsafe fn dtoh_sync(dst: *mut c_void, src: CUdeviceptr, bytes: usize, stream: CUstream) -> Result<()> {
    if bytes > 0 {
        check(sys::cuMemcpyDtoHAsync_v2(dst, src, bytes, stream), "cuMemcpyDtoHAsync")?;
    }
    check(sys::cuStreamSynchronize(stream), "cuStreamSynchronize")
}

/// A device allocation in the primary context of one device, freed on drop. For callers
/// that want the engine to allocate (`CudaBackend::with_allocation`) and for tests.
pub struct DeviceBuf {
    ptr: CUdeviceptr,
    bytes: usize,
    ctx: sys::CUcontext,
    dev: sys::CUdevice,
}

// SAFETY: a device pointer and a retained context handle; the driver API is thread safe.
unsafe impl Send for DeviceBuf {}
unsafe impl Sync for DeviceBuf {}

impl DeviceBuf {
    /// Allocates `bytes` (at least 1) of device memory with `cuMemAlloc` in device 0's
    /// primary context.
    pub fn new(bytes: usize) -> Result<DeviceBuf> {
        Self::on_device(0, bytes)
    }

    /// [`DeviceBuf::new`] on device `ordinal`.
    pub fn on_device(ordinal: i32, bytes: usize) -> Result<DeviceBuf> {
        let (dev, ctx) = primary_context(ordinal)?;
        let _g = CtxGuard::push(ctx)?;
        let mut ptr = 0;
        // SAFETY: plain allocation in the current context.
        let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(1)) };
        if let Err(e) = check(r, "cuMemAlloc") {
            release_primary(dev);
            return Err(e);
        }
        Ok(DeviceBuf { ptr, bytes, ctx, dev })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `src` to the start of the buffer (synchronous).
    pub fn upload<T: Copy>(&self, src: &[T]) -> Result<()> {
        self.upload_at(0, src)
    }

    /// Copies `src` to byte offset `off` (synchronous).
    pub fn upload_at<T: Copy>(&self, off: usize, src: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(src);
        if off + n > self.bytes {
            return Err(NsaError::arg("src", format!("{n} bytes at {off}"), format!("the device buffer has {} bytes", self.bytes)));
        }
        let _g = CtxGuard::push(self.ctx)?;
        // SAFETY: range checked above; synchronous copy.
        unsafe {
            htod(self.ptr + off as u64, src.as_ptr().cast(), n, std::ptr::null_mut())?;
            check(sys::cuStreamSynchronize(std::ptr::null_mut()), "cuStreamSynchronize")
        }
    }

    /// Copies the start of the buffer into `dst` (synchronous).
    pub fn download<T: Copy>(&self, dst: &mut [T]) -> Result<()> {
        let n = std::mem::size_of_val(dst);
        if n > self.bytes {
            return Err(NsaError::arg("dst", format!("{n} bytes"), format!("the device buffer has {} bytes", self.bytes)));
        }
        let _g = CtxGuard::push(self.ctx)?;
        // SAFETY: range checked above.
        unsafe { dtoh_sync(dst.as_mut_ptr().cast(), self.ptr, n, std::ptr::null_mut()) }
    }

    /// Sets every byte to `byte` (synchronous), e.g. 0xFF poisons f16/bf16/f32 as NaN.
    pub fn fill(&self, byte: u8) -> Result<()> {
        let _g = CtxGuard::push(self.ctx)?;
        // SAFETY: whole allocation.
        unsafe {
            check(sys::cuMemsetD8Async(self.ptr, byte, self.bytes, std::ptr::null_mut()), "cuMemsetD8Async")?;
            check(sys::cuStreamSynchronize(std::ptr::null_mut()), "cuStreamSynchronize")
        }
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        if let Ok(_g) = CtxGuard::push(self.ctx) {
            // SAFETY: our allocation, freed once.
            unsafe {
                sys::cuMemFree_v2(self.ptr);
            }
        }
        release_primary(self.dev);
    }
}

/// Initializes the driver and retains device `ordinal`'s primary context (the one the
/// CUDA runtime uses). Pair with `release_primary`.
pub(crate) fn primary_context(ordinal: i32) -> Result<(sys::CUdevice, sys::CUcontext)> {
    libraries_present().map_err(NsaError::BackendUnavailable)?;
    // SAFETY: the driver library is present; these are plain driver calls.
    unsafe {
        check(sys::cuInit(0), "cuInit")?;
        let mut dev = 0;
        check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
        let mut ctx = std::ptr::null_mut();
        check(sys::cuDevicePrimaryCtxRetain(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
        Ok((dev, ctx))
    }
}

pub(crate) fn release_primary(dev: sys::CUdevice) {
    // SAFETY: balances a successful cuDevicePrimaryCtxRetain.
    unsafe {
        sys::cuDevicePrimaryCtxRelease_v2(dev);
    }
}

/// A stream of device `ordinal`'s primary context, destroyed on drop (for tests and
/// callers without a runtime of their own; hosts normally pass their own streams).
pub struct Stream {
    stream: CUstream,
    ctx: sys::CUcontext,
    dev: sys::CUdevice,
}

// SAFETY: a driver stream handle and a retained context; the driver API is thread safe.
unsafe impl Send for Stream {}

impl Stream {
    /// Creates a non-blocking stream on device `ordinal`.
    pub fn new(ordinal: i32) -> Result<Stream> {
        let (dev, ctx) = primary_context(ordinal)?;
        let make = || -> Result<CUstream> {
            let _g = CtxGuard::push(ctx)?;
            let mut stream = std::ptr::null_mut();
            // SAFETY: plain stream creation in the current context; destroyed in Drop.
            check(unsafe { sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) }, "cuStreamCreate")?;
            Ok(stream)
        };
        match make() {
            Ok(stream) => Ok(Stream { stream, ctx, dev }),
            Err(e) => {
                release_primary(dev);
                Err(e)
            }
        }
    }

    pub fn raw(&self) -> CUstream {
        self.stream
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(_g) = CtxGuard::push(self.ctx) {
            // SAFETY: created in `new`, destroyed once.
            unsafe {
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
        release_primary(self.dev);
    }
}

/// Zeroes `n` 32-bit words at device address `ptr`, in `stream`'s order (capturable in a
/// CUDA graph).
///
/// # Safety
/// `ptr..ptr + 4 n` is device memory of the current context that no other work in flight
/// uses.
pub(crate) unsafe fn zero_u32_async(ptr: u64, n: usize, stream: CUstream) -> Result<()> {
    check(sys::cuMemsetD32Async(ptr, 0, n, stream), "cuMemsetD32Async")
}

/// Waits for all work on `stream`.
pub fn stream_sync(stream: CUstream) -> Result<()> {
    // SAFETY: the caller's stream handle (or null, the legacy default stream).
    check(unsafe { sys::cuStreamSynchronize(stream) }, "cuStreamSynchronize")
}

pub(crate) fn device_attr(dev: sys::CUdevice, a: sys::CUdevice_attribute) -> Result<i32> {
    let mut v = 0;
    // SAFETY: plain query.
    check(unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) }, "cuDeviceGetAttribute")?;
    Ok(v)
}
