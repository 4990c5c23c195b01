//! Pure: the stub-resolver state machine that turns a recipient domain into an ordered list of
//! mail exchangers with addresses (RFC 5321 §5.1), over a recursive DNS server.
//!
//! Owns: query ids (random, never two outstanding alike), matching answers to queries (id *and*
//! question, else dropped), one retry per query then a timeout, truncation → the same question
//! over TCP (RFC 7766 §5), CNAME chasing, coalescing of identical lookups and questions, the
//! cache ([`Cache`]), and MX policy: preference order with equal preferences shuffled, implicit
//! MX on NODATA, null MX (RFC 7505), address literals. Must never: touch a socket or read the
//! clock — bytes and `now` come in, bytes and results go out.
//!
//! # Driving it
//! 1. Ask with [`Resolver::lookup_mx`] (recipient domains) or [`Resolver::lookup_host_addrs`]
//!    (`--relay-host`). A cached or literal answer is returned at once (`Poll::Ready`);
//!    otherwise the lookup is registered (`Poll::Pending`) and its result comes out later of
//!    [`Resolver::poll_done`] (MX) or [`Resolver::poll_host_done`] (host), exactly once per
//!    name however many times it was asked while pending.
//! 2. Send every [`Resolver::poll_transmit`] datagram to the server (over TCP, with the
//!    two-octet length prefix of RFC 1035 §4.2.2, when `tcp` is set).
//! 3. Feed every datagram or TCP message that comes back to [`Resolver::handle_response`].
//! 4. When [`Resolver::next_deadline`] has passed, call [`Resolver::handle_timeout`].
//! 5. After any of 1, 3 or 4, drain `poll_transmit` and `poll_done`/`poll_host_done`.
//!
//! # Failure policy (as Postfix)
//! NXDOMAIN for the domain bounces (`5.1.2`), a null MX bounces (`5.1.10`), MX hosts none of
//! which has an address bounce (`5.4.4`, Postfix's "Host or domain name not found" for the
//! exchanges) unless one of their lookups failed temporarily; SERVFAIL, REFUSED and timeouts
//! defer (`4.4.3`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::task::Poll;
use std::time::{Duration, Instant};

use slab::Slab;

use super::cache::{Cache, Cached, NEGATIVE_TTL_DEFAULT_S};
use super::wire::{self, Answer, QType, Rcode, RrData};

/// Why a lookup gave no usable mail exchanger. Permanent faults bounce, the others defer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsError {
    /// The domain publishes `MX 0 .`: it accepts no mail (RFC 7505 §3). Permanent, `5.1.10`.
    NullMx,
    /// The domain does not exist (RFC 2308 §2.1). Permanent, `5.1.2`.
    NxDomain,
    /// No MX host (or the implicit MX) has an A or AAAA record. Permanent, `5.4.4`.
    NoAddresses,
    /// The domain is not a valid domain name or address literal. Permanent, `5.1.2`.
    InvalidName,
    /// The server answered SERVFAIL (or another error code). Temporary, `4.4.3`.
    ServFail,
    /// The server answered REFUSED. Temporary, `4.4.3`.
    Refused,
    /// No answer after a retry. Temporary, `4.4.3`.
    Timeout,
    /// The answer could not be used: a CNAME chain too long, or a CNAME loop (even a name
    /// that is its own alias: a broken zone its owner can fix, not a name without an
    /// address). Temporary, `4.4.3`.
    Malformed,
}

impl DnsError {
    /// True when the message should bounce now rather than be retried.
    pub fn is_permanent(self) -> bool {
        matches!(self, DnsError::NullMx | DnsError::NxDomain | DnsError::NoAddresses | DnsError::InvalidName)
    }

    /// The enhanced status code of the delivery status (RFC 3463; `X.1.10` from RFC 7505 §4.2).
    /// The SMTP reply code that goes with it is the delivery side's (see `LocalFault::Dns`).
    pub fn status(self) -> (u8, u16, u16) {
        match self {
            DnsError::NullMx => (5, 1, 10),
            DnsError::NxDomain | DnsError::InvalidName => (5, 1, 2),
            DnsError::NoAddresses => (5, 4, 4),
            DnsError::ServFail | DnsError::Refused | DnsError::Timeout | DnsError::Malformed => (4, 4, 3),
        }
    }

    /// A human-readable reason, without the domain.
    pub fn text(self) -> &'static str {
        match self {
            DnsError::NullMx => "Domain does not accept mail (null MX)",
            DnsError::NxDomain => "Host or domain name not found (NXDOMAIN)",
            DnsError::NoAddresses => "No address found for any mail exchanger",
            DnsError::InvalidName => "Invalid domain name",
            DnsError::ServFail => "DNS server failure (SERVFAIL)",
            DnsError::Refused => "DNS server refused the query",
            DnsError::Timeout => "DNS query timed out",
            DnsError::Malformed => "Unusable DNS answer",
        }
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (c, s, d) = self.status();
        write!(f, "{c}.{s}.{d} {}", self.text())
    }
}

impl std::error::Error for DnsError {}

/// One mail exchanger with its addresses (IPv4 first, each family shuffled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Canonical host name (for an address literal, the literal as written, brackets included).
    pub name: String,
    /// MX preference (0 for an implicit MX, a literal or a relay host).
    pub preference: u16,
    /// Never empty.
    pub addrs: Vec<IpAddr>,
}

/// Where to deliver for one domain: hosts in the order to try (RFC 5321 §5.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MxPlan {
    /// By ascending preference, equal preferences shuffled; never empty in an `Ok` plan.
    pub hosts: Vec<MxHost>,
}

impl MxPlan {
    /// Every (host, address) in order: the sequence of connection attempts.
    pub fn addresses(&self) -> impl Iterator<Item = (&str, IpAddr)> + '_ {
        self.hosts.iter().flat_map(|h| h.addrs.iter().map(move |a| (h.name.as_str(), *a)))
    }
}

/// A query to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Its message id (to match a TCP connection to its query).
    pub id: u16,
    /// The DNS message, without a TCP length prefix.
    pub bytes: Vec<u8>,
    /// Send over TCP (the UDP answer was truncated).
    pub tcp: bool,
}

/// What [`Resolver::handle_response`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// It answered an outstanding query.
    Accepted,
    /// It was ignored, and why (spoofed, late, duplicate or garbage).
    Dropped(&'static str),
}

/// Tunables; [`Default`] suits a relay talking to a nearby recursive resolver.
#[derive(Debug, Clone)]
pub struct ResolverOptions {
    /// How long to wait for each attempt.
    pub query_timeout: Duration,
    /// Attempts per query (per transport) before it fails with [`DnsError::Timeout`].
    pub attempts: u8,
    /// Names the cache holds.
    pub cache_capacity: usize,
    /// Queries outstanding at once; further questions wait for a free slot.
    pub max_outstanding: usize,
    /// MX hosts kept per domain after ordering (Postfix's `smtp_mx_address_limit` spirit).
    pub max_mx_hosts: usize,
}

