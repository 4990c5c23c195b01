//! One memory-mapped, append-only segment file, and the spool's only `unsafe`.
//!
//! Owns the file descriptor and the `MAP_SHARED` mapping of one segment: creation with the
//! space preallocated by `posix_fallocate` (so a full disk is reported as
//! [`SpoolError::NoSpace`] when the segment is created, never as a SIGBUS on a later store into
//! the map) or adoption of a spare whose blocks were written ahead (`spare.rs`), appends
//! (records staged and written with one `pwrite` per batch; the map is read-only),
//! durability (`msync(MS_SYNC)` of the dirty page range, then `fdatasync`), sealing
//! (truncate to the used length) and removal. It knows nothing of record contents beyond writing the segment header.
//!
//! It must never touch bytes at or past the file's length through the map (that is the SIGBUS
//! case), and never let a slice of the map outlive the mapping (slices borrow `&self`).
//! The spool directory is locked ([`lock_dir`]) so no other relay truncates our files.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Arc;

use super::format::{self, RecordKey};
use super::SpoolError;
use crate::sys::syscall;

/// Classifies an I/O error once: a full device or quota is [`SpoolError::NoSpace`] (the relay
/// answers 452), anything else is [`SpoolError::Io`] with what was being done.
pub(crate) fn map_io(what: &'static str, e: io::Error) -> SpoolError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => SpoolError::NoSpace,
        _ => SpoolError::Io(what, e),
    }
}

/// Like [`map_io`], but names the file in the message (for errors a human must act on).
pub(crate) fn map_io_at(what: &'static str, path: &Path, e: io::Error) -> SpoolError {
    match map_io(what, e) {
        SpoolError::Io(what, e) => SpoolError::Io(what, io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        other => other,
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    match syscall!(sysconf(libc::_SC_PAGESIZE)) {
        Ok(n) if n > 0 => n as usize,
        // 4 KiB is the smallest page size on every platform we run on; a smaller assumed page
        // only makes msync's range start earlier than needed.
        _ => 4096,
    }
}

/// Takes an exclusive, non-blocking `flock` on `<dir>/lock`, creating it; this also proves the
/// directory is writable. The lock lives as long as the returned file, which holds our process
/// id (for `sluice queue flush`, see [`locking_pid`]).
pub(crate) fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| map_io_at("spool directory is not writable", &path, e))?;
    // SAFETY: the fd is open for the duration of the call; flock takes no pointers.
    match syscall!(flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(SpoolError::Io(
                "spool directory is in use by another process",
                io::Error::new(e.kind(), path.display().to_string()),
            ))
        }
        Err(e) => return Err(map_io_at("lock spool directory", &path, e)),
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
        .map_err(|e| map_io_at("write process id to spool lock", &path, e))?;
    Ok(file)
}

/// The process id of the relay holding `<dir>/lock`, or `None` when no process holds it (no
/// relay runs on this spool). Read from the kernel's lock table (`/proc/locks`), not from the
/// file: probing with a lock of our own could make a relay starting at that instant fail, and
/// the id in the file is stale until the new holder has rewritten it.
pub(crate) fn locking_pid(dir: &Path) -> Result<Option<u32>, SpoolError> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join("lock");
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(map_io_at("stat spool lock", &path, e)),
    };
    let table = std::fs::read_to_string("/proc/locks").map_err(|e| map_io("read /proc/locks", e))?;
    Ok(flock_holder(&table, libc::major(meta.dev()) as u64, libc::minor(meta.dev()) as u64, meta.ino()))
}

/// The pid holding an exclusive `flock` on the file `major:minor:inode`, from the text of
/// `/proc/locks` (lines like `1: FLOCK  ADVISORY  WRITE 4242 fd:00:1312 0 EOF`; device numbers
/// in hex, the inode in decimal; blocked waiters are marked `->` and skipped).
fn flock_holder(table: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    table.lines().find_map(|line| {
        let mut f = line.split_whitespace().skip(1);
        if f.next()? != "FLOCK" || f.next()? != "ADVISORY" || f.next()? != "WRITE" {
            return None;
        }
        let pid = f.next()?.parse::<u32>().ok()?;
        let mut id = f.next()?.split(':');
        let (maj, min, inode) = (id.next()?, id.next()?, id.next()?);
        let same = u64::from_str_radix(maj, 16).ok()? == major
            && u64::from_str_radix(min, 16).ok()? == minor
            && inode.parse::<u64>().ok()? == ino;
        (same && pid > 0).then_some(pid)
    })
}

