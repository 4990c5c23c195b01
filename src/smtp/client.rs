//! Pure: the outbound SMTP client session (RFC 5321 §3, §4; PIPELINING RFC 2920; SIZE RFC 1870;
//! 8BITMIME RFC 6152; SMTPUTF8 RFC 6531; DSN RFC 3461; CHUNKING/BINARYMIME RFC 3030).
//!
//! [`ClientSession`] owns the dialogue with one server: greeting, EHLO (HELO fallback), any
//! number of transactions on the same connection, QUIT. It never touches a socket or reads the
//! clock: replies come in as bytes, commands and the dot-stuffed message go out into the
//! caller's [`Buf`], and time comes in as `now`. The driver in `crate::net` does the I/O.
//!
//! STARTTLS (RFC 3207) is decided here and done by the driver: when the EHLO reply offers it
//! and [`ClientConfig::tls`] asks for it, the session sends `STARTTLS` alone, and on `220`
//! asks the driver to run the handshake ([`ClientEvent::StartTls`]); once told it is done it
//! says EHLO again and forgets what it learnt in the clear (RFC 3207 §4.2). Under
//! [`TlsPolicy::Implicit`] (RFC 8314 §3.3) the driver runs the handshake from the first byte
//! and the session only waits for it before the greeting.
//!
//! AUTH (RFC 4954) to a smarthost, when [`ClientConfig::auth`] holds credentials: after EHLO,
//! only once the transport is TLS (never in the clear: without TLS the session fails with
//! [`FailureKind::AuthNeedsTls`] before sending anything), `AUTH PLAIN` with its initial
//! response (RFC 4616), or `AUTH LOGIN` and its two `334` challenges when the server offers
//! only LOGIN. A refusal fails the session with [`FailureKind::AuthFailed`] and the server's
//! reply, scrubbed of every secret; no offered mechanism, with [`FailureKind::AuthNoMechanism`].
//!
//! The message goes as one chunk, `BDAT n LAST` and the raw stored body, whenever the server
//! offers CHUNKING (RFC 3030), whatever its `BODY=` type; else by DATA, dot-stuffed. With
//! PIPELINING too and a body of at most [`PIPELINED_CHUNK_MAX`] octets, the chunk follows MAIL
//! and the RCPTs in the same batch, so a transaction costs one round trip instead of two (no
//! wait for `354`, nor for the envelope replies before a `BDAT`). With PIPELINING the next
//! transaction's envelope may also follow the end of the current message in the same write
//! (RFC 2920 §3.1, [`ClientSession::queue_next`]), so a stream of DATA messages costs one
//! round trip each as well.
//!
//! A message sent by DATA must be lines of CRLF-terminated text of at most 998 octets
//! (RFC 5321 §2.3.8, §4.5.3.1.6; RFC 5322 §2.1.1). One received by BDAT need not be (BDAT
//! carries any octets), so before DATA the body is checked once in bulk and, only when needed,
//! copied normalised: bare CR and bare LF become CRLF, and longer lines are broken by
//! inserting CRLF SP (as Postfix's `smtp_line_length_limit` does; in a header the break is a
//! fold). The stored message is never changed.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memchr::memmem;

use super::client_auth::RelayCredentials;
use super::reply::{parse_reply, Capabilities, LocalFault, Reply, ReplyParse, MAX_REPLY};
use crate::buf::Buf;
use crate::message::{notify, BodyType, Ret};

/// Largest body sent as `BDAT n LAST` right behind MAIL and the RCPTs, before any of their
/// replies (RFC 2920 §3.1; RFC 3030 §4.2: the server must read and discard a chunk whose
/// envelope it refused, and answer it with an error). A refused envelope thus wastes at most
/// this many octets of the link, about what a socket send buffer holds anyway; in exchange the
/// usual message (well under this) costs one round trip. A larger body takes many round trips
/// of its own to transfer, so waiting for the envelope replies first costs it little in share,
/// while the waste on a refusal would grow with its size.
pub const PIPELINED_CHUNK_MAX: u64 = 64 * 1024;

/// Client timeouts (RFC 5321 §4.5.3.1). Each runs from the last progress (a reply received or
/// bytes handed to `out`), so a long pipelined batch or a large body never times out while it
/// moves. All public so the driver can shorten them from flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// Waiting for the `220` greeting (§4.5.3.1.1: 5 minutes).
    pub greeting: Duration,
    /// Waiting for the reply to EHLO, HELO, MAIL, RCPT, RSET or QUIT (§4.5.3.1.2-3: 5 minutes).
    pub command: Duration,
    /// Waiting for the `354` to DATA (§4.5.3.1.4: 2 minutes).
    pub data_init: Duration,
    /// Between two pieces of the message handed out (§4.5.3.1.5: 3 minutes per block).
    pub data_block: Duration,
    /// Waiting for the reply after the end of data (§4.5.3.1.6: 10 minutes); also for the
    /// reply to `BDAT n LAST`, and for every reply of a pipelined batch once its chunk is out.
    pub data_end: Duration,
    /// The TLS handshake after the `220` to STARTTLS (`--tls-handshake-timeout`, 30 s).
    pub tls_handshake: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> ClientTimeouts {
        ClientTimeouts {
            greeting: Duration::from_secs(5 * 60),
            command: Duration::from_secs(5 * 60),
            data_init: Duration::from_secs(2 * 60),
            data_block: Duration::from_secs(3 * 60),
            data_end: Duration::from_secs(10 * 60),
            tls_handshake: Duration::from_secs(30),
        }
    }
}

/// Whether a session uses STARTTLS (RFC 3207); the driver picks it per connection from
/// `--outbound-tls` (and from what it remembers about the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Never send STARTTLS (`--outbound-tls none`, or the plaintext retry after a handshake
    /// failed under `may`).
    Off,
    /// STARTTLS when the server offers it; plaintext when it does not, or refuses the command
    /// (`may`). A failed handshake ends the session: the driver retries in plaintext.
    Opportunistic,
    /// TLS or nothing (`encrypt`, `verify`): no STARTTLS offered, or STARTTLS refused, fails
    /// the session with [`FailureKind::TlsNotOffered`] / [`FailureKind::TlsRefused`].
    Required,
    /// TLS from the first byte (RFC 8314 §3.3, `--relay-tls implicit`): the driver starts the
    /// handshake on connect and reports it like one after STARTTLS; the greeting is awaited
    /// once it is done, and STARTTLS is never sent.
    Implicit,
}

/// Per-connection constants for outbound sessions.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The name sent in EHLO/HELO (RFC 5321 §4.1.1.1): the relay's `--hostname`.
    pub helo_name: String,
    /// Per-phase timeouts.
    pub timeouts: ClientTimeouts,
    /// STARTTLS on this connection.
    pub tls: TlsPolicy,
    /// Credentials for AUTH (RFC 4954) after EHLO, sent only inside TLS (`--relay-auth-file`).
    pub auth: Option<Arc<RelayCredentials>>,
}

/// What the session is waiting for; names the timeout that applies (RFC 5321 §4.5.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The `220` greeting.
    Greeting,
    /// The EHLO reply.
    Ehlo,
    /// The HELO reply (after EHLO was refused).
    Helo,
    /// The reply to STARTTLS (RFC 3207 §4; the command timeout).
    StartTls,
    /// The driver's TLS handshake after `220` to STARTTLS, or on connect under
    /// [`TlsPolicy::Implicit`] (`--tls-handshake-timeout`).
    TlsHandshake,
    /// A reply in the AUTH exchange (RFC 4954 §4; the command timeout).
    Auth,
    /// The MAIL reply.
    Mail,
    /// A RCPT reply.
    Rcpt,
    /// The `354` to DATA.
    DataInit,
    /// Room to hand out the next piece of the message.
    DataBlock,
    /// The reply after the end of data (or to `BDAT ... LAST`; with the chunk pipelined, any
    /// reply of the batch once the whole chunk is out).
    DataEnd,
    /// The RSET reply.
    Rset,
    /// The QUIT reply.
    Quit,
}

impl Phase {
    /// Lower-case name for log lines.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Greeting => "greeting",
            Phase::Ehlo => "EHLO",
            Phase::Helo => "HELO",
            Phase::StartTls => "STARTTLS",
            Phase::TlsHandshake => "TLS handshake",
            Phase::Auth => "AUTH",
            Phase::Mail => "MAIL",
            Phase::Rcpt => "RCPT",
            Phase::DataInit => "DATA",
            Phase::DataBlock => "data block",
            Phase::DataEnd => "end of data",
            Phase::Rset => "RSET",
            Phase::Quit => "QUIT",
        }
    }
}

/// Why a session died (connection level; the driver closes the socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No reply (or no room to write) within the phase's timeout.
    Timeout(Phase),
    /// The peer closed the connection (outside QUIT).
    Closed,
    /// The peer broke the protocol: a malformed reply, a reply to no command, `354` without
    /// recipients. Temporary: another attempt may reach a better-behaved host.
    Protocol(&'static str),
    /// `421` at any point, or another `4yz` greeting (RFC 5321 §3.8): try again later.
    ServiceClosing,
    /// A `5yz` greeting (RFC 5321 §3.1, e.g. `554 No SMTP service here`): permanent.
    GreetingRefused,
    /// HELO refused (after EHLO got `5yz`), or EHLO refused with a `4yz` other than `421`:
    /// permanent when the reply is `5yz`.
    HeloRefused,
    /// `quit()` was called while the session was busy (greeting, EHLO or a transaction): the
    /// session ends without a QUIT; whatever was in flight is deferred.
    Aborted,
    /// [`TlsPolicy::Required`] and the EHLO reply does not offer STARTTLS (or only HELO
    /// worked).
    TlsNotOffered,
    /// [`TlsPolicy::Required`] and STARTTLS got something other than `220`.
    TlsRefused,
    /// The driver reported a failed TLS handshake (or the peer closed during it); the
    /// driver knows the details.
    TlsHandshake,
    /// AUTH was refused (`535 5.7.8` bad credentials, `454`, `534`...; the reply, scrubbed of
    /// the credentials, is attached): temporary for the mail, the operator must act.
    AuthFailed,
    /// Credentials are set but the EHLO reply (inside TLS) offers neither PLAIN nor LOGIN.
    AuthNoMechanism,
    /// Credentials are set and the transport is not TLS (a policy that allows plaintext):
    /// AUTH is never sent in the clear.
    AuthNeedsTls,
}

/// A connection-level failure: the session is dead. Recipients of a transaction in flight got
/// no [`TxResult`]; the driver treats them as deferred (or bounced when [`Failure::is_permanent`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The reply that caused it, when one did.
    pub reply: Option<Reply>,
    /// What happened.
    pub kind: FailureKind,
}

impl Failure {
    /// True when retrying the same server cannot help (a `5yz` greeting or HELO refusal).
    /// TLS failures never are: the host may be fixed, and `may` retries in plaintext.
    pub fn is_permanent(&self) -> bool {
        match self.kind {
            FailureKind::GreetingRefused => true,
            FailureKind::HeloRefused => self.reply.as_ref().is_some_and(Reply::is_permanent),
            _ => false,
        }
    }

    /// True when the TLS handshake itself failed or timed out (the case where `may` retries
    /// the host in plaintext).
    pub fn is_tls_handshake(&self) -> bool {
        matches!(self.kind, FailureKind::TlsHandshake | FailureKind::Timeout(Phase::TlsHandshake))
    }

    /// For a failure of the TLS policy, the enhanced status code of the temporary failure
    /// it causes (RFC 3463 §3.8: X.7.4 security features not supported, X.7.5 cryptographic
    /// failure); `None` for other failures.
    pub fn tls_status(&self) -> Option<(u8, u16, u16)> {
        match self.kind {
            FailureKind::TlsNotOffered | FailureKind::TlsRefused | FailureKind::AuthNeedsTls => Some((4, 7, 4)),
            _ if self.is_tls_handshake() => Some((4, 7, 5)),
            _ => None,
        }
    }

    /// For a failure of AUTH to the relay host, the enhanced status code of the temporary
    /// failure it causes (RFC 3463 §3.8): the server's own subject and detail when it gave
    /// them (`535 5.7.8` -> 4.7.8), else X.7.8 (authentication credentials invalid); X.7.4
    /// when no mechanism fits. `None` for other failures.
    pub fn auth_status(&self) -> Option<(u8, u16, u16)> {
        match self.kind {
            FailureKind::AuthFailed => {
                Some(self.reply.as_ref().and_then(|r| r.enhanced).map_or((4, 7, 8), |(_, s, d)| (4, s, d)))
            }
            FailureKind::AuthNoMechanism => Some((4, 7, 4)),
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FailureKind::Timeout(p) => write!(f, "timeout waiting for {}", p.name())?,
            FailureKind::Closed => f.write_str("connection closed by the server")?,
            FailureKind::Protocol(what) => write!(f, "protocol error: {what}")?,
            FailureKind::ServiceClosing => f.write_str("service closing")?,
            FailureKind::GreetingRefused => f.write_str("greeting refused")?,
            FailureKind::HeloRefused => f.write_str("EHLO/HELO refused")?,
            FailureKind::Aborted => f.write_str("aborted locally")?,
            FailureKind::TlsNotOffered => f.write_str("TLS required but not offered by host")?,
            FailureKind::TlsRefused => f.write_str("TLS required but STARTTLS refused by host")?,
            FailureKind::TlsHandshake => f.write_str("TLS handshake failed")?,
            FailureKind::AuthFailed => f.write_str("authentication to the relay host failed")?,
            FailureKind::AuthNoMechanism => {
                f.write_str("no AUTH mechanism sluice supports (PLAIN, LOGIN) offered by host")?
            }
            FailureKind::AuthNeedsTls => f.write_str("AUTH refused without TLS: never sent in the clear")?,
        }
        if let Some(r) = &self.reply {
            write!(f, ": {r}")?;
        }
        Ok(())
    }
}

/// One recipient of a [`TxSpec`], as stored in the spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxRcpt<'a> {
    /// Forward path without angle brackets.
    pub addr: &'a [u8],
    /// [`crate::message::notify`] bits; 0 sends no NOTIFY (RFC 3461 §4.1).
    pub notify: u8,
    /// ORCPT value as received (`addr-type;xtext`), empty for none (RFC 3461 §4.2).
    pub orcpt: &'a [u8],
}

/// One transaction to run (RFC 5321 §3.3), borrowed for the [`ClientSession::start_transaction`]
/// call only: the commands are rendered at once.
#[derive(Clone, Debug)]
pub struct TxSpec<'a> {
    /// Reverse path without angle brackets; empty for the null sender `<>`.
    pub sender: &'a [u8],
    /// Recipients, in order; [`TxResult::rcpt_replies`] follows this order.
    pub rcpts: Vec<TxRcpt<'a>>,
    /// Message size in octets (without dot-stuffing), for `SIZE=` (RFC 1870 §6); it also
    /// decides whether a `BDAT` chunk is pipelined ([`PIPELINED_CHUNK_MAX`]).
    pub body_len: u64,
    /// `BODY=` to declare (RFC 6152, RFC 3030).
    pub body_type: BodyType,
    /// The message needs SMTPUTF8 (RFC 6531 §3.4).
    pub smtputf8: bool,
    /// `RET=` (RFC 3461 §4.3).
    pub ret: Ret,
    /// `ENVID=` as received, in xtext; empty for none (RFC 3461 §4.4).
    pub envid: &'a [u8],
}

/// How one transaction ended.
///
/// Recipient `i` was delivered when `rcpt_replies[i]` and `data_reply` are both `2yz`;
/// [`TxResult::outcome`] gives the reply that decided each recipient's fate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxResult {
    /// The reply to MAIL (or the refusal synthesized before sending anything).
    pub mail_reply: Reply,
    /// One per [`TxSpec::rcpts`] entry, same order. When MAIL was refused, each is the MAIL reply.
    pub rcpt_replies: Vec<Reply>,
    /// The final reply after the data, or the refusal of DATA itself. `None` when MAIL failed
    /// or no RCPT was accepted.
    pub data_reply: Option<Reply>,
}

impl TxResult {
    /// The reply that decided recipient `i`: its RCPT reply when refused, else the data reply.
    pub fn outcome(&self, i: usize) -> &Reply {
        let rcpt = &self.rcpt_replies[i];
        match &self.data_reply {
            Some(data) if rcpt.is_positive_completion() => data,
            _ => rcpt,
        }
    }
}

/// What the driver must act on; see [`ClientSession::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Greeting and EHLO are done, or a transaction has ended: `start_transaction` or `quit`.
    Ready,
    /// A transaction ended (a [`ClientEvent::Ready`] follows once the connection is usable).
    TransactionDone(TxResult),
    /// The server answered `220` to STARTTLS (RFC 3207 §4): discard any plaintext not yet
    /// read, start the TLS handshake on the socket, then call
    /// [`ClientSession::handle_tls_established`] or [`ClientSession::handle_tls_failed`].
    StartTls,
    /// The session is dead: close the connection.
    Failed(Failure),
    /// QUIT was answered (or the peer closed after QUIT): close the connection.
    Closed,
}

impl std::error::Error for Failure {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for the `220`.
    Greeting,
    /// EHLO (`esmtp`) or HELO queued/sent.
    Hello { esmtp: bool },
    /// STARTTLS queued/sent, alone.
    StartTls,
    /// `220` to STARTTLS received; the driver runs the handshake. Input is discarded.
    TlsHandshake,
    /// An AUTH command or response queued/sent, alone (RFC 4954 §4).
    Auth(AuthStep),
    /// Idle between transactions.
    Ready,
    /// MAIL, RCPTs and DATA (or `BDAT n LAST` and its chunk, [`Transfer::BdatPipelined`])
    /// queued/sent; replies are matched by index.
    Envelope,
    /// Handing out the message (after `354`, or BDAT header plus chunk once the envelope
    /// replies are in).
    Body,
    /// Waiting for the final reply.
    DataEnd,
    /// RSET queued/sent after a transaction that left the server mid-transaction.
    Rset,
    /// QUIT queued/sent.
    Quit,
    /// Failed or closed: everything is ignored.
    Done,
}

/// Where an AUTH exchange stands: what was sent last, whose reply is awaited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthStep {
    /// `AUTH PLAIN <initial response>`: `235` or a refusal.
    Plain,
    /// `AUTH LOGIN`: the `334` for the user name.
    Login,
    /// The user name: the `334` for the password.
    User,
    /// The password: `235` or a refusal.
    Password,
}

/// How the message goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transfer {
    /// `DATA`, `354`, the dot-stuffed message, `.` (no CHUNKING).
    Data,
    /// `BDAT n LAST` and the raw message once the envelope replies are in (CHUNKING, but no
    /// PIPELINING or a body over [`PIPELINED_CHUNK_MAX`]).
    Bdat,
    /// `BDAT n LAST` and the raw message in the envelope's batch, before any reply.
    BdatPipelined,
}

/// The transaction in flight.
#[derive(Debug)]
struct Tx {
    rcpts: usize,
    transfer: Transfer,
    mail_reply: Option<Reply>,
    rcpt_replies: Vec<Reply>,
    accepted: usize,
    /// Its MAIL went out behind a `BDAT` the server then refused: the server's state was
    /// indeterminate (RFC 3030 §2), so a refused MAIL may be about the previous transaction
    /// (`503` nested MAIL) and is only taken as a temporary failure.
    suspect: bool,
}

/// Where the message copy stands (see [`ClientSession::poll_transmit`]).
#[derive(Debug, Clone, Copy)]
struct BodyCursor {
    /// Next body octet to hand out.
    off: usize,
    /// DATA: next line-start dot at or after `off` (`body.len()` when none); `usize::MAX`
    /// until the first call has seen the body.
    next_dot: usize,
    /// DATA: bytes of the end-of-data line already out.
    tail: usize,
    /// BDAT: the chunk's length, once `BDAT n LAST` is queued (it is known only from the body
    /// handed to `poll_transmit`).
    chunk: Option<usize>,
    /// DATA: the body has bare CR/LF or over-long lines, and is copied normalised.
    normalise: bool,
    /// DATA, normalising: octets of the current output line so far.
    col: usize,
    /// DATA, normalising: the next CR or LF at or after `off` (`body.len()` when none).
    next_eol: usize,
    /// DATA, normalising: what is left to write of an inserted CRLF, CRLF SP or stuffing dot.
    ins: &'static [u8],
}

impl BodyCursor {
    const START: BodyCursor = BodyCursor {
        off: 0,
        next_dot: usize::MAX,
        tail: 0,
        chunk: None,
        normalise: false,
        col: 0,
        next_eol: 0,
        ins: b"",
    };
}

