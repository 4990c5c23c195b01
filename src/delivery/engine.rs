//! Pure: the delivery engine — which destination gets how many connections, which job goes on
//! which connection, what every attempt means for its recipients, and when to retry.
//!
//! Sans-IO, in the shape of `ServerSession` and `Resolver`: the driver (`net::outbound`) reports
//! what happened (`handle_*`: a message committed, a lookup answered, a connection ready, a
//! transaction done, a connection failed, time passed), then executes every [`Action`] that
//! [`Engine::poll_action`] hands out (look up, connect, start a transaction, quit, close, store
//! outcomes, store a bounce, release spool pins, log) and sleeps until [`Engine::next_deadline`].
//! Time comes in as [`Now`]; nothing here touches a socket, the spool or the clock.
//!
//! The rules, in the order a message meets them:
//! - A destination with ready work gets a route (relay host, address literal or MX records; a
//!   route naming this relay is cut at our preference, RFC 5321 §5.1, and `5.4.6` when nothing is
//!   left; from an egress source only the addresses of its family, and `4.4.4` deferrals when
//!   there are none) and up to `--domain-concurrency` connections to its first address.
//! - A connection that becomes ready takes the destination's next job (all recipients of one
//!   message for that destination); an idle one is reused, after [`IDLE_TIMEOUT`] it says QUIT,
//!   and after [`MAX_TRANSACTIONS_PER_CONN`] it says QUIT too. Under PIPELINING the next job is
//!   queued behind the current message (RFC 2920 §3.1).
//! - A refused connect, a `4yz`/`5yz` greeting or a connect timeout moves on to the next address;
//!   when every address failed in a row the destination backs off and its ready work is deferred
//!   with the last failure. A lost connection defers its transaction (a recipient already refused
//!   keeps its refusal) and gives the queued one back untried.
//! - TLS (`--outbound-tls`): see [`super::tls`]; under `may` a failed handshake reconnects at
//!   once in plaintext to the same address, otherwise it is a 4.7.x failure of the host.
//! - Settlement ([`super::settle`]): deferrals past the lifetime fail with `4.4.7`; a failure is
//!   reported in a DSN (never for the null sender, RFC 5321 §4.5.5; per recipient `NOTIFY`),
//!   which is stored *before* the outcome records that name it, and a DSN that cannot be stored
//!   keeps those recipients deferred.

mod control;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::dest::{ConnectFailed, DestState, Route, DEST_BACKOFF_MS, FAILED_ROUTE_TTL_MS, ROUTE_TTL_MS};
use super::route::{self, rcpt_outcome, verdict, Verdict};
use super::settle::{self, Settled};
use super::sites::{self, Blocked, Change, Defaults, SiteId, Sites};
use super::sources::{Source, SourceId};
use super::tls::{OutboundTls, TlsMemory};
use super::DeliveryConfig;
use crate::dns::resolver::{DnsError, MxPlan, Resolver};
use crate::dsn::{self, Action as DsnAction};
use crate::message::{Envelope, QueueId};
use crate::queue::{DestId, Job, MsgKey, QMsg, Queue};
use crate::shaping::{Rules, Scope, Suspension};
use crate::smtp::client::{Failure, TlsPolicy, TxResult};
use crate::smtp::reply::Reply;
use crate::smtp::LocalFault;
use crate::spool::{MessageLoc, Pending, Pins, StoredMessage};

pub use control::{DestSummary, OperatorBounce};

/// Transactions on one connection before it says QUIT, unless shaping says otherwise.
pub const MAX_TRANSACTIONS_PER_CONN: u32 = sites::DEFAULT_MAX_DELIVERIES;
/// How long an idle connection is kept for reuse.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Jobs given a verdict without an attempt per destination and pass (see `settle_ready`).
const SETTLE_PER_PASS: usize = 1024;
/// Pause of new connections after a local shortage (EMFILE, ENFILE, EADDRNOTAVAIL, ENOBUFS).
pub const LOCAL_PAUSE: Duration = Duration::from_millis(200);
/// Connection generations wrap at 24 bits (they go into a `mio` token with the key).
const GENERATION_MASK: u32 = 0x00ff_ffff;

/// The time of an event: monotonic for timers, wall clock (Unix ms) for what the spool keeps.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// Monotonic.
    pub at: Instant,
    /// Unix ms.
    pub wall_ms: u64,
}

/// A connection: its slot and the generation that guards against a reused slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// Slot, dense from 0 (the driver indexes its sockets by it).
    pub key: u32,
    /// Generation of the slot (24 bits).
    pub generation: u32,
}

/// What the driver must do.
#[derive(Debug)]
pub enum Action {
    /// Look `name` up: its MX records, or only its addresses (`host`: a relay host). Answer
    /// with [`Engine::handle_route`].
    Lookup {
        /// The destination name.
        name: Box<str>,
        /// Addresses only (A/AAAA), no MX.
        host: bool,
    },
    /// Open a connection; report [`Engine::handle_connected`], then the session's events.
    Connect {
        /// The new connection.
        conn: ConnId,
        /// Mail exchanger name (the TLS server name).
        host: Box<str>,
        /// Address.
        addr: SocketAddr,
        /// STARTTLS policy of its session.
        tls: TlsPolicy,
        /// Verify the certificate for `host` (`verify`).
        verify: bool,
        /// The egress source to bind and name in EHLO ([`Engine::source`]).
        source: SourceId,
    },
    /// Start the transaction [`Engine::job`] names on the connection; `next`: queue it behind
    /// the current one (RFC 2920 §3.1). A start that fails is reported with
    /// [`Engine::handle_start_failed`].
    Start {
        /// The connection.
        conn: ConnId,
        /// Queued behind the transaction in progress.
        next: bool,
    },
    /// End the session politely (QUIT); its close is reported with [`Engine::handle_closed`].
    Quit {
        /// The connection.
        conn: ConnId,
    },
    /// Close the socket and forget the connection (the engine already has).
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Store the outcome records of a job and log one attempt line per recipient.
    Settle(Box<Settlement>),
    /// Store a DSN for failed recipients; answer with [`Engine::handle_bounce`].
    Bounce(Box<BounceRequest>),
    /// A message with nothing left to do when it was queued: release its spool pins.
    Release {
        /// Its record's segment.
        segment: u64,
        /// Its pins.
        pins: Pins,
    },
    /// Log a line.
    Note(Note),
}

/// The outcome of every recipient of one job.
#[derive(Debug)]
pub struct Settlement {
    /// The message.
    pub id: QueueId,
    /// Its queue key (for [`Engine::add_pin`]).
    pub msg: MsgKey,
    /// Its record.
    pub loc: MessageLoc,
    /// The destination.
    pub dest: DestId,
    /// Arrival, Unix ms.
    pub arrival_ms: u64,
    /// When it was settled, Unix ms.
    pub at_ms: u64,
    /// `host[ip]` that answered, if any.
    pub remote: Option<Rc<str>>,
    /// TLS version of the connection, or `none`.
    pub tls: &'static str,
    /// One per recipient of the job.
    pub rcpts: Vec<Settled>,
    /// The message is finished: after its outcome records are appended (their tickets through
    /// [`Engine::add_pin`]), release [`Engine::take_release`]'s pins with its record's segment.
    pub release: bool,
}

/// A DSN to store (RFC 3464) for recipients that failed.
#[derive(Debug)]
pub struct BounceRequest {
    /// Handed back in [`Engine::handle_bounce`].
    pub token: usize,
    /// The failed message.
    pub id: QueueId,
    /// Its record.
    pub loc: MessageLoc,
    /// Its arrival, Unix ms.
    pub arrival_ms: u64,
    /// The recipients the DSN reports, with their final reply.
    pub failed: Vec<(u32, Reply)>,
    /// `host[ip]` that answered, if any.
    pub remote: Option<Rc<str>>,
    /// Bytes the outcome records written after the DSN need in the same segment.
    pub room: usize,
}

