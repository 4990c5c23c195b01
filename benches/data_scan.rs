//! DATA scanner throughput at never / rare / common dot-stuffing densities, 1 KiB and 100 KiB.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::smtp::data::DataScanner;

/// A body of `size` bytes of 76-column lines; every `dot_every`-th line starts with a stuffed dot.
fn body(size: usize, dot_every: Option<usize>) -> Vec<u8> {
    let mut v = Vec::with_capacity(size + 8);
    let mut line = 0;
    while v.len() < size {
        if dot_every.is_some_and(|k| line % k == 0) {
            v.extend_from_slice(b"..");
        }
        v.extend_from_slice(&b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklmnopqrst"[..74]);
        v.extend_from_slice(b"\r\n");
        line += 1;
    }
    v.extend_from_slice(b".\r\n");
    v
}

fn scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_scan");
    for size in [1024usize, 100 * 1024] {
        for (name, dots) in [("never", None), ("rare", Some(100)), ("common", Some(2))] {
            let input = body(size, dots);
            let mut out = Vec::with_capacity(input.len());
            g.throughput(Throughput::Bytes(input.len() as u64));
            g.bench_with_input(BenchmarkId::new(name, size), &input, |b, input| {
                b.iter(|| {
                    out.clear();
                    let mut s = DataScanner::new(u64::MAX);
                    let r = s.scan(black_box(input), &mut out);
                    assert!(r.done);
                    r.consumed
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, scan);
criterion_main!(benches);
