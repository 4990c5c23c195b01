//! The durable spool: append-only, memory-mapped segment files with group commit.
//!
//! Owns every file in the spool directory: numbered segment files (`seg-<16 digits>.spool`)
//! a `lock` file that keeps a second relay out, and the operator's `suspensions`
//! ([`suspensions`]). Messages and per-recipient delivery
//! outcomes are appended as checksummed records ([`format`](mod@format)) to the active segment
//! (`segment.rs`: small records straight into its map, large ones by `pwrite`). A group commit
//! makes everything appended so far durable, and only after it returns `Ok` may the relay
//! answer 250 for those messages: the relay hands a [`SyncJob`] ([`Spool::begin_commit`]) to
//! its sync thread, which runs one `msync(MS_SYNC)` per dirty segment range (on Linux that is
//! `fdatasync` of the range, see `segment::SyncRange::run`), then takes the result back with
//! [`Spool::finish_commit`]; the synchronous [`Spool::commit`] (recovery, tests, benches) runs
//! `msync` + `fdatasync` per dirty segment on the caller's thread. [`Spool::open`] rebuilds the queue
//! (`recover.rs`) and starts a fresh active segment (none on a full disk: then the relay
//! delivers and refuses new mail, see [`Spool::accepting`]); older segments are read-only.
//! A new segment is made from a pre-written spare when `spare.rs`'s thread has one ready, and
//! new mail moves to the spare as soon as it is.
//! Damaged bytes found by recovery are copied to `corrupt/` before they are skipped or cut.
//!
//! A segment is deleted once no message in it has an unfinished recipient and no outcome
//! record in it is still needed (see [`Spool::release_message`]), and only after the records
//! that finished those messages are durable; the active segment never is. New mail leaves
//! `min_free_space` on the filesystem for outcome and bounce records.
//!
//! It must never: report an append durable before its commit returned `Ok`; let a full disk
//! surface as SIGBUS (space is preallocated, so it is [`SpoolError::NoSpace`] at creation);
//! panic on any file content; or change a directory in [`Spool::scan_read_only`].
//! Single-threaded: one `Spool` per directory, driven from the event loop.

pub mod format;
mod reaper;
pub mod record;
mod recover;
mod segment;
mod spare;
pub mod suspensions;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::PathBuf;

use crate::message::{Envelope, QueueId};

pub use record::{BodyLoc, MessageLoc, MessageView, Outcome, Pending, Pins, RcptState, RcptStatus, StoredMessage};
use segment::{map_io, map_io_at, Segment};

/// How the spool is opened.
#[derive(Clone, Debug)]
pub struct SpoolOptions {
    /// Directory holding the segment files (created if missing).
    pub dir: PathBuf,
    /// `true`: a commit makes data durable (`msync`, plus `fdatasync` in the synchronous
    /// [`Spool::commit`]); `false`: a commit does nothing.
    pub fsync: bool,
    /// Preallocated size of a new segment; a record larger than this gets a segment of its own size.
    pub segment_size: u64,
    /// Space on the spool's filesystem that new mail never takes (like Postfix's
    /// `queue_minfree`): kept for the outcome and bounce records that let delivery finish what
    /// it started. See [`Spool::accepting`].
    pub min_free_space: u64,
    /// Write spare segments ahead of need on a thread (see `spare.rs`); only with `fsync`.
    pub spares: bool,
}

/// Smallest segment made for outcome and bounce records when the disk has no room for a
/// segment of the full size (see `Spool::roll`).
const SMALL_SEGMENT: usize = 1 << 20;
/// How long a reading of the filesystem's free space is reused by [`Spool::accepting`].
const FREE_SPACE_TTL_MS: u64 = 250;

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Messages with at least one recipient not final, in spool order.
    pub messages: Vec<StoredMessage>,
    /// Highest queue id seen anywhere (finished messages included).
    pub max_id: Option<QueueId>,
    /// Human-readable warnings (corrupt records skipped, torn tails cut), naming segment and offset.
    pub warnings: Vec<String>,
}

/// Spool faults.
#[derive(Debug)]
pub enum SpoolError {
    /// No space left (ENOSPC/EDQUOT) while growing or writing.
    NoSpace,
    /// Any other I/O error, with what was being done.
    Io(&'static str, io::Error),
    /// A record failed validation where one was expected.
    Corrupt(&'static str),
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolError::NoSpace => f.write_str("no space left on the spool device"),
            SpoolError::Io(what, e) => write!(f, "{what}: {e}"),
            SpoolError::Corrupt(what) => write!(f, "corrupt spool record: {what}"),
        }
    }
}

impl std::error::Error for SpoolError {}

/// Every message record in a spool directory (finished or not) as (queue id, body), in spool
/// order. Read-only and safe beside a running relay, like [`Spool::scan_read_only`]; for tests
/// and inspection tools.
pub fn read_messages(dir: &std::path::Path) -> Result<Vec<(QueueId, Vec<u8>)>, SpoolError> {
    recover::read_messages(dir)
}

/// The read-only scan of `dir` with the envelope of each queued message (same order as
/// `Recovery::messages`), for `sluice queue list`. Safe beside a running relay.
pub fn queue_listing(dir: &std::path::Path) -> Result<(Recovery, Vec<Envelope>), SpoolError> {
    recover::queue_listing(dir)
}

/// The process id of the relay running on the spool in `dir` (the holder of its lock), or
/// `None` when none runs there; for `sluice queue flush`.
pub fn relay_pid(dir: &std::path::Path) -> Result<Option<u32>, SpoolError> {
    segment::locking_pid(dir)
}

/// One group commit detached from the spool so that a sync thread can run it while the event
/// loop goes on (see [`Spool::begin_commit`]). `Send`; holds no borrow of the spool.
pub struct SyncJob {
    ranges: Vec<segment::SyncRange>,
    dir: Option<PathBuf>,
}

impl SyncJob {
    /// Makes the job's ranges durable: one `msync(MS_SYNC)` per segment range (`fdatasync` for
    /// a segment with no map), then the directory if a segment file was created. Blocking: run
    /// it off the event loop.
    pub fn run(&self) -> Result<(), SpoolError> {
        for r in &self.ranges {
            r.run().map_err(|e| map_io("sync spool segment", e))?;
        }
        if let Some(dir) = &self.dir {
            // A new file's directory entry is not covered by the file's own data sync.
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| map_io("sync spool directory", e))?;
        }
        Ok(())
    }
}

/// Bookkeeping of the commit a [`SyncJob`] is running.
struct InFlight {
    /// (segment, `used` mark) made durable by the job.
    marks: Vec<(u64, usize)>,
    /// Segments of the messages in the batch (see `Spool::batch_msgs`).
    msgs: Vec<u64>,
    /// Releases whose records the job makes durable.
    releases: Vec<Release>,
    /// The job syncs the directory.
    dir: bool,
}

/// The spool: the active segment, the read-only older ones, and their reclamation counters.
///
/// Call order per event-loop turn: any number of `append_*`, then one [`Spool::commit`], then
/// release the replies of the appends made before it (all of them on `Ok`, none on `Err`).
pub struct Spool {
    opts: SpoolOptions,
    /// Every mapped segment by sequence number, the active one included.
    segments: BTreeMap<u64, Slot>,
    /// The segment taking appends; `None` after a failed commit until the next append.
    active: Option<u64>,
    /// Sequence number for the next segment created.
    next_seq: u64,
    /// Segments with bytes appended since the last commit, ascending, no duplicates.
    dirty: Vec<u64>,
    /// Segment of each message appended since the last commit, to undo its live count if the
    /// commit fails (the relay then never queues, hence never releases, those messages).
    batch_msgs: Vec<u64>,
    /// A segment file was created since the last commit: its directory entry needs an fsync.
    dir_dirty: bool,
    /// The group commit handed out by [`Spool::begin_commit`] and not finished yet.
    in_flight: Option<InFlight>,
    /// Problems found while reclaiming (nowhere else to report them); see `take_warnings`.
    warnings: Vec<String>,
    /// Messages finished since the last commit began: their segments may be deleted only once
    /// the outcome (and bounce) records that finish them are durable, or a power loss could
    /// leave neither the message nor its bounce on disk.
    releases: Vec<Release>,
    /// When (Unix ms) the spool's filesystem was asked for its free bytes, and the answer
    /// (`None`: unreadable).
    free_space: Option<(u64, Option<u64>)>,
    /// A commit failed: records of its batch may never reach the disk although they are no
    /// longer tracked as dirty, so no later commit proves that the records finishing a message
    /// are durable. From then on nothing is released (segments stay until the next recovery
    /// judges them).
    sync_failed: bool,
    /// The thread that writes spare segments ahead of need (`None` with fsync off: without
    /// commits there is nothing to gain).
    spares: Option<spare::Spares>,
    /// The active segment was past half full and a spare was asked for if it pays.
    spare_asked: bool,
    /// Group commits that covered the active segment (for [`spare::pays`]).
    active_syncs: u64,
    /// Deletes finished segments off the loop (see `reaper.rs`).
    reaper: reaper::Reaper,
    /// Held for the life of the spool: the `flock` on `<dir>/lock`.
    _lock: File,
}

/// A [`Spool::release_message`] waiting for its records to be durable.
struct Release {
    msg_segment: u64,
    pins: Pins,
}

/// One segment and its reclamation counters.
struct Slot {
    seg: Segment,
    /// Messages in it with an unfinished recipient (including ones not yet committed).
    live: u32,
    /// Outcome records in it that must outlive their message's record.
    pins: u32,
    /// Later segments that each lose one pin when this one is deleted: outcomes of messages
    /// in this segment that finished, which must stay on disk as long as the message record
    /// does (or the message would be delivered again after a restart).
    deferred: Vec<u64>,
    /// Made from the free-space reserve for the relay's own records; new mail never goes here.
    reserve: bool,
}

