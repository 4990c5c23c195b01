//! TLS and AUTH of the instruments: `send --starttls`/`--tls`/`--auth` into `sink --starttls`/
//! `--listen-tls`/`--auth-any`, with exact counts and saved messages; the `--tls-fail` fault;
//! and Python's `smtplib`/`ssl` (OpenSSL) as a third-party client of the sink's TLS and AUTH
//! (python3 is required on CI; skipped locally when missing).

mod common;

use common::{bin, have, run_bounded, send, Daemon, TempDir};
use std::process::Command;
use std::time::Duration;

fn sink(extra: &[&str]) -> Daemon {
    let mut args = vec!["sink", "--json", "--interval", "0"];
    if !extra.contains(&"--listen-tls") {
        args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

#[test]
fn starttls_counts_are_exact() {
    let s = sink(&["--starttls"]);
    let (code, r, err) =
        send(s.addr, &["--starttls", "--connections", "4", "--messages", "300", "--rcpts", "3", "--size", "2000"]);
    let sum = s.stop_json();
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["accepted"], 300, "{r}");
    assert_eq!(r["rcpts_accepted"], 900);
    assert_eq!(r["bytes_accepted"], 600_000);
    assert_eq!(r["tls_sessions"], 4, "{r}");
    assert_eq!(r["session_errors"], 0, "{r}");
    assert_eq!(r["latency_handshake"]["count"], 4, "{r}");
    assert!(r["latency_handshake"]["p99_us"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(sum["messages"], 300);
    assert_eq!(sum["recipients"], 900);
    assert_eq!(sum["bytes"], 600_000);
    assert_eq!(sum["tls_messages"], 300, "{sum}");
    assert_eq!(sum["tls_connections"], 4, "{sum}");
    assert_eq!(sum["connections"], 4);
}

#[test]
fn plaintext_sender_is_not_counted_as_tls() {
    // STARTTLS offered but not used: nothing is counted as TLS.
    let s = sink(&["--starttls"]);
    let (code, r, err) = send(s.addr, &["--connections", "2", "--messages", "20"]);
    let sum = s.stop_json();
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["tls_sessions"], 0);
    assert_eq!(r["latency_handshake"]["count"], 0);
    assert_eq!(sum["messages"], 20);
    assert_eq!(sum["tls_messages"], 0);
}

#[test]
fn saved_messages_over_tls_are_byte_exact_and_marked() {
    let body: &[u8] = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\nlast line\r\n";
    let dir = TempDir::new("tlsbody");
    let file = dir.path().join("body.eml");
    std::fs::write(&file, body).unwrap();
    // Pipelined DATA, lockstep DATA and BDAT, each inside TLS.
    let modes: [(&[&str], &[&str]); 3] = [(&[], &[]), (&["--no-pipelining"], &[]), (&["--bdat"], &[])];
    for (send_flags, sink_flags) in modes {
        let save = TempDir::new("tlssave");
        let mut sink_args = vec!["--starttls", "--save", save.path().to_str().unwrap()];
        sink_args.extend_from_slice(sink_flags);
        let s = sink(&sink_args);
        let mut args = vec!["--starttls", "--connections", "2", "--messages", "3", "--body", file.to_str().unwrap()];
        args.extend_from_slice(send_flags);
        let (code, r, err) = send(s.addr, &args);
        let sum = s.stop_json();
        assert_eq!(code, 0, "{send_flags:?}: {err}");
        assert_eq!(r["accepted"], 3, "{send_flags:?}");
        assert_eq!(sum["tls_messages"], 3, "{send_flags:?}");
        let mut msgs = 0;
        for e in std::fs::read_dir(save.path()).unwrap() {
            let p = e.unwrap().path();
            match p.extension().and_then(|x| x.to_str()) {
                Some("msg") => {
                    assert_eq!(std::fs::read(&p).unwrap(), body, "{send_flags:?} {}", p.display());
                    msgs += 1;
                }
                Some("env") => {
                    let env = std::fs::read_to_string(&p).unwrap();
                    let (envelope, tls) = env.split_once("TLS: ").unwrap_or_else(|| panic!("no TLS line: {env:?}"));
                    let transfer = if send_flags.contains(&"--bdat") { "BDAT" } else { "DATA" };
                    assert_eq!(
                        envelope,
                        format!(
                            "MAIL FROM:<load@sluice-load.test>\nRCPT TO:<user0@example.test>\nTRANSFER: {transfer}\n"
                        )
                    );
                    assert!(tls.starts_with("TLSv1.") && tls.ends_with('\n'), "{env:?}");
                }
                _ => panic!("unexpected file {}", p.display()),
            }
        }
        assert_eq!(msgs, 3, "{send_flags:?}");
    }
}

#[test]
fn implicit_tls_to_a_listen_tls_sink() {
    let s = sink(&["--listen-tls", "127.0.0.1:0"]);
    let (code, r, err) = send(s.addr, &["--tls", "--connections", "3", "--messages", "90", "--per-connection", "10"]);
    let sum = s.stop_json();
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["accepted"], 90, "{r}");
    // At most 10 messages per connection: at least 9 connections (one more when the last
    // messages are spread over a fresh connection while another is still busy), each with its
    // own handshake, as many as the sink saw.
    let conns = r["connections"].as_u64().unwrap();
    assert!((9..=12).contains(&conns), "{r}");
    assert_eq!(r["tls_sessions"], conns, "{r}");
    assert_eq!(r["latency_handshake"]["count"], conns, "{r}");
    assert_eq!(sum["messages"], 90);
    assert_eq!(sum["tls_messages"], 90);
    assert_eq!(sum["connections"], conns);
}

#[test]
fn plaintext_sender_fails_against_an_implicit_tls_port() {
    let s = sink(&["--listen-tls", "127.0.0.1:0"]);
    let (code, r, _) = send(s.addr, &["--connections", "1", "--messages", "5", "--timeout", "300ms"]);
    drop(s);
    assert_eq!(code, 1);
    assert_eq!(r["accepted"], 0, "{r}");
}

#[test]
fn tls_fail_sink_makes_a_starttls_sender_fail_clearly() {
    let s = sink(&["--tls-fail"]);
    let (code, r, err) = send(s.addr, &["--starttls", "--connections", "2", "--messages", "10"]);
    let sum = s.stop_json();
    assert_eq!(code, 1, "{r}");
    assert!(err.contains("TLS handshake failed"), "{err}");
    assert_eq!(r["accepted"], 0);
    assert_eq!(r["sent"], 0, "no transaction starts before the session is open: {r}");
    // Each of the 2 slots gives up after 5 failed sessions in a row.
    assert_eq!(r["session_errors"], 10, "{r}");
    assert_eq!(sum["tls_failed"], 10, "{sum}");
    assert_eq!(sum["messages"], 0);
    // A plaintext sender does not care: the fault is only in the handshake.
    let s = sink(&["--tls-fail"]);
    let (code, r, err) = send(s.addr, &["--connections", "2", "--messages", "10"]);
    drop(s);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["accepted"], 10);
}

