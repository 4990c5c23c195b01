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
    stats: SyncStats,
}

/// How long the sync thread's jobs took, and how many messages they carried: logged at
/// shutdown (`event=commit_stats`), so that a bench can set the relay's own sync time next
/// to the device's floor and to the end of data → `250` latency of `event=accepted`.
struct SyncStats {
    /// Jobs by duration in microseconds; the last slot holds every longer one.
    by_us: Vec<u32>,
    syncs: u64,
    messages: u64,
}

impl SyncStats {
    const SLOTS: usize = 20_001;

    fn record(&mut self, us: u64, messages: usize) {
        if self.by_us.is_empty() {
            // Allocated at the first sync: a relay under `--fsync never` never pays for it.
            self.by_us = vec![0; Self::SLOTS];
        }
        let slot = (us as usize).min(Self::SLOTS - 1);
        self.by_us[slot] = self.by_us[slot].saturating_add(1);
        self.syncs += 1;
        self.messages += messages as u64;
    }

    /// The duration below which a fraction `q` of the jobs finished, in microseconds.
    fn quantile(&self, q: f64) -> u64 {
        let want = ((self.syncs as f64 * q).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (us, n) in self.by_us.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= want {
                return us as u64;
            }
        }
        0
    }

    fn log(&self, log: &mut Logger) {
        if self.syncs == 0 {
            return;
        }
        log.event(
            "commit_stats",
            &[
                ("syncs", V::N(self.syncs)),
                ("messages", V::N(self.messages)),
                ("sync_p50_us", V::N(self.quantile(0.5))),
                ("sync_p99_us", V::N(self.quantile(0.99))),
            ],
        );
    }
}

impl CommitGate {
    /// A gate over the sync thread `syncer`.
    pub fn new(syncer: Syncer) -> CommitGate {
        CommitGate {
            waiting: Vec::new(),
            syncing: Vec::new(),
            syncer,
            stats: SyncStats { by_us: Vec::new(), syncs: 0, messages: 0 },
        }
    }

    /// Where the inbound driver puts appended messages.
    pub fn queue(&mut self) -> &mut Vec<Waiter> {
        &mut self.waiting
    }

    /// A sync is out on the thread: its end will wake the loop.
    pub fn syncing(&self) -> bool {
        self.syncer.busy()
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
        let (result, us) = self.syncer.try_result()?;
        Some(self.finish(result, us, spool, log))
    }

    /// Shutdown only: waits for the sync in flight, then commits what is left synchronously.
    /// Returns the batches in order.
    pub fn drain_blocking(&mut self, spool: &mut Spool, log: &mut Logger) -> [Option<Batch>; 2] {
        let synced = self.syncer.wait_result().map(|(result, us)| self.finish(result, us, spool, log));
        let mut rest = None;
        if !self.waiting.is_empty() || spool.has_uncommitted() {
            let result = spool.commit();
            if let Err(e) = &result {
                log.event("spool_error", &[("during", V::S("commit")), ("error", V::D(e))]);
            }
            rest = Some(Batch { waiters: std::mem::take(&mut self.waiting), result: result.map_err(|_| ()) });
        }
        self.stats.log(log);
        [synced, rest]
    }

    fn finish(&mut self, result: Result<(), SpoolError>, us: u64, spool: &mut Spool, log: &mut Logger) -> Batch {
        let mut waiters = std::mem::take(&mut self.syncing);
        self.stats.record(us, waiters.len());
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

#[cfg(test)]
mod tests {
    use super::SyncStats;

    #[test]
    fn sync_quantiles_come_from_the_recorded_durations() {
        let mut s = SyncStats { by_us: Vec::new(), syncs: 0, messages: 0 };
        for us in [100, 120, 130, 140, 900] {
            s.record(us, 3);
        }
        s.record(1_000_000, 1);
        assert_eq!((s.syncs, s.messages), (6, 16));
        assert_eq!(s.quantile(0.5), 130);
        assert_eq!(s.quantile(0.99), SyncStats::SLOTS as u64 - 1, "longer ones share the last slot");
        assert_eq!(s.quantile(0.0), 100);
    }
}
