//! Pure: SMTP replies in both directions (RFC 5321 §4.2, enhanced codes RFC 3463 / RFC 2034).
//!
//! Server side: every refusal the server can give is a [`Fault`]; [`Fault::reply`] is the one
//! place that maps a fault to its code, enhanced code and text. Fixed replies are
//! `&'static [u8]`, rendered once.
//!
//! Client side: [`parse_reply`] frames one (possibly multi-line) reply from the bytes where they
//! lie and reports `Partial` until its last line is in; [`Capabilities::from_ehlo`] reads the
//! extensions an EHLO reply advertises. Nothing here reads sockets or the clock.

use super::auth::AuthFault;
use crate::dns::resolver::DnsError;
use std::fmt;
use std::net::SocketAddr;

use memchr::memchr;

/// `221` to QUIT.
pub const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
/// `250` to NOOP, RSET and accepted MAIL/RCPT.
pub const OK: &[u8] = b"250 2.0.0 Ok\r\n";
/// `250` to MAIL.
pub const SENDER_OK: &[u8] = b"250 2.1.0 Sender ok\r\n";
/// `250` to RCPT.
pub const RCPT_OK: &[u8] = b"250 2.1.5 Recipient ok\r\n";
/// `354` to DATA.
pub const START_DATA: &[u8] = b"354 End data with <CR><LF>.<CR><LF>\r\n";
/// `252` to VRFY (RFC 5321 §3.5.3: we do not verify, but will try).
pub const VRFY: &[u8] = b"252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n";
/// `214` to HELP.
pub const HELP: &[u8] = b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP; see RFC 5321\r\n";
/// `421` on an idle timeout (RFC 5321 §4.5.3.2).
pub const TIMEOUT: &[u8] = b"421 4.4.2 Timeout exceeded, closing connection\r\n";
/// `421` when the relay shuts down.
pub const SHUTDOWN: &[u8] = b"421 4.3.0 Service shutting down, closing connection\r\n";
/// `421` past `--max-connections`.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"421 4.3.2 Too many connections, try again later\r\n";
/// `421` past `--max-connections-per-ip` (Postfix anvil's wording).
pub const CLIENT_TOO_MANY: &[u8] = b"421 4.7.0 Error: too many connections from your address, try again later\r\n";
/// `421` past `--max-connection-rate-per-ip`.
pub const CLIENT_TOO_FAST: &[u8] =
    b"421 4.7.0 Error: too many connections per minute from your address, try again later\r\n";
/// `421` after too many bad commands in a row.
pub const TOO_MANY_ERRORS: &[u8] = b"421 4.7.0 Too many errors, closing connection\r\n";
/// `451` when the spool could not make a message durable.
pub const SPOOL_FAILED: &[u8] = b"451 4.3.0 Temporary local problem storing the message, try again later\r\n";
/// `452` when the spool is out of space.
pub const SPOOL_FULL: &[u8] = b"452 4.3.1 Insufficient system storage, try again later\r\n";

/// STARTTLS accepted (RFC 3207 §4): the handshake starts after this line.
pub const READY_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
/// AUTH succeeded (RFC 4954 §6).
pub const AUTH_OK: &[u8] = b"235 2.7.0 Authentication successful\r\n";
/// Wrong user or password: one reply for both, so users cannot be enumerated.
pub const AUTH_FAILED: &[u8] = b"535 5.7.8 Authentication credentials invalid\r\n";
/// Too many failed AUTH attempts from this address.
pub const AUTH_BLOCKED: &[u8] = b"421 4.7.0 Too many failed authentication attempts, closing connection\r\n";
/// Too many AUTH checks waiting (from this address or in all); the session stays open.
pub const AUTH_BUSY: &[u8] = b"454 4.7.0 Too many authentication attempts in progress, try again later\r\n";

/// `550 5.7.1` for a message whose `X-Sluice-Pool:` names no configured egress pool (SPEC
/// "Egress sources"): refused at the end of data, not stored. The name is shown as sent,
/// reduced to printable ASCII and 64 bytes (it is the client's text going back to it).
pub fn unknown_pool<'a>(name: &[u8], buf: &'a mut [u8; 128]) -> &'a [u8] {
    const HEAD: &[u8] = b"550 5.7.1 Unknown egress pool \"";
    const TAIL: &[u8] = b"\"\r\n";
    buf[..HEAD.len()].copy_from_slice(HEAD);
    let mut n = HEAD.len();
    for &b in name.iter().take(64) {
        buf[n] = if (0x20..0x7f).contains(&b) && b != b'"' { b } else { b'?' };
        n += 1;
    }
    buf[n..n + TAIL.len()].copy_from_slice(TAIL);
    &buf[..n + TAIL.len()]
}

