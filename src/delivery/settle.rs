//! Pure: settling recipients after an attempt — the verdict of each (a deferral past the
//! queue lifetime is a failure, `4.4.7`), its next attempt, and what happens when the bounce
//! that must report a failure cannot be stored.

use std::time::Duration;

use super::route::Verdict;
use crate::message::QueueId;
use crate::queue::schedule::{NextStep, RetryPolicy};
use crate::smtp::reply::Reply;
use crate::smtp::LocalFault;
use crate::spool::format::padded_record_len;

/// When a recipient whose bounce could not be stored is tried again (at the latest).
pub const BOUNCE_RETRY: Duration = Duration::from_secs(60);

/// One recipient's outcome, as recorded in the spool and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Recipient index in the envelope.
    pub rcpt: u32,
    /// Delivered, deferred or failed.
    pub verdict: Verdict,
    /// The reply that decided it.
    pub reply: Reply,
    /// Attempts made, this one included.
    pub attempts: u16,
    /// Next attempt (Unix ms) when deferred, else 0.
    pub next_ms: u64,
    /// For a failure reported in a DSN: the DSN's queue id.
    pub bounce: Option<QueueId>,
}

/// Decides each recipient of a job: `outcomes[n]` belongs to `rcpts[n]` (a missing one is
/// deferred), `tries[n]` counts its attempts with this one. A deferral once the lifetime is over
/// becomes a failure with `5.4.7` naming the last reply (see `RetryPolicy::next_attempt`).
pub fn decide(
    policy: &RetryPolicy,
    rcpts: &[u32],
    tries: &[u16],
    outcomes: Vec<(Verdict, Reply)>,
    arrival_ms: u64,
    now_ms: u64,
) -> Vec<Settled> {
    let mut outcomes = outcomes.into_iter();
    rcpts
        .iter()
        .zip(tries)
        .map(|(&rcpt, &attempts)| {
            let (mut verdict, mut reply) =
                outcomes.next().unwrap_or_else(|| (Verdict::Deferred, LocalFault::NoOutcome.reply()));
            let mut next_ms = 0;
            if verdict == Verdict::Deferred {
                match policy.next_attempt(attempts, arrival_ms, now_ms) {
                    NextStep::RetryAt(t) => next_ms = t,
                    NextStep::Expire => {
                        verdict = Verdict::Failed;
                        reply = LocalFault::Expired { last: &reply }.reply();
                    }
                }
            }
            Settled { rcpt, verdict, reply, attempts, next_ms, bounce: None }
        })
        .collect()
}

/// The bounce that reports the failures among `settled` could not be stored (a full disk):
/// settling them as failed would drop the message with no word to its sender. Those `wants_dsn`
/// names stay deferred (retried within [`BOUNCE_RETRY`], when the next attempt decides and
/// bounces again); those who asked for no failure notice need no DSN and fail now.
pub fn keep_unbounced(
    settled: &mut [Settled],
    wants_dsn: impl Fn(u32) -> bool,
    policy: &RetryPolicy,
    arrival_ms: u64,
    now_ms: u64,
) {
    let retry_ms = now_ms + BOUNCE_RETRY.as_millis() as u64;
    for s in settled.iter_mut().filter(|s| s.verdict == Verdict::Failed && wants_dsn(s.rcpt)) {
        s.verdict = Verdict::Deferred;
        s.next_ms = match policy.next_attempt(s.attempts, arrival_ms, now_ms) {
            NextStep::RetryAt(t) => t.min(retry_ms),
            NextStep::Expire => retry_ms,
        };
    }
}

/// Room for the outcome records of `settled` (all of them, written after a DSN), so that the
/// DSN and the records naming it go into one segment.
pub fn outcome_room(settled: &[Settled], remote: &str) -> usize {
    settled.iter().map(|s| padded_record_len(64 + s.reply.to_string().len() + remote.len())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { schedule: vec![Duration::from_secs(60)], max_lifetime: Duration::from_secs(3600) }
    }

    #[test]
    fn a_deferral_past_the_lifetime_fails_with_4_4_7_naming_the_last_reply() {
        let later = LocalFault::DestinationDown.reply();
        let outcomes = vec![(Verdict::Deferred, later.clone()), (Verdict::Deferred, later.clone())];
        // Arrived a lifetime ago: no retry is left.
        let s = decide(&policy(), &[0, 3], &[5, 1], outcomes.clone(), 0, 3_600_000);
        assert_eq!(s[0].verdict, Verdict::Failed);
        assert_eq!(s[0].reply.code, 550);
        assert_eq!(s[0].reply.enhanced, Some((5, 4, 7)));
        assert!(s[0].reply.text.contains("destination down"), "{}", s[0].reply);
        // Young: retried a minute later.
        let s = decide(&policy(), &[0, 3], &[1, 1], outcomes, 1_000_000, 1_000_000);
        assert_eq!((s[1].rcpt, s[1].verdict, s[1].next_ms), (3, Verdict::Deferred, 1_060_000));
        // A missing outcome is a deferral, never a delivery.
        let s = decide(&policy(), &[0], &[1], Vec::new(), 0, 0);
        assert_eq!(s[0].verdict, Verdict::Deferred);
    }

    #[test]
    fn failures_without_a_stored_bounce_wait_unless_they_want_no_notice() {
        let no = LocalFault::NoRecipients.reply();
        let mut s =
            decide(&policy(), &[0, 1], &[1, 1], vec![(Verdict::Failed, no.clone()), (Verdict::Failed, no)], 0, 0);
        keep_unbounced(&mut s, |r| r == 0, &policy(), 0, 0);
        assert_eq!((s[0].verdict, s[0].next_ms), (Verdict::Deferred, 60_000));
        assert_eq!(s[1].verdict, Verdict::Failed);
        assert!(outcome_room(&s, "mx.test[192.0.2.1]") >= 2 * 64);
    }
}
