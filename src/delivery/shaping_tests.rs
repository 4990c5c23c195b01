//! Traffic shaping on fake time ([`super::harness`]): rates, connection limits per site,
//! deliveries per connection, automation, suspensions and expiry while parked. Time moves
//! only as the driver moves it — to the engine's next deadline — so a wake-up the engine
//! forgot to ask for shows up as mail that never goes.

use std::time::Duration;

use super::engine::Note;
use super::harness::{config_shaped, reply, Harness, Host, Server};
use super::route::Verdict;
use super::tls::OutboundTls;
use crate::message::QueueId;
use crate::shaping::Scope;
use crate::smtp::client::TlsPolicy;

const MX1: [u8; 4] = [192, 0, 2, 1];

fn shaped(concurrency: u32, file: &str) -> Harness {
    let mut h = Harness::new(config_shaped(concurrency, OutboundTls::None, file));
    h.mx("a.test", &[("mx1.a.test", 10, MX1)]);
    h
}

fn delivered(h: &Harness) -> usize {
    h.records.iter().filter(|r| r.settled.verdict == Verdict::Delivered).count()
}

/// Sleeps from deadline to deadline until `until`, never past it (bounded: a test must stop).
fn sleep_until(h: &mut Harness, until: Duration) {
    for _ in 0..100_000 {
        let now = h.now();
        let next = h.engine.next_deadline(now).map(|t| h.elapsed + t.saturating_duration_since(now.at));
        if next.is_none_or(|t| t > until) {
            h.elapsed = h.elapsed.max(until);
            h.run();
            return;
        }
        h.sleep();
    }
    panic!("more than 100,000 wake-ups before {until:?}: a busy loop");
}

