//! The DNS socket driver: one non-blocking UDP socket (and short-lived TCP connections for
//! truncated answers) carrying the queries of the pure [`Resolver`].
//!
//! Owns: the sockets, their registration with the loop, RFC 1035 §4.2.2 TCP framing, the
//! resolver's seed (from the OS) and the system name server (`/etc/resolv.conf`). Must never:
//! interpret DNS (that is `crate::dns`), block, or read a socket past `WouldBlock` without a
//! cap (rule 3).
//!
//! # Tokens
//! Slot 0 is the UDP socket; slot `1 + k` is TCP connection `k`. The loop maps a slot to its
//! token with the `token_for` function given to [`DnsConn::new`] (normally
//! [`DnsConn::reactor_token`]) and passes the slot back to [`DnsConn::on_event`].
//!
//! # One turn
//! 1. [`DnsConn::on_event`] for each DNS event: answers go into the resolver.
//! 2. Delivery code calls `resolver_mut().lookup_mx(..)` and drains `poll_done()`.
//! 3. When [`DnsConn::next_deadline`] has passed, [`DnsConn::handle_timeout`].
//! 4. [`DnsConn::flush`] once, last: every query the resolver wants sent leaves now.

use std::collections::VecDeque;
use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use mio::net::{TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::dns::resolver::{Handled, Transmit};
use crate::dns::{wire, Resolver};
use crate::net::socket::{self, IoResult};
use crate::net::token::{self, Kind};

/// Datagrams read per call before yielding to other sockets (the kernel buffer normally holds
/// far fewer; a flood of spoofed datagrams must not hold the loop).
const UDP_READS_PER_CALL: usize = 1024;
/// Largest DNS message: a UDP datagram or a TCP message (two-octet length).
const MAX_MESSAGE: usize = 65_535;
/// Datagrams kept while the socket's send buffer is full; beyond that they are dropped and the
/// resolver's retry sends them again.
const MAX_QUEUED_DATAGRAMS: usize = 4096;
/// TCP connections open at once (each carries one truncated answer).
const MAX_TCP: usize = 64;

/// One TCP query: RFC 7766 allows reuse, but truncation is rare enough that a connection per
/// truncated answer keeps the driver simple.
struct TcpQuery {
    sock: TcpStream,
    id: u16,
    /// Length-prefixed query, and how much of it is written.
    out: Vec<u8>,
    written: usize,
    input: Vec<u8>,
}

/// Counters for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct DnsStats {
    /// Queries sent over UDP (retries included).
    pub udp_sent: u64,
    /// Queries sent over TCP.
    pub tcp_sent: u64,
    /// Responses the resolver used.
    pub accepted: u64,
    /// Responses dropped (unknown id, wrong question, garbage).
    pub dropped: u64,
    /// Send or connect errors (the resolver's retry covers them).
    pub send_errors: u64,
}

/// The DNS driver: sockets plus the [`Resolver`] they feed.
pub struct DnsConn {
    server: SocketAddr,
    udp: UdpSocket,
    registry: Registry,
    token_for: Box<dyn Fn(usize) -> Token>,
    tcp: Slab<TcpQuery>,
    resolver: Resolver,
    buf: Vec<u8>,
    queued: VecDeque<Vec<u8>>,
    /// Set when a read stopped at its cap: the next `handle_timeout` reads on.
    read_again: Option<Instant>,
    stats: DnsStats,
    last_drop: Option<&'static str>,
}

impl std::fmt::Debug for DnsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsConn").field("server", &self.server).field("tcp", &self.tcp.len()).finish()
    }
}

impl DnsConn {
    /// The reactor's token for `slot`: `Kind::Dns`, generation 0, key = slot.
    pub fn reactor_token(slot: usize) -> Token {
        token::make(Kind::Dns, 0, slot)
    }

    /// Binds a UDP socket on an ephemeral port (the kernel picks it at random) of the server's
    /// address family, connects it to `server` (so the kernel drops datagrams from any other
    /// source) and registers it as slot 0. The resolver is seeded from the OS.
    pub fn new(
        server: SocketAddr,
        registry: &Registry,
        token_for: impl Fn(usize) -> Token + 'static,
    ) -> io::Result<DnsConn> {
        DnsConn::with_resolver(server, registry, token_for, Resolver::new(random_seed()))
    }

