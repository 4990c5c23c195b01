//! The delivery rules on fake time ([`super::harness`]): each test scripts DNS and
//! destinations, submits messages and checks the outcome records, bounces and connections.

use std::time::Duration;

use super::engine::Note;
use super::harness::{config, reply, Harness, Host, Server};
use super::route::Verdict;
use super::tls::{OutboundTls, TLS_BROKEN_MS};
use crate::dns::resolver::DnsError;
use crate::message::QueueId;
use crate::smtp::client::TlsPolicy;

const MX1: [u8; 4] = [192, 0, 2, 1];
const MX2: [u8; 4] = [192, 0, 2, 2];

fn smtp() -> Host {
    Host::Smtp(Server::default())
}

fn harness(concurrency: u32, tls: OutboundTls) -> Harness {
    let mut h = Harness::new(config(concurrency, tls));
    h.mx("a.test", &[("mx1.a.test", 10, MX1), ("mx2.a.test", 20, MX2)]);
    h
}

fn ip(c: &(std::net::SocketAddr, TlsPolicy)) -> [u8; 4] {
    match c.0.ip() {
        std::net::IpAddr::V4(v4) => v4.octets(),
        std::net::IpAddr::V6(_) => [0; 4],
    }
}

#[test]
fn a_message_is_delivered_on_one_connection_and_released() {
    let mut h = harness(2, OutboundTls::None);
    h.host(MX1, smtp());
    let id = h.submit("s@x.test", &["u@a.test", "v@a.test"]);
    h.run();
    let o = h.outcomes(id);
    assert_eq!(o.len(), 2);
    assert!(o.iter().all(|r| r.1 == Verdict::Delivered && r.2 == 250), "{o:?}");
    assert_eq!(h.records[0].remote, "mx1.a.test[192.0.2.1]");
    assert_eq!(
        (h.released.as_slice(), h.connects.len(), h.lookups.as_slice()),
        (&[id][..], 1, &["a.test".to_string()][..])
    );
}

/// A destination whose every address fails is down: its work is parked (no connection, no
/// outcome record, no attempt counted) and one connection probes it after each backoff; when
/// it answers again everything goes out on the first attempt.
#[test]
fn every_address_failing_parks_the_work_and_one_connection_probes_after_the_backoff() {
    let mut h = harness(4, OutboundTls::None);
    h.host(MX1, Host::Refuse);
    h.host(MX2, Host::Greet(reply(421, (4, 3, 2), "busy")));
    let first = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    assert_eq!(h.connects.iter().map(ip).collect::<Vec<_>>(), [MX1, MX2]);
    // Work arriving during the backoff waits without a connection; nothing is recorded.
    let second = h.submit("s@x.test", &["w@a.test"]);
    let third = h.submit("s@x.test", &["z@a.test"]);
    h.run();
    h.advance(Duration::from_secs(29));
    assert_eq!((h.connects.len(), h.records.len()), (2, 0));
    // After the backoff (30 s, the first retry being 60 s) one connection probes, the address
    // after the last one tried; it fails, so do the next, and the work stays parked.
    h.advance(Duration::from_secs(2));
    assert_eq!(h.connects.iter().map(ip).collect::<Vec<_>>(), [MX1, MX2, MX1, MX2]);
    assert!(h.records.is_empty(), "{:?}", h.records);
    // Up again: the next probe delivers, then the rest follows, each on its first attempt.
    h.host(MX1, smtp());
    h.advance(Duration::from_secs(31));
    for id in [first, second, third] {
        let o = h.outcomes(id);
        assert_eq!(o.len(), 1, "{o:?}");
        assert_eq!(o[0].1, Verdict::Delivered);
    }
    assert!(h.records.iter().all(|r| r.settled.attempts == 1));
}

#[test]
fn the_next_mx_is_tried_after_a_4xx_greeting_or_a_refused_connect() {
    for first in
        [Host::Greet(reply(421, (4, 7, 0), "try later")), Host::Refuse, Host::Greet(reply(554, (5, 0, 0), "no"))]
    {
        let mut h = harness(1, OutboundTls::None);
        h.host(MX1, first);
        h.host(MX2, smtp());
        let id = h.submit("s@x.test", &["u@a.test"]);
        h.run();
        assert_eq!(h.connects.iter().map(ip).collect::<Vec<_>>(), [MX1, MX2]);
        assert_eq!(h.outcomes(id)[0].1, Verdict::Delivered);
        assert!(matches!(&h.notes[0], Note::ConnectError { host, .. } if &**host == "mx1.a.test"));
        assert!(h.bounces.is_empty());
    }
}