/// Every reason the server refuses a command or a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Verb not recognised.
    UnknownCommand,
    /// Command line longer than 512 octets.
    LineTooLong,
    /// Control characters, NUL or 8-bit bytes in a command line.
    BadCommandBytes,
    /// Command known but its argument is malformed.
    Syntax(&'static str),
    /// Command not valid in this state.
    Sequence(&'static str),
    /// EXPN is not offered.
    ExpnDisabled,
    /// STARTTLS asked for without a certificate.
    TlsUnavailable,
    /// AUTH asked for but not offered.
    AuthUnavailable,
    /// AUTH outside TLS (RFC 4954 §4, `538 5.7.11`).
    AuthNeedsTls,
    /// An AUTH exchange that broke down before any password was checked.
    Auth(AuthFault),
    /// Malformed reverse path.
    BadSender,
    /// Malformed forward path.
    BadRecipient,
    /// Non-ASCII address without SMTPUTF8 on MAIL (RFC 6531 §3.5).
    Utf8NotDeclared,
    /// MAIL/RCPT parameter not recognised or not valid.
    UnknownParameter,
    /// SIZE parameter or actual data over `--max-message-size`.
    TooBig,
    /// The spool is below its free-space reserve: new mail waits (RFC 5321 §4.5.3.1.10).
    StorageFull,
    /// Past `--max-recipients`.
    TooManyRecipients,
    /// Client is not allowed to relay.
    RelayDenied,
    /// Bare CR or bare LF in DATA (RFC 5321 §2.3.8; SMTP smuggling defence).
    BareLineEnding,
}

impl Fault {
    /// The reply line for this fault.
    pub fn reply(self) -> &'static [u8] {
        match self {
            Fault::UnknownCommand => b"502 5.5.2 Error: command not recognized\r\n",
            Fault::LineTooLong => b"500 5.5.2 Error: line too long\r\n",
            Fault::BadCommandBytes => b"500 5.5.2 Error: bad characters in command\r\n",
            Fault::Syntax(s) => s.as_bytes(),
            Fault::Sequence(s) => s.as_bytes(),
            Fault::ExpnDisabled => b"502 5.5.1 EXPN not available\r\n",
            Fault::TlsUnavailable => b"454 4.7.0 TLS not available\r\n",
            Fault::AuthUnavailable => b"503 5.5.1 Error: authentication not enabled\r\n",
            Fault::AuthNeedsTls => b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
            Fault::Auth(f) => match f {
                AuthFault::Syntax => b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n",
                AuthFault::UnknownMechanism => b"504 5.5.4 Unrecognized authentication type\r\n",
                AuthFault::BadBase64 | AuthFault::Malformed => b"501 5.5.2 Cannot decode response\r\n",
                AuthFault::Cancelled => b"501 5.0.0 Authentication cancelled\r\n",
                AuthFault::TooLong => b"500 5.5.6 Authentication exchange line is too long\r\n",
            },
            Fault::BadSender => b"501 5.1.7 Bad sender address syntax\r\n",
            Fault::BadRecipient => b"501 5.1.3 Bad recipient address syntax\r\n",
            Fault::Utf8NotDeclared => b"553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n",
            Fault::UnknownParameter => b"555 5.5.4 Unsupported or malformed parameter\r\n",
            Fault::TooBig => b"552 5.3.4 Message size exceeds fixed limit\r\n",
            Fault::StorageFull => SPOOL_FULL,
            Fault::TooManyRecipients => b"452 4.5.3 Too many recipients\r\n",
            Fault::RelayDenied => b"554 5.7.1 Relay access denied\r\n",
            Fault::BareLineEnding => {
                b"550 5.6.0 Message refused: bare CR or LF in data (CRLF line endings required)\r\n"
            }
        }
    }

    /// Whether this fault counts towards the "too many bad commands" limit.
    pub fn is_protocol_error(self) -> bool {
        matches!(
            self,
            Fault::UnknownCommand
                | Fault::LineTooLong
                | Fault::BadCommandBytes
                | Fault::Syntax(_)
                | Fault::Sequence(_)
                | Fault::UnknownParameter
                | Fault::BadSender
                | Fault::BadRecipient
                | Fault::Auth(_)
        )
    }
}