/// Staged records are written out as soon as they reach this many bytes (a big batch is
/// written in pieces, and the buffer never grows past about this); a record larger than this
/// is written from a buffer of its own.
pub(crate) const STAGE_MAX: usize = 1 << 20;

/// `rename(from, to)` that fails with `EEXIST` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call; AT_FDCWD for both directories.
    syscall!(renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE))?;
    Ok(())
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir` (`statvfs`).
pub(crate) fn free_space(dir: &Path) -> io::Result<u64> {
    let d = File::open(dir)?;
    // SAFETY: `statvfs` is plain old data (integers only); all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid open fd; `st` is a live, writable statvfs the call fills in.
    syscall!(fstatvfs(d.as_raw_fd(), &mut st))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A random record framing for a new segment. The salt comes from the standard library's
/// per-process random hash keys (drawn from the OS at first use), hashed with a counter so
/// that every segment gets its own.
fn fresh_key() -> RecordKey {
    use std::hash::{BuildHasher, Hasher};
    static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let state = STATE.get_or_init(std::collections::hash_map::RandomState::new);
    loop {
        let mut h = state.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        if let Some(key) = RecordKey::from_salt(h.finish()) {
            return key;
        }
    }
}

/// One segment file and its mapping.
pub(crate) struct Segment {
    seq: u64,
    /// How this segment's records are framed (from its header; see `format::RecordKey`).
    key: RecordKey,
    path: PathBuf,
    /// Shared with the [`SyncRange`]s handed to the sync thread (no `dup` per commit).
    file: Arc<File>,
    /// Start of the mapping; null when `map_len` is 0 (an empty file cannot be mapped).
    ptr: *mut u8,
    /// Length of the mapping. Never more than the file length, except after `seal`, whose
    /// truncation leaves the tail of the map past EOF untouched forever.
    map_len: usize,
    /// Bytes in use: header plus records appended.
    used: usize,
    /// Bytes known durable (or, with fsync off, forgotten); `synced..used` is the dirty range.
    synced: usize,
    /// Takes appends (the active segment); false once sealed or for a segment opened from
    /// disk. The map itself is read-only either way: appends go through `pwrite`.
    writable: bool,
    /// Records appended and not yet written to the file: they go out with one `pwrite` at
    /// file offset `stage_off` (see [`Segment::flush`]). Reused; freed when sealed. In cells
    /// because a read through `&self` ([`Segment::bytes`]) writes them out first.
    stage: RefCell<Vec<u8>>,
    stage_off: Cell<usize>,
    /// A write of staged records that failed where no error could be returned (a read), for
    /// the next [`Segment::commit`] or [`Segment::sync_range`] to report.
    write_error: RefCell<Option<io::Error>>,
    /// Made from a spare whose blocks were written before (see `spare.rs`), not fallocated.
    prewritten: bool,
}

// SAFETY: the mapping is owned exclusively by this value (no other handle to `ptr` exists), so
// moving it to another thread moves sole access with it; `Segment` is not `Sync`.
unsafe impl Send for Segment {}

impl Segment {
    /// Creates segment `seq` in `dir` with `size` bytes preallocated, maps it read-write and
    /// writes the segment header. The file is removed again if any step fails.
    pub(crate) fn create(dir: &Path, seq: u64, size: usize) -> Result<Segment, SpoolError> {
        let path = dir.join(format::segment_file_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| map_io_at("create segment", &path, e))?;
        match Self::init(file, &path, seq, size, true) {
            Ok(seg) => Ok(seg),
            Err(e) => {
                // Best effort: a leftover preallocated file would hold only zeros and be
                // removed by the next recovery anyway.
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Makes segment `seq` in `dir` from a spare file of `len` bytes whose blocks are written
    /// and synced (see `spare.rs`): renamed into place (never over an existing file), mapped
    /// read-write, header written. A commit into it does not convert extents.
    pub(crate) fn adopt(dir: &Path, seq: u64, spare: &Path, len: u64) -> Result<Segment, SpoolError> {
        let path = dir.join(format::segment_file_name(seq));
        let size = usize::try_from(len)
            .map_err(|_| SpoolError::Io("adopt segment", io::Error::other("segment larger than memory")))?;
        rename_noreplace(spare, &path).map_err(|e| map_io_at("rename spare segment", &path, e))?;
        let file = OpenOptions::new().read(true).write(true).open(&path);
        let seg =
            file.map_err(|e| map_io_at("open segment", &path, e)).and_then(|f| Self::init(f, &path, seq, size, false));
        if seg.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        seg
    }

    /// Maps `file` (`size` bytes, fallocated here when `preallocate`) and writes the header.
    fn init(file: File, path: &Path, seq: u64, size: usize, preallocate: bool) -> Result<Segment, SpoolError> {
        let size = size.max(format::SEGMENT_HEADER_LEN);
        let key = fresh_key();
        let len = libc::off_t::try_from(size)
            .map_err(|_| SpoolError::Io("create segment", io::Error::other("segment size too large")))?;
        if preallocate {
            loop {
                // SAFETY: valid open fd; offset and length are non-negative.
                match syscall!(@errno posix_fallocate(file.as_raw_fd(), 0, len)) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(map_io_at("preallocate segment", path, e)),
                }
            }
        }
        let mut seg = Segment {
            seq,
            key,
            path: path.to_path_buf(),
            file: Arc::new(file),
            ptr: ptr::null_mut(),
            map_len: 0,
            used: 0,
            synced: 0,
            writable: true,
            stage: RefCell::default(),
            stage_off: Cell::new(0),
            write_error: RefCell::new(None),
            prewritten: !preallocate,
        };
        seg.map(size).map_err(|e| map_io_at("map segment", path, e))?;
        let header = format::encode_segment_header(seq, &key);
        seg.append_with(header.len(), |dst| {
            dst.copy_from_slice(&header);
            Ok(())
        })?;
        Ok(seg)
    }

    /// Opens an existing segment file and maps all of it read-only. The fd is read-write so
    /// recovery can cut a torn tail.
    pub(crate) fn open(path: &Path, seq: u64) -> Result<Segment, SpoolError> {
        let file =
            OpenOptions::new().read(true).write(true).open(path).map_err(|e| map_io_at("open segment", path, e))?;
        let len = file.metadata().map_err(|e| map_io_at("stat segment", path, e))?.len();
        let len = usize::try_from(len)
            .map_err(|_| SpoolError::Io("open segment", io::Error::other("segment larger than memory")))?;
        let mut seg = Segment {
            seq,
            // Until recovery has read the header (see `set_key`).
            key: RecordKey::LEGACY,
            path: path.to_path_buf(),
            file: Arc::new(file),
            ptr: ptr::null_mut(),
            map_len: 0,
            used: len,
            synced: len,
            writable: false,
            stage: RefCell::default(),
            stage_off: Cell::new(0),
            write_error: RefCell::new(None),
            prewritten: false,
        };
        seg.map(len).map_err(|e| map_io_at("map segment", path, e))?;
        Ok(seg)
    }

    /// Maps the first `len` bytes of the file read-only (nothing for 0), replacing any
    /// current mapping. Nothing is ever stored through the map, so a stray write faults.
    fn map(&mut self, len: usize) -> io::Result<()> {
        self.unmap();
        if len == 0 {
            return Ok(());
        }
        // SAFETY: a fresh mapping chosen by the kernel (null hint) over an open fd; the file is
        // at least `len` bytes long (callers map the fallocated size or the fstat'd length).
        let p = syscall!(@ptr mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            self.file.as_raw_fd(),
            0,
        ))?;
        self.ptr = p.cast();
        self.map_len = len;
        Ok(())
    }

    fn unmap(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr`/`map_len` describe a mapping made by `map` and not yet unmapped;
            // no slice of it outlives this call because slices borrow `self`.
            let _ = syscall!(munmap(self.ptr.cast(), self.map_len));
            self.ptr = ptr::null_mut();
            self.map_len = 0;
        }
    }

    /// True when made from a pre-written spare (see [`Segment::adopt`]).
    pub(crate) fn prewritten(&self) -> bool {
        self.prewritten
    }

    /// Sequence number.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// How this segment's records are framed.
    pub(crate) fn key(&self) -> &RecordKey {
        &self.key
    }

    /// Records the framing recovery read from the header of an opened segment.
    pub(crate) fn set_key(&mut self, key: RecordKey) {
        self.key = key;
    }

    /// Path of the file.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// File name for messages (`seg-….spool`).
    pub(crate) fn name(&self) -> String {
        format::segment_file_name(self.seq)
    }

    /// Bytes in use, from the start of the file (header included). Staged records are written
    /// out first, so the map shows them.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.flush();
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: `used <= map_len` always holds and `used` never exceeds the file length, so
        // the range is mapped and backed by the file; the slice borrows `self`, which owns the
        // mapping. Nothing writes through the map, and the file changes only by appends
        // (`&mut self`) and by the flush above: a flush through `&self` writes what was staged
        // by appends made before any live slice was taken, and the first `bytes` after those
        // appends already wrote them, so no live slice ever sees its bytes change.
        unsafe { std::slice::from_raw_parts(self.ptr, self.used) }
    }

    /// Bytes used.
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// Bytes known durable (the power-loss tests keep these and nothing else for sure).
    #[cfg(test)]
    pub(crate) fn synced(&self) -> usize {
        self.synced
    }

    /// Room left for records.
    pub(crate) fn remaining(&self) -> usize {
        if self.writable {
            self.map_len - self.used
        } else {
            0
        }
    }

    /// True when bytes were appended since the last [`Segment::commit`].
    pub(crate) fn is_dirty(&self) -> bool {
        self.synced < self.used
    }

    /// Reserves `len` bytes at the end of the used range, lets `fill` write them, and returns
    /// their offset. If `fill` fails nothing is used.
    ///
    /// Records are encoded into the stage and reach the file with one `pwrite` per batch
    /// ([`Segment::flush`], at the latest when the batch is committed), never by stores into
    /// the map. Stores into a shared file map cost faults: the first store into a fresh page
    /// takes a read fault (zero-fill) and a write fault (`page_mkwrite`), and every sync
    /// write-protects the pages it cleans, so the next store into the partly filled last page
    /// faults again, and the write-protection of a page our thread has mapped writable sends
    /// a TLB-shootdown IPI from the sync thread. perf put those at about a tenth of the relay's
    /// CPU with 1 KiB messages and a quarter with 100 KiB ones. `pwrite` copies into the same
    /// page cache without any of it, and the map, only ever read, sees what it wrote.
    pub(crate) fn append_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), SpoolError>,
    ) -> Result<usize, SpoolError> {
        if len > self.remaining() {
            return Err(SpoolError::Io("append to segment", io::Error::other("segment full")));
        }
        let off = self.used;
        if len > STAGE_MAX {
            self.flush();
            let mut big = vec![0u8; len];
            fill(&mut big)?;
            self.file.write_all_at(&big, off as u64).map_err(|e| map_io_at("write to segment", &self.path, e))?;
            self.used = off + len;
            return Ok(off);
        }
        let stage = self.stage.get_mut();
        if stage.is_empty() {
            self.stage_off.set(off);
        }
        let start = stage.len();
        stage.resize(start + len, 0);
        if let Err(e) = fill(&mut stage[start..]) {
            stage.truncate(start);
            return Err(e);
        }
        self.used = off + len;
        if stage.len() >= STAGE_MAX {
            self.flush();
        }
        Ok(off)
    }

    /// Writes the staged records to the file (one `pwrite`). A failure is kept for the next
    /// commit, which then fails: the batch is answered `451`, and whatever part reached the
    /// file is judged by recovery like any torn write.
    fn flush(&self) {
        let mut stage = self.stage.borrow_mut();
        if stage.is_empty() {
            return;
        }
        if let Err(e) = self.file.write_all_at(&stage, self.stage_off.get() as u64) {
            self.write_error.borrow_mut().get_or_insert(e);
        }
        stage.clear();
    }

    /// Writes the staged records out and returns the error of any write since the last call.
    fn flush_checked(&self) -> io::Result<()> {
        self.flush();
        self.write_error.borrow_mut().take().map_or(Ok(()), Err)
    }

    /// Makes `synced..used` durable: `msync(MS_SYNC)` over the page-aligned dirty range (data
    /// written through the map), then `fdatasync` (file size and any block metadata). With
    /// `fsync == false` the range is only forgotten.
    pub(crate) fn commit(&mut self, fsync: bool) -> io::Result<()> {
        if !self.is_dirty() {
            return Ok(());
        }
        self.flush_checked()?;
        if fsync && !self.ptr.is_null() {
            // msync wants a page-aligned start.
            let start = self.synced - self.synced % page_size();
            // SAFETY: `start..used` lies within the live mapping (`used <= map_len`) and below
            // EOF; msync reads no memory of ours besides the range it is given.
            syscall!(msync(self.ptr.add(start).cast(), self.used - start, libc::MS_SYNC))?;
            // SAFETY: valid open fd.
            syscall!(fdatasync(self.file.as_raw_fd()))?;
        }
        self.synced = self.used;
        Ok(())
    }

    /// The dirty range as a [`SyncRange`] another thread can sync, and the `used` mark it
    /// covers (pass it to [`Segment::mark_synced`] once the range is durable). `None` if clean.
    pub(crate) fn sync_range(&self) -> io::Result<Option<(SyncRange, usize)>> {
        if !self.is_dirty() {
            return Ok(None);
        }
        self.flush_checked()?;
        let start = self.synced - self.synced % page_size();
        let range = SyncRange {
            file: Arc::clone(&self.file),
            addr: if self.ptr.is_null() { 0 } else { self.ptr as usize + start },
            len: self.used - start,
        };
        Ok(Some((range, self.used)))
    }

    /// Records that everything below `mark` is durable.
    pub(crate) fn mark_synced(&mut self, mark: usize) {
        self.synced = self.synced.max(mark.min(self.used));
    }

    /// Forgets the dirty range without syncing (after a failed commit the batch is abandoned).
    pub(crate) fn forget_dirty(&mut self) {
        self.synced = self.used;
    }

    /// Truncates the file to the used length; no further appends. Dirty bytes below `used`
    /// stay in the file's pages and can still be committed.
    pub(crate) fn seal(&mut self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        // An error stays for the commit of these bytes to report.
        self.flush();
        self.writable = false;
        *self.stage.get_mut() = Vec::new();
        self.file.set_len(self.used as u64)
    }

    /// Cuts the file to `len` bytes (a torn tail, or preallocated space nobody will use) and
    /// remaps what is left read-only.
    pub(crate) fn truncate(&mut self, len: usize) -> Result<(), SpoolError> {
        // Unmap first: pages wholly past the new EOF would fault if ever touched.
        self.unmap();
        self.file.set_len(len as u64).map_err(|e| map_io_at("truncate segment", &self.path, e))?;
        self.used = len;
        self.synced = len;
        self.writable = false;
        self.map(len).map_err(|e| map_io_at("map segment", &self.path, e))
    }

    /// Unmaps and deletes the file.
    pub(crate) fn remove(mut self) -> Result<(), SpoolError> {
        self.unmap();
        std::fs::remove_file(&self.path).map_err(|e| map_io_at("remove segment", &self.path, e))
    }
}