#[test]
fn a_connect_timeout_moves_on_to_the_next_address() {
    let mut h = harness(1, OutboundTls::None);
    h.host(MX1, Host::Silent);
    h.host(MX2, smtp());
    let id = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    assert!(h.records.is_empty());
    h.advance(Duration::from_secs(9));
    assert_eq!(h.connects.len(), 1);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.connects.iter().map(ip).collect::<Vec<_>>(), [MX1, MX2]);
    assert_eq!(h.outcomes(id)[0].1, Verdict::Delivered);
    // Every address silent: the deferral says the connect timed out.
    let mut h = harness(1, OutboundTls::None);
    h.host(MX1, Host::Silent);
    h.host(MX2, Host::Silent);
    let id = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    for _ in 0..20 {
        h.advance(Duration::from_secs(1));
    }
    assert_eq!(h.connects.len(), 2);
    assert!(h.records.is_empty());
    // Parked until its lifetime ends (and the probes then under way time out, one address
    // after the other): the bounce names the timeout.
    h.advance(Duration::from_secs(3600));
    for _ in 0..2 {
        h.advance(Duration::from_secs(11));
    }
    let r = h.records.iter().find(|r| r.id == id).unwrap();
    assert_eq!(r.settled.reply.enhanced, Some((5, 4, 7)));
    assert!(r.settled.reply.text.ends_with("connection timed out"), "{}", r.settled.reply);
}

#[test]
fn a_lost_connection_defers_its_transaction_and_gives_the_queued_one_back_untried() {
    let mut h = harness(1, OutboundTls::None);
    h.host(MX1, Host::Smtp(Server { pipelining: true, hold: true, ..Server::default() }));
    let a = h.submit("s@x.test", &["u@a.test"]);
    let b = h.submit("s@x.test", &["v@a.test"]);
    h.run();
    assert_eq!(h.connects.len(), 1);
    h.host(MX1, smtp());
    h.drop_conn(MX1);
    let lost = &h.records[0];
    assert_eq!((lost.id, lost.settled.verdict, lost.settled.attempts), (a, Verdict::Deferred, 1));
    assert_eq!(lost.settled.reply.enhanced, Some((4, 4, 2)));
    assert!(lost.settled.reply.text.contains("lost connection with mx1.a.test[192.0.2.1]"), "{}", lost.settled.reply);
    // The queued message was never attempted: it goes out on a new connection as attempt 1.
    assert_eq!(h.connects.len(), 2);
    let o: Vec<_> = h.records.iter().filter(|r| r.id == b).collect();
    assert_eq!(o.len(), 1);
    assert_eq!((o[0].settled.verdict, o[0].settled.attempts), (Verdict::Delivered, 1));
}

/// The driver reads a message without checking its crc on its first attempt only: a retry may
/// come long after, from pages read back from the disk.
#[test]
fn only_a_first_attempt_is_marked_first() {
    let mut h = harness(1, OutboundTls::None);
    let later = reply(451, (4, 3, 0), "try later");
    h.host(MX1, Host::Smtp(Server { data: Some(later), ..Server::default() }));
    let id = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    assert_eq!(h.outcomes(id)[0].1, Verdict::Deferred);
    h.host(MX1, smtp());
    assert!(h.sleep(), "the retry is scheduled");
    while h.outcomes(id).len() < 2 {
        assert!(h.sleep(), "the retry is scheduled");
    }
    assert_eq!(h.outcomes(id)[1].1, Verdict::Delivered);
    assert_eq!(h.first_attempts, [true, false]);
}

#[test]
fn a_refusal_at_rcpt_stands_after_the_connection_drops() {
    let mut h = harness(1, OutboundTls::None);
    let refused = reply(550, (5, 1, 1), "no such user");
    let rcpt = [("bad@a.test".to_string(), refused.clone())].into();
    h.host(MX1, Host::Smtp(Server { rcpt, drop_after_rcpt: true, ..Server::default() }));
    let id = h.submit("s@x.test", &["bad@a.test", "good@a.test"]);
    h.run();
    let o = h.outcomes(id);
    assert_eq!(o[0], ("bad@a.test".into(), Verdict::Failed, 550, (5, 1, 1)));
    assert_eq!((o[1].1, o[1].3), (Verdict::Deferred, (4, 4, 2)));
    assert_eq!(h.bounces.len(), 1, "the refused recipient is bounced at once");
}

