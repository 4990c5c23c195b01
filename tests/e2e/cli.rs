//! Command-line behaviour: bad flags exit 2 naming the flag; start-up errors exit 1.

use super::support::*;
use std::process::Command;

/// `sluice serve --hold` with `args` on a fresh spool: exit code and stderr.
pub fn serve(args: &[&str]) -> (i32, String) {
    let dir = TempDir::new("cli");
    let out = Command::new(sluice_bin())
        .arg("serve")
        .arg("--spool")
        .arg(dir.path().join("s"))
        .args(["--listen", "127.0.0.1:0", "--hold", "--dns", "127.0.0.1:1"])
        .args(args)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_flag_values_exit_2_naming_the_flag() {
    for (flag, value) in [
        ("--max-recipients", "many"),
        ("--max-recipients", "0"),
        ("--fsync", "sometimes"),
        ("--allow", "10.0.0.0/40"),
        ("--retry-schedule", "1m,5x"),
        ("--max-queue-lifetime", "forever"),
        ("--max-message-size", "5X"),
        ("--listen", "nowhere"),
        ("--dns", "not-an-addr"),
        ("--relay-host", "bad host:x"),
        ("--smtp-port", "70000"),
        ("--log-format", "xml"),
        ("--command-timeout", "0s"),
        ("--hostname", "bad_host!"),
        ("--max-connections-per-ip", "lots"),
        ("--max-connection-rate-per-ip", "5/h"),
        ("--min-data-rate", "fast"),
    ] {
        let (code, err) = serve(&[flag, value]);
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: message should name the flag: {err}");
    }
    let (code, err) = serve(&["--listen-tls", "127.0.0.1:0"]);
    assert_eq!(code, 2);
    assert!(err.contains("--listen-tls"), "{err}");
}

#[test]
fn unusable_spool_exits_1() {
    let dir = TempDir::new("cli");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new(sluice_bin())
        .arg("serve")
        .arg("--spool")
        .arg(file.join("spool"))
        .args(["--listen", "127.0.0.1:0", "--hold", "--dns", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spool"), "{err}");
}

#[test]
fn listen_address_in_use_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("cli");
    let out = Command::new(sluice_bin())
        .arg("serve")
        .arg("--spool")
        .arg(dir.path().join("s"))
        .args(["--listen", &addr, "--reuse-port"])
        .output()
        .unwrap();
    // Not even with --reuse-port: the plain listener did not opt in to sharing.
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
}

#[test]
fn a_second_relay_on_a_busy_port_exits_instead_of_sharing_it() {
    // Without --reuse-port, relay B (another spool) must not take a share of relay A's
    // connections and strand that mail in its own spool: it exits 1 naming the address.
    let a = Relay::start(&[]);
    let addr = a.addr.to_string();
    let dir = TempDir::new("cli");
    let mut b = Command::new(sluice_bin())
        .arg("serve")
        .arg("--spool")
        .arg(dir.path().join("other"))
        .args(["--listen", &addr, "--hold", "--dns", "127.0.0.1:1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while b.try_wait().unwrap().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(10) {
            let _ = b.kill();
            let _ = b.wait();
            panic!("a second relay started on {addr}, which relay A holds");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = b.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "second relay on {addr}: {err}");
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
    // With --reuse-port on both, they share the port (one process per core).
    let first = Relay::start(&["--reuse-port"]);
    let port = first.addr.to_string();
    let second = Relay::start(&["--reuse-port", "--listen", &port]);
    assert_eq!(second.addr, first.addr);
    let mut c = second.client();
    c.expect("220");
}

#[test]
fn queue_list_and_stats() {
    let relay = Relay::start(&[]);
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let mut ids = Vec::new();
    for i in 0..3 {
        let r =
            c.send_message("a@b.test", &["x@y.test", "z@y.test"], format!("Subject: {i}\r\n\r\nbody\r\n").as_bytes());
        ids.push(queue_id(&r));
    }
    let (code, out, err) = queue_cmd(&relay.spool, &["list"]);
    assert_eq!(code, 0, "{err}");
    for id in &ids {
        assert!(out.contains(id.as_str()), "{out}");
    }
    assert!(out.contains("x@y.test") && out.contains("a@b.test"), "{out}");
    let (code, out, _) = queue_cmd(&relay.spool, &["stats", "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"messages\":3") && out.contains("\"recipients\":6"), "{out}");
    let (code, _, err) = queue_cmd(std::path::Path::new("/nonexistent/spool"), &["list"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/spool"), "{err}");
}

#[test]
fn passwd_prints_a_line_that_verifies() {
    use sluice::smtp::auth::AuthFile;
    for (input, pass) in
        [(&b"s3cret pass\n"[..], &b"s3cret pass"[..]), (b"crlf\r\n", b"crlf"), (b"no-newline", b"no-newline")]
    {
        let (code, out, err) = passwd("alice@example.com", input);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("alice@example.com:$argon2id$") && out.ends_with('\n'), "{out}");
        assert_eq!(out.lines().count(), 1, "{out}");
        let users = AuthFile::parse(&out).unwrap();
        assert!(users.verify(b"alice@example.com", pass), "{out}");
        assert!(!users.verify(b"alice@example.com", b"wrong"));
        if input != pass {
            assert!(!users.verify(b"alice@example.com", input), "the line ending is not part of the password");
        }
    }
}

#[test]
fn passwd_refuses_an_empty_password() {
    for input in [&b""[..], b"\n", b"\r\n"] {
        let (code, out, err) = passwd("alice", input);
        assert_eq!(code, 1, "{input:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains("empty password"), "{err}");
    }
}

#[test]
fn passwd_refuses_a_bad_user_name() {
    for user in ["", "a:b", "a b", "tab\tuser", "#comment"] {
        let (code, out, err) = passwd(user, b"pw\n");
        assert_eq!(code, 2, "{user:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains("user name"), "{err}");
    }
}
