//! Startup scan: validate every record, cut torn tails, rebuild the queue and the per-segment
//! reclamation counters.
//!
//! Owns the tail-corruption policy. At each 8-aligned record position of a segment:
//! - a valid record (frame, crc and payload structure) is applied;
//! - a zero word followed only by zeros is the clean end (preallocated, never written);
//! - a sound header (this segment's salted magic and its own header check) whose payload
//!   fails is damage of exactly the length that header states: skipped as a whole, never
//!   searched, because its bytes are a client's and may imitate records;
//! - anything else is bad, of unknown length: the next valid record is searched for (at 8-byte
//!   alignment, by the segment's salted magic, which a client cannot know).
//!
//! Damage with a valid record after it is a **corrupt middle** record: skipped, with a warning
//! naming file and offset. Damage with nothing valid after it is a **torn tail** (a crash during
//! an append whose commit never returned): warned about and cut off the file. Either way the
//! damaged bytes are first copied to `corrupt/` in the spool directory (the quarantine), so
//! nothing is destroyed that an operator may want to look at.
//!
//! The writable path ([`recover`]) then deletes segments that hold nothing still needed. The
//! read-only path ([`scan_read_only`]) reads files with plain `read` (a map could fault if the
//! relay truncates a file while we look at it), never changes anything, and treats damage at
//! the end of the newest segment as the end (the relay may be appending there); damage with
//! valid records after it is reported there too, and the scan goes on.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use memchr::memmem;

use super::format::{self, FormatError, MessageSummary, OutcomeRecord, Probe, RecordKey, RecordKind};
use super::segment::{map_io_at, Segment};
use super::{MessageLoc, Pins, RcptState, RcptStatus, Recovery, SpoolError, StoredMessage};
use crate::message::QueueId;

/// Subdirectory of the spool that receives copies of damaged bytes (see [`quarantine`]).
pub const QUARANTINE_DIR: &str = "corrupt";

/// A segment kept by recovery, with its reclamation counters (see `Spool::release_message`).
pub(crate) struct KeptSegment {
    /// The segment, mapped read-only and cut to its valid length.
    pub(crate) seg: Segment,
    /// Messages in it with a recipient not final.
    pub(crate) live: u32,
    /// Outcome records in it that must outlive their message's record.
    pub(crate) pins: u32,
    /// Later segments holding pins on behalf of finished messages in this one; each loses one
    /// pin when this segment is deleted.
    pub(crate) deferred: Vec<u64>,
}

/// What the writable open hands to the spool.
pub(crate) struct Recovered {
    /// What the relay sees.
    pub(crate) recovery: Recovery,
    /// Surviving segments in sequence order.
    pub(crate) segments: Vec<KeptSegment>,
    /// Highest sequence number of any segment file found (deleted ones included).
    pub(crate) max_seq: u64,
}

/// One valid record found by the scan.
enum Item<'a> {
    Message { off: usize, len: usize, summary: MessageSummary },
    Outcome { off: usize, rec: OutcomeRecord<'a> },
}

/// The valid records of one segment and where its valid data ends.
struct Scan<'a> {
    items: Vec<Item<'a>>,
    /// Offset the file should be cut to (end of the last valid record, or the clean end).
    end: usize,
    /// Byte ranges skipped or cut as damaged, for the quarantine copy.
    damage: Vec<(usize, usize)>,
}

/// What lies at one record position, judged down to the payload structure.
enum At<'a> {
    /// Zero word: nothing was written here.
    End,
    /// A valid record and its length.
    Item(Item<'a>, usize),
    /// A header of this segment that passes its own check, with a payload that does not: the
    /// damage is exactly the `usize` bytes the header states.
    Damaged(usize, FormatError),
    /// Not a header of this segment: how far the damage goes is unknown.
    Bad(FormatError),
}

fn parse_at<'a>(bytes: &'a [u8], off: usize, key: &RecordKey) -> At<'a> {
    let raw = match format::probe_record(bytes, off, key) {
        Probe::Zero => return At::End,
        Probe::Bad(e) => return At::Bad(e),
        Probe::Damaged { len, err } => return At::Damaged(len, err),
        Probe::Record(raw) => raw,
    };
    let item = match raw.kind {
        RecordKind::Message => {
            format::message_summary(raw.payload).map(|summary| Item::Message { off, len: raw.len, summary })
        }
        RecordKind::Outcome => format::decode_outcome(raw.payload, raw.version).map(|rec| Item::Outcome { off, rec }),
    };
    match item {
        Ok(item) => At::Item(item, raw.len),
        // The checksum held, so the header's length is sound: the damage is this record.
        Err(e) => At::Damaged(raw.len, e),
    }
}