#[test]
fn may_falls_back_to_plaintext_and_remembers_the_broken_address() {
    let mut h = harness(1, OutboundTls::May);
    h.host(MX1, Host::Smtp(Server { starttls: true, broken_tls: true, ..Server::default() }));
    let id = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    assert_eq!(h.connects.iter().map(|c| c.1).collect::<Vec<_>>(), [TlsPolicy::Opportunistic, TlsPolicy::Off]);
    assert_eq!(h.outcomes(id)[0].1, Verdict::Delivered);
    assert!(h.notes.iter().any(|n| matches!(n, Note::TlsFallback { .. })));
    // The next connection skips the doomed handshake, until the memory expires.
    h.advance(Duration::from_secs(6));
    h.submit("s@x.test", &["v@a.test"]);
    h.run();
    assert_eq!(h.connects[2].1, TlsPolicy::Off);
    h.advance(Duration::from_millis(TLS_BROKEN_MS));
    h.submit("s@x.test", &["w@a.test"]);
    h.run();
    assert_eq!(h.connects[3].1, TlsPolicy::Opportunistic);
    // A working STARTTLS is recorded in the attempt.
    let mut h = harness(1, OutboundTls::May);
    h.host(MX1, Host::Smtp(Server { starttls: true, ..Server::default() }));
    h.submit("s@x.test", &["u@a.test"]);
    h.run();
    assert_eq!(h.records[0].tls, "TLSv1.3");
}

#[test]
fn relay_auth_refused_defers_with_4_7_8_and_never_bounces() {
    // A shaping default that would allow the clear is overridden by `--relay-tls`.
    let mut cfg = config(1, OutboundTls::May);
    cfg.relay_tls = Some(OutboundTls::Verify);
    cfg.relay_host = Some(("smarthost.test".into(), 587));
    let mut h = Harness::new(cfg);
    h.mx("smarthost.test", &[("smarthost.test", 0, MX1)]);
    let refusal = reply(535, (5, 7, 8), "Authentication credentials invalid");
    h.host(MX1, Host::Smtp(Server { starttls: true, auth_refused: Some(refusal), ..Server::default() }));
    let id = h.submit("s@x.test", &["u@a.test", "v@b.test"]);
    h.run();
    for attempt in 1..=3 {
        assert!(h.connects.iter().all(|c| c.1 == TlsPolicy::Required && c.0.port() == 587), "{:?}", h.connects);
        let o = h.outcomes(id);
        // A 5xx to AUTH is about our credentials, not the recipients: deferred with a record
        // (the host is up), not failed.
        assert_eq!(o.len(), 2 * attempt, "{o:?}");
        assert!(o.iter().all(|r| (r.1, r.2, r.3) == (Verdict::Deferred, 451, (4, 7, 8))), "{o:?}");
        let last = &h.records.last().unwrap().settled.reply;
        assert!(last.text.contains("authentication") && last.text.contains("535 5.7.8"), "{last}");
        assert!(h.bounces.is_empty(), "{:?}", h.bounces);
        assert_eq!(h.notes.iter().filter(|n| matches!(n, Note::AuthFailed { .. })).count(), attempt);
        h.advance(Duration::from_secs(61));
        h.run();
    }
}

#[test]
fn encrypt_and_verify_failures_defer_and_never_send_in_clear() {
    for (mode, server, status) in [
        (OutboundTls::Encrypt, Server::default(), (4, 7, 4)),
        (OutboundTls::Verify, Server { starttls: true, broken_tls: true, ..Server::default() }, (4, 7, 5)),
    ] {
        let mut h = Harness::new(config(1, mode));
        h.mx("a.test", &[("mx1.a.test", 10, MX1)]);
        h.host(MX1, Host::Smtp(server));
        let id = h.submit("s@x.test", &["u@a.test"]);
        h.run();
        assert!(h.connects.iter().all(|c| c.1 == TlsPolicy::Required), "{:?}", h.connects);
        assert_eq!(h.connects.len(), 1);
        let o = h.outcomes(id);
        assert_eq!((o[0].1, o[0].2, o[0].3), (Verdict::Deferred, 451, status));
        assert!(h.notes.iter().any(|n| matches!(n, Note::TlsError { .. })));
    }
}