/// Longest line DATA may carry, CRLF excluded (RFC 5321 §4.5.3.1.6).
const MAX_DATA_LINE: usize = 998;

/// True when `body` cannot go by DATA as it is: a CR or LF not in a CRLF pair, or a line
/// longer than [`MAX_DATA_LINE`]. Bulk: one `memchr` step per line, and a count of CRs.
fn needs_normalising(body: &[u8]) -> bool {
    let mut line_start = 0;
    let mut lines = 0;
    for lf in memchr::memchr_iter(b'\n', body) {
        if lf == line_start || body[lf - 1] != b'\r' || lf - 1 - line_start > MAX_DATA_LINE {
            return true;
        }
        line_start = lf + 1;
        lines += 1;
    }
    // Every LF has its CR: any other CR is a bare one.
    body.len() - line_start > MAX_DATA_LINE || memchr::memchr_iter(b'\r', body).count() != lines
}

/// Outbound SMTP session with one server.
///
/// # Driving it
/// Quinn-style: inputs are `handle_*`, outputs are `poll_*`. After every input, drain the
/// outputs in this order:
/// 1. [`ClientSession::new`] once the TCP connection is up (the server speaks first).
/// 2. Bytes from the socket: [`ClientSession::handle_input`]; drop the returned prefix and keep
///    the rest for the next call. The peer closing: [`ClientSession::handle_closed`]. The timer
///    firing: [`ClientSession::handle_timeout`].
/// 3. [`ClientSession::poll_event`] until `None`. On [`ClientEvent::Ready`] call
///    [`ClientSession::start_transaction`] (or [`ClientSession::quit`]); on
///    [`ClientEvent::Failed`] or [`ClientEvent::Closed`] close the socket.
/// 4. While [`ClientSession::wants_write`], call [`ClientSession::poll_transmit`] with the
///    transaction's stored message and flush `out` to the socket; call it again whenever
///    `out` has room (the message is copied in pieces that fit).
/// 5. Arm the timer with [`ClientSession::next_deadline`].
///
/// On [`ClientEvent::StartTls`] the driver puts TLS between the socket and the byte streams
/// (dropping unread plaintext), and reports the outcome with
/// [`ClientSession::handle_tls_established`] (before feeding any decrypted input) or
/// [`ClientSession::handle_tls_failed`]. Nothing is ever pipelined behind STARTTLS.
///
/// With PIPELINING, MAIL, every RCPT and DATA go out in one `poll_transmit` (RFC 2920 §3.1)
/// when `out` has room — or, when the server offers CHUNKING too and the body is at most
/// [`PIPELINED_CHUNK_MAX`], MAIL, every RCPT, `BDAT n LAST` and the body; without PIPELINING
/// one command per round trip. Transactions reuse the connection: each ends in
/// [`ClientEvent::TransactionDone`] then [`ClientEvent::Ready`] — unless another was queued
/// behind it with [`ClientSession::queue_next`] (PIPELINING only): its commands go out in the
/// same write as the end of the current message, its replies are read after the current
/// one's, and it becomes current with no `Ready` in between, so each message costs one round
/// trip. On a failure the queued transaction ends with the current one (its recipients got
/// no reply at all).
#[derive(Debug)]
pub struct ClientSession {
    cfg: ClientConfig,
    state: State,
    caps: Capabilities,
    /// Commands rendered for the current step, back to back; `ends[i]` is the end of command `i`.
    cmds: Vec<u8>,
    ends: Vec<usize>,
    /// Bytes of `cmds` handed to `out`.
    written: usize,
    /// Commands whose reply has been read.
    answered: usize,
    /// Write every queued command at once (PIPELINING) rather than one per reply.
    pipelined: bool,
    tx: Tx,
    cursor: BodyCursor,
    dot_finder: memmem::Finder<'static>,
    /// Last progress seen with a time; the current phase's timeout runs from here.
    since: Instant,
    /// Progress happened where no `now` is given (output written, a transaction or QUIT
    /// started): at the next deadline the timer restarts instead of expiring.
    restart: bool,
    events: VecDeque<ClientEvent>,
    /// The transport is TLS (the handshake after STARTTLS finished).
    tls_on: bool,
    /// The transaction queued behind the current one ([`ClientSession::queue_next`]); its
    /// commands are rendered in `next_cmds`/`next_ends`, and `next_written` of them are in
    /// `out`. No reply of it is read while it is queued: replies come in order, and it
    /// becomes the current transaction as soon as the current one ends.
    next: Option<Tx>,
    next_cmds: Vec<u8>,
    next_ends: Vec<usize>,
    next_written: usize,
    /// The queued transaction became current, but the driver has not polled the
    /// [`ClientEvent::TransactionDone`] of the one before: the body it would pass to
    /// `poll_transmit` is still the old one, so nothing is written until it has.
    body_stale: bool,
    /// The driver sends a body that goes out alone (`BDAT n LAST` after the envelope replies)
    /// itself, from where it lies ([`ClientSession::set_direct_body`]).
    direct_body: bool,
    /// Input the session holds itself while a reply is longer than the driver's buffer
    /// ([`ClientSession::handle_long_input`]); empty, and unallocated, otherwise.
    long_input: Vec<u8>,
}

impl ClientSession {
    /// A session on a freshly connected socket; waits for the greeting from `now`.
    pub fn new(cfg: ClientConfig, now: Instant) -> ClientSession {
        ClientSession {
            cfg,
            state: State::Greeting,
            caps: Capabilities::default(),
            cmds: Vec::new(),
            ends: Vec::new(),
            written: 0,
            answered: 0,
            pipelined: false,
            tx: Tx {
                rcpts: 0,
                transfer: Transfer::Data,
                mail_reply: None,
                rcpt_replies: Vec::new(),
                accepted: 0,
                suspect: false,
            },
            next: None,
            next_cmds: Vec::new(),
            next_ends: Vec::new(),
            next_written: 0,
            body_stale: false,
            direct_body: false,
            cursor: BodyCursor::START,
            dot_finder: memmem::Finder::new(b"\n."),
            since: now,
            restart: false,
            events: VecDeque::new(),
            tls_on: false,
            long_input: Vec::new(),
        }
    }

    /// True once the transport is TLS (STARTTLS and the handshake succeeded).
    pub fn is_tls(&self) -> bool {
        self.tls_on
    }

    /// True from the `220` to STARTTLS until the driver reports the handshake's outcome: the
    /// driver must stop reading plaintext (it would be injected, RFC 3207 §5).
    pub fn awaiting_tls(&self) -> bool {
        self.state == State::TlsHandshake
    }

    /// The driver's TLS handshake finished: EHLO goes out again (through TLS) and the
    /// capabilities learnt in the clear are forgotten (RFC 3207 §4.2). Under
    /// [`TlsPolicy::Implicit`] the greeting is awaited from now on. Ignored unless
    /// [`ClientEvent::StartTls`] was the last thing asked, or the implicit handshake runs.
    pub fn handle_tls_established(&mut self, now: Instant) {
        if self.implicit_handshake() {
            self.tls_on = true;
            self.since = now;
            self.restart = false;
            return;
        }
        if self.state != State::TlsHandshake {
            return;
        }
        self.tls_on = true;
        self.caps = Capabilities::default();
        self.since = now;
        self.restart = false;
        self.queue_hello(true);
    }

    /// The driver's TLS layer failed: during the handshake (or before it could start) the
    /// session ends with [`FailureKind::TlsHandshake`] (the stream cannot go back to the
    /// clear); later it is the connection breaking, as [`ClientSession::handle_closed`].
    pub fn handle_tls_failed(&mut self) {
        match self.state {
            State::TlsHandshake => self.fail(FailureKind::TlsHandshake, None),
            _ if self.implicit_handshake() => self.fail(FailureKind::TlsHandshake, None),
            _ => self.handle_closed(),
        }
    }

    /// Under [`TlsPolicy::Implicit`], the driver's handshake on connect has not finished.
    fn implicit_handshake(&self) -> bool {
        self.cfg.tls == TlsPolicy::Implicit && self.state == State::Greeting && !self.tls_on
    }

    /// What the server advertised in its EHLO reply (all off after a HELO fallback).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The replies to the transaction's RCPTs received so far, in order (copies of MAIL's
    /// refusal when MAIL was refused); empty once the transaction is done. For settling the
    /// recipients when the connection dies mid-transaction: a refusal already received stands.
    pub fn rcpt_replies_so_far(&self) -> &[Reply] {
        &self.tx.rcpt_replies
    }

    /// True while the session is idle between transactions.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// Reads as many whole replies from `input` as it holds; returns the bytes used (the rest,
    /// an incomplete reply, must be offered again with more). After a failure everything is
    /// consumed and ignored. When the caller's buffer is full and none of it was used, call
    /// [`ClientSession::handle_long_input`] instead.
    pub fn handle_input(&mut self, input: &[u8], now: Instant) -> usize {
        if !self.long_input.is_empty() {
            return self.handle_long_input(input, now);
        }
        self.read_replies(input, now)
    }

    /// For a reply longer than the driver's buffer (a multi-line reply may reach
    /// [`MAX_REPLY`] octets, far more than the 512 of one line, RFC 5321 §4.5.3.1.5): the
    /// driver's buffer is full and [`ClientSession::handle_input`] used none of it. The session
    /// copies the bytes into a buffer of its own (this cold path allocates) and takes all
    /// further input the same way until it holds no partial reply. Returns the bytes used:
    /// all of `input` unless its own buffer is full, when the rest must be offered again. A
    /// reply still incomplete at [`MAX_REPLY`] octets fails the session with
    /// [`FailureKind::Protocol`] `reply too long`.
    pub fn handle_long_input(&mut self, input: &[u8], now: Instant) -> usize {
        if self.state == State::Done {
            return input.len();
        }
        let take = input.len().min(MAX_REPLY.saturating_sub(self.long_input.len()));
        let mut held = std::mem::take(&mut self.long_input);
        held.extend_from_slice(&input[..take]);
        let used = self.read_replies(&held, now);
        if self.state == State::Done {
            return input.len();
        }
        if held.len() - used >= MAX_REPLY {
            self.fail(FailureKind::Protocol("reply too long"), None);
            return input.len();
        }
        if used < held.len() {
            // A partial reply (long, or the start of the next one): keep holding it.
            held.drain(..used);
            self.long_input = held;
        }
        take
    }

    /// Parses and acts on whole replies in `input`; returns the bytes used.
    fn read_replies(&mut self, input: &[u8], now: Instant) -> usize {
        let mut used = 0;
        while self.state != State::Done {
            if self.state == State::TlsHandshake {
                // Plaintext after the `220` to STARTTLS: injected, never a reply (RFC 3207 §5).
                return input.len();
            }
            match parse_reply(&input[used..]) {
                ReplyParse::Partial => return used,
                ReplyParse::Malformed { .. } => {
                    self.fail(FailureKind::Protocol("malformed reply"), None);
                }
                ReplyParse::Complete { reply, consumed } => {
                    used += consumed;
                    self.since = now;
                    self.restart = false;
                    self.on_reply(reply);
                }
            }
        }
        input.len()
    }

