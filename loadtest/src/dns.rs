//! `sluice-load dns`: an authoritative DNS responder for test domains, over UDP and TCP.
//!
//! Owns: a zone built from flags (`--zone`, `--mx`, `--a`, `--txt`, `--nullmx`, `--servfail`,
//! `--truncate-udp`), one mio loop with a UDP socket and a TCP listener on the same address, and
//! the answers. Must never: recurse or forward (everything it is not told about is NXDOMAIN),
//! or answer without the AA bit. Messages are encoded and decoded with `hickory-proto` (RFC
//! 1035); answers too big for the client's UDP payload (512, or its EDNS size, RFC 6891) are
//! sent truncated with TC so that the client retries over TCP (RFC 7766); `--truncate-udp` does
//! that to every answer.

use crate::util::log_listening;
use anyhow::{bail, Context, Result};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, PTR, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The records the responder serves, keyed by lower-case name without the trailing dot.
#[derive(Debug, Default, Clone)]
pub struct Zone {
    mx: HashMap<String, Vec<(u16, String)>>,
    addrs: HashMap<String, Vec<IpAddr>>,
    /// TXT records: each value as its character-strings of at most 255 octets.
    txt: HashMap<String, Vec<Vec<String>>>,
    nullmx: HashSet<String>,
    /// PTR records by reverse name (`2.0.0.127.in-addr.arpa`).
    ptr: HashMap<String, Vec<String>>,
    servfail: Vec<String>,
    /// Domains the flags named: owners of the SOA in negative answers.
    apexes: Vec<String>,
    ttl: u32,
    /// `--truncate-udp`: every UDP answer goes out truncated (TC, empty sections).
    truncate_udp: bool,
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Zone {
    /// An empty zone whose records have time-to-live `ttl` seconds.
    pub fn new(ttl: u32) -> Zone {
        Zone { ttl, ..Zone::default() }
    }

    /// `--zone DOMAIN=IP`: `DOMAIN MX 10 mx.DOMAIN` and `mx.DOMAIN A/AAAA IP`.
    pub fn add_zone(&mut self, spec: &str) -> Result<()> {
        let (d, ip) = spec.split_once('=').context("--zone wants DOMAIN=IP")?;
        let ip: IpAddr = ip.trim().parse().with_context(|| format!("--zone {spec}: bad IP"))?;
        let d = norm(d);
        let mx = format!("mx.{d}");
        self.mx.entry(d.clone()).or_default().push((10, mx.clone()));
        self.addrs.entry(mx).or_default().push(ip);
        self.apexes.push(d);
        Ok(())
    }

    /// `--mx DOMAIN=PREF:HOST`.
    pub fn add_mx(&mut self, spec: &str) -> Result<()> {
        let (d, rest) = spec.split_once('=').context("--mx wants DOMAIN=PREF:HOST")?;
        let (pref, host) = rest.split_once(':').context("--mx wants DOMAIN=PREF:HOST")?;
        let pref: u16 = pref.trim().parse().with_context(|| format!("--mx {spec}: bad preference"))?;
        let d = norm(d);
        self.mx.entry(d.clone()).or_default().push((pref, norm(host)));
        self.apexes.push(d);
        Ok(())
    }

    /// `--a HOST=IP` (an IPv6 address makes an AAAA record).
    pub fn add_a(&mut self, spec: &str) -> Result<()> {
        let (h, ip) = spec.split_once('=').context("--a wants HOST=IP")?;
        let ip: IpAddr = ip.trim().parse().with_context(|| format!("--a {spec}: bad IP"))?;
        self.addrs.entry(norm(h)).or_default().push(ip);
        Ok(())
    }

    /// `--txt NAME=VALUE`: a TXT record (DKIM keys in tests), the value split into strings of
    /// 255 octets (RFC 1035 §3.3.14), as a long RSA key record must be.
    pub fn add_txt(&mut self, spec: &str) -> Result<()> {
        let (n, v) = spec.split_once('=').context("--txt wants NAME=VALUE")?;
        if !v.is_ascii() {
            bail!("--txt {spec}: the value must be ASCII");
        }
        let strings = v.as_bytes().chunks(255).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        self.txt.entry(norm(n)).or_default().push(strings);
        Ok(())
    }

    /// `--ptr IP=NAME`: a PTR record under the address's reverse name (RFC 1035 §3.5,
    /// RFC 3596 §2.5), for FCrDNS checks.
    pub fn add_ptr(&mut self, spec: &str) -> Result<()> {
        let (ip, name) = spec.split_once('=').context("--ptr wants IP=NAME")?;
        let ip: IpAddr = ip.trim().parse().with_context(|| format!("--ptr {spec}: bad IP"))?;
        self.ptr.entry(norm(&Name::from(ip).to_ascii())).or_default().push(norm(name));
        Ok(())
    }

    /// `--truncate-udp`: every answer over UDP is truncated, whatever its size, so that a
    /// client's TCP fallback (RFC 7766 §5) can be tested with small answers.
    pub fn truncate_udp(&mut self) {
        self.truncate_udp = true;
    }

    /// `--nullmx DOMAIN`: `MX 0 .` (RFC 7505).
    pub fn add_nullmx(&mut self, d: &str) {
        self.nullmx.insert(norm(d));
        self.apexes.push(norm(d));
    }

    /// `--servfail DOMAIN`: SERVFAIL for the domain and every name under it.
    pub fn add_servfail(&mut self, d: &str) {
        self.servfail.push(norm(d));
    }

    fn is_under(name: &str, d: &str) -> bool {
        name == d || (name.len() > d.len() && name.ends_with(d) && name.as_bytes()[name.len() - d.len() - 1] == b'.')
    }

    fn soa(&self, qname: &str) -> Result<Record> {
        let apex = self
            .apexes
            .iter()
            .filter(|a| Zone::is_under(qname, a))
            .max_by_key(|a| a.len())
            .map_or_else(|| qname.rsplit('.').next().unwrap_or("").to_string(), Clone::clone);
        let owner = fqdn(&apex)?;
        let soa =
            SOA::new(fqdn("ns.sluice-load.test")?, fqdn("hostmaster.sluice-load.test")?, 1, 3600, 600, 86400, self.ttl);
        Ok(Record::from_rdata(owner, self.ttl, RData::SOA(soa)))
    }

    /// Answers one query message (already decoded). `max_udp` is `None` over TCP.
    pub fn answer(&self, req: &Message, max_udp: Option<usize>) -> Result<Vec<u8>> {
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.authoritative = true;
        let udp_limit = max_udp.map(|l| match &req.edns {
            Some(e) => (e.max_payload() as usize).clamp(512, l),
            None => 512,
        });
        if req.edns.is_some() {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            resp.set_edns(e);
        }
        let q = match (req.metadata.op_code, req.queries.as_slice()) {
            (OpCode::Query, [q]) => q.clone(),
            _ => {
                resp.metadata.response_code = ResponseCode::NotImp;
                return Ok(resp.to_vec()?);
            }
        };
        resp.add_query(q.clone());
        let qname = norm(&q.name().to_ascii());
        let qtype = q.query_type();
        let ttl = self.ttl;
        if self.servfail.iter().any(|d| Zone::is_under(&qname, d)) {
            resp.metadata.response_code = ResponseCode::ServFail;
            resp.metadata.authoritative = false;
            return Ok(resp.to_vec()?);
        }
        let exists = self.mx.contains_key(&qname)
            || self.addrs.contains_key(&qname)
            || self.txt.contains_key(&qname)
            || self.ptr.contains_key(&qname)
            || self.nullmx.contains(&qname);
        let owner = q.name().clone();
        match qtype {
            RecordType::MX if self.nullmx.contains(&qname) => {
                resp.add_answer(Record::from_rdata(owner, ttl, RData::MX(MX::new(0, Name::root()))));
            }
            RecordType::MX => {
                for (pref, host) in self.mx.get(&qname).into_iter().flatten() {
                    resp.add_answer(Record::from_rdata(owner.clone(), ttl, RData::MX(MX::new(*pref, fqdn(host)?))));
                    // Glue-like extra: the exchanges' addresses save the client a lookup.
                    for ip in self.addrs.get(host).into_iter().flatten() {
                        resp.add_additional(Record::from_rdata(fqdn(host)?, ttl, addr_rdata(*ip)));
                    }
                }
            }
            RecordType::PTR => {
                for name in self.ptr.get(&qname).into_iter().flatten() {
                    resp.add_answer(Record::from_rdata(owner.clone(), ttl, RData::PTR(PTR(fqdn(name)?))));
                }
            }
            RecordType::TXT => {
                for strings in self.txt.get(&qname).into_iter().flatten() {
                    resp.add_answer(Record::from_rdata(owner.clone(), ttl, RData::TXT(TXT::new(strings.clone()))));
                }
            }
            RecordType::A | RecordType::AAAA => {
                for ip in self.addrs.get(&qname).into_iter().flatten() {
                    if ip.is_ipv4() == (qtype == RecordType::A) {
                        resp.add_answer(Record::from_rdata(owner.clone(), ttl, addr_rdata(*ip)));
                    }
                }
            }
            _ => {}
        }
        if resp.answers.is_empty() {
            // NODATA (name exists) or NXDOMAIN, with the SOA for negative caching (RFC 2308).
            if !exists {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            resp.add_authority(self.soa(&qname)?);
        }
        let bytes = resp.to_vec()?;
        if let Some(limit) = udp_limit {
            if bytes.len() > limit || self.truncate_udp {
                resp.answers.clear();
                resp.additionals.clear();
                resp.authorities.clear();
                resp.metadata.truncation = true;
                return Ok(resp.to_vec()?);
            }
        }
        Ok(bytes)
    }
}

fn fqdn(name: &str) -> Result<Name> {
    let mut n = Name::from_ascii(name).with_context(|| format!("bad DNS name {name:?}"))?;
    n.set_fqdn(true);
    Ok(n)
}

fn addr_rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// Decodes a query and answers it; FORMERR when it does not decode, nothing for a response.
fn respond(zone: &Zone, packet: &[u8], max_udp: Option<usize>) -> Option<Vec<u8>> {
    match Message::from_vec(packet) {
        Ok(req) if req.metadata.message_type == MessageType::Query => zone.answer(&req, max_udp).ok(),
        Ok(_) => None,
        Err(_) if packet.len() >= 2 => {
            let id = u16::from_be_bytes([packet[0], packet[1]]);
            Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok()
        }
        Err(_) => None,
    }
}

const UDP: Token = Token(usize::MAX - 1);
const TCP: Token = Token(usize::MAX - 2);
const SIGNAL: Token = Token(usize::MAX - 3);

struct TcpConn {
    sock: TcpStream,
    input: Vec<u8>,
    out: Vec<u8>,
    last: Instant,
}

/// Serves `zone` on `addr` (UDP and TCP, same port) until SIGTERM/SIGINT or `duration`.
pub fn run(addr: SocketAddr, zone: Zone, duration: Option<Duration>) -> Result<()> {
    let (mut udp, mut tcp) = bind(addr)?;
    let local = udp.local_addr()?;
    let mut poll = Poll::new()?;
    poll.registry().register(&mut udp, UDP, Interest::READABLE)?;
    poll.registry().register(&mut tcp, TCP, Interest::READABLE)?;
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    poll.registry().register(&mut signals, SIGNAL, Interest::READABLE)?;
    log_listening("dns", local);
    let start = Instant::now();
    let mut conns: Slab<TcpConn> = Slab::new();
    let mut events = Events::with_capacity(256);
    let mut pkt = vec![0u8; 65_535];
    let mut answered = 0u64;
    loop {
        if duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        match poll.poll(&mut events, Some(Duration::from_millis(500))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("poll"),
        }
        // Idle TCP clients are closed after 10 s (RFC 7766 §6.2.3 suggests seconds).
        conns.retain(|_, c| {
            let keep = c.last.elapsed() < Duration::from_secs(10);
            if !keep {
                let _ = poll.registry().deregister(&mut c.sock);
            }
            keep
        });
        for ev in events.iter() {
            match ev.token() {
                SIGNAL => {
                    if signals.pending().next().is_some() {
                        eprintln!("dns summary: {answered} queries answered");
                        return Ok(());
                    }
                }
                UDP => loop {
                    match udp.recv_from(&mut pkt) {
                        Ok((n, peer)) => {
                            if let Some(r) = respond(&zone, &pkt[..n], Some(4096)) {
                                answered += 1;
                                // UDP replies are one datagram; a full socket buffer drops it,
                                // as the network would, and the client retries.
                                let _ = udp.send_to(&r, peer);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                },
                TCP => loop {
                    match tcp.accept() {
                        Ok((mut sock, _)) => {
                            let entry = conns.vacant_entry();
                            let key = entry.key();
                            if key >= usize::MAX - 16 {
                                break;
                            }
                            poll.registry().register(&mut sock, Token(key), Interest::READABLE | Interest::WRITABLE)?;
                            entry.insert(TcpConn { sock, input: Vec::new(), out: Vec::new(), last: Instant::now() });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                },
                Token(key) => {
                    let Some(c) = conns.get_mut(key) else { continue };
                    let alive = serve_tcp(&zone, c, &mut pkt, &mut answered);
                    if !alive {
                        let mut c = conns.remove(key);
                        let _ = poll.registry().deregister(&mut c.sock);
                    }
                }
            }
        }
    }
    eprintln!("dns summary: {answered} queries answered");
    Ok(())
}

/// Reads length-prefixed queries (RFC 1035 §4.2.2), answers each. False when done.
fn serve_tcp(zone: &Zone, c: &mut TcpConn, pkt: &mut [u8], answered: &mut u64) -> bool {
    c.last = Instant::now();
    loop {
        match c.sock.read(pkt) {
            Ok(0) => return false,
            Ok(n) => {
                if c.input.len() + n > 1 << 20 {
                    return false;
                }
                c.input.extend_from_slice(&pkt[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    let mut used = 0;
    while c.input.len() - used >= 2 {
        let len = u16::from_be_bytes([c.input[used], c.input[used + 1]]) as usize;
        if c.input.len() - used - 2 < len {
            break;
        }
        if let Some(r) = respond(zone, &c.input[used + 2..used + 2 + len], None) {
            *answered += 1;
            c.out.extend_from_slice(&(r.len() as u16).to_be_bytes());
            c.out.extend_from_slice(&r);
        }
        used += 2 + len;
    }
    c.input.drain(..used);
    while !c.out.is_empty() {
        match c.sock.write(&c.out) {
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

/// UDP and TCP on one address; with port 0, a port free for both.
fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener)> {
    for _ in 0..20 {
        let udp = UdpSocket::bind(addr).with_context(|| format!("--listen {addr} (udp)"))?;
        let local = udp.local_addr()?;
        match sluice::net::socket::listener(local, false) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(_) if addr.port() == 0 => continue,
            Err(e) => return Err(e).with_context(|| format!("--listen {addr} (tcp)")),
        }
    }
    bail!("--listen {addr}: no port free for both UDP and TCP")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn ask(zone: &Zone, name: &str, t: RecordType) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        Message::from_vec(&zone.answer(&q, Some(4096)).unwrap()).unwrap()
    }

    #[test]
    fn answers() {
        let mut z = Zone::new(60);
        z.add_zone("example.test=127.0.0.2").unwrap();
        z.add_nullmx("null.test");
        z.add_servfail("broken.test");
        let r = ask(&z, "Example.Test.", RecordType::MX);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.additionals.len(), 1);
        let r = ask(&z, "mx.example.test.", RecordType::A);
        assert_eq!(r.answers.len(), 1);
        let r = ask(&z, "mx.example.test.", RecordType::AAAA);
        assert!(r.answers.is_empty());
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.authorities.len(), 1);
        let r = ask(&z, "nope.test.", RecordType::MX);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = ask(&z, "a.broken.test.", RecordType::MX);
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        let r = ask(&z, "null.test.", RecordType::MX);
        assert_eq!(r.answers.len(), 1);
    }

    #[test]
    fn truncate_udp_truncates_every_udp_answer_and_no_tcp_one() {
        let mut z = Zone::new(60);
        z.add_zone("example.test=127.0.0.2").unwrap();
        z.truncate_udp();
        let r = ask(&z, "mx.example.test.", RecordType::A);
        assert!(r.metadata.truncation && r.answers.is_empty());
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii("mx.example.test.").unwrap(), RecordType::A));
        let full = Message::from_vec(&z.answer(&q, None).unwrap()).unwrap();
        assert!(!full.metadata.truncation);
        assert_eq!(full.answers.len(), 1);
    }

    #[test]
    fn truncates_for_small_udp() {
        let mut z = Zone::new(60);
        for i in 0..60 {
            z.add_mx(&format!("big.test=10:mx{i}.some-long-name-for-padding.big.test")).unwrap();
        }
        let r = ask(&z, "big.test.", RecordType::MX);
        assert!(r.metadata.truncation);
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii("big.test.").unwrap(), RecordType::MX));
        let full = Message::from_vec(&z.answer(&q, None).unwrap()).unwrap();
        assert_eq!(full.answers.len(), 60);
    }
}
