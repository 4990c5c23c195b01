//! The group-commit gate: messages appended during a turn wait here for one shared sync, and
//! come back out as a batch whose `250`s may be written (or `451`s when the sync failed).
//!
//! Owns: the queue of appended messages ([`CommitGate::queue`]), starting a sync of all of
//! them on the syncer thread (one at a time: the next batch starts when the last returns),
//! and the spool's side of finishing it. Must never: write a reply before the spool says the
//! batch is durable (SPEC: a `250` is a message that survives power loss; STYLE rule 6), or
//! touch a connection (the inbound driver answers a released [`Batch`]).

use crate::log::{Logger, V};
use crate::net::inbound::Waiter;
use crate::reactor::syncer::Syncer;
use crate::spool::{Spool, SpoolError};

/// Messages released by the gate together, with the fate of their sync.
#[derive(Debug)]
pub struct Batch {
    /// The messages, in the order they were appended.
    pub waiters: Vec<Waiter>,
    /// `Ok` when the batch is durable; `Err` when the sync failed (every message gets `451`).
    pub result: Result<(), ()>,
}

/// See the module doc.
pub struct CommitGate {
    /// Appended, not yet in a sync.
    waiting: Vec<Waiter>,
    /// In the sync the thread runs now.
    syncing: Vec<Waiter>,
    syncer: Syncer,
}

impl CommitGate {
    /// A gate over the sync thread `syncer`.
    pub fn new(syncer: Syncer) -> CommitGate {
        CommitGate { waiting: Vec::new(), syncing: Vec::new(), syncer }
    }

    /// Where the inbound driver puts appended messages.
    pub fn queue(&mut self) -> &mut Vec<Waiter> {
        &mut self.waiting
    }

    /// A sync could start now (there is something to commit and the thread is free): the loop
    /// must not sleep.
    pub fn due(&self, spool: &Spool) -> bool {
        !self.syncer.busy() && (!self.waiting.is_empty() || spool.has_uncommitted())
    }

    /// Hands every message appended so far to the sync thread as one batch (unless one is
    /// already out). With `--fsync never`, or when the sync cannot start, the batch is
    /// released at once and returned.
    pub fn start(&mut self, spool: &mut Spool, log: &mut Logger) -> Option<Batch> {
        if !self.due(spool) {
            return None;
        }
        match spool.begin_commit() {
            Ok(Some(job)) => {
                self.syncer.submit(job);
                debug_assert!(self.syncing.is_empty());
                self.syncing = std::mem::take(&mut self.waiting);
                None
            }
            Ok(None) => Some(Batch { waiters: std::mem::take(&mut self.waiting), result: Ok(()) }),
            Err(e) => {
                log.event("spool_error", &[("during", V::S("commit")), ("error", V::D(&e))]);
                Some(Batch { waiters: std::mem::take(&mut self.waiting), result: Err(()) })
            }
        }
    }

    /// The sync thread is back (its waker fired): the batch it synced, if it has finished.
    pub fn take_synced(&mut self, spool: &mut Spool, log: &mut Logger) -> Option<Batch> {
        let result = self.syncer.try_result()?;
        Some(self.finish(result, spool, log))
    }

    /// Shutdown only: waits for the sync in flight, then commits what is left synchronously.
    /// Returns the batches in order.
    pub fn drain_blocking(&mut self, spool: &mut Spool, log: &mut Logger) -> [Option<Batch>; 2] {
        let synced = self.syncer.wait_result().map(|result| self.finish(result, spool, log));
        let mut rest = None;
        if !self.waiting.is_empty() || spool.has_uncommitted() {
            let result = spool.commit();
            if let Err(e) = &result {
                log.event("spool_error", &[("during", V::S("commit")), ("error", V::D(e))]);
            }
            rest = Some(Batch { waiters: std::mem::take(&mut self.waiting), result: result.map_err(|_| ()) });
        }
        [synced, rest]
    }

    fn finish(&mut self, result: Result<(), SpoolError>, spool: &mut Spool, log: &mut Logger) -> Batch {
        let mut waiters = std::mem::take(&mut self.syncing);
        match spool.finish_commit(result) {
            Ok(()) => Batch { waiters, result: Ok(()) },
            Err(e) => {
                log.event("spool_error", &[("during", V::S("commit")), ("error", V::D(&e))]);
                // The spool abandoned this batch and every append made after it.
                waiters.append(&mut self.waiting);
                Batch { waiters, result: Err(()) }
            }
        }
    }
}
