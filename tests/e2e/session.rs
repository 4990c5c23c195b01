//! RFC 5321 dialogues over TCP against the real binary.

use super::support::*;
use std::io::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn greeting_and_ehlo_capabilities() {
    let relay = Relay::start(&[]);
    let mut c = relay.client();
    assert_eq!(c.reply(), "220 mx.test ESMTP sluice\r\n");
    let ehlo = c.cmd("EHLO client.test");
    assert_eq!(
        ehlo,
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n"
    );
    assert_eq!(c.cmd("HELO client.test"), "250 mx.test\r\n");
    assert!(c.cmd("VRFY someone").starts_with("252 2.1.5"));
    assert!(c.cmd("EXPN list").starts_with("502 5.5.1"));
    assert!(c.cmd("HELP").starts_with("214 "));
    assert!(c.cmd("NOOP").starts_with("250 2.0.0"));
    assert!(c.cmd("STARTTLS").starts_with("454 4.7.0"));
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye\r\n");
    assert!(c.closed());
}

#[test]
fn pipelined_transaction_in_one_write_is_stored() {
    let mut relay = Relay::start(&[]);
    let _dir = relay.take_dir();
    let mut c = relay.client();
    c.expect("220");
    c.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<x@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.test\r\nRCPT TO:<z@y.test>\r\nDATA\r\n");
    c.expect("250-mx.test");
    c.expect("250 2.1.0");
    c.expect("250 2.1.5");
    c.expect("250 2.1.5");
    c.expect("354");
    c.send(b"Subject: pipelined\r\n\r\n..leading dot\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n");
    let ok = c.expect("250 2.0.0 Ok: queued as ");
    c.expect("250 2.0.0");
    c.expect("221");
    let id = queue_id(&ok);
    let spool = relay.spool.clone();
    drop(relay);
    let msgs = spool_messages(&spool);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, id);
    let body = String::from_utf8(msgs[0].1.clone()).unwrap();
    assert!(body.starts_with("Received: from c.test ([127.0.0.1])\r\n\tby mx.test (sluice) with ESMTP id "), "{body}");
    assert!(body.ends_with("Subject: pipelined\r\n\r\n.leading dot\r\nbody\r\n"), "{body}");
    assert!(!body.contains("\tfor <"), "two recipients: no `for` clause");
}

#[test]
fn sequencing_syntax_and_unknown_commands() {
    let relay = Relay::start(&["--max-recipients", "2"]);
    let mut c = relay.client();
    c.expect("220");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("503 5.5.1"));
    assert!(c.cmd("EHLO").starts_with("501 5.5.4"));
    c.expect_ok("EHLO c.test", "250");
    assert!(c.cmd("RCPT TO:<x@y.test>").starts_with("503 5.5.1"));
    assert!(c.cmd("DATA").starts_with("503 5.5.1"));
    assert!(c.cmd("MAIL FROM:<bad@>").starts_with("501 5.1.7"));
    assert!(c.cmd("MAIL FROM:<a@b.test> FROB=1").starts_with("555 5.5.4"));
    assert!(c.cmd("MAIL FROM:<a@b.test> SIZE=999999999").starts_with("552 5.3.4"));
    c.expect_ok("MAIL FROM:<a@b.test>", "250 2.1.0");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("503 5.5.1"));
    assert!(c.cmd("RCPT TO:<x@@y>").starts_with("501 5.1.3"));
    assert!(c.cmd("RCPT TO:<ü@y.test>").starts_with("553 5.6.7"));
    c.expect_ok("RCPT TO:<postmaster>", "250");
    c.expect_ok("RCPT TO:<\"quoted local\"@y.test>", "250");
    assert!(c.cmd("RCPT TO:<third@y.test>").starts_with("452 4.5.3"));
    assert!(c.cmd("FROB").starts_with("502 5.5.2"));
    assert!(c.cmd("MAIL").starts_with("501 5.5.4"));
    c.expect_ok("RSET", "250");
    c.expect_ok("NOOP", "250");
    c.expect_ok("QUIT", "221");
}

