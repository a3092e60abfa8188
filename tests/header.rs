//! `include/nsa.h` is what cbindgen generates from `src/ffi` with `cbindgen.toml`, every
//! item in it is documented, and it compiles cleanly as C99 and as C++17, included twice.
//! `NSA_BLESS=1 cargo test --test header` rewrites the header instead of comparing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn generate() -> String {
    let config = cbindgen::Config::from_file(root().join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root().join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen failed on src/ffi")
        .write(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn committed_header_is_current() {
    let path = root().join("include/nsa.h");
    let fresh = generate();
    if std::env::var_os("NSA_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let line = committed.lines().zip(fresh.lines()).position(|(a, b)| a != b).unwrap_or(committed.lines().count().min(fresh.lines().count()));
        panic!(
            "include/nsa.h is out of date (first difference at line {}); regenerate it with \
             `NSA_BLESS=1 cargo test --test header` and commit it",
            line + 1
        );
    }
}

/// Every declaration in the header (function, constant, typedef, struct, field) comes
/// right after a doc comment. Lines continuing a declaration, closing braces and the
/// include-guard and C++ scaffolding are not items.
#[test]
fn every_item_is_documented() {
    let h = generate();
    let scaffolding = ["#ifndef NSA_H", "#define NSA_H", "#ifdef __cplusplus", "#ifndef __cplusplus", "extern \"C\" {"];
    let (mut in_comment, mut prev, mut prev_code) = (false, String::new(), String::from(";"));
    let mut undocumented = vec![];
    for (i, line) in h.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        if in_comment || t.starts_with("/*") {
            in_comment = !t.ends_with("*/");
        } else {
            let continuation = !(prev_code.ends_with(';') || prev_code.ends_with('{') || prev_code.starts_with('#'));
            let skip = continuation
                || t.starts_with('}')
                || t.starts_with("#include")
                || t.starts_with("#endif")
                || scaffolding.iter().any(|s| t.starts_with(s));
            if !skip && !prev.ends_with("*/") {
                undocumented.push(format!("line {}: {t}", i + 1));
            }
            prev_code = t.to_string();
        }
        prev = t.to_string();
    }
    assert!(undocumented.is_empty(), "undocumented items in nsa.h:\n{}", undocumented.join("\n"));
}

fn compile(compiler: &str, std: &str, ext: &str, extra: &[&str]) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nsa-header");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("twice.{ext}"));
    std::fs::write(
        &src,
        "#include \"nsa.h\"\n#include \"nsa.h\"\n\
         #if NSA_ABI_VERSION != 2 || !defined(NSA_VERSION_MAJOR) || !defined(NSA_VERSION_MINOR) || !defined(NSA_VERSION_PATCH)\n\
         #error version macros\n#endif\n\
         int main(void) { const nsa_api_v2 *api = nsa_get_api(NSA_ABI_VERSION); nsa_config_t c; c.struct_size = sizeof c;\n\
         return api != 0 && api->config_preset(NSA_PRESET_PAPER, &c) == NSA_STATUS_OK ? 0 : 1; }\n",
    )
    .unwrap();
    let out = Command::new(compiler)
        .arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only", "-I"])
        .arg(root().join("include"))
        .args(extra)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler} (needed to check nsa.h): {e}"));
    assert!(out.status.success(), "{compiler} -std={std} rejects nsa.h:\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn header_compiles_as_c99_and_cpp17_included_twice() {
    compile("cc", "c99", "c", &[]);
    compile("c++", "c++17", "cpp", &["-Wno-unused"]);
}
