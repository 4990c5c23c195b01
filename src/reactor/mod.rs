//! The event loop: one `mio::Poll` owning every socket, and the turn that orders the work.
//!
//! The reactor only dispatches: inbound sessions are driven by `net::inbound`, outbound
//! connections and DNS by `net::outbound` (which executes the pure `delivery::Engine`'s
//! actions), the group commit is the gate in [`commit`], password checks run on the
//! [`authwork`] thread under `smtp::auth_throttle`, DKIM signatures on the [`dkimwork`]
//! threads. Every timer of the loop is in one
//! `net::deadline` table keyed by token; step 5 fires them and hands delivery its own.
//!
//! # One turn
//! 1. `poll` for events (timeout: the next deadline, or zero when work is left over), then
//!    read the clock once: every decision of the turn uses that `now`.
//! 2. Dispatch: listeners are only marked; connections read, parse and append finished
//!    messages to the spool (not yet answered). With DKIM keys a finished message goes to
//!    the signing threads first (its body moved, not copied) and is appended in the turn its
//!    signature comes back (the waker).
//! 3. Group commit: one sync covers every message of the turn; only when it is back are their
//!    `250`s written into the output buffers (or `451` for all if the sync failed).
//! 4. Flush every connection with output: each pipelined batch of replies leaves in one write.
//! 5. Expire deadlines (`421 4.4.2`), then accept new connections, a bounded number per turn
//!    so that a connection flood cannot starve sessions already open.
//! 6. Trim the buffer pools: what a spike left unused for a whole period is freed.
//!
//! The clock is read elsewhere only to measure: the commit latency logged with each `250`
//! (`net::inbound` stamps the end of data, [`Server::release`] the commit's return).

pub mod auth;
pub mod authwork;
pub mod commit;
pub mod dkimwork;
pub mod signal;
pub mod syncer;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use mio::{Events, Interest, Poll};

use crate::buf::{BufPool, VecPool};
use crate::config::Config;
use crate::delivery::DeliveryConfig;
use crate::dkim::KeyTable;
use crate::log::{Logger, V};
use crate::message::IdGen;
use crate::net::control::{self, Control};
use crate::net::deadline::Deadlines;
use crate::net::inbound::{Answered, Inbound, InboundConfig, Turn, CHUNK};
use crate::net::outbound::{self as delivery, Outbound as Delivery, OutboundConfig};
use crate::net::socket;
use crate::net::tls::ServerTls;
use crate::net::token::{self, Kind};
use crate::queue::schedule::RetryPolicy;
use crate::smtp::client::ClientTimeouts;
use crate::smtp::client_limit::ConnectionLimiter;
use crate::spool::StoredMessage;
use crate::spool::{Spool, SpoolError, SpoolOptions};
use auth::AuthSide;
use authwork::AuthWorker;
use commit::{Batch, CommitGate};
use dkimwork::{DkimWorker, SignDone, SignJob};
use mio::Token;

/// Connections accepted per turn at most.
const ACCEPTS_PER_TURN: usize = 256;
/// How long accepting pauses after an error such as `EMFILE`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
    /// The control socket could not be made.
    Control(std::path::PathBuf, io::Error),
    /// An egress source's address cannot be used here (`EADDRNOTAVAIL`: not assigned to
    /// this host): (source name, address, error).
    Source(String, std::net::IpAddr, io::Error),
    /// `--require-fcrdns` and a source failed its FCrDNS check: (source name, why).
    Fcrdns(String, String),
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
            RunError::Control(p, e) => write!(f, "control socket {}: {e}", p.display()),
            RunError::Source(n, ip, e) => {
                write!(f, "--source {n}={ip}: cannot send from {ip}: {e} (is the address assigned to this host?)")
            }
            RunError::Fcrdns(n, why) => {
                write!(f, "--require-fcrdns: source {n} fails forward-confirmed reverse DNS: {why}")
            }
        }
    }
}

impl std::error::Error for RunError {}

