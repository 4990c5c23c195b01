//! Runtime control through the relay's control socket (`DIR/control.sock`): `sluice queue
//! suspend|resume|suspensions|bounce|summary` against a real relay delivering to a destination
//! that is down, the suspension surviving a kill -9, the operator's bounce reaching the sender
//! as a DSN, and the exit codes with no relay running. Loopback only.

use super::delivery::{dns, free_port, saved, send, sink, wait_queue_empty, wait_saved};
use super::support::*;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The JSON line of `out` that contains `needle`.
fn line_with<'a>(out: &'a str, needle: &str) -> &'a str {
    out.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no line with {needle} in:\n{out}"))
}

/// The number after `"key":` in a JSON line.
fn num(line: &str, key: &str) -> u64 {
    let rest = line.split(&format!("\"{key}\":")).nth(1).unwrap_or_else(|| panic!("{key} missing: {line}"));
    rest.split([',', '}']).next().unwrap().parse().unwrap_or_else(|_| panic!("{key} not a number: {line}"))
}

#[test]
fn a_suspension_survives_kill_9_and_an_operator_bounce_reaches_the_sender() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    // dst.test's MX (127.0.0.31) is down; the sender's (127.0.0.32) catches the DSN.
    let src = sink(&bin, &format!("127.0.0.32:{port}"), &[]);
    let d = dns(&bin, &["--zone", "dst.test=127.0.0.31", "--zone", "src.test=127.0.0.32"]);
    let flags = ["--dns", &d.addr.to_string(), "--smtp-port", &port.to_string(), "--retry-schedule", "1h"];
    let mut relay = Relay::start(&flags);
    let dir = relay.take_dir().unwrap();
    let spool = relay.spool.clone();
    let id = send(&relay, "sender@src.test", &["x@dst.test", "y@dst.test"], b"Subject: held\r\n\r\nbody\r\n");
    relay.wait_log("event=connect_error");

    let (code, out, err) =
        queue_cmd(&spool, &["suspend", "--domain", "DST.test", "--for", "2h", "--reason", "abuse desk"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("suspended domain:dst.test"), "{out}");
    relay.wait_log("event=suspend");
    let (code, out, err) = queue_cmd(&spool, &["suspensions", "--json"]);
    assert_eq!(code, 0, "{err}");
    let row = line_with(&out, "\"scope\":\"domain:dst.test\"");
    assert!(row.contains("\"reason\":\"abuse desk\"") && row.contains("\"manual\":true"), "{row}");
    assert!((7100..=7200).contains(&num(row, "seconds_left")), "{row}");
    let (code, out, err) = queue_cmd(&spool, &["summary", "--json"]);
    assert_eq!(code, 0, "{err}");
    let row = line_with(&out, "\"domain\":\"dst.test\"");
    assert_eq!(num(row, "queued"), 2, "{row}");
    assert!(num(row, "oldest_age_s") < 60, "{row}");
    assert!(row.contains("\"suspended\":true"), "{row}");
    assert!(row.contains("\"last_reply\":\"451 4.4.1"), "the connect failure is the last reply: {row}");

    // kill -9 leaves a stale socket; the manual suspension is in the spool.
    relay.kill9();
    assert!(spool.join("control.sock").exists());
    let (code, out, err) = queue_cmd(&spool, &["suspensions"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no relay is running") && out.contains("domain:dst.test"), "{out}");
    let (code, out, _) = queue_cmd(&spool, &["summary", "--json"]);
    assert_eq!(code, 0);
    assert!(line_with(&out, "\"domain\":\"dst.test\"").contains("\"suspended\":true"), "{out}");
    let (code, _, err) = queue_cmd(&spool, &["resume", "--domain", "dst.test"]);
    assert_eq!(code, 1);
    assert!(err.contains("no relay is running on") && err.contains(&spool.display().to_string()), "{err}");

    let relay = Relay::start_on(&spool, &flags);
    let _keep = dir;
    let (code, out, err) = queue_cmd(&spool, &["suspensions", "--json"]);
    assert_eq!(code, 0, "{err}");
    let row = line_with(&out, "\"scope\":\"domain:dst.test\"");
    assert!(row.contains("\"source\":\"relay\"") && row.contains("abuse desk"), "{row}");
    let (code, out, err) = queue_cmd(&spool, &["resume", "--domain", "dst.test"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("resumed domain:dst.test"), "{out}");
    relay.wait_log("event=resume");
    let (_, out, _) = queue_cmd(&spool, &["suspensions", "--json"]);
    assert!(!out.contains("dst.test"), "{out}");
    let (code, _, err) = queue_cmd(&spool, &["resume", "--domain", "dst.test"]);
    assert_eq!(code, 1, "nothing to resume: {err}");

    // Bounce what is queued for dst.test: a DSN to the sender, the queue drains.
    let (code, out, err) = queue_cmd(&spool, &["bounce", "--domain", "dst.test", "--reason", "spam run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bounced 2 recipient(s) of 1 message(s)"), "{out}");
    let dsn = wait_saved(&src, 1, Duration::from_secs(20), &relay);
    let all: String = dsn.iter().map(|(e, m)| format!("{e}\n{}", String::from_utf8_lossy(m))).collect();
    assert!(all.contains("MAIL FROM:<>") && all.contains("sender@src.test"), "{all}");
    assert!(all.contains("Final-Recipient: rfc822; x@dst.test"), "{all}");
    assert!(all.contains("Status: 5.0.0"), "{all}");
    assert!(all.contains("554 5.0.0 Bounced by the operator: spam run"), "{all}");
    assert!(all.contains(&id), "{all}");
    relay.wait_log("outcome=failed");
    wait_queue_empty(&relay, Duration::from_secs(20));
    let (code, _, err) = queue_cmd(&spool, &["bounce", "--id", &id]);
    assert_eq!(code, 1, "nothing left to bounce: {err}");
    assert_eq!(saved(&src).len(), 1);
}

#[test]
fn control_verbs_without_a_relay_and_bad_requests() {
    // No relay: the verbs that change something exit 1 naming the spool; the listings answer
    // from the spool.
    let idle = TempDir::new("noctl");
    let name = idle.path().display().to_string();
    for args in [
        &["suspend", "--domain", "a.test"][..],
        &["resume", "--provider", "google"],
        &["bounce", "--domain", "a.test"],
        &["bounce", "--id", "x"],
    ] {
        let (code, _, err) = queue_cmd(idle.path(), args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("no relay is running on") && err.contains(&name), "{args:?}: {err}");
    }
    let (code, out, err) = queue_cmd(idle.path(), &["suspensions"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no suspensions"), "{out}");
    let (code, out, err) = queue_cmd(idle.path(), &["summary"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing queued"), "{out}");
    // Bad flags: exit 2 naming the flag.
    for (args, flag) in [
        (&["suspend"][..], "--domain"),
        (&["suspend", "--domain", "a.test", "--provider", "google"], "--provider"),
        (&["suspend", "--domain", "a.test", "--for", "0s"], "--for"),
        (&["summary", "--by", "planet"], "--by"),
        (&["bounce", "--domain", "bad domain"], "--domain"),
    ] {
        let (code, _, err) = queue_cmd(idle.path(), args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
    }

    let mut relay = Relay::start(&[]);
    let sock = relay.spool.join("control.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let (code, _, err) = queue_cmd(&relay.spool, &["suspend", "--provider", "no-such-provider"]);
    assert_eq!(code, 1);
    assert!(err.contains("no-such-provider"), "{err}");
    // A client that never sends does not hold up the next one; an over-long request is
    // refused.
    let _silent = UnixStream::connect(&sock).unwrap();
    let mut long = UnixStream::connect(&sock).unwrap();
    long.write_all(&[b'a'; 5000]).unwrap();
    let mut answer = String::new();
    long.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    long.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("error\trequest longer than"), "{answer:?}");
    let t0 = Instant::now();
    let (code, out, err) = queue_cmd(&relay.spool, &["suspensions"]);
    assert_eq!((code, out.trim()), (0, "no suspensions"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // A clean stop removes the socket.
    relay.signal("TERM");
    assert!(relay.wait_exit(Duration::from_secs(10)).success());
    assert!(!sock.exists());
}

#[test]
fn a_suspended_domain_gets_no_connection_until_it_is_resumed() {
    let Some(bin) = load_bin() else { return };
    let port = free_port();
    let dst = sink(&bin, &format!("127.0.0.33:{port}"), &[]);
    let d = dns(&bin, &["--zone", "sus.test=127.0.0.33"]);
    let relay =
        Relay::start(&["--dns", &d.addr.to_string(), "--smtp-port", &port.to_string(), "--retry-schedule", "1s"]);
    let (code, _, err) = queue_cmd(&relay.spool, &["suspend", "--domain", "sus.test", "--reason", "maintenance"]);
    assert_eq!(code, 0, "{err}");
    send(&relay, "a@src.test", &["u@sus.test"], b"Subject: wait\r\n\r\nlater\r\n");
    // Several retry periods pass: no connection, nothing delivered.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(saved(&dst).is_empty(), "delivered while suspended:\n{}", relay.log());
    let log = relay.log();
    assert!(!log.contains("127.0.0.33") && !log.contains("outcome=delivered"), "no connection expected:\n{log}");
    let (_, out, _) = queue_cmd(&relay.spool, &["summary", "--json"]);
    let row = line_with(&out, "\"domain\":\"sus.test\"");
    assert!(row.contains("\"suspended\":true") && num(row, "queued") == 1, "{row}");
    // Resumed (and flushed, whatever retry time the suspension gave it): delivered.
    let (code, _, err) = queue_cmd(&relay.spool, &["resume", "--domain", "sus.test"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = queue_cmd(&relay.spool, &["flush"]);
    assert_eq!(code, 0, "{err}");
    let got = wait_saved(&dst, 1, Duration::from_secs(20), &relay);
    assert!(got[0].1.ends_with(b"later\r\n"));
    wait_queue_empty(&relay, Duration::from_secs(10));
}

#[test]
fn through_a_relay_host_a_domain_suspension_is_refused_naming_the_site_to_use() {
    let relay = Relay::start(&["--relay-host", "127.0.0.1:9", "--dns", "127.0.0.1:9"]);
    let (code, _, err) = queue_cmd(&relay.spool, &["suspend", "--domain", "a.test"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--relay-host") && err.contains("--site"), "{err}");
}