    /// As [`DnsConn::new`], with a resolver built by the caller (options, tests).
    pub fn with_resolver(
        server: SocketAddr,
        registry: &Registry,
        token_for: impl Fn(usize) -> Token + 'static,
        resolver: Resolver,
    ) -> io::Result<DnsConn> {
        let any: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut udp = UdpSocket::bind(any)?;
        udp.connect(server)?;
        registry.register(&mut udp, token_for(0), Interest::READABLE | Interest::WRITABLE)?;
        Ok(DnsConn {
            server,
            udp,
            registry: registry.try_clone()?,
            token_for: Box::new(token_for),
            tcp: Slab::new(),
            resolver,
            buf: vec![0; MAX_MESSAGE],
            queued: VecDeque::new(),
            read_again: None,
            stats: DnsStats::default(),
            last_drop: None,
        })
    }

    /// The server queries go to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The UDP socket's local address (its source port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// The resolver, for lookups and results.
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// The resolver, for lookups and results.
    pub fn resolver_mut(&mut self) -> &mut Resolver {
        &mut self.resolver
    }

    /// Counters since start.
    pub fn stats(&self) -> DnsStats {
        self.stats
    }

    /// Why the latest dropped response was dropped (for a debug log line).
    pub fn take_last_drop(&mut self) -> Option<&'static str> {
        self.last_drop.take()
    }

    /// Handles readiness of `slot` (the key of the token): reads every answer that is there
    /// into the resolver, and moves queued or TCP output along.
    pub fn on_event(&mut self, slot: usize, now: Instant) {
        if slot == 0 {
            self.read_udp(now);
            self.send_queued();
        } else {
            self.drive_tcp(slot - 1, now);
        }
    }

    /// Retries and time-outs of the resolver; also resumes a UDP read that hit its cap.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.read_again.take().is_some() {
            self.read_udp(now);
        }
        self.resolver.handle_timeout(now);
    }

    /// When [`DnsConn::handle_timeout`] should next run.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.resolver.next_deadline(), self.read_again) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sends every query the resolver has ready, and closes TCP connections whose query is
    /// over (answered, or given up by the resolver).
    pub fn flush(&mut self, _now: Instant) {
        self.send_queued();
        while let Some(t) = self.resolver.poll_transmit() {
            if t.tcp {
                self.open_tcp(t);
            } else {
                self.send_udp(t.bytes);
            }
        }
        let done: Vec<usize> =
            self.tcp.iter().filter(|(_, c)| !self.resolver.is_outstanding(c.id)).map(|(k, _)| k).collect();
        for k in done {
            self.close_tcp(k);
        }
    }

    fn read_udp(&mut self, now: Instant) {
        for _ in 0..UDP_READS_PER_CALL {
            match self.udp.recv(&mut self.buf) {
                Ok(n) => {
                    let handled = self.resolver.handle_response(&self.buf[..n], now, false);
                    self.count(handled);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors (port unreachable...) surface here on a connected socket; the
                // query they belong to times out and is retried.
                Err(_) => continue,
            }
        }
        self.read_again = Some(now);
    }

    fn count(&mut self, handled: Handled) {
        match handled {
            Handled::Accepted => self.stats.accepted += 1,
            Handled::Dropped(why) => {
                self.stats.dropped += 1;
                self.last_drop = Some(why);
            }
        }
    }

    fn send_udp(&mut self, bytes: Vec<u8>) {
        if !self.queued.is_empty() {
            self.queue(bytes);
            return;
        }
        match self.udp.send(&bytes) {
            Ok(_) => self.stats.udp_sent += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.queue(bytes),
            Err(_) => self.stats.send_errors += 1,
        }
    }

    fn queue(&mut self, bytes: Vec<u8>) {
        if self.queued.len() < MAX_QUEUED_DATAGRAMS {
            self.queued.push_back(bytes);
        } else {
            self.stats.send_errors += 1;
        }
    }

    fn send_queued(&mut self) {
        while let Some(bytes) = self.queued.front() {
            match self.udp.send(bytes) {
                Ok(_) => self.stats.udp_sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => self.stats.send_errors += 1,
            }
            self.queued.pop_front();
        }
    }

    fn open_tcp(&mut self, t: Transmit) {
        // A retry over TCP replaces the connection of the attempt before it.
        let old: Vec<usize> = self.tcp.iter().filter(|(_, c)| c.id == t.id).map(|(k, _)| k).collect();
        for k in old {
            self.close_tcp(k);
        }
        if self.tcp.len() >= MAX_TCP {
            self.stats.send_errors += 1;
            return;
        }
        let Some(out) = wire::frame_tcp(&t.bytes) else { return };
        let mut sock = match TcpStream::connect(self.server) {
            Ok(s) => s,
            Err(_) => {
                self.stats.send_errors += 1;
                return;
            }
        };
        let entry = self.tcp.vacant_entry();
        let key = entry.key();
        if self
            .registry
            .register(&mut sock, (self.token_for)(key + 1), Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            self.stats.send_errors += 1;
            return;
        }
        entry.insert(TcpQuery { sock, id: t.id, out, written: 0, input: Vec::new() });
        self.stats.tcp_sent += 1;
        // The connect is usually still in progress: the writable event sends the query.
    }

    fn drive_tcp(&mut self, key: usize, now: Instant) {
        let Some(c) = self.tcp.get_mut(key) else { return };
        while c.written < c.out.len() {
            match socket::write(&mut c.sock, &c.out[c.written..]) {
                IoResult::Done(n) => c.written += n,
                IoResult::WouldBlock => break,
                // Not connected yet: wait for the writable event.
                IoResult::Error(e) if e.kind() == io::ErrorKind::NotConnected => break,
                IoResult::Closed | IoResult::Error(_) => return self.close_tcp(key),
            }
        }
        let mut closed = false;
        loop {
            match c.sock.read(&mut self.buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    if c.input.len() + n > 2 + MAX_MESSAGE {
                        return self.close_tcp(key);
                    }
                    c.input.extend_from_slice(&self.buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if let Some(msg) = wire::tcp_message(&c.input) {
            let handled = self.resolver.handle_response(msg, now, true);
            self.count(handled);
            // One query per connection: done whatever the answer was.
            return self.close_tcp(key);
        }
        if closed {
            self.close_tcp(key);
        }
    }

    fn close_tcp(&mut self, key: usize) {
        if let Some(mut c) = self.tcp.try_remove(key) {
            let _ = self.registry.deregister(&mut c.sock);
        }
    }
}

/// Runs one forward-confirmed reverse DNS check of `ip` against `server` to its end, blocking
/// (at start, before the loop runs: see `reactor::Server::bind`). The pure
/// [`crate::dns::fcrdns::FcrdnsCheck`] decides; this only moves its queries: datagrams over a
/// UDP socket connected to the server, and a query whose UDP answer was truncated over a TCP
/// connection of its own ([`ask_tcp`]); each query waits `timeout`, sent at most twice.
/// `None` (no `--dns` and no system resolver) fails the check.
pub fn fcrdns_blocking(
    server: Option<SocketAddr>,
    ip: IpAddr,
    timeout: std::time::Duration,
) -> crate::dns::fcrdns::Verdict {
    use crate::dns::fcrdns::{FcrdnsCheck, Verdict};
    let fail = |error| Verdict { ptr: None, ok: false, error: Some(error) };
    let Some(server) = server else { return fail("no DNS server") };
    let local: SocketAddr =
        if server.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let Ok(sock) = std::net::UdpSocket::bind(local) else { return fail("cannot open a UDP socket") };
    if sock.connect(server).is_err() {
        return fail("cannot reach the DNS server");
    }
    let id = random_seed() as u16;
    let mut check = FcrdnsCheck::new(ip, id, timeout, 2, Instant::now());
    let mut buf = [0u8; 4096];
    loop {
        if let Some(v) = check.result() {
            return v.clone();
        }
        let Some(deadline) = check.next_deadline() else { continue };
        match check.poll_transmit() {
            Some(q) if q.tcp => {
                // One connection per truncated answer, as `DnsConn` does; whatever fails
                // (refused, reset, short, late) is a lost answer: the deadline decides.
                match ask_tcp(server, &q.bytes, deadline) {
                    Some(answer) => check.handle_response(&answer, Instant::now(), true),
                    None => check.handle_timeout(Instant::now().max(deadline)),
                }
                continue;
            }
            // A lost datagram is the same as a lost answer: the timeout resends it.
            Some(q) => {
                let _ = sock.send(&q.bytes);
            }
            None => {}
        }
        let wait = deadline.saturating_duration_since(Instant::now()).max(std::time::Duration::from_millis(1));
        let _ = sock.set_read_timeout(Some(wait));
        match sock.recv(&mut buf) {
            Ok(n) => check.handle_response(&buf[..n], Instant::now(), false),
            // Timed out (or ICMP refused: nothing listens there): the deadline decides.
            Err(_) => check.handle_timeout(Instant::now().max(deadline)),
        }
    }
}

/// One query over a new TCP connection to `server` (RFC 1035 §4.2.2 framing, RFC 7766),
/// blocking until its answer or `deadline`: the answer's bytes, or `None` when the connection
/// failed, closed early or ran out of time.
fn ask_tcp(server: SocketAddr, query: &[u8], deadline: Instant) -> Option<Vec<u8>> {
    use std::io::Write as _;
    // Time left, never zero (a zero timeout means "block forever" to the socket calls).
    let left = || deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
    let framed = wire::frame_tcp(query)?;
    let mut sock = std::net::TcpStream::connect_timeout(&server, left()?).ok()?;
    sock.set_write_timeout(Some(left()?)).ok()?;
    sock.write_all(&framed).ok()?;
    let mut input = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(answer) = wire::tcp_message(&input) {
            return Some(answer.to_vec());
        }
        sock.set_read_timeout(Some(left()?)).ok()?;
        let n = sock.read(&mut buf).ok().filter(|&n| n > 0)?;
        if input.len() + n > 2 + wire::MAX_TCP_MESSAGE {
            return None;
        }
        input.extend_from_slice(&buf[..n]);
    }
}

/// The first usable `nameserver` of `/etc/resolv.conf`, port 53 (used when `--dns` is absent).
pub fn system_nameserver() -> Option<SocketAddr> {
    parse_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").ok()?)
}

/// The first `nameserver` line with a plain IP address (resolv.conf(5)); entries with an
/// interface scope (`fe80::1%eth0`) are skipped, as are comments (`#`, `;`).
pub fn parse_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next()? != "nameserver" {
            return None;
        }
        let ip: IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, 53))
    })
}