#[test]
fn expiry_fails_with_4_4_7_and_bounces() {
    let mut h = harness(1, OutboundTls::None);
    h.host(MX1, Host::Refuse);
    h.host(MX2, Host::Refuse);
    let id = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    // Parked while the destination is down (probed every 30 s) until the hour is over.
    for _ in 0..60 {
        h.advance(Duration::from_secs(60));
    }
    let o = h.outcomes(id);
    assert_eq!(o.len(), 1, "{o:?}");
    let last = o.last().unwrap();
    assert_eq!((last.1, last.2, last.3), (Verdict::Failed, 550, (5, 4, 7)));
    assert!(h.records.iter().rev().find(|r| r.id == id).unwrap().settled.reply.text.contains("last error: 451 4.4.1"));
    assert_eq!(h.bounces.len(), 1);
    assert_eq!(h.released.first(), Some(&id));
}

#[test]
fn the_bounce_is_stored_before_the_failures_it_reports() {
    let mut h = harness(1, OutboundTls::None);
    let rcpt = [("bad@a.test".to_string(), reply(550, (5, 1, 1), "no such user"))].into();
    h.host(MX1, Host::Smtp(Server { rcpt, ..Server::default() }));
    let id = h.submit("s@x.test", &["bad@a.test", "good@a.test"]);
    h.run();
    let (dsn, of, reported) = h.bounces[0].clone();
    assert_eq!((of, reported), (id, vec![0]));
    let first_outcome = h.log.iter().position(|l| *l == format!("O {}", id.0)).unwrap();
    assert!(h.log.iter().position(|l| *l == format!("B {}", dsn.0)).unwrap() < first_outcome, "{:?}", h.log);
    let o: Vec<_> = h.records.iter().filter(|r| r.id == id).collect();
    assert_eq!(o[0].settled.bounce, Some(dsn));
    assert_eq!(o[1].settled.bounce, None, "a delivered recipient names no DSN");
    // The DSN is queued to the sender's domain like any message (x.test does not resolve, and a
    // DSN's failure is never bounced again).
    assert!(h.lookups.contains(&"x.test".to_string()));
    assert_eq!(h.bounces.len(), 1);
}

#[test]
fn a_null_sender_is_never_bounced() {
    let mut h = harness(1, OutboundTls::None);
    let rcpt = [("bad@a.test".to_string(), reply(550, (5, 1, 1), "no"))].into();
    h.host(MX1, Host::Smtp(Server { rcpt, ..Server::default() }));
    let id = h.submit("", &["bad@a.test"]);
    h.run();
    assert_eq!(h.outcomes(id)[0].1, Verdict::Failed);
    assert!(h.bounces.is_empty());
    assert_eq!(h.records[0].settled.bounce, None);
    assert_eq!(h.released, [id]);
}

#[test]
fn a_bounce_that_cannot_be_stored_keeps_the_failure_deferred() {
    // Retries every 10 minutes: the bounce retry (60 s) is sooner.
    let mut cfg = config(1, OutboundTls::None);
    cfg.policy.schedule = vec![Duration::from_secs(600)];
    let mut h = Harness::new(cfg);
    h.mx("a.test", &[("mx1.a.test", 10, MX1)]);
    let rcpt = [("bad@a.test".to_string(), reply(550, (5, 1, 1), "no"))].into();
    h.host(MX1, Host::Smtp(Server { rcpt, ..Server::default() }));
    h.bounce_fails = true;
    let id = h.submit("s@x.test", &["bad@a.test"]);
    h.run();
    let o = &h.records[0].settled;
    assert_eq!(o.verdict, Verdict::Deferred);
    assert_eq!(o.next_ms, h.now().wall_ms + 60_000);
    assert!(h.released.is_empty());
    // Room again: the retry bounces and finishes it.
    h.bounce_fails = false;
    h.advance(Duration::from_secs(60));
    assert_eq!(h.outcomes(id).last().unwrap().1, Verdict::Failed);
    assert_eq!(h.bounces.len(), 1);
    assert_eq!(h.released.first(), Some(&id));
}

