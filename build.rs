//! Gives the shared library its SONAME, `libnsa.so.<major>`, so programs linked against
//! it record the versioned name and keep loading the same major version after upgrades
//! (pkgconfig/install.sh installs the matching links).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets CARGO_PKG_VERSION_MAJOR");
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnsa.so.{major}");
    }
}
