//! Spare segment files, written with zeros and synced ahead of need on a thread of their own.
//!
//! Why: a segment made with `posix_fallocate` is all unwritten extents. The first sync of each
//! range into it must also convert those extents, which makes the file's metadata dirty, so
//! nearly every group commit writes the inode as well as the data: on this project's test
//! machine (ext4) a 20 KiB `pwrite` + `fdatasync` took p50 214 µs into a fallocated file and
//! 124 µs into one whose blocks were written before (`benches/commit.sh`). A spare is such a
//! pre-written file; the spool renames it into place when it rolls over
//! ([`Spares::take`]), and a commit into it costs the data write alone. This is what databases
//! do with their write-ahead log files.
//!
//! Owns: the files `spare-<n>.tmp` (being written) and `spare-<n>.ready` (written and synced)
//! in the spool directory, and the thread that writes them. At most one spare is kept; the
//! next is written only when asked ([`Spares::request`]: the spool asks when its active
//! segment is half full, if its commits were small enough for a spare to pay, see [`pays`];
//! the first is made at start), so the zero writes compete with the commits once per
//! segment, not all the time. A `.ready` spare left by an earlier run is used
//! again; a `.tmp` one is deleted.
//!
//! Must never: hand out a file that is not wholly written and synced (the `.ready` name is
//! given only after `fdatasync`); take space the spool keeps free (a spare is made only when
//! the filesystem keeps `min_free_space` plus one more segment free beyond it); block the
//! event loop (the loop only reads a flag and, on a roll, takes a lock the thread holds for
//! a few instructions).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::segment::free_space;

/// Zeros are written in pieces of this size (and the stop flag is read between them).
const CHUNK: usize = 1 << 20;

/// Above this many bytes per group commit, a spare costs the device more than it saves.
///
/// The cost model, from `benches/commit.sh` and `sluice-load disk` on the test machine (ext4
/// on a virtio disk, 1.2 GB/s): a commit into fallocated blocks pays an extent conversion,
/// ~70 µs more than into written ones, once per sync whatever its size; writing a spare pays
/// the device's bandwidth once per byte of the segment (a 64 MiB spare is ~55 ms of writes,
/// which commits made meanwhile queue behind). Per byte of mail the two are equal at ~84 KB
/// per sync (70 µs x 1.2 GB/s). 1 KiB messages commit ~8 KiB at a time and gain from
/// spares; 100 KiB ones commit ~1 MB at a time, where the zero writes halved the rate
/// (4,600 msg/s with spares, 6,600 without) and made the commit p99 40 ms instead of 5 ms.
pub(crate) const MAX_BYTES_PER_SYNC: u64 = 64 * 1024;

/// Whether a spare pays for itself for a segment that took `bytes` in `syncs` group commits
/// (no commit yet counts as one: all of it in one batch).
pub(crate) fn pays(bytes: u64, syncs: u64) -> bool {
    bytes / syncs.max(1) <= MAX_BYTES_PER_SYNC
}

/// The spare-making thread and the spare it made. Dropping it stops the thread (within one
/// [`CHUNK`]) and leaves a finished spare on disk for the next run.
pub(crate) struct Spares {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Mirrors `state.ready.is_some()`, so that the loop can look without locking.
    has_ready: AtomicBool,
    stop: AtomicBool,
}

struct State {
    /// A `.ready` spare and its length.
    ready: Option<(PathBuf, u64)>,
    /// The spool wants a spare and none is being made.
    wanted: bool,
    /// Number for the next spare's name.
    next: u64,
}