/// The first offset at or after `from` (8-aligned) holding a fully valid record of this
/// segment. Only used where no trustworthy header says how long the damage is; the magic and
/// checksums are salted per segment, so a client's bytes in a damaged record never match.
fn next_valid(bytes: &[u8], from: usize, key: &RecordKey) -> Option<usize> {
    let from = from.checked_next_multiple_of(format::RECORD_ALIGN)?;
    let hay = bytes.get(from..)?;
    memmem::find_iter(hay, &key.magic)
        .map(|pos| from + pos)
        .filter(|abs| abs % format::RECORD_ALIGN == 0)
        .find(|&abs| matches!(parse_at(bytes, abs, key), At::Item(..)))
}

/// End of the last non-zero byte of `bytes` (0 when all are zero). Cold path: recovery only.
fn nonzero_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// Walks the records of one segment (`bytes` from the start of the file, records from `start`)
/// and applies the tail policy of the module doc. `tolerant` (the newest segment in a
/// read-only scan, which the relay may be appending to) turns damage that no valid record
/// follows into the end, without a warning.
fn scan_segment<'a>(
    bytes: &'a [u8],
    start: usize,
    key: &RecordKey,
    name: &str,
    tolerant: bool,
    warnings: &mut Vec<String>,
) -> Scan<'a> {
    let mut items = Vec::new();
    let mut damage = Vec::new();
    let mut off = start;
    // Everything from here on is zeros (preallocated, never written); found once per segment.
    let data_end = nonzero_end(bytes);
    loop {
        // Where the damage at `off` ends, if a trustworthy header says so.
        let (stated_end, reason) = match parse_at(bytes, off, key) {
            At::Item(item, len) => {
                items.push(item);
                off += len;
                continue;
            }
            At::End => {
                if tolerant || off >= data_end {
                    return Scan { items, end: off.min(bytes.len()), damage };
                }
                // Never-written space is all zeros; data after a zero header means the header
                // itself was lost.
                (None, FormatError::BadMagic)
            }
            At::Damaged(len, e) => (Some(off + len), e),
            At::Bad(e) => (None, e),
        };
        let next = match stated_end {
            // Never search inside the extent a sound header claims: those are a client's bytes.
            Some(end) if end < data_end => Some(end),
            Some(_) => None,
            None => next_valid(bytes, off + format::RECORD_ALIGN, key),
        };
        match next {
            Some(next) => {
                // In a tolerant scan a sound record follows, so this is damage, not a tail
                // being written: report it too (`sluice queue` must not stop silently here).
                warnings.push(format!(
                    "{name}: corrupt record at offset {off} ({reason}); skipped {} bytes to the \
                     next record at offset {next}",
                    next - off
                ));
                damage.push((off, next));
                off = next;
            }
            None if tolerant => return Scan { items, end: off, damage },
            None => {
                let torn = stated_end.unwrap_or(data_end.max(off)).min(bytes.len());
                warnings.push(format!("{name}: torn tail at offset {off} ({reason}); {} bytes cut", bytes.len() - off));
                damage.push((off, torn));
                return Scan { items, end: off, damage };
            }
        }
    }
}

/// Recipient and message state rebuilt from records in spool order.
#[derive(Default)]
struct State {
    msgs: Vec<MsgState>,
    by_id: HashMap<u64, usize>,
    max_id: Option<QueueId>,
    warnings: Vec<String>,
}

struct MsgState {
    id: QueueId,
    loc: MessageLoc,
    arrival_ms: u64,
    rcpts: Vec<RcptState>,
    outcome_segments: Vec<u64>,
}

impl MsgState {
    fn finished(&self) -> bool {
        self.rcpts.iter().all(|r| matches!(r.status, RcptStatus::Delivered | RcptStatus::Failed))
    }
}

/// Which records of one segment refer to which messages (indices into `State::msgs`).
struct SegRefs {
    msgs: Vec<usize>,
    outcomes: Vec<usize>,
}

impl State {
    fn observe(&mut self, id: QueueId) {
        self.max_id = self.max_id.max(Some(id));
    }