    /// Call when `now` has reached [`ClientSession::next_deadline`]: the session fails with
    /// [`FailureKind::Timeout`] (waiting for the QUIT reply, it just ends as [`ClientEvent::Closed`]).
    ///
    /// The session only learns the time here and in `handle_input`; progress made in between
    /// (output written) restarts the timer at this call instead. So a phase expires after at
    /// least its timeout without progress, and at most twice that.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (Some(deadline), Some(phase)) = (self.next_deadline(), self.phase()) else { return };
        if now < deadline {
            return;
        }
        if self.restart {
            self.since = now;
            self.restart = false;
        } else if phase == Phase::Quit {
            self.close();
        } else {
            self.fail(FailureKind::Timeout(phase), None);
        }
    }

    /// The peer closed the connection (read returned 0 or the socket failed).
    pub fn handle_closed(&mut self) {
        match self.state {
            State::Done => {}
            State::Quit => self.close(),
            State::TlsHandshake => self.fail(FailureKind::TlsHandshake, None),
            _ if self.implicit_handshake() => self.fail(FailureKind::TlsHandshake, None),
            _ => self.fail(FailureKind::Closed, None),
        }
    }

    /// The next thing for the driver to act on.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        let ev = self.events.pop_front();
        if matches!(ev, Some(ClientEvent::TransactionDone(_))) {
            // At most one promotion can wait on the driver: it queues the next transaction
            // only after taking the event of the one before.
            self.body_stale = false;
        }
        ev
    }

    /// When [`ClientSession::handle_timeout`] must be called; `None` while idle or dead (an
    /// idle pooled connection's lifetime is the driver's business). Right after
    /// `start_transaction` or `quit` on a long-idle connection this may lie in the past: the
    /// call it prompts only restarts the timer.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = &self.cfg.timeouts;
        let timeout = match self.phase()? {
            Phase::Greeting => t.greeting,
            Phase::Ehlo | Phase::Helo | Phase::Mail | Phase::Rcpt | Phase::Rset | Phase::Quit => t.command,
            Phase::StartTls | Phase::Auth => t.command,
            Phase::TlsHandshake => t.tls_handshake,
            Phase::DataInit => t.data_init,
            Phase::DataBlock => t.data_block,
            Phase::DataEnd => t.data_end,
        };
        Some(self.since + timeout)
    }

    /// True when [`ClientSession::poll_transmit`] has something to write.
    #[must_use]
    pub fn wants_write(&self) -> bool {
        let current = match self.state {
            State::Envelope if self.chunk_in_batch() => !self.chunk_out(),
            State::Hello { .. } | State::StartTls | State::Auth(_) | State::Envelope | State::Rset | State::Quit => {
                self.written < self.write_limit()
            }
            State::Body => true,
            _ => false,
        };
        current || self.next_due()
    }

    /// Writes what is due into `out`, as much as fits: queued commands (whole batches under
    /// PIPELINING), then in the data phase the next piece of the message.
    ///
    /// `body` is the transaction's stored message: CRLF line endings, not dot-stuffed. Pass the
    /// same slice on every call of one transaction, from the first call after
    /// [`ClientSession::start_transaction`] on (a pipelined `BDAT` gives its length then); it
    /// is ignored outside a transaction. By DATA the copy is dot-stuffed on the way
    /// (RFC 5321 §4.5.2): `memmem` finds each `LF .` and the runs between are copied whole, so
    /// a large body streams through a small `out` in calls that each copy `out.room()` bytes.
    /// The end is `.` CRLF, preceded by a CRLF when the body does not end with one. By BDAT
    /// (RFC 3030 §2) the body goes out raw, as it is, after `BDAT <body.len()> LAST`, in
    /// pieces of `out.room()` bytes as well.
    ///
    /// With a transaction queued behind ([`ClientSession::queue_next`]), its commands follow
    /// in the same `out` once every octet of the current message is in (RFC 2920 §3.1: the
    /// message content may be the first "command" of a group). When it has become current,
    /// nothing is written until the driver has polled the [`ClientEvent::TransactionDone`] of
    /// the one before (and so passes the new transaction's body).
    pub fn poll_transmit(&mut self, body: &[u8], out: &mut Buf) {
        if self.body_stale {
            return;
        }
        if self.cursor.chunk.is_none() {
            match (self.state, self.tx.transfer) {
                // After the envelope replies: the chunk is the only command.
                (State::Body, Transfer::Bdat) => {
                    self.clear_cmds();
                    self.pipelined = false;
                    self.queue_chunk(body.len());
                }
                // Behind MAIL and the RCPTs, before any reply (none can have come yet: nothing
                // was written before this first call).
                // A transaction that was queued behind the previous one has its MAIL and RCPTs
                // out already, and maybe some replies in: no chunk once the envelope failed.
                (State::Envelope, Transfer::BdatPipelined)
                    if self.ends.len() == self.tx.rcpts + 1 && self.envelope_alive() =>
                {
                    self.queue_chunk(body.len());
                }
                _ => {}
            }
        }
        let mut n = match self.state {
            State::Hello { .. }
            | State::StartTls
            | State::Auth(_)
            | State::Envelope
            | State::Rset
            | State::Quit
            | State::Body => self.write_cmds(out),
            _ => 0,
        };
        let body_due = match self.state {
            State::Body => true,
            State::Envelope => self.chunk_in_batch(),
            _ => false,
        };
        if body_due && self.written == self.cmds.len() {
            n += match self.tx.transfer {
                Transfer::Data => self.write_stuffed(body, out),
                // The driver sends it (see `raw_body_due`).
                Transfer::Bdat if self.direct_body => 0,
                Transfer::Bdat | Transfer::BdatPipelined => self.write_raw(body, out),
            };
        }
        if self.next_due() {
            let k = out.push(&self.next_cmds[self.next_written..]);
            self.next_written += k;
            n += k;
        }
        if n > 0 {
            self.restart = true;
        }
    }

    /// With `on`, a body that goes out alone (`BDAT n LAST` after the envelope replies: a
    /// server without PIPELINING, or a body over [`PIPELINED_CHUNK_MAX`]) is not copied into
    /// `out` by [`ClientSession::poll_transmit`]: the driver writes it to the socket straight
    /// from the spool's map once `out` is flushed ([`ClientSession::raw_body_due`],
    /// [`ClientSession::raw_body_sent`]), saving a copy of every byte. A body by DATA is
    /// dot-stuffed, and a pipelined chunk rides with its commands: both still go through
    /// `out`. Set before each `poll_transmit` (a plain socket and a large body); it must not
    /// change while a body is going out.
    pub fn set_direct_body(&mut self, on: bool) {
        self.direct_body = on;
    }

    /// The part of the body the driver is to write itself now: `(from, to)` offsets into the
    /// body it passes to `poll_transmit`, once every command before it is in `out`. `None`
    /// when nothing is due that way.
    #[must_use]
    pub fn raw_body_due(&self, body_len: usize) -> Option<(usize, usize)> {
        if !self.direct_body
            || self.body_stale
            || self.state != State::Body
            || self.tx.transfer != Transfer::Bdat
            || self.written != self.cmds.len()
        {
            return None;
        }
        let end = self.cursor.chunk?.min(body_len);
        (self.cursor.off < end).then_some((self.cursor.off, end))
    }

    /// The driver wrote `n` more bytes of the body from [`ClientSession::raw_body_due`].
    pub fn raw_body_sent(&mut self, n: usize) {
        self.raw_advance(self.cursor.off, n);
        if n > 0 {
            self.restart = true;
        }
    }

    /// `n` raw body bytes from `off` are out: the cursor moves past them, and the data phase
    /// ends once the chunk's announced length is.
    fn raw_advance(&mut self, off: usize, n: usize) {
        let len = self.cursor.chunk.unwrap_or(0);
        self.cursor.off = (off + n).min(len);
        if self.cursor.off >= len && self.state == State::Body {
            self.state = State::DataEnd;
        }
    }

    /// Starts a transaction; only after [`ClientEvent::Ready`]. Refusals that can be decided
    /// from the EHLO reply alone (SIZE over the server's limit, SMTPUTF8 or BINARYMIME not
    /// offered) end it at once with a synthesized reply for every recipient, sending nothing.
    ///
    /// Called in any other state (a driver bug) it sends nothing either and reports the
    /// transaction done with `451 4.3.0` for every recipient, so the job is retried.
    pub fn start_transaction(&mut self, tx: TxSpec<'_>) {
        let ready = self.state == State::Ready;
        let refusal = if ready { self.precheck(&tx) } else { Some(LocalFault::SessionNotReady.reply()) };
        if let Some(refusal) = refusal {
            self.events.push_back(ClientEvent::TransactionDone(TxResult {
                rcpt_replies: vec![refusal.clone(); tx.rcpts.len()],
                mail_reply: refusal,
                data_reply: None,
            }));
            if ready {
                self.events.push_back(ClientEvent::Ready);
            }
            return;
        }
        self.tx = self.new_tx(&tx);
        self.clear_cmds();
        render_envelope(&self.caps, &tx, self.tx.transfer, &mut self.cmds, &mut self.ends);
        self.cursor = BodyCursor::START;
        self.pipelined = self.caps.pipelining;
        self.state = State::Envelope;
        self.restart = true;
    }

    /// True when [`ClientSession::queue_next`] would take a transaction: the server offered
    /// PIPELINING, a transaction is in progress, and none is queued yet.
    #[must_use]
    pub fn can_queue_next(&self) -> bool {
        self.caps.pipelining
            && self.next.is_none()
            && matches!(self.state, State::Envelope | State::Body | State::DataEnd)
    }

    /// Queues the transaction to run after the current one (RFC 2920 §3.1), only when
    /// [`ClientSession::can_queue_next`]. Its MAIL, RCPTs and DATA (or MAIL and RCPTs, for a
    /// pipelined `BDAT`) go out right behind the end of the current message, in the same
    /// write, so each message costs one round trip. When the current transaction ends, its
    /// [`ClientEvent::TransactionDone`] is followed by no [`ClientEvent::Ready`]: the queued
    /// one is current (and another may be queued). Until the driver has polled that event,
    /// `poll_transmit` writes nothing, so the body it passes is always the current one's.
    ///
    /// A refusal decidable from the EHLO reply alone (as in
    /// [`ClientSession::start_transaction`]) is returned at once and nothing is queued; so is
    /// `451 4.3.0` when nothing may be queued now (a driver bug).
    pub fn queue_next(&mut self, tx: TxSpec<'_>) -> Result<(), Reply> {
        if !self.can_queue_next() {
            return Err(LocalFault::CannotQueue.reply());
        }
        if let Some(refusal) = self.precheck(&tx) {
            return Err(refusal);
        }
        self.next = Some(self.new_tx(&tx));
        self.next_cmds.clear();
        self.next_ends.clear();
        self.next_written = 0;
        render_envelope(&self.caps, &tx, self.tx_transfer(&tx), &mut self.next_cmds, &mut self.next_ends);
        Ok(())
    }

    /// How a transaction's message goes out; BINARYMIME needs CHUNKING (checked by
    /// `precheck`), other bodies use it when offered.
    fn tx_transfer(&self, tx: &TxSpec<'_>) -> Transfer {
        if !self.caps.chunking {
            Transfer::Data
        } else if self.caps.pipelining && tx.body_len <= PIPELINED_CHUNK_MAX {
            Transfer::BdatPipelined
        } else {
            Transfer::Bdat
        }
    }

    fn new_tx(&self, tx: &TxSpec<'_>) -> Tx {
        Tx {
            rcpts: tx.rcpts.len(),
            transfer: self.tx_transfer(tx),
            mail_reply: None,
            rcpt_replies: Vec::with_capacity(tx.rcpts.len()),
            accepted: 0,
            suspect: false,
        }
    }

    /// The queued transaction's commands may go out now: every octet of the current message
    /// is in `out` (after `.` CRLF, or the whole `BDAT` chunk), and its data reply is all
    /// that the current transaction still waits for. Never behind a DATA without its `354`.
    fn next_due(&self) -> bool {
        self.next.is_some()
            && self.next_written < self.next_cmds.len()
            && match self.state {
                State::DataEnd => true,
                State::Envelope => self.chunk_in_batch() && self.chunk_out(),
                _ => false,
            }
    }

    /// Neither MAIL refused nor every RCPT refused (so far).
    fn envelope_alive(&self) -> bool {
        let t = &self.tx;
        t.mail_reply.as_ref().is_none_or(Reply::is_positive_completion)
            && (t.rcpt_replies.len() < t.rcpts || t.accepted > 0)
    }

    /// Makes the queued transaction current, its commands written so far accounted for.
    fn promote(&mut self, tx: Tx) {
        std::mem::swap(&mut self.cmds, &mut self.next_cmds);
        std::mem::swap(&mut self.ends, &mut self.next_ends);
        self.written = self.next_written;
        self.answered = 0;
        self.next_cmds.clear();
        self.next_ends.clear();
        self.next_written = 0;
        self.tx = tx;
        self.cursor = BodyCursor::START;
        self.pipelined = true;
        self.state = State::Envelope;
        // Promoted by the previous transaction's last reply (not by an RSET's, after the
        // driver took the result): the driver's current body is still the previous one.
        self.body_stale = self.events.iter().any(|e| matches!(e, ClientEvent::TransactionDone(_)));
    }

    /// Sends QUIT (RFC 5321 §4.1.1.10) when [`ClientEvent::Ready`]; ends in
    /// [`ClientEvent::Closed`]. While busy it ends the session at once with
    /// [`FailureKind::Aborted`]; once dead it does nothing.
    pub fn quit(&mut self) {
        match self.state {
            State::Ready => {
                self.queue_one(b"QUIT\r\n");
                self.state = State::Quit;
                self.restart = true;
            }
            State::Done | State::Quit => {}
            _ => self.fail(FailureKind::Aborted, None),
        }
    }

    /// The phase whose timeout runs now.
    fn phase(&self) -> Option<Phase> {
        Some(match self.state {
            State::Greeting if self.implicit_handshake() => Phase::TlsHandshake,
            State::Greeting => Phase::Greeting,
            State::Hello { esmtp: true } => Phase::Ehlo,
            State::Hello { esmtp: false } => Phase::Helo,
            State::StartTls => Phase::StartTls,
            State::TlsHandshake => Phase::TlsHandshake,
            State::Auth(_) => Phase::Auth,
            // While the chunk goes out, writing is what must progress; once it is out, every
            // reply still due may wait on the server taking in the message.
            State::Envelope if self.chunk_in_batch() => {
                if self.chunk_out() {
                    Phase::DataEnd
                } else {
                    Phase::DataBlock
                }
            }
            State::Envelope => match self.answered {
                0 => Phase::Mail,
                i if i <= self.tx.rcpts => Phase::Rcpt,
                _ => Phase::DataInit,
            },
            State::Body => Phase::DataBlock,
            State::DataEnd => Phase::DataEnd,
            State::Rset => Phase::Rset,
            State::Quit => Phase::Quit,
            State::Ready | State::Done => return None,
        })
    }

    /// A refusal decided before sending anything, from the advertised extensions.
    fn precheck(&self, tx: &TxSpec<'_>) -> Option<Reply> {
        if tx.rcpts.is_empty() {
            return Some(LocalFault::NoRecipients.reply());
        }
        let fields = [tx.sender, tx.envid].into_iter().chain(tx.rcpts.iter().flat_map(|r| [r.addr, r.orcpt]));
        for field in fields {
            // The spool only holds what our server parsed, but a CR or LF here would inject a
            // command: refuse rather than trust it.
            if memchr::memchr2(b'\r', b'\n', field).is_some() {
                return Some(LocalFault::EnvelopeCrLf.reply());
            }
        }
        if tx.smtputf8 && !self.caps.smtputf8 {
            return Some(LocalFault::NoSmtpUtf8.reply());
        }
        if tx.body_type == BodyType::BinaryMime && !(self.caps.chunking && self.caps.binarymime) {
            return Some(LocalFault::NoBinaryMime.reply());
        }
        match self.caps.size {
            Some(limit) if limit > 0 && tx.body_len > limit => Some(LocalFault::TooBig { limit }.reply()),
            _ => None,
        }
    }

    fn clear_cmds(&mut self) {
        self.cmds.clear();
        self.ends.clear();
        self.written = 0;
        self.answered = 0;
    }

    fn push_cmd(&mut self, cmd: &[u8]) {
        self.cmds.extend_from_slice(cmd);
        self.ends.push(self.cmds.len());
    }

    /// Replaces the queue with one command.
    fn queue_one(&mut self, cmd: &[u8]) {
        self.clear_cmds();
        self.push_cmd(cmd);
        self.pipelined = false;
    }

    fn queue_hello(&mut self, esmtp: bool) {
        self.clear_cmds();
        self.cmds.extend_from_slice(if esmtp { b"EHLO " } else { b"HELO " });
        self.cmds.extend_from_slice(self.cfg.helo_name.as_bytes());
        self.cmds.extend_from_slice(b"\r\n");
        self.ends.push(self.cmds.len());
        self.pipelined = false;
        self.state = State::Hello { esmtp };
    }

    /// How far into `cmds` may be written now: everything under PIPELINING, else only the
    /// command whose reply is next.
    fn write_limit(&self) -> usize {
        if self.pipelined {
            self.cmds.len()
        } else {
            self.ends.get(self.answered).copied().unwrap_or(self.written)
        }
    }

    /// Commands completely written so far (a pipelined `BDAT` with its whole chunk: its reply
    /// comes only after the chunk, RFC 3030 §2).
    fn sent(&self) -> usize {
        let n = self.ends.partition_point(|&e| e <= self.written);
        if n == self.ends.len() && self.chunk_in_batch() && !self.chunk_out() {
            n - 1
        } else {
            n
        }
    }

    /// Queues `BDAT len LAST`: the whole message as one chunk (RFC 3030 §2).
    fn queue_chunk(&mut self, len: usize) {
        let _ = write!(self.cmds, "BDAT {len} LAST\r\n");
        self.ends.push(self.cmds.len());
        self.cursor.chunk = Some(len);
    }

    /// The envelope batch carries `BDAT n LAST` and its chunk, and still will (it is dropped
    /// with the rest of the unwritten batch when MAIL or every RCPT is refused in time).
    fn chunk_in_batch(&self) -> bool {
        self.state == State::Envelope
            && self.tx.transfer == Transfer::BdatPipelined
            && self.cursor.chunk.is_some()
            && self.ends.len() == self.tx.rcpts + 2
    }

    /// Every octet of the queued commands and of the chunk is in `out`.
    fn chunk_out(&self) -> bool {
        self.written == self.cmds.len() && self.cursor.chunk.is_some_and(|len| self.cursor.off >= len)
    }

    fn write_cmds(&mut self, out: &mut Buf) -> usize {
        let limit = self.write_limit();
        if self.written >= limit {
            return 0;
        }
        let n = out.push(&self.cmds[self.written..limit]);
        self.written += n;
        n
    }

    /// Drops queued commands not yet started (a command already partly written must finish,
    /// or the stream would desynchronise).
    fn drop_unwritten(&mut self) {
        let full = self.sent();
        let full_end = if full == 0 { 0 } else { self.ends[full - 1] };
        let started = if full < self.ends.len() && self.written > full_end { full + 1 } else { full };
        self.ends.truncate(started);
        self.cmds.truncate(self.ends.last().copied().unwrap_or(0));
    }

    /// Copies the next piece of the dot-stuffed message into `out`.
    fn write_stuffed(&mut self, body: &[u8], out: &mut Buf) -> usize {
        let len = body.len();
        let mut cur = self.cursor;
        let mut n = 0;
        cur.off = cur.off.min(len);
        if cur.next_dot == usize::MAX {
            cur.next_dot = if body.first() == Some(&b'.') { 0 } else { self.find_dot(body, 0) };
            cur.normalise = needs_normalising(body);
            cur.next_eol = memchr::memchr2(b'\r', b'\n', body).unwrap_or(len);
        }
        if cur.normalise {
            self.cursor = cur;
            return self.write_normalised(body, out);
        }
        loop {
            if cur.off < cur.next_dot.min(len) {
                // A run without line-start dots: copy what fits in one go.
                let take = (cur.next_dot.min(len) - cur.off).min(out.room());
                if take == 0 {
                    break;
                }
                n += out.push(&body[cur.off..cur.off + take]);
                cur.off += take;
            } else if cur.off < len {
                // At a line-start dot: the extra dot, then the next one is searched past this
                // line start (`body[off]` is the dot, so the search cannot find it again and
                // `next_dot` always moves forward).
                if out.room() == 0 {
                    break;
                }
                n += out.push(b".");
                cur.next_dot = self.find_dot(body, cur.off);
            } else {
                let end: &[u8] = if len == 0 || body.ends_with(b"\r\n") { b".\r\n" } else { b"\r\n.\r\n" };
                let k = out.push(&end[cur.tail.min(end.len())..]);
                n += k;
                cur.tail += k;
                if cur.tail >= end.len() {
                    self.state = State::DataEnd;
                }
                break;
            }
        }
        self.cursor = cur;
        n
    }

    /// [`ClientSession::write_stuffed`] for a body that [`needs_normalising`]: line ends become
    /// CRLF, long lines are broken with CRLF SP, and dots are stuffed at the start of every
    /// line sent. Runs between line ends are copied in bulk; the next line end is found once.
    fn write_normalised(&mut self, body: &[u8], out: &mut Buf) -> usize {
        let len = body.len();
        let mut cur = self.cursor;
        let mut n = 0;
        loop {
            if !cur.ins.is_empty() {
                let k = out.push(cur.ins);
                n += k;
                cur.ins = &cur.ins[k..];
                if !cur.ins.is_empty() {
                    break;
                }
            }
            if cur.off >= len || out.room() == 0 {
                break;
            }
            if cur.off == cur.next_eol {
                // CRLF, bare CR or bare LF: one CRLF on the wire.
                let pair = body[cur.off] == b'\r' && body.get(cur.off + 1) == Some(&b'\n');
                cur.off += if pair { 2 } else { 1 };
                cur.ins = b"\r\n";
                cur.col = 0;
                cur.next_eol = memchr::memchr2(b'\r', b'\n', &body[cur.off..]).map_or(len, |i| cur.off + i);
            } else if cur.col >= MAX_DATA_LINE {
                cur.ins = b"\r\n ";
                cur.col = 1;
            } else if cur.col == 0 && body[cur.off] == b'.' {
                // The stuffed dot counts toward the line's length on the wire.
                cur.ins = b".";
                cur.col = 1;
            } else {
                let take = (cur.next_eol - cur.off).min(MAX_DATA_LINE - cur.col).min(out.room());
                n += out.push(&body[cur.off..cur.off + take]);
                cur.off += take;
                cur.col += take;
            }
        }
        if cur.off >= len && cur.ins.is_empty() {
            let end: &[u8] = if cur.col == 0 { b".\r\n" } else { b"\r\n.\r\n" };
            let k = out.push(&end[cur.tail.min(end.len())..]);
            n += k;
            cur.tail += k;
            if cur.tail >= end.len() {
                self.state = State::DataEnd;
            }
        }
        self.cursor = cur;
        n
    }

    /// The position of the first dot that starts a line after `from` (`body.len()` if none).
    fn find_dot(&self, body: &[u8], from: usize) -> usize {
        self.dot_finder.find(&body[from..]).map_or(body.len(), |i| from + i + 1)
    }

    /// Copies the next piece of a BDAT chunk (the raw body, never stuffed) into `out`.
    fn write_raw(&mut self, body: &[u8], out: &mut Buf) -> usize {
        // The length announced, even if `body` were (wrongly) a different slice now: the
        // server counts octets, so a short chunk would stall it rather than desynchronise.
        let len = self.cursor.chunk.unwrap_or(0);
        let end = len.min(body.len());
        let off = self.cursor.off.min(end);
        let n = out.push(&body[off..end]);
        self.raw_advance(off, n);
        n
    }

    fn on_reply(&mut self, reply: Reply) {
        // RFC 5321 §3.8: 421 may come at any time and means the server is going away.
        if reply.code == 421 && self.state != State::Quit {
            return self.fail(FailureKind::ServiceClosing, Some(reply));
        }
        let outstanding = match self.state {
            State::Greeting | State::DataEnd => true,
            State::Hello { .. } | State::StartTls | State::Auth(_) | State::Envelope | State::Rset | State::Quit => {
                self.answered < self.sent()
            }
            State::Ready | State::Body | State::TlsHandshake | State::Done => false,
        };
        if !outstanding {
            return self.fail(FailureKind::Protocol("reply to no command"), Some(reply));
        }
        self.answered += 1;
        match self.state {
            State::Greeting if self.implicit_handshake() => {
                // The driver feeds only decrypted bytes: a reply now is a driver bug.
                self.fail(FailureKind::Protocol("reply before the TLS handshake"), Some(reply));
            }
            State::Greeting => {
                if reply.is_positive_completion() {
                    self.queue_hello(true);
                } else if reply.is_permanent() {
                    self.fail(FailureKind::GreetingRefused, Some(reply));
                } else if reply.is_transient() {
                    self.fail(FailureKind::ServiceClosing, Some(reply));
                } else {
                    self.fail(FailureKind::Protocol("unexpected greeting"), Some(reply));
                }
            }
            State::Hello { esmtp } => {
                if reply.is_positive_completion() {
                    self.caps = if esmtp { Capabilities::from_ehlo(&reply) } else { Capabilities::default() };
                    self.after_hello();
                } else if esmtp && reply.is_permanent() {
                    // RFC 5321 §4.1.4 / §3.2: an old server; fall back to HELO, no extensions.
                    self.queue_hello(false);
                } else {
                    self.fail(FailureKind::HeloRefused, Some(reply));
                }
            }
            State::StartTls => {
                if reply.code == 220 {
                    self.clear_cmds();
                    self.state = State::TlsHandshake;
                    self.events.push_back(ClientEvent::StartTls);
                } else if self.cfg.tls == TlsPolicy::Required {
                    self.fail(FailureKind::TlsRefused, Some(reply));
                } else {
                    // RFC 3207 §4: the server may refuse (454); go on in the clear with what
                    // the EHLO reply offered (never to AUTH: that fails here).
                    self.authenticate_or_ready();
                }
            }
            State::Auth(step) => self.on_auth_reply(step, reply),
            State::Envelope => self.on_envelope_reply(reply),
            State::DataEnd => {
                let ok = reply.is_positive_completion();
                self.finish_tx(Some(reply));
                if ok || self.tx.transfer == Transfer::Data {
                    // After the end of data the transaction is over, whatever the reply.
                    self.become_ready();
                } else {
                    // RFC 3030 §2-3: a refused BDAT fails the transaction and leaves the
                    // server's state indeterminate; RSET clears it.
                    self.queue_rset();
                }
            }
            // Whatever RSET got, the transaction is gone (a 421 was handled above).
            State::Rset => self.become_ready(),
            State::Quit => self.close(),
            State::Ready | State::Body | State::TlsHandshake | State::Done => {}
        }
    }

    /// EHLO/HELO accepted: STARTTLS first when the policy wants it and the transport is
    /// still plain, then AUTH when there are credentials, else ready.
    fn after_hello(&mut self) {
        if self.tls_on || matches!(self.cfg.tls, TlsPolicy::Off | TlsPolicy::Implicit) {
            return self.authenticate_or_ready();
        }
        if self.caps.starttls {
            // Alone and unpipelined (RFC 3207 §4.2): the server's next bytes are TLS.
            self.queue_one(b"STARTTLS\r\n");
            self.state = State::StartTls;
        } else if self.cfg.tls == TlsPolicy::Required {
            self.fail(FailureKind::TlsNotOffered, None);
        } else {
            self.authenticate_or_ready();
        }
    }

    /// After the (last) EHLO: AUTH when there are credentials — only inside TLS — with PLAIN
    /// when offered (one round trip, RFC 4616 initial response, RFC 4954 §4), else LOGIN; or
    /// ready without credentials.
    fn authenticate_or_ready(&mut self) {
        let Some(creds) = self.cfg.auth.clone() else { return self.become_ready() };
        if !self.tls_on {
            return self.fail(FailureKind::AuthNeedsTls, None);
        }
        let offers = |m: &str| self.caps.auth.iter().any(|a| a == m);
        if offers("PLAIN") {
            self.queue_secret(b"AUTH PLAIN ", creds.plain_response());
            self.state = State::Auth(AuthStep::Plain);
        } else if offers("LOGIN") {
            self.queue_one(b"AUTH LOGIN\r\n");
            self.state = State::Auth(AuthStep::Login);
        } else {
            self.fail(FailureKind::AuthNoMechanism, None);
        }
    }

    /// A reply in the AUTH exchange: `334` asks LOGIN's next response, `235` (any `2yz`) at
    /// the end means authenticated (ready; the EHLO capabilities stand, RFC 4954 §4), anything
    /// else fails the session with the reply, scrubbed of the credentials.
    fn on_auth_reply(&mut self, step: AuthStep, reply: Reply) {
        let Some(creds) = self.cfg.auth.clone() else {
            return self.fail(FailureKind::Protocol("AUTH without credentials"), None);
        };
        // The command just answered may hold a secret: wipe it before the buffer is reused.
        self.cmds.fill(0);
        match step {
            AuthStep::Plain | AuthStep::Password if reply.is_positive_completion() => self.become_ready(),
            AuthStep::Login if reply.code == 334 => {
                self.queue_secret(b"", creds.login_user());
                self.state = State::Auth(AuthStep::User);
            }
            AuthStep::User if reply.code == 334 => {
                self.queue_secret(b"", creds.login_password());
                self.state = State::Auth(AuthStep::Password);
            }
            _ if reply.is_transient() || reply.is_permanent() => {
                self.fail(FailureKind::AuthFailed, Some(creds.scrub(reply)));
            }
            _ => self.fail(FailureKind::Protocol("unexpected reply to AUTH"), Some(creds.scrub(reply))),
        }
    }

    /// Queues one line `prefix secret CRLF`, alone (RFC 4954 §4: each response waits for its
    /// challenge).
    fn queue_secret(&mut self, prefix: &[u8], secret: &str) {
        self.clear_cmds();
        self.cmds.extend_from_slice(prefix);
        self.cmds.extend_from_slice(secret.as_bytes());
        self.cmds.extend_from_slice(b"\r\n");
        self.ends.push(self.cmds.len());
        self.pipelined = false;
    }

    /// A reply to command `answered - 1` of the envelope batch: 0 is MAIL, `1..=rcpts` are the
    /// RCPTs in order, `rcpts + 1` is DATA or a pipelined `BDAT n LAST`.
    fn on_envelope_reply(&mut self, reply: Reply) {
        let idx = self.answered - 1;
        let rcpts = self.tx.rcpts;
        // MAIL's reply, once in (idx > 0), decides how the rest are read.
        let mail_ok = self.tx.mail_reply.as_ref().is_none_or(Reply::is_positive_completion);
        if idx == 0 {
            let reply = if self.tx.suspect && reply.is_permanent() {
                // Maybe `503` to a nested MAIL, the refused BDAT's transaction still open.
                LocalFault::MailAfterRefusedBdat(&reply).reply()
            } else {
                reply
            };
            if !reply.is_positive_completion() {
                // Every recipient shares the MAIL refusal; RCPTs already pipelined will be
                // refused too and are only consumed, the rest is never sent.
                self.tx.rcpt_replies = vec![reply.clone(); rcpts];
                self.drop_unwritten();
            }
            self.tx.mail_reply = Some(reply);
        } else if idx <= rcpts {
            if mail_ok {
                if reply.is_positive_completion() {
                    self.tx.accepted += 1;
                }
                self.tx.rcpt_replies.push(reply);
                if idx == rcpts && self.tx.accepted == 0 {
                    // Nothing to deliver: DATA or BDAT, if not yet out, is not sent at all.
                    self.drop_unwritten();
                }
            }
        } else if self.tx.transfer == Transfer::BdatPipelined {
            // The reply to `BDAT n LAST`, after its whole chunk. It is the data reply when the
            // envelope held; else the server read and discarded the chunk (RFC 3030 §4.2) and
            // answered with an error that only needs consuming.
            let envelope_ok = mail_ok && self.tx.accepted > 0;
            let ok = envelope_ok && reply.is_positive_completion();
            self.finish_tx(envelope_ok.then_some(reply));
            if ok {
                self.become_ready();
            } else {
                // RFC 3030 §2-3: after a refused BDAT the server's state is indeterminate (it
                // may still hold MAIL, or even a message after a refused MAIL from a broken
                // server): RSET.
                self.queue_rset();
            }
            return;
        } else if mail_ok && self.tx.accepted > 0 {
            if reply.is_intermediate() {
                self.cursor = BodyCursor::START;
                self.clear_cmds();
                self.state = State::Body;
            } else {
                // DATA refused: the server may still hold the envelope, so RSET.
                self.finish_tx(Some(reply));
                self.queue_rset();
            }
            return;
        } else if reply.is_intermediate() {
            // RFC 2920 §3.1: a server must refuse pipelined DATA without recipients. This one
            // waits for a message we will not send; the dialogue cannot be resynchronised.
            self.finish_tx(None);
            return self.fail(FailureKind::Protocol("354 to DATA without accepted recipients"), Some(reply));
        }
        if self.answered < self.ends.len() {
            return;
        }
        // Every queued command is answered.
        if !self.tx.mail_reply.as_ref().is_some_and(Reply::is_positive_completion) {
            let suspect = self.tx.suspect;
            self.finish_tx(None);
            if suspect {
                // The server may still hold the refused BDAT's transaction.
                self.queue_rset();
            } else {
                self.become_ready();
            }
        } else if self.tx.accepted == 0 {
            self.finish_tx(None);
            self.queue_rset();
        } else {
            // BDAT after the envelope replies: one chunk, `BDAT n LAST` then the raw body,
            // queued by the next `poll_transmit`, which knows the length. (Also for a pipelined
            // BDAT whose envelope, sent behind the previous message, was answered whole before
            // its chunk could join the batch.)
            self.tx.transfer = Transfer::Bdat;
            self.cursor = BodyCursor::START;
            self.clear_cmds();
            self.state = State::Body;
        }
    }

    /// RSET after a transaction that may have left the server mid-transaction; or, when the
    /// queued transaction's MAIL already went out behind the refused `BDAT`, no RSET (it
    /// cannot go before that MAIL) and the queued one goes on, its MAIL reply suspect.
    fn queue_rset(&mut self) {
        if self.next_written > 0 {
            if let Some(mut tx) = self.next.take() {
                tx.suspect = true;
                return self.promote(tx);
            }
        }
        self.queue_one(b"RSET\r\n");
        self.state = State::Rset;
    }

    fn finish_tx(&mut self, data_reply: Option<Reply>) {
        let mail_reply = self.tx.mail_reply.take().unwrap_or_else(|| LocalFault::NoReply.reply());
        let rcpt_replies = std::mem::take(&mut self.tx.rcpt_replies);
        self.events.push_back(ClientEvent::TransactionDone(TxResult { mail_reply, rcpt_replies, data_reply }));
    }

    /// The current transaction is over and the server idle: the queued one, if any, becomes
    /// current (no [`ClientEvent::Ready`]), else the session is ready.
    fn become_ready(&mut self) {
        if let Some(tx) = self.next.take() {
            return self.promote(tx);
        }
        self.clear_cmds();
        self.state = State::Ready;
        self.events.push_back(ClientEvent::Ready);
    }

    fn close(&mut self) {
        self.drop_next();
        self.clear_cmds();
        self.state = State::Done;
        self.events.push_back(ClientEvent::Closed);
    }

    /// Forgets the queued transaction: the driver settles it with the failure (nothing of it
    /// was answered).
    fn drop_next(&mut self) {
        self.next = None;
        self.next_cmds.clear();
        self.next_ends.clear();
        self.next_written = 0;
    }

    fn fail(&mut self, kind: FailureKind, reply: Option<Reply>) {
        self.drop_next();
        if matches!(self.state, State::Auth(_)) {
            // An unanswered AUTH response may hold a secret.
            self.cmds.fill(0);
        }
        self.clear_cmds();
        self.state = State::Done;
        self.events.push_back(ClientEvent::Failed(Failure { reply, kind }));
    }
}

