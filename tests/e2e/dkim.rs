//! DKIM signing end to end: keys made by `sluice dkim-keygen`, messages signed by the relay
//! before its `250`, and the delivered (or stored) bytes checked by two independent verifiers:
//! Python's `dkimpy` (the key records handed to it directly) and OpenDKIM's
//! `opendkim-testmsg` (which asks the system resolver: it runs in a private mount namespace
//! whose `/etc/resolv.conf` names a test DNS server on loopback port 53; nothing on the host
//! changes). Loopback only.

use super::delivery::{dns_on, sink, wait_saved, Aux};
use super::support::*;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// dkimpy: verifies every DKIM-Signature of the message on stdin against the records given
/// as `NAME=VALUE` arguments; prints how many passed, exits 1 on the first failure.
const DKIMPY: &str = r#"
import sys, dkim
recs = dict(a.split('=', 1) for a in sys.argv[1:])
def dnsfunc(name, timeout=5):
    return recs.get(name.decode().rstrip('.'), '').encode()
msg = sys.stdin.buffer.read()
d = dkim.DKIM(msg)
n = sum(1 for h in d.headers if h[0].lower() == b'dkim-signature')
for i in range(n):
    try:
        ok = dkim.DKIM(msg).verify(idx=i, dnsfunc=dnsfunc)
    except Exception as e:
        ok = False
        print('signature', i, 'error:', e)
    if not ok:
        print('signature', i, 'failed')
        sys.exit(1)
print('verified', n)
"#;

/// A 512-bit RSA key: parses, but RFC 8301 forbids it.
const RSA_512: &str = "-----BEGIN PRIVATE KEY-----
MIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEA0aIj5s30ftyIk85e
GLC9M1tj+synyDL6usEiRbBL9qKaVPJfpxHNE/GOs1JbY9wIAqZFhRr2U78n534a
vZ37gwIDAQABAkB7U3Lhhopu05i5s69hwSAdhYdk9V9DhNJCafqamuOlnOSeNqXA
tm0J56ieZgKEgSIM1XxCgSQUoqNJ1QXy633pAiEA7TvKZhbfQQBNRIOxUzuleTTd
wnUO+sYQrJcGBINzbTcCIQDiN2s8pmt+B/2lRynGF/ltc7dwtBoYWGse6uCIih0q
FQIhAJqDT99QVFak2K6gS5WXir44BZvK3FfPOzr+HmhAKaTfAiEAhbvtkbVw5tki
gotHjuytcJ9wWxieNLZQ3b5Nb2r3QuECIHgZNbfFZn1VFas5owrUx4xn1dFzL4oI
IliXHK5vvcC1
-----END PRIVATE KEY-----
";

/// Requires dkimpy (with PyNaCl, which its Ed25519 support needs): on CI its absence fails.
fn require_dkimpy() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import dkim, nacl"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("python3 dkimpy and pynacl are required on CI (.ci/run installs them)");
    }
    if !ok {
        eprintln!("skipping: python3 dkimpy/pynacl not installed");
    }
    ok
}

/// One key made by `sluice dkim-keygen`: its file and the TXT record it printed.
struct Key {
    pem: std::path::PathBuf,
    /// `SELECTOR._domainkey.DOMAIN`
    name: String,
    /// The record value, its quoted strings joined.
    record: String,
}