/// Sequencing replies (`503 5.5.1`), one constant each so the text names what is missing.
pub mod seq {
    /// MAIL/… before EHLO.
    pub const NEED_EHLO: &str = "503 5.5.1 Error: send HELO/EHLO first\r\n";
    /// MAIL inside a transaction.
    pub const NESTED_MAIL: &str = "503 5.5.1 Error: nested MAIL command\r\n";
    /// RCPT before MAIL.
    pub const NEED_MAIL: &str = "503 5.5.1 Error: need MAIL command\r\n";
    /// DATA/BDAT before any accepted RCPT.
    pub const NEED_RCPT: &str = "503 5.5.1 Error: need RCPT command\r\n";
    /// DATA after BDAT in the same transaction.
    pub const DATA_AFTER_BDAT: &str = "503 5.5.1 Error: DATA not allowed after BDAT\r\n";
    /// DATA with BODY=BINARYMIME.
    pub const BINARY_NEEDS_BDAT: &str = "503 5.5.1 Error: BINARYMIME requires BDAT\r\n";
    /// STARTTLS inside TLS.
    pub const ALREADY_TLS: &str = "503 5.5.1 Error: TLS already active\r\n";
    /// STARTTLS or AUTH inside a mail transaction.
    pub const IN_TRANSACTION: &str = "503 5.5.1 Error: not allowed during a mail transaction\r\n";
    /// A second successful AUTH.
    pub const ALREADY_AUTH: &str = "503 5.5.1 Error: already authenticated\r\n";
}

/// Syntax replies (`501`).
pub mod syntax {
    /// EHLO/HELO without a usable argument.
    pub const HELO: &str = "501 5.5.4 Syntax: EHLO hostname\r\n";
    /// MAIL without `FROM:`.
    pub const MAIL: &str = "501 5.5.4 Syntax: MAIL FROM:<address>\r\n";
    /// RCPT without `TO:`.
    pub const RCPT: &str = "501 5.5.4 Syntax: RCPT TO:<address>\r\n";
    /// Argument where none is allowed.
    pub const NO_ARGS: &str = "501 5.5.4 Syntax: no parameters allowed\r\n";
    /// BDAT without a valid size.
    pub const BDAT: &str = "501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n";
}

/// Longest reply line accepted from a server, CRLF included. RFC 5321 §4.5.3.1.5 sets 512, but
/// real servers send longer text; past this cap the peer is not speaking SMTP.
pub const MAX_REPLY_LINE: usize = 2048;

/// Longest whole (multi-line) reply accepted from a server. EHLO replies are the longest seen in
/// practice and stay far below it.
pub const MAX_REPLY: usize = 64 * 1024;

/// A reply received from (or synthesized on behalf of) a server (RFC 5321 §4.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The RFC 3463 `class.subject.detail` enhanced code from the start of the first line's text,
    /// when present and its class matches the code's first digit (RFC 2034 §4).
    pub enhanced: Option<(u8, u16, u16)>,
    /// The lines' texts joined with `\n` (lossy UTF-8), without the codes: the enhanced code is
    /// removed from every line that repeats the first line's.
    pub text: String,
}