#[test]
fn starttls_sender_needs_starttls_offered() {
    let s = sink(&[]);
    let (code, r, err) = send(s.addr, &["--starttls", "--connections", "1", "--messages", "5"]);
    drop(s);
    assert_eq!(code, 1);
    assert!(err.contains("does not offer STARTTLS"), "{err}");
    assert_eq!(r["last_error"], "the server does not offer STARTTLS", "{r}");
}

#[test]
fn auth_plain_accepted_with_auth_any() {
    let save = TempDir::new("authsave");
    let s = sink(&["--starttls", "--auth-any", "--save", save.path().to_str().unwrap()]);
    let (code, r, err) =
        send(s.addr, &["--starttls", "--auth", "alice:secret:with:colons", "--connections", "2", "--messages", "4"]);
    let sum = s.stop_json();
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["accepted"], 4, "{r}");
    assert_eq!(sum["authenticated"], 2, "{sum}");
    assert_eq!(sum["tls_messages"], 4);
    let env = std::fs::read_to_string(save.path().join("00000001.env")).unwrap();
    assert!(env.contains("\nTLS: TLSv1.") && env.contains("\nAUTH: alice\nPEER: 127.0.0.1\n"), "{env:?}");
    // Without TLS too: the sink is lenient, it measures.
    let s = sink(&["--auth-any"]);
    let (code, r, err) = send(s.addr, &["--auth", "bob:pw", "--connections", "1", "--messages", "3"]);
    let sum = s.stop_json();
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["accepted"], 3);
    assert_eq!(sum["authenticated"], 1);
}