fn keygen(dir: &Path, domain: &str, selector: &str, ed25519: bool) -> Key {
    let pem = dir.join(format!("{domain}-{selector}.pem"));
    let mut cmd = Command::new(sluice_bin());
    cmd.args(["dkim-keygen", domain, selector, "--out"]).arg(&pem);
    if ed25519 {
        cmd.arg("--ed25519");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let name = format!("{selector}._domainkey.{domain}");
    assert!(line.starts_with(&format!("{name}. IN TXT \"v=DKIM1; k=")), "{line}");
    // Every quoted string is at most 255 octets; the record is their concatenation.
    let strings: Vec<&str> = line.trim_end().split('"').skip(1).step_by(2).collect();
    assert!(strings.iter().all(|s| s.len() <= 255), "{line}");
    let record = strings.concat();
    let k = if ed25519 { "ed25519" } else { "rsa" };
    assert!(record.starts_with(&format!("v=DKIM1; k={k}; p=")), "{record}");
    Key { pem, name, record }
}

fn dkimpy(msg: &[u8], keys: &[&Key]) -> Result<String, String> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(DKIMPY)
        .args(keys.iter().map(|k| format!("{}={}", k.name, k.record)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(msg).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The message with only its `keep`-th DKIM-Signature field (of those at the top).
fn only_signature(msg: &[u8], keep: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut nth = 0;
    while msg[pos..].starts_with(b"DKIM-Signature:") {
        let mut end = pos;
        loop {
            end += msg[end..].iter().position(|&b| b == b'\n').unwrap() + 1;
            if !matches!(msg.get(end), Some(b' ' | b'\t')) {
                break;
            }
        }
        if nth == keep {
            out.extend_from_slice(&msg[pos..end]);
        }
        nth += 1;
        pos = end;
    }
    out.extend_from_slice(&msg[pos..]);
    out
}

fn signatures(msg: &[u8]) -> usize {
    String::from_utf8_lossy(msg).matches("DKIM-Signature: v=1;").count()
}

/// opendkim-testmsg on `msg`, resolving through the test DNS at `dns_ip`:53. Ok on a pass.
fn opendkim(msg: &[u8], dns_ip: &str, scratch: &Path) -> Result<(), String> {
    let file = scratch.join("opendkim.msg");
    let resolv = scratch.join("resolv.conf");
    std::fs::write(&file, msg).unwrap();
    std::fs::write(&resolv, format!("nameserver {dns_ip}\noptions attempts:1 timeout:2\n")).unwrap();
    let script =
        format!("mount --bind '{}' /etc/resolv.conf && exec opendkim-testmsg < '{}'", resolv.display(), file.display());
    let out = Command::new("unshare").args(["-m", "sh", "-c", &script]).output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr)))
    }
}

/// A loopback address for a port-53 DNS server that no other test run, and no other test of
/// this run (`n`, one per test), uses.
fn dns_ip(n: u8) -> String {
    let p = std::process::id();
    format!("127.{}.{}.{}", 53 + n, p % 250, 1 + (p / 250) % 250)
}

const MESSAGE: &[u8] = b"From: Joe SixPack <joe@mail.example.com>\r\n\
To: Suzie Q <suzie@dst.test>\r\n\
Subject: Is dinner  ready?\r\n\
\tfolded here\r\n\
Date: Fri, 11 Jul 2003 21:00:37 -0700\r\n\
Message-ID: <20030712040037.46341.5F8J@mail.example.com>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain\r\n\
\r\n\
Hi.  \r\n\
\r\n\
We lost the game.\tAre you hungry yet?\r\n\
\r\n\
\r\n";

fn relay_with_keys(sink: &Aux, keys: &[(&str, &Key)], extra: &[&str]) -> Relay {
    let specs: Vec<String> =
        keys.iter().map(|(d, k)| format!("{d}:{}:{}", k.name.split('.').next().unwrap(), k.pem.display())).collect();
    let target = sink.addr.to_string();
    let mut flags = vec!["--relay-host", &target, "--dns", "127.0.0.1:9"];
    for s in &specs {
        flags.extend(["--dkim-key", s.as_str()]);
    }
    flags.extend(extra);
    Relay::start(&flags)
}