/// Every reply the relay makes up on the outbound side, where no server said anything: a
/// transaction the client refuses before sending it, a connection that could not be made or
/// broke, a failed lookup, an expired message. These end up in outcome records, attempt log
/// lines and DSNs; [`LocalFault::reply`] is the one place that gives each its code, enhanced
/// code (RFC 3463) and text.
#[derive(Clone, Copy, Debug)]
pub enum LocalFault<'a> {
    /// A transaction started on a session that is not ready (a driver bug): retried.
    SessionNotReady,
    /// A transaction queued where none may be (a driver bug): retried.
    CannotQueue,
    /// A transaction without recipients.
    NoRecipients,
    /// An envelope field holds CR or LF: sending it would inject a command.
    EnvelopeCrLf,
    /// The message needs SMTPUTF8 (RFC 6531 §3.4) and the server does not offer it.
    NoSmtpUtf8,
    /// `BODY=BINARYMIME` to a server without BINARYMIME and CHUNKING (RFC 3030 §3).
    NoBinaryMime,
    /// Larger than the server's `SIZE` (RFC 1870 §6).
    TooBig {
        /// The server's limit.
        limit: u64,
    },
    /// A permanent refusal of MAIL right after a refused BDAT: the server's state is unknown
    /// (a `503` to a nested MAIL), so it is not taken as final.
    MailAfterRefusedBdat(&'a Reply),
    /// A transaction ended without a reply to MAIL.
    NoReply,
    /// Recipients accepted but no reply to the data.
    NoDataReply,
    /// A transaction the session would not queue, without a reply of its own.
    NotQueued,
    /// A recipient left without an outcome (a driver bug): retried.
    NoOutcome,
    /// The message record could not be read back from the spool.
    Unreadable,
    /// The destination is backing off and no failure was recorded.
    DestinationDown,
    /// A site's message rate left no room before the message's lifetime ended.
    RateLimited {
        /// The site.
        site: &'a str,
    },
    /// Delivery to a site is suspended (by an operator or by automation).
    Suspended {
        /// The site or scope.
        site: &'a str,
        /// Why.
        reason: &'a str,
    },
    /// A mail exchanger could not be reached (RFC 3463 X.4.1: no answer from host).
    Connect {
        /// Its name.
        host: &'a str,
        /// The address tried.
        addr: SocketAddr,
        /// Why (the socket error, the refused greeting).
        why: &'a str,
    },
    /// The connection broke during a transaction (X.4.2: bad connection).
    Lost {
        /// `host[ip]` of the peer.
        remote: &'a str,
        /// Why.
        why: &'a str,
    },
    /// No mail exchanger of the destination has an address of the egress source's family
    /// (X.4.4: unable to route): deferred, never bounced, as the source is our choice.
    NoAddressOfFamily {
        /// `IPv4` or `IPv6`.
        family: &'a str,
        /// The source's name.
        source: &'a str,
        /// The mail exchangers' names, comma-separated.
        hosts: &'a str,
    },
    /// The message outlived the queue lifetime (X.4.7); `last` is the last deferral.
    Expired {
        /// The reply of the last attempt.
        last: &'a Reply,
    },
    /// This relay is the best mail exchanger left for the domain (RFC 5321 §5.1; X.4.6).
    LoopsBack {
        /// The domain.
        domain: &'a str,
    },
    /// The lookup of a destination failed: permanent errors bounce (550), others defer (451).
    Dns {
        /// The name looked up.
        domain: &'a str,
        /// What failed.
        error: DnsError,
    },
    /// The TLS policy failed on a host (`encrypt`/`verify`, or a failed handshake).
    Tls {
        /// What failed, with the TLS error.
        detail: &'a str,
        /// X.7.4 or X.7.5 (see `Failure::tls_status`).
        status: (u8, u16, u16),
        /// The host.
        host: &'a str,
        /// Its address.
        addr: SocketAddr,
    },
    /// An operator bounced the recipient (`sluice queue bounce`; X.0.0: other).
    Operator {
        /// The operator's reason (may be empty).
        reason: &'a str,
    },
    /// AUTH to the relay host failed (RFC 4954; `--relay-auth-file`): deferred, never bounced.
    RelayAuth {
        /// What failed, with the server's reply (scrubbed of the credentials).
        detail: &'a str,
        /// X.7.8 from the server's `535 5.7.8`, or X.7.4 (see `Failure::auth_status`).
        status: (u8, u16, u16),
        /// The relay host.
        host: &'a str,
        /// Its address.
        addr: SocketAddr,
    },
}

