//! Pure: the AUTH brute-force throttle. Decides which password checks run, in which order, and
//! what each verdict turns into (RFC 4954 §4 leaves the policy to the server; this is Postfix
//! anvil's `smtpd_client_auth_rate_limit` idea with a failure budget on top).
//!
//! # Driving it
//! 1. On a complete AUTH exchange, [`AuthThrottle::submit`] the job. It is either queued, or
//!    handed back with a [`Refusal`]: the client is blocked (`421 4.7.0`), or it has too many
//!    checks waiting, or the relay has (`454 4.7.0`, try later).
//! 2. While the verifier is idle, take [`AuthThrottle::next_job`] and run it; a job whose
//!    session has gone is given back with [`AuthThrottle::abandon`] instead (no hash spent).
//! 3. Report the result with [`AuthThrottle::verdict`], which says how to answer.
//!
//! # Why it holds
//! A check in flight counts against its client's failure budget as if it had failed: a client
//! with `failures + in_flight >= block_after` gets no new check, so no number of parallel
//! sessions gets more than `block_after` guesses verified per memory window. The verdict is
//! checked again against the budget, and a correct password that arrives after the client was
//! blocked is refused like any other attempt from it.
//!
//! Fairness: each client has its own FIFO and the verifier is handed one job at a time, taking
//! the clients in turn (round robin), so a client with a backlog delays another client by one
//! check at most per turn, never by its whole backlog.
//!
//! Owns: per-client failure counts, queued jobs, the order of service. Must never: read the
//! clock (time comes in as `now`), touch sockets or threads, verify a password.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::client_key::ClientKey;

/// The throttle's knobs. [`Limits::default`] is what the relay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Failures after which each further failure is answered more slowly.
    pub slow_after: u32,
    /// Extra wait per failure past `slow_after` (at most 8 steps).
    pub slow_step: Duration,
    /// Failures (counting checks in flight) after which the client is blocked.
    pub block_after: u32,
    /// A client's failures are forgotten after this long without one.
    pub memory: Duration,
    /// Checks queued or running for one client at once; past it `454 4.7.0`.
    pub per_client: u32,
    /// Checks queued or running for all clients at once; past it `454 4.7.0`.
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            slow_after: 3,
            slow_step: Duration::from_millis(250),
            block_after: 10,
            memory: Duration::from_secs(15 * 60),
            per_client: 3,
            // An Argon2 check takes some 20-50 ms: a full queue is a few seconds of work.
            total: 128,
        }
    }
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client used its failure budget: `421 4.7.0` and close.
    Blocked,
    /// Too many checks waiting, for this client or for all: `454 4.7.0`, try again later.
    Busy,
}

/// How to answer a checked attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `235`.
    Accept,
    /// `535 5.7.8`, after `delay` (zero for the first few failures).
    Reject {
        /// How long to hold the answer back.
        delay: Duration,
    },
    /// `421 4.7.0` and close: this failure used up the budget, or the client was blocked
    /// while the check ran.
    Block,
}

#[derive(Debug)]
struct Client<J> {
    failures: u32,
    last_failure: Option<Instant>,
    /// Jobs queued plus the one running, if it is this client's.
    in_flight: u32,
    queue: VecDeque<J>,
}

impl<J> Client<J> {
    /// Failures still remembered at `now`.
    fn failures(&mut self, now: Instant, memory: Duration) -> u32 {
        if self.last_failure.is_some_and(|t| now.saturating_duration_since(t) > memory) {
            self.failures = 0;
            self.last_failure = None;
        }
        self.failures
    }
}

/// The throttle; `J` is the driver's job (it carries the credentials).
#[derive(Debug)]
pub struct AuthThrottle<J> {
    limits: Limits,
    clients: HashMap<ClientKey, Client<J>>,
    /// Clients with queued jobs, in service order.
    ring: VecDeque<ClientKey>,
    /// Jobs queued or running.
    in_flight: usize,
    /// A job is with the verifier.
    running: bool,
}

impl<J> AuthThrottle<J> {
    /// An empty throttle.
    pub fn new(limits: Limits) -> AuthThrottle<J> {
        AuthThrottle { limits, clients: HashMap::new(), ring: VecDeque::new(), in_flight: 0, running: false }
    }