impl Default for ResolverOptions {
    fn default() -> ResolverOptions {
        ResolverOptions {
            query_timeout: Duration::from_secs(2),
            attempts: 2,
            cache_capacity: super::cache::DEFAULT_CAPACITY,
            max_outstanding: 4096,
            max_mx_hosts: 10,
        }
    }
}

/// CNAME hops followed inside one answer.
const MAX_CNAME_IN_ANSWER: usize = 8;
/// Extra queries made when an answer's CNAME leads to a name it has no data for.
const MAX_CNAME_REQUERIES: u8 = 2;

/// A question: (canonical name, type).
type Key = (String, QType);

/// A question being resolved; identical questions share one.
struct Question {
    /// The name asked now (the question's own name, or a CNAME target).
    asking: String,
    requeries: u8,
    /// Least TTL of the CNAMEs followed so far.
    chain_ttl: u32,
    /// Lookups to tell (slab keys), each once.
    waiters: Vec<usize>,
}

/// A query on the wire.
struct Outstanding {
    key: Key,
    name: String,
    qtype: QType,
    bytes: Vec<u8>,
    attempts: u8,
    deadline: Instant,
    tcp: bool,
}

struct HostSlot {
    name: String,
    preference: u16,
    a: Option<Cached>,
    aaaa: Option<Cached>,
}

/// One lookup: an MX lookup for a domain, or an address lookup for a relay host.
struct Lookup {
    name: String,
    host_only: bool,
    mx: Option<Cached>,
    hosts: Option<Vec<HostSlot>>,
}

/// xorshift64* (Vigna 2016): fast, seeded once from the OS by the driver. Unpredictable
/// enough for query ids to an on-path-free resolver and for shuffling; not a CSPRNG.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 spreads a weak seed; the state must not be zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Everything about questions and queries (split from the lookups so both can be borrowed).
struct Questions {
    opts: ResolverOptions,
    cache: Cache,
    rng: Rng,
    questions: HashMap<Key, Question>,
    outstanding: HashMap<u16, Outstanding>,
    /// Questions waiting for a free query slot.
    backlog: VecDeque<Key>,
    /// (deadline, id); entries whose query moved on are skipped when popped.
    deadlines: BinaryHeap<Reverse<(Instant, u16)>>,
    transmits: VecDeque<Transmit>,
}

/// The resolver. See the module documentation for the calling order.
pub struct Resolver {
    q: Questions,
    lookups: Slab<Lookup>,
    /// Pending MX lookups by domain, and host lookups by name: lookup coalescing.
    mx_pending: HashMap<String, usize>,
    host_pending: HashMap<String, usize>,
    done_mx: VecDeque<(String, Result<MxPlan, DnsError>)>,
    done_host: VecDeque<(String, Result<MxPlan, DnsError>)>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("lookups", &self.lookups.len())
            .field("outstanding", &self.q.outstanding.len())
            .field("cached_names", &self.q.cache.len())
            .finish()
    }
}

impl Resolver {
    /// A resolver with default options; `seed` feeds query ids and shuffles (take it from the OS).
    pub fn new(seed: u64) -> Resolver {
        Resolver::with_options(ResolverOptions::default(), seed)
    }

    /// A resolver with `opts`.
    pub fn with_options(opts: ResolverOptions, seed: u64) -> Resolver {
        Resolver {
            q: Questions {
                cache: Cache::new(opts.cache_capacity),
                opts,
                rng: Rng::new(seed),
                questions: HashMap::new(),
                outstanding: HashMap::new(),
                backlog: VecDeque::new(),
                deadlines: BinaryHeap::new(),
                transmits: VecDeque::new(),
            },
            lookups: Slab::new(),
            mx_pending: HashMap::new(),
            host_pending: HashMap::new(),
            done_mx: VecDeque::new(),
            done_host: VecDeque::new(),
        }
    }

    /// Where to deliver mail for `domain` (the part after `@`): MX hosts in order with their
    /// addresses, the implicit MX when there is no MX (RFC 5321 §5.1), or the address of a
    /// literal `[192.0.2.1]` / `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3). `Pending` means the
    /// result will come out of [`Resolver::poll_done`] under the canonical domain name (see
    /// [`Resolver::canonical`]).
    pub fn lookup_mx(&mut self, domain: &str, now: Instant) -> Poll<Result<MxPlan, DnsError>> {
        self.lookup(domain, false, now)
    }