/// A log line the engine asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A destination has no usable route: `event` is `dns` or `route` (mail loops back).
    Route {
        /// Log event name.
        event: &'static str,
        /// The destination.
        domain: Box<str>,
        /// Why.
        error: String,
    },
    /// No mail exchanger of a destination has an address of its egress source's family
    /// (`event=no_route`): its mail is deferred.
    NoRoute {
        /// The destination.
        domain: Box<str>,
        /// The egress source.
        source: Box<str>,
        /// Why, naming the family and the hosts.
        error: String,
    },
    /// A connection attempt failed (`event=connect_error`).
    ConnectError {
        /// Host name.
        host: Box<str>,
        /// Address.
        addr: SocketAddr,
        /// Why.
        error: String,
    },
    /// A failed handshake is retried in plaintext (`event=tls_fallback`).
    TlsFallback {
        /// Host name.
        host: Box<str>,
        /// Address.
        addr: SocketAddr,
        /// Why.
        error: String,
    },
    /// The TLS policy failed on a host (`event=tls_error`).
    TlsError {
        /// Host name.
        host: Box<str>,
        /// Address.
        addr: SocketAddr,
        /// Why.
        error: String,
    },
    /// Shaping changed (`event=suspend|throttle|resume`).
    Shaping(Change),
    /// Every address of a destination failed (`event=destination_down`): its mail waits,
    /// parked, until `until_ms`, when one connection tries again.
    DestinationDown {
        /// The destination.
        domain: Box<str>,
        /// The next try (Unix ms).
        until_ms: u64,
        /// The last failure.
        error: String,
    },
    /// AUTH to the relay host failed (`event=relay_auth_failed`); `error` holds no secret.
    AuthFailed {
        /// Host name.
        host: Box<str>,
        /// Address.
        addr: SocketAddr,
        /// Why, with the server's (scrubbed) reply.
        error: String,
    },
}

/// How a connection broke.
#[derive(Debug, Clone, Copy)]
pub enum ConnFailure<'a> {
    /// The TCP connect failed or timed out.
    Connect(&'a str),
    /// The session failed (a refused greeting, a timeout, a TLS failure, a closed connection);
    /// `received`: the replies to the current transaction's RCPTs read so far.
    Session {
        /// What failed.
        failure: &'a Failure,
        /// The TLS layer's error, if it had one.
        tls_error: Option<&'a str>,
        /// RCPT replies of the transaction in progress.
        received: &'a [Reply],
    },
    /// Reading or writing the socket failed.
    Io {
        /// RCPT replies of the transaction in progress.
        received: &'a [Reply],
    },
}

/// Why a [`Action::Start`] did not start.
#[derive(Debug, Clone)]
pub enum StartFailure {
    /// The message record could not be read from the spool.
    Unreadable,
    /// The session refused to queue it (from the EHLO reply alone, e.g. SIZE).
    Refused(Reply),
}

/// A job on a connection.
#[derive(Debug)]
struct InFlight {
    job: Job,
    /// Attempt number per recipient of the job (same order as `job.rcpts`).
    attempts: Vec<u16>,
}

/// One connection as the engine sees it.
#[derive(Debug)]
struct Conn {
    generation: u32,
    dest: DestId,
    site: SiteId,
    /// The TLS mode it was opened under (its site's).
    tls_mode: OutboundTls,
    /// Index of its address in the destination's route.
    addr_index: usize,
    host: Box<str>,
    peer: SocketAddr,
    /// `host[ip]`, as attempt lines and DSNs name the remote MTA.
    remote: Rc<str>,
    opened: Instant,
    connected: bool,
    /// The server greeted and accepted EHLO/HELO at least once.
    greeted: bool,
    /// TLS version once up, else `none`.
    tls: &'static str,
    active: Option<InFlight>,
    /// Queued behind `active` (RFC 2920 §3.1); becomes `active` at its `TransactionDone`.
    next: Option<InFlight>,
    transactions: u32,
    /// Ready and without work since.
    idle_since: Option<Instant>,
    /// The timer entry that is current for this connection.
    armed: Option<Instant>,
}

impl Conn {
    /// When its connect or idle time runs out.
    fn deadline(&self, connect_timeout: Duration) -> Option<Instant> {
        if !self.connected {
            Some(self.opened + connect_timeout)
        } else {
            self.idle_since.map(|t| t + IDLE_TIMEOUT)
        }
    }
}

/// A settlement waiting for its bounce to be stored.
#[derive(Debug)]
struct Parked {
    job: Job,
    loc: MessageLoc,
    arrival_ms: u64,
    settled: Vec<Settled>,
    remote: Option<Rc<str>>,
    tls: &'static str,
}

/// The delivery engine.
pub struct Engine {
    cfg: DeliveryConfig,
    queue: Queue,
    dests: Vec<DestState>,
    conns: Slab<Conn>,
    generation: u32,
    /// Destinations waiting for a lookup, by canonical name.
    lookups: HashMap<String, Vec<DestId>>,
    tls: TlsMemory,
    /// New connections wait until then (this host ran out of sockets or ports).
    local_pause_until: Option<Instant>,
    /// Connect and idle deadlines: (when, key, generation); stale entries are skipped.
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    actions: VecDeque<Action>,
    parked: Slab<Parked>,
    /// Pins of finished messages whose last [`Action::Settle`] is not executed yet: outcome
    /// records of earlier Settles of the same message still add their tickets here.
    releasing: HashMap<QueueId, Pins>,
    /// Shaping: sites, limits, buckets, suspensions.
    sites: Sites,
    /// Destinations and sites to serve again at a time (a token, a suspension's end, a
    /// backoff's end, a parked message's expiry): (when, kind, id); stale entries are harmless.
    wakes: BinaryHeap<Reverse<(Instant, Wake, u32)>>,
    /// The pending wake-up of each site (by `SiteId`); a destination's is in its state.
    site_wakes: Vec<Option<Instant>>,
}

/// What a wake-up serves again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Wake {
    /// The destinations waiting for a site.
    Site,
    /// One destination.
    Dest,
}

impl Engine {
    /// An engine with an empty queue.
    pub fn new(cfg: DeliveryConfig) -> Engine {
        let queue = Queue::new(cfg.relay_host.as_ref().map(|(h, _)| h.as_str()), &cfg.hostname);
        let defaults = Defaults { connection_limit: cfg.domain_concurrency, tls: cfg.tls_mode };
        let sites = Sites::new(cfg.shaping.clone(), defaults);
        Engine {
            cfg,
            queue,
            dests: Vec::new(),
            conns: Slab::new(),
            generation: 0,
            lookups: HashMap::new(),
            tls: TlsMemory::default(),
            local_pause_until: None,
            timers: BinaryHeap::new(),
            actions: VecDeque::new(),
            parked: Slab::new(),
            releasing: HashMap::new(),
            sites,
            wakes: BinaryHeap::new(),
            site_wakes: Vec::new(),
        }
    }

    /// The queue of undelivered recipients.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Our name: EHLO, the DSNs' reporting MTA.
    pub fn hostname(&self) -> &str {
        &self.cfg.hostname
    }

    /// A destination's name.
    pub fn dest_name(&self, dest: DestId) -> &str {
        &self.queue.dest(dest).name
    }

    /// An egress source (`None` without `--source`: the kernel picks the address).
    pub fn source(&self, id: SourceId) -> Option<&Source> {
        self.cfg.sources.get(id)
    }

    /// The name of a destination's egress source, `-` when none, for attempt lines.
    pub fn source_name(&self, dest: DestId) -> &str {
        self.source(self.queue.dest(dest).source).map_or("-", |s| &s.name)
    }

    /// Connections open or opening.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// True when ready work could be started now (the loop should not sleep).
    pub fn has_work(&self) -> bool {
        self.queue.has_wanting() && self.local_pause_until.is_none()
    }

