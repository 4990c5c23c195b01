//! The AUTH verification thread: runs each Argon2 password check off the event loop and wakes
//! the loop through a `mio::Waker` when a verdict is ready.
//!
//! Why a thread: Argon2 is slow on purpose (milliseconds of CPU and ~19 MiB of memory per
//! check). Done on the loop, every session would stall for every login attempt, and a client
//! hammering AUTH would stall the relay. Done here, checks run one after another on one
//! dedicated thread (never a pool: a flood of logins costs one core at most) while the loop
//! keeps serving. The loop hands the thread one job at a time, in the order the AUTH throttle
//! (`smtp::auth_throttle`) chooses, so no backlog builds up in the channel. Jobs carry the
//! session's slab key and generation so a verdict for a session that has gone away is
//! recognised as stale.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::Waker;

pub use crate::net::inbound::AuthJob;
use crate::smtp::auth::{AuthFile, Credentials};
use crate::smtp::client_key::ClientKey;

/// The outcome of an [`AuthJob`].
#[derive(Debug)]
pub struct AuthVerdict {
    /// From the job.
    pub key: usize,
    /// From the job.
    pub generation: u32,
    /// From the job.
    pub client: ClientKey,
    /// True when the user exists and the password matches.
    pub ok: bool,
    /// The job's credentials, handed back for reuse: the user name is kept (for the log line),
    /// the password has been wiped.
    pub creds: Credentials,
}

/// Runs one job.
fn run(users: &AuthFile, job: AuthJob) -> AuthVerdict {
    let AuthJob { key, generation, client, mut creds } = job;
    let ok = users.verify(&creds.user, &creds.pass);
    creds.clear_pass();
    AuthVerdict { key, generation, client, ok, creds }
}

/// Handle to the verification thread.
pub struct AuthWorker {
    jobs: Option<Sender<AuthJob>>,
    results: Receiver<AuthVerdict>,
    /// Verdicts computed on the calling thread because the worker was gone.
    inline: Vec<AuthVerdict>,
    in_flight: usize,
    users: Arc<AuthFile>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl AuthWorker {
    /// Starts the thread; it checks passwords against `users` and wakes the loop with `waker`
    /// after each verdict.
    pub fn spawn(users: Arc<AuthFile>, waker: Arc<Waker>) -> std::io::Result<AuthWorker> {
        let (jobs, job_rx) = channel::<AuthJob>();
        let (result_tx, results) = channel();
        let thread = {
            let users = Arc::clone(&users);
            let waker = Arc::clone(&waker);
            std::thread::Builder::new().name("sluice-auth".into()).spawn(move || {
                for job in job_rx {
                    if result_tx.send(run(&users, job)).is_err() {
                        break;
                    }
                    // If the wake fails the loop is gone; nothing left to tell.
                    let _ = waker.wake();
                }
            })?
        };
        Ok(AuthWorker {
            jobs: Some(jobs),
            results,
            inline: Vec::new(),
            in_flight: 0,
            users,
            waker,
            thread: Some(thread),
        })
    }

    /// Jobs submitted whose verdicts have not been collected by [`AuthWorker::try_results`].
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a job for the thread.
    pub fn submit(&mut self, job: AuthJob) {
        self.in_flight += 1;
        let job = match &self.jobs {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(returned) => returned.0,
            },
            None => job,
        };
        // The thread is gone: check here (stalling the loop once) rather than lose the job,
        // and wake the loop so the verdict is collected on the next turn.
        self.inline.push(run(&self.users, job));
        let _ = self.waker.wake();
    }

    /// Appends every verdict that is ready to `out` without blocking.
    pub fn try_results(&mut self, out: &mut Vec<AuthVerdict>) {
        let before = out.len();
        out.append(&mut self.inline);
        out.extend(self.results.try_iter());
        self.in_flight = self.in_flight.saturating_sub(out.len() - before);
    }
}

impl Drop for AuthWorker {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the jobs already queued.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::auth::hash_password;
    use mio::{Events, Poll, Token};
    use std::time::{Duration, Instant};

    fn creds(user: &[u8], pass: &[u8]) -> Credentials {
        let mut c = Credentials::new();
        c.user.extend_from_slice(user);
        c.pass.extend_from_slice(pass);
        c
    }

    #[test]
    fn verdicts_come_back_through_the_waker() {
        let phc = hash_password(b"s3cret").unwrap();
        let users = Arc::new(AuthFile::parse(&format!("alice:{phc}\n")).unwrap());
        let mut poll = Poll::new().unwrap();
        const WAKE: Token = Token(7);
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).unwrap());
        let mut worker = AuthWorker::spawn(users, waker).unwrap();

        let jobs: [(&[u8], &[u8], bool); 4] = [
            (b"alice", b"s3cret", true),
            (b"alice", b"wrong", false),
            (b"bob", b"s3cret", false),
            (b"alice", b"s3cret", true),
        ];
        for (i, &(user, pass, _)) in jobs.iter().enumerate() {
            let client = ClientKey::of([127, 0, 0, 1].into());
            worker.submit(AuthJob { key: i, generation: 10 + i as u32, client, creds: creds(user, pass) });
        }
        assert_eq!(worker.in_flight(), jobs.len());

        let mut events = Events::with_capacity(8);
        let mut verdicts = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while verdicts.len() < jobs.len() {
            assert!(Instant::now() < deadline, "verdicts missing: {verdicts:?}");
            poll.poll(&mut events, Some(Duration::from_secs(5))).unwrap();
            assert!(events.iter().all(|e| e.token() == WAKE));
            worker.try_results(&mut verdicts);
        }
        assert_eq!(worker.in_flight(), 0);
        verdicts.sort_by_key(|v| v.key);
        for (v, (i, &(user, _, ok))) in verdicts.iter().zip(jobs.iter().enumerate()) {
            assert_eq!((v.key, v.generation, v.ok), (i, 10 + i as u32, ok));
            assert_eq!(v.creds.user, user, "user name handed back");
            assert!(v.creds.pass.is_empty(), "password wiped");
        }
    }

    #[test]
    fn submit_checks_inline_when_the_thread_is_gone() {
        let phc = hash_password(b"pw").unwrap();
        let users = Arc::new(AuthFile::parse(&format!("u:{phc}\n")).unwrap());
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(1)).unwrap());
        let mut worker = AuthWorker::spawn(users, waker).unwrap();
        // Simulate a dead thread: close its queue and wait for it to exit.
        worker.jobs = None;
        worker.thread.take().unwrap().join().unwrap();
        worker.submit(AuthJob {
            key: 3,
            generation: 1,
            client: ClientKey::of([127, 0, 0, 1].into()),
            creds: creds(b"u", b"pw"),
        });
        assert_eq!(worker.in_flight(), 1);
        let mut out = Vec::new();
        worker.try_results(&mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].ok && out[0].key == 3 && out[0].creds.pass.is_empty());
        assert_eq!(worker.in_flight(), 0);
    }
}