    fn apply(&mut self, seq: u64, name: &str, items: Vec<Item<'_>>) -> SegRefs {
        let mut refs = SegRefs { msgs: Vec::new(), outcomes: Vec::new() };
        for item in items {
            match item {
                Item::Message { off, len, summary } => {
                    self.observe(summary.id);
                    // Ids are unique by construction (IdGen); a repeat can only be damage or a
                    // copied file, and the first record is the one outcomes were written for.
                    if self.by_id.contains_key(&summary.id.0) {
                        self.warnings.push(format!("{name}: duplicate message {} at offset {off} ignored", summary.id));
                        continue;
                    }
                    let idx = self.msgs.len();
                    self.by_id.insert(summary.id.0, idx);
                    let queued = RcptState {
                        status: RcptStatus::Queued,
                        attempts: 0,
                        next_attempt_ms: 0,
                        last_reply: Vec::new(),
                    };
                    self.msgs.push(MsgState {
                        id: summary.id,
                        loc: MessageLoc { segment: seq, offset: off as u64, len: len as u64 },
                        arrival_ms: summary.arrival_ms,
                        rcpts: vec![queued; summary.rcpt_count as usize],
                        outcome_segments: Vec::new(),
                    });
                    refs.msgs.push(idx);
                }
                Item::Outcome { off, rec } => {
                    self.observe(rec.id);
                    // Unknown id: the message was finished and its segment reclaimed.
                    let Some(&idx) = self.by_id.get(&rec.id.0) else {
                        continue;
                    };
                    // A failure whose DSN (written before it) did not survive is not final: a
                    // power loss kept this record but not that one. Retrying bounces again.
                    // (When the DSN was delivered and its segment reclaimed, this costs a
                    // second DSN: a duplicate, never a loss.)
                    let lost_dsn = rec.outcome.bounce.filter(|b| !self.by_id.contains_key(&b.0));
                    let msg = &mut self.msgs[idx];
                    let Some(r) = msg.rcpts.get_mut(rec.rcpt as usize) else {
                        self.warnings.push(format!(
                            "{name}: outcome at offset {off} names recipient {} of message {}, \
                             which has {}; ignored",
                            rec.rcpt,
                            rec.id,
                            msg.rcpts.len()
                        ));
                        continue;
                    };
                    // Records are applied in spool order, which is the order the relay wrote
                    // them in: the latest outcome for a recipient is its state.
                    r.status = rec.outcome.status;
                    r.attempts = rec.outcome.attempts;
                    r.next_attempt_ms = rec.outcome.next_attempt_ms;
                    r.last_reply.clear();
                    r.last_reply.extend_from_slice(rec.outcome.reply);
                    if let Some(b) = lost_dsn {
                        r.status = RcptStatus::Deferred;
                        r.next_attempt_ms = 0;
                        self.warnings.push(format!(
                            "{name}: the failure of recipient {} of message {} at offset {off} names \
                             DSN {b}, which is not in the spool; the recipient is retried",
                            rec.rcpt, rec.id
                        ));
                    }
                    msg.outcome_segments.push(seq);
                    refs.outcomes.push(idx);
                }
            }
        }
        refs
    }

    fn into_recovery(self) -> Recovery {
        let messages = self
            .msgs
            .into_iter()
            .filter(|m| !m.finished())
            .map(|m| StoredMessage {
                id: m.id,
                loc: m.loc,
                arrival_ms: m.arrival_ms,
                rcpts: m.rcpts,
                pins: Pins(m.outcome_segments),
            })
            .collect();
        Recovery { messages, max_id: self.max_id, warnings: self.warnings }
    }
}

/// Segment files in `dir`, in sequence order.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let rd = std::fs::read_dir(dir).map_err(|e| map_io_at("read spool directory", dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| map_io_at("read spool directory", dir, e))?;
        let name = entry.file_name();
        if let Some(seq) = name.to_str().and_then(format::parse_segment_file_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort_unstable_by_key(|&(seq, _)| seq);
    Ok(out)
}

