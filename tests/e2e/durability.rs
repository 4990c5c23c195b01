//! Durability: every `250` survives `kill -9`; SIGTERM drains with `421`; a damaged spool is
//! recovered; a full disk gets `452 4.3.1` and the relay recovers once space returns; a failed
//! group commit answers its whole batch `451` (failpoint `SLUICE_FAILPOINT_SYNC`).

use super::support::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Clients send while the relay is killed with SIGKILL at varying moments; after each restart,
/// every acknowledged message is in the spool exactly once with its exact bytes.
/// `SLUICE_SOAK_ROUNDS` sets the number of kills (default 4; `benches/soak.sh` runs 100).
#[test]
fn kill_9_never_loses_an_acknowledged_message() {
    let dir = TempDir::new("crash");
    let spool = dir.path().join("spool");
    let acked: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let rounds: usize = std::env::var("SLUICE_SOAK_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    for round in 0..rounds {
        let mut relay = Relay::start_on(&spool, &[]);
        let addr = relay.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..4 {
            let acked = acked.clone();
            let stop = stop.clone();
            workers.push(std::thread::spawn(move || {
                let mut n = 0u32;
                'conn: while !stop.load(Ordering::SeqCst) {
                    let Ok(stream) = std::net::TcpStream::connect(addr) else { break };
                    drop(stream);
                    let mut c = Client::connect(addr);
                    if !c.reply().starts_with("220") || !c.cmd("EHLO w.test").starts_with("250") {
                        break;
                    }
                    for _ in 0..50 {
                        if stop.load(Ordering::SeqCst) {
                            break 'conn;
                        }
                        n += 1;
                        // Every fifth body is over 16 KiB: the spool writes those with pwrite
                        // rather than through the map.
                        let fill = if n.is_multiple_of(5) {
                            16 * 1024 + (n as usize * 997) % 50_000
                        } else {
                            (n as usize * 37) % 3000
                        };
                        let body = format!("Subject: r{round} w{w} n{n}\r\n\r\n{}\r\n..dot\r\n", "z".repeat(fill));
                        let unstuffed = body.replace("\r\n..dot", "\r\n.dot").into_bytes();
                        if !c.cmd("MAIL FROM:<a@b.test>").starts_with("250")
                            || !c.cmd("RCPT TO:<x@y.test>").starts_with("250")
                            || !c.cmd("DATA").starts_with("354")
                        {
                            continue 'conn;
                        }
                        c.send(body.as_bytes());
                        c.send(b".\r\n");
                        let r = c.reply();
                        if r.starts_with("250 2.0.0 Ok: queued as") {
                            acked.lock().unwrap().insert(queue_id(&r), unstuffed);
                        } else {
                            continue 'conn;
                        }
                    }
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(150 + 113 * (round % 8) as u64));
        relay.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            let _ = w.join();
        }
    }
    let acked = acked.lock().unwrap();
    assert!(acked.len() > 20, "too few messages acknowledged to mean anything: {}", acked.len());
    assert!(acked.values().any(|b| b.len() > 16 * 1024), "no large (pwrite) message was acknowledged");
    let stored = spool_messages(&spool);
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &stored {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "a queue id appears twice");
    let by_id: HashMap<&str, &Vec<u8>> = stored.iter().map(|(i, b)| (i.as_str(), b)).collect();
    for (id, body) in acked.iter() {
        let got = by_id.get(id.as_str()).unwrap_or_else(|| panic!("acknowledged message {id} lost"));
        assert!(got.starts_with(b"Received: "), "{id}");
        assert!(got.ends_with(body), "{id}: bytes differ");
    }
    eprintln!(
        "soak: {rounds} kill -9 cycles, {} messages answered 250, {} stored, none lost or duplicated",
        acked.len(),
        stored.len()
    );
    // A restart after all that recovers cleanly and serves.
    let relay = Relay::start_on(&spool, &[]);
    let mut c = relay.client();
    c.expect("220");
}

#[test]
fn sigterm_gives_421_and_keeps_everything() {
    let mut relay = Relay::start(&[]);
    let _dir = relay.take_dir();
    let mut a = relay.client();
    a.expect("220");
    a.expect_ok("EHLO c.test", "250");
    let r = a.send_message("a@b.test", &["x@y.test"], b"Subject: before\r\n\r\nkeep me\r\n");
    let id = queue_id(&r);
    let mut idle = relay.client();
    idle.expect("220");
    relay.signal("TERM");
    a.expect("421 4.3.0");
    idle.expect("421 4.3.0");
    let st = relay.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "{}", relay.log());
    assert!(std::net::TcpStream::connect(relay.addr).is_err(), "listener must be closed");
    let msgs = spool_messages(&relay.spool);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, id);
}

