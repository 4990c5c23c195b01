//! Opportunistic STARTTLS on delivery (`--outbound-tls may|encrypt|verify`): a destination
//! offering STARTTLS gets the message inside TLS (Python aiosmtpd with a certificate made
//! here), a destination whose handshake breaks gets it in plaintext on a second connection,
//! and the mandatory levels defer with 4.7.x when TLS (or a verified certificate) is missing.
//! Loopback only: relays use `--relay-host` or their own `sluice-load dns`; every wait is
//! bounded.

use super::support::*;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Python 3 with aiosmtpd: required on CI (.ci/run installs it), else the test skips.
pub fn have_aiosmtpd() -> bool {
    if !require("python3") {
        return false;
    }
    let ok = Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("python3 -m aiosmtpd is required on CI (.ci/run installs it)");
        }
        eprintln!("skipping: python3 aiosmtpd not installed (pip install aiosmtpd)");
    }
    ok
}

/// A child process killed on drop, with its stdout lines collected.
pub struct Peer {
    child: Child,
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    /// Runs `cmd`, whose first stdout line must be `PORT n`.
    pub fn spawn(mut cmd: Command) -> Peer {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().expect("spawn test server");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines2 = lines.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(p) = line.strip_prefix("PORT ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(p.trim().parse::<u16>().unwrap());
                    }
                    continue;
                }
                lines2.lock().unwrap().push(line);
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                panic!("test server did not start");
            }
        };
        Peer { child, port, lines }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (bounded) for `n` lines containing `needle`.
    pub fn wait_lines(&self, needle: &str, n: usize, relay: &Relay) -> Vec<String> {
        let t0 = Instant::now();
        loop {
            let got: Vec<String> = self.lines().into_iter().filter(|l| l.contains(needle)).collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "server printed {:?}; relay log:\n{}",
                self.lines(),
                relay.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// aiosmtpd on `ip` (port chosen by the kernel) offering STARTTLS with `cert`/`key`; prints one
/// JSON line per message: whether it came inside TLS, the TLS version, envelope and content.
const AIOSMTPD: &str = r#"
import asyncio, json, ssl, sys
from aiosmtpd.smtp import SMTP
cert, key, ip = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
class Handler:
    async def handle_DATA(self, server, session, envelope):
        tls = session.ssl is not None
        obj = session.ssl.get("ssl_object") if tls else None
        data = envelope.content
        print(json.dumps({"msg": True, "tls": tls, "version": obj.version() if obj else None,
                          "from": envelope.mail_from, "rcpts": envelope.rcpt_tos, "len": len(data),
                          "head": data[:2048].decode("utf-8", "replace"),
                          "tail": data[-64:].decode("utf-8", "replace")}), flush=True)
        return "250 2.0.0 Ok: stored"
async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: SMTP(Handler(), hostname="mx.tls.test", tls_context=ctx, require_starttls=False), ip, 0)
    print("PORT", srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"#;

/// A server that offers STARTTLS, answers `220` and then sends garbage instead of a TLS
/// handshake; on later connections it speaks plain SMTP (still offering STARTTLS, to catch a
/// client that tries again). Prints a JSON line per message and per closed connection.
const BROKEN_TLS: &str = r#"
import json, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(16); s.settimeout(0.2)
print("PORT", s.getsockname()[1], flush=True)
n = 0; end = time.time() + 60
while time.time() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    n += 1; c.settimeout(10); f = c.makefile("rb")
    send = lambda t: c.sendall(t.encode())
    starttls = False; mail = None; rcpts = []
    try:
        send("220 broken.test ESMTP\r\n")
        while True:
            line = f.readline()
            if not line:
                break
            cmd = line.decode("utf-8", "replace").strip(); verb = cmd.split(" ")[0].upper()
            if verb in ("EHLO", "HELO"):
                send("250-broken.test\r\n250-8BITMIME\r\n250 STARTTLS\r\n")
            elif verb == "STARTTLS":
                starttls = True
                send("220 2.0.0 Ready to start TLS\r\n")
                f.read1(4096)
                c.sendall(b"this is not a TLS record\r\n")
                break
            elif verb == "MAIL":
                mail = cmd; send("250 2.1.0 ok\r\n")
            elif verb == "RCPT":
                rcpts.append(cmd); send("250 2.1.5 ok\r\n")
            elif verb == "DATA":
                send("354 go ahead\r\n"); data = b""
                while True:
                    l = f.readline()
                    if not l or l == b".\r\n":
                        break
                    data += l
                print(json.dumps({"msg": True, "conn": n, "starttls": starttls, "mail": mail, "rcpts": rcpts,
                                  "data": data.decode("utf-8", "replace")}), flush=True)
                send("250 2.0.0 queued\r\n")
            elif verb == "QUIT":
                send("221 2.0.0 bye\r\n"); break
            else:
                send("250 2.0.0 ok\r\n")
    except Exception as e:
        print(json.dumps({"error": str(e), "conn": n}), flush=True)
    c.close()
    print(json.dumps({"closed": n, "starttls": starttls}), flush=True)
"#;

/// A self-signed certificate for `name`, written as `<tag>-cert.pem` and `<tag>-key.pem`.
pub fn cert_files(dir: &Path, tag: &str, name: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let cert = dir.join(format!("{tag}-cert.pem"));
    let key = dir.join(format!("{tag}-key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

fn aiosmtpd(cert: &Path, key: &Path, ip: &str) -> Peer {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(AIOSMTPD).arg(cert).arg(key).arg(ip).stderr(Stdio::null());
    Peer::spawn(cmd)
}

/// A child process killed on drop.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sluice-load sink` (no STARTTLS) on 127.0.0.1, saving what it accepts.
struct Sink {
    _child: Kid,
    addr: String,
    dir: TempDir,
}

fn load_child(bin: &Path, args: &[String]) -> (Kid, String) {
    let mut child = Kid(Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
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
    let addr = rx.recv_timeout(Duration::from_secs(20)).expect("sluice-load did not start");
    (child, addr)
}

fn sink(bin: &Path) -> Sink {
    let dir = TempDir::new("tls-sink");
    let args: Vec<String> = ["sink", "--listen", "127.0.0.1:0", "--interval", "0", "--save"]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().display().to_string()])
        .collect();
    let (child, addr) = load_child(bin, &args);
    Sink { _child: child, addr, dir }
}

fn saved_count(sink: &Sink) -> usize {
    std::fs::read_dir(sink.dir.path())
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "msg")).count())
        .unwrap_or(0)
}

/// Submits one message to the relay; returns its queue id.
pub fn submit(relay: &Relay, to: &str, body: &str) -> String {
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let r = c.send_message("a@src.test", &[to], body.as_bytes());
    assert!(r.starts_with("250 "), "{r}");
    queue_id(&r)
}

/// The relay's `event=delivery` lines.
pub fn delivery_lines(relay: &Relay) -> Vec<String> {
    relay.log().lines().filter(|l| l.contains("event=delivery")).map(str::to_string).collect()
}

#[test]
fn starttls_offered_delivers_inside_tls() {
    if !have_aiosmtpd() {
        return;
    }
    let dir = TempDir::new("tls-out-ok");
    let (cert, key) = cert_files(dir.path(), "mx", "mx.tls.test");
    let server = aiosmtpd(&cert, &key, "127.0.0.1");
    let relay = Relay::start(&["--relay-host", &format!("127.0.0.1:{}", server.port), "--dns", "127.0.0.1:9"]);
    let id = submit(&relay, "x@dst.test", "Subject: over tls\r\n\r\nsecret body\r\n");
    let got = server.wait_lines("\"msg\"", 1, &relay);
    assert!(got[0].contains("\"tls\": true"), "not inside TLS: {}", got[0]);
    assert!(got[0].contains("\"version\": \"TLSv1.3\""), "{}", got[0]);
    assert!(got[0].contains("x@dst.test") && got[0].contains("secret body") && got[0].contains(&id), "{}", got[0]);
    // A 3 MiB message streams through TLS (backpressure on the encrypted side) intact.
    let mut big = String::from("Subject: big over tls\r\n\r\n");
    let mut i = 0;
    while big.len() < 3 << 20 {
        big.push_str(&format!("line {i:08} {}\r\n", "y".repeat(70)));
        i += 1;
    }
    big.push_str("the end\r\n");
    submit(&relay, "x@dst.test", &big);
    let got = server.wait_lines("\"msg\"", 2, &relay);
    assert!(
        got[1].contains("\"tls\": true") && got[1].contains("the end\\r\\n\""),
        "{}",
        &got[1][..300.min(got[1].len())]
    );
    let len: usize = got[1].split("\"len\": ").nth(1).and_then(|s| s.split(',').next()).unwrap().parse().unwrap();
    assert!(len > big.len() && len < big.len() + 1024, "{len} bytes delivered for {}", big.len());
    relay.wait_log("outcome=delivered");
    let lines = delivery_lines(&relay);
    assert!(lines.iter().all(|l| l.contains("tls=TLSv1.3") && l.contains("outcome=delivered")), "{lines:?}");
    let log = relay.log();
    assert!(log.contains("event=tls host=127.0.0.1") && log.contains("version=TLSv1.3"), "{log}");
    assert!(!log.contains("tls_fallback"), "{log}");
}

#[test]
fn broken_handshake_falls_back_to_plaintext_once() {
    if !require("python3") {
        return;
    }
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(BROKEN_TLS);
    let server = Peer::spawn(cmd);
    let relay = Relay::start(&[
        "--relay-host",
        &format!("127.0.0.1:{}", server.port),
        "--dns",
        "127.0.0.1:9",
        "--retry-schedule",
        "1h",
    ]);
    submit(&relay, "y@dst.test", "Subject: fallback\r\n\r\nplain body\r\n");
    let got = server.wait_lines("\"msg\"", 1, &relay);
    // The handshake broke on the first connection; the second one is plaintext and never
    // tries STARTTLS again, although it is still offered.
    assert!(got[0].contains("\"conn\": 2") && got[0].contains("\"starttls\": false"), "{got:?}");
    assert!(got[0].contains("plain body"), "{}", got[0]);
    let closed = server.wait_lines("\"closed\": 1", 1, &relay);
    assert!(closed[0].contains("\"starttls\": true"), "{closed:?}");
    relay.wait_log("outcome=delivered");
    let log = relay.log();
    let fallback: Vec<&str> = log.lines().filter(|l| l.contains("event=tls_fallback")).collect();
    assert_eq!(fallback.len(), 1, "{log}");
    assert!(fallback[0].contains("TLS handshake failed") && fallback[0].contains("plaintext"), "{}", fallback[0]);
    // The retry is not an attempt: delivered on the first, and no deferral was logged.
    let lines = delivery_lines(&relay);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("tls=none") && lines[0].contains("attempt=1 outcome=delivered"), "{}", lines[0]);
    // A second message goes plaintext at once (reused connection or a remembered failure).
    submit(&relay, "z@dst.test", "Subject: again\r\n\r\nsecond body\r\n");
    server.wait_lines("\"msg\"", 2, &relay);
    assert_eq!(relay.log().matches("event=tls_fallback").count(), 1, "{}", relay.log());
    assert_eq!(server.lines().iter().filter(|l| l.contains("\"starttls\": true")).count(), 1, "{:?}", server.lines());
}

