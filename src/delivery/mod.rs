//! Outbound delivery on the relay's loop: per-destination routes and connection pools, domain
//! concurrency, connection reuse, outcomes written to the spool, retries and bounces.
//!
//! # Flow
//! A committed message enters the [`Queue`]; each destination with ready work gets a route (the
//! relay host, an address literal, or MX records from the resolver) and up to
//! `--domain-concurrency` connections. A connection that becomes ready takes the next ready
//! message for its destination (connection reuse) and carries all of that message's
//! recipients for the destination in one transaction. Each recipient's outcome is appended to
//! the spool before it counts; deferred recipients wait in the due queue; failed ones produce a
//! DSN to the sender (never for the null sender), queued and delivered like any message.
//!
//! # TLS (`--outbound-tls`, RFC 3207)
//! Each connection gets a [`TlsPolicy`]: `none` never asks; `may` uses STARTTLS when offered
//! without checking the certificate, and when the handshake fails reconnects at once in
//! plaintext to the same address (Postfix's `may`), remembering the address for a while;
//! `encrypt` and `verify` (certificate checked against `--tls-ca-file` for the MX host name)
//! treat a missing STARTTLS, a refusal or a failed handshake as a 4.7.x failure of that host.
//! Attempt log lines carry `tls=TLSv1.x` or `tls=none`.

pub mod route;

use crate::cli::OutboundTlsMode;
use crate::net::tls::ClientTls;
use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::task::Poll;
use std::time::{Duration, Instant};

use mio::{Interest, Registry};
use slab::Slab;

use crate::buf::BufPool;
use crate::dns::resolver::{DnsError, MxHost, MxPlan, Resolver};
use crate::dsn::{self, Action, DsnInput, DsnRecipient};
use crate::log::{Logger, V};
use crate::message::{Envelope, IdGen, QueueId};
use crate::net::dns::DnsConn;
use crate::net::outbound::{new_conn, ActiveJob, Io, OutboundConn};
use crate::net::token::{self, Kind};
use crate::queue::schedule::{NextStep, RetryPolicy};
use crate::queue::{DestId, Job, Queue};
use crate::smtp::client::{
    ClientConfig, ClientEvent, ClientSession, ClientTimeouts, Failure, TlsPolicy, TxRcpt, TxSpec,
};
use crate::smtp::reply::Reply;
use crate::spool::{Outcome, Spool, StoredMessage};
use route::{rcpt_outcome, status_code, synthetic, verdict, Verdict};

/// Transactions on one connection before it says QUIT.
const MAX_TRANSACTIONS_PER_CONN: u32 = 1000;
/// How long an idle connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff after every address of a destination failed to connect.
const DEST_BACKOFF_MS: u64 = 30_000;
/// How long an address whose TLS handshake failed under `may` is spoken to in plaintext only.
const TLS_BROKEN_MS: u64 = 10 * 60_000;
/// Addresses remembered with a broken handshake, at most.
const TLS_BROKEN_MAX: usize = 10_000;
/// Jobs given a verdict without an attempt per destination and pass (see `settle_ready`).
const SETTLE_PER_PASS: usize = 1024;
/// When a recipient whose bounce could not be stored is tried again (at the latest).
const BOUNCE_RETRY: Duration = Duration::from_secs(60);
/// Pause of new connections after a local shortage (EMFILE, ENFILE, EADDRNOTAVAIL, ENOBUFS).
const LOCAL_PAUSE: Duration = Duration::from_millis(200);

/// Whether a failure of recipient `i` of `env` is reported in a DSN (RFC 3461 NOTIFY); false
/// for an index the envelope does not have.
fn wants_dsn(env: &Envelope, i: u32) -> bool {
    (i as usize) < env.rcpt_count() && dsn::notify_wants(env.rcpt(i as usize).notify, Action::Failed)
}

/// A connect that failed for lack of a local resource, not because of the destination.
fn is_local_shortage(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::EADDRNOTAVAIL | libc::ENOBUFS | libc::ENOMEM))
}

/// Delivery settings from the command line.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// `--relay-host`: (host, port).
    pub relay_host: Option<(String, u16)>,
    /// `--smtp-port`.
    pub smtp_port: u16,
    /// `--domain-concurrency`.
    pub domain_concurrency: u32,
    /// Retry schedule and lifetime.
    pub policy: RetryPolicy,
    /// Our name in EHLO, DSNs.
    pub hostname: String,
    /// Client timeouts.
    pub timeouts: ClientTimeouts,
    /// Time allowed for a TCP connect.
    pub connect_timeout: Duration,
    /// `--outbound-tls`.
    pub tls_mode: OutboundTlsMode,
    /// TLS client settings (None when the mode is `none`).
    pub tls: Option<ClientTls>,
    /// Our own listening addresses: a mail exchanger there is this relay (mail loop).
    pub own: Vec<SocketAddr>,
}

/// How to reach a destination.
#[derive(Debug)]
enum Route {
    /// Not looked up yet.
    Unknown,
    /// A lookup is under way.
    Resolving,
    /// Addresses in the order to try, with their host names.
    Ready { addrs: Vec<(Box<str>, SocketAddr)>, until_ms: u64 },
    /// The lookup failed.
    Failed { reply: Reply, permanent: bool, until_ms: u64 },
}

struct DestState {
    route: Route,
    /// Connections open or opening.
    conns: u32,
    /// Of those, connections not ready yet (connecting, greeting, EHLO, STARTTLS): each will
    /// take a ready job, so they count against the jobs that still need a connection.
    opening: u32,
    /// Connections ready and without work.
    idle: Vec<(usize, u32)>,
    /// Address to connect to next: the first (most preferred) until it fails, then the next
    /// one (RFC 5321 §5.1: backup MX hosts only when the better ones do not answer).
    next_addr: usize,
    /// Consecutive connect failures.
    failures: usize,
    /// No new connection before this time (Unix ms): every address just failed.
    backoff_until_ms: u64,
    /// Why (the last connection failure), given to work that arrives meanwhile.
    backoff_reply: Option<Reply>,
}

/// What the delivery side needs from the loop for one call.
pub struct Ctx<'a> {
    /// The spool (outcome records, bounce messages, bodies).
    pub spool: &'a mut Spool,
    /// Event log.
    pub log: &'a mut Logger,
    /// Queue ids for bounces.
    pub ids: &'a mut IdGen,
    /// Buffers.
    pub bufs: &'a mut BufPool,
    /// Registry for new sockets.
    pub registry: &'a Registry,
    /// Monotonic now.
    pub now: Instant,
    /// Wall clock, Unix ms.
    pub wall_ms: u64,
}

