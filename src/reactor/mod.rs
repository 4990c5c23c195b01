//! The event loop: one `mio::Poll` owning every socket, and the turn that orders the work.
//!
//! # One turn
//! 1. `poll` for events (timeout: the next timer, or zero when work is left over).
//! 2. Dispatch: listeners are only marked; connections read, parse and append finished
//!    messages to the spool (not yet answered).
//! 3. Group commit: one `spool.commit()` covers every message of the turn; only then are their
//!    `250`s written into the output buffers (or `451` for all if the sync failed).
//! 4. Flush every connection with output: each pipelined batch of replies leaves in one write.
//! 5. Expire timers (`421 4.4.2`), then accept new connections, a bounded number per turn so
//!    that a connection flood cannot starve sessions already open.
//! 6. Trim the buffer pools: what a spike left unused for a whole period is freed.

pub mod authwork;
pub mod signal;
pub mod syncer;
pub mod timer;

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use mio::{Events, Interest, Poll};
use slab::Slab;

use crate::buf::{BufPool, VecPool};
use crate::config::Config;
use crate::delivery::DeliveryConfig;
use crate::log::{Logger, V};
use crate::message::IdGen;
use crate::message::QueueId;
use crate::net::inbound::{Flush, InboundConn};
use crate::net::outbound::{self as delivery, Outbound as Delivery, OutboundConfig};
use crate::net::socket::{self, IoResult};
use crate::net::tls::{ServerTls, TlsSession};
use crate::net::token::{self, Kind};
use crate::queue::schedule::RetryPolicy;
use crate::smtp::auth::Credentials;
use crate::smtp::auth_throttle::{self, AuthThrottle, Refusal, Verdict};
use crate::smtp::client::ClientTimeouts;
use crate::smtp::client_key::ClientKey;
use crate::smtp::client_limit::{Admission, ConnectionLimiter};
use crate::smtp::line::MAX_AUTH_LINE;
use crate::smtp::pace::{Pace, PaceLimits};
use crate::smtp::reply;
use crate::smtp::server::{AuthOutcome, Ctx, Event, ServerSession};
use crate::spool::{MessageLoc, StoredMessage};
use crate::spool::{Spool, SpoolError, SpoolOptions};
use authwork::{AuthJob, AuthWorker};

/// Input/output chunk size. Sessions frame lines where they lie in the input chunk, so the
/// longest line, an AUTH line (RFC 4954 §4), must fit in one.
const CHUNK: usize = 16 * 1024;
const _: () = assert!(CHUNK >= MAX_AUTH_LINE);
/// Connections accepted per turn at most.
const ACCEPTS_PER_TURN: usize = 256;
/// Read/parse rounds for one connection per turn before others get a go.
const ROUNDS_PER_DRIVE: usize = 64;
/// How long a closing connection may take to drain its last replies.
const LINGER: Duration = Duration::from_secs(10);

/// A message appended to the spool whose `250` waits for a group commit.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    key: usize,
    generation: u32,
    id: QueueId,
    loc: MessageLoc,
    arrival_ms: u64,
    /// Already handed to the delivery queue (only the reply is still owed).
    queued: bool,
}

struct Listener {
    sock: mio::net::TcpListener,
    addr: SocketAddr,
    pending: bool,
    /// Implicit TLS: the handshake comes before the greeting.
    tls: bool,
}

