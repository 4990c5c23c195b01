//! The spool's sync thread: runs each group commit (one `msync` per dirty segment) off the event
//! loop and wakes the loop through a `mio::Waker` when it is done.
//!
//! Why a thread: a sync takes a disk round trip (tens of microseconds to milliseconds). Done on
//! the loop, every session stalls for it, every turn. Done here, the loop keeps parsing and
//! appending the next batch while the disk works, and still writes no `250` before the sync
//! that covers it has returned. It is one dedicated thread, never a pool, and it touches
//! nothing but the job it is handed.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::Waker;

use crate::spool::{SpoolError, SyncJob};

/// Handle to the sync thread.
pub struct Syncer {
    jobs: Option<Sender<SyncJob>>,
    results: Receiver<Result<(), SpoolError>>,
    busy: bool,
    /// Result of a job run on the calling thread because the sync thread was gone.
    inline: Option<Result<(), SpoolError>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread; it wakes the loop with `waker` after each job.
    pub fn spawn(waker: Arc<Waker>) -> std::io::Result<Syncer> {
        let (jobs, job_rx) = channel::<SyncJob>();
        let (result_tx, results) = channel();
        let thread = std::thread::Builder::new().name("sluice-sync".into()).spawn(move || {
            for job in job_rx {
                if result_tx.send(job.run()).is_err() {
                    break;
                }
                // If the wake fails the loop is gone; nothing left to tell.
                let _ = waker.wake();
            }
        })?;
        Ok(Syncer { jobs: Some(jobs), results, busy: false, inline: None, thread: Some(thread) })
    }

    /// True while a job is out.
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Hands a job to the thread.
    pub fn submit(&mut self, job: SyncJob) {
        self.busy = true;
        let Some(tx) = &self.jobs else {
            self.inline = Some(job.run());
            return;
        };
        if let Err(returned) = tx.send(job) {
            // The thread is gone (it does not panic: `run` returns errors); sync here rather
            // than lose the batch.
            self.inline = Some(returned.0.run());
        }
    }

    /// The finished job's result, if it is back.
    pub fn try_result(&mut self) -> Option<Result<(), SpoolError>> {
        let r = match self.inline.take() {
            Some(r) => r,
            None => self.results.try_recv().ok()?,
        };
        self.busy = false;
        Some(r)
    }

    /// Blocks until the job in flight (if any) is back.
    pub fn wait_result(&mut self) -> Option<Result<(), SpoolError>> {
        if !self.busy {
            return None;
        }
        self.busy = false;
        if let Some(r) = self.inline.take() {
            return Some(r);
        }
        Some(
            self.results.recv().unwrap_or_else(|_| {
                Err(SpoolError::Io("sync thread", std::io::Error::other("the sync thread stopped")))
            }),
        )
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