#[test]
fn connections_are_reused_within_the_domain_concurrency() {
    let mut h = harness(2, OutboundTls::None);
    h.host(MX1, Host::Smtp(Server { hold: true, ..Server::default() }));
    let ids: Vec<QueueId> = (0..5).map(|i| h.submit("s@x.test", &[&format!("u{i}@a.test")])).collect();
    h.run();
    assert_eq!((h.connects.len(), h.open()), (2, 2));
    for _ in 0..3 {
        h.complete(MX1);
    }
    assert_eq!(h.connects.len(), 2, "no connection beyond --domain-concurrency");
    assert!(ids.iter().all(|&id| h.outcomes(id).first().is_some_and(|o| o.1 == Verdict::Delivered)));
    // Idle connections say QUIT after the idle timeout.
    h.advance(Duration::from_secs(5));
    assert_eq!((h.quits, h.open()), (2, 0));
}

#[test]
fn mail_that_would_loop_back_fails_with_5_4_6() {
    let mut h = harness(1, OutboundTls::None);
    h.own.push(std::net::SocketAddr::from((MX1, 25)));
    h.mx("a.test", &[("mx1.a.test", 10, MX1)]);
    let id = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    assert!(h.connects.is_empty());
    let o = h.outcomes(id);
    assert_eq!((o[0].1, o[0].2, o[0].3), (Verdict::Failed, 554, (5, 4, 6)));
    // A better MX than us is still used.
    let mut h = harness(1, OutboundTls::None);
    h.own.push(std::net::SocketAddr::from((MX2, 25)));
    h.host(MX1, smtp());
    let id = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    assert_eq!(h.outcomes(id)[0].1, Verdict::Delivered);
}

#[test]
fn lookup_failures_bounce_when_permanent_and_defer_otherwise() {
    let mut h = Harness::new(config(1, OutboundTls::None));
    h.dns_error("gone.test", DnsError::NxDomain);
    h.dns_error("flaky.test", DnsError::ServFail);
    let id = h.submit("s@x.test", &["u@gone.test", "v@flaky.test"]);
    h.run();
    let o = h.outcomes(id);
    assert!(o.contains(&("u@gone.test".into(), Verdict::Failed, 550, (5, 1, 2))), "{o:?}");
    assert!(o.contains(&("v@flaky.test".into(), Verdict::Deferred, 451, (4, 4, 3))), "{o:?}");
    assert!(h.notes.iter().any(|n| matches!(n, Note::Route { event: "dns", .. })));
    assert_eq!((h.bounces.len(), h.bounces[0].2.as_slice()), (1, &[0][..]), "only the permanent failure bounces");
}