/// Why the relay could not start or had to stop.
#[derive(Debug)]
pub enum RunError {
    /// The spool could not be opened.
    Spool(SpoolError),
    /// A listener could not be bound.
    Listen(SocketAddr, io::Error),
    /// The poller failed.
    Poll(io::Error),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Spool(e) => write!(f, "spool: {e}"),
            RunError::Listen(a, e) if e.kind() == io::ErrorKind::AddrInUse => {
                write!(f, "cannot listen on {a}: {e} (another process holds the port; --reuse-port shares it)")
            }
            RunError::Listen(a, e) => write!(f, "cannot listen on {a}: {e}"),
            RunError::Poll(e) => write!(f, "event loop: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

/// The relay's loop and everything it owns.
pub struct Server {
    poll: Poll,
    cfg: Config,
    listeners: Vec<Listener>,
    conns: Slab<InboundConn>,
    generation: u32,
    bufs: BufPool,
    bodies: VecPool,
    ids: IdGen,
    spool: Spool,
    timers: timer::Timers,
    log: Logger,
    signals: signal::SignalSource,
    /// Connections whose message is appended but not yet in a commit: (key, generation).
    waiting: Vec<Waiter>,
    /// Connections whose message the sync thread is committing now.
    syncing: Vec<Waiter>,
    syncer: syncer::Syncer,
    /// Connections with output to flush this turn.
    dirty: Vec<(usize, u32)>,
    /// Connections to drive again next turn (budget spent or buffers exhausted).
    again: Vec<(usize, u32)>,
    delivery: Delivery,
    shutdown: Option<Instant>,
    force_exit: bool,
    accept_retry: Option<Instant>,
    now: Instant,
    wall_us: u64,
    /// The certificate for new TLS sessions (replaced on SIGHUP).
    tls: Option<ServerTls>,
    /// Verifies AUTH credentials off the loop.
    auth: Option<AuthWorker>,
    /// Which AUTH checks run and when; failure budgets per client.
    auth_throttle: AuthThrottle<AuthJob>,
    /// Connections per client address (`--max-connections-per-ip` and its rate).
    limiter: ConnectionLimiter,
    /// The spool has room for new mail (see `Spool::accepting`), read once per turn.
    accepting: bool,
}

impl Server {
    /// Opens the spool (recovering it) and binds every listener.
    pub fn bind(cfg: Config) -> Result<Server, RunError> {
        let mut log = Logger::new(cfg.log_format);
        match socket::raise_nofile_limit() {
            Ok(n) => log.event("limits", &[("nofile", V::N(n))]),
            Err(e) => log.event("limits", &[("error", V::D(&e))]),
        }
        let opts = SpoolOptions {
            dir: cfg.spool.clone(),
            fsync: cfg.fsync,
            segment_size: cfg.segment_size.max(cfg.session.max_message_size + (1 << 20)),
            min_free_space: cfg.min_free_space,
        };
        // Signals are caught before the spool is locked (its lock names us): a flush request
        // (SIGUSR1) or SIGTERM during a long recovery waits for the loop instead of killing
        // the process.
        let poll = Poll::new().map_err(RunError::Poll)?;
        let signals =
            signal::SignalSource::register(poll.registry(), token::make(Kind::Signal, 0, 0)).map_err(RunError::Poll)?;
        let (spool, recovery) = Spool::open(opts).map_err(RunError::Spool)?;
        for w in &recovery.warnings {
            log.event("spool_warning", &[("detail", V::S(w))]);
        }
        let mut ids = IdGen::default();
        if let Some(max) = recovery.max_id {
            ids.observe(max);
        }
        let queued = recovery.messages.len() as u64;
        let rcpts: usize = recovery.messages.iter().map(|m| m.rcpts.len()).sum();
        log.event(
            "spool_recovered",
            &[("dir", V::D(&cfg.spool.display())), ("messages", V::N(queued)), ("recipients", V::N(rcpts as u64))],
        );
        if !cfg.fsync {
            log.event(
                "warning",
                &[("detail", V::S("--fsync never: accepted mail is NOT durable; for benchmarks only"))],
            );
        }
        let mut listeners = Vec::new();
        let plain = cfg.listen.iter().map(|a| (*a, false));
        for (i, (addr, tls)) in plain.chain(cfg.listen_tls.iter().map(|a| (*a, true))).enumerate() {
            let mut sock = socket::listener(addr, cfg.reuse_port).map_err(|e| RunError::Listen(addr, e))?;
            let addr = sock.local_addr().unwrap_or(addr);
            poll.registry()
                .register(&mut sock, token::make(Kind::Listener, 0, i), Interest::READABLE)
                .map_err(RunError::Poll)?;
            log.event("listening", &[("addr", V::D(&addr)), ("tls", V::S(if tls { "implicit" } else { "starttls" }))]);
            listeners.push(Listener { sock, addr, pending: true, tls });
        }
        // One waker per poll: the sync thread and the AUTH worker share it.
        let waker = Arc::new(mio::Waker::new(poll.registry(), token::make(Kind::Waker, 0, 0)).map_err(RunError::Poll)?);
        let syncer = syncer::Syncer::spawn(waker.clone()).map_err(RunError::Poll)?;
        let auth = match &cfg.auth {
            Some(users) => {
                log.event("auth", &[("users", V::N(users.len() as u64))]);
                Some(AuthWorker::spawn(users.clone(), waker).map_err(RunError::Poll)?)
            }
            None => None,
        };
        log.flush();
        let limit = (cfg.max_connections * 2 + 4096).min(1 << 20);
        let relay_ip = cfg.relay_host.as_ref().is_some_and(|(h, _)| h.parse::<std::net::IpAddr>().is_ok());
        let dns = match (relay_ip || cfg.hold, cfg.dns) {
            (true, _) => None,
            (false, Some(server)) => {
                let d = crate::net::dns::DnsConn::new(server, poll.registry(), crate::net::dns::DnsConn::reactor_token)
                    .map_err(RunError::Poll)?;
                log.event("dns", &[("server", V::D(&server))]);
                Some(d)
            }
            (false, None) => {
                log.event("warning", &[("detail", V::S("no DNS server (--dns, /etc/resolv.conf): deliveries wait"))]);
                None
            }
        };
        let delivery = Delivery::new(
            DeliveryConfig {
                relay_host: cfg.relay_host.clone(),
                smtp_port: cfg.smtp_port,
                domain_concurrency: cfg.domain_concurrency,
                policy: RetryPolicy { schedule: cfg.retry_schedule.clone(), max_lifetime: cfg.max_queue_lifetime },
                hostname: cfg.hostname.clone(),
                connect_timeout: cfg.connect_timeout,
                tls_mode: cfg.outbound_tls.into(),
            },
            OutboundConfig {
                timeouts: capped_timeouts(cfg.smtp_timeout, cfg.tls_handshake_timeout),
                tls: cfg.client_tls.clone(),
                own: listeners.iter().map(|l| l.addr).collect(),
            },
            dns,
        );
        let mut server = Server {
            poll,
            listeners,
            conns: Slab::with_capacity(1024),
            generation: 0,
            bufs: BufPool::new(CHUNK, limit),
            bodies: VecPool::new(1 << 20),
            ids,
            spool,
            timers: timer::Timers::default(),
            log,
            signals,
            waiting: Vec::new(),
            syncing: Vec::new(),
            syncer,
            dirty: Vec::new(),
            again: Vec::new(),
            shutdown: None,
            force_exit: false,
            accept_retry: None,
            now: Instant::now(),
            wall_us: 0,
            delivery,
            tls: cfg.tls.as_ref().map(|(_, _, t)| t.clone()),
            auth,
            auth_throttle: AuthThrottle::new(auth_throttle::Limits::default()),
            limiter: ConnectionLimiter::new(cfg.client_limits),
            accepting: true,
            cfg,
        };
        server.tick();
        server.enqueue_recovered(&recovery.messages);
        Ok(server)
    }

    /// Hands recovered messages to the delivery queue.
    fn enqueue_recovered(&mut self, messages: &[StoredMessage]) {
        self.with_delivery(|d, ctx| {
            for rec in messages {
                d.enqueue(ctx, rec);
            }
        });
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    /// Runs until a signal asks it to stop and the open sessions are drained.
    pub fn run(mut self) -> Result<(), RunError> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(RunError::Poll(e));
                }
            }
            self.tick();
            let again = std::mem::take(&mut self.again);
            for (key, generation) in again {
                self.drive_checked(key, generation);
            }
            for ev in events.iter() {
                match token::split(ev.token()) {
                    Some((Kind::Listener, _, i)) => {
                        if let Some(l) = self.listeners.get_mut(i) {
                            l.pending = true;
                        }
                    }
                    Some((Kind::Signal, _, _)) => self.on_signal(),
                    Some((Kind::Waker, _, _)) => {
                        self.on_sync_done();
                        self.on_auth_done();
                    }
                    Some((kind @ (Kind::Outbound | Kind::Dns), generation, key)) => {
                        self.with_delivery(|d, ctx| d.on_event(ctx, kind, generation, key, ev));
                    }
                    Some((Kind::Inbound, generation, key)) => {
                        let Some(conn) = self.conns.get_mut(key) else { continue };
                        if conn.generation != generation {
                            continue; // A stale event for a reused slot.
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            conn.readable = true;
                        }
                        if ev.is_read_closed() || ev.is_error() {
                            conn.hup = true;
                        }
                        if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                            conn.writable = true;
                            if conn.pending_output() > 0 {
                                conn.mark_dirty(key, &mut self.dirty);
                            }
                        }
                        self.drive(key);
                    }
                    _ => {}
                }
            }
            self.commit();
            // Failed seals and unlinks while reclaiming have nowhere else to be reported.
            for w in self.spool.take_warnings() {
                self.log.event("spool_warning", &[("detail", V::S(&w))]);
            }
            self.pump_delivery();
            self.flush_dirty();
            self.expire_timers();
            self.accept();
            // Buffers unused for a whole period after a spike go back to the allocator.
            self.bufs.trim(self.now);
            self.bodies.trim(self.now);
            self.log.flush();
            if self.shutdown_done() {
                self.commit_all_blocking();
                self.flush_dirty();
                self.log.event("stopped", &[("open_sessions", V::N(self.conns.len() as u64))]);
                self.log.flush();
                return Ok(());
            }
        }
    }

    fn pump_delivery(&mut self) {
        if self.cfg.hold {
            return;
        }
        self.with_delivery(|d, ctx| d.pump(ctx));
    }

    /// Runs `f` on the delivery engine with a context borrowed from the loop's other parts.
    fn with_delivery<R>(&mut self, f: impl FnOnce(&mut Delivery, &mut delivery::Ctx<'_>) -> R) -> R {
        let Server { delivery, spool, log, ids, bufs, poll, now, wall_us, .. } = self;
        let mut ctx =
            delivery::Ctx { spool, log, ids, bufs, registry: poll.registry(), now: *now, wall_ms: *wall_us / 1000 };
        f(delivery, &mut ctx)
    }

    fn tick(&mut self) {
        self.now = Instant::now();
        self.wall_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let accepting = self.spool.accepting(self.wall_us / 1000);
        if accepting != self.accepting {
            self.accepting = accepting;
            let state = if accepting { "accepting" } else { "full" };
            self.log.event("spool_space", &[("state", V::S(state)), ("min_free", V::N(self.cfg.min_free_space))]);
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let commit_due = !self.waiting.is_empty() || self.spool.has_uncommitted();
        if !self.again.is_empty() || (commit_due && !self.syncer.busy()) {
            return Some(Duration::ZERO);
        }
        if self.listeners.iter().any(|l| l.pending) && self.accept_retry.is_none() && self.shutdown.is_none() {
            return Some(Duration::ZERO);
        }
        if self.delivery.has_work() && !self.cfg.hold {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut next = self.timers.next();
        if let Some(t) = self.delivery.next_deadline(now, self.wall_us / 1000).filter(|_| !self.cfg.hold) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        // The pools' trims too: an idle relay must still wake to give a spike's memory back.
        let trims = [self.bufs.next_trim(), self.bodies.next_trim()];
        for t in [self.shutdown, self.accept_retry].into_iter().chain(trims).flatten() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn drive_checked(&mut self, key: usize, generation: u32) {
        if self.conns.get(key).is_some_and(|c| c.generation == generation) {
            self.drive(key);
        }
    }

    /// Reads, parses and appends for one connection until it would block, waits for the spool,
    /// hits backpressure, or spends its budget.
    fn drive(&mut self, key: usize) {
        let Server {
            conns,
            bufs,
            bodies,
            ids,
            spool,
            cfg,
            log,
            waiting,
            dirty,
            again,
            now,
            wall_us,
            shutdown,
            tls,
            auth,
            auth_throttle,
            timers,
            accepting,
            ..
        } = self;
        let Some(conn) = conns.get_mut(key) else { return };
        let mut failed = false;
        let mut auth_queued = false;
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
            if let Some(inb) = conn.input.as_mut().filter(|b| !b.is_empty()) {
                let Some(out) = InboundConn::output(&mut conn.output, bufs) else {
                    again.push((key, conn.generation));
                    break;
                };
                let mut ctx = Ctx { cfg: &cfg.session, bodies, ids, now_unix_us: *wall_us, accepting: *accepting };
                let p = conn.session.handle_input(&mut ctx, inb.data(), out);
                inb.consume(p.consumed);
                progressed = p.consumed > 0;
                if let Some(f) = conn.session.take_last_fault() {
                    log.event("refused", &[("client", V::D(&conn.peer)), ("reply", V::B(trim_crlf(f.reply())))]);
                }
                match p.event {
                    Some(Event::Message) => {
                        let (id, env, body) = conn.session.message();
                        match spool.append_message(id, *wall_us / 1000, env, body) {
                            Ok((_, loc)) => {
                                conn.session.release_body(bodies);
                                conn.waiting = Some(id);
                                conn.eod_at = Some(Instant::now());
                                waiting.push(Waiter {
                                    key,
                                    generation: conn.generation,
                                    id,
                                    loc,
                                    arrival_ms: *wall_us / 1000,
                                    queued: false,
                                });
                            }
                            Err(e) => {
                                log.event("spool_error", &[("id", V::D(&id)), ("error", V::D(&e))]);
                                let reply = if matches!(e, SpoolError::NoSpace) {
                                    reply::SPOOL_FULL
                                } else {
                                    reply::SPOOL_FAILED
                                };
                                let Some(out) = conn.make_reply_room(bufs).then_some(conn.output.as_mut()).flatten()
                                else {
                                    // Cannot even say no: drop the session; nothing was stored.
                                    failed = true;
                                    break;
                                };
                                let mut ctx = Ctx {
                                    cfg: &cfg.session,
                                    bodies,
                                    ids,
                                    now_unix_us: *wall_us,
                                    accepting: *accepting,
                                };
                                conn.session.message_result(&mut ctx, Err(reply), out);
                            }
                        }
                        continue;
                    }
                    Some(Event::Close) => {
                        conn.closing = true;
                        conn.deadline = *now + LINGER;
                        break;
                    }
                    Some(Event::StartTls) => {
                        // The 220 and the replies before it go out in the clear; the client's
                        // next bytes are its ClientHello.
                        let Some(session) = tls.as_ref().map(TlsSession::server).and_then(Result::ok) else {
                            failed = true;
                            break;
                        };
                        conn.clear_out = conn.pending_output();
                        conn.tls = Some(session);
                        conn.deadline = *now + cfg.tls_handshake_timeout;
                        log.event("starttls", &[("client", V::D(&conn.peer))]);
                        continue;
                    }
                    Some(Event::Auth) => {
                        let creds = conn.session.take_credentials();
                        if auth.is_none() {
                            // Cannot happen (AUTH is only offered with a worker); refuse.
                            if let Some(out) = conn.output.as_mut() {
                                conn.session.auth_result(AuthOutcome::Rejected, creds, out);
                            }
                            continue;
                        }
                        let client = ClientKey::of(conn.peer.ip());
                        let job = AuthJob { key, generation: conn.generation, client, creds };
                        let (refusal, job) = match auth_throttle.submit(client, job, *now) {
                            Ok(()) => {
                                auth_queued = true;
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
                        log.event("auth", &[("client", V::D(&conn.peer)), ("result", V::S(result))]);
                        let Some(out) = conn.make_reply_room(bufs).then_some(conn.output.as_mut()).flatten() else {
                            failed = true;
                            break;
                        };
                        if conn.session.auth_result(outcome, job.creds, out) {
                            conn.closing = true;
                            conn.deadline = *now + LINGER;
                            break;
                        }
                        continue;
                    }
                    None => {}
                }
            }
            // 2. Backpressure: a client that does not read its replies is not read from.
            if conn.pending_output() >= CHUNK / 2 {
                match conn.flush(bufs) {
                    Flush::Done => {}
                    Flush::Partial => break,
                    Flush::Failed => {
                        failed = true;
                        break;
                    }
                }
            }
            // 3. Read more.
            if !conn.readable || conn.eof {
                if !progressed {
                    break;
                }
                continue;
            }
            if conn.input.is_none() {
                conn.input = bufs.checkout();
            }
            let Some(inb) = conn.input.as_mut() else {
                again.push((key, conn.generation));
                break;
            };
            let space = inb.space();
            let asked = space.len();
            if space.is_empty() {
                // The session cannot consume (its output is full): wait for the client to read.
                break;
            }
            let handshaking = conn.tls.as_ref().is_some_and(|t| t.is_handshaking());
            let result = InboundConn::read(&mut conn.sock, &mut conn.tls, space);
            let handshake_done = handshaking && conn.tls.as_ref().is_some_and(|t| !t.is_handshaking());
            match result {
                IoResult::Done(n) => {
                    inb.fill(n);
                    // A short read drained the socket: with edge-triggered epoll, new bytes
                    // raise a new event, so the extra read that would return EAGAIN is skipped
                    // (as tokio does). Not after a FIN was reported: then read on to see EOF.
                    // Through TLS a short read says nothing about the socket.
                    if n < asked && !conn.hup && conn.tls.is_none() {
                        conn.readable = false;
                    }
                    read += n;
                }
                IoResult::WouldBlock => conn.readable = false,
                IoResult::Closed => conn.eof = true,
                IoResult::Error(e) => {
                    if conn.tls.is_some() {
                        log.event("tls_error", &[("client", V::D(&conn.peer)), ("error", V::D(&e))]);
                        // Best effort: the alert rustls queued tells the client why.
                        let _ = conn.flush(bufs);
                    }
                    failed = true;
                    break;
                }
            }
            if handshake_done {
                announce_tls(conn, log);
                conn.pace.restart(*now);
            }
        }
        // A finished line or a new phase buys time, bytes alone do not (`smtp::pace`). Not
        // while closing or inside a TLS handshake: those have deadlines of their own.
        if !conn.closing && !conn.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
            conn.pace.observe(conn.session.timeout_kind(), conn.session.lines_done(), read, *now);
            match conn.pace.deadline(&pace_limits(cfg)) {
                Some((at, _)) => conn.deadline = at,
                // A held-back AUTH answer is due at its own deadline.
                None if conn.auth_delayed.is_some() => {}
                // Waiting for the spool or an AUTH check: the relay is the slow one.
                None => conn.deadline = *now + cfg.command_timeout,
            }
        }
        arm_deadline(timers, conn, key);
        if conn.pending_output() > 0 {
            conn.mark_dirty(key, dirty);
        }
        bufs.release_if_empty(&mut conn.input);
        if shutdown.is_some() && !conn.closing && conn.waiting.is_none() {
            if let Some(out) = conn.make_reply_room(bufs).then_some(conn.output.as_mut()).flatten() {
                let mut ctx = Ctx { cfg: &cfg.session, bodies, ids, now_unix_us: *wall_us, accepting: *accepting };
                if conn.session.handle_shutdown(&mut ctx, false, out) {
                    conn.closing = true;
                    conn.mark_dirty(key, dirty);
                }
            }
        }
        // The peer went away: whatever it left half-sent is dropped (nothing is stored).
        let hung_up = conn.eof && conn.waiting.is_none() && !conn.closing && !again.iter().any(|&(k, _)| k == key);
        if failed || hung_up {
            self.close(key, if failed { "io_error" } else { "client_closed" });
        }
        if auth_queued {
            self.pump_auth();
        }
    }

    /// Group commit: hands every message appended so far to the sync thread as one batch
    /// (unless one is already out: the next batch starts when it returns). With `--fsync never`
    /// the batch is released at once.
    fn commit(&mut self) {
        if self.syncer.busy() || (self.waiting.is_empty() && !self.spool.has_uncommitted()) {
            return;
        }
        match self.spool.begin_commit() {
            Ok(Some(job)) => {
                self.syncer.submit(job);
                debug_assert!(self.syncing.is_empty());
                self.syncing = std::mem::take(&mut self.waiting);
            }
            Ok(None) => {
                let batch = std::mem::take(&mut self.waiting);
                self.release(batch, Ok(()));
            }
            Err(e) => {
                self.log.event("spool_error", &[("during", V::S("commit")), ("error", V::D(&e))]);
                let batch = std::mem::take(&mut self.waiting);
                self.release(batch, Err(()));
            }
        }
    }

    /// The sync thread is back: release its batch, then start the next one.
    fn on_sync_done(&mut self) {
        while let Some(result) = self.syncer.try_result() {
            self.finish_sync(result);
        }
        self.commit();
    }

    /// Verdicts back from the AUTH worker: the throttle counts failures per client and says
    /// whether to answer at once, slowly, or with `421`; then the next check goes out.
    fn on_auth_done(&mut self) {
        let Some(worker) = self.auth.as_mut() else { return };
        let mut verdicts = Vec::new();
        worker.try_results(&mut verdicts);
        let now = Instant::now();
        for v in verdicts {
            let verdict = self.auth_throttle.verdict(v.client, v.ok, now);
            let failures = u64::from(self.auth_throttle.failures(v.client));
            let conn = self.conns.get_mut(v.key).filter(|c| c.generation == v.generation);
            // Logged even when the session has gone: each line is one password checked.
            let user = String::from_utf8_lossy(&v.creds.user).into_owned();
            let result = V::S(if v.ok { "ok" } else { "failed" });
            let answer = V::S(match verdict {
                Verdict::Accept => "accepted",
                Verdict::Reject { .. } => "rejected",
                Verdict::Block => "blocked",
            });
            let client: &dyn std::fmt::Display = match &conn {
                Some(c) => &c.peer,
                None => &v.client,
            };
            self.log.event(
                "auth",
                &[
                    ("client", V::D(client)),
                    ("user", V::S(&user)),
                    ("result", result),
                    ("answer", answer),
                    ("failures", V::N(failures)),
                ],
            );
            let Some(conn) = conn else { continue };
            match verdict {
                Verdict::Accept => self.answer_auth(v.key, AuthOutcome::Accepted, v.creds),
                Verdict::Block => self.answer_auth(v.key, AuthOutcome::Blocked, v.creds),
                Verdict::Reject { delay } if delay.is_zero() => self.answer_auth(v.key, AuthOutcome::Rejected, v.creds),
                Verdict::Reject { delay } => {
                    conn.auth_delayed = Some((AuthOutcome::Rejected, v.creds));
                    conn.deadline = now + delay;
                    arm_deadline(&mut self.timers, conn, v.key);
                }
            }
        }
        if self.auth_throttle.clients() > 100_000 {
            self.auth_throttle.prune(now);
        }
        self.pump_auth();
    }

    /// Hands the AUTH worker its next check when it is idle, skipping (and freeing the place
    /// of) checks whose session has gone.
    fn pump_auth(&mut self) {
        let Some(worker) = self.auth.as_mut() else { return };
        while let Some((client, job)) = self.auth_throttle.next_job() {
            if self.conns.get(job.key).is_some_and(|c| c.generation == job.generation) {
                worker.submit(job);
                return;
            }
            self.auth_throttle.abandon(client);
        }
    }

    /// Writes an AUTH verdict and lets the session go on (or close).
    fn answer_auth(&mut self, key: usize, outcome: AuthOutcome, creds: Credentials) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let Some(out) = conn.make_reply_room(&mut self.bufs).then_some(conn.output.as_mut()).flatten() else {
            self.close(key, "no_room_for_reply");
            return;
        };
        if conn.session.auth_result(outcome, creds, out) {
            conn.closing = true;
            conn.deadline = self.now + LINGER;
        } else {
            conn.deadline = self.now + self.cfg.command_timeout;
        }
        conn.mark_dirty(key, &mut self.dirty);
        self.drive(key);
    }

    fn finish_sync(&mut self, result: Result<(), SpoolError>) {
        let batch = std::mem::take(&mut self.syncing);
        match self.spool.finish_commit(result) {
            Ok(()) => self.release(batch, Ok(())),
            Err(e) => {
                self.log.event("spool_error", &[("during", V::S("commit")), ("error", V::D(&e))]);
                // The spool abandoned this batch and every append made after it.
                let newer = std::mem::take(&mut self.waiting);
                self.release(batch, Err(()));
                self.release(newer, Err(()));
            }
        }
    }

    /// Waits for the sync in flight and commits what is left, synchronously (shutdown only).
    fn commit_all_blocking(&mut self) {
        if let Some(result) = self.syncer.wait_result() {
            self.finish_sync(result);
        }
        if !self.waiting.is_empty() || self.spool.has_uncommitted() {
            let result = self.spool.commit();
            let batch = std::mem::take(&mut self.waiting);
            if let Err(e) = &result {
                self.log.event("spool_error", &[("during", V::S("commit")), ("error", V::D(e))]);
            }
            self.release(batch, result.map_err(|_| ()));
        }
    }

    /// Writes the `250` (or `451` when the commit failed) of every message in `batch`, then
    /// lets those sessions go on with what they pipelined behind the message.
    fn release(&mut self, batch: Vec<Waiter>, result: Result<(), ()>) {
        let committed_at = Instant::now();
        let mut unanswerable = Vec::new();
        let mut accepted = Vec::new();
        for w in &batch {
            // A waiter already queued is durable from an earlier commit: whatever this batch's
            // fate, its answer is the 250 (a 451 would make the client send it twice).
            let result = if w.queued { Ok(()) } else { result };
            let (key, generation) = (w.key, w.generation);
            let Server {
                conns,
                bufs,
                bodies,
                ids,
                cfg,
                log,
                dirty,
                wall_us,
                waiting,
                delivery,
                spool,
                poll,
                now,
                accepting,
                ..
            } = self;
            let conn = conns.get_mut(key).filter(|c| c.generation == generation);
            // Durable: it goes to delivery whether or not its client is still there (with the
            // session's envelope when there is one, else decoded from the spool).
            if result.is_ok() && !w.queued {
                let rec = StoredMessage {
                    id: w.id,
                    loc: w.loc,
                    arrival_ms: w.arrival_ms,
                    rcpts: Vec::new(),
                    pins: Default::default(),
                };
                let mut ctx = delivery::Ctx {
                    spool,
                    log,
                    ids,
                    bufs,
                    registry: poll.registry(),
                    now: *now,
                    wall_ms: *wall_us / 1000,
                };
                match conn.as_ref().filter(|c| c.waiting == Some(w.id)) {
                    Some(c) => delivery.enqueue_with(&mut ctx, &rec, c.session.envelope()),
                    None => accepted.push(rec),
                }
            }
            let Some(conn) = conn else { continue };
            let Some(id) = conn.waiting.take() else { continue };
            let Some(out) = conn.make_reply_room(bufs).then_some(conn.output.as_mut()).flatten() else {
                // No room for the reply yet. A durable message is answered on a later turn; a
                // refused one is answered by closing (the client then retries it).
                if result.is_ok() {
                    conn.waiting = Some(id);
                    waiting.push(Waiter { queued: true, ..*w });
                } else {
                    unanswerable.push(key);
                }
                continue;
            };
            let env = conn.session.envelope();
            let latency_us = conn.eod_at.map_or(0, |t| committed_at.duration_since(t).as_micros() as u64);
            match result {
                Ok(()) => log.event(
                    "accepted",
                    &[
                        ("id", V::D(&id)),
                        ("client", V::D(&conn.peer)),
                        ("from", V::B(&env.sender)),
                        ("rcpts", V::N(env.rcpt_count() as u64)),
                        ("commit_us", V::N(latency_us)),
                        ("tls", V::S(if conn.session.is_tls() { "yes" } else { "no" })),
                        ("user", V::B(conn.session.auth_user().unwrap_or(b"-"))),
                    ],
                ),
                Err(()) => log.event(
                    "refused",
                    &[("id", V::D(&id)), ("client", V::D(&conn.peer)), ("reply", V::B(trim_crlf(reply::SPOOL_FAILED)))],
                ),
            }
            let mut ctx = Ctx { cfg: &cfg.session, bodies, ids, now_unix_us: *wall_us, accepting: *accepting };
            conn.session.message_result(&mut ctx, result.map_err(|()| reply::SPOOL_FAILED), out);
            conn.mark_dirty(key, dirty);
        }
        for key in unanswerable {
            self.close(key, "no_room_for_reply");
        }
        if !accepted.is_empty() {
            self.enqueue_recovered(&accepted);
        }
        // Pipelined commands behind the message can go on now.
        for w in batch {
            self.drive_checked(w.key, w.generation);
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for (key, generation) in dirty {
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == generation) else { continue };
            conn.dirty = false;
            let had_backlog = conn.pending_output() >= CHUNK / 2;
            match conn.flush(&mut self.bufs) {
                Flush::Failed => self.close(key, "io_error"),
                Flush::Done if conn.closing => self.close(key, "closed"),
                Flush::Done if had_backlog || conn.eof => self.drive(key),
                _ => {}
            }
        }
    }

    fn expire_timers(&mut self) {
        let now = Instant::now();
        while let Some(e) = self.timers.pop_due(now) {
            let Some(conn) = self.conns.get_mut(e.key).filter(|c| c.generation == e.generation) else { continue };
            if conn.timer_at != Some(e.at) {
                continue; // Superseded by an earlier deadline armed since.
            }
            conn.timer_at = None;
            if conn.deadline > now || conn.waiting.is_some() {
                let at = conn.deadline.max(now + Duration::from_millis(100));
                self.timers.arm(at, e.key, e.generation);
                conn.timer_at = Some(at);
                continue;
            }
            if conn.closing {
                self.close(e.key, "linger_timeout");
                continue;
            }
            if conn.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
                // Nothing can be said inside an unfinished handshake.
                self.log.event("tls_error", &[("client", V::D(&conn.peer)), ("error", V::S("handshake timeout"))]);
                self.close(e.key, "tls_handshake_timeout");
                continue;
            }
            if let Some((outcome, creds)) = conn.auth_delayed.take() {
                self.answer_auth(e.key, outcome, creds);
                continue;
            }
            let Server { conns, bufs, bodies, ids, cfg, log, dirty, wall_us, timers, accepting, .. } = self;
            let Some(conn) = conns.get_mut(e.key) else { continue };
            let why = conn.pace.deadline(&pace_limits(cfg)).map_or("idle", |(_, why)| why.as_str());
            log.event(
                "timeout",
                &[
                    ("client", V::D(&conn.peer)),
                    ("in_data", V::N(u64::from(conn.session.in_data()))),
                    ("reason", V::S(why)),
                ],
            );
            if let Some(out) = conn.make_reply_room(bufs).then_some(conn.output.as_mut()).flatten() {
                let mut ctx = Ctx { cfg: &cfg.session, bodies, ids, now_unix_us: *wall_us, accepting: *accepting };
                conn.session.handle_timeout(&mut ctx, out);
            }
            conn.closing = true;
            conn.deadline = now + LINGER;
            timers.arm(conn.deadline, e.key, e.generation);
            conn.timer_at = Some(conn.deadline);
            conn.mark_dirty(e.key, dirty);
        }
        self.flush_dirty();
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = None;
        }
    }

    fn accept(&mut self) {
        if self.shutdown.is_some() || self.accept_retry.is_some() {
            return;
        }
        let mut budget = ACCEPTS_PER_TURN;
        for i in 0..self.listeners.len() {
            while self.listeners[i].pending && budget > 0 {
                match self.listeners[i].sock.accept() {
                    Ok((sock, peer)) => {
                        budget -= 1;
                        let tls = self.listeners[i].tls;
                        self.admit(sock, peer, tls);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.listeners[i].pending = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        self.log.event("accept_error", &[("error", V::D(&e))]);
                        self.accept_retry = Some(Instant::now() + Duration::from_millis(100));
                        return;
                    }
                }
            }
        }
        self.flush_dirty();
    }

    fn admit(&mut self, mut sock: mio::net::TcpStream, peer: SocketAddr, implicit_tls: bool) {
        if self.conns.len() >= self.cfg.max_connections {
            // Best effort: the socket is fresh, so this small write nearly always fits.
            let _ = sock.write(reply::TOO_MANY_CONNECTIONS);
            self.log
                .event("refused", &[("client", V::D(&peer)), ("reply", V::B(trim_crlf(reply::TOO_MANY_CONNECTIONS)))]);
            return;
        }
        let relay_allowed = self.cfg.allow.iter().any(|c| c.contains(peer.ip()));
        // Postfix exempts $mynetworks from anvil's limits; so do we, unless told otherwise.
        let limited = self.limiter.enabled() && (!relay_allowed || self.cfg.limit_allowed_clients);
        if limited {
            let refusal = match self.limiter.admit(peer.ip(), self.now) {
                Admission::Admit => None,
                Admission::TooMany => Some(reply::CLIENT_TOO_MANY),
                Admission::TooFast => Some(reply::CLIENT_TOO_FAST),
            };
            if let Some(r) = refusal {
                let _ = sock.write(r);
                self.log.event("refused", &[("client", V::D(&peer)), ("reply", V::B(trim_crlf(r)))]);
                return;
            }
        }
        let Some(mut out) = self.bufs.checkout() else {
            let _ = sock.write(reply::TOO_MANY_CONNECTIONS);
            self.uncount(limited, peer);
            return;
        };
        let _ = sock.set_nodelay(true);
        self.generation = token::next_generation(self.generation);
        let generation = self.generation;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            token::make(Kind::Inbound, generation, key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.log.event("accept_error", &[("error", V::D(&e))]);
            self.bufs.checkin(out);
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
                self.log.event("tls_error", &[("client", V::D(&peer)), ("error", V::D(&e))]);
                self.bufs.checkin(out);
                let _ = self.poll.registry().deregister(&mut sock);
                self.uncount(limited, peer);
                return;
            }
            None => None,
        };
        session.greeting(&self.cfg.session, &mut out);
        let timeout = if tls.is_some() { self.cfg.tls_handshake_timeout } else { self.cfg.command_timeout };
        let deadline = self.now + timeout;
        entry.insert(InboundConn {
            sock,
            peer,
            session,
            generation,
            input: None,
            output: Some(out),
            readable: false,
            hup: false,
            writable: true,
            eof: false,
            closing: false,
            waiting: None,
            dirty: true,
            deadline,
            timer_at: Some(deadline),
            pace: Pace::new(self.now),
            limited,
            eod_at: None,
            tls,
            clear_out: 0,
            auth_delayed: None,
        });
        self.dirty.push((key, generation));
        self.timers.arm(deadline, key, generation);
        self.log.event("connect", &[("client", V::D(&peer)), ("relay", V::N(u64::from(relay_allowed)))]);
    }

    /// A connection counted by the per-client limits is gone.
    fn uncount(&mut self, limited: bool, peer: SocketAddr) {
        if limited {
            self.limiter.close(peer.ip());
        }
    }

    fn close(&mut self, key: usize, why: &str) {
        if !self.conns.contains(key) {
            return;
        }
        let mut conn = self.conns.remove(key);
        self.uncount(conn.limited, conn.peer);
        if let Some(tls) = conn.tls.as_mut().filter(|t| !t.is_handshaking()) {
            // Best effort close_notify, so the client sees a clean end rather than a truncation.
            tls.close();
            let _ = tls.flush(&mut conn.sock);
        }
        let _ = self.poll.registry().deregister(&mut conn.sock);
        conn.session.release_body(&mut self.bodies);
        conn.release_buffers(&mut self.bufs);
        self.log.event("disconnect", &[("client", V::D(&conn.peer)), ("reason", V::S(why))]);
    }

    fn on_signal(&mut self) {
        let signal::Received { stop: n, hup, flush } = self.signals.drain();
        if hup > 0 {
            self.reload_tls();
        }
        if flush > 0 {
            self.flush_queue();
        }
        if n == 0 {
            return;
        }
        if self.shutdown.is_some() || n > 1 {
            self.log.event("shutdown", &[("mode", V::S("immediate"))]);
            self.force_exit = true;
            return;
        }
        self.log.event("shutdown", &[("mode", V::S("graceful")), ("sessions", V::N(self.conns.len() as u64))]);
        self.shutdown = Some(Instant::now() + self.cfg.shutdown_grace);
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l.sock);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.drive(key);
        }
    }

    /// SIGUSR1 (`sluice queue flush`): every deferred recipient is due now and no destination
    /// is taken for down any more (like Postfix's `postqueue -f`). With `--hold` nothing is
    /// delivered, so it only says so.
    fn flush_queue(&mut self) {
        if self.cfg.hold {
            self.log.event("flush", &[("detail", V::S("--hold: nothing is delivered"))]);
            return;
        }
        let (jobs, dests) = self.delivery.flush();
        self.log.event("flush", &[("jobs_due", V::N(jobs as u64)), ("destinations_reset", V::N(dests as u64))]);
    }

    /// SIGHUP: loads the certificate and key again. New sessions get the new pair; open ones
    /// keep theirs; a pair that does not load is logged and the old one stays.
    fn reload_tls(&mut self) {
        let Some((cert, key, _)) = &self.cfg.tls else {
            self.log.event("reload", &[("tls", V::S("not configured"))]);
            return;
        };
        match ServerTls::load(cert, key) {
            Ok(t) => {
                self.tls = Some(t);
                self.log.event("reload", &[("tls", V::S("ok")), ("cert", V::D(&cert.display()))]);
            }
            Err(e) => self.log.event("reload", &[("tls", V::S("failed, keeping the old pair")), ("error", V::D(&e))]),
        }
    }

    /// After a signal: true once every session is gone, or the grace period is over (then the
    /// remaining sessions get `421` and the spool is committed first).
    fn shutdown_done(&mut self) -> bool {
        let Some(deadline) = self.shutdown else { return self.force_exit };
        if self.conns.is_empty() {
            return true;
        }
        if !self.force_exit && Instant::now() < deadline {
            return false;
        }
        // Out of time: answer what is committed, refuse the rest, flush once and go.
        self.commit_all_blocking();
        let keys: Vec<(usize, u32)> = self.conns.iter().map(|(k, c)| (k, c.generation)).collect();
        for (key, generation) in keys {
            let Server { conns, bufs, bodies, ids, cfg, wall_us, accepting, .. } = self;
            let Some(conn) = conns.get_mut(key) else { continue };
            if let Some(out) = conn.make_reply_room(bufs).then_some(conn.output.as_mut()).flatten() {
                let mut ctx = Ctx { cfg: &cfg.session, bodies, ids, now_unix_us: *wall_us, accepting: *accepting };
                conn.session.handle_shutdown(&mut ctx, true, out);
            }
            conn.closing = true;
            conn.writable = true;
            let _ = conn.flush(&mut self.bufs);
            self.close(key, "shutdown");
            let _ = generation;
        }
        true
    }
}

