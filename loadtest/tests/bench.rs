//! `sluice-load bench` smoke run with a tiny N: starts sink, relay and (on CI, where Postfix is
//! installed) smtp-source/smtp-sink, and prints one JSON report. The relay binary is the one
//! next to sluice-load (built by `cargo test --workspace`); locally it may be missing, then the
//! relay rows are skipped, on CI it must be there.

mod common;

use common::{bin, run_bounded};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[test]
fn bench_smoke() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let relay = Path::new(bin()).with_file_name("sluice");
    let mut args =
        vec!["bench", "--messages", "300", "--connections", "3", "--json", "--fsync", "never", "--timeout", "30s"];
    if !relay.exists() {
        assert!(!ci, "relay binary {} missing on CI", relay.display());
        eprintln!("relay binary missing: instruments only");
        args.push("--no-relay");
    }
    let postfix = Path::new("/usr/sbin/smtp-source").exists();
    assert!(postfix || !ci, "Postfix's smtp-source is required on CI");
    if postfix {
        args.push("--compare-postfix");
    }
    let out = run_bounded(Command::new(bin()).args(&args), Duration::from_secs(50));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    let rows = v["results"].as_array().unwrap();
    let want = 1 + usize::from(relay.exists()) + usize::from(postfix) * (1 + usize::from(relay.exists()));
    assert_eq!(rows.len(), want, "{v}");
    for r in rows {
        assert_eq!(r["runs"], 1, "{r}");
        assert_eq!(r["accepted"], 300, "{r}");
        assert!(r["msgs_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["target_cpu_us_per_msg"].as_f64().unwrap() >= 0.0, "{r}");
    }
    assert_eq!(v["end_to_end"], "not available until the relay delivers");
    if postfix {
        assert!(v["ratios"]["instrument rate, sluice-load / smtp-source+smtp-sink"].as_f64().unwrap() > 0.0, "{v}");
    }
    // Nothing the bench started is still running: no process has it as parent any more (it
    // exited), and none of its children survives it under our name.
    let leftovers = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let s = String::from_utf8_lossy(c);
            s.contains("sluice-bench-")
                || (s.contains("sluice-load") && s.contains("127.0.0.1:0") && s.contains("--interval"))
        })
        .count();
    assert_eq!(leftovers, 0, "bench left children running");
}
