//! `sluice-load disk`: the device's own flush latency, the floor of a durable commit.
//!
//! Writes `--size` bytes at consecutive offsets of one file with `pwrite` and makes each write
//! durable with `fdatasync`, `--count` times, and reports the latency percentiles. The file
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
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: &DiskArgs) -> Result<i32> {
    if a.size == 0 || a.count == 0 {
        bail!("--size and --count must be positive");
    }
    let path = a.dir.join(format!(".sluice-load-disk.{}", std::process::id()));
    let result = measure(a, &path);
    let _ = std::fs::remove_file(&path);
    let h = result?;
    let (p50, p99, max, mean) = (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max(), h.mean());
    if a.json {
        println!(
            "{}",
            serde_json::json!({"size": a.size, "count": a.count, "prepare": format!("{:?}", a.prepare).to_lowercase(),
                "p50_us": p50, "p99_us": p99, "max_us": max, "mean_us": mean})
        );
    } else {
        println!(
            "pwrite {} B + fdatasync, {} times, file {:?}: p50 {p50} us, p99 {p99} us, max {max} us, mean {mean:.0} us",
            a.size, a.count, a.prepare
        );
    }
    Ok(0)
}

fn measure(a: &DiskArgs, path: &PathBuf) -> Result<Histogram<u64>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    let size = a.size as u64;
    let total = size * a.count;
    prepare(&file, a.prepare, total).with_context(|| format!("preparing {}", path.display()))?;
    let buf = vec![0x5au8; a.size];
    let mut h = Histogram::<u64>::new(3)?;
    for i in 0..a.count {
        let t = Instant::now();
        file.write_all_at(&buf, i * size)?;
        file.sync_data()?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(h)
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
