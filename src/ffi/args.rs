//! Checks of the caller's pointers, ranges and `struct_size`-versioned structs. Every
//! exported function turns raw arguments into references only through these helpers.

use std::mem::{align_of, size_of};

use super::status::{FfiResult, Failure, NSA_STATUS_BAD_STRUCT_SIZE, NSA_STATUS_INVALID_HANDLE};
use crate::error::NsaError;

/// Largest `struct_size` accepted: bigger values are taken to be uninitialized memory.
pub(crate) const MAX_STRUCT_SIZE: u32 = 4096;

fn aligned<T>(p: *const T, arg: &'static str) -> FfiResult {
    let addr = p as usize;
    if addr % align_of::<T>() != 0 {
        return Err(NsaError::Misaligned { what: arg, addr, align: align_of::<T>() }.into());
    }
    Ok(())
}

/// A non-NULL, aligned pointer to one `T`.
pub(crate) fn non_null<T>(p: *const T, arg: &'static str) -> FfiResult<*const T> {
    if p.is_null() {
        return Err(Failure::null(arg));
    }
    aligned(p, arg)?;
    Ok(p)
}

/// An output parameter: non-NULL and aligned. Write it only after everything else succeeded.
pub(crate) fn out_ptr<T>(p: *mut T, arg: &'static str) -> FfiResult<*mut T> {
    non_null(p, arg).map(|p| p.cast_mut())
}

fn byte_len<T>(len: usize, arg: &'static str) -> FfiResult<usize> {
    len.checked_mul(size_of::<T>())
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| NsaError::arg(arg, format!("{len} elements"), "the range overflows the address space").into())
}

/// A `#[repr(C)]` struct whose first field is `uint32_t struct_size`, so callers built
/// against an older or newer `nsa.h` keep working.
///
/// # Safety
/// `Self` is `#[repr(C)]`, starts with a `u32` `struct_size`, has no padding, and every bit
/// pattern of its fields is valid.
pub(crate) unsafe trait Versioned: Copy {
    /// The C name, for messages.
    const NAME: &'static str;
}

fn struct_size<T: Versioned>(p: *const T, arg: &'static str) -> FfiResult<u32> {
    non_null(p, arg)?;
    // SAFETY: non-NULL, aligned; struct_size is the first field.
    let size = unsafe { p.cast::<u32>().read() };
    let ours = size_of::<T>() as u32;
    if size < ours || size > MAX_STRUCT_SIZE {
        return Err(Failure::new(
            NSA_STATUS_BAD_STRUCT_SIZE,
            format!(
                "bad struct_size: {arg}->struct_size = {size}: must be sizeof({}) = {ours} (at most {MAX_STRUCT_SIZE})",
                T::NAME
            ),
        ));
    }
    Ok(size)
}

/// Reads an input struct. A `struct_size` larger than this library's struct is accepted
/// when every byte past the fields it knows is zero (fields of a newer `nsa.h` left unset).
///
/// # Safety
/// `p` points to `struct_size` readable bytes (the caller's promise).
pub(crate) unsafe fn read_struct<T: Versioned>(p: *const T, arg: &'static str) -> FfiResult<T> {
    let size = struct_size(p, arg)? as usize;
    let tail = std::slice::from_raw_parts(p.cast::<u8>().add(size_of::<T>()), size - size_of::<T>());
    if let Some(i) = tail.iter().position(|&b| b != 0) {
        return Err(Failure::new(
            NSA_STATUS_BAD_STRUCT_SIZE,
            format!(
                "bad struct_size: {arg}->struct_size = {size}: byte {} is not zero, but this library's {} has {} bytes (a field of a newer nsa.h?)",
                size_of::<T>() + i,
                T::NAME,
                size_of::<T>()
            ),
        ));
    }
    Ok(p.read())
}

/// An output struct whose `struct_size` the caller set; checked before any work is done.
pub(crate) struct OutStruct<T> {
    p: *mut T,
    size: u32,
}

/// Checks an output struct's pointer and `struct_size` (at least this library's size).
pub(crate) fn out_struct<T: Versioned>(p: *mut T, arg: &'static str) -> FfiResult<OutStruct<T>> {
    let size = struct_size(p, arg)?;
    Ok(OutStruct { p, size })
}

impl<T: Versioned> OutStruct<T> {
    /// Writes `v` keeping the caller's `struct_size`, and zeroes the caller's bytes past
    /// this library's struct (fields it does not know read as zero).
    ///
    /// # Safety
    /// `p` points to `struct_size` writable bytes (the caller's promise).
    pub unsafe fn write(self, v: T) {
        self.p.write(v);
        self.p.cast::<u32>().write(self.size);
        let extra = self.size as usize - size_of::<T>();
        std::ptr::write_bytes(self.p.cast::<u8>().add(size_of::<T>()), 0, extra);
    }
}

