//! A fake-time harness for the delivery [`Engine`] (in the manner of quinn-proto's `Pair`):
//! scripted DNS answers and destinations, a spool that only records what it is asked to store,
//! and a clock that moves when a test says so. No sockets, no threads, no sleeps: every rule
//! of delivery runs in microseconds here, while the e2e suite stays the outer check.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::engine::{Action, ConnFailure, ConnId, Engine, Note, Now};
use super::route::Verdict;
use super::settle::Settled;
use super::tls::OutboundTls;
use super::DeliveryConfig;
use crate::dns::resolver::{DnsError, MxHost, MxPlan};
use crate::message::{Envelope, QueueId};
use crate::queue::schedule::RetryPolicy;
use crate::smtp::client::{Failure, FailureKind, TlsPolicy, TxResult};
use crate::smtp::reply::Reply;
use crate::spool::{MessageLoc, Pending, Pins, StoredMessage};

/// How a scripted destination address behaves.
#[derive(Clone, Debug)]
pub enum Host {
    /// The connect is refused.
    Refuse,
    /// The connect never completes.
    Silent,
    /// Connects, then greets with this refusal (`421`, `554`).
    Greet(Reply),
    /// Talks SMTP.
    Smtp(Server),
    /// Opening a socket fails here for lack of descriptors (EMFILE).
    Shortage,
}

/// A scripted SMTP server.
#[derive(Clone, Debug, Default)]
pub struct Server {
    /// Replies to RCPT by address (default `250`).
    pub rcpt: HashMap<String, Reply>,
    /// Reply after the data (default `250`).
    pub data: Option<Reply>,
    /// Offers STARTTLS.
    pub starttls: bool,
    /// The TLS handshake fails.
    pub broken_tls: bool,
    /// The connection breaks after the RCPT replies of the current transaction.
    pub drop_after_rcpt: bool,
    /// Offers PIPELINING: a transaction is queued behind the current one when work is ready.
    pub pipelining: bool,
    /// Transactions finish only when the test calls [`Harness::complete`].
    pub hold: bool,
    /// The first N transactions at this host (over all its connections) get this reply for
    /// every recipient (a `421 4.7.28` at MAIL, say).
    pub refuse_first: Option<(usize, Reply)>,
    /// AUTH (after TLS) gets this refusal: the session fails with `FailureKind::AuthFailed`.
    pub auth_refused: Option<Reply>,
}

/// What a harness connection is doing.
#[derive(Debug)]
struct Fake {
    addr: SocketAddr,
    active: Option<Tx>,
    next: Option<Tx>,
}

#[derive(Debug, Clone)]
struct Tx {
    rcpts: Vec<String>,
}

