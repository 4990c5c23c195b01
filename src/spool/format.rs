//! Pure: the on-disk layout of spool segments and records, and its codec.
//!
//! Owns the byte layout (segment header, record framing, message and outcome payloads), the
//! crc32c checksums and the segment file names. It never does I/O, never reads the clock and
//! never panics on any input: every read is bounds-checked and returns a [`FormatError`].
//! Encoders write into a caller's slice of exactly [`message_record_len`] /
//! [`outcome_record_len`] bytes (the segment map, or for large records the segment's reused
//! staging buffer written with one `pwrite`), so no record is built piece by piece.
//!
//! All integers are little-endian. Records start at 8-byte aligned offsets; a zero word where a
//! record header would be marks the clean end of a segment (preallocated space reads as zeros).
//!
//! Why a per-segment salt (format version 2): crc32c has no secret, so a client could embed
//! well-formed records in a message body; a recovery that resynchronised inside a damaged
//! record would bring them to life. Every version-2 segment header carries a random salt: its
//! low half is the magic of every record in that segment, its high half seeds every record
//! checksum, so bytes a client chose cannot form a valid record (2^-64 per try). Each record
//! header also carries a check of its own ([`Probe::Damaged`]), so that a damaged payload
//! behind an intact header is skipped by its stated length, never searched. Version-1
//! segments (magic `SLRC`, unseeded crc, no header check) are still read.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::message::{BodyType, Envelope, QueueId, Ret};

use super::record::{MessageView, Outcome, RcptStatus};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SLUICESG";
/// Segment format version written by this build; [`LEGACY_VERSION`] is still read, any other
/// is refused, never rewritten.
pub const FORMAT_VERSION: u32 = 2;
/// The unsalted format of earlier builds.
pub const LEGACY_VERSION: u32 = 1;
/// Length of one copy of the segment header.
const HEADER_COPY_LEN: usize = 32;
/// Where the second copy of a version-2 header starts: the next 512-byte sector, so that one
/// lost or damaged sector does not lose the salt (hence every record of the segment).
const SECOND_COPY_AT: usize = 512;
/// Length of the segment header written by this build (two copies of the 32-byte header, in
/// different sectors); the first record starts here. Version-1 segments have one copy
/// ([`HEADER_COPY_LEN`]).
pub const SEGMENT_HEADER_LEN: usize = SECOND_COPY_AT + HEADER_COPY_LEN;
/// First bytes of every record header in a version-1 segment.
pub const LEGACY_RECORD_MAGIC: [u8; 4] = *b"SLRC";
/// Length of the record header that precedes each payload.
pub const RECORD_HEADER_LEN: usize = 16;
/// Records start at multiples of this (relative to the start of the file).
pub const RECORD_ALIGN: usize = 8;
/// Largest payload a record can carry (the length field is a u32; keep room for the header
/// and padding so the padded length still fits a u32).
pub const MAX_PAYLOAD_LEN: usize = u32::MAX as usize - RECORD_HEADER_LEN - RECORD_ALIGN;

const FILE_PREFIX: &str = "seg-";
const FILE_SUFFIX: &str = ".spool";
const FILE_SEQ_DIGITS: usize = 16;

/// Size of the fixed part of a message payload (id, arrival, flags, body type, ret, ip).
const MESSAGE_FIXED_LEN: usize = 8 + 8 + 1 + 1 + 1 + 1 + 16;
/// Size of the fixed part of an outcome payload.
const OUTCOME_FIXED_LEN: usize = 8 + 4 + 1 + 2 + 8 + 8;

const FLAG_SMTPUTF8: u8 = 1;
/// Message flag: a `source u16+bytes` field follows `auth_user` (the egress source chosen at
/// reception). Records written without sources (or before they existed) leave it clear and
/// have no such field, so they read as before.
const FLAG_SOURCE: u8 = 2;
const IP_V4: u8 = 4;
const IP_V6: u8 = 6;

/// What the records of one segment are framed with, from its header (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordKey {
    /// First bytes of every record header. Never a zero word, so a zero word can mean "end".
    pub magic: [u8; 4],
    /// Initial value of every record checksum.
    pub seed: u32,
    /// Record layout version: 1 (legacy: no header check) or 2.
    pub version: u8,
}

impl RecordKey {
    /// The record version this build writes.
    pub const CURRENT_VERSION: u8 = 2;

    /// The framing of version-1 segments.
    pub const LEGACY: RecordKey = RecordKey { magic: LEGACY_RECORD_MAGIC, seed: 0, version: 1 };

    /// The framing that `salt` gives a version-2 segment. `None` for a salt whose magic half
    /// is unusable (a zero word, or the legacy magic): draw another.
    pub fn from_salt(salt: u64) -> Option<RecordKey> {
        let magic = (salt as u32).to_le_bytes();
        if magic == [0; 4] || magic == LEGACY_RECORD_MAGIC {
            return None;
        }
        Some(RecordKey { magic, seed: (salt >> 32) as u32, version: RecordKey::CURRENT_VERSION })
    }

    fn salt(&self) -> u64 {
        u64::from(u32::from_le_bytes(self.magic)) | u64::from(self.seed) << 32
    }

    /// The version-2 header check: 16 bits of a seeded crc over magic, kind, version, length.
    fn header_check(&self, h: &[u8]) -> u16 {
        crc32c::crc32c_append(crc32c::crc32c_append(self.seed ^ 0x5bd1_e995, &h[0..6]), &h[8..12]) as u16
    }
}

/// A decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Sequence number named by the header.
    pub seq: u64,
    /// How its records are framed.
    pub key: RecordKey,
    /// Where its first record starts.
    pub len: usize,
}

/// Kinds of record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// An accepted message: envelope and body.
    Message = 1,
    /// A delivery outcome for one recipient of an earlier message.
    Outcome = 2,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<RecordKind> {
        match v {
            1 => Some(RecordKind::Message),
            2 => Some(RecordKind::Outcome),
            _ => None,
        }
    }
}

