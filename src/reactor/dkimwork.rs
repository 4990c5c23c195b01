//! The DKIM signing threads (`--dkim-threads`): sign each finished message off the event
//! loop and wake the loop through the `mio::Waker` when a signature is ready.
//!
//! Owns: the threads, the bounded job channel between the loop and them, and the loop-side
//! backlog of jobs the channel had no room for. Must never: block the loop (a full channel
//! leaves the job in the backlog: its session simply waits longer), or touch a session or the
//! spool (the inbound driver stores the signed message and answers it).
//!
//! Why threads: an RSA-2048 signature costs 0.4 to 1 ms of CPU (with or without AVX-512
//! IFMA), and hashing the body reads it all; on the loop every other session would stall
//! behind each message. The loop hands the body buffer over by value (no copy) with the key
//! table (an `Arc`, so a SIGHUP reload never changes the keys of a message already handed
//! over) and gets it back with the signature fields.

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use mio::Waker;

use crate::dkim::Signer;
pub use crate::net::inbound::{SignDone, SignJob};

/// Jobs the channel holds per thread before the loop keeps them in its backlog.
const QUEUE_PER_THREAD: usize = 64;

/// How long a thread that still has jobs queued may hold its finished results before it wakes
/// the loop, counted from the start of the first held job. A thread with nothing queued wakes
/// it at once. Signatures that take less than this (Ed25519: ~20 µs for a 4 KiB message) are
/// handed back a few per wake-up instead of one each (every wake-up is a context switch of the
/// loop and, on a VM, an IPI); an RSA signature takes longer, so each wakes the loop as soon
/// as it is done.
const WAKE_AFTER: Duration = Duration::from_micros(100);

/// Signs one job with `signer`'s scratch space.
fn run(signer: &mut Signer, rng: &SystemRandom, job: SignJob) -> SignDone {
    let SignJob { key, generation, id, body, unix_s, keys } = job;
    let mut headers = Vec::new();
    let outcome = signer.sign(&keys, &body, unix_s, rng, &mut headers);
    SignDone { key, generation, id, body, headers, outcome }
}

/// A job whose body is longer than this is not started while results are held: hashing it
/// takes longer than the hold-back is meant to last.
const BIG_BODY: usize = 64 * 1024;

/// Results a signing thread sent without waking the loop. Flushed (the loop woken for them)
/// when the thread runs out of jobs, waits for the channel's lock, or has held them for
/// [`WAKE_AFTER`]; and when it is dropped, so that a thread ending, even by a panic in the
/// signer, never leaves a result unannounced.
struct Held<'a> {
    /// When the first held result's job started.
    since: Option<Instant>,
    wake: &'a dyn Fn(),
}