/// A transaction's commands into `c` (command `i` ends at `ends[i]`): MAIL, every RCPT, and
/// DATA when the message goes by DATA (a `BDAT` is queued once the body's length is at hand).
fn render_envelope(caps: &Capabilities, tx: &TxSpec<'_>, transfer: Transfer, c: &mut Vec<u8>, ends: &mut Vec<usize>) {
    render_mail(caps, tx, c, ends);
    for rcpt in &tx.rcpts {
        render_rcpt(caps, rcpt, c, ends);
    }
    if transfer == Transfer::Data {
        c.extend_from_slice(b"DATA\r\n");
        ends.push(c.len());
    }
}

/// `MAIL FROM:<sender>` with the parameters the server advertised.
fn render_mail(caps: &Capabilities, tx: &TxSpec<'_>, c: &mut Vec<u8>, ends: &mut Vec<usize>) {
    c.extend_from_slice(b"MAIL FROM:<");
    c.extend_from_slice(tx.sender);
    c.push(b'>');
    if caps.size.is_some() {
        let _ = write!(c, " SIZE={}", tx.body_len);
    }
    match tx.body_type {
        BodyType::SevenBit if caps.eightbitmime => c.extend_from_slice(b" BODY=7BIT"),
        // Without 8BITMIME the message goes as is (no MIME downgrade, RFC 6152 §3).
        BodyType::EightBitMime if caps.eightbitmime => c.extend_from_slice(b" BODY=8BITMIME"),
        BodyType::BinaryMime => c.extend_from_slice(b" BODY=BINARYMIME"),
        _ => {}
    }
    if tx.smtputf8 {
        c.extend_from_slice(b" SMTPUTF8");
    }
    if caps.dsn {
        match tx.ret {
            Ret::Full => c.extend_from_slice(b" RET=FULL"),
            Ret::Hdrs => c.extend_from_slice(b" RET=HDRS"),
            Ret::Unspecified => {}
        }
        if !tx.envid.is_empty() {
            c.extend_from_slice(b" ENVID=");
            c.extend_from_slice(tx.envid);
        }
    }
    c.extend_from_slice(b"\r\n");
    ends.push(c.len());
}