#[test]
fn relay_denied_outside_allow() {
    let relay = Relay::start(&["--allow", "10.0.0.0/8"]);
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    c.expect_ok("MAIL FROM:<a@b.test>", "250");
    assert_eq!(c.cmd("RCPT TO:<x@y.test>"), "554 5.7.1 Relay access denied\r\n");
    relay.wait_log("event=refused");
}

#[test]
fn overlong_lines_and_binary_garbage() {
    let relay = Relay::start(&[]);
    let mut c = relay.client();
    c.expect("220");
    // 512 octets including CRLF is the limit; 513 is refused, then the session is in sync.
    let ok = format!("NOOP {}\r\n", "a".repeat(512 - 7));
    c.send(ok.as_bytes());
    c.expect("250");
    let long = format!("NOOP {}\r\n", "a".repeat(512 - 6));
    c.send(long.as_bytes());
    c.expect("500 5.5.2");
    // A 1 MiB line, sent in pieces.
    let big = vec![b'x'; 1 << 20];
    c.send(&big);
    c.send(b"\r\nNOOP\r\n");
    c.expect("500 5.5.2");
    c.expect("250");
    // NUL bytes and binary garbage get syntax errors, not a crash.
    c.send(b"MAIL FROM:<a\0@b>\r\n");
    c.expect("500 5.5.2");
    c.send(b"\xff\xfe\x00\x01\x02garbage\r\n");
    c.expect("50");
    c.expect_ok("NOOP", "250");
    // Ten bad commands in a row close the session with 421.
    for _ in 0..9 {
        c.send(b"BOGUS\r\n");
        c.expect("502");
    }
    c.send(b"BOGUS\r\n");
    c.expect("502");
    c.expect("421 4.7.0");
    assert!(c.closed());
    // The relay is still fine.
    let mut c2 = relay.client();
    c2.expect("220");
    c2.expect_ok("NOOP", "250");
}

#[test]
fn oversized_data_is_read_and_refused_session_stays() {
    let relay = Relay::start(&["--max-message-size", "2000"]);
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let body = format!("Subject: big\r\n\r\n{}\r\n", "y".repeat(5000));
    let r = c.send_message("a@b.test", &["x@y.test"], body.as_bytes());
    assert!(r.starts_with("552 5.3.4"), "{r}");
    let r = c.send_message("a@b.test", &["x@y.test"], b"Subject: small\r\n\r\nok\r\n");
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
}

#[test]
fn bdat_chunking() {
    let relay = Relay::start(&[]);
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    c.expect_ok("MAIL FROM:<a@b.test> BODY=BINARYMIME", "250");
    c.expect_ok("RCPT TO:<x@y.test>", "250");
    assert!(c.cmd("DATA").starts_with("503 5.5.1"), "BINARYMIME needs BDAT");
    c.send(b"BDAT 12\r\nSubject: b\r\n");
    c.expect("250 2.0.0 12 octets");
    c.send(b"BDAT 6 LAST\r\n\r\nbin\0");
    c.expect("250 2.0.0 Ok: queued as");
    // BDAT 0 LAST ends a message; a chunk without a transaction is still consumed.
    c.send(b"BDAT 4\r\nabcdNOOP\r\n");
    c.expect("503 5.5.1");
    c.expect("250");
    c.expect_ok("MAIL FROM:<a@b.test>", "250");
    c.expect_ok("RCPT TO:<x@y.test>", "250");
    c.send(b"BDAT 3\r\nabc");
    c.expect("250");
    assert!(c.cmd("DATA").starts_with("503 5.5.1"), "no DATA after BDAT");
    c.send(b"BDAT 0 LAST\r\n");
    c.expect("250 2.0.0 Ok: queued as");
}

#[test]
fn client_closing_mid_data_stores_nothing() {
    let relay = Relay::start(&[]);
    {
        let mut c = relay.client();
        c.expect("220");
        c.expect_ok("EHLO c.test", "250");
        c.expect_ok("MAIL FROM:<a@b.test>", "250");
        c.expect_ok("RCPT TO:<x@y.test>", "250");
        c.expect_ok("DATA", "354");
        c.send(b"Subject: cut\r\n\r\npartial body\r\n");
    }
    relay.wait_log("reason=client_closed");
    let (code, out, _) = queue_cmd(&relay.spool, &["stats", "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"messages\":0"), "{out}");
}