/// Checks the segment header and returns how the segment's records are framed and where they
/// start. A version from another build is fatal: its records must not be judged (and cut) by
/// this build's rules. `None` (with a warning) when neither copy of the header can be read:
/// without its salt no record of the segment can be told from a client's bytes, so the caller
/// leaves the file alone (copied to the quarantine) rather than guess.
fn check_header(
    bytes: &[u8],
    seq: u64,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<(RecordKey, usize)>, SpoolError> {
    match format::decode_segment_header(bytes) {
        Ok(h) => {
            if h.seq != seq {
                warnings.push(format!("{name}: header names segment {}; file name wins", h.seq));
            }
            Ok(Some((h.key, h.len)))
        }
        Err(FormatError::UnsupportedVersion(v)) => Err(SpoolError::Io(
            "open segment",
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name}: segment format version {v} is not supported by this build"),
            ),
        )),
        // A segment created just before a crash may never have had its header written: it
        // holds nothing (and is removed as empty).
        Err(_) if nonzero_end(bytes) == 0 => Ok(Some((RecordKey::LEGACY, bytes.len()))),
        Err(e) => {
            warnings.push(format!(
                "{name}: both copies of the segment header are unreadable ({e}); the segment is left \
                 as it is and not recovered"
            ));
            Ok(None)
        }
    }
}

