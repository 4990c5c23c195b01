//! Finished segments are deleted on a thread of its own.
//!
//! Why: deleting a segment whose pages are cached frees every page of it (the last close of
//! an unlinked file truncates its page cache) and unmaps it: 9–15 ms for a 64 MiB segment on
//! this project's test machine, measured around `Segment::remove` with 100 KiB messages
//! relayed end to end. On the loop that stalled every session once per segment; it was the
//! relay's commit p99 (20 ms end to end against 5 ms accepting only).
//!
//! Owns: the segments handed to it ([`Reaper::remove`]), until each is unmapped and unlinked,
//! and the warnings of the removals that failed, until the spool takes them. Must never:
//! reorder removals (one thread, first in first out: a segment whose outcome records finish
//! an earlier segment's messages is handed over after that segment, and so unlinked after it;
//! an ext4 journal keeps that order across a crash), or touch a segment the spool still holds
//! (the spool hands a segment over only once it has dropped it from its table).
//!
//! A removal still queued when the process dies leaves a finished segment behind, as a crash
//! just before the unlink always could: the next recovery finds every message in it finished
//! and deletes it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::segment::Segment;

/// Handle to the removal thread.
pub(crate) struct Reaper {
    /// `None` once dropped, or when the thread could not be started (then removals run on
    /// the caller's thread).
    jobs: Option<Sender<Segment>>,
    thread: Option<JoinHandle<()>>,
    /// Removal failures, for [`Reaper::take_warnings`].
    warnings: Arc<Mutex<Vec<String>>>,
    /// Removals handed over and not yet done (read by tests: [`Reaper::settle`]).
    pending: Arc<AtomicUsize>,
}

impl Reaper {
    /// Starts the thread. Without one (spawning failed), removals run on the caller's thread.
    pub(crate) fn start() -> Reaper {
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let pending = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = channel::<Segment>();
        let (thread_warnings, thread_pending) = (Arc::clone(&warnings), Arc::clone(&pending));
        let thread = std::thread::Builder::new()
            .name("sluice-reap".into())
            .spawn(move || {
                // Background work: never preempt the loop (see `sys::batch_thread`).
                let _ = crate::sys::batch_thread();
                for seg in rx {
                    remove(seg, &thread_warnings, &thread_pending);
                }
            })
            .ok();
        Reaper { jobs: thread.as_ref().map(|_| tx), thread, warnings, pending }
    }

    /// Unmaps and deletes `seg`, on the thread (or here, if it is gone).
    pub(crate) fn remove(&self, seg: Segment) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let seg = match &self.jobs {
            Some(tx) => match tx.send(seg) {
                Ok(()) => return,
                Err(returned) => returned.0,
            },
            None => seg,
        };
        remove(seg, &self.warnings, &self.pending);
    }

    /// Moves the warnings of failed removals into `into`.
    pub(crate) fn take_warnings(&self, into: &mut Vec<String>) {
        into.append(&mut self.warnings.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Test-only: waits until every removal handed over so far is done.
    #[cfg(test)]
    pub(crate) fn settle(&self) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.pending.load(Ordering::Acquire) > 0 {
            assert!(std::time::Instant::now() < until, "removals never finished");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Reaper {
    /// Finishes the removals handed over (the thread ends when the channel closes).
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn remove(seg: Segment, warnings: &Mutex<Vec<String>>, pending: &AtomicUsize) {
    if let Err(e) = seg.remove() {
        warnings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(format!("could not remove a finished segment: {e}"));
    }
    pending.fetch_sub(1, Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_run_on_the_thread_and_failures_become_warnings() {
        let dir = std::env::temp_dir().join(format!("sluice-reap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let reaper = Reaper::start();
        assert!(crate::sys::wait_batch_thread("sluice-reap"), "{:?}", crate::sys::thread_policies("sluice-reap"));
        let segs: Vec<_> = (1..=3).map(|seq| Segment::create(&dir, seq, 4096).unwrap()).collect();
        let paths: Vec<_> = segs.iter().map(|s| s.path().to_path_buf()).collect();
        // The second one is already gone: its removal fails and says so.
        std::fs::remove_file(&paths[1]).unwrap();
        for s in segs {
            reaper.remove(s);
        }
        reaper.settle();
        assert!(paths.iter().all(|p| !p.exists()));
        let mut w = Vec::new();
        reaper.take_warnings(&mut w);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("could not remove a finished segment") && w[0].contains("seg-"), "{w:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