    /// Queues `job` for `client`, or hands it back with the reason it may not run.
    pub fn submit(&mut self, client: ClientKey, job: J, now: Instant) -> Result<(), (Refusal, J)> {
        let l = self.limits;
        let c = self.clients.entry(client).or_insert(Client {
            failures: 0,
            last_failure: None,
            in_flight: 0,
            queue: VecDeque::new(),
        });
        let failures = c.failures(now, l.memory);
        if failures >= l.block_after {
            return Err((Refusal::Blocked, job));
        }
        // Checks in flight may all fail: they spend the budget already.
        if failures + c.in_flight >= l.block_after || c.in_flight >= l.per_client || self.in_flight >= l.total {
            return Err((Refusal::Busy, job));
        }
        c.in_flight += 1;
        c.queue.push_back(job);
        if c.queue.len() == 1 {
            self.ring.push_back(client);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// The next job to verify, taking clients in turn; `None` while one is running or none is
    /// queued. Each job taken must come back through [`Self::verdict`] or [`Self::abandon`].
    pub fn next_job(&mut self) -> Option<(ClientKey, J)> {
        if self.running {
            return None;
        }
        while let Some(client) = self.ring.pop_front() {
            let Some(c) = self.clients.get_mut(&client) else { continue };
            let Some(job) = c.queue.pop_front() else { continue };
            if !c.queue.is_empty() {
                self.ring.push_back(client);
            }
            self.running = true;
            return Some((client, job));
        }
        None
    }

    /// The job from [`Self::next_job`] was not run (its session is gone): frees its place.
    pub fn abandon(&mut self, client: ClientKey) {
        self.running = false;
        self.release(client);
    }

    /// The result of the running job for `client`: counts a failure and says how to answer.
    pub fn verdict(&mut self, client: ClientKey, ok: bool, now: Instant) -> Verdict {
        self.running = false;
        self.release(client);
        let l = self.limits;
        let Some(c) = self.clients.get_mut(&client) else {
            // Cannot happen (a job in flight keeps its client); refuse rather than accept.
            return Verdict::Block;
        };
        let failures = c.failures(now, l.memory);
        if ok {
            // Checked again: a client blocked while this check waited stays blocked.
            return if failures >= l.block_after { Verdict::Block } else { Verdict::Accept };
        }
        c.failures = failures + 1;
        c.last_failure = Some(now);
        if c.failures >= l.block_after {
            Verdict::Block
        } else if c.failures > l.slow_after {
            Verdict::Reject { delay: l.slow_step * (c.failures - l.slow_after).min(8) }
        } else {
            Verdict::Reject { delay: Duration::ZERO }
        }
    }

    /// Failures remembered for `client` (for log lines).
    pub fn failures(&self, client: ClientKey) -> u32 {
        self.clients.get(&client).map_or(0, |c| c.failures)
    }

    /// Jobs queued or running, for all clients.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Forgets clients with nothing in flight and no failure remembered at `now`; call it now
    /// and then (the driver does when a check finishes and the map is large).
    pub fn prune(&mut self, now: Instant) {
        let memory = self.limits.memory;
        self.clients.retain(|_, c| c.in_flight > 0 || c.failures(now, memory) > 0);
    }

    /// Clients remembered.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    fn release(&mut self, client: ClientKey) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(c) = self.clients.get_mut(&client) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ClientKey {
        ClientKey::of(s.parse().unwrap())
    }

    /// Runs every queued job to its verdict, failing each unless `ok(job)`.
    fn drain(t: &mut AuthThrottle<u32>, now: Instant, ok: impl Fn(u32) -> bool) -> Vec<(u32, Verdict)> {
        let mut out = Vec::new();
        while let Some((client, job)) = t.next_job() {
            out.push((job, t.verdict(client, ok(job), now)));
        }
        out
    }

    #[test]
    fn parallel_guesses_never_exceed_the_budget() {
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(Limits { per_client: 100, ..Limits::default() });
        let a = key("192.0.2.1");
        // 40 sessions submit at once: only 10 are queued, the rest are busy.
        let queued = (0..40).filter(|&i| t.submit(a, i, t0).is_ok()).count();
        assert_eq!(queued, 10);
        assert_eq!(t.submit(a, 99, t0), Err((Refusal::Busy, 99)));
        // Job 9 carries the right password; it is checked within the budget.
        let verdicts = drain(&mut t, t0, |j| j == 9);
        assert_eq!(verdicts.len(), 10);
        assert_eq!(verdicts[9], (9, Verdict::Accept));
        assert_eq!(t.failures(a), 9);
        // One more guess is allowed (9 failures), and its failure blocks.
        assert!(t.submit(a, 10, t0).is_ok());
        assert!(t.submit(a, 11, t0).is_err());
        assert_eq!(drain(&mut t, t0, |_| false), vec![(10, Verdict::Block)]);
        assert_eq!(t.submit(a, 12, t0), Err((Refusal::Blocked, 12)));
        // Still blocked near the end of the memory; free again after it.
        let later = t0 + Duration::from_secs(15 * 60);
        assert_eq!(t.submit(a, 13, later), Err((Refusal::Blocked, 13)));
        let after = later + Duration::from_secs(1);
        assert!(t.submit(a, 14, after).is_ok());
        assert_eq!(drain(&mut t, after, |_| true), vec![(14, Verdict::Accept)]);
    }

    #[test]
    fn ok_after_the_client_was_blocked_is_not_honoured() {
        // The in-flight count keeps this from happening through submissions alone; the check
        // at verdict time is the second line: force a block while a right password waits.
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(Limits { block_after: 3, ..Limits::default() });
        let a = key("192.0.2.1");
        assert!(t.submit(a, 1, t0).is_ok());
        assert!(t.submit(a, 2, t0).is_ok());
        let (c, _) = t.next_job().unwrap();
        assert_eq!(t.verdict(c, false, t0), Verdict::Reject { delay: Duration::ZERO });
        t.clients.get_mut(&a).unwrap().failures = 3;
        let (c, j) = t.next_job().unwrap();
        assert_eq!((j, t.verdict(c, true, t0)), (2, Verdict::Block));
        assert_eq!(t.submit(a, 3, t0), Err((Refusal::Blocked, 3)));
    }

    #[test]
    fn failures_slow_down_then_block() {
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(Limits::default());
        let a = key("192.0.2.1");
        let mut seen = Vec::new();
        for i in 0..10 {
            assert!(t.submit(a, i, t0).is_ok());
            seen.extend(drain(&mut t, t0, |_| false).into_iter().map(|(_, v)| v));
        }
        let ms = |n| Verdict::Reject { delay: Duration::from_millis(n) };
        assert_eq!(
            seen,
            vec![ms(0), ms(0), ms(0), ms(250), ms(500), ms(750), ms(1000), ms(1250), ms(1500), Verdict::Block]
        );
        // Another address is not affected, and its success does not unblock the first.
        let b = key("192.0.2.2");
        assert!(t.submit(b, 20, t0).is_ok());
        assert_eq!(drain(&mut t, t0, |_| true), vec![(20, Verdict::Accept)]);
        assert_eq!(t.submit(a, 21, t0), Err((Refusal::Blocked, 21)));
    }

    #[test]
    fn bounds_per_client_and_in_total() {
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(Limits { per_client: 2, total: 5, ..Limits::default() });
        let a = key("192.0.2.1");
        assert!(t.submit(a, 1, t0).is_ok());
        assert!(t.submit(a, 2, t0).is_ok());
        assert_eq!(t.submit(a, 3, t0), Err((Refusal::Busy, 3)));
        for (i, ip) in ["192.0.2.2", "192.0.2.3", "192.0.2.4"].into_iter().enumerate() {
            assert!(t.submit(key(ip), 10 + i as u32, t0).is_ok());
        }
        assert_eq!(t.in_flight(), 5);
        assert_eq!(t.submit(key("192.0.2.5"), 20, t0), Err((Refusal::Busy, 20)));
        // An IPv6 /64 is one client.
        let mut t = AuthThrottle::new(Limits { per_client: 1, ..Limits::default() });
        assert!(t.submit(key("2001:db8::1"), 1, t0).is_ok());
        assert!(t.submit(key("2001:db8::2"), 2, t0).is_err());
        assert!(t.submit(key("2001:db8:0:1::2"), 3, t0).is_ok());
    }

    #[test]
    fn clients_are_served_in_turn_one_job_at_a_time() {
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(Limits::default());
        let (a, b) = (key("192.0.2.1"), key("192.0.2.2"));
        for j in [1, 2, 3] {
            assert!(t.submit(a, j, t0).is_ok());
        }
        assert!(t.submit(b, 10, t0).is_ok());
        let (c, j) = t.next_job().unwrap();
        assert_eq!((c, j), (a, 1));
        assert!(t.next_job().is_none(), "one job at a time");
        assert!(t.submit(b, 11, t0).is_ok());
        t.verdict(c, false, t0);
        // b's first job comes before a's backlog.
        let order: Vec<u32> = drain(&mut t, t0, |_| false).into_iter().map(|(j, _)| j).collect();
        assert_eq!(order, vec![10, 2, 11, 3]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn abandoned_jobs_free_their_place_and_cost_no_failure() {
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(Limits { per_client: 1, ..Limits::default() });
        let a = key("192.0.2.1");
        assert!(t.submit(a, 1, t0).is_ok());
        let (c, _) = t.next_job().unwrap();
        t.abandon(c);
        assert_eq!((t.in_flight(), t.failures(a)), (0, 0));
        assert!(t.submit(a, 2, t0).is_ok());
        assert!(t.next_job().is_some());
        t.prune(t0);
        assert_eq!(t.clients(), 1, "a client with a job in flight is kept");
        t.abandon(a);
        t.prune(t0);
        assert_eq!(t.clients(), 0);
    }
}
