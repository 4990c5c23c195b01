//! `sluice-load send` into `sluice-load sink` over loopback: exact counts, byte-exact saved
//! messages with dot-leading lines (DATA pipelined, DATA lockstep, BDAT), failure exits.

mod common;

use common::{bin, run_bounded, send, Daemon, TempDir};
use std::process::Command;
use std::time::Duration;

fn sink(extra: &[&str]) -> Daemon {
    let mut args = vec!["sink", "--listen", "127.0.0.1:0", "--json", "--interval", "0"];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

#[test]
fn counts_are_exact() {
    let s = sink(&[]);
    let (code, r, err) = send(
        s.addr,
        &["--connections", "4", "--messages", "300", "--rcpts", "3", "--size", "2000", "--domains", "a.test,b.test"],
    );
    let sum = s.stop_json();
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["accepted"], 300);
    assert_eq!(r["rcpts_accepted"], 900);
    assert_eq!(r["bytes_accepted"], 600_000);
    assert_eq!(r["codes"]["250"], 300);
    assert_eq!(sum["messages"], 300);
    assert_eq!(sum["recipients"], 900);
    assert_eq!(sum["bytes"], 600_000);
    assert_eq!(sum["connections"], 4);
    assert!(r["latency_end_of_data"]["p99_us"].as_u64().unwrap() > 0);
}

#[test]
fn size_distribution_threads_and_per_connection() {
    let s = sink(&[]);
    let (code, r, err) = send(
        s.addr,
        &["--connections", "4", "--threads", "2", "--messages", "200", "--size", "1k:1,3k:1", "--per-connection", "10"],
    );
    let sum = s.stop_json();
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["accepted"], 200);
    assert_eq!(sum["messages"], 200);
    assert_eq!(sum["bytes"], r["bytes_accepted"]);
    let bytes = r["bytes_accepted"].as_u64().unwrap();
    // Both sizes were drawn: strictly between all-small and all-large.
    assert!(bytes > 200 * 1024 && bytes < 200 * 3072, "{bytes}");
    // At most 10 messages per connection: 20 connections, or a few more when the last messages
    // are spread over fresh connections while others are still busy.
    let conns = sum["connections"].as_u64().unwrap();
    assert!((20..=24).contains(&conns), "{sum}");
}

#[test]
fn saved_messages_are_byte_exact_in_every_mode() {
    let body: &[u8] = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\nmiddle . dot\r\n. \r\n...\r\nlast line\r\n";
    let dir = TempDir::new("body");
    let file = dir.path().join("body.eml");
    std::fs::write(&file, body).unwrap();
    let modes: [(&[&str], &[&str]); 4] =
        [(&[], &[]), (&["--no-pipelining"], &[]), (&["--bdat"], &[]), (&["--bdat"], &["--no-pipelining"])];
    for (send_flags, sink_flags) in modes {
        let save = TempDir::new("save");
        let mut sink_args = vec!["--save", save.path().to_str().unwrap()];
        sink_args.extend_from_slice(sink_flags);
        let s = sink(&sink_args);
        let mut args = vec!["--connections", "2", "--messages", "3", "--rcpts", "2", "--body", file.to_str().unwrap()];
        args.extend_from_slice(send_flags);
        let (code, r, err) = send(s.addr, &args);
        let sum = s.stop_json();
        assert_eq!(code, 0, "{send_flags:?}: {err}");
        assert_eq!(r["accepted"], 3, "{send_flags:?}");
        assert_eq!(sum["messages"], 3);
        let mut msgs = 0;
        for e in std::fs::read_dir(save.path()).unwrap() {
            let p = e.unwrap().path();
            match p.extension().and_then(|x| x.to_str()) {
                Some("msg") => {
                    assert_eq!(std::fs::read(&p).unwrap(), body, "{send_flags:?} {}", p.display());
                    msgs += 1;
                }
                Some("env") => {
                    let env = std::fs::read_to_string(&p).unwrap();
                    let transfer = if send_flags.contains(&"--bdat") { "BDAT" } else { "DATA" };
                    assert_eq!(
                        env,
                        format!(
                            "MAIL FROM:<load@sluice-load.test>\nRCPT TO:<user0@example.test>\n\
                             RCPT TO:<user1@example.test>\nTRANSFER: {transfer}\nPEER: 127.0.0.1\n\
                             EHLO: sluice-load.test\n"
                        )
                    );
                }
                _ => panic!("unexpected file {}", p.display()),
            }
        }
        assert_eq!(msgs, 3, "{send_flags:?}");
    }
}

#[test]
fn retry_prefix_and_rset_path() {
    // tf1-: the first attempt of the address gets 451 at RCPT, later ones are accepted. The
    // refused transaction must be reset (RSET) and the connection go on pipelining.
    let s = sink(&[]);
    let (code, r, err) = send(s.addr, &["--connections", "1", "--messages", "5", "--rcpt-prefix", "tf1-"]);
    let sum = s.stop_json();
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["codes"]["451"], 1, "{r}");
    assert_eq!(r["codes"]["250"], 4, "{r}");
    assert_eq!(r["rcpts_refused"], 1);
    assert_eq!(sum["messages"], 4);
    assert_eq!(sum["connections"], 1);
}

#[test]
fn nothing_accepted_exits_1() {
    let s = sink(&["--permfail-rate", "1"]);
    let (code, r, err) = send(s.addr, &["--connections", "2", "--messages", "20"]);
    drop(s);
    assert_eq!(code, 1);
    assert_eq!(r["codes"]["554"], 20, "{r}");
    assert!(err.contains("accepted no message"), "{err}");
}

#[test]
fn unreachable_target_exits_1_with_a_clear_message() {
    let (code, _, err) = send(common::closed_port(), &["--connections", "2", "--messages", "5"]);
    assert_eq!(code, 1);
    assert!(err.contains("could not reach") && err.contains("refused"), "{err}");
}

#[test]
fn drops_are_counted_not_hidden() {
    let s = sink(&["--drop-rate", "1"]);
    let (code, r, _) = send(s.addr, &["--connections", "2", "--messages", "10"]);
    let sum = s.stop_json();
    assert_eq!(code, 1);
    // Every transaction is lost; with pipelining one drop can take the next envelope too, so the
    // sink counts dropped connections (at least one per two transactions), the sender lost
    // transactions. A reconnect may find the work gone and just QUIT.
    assert_eq!(r["errors"], 10, "{r}");
    assert_eq!(r["accepted"], 0);
    let dropped = sum["dropped"].as_u64().unwrap();
    assert!(dropped >= 5 && dropped <= sum["connections"].as_u64().unwrap(), "{sum}");
    assert_eq!(sum["messages"], 0);
}

#[test]
fn rate_and_duration_are_bounded() {
    let s = sink(&[]);
    // 100 messages at 200/s take about half a second, not less.
    let (code, r, err) = send(s.addr, &["--connections", "4", "--messages", "100", "--rate", "200"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["accepted"], 100);
    let secs = r["elapsed_s"].as_f64().unwrap();
    assert!((0.45..5.0).contains(&secs), "{secs}");
    let (code, r, err) = send(s.addr, &["--connections", "2", "--duration", "500ms", "--rate", "100"]);
    assert_eq!(code, 0, "{err}");
    let n = r["accepted"].as_u64().unwrap();
    assert!((30..=60).contains(&n), "{n}");
    drop(s);
}

#[test]
fn bad_target_exits_2() {
    let out = run_bounded(Command::new(bin()).args(["send", "--to", "nowhere"]), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
}