/// Why bytes are not a valid segment header or record; one variant per fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// The input ends inside the named field.
    Truncated(&'static str),
    /// The segment or record magic is wrong.
    BadMagic,
    /// A segment header carries a format version this build does not know.
    UnsupportedVersion(u32),
    /// A record header carries a record version this build does not know.
    UnsupportedRecordVersion(u8),
    /// A checksum does not match the bytes it covers.
    BadChecksum,
    /// A record length runs past the end of the segment.
    BadLength,
    /// A record kind this build does not know.
    UnknownKind(u8),
    /// A field holds a value outside its domain.
    BadValue(&'static str),
    /// Bytes are left over after the last field of a payload.
    TrailingBytes,
    /// A field is longer than its u16 length prefix allows (encoding only).
    FieldTooLong(&'static str),
    /// The record would exceed [`MAX_PAYLOAD_LEN`] (encoding only).
    TooLarge,
    /// The destination slice is not the length the encoder computed (a caller bug).
    WrongBufferLen,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Truncated(field) => write!(f, "truncated in {field}"),
            FormatError::BadMagic => f.write_str("bad magic"),
            FormatError::UnsupportedVersion(v) => write!(f, "unsupported segment version {v}"),
            FormatError::UnsupportedRecordVersion(v) => {
                write!(f, "unsupported record version {v}")
            }
            FormatError::BadChecksum => f.write_str("checksum mismatch"),
            FormatError::BadLength => f.write_str("record length runs past the segment end"),
            FormatError::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            FormatError::BadValue(field) => write!(f, "bad value in {field}"),
            FormatError::TrailingBytes => f.write_str("trailing bytes after the payload"),
            FormatError::FieldTooLong(field) => write!(f, "{field} longer than 65535 bytes"),
            FormatError::TooLarge => f.write_str("record larger than 4 GiB"),
            FormatError::WrongBufferLen => f.write_str("record buffer has the wrong length"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// File names

/// The file name of segment `seq`: `seg-` + 16 zero-padded decimal digits + `.spool`.
pub fn segment_file_name(seq: u64) -> String {
    format!("{FILE_PREFIX}{seq:0width$}{FILE_SUFFIX}", width = FILE_SEQ_DIGITS)
}

/// Inverse of [`segment_file_name`]; `None` for any other name (including non-canonical
/// spellings of a number, so one sequence number maps to exactly one file).
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?;
    if digits.len() < FILE_SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: u64 = digits.parse().ok()?;
    (segment_file_name(seq) == name).then_some(seq)
}

// ---------------------------------------------------------------------------------------------
// Segment header

// Format: { magic "SLUICESG" [8] | version u32 = 2 | salt_lo u32 | seq u64 | salt_hi u32 |
//           crc32c u32 over bytes 0..28 } at bytes 0..32, zeros, the same again at 512..544.
//           Version 1: the same 32 bytes once, with salt_lo = salt_hi = 0.
/// The header that opens segment `seq`, whose records are framed with `key` (from
/// [`RecordKey::from_salt`]).
pub fn encode_segment_header(seq: u64, key: &RecordKey) -> [u8; SEGMENT_HEADER_LEN] {
    let salt = key.salt();
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(salt as u32).to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..28].copy_from_slice(&((salt >> 32) as u32).to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h.copy_within(0..HEADER_COPY_LEN, SECOND_COPY_AT);
    h
}

/// Validates a segment header (either copy of a version-2 one) and returns what it names.
pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, FormatError> {
    let first = decode_header_copy(bytes);
    match first {
        Ok(h) => Ok(h),
        // A sound header of another version is final: its records are not ours to judge.
        Err(e @ FormatError::UnsupportedVersion(_)) => Err(e),
        // The second copy only exists in version 2; it is used when the first is damaged.
        Err(e) => match bytes.get(SECOND_COPY_AT..).map(decode_header_copy) {
            Some(Ok(h)) if h.key.version == 2 => Ok(h),
            _ => Err(e),
        },
    }
}

fn decode_header_copy(bytes: &[u8]) -> Result<SegmentHeader, FormatError> {
    let h = bytes.get(..HEADER_COPY_LEN).ok_or(FormatError::Truncated("segment header"))?;
    if h[0..8] != SEGMENT_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let mut r = Reader::new(&h[8..]);
    let version = r.u32("segment version")?;
    let salt_lo = r.u32("segment salt")?;
    let seq = r.u64("segment seq")?;
    let salt_hi = r.u32("segment salt")?;
    let crc = r.u32("segment crc")?;
    if crc != crc32c::crc32c(&h[0..28]) {
        return Err(FormatError::BadChecksum);
    }
    // Checked after the crc: a torn header should read as damage, not as a future version.
    match version {
        FORMAT_VERSION => {
            let key = RecordKey::from_salt(u64::from(salt_lo) | u64::from(salt_hi) << 32)
                .ok_or(FormatError::BadValue("segment salt"))?;
            Ok(SegmentHeader { seq, key, len: SEGMENT_HEADER_LEN })
        }
        LEGACY_VERSION => Ok(SegmentHeader { seq, key: RecordKey::LEGACY, len: HEADER_COPY_LEN }),
        v => Err(FormatError::UnsupportedVersion(v)),
    }
}

/// The version-1 header of segment `seq` (for tests of the upgrade path).
pub fn encode_legacy_segment_header(seq: u64) -> [u8; HEADER_COPY_LEN] {
    let mut h = [0u8; HEADER_COPY_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&LEGACY_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

// ---------------------------------------------------------------------------------------------
// Record framing

/// Total on-disk length of a record with `payload_len` payload bytes: header, payload and
/// zero padding to the next 8-byte boundary.
pub const fn padded_record_len(payload_len: usize) -> usize {
    (RECORD_HEADER_LEN + payload_len + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

// Format: { magic [4] (the segment's) | kind u8 | version u8 | header_check u16 | payload_len u32 |
//           crc32c u32 seeded with the segment's seed, over bytes 4..12 of this header then the
//           payload } payload | zero pad to 8
//           header_check: low 16 bits of a seeded crc32c over bytes 0..6 and 8..12 (version 2;
//           0 in version 1, whose magic is "SLRC" and whose crc is unseeded).
/// Writes the record header into `dst[..16]` and zero padding after the payload, then seals
/// the record with a crc computed over the bytes as they lie in `dst` (the segment map or the
/// segment's staging buffer).
/// `dst` is the whole padded record; the payload must already be in place.
fn frame_record(dst: &mut [u8], key: &RecordKey, kind: RecordKind, payload_len: usize) -> Result<(), FormatError> {
    if dst.len() != padded_record_len(payload_len) {
        return Err(FormatError::WrongBufferLen);
    }
    let len32 = u32::try_from(payload_len).map_err(|_| FormatError::TooLarge)?;
    let (header, rest) = dst.split_at_mut(RECORD_HEADER_LEN);
    header[0..4].copy_from_slice(&key.magic);
    header[4] = kind as u8;
    header[5] = key.version;
    header[8..12].copy_from_slice(&len32.to_le_bytes());
    let check = if key.version >= 2 { key.header_check(header) } else { 0 };
    header[6..8].copy_from_slice(&check.to_le_bytes());
    let (payload, pad) = rest.split_at_mut(payload_len);
    // Space can be reused after a failed append, so padding is written, not assumed zero.
    pad.fill(0);
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(key.seed, &header[4..12]), payload);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// A framed record whose checksum verified.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    /// What the payload holds.
    pub kind: RecordKind,
    /// The payload bytes (not yet decoded).
    pub payload: &'a [u8],
    /// Whole record length including header and padding.
    pub len: usize,
    /// Record layout version (from the segment's framing), for the payload decoders.
    pub version: u8,
}

/// What lies at an 8-aligned offset of a segment.
#[derive(Clone, Copy, Debug)]
pub enum Probe<'a> {
    /// A zero word (or no bytes at all): no record was ever written here.
    Zero,
    /// A record with a valid frame and checksum.
    Record(RawRecord<'a>),
    /// A header of this segment that passes its own check, whose payload fails its checksum:
    /// the damage spans exactly `len` bytes, and nothing inside them may be read as a record
    /// (they are a client's bytes).
    Damaged {
        /// Whole record length the header states (header and padding included).
        len: usize,
        /// What failed.
        err: FormatError,
    },
    /// Not a record header of this segment.
    Bad(FormatError),
}

/// Looks at the record framing at `off` in `seg` (the segment bytes from the file start):
/// magic, header check, version, length within `seg`, crc over the bytes. Never panics.
pub fn probe_record<'a>(seg: &'a [u8], off: usize, key: &RecordKey) -> Probe<'a> {
    let Some(rest) = seg.get(off..) else {
        return Probe::Zero;
    };
    // A short remainder holding only zeros is the same as a zero word: nothing was written.
    let word = rest.get(..4).unwrap_or(rest);
    if word.iter().all(|&b| b == 0) {
        return Probe::Zero;
    }
    let header = match read_header(rest, key) {
        Ok(h) => h,
        Err(e) => return Probe::Bad(e),
    };
    match check_payload(rest, key, &header) {
        Ok(r) => Probe::Record(r),
        Err(err) => Probe::Damaged { len: header.len, err },
    }
}

/// A record header that is this segment's and self-consistent.
struct Header {
    kind: RecordKind,
    payload_len: usize,
    len: usize,
    crc: u32,
}

/// Checks the header at `rec[0]`: magic, header check (version 2), version, kind, and that the
/// stated length lies within `rec`. Only a header that passes may have its length trusted.
fn read_header(rec: &[u8], key: &RecordKey) -> Result<Header, FormatError> {
    let header = rec.get(..RECORD_HEADER_LEN).ok_or(FormatError::Truncated("record header"))?;
    if header[0..4] != key.magic {
        return Err(FormatError::BadMagic);
    }
    let mut r = Reader::new(&header[4..]);
    let kind = r.u8("record kind")?;
    let version = r.u8("record version")?;
    let check = r.u16("record header check")?;
    let payload_len = r.u32("record length")? as usize;
    let crc = r.u32("record crc")?;
    if key.version >= 2 && check != key.header_check(header) {
        return Err(FormatError::BadChecksum);
    }
    if version != key.version {
        return Err(FormatError::UnsupportedRecordVersion(version));
    }
    let kind = RecordKind::from_u8(kind).ok_or(FormatError::UnknownKind(kind))?;
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(FormatError::BadLength);
    }
    let len = padded_record_len(payload_len);
    if len > rec.len() {
        return Err(FormatError::BadLength);
    }
    Ok(Header { kind, payload_len, len, crc })
}

/// Verifies the payload checksum of a record whose header passed [`read_header`].
fn check_payload<'a>(rec: &'a [u8], key: &RecordKey, h: &Header) -> Result<RawRecord<'a>, FormatError> {
    let payload = &rec[RECORD_HEADER_LEN..RECORD_HEADER_LEN + h.payload_len];
    if h.crc != crc32c::crc32c_append(crc32c::crc32c_append(key.seed, &rec[4..12]), payload) {
        return Err(FormatError::BadChecksum);
    }
    Ok(RawRecord { kind: h.kind, payload, len: h.len, version: key.version })
}

/// Reads the record at `off` of `seg`, checking framing but not the crc: for a record this
/// process already verified (at recovery, or when it wrote it) and reads again per delivery
/// attempt, where checksumming a large body again would be wasted work.
pub fn record_at_trusted<'a>(seg: &'a [u8], off: usize, key: &RecordKey) -> Result<RawRecord<'a>, FormatError> {
    let rec = seg.get(off..).ok_or(FormatError::BadLength)?;
    let h = read_header(rec, key)?;
    let payload = &rec[RECORD_HEADER_LEN..RECORD_HEADER_LEN + h.payload_len];
    Ok(RawRecord { kind: h.kind, payload, len: h.len, version: key.version })
}

