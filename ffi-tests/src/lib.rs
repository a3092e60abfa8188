//! Loads the built `libnsa` shared library with `libloading`, exactly as a plugin host
//! would: one symbol, `nsa_get_api`, then only the function table. The tests in `tests/`
//! drive the C ABI through it and compare with the Rust API.
//!
//! The library is `$NSA_LIB` if set, else the newest of `target/<profile>/libnsa.so` and
//! `target/<profile>/deps/libnsa.so` next to the running test binary (the dependency on
//! `nsa` makes cargo build it first).

use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::OnceLock;

pub use nsa::ffi::*;

pub mod fuzz;

/// xorshift64*, seeded: the ffi tests' and the fuzzer's generator (the project's one,
/// `src/rng.rs`).
#[path = "../../src/rng.rs"]
mod rng;
pub use rng::Rng;

#[path = "../../tests/common/shadow.rs"]
pub mod shadow;

/// The loaded library and its ABI v1 table.
pub struct Lib {
    /// `nsa_get_api`, the one symbol looked up.
    pub get_api: extern "C" fn(u32) -> *const nsa_api_v2,
    /// `nsa_get_api(NSA_ABI_VERSION)`.
    pub api: &'static nsa_api_v2,
    pub path: PathBuf,
    _lib: libloading::Library,
}

// SAFETY: the table is static immutable data in the library, which is never unloaded.
unsafe impl Sync for Lib {}
unsafe impl Send for Lib {}

fn lib_name() -> String {
    format!("{}nsa{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

/// Where the library under test is.
pub fn library_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NSA_LIB") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test binary>
    let deps = exe.parent().expect("deps dir");
    let profile = deps.parent().expect("profile dir");
    let candidates = [profile.join(lib_name()), deps.join(lib_name())];
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| panic!("no {} in {} or {}; build it with `cargo build` or set NSA_LIB", lib_name(), profile.display(), deps.display()))
}

/// The library, loaded once per test process.
pub fn lib() -> &'static Lib {
    static LIB: OnceLock<Lib> = OnceLock::new();
    LIB.get_or_init(|| {
        let path = library_path();
        // SAFETY: loading our own library runs no initializers with preconditions.
        let lib = unsafe { libloading::Library::new(&path) }.unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        // SAFETY: nsa_get_api has this signature (nsa.h).
        let get_api = *unsafe { lib.get::<extern "C" fn(u32) -> *const nsa_api_v2>(b"nsa_get_api\0") }.expect("nsa_get_api symbol");
        let api = get_api(NSA_ABI_VERSION);
        assert!(!api.is_null(), "nsa_get_api({NSA_ABI_VERSION}) returned NULL");
        // SAFETY: a non-NULL table is static in the library, which stays loaded.
        let api = unsafe { &*api };
        Lib { get_api, api, path, _lib: lib }
    })
}

impl Lib {
    /// `nsa_last_error` looked up by name, as a host does after `nsa_get_api` refused.
    pub fn last_error_by_symbol(&self) -> String {
        // SAFETY: nsa_last_error has this signature (nsa.h).
        let f = *unsafe { self._lib.get::<extern "C" fn() -> *const std::ffi::c_char>(b"nsa_last_error\0") }.expect("nsa_last_error symbol");
        c_str(f())
    }

    /// Whether the loaded library exports `name`.
    pub fn exports(&self, name: &str) -> bool {
        let sym = format!("{name}\0");
        // SAFETY: the symbol is only looked up, never called.
        unsafe { self._lib.get::<*const ()>(sym.as_bytes()) }.is_ok()
    }
}

/// The table of the loaded library.
pub fn api() -> &'static nsa_api_v2 {
    lib().api
}

fn c_str(p: *const std::ffi::c_char) -> String {
    assert!(!p.is_null());
    // SAFETY: the library returns NUL-terminated strings that stay valid until the next call.
    unsafe { CStr::from_ptr(p) }.to_str().expect("UTF-8").to_owned()
}

/// This thread's `nsa_last_error()`.
pub fn last_error() -> String {
    c_str((api().last_error)())
}

/// `nsa_status_string(status)`.
pub fn status_name(status: nsa_status) -> String {
    c_str((api().status_string)(status))
}

/// A 16-byte aligned byte buffer owned by the caller, as C's `malloc` would give.
pub struct AlignedBuf {
    words: Vec<u128>,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf { words: vec![0; len.div_ceil(16) + 1], len }
    }
    /// Filled with `byte` (to catch reads of memory the engine should have written).
    pub fn filled(len: usize, byte: u8) -> AlignedBuf {
        let mut b = AlignedBuf::new(len);
        b.bytes_mut().fill(byte);
        b
    }
    pub fn ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes of the u128 storage.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }
}

/// Panics with the library's message unless `status` is `NSA_STATUS_OK`.
#[track_caller]
pub fn ok(status: nsa_status) {
    assert_eq!(status, NSA_STATUS_OK, "{}: {}", status_name(status), last_error());
}

/// An `nsa_config_t` with `struct_size` set, for the library to fill.
pub fn empty_config() -> nsa_config_t {
    // SAFETY: all fields are integers or floats.
    let mut c: nsa_config_t = unsafe { std::mem::zeroed() };
    c.struct_size = std::mem::size_of::<nsa_config_t>() as u32;
    c
}

/// A preset from the library.
pub fn preset(p: nsa_preset) -> nsa_config_t {
    let mut c = empty_config();
    ok(unsafe { (api().config_preset)(p, &mut c) });
    c
}

/// A cache and a CPU backend made through the table, in buffers this struct owns.
pub struct CEngine {
    pub cfg: nsa_config_t,
    pub arena: AlignedBuf,
    pub buf: AlignedBuf,
    pub cache: *mut nsa_cache,
    pub cpu: *mut nsa_cpu_backend,
}

impl CEngine {
    pub fn new(cfg: &nsa_config_t) -> CEngine {
        let a = api();
        let (mut arena_bytes, mut buf_bytes) = (0usize, 0usize);
        unsafe {
            ok((a.cache_arena_size)(cfg, &mut arena_bytes));
            ok((a.cpu_buffer_size)(cfg, &mut buf_bytes));
        }
        let mut e = CEngine {
            cfg: *cfg,
            arena: AlignedBuf::filled(arena_bytes, 0xA5),
            buf: AlignedBuf::filled(buf_bytes, 0x5A),
            cache: std::ptr::null_mut(),
            cpu: std::ptr::null_mut(),
        };
        unsafe {
            ok((a.cache_init)(cfg, e.arena.ptr().cast(), arena_bytes, &mut e.cache));
            ok((a.cpu_backend_create)(cfg, e.buf.ptr().cast(), buf_bytes, &mut e.cpu));
        }
        e
    }
}

impl Drop for CEngine {
    fn drop(&mut self) {
        // SAFETY: destroy accepts any handle it made (or NULL) once.
        unsafe { (api().cpu_backend_destroy)(self.cpu) };
    }
}
