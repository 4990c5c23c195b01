//! Authenticated smarthost (`--relay-auth-file`, `--relay-tls starttls|implicit`) against a
//! third-party server: Python aiosmtpd with an authenticator, STARTTLS (AUTH only inside TLS)
//! or implicit TLS, certificates made here for 127.0.0.1 (an IP SAN) or a wrong name. The
//! server prints a JSON line per EHLO, per AUTH command (before it is handled, with whether
//! the connection was TLS), per credentials check and per message. Loopback only; every wait
//! is bounded.

use super::cli::serve;
use super::support::*;
use super::tls_out::{cert_files, delivery_lines, have_aiosmtpd, submit, Peer};
use base64::Engine as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// `MODE CERT KEY MECHS USER PASSWORD`: MODE `starttls` (AUTH offered inside TLS only),
/// `implicit` (TLS from the first byte) or `clear` (no TLS, AUTH offered in the clear to
/// tempt the client); MECHS the comma-separated mechanisms offered among PLAIN and LOGIN.
const SERVER: &str = r#"
import asyncio, json, ssl, sys
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, syntax
mode, cert, key, mechs, user, pw = sys.argv[1:7]
ctx = None
if mode != "clear":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
def tls_of(server):
    t = server.transport
    return t is not None and t.get_extra_info("ssl_object") is not None
def out(obj):
    print(json.dumps(obj), flush=True)
def authenticator(server, session, envelope, mechanism, data):
    ok = isinstance(data, LoginPassword) and data.login == user.encode() and data.password == pw.encode()
    out({"check": mechanism, "user": data.login.decode("utf-8", "replace"), "ok": ok, "tls": tls_of(server)})
    return AuthResult(success=ok, handled=False, auth_data=data)
class Server(SMTP):
    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg):
        out({"auth_cmd": (arg or "").split(" ")[0], "tls": tls_of(self)})
        return await super().smtp_AUTH(arg)
class Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        out({"ehlo": hostname, "tls": tls_of(server)})
        session.host_name = hostname
        return responses
    async def handle_DATA(self, server, session, envelope):
        login = session.auth_data.login.decode() if session.auth_data else None
        out({"msg": True, "tls": tls_of(server), "user": login, "rcpts": envelope.rcpt_tos,
             "data": envelope.content.decode("utf-8", "replace")})
        return "250 2.0.0 Ok: stored"
kw = dict(hostname="smarthost.test", authenticator=authenticator,
          auth_exclude_mechanism=[m for m in ("PLAIN", "LOGIN") if m not in mechs.split(",")])
if mode == "starttls":
    kw.update(tls_context=ctx, require_starttls=False, auth_require_tls=True)
else:
    # Implicit TLS: the transport is TLS already (aiosmtpd only knows STARTTLS's TLS).
    kw.update(auth_require_tls=False)
