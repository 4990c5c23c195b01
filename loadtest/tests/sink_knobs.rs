//! The sink's fault knobs and receiver limits (rate per address, deferral window, caps per
//! connection and per address, and their JSON counters) give the promised replies, checked with
//! a client that is not ours: Python's `smtplib` (python3 is required on CI; skipped locally
//! when missing).

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

/// Python helpers for the limit tests: a closed connection reads as EOF.
const LIMIT_HELPERS: &str = r#"
def closed(s):
    s.sock.settimeout(5)
    try:
        return s.sock.recv(1) == b''
    except ConnectionError:
        return True
def one(s, rcpt='u@x.test'):
    c, m = s.mail('a@x.test')
    if c != 250:
        return c, m
    assert s.rcpt(rcpt)[0] == 250
    return s.data(b'Subject: t\r\n\r\nx\r\n')
"#;

fn peer<'a>(sum: &'a serde_json::Value, ip: &str) -> &'a serde_json::Value {
    &sum["per_peer"][ip]
}

#[test]
fn rate_limit_answers_the_scripted_421_per_address_and_closes() {
    if !have("python3") {
        return;
    }
    // 2/s: a bucket of two, shared by every connection from 127.0.0.1.
    let s = sink(&["--rate-limit", "2/s"]);
    python(
        &s.port(),
        &format!(
            "{LIMIT_HELPERS}
s = conn()
assert one(s)[0] == 250 and one(s)[0] == 250
c, m = s.mail('a@x.test')
assert c == 421 and m.startswith(b'4.7.28 [127.0.0.1] Our system has detected an unusual rate of unsolicited mail'), (c, m)
assert m.endswith(b'has been temporarily rate limited.'), m
assert closed(s)
# Another connection from the same address: the same empty bucket.
s = conn(); c, m = s.mail('a@x.test'); assert c == 421, (c, m); assert closed(s)
# A token comes back every 500 ms.
time.sleep(0.6)
s = conn(); assert one(s)[0] == 250; s.quit()"
        ),
    );
    let sum = s.stop_json();
    assert_eq!(sum["messages"], 3);
    assert_eq!(sum["refusals"]["rate_limit"], 2, "{sum}");
    assert_eq!(sum["rate_limit"]["bucket"], 2);
    assert_eq!(peer(&sum, "127.0.0.1")["refusals"]["rate_limit"], 2, "{sum}");
    assert_eq!(peer(&sum, "127.0.0.1")["messages"], 3);
    assert_eq!(peer(&sum, "127.0.0.1")["connections"], 3);

    // A reply other than 421 keeps the connection open; `{ip}` is filled in.
    let s = sink(&["--rate-limit", "1/h", "--rate-reply", "450 4.7.1 {ip} slow down"]);
    python(
        &s.port(),
        &format!(
            "{LIMIT_HELPERS}
s = conn(); assert one(s)[0] == 250
c, m = s.mail('a@x.test'); assert (c, m) == (450, b'4.7.1 127.0.0.1 slow down'), (c, m)
assert s.noop()[0] == 250
c, m = s.mail('a@x.test'); assert c == 450, (c, m)
s.quit()"
        ),
    );
    assert_eq!(s.stop_json()["refusals"]["rate_limit"], 2);
}