    /// The earliest time [`Engine::handle_timeout`] has something to do.
    pub fn next_deadline(&self, now: Now) -> Option<Instant> {
        let due = self.queue.next_due().map(|d| now.at + Duration::from_millis(d.saturating_sub(now.wall_ms)));
        let timer = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let wake = self.wakes.peek().map(|Reverse((t, _, _))| *t);
        let shaping = self.sites.next_end_ms().map(|ms| sites::at_ms(now.at, now.wall_ms, ms));
        [due, timer, self.local_pause_until, wake, shaping].into_iter().flatten().min()
    }

    /// The job a [`Action::Start`] names: its message's id and record, and recipient indexes.
    pub fn job(&self, conn: ConnId, next: bool) -> Option<(QueueId, MessageLoc, &[u32])> {
        let (job, m) = self.job_msg(conn, next)?;
        Some((job.id, m.loc, &job.rcpts))
    }

    /// The connection's current (or, with `next`, queued) job and its queued message.
    fn job_msg(&self, conn: ConnId, next: bool) -> Option<(&Job, &QMsg)> {
        let c = self.conn(conn)?;
        let f = if next { c.next.as_ref() } else { c.active.as_ref() }?;
        Some((&f.job, self.queue.msg(f.job.msg).filter(|m| m.id == f.job.id)?))
    }

    /// True when no recipient of the connection's job has been tried before: the message is
    /// fresh from this process's spool (or recovery has just checked its record), so the
    /// driver may read it without checking its crc again. A retry, possibly days later when
    /// its pages may have been read back from the disk, checks it.
    pub fn first_attempt(&self, conn: ConnId, next: bool) -> bool {
        self.job_msg(conn, next)
            .is_some_and(|(job, m)| job.rcpts.iter().all(|&r| m.rcpts.get(r as usize).is_some_and(|q| q.attempts == 0)))
    }

    /// An outcome record of message `id` went where `ticket` says (the message may already
    /// be finished, its release still to come).
    pub fn add_pin(&mut self, msg: MsgKey, id: QueueId, ticket: Pending) {
        if self.queue.msg(msg).is_some_and(|m| m.id == id) {
            self.queue.add_outcome(msg, ticket);
        } else if let Some(pins) = self.releasing.get_mut(&id) {
            pins.add(ticket);
        }
    }

    /// The pins of a finished message, for the [`Action::Settle`] that says `release`: every
    /// outcome record of the message has been appended by then (actions run in order).
    pub fn take_release(&mut self, id: QueueId) -> Pins {
        self.releasing.remove(&id).unwrap_or_default()
    }

    /// New connections are paused after a local shortage: a [`Action::Connect`] queued before
    /// it was found is handed back with [`Engine::handle_connect_skipped`].
    pub fn paused(&self, now: Now) -> bool {
        self.local_pause_until.is_some_and(|t| now.at < t)
    }

    /// A [`Action::Connect`] was not attempted (see [`Engine::paused`]): the connection is
    /// forgotten and its destination served again after the pause.
    pub fn handle_connect_skipped(&mut self, conn: ConnId) {
        self.close(conn);
    }

    /// A message was committed (or recovered): queue its open recipients.
    /// Its egress source is the one its record names, or a fresh choice when it names none
    /// or one no longer configured ([`super::sources::Sources::for_stored`]).
    pub fn handle_committed(&mut self, msg: &StoredMessage, env: &Envelope, now: Now) {
        let source = self.cfg.sources.for_stored(&env.source, msg.id.0);
        if self.queue.insert(msg, env, source, now.wall_ms).is_none() {
            self.actions.push_back(Action::Release { segment: msg.loc.segment, pins: msg.pins.clone() });
        }
    }

    /// Once per loop turn, and at [`Engine::next_deadline`]: due retries become ready, connect
    /// and idle timeouts fire, and destinations with ready work are served.
    pub fn handle_timeout(&mut self, now: Now) {
        self.queue.promote_due(now.wall_ms);
        while let Some(&Reverse((t, key, generation))) = self.timers.peek() {
            if t > now.at {
                break;
            }
            self.timers.pop();
            self.conn_timer(ConnId { key, generation }, t, now);
        }
        if self.sites.next_end_ms().is_some_and(|ms| ms <= now.wall_ms) {
            for (site, change) in self.sites.expire(now.at, now.wall_ms) {
                self.actions.push_back(Action::Note(Note::Shaping(change)));
                for d in self.sites.take_waiting(site) {
                    self.queue.want(d);
                }
            }
        }
        while let Some(&Reverse((t, kind, id))) = self.wakes.peek() {
            if t > now.at {
                break;
            }
            self.wakes.pop();
            let pending = self.pending_wake(kind, id);
            if *pending == Some(t) {
                *pending = None;
            }
            match kind {
                Wake::Site => {
                    for d in self.sites.take_waiting(id) {
                        self.queue.want(d);
                    }
                }
                Wake::Dest => self.queue.want(id),
            }
        }
        if self.local_pause_until.is_some_and(|t| now.at >= t) {
            self.local_pause_until = None;
        }
        if self.local_pause_until.is_none() {
            for dest in self.queue.take_wanting() {
                self.serve(dest, now);
            }
        }
    }

    /// The answer to a [`Action::Lookup`] of `name`. `is_self` tells whether an address is
    /// where this relay listens (mail sent there would loop).
    pub fn handle_route(
        &mut self,
        name: &str,
        result: Result<MxPlan, DnsError>,
        is_self: &mut dyn FnMut(SocketAddr) -> bool,
        now: Now,
    ) {
        let key = Resolver::canonical(name).unwrap_or_else(|| name.to_owned());
        let Some(dests) = self.lookups.remove(&key) else { return };
        let route = self.make_route(name, result, is_self, now);
        for dest in dests {
            let route = self.source_route(dest, &route, now);
            if let Route::Ready { addrs, .. } = &route {
                let relay = self.cfg.relay_host.as_ref().map(|(h, _)| h.as_str());
                let d = self.queue.dest(dest);
                let site = self.sites.site_for(d.source, &d.name, &route_hosts(addrs), relay, now.at);
                self.dest_state(dest).site = Some(site);
            }
            self.dest_state(dest).set_route(route);
            self.queue.want(dest);
        }
    }

    /// `route` as seen from `dest`'s egress source ([`Route::seen_from`]: only addresses of
    /// the source's family). When the mail exchangers have none, the destination cannot be
    /// reached from that source: its mail is deferred (`4.4.4`, not bounced: the source is
    /// our choice, and the DNS may change) and looked up again later, with a `no_route` line.
    fn source_route(&mut self, dest: DestId, route: &Route, now: Now) -> Route {
        let sources = self.cfg.sources.clone();
        let d = self.queue.dest(dest);
        // Without a source every address stays (`seen_from(None)`): nothing to filter.
        let Some(src) = sources.get(d.source) else { return route.clone() };
        let hosts = match route.seen_from(Some(src)) {
            Ok(route) => return route,
            Err(hosts) => hosts,
        };
        let fault = LocalFault::NoAddressOfFamily { family: src.family(), source: &src.name, hosts: &hosts };
        let reply = fault.reply();
        let note = Note::NoRoute { domain: d.name.clone(), source: src.name.clone(), error: reply.text.clone() };
        self.actions.push_back(Action::Note(note));
        Route::Failed { reply, permanent: false, until_ms: now.wall_ms + FAILED_ROUTE_TTL_MS }
    }

    /// The TCP connect of `conn` completed.
    pub fn handle_connected(&mut self, conn: ConnId) {
        if let Some(c) = self.conn_mut(conn) {
            c.connected = true;
        }
    }

    /// TLS is up on `conn` (`version` for the attempt lines).
    pub fn handle_tls(&mut self, conn: ConnId, version: &'static str) {
        if let Some(c) = self.conn_mut(conn) {
            c.tls = version;
        }
    }

