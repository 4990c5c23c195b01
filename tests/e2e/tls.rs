//! STARTTLS, implicit TLS and AUTH against the real binary: Python's `ssl`/`smtplib`, swaks,
//! and a TLS client built on the relay's own seam for the byte-level cases (pipelined
//! plaintext injection behind STARTTLS, AUTH exchanges).

use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice::net::tls::{ClientTls, TlsFlush, TlsRead, TlsSession};

use super::support::*;

/// A self-signed certificate and key for `mx.test`, written as PEM files in `dir`.
pub fn cert_pair(dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["mx.test".into(), "localhost".into()]).unwrap();
    let cert = dir.join(format!("{tag}-cert.pem"));
    let key = dir.join(format!("{tag}-key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// An auth file with `alice:secret` and `bob:hunter2`.
fn auth_file(dir: &Path) -> PathBuf {
    let mut text = String::from("# test users\n");
    for (u, p) in [("alice", "secret"), ("bob", "hunter2")] {
        text.push_str(&format!("{u}:{}\n", sluice::smtp::auth::hash_password(p.as_bytes()).unwrap()));
    }
    let path = dir.join("users");
    std::fs::write(&path, text).unwrap();
    path
}

fn b64(s: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A relay with a certificate, an implicit-TLS listener and (optionally) AUTH; loopback may
/// relay only when `allow_loopback`.
fn tls_relay(dir: &TempDir, auth: bool, allow_loopback: bool) -> Relay {
    let users = auth.then(|| auth_file(dir.path()));
    tls_relay_with(dir, users.as_deref(), allow_loopback)
}

/// [`tls_relay`] with AUTH from the given auth file, if any.
fn tls_relay_with(dir: &TempDir, users: Option<&Path>, allow_loopback: bool) -> Relay {
    let (cert, key) = cert_pair(dir.path(), "a");
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--listen-tls".into(),
        "127.0.0.1:0".into(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--tls-handshake-timeout".into(),
        "2s".into(),
    ];
    if let Some(users) = users {
        args.extend(["--auth-file".into(), users.display().to_string()]);
    }
    if !allow_loopback {
        args.extend(["--allow".into(), "192.0.2.0/24".into()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Relay::start(&refs)
}

/// A TLS SMTP client on the relay's own seam (non-blocking socket, bounded waits).
pub struct TlsClient {
    sock: TcpStream,
    tls: TlsSession,
    buf: Vec<u8>,
}

impl TlsClient {
    /// Starts TLS on `sock` (after a `220` to STARTTLS, or at once for implicit TLS).
    pub fn handshake(sock: TcpStream) -> io::Result<TlsClient> {
        sock.set_nonblocking(true)?;
        let tls = TlsSession::client(&ClientTls::unverified(), "mx.test").unwrap();
        let mut c = TlsClient { sock, tls, buf: Vec::new() };
        let t0 = Instant::now();
        while c.tls.is_handshaking() {
            c.pump()?;
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(io::ErrorKind::TimedOut.into());
            }
        }
        Ok(c)
    }

    /// Flushes, then reads what is there; sleeps briefly when nothing came.
    fn pump(&mut self) -> io::Result<()> {
        match self.tls.flush(&mut self.sock) {
            TlsFlush::Done | TlsFlush::WouldBlock => {}
            TlsFlush::Failed(e) => return Err(e),
        }
        let mut chunk = [0u8; 4096];
        match self.tls.read(&mut self.sock, &mut chunk) {
            TlsRead::Data(n) => self.buf.extend_from_slice(&chunk[..n]),
            TlsRead::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            TlsRead::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
            TlsRead::Failed(e) => return Err(io::Error::other(e.to_string())),
        }
        Ok(())
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = self.tls.write(rest);
            rest = &rest[n..];
            let _ = self.tls.flush(&mut self.sock);
        }
        let t0 = Instant::now();
        while self.tls.wants_write() && t0.elapsed() < Duration::from_secs(10) {
            let _ = self.tls.flush(&mut self.sock);
        }
    }

    /// One whole reply; panics after 10 s.
    pub fn reply(&mut self) -> String {
        let t0 = Instant::now();
        loop {
            let mut start = 0;
            while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[start..start + nl + 1];
                if line.len() < 4 || line[3] == b' ' {
                    let r = String::from_utf8_lossy(&self.buf[..start + nl + 1]).into_owned();
                    self.buf.drain(..start + nl + 1);
                    return r;
                }
                start += nl + 1;
            }
            self.pump()
                .unwrap_or_else(|e| panic!("reading reply: {e}; so far {:?}", String::from_utf8_lossy(&self.buf)));
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no reply; so far {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }
}

/// Reads (an alert, say) until EOF; true when the server closed within the read timeout.
fn closed_after_alert(s: &mut TcpStream) -> bool {
    use std::io::Read as _;
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Plain connection → EHLO → STARTTLS → TLS client.
fn starttls(addr: SocketAddr) -> TlsClient {
    let mut c = Client::connect(addr);
    c.expect("220");
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    c.expect_ok("STARTTLS", "220 2.0.0");
    TlsClient::handshake(c.stream).expect("handshake")
}

/// Put before every Python script: the modules they use and a client TLS context that accepts
/// the test's self-signed certificate.
const PY_PRELUDE: &str = "import hashlib, smtplib, socket, ssl, sys, threading, time
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
";

/// `python3 -c PRELUDE+script args...`.
fn python_cmd(script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(format!("{PY_PRELUDE}{script}")).args(args);
    cmd
}

fn python(script: &str, args: &[&str]) -> String {
    let out = python_cmd(script, args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "python failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn python_starttls_delivers_and_received_says_esmtps() {
    if !require("python3") {
        return;
    }
    let dir = TempDir::new("tls-py");
    let relay = tls_relay(&dir, false, true);
    let script = r#"
with smtplib.SMTP(sys.argv[1], int(sys.argv[2]), local_hostname="py.test") as s:
    s.ehlo()
    assert s.has_extn("starttls"), s.esmtp_features
    s.starttls(context=ctx)
    s.ehlo()
    assert not s.has_extn("starttls"), s.esmtp_features
    assert not s.has_extn("auth"), s.esmtp_features
    print(s.sock.version())
    r = s.sendmail("a@example.test", ["b@example.test"], b"Subject: over tls\r\n\r\nhello\r\n")
    assert r == {}, r
"#;
    let out = python(script, &[&relay.addr.ip().to_string(), &relay.addr.port().to_string()]);
    assert!(out.starts_with("TLSv1."), "{out}");
    let msgs = spool_messages(&relay.spool);
    assert_eq!(msgs.len(), 1);
    let text = String::from_utf8_lossy(&msgs[0].1);
    assert!(text.contains("with ESMTPS id"), "{text}");
    assert!(text.contains("(using TLSv1."), "{text}");
    assert!(relay.log().contains("event=tls "), "{}", relay.log());
}

#[test]
fn python_implicit_tls_and_auth_relays_only_when_authenticated() {
    if !require("python3") {
        return;
    }
    let dir = TempDir::new("tls-auth");
    let relay = tls_relay(&dir, true, false);
    let tls_addr = relay.addrs[1];
    let script = r#"
host, port = sys.argv[1], int(sys.argv[2])
with smtplib.SMTP_SSL(host, port, context=ctx, local_hostname="py.test") as s:
    s.ehlo()
    assert s.has_extn("auth"), s.esmtp_features
    assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
    # Not authenticated yet and not in --allow: relaying is refused.
    try:
        s.sendmail("a@example.test", ["b@example.test"], b"Subject: x\r\n\r\nx\r\n")
        sys.exit("relayed without auth")
    except smtplib.SMTPRecipientsRefused as e:
        assert e.recipients["b@example.test"][0] == 554, e
    try:
        s.login("alice", "wrong")
        sys.exit("wrong password accepted")
    except smtplib.SMTPAuthenticationError as e:
        assert e.smtp_code == 535 and b"5.7.8" in e.smtp_error, e
    try:
        s.login("mallory", "secret")
        sys.exit("unknown user accepted")
    except smtplib.SMTPAuthenticationError as e:
        assert e.smtp_code == 535 and b"5.7.8" in e.smtp_error, e
    s.login("alice", "secret")
    r = s.sendmail("a@example.test", ["b@example.test"], b"Subject: authed\r\n\r\nhi\r\n", mail_options=["AUTH=<>"])
    assert r == {}, r
# LOGIN mechanism on a fresh session.
with smtplib.SMTP_SSL(host, port, context=ctx) as s:
    s.ehlo()
    s.user, s.password = "bob", "hunter2"
    code, resp = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
    assert code == 235, (code, resp)
print("ok")
"#;
    let out = python(script, &[&tls_addr.ip().to_string(), &tls_addr.port().to_string()]);
    assert_eq!(out.trim(), "ok");
    let msgs = spool_messages(&relay.spool);
    assert_eq!(msgs.len(), 1);
    let text = String::from_utf8_lossy(&msgs[0].1);
    assert!(text.contains("with ESMTPSA id"), "{text}");
    let log = relay.log();
    assert!(log.contains("user=alice"), "{log}");
}

#[test]
fn auth_before_tls_is_refused_and_auth_exchanges_follow_rfc_4954() {
    let dir = TempDir::new("tls-authx");
    let relay = tls_relay(&dir, true, false);
    let mut c = relay.client();
    c.expect("220");
    let ehlo = c.cmd("EHLO client.test");
    assert!(!ehlo.contains("AUTH"), "AUTH offered in the clear: {ehlo}");
    c.expect_ok("AUTH PLAIN AGFsaWNlAHNlY3JldA==", "538 5.7.11");
    c.expect_ok("STARTTLS", "220 2.0.0");
    let mut t = TlsClient::handshake(c.stream).unwrap();
    // A new EHLO is required after STARTTLS.
    assert!(t.cmd("MAIL FROM:<a@example.test>").starts_with("503"));
    let ehlo = t.cmd("EHLO client.test");
    assert!(ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(t.cmd("STARTTLS").starts_with("503 5.5.1"));
    assert!(t.cmd("AUTH CRAM-MD5").starts_with("504 5.5.4"));
    assert!(t.cmd("AUTH PLAIN !!!notbase64").starts_with("501 5.5.2"));
    assert!(t.cmd("AUTH PLAIN").starts_with("334 "));
    assert!(t.cmd("*").starts_with("501 5.0.0"));
    assert!(t.cmd("AUTH LOGIN").starts_with("334 VXNlcm5hbWU6"));
    assert!(t.cmd(&b64(b"alice")).starts_with("334 UGFzc3dvcmQ6"));
    assert!(t.cmd(&b64(b"secret")).starts_with("235 2.7.0"));
    assert!(t.cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0secret"))).starts_with("503 5.5.1"));
    assert!(t.cmd("MAIL FROM:<a@example.test>").starts_with("250"));
    assert!(t.cmd("RCPT TO:<b@example.test>").starts_with("250"));
    assert!(t.cmd("QUIT").starts_with("221"));
}

/// An auth-file line made by `sluice passwd USER` with `pass` on its stdin.
fn passwd_line(user: &str, pass: &[u8]) -> String {
    let (code, out, err) = passwd(user, &[pass, b"\n"].concat());
    assert_eq!(code, 0, "sluice passwd: {err}");
    out
}

/// RFC 4954 §4: AUTH lines may be up to 12,288 octets. A ~5,000-byte password fits both the
/// AUTH command line (PLAIN with an initial response, some 6,700 octets) and a response line
/// (PLAIN after an empty challenge, LOGIN), through STARTTLS and implicit TLS; a password too
/// long for that gets `500 5.5.6` and the session carries on.
#[test]
fn python_smtplib_authenticates_with_a_5000_byte_password() {
    if !require("python3") {
        return;
    }
    let dir = TempDir::new("tls-longpw");
    let pass: String = (0..5000).map(|i| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789+/-_.!"[i % 42])).collect();
    let users = dir.path().join("users");
    std::fs::write(&users, passwd_line("carol", pass.as_bytes())).unwrap();
    let relay = tls_relay_with(&dir, Some(&users), false);
    let script = r#"
host, port, tls_port, pw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
assert len(pw) == 5000
def send(s, subject):
    r = s.sendmail("a@example.test", ["b@example.test"], b"Subject: " + subject + b"\r\n\r\nhi\r\n")
    assert r == {}, r
# STARTTLS, then PLAIN with the initial response on the AUTH line itself.
with smtplib.SMTP(host, port, local_hostname="py.test") as s:
    s.starttls(context=ctx)
    s.ehlo()
    s.user, s.password = "carol", pw
    code, resp = s.auth("PLAIN", s.auth_plain)
    assert code == 235, (code, resp)
    send(s, b"plain-initial")
# Implicit TLS: PLAIN after an empty challenge, and LOGIN: the password on a response line.
for mech, auth in [("PLAIN", "auth_plain"), ("LOGIN", "auth_login")]:
    with smtplib.SMTP_SSL(host, tls_port, context=ctx) as s:
        s.ehlo()
        s.user, s.password = "carol", pw
        code, resp = s.auth(mech, getattr(s, auth), initial_response_ok=False)
        assert code == 235, (mech, code, resp)
        send(s, mech.encode())
# Over 12,288 octets: 500 5.5.6 for each mechanism smtplib tries, then the session goes on.
with smtplib.SMTP_SSL(host, tls_port, context=ctx) as s:
    try:
        s.login("carol", pw * 2)
        sys.exit("a 10,000-byte password went through")
    except smtplib.SMTPAuthenticationError as e:
        assert e.smtp_code == 500 and b"5.5.6" in e.smtp_error, e
    assert s.noop()[0] == 250
    s.login("carol", pw)
    send(s, b"after-too-long")
print("ok")
"#;
    let (host, port, tls_port) =
        (relay.addr.ip().to_string(), relay.addr.port().to_string(), relay.addrs[1].port().to_string());
    let out = python_cmd(script, &[&host, &port, &tls_port, &pass]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        relay.log()
    );
    assert_eq!(spool_messages(&relay.spool).len(), 4);
    assert!(relay.log().contains("user=carol"), "{}", relay.log());
}

#[test]
fn plaintext_pipelined_behind_starttls_is_discarded() {
    let dir = TempDir::new("tls-inject");
    let relay = tls_relay(&dir, false, true);
    let mut c = relay.client();
    c.expect("220");
    c.cmd("EHLO client.test");
    // CVE-2011-0411 class: commands injected after STARTTLS in the same packet.
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@example.test>\r\nRSET\r\n");
    c.expect("220 2.0.0");
    let mut t = TlsClient::handshake(c.stream).unwrap();
    // Had MAIL been executed, this EHLO would not be the next reply, and NOOP's 250 would
    // follow the two injected replies.
    let ehlo = t.cmd("EHLO client.test");
    assert!(ehlo.starts_with("250-mx.test"), "{ehlo}");
    assert_eq!(t.cmd("NOOP"), "250 2.0.0 Ok\r\n");
    assert!(t.cmd("MAIL FROM:<good@example.test>").starts_with("250"), "MAIL refused: injected MAIL ran");
}

#[test]
fn tls_errors_close_one_session_and_the_relay_goes_on() {
    let dir = TempDir::new("tls-err");
    let relay = tls_relay(&dir, false, true);
    let tls_addr = relay.addrs[1];
    // Plaintext on the implicit-TLS port.
    let mut c = Client::connect(tls_addr);
    c.send(b"EHLO plain.test\r\n");
    assert!(closed_after_alert(&mut c.stream), "plaintext on the TLS port not closed");
    // Garbage after STARTTLS.
    let mut c = relay.client();
    c.expect("220");
    c.cmd("EHLO client.test");
    c.expect_ok("STARTTLS", "220");
    c.send(b"\x16\x03\x01\x00\x05garbage-garbage-garbage");
    assert!(closed_after_alert(&mut c.stream), "garbage handshake not closed");
    // Truncated: connect to the TLS port and hang up mid-handshake.
    let s = TcpStream::connect(tls_addr).unwrap();
    (&s).write_all(b"\x16\x03\x01\x02\x00\x01").unwrap();
    drop(s);
    // A silent client on the TLS port is dropped after --tls-handshake-timeout.
    let mut silent = Client::connect(tls_addr);
    let t0 = Instant::now();
    assert!(silent.closed());
    assert!(t0.elapsed() < Duration::from_secs(8), "handshake timeout not enforced");
    // Still serving, over TLS too.
    let mut t = TlsClient::handshake(TcpStream::connect(tls_addr).unwrap()).unwrap();
    assert!(t.reply().starts_with("220 mx.test"));
    assert!(t.cmd("EHLO x.test").starts_with("250"));
    let mut p = relay.client();
    p.expect("220");
    assert!(p.cmd("NOOP").starts_with("250"));
    relay.wait_log("handshake timeout");
    let log = relay.log();
    assert!(log.matches("event=tls_error").count() >= 3, "{log}");
}

#[test]
fn bad_certificate_flags_exit_2_naming_the_flag() {
    let dir = TempDir::new("tls-flags");
    let (cert, key) = cert_pair(dir.path(), "a");
    let (_, other_key) = cert_pair(dir.path(), "b");
    let missing = dir.path().join("missing.pem");
    let users = auth_file(dir.path());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--tls-cert".into(), cert.display().to_string()], "--tls-cert"),
        (
            vec!["--tls-cert".into(), cert.display().to_string(), "--tls-key".into(), missing.display().to_string()],
            "--tls-key",
        ),
        (
            vec!["--tls-cert".into(), missing.display().to_string(), "--tls-key".into(), key.display().to_string()],
            "--tls-cert",
        ),
        (
            vec!["--tls-cert".into(), cert.display().to_string(), "--tls-key".into(), other_key.display().to_string()],
            "--tls-cert/--tls-key",
        ),
        (vec!["--listen-tls".into(), "127.0.0.1:0".into()], "--listen-tls"),
        (vec!["--auth-file".into(), users.display().to_string()], "--auth-file"),
    ];
    for (args, flag) in cases {
        let out = Command::new(sluice_bin())
            .arg("serve")
            .arg("--spool")
            .arg(dir.path().join("spool"))
            .args(["--listen", "127.0.0.1:0", "--hold", "--dns", "127.0.0.1:1"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&format!("'{flag}'")), "{args:?}: {err}");
    }
    // A malformed auth file names the file and line.
    let bad = dir.path().join("bad-users");
    std::fs::write(&bad, "alice:$argon2id$nonsense\n").unwrap();
    let out = Command::new(sluice_bin())
        .arg("serve")
        .arg("--spool")
        .arg(dir.path().join("spool"))
        .args(["--listen", "127.0.0.1:0", "--hold", "--dns", "127.0.0.1:1", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--auth-file")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad-users") && err.contains('1'), "{err}");
}

#[test]
fn sighup_reloads_the_certificate_for_new_sessions_only() {
    if !require("python3") {
        return;
    }
    let dir = TempDir::new("tls-hup");
    let relay = tls_relay(&dir, false, true);
    let tls_addr = relay.addrs[1];
    let fingerprint = r#"
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as raw:
    with ctx.wrap_socket(raw, server_hostname="mx.test") as s:
        print(hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest())
"#;
    let args = [tls_addr.ip().to_string(), tls_addr.port().to_string()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let before = python(fingerprint, &args);
    // An open session keeps its pair across the reload.
    let mut open = starttls(relay.addr);
    // Overwrite the files with a new pair and reload.
    let (new_cert, new_key) = cert_pair(dir.path(), "next");
    std::fs::copy(&new_cert, dir.path().join("a-cert.pem")).unwrap();
    std::fs::copy(&new_key, dir.path().join("a-key.pem")).unwrap();
    relay.signal("HUP");
    relay.wait_log("event=reload tls=ok");
    let after = python(fingerprint, &args);
    assert_ne!(before, after, "certificate not reloaded");
    assert!(open.cmd("EHLO still.test").starts_with("250"));
    // A bad pair is refused and the current one stays.
    std::fs::write(dir.path().join("a-key.pem"), "not a key").unwrap();
    relay.signal("HUP");
    relay.wait_log("failed, keeping the old pair");
    assert_eq!(python(fingerprint, &args), after);
}

#[test]
fn swaks_starttls_and_tls_on_connect_with_auth() {
    if !require("swaks") {
        return;
    }
    let dir = TempDir::new("tls-swaks");
    let relay = tls_relay(&dir, true, false);
    let run = |extra: &[&str], addr: SocketAddr| {
        let out = Command::new("swaks")
            .args(["--server", &addr.to_string(), "--from", "a@example.test", "--to", "b@example.org"])
            .args(["--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "secret", "--timeout", "20"])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "swaks {extra:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let a = run(&["--tls"], relay.addr);
    assert!(a.contains("<~  235 2.7.0"), "{a}");
    let b = run(&["--tls-on-connect"], relay.addrs[1]);
    assert!(b.contains("<~  250 2.0.0 Ok: queued as"), "{b}");
    assert_eq!(spool_messages(&relay.spool).len(), 2);
}

#[test]
fn repeated_auth_failures_slow_down_then_block_only_that_address() {
    if !require("python3") {
        return;
    }
    let dir = TempDir::new("tls-brute");
    let relay = tls_relay(&dir, true, false);
    let tls_addr = relay.addrs[1];
    let script = r#"
host, port = sys.argv[1], int(sys.argv[2])
def session(src):
    s = smtplib.SMTP_SSL(host, port, context=ctx, source_address=(src, 0), timeout=20)
    s.ehlo()
    return s
s = session("127.0.0.1")
times = []
blocked = False
for i in range(12):
    t0 = time.monotonic()
    try:
        s.login("alice", "wrong%d" % i)
        sys.exit("wrong password accepted")
    except smtplib.SMTPAuthenticationError as e:
        times.append(time.monotonic() - t0)
        if e.smtp_code == 421:
            blocked = True
            break
        assert e.smtp_code == 535, e
    except smtplib.SMTPServerDisconnected:
        blocked = True
        break
assert blocked, times
assert len(times) <= 10, times
# The first failures are answered at once, later ones more slowly.
assert times[-1] > times[0] + 0.2, times
# The right password from the blocked address is still refused ...
s = session("127.0.0.1")
try:
    s.login("alice", "secret")
    sys.exit("blocked address authenticated")
except (smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected) as e:
    assert getattr(e, "smtp_code", 421) == 421, e
# ... while another address authenticates, and that does not unblock the first.
s = session("127.0.0.2")
s.login("alice", "secret")
s.quit()
s = session("127.0.0.1")
try:
    s.login("alice", "secret")
    sys.exit("success elsewhere reset the counter")
except (smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected) as e:
    assert getattr(e, "smtp_code", 421) == 421, e
print("ok", ["%.2f" % t for t in times])
"#;
    let out = python(script, &[&tls_addr.ip().to_string(), &tls_addr.port().to_string()]);
    assert!(out.starts_with("ok"), "{out}");
    assert!(relay.log().contains("result=blocked"), "{}", relay.log());
}

#[test]
fn sessions_keep_being_served_while_auth_hashes_run() {
    if !require("python3") {
        return;
    }
    let dir = TempDir::new("tls-authload");
    let relay = tls_relay(&dir, true, true);
    let tls_addr = relay.addrs[1];
    // 100 AUTH attempts in flight at once (each an Argon2 verification off the loop), from
    // 127.0.0.x addresses so the brute-force limit does not cut them short; meanwhile a plain
    // session times NOOP round trips.
    let script = r#"
host, port = sys.argv[1], int(sys.argv[2])
ready = threading.Barrier(101)
def attempt(i):
    s = smtplib.SMTP_SSL(host, port, context=ctx, source_address=("127.0.1.%d" % (i + 1), 0), timeout=60)
    s.ehlo()
    ready.wait()
    try:
        s.login("alice", "secret" if i % 2 else "wrong")
    except smtplib.SMTPAuthenticationError:
        pass
    s.close()
threads = [threading.Thread(target=attempt, args=(i,)) for i in range(100)]
for t in threads: t.start()
ready.wait()
for t in threads: t.join()
print("done")
"#;
    let mut probe = relay.client();
    probe.expect("220");
    probe.cmd("EHLO probe.test");
    let args = [tls_addr.ip().to_string(), tls_addr.port().to_string()];
    let child = python_cmd(script, &[&args[0], &args[1]]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // Wait until the worker is busy, then sample.
    let t0 = Instant::now();
    while !relay.log().contains("event=auth client") && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut lat = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(500) {
        let t = Instant::now();
        assert!(probe.cmd("NOOP").starts_with("250"));
        lat.push(t.elapsed());
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let verified = relay.log().matches("event=auth client").count();
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    eprintln!("NOOP round trips: {} samples, p99 {p99:?}, max {:?}; {verified} AUTHs", lat.len(), lat.last().unwrap());
    // One Argon2 verification takes tens of milliseconds, so a loop that ran them inline would
    // show round trips of seconds here; the SLA figure (p99 < 10 ms) comes from the bench.
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    // smtplib tries PLAIN, then LOGIN, after a failure: 50 + 2 × 50 verifications.
    assert_eq!(verified, 150);
}

/// Issue 12, defect 4: many parallel guesses from one address get no more checks than its
/// failure budget (a check in flight counts against it), the right password after the budget
/// is spent is refused, and another address is served promptly while the flood goes on.
#[test]
fn parallel_auth_guesses_stay_within_the_budget_and_other_addresses_go_first() {
    if !require("python3") {
        return;
    }
    let dir = TempDir::new("tls-flood");
    let relay = tls_relay(&dir, true, false);
    let tls_addr = relay.addrs[1];
    let script = r#"
import base64
host, port = sys.argv[1], int(sys.argv[2])
def plain(pw):
    return "PLAIN " + base64.b64encode(b"\0alice\0" + pw.encode()).decode()
def session(src):
    s = smtplib.SMTP_SSL(host, port, context=ctx, source_address=(src, 0), timeout=30)
    s.ehlo()
    return s
def auth(s, pw):
    try:
        return s.docmd("AUTH", plain(pw))[0]
    except smtplib.SMTPServerDisconnected:
        return 421
N = 40
ready = threading.Barrier(N + 2)
codes, lock, other = [], threading.Lock(), {}
def flood(i):
    s = session("127.0.0.1")
    ready.wait()
    for n in range(60):
        # One session tries the right password in the middle of the flood.
        code = auth(s, "secret" if i == N // 2 and n == 1 else "wrong%d-%d" % (i, n))
        with lock:
            codes.append(code)
        if code in (235, 421):
            break
        assert code in (454, 535), code
        if code == 454:
            time.sleep(0.02)
    s.close()
def elsewhere():
    s = session("127.0.0.2")
    ready.wait()
    time.sleep(0.3)
    t0 = time.monotonic()
    other["code"] = auth(s, "secret")
    other["secs"] = time.monotonic() - t0
    s.quit()
threads = [threading.Thread(target=flood, args=(i,)) for i in range(N)]
threads.append(threading.Thread(target=elsewhere))
for t in threads: t.start()
ready.wait()
for t in threads: t.join()
assert other.get("code") == 235, other
# The budget is spent: the right password from the flooding address is refused.
s = session("127.0.0.1")
code = auth(s, "secret")
assert code == 421, code
print("ok %.3f" % other["secs"], {c: codes.count(c) for c in set(codes)})
"#;
    let out = python(script, &[&tls_addr.ip().to_string(), &tls_addr.port().to_string()]);
    eprintln!("{out}");
    let log = relay.log();
    let checked = |result: &str| {
        log.lines()
            .filter(|l| l.contains("event=auth client=127.0.0.1") && l.contains(&format!("result={result} ")))
            .count()
    };
    assert!(
        checked("failed") <= 10 && checked("ok") <= 1,
        "failed {}, ok {}:\n{log}",
        checked("failed"),
        checked("ok")
    );
    assert!(log.contains("result=busy"), "{log}");
    let secs: f64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    // One or two Argon2 checks ahead of it at most (tens of milliseconds each); without a fair
    // queue it waited behind the whole flood.
    assert!(secs < 1.0, "the other address waited {secs} s");
}
