//! Fuzz target: spool recovery on arbitrary segment files.
//!
//! The input is cut before every `SLUICESG` (the segment magic) into segment files, written
//! to a scratch spool directory as `seg-<seq>.spool`, `seq` taken from the part's own header
//! when it decodes (else its position). Then, through the public spool API only:
//! `Spool::scan_read_only`, `spool::read_messages`, `spool::queue_listing` (the read-only
//! `sluice queue` paths), and `Spool::open` twice (the relay's recovery, which may cut torn
//! tails), reading back every queued message it reports with `Spool::message_with_body` and
//! `Spool::body`.
//!
//! Checks: no panic on any file content (the spool's own contract), every message recovery
//! reports can be read back, and a second open right after the first (nothing appended)
//! finds the same queued messages.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use sluice::spool::format::{decode_segment_header, segment_file_name, SEGMENT_MAGIC};
use sluice::spool::{self, Spool, SpoolOptions};

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut used = std::collections::HashSet::new();
    for (i, part) in split_on_magic(data, &SEGMENT_MAGIC).into_iter().enumerate().take(8) {
        let seq = match decode_segment_header(part) {
            Ok(h) if h.seq < 1 << 40 && used.insert(h.seq) => h.seq,
            _ => {
                let seq = 1_000_000 + i as u64;
                used.insert(seq);
                seq
            }
        };
        std::fs::write(dir.join(segment_file_name(seq)), part).unwrap();
    }

    let _ = Spool::scan_read_only(&dir);
    let _ = spool::read_messages(&dir);
    let _ = spool::queue_listing(&dir);

    let first = open_and_read(&dir);
    let second = open_and_read(&dir);
    assert_eq!(first, second, "a second recovery found other messages than the first");
    let _ = std::fs::remove_dir_all(&dir);
});

/// Opens the spool (recovery), reads back every queued message; returns their ids and bodies.
fn open_and_read(dir: &std::path::Path) -> Option<Vec<(u64, Vec<u8>)>> {
    // Small preallocation: each run creates a fresh active segment.
    let opts = SpoolOptions { dir: dir.to_path_buf(), fsync: false, segment_size: 4096, min_free_space: 0, spares: false };
    let (spool, recovery) = Spool::open(opts).ok()?;
    let mut found = Vec::new();
    for m in &recovery.messages {
        let (view, body) = spool
            .message_with_body(m.loc, true)
            .unwrap_or_else(|e| panic!("recovery reported {:?} at {:?}, which does not read back: {e}", m.id, m.loc));
        assert_eq!(view.id, m.id, "the record at {:?} has another id", m.loc);
        assert_eq!(view.envelope.rcpt_count(), m.rcpts.len(), "recipient count differs");
        let bytes = spool.body(body);
        assert_eq!(bytes, view.body, "Spool::body differs from the decoded body");
        found.push((m.id.0, bytes.to_vec()));
    }
    Some(found)
}

/// One directory per process (libFuzzer's `-fork`/`-jobs` run several), in memory when
/// `/dev/shm` exists (a disk-backed temp dir costs most of each run), else under the temp dir.
fn scratch_dir() -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    base.join(format!("sluice-fuzz-spool-{}", std::process::id()))
}

/// `data` cut before each occurrence of `magic` (empty parts dropped).
fn split_on_magic<'a>(data: &'a [u8], magic: &[u8]) -> Vec<&'a [u8]> {
    let mut cuts = vec![0];
    let mut i = 1;
    while i + magic.len() <= data.len() {
        if &data[i..i + magic.len()] == magic {
            cuts.push(i);
            i += magic.len();
        } else {
            i += 1;
        }
    }
    cuts.push(data.len());
    cuts.windows(2).map(|w| &data[w[0]..w[1]]).filter(|p| !p.is_empty()).collect()
}