impl Held<'_> {
    fn flush(&mut self) {
        if self.since.take().is_some() {
            (self.wake)();
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Handle to the signing threads.
pub struct DkimWorker {
    jobs: Option<SyncSender<SignJob>>,
    results: Receiver<SignDone>,
    /// Jobs the channel had no room for, oldest first.
    backlog: VecDeque<SignJob>,
    /// Results computed on the loop because every thread was gone.
    inline: Vec<SignDone>,
    waker: Arc<Waker>,
    /// A thread has woken the loop since it last took the results: the next thread to finish
    /// need not wake it again (one `eventfd` write, and at most one loop wake-up, per drain
    /// instead of per message; see also [`WAKE_AFTER`]).
    wake_pending: Arc<AtomicBool>,
    /// The loop has a sync out, whose end wakes it and takes the results in: a finished
    /// signature need not wake it (see [`DkimWorker::set_sync_out`]).
    sync_out: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DkimWorker {
    /// Starts `threads` signing threads; each wakes the loop with `waker` after a message.
    pub fn spawn(threads: usize, waker: Arc<Waker>) -> std::io::Result<DkimWorker> {
        let threads = threads.max(1);
        let (jobs, job_rx) = sync_channel::<SignJob>(QUEUE_PER_THREAD * threads);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (result_tx, results) = channel();
        let wake_pending = Arc::new(AtomicBool::new(false));
        let sync_out = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let result_tx = result_tx.clone();
            let waker = Arc::clone(&waker);
            let pending = Arc::clone(&wake_pending);
            let sync_out = Arc::clone(&sync_out);
            let handle = std::thread::Builder::new().name(format!("sluice-dkim-{i}")).spawn(move || {
                let mut signer = Signer::new();
                let rng = SystemRandom::new();
                // After a send: the loop clears the flag before it drains, so a result sent
                // after its drain always finds the flag clear and wakes it. If the wake fails
                // the loop is gone; nothing left to tell.
                let wake = || {
                    // Pairs with the fence in `set_sync_out`: either the loop's drain after
                    // it cleared `sync_out` sees this thread's send, or this load sees the
                    // cleared flag and wakes it.
                    fence(Ordering::SeqCst);
                    if sync_out.load(Ordering::SeqCst) {
                        return;
                    }
                    if !pending.swap(true, Ordering::AcqRel) {
                        let _ = waker.wake();
                    }
                };
                let mut held = Held { since: None, wake: &wake };
                loop {
                    // The lock is held only to take one job; a poisoned lock (a thread
                    // panicked) still hands out jobs. Another thread holding it is waiting for
                    // a job, so this one may wait long: it tells the loop of its results first.
                    let rx = match job_rx.try_lock() {
                        Ok(rx) => rx,
                        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                        Err(TryLockError::WouldBlock) => {
                            held.flush();
                            job_rx.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
                        }
                    };
                    let job = match rx.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Disconnected) => break,
                        Err(TryRecvError::Empty) => {
                            // Nothing queued: tell the loop about what was sent, then sleep.
                            held.flush();
                            match rx.recv() {
                                Ok(job) => job,
                                Err(_) => break,
                            }
                        }
                    };
                    drop(rx);
                    // A big body takes long to hash: what is held must not wait for it.
                    if job.body.len() > BIG_BODY {
                        held.flush();
                    }
                    let started = Instant::now();
                    if result_tx.send(run(&mut signer, &rng, job)).is_err() {
                        break;
                    }
                    // Held since the first held job started: a job slower than WAKE_AFTER
                    // (an RSA signature) is announced as soon as it is done.
                    if held.since.get_or_insert(started).elapsed() >= WAKE_AFTER {
                        held.flush();
                    }
                }
            })?;
            handles.push(handle);
        }
        Ok(DkimWorker {
            jobs: Some(jobs),
            results,
            backlog: VecDeque::new(),
            inline: Vec::new(),
            waker,
            wake_pending,
            sync_out,
            threads: handles,
        })
    }

    /// Queues jobs for the threads without blocking: what the channel cannot take waits in
    /// the backlog, in order, and is offered again by [`DkimWorker::try_results`].
    pub fn submit(&mut self, jobs: &mut Vec<SignJob>) {
        self.backlog.extend(jobs.drain(..));
        self.feed();
    }

    fn feed(&mut self) {
        while let Some(job) = self.backlog.pop_front() {
            let Some(tx) = &self.jobs else {
                self.sign_inline(job);
                continue;
            };
            match tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) => {
                    self.backlog.push_front(job);
                    return;
                }
                Err(TrySendError::Disconnected(job)) => {
                    // Every thread is gone: sign here (stalling the loop) rather than leave
                    // the sessions waiting for ever.
                    self.jobs = None;
                    self.sign_inline(job);
                }
            }
        }
    }

    fn sign_inline(&mut self, job: SignJob) {
        let done = run(&mut Signer::new(), &SystemRandom::new(), job);
        self.inline.push(done);
        let _ = self.waker.wake();
    }

    /// Appends every finished job to `out` without blocking, then offers the backlog to the
    /// threads again (the channel has room for as many as came back).
    pub fn try_results(&mut self, out: &mut Vec<SignDone>) {
        // A swap, not a store: reading the last thread's `true` orders its send before the
        // drain below.
        self.wake_pending.swap(false, Ordering::AcqRel);
        out.append(&mut self.inline);
        out.extend(self.results.try_iter());
        self.feed();
    }

    /// Whether the loop has a sync out, said before each sleep. While it has, the threads do
    /// not wake it for results: the sync's end will, and the loop takes the results in then.
    /// When it has none, the caller must call [`DkimWorker::try_results`] after this (before
    /// sleeping): a result sent while the flag was still set is taken in by that drain.
    pub fn set_sync_out(&self, out: bool) {
        self.sync_out.store(out, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Jobs waiting in the loop-side backlog (the channel was full).
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }
}

