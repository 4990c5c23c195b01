//! Fuzz target: DNS responses, to `dns::wire::decode_answer` and to the `dns::resolver`
//! state machine.
//!
//! - even first byte: the rest is one message for `decode_answer` (and `peek_id`). Checks: no
//!   panic; decoded names are canonical (lower case, no trailing dot).
//! - odd first byte: a `Resolver` looks up a few domains; the rest is a series of responses,
//!   each `control u8 | len u16 (big-endian) | len bytes`. Control bits 1-3 pick the
//!   outstanding query answered; bit 0 clear sends the bytes as a whole message with the
//!   query's id written over its first two; bit 0 set builds the message from the query's
//!   header and question followed by the bytes as `flags u16 | ancount u16 | nscount u16 |
//!   arcount u16 | records`, so the id and question always match and the records (which may
//!   point at the question name, offset 12) reach the MX policy, CNAME chasing, the cache and
//!   the TC→TCP path. Bit 4 lets the query deadlines pass first; bit 5 starts another lookup.
//!   Checks: no panic, finished plans are never empty, every host has an address, and no
//!   lookup finishes twice.
#![no_main]

use std::collections::HashSet;
use std::task::Poll;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sluice::dns::resolver::{MxPlan, Resolver, Transmit};
use sluice::dns::wire::{decode_answer, peek_id, Record, RrData};

/// Domains looked up, in turn; a few share names so that answers can be cached and reused.
const DOMAINS: [&str; 6] = ["example.com", "mx.test", "a.b.test", "example.com.", "Bücher.test", "[192.0.2.1]"];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        decode(rest);
    } else {
        resolve(mode, rest);
    }
});

fn canonical(name: &str) {
    assert!(!name.ends_with('.') || name == ".", "trailing dot: {name:?}");
    assert_eq!(name, name.to_ascii_lowercase(), "not lower case");
}

fn decode(bytes: &[u8]) {
    let _ = peek_id(bytes);
    let Ok(a) = decode_answer(bytes) else { return };
    if let Some(q) = &a.question {
        canonical(&q.name);
    }
    let check = |r: &Record| {
        canonical(&r.name);
        match &r.data {
            RrData::Mx { exchange, .. } => canonical(exchange),
            RrData::Cname(target) | RrData::Ptr(target) => canonical(target),
            RrData::A(_) | RrData::Aaaa(_) => {}
        }
    };
    a.answers.iter().chain(&a.additionals).for_each(check);
    if let Some(soa) = a.soa {
        let _ = soa.negative_ttl();
    }
}

fn plan_ok(plan: &MxPlan) {
    assert!(!plan.hosts.is_empty(), "an Ok plan without hosts");
    for h in &plan.hosts {
        assert!(!h.addrs.is_empty(), "host {} without addresses", h.name);
    }
    assert!(plan.hosts.windows(2).all(|w| w[0].preference <= w[1].preference), "hosts out of preference order");
}

/// The resolver and what the fuzzer's "server" knows of it.
struct World {
    r: Resolver,
    now: Instant,
    /// Queries sent and not known answered, oldest first.
    sent: Vec<Transmit>,
    /// Lookups started and pending: canonical name, host-only.
    pending: HashSet<(String, bool)>,
    next_domain: usize,
}

