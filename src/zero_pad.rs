//! Zeroing the padding bytes of structs written into caller memory (the C ABI's handles):
//! a host that hashes, snapshots or checks its arena with valgrind must not find
//! uninitialised bytes there. Rust leaves padding undefined when a value is moved, so the
//! handle's padding is zeroed in place, once, after the handle is written.

/// Zeroes the bytes of `*$v` (a `&mut $T`) that no field of `$T` covers. The field list
/// must be complete: an exhaustive destructuring of `$T` makes a new field a compile
/// error here.
macro_rules! zero_gaps {
    ($v:expr, $T:ident { $($f:ident),* $(,)? }) => {{
        let v: &mut $T = $v;
        #[allow(unused_variables)]
        let $T { $($f: _),* } = &*v;
        const SIZE: usize = ::std::mem::size_of::<$T>();
        let mut covered = [false; SIZE];
        $(
            let at = ::std::mem::offset_of!($T, $f);
            covered[at..at + ::std::mem::size_of_val(&v.$f)].fill(true);
        )*
        let p = (v as *mut $T).cast::<u8>();
        for (i, _) in covered.iter().enumerate().filter(|(_, &c)| !c) {
            // SAFETY: `i < size_of::<$T>()` is a padding byte of the exclusively borrowed
            // `*v` (no field covers it); any value may be written there.
            unsafe { p.add(i).write(0) };
        }
    }};
}
pub(crate) use zero_gaps;
