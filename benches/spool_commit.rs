//! Spool group commit: append 1 KiB messages and commit in batches of 1, 16 and 256, with and
//! without fsync. One element is one message, so the report reads as messages per second and
//! shows how far group commit amortises the msync + fdatasync of the synchronous `Spool::commit`
//! (the relay's sync thread runs `msync` only, see `SyncJob::run`).

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::message::{Envelope, QueueId};
use sluice::spool::{Spool, SpoolOptions};

/// A fresh spool directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("sluice-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn envelope() -> Envelope {
    let mut env = Envelope::default();
    env.sender = b"sender@example.org".to_vec();
    env.helo = b"client.example.org".to_vec();
    env.push_rcpt(b"rcpt@example.net", b"", 0);
    env
}

fn bench_commit(c: &mut Criterion) {
    let env = envelope();
    let body = vec![b'x'; 1024];
    let mut group = c.benchmark_group("spool_commit");
    for fsync in [true, false] {
        for batch in [1u64, 16, 256] {
            let tmp = TempDir::new(&format!("{fsync}-{batch}"));
            let opts =
                SpoolOptions { dir: tmp.0.clone(), fsync, segment_size: 64 << 20, min_free_space: 0, spares: false };
            let Ok((mut spool, _)) = Spool::open(opts) else {
                eprintln!("spool_commit: cannot open a spool in {}", tmp.0.display());
                return;
            };
            let mut next_id = 0u64;
            group.throughput(Throughput::Elements(batch));
            let name = format!("{}/batch_{batch}", if fsync { "fsync" } else { "no_fsync" });
            group.bench_function(name, |b| {
                b.iter(|| {
                    for _ in 0..batch {
                        next_id += 1;
                        let appended = spool.append_message(QueueId(next_id), 0, &env, &body);
                        if let Ok((_, loc)) = appended {
                            // Finished at once, so sealed segments are reclaimed and the bench
                            // does not fill the disk.
                            spool.release_message(loc.segment, Default::default());
                        }
                    }
                    spool.commit().is_ok()
                })
            });
            drop(spool);
        }
    }
    group.finish();
}

criterion_group!(benches, bench_commit);
criterion_main!(benches);