/// Reads the record at `off` of `seg`, checking framing and crc (used to fetch a message by its
/// known location).
pub fn record_at<'a>(seg: &'a [u8], off: usize, key: &RecordKey) -> Result<RawRecord<'a>, FormatError> {
    let rec = seg.get(off..).ok_or(FormatError::BadLength)?;
    let h = read_header(rec, key)?;
    check_payload(rec, key, &h)
}

// ---------------------------------------------------------------------------------------------
// Message records

/// The parts of a message record recovery needs, read without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageSummary {
    /// Queue id.
    pub id: QueueId,
    /// Arrival, Unix ms.
    pub arrival_ms: u64,
    /// Number of recipients.
    pub rcpt_count: u32,
}

fn field_len(field: &[u8], name: &'static str) -> Result<usize, FormatError> {
    if field.len() > u16::MAX as usize {
        return Err(FormatError::FieldTooLong(name));
    }
    Ok(2 + field.len())
}

fn message_payload_len(env: &Envelope, body_len: usize) -> Result<usize, FormatError> {
    let mut n = MESSAGE_FIXED_LEN
        + field_len(&env.helo, "helo")?
        + field_len(&env.sender, "sender")?
        + field_len(&env.envid, "envid")?
        + field_len(&env.auth_user, "auth user")?
        + if env.source.is_empty() { 0 } else { field_len(&env.source, "source")? }
        + 4;
    if u32::try_from(env.rcpt_count()).is_err() {
        return Err(FormatError::TooLarge);
    }
    for rc in env.rcpts() {
        n = n
            .checked_add(1 + field_len(rc.addr, "recipient")? + field_len(rc.orcpt, "orcpt")?)
            .ok_or(FormatError::TooLarge)?;
    }
    n = n.checked_add(8).and_then(|n| n.checked_add(body_len)).ok_or(FormatError::TooLarge)?;
    if n > MAX_PAYLOAD_LEN {
        return Err(FormatError::TooLarge);
    }
    Ok(n)
}

