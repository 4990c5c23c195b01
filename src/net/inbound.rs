//! The inbound driver: accepted connections — each a [`Transport`] (socket, optional TLS,
//! pooled buffers, readiness) and a [`ServerSession`] — and the I/O that runs them.
//!
//! Owns: admitting a socket ([`Inbound::admit`]), driving a session over its transport
//! ([`Inbound::drive`]: parse what is buffered, append finished messages to the spool, read
//! more, until the socket would block, the session waits, or the budget is spent), flushing
//! replies, the session deadlines ([`Inbound::expire`]), writing a message's `250`/`451` once
//! the group commit is back ([`Inbound::answer_committed`]) and AUTH verdicts
//! ([`Inbound::answer_auth`]), and closing. Must never: commit the spool (the reactor's
//! group-commit gate does, once per turn, before any `250` is written: SPEC's durability rule),
//! verify a password (the AUTH worker does), or read the clock (the turn's `now` comes in
//! [`Turn`]).
//!
//! Idle connections hold no buffers: input and output chunks are checked out when bytes
//! arrive or replies are produced, and returned when empty. With TLS, `input` and `output`
//! still hold plaintext, so the session and the DATA scanner never see a record; after
//! STARTTLS the replies up to and including the `220` still go out in the clear (the
//! transport's switch, RFC 3207 §4).

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::buf::{BufPool, VecPool};
use crate::delivery::sources::{take_pool_header, Sources, UnknownPool};
use crate::dkim::{KeyTable, Outcome, Unsigned};
use crate::log::{Logger, V};
use crate::message::{Envelope, IdGen, QueueId};
use crate::net::deadline::Deadlines;
use crate::net::tls::{ServerTls, TlsInfo, TlsSession};
use crate::net::token::{self, Kind};
use crate::net::transport::{Fault, Flush, Read, Transport};
use crate::smtp::auth::Credentials;
use crate::smtp::auth_throttle::{AuthThrottle, Refusal};
use crate::smtp::client_key::Cidr;
use crate::smtp::client_key::ClientKey;
use crate::smtp::client_limit::{Admission, ConnectionLimiter};
use crate::smtp::line::MAX_AUTH_LINE;
use crate::smtp::pace::{Pace, PaceLimits};
use crate::smtp::reply;
use crate::smtp::server::ServerSession;
use crate::smtp::server::{AuthOutcome, Ctx, Event, SessionConfig, REPLY_ROOM};
use crate::spool::{MessageLoc, Spool, SpoolError};

/// Input/output chunk size. Sessions frame lines where they lie in the input chunk, so the
/// longest line, an AUTH line (RFC 4954 §4), must fit in one.
pub const CHUNK: usize = 16 * 1024;
const _: () = assert!(CHUNK >= MAX_AUTH_LINE);
/// Read/parse rounds for one connection per turn before others get a go.
const ROUNDS_PER_DRIVE: usize = 64;
/// How long a closing connection may take to drain its last replies.
const LINGER: Duration = Duration::from_secs(10);
/// How soon a connection whose deadline passed while it waited for the spool is looked at
/// again (the relay is the slow one: no timeout then).
const WAIT_RECHECK: Duration = Duration::from_millis(100);

/// A message appended to the spool whose `250` waits for a group commit.
#[derive(Debug, Clone, Copy)]
pub struct Waiter {
    /// Slab key of the session.
    pub key: usize,
    /// Its generation.
    pub generation: u32,
    /// The message.
    pub id: QueueId,
    /// Where it lies in the spool.
    pub loc: MessageLoc,
    /// Arrival time (Unix ms).
    pub arrival_ms: u64,
    /// Already handed to the delivery queue (only the reply is still owed).
    pub queued: bool,
}

/// One password check a session waits for (run by the AUTH worker, in the order the
/// `smtp::auth_throttle` chooses).
#[derive(Debug)]
pub struct AuthJob {
    /// Slab key of the session that asked.
    pub key: usize,
    /// Generation of that slab slot, to drop verdicts for a session that has since closed.
    pub generation: u32,
    /// The client's group, whose failure budget the verdict counts against.
    pub client: ClientKey,
    /// What the client sent.
    pub creds: Credentials,
}

/// One finished message to sign before it is stored (run by the DKIM threads,
/// `reactor::dkimwork`). The body buffer travels by value and comes back in [`SignDone`].
#[derive(Debug)]
pub struct SignJob {
    /// Slab key of the session.
    pub key: usize,
    /// Its generation, to drop a result for a session that has since closed.
    pub generation: u32,
    /// The message.
    pub id: QueueId,
    /// The whole message as received (`Received:` first), lent by the session.
    pub body: Vec<u8>,
    /// The `t=` tag (Unix seconds of the end of data).
    pub unix_s: u64,
    /// The keys as they were when the message ended (a reload does not change them).
    pub keys: Arc<KeyTable>,
}