async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Server(Handler(), **kw), "127.0.0.1", 0,
                                   ssl=ctx if mode == "implicit" else None)
    print("PORT", srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"#;

const USER: &str = "relay-user@src.test";
const PASSWORD: &str = "Pa55-w0rd:with-colon";

fn server(mode: &str, cert: &Path, key: &Path, mechs: &str) -> Peer {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(SERVER).arg(mode).arg(cert).arg(key).arg(mechs).arg(USER).arg(PASSWORD);
    cmd.stderr(Stdio::null());
    Peer::spawn(cmd)
}

/// Writes `user:password` to `DIR/relay-auth` with `mode`.
fn auth_file(dir: &Path, line: &str, mode: u32) -> PathBuf {
    let path = dir.join("relay-auth");
    std::fs::write(&path, format!("{line}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// A relay sending to the server on 127.0.0.1 with `auth` and the CA `ca`, plus `extra`.
fn relay(port: u16, auth: &Path, ca: &Path, extra: &[&str]) -> Relay {
    let relay_host = format!("127.0.0.1:{port}");
    let (auth, ca) = (auth.display().to_string(), ca.display().to_string());
    let mut args = vec!["--relay-host", &relay_host, "--relay-auth-file", &auth, "--tls-ca-file", &ca];
    args.extend_from_slice(&["--retry-schedule", "1h", "--smtp-timeout", "10s"]);
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// Neither the password nor any base64 form that carries it appears in the relay's log.
fn assert_no_secret(relay: &Relay, password: &str) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let log = relay.log();
    for secret in [password.to_string(), b64.encode(password), b64.encode(format!("\0{USER}\0{password}"))] {
        assert!(!log.contains(&secret), "{secret:?} in the relay log:\n{log}");
    }
}

/// The attempt was recorded as a deferral with `status` (the host answered, so it is not
/// parked as down), the message is still queued, and nobody was told it failed.
fn assert_kept(relay: &Relay, id: &str, rcpt: &str, status: &str) {
    relay.wait_log("outcome=deferred");
    std::thread::sleep(Duration::from_millis(300));
    let log = relay.log();
    assert!(!log.contains("event=bounce"), "{log}");
    for line in delivery_lines(relay) {
        assert!(line.contains("outcome=deferred") && line.contains(status), "{line}");
    }
    let (_, list, _) = queue_cmd(&relay.spool, &["list"]);
    let kept = list.contains(id) && list.contains(&format!("{rcpt} deferred")) && list.contains(status);
    assert!(kept, "{list}");
    assert_eq!(spool_messages(&relay.spool).len(), 1, "{list}");
}

/// Delivered through `mode` with only `mechs` offered: the server checked our credentials
/// inside TLS and the message came on the authenticated session.
fn delivers(mode: &str, mechs: &str, extra: &[&str]) {
    if !have_aiosmtpd() {
        return;
    }
    let dir = TempDir::new("smarthost-ok");
    let (cert, key) = cert_files(dir.path(), "relay", "127.0.0.1");
    let server = server(mode, &cert, &key, mechs);
    let auth = auth_file(dir.path(), &format!("{USER}:{PASSWORD}"), 0o600);
    let relay = relay(server.port, &auth, &cert, extra);
    let id = submit(&relay, "x@dst.test", "Subject: via smarthost\r\n\r\nauthenticated body\r\n");
    let got = server.wait_lines("\"msg\"", 1, &relay);
    assert!(got[0].contains("\"tls\": true") && got[0].contains(&format!("\"user\": \"{USER}\"")), "{got:?}");
    assert!(got[0].contains("authenticated body") && got[0].contains(&id), "{}", got[0]);
    let lines = server.lines();
    let mech = mechs.split(',').next().unwrap();
    let checks: Vec<&String> = lines.iter().filter(|l| l.contains("\"check\"")).collect();
    assert_eq!(checks.len(), 1, "{lines:?}");
    assert!(checks[0].contains(&format!("\"check\": \"{mech}\"")) && checks[0].contains("\"ok\": true"), "{lines:?}");
    assert!(lines.iter().filter(|l| l.contains("auth_cmd")).all(|l| l.contains("\"tls\": true")), "{lines:?}");
    relay.wait_log("outcome=delivered");
    assert!(delivery_lines(&relay)[0].contains("tls=TLSv1.3"), "{}", relay.log());
    assert!(!relay.log().contains("relay_auth_failed"), "{}", relay.log());
    assert_no_secret(&relay, PASSWORD);
}

#[test]
fn auth_plain_over_starttls_delivers() {
    delivers("starttls", "PLAIN,LOGIN", &[]);
}

#[test]
fn auth_login_when_only_login_is_offered() {
    delivers("starttls", "LOGIN", &["--relay-tls", "starttls"]);
}

#[test]
fn implicit_tls_to_an_ip_relay_host_delivers() {
    delivers("implicit", "PLAIN,LOGIN", &["--relay-tls", "implicit"]);
}

#[test]
fn wrong_password_defers_logs_relay_auth_failed_and_never_the_password() {
    if !have_aiosmtpd() {
        return;
    }
    let dir = TempDir::new("smarthost-535");
    let (cert, key) = cert_files(dir.path(), "relay", "127.0.0.1");
    let server = server("starttls", &cert, &key, "PLAIN,LOGIN");
    let wrong = "Wr0ng-Secret-9f2c";
    let auth = auth_file(dir.path(), &format!("{USER}:{wrong}"), 0o600);
    let relay = relay(server.port, &auth, &cert, &[]);
    let id = submit(&relay, "y@dst.test", "Subject: refused\r\n\r\nbody\r\n");
    relay.wait_log("event=relay_auth_failed");
    let checks = server.wait_lines("\"check\"", 1, &relay);
    assert!(checks[0].contains("\"ok\": false") && checks[0].contains("\"tls\": true"), "{checks:?}");
    let log = relay.log();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("event=relay_auth_failed")).collect();
    assert_eq!(failed.len(), 1, "{log}");
    assert!(failed[0].contains("535 5.7.8") && failed[0].contains("authentication"), "{}", failed[0]);
    // Kept for a later attempt (the 535 is never taken as the recipient's fault): no DSN.
    assert_kept(&relay, &id, "y@dst.test", "4.7.8");
    assert!(server.lines().iter().all(|l| !l.contains("\"msg\"")), "{:?}", server.lines());
    assert_no_secret(&relay, wrong);
}

#[test]
fn no_starttls_defers_and_auth_is_never_sent_in_the_clear() {
    if !have_aiosmtpd() {
        return;
    }
    let dir = TempDir::new("smarthost-clear");
    let (cert, key) = cert_files(dir.path(), "relay", "127.0.0.1");
    let server = server("clear", &cert, &key, "PLAIN,LOGIN");
    let auth = auth_file(dir.path(), &format!("{USER}:{PASSWORD}"), 0o600);
    let relay = relay(server.port, &auth, &cert, &[]);
    let id = submit(&relay, "z@dst.test", "Subject: clear\r\n\r\nbody\r\n");
    relay.wait_log("event=tls_error");
    server.wait_lines("\"ehlo\"", 1, &relay);
    assert!(relay.log().contains("TLS required but not offered"), "{}", relay.log());
    assert_kept(&relay, &id, "z@dst.test", "4.7.4");
    // The server offered AUTH in the clear; the relay never took it.
    let seen = server.lines();
    assert!(seen.iter().all(|l| !l.contains("auth_cmd") && !l.contains("\"check\"")), "{seen:?}");
    assert!(!relay.log().contains("tls_fallback"), "{}", relay.log());
    assert_no_secret(&relay, PASSWORD);
}

#[test]
fn certificate_for_a_wrong_name_defers_before_auth() {
    if !have_aiosmtpd() {
        return;
    }
    let dir = TempDir::new("smarthost-name");
    // Signed by the CA the relay trusts, but for another name than 127.0.0.1.
    let (cert, key) = cert_files(dir.path(), "other", "other.test");
    for (mode, extra) in [("starttls", &[][..]), ("implicit", &["--relay-tls", "implicit"][..])] {
        let server = server(mode, &cert, &key, "PLAIN,LOGIN");
        let auth = auth_file(dir.path(), &format!("{USER}:{PASSWORD}"), 0o600);
        let relay = relay(server.port, &auth, &cert, extra);
        let id = submit(&relay, "n@dst.test", "Subject: wrong name\r\n\r\nbody\r\n");
        relay.wait_log("event=tls_error");
        let log = relay.log();
        assert!(log.contains("TLS handshake failed") && log.contains("certificate"), "{mode}: {log}");
        assert_kept(&relay, &id, "n@dst.test", "4.7.5");
        let seen = server.lines();
        assert!(seen.iter().all(|l| !l.contains("auth_cmd") && !l.contains("\"msg\"")), "{mode}: {seen:?}");
        assert_no_secret(&relay, PASSWORD);
    }
}

#[test]
fn bad_relay_auth_flags_exit_2_naming_flag_and_file() {
    let dir = TempDir::new("smarthost-flags");
    let relay = ["--relay-host", "127.0.0.1:2"];
    let missing = dir.path().join("missing");
    let empty = auth_file(dir.path(), "# nothing here", 0o600);
    let empty_copy = dir.path().join("empty");
    std::fs::rename(&empty, &empty_copy).unwrap();
    let no_colon = dir.path().join("no-colon");
    std::fs::write(&no_colon, "just-a-secret-password\n").unwrap();
    for file in [&missing, &empty_copy, &no_colon] {
        let f = file.display().to_string();
        let (code, err) = serve(&[&relay[..], &["--relay-auth-file", &f]].concat());
        assert_eq!(code, 2, "{f}: {err}");
        assert!(err.contains("--relay-auth-file") && err.contains(&f), "{err}");
        assert!(!err.contains("just-a-secret-password"), "{err}");
    }
    let good = auth_file(dir.path(), "u:p", 0o600).display().to_string();
    let (code, err) = serve(&["--relay-auth-file", &good]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--relay-auth-file") && err.contains("--relay-host"), "{err}");
    let (code, err) = serve(&["--relay-tls", "implicit"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--relay-tls") && err.contains("--relay-host"), "{err}");
    let (code, err) = serve(&[&relay[..], &["--relay-tls", "smtps"]].concat());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--relay-tls"), "{err}");
    // A group- or world-readable file is used, as Postfix does, with a warning naming it.
    let (ca, _) = cert_files(dir.path(), "ca", "127.0.0.1");
    let loose = auth_file(dir.path(), "u:p", 0o644);
    let r = Relay::start(&[
        "--relay-host",
        "127.0.0.1:2",
        "--relay-auth-file",
        &loose.display().to_string(),
        "--tls-ca-file",
        &ca.display().to_string(),
        "--hold",
    ]);
    let warning = r.log().lines().find(|l| l.contains("event=warning flag=--relay-auth-file")).map(str::to_string);
    let warning = warning.unwrap_or_else(|| panic!("no warning: {}", r.log()));
    assert!(warning.contains(&loose.display().to_string()) && warning.contains("644"), "{warning}");
}
