//! Egress sources and pools over real sockets (SPEC "Egress sources, DKIM, authenticated
//! smarthost"): `--source` addresses 127.0.0.2 and 127.0.0.3 bound before connecting to a
//! `sluice-load sink` (which saves each message with the peer address and EHLO name that
//! brought it), pools by weight, by `X-Sluice-Pool:` header and by AUTH user, the start-up
//! address and FCrDNS checks against a `sluice-load dns` serving PTR records, and shaping limits
//! per (source, site). Loopback only; every test passes `--dns` to a server it started.

use super::delivery::{dns, sink, wait_saved, Aux};
use super::support::*;
use super::tls::{cert_pair, TlsClient};
use std::process::Command;
use std::time::{Duration, Instant};

/// A relay sending everything to `sink`, with a test DNS server for the source checks.
fn relay(sink: &Aux, dns: &Aux, extra: &[&str]) -> Relay {
    let (to, server) = (sink.addr.to_string(), dns.addr.to_string());
    let mut args = vec!["--relay-host", &to, "--dns", &server];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// `(PEER, EHLO)` of each saved message, from the sink's envelope files.
fn peers(saved: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    let field = |env: &str, name: &str| {
        env.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("no {name} in {env}")).to_string()
    };
    saved.iter().map(|(env, _)| (field(env, "PEER: "), field(env, "EHLO: "))).collect()
}

/// One session sending `n` messages with `headers` first; returns the replies to the data.
fn send_many(relay: &Relay, n: usize, headers: &str) -> Vec<String> {
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    (0..n)
        .map(|i| {
            let body = format!("{headers}Subject: m{i}\r\n\r\nbody {i}\r\n");
            c.send_message("a@src.test", &["x@dst.test"], body.as_bytes())
        })
        .collect()
}

const TWO_SOURCES: [&str; 4] = ["--source", "ip2=127.0.0.2,ehlo=out2.test", "--source", "ip3=127.0.0.3,ehlo=out3.test"];