/// A message from an IPv4 egress source is only ever tried at IPv4 addresses (binding the
/// source and connecting to an IPv6 address would fail), whatever the MX order; when the
/// exchangers have no IPv4 address it is deferred with `4.4.4`, never bounced, and no
/// connection is tried. Without sources both families are tried, as they come.
#[test]
fn an_egress_source_is_tried_only_at_addresses_of_its_family() {
    use super::sources::{Source, Sources};
    use std::net::IpAddr;
    let v6: IpAddr = "2001:db8::25".parse().unwrap();
    let v4 = IpAddr::from(MX2);
    let script = |h: &mut Harness| {
        // The better exchanger has only an IPv6 address; the other has both.
        h.mx_ips("mixed.test", &[("mx6.mixed.test", 10, &[v6]), ("mx46.mixed.test", 20, &[v6, v4])]);
        h.mx_ips("six.test", &[("mx6.six.test", 10, &[v6])]);
        h.host_ip(v6, smtp());
        h.host_ip(v4, smtp());
    };
    let source = Source { name: "out4".into(), ip: "198.51.100.1".parse().unwrap(), ehlo: None };
    let mut cfg = config(2, OutboundTls::None);
    cfg.sources = std::sync::Arc::new(Sources::build(vec![source], &[], &[]).unwrap());
    let mut h = Harness::new(cfg);
    script(&mut h);
    let id = h.submit("s@x.test", &["u@mixed.test", "v@six.test"]);
    h.run();
    assert_eq!(h.connects.iter().map(|c| c.0.ip()).collect::<Vec<_>>(), [v4], "only the IPv4 address");
    let o = h.outcomes(id);
    assert!(o.contains(&("u@mixed.test".into(), Verdict::Delivered, 250, (2, 0, 0))), "{o:?}");
    assert!(o.contains(&("v@six.test".into(), Verdict::Deferred, 451, (4, 4, 4))), "{o:?}");
    let text = &h.records.iter().find(|r| r.rcpt == "v@six.test").unwrap().settled.reply.text;
    assert_eq!(text, "no IPv4 address for source out4 at mx6.six.test");
    assert!(h.bounces.is_empty());
    assert!(!h.notes.iter().any(|n| matches!(n, Note::ConnectError { .. })), "{:?}", h.notes);
    let no_route: Vec<_> = h
        .notes
        .iter()
        .filter_map(|n| match n {
            Note::NoRoute { domain, source, .. } => Some((domain.to_string(), source.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(no_route, [("six.test".to_string(), "out4".to_string())]);

    // Without a source: the IPv6 exchanger first, as the MX order says.
    let mut h = Harness::new(config(2, OutboundTls::None));
    script(&mut h);
    let id = h.submit("s@x.test", &["u@mixed.test", "v@six.test"]);
    h.run();
    assert_eq!(h.connects.first().map(|c| c.0.ip()), Some(v6));
    assert!(h.outcomes(id).iter().all(|o| o.1 == Verdict::Delivered), "{:?}", h.outcomes(id));
}

#[test]
fn every_dsn_is_followed_by_the_outcome_records_that_name_it() {
    // Two messages fail in one pass: DSN, its outcomes, DSN, its outcomes (the room reserved
    // with a DSN is for its own outcome records, in the same segment).
    let mut h = Harness::new(config(1, OutboundTls::None));
    h.dns_error("gone.test", DnsError::NxDomain);
    let a = h.submit("s@x.test", &["u@gone.test", "v@gone.test"]);
    let b = h.submit("s@x.test", &["w@gone.test"]);
    h.run();
    let (da, db) = (h.bounces[0].0 .0, h.bounces[1].0 .0);
    let expect =
        [format!("B {da}"), format!("O {}", a.0), format!("O {}", a.0), format!("B {db}"), format!("O {}", b.0)];
    assert_eq!(h.log[..5], expect, "{:?}", h.log);
}

#[test]
fn a_message_finished_by_two_settlements_releases_every_pin() {
    // Both destinations fail in one pass: two Settle actions for one message, the second
    // finishing it; the first one's outcome records still pin (the harness checks each release).
    let mut h = Harness::new(config(1, OutboundTls::None));
    h.dns_error("gone.test", DnsError::NxDomain);
    h.dns_error("void.test", DnsError::NullMx);
    let id = h.submit("", &["u@gone.test", "v@void.test"]);
    h.run();
    assert_eq!(h.outcomes(id).len(), 2);
    assert_eq!(h.released, [id]);
}

#[test]
fn an_idle_connection_takes_new_work_and_quits_after_its_transaction_budget() {
    let mut h = harness(1, OutboundTls::None);
    h.host(MX1, smtp());
    h.submit("s@x.test", &["u@a.test"]);
    h.run();
    h.advance(Duration::from_secs(1));
    h.submit("s@x.test", &["v@a.test"]);
    h.run();
    assert_eq!(h.connects.len(), 1, "the idle connection is reused");
    let n = super::engine::MAX_TRANSACTIONS_PER_CONN as usize;
    for i in 0..n {
        h.submit("s@x.test", &[&format!("w{i}@a.test")]);
    }
    h.run();
    assert_eq!(h.records.iter().filter(|r| r.settled.verdict == Verdict::Delivered).count(), n + 2);
    assert_eq!((h.quits, h.connects.len()), (1, 2), "QUIT after {n} transactions, then a new connection");
}

#[test]
fn a_local_shortage_pauses_new_connections_without_blaming_the_destination() {
    let mut h = Harness::new(config(1, OutboundTls::None));
    h.mx("a.test", &[("mx1.a.test", 10, MX1)]);
    h.mx("b.test", &[("mx2.b.test", 10, MX2)]);
    h.host(MX1, Host::Shortage);
    h.host(MX2, smtp());
    let a = h.submit("s@x.test", &["u@a.test"]);
    let b = h.submit("s@x.test", &["v@b.test"]);
    h.run();
    // One doomed connect, then the rest of the batch waits for the pause.
    assert_eq!((h.shortages, h.connects.len()), (1, 0));
    assert!(h.records.is_empty(), "nothing is deferred for our own shortage");
    h.host(MX1, smtp());
    h.advance(super::engine::LOCAL_PAUSE);
    assert_eq!(h.outcomes(a)[0].1, Verdict::Delivered);
    assert_eq!(h.outcomes(b)[0].1, Verdict::Delivered);
}
