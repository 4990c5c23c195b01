//! The costs TLS and AUTH add, per event: one full TLS handshake (server and client sides both
//! run here, over in-memory pipes; the server's share is about half), the TLS record layer on a
//! 1 KiB message each way and on a 64 KiB body in full-size records, and one Argon2id
//! verification (the AUTH worker's CPU per attempt).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::net::tls::{ClientTls, TlsRead, TlsSession};
use sluice::smtp::auth::{hash_password, AuthFile};

#[path = "../tests/common/tls_kit.rs"]
mod tls_kit;
use tls_kit::{server_tls, Pipe};

/// Moves bytes both ways until both sides are quiet; returns plaintext received by `b`.
fn pump(a: &mut TlsSession, ap: &mut Pipe, b: &mut TlsSession, bp: &mut Pipe, scratch: &mut [u8]) -> usize {
    let mut got = 0;
    for _ in 0..20 {
        let _ = a.flush(ap);
        bp.rx.extend(ap.tx.drain(..));
        let _ = b.flush(bp);
        ap.rx.extend(bp.tx.drain(..));
        while let TlsRead::Data(_) = a.read(ap, scratch) {}
        while let TlsRead::Data(n) = b.read(bp, scratch) {
            got += n;
        }
        if !a.wants_write() && !b.wants_write() && ap.rx.is_empty() && bp.rx.is_empty() {
            break;
        }
    }
    got
}

fn bench_tls(c: &mut Criterion) {
    let server_cfg = server_tls("bench");
    let client_cfg = ClientTls::unverified();
    let mut scratch = vec![0u8; 16 * 1024];
    let mut group = c.benchmark_group("tls");
    group.throughput(Throughput::Elements(1));
    group.bench_function("handshake_both_sides", |b| {
        b.iter(|| {
            let mut s = TlsSession::server(&server_cfg).unwrap();
            let mut c = TlsSession::client(&client_cfg, "mx.example.test").unwrap();
            let (mut sp, mut cp) = (Pipe::default(), Pipe::default());
            pump(&mut c, &mut cp, &mut s, &mut sp, &mut scratch);
            assert!(!s.is_handshaking());
        })
    });
    // Record layer: 1 KiB client → server (a message) and 100 bytes back (the reply).
    let mut s = TlsSession::server(&server_cfg).unwrap();
    let mut cl = TlsSession::client(&client_cfg, "mx.example.test").unwrap();
    let (mut sp, mut cp) = (Pipe::default(), Pipe::default());
    pump(&mut cl, &mut cp, &mut s, &mut sp, &mut scratch);
    let msg = vec![b'x'; 1024];
    group.throughput(Throughput::Bytes(1024));
    group.bench_function("record_1k_message", |b| {
        b.iter(|| {
            cl.write(&msg);
            s.write(&msg[..100]);
            let got = pump(&mut cl, &mut cp, &mut s, &mut sp, &mut scratch);
            assert_eq!(got, 1024);
        })
    });
    // Full-size records: 64 KiB of message body (four 16 KiB records) and the reply.
    let body = vec![b'y'; 64 * 1024];
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("record_64k_body", |b| {
        b.iter(|| {
            let mut sent = 0;
            let mut got = 0;
            while sent < body.len() {
                sent += cl.write(&body[sent..]);
                got += pump(&mut cl, &mut cp, &mut s, &mut sp, &mut scratch);
            }
            s.write(&msg[..100]);
            got += pump(&mut cl, &mut cp, &mut s, &mut sp, &mut scratch);
            assert_eq!(got, body.len());
        })
    });
    group.finish();
}

fn bench_auth(c: &mut Criterion) {
    let line = format!("alice:{}\n", hash_password(b"secret").unwrap());
    let users = AuthFile::parse(&line).unwrap();
    let mut group = c.benchmark_group("auth");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    group.bench_function("argon2id_verify", |b| b.iter(|| assert!(users.verify(b"alice", b"secret"))));
    group.bench_function("argon2id_unknown_user", |b| b.iter(|| assert!(!users.verify(b"mallory", b"secret"))));
    group.finish();
}

criterion_group!(benches, bench_tls, bench_auth);
criterion_main!(benches);