/// Exact on-disk length of the message record for `env` and `body` (header and padding
/// included), or why it cannot be encoded.
pub fn message_record_len(env: &Envelope, body: &[u8]) -> Result<usize, FormatError> {
    message_record_len_prefixed(env, &[], body)
}

/// [`message_record_len`] for a body stored after `prefix` (the DKIM-Signature fields).
pub fn message_record_len_prefixed(env: &Envelope, prefix: &[u8], body: &[u8]) -> Result<usize, FormatError> {
    Ok(padded_record_len(message_payload_len(env, prefix.len().saturating_add(body.len()))?))
}

// Format: { record header (kind = 1) | id u64 | arrival_ms u64 | flags u8 (bit 0 = SMTPUTF8,
//           bit 1 = SOURCE) | body_type u8 | ret u8 | ip_family u8 (4 or 6) | ip [16] (v4 in the
//           first 4) | helo u16+bytes | sender u16+bytes | envid u16+bytes | auth_user u16+bytes |
//           [source u16+bytes, only with bit 1] | rcpt_count u32 | rcpt_count x { notify u8 | addr u16+bytes | orcpt u16+bytes } |
//           body_len u64 | body } zero pad to 8
/// Encodes a message record into `dst`, which must be exactly [`message_record_len`] bytes
/// (a reserved range of the segment map, or the staging buffer of a large record). The crc is
/// computed over `dst` itself.
pub fn encode_message(
    dst: &mut [u8],
    key: &RecordKey,
    id: QueueId,
    arrival_ms: u64,
    env: &Envelope,
    body: &[u8],
) -> Result<(), FormatError> {
    encode_message_prefixed(dst, key, id, arrival_ms, env, &[], body)
}

/// [`encode_message`] with `prefix` (the DKIM-Signature fields) stored as the start of the
/// body: the record holds one body, `prefix` then `body`, so a signed message is read, sent
/// and recovered like any other.
pub fn encode_message_prefixed(
    dst: &mut [u8],
    key: &RecordKey,
    id: QueueId,
    arrival_ms: u64,
    env: &Envelope,
    prefix: &[u8],
    body: &[u8],
) -> Result<(), FormatError> {
    let body_len = prefix.len().saturating_add(body.len());
    let payload_len = message_payload_len(env, body_len)?;
    if dst.len() != padded_record_len(payload_len) {
        return Err(FormatError::WrongBufferLen);
    }
    let payload = &mut dst[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len];
    let mut w = Writer::new(payload);
    w.u64(id.0)?;
    w.u64(arrival_ms)?;
    let source_flag = if env.source.is_empty() { 0 } else { FLAG_SOURCE };
    w.u8(if env.smtputf8 { FLAG_SMTPUTF8 } else { 0 } | source_flag)?;
    w.u8(env.body_type as u8)?;
    w.u8(env.ret as u8)?;
    let mut ip = [0u8; 16];
    match env.client_ip {
        IpAddr::V4(v4) => {
            ip[..4].copy_from_slice(&v4.octets());
            w.u8(IP_V4)?;
        }
        IpAddr::V6(v6) => {
            ip.copy_from_slice(&v6.octets());
            w.u8(IP_V6)?;
        }
    }
    w.bytes(&ip)?;
    w.str16(&env.helo)?;
    w.str16(&env.sender)?;
    w.str16(&env.envid)?;
    w.str16(&env.auth_user)?;
    if !env.source.is_empty() {
        w.str16(&env.source)?;
    }
    w.u32(env.rcpt_count() as u32)?;
    for rc in env.rcpts() {
        w.u8(rc.notify)?;
        w.str16(rc.addr)?;
        w.str16(rc.orcpt)?;
    }
    w.u64(body_len as u64)?;
    w.bytes(prefix)?;
    w.bytes(body)?;
    w.finish()?;
    frame_record(dst, key, RecordKind::Message, payload_len)
}