    /// The session is ready (greeted, or a transaction ended): it takes the next job.
    pub fn handle_conn_ready(&mut self, conn: ConnId, now: Now) {
        let Some(c) = self.conn_mut(conn) else { return };
        if !c.greeted {
            c.greeted = true;
            let dest = c.dest;
            self.dest_state(dest).greeted();
        }
        self.take_job(conn, now);
    }

    /// The session can queue a transaction behind the current one: when the destination has a
    /// ready job (and the connection's budget allows), a [`Action::Start`] with `next` follows
    /// and true is returned.
    pub fn handle_can_queue(&mut self, conn: ConnId, now: Now) -> bool {
        let Some(c) = self.conn(conn) else { return false };
        let (dest, site) = (c.dest, c.site);
        let max = self.sites.effective(site).max_deliveries;
        // Counting the active transaction and the one to queue.
        if c.next.is_some() || c.active.is_none() || c.transactions.saturating_add(2) > max {
            return false;
        }
        if !self.queue.has_ready(dest)
            || self.held(dest, now).is_some()
            || self.sites.take_message(site, now.at).is_err()
        {
            return false;
        }
        let Some(job) = self.queue.pop_job(dest, now.wall_ms) else {
            self.sites.refund_message(site);
            return false;
        };
        self.begin_job(conn, job, true);
        true
    }

    /// A [`Action::Start`] could not start its transaction.
    pub fn handle_start_failed(&mut self, conn: ConnId, next: bool, why: StartFailure, now: Now) {
        let Some(c) = self.conn_mut(conn) else { return };
        let Some(f) = (if next { c.next.take() } else { c.active.take() }) else { return };
        let (remote, tls) = (c.remote.clone(), c.tls);
        let n = f.job.rcpts.len();
        match why {
            StartFailure::Unreadable => {
                let reply = LocalFault::Unreadable.reply();
                self.settle(f.job, None, vec![(Verdict::Deferred, reply); n], None, "none", now);
                // The connection is still good: park it for the next job (unless it is busy).
                if !next {
                    self.park_idle(conn, now);
                }
            }
            StartFailure::Refused(refusal) => {
                let (site, dest) = (c.site, c.dest);
                self.automate(site, dest, &refusal, now);
                // As start_transaction's refusals: the same reply for every recipient.
                let outcome =
                    rcpt_outcome(&refusal, false).unwrap_or_else(|| (Verdict::Deferred, LocalFault::NotQueued.reply()));
                self.settle(f.job, Some(f.attempts), vec![outcome; n], Some(remote), tls, now);
            }
        }
    }

    /// The transaction in progress on `conn` ended; the queued one (if any) is current now.
    pub fn handle_tx_done(&mut self, conn: ConnId, result: &TxResult, now: Now) {
        let Some(c) = self.conn_mut(conn) else { return };
        let Some(active) = c.active.take() else { return };
        c.active = c.next.take();
        c.transactions += 1;
        let (remote, tls, site, dest) = (c.remote.clone(), c.tls, c.site, c.dest);
        if result.data_reply.as_ref().is_some_and(Reply::is_positive_completion) && self.sites.delivered(site) {
            // The slow start allows one more connection: serve the destination again.
            self.queue.want(dest);
        }
        // Automation looks at every failure reply (once per distinct reply).
        let mut last: Option<&Reply> = None;
        for r in result.rcpt_replies.iter().chain(result.data_reply.as_ref()) {
            if r.code >= 400 && last != Some(r) {
                self.automate(site, dest, r, now);
                last = Some(r);
            }
        }
        let outcomes = result
            .rcpt_replies
            .iter()
            .map(|r| {
                rcpt_outcome(r, result.data_reply.is_some()).unwrap_or_else(|| match &result.data_reply {
                    Some(d) => (verdict(d.code), d.clone()),
                    None => (Verdict::Deferred, LocalFault::NoDataReply.reply()),
                })
            })
            .collect();
        self.settle(active.job, Some(active.attempts), outcomes, Some(remote), tls, now);
    }

    /// The connection broke (the driver closes nothing itself: a [`Action::Close`] follows).
    pub fn handle_conn_failed(&mut self, conn: ConnId, failure: ConnFailure<'_>, now: Now) {
        let Some(c) = self.conn(conn) else { return };
        let (greeted, host, addr, site, dest) = (c.greeted, c.host.clone(), c.peer, c.site, c.dest);
        if let ConnFailure::Session { failure: Failure { reply: Some(r), .. }, .. } = failure {
            if r.code >= 400 {
                self.automate(site, dest, r, now);
            }
        }
        match failure {
            ConnFailure::Connect(error) => self.refused(conn, host, addr, error.to_owned(), None, now),
            ConnFailure::Session { failure, tls_error, received } if failure.tls_status().is_some() => {
                self.tls_failed(conn, failure, tls_error, received, now)
            }
            ConnFailure::Session { failure, received, .. } if failure.auth_status().is_some() => {
                self.auth_failed(conn, failure, received, now)
            }
            ConnFailure::Session { failure, tls_error, received } => {
                let text = match tls_error {
                    Some(e) => format!("{failure} (TLS: {e})"),
                    None => format!("{failure}"),
                };
                if greeted {
                    self.conn_lost(conn, &text, received, now);
                } else {
                    // Refused before it ever said it was ready (421 or 5xx greeting, refused
                    // EHLO, closed): like a refused connect, try the next MX, then back off.
                    self.refused(conn, host, addr, text, None, now);
                }
            }
            ConnFailure::Io { received } => self.conn_lost(conn, "connection failed", received, now),
        }
    }

    /// The session ended after QUIT (or the connection is otherwise done).
    pub fn handle_closed(&mut self, conn: ConnId) {
        self.close(conn);
    }

    /// Opening `conn` failed for lack of a local resource (descriptors, ports, memory), not
    /// because of the destination: new connections pause for [`LOCAL_PAUSE`].
    pub fn handle_local_shortage(&mut self, conn: ConnId, error: &str, now: Now) {
        let Some(c) = self.conn(conn) else { return };
        let note = Note::ConnectError { host: c.host.clone(), addr: c.peer, error: error.to_owned() };
        self.actions.push_back(Action::Note(note));
        self.close(conn);
        self.local_pause_until = Some(now.at + LOCAL_PAUSE);
    }

    /// The answer to a [`Action::Bounce`]: the DSN as stored (and its envelope), or `None` when
    /// it could not be stored.
    pub fn handle_bounce(&mut self, token: usize, stored: Option<(&StoredMessage, &Envelope)>, now: Now) {
        let Some(parked) = self.parked.try_remove(token) else { return };
        let dsn = match stored {
            Some((msg, env)) => {
                self.handle_committed(msg, env, now);
                Ok(msg.id)
            }
            None => Err(()),
        };
        // The outcome records naming the DSN go right after it (the room reserved with it is
        // theirs): ahead of whatever else is queued.
        self.finish(parked, Some(dsn), now, true);
    }

    /// A queue flush (`sluice queue flush`, SIGUSR1): every deferred job is due now, and every
    /// destination is tried afresh — its connect backoff and failure count forgotten, a failed
    /// route looked up again. Returns (jobs made due, destinations that were held back).
    pub fn flush(&mut self) -> (usize, usize) {
        let due = self.queue.flush();
        let reset = self.dests.iter_mut().map(DestState::reset).filter(|&held| held).count();
        // Parked work of the destinations that were down goes now too.
        self.queue.want_all_ready();
        (due, reset)
    }

    /// New shaping rules (SIGHUP): limits apply at once; sites keep their state. Every
    /// destination whose route is known is regrouped at once (its site recomputed from the
    /// cached MX hosts with the new rules), not when its route expires: a new provider's
    /// `mx` patterns or a new `[domain]` entry take effect on the mail already queued. Its
    /// connections opened under the old site end after their transaction (see `take_job`).
    pub fn set_rules(&mut self, rules: Rules, now: Now) {
        self.sites.set_rules(rules, now.at);
        let relay = self.cfg.relay_host.as_ref().map(|(h, _)| h.as_str());
        let known = self.dests.len().min(self.queue.dest_count());
        for (id, state) in self.dests.iter_mut().enumerate().take(known) {
            let Route::Ready { addrs, .. } = &state.route else { continue };
            if state.site.is_some() {
                let d = self.queue.dest(id as DestId);
                state.site = Some(self.sites.site_for(d.source, &d.name, &route_hosts(addrs), relay, now.at));
            }
        }
        self.queue.want_all_ready();
    }