/// Copies each damaged range of segment `name` (trailing zeros left out) to
/// `<dir>/corrupt/<name>.<offset>`, as Postfix moves damaged queue files to `corrupt/`, so that
/// nothing recovery skips or cuts is destroyed. Made durable before the caller cuts anything.
fn quarantine(dir: &Path, name: &str, bytes: &[u8], damage: &[(usize, usize)], warnings: &mut Vec<String>) -> bool {
    let qdir = dir.join(QUARANTINE_DIR);
    let mut all = true;
    for &(start, end) in damage {
        let Some(range) = bytes.get(start..end) else { continue };
        let range = &range[..nonzero_end(range)];
        if range.is_empty() {
            continue;
        }
        let path = qdir.join(format!("{name}.{start}"));
        let written = std::fs::create_dir_all(&qdir)
            .and_then(|()| {
                let mut f = std::fs::File::create(&path)?;
                f.write_all(range)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::File::open(&qdir)?.sync_all());
        match written {
            Ok(()) => warnings.push(format!(
                "{name}: {} damaged bytes from offset {start} copied to {}",
                range.len(),
                path.display()
            )),
            Err(e) => {
                all = false;
                warnings.push(format!("{name}: could not copy damaged bytes to {}: {e}", path.display()));
            }
        }
    }
    all
}

/// The writable open: scans every segment, applies outcomes, cuts torn tails and deletes
/// segments holding nothing still needed. The caller holds the directory lock.
pub(crate) fn recover(dir: &Path) -> Result<Recovered, SpoolError> {
    let files = list_segments(dir)?;
    let max_seq = files.last().map_or(0, |&(seq, _)| seq);
    let mut st = State::default();
    let mut found: Vec<(Segment, SegRefs, usize)> = Vec::with_capacity(files.len());
    for (seq, path) in files {
        let mut seg = Segment::open(&path, seq)?;
        let name = seg.name();
        let Some((key, start)) = check_header(seg.bytes(), seq, &name, &mut st.warnings)? else {
            // Kept in place (and its sequence number stays taken), copied for the operator.
            quarantine(dir, &name, seg.bytes(), &[(0, seg.bytes().len())], &mut st.warnings);
            continue;
        };
        seg.set_key(key);
        let bytes = seg.bytes();
        let scan = scan_segment(bytes, start, &key, &name, false, &mut st.warnings);
        // Nothing is cut that could not first be copied (a full disk, say).
        let end = if quarantine(dir, &name, bytes, &scan.damage, &mut st.warnings) { scan.end } else { bytes.len() };
        let refs = st.apply(seq, &name, scan.items);
        found.push((seg, refs, end));
    }

    // Decide in sequence order which segments to keep. An outcome always lies in the same or
    // a later segment than its message, so the fate of a message's segment is known by the
    // time its outcomes are judged.
    let mut deleted: HashMap<u64, bool> = HashMap::with_capacity(found.len());
    let mut kept: Vec<KeptSegment> = Vec::new();
    let mut deferred_by_seq: HashMap<u64, Vec<u64>> = HashMap::new();
    for (seg, refs, end) in found {
        let seq = seg.seq();
        let live = refs.msgs.iter().filter(|&&i| !st.msgs[i].finished()).count() as u32;
        let mut pins = 0u32;
        for &i in &refs.outcomes {
            let msg = &st.msgs[i];
            let msg_seq = msg.loc.segment;
            if !msg.finished() {
                // Released by the relay through `outcome_segments`.
                pins += 1;
            } else if msg_seq != seq && !deleted.get(&msg_seq).copied().unwrap_or(true) {
                // The finished message's record survives (its segment has other live
                // messages); without this outcome it would be delivered again after the next
                // restart, so keep it until that segment goes.
                pins += 1;
                deferred_by_seq.entry(msg_seq).or_default().push(seq);
            }
        }
        let delete = live == 0 && pins == 0;
        deleted.insert(seq, delete);
        if delete {
            if let Err(e) = seg.remove() {
                st.warnings.push(format!("could not remove a finished segment: {e}"));
            }
            continue;
        }
        let mut seg = seg;
        if end < seg.used() {
            if let Err(e) = seg.truncate(end) {
                st.warnings.push(format!("{}: could not cut at offset {end}: {e}", seg.name()));
            }
        }
        kept.push(KeptSegment { seg, live, pins, deferred: Vec::new() });
    }
    for k in &mut kept {
        if let Some(d) = deferred_by_seq.remove(&k.seg.seq()) {
            k.deferred = d;
        }
    }
    Ok(Recovered { recovery: st.into_recovery(), segments: kept, max_seq })
}

/// Reads every segment with plain `read` and hands each one's valid records to `visit`;
/// returns the warnings. Never changes the directory.
fn read_only_pass(
    dir: &Path,
    warnings: &mut Vec<String>,
    mut visit: impl FnMut(u64, &str, &[u8], &RecordKey, Vec<Item<'_>>),
) -> Result<(), SpoolError> {
    let files = list_segments(dir)?;
    let last = files.len().saturating_sub(1);
    for (i, (seq, path)) in files.into_iter().enumerate() {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            // Reclaimed by the relay between listing and reading.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(map_io_at("read segment", &path, e)),
        };
        let name = format::segment_file_name(seq);
        // The newest segment may be one the relay is creating or appending to right now.
        let tolerant = i == last;
        if tolerant && format::decode_segment_header(&bytes).is_err() {
            // Being created right now: nothing in it is committed yet.
            continue;
        }
        let Some((key, start)) = check_header(&bytes, seq, &name, warnings)? else { continue };
        let scan = scan_segment(&bytes, start, &key, &name, tolerant, warnings);
        visit(seq, &name, &bytes, &key, scan.items);
    }
    Ok(())
}

/// The read-only scan for `sluice queue`: same validation, no changes to the directory.
pub(crate) fn scan_read_only(dir: &Path) -> Result<Recovery, SpoolError> {
    let mut st = State::default();
    let mut warnings = Vec::new();
    read_only_pass(dir, &mut warnings, |seq, name, _, _, items| {
        st.apply(seq, name, items);
    })?;
    st.warnings.append(&mut warnings);
    Ok(st.into_recovery())
}

/// Every message record in the directory (finished or not) as (id, body), in spool order,
/// read without changing anything. A duplicate id keeps its first record, as recovery does.
pub(crate) fn read_messages(dir: &Path) -> Result<Vec<(QueueId, Vec<u8>)>, SpoolError> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut warnings = Vec::new();
    read_only_pass(dir, &mut warnings, |_, _, bytes, key, items| {
        for item in items {
            let Item::Message { off, summary, .. } = item else {
                continue;
            };
            if !seen.insert(summary.id.0) {
                continue;
            }
            // The scan validated this record, so decoding it again cannot fail; skip if it does.
            let view = format::record_at(bytes, off, key).and_then(|raw| format::decode_message(raw.payload));
            if let Ok(view) = view {
                out.push((summary.id, view.body.to_vec()));
            }
        }
    })?;
    Ok(out)
}