#[test]
fn idle_clients_time_out_with_421() {
    let relay = Relay::start(&["--command-timeout", "1s", "--data-timeout", "1s"]);
    let mut c = relay.client();
    c.expect("220");
    let t0 = Instant::now();
    c.expect("421 4.4.2");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert!(c.closed());
    // Inside DATA too.
    let mut d = relay.client();
    d.expect("220");
    d.expect_ok("EHLO c.test", "250");
    d.expect_ok("MAIL FROM:<a@b.test>", "250");
    d.expect_ok("RCPT TO:<x@y.test>", "250");
    d.expect_ok("DATA", "354");
    d.send(b"Subject: slow\r\n");
    d.expect("421 4.4.2");
    let (_, out, _) = queue_cmd(&relay.spool, &["stats", "--json"]);
    assert!(out.contains("\"messages\":0"), "{out}");
}

#[test]
fn max_connections_refuses_with_421() {
    let relay = Relay::start(&["--max-connections", "2"]);
    let mut a = relay.client();
    a.expect("220");
    let mut b = relay.client();
    b.expect("220");
    let mut c = relay.client();
    c.expect("421 4.3.2");
    assert!(c.closed());
    drop(a);
    // Once a slot frees up, new connections are served again.
    let t0 = Instant::now();
    loop {
        let mut d = relay.client();
        let r = d.reply();
        if r.starts_with("220") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.expect_ok("NOOP", "250");
}

#[test]
fn a_client_that_does_not_read_is_not_read_from() {
    let relay = Relay::start(&[]);
    let mut c = relay.client();
    c.expect("220");
    // Pipeline NOOPs without reading a single reply: once the replies fill the socket buffers,
    // the relay must stop reading, so our writes stall instead of its memory growing.
    c.stream.set_nonblocking(true).unwrap();
    let chunk = b"NOOP\r\n".repeat(1024);
    let mut sent = 0usize;
    let t0 = Instant::now();
    let mut stalled_since: Option<Instant> = None;
    while t0.elapsed() < Duration::from_secs(20) {
        // Resume exactly where a partial write stopped, so the command stream stays intact.
        match std::io::Write::write(&mut c.stream, &chunk[sent % 6..]) {
            Ok(n) => {
                sent += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(stalled_since.is_some(), "writes never stalled after {sent} bytes");
    assert!(sent < 64 << 20, "the relay kept reading {sent} bytes without its replies being read");
    // Every command is still answered, in order, once we read.
    c.stream.set_nonblocking(false).unwrap();
    let reply = b"250 2.0.0 Ok\r\n";
    let mut got = vec![0u8; sent / 6 * reply.len()];
    std::io::Read::read_exact(&mut c.stream, &mut got).expect("all replies");
    assert!(got.chunks(reply.len()).all(|r| r == reply), "every reply is a 250, in order");
    if !sent.is_multiple_of(6) {
        // Finish the command that was cut in the middle.
        c.send(&b"NOOP\r\n"[sent % 6..]);
        assert_eq!(c.reply(), "250 2.0.0 Ok\r\n");
    }
    c.expect_ok("QUIT", "221");
}

#[test]
fn ipv6_listener_and_json_log() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipping: no IPv6 loopback here");
        return;
    }
    let relay = Relay::start(&["--listen", "[::1]:0", "--log-format", "json"]);
    assert!(relay.addr.is_ipv6());
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let r = c.send_message("a@b.test", &["x@y.test"], b"Subject: v6\r\n\r\nhi\r\n");
    assert!(r.starts_with("250"), "{r}");
    relay.wait_log("\"event\":\"accepted\"");
    for line in relay.log().lines().filter(|l| l.starts_with('{')) {
        assert!(line.ends_with('}') && line.contains("\"ts\":") && line.contains("\"event\":"), "{line}");
    }
    assert!(relay.log().contains("\"client\":\"[::1]:"), "{}", relay.log());
}

/// Issue 12, defect 5: one address gets at most `--max-connections-per-ip` sessions (`421
/// 4.7.0` past it, logged); other addresses, and the `--allow` networks (exempt), still get in.
#[test]
fn one_address_cannot_take_every_slot() {
    if !require("python3") {
        return;
    }
    let relay = Relay::start(&["--allow", "127.0.0.1/32", "--max-connections-per-ip", "5"]);
    let script = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def greet(src):
    s = socket.create_connection((host, port), timeout=10, source_address=(src, 0))
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        line += chunk
    return s, line.decode()[:9]
flood = [greet("127.0.0.3") for _ in range(10)]
codes = [line for _, line in flood]
assert codes.count("220 mx.te") == 5 and codes.count("421 4.7.0") == 5, codes
# Another address, and an exempt one (in --allow), still get in.
assert greet("127.0.0.4")[1] == "220 mx.te"
allowed = [greet("127.0.0.1") for _ in range(10)]
assert all(line == "220 mx.te" for _, line in allowed), allowed
# Once one of its sessions ends, the address gets a slot again.
next(s for s, line in flood if line.startswith("220")).close()
for _ in range(100):
    s, line = greet("127.0.0.3")
    if line.startswith("220"):
        break
    time.sleep(0.05)
assert line.startswith("220"), line
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([relay.addr.ip().to_string(), relay.addr.port().to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("ok"), "{stdout}{}\n{}", String::from_utf8_lossy(&out.stderr), relay.log());
    relay.wait_log("event=refused client=127.0.0.3:");
    assert!(relay.log().contains("too many connections from your address"), "{}", relay.log());
}

/// Sends `bytes` one at a time, `every` apart, on a clone of the client's socket, ignoring
/// errors (the relay is expected to cut the session part way).
fn trickle(c: &Client, bytes: &'static [u8], every: Duration) -> std::thread::JoinHandle<()> {
    let mut s = c.stream.try_clone().unwrap();
    std::thread::spawn(move || {
        for b in bytes {
            if s.write_all(std::slice::from_ref(b)).is_err() {
                return;
            }
            std::thread::sleep(every);
        }
    })
}

/// Issue 12, defect 5: a command line must be whole within the command timeout (bytes alone
/// do not reset it), and DATA must keep `--min-data-rate` once `--data-timeout` has passed.
#[test]
fn trickled_commands_and_data_are_cut() {
    let relay = Relay::start(&["--command-timeout", "2s", "--data-timeout", "2s", "--min-data-rate", "100"]);
    // One byte every half second of a command line that never ends: cut at the command timeout.
    let mut c = relay.client();
    c.expect("220");
    let t0 = Instant::now();
    let writer = trickle(&c, b"NOOP aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n", Duration::from_millis(500));
    c.expect("421 4.4.2");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1800) && took < Duration::from_secs(5), "{took:?}");
    writer.join().unwrap();
    relay.wait_log("reason=command_deadline");
    // Whole commands in time keep the session alive past the timeout.
    let mut ok = relay.client();
    ok.expect("220");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1000));
        ok.expect_ok("NOOP", "250");
    }
    // DATA at 20 bytes a second against a floor of 100: cut soon after the 2 s grace.
    let mut d = relay.client();
    d.expect("220");
    d.expect_ok("EHLO c.test", "250");
    d.expect_ok("MAIL FROM:<a@b.test>", "250");
    d.expect_ok("RCPT TO:<x@y.test>", "250");
    d.expect_ok("DATA", "354");
    let t0 = Instant::now();
    let body: &'static [u8] = b"Subject: slow\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\
xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\
xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n.\r\n";
    let writer = trickle(&d, body, Duration::from_millis(50));
    d.expect("421 4.4.2");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1800) && took < Duration::from_secs(6), "{took:?}");
    writer.join().unwrap();
    relay.wait_log("reason=data_rate");
    let (_, out, _) = queue_cmd(&relay.spool, &["stats", "--json"]);
    assert!(out.contains("\"messages\":0"), "{out}");
}
