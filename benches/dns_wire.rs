//! DNS codec throughput: encoding an MX query, decoding a typical MX answer with glue, and a
//! resolver round (lookup → query → answer → plan) on fixed bytes.

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sluice::dns::wire::{decode_answer, encode_query, QType};
use sluice::dns::Resolver;

/// A recursive resolver's answer to `example.com MX` (id 0x1234): two MX records and the A
/// records of both exchanges in the additional section, with name compression (RFC 1035 §4.1.4).
fn mx_answer(id: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 2]); // QR RD RA; 1 question, 2 answers, 2 additional
    m.extend_from_slice(b"\x07example\x03com\x00\x00\x0f\x00\x01"); // example.com MX IN, at offset 12
    let ttl = 3600u32.to_be_bytes();
    let mut exchanges = Vec::new();
    for (pref, label) in [(10u16, b"mx1"), (20, b"mx2")] {
        m.extend_from_slice(&[0xc0, 12, 0, 15, 0, 1]); // -> example.com, MX, IN
        m.extend_from_slice(&ttl);
        m.extend_from_slice(&[0, 8]);
        m.extend_from_slice(&pref.to_be_bytes());
        exchanges.push(m.len() as u8);
        m.push(3);
        m.extend_from_slice(label);
        m.extend_from_slice(&[0xc0, 12]); // mxN.example.com
    }
    for (i, at) in exchanges.into_iter().enumerate() {
        m.extend_from_slice(&[0xc0, at, 0, 1, 0, 1]); // -> mxN.example.com, A, IN
        m.extend_from_slice(&ttl);
        m.extend_from_slice(&[0, 4, 192, 0, 2, i as u8 + 1]);
    }
    m
}

fn codec(c: &mut Criterion) {
    let answer = mx_answer(0x1234);
    let decoded = decode_answer(&answer).expect("the fixture decodes");
    assert_eq!((decoded.answers.len(), decoded.additionals.len()), (2, 2));

    let mut g = c.benchmark_group("dns_wire");
    let query = encode_query(0x1234, "example.com", QType::Mx).unwrap();
    g.throughput(Throughput::Bytes(query.len() as u64));
    g.bench_function("encode_mx_query", |b| {
        b.iter(|| encode_query(black_box(0x1234), black_box("example.com"), QType::Mx))
    });
    g.throughput(Throughput::Bytes(answer.len() as u64));
    g.bench_function("decode_mx_answer_with_glue", |b| b.iter(|| decode_answer(black_box(&answer))));
    g.finish();

    // One full MX lookup through the resolver with a cold cache: MX query out, answer in (its
    // glue fills the A slots), AAAA queries out and empty NOERROR answers (NODATA) in.
    let (queries, done) = cold_lookup();
    assert_eq!(queries, 2);
    assert_eq!(done.and_then(|(_, plan)| plan.ok()).map(|p| p.hosts.len()), Some(2));
    let mut g = c.benchmark_group("dns_resolver");
    g.bench_function("cold_mx_lookup_with_glue", |b| b.iter(cold_lookup));
    g.finish();
}

type Done = Option<(String, Result<sluice::dns::MxPlan, sluice::dns::DnsError>)>;

fn cold_lookup() -> (usize, Done) {
    let now = Instant::now();
    let mut r = Resolver::new(1);
    let _ = r.lookup_mx(black_box("example.com"), now);
    let q = r.poll_transmit().expect("an MX query");
    let _ = r.handle_response(&mx_answer(q.id), now, false);
    let mut n = 0;
    while let Some(t) = r.poll_transmit() {
        // Echo the question as an empty NOERROR response: set QR, drop the OPT record.
        let mut empty = t.bytes;
        empty[2] |= 0x80;
        empty[11] = 0;
        let qend = 12 + empty[12..].iter().position(|&b| b == 0).unwrap_or(0) + 5;
        empty.truncate(qend);
        let _ = r.handle_response(&empty, now, false);
        n += 1;
    }
    (n, r.poll_done())
}

criterion_group!(benches, codec);
criterion_main!(benches);