/// A segment's dirty range, detached so that a sync thread can make it durable while the event
/// loop goes on appending behind it: the segment's file (shared) plus the address range of the
/// mapping to `msync`.
pub(crate) struct SyncRange {
    file: Arc<File>,
    /// Page-aligned start of the range in the mapping; 0 when nothing is mapped.
    addr: usize,
    len: usize,
}

impl SyncRange {
    /// Makes the range durable with one `msync(MS_SYNC)`. On Linux that is
    /// `vfs_fsync_range(datasync)` over the range: it writes the pages and commits what the
    /// filesystem needs to find them (e.g. ext4's unwritten-extent conversion), exactly like
    /// `fdatasync`. A following `fdatasync` would find nothing dirty yet still flush the
    /// device cache a second time, doubling the cost of every group commit.
    pub(crate) fn run(&self) -> io::Result<()> {
        if self.addr == 0 {
            return self.file.sync_data();
        }
        // SAFETY: the spool keeps the mapping alive until the job's result is handed back
        // (a segment with an unsynced range is never unmapped), and msync neither reads nor
        // writes our memory; on an address that is not mapped it fails with ENOMEM.
        syscall!(msync(self.addr as *mut libc::c_void, self.len, libc::MS_SYNC))?;
        Ok(())
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unmap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-seg-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn no_space_is_classified_once() {
        let e = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(matches!(map_io("x", e), SpoolError::NoSpace));
        let e = io::Error::from_raw_os_error(libc::EDQUOT);
        assert!(matches!(map_io("x", e), SpoolError::NoSpace));
        let e = io::Error::from_raw_os_error(libc::EIO);
        assert!(matches!(map_io("x", e), SpoolError::Io("x", _)));
        let e = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(matches!(map_io_at("x", Path::new("/a"), e), SpoolError::NoSpace));
        let e = io::Error::from_raw_os_error(libc::EACCES);
        let SpoolError::Io(_, e) = map_io_at("x", Path::new("/a/b"), e) else { panic!() };
        assert!(e.to_string().contains("/a/b"));
    }

    #[test]
    fn create_append_commit_seal_reopen_remove() {
        let dir = temp_dir("basic");
        let mut seg = Segment::create(&dir, 3, 64 * 1024).unwrap();
        let header = format::decode_segment_header(seg.bytes()).unwrap();
        assert_eq!((header.seq, &header.key), (3, seg.key()));
        assert_ne!(Segment::create(&dir, 4, 4096).unwrap().key(), seg.key(), "every segment has its own salt");
        assert_eq!(std::fs::metadata(seg.path()).unwrap().len(), 64 * 1024, "space is preallocated");
        let off = seg
            .append_with(16, |dst| {
                dst.copy_from_slice(b"0123456789abcdef");
                Ok(())
            })
            .unwrap();
        assert_eq!(off, format::SEGMENT_HEADER_LEN);
        assert!(seg.is_dirty());
        seg.commit(true).unwrap();
        assert!(!seg.is_dirty());
        // A failing fill leaves nothing used.
        let err = seg.append_with(8, |dst| {
            dst.fill(7);
            Err(SpoolError::Corrupt("test"))
        });
        assert!(err.is_err());
        assert_eq!(seg.used(), format::SEGMENT_HEADER_LEN + 16);
        seg.seal().unwrap();
        assert_eq!(seg.remaining(), 0);
        assert!(seg.append_with(8, |_| Ok(())).is_err());
        let path = seg.path().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), format::SEGMENT_HEADER_LEN as u64 + 16);
        drop(seg);

