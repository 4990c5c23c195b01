//! Pure: a forward-confirmed reverse DNS check of one address (FCrDNS, RFC 8601 §3 "iprev";
//! the check receivers such as Gmail make on a sending IP): the PTR names of the address,
//! then the A or AAAA records of those names must hold the address again.
//!
//! Sans-IO, in the shape of [`super::resolver::Resolver`]: [`FcrdnsCheck::poll_transmit`]
//! hands out the query to send (over UDP, or over TCP once its UDP answer came back truncated,
//! RFC 1035 §4.2.2, RFC 7766 §5), [`FcrdnsCheck::handle_response`] takes what came back and
//! by which transport, [`FcrdnsCheck::handle_timeout`] retries or gives up at
//! [`FcrdnsCheck::next_deadline`], and [`FcrdnsCheck::result`] is the verdict once it is there.
//! Owns only this one check's state; must never touch a socket or read the clock. Used once
//! per egress source at start.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::resolver::Transmit;
use super::wire::{self, QType, Rcode, RrData};

/// PTR names tried in turn (an address with many names is rare; each costs a query).
const MAX_NAMES: usize = 4;

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The PTR name that confirmed the address, else the first PTR name found, if any.
    pub ptr: Option<String>,
    /// The address is confirmed.
    pub ok: bool,
    /// Why not, when not.
    pub error: Option<&'static str>,
}

/// Where the check stands.
#[derive(Debug)]
enum Step {
    /// Asking for the PTR records.
    Ptr,
    /// Asking for the addresses of `names[next]`.
    Forward { names: Vec<String>, next: usize },
    /// Finished.
    Done(Verdict),
}

/// One FCrDNS check.
#[derive(Debug)]
pub struct FcrdnsCheck {
    ip: IpAddr,
    step: Step,
    /// The id and bytes of the query on the wire.
    id: u16,
    query: Vec<u8>,
    /// Its question, to match the answer: (canonical name, QTYPE).
    asking: (String, u16),
    attempts: u8,
    max_attempts: u8,
    timeout: Duration,
    deadline: Instant,
    pending: bool,
    /// The query in flight goes over TCP: its UDP answer was truncated.
    tcp: bool,
}

impl FcrdnsCheck {
    /// A check of `ip`; `id` is the first query's id (take it from a random source), each
    /// query waits `timeout` and is sent at most `attempts` times.
    pub fn new(ip: IpAddr, id: u16, timeout: Duration, attempts: u8, now: Instant) -> FcrdnsCheck {
        let mut c = FcrdnsCheck {
            ip,
            step: Step::Ptr,
            id,
            query: Vec::new(),
            asking: (wire::reverse_name(ip), wire::PTR_CODE),
            attempts: 0,
            max_attempts: attempts.max(1),
            timeout,
            deadline: now,
            pending: false,
            tcp: false,
        };
        match wire::encode_ptr_query(id, ip) {
            Ok(q) => c.send(q, now),
            Err(_) => c.finish(None, "cannot encode the PTR query"),
        }
        c
    }

    /// A new question: over UDP first.
    fn send(&mut self, query: Vec<u8>, now: Instant) {
        self.query = query;
        self.ask(false, now);
    }

    /// Sends the current query (again) over `tcp` or UDP, with its full time and attempts.
    fn ask(&mut self, tcp: bool, now: Instant) {
        self.tcp = tcp;
        self.attempts = 1;
        self.deadline = now + self.timeout;
        self.pending = true;
    }

    fn finish(&mut self, ptr: Option<String>, error: &'static str) {
        self.pending = false;
        self.step = Step::Done(Verdict { ptr, ok: false, error: Some(error) });
    }