    /// The addresses of one host (A and AAAA), for `--relay-host`: a bare IP address or a
    /// bracketed literal needs no query. The plan has one host with preference 0. `Pending`
    /// means the result will come out of [`Resolver::poll_host_done`].
    pub fn lookup_host_addrs(&mut self, name: &str, now: Instant) -> Poll<Result<MxPlan, DnsError>> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Poll::Ready(Ok(single(name, ip)));
        }
        self.lookup(name, true, now)
    }

    /// The key under which a pending lookup of `name` is reported: the canonical form (lower
    /// case, no trailing dot, IDNA A-labels). `None` for a literal or an invalid name, which
    /// are always answered at once.
    pub fn canonical(name: &str) -> Option<String> {
        if name.starts_with('[') {
            return None;
        }
        wire::canonical_name(name).ok()
    }

    fn lookup(&mut self, name: &str, host_only: bool, now: Instant) -> Poll<Result<MxPlan, DnsError>> {
        if name.starts_with('[') {
            return Poll::Ready(literal(name).map(|ip| single(name, ip)).ok_or(DnsError::InvalidName));
        }
        let Ok(name) = wire::canonical_name(name) else { return Poll::Ready(Err(DnsError::InvalidName)) };
        let index = if host_only { &self.host_pending } else { &self.mx_pending };
        if index.contains_key(&name) {
            return Poll::Pending;
        }
        let lid = self.lookups.insert(Lookup { name: name.clone(), host_only, mx: None, hosts: None });
        match self.step(lid, now) {
            Some(result) => {
                // Finished without waiting: it is registered with no question.
                self.lookups.remove(lid);
                Poll::Ready(result)
            }
            None => {
                let index = if host_only { &mut self.host_pending } else { &mut self.mx_pending };
                index.insert(name, lid);
                Poll::Pending
            }
        }
    }

    /// The next query to send, if any.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.q.transmits.pop_front()
    }

    /// The next finished MX lookup: (canonical domain, result).
    #[must_use]
    pub fn poll_done(&mut self) -> Option<(String, Result<MxPlan, DnsError>)> {
        self.done_mx.pop_front()
    }

    /// The next finished host lookup ([`Resolver::lookup_host_addrs`]): (canonical name, result).
    #[must_use]
    pub fn poll_host_done(&mut self) -> Option<(String, Result<MxPlan, DnsError>)> {
        self.done_host.pop_front()
    }

    /// When [`Resolver::handle_timeout`] should next be called (possibly a little early).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.q.deadlines.peek().map(|Reverse((t, _))| *t)
    }

    /// True while query `id` waits for an answer (the driver closes TCP connections of
    /// queries that are no longer outstanding).
    pub fn is_outstanding(&self, id: u16) -> bool {
        self.q.outstanding.contains_key(&id)
    }

    /// Lookups not yet finished.
    pub fn pending_lookups(&self) -> usize {
        self.lookups.len()
    }

    /// Retries queries whose attempt timed out (same id, same transport), and fails with
    /// [`DnsError::Timeout`] those out of attempts.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((deadline, id))) = self.q.deadlines.peek() {
            if deadline > now {
                break;
            }
            self.q.deadlines.pop();
            let Some(o) = self.q.outstanding.get_mut(&id) else { continue };
            if o.deadline != deadline {
                continue; // Superseded by a retry or the move to TCP.
            }
            if o.attempts < self.q.opts.attempts && !o.bytes.is_empty() {
                o.attempts += 1;
                o.deadline = now + self.q.opts.query_timeout;
                self.q.transmits.push_back(Transmit { id, bytes: o.bytes.clone(), tcp: o.tcp });
                self.q.deadlines.push(Reverse((o.deadline, id)));
                continue;
            }
            let Some(o) = self.q.outstanding.remove(&id) else { continue };
            self.q.refill(now);
            let e = if o.bytes.is_empty() { DnsError::Malformed } else { DnsError::Timeout };
            self.resolve(o.key, Cached::Failed(e), 0, now);
        }
    }

    /// Takes one response (a UDP datagram, or a TCP message without its length prefix). It
    /// is used only if its id is outstanding and its question is the one asked (name without
    /// regard to case, and type); anything else is dropped.
    pub fn handle_response(&mut self, bytes: &[u8], now: Instant, via_tcp: bool) -> Handled {
        let Ok(a) = wire::decode_answer(bytes) else { return Handled::Dropped("malformed") };
        let Some(o) = self.q.outstanding.get_mut(&a.id) else { return Handled::Dropped("unknown id") };
        let same_question = a.question.as_ref().is_some_and(|q| q.qtype == o.qtype.code() && q.name == o.name);
        if !same_question {
            return Handled::Dropped("question mismatch");
        }
        if o.tcp != via_tcp {
            return Handled::Dropped("wrong transport");
        }
        if a.truncated && !via_tcp {
            // RFC 7766 §5: the same question again over TCP, under the same id.
            o.tcp = true;
            o.attempts = 1;
            o.deadline = now + self.q.opts.query_timeout;
            self.q.transmits.push_back(Transmit { id: a.id, bytes: o.bytes.clone(), tcp: true });
            self.q.deadlines.push(Reverse((o.deadline, a.id)));
            return Handled::Accepted;
        }
        let Some(o) = self.q.outstanding.remove(&a.id) else { return Handled::Dropped("unknown id") };
        self.q.refill(now);
        if o.qtype == QType::Mx && a.rcode == Rcode::NoError {
            self.q.cache_glue(&a, now);
        }
        match interpret(&a, &o.name, o.qtype) {
            Outcome::Final(result, ttl) => self.resolve(o.key, result, ttl, now),
            Outcome::Follow(target, ttl) => {
                let Some(question) = self.q.questions.get_mut(&o.key) else { return Handled::Accepted };
                question.chain_ttl = question.chain_ttl.min(ttl);
                if question.requeries >= MAX_CNAME_REQUERIES || wire::canonical_name(&target).is_err() {
                    self.resolve(o.key, Cached::Failed(DnsError::Malformed), 0, now);
                } else {
                    question.requeries += 1;
                    question.asking = target;
                    self.q.send(o.key, now);
                }
            }
        }
        Handled::Accepted
    }

    /// Records the outcome of a question, caches it, and moves on every lookup waiting for it.
    fn resolve(&mut self, key: Key, result: Cached, ttl: u32, now: Instant) {
        let Some(question) = self.q.questions.remove(&key) else { return };
        let ttl = ttl.min(question.chain_ttl);
        self.q.cache.put(now, &key.0, key.1, result.clone(), ttl);
        for lid in question.waiters {
            let Some(lookup) = self.lookups.get_mut(lid) else { continue };
            lookup.fill(&key, &result);
            if let Some(done) = self.step(lid, now) {
                // Every slot is filled, so no other question still lists `lid` as a waiter
                // (slots fill only from the cache or from `resolve`, which drops the question):
                // the slab key can be reused safely.
                let lookup = self.lookups.remove(lid);
                if lookup.host_only {
                    self.host_pending.remove(&lookup.name);
                    self.done_host.push_back((lookup.name, done));
                } else {
                    self.mx_pending.remove(&lookup.name);
                    self.done_mx.push_back((lookup.name, done));
                }
            }
        }
    }

    /// Advances lookup `lid` as far as cached and known results allow; `Some` when finished.
    fn step(&mut self, lid: usize, now: Instant) -> Option<Result<MxPlan, DnsError>> {
        let Resolver { q, lookups, .. } = self;
        let lookup = lookups.get_mut(lid)?;
        if lookup.hosts.is_none() {
            let hosts = if lookup.host_only {
                vec![(0, lookup.name.clone())]
            } else {
                if lookup.mx.is_none() {
                    lookup.mx = q.ask(lid, &lookup.name, QType::Mx, now);
                }
                match lookup.mx.as_ref()? {
                    Cached::Failed(e) => return Some(Err(*e)),
                    Cached::NxDomain => return Some(Err(DnsError::NxDomain)),
                    // RFC 7505 §3: a null MX says the domain takes no mail; one in a set with
                    // other MX records is a broken zone, and we still honour the refusal.
                    Cached::Mx(set) if set.iter().any(|(_, host)| host.is_empty()) => {
                        return Some(Err(DnsError::NullMx));
                    }
                    Cached::Mx(set) if !set.is_empty() => {
                        let hosts = order_mx(set, &mut q.rng, q.opts.max_mx_hosts);
                        if hosts.is_empty() {
                            return Some(Err(DnsError::NoAddresses));
                        }
                        hosts
                    }
                    // RFC 5321 §5.1: no MX → the domain itself is the implicit MX, preference 0.
                    Cached::Mx(_) | Cached::NoData | Cached::Addrs(_) => vec![(0, lookup.name.clone())],
                }
            };
            lookup.hosts = Some(
                hosts
                    .into_iter()
                    .map(|(preference, name)| HostSlot { name, preference, a: None, aaaa: None })
                    .collect(),
            );
        }
        let hosts = lookup.hosts.as_mut()?;
        let mut waiting = false;
        for h in hosts.iter_mut() {
            if h.a.is_none() {
                h.a = q.ask(lid, &h.name, QType::A, now);
            }
            if h.aaaa.is_none() {
                h.aaaa = q.ask(lid, &h.name, QType::Aaaa, now);
            }
            waiting |= h.a.is_none() || h.aaaa.is_none();
        }
        if waiting {
            return None;
        }
        Some(build_plan(hosts, &mut q.rng))
    }
}

impl Lookup {
    fn fill(&mut self, key: &Key, result: &Cached) {
        if key.1 == QType::Mx {
            if !self.host_only && self.mx.is_none() && key.0 == self.name {
                self.mx = Some(result.clone());
            }
            return;
        }
        for h in self.hosts.iter_mut().flatten().filter(|h| h.name == key.0) {
            let slot = if key.1 == QType::A { &mut h.a } else { &mut h.aaaa };
            if slot.is_none() {
                *slot = Some(result.clone());
            }
        }
    }
}