impl Drop for DkimWorker {
    fn drop(&mut self) {
        // Closing the channel ends the threads after the jobs already queued.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dkim::{KeyTable, Outcome, SigningKey};
    use crate::message::QueueId;
    use mio::{Events, Poll, Token};
    use std::time::{Duration, Instant};

    fn job(i: usize, keys: &Arc<KeyTable>) -> SignJob {
        SignJob {
            key: i,
            generation: 1,
            id: QueueId(i as u64),
            body: format!("From: a@example.com\r\nSubject: {i}\r\n\r\nhi\r\n").into_bytes(),
            unix_s: 1,
            keys: Arc::clone(keys),
        }
    }

    /// One Ed25519 key for example.com, a poll, and `threads` signing threads waking it.
    fn setup(threads: usize) -> (Arc<KeyTable>, Poll, DkimWorker) {
        let mut keys = KeyTable::new();
        keys.insert("example.com", SigningKey::ed25519_from_seed("s1", &[9u8; 32]).unwrap());
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(3)).unwrap());
        (Arc::new(keys), poll, DkimWorker::spawn(threads, waker).unwrap())
    }

    /// Results held back while more jobs are queued (`WAKE_AFTER`) are never left without a
    /// wake-up: the loop, sleeping with no timeout to speak of, always hears of every result.
    #[test]
    fn every_result_is_followed_by_a_wake() {
        // Two threads: one waits for jobs holding the channel's lock while the other, done
        // with its job, waits for the lock.
        let (keys, mut poll, mut worker) = setup(2);
        let mut events = Events::with_capacity(8);
        let mut done = Vec::new();
        let mut sent = 0;
        for round in 0..60 {
            let mut jobs: Vec<SignJob> = (sent..sent + 1 + round % 7).map(|i| job(i, &keys)).collect();
            sent += jobs.len();
            worker.submit(&mut jobs);
            while done.len() < sent {
                poll.poll(&mut events, Some(Duration::from_secs(10))).unwrap();
                assert!(!events.is_empty(), "round {round}: {} of {sent} back and no wake-up", done.len());
                worker.try_results(&mut done);
            }
        }
        assert_eq!(done.len(), sent);
    }

    /// While the loop has a sync out, results do not wake it; the drain it does after saying
    /// none is out takes them all in.
    #[test]
    fn no_wake_while_a_sync_is_out() {
        let (keys, mut poll, mut worker) = setup(1);
        let mut events = Events::with_capacity(8);
        worker.set_sync_out(true);
        let mut jobs: Vec<SignJob> = (0..5).map(|i| job(i, &keys)).collect();
        worker.submit(&mut jobs);
        poll.poll(&mut events, Some(Duration::from_millis(300))).unwrap();
        assert!(events.is_empty(), "a result woke the loop while a sync was out");
        worker.set_sync_out(false);
        let mut done = Vec::new();
        worker.try_results(&mut done);
        while done.len() < 5 {
            // Only a thread slower than 300 ms for five signatures gets here: it wakes.
            poll.poll(&mut events, Some(Duration::from_secs(10))).unwrap();
            assert!(!events.is_empty(), "{} of 5 back and no wake-up", done.len());
            worker.try_results(&mut done);
        }
    }

    #[test]
    fn signed_bodies_come_back_through_the_waker_with_backpressure() {
        let (keys, mut poll, mut worker) = setup(2);
        // More jobs than the channel holds: the rest wait in the backlog, none is lost.
        let n = QUEUE_PER_THREAD * 2 + 50;
        let mut jobs: Vec<SignJob> = (0..n).map(|i| job(i, &keys)).collect();
        worker.submit(&mut jobs);
        assert!(jobs.is_empty());
        let mut events = Events::with_capacity(8);
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while done.len() < n {
            assert!(Instant::now() < deadline, "{} of {n} back", done.len());
            poll.poll(&mut events, Some(Duration::from_millis(200))).unwrap();
            worker.try_results(&mut done);
        }
        assert_eq!(worker.backlog(), 0);
        done.sort_by_key(|d| d.key);
        for (i, d) in done.iter().enumerate() {
            assert_eq!((d.key, d.id), (i, QueueId(i as u64)));
            assert!(d.body.starts_with(b"From: a@example.com\r\n"), "body handed back");
            assert_eq!(d.outcome, Outcome::Signed("example.com:s1".into()));
            assert!(d.headers.starts_with(b"DKIM-Signature: v=1; a=ed25519-sha256;"));
        }
    }
}
