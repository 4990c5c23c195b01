//! `sluice-load noop` against `sluice-load sink` over loopback: one session, NOOPs counted and
//! summarised as JSON; failures (nobody listening, a server that never answers, a zero
//! interval) exit non-zero with the reason. No assertion depends on how fast anything is.

mod common;

use common::{bin, closed_port, run_bounded, Daemon};
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

fn noop(to: SocketAddr, args: &[&str]) -> Output {
    run_bounded(Command::new(bin()).args(["noop", "--to", &to.to_string()]).args(args), Duration::from_secs(60))
}

#[test]
fn one_session_reports_round_trips_as_json() {
    let sink = Daemon::start(&["sink", "--listen", "127.0.0.1:0", "--json", "--interval", "0"]);
    let addr = sink.addr;
    let out = noop(addr, &["--interval", "2ms", "--duration", "300ms", "--json"]);
    let sum = sink.stop_json();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["target"], addr.to_string());
    let n = r["noops"].as_u64().unwrap();
    // At least the first NOOP went, and never more than the grid has points.
    assert!((1..=150).contains(&n), "{r}");
    let rt = &r["round_trip"];
    assert_eq!(rt["count"].as_u64(), Some(n));
    let (p50, p99, max) =
        (rt["p50_us"].as_u64().unwrap(), rt["p99_us"].as_u64().unwrap(), rt["max_us"].as_u64().unwrap());
    assert!(p50 >= 1 && p50 <= p99 && p99 <= max, "{r}");
    // One connection, no mail.
    assert_eq!(sum["connections"], 1, "{sum}");
    assert_eq!(sum["messages"], 0, "{sum}");
}

#[test]
fn text_report_names_the_figures() {
    let sink = Daemon::start(&["sink", "--listen", "127.0.0.1:0", "--interval", "0"]);
    let out = noop(sink.addr, &["--interval", "5ms", "--duration", "50ms"]);
    drop(sink);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("round trips in") && text.contains("p99") && text.contains("max"), "{text}");
}

#[test]
fn failures_exit_non_zero_with_the_reason() {
    let out = noop(closed_port(), &["--duration", "50ms"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to"), "{out:?}");

    // A server that accepts and never greets: the timeout ends the wait.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = noop(silent.local_addr().unwrap(), &["--duration", "50ms", "--timeout", "200ms"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no reply to the greeting"), "{out:?}");

    let out = noop(closed_port(), &["--interval", "0ms"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--interval"), "{out:?}");
}