#[test]
fn auth_refused_without_auth_any_fails_the_sender_with_the_reply() {
    let s = sink(&["--starttls"]);
    let (code, r, err) = send(s.addr, &["--starttls", "--auth", "u:p", "--connections", "1", "--messages", "3"]);
    let sum = s.stop_json();
    assert_eq!(code, 1);
    assert!(err.contains("AUTH refused: 503 5.5.1"), "{err}");
    assert!(r["last_error"].as_str().unwrap().starts_with("AUTH refused: 503 5.5.1"), "{r}");
    assert_eq!(r["session_errors"], 5, "{r}");
    assert_eq!(sum["messages"], 0);
    assert_eq!(sum["authenticated"], 0);
}

#[test]
fn bad_tls_and_auth_flags_exit_2() {
    let dir = TempDir::new("flags");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["send", "--to", "127.0.0.1:1", "--starttls", "--tls"], "--tls"),
        (&["send", "--to", "127.0.0.1:1", "--auth", "no-colon"], "--auth"),
        (&["send", "--to", "127.0.0.1:1", "--auth", ":pw"], "--auth"),
        (&["sink", "--listen", "127.0.0.1:0", "--tls-cert", missing], "--tls-key"),
        (&["sink", "--listen", "127.0.0.1:0", "--tls-cert", missing, "--tls-key", missing], "--tls-cert"),
        (&["bench", "--tls", "--compare-postfix"], "--compare-postfix"),
    ];
    for (args, flag) in cases {
        let out = run_bounded(Command::new(bin()).args(args), Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}

/// Runs a Python snippet with `PORT` set; the snippet asserts and prints `ok`.
fn python(port: &str, code: &str) {
    let prelude = "import smtplib, socket, ssl, base64, sys\nPORT = int(sys.argv[1])\n\
                   CTX = ssl._create_unverified_context()\n\
                   def conn():\n    s = smtplib.SMTP('127.0.0.1', PORT, timeout=10)\n    s.ehlo('t.test')\n    return s\n";
    let out = run_bounded(
        Command::new("python3").args(["-c", &format!("{prelude}{code}\nprint('ok')"), port]),
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "python failed:\n{code}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn python_smtplib_starttls_and_auth() {
    if !have("python3") {
        return;
    }
    let s = sink(&["--starttls", "--auth-any"]);
    python(
        &s.port(),
        r#"
s = conn()
assert s.has_extn('starttls') and 'PLAIN' in s.esmtp_features['auth'], s.esmtp_features
c, m = s.starttls(context=CTX); assert c == 220, (c, m)
assert s.sock.version().startswith('TLSv1.'), s.sock.version()
s.ehlo('t.test')
assert not s.has_extn('starttls'), s.esmtp_features   # RFC 3207 4.2
c, m = s.docmd('STARTTLS'); assert (c, m[:5]) == (503, b'5.5.1'), (c, m)
c, m = s.login('alice', 'secret'); assert c == 235, (c, m)   # smtplib picks PLAIN
c, m = s.docmd('AUTH PLAIN', base64.b64encode(b'\0a\0b').decode()); assert c == 503, (c, m)
s.sendmail('a@x.test', ['b@x.test', 'c@x.test'], b'Subject: tls\r\n\r\nbody\r\n')
s.quit()
# AUTH LOGIN, step by step; then a cancelled exchange and an unknown mechanism
s = conn(); s.starttls(context=CTX); s.ehlo('t.test')
c, m = s.docmd('AUTH LOGIN'); assert (c, m) == (334, b'VXNlcm5hbWU6'), (c, m)
c, m = s.docmd(base64.b64encode(b'bob').decode()); assert (c, m) == (334, b'UGFzc3dvcmQ6'), (c, m)
c, m = s.docmd(base64.b64encode(b'pw').decode()); assert c == 235, (c, m)
s.quit()
s = conn()
c, m = s.docmd('AUTH PLAIN'); assert c == 334, (c, m)
c, m = s.docmd('*'); assert c == 501, (c, m)
c, m = s.docmd('AUTH CRAM-MD5'); assert c == 504, (c, m)
c, m = s.docmd('AUTH PLAIN', '!!notbase64'); assert c == 501, (c, m)
s.quit()
"#,
    );
    let sum = s.stop_json();
    assert_eq!(sum["messages"], 1);
    assert_eq!(sum["recipients"], 2);
    assert_eq!(sum["tls_messages"], 1);
    assert_eq!(sum["tls_connections"], 2);
    assert_eq!(sum["authenticated"], 2);
}

#[test]
fn python_commands_pipelined_behind_starttls_are_discarded() {
    if !have("python3") {
        return;
    }
    let s = sink(&["--starttls"]);
    python(
        &s.port(),
        r#"
raw = socket.create_connection(('127.0.0.1', PORT), timeout=10)
f = raw.makefile('rb')
def reply(f):
    lines = []
    while True:
        l = f.readline(); lines.append(l)
        if l[3:4] != b'-': return lines
assert reply(f)[0].startswith(b'220')
raw.sendall(b'EHLO t.test\r\n'); reply(f)
# Injected behind STARTTLS in the same segment: must never be executed inside TLS.
raw.sendall(b'STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n')
r = reply(f); assert r[0].startswith(b'220 2.0.0'), r
t = CTX.wrap_socket(raw, server_hostname='localhost')
tf = t.makefile('rb')
t.sendall(b'EHLO t.test\r\n')
r = reply(tf); assert r[0].startswith(b'250-'), r   # not the injected MAIL's reply
t.sendall(b'MAIL FROM:<a@x.test>\r\n')
r = reply(tf); assert r[0].startswith(b'250 2.1.0'), r   # no nested MAIL: the injected one is gone
t.sendall(b'QUIT\r\n'); reply(tf)
"#,
    );
    let sum = s.stop_json();
    assert_eq!(sum["tls_connections"], 1);
}

#[test]
fn python_smtp_ssl_against_listen_tls_and_tls_fail() {
    if !have("python3") {
        return;
    }
    let s = sink(&["--listen-tls", "127.0.0.1:0"]);
    python(
        &s.port(),
        r#"
s = smtplib.SMTP_SSL('127.0.0.1', PORT, timeout=10, context=CTX)
s.ehlo('t.test')
assert not s.has_extn('starttls'), s.esmtp_features
s.sendmail('a@x.test', ['b@x.test'], b'Subject: 465\r\n\r\nx\r\n')
s.quit()
"#,
    );
    let sum = s.stop_json();
    assert_eq!(sum["tls_messages"], 1);
    let s = sink(&["--tls-fail"]);
    python(
        &s.port(),
        r#"
s = conn()
assert s.has_extn('starttls'), s.esmtp_features
try:
    s.starttls(context=CTX); raise SystemExit('the handshake did not fail')
except (ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError):
    pass
"#,
    );
    let sum = s.stop_json();
    assert_eq!(sum["tls_failed"], 1);
}
