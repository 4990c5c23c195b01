//! Traffic shaping over real sockets: `--shaping` files (bad ones refused at start and kept out
//! at SIGHUP), a site's message rate as a big receiver counts it, and automation against a
//! Gmail-like rate limit (`421 4.7.28`) and a Yahoo-like `TSS04` deferral played by
//! `sluice-load sink`. Loopback only.

use super::delivery::{sink, Aux};
use super::support::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Stops a `--json` sink and returns its summary.
fn sink_report(mut sink: Aux) -> String {
    let _ = Command::new("kill").arg("-TERM").arg(sink.child.id().to_string()).status();
    let out = std::mem::replace(&mut sink.child, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number after `"key":` in a JSON text.
fn num(json: &str, key: &str) -> u64 {
    json.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {json}"))
}

/// A refusal total of a sink summary (the top-level `refusals`, which sorts after the
/// per-connection ones).
fn refused(json: &str, kind: &str) -> u64 {
    num(json.rsplit("\"refusals\":{").next().unwrap_or(""), kind)
}

/// The `accepted_per_second` series of a sink summary.
fn per_second(json: &str) -> Vec<u64> {
    let list = json.split("\"accepted_per_second\":[").nth(1).and_then(|s| s.split(']').next()).unwrap_or("");
    list.split(',').filter_map(|n| n.trim().parse().ok()).collect()
}

/// Sends `n` messages to `relay` over 4 connections with `sluice-load send`.
fn load(bin: &Path, relay: &Relay, n: usize) {
    let out = Command::new(bin)
        .args(["send", "--to", &relay.addr.to_string(), "--messages", &n.to_string(), "--connections", "4"])
        .args(["--domains", "dst.test", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A relay sending everything to `sink` (no DNS) under the shaping file `file`, plus `extra`.
fn shaped_relay(sink: &Aux, file: &str, extra: &[&str]) -> Relay {
    let to = sink.addr.to_string();
    let mut args = vec!["--relay-host", &to, "--dns", "127.0.0.1:9", "--shaping", file];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// Waits until `relay` has logged `n` deliveries; fails with its log once `limit` has passed
/// since `t0`.
fn wait_delivered(relay: &Relay, n: usize, t0: Instant, limit: Duration) {
    while relay.log().matches("outcome=delivered").count() < n {
        assert!(t0.elapsed() < limit, "{}", relay.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn a_bad_shaping_file_exits_2_naming_the_file_the_line_and_the_key() {
    let dir = TempDir::new("shaping-bad");
    let cases = [
        ("[default]\nconection_limit = 3\n", "line 2", "conection_limit"),
        ("[domain.\"a.test\"]\nmax_message_rate = \"fast\"\n", "line 2", "max_message_rate"),
        ("[[automation]]\nmatch = '(unclosed'\naction = \"suspend\"\nduration = \"1h\"\n", "line 2", "match"),
        ("[provider.google]\ntls = \"sometimes\"\n", "line 2", "tls"),
    ];
    for (i, (text, line, key)) in cases.iter().enumerate() {
        let file = write(dir.path(), &format!("bad{i}.toml"), text);
        let spool = dir.path().join(format!("spool{i}"));
        let out = Command::new(sluice_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--spool", &spool.display().to_string(), "--shaping", &file])
            .args(["--dns", "127.0.0.1:9"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains("--shaping") && err.contains(&file), "{err}");
        assert!(err.contains(line) && err.contains(key), "{text}: {err}");
    }
    let out = Command::new(sluice_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--shaping", "/nonexistent/shaping.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/shaping.toml"));
}

#[test]
fn a_site_message_rate_holds_as_the_receiver_counts_it_and_sighup_reloads_it() {
    let Some(bin) = load_bin() else { return };
    let dir = TempDir::new("shaping-rate");
    let rate = 20;
    let file = write(dir.path(), "shaping.toml", &format!("[default]\nmax_message_rate = \"{rate}/s\"\n"));
    let sink = sink(&bin, "127.0.0.1:0", &["--json"]);
    let relay = shaped_relay(&sink, &file, &[]);
    let n = 100;
    let t0 = Instant::now();
    load(&bin, &relay, n);
    wait_delivered(&relay, n, t0, Duration::from_secs(30));
    let took = t0.elapsed();
    // One bucket (one second of the rate) at once, then the rate: (100 - 20) / 20 = 4 s.
    assert!(took >= Duration::from_millis(3_500), "{n} messages at {rate}/s in {took:?}");
    let report = sink_report(sink);
    assert_eq!(num(&report, "messages"), n as u64, "{report}");
    let series = per_second(&report);
    // The sink counts at the end of data: a second may hold one more (see its README).
    assert!(series.iter().all(|&s| s <= 2 * rate + 1), "{series:?}");

    // A reload that does not parse keeps the rules; a good one applies at once.
    std::fs::write(&file, "[default]\nmax_message_rate = \"lots\"\n").unwrap();
    let _ = Command::new("kill").arg("-HUP").arg(relay.child.id().to_string()).status();
    relay.wait_log("shaping=\"failed, keeping the rules in force\"");
    assert!(relay.log().contains("line 2"), "{}", relay.log());
    std::fs::write(&file, "[default]\nmax_message_rate = \"1/min\"\n").unwrap();
    let _ = Command::new("kill").arg("-HUP").arg(relay.child.id().to_string()).status();
    relay.wait_log("shaping=ok");
}

/// Every `"opened_ms":N` of a sink summary (when each connection was accepted), sorted.
fn opened_ms(json: &str) -> Vec<u64> {
    let mut v: Vec<u64> = json
        .split("\"opened_ms\":")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn a_site_connection_rate_holds_as_the_receiver_counts_connections() {
    let Some(bin) = load_bin() else { return };
    let dir = TempDir::new("shaping-connrate");
    // One message per connection, so every message needs a new connection and a token of
    // max_connection_rate: a bucket of 2 at once, then 2 a second.
    let file = write(
        dir.path(),
        "shaping.toml",
        "[default]\nmax_connection_rate = \"2/s\"\nmax_deliveries_per_connection = 1\n",
    );
    let sink = sink(&bin, "127.0.0.1:0", &["--json"]);
    let relay = shaped_relay(&sink, &file, &[]);
    let n = 12;
    let t0 = Instant::now();
    load(&bin, &relay, n);
    wait_delivered(&relay, n, t0, Duration::from_secs(60));
    // Lower bounds on time and upper bounds on counts only: a loaded machine is slower, never
    // faster. (12 - 2) / 2 = 5 s at least.
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(4_500), "{n} connections at 2/s in {took:?}");
    let report = sink_report(sink);
    assert_eq!(num(&report, "messages"), n as u64, "{report}");
    let opened = opened_ms(&report);
    assert!(opened.len() >= n, "one connection per message: {report}");
    // In any second the bucket allows 2 + 2; one more for the sink accepting late a connection
    // the relay opened in the second before (a descheduled sink bunches them up).
    for (i, &t) in opened.iter().enumerate() {
        let in_second = opened[i..].iter().take_while(|&&u| u < t + 1_000).count();
        assert!(in_second <= 5, "{in_second} connections in the second from {t} ms: {opened:?}");
    }
}

#[test]
fn a_gmail_like_rate_limit_throttles_the_site_and_everything_still_arrives() {
    let Some(bin) = load_bin() else { return };
    let dir = TempDir::new("shaping-gmail");
    // A short throttle (the built-in rule is 90 minutes): 1 connection, 5 messages a second.
    let file = write(
        dir.path(),
        "shaping.toml",
        "[[automation]]\nmatch = '4\\.7\\.28'\naction = \"throttle\"\nduration = \"3s\"\n\
         connection_limit = 1\nmax_message_rate = \"5/s\"\n",
    );
    let sink = sink(&bin, "127.0.0.1:0", &["--json", "--rate-limit", "10/s"]);
    let relay = shaped_relay(&sink, &file, &["--retry-schedule", "1s"]);
    let n = 60;
    load(&bin, &relay, n);
    relay.wait_log("event=throttle");
    wait_delivered(&relay, n, Instant::now(), Duration::from_secs(60));
    let log = relay.log();
    let line = log.lines().find(|l| l.contains("event=throttle")).unwrap();
    assert!(line.contains("4.7.28") && line.contains("until="), "{line}");
    // No --source: the kernel picks the address, and the line names no source.
    assert!(!line.contains("source="), "{line}");
    let report = sink_report(sink);
    assert_eq!(num(&report, "messages"), n as u64, "{report}");
    assert!(refused(&report, "rate_limit") > 0, "the sink refused some: {report}");
}

#[test]
fn yahoo_tss04_suspends_the_site_with_no_attempt_while_it_lasts() {
    let Some(bin) = load_bin() else { return };
    let tss04 = "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user complaints";
    let sink = sink(&bin, "127.0.0.1:0", &["--json", "--defer-all-for", "60s", "--defer-reply", tss04]);
    let relay = Relay::start(&[
        "--relay-host",
        &sink.addr.to_string(),
        "--dns",
        "127.0.0.1:9",
        "--retry-schedule",
        "1s",
        "--domain-concurrency",
        "1",
        "--source",
        "ip2=127.0.0.2",
    ]);
    load(&bin, &relay, 10);
    relay.wait_log("event=suspend");
    let log = relay.log();
    let line = log.lines().find(|l| l.contains("event=suspend")).unwrap();
    // Sites are per (source, site): the line names the source whose site is suspended.
    assert!(line.contains("TSS04") && line.contains("site=127.0.0.1 source=ip2"), "{line}");
    // Two hours: in the next 3 s (three retry delays) nothing is tried.
    let attempts = relay.log().matches("rcpt=").count();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(relay.log().matches("rcpt=").count(), attempts, "{}", relay.log());
    let (code, out, err) = queue_cmd(&relay.spool, &["suspensions", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("TSS04") && out.contains("\"manual\":false"), "{out}");
    // The operator lifts it: the relay tries again at once, meets TSS04 again, stops again.
    let (code, _, err) = queue_cmd(&relay.spool, &["resume", "--site", "127.0.0.1"]);
    assert_eq!(code, 0, "{err}");
    relay.wait_log("event=resume");
    let t0 = Instant::now();
    while relay.log().matches("event=suspend").count() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", relay.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = sink_report(sink);
    assert!(num(&report, "connections") <= 3, "{report}");
    assert_eq!(num(&report, "messages"), 0, "{report}");
}
