//! Pure: the inbound SMTP session state machine (RFC 5321 §4.1, §4.3.2; PIPELINING RFC 2920;
//! CHUNKING RFC 3030; SIZE RFC 1870; 8BITMIME RFC 6152; SMTPUTF8 RFC 6531; DSN RFC 3461).
//!
//! # Driving it
//! 1. Write [`ServerSession::greeting`] to the output buffer.
//! 2. On input, call [`ServerSession::handle_input`] with the buffered bytes; drop the
//!    `consumed` prefix. It stops early when the output buffer is nearly full (backpressure),
//!    when a message is complete ([`Event::Message`]) or when the session ends ([`Event::Close`]).
//! 3. After [`Event::Message`], store [`ServerSession::message`] durably, call
//!    [`ServerSession::release_body`], and once the store is durable (or failed) call
//!    [`ServerSession::message_result`]; until then `handle_input` consumes nothing.
//! 4. [`ServerSession::handle_timeout`] and [`ServerSession::handle_shutdown`] end the session
//!    with a `421`.
//!
//! The session never reads the clock: the wall time for `Received:` and queue ids comes in
//! through [`Ctx`].

use std::io::Write as _;
use std::net::IpAddr;

use super::auth::{self, AuthFault, Credentials, Mechanism};
use super::command::{self, Command, Path};
use super::data::{bdat_take, DataScanner, Taint};
use super::line::{is_auth_command, next_line, next_line_within, skip_line, Framed, MAX_AUTH_LINE};
use super::reply::{self, seq, Fault};
use crate::buf::{Buf, VecPool};
use crate::message::{notify, write_received, BodyType, Envelope, IdGen, QueueId, Ret, Trace};

/// Room the output buffer must have before another command is processed: the longest reply
/// (the EHLO response) fits in it.
pub const REPLY_ROOM: usize = 1024;

/// Per-listener constants the session needs, rendered once at start.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Host name for the greeting, EHLO and `Received:`.
    pub hostname: String,
    /// `--max-message-size`.
    pub max_message_size: u64,
    /// `--max-recipients`.
    pub max_recipients: usize,
    /// Bad commands in a row before `421` and close.
    pub max_bad_commands: u32,
    /// `220 ... ESMTP` line.
    pub greeting: Vec<u8>,
    /// Whole multi-line EHLO reply.
    pub ehlo: Vec<u8>,
    /// HELO reply.
    pub helo: Vec<u8>,
    /// STARTTLS is offered (a certificate is loaded).
    pub starttls: bool,
    /// AUTH is offered inside TLS (an auth file is loaded).
    pub auth: bool,
    /// EHLO reply inside TLS (no STARTTLS; AUTH when enabled).
    pub ehlo_tls: Vec<u8>,
}

impl SessionConfig {
    /// Renders the fixed replies for `hostname`.
    pub fn new(hostname: &str, max_message_size: u64, max_recipients: usize) -> SessionConfig {
        let greeting = format!("220 {hostname} ESMTP sluice\r\n").into_bytes();
        let helo = format!("250 {hostname}\r\n").into_bytes();
        let mut cfg = SessionConfig {
            hostname: hostname.to_owned(),
            max_message_size,
            max_recipients,
            max_bad_commands: 10,
            greeting,
            ehlo: Vec::new(),
            helo,
            starttls: false,
            auth: false,
            ehlo_tls: Vec::new(),
        };
        cfg.render_ehlo();
        cfg
    }

    /// Turns STARTTLS and AUTH on or off and renders the EHLO replies again.
    pub fn with_features(mut self, starttls: bool, auth: bool) -> SessionConfig {
        self.starttls = starttls;
        self.auth = auth;
        self.render_ehlo();
        self
    }

    fn render_ehlo(&mut self) {
        let common = format!(
            "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250-DSN\r\n",
            self.hostname, self.max_message_size
        );
        let starttls = if self.starttls { "250-STARTTLS\r\n" } else { "" };
        let auth = if self.auth { "250-AUTH PLAIN LOGIN\r\n" } else { "" };
        self.ehlo = format!("{common}{starttls}250 ENHANCEDSTATUSCODES\r\n").into_bytes();
        self.ehlo_tls = format!("{common}{auth}250 ENHANCEDSTATUSCODES\r\n").into_bytes();
    }
}

/// What a session needs from its surroundings for one call.
pub struct Ctx<'a> {
    /// Fixed configuration.
    pub cfg: &'a SessionConfig,
    /// Where message bodies come from and go back to.
    pub bodies: &'a mut VecPool,
    /// Queue id allocator.
    pub ids: &'a mut IdGen,
    /// Wall clock, microseconds since the Unix epoch.
    pub now_unix_us: u64,
    /// The spool has room for new mail; `false` answers MAIL with `452 4.3.1` (RFC 5321
    /// §4.5.3.1.10: insufficient system storage) before any data is sent.
    pub accepting: bool,
}

/// What the driver must act on after [`ServerSession::handle_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A message is complete: store it, then call `message_result`.
    Message,
    /// Flush the output, then close the connection.
    Close,
    /// `220` to STARTTLS is in the output: send it in the clear, then start the TLS handshake.
    /// Everything the client pipelined behind STARTTLS has been discarded.
    StartTls,
    /// Credentials are complete: verify [`ServerSession::take_credentials`] (off the loop)
    /// and answer with [`ServerSession::auth_result`].
    Auth,
}

/// The answer to an AUTH attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// `235`: the session is authenticated.
    Accepted,
    /// `535 5.7.8`.
    Rejected,
    /// `421 4.7.0`: too many failures from this client; the session closes.
    Blocked,
    /// `454 4.7.0`: too many checks waiting; nothing was checked, the session goes on.
    Busy,
}

/// Result of one [`ServerSession::handle_input`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Input bytes used.
    pub consumed: usize,
    /// Something for the driver to do; `None` means "give me more input (or output room)".
    pub event: Option<Event>,
}

/// Which server timeout applies now (RFC 5321 §4.5.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// Waiting for a command.
    Command,
    /// Inside DATA or a BDAT chunk.
    Data,
    /// Waiting for the spool: no timeout applies.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Command,
    /// Discarding the rest of an overlong line; the fault is reported once its LF is seen.
    SkipLine(Fault),
    Data,
    /// Reading a BDAT chunk: octets still to read, LAST given, chunk refused before reading.
    Bdat {
        remaining: u64,
        last: bool,
        refused: Option<Fault>,
    },
    /// Message complete, waiting for the spool.
    Stored,
    /// Waiting for the next line of an AUTH exchange.
    AuthLine(AuthStep),
    /// Credentials handed out for verification.
    AuthWait,
    Closed,
}