#[test]
fn messages_leave_from_their_source_by_weight_with_its_ehlo_name() {
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let d = dns(&bin, &[]);
    let mut flags = TWO_SOURCES.to_vec();
    flags.extend(["--pool", "default=ip2:3,ip3:1"]);
    let relay = relay(&sink, &d, &flags);
    let n = 40;
    let replies = send_many(&relay, n, "");
    assert!(replies.iter().all(|r| r.starts_with("250 ")), "{replies:?}");
    let ids: Vec<String> = replies.iter().map(|r| queue_id(r)).collect();
    let saved = wait_saved(&sink, n, Duration::from_secs(30), &relay);
    let got = peers(&saved);
    let from2 = got.iter().filter(|(p, _)| p == "127.0.0.2").count();
    let from3 = got.iter().filter(|(p, _)| p == "127.0.0.3").count();
    assert_eq!(from2 + from3, n, "{got:?}");
    // 3:1 of 40 is 30:10; a choice by weight stays well inside these bounds.
    assert!((22..=37).contains(&from2), "split {from2}:{from3}");
    // Each address says its own EHLO name.
    for (peer, ehlo) in &got {
        let want = if peer == "127.0.0.2" { "out2.test" } else { "out3.test" };
        assert_eq!(ehlo, want, "{got:?}");
    }
    // Attempt lines name the source. The sink saves a message before it answers, so the
    // relay's last delivery lines may still be on their way.
    let t0 = Instant::now();
    let lines = loop {
        let lines: Vec<_> = relay.log().lines().filter(|l| l.contains("event=delivery")).map(str::to_owned).collect();
        if lines.len() >= n || t0.elapsed() > Duration::from_secs(20) {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lines.len(), n);
    assert!(lines.iter().all(|l| l.contains("source=ip2") || l.contains("source=ip3")), "{lines:?}");
    // And each message left from the source its line names (a connection carries only
    // messages of its own source).
    for ((peer, _), (_, msg)) in got.iter().zip(&saved) {
        let text = String::from_utf8_lossy(msg);
        let id = ids.iter().find(|id| text.contains(id.as_str())).expect("a queue id in the Received header");
        let line = lines.iter().find(|l| l.contains(&format!("id={id} "))).expect("its delivery line");
        let want = if peer == "127.0.0.2" { "source=ip2" } else { "source=ip3" };
        assert!(line.contains(want), "{peer}: {line}");
    }
}

#[test]
fn the_pool_header_routes_is_removed_and_an_unknown_pool_is_refused() {
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let d = dns(&bin, &[]);
    let mut flags = TWO_SOURCES.to_vec();
    flags.extend(["--pool", "two=ip2", "--pool", "three=ip3"]);
    let relay = relay(&sink, &d, &flags);
    for r in send_many(&relay, 6, "X-Sluice-Pool: three\r\n") {
        assert!(r.starts_with("250 "), "{r}");
    }
    // Folded and in another case: still the header.
    for r in send_many(&relay, 2, "x-sluice-pool:\r\n two\r\n") {
        assert!(r.starts_with("250 "), "{r}");
    }
    let r = send_many(&relay, 1, "X-Sluice-Pool: nosuch\r\n").remove(0);
    assert!(r.starts_with("550 5.7.1") && r.contains("nosuch"), "{r}");
    let saved = wait_saved(&sink, 8, Duration::from_secs(30), &relay);
    let got = peers(&saved);
    let from3 = got.iter().filter(|(p, _)| p == "127.0.0.3").count();
    assert_eq!(from3, 6, "{got:?}");
    for (_, msg) in &saved {
        let text = String::from_utf8_lossy(msg).to_ascii_lowercase();
        assert!(!text.contains("x-sluice-pool"), "the pool header was delivered: {text}");
        assert!(text.contains("subject: m"), "{text}");
    }
    // The refused message was never stored.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(super::delivery::saved(&sink).len(), 8);
    assert!(relay.log().contains("Unknown egress pool"), "{}", relay.log());
}

#[test]
fn an_authenticated_user_gets_its_pool() {
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let d = dns(&bin, &[]);
    let dir = TempDir::new("user-pool");
    let (cert, key) = cert_pair(dir.path(), "s");
    let users = dir.path().join("users");
    let hash = sluice::smtp::auth::hash_password(b"secret").unwrap();
    std::fs::write(&users, format!("alice:{hash}\nbob:{hash}\n")).unwrap();
    let (cert, key, users) = (cert.display().to_string(), key.display().to_string(), users.display().to_string());
    let mut flags = TWO_SOURCES.to_vec();
    flags.extend(["--pool", "default=ip2", "--pool", "alices=ip3", "--user-pool", "alice=alices"]);
    flags.extend(["--tls-cert", &cert, "--tls-key", &key, "--auth-file", &users, "--allow", "192.0.2.0/24"]);
    let relay = relay(&sink, &d, &flags);
    for (user, n) in [("alice", 3), ("bob", 2)] {
        let mut c = Client::connect(relay.addr);
        c.expect("220");
        c.expect_ok("EHLO c.test", "250");
        c.expect_ok("STARTTLS", "220");
        let mut t = TlsClient::handshake(c.stream).unwrap();
        assert!(t.cmd("EHLO c.test").starts_with("250"));
        let creds = base64_plain(user, "secret");
        let r = t.cmd(&format!("AUTH PLAIN {creds}"));
        assert!(r.starts_with("235"), "{r}");
        for i in 0..n {
            assert!(t.cmd("MAIL FROM:<a@src.test>").starts_with("250"));
            assert!(t.cmd("RCPT TO:<x@dst.test>").starts_with("250"));
            assert!(t.cmd("DATA").starts_with("354"));
            let r = t.cmd(&format!("Subject: {user} {i}\r\n\r\nhi\r\n."));
            assert!(r.starts_with("250 "), "{r}");
        }
    }
    let saved = wait_saved(&sink, 5, Duration::from_secs(30), &relay);
    for ((peer, _), (_, msg)) in peers(&saved).iter().zip(&saved) {
        let text = String::from_utf8_lossy(msg);
        let want = if text.contains("Subject: alice") { "127.0.0.3" } else { "127.0.0.2" };
        assert_eq!(peer, want, "{text}");
    }
}

fn base64_plain(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
}

/// `sluice serve` with `args` until it exits (bounded): (status, stderr).
fn serve_exit(args: &[&str]) -> (i32, String) {
    let dir = TempDir::new("src-cli");
    let mut child = Command::new(sluice_bin())
        .arg("serve")
        .arg("--spool")
        .arg(dir.path().join("s"))
        .args(["--listen", "127.0.0.1:0", "--hold"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("sluice serve {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_source_flags_exit_2_and_an_address_not_of_this_host_exits_1() {
    let Some(bin) = load_bin() else { return };
    let d = dns(&bin, &[]);
    let server = d.addr.to_string();
    let s2 = "ip2=127.0.0.2";
    for (args, flag, value) in [
        (vec!["--source", "ip2=300.0.0.1"], "--source", "300.0.0.1"),
        (vec!["--source", s2, "--source", "ip2=127.0.0.3"], "--source", "ip2"),
        (vec!["--source", s2, "--pool", "p=nosuch"], "--pool", "nosuch"),
        (vec!["--source", s2, "--pool", "p=ip2:0"], "--pool", "ip2:0"),
        (vec!["--source", s2, "--pool", "p=ip2:x"], "--pool", "ip2:x"),
        (vec!["--source", s2, "--pool", "p=ip2", "--pool", "p=ip2"], "--pool", "p"),
        (vec!["--source", s2, "--pool", "p=ip2", "--user-pool", "alice=q"], "--user-pool", "q"),
    ] {
        let mut all = args.clone();
        all.extend(["--dns", &server]);
        let (code, err) = serve_exit(&all);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(flag) && err.contains(value), "{args:?}: {err}");
    }
    // 192.0.2.1 (TEST-NET-1) is not assigned here: binding it fails, nothing is sent.
    let (code, err) = serve_exit(&["--source", "far=192.0.2.1", "--dns", &server]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("far") && err.contains("192.0.2.1"), "{err}");
}

#[test]
fn fcrdns_is_checked_at_start_and_required_on_demand() {
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    // ip2's PTR name resolves back to it; ip3's name has no address.
    let d = dns(&bin, &["--ptr", "127.0.0.2=out2.test", "--a", "out2.test=127.0.0.2", "--ptr", "127.0.0.3=out3.test"]);
    let first = relay(&sink, &d, &TWO_SOURCES);
    first.wait_log("event=source_check source=ip3");
    let log = first.log();
    assert!(log.contains("event=source_check source=ip2 ip=127.0.0.2 ptr=out2.test ehlo=out2.test ok=true"), "{log}");
    assert!(log.contains("event=source_check source=ip3 ip=127.0.0.3 ptr=out3.test ehlo=out3.test ok=false"), "{log}");
    drop(first);
    // Required: the mismatch stops the start, naming the source.
    let mut args = TWO_SOURCES.to_vec();
    let server = d.addr.to_string();
    args.extend(["--require-fcrdns", "--dns", &server]);
    let (code, err) = serve_exit(&args);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ip3") && err.contains("fcrdns"), "{err}");
    // Both confirmed (ip3's PTR name pointing back to it): it starts.
    let d3 = dns(
        &bin,
        &[
            "--ptr",
            "127.0.0.2=out2.test",
            "--a",
            "out2.test=127.0.0.2",
            "--ptr",
            "127.0.0.3=o3.test",
            "--a",
            "o3.test=127.0.0.3",
        ],
    );
    let mut args = TWO_SOURCES.to_vec();
    args.push("--require-fcrdns");
    let ok = relay(&sink, &d3, &args);
    ok.wait_log("event=source_check source=ip3 ip=127.0.0.3 ptr=o3.test");
    assert!(ok.log().contains("source=ip3") && ok.log().contains("warning"), "EHLO out3.test is not o3.test");
}

#[test]
fn shaping_limits_are_per_source_and_site() {
    // One connection at a time to the site, each end of data answered 3 s late by the sink
    // (which saves the message first): two sources deliver their message at the same time
    // over a connection each; one limit for the site would open the second connection only
    // when the first is done, 3 s or more later.
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &["--delay", "3s"]);
    let d = dns(&bin, &[]);
    let dir = TempDir::new("src-shaping");
    let file = dir.path().join("shaping.toml");
    std::fs::write(&file, "[default]\nconnection_limit = 1\n").unwrap();
    let file = file.display().to_string();
    let mut flags = TWO_SOURCES.to_vec();
    flags.extend(["--pool", "two=ip2", "--pool", "three=ip3", "--shaping", &file]);
    let relay = relay(&sink, &d, &flags);
    let t0 = Instant::now();
    for pool in ["two", "three"] {
        let r = send_many(&relay, 1, &format!("X-Sluice-Pool: {pool}\r\n")).remove(0);
        assert!(r.starts_with("250 "), "{r}");
    }
    let saved = wait_saved(&sink, 2, Duration::from_secs(20), &relay);
    let took = t0.elapsed();
    let got = peers(&saved);
    assert!(got.iter().any(|(p, _)| p == "127.0.0.2") && got.iter().any(|(p, _)| p == "127.0.0.3"), "{got:?}");
    assert!(took < Duration::from_millis(2000), "delivered one after the other ({took:?}): one limit for both sources");
}

#[test]
fn the_chosen_source_is_stored_and_kept_across_a_restart() {
    // Accepted while held, the relay killed, started again with another default pool: the
    // message leaves from the source chosen at reception (ip3). A source that is gone at the
    // restart is chosen afresh (the default pool: ip2).
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let d = dns(&bin, &[]);
    let mut flags = TWO_SOURCES.to_vec();
    flags.extend(["--pool", "three=ip3", "--pool", "default=ip3", "--hold"]);
    let mut first = relay(&sink, &d, &flags);
    let r = send_many(&first, 2, "X-Sluice-Pool: three\r\n");
    assert!(r.iter().all(|r| r.starts_with("250 ")), "{r:?}");
    let dir = first.take_dir();
    first.kill9();
    let spool = first.spool.clone();
    let start = |extra: &[&str]| {
        let (to, server) = (sink.addr.to_string(), d.addr.to_string());
        let mut args = vec!["--relay-host", to.as_str(), "--dns", server.as_str()];
        args.extend_from_slice(extra);
        Relay::start_on(&spool, &args)
    };
    let mut flags = TWO_SOURCES.to_vec();
    flags.extend(["--pool", "default=ip2"]);
    let second = start(&flags);
    let saved = wait_saved(&sink, 2, Duration::from_secs(30), &second);
    assert!(peers(&saved).iter().all(|(p, e)| p == "127.0.0.3" && e == "out3.test"), "{:?}", peers(&saved));
    drop(second);
    // Gone: ip3 is no longer configured.
    let mut held = relay(&sink, &d, &["--source", "ip3=127.0.0.3", "--hold"]);
    let r = send_many(&held, 1, "");
    assert!(r[0].starts_with("250 "), "{r:?}");
    let dir2 = held.take_dir();
    held.kill9();
    let spool = held.spool.clone();
    let (to, server) = (sink.addr.to_string(), d.addr.to_string());
    let third = Relay::start_on(&spool, &["--relay-host", &to, "--dns", &server, "--source", "ip2=127.0.0.2"]);
    let saved = wait_saved(&sink, 3, Duration::from_secs(30), &third);
    assert_eq!(peers(&saved)[2].0, "127.0.0.2", "{:?}", peers(&saved));
    drop((dir, dir2));
}

#[test]
fn a_source_is_only_tried_at_addresses_of_its_family() {
    // Source 127.0.0.2 (IPv4). mixed.test's better exchanger has only ::1, the other both ::1
    // and 127.0.0.1; both.test's one exchanger has both; six.test's only ::1. The sink
    // listens on 127.0.0.1 only. From an IPv4 source nothing may be tried at ::1 (a bound
    // IPv4 socket cannot connect there): both messages go to the sink with no failed
    // connection, and six.test's recipient is deferred saying why.
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let d = dns(
        &bin,
        &[
            "--mx",
            "mixed.test=10:mx6.mixed.test",
            "--a",
            "mx6.mixed.test=::1",
            "--mx",
            "mixed.test=20:mx46.mixed.test",
            "--a",
            "mx46.mixed.test=::1",
            "--a",
            "mx46.mixed.test=127.0.0.1",
            "--mx",
            "both.test=10:mx.both.test",
            "--a",
            "mx.both.test=::1",
            "--a",
            "mx.both.test=127.0.0.1",
            "--mx",
            "six.test=10:mx.six.test",
            "--a",
            "mx.six.test=::1",
        ],
    );
    let (server, port) = (d.addr.to_string(), sink.addr.port().to_string());
    let relay = Relay::start(&["--dns", &server, "--smtp-port", &port, "--source", "ip2=127.0.0.2"]);
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    for (i, rcpt) in ["u@mixed.test", "u@both.test", "u@six.test"].iter().enumerate() {
        let r = c.send_message("a@src.test", &[rcpt], format!("Subject: fam{i}\r\n\r\nbody\r\n").as_bytes());
        assert!(r.starts_with("250 "), "{r}");
    }
    let saved = wait_saved(&sink, 2, Duration::from_secs(30), &relay);
    assert!(peers(&saved).iter().all(|(p, _)| p == "127.0.0.2"), "{:?}", peers(&saved));
    relay.wait_log("rcpt=u@six.test");
    relay.wait_log("event=no_route");
    let log = relay.log();
    let line = log.lines().find(|l| l.contains("rcpt=u@six.test")).unwrap();
    assert!(
        line.contains("outcome=deferred") && line.contains("4.4.4") && line.contains("no IPv4 address for source ip2"),
        "{line}"
    );
    let no_route = log.lines().find(|l| l.contains("event=no_route")).unwrap();
    assert!(no_route.contains("domain=six.test") && no_route.contains("source=ip2"), "{no_route}");
    assert!(!log.contains("event=connect_error") && !log.contains("[::1]"), "{log}");
}

#[test]
fn fcrdns_asks_again_over_tcp_when_the_udp_answer_is_truncated() {
    // The test DNS truncates every UDP answer: the start-up check must ask over TCP (RFC
    // 7766) to confirm the source, or --require-fcrdns would stop the start.
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let d = dns(&bin, &["--truncate-udp", "--ptr", "127.0.0.2=out2.test", "--a", "out2.test=127.0.0.2"]);
    let relay = relay(&sink, &d, &["--source", "ip2=127.0.0.2,ehlo=out2.test", "--require-fcrdns"]);
    relay.wait_log("event=source_check source=ip2");
    let log = relay.log();
    assert!(log.contains("event=source_check source=ip2 ip=127.0.0.2 ptr=out2.test ehlo=out2.test ok=true"), "{log}");
    let r = send_many(&relay, 1, "");
    assert!(r[0].starts_with("250 "), "{r:?}");
    let saved = wait_saved(&sink, 1, Duration::from_secs(30), &relay);
    assert_eq!(peers(&saved), [("127.0.0.2".to_string(), "out2.test".to_string())]);
}