impl Questions {
    /// The cached outcome of (`name`, `qtype`), or `None` after registering `lid` as a waiter
    /// of that question (starting a query if it is new).
    fn ask(&mut self, lid: usize, name: &str, qtype: QType, now: Instant) -> Option<Cached> {
        if let Some(hit) = self.cache.get(now, name, qtype) {
            return Some(hit.clone());
        }
        let key = (name.to_owned(), qtype);
        if let Some(question) = self.questions.get_mut(&key) {
            if !question.waiters.contains(&lid) {
                question.waiters.push(lid);
            }
            return None;
        }
        self.questions.insert(
            key.clone(),
            Question { asking: name.to_owned(), requeries: 0, chain_ttl: u32::MAX, waiters: vec![lid] },
        );
        self.send(key, now);
        None
    }

    /// Puts a query for question `key` on the wire, or in the backlog when all slots are taken.
    fn send(&mut self, key: Key, now: Instant) {
        if self.outstanding.len() >= self.opts.max_outstanding {
            self.backlog.push_back(key);
            return;
        }
        let Some(question) = self.questions.get(&key) else { return };
        let id = loop {
            let id = self.rng.next_u64() as u16;
            if !self.outstanding.contains_key(&id) {
                break id;
            }
        };
        let qtype = key.1;
        let Ok(bytes) = wire::encode_query(id, &question.asking, qtype) else {
            // Unreachable in practice (names are checked before they are asked), but a name
            // that does not encode must not hang its lookups: an attempt-less query with empty
            // bytes expires at once, and handle_timeout fails it as Malformed.
            let name = String::new();
            let o = Outstanding { key, name, qtype, bytes: Vec::new(), attempts: u8::MAX, deadline: now, tcp: false };
            self.outstanding.insert(id, o);
            self.deadlines.push(Reverse((now, id)));
            return;
        };
        let deadline = now + self.opts.query_timeout;
        self.transmits.push_back(Transmit { id, bytes: bytes.clone(), tcp: false });
        self.deadlines.push(Reverse((deadline, id)));
        let name = question.asking.clone();
        self.outstanding.insert(id, Outstanding { key, name, qtype, bytes, attempts: 1, deadline, tcp: false });
    }

    /// Sends backlogged questions while slots are free.
    fn refill(&mut self, now: Instant) {
        while self.outstanding.len() < self.opts.max_outstanding {
            let Some(key) = self.backlog.pop_front() else { break };
            self.send(key, now);
        }
    }

    /// Caches the A/AAAA records of the additional section that belong to the exchanges of
    /// this MX answer (and only those: anything else there is not ours to believe).
    fn cache_glue(&mut self, a: &Answer, now: Instant) {
        let exchanges: Vec<&str> = a
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RrData::Mx { exchange, .. } if !exchange.is_empty() => Some(exchange.as_str()),
                _ => None,
            })
            .collect();
        for host in exchanges {
            for qtype in [QType::A, QType::Aaaa] {
                let mut ttl = u32::MAX;
                let addrs: Vec<IpAddr> = a
                    .additionals
                    .iter()
                    .filter(|r| r.name == host)
                    .filter_map(|r| {
                        let ip = match (&r.data, qtype) {
                            (RrData::A(ip), QType::A) => IpAddr::V4(*ip),
                            (RrData::Aaaa(ip), QType::Aaaa) => IpAddr::V6(*ip),
                            _ => return None,
                        };
                        ttl = ttl.min(r.ttl);
                        Some(ip)
                    })
                    .collect();
                if !addrs.is_empty() && self.cache.get(now, host, qtype).is_none() {
                    self.cache.put(now, host, qtype, Cached::Addrs(addrs), ttl);
                }
            }
        }
    }
}

/// What one answer means for the question asked as `name`/`qtype`.
enum Outcome {
    /// The outcome, with the TTL it may be cached for.
    Final(Cached, u32),
    /// The answer's CNAME chain ends at a name it has no data for: ask that name (with the
    /// chain's TTL).
    Follow(String, u32),
}

fn interpret(a: &Answer, name: &str, qtype: QType) -> Outcome {
    let negative_ttl = a.soa.map_or(NEGATIVE_TTL_DEFAULT_S, |s| s.negative_ttl());
    match a.rcode {
        Rcode::NoError => {}
        Rcode::NxDomain => return Outcome::Final(Cached::NxDomain, negative_ttl),
        Rcode::Refused => return Outcome::Final(Cached::Failed(DnsError::Refused), 0),
        Rcode::ServFail | Rcode::Other(_) => return Outcome::Final(Cached::Failed(DnsError::ServFail), 0),
    }
    // Follow the CNAME chain inside the answer (RFC 1034 §3.6.2). A target already on the
    // chain is a loop (RFC 1034 §3.6.2: "CNAME chains should be followed and CNAME loops
    // signalled as an error"): temporary, like a chain too long, never "no such host".
    let mut chain = [""; MAX_CNAME_IN_ANSWER + 1];
    chain[0] = name;
    let mut owner = name;
    let mut ttl = u32::MAX;
    for hop in 1..=MAX_CNAME_IN_ANSWER {
        let next = a.answers.iter().find_map(|r| match &r.data {
            RrData::Cname(target) if r.name == owner => Some((target.as_str(), r.ttl)),
            _ => None,
        });
        let Some((target, cname_ttl)) = next else { break };
        if chain[..hop].iter().any(|n| n.eq_ignore_ascii_case(target)) {
            return Outcome::Final(Cached::Failed(DnsError::Malformed), 0);
        }
        chain[hop] = target;
        owner = target;
        ttl = ttl.min(cname_ttl);
    }
    let mut mx = Vec::new();
    let mut addrs = Vec::new();
    for r in a.answers.iter().filter(|r| r.name == owner) {
        match (&r.data, qtype) {
            (RrData::Mx { preference, exchange }, QType::Mx) => mx.push((*preference, exchange.clone())),
            (RrData::A(ip), QType::A) => addrs.push(IpAddr::V4(*ip)),
            (RrData::Aaaa(ip), QType::Aaaa) => addrs.push(IpAddr::V6(*ip)),
            _ => continue,
        }
        ttl = ttl.min(r.ttl);
    }
    if !mx.is_empty() {
        return Outcome::Final(Cached::Mx(mx), ttl);
    }
    if !addrs.is_empty() {
        return Outcome::Final(Cached::Addrs(addrs), ttl);
    }
    if owner != name {
        return Outcome::Follow(owner.to_owned(), ttl);
    }
    Outcome::Final(Cached::NoData, negative_ttl)
}