/// A relay with an RSA-2048 and an Ed25519 key for example.com signs a message from
/// mail.example.com (nearest parent with keys) twice before its 250; the delivered bytes pass
/// dkimpy and OpenDKIM for each signature, still pass dkimpy after the header and body
/// white space is refolded (relaxed/relaxed), and fail once a body byte changes.
#[test]
fn dual_signature_verifies_with_dkimpy_and_opendkim() {
    let Some(bin) = load_bin() else { return };
    if !require_dkimpy() || !require("opendkim-testmsg") || !require("unshare") {
        return;
    }
    let dir = TempDir::new("dkim");
    let rsa = keygen(dir.path(), "example.com", "rsa1", false);
    let ed = keygen(dir.path(), "example.com", "ed1", true);
    let ip = dns_ip(0);
    let _dns = dns_on(
        &bin,
        &format!("{ip}:53"),
        &["--txt", &format!("{}={}", rsa.name, rsa.record), "--txt", &format!("{}={}", ed.name, ed.record)],
    );
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let relay = relay_with_keys(&sink, &[("example.com", &rsa), ("example.com", &ed)], &["--dkim-threads", "2"]);
    relay.wait_log("event=dkim keys=2 domains=1 threads=2");
    let id = super::delivery::send(&relay, "joe@mail.example.com", &["suzie@dst.test"], MESSAGE);
    let got = wait_saved(&sink, 1, Duration::from_secs(20), &relay);
    let msg = &got[0].1;
    let text = String::from_utf8_lossy(msg);
    assert_eq!(signatures(msg), 2, "{text}");
    assert!(text.starts_with("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n\td=example.com; s=rsa1; t="));
    assert!(text.contains("a=ed25519-sha256; c=relaxed/relaxed;\r\n\td=example.com; s=ed1;"), "{text}");
    assert!(text.contains("h=from:from:subject:date:to:message-id:mime-version:content-type;"), "{text}");
    assert!(msg.ends_with(MESSAGE), "the message itself is unchanged");
    let log = relay.log();
    assert!(
        log.lines().any(|l| l.contains("event=accepted")
            && l.contains(&id)
            && l.contains("dkim=example.com:rsa1,example.com:ed1")),
        "{log}"
    );

    let verified = dkimpy(msg, &[&rsa, &ed]).unwrap_or_else(|e| panic!("dkimpy: {e}\n{text}"));
    assert!(verified.contains("verified 2"), "{verified}");
    for (i, what) in ["rsa", "ed25519"].iter().enumerate() {
        let one = only_signature(msg, i);
        assert_eq!(signatures(&one), 1);
        opendkim(&one, &ip, dir.path()).unwrap_or_else(|e| panic!("opendkim-testmsg, {what} signature: {e}"));
    }

    // Refolded on the way (what relaxed canonicalization is for): still valid.
    let refolded = String::from_utf8(msg.clone())
        .unwrap()
        .replace("Subject: Is dinner  ready?\r\n\tfolded here", "Subject:   Is dinner\r\n  ready?  folded\r\n here ")
        .replace("Hi.  \r\n", "Hi.\t\r\n")
        .replace("game.\tAre", "game.   Are")
        + "\r\n\r\n";
    assert_ne!(refolded.as_bytes(), msg.as_slice());
    let verified = dkimpy(refolded.as_bytes(), &[&rsa, &ed]).unwrap_or_else(|e| panic!("refolded: {e}\n{refolded}"));
    assert!(verified.contains("verified 2"), "{verified}");
    opendkim(&only_signature(refolded.as_bytes(), 1), &ip, dir.path()).expect("opendkim, refolded");
    // A changed byte is caught by both: the verifiers really verify.
    let tampered = String::from_utf8_lossy(msg).replace("We lost", "We won");
    assert!(dkimpy(tampered.as_bytes(), &[&rsa, &ed]).is_err());
    assert!(opendkim(&only_signature(tampered.as_bytes(), 0), &ip, dir.path()).is_err());
}

