//! The one `syscall!` macro: every libc call in the crate goes through it (STYLE rule 4).
//!
//! Owns: turning a libc failure report into `std::io::Error`, in the three shapes libc uses.
//! Must never: hold `unsafe` code of its own beyond the call itself. Each call site carries a
//! `// SAFETY:` note for the arguments it passes, and sits in one of the modules allowed
//! `unsafe` (`spool/segment.rs`, `net/socket.rs`, `reactor/signal.rs`'s `kill`), which the
//! module graph check (`libc` I/O kind) keeps to those rows.

/// Calls `libc::f(args)` and returns `io::Result`:
///
/// - `syscall!(f(args))`: failure is `-1` with `errno` set; `Ok` holds the return value.
/// - `syscall!(@ptr f(args))`: failure is `MAP_FAILED` with `errno` set (mmap).
/// - `syscall!(@errno f(args))`: the function returns the error number itself and 0 on success
///   (posix_fallocate).
///
/// After mio's `src/sys/unix/mod.rs` `syscall!`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the call site documents why the arguments are valid for this call.
        let res = unsafe { ::libc::$fn($($arg),*) };
        if res == -1 {
            Err(::std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
    (@ptr $fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the call site documents why the arguments are valid for this call.
        let res = unsafe { ::libc::$fn($($arg),*) };
        if res == ::libc::MAP_FAILED {
            Err(::std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
    (@errno $fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the call site documents why the arguments are valid for this call.
        let res = unsafe { ::libc::$fn($($arg),*) };
        if res == 0 {
            Ok(())
        } else {
            Err(::std::io::Error::from_raw_os_error(res))
        }
    }};
}

pub(crate) use syscall;