/// A [`SignJob`] done: the body handed back and the signature fields to store before it.
#[derive(Debug)]
pub struct SignDone {
    /// From the job.
    pub key: usize,
    /// From the job.
    pub generation: u32,
    /// From the job.
    pub id: QueueId,
    /// The body, unchanged.
    pub body: Vec<u8>,
    /// One `DKIM-Signature` field per key, each ending in CRLF (empty when unsigned).
    pub headers: Vec<u8>,
    /// What was done, for the log.
    pub outcome: Outcome,
}

/// What the inbound driver needs of the configuration (built from `config::Config`).
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// The session machine's settings.
    pub session: SessionConfig,
    /// `--command-timeout`.
    pub command_timeout: Duration,
    /// `--data-timeout`.
    pub data_timeout: Duration,
    /// `--min-data-rate` (bytes/s; 0: off).
    pub min_data_rate: u32,
    /// `--tls-handshake-timeout`.
    pub tls_handshake_timeout: Duration,
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--allow`: clients that may relay.
    pub allow: Vec<Cidr>,
    /// `--limit-allowed-clients`: the per-client limits apply to `--allow` clients too.
    pub limit_allowed_clients: bool,
    /// `--source`, `--pool`, `--user-pool`: each message's egress source is chosen at its end
    /// of data and stored with it.
    pub sources: Arc<Sources>,
}

/// What a loop turn lends the inbound driver: the shared parts of the relay and the turn's
/// clock reading (read once per turn by the reactor).
pub struct Turn<'a> {
    /// Flags.
    pub cfg: &'a InboundConfig,
    /// Input/output chunks.
    pub bufs: &'a mut BufPool,
    /// Message bodies being received.
    pub bodies: &'a mut VecPool,
    /// Queue ids.
    pub ids: &'a mut IdGen,
    /// Where finished messages are appended (not committed).
    pub spool: &'a mut Spool,
    /// Event log.
    pub log: &'a mut Logger,
    /// For registering and deregistering sockets.
    pub registry: &'a Registry,
    /// The group-commit gate's queue: appended messages whose `250` waits for a commit.
    pub waiting: &'a mut Vec<Waiter>,
    /// Which AUTH checks run and when.
    pub auth: &'a mut AuthThrottle<AuthJob>,
    /// An AUTH worker runs (AUTH is offered).
    pub auth_enabled: bool,
    /// The loop's one deadline table (inbound sessions, outbound connections, DNS).
    pub deadlines: &'a mut Deadlines<Token>,
    /// The turn's clock.
    pub now: Instant,
    /// The turn's wall clock (Unix µs), for queue ids and `Received:`.
    pub wall_us: u64,
    /// The spool has room for new mail.
    pub accepting: bool,
    /// DKIM keys (`None`: signing is off and messages are stored as they came).
    pub dkim_keys: Option<&'a Arc<KeyTable>>,
    /// Messages to sign, for the DKIM threads (the reactor hands them over after dispatch).
    pub sign_jobs: &'a mut Vec<SignJob>,
    /// A graceful shutdown is under way: sessions are told `421` at their next command.
    pub shutdown: bool,
}

impl Turn<'_> {
    fn session_ctx(&mut self) -> Ctx<'_> {
        Ctx {
            cfg: &self.cfg.session,
            bodies: self.bodies,
            ids: self.ids,
            now_unix_us: self.wall_us,
            accepting: self.accepting,
        }
    }
}

/// How [`Inbound::answer_committed`] dealt with one message of a released batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Answered {
    /// The session has gone (or was not waiting): nothing to say.
    Gone,
    /// The reply is in the output.
    Replied,
    /// No room for the `250` yet: the message went back in the gate's queue (marked as
    /// queued for delivery), to be answered after a later commit.
    Later,
    /// No room for the `451`: the session is closed (the client retries the message).
    Closed,
}

/// Every inbound connection, and what the driver keeps between turns.
pub struct Inbound {
    conns: Slab<InboundConn>,
    generation: u32,
    /// Connections with output to flush this turn.
    dirty: Vec<(usize, u32)>,
    /// Connections to drive again next turn (budget spent or buffers exhausted).
    again: Vec<(usize, u32)>,
    /// The certificate for new TLS sessions (replaced on SIGHUP).
    tls: Option<ServerTls>,
    /// Connections per client address (`--max-connections-per-ip` and its rate).
    limiter: ConnectionLimiter,
    /// An AUTH check was queued since the last [`Inbound::take_auth_queued`].
    auth_queued: bool,
}

impl Inbound {
    /// No connections yet.
    pub fn new(tls: Option<ServerTls>, limiter: ConnectionLimiter) -> Inbound {
        Inbound {
            conns: Slab::with_capacity(1024),
            generation: 0,
            dirty: Vec::new(),
            again: Vec::new(),
            tls,
            limiter,
            auth_queued: false,
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// True when no connection is open.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The session `key` of generation `generation` is still open.
    pub fn is_live(&self, key: usize, generation: u32) -> bool {
        self.conns.get(key).is_some_and(|c| c.generation == generation)
    }

    /// Peer address of a live session.
    pub fn peer(&self, key: usize, generation: u32) -> Option<SocketAddr> {
        self.conns.get(key).filter(|c| c.generation == generation).map(|c| c.peer)
    }

    /// A new certificate for new sessions (open ones keep theirs).
    pub fn set_tls(&mut self, tls: ServerTls) {
        self.tls = Some(tls);
    }

    /// Connections are left to drive from an earlier turn.
    pub fn has_again(&self) -> bool {
        !self.again.is_empty()
    }

    /// True once, after a session queued an AUTH check: the worker may be handed one.
    pub fn take_auth_queued(&mut self) -> bool {
        std::mem::take(&mut self.auth_queued)
    }

    /// The envelope of the message session `w` waits on, while it still waits on it.
    pub fn waiting_envelope(&self, w: &Waiter) -> Option<&Envelope> {
        let conn = self.conns.get(w.key).filter(|c| c.generation == w.generation && c.waiting == Some(w.id))?;
        Some(conn.session.envelope())
    }

    /// A mio event for connection `key`: readiness is noted, then the session runs.
    pub fn on_event(&mut self, key: usize, generation: u32, ev: &mio::event::Event, turn: &mut Turn<'_>) {
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == generation) else {
            return; // A stale event for a reused slot.
        };
        conn.io.on_event(ev);
        if conn.io.writable && conn.io.pending_output() > 0 {
            conn.mark_dirty(key, &mut self.dirty);
        }
        self.drive(key, turn);
    }

    /// Drives the connections that spent their budget (or found no buffer) last turn.
    pub fn drive_again(&mut self, turn: &mut Turn<'_>) {
        for (key, generation) in std::mem::take(&mut self.again) {
            self.drive_checked(key, generation, turn);
        }
    }

    /// Drives every connection (at the start of a graceful shutdown: idle ones get `421`).
    pub fn drive_all(&mut self, turn: &mut Turn<'_>) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.drive(key, turn);
        }
    }

    /// Drives `key` if it is still the connection of `generation`.
    pub fn drive_checked(&mut self, key: usize, generation: u32, turn: &mut Turn<'_>) {
        if self.is_live(key, generation) {
            self.drive(key, turn);
        }
    }

    /// Reads, parses and appends for one connection until it would block, waits for the spool,
    /// hits backpressure, or spends its budget.
    pub fn drive(&mut self, key: usize, turn: &mut Turn<'_>) {
        let Inbound { conns, dirty, again, tls, auth_queued, .. } = self;
        let Some(conn) = conns.get_mut(key) else { return };
        let now = turn.now;
        let mut failed = false;
        let mut read = 0;
        let mut rounds = 0;
        loop {
            if conn.closing || conn.waiting.is_some() {
                break;
            }
            rounds += 1;
            if rounds > ROUNDS_PER_DRIVE {
                again.push((key, conn.generation));
                break;
            }
            // 1. Parse what is buffered.
            let mut progressed = false;
            if conn.io.input.as_ref().is_some_and(|b| !b.is_empty()) {
                if conn.io.output.is_none() {
                    conn.io.output = turn.bufs.checkout();
                }
                let (Some(inb), Some(out)) = (conn.io.input.as_mut(), conn.io.output.as_mut()) else {
                    again.push((key, conn.generation));
                    break;
                };
                let p = conn.session.handle_input(&mut turn.session_ctx(), inb.data(), out);
                inb.consume(p.consumed);
                progressed = p.consumed > 0;
                if let Some(f) = conn.session.take_last_fault() {
                    turn.log.event("refused", &[("client", V::D(&conn.peer)), ("reply", V::B(trim_crlf(f.reply())))]);
                }
                match p.event {
                    Some(Event::Message) => {
                        // A measurement, not a decision: the commit latency logged with the
                        // 250 starts here (signing included).
                        conn.eod_at = Some(Instant::now());
                        // The egress pool, before signing: its header is never signed or sent.
                        match choose_source(conn, turn) {
                            Ok(()) => {}
                            // Refused: the reply is out, the session goes on.
                            Err(true) => continue,
                            // Not even room to say no: drop the session; nothing was stored.
                            Err(false) => {
                                failed = true;
                                break;
                            }
                        }
                        if let Some(keys) = turn.dkim_keys {
                            // Signed off the loop: the body goes to a DKIM thread by value and
                            // the session waits (as for the commit) until it comes back.
                            if let Some(body) = conn.session.take_body() {
                                let id = conn.session.message().0;
                                conn.waiting = Some(id);
                                turn.sign_jobs.push(SignJob {
                                    key,
                                    generation: conn.generation,
                                    id,
                                    body,
                                    unix_s: turn.wall_us / 1_000_000,
                                    keys: Arc::clone(keys),
                                });
                                continue;
                            }
                        }
                        if !store(conn, key, &[], turn) {
                            // Cannot even say no: drop the session; nothing was stored.
                            failed = true;
                            break;
                        }
                        continue;
                    }
                    Some(Event::Close) => {
                        conn.closing = true;
                        conn.deadline = now + LINGER;
                        break;
                    }
                    Some(Event::StartTls) => {
                        // The 220 and the replies before it go out in the clear; the client's
                        // next bytes are its ClientHello.
                        let Some(session) = tls.as_ref().map(TlsSession::server).and_then(Result::ok) else {
                            failed = true;
                            break;
                        };
                        conn.io.start_tls(session, turn.bufs);
                        conn.deadline = now + turn.cfg.tls_handshake_timeout;
                        turn.log.event("starttls", &[("client", V::D(&conn.peer))]);
                        continue;
                    }
                    Some(Event::Auth) => {
                        let creds = conn.session.take_credentials();
                        if !turn.auth_enabled {
                            // Cannot happen (AUTH is only offered with a worker); refuse.
                            if let Some(out) = conn.io.output.as_mut() {
                                conn.session.auth_result(AuthOutcome::Rejected, creds, out);
                            }
                            continue;
                        }
                        let client = ClientKey::of(conn.peer.ip());
                        let job = AuthJob { key, generation: conn.generation, client, creds };
                        let (refusal, job) = match turn.auth.submit(client, job, now) {
                            Ok(()) => {
                                *auth_queued = true;
                                continue;
                            }
                            Err(refused) => refused,
                        };
                        // Refused before any hash is spent: the client is shut out, or too
                        // many of its (or all) checks wait already.
                        let (outcome, result) = match refusal {
                            Refusal::Blocked => (AuthOutcome::Blocked, "blocked"),
                            Refusal::Busy => (AuthOutcome::Busy, "busy"),
                        };
                        turn.log.event("auth", &[("client", V::D(&conn.peer)), ("result", V::S(result))]);
                        if !conn.make_reply_room(turn.bufs) {
                            failed = true;
                            break;
                        }
                        let Some(out) = conn.io.output.as_mut() else { break };
                        if conn.session.auth_result(outcome, job.creds, out) {
                            conn.closing = true;
                            conn.deadline = now + LINGER;
                            break;
                        }
                        continue;
                    }
                    None => {}
                }
            }
            // 2. Backpressure: a client that does not read its replies is not read from.
            if conn.io.pending_output() >= CHUNK / 2 {
                match conn.io.flush(turn.bufs) {
                    Flush::Done => {}
                    Flush::Blocked => break,
                    Flush::Failed(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            // 3. Read more.
            if !conn.io.readable || conn.eof {
                if !progressed {
                    break;
                }
                continue;
            }
            let result = conn.io.read(turn.bufs);
            let handshake_done = conn.io.take_handshake_done();
            match result {
                Read::Data(n) => read += n,
                Read::WouldBlock => {}
                // The session cannot consume (its output is full): wait for the client to read.
                Read::Full => break,
                Read::NoBuffer => {
                    again.push((key, conn.generation));
                    break;
                }
                Read::Closed => conn.eof = true,
                Read::Failed(e) => {
                    if let Fault::Tls(e) = &e {
                        // The transport sent the alert rustls queued, best effort.
                        turn.log.event("tls_error", &[("client", V::D(&conn.peer)), ("error", V::D(e))]);
                    }
                    failed = true;
                    break;
                }
            }
            if let Some(info) = handshake_done {
                announce_tls(conn, info, turn.log);
                conn.pace.restart(now);
            }
        }
        // A finished line or a new phase buys time, bytes alone do not (`smtp::pace`). Not
        // while closing or inside a TLS handshake: those have deadlines of their own.
        if !conn.closing && !conn.io.is_handshaking() {
            conn.pace.observe(conn.session.timeout_kind(), conn.session.lines_done(), read, now);
            match conn.pace.deadline(&pace_limits(turn.cfg)) {
                Some((at, _)) => conn.deadline = at,
                // A held-back AUTH answer is due at its own deadline.
                None if conn.auth_delayed.is_some() => {}
                // Waiting for the spool or an AUTH check: the relay is the slow one.
                None => conn.deadline = now + turn.cfg.command_timeout,
            }
        }
        turn.deadlines.arm(token::make(Kind::Inbound, conn.generation, key), conn.deadline);
        if conn.io.pending_output() > 0 {
            conn.mark_dirty(key, dirty);
        }
        turn.bufs.release_if_empty(&mut conn.io.input);
        if turn.shutdown && !conn.closing && conn.waiting.is_none() && conn.make_reply_room(turn.bufs) {
            if let Some(out) = conn.io.output.as_mut() {
                if conn.session.handle_shutdown(&mut turn.session_ctx(), false, out) {
                    conn.closing = true;
                    conn.mark_dirty(key, dirty);
                }
            }
        }
        // The peer went away: whatever it left half-sent is dropped (nothing is stored).
        let hung_up = conn.eof && conn.waiting.is_none() && !conn.closing && !again.iter().any(|&(k, _)| k == key);
        if failed || hung_up {
            self.close(key, if failed { "io_error" } else { "client_closed" }, turn);
        }
    }

    /// A message came back from the DKIM threads: it is stored with its signature fields in
    /// front, and its `250` waits for the group commit like any other. A session that has gone
    /// meanwhile stored nothing (its client never got a `250`): the body goes back to the pool.
    pub fn store_signed(&mut self, done: SignDone, turn: &mut Turn<'_>) {
        let SignDone { key, generation, id, body, headers, outcome } = done;
        let live = self.conns.get_mut(key).filter(|c| c.generation == generation && c.waiting == Some(id));
        let Some(conn) = live else {
            turn.bodies.give(body);
            return;
        };
        conn.waiting = None;
        conn.session.restore_body(body);
        if let Outcome::Unsigned(why) = outcome {
            if why != Unsigned::NoKey {
                turn.log.event("dkim_unsigned", &[("id", V::D(&id)), ("reason", V::S(why.as_str()))]);
            }
        }
        conn.dkim = Some(outcome);
        if !store(conn, key, &headers, turn) {
            self.close(key, "no_room_for_reply", turn);
            return;
        }
        // Stored: the drive stops at once (the session waits for the commit). Refused: the
        // reply is out and the session goes on with what it pipelined.
        self.drive(key, turn);
    }

    /// Writes the `250` (or the `451` when the commit failed) of one message of a released
    /// batch, logging it. Does not drive the session on: the caller does, once the whole
    /// batch is answered.
    pub fn answer_committed(
        &mut self,
        w: &Waiter,
        result: Result<(), ()>,
        committed_at: Instant,
        turn: &mut Turn<'_>,
    ) -> Answered {
        let Some(conn) = self.conns.get_mut(w.key).filter(|c| c.generation == w.generation) else {
            return Answered::Gone;
        };
        let Some(id) = conn.waiting.take() else { return Answered::Gone };
        if !conn.make_reply_room(turn.bufs) {
            // No room for the reply yet. A durable message is answered on a later turn; a
            // refused one is answered by closing (the client then retries it).
            if result.is_ok() {
                conn.waiting = Some(id);
                turn.waiting.push(Waiter { queued: true, ..*w });
                return Answered::Later;
            }
            self.close(w.key, "no_room_for_reply", turn);
            return Answered::Closed;
        }
        let env = conn.session.envelope();
        let latency_us = conn.eod_at.map_or(0, |t| committed_at.duration_since(t).as_micros() as u64);
        let dkim = conn.dkim.take();
        match result {
            Ok(()) => turn.log.event(
                "accepted",
                &[
                    ("id", V::D(&id)),
                    ("client", V::D(&conn.peer)),
                    ("from", V::B(&env.sender)),
                    ("rcpts", V::N(env.rcpt_count() as u64)),
                    ("commit_us", V::N(latency_us)),
                    ("tls", V::S(if conn.session.is_tls() { "yes" } else { "no" })),
                    ("user", V::B(conn.session.auth_user().unwrap_or(b"-"))),
                    ("dkim", V::S(dkim.as_ref().map_or("none", Outcome::as_str))),
                ],
            ),
            Err(()) => turn.log.event(
                "refused",
                &[("id", V::D(&id)), ("client", V::D(&conn.peer)), ("reply", V::B(trim_crlf(reply::SPOOL_FAILED)))],
            ),
        }
        let Some(out) = conn.io.output.as_mut() else { return Answered::Gone };
        conn.session.message_result(&mut turn.session_ctx(), result.map_err(|()| reply::SPOOL_FAILED), out);
        conn.mark_dirty(w.key, &mut self.dirty);
        Answered::Replied
    }

    /// Writes an AUTH verdict and lets the session go on (or close).
    pub fn answer_auth(&mut self, key: usize, outcome: AuthOutcome, creds: Credentials, turn: &mut Turn<'_>) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if !conn.make_reply_room(turn.bufs) {
            self.close(key, "no_room_for_reply", turn);
            return;
        }
        let Some(out) = conn.io.output.as_mut() else { return };
        if conn.session.auth_result(outcome, creds, out) {
            conn.closing = true;
            conn.deadline = turn.now + LINGER;
        } else {
            conn.deadline = turn.now + turn.cfg.command_timeout;
        }
        conn.mark_dirty(key, &mut self.dirty);
        self.drive(key, turn);
    }

    /// Holds an AUTH verdict back until `at` (failures are answered slowly); the deadline
    /// gives it then.
    pub fn delay_auth(
        &mut self,
        key: usize,
        outcome: AuthOutcome,
        creds: Credentials,
        at: Instant,
        deadlines: &mut Deadlines<Token>,
    ) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        conn.auth_delayed = Some((outcome, creds));
        conn.deadline = at;
        deadlines.arm(token::make(Kind::Inbound, conn.generation, key), at);
    }

    /// Writes the output of every connection that has some; closes those done closing and
    /// drives on those that had stopped reading for it.
    pub fn flush_dirty(&mut self, turn: &mut Turn<'_>) {
        for (key, generation) in std::mem::take(&mut self.dirty) {
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == generation) else { continue };
            conn.dirty = false;
            let had_backlog = conn.io.pending_output() >= CHUNK / 2;
            match conn.io.flush(turn.bufs) {
                Flush::Failed(_) => self.close(key, "io_error", turn),
                Flush::Done if conn.closing => self.close(key, "closed", turn),
                Flush::Done if had_backlog || conn.eof => self.drive(key, turn),
                _ => {}
            }
        }
    }

    /// Fires the session deadlines due at `turn.now`: a linger or handshake timeout closes, a
    /// held AUTH verdict is given, an idle or slow client gets `421 4.4.2` and is closed once
    /// it is written. Then flushes. The loop's one deadline table also holds delivery's
    /// timers: those tokens come back for the reactor to hand on.
    pub fn expire(&mut self, turn: &mut Turn<'_>) -> Vec<Token> {
        let now = turn.now;
        let mut others = Vec::new();
        while let Some(tok) = turn.deadlines.expired(now) {
            let Some((Kind::Inbound, generation, key)) = token::split(tok) else {
                others.push(tok);
                continue;
            };
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == generation) else { continue };
            if conn.deadline > now || conn.waiting.is_some() {
                turn.deadlines.arm(tok, conn.deadline.max(now + WAIT_RECHECK));
                continue;
            }
            if conn.closing {
                self.close(key, "linger_timeout", turn);
                continue;
            }
            if conn.io.is_handshaking() {
                // Nothing can be said inside an unfinished handshake.
                turn.log.event("tls_error", &[("client", V::D(&conn.peer)), ("error", V::S("handshake timeout"))]);
                self.close(key, "tls_handshake_timeout", turn);
                continue;
            }
            if let Some((outcome, creds)) = conn.auth_delayed.take() {
                self.answer_auth(key, outcome, creds, turn);
                continue;
            }
            let why = conn.pace.deadline(&pace_limits(turn.cfg)).map_or("idle", |(_, why)| why.as_str());
            turn.log.event(
                "timeout",
                &[
                    ("client", V::D(&conn.peer)),
                    ("in_data", V::N(u64::from(conn.session.in_data()))),
                    ("reason", V::S(why)),
                ],
            );
            if conn.make_reply_room(turn.bufs) {
                if let Some(out) = conn.io.output.as_mut() {
                    conn.session.handle_timeout(&mut turn.session_ctx(), out);
                }
            }
            conn.closing = true;
            conn.deadline = now + LINGER;
            turn.deadlines.arm(tok, conn.deadline);
            conn.mark_dirty(key, &mut self.dirty);
        }
        self.flush_dirty(turn);
        others
    }

    /// Takes an accepted socket: refused with a one-line reply when the relay or the client's
    /// limits are full, else registered, greeted (inside TLS on an implicit-TLS listener) and
    /// given its first deadline.
    pub fn admit(&mut self, mut sock: mio::net::TcpStream, peer: SocketAddr, implicit_tls: bool, turn: &mut Turn<'_>) {
        let cfg = turn.cfg;
        if self.conns.len() >= cfg.max_connections {
            // Best effort: the socket is fresh, so this small write nearly always fits.
            let _ = sock.write(reply::TOO_MANY_CONNECTIONS);
            turn.log
                .event("refused", &[("client", V::D(&peer)), ("reply", V::B(trim_crlf(reply::TOO_MANY_CONNECTIONS)))]);
            return;
        }
        let relay_allowed = cfg.allow.iter().any(|c| c.contains(peer.ip()));
        // Postfix exempts $mynetworks from anvil's limits; so do we, unless told otherwise.
        let limited = self.limiter.enabled() && (!relay_allowed || cfg.limit_allowed_clients);
        if limited {
            let refusal = match self.limiter.admit(peer.ip(), turn.now) {
                Admission::Admit => None,
                Admission::TooMany => Some(reply::CLIENT_TOO_MANY),
                Admission::TooFast => Some(reply::CLIENT_TOO_FAST),
            };
            if let Some(r) = refusal {
                let _ = sock.write(r);
                turn.log.event("refused", &[("client", V::D(&peer)), ("reply", V::B(trim_crlf(r)))]);
                return;
            }
        }
        let Some(mut out) = turn.bufs.checkout() else {
            let _ = sock.write(reply::TOO_MANY_CONNECTIONS);
            self.uncount(limited, peer);
            return;
        };
        let _ = sock.set_nodelay(true);
        self.generation = token::next_generation(self.generation);
        let generation = self.generation;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let tok = token::make(Kind::Inbound, generation, key);
        if let Err(e) = turn.registry.register(&mut sock, tok, Interest::READABLE | Interest::WRITABLE) {
            turn.log.event("accept_error", &[("error", V::D(&e))]);
            turn.bufs.checkin(out);
            self.uncount(limited, peer);
            return;
        }
        let mut session = ServerSession::new(peer.ip(), relay_allowed);
        // On an implicit-TLS port the greeting waits in TLS until the handshake is done.
        let tls = match self.tls.as_ref().filter(|_| implicit_tls).map(TlsSession::server) {
            Some(Ok(t)) => {
                session.tls_started();
                Some(t)
            }
            Some(Err(e)) => {
                turn.log.event("tls_error", &[("client", V::D(&peer)), ("error", V::D(&e))]);
                turn.bufs.checkin(out);
                let _ = turn.registry.deregister(&mut sock);
                self.uncount(limited, peer);
                return;
            }
            None => None,
        };
        session.greeting(&cfg.session, &mut out);
        let timeout = if tls.is_some() { cfg.tls_handshake_timeout } else { cfg.command_timeout };
        let deadline = turn.now + timeout;
        let mut io = Transport::new(sock);
        if let Some(t) = tls {
            // Before the greeting is buffered: all of it goes through TLS.
            io.start_tls(t, turn.bufs);
        }
        io.output = Some(out);
        io.writable = true;
        entry.insert(InboundConn {
            io,
            peer,
            session,
            generation,
            eof: false,
            closing: false,
            waiting: None,
            dirty: true,
            deadline,
            pace: Pace::new(turn.now),
            limited,
            eod_at: None,
            dkim: None,
            auth_delayed: None,
        });
        self.dirty.push((key, generation));
        turn.deadlines.arm(tok, deadline);
        turn.log.event("connect", &[("client", V::D(&peer)), ("relay", V::N(u64::from(relay_allowed)))]);
    }

    /// A connection counted by the per-client limits is gone.
    fn uncount(&mut self, limited: bool, peer: SocketAddr) {
        if limited {
            self.limiter.close(peer.ip());
        }
    }

    /// Closes connection `key`: `close_notify` when TLS is up, buffers back, limits uncounted.
    pub fn close(&mut self, key: usize, why: &str, turn: &mut Turn<'_>) {
        if !self.conns.contains(key) {
            return;
        }
        let mut conn = self.conns.remove(key);
        self.uncount(conn.limited, conn.peer);
        turn.deadlines.cancel(token::make(Kind::Inbound, conn.generation, key));
        // Best effort close_notify, so the client sees a clean end rather than a truncation.
        conn.io.close_tls();
        let _ = turn.registry.deregister(&mut conn.io.sock);
        conn.session.release_body(turn.bodies);
        conn.io.release_buffers(turn.bufs);
        turn.log.event("disconnect", &[("client", V::D(&conn.peer)), ("reason", V::S(why))]);
    }

    /// The end of the shutdown grace period: every session still open gets `421` (what the
    /// socket takes now) and is closed. Commit first: committed messages are answered.
    pub fn close_all(&mut self, turn: &mut Turn<'_>) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            if conn.make_reply_room(turn.bufs) {
                if let Some(out) = conn.io.output.as_mut() {
                    conn.session.handle_shutdown(&mut turn.session_ctx(), true, out);
                }
            }
            conn.closing = true;
            conn.io.writable = true;
            let _ = conn.io.flush(turn.bufs);
            self.close(key, "shutdown", turn);
        }
    }
}

/// One inbound connection.
pub struct InboundConn {
    /// Socket, optional TLS, pooled buffers, readiness.
    pub io: Transport,
    /// Peer address.
    pub peer: SocketAddr,
    /// Protocol state.
    pub session: ServerSession,
    /// Token generation.
    pub generation: u32,
    /// The peer closed its side.
    pub eof: bool,
    /// Close once the output is flushed.
    pub closing: bool,
    /// A message is appended and waits for the group commit.
    pub waiting: Option<QueueId>,
    /// In the per-turn list of connections with output to flush.
    pub dirty: bool,
    /// Current deadline (armed in the driver's deadline table at the end of each drive).
    pub deadline: Instant,
    /// What the client's progress has earned it: the command and data deadlines.
    pub pace: Pace,
    /// Counted by the per-client connection limits (not exempt): uncount on close.
    pub limited: bool,
    /// Time of the end of data of the waiting message (for the latency log).
    pub eod_at: Option<Instant>,
    /// An AUTH verdict held back (failures are answered slowly), given at `deadline`.
    pub auth_delayed: Option<(AuthOutcome, Credentials)>,
    /// What DKIM did to the waiting message (logged with its `250`).
    pub dkim: Option<Outcome>,
}

impl InboundConn {
    /// Makes sure the output buffer exists and has room for one more reply, flushing first if
    /// it is nearly full. False when the client is not reading or the pool is empty; when true,
    /// `self.io.output` is `Some` with at least [`REPLY_ROOM`] free.
    pub fn make_reply_room(&mut self, pool: &mut BufPool) -> bool {
        if self.io.output.as_ref().is_some_and(|b| b.room() < REPLY_ROOM)
            && matches!(self.io.flush(pool), Flush::Failed(_))
        {
            return false;
        }
        self.io.output_buf(pool).is_some_and(|b| b.room() >= REPLY_ROOM)
    }

    /// Puts the connection on the turn's list of connections to flush (once).
    pub fn mark_dirty(&mut self, key: usize, list: &mut Vec<(usize, u32)>) {
        if !self.dirty {
            self.dirty = true;
            list.push((key, self.generation));
        }
    }
}

/// The pace limits from the flags.
fn pace_limits(cfg: &InboundConfig) -> PaceLimits {
    PaceLimits { command: cfg.command_timeout, data: cfg.data_timeout, min_data_rate: cfg.min_data_rate }
}

/// Logs a finished handshake and tells the session which version and cipher it got (called
/// once, on the read that ends the handshake).
fn announce_tls(conn: &mut InboundConn, info: TlsInfo, log: &mut Logger) {
    conn.session.set_tls_info(info.version, info.cipher);
    log.event("tls", &[("client", V::D(&conn.peer)), ("version", V::S(info.version)), ("cipher", V::S(info.cipher))]);
}

/// A reply without its line end, for log lines.
pub fn trim_crlf(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\r\n").unwrap_or(b)
}

/// Picks the finished message's egress source (`delivery::sources`): cuts every
/// `X-Sluice-Pool:` field out of it (always, whoever sent it), takes the pool it names when
/// the client is trusted, else its AUTH user's or the default one, and records the weighted
/// choice in the envelope, to be stored. A pool that does not exist refuses the message
/// (`550 5.7.1` naming it, logged; nothing is stored): `Err(true)` once that reply is written,
/// `Err(false)` when there was no room for it (the caller closes the session).
fn choose_source(conn: &mut InboundConn, turn: &mut Turn<'_>) -> Result<(), bool> {
    let Some(mut body) = conn.session.take_body() else { return Ok(()) };
    let mut named = Vec::new();
    let found = take_pool_header(&mut body, &mut named);
    conn.session.restore_body(body);
    let header = (found && conn.session.trusted()).then_some(&named[..]);
    let sources = &turn.cfg.sources;
    let chosen = match sources.resolve(header, conn.session.auth_user()) {
        Ok(None) => return Ok(()),
        Ok(Some(pool)) => pool.choose(conn.session.message().0 .0),
        Err(UnknownPool(name)) => {
            let mut buf = [0u8; 128];
            let reply = reply::unknown_pool(name, &mut buf);
            let id = conn.session.message().0;
            turn.log.event(
                "refused",
                &[("id", V::D(&id)), ("client", V::D(&conn.peer)), ("reply", V::B(trim_crlf(reply)))],
            );
            if conn.make_reply_room(turn.bufs) {
                if let Some(out) = conn.io.output.as_mut() {
                    conn.session.message_result(&mut turn.session_ctx(), Err(reply), out);
                    return Err(true);
                }
            }
            conn.session.release_body(turn.bodies);
            return Err(false);
        }
    };
    if let Some(s) = sources.get(chosen) {
        conn.session.set_source(s.name.as_bytes());
    }
    Ok(())
}

/// Appends the session's finished message to the spool, after `prefix` (its DKIM-Signature
/// fields, or nothing), and queues its `250` behind the group commit; a spool error is
/// answered at once (`452`/`451`). False when not even that reply fits: the caller closes
/// the connection (nothing was stored).
fn store(conn: &mut InboundConn, key: usize, prefix: &[u8], turn: &mut Turn<'_>) -> bool {
    let (id, env, body) = conn.session.message();
    match turn.spool.append_signed_message(id, turn.wall_us / 1000, env, prefix, body) {
        Ok((_, loc)) => {
            conn.session.release_body(turn.bodies);
            conn.waiting = Some(id);
            turn.waiting.push(Waiter {
                key,
                generation: conn.generation,
                id,
                loc,
                arrival_ms: turn.wall_us / 1000,
                queued: false,
            });
        }
        Err(e) => {
            turn.log.event("spool_error", &[("id", V::D(&id)), ("error", V::D(&e))]);
            let reply = if matches!(e, SpoolError::NoSpace) { reply::SPOOL_FULL } else { reply::SPOOL_FAILED };
            if !conn.make_reply_room(turn.bufs) {
                return false;
            }
            if let Some(out) = conn.io.output.as_mut() {
                conn.session.message_result(&mut turn.session_ctx(), Err(reply), out);
            }
        }
    }
    true
}
