//! Delivery over real sockets: the relay routes by `--relay-host` or by MX records from a test
//! DNS server (`sluice-load dns`) to test MX hosts (`sluice-load sink`) on 127.0.0.x, retries
//! temporary failures and bounces permanent ones with RFC 3464 DSNs. Loopback only; every test
//! passes `--dns` to its own server.

use super::support::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child `sluice-load` process (sink or dns), killed on drop.
pub struct Aux {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    _dir: Option<TempDir>,
    save: Option<PathBuf>,
}

impl Drop for Aux {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_aux(bin: &Path, args: &[String]) -> (Child, std::net::SocketAddr) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice-load");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(a) = line.split(" addr=").nth(1).filter(|_| line.contains("event=listening")) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).expect("sluice-load did not start").parse().unwrap();
    (child, addr)
}

/// A sink on `ip:port` saving what it accepts.
pub fn sink(bin: &Path, listen: &str, extra: &[&str]) -> Aux {
    let dir = TempDir::new("sink");
    let save = dir.path().join("saved");
    let mut args: Vec<String> = vec!["sink".into(), "--listen".into(), listen.into(), "--interval".into(), "0".into()];
    args.push("--save".into());
    args.push(save.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let (child, addr) = spawn_aux(bin, &args);
    Aux { child, addr, _dir: Some(dir), save: Some(save) }
}

pub fn dns(bin: &Path, zone: &[&str]) -> Aux {
    dns_on(bin, "127.0.0.1:0", zone)
}

/// A test DNS server on `listen` (port 53 for resolvers that take no port).
pub fn dns_on(bin: &Path, listen: &str, zone: &[&str]) -> Aux {
    let mut args: Vec<String> = vec!["dns".into(), "--listen".into(), listen.into(), "--ttl".into(), "60".into()];
    args.extend(zone.iter().map(|s| s.to_string()));
    let (child, addr) = spawn_aux(bin, &args);
    Aux { child, addr, _dir: None, save: None }
}

/// Saved messages of a sink: (envelope text, message bytes), in arrival order.
pub fn saved(sink: &Aux) -> Vec<(String, Vec<u8>)> {
    let Some(dir) = &sink.save else { return Vec::new() };
    let mut names: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    names.retain(|p| p.extension().is_some_and(|e| e == "msg"));
    names.sort();
    names
        .into_iter()
        .map(|m| (std::fs::read_to_string(m.with_extension("env")).unwrap_or_default(), std::fs::read(&m).unwrap()))
        .collect()
}

pub fn wait_saved(sink: &Aux, n: usize, within: Duration, relay: &Relay) -> Vec<(String, Vec<u8>)> {
    let t0 = Instant::now();
    loop {
        let s = saved(sink);
        if s.len() >= n {
            return s;
        }
        assert!(t0.elapsed() < within, "sink got {} of {n} messages; relay log:\n{}", s.len(), relay.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until `sluice queue stats` shows nothing queued.
pub fn wait_queue_empty(relay: &Relay, within: Duration) {
    let t0 = Instant::now();
    loop {
        let (_, out, _) = queue_cmd(&relay.spool, &["stats", "--json"]);
        if out.contains("\"messages\":0") {
            return;
        }
        assert!(t0.elapsed() < within, "queue never emptied: {out}\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A port free on 127.0.0.1 (the sinks then listen on 127.0.0.x with that port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn send(relay: &Relay, from: &str, to: &[&str], body: &[u8]) -> String {
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let r = c.send_message(from, to, body);
    assert!(r.starts_with("250 "), "{r}");
    queue_id(&r)
}

/// `sluice queue flush` (SIGUSR1 to the relay holding the spool's lock): a recipient deferred
/// for an hour, to a destination the relay holds for down, is tried again at once.
#[test]
fn queue_flush_retries_deferred_mail_at_once() {
    let Some(bin) = load_bin() else { return };
    let target = format!("127.0.0.1:{}", free_port());
    let relay = Relay::start(&["--relay-host", &target, "--dns", "127.0.0.1:9", "--retry-schedule", "1h"]);
    let id = send(&relay, "a@src.test", &["x@dst.test"], b"Subject: flush\r\n\r\nbody\r\n");
    relay.wait_log("event=destination_down");
    let sink = sink(&bin, &target, &[]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(saved(&sink).is_empty(), "delivered before the flush: the next try was due in 30 s");
    let (code, out, err) = queue_cmd(&relay.spool, &["flush"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("flush requested"), "{out}");
    relay.wait_log("event=flush");
    relay.wait_log("outcome=delivered");
    let got = saved(&sink);
    assert_eq!(got.len(), 1, "{}", relay.log());
    assert!(got[0].1.ends_with(b"body\r\n"), "{:?}", String::from_utf8_lossy(&got[0].1));
    let log = relay.log();
    assert!(log.lines().any(|l| l.contains(&format!("id={id}")) && l.contains("outcome=delivered")), "{log}");
    // No relay on a spool: a clear error, nothing signalled.
    let idle = TempDir::new("noflush");
    let (code, _, err) = queue_cmd(idle.path(), &["flush"]);
    assert_eq!(code, 1);
    assert!(err.contains("no relay is running"), "{err}");
}

#[test]
fn relay_host_delivers_byte_exact_and_the_queue_empties() {
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let relay = Relay::start(&["--relay-host", &sink.addr.to_string(), "--dns", "127.0.0.1:9"]);
    let body = "Subject: exact\r\n\r\n.leading dot\r\n..two dots\r\n8-bit: \u{e9}\u{e8}\r\n.\r\n".as_bytes();
    let mut stuffed = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(line);
    }
    let id = send(&relay, "a@src.test", &["x@dst.test", "y@dst.test"], &stuffed);
    let got = wait_saved(&sink, 1, Duration::from_secs(20), &relay);
    let (env, msg) = &got[0];
    assert!(env.contains("a@src.test") && env.contains("x@dst.test") && env.contains("y@dst.test"), "{env}");
    assert!(msg.starts_with(b"Received: from c.test"), "{}", String::from_utf8_lossy(msg));
    assert!(msg.ends_with(body), "delivered bytes differ:\n{}", String::from_utf8_lossy(msg));
    assert!(String::from_utf8_lossy(msg).contains(&id));
    relay.wait_log("outcome=delivered");
    wait_queue_empty(&relay, Duration::from_secs(10));
}

#[test]
fn mx_preference_fallback_and_implicit_mx() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    // mx1 (preference 10) is down; mx2 (20) answers. implicit.test has no MX, only an A record.
    let mx2 = sink(&bin, &format!("127.0.0.4:{port}"), &[]);
    let implicit = sink(&bin, &format!("127.0.0.5:{port}"), &[]);
    let d = dns(
        &bin,
        &[
            "--mx",
            "multi.test=10:mx1.multi.test",
            "--mx",
            "multi.test=20:mx2.multi.test",
            "--a",
            "mx1.multi.test=127.0.0.3",
            "--a",
            "mx2.multi.test=127.0.0.4",
            "--a",
            "implicit.test=127.0.0.5",
        ],
    );
    let relay = Relay::start(&["--dns", &d.addr.to_string(), "--smtp-port", &port.to_string()]);
    // Several messages at once: every connection to mx1 fails, each failure must count once,
    // and all of them must go to mx2 (not be deferred as if every MX were down).
    for _ in 0..6 {
        send(&relay, "a@src.test", &["u@multi.test"], b"Subject: mx\r\n\r\nvia mx2\r\n");
    }
    send(&relay, "a@src.test", &["v@implicit.test"], b"Subject: implicit\r\n\r\nvia A\r\n");
    let got = wait_saved(&mx2, 6, Duration::from_secs(20), &relay);
    assert!(got.iter().all(|(_, m)| m.ends_with(b"via mx2\r\n")));
    let got = wait_saved(&implicit, 1, Duration::from_secs(20), &relay);
    assert!(got[0].1.ends_with(b"via A\r\n"));
    relay.wait_log("remote=mx2.multi.test[127.0.0.4]");
}

#[test]
fn permanent_failures_bounce_with_a_dsn_and_temporary_ones_retry() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    let dst = sink(&bin, &format!("127.0.0.6:{port}"), &[]);
    let src = sink(&bin, &format!("127.0.0.7:{port}"), &[]);
    let d = dns(&bin, &["--zone", "dst.test=127.0.0.6", "--zone", "src.test=127.0.0.7", "--nullmx", "nullmx.test"]);
    let relay =
        Relay::start(&["--dns", &d.addr.to_string(), "--smtp-port", &port.to_string(), "--retry-schedule", "1s,1s,2s"]);
    // One transaction, mixed outcomes: ok, rejected (550 5.1.1), and 451 once then accepted.
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    c.expect_ok("MAIL FROM:<sender@src.test> ENVID=env+2D42 RET=HDRS", "250");
    c.expect_ok("RCPT TO:<ok@dst.test>", "250");
    c.expect_ok("RCPT TO:<rej-gone@dst.test> NOTIFY=FAILURE ORCPT=rfc822;rej-gone@dst.test", "250");
    c.expect_ok("RCPT TO:<tf1-later@dst.test>", "250");
    c.expect_ok("RCPT TO:<nobody@nullmx.test>", "250");
    c.expect_ok("DATA", "354");
    c.send(b"Subject: mixed\r\nMessage-ID: <mixed@src.test>\r\n\r\nbody\r\n.\r\n");
    let id = queue_id(&c.expect("250 2.0.0 Ok: queued as"));
    // ok@ and (after one retry) tf1-later@ arrive at dst.
    let got = wait_saved(&dst, 2, Duration::from_secs(30), &relay);
    let rcpts: String = got.iter().map(|(e, _)| e.clone()).collect();
    assert!(rcpts.contains("ok@dst.test") && rcpts.contains("tf1-later@dst.test"), "{rcpts}");
    assert!(!rcpts.contains("rej-gone@dst.test"));
    relay.wait_log("attempt=2 outcome=delivered");
    // Bounces for rej-gone@ (5.1.1) and nobody@nullmx.test (5.1.10) reach the sender's MX.
    let bounces = wait_saved(&src, 1, Duration::from_secs(30), &relay);
    let all: String = bounces.iter().map(|(e, m)| format!("{e}\n{}", String::from_utf8_lossy(m))).collect();
    assert!(all.contains("MAIL FROM:<>"), "bounces come from the null sender: {all}");
    assert!(all.contains("sender@src.test"), "{all}");
    assert!(all.contains("Content-Type: multipart/report; report-type=delivery-status"), "{all}");
    assert!(all.contains("Reporting-MTA: dns; mx.test"), "{all}");
    assert!(all.contains("Original-Envelope-Id: env-42"), "ENVID is xtext-decoded: {all}");
    assert!(all.contains("Final-Recipient: rfc822; rej-gone@dst.test"), "{all}");
    assert!(all.contains("Original-Recipient: rfc822; rej-gone@dst.test"), "{all}");
    assert!(all.contains("Action: failed"), "{all}");
    assert!(all.contains("Status: 5.1.1"), "{all}");
    assert!(all.contains("Diagnostic-Code: smtp; 550 5.1.1"), "{all}");
    assert!(all.contains("Status: 5.1.10") || all.contains("5.1.10"), "null MX bounces with 5.1.10: {all}");
    assert!(all.contains("Message-ID: <mixed@src.test>"), "RET=HDRS returns the headers: {all}");
    assert!(all.contains(&id));
    // The bounce itself (null sender) never bounces: the queue drains.
    wait_queue_empty(&relay, Duration::from_secs(20));
}

#[test]
fn a_refusal_received_before_the_connection_drops_still_stands() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    // The destination refuses rej-*@ at RCPT, then closes in the middle of every DATA.
    let dst = sink(&bin, &format!("127.0.0.6:{port}"), &["--drop-rate", "1"]);
    let src = sink(&bin, &format!("127.0.0.7:{port}"), &[]);
    let d = dns(&bin, &["--zone", "dst.test=127.0.0.6", "--zone", "src.test=127.0.0.7"]);
    let relay = Relay::start(&["--dns", &d.addr.to_string(), "--smtp-port", &port.to_string()]);
    let id = send(&relay, "sender@src.test", &["rej-gone@dst.test", "ok@dst.test"], b"Subject: drop\r\n\r\nx\r\n");
    // The 550 to RCPT fails rej-gone@ at once, with its own reply; ok@ was accepted and only
    // the data was lost with the connection: deferred.
    relay.wait_log("rcpt=rej-gone@dst.test");
    relay.wait_log("rcpt=ok@dst.test");
    let log = relay.log();
    let line = |rcpt: &str| {
        log.lines().find(|l| l.contains("event=delivery") && l.contains(rcpt)).unwrap_or_default().to_string()
    };
    let rej = line("rcpt=rej-gone@dst.test");
    assert!(rej.contains("outcome=failed") && rej.contains("550 5.1.1") && rej.contains(&id), "{log}");
    let ok = line("rcpt=ok@dst.test");
    assert!(ok.contains("outcome=deferred") && ok.contains("lost connection"), "{log}");
    let bounces = wait_saved(&src, 1, Duration::from_secs(30), &relay);
    let all: String = bounces.iter().map(|(_, m)| String::from_utf8_lossy(m).into_owned()).collect();
    assert!(all.contains("Final-Recipient: rfc822; rej-gone@dst.test") && all.contains("Status: 5.1.1"), "{all}");
    assert!(!all.contains("Final-Recipient: rfc822; ok@dst.test"), "{all}");
    assert!(saved(&dst).is_empty());
}

#[test]
fn mail_exchangers_that_are_the_relay_itself_are_never_used() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let src = sink(&bin, &format!("127.0.0.7:{port}"), &[]);
    let after = sink(&bin, &format!("127.0.0.8:{port}"), &[]);
    #[rustfmt::skip]
    let d = dns(&bin, &[
        "--zone", "src.test=127.0.0.7",
        // loop.test's best MX is this relay's own listening address.
        "--mx", "loop.test=10:mx.loop.test", "--a", "mx.loop.test=127.0.0.1",
        // named.test: a dead MX, then this relay by its host name (mx.test), then a working one
        // that must not be used because it is worse than us.
        "--mx", "named.test=10:dead.named.test", "--a", "dead.named.test=127.0.0.9",
        "--mx", "named.test=20:mx.test", "--a", "mx.test=127.0.0.5",
        "--mx", "named.test=30:after.named.test", "--a", "after.named.test=127.0.0.8",
    ]);
    let relay = Relay::start(&["--listen", &listen, "--dns", &d.addr.to_string(), "--smtp-port", &port.to_string()]);
    let id = send(&relay, "sender@src.test", &["a@loop.test"], b"Subject: loop\r\n\r\nx\r\n");
    send(&relay, "sender@src.test", &["b@named.test"], b"Subject: named\r\n\r\ny\r\n");
    // loop.test bounces at once with 5.4.6, like Postfix's "loops back to myself".
    let bounces = wait_saved(&src, 1, Duration::from_secs(30), &relay);
    let all: String = bounces.iter().map(|(_, m)| String::from_utf8_lossy(m).into_owned()).collect();
    assert!(all.contains("Final-Recipient: rfc822; a@loop.test") && all.contains("Status: 5.4.6"), "{all}");
    assert!(all.contains("loops back to myself") && all.contains(&id), "{all}");
    // named.test: only the dead MX is better than us, so the message waits for it.
    relay.wait_log("event=destination_down domain=named.test");
    let log = relay.log();
    let line = log.lines().find(|l| l.contains("event=destination_down domain=named.test")).unwrap_or_default();
    assert!(line.contains("127.0.0.9"), "{log}");
    assert!(saved(&after).is_empty(), "a worse MX than us got the message:\n{log}");
}

#[test]
fn postmaster_without_a_domain_goes_to_our_own_domain() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    let ours = sink(&bin, &format!("127.0.0.6:{port}"), &[]);
    // The relay's host name is mx.test: its mail exchanger takes mail for our postmaster.
    let d = dns(&bin, &["--zone", "mx.test=127.0.0.6"]);
    let relay = Relay::start(&["--dns", &d.addr.to_string(), "--smtp-port", &port.to_string()]);
    send(&relay, "someone@else.test", &["PostMaster"], b"Subject: hello postmaster\r\n\r\nhi\r\n");
    let got = wait_saved(&ours, 1, Duration::from_secs(30), &relay);
    assert!(got[0].0.contains("RCPT TO:<PostMaster>"), "{}", got[0].0);
    assert!(String::from_utf8_lossy(&got[0].1).contains("Subject: hello postmaster"));
}

#[test]
fn connections_are_reused_and_a_down_destination_is_retried() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    let d = dns(&bin, &["--zone", "reuse.test=127.0.0.8"]);
    let relay = Relay::start(&[
        "--dns",
        &d.addr.to_string(),
        "--smtp-port",
        &port.to_string(),
        "--retry-schedule",
        "1s",
        "--domain-concurrency",
        "2",
    ]);
    // The destination is down at first: the messages wait, parked.
    for i in 0..20 {
        send(&relay, "a@src.test", &["r@reuse.test"], format!("Subject: {i}\r\n\r\nreuse\r\n").as_bytes());
    }
    relay.wait_log("event=destination_down domain=reuse.test");
    // Then it comes up: everything arrives, over at most a few connections.
    let up = sink(&bin, &format!("127.0.0.8:{port}"), &["--json"]);
    let got = wait_saved(&up, 20, Duration::from_secs(30), &relay);
    assert_eq!(got.len(), 20);
    let mut up = up;
    let _ = Command::new("kill").arg("-TERM").arg(up.child.id().to_string()).status();
    let out = std::mem::replace(&mut up.child, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    let conns: u64 = summary
        .split("\"connections\":")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary: {summary}"));
    assert!(conns <= 4, "20 messages took {conns} connections: no reuse");
}

#[test]
fn ten_mib_message_arrives_byte_exact() {
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let relay = Relay::start(&["--relay-host", &sink.addr.to_string(), "--dns", "127.0.0.1:9"]);
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u32;
    while body.len() < 10 << 20 {
        // Every seventh line starts with a dot (stuffed on the wire, twice over the relay).
        if i.is_multiple_of(7) {
            body.extend_from_slice(b".");
        }
        body.extend_from_slice(format!("line {i:08} {}\r\n", "x".repeat(60)).as_bytes());
        i += 1;
    }
    let mut stuffed = Vec::with_capacity(body.len() + body.len() / 50);
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(line);
    }
    send(&relay, "a@src.test", &["big@dst.test"], &stuffed);
    let got = wait_saved(&sink, 1, Duration::from_secs(60), &relay);
    assert!(got[0].1.ends_with(&body), "10 MiB body differs after relaying");
}

/// Dot-stuffs `body` for DATA (RFC 5321 §4.5.2).
fn stuff(body: &[u8]) -> Vec<u8> {
    let mut stuffed = Vec::with_capacity(body.len() + body.len() / 50);
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(line);
    }
    stuffed
}