/// The delivery engine.
pub struct Delivery {
    cfg: DeliveryConfig,
    /// The queue of undelivered recipients.
    pub queue: Queue,
    dests: Vec<DestState>,
    conns: Slab<OutboundConn>,
    generation: u32,
    dns: Option<DnsConn>,
    /// Destinations waiting for a lookup, by the resolver's canonical name.
    lookups: HashMap<String, Vec<DestId>>,
    /// Connections that spent their per-call budget with work left (edge-triggered readiness
    /// will not call again): driven on the next pass.
    again: Vec<(usize, u32)>,
    next_sweep: Instant,
    /// Addresses whose TLS handshake failed under `may`, until (Unix ms): plaintext only.
    tls_broken: HashMap<SocketAddr, u64>,
    /// Whether an address is one of this machine's (asked once per address, for listeners on
    /// a wildcard address).
    local_ips: HashMap<IpAddr, bool>,
    /// New connections wait until then (this host ran out of sockets or ports).
    local_pause_until: Option<Instant>,
}

impl Delivery {
    /// A delivery engine; `dns` is the resolver connection (None with a relay host that is an
    /// IP address, where no lookup is ever needed).
    pub fn new(cfg: DeliveryConfig, dns: Option<DnsConn>) -> Delivery {
        let queue = Queue::new(cfg.relay_host.as_ref().map(|(h, _)| h.as_str()), &cfg.hostname);
        Delivery {
            cfg,
            queue,
            dests: Vec::new(),
            conns: Slab::new(),
            generation: 0,
            dns,
            lookups: HashMap::new(),
            again: Vec::new(),
            next_sweep: Instant::now(),
            tls_broken: HashMap::new(),
            local_ips: HashMap::new(),
            local_pause_until: None,
        }
    }

    fn dest_state(&mut self, dest: DestId) -> &mut DestState {
        while self.dests.len() <= dest as usize {
            self.dests.push(DestState {
                route: Route::Unknown,
                conns: 0,
                opening: 0,
                idle: Vec::new(),
                next_addr: 0,
                failures: 0,
                backoff_until_ms: 0,
                backoff_reply: None,
            });
        }
        &mut self.dests[dest as usize]
    }

    /// Queues a message that was just committed (or recovered).
    pub fn enqueue(&mut self, ctx: &mut Ctx<'_>, rec: &StoredMessage) {
        let env = match ctx.spool.message(rec.loc) {
            Ok(view) => view.envelope,
            Err(e) => {
                ctx.log.event("spool_error", &[("id", V::D(&rec.id)), ("error", V::D(&e))]);
                return;
            }
        };
        self.enqueue_with(ctx, rec, &env);
    }

    /// Queues a message whose envelope the caller already has (the session that received it),
    /// saving a decode of the record.
    pub fn enqueue_with(&mut self, ctx: &mut Ctx<'_>, rec: &StoredMessage, env: &Envelope) {
        if self.queue.insert(rec, env, ctx.wall_ms).is_none() {
            ctx.spool.release_message(rec.loc.segment, rec.pins.clone());
        }
    }

    /// The earliest time something here needs attention.
    pub fn next_deadline(&self, now: Instant, wall_ms: u64) -> Option<Instant> {
        let mut next = self.dns.as_ref().and_then(|d| d.next_deadline());
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if let Some(due) = self.queue.next_due() {
            consider(now + Duration::from_millis(due.saturating_sub(wall_ms)));
        }
        if !self.conns.is_empty() {
            consider(self.next_sweep);
        }
        if let Some(t) = self.local_pause_until {
            consider(t);
        }
        next
    }

    /// True when ready work could be started now (the loop should not sleep).
    pub fn has_work(&self) -> bool {
        (self.queue.has_wanting() && self.local_pause_until.is_none()) || !self.again.is_empty()
    }

    /// One pass: due retries, DNS results, new connections and jobs, timeouts.
    pub fn pump(&mut self, ctx: &mut Ctx<'_>) {
        self.queue.promote_due(ctx.wall_ms);
        self.dns_results(ctx);
        for (key, generation) in std::mem::take(&mut self.again) {
            if self.conns.get(key).is_some_and(|c| c.generation == generation) {
                self.drive(ctx, key);
            }
        }
        if self.dns.as_ref().and_then(|d| d.next_deadline()).is_some_and(|t| t <= ctx.now) {
            if let Some(dns) = self.dns.as_mut() {
                dns.handle_timeout(ctx.now);
            }
            self.dns_results(ctx);
        }
        if self.local_pause_until.is_some_and(|t| ctx.now >= t) {
            self.local_pause_until = None;
        }
        if self.local_pause_until.is_none() {
            for dest in self.queue.take_wanting() {
                self.serve(ctx, dest);
            }
        }
        if ctx.now >= self.next_sweep {
            self.sweep(ctx);
            self.next_sweep = ctx.now + Duration::from_millis(200);
        }
        // Last, so that queries (and retries) made by anything above leave in this turn.
        if let Some(dns) = self.dns.as_mut() {
            dns.flush(ctx.now);
        }
    }