/// 64 random bits from the OS (`/dev/urandom`), to seed query ids and MX shuffles; falls back
/// to the clock and pid if the device cannot be read.
pub fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok() {
        return u64::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::resolver::{DnsError, MxPlan, ResolverOptions};
    use crate::dns::wire::testing::Zone;
    use mio::{Events, Poll};
    use std::io::{ErrorKind, Write as _};
    use std::net::{TcpListener, UdpSocket as StdUdp};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    /// A DNS server on 127.0.0.1 answering from a test zone over UDP and TCP (same port).
    struct Server {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        tcp_queries: Arc<AtomicUsize>,
        threads: Vec<JoinHandle<()>>,
    }

    impl Server {
        fn start(zone: Zone) -> Server {
            let (udp, tcp) = (0..20)
                .find_map(|_| {
                    let udp = StdUdp::bind("127.0.0.1:0").unwrap();
                    let tcp = TcpListener::bind(udp.local_addr().unwrap()).ok()?;
                    Some((udp, tcp))
                })
                .expect("a port free for UDP and TCP");
            let addr = udp.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let tcp_queries = Arc::new(AtomicUsize::new(0));
            let zone = Arc::new(zone);
            udp.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let (z, s) = (zone.clone(), stop.clone());
            let udp_thread = std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&z.respond(&buf[..n], false), peer);
                    }
                }
            });
            tcp.set_nonblocking(true).unwrap();
            let (z, s, count) = (zone, stop.clone(), tcp_queries.clone());
            let tcp_thread = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let Ok((mut c, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                    let mut len = [0u8; 2];
                    while c.read_exact(&mut len).is_ok() {
                        let mut q = vec![0; usize::from(u16::from_be_bytes(len))];
                        if c.read_exact(&mut q).is_err() {
                            break;
                        }
                        count.fetch_add(1, Ordering::Relaxed);
                        let r = z.respond(&q, true);
                        let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&r);
                        if c.write_all(&framed).is_err() {
                            break;
                        }
                    }
                }
            });
            Server { addr, stop, tcp_queries, threads: vec![udp_thread, tcp_thread] }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    /// Runs a small loop (the reactor's turn, in order) until `want` results are out or 5 s.
    fn run(conn: &mut DnsConn, poll: &mut Poll, want: usize) -> Vec<(String, Result<MxPlan, DnsError>)> {
        let mut events = Events::with_capacity(64);
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < want && start.elapsed() < Duration::from_secs(5) {
            let now = Instant::now();
            conn.flush(now);
            let timeout = conn.next_deadline().map_or(Duration::from_millis(100), |d| d.saturating_duration_since(now));
            poll.poll(&mut events, Some(timeout.min(Duration::from_millis(100)))).unwrap();
            let now = Instant::now();
            for ev in events.iter() {
                conn.on_event(ev.token().0, now);
            }
            if conn.next_deadline().is_some_and(|d| d <= now) {
                conn.handle_timeout(now);
            }
            let r = conn.resolver_mut();
            out.extend(std::iter::from_fn(|| r.poll_done()));
            out.extend(std::iter::from_fn(|| r.poll_host_done()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn resolves_over_udp_and_tcp_against_a_real_socket() {
        let mut zone = Zone::default()
            .mx("example.test", 10, "mx.example.test")
            .addr("mx.example.test", "127.0.0.2")
            .mx("multi.test", 20, "mx2.multi.test")
            .mx("multi.test", 10, "mx1.multi.test")
            .addr("mx1.multi.test", "127.0.0.3")
            .mx("null.test", 0, "")
            .addr("relay.test", "127.0.0.9");
        zone.servfail.insert("broken.test".into());
        for i in 0..40 {
            zone = zone.mx("big.test", 10 + i, &format!("a-long-mail-exchanger-host-name-{i}.big.test"));
        }
        zone = zone.addr("a-long-mail-exchanger-host-name-3.big.test", "127.0.0.4");
        let server = Server::start(zone);

        let mut poll = Poll::new().unwrap();
        let mut conn = DnsConn::new(server.addr, poll.registry(), Token).unwrap();
        assert_ne!(conn.local_addr().unwrap().port(), 0);
        let now = Instant::now();
        for d in ["example.test", "multi.test", "null.test", "broken.test", "nx.test", "big.test"] {
            assert!(conn.resolver_mut().lookup_mx(d, now).is_pending(), "{d}");
        }
        assert!(conn.resolver_mut().lookup_host_addrs("relay.test", now).is_pending());
        let done = run(&mut conn, &mut poll, 7);
        type Hosts = Vec<(u16, Vec<IpAddr>)>;
        let got: Vec<(&str, Result<Hosts, DnsError>)> = done
            .iter()
            .map(|(d, r)| {
                (d.as_str(), r.clone().map(|p| p.hosts.into_iter().map(|h| (h.preference, h.addrs)).collect()))
            })
            .collect();
        assert_eq!(
            got,
            [
                ("big.test", Ok(vec![(13, vec![ip("127.0.0.4")])])),
                ("broken.test", Err(DnsError::ServFail)),
                ("example.test", Ok(vec![(10, vec![ip("127.0.0.2")])])),
                ("multi.test", Ok(vec![(10, vec![ip("127.0.0.3")])])),
                ("null.test", Err(DnsError::NullMx)),
                ("nx.test", Err(DnsError::NxDomain)),
                ("relay.test", Ok(vec![(0, vec![ip("127.0.0.9")])])),
            ]
        );
        assert_eq!(server.tcp_queries.load(Ordering::Relaxed), 1, "big.test's MX over TCP");
        let stats = conn.stats();
        assert_eq!(stats.tcp_sent, 1);
        assert_eq!(stats.dropped, 0);
        assert!(stats.udp_sent >= 20, "{stats:?}");
        assert_eq!(conn.tcp.len(), 0, "the TCP connection is closed after its answer");
        // Cached now.
        assert!(conn.resolver_mut().lookup_mx("multi.test", Instant::now()).is_ready());
    }

    #[test]
    fn silent_server_times_out_after_one_retry_and_spoofs_are_ignored() {
        let silent = StdUdp::bind("127.0.0.1:0").unwrap();
        silent.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let opts = ResolverOptions { query_timeout: Duration::from_millis(150), ..ResolverOptions::default() };
        let mut poll = Poll::new().unwrap();
        let mut conn = DnsConn::with_resolver(
            silent.local_addr().unwrap(),
            poll.registry(),
            Token,
            Resolver::with_options(opts, 5),
        )
        .unwrap();
        assert!(conn.resolver_mut().lookup_mx("example.test", Instant::now()).is_pending());
        conn.flush(Instant::now());
        let mut buf = [0u8; 512];
        let (n, from) = silent.recv_from(&mut buf).unwrap();
        assert_eq!(from, conn.local_addr().unwrap());
        let query = buf[..n].to_vec();

        // The right answer from the wrong port never reaches the resolver (connected socket).
        let zone = Zone::default().mx("example.test", 10, "mx.example.test");
        let rogue = StdUdp::bind("127.0.0.1:0").unwrap();
        rogue.send_to(&zone.respond(&query, false), from).unwrap();

        let done = run(&mut conn, &mut poll, 1);
        assert_eq!(done, [("example.test".to_string(), Err(DnsError::Timeout))]);
        assert_eq!(conn.stats().accepted, 0);
        let (n, _) = silent.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &query[..], "the retry repeats the query, id included");
        silent.set_nonblocking(true).unwrap();
        assert_eq!(silent.recv_from(&mut buf).map_err(|e| e.kind()).unwrap_err(), ErrorKind::WouldBlock);
    }

    /// The start-up FCrDNS check against a server that truncates every UDP answer: each
    /// question is asked again over TCP, and the address is confirmed.
    #[test]
    fn fcrdns_asks_over_tcp_when_the_udp_answer_is_truncated() {
        let mut zone = Zone::default().addr("out1.example.com", "192.0.2.1");
        zone.ptr.insert("1.2.0.192.in-addr.arpa".into(), vec!["out1.example.com".into()]);
        zone.udp_limit = 12;
        let server = Server::start(zone);
        let v = fcrdns_blocking(Some(server.addr), ip("192.0.2.1"), Duration::from_secs(2));
        assert_eq!((v.ok, v.ptr.as_deref(), v.error), (true, Some("out1.example.com"), None));
        assert_eq!(server.tcp_queries.load(Ordering::Relaxed), 2, "PTR and A, each over TCP");
        // Nothing listens over TCP there: the check fails within its time, as a timeout.
        let udp_only = StdUdp::bind("127.0.0.1:0").unwrap();
        let t0 = Instant::now();
        let addr = udp_only.local_addr().unwrap();
        let responder = std::thread::spawn(move || {
            let z = Zone { udp_limit: 12, ..Zone::default() };
            let mut buf = [0u8; 512];
            udp_only.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            while let Ok((n, peer)) = udp_only.recv_from(&mut buf) {
                let _ = udp_only.send_to(&z.respond(&buf[..n], false), peer);
            }
        });
        let v = fcrdns_blocking(Some(addr), ip("192.0.2.1"), Duration::from_millis(300));
        assert_eq!((v.ok, v.error), (false, Some("DNS timeout")));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        drop(responder);
    }

    #[test]
    fn reactor_tokens_are_dns_kind() {
        let t = DnsConn::reactor_token(3);
        assert_eq!(token::split(t), Some((Kind::Dns, 0, 3)));
    }

    #[test]
    fn resolv_conf() {
        let table: &[(&str, Option<&str>)] = &[
            ("nameserver 192.0.2.53\nnameserver 192.0.2.54\n", Some("192.0.2.53:53")),
            (
                "# nameserver 10.0.0.1\n; x\nsearch example\n  nameserver   2001:db8::53 # v6\n",
                Some("[2001:db8::53]:53"),
            ),
            ("nameserver fe80::1%eth0\nnameserver 127.0.0.53\n", Some("127.0.0.53:53")),
            ("options edns0\n", None),
            ("nameserver\n", None),
            ("", None),
        ];
        for (text, want) in table {
            assert_eq!(parse_resolv_conf(text), want.map(|s| s.parse().unwrap()), "{text:?}");
        }
        assert_ne!(random_seed(), random_seed());
    }
}