/// RFC 5321 §4.5.3.1 client timeouts, each capped at `cap` (`--smtp-timeout`), and the
/// STARTTLS handshake's (`--tls-handshake-timeout`, as for inbound handshakes).
fn capped_timeouts(cap: Duration, tls_handshake: Duration) -> ClientTimeouts {
    let d = ClientTimeouts::default();
    ClientTimeouts {
        greeting: d.greeting.min(cap),
        command: d.command.min(cap),
        data_init: d.data_init.min(cap),
        data_block: d.data_block.min(cap),
        data_end: d.data_end.min(cap),
        tls_handshake,
    }
}

/// The pace limits from the flags.
fn pace_limits(cfg: &Config) -> PaceLimits {
    PaceLimits { command: cfg.command_timeout, data: cfg.data_timeout, min_data_rate: cfg.min_data_rate }
}

/// Arms a timer entry for `conn.deadline` when there is no live one or it is earlier than the
/// live one (the heap keeps one live entry per connection; a later deadline is picked up when
/// that entry pops).
fn arm_deadline(timers: &mut timer::Timers, conn: &mut InboundConn, key: usize) {
    if conn.timer_at.is_none_or(|t| conn.deadline < t) {
        timers.arm(conn.deadline, key, conn.generation);
        conn.timer_at = Some(conn.deadline);
    }
}

/// Logs a finished handshake and tells the session which version and cipher it got (called
/// once, on the read that ends the handshake).
fn announce_tls(conn: &mut InboundConn, log: &mut Logger) {
    if let Some(info) = conn.tls.as_ref().and_then(|t| t.info()) {
        conn.session.set_tls_info(info.version, info.cipher);
        log.event(
            "tls",
            &[("client", V::D(&conn.peer)), ("version", V::S(info.version)), ("cipher", V::S(info.cipher))],
        );
    }
}

fn trim_crlf(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\r\n").unwrap_or(b)
}