/// Which AUTH response comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthStep {
    /// The PLAIN message (after an empty `334`).
    Plain,
    /// LOGIN user name.
    LoginUser,
    /// LOGIN password.
    LoginPass,
}

/// Whether the transaction is using DATA or BDAT (they may not be mixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    None,
    Bdat,
}

/// One inbound SMTP session.
#[derive(Debug)]
pub struct ServerSession {
    state: State,
    esmtp: bool,
    greeted: bool,
    in_mail: bool,
    transfer: Transfer,
    relay_allowed: bool,
    bad_in_row: u32,
    envelope: Envelope,
    body: Option<Vec<u8>>,
    scanner: DataScanner,
    bdat_size: u64,
    queue_id: QueueId,
    peer: IpAddr,
    last_fault: Option<Fault>,
    /// TLS is on (STARTTLS done or implicit TLS).
    tls: bool,
    /// Negotiated (version, cipher), for `Received:`.
    tls_info: Option<(&'static str, &'static str)>,
    /// AUTH succeeded; `creds.user` is the user.
    authenticated: bool,
    creds: Credentials,
    /// Command and AUTH response lines finished so far (wrapping), for the driver's deadline.
    lines: u32,
}

impl ServerSession {
    /// A session for a client at `peer`; `relay_allowed` when the peer is in `--allow`.
    pub fn new(peer: IpAddr, relay_allowed: bool) -> ServerSession {
        let mut envelope = Envelope::default();
        envelope.client_ip = peer;
        ServerSession {
            state: State::Command,
            esmtp: false,
            greeted: false,
            in_mail: false,
            transfer: Transfer::None,
            relay_allowed,
            bad_in_row: 0,
            envelope,
            body: None,
            scanner: DataScanner::new(0),
            bdat_size: 0,
            queue_id: QueueId(0),
            peer,
            last_fault: None,
            tls: false,
            tls_info: None,
            authenticated: false,
            creds: Credentials::new(),
            lines: 0,
        }
    }

    /// Marks the session as running inside TLS from the start (implicit-TLS listener).
    pub fn tls_started(&mut self) {
        self.tls = true;
    }

    /// Records the negotiated TLS version and cipher once the handshake is done.
    pub fn set_tls_info(&mut self, version: &'static str, cipher: &'static str) {
        self.tls_info = Some((version, cipher));
    }

    /// Whether TLS is on.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The authenticated user, if any.
    pub fn auth_user(&self) -> Option<&[u8]> {
        self.authenticated.then_some(&self.creds.user[..])
    }

    /// Whether the client may choose its messages' egress pool (`X-Sluice-Pool:`): it is in
    /// `--allow` or authenticated, as for relaying.
    pub fn trusted(&self) -> bool {
        self.relay_allowed || self.authenticated
    }

    /// Records the egress source chosen for the finished message (stored with it).
    pub fn set_source(&mut self, name: &[u8]) {
        self.envelope.source.clear();
        self.envelope.source.extend_from_slice(name);
    }

    /// After [`Event::Auth`]: the credentials to verify (hand them back to `auth_result`).
    pub fn take_credentials(&mut self) -> Credentials {
        std::mem::take(&mut self.creds)
    }

    /// The verdict on the credentials of [`Event::Auth`]; writes `235`, `535`, `421` or `454` and
    /// returns true when the session is now closed. Ignored unless an AUTH is pending.
    pub fn auth_result(&mut self, outcome: AuthOutcome, mut creds: Credentials, out: &mut Buf) -> bool {
        if self.state != State::AuthWait {
            return self.state == State::Closed;
        }
        creds.clear_pass();
        self.state = State::Command;
        match outcome {
            AuthOutcome::Accepted => {
                self.creds = creds;
                self.authenticated = true;
                self.ok(reply::AUTH_OK, out);
            }
            AuthOutcome::Rejected => {
                creds.clear();
                self.creds = creds;
                out.push(reply::AUTH_FAILED);
            }
            AuthOutcome::Blocked => {
                creds.clear();
                self.creds = creds;
                out.push(reply::AUTH_BLOCKED);
                self.state = State::Closed;
            }
            AuthOutcome::Busy => {
                creds.clear();
                self.creds = creds;
                out.push(reply::AUTH_BUSY);
            }
        }
        self.state == State::Closed
    }

    /// Writes the `220` greeting.
    pub fn greeting(&self, cfg: &SessionConfig, out: &mut Buf) {
        out.push(&cfg.greeting);
    }

    /// The timeout that applies in the current state.
    pub fn timeout_kind(&self) -> TimeoutKind {
        match self.state {
            State::Data | State::Bdat { .. } => TimeoutKind::Data,
            State::Stored | State::Closed | State::AuthWait => TimeoutKind::None,
            State::Command | State::SkipLine(_) | State::AuthLine(_) => TimeoutKind::Command,
        }
    }

    /// Command lines (and AUTH response lines, and overlong lines once their end is seen)
    /// finished so far, wrapping: a change means the client completed a line, which is what
    /// buys it more time (`smtp::pace`), not a byte.
    pub fn lines_done(&self) -> u32 {
        self.lines
    }

