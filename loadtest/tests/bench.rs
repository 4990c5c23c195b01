//! `sluice-load bench` smoke runs with a tiny N: the accept-only scenarios (sink, relay and, on
//! CI where Postfix is installed, smtp-source/smtp-sink), the end-to-end scenarios by both
//! routes, and end to end through a throw-away Postfix instance. The relay binary is the one
//! next to sluice-load (built by `cargo test --workspace`); locally it may be missing, then the
//! relay rows are skipped, on CI it must be there. Each test checks that the bench left nothing
//! running.

mod common;

use common::{bin, run_bounded};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// The benches run one at a time: each counts leftover processes by name, which a bench running
/// beside it would own, and they measure, so they should not share the two cores either.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether the relay binary is there; on CI it must be.
fn have_relay() -> bool {
    let relay = Path::new(bin()).with_file_name("sluice");
    assert!(relay.exists() || !ci(), "relay binary {} missing on CI", relay.display());
    if !relay.exists() {
        eprintln!("relay binary {} missing", relay.display());
    }
    relay.exists()
}

/// Runs `sluice-load bench ARGS --json` bounded by `limit`; the parsed report.
fn bench(args: &[&str], limit: Duration) -> Value {
    let out = run_bounded(Command::new(bin()).arg("bench").args(args).arg("--json"), limit);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not one JSON report ({e}): {stderr}"))
}

/// Processes the bench may have started that are still alive: anything with a bench temp
/// directory (relay spool) in its command line, and our sink/dns started by the bench.
/// Only binaries of this build count: another build's benchmarks may run on the same machine.
fn leftovers() -> Vec<String> {
    let build_dir = Path::new(bin()).parent().map(|d| d.display().to_string()).unwrap_or_default();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|s| s.starts_with(&format!("{build_dir}/")))
        .filter(|s| {
            s.contains("sluice-bench-")
                || (s.contains("sluice-load")
                    && (s.contains("--expect-recipients") || s.contains("bench.test=") || s.contains("--interval 0")))
        })
        .collect()
}

/// Live (not zombie) processes named `master` or running as the `postfix` user.
fn postfix_processes() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|st| {
            let field = |k: &str| st.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("");
            !field("State:").starts_with('Z')
                && (field("Name:") == "master" || {
                    let uid = field("Uid:").split_whitespace().next().unwrap_or("");
                    Some(uid.to_string()) == postfix_uid()
                })
        })
        .count()
}

fn postfix_uid() -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| l.strip_prefix("postfix:").and_then(|r| r.split(':').nth(1)).map(String::from))
}

fn e2e_rows(v: &Value) -> Vec<&Value> {
    v["results"].as_array().unwrap().iter().filter(|r| r["end_to_end"] == true).collect()
}

