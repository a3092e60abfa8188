//! The function table and the version and status functions of the loaded library.

use nsa::{Config, Preset};
use nsa_ffi_tests::*;

#[test]
fn the_table_describes_the_loaded_library() {
    let l = lib();
    let a = l.api;
    assert_eq!(a.struct_size as usize, std::mem::size_of::<nsa_api_v2>());
    assert_eq!(a.abi_version, NSA_ABI_VERSION);
    assert_eq!((a.abi_version_fn)(), NSA_ABI_VERSION);
    assert_eq!((a.version)(), NSA_VERSION);
    assert_eq!(NSA_VERSION, (NSA_VERSION_MAJOR << 16) | (NSA_VERSION_MINOR << 8) | NSA_VERSION_PATCH);
    let s = unsafe { std::ffi::CStr::from_ptr((a.version_string)()) }.to_str().unwrap();
    assert_eq!(s, format!("{NSA_VERSION_MAJOR}.{NSA_VERSION_MINOR}.{NSA_VERSION_PATCH}"));
    // Repeated calls return the same static table.
    assert_eq!((l.get_api)(NSA_ABI_VERSION), a as *const nsa_api_v2);
    // Every entry is a function of the loaded library, not of this test binary's copy.
    let this_binary = nsa_get_api as extern "C" fn(u32) -> *const nsa_api_v2 as usize;
    assert_ne!((l.get_api) as usize, this_binary, "the table must come from {}", l.path.display());
}

#[test]
fn status_strings_name_every_code() {
    let names = [
        "NSA_STATUS_OK",
        "NSA_STATUS_INVALID_ARGUMENT",
        "NSA_STATUS_NULL_POINTER",
        "NSA_STATUS_BAD_STRUCT_SIZE",
        "NSA_STATUS_INVALID_HANDLE",
        "NSA_STATUS_INVALID_CONFIG",
        "NSA_STATUS_BUFFER_TOO_SMALL",
        "NSA_STATUS_MISALIGNED",
        "NSA_STATUS_UNKNOWN_SEQUENCE",
        "NSA_STATUS_SEQUENCE_EXISTS",
        "NSA_STATUS_OUT_OF_PAGES",
        "NSA_STATUS_SEQUENCE_TOO_LONG",
        "NSA_STATUS_NO_STEP",
        "NSA_STATUS_BACKEND_UNAVAILABLE",
        "NSA_STATUS_CUDA_ERROR",
        "NSA_STATUS_PANIC",
        "NSA_STATUS_CORRUPT",
        "NSA_STATUS_STEP_OPEN",
        "NSA_STATUS_LAYER_ALREADY_RUN",
        "NSA_STATUS_BUSY",
    ];
    for (code, name) in names.iter().enumerate() {
        assert_eq!(status_name(code as nsa_status), *name);
    }
    assert_eq!(NSA_STATUS_BUSY as usize, names.len() - 1);
    for bad in [-1, names.len() as nsa_status, i32::MIN] {
        assert_eq!(status_name(bad), "NSA_STATUS_UNKNOWN");
    }
}

#[test]
fn presets_and_sizes_match_the_rust_api() {
    for (c, r) in [(NSA_PRESET_PAPER, Preset::Paper), (NSA_PRESET_FLA, Preset::Fla)] {
        let cfg = preset(c);
        assert_eq!(cfg, nsa_config_t::from(&Config::preset(r)));
        assert_eq!(Config::try_from(&cfg).unwrap(), Config::preset(r));
        ok(unsafe { (api().config_validate)(&cfg) });
        let (mut arena, mut buf) = (0usize, 0usize);
        unsafe {
            ok((api().cache_arena_size)(&cfg, &mut arena));
            ok((api().cpu_buffer_size)(&cfg, &mut buf));
        }
        // The handles take a little room in front of what the Rust API needs.
        let ra = nsa::Cache::arena_bytes(&Config::preset(r)).unwrap();
        let rb = nsa::cpu::CpuBackend::buffer_bytes(&Config::preset(r)).unwrap();
        assert!(arena > ra && arena - ra <= 4096, "{arena} vs {ra}");
        assert!(buf > rb && buf - rb <= 4096, "{buf} vs {rb}");
    }
}