/// Time allowed for each query of a source's FCrDNS check (sent at most twice).
const FCRDNS_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The start-up FCrDNS check of every egress source (receivers check that the PTR name of a
/// sending IP resolves back to it), through `--dns` with the relay's own DNS code, one line
/// each: `event=source_check source=… ip=… ptr=… ok=true|false`. Blocking, before the loop
/// runs. With `--require-fcrdns` a failure stops the start.
fn check_sources(cfg: &Config, log: &mut Logger) -> Result<(), RunError> {
    for src in cfg.sources.list() {
        let v = crate::net::dns::fcrdns_blocking(cfg.dns, src.ip, FCRDNS_QUERY_TIMEOUT);
        let ehlo = src.ehlo.as_deref().unwrap_or(&cfg.hostname);
        let mut fields = vec![
            ("source", V::S(&src.name)),
            ("ip", V::D(&src.ip)),
            ("ptr", V::S(v.ptr.as_deref().unwrap_or("-"))),
            ("ehlo", V::S(ehlo)),
            ("ok", V::S(if v.ok { "true" } else { "false" })),
        ];
        if let Some(e) = v.error {
            fields.push(("error", V::S(e)));
        }
        log.event("source_check", &fields);
        if v.ok && v.ptr.as_deref().is_some_and(|p| !p.eq_ignore_ascii_case(ehlo)) {
            log.event(
                "warning",
                &[
                    ("source", V::S(&src.name)),
                    ("detail", V::S("the EHLO name is not the PTR name of the source's IP")),
                ],
            );
        }
        if !v.ok && cfg.require_fcrdns {
            log.flush();
            let why =
                format!("{} ({}, PTR {})", v.error.unwrap_or("failed"), src.ip, v.ptr.as_deref().unwrap_or("none"));
            return Err(RunError::Fcrdns(src.name.to_string(), why));
        }
    }
    log.flush();
    Ok(())
}

/// The relay's loop and everything it owns.
pub struct Server {
    poll: Poll,
    cfg: Config,
    listeners: Vec<Listener>,
    /// Inbound sessions and their driver.
    inbound: Inbound,
    bufs: BufPool,
    bodies: VecPool,
    ids: IdGen,
    spool: Spool,
    log: Logger,
    signals: signal::SignalSource,
    /// Appended messages wait here for their group commit.
    gate: CommitGate,
    /// The one deadline table: inbound sessions, outbound connections, the delivery engine,
    /// DNS.
    deadlines: Deadlines<Token>,
    delivery: Delivery,
    /// The control socket (`sluice queue suspend|resume|bounce|summary|suspensions`).
    control: Control,
    shutdown: Option<Instant>,
    force_exit: bool,
    accept_retry: Option<Instant>,
    /// The turn's clock, read once per turn.
    now: Instant,
    wall_us: u64,
    /// Password checks: the worker thread and the throttle ordering them.
    auth: AuthSide,
    /// The spool has room for new mail (see `Spool::accepting`), read once per turn.
    accepting: bool,
    /// What the inbound driver needs of `cfg`.
    inbound_cfg: InboundConfig,
    /// DKIM keys (`None`: no signing), replaced on SIGHUP.
    dkim_keys: Option<Arc<KeyTable>>,
    /// Messages the sessions finished this turn, to hand to the signing threads.
    sign_jobs: Vec<SignJob>,
    /// Signed messages taken from the threads (kept for its capacity).
    signed: Vec<SignDone>,
    /// The signing threads (with keys only).
    dkim: Option<DkimWorker>,
}

/// Borrows what the inbound driver needs for one call out of the server, beside the driver
/// itself and delivery (which the commit release also feeds). A macro, not a method: a method
/// returning the borrows would hold all of `self`, and the three must be borrowed apart.
macro_rules! turn {
    ($s:expr, $inbound:ident, $turn:ident, $delivery:ident) => {
        let Server {
            inbound: $inbound,
            delivery: $delivery,
            inbound_cfg: cfg,
            bufs,
            bodies,
            ids,
            spool,
            log,
            poll,
            gate,
            auth,
            deadlines,
            now,
            wall_us,
            accepting,
            shutdown,
            dkim_keys,
            sign_jobs,
            ..
        } = $s;
        #[allow(unused_mut)]
        let mut $turn = Turn {
            cfg,
            bufs,
            bodies,
            ids,
            spool,
            log,
            registry: poll.registry(),
            waiting: gate.queue(),
            auth_enabled: auth.enabled(),
            auth: &mut auth.throttle,
            deadlines,
            now: *now,
            wall_us: *wall_us,
            accepting: *accepting,
            dkim_keys: dkim_keys.as_ref(),
            sign_jobs,
            shutdown: shutdown.is_some(),
        };
        let _ = &$delivery;
    };
}

impl Server {
    /// Opens the spool (recovering it) and binds every listener.
    pub fn bind(cfg: Config) -> Result<Server, RunError> {
        let mut log = Logger::new(cfg.log_format);
        match socket::raise_nofile_limit() {
            Ok(n) => log.event("limits", &[("nofile", V::N(n))]),
            Err(e) => log.event("limits", &[("error", V::D(&e))]),
        }
        // Every source's address must be ours: a source that cannot bind would otherwise be a
        // stream of failed connects for every message it is chosen for.
        for src in cfg.sources.list() {
            socket::check_local(src.ip).map_err(|e| RunError::Source(src.name.to_string(), src.ip, e))?;
        }
        check_sources(&cfg, &mut log)?;
        let opts = SpoolOptions {
            dir: cfg.spool.clone(),
            fsync: cfg.fsync,
            segment_size: cfg.segment_size.max(cfg.session.max_message_size + (1 << 20)),
            min_free_space: cfg.min_free_space,
            spares: true,
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
        for (flag, detail) in &cfg.warnings {
            log.event("warning", &[("flag", V::S(flag)), ("detail", V::S(detail))]);
        }
        if !cfg.fsync {
            log.event(
                "warning",
                &[("detail", V::S("--fsync never: accepted mail is NOT durable; for benchmarks only"))],
            );
        }
        // The control socket is there before the first `listening` line: whoever waits for that
        // line can use `sluice queue` at once.
        let control = Control::bind(&cfg.spool, poll.registry())
            .map_err(|e| RunError::Control(cfg.spool.join(crate::control::SOCKET_NAME), e))?;
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
        let dkim = match &cfg.dkim {
            Some(d) => {
                let t = &d.table;
                log.event(
                    "dkim",
                    &[
                        ("keys", V::N(t.len() as u64)),
                        ("domains", V::N(t.domains() as u64)),
                        ("threads", V::N(d.threads as u64)),
                    ],
                );
                Some(DkimWorker::spawn(d.threads, waker.clone()).map_err(RunError::Poll)?)
            }
            None => None,
        };
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
                shaping: cfg.shaping.clone(),
                // `--relay-tls` (implied by `--relay-auth-file`) overrides every other TLS mode.
                relay_tls: cfg.relay_tls.map(Into::into),
                sources: Arc::clone(&cfg.sources),
            },
            OutboundConfig {
                timeouts: capped_timeouts(cfg.smtp_timeout, cfg.tls_handshake_timeout),
                tls: cfg.client_tls.clone(),
                verified: cfg.client_tls_verified.clone(),
                auth: cfg.relay_auth.clone(),
                own: listeners.iter().map(|l| l.addr).collect(),
            },
            dns,
        );
        let mut server = Server {
            control,
            poll,
            listeners,
            inbound: Inbound::new(
                cfg.tls.as_ref().map(|(_, _, t)| t.clone()),
                ConnectionLimiter::new(cfg.client_limits),
            ),
            bufs: BufPool::new(CHUNK, limit),
            bodies: VecPool::new(1 << 20),
            ids,
            spool,
            log,
            signals,
            gate: CommitGate::new(syncer),
            deadlines: Deadlines::default(),
            shutdown: None,
            force_exit: false,
            accept_retry: None,
            now: Instant::now(),
            wall_us: 0,
            delivery,
            auth: AuthSide::new(auth),
            accepting: true,
            inbound_cfg: cfg.inbound(),
            dkim_keys: cfg.dkim.as_ref().map(|d| Arc::clone(&d.table)),
            sign_jobs: Vec::new(),
            signed: Vec::new(),
            dkim,
            cfg,
        };
        server.tick();
        // Suspensions first: recovered mail for a suspended destination gets no connection.
        server.restore_suspensions();
        server.enqueue_recovered(&recovery.messages);
        Ok(server)
    }

    /// Hands recovered messages (or durable ones whose session left) to the delivery queue,
    /// then puts delivery's deadlines in the table: a deferred message's retry must wake the
    /// loop even when no socket ever does.
    fn enqueue_recovered(&mut self, messages: &[StoredMessage]) {
        let hold = self.cfg.hold;
        self.with_delivery(|d, ctx| {
            for rec in messages {
                d.enqueue(ctx, rec);
            }
            if !hold {
                d.end_pass(ctx);
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
            self.before_sleep();
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(RunError::Poll(e));
                }
            }
            // 1. The one clock reading of the turn.
            self.tick();
            // Sessions that spent their budget last turn go first: they were promised a go.
            {
                turn!(&mut self, inbound, turn, delivery);
                inbound.drive_again(&mut turn);
            }
            // Signatures taken in before the poll (see `before_sleep`).
            if !self.signed.is_empty() {
                self.on_signed();
            }
            // 2. Dispatch.
            for ev in events.iter() {
                match token::split(ev.token()) {
                    Some((Kind::Listener, _, i)) => {
                        if let Some(l) = self.listeners.get_mut(i) {
                            l.pending = true;
                        }
                    }
                    Some((Kind::Signal, _, _)) => self.on_signal(),
                    // One waker serves the sync thread, the AUTH worker and the DKIM
                    // threads: ask all three. The finished batch's answers first, then the
                    // signed messages, so that they are in the sync that starts next.
                    Some((Kind::Waker, _, _)) => {
                        self.on_sync_done();
                        self.on_signed();
                        self.commit();
                        self.on_auth_done();
                    }
                    Some((kind @ (Kind::Outbound | Kind::Dns), generation, key)) => {
                        self.with_delivery(|d, ctx| d.on_event(ctx, kind, generation, key, ev));
                    }
                    Some((Kind::Inbound, generation, key)) => {
                        turn!(&mut self, inbound, turn, delivery);
                        inbound.on_event(key, generation, ev, &mut turn);
                    }
                    Some((Kind::Control, generation, key)) => {
                        self.control.on_event(generation, key, self.poll.registry(), &mut self.deadlines, self.now);
                    }
                    _ => {}
                }
                // A session may have queued an AUTH check: the worker takes it at once.
                self.pump_auth();
            }
            // Messages that ended this turn go to the signing threads.
            self.pump_dkim();
            // Control requests read in full this turn are answered now.
            self.serve_control();
            // 3. Group commit of what this turn appended (released when the sync is back, or
            // at once with `--fsync never`).
            self.commit();
            self.pump_auth();
            // Failed seals and unlinks while reclaiming have nowhere else to be reported.
            for w in self.spool.take_warnings() {
                self.log.event("spool_warning", &[("detail", V::S(&w))]);
            }
            self.pump_delivery();
            // 4. Flush replies, 5. fire deadlines, then accept.
            let expired_control = {
                // Delivery's tokens are never armed under --hold (nothing delivers).
                let hold = self.cfg.hold;
                turn!(&mut self, inbound, turn, delivery);
                inbound.flush_dirty(&mut turn);
                let (ctl, others): (Vec<Token>, Vec<Token>) = inbound
                    .expire(&mut turn)
                    .into_iter()
                    .partition(|&tok| matches!(token::split(tok), Some((Kind::Control, _, _))));
                if !others.is_empty() && !hold {
                    delivery.on_deadlines(&mut delivery_ctx(&mut turn), &others);
                }
                ctl
            };
            for tok in expired_control {
                self.control.expire(tok, self.poll.registry(), &mut self.deadlines);
            }
            self.pump_auth();
            if self.accept_retry.is_some_and(|t| t <= self.now) {
                self.accept_retry = None;
            }
            self.accept();
            // 6. Buffers unused for a whole period after a spike go back to the allocator.
            self.bufs.trim(self.now);
            self.bodies.trim(self.now);
            self.log.flush();
            if self.shutdown_done() {
                // Nothing committed goes unanswered: wait for the sync, flush the last replies.
                self.commit_all_blocking();
                turn!(&mut self, inbound, turn, delivery);
                inbound.flush_dirty(&mut turn);
                turn.log.event("stopped", &[("open_sessions", V::N(inbound.len() as u64))]);
                turn.log.flush();
                return Ok(());
            }
        }
    }

    /// Answers the control requests read in full: each one is served against the delivery
    /// engine (whose actions run at once), then its answer is written.
    fn serve_control(&mut self) {
        for (key, generation, req) in self.control.take_requests() {
            let Server { delivery, control, spool, log, ids, bufs, poll, deadlines, now, wall_us, cfg, .. } = self;
            let registry = poll.registry();
            let mut ctx =
                delivery::Ctx { spool, log, ids, bufs, registry, deadlines, now: *now, wall_ms: *wall_us / 1000 };
            let answer = match req {
                Ok(req) => control::serve(req, delivery, &mut ctx, &cfg.spool),
                Err(e) => crate::control::Answer::Failed(e.to_string()),
            };
            control.answer(key, generation, &answer, registry, ctx.deadlines);
        }
    }

    /// Re-applies the suspensions an operator set before the last stop (`DIR/suspensions`).
    fn restore_suspensions(&mut self) {
        let dir = self.cfg.spool.clone();
        self.with_delivery(|d, ctx| control::restore(d, ctx, &dir));
    }

    fn pump_delivery(&mut self) {
        if self.cfg.hold {
            return;
        }
        self.with_delivery(|d, ctx| d.pump(ctx));
    }

    /// Runs `f` on the delivery engine with a context borrowed from the loop's other parts.
    fn with_delivery<R>(&mut self, f: impl FnOnce(&mut Delivery, &mut delivery::Ctx<'_>) -> R) -> R {
        let Server { delivery, spool, log, ids, bufs, poll, deadlines, now, wall_us, .. } = self;
        let registry = poll.registry();
        let mut ctx = delivery::Ctx { spool, log, ids, bufs, registry, deadlines, now: *now, wall_ms: *wall_us / 1000 };
        f(delivery, &mut ctx)
    }

    /// Reads the clock for the turn.
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

    /// How long the next `poll` may sleep: zero when work is left over, else until the
    /// earliest deadline (computed from the turn's `now`).
    fn poll_timeout(&self) -> Option<Duration> {
        if self.inbound.has_again() || self.gate.due(&self.spool) || !self.signed.is_empty() {
            return Some(Duration::ZERO);
        }
        if self.listeners.iter().any(|l| l.pending) && self.accept_retry.is_none() && self.shutdown.is_none() {
            return Some(Duration::ZERO);
        }
        if self.delivery.has_work() && !self.cfg.hold || self.control.has_pending() {
            return Some(Duration::ZERO);
        }
        let now = self.now;
        // Delivery's timers are in the table only while it runs (not under --hold).
        let mut next = self.deadlines.next();
        // The pools' trims too: an idle relay must still wake to give a spike's memory back.
        let trims = [self.bufs.next_trim(), self.bodies.next_trim()];
        for t in [self.shutdown, self.accept_retry].into_iter().chain(trims).flatten() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    /// Tells the signing threads whether a sync is out before the loop sleeps: while one is,
    /// a finished signature need not wake the loop, since the sync's end will, and the
    /// signed message could not join that sync anyway (it goes in the next one, started at
    /// that wake-up). With none out, the results a thread sent before it saw that are
    /// taken in now (they will not wake the loop) and handled at the top of the next turn.
    fn before_sleep(&mut self) {
        let Some(worker) = self.dkim.as_mut() else { return };
        let syncing = self.gate.syncing();
        worker.set_sync_out(syncing);
        if !syncing {
            worker.try_results(&mut self.signed);
        }
    }

    /// Starts a group commit of what the turn appended (see [`CommitGate::start`]).
    fn commit(&mut self) {
        if let Some(batch) = self.gate.start(&mut self.spool, &mut self.log) {
            self.release(batch);
        }
    }

    /// The sync thread is back: release its batch (the caller starts the next one).
    fn on_sync_done(&mut self) {
        while let Some(batch) = self.gate.take_synced(&mut self.spool, &mut self.log) {
            self.release(batch);
        }
    }

    /// Waits for the sync in flight and commits what is left, synchronously (shutdown only).
    fn commit_all_blocking(&mut self) {
        for batch in self.gate.drain_blocking(&mut self.spool, &mut self.log).into_iter().flatten() {
            self.release(batch);
        }
    }

    /// A batch is out of the gate: its durable messages go to delivery (whether or not their
    /// client is still there), every session gets its `250` (or `451`), then the sessions go
    /// on with what they pipelined behind the message.
    fn release(&mut self, batch: Batch) {
        // A measurement: the commit latency logged with each 250 ends here.
        let committed_at = Instant::now();
        let mut accepted = Vec::new();
        {
            turn!(self, inbound, turn, delivery);
            for w in &batch.waiters {
                // A waiter already queued is durable from an earlier commit: whatever this
                // batch's fate, its answer is the 250 (a 451 would make the client send it
                // twice).
                let result = if w.queued { Ok(()) } else { batch.result };
                if result.is_ok() && !w.queued {
                    let rec = StoredMessage {
                        id: w.id,
                        loc: w.loc,
                        arrival_ms: w.arrival_ms,
                        rcpts: Vec::new(),
                        pins: Default::default(),
                    };
                    // With the session's envelope when it still has it, else decoded from
                    // the spool.
                    match inbound.waiting_envelope(w) {
                        Some(env) => {
                            delivery.enqueue_with(&mut delivery_ctx(&mut turn), &rec, env);
                        }
                        None => accepted.push(rec),
                    }
                }
                let answered = inbound.answer_committed(w, result, committed_at, &mut turn);
                debug_assert!(answered != Answered::Later || result.is_ok());
            }
        }
        if !accepted.is_empty() {
            self.enqueue_recovered(&accepted);
        }
        // Pipelined commands behind the message can go on now.
        turn!(self, inbound, turn, delivery);
        for w in batch.waiters {
            inbound.drive_checked(w.key, w.generation, &mut turn);
        }
    }

    /// Verdicts back from the AUTH worker: answered at once, or held back until the
    /// throttle's delay for a failure; then the worker gets its next check.
    fn on_auth_done(&mut self) {
        let inbound = &self.inbound;
        let answers = self.auth.take_verdicts(self.now, |k, g| inbound.peer(k, g), &mut self.log);
        for a in answers {
            match a.at {
                Some(at) => self.inbound.delay_auth(a.key, a.outcome, a.creds, at, &mut self.deadlines),
                None => {
                    turn!(self, inbound, turn, delivery);
                    inbound.answer_auth(a.key, a.outcome, a.creds, &mut turn);
                }
            }
        }
        self.inbound.take_auth_queued();
        let inbound = &self.inbound;
        self.auth.pump(|k, g| inbound.is_live(k, g));
    }

    /// Hands the messages the sessions finished to the signing threads (never blocking: what
    /// the threads cannot take yet waits in the worker's backlog).
    fn pump_dkim(&mut self) {
        if self.sign_jobs.is_empty() {
            return;
        }
        match self.dkim.as_mut() {
            Some(w) => w.submit(&mut self.sign_jobs),
            // Keys without threads cannot happen (both come from the same flags).
            None => self.sign_jobs.clear(),
        }
    }

    /// Signed messages back from the threads: each is stored with its signature and waits
    /// for this turn's group commit.
    fn on_signed(&mut self) {
        let Some(worker) = self.dkim.as_mut() else { return };
        worker.try_results(&mut self.signed);
        let mut signed = std::mem::take(&mut self.signed);
        for done in signed.drain(..) {
            turn!(self, inbound, turn, delivery);
            inbound.store_signed(done, &mut turn);
        }
        self.signed = signed;
        // A refused message lets its session go on, which may end another message.
        self.pump_dkim();
    }

    /// After the inbound driver ran: if a session queued an AUTH check, the worker may take
    /// one.
    fn pump_auth(&mut self) {
        if self.inbound.take_auth_queued() {
            let inbound = &self.inbound;
            self.auth.pump(|k, g| inbound.is_live(k, g));
        }
    }

    fn accept(&mut self) {
        if self.control.has_pending() {
            self.control.accept(self.poll.registry(), &mut self.deadlines, self.now);
        }
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
                        turn!(self, inbound, turn, delivery);
                        inbound.admit(sock, peer, tls, &mut turn);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.listeners[i].pending = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        self.log.event("accept_error", &[("error", V::D(&e))]);
                        self.accept_retry = Some(self.now + ACCEPT_BACKOFF);
                        return;
                    }
                }
            }
        }
        turn!(self, inbound, turn, delivery);
        inbound.flush_dirty(&mut turn);
    }

    fn on_signal(&mut self) {
        let signal::Received { stop: n, hup, flush } = self.signals.drain();
        if hup > 0 {
            self.reload_tls();
            self.reload_shaping();
            self.reload_dkim();
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
        self.log.event("shutdown", &[("mode", V::S("graceful")), ("sessions", V::N(self.inbound.len() as u64))]);
        self.shutdown = Some(self.now + self.cfg.shutdown_grace);
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l.sock);
        }
        turn!(self, inbound, turn, delivery);
        inbound.drive_all(&mut turn);
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
                self.inbound.set_tls(t);
                self.log.event("reload", &[("tls", V::S("ok")), ("cert", V::D(&cert.display()))]);
            }
            Err(e) => self.log.event("reload", &[("tls", V::S("failed, keeping the old pair")), ("error", V::D(&e))]),
        }
    }

    /// SIGHUP: reads the shaping file again (limits apply at once); a file that does not load,
    /// or that asks for `verify` without a CA bundle loaded at start, keeps the rules in force.
    fn reload_shaping(&mut self) {
        let loaded = crate::config::load_shaping(self.cfg.shaping_file.as_deref(), self.cfg.builtin_shaping);
        let loaded = loaded.map_err(|e| e.message).and_then(|rules| {
            if rules.uses_verify() && self.cfg.client_tls_verified.is_none() {
                Err("tls = \"verify\" needs a restart (the CA bundle is loaded at start)".to_owned())
            } else {
                Ok(rules)
            }
        });
        match loaded {
            Ok(rules) => {
                let (providers, rules_n) = (rules.providers.len(), rules.automation.len());
                self.with_delivery(|d, ctx| d.set_rules(ctx, rules));
                self.log.event(
                    "reload",
                    &[
                        ("shaping", V::S("ok")),
                        ("providers", V::N(providers as u64)),
                        ("automation", V::N(rules_n as u64)),
                    ],
                );
            }
            Err(e) => self
                .log
                .event("reload", &[("shaping", V::S("failed, keeping the rules in force")), ("error", V::S(&e))]),
        }
    }

    /// SIGHUP: reads the DKIM keys again (`--dkim-key` files and `--dkim-dir`). Messages
    /// already handed to the threads keep the keys they were given; a key that does not
    /// load is logged and the old table stays whole.
    fn reload_dkim(&mut self) {
        let Some(d) = &self.cfg.dkim else { return };
        match crate::config::load_dkim(&d.keys, d.dir.as_deref()) {
            Ok(t) => {
                self.log.event(
                    "reload",
                    &[("dkim", V::S("ok")), ("keys", V::N(t.len() as u64)), ("domains", V::N(t.domains() as u64))],
                );
                self.dkim_keys = Some(Arc::new(t));
            }
            Err(e) => self.log.event("reload", &[("dkim", V::S("failed, keeping the old keys")), ("error", V::D(&e))]),
        }
    }

    /// After a signal: true once every session is gone, or the grace period is over (then the
    /// remaining sessions get `421` and the spool is committed first).
    fn shutdown_done(&mut self) -> bool {
        let Some(deadline) = self.shutdown else { return self.force_exit };
        if self.inbound.is_empty() {
            return true;
        }
        if !self.force_exit && self.now < deadline {
            return false;
        }
        // Out of time: answer what is committed, refuse the rest, flush once and go.
        self.commit_all_blocking();
        turn!(self, inbound, turn, delivery);
        inbound.close_all(&mut turn);
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

/// Delivery's view of a turn.
fn delivery_ctx<'t>(turn: &'t mut Turn<'_>) -> delivery::Ctx<'t> {
    delivery::Ctx {
        spool: turn.spool,
        log: turn.log,
        ids: turn.ids,
        bufs: turn.bufs,
        registry: turn.registry,
        deadlines: turn.deadlines,
        now: turn.now,
        wall_ms: turn.wall_us / 1000,
    }
}