#[test]
fn bench_smoke() {
    let _serial = serial();
    let relay = have_relay();
    let mut args =
        vec!["--messages", "300", "--connections", "3", "--fsync", "never", "--timeout", "30s", "--no-end-to-end"];
    if !relay {
        args.push("--no-relay");
    }
    let postfix = Path::new("/usr/sbin/smtp-source").exists();
    assert!(postfix || !ci(), "Postfix's smtp-source is required on CI");
    if postfix {
        args.push("--compare-postfix");
    }
    let v = bench(&args, Duration::from_secs(50));
    let rows = v["results"].as_array().unwrap();
    let want = 1 + usize::from(relay) + usize::from(postfix) * (1 + usize::from(relay));
    assert_eq!(rows.len(), want, "{v}");
    for r in rows {
        assert_eq!(r["runs"], 1, "{r}");
        assert_eq!(r["accepted"], 300, "{r}");
        assert!(r["msgs_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["target_cpu_us_per_msg"].as_f64().unwrap() >= 0.0, "{r}");
        assert!(r.get("end_to_end").is_none(), "{r}");
    }
    if postfix {
        assert!(v["ratios"]["instrument rate, sluice-load / smtp-source+smtp-sink"].as_f64().unwrap() > 0.0, "{v}");
    }
    assert_eq!(leftovers(), Vec::<String>::new(), "bench left children running");
}

/// Sender → sluice → sink by both routes, 2 recipients per message over 4 MX domains.
#[test]
fn bench_end_to_end_routes() {
    let _serial = serial();
    if !have_relay() {
        return;
    }
    let v = bench(
        // Enough messages that the relay's CPU, counted in 10 ms clock ticks, is never 0.
        &["--messages", "1000", "--connections", "4", "--rcpts", "2", "--route", "relay-host,mx", "--timeout", "30s"],
        Duration::from_secs(90),
    );
    let rows = e2e_rows(&v);
    assert_eq!(rows.len(), 2, "{v}");
    for (r, route) in rows.iter().zip(["relay-host", "mx"]) {
        assert_eq!((r["relay"].as_str(), r["route"].as_str()), (Some("sluice"), Some(route)), "{r}");
        assert_eq!(r["accepted"], 1000, "{r}");
        assert!(r["msgs_per_s"].as_f64().unwrap() > 0.0, "{r}");
        // End to end cannot be faster than the relay accepted the mail.
        assert!(r["elapsed_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["accept_msgs_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["target_cpu_us_per_msg"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["target_peak_rss_kib"].as_u64().unwrap() > 0, "{r}");
        assert!(r["delivery_delay_ms"]["p50"].is_u64(), "{r}");
        assert!(r["latency_end_of_data_us"]["p99"].is_u64(), "{r}");
        assert_eq!(r["queued_after"], 0, "{r}");
    }
    assert!(v["ratios"]["end-to-end rate, mx / relay-host"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["ratios"]["end-to-end rate (mx) / direct sender->sink rate"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(leftovers(), Vec::<String>::new(), "bench left children running");
}

/// Sender → Postfix (from a temporary config directory) → sink, beside sluice.
#[test]
fn bench_end_to_end_postfix() {
    let _serial = serial();
    if !have_relay() {
        return;
    }
    if !Path::new("/usr/sbin/postfix").exists() {
        assert!(!ci(), "Postfix is required on CI");
        eprintln!("skipping: Postfix not installed");
        return;
    }
    let before = postfix_processes();
    let tmp_dirs = || {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("sluice-bench-postfix-"))
            .count()
    };
    let tmp_before = tmp_dirs();
    let v = bench(
        &["--messages", "100", "--connections", "4", "--route", "relay-host", "--compare-postfix", "--timeout", "60s"],
        Duration::from_secs(120),
    );
    let rows = e2e_rows(&v);
    let pf = rows.iter().find(|r| r["relay"] == "postfix").unwrap_or_else(|| panic!("no Postfix row: {v}"));
    assert_eq!(pf["accepted"], 100, "{pf}");
    assert!(pf["msgs_per_s"].as_f64().unwrap() > 0.0, "{pf}");
    assert!(pf["target_cpu_us_per_msg"].as_f64().unwrap() > 0.0, "{pf}");
    assert_eq!(pf["queued_after"], 0, "{pf}");
    assert!(v["ratios"]["end-to-end rate, sluice (relay-host) / Postfix"].as_f64().unwrap() > 0.0, "{v}");
    assert!(postfix_processes() <= before, "the bench's Postfix instance is still running");
    assert!(tmp_dirs() <= tmp_before, "the Postfix temp directory was not removed");
    assert_eq!(leftovers(), Vec::<String>::new(), "bench left children running");
}

/// `--compare-tls`: each accept scenario plaintext and with STARTTLS (the relay with a generated
/// certificate), the ratios, and the SLA verdict when the relay rows ran.
#[test]
fn bench_compare_tls() {
    let _serial = serial();
    let relay = have_relay();
    let mut args = vec![
        "--messages",
        "300",
        "--connections",
        "3",
        "--fsync",
        "never",
        "--timeout",
        "30s",
        "--no-end-to-end",
        "--compare-tls",
    ];
    if !relay {
        args.push("--no-relay");
    }
    let v = bench(&args, Duration::from_secs(60));
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2 + 2 * usize::from(relay), "{v}");
    for (i, r) in rows.iter().enumerate() {
        let tls = i % 2 == 1;
        assert_eq!(r["tls"], tls, "{r}");
        assert_eq!(r["accepted"], 300, "{r}");
        assert!(r["msgs_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["latency_handshake_us"].is_object(), tls, "{r}");
    }
    assert!(v["ratios"]["instrument rate, STARTTLS / plaintext"].as_f64().unwrap() > 0.0, "{v}");
    if relay {
        let r = v["ratios"]["relay accept rate, STARTTLS / plaintext"].as_f64().unwrap();
        assert_eq!(v["tls_sla"]["ratio"].as_f64(), Some(r), "{v}");
        assert_eq!(v["tls_sla"]["met"], r >= 0.5, "{v}");
    }
    assert_eq!(leftovers(), Vec::<String>::new(), "bench left children running");
}