    /// Suspends a domain or a provider (or a site) until `until_ms`: its mail is parked, its
    /// connections end after their transaction. `Err` names an unknown provider.
    pub fn suspend(&mut self, scope: Scope, until_ms: u64, reason: &str, manual: bool) -> Result<(), String> {
        // Through a relay host every message is one destination (the relay host's), whatever
        // its recipients' domains: a domain or provider hold would silently hold nothing.
        if let (Some((host, _)), Scope::Domain(_) | Scope::Provider(_)) = (&self.cfg.relay_host, &scope) {
            return Err(format!(
                "with --relay-host all mail goes to {host}: suspending {scope} would hold nothing; suspend the relay host's site (--site, as `summary --by site` names it)"
            ));
        }
        let change = self.sites.suspend(scope, until_ms, reason, manual)?;
        self.actions.push_back(Action::Note(Note::Shaping(change)));
        Ok(())
    }

    /// Lifts a suspension; false when there was none. Parked mail is served at once.
    pub fn resume(&mut self, scope: &Scope) -> bool {
        // A domain has a site per egress source: each one's automatic suspension is lifted.
        let sites: Vec<Option<SiteId>> = match scope {
            Scope::Domain(d) => {
                self.queue.find_dests(d).iter().map(|&id| self.dests.get(id as usize).and_then(|s| s.site)).collect()
            }
            _ => Vec::new(),
        };
        let mut change = None;
        for site in sites.into_iter().chain(std::iter::once(None)) {
            change = change.or(self.sites.resume(scope, site));
        }
        let Some(change) = change else { return false };
        self.actions.push_back(Action::Note(Note::Shaping(change)));
        self.queue.want_all_ready();
        true
    }

    /// Every suspension in force, manual and automatic.
    pub fn suspensions(&self, now: Now) -> Vec<Suspension> {
        self.sites.suspensions(now.wall_ms)
    }

    /// The site of a destination, once its route is known.
    pub fn site_name(&self, dest: DestId) -> Option<&str> {
        let site = self.dests.get(dest as usize)?.site?;
        Some(self.sites.name(site))
    }