impl Spares {
    /// Starts the thread for spares of `size` bytes in `dir`. Deletes leftover `.tmp` files,
    /// keeps one `.ready` spare of exactly `size` bytes (deleting the others), and asks for a
    /// spare at once when none is left.
    pub(crate) fn start(dir: &Path, size: u64, min_free_space: u64) -> io::Result<Spares> {
        let mut ready = None;
        let mut next = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some((n, done)) = name.to_str().and_then(parse_name) else { continue };
            next = next.max(n + 1);
            let keep = done && ready.is_none() && entry.metadata().is_ok_and(|m| m.len() == size);
            if keep {
                ready = Some((entry.path(), size));
            } else {
                // Best effort: a stray spare holds only zeros.
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let shared = Arc::new(Shared {
            has_ready: AtomicBool::new(ready.is_some()),
            state: Mutex::new(State { wanted: ready.is_none(), ready, next }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let worker = Arc::clone(&shared);
        let dir = dir.to_path_buf();
        let thread = std::thread::Builder::new().name("sluice-spare".into()).spawn(move || {
            // Background work: never preempt the loop (see `sys::batch_thread`).
            let _ = crate::sys::batch_thread();
            run(&worker, &dir, size, min_free_space)
        })?;
        Ok(Spares { shared, thread: Some(thread) })
    }

    /// True when a spare can be taken now. No lock.
    pub(crate) fn is_ready(&self) -> bool {
        self.shared.has_ready.load(Ordering::Acquire)
    }

    /// Takes the spare (path and length), if one is ready. The next is made when asked for.
    pub(crate) fn take(&self) -> Option<(PathBuf, u64)> {
        let mut st = self.shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.shared.has_ready.store(false, Ordering::Release);
        st.ready.take()
    }

    /// Asks for a spare if none is ready or being made. Cheap when one is.
    pub(crate) fn request(&self) {
        if self.is_ready() {
            return;
        }
        let mut st = self.shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.ready.is_none() && !st.wanted {
            st.wanted = true;
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Taking the lock orders the flag before the thread's next wait.
        drop(self.shared.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `spare-<n>.tmp` → (n, false), `spare-<n>.ready` → (n, true).
fn parse_name(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix("spare-")?;
    let (n, done) = match rest.strip_suffix(".ready") {
        Some(n) => (n, true),
        None => (rest.strip_suffix(".tmp")?, false),
    };
    Some((n.parse().ok()?, done))
}

/// The thread: waits until a spare is wanted, makes it, repeats until stopped.
fn run(shared: &Shared, dir: &Path, size: u64, min_free_space: u64) {
    loop {
        let n = {
            let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            while !(shared.stop.load(Ordering::Acquire) || st.wanted && st.ready.is_none()) {
                st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            st.next += 1;
            st.next - 1
        };
        // Room for the spare, one more segment, and the reserve: a spare must never be what
        // makes the spool refuse mail.
        let room = free_space(dir).is_ok_and(|f| f >= size.saturating_mul(2).saturating_add(min_free_space));
        let made = if room { make(dir, n, size, &shared.stop).ok() } else { None };
        let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.wanted = false;
        if let Some(path) = made {
            st.ready = Some((path, size));
            shared.has_ready.store(true, Ordering::Release);
        }
    }
}

/// Writes `spare-<n>.tmp` full of zeros, syncs it, and renames it `.ready`. The file is
/// deleted again if any step fails or `stop` is raised.
fn make(dir: &Path, n: u64, size: u64, stop: &AtomicBool) -> io::Result<PathBuf> {
    let tmp = dir.join(format!("spare-{n}.tmp"));
    let done = dir.join(format!("spare-{n}.ready"));
    let result = (|| {
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        write_zeros(&file, size, stop)?;
        file.sync_data()?;
        std::fs::rename(&tmp, &done)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| done)
}

fn write_zeros(file: &File, size: u64, stop: &AtomicBool) -> io::Result<()> {
    let zeros = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        if stop.load(Ordering::Acquire) {
            return Err(io::Error::other("stopped"));
        }
        let n = (size - off).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-spare-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn wait_ready(s: &Spares) {
        let t = Instant::now();
        while !s.is_ready() {
            assert!(t.elapsed() < Duration::from_secs(20), "no spare made");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_spare_pays_for_small_commits_only() {
        assert!(pays(32 << 20, 4096), "8 KiB per sync (1 KiB messages)");
        assert!(pays(MAX_BYTES_PER_SYNC * 10, 10));
        assert!(!pays(MAX_BYTES_PER_SYNC * 10 + 10, 10));
        assert!(!pays(32 << 20, 32), "1 MiB per sync (100 KiB messages)");
        assert!(!pays(32 << 20, 0), "no commit yet: one batch of all of it");
        assert!(pays(40 << 10, 0));
    }

    #[test]
    fn a_spare_is_made_at_start_and_again_on_request() {
        let dir = temp_dir("cycle");
        let s = Spares::start(&dir, 3 * CHUNK as u64 + 5, 0).unwrap();
        wait_ready(&s);
        assert!(crate::sys::wait_batch_thread("sluice-spare"), "{:?}", crate::sys::thread_policies("sluice-spare"));
        let (path, len) = s.take().unwrap();
        assert_eq!(len, 3 * CHUNK as u64 + 5);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert!(bytes.iter().all(|&b| b == 0));
        // The next one is made only when asked for.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!s.is_ready());
        s.request();
        wait_ready(&s);
        assert!(s.take().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_ready_spare_survives_a_restart_and_leftovers_are_removed() {
        let dir = temp_dir("restart");
        {
            let s = Spares::start(&dir, 4096, 0).unwrap();
            wait_ready(&s);
        }
        std::fs::write(dir.join("spare-9.tmp"), b"half").unwrap();
        std::fs::write(dir.join("spare-10.ready"), b"wrong size").unwrap();
        std::fs::write(dir.join("seg-0000000000000001.spool"), b"not ours").unwrap();
        let s = Spares::start(&dir, 4096, 0).unwrap();
        assert!(s.is_ready(), "the earlier run's spare is used again");
        assert_eq!(names(&dir), ["seg-0000000000000001.spool", "spare-0.ready"]);
        let (path, _) = s.take().unwrap();
        assert!(path.ends_with("spare-0.ready"));
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_spare_is_made_without_room_beyond_the_reserve() {
        let dir = temp_dir("room");
        let s = Spares::start(&dir, 4096, u64::MAX / 2).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!s.is_ready());
        assert!(names(&dir).is_empty());
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