/// Sorts an MX set by preference, shuffles each run of equal preference (RFC 5321 §5.1),
/// drops duplicate exchanges (keeping the best preference) and keeps at most `max` hosts.
fn order_mx(set: &[(u16, String)], rng: &mut Rng, max: usize) -> Vec<(u16, String)> {
    // Exchanges that are not valid host names cannot be asked for (or connected to).
    let mut v: Vec<(u16, String)> =
        set.iter().filter(|(_, host)| wire::canonical_name(host).is_ok()).cloned().collect();
    v.sort();
    let mut seen = std::collections::HashSet::new();
    v.retain(|(_, host)| seen.insert(host.clone()));
    let mut start = 0;
    while start < v.len() {
        let end = start + v[start..].iter().take_while(|(p, _)| *p == v[start].0).count();
        rng.shuffle(&mut v[start..end]);
        start = end;
    }
    v.truncate(max.max(1));
    v
}

/// The plan from finished host slots: hosts without addresses are dropped; if none is left,
/// a temporary failure of any of their lookups wins over [`DnsError::NoAddresses`].
fn build_plan(hosts: &[HostSlot], rng: &mut Rng) -> Result<MxPlan, DnsError> {
    let mut plan = MxPlan::default();
    let mut temporary = None;
    for h in hosts {
        let mut addrs = Vec::new();
        for slot in [&h.a, &h.aaaa] {
            match slot {
                Some(Cached::Addrs(v)) => {
                    let from = addrs.len();
                    addrs.extend_from_slice(v);
                    rng.shuffle(&mut addrs[from..]);
                }
                Some(Cached::Failed(e)) => temporary = temporary.or(Some(*e)),
                _ => {}
            }
        }
        if !addrs.is_empty() {
            plan.hosts.push(MxHost { name: h.name.clone(), preference: h.preference, addrs });
        }
    }
    if plan.hosts.is_empty() {
        return Err(temporary.unwrap_or(DnsError::NoAddresses));
    }
    Ok(plan)
}

fn single(name: &str, ip: IpAddr) -> MxPlan {
    MxPlan { hosts: vec![MxHost { name: name.to_owned(), preference: 0, addrs: vec![ip] }] }
}

