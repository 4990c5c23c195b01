//! The AUTH side of the loop: the verification thread ([`AuthWorker`]) and the pure throttle
//! (`smtp::auth_throttle`) that decides which check runs next and what a verdict earns.
//!
//! Owns: handing the worker one job at a time, logging each checked password, and turning a
//! verdict into an [`Answer`] for the session. Must never: touch a connection (the inbound
//! driver writes the answer), or verify on the loop (Argon2 is slow on purpose).

use std::net::SocketAddr;
use std::time::Instant;

use crate::log::{Logger, V};
use crate::net::inbound::AuthJob;
use crate::reactor::authwork::{AuthVerdict, AuthWorker};
use crate::smtp::auth::Credentials;
use crate::smtp::auth_throttle::{self, AuthThrottle, Verdict};
use crate::smtp::server::AuthOutcome;

/// Past this many clients remembered, the throttle forgets the ones with nothing pending.
const PRUNE_ABOVE: usize = 100_000;

/// What to tell one session about its AUTH attempt (RFC 4954 §6 replies, chosen by the
/// session from the outcome).
#[derive(Debug)]
pub struct Answer {
    /// Slab key of the session.
    pub key: usize,
    /// The outcome to give.
    pub outcome: AuthOutcome,
    /// `Some` when a failure is answered slowly: not before then.
    pub at: Option<Instant>,
    /// The credentials, handed back (password wiped).
    pub creds: Credentials,
}

/// See the module doc.
pub struct AuthSide {
    worker: Option<AuthWorker>,
    /// Which checks run and when; failure budgets per client. Borrowed by the inbound driver,
    /// which submits checks.
    pub throttle: AuthThrottle<AuthJob>,
    /// Verdicts taken from the worker (kept for its capacity).
    verdicts: Vec<AuthVerdict>,
}

impl AuthSide {
    /// The AUTH side; without a worker AUTH is not offered.
    pub fn new(worker: Option<AuthWorker>) -> AuthSide {
        AuthSide { worker, throttle: AuthThrottle::new(auth_throttle::Limits::default()), verdicts: Vec::new() }
    }

    /// AUTH is offered (a worker runs).
    pub fn enabled(&self) -> bool {
        self.worker.is_some()
    }

    /// The worker woke the loop: each verdict is counted by the throttle and logged (even
    /// when the session has gone: each line is one password checked), and the answers for
    /// sessions still open are returned. `peer` says whether a session is still open, and
    /// who it is.
    pub fn take_verdicts(
        &mut self,
        now: Instant,
        peer: impl Fn(usize, u32) -> Option<SocketAddr>,
        log: &mut Logger,
    ) -> Vec<Answer> {
        let Some(worker) = self.worker.as_mut() else { return Vec::new() };
        worker.try_results(&mut self.verdicts);
        let mut answers = Vec::with_capacity(self.verdicts.len());
        for v in self.verdicts.drain(..) {
            let verdict = self.throttle.verdict(v.client, v.ok, now);
            let failures = u64::from(self.throttle.failures(v.client));
            let peer = peer(v.key, v.generation);
            let user = String::from_utf8_lossy(&v.creds.user).into_owned();
            let result = V::S(if v.ok { "ok" } else { "failed" });
            let answer = V::S(match verdict {
                Verdict::Accept => "accepted",
                Verdict::Reject { .. } => "rejected",
                Verdict::Block => "blocked",
            });
            let client: &dyn std::fmt::Display = match &peer {
                Some(p) => p,
                None => &v.client,
            };
            log.event(
                "auth",
                &[
                    ("client", V::D(client)),
                    ("user", V::S(&user)),
                    ("result", result),
                    ("answer", answer),
                    ("failures", V::N(failures)),
                ],
            );
            if peer.is_none() {
                continue;
            }
            let (outcome, at) = match verdict {
                Verdict::Accept => (AuthOutcome::Accepted, None),
                Verdict::Block => (AuthOutcome::Blocked, None),
                Verdict::Reject { delay } if delay.is_zero() => (AuthOutcome::Rejected, None),
                Verdict::Reject { delay } => (AuthOutcome::Rejected, Some(now + delay)),
            };
            answers.push(Answer { key: v.key, outcome, at, creds: v.creds });
        }
        if self.throttle.clients() > PRUNE_ABOVE {
            self.throttle.prune(now);
        }
        answers
    }

    /// Hands the worker its next check (the throttle says none while one runs), skipping
    /// (and freeing the place of) checks whose session has gone.
    pub fn pump(&mut self, live: impl Fn(usize, u32) -> bool) {
        let Some(worker) = self.worker.as_mut() else { return };
        while let Some((client, job)) = self.throttle.next_job() {
            if live(job.key, job.generation) {
                worker.submit(job);
                return;
            }
            self.throttle.abandon(client);
        }
    }
}