/// Reads the fixed part of a message payload: id, arrival, flags, body type, ret, client ip.
fn message_fixed(r: &mut Reader<'_>) -> Result<(QueueId, u64, u8, u8, u8, IpAddr), FormatError> {
    let id = QueueId(r.u64("queue id")?);
    let arrival_ms = r.u64("arrival")?;
    let flags = r.u8("flags")?;
    let body_type = r.u8("body type")?;
    let ret = r.u8("ret")?;
    let family = r.u8("ip family")?;
    let ip = r.bytes(16, "client ip")?;
    let ip = match family {
        IP_V4 => IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
        IP_V6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(ip);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return Err(FormatError::BadValue("ip family")),
    };
    if flags & !(FLAG_SMTPUTF8 | FLAG_SOURCE) != 0 {
        return Err(FormatError::BadValue("flags"));
    }
    if body_type > BodyType::BinaryMime as u8 {
        return Err(FormatError::BadValue("body type"));
    }
    if ret > Ret::Hdrs as u8 {
        return Err(FormatError::BadValue("ret"));
    }
    Ok((id, arrival_ms, flags, body_type, ret, ip))
}

/// Reads the body length and checks that the body is exactly the rest of the payload.
fn message_body<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], FormatError> {
    let body_len = r.u64("body length")?;
    if body_len != r.remaining() as u64 {
        return Err(FormatError::BadValue("body length"));
    }
    r.bytes(r.remaining(), "body")
}

/// Validates a whole message payload and returns what recovery needs; does not allocate.
pub fn message_summary(payload: &[u8]) -> Result<MessageSummary, FormatError> {
    let mut r = Reader::new(payload);
    let (id, arrival_ms, flags, ..) = message_fixed(&mut r)?;
    for name in ["helo", "sender", "envid", "auth user"] {
        r.str16(name)?;
    }
    if flags & FLAG_SOURCE != 0 {
        r.str16("source")?;
    }
    let rcpt_count = r.u32("recipient count")?;
    for _ in 0..rcpt_count {
        r.u8("notify")?;
        r.str16("recipient")?;
        r.str16("orcpt")?;
    }
    message_body(&mut r)?;
    Ok(MessageSummary { id, arrival_ms, rcpt_count })
}

/// Decodes a message payload: the envelope is copied, the body borrowed from `payload`.
pub fn decode_message(payload: &[u8]) -> Result<MessageView<'_>, FormatError> {
    let mut r = Reader::new(payload);
    let (id, arrival_ms, flags, body_type, ret, client_ip) = message_fixed(&mut r)?;
    // Field by field: `Envelope` has private arena fields, so struct-update syntax is out.
    let mut env = Envelope::default();
    env.smtputf8 = flags & FLAG_SMTPUTF8 != 0;
    env.body_type = BodyType::from_u8(body_type);
    env.ret = Ret::from_u8(ret);
    env.client_ip = client_ip;
    env.helo.extend_from_slice(r.str16("helo")?);
    env.sender.extend_from_slice(r.str16("sender")?);
    env.envid.extend_from_slice(r.str16("envid")?);
    env.auth_user.extend_from_slice(r.str16("auth user")?);
    if flags & FLAG_SOURCE != 0 {
        env.source.extend_from_slice(r.str16("source")?);
    }
    // No reservation by the count: a damaged count must fail on the bytes, not allocate.
    let rcpt_count = r.u32("recipient count")?;
    for _ in 0..rcpt_count {
        let notify = r.u8("notify")?;
        let addr = r.str16("recipient")?;
        let orcpt = r.str16("orcpt")?;
        env.push_rcpt(addr, orcpt, notify);
    }
    let body = message_body(&mut r)?;
    Ok(MessageView { id, arrival_ms, envelope: env, body })
}

// ---------------------------------------------------------------------------------------------
// Outcome records

/// A decoded outcome record.
#[derive(Clone, Copy, Debug)]
pub struct OutcomeRecord<'a> {
    /// The message it belongs to.
    pub id: QueueId,
    /// Recipient index in the message's envelope order.
    pub rcpt: u32,
    /// The outcome, strings borrowed from the payload.
    pub outcome: Outcome<'a>,
}

fn outcome_payload_len(o: &Outcome<'_>, version: u8) -> Result<usize, FormatError> {
    let bounce = if version >= 2 { 8 } else { 0 };
    Ok(OUTCOME_FIXED_LEN + bounce + field_len(o.reply, "reply")? + field_len(o.remote, "remote")?)
}

/// Exact on-disk length of the outcome record for `o` (header and padding included) in the
/// current format.
pub fn outcome_record_len(o: &Outcome<'_>) -> Result<usize, FormatError> {
    Ok(padded_record_len(outcome_payload_len(o, RecordKey::CURRENT_VERSION)?))
}

// Format: { record header (kind = 2) | id u64 | rcpt u32 | status u8 | attempts u16 |
//           next_attempt_ms u64 | at_ms u64 | bounce_id u64 (0 = none) | reply u16+bytes |
//           remote u16+bytes } zero pad to 8
//           Version 1: the same without bounce_id.
/// Encodes an outcome record into `dst`, which must be exactly [`outcome_record_len`] bytes.
pub fn encode_outcome(
    dst: &mut [u8],
    key: &RecordKey,
    id: QueueId,
    rcpt: u32,
    o: &Outcome<'_>,
) -> Result<(), FormatError> {
    let payload_len = outcome_payload_len(o, key.version)?;
    if dst.len() != padded_record_len(payload_len) {
        return Err(FormatError::WrongBufferLen);
    }
    let mut w = Writer::new(&mut dst[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len]);
    w.u64(id.0)?;
    w.u32(rcpt)?;
    w.u8(o.status as u8)?;
    w.u16(o.attempts)?;
    w.u64(o.next_attempt_ms)?;
    w.u64(o.at_ms)?;
    if key.version >= 2 {
        w.u64(o.bounce.map_or(0, |b| b.0))?;
    }
    w.str16(o.reply)?;
    w.str16(o.remote)?;
    w.finish()?;
    frame_record(dst, key, RecordKind::Outcome, payload_len)
}