impl LocalFault<'_> {
    /// The reply recorded for this fault.
    pub fn reply(&self) -> Reply {
        let (code, status, text): (u16, (u8, u16, u16), String) = match *self {
            LocalFault::SessionNotReady => (451, (4, 3, 0), "Internal error: SMTP client session not ready".into()),
            LocalFault::CannotQueue => (451, (4, 3, 0), "Internal error: no transaction can be queued now".into()),
            LocalFault::NoRecipients => (554, (5, 5, 1), "No recipients".into()),
            LocalFault::EnvelopeCrLf => (501, (5, 5, 4), "Envelope field contains CR or LF".into()),
            LocalFault::NoSmtpUtf8 => (553, (5, 6, 7), "Destination does not support SMTPUTF8".into()),
            LocalFault::NoBinaryMime => (554, (5, 6, 3), "Destination does not support BINARYMIME and CHUNKING".into()),
            LocalFault::TooBig { limit } => {
                (552, (5, 3, 4), format!("Message too big for the destination (SIZE limit {limit})"))
            }
            LocalFault::MailAfterRefusedBdat(r) => (451, (4, 5, 0), format!("MAIL refused after a refused BDAT: {r}")),
            LocalFault::NoReply => (451, (4, 4, 0), "no reply".into()),
            LocalFault::NoDataReply => (451, (4, 3, 0), "no reply to the data".into()),
            LocalFault::NotQueued => (451, (4, 3, 0), "transaction not queued".into()),
            LocalFault::NoOutcome => (451, (4, 3, 0), "no outcome".into()),
            LocalFault::Unreadable => (451, (4, 3, 0), "message unreadable in the spool".into()),
            LocalFault::DestinationDown => (451, (4, 4, 1), "destination down".into()),
            LocalFault::RateLimited { site } => {
                (451, (4, 4, 5), format!("delivery to {site} held back by its message rate"))
            }
            LocalFault::Suspended { site, reason } => {
                (451, (4, 4, 5), format!("delivery to {site} suspended: {reason}"))
            }
            LocalFault::Connect { host, addr, why } => (451, (4, 4, 1), format!("connect to {host}[{addr}]: {why}")),
            LocalFault::Lost { remote, why } => (451, (4, 4, 2), format!("lost connection with {remote}: {why}")),
            LocalFault::NoAddressOfFamily { family, source, hosts } => {
                (451, (4, 4, 4), format!("no {family} address for source {source} at {hosts}"))
            }
            LocalFault::Expired { last } => (550, (5, 4, 7), format!("delivery time expired; last error: {last}")),
            LocalFault::LoopsBack { domain } => (554, (5, 4, 6), format!("mail for {domain} loops back to myself")),
            LocalFault::Dns { domain, error } => {
                let code = if error.is_permanent() { 550 } else { 451 };
                (code, error.status(), format!("DNS lookup for {domain}: {}", error.text()))
            }
            LocalFault::Operator { reason: "" } => (554, (5, 0, 0), "Bounced by the operator".into()),
            LocalFault::Operator { reason } => (554, (5, 0, 0), format!("Bounced by the operator: {reason}")),
            LocalFault::Tls { detail, status, host, addr } | LocalFault::RelayAuth { detail, status, host, addr } => {
                (451, status, format!("{detail} ({host}[{addr}])"))
            }
        };
        Reply { code, enhanced: Some(status), text }
    }
}

impl Reply {
    /// A reply made locally, e.g. a refusal decided before anything is sent.
    pub fn new(code: u16, enhanced: Option<(u8, u16, u16)>, text: impl Into<String>) -> Reply {
        Reply { code, enhanced, text: text.into() }
    }

    /// `2yz`: the command was accepted (RFC 5321 §4.2.1).
    pub fn is_positive_completion(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// `3yz`: go on (e.g. `354` to DATA).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// `4yz`: transient negative completion; the same command may succeed later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// `5yz`: permanent negative completion.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }
}

/// One line, for logs and DSN `Diagnostic-Code` fields: `550 5.1.1 text`, the lines of a
/// multi-line reply separated by a space.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some((c, s, d)) = self.enhanced {
            write!(f, " {c}.{s}.{d}")?;
        }
        for (i, line) in self.text.split('\n').enumerate() {
            if i == 0 && line.is_empty() {
                continue;
            }
            write!(f, " {line}")?;
        }
        Ok(())
    }
}

/// What [`parse_reply`] found at the front of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyParse {
    /// A whole reply, and the bytes it used (through the last line's LF).
    Complete {
        /// The reply.
        reply: Reply,
        /// Bytes to drop from the input.
        consumed: usize,
    },
    /// The last line has not arrived yet: read more and call again with the same bytes first.
    Partial,
    /// Not an SMTP reply: a line without a valid `ddd`+SP/`-` head, codes that change between
    /// lines, a line over [`MAX_REPLY_LINE`] or a reply over [`MAX_REPLY`]. `consumed` runs
    /// through the offending line (or all of the input when it has no end yet).
    Malformed {
        /// Bytes to drop.
        consumed: usize,
    },
}