    /// Whether a destination is suspended now.
    pub fn suspended(&self, dest: DestId, now: Now) -> bool {
        let site = self.dests.get(dest as usize).and_then(|s| s.site);
        self.sites.blocked(site, &self.queue.dest(dest).name, now.wall_ms).is_some()
    }

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        self.conns.get(id.key as usize).filter(|c| c.generation == id.generation)
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(id.key as usize).filter(|c| c.generation == id.generation)
    }

    fn dest_state(&mut self, dest: DestId) -> &mut DestState {
        while self.dests.len() <= dest as usize {
            self.dests.push(DestState::new());
        }
        &mut self.dests[dest as usize]
    }

    /// Keeps the timer of `id` at its earliest deadline.
    fn arm(&mut self, id: ConnId) {
        let connect_timeout = self.cfg.connect_timeout;
        let Some(c) = self.conn_mut(id) else { return };
        let Some(d) = c.deadline(connect_timeout) else { return };
        if c.armed.is_none_or(|a| d < a) {
            c.armed = Some(d);
            self.timers.push(Reverse((d, id.key, id.generation)));
        }
    }

    /// A timer entry of `id` for `t` came due.
    fn conn_timer(&mut self, id: ConnId, t: Instant, now: Now) {
        let connect_timeout = self.cfg.connect_timeout;
        let Some(c) = self.conn_mut(id).filter(|c| c.armed == Some(t)) else { return };
        c.armed = None;
        match c.deadline(connect_timeout) {
            Some(d) if d <= now.at => {}
            Some(_) => return self.arm(id),
            None => return,
        }
        if !c.connected {
            // A host that does not answer: try the next address (RFC 5321 §5.1).
            let (host, addr) = (c.host.clone(), c.peer);
            let reply = LocalFault::Connect { host: &host, addr, why: "connection timed out" }.reply();
            self.refused(id, host, addr, "timeout".to_owned(), Some(reply), now);
            return;
        }
        c.idle_since = None;
        let dest = c.dest;
        self.dest_state(dest).idle.retain(|&(k, g)| !(k == id.key && g == id.generation));
        self.actions.push_back(Action::Quit { conn: id });
    }

    /// Builds the route from a lookup's result.
    fn make_route(
        &mut self,
        name: &str,
        result: Result<MxPlan, DnsError>,
        is_self: &mut dyn FnMut(SocketAddr) -> bool,
        now: Now,
    ) -> Route {
        let port = self.cfg.relay_host.as_ref().map_or(self.cfg.smtp_port, |(_, p)| *p);
        let result = result.map(|plan| {
            let ours: Vec<std::net::IpAddr> = plan
                .hosts
                .iter()
                .flat_map(|h| h.addrs.iter())
                .copied()
                .filter(|&ip| is_self(SocketAddr::new(ip, port)))
                .collect();
            route::without_self(plan, &self.cfg.hostname, |ip| ours.contains(&ip))
        });
        let failed_until = now.wall_ms + FAILED_ROUTE_TTL_MS;
        match result {
            Ok(None) => {
                // RFC 5321 §5.1: we are the best mail exchanger left, so there is nowhere to
                // send it (Postfix: "mail for X loops back to myself"). With a relay host it is
                // our configuration that is wrong: defer, never bounce.
                let reply = LocalFault::LoopsBack { domain: name }.reply();
                self.note_route("route", name, reply.text.clone());
                Route::Failed { reply, permanent: self.cfg.relay_host.is_none(), until_ms: failed_until }
            }
            Ok(Some(plan)) => {
                let addrs = plan.addresses().map(|(host, ip)| (Box::from(host), SocketAddr::new(ip, port))).collect();
                Route::Ready { addrs, until_ms: now.wall_ms + ROUTE_TTL_MS }
            }
            Err(error) => {
                let reply = LocalFault::Dns { domain: name, error }.reply();
                self.note_route("dns", name, reply.text.clone());
                // A smarthost that does not resolve is our problem, not the recipient's: defer
                // (as Postfix does for its relayhost), never bounce.
                let permanent = error.is_permanent() && self.cfg.relay_host.is_none();
                Route::Failed { reply, permanent, until_ms: failed_until }
            }
        }
    }

    fn note_route(&mut self, event: &'static str, domain: &str, error: String) {
        self.actions.push_back(Action::Note(Note::Route { event, domain: domain.into(), error }));
    }

    /// Starts what can be started for one destination.
    fn serve(&mut self, dest: DestId, now: Now) {
        // Hand ready jobs to idle connections first (connection reuse); a connection that gets
        // none (no token) goes back to the idle list, so each is tried once.
        for _ in 0..self.dest_state(dest).idle.len() {
            if !self.queue.has_ready(dest) {
                break;
            }
            let Some((key, generation)) = self.dest_state(dest).idle.pop() else { break };
            let id = ConnId { key, generation };
            if self.conn(id).is_some_and(|c| c.active.is_none() && c.idle_since.is_some()) {
                self.take_job(id, now);
            }
        }
        if !self.queue.has_ready(dest) {
            return;
        }
        if let Some((until_ms, reply)) = self.held(dest, now) {
            // Suspended, or down (every address failed: Postfix's "delivery temporarily
            // suspended"): its ready work is parked — no connection, no outcome record, no
            // attempt counted — until the hold ends; the queue lifetime still runs.
            return self.park(dest, until_ms, &reply, now);
        }
        let state = self.dest_state(dest);
        state.expire_route(now.wall_ms);
        match &state.route {
            Route::Unknown => self.resolve(dest),
            Route::Resolving => {}
            Route::Failed { reply, permanent, .. } => {
                // Every ready job of this destination gets the lookup's verdict.
                let verdict = if *permanent { Verdict::Failed } else { Verdict::Deferred };
                let reply = reply.clone();
                self.settle_ready(dest, verdict, &reply, now);
            }
            Route::Ready { .. } => {
                let Some(site) = state.site else { return };
                let ready = self.queue.dest(dest).ready.len() as u32;
                let state = &self.dests[dest as usize];
                let mut want = ready.saturating_sub(state.opening);
                if state.failures > 0 || state.probing {
                    // Addresses failed lately: one connection probes before others follow.
                    want = want.min(1u32.saturating_sub(state.opening));
                }
                if want == 0 {
                    return;
                }
                let (may, rate_wait) = self.sites.may_open(site, now.at);
                // A rate-limited site gets no more connections than it has message tokens.
                let tokens = self.sites.message_tokens(site, now.at);
                let token_wait = match tokens {
                    0 => self.sites.message_ready(site, now.at).err(),
                    _ => None,
                };
                let n = want.min(may).min(tokens.min(u64::from(u32::MAX)) as u32);
                if let Some(t) = token_wait {
                    self.wait_token(site, dest, t, now);
                } else if n < want {
                    // Served again when a connection of the site closes or its rate allows.
                    self.sites.wait(site, dest);
                    if let Some(t) = rate_wait {
                        self.wake(Wake::Site, site, t);
                    }
                }
                for _ in 0..n {
                    let Some((index, host, addr)) = self.dests[dest as usize].next_address() else { return };
                    let host = Box::from(host);
                    // Credentials only ever go to the relay host through verified TLS: no
                    // shaping rule weakens `--relay-tls`.
                    let mode = self.cfg.relay_tls.unwrap_or(self.sites.effective(site).tls);
                    let policy = self.tls.policy(mode, addr, now.wall_ms);
                    self.open(dest, site, index, host, addr, (policy, mode), now);
                }
            }
        }
    }

    fn resolve(&mut self, dest: DestId) {
        let name = self.queue.dest(dest).name.clone();
        self.dest_state(dest).route = Route::Resolving;
        let key = Resolver::canonical(&name).unwrap_or_else(|| name.to_string());
        self.lookups.entry(key).or_default().push(dest);
        self.actions.push_back(Action::Lookup { name, host: self.cfg.relay_host.is_some() });
    }

    /// Opens a connection to `addr` (entry `index` of the destination's route) under `tls`
    /// (the policy of this connection, and the site's mode).
    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        dest: DestId,
        site: SiteId,
        index: usize,
        host: Box<str>,
        addr: SocketAddr,
        tls: (TlsPolicy, OutboundTls),
        now: Now,
    ) {
        self.generation = (self.generation + 1) & GENERATION_MASK;
        let generation = self.generation;
        let remote = Rc::from(format!("{host}[{}]", addr.ip()));
        let key = self.conns.insert(Conn {
            generation,
            dest,
            site,
            tls_mode: tls.1,
            addr_index: index,
            host: host.clone(),
            peer: addr,
            remote,
            opened: now.at,
            connected: false,
            greeted: false,
            tls: "none",
            active: None,
            next: None,
            transactions: 0,
            idle_since: None,
            armed: None,
        }) as u32;
        let state = self.dest_state(dest);
        state.conns += 1;
        state.opening += 1;
        self.sites.opened(site, now.at);
        let conn = ConnId { key, generation };
        self.arm(conn);
        let verify = matches!(tls.1, OutboundTls::Verify | OutboundTls::Implicit);
        let source = self.queue.dest(dest).source;
        self.actions.push_back(Action::Connect { conn, host, addr, tls: tls.0, verify, source });
    }

    /// The connection failed before its session was ready (`error` for the log; `reply`, if
    /// given, for the outcome, else one made of `error`): it is closed, and the next address is
    /// tried, or the destination's ready work deferred with the failure when every address
    /// failed.
    fn refused(
        &mut self,
        conn: ConnId,
        host: Box<str>,
        addr: SocketAddr,
        error: String,
        reply: Option<Reply>,
        now: Now,
    ) {
        let Some(c) = self.conn(conn) else { return };
        let (dest, index) = (c.dest, c.addr_index);
        let reply = reply.unwrap_or_else(|| LocalFault::Connect { host: &host, addr, why: &error }.reply());
        self.actions.push_back(Action::Note(Note::ConnectError { host, addr, error }));
        self.close(conn);
        self.connect_failed(dest, index, reply, false, now);
    }

    /// A connection to address `addr_index` failed before its session was ready. When every
    /// address failed in turn the destination is down: a host that does not answer (or
    /// refuses at the greeting) gets its ready work parked, with one `destination_down` line
    /// and no record per message; a host that answers but fails our TLS policy (`policy`) is
    /// up, and its ready work is deferred with the failure (class TLSRequired), as it would be
    /// for a `4yz` reply.
    fn connect_failed(&mut self, dest: DestId, addr_index: usize, reply: Reply, policy: bool, now: Now) {
        let backoff =
            DEST_BACKOFF_MS.min(self.cfg.policy.schedule.first().map_or(DEST_BACKOFF_MS, |d| d.as_millis() as u64));
        match self.dest_state(dest).connect_failed(addr_index, &reply, now.wall_ms, backoff) {
            ConnectFailed::TryAgain => self.queue.want(dest),
            ConnectFailed::Down if policy => self.settle_ready(dest, Verdict::Deferred, &reply, now),
            ConnectFailed::Down => {
                let note = Note::DestinationDown {
                    domain: self.queue.dest(dest).name.clone(),
                    until_ms: now.wall_ms + backoff,
                    error: reply.to_string(),
                };
                self.actions.push_back(Action::Note(note));
                // `serve` parks the ready work until the backoff ends.
                self.queue.want(dest);
            }
        }
    }

    /// The TLS policy failed on a connection (always before it was ready: STARTTLS comes right
    /// after EHLO). Under `may` a failed handshake is retried at once in plaintext on the same
    /// address, as Postfix does: no attempt is counted and the host is not marked down; the
    /// address is remembered so the next connections skip the handshake. Otherwise
    /// (`encrypt`/`verify`) it is a 4.7.x failure of the host, handled like a refused connect.
    fn tls_failed(&mut self, conn: ConnId, failure: &Failure, tls_error: Option<&str>, received: &[Reply], now: Now) {
        let Some(c) = self.conn(conn) else { return };
        let (dest, site, host, addr, index, mode) = (c.dest, c.site, c.host.clone(), c.peer, c.addr_index, c.tls_mode);
        let detail = match tls_error {
            Some(e) => format!("{failure}: {e}"),
            None => failure.to_string(),
        };
        if c.active.is_some() || c.greeted {
            // Not reachable (TLS only happens before the first job), but never strand a job.
            return self.conn_lost(conn, &detail, received, now);
        }
        self.close(conn);
        if failure.is_tls_handshake() && mode == OutboundTls::May {
            self.actions.push_back(Action::Note(Note::TlsFallback { host: host.clone(), addr, error: detail }));
            self.tls.remember(addr, now.wall_ms);
            self.open(dest, site, index, host, addr, (TlsPolicy::Off, mode), now);
            return;
        }
        let status = failure.tls_status().unwrap_or((4, 7, 0));
        let reply = LocalFault::Tls { detail: &detail, status, host: &host, addr }.reply();
        self.actions.push_back(Action::Note(Note::TlsError { host, addr, error: detail }));
        self.connect_failed(dest, index, reply, true, now);
    }

    /// AUTH to the relay host failed (a `535`, no usable mechanism): always before the session
    /// was ready. The mail is deferred with a 4.7.x reply and a record, never bounced: the
    /// credentials are our configuration, not the recipient's fault, and the host is up (as
    /// for a TLS policy failure). The next address is tried first, as for a refused connect.
    fn auth_failed(&mut self, conn: ConnId, failure: &Failure, received: &[Reply], now: Now) {
        let Some(c) = self.conn(conn) else { return };
        let (dest, host, addr, index) = (c.dest, c.host.clone(), c.peer, c.addr_index);
        let detail = failure.to_string();
        if c.active.is_some() || c.greeted {
            // Not reachable (AUTH only happens before the first job), but never strand a job.
            return self.conn_lost(conn, &detail, received, now);
        }
        self.close(conn);
        let status = failure.auth_status().unwrap_or((4, 7, 8));
        let reply = LocalFault::RelayAuth { detail: &detail, status, host: &host, addr }.reply();
        self.actions.push_back(Action::Note(Note::AuthFailed { host, addr, error: detail }));
        self.connect_failed(dest, index, reply, true, now);
    }

    /// The connection is unusable: its transaction (if any) is deferred, the connection closed.
    fn conn_lost(&mut self, conn: ConnId, why: &str, received: &[Reply], now: Now) {
        let Some(c) = self.conn_mut(conn) else { return };
        // The queued transaction (`next`) is left to `close`, which requeues it: none of its
        // replies was read and its message never went out (it would have been `active`), so it
        // was not attempted. Deferring it instead would tie it to the active job's retry times,
        // and a message that always breaks the connection would take it down every time.
        let active = c.active.take();
        let (remote, tls) = (c.remote.clone(), c.tls);
        self.close(conn);
        if let Some(a) = active {
            let lost = LocalFault::Lost { remote: &remote, why }.reply();
            // A recipient already refused keeps that reply (a 5xx fails it now rather than
            // after more attempts); the others are deferred with the lost connection.
            let outcomes = (0..a.job.rcpts.len())
                .map(|i| {
                    received
                        .get(i)
                        .and_then(|r| rcpt_outcome(r, false))
                        .unwrap_or_else(|| (Verdict::Deferred, lost.clone()))
                })
                .collect();
            self.settle(a.job, Some(a.attempts), outcomes, Some(remote), tls, now);
        }
    }

    /// Forgets a connection: its jobs go back to the ready list untried, the driver closes it.
    fn close(&mut self, conn: ConnId) {
        if self.conn(conn).is_none() {
            return;
        }
        let c = self.conns.remove(conn.key as usize);
        self.actions.push_back(Action::Close { conn });
        for f in [c.active, c.next].into_iter().flatten() {
            self.queue.requeue(&f.job);
        }
        let state = self.dest_state(c.dest);
        state.conns = state.conns.saturating_sub(1);
        if !c.greeted {
            state.opening = state.opening.saturating_sub(1);
        }
        state.idle.retain(|&(k, g)| !(k == conn.key && g == conn.generation));
        self.queue.want(c.dest);
        for d in self.sites.closed(c.site) {
            self.queue.want(d);
        }
    }

    /// Gives a ready connection the next job of its destination, or parks it as idle.
    fn take_job(&mut self, conn: ConnId, now: Now) {
        let Some(c) = self.conn(conn) else { return };
        let (dest, site, transactions) = (c.dest, c.site, c.transactions);
        let eff = self.sites.effective(site);
        // Its budget is spent, a throttle lowered the site's limit, the destination is held,
        // or a reload moved the destination to another site: the session ends.
        let quit = transactions >= eff.max_deliveries
            || self.sites.conns(site) > eff.connection_limit
            || self.held(dest, now).is_some()
            || self.dests.get(dest as usize).is_some_and(|s| s.site != Some(site));
        if quit {
            return self.quit(conn);
        }
        if !self.queue.has_ready(dest) {
            return self.park_idle(conn, now);
        }
        if let Err(t) = self.sites.take_message(site, now.at) {
            // No token: idle until one comes (the idle timeout may end it first).
            self.wait_token(site, dest, t, now);
            return self.park_idle(conn, now);
        }
        match self.queue.pop_job(dest, now.wall_ms) {
            Some(job) => self.begin_job(conn, job, false),
            None => {
                self.sites.refund_message(site);
                self.park_idle(conn, now)
            }
        }
    }

    fn quit(&mut self, conn: ConnId) {
        if let Some(c) = self.conn_mut(conn) {
            c.idle_since = None;
            self.actions.push_back(Action::Quit { conn });
        }
    }

    fn park_idle(&mut self, conn: ConnId, now: Now) {
        let Some(c) = self.conn(conn) else { return };
        let site = c.site;
        // Another destination of the site waits for a connection slot: give it this one.
        if self.sites.has_waiting_except(site, c.dest)
            && self.sites.conns(site) >= self.sites.effective(site).connection_limit
        {
            return self.quit(conn);
        }
        let Some(c) = self.conn_mut(conn) else { return };
        c.idle_since = Some(now.at);
        let dest = c.dest;
        self.dest_state(dest).idle.push((conn.key, conn.generation));
        self.arm(conn);
    }

    /// Puts `job` on the connection (`next`: behind the active one) and asks the driver to
    /// start it.
    fn begin_job(&mut self, conn: ConnId, job: Job, next: bool) {
        let Some(msg) = self.queue.msg(job.msg) else { return };
        let attempts = job.rcpts.iter().map(|&i| msg.rcpts[i as usize].attempts.saturating_add(1)).collect();
        let Some(c) = self.conn_mut(conn) else {
            self.queue.requeue(&job);
            return;
        };
        let f = Some(InFlight { job, attempts });
        if next {
            c.next = f;
        } else {
            c.idle_since = None;
            c.active = f;
        }
        self.actions.push_back(Action::Start { conn, next });
    }

    /// Why `dest` may not be served now: suspended, or down (backing off after every address
    /// failed). Returns when that ends (Unix ms) and the reply an expiring message gets.
    fn held(&self, dest: DestId, now: Now) -> Option<(u64, Reply)> {
        let state = self.dests.get(dest as usize);
        let site = state.and_then(|s| s.site);
        if let Some(Blocked::Suspended { until_ms, site, reason }) =
            self.sites.blocked(site, &self.queue.dest(dest).name, now.wall_ms)
        {
            return Some((until_ms, LocalFault::Suspended { site: &site, reason: &reason }.reply()));
        }
        let state = state?;
        (now.wall_ms < state.backoff_until_ms).then(|| {
            let reply = state.backoff_reply.clone().unwrap_or_else(|| LocalFault::DestinationDown.reply());
            (state.backoff_until_ms, reply)
        })
    }

    /// Parks the ready work of a held destination until `until_ms`: nothing is tried or
    /// recorded, except that messages whose lifetime ended fail with `4.4.7` naming `reply`
    /// (taken from the front of the ready list, oldest first); it is served again at the
    /// hold's end or the next expiry, whichever comes first.
    fn park(&mut self, dest: DestId, until_ms: u64, reply: &Reply, now: Now) {
        let wake_ms = self.expire_ready(dest, reply, now).map_or(until_ms, |e| e.min(until_ms));
        let at = if wake_ms <= now.wall_ms { now.at } else { sites::at_ms(now.at, now.wall_ms, wake_ms) };
        self.wake(Wake::Dest, dest, at);
    }

    /// Fails the messages at the front of `dest`'s ready list whose lifetime is over (they
    /// wait for a hold or a token, untried): `4.4.7` naming `reply`. Returns when the next
    /// one expires (Unix ms), if any is left.
    fn expire_ready(&mut self, dest: DestId, reply: &Reply, now: Now) -> Option<u64> {
        for _ in 0..SETTLE_PER_PASS {
            let arrival_ms = self.queue.ready_front_arrival(dest)?;
            let expires_ms = self.cfg.policy.expires_at_ms(arrival_ms);
            if expires_ms > now.wall_ms {
                return Some(expires_ms);
            }
            let job = self.queue.pop_job(dest, now.wall_ms)?;
            let outcomes = vec![(Verdict::Deferred, reply.clone()); job.rcpts.len()];
            self.settle(job, None, outcomes, None, "none", now);
        }
        Some(now.wall_ms)
    }

    /// `dest` waits for a message token of `site` until `at`: served again then, or when its
    /// oldest ready message expires.
    fn wait_token(&mut self, site: SiteId, dest: DestId, at: Instant, now: Now) {
        self.sites.wait(site, dest);
        self.wake(Wake::Site, site, at);
        let reply = LocalFault::RateLimited { site: self.sites.name(site) }.reply();
        if let Some(ms) = self.expire_ready(dest, &reply, now) {
            self.wake(Wake::Dest, dest, sites::at_ms(now.at, now.wall_ms, ms));
        }
    }

    /// Serves `id` (a site's waiting destinations, or one destination) again at `at`.
    /// At most one wake-up is pending per destination and per site: one due no later than
    /// `at` serves it then, and that serve asks again for what is still to wait for. So a
    /// destination parked for hours, or a site short of tokens many times a second, keeps one
    /// heap entry, not one per message or per try.
    fn wake(&mut self, kind: Wake, id: u32, at: Instant) {
        let pending = self.pending_wake(kind, id);
        if pending.is_some_and(|t| t <= at) {
            return;
        }
        *pending = Some(at);
        self.wakes.push(Reverse((at, kind, id)));
    }

    /// The pending wake-up slot of a destination or a site.
    fn pending_wake(&mut self, kind: Wake, id: u32) -> &mut Option<Instant> {
        match kind {
            Wake::Dest => &mut self.dest_state(id).wake_at,
            Wake::Site => {
                let i = id as usize;
                if self.site_wakes.len() <= i {
                    self.site_wakes.resize(i + 1, None);
                }
                &mut self.site_wakes[i]
            }
        }
    }

    /// Wake-up entries in the heap (stale ones included).
    #[cfg(test)]
    pub fn wake_entries(&self) -> usize {
        self.wakes.len()
    }

    /// A failure reply from a site about `dest`: automation may throttle or suspend the site.
    fn automate(&mut self, site: SiteId, dest: DestId, reply: &Reply, now: Now) {
        let text = reply.to_string();
        let domain = &self.queue.dest(dest).name;
        if let Some(change) = self.sites.on_reply(site, domain, &text, now.at, now.wall_ms) {
            self.actions.push_back(Action::Note(Note::Shaping(change)));
        }
    }

    /// Gives ready jobs of `dest` the same verdict without trying them (a destination that is
    /// down, a failed lookup), at most [`SETTLE_PER_PASS`] per call so that a large backlog
    /// does not stall the loop; the rest is taken up on the next pass.
    fn settle_ready(&mut self, dest: DestId, verdict: Verdict, reply: &Reply, now: Now) {
        for _ in 0..SETTLE_PER_PASS {
            let Some(job) = self.queue.pop_job(dest, now.wall_ms) else { return };
            let outcomes = vec![(verdict, reply.clone()); job.rcpts.len()];
            self.settle(job, None, outcomes, None, "none", now);
        }
        if self.queue.has_ready(dest) {
            self.queue.want(dest);
        }
    }

    /// Whether a failure of recipient `rcpt` of `msg` is reported in a DSN (RFC 3461 NOTIFY).
    fn wants_dsn(&self, msg: MsgKey, rcpt: u32) -> bool {
        self.queue
            .msg(msg)
            .and_then(|m| m.rcpts.get(rcpt as usize))
            .is_some_and(|r| dsn::notify_wants(r.notify(), DsnAction::Failed))
    }

    /// Decides every recipient of a job (`attempts`: per recipient, this attempt included;
    /// `None`: no attempt was made, the count still goes up). Failures a DSN must report wait
    /// for it to be stored ([`Action::Bounce`]); the rest settle now.
    fn settle(
        &mut self,
        job: Job,
        attempts: Option<Vec<u16>>,
        outcomes: Vec<(Verdict, Reply)>,
        remote: Option<Rc<str>>,
        tls: &'static str,
        now: Now,
    ) {
        let Some(msg) = self.queue.msg(job.msg).filter(|m| m.id == job.id) else { return };
        let (id, loc, arrival_ms, null_sender) = (msg.id, msg.loc, msg.arrival_ms, msg.null_sender);
        let tries = attempts
            .unwrap_or_else(|| job.rcpts.iter().map(|&i| msg.rcpts[i as usize].attempts.saturating_add(1)).collect());
        let settled = settle::decide(&self.cfg.policy, &job.rcpts, &tries, outcomes, arrival_ms, now.wall_ms);
        // The bounce goes into the spool before the failures it reports, and each failure it
        // covers names it: recovery retries a failure whose bounce did not survive a crash.
        let failed: Vec<(u32, Reply)> = if null_sender {
            Vec::new()
        } else {
            settled
                .iter()
                .filter(|s| s.verdict == Verdict::Failed && self.wants_dsn(job.msg, s.rcpt))
                .map(|s| (s.rcpt, s.reply.clone()))
                .collect()
        };
        let parked = Parked { job, loc, arrival_ms, settled, remote, tls };
        if failed.is_empty() {
            return self.finish(parked, None, now, false);
        }
        let room = settle::outcome_room(&parked.settled, parked.remote.as_deref().unwrap_or(""));
        let remote = parked.remote.clone();
        let token = self.parked.insert(parked);
        let request = BounceRequest { token, id, loc, arrival_ms, failed, remote, room };
        self.actions.push_back(Action::Bounce(Box::new(request)));
    }

    /// Settles a job in the queue and asks for its outcome records (`first`: before every
    /// queued action). `dsn`: the bounce that was due (`Err`: it could not be stored), `None`
    /// when none was.
    fn finish(&mut self, parked: Parked, dsn: Option<Result<QueueId, ()>>, now: Now, first: bool) {
        let Parked { job, loc, arrival_ms, mut settled, remote, tls } = parked;
        match dsn {
            Some(Ok(dsn_id)) => {
                // Only the failures the DSN reports (NOTIFY may leave some out).
                for s in settled.iter_mut().filter(|s| s.verdict == Verdict::Failed) {
                    if self.wants_dsn(job.msg, s.rcpt) {
                        s.bounce = Some(dsn_id);
                    }
                }
            }
            Some(Err(())) => {
                let wants_dsn = |r: u32| self.wants_dsn(job.msg, r);
                settle::keep_unbounced(&mut settled, wants_dsn, &self.cfg.policy, arrival_ms, now.wall_ms);
            }
            None => {}
        }
        if let Some(last) = settled.last() {
            // One clone per job (not per recipient), for `sluice queue summary`.
            self.dest_state(job.dest).last_reply = Some(last.reply.clone());
        }
        let mut finished = false;
        for s in &settled {
            finished = self.queue.settle(job.msg, s.rcpt, s.verdict.status(), s.attempts, s.next_ms);
        }
        let release = finished
            && self.queue.remove(job.msg).is_some_and(|m| {
                self.releasing.insert(m.id, m.pins);
                true
            });
        if !finished {
            self.queue.reschedule(job.msg, job.dest, now.wall_ms);
        }
        let settlement = Settlement {
            id: job.id,
            msg: job.msg,
            loc,
            dest: job.dest,
            arrival_ms,
            at_ms: now.wall_ms,
            remote,
            tls,
            rcpts: settled,
            release,
        };
        let action = Action::Settle(Box::new(settlement));
        if first {
            self.actions.push_front(action);
        } else {
            self.actions.push_back(action);
        }
    }
}

/// The MX host names of a route, in order, each once in a row (the site key's input).
fn route_hosts(addrs: &[(Box<str>, SocketAddr)]) -> Vec<&str> {
    let mut hosts: Vec<&str> = addrs.iter().map(|(h, _)| &**h).collect();
    hosts.dedup();
    hosts
}
