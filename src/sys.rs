//! The one `syscall!` macro: every libc call in the crate goes through it (STYLE rule 4), and
//! [`batch_thread`], the scheduling policy of the loop's helper threads.
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

/// Puts the calling thread under `SCHED_BATCH` (sched(7)): when it wakes, it never preempts
/// the thread running on its CPU, it waits for that thread's slice or sleep, or for a free CPU.
///
/// For the threads that wake many times per group commit (the sync thread, at each I/O
/// completion) or burn CPU in the background (the spare writer): under the default policy
/// each wake-up preempted the event loop, two context switches each: 10,000–14,000 of them
/// per 20,000 messages accepted, ~6 of the loop's ~34 µs of CPU per message (README, "Accept
/// path").
///
/// Lowering one's own policy needs no privilege; a failure leaves the thread as it was.
#[allow(unsafe_code)]
pub(crate) fn batch_thread() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid `sched_param` that outlives the call
    // (the kernel only reads it).
    syscall!(sched_setscheduler(0, libc::SCHED_BATCH, &param)).map(drop)
}

/// Test-only: the scheduling policy (stat field 41) of each of this process's threads named
/// `name`, as `proc(5)` shows it.
#[cfg(test)]
pub(crate) fn thread_policies(name: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        if let Some((_, policy)) = stat_policy(&stat).filter(|(comm, _)| *comm == name) {
            out.push(policy);
        }
    }
    out
}

/// Test-only: a `/proc/.../stat` line's thread name and scheduling policy (field 41).
#[cfg(test)]
fn stat_policy(stat: &str) -> Option<(&str, i32)> {
    // "tid (comm) state ...": comm may hold spaces, so split at the last ')'.
    let (head, rest) = stat.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    // `rest` starts at field 3, so field 41 is its 39th word.
    Some((comm, rest.split_whitespace().nth(38)?.parse().ok()?))
}

/// Test-only: waits up to two seconds for a thread named `name` under `SCHED_BATCH`.
#[cfg(test)]
pub(crate) fn wait_batch_thread(name: &str) -> bool {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < until {
        if thread_policies(name).contains(&libc::SCHED_BATCH) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_thread_sets_the_calling_threads_policy_only() {
        let t = std::thread::Builder::new()
            .name("sys-batch-test".into())
            .spawn(|| {
                batch_thread().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(300));
            })
            .unwrap();
        assert!(wait_batch_thread("sys-batch-test"), "{:?}", thread_policies("sys-batch-test"));
        // The test's own thread keeps the default policy.
        let me = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        assert_eq!(stat_policy(&me).unwrap().1, libc::SCHED_OTHER);
        t.join().unwrap();
    }
}
