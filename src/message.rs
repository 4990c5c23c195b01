//! Pure: the queue-id format, the envelope a transaction builds, the `Received:` header
//! (RFC 5321 §4.4) and RFC 5322 dates.
//!
//! The envelope is an arena that keeps its capacity between transactions, so a session that
//! handles many messages does not allocate per command once it has warmed up.

use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;

/// A queue id: microseconds since the Unix epoch at allocation, made strictly increasing by
/// [`IdGen`]. Rendered as 13 Crockford base-32 digits, so text order is numeric order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(pub u64);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

impl QueueId {
    /// Renders the id into a fixed array (no allocation).
    pub fn to_bytes(self) -> [u8; 13] {
        let mut out = [b'0'; 13];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = CROCKFORD[(v & 31) as usize];
            v >>= 5;
        }
        out
    }

    /// Parses the 13-digit form back (case-insensitive); `None` if it is not one.
    pub fn parse(text: &str) -> Option<QueueId> {
        if text.len() != 13 {
            return None;
        }
        let mut v: u64 = 0;
        for &b in text.as_bytes() {
            let d = CROCKFORD.iter().position(|&c| c == b.to_ascii_uppercase())? as u64;
            v = v.checked_mul(32)? | d;
        }
        Some(QueueId(v))
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.to_bytes();
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&b).unwrap_or("?"))
    }
}

/// Allocates queue ids: `max(now_us, last + 1)`, so ids are unique and increasing within a
/// process, and across restarts as long as the recovered maximum is fed to [`IdGen::observe`].
#[derive(Debug, Default)]
pub struct IdGen {
    last: u64,
}

impl IdGen {
    /// Makes sure later ids are above `id` (called for every id found in the spool).
    pub fn observe(&mut self, id: QueueId) {
        self.last = self.last.max(id.0);
    }

    /// The next id, given the wall clock in microseconds since the epoch.
    pub fn next(&mut self, now_unix_us: u64) -> QueueId {
        self.last = now_unix_us.max(self.last + 1);
        QueueId(self.last)
    }
}

/// `BODY=` of MAIL FROM (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum BodyType {
    /// No BODY parameter given.
    #[default]
    Unspecified = 0,
    /// `BODY=7BIT`.
    SevenBit = 1,
    /// `BODY=8BITMIME`.
    EightBitMime = 2,
    /// `BODY=BINARYMIME` (only with BDAT).
    BinaryMime = 3,
}

impl BodyType {
    /// Inverse of `as u8`; unknown values read as `Unspecified`.
    pub fn from_u8(v: u8) -> BodyType {
        match v {
            1 => BodyType::SevenBit,
            2 => BodyType::EightBitMime,
            3 => BodyType::BinaryMime,
            _ => BodyType::Unspecified,
        }
    }
}

/// `RET=` of MAIL FROM (RFC 3461 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Ret {
    /// No RET parameter.
    #[default]
    Unspecified = 0,
    /// `RET=FULL`: return the whole message in a DSN.
    Full = 1,
    /// `RET=HDRS`: headers only.
    Hdrs = 2,
}

impl Ret {
    /// Inverse of `as u8`; unknown values read as `Unspecified`.
    pub fn from_u8(v: u8) -> Ret {
        match v {
            1 => Ret::Full,
            2 => Ret::Hdrs,
            _ => Ret::Unspecified,
        }
    }
}

/// NOTIFY bits of RCPT TO (RFC 3461 §4.1). Zero means "not given" (default behaviour).
pub mod notify {
    /// `NOTIFY=NEVER`.
    pub const NEVER: u8 = 1;
    /// `SUCCESS` in the NOTIFY list.
    pub const SUCCESS: u8 = 2;
    /// `FAILURE` in the NOTIFY list.
    pub const FAILURE: u8 = 4;
    /// `DELAY` in the NOTIFY list.
    pub const DELAY: u8 = 8;
}

#[derive(Clone, Debug)]
struct RcptEntry {
    addr: Range<u32>,
    orcpt: Range<u32>,
    notify: u8,
}

/// One recipient, borrowed from an [`Envelope`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RcptView<'a> {
    /// The address without angle brackets (`local@domain`, or `postmaster`).
    pub addr: &'a [u8],
    /// ORCPT as given (`addr-type;xtext`), empty when absent.
    pub orcpt: &'a [u8],
    /// [`notify`] bits, 0 when absent.
    pub notify: u8,
}

/// The envelope of one transaction (RFC 5321 §2.3.1) plus what the spool records about the
/// client. Reused between transactions: [`Envelope::clear_transaction`] keeps capacity.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// Reverse path without angle brackets; empty for the null sender `<>`.
    pub sender: Vec<u8>,
    /// `ENVID=` (RFC 3461 §4.4) as given, in xtext; empty when absent.
    pub envid: Vec<u8>,
    /// `RET=`.
    pub ret: Ret,
    /// `BODY=`.
    pub body_type: BodyType,
    /// `SMTPUTF8` was given on MAIL (RFC 6531).
    pub smtputf8: bool,
    /// The client's address as seen by the server.
    pub client_ip: IpAddr,
    /// The EHLO/HELO argument.
    pub helo: Vec<u8>,
    /// The authenticated user, empty when none (RFC 4954).
    pub auth_user: Vec<u8>,
    /// The egress source chosen for the message (`--source` name), empty when none: kept in
    /// the spool so that retries and restarts leave from the same address.
    pub source: Vec<u8>,
    rcpt_bytes: Vec<u8>,
    rcpts: Vec<RcptEntry>,
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            sender: Vec::new(),
            envid: Vec::new(),
            ret: Ret::Unspecified,
            body_type: BodyType::Unspecified,
            smtputf8: false,
            client_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            helo: Vec::new(),
            auth_user: Vec::new(),
            source: Vec::new(),
            rcpt_bytes: Vec::new(),
            rcpts: Vec::new(),
        }
    }
}