    /// Handles a readiness event for an outbound or DNS token.
    pub fn on_event(&mut self, ctx: &mut Ctx<'_>, kind: Kind, generation: u32, key: usize, ev: &mio::event::Event) {
        match kind {
            Kind::Dns => {
                if let Some(dns) = self.dns.as_mut() {
                    dns.on_event(key, ctx.now);
                }
                self.dns_results(ctx);
            }
            Kind::Outbound => {
                let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == generation) else { return };
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    conn.readable = true;
                }
                conn.hup |= ev.is_read_closed() || ev.is_error();
                if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                    conn.writable = true;
                }
                self.drive(ctx, key);
            }
            _ => {}
        }
    }

    fn dns_results(&mut self, ctx: &mut Ctx<'_>) {
        let Some(dns) = self.dns.as_mut() else { return };
        let mut done = Vec::new();
        while let Some(d) = dns.resolver_mut().poll_done() {
            done.push(d);
        }
        while let Some(d) = dns.resolver_mut().poll_host_done() {
            done.push(d);
        }
        for (name, result) in done {
            let Some(dests) = self.lookups.remove(&name) else { continue };
            for dest in dests {
                self.set_route(ctx, dest, &name, result.clone());
            }
        }
    }

    /// Turns a lookup result into the destination's route.
    fn set_route(&mut self, ctx: &mut Ctx<'_>, dest: DestId, name: &str, result: Result<MxPlan, DnsError>) {
        let port = self.cfg.relay_host.as_ref().map_or(self.cfg.smtp_port, |(_, p)| *p);
        let result = result.map(|plan| {
            let ours: Vec<IpAddr> =
                plan.hosts.iter().flat_map(|h| h.addrs.iter()).copied().filter(|&ip| self.is_self(ip, port)).collect();
            route::without_self(plan, &self.cfg.hostname, |ip| ours.contains(&ip))
        });
        let route = match result {
            Ok(None) => {
                // RFC 5321 §5.1: we are the best mail exchanger left, so there is nowhere to
                // send it (Postfix: "mail for X loops back to myself"). With a relay host it is
                // our configuration that is wrong: defer, never bounce.
                let text = format!("mail for {name} loops back to myself");
                ctx.log.event("route", &[("domain", V::S(name)), ("error", V::S(&text))]);
                Route::Failed {
                    reply: synthetic(554, (5, 4, 6), &text),
                    permanent: self.cfg.relay_host.is_none(),
                    until_ms: ctx.wall_ms + 60_000,
                }
            }
            Ok(Some(plan)) => {
                let addrs: Vec<(Box<str>, SocketAddr)> =
                    plan.addresses().map(|(host, ip)| (Box::from(host), SocketAddr::new(ip, port))).collect();
                Route::Ready { addrs, until_ms: ctx.wall_ms + 300_000 }
            }
            Err(e) => {
                let text = format!("DNS lookup for {name}: {}", e.text());
                ctx.log.event("dns", &[("domain", V::S(name)), ("error", V::S(&text))]);
                Route::Failed {
                    reply: synthetic(e.reply_code(), parse_enhanced(e.enhanced_code()), &text),
                    // A smarthost that does not resolve is our problem, not the recipient's:
                    // defer (as Postfix does for its relayhost), never bounce.
                    permanent: e.is_permanent() && self.cfg.relay_host.is_none(),
                    until_ms: ctx.wall_ms + 60_000,
                }
            }
        };
        let state = self.dest_state(dest);
        state.route = route;
        state.next_addr = 0;
        state.failures = 0;
        self.queue.want(dest);
    }

    /// True when `ip:port` is where this relay listens: a listener on that address, or on the
    /// wildcard address of its family while `ip` is one of this machine's (a socket can be
    /// bound to it).
    fn is_self(&mut self, ip: IpAddr, port: u16) -> bool {
        let mut wildcard = false;
        for l in self.cfg.own.iter().filter(|l| l.port() == port) {
            if l.ip() == ip {
                return true;
            }
            wildcard |= l.ip().is_unspecified() && l.is_ipv4() == ip.is_ipv4();
        }
        wildcard
            && *self
                .local_ips
                .entry(ip)
                .or_insert_with(|| ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok())
    }

    /// Starts what can be started for one destination.
    fn serve(&mut self, ctx: &mut Ctx<'_>, dest: DestId) {
        if self.local_pause_until.is_some_and(|t| ctx.now < t) {
            // Keep it wanted; `next_deadline` wakes the loop when the pause ends.
            self.queue.want(dest);
            return;
        }
        // Hand ready jobs to idle connections first (connection reuse).
        while self.queue.has_ready(dest) {
            let Some((key, generation)) = self.dest_state(dest).idle.pop() else { break };
            if self
                .conns
                .get(key)
                .is_some_and(|c| c.generation == generation && c.active.is_none() && c.session.is_ready())
            {
                self.take_job(ctx, key);
                // Send the new transaction's commands now: no socket event will ask for them.
                self.drive(ctx, key);
            }
        }
        if !self.queue.has_ready(dest) {
            return;
        }
        let limit = self.cfg.domain_concurrency;
        let wall_ms = ctx.wall_ms;
        let state = self.dest_state(dest);
        if wall_ms < state.backoff_until_ms {
            // The destination is down: like Postfix's "delivery temporarily suspended", work
            // arriving now is deferred with the last failure instead of hammering it again.
            let reply = state.backoff_reply.clone().unwrap_or_else(|| synthetic(451, (4, 4, 1), "destination down"));
            self.settle_ready(ctx, dest, Verdict::Deferred, &reply);
            return;
        }
        match &state.route {
            // Looked up again when it expires, even while connections are open (they go on;
            // new ones wait for the answer, usually from the resolver's cache).
            Route::Ready { until_ms, .. } | Route::Failed { until_ms, .. } if *until_ms <= wall_ms => {
                state.route = Route::Unknown;
            }
            _ => {}
        }
        match &self.dest_state(dest).route {
            Route::Unknown => self.resolve(ctx, dest),
            Route::Resolving => {}
            Route::Failed { reply, permanent, .. } => {
                let (reply, permanent) = (reply.clone(), *permanent);
                // Every ready job of this destination gets the DNS verdict.
                let outcome = if permanent { Verdict::Failed } else { Verdict::Deferred };
                self.settle_ready(ctx, dest, outcome, &reply);
            }
            Route::Ready { addrs, .. } => {
                if addrs.is_empty() {
                    return;
                }
                let ready = self.queue.dest(dest).ready.len() as u32;
                let state = &self.dests[dest as usize];
                let want = ready.saturating_sub(state.opening).min(limit.saturating_sub(state.conns));
                for _ in 0..want {
                    self.connect(ctx, dest);
                }
            }
        }
    }

    fn resolve(&mut self, ctx: &mut Ctx<'_>, dest: DestId) {
        let name = self.queue.dest(dest).name.to_string();
        let Some(dns) = self.dns.as_mut() else {
            // Only an IP relay host runs without a resolver.
            let result = match name.parse::<IpAddr>() {
                Ok(ip) => Ok(MxPlan { hosts: vec![MxHost { name: name.clone(), preference: 0, addrs: vec![ip] }] }),
                Err(_) => Err(DnsError::Timeout),
            };
            self.set_route(ctx, dest, &name, result);
            return;
        };
        let poll = if self.cfg.relay_host.is_some() {
            dns.resolver_mut().lookup_host_addrs(&name, ctx.now)
        } else {
            dns.resolver_mut().lookup_mx(&name, ctx.now)
        };
        match poll {
            Poll::Ready(result) => self.set_route(ctx, dest, &name, result),
            Poll::Pending => {
                self.dest_state(dest).route = Route::Resolving;
                let key = Resolver::canonical(&name).unwrap_or(name);
                self.lookups.entry(key).or_default().push(dest);
            }
        }
    }

    /// Opens one connection to the destination's next address.
    fn connect(&mut self, ctx: &mut Ctx<'_>, dest: DestId) {
        let state = &mut self.dests[dest as usize];
        let Route::Ready { addrs, .. } = &state.route else { return };
        let index = state.next_addr % addrs.len();
        let (host, addr) = addrs[index].clone();
        let policy = match self.cfg.tls_mode {
            OutboundTlsMode::None => TlsPolicy::Off,
            // A host whose handshake just failed gets plaintext at once (no doomed handshake
            // before every delivery).
            OutboundTlsMode::May if self.tls_broken.get(&addr).is_some_and(|&t| t > ctx.wall_ms) => TlsPolicy::Off,
            OutboundTlsMode::May => TlsPolicy::Opportunistic,
            OutboundTlsMode::Encrypt | OutboundTlsMode::Verify => TlsPolicy::Required,
        };
        self.open(ctx, dest, index, host, addr, policy);
    }

    /// Opens a connection to `addr` (entry `index` of the destination's route) with the given
    /// STARTTLS policy.
    fn open(
        &mut self,
        ctx: &mut Ctx<'_>,
        dest: DestId,
        index: usize,
        host: Box<str>,
        addr: SocketAddr,
        policy: TlsPolicy,
    ) {
        // TCP_NODELAY from the start: see `socket::connect`.
        let mut sock = match crate::net::socket::connect(addr) {
            Ok(s) => s,
            Err(e) if is_local_shortage(&e) => {
                // Out of descriptors, ports or memory here: not the destination's fault. Pause
                // new connections briefly instead of marking its address down.
                ctx.log.event("connect_error", &[("host", V::S(&host)), ("ip", V::D(&addr)), ("error", V::D(&e))]);
                self.local_pause_until = Some(ctx.now + LOCAL_PAUSE);
                self.queue.want(dest);
                return;
            }
            Err(e) => {
                ctx.log.event("connect_error", &[("host", V::S(&host)), ("ip", V::D(&addr)), ("error", V::D(&e))]);
                self.connect_failed(ctx, dest, index, connect_reply(&host, addr, &e));
                return;
            }
        };
        self.generation = token::next_generation(self.generation);
        let generation = self.generation;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = ctx.registry.register(
            &mut sock,
            token::make(Kind::Outbound, generation, key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            ctx.log.event("connect_error", &[("host", V::S(&host)), ("error", V::D(&e))]);
            // A local problem: try again on a later pass rather than strand the ready work.
            self.queue.want(dest);
            return;
        }
        let policy = if self.cfg.tls.is_none() { TlsPolicy::Off } else { policy };
        let session = ClientSession::new(
            ClientConfig { helo_name: self.cfg.hostname.clone(), timeouts: self.cfg.timeouts.clone(), tls: policy },
            ctx.now,
        );
        let tls_config = if policy == TlsPolicy::Off { None } else { self.cfg.tls.clone() };
        entry.insert(new_conn(sock, addr, host, dest, generation, session, index, ctx.now, tls_config));
        let state = self.dest_state(dest);
        state.conns += 1;
        state.opening += 1;
    }

    /// A connection attempt failed before SMTP started (or before the session was ready,
    /// TLS policy failures included): try the next address, or defer the destination's ready
    /// work with `reply` when every address failed.
    fn connect_failed(&mut self, ctx: &mut Ctx<'_>, dest: DestId, addr_index: usize, reply: Reply) {
        let wall_ms = ctx.wall_ms;
        let backoff =
            DEST_BACKOFF_MS.min(self.cfg.policy.schedule.first().map_or(DEST_BACKOFF_MS, |d| d.as_millis() as u64));
        let state = self.dest_state(dest);
        let n = match &state.route {
            Route::Ready { addrs, .. } => addrs.len().max(1),
            _ => 1,
        };
        // Several connections to one address fail together: count the address once, and only
        // while it is still the current one.
        if addr_index % n != state.next_addr % n {
            self.queue.want(dest);
            return;
        }
        state.failures += 1;
        state.next_addr = state.next_addr.wrapping_add(1);
        if state.failures < n {
            self.queue.want(dest);
            return;
        }
        state.failures = 0;
        state.backoff_until_ms = wall_ms + backoff;
        state.backoff_reply = Some(reply.clone());
        self.settle_ready(ctx, dest, Verdict::Deferred, &reply);
    }

    /// Gives ready jobs of `dest` the same verdict without trying them (a destination that is
    /// down, a failed lookup), at most [`SETTLE_PER_PASS`] per call so that a large backlog
    /// does not stall the loop; the rest is taken up on the next pass.
    fn settle_ready(&mut self, ctx: &mut Ctx<'_>, dest: DestId, verdict: Verdict, reply: &Reply) {
        for _ in 0..SETTLE_PER_PASS {
            let Some(job) = self.queue.pop_job(dest, ctx.wall_ms) else { return };
            self.settle_job(ctx, &job, None, &vec![(verdict, reply.clone()); job.rcpts.len()], "", "none");
        }
        if self.queue.has_ready(dest) {
            self.queue.want(dest);
        }
    }

    /// Moves bytes and handles session events for one connection.
    fn drive(&mut self, ctx: &mut Ctx<'_>, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if !conn.connected {
            if !conn.writable {
                return;
            }
            // A non-blocking connect is done when the socket is writable; it worked if it has
            // a peer (take_error tells why not).
            match conn.sock.take_error() {
                Ok(None) if conn.sock.peer_addr().is_ok() => conn.connected = true,
                Ok(None) => return,
                Ok(Some(e)) | Err(e) => {
                    let (dest, host, addr, index) = (conn.dest, conn.host.clone(), conn.peer, conn.addr_index);
                    self.close(ctx, key);
                    ctx.log.event("connect_error", &[("host", V::S(&host)), ("ip", V::D(&addr)), ("error", V::D(&e))]);
                    self.connect_failed(ctx, dest, index, connect_reply(&host, addr, &e));
                    return;
                }
            }
        }
        for round in 0..16 {
            let Some(conn) = self.conns.get_mut(key) else { return };
            if round == 15 {
                // Budget spent with work left: come back next pass, after other connections.
                self.again.push((key, conn.generation));
                return;
            }
            let body = conn.active.as_ref().map_or(&[][..], |a| ctx.spool.body(a.body));
            let wio = conn.write(ctx.bufs, body);
            let rio = conn.read(ctx.bufs, ctx.now);
            if rio == Io::Closed || (!conn.greeted && (rio == Io::Failed || wio == Io::Failed)) {
                // Before the session is ready a reset counts like a refusal (next MX, then
                // back off), not as a lost connection that is simply reopened.
                conn.session.handle_closed();
            }
            let mut progressed = false;
            if let Some(info) = conn.take_tls_established() {
                // The session queued EHLO again: another round writes it.
                progressed = true;
                let (host, peer) = (conn.host.clone(), conn.peer);
                ctx.log.event(
                    "tls",
                    &[
                        ("host", V::S(&host)),
                        ("ip", V::D(&peer)),
                        ("version", V::S(info.version)),
                        ("cipher", V::S(info.cipher)),
                    ],
                );
            }
            while let Some(ev) = self.conns.get_mut(key).and_then(|c| c.session.poll_event()) {
                progressed = true;
                self.on_session_event(ctx, key, ev);
            }
            if wio == Io::Failed || rio == Io::Failed {
                self.conn_lost(ctx, key, "connection failed");
                return;
            }
            if self.fill_next(ctx, key) {
                // Its commands go out behind the current message: another round writes them.
                progressed = true;
            }
            if !progressed {
                // Flush whatever the events produced (a new transaction's commands).
                if let Some(conn) = self.conns.get_mut(key) {
                    let body = conn.active.as_ref().map_or(&[][..], |a| ctx.spool.body(a.body));
                    if conn.write(ctx.bufs, body) == Io::Failed {
                        self.conn_lost(ctx, key, "connection failed");
                    }
                }
                return;
            }
        }
    }

    fn on_session_event(&mut self, ctx: &mut Ctx<'_>, key: usize, ev: ClientEvent) {
        match ev {
            ClientEvent::StartTls => {
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.start_tls(ctx.bufs);
                }
            }
            ClientEvent::Ready => {
                if let Some(conn) = self.conns.get_mut(key) {
                    if !conn.greeted {
                        conn.greeted = true;
                        // The host talks SMTP: the destination's failure count starts over.
                        let dest = conn.dest;
                        let state = self.dest_state(dest);
                        state.failures = 0;
                        state.opening = state.opening.saturating_sub(1);
                    }
                }
                self.take_job(ctx, key)
            }
            ClientEvent::TransactionDone(result) => {
                let Some(conn) = self.conns.get_mut(key) else { return };
                let Some(active) = conn.active.take() else { return };
                // The queued transaction (if any) is the session's current one now.
                conn.active = conn.next.take();
                conn.transactions += 1;
                let remote = conn.remote();
                let tls = conn.tls_version();
                let outcomes: Vec<(Verdict, Reply)> = result
                    .rcpt_replies
                    .iter()
                    .map(|r| {
                        rcpt_outcome(r, result.data_reply.is_some()).unwrap_or_else(|| match &result.data_reply {
                            Some(d) => (verdict(d.code), d.clone()),
                            None => (Verdict::Deferred, synthetic(451, (4, 3, 0), "no reply to the data")),
                        })
                    })
                    .collect();
                self.settle_job(ctx, &active.job, Some(&active.attempts), &outcomes, &remote, tls);
            }
            ClientEvent::Failed(failure) if failure.tls_status().is_some() => self.tls_failed(ctx, key, &failure),
            ClientEvent::Failed(failure) => {
                let text = match self.conns.get(key).and_then(|c| c.tls_error.as_ref()) {
                    Some(e) => format!("{failure} (TLS: {e})"),
                    None => format!("{failure}"),
                };
                match self.conns.get(key) {
                    // Refused before it ever said it was ready (421 or 5xx greeting, refused
                    // EHLO, closed): like a refused connect, try the next MX, then back off.
                    Some(c) if !c.greeted => {
                        let (dest, host, addr, index) = (c.dest, c.host.clone(), c.peer, c.addr_index);
                        ctx.log.event(
                            "connect_error",
                            &[("host", V::S(&host)), ("ip", V::D(&addr)), ("error", V::S(&text))],
                        );
                        self.close(ctx, key);
                        self.connect_failed(ctx, dest, index, connect_reply(&host, addr, &text));
                    }
                    _ => self.conn_lost(ctx, key, &text),
                }
            }
            ClientEvent::Closed => self.close(ctx, key),
        }
    }

    /// The TLS policy failed on a connection (always before it was ready: STARTTLS comes
    /// right after EHLO). Under `may` a failed handshake is retried at once in plaintext on
    /// the same address, as Postfix does: no attempt is counted and the host is not marked
    /// down; the address is remembered for [`TLS_BROKEN_MS`] so the next connections skip
    /// the handshake. Otherwise (`encrypt`/`verify`) it is a 4.7.x failure of the host, handled
    /// like a refused connect: next MX, then the ready work is deferred with that reply.
    fn tls_failed(&mut self, ctx: &mut Ctx<'_>, key: usize, failure: &Failure) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let (dest, host, addr, index) = (conn.dest, conn.host.clone(), conn.peer, conn.addr_index);
        let detail = match &conn.tls_error {
            Some(e) => format!("{failure}: {e}"),
            None => failure.to_string(),
        };
        if conn.active.is_some() || conn.greeted {
            // Not reachable (TLS only happens before the first job), but never strand a job.
            return self.conn_lost(ctx, key, &detail);
        }
        self.close(ctx, key);
        if failure.is_tls_handshake() && self.cfg.tls_mode == OutboundTlsMode::May {
            ctx.log.event(
                "tls_fallback",
                &[
                    ("host", V::S(&host)),
                    ("ip", V::D(&addr)),
                    ("error", V::S(&detail)),
                    ("detail", V::S("TLS handshake failed; retrying in plaintext")),
                ],
            );
            if self.tls_broken.len() >= TLS_BROKEN_MAX {
                let now = ctx.wall_ms;
                self.tls_broken.retain(|_, until| *until > now);
            }
            if self.tls_broken.len() < TLS_BROKEN_MAX {
                self.tls_broken.insert(addr, ctx.wall_ms + TLS_BROKEN_MS);
            }
            self.open(ctx, dest, index, host, addr, TlsPolicy::Off);
            return;
        }
        ctx.log.event("tls_error", &[("host", V::S(&host)), ("ip", V::D(&addr)), ("error", V::S(&detail))]);
        let status = failure.tls_status().unwrap_or((4, 7, 0));
        let reply = synthetic(451, status, &format!("{detail} ({host}[{addr}])"));
        self.connect_failed(ctx, dest, index, reply);
    }

    /// Gives a ready connection the next job of its destination, or parks it as idle.
    fn take_job(&mut self, ctx: &mut Ctx<'_>, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let dest = conn.dest;
        if conn.transactions >= MAX_TRANSACTIONS_PER_CONN {
            conn.session.quit();
            return;
        }
        let Some(job) = self.queue.pop_job(dest, ctx.wall_ms) else {
            conn.idle_since = Some(ctx.now);
            let generation = conn.generation;
            self.dest_state(dest).idle.push((key, generation));
            return;
        };
        self.begin_job(ctx, key, job, false);
    }

    /// Queues the destination's next ready job behind the connection's transaction in
    /// progress (RFC 2920 §3.1), when the session can take one and the connection's
    /// transaction budget allows; true when one was queued. A job refused from the EHLO
    /// reply alone is settled at once and the next one tried.
    fn fill_next(&mut self, ctx: &mut Ctx<'_>, key: usize) -> bool {
        loop {
            let Some(conn) = self.conns.get_mut(key) else { return false };
            // Counting the active transaction and the one to queue.
            if conn.next.is_some()
                || conn.active.is_none()
                || !conn.session.can_queue_next()
                || conn.transactions.saturating_add(2) > MAX_TRANSACTIONS_PER_CONN
            {
                return false;
            }
            let dest = conn.dest;
            let Some(job) = self.queue.pop_job(dest, ctx.wall_ms) else { return false };
            if self.begin_job(ctx, key, job, true) {
                return true;
            }
        }
    }

    /// Starts `job` on the connection (`next`: queues it behind the active one); true when the
    /// session took it. A message unreadable in the spool, or (queued) refused from the EHLO
    /// reply alone, is settled here.
    fn begin_job(&mut self, ctx: &mut Ctx<'_>, key: usize, job: Job, next: bool) -> bool {
        let Some(conn) = self.conns.get(key) else {
            self.queue.requeue(&job);
            return false;
        };
        let dest = conn.dest;
        let Some(msg) = self.queue.msg(job.msg) else { return false };
        let (loc, id) = (msg.loc, msg.id);
        let attempts: Vec<u16> = job.rcpts.iter().map(|&i| msg.rcpts[i as usize].attempts.saturating_add(1)).collect();
        let (view, body) = match ctx.spool.message_with_body(loc) {
            Ok(v) => v,
            Err(e) => {
                ctx.log.event("spool_error", &[("id", V::D(&id)), ("error", V::D(&e))]);
                let reply = synthetic(451, (4, 3, 0), "message unreadable in the spool");
                self.settle_job(ctx, &job, None, &vec![(Verdict::Deferred, reply); job.rcpts.len()], "", "none");
                // The connection is still good: park it for the next job (unless it is busy).
                if let Some(conn) = self.conns.get_mut(key).filter(|_| !next) {
                    conn.idle_since = Some(ctx.now);
                    let generation = conn.generation;
                    self.dest_state(dest).idle.push((key, generation));
                }
                return false;
            }
        };
        let env = &view.envelope;
        let rcpts: Vec<TxRcpt<'_>> = job
            .rcpts
            .iter()
            .map(|&i| {
                let r = env.rcpt(i as usize);
                TxRcpt { addr: r.addr, notify: r.notify, orcpt: r.orcpt }
            })
            .collect();
        let spec = TxSpec {
            sender: &env.sender,
            rcpts,
            body_len: body.len as u64,
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            ret: env.ret,
            envid: &env.envid,
        };
        let Some(conn) = self.conns.get_mut(key) else { return false };
        if !next {
            conn.idle_since = None;
            conn.session.start_transaction(spec);
            conn.active = Some(ActiveJob { job, body, attempts });
            return true;
        }
        match conn.session.queue_next(spec) {
            Ok(()) => {
                conn.next = Some(ActiveJob { job, body, attempts });
                true
            }
            Err(refusal) => {
                // As start_transaction's refusals: the same reply for every recipient.
                let remote = conn.remote();
                let tls = conn.tls_version();
                let outcome = rcpt_outcome(&refusal, false)
                    .unwrap_or_else(|| (Verdict::Deferred, synthetic(451, (4, 3, 0), "transaction not queued")));
                self.settle_job(ctx, &job, Some(&attempts), &vec![outcome; job.rcpts.len()], &remote, tls);
                false
            }
        }
    }

    /// Records the outcome of every recipient of a job: spool outcome records, queue state,
    /// attempt log lines, a bounce for failures, release of finished messages.
    fn settle_job(
        &mut self,
        ctx: &mut Ctx<'_>,
        job: &Job,
        attempts: Option<&[u16]>,
        outcomes: &[(Verdict, Reply)],
        remote: &str,
        tls: &str,
    ) {
        let Some(msg) = self.queue.msg(job.msg).filter(|m| m.id == job.id) else { return };
        let (id, arrival_ms, loc) = (msg.id, msg.arrival_ms, msg.loc);
        let prior: Vec<u16> = job.rcpts.iter().map(|&i| msg.rcpts[i as usize].attempts).collect();
        let env = ctx.spool.envelope(loc).unwrap_or_default();
        // First decide every recipient's verdict (a deferral past the lifetime is a failure).
        let mut decided: Vec<(u32, Verdict, Reply, u16, u64)> = Vec::with_capacity(job.rcpts.len());
        for (n, &rcpt) in job.rcpts.iter().enumerate() {
            let (mut v, mut reply) =
                outcomes.get(n).cloned().unwrap_or((Verdict::Deferred, synthetic(451, (4, 3, 0), "no outcome")));
            let tries = attempts.map_or(prior[n].saturating_add(1), |a| a[n]);
            let mut next_ms = 0;
            if v == Verdict::Deferred {
                match self.cfg.policy.next_attempt(tries, arrival_ms, ctx.wall_ms) {
                    NextStep::RetryAt(t) => next_ms = t,
                    NextStep::Expire => {
                        v = Verdict::Failed;
                        reply = synthetic(550, (5, 4, 7), &format!("delivery time expired; last error: {reply}"));
                    }
                }
            }
            decided.push((rcpt, v, reply, tries, next_ms));
        }
        // The bounce goes into the spool before the failures it reports, and each failure it
        // covers names it: recovery retries a failure whose bounce did not survive a crash.
        let failed: Vec<(u32, Reply, Verdict)> =
            decided.iter().filter(|d| d.1 == Verdict::Failed).map(|d| (d.0, d.2.clone(), d.1)).collect();
        let mut dsn_id = None;
        if !failed.is_empty() {
            // Room for the outcome records that follow the DSN, all of this job's.
            let outcome_room: usize = decided
                .iter()
                .map(|d| crate::spool::format::padded_record_len(64 + d.2.to_string().len() + remote.len()))
                .sum();
            match self.bounce(ctx, id, arrival_ms, loc, &env, &failed, remote, outcome_room) {
                Ok(b) => dsn_id = b,
                Err(()) => {
                    // The bounce could not be stored (a full disk): settling these recipients
                    // as failed would drop the message with no word to its sender. They stay
                    // deferred, and the next attempt decides (and bounces) again. Those who
                    // asked for no failure notice need no DSN and fail now.
                    let retry_ms = ctx.wall_ms + BOUNCE_RETRY.as_millis() as u64;
                    for d in decided.iter_mut().filter(|d| d.1 == Verdict::Failed && wants_dsn(&env, d.0)) {
                        d.1 = Verdict::Deferred;
                        d.4 = match self.cfg.policy.next_attempt(d.3, arrival_ms, ctx.wall_ms) {
                            NextStep::RetryAt(t) => t.min(retry_ms),
                            NextStep::Expire => retry_ms,
                        };
                    }
                }
            }
        }
        let mut finished = false;
        let mut reply_text = Vec::new();
        for (rcpt, v, reply, tries, next_ms) in decided {
            reply_text.clear();
            let _ = write!(reply_text, "{reply}");
            let outcome = Outcome {
                status: v.status(),
                attempts: tries,
                next_attempt_ms: next_ms,
                at_ms: ctx.wall_ms,
                reply: &reply_text,
                remote: remote.as_bytes(),
                // Only the failures the DSN reports (NOTIFY may leave some out).
                bounce: dsn_id.filter(|_| v == Verdict::Failed && wants_dsn(&env, rcpt)),
            };
            let addr = if (rcpt as usize) < env.rcpt_count() { env.rcpt(rcpt as usize).addr } else { b"" };
            let outcome_name = match v {
                Verdict::Delivered => "delivered",
                Verdict::Deferred => "deferred",
                Verdict::Failed => "failed",
            };
            ctx.log.event(
                "delivery",
                &[
                    ("id", V::D(&id)),
                    ("rcpt", V::B(addr)),
                    ("domain", V::S(&self.queue.dest(job.dest).name)),
                    ("remote", V::S(if remote.is_empty() { "-" } else { remote })),
                    ("tls", V::S(tls)),
                    ("reply", V::B(&reply_text)),
                    ("delay_ms", V::N(ctx.wall_ms.saturating_sub(arrival_ms))),
                    ("attempt", V::N(u64::from(tries))),
                    ("outcome", V::S(outcome_name)),
                ],
            );
            match ctx.spool.append_outcome(id, rcpt, &outcome) {
                Ok(p) => self.queue.add_outcome(job.msg, p),
                Err(e) => ctx.log.event("spool_error", &[("id", V::D(&id)), ("error", V::D(&e))]),
            }
            finished = self.queue.settle(job.msg, rcpt, v.status(), tries, next_ms);
        }
        if finished {
            if let Some(m) = self.queue.remove(job.msg) {
                ctx.spool.release_message(m.loc.segment, m.pins);
            }
        } else {
            self.queue.reschedule(job.msg, job.dest, ctx.wall_ms);
        }
    }

    /// Queues a DSN to the sender for the failed recipients (RFC 3464), unless the sender is
    /// null or every failed recipient asked for no failure notice. `Ok(Some(id))`: the DSN's
    /// queue id; `Ok(None)`: none was due; `Err`: one was due but could not be stored.
    #[allow(clippy::too_many_arguments)]
    fn bounce(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: QueueId,
        arrival_ms: u64,
        loc: crate::spool::MessageLoc,
        env: &Envelope,
        failed: &[(u32, Reply, Verdict)],
        remote: &str,
        outcome_room: usize,
    ) -> Result<Option<QueueId>, ()> {
        if !dsn::should_bounce(&env.sender) {
            return Ok(None);
        }
        let diags: Vec<String> = failed.iter().map(|(_, r, _)| format!("smtp; {r}")).collect();
        let remote_mta = if remote.is_empty() { String::new() } else { format!("dns; {remote}") };
        let recipients: Vec<DsnRecipient<'_>> = failed
            .iter()
            .zip(&diags)
            .filter(|((i, _, _), _)| wants_dsn(env, *i))
            .map(|((i, r, _), diag)| {
                let rv = env.rcpt(*i as usize);
                DsnRecipient {
                    final_recipient: rv.addr,
                    original_recipient: rv.orcpt,
                    action: Action::Failed,
                    status: status_code(r),
                    remote_mta: remote_mta.as_bytes(),
                    diagnostic: diag.as_bytes(),
                    last_attempt_unix: ctx.wall_ms / 1000,
                }
            })
            .collect();
        if recipients.is_empty() {
            return Ok(None);
        }
        // The DSN returns the whole message only for RET=FULL; otherwise its header section.
        let original = match ctx.spool.message_with_body(loc) {
            Ok((_, b)) => {
                let body = ctx.spool.body(b);
                let end = if env.ret == crate::message::Ret::Full {
                    body.len()
                } else {
                    memchr::memmem::find(body, b"\r\n\r\n").map_or(body.len(), |i| i + 4)
                };
                body[..end].to_vec()
            }
            Err(_) => Vec::new(),
        };
        let bounce_id = ctx.ids.next(ctx.wall_ms * 1000);
        let mut body = Vec::with_capacity(original.len().min(1 << 20) + 2048);
        dsn::build_dsn(
            &DsnInput {
                reporting_mta: &self.cfg.hostname,
                original_envelope_id: &env.envid,
                arrival_unix: arrival_ms / 1000,
                now_unix: ctx.wall_ms / 1000,
                sender: &env.sender,
                queue_id: id,
                recipients: &recipients,
                original: &original,
                ret: env.ret,
                boundary_seed: bounce_id.0,
            },
            &mut body,
        );
        let mut benv = Envelope::default();
        benv.helo.extend_from_slice(self.cfg.hostname.as_bytes());
        benv.push_rcpt(&env.sender, b"", 0);
        benv.client_ip = IpAddr::from([127, 0, 0, 1]);
        // The DSN and the outcome records that name it go into one segment (see
        // `Spool::reserve_room`).
        let need = crate::spool::format::message_record_len(&benv, &body).unwrap_or(0) + outcome_room;
        if let Err(e) = ctx.spool.reserve_room(need) {
            ctx.log.event("spool_error", &[("id", V::D(&bounce_id)), ("for", V::D(&id)), ("error", V::D(&e))]);
            return Err(());
        }
        match ctx.spool.append_generated_message(bounce_id, ctx.wall_ms, &benv, &body) {
            Ok((_, bloc)) => {
                ctx.log.event("bounce", &[("id", V::D(&bounce_id)), ("for", V::D(&id)), ("to", V::B(&env.sender))]);
                let rec = StoredMessage {
                    id: bounce_id,
                    loc: bloc,
                    arrival_ms: ctx.wall_ms,
                    rcpts: Vec::new(),
                    pins: Default::default(),
                };
                self.enqueue(ctx, &rec);
                Ok(Some(bounce_id))
            }
            Err(e) => {
                ctx.log.event("spool_error", &[("id", V::D(&bounce_id)), ("for", V::D(&id)), ("error", V::D(&e))]);
                Err(())
            }
        }
    }

    /// The connection is unusable: its job (if any) is deferred, the connection closed.
    fn conn_lost(&mut self, ctx: &mut Ctx<'_>, key: usize, why: &str) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        // The queued transaction (`next`) is left to `close`, which requeues it: none of its
        // replies was read and its message never went out (it would have been `active`), so it
        // was not attempted. Deferring it instead would tie it to the active job's retry times,
        // and a message that always breaks the connection would take it down every time.
        let active = conn.active.take();
        let remote = conn.remote();
        let tls = conn.tls_version();
        // A recipient already refused keeps that reply (a 5xx fails it now rather than after
        // more attempts); the others are deferred with the lost connection.
        let received: Vec<Reply> =
            if active.is_some() { conn.session.rcpt_replies_so_far().to_vec() } else { Vec::new() };
        self.close(ctx, key);
        if let Some(a) = active {
            let lost = synthetic(451, (4, 4, 2), &format!("lost connection with {remote}: {why}"));
            let outcomes: Vec<(Verdict, Reply)> = (0..a.job.rcpts.len())
                .map(|i| {
                    received
                        .get(i)
                        .and_then(|r| rcpt_outcome(r, false))
                        .unwrap_or_else(|| (Verdict::Deferred, lost.clone()))
                })
                .collect();
            self.settle_job(ctx, &a.job, Some(&a.attempts), &outcomes, &remote, tls);
        }
    }

    fn close(&mut self, ctx: &mut Ctx<'_>, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        let mut conn = self.conns.remove(key);
        conn.close_tls();
        let _ = ctx.registry.deregister(&mut conn.sock);
        conn.release_buffers(ctx.bufs);
        for a in [conn.active.take(), conn.next.take()].into_iter().flatten() {
            self.queue.requeue(&a.job);
        }
        let dest = conn.dest;
        let state = self.dest_state(dest);
        state.conns = state.conns.saturating_sub(1);
        if !conn.greeted {
            state.opening = state.opening.saturating_sub(1);
        }
        state.idle.retain(|&(k, g)| !(k == key && g == conn.generation));
        self.queue.want(dest);
    }

    /// Timeouts of sessions and idle connections (checked a few times a second).
    fn sweep(&mut self, ctx: &mut Ctx<'_>) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            if conn.idle_since.is_some_and(|t| ctx.now.duration_since(t) >= IDLE_TIMEOUT) {
                conn.idle_since = None;
                conn.session.quit();
                let (dest, generation) = (conn.dest, conn.generation);
                self.dest_state(dest).idle.retain(|&(k, g)| !(k == key && g == generation));
                self.drive(ctx, key);
                continue;
            }
            if !conn.connected && ctx.now.duration_since(conn.created) >= self.cfg.connect_timeout {
                // A host that does not answer: try the next address (RFC 5321 §5.1).
                let (dest, host, addr, index) = (conn.dest, conn.host.clone(), conn.peer, conn.addr_index);
                self.close(ctx, key);
                ctx.log
                    .event("connect_error", &[("host", V::S(&host)), ("ip", V::D(&addr)), ("error", V::S("timeout"))]);
                self.connect_failed(ctx, dest, index, connect_reply(&host, addr, &"connection timed out"));
                continue;
            }
            if conn.session.next_deadline().is_some_and(|d| d <= ctx.now) {
                conn.session.handle_timeout(ctx.now);
                self.drive(ctx, key);
            }
        }
        if let Some(dns) = self.dns.as_mut() {
            dns.handle_timeout(ctx.now);
        }
        self.dns_results(ctx);
    }

    /// Outbound connections open now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// A queue flush (`sluice queue flush`, SIGUSR1): every deferred job is due now, and every
    /// destination is tried afresh — its connect backoff and failure count forgotten, a failed
    /// route looked up again. Returns (jobs made due, destinations that were held back).
    pub fn flush(&mut self) -> (usize, usize) {
        let due = self.queue.flush();
        let mut reset = 0;
        for state in &mut self.dests {
            let failed_route = matches!(state.route, Route::Failed { .. });
            if state.backoff_until_ms > 0 || state.failures > 0 || failed_route {
                reset += 1;
            }
            state.backoff_until_ms = 0;
            state.backoff_reply = None;
            state.failures = 0;
            state.next_addr = 0;
            if failed_route {
                state.route = Route::Unknown;
            }
        }
        (due, reset)
    }
}

/// The deferral for a host that could not be reached (RFC 3463 X.4.1: no answer from host).
fn connect_reply(host: &str, addr: SocketAddr, why: &dyn std::fmt::Display) -> Reply {
    synthetic(451, (4, 4, 1), &format!("connect to {host}[{addr}]: {why}"))
}

/// Parses `"5.1.10"` into its three numbers (`(4, 0, 0)` if it does not parse).
fn parse_enhanced(s: &str) -> (u8, u16, u16) {
    let mut it = s.split('.');
    let mut next = || it.next().and_then(|p| p.parse::<u16>().ok());
    match (next(), next(), next()) {
        (Some(a), Some(b), Some(c)) => (a as u8, b, c),
        _ => (4, 0, 0),
    }
}