impl Spool {
    /// Opens (creating the directory if missing), recovers, and starts a fresh active segment
    /// (none when the filesystem has no room for one beyond `min_free_space`: the spool then
    /// takes only the relay's own records until space returns, see [`Spool::accepting`]).
    ///
    /// Fails if the directory cannot be created or written, or another process holds it.
    /// Corrupt records and torn tails do not fail the open: they are skipped or cut, and
    /// reported in [`Recovery::warnings`].
    pub fn open(opts: SpoolOptions) -> Result<(Spool, Recovery), SpoolError> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| map_io_at("create spool directory", &opts.dir, e))?;
        // Creating the lock file is also the writability check.
        let lock = segment::lock_dir(&opts.dir)?;
        let recovered = recover::recover(&opts.dir)?;
        let spares = match opts.fsync && opts.spares {
            true => Some(
                spare::Spares::start(&opts.dir, opts.segment_size, opts.min_free_space)
                    .map_err(|e| map_io_at("start the spare segment writer", &opts.dir, e))?,
            ),
            false => None,
        };
        let mut segments = BTreeMap::new();
        for k in recovered.segments {
            let slot = Slot { seg: k.seg, live: k.live, pins: k.pins, deferred: k.deferred, reserve: false };
            segments.insert(slot.seg.seq(), slot);
        }
        let mut spool = Spool {
            opts,
            segments,
            active: None,
            next_seq: recovered.max_seq + 1,
            dirty: Vec::new(),
            batch_msgs: Vec::new(),
            dir_dirty: false,
            in_flight: None,
            warnings: Vec::new(),
            releases: Vec::new(),
            free_space: None,
            sync_failed: false,
            spares,
            spare_asked: false,
            active_syncs: 0,
            reaper: reaper::Reaper::start(),
            _lock: lock,
        };
        let mut recovery = recovered.recovery;
        // Never append to a recovered segment: its tail was judged by recovery, and a fresh
        // file keeps new data away from anything that was damaged. On a full disk the relay
        // starts without one: it delivers (which frees space) and refuses new mail until
        // there is room again (see `accepting`).
        match spool.roll(0, true) {
            Ok(()) => {}
            Err(SpoolError::NoSpace) => recovery.warnings.push(format!(
                "{}: no room for a new segment; delivering the queue, refusing new mail until space returns",
                spool.opts.dir.display()
            )),
            Err(e) => return Err(e),
        }
        // Make the new segment's header and directory entry durable now, so the first batch
        // pays only for its own records.
        spool.commit()?;
        Ok((spool, recovery))
    }

    /// Whether new mail can be taken now (checked at MAIL, answered `452 4.3.1` when not):
    /// the active segment has room for `min_free_space` bytes, or the filesystem has room for
    /// a new segment and `min_free_space` beyond it. The filesystem is asked at most every
    /// 250 ms (`now_ms`, Unix ms).
    pub fn accepting(&mut self, now_ms: u64) -> bool {
        let room = self.active_slot().filter(|s| !s.reserve).map_or(0, |s| s.seg.remaining() as u64);
        if room >= self.opts.min_free_space.max(1) {
            return true;
        }
        let free = match self.free_space {
            Some((at, free)) if now_ms.saturating_sub(at) < FREE_SPACE_TTL_MS && now_ms >= at => free,
            _ => {
                let free = segment::free_space(&self.opts.dir).ok();
                self.free_space = Some((now_ms, free));
                free
            }
        };
        // As `roll` judges it.
        self.segment_fits(free, self.opts.segment_size)
    }

    /// Reads a spool directory without changing it (for `sluice queue`), tolerating a relay
    /// appending concurrently.
    pub fn scan_read_only(dir: &std::path::Path) -> Result<Recovery, SpoolError> {
        recover::scan_read_only(dir)
    }

    /// Appends a message record. Not durable until the next successful [`Spool::commit`].
    ///
    /// The record is encoded in place in the segment map. If the active segment lacks room it
    /// is sealed and a new one of `max(segment_size, record)` bytes is started, provided the
    /// filesystem keeps `min_free_space` beyond it (else [`SpoolError::NoSpace`], and the
    /// active segment stays as it was). An envelope
    /// field longer than 65535 bytes is refused with `SpoolError::Io(_, InvalidInput)`.
    ///
    /// A failed commit undoes the message's live count: its client is answered `451` and the
    /// message is forgotten.
    pub fn append_message(
        &mut self,
        id: QueueId,
        arrival_ms: u64,
        env: &Envelope,
        body: &[u8],
    ) -> Result<(Pending, MessageLoc), SpoolError> {
        self.append_message_as(id, arrival_ms, env, &[], body, true)
    }

    /// [`Spool::append_message`] with `prefix` (the message's DKIM-Signature fields) stored
    /// in front of the body, in the same record: the stored message is the signed one, so
    /// every attempt and every restart sends the same bytes.
    pub fn append_signed_message(
        &mut self,
        id: QueueId,
        arrival_ms: u64,
        env: &Envelope,
        prefix: &[u8],
        body: &[u8],
    ) -> Result<(Pending, MessageLoc), SpoolError> {
        self.append_message_as(id, arrival_ms, env, prefix, body, true)
    }

    /// Appends a message the relay made itself (a bounce) and queues at once. Unlike
    /// [`Spool::append_message`], a failed commit keeps it live: the delivery side still holds
    /// it, so its segment must stay mapped until [`Spool::release_message`]. Its record may
    /// then never reach the disk, but neither may the failure outcomes appended after it, so a
    /// crash makes the next recovery retry the original recipients and bounce again: nothing
    /// is lost either way.
    pub fn append_generated_message(
        &mut self,
        id: QueueId,
        arrival_ms: u64,
        env: &Envelope,
        body: &[u8],
    ) -> Result<(Pending, MessageLoc), SpoolError> {
        self.append_message_as(id, arrival_ms, env, &[], body, false)
    }

    fn append_message_as(
        &mut self,
        id: QueueId,
        arrival_ms: u64,
        env: &Envelope,
        prefix: &[u8],
        body: &[u8],
        undo_on_failure: bool,
    ) -> Result<(Pending, MessageLoc), SpoolError> {
        let len = format::message_record_len_prefixed(env, prefix, body).map_err(encode_error)?;
        // New mail (undo_on_failure) must leave the reserve; what the relay makes need not.
        let (seq, off) = self.append_with(len, undo_on_failure, |dst, key| {
            format::encode_message_prefixed(dst, key, id, arrival_ms, env, prefix, body).map_err(encode_error)
        })?;
        if let Some(slot) = self.segments.get_mut(&seq) {
            slot.live += 1;
        }
        if undo_on_failure {
            self.batch_msgs.push(seq);
        }
        let end = (off + len) as u64;
        Ok((Pending { segment: seq, end }, MessageLoc { segment: seq, offset: off as u64, len: len as u64 }))
    }

    /// Makes sure the active segment has `bytes` of room for the relay's own records, rolling
    /// over (from the reserve if need be) when it has not. Delivery calls it before a DSN so
    /// that the DSN and the outcome records naming it land in one segment: then a failure
    /// whose DSN is missing at recovery was lost with it, never reclaimed after delivery.
    pub fn reserve_room(&mut self, bytes: usize) -> Result<(), SpoolError> {
        if self.active_slot().is_some_and(|s| s.seg.remaining() >= bytes) {
            return Ok(());
        }
        self.roll(bytes, false)
    }

    /// Appends an outcome record for recipient `rcpt` of message `id`. Pins the segment it lands
    /// in until [`Spool::release_message`] names it.
    ///
    /// An outcome appended before a failed commit keeps its pin: pass its segment to
    /// `release_message` like any other.
    pub fn append_outcome(&mut self, id: QueueId, rcpt: u32, outcome: &Outcome<'_>) -> Result<Pending, SpoolError> {
        let len = format::outcome_record_len(outcome).map_err(encode_error)?;
        let (seq, off) = self.append_with(len, false, |dst, key| {
            format::encode_outcome(dst, key, id, rcpt, outcome).map_err(encode_error)
        })?;
        if let Some(slot) = self.segments.get_mut(&seq) {
            slot.pins += 1;
        }
        Ok(Pending { segment: seq, end: (off + len) as u64 })
    }

    /// True when appends since the last commit exist.
    pub fn has_uncommitted(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Makes every append so far durable (no-op with `fsync: false`). On error the appends since
    /// the last commit must be treated as not stored; the active segment is sealed.
    ///
    /// Syncs each dirty segment in order, including one sealed since the last commit because a
    /// batch overflowed it, then the directory if a segment file was created. On error the
    /// records of the failed batch may still be found by a later recovery (the relay then
    /// delivers a message whose client saw 451: a duplicate, never a loss).
    pub fn commit(&mut self) -> Result<(), SpoolError> {
        if self.in_flight.is_some() {
            // The job's marks would race this sync's: finish the job first.
            return Err(SpoolError::Io("commit", io::Error::other("a group commit is already in flight")));
        }
        if self.dirty.is_empty() && !self.dir_dirty {
            return Ok(());
        }
        match self.sync_dirty() {
            Ok(()) => {
                self.batch_msgs.clear();
                let synced = std::mem::take(&mut self.dirty);
                self.reclaim_from(synced);
                let releases = std::mem::take(&mut self.releases);
                self.apply_releases(releases);
                Ok(())
            }
            Err(e) => {
                self.releases.clear();
                self.sync_failed = true;
                self.abandon_batch();
                Err(e)
            }
        }
    }

    /// Starts a group commit to run off the event loop: returns the [`SyncJob`] covering every
    /// append so far, to be run on another thread, whose result goes to
    /// [`Spool::finish_commit`]. Appends may go on meanwhile; they belong to the next commit.
    /// `Ok(None)` when there is nothing to sync (or `fsync` is off: then the appends are
    /// already as committed as they will be). One job at a time.
    pub fn begin_commit(&mut self) -> Result<Option<SyncJob>, SpoolError> {
        if self.in_flight.is_some() {
            return Ok(None);
        }
        if !self.opts.fsync {
            self.commit()?;
            return Ok(None);
        }
        if self.dirty.is_empty() && !self.dir_dirty {
            return Ok(None);
        }
        let mut ranges = Vec::new();
        let mut marks = Vec::new();
        let mut failed = None;
        for seq in &self.dirty {
            match self.segments.get(seq).map(|slot| slot.seg.sync_range()) {
                Some(Ok(Some((range, mark)))) => {
                    ranges.push(range);
                    marks.push((*seq, mark));
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Some(Ok(None)) | None => {}
            }
        }
        if let Some(e) = failed {
            // The staged records did not reach the file: the batch fails as a failed sync does.
            self.releases.clear();
            self.sync_failed = true;
            self.abandon_batch();
            return Err(map_io("write spool segment", e));
        }
        if marks.iter().any(|&(seq, _)| Some(seq) == self.active) {
            self.active_syncs += 1;
        }
        let dir = self.dir_dirty.then(|| self.opts.dir.clone());
        self.dir_dirty = false;
        self.dirty.clear();
        self.in_flight = Some(InFlight {
            marks,
            msgs: std::mem::take(&mut self.batch_msgs),
            releases: std::mem::take(&mut self.releases),
            dir: dir.is_some(),
        });
        Ok(Some(SyncJob { ranges, dir }))
    }

    /// True while a [`SyncJob`] is out.
    pub fn commit_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Takes the result of the job from [`Spool::begin_commit`]. `Ok`: its appends are durable.
    /// `Err`: they, and every append made since, must be treated as not stored (the active
    /// segment is sealed, as for a failed [`Spool::commit`]).
    pub fn finish_commit(&mut self, result: Result<(), SpoolError>) -> Result<(), SpoolError> {
        let Some(done) = self.in_flight.take() else {
            return result;
        };
        match result {
            Ok(()) => {
                let mut synced = Vec::with_capacity(done.marks.len());
                for (seq, mark) in done.marks {
                    if let Some(slot) = self.segments.get_mut(&seq) {
                        slot.seg.mark_synced(mark);
                    }
                    synced.push(seq);
                }
                self.reclaim_from(synced);
                self.apply_releases(done.releases);
                if self.all_durable() {
                    // Released after the job began, with nothing appended since: durable too.
                    let later = std::mem::take(&mut self.releases);
                    self.apply_releases(later);
                }
                Ok(())
            }
            Err(e) => {
                self.releases.clear();
                self.sync_failed = true;
                // Put the failed batch back so that abandoning covers it with the newer one.
                let mut batch = done.msgs;
                batch.append(&mut self.batch_msgs);
                self.batch_msgs = batch;
                for (seq, _) in done.marks {
                    if !self.dirty.contains(&seq) {
                        self.dirty.push(seq);
                    }
                }
                self.dirty.sort_unstable();
                self.dir_dirty |= done.dir;
                self.abandon_batch();
                Err(e)
            }
        }
    }

    /// Decodes the message record at `loc` (checking its crc again: the bytes may have sat on
    /// disk for days).
    pub fn message(&self, loc: MessageLoc) -> Result<MessageView<'_>, SpoolError> {
        self.message_checked(loc, true)
    }

    /// [`Spool::message`], checking the crc only when `check_crc`.
    fn message_checked(&self, loc: MessageLoc, check_crc: bool) -> Result<MessageView<'_>, SpoolError> {
        let slot =
            self.segments.get(&loc.segment).ok_or(SpoolError::Corrupt("message location names no open segment"))?;
        let off = usize::try_from(loc.offset).map_err(|_| SpoolError::Corrupt("message offset out of range"))?;
        let read = if check_crc { format::record_at } else { format::record_at_trusted };
        let raw = read(slot.seg.bytes(), off, slot.seg.key())
            .map_err(|_| SpoolError::Corrupt("message record fails validation"))?;
        if raw.kind != format::RecordKind::Message || raw.len as u64 != loc.len {
            return Err(SpoolError::Corrupt("message location does not hold a message record"));
        }
        format::decode_message(raw.payload).map_err(|_| SpoolError::Corrupt("message payload fails validation"))
    }

    /// The envelope of the message at `loc`, decoded without checking the record's crc again
    /// (see [`format::record_at_trusted`]): for settling delivery outcomes.
    pub fn envelope(&self, loc: MessageLoc) -> Result<Envelope, SpoolError> {
        self.envelope_and_body(loc).map(|(env, _)| env)
    }

    /// [`Spool::envelope`] and the body, read the same way (no crc check): for the delivery
    /// log lines, which name the message's DKIM signatures.
    pub fn envelope_and_body(&self, loc: MessageLoc) -> Result<(Envelope, &[u8]), SpoolError> {
        let slot =
            self.segments.get(&loc.segment).ok_or(SpoolError::Corrupt("message location names no open segment"))?;
        let off = usize::try_from(loc.offset).map_err(|_| SpoolError::Corrupt("message offset out of range"))?;
        let raw = format::record_at_trusted(slot.seg.bytes(), off, slot.seg.key())
            .map_err(|_| SpoolError::Corrupt("message record fails validation"))?;
        if raw.kind != format::RecordKind::Message {
            return Err(SpoolError::Corrupt("message location does not hold a message record"));
        }
        format::decode_message(raw.payload)
            .map(|v| (v.envelope, v.body))
            .map_err(|_| SpoolError::Corrupt("message payload fails validation"))
    }

    /// Like [`Spool::message`], and also where the body lies, so that a delivery can stream it
    /// in pieces with [`Spool::body`] without decoding (or checksumming) the record again.
    ///
    /// Without `check_crc` the record's framing is checked but not its crc: for a message's
    /// first delivery attempt, whose record this process wrote moments ago (computing the crc
    /// from the same bytes) or recovery has just checked. Checksumming a 100 KiB body again
    /// cost ~5% of the relay's CPU end to end.
    pub fn message_with_body(
        &self,
        loc: MessageLoc,
        check_crc: bool,
    ) -> Result<(MessageView<'_>, BodyLoc), SpoolError> {
        let view = self.message_checked(loc, check_crc)?;
        let base = self.segments.get(&loc.segment).map_or(0, |s| s.seg.bytes().as_ptr() as usize);
        // The body is a subslice of the segment's bytes: its offset is the pointer difference.
        let start = (view.body.as_ptr() as usize).saturating_sub(base);
        let body = BodyLoc { segment: loc.segment, start, len: view.body.len() };
        Ok((view, body))
    }

    /// The body at `b` (from [`Spool::message_with_body`]); empty if the segment is gone. A
    /// message's segment stays mapped while the message has an open recipient.
    pub fn body(&self, b: BodyLoc) -> &[u8] {
        self.segments.get(&b.segment).and_then(|s| s.seg.bytes().get(b.start..b.start + b.len)).unwrap_or(&[])
    }

    /// All recipients of the message at `msg_segment` are final: drop its live count there and
    /// one pin for each outcome record in `pins`; delete segments that are no longer needed.
    ///
    /// Pins on segments after `msg_segment` are dropped only when `msg_segment` itself is
    /// deleted: until then the message record is still on disk and its final outcomes must stay
    /// with it, or the next recovery would queue the message again.
    ///
    /// Takes effect once the records appended so far are durable (the next successful commit):
    /// a segment is never unlinked before the outcome and bounce records that finish it are on
    /// disk. After a failed commit nothing is released any more (that commit's records may
    /// never reach the disk although they are no longer tracked); the next recovery judges it.
    ///
    /// Takes `pins` by value: a release that must wait keeps them without a copy.
    pub fn release_message(&mut self, msg_segment: u64, pins: Pins) {
        if self.sync_failed {
            return;
        }
        if self.all_durable() {
            // Everything appended is durable already (or fsync is off and nothing is pending).
            self.apply_release(msg_segment, &pins.0);
        } else {
            self.releases.push(Release { msg_segment, pins });
        }
    }

    /// Nothing appended is waiting for a sync, nor is a sync running.
    fn all_durable(&self) -> bool {
        self.dirty.is_empty() && !self.dir_dirty && self.in_flight.is_none()
    }

    /// Applies releases whose records a successful commit has made durable.
    fn apply_releases(&mut self, releases: Vec<Release>) {
        for r in releases {
            self.apply_release(r.msg_segment, &r.pins.0);
        }
    }

    fn apply_release(&mut self, msg_segment: u64, outcome_segments: &[u64]) {
        let mut touched = vec![msg_segment];
        for &o in outcome_segments {
            let later = o > msg_segment;
            match self.segments.get_mut(&msg_segment) {
                Some(slot) if later => slot.deferred.push(o),
                // Same segment (they go together) or the message segment is already gone.
                _ => {
                    if let Some(s) = self.segments.get_mut(&o) {
                        s.pins = s.pins.saturating_sub(1);
                    }
                    touched.push(o);
                }
            }
        }
        if let Some(slot) = self.segments.get_mut(&msg_segment) {
            slot.live = slot.live.saturating_sub(1);
        }
        self.reclaim_from(touched);
    }

    /// Problems met while deleting reclaimed segments since the last call (an unlink that
    /// failed leaves the file for the next recovery to judge). Empty in normal operation.
    pub fn take_warnings(&mut self) -> Vec<String> {
        self.reaper.take_warnings(&mut self.warnings);
        std::mem::take(&mut self.warnings)
    }

    /// Number of segment files the spool currently holds open (the active one included).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Sequence number of the active segment, if one is open.
    pub fn active_segment(&self) -> Option<u64> {
        self.active
    }

    /// The active segment's slot, if one is open.
    fn active_slot(&self) -> Option<&Slot> {
        self.active.and_then(|seq| self.segments.get(&seq))
    }

    /// Whether a new segment of `size` bytes leaves `min_free_space` on a filesystem with
    /// `free` bytes free (unknown: assume so, and let the creation find out), counting the
    /// active segment's unused tail as free: sealing it gives that back.
    fn segment_fits(&self, free: Option<u64>, size: u64) -> bool {
        let room = self.active_slot().map_or(0, |s| s.seg.remaining() as u64);
        free.is_none_or(|f| f.saturating_add(room) >= size.saturating_add(self.opts.min_free_space))
    }

    /// Appends `len` bytes written by `fill` into the active segment (rolling over if needed)
    /// and marks it dirty. Returns (segment, offset).
    fn append_with(
        &mut self,
        len: usize,
        new_mail: bool,
        fill: impl FnOnce(&mut [u8], &format::RecordKey) -> Result<(), SpoolError>,
    ) -> Result<(u64, usize), SpoolError> {
        // New mail never goes into a segment made from the reserve: it rolls over past it,
        // which checks the free space again.
        let usable = self.active_slot().is_some_and(|slot| slot.seg.remaining() >= len && !(new_mail && slot.reserve));
        if !usable || (new_mail && self.spare_due()) {
            self.roll(len, new_mail)?;
        }
        let seq = self.active.ok_or(SpoolError::Corrupt("no active segment"))?;
        let slot = self.segments.get_mut(&seq).ok_or(SpoolError::Corrupt("no active segment"))?;
        let key = *slot.seg.key();
        let off = slot.seg.append_with(len, |dst| fill(dst, &key))?;
        if self.dirty.last() != Some(&seq) {
            self.dirty.push(seq);
        }
        Ok((seq, off))
    }

    /// Whether new mail should roll over to a spare now: the active segment was fallocated and a
    /// pre-written spare is ready (a fresh spool starts on a fallocated segment and moves to
    /// the first spare as soon as it is written). Asks for the next spare once the active
    /// segment is half full, when its commits were small enough for a spare to pay
    /// ([`spare::pays`]); else the next segment is fallocated.
    fn spare_due(&mut self) -> bool {
        let (Some(spares), Some(slot)) = (&self.spares, self.active.and_then(|seq| self.segments.get(&seq))) else {
            return false;
        };
        let used = slot.seg.used() as u64;
        if !self.spare_asked && used > self.opts.segment_size / 2 {
            self.spare_asked = true;
            if spare::pays(used, self.active_syncs) {
                spares.request();
            }
        }
        !slot.seg.prewritten() && spares.is_ready()
    }

    /// Seals the active segment (if any) and starts the next one, big enough for a record of
    /// `record_len` bytes.
    ///
    /// A segment of the full size is made when the filesystem keeps `min_free_space` free
    /// beyond it (the sealed segment's unused tail counts as free: sealing gives it back). Else
    /// new mail (`new_mail`) gets [`SpoolError::NoSpace`] and the active segment stays as it
    /// is, while the relay's own records (outcomes, bounces) get a small segment made from the
    /// reserve, which new mail never uses: delivery can always record what it did.
    fn roll(&mut self, record_len: usize, new_mail: bool) -> Result<(), SpoolError> {
        let need = format::SEGMENT_HEADER_LEN + record_len;
        let full = usize::try_from(self.opts.segment_size).unwrap_or(usize::MAX).max(need);
        // A ready spare's blocks are taken, yet they are room for the next segment.
        let spare_room = match &self.spares {
            Some(s) if s.is_ready() => self.opts.segment_size,
            _ => 0,
        };
        let free = segment::free_space(&self.opts.dir).ok().map(|f| f.saturating_add(spare_room));
        let (size, reserve) = if self.segment_fits(free, full as u64) {
            (full, false)
        } else if new_mail {
            return Err(SpoolError::NoSpace);
        } else {
            (need.max(SMALL_SEGMENT.min(full)), true)
        };
        self.seal_active();
        let seq = self.next_seq;
        let seg = match self.adopt_spare(seq, size, reserve) {
            Some(seg) => seg,
            None => match Segment::create(&self.opts.dir, seq, size) {
                Err(SpoolError::NoSpace) if !new_mail && size > need => Segment::create(&self.opts.dir, seq, need)?,
                other => other?,
            },
        };
        self.spare_asked = false;
        self.active_syncs = 0;
        // The header is appended data too: it must be durable before any record counts.
        if self.dirty.last() != Some(&seq) {
            self.dirty.push(seq);
        }
        self.next_seq = seq + 1;
        self.dir_dirty = true;
        self.segments.insert(seq, Slot { seg, live: 0, pins: 0, deferred: Vec::new(), reserve });
        self.active = Some(seq);
        Ok(())
    }

    /// Segment `seq` made from the ready spare, when there is one of exactly `size` bytes and
    /// the segment is not made from the reserve. A spare that does not fit or cannot be
    /// adopted is deleted (the caller then fallocates, as without spares).
    fn adopt_spare(&mut self, seq: u64, size: usize, reserve: bool) -> Option<Segment> {
        let (path, len) = self.spares.as_ref().filter(|_| !reserve)?.take()?;
        if len == size as u64 {
            match Segment::adopt(&self.opts.dir, seq, &path, len) {
                Ok(seg) => return Some(seg),
                Err(e) => self.warnings.push(format!("{}: could not use the spare segment: {e}", path.display())),
            }
        }
        let _ = std::fs::remove_file(&path);
        None
    }

    /// Seals the active segment (if any); appends go to a new one from now on.
    fn seal_active(&mut self) {
        let Some(seq) = self.active.take() else {
            return;
        };
        if let Some(slot) = self.segments.get_mut(&seq) {
            if let Err(e) = slot.seg.seal() {
                // Harmless for correctness: the unsealed tail is zeros, the clean end.
                self.warnings.push(format!("{}: could not seal: {e}", slot.seg.name()));
            }
        }
        self.reclaim_from(vec![seq]);
    }

    fn sync_dirty(&mut self) -> Result<(), SpoolError> {
        let fsync = self.opts.fsync;
        for seq in &self.dirty {
            if let Some(slot) = self.segments.get_mut(seq) {
                slot.seg.commit(fsync).map_err(|e| map_io("sync spool segment", e))?;
            }
        }
        if self.dir_dirty {
            if fsync {
                // A new file's directory entry is not covered by the file's own fdatasync.
                File::open(&self.opts.dir).and_then(|d| d.sync_all()).map_err(|e| map_io("sync spool directory", e))?;
            }
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// After a failed commit: seal the active segment, stop tracking the batch's bytes, and
    /// undo the live counts of its messages (the relay answers 451 and forgets them).
    fn abandon_batch(&mut self) {
        self.seal_active();
        for seq in std::mem::take(&mut self.dirty) {
            if let Some(slot) = self.segments.get_mut(&seq) {
                slot.seg.forget_dirty();
            }
        }
        let mut touched = Vec::new();
        for seq in std::mem::take(&mut self.batch_msgs) {
            if let Some(slot) = self.segments.get_mut(&seq) {
                slot.live = slot.live.saturating_sub(1);
            }
            touched.push(seq);
        }
        self.reclaim_from(touched);
    }

    /// Deletes each listed segment that is no longer needed, then any whose last pin that
    /// deletion dropped.
    fn reclaim_from(&mut self, mut work: Vec<u64>) {
        while let Some(seq) = work.pop() {
            let Some(slot) = self.segments.get(&seq) else {
                continue;
            };
            let needed = slot.live > 0
                || slot.pins > 0
                || slot.seg.is_dirty()
                || slot.seg.remaining() > 0
                || self.active == Some(seq);
            if needed {
                continue;
            }
            let Some(slot) = self.segments.remove(&seq) else {
                continue;
            };
            for d in &slot.deferred {
                if let Some(s) = self.segments.get_mut(d) {
                    s.pins = s.pins.saturating_sub(1);
                    work.push(*d);
                }
            }
            self.reaper.remove(slot.seg);
        }
    }
}

impl Drop for Spool {
    /// A clean shutdown leaves the active segment cut to its used length, so the next open
    /// has no preallocated zeros to walk.
    fn drop(&mut self) {
        self.seal_active();
    }
}

/// An encoder refusal (a field too long for its length prefix, a record over 4 GiB) is a
/// property of the input, not of the disk.
fn encode_error(e: format::FormatError) -> SpoolError {
    SpoolError::Io("encode spool record", io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{BodyType, Ret};
    use std::path::Path;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("sluice-spool-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn opts(dir: &Path) -> SpoolOptions {
        SpoolOptions { dir: dir.to_path_buf(), fsync: true, segment_size: 64 * 1024, min_free_space: 0, spares: false }
    }

    fn env(rcpts: &[&str]) -> Envelope {
        let mut e = Envelope::default();
        e.sender = b"sender@example.org".to_vec();
        e.envid = b"ENV1".to_vec();
        e.ret = Ret::Full;
        e.body_type = BodyType::EightBitMime;
        e.smtputf8 = true;
        e.client_ip = "192.0.2.7".parse().unwrap();
        e.helo = b"client.example.org".to_vec();
        e.auth_user = b"user".to_vec();
        for r in rcpts {
            e.push_rcpt(r.as_bytes(), b"", 0);
        }
        e
    }

    fn outcome(status: RcptStatus) -> Outcome<'static> {
        Outcome {
            status,
            attempts: 1,
            next_attempt_ms: 0,
            at_ms: 5,
            reply: b"250 2.0.0 ok",
            remote: b"mx.example.net",
            bounce: None,
        }
    }

    fn seg_files(dir: &Path) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| format::parse_segment_file_name(e.unwrap().file_name().to_str()?))
            .collect();
        v.sort_unstable();
        v
    }

    fn seg_path(dir: &Path, seq: u64) -> PathBuf {
        dir.join(format::segment_file_name(seq))
    }

    /// Whether segment `seq` is still on disk, once the removals handed to the reaper are done.
    fn on_disk(spool: &Spool, dir: &Path, seq: u64) -> bool {
        spool.reaper.settle();
        seg_path(dir, seq).exists()
    }

    #[test]
    fn append_commit_reopen_recovers_bytes_and_envelope() {
        let tmp = TempDir::new("reopen");
        let e = env(&["a@x.example", "b@y.example"]);
        let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let (loc, pending) = {
            let (mut spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
            assert!(rec.messages.is_empty() && rec.max_id.is_none() && rec.warnings.is_empty());
            assert!(!spool.has_uncommitted());
            let (pending, loc) = spool.append_message(QueueId(42), 1000, &e, &body).unwrap();
            assert!(spool.has_uncommitted());
            spool.commit().unwrap();
            assert!(!spool.has_uncommitted());
            let view = spool.message(loc).unwrap();
            assert_eq!(view.body, &body[..]);
            (loc, pending)
        };
        assert_eq!(pending.segment, loc.segment);
        assert_eq!(pending.end, loc.offset + loc.len);

        let (spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
        assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
        assert_eq!(rec.max_id, Some(QueueId(42)));
        assert_eq!(rec.messages.len(), 1);
        let m = &rec.messages[0];
        assert_eq!((m.id, m.loc, m.arrival_ms), (QueueId(42), loc, 1000));
        assert_eq!(m.rcpts.len(), 2);
        assert!(m.rcpts.iter().all(|r| r.status == RcptStatus::Queued && r.attempts == 0));
        let view = spool.message(m.loc).unwrap();
        assert_eq!(view.id, QueueId(42));
        assert_eq!(view.arrival_ms, 1000);
        assert_eq!(view.body, &body[..]);
        let got = &view.envelope;
        assert_eq!(got.sender, e.sender);
        assert_eq!(got.envid, e.envid);
        assert_eq!((got.ret, got.body_type, got.smtputf8), (e.ret, e.body_type, e.smtputf8));
        assert_eq!(got.client_ip, e.client_ip);
        assert_eq!((&got.helo, &got.auth_user), (&e.helo, &e.auth_user));
        assert!(got.rcpts().eq(e.rcpts()));
        // The new active segment is not the recovered one.
        assert!(spool.active_segment() > Some(loc.segment));
    }

    #[test]
    fn outcomes_are_applied_on_recovery() {
        let tmp = TempDir::new("outcomes");
        {
            let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
            let e = env(&["a@x", "b@x", "c@x"]);
            spool.append_message(QueueId(1), 10, &e, b"body").unwrap();
            spool.append_outcome(QueueId(1), 0, &outcome(RcptStatus::Delivered)).unwrap();
            spool.append_outcome(QueueId(1), 1, &outcome(RcptStatus::Failed)).unwrap();
            let mut def = outcome(RcptStatus::Deferred);
            def.attempts = 1;
            def.reply = b"451 4.4.1 first";
            spool.append_outcome(QueueId(1), 2, &def).unwrap();
            def.attempts = 2;
            def.next_attempt_ms = 777_000;
            def.reply = b"451 4.4.1 second";
            spool.append_outcome(QueueId(1), 2, &def).unwrap();
            // An outcome for an id that no longer exists is ignored.
            spool.append_outcome(QueueId(99), 0, &outcome(RcptStatus::Delivered)).unwrap();
            spool.commit().unwrap();
        }
        let (_spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
        assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
        assert_eq!(rec.max_id, Some(QueueId(99)));
        let m = &rec.messages[0];
        assert_eq!(m.rcpts[0].status, RcptStatus::Delivered);
        assert_eq!(m.rcpts[1].status, RcptStatus::Failed);
        let r = &m.rcpts[2];
        assert_eq!(r.status, RcptStatus::Deferred);
        assert_eq!(r.attempts, 2);
        assert_eq!(r.next_attempt_ms, 777_000);
        assert_eq!(r.last_reply, b"451 4.4.1 second");
        assert_eq!(m.pins, Pins(vec![m.loc.segment; 4]));
    }

    #[test]
    fn a_finished_segment_is_unlinked_only_once_its_outcomes_are_durable() {
        // Power-loss ordering: deleting the message's segment before the outcome (and bounce)
        // records that finish it are synced could leave neither on disk.
        let tmp = TempDir::new("release-order");
        let small = SpoolOptions { segment_size: 4096, ..opts(&tmp.0) };
        let (mut spool, _) = Spool::open(small).unwrap();
        let (_, l1) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), &[1u8; 3000]).unwrap();
        spool.commit().unwrap();
        // The next message rolls over to a new segment; the outcome lands there.
        spool.append_message(QueueId(2), 0, &env(&["a@x"]), &[2u8; 3000]).unwrap();
        spool.commit().unwrap();
        let p = spool.append_outcome(QueueId(1), 0, &outcome(RcptStatus::Delivered)).unwrap();
        assert_ne!(p.segment, l1.segment);
        spool.release_message(l1.segment, Pins(vec![p.segment]));
        assert!(on_disk(&spool, &tmp.0, l1.segment), "unlinked before its outcome was synced");
        // With a detached commit too: not before the job that covers the outcome returns.
        let job = spool.begin_commit().unwrap().expect("the outcome is dirty");
        assert!(on_disk(&spool, &tmp.0, l1.segment));
        job.run().unwrap();
        spool.finish_commit(Ok(())).unwrap();
        assert!(!on_disk(&spool, &tmp.0, l1.segment), "released once durable");
    }

    #[test]
    fn a_failed_commit_keeps_the_segments_its_releases_named() {
        let tmp = TempDir::new("release-fail");
        let small = SpoolOptions { segment_size: 4096, ..opts(&tmp.0) };
        let (mut spool, _) = Spool::open(small).unwrap();
        let (_, l1) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), &[1u8; 3000]).unwrap();
        spool.append_message(QueueId(2), 0, &env(&["a@x"]), &[2u8; 3000]).unwrap();
        spool.commit().unwrap();
        let p = spool.append_outcome(QueueId(1), 0, &outcome(RcptStatus::Failed)).unwrap();
        spool.release_message(l1.segment, Pins(vec![p.segment]));
        let _job = spool.begin_commit().unwrap().unwrap();
        let failed = io::Error::other("injected sync failure");
        assert!(spool.finish_commit(Err(SpoolError::Io("sync", failed))).is_err());
        spool.commit().unwrap();
        assert!(on_disk(&spool, &tmp.0, l1.segment), "the next recovery judges it, not a later commit");
    }

    #[test]
    fn new_mail_leaves_the_reserve_and_outcomes_may_use_it() {
        let tmp = TempDir::new("reserve");
        // A reserve larger than any disk: new mail can never roll over to a new segment...
        let o = SpoolOptions { segment_size: 4096, min_free_space: u64::MAX / 4, ..opts(&tmp.0) };
        let (mut spool, rec) = Spool::open(o).unwrap();
        assert_eq!(spool.active_segment(), None, "no room for a first segment: deliver-only");
        assert!(rec.warnings.iter().any(|w| w.contains("refusing new mail")), "{:?}", rec.warnings);
        assert!(!spool.accepting(1_000));
        let r = spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"new");
        assert!(matches!(r, Err(SpoolError::NoSpace)), "{r:?}");
        // ...while the relay's own records still find a segment.
        spool.append_generated_message(QueueId(2), 0, &env(&["a@x"]), b"bounce").unwrap();
        spool.append_outcome(QueueId(2), 0, &outcome(RcptStatus::Deferred)).unwrap();
        spool.commit().unwrap();
        assert!(spool.active_segment().is_some());
        // That segment was made from the reserve: new mail still may not use it.
        assert!(!spool.accepting(5_000));
        let r = spool.append_message(QueueId(3), 0, &env(&["a@x"]), b"new");
        assert!(matches!(r, Err(SpoolError::NoSpace)), "{r:?}");
        // With room in the active segment and no reserve, mail is taken.
        let o = SpoolOptions { segment_size: 4096, ..opts(&tmp.0) };
        drop(spool);
        let (mut spool, _) = Spool::open(o).unwrap();
        assert!(spool.accepting(2_000));
    }

    #[test]
    fn a_failure_whose_dsn_did_not_survive_is_retried() {
        // Writeback may reach the disk out of order before a commit: the failure record can
        // survive a power loss while the DSN written just before it does not.
        let tmp = TempDir::new("lost-dsn");
        let (dsn_loc, seq) = {
            let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
            spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"original").unwrap();
            spool.commit().unwrap();
            let (_, dsn) = spool.append_generated_message(QueueId(2), 0, &env(&["sender@y"]), b"dsn").unwrap();
            let failed = Outcome { bounce: Some(QueueId(2)), ..outcome(RcptStatus::Failed) };
            spool.append_outcome(QueueId(1), 0, &failed).unwrap();
            spool.commit().unwrap();
            (dsn, spool.active_segment().unwrap())
        };
        let path = seg_path(&tmp.0, seq);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = dsn_loc.offset as usize;
        bytes[at..at + dsn_loc.len as usize].fill(0);
        std::fs::write(&path, bytes).unwrap();
        let (_spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
        let m: Vec<_> = rec.messages.iter().filter(|m| m.id == QueueId(1)).collect();
        assert_eq!(m.len(), 1, "the message is queued again, not dropped: {:?}", rec.warnings);
        assert_eq!(m[0].rcpts[0].status, RcptStatus::Deferred);
        assert!(rec.warnings.iter().any(|w| w.contains("DSN") && w.contains("retried")), "{:?}", rec.warnings);
        // With its DSN present, the same failure is final.
        let tmp = TempDir::new("kept-dsn");
        {
            let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
            spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"original").unwrap();
            spool.append_generated_message(QueueId(2), 0, &env(&["sender@y"]), b"dsn").unwrap();
            spool
                .append_outcome(QueueId(1), 0, &Outcome { bounce: Some(QueueId(2)), ..outcome(RcptStatus::Failed) })
                .unwrap();
            spool.commit().unwrap();
        }
        let (_spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
        let ids: Vec<_> = rec.messages.iter().map(|m| m.id).collect();
        assert_eq!(ids, [QueueId(2)], "only the DSN is left to deliver");
    }

    #[test]
    fn a_segment_whose_header_is_unreadable_is_left_alone_not_read_unsalted() {
        // Without its salt nothing in a segment can be told from a client's bytes: a body
        // carrying records in the unsalted (version 1) framing, at every alignment, must not
        // come to life, and the acknowledged bytes must not be cut or deleted either.
        let mut fenv = env(&["victim@elsewhere.example"]);
        fenv.sender = b"forger@example.net".to_vec();
        let mut forged = vec![0u8; format::message_record_len(&fenv, b"x").unwrap()];
        format::encode_message(&mut forged, &format::RecordKey::LEGACY, QueueId(77), 0, &fenv, b"x").unwrap();
        let mut body = Vec::new();
        for shift in 0..8 {
            body.extend(std::iter::repeat_n(b'.', shift));
            body.extend_from_slice(&forged);
        }
        let tmp = TempDir::new("badheader");
        let seq = {
            let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
            spool.append_message(QueueId(1), 0, &env(&["a@x"]), &body).unwrap();
            spool.commit().unwrap();
            spool.active_segment().unwrap()
        };
        let path = seg_path(&tmp.0, seq);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0..8].fill(b'X');
        bytes[512..520].fill(b'X');
        std::fs::write(&path, &bytes).unwrap();
        let (_spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
        assert!(rec.messages.is_empty(), "{:?}", rec.messages.iter().map(|m| m.id).collect::<Vec<_>>());
        assert!(rec.warnings.iter().any(|w| w.contains("unreadable")), "{:?}", rec.warnings);
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "left as it is");
        let copy = tmp.0.join("corrupt").join(format!("{}.0", format::segment_file_name(seq)));
        assert_eq!(std::fs::read(copy).unwrap().len(), bytes.iter().rposition(|&b| b != 0).unwrap() + 1);
    }

    #[test]
    fn finished_messages_are_not_recovered_but_count_for_max_id() {
        let tmp = TempDir::new("maxid");
        {
            let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
            spool.append_message(QueueId(5), 0, &env(&["a@x"]), b"live").unwrap();
            spool.append_message(QueueId(9), 0, &env(&["a@x"]), b"done").unwrap();
            spool.append_outcome(QueueId(9), 0, &outcome(RcptStatus::Delivered)).unwrap();
            spool.commit().unwrap();
        }
        let (_spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
        assert_eq!(rec.max_id, Some(QueueId(9)));
        let ids: Vec<_> = rec.messages.iter().map(|m| m.id).collect();
        assert_eq!(ids, [QueueId(5)]);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_survive() {
        for scribble in [false, true] {
            let tmp = TempDir::new("torn");
            let (first, last) = {
                let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
                let (_, a) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"one").unwrap();
                let (_, b) = spool.append_message(QueueId(2), 0, &env(&["a@x"]), &[7u8; 3000]).unwrap();
                spool.commit().unwrap();
                (a, b)
            };
            let path = seg_path(&tmp.0, last.segment);
            let end = last.offset + last.len;
            if scribble {
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[end as usize - 100..end as usize].fill(0x5A);
                std::fs::write(&path, bytes).unwrap();
            } else {
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(end - 11).unwrap();
            }
            let (spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
            assert_eq!(rec.messages.len(), 1, "scribble={scribble}");
            assert_eq!(rec.messages[0].loc, first);
            assert_eq!(spool.message(first).unwrap().body, b"one");
            assert_eq!(rec.warnings.len(), 2, "{:?}", rec.warnings);
            let w = &rec.warnings[0];
            let name = format::segment_file_name(last.segment);
            assert!(w.contains("torn tail") && w.contains(&name), "{w}");
            assert!(w.contains(&format!("offset {}", last.offset)), "{w}");
            // The cut bytes are kept in the quarantine, not destroyed.
            let copy = tmp.0.join("corrupt").join(format!("{name}.{}", last.offset));
            assert!(rec.warnings[1].contains("copied to"), "{:?}", rec.warnings);
            let kept = std::fs::read(&copy).unwrap();
            assert!(kept.len() > 2900 && kept.windows(8).any(|w| w == [7u8; 8]), "{}", kept.len());
            assert_eq!(std::fs::metadata(&path).unwrap().len(), last.offset);
            drop(spool);
            // Once cut, the next open is clean.
            let (_spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
            assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
            assert_eq!(rec.messages.len(), 1);
        }
    }

    #[test]
    fn corrupt_middle_record_is_skipped_with_a_warning() {
        let tmp = TempDir::new("middle");
        let locs: Vec<MessageLoc> = {
            let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
            let locs =
                (1..=3).map(|i| spool.append_message(QueueId(i), 0, &env(&["a@x"]), b"body").unwrap().1).collect();
            spool.commit().unwrap();
            locs
        };
        let path = seg_path(&tmp.0, locs[1].segment);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[locs[1].offset as usize + 30] ^= 0xFF;
        std::fs::write(&path, bytes).unwrap();
        let (spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
        let ids: Vec<_> = rec.messages.iter().map(|m| m.id.0).collect();
        assert_eq!(ids, [1, 3]);
        assert_eq!(rec.warnings.len(), 2, "{:?}", rec.warnings);
        let name = format::segment_file_name(locs[1].segment);
        let copy = tmp.0.join("corrupt").join(format!("{name}.{}", locs[1].offset));
        assert_eq!(std::fs::read(copy).unwrap().len() as u64, locs[1].len, "the damaged record is quarantined");
        let w = &rec.warnings[0];
        assert!(w.contains("corrupt record") && w.contains(&format!("offset {}", locs[1].offset)));
        assert!(w.contains(&format::segment_file_name(locs[1].segment)), "{w}");
        assert_eq!(spool.message(locs[2]).unwrap().id, QueueId(3));
        assert!(matches!(spool.message(locs[1]), Err(SpoolError::Corrupt(_))));
    }

    #[test]
    fn new_mail_moves_to_a_prewritten_spare_and_a_restart_reuses_the_next() {
        let tmp = TempDir::new("spares");
        let o = SpoolOptions { segment_size: 64 * 1024, spares: true, ..opts(&tmp.0) };
        let (mut spool, _) = Spool::open(o.clone()).unwrap();
        let first = spool.active_segment().unwrap();
        let t = std::time::Instant::now();
        while !spool.spares.as_ref().unwrap().is_ready() {
            assert!(t.elapsed() < std::time::Duration::from_secs(20), "no spare written");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The fresh spool started on a fallocated segment; new mail moves to the spare.
        let body = vec![7u8; 20 * 1024];
        let (_, a) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), &body).unwrap();
        assert_eq!(a.segment, first + 1);
        assert!(spool.active_slot().unwrap().seg.prewritten());
        // Past half full, the next spare is asked for.
        let (_, b) = spool.append_message(QueueId(2), 0, &env(&["a@x"]), &body).unwrap();
        spool.append_message(QueueId(3), 0, &env(&["a@x"]), &body).unwrap();
        assert_eq!(b.segment, first + 1);
        spool.commit().unwrap();
        let t = std::time::Instant::now();
        while !spool.spares.as_ref().unwrap().is_ready() {
            assert!(t.elapsed() < std::time::Duration::from_secs(20), "no second spare written");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(spool);
        let spare_files = |dir: &Path| {
            std::fs::read_dir(dir)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("spare-"))
                .count()
        };
        assert_eq!(spare_files(&tmp.0), 1, "the unused spare stays for the next run");
        let (spool, rec) = Spool::open(o).unwrap();
        assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
        assert_eq!(rec.messages.len(), 3);
        assert!(spool.active_slot().unwrap().seg.prewritten(), "the restart starts on the spare");
        assert_eq!(spool.message(b).unwrap().body, &body[..]);
    }

    #[test]
    fn a_first_attempt_reads_without_the_crc_and_a_retry_checks_it() {
        use std::os::unix::fs::FileExt;
        let tmp = TempDir::new("crc-check");
        let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
        let (_, loc) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"body\r\n").unwrap();
        spool.commit().unwrap();
        let (_, body) = spool.message_with_body(loc, true).unwrap();
        // The disk hands back a flipped bit: only the checked read sees it.
        let f = std::fs::OpenOptions::new().write(true).open(seg_path(&tmp.0, loc.segment)).unwrap();
        f.write_all_at(b"X", body.start as u64).unwrap();
        assert!(matches!(spool.message_with_body(loc, true), Err(SpoolError::Corrupt(_))));
        let (view, _) = spool.message_with_body(loc, false).unwrap();
        assert_eq!(view.body, b"Xody\r\n");
    }

    #[test]
    fn the_next_spare_is_asked_for_only_when_the_commits_are_small() {
        // Fills a 1 MiB segment with `record` KiB messages, one group commit per `per_sync` of
        // them, and says whether the segment after it is made from a pre-written spare.
        fn next_is_prewritten(tag: &str, record: usize, per_sync: u64) -> bool {
            let tmp = TempDir::new(tag);
            let o = SpoolOptions { segment_size: 1 << 20, spares: true, ..opts(&tmp.0) };
            let (mut spool, _) = Spool::open(o).unwrap();
            let spares = |s: &Spool| s.spares.as_ref().unwrap().is_ready();
            let t = std::time::Instant::now();
            while !spares(&spool) {
                assert!(t.elapsed() < std::time::Duration::from_secs(20), "no spare written");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let body = vec![7u8; record << 10];
            let (_, first) = spool.append_message(QueueId(0), 0, &env(&["a@x"]), &body).unwrap();
            assert!(spool.active_slot().unwrap().seg.prewritten(), "moved to the first spare");
            let mut id = 1;
            loop {
                let (_, loc) = spool.append_message(QueueId(id), 0, &env(&["a@x"]), &body).unwrap();
                if id % per_sync == 0 {
                    let job = spool.begin_commit().unwrap().unwrap();
                    spool.finish_commit(job.run()).unwrap();
                }
                id += 1;
                if loc.segment != first.segment {
                    spool.commit().unwrap();
                    // Long enough for a spare of 1 MiB, had one been asked for.
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    let (_, next) = spool.append_message(QueueId(id), 0, &env(&["a@x"]), &body).unwrap();
                    assert_eq!(next.segment, loc.segment, "no early roll to a spare");
                    return spool.active_slot().unwrap().seg.prewritten();
                }
            }
        }
        // 8 KiB per sync: the spare pays (the segment after is pre-written at its start).
        assert!(next_is_prewritten("spares-small", 1, 8), "small commits get a pre-written next segment");
        // 128 KiB per sync: no spare asked for, the next segment is fallocated.
        assert!(!next_is_prewritten("spares-big", 128, 1), "big commits get a fallocated next segment");
    }

    #[test]
    fn segments_roll_over_and_big_records_get_their_own() {
        let tmp = TempDir::new("rollover");
        let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
        let first = spool.active_segment().unwrap();
        let body = vec![1u8; 20 * 1024];
        let locs: Vec<_> =
            (0..4).map(|i| spool.append_message(QueueId(i), 0, &env(&["a@x"]), &body).unwrap().1).collect();
        // Three 20 KiB records fit a 64 KiB segment; the fourth goes to the next one, and the
        // overflowed segment is synced by the same commit.
        assert_eq!(locs[2].segment, first);
        assert_eq!(locs[3].segment, first + 1);
        let big = vec![2u8; 200 * 1024];
        let (_, big_loc) = spool.append_message(QueueId(10), 0, &env(&["a@x"]), &big).unwrap();
        assert_eq!(big_loc.segment, first + 2);
        spool.commit().unwrap();
        assert!(!spool.has_uncommitted());
        // Sealed segments are cut to their used length.
        assert_eq!(std::fs::metadata(seg_path(&tmp.0, first)).unwrap().len(), locs[2].offset + locs[2].len);
        assert_eq!(spool.message(big_loc).unwrap().body, &big[..]);
        drop(spool);
        let (spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
        assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
        assert_eq!(rec.messages.len(), 5);
        assert_eq!(spool.message(locs[3]).unwrap().body, &body[..]);
    }

    #[test]
    fn reclamation_deletes_finished_segments_and_keeps_pinned_ones() {
        let tmp = TempDir::new("reclaim");
        let small = SpoolOptions { segment_size: 4096, ..opts(&tmp.0) };
        let (mut spool, _) = Spool::open(small.clone()).unwrap();
        let body = vec![0u8; 3000];
        // Message 1 alone in segment A; message 2 alone in segment B.
        let (_, l1) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), &body).unwrap();
        let (_, l2) = spool.append_message(QueueId(2), 0, &env(&["a@x"]), &body).unwrap();
        assert_ne!(l1.segment, l2.segment);
        // Outcome for message 1 lands in B (pins B), final.
        let p = spool.append_outcome(QueueId(1), 0, &outcome(RcptStatus::Delivered)).unwrap();
        assert_eq!(p.segment, l2.segment);
        // Roll over again so B is sealed too.
        let (_, l3) = spool.append_message(QueueId(3), 0, &env(&["a@x"]), &body).unwrap();
        spool.commit().unwrap();
        assert!(on_disk(&spool, &tmp.0, l1.segment));

        spool.release_message(l1.segment, Pins(vec![p.segment]));
        assert!(!on_disk(&spool, &tmp.0, l1.segment), "finished sealed segment deleted");
        assert!(on_disk(&spool, &tmp.0, l2.segment), "live message keeps B");

        spool.append_outcome(QueueId(2), 0, &outcome(RcptStatus::Failed)).unwrap();
        spool.commit().unwrap();
        spool.release_message(l2.segment, Pins(vec![l3.segment]));
        assert!(!on_disk(&spool, &tmp.0, l2.segment));
        // The active segment is never deleted, even with nothing live in it.
        spool.append_outcome(QueueId(3), 0, &outcome(RcptStatus::Delivered)).unwrap();
        spool.commit().unwrap();
        spool.release_message(l3.segment, Pins(vec![l3.segment]));
        assert_eq!(spool.active_segment(), Some(l3.segment));
        assert!(on_disk(&spool, &tmp.0, l3.segment));
        // A clean shutdown seals the active segment, which then holds nothing needed.
        drop(spool);
        assert!(seg_files(&tmp.0).is_empty());
        let (spool, rec) = Spool::open(small).unwrap();
        assert!(rec.messages.is_empty() && rec.max_id.is_none());
        assert_eq!(seg_files(&tmp.0), vec![spool.active_segment().unwrap()]);
    }

    #[test]
    fn final_outcomes_outlive_their_message_record() {
        // Message 1 and 2 share segment A; message 1's final outcome lands in segment B.
        // Releasing 1 must not free B while A (kept by 2) still holds message 1's record.
        let tmp = TempDir::new("deferred");
        let small = SpoolOptions { segment_size: 4096, ..opts(&tmp.0) };
        let body = vec![0u8; 1500];
        let (a, b) = {
            let (mut spool, _) = Spool::open(small.clone()).unwrap();
            let (_, l1) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), &body).unwrap();
            let (_, l2) = spool.append_message(QueueId(2), 0, &env(&["a@x"]), &body).unwrap();
            assert_eq!(l1.segment, l2.segment);
            let (_, l3) = spool.append_message(QueueId(3), 0, &env(&["a@x"]), &body).unwrap();
            assert_ne!(l3.segment, l1.segment);
            let p = spool.append_outcome(QueueId(1), 0, &outcome(RcptStatus::Delivered)).unwrap();
            assert_eq!(p.segment, l3.segment);
            spool.append_outcome(QueueId(3), 0, &outcome(RcptStatus::Delivered)).unwrap();
            spool.append_message(QueueId(4), 0, &env(&["a@x"]), &vec![0u8; 3000]).unwrap();
            spool.commit().unwrap();
            spool.release_message(l1.segment, Pins(vec![p.segment]));
            spool.release_message(l3.segment, Pins(vec![l3.segment]));
            assert!(on_disk(&spool, &tmp.0, l1.segment));
            assert!(on_disk(&spool, &tmp.0, l3.segment), "B pinned by message 1's record");
            (l1.segment, l3.segment)
        };
        let (mut spool, rec) = Spool::open(small.clone()).unwrap();
        let ids: Vec<_> = rec.messages.iter().map(|m| m.id.0).collect();
        assert_eq!(ids, [2, 4], "message 1 is not delivered again");
        assert!(on_disk(&spool, &tmp.0, b), "recovery keeps the pin too");
        let m2 = &rec.messages[0];
        spool.append_outcome(QueueId(2), 0, &outcome(RcptStatus::Delivered)).unwrap();
        spool.commit().unwrap();
        spool.release_message(m2.loc.segment, Pins(vec![spool.active_segment().unwrap()]));
        assert!(!on_disk(&spool, &tmp.0, a));
        assert!(!on_disk(&spool, &tmp.0, b), "B freed with A");
    }

    #[test]
    fn fsync_off_still_stores_and_recovers() {
        let tmp = TempDir::new("nofsync");
        let o = SpoolOptions { fsync: false, ..opts(&tmp.0) };
        {
            let (mut spool, _) = Spool::open(o.clone()).unwrap();
            for i in 0..10 {
                spool.append_message(QueueId(i), 0, &env(&["a@x"]), b"x").unwrap();
                spool.commit().unwrap();
                assert!(!spool.has_uncommitted());
            }
        }
        let (_spool, rec) = Spool::open(o).unwrap();
        assert_eq!(rec.messages.len(), 10);
    }

    #[test]
    fn failed_commit_seals_and_forgets_the_batch() {
        let tmp = TempDir::new("failcommit");
        let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
        let (_, l1) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"x").unwrap();
        let seq = l1.segment;
        // What `commit` does when a sync fails.
        spool.abandon_batch();
        assert!(!spool.has_uncommitted());
        assert_eq!(spool.active_segment(), None);
        // Sealed, and its only message was undone: reclaimed at once.
        assert!(!on_disk(&spool, &tmp.0, seq));
        let (_, l2) = spool.append_message(QueueId(2), 0, &env(&["a@x"]), b"y").unwrap();
        assert!(l2.segment > seq);
        spool.commit().unwrap();
        assert_eq!(spool.message(l2).unwrap().body, b"y");
    }

    #[test]
    fn a_failed_commit_keeps_generated_messages_live() {
        let tmp = TempDir::new("failgen");
        let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
        let (_, inbound) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"in").unwrap();
        let (_, bounce) = spool.append_generated_message(QueueId(2), 0, &env(&["b@x"]), b"bounce").unwrap();
        assert_eq!(inbound.segment, bounce.segment);
        let job = spool.begin_commit().unwrap().unwrap();
        drop(job);
        let err = SpoolError::Io("sync spool segment", io::Error::other("injected"));
        assert!(spool.finish_commit(Err(err)).is_err());
        // Sealed, but the queued bounce keeps the segment and its bytes.
        assert!(on_disk(&spool, &tmp.0, bounce.segment));
        assert_eq!(spool.message(bounce).unwrap().body, b"bounce");
        // Finished later, it still stays: after a failed sync no commit proves the records
        // that finish a message durable, so nothing is unlinked before the next recovery.
        spool.release_message(bounce.segment, Pins(vec![]));
        spool.append_outcome(QueueId(2), 0, &outcome(RcptStatus::Delivered)).unwrap();
        spool.commit().unwrap();
        assert!(on_disk(&spool, &tmp.0, bounce.segment));
    }

    #[test]
    fn read_only_scan_changes_nothing_and_tolerates_a_live_tail() {
        let tmp = TempDir::new("readonly");
        let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
        let (_, l1) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"one").unwrap();
        spool.commit().unwrap();
        // An append not yet committed is staged: not in the file for another reader.
        spool.append_message(QueueId(2), 0, &env(&["a@x"]), b"two").unwrap();
        let ids = |rec: &Recovery| rec.messages.iter().map(|m| m.id.0).collect::<Vec<_>>();
        assert_eq!(ids(&Spool::scan_read_only(&tmp.0).unwrap()), [1]);
        spool.commit().unwrap();
        let before: Vec<_> =
            seg_files(&tmp.0).into_iter().map(|s| std::fs::metadata(seg_path(&tmp.0, s)).unwrap().len()).collect();
        let rec = Spool::scan_read_only(&tmp.0).unwrap();
        assert_eq!(ids(&rec), [1, 2]);
        assert!(rec.warnings.is_empty());
        // Damage the tail of the live segment: still no warning, no change.
        let path = seg_path(&tmp.0, l1.segment);
        let mut bytes = std::fs::read(&path).unwrap();
        let end = (l1.offset + l1.len) as usize;
        bytes[end + 20] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let rec = Spool::scan_read_only(&tmp.0).unwrap();
        assert_eq!(rec.messages.len(), 1);
        assert!(rec.warnings.is_empty());
        let after: Vec<_> =
            seg_files(&tmp.0).into_iter().map(|s| std::fs::metadata(seg_path(&tmp.0, s)).unwrap().len()).collect();
        assert_eq!(before, after);
        assert!(Spool::scan_read_only(&tmp.0.join("missing")).is_err());
    }

    #[test]
    fn read_messages_lists_bodies_finished_or_not() {
        let tmp = TempDir::new("readmsgs");
        let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
        spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"one").unwrap();
        spool.append_message(QueueId(2), 0, &env(&["a@x"]), b"two").unwrap();
        spool.append_outcome(QueueId(1), 0, &outcome(RcptStatus::Delivered)).unwrap();
        spool.commit().unwrap();
        let got = read_messages(&tmp.0).unwrap();
        assert_eq!(got, vec![(QueueId(1), b"one".to_vec()), (QueueId(2), b"two".to_vec())]);
    }

    #[test]
    fn open_refuses_a_busy_or_unusable_directory() {
        let tmp = TempDir::new("busy");
        let (_spool, _) = Spool::open(opts(&tmp.0)).unwrap();
        let Err(e) = Spool::open(opts(&tmp.0)) else { panic!("second open succeeded") };
        assert!(e.to_string().contains("in use"), "{e}");
        let file = tmp.0.join("plain-file");
        std::fs::write(&file, b"").unwrap();
        let Err(e) = Spool::open(opts(&file.join("sub"))) else { panic!("opened under a file") };
        assert!(e.to_string().contains("plain-file"), "{e}");
    }

    #[test]
    fn bad_locations_are_errors() {
        let tmp = TempDir::new("badloc");
        let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
        let (_, loc) = spool.append_message(QueueId(1), 0, &env(&["a@x"]), b"x").unwrap();
        let p = spool.append_outcome(QueueId(1), 0, &outcome(RcptStatus::Deferred)).unwrap();
        for bad in [
            MessageLoc { segment: 999, ..loc },
            MessageLoc { offset: loc.offset + 8, ..loc },
            MessageLoc { len: loc.len + 8, ..loc },
            MessageLoc { offset: p.end - 8, ..loc },
            MessageLoc { offset: u64::MAX, ..loc },
            MessageLoc { offset: loc.offset + loc.len, ..loc },
        ] {
            assert!(matches!(spool.message(bad), Err(SpoolError::Corrupt(_))), "{bad:?}");
        }
    }

    #[test]
    fn oversized_envelope_field_is_refused_without_writing() {
        let tmp = TempDir::new("oversize");
        let (mut spool, _) = Spool::open(opts(&tmp.0)).unwrap();
        let mut e = env(&["a@x"]);
        e.helo = vec![b'h'; 70_000];
        let r = spool.append_message(QueueId(1), 0, &e, b"x");
        assert!(matches!(r, Err(SpoolError::Io(_, ref io)) if io.kind() == io::ErrorKind::InvalidInput));
        assert!(!spool.has_uncommitted());
    }

    #[test]
    fn header_only_and_zero_segments_are_removed_quietly() {
        let tmp = TempDir::new("empties");
        std::fs::create_dir_all(&tmp.0).unwrap();
        std::fs::write(seg_path(&tmp.0, 3), [0u8; 4096]).unwrap();
        std::fs::write(seg_path(&tmp.0, 4), format::encode_legacy_segment_header(4)).unwrap();
        std::fs::write(tmp.0.join("unrelated.txt"), b"keep").unwrap();
        let (spool, rec) = Spool::open(opts(&tmp.0)).unwrap();
        assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
        assert_eq!(spool.active_segment(), Some(5));
        assert_eq!(seg_files(&tmp.0), vec![5]);
        assert!(tmp.0.join("unrelated.txt").exists());
    }

    #[test]
    fn segment_of_another_format_version_is_refused_untouched() {
        let tmp = TempDir::new("version");
        std::fs::create_dir_all(&tmp.0).unwrap();
        let mut h = format::encode_legacy_segment_header(1);
        h[8] = 99;
        let crc = crc32c::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(seg_path(&tmp.0, 1), h).unwrap();
        let Err(e) = Spool::open(opts(&tmp.0)) else { panic!("opened") };
        assert!(e.to_string().contains("version 99"), "{e}");
        assert_eq!(std::fs::read(seg_path(&tmp.0, 1)).unwrap(), h);
    }

    #[test]
    fn detached_commit_covers_its_batch_and_appends_go_on_meanwhile() {
        let dir = TempDir::new("job");
        let (mut spool, _) = Spool::open(opts(&dir.0)).unwrap();
        spool.append_message(QueueId(1), 1, &env(&["a@x.example"]), b"first\r\n").unwrap();
        let job = spool.begin_commit().unwrap().expect("a job for the first batch");
        assert!(spool.commit_in_flight());
        assert!(spool.begin_commit().unwrap().is_none(), "one job at a time");
        assert!(spool.commit().is_err(), "no synchronous commit under a job");
        // Appends during the sync belong to the next batch.
        spool.append_message(QueueId(2), 2, &env(&["b@x.example"]), b"second\r\n").unwrap();
        let result = std::thread::spawn(move || job.run()).join().unwrap();
        spool.finish_commit(result).unwrap();
        assert!(spool.has_uncommitted(), "the second message still needs a commit");
        let job = spool.begin_commit().unwrap().unwrap();
        spool.finish_commit(job.run()).unwrap();
        assert!(!spool.has_uncommitted() && !spool.commit_in_flight());
        drop(spool);
        let (_, rec) = Spool::open(opts(&dir.0)).unwrap();
        assert_eq!(rec.messages.iter().map(|m| m.id.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn failed_detached_commit_abandons_both_batches() {
        let dir = TempDir::new("jobfail");
        let (mut spool, _) = Spool::open(opts(&dir.0)).unwrap();
        let (_, loc1) = spool.append_message(QueueId(1), 1, &env(&["a@x.example"]), b"one\r\n").unwrap();
        let _job = spool.begin_commit().unwrap().unwrap();
        spool.append_message(QueueId(2), 2, &env(&["b@x.example"]), b"two\r\n").unwrap();
        let err = SpoolError::Io("sync spool segment", io::Error::other("injected"));
        assert!(spool.finish_commit(Err(err)).is_err());
        assert!(!spool.has_uncommitted() && !spool.commit_in_flight());
        // The spool goes on: the next append opens a new segment.
        let (_, loc3) = spool.append_message(QueueId(3), 3, &env(&["c@x.example"]), b"three\r\n").unwrap();
        assert_ne!(loc1.segment, loc3.segment);
        let job = spool.begin_commit().unwrap().unwrap();
        spool.finish_commit(job.run()).unwrap();
    }

    // -----------------------------------------------------------------------------------------
    // Simulated power loss

    /// What a power cut leaves of the spool directory, written to `into`: of every segment, the
    /// bytes up to its durable mark for sure; each 512-byte sector after it (up to what was
    /// appended) as written, as never written (zeros: segments are preallocated) or torn
    /// (garbage), in any combination, since the kernel writes dirty pages back in any order
    /// before a sync; a segment whose creation was never synced may be missing. Unlinks are
    /// taken as durable at once (the harsher case: a file that comes back only adds data).
    fn power_cut(spool: &Spool, into: &Path, pick: &mut impl FnMut() -> u8) {
        std::fs::create_dir_all(into).unwrap();
        for slot in spool.segments.values() {
            let seg = &slot.seg;
            if seg.synced() == 0 && pick().is_multiple_of(2) {
                continue;
            }
            let mut bytes = std::fs::read(seg.path()).unwrap();
            let mut at = seg.synced();
            let end = seg.used().min(bytes.len());
            while at < end {
                let next = ((at / 512 + 1) * 512).min(end);
                match pick() % 3 {
                    0 => {}
                    1 => bytes[at..next].fill(0),
                    _ => bytes[at..next].iter_mut().for_each(|b| *b = pick()),
                }
                at = next;
            }
            std::fs::write(into.join(seg.path().file_name().unwrap()), bytes).unwrap();
        }
    }

    /// One step of the relay's use of the spool, as the power-loss property drives it.
    #[derive(Clone, Debug)]
    enum Step {
        /// A client's message: append, commit, then (the `250`) it counts as acknowledged.
        Accept { rcpts: u8, size: u16 },
        /// A delivery outcome for one open recipient of an acknowledged message; `fail`
        /// appends a DSN first, as delivery does.
        Settle { msg: u8, fail: bool, dsn_size: u16 },
        /// A group commit, detached (sync thread) or not.
        Commit { detached: bool },
    }

    fn arb_step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (1u8..4, 0u16..20_000).prop_map(|(rcpts, size)| Step::Accept { rcpts, size }),
            (any::<u8>(), any::<bool>(), 0u16..3000).prop_map(|(msg, fail, dsn_size)| Step::Settle {
                msg,
                fail,
                dsn_size
            }),
            any::<bool>().prop_map(|detached| Step::Commit { detached }),
        ]
    }

    /// The model's view of one message.
    struct Model {
        id: QueueId,
        seg: u64,
        rcpts: usize,
        /// Recipients with an outcome appended: (rcpt, DSN id for a failure).
        settled: Vec<(u32, Option<QueueId>)>,
        outcome_segments: Vec<u64>,
    }

    fn commit_step(spool: &mut Spool, detached: bool, dsns: &mut Vec<QueueId>, pending: &mut Vec<QueueId>) {
        if detached {
            if let Some(job) = spool.begin_commit().unwrap() {
                job.run().unwrap();
                spool.finish_commit(Ok(())).unwrap();
            }
        } else {
            spool.commit().unwrap();
        }
        dsns.append(pending);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Power is cut after any sequence of appends, outcomes, DSNs, releases and commits:
        /// every acknowledged message is recovered unless each of its recipients was settled
        /// (and then the DSN of each failure is recovered), and every DSN whose commit returned
        /// is recovered. Nothing less is allowed.
        #[test]
        fn prop_power_loss_keeps_every_promise(
            steps in proptest::collection::vec(arb_step(), 1..40),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 64..4096),
        ) {
            let tmp = TempDir::new("powercut");
            let live = tmp.0.join("live");
            let o = SpoolOptions { segment_size: 24 * 1024, ..opts(&live) };
            let (mut spool, _) = Spool::open(o).unwrap();
            let mut msgs: Vec<Model> = Vec::new();
            let mut dsns: Vec<QueueId> = Vec::new(); // durable DSNs
            let mut pending_dsns: Vec<QueueId> = Vec::new();
            let mut next_id = 1u64;
            for step in &steps {
                match *step {
                    Step::Accept { rcpts, size } => {
                        let names: Vec<String> = (0..rcpts).map(|r| format!("r{r}@x.example")).collect();
                        let names: Vec<&str> = names.iter().map(String::as_str).collect();
                        let body = vec![b'm'; size as usize];
                        let id = QueueId(next_id);
                        next_id += 1;
                        let (_, loc) = spool.append_message(id, 0, &env(&names), &body).unwrap();
                        commit_step(&mut spool, next_id.is_multiple_of(2), &mut dsns, &mut pending_dsns);
                        msgs.push(Model {
                            id, seg: loc.segment, rcpts: rcpts as usize,
                            settled: Vec::new(), outcome_segments: Vec::new(),
                        });
                    }
                    Step::Settle { msg, fail, dsn_size } => {
                        let open: Vec<usize> = (0..msgs.len()).filter(|&i| msgs[i].settled.len() < msgs[i].rcpts).collect();
                        let Some(&i) = open.get(msg as usize % open.len().max(1)) else { continue };
                        let rcpt = msgs[i].settled.len() as u32;
                        let mut dsn = None;
                        if fail {
                            let b = QueueId(next_id);
                            next_id += 1;
                            let dsn_body = vec![b'd'; dsn_size as usize];
                            spool.append_generated_message(b, 0, &env(&["sender@y.example"]), &dsn_body).unwrap();
                            pending_dsns.push(b);
                            dsn = Some(b);
                        }
                        let status = if fail { RcptStatus::Failed } else { RcptStatus::Delivered };
                        let p = spool.append_outcome(msgs[i].id, rcpt, &Outcome { bounce: dsn, ..outcome(status) }).unwrap();
                        let m = &mut msgs[i];
                        m.settled.push((rcpt, dsn));
                        m.outcome_segments.push(p.segment);
                        if m.settled.len() == m.rcpts {
                            spool.release_message(m.seg, Pins(m.outcome_segments.clone()));
                        }
                    }
                    Step::Commit { detached } => {
                        commit_step(&mut spool, detached, &mut dsns, &mut pending_dsns)
                    }
                }
            }
            let mut n = 0usize;
            let mut pick = || { n += 1; noise[n % noise.len()] ^ (n / noise.len()) as u8 };
            let image = tmp.0.join("image");
            power_cut(&spool, &image, &mut pick);
            drop(spool);
            let (after, rec) = Spool::open(opts(&image)).unwrap();
            let found: std::collections::HashSet<u64> = rec.messages.iter().map(|m| m.id.0).collect();
            // Recovery cuts, quarantines and deletes; power may fail right after it too. A
            // second recovery of what the first left finds the same queue.
            drop(after);
            let (_again, rec2) = Spool::open(opts(&image)).unwrap();
            let again: std::collections::HashSet<u64> = rec2.messages.iter().map(|m| m.id.0).collect();
            proptest::prop_assert_eq!(&again, &found, "a second recovery differs: {:?}", rec2.warnings);
            for m in &msgs {
                if found.contains(&m.id.0) {
                    continue;
                }
                // Gone: only allowed when every recipient had a final outcome (a delivery that
                // happened; its record may have reached the disk before its commit)...
                proptest::prop_assert_eq!(m.settled.len(), m.rcpts, "message {} lost: {:?}", m.id, rec.warnings);
                // ...and the DSN of every failure survived with it.
                for (_, dsn) in &m.settled {
                    if let Some(b) = dsn {
                        proptest::prop_assert!(found.contains(&b.0), "DSN {} of {} lost: {:?}", b, m.id, rec.warnings);
                    }
                }
            }
            for b in &dsns {
                proptest::prop_assert!(found.contains(&b.0), "durable DSN {} lost", b);
            }
        }
    }
}