/// Frames and parses one reply (RFC 5321 §4.2): `ddd-text` continuation lines, then `ddd text`
/// (or a bare `ddd`). Lines end in CRLF; a bare LF is tolerated (RFC 5321 §4.5.3.1.5 asks
/// clients to be liberal here, and nothing is smuggled through a reply).
///
/// The lines are framed and checked first without allocating; the text is built only once the
/// reply is complete.
pub fn parse_reply(input: &[u8]) -> ReplyParse {
    let mut pos = 0;
    let mut code = 0u16;
    let mut lines = 0usize;
    loop {
        let rest = &input[pos..];
        let window = &rest[..rest.len().min(MAX_REPLY_LINE)];
        let Some(lf) = memchr(b'\n', window) else {
            if rest.len() >= MAX_REPLY_LINE || !head_prefix_ok(rest) {
                return ReplyParse::Malformed { consumed: input.len() };
            }
            return ReplyParse::Partial;
        };
        let end = pos + lf + 1;
        let Some((c, last)) = line_head(strip_cr(&rest[..lf])) else {
            return ReplyParse::Malformed { consumed: end };
        };
        if (lines > 0 && c != code) || end > MAX_REPLY {
            return ReplyParse::Malformed { consumed: end };
        }
        code = c;
        lines += 1;
        pos = end;
        if last {
            break;
        }
    }
    ReplyParse::Complete { reply: build_reply(code, &input[..pos]), consumed: pos }
}

/// Builds the [`Reply`] from framed, validated lines.
fn build_reply(code: u16, framed: &[u8]) -> Reply {
    let mut text = String::new();
    let mut enhanced = None;
    let lines = framed.strip_suffix(b"\n").unwrap_or(framed).split(|&b| b == b'\n');
    for (i, line) in lines.enumerate() {
        let line = strip_cr(line);
        let mut t = line.get(4..).unwrap_or(b"");
        if i == 0 {
            if let Some((e, n)) = parse_enhanced(t) {
                if u16::from(e.0) == code / 100 {
                    enhanced = Some(e);
                    t = &t[n..];
                }
            }
        } else {
            text.push('\n');
            if let (Some(first), Some((e, n))) = (enhanced, parse_enhanced(t)) {
                if e == first {
                    t = &t[n..];
                }
            }
        }
        text.push_str(&String::from_utf8_lossy(t));
    }
    Reply { code, enhanced, text }
}

#[inline]
fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The code and "is last line" of a reply line: three digits, the first 2-5 (RFC 5321 §4.2),
/// then SP, `-` or nothing.
fn line_head(line: &[u8]) -> Option<(u16, bool)> {
    if line.len() < 3 || !matches!(line[0], b'2'..=b'5') || !line[1].is_ascii_digit() || !line[2].is_ascii_digit() {
        return None;
    }
    let code = u16::from(line[0] - b'0') * 100 + u16::from(line[1] - b'0') * 10 + u16::from(line[2] - b'0');
    match line.get(3) {
        None | Some(b' ') => Some((code, true)),
        Some(b'-') => Some((code, false)),
        _ => None,
    }
}

/// Whether an unterminated line could still become a valid reply line: lets a peer that is
/// not speaking SMTP be refused at once instead of after [`MAX_REPLY_LINE`] bytes.
fn head_prefix_ok(part: &[u8]) -> bool {
    part.iter().take(4).enumerate().all(|(i, &b)| match i {
        0 => matches!(b, b'2'..=b'5'),
        1 | 2 => b.is_ascii_digit(),
        _ => matches!(b, b' ' | b'-' | b'\r'),
    })
}

/// An RFC 3463 status code at the start of `t` (`class.subject.detail`, class 2, 4 or 5,
/// subject and detail 1-3 digits) followed by SP or the end; returns it and the bytes it used
/// including one following SP.
fn parse_enhanced(t: &[u8]) -> Option<((u8, u16, u16), usize)> {
    let class = *t.first()?;
    if !matches!(class, b'2' | b'4' | b'5') || t.get(1) != Some(&b'.') {
        return None;
    }
    let (subject, n1) = digits(&t[2..])?;
    if t.get(2 + n1) != Some(&b'.') {
        return None;
    }
    let (detail, n2) = digits(&t[3 + n1..])?;
    let end = 3 + n1 + n2;
    match t.get(end) {
        None => Some(((class - b'0', subject, detail), end)),
        Some(b' ') => Some(((class - b'0', subject, detail), end + 1)),
        _ => None,
    }
}

/// One to three leading ASCII digits as a number, and how many there were.
fn digits(t: &[u8]) -> Option<(u16, usize)> {
    let n = t.iter().take(3).take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || t.get(n).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    Some((t[..n].iter().fold(0u16, |acc, &b| acc * 10 + u16::from(b - b'0')), n))
}