/// Decodes an outcome payload of record version `version` ([`RawRecord::version`]), strings
/// borrowed.
pub fn decode_outcome(payload: &[u8], version: u8) -> Result<OutcomeRecord<'_>, FormatError> {
    let mut r = Reader::new(payload);
    let id = QueueId(r.u64("queue id")?);
    let rcpt = r.u32("recipient index")?;
    let status = match r.u8("status")? {
        0 => RcptStatus::Queued,
        1 => RcptStatus::Delivered,
        2 => RcptStatus::Failed,
        3 => RcptStatus::Deferred,
        _ => return Err(FormatError::BadValue("status")),
    };
    let attempts = r.u16("attempts")?;
    let next_attempt_ms = r.u64("next attempt")?;
    let at_ms = r.u64("outcome time")?;
    let bounce = if version >= 2 { Some(r.u64("bounce id")?).filter(|&b| b != 0).map(QueueId) } else { None };
    let reply = r.str16("reply")?;
    let remote = r.str16("remote")?;
    if r.remaining() != 0 {
        return Err(FormatError::TrailingBytes);
    }
    let outcome = Outcome { status, attempts, next_attempt_ms, at_ms, reply, remote, bounce };
    Ok(OutcomeRecord { id, rcpt, outcome })
}

// ---------------------------------------------------------------------------------------------
// Cursors

/// Bounds-checked little-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).ok_or(FormatError::Truncated(field))?;
        let out = self.buf.get(self.pos..end).ok_or(FormatError::Truncated(field))?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A u16 length prefix and that many bytes.
    fn str16(&mut self, field: &'static str) -> Result<&'a [u8], FormatError> {
        let n = self.u16(field)? as usize;
        self.bytes(n, field)
    }
}