/// Parses an address literal, `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3; the
/// tag is case-insensitive). General address literals (other tags) are not supported.
pub fn literal(s: &str) -> Option<IpAddr> {
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    if inner.len() > 5 && inner[..5].eq_ignore_ascii_case("IPv6:") {
        return inner[5..].parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    // Fake time needs one real base instant; the code under test never reads the clock.
    use std::time::Instant;

    fn t0() -> Instant {
        Instant::now()
    }
    use crate::dns::wire::testing::{parse_query, Zone};
    use crate::dns::wire::{encode_query, peek_id};
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Answers every pending transmit from `zone` (over the transport asked) until none is
    /// left; returns the number of queries answered.
    fn answer_all(r: &mut Resolver, zone: &Zone, now: Instant) -> usize {
        let mut n = 0;
        while let Some(t) = r.poll_transmit() {
            n += 1;
            let resp = zone.respond(&t.bytes, t.tcp);
            assert_eq!(r.handle_response(&resp, now, t.tcp), Handled::Accepted);
        }
        n
    }

    /// Runs one MX lookup to its end: (result, queries it took).
    fn mx(r: &mut Resolver, zone: &Zone, domain: &str, now: Instant) -> (Result<MxPlan, DnsError>, usize) {
        match r.lookup_mx(domain, now) {
            Poll::Ready(res) => (res, 0),
            Poll::Pending => {
                let n = answer_all(r, zone, now);
                let (name, res) = r.poll_done().expect("lookup finished");
                assert_eq!(Some(name), Resolver::canonical(domain));
                assert!(r.poll_done().is_none());
                (res, n)
            }
        }
    }

    fn plan(hosts: &[(&str, u16, &[&str])]) -> MxPlan {
        MxPlan {
            hosts: hosts
                .iter()
                .map(|(n, p, a)| MxHost { name: (*n).into(), preference: *p, addrs: a.iter().map(|s| ip(s)).collect() })
                .collect(),
        }
    }

    fn example_zone() -> Zone {
        Zone::default()
            .mx("example.com", 20, "mx2.example.com")
            .mx("example.com", 10, "mx1.example.com")
            .addr("mx1.example.com", "192.0.2.1")
            .addr("mx1.example.com", "2001:db8::1")
            .addr("mx2.example.com", "192.0.2.2")
    }

    #[test]
    fn mx_in_preference_order_with_addresses() {
        let zone = example_zone();
        let mut r = Resolver::new(1);
        let (res, queries) = mx(&mut r, &zone, "Example.COM.", t0());
        let want =
            plan(&[("mx1.example.com", 10, &["192.0.2.1", "2001:db8::1"]), ("mx2.example.com", 20, &["192.0.2.2"])]);
        assert_eq!(res, Ok(want.clone()));
        assert_eq!(queries, 5, "MX, then A and AAAA for each of two hosts");
        let order: Vec<_> = want.addresses().map(|(_, a)| a).collect();
        assert_eq!(order, [ip("192.0.2.1"), ip("2001:db8::1"), ip("192.0.2.2")]);
    }

    #[test]
    fn equal_preferences_are_shuffled() {
        let mut zone = Zone::default().mx("eq.example", 20, "z.eq.example").mx("eq.example", 5, "first.eq.example");
        for h in ["a", "b", "c", "d"] {
            zone = zone.mx("eq.example", 10, &format!("{h}.eq.example"));
        }
        for h in ["a", "b", "c", "d", "z", "first"] {
            zone = zone.addr(&format!("{h}.eq.example"), "192.0.2.10");
        }
        let now = t0();
        let mut r = Resolver::new(7);
        let mut orders = std::collections::HashSet::new();
        for i in 0..40 {
            // Fresh questions each time for the first lookup, then the cache: both shuffle.
            let (res, _) = mx(&mut r, &zone, "eq.example", now + S * i);
            let hosts = res.unwrap().hosts;
            let prefs: Vec<u16> = hosts.iter().map(|h| h.preference).collect();
            assert_eq!(prefs, [5, 10, 10, 10, 10, 20]);
            assert_eq!(hosts[0].name, "first.eq.example");
            assert_eq!(hosts[5].name, "z.eq.example");
            orders.insert(hosts[1..5].iter().map(|h| h.name.clone()).collect::<Vec<_>>());
        }
        assert!(orders.len() > 5, "only {} orders of 24 seen", orders.len());
    }

    #[test]
    fn implicit_mx_on_nodata() {
        let zone = Zone::default().addr("plain.example", "192.0.2.5");
        let (res, queries) = mx(&mut Resolver::new(1), &zone, "plain.example", t0());
        assert_eq!(res, Ok(plan(&[("plain.example", 0, &["192.0.2.5"])])));
        assert_eq!(queries, 3);
        // Nothing at all behind the implicit MX: no address, permanent.
        let mut zone = Zone::default();
        zone.exists.insert("empty.example".into());
        let (res, _) = mx(&mut Resolver::new(1), &zone, "empty.example", t0());
        assert_eq!(res, Err(DnsError::NoAddresses));
        assert!(DnsError::NoAddresses.is_permanent());
    }

    #[test]
    fn null_mx_bounces() {
        let zone = Zone::default().mx("null.example", 0, "");
        let (res, queries) = mx(&mut Resolver::new(1), &zone, "null.example", t0());
        assert_eq!(res, Err(DnsError::NullMx));
        assert_eq!(queries, 1, "no address lookups for a null MX");
        assert!(DnsError::NullMx.is_permanent());
        assert_eq!(DnsError::NullMx.status(), (5, 1, 10));
    }

    #[test]
    fn nxdomain_bounces_and_is_cached() {
        let zone = Zone::default();
        let now = t0();
        let mut r = Resolver::new(1);
        let (res, _) = mx(&mut r, &zone, "nope.example", now);
        assert_eq!(res, Err(DnsError::NxDomain));
        assert_eq!(DnsError::NxDomain.status(), (5, 1, 2));
        // Negative TTL = min(SOA TTL 3600, MINIMUM 60).
        assert_eq!(r.lookup_mx("nope.example", now + S * 59), Poll::Ready(Err(DnsError::NxDomain)));
        assert!(r.poll_transmit().is_none());
        assert_eq!(r.lookup_mx("nope.example", now + S * 60), Poll::Pending);
    }

    #[test]
    fn servfail_and_refused_defer() {
        let mut zone = example_zone();
        zone.servfail.insert("broken.example".into());
        zone.refused.insert("closed.example".into());
        let now = t0();
        let mut r = Resolver::new(1);
        let (res, _) = mx(&mut r, &zone, "broken.example", now);
        assert_eq!(res, Err(DnsError::ServFail));
        assert!(!DnsError::ServFail.is_permanent());
        assert_eq!(DnsError::ServFail.status(), (4, 4, 3));
        assert_eq!(mx(&mut r, &zone, "closed.example", now).0, Err(DnsError::Refused));
        // Failures are remembered only briefly.
        assert_eq!(r.lookup_mx("broken.example", now + S * 4), Poll::Ready(Err(DnsError::ServFail)));
        assert_eq!(r.lookup_mx("broken.example", now + S * 5), Poll::Pending);

        // One MX host failing temporarily: the other is used; all failing: temporary.
        let mut zone = example_zone();
        zone.servfail.insert("mx2.example.com".into());
        let (res, _) = mx(&mut Resolver::new(1), &zone, "example.com", now);
        assert_eq!(res.unwrap().hosts.len(), 1);
        let mut zone = Zone::default().mx("d.example", 10, "gone.example").mx("d.example", 20, "bad.example");
        zone.servfail.insert("bad.example".into());
        assert_eq!(mx(&mut Resolver::new(1), &zone, "d.example", now).0, Err(DnsError::ServFail));
        zone.servfail.clear();
        assert_eq!(mx(&mut Resolver::new(1), &zone, "d.example", now).0, Err(DnsError::NoAddresses));
    }

    #[test]
    fn timeout_retries_once_then_fails() {
        let now = t0();
        let mut r = Resolver::new(1);
        assert_eq!(r.lookup_mx("slow.example", now), Poll::Pending);
        let first = r.poll_transmit().unwrap();
        assert!(r.poll_transmit().is_none());
        assert_eq!(r.next_deadline(), Some(now + 2 * S));
        r.handle_timeout(now + S);
        assert!(r.poll_transmit().is_none());
        r.handle_timeout(now + 2 * S);
        let retry = r.poll_transmit().unwrap();
        assert_eq!(retry, first, "same id, same bytes");
        assert!(r.poll_done().is_none());
        assert_eq!(r.next_deadline(), Some(now + 4 * S));
        r.handle_timeout(now + 4 * S);
        assert!(r.poll_transmit().is_none());
        assert_eq!(r.poll_done(), Some(("slow.example".into(), Err(DnsError::Timeout))));
        assert!(!r.is_outstanding(first.id));
        assert_eq!(r.pending_lookups(), 0);
        // A late answer is dropped.
        let late = Zone::default().respond(&first.bytes, false);
        assert_eq!(r.handle_response(&late, now + 5 * S, false), Handled::Dropped("unknown id"));

        // The retry's answer is accepted.
        let zone = example_zone();
        let mut r = Resolver::new(2);
        assert_eq!(r.lookup_mx("example.com", now), Poll::Pending);
        let q = r.poll_transmit().unwrap();
        r.handle_timeout(now + 2 * S);
        let q2 = r.poll_transmit().unwrap();
        assert_eq!(q.id, q2.id);
        assert_eq!(r.handle_response(&zone.respond(&q2.bytes, false), now + 3 * S, false), Handled::Accepted);
        answer_all(&mut r, &zone, now + 3 * S);
        assert!(r.poll_done().unwrap().1.is_ok());
    }

    #[test]
    fn mismatched_answers_are_dropped() {
        let zone = example_zone().addr("other.example", "192.0.2.99");
        let now = t0();
        let mut r = Resolver::new(3);
        assert_eq!(r.lookup_mx("example.com", now), Poll::Pending);
        let q = r.poll_transmit().unwrap();
        let good = zone.respond(&q.bytes, false);

        let mut wrong_id = good.clone();
        wrong_id[0] ^= 0x55;
        assert_eq!(r.handle_response(&wrong_id, now, false), Handled::Dropped("unknown id"));
        let other_name = zone.respond(&encode_query(q.id, "other.example", QType::Mx).unwrap(), false);
        assert_eq!(r.handle_response(&other_name, now, false), Handled::Dropped("question mismatch"));
        let other_type = zone.respond(&encode_query(q.id, "example.com", QType::A).unwrap(), false);
        assert_eq!(r.handle_response(&other_type, now, false), Handled::Dropped("question mismatch"));
        assert_eq!(r.handle_response(b"\x00\x01garbage", now, false), Handled::Dropped("malformed"));
        assert_eq!(r.handle_response(&q.bytes, now, false), Handled::Dropped("malformed"), "a query, not an answer");
        assert_eq!(r.handle_response(&good, now, true), Handled::Dropped("wrong transport"));
        assert!(r.poll_done().is_none());
        assert!(r.poll_transmit().is_none());

        // The name in the answer's question is matched without regard to case.
        let mut shouting = good.clone();
        for b in &mut shouting[12..12 + 13] {
            b.make_ascii_uppercase();
        }
        assert_eq!(r.handle_response(&shouting, now, false), Handled::Accepted);
        // A duplicate of an answered query is dropped.
        assert_eq!(r.handle_response(&good, now, false), Handled::Dropped("unknown id"));
        answer_all(&mut r, &zone, now);
        assert!(r.poll_done().unwrap().1.is_ok());
    }

    #[test]
    fn truncated_answer_is_asked_again_over_tcp() {
        let mut zone = Zone::default();
        for i in 0..40 {
            zone = zone.mx("big.example", 10 + i, &format!("a-long-mail-exchanger-host-name-{i}.big.example"));
        }
        zone = zone.addr("a-long-mail-exchanger-host-name-0.big.example", "192.0.2.40");
        let now = t0();
        let mut r = Resolver::new(4);
        assert_eq!(r.lookup_mx("big.example", now), Poll::Pending);
        let q = r.poll_transmit().unwrap();
        assert!(!q.tcp);
        let truncated = zone.respond(&q.bytes, false);
        assert!(crate::dns::wire::decode_answer(&truncated).unwrap().truncated);
        assert_eq!(r.handle_response(&truncated, now, false), Handled::Accepted);
        let t = r.poll_transmit().unwrap();
        assert_eq!((t.id, t.tcp, &t.bytes), (q.id, true, &q.bytes));
        // A UDP answer no longer counts for this query.
        assert_eq!(r.handle_response(&truncated, now, false), Handled::Dropped("wrong transport"));
        assert_eq!(r.handle_response(&zone.respond(&t.bytes, true), now, true), Handled::Accepted);
        answer_all(&mut r, &zone, now);
        let (_, res) = r.poll_done().unwrap();
        let hosts = res.unwrap().hosts;
        assert_eq!(hosts.len(), 1, "only hosts with addresses; 10 asked at most");
        assert_eq!(hosts[0].preference, 10);

        // A TCP query that times out is retried over TCP once, then fails.
        let mut r = Resolver::new(5);
        assert_eq!(r.lookup_mx("big.example", now), Poll::Pending);
        let q = r.poll_transmit().unwrap();
        r.handle_response(&zone.respond(&q.bytes, false), now, false);
        assert!(r.poll_transmit().unwrap().tcp);
        r.handle_timeout(now + 2 * S);
        assert!(r.poll_transmit().unwrap().tcp);
        r.handle_timeout(now + 4 * S);
        assert_eq!(r.poll_done().unwrap().1, Err(DnsError::Timeout));
    }

    #[test]
    fn concurrent_lookups_coalesce() {
        let zone = example_zone().mx("other.example", 10, "mx1.example.com");
        let now = t0();
        let mut r = Resolver::new(6);
        assert_eq!(r.lookup_mx("example.com", now), Poll::Pending);
        assert_eq!(r.lookup_mx("EXAMPLE.com.", now), Poll::Pending);
        assert_eq!(r.lookup_mx("other.example", now), Poll::Pending);
        // One MX query per domain; the shared exchange's A/AAAA are asked once.
        let mut asked = Vec::new();
        while let Some(t) = r.poll_transmit() {
            asked.push(parse_query(&t.bytes));
            r.handle_response(&zone.respond(&t.bytes, false), now, false);
        }
        let mut questions: Vec<_> = asked.iter().map(|(_, n, t)| (n.clone(), *t)).collect();
        questions.sort();
        questions.dedup();
        assert_eq!(questions.len(), asked.len(), "no question asked twice: {asked:?}");
        assert_eq!(asked.len(), 6);
        let mut done: Vec<_> = std::iter::from_fn(|| r.poll_done()).map(|(d, res)| (d, res.is_ok())).collect();
        done.sort();
        assert_eq!(done, [("example.com".into(), true), ("other.example".into(), true)]);
        // Now all cached: answered at once, no query.
        assert!(matches!(r.lookup_mx("example.com", now + S), Poll::Ready(Ok(_))));
        assert!(r.poll_transmit().is_none());
    }

    #[test]
    fn query_ids_are_random_and_unique() {
        let now = t0();
        let mut r = Resolver::new(8);
        for i in 0..3000 {
            assert_eq!(r.lookup_mx(&format!("d{i}.example"), now), Poll::Pending);
        }
        let ids: Vec<u16> = std::iter::from_fn(|| r.poll_transmit()).map(|t| t.id).collect();
        assert_eq!(ids.len(), 3000);
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), 3000);
        assert!(ids.windows(2).filter(|w| w[1] == w[0].wrapping_add(1)).count() < 5, "not sequential");
        let mut other = Resolver::new(9);
        assert_eq!(other.lookup_mx("d0.example", now), Poll::Pending);
        assert_ne!(other.poll_transmit().unwrap().id, ids[0], "the seed matters");
    }

    #[test]
    fn backlog_beyond_max_outstanding() {
        let opts = ResolverOptions { max_outstanding: 2, ..ResolverOptions::default() };
        let mut r = Resolver::with_options(opts, 1);
        let now = t0();
        let mut zone = Zone::default();
        for i in 0..5 {
            zone = zone.addr(&format!("h{i}.example"), "192.0.2.1");
            assert_eq!(r.lookup_mx(&format!("h{i}.example"), now), Poll::Pending);
        }
        let first: Vec<Transmit> = std::iter::from_fn(|| r.poll_transmit()).collect();
        assert_eq!(first.len(), 2);
        for t in first {
            r.handle_response(&zone.respond(&t.bytes, false), now, false);
        }
        answer_all(&mut r, &zone, now);
        assert_eq!(std::iter::from_fn(|| r.poll_done()).filter(|(_, res)| res.is_ok()).count(), 5);
    }

    #[test]
    fn cname_chains_are_followed() {
        let now = t0();
        // Recursive-resolver style: the chain and the data in one answer.
        let mut zone = example_zone();
        zone.cname.insert("alias.example".into(), "example.com".into());
        zone.cname.insert("www.example.com".into(), "mx2.example.com".into());
        zone = zone.mx("viacname.example", 10, "www.example.com");
        let mut r = Resolver::new(1);
        let (res, queries) = mx(&mut r, &zone, "alias.example", now);
        assert_eq!(res.unwrap().hosts.len(), 2);
        assert_eq!(queries, 5);
        let (res, _) = mx(&mut r, &zone, "viacname.example", now);
        assert_eq!(res, Ok(plan(&[("www.example.com", 10, &["192.0.2.2"])])));

        // Authoritative style: only the CNAME; the target is asked next.
        zone.chase_cname = false;
        let mut r = Resolver::new(1);
        let (res, queries) = mx(&mut r, &zone, "alias.example", now);
        assert_eq!(res.unwrap().hosts.len(), 2);
        assert_eq!(queries, 6);

        // A loop gives up as a temporary fault.
        zone.cname.insert("loop1.example".into(), "loop2.example".into());
        zone.cname.insert("loop2.example".into(), "loop1.example".into());
        let (res, queries) = mx(&mut Resolver::new(1), &zone, "loop1.example", now);
        assert_eq!(res, Err(DnsError::Malformed));
        assert_eq!(queries, 1 + usize::from(MAX_CNAME_REQUERIES));
        // A CNAME to nothing: NXDOMAIN.
        zone.chase_cname = true;
        zone.cname.insert("dangling.example".into(), "void.example".into());
        assert_eq!(mx(&mut Resolver::new(1), &zone, "dangling.example", now).0, Err(DnsError::NxDomain));
    }

    #[test]
    fn cname_loops_defer_whether_one_name_or_two() {
        // A name that is its own alias must not bounce as "no address" (5.4.4) while a
        // two-name loop defers: both are a broken zone, temporary (4.4.3).
        let now = t0();
        let mut zone = example_zone();
        zone.cname.insert("self.example".into(), "self.example".into());
        zone.cname.insert("loop1.example".into(), "loop2.example".into());
        zone.cname.insert("loop2.example".into(), "loop1.example".into());
        for chase in [true, false] {
            zone.chase_cname = chase;
            for name in ["self.example", "loop1.example"] {
                let (res, _) = mx(&mut Resolver::new(1), &zone, name, now);
                assert_eq!(res, Err(DnsError::Malformed), "{name}, chased by the server: {chase}");
                assert!(!DnsError::Malformed.is_permanent());
            }
        }
        // A loop among the MX host's aliases: the host has no usable address, temporarily.
        zone = zone.mx("viaselfloop.example", 10, "self.example");
        let (res, _) = mx(&mut Resolver::new(1), &zone, "viaselfloop.example", now);
        assert!(res.as_ref().is_err_and(|e| !e.is_permanent()), "{res:?}");
    }

    #[test]
    fn glue_saves_address_queries() {
        let mut zone = example_zone();
        zone.glue = true;
        let (res, queries) = mx(&mut Resolver::new(1), &zone, "example.com", t0());
        assert_eq!(res.unwrap().hosts.len(), 2);
        // mx1 had A and AAAA glue; mx2 only A: one AAAA query left.
        assert_eq!(queries, 2);
        // Glue for a name that is not an exchange of the answer is not believed.
        zone.extra_additional.push(("unrelated.example".into(), ip("192.0.2.66")));
        let now = t0();
        let mut r = Resolver::new(1);
        assert!(mx(&mut r, &zone, "example.com", now).0.is_ok());
        assert_eq!(r.lookup_host_addrs("unrelated.example", now), Poll::Pending);
    }

    #[test]
    fn ttls_are_honoured() {
        let mut zone = example_zone();
        zone.ttl = 300;
        zone.soa_minimum = 600; // mx2's AAAA is NODATA: negative TTL min(3600, 600)
        let now = t0();
        let mut r = Resolver::new(1);
        assert!(mx(&mut r, &zone, "example.com", now).0.is_ok());
        assert!(matches!(r.lookup_mx("example.com", now + S * 299), Poll::Ready(Ok(_))));
        assert_eq!(r.lookup_mx("example.com", now + S * 300), Poll::Pending);
        assert_eq!(answer_all(&mut r, &zone, now + S * 300), 4, "mx2 AAAA NODATA still cached");
        // TTL 0 is floored, not disabled.
        zone.ttl = 0;
        let mut r = Resolver::new(1);
        assert!(mx(&mut r, &zone, "example.com", now).0.is_ok());
        assert!(matches!(r.lookup_mx("example.com", now + S * 4), Poll::Ready(Ok(_))));
    }

    #[test]
    fn literals_and_invalid_names() {
        let now = t0();
        let mut r = Resolver::new(1);
        assert_eq!(r.lookup_mx("[192.0.2.1]", now), Poll::Ready(Ok(plan(&[("[192.0.2.1]", 0, &["192.0.2.1"])]))));
        assert_eq!(
            r.lookup_mx("[IPv6:2001:db8::1]", now),
            Poll::Ready(Ok(plan(&[("[IPv6:2001:db8::1]", 0, &["2001:db8::1"])])))
        );
        assert!(matches!(r.lookup_mx("[ipv6:::1]", now), Poll::Ready(Ok(_))));
        for bad in ["[300.1.1.1]", "[::1]", "[192.0.2.1", "[tag:x]", "", "a..b", "bad domain", "x\u{0}y"] {
            assert_eq!(r.lookup_mx(bad, now), Poll::Ready(Err(DnsError::InvalidName)), "{bad:?}");
        }
        assert!(r.poll_transmit().is_none());
        assert_eq!(Resolver::canonical("[192.0.2.1]"), None);
        assert_eq!(Resolver::canonical("MX.Example."), Some("mx.example".into()));
    }

    #[test]
    fn host_lookups_for_relay_host() {
        let now = t0();
        let zone = example_zone();
        let mut r = Resolver::new(1);
        assert_eq!(r.lookup_host_addrs("192.0.2.7", now), Poll::Ready(Ok(plan(&[("192.0.2.7", 0, &["192.0.2.7"])]))));
        assert_eq!(r.lookup_host_addrs("::1", now), Poll::Ready(Ok(plan(&[("::1", 0, &["::1"])]))));
        assert_eq!(r.lookup_host_addrs("MX1.example.com", now), Poll::Pending);
        assert_eq!(r.lookup_host_addrs("mx1.example.com", now), Poll::Pending);
        assert_eq!(answer_all(&mut r, &zone, now), 2, "A and AAAA, no MX");
        assert!(r.poll_done().is_none(), "host results have their own queue");
        let (name, res) = r.poll_host_done().unwrap();
        assert_eq!(name, "mx1.example.com");
        assert_eq!(res, Ok(plan(&[("mx1.example.com", 0, &["192.0.2.1", "2001:db8::1"])])));
        assert!(r.poll_host_done().is_none());
        assert_eq!(r.lookup_host_addrs("nx.example", now), Poll::Pending);
        answer_all(&mut r, &zone, now);
        assert_eq!(r.poll_host_done(), Some(("nx.example".into(), Err(DnsError::NoAddresses))));
    }

    #[test]
    fn error_table() {
        use DnsError::*;
        for (e, permanent, code) in [
            (NullMx, true, "5.1.10"),
            (NxDomain, true, "5.1.2"),
            (NoAddresses, true, "5.4.4"),
            (InvalidName, true, "5.1.2"),
            (ServFail, false, "4.4.3"),
            (Refused, false, "4.4.3"),
            (Timeout, false, "4.4.3"),
            (Malformed, false, "4.4.3"),
        ] {
            let (c, s, d) = e.status();
            assert_eq!((e.is_permanent(), format!("{c}.{s}.{d}").as_str()), (permanent, code), "{e:?}");
            assert_eq!(c == 5, permanent, "{e:?}");
            assert!(e.to_string().starts_with(code));
            assert!(!e.text().is_empty());
        }
    }

    proptest! {
        #[test]
        fn hostile_answers_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..300),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        ) {
            let zone = example_zone();
            let now = t0();
            let mut r = Resolver::new(11);
            prop_assert_eq!(r.lookup_mx("example.com", now), Poll::Pending);
            let q = r.poll_transmit().unwrap();
            // Random bytes under the right id, and a mutated real answer.
            let mut junk = q.id.to_be_bytes().to_vec();
            junk.extend_from_slice(&tail);
            let _ = r.handle_response(&junk, now, false);
            let mut resp = zone.respond(&q.bytes, false);
            for (i, v) in flips {
                let i = i.index(resp.len() - 2) + 2;
                resp[i] ^= v;
            }
            prop_assert_eq!(peek_id(&resp), Some(q.id));
            let _ = r.handle_response(&resp, now, false);
            // Whatever happened, the lookup still ends.
            for step in 1..6u32 {
                while let Some(t) = r.poll_transmit() {
                    let _ = r.handle_response(&zone.respond(&t.bytes, t.tcp), now, t.tcp);
                }
                r.handle_timeout(now + S * 2 * step);
            }
            prop_assert!(r.poll_done().is_some());
            prop_assert_eq!(r.pending_lookups(), 0);
        }
    }
}
