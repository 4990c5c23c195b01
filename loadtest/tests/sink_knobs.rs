//! The sink's fault knobs give the promised replies, checked with a client that is not ours:
//! Python's `smtplib` (python3 is required on CI; skipped locally when missing).

mod common;

use common::{have, run_bounded, Daemon};
use std::process::Command;
use std::time::Duration;

fn sink(extra: &[&str]) -> Daemon {
    let mut args = vec!["sink", "--listen", "127.0.0.1:0", "--json", "--interval", "0"];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

/// Runs a Python snippet with `PORT` set; the snippet asserts and prints `ok`.
fn python(port: &str, code: &str) {
    let prelude = "import smtplib, socket, time, sys\nPORT = int(sys.argv[1])\n\
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
fn local_part_rules() {
    if !have("python3") {
        return;
    }
    let s = sink(&["--max-rcpts", "3"]);
    python(
        &s.port(),
        r#"
s = conn()
assert 'pipelining' in s.esmtp_features and 'chunking' in s.esmtp_features and 'smtputf8' in s.esmtp_features, s.esmtp_features
assert s.mail('a@x.test')[0] == 250
c, m = s.rcpt('rej-1@x.test'); assert (c, m[:5]) == (550, b'5.1.1'), (c, m)
c, m = s.rcpt('full-1@x.test'); assert (c, m[:5]) == (452, b'4.2.2'), (c, m)
# tf2-: 451 twice, then accepted (attempts are counted per address, across transactions)
for want in (451, 451, 250):
    c, m = s.rcpt('tf2-a@x.test'); assert c == want, (want, c, m)
assert s.rcpt('b@x.test')[0] == 250
assert s.rcpt('c@x.test')[0] == 250
c, m = s.rcpt('d@x.test'); assert (c, m[:5]) == (452, b'4.5.3'), (c, m)   # --max-rcpts 3
c, m = s.data(b'Subject: ok\r\n\r\nbody\r\n'); assert c == 250, (c, m)
s.mail('a@x.test'); s.rcpt('datafail-1@x.test')
c, m = s.data(b'x\r\n'); assert (c, m[:5]) == (554, b'5.6.0'), (c, m)
s.mail('a@x.test'); s.rcpt('datatf-1@x.test')
c, m = s.data(b'x\r\n'); assert (c, m[:5]) == (451, b'4.3.0'), (c, m)
s.quit()
s = conn(); s.mail('a@x.test'); s.rcpt('drop-1@x.test')
try:
    s.data(b'x' * 100000 + b'\r\n'); raise SystemExit('drop- did not drop')
except (smtplib.SMTPServerDisconnected, ConnectionError):
    pass
"#,
    );
    let sum = s.stop_json();
    assert_eq!(sum["messages"], 1);
    assert_eq!(sum["recipients"], 3);
    assert_eq!(sum["rejected"], 1);
    assert_eq!(sum["tempfailed"], 1);
    assert_eq!(sum["dropped"], 1);
    assert_eq!(sum["rcpts_refused"], 5);
}

#[test]
fn injected_rates_at_rcpt_and_after_data() {
    if !have("python3") {
        return;
    }
    let s = sink(&["--permfail-rate", "1", "--fail-at", "rcpt"]);
    python(&s.port(), "s = conn(); s.mail('a@x.test')\nc, m = s.rcpt('u@x.test'); assert c == 550, (c, m)");
    drop(s);
    let s = sink(&["--tempfail-rate", "100%"]);
    python(
        &s.port(),
        "s = conn(); s.mail('a@x.test'); assert s.rcpt('u@x.test')[0] == 250\nc, m = s.data(b'x\\r\\n'); assert c == 451, (c, m)",
    );
    let sum = s.stop_json();
    assert_eq!(sum["tempfailed"], 1);
}

#[test]
fn delay_and_drop_rate() {
    if !have("python3") {
        return;
    }
    let s = sink(&["--delay", "300ms"]);
    python(
        &s.port(),
        "s = conn(); s.mail('a@x.test'); s.rcpt('u@x.test')\nt = time.time(); c, m = s.data(b'x\\r\\n')\n\
         assert c == 250 and time.time() - t >= 0.29, (c, time.time() - t)\nassert s.noop()[0] == 250",
    );
    drop(s);
    let s = sink(&["--drop-rate", "1"]);
    python(
        &s.port(),
        "s = conn(); s.mail('a@x.test'); s.rcpt('u@x.test')\ntry:\n    s.data(b'y' * 100000 + b'\\r\\n'); raise SystemExit('no drop')\n\
         except (smtplib.SMTPServerDisconnected, ConnectionError):\n    pass",
    );
    let sum = s.stop_json();
    assert_eq!(sum["dropped"], 1);
    assert_eq!(sum["messages"], 0);
}