impl World {
    fn start(&mut self) {
        let i = self.next_domain;
        self.next_domain += 1;
        let domain = DOMAINS[i % DOMAINS.len()];
        let host_only = (i / DOMAINS.len()) % 2 == 1;
        let result =
            if host_only { self.r.lookup_host_addrs(domain, self.now) } else { self.r.lookup_mx(domain, self.now) };
        match result {
            Poll::Ready(Ok(plan)) => plan_ok(&plan),
            Poll::Ready(Err(e)) => {
                let _ = (e.is_permanent(), e.status(), e.text());
            }
            Poll::Pending => {
                let key = Resolver::canonical(domain).expect("a pending lookup has a canonical name");
                self.pending.insert((key, host_only));
            }
        }
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(t) = self.r.poll_transmit() {
            assert!(self.r.is_outstanding(t.id), "transmit for a query not outstanding");
            self.sent.push(t);
        }
        let r = &self.r;
        self.sent.retain(|t| r.is_outstanding(t.id));
        loop {
            let (done, host_only) = match self.r.poll_done() {
                Some(d) => (d, false),
                None => match self.r.poll_host_done() {
                    Some(d) => (d, true),
                    None => break,
                },
            };
            let (name, result) = done;
            assert!(self.pending.remove(&(name.clone(), host_only)), "{name} finished but was not pending");
            if let Ok(plan) = result {
                plan_ok(&plan);
            }
        }
    }
}

fn resolve(mode: u8, mut input: &[u8]) {
    let mut w = World {
        r: Resolver::new(u64::from(mode)),
        now: Instant::now(),
        sent: Vec::new(),
        pending: HashSet::new(),
        next_domain: usize::from(mode >> 1) % DOMAINS.len(),
    };
    w.start();
    w.start();
    while input.len() >= 3 {
        let control = input[0];
        let len = usize::from(u16::from_be_bytes([input[1], input[2]]));
        let body = &input[3..(3 + len).min(input.len())];
        input = &input[(3 + len).min(input.len())..];
        if control & 0x10 != 0 {
            w.now += Duration::from_secs(3);
            if w.r.next_deadline().is_some_and(|d| w.now >= d) {
                w.r.handle_timeout(w.now);
            }
            w.drain();
        }
        if control & 0x20 != 0 {
            w.start();
        }
        if w.sent.is_empty() {
            continue;
        }
        let t = &w.sent[usize::from(control >> 1 & 7) % w.sent.len()];
        let msg = if control & 1 == 0 { patched(t, body) } else { spliced(t, body) };
        let tcp = t.tcp;
        let _ = w.r.handle_response(&msg, w.now, tcp);
        w.drain();
    }
    // Whatever is still pending must time out, not hang.
    for _ in 0..8 {
        w.now += Duration::from_secs(60);
        w.r.handle_timeout(w.now);
        w.drain();
    }
    assert!(w.pending.is_empty(), "lookups never finished: {:?}", w.pending);
}

/// `body` with the query's id over its first two bytes.
fn patched(t: &Transmit, body: &[u8]) -> Vec<u8> {
    let mut m = body.to_vec();
    let id = t.id.to_be_bytes();
    for (dst, src) in m.iter_mut().zip(id) {
        *dst = src;
    }
    m
}

/// The query's id and question, then `body` as flags, counts and records.
fn spliced(t: &Transmit, body: &[u8]) -> Vec<u8> {
    let q = &t.bytes;
    // The question: the name's labels up to the root label, then type and class. Queries
    // are ours (no compression), so the walk is plain.
    let mut end = 12;
    while end < q.len() && q[end] != 0 {
        end += 1 + usize::from(q[end]);
    }
    let end = (end + 5).min(q.len());
    let mut m = Vec::with_capacity(end + body.len() + 8);
    m.extend_from_slice(&q[..2]);
    // Flags: the fuzzer's, with QR always set (else it is not a response at all).
    let flags = [body.first().copied().unwrap_or(0x81) | 0x80, body.get(1).copied().unwrap_or(0x80)];
    m.extend_from_slice(&flags);
    m.extend_from_slice(&[0, 1]);
    let counts = body.get(2..8).unwrap_or(&[0, 1, 0, 0, 0, 0]);
    m.extend_from_slice(counts);
    m.extend(std::iter::repeat_n(0, 6 - counts.len()));
    m.extend_from_slice(q.get(12..end).unwrap_or(&[]));
    m.extend_from_slice(body.get(8..).unwrap_or(&[]));
    m
}