/// `RCPT TO:<addr>` with NOTIFY/ORCPT when DSN is advertised.
fn render_rcpt(caps: &Capabilities, r: &TxRcpt<'_>, c: &mut Vec<u8>, ends: &mut Vec<usize>) {
    c.extend_from_slice(b"RCPT TO:<");
    c.extend_from_slice(r.addr);
    c.push(b'>');
    if caps.dsn {
        if r.notify & notify::NEVER != 0 {
            c.extend_from_slice(b" NOTIFY=NEVER");
        } else if r.notify != 0 {
            let mut sep = b'=';
            for (bit, name) in
                [(notify::SUCCESS, &b"SUCCESS"[..]), (notify::FAILURE, b"FAILURE"), (notify::DELAY, b"DELAY")]
            {
                if r.notify & bit != 0 {
                    if sep == b'=' {
                        c.extend_from_slice(b" NOTIFY");
                    }
                    c.push(sep);
                    c.extend_from_slice(name);
                    sep = b',';
                }
            }
        }
        if !r.orcpt.is_empty() {
            c.extend_from_slice(b" ORCPT=");
            c.extend_from_slice(r.orcpt);
        }
    }
    c.extend_from_slice(b"\r\n");
    ends.push(c.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::{BufPool, VecPool};
    use crate::message::IdGen;
    use crate::smtp::data::DataScanner;
    use crate::smtp::server::{Ctx, Event, ServerSession, SessionConfig};
    use proptest::prelude::*;
    // Fake time needs one real base instant; the session itself never reads the clock.
    use std::time::Instant;

    const FULL_EHLO: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
                             250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n";
    const PLAIN_EHLO: &str = "250-mx.test\r\n250 8BITMIME\r\n";

    fn timeouts() -> ClientTimeouts {
        ClientTimeouts {
            greeting: Duration::from_secs(10),
            command: Duration::from_secs(20),
            data_init: Duration::from_secs(30),
            data_block: Duration::from_secs(40),
            data_end: Duration::from_secs(50),
            tls_handshake: Duration::from_secs(5),
        }
    }

    /// A scripted server: feeds canned replies and captures what the client writes.
    struct Peer {
        s: ClientSession,
        now: Instant,
        out: Buf,
        events: Vec<ClientEvent>,
    }

    impl Peer {
        fn connect() -> Peer {
            Peer::connect_with(TlsPolicy::Off)
        }

        fn connect_with(tls: TlsPolicy) -> Peer {
            Peer::connect_auth(tls, None)
        }

        fn connect_auth(tls: TlsPolicy, auth: Option<Arc<RelayCredentials>>) -> Peer {
            let now = Instant::now();
            let cfg = ClientConfig { helo_name: "relay.test".into(), timeouts: timeouts(), tls, auth };
            let out = BufPool::new(16 * 1024, 1).checkout().unwrap();
            Peer { s: ClientSession::new(cfg, now), now, out, events: Vec::new() }
        }

        /// Connected, greeted, EHLO answered with `ehlo`: ready.
        fn ready(ehlo: &str) -> Peer {
            let mut p = Peer::connect();
            p.reply("220 mx.test ESMTP\r\n");
            assert_eq!(p.send(b""), "EHLO relay.test\r\n");
            p.reply(ehlo);
            assert_eq!(p.take(), [ClientEvent::Ready]);
            p
        }

        fn reply(&mut self, r: &str) {
            self.now += Duration::from_millis(1);
            let n = self.s.handle_input(r.as_bytes(), self.now);
            assert_eq!(n, r.len(), "{r:?}");
            self.drain();
        }

        fn drain(&mut self) {
            while let Some(ev) = self.s.poll_event() {
                self.events.push(ev);
            }
        }

        /// One `poll_transmit`; returns what it wrote.
        fn send(&mut self, body: &[u8]) -> String {
            self.s.poll_transmit(body, &mut self.out);
            let text = String::from_utf8_lossy(self.out.data()).into_owned();
            let n = self.out.data().len();
            self.out.consume(n);
            self.drain();
            text
        }

        fn take(&mut self) -> Vec<ClientEvent> {
            std::mem::take(&mut self.events)
        }

        fn done(&mut self) -> TxResult {
            let ev = self.take();
            assert_eq!(ev.len(), 2, "{ev:?}");
            assert_eq!(ev[1], ClientEvent::Ready);
            match ev.into_iter().next() {
                Some(ClientEvent::TransactionDone(r)) => r,
                other => panic!("{other:?}"),
            }
        }

        /// Exactly one `TransactionDone` and nothing else (an RSET or a queued transaction
        /// follows, or the session waits on TLS).
        fn done_alone(&mut self) -> TxResult {
            match self.take().as_slice() {
                [ClientEvent::TransactionDone(r)] => r.clone(),
                other => panic!("{other:?}"),
            }
        }

        fn failed(&mut self) -> Failure {
            match self.take().as_slice() {
                [ClientEvent::Failed(f)] => f.clone(),
                other => panic!("{other:?}"),
            }
        }
    }

    fn rcpt(addr: &str) -> TxRcpt<'_> {
        TxRcpt { addr: addr.as_bytes(), notify: 0, orcpt: b"" }
    }

    fn spec<'a>(rcpts: &[&'a str], body_len: u64) -> TxSpec<'a> {
        TxSpec {
            sender: b"a@x.test",
            rcpts: rcpts.iter().map(|r| rcpt(r)).collect(),
            body_len,
            body_type: BodyType::Unspecified,
            smtputf8: false,
            ret: Ret::Unspecified,
            envid: b"",
        }
    }

    fn codes(replies: &[Reply]) -> Vec<u16> {
        replies.iter().map(|r| r.code).collect()
    }

    const TLS_EHLO: &str = "250-mx.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n";

    /// Greeted and EHLO answered with `ehlo` under `tls`; returns what the client wrote next.
    fn hello(tls: TlsPolicy, ehlo: &str) -> (Peer, String) {
        let mut p = Peer::connect_with(tls);
        p.reply("220 mx.test ESMTP\r\n");
        assert_eq!(p.send(b""), "EHLO relay.test\r\n");
        p.reply(ehlo);
        let next = p.send(b"");
        (p, next)
    }

    #[test]
    fn starttls_then_ehlo_again_with_new_capabilities() {
        for tls in [TlsPolicy::Opportunistic, TlsPolicy::Required] {
            let (mut p, next) = hello(tls, TLS_EHLO);
            // Alone, although the server pipelines; nothing is ready yet.
            assert_eq!(next, "STARTTLS\r\n");
            assert!(p.take().is_empty());
            assert!(!p.s.wants_write());
            assert_eq!(p.s.phase(), Some(Phase::StartTls));
            assert_eq!(p.s.next_deadline(), Some(p.s.since + timeouts().command));
            p.reply("220 2.0.0 Ready to start TLS\r\n");
            assert_eq!(p.take(), [ClientEvent::StartTls]);
            assert!(p.s.awaiting_tls() && !p.s.is_tls());
            assert_eq!(p.s.phase(), Some(Phase::TlsHandshake));
            // Plaintext behind the 220 is injected: swallowed, never read as a reply.
            assert_eq!(p.s.handle_input(b"250 injected\r\n", p.now), 14);
            p.drain();
            assert!(p.take().is_empty());
            assert_eq!(p.send(b""), "");
            p.now += Duration::from_millis(5);
            p.s.handle_tls_established(p.now);
            assert!(p.s.is_tls() && !p.s.awaiting_tls());
            assert_eq!(p.send(b""), "EHLO relay.test\r\n");
            // The capabilities are the ones offered over TLS; STARTTLS is not sent twice.
            p.reply("250-mx.test\r\n250-STARTTLS\r\n250 SIZE 500\r\n");
            assert_eq!(p.take(), [ClientEvent::Ready]);
            assert!(!p.s.capabilities().pipelining);
            assert_eq!(p.s.capabilities().size, Some(500));
            p.s.start_transaction(spec(&["1@y"], 3));
            assert_eq!(p.send(b""), "MAIL FROM:<a@x.test> SIZE=3\r\n");
        }
    }

    #[test]
    fn starttls_not_offered() {
        // may: plaintext; required: a temporary 4.7.4 failure; off: never asked.
        let (mut p, next) = hello(TlsPolicy::Opportunistic, FULL_EHLO);
        assert_eq!(next, "");
        assert_eq!(p.take(), [ClientEvent::Ready]);
        assert!(!p.s.is_tls());

        let (mut p, next) = hello(TlsPolicy::Required, FULL_EHLO);
        assert_eq!(next, "");
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::TlsNotOffered);
        assert!(!f.is_permanent() && !f.is_tls_handshake());
        assert_eq!(f.tls_status(), Some((4, 7, 4)));
        assert_eq!(f.to_string(), "TLS required but not offered by host");

        let (mut p, next) = hello(TlsPolicy::Off, TLS_EHLO);
        assert_eq!(next, "");
        assert_eq!(p.take(), [ClientEvent::Ready]);

        // Only HELO works: no extensions, so no TLS either.
        let mut p = Peer::connect_with(TlsPolicy::Required);
        p.reply("220 old.test\r\n");
        let _ = p.send(b"");
        p.reply("500 what\r\n");
        assert_eq!(p.send(b""), "HELO relay.test\r\n");
        p.reply("250 old.test\r\n");
        assert_eq!(p.failed().kind, FailureKind::TlsNotOffered);
    }

    #[test]
    fn starttls_refused() {
        // may: on in the clear with what EHLO offered.
        let (mut p, _) = hello(TlsPolicy::Opportunistic, TLS_EHLO);
        p.reply("454 4.7.0 TLS not available due to temporary reason\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);
        assert!(p.s.capabilities().pipelining && !p.s.is_tls());
        p.s.start_transaction(spec(&["1@y"], 3));
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test>\r\nRCPT TO:<1@y>\r\nDATA\r\n");

        let (mut p, _) = hello(TlsPolicy::Required, TLS_EHLO);
        p.reply("454 4.7.0 TLS not available due to temporary reason\r\n");
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::TlsRefused);
        assert_eq!(f.reply.as_ref().map(|r| r.code), Some(454));
        assert_eq!(f.tls_status(), Some((4, 7, 4)));
        assert!(!f.is_permanent());

        // 421 is the server going away, whatever the policy.
        let (mut p, _) = hello(TlsPolicy::Opportunistic, TLS_EHLO);
        p.reply("421 4.3.2 bye\r\n");
        assert_eq!(p.failed().kind, FailureKind::ServiceClosing);
    }

    #[test]
    fn tls_handshake_failures() {
        let started = || {
            let (mut p, _) = hello(TlsPolicy::Opportunistic, TLS_EHLO);
            p.reply("220 go\r\n");
            assert_eq!(p.take(), [ClientEvent::StartTls]);
            p
        };
        let mut p = started();
        p.s.handle_tls_failed();
        p.drain();
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::TlsHandshake);
        assert!(f.is_tls_handshake() && !f.is_permanent());
        assert_eq!(f.tls_status(), Some((4, 7, 5)));
        // Nothing more happens afterwards.
        p.s.handle_tls_established(p.now);
        p.s.handle_tls_failed();
        p.drain();
        assert!(p.take().is_empty());
        assert_eq!(p.send(b""), "");

        // The peer closing during the handshake is a handshake failure.
        let mut p = started();
        p.s.handle_closed();
        p.drain();
        assert!(p.failed().is_tls_handshake());

        // The handshake runs on its own timeout (--tls-handshake-timeout), not the command one.
        let mut p = started();
        fire(&mut p, Phase::TlsHandshake, timeouts().tls_handshake);
        // Once it is done, EHLO is back on the command timeout.
        let mut p = started();
        assert_eq!(p.s.next_deadline(), Some(p.now + timeouts().tls_handshake));
        p.now += Duration::from_secs(1);
        p.s.handle_tls_established(p.now);
        assert_eq!(p.send(b""), "EHLO relay.test\r\n");
        assert_eq!(p.s.phase(), Some(Phase::Ehlo));
        assert_eq!(p.s.next_deadline(), Some(p.now + timeouts().command));
        let mut p = started();
        let d = p.s.next_deadline().unwrap();
        p.s.handle_timeout(d);
        p.drain();
        let f = p.failed();
        assert!(f.is_tls_handshake());
        assert_eq!(f.to_string(), "timeout waiting for TLS handshake");

        // Waiting for the 220.
        let (mut p, _) = hello(TlsPolicy::Opportunistic, TLS_EHLO);
        fire(&mut p, Phase::StartTls, timeouts().command);

        // A transaction cannot start before the session is ready again.
        let mut p = started();
        p.s.start_transaction(spec(&["1@y"], 3));
        p.drain();
        let r = p.done_alone();
        assert_eq!(r.mail_reply.code, 451);
        assert_eq!(p.send(b""), "");
        assert!(p.s.awaiting_tls());
    }

    /// RFC 4616 §4's example credentials.
    fn tim() -> Option<Arc<RelayCredentials>> {
        Some(Arc::new(RelayCredentials::new("tim", "tanstaaftanstaaf")))
    }
    const TIM_PLAIN: &str = "AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n";
    const TIM_USER: &str = "dGlt\r\n";
    const TIM_PASS: &str = "dGFuc3RhYWZ0YW5zdGFhZg==\r\n";

    /// With credentials under `tls`: greeted, EHLO offered STARTTLS (and AUTH, in the clear),
    /// handshake done, and the EHLO inside TLS answered with `ehlo`; returns what went next.
    fn authenticating(ehlo: &str) -> (Peer, String) {
        let mut p = Peer::connect_auth(TlsPolicy::Required, tim());
        p.reply("220 mx.test ESMTP\r\n");
        assert_eq!(p.send(b""), "EHLO relay.test\r\n");
        // AUTH offered in the clear: STARTTLS first, never AUTH.
        p.reply("250-mx.test\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n");
        assert_eq!(p.send(b""), "STARTTLS\r\n");
        p.reply("220 go\r\n");
        assert_eq!(p.take(), [ClientEvent::StartTls]);
        p.s.handle_tls_established(p.now);
        assert_eq!(p.send(b""), "EHLO relay.test\r\n");
        p.reply(ehlo);
        let next = p.send(b"");
        (p, next)
    }

    #[test]
    fn auth_plain_inside_tls_then_ready() {
        let (mut p, next) = authenticating("250-mx.test\r\n250-PIPELINING\r\n250 AUTH LOGIN PLAIN\r\n");
        // PLAIN preferred when offered, in one line with its initial response; alone.
        assert_eq!(next, TIM_PLAIN);
        assert!(p.take().is_empty());
        assert_eq!(p.s.phase(), Some(Phase::Auth));
        assert_eq!(p.s.next_deadline(), Some(p.s.since + timeouts().command));
        p.reply("235 2.7.0 Authentication successful\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);
        // The capabilities of the EHLO inside TLS stand (RFC 4954 §4: no new EHLO needed).
        assert!(p.s.capabilities().pipelining);
        p.s.start_transaction(spec(&["1@y"], 3));
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test>\r\nRCPT TO:<1@y>\r\nDATA\r\n");

        // The AUTH reply times out on the command timeout.
        let (mut p, _) = authenticating("250-mx.test\r\n250 AUTH PLAIN\r\n");
        fire(&mut p, Phase::Auth, timeouts().command);
    }

    #[test]
    fn auth_login_when_only_login_is_offered() {
        let (mut p, next) = authenticating("250-mx.test\r\n250-AUTH=LOGIN\r\n250 AUTH CRAM-MD5 LOGIN\r\n");
        assert_eq!(next, "AUTH LOGIN\r\n");
        p.reply("334 VXNlcm5hbWU6\r\n");
        assert_eq!(p.send(b""), TIM_USER);
        p.reply("334 UGFzc3dvcmQ6\r\n");
        assert_eq!(p.send(b""), TIM_PASS);
        assert!(p.take().is_empty());
        p.reply("235 2.7.0 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);

        // A refusal after the password fails the session like one to PLAIN.
        let (mut p, _) = authenticating("250-mx.test\r\n250 AUTH LOGIN\r\n");
        p.reply("334 VXNlcm5hbWU6\r\n");
        let _ = p.send(b"");
        p.reply("334 UGFzc3dvcmQ6\r\n");
        let _ = p.send(b"");
        p.reply("535 5.7.8 no\r\n");
        assert_eq!(p.failed().kind, FailureKind::AuthFailed);
        // A 235 where a challenge is due is a protocol error, not a success.
        let (mut p, _) = authenticating("250-mx.test\r\n250 AUTH LOGIN\r\n");
        p.reply("235 2.7.0 ok\r\n");
        assert_eq!(p.failed().kind, FailureKind::Protocol("unexpected reply to AUTH"));
    }

    #[test]
    fn auth_refused_fails_temporarily_and_the_reply_is_scrubbed() {
        let (mut p, next) = authenticating("250-mx.test\r\n250 AUTH PLAIN\r\n");
        assert_eq!(next, TIM_PLAIN);
        // A server that echoes what it got: neither the response nor the password survive.
        p.reply("535-5.7.8 AHRpbQB0YW5zdGFhZnRhbnN0YWFm rejected\r\n535 5.7.8 tanstaaftanstaaf\r\n");
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::AuthFailed);
        assert!(!f.is_permanent() && f.tls_status().is_none());
        assert_eq!(f.auth_status(), Some((4, 7, 8)));
        let text = f.to_string();
        assert!(text.starts_with("authentication to the relay host failed: 535 5.7.8"), "{text}");
        assert!(!text.contains("tanstaaf") && !text.contains("AHRpbQ"), "{text}");
        assert_eq!(p.send(b""), "");
        // 454 (temporary) keeps the server's detail; no enhanced code: X.7.8.
        let (mut p, _) = authenticating("250-mx.test\r\n250 AUTH PLAIN\r\n");
        p.reply("454 4.7.0 Temporary authentication failure\r\n");
        assert_eq!(p.failed().auth_status(), Some((4, 7, 0)));
        let (mut p, _) = authenticating("250-mx.test\r\n250 AUTH PLAIN\r\n");
        p.reply("535 no\r\n");
        assert_eq!(p.failed().auth_status(), Some((4, 7, 8)));
        // 421 is the server going away.
        let (mut p, _) = authenticating("250-mx.test\r\n250 AUTH PLAIN\r\n");
        p.reply("421 4.3.2 bye\r\n");
        assert_eq!(p.failed().kind, FailureKind::ServiceClosing);
    }

    #[test]
    fn auth_without_a_supported_mechanism_sends_nothing() {
        for ehlo in ["250-mx.test\r\n250 AUTH CRAM-MD5 XOAUTH2\r\n", "250-mx.test\r\n250 PIPELINING\r\n"] {
            let (mut p, next) = authenticating(ehlo);
            assert_eq!(next, "");
            let f = p.failed();
            assert_eq!(f.kind, FailureKind::AuthNoMechanism);
            assert_eq!(f.auth_status(), Some((4, 7, 4)));
            assert!(f.to_string().contains("PLAIN, LOGIN"), "{f}");
        }
    }

    #[test]
    fn auth_is_never_sent_in_the_clear() {
        let clear = "250-mx.test\r\n250-AUTH PLAIN LOGIN\r\n250 PIPELINING\r\n";
        let tls = "250-mx.test\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n";
        // Required and no STARTTLS: the TLS failure, nothing sent.
        let mut p = Peer::connect_auth(TlsPolicy::Required, tim());
        p.reply("220 mx.test\r\n");
        let _ = p.send(b"");
        p.reply(clear);
        assert_eq!(p.send(b""), "");
        assert_eq!(p.failed().kind, FailureKind::TlsNotOffered);
        // A policy that allows the clear, with STARTTLS missing, refused, or off: no AUTH.
        for (tls_policy, ehlo, starttls_reply) in [
            (TlsPolicy::Opportunistic, clear, None),
            (TlsPolicy::Opportunistic, tls, Some("454 4.7.0 not now\r\n")),
            (TlsPolicy::Off, tls, None),
        ] {
            let mut p = Peer::connect_auth(tls_policy, tim());
            p.reply("220 mx.test\r\n");
            let _ = p.send(b"");
            p.reply(ehlo);
            if let Some(r) = starttls_reply {
                assert_eq!(p.send(b""), "STARTTLS\r\n");
                p.reply(r);
            }
            assert_eq!(p.send(b""), "", "{tls_policy:?}");
            let f = p.failed();
            assert_eq!(f.kind, FailureKind::AuthNeedsTls, "{tls_policy:?}");
            assert_eq!(f.tls_status(), Some((4, 7, 4)));
            assert!(!f.is_permanent());
        }
        // A failed handshake ends the session; nothing goes out afterwards.
        let mut p = Peer::connect_auth(TlsPolicy::Required, tim());
        p.reply("220 mx.test\r\n");
        let _ = p.send(b"");
        p.reply(tls);
        let _ = p.send(b"");
        p.reply("220 go\r\n");
        p.drain();
        p.s.handle_tls_failed();
        p.drain();
        assert!(p.take().iter().any(|e| matches!(e, ClientEvent::Failed(f) if f.is_tls_handshake())));
        assert_eq!(p.send(b""), "");
    }

    #[test]
    fn implicit_tls_waits_for_the_handshake_then_greeting_then_auth() {
        let mut p = Peer::connect_auth(TlsPolicy::Implicit, tim());
        // The handshake runs on its own timeout before the greeting's.
        assert_eq!(p.s.phase(), Some(Phase::TlsHandshake));
        assert_eq!(p.s.next_deadline(), Some(p.now + timeouts().tls_handshake));
        assert!(!p.s.awaiting_tls() && !p.s.is_tls());
        p.now += Duration::from_millis(3);
        p.s.handle_tls_established(p.now);
        assert!(p.s.is_tls());
        assert_eq!(p.s.phase(), Some(Phase::Greeting));
        assert_eq!(p.s.next_deadline(), Some(p.now + timeouts().greeting));
        p.reply("220 smarthost.test ESMTP\r\n");
        assert_eq!(p.send(b""), "EHLO relay.test\r\n");
        // STARTTLS offered too (some servers do): never sent on a TLS transport.
        p.reply("250-smarthost.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n");
        assert_eq!(p.send(b""), TIM_PLAIN);
        p.reply("235 2.7.0 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);

        // Without credentials: ready after EHLO.
        let mut p = Peer::connect_auth(TlsPolicy::Implicit, None);
        p.s.handle_tls_established(p.now);
        p.reply("220 smarthost.test ESMTP\r\n");
        let _ = p.send(b"");
        p.reply("250-smarthost.test\r\n250 STARTTLS\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);
        assert_eq!(p.send(b""), "");

        // Failures before the greeting are handshake failures (4.7.5), whatever ends it.
        let mut p = Peer::connect_auth(TlsPolicy::Implicit, tim());
        p.s.handle_tls_failed();
        p.drain();
        assert_eq!(p.failed().kind, FailureKind::TlsHandshake);
        let mut p = Peer::connect_auth(TlsPolicy::Implicit, tim());
        p.s.handle_closed();
        p.drain();
        assert_eq!(p.failed().tls_status(), Some((4, 7, 5)));
        let mut p = Peer::connect_auth(TlsPolicy::Implicit, tim());
        fire(&mut p, Phase::TlsHandshake, timeouts().tls_handshake);
        // Once TLS is up, the peer closing is a plain close.
        let mut p = Peer::connect_auth(TlsPolicy::Implicit, tim());
        p.s.handle_tls_established(p.now);
        p.s.handle_closed();
        p.drain();
        assert_eq!(p.failed().kind, FailureKind::Closed);
    }

    #[test]
    fn pipelined_transaction_in_one_write() {
        let mut p = Peer::ready(FULL_EHLO);
        assert!(p.s.capabilities().pipelining);
        p.s.start_transaction(spec(&["b@y.test", "c@y.test"], 12));
        assert!(p.s.wants_write());
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test> SIZE=12\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n");
        assert!(!p.s.wants_write());
        assert_eq!(p.send(b""), "");
        p.reply("250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go\r\n");
        assert!(p.take().is_empty());
        assert_eq!(p.send(b"Subject: x\r\n"), "Subject: x\r\n.\r\n");
        p.reply("250 2.0.0 queued as 1\r\n");
        let r = p.done();
        assert_eq!(codes(&r.rcpt_replies), [250, 250]);
        assert_eq!(r.data_reply.as_ref().unwrap().to_string(), "250 2.0.0 queued as 1");
        assert_eq!(r.outcome(1).code, 250);
        assert!(p.s.is_ready() && p.s.next_deadline().is_none());
    }

    #[test]
    fn non_pipelined_step_by_step() {
        let mut p = Peer::ready(PLAIN_EHLO);
        p.s.start_transaction(spec(&["b@y.test", "c@y.test"], 3));
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test>\r\n");
        assert_eq!(p.send(b""), "");
        p.reply("250 ok\r\n");
        assert_eq!(p.send(b""), "RCPT TO:<b@y.test>\r\n");
        assert_eq!(p.send(b""), "");
        p.reply("250 ok\r\n");
        assert_eq!(p.send(b""), "RCPT TO:<c@y.test>\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.send(b""), "DATA\r\n");
        p.reply("354 go\r\n");
        assert_eq!(p.send(b"hi\r\n"), "hi\r\n.\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.done().data_reply.unwrap().code, 250);
    }

    #[test]
    fn helo_fallback_sends_no_extensions() {
        let mut p = Peer::connect();
        p.reply("220 old.test\r\n");
        assert_eq!(p.send(b""), "EHLO relay.test\r\n");
        p.reply("502 5.5.2 what\r\n");
        assert_eq!(p.send(b""), "HELO relay.test\r\n");
        p.reply("250 old.test\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);
        assert_eq!(p.s.capabilities(), &Capabilities::default());
        let mut tx = spec(&["b@y.test"], 3);
        tx.body_type = BodyType::EightBitMime;
        tx.ret = Ret::Full;
        tx.envid = b"id1";
        tx.rcpts[0].notify = notify::FAILURE;
        p.s.start_transaction(tx);
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test>\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.send(b""), "RCPT TO:<b@y.test>\r\n");
    }

    #[test]
    fn helo_refused_and_greeting_refused() {
        let mut p = Peer::connect();
        p.reply("220 x\r\n");
        let _ = p.send(b"");
        p.reply("500 no\r\n");
        let _ = p.send(b"");
        p.reply("550 go away\r\n");
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::HeloRefused);
        assert!(f.is_permanent());

        let mut p = Peer::connect();
        p.reply("220 x\r\n");
        let _ = p.send(b"");
        p.reply("450 later\r\n");
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::HeloRefused);
        assert!(!f.is_permanent());

        let mut p = Peer::connect();
        p.reply("554-No SMTP\r\n554 service here\r\n");
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::GreetingRefused);
        assert!(f.is_permanent());
        assert_eq!(f.to_string(), "greeting refused: 554 No SMTP service here");

        let mut p = Peer::connect();
        p.reply("421 4.3.2 busy\r\n");
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::ServiceClosing);
        assert!(!f.is_permanent());
    }

    #[test]
    fn mixed_rcpt_outcomes() {
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y", "2@y", "3@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n451 4.7.1 greylisted\r\n354 go\r\n");
        assert_eq!(p.send(b"abc"), "abc\r\n.\r\n");
        p.reply("250 2.0.0 ok\r\n");
        let r = p.done();
        assert_eq!(codes(&r.rcpt_replies), [250, 550, 451]);
        assert_eq!(r.rcpt_replies[1].enhanced, Some((5, 1, 1)));
        assert_eq!([r.outcome(0).code, r.outcome(1).code, r.outcome(2).code], [250, 550, 451]);
    }

    #[test]
    fn all_rcpts_refused_then_rset() {
        // Pipelined: DATA went out and is refused; it is consumed, then RSET.
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y", "2@y"], 3));
        assert!(p.send(b"").ends_with("DATA\r\n"));
        p.reply("250 ok\r\n550 no\r\n550 no\r\n554 5.5.1 no valid recipients\r\n");
        let r = p.done_alone();
        assert_eq!(codes(&r.rcpt_replies), [550, 550]);
        assert_eq!(r.data_reply, None);
        assert_eq!(p.send(b"body"), "RSET\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);

        // Not pipelined: DATA is never sent.
        let mut p = Peer::ready(PLAIN_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n");
        let _ = p.send(b"");
        p.reply("550 no\r\n");
        assert_eq!(p.take().len(), 1);
        assert_eq!(p.send(b""), "RSET\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);
    }

    #[test]
    fn data_refused_after_accepted_rcpt() {
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n250 ok\r\n451 4.3.0 try later\r\n");
        let r = p.done_alone();
        assert_eq!(r.outcome(0).code, 451);
        assert_eq!(p.send(b""), "RSET\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);
    }

    #[test]
    fn mail_refused() {
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y", "2@y"], 3));
        let _ = p.send(b"");
        p.reply("452 4.3.1 full\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n");
        let r = p.done();
        assert_eq!(r.mail_reply.code, 452);
        assert_eq!(r.rcpt_replies, vec![r.mail_reply.clone(); 2]);
        assert_eq!(r.data_reply, None);
        assert_eq!(p.send(b""), "");

        let mut p = Peer::ready(PLAIN_EHLO);
        p.s.start_transaction(spec(&["1@y", "2@y"], 3));
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test>\r\n");
        p.reply("550 5.7.1 sender rejected\r\n");
        let r = p.done();
        assert_eq!(codes(&r.rcpt_replies), [550, 550]);
        assert_eq!(p.send(b""), "");
    }

    #[test]
    fn service_closing_mid_transaction() {
        let mut p = Peer::ready(PLAIN_EHLO);
        p.s.start_transaction(spec(&["1@y", "2@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n");
        let _ = p.send(b"");
        p.reply("421 4.4.2 closing\r\nignored junk");
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::ServiceClosing);
        assert_eq!(f.reply.unwrap().enhanced, Some((4, 4, 2)));
        assert_eq!(p.send(b""), "");
        assert!(!p.s.wants_write() && p.s.next_deadline().is_none());
        assert_eq!(p.s.handle_input(b"250 late\r\n", p.now), 10);
    }

    /// Feeds `bytes` the way `net::outbound` does: through a buffer of `cap` octets, calling
    /// `handle_long_input` when the buffer is full and `handle_input` used none of it.
    fn feed_through(p: &mut Peer, bytes: &[u8], cap: usize) {
        let (mut buf, mut rest) = (Vec::with_capacity(cap), bytes);
        while !rest.is_empty() || !buf.is_empty() {
            let n = rest.len().min(cap - buf.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            let mut used = p.s.handle_input(&buf, p.now);
            if used == 0 && buf.len() == cap {
                used = p.s.handle_long_input(&buf, p.now);
            }
            assert!(used > 0 || rest.is_empty(), "stuck with {} octets buffered", buf.len());
            buf.drain(..used);
            if n == 0 && used == 0 {
                break;
            }
        }
        p.drain();
    }

    /// A multi-line EHLO reply of `lines` capability lines (`X-FILLER-nnnnn`, 64 octets each),
    /// ending with the lines of `tail`.
    fn long_ehlo(lines: usize, tail: &str) -> String {
        let mut r = String::from("250-mx.test\r\n");
        for i in 0..lines {
            r.push_str(&format!("250-X-FILLER-{i:05} {}\r\n", "f".repeat(43)));
        }
        r + tail
    }

    #[test]
    fn a_reply_longer_than_the_drivers_buffer_is_read_whole() {
        // 20 KiB of EHLO through a 16 KiB buffer: read in full, its last line (CHUNKING)
        // included, never mistaken for a closed connection; then the next replies as usual.
        let ehlo = long_ehlo(320, "250-PIPELINING\r\n250 CHUNKING\r\n");
        assert!(ehlo.len() > 20 * 1024);
        let mut p = Peer::connect();
        p.reply("220 mx.test ESMTP\r\n");
        assert_eq!(p.send(b""), "EHLO relay.test\r\n");
        feed_through(&mut p, ehlo.as_bytes(), 16 * 1024);
        assert_eq!(p.take(), [ClientEvent::Ready]);
        assert!(p.s.capabilities().chunking && p.s.capabilities().pipelining);
        p.s.start_transaction(spec(&["1@y"], 3));
        assert!(p.send(b"abc").starts_with("MAIL FROM:<"));
        p.reply("250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n");
        assert_eq!(p.done().outcome(0).code, 250);
    }

    #[test]
    fn a_reply_over_64_kib_fails_as_too_long_not_as_closed() {
        let ehlo = long_ehlo(1100, "250 CHUNKING\r\n");
        assert!(ehlo.len() > MAX_REPLY);
        let mut p = Peer::connect();
        p.reply("220 mx.test ESMTP\r\n");
        let _ = p.send(b"");
        feed_through(&mut p, ehlo.as_bytes(), 16 * 1024);
        let f = p.failed();
        assert_eq!(f.kind, FailureKind::Protocol("reply too long"));
        assert_eq!(f.to_string(), "protocol error: reply too long");
    }

    #[test]
    fn protocol_errors() {
        let mut p = Peer::ready(FULL_EHLO);
        p.reply("HTTP/1.1 400 Bad Request\r\n");
        assert_eq!(p.failed().kind, FailureKind::Protocol("malformed reply"));

        let mut p = Peer::ready(FULL_EHLO);
        p.reply("250 unsolicited\r\n");
        assert_eq!(p.failed().kind, FailureKind::Protocol("reply to no command"));

        let mut p = Peer::ready(FULL_EHLO);
        p.reply("421 4.4.2 idle timeout\r\n");
        assert_eq!(p.failed().kind, FailureKind::ServiceClosing);

        // Pipelined DATA accepted although every RCPT was refused.
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n550 no\r\n354 go\r\n");
        let ev = p.take();
        assert!(matches!(ev[0], ClientEvent::TransactionDone(_)));
        assert!(matches!(&ev[1], ClientEvent::Failed(f) if matches!(f.kind, FailureKind::Protocol(_))));

        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        p.s.handle_closed();
        p.drain();
        assert_eq!(p.failed().kind, FailureKind::Closed);

        // A reply to a pipelined BDAT before its chunk is out answers no command.
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 100));
        let mut out = BufPool::new(80, 1).checkout().unwrap();
        p.s.poll_transmit(&[b'z'; 100], &mut out);
        p.reply("250 ok\r\n250 ok\r\n");
        assert!(p.take().is_empty());
        p.reply("250 ok\r\n");
        let ev = p.take();
        assert!(matches!(&ev[..], [ClientEvent::Failed(f)] if f.kind == FailureKind::Protocol("reply to no command")));
    }

    #[test]
    fn partial_replies_are_kept() {
        let mut p = Peer::connect();
        assert_eq!(p.s.handle_input(b"220 mx", p.now), 0);
        assert_eq!(p.s.handle_input(b"220 mx\r\n250-", p.now), 8);
        assert!(p.s.poll_event().is_none());
        assert_eq!(p.send(b""), "EHLO relay.test\r\n");
    }

    /// The deadline for `phase` is `since + expect`; it fires there (or, when output progress
    /// is pending, one timeout later).
    fn fire(p: &mut Peer, phase: Phase, expect: Duration) {
        let d = p.s.next_deadline().unwrap();
        assert_eq!(d, p.s.since + expect, "{phase:?}");
        p.s.handle_timeout(d - Duration::from_millis(1));
        p.drain();
        assert!(p.events.is_empty());
        p.s.handle_timeout(d);
        p.drain();
        if p.events.is_empty() {
            let d2 = p.s.next_deadline().unwrap();
            assert_eq!(d2, d + expect);
            p.s.handle_timeout(d2);
            p.drain();
        }
        assert_eq!(p.failed().kind, FailureKind::Timeout(phase));
    }

    #[test]
    fn timeouts_for_each_phase() {
        let t = timeouts();
        let mut p = Peer::connect();
        fire(&mut p, Phase::Greeting, t.greeting);

        let mut p = Peer::connect();
        p.reply("220 x\r\n");
        let _ = p.send(b"");
        fire(&mut p, Phase::Ehlo, t.command);

        let mut p = Peer::connect();
        p.reply("220 x\r\n");
        let _ = p.send(b"");
        p.reply("500 x\r\n");
        fire(&mut p, Phase::Helo, t.command);

        // Idle for a long time, then a transaction: the stale deadline only restarts the timer.
        let mut p = Peer::ready(PLAIN_EHLO);
        assert_eq!(p.s.next_deadline(), None);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        fire(&mut p, Phase::Mail, t.command);

        let mut p = Peer::ready(PLAIN_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n");
        fire(&mut p, Phase::Rcpt, t.command);

        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n250 ok\r\n");
        fire(&mut p, Phase::DataInit, t.data_init);

        // Data block: the output buffer stays full, so nothing moves.
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n250 ok\r\n354 go\r\n");
        let mut full = BufPool::new(64, 1).checkout().unwrap();
        full.push(&[b'x'; 64]);
        p.s.poll_transmit(b"abc\r\n", &mut full);
        assert!(p.s.wants_write());
        fire(&mut p, Phase::DataBlock, t.data_block);

        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n250 ok\r\n354 go\r\n");
        let _ = p.send(b"abc\r\n");
        fire(&mut p, Phase::DataEnd, t.data_end);

        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"");
        p.reply("250 ok\r\n550 no\r\n554 no\r\n");
        let _ = p.take();
        let _ = p.send(b"");
        fire(&mut p, Phase::Rset, t.command);

        // Pipelined BDAT: the batch stalls on a full buffer (data block), then, all out, waits
        // on the data-end timeout; so does a BDAT after the envelope.
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let mut full = BufPool::new(64, 1).checkout().unwrap();
        full.push(&[b'x'; 60]);
        p.s.poll_transmit(b"abc", &mut full);
        assert!(p.s.wants_write());
        fire(&mut p, Phase::DataBlock, t.data_block);
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"abc");
        fire(&mut p, Phase::DataEnd, t.data_end);
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"abc");
        p.reply("250 ok\r\n250 ok\r\n");
        fire(&mut p, Phase::DataEnd, t.data_end);
        let mut p = Peer::ready("250-mx.test\r\n250 CHUNKING\r\n");
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"abc");
        p.reply("250 ok\r\n");
        let _ = p.send(b"abc");
        p.reply("250 ok\r\n");
        assert_eq!(p.send(b"abc"), "BDAT 3 LAST\r\nabc");
        fire(&mut p, Phase::DataEnd, t.data_end);

        // Waiting for the QUIT reply, a timeout just ends the session.
        let mut p = Peer::ready(FULL_EHLO);
        p.s.quit();
        let _ = p.send(b"");
        let d = p.s.next_deadline().unwrap();
        p.s.handle_timeout(d);
        p.s.handle_timeout(d + t.command);
        p.drain();
        assert_eq!(p.take(), [ClientEvent::Closed]);
    }

    #[test]
    fn refusals_synthesized_without_sending() {
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y", "2@y"], 1001));
        assert_eq!(p.send(b""), "");
        let r = p.done();
        assert_eq!(r.mail_reply.to_string(), "552 5.3.4 Message too big for the destination (SIZE limit 1000)");
        assert_eq!(r.rcpt_replies, vec![r.mail_reply.clone(); 2]);
        assert!(r.outcome(1).is_permanent());

        // Exactly at the limit is fine.
        p.s.start_transaction(spec(&["1@y"], 1000));
        assert!(p.send(b"").starts_with("MAIL FROM:<a@x.test> SIZE=1000\r\n"));

        let mut p = Peer::ready(PLAIN_EHLO);
        let mut tx = spec(&["\u{fc}@y"], 3);
        tx.smtputf8 = true;
        p.s.start_transaction(tx);
        assert_eq!(p.send(b""), "");
        assert_eq!(p.done().rcpt_replies[0].to_string(), "553 5.6.7 Destination does not support SMTPUTF8");

        let mut p = Peer::ready(FULL_EHLO);
        let mut tx = spec(&["1@y"], 3);
        tx.body_type = BodyType::BinaryMime;
        p.s.start_transaction(tx);
        assert_eq!(p.send(b""), "");
        let r = p.done();
        assert_eq!((r.mail_reply.code, r.mail_reply.enhanced), (554, Some((5, 6, 3))));

        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y\r\nRSET"], 3));
        assert_eq!(p.send(b""), "");
        assert_eq!(p.done().mail_reply.code, 501);

        // Not ready at all: a temporary failure for every recipient, nothing sent.
        let mut p = Peer::connect();
        p.s.start_transaction(spec(&["1@y"], 3));
        p.drain();
        let r = p.done_alone();
        assert_eq!(r.rcpt_replies[0].code, 451);
        assert_eq!(p.send(b""), "");
    }

    #[test]
    fn smtputf8_and_body_params_when_advertised() {
        let mut p = Peer::ready(FULL_EHLO);
        let mut tx = spec(&["\u{fc}@y"], 3);
        tx.smtputf8 = true;
        tx.body_type = BodyType::EightBitMime;
        p.s.start_transaction(tx);
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test> SIZE=3 BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<\u{fc}@y>\r\nDATA\r\n");
    }

    #[test]
    fn dsn_params_only_when_advertised() {
        let dsn_tx = || {
            let mut tx = spec(&["1@y", "2@y", "3@y"], 3);
            tx.ret = Ret::Hdrs;
            tx.envid = b"QQ+2Bid";
            tx.rcpts[0].notify = notify::SUCCESS | notify::FAILURE | notify::DELAY;
            tx.rcpts[0].orcpt = b"rfc822;1@y";
            tx.rcpts[1].notify = notify::NEVER;
            tx.rcpts[2].notify = notify::DELAY;
            tx
        };
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(dsn_tx());
        assert_eq!(
            p.send(b""),
            "MAIL FROM:<a@x.test> SIZE=3 RET=HDRS ENVID=QQ+2Bid\r\n\
             RCPT TO:<1@y> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;1@y\r\n\
             RCPT TO:<2@y> NOTIFY=NEVER\r\nRCPT TO:<3@y> NOTIFY=DELAY\r\nDATA\r\n"
        );
        let mut p = Peer::ready("250-mx\r\n250 PIPELINING\r\n");
        p.s.start_transaction(dsn_tx());
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test>\r\nRCPT TO:<1@y>\r\nRCPT TO:<2@y>\r\nRCPT TO:<3@y>\r\nDATA\r\n");
    }

    #[test]
    fn bdat_for_binarymime() {
        let binary = || {
            let mut tx = spec(&["1@y", "2@y"], 5);
            tx.body_type = BodyType::BinaryMime;
            tx
        };
        // Without PIPELINING: the envelope step by step, then the chunk.
        let mut p = Peer::ready("250-mx\r\n250-CHUNKING\r\n250 BINARYMIME\r\n");
        p.s.start_transaction(binary());
        assert_eq!(p.send(b"\0.\n\r."), "MAIL FROM:<a@x.test> BODY=BINARYMIME\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.send(b"\0.\n\r."), "RCPT TO:<1@y>\r\n");
        p.reply("550 no\r\n");
        assert_eq!(p.send(b"\0.\n\r."), "RCPT TO:<2@y>\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.send(b"\0.\n\r."), "BDAT 5 LAST\r\n\0.\n\r.");
        p.reply("250 2.0.0 ok\r\n");
        let r = p.done();
        assert_eq!([r.outcome(0).code, r.outcome(1).code], [550, 250]);

        // With PIPELINING: all in one batch.
        let mut p = Peer::ready("250-mx\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 BINARYMIME\r\n");
        p.s.start_transaction(binary());
        assert_eq!(
            p.send(b"\0.\n\r."),
            "MAIL FROM:<a@x.test> BODY=BINARYMIME\r\nRCPT TO:<1@y>\r\nRCPT TO:<2@y>\r\nBDAT 5 LAST\r\n\0.\n\r."
        );
        p.reply("250 ok\r\n550 no\r\n250 ok\r\n250 2.0.0 ok\r\n");
        let r = p.done();
        assert_eq!([r.outcome(0).code, r.outcome(1).code], [550, 250]);
    }

    const CHUNKING_EHLO: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n\
                                 250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n";

    #[test]
    fn pipelined_bdat_in_one_write() {
        let body = b"Subject: x\r\n\r\n.dot\r\n\r\n.\r\n";
        let mut p = Peer::ready(CHUNKING_EHLO);
        let mut tx = spec(&["1@y", "2@y", "3@y"], body.len() as u64);
        tx.body_type = BodyType::EightBitMime;
        p.s.start_transaction(tx);
        assert_eq!(p.s.phase(), Some(Phase::Mail));
        assert!(p.s.wants_write());
        // No 354 to wait for and no envelope reply either: the body follows the envelope, raw.
        let wire = p.send(body);
        assert_eq!(
            wire,
            format!(
                "MAIL FROM:<a@x.test> SIZE={n} BODY=8BITMIME\r\nRCPT TO:<1@y>\r\nRCPT TO:<2@y>\r\nRCPT TO:<3@y>\r\n\
                 BDAT {n} LAST\r\n{}",
                String::from_utf8_lossy(body),
                n = body.len()
            )
        );
        assert!(!p.s.wants_write());
        assert_eq!(p.send(body), "");
        // Every reply of the batch now waits on the server taking the message in.
        assert_eq!(p.s.phase(), Some(Phase::DataEnd));
        assert_eq!(p.s.next_deadline(), Some(p.s.since + timeouts().data_end));
        p.reply("250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n");
        assert!(p.take().is_empty());
        p.reply("451 4.7.1 later\r\n250 2.0.0 queued as 1\r\n");
        let r = p.done();
        assert_eq!(codes(&r.rcpt_replies), [250, 550, 451]);
        assert_eq!(r.data_reply.as_ref().unwrap().to_string(), "250 2.0.0 queued as 1");
        assert_eq!([r.outcome(0).code, r.outcome(1).code, r.outcome(2).code], [250, 550, 451]);
        assert!(p.s.is_ready() && p.s.next_deadline().is_none());
        // The next transaction starts clean.
        p.s.start_transaction(spec(&["4@y"], 2));
        assert_eq!(p.send(b"ab"), "MAIL FROM:<a@x.test> SIZE=2\r\nRCPT TO:<4@y>\r\nBDAT 2 LAST\r\nab");
        p.reply("250 ok\r\n250 ok\r\n250 ok\r\n");
        assert_eq!(p.done().outcome(0).code, 250);
    }

    #[test]
    fn pipelined_bdat_refusals_are_consumed_then_rset() {
        // Every RCPT refused: the BDAT error is consumed, the server may still hold MAIL.
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y", "2@y"], 3));
        assert!(p.send(b"abc").ends_with("BDAT 3 LAST\r\nabc"));
        p.reply("250 ok\r\n550 no\r\n452 full\r\n554 5.5.1 no valid recipients\r\n");
        let r = p.done_alone();
        assert_eq!(r.mail_reply.code, 250);
        assert_eq!(codes(&r.rcpt_replies), [550, 452]);
        assert_eq!(r.data_reply, None);
        assert_eq!(r.outcome(1).code, 452);
        assert_eq!(p.send(b"abc"), "RSET\r\n");
        assert_eq!(p.s.phase(), Some(Phase::Rset));
        p.reply("250 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);
        p.s.start_transaction(spec(&["3@y"], 2));
        assert_eq!(p.send(b"ok"), "MAIL FROM:<a@x.test> SIZE=2\r\nRCPT TO:<3@y>\r\nBDAT 2 LAST\r\nok");
        p.reply("250 ok\r\n250 ok\r\n250 ok\r\n");
        assert_eq!(p.done().outcome(0).code, 250);

        // MAIL refused: every recipient shares its reply; RCPT and BDAT errors are consumed.
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y", "2@y"], 3));
        let _ = p.send(b"abc");
        p.reply("553 5.1.8 bad sender\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n");
        assert!(p.take().is_empty());
        p.reply("503 5.5.1 need MAIL\r\n");
        let r = p.done_alone();
        assert_eq!(r.mail_reply.code, 553);
        assert_eq!(r.rcpt_replies, vec![r.mail_reply.clone(); 2]);
        assert_eq!(r.data_reply, None);
        assert_eq!(p.send(b""), "RSET\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);

        // Envelope accepted, message refused: the BDAT reply decides, then RSET (RFC 3030 §2).
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"abc");
        p.reply("250 ok\r\n250 ok\r\n554 5.6.0 content refused\r\n");
        let r = p.done_alone();
        assert_eq!(r.outcome(0).to_string(), "554 5.6.0 content refused");
        assert_eq!(p.send(b""), "RSET\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);

        // A broken server accepting the chunk of a refused envelope: nothing is delivered.
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        let _ = p.send(b"abc");
        p.reply("250 ok\r\n550 no\r\n250 2.0.0 queued anyway\r\n");
        let r = p.done_alone();
        assert_eq!((r.outcome(0).code, r.data_reply.as_ref()), (550, None));
        assert_eq!(p.send(b""), "RSET\r\n");
    }

    #[test]
    fn pipelined_bdat_refusal_in_time_saves_the_chunk() {
        // The batch goes out through a small buffer; how far it got decides what follows.
        let body = vec![b'z'; 100];
        let envelope = "MAIL FROM:<a@x.test> SIZE=100\r\nRCPT TO:<1@y>\r\n";
        let header = "BDAT 100 LAST\r\n";
        // (octets out before the refusal arrives, the rest of the wire after it, RSET)
        let cases = [
            (envelope.len(), String::new(), false),
            (envelope.len() + 3, format!("{}{}", &header[3..], "z".repeat(100)), true),
            (envelope.len() + header.len() + 10, "z".repeat(90), true),
        ];
        for (before, rest, rset) in cases {
            let mut p = Peer::ready(CHUNKING_EHLO);
            p.s.start_transaction(spec(&["1@y"], 100));
            let mut out = BufPool::new(before, 1).checkout().unwrap();
            p.s.poll_transmit(&body, &mut out);
            assert_eq!(out.data().len(), before);
            assert!(p.s.wants_write());
            // Stalled with the chunk unfinished, writing is what must progress.
            assert_eq!(p.s.phase(), Some(Phase::DataBlock));
            p.reply("550 5.7.1 sender refused\r\n");
            let mut wire = String::new();
            while p.s.wants_write() {
                wire.push_str(&p.send(&body));
            }
            assert_eq!(wire, rest, "{before}");
            p.reply("503 5.5.1 need MAIL\r\n");
            if rset {
                p.reply("503 5.5.1 need MAIL\r\n");
            }
            let ev = p.take();
            assert!(matches!(&ev[0], ClientEvent::TransactionDone(r) if r.outcome(0).code == 550), "{ev:?}");
            if rset {
                assert_eq!(ev.len(), 1);
                assert_eq!(p.send(&body), "RSET\r\n");
            } else {
                assert_eq!(ev[1], ClientEvent::Ready);
            }
        }

        // Every RCPT refused before the chunk started: BDAT is never sent, RSET is.
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 100));
        let mut out = BufPool::new(envelope.len(), 1).checkout().unwrap();
        p.s.poll_transmit(&body, &mut out);
        p.reply("250 ok\r\n550 no\r\n");
        assert!(matches!(p.take().as_slice(), [ClientEvent::TransactionDone(r)] if r.outcome(0).code == 550));
        assert_eq!(p.send(&body), "RSET\r\n");
    }

    #[test]
    fn large_bdat_waits_for_the_envelope() {
        // Over the threshold: MAIL and RCPTs pipelined, the chunk only once they are accepted.
        let over: Vec<u8> = (0..PIPELINED_CHUNK_MAX + 1).map(|i| b"ab.\r\n"[i as usize % 5]).collect();
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y", "2@y"], over.len() as u64));
        assert_eq!(
            p.send(&over),
            format!("MAIL FROM:<a@x.test> SIZE={}\r\nRCPT TO:<1@y>\r\nRCPT TO:<2@y>\r\n", over.len())
        );
        assert!(!p.s.wants_write());
        assert_eq!(p.s.phase(), Some(Phase::Mail));
        p.reply("250 ok\r\n250 ok\r\n");
        assert!(!p.s.wants_write());
        p.reply("550 no\r\n");
        assert!(p.s.wants_write());
        // Through the 16 KiB buffer in pieces, raw.
        let mut wire = Vec::new();
        let mut calls = 0;
        while p.s.wants_write() {
            wire.extend_from_slice(p.send(&over).as_bytes());
            calls += 1;
        }
        assert!(calls > 4);
        let mut want = format!("BDAT {} LAST\r\n", over.len()).into_bytes();
        want.extend_from_slice(&over);
        assert_eq!(wire, want);
        assert_eq!(p.s.phase(), Some(Phase::DataEnd));
        p.reply("452 4.3.1 no room\r\n");
        assert_eq!(p.done_alone().outcome(0).code, 452);
        // A refused BDAT leaves the server's state indeterminate.
        assert_eq!(p.send(b""), "RSET\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);

        // Exactly at the threshold it is still pipelined.
        let at = vec![b'q'; PIPELINED_CHUNK_MAX as usize];
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], at.len() as u64));
        assert!(p.send(&at).contains(&format!("RCPT TO:<1@y>\r\nBDAT {} LAST\r\nqqq", at.len())));
        assert!(p.s.wants_write());
    }

    #[test]
    fn a_direct_body_is_left_to_the_driver_and_counted_as_it_goes() {
        let over = vec![b'.'; PIPELINED_CHUNK_MAX as usize + 10];
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.set_direct_body(true);
        p.s.start_transaction(spec(&["1@y"], over.len() as u64));
        assert_eq!(p.send(&over), format!("MAIL FROM:<a@x.test> SIZE={}\r\nRCPT TO:<1@y>\r\n", over.len()));
        assert_eq!(p.s.raw_body_due(over.len()), None, "not before the envelope replies");
        p.reply("250 ok\r\n250 ok\r\n");
        // Only the command goes through `out`; the body is the driver's to write.
        assert_eq!(p.send(&over), format!("BDAT {} LAST\r\n", over.len()));
        assert_eq!(p.s.raw_body_due(over.len()), Some((0, over.len())));
        assert!(p.s.wants_write());
        p.s.raw_body_sent(1000);
        assert_eq!(p.send(&over), "", "nothing copied");
        assert_eq!(p.s.raw_body_due(over.len()), Some((1000, over.len())));
        p.s.raw_body_sent(over.len() - 1000);
        assert_eq!(p.s.raw_body_due(over.len()), None);
        assert_eq!(p.s.phase(), Some(Phase::DataEnd));
        p.reply("250 2.0.0 queued\r\n");
        assert_eq!(p.done().outcome(0).code, 250);

        // A chunk pipelined with its commands still rides in `out`.
        let small = vec![b'q'; 100];
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.set_direct_body(true);
        p.s.start_transaction(spec(&["1@y"], small.len() as u64));
        assert!(p.send(&small).ends_with(&format!("BDAT 100 LAST\r\n{}", "q".repeat(100))));
        assert_eq!(p.s.raw_body_due(small.len()), None);
    }

    #[test]
    fn no_chunking_means_data_and_no_pipelining_means_lockstep() {
        // CHUNKING without PIPELINING: one command per reply, then the chunk, whatever the size.
        let mut p = Peer::ready("250-mx.test\r\n250 CHUNKING\r\n");
        p.s.start_transaction(spec(&["1@y"], 4));
        assert_eq!(p.send(b".\r\n."), "MAIL FROM:<a@x.test>\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.send(b".\r\n."), "RCPT TO:<1@y>\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.send(b".\r\n."), "BDAT 4 LAST\r\n.\r\n.");
        assert_eq!(p.s.phase(), Some(Phase::DataEnd));
        p.reply("250 ok\r\n");
        assert_eq!(p.done().outcome(0).code, 250);
        // PIPELINING without CHUNKING: DATA, dot-stuffed.
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 4));
        assert!(p.send(b".\r\n.").ends_with("DATA\r\n"));
        p.reply("250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(p.send(b".\r\n."), "..\r\n..\r\n.\r\n");
    }

    #[test]
    fn connection_reuse_and_quit() {
        let mut p = Peer::ready(FULL_EHLO);
        for i in 0..2 {
            p.s.start_transaction(spec(&["1@y"], 3));
            assert!(p.send(b"").starts_with("MAIL"));
            p.reply("250 ok\r\n250 ok\r\n354 go\r\n");
            assert_eq!(p.send(b"one\r\n"), "one\r\n.\r\n");
            p.reply(&format!("250 2.0.0 queued {i}\r\n"));
            assert_eq!(p.done().data_reply.unwrap().text, format!("queued {i}"));
        }
        p.s.quit();
        assert_eq!(p.send(b""), "QUIT\r\n");
        p.reply("221 2.0.0 bye\r\n");
        assert_eq!(p.take(), [ClientEvent::Closed]);

        // The peer closing after QUIT also ends it cleanly.
        let mut p = Peer::ready(FULL_EHLO);
        p.s.quit();
        let _ = p.send(b"");
        p.s.handle_closed();
        p.drain();
        assert_eq!(p.take(), [ClientEvent::Closed]);

        // quit() while busy aborts.
        let mut p = Peer::connect();
        p.s.quit();
        p.drain();
        assert_eq!(p.failed().kind, FailureKind::Aborted);
    }

    /// Runs one transaction against a scripted server and returns what was written during
    /// DATA, through an output buffer of `cap` bytes drained after every call.
    fn stuffed(body: &[u8], cap: usize) -> Vec<u8> {
        let mut p = Peer::ready("250-mx.test\r\n250-PIPELINING\r\n250 SIZE\r\n");
        p.s.start_transaction(spec(&["1@y"], body.len() as u64));
        let _ = p.send(b"");
        p.reply("250 ok\r\n250 ok\r\n354 go\r\n");
        let mut out = BufPool::new(cap, 1).checkout().unwrap();
        let mut wire = Vec::new();
        let mut calls = 0;
        while p.s.wants_write() {
            p.s.poll_transmit(body, &mut out);
            assert!(!out.is_empty(), "no progress with an empty buffer");
            // Every call but the last fills all the room there is.
            assert!(!p.s.wants_write() || out.data().len() == cap);
            wire.extend_from_slice(out.data());
            out.consume(out.data().len());
            calls += 1;
        }
        assert!(calls >= wire.len() / cap);
        assert_eq!(p.s.phase(), Some(Phase::DataEnd));
        wire
    }

    #[test]
    fn dot_stuffing_table() {
        let table: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            // A bare CR (or LF) cannot go by DATA: it goes as CRLF (RFC 5321 §2.3.8).
            (b"a\r", b"a\r\n.\r\n"),
            (b"a\n.b\rc", b"a\r\n..b\r\nc\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b".a\r\n", b"..a\r\n.\r\n"),
            (b"a\r\n.\r\n", b"a\r\n..\r\n.\r\n"),
            (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
            (b"..\r\n...\r\n", b"...\r\n....\r\n.\r\n"),
            (b"\r\n.\r\n.\r\n", b"\r\n..\r\n..\r\n.\r\n"),
            (b"a.b\r\n x.\r\n", b"a.b\r\n x.\r\n.\r\n"),
        ];
        for &(body, wire) in table {
            for cap in [3, 4, 64, 16 * 1024] {
                assert_eq!(stuffed(body, cap), wire, "{:?} through {cap}", String::from_utf8_lossy(body));
            }
        }
    }

    #[test]
    fn large_body_streams_through_small_buffer() {
        let mut body = Vec::new();
        for i in 0..20_000 {
            if i % 7 == 0 {
                body.extend_from_slice(b".");
            }
            body.extend_from_slice(format!("line {i} of the message\r\n").as_bytes());
        }
        let small = stuffed(&body, 64);
        assert_eq!(small, stuffed(&body, 16 * 1024));
        let mut scanner = DataScanner::new(u64::MAX);
        let mut back = Vec::new();
        let r = scanner.scan(&small, &mut back);
        assert!(r.done && r.consumed == small.len());
        assert_eq!(back, body);
    }

    proptest! {
        /// Stuffing on the way out, then the server's scanner unstuffing, gives the body back.
        #[test]
        fn stuffing_round_trips_through_data_scanner(
            lines in proptest::collection::vec("[.a ]{0,6}", 0..30),
            cap in 3usize..80,
        ) {
            let mut body = Vec::new();
            for l in &lines {
                body.extend_from_slice(l.as_bytes());
                body.extend_from_slice(b"\r\n");
            }
            let wire = stuffed(&body, cap);
            let mut scanner = DataScanner::new(u64::MAX);
            let mut back = Vec::new();
            let r = scanner.scan(&wire, &mut back);
            prop_assert!(r.done);
            prop_assert_eq!(r.consumed, wire.len());
            prop_assert_eq!(scanner.taint(), None);
            prop_assert_eq!(back, body);
        }
    }

    proptest! {
        /// However the server's bytes are split into reads, the client sees the same dialogue.
        #[test]
        fn input_split_invariance(cuts in proptest::collection::vec(0usize..120, 0..10)) {
            let stream = b"250 2.1.0 ok\r\n250-2.1.5 first\r\n250 2.1.5 line\r\n550 5.1.1 no\r\n354 go\r\n";
            let mut cuts = cuts;
            cuts.extend([0, stream.len()]);
            cuts.sort_unstable();
            let mut p = Peer::ready(FULL_EHLO);
            p.s.start_transaction(spec(&["1@y", "2@y"], 3));
            let _ = p.send(b"");
            let mut pending = Vec::new();
            for w in cuts.windows(2) {
                pending.extend_from_slice(&stream[w[0].min(stream.len())..w[1].min(stream.len())]);
                let n = p.s.handle_input(&pending, p.now);
                pending.drain(..n);
            }
            prop_assert!(pending.is_empty());
            prop_assert_eq!(p.send(b"x\r\n"), "x\r\n.\r\n");
            p.reply("250 ok\r\n");
            let r = p.done();
            prop_assert_eq!(codes(&r.rcpt_replies), [250, 550]);
            prop_assert_eq!(r.rcpt_replies[0].text.as_str(), "first\nline");
        }

        /// The same for a pipelined BDAT batch, whose replies all come after the chunk; the
        /// chunk goes out through any buffer size.
        #[test]
        fn bdat_input_split_invariance(
            cuts in proptest::collection::vec(0usize..140, 0..10),
            cap in 8usize..200,
        ) {
            let stream: &[u8] = b"250 2.1.0 ok\r\n250-2.1.5 first\r\n250 2.1.5 line\r\n550 5.1.1 no\r\n\
                                  250 2.1.5 ok\r\n250 2.0.0 queued\r\n";
            let body = b"Subject: s\r\n\r\n.\r\n..\r\n\r\n.\r\n";
            let mut cuts = cuts;
            cuts.extend([0, stream.len()]);
            cuts.sort_unstable();
            let mut p = Peer::ready(CHUNKING_EHLO);
            p.s.start_transaction(spec(&["1@y", "2@y", "3@y"], body.len() as u64));
            let mut out = BufPool::new(cap, 1).checkout().unwrap();
            let mut wire = Vec::new();
            while p.s.wants_write() {
                p.s.poll_transmit(body, &mut out);
                wire.extend_from_slice(out.data());
                out.consume(out.data().len());
            }
            let mut tail = b"RCPT TO:<3@y>\r\nBDAT 26 LAST\r\n".to_vec();
            tail.extend_from_slice(body);
            prop_assert!(wire.ends_with(&tail));
            let mut pending = Vec::new();
            for w in cuts.windows(2) {
                pending.extend_from_slice(&stream[w[0].min(stream.len())..w[1].min(stream.len())]);
                let n = p.s.handle_input(&pending, p.now);
                pending.drain(..n);
            }
            prop_assert!(pending.is_empty());
            p.drain();
            let r = p.done();
            prop_assert_eq!(codes(&r.rcpt_replies), [250, 550, 250]);
            prop_assert_eq!(r.rcpt_replies[0].text.as_str(), "first\nline");
            prop_assert_eq!(r.data_reply.map(|d| d.code), Some(250));
            prop_assert!(p.s.is_ready());
        }

        /// Arbitrary server bytes never panic and never leave the session stuck with input it
        /// cannot use.
        #[test]
        fn garbage_input_is_safe(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut p = Peer::ready(FULL_EHLO);
            p.s.start_transaction(spec(&["1@y"], 3));
            let _ = p.send(b"");
            let n = p.s.handle_input(&input, p.now);
            prop_assert!(n <= input.len());
            let _ = p.send(b"abc");
            p.drain();
        }
    }

    /// What a [`pair_on`] run produced.
    struct Run {
        /// The client's events.
        events: Vec<ClientEvent>,
        /// The server's stored messages (with our `Received:` header).
        stored: Vec<Vec<u8>>,
        /// Every byte the client wrote.
        wire: Vec<u8>,
    }

    impl Run {
        fn results(&self) -> Vec<&TxResult> {
            self.events
                .iter()
                .filter_map(|e| match e {
                    ClientEvent::TransactionDone(r) => Some(r),
                    _ => None,
                })
                .collect()
        }

        fn count(&self, needle: &[u8]) -> usize {
            memmem::find_iter(&self.wire, needle).count()
        }
    }

    /// Our server's settings (`max_size` octets), its EHLO reply edited by `(from, to)`
    /// replacements: the client then sees fewer extensions (or no SIZE limit) than the server
    /// really has.
    fn server_cfg(max_size: u64, edits: &[(&str, &str)]) -> SessionConfig {
        let mut cfg = SessionConfig::new("mx.test", max_size, 100);
        let mut ehlo = String::from_utf8(cfg.ehlo.clone()).unwrap();
        for (from, to) in edits {
            assert!(ehlo.contains(from), "{ehlo:?} has no {from:?}");
            ehlo = ehlo.replace(from, to);
        }
        cfg.ehlo = ehlo.into_bytes();
        cfg
    }

    const NO_CHUNKING: &[(&str, &str)] = &[("250-CHUNKING\r\n", "")];

    /// [`pair_on`] against our server as configured by default.
    fn pair(txs: Vec<(TxSpec<'_>, &[u8])>, client_cap: usize) -> (Vec<ClientEvent>, Vec<Vec<u8>>) {
        let run = pair_on(&SessionConfig::new("mx.test", 1 << 20, 100), txs, client_cap);
        (run.events, run.stored)
    }

    /// Our client against our server, in memory (after quinn's `Pair::drive`): each round moves
    /// every byte each side wrote to the other. Runs `txs` in turn, then QUIT.
    fn pair_on(scfg: &SessionConfig, txs: Vec<(TxSpec<'_>, &[u8])>, client_cap: usize) -> Run {
        pair_with(scfg, txs, client_cap, false)
    }

    /// [`pair_on`]; with `queue_next`, each next transaction is queued behind the current one
    /// as soon as the client can take it (RFC 2920 §3.1), as the driver does.
    fn pair_with(scfg: &SessionConfig, txs: Vec<(TxSpec<'_>, &[u8])>, client_cap: usize, queue_next: bool) -> Run {
        let now = Instant::now();
        let mut bodies = VecPool::new(1 << 20);
        let mut ids = IdGen::default();
        let mut server = ServerSession::new("127.0.0.1".parse().unwrap(), true);
        let mut s_out = BufPool::new(16 * 1024, 1).checkout().unwrap();
        let mut c_out = BufPool::new(client_cap, 1).checkout().unwrap();
        let cfg = ClientConfig {
            helo_name: "relay.test".into(),
            timeouts: ClientTimeouts::default(),
            tls: TlsPolicy::Off,
            auth: None,
        };
        let mut client = ClientSession::new(cfg, now);
        let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
        let (mut events, mut stored, mut wire) = (Vec::new(), Vec::new(), Vec::new());
        let mut pending = txs.into_iter();
        let mut body: &[u8] = b"";
        let mut next_body: Option<&[u8]> = None;
        server.greeting(scfg, &mut s_out);
        for _ in 0..1_000_000 {
            to_client.extend_from_slice(s_out.data());
            s_out.consume(s_out.data().len());
            let n = client.handle_input(&to_client, now);
            to_client.drain(..n);
            while let Some(ev) = client.poll_event() {
                if ev == ClientEvent::Ready {
                    match pending.next() {
                        Some((tx, b)) => {
                            body = b;
                            client.start_transaction(tx);
                        }
                        None => client.quit(),
                    }
                }
                if matches!(ev, ClientEvent::TransactionDone(_)) {
                    if let Some(b) = next_body.take() {
                        body = b;
                    }
                }
                let end = matches!(ev, ClientEvent::Closed | ClientEvent::Failed(_));
                events.push(ev);
                if end {
                    return Run { events, stored, wire };
                }
            }
            while queue_next && client.can_queue_next() {
                let Some((tx, b)) = pending.next() else { break };
                let n = tx.rcpts.len();
                match client.queue_next(tx) {
                    Ok(()) => next_body = Some(b),
                    // Settled at once, as the driver does; the next one is tried.
                    Err(r) => events.push(ClientEvent::TransactionDone(TxResult {
                        mail_reply: r.clone(),
                        rcpt_replies: vec![r; n],
                        data_reply: None,
                    })),
                }
            }
            client.poll_transmit(body, &mut c_out);
            to_server.extend_from_slice(c_out.data());
            wire.extend_from_slice(c_out.data());
            c_out.consume(c_out.data().len());
            loop {
                let mut ctx = Ctx {
                    cfg: scfg,
                    bodies: &mut bodies,
                    ids: &mut ids,
                    now_unix_us: 1_700_000_000_000_000,
                    accepting: true,
                };
                let p = server.handle_input(&mut ctx, &to_server, &mut s_out);
                to_server.drain(..p.consumed);
                match p.event {
                    Some(Event::Message) => {
                        stored.push(server.message().2.to_vec());
                        server.message_result(&mut ctx, Ok(()), &mut s_out);
                    }
                    // Close, and events of features this server is not set up for
                    // (STARTTLS, AUTH).
                    _ => break,
                }
            }
        }
        panic!("no progress: {events:?}");
    }

    #[test]
    fn against_the_real_server() {
        let mut body1 = b"Subject: test\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n".to_vec();
        body1.extend(std::iter::repeat_n(b"x.y\r\n.z\r\n", 3000).flatten());
        let body2 = "Subject: caf\u{e9}\r\n\r\nno final CRLF".as_bytes();
        let mut tx1 = spec(&["b@y.test", "c@y.test"], body1.len() as u64);
        tx1.ret = Ret::Hdrs;
        tx1.envid = b"env+2B1";
        tx1.rcpts[0].notify = notify::FAILURE | notify::DELAY;
        tx1.rcpts[0].orcpt = b"rfc822;b@y.test";
        tx1.body_type = BodyType::EightBitMime;
        let mut tx2 = spec(&["\u{fc}@y.test"], body2.len() as u64);
        tx2.smtputf8 = true;
        for chunking in [true, false] {
            let scfg = server_cfg(1 << 20, if chunking { &[] } else { NO_CHUNKING });
            for cap in [64, 16 * 1024] {
                let run = pair_on(&scfg, vec![(tx1.clone(), &body1[..]), (tx2.clone(), body2)], cap);
                let done = run.results();
                assert_eq!(done.len(), 2, "{:?}", run.events);
                for r in &done {
                    assert!(r.rcpt_replies.iter().all(Reply::is_positive_completion), "{r:?}");
                    assert!(r.data_reply.as_ref().unwrap().text.starts_with("Ok: queued as "), "{r:?}");
                }
                assert_eq!(run.events.last(), Some(&ClientEvent::Closed));
                assert_eq!((run.count(b"BDAT "), run.count(b"DATA\r\n")), if chunking { (2, 0) } else { (0, 2) });
                assert_eq!(run.count(b"RSET"), 0);
                let stored = &run.stored;
                assert_eq!(stored.len(), 2);
                assert!(stored[0].starts_with(b"Received: "));
                assert!(stored[0].ends_with(&body1), "stored body differs");
                // BDAT carries the body as it is; DATA must end it with CRLF before the dot.
                let mut with_crlf = body2.to_vec();
                if !chunking {
                    with_crlf.extend_from_slice(b"\r\n");
                }
                assert!(stored[1].ends_with(&with_crlf));
            }
        }
    }

    #[test]
    fn real_server_next_transactions_pipelined() {
        // Messages with dot lines, one without a final CRLF, one over the server's SIZE limit
        // (refused from EHLO alone) and one large enough that a BDAT for it waits for its
        // envelope: every stored message byte-exact, in order, each next envelope behind the
        // previous message's end.
        let mut big = b"Subject: big\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b".x\r\n..y\r\n", 20_000).flatten());
        let bodies: Vec<Vec<u8>> = vec![
            b"Subject: 1\r\n\r\n.one\r\n".to_vec(),
            b"Subject: 2\r\n\r\n.\r\ntwo".to_vec(),
            vec![b'x'; 300_000],
            big,
            b"Subject: 5\r\n\r\nfive\r\n".to_vec(),
        ];
        for chunking in [true, false] {
            let scfg = server_cfg(250_000, if chunking { &[] } else { NO_CHUNKING });
            for cap in [64, 16 * 1024] {
                let txs = bodies.iter().map(|b| (spec(&["b@y.test", "c@y.test"], b.len() as u64), &b[..])).collect();
                let run = pair_with(&scfg, txs, cap, true);
                let done = run.results();
                assert_eq!(done.len(), 5, "{:?}", run.events);
                // The refusal is settled when it is queued, so before the one ahead of it.
                assert_eq!(done.iter().filter(|r| r.mail_reply.code == 552).count(), 1);
                for r in done.iter().filter(|r| r.mail_reply.code != 552) {
                    assert!(r.data_reply.as_ref().unwrap().text.starts_with("Ok: queued as "), "{r:?}");
                }
                // One Ready after the greeting, one when the last transaction is done.
                assert_eq!(run.events.iter().filter(|e| **e == ClientEvent::Ready).count(), 2, "{:?}", run.events);
                assert_eq!(run.events.last(), Some(&ClientEvent::Closed));
                assert_eq!(run.count(b"RSET"), 0);
                assert_eq!(run.stored.len(), 4);
                for (stored, body) in run.stored.iter().zip(bodies.iter().enumerate().filter(|(i, _)| *i != 2)) {
                    let mut want = body.1.clone();
                    if !chunking && !want.ends_with(b"\r\n") {
                        want.extend_from_slice(b"\r\n");
                    }
                    assert!(stored.ends_with(&want), "message {} differs", body.0);
                }
                if chunking {
                    assert_eq!(run.count(b"\r\n.one\r\nMAIL FROM:"), 1);
                } else {
                    assert_eq!(run.count(b".\r\nMAIL FROM:"), 3, "{}", String::from_utf8_lossy(&run.wire));
                }
            }
        }
    }

    /// The first transaction's result, the stored messages and the client's bytes, for each
    /// transaction run in turn against our server (pipelined BDAT when the body is small).
    fn bdat_run(scfg: &SessionConfig, txs: Vec<(TxSpec<'_>, &[u8])>, cap: usize) -> Run {
        let n = txs.len();
        let run = pair_on(scfg, txs, cap);
        assert_eq!(run.results().len(), n, "{:?}", run.events);
        assert_eq!(run.events.last(), Some(&ClientEvent::Closed), "{:?}", run.events);
        run
    }

    #[test]
    fn real_server_pipelined_bdat_refusals() {
        // SIZE is advertised without a limit, so the client declares 2000 octets and the server
        // (limit 1000) refuses MAIL; it refuses non-ASCII recipients without SMTPUTF8.
        let scfg = server_cfg(1000, &[("250-SIZE 1000\r\n", "250-SIZE\r\n")]);
        let big = vec![b'x'; 2000];
        let good = b"Subject: ok\r\n\r\nfine\r\n";
        let cases: Vec<(TxSpec<'_>, &[u8])> = vec![
            (spec(&["1@y.test", "2@y.test"], big.len() as u64), &big),
            (spec(&["\u{fc}@y.test", "\u{f6}@y.test"], good.len() as u64), good),
            (spec(&["\u{fc}@y.test", "3@y.test"], good.len() as u64), good),
            (spec(&["4@y.test"], good.len() as u64), good),
        ];
        for cap in [40, 16 * 1024] {
            let run = bdat_run(&scfg, cases.clone(), cap);
            let r = run.results();
            // MAIL refused: every recipient gets its reply; the chunk was read and discarded.
            assert_eq!(r[0].mail_reply.code, 552);
            assert_eq!(codes(&r[0].rcpt_replies), [552, 552]);
            assert_eq!(r[0].data_reply, None);
            // Every RCPT refused.
            assert_eq!(r[1].mail_reply.code, 250);
            assert_eq!(codes(&r[1].rcpt_replies), [553, 553]);
            assert_eq!(r[1].data_reply, None);
            // One refused, one delivered.
            assert_eq!([r[2].outcome(0).code, r[2].outcome(1).code], [553, 250]);
            assert_eq!(r[3].outcome(0).code, 250);
            // Everything went in the envelope's batch; each failed transaction ended in RSET.
            // Each failed transaction whose chunk went out ends in RSET. Through a 40-octet
            // buffer the MAIL refusal arrives before the batch is out: the second RCPT and the
            // chunk are never sent, and there is no transaction to reset.
            let (chunks, rsets) = if cap == 40 { (3, 1) } else { (4, 2) };
            assert_eq!(run.count(b"BDAT "), chunks);
            assert_eq!(run.count(b"RSET\r\n"), rsets);
            assert_eq!(run.stored.len(), 2);
            assert!(run.stored.iter().all(|m| m.ends_with(good)));
        }
    }

    /// What a body normalised for DATA must arrive as (reference, byte at a time).
    fn normalised(body: &[u8]) -> Vec<u8> {
        let (mut out, mut col, mut i) = (Vec::new(), 0, 0);
        while i < body.len() {
            let b = body[i];
            if b == b'\r' || b == b'\n' {
                i += if b == b'\r' && body.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                out.extend_from_slice(b"\r\n");
                col = 0;
                continue;
            }
            if col >= MAX_DATA_LINE {
                out.extend_from_slice(b"\r\n ");
                col = 1;
            }
            if col == 0 && b == b'.' {
                col = 1; // The dot stuffed on the wire (the server takes it off).
            }
            out.push(b);
            col += 1;
            i += 1;
        }
        out
    }

    #[test]
    fn bdat_content_goes_by_data_normalised() {
        // A message received by BDAT may hold bare CR, bare LF and lines of any length; a
        // destination without CHUNKING gets it by DATA as CRLF lines of at most 998 octets,
        // dot-stuffed after every line end (bare ones included), and our server (which refuses
        // bare CR/LF) stores it.
        let mut body = b"Subject: bare\nX-Long: ".to_vec();
        body.extend(std::iter::repeat_n(b'h', 2500));
        body.extend_from_slice(b"\r\n\r\nbare lf\n.dot after lf\rbare cr\r.dot after cr\r\n..two\r\n");
        body.extend(std::iter::repeat_n(b'.', MAX_DATA_LINE * 2 + 5));
        body.extend_from_slice(b"\n\r\r\n\n\nlast line without end");
        assert!(needs_normalising(&body));
        let want = normalised(&body);
        for cap in [40, 64, 16 * 1024] {
            let run =
                pair_on(&server_cfg(1 << 20, NO_CHUNKING), vec![(spec(&["1@y.test"], body.len() as u64), &body)], cap);
            assert_eq!(run.results().len(), 1, "{:?}", run.events);
            assert_eq!(run.results()[0].outcome(0).code, 250, "{:?}", run.events);
            let stored = &run.stored[0];
            assert!(stored[..stored.len() - 2].ends_with(&want), "cap {cap}: {}", String::from_utf8_lossy(stored));
            assert!(stored.ends_with(b"without end\r\n"));
            // The wire: CRLF only, no line over 998 octets.
            assert_eq!(run.count(b"\n"), run.count(b"\r\n"));
            assert_eq!(run.count(b"\r"), run.count(b"\r\n"));
            assert!(run.wire.split(|&b| b == b'\n').all(|l| l.len() <= MAX_DATA_LINE + 1), "cap {cap}");
        }
        // A body fit for DATA is not rewritten; one CR too many, or a line of 999, is caught.
        assert!(!needs_normalising(b""));
        assert!(!needs_normalising(b"a\r\n\r\n.b\r\nno end"));
        assert!(!needs_normalising(&[b'x'; MAX_DATA_LINE]));
        assert!(needs_normalising(&[b'x'; MAX_DATA_LINE + 1]));
        assert!(needs_normalising(b"a\r\r\n"));
        assert!(needs_normalising(b"\n"));
        let mut long = vec![b'y'; MAX_DATA_LINE + 1];
        long.extend_from_slice(b"\r\n");
        assert!(needs_normalising(&long));
    }

    #[test]
    fn bdat_is_byte_exact_and_never_stuffed() {
        let mut body = b".\r\n..\r\n.lead\r\nmid\r\n.\r\nafter\r\n\r\n.\r\n\r\n.".to_vec();
        body.extend(std::iter::repeat_n(b"\r\n.\r\n.x\r\n", 500).flatten());
        body.extend_from_slice(b"\r\n.\r\n");
        let big: Vec<u8> = body.iter().copied().cycle().take(PIPELINED_CHUNK_MAX as usize + 7).collect();
        let scfg = SessionConfig::new("mx.test", 1 << 20, 100);
        for b in [&body, &big] {
            for cap in [64, 4096, 16 * 1024] {
                let run = bdat_run(&scfg, vec![(spec(&["1@y.test"], b.len() as u64), b)], cap);
                assert_eq!(run.results()[0].outcome(0).code, 250);
                let mut chunk = format!("BDAT {} LAST\r\n", b.len()).into_bytes();
                chunk.extend_from_slice(b);
                assert_eq!(memmem::find_iter(&run.wire, &chunk).count(), 1, "the chunk is the body, unstuffed");
                assert_eq!(run.count(b"DATA\r\n"), 0);
                assert!(run.stored[0].ends_with(b));
            }
        }
    }

    #[test]
    fn real_server_large_bdat_waits_for_the_envelope() {
        let body: Vec<u8> = b"0123456789abcd\r\n".iter().copied().cycle().take(300_000).collect();
        let run = bdat_run(
            &SessionConfig::new("mx.test", 1 << 20, 100),
            vec![(spec(&["1@y.test"], body.len() as u64), &body), (spec(&["2@y.test"], 3), b"ab\r")],
            1000,
        );
        assert!(run.results().iter().all(|r| r.outcome(0).code == 250));
        assert_eq!(run.count(b"BDAT 300000 LAST\r\n"), 1);
        assert!(run.stored[0].ends_with(&body) && run.stored[1].ends_with(b"ab\r"));
    }

    #[test]
    fn real_server_refusals() {
        // The real server caps recipients at 100 and refuses non-ASCII without SMTPUTF8.
        let addrs: Vec<String> = (0..101).map(|i| format!("r{i}@y.test")).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let (events, stored) = pair(vec![(spec(&refs, 4), &b"abc\r\n"[..])], 1024);
        let r = match &events[1] {
            ClientEvent::TransactionDone(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.outcome(99).code, 250);
        assert_eq!(r.outcome(100).to_string(), "452 4.5.3 Too many recipients");
        assert_eq!(stored.len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any body of CRLF lines, through any output size, arrives at the server unchanged.
        #[test]
        fn pair_round_trip(
            lines in proptest::collection::vec("[.a\u{e9} ]{0,8}", 0..40),
            cap in 8usize..300,
            chunking in any::<bool>(),
        ) {
            let mut body = Vec::new();
            for l in &lines {
                body.extend_from_slice(l.as_bytes());
                body.extend_from_slice(b"\r\n");
            }
            let scfg = server_cfg(1 << 20, if chunking { &[] } else { NO_CHUNKING });
            let run = pair_on(&scfg, vec![(spec(&["1@y.test"], body.len() as u64), &body[..])], cap);
            prop_assert_eq!(run.events.last(), Some(&ClientEvent::Closed));
            prop_assert_eq!(run.count(b"BDAT "), usize::from(chunking));
            prop_assert_eq!(run.stored.len(), 1);
            prop_assert!(run.stored[0].ends_with(&body));
        }
    }

    // Pipelining the next transaction behind the end of the current message (RFC 2920 §3.1).

    fn tx_done(ev: &ClientEvent) -> &TxResult {
        match ev {
            ClientEvent::TransactionDone(r) => r,
            other => panic!("{other:?}"),
        }
    }

    /// Ready, one DATA transaction to `1@y` started and its envelope answered with `354`, and
    /// one to `2@y` queued behind it.
    fn two_in_flight() -> Peer {
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 4));
        assert!(p.s.can_queue_next());
        p.s.queue_next(spec(&["2@y"], 4)).unwrap();
        assert!(!p.s.can_queue_next());
        // Nothing of the queued one before the current message is out.
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test> SIZE=4\r\nRCPT TO:<1@y>\r\nDATA\r\n");
        assert!(!p.s.wants_write());
        p.reply("250 ok\r\n250 ok\r\n354 go\r\n");
        assert!(p.take().is_empty());
        p
    }

    #[test]
    fn next_transaction_rides_behind_the_end_of_data() {
        let mut p = two_in_flight();
        // One write: the message, its end, and the next envelope up to DATA.
        assert_eq!(p.send(b"m1\r\n"), "m1\r\n.\r\nMAIL FROM:<a@x.test> SIZE=4\r\nRCPT TO:<2@y>\r\nDATA\r\n");
        assert!(!p.s.wants_write());
        assert_eq!(p.s.phase(), Some(Phase::DataEnd));
        // One read: the first message's reply, then the second's envelope replies.
        p.reply("250 2.0.0 queued as 1\r\n250 ok\r\n250 ok\r\n354 go\r\n");
        // No Ready while a transaction is queued.
        assert_eq!(p.done_alone().data_reply.as_ref().unwrap().to_string(), "250 2.0.0 queued as 1");
        // The second is current; a third may be queued behind it.
        assert!(p.s.can_queue_next());
        p.s.queue_next(spec(&["3@y"], 4)).unwrap();
        assert_eq!(p.send(b"m2\r\n"), "m2\r\n.\r\nMAIL FROM:<a@x.test> SIZE=4\r\nRCPT TO:<3@y>\r\nDATA\r\n");
        p.reply("250 2.0.0 queued as 2\r\n250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(p.done_alone().outcome(0).to_string(), "250 2.0.0 queued as 2");
        assert_eq!(p.send(b"m3\r\n"), "m3\r\n.\r\n");
        p.reply("250 2.0.0 queued as 3\r\n");
        assert_eq!(p.done().outcome(0).to_string(), "250 2.0.0 queued as 3");
        assert!(p.s.is_ready() && !p.s.can_queue_next());
    }

    #[test]
    fn next_waits_until_the_driver_took_the_previous_result() {
        let mut p = two_in_flight();
        let _ = p.send(b"m1\r\n");
        // The driver has not polled the first TransactionDone: the body it would pass is
        // still the first one's, so nothing is written.
        let r = "250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n";
        assert_eq!(p.s.handle_input(r.as_bytes(), p.now), r.len());
        p.s.poll_transmit(b"m1\r\n", &mut p.out);
        assert!(p.out.is_empty());
        p.drain();
        assert_eq!(p.take().len(), 1);
        assert_eq!(p.send(b"m2\r\n"), "m2\r\n.\r\n");
    }

    #[test]
    fn next_delivered_after_the_current_message_is_refused() {
        let mut p = two_in_flight();
        let _ = p.send(b"m1\r\n");
        p.reply("554 5.7.1 content rejected\r\n250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(p.done_alone().outcome(0).code, 554);
        assert_eq!(p.send(b"m2\r\n"), "m2\r\n.\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.done().outcome(0).code, 250);
    }

    #[test]
    fn data_refused_means_no_body_then_rset_then_next() {
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 4));
        p.s.queue_next(spec(&["2@y"], 4)).unwrap();
        let _ = p.send(b"m1\r\n");
        p.reply("250 ok\r\n250 ok\r\n451 4.3.0 not now\r\n");
        assert_eq!(p.done_alone().outcome(0).code, 451);
        // No body, and the next transaction only after the RSET's reply.
        assert_eq!(p.send(b"m1\r\n"), "RSET\r\n");
        assert_eq!(p.send(b"m1\r\n"), "");
        p.reply("250 ok\r\n");
        assert!(p.take().is_empty());
        assert_eq!(p.send(b"m2\r\n"), "MAIL FROM:<a@x.test> SIZE=4\r\nRCPT TO:<2@y>\r\nDATA\r\n");
        p.reply("250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(p.send(b"m2\r\n"), "m2\r\n.\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.done().outcome(0).code, 250);
    }

    #[test]
    fn next_mail_refused() {
        let mut p = two_in_flight();
        let _ = p.send(b"m1\r\n");
        p.reply("250 ok\r\n550 5.7.1 sender refused\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no valid recipients\r\n");
        let ev = p.take();
        assert_eq!(ev.len(), 3, "{ev:?}");
        assert_eq!(tx_done(&ev[0]).outcome(0).code, 250);
        let r = tx_done(&ev[1]);
        assert_eq!((r.mail_reply.code, r.outcome(0).code, r.data_reply.is_none()), (550, 550, true));
        assert_eq!(ev[2], ClientEvent::Ready);
        assert_eq!(p.send(b""), "");
    }

    #[test]
    fn closed_between_the_current_reply_and_the_next_ones() {
        let mut p = two_in_flight();
        let _ = p.send(b"m1\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(tx_done(&p.take()[0]).outcome(0).code, 250);
        p.s.handle_closed();
        p.drain();
        assert_eq!(p.failed().kind, FailureKind::Closed);
        // Nothing was answered for the second: the driver defers it whole.
        assert!(p.s.rcpt_replies_so_far().is_empty());
        assert!(!p.s.can_queue_next() && !p.s.wants_write());
    }

    #[test]
    fn timeout_with_two_in_flight() {
        let mut p = two_in_flight();
        let _ = p.send(b"m1\r\n");
        // The current transaction's phase rules.
        fire(&mut p, Phase::DataEnd, timeouts().data_end);
        assert!(!p.s.wants_write());

        // Closed with the second queued but not yet out: one Failed, nothing more.
        let mut p = two_in_flight();
        p.s.handle_closed();
        p.drain();
        assert_eq!(p.failed().kind, FailureKind::Closed);
        assert_eq!(p.send(b"m1\r\n"), "");
    }

    #[test]
    fn next_with_pipelined_bdat() {
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 2));
        p.s.queue_next(spec(&["2@y"], 3)).unwrap();
        // The next MAIL and RCPTs follow the whole chunk; its own BDAT waits for its turn.
        assert_eq!(
            p.send(b"ab"),
            "MAIL FROM:<a@x.test> SIZE=2\r\nRCPT TO:<1@y>\r\nBDAT 2 LAST\r\nab\
             MAIL FROM:<a@x.test> SIZE=3\r\nRCPT TO:<2@y>\r\n"
        );
        assert!(!p.s.wants_write());
        p.reply("250 ok\r\n250 ok\r\n250 2.0.0 queued as 1\r\n250 ok\r\n");
        assert_eq!(p.done_alone().outcome(0).to_string(), "250 2.0.0 queued as 1");
        assert_eq!(p.send(b"cde"), "BDAT 3 LAST\r\ncde");
        p.reply("250 ok\r\n250 2.0.0 queued as 2\r\n");
        assert_eq!(p.done().outcome(0).to_string(), "250 2.0.0 queued as 2");
    }

    #[test]
    fn next_behind_a_refused_bdat() {
        // The next MAIL is out behind a chunk the server refuses: no RSET can go before it, and
        // a refusal of that MAIL may be about the old transaction, so it only defers.
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 2));
        p.s.queue_next(spec(&["2@y"], 3)).unwrap();
        let _ = p.send(b"ab");
        p.reply("250 ok\r\n250 ok\r\n554 5.6.0 bad chunk\r\n503 5.5.1 nested MAIL\r\n503 5.5.1 sequence\r\n");
        let ev = p.take();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(tx_done(&ev[0]).outcome(0).code, 554);
        let r = tx_done(&ev[1]);
        assert_eq!((r.mail_reply.code, r.outcome(0).code), (451, 451));
        assert!(r.outcome(0).to_string().contains("503 5.5.1 nested MAIL"));
        assert_eq!(p.send(b""), "RSET\r\n");
        p.reply("250 ok\r\n");
        assert_eq!(p.take(), [ClientEvent::Ready]);

        // The server had reset: the next goes on as usual.
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 2));
        p.s.queue_next(spec(&["2@y"], 3)).unwrap();
        let _ = p.send(b"ab");
        p.reply("250 ok\r\n250 ok\r\n554 5.6.0 bad chunk\r\n250 ok\r\n250 ok\r\n");
        assert_eq!(p.take().len(), 1);
        assert_eq!(p.send(b"cde"), "BDAT 3 LAST\r\ncde");
        p.reply("250 ok\r\n");
        assert_eq!(p.done().outcome(0).code, 250);
    }

    #[test]
    fn next_bdat_envelope_refused_sends_no_chunk() {
        let mut p = Peer::ready(CHUNKING_EHLO);
        p.s.start_transaction(spec(&["1@y"], 2));
        p.s.queue_next(spec(&["2@y"], 3)).unwrap();
        let _ = p.send(b"ab");
        // The second's MAIL refusal is in before its chunk could be queued.
        p.reply("250 ok\r\n250 ok\r\n250 ok\r\n550 5.7.1 no\r\n");
        assert_eq!(p.take().len(), 1);
        assert_eq!(p.send(b"cde"), "");
        p.reply("503 5.5.1 no MAIL\r\n");
        let r = p.done();
        assert_eq!(r.outcome(0).code, 550);
    }

    #[test]
    fn queue_next_refusals() {
        // Without PIPELINING nothing is queued: lockstep as before.
        let mut p = Peer::ready(PLAIN_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        assert!(!p.s.can_queue_next());
        assert_eq!(p.s.queue_next(spec(&["2@y"], 3)).unwrap_err().code, 451);
        assert_eq!(p.send(b""), "MAIL FROM:<a@x.test>\r\n");
        // Not while idle, nor twice.
        let mut p = Peer::ready(FULL_EHLO);
        assert!(!p.s.can_queue_next());
        assert_eq!(p.s.queue_next(spec(&["2@y"], 3)).unwrap_err().code, 451);
        p.s.start_transaction(spec(&["1@y"], 3));
        p.s.queue_next(spec(&["2@y"], 3)).unwrap();
        assert_eq!(p.s.queue_next(spec(&["3@y"], 3)).unwrap_err().code, 451);
        // What EHLO alone decides comes back at once (SIZE 1000 here).
        let mut p = Peer::ready(FULL_EHLO);
        p.s.start_transaction(spec(&["1@y"], 3));
        assert_eq!(p.s.queue_next(spec(&["2@y"], 5000)).unwrap_err().code, 552);
        assert!(p.s.can_queue_next());
        assert!(p.take().is_empty());
    }
}