#[test]
fn encrypt_without_starttls_defers_with_4_7_4() {
    let Some(bin) = load_bin() else { return };
    let sink = sink(&bin);
    let relay = Relay::start(&[
        "--relay-host",
        &sink.addr,
        "--dns",
        "127.0.0.1:9",
        "--outbound-tls",
        "encrypt",
        "--retry-schedule",
        "1h",
    ]);
    let id = submit(&relay, "w@dst.test", "Subject: must be encrypted\r\n\r\nbody\r\n");
    relay.wait_log("outcome=deferred");
    let lines = delivery_lines(&relay);
    assert!(lines[0].contains("4.7.4") && lines[0].contains("TLS required but not offered by host"), "{lines:?}");
    assert!(lines[0].contains("tls=none"), "{}", lines[0]);
    assert!(relay.log().contains("event=tls_error"), "{}", relay.log());
    // Nothing went out in the clear, and the queue keeps the message.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(saved_count(&sink), 0);
    let (_, list, _) = queue_cmd(&relay.spool, &["list"]);
    assert!(list.contains(&id) && list.contains("w@dst.test deferred") && list.contains("4.7.4"), "{list}");
}

#[test]
fn verify_defers_with_an_unknown_ca_and_delivers_with_the_right_one() {
    let Some(bin) = load_bin() else { return };
    if !have_aiosmtpd() {
        return;
    }
    let dir = TempDir::new("tls-out-verify");
    let (cert, key) = cert_files(dir.path(), "mx", "mx.tls.test");
    let (other_ca, _) = cert_files(dir.path(), "other", "mx.tls.test");
    let server = aiosmtpd(&cert, &key, "127.0.0.13");
    let args: Vec<String> = ["dns", "--listen", "127.0.0.1:0", "--ttl", "60"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--mx".into(), "tls.test=10:mx.tls.test".into(), "--a".into(), "mx.tls.test=127.0.0.13".into()])
        .collect();
    let (_dns, dns_addr) = load_child(&bin, &args);
    let spool = dir.path().join("spool");
    let flags = |ca: &Path| -> Vec<String> {
        [
            "--dns",
            &dns_addr,
            "--smtp-port",
            &server.port.to_string(),
            "--outbound-tls",
            "verify",
            "--tls-ca-file",
            &ca.display().to_string(),
            "--retry-schedule",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let wrong = flags(&other_ca);
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    let mut relay = Relay::start_on(&spool, &wrong);
    let id = submit(&relay, "v@tls.test", "Subject: verified\r\n\r\nverified body\r\n");
    relay.wait_log("outcome=deferred");
    let lines = delivery_lines(&relay);
    assert!(lines[0].contains("4.7.5") && lines[0].contains("TLS handshake failed"), "{lines:?}");
    assert!(relay.log().contains("event=tls_error host=mx.tls.test"), "{}", relay.log());
    assert!(!relay.log().contains("tls_fallback"), "no plaintext fallback under verify: {}", relay.log());
    assert!(server.lines().iter().all(|l| !l.contains("\"msg\"")), "{:?}", server.lines());
    relay.kill9();

    // The same spool, with the CA that signed the MX host's certificate: delivered in TLS.
    let right = flags(&cert);
    let right: Vec<&str> = right.iter().map(String::as_str).collect();
    let relay = Relay::start_on(&spool, &right);
    let got = server.wait_lines("\"msg\"", 1, &relay);
    assert!(got[0].contains("\"tls\": true") && got[0].contains(&id), "{}", got[0]);
    relay.wait_log("outcome=delivered");
    let lines = delivery_lines(&relay);
    assert!(
        lines.iter().any(|l| l.contains("remote=mx.tls.test[127.0.0.13]") && l.contains("tls=TLSv1.3")),
        "{lines:?}"
    );
}