/// Bounds-checked little-endian writer over a slice of precomputed length.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    fn bytes(&mut self, src: &[u8]) -> Result<(), FormatError> {
        let end = self.pos.checked_add(src.len()).ok_or(FormatError::WrongBufferLen)?;
        let dst = self.buf.get_mut(self.pos..end).ok_or(FormatError::WrongBufferLen)?;
        dst.copy_from_slice(src);
        self.pos = end;
        Ok(())
    }

    fn u8(&mut self, v: u8) -> Result<(), FormatError> {
        self.bytes(&[v])
    }

    fn u16(&mut self, v: u16) -> Result<(), FormatError> {
        self.bytes(&v.to_le_bytes())
    }

    fn u32(&mut self, v: u32) -> Result<(), FormatError> {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> Result<(), FormatError> {
        self.bytes(&v.to_le_bytes())
    }

    fn str16(&mut self, s: &[u8]) -> Result<(), FormatError> {
        let n = u16::try_from(s.len()).map_err(|_| FormatError::FieldTooLong("field"))?;
        self.u16(n)?;
        self.bytes(s)
    }

    /// Checks that the precomputed length was filled exactly.
    fn finish(&self) -> Result<(), FormatError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(FormatError::WrongBufferLen)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_env() -> Envelope {
        let mut env = Envelope::default();
        env.sender = b"alice@example.org".to_vec();
        env.envid = b"QQ314159".to_vec();
        env.ret = Ret::Hdrs;
        env.body_type = BodyType::EightBitMime;
        env.smtputf8 = true;
        env.client_ip = "2001:db8::1".parse().unwrap();
        env.helo = b"mail.example.org".to_vec();
        env.auth_user = b"alice".to_vec();
        env.push_rcpt(b"bob@example.net", b"rfc822;bob@example.net", 6);
        env.push_rcpt(b"carol@example.com", b"", 0);
        env
    }

    const KEY: RecordKey = RecordKey { magic: *b"k3y!", seed: 0x1234_5678, version: 2 };

    fn encode_msg(id: u64, env: &Envelope, body: &[u8]) -> Vec<u8> {
        encode_msg_with(&KEY, id, env, body)
    }

    fn encode_msg_with(key: &RecordKey, id: u64, env: &Envelope, body: &[u8]) -> Vec<u8> {
        let len = message_record_len(env, body).unwrap();
        let mut buf = vec![0xAA; len];
        encode_message(&mut buf, key, QueueId(id), 77, env, body).unwrap();
        buf
    }

    fn assert_env_eq(a: &Envelope, b: &Envelope) {
        assert_eq!(a.sender, b.sender);
        assert_eq!(a.envid, b.envid);
        assert_eq!(a.ret, b.ret);
        assert_eq!(a.body_type, b.body_type);
        assert_eq!(a.smtputf8, b.smtputf8);
        assert_eq!(a.client_ip, b.client_ip);
        assert_eq!(a.helo, b.helo);
        assert_eq!(a.auth_user, b.auth_user);
        assert_eq!(a.source, b.source);
        assert!(a.rcpts().eq(b.rcpts()));
    }

    #[test]
    fn the_egress_source_round_trips_and_records_without_it_read_as_before() {
        let mut env = sample_env();
        let plain = encode_msg(8, &env, b"x\r\n");
        env.source = b"ip2".to_vec();
        let rec = encode_msg(8, &env, b"x\r\n");
        let Probe::Record(raw) = probe_record(&rec, 0, &KEY) else { panic!("not a record") };
        assert_eq!(decode_message(raw.payload).unwrap().envelope.source, b"ip2");
        assert_eq!(message_summary(raw.payload).unwrap().rcpt_count, 2);
        let with_len = raw.payload.len();
        // Without a source: no flag, no field, the bytes of the format before sources.
        let Probe::Record(raw) = probe_record(&plain, 0, &KEY) else { panic!("not a record") };
        assert_eq!(raw.payload[16] & FLAG_SOURCE, 0);
        assert!(decode_message(raw.payload).unwrap().envelope.source.is_empty());
        assert_eq!(raw.payload.len() + 2 + 3, with_len);
    }

    #[test]
    fn file_names_round_trip_and_reject_others() {
        assert_eq!(segment_file_name(42), "seg-0000000000000042.spool");
        assert_eq!(parse_segment_file_name("seg-0000000000000042.spool"), Some(42));
        assert_eq!(parse_segment_file_name(&segment_file_name(u64::MAX)), Some(u64::MAX));
        for bad in [
            "seg-42.spool",
            "seg-00000000000000042.spool",
            "seg-000000000000004x.spool",
            "seg-+000000000000042.spool",
            "seg-0000000000000042.spool.tmp",
            "lock",
            "",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn segment_header_round_trip_and_damage() {
        let h = encode_segment_header(9, &KEY);
        let want = SegmentHeader { seq: 9, key: KEY, len: SEGMENT_HEADER_LEN };
        assert_eq!(decode_segment_header(&h), Ok(want));
        assert_eq!(decode_segment_header(&h[..20]), Err(FormatError::Truncated("segment header")));
        // One damaged copy: the other one still gives the salt.
        let mut bad = h;
        bad[17] ^= 1;
        assert_eq!(decode_segment_header(&bad), Ok(want));
        bad[SECOND_COPY_AT + 17] ^= 1;
        assert_eq!(decode_segment_header(&bad), Err(FormatError::BadChecksum));
        // A whole lost first sector still leaves the salt.
        bad = h;
        bad[..512].fill(0);
        assert_eq!(decode_segment_header(&bad), Ok(want));
        bad = h;
        bad[0] = b'X';
        assert_eq!(decode_segment_header(&bad), Ok(want));
        bad[SECOND_COPY_AT] = b'X';
        assert_eq!(decode_segment_header(&bad), Err(FormatError::BadMagic));
        // Version 1: one copy, the legacy framing.
        let legacy = encode_legacy_segment_header(4);
        assert_eq!(
            decode_segment_header(&legacy),
            Ok(SegmentHeader { seq: 4, key: RecordKey::LEGACY, len: HEADER_COPY_LEN })
        );
        // Unusable salts are refused, so a key always has a non-zero, non-legacy magic.
        assert_eq!(RecordKey::from_salt(0xFFFF_0000_0000), None);
        assert_eq!(RecordKey::from_salt(u64::from(u32::from_le_bytes(*b"SLRC"))), None);
        assert_eq!(RecordKey::from_salt(KEY.salt()), Some(KEY));
    }

    #[test]
    fn legacy_records_still_read() {
        let env = sample_env();
        let rec = encode_msg_with(&RecordKey::LEGACY, 3, &env, b"old\r\n");
        assert_eq!(&rec[0..4], b"SLRC");
        assert_eq!(&rec[6..8], &[0, 0], "version 1 has no header check");
        let Probe::Record(raw) = probe_record(&rec, 0, &RecordKey::LEGACY) else { panic!("not a record") };
        assert_eq!(decode_message(raw.payload).unwrap().body, b"old\r\n");
        assert!(matches!(probe_record(&rec, 0, &KEY), Probe::Bad(FormatError::BadMagic)));
    }

    #[test]
    fn a_record_forged_for_another_salt_is_never_valid() {
        // What a client could embed in a body: a well-formed record under the legacy framing
        // or under a guessed salt. Neither frames a record of this segment.
        let env = sample_env();
        let guessed = RecordKey { seed: KEY.seed ^ 1, ..KEY };
        for key in [RecordKey::LEGACY, guessed] {
            let forged = encode_msg_with(&key, 66, &env, b"forged\r\n");
            assert!(!matches!(probe_record(&forged, 0, &KEY), Probe::Record(_)), "{key:?}");
        }
        // A guessed seed with the right magic passes the magic but not the header check (or,
        // 1 time in 65536, fails the payload crc): never a record.
        let forged = encode_msg_with(&guessed, 66, &env, b"forged\r\n");
        assert!(!matches!(probe_record(&forged, 0, &KEY), Probe::Record(_)));
    }

    #[test]
    fn message_round_trip_is_aligned_and_checksummed() {
        let env = sample_env();
        let body = b"Received: from x\r\n\r\nhello\r\n";
        let rec = encode_msg(5, &env, body);
        assert_eq!(rec.len() % RECORD_ALIGN, 0);
        let Probe::Record(raw) = probe_record(&rec, 0, &KEY) else { panic!("not a record") };
        assert_eq!(raw.kind, RecordKind::Message);
        assert_eq!(raw.len, rec.len());
        let view = decode_message(raw.payload).unwrap();
        assert_eq!(view.id, QueueId(5));
        assert_eq!(view.arrival_ms, 77);
        assert_eq!(view.body, body);
        assert_env_eq(&view.envelope, &env);
        let sum = message_summary(raw.payload).unwrap();
        assert_eq!(sum, MessageSummary { id: QueueId(5), arrival_ms: 77, rcpt_count: 2 });
        // Every single-bit flip is caught: in the header as a bad header (its length is not
        // to be trusted), in the payload as damage of exactly this record's length.
        for i in 0..RECORD_HEADER_LEN + raw.payload.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x10;
            match probe_record(&bad, 0, &KEY) {
                Probe::Bad(_) if i < 12 => {}
                Probe::Damaged { len, err: FormatError::BadChecksum } if i >= 12 => assert_eq!(len, rec.len()),
                other => panic!("flip at {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn outcome_round_trip() {
        let o = Outcome {
            status: RcptStatus::Deferred,
            attempts: 3,
            next_attempt_ms: 1_000_000,
            at_ms: 999_000,
            reply: b"451 4.3.0 later",
            remote: b"mx.example.net [192.0.2.1]",
            bounce: Some(QueueId(99)),
        };
        let mut buf = vec![0u8; outcome_record_len(&o).unwrap()];
        encode_outcome(&mut buf, &KEY, QueueId(8), 1, &o).unwrap();
        let Probe::Record(raw) = probe_record(&buf, 0, &KEY) else { panic!("not a record") };
        assert_eq!(raw.kind, RecordKind::Outcome);
        let d = decode_outcome(raw.payload, raw.version).unwrap();
        assert_eq!((d.id, d.rcpt), (QueueId(8), 1));
        assert_eq!(d.outcome.status, RcptStatus::Deferred);
        assert_eq!(d.outcome.attempts, 3);
        assert_eq!(d.outcome.next_attempt_ms, 1_000_000);
        assert_eq!(d.outcome.at_ms, 999_000);
        assert_eq!(d.outcome.reply, o.reply);
        assert_eq!(d.outcome.remote, o.remote);
        assert_eq!(d.outcome.bounce, Some(QueueId(99)));
    }

    #[test]
    fn zero_word_is_the_end_and_short_garbage_is_bad() {
        assert!(matches!(probe_record(&[0u8; 64], 8, &KEY), Probe::Zero));
        assert!(matches!(probe_record(&[0u8; 3], 0, &KEY), Probe::Zero));
        assert!(matches!(probe_record(&[], 0, &KEY), Probe::Zero));
        assert!(matches!(probe_record(&[1, 0, 0], 0, &KEY), Probe::Bad(_)));
        let key = RecordKey::LEGACY;
        assert!(matches!(probe_record(b"SLRC\x01\x01\0\0", 0, &key), Probe::Bad(FormatError::Truncated(_))));
    }

    #[test]
    fn oversized_fields_are_refused_before_writing() {
        let mut env = sample_env();
        env.helo = vec![b'h'; 70_000];
        assert_eq!(message_record_len(&env, b""), Err(FormatError::FieldTooLong("helo")));
        let mut buf = vec![0u8; 64];
        assert!(encode_message(&mut buf, &KEY, QueueId(1), 0, &env, b"").is_err());
    }

    #[test]
    fn wrong_buffer_length_is_an_error_not_a_panic() {
        let env = sample_env();
        let len = message_record_len(&env, b"x").unwrap();
        let mut buf = vec![0u8; len + 8];
        assert_eq!(encode_message(&mut buf, &KEY, QueueId(1), 0, &env, b"x"), Err(FormatError::WrongBufferLen));
    }

    fn arb_field() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..40)
    }

    prop_compose! {
        fn arb_env()(
            sender in arb_field(), envid in arb_field(), helo in arb_field(), auth in arb_field(),
            ret in 0u8..3, body_type in 0u8..4, smtputf8 in any::<bool>(),
            v6 in any::<bool>(), ip in any::<[u8; 16]>(),
            rcpts in prop::collection::vec((arb_field(), arb_field(), any::<u8>()), 0..8),
        ) -> Envelope {
            let client_ip = if v6 {
                IpAddr::V6(Ipv6Addr::from(ip))
            } else {
                IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
            };
            let mut env = Envelope::default();
            env.sender = sender;
            env.envid = envid;
            env.helo = helo;
            env.auth_user = auth;
            env.ret = Ret::from_u8(ret);
            env.body_type = BodyType::from_u8(body_type);
            env.smtputf8 = smtputf8;
            env.client_ip = client_ip;
            for (a, o, n) in &rcpts {
                env.push_rcpt(a, o, *n);
            }
            env
        }
    }

    proptest! {
        #[test]
        fn prop_message_round_trip(
            env in arb_env(),
            body in prop::collection::vec(any::<u8>(), 0..2000),
            id in any::<u64>(),
            arrival in any::<u64>(),
        ) {
            let len = message_record_len(&env, &body).unwrap();
            let mut buf = vec![0x55; len];
            encode_message(&mut buf, &KEY, QueueId(id), arrival, &env, &body).unwrap();
            let raw = record_at(&buf, 0, &KEY).unwrap();
            prop_assert_eq!(raw.len, len);
            let view = decode_message(raw.payload).unwrap();
            prop_assert_eq!(view.id, QueueId(id));
            prop_assert_eq!(view.arrival_ms, arrival);
            prop_assert_eq!(view.body, &body[..]);
            assert_env_eq(&view.envelope, &env);
            let sum = message_summary(raw.payload).unwrap();
            prop_assert_eq!(sum.rcpt_count as usize, env.rcpt_count());
        }

        #[test]
        fn prop_outcome_round_trip(
            id in any::<u64>(), rcpt in any::<u32>(), status in 0u8..4, attempts in any::<u16>(),
            next in any::<u64>(), at in any::<u64>(), reply in arb_field(), remote in arb_field(),
        ) {
            let status = [
                RcptStatus::Queued, RcptStatus::Delivered, RcptStatus::Failed, RcptStatus::Deferred,
            ][status as usize];
            let bounce = (next % 3 == 0).then_some(QueueId(at | 1));
            let o = Outcome { status, attempts, next_attempt_ms: next, at_ms: at, reply: &reply, remote: &remote, bounce };
            let mut buf = vec![0u8; outcome_record_len(&o).unwrap()];
            encode_outcome(&mut buf, &KEY, QueueId(id), rcpt, &o).unwrap();
            let d = decode_outcome(record_at(&buf, 0, &KEY).unwrap().payload, 2).unwrap();
            prop_assert_eq!(d.id, QueueId(id));
            prop_assert_eq!(d.rcpt, rcpt);
            prop_assert_eq!(d.outcome.status, status);
            prop_assert_eq!(d.outcome.attempts, attempts);
            prop_assert_eq!(d.outcome.next_attempt_ms, next);
            prop_assert_eq!(d.outcome.at_ms, at);
            prop_assert_eq!(d.outcome.reply, &reply[..]);
            prop_assert_eq!(d.outcome.remote, &remote[..]);
            prop_assert_eq!(d.outcome.bounce, bounce);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), off in 0usize..700) {
            let _ = probe_record(&bytes, off, &KEY);
            let _ = record_at(&bytes, off, &KEY);
            let _ = record_at_trusted(&bytes, off, &RecordKey::LEGACY);
            let _ = decode_message(&bytes);
            let _ = message_summary(&bytes);
            let _ = decode_outcome(&bytes, 1);
            let _ = decode_outcome(&bytes, 2);
            let _ = decode_segment_header(&bytes);
        }

        #[test]
        fn prop_damaged_records_never_panic(
            env in arb_env(),
            body in prop::collection::vec(any::<u8>(), 0..200),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut rec = encode_msg(1, &env, &body);
            for (at, v) in edits {
                let i = at.index(rec.len());
                rec[i] = v;
            }
            rec.truncate(cut.index(rec.len() + 1));
            if let Probe::Record(raw) = probe_record(&rec, 0, &KEY) {
                let _ = decode_message(raw.payload);
                let _ = message_summary(raw.payload);
            }
            // Bypass the crc so the payload decoders see damaged structure too.
            let payload = rec.get(RECORD_HEADER_LEN..).unwrap_or(&[]);
            let _ = decode_message(payload);
            let _ = message_summary(payload);
            let _ = decode_outcome(payload, 2);
        }
    }
}