    /// True after the session has ended (QUIT, 421).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// True while a message is being received (DATA or BDAT in progress).
    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data | State::Bdat { .. }) || self.transfer == Transfer::Bdat
    }

    /// The most recent refusal since the last call, for the driver's log line.
    pub fn take_last_fault(&mut self) -> Option<Fault> {
        self.last_fault.take()
    }

    /// The envelope collected so far (for logging).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Consumes as much of `input` as possible, writing replies to `out`.
    pub fn handle_input(&mut self, ctx: &mut Ctx<'_>, input: &[u8], out: &mut Buf) -> Progress {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Closed => return Progress { consumed: input.len(), event: None },
                State::Stored | State::AuthWait => return Progress { consumed: used, event: None },
                // RFC 4954 §4: a response line may be up to 12,288 octets; a longer one ends the
                // exchange with `500 5.5.6` once its end is found.
                State::AuthLine(step) => match next_line_within(rest, MAX_AUTH_LINE) {
                    Framed::Partial => return Progress { consumed: used, event: None },
                    Framed::Overlong { consumed, ended } => {
                        used += consumed;
                        self.lines = self.lines.wrapping_add(u32::from(ended));
                        self.creds.clear();
                        let fault = Fault::Auth(AuthFault::TooLong);
                        self.state = if ended { State::Command } else { State::SkipLine(fault) };
                        if ended && self.fault(fault, out) {
                            return Progress { consumed: input.len(), event: Some(Event::Close) };
                        }
                    }
                    Framed::Line(line, n) => {
                        used += n;
                        self.lines = self.lines.wrapping_add(1);
                        match self.auth_step(step, line, out) {
                            Ok(true) => return Progress { consumed: used, event: Some(Event::Auth) },
                            Ok(false) => {}
                            Err(f) => {
                                self.creds.clear();
                                self.state = State::Command;
                                if self.fault(f, out) {
                                    return Progress { consumed: input.len(), event: Some(Event::Close) };
                                }
                            }
                        }
                    }
                },
                State::Data => {
                    let mut body = self.body.take().unwrap_or_default();
                    let r = self.scanner.scan(rest, &mut body);
                    self.body = Some(body);
                    used += r.consumed;
                    if !r.done {
                        return Progress { consumed: used, event: None };
                    }
                    match self.scanner.taint() {
                        None => {
                            self.state = State::Stored;
                            return Progress { consumed: used, event: Some(Event::Message) };
                        }
                        Some(t) => self.refuse_message(ctx, t, out),
                    }
                }
                State::Bdat { mut remaining, last, refused } => {
                    let mut body = self.body.take().unwrap_or_default();
                    let limit = if refused.is_some() { 0 } else { ctx.cfg.max_message_size };
                    let n = bdat_take(rest, &mut remaining, &mut self.bdat_size, limit, &mut body);
                    self.body = Some(body);
                    used += n;
                    self.state = State::Bdat { remaining, last, refused };
                    if remaining > 0 {
                        return Progress { consumed: used, event: None };
                    }
                    if let Some(fault) = refused {
                        self.state = State::Command;
                        self.fault(fault, out);
                        continue;
                    }
                    if self.bdat_size > ctx.cfg.max_message_size {
                        self.refuse_message(ctx, Taint::TooBig, out);
                        continue;
                    }
                    if last {
                        self.state = State::Stored;
                        return Progress { consumed: used, event: Some(Event::Message) };
                    }
                    self.state = State::Command;
                    let _ = write!(Writer(out), "250 2.0.0 {n} octets received\r\n", n = self.bdat_size);
                }
                State::SkipLine(fault) => {
                    let (n, ended) = skip_line(rest);
                    used += n;
                    if !ended {
                        return Progress { consumed: used, event: None };
                    }
                    self.lines = self.lines.wrapping_add(1);
                    self.state = State::Command;
                    if self.fault(fault, out) {
                        return Progress { consumed: input.len(), event: Some(Event::Close) };
                    }
                }
                State::Command => {
                    if out.room() < REPLY_ROOM {
                        return Progress { consumed: used, event: None };
                    }
                    let mut framed = next_line(rest);
                    let mut too_long = Fault::LineTooLong;
                    if matches!(framed, Framed::Overlong { .. }) && ctx.cfg.auth && is_auth_command(rest) {
                        // RFC 4954 §4: AUTH with its initial response may be up to 12,288
                        // octets; past that it gets `500 5.5.6` like a long response line.
                        framed = next_line_within(rest, MAX_AUTH_LINE);
                        too_long = Fault::Auth(AuthFault::TooLong);
                    }
                    match framed {
                        Framed::Partial => return Progress { consumed: used, event: None },
                        Framed::Overlong { consumed, ended } => {
                            used += consumed;
                            if !ended {
                                self.state = State::SkipLine(too_long);
                                continue;
                            }
                            self.lines = self.lines.wrapping_add(1);
                            if self.fault(too_long, out) {
                                return Progress { consumed: input.len(), event: Some(Event::Close) };
                            }
                        }
                        Framed::Line(line, n) => {
                            used += n;
                            self.lines = self.lines.wrapping_add(1);
                            if let Some(ev) = self.command(ctx, line, out) {
                                // After QUIT nothing more is read; after STARTTLS whatever
                                // was pipelined behind it is discarded (RFC 3207 §4.2).
                                if ev == Event::Close || ev == Event::StartTls {
                                    return Progress { consumed: input.len(), event: Some(ev) };
                                }
                                return Progress { consumed: used, event: Some(ev) };
                            }
                        }
                    }
                }
            }
        }
    }

    /// The complete message: its queue id, envelope and body (Received header first).
    pub fn message(&self) -> (QueueId, &Envelope, &[u8]) {
        (self.queue_id, &self.envelope, self.body.as_deref().unwrap_or(&[]))
    }

    /// Lends the finished message's body out (to the DKIM signer) without a copy. The session
    /// stays waiting for the spool; [`ServerSession::restore_body`] gives it back before the
    /// message is stored. `None` unless a message has just ended.
    pub fn take_body(&mut self) -> Option<Vec<u8>> {
        if self.state != State::Stored {
            return None;
        }
        self.body.take()
    }

    /// Gives back the body lent by [`ServerSession::take_body`].
    pub fn restore_body(&mut self, body: Vec<u8>) {
        self.body = Some(body);
    }

    /// Gives the body buffer back to the pool once the spool has a copy.
    pub fn release_body(&mut self, bodies: &mut VecPool) {
        if let Some(b) = self.body.take() {
            bodies.give(b);
        }
    }

    /// The spool result for the message reported by [`Event::Message`]: `Ok` writes the `250`
    /// with the queue id; `Err(reply)` writes that reply. Either way the transaction ends.
    pub fn message_result(&mut self, ctx: &mut Ctx<'_>, result: Result<(), &[u8]>, out: &mut Buf) {
        if self.state != State::Stored {
            return;
        }
        self.release_body(ctx.bodies);
        match result {
            Ok(()) => {
                let id = self.queue_id.to_bytes();
                out.push(b"250 2.0.0 Ok: queued as ");
                out.push(&id);
                out.push(b"\r\n");
            }
            Err(reply) => {
                out.push(reply);
            }
        }
        self.reset_transaction();
        self.state = State::Command;
    }

    /// The client was idle too long: `421 4.4.2`, then close.
    pub fn handle_timeout(&mut self, ctx: &mut Ctx<'_>, out: &mut Buf) {
        self.release_body(ctx.bodies);
        out.push(reply::TIMEOUT);
        self.state = State::Closed;
    }

    /// The relay is shutting down. Sessions waiting for a command (or in any state when `force`)
    /// get `421 4.3.0` and are closed; returns whether it closed. A session waiting for the
    /// spool is never closed here: its message is about to be answered.
    pub fn handle_shutdown(&mut self, ctx: &mut Ctx<'_>, force: bool, out: &mut Buf) -> bool {
        let idle = matches!(self.state, State::Command | State::SkipLine(_) | State::AuthLine(_) | State::AuthWait)
            && !self.in_data();
        if self.state == State::Stored || self.state == State::Closed || !(idle || force) {
            return self.state == State::Closed;
        }
        self.release_body(ctx.bodies);
        out.push(reply::SHUTDOWN);
        self.state = State::Closed;
        true
    }

    /// Writes a fault's reply; returns true when the bad-command limit closed the session.
    fn fault(&mut self, fault: Fault, out: &mut Buf) -> bool {
        self.last_fault = Some(fault);
        out.push(fault.reply());
        if fault.is_protocol_error() {
            self.bad_in_row += 1;
            if self.bad_in_row >= 10 {
                out.push(reply::TOO_MANY_ERRORS);
                self.state = State::Closed;
                return true;
            }
        }
        false
    }

    fn ok(&mut self, bytes: &[u8], out: &mut Buf) {
        self.bad_in_row = 0;
        out.push(bytes);
    }

    fn refuse_message(&mut self, ctx: &mut Ctx<'_>, taint: Taint, out: &mut Buf) {
        self.release_body(ctx.bodies);
        let fault = match taint {
            Taint::BareLineEnding => Fault::BareLineEnding,
            Taint::TooBig => Fault::TooBig,
        };
        self.last_fault = Some(fault);
        out.push(fault.reply());
        self.reset_transaction();
        self.state = State::Command;
    }

    fn reset_transaction(&mut self) {
        self.in_mail = false;
        self.transfer = Transfer::None;
        self.bdat_size = 0;
        self.envelope.clear_transaction();
    }

    fn command(&mut self, ctx: &mut Ctx<'_>, line: &[u8], out: &mut Buf) -> Option<Event> {
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(f) => {
                return self.fault(f, out).then_some(Event::Close);
            }
        };
        let result = match cmd {
            Command::Ehlo(name) | Command::Helo(name) => {
                let esmtp = matches!(cmd, Command::Ehlo(_));
                self.reset_transaction();
                self.greeted = true;
                self.esmtp = esmtp;
                self.envelope.helo.clear();
                self.envelope.helo.extend_from_slice(name);
                let ehlo = if self.tls { &ctx.cfg.ehlo_tls } else { &ctx.cfg.ehlo };
                self.ok(if esmtp { ehlo } else { &ctx.cfg.helo }, out);
                Ok(())
            }
            Command::Mail(path, params) => self.mail(ctx, path, params, out),
            Command::Rcpt(path, params) => self.rcpt(ctx, path, params, out),
            Command::Data => self.data(ctx, out),
            Command::Bdat(size, last) => {
                self.bdat(ctx, size, last, out);
                Ok(())
            }
            Command::Rset => {
                self.reset_transaction();
                self.ok(reply::OK, out);
                Ok(())
            }
            Command::Noop => {
                self.ok(reply::OK, out);
                Ok(())
            }
            Command::Quit => {
                out.push(reply::BYE);
                self.state = State::Closed;
                return Some(Event::Close);
            }
            Command::Vrfy => {
                self.ok(reply::VRFY, out);
                Ok(())
            }
            Command::Expn => Err(Fault::ExpnDisabled),
            Command::Help => {
                self.ok(reply::HELP, out);
                Ok(())
            }
            Command::StartTls(arg) => {
                if !ctx.cfg.starttls {
                    Err(Fault::TlsUnavailable)
                } else if self.tls {
                    Err(Fault::Sequence(seq::ALREADY_TLS))
                } else if !arg.is_empty() {
                    Err(Fault::Syntax(reply::syntax::NO_ARGS))
                } else if self.in_mail {
                    Err(Fault::Sequence(seq::IN_TRANSACTION))
                } else {
                    // RFC 3207 §4.2: back to the initial state; a new EHLO is required.
                    self.reset_transaction();
                    self.greeted = false;
                    self.esmtp = false;
                    self.envelope.helo.clear();
                    self.tls = true;
                    self.ok(reply::READY_TLS, out);
                    return Some(Event::StartTls);
                }
            }
            Command::Auth(arg) => match self.auth(ctx, arg, out) {
                Ok(true) => return Some(Event::Auth),
                Ok(false) => Ok(()),
                Err(f) => {
                    self.creds.clear();
                    Err(f)
                }
            },
        };
        match result {
            Ok(()) => None,
            Err(f) => self.fault(f, out).then_some(Event::Close),
        }
    }

    fn mail(&mut self, ctx: &mut Ctx<'_>, path: Path<'_>, params: &[u8], out: &mut Buf) -> Result<(), Fault> {
        if !self.greeted {
            return Err(Fault::Sequence(seq::NEED_EHLO));
        }
        if self.in_mail {
            return Err(Fault::Sequence(seq::NESTED_MAIL));
        }
        if !ctx.accepting {
            return Err(Fault::StorageFull);
        }
        self.envelope.clear_transaction();
        for (key, value) in command::params(params) {
            // Parameters are only defined for EHLO sessions (RFC 5321 §4.1.2).
            if !self.esmtp {
                return Err(Fault::UnknownParameter);
            }
            if key.eq_ignore_ascii_case(b"SIZE") {
                let size = value.and_then(command::parse_u64).ok_or(Fault::UnknownParameter)?;
                if size > ctx.cfg.max_message_size {
                    self.envelope.clear_transaction();
                    return Err(Fault::TooBig);
                }
            } else if key.eq_ignore_ascii_case(b"BODY") {
                let v = value.ok_or(Fault::UnknownParameter)?;
                self.envelope.body_type = if v.eq_ignore_ascii_case(b"7BIT") {
                    BodyType::SevenBit
                } else if v.eq_ignore_ascii_case(b"8BITMIME") {
                    BodyType::EightBitMime
                } else if v.eq_ignore_ascii_case(b"BINARYMIME") {
                    BodyType::BinaryMime
                } else {
                    return Err(Fault::UnknownParameter);
                };
            } else if key.eq_ignore_ascii_case(b"SMTPUTF8") && value.is_none() {
                self.envelope.smtputf8 = true;
            } else if key.eq_ignore_ascii_case(b"RET") {
                let v = value.ok_or(Fault::UnknownParameter)?;
                self.envelope.ret = if v.eq_ignore_ascii_case(b"FULL") {
                    Ret::Full
                } else if v.eq_ignore_ascii_case(b"HDRS") {
                    Ret::Hdrs
                } else {
                    return Err(Fault::UnknownParameter);
                };
            } else if key.eq_ignore_ascii_case(b"ENVID") {
                let v = value.ok_or(Fault::UnknownParameter)?;
                if v.is_empty() || v.len() > 100 || !command::valid_xtext(v) {
                    return Err(Fault::UnknownParameter);
                }
                self.envelope.envid.clear();
                self.envelope.envid.extend_from_slice(v);
            } else if key.eq_ignore_ascii_case(b"AUTH") {
                // RFC 4954 §5: accepted and ignored until AUTH itself exists.
                let v = value.ok_or(Fault::UnknownParameter)?;
                if v != b"<>" && !command::valid_xtext(v) {
                    return Err(Fault::UnknownParameter);
                }
            } else {
                return Err(Fault::UnknownParameter);
            }
        }
        if path.utf8 && !self.envelope.smtputf8 {
            self.envelope.clear_transaction();
            return Err(Fault::Utf8NotDeclared);
        }
        self.envelope.sender.extend_from_slice(path.addr);
        self.in_mail = true;
        self.ok(reply::SENDER_OK, out);
        Ok(())
    }

    fn rcpt(&mut self, ctx: &mut Ctx<'_>, path: Path<'_>, params: &[u8], out: &mut Buf) -> Result<(), Fault> {
        if !self.in_mail {
            return Err(Fault::Sequence(seq::NEED_MAIL));
        }
        let mut notify_bits = 0u8;
        let mut orcpt: &[u8] = b"";
        for (key, value) in command::params(params) {
            if !self.esmtp {
                return Err(Fault::UnknownParameter);
            }
            if key.eq_ignore_ascii_case(b"NOTIFY") {
                notify_bits = parse_notify(value.ok_or(Fault::UnknownParameter)?)?;
            } else if key.eq_ignore_ascii_case(b"ORCPT") {
                let v = value.ok_or(Fault::UnknownParameter)?;
                // addr-type ";" xtext (RFC 3461 §4.2); the type is an atom such as rfc822.
                let semi = memchr::memchr(b';', v).ok_or(Fault::UnknownParameter)?;
                if semi == 0 || v.len() > 500 || !command::valid_xtext(&v[semi + 1..]) {
                    return Err(Fault::UnknownParameter);
                }
                orcpt = v;
            } else {
                return Err(Fault::UnknownParameter);
            }
        }
        if path.utf8 && !self.envelope.smtputf8 {
            return Err(Fault::Utf8NotDeclared);
        }
        // RFC 5321 §4.5.1: mail to <postmaster> (no domain: ours) is accepted from anyone.
        let postmaster = memchr::memchr(b'@', path.addr).is_none();
        if !self.relay_allowed && !self.authenticated && !postmaster {
            return Err(Fault::RelayDenied);
        }
        if self.envelope.rcpt_count() >= ctx.cfg.max_recipients {
            return Err(Fault::TooManyRecipients);
        }
        self.envelope.push_rcpt(path.addr, orcpt, notify_bits);
        self.ok(reply::RCPT_OK, out);
        Ok(())
    }

    fn data(&mut self, ctx: &mut Ctx<'_>, out: &mut Buf) -> Result<(), Fault> {
        if !self.in_mail {
            return Err(Fault::Sequence(seq::NEED_MAIL));
        }
        if self.transfer == Transfer::Bdat {
            return Err(Fault::Sequence(seq::DATA_AFTER_BDAT));
        }
        if self.envelope.rcpt_count() == 0 {
            return Err(Fault::Sequence(seq::NEED_RCPT));
        }
        if self.envelope.body_type == BodyType::BinaryMime {
            return Err(Fault::Sequence(seq::BINARY_NEEDS_BDAT));
        }
        self.start_body(ctx);
        self.scanner = DataScanner::new(ctx.cfg.max_message_size);
        self.state = State::Data;
        self.ok(reply::START_DATA, out);
        Ok(())
    }

    fn bdat(&mut self, ctx: &mut Ctx<'_>, size: u64, last: bool, out: &mut Buf) {
        // The chunk is always read, even when refused, so the session stays in sync.
        let refused = if !self.in_mail {
            Some(Fault::Sequence(seq::NEED_MAIL))
        } else if self.envelope.rcpt_count() == 0 {
            Some(Fault::Sequence(seq::NEED_RCPT))
        } else {
            None
        };
        if refused.is_none() && self.transfer == Transfer::None {
            self.transfer = Transfer::Bdat;
            self.bdat_size = 0;
            self.start_body(ctx);
        }
        self.bad_in_row = if refused.is_some() { self.bad_in_row } else { 0 };
        self.state = State::Bdat { remaining: size, last, refused };
        let _ = out;
    }

    /// `AUTH mechanism [initial-response]`; true when the credentials are complete.
    fn auth(&mut self, ctx: &Ctx<'_>, arg: &[u8], out: &mut Buf) -> Result<bool, Fault> {
        if !ctx.cfg.auth {
            return Err(Fault::AuthUnavailable);
        }
        if !self.tls {
            return Err(Fault::AuthNeedsTls);
        }
        if !self.esmtp {
            return Err(Fault::Sequence(seq::NEED_EHLO));
        }
        if self.authenticated {
            return Err(Fault::Sequence(seq::ALREADY_AUTH));
        }
        if self.in_mail {
            return Err(Fault::Sequence(seq::IN_TRANSACTION));
        }
        let (mech, initial) = auth::parse_auth(arg).map_err(Fault::Auth)?;
        self.creds.clear();
        let step = match (mech, initial) {
            (Mechanism::Plain, Some(r)) => return self.auth_step(AuthStep::Plain, r, out),
            (Mechanism::Plain, None) => {
                out.push(auth::PLAIN_PROMPT);
                AuthStep::Plain
            }
            (Mechanism::Login, Some(r)) => return self.auth_step(AuthStep::LoginUser, r, out),
            (Mechanism::Login, None) => {
                out.push(auth::LOGIN_USER_PROMPT);
                AuthStep::LoginUser
            }
        };
        self.state = State::AuthLine(step);
        Ok(false)
    }

    /// One client response in an AUTH exchange; true when the credentials are complete.
    fn auth_step(&mut self, step: AuthStep, line: &[u8], out: &mut Buf) -> Result<bool, Fault> {
        if line == b"*" {
            return Err(Fault::Auth(AuthFault::Cancelled));
        }
        match step {
            AuthStep::Plain => auth::decode_plain(line, &mut self.creds).map_err(Fault::Auth)?,
            AuthStep::LoginUser => {
                auth::decode_line(line, &mut self.creds.user).map_err(Fault::Auth)?;
                out.push(auth::LOGIN_PASS_PROMPT);
                self.state = State::AuthLine(AuthStep::LoginPass);
                return Ok(false);
            }
            AuthStep::LoginPass => auth::decode_line(line, &mut self.creds.pass).map_err(Fault::Auth)?,
        }
        self.state = State::AuthWait;
        Ok(true)
    }

    /// Allocates the queue id and writes the `Received:` header (RFC 5321 §4.4) into a body
    /// buffer from the pool.
    fn start_body(&mut self, ctx: &mut Ctx<'_>) {
        self.queue_id = ctx.ids.next(ctx.now_unix_us);
        let mut body = self.body.take().unwrap_or_else(|| ctx.bodies.take());
        body.clear();
        let trace = Trace { esmtp: self.esmtp, tls: self.tls_info, authenticated: self.authenticated };
        write_received(&mut body, &ctx.cfg.hostname, &self.envelope, self.peer, trace, self.queue_id, ctx.now_unix_us);
        self.body = Some(body);
    }
}

