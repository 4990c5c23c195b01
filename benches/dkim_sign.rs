//! DKIM signing on one thread with the relay's own signer (`sluice::dkim`, aws-lc-rs underneath):
//! the bare signature (RFC 8301 RSA-2048 with SHA-256, RFC 8463 Ed25519 over SHA-256) of a
//! short input, the figure to put next to `openssl speed rsa2048 ed25519`, and the whole job a
//! signing worker does for a typical 4 KiB message (header split, relaxed canonicalization,
//! body hash, header hash input, signature, base64 and folding: RFC 6376 §3.4, §3.7).
//!
//! One element is one signature, so criterion's throughput line reads as signatures per
//! second. `benches/dkim.sh` reads the medians from `target/criterion/dkim/*/new/estimates.json`.
//! The RSA key is made at start with aws-lc-rs, as `sluice dkim-keygen` does, before the
//! measurement.

use aws_lc_rs::rand::SystemRandom;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::dkim::{KeyTable, Signer, SigningKey};

/// The signing domain of the message and of both keys.
const DOMAIN: &str = "bench.test";

/// A fresh RSA-2048 key, through the same PKCS#8 PEM path as a `--dkim-key` file.
fn rsa_key() -> SigningKey {
    use aws_lc_rs::encoding::AsDer as _;
    use base64::Engine as _;
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("RSA-2048 key generation");
    let der = key.as_der().expect("PKCS#8 encoding");
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap()).collect();
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", lines.join("\n"));
    SigningKey::from_pem("rsa1", pem.as_bytes()).expect("the generated RSA key loads")
}

/// An Ed25519 key from a fixed seed (the signature cost does not depend on the key).
fn ed25519_key() -> SigningKey {
    SigningKey::ed25519_from_seed("ed1", &[7u8; 32]).expect("32-byte seed")
}

/// A typical 4 KiB message as a client hands it in: the usual header fields of a bulk mail
/// (11 of them signed) and a plain-text body with some runs of spaces and trailing blanks for
/// the relaxed body canonicalization to fold.
fn message_4k() -> Vec<u8> {
    let mut m = b"From: \"Bench Sender\" <news@bench.test>\r\n\
To: <rcpt@dest.test>\r\n\
Subject: Your weekly bench report\r\n\
Date: Sun, 06 Dec 2026 10:00:00 +0000\r\n\
Message-ID: <20261206100000.12345@bench.test>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
List-Id: Bench news <news.bench.test>\r\n\
List-Unsubscribe: <mailto:unsub@bench.test>, <https://bench.test/u/12345>\r\n\
List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\
Feedback-ID: 12345:news:bench\r\n\
X-Mailer: sluice-bench\r\n\
\r\n"
        .to_vec();
    let line = b"The quick brown fox  jumps over the lazy dog; pack my box with five dozen jugs. \r\n";
    while m.len() + line.len() <= 4096 {
        m.extend_from_slice(line);
    }
    // Pad to exactly 4 KiB with one last short line.
    let pad = 4096 - m.len() - 2;
    m.extend(std::iter::repeat_n(b'x', pad));
    m.extend_from_slice(b"\r\n");
    m
}

fn bench_sign(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let keys = [("rsa2048", rsa_key()), ("ed25519", ed25519_key())];
    // A short input, as `openssl speed` signs: the cost is the private-key operation.
    let data = [0x5au8; 36];
    let msg = message_4k();
    assert_eq!(msg.len(), 4096);
    let mut group = c.benchmark_group("dkim");
    group.throughput(Throughput::Elements(1));
    let mut sig = Vec::with_capacity(512);
    for (name, key) in &keys {
        group.bench_function(format!("{name}_sign"), |b| {
            b.iter(|| {
                sig.clear();
                key.sign(&data, &rng, &mut sig).expect("signing with a loaded key");
                sig.len()
            })
        });
    }
    let mut out = Vec::with_capacity(2048);
    for (name, key) in keys {
        let mut table = KeyTable::new();
        table.insert(DOMAIN, key);
        let mut signer = Signer::new();
        // Checked once outside the loop: the message is signed, not skipped.
        let outcome = signer.sign(&table, &msg, 1_796_000_000, &rng, &mut out);
        assert_eq!(outcome.as_str(), format!("{DOMAIN}:{}", if name == "rsa2048" { "rsa1" } else { "ed1" }));
        group.bench_function(format!("{name}_message_4k"), |b| {
            b.iter(|| {
                out.clear();
                signer.sign(&table, &msg, 1_796_000_000, &rng, &mut out);
                out.len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_sign);
criterion_main!(benches);