#[test]
fn sigterm_lets_a_message_in_flight_finish() {
    let mut relay = Relay::start(&["--shutdown-grace", "5s"]);
    let _dir = relay.take_dir();
    let mut a = relay.client();
    a.expect("220");
    a.expect_ok("EHLO c.test", "250");
    a.expect_ok("MAIL FROM:<a@b.test>", "250");
    a.expect_ok("RCPT TO:<x@y.test>", "250");
    a.expect_ok("DATA", "354");
    a.send(b"Subject: in flight\r\n\r\n");
    relay.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    a.send(b"rest\r\n.\r\n");
    let r = a.expect("250 2.0.0 Ok: queued as");
    a.expect("421 4.3.0");
    assert_eq!(relay.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let msgs = spool_messages(&relay.spool);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, queue_id(&r));
}

#[test]
fn full_disk_gets_452_then_recovers() {
    let Some(fs) = Tmpfs::mount("full", "4m") else { return };
    let spool = fs.mnt.join("spool");
    let relay = Relay::start_on(&spool, &["--spool-segment-size", "256k", "--max-message-size", "100k"]);
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let first = c.send_message("a@b.test", &["x@y.test"], b"Subject: first\r\n\r\nfits\r\n");
    assert!(first.starts_with("250"), "{first}");
    let filler = fs.fill();
    let body = format!("Subject: big\r\n\r\n{}\r\n", "q".repeat(60_000));
    let mut refused = None;
    for _ in 0..40 {
        let r = try_send(&mut c, "a@b.test", "x@y.test", body.as_bytes());
        if r.starts_with("452 4.3.1") {
            refused = Some(r);
            break;
        }
        assert!(r.starts_with("250"), "{r}");
    }
    let refused = refused.expect("a full spool must answer 452 4.3.1");
    // Below the reserve (1.5 x the message size limit) the refusal comes at MAIL, before any
    // data is sent, and the session stays usable.
    let r = c.cmd("MAIL FROM:<a@b.test>");
    assert!(r.starts_with("452 4.3.1"), "refused at MAIL, not after DATA: {r} (first refusal {refused})");
    relay.wait_log("event=spool_space state=full");
    std::fs::remove_file(&filler).unwrap();
    let t0 = Instant::now();
    loop {
        let r = try_send(&mut c, "a@b.test", "x@y.test", body.as_bytes());
        if r.starts_with("250") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "relay did not recover: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(c);
    drop(relay);
    let msgs = spool_messages(&spool);
    assert!(msgs.iter().any(|(_, b)| b.ends_with(b"fits\r\n")), "the first message survives");
}

/// Sends three marked messages, stops the relay with SIGTERM, and returns (spool dir guard,
/// spool path, ids, the single segment file holding them).
fn three_messages() -> (TempDir, std::path::PathBuf, Vec<String>, std::path::PathBuf) {
    let dir = TempDir::new("damage");
    let spool = dir.path().join("spool");
    let mut relay = Relay::start_on(&spool, &[]);
    // A fresh spool moves new mail to its first pre-written spare as soon as that is ready:
    // wait for it, so that all three messages land in one segment.
    let t0 = std::time::Instant::now();
    let spare_ready =
        || std::fs::read_dir(&spool).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".ready"));
    while !spare_ready() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no spare segment written");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = format!("Subject: m{i}\r\n\r\nMARKER-{i}-{}\r\n", "p".repeat(200));
        ids.push(queue_id(&c.send_message("a@b.test", &["x@y.test"], body.as_bytes())));
    }
    drop(c);
    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let segs: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "spool"))
        .filter(|p| std::fs::read(p).unwrap().windows(9).any(|w| w == b"MARKER-0-"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    (dir, spool, ids, segs[0].clone())
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn torn_tail_is_cut_and_the_rest_kept() {
    let (_dir, spool, ids, seg) = three_messages();
    let mut bytes = std::fs::read(&seg).unwrap();
    // Cut the file in the middle of the third message, as a crash during its append would.
    let cut = find(&bytes, b"MARKER-2-") + 50;
    bytes.truncate(cut);
    std::fs::write(&seg, &bytes).unwrap();
    let relay = Relay::start_on(&spool, &[]);
    relay.wait_log("event=spool_warning");
    let log = relay.log();
    assert!(log.contains("torn tail at offset"), "{log}");
    assert!(log.contains(seg.file_name().unwrap().to_str().unwrap()), "the warning names the segment: {log}");
    let (_, out, _) = queue_cmd(&spool, &["list"]);
    assert!(out.contains(&ids[0]) && out.contains(&ids[1]), "{out}");
    assert!(!out.contains(&ids[2]), "{out}");
    assert!(std::fs::metadata(&seg).unwrap().len() < cut as u64, "the torn bytes are cut from the file");
    // The relay goes on accepting after recovery.
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    assert!(c.send_message("a@b.test", &["x@y.test"], b"Subject: after\r\n\r\nok\r\n").starts_with("250"));
}

#[test]
fn corrupt_record_in_the_middle_is_skipped_with_a_warning() {
    let (_dir, spool, ids, seg) = three_messages();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = find(&bytes, b"MARKER-1-") + 20;
    bytes[at] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    let relay = Relay::start_on(&spool, &[]);
    relay.wait_log("event=spool_warning");
    let log = relay.log();
    assert!(log.contains("corrupt record at offset"), "{log}");
    let (_, out, err) = queue_cmd(&spool, &["list"]);
    assert!(out.contains(&ids[0]) && out.contains(&ids[2]), "{out}");
    assert!(!out.contains(&ids[1]), "{out}");
    assert!(err.contains("corrupt record"), "queue list reports it too: {err}");
}

/// The forgery found by the review: records embedded in a body (sent with BDAT, which takes any
/// bytes, to `<postmaster>`, which anyone may write to) must never come to life at recovery,
/// even when the record that holds them is damaged; the damaged bytes go to `corrupt/`.
#[test]
fn records_forged_in_a_body_never_come_to_life() {
    use sluice::message::{Envelope, QueueId};
    use sluice::spool::format::{self, RecordKey};
    // A forged envelope in the framing of earlier builds (the only one a client can know).
    let mut env = Envelope::default();
    env.sender = b"ceo@bank.example".to_vec();
    env.push_rcpt(b"victim@elsewhere.example", b"", 0);
    let fbody = b"Subject: forged\r\n\r\nforged\r\n";
    let mut forged = vec![0u8; format::message_record_len(&env, fbody).unwrap()];
    format::encode_message(&mut forged, &RecordKey::LEGACY, QueueId(0x7777_7777), 0, &env, fbody).unwrap();
    let mut body = b"Subject: hi\r\n\r\nMARK".to_vec();
    while !body.len().is_multiple_of(8) {
        body.push(b'.');
    }
    for _ in 0..64 {
        body.extend_from_slice(&forged);
    }
    let dir = TempDir::new("forge");
    let spool = dir.path().join("spool");
    let mut relay = Relay::start_on(&spool, &[]);
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO c.test", "250");
    c.expect_ok("MAIL FROM:<a@b.test>", "250");
    c.expect_ok("RCPT TO:<postmaster>", "250");
    c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
    c.send(&body);
    let id = queue_id(&c.expect("250"));
    drop(c);
    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(10)).code(), Some(0));
    // One bit flips in the stored body, far from the record's header.
    let seg = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).is_ok_and(|b| b.windows(4).any(|w| w == b"MARK")))
        .expect("the segment holding the message");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = find(&bytes, b"MARK") + 30 * forged.len();
    bytes[at] ^= 0x08;
    std::fs::write(&seg, &bytes).unwrap();
    let relay = Relay::start_on(&spool, &[]);
    relay.wait_log("event=spool_warning");
    let (_, out, _) = queue_cmd(&spool, &["list"]);
    assert!(
        !out.contains("victim@elsewhere.example") && !out.contains("ceo@bank.example"),
        "forged mail queued: {out}"
    );
    assert!(!out.contains(&id), "the damaged message is not delivered either: {out}");
    assert!(!relay.log().contains("7777"), "{}", relay.log());
    let quarantined: Vec<_> = std::fs::read_dir(spool.join("corrupt")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(std::fs::read(&quarantined[0]).unwrap().windows(4).any(|w| w == b"MARK"));
}