#[test]
fn chunking_destinations_get_bdat_byte_exact_and_others_data() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    // Both sinks save; only the first offers CHUNKING. Each saved envelope says how the message
    // came (`TRANSFER: BDAT|DATA`).
    let chunk = sink(&bin, &format!("127.0.0.21:{port}"), &[]);
    let plain = sink(&bin, &format!("127.0.0.22:{port}"), &["--no-chunking"]);
    let d = dns(&bin, &["--zone", "chunk.test=127.0.0.21", "--zone", "plain.test=127.0.0.22"]);
    let relay = Relay::start(&["--dns", &d.addr.to_string(), "--smtp-port", &port.to_string()]);
    // Lines that are a lone dot or start with one, i.e. "CRLF . CRLF" inside the message: by
    // BDAT they must go raw (a stuffed dot would stay in the message), by DATA stuffed.
    let dots = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmid\r\n.\r\n\r\n.\r\n.\r\nend\r\n".to_vec();
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u32;
    while big.len() < 3 << 20 {
        big.extend_from_slice(if i.is_multiple_of(5) { b".\r\n" } else { b"" });
        big.extend_from_slice(format!(".line {i:08} {}\r\n", "y".repeat(50)).as_bytes());
        i += 1;
    }
    for body in [&dots, &big] {
        send(&relay, "a@src.test", &["x@chunk.test", "y@chunk.test", "z@plain.test"], &stuff(body));
    }
    // Every recipient refused (the chunk is read and discarded, then RSET), and one of two.
    send(&relay, "a@src.test", &["rej-1@chunk.test", "rej-2@chunk.test"], b"Subject: none\r\n\r\nno\r\n");
    send(&relay, "a@src.test", &["rej-3@chunk.test", "w@chunk.test"], b"Subject: half\r\n\r\nhalf\r\n");
    let got = wait_saved(&chunk, 3, Duration::from_secs(60), &relay);
    let by_plain = wait_saved(&plain, 2, Duration::from_secs(60), &relay);
    wait_queue_empty(&relay, Duration::from_secs(30));
    assert_eq!((saved(&chunk).len(), saved(&plain).len()), (3, 2));
    for (env, _) in &got {
        assert!(env.contains("TRANSFER: BDAT\n"), "{env}");
    }
    for (env, _) in &by_plain {
        assert!(env.contains("TRANSFER: DATA\n"), "{env}");
    }
    for saved in [&got, &by_plain] {
        let find = |b: &[u8]| saved.iter().find(|(_, m)| m.ends_with(b)).map(|(env, _)| env.clone());
        assert!(find(&dots).is_some(), "message with dot lines differs after relaying");
        assert!(find(&big).is_some(), "3 MiB message differs after relaying");
    }
    let half = got.iter().find(|(_, m)| m.ends_with(b"\r\nhalf\r\n")).expect("half delivered");
    assert!(half.0.contains("<w@chunk.test>") && !half.0.contains("rej-"), "{}", half.0);
    let log = relay.log();
    for rcpt in ["rej-1@chunk.test", "rej-2@chunk.test", "rej-3@chunk.test"] {
        let refused = |l: &&str| l.contains(rcpt) && l.contains("550 5.1.1") && l.contains("outcome=failed");
        assert!(log.lines().any(|l| refused(&l)), "{rcpt}:\n{log}");
    }
}