fn parse_notify(v: &[u8]) -> Result<u8, Fault> {
    if v.eq_ignore_ascii_case(b"NEVER") {
        return Ok(notify::NEVER);
    }
    let mut bits = 0;
    for item in v.split(|&b| b == b',') {
        bits |= if item.eq_ignore_ascii_case(b"SUCCESS") {
            notify::SUCCESS
        } else if item.eq_ignore_ascii_case(b"FAILURE") {
            notify::FAILURE
        } else if item.eq_ignore_ascii_case(b"DELAY") {
            notify::DELAY
        } else {
            return Err(Fault::UnknownParameter);
        };
    }
    Ok(bits)
}

/// `io::Write` over a `Buf` (for `write!` of the few formatted replies).
struct Writer<'a>(&'a mut Buf);

impl std::io::Write for Writer<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(self.0.push(b))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::BufPool;
    use proptest::prelude::*;

    struct Harness {
        cfg: SessionConfig,
        bodies: VecPool,
        ids: IdGen,
        pool: BufPool,
    }

    /// Feeds `chunks` to a fresh session the way a driver would, storing every message at once;
    /// returns all replies and all stored bodies.
    fn drive(h: &mut Harness, chunks: &[&[u8]], relay: bool) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut s = ServerSession::new("127.0.0.1".parse().unwrap(), relay);
        let mut out = h.pool.checkout().unwrap();
        let mut replies = Vec::new();
        let mut stored = Vec::new();
        s.greeting(&h.cfg, &mut out);
        let mut pending: Vec<u8> = Vec::new();
        for chunk in chunks {
            pending.extend_from_slice(chunk);
            loop {
                let mut ctx = Ctx {
                    cfg: &h.cfg,
                    bodies: &mut h.bodies,
                    ids: &mut h.ids,
                    now_unix_us: 1_700_000_000_000_000,
                    accepting: true,
                };
                let p = s.handle_input(&mut ctx, &pending, &mut out);
                pending.drain(..p.consumed);
                replies.extend_from_slice(out.data());
                let n = out.data().len();
                out.consume(n);
                match p.event {
                    Some(Event::Message) => {
                        stored.push(s.message().2.to_vec());
                        s.message_result(&mut ctx, Ok(()), &mut out);
                    }
                    Some(Event::Close) => {
                        replies.extend_from_slice(out.data());
                        return (replies, stored);
                    }
                    Some(Event::StartTls | Event::Auth) => unreachable!("neither is offered in these tests"),
                    None => break,
                }
            }
        }
        (replies, stored)
    }

    fn harness() -> Harness {
        Harness {
            cfg: SessionConfig::new("mx.test", 1000, 3),
            bodies: VecPool::new(1 << 20),
            ids: IdGen::default(),
            pool: BufPool::new(16 * 1024, 4),
        }
    }

    fn codes(replies: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(replies)
            .split("\r\n")
            .filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
            .map(|l| l[..3].to_string())
            .collect()
    }

    #[test]
    fn full_transaction() {
        let mut h = harness();
        let (r, s) = drive(
            &mut h,
            &[b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=20\r\nRCPT TO:<x@y.example>\r\nDATA\r\nSubject: hi\r\n\r\n..body\r\n.\r\nQUIT\r\n"],
            true,
        );
        assert_eq!(codes(&r), ["220", "250", "250", "250", "354", "250", "221"]);
        assert_eq!(s.len(), 1);
        let body = String::from_utf8(s[0].clone()).unwrap();
        assert!(body.starts_with("Received: from c ([127.0.0.1])\r\n\tby mx.test (sluice) with ESMTP id "));
        assert!(body.contains("\r\n\tfor <x@y.example>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
        assert!(body.ends_with("Subject: hi\r\n\r\n.body\r\n"));
    }

    #[test]
    fn sequencing_and_limits() {
        let mut h = harness();
        let (r, _) = drive(
            &mut h,
            &[b"MAIL FROM:<a@b>\r\nEHLO c\r\nRCPT TO:<x@y>\r\nDATA\r\nMAIL FROM:<a@b> SIZE=5000\r\nMAIL FROM:<a@b> FOO=1\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<1@y>\r\nRCPT TO:<2@y>\r\nRCPT TO:<3@y>\r\nRCPT TO:<4@y>\r\nEXPN x\r\nVRFY x\r\nHELP\r\nNOOP\r\nRSET\r\n"],
            true,
        );
        assert_eq!(
            codes(&r),
            [
                "220", "503", "250", "503", "503", "552", "555", "250", "503", "250", "250", "250", "452", "502",
                "252", "214", "250", "250"
            ]
        );
    }

    #[test]
    fn relay_denied() {
        let mut h = harness();
        let (r, _) = drive(&mut h, &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\n"], false);
        assert!(String::from_utf8_lossy(&r).ends_with("554 5.7.1 Relay access denied\r\n"));
        // <postmaster> (ours: no domain) is accepted from anyone, RFC 5321 §4.5.1.
        let mut h = harness();
        let (r, _) =
            drive(&mut h, &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<PostMaster>\r\nRCPT TO:<postmaster@y>\r\n"], false);
        assert_eq!(codes(&r), ["220", "250", "250", "250", "554"]);
    }

    #[test]
    fn bare_lf_refused_and_next_command_parsed() {
        let mut h = harness();
        let (r, s) = drive(
            &mut h,
            &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nx\n.\r\nMAIL FROM:<evil@x>\r\n.\r\nNOOP\r\n"],
            true,
        );
        assert_eq!(codes(&r), ["220", "250", "250", "250", "354", "550", "250"]);
        assert!(s.is_empty());
    }

    #[test]
    fn too_big_data_keeps_session() {
        let mut h = harness();
        let big = vec![b'a'; 3000];
        let (r, s) = drive(
            &mut h,
            &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n", &big, b"\r\n.\r\nNOOP\r\n"],
            true,
        );
        assert_eq!(codes(&r), ["220", "250", "250", "250", "354", "552", "250"]);
        assert!(s.is_empty());
    }

    #[test]
    fn bdat_chunks() {
        let mut h = harness();
        let (r, s) = drive(
            &mut h,
            &[b"EHLO c\r\nMAIL FROM:<a@b> BODY=BINARYMIME\r\nRCPT TO:<x@y>\r\nBDAT 5\r\nab\r\ncBDAT 3 LAST\r\nxyzDATA\r\nBDAT 2\r\nzzNOOP\r\n"],
            true,
        );
        assert_eq!(codes(&r), ["220", "250", "250", "250", "250", "250", "503", "503", "250"]);
        assert_eq!(s.len(), 1);
        assert!(s[0].ends_with(b"ab\r\ncxyz"));
    }

    #[test]
    fn overlong_line_and_error_limit() {
        let mut h = harness();
        let mut long = vec![b'x'; 2000];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        let (r, _) = drive(&mut h, &[&long[..700], &long[700..]], true);
        assert_eq!(codes(&r), ["220", "500", "250"]);
        let junk = b"FOO\r\n".repeat(12);
        let (r, _) = drive(&mut h, &[&junk], true);
        let c = codes(&r);
        assert_eq!(c.len(), 12);
        assert_eq!(c[11], "421");
    }

    #[test]
    fn utf8_needs_smtputf8() {
        let mut h = harness();
        let (r, _) = drive(
            &mut h,
            &["EHLO c\r\nMAIL FROM:<ü@b>\r\nMAIL FROM:<ü@b> SMTPUTF8\r\nRCPT TO:<ö@y>\r\n".as_bytes()],
            true,
        );
        assert_eq!(codes(&r), ["220", "250", "553", "250", "250"]);
    }

    /// A user name and password as the session handed them out.
    type UserPass = (Vec<u8>, Vec<u8>);

    /// A session inside TLS with AUTH offered, fed the way the reactor does it: each chunk is
    /// read into one pooled 16 KiB input buffer as far as it has room, and parsed from there.
    /// Every AUTH is accepted. Returns the replies and the credentials seen.
    fn drive_auth(h: &mut Harness, chunks: &[&[u8]]) -> (Vec<u8>, Vec<UserPass>) {
        let cfg = h.cfg.clone().with_features(true, true);
        let mut s = ServerSession::new("127.0.0.1".parse().unwrap(), false);
        s.tls_started();
        let mut out = h.pool.checkout().unwrap();
        let mut inb = h.pool.checkout().unwrap();
        let (mut replies, mut seen) = (Vec::new(), Vec::new());
        s.greeting(&cfg, &mut out);
        for chunk in chunks {
            let mut chunk = *chunk;
            loop {
                let space = inb.space();
                let n = space.len().min(chunk.len());
                space[..n].copy_from_slice(&chunk[..n]);
                inb.fill(n);
                chunk = &chunk[n..];
                loop {
                    let mut ctx = Ctx {
                        cfg: &cfg,
                        bodies: &mut h.bodies,
                        ids: &mut h.ids,
                        now_unix_us: 1_700_000_000_000_000,
                        accepting: true,
                    };
                    let p = s.handle_input(&mut ctx, inb.data(), &mut out);
                    inb.consume(p.consumed);
                    match p.event {
                        Some(Event::Auth) => {
                            let creds = s.take_credentials();
                            seen.push((creds.user.clone(), creds.pass.clone()));
                            s.auth_result(AuthOutcome::Accepted, creds, &mut out);
                        }
                        Some(Event::Close) => {
                            replies.extend_from_slice(out.data());
                            h.pool.checkin(out);
                            h.pool.checkin(inb);
                            return (replies, seen);
                        }
                        None => break,
                        Some(other) => unreachable!("{other:?}"),
                    }
                    replies.extend_from_slice(out.data());
                    let n = out.data().len();
                    out.consume(n);
                }
                replies.extend_from_slice(out.data());
                let n = out.data().len();
                out.consume(n);
                if chunk.is_empty() {
                    break;
                }
                assert!(n > 0 || !inb.space().is_empty(), "input buffer full and nothing consumed");
            }
        }
        h.pool.checkin(out);
        h.pool.checkin(inb);
        (replies, seen)
    }

    fn b64(bytes: &[u8]) -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes).into_bytes()
    }

    /// `AUTH PLAIN` with an initial response that makes the line exactly `octets` long with its
    /// CRLF (for `u` and a password of `p`s); returns the line and the password.
    fn plain_line(octets: usize) -> (Vec<u8>, Vec<u8>) {
        let prefix = b"AUTH PLAIN ";
        let b64_len = octets - prefix.len() - 2;
        // Unpadded base64 of n bytes is ceil(4n/3) long; every length but 1 mod 4 is reachable.
        let n = b64_len * 3 / 4;
        assert_eq!((4 * n).div_ceil(3), b64_len, "no message encodes to {b64_len} octets");
        let pass = vec![b'p'; n - 3];
        let msg = [b"\0u\0".as_slice(), &pass].concat();
        let line = [prefix.as_slice(), &b64(&msg), b"\r\n"].concat();
        assert_eq!(line.len(), octets);
        (line, pass)
    }

    #[test]
    fn auth_initial_response_lines_up_to_12288_octets() {
        let mut h = harness();
        // ~5,000-byte password, and the longest line allowed; each split over small reads.
        for octets in [6_700, MAX_AUTH_LINE] {
            let (line, pass) = plain_line(octets);
            let stream = [b"EHLO c\r\n".as_slice(), &line, b"NOOP\r\n"].concat();
            for step in [stream.len(), 1000, 7] {
                let chunks: Vec<&[u8]> = stream.chunks(step).collect();
                let (r, seen) = drive_auth(&mut h, &chunks);
                assert_eq!(codes(&r), ["220", "250", "235", "250"], "{octets} in reads of {step}");
                assert_eq!(seen, [(b"u".to_vec(), pass.clone())]);
            }
        }
        // One octet more: 500 5.5.6, whole or split, and the next command is read as one.
        let (line, _) = plain_line(MAX_AUTH_LINE + 1);
        let stream = [b"EHLO c\r\n".as_slice(), &line, b"NOOP\r\n"].concat();
        for step in [stream.len(), 4096, 1000] {
            let chunks: Vec<&[u8]> = stream.chunks(step).collect();
            let (r, seen) = drive_auth(&mut h, &chunks);
            assert_eq!(codes(&r), ["220", "250", "500", "250"], "reads of {step}");
            assert!(String::from_utf8_lossy(&r).contains("500 5.5.6 "), "{}", String::from_utf8_lossy(&r));
            assert!(seen.is_empty());
        }
        // Far longer and without CRLF for a while: discarded up to its end, one 500 5.5.6.
        let mut huge = b"AUTH PLAIN ".to_vec();
        huge.resize(100_000, b'A');
        let stream = [b"EHLO c\r\n".as_slice(), &huge, b"\r\nNOOP\r\n"].concat();
        let chunks: Vec<&[u8]> = stream.chunks(3000).collect();
        let (r, _) = drive_auth(&mut h, &chunks);
        assert_eq!(codes(&r), ["220", "250", "500", "250"]);
        assert!(String::from_utf8_lossy(&r).contains("500 5.5.6 "));
    }

    #[test]
    fn auth_response_lines_up_to_12288_octets() {
        let mut h = harness();
        let (line, pass) = plain_line(MAX_AUTH_LINE);
        // After an empty challenge, the PLAIN message alone may take the whole 12,288 octets.
        let response = &line[b"AUTH PLAIN ".len()..];
        let stream = [b"EHLO c\r\nAUTH PLAIN\r\n".as_slice(), response, b"NOOP\r\n"].concat();
        for step in [stream.len(), 999, 13] {
            let chunks: Vec<&[u8]> = stream.chunks(step).collect();
            let (r, seen) = drive_auth(&mut h, &chunks);
            assert_eq!(codes(&r), ["220", "250", "334", "235", "250"], "reads of {step}");
            assert_eq!(seen, [(b"u".to_vec(), pass.clone())]);
        }
        // LOGIN: a password line of exactly 12,288 octets (12,286 of base64 and CRLF).
        let long_pass = vec![b'q'; (MAX_AUTH_LINE - 2) * 3 / 4];
        let pass_line = [b64(&long_pass), b"\r\n".to_vec()].concat();
        assert_eq!(pass_line.len(), MAX_AUTH_LINE);
        let stream = [b"EHLO c\r\nAUTH LOGIN\r\n".as_slice(), &b64(b"user"), b"\r\n", &pass_line, b"NOOP\r\n"].concat();
        let chunks: Vec<&[u8]> = stream.chunks(5000).collect();
        let (r, seen) = drive_auth(&mut h, &chunks);
        assert_eq!(codes(&r), ["220", "250", "334", "334", "235", "250"]);
        assert_eq!(seen, [(b"user".to_vec(), long_pass)]);
        // A response line one octet over, or far over (its end seen only reads later): one
        // 500 5.5.6, the exchange is over and the next command is read as one.
        for len in [MAX_AUTH_LINE + 1, 40_000] {
            let over = [b"A".repeat(len - 2), b"\r\n".to_vec()].concat();
            let stream = [b"EHLO c\r\nAUTH LOGIN\r\n".as_slice(), &over, b"NOOP\r\n"].concat();
            let chunks: Vec<&[u8]> = stream.chunks(4000).collect();
            let (r, seen) = drive_auth(&mut h, &chunks);
            assert_eq!(codes(&r), ["220", "250", "334", "500", "250"], "{len}");
            assert!(String::from_utf8_lossy(&r).contains("500 5.5.6 "));
            assert!(seen.is_empty());
        }
    }

    #[test]
    fn other_commands_keep_the_512_octet_limit() {
        let mut h = harness();
        let long_noop = [b"NOOP ".as_slice(), &[b'x'; 600], b"\r\n"].concat();
        let long_mail = [b"MAIL FROM:<".as_slice(), &[b'a'; 600], b"@example.test>\r\n"].concat();
        let stream = [b"EHLO c\r\n".as_slice(), &long_noop, &long_mail, b"NOOP\r\n"].concat();
        let (r, _) = drive_auth(&mut h, &[&stream]);
        assert_eq!(codes(&r), ["220", "250", "500", "500", "250"]);
        assert_eq!(String::from_utf8_lossy(&r).matches("500 5.5.2 ").count(), 2);
        // Without AUTH offered, a long AUTH line is just a long line.
        let (line, _) = plain_line(2000);
        let (r, _) = drive(&mut h, &[b"EHLO c\r\n", &line, b"NOOP\r\n"], true);
        assert_eq!(codes(&r), ["220", "250", "500", "250"]);
        assert!(String::from_utf8_lossy(&r).contains("500 5.5.2 "));
    }

    #[test]
    fn lines_done_counts_finished_lines_only_and_busy_auth_keeps_the_session() {
        let mut h = harness();
        let cfg = h.cfg.clone().with_features(true, true);
        let mut s = ServerSession::new("127.0.0.1".parse().unwrap(), false);
        s.tls_started();
        let mut out = h.pool.checkout().unwrap();
        let mut feed = |s: &mut ServerSession, input: &[u8], out: &mut Buf| {
            let mut ctx = Ctx { cfg: &cfg, bodies: &mut h.bodies, ids: &mut h.ids, now_unix_us: 0, accepting: true };
            s.handle_input(&mut ctx, input, out)
        };
        feed(&mut s, b"EHLO c.test\r\n", &mut out);
        assert_eq!(s.lines_done(), 1);
        // A partial line is not a finished one, however many bytes it has.
        assert_eq!(feed(&mut s, b"NOOP aaaa", &mut out).consumed, 0);
        assert_eq!(s.lines_done(), 1);
        feed(&mut s, b"NOOP\r\n", &mut out);
        assert_eq!(s.lines_done(), 2);
        // An overlong line counts once its end is seen.
        let long = vec![b'a'; 600];
        feed(&mut s, &long, &mut out);
        assert_eq!(s.lines_done(), 2);
        feed(&mut s, b"\r\n", &mut out);
        assert_eq!(s.lines_done(), 3);
        let n = out.data().len();
        out.consume(n);
        // 454 to a busy AUTH: the session goes on and may try again.
        let p = feed(&mut s, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", &mut out);
        assert_eq!(p.event, Some(Event::Auth));
        assert_eq!(s.timeout_kind(), TimeoutKind::None);
        let creds = s.take_credentials();
        assert!(!s.auth_result(AuthOutcome::Busy, creds, &mut out));
        assert_eq!(out.data(), reply::AUTH_BUSY);
        assert_eq!(s.timeout_kind(), TimeoutKind::Command);
        let p = feed(&mut s, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", &mut out);
        assert_eq!(p.event, Some(Event::Auth));
        h.pool.checkin(out);
    }

    proptest! {
        /// Any split of one byte stream into reads gives identical replies and stored messages.
        #[test]
        fn split_invariance(cuts in proptest::collection::vec(0usize..400, 0..12), dots in 0usize..3) {
            let mut stream = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRCPT TO:<z@y>\r\nDATA\r\n".to_vec();
            for _ in 0..dots { stream.extend_from_slice(b"..x\r\n"); }
            stream.extend_from_slice(b"line\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nBDAT 4 LAST\r\nabcdNOOP\r\nQUIT\r\n");
            let mut h = harness();
            let whole = drive(&mut h, &[&stream], true);
            let mut cuts = cuts;
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let parts: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0].min(stream.len())..w[1].min(stream.len())]).collect();
            let mut h2 = harness();
            let split = drive(&mut h2, &parts, true);
            // Queue ids differ between runs only by allocation order, which is the same.
            prop_assert_eq!(whole, split);
        }
    }
}