/// Every function `nsa.h` declares is exported by the library, and the table holds every
/// one of them except `nsa_get_api` itself.
#[test]
fn header_functions_are_exported_and_in_the_table() {
    let header = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../include/nsa.h")).unwrap();
    let functions: Vec<&str> = header
        .lines()
        .filter(|l| l.contains('(') && !l.starts_with([' ', '#', '*', '/']) && !l.starts_with("typedef"))
        .filter_map(|l| l.split('(').next()?.rsplit([' ', '*']).next())
        .filter(|name| name.starts_with("nsa_"))
        .collect();
    assert!(functions.len() > 20, "{functions:?}");
    for f in &functions {
        assert!(lib().exports(f), "{f} is declared in nsa.h but not exported by {}", lib().path.display());
    }
    let table_entries = (std::mem::size_of::<nsa_api_v2>() - 8) / std::mem::size_of::<usize>();
    assert_eq!(table_entries + 1, functions.len(), "nsa_api_v2 must hold every function but nsa_get_api: {functions:?}");
}

#[test]
fn cuda_entry_points_answer_without_cuda() {
    // In every build the CUDA functions exist. Without a usable device (CI: no GPU; a
    // build without the `cuda` feature) they answer BACKEND_UNAVAILABLE with a reason and
    // leave their outputs alone; with one, probe describes it.
    let a = api();
    let mut info: nsa_cuda_device_info_t = unsafe { std::mem::zeroed() };
    info.struct_size = std::mem::size_of::<nsa_cuda_device_info_t>() as u32;
    let st = unsafe { (a.cuda_probe)(0, &mut info) };
    if st == NSA_STATUS_OK {
        assert!(info.cc_major >= 8 && info.multiprocessors > 0, "{info:?}");
        println!("CUDA device present: cc {}.{}", info.cc_major, info.cc_minor);
        return;
    }
    assert_eq!(st, NSA_STATUS_BACKEND_UNAVAILABLE, "{}", last_error());
    let why = last_error();
    assert!(why.starts_with("nsa_cuda_probe: backend unavailable: "), "{why}");
    assert_eq!(info.cc_major, 0, "output written on failure");
    let cfg = preset(NSA_PRESET_PAPER);
    let mut out: *mut nsa_cuda_backend = std::ptr::null_mut();
    let st = unsafe { (a.cuda_backend_create)(&cfg, std::ptr::null(), 256, 1 << 30, &mut out) };
    assert_eq!(st, NSA_STATUS_BACKEND_UNAVAILABLE, "{}", last_error());
    assert!(out.is_null(), "handle written on failure");
    // Options are read before the backend is made: a bad struct_size is reported as such.
    let mut opts = nsa_cuda_options_t { struct_size: 0, device_ordinal: 1, cache_dir: std::ptr::null() };
    let st = unsafe { (a.cuda_backend_create)(&cfg, &opts, 256, 1 << 30, &mut out) };
    assert_eq!(st, NSA_STATUS_BAD_STRUCT_SIZE, "{}", last_error());
    opts.struct_size = std::mem::size_of::<nsa_cuda_options_t>() as u32;
    let st = unsafe { (a.cuda_backend_create)(&cfg, &opts, 256, 1 << 30, &mut out) };
    assert_eq!(st, NSA_STATUS_BACKEND_UNAVAILABLE, "{}", last_error());
    assert!(out.is_null(), "handle written on failure");
    unsafe { (a.cuda_backend_destroy)(std::ptr::null_mut()) }; // NULL is ignored
    println!("no CUDA: {why}");
}