#[test]
fn queue_shows_attempts_and_expired_mail_bounces_once() {
    // The relay host defers every message (4xx after the data): every attempt is recorded,
    // then the message expires and bounces; the bounce (null sender) expires silently.
    let Some(bin) = load_bin() else { return };
    let defer = sink(&bin, "127.0.0.1:0", &["--tempfail-rate", "1"]);
    let relay = Relay::start(&[
        "--relay-host",
        &defer.addr.to_string(),
        "--dns",
        "127.0.0.1:9",
        "--retry-schedule",
        "300ms",
        "--max-queue-lifetime",
        "3s",
    ]);
    let id = send(&relay, "a@src.test", &["gone@dst.test"], b"Subject: expire\r\n\r\nbye\r\n");
    relay.wait_log("outcome=deferred");
    let (_, list, _) = queue_cmd(&relay.spool, &["list"]);
    assert!(list.contains(&id) && list.contains("gone@dst.test deferred attempts="), "{list}");
    assert!(list.contains(" 4"), "last reply shown: {list}");
    relay.wait_log("delivery time expired");
    relay.wait_log("event=bounce id=");
    wait_queue_empty(&relay, Duration::from_secs(20));
    let log = relay.log();
    assert_eq!(log.matches("event=bounce").count(), 1, "never a bounce for a bounce:\n{log}");
    assert!(log.contains("outcome=failed"), "{log}");
}

