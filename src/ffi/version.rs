//! ABI and library versions.

use std::ffi::c_char;

use super::status::guard_infallible;

/// Version of the C ABI described by this header: the layout of every struct and the
/// signature of every function. It changes only on an incompatible change; compatible
/// additions (new functions appended to the table, new trailing struct fields, new status
/// codes) keep it. Pass it to `nsa_get_api`.
pub const NSA_ABI_VERSION: u32 = 2;
/// Library major version (the crate's semver major).
pub const NSA_VERSION_MAJOR: u32 = 0;
/// Library minor version.
pub const NSA_VERSION_MINOR: u32 = 2;
/// Library patch version.
pub const NSA_VERSION_PATCH: u32 = 0;
/// The library version as one number: `(MAJOR << 16) | (MINOR << 8) | PATCH`, comparable
/// with `nsa_version()`.
pub const NSA_VERSION: u32 = (NSA_VERSION_MAJOR << 16) | (NSA_VERSION_MINOR << 8) | NSA_VERSION_PATCH;

const VERSION_STRING: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The C ABI version the loaded library implements (`NSA_ABI_VERSION` of its header).
/// Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn nsa_abi_version() -> u32 {
    NSA_ABI_VERSION
}

/// The loaded library's version, encoded as `NSA_VERSION` is. A host compiled against
/// this header may compare it with `NSA_VERSION`. Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn nsa_version() -> u32 {
    NSA_VERSION
}

/// The loaded library's version as a static NUL-terminated string such as `"0.2.0"`
/// (never NULL; do not free it). Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn nsa_version_string() -> *const c_char {
    guard_infallible("nsa_version_string", VERSION_STRING, || VERSION_STRING).as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_constants_match_the_crate() {
        let v = |s: &str| s.parse::<u32>().unwrap();
        assert_eq!(NSA_VERSION_MAJOR, v(env!("CARGO_PKG_VERSION_MAJOR")));
        assert_eq!(NSA_VERSION_MINOR, v(env!("CARGO_PKG_VERSION_MINOR")));
        assert_eq!(NSA_VERSION_PATCH, v(env!("CARGO_PKG_VERSION_PATCH")));
        let s = unsafe { std::ffi::CStr::from_ptr(nsa_version_string()) };
        assert_eq!(s.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }
}
