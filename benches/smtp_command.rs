//! Command parsing throughput: framing plus parsing of a typical pipelined envelope batch.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sluice::smtp::command;
use sluice::smtp::line::{next_line, Framed};

const BATCH: &[u8] =
    b"EHLO client.example.com\r\nMAIL FROM:<bounce-1234@news.example.com> SIZE=10240 BODY=8BITMIME\r\n\
RCPT TO:<alice@example.org> NOTIFY=FAILURE ORCPT=rfc822;alice@example.org\r\nRCPT TO:<\"bob smith\"@example.net>\r\n\
RCPT TO:<carol@[192.0.2.1]>\r\nDATA\r\nRSET\r\nNOOP\r\nQUIT\r\n";

fn parse_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("smtp_command");
    g.throughput(Throughput::Bytes(BATCH.len() as u64));
    g.bench_function("frame_and_parse_batch", |b| {
        b.iter(|| {
            let mut input = black_box(BATCH);
            let mut n = 0;
            while let Framed::Line(line, used) = next_line(input) {
                if command::parse(line).is_ok() {
                    n += 1;
                }
                input = &input[used..];
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, parse_batch);
criterion_main!(benches);