        let seg = Segment::open(&path, 3).unwrap();
        assert_eq!(&seg.bytes()[format::SEGMENT_HEADER_LEN..], b"0123456789abcdef");
        seg.remove().unwrap();
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_flock_holder_is_read_from_the_lock_table() {
        let table = "1: POSIX  ADVISORY  WRITE 11 fd:00:77 0 EOF\n\
                     2: FLOCK  ADVISORY  READ 12 fd:00:77 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 13 fd:01:77 0 EOF\n\
                     3: -> FLOCK  ADVISORY  WRITE 14 fd:00:77 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 15 fd:00:78 0 EOF\n\
                     5: FLOCK  ADVISORY  WRITE 16 fd:00:77 0 EOF\n";
        assert_eq!(flock_holder(table, 0xfd, 0, 77), Some(16));
        assert_eq!(flock_holder(table, 0xfd, 1, 77), Some(13));
        assert_eq!(flock_holder(table, 0xfd, 0, 79), None);
        assert_eq!(flock_holder("", 0xfd, 0, 77), None);
    }

    #[test]
    fn records_are_staged_written_in_one_piece_and_read_back_through_the_map() {
        let dir = temp_dir("pwrite");
        let mut seg = Segment::create(&dir, 2, 4 * STAGE_MAX).unwrap();
        let fill_with = |b: u8| {
            move |dst: &mut [u8]| -> Result<(), SpoolError> {
                dst.iter_mut().enumerate().for_each(|(i, x)| *x = b.wrapping_add(i as u8));
                Ok(())
            }
        };
        let in_file = |seg: &Segment, off: usize| std::fs::read(seg.path()).unwrap()[off];
        let a = seg.append_with(24, fill_with(1)).unwrap();
        assert_eq!(in_file(&seg, a + 1), 0, "staged, not written yet");
        // A record over the stage's size is written at once, the staged ones before it.
        let b = seg.append_with(STAGE_MAX + 40, fill_with(2)).unwrap();
        assert_eq!((in_file(&seg, a + 1), in_file(&seg, b + 1)), (2, 3));
        let c = seg.append_with(16, fill_with(3)).unwrap();
        // A failing fill uses nothing; the next append takes its place.
        assert!(seg.append_with(100, |_| Err(SpoolError::Corrupt("test"))).is_err());
        let d = seg.append_with(100, fill_with(4)).unwrap();
        assert_eq!((b, c, d), (a + 24, b + STAGE_MAX + 40, c + 16));
        let expect = |off: usize, len: usize, b: u8, bytes: &[u8]| {
            let want: Vec<u8> = (0..len).map(|i| b.wrapping_add(i as u8)).collect();
            assert_eq!(&bytes[off..off + len], &want[..], "record at {off}");
        };
        let check = |bytes: &[u8]| {
            expect(a, 24, 1, bytes);
            expect(b, STAGE_MAX + 40, 2, bytes);
            expect(c, 16, 3, bytes);
            expect(d, 100, 4, bytes);
        };
        // Reading writes the stage out first.
        check(seg.bytes());
        seg.commit(true).unwrap();
        seg.seal().unwrap();
        let path = seg.path().to_path_buf();
        drop(seg);
        let seg = Segment::open(&path, 2).unwrap();
        assert_eq!(seg.bytes().len(), d + 100);
        check(seg.bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sealed_dirty_bytes_can_still_be_committed() {
        let dir = temp_dir("sealdirty");
        let mut seg = Segment::create(&dir, 1, 4096).unwrap();
        seg.append_with(8, |d| {
            d.fill(1);
            Ok(())
        })
        .unwrap();
        seg.seal().unwrap();
        assert!(seg.is_dirty());
        seg.commit(true).unwrap();
        assert!(!seg.is_dirty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_file_opens_and_truncate_remaps() {
        let dir = temp_dir("empty");
        let path = dir.join(format::segment_file_name(1));
        std::fs::write(&path, b"").unwrap();
        let seg = Segment::open(&path, 1).unwrap();
        assert!(seg.bytes().is_empty());
        drop(seg);
        std::fs::write(&path, [9u8; 100]).unwrap();
        let mut seg = Segment::open(&path, 1).unwrap();
        seg.truncate(40).unwrap();
        assert_eq!(seg.bytes(), &[9u8; 40][..]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 40);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn create_refuses_an_existing_file() {
        let dir = temp_dir("exists");
        let _seg = Segment::create(&dir, 1, 4096).unwrap();
        assert!(Segment::create(&dir, 1, 4096).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = temp_dir("lock");
        assert_eq!(locking_pid(&dir).unwrap(), None, "no lock file yet");
        let held = lock_dir(&dir).unwrap();
        assert!(lock_dir(&dir).is_err());
        assert_eq!(locking_pid(&dir).unwrap(), Some(std::process::id()));
        drop(held);
        assert_eq!(locking_pid(&dir).unwrap(), None, "released: the id left in the file is stale");
        assert!(lock_dir(&dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