/// A group commit that fails answers every message of its batch `451 4.3.0` and acknowledges
/// none; the message acknowledged before it survives a restart, once and byte-exact.
///
/// The contract for the 451 messages after a restart is at-least-once, as `Spool::commit`
/// documents: their records are abandoned in memory, not erased, so when their segment
/// survives (here it does: it holds the acknowledged message) recovery finds them and the
/// relay would deliver them, a duplicate of the copy the client resends. Never a loss, never a
/// forged or partial message: each one found is exactly what its client sent, at most once.
#[test]
fn a_failed_sync_answers_the_whole_batch_451_and_acknowledges_none() {
    let dir = TempDir::new("failsync");
    let spool = dir.path().join("spool");
    let mut relay = Relay::start_on_env(&spool, &[], &[("SLUICE_FAILPOINT_SYNC", "fail-after:1")]);
    // The first group commit succeeds.
    let mut c = relay.client();
    c.expect("220");
    c.expect_ok("EHLO first.test", "250");
    let first = c.send_message("a@b.test", &["x@y.test"], b"Subject: first\r\n\r\nkept\r\n");
    assert!(first.starts_with("250 2.0.0 Ok: queued as"), "{first}");
    // Several clients finish DATA together: their messages share the failing commit.
    const N: usize = 6;
    let barrier = Arc::new(std::sync::Barrier::new(N));
    let workers: Vec<_> = (0..N)
        .map(|i| {
            let (addr, barrier) = (relay.addr, barrier.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                c.expect("220");
                c.expect_ok("EHLO batch.test", "250");
                c.expect_ok("MAIL FROM:<a@b.test>", "250");
                c.expect_ok("RCPT TO:<x@y.test>", "250");
                c.expect_ok("DATA", "354");
                let body = format!("Subject: batch {i}\r\n\r\n{}\r\n", "q".repeat(100 + i * 1000));
                c.send(body.as_bytes());
                barrier.wait();
                c.send(b".\r\n");
                (body, c.reply())
            })
        })
        .collect();
    let answers: Vec<(String, String)> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    for (i, (_, reply)) in answers.iter().enumerate() {
        assert!(reply.starts_with("451 4.3.0"), "client {i} got {reply:?}; log:\n{}", relay.log());
    }
    relay.wait_log("event=spool_error");
    // The relay goes on: the next message is refused too (the failpoint fails every later sync),
    // but the session is answered, not dropped.
    let again = c.send_message("a@b.test", &["x@y.test"], b"Subject: later\r\n\r\nx\r\n");
    assert!(again.starts_with("451 4.3.0"), "{again}");
    relay.kill9();

    // A restart without the failpoint: the acknowledged message is there once, byte-exact.
    let relay = Relay::start_on(&spool, &[]);
    relay.client().expect("220");
    let stored = spool_messages(&spool);
    let first_id = queue_id(&first);
    let kept: Vec<_> = stored.iter().filter(|(id, _)| *id == first_id).collect();
    assert_eq!(kept.len(), 1, "acknowledged message {first_id}: {} copies", kept.len());
    assert!(kept[0].1.ends_with(b"Subject: first\r\n\r\nkept\r\n"));
    // The others, if recovered, are whole and once each (see the doc above).
    let mut recovered_451 = 0;
    for (id, body) in stored.iter().filter(|(id, _)| *id != first_id) {
        assert!(body.starts_with(b"Received: "), "{id}");
        let matching = answers.iter().filter(|(sent, _)| body.ends_with(sent.as_bytes())).count()
            + usize::from(body.ends_with(b"Subject: later\r\n\r\nx\r\n"));
        assert_eq!(matching, 1, "{id}: recovered bytes are no message a client sent");
        recovered_451 += 1;
    }
    assert!(stored.len() == 1 + recovered_451 && recovered_451 <= N + 1);
    eprintln!("failed sync: {N} messages answered 451; after a restart {recovered_451} of the 451s were recovered");
}