/// Something to tell the engine, in order.
#[derive(Debug)]
enum Ev {
    Route(String),
    Connected(ConnId),
    Tls(ConnId),
    Ready(ConnId),
    Fail(ConnId, Failure, Option<&'static str>),
    ConnectFail(ConnId, &'static str),
    CanQueue(ConnId),
    Complete(ConnId),
    Closed(ConnId),
}

/// An outcome record as the spool got it, in order.
#[derive(Debug, Clone)]
pub struct Record {
    /// The message.
    pub id: QueueId,
    /// The recipient's address.
    pub rcpt: String,
    /// What was recorded.
    pub settled: Settled,
    /// `host[ip]` that answered.
    pub remote: String,
    /// TLS version, or `none`.
    pub tls: &'static str,
    /// When it was recorded (time since the start).
    pub at: Duration,
}

/// An outcome in short: (recipient, verdict, reply code, enhanced code).
pub type Summary = (String, Verdict, u16, (u8, u16, u16));

/// The engine and its fake world.
pub struct Harness {
    pub engine: Engine,
    base: Instant,
    /// Time since the start.
    pub elapsed: Duration,
    dns: HashMap<String, Result<MxPlan, DnsError>>,
    hosts: HashMap<IpAddr, Host>,
    /// Addresses where "this relay" listens.
    pub own: Vec<SocketAddr>,
    conns: HashMap<ConnId, Fake>,
    pending: VecDeque<Ev>,
    messages: HashMap<u64, (QueueId, Envelope)>,
    next_id: u64,
    /// Bounces cannot be stored (a full disk).
    pub bounce_fails: bool,
    /// Every connect: (address, TLS policy).
    pub connects: Vec<(SocketAddr, TlsPolicy)>,
    /// Every lookup asked for.
    pub lookups: Vec<String>,
    /// Outcome records.
    pub records: Vec<Record>,
    /// Stored DSNs: (the DSN's id, the failed message, recipients reported), in order with
    /// `records` through `log`.
    pub bounces: Vec<(QueueId, QueueId, Vec<u32>)>,
    /// What was stored, in order: `O <id>` for an outcome record, `B <id>` for a DSN.
    pub log: Vec<String>,
    /// Messages finished and released.
    pub released: Vec<QueueId>,
    /// Every transaction started: whether it was its recipients' first attempt
    /// ([`Engine::first_attempt`]).
    pub first_attempts: Vec<bool>,
    /// Log notes.
    pub notes: Vec<Note>,
    /// Connections closed.
    pub closed: usize,
    /// Connections that were sent QUIT.
    pub quits: usize,
    /// The pins each message's outcome records should have given it (one fake ticket per
    /// record), checked against what the engine releases.
    pins: HashMap<QueueId, Pins>,
    tickets: u64,
    /// Connects that met a local shortage.
    pub shortages: usize,
    /// Transactions completed per host.
    tx_seen: HashMap<IpAddr, usize>,
}

/// A relay host-less configuration with the given knobs.
pub fn config(concurrency: u32, tls: OutboundTls) -> DeliveryConfig {
    DeliveryConfig {
        relay_host: None,
        smtp_port: 25,
        domain_concurrency: concurrency,
        policy: RetryPolicy { schedule: vec![Duration::from_secs(60)], max_lifetime: Duration::from_secs(3600) },
        hostname: "relay.test".into(),
        connect_timeout: Duration::from_secs(10),
        tls_mode: tls,
        relay_tls: None,
        shaping: crate::shaping::Rules::load(None, true).expect("the built-in profiles load"),
        sources: Default::default(),
    }
}

/// [`config`] with a shaping file over the built-in profiles.
pub fn config_shaped(concurrency: u32, tls: OutboundTls, file: &str) -> DeliveryConfig {
    let shaping = crate::shaping::Rules::load(Some(("shaping.toml", file)), true).expect("the shaping file loads");
    DeliveryConfig { shaping, ..config(concurrency, tls) }
}

/// `250 2.0.0 Ok`-style reply.
pub fn reply(code: u16, status: (u8, u16, u16), text: &str) -> Reply {
    Reply::new(code, Some(status), text)
}

impl Harness {
    /// A harness around an engine with `cfg`; the wall clock starts at 1,000,000 ms.
    pub fn new(cfg: DeliveryConfig) -> Harness {
        Harness {
            engine: Engine::new(cfg),
            base: Instant::now(),
            elapsed: Duration::ZERO,
            dns: HashMap::new(),
            hosts: HashMap::new(),
            own: Vec::new(),
            conns: HashMap::new(),
            pending: VecDeque::new(),
            messages: HashMap::new(),
            next_id: 1,
            bounce_fails: false,
            connects: Vec::new(),
            lookups: Vec::new(),
            records: Vec::new(),
            bounces: Vec::new(),
            log: Vec::new(),
            released: Vec::new(),
            first_attempts: Vec::new(),
            notes: Vec::new(),
            closed: 0,
            quits: 0,
            pins: HashMap::new(),
            tickets: 0,
            shortages: 0,
            tx_seen: HashMap::new(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Now {
        Now { at: self.base + self.elapsed, wall_ms: 1_000_000 + self.elapsed.as_millis() as u64 }
    }

    /// `domain` has these MX hosts: (name, preference, address).
    pub fn mx(&mut self, domain: &str, hosts: &[(&str, u16, [u8; 4])]) {
        let hosts = hosts
            .iter()
            .map(|&(name, preference, a)| MxHost { name: name.into(), preference, addrs: vec![IpAddr::from(a)] })
            .collect();
        self.dns.insert(domain.into(), Ok(MxPlan { hosts }));
    }

    /// `domain` has these MX hosts, each with its addresses of either family.
    pub fn mx_ips(&mut self, domain: &str, hosts: &[(&str, u16, &[IpAddr])]) {
        let hosts = hosts
            .iter()
            .map(|&(name, preference, addrs)| MxHost { name: name.into(), preference, addrs: addrs.to_vec() })
            .collect();
        self.dns.insert(domain.into(), Ok(MxPlan { hosts }));
    }

    /// The host at `ip` (of either family) behaves like this.
    pub fn host_ip(&mut self, ip: IpAddr, h: Host) {
        self.hosts.insert(ip, h);
    }

    /// Looking up `domain` fails.
    pub fn dns_error(&mut self, domain: &str, e: DnsError) {
        self.dns.insert(domain.into(), Err(e));
    }

    /// The host at `ip` behaves like this.
    pub fn host(&mut self, ip: [u8; 4], h: Host) {
        self.host_ip(IpAddr::from(ip), h);
    }

    /// A committed message from `sender` (empty: the null sender) to `rcpts`.
    pub fn submit(&mut self, sender: &str, rcpts: &[&str]) -> QueueId {
        let mut env = Envelope::default();
        env.sender.extend_from_slice(sender.as_bytes());
        for r in rcpts {
            env.push_rcpt(r.as_bytes(), b"", 0);
        }
        self.submit_env(env)
    }

    /// A committed message with this envelope.
    pub fn submit_env(&mut self, env: Envelope) -> QueueId {
        let id = QueueId(self.next_id);
        self.next_id += 1;
        let msg = self.stored(id);
        self.engine.handle_committed(&msg, &env, self.now());
        self.messages.insert(id.0, (id, env));
        id
    }

    fn stored(&self, id: QueueId) -> StoredMessage {
        let loc = MessageLoc { segment: id.0, offset: 0, len: 0 };
        StoredMessage { id, loc, arrival_ms: self.now().wall_ms, rcpts: Vec::new(), pins: Default::default() }
    }

    /// Lets the clock move by `d`, then runs.
    pub fn advance(&mut self, d: Duration) {
        self.elapsed += d;
        self.run();
    }

    /// Sleeps as the driver does: to the engine's next deadline (never less than 1 ms ahead),
    /// then runs. False when the engine has no deadline (it would sleep forever).
    pub fn sleep(&mut self) -> bool {
        let now = self.now();
        let Some(t) = self.engine.next_deadline(now) else { return false };
        self.elapsed += t.saturating_duration_since(now.at).max(Duration::from_millis(1));
        self.run();
        true
    }

    /// Loop turns (timers and ready work, then every action and its consequences) until
    /// nothing moves; bounded, as a test must stop.
    pub fn run(&mut self) {
        for _ in 0..1000 {
            self.engine.handle_timeout(self.now());
            let mut moved = false;
            loop {
                while let Some(a) = self.engine.poll_action() {
                    moved = true;
                    self.act(a);
                }
                let Some(ev) = self.pending.pop_front() else { break };
                moved = true;
                self.deliver(ev);
            }
            if !moved {
                return;
            }
        }
        panic!("the engine never settled down: a livelock");
    }

    /// The connection to `ip` breaks (reading or writing failed), with no RCPT reply read.
    pub fn drop_conn(&mut self, ip: [u8; 4]) {
        let ids: Vec<ConnId> =
            self.conns.iter().filter(|(_, f)| f.addr.ip() == IpAddr::from(ip)).map(|(id, _)| *id).collect();
        for id in ids {
            self.engine.handle_conn_failed(id, ConnFailure::Io { received: &[] }, self.now());
        }
        self.run();
    }

    /// Finishes the transaction in progress on every held connection to `ip`.
    pub fn complete(&mut self, ip: [u8; 4]) {
        let ids: Vec<ConnId> =
            self.conns.iter().filter(|(_, f)| f.addr.ip() == IpAddr::from(ip)).map(|(id, _)| *id).collect();
        for id in ids {
            self.pending.push_back(Ev::Complete(id));
        }
        self.run();
    }

    /// Outcome records of message `id`: (recipient, verdict, reply code, enhanced code).
    pub fn outcomes(&self, id: QueueId) -> Vec<Summary> {
        self.records
            .iter()
            .filter(|r| r.id == id)
            .map(|r| {
                (r.rcpt.clone(), r.settled.verdict, r.settled.reply.code, r.settled.reply.enhanced.unwrap_or_default())
            })
            .collect()
    }

    /// The id of destination `name`.
    pub fn dest(&self, name: &str) -> crate::queue::DestId {
        let q = self.engine.queue();
        (0..q.dest_count() as crate::queue::DestId).find(|&d| &*q.dest(d).name == name).expect("a known destination")
    }

    /// Connections open in the fake world.
    pub fn open(&self) -> usize {
        self.conns.len()
    }

    fn server(&self, addr: SocketAddr) -> Option<Server> {
        match self.hosts.get(&addr.ip()) {
            Some(Host::Smtp(s)) => Some(s.clone()),
            _ => None,
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Lookup { name, .. } => {
                self.lookups.push(name.to_string());
                self.pending.push_back(Ev::Route(name.to_string()));
            }
            Action::Connect { conn, addr, tls, .. } => {
                // As the driver: a shortage found earlier in the batch skips the rest.
                if self.engine.paused(self.now()) {
                    return self.engine.handle_connect_skipped(conn);
                }
                if matches!(self.hosts.get(&addr.ip()), Some(Host::Shortage)) {
                    self.shortages += 1;
                    return self.engine.handle_local_shortage(conn, "Too many open files", self.now());
                }
                self.connects.push((addr, tls));
                self.conns.insert(conn, Fake { addr, active: None, next: None });
                match self.hosts.get(&addr.ip()).cloned().unwrap_or(Host::Refuse) {
                    Host::Refuse | Host::Shortage => {
                        self.pending.push_back(Ev::ConnectFail(conn, "Connection refused"))
                    }
                    Host::Silent => {}
                    Host::Greet(r) => {
                        self.pending.push_back(Ev::Connected(conn));
                        let kind =
                            if r.is_permanent() { FailureKind::GreetingRefused } else { FailureKind::ServiceClosing };
                        self.pending.push_back(Ev::Fail(conn, Failure { reply: Some(r), kind }, None));
                    }
                    Host::Smtp(s) => {
                        self.pending.push_back(Ev::Connected(conn));
                        match tls {
                            TlsPolicy::Required if !s.starttls => {
                                let f = Failure { reply: None, kind: FailureKind::TlsNotOffered };
                                self.pending.push_back(Ev::Fail(conn, f, None));
                                return;
                            }
                            TlsPolicy::Required | TlsPolicy::Opportunistic if s.starttls && s.broken_tls => {
                                let f = Failure { reply: None, kind: FailureKind::TlsHandshake };
                                self.pending.push_back(Ev::Fail(conn, f, Some("bad certificate")));
                                return;
                            }
                            TlsPolicy::Required | TlsPolicy::Opportunistic if s.starttls => {
                                self.pending.push_back(Ev::Tls(conn));
                            }
                            _ => {}
                        }
                        if let Some(r) = s.auth_refused {
                            let f = Failure { reply: Some(r), kind: FailureKind::AuthFailed };
                            self.pending.push_back(Ev::Fail(conn, f, None));
                            return;
                        }
                        self.pending.push_back(Ev::Ready(conn));
                    }
                }
            }
            Action::Start { conn, next } => {
                self.first_attempts.push(self.engine.first_attempt(conn, next));
                let (_, loc, rcpts) = self.engine.job(conn, next).expect("a started job is known");
                let env = &self.messages[&loc.segment].1;
                let tx = Tx { rcpts: rcpts.iter().map(|&i| addr(env, i)).collect() };
                let server = self.conns.get(&conn).and_then(|f| self.server(f.addr)).unwrap_or_default();
                let fake = self.conns.get_mut(&conn).expect("a started connection is open");
                if next {
                    fake.next = Some(tx);
                } else {
                    fake.active = Some(tx);
                    if server.pipelining {
                        self.pending.push_back(Ev::CanQueue(conn));
                    }
                    if !server.hold {
                        self.pending.push_back(Ev::Complete(conn));
                    }
                }
            }
            Action::Quit { conn } => {
                self.quits += 1;
                self.pending.push_back(Ev::Closed(conn));
            }
            Action::Close { conn } => {
                if self.conns.remove(&conn).is_some() {
                    self.closed += 1;
                }
            }
            Action::Settle(s) => {
                let env = &self.messages[&s.loc.segment].1;
                for r in &s.rcpts {
                    self.tickets += 1;
                    let ticket = Pending { segment: self.tickets, end: 0 };
                    self.engine.add_pin(s.msg, s.id, ticket);
                    self.pins.entry(s.id).or_default().add(ticket);
                    self.log.push(format!("O {}", s.id.0));
                    self.records.push(Record {
                        id: s.id,
                        rcpt: addr(env, r.rcpt),
                        settled: r.clone(),
                        remote: s.remote.as_deref().unwrap_or("").to_owned(),
                        tls: s.tls,
                        at: self.elapsed,
                    });
                }
                if s.release {
                    let pins = self.engine.take_release(s.id);
                    assert_eq!(pins, self.pins.remove(&s.id).unwrap_or_default(), "pins of {:?}", s.id);
                    self.released.push(s.id);
                }
            }
            Action::Bounce(b) => {
                if self.bounce_fails {
                    return self.engine.handle_bounce(b.token, None, self.now());
                }
                let sender = self.messages[&b.loc.segment].1.sender.clone();
                let mut env = Envelope::default();
                env.push_rcpt(&sender, b"", 0);
                let id = QueueId(self.next_id);
                self.next_id += 1;
                self.log.push(format!("B {}", id.0));
                self.bounces.push((id, b.id, b.failed.iter().map(|f| f.0).collect()));
                let msg = self.stored(id);
                self.messages.insert(id.0, (id, env.clone()));
                self.engine.handle_bounce(b.token, Some((&msg, &env)), self.now());
            }
            Action::Release { segment, .. } => self.released.push(QueueId(segment)),
            Action::Note(n) => self.notes.push(n),
        }
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now();
        match ev {
            Ev::Route(name) => {
                let answer = self.dns.get(&name).cloned().unwrap_or(Err(DnsError::NxDomain));
                let own = self.own.clone();
                self.engine.handle_route(&name, answer, &mut |a| own.contains(&a), now);
            }
            Ev::Connected(c) => self.engine.handle_connected(c),
            Ev::Tls(c) => self.engine.handle_tls(c, "TLSv1.3"),
            Ev::Ready(c) => self.engine.handle_conn_ready(c, now),
            Ev::Fail(c, f, tls_error) => {
                let failure = ConnFailure::Session { failure: &f, tls_error, received: &[] };
                self.engine.handle_conn_failed(c, failure, now);
            }
            Ev::ConnectFail(c, why) => self.engine.handle_conn_failed(c, ConnFailure::Connect(why), now),
            Ev::CanQueue(c) => {
                self.engine.handle_can_queue(c, now);
            }
            Ev::Closed(c) => self.engine.handle_closed(c),
            Ev::Complete(c) => {
                let Some(addr) = self.conns.get(&c).map(|f| f.addr) else { return };
                let server = self.server(addr).unwrap_or_default();
                let Some(tx) = self.conns.get_mut(&c).and_then(|f| f.active.take()) else { return };
                let ok = reply(250, (2, 1, 5), "ok");
                let seen = self.tx_seen.entry(addr.ip()).or_default();
                *seen += 1;
                let refused = server.refuse_first.as_ref().filter(|(n, _)| *seen <= *n).map(|(_, r)| r.clone());
                let rcpt_replies: Vec<Reply> = tx
                    .rcpts
                    .iter()
                    .map(|r| refused.clone().or_else(|| server.rcpt.get(r).cloned()).unwrap_or_else(|| ok.clone()))
                    .collect();
                if server.drop_after_rcpt {
                    self.engine.handle_conn_failed(c, ConnFailure::Io { received: &rcpt_replies }, now);
                    return;
                }
                let any = rcpt_replies.iter().any(Reply::is_positive_completion);
                let data = any.then(|| server.data.clone().unwrap_or_else(|| reply(250, (2, 0, 0), "queued")));
                let result = TxResult { mail_reply: reply(250, (2, 1, 0), "ok"), rcpt_replies, data_reply: data };
                self.engine.handle_tx_done(c, &result, now);
                let Some(fake) = self.conns.get_mut(&c) else { return };
                match fake.next.take() {
                    Some(next) => {
                        fake.active = Some(next);
                        if !server.hold {
                            self.pending.push_back(Ev::Complete(c));
                        }
                        if server.pipelining {
                            self.pending.push_back(Ev::CanQueue(c));
                        }
                    }
                    None => self.pending.push_back(Ev::Ready(c)),
                }
            }
        }
    }
}

fn addr(env: &Envelope, i: u32) -> String {
    String::from_utf8_lossy(env.rcpt(i as usize).addr).into_owned()
}