impl Envelope {
    /// Forgets the transaction (sender, parameters, recipients) but keeps the client fields and
    /// every buffer's capacity.
    pub fn clear_transaction(&mut self) {
        self.sender.clear();
        self.envid.clear();
        self.ret = Ret::Unspecified;
        self.body_type = BodyType::Unspecified;
        self.smtputf8 = false;
        self.source.clear();
        self.rcpt_bytes.clear();
        self.rcpts.clear();
    }

    /// Adds a recipient.
    pub fn push_rcpt(&mut self, addr: &[u8], orcpt: &[u8], notify: u8) {
        let a0 = self.rcpt_bytes.len() as u32;
        self.rcpt_bytes.extend_from_slice(addr);
        let a1 = self.rcpt_bytes.len() as u32;
        self.rcpt_bytes.extend_from_slice(orcpt);
        let o1 = self.rcpt_bytes.len() as u32;
        self.rcpts.push(RcptEntry { addr: a0..a1, orcpt: a1..o1, notify });
    }

    /// Number of recipients so far.
    pub fn rcpt_count(&self) -> usize {
        self.rcpts.len()
    }

    /// Recipient `i` (panics if out of range, like slice indexing).
    pub fn rcpt(&self, i: usize) -> RcptView<'_> {
        let e = &self.rcpts[i];
        RcptView {
            addr: &self.rcpt_bytes[e.addr.start as usize..e.addr.end as usize],
            orcpt: &self.rcpt_bytes[e.orcpt.start as usize..e.orcpt.end as usize],
            notify: e.notify,
        }
    }

    /// All recipients in order.
    pub fn rcpts(&self) -> impl Iterator<Item = RcptView<'_>> + '_ {
        (0..self.rcpts.len()).map(move |i| self.rcpt(i))
    }
}

/// How the message came in, for the `with` clause of `Received:`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trace {
    /// EHLO (not HELO).
    pub esmtp: bool,
    /// TLS version and cipher.
    pub tls: Option<(&'static str, &'static str)>,
    /// AUTH succeeded.
    pub authenticated: bool,
}

/// Writes the trace header:
/// `Received: from HELO ([IP]) [(using TLS)] by HOST (sluice) with ESMTP id ID [for <rcpt>]; DATE`.
/// `hostname` is ours (RFC 5321 §4.4: the `by` clause).
pub fn write_received(
    out: &mut Vec<u8>,
    hostname: &str,
    env: &Envelope,
    peer: IpAddr,
    trace: Trace,
    id: QueueId,
    now_unix_us: u64,
) {
    // RFC 3848 / RFC 6531 §3.7.3: the `with` keyword names the protocol actually used, with
    // S for TLS and A for AUTH (ESMTPS, ESMTPSA, UTF8SMTPS, ...).
    let base = match (trace.esmtp, env.smtputf8) {
        (false, _) => "SMTP",
        (true, false) => "ESMTP",
        (true, true) => "UTF8SMTP",
    };
    let suffix = match (trace.esmtp, trace.tls.is_some(), trace.authenticated) {
        (false, _, _) | (true, false, false) => "",
        (true, true, false) => "S",
        (true, false, true) => "A",
        (true, true, true) => "SA",
    };
    out.extend_from_slice(b"Received: from ");
    out.extend_from_slice(&env.helo);
    let _ = match peer {
        IpAddr::V4(a) => write!(out, " ([{a}])"),
        IpAddr::V6(a) => write!(out, " ([IPv6:{a}])"),
    };
    if let Some((version, cipher)) = trace.tls {
        let _ = write!(out, "\r\n\t(using {version} with cipher {cipher})");
    }
    let _ = write!(out, "\r\n\tby {} (sluice) with {base}{suffix} id ", hostname);
    out.extend_from_slice(&id.to_bytes());
    if env.rcpt_count() == 1 {
        out.extend_from_slice(b"\r\n\tfor <");
        out.extend_from_slice(env.rcpt(0).addr);
        out.push(b'>');
    }
    out.extend_from_slice(b"; ");
    rfc5322_date(out, now_unix_us / 1_000_000);
    out.extend_from_slice(b"\r\n");
}

/// Writes an RFC 5322 §3.3 date in UTC, e.g. `Mon, 23 Nov 2026 10:35:18 +0000`.
pub fn rfc5322_date(out: &mut Vec<u8>, unix_secs: u64) {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil(days);
    let _ = write!(
        out,
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days.rem_euclid(7)) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    );
}

/// A Unix time in ms as ISO 8601 UTC to the second (`2026-12-06T07:23:26Z`), for log lines.
pub fn iso8601(unix_ms: u64) -> String {
    let unix_secs = unix_ms / 1000;
    let (year, month, day) = civil((unix_secs / 86_400) as i64);
    let secs = unix_secs % 86_400;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, (secs / 60) % 60, secs % 60)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01: civil-from-days (proleptic
/// Gregorian), after H. Hinnant's public-domain algorithm.
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_names_the_utc_second() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_796_541_806_999), "2026-12-06T07:23:26Z");
    }

    #[test]
    fn date_rendering() {
        let mut v = Vec::new();
        rfc5322_date(&mut v, 0);
        assert_eq!(v, b"Thu, 1 Jan 1970 00:00:00 +0000");
        v.clear();
        rfc5322_date(&mut v, 951_782_400); // 2000-02-29
        assert_eq!(v, b"Tue, 29 Feb 2000 00:00:00 +0000");
    }
}