fn shaping_notes(h: &Harness) -> Vec<(&'static str, String)> {
    h.notes
        .iter()
        .filter_map(|n| match n {
            Note::Shaping(c) => Some((c.event, c.site.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_message_rate_holds_over_every_connection_of_the_site() {
    let mut h = shaped(5, "[domain.\"a.test\"]\nmax_message_rate = \"10/s\"\n");
    h.host(MX1, Host::Smtp(Server { pipelining: true, ..Server::default() }));
    for _ in 0..100 {
        h.submit("s@x.test", &["u@a.test"]);
    }
    h.run();
    // A full bucket (one second of the rate) goes at once; then one message per 100 ms.
    assert_eq!(delivered(&h), 10);
    sleep_until(&mut h, Duration::from_secs(20));
    assert_eq!(delivered(&h), 100);
    let last = h.records.iter().map(|r| r.at).max().unwrap();
    assert!(last >= Duration::from_millis(8_900) && last <= Duration::from_millis(9_100), "{last:?}");
    // In any second, no more than the rate plus the bucket.
    for s in 0..10 {
        let n = h.records.iter().filter(|r| r.at.as_secs() == s).count();
        assert!(n <= 20, "second {s}: {n}");
    }
    // No more connections than tokens allowed at the start, reused since.
    assert!(h.connects.len() <= 5, "{}", h.connects.len());
}

#[test]
fn the_domains_of_one_site_share_its_connection_limit() {
    let file = "[provider.acme]\nmx = [\"*.acme.test\"]\nconnection_limit = 2\n";
    let mut h = Harness::new(config_shaped(8, OutboundTls::None, file));
    h.mx("a.test", &[("mx1.acme.test", 10, MX1)]);
    h.mx("b.test", &[("mx1.acme.test", 10, MX1)]);
    h.host(MX1, Host::Smtp(Server { hold: true, ..Server::default() }));
    for _ in 0..5 {
        h.submit("s@x.test", &["u@a.test"]);
        h.submit("s@x.test", &["u@b.test"]);
    }
    h.run();
    assert_eq!(h.open(), 2, "the site's limit, not 2 per domain");
    for _ in 0..20 {
        h.complete(MX1);
        assert!(h.open() <= 2);
    }
    assert_eq!(delivered(&h), 10);
    // Both domains got their turn.
    assert!(h.records.iter().any(|r| r.rcpt == "u@b.test") && h.records.iter().any(|r| r.rcpt == "u@a.test"));
}

#[test]
fn max_deliveries_per_connection_quits_and_reconnects() {
    let mut h = shaped(1, "[domain.\"a.test\"]\nmax_deliveries_per_connection = 3\n");
    h.host(MX1, Host::Smtp(Server::default()));
    for _ in 0..7 {
        h.submit("s@x.test", &["u@a.test"]);
    }
    h.run();
    assert_eq!(delivered(&h), 7);
    assert_eq!((h.connects.len(), h.quits), (3, 2));
}

#[test]
fn a_site_that_requires_tls_never_gets_mail_in_clear() {
    // Google's built-in profile: TLS required, whatever --outbound-tls says.
    let mut h = Harness::new(config_shaped(4, OutboundTls::May, ""));
    h.mx("gmail.com", &[("aspmx.l.google.com", 5, MX1)]);
    h.host(MX1, Host::Smtp(Server::default()));
    let id = h.submit("s@x.test", &["u@gmail.com"]);
    h.run();
    assert!(h.connects.iter().all(|c| c.1 == TlsPolicy::Required), "{:?}", h.connects);
    let o = h.outcomes(id);
    assert_eq!((o[0].1, o[0].3), (Verdict::Deferred, (4, 7, 4)), "deferred, never delivered in clear");
    h.host(MX1, Host::Smtp(Server { starttls: true, ..Server::default() }));
    sleep_until(&mut h, Duration::from_secs(120));
    assert_eq!(h.outcomes(id).last().unwrap().1, Verdict::Delivered);
    assert_eq!(h.records.last().unwrap().tls, "TLSv1.3");
}

#[test]
fn a_421_4_7_28_throttles_the_site_to_one_message_a_minute() {
    // The file's rule comes before the built-in one (same limits, 90 minutes).
    let rule = "[[automation]]\nmatch = '4\\.7\\.28'\naction = \"throttle\"\nduration = \"10m\"\n\
                connection_limit = 1\nmax_message_rate = \"1/min\"\n";
    let mut h = shaped(5, rule);
    let gmail = reply(421, (4, 7, 28), "Our system has detected an unusual rate of unsolicited mail");
    h.host(MX1, Host::Smtp(Server { refuse_first: Some((1, gmail)), ..Server::default() }));
    let ids: Vec<QueueId> = (0..10).map(|_| h.submit("s@x.test", &["u@a.test"])).collect();
    h.run();
    assert_eq!(shaping_notes(&h), [("throttle", "mx1.a.test".to_string())]);
    let after_throttle = delivered(&h);
    // 1 connection, 1 message a minute: at most one more per minute (plus the bucket's one).
    sleep_until(&mut h, Duration::from_secs(5 * 60 + 1));
    let n = delivered(&h) - after_throttle;
    assert!((5..=6).contains(&n), "{n} in 5 minutes");
    assert!(h.open() <= 1);
    // The throttle ends after 10 minutes: the rest goes at once.
    sleep_until(&mut h, Duration::from_secs(10 * 60 + 1));
    assert!(shaping_notes(&h).iter().any(|(e, _)| *e == "resume"), "{:?}", shaping_notes(&h));
    sleep_until(&mut h, Duration::from_secs(12 * 60));
    assert!(ids.iter().all(|&id| h.outcomes(id).iter().any(|o| o.1 == Verdict::Delivered)));
}

#[test]
fn yahoo_tss04_suspends_the_site_and_its_mail_waits_without_records() {
    let mut cfg = config_shaped(2, OutboundTls::None, "");
    cfg.policy.max_lifetime = Duration::from_secs(24 * 3600);
    let mut h = Harness::new(cfg);
    h.mx("a.test", &[("mx1.a.test", 10, MX1)]);
    let tss04 = reply(421, (4, 7, 0), "[TSS04] Messages from 192.0.2.9 temporarily deferred due to unexpected volume");
    h.host(MX1, Host::Smtp(Server { refuse_first: Some((1, tss04)), ..Server::default() }));
    for _ in 0..20 {
        h.submit("s@x.test", &["u@a.test"]);
    }
    h.run();
    assert_eq!(shaping_notes(&h), [("suspend", "mx1.a.test".to_string())]);
    let (connects, records) = (h.connects.len(), h.records.len());
    // The transactions under way when it came end; then nothing for two hours.
    sleep_until(&mut h, Duration::from_secs(2 * 3600 - 1));
    assert_eq!((h.connects.len(), h.records.len()), (connects, records));
    assert!(h.engine.suspended(h.dest("a.test"), h.now()));
    sleep_until(&mut h, Duration::from_secs(2 * 3600 + 60));
    assert_eq!(delivered(&h), 20);
    assert!(shaping_notes(&h).contains(&("resume", "mx1.a.test".to_string())));
}

#[test]
fn a_manual_suspension_parks_until_resumed_and_the_lifetime_still_runs() {
    let mut h = shaped(2, "");
    h.host(MX1, Host::Smtp(Server::default()));
    let now = h.now();
    let until = now.wall_ms + 24 * 3600 * 1000;
    h.engine.suspend(Scope::Domain("A.test".into()), until, "maintenance", true).unwrap();
    assert!(h.engine.suspend(Scope::Provider("nope".into()), until, "x", true).is_err());
    let early = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    assert!(h.connects.is_empty());
    assert_eq!(h.engine.suspensions(h.now()).len(), 1);
    // The queue lifetime (1 h here) ends while suspended: 4.4.7 naming the suspension.
    sleep_until(&mut h, Duration::from_secs(3600 + 1));
    assert!(h.connects.is_empty());
    let o = h.outcomes(early);
    assert_eq!((o.len(), o[0].1, o[0].3), (1, Verdict::Failed, (5, 4, 7)));
    assert!(h.records[0].settled.reply.text.contains("suspended: maintenance"), "{}", h.records[0].settled.reply);
    assert_eq!(h.bounces.len(), 1);
    // Mail after that waits too, until resumed: then it goes at once.
    let late = h.submit("s@x.test", &["v@a.test"]);
    assert!(h.engine.suspended(h.dest("a.test"), h.now()));
    h.run();
    assert!(h.connects.is_empty());
    assert!(h.engine.resume(&Scope::Domain("a.test".into())));
    assert!(!h.engine.resume(&Scope::Domain("a.test".into())));
    h.run();
    assert_eq!(h.outcomes(late)[0].1, Verdict::Delivered);
    assert_eq!(shaping_notes(&h).iter().map(|n| n.0).collect::<Vec<_>>(), ["suspend", "resume"]);
}

#[test]
fn a_suspended_provider_stops_every_domain_it_hosts() {
    let mut h = Harness::new(config_shaped(2, OutboundTls::None, "[provider.google]\ntls = \"disabled\"\n"));
    h.mx("gmail.com", &[("aspmx.l.google.com", 5, MX1)]);
    h.mx("hosted.test", &[("alt1.aspmx.l.google.com", 5, MX1)]);
    h.mx("a.test", &[("mx1.a.test", 10, [192, 0, 2, 7])]);
    h.host(MX1, Host::Smtp(Server::default()));
    h.host([192, 0, 2, 7], Host::Smtp(Server::default()));
    let now = h.now();
    h.engine.suspend(Scope::Provider("google".into()), now.wall_ms + 60_000, "complaints", true).unwrap();
    let g = h.submit("s@x.test", &["u@gmail.com", "v@hosted.test"]);
    let a = h.submit("s@x.test", &["u@a.test"]);
    h.run();
    assert!(h.outcomes(g).is_empty());
    assert_eq!(h.outcomes(a)[0].1, Verdict::Delivered);
    assert_eq!(h.engine.site_name(h.dest("hosted.test")), Some("google"));
    sleep_until(&mut h, Duration::from_secs(61));
    assert_eq!(h.outcomes(g).iter().filter(|o| o.1 == Verdict::Delivered).count(), 2);
}

/// A new site gets two connections until its first delivery (a slow start), then one more per
/// delivery: a receiver that refuses everything sees two transactions before automation
/// throttles the site (then one a minute), not one per allowed connection.
#[test]
fn a_slow_start_keeps_a_refusing_receiver_to_a_few_transactions() {
    let mut h = shaped(16, "");
    let gmail = reply(421, (4, 7, 28), "unusual rate");
    h.host(MX1, Host::Smtp(Server { refuse_first: Some((usize::MAX, gmail)), ..Server::default() }));
    for _ in 0..20 {
        h.submit("s@x.test", &["u@a.test"]);
    }
    h.run();
    // Two, then the one the throttle's 1/min bucket holds, then nothing for a minute.
    assert_eq!(h.records.len(), 3);
    assert_eq!(shaping_notes(&h), [("throttle", "mx1.a.test".to_string())]);
    sleep_until(&mut h, Duration::from_secs(59));
    assert_eq!(h.records.len(), 3);
    // A receiver that accepts: the site ramps up to its limit as deliveries succeed.
    let mut h = shaped(16, "");
    h.host(MX1, Host::Smtp(Server { hold: true, ..Server::default() }));
    for _ in 0..40 {
        h.submit("s@x.test", &["u@a.test"]);
    }
    h.run();
    assert_eq!(h.open(), 2);
    for _ in 0..6 {
        h.complete(MX1);
    }
    assert_eq!(h.open(), 16);
}

/// Mail arriving for a suspended destination adds no wake-up per message: one stays pending,
/// and it still serves the mail when the suspension ends.
#[test]
fn a_parked_destination_keeps_one_pending_wake_up() {
    let mut h = shaped(2, "");
    h.host(MX1, Host::Smtp(Server::default()));
    let now = h.now();
    h.engine.suspend(Scope::Domain("a.test".into()), now.wall_ms + 60_000, "maintenance", true).unwrap();
    for _ in 0..200 {
        h.submit("s@x.test", &["u@a.test"]);
        h.run();
    }
    assert!(h.engine.wake_entries() <= 2, "{}", h.engine.wake_entries());
    sleep_until(&mut h, Duration::from_secs(61));
    assert_eq!(delivered(&h), 200);
}

/// A reload regroups the destinations already known at once (their routes, cached for
/// 5 minutes, are not looked up again): two domains whose MX hosts a new provider's patterns
/// match become one site with the provider's limit, and the connections opened under their
/// old sites end after their transaction.
#[test]
fn a_reload_regroups_known_destinations_at_once() {
    let mut h = shaped(4, "");
    h.mx("b.test", &[("mx2.a.test", 10, MX1)]);
    h.host(MX1, Host::Smtp(Server { hold: true, ..Server::default() }));
    for _ in 0..10 {
        h.submit("s@x.test", &["u@a.test"]);
        h.submit("s@x.test", &["u@b.test"]);
    }
    h.run();
    let (a, b) = (h.dest("a.test"), h.dest("b.test"));
    assert_eq!((h.engine.site_name(a), h.engine.site_name(b)), (Some("mx1.a.test"), Some("mx2.a.test")));
    assert_eq!(h.open(), 4, "two sites, two connections each (the slow start)");
    let file = "[provider.acme]\nmx = [\"*.a.test\"]\nconnection_limit = 1\n";
    let rules = crate::shaping::Rules::load(Some(("shaping.toml", file)), true).unwrap();
    let now = h.now();
    h.engine.set_rules(rules, now);
    // No time passes: not when the routes expire, now.
    assert_eq!((h.engine.site_name(a), h.engine.site_name(b)), (Some("acme"), Some("acme")));
    h.run();
    h.complete(MX1);
    // The four old connections finished their transaction and quit; the new site holds one.
    assert_eq!(h.open(), 1);
    for _ in 0..40 {
        h.complete(MX1);
        assert!(h.open() <= 1, "{}", h.open());
    }
    assert_eq!(delivered(&h), 20);
}

/// Limits are per (egress source, site): with `connection_limit = 1` two sources get a
/// connection each to the same site, and each connection carries only its source's messages
/// (a third message of source `a` waits for `a`'s connection, not for `b`'s).
#[test]
fn connection_limits_are_per_source_and_connections_carry_one_source() {
    use super::sources::{PoolSpec, Source, Sources};
    let src = |n: &str, ip: &str| Source { name: n.into(), ip: ip.parse().unwrap(), ehlo: None };
    let pools = [PoolSpec { name: "default".into(), members: vec![("a".into(), 1)] }];
    let sources = Sources::build(vec![src("a", "198.51.100.1"), src("b", "198.51.100.2")], &pools, &[]).unwrap();
    let mut cfg = config_shaped(1, OutboundTls::None, "[default]\nconnection_limit = 1\n");
    cfg.sources = std::sync::Arc::new(sources);
    let mut h = Harness::new(cfg);
    h.mx("a.test", &[("mx1.a.test", 10, MX1)]);
    h.host(MX1, Host::Smtp(Server { hold: true, ..Server::default() }));
    for source in ["a", "b", "a"] {
        let mut env = crate::message::Envelope::default();
        env.sender.extend_from_slice(b"s@x.test");
        env.push_rcpt(b"u@a.test", b"", 0);
        env.source.extend_from_slice(source.as_bytes());
        h.submit_env(env);
    }
    h.run();
    assert_eq!(h.connects.len(), 2, "one connection per source: {:?}", h.connects);
    assert_eq!(h.engine.connections(), 2);
    // A message naming no source (a bounce, an old record) goes to pool `default`: source a.
    let mut env = crate::message::Envelope::default();
    env.push_rcpt(b"v@a.test", b"", 0);
    h.submit_env(env);
    h.run();
    assert_eq!(h.connects.len(), 2);
    let a = h.engine.queue().find_dests("a.test").to_vec();
    assert_eq!(a.len(), 2, "a destination per source");
    let ready: Vec<usize> = a.iter().map(|&d| h.engine.queue().dest(d).ready.len()).collect();
    assert_eq!(ready, vec![2, 0], "source a's two waiting messages, none of b's");
}

#[test]
fn through_a_relay_host_a_domain_or_provider_suspension_is_refused_naming_the_site_to_use() {
    let mut cfg = config_shaped(4, OutboundTls::May, "");
    cfg.relay_host = Some(("smarthost.test".into(), 587));
    let mut h = Harness::new(cfg);
    for scope in [Scope::Domain("a.test".into()), Scope::Provider("google".into())] {
        let e = h.engine.suspend(scope, u64::MAX, "x", true).unwrap_err();
        assert!(e.contains("--relay-host") && e.contains("smarthost.test") && e.contains("--site"), "{e}");
    }
}