/// Opaque handle types living in caller memory, recognized by a magic number.
pub(crate) trait Handle {
    const MAGIC: u64;
    const NAME: &'static str;
    /// # Safety
    /// `p` is non-NULL and aligned.
    unsafe fn magic(p: *const Self) -> u64;
}

/// Checks a handle argument: non-NULL, aligned, and live (its magic is intact).
///
/// # Safety
/// A non-NULL `p` points to readable memory of the handle's size.
pub(crate) unsafe fn handle<'a, H: Handle>(p: *const H, arg: &'static str) -> FfiResult<&'a H> {
    non_null(p, arg)?;
    if H::magic(p) != H::MAGIC {
        return Err(Failure::new(
            NSA_STATUS_INVALID_HANDLE,
            format!("invalid handle: {arg} = {p:p} is not a live {} (never initialized, or already released)", H::NAME),
        ));
    }
    Ok(&*p)
}

/// As `handle`, mutable.
///
/// # Safety
/// As `handle`, and no other reference to the handle is live.
pub(crate) unsafe fn handle_mut<'a, H: Handle>(p: *mut H, arg: &'static str) -> FfiResult<&'a mut H> {
    handle(p, arg)?;
    Ok(&mut *p)
}

/// Where a handle goes inside the caller's buffer: the buffer's start must be aligned to
/// `align`, the handle takes the first `handle_bytes(H)` bytes, the engine the rest.
pub(crate) const fn handle_bytes<H>() -> usize {
    size_of::<H>().div_ceil(64) * 64
}

/// Checks a caller buffer for a handle of type `H` followed by `need` engine bytes, and
/// returns the engine's part.
///
/// # Safety
/// `p` points to `bytes` writable bytes (the caller's promise).
pub(crate) unsafe fn carve<'a, H>(
    p: *mut u8,
    bytes: usize,
    need: usize,
    align: usize,
    arg: &'static str,
) -> FfiResult<&'a mut [u8]> {
    if p.is_null() {
        return Err(Failure::null(arg));
    }
    let addr = p as usize;
    if addr % align.max(align_of::<H>()) != 0 {
        return Err(NsaError::Misaligned { what: arg, addr, align: align.max(align_of::<H>()) }.into());
    }
    let total = handle_bytes::<H>() + need;
    if bytes < total {
        return Err(NsaError::BufferTooSmall { what: arg, got: bytes, need: total }.into());
    }
    if addr.checked_add(bytes).is_none() || bytes > isize::MAX as usize {
        return Err(NsaError::arg("bytes", bytes, "the range overflows the address space").into());
    }
    Ok(std::slice::from_raw_parts_mut(p.add(handle_bytes::<H>()), bytes - handle_bytes::<H>()))
}

/// Byte range `[start, start + len)` of one array argument: checked by `span`, then
/// compared by `disjoint` before any reference to it is made.
#[derive(Clone, Copy)]
pub(crate) struct Span {
    pub arg: &'static str,
    pub start: usize,
    pub len: usize,
    pub written: bool,
}

/// Checks an array argument of `len` elements: NULL only when `len == 0`, aligned for
/// `T`, and at most `isize::MAX` bytes.
pub(crate) fn span<T>(p: *const T, len: usize, arg: &'static str, written: bool) -> FfiResult<Span> {
    if len > 0 {
        non_null(p, arg)?;
    }
    let bytes = byte_len::<T>(len, arg)?;
    if (p as usize).checked_add(bytes).is_none() {
        return Err(NsaError::arg(arg, format!("{p:p}"), format!("{len} elements run past the end of the address space")).into());
    }
    Ok(Span { arg, start: p as usize, len: bytes, written })
}

impl Span {
    /// # Safety
    /// `self` came from `span::<T>` and the caller of the exported function promised the
    /// range is valid for `'a`; nothing writes it during `'a`.
    pub unsafe fn slice<'a, T>(self) -> &'a [T] {
        match self.len {
            0 => &[],
            n => std::slice::from_raw_parts(self.start as *const T, n / size_of::<T>()),
        }
    }
    /// # Safety
    /// As `slice`, and `disjoint` passed with `self.written`: nothing else accesses it.
    pub unsafe fn slice_mut<'a, T>(self) -> &'a mut [T] {
        match self.len {
            0 => &mut [],
            n => std::slice::from_raw_parts_mut(self.start as *mut T, n / size_of::<T>()),
        }
    }
}

/// Ranges the engine writes must not overlap any other range it reads or writes.
pub(crate) fn disjoint(spans: &[Span]) -> FfiResult {
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            let overlap = a.len > 0 && b.len > 0 && a.start < b.start + b.len && b.start < a.start + a.len;
            if (a.written || b.written) && overlap {
                let (w, o) = if a.written { (a, b) } else { (b, a) };
                return Err(NsaError::arg(
                    w.arg,
                    format!("{:#x}..{:#x}", w.start, w.start + w.len),
                    format!("overlaps {} at {:#x}..{:#x}; the engine writes it", o.arg, o.start, o.start + o.len),
                )
                .into());
            }
        }
    }
    Ok(())
}