#[test]
fn kill_9_during_delivery_loses_no_recipient() {
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin, "127.0.0.1:0", &["--delay", "50ms"]);
    let dir = TempDir::new("dkill");
    let spool = dir.path().join("spool");
    let args = [
        "--relay-host".to_string(),
        sink.addr.to_string(),
        "--dns".into(),
        "127.0.0.1:9".into(),
        "--domain-concurrency".into(),
        "1".into(),
    ];
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    // `SLUICE_SOAK_ROUNDS` crashes (default 1; `benches/soak.sh` runs many), each in the middle
    // of delivering a fresh batch, with the backlog of the earlier rounds still queued.
    let rounds: usize = std::env::var("SLUICE_SOAK_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let n = 40;
    let subjects = |got: &[(String, Vec<u8>)]| {
        let mut s: Vec<String> = got
            .iter()
            .filter_map(|(_, m)| {
                let t = String::from_utf8_lossy(m);
                t.split("Subject: ").nth(1).map(|s| s.lines().next().unwrap_or("").to_string())
            })
            .collect();
        s.sort();
        s.dedup();
        s
    };
    for round in 0..rounds {
        let mut relay = Relay::start_on(&spool, &args);
        let start = saved(&sink).len();
        for i in 0..n {
            let body = format!("Subject: kill-{round:03}-{i:03}\r\n\r\nbody\r\n");
            send(&relay, "a@src.test", &["k@dst.test"], body.as_bytes());
        }
        // Let some go out, then crash in the middle of the deliveries.
        let t0 = Instant::now();
        while saved(&sink).len() < start + 5 {
            assert!(t0.elapsed() < Duration::from_secs(20), "{}", relay.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        relay.kill9();
        let mine = subjects(&saved(&sink)).iter().filter(|s| s.starts_with(&format!("kill-{round:03}-"))).count();
        assert!(mine < n, "the crash came too late to mean anything");
    }
    let relay = Relay::start_on(&spool, &args);
    let t0 = Instant::now();
    loop {
        let got = saved(&sink);
        let distinct = subjects(&got).len();
        if distinct == n * rounds {
            // Only what was in flight at each crash (one connection) may arrive twice.
            assert!(got.len() <= distinct + rounds, "{} deliveries for {distinct} messages", got.len());
            eprintln!(
                "soak: {rounds} kill -9 cycles during delivery, {distinct} messages, {} deliveries, none lost",
                got.len()
            );
            break;
        }
        let within = Duration::from_secs(30 + rounds as u64);
        assert!(t0.elapsed() < within, "only {distinct} of {} arrived:\n{}", n * rounds, relay.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nxdomain_bounces_with_5_1_2() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    let src = sink(&bin, &format!("127.0.0.9:{port}"), &[]);
    let d = dns(&bin, &["--zone", "src.test=127.0.0.9"]);
    let relay = Relay::start(&["--dns", &d.addr.to_string(), "--smtp-port", &port.to_string()]);
    send(&relay, "sender@src.test", &["x@no-such-domain.test"], b"Subject: nx\r\n\r\nbody\r\n");
    let got = wait_saved(&src, 1, Duration::from_secs(20), &relay);
    let text = String::from_utf8_lossy(&got[0].1);
    assert!(text.contains("Final-Recipient: rfc822; x@no-such-domain.test"), "{text}");
    assert!(text.contains("Status: 5.1.2"), "{text}");
}

#[test]
fn a_server_refusing_at_the_greeting_is_not_hammered() {
    let Some(_) = load_bin() else { return };
    if !require("python3") {
        return;
    }
    // A host that answers 421 and hangs up, counting connections.
    let script = r#"
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(64); s.settimeout(0.2)
print(s.getsockname()[1], flush=True)
n = 0; end = time.time() + 4
while time.time() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    n += 1
    c.sendall(b"421 busy.test Service not available\r\n"); c.close()
print(n, flush=True)
"#;
    let mut py = Command::new("python3").arg("-c").arg(script).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let port = line.trim().to_string();
    let relay =
        Relay::start(&["--relay-host", &format!("127.0.0.1:{port}"), "--dns", "127.0.0.1:9", "--retry-schedule", "1s"]);
    send(&relay, "a@src.test", &["x@dst.test"], b"Subject: busy\r\n\r\nbody\r\n");
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let _ = py.wait();
    let conns: u32 = line.trim().parse().unwrap();
    assert!((1..=12).contains(&conns), "{conns} connections in 4 s to a host that refuses at the greeting");
    relay.wait_log("event=destination_down");
    let log = relay.log();
    let down = log.lines().find(|l| l.contains("event=destination_down")).unwrap_or_default();
    assert!(down.contains("domain=127.0.0.1") && down.contains("421"), "the line says why: {log}");
    // Parked, not deferred message by message.
    assert!(!log.contains("outcome=deferred"), "{log}");
}

#[test]
fn a_large_backlog_for_a_down_destination_is_parked_without_a_record_per_message() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    let d = dns(&bin, &["--zone", "down.test=127.0.0.9"]);
    // Held first, so the whole backlog is queued before the destination is tried.
    let dir = TempDir::new("backlog");
    let spool = dir.path().join("spool");
    let n = 3000;
    {
        let relay = Relay::start_on(&spool, &["--hold", "--dns", &d.addr.to_string()]);
        let out = Command::new(&bin)
            .args(["send", "--to", &relay.addr.to_string(), "--messages", &n.to_string(), "--connections", "4"])
            .args(["--domains", "down.test", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Nothing listens on 127.0.0.9:port: every connect is refused, the destination is down
    // and the backlog waits for it, parked: one log line, no outcome record per message per
    // retry (the spool does not grow), one probe per backoff, sessions served meanwhile.
    // Segment files only: a spare segment written meanwhile holds no records.
    let spool_size = || -> u64 {
        std::fs::read_dir(&spool)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    let relay = Relay::start_on(
        &spool,
        &["--dns", &d.addr.to_string(), "--smtp-port", &port.to_string(), "--retry-schedule", "1s"],
    );
    let mut c = relay.client();
    c.expect("220");
    relay.wait_log("event=destination_down domain=down.test");
    // The first round opens --domain-concurrency connections; after it, one probe per backoff.
    let first_round = relay.log().matches("event=connect_error").count();
    let before = spool_size();
    let t0 = Instant::now();
    // Three backoffs (1 s each, the first retry delay).
    while t0.elapsed() < Duration::from_secs(3) {
        assert!(c.cmd("NOOP").starts_with("250"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = relay.log();
    assert_eq!(log.matches("outcome=deferred").count(), 0, "{log}");
    let probes = log.matches("event=connect_error").count() - first_round;
    assert!((2..=5).contains(&probes), "{probes} connection attempts in 3 s");
    assert_eq!(spool_size(), before, "records written while parked");
    let (code, out, err) = queue_cmd(&spool, &["stats", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("\"messages\":{n}")), "{out}");
}

/// Stops a sink with SIGTERM and returns one number of its `--json` summary.
fn sink_summary(mut sink: Aux, field: &str) -> u64 {
    let _ = Command::new("kill").arg("-TERM").arg(sink.child.id().to_string()).status();
    let out = std::mem::replace(&mut sink.child, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    summary
        .split(&format!("\"{field}\":"))
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in summary: {summary}"))
}

/// A relay sending everything to `host` over at most one connection, retrying after 1 s.
fn one_connection_relay(host: &str) -> Relay {
    Relay::start(&["--relay-host", host, "--dns", "127.0.0.1:9", "--retry-schedule", "1s", "--domain-concurrency", "1"])
}

#[test]
fn a_backlog_goes_pipelined_over_one_connection_with_refusals_settled() {
    // RFC 2920 §3.1: to a DATA server with PIPELINING, each next transaction's envelope rides
    // behind the previous message's end of data. Some recipients are refused at RCPT (550),
    // some messages after the data (554), some recipients once at RCPT (451, then accepted):
    // every message must arrive exactly once, byte-exact, with exactly its accepted recipients.
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    let host = format!("127.0.0.31:{port}");
    let relay = one_connection_relay(&host);
    // Each end of data waits 100 ms for its reply: the messages pile up behind the one
    // connection while they come in.
    let up = sink(&bin, &host, &["--no-chunking", "--json", "--delay", "100ms"]);
    const N: usize = 40;
    let mut bodies = Vec::new();
    for i in 0..N {
        let rcpts: Vec<String> = match i % 7 {
            3 => vec![format!("rej-{i}@pipe.test"), format!("ok{i}@pipe.test")],
            5 => vec![format!("datafail-{i}@pipe.test")],
            6 => vec![format!("tf1-{i}@pipe.test")],
            _ => vec![format!("r{i}@pipe.test")],
        };
        // Lines stay under 998 octets: longer ones would be (rightly) broken on the way out.
        let body = format!("Subject: {i}\r\n\r\n.dot line {i}\r\nbody {i} {}\r\n", "z".repeat(i * 23)).into_bytes();
        let to: Vec<&str> = rcpts.iter().map(String::as_str).collect();
        send(&relay, "a@src.test", &to, &stuff(&body));
        bodies.push((i, rcpts, body));
    }
    let delivered = bodies.iter().filter(|(i, _, _)| i % 7 != 5).count();
    let bounces = bodies.iter().filter(|(i, _, _)| i % 7 == 3 || i % 7 == 5).count();
    wait_saved(&up, delivered + bounces, Duration::from_secs(60), &relay);
    wait_queue_empty(&relay, Duration::from_secs(30));
    let got = saved(&up);
    assert_eq!(got.len(), delivered + bounces);
    for (i, rcpts, body) in &bodies {
        let copies: Vec<&(String, Vec<u8>)> = got.iter().filter(|(_, m)| m.ends_with(body)).collect();
        if i % 7 == 5 {
            assert!(copies.is_empty(), "message {i} was refused after the data but arrived");
            continue;
        }
        assert_eq!(copies.len(), 1, "message {i} arrived {} times", copies.len());
        let env = &copies[0].0;
        assert!(env.contains("TRANSFER: DATA\n"), "{env}");
        for r in rcpts {
            assert_eq!(env.contains(&format!("<{r}>")), !r.starts_with("rej-"), "message {i}, {r}: {env}");
        }
    }
    // The bounces: one per message with a failed recipient, to the sender, from <>.
    let dsns: Vec<&String> = got.iter().filter(|(env, _)| env.contains("MAIL FROM:<>")).map(|(e, _)| e).collect();
    assert_eq!(dsns.len(), bounces);
    assert!(dsns.iter().all(|e| e.contains("<a@src.test>")));
    let log = relay.log();
    for (i, rcpts, _) in &bodies {
        let r = &rcpts[0];
        let line = |what: &str| log.lines().any(|l| l.contains(&format!("rcpt={r} ")) && l.contains(what));
        match i % 7 {
            3 => assert!(line("550 5.1.1") && line("outcome=failed"), "{r}:\n{log}"),
            5 => assert!(line("554 5.6.0") && line("outcome=failed"), "{r}:\n{log}"),
            6 => assert!(line("451 4.7.1") && line("outcome=deferred") && line("outcome=delivered"), "{r}:\n{log}"),
            _ => assert!(line("outcome=delivered"), "{r}:\n{log}"),
        }
    }
    // Pipelined: many MAIL commands came in the same read as the previous end of data.
    let pipelined = sink_summary(up, "mail_after_data");
    eprintln!("{pipelined} MAIL commands (of {N} messages, retries, bounces) behind an end of data");
    assert!(pipelined as usize >= N / 4, "only {pipelined} MAIL commands rode behind an end of data");
}

#[test]
fn a_connection_lost_with_a_transaction_queued_holds_back_only_the_broken_message() {
    // The sink closes the connection in the middle of `drop-` messages while the next
    // transaction is queued behind them: the broken one is deferred (again and again), the
    // queued one goes on over a new connection, and every other message arrives exactly once.
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    let host = format!("127.0.0.32:{port}");
    let relay = one_connection_relay(&host);
    let up = sink(&bin, &host, &["--no-chunking", "--delay", "100ms"]);
    let mut bodies = Vec::new();
    for i in 0..16 {
        let to = if i % 5 == 2 { format!("drop-{i}@pipe.test") } else { format!("r{i}@pipe.test") };
        let body = format!("Subject: {i}\r\n\r\nlost and found {i}\r\n").into_bytes();
        send(&relay, "a@src.test", &[&to], &body);
        bodies.push((i, to, body));
    }
    let want = bodies.iter().filter(|(_, to, _)| !to.starts_with("drop-")).count();
    wait_saved(&up, want, Duration::from_secs(60), &relay);
    // Retries of the dropped ones go on; nothing may arrive twice meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    let got = saved(&up);
    for (i, to, body) in &bodies {
        let n = got.iter().filter(|(_, m)| m.ends_with(body)).count();
        assert_eq!(n, usize::from(!to.starts_with("drop-")), "message {i} ({to}) arrived {n} times");
    }
    let log = relay.log();
    for (_, to, _) in bodies.iter().filter(|(_, to, _)| to.starts_with("drop-")) {
        let mine: Vec<&str> = log.lines().filter(|l| l.contains(&format!("rcpt={to} "))).collect();
        assert!(!mine.is_empty() && mine.iter().all(|l| l.contains("outcome=deferred")), "{to}:\n{log}");
    }
}

/// A relay restarted on a spool whose disk is full starts (deliver-only), delivers its queue,
/// refuses new mail at MAIL, and a bounce it cannot store keeps its message queued (deferred)
/// until the bounce can be stored: no failed message vanishes without a DSN.
#[test]
fn a_full_disk_neither_stops_the_relay_nor_loses_a_bounce() {
    let Some(bin) = load_bin() else { return };
    let Some(fs) = Tmpfs::mount("fullbounce", "8m") else { return };
    let spool = fs.mnt.join("spool");
    let d = dns(&bin, &[]);
    let dst = sink(&bin, "127.0.0.1:0", &[]);
    let common = ["--spool-segment-size", "256k", "--max-message-size", "100k", "--dns", &d.addr.to_string()];
    // Queue mail while holding: two for a recipient the destination refuses, three it takes.
    let body = format!("Subject: full\r\n\r\n{}\r\n", "f".repeat(40_000));
    let mut ids = Vec::new();
    {
        let mut relay = Relay::start_on(&spool, &[&common[..], &["--hold"]].concat());
        for to in ["rej-a@dst.test", "rej-b@dst.test", "ok1@dst.test", "ok2@dst.test", "ok3@dst.test"] {
            ids.push(send(&relay, "sender@src.test", &[to], body.as_bytes()));
        }
        relay.signal("TERM");
        assert_eq!(relay.wait_exit(Duration::from_secs(10)).code(), Some(0));
    }
    let filler = fs.fill();
    let host = dst.addr.to_string();
    let relay = Relay::start_on(&spool, &[&common[..], &["--relay-host", &host, "--retry-schedule", "1s"]].concat());
    relay.wait_log("refusing new mail until space returns");
    // The queue drains although nothing can be written.
    let got = wait_saved(&dst, 3, Duration::from_secs(30), &relay);
    assert!(got.iter().all(|(e, _)| e.contains("ok")), "{got:?}");
    // New mail is refused at MAIL while the disk is full.
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let r = c.cmd("MAIL FROM:<late@src.test>");
    assert!(r.starts_with("452 4.3.1"), "{r}");
    // The refused recipients' bounces cannot be stored: the messages stay queued.
    let t0 = Instant::now();
    let failed_bounces =
        |log: String| log.lines().filter(|l| l.contains("event=spool_error") && l.contains(" for=")).count();
    while failed_bounces(relay.log()) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no failed bounce append: {}", relay.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(relay.log().contains("outcome=deferred"), "{}", relay.log());
    let (_, out, _) = queue_cmd(&spool, &["list"]);
    assert!(out.contains(&ids[0]) && out.contains(&ids[1]), "the refused messages stay queued: {out}");
    // Space returns: both bounces are stored and delivered, new mail is taken again.
    std::fs::remove_file(&filler).unwrap();
    let got = wait_saved(&dst, 5, Duration::from_secs(30), &relay);
    let dsns: Vec<_> = got.iter().filter(|(e, _)| e.contains("MAIL FROM:<>")).collect();
    assert_eq!(dsns.len(), 2, "one DSN per refused message: {got:?}");
    for id in &ids[..2] {
        assert!(dsns.iter().any(|(_, m)| String::from_utf8_lossy(m).contains(id.as_str())), "no DSN for {id}");
    }
    let t0 = Instant::now();
    loop {
        let r = try_send(&mut c, "late@src.test", "ok4@dst.test", b"Subject: late\r\n\r\nok\r\n");
        if r.starts_with("250") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "new mail still refused: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_saved(&dst, 6, Duration::from_secs(30), &relay);
}

/// Messages a sink has saved so far (counts files; reads none).
fn saved_count(sink: &Aux) -> usize {
    let Some(dir) = &sink.save else { return 0 };
    std::fs::read_dir(dir)
        .map_or(0, |d| d.filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "msg")).count())
}

#[test]
fn large_messages_over_one_connection_do_not_stall_on_nagle() {
    // Outbound sockets must set TCP_NODELAY: otherwise the short tail of each message (and the
    // pipelined commands behind it) waits for the sink's delayed ACK, ~40 ms per message, and
    // 200 messages of 100 KiB over one connection took over 4 s instead of about 0.1 s.
    let Some(bin) = load_bin() else { return };
    const N: usize = 200;
    let up = sink(&bin, "127.0.0.1:0", &["--no-chunking"]);
    let relay = Relay::start(&[
        "--relay-host",
        &up.addr.to_string(),
        "--dns",
        "127.0.0.1:9",
        "--domain-concurrency",
        "1",
        "--fsync",
        "never",
    ]);
    let t0 = Instant::now();
    let out = Command::new(&bin)
        .args(["send", "--to", &relay.addr.to_string(), "--connections", "1", "--quiet"])
        .args(["--messages", &N.to_string(), "--size", "100k", "--domains", "nagle.test"])
        .output()
        .expect("run sluice-load send");
    assert!(out.status.success(), "send failed: {}", String::from_utf8_lossy(&out.stderr));
    while saved_count(&up) < N {
        assert!(t0.elapsed() < Duration::from_secs(60), "sink got {} of {N}:\n{}", saved_count(&up), relay.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    eprintln!("{N} messages of 100 KiB relayed over one connection in {took:?}");
    assert!(took < Duration::from_secs(2), "{N} messages took {took:?}: Nagle stalls on the outbound socket?");
}

/// A one-connection SMTP server on a thread that answers EHLO with `ehlo` and accepts one
/// message by DATA, then QUIT. Returns its address.
fn long_ehlo_server(ehlo: String) -> std::net::SocketAddr {
    use std::io::{BufRead as _, BufReader, Write as _};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((sock, _)) = l.accept() else { return };
        let mut w = sock.try_clone().unwrap();
        let mut r = BufReader::new(sock);
        let _ = w.write_all(b"220 long.test ESMTP\r\n");
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => ehlo.as_bytes(),
                "DATA" => {
                    let _ = w.write_all(b"354 go\r\n");
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 || line == ".\r\n" {
                            break;
                        }
                    }
                    b"250 2.0.0 queued\r\n"
                }
                "QUIT" => {
                    let _ = w.write_all(b"221 bye\r\n");
                    return;
                }
                _ => b"250 2.0.0 ok\r\n",
            };
            let _ = w.write_all(reply);
        }
    });
    addr
}

#[test]
fn a_20_kib_ehlo_reply_is_read_not_taken_for_a_closed_connection() {
    // The outbound input buffer holds 16 KiB; a multi-line reply may be longer (up to 64 KiB).
    let mut ehlo = String::from("250-long.test\r\n");
    for i in 0..400 {
        ehlo.push_str(&format!("250-X-FILLER-{i:05} {}\r\n", "f".repeat(40)));
    }
    ehlo.push_str("250 8BITMIME\r\n");
    assert!(ehlo.len() > 20 * 1024);
    let addr = long_ehlo_server(ehlo);
    let relay = Relay::start(&["--relay-host", &addr.to_string(), "--dns", "127.0.0.1:9", "--retry-schedule", "1h"]);
    send(&relay, "a@src.test", &["x@long.test"], b"Subject: long ehlo\r\n\r\nbody\r\n");
    let t0 = Instant::now();
    while !relay.log().contains("outcome=") {
        assert!(t0.elapsed() < Duration::from_secs(20), "no outcome:\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = relay.log();
    assert!(log.contains("outcome=delivered") && !log.contains("closed by the server"), "{log}");
}

#[test]
fn bdat_content_with_bare_line_ends_reaches_a_data_destination_normalised() {
    // BDAT carries any octets; the sink without CHUNKING gets DATA: CRLF lines of at most 998
    // octets (RFC 5321 §4.5.3.1.6), long ones broken with CRLF SP, dots stuffed after bare
    // line ends too (the sink unstuffs them).
    let Some(bin) = load_bin() else { return };
    let up = sink(&bin, "127.0.0.1:0", &["--no-chunking"]);
    let relay = Relay::start(&["--relay-host", &up.addr.to_string(), "--dns", "127.0.0.1:9"]);
    let dir = TempDir::new("bdat-body");
    let file = dir.path().join("body.eml");
    let mut body = b"Subject: bare\n\nlf only\n.dot after lf\rcr only\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'z', 2100));
    body.extend_from_slice(b"\r\n");
    std::fs::write(&file, &body).unwrap();
    let out = Command::new(&bin)
        .args(["send", "--to", &relay.addr.to_string(), "--connections", "1", "--messages", "1", "--bdat"])
        .arg("--body")
        .arg(&file)
        .args(["--quiet", "--domains", "norm.test"])
        .output()
        .expect("run sluice-load send");
    assert!(out.status.success(), "send failed: {}", String::from_utf8_lossy(&out.stderr));
    let got = wait_saved(&up, 1, Duration::from_secs(20), &relay);
    let (env, msg) = &got[0];
    assert!(env.contains("TRANSFER: DATA\n"), "{env}");
    let mut want = b"Subject: bare\r\n\r\nlf only\r\n.dot after lf\r\ncr only\r\n".to_vec();
    want.extend(std::iter::repeat_n(b'z', 998));
    want.extend_from_slice(b"\r\n ");
    want.extend(std::iter::repeat_n(b'z', 997));
    want.extend_from_slice(b"\r\n ");
    want.extend(std::iter::repeat_n(b'z', 105));
    want.extend_from_slice(b"\r\n");
    assert!(msg.ends_with(&want), "{}", String::from_utf8_lossy(msg));
    relay.wait_log("outcome=delivered");
}

/// Mail deferred before a restart (its next attempt recorded in the spool) is retried at that
/// time by the new relay, from the recovered queue's own deadline.
#[test]
fn mail_deferred_before_a_restart_is_retried_on_time() {
    let Some(bin) = load_bin() else { return };
    let target = format!("127.0.0.1:{}", free_port());
    let dir = TempDir::new("restart-deferred");
    let spool = dir.path().join("spool");
    let args = ["--relay-host", &target, "--dns", "127.0.0.1:9", "--retry-schedule", "3s"];
    // The destination defers it (a real attempt, recorded with its next time).
    let defer = sink(&bin, &target, &["--tempfail-rate", "1"]);
    let mut relay = Relay::start_on(&spool, &args);
    let id = send(&relay, "a@src.test", &["x@dst.test"], b"Subject: later\r\n\r\nbody\r\n");
    relay.wait_log("outcome=deferred");
    relay.kill9();
    drop(defer);
    let sink = sink(&bin, &target, &[]);
    let relay = Relay::start_on(&spool, &args);
    let got = wait_saved(&sink, 1, Duration::from_secs(15), &relay);
    assert!(got[0].1.ends_with(b"body\r\n"));
    relay.wait_log(&format!("id={id}"));
}

/// A body that goes out alone by BDAT (over the pipelined-chunk limit, or to a server without
/// PIPELINING) is written straight from the spool's map, not through the output buffer: it
/// must arrive byte for byte, whole lines, dots and all, with the small ones that still go
/// through the buffer.
#[test]
fn bodies_sent_by_bdat_from_the_map_arrive_byte_for_byte() {
    let Some(bin) = load_bin() else { return };
    let body = |size: usize| -> Vec<u8> {
        let mut b = format!("Subject: {size} bytes\r\n\r\n").into_bytes();
        let mut i = 0;
        while b.len() < size {
            let dot = if i % 7 == 0 { "." } else { "" };
            b.extend_from_slice(format!("{dot}line {i} {}\r\n", "x".repeat(i % 91)).as_bytes());
            i += 1;
        }
        b
    };
    for (flags, sizes) in [(&[][..], &[300 * 1024, 20 * 1024][..]), (&["--no-pipelining"][..], &[20 * 1024, 1024][..])]
    {
        let up = sink(&bin, "127.0.0.1:0", flags);
        let relay = Relay::start(&["--relay-host", &up.addr.to_string(), "--dns", "127.0.0.1:9"]);
        let bodies: Vec<Vec<u8>> = sizes.iter().map(|&n| body(n)).collect();
        for b in &bodies {
            // The test client sends DATA as given: dot-stuff it here (RFC 5321 §4.5.2).
            let stuffed = String::from_utf8(b.clone()).unwrap().replace("\r\n.", "\r\n..");
            send(&relay, "a@src.test", &["x@dst.test"], stuffed.as_bytes());
        }
        let got = wait_saved(&up, bodies.len(), Duration::from_secs(30), &relay);
        for b in &bodies {
            assert!(
                got.iter().any(|(_, m)| m.ends_with(b) && m.starts_with(b"Received: ")),
                "{flags:?}: a {} byte body did not arrive intact",
                b.len()
            );
        }
    }
}