/// The service extensions a server advertised in its EHLO reply (RFC 5321 §4.1.1.1, §2.2.2).
/// After a HELO fallback everything is off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `PIPELINING` (RFC 2920).
    pub pipelining: bool,
    /// `SIZE [n]` (RFC 1870): `None` when not advertised, `Some(0)` when advertised without a
    /// limit (no number, `0`, or a number that does not parse), else `Some(limit in octets)`.
    pub size: Option<u64>,
    /// `8BITMIME` (RFC 6152).
    pub eightbitmime: bool,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `CHUNKING` (RFC 3030): BDAT is available.
    pub chunking: bool,
    /// `BINARYMIME` (RFC 3030): `BODY=BINARYMIME` is accepted (needs CHUNKING too).
    pub binarymime: bool,
    /// `DSN` (RFC 3461): RET/ENVID/NOTIFY/ORCPT may be sent.
    pub dsn: bool,
    /// `STARTTLS` (RFC 3207).
    pub starttls: bool,
    /// `ENHANCEDSTATUSCODES` (RFC 2034).
    pub enhancedstatuscodes: bool,
    /// `AUTH` mechanisms (RFC 4954), upper-cased, in advertised order; also read from the old
    /// `AUTH=` form.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Reads the keywords of a positive EHLO reply. The first line is the server's name and
    /// greeting and is skipped; keywords are case-insensitive; unknown ones are ignored.
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.text.split('\n').skip(1) {
            // `AUTH=PLAIN LOGIN` is the pre-RFC 4954 spelling some servers still send.
            let mut words = line.split(|c: char| c.is_ascii_whitespace() || c == '=').filter(|w| !w.is_empty());
            let Some(keyword) = words.next() else { continue };
            let is = |k: &str| keyword.eq_ignore_ascii_case(k);
            if is("PIPELINING") {
                caps.pipelining = true;
            } else if is("SIZE") {
                caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
            } else if is("8BITMIME") {
                caps.eightbitmime = true;
            } else if is("SMTPUTF8") {
                caps.smtputf8 = true;
            } else if is("CHUNKING") {
                caps.chunking = true;
            } else if is("BINARYMIME") {
                caps.binarymime = true;
            } else if is("DSN") {
                caps.dsn = true;
            } else if is("STARTTLS") {
                caps.starttls = true;
            } else if is("ENHANCEDSTATUSCODES") {
                caps.enhancedstatuscodes = true;
            } else if is("AUTH") {
                for mech in words {
                    let mech = mech.to_ascii_uppercase();
                    if !caps.auth.contains(&mech) {
                        caps.auth.push(mech);
                    }
                }
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_pool_names_the_pool_safely() {
        let mut buf = [0u8; 128];
        assert_eq!(unknown_pool(b"bulk", &mut buf), b"550 5.7.1 Unknown egress pool \"bulk\"\r\n");
        let long = [b'x'; 300];
        let r = unknown_pool(&long, &mut buf).to_vec();
        assert!(r.ends_with(b"\"\r\n") && r.len() == 31 + 64 + 3);
        assert_eq!(unknown_pool(b"a\"\r\n\x80", &mut buf), b"550 5.7.1 Unknown egress pool \"a????\"\r\n");
    }

    fn complete(input: &[u8]) -> (Reply, usize) {
        match parse_reply(input) {
            ReplyParse::Complete { reply, consumed } => (reply, consumed),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
        }
    }

    #[test]
    fn parse_table() {
        // (input, code, enhanced, text, consumed)
        type Row = (&'static [u8], u16, Option<(u8, u16, u16)>, &'static str, usize);
        let table: &[Row] = &[
            (b"220 mx.example ESMTP\r\n", 220, None, "mx.example ESMTP", 22),
            (b"250 2.1.0 Sender ok\r\nNEXT", 250, Some((2, 1, 0)), "Sender ok", 21),
            (b"354\r\n", 354, None, "", 5),
            (b"250 \r\n", 250, None, "", 6),
            (b"550 5.1.1\r\n", 550, Some((5, 1, 1)), "", 11),
            (b"250 ok\n", 250, None, "ok", 7),
            (
                b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
                250,
                None,
                "mx.example\nPIPELINING\nSIZE 1000",
                47,
            ),
            (
                b"550-5.1.1 The account\r\n550-5.1.1 does not exist\r\n550 5.1.1 https://help\r\n",
                550,
                Some((5, 1, 1)),
                "The account\ndoes not exist\nhttps://help",
                73,
            ),
            // Class must match the code; otherwise the text is kept as is.
            (b"250 5.1.1 odd\r\n", 250, None, "5.1.1 odd", 15),
            (b"452 4.5.3 Too many\r\n", 452, Some((4, 5, 3)), "Too many", 20),
            (b"250 2.0.0queued\r\n", 250, None, "2.0.0queued", 17),
            (b"250 2.0.1000 x\r\n", 250, None, "2.0.1000 x", 16),
            (b"421 4.4.2 bye\r\n", 421, Some((4, 4, 2)), "bye", 15),
            ("250 caf\u{e9}\r\n".as_bytes(), 250, None, "caf\u{e9}", 11),
            (b"250 caf\xe9\r\n", 250, None, "caf\u{fffd}", 10),
        ];
        for &(input, code, enhanced, text, consumed) in table {
            let (r, n) = complete(input);
            assert_eq!((r.code, r.enhanced, r.text.as_str(), n), (code, enhanced, text, consumed), "{input:?}");
        }
    }

    #[test]
    fn partial_and_malformed() {
        for input in [&b""[..], b"2", b"25", b"250", b"250 ok", b"250 ok\r", b"250-a\r\n", b"250-a\r\n250 b"] {
            assert_eq!(parse_reply(input), ReplyParse::Partial, "{input:?}");
        }
        let table: &[(&[u8], usize)] = &[
            (b"hello\r\n", 7),
            (b"HTTP/1.1 400", 12),
            (b"25x ok\r\n", 8),
            (b"150 ok\r\n", 8),
            (b"250_ok\r\n", 8),
            (b"25\r\n", 4),
            (b"250-a\r\n251 b\r\n", 14),
            (b"250-a\r\nxyz\r\n", 12),
        ];
        for &(input, consumed) in table {
            assert_eq!(parse_reply(input), ReplyParse::Malformed { consumed }, "{input:?}");
        }
        let mut long = b"250 ".to_vec();
        long.resize(MAX_REPLY_LINE + 10, b'x');
        assert_eq!(parse_reply(&long), ReplyParse::Malformed { consumed: long.len() });
        let mut huge = Vec::new();
        while huge.len() <= MAX_REPLY {
            huge.extend_from_slice(b"250-0123456789012345678901234567890123456789\r\n");
        }
        huge.extend_from_slice(b"250 end\r\n");
        assert!(matches!(parse_reply(&huge), ReplyParse::Malformed { .. }));
    }

    #[test]
    fn display() {
        let (r, _) = complete(b"550-5.1.1 No such\r\n550 5.1.1 user\r\n");
        assert_eq!(r.to_string(), "550 5.1.1 No such user");
        assert_eq!(Reply::new(354, None, "").to_string(), "354");
        assert_eq!(Reply::new(250, None, "ok").to_string(), "250 ok");
        assert!(r.is_permanent() && !r.is_transient() && !r.is_intermediate() && !r.is_positive_completion());
        assert!(Reply::new(451, None, "").is_transient());
        assert!(Reply::new(354, None, "").is_intermediate());
        assert!(Reply::new(251, None, "").is_positive_completion());
    }

    #[test]
    fn capabilities() {
        let table: &[(&[u8], Capabilities)] = &[
            (b"250 mx.example\r\n", Capabilities::default()),
            (
                b"250-mx.example PIPELINING SIZE 99\r\n250-pipelining\r\n250-Size 1000\r\n250-8BITMIME\r\n\
                  250-SMTPUTF8\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-DSN\r\n250-STARTTLS\r\n\
                  250-AUTH PLAIN login\r\n250-AUTH=LOGIN CRAM-MD5\r\n250-X-UNKNOWN 1\r\n250 ENHANCEDSTATUSCODES\r\n",
                Capabilities {
                    pipelining: true,
                    size: Some(1000),
                    eightbitmime: true,
                    smtputf8: true,
                    chunking: true,
                    binarymime: true,
                    dsn: true,
                    starttls: true,
                    enhancedstatuscodes: true,
                    auth: vec!["PLAIN".into(), "LOGIN".into(), "CRAM-MD5".into()],
                },
            ),
            (b"250-mx\r\n250 SIZE\r\n", Capabilities { size: Some(0), ..Capabilities::default() }),
            (b"250-mx\r\n250 SIZE 0\r\n", Capabilities { size: Some(0), ..Capabilities::default() }),
            (b"250-mx\r\n250 SIZE lots\r\n", Capabilities { size: Some(0), ..Capabilities::default() }),
            (b"250-mx\r\n250-\r\n250 DSN\r\n", Capabilities { dsn: true, ..Capabilities::default() }),
        ];
        for (input, caps) in table {
            let (r, _) = complete(input);
            assert_eq!(&Capabilities::from_ehlo(&r), caps, "{:?}", String::from_utf8_lossy(input));
        }
    }
}
