//! The spool's sync thread: runs each group commit (one `msync` per dirty segment) off the event
//! loop and wakes the loop through a `mio::Waker` when it is done.
//!
//! Why a thread: a sync takes a disk round trip (tens of microseconds to milliseconds). Done on
//! the loop, every session stalls for it, every turn. Done here, the loop keeps parsing and
//! appending the next batch while the disk works, and still writes no `250` before the sync
//! that covers it has returned. It is one dedicated thread, never a pool, and it touches
//! nothing but the job it is handed.
//!
//! Test-only failpoint: `SLUICE_FAILPOINT_SYNC=fail-after:N`, read once at start, lets the first
//! `N` jobs run and fails every later one without syncing (an I/O error), so an end-to-end test
//! can check what a failed group commit answers (`tests/e2e/durability.rs`). Unset, it costs
//! one comparison per job.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use mio::Waker;

use crate::spool::{SpoolError, SyncJob};

/// The environment variable of the failpoint (see the module doc). Test-only.
pub const FAILPOINT_ENV: &str = "SLUICE_FAILPOINT_SYNC";

/// The sync failpoint: how many jobs may still run before every job fails (`None`: off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failpoint(Option<u64>);

impl Failpoint {
    /// Parses the variable's value: unset is off, `fail-after:N` fails job `N + 1` onwards.
    fn parse(value: Option<&str>) -> std::io::Result<Failpoint> {
        let Some(v) = value else { return Ok(Failpoint(None)) };
        match v.strip_prefix("fail-after:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(Failpoint(Some(n))),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{FAILPOINT_ENV}={v:?}: expected fail-after:N"),
            )),
        }
    }

    /// Runs `job`, or fails it without syncing once the failpoint has let its `N` jobs through.
    fn run(&mut self, job: &SyncJob) -> Result<(), SpoolError> {
        match &mut self.0 {
            None => job.run(),
            Some(0) => Err(SpoolError::Io("sync spool segment", std::io::Error::other(FAILPOINT_ENV))),
            Some(left) => {
                *left -= 1;
                job.run()
            }
        }
    }
}

/// A finished job: its result and how long the sync took on the thread, in microseconds.
pub type Done = (Result<(), SpoolError>, u64);

/// Runs `job` through the failpoint and times it.
fn timed(failpoint: &mut Failpoint, job: &SyncJob) -> Done {
    let t = Instant::now();
    let r = failpoint.run(job);
    (r, t.elapsed().as_micros() as u64)
}

/// Handle to the sync thread.
pub struct Syncer {
    jobs: Option<Sender<SyncJob>>,
    results: Receiver<Done>,
    busy: bool,
    /// Result of a job run on the calling thread because the sync thread was gone.
    inline: Option<Done>,
    thread: Option<JoinHandle<()>>,
    /// The failpoint for jobs run on the calling thread (the thread has its own copy).
    failpoint: Failpoint,
    /// Woken after a job run on the calling thread too, so that the loop takes its result
    /// in as it would the thread's (it may otherwise sleep with the job marked out).
    waker: Arc<Waker>,
}

impl Syncer {
    /// Starts the thread; it wakes the loop with `waker` after each job. Fails on a malformed
    /// [`FAILPOINT_ENV`].
    pub fn spawn(waker: Arc<Waker>) -> std::io::Result<Syncer> {
        let failpoint = Failpoint::parse(std::env::var(FAILPOINT_ENV).ok().as_deref())?;
        let mut thread_failpoint = failpoint;
        let (jobs, job_rx) = channel::<SyncJob>();
        let (result_tx, results) = channel();
        let loop_waker = Arc::clone(&waker);
        let thread = std::thread::Builder::new().name("sluice-sync".into()).spawn(move || {
            // Its three wake-ups per sync (the job, the write's completion, the flush's) must
            // not preempt the loop: see `sys::batch_thread`. Failing, it runs as before.
            let _ = crate::sys::batch_thread();
            for job in job_rx {
                if result_tx.send(timed(&mut thread_failpoint, &job)).is_err() {
                    break;
                }
                // If the wake fails the loop is gone; nothing left to tell.
                let _ = waker.wake();
            }
        })?;
        Ok(Syncer {
            jobs: Some(jobs),
            results,
            busy: false,
            inline: None,
            thread: Some(thread),
            failpoint,
            waker: loop_waker,
        })
    }

    /// True while a job is out.
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Hands a job to the thread.
    pub fn submit(&mut self, job: SyncJob) {
        self.busy = true;
        let job = match &self.jobs {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                // The thread is gone (it does not panic: `run` returns errors); sync here
                // rather than lose the batch.
                Err(returned) => returned.0,
            },
            None => job,
        };
        self.inline = Some(timed(&mut self.failpoint, &job));
        let _ = self.waker.wake();
    }

    /// The finished job's result, if it is back.
    pub fn try_result(&mut self) -> Option<Done> {
        let r = match self.inline.take() {
            Some(r) => r,
            None => self.results.try_recv().ok()?,
        };
        self.busy = false;
        Some(r)
    }

    /// Blocks until the job in flight (if any) is back.
    pub fn wait_result(&mut self) -> Option<Done> {
        if !self.busy {
            return None;
        }
        self.busy = false;
        if let Some(r) = self.inline.take() {
            return Some(r);
        }
        Some(self.results.recv().unwrap_or_else(|_| {
            (Err(SpoolError::Io("sync thread", std::io::Error::other("the sync thread stopped"))), 0)
        }))
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sync_thread_runs_under_sched_batch() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let _syncer = Syncer::spawn(waker).unwrap();
        assert!(crate::sys::wait_batch_thread("sluice-sync"), "{:?}", crate::sys::thread_policies("sluice-sync"));
    }

    #[test]
    fn failpoint_values() {
        assert_eq!(Failpoint::parse(None).unwrap(), Failpoint(None));
        assert_eq!(Failpoint::parse(Some("fail-after:3")).unwrap(), Failpoint(Some(3)));
        for bad in ["", "fail-after:", "fail-after:-1", "fail:3", "fail-after:x"] {
            let e = Failpoint::parse(Some(bad)).unwrap_err();
            assert!(e.to_string().contains(FAILPOINT_ENV), "{bad}: {e}");
        }
    }
}
