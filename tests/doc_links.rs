//! The repository stands alone: every relative link in the Markdown files, the C header
//! and the Rust comments resolves to a file or folder inside the repository, every path
//! they cite (`docs/SPEC.md`, `src/cache/state.rs`, ...) exists, and none of them points
//! at team files outside it.

use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files to check: `*.md` anywhere, `include/nsa.h`, and every `.rs` file (its comments).
fn files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                // Build outputs and VCS data, not sources.
                if !(name.starts_with('.') || name == "target" || name == "build") {
                    walk(&p, out);
                }
            } else if name.ends_with(".md") || name.ends_with(".rs") || name == "nsa.h" {
                out.push(p);
            }
        }
    }
    let mut v = vec![];
    walk(&root(), &mut v);
    v.sort();
    v
}

/// The text to check: the whole of Markdown and the header; comment lines of Rust.
fn text(p: &Path) -> Vec<(usize, String)> {
    let s = std::fs::read_to_string(p).unwrap();
    let rust = p.extension().is_some_and(|e| e == "rs");
    s.lines()
        .enumerate()
        .filter(|(_, l)| !rust || l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

/// Markdown link targets on a line: what follows a closing bracket and an opening
/// parenthesis, up to the closing parenthesis.
fn md_links(line: &str) -> Vec<String> {
    let mut out = vec![];
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                out.push(after[..j].trim().to_string());
                rest = &after[j + 1..];
            }
            None => break,
        }
    }
    out
}

/// Repository paths cited in text, like `docs/SPEC.md` or `src/cpu/state.rs`.
fn cited_paths(line: &str) -> Vec<String> {
    const TOPS: [&str; 10] = ["docs/", "src/", "tests/", "examples/", "scripts/", "include/", "kernels/", "pkgconfig/", "ffi-tests/", ".ci/"];
    const EXTS: [&str; 12] = [".md", ".rs", ".h", ".c", ".cpp", ".hpp", ".sh", ".cu", ".in", ".toml", ".py", ".txt"];
    let mut out = vec![];
    for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || "._/-".contains(c))) {
        let w = word.trim_end_matches('.');
        // Only paths starting at the repository root: `docs/SPEC.md`, not `../x` or `a/docs/x`.
        if TOPS.iter().any(|t| w.starts_with(t)) && EXTS.iter().any(|e| w.ends_with(e)) && !w.contains('*') {
            out.push(w.to_string());
        }
    }
    out
}

/// `base/rel` without touching the file system, or None if it climbs out of the root.
fn resolve(base: &Path, rel: &str) -> Option<PathBuf> {
    let root = root();
    let mut p = base.to_path_buf();
    for c in Path::new(rel).components() {
        match c {
            Component::ParentDir => {
                if !p.pop() || !p.starts_with(&root) {
                    return None;
                }
            }
            Component::Normal(x) => p.push(x),
            Component::CurDir => {}
            _ => return None,
        }
    }
    p.starts_with(&root).then_some(p)
}

#[test]
fn every_relative_link_and_cited_path_resolves_inside_the_repository() {
    let root = root();
    let mut bad = vec![];
    let mut checked = 0;
    for f in files() {
        let rel_name = f.strip_prefix(&root).unwrap().display().to_string();
        let dir = f.parent().unwrap();
        for (n, line) in text(&f) {
            for target in md_links(&line) {
                let t = target.split_whitespace().next().unwrap_or("");
                // Rustdoc's intra-doc links (`[x](Self::f)`, `[y](crate::z)`) name items, not files.
                let rust_item = rel_name.ends_with(".rs") && t.contains("::");
                if t.is_empty() || t.starts_with('#') || t.contains("://") || t.starts_with("mailto:") || rust_item {
                    continue;
                }
                let path = t.split('#').next().unwrap();
                checked += 1;
                match resolve(dir, path) {
                    Some(p) if p.exists() => {}
                    Some(_) => bad.push(format!("{rel_name}:{n}: link to {t}: no such file")),
                    None => bad.push(format!("{rel_name}:{n}: link to {t}: outside the repository")),
                }
            }
            for p in cited_paths(&line) {
                checked += 1;
                if !root.join(&p).exists() {
                    bad.push(format!("{rel_name}:{n}: cites {p}: no such file"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{} broken of {checked} links and paths:\n{}", bad.len(), bad.join("\n"));
    assert!(checked > 50, "only {checked} links and paths found: the scan is broken");
}

#[test]
fn no_document_cites_team_files_outside_the_repository() {
    let root = root();
    let banned = ["../shared", "NSA_SPEC.md", "DESIGN.md", "GPU.md", "GGML.md"];
    let mut bad = vec![];
    for f in files() {
        let rel_name = f.strip_prefix(&root).unwrap().display().to_string();
        for (n, line) in text(&f) {
            for b in banned {
                if line.contains(b) {
                    bad.push(format!("{rel_name}:{n}: {}", line.trim()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "references to files outside the repository:\n{}", bad.join("\n"));
}

#[test]
fn the_scanners_find_what_they_should() {
    assert_eq!(md_links("see [a](docs/SPEC.md) and [b](https://x.y/z) [c](#top)"), vec!["docs/SPEC.md", "https://x.y/z", "#top"]);
    assert_eq!(cited_paths("laid out as `docs/SPEC.md` (\"Weight layouts\"), tests/state.rs."), vec!["docs/SPEC.md", "tests/state.rs"]);
    let r = root();
    assert!(resolve(&r.join("docs"), "../README.md").is_some());
    assert!(resolve(&r, "../shared/NSA_SPEC.md").is_none());
}