/// The read-only scan plus each queued message's envelope, for `sluice queue list`.
pub(crate) fn queue_listing(dir: &Path) -> Result<(Recovery, Vec<crate::message::Envelope>), SpoolError> {
    let rec = scan_read_only(dir)?;
    let wanted: std::collections::HashMap<u64, usize> =
        rec.messages.iter().enumerate().map(|(i, m)| (m.id.0, i)).collect();
    let mut envelopes = vec![crate::message::Envelope::default(); rec.messages.len()];
    let mut warnings = Vec::new();
    read_only_pass(dir, &mut warnings, |_, _, bytes, key, items| {
        for item in items {
            let Item::Message { off, summary, .. } = item else {
                continue;
            };
            let Some(&i) = wanted.get(&summary.id.0) else {
                continue;
            };
            if let Ok(view) = format::record_at(bytes, off, key).and_then(|raw| format::decode_message(raw.payload)) {
                envelopes[i] = view.envelope;
            }
        }
    })?;
    Ok((rec, envelopes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Envelope;

    const KEY: RecordKey = RecordKey { magic: *b"s4lt", seed: 0xDEAD_BEEF, version: 2 };
    const START: usize = format::SEGMENT_HEADER_LEN;

    fn segment_bytes(records: &[Vec<u8>]) -> Vec<u8> {
        let mut out = format::encode_segment_header(1, &KEY).to_vec();
        for r in records {
            out.extend_from_slice(r);
        }
        out
    }

    fn record_with(key: &RecordKey, id: u64, rcpt: &[u8], body: &[u8]) -> Vec<u8> {
        let mut env = Envelope::default();
        env.push_rcpt(rcpt, b"", 0);
        let len = format::message_record_len(&env, body).unwrap();
        let mut buf = vec![0u8; len];
        format::encode_message(&mut buf, key, QueueId(id), 0, &env, body).unwrap();
        buf
    }

    fn msg_record(id: u64, body: &[u8]) -> Vec<u8> {
        record_with(&KEY, id, b"a@example.org", body)
    }

    fn scan<'a>(bytes: &'a [u8], tolerant: bool, w: &mut Vec<String>) -> Scan<'a> {
        scan_segment(bytes, START, &KEY, "seg-x", tolerant, w)
    }

    fn ids(scan: &Scan<'_>) -> Vec<u64> {
        scan.items
            .iter()
            .map(|i| match i {
                Item::Message { summary, .. } => summary.id.0,
                Item::Outcome { rec, .. } => rec.id.0,
            })
            .collect()
    }

    #[test]
    fn clean_segment_with_zero_tail() {
        let mut bytes = segment_bytes(&[msg_record(1, b"x"), msg_record(2, b"yy")]);
        let used = bytes.len();
        bytes.resize(used + 4096, 0);
        let mut w = Vec::new();
        let scan = scan(&bytes, false, &mut w);
        assert_eq!(ids(&scan), [1, 2]);
        assert_eq!(scan.end, used);
        assert!(w.is_empty() && scan.damage.is_empty());
    }

    #[test]
    fn corrupt_middle_is_skipped_and_torn_tail_cut() {
        let r1 = msg_record(1, b"first");
        let r2 = msg_record(2, b"second");
        let r3 = msg_record(3, b"third");
        let mut bytes = segment_bytes(&[r1.clone(), r2.clone(), r3]);
        let off2 = START + r1.len();
        bytes[off2 + 20] ^= 0xFF;
        let mut w = Vec::new();
        let scan1 = scan(&bytes, false, &mut w);
        assert_eq!(ids(&scan1), [1, 3]);
        assert_eq!(scan1.damage, [(off2, off2 + r2.len())]);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("seg-x") && w[0].contains(&format!("offset {off2}")), "{w:?}");

        // Damage the last record instead: a torn tail.
        let mut bytes = segment_bytes(&[r1.clone(), r2.clone()]);
        let n = bytes.len();
        bytes[n - 3] ^= 1;
        let mut w = Vec::new();
        let scan2 = scan(&bytes, false, &mut w);
        assert_eq!(ids(&scan2), [1]);
        assert_eq!(scan2.end, off2);
        assert_eq!(scan2.damage, [(off2, n)]);
        assert!(w[0].contains("torn tail") && w[0].contains(&format!("offset {off2}")));

        // The same in a tolerant scan is the silent end.
        let mut w = Vec::new();
        let scan3 = scan(&bytes, true, &mut w);
        assert_eq!((ids(&scan3), scan3.end), (vec![1], off2));
        assert!(w.is_empty());
    }

    #[test]
    fn a_tolerant_scan_reports_and_passes_damage_with_records_after_it() {
        // `sluice queue list` beside a relay: damage in the middle of the newest segment must
        // not end the listing silently.
        let r1 = msg_record(1, b"first");
        let mut bytes = segment_bytes(&[r1.clone(), msg_record(2, b"second"), msg_record(3, b"third")]);
        bytes[START + r1.len() + 1] ^= 0xFF; // the magic: a bad header, found again by search
        let mut w = Vec::new();
        assert_eq!(ids(&scan(&bytes, true, &mut w)), [1, 3]);
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn zero_header_followed_by_data_is_not_the_end() {
        let r1 = msg_record(1, b"first");
        let r2 = msg_record(2, b"second");
        let r3 = msg_record(3, b"third");
        let mut bytes = segment_bytes(&[r1.clone(), r2.clone(), r3]);
        let off2 = START + r1.len();
        bytes[off2..off2 + 4].fill(0);
        let mut w = Vec::new();
        let scan = scan(&bytes, false, &mut w);
        assert_eq!(ids(&scan), [1, 3]);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn record_inside_a_body_is_not_found_while_the_frame_is_valid() {
        // A body that embeds a complete record is skipped over as part of its container.
        let inner = msg_record(9, b"inner");
        let outer = msg_record(1, &inner);
        let bytes = segment_bytes(&[outer]);
        let mut w = Vec::new();
        assert_eq!(ids(&scan(&bytes, false, &mut w)), [1]);
    }

    /// The forgery of the review: a client embeds records in its body (a postmaster message
    /// anyone may send); one flipped bit in that body, or a crash between payload and header,
    /// must never bring them to life.
    #[test]
    fn records_forged_inside_a_damaged_body_never_come_to_life() {
        for forger in [KEY, RecordKey::LEGACY] {
            // Even a forger who knew this segment's salt (the first case) is stopped by the
            // sound header: its extent is skipped whole.
            let forged = record_with(&forger, 77, b"victim@elsewhere.example", b"forged\r\n");
            let mut body = b"Subject: hi\r\n\r\n".to_vec();
            while !body.len().is_multiple_of(8) {
                body.push(b'x');
            }
            for _ in 0..4 {
                body.extend_from_slice(&forged);
            }
            let r1 = msg_record(1, b"before");
            let outer = msg_record(2, &body);
            let r3 = msg_record(3, b"after");
            let clean = segment_bytes(&[r1.clone(), outer.clone(), r3]);
            let off2 = START + r1.len();
            // A bit flipped in the outer payload (its header stays sound).
            let mut bytes = clean.clone();
            bytes[off2 + outer.len() - 40] ^= 4;
            let mut w = Vec::new();
            let s = scan(&bytes, false, &mut w);
            assert_eq!(ids(&s), [1, 3], "{forger:?}: {w:?}");
            assert_eq!(s.damage, [(off2, off2 + outer.len())]);
            // The outer header itself damaged: only the salted search can resync, and a
            // forger without the salt cannot be found by it.
            if forger == RecordKey::LEGACY {
                for at in [0, 5, 9] {
                    let mut bytes = clean.clone();
                    bytes[off2 + at] ^= 0x40;
                    let mut w = Vec::new();
                    let s = scan(&bytes, false, &mut w);
                    assert_eq!(ids(&s), [1, 3], "flip at {at}: {w:?}");
                }
            }
        }
    }

    #[test]
    fn legacy_segments_are_still_recovered() {
        let mut bytes = format::encode_legacy_segment_header(1).to_vec();
        bytes.extend_from_slice(&record_with(&RecordKey::LEGACY, 5, b"a@example.org", b"old"));
        let (key, start) = check_header(&bytes, 1, "s", &mut Vec::new()).unwrap().unwrap();
        assert_eq!((key, start), (RecordKey::LEGACY, 32));
        let mut w = Vec::new();
        let s = scan_segment(&bytes, start, &key, "s", false, &mut w);
        assert_eq!(ids(&s), [5]);
        assert!(w.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn prop_scan_never_panics(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            cut in 0usize..200,
            tolerant in proptest::prelude::any::<bool>(),
        ) {
            let mut bytes = segment_bytes(&[msg_record(1, b"a"), msg_record(2, b"b")]);
            bytes.truncate(bytes.len().saturating_sub(cut));
            bytes.extend_from_slice(&tail);
            let mut w = Vec::new();
            let scan = scan(&bytes, tolerant, &mut w);
            proptest::prop_assert!(scan.end <= bytes.len().max(START));
            for &(a, b) in &scan.damage {
                proptest::prop_assert!(a <= b && b <= bytes.len());
            }
        }
    }
}