#[test]
fn rate_limit_holds_under_a_sender_that_keeps_trying() {
    if !have("python3") {
        return;
    }
    // 20/s with a bucket of 20: at most 40 MAILs pass in any second, and in all at most
    // 20 + 20 per second elapsed. Messages are counted at the end of data, a moment after
    // their MAIL took the token, so a second's count may include one more MAIL from the end
    // of the second before.
    let s = sink(&["--rate-limit", "20/s"]);
    python(
        &s.port(),
        &format!(
            "{LIMIT_HELPERS}
end = time.time() + 2.2
ok = refused = conns = 0
while time.time() < end:
    s = conn(); conns += 1
    while time.time() < end:
        c, m = one(s)
        if c == 250:
            ok += 1
        else:
            assert c == 421, (c, m); refused += 1; assert closed(s); break
    else:
        s.quit()
print(ok, refused, conns)
assert ok >= 25 and refused > 0, (ok, refused)"
        ),
    );
    let sum = s.stop_json();
    let per_s: Vec<u64> = sum["accepted_per_second"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let elapsed = sum["elapsed_s"].as_f64().unwrap();
    assert!(per_s.iter().all(|&n| n <= 40 + 1), "{per_s:?}");
    assert_eq!(per_s.iter().sum::<u64>(), sum["messages"].as_u64().unwrap());
    assert!((sum["messages"].as_u64().unwrap() as f64) <= 20.0 + 20.0 * elapsed, "{sum}");
    assert!(sum["messages"].as_u64().unwrap() < 20 + 20 * 3, "the limit let too much through: {sum}");
    let conns = sum["per_connection"].as_array().unwrap();
    assert_eq!(conns.len() as u64, sum["connections"].as_u64().unwrap());
    // Every connection but the last ended on a refusal.
    assert!(sum["refusals"]["rate_limit"].as_u64().unwrap() + 1 >= conns.len() as u64, "{sum}");
}

#[test]
fn deferral_window_ends_after_its_duration() {
    if !have("python3") {
        return;
    }
    let yahoo = "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user complaints";
    let s = sink(&["--defer-all-for", "1500ms", "--defer-reply", yahoo]);
    python(
        &s.port(),
        &format!(
            "{LIMIT_HELPERS}
t0 = time.time()
deferred = 0
while True:
    s = conn()
    c, m = s.mail('a@x.test')
    if c == 250:
        break
    assert (c, m) == (421, b'4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user complaints'), (c, m)
    assert closed(s)
    deferred += 1
    time.sleep(0.2)
# The window counts from the sink's start, which came a little before t0.
assert deferred >= 2 and time.time() - t0 < 3, (deferred, time.time() - t0)
assert s.rcpt('u@x.test')[0] == 250 and s.data(b'x\\r\\n')[0] == 250
s.quit()"
        ),
    );
    let sum = s.stop_json();
    assert_eq!(sum["messages"], 1);
    let deferred = sum["refusals"]["window"].as_u64().unwrap();
    assert!(deferred >= 2, "{sum}");
    assert_eq!(peer(&sum, "127.0.0.1")["refusals"]["window"], deferred);
    // The default reply is Gmail's 4.7.28.
    let s = sink(&["--defer-all-for", "1h"]);
    python(
        &s.port(),
        "s = conn(); c, m = s.mail('a@x.test'); assert c == 421 and m.startswith(b'4.7.28 [127.0.0.1] '), (c, m)",
    );
    drop(s);
}

#[test]
fn message_cap_per_connection() {
    if !have("python3") {
        return;
    }
    let s = sink(&["--max-messages-per-connection", "2"]);
    python(
        &s.port(),
        &format!(
            "{LIMIT_HELPERS}
s = conn(); assert one(s)[0] == 250 and one(s)[0] == 250
c, m = s.mail('a@x.test'); assert (c, m) == (421, b'4.7.0 Too many messages on this connection'), (c, m)
assert closed(s)
s = smtplib.SMTP('127.0.0.1', PORT, timeout=10); s.ehlo('second.test'); assert one(s)[0] == 250; s.quit()"
        ),
    );
    let sum = s.stop_json();
    assert_eq!(sum["messages"], 3);
    assert_eq!(sum["refusals"]["messages_per_connection"], 1);
    let conns = sum["per_connection"].as_array().unwrap();
    assert_eq!(conns.len(), 2, "{sum}");
    assert_eq!(conns[0]["ehlo"], "t.test");
    assert_eq!(conns[0]["messages"], 2);
    assert_eq!(conns[0]["refusals"]["messages_per_connection"], 1);
    assert_eq!(conns[1]["ehlo"], "second.test");
    assert_eq!(conns[1]["messages"], 1);
    assert_eq!(conns[1]["refusals"]["messages_per_connection"], 0);
    assert_eq!(sum["per_connection_omitted"], 0);
}

#[test]
fn connection_cap_per_address() {
    if !have("python3") {
        return;
    }
    let s = sink(&["--max-connections-per-ip", "2"]);
    python(
        &s.port(),
        &format!(
            "{LIMIT_HELPERS}
def from_ip(ip, name):
    s = smtplib.SMTP(timeout=10, source_address=(ip, 0))
    code, msg = s.connect('127.0.0.1', PORT)
    if code != 220:
        raise smtplib.SMTPConnectError(code, msg)
    s.ehlo(name); return s
a = from_ip('127.0.0.1', 'a.test'); b = from_ip('127.0.0.1', 'b.test')
try:
    from_ip('127.0.0.1', 'c.test'); raise SystemExit('third connection served')
except smtplib.SMTPConnectError as e:
    assert (e.smtp_code, e.smtp_error) == (421, b'4.7.0 Too many connections from your IP'), e
# Another address has its own count.
d = from_ip('127.0.0.2', 'd.test'); assert one(d)[0] == 250; d.quit()
# A slot freed is a slot taken again (once the sink has seen the close).
a.quit()
for _ in range(50):
    try:
        e = from_ip('127.0.0.1', 'e.test'); break
    except smtplib.SMTPConnectError:
        time.sleep(0.05)
assert one(e)[0] == 250 and one(b)[0] == 250
e.quit(); b.quit()"
        ),
    );
    let sum = s.stop_json();
    let local = peer(&sum, "127.0.0.1");
    assert_eq!(local["refusals"]["connections_per_ip"], 1, "{sum}");
    assert_eq!(local["messages"], 2);
    assert_eq!(peer(&sum, "127.0.0.2")["connections"], 1);
    assert_eq!(peer(&sum, "127.0.0.2")["messages"], 1);
    assert_eq!(sum["refusals"]["connections_per_ip"], 1);
    // Each connection with its address, EHLO name and counts.
    let conns = sum["per_connection"].as_array().unwrap();
    let find = |name: &str| conns.iter().find(|c| c["ehlo"] == name).unwrap_or_else(|| panic!("{name}: {sum}"));
    assert_eq!(find("d.test")["peer"], "127.0.0.2");
    assert_eq!(find("d.test")["messages"], 1);
    assert_eq!(find("e.test")["peer"], "127.0.0.1");
    assert_eq!(find("a.test")["messages"], 0);
    let refused: Vec<_> = conns.iter().filter(|c| c["refusals"]["connections_per_ip"] == 1).collect();
    assert_eq!(refused.len(), 1, "{sum}");
    assert_eq!(refused[0]["ehlo"], "");
}

#[test]
fn bad_limit_flags_exit_2_naming_the_flag() {
    for (flag, value) in [
        ("--rate-limit", "10"),
        ("--rate-limit", "10/d"),
        ("--rate-limit", "0/s"),
        ("--rate-reply", "250 fine"),
        ("--defer-reply", "hello"),
        ("--defer-all-for", "soon"),
        ("--max-messages-per-connection", "0"),
        ("--max-connections-per-ip", "x"),
    ] {
        let out = run_bounded(
            Command::new(common::bin()).args(["sink", "--listen", "127.0.0.1:0", flag, value]),
            Duration::from_secs(10),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}

/// Python: connects to the sink, reads the greeting, says EHLO and reads its reply.
const AFTER_EHLO: &str = "s = socket.create_connection(('127.0.0.1', PORT), timeout=10)
f = s.makefile('rb')
assert f.readline().startswith(b'220')
s.sendall(b'EHLO t.test\\r\\n')
while not f.readline().startswith(b'250 '):
    pass
";

#[test]
fn a_421_at_mail_ends_with_fin_even_behind_a_large_pipelined_batch() {
    if !have("python3") {
        return;
    }
    // A client that pipelines a whole BDAT transaction (more than the sink's 64 KiB input
    // buffer) into a deferring sink must read the 421 and then an orderly end of stream: a close
    // with unread input would reset the connection instead.
    let s = sink(&["--defer-all-for", "1h"]);
    python(
        &s.port(),
        &format!(
            "{AFTER_EHLO}s.sendall(b'MAIL FROM:<a@x.test>\\r\\nRCPT TO:<u@x.test>\\r\\nBDAT 150000 LAST\\r\\n' + b'x' * 150000)
line = f.readline()
assert line.startswith(b'421 4.7.28 [127.0.0.1] '), line
try:
    rest = f.read()
except ConnectionResetError:
    raise SystemExit('reset after the 421')
assert rest == b'', rest"
        ),
    );
    assert_eq!(s.stop_json()["refusals"]["window"], 1);
}

#[test]
fn a_client_still_writing_after_the_421_gets_an_orderly_end() {
    if !have("python3") {
        return;
    }
    // The client reads the 421 with most of its pipelined message still unsent, waits, then
    // sends the rest: the sink has sent FIN and reads what comes until the client's own FIN,
    // so neither the rest nor the read after it meets a reset.
    let s = sink(&["--defer-all-for", "1h"]);
    python(
        &s.port(),
        &format!(
            "import time
{AFTER_EHLO}s.sendall(b'MAIL FROM:<a@x.test>\\r\\nRCPT TO:<u@x.test>\\r\\nBDAT 150000 LAST\\r\\n' + b'x' * 1000)
line = f.readline()
assert line.startswith(b'421 4.7.28 [127.0.0.1] '), line
time.sleep(0.3)
try:
    s.sendall(b'x' * 70000)
    time.sleep(0.2)
    s.sendall(b'x' * 79000)
    rest = f.read()
except (ConnectionResetError, BrokenPipeError) as e:
    raise SystemExit(f'reset after the 421: {{e!r}}')
assert rest == b'', rest"
        ),
    );
    assert_eq!(s.stop_json()["refusals"]["window"], 1);
}