    /// The query to send now (again after a timeout), if any, and by which transport
    /// (`tcp`: framed with a length prefix on a new connection, as the driver does it).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if !self.pending {
            return None;
        }
        self.pending = false;
        Some(Transmit { id: self.id, bytes: self.query.clone(), tcp: self.tcp })
    }

    /// When [`FcrdnsCheck::handle_timeout`] is due, while a query waits.
    pub fn next_deadline(&self) -> Option<Instant> {
        (!matches!(self.step, Step::Done(_))).then_some(self.deadline)
    }

    /// The verdict, once the check is over.
    pub fn result(&self) -> Option<&Verdict> {
        match &self.step {
            Step::Done(v) => Some(v),
            _ => None,
        }
    }

    /// The query's time is up: send it again, or fail the check after the last attempt.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.step, Step::Done(_)) || now < self.deadline {
            return;
        }
        if self.attempts < self.max_attempts {
            self.attempts += 1;
            self.deadline = now + self.timeout;
            self.pending = true;
            return;
        }
        let ptr = self.first_name();
        self.finish(ptr, "DNS timeout");
    }

    fn first_name(&self) -> Option<String> {
        match &self.step {
            Step::Forward { names, .. } => names.first().cloned(),
            _ => None,
        }
    }

    /// An answer, `via_tcp` or as a UDP datagram. Bytes that are not the answer to the query
    /// in flight (id, question and transport: a late datagram once the query went over TCP)
    /// are ignored, as a resolver must (RFC 5452 §4).
    pub fn handle_response(&mut self, bytes: &[u8], now: Instant, via_tcp: bool) {
        let Ok(a) = wire::decode_answer(bytes) else { return };
        let matches =
            a.id == self.id && a.question.as_ref().is_some_and(|q| q.name == self.asking.0 && q.qtype == self.asking.1);
        if !matches || via_tcp != self.tcp || matches!(self.step, Step::Done(_)) {
            return;
        }
        if a.truncated && !via_tcp {
            // Too long for a datagram (many PTR names, a server with a small UDP limit): the
            // same question again over TCP (RFC 7766 §5), with the same time allowed.
            return self.ask(true, now);
        }
        if a.truncated {
            // TC over TCP makes no sense (RFC 7766 §8): a misbehaving server.
            let ptr = self.first_name();
            return self.finish(ptr, "truncated DNS answer over TCP");
        }
        match (&mut self.step, a.rcode) {
            (Step::Ptr, Rcode::NoError | Rcode::NxDomain) => {
                let mut names: Vec<String> = a
                    .answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RrData::Ptr(n) if !n.is_empty() => Some(n.clone()),
                        _ => None,
                    })
                    .collect();
                names.dedup();
                names.truncate(MAX_NAMES);
                if names.is_empty() {
                    return self.finish(None, "no PTR record");
                }
                self.step = Step::Forward { names, next: 0 };
                self.ask_forward(now);
            }
            (Step::Forward { names, next }, Rcode::NoError | Rcode::NxDomain) => {
                // The recursive server follows CNAMEs: an address record anywhere in the
                // answer that holds the IP confirms the name.
                let confirmed = a.answers.iter().any(|r| match (&r.data, self.ip) {
                    (RrData::A(v4), IpAddr::V4(ip)) => *v4 == ip,
                    (RrData::Aaaa(v6), IpAddr::V6(ip)) => *v6 == ip,
                    _ => false,
                });
                if confirmed {
                    let ptr = names.get(*next).cloned();
                    self.pending = false;
                    self.step = Step::Done(Verdict { ptr, ok: true, error: None });
                    return;
                }
                *next += 1;
                if *next >= names.len() {
                    let ptr = names.first().cloned();
                    return self.finish(ptr, "no PTR name resolves back to the address");
                }
                self.ask_forward(now);
            }
            (_, _) => {
                let ptr = self.first_name();
                self.finish(ptr, "DNS server failure");
            }
        }
    }

    /// Asks for the addresses (of the address's family) of the current PTR name.
    fn ask_forward(&mut self, now: Instant) {
        let Step::Forward { names, next } = &self.step else { return };
        let name = names[*next].clone();
        let qtype = if self.ip.is_ipv4() { QType::A } else { QType::Aaaa };
        self.id = self.id.wrapping_add(1);
        match wire::encode_query(self.id, &name, qtype) {
            Ok(q) => {
                self.asking = (name, qtype.code());
                self.send(q, now);
            }
            Err(_) => {
                let ptr = Some(name);
                self.finish(ptr, "the PTR name is not a valid domain name");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::testing::Zone;

    fn run(zone: &Zone, ip: &str) -> (Verdict, usize) {
        let (v, queries, _) = run_counting_tcp(zone, ip);
        (v, queries)
    }

    /// Runs a check against `zone` over its transports: (verdict, queries, of them over TCP).
    fn run_counting_tcp(zone: &Zone, ip: &str) -> (Verdict, usize, usize) {
        let t0 = Instant::now();
        let mut c = FcrdnsCheck::new(ip.parse().unwrap(), 100, Duration::from_secs(1), 2, t0);
        let (mut queries, mut tcp) = (0, 0);
        while c.result().is_none() {
            let q = c.poll_transmit().expect("a query while not done");
            queries += 1;
            tcp += usize::from(q.tcp);
            c.handle_response(&zone.respond(&q.bytes, q.tcp), t0, q.tcp);
        }
        (c.result().unwrap().clone(), queries, tcp)
    }

    fn zone() -> Zone {
        let mut z = Zone::default().addr("out1.example.com", "192.0.2.1").addr("out2.example.com", "192.0.2.99");
        z.ptr.insert("1.2.0.192.in-addr.arpa".into(), vec!["out1.example.com".into()]);
        z.ptr.insert("2.2.0.192.in-addr.arpa".into(), vec!["out2.example.com".into()]);
        z.ptr.insert("3.2.0.192.in-addr.arpa".into(), vec!["nowhere.example.com".into(), "out1.example.com".into()]);
        z
    }

    #[test]
    fn a_confirmed_address_passes() {
        let (v, queries) = run(&zone(), "192.0.2.1");
        assert_eq!(v, Verdict { ptr: Some("out1.example.com".into()), ok: true, error: None });
        assert_eq!(queries, 2);
    }

    #[test]
    fn a_ptr_name_pointing_elsewhere_or_no_ptr_fails() {
        let (v, _) = run(&zone(), "192.0.2.2");
        assert_eq!((v.ok, v.ptr.as_deref()), (false, Some("out2.example.com")));
        assert_eq!(v.error, Some("no PTR name resolves back to the address"));
        let (v, queries) = run(&zone(), "192.0.2.7");
        assert_eq!((v.ok, v.ptr, v.error, queries), (false, None, Some("no PTR record"), 1));
    }

    #[test]
    fn every_ptr_name_is_tried_until_one_confirms() {
        let (v, queries) = run(&zone(), "192.0.2.3");
        // The first name does not exist; the second holds 192.0.2.1, not .3: not confirmed.
        assert!(!v.ok);
        assert_eq!(queries, 3);
    }

    #[test]
    fn timeouts_retry_then_fail_and_strangers_are_ignored() {
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut c = FcrdnsCheck::new(ip, 5, Duration::from_secs(1), 2, t0);
        let q = c.poll_transmit().unwrap().bytes;
        assert_eq!(c.poll_transmit(), None);
        // An answer with another id changes nothing.
        let mut other = zone().respond(&q, false);
        other[1] ^= 1;
        c.handle_response(&other, t0, false);
        c.handle_response(b"garbage", t0, false);
        assert!(c.result().is_none());
        c.handle_timeout(t0 + Duration::from_millis(500));
        assert_eq!(c.poll_transmit(), None, "not due yet");
        c.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(c.poll_transmit().map(|t| t.bytes), Some(q), "the same query again");
        c.handle_timeout(t0 + Duration::from_secs(2));
        assert_eq!(c.result().map(|v| v.error), Some(Some("DNS timeout")));
        assert_eq!(c.next_deadline(), None);
    }

    /// A truncated UDP answer is asked again over TCP, same query and id; the TCP answer
    /// decides. A late datagram for a query gone to TCP is ignored, and TC over TCP fails.
    #[test]
    fn a_truncated_answer_is_asked_again_over_tcp() {
        // Every UDP answer truncated (a limit below any answer's size): each of the two
        // questions goes over UDP, then over TCP.
        let mut z = zone();
        z.udp_limit = 12;
        let (v, queries, tcp) = run_counting_tcp(&z, "192.0.2.1");
        assert_eq!(v, Verdict { ptr: Some("out1.example.com".into()), ok: true, error: None });
        assert_eq!((queries, tcp), (4, 2));

        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut c = FcrdnsCheck::new(ip, 9, Duration::from_secs(1), 2, t0);
        let udp = c.poll_transmit().unwrap();
        assert!(!udp.tcp);
        let truncated = z.respond(&udp.bytes, false);
        let later = t0 + Duration::from_millis(700);
        c.handle_response(&truncated, later, false);
        let tcp = c.poll_transmit().unwrap();
        assert_eq!((tcp.id, tcp.tcp, &tcp.bytes), (udp.id, true, &udp.bytes));
        // The TCP attempt gets the whole timeout from when it went.
        assert_eq!(c.next_deadline(), Some(later + Duration::from_secs(1)));
        // The full answer arriving by datagram now is not the transport asked: ignored.
        c.handle_response(&z.respond(&udp.bytes, true), later, false);
        assert_eq!(c.poll_transmit(), None);
        assert!(c.result().is_none());
        // A server that sets TC over TCP too: the check fails, saying so.
        c.handle_response(&truncated, later, true);
        assert_eq!(c.result().map(|v| v.error), Some(Some("truncated DNS answer over TCP")));
    }
}
