//! `sluice-load disk`: the device's own flush latency, the floor of a durable commit.
//!
//! Writes `--size` bytes at consecutive offsets of one file with `pwrite` and makes each write
//! durable with `fdatasync`, `--count` times, and reports the latency percentiles and the CPU
//! time each write+sync costs this process (user and system, from the scheduler's own count:
//! on a VM the flush's virtio notification and completion are paid here). The file
//! is prepared as the spool's segments could be: written with zeros and synced first
//! (`prewritten`, no block allocation or extent conversion left for the commits), or
//! `fallocate`d (unwritten extents: every commit also converts extents and journals metadata),
//! or grown by the writes themselves (`append`). `benches/commit.sh` runs it next to the relay
//! on the same filesystem.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;

use crate::util::parse_bytes;

/// How the file is prepared before the timed writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Prepare {
    /// Zeros written and synced over the whole file first.
    Prewritten,
    /// `posix_fallocate` over the whole file (unwritten extents).
    Fallocate,
    /// An empty file the writes extend.
    Append,
}

#[derive(Args, Debug, Clone)]
pub struct DiskArgs {
    /// Directory to put the scratch file in (the spool's filesystem); the file is removed after.
    #[arg(long)]
    dir: PathBuf,
    /// Bytes per write (e.g. 20k: a group commit of 20 one-KiB messages).
    #[arg(long, default_value = "20k", value_parser = parse_bytes)]
    size: usize,
    /// Timed write+sync pairs.
    #[arg(long, default_value_t = 2000)]
    count: u64,
    /// How the file is prepared.
    #[arg(long, value_enum, default_value_t = Prepare::Prewritten)]
    prepare: Prepare,
    /// Syncs in flight at once: this many threads, each writing its own `--count` writes
    /// into its own stretch of the one file and syncing them (a pipelined group commit's
    /// shape). Every sync's latency goes into the one histogram.
    #[arg(long, default_value_t = 1)]
    inflight: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: &DiskArgs) -> Result<i32> {
    if a.size == 0 || a.count == 0 || a.inflight == 0 {
        bail!("--size, --count and --inflight must be positive");
    }
    let path = a.dir.join(format!(".sluice-load-disk.{}", std::process::id()));
    let result = measure(a, &path);
    let _ = std::fs::remove_file(&path);
    let (h, cpu_ns) = result?;
    let cpu_us = cpu_ns as f64 / 1e3 / (a.count * a.inflight) as f64;
    let (p50, p99, max, mean) = (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max(), h.mean());
    if a.json {
        println!(
            "{}",
            serde_json::json!({"size": a.size, "count": a.count, "prepare": format!("{:?}", a.prepare).to_lowercase(), "inflight": a.inflight,
                "p50_us": p50, "p99_us": p99, "max_us": max, "mean_us": mean, "cpu_us_per_sync": cpu_us})
        );
    } else {
        println!(
            "pwrite {} B + fdatasync, {} times, {} in flight, file {:?}: p50 {p50} us, p99 {p99} us, max {max} us, mean {mean:.0} us, CPU {cpu_us:.1} us each",
            a.size, a.count, a.inflight, a.prepare
        );
    }
    Ok(0)
}

/// The latency histogram and the CPU time of the timed loop, in nanoseconds.
fn measure(a: &DiskArgs, path: &PathBuf) -> Result<(Histogram<u64>, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    let size = a.size as u64;
    let total = size * a.count * a.inflight;
    prepare(&file, a.prepare, total).with_context(|| format!("preparing {}", path.display()))?;
    let cpu0 = self_cpu_ns();
    let file = &file;
    let hists: Vec<Result<Histogram<u64>>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..a.inflight)
            .map(|t| {
                s.spawn(move || -> Result<Histogram<u64>> {
                    let buf = vec![0x5au8; a.size];
                    let mut h = Histogram::<u64>::new(3)?;
                    let base = t * size * a.count;
                    for i in 0..a.count {
                        let start = Instant::now();
                        file.write_all_at(&buf, base + i * size)?;
                        file.sync_data()?;
                        h.record(start.elapsed().as_micros() as u64)?;
                    }
                    Ok(h)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a writer panicked")))).collect()
    });
    let cpu = self_cpu_ns() - cpu0;
    let mut h = Histogram::<u64>::new(3)?;
    for one in hists {
        h.add(one?)?;
    }
    Ok((h, cpu))
}

/// User and system CPU time of this process, its ended threads included (`getrusage`).
#[allow(unsafe_code)]
fn self_cpu_ns() -> u64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a valid rusage for the kernel to fill; RUSAGE_SELF cannot fail.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

fn prepare(file: &File, how: Prepare, len: u64) -> std::io::Result<()> {
    match how {
        Prepare::Append => Ok(()),
        Prepare::Fallocate => {
            rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len).map_err(Into::into)
        }
        Prepare::Prewritten => {
            let zeros = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < len {
                let n = zeros.len().min((len - off) as usize);
                file.write_all_at(&zeros[..n], off)?;
                off += n as u64;
            }
            file.sync_all()
        }
    }
}