/// An RSA key made by `openssl` with `bits` bits, PKCS#1 (`-traditional`) or PKCS#8, and its
/// record (the `p=` value is the SubjectPublicKeyInfo, as opendkim-genkey writes it).
fn openssl_rsa(dir: &Path, domain: &str, selector: &str, bits: u32, pkcs1: bool) -> Key {
    let pem = dir.join(format!("{domain}-{selector}.pem"));
    let mut cmd = Command::new("openssl");
    cmd.args(["genpkey", "-algorithm", "RSA", "-pkeyopt", &format!("rsa_keygen_bits:{bits}"), "-out"]).arg(&pem);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "openssl genpkey: {}", String::from_utf8_lossy(&out.stderr));
    if pkcs1 {
        let out = Command::new("openssl").args(["rsa", "-traditional", "-in"]).arg(&pem).arg("-out").arg(&pem).output();
        let out = out.unwrap();
        assert!(out.status.success(), "openssl rsa: {}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read_to_string(&pem).unwrap().starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    }
    let out = Command::new("openssl").args(["pkey", "-pubout", "-outform", "DER", "-in"]).arg(&pem).output().unwrap();
    assert!(out.status.success(), "openssl pkey: {}", String::from_utf8_lossy(&out.stderr));
    use base64::Engine as _;
    let p = base64::engine::general_purpose::STANDARD.encode(&out.stdout);
    Key { pem, name: format!("{selector}._domainkey.{domain}"), record: format!("v=DKIM1; k=rsa; p={p}") }
}

/// RSA keys of 1024 to 2047 bits (RFC 8301 allows >= 1024), PKCS#8 and PKCS#1, sign: both
/// signatures of one message pass dkimpy and each passes OpenDKIM.
#[test]
fn rsa_keys_under_2048_bits_sign_and_verify() {
    let Some(bin) = load_bin() else { return };
    if !require_dkimpy() || !require("opendkim-testmsg") || !require("unshare") || !require("openssl") {
        return;
    }
    let dir = TempDir::new("dkim-small");
    let k1024 = openssl_rsa(dir.path(), "example.com", "r1024", 1024, false);
    let k1536 = openssl_rsa(dir.path(), "example.com", "r1536", 1536, true);
    let ip = dns_ip(1);
    let txt = |k: &Key| format!("{}={}", k.name, k.record);
    let _dns = dns_on(&bin, &format!("{ip}:53"), &["--txt", &txt(&k1024), "--txt", &txt(&k1536)]);
    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let relay = relay_with_keys(&sink, &[("example.com", &k1024), ("example.com", &k1536)], &[]);
    relay.wait_log("event=dkim keys=2 domains=1");
    super::delivery::send(&relay, "joe@mail.example.com", &["suzie@dst.test"], MESSAGE);
    let got = wait_saved(&sink, 1, Duration::from_secs(20), &relay);
    let msg = &got[0].1;
    let text = String::from_utf8_lossy(msg);
    assert_eq!(signatures(msg), 2, "{text}");
    assert!(text.contains("a=rsa-sha256; c=relaxed/relaxed;\r\n\td=example.com; s=r1024;"), "{text}");
    assert!(text.contains("a=rsa-sha256; c=relaxed/relaxed;\r\n\td=example.com; s=r1536;"), "{text}");
    let verified = dkimpy(msg, &[&k1024, &k1536]).unwrap_or_else(|e| panic!("dkimpy: {e}\n{text}"));
    assert!(verified.contains("verified 2"), "{verified}");
    for (i, what) in ["1024", "1536"].iter().enumerate() {
        let one = only_signature(msg, i);
        opendkim(&one, &ip, dir.path()).unwrap_or_else(|e| panic!("opendkim-testmsg, RSA-{what}: {e}"));
    }
    let tampered = text.replace("We lost", "We won");
    assert!(dkimpy(tampered.as_bytes(), &[&k1024, &k1536]).is_err());
}

/// Mail from a domain without keys is stored as it came (`dkim=none`); a message without
/// From:, or with two, is stored unsigned with a log line saying why.
#[test]
fn unkeyed_domain_and_missing_from_go_unsigned() {
    let dir = TempDir::new("dkim-unsigned");
    let ed = keygen(dir.path(), "example.com", "ed1", true);
    let spec = format!("example.com:ed1:{}", ed.pem.display());
    let relay = Relay::start(&["--dkim-key", &spec]);
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let cases: [(&[u8], &str); 4] = [
        (b"From: a@other.test\r\nSubject: x\r\n\r\nforeign\r\n", "dkim=none"),
        (b"Subject: no from\r\n\r\nnobody\r\n", "dkim=unsigned:no-from"),
        (b"From: a@example.com\r\nFrom: b@example.com\r\n\r\ntwo\r\n", "dkim=unsigned:several-from"),
        (b"From: a@sub.example.com\r\n\r\nsigned\r\n", "dkim=example.com:ed1"),
    ];
    let mut ids = Vec::new();
    for (body, _) in &cases {
        let r = c.send_message("a@src.test", &["x@dst.test"], body);
        assert!(r.starts_with("250 "), "{r}");
        ids.push(queue_id(&r));
    }
    relay.wait_log(&format!("id={}", ids[3]));
    let log = relay.log();
    for ((_, want), id) in cases.iter().zip(&ids) {
        assert!(
            log.lines().any(|l| l.contains("event=accepted") && l.contains(id.as_str()) && l.contains(want)),
            "{want}:\n{log}"
        );
    }
    assert!(log.contains(&format!("event=dkim_unsigned id={} reason=unsigned:no-from", ids[1])), "{log}");
    assert!(log.contains(&format!("event=dkim_unsigned id={} reason=unsigned:several-from", ids[2])), "{log}");
    let stored = spool_messages(&relay.spool);
    for ((body, _), id) in cases.iter().zip(&ids) {
        let (_, msg) = stored.iter().find(|(i, _)| i == id).unwrap();
        assert!(msg.ends_with(body));
        let want = usize::from(id == &ids[3]);
        assert_eq!(signatures(msg), want, "{}", String::from_utf8_lossy(msg));
    }
}

/// The stored message is the signed one: killed (-9) right after the 250, the relay
/// restarts and delivers exactly the stored, signed bytes, which verify.
#[test]
fn restart_after_kill9_delivers_the_same_signed_bytes() {
    let Some(bin) = load_bin() else { return };
    if !require_dkimpy() {
        return;
    }
    let keydir = TempDir::new("dkim-restart");
    let rsa = keygen(keydir.path(), "example.com", "r", false);
    let ed = keygen(keydir.path(), "example.com", "e", true);
    let specs = [format!("example.com:r:{}", rsa.pem.display()), format!("example.com:e:{}", ed.pem.display())];
    // --hold: accepted, signed and stored, never sent.
    let mut relay = Relay::start(&["--dkim-key", &specs[0], "--dkim-key", &specs[1]]);
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let r = c.send_message("joe@example.com", &["suzie@dst.test"], MESSAGE);
    assert!(r.starts_with("250 "), "{r}");
    let id = queue_id(&r);
    relay.kill9();
    let _dir = relay.take_dir();
    let spool = relay.spool.clone();
    let stored = spool_messages(&spool);
    let (_, before) = stored.iter().find(|(i, _)| *i == id).expect("acknowledged message stored");
    assert_eq!(signatures(before), 2);
    dkimpy(before, &[&rsa, &ed]).unwrap();

    let sink = sink(&bin, "127.0.0.1:0", &[]);
    let target = sink.addr.to_string();
    let relay = Relay::start_on(
        &spool,
        &["--relay-host", &target, "--dns", "127.0.0.1:9", "--dkim-key", &specs[0], "--dkim-key", &specs[1]],
    );
    let got = wait_saved(&sink, 1, Duration::from_secs(20), &relay);
    assert_eq!(&got[0].1, before, "delivered bytes differ from the stored, signed ones");
    assert_eq!(signatures(&got[0].1), 2, "signed once, not again on the way out");
    relay.wait_log("outcome=delivered");
    let log = relay.log();
    assert!(
        log.lines()
            .any(|l| l.contains("event=delivery") && l.contains(&id) && l.contains("dkim=example.com:r,example.com:e")),
        "{log}"
    );
}

/// `--dkim-dir DIR`: every DIR/DOMAIN/SELECTOR.pem is a key; SIGHUP reads the directory
/// again (a new key signs from then on), and a reload that fails keeps the old keys.
#[test]
fn dkim_dir_is_reloaded_on_sighup() {
    if !require_dkimpy() {
        return;
    }
    let dir = TempDir::new("dkim-dir");
    let keys = dir.path().join("keys");
    let dom = keys.join("example.com");
    std::fs::create_dir_all(&dom).unwrap();
    let ed = keygen(dir.path(), "example.com", "a", true);
    std::fs::copy(&ed.pem, dom.join("a.pem")).unwrap();
    let keys_arg = keys.display().to_string();
    let relay = Relay::start(&["--dkim-dir", &keys_arg]);
    relay.wait_log("event=dkim keys=1 domains=1");
    let send = |subject: &str| {
        let mut c = relay.client();
        c.expect("220");
        c.expect_ok("EHLO c.test", "250");
        let r = c.send_message(
            "joe@example.com",
            &["x@dst.test"],
            format!("From: joe@example.com\r\nSubject: {subject}\r\n\r\nhi\r\n").as_bytes(),
        );
        assert!(r.starts_with("250 "), "{r}");
        queue_id(&r)
    };
    let first = send("one");
    let rsa = keygen(dir.path(), "example.com", "b", false);
    std::fs::copy(&rsa.pem, dom.join("b.pem")).unwrap();
    relay.signal("HUP");
    relay.wait_log("event=reload dkim=ok keys=2 domains=1");
    let second = send("two");
    std::fs::write(dom.join("c.pem"), "not a key\n").unwrap();
    relay.signal("HUP");
    relay.wait_log("failed, keeping the old keys");
    let third = send("three");
    relay.wait_log(&format!("id={third}"));
    let log = relay.log();
    let accepted = |id: &str, dkim: &str| {
        log.lines().any(|l| l.contains("event=accepted") && l.contains(id) && l.split(' ').any(|f| f == dkim))
    };
    assert!(accepted(&first, "dkim=example.com:a"), "{log}");
    assert!(accepted(&second, "dkim=example.com:a,example.com:b"), "{log}");
    assert!(accepted(&third, "dkim=example.com:a,example.com:b"), "{log}");
    let stored = spool_messages(&relay.spool);
    let (_, msg) = stored.iter().find(|(i, _)| *i == second).unwrap();
    let verified = dkimpy(msg, &[&ed, &rsa]).unwrap();
    assert!(verified.contains("verified 2"), "{verified}");
}

/// Bad DKIM flags exit 2 naming the flag and the value; keygen refuses to overwrite a file
/// and writes its key with mode 0600.
#[test]
fn bad_dkim_flags_exit_2() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("dkim-bad");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello\n").unwrap();
    let small = dir.path().join("small.pem");
    std::fs::write(&small, RSA_512).unwrap();
    let good = keygen(dir.path(), "example.com", "s", true);
    assert_eq!(std::fs::metadata(&good.pem).unwrap().permissions().mode() & 0o777, 0o600);
    let baddir = dir.path().join("keys");
    std::fs::create_dir_all(baddir.join("example.com")).unwrap();
    std::fs::write(baddir.join("example.com").join("s.pem"), "junk").unwrap();
    let cases = [
        ("--dkim-key", format!("example.com:s:{}", junk.display()), "no PEM private key"),
        ("--dkim-key", format!("example.com:s:{}", small.display()), "512 bits"),
        ("--dkim-key", format!("exa_mple.com:s:{}", good.pem.display()), "not a domain name"),
        ("--dkim-key", format!("example.com:s:{}", dir.path().join("missing.pem").display()), "cannot read"),
        ("--dkim-dir", baddir.display().to_string(), "s.pem"),
    ];
    for (flag, value, why) in cases {
        let out = Command::new(sluice_bin())
            .args(["serve", "--spool"])
            .arg(dir.path().join("spool"))
            .args(["--listen", "127.0.0.1:0", flag, &value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag) && err.contains(&value) && err.contains(why), "{flag} {value}: {err}");
    }
    // keygen: an existing file is kept; an RSA size below 2048, or one aws-lc-rs does not
    // generate, is refused by the flag.
    let again =
        Command::new(sluice_bin()).args(["dkim-keygen", "example.com", "s", "--out"]).arg(&good.pem).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    for bits in ["1024", "2560"] {
        let bad = Command::new(sluice_bin())
            .args(["dkim-keygen", "example.com", "s", "--bits", bits, "--out"])
            .arg(dir.path().join("x.pem"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(2), "--bits {bits}: {err}");
        assert!(err.contains("--bits") && err.contains(bits), "--bits {bits}: {err}");
    }
    assert!(!dir.path().join("x.pem").exists());
}
