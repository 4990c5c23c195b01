//! The operator's suspensions (`sluice queue suspend`), kept in `DIR/suspensions` so that they
//! outlive a restart; automatic ones (shaping `[[automation]]`) are never written here.
//!
//! Owns: that one file, its codec and its atomic replacement (temporary file, fsync, rename,
//! fsync of the directory: a crash leaves the old list or the new one, never a torn mix).
//! Must never: fail the relay's start over a bad line (it is skipped with a warning), or
//! keep a suspension past its end (expired ones are dropped when the file is read).

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::Path;

/// The file's name in the spool directory.
pub const FILE_NAME: &str = "suspensions";
const HEADER: &str = "# sluice manual suspensions v1: scope TAB until_unix_ms TAB reason";

/// One manual suspension as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSuspension {
    /// `domain:D` or `provider:P`.
    pub scope: String,
    /// Its end, Unix ms.
    pub until_ms: u64,
    /// Why.
    pub reason: String,
}

// Format: { HEADER LF } { scope TAB until_ms TAB reason LF }*
// (fields hold no TAB or line break: `control::clean` removed them on the way in).
/// The file's text.
pub fn encode(list: &[SavedSuspension]) -> String {
    let mut o = String::from(HEADER);
    o.push('\n');
    for s in list {
        o.push_str(&format!("{}\t{}\t{}\n", s.scope, s.until_ms, s.reason));
    }
    o
}

/// The suspensions of `text` still in force at `now_ms`, and a warning per line that is not
/// one.
pub fn decode(text: &str, now_ms: u64) -> (Vec<SavedSuspension>, Vec<String>) {
    let (mut list, mut warnings) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut f = line.splitn(3, '\t');
        let (scope, until, reason) = (f.next().unwrap_or(""), f.next(), f.next().unwrap_or(""));
        match until.and_then(|u| u.parse::<u64>().ok()) {
            Some(until_ms) if scope.contains(':') => {
                if until_ms > now_ms {
                    list.push(SavedSuspension { scope: scope.to_owned(), until_ms, reason: reason.to_owned() });
                }
            }
            _ => warnings.push(format!("{FILE_NAME} line {}: not `scope TAB until_ms TAB reason`, skipped", n + 1)),
        }
    }
    (list, warnings)
}

/// Reads `DIR/suspensions` (none yet: an empty list); see [`decode`].
pub fn load(dir: &Path, now_ms: u64) -> io::Result<(Vec<SavedSuspension>, Vec<String>)> {
    match fs::read_to_string(dir.join(FILE_NAME)) {
        Ok(text) => Ok(decode(&text, now_ms)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((Vec::new(), Vec::new())),
        Err(e) => Err(e),
    }
}

/// Replaces `DIR/suspensions` with `list`, atomically and durably.
pub fn save(dir: &Path, list: &[SavedSuspension]) -> io::Result<()> {
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(encode(list).as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(FILE_NAME))?;
    // The rename is durable only once the directory is.
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(scope: &str, until_ms: u64, reason: &str) -> SavedSuspension {
        SavedSuspension { scope: scope.into(), until_ms, reason: reason.into() }
    }

    #[test]
    fn round_trip_drops_expired_and_skips_bad_lines() {
        let list = vec![s("domain:a.test", 2_000, "abuse"), s("provider:google", 500, ""), s("domain:b", 3_000, "")];
        let text = encode(&list);
        let (got, warnings) = decode(&text, 1_000);
        assert_eq!(got, vec![list[0].clone(), list[2].clone()], "the expired one is dropped");
        assert!(warnings.is_empty());
        let (got, warnings) = decode("domain:a\tsoon\tx\nnoscope\t5\t\n\ndomain:c\t9\twith\ttab\n", 1);
        assert_eq!(got, vec![s("domain:c", 9, "with\ttab")]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("line 1"), "{warnings:?}");
    }

    #[test]
    fn save_replaces_the_file_and_load_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("sluice-susp-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir, 0).unwrap().0, vec![], "no file: nothing suspended");
        save(&dir, &[s("domain:a.test", 10, "x")]).unwrap();
        save(&dir, &[s("domain:b.test", 20, "y")]).unwrap();
        assert_eq!(load(&dir, 0).unwrap().0, vec![s("domain:b.test", 20, "y")]);
        assert!(!dir.join("suspensions.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
