//! Pure: what an operator asks of the engine at run time (`sluice queue bounce`, `summary`),
//! beside its own rules. A child of `engine` so that it reuses the engine's settle path
//! instead of a second way of failing recipients.
//!
//! Owns: picking the queued recipients an operator's bounce covers, and the per-destination
//! figures of a summary. Must never: touch a recipient in flight (its transaction decides
//! it), or settle a failure before the DSN that reports it is stored (that is `settle`'s
//! order, kept by going through it).

use super::{Engine, Now};
use crate::delivery::route::Verdict;
use crate::message::QueueId;
use crate::queue::{DestId, MsgKey};
use crate::smtp::reply::Reply;
use crate::smtp::LocalFault;

/// What `sluice queue bounce` names.
#[derive(Debug, Clone, Copy)]
pub enum OperatorBounce<'a> {
    /// One message, every destination of it.
    Id(QueueId),
    /// Every message queued for one destination (a recipient domain, lower or upper case).
    Domain(&'a str),
}

/// One destination's queued work, for `sluice queue summary`.
#[derive(Debug, Clone)]
pub struct DestSummary<'a> {
    /// The destination.
    pub dest: DestId,
    /// Its name.
    pub name: &'a str,
    /// Recipients not final (in flight included).
    pub queued: u64,
    /// Arrival of its oldest message, Unix ms.
    pub oldest_arrival_ms: u64,
    /// The reply of the last job settled there, if any since the start.
    pub last_reply: Option<&'a Reply>,
}

impl Engine {
    /// Fails every queued recipient `target` names that is not in flight, with `554 5.0.0
    /// Bounced by the operator: REASON`, through the same path as a `5xx` from a server: the
    /// DSN to the sender ([`super::Action::Bounce`]) is stored before the failure records.
    /// Returns how many recipients, and of how many messages, were bounced.
    pub fn bounce_queued(&mut self, target: OperatorBounce<'_>, reason: &str, now: Now) -> (usize, usize) {
        // A domain's destinations: one per egress source.
        let dest: Option<Vec<DestId>> = match target {
            OperatorBounce::Id(_) => None,
            OperatorBounce::Domain(name) => match self.queue.find_dests(name) {
                [] => return (0, 0),
                ids => Some(ids.to_vec()),
            },
        };
        // The (message, destination) pairs first: settling removes finished messages.
        let mut pairs: Vec<(MsgKey, DestId)> = Vec::new();
        for (key, m) in self.queue.messages() {
            if matches!(target, OperatorBounce::Id(id) if id != m.id) {
                continue;
            }
            for r in m.rcpts.iter() {
                if dest.as_ref().is_none_or(|d| d.contains(&r.dest)) && !pairs.contains(&(key, r.dest)) {
                    pairs.push((key, r.dest));
                }
            }
        }
        let reply = LocalFault::Operator { reason }.reply();
        let (mut rcpts, mut msgs) = (0, Vec::new());
        for (key, dest) in pairs {
            let Some(job) = self.queue.take_idle(key, dest) else { continue };
            rcpts += job.rcpts.len();
            if !msgs.contains(&key) {
                msgs.push(key);
            }
            let outcomes = vec![(Verdict::Failed, reply.clone()); job.rcpts.len()];
            self.settle(job, None, outcomes, None, "none", now);
        }
        (rcpts, msgs.len())
    }

    /// Queued recipients per destination that has any, in destination order.
    pub fn summary(&self) -> Vec<DestSummary<'_>> {
        let mut rows: Vec<Option<(u64, u64)>> = vec![None; self.queue.dest_count()];
        for (_, m) in self.queue.messages() {
            for r in m.rcpts.iter().filter(|r| r.is_open()) {
                let row = rows[r.dest as usize].get_or_insert((0, m.arrival_ms));
                row.0 += 1;
                row.1 = row.1.min(m.arrival_ms);
            }
        }
        rows.into_iter()
            .enumerate()
            .filter_map(|(d, row)| {
                let (queued, oldest_arrival_ms) = row?;
                let dest = d as DestId;
                Some(DestSummary {
                    dest,
                    name: &self.queue.dest(dest).name,
                    queued,
                    oldest_arrival_ms,
                    last_reply: self.dests.get(d).and_then(|s| {
                        // While it is down its work is parked with no record: the failure that
                        // took it down is then the latest word from it.
                        let down = if s.probing { s.backoff_reply.as_ref() } else { None };
                        down.or(s.last_reply.as_ref())
                    }),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::OperatorBounce;
    use crate::delivery::harness::{config, reply, Harness, Host, Server};
    use crate::delivery::route::Verdict;
    use crate::delivery::OutboundTls;

    const MX: [u8; 4] = [192, 0, 2, 1];
    const MX_B: [u8; 4] = [192, 0, 2, 2];

    fn harness() -> Harness {
        let mut h = Harness::new(config(1, OutboundTls::None));
        h.mx("a.test", &[("mx.a.test", 10, MX)]);
        h.mx("b.test", &[("mx.b.test", 10, MX_B)]);
        h
    }

    /// Deferred mail for a down domain is bounced at once, the DSN stored before the failure
    /// records that name it; the other domain of the same message is left alone.
    #[test]
    fn a_domain_bounce_fails_its_queued_recipients_after_storing_the_dsn() {
        let mut h = harness();
        h.host(MX, Host::Refuse);
        h.host(MX_B, Host::Refuse);
        let id = h.submit("s@x.test", &["u@a.test", "v@a.test", "w@b.test"]);
        h.run();
        // Both destinations are down: their work waits (parked or deferred), nothing failed.
        assert!(h.outcomes(id).iter().all(|o| o.1 == Verdict::Deferred));
        let before = h.records.len();
        let now = h.now();
        assert_eq!(h.engine.bounce_queued(OperatorBounce::Domain("A.test"), "spam run", now), (2, 1));
        h.run();
        let new: Vec<_> = h.records[before..].iter().filter(|r| r.id == id).collect();
        assert_eq!(new.len(), 2, "{new:?}");
        for r in &new {
            assert_eq!((r.settled.verdict, r.settled.reply.code), (Verdict::Failed, 554));
            assert_eq!(r.settled.reply.to_string(), "554 5.0.0 Bounced by the operator: spam run");
        }
        assert_eq!(h.bounces.len(), 1);
        let (dsn, of, reported) = h.bounces[0].clone();
        assert_eq!((of, reported), (id, vec![0, 1]));
        assert_eq!(new[0].settled.bounce, Some(dsn));
        // The DSN is stored before the failure records that name it.
        let b = h.log.iter().position(|l| *l == format!("B {}", dsn.0)).unwrap();
        let failures: Vec<usize> =
            h.log.iter().enumerate().filter(|(_, l)| **l == format!("O {}", id.0)).map(|(i, _)| i).collect();
        assert!(failures.len() >= 2 && failures[failures.len() - 2..].iter().all(|&i| i > b), "{:?}", h.log);
        // b.test's recipient is still queued: the message is not finished.
        assert!(!h.released.contains(&id));
        let rows = h.engine.summary();
        assert!(rows.iter().any(|r| r.name == "b.test" && r.queued == 1), "{rows:?}");
        assert!(!rows.iter().any(|r| r.name == "a.test"), "{rows:?}");
        // Nothing left for a.test: a second bounce finds nothing.
        let now = h.now();
        assert_eq!(h.engine.bounce_queued(OperatorBounce::Domain("a.test"), "", now), (0, 0));
        assert_eq!(h.engine.bounce_queued(OperatorBounce::Domain("never.test"), "", now), (0, 0));
    }

    /// A bounce by id takes every destination of the message and finishes it; a recipient in
    /// the middle of a transaction is left to it.
    #[test]
    fn an_id_bounce_finishes_the_message_but_spares_recipients_in_flight() {
        let mut h = harness();
        h.host(MX, Host::Smtp(Server { hold: true, ..Server::default() }));
        h.host(MX_B, Host::Refuse);
        let id = h.submit("s@x.test", &["u@a.test", "w@b.test"]);
        let other = h.submit("s@x.test", &["z@b.test"]);
        h.run();
        let now = h.now();
        assert_eq!(h.engine.bounce_queued(OperatorBounce::Id(id), "", now), (1, 1), "u@a.test is in flight");
        h.run();
        let o = h.outcomes(id);
        assert!(o.iter().any(|r| r.0 == "w@b.test" && r.1 == Verdict::Failed && r.3 == (5, 0, 0)), "{o:?}");
        assert!(!o.iter().any(|r| r.0 == "u@a.test" && r.1 == Verdict::Failed), "{o:?}");
        assert!(!h.outcomes(other).iter().any(|r| r.1 == Verdict::Failed), "another message is untouched");
        // The transaction decides u@a.test; then the message is done.
        h.complete(MX);
        assert!(h.outcomes(id).iter().any(|r| r.0 == "u@a.test" && r.1 == Verdict::Delivered));
        assert!(h.released.contains(&id));
    }

    /// The summary counts open recipients per destination, the oldest arrival and the last
    /// reply there.
    #[test]
    fn the_summary_has_the_last_reply_per_destination() {
        let mut h = harness();
        let rcpt = [("bad@b.test".to_string(), reply(550, (5, 1, 1), "no such user"))].into();
        h.host(MX, Host::Greet(reply(421, (4, 3, 2), "busy")));
        h.host(MX_B, Host::Smtp(Server { rcpt, ..Server::default() }));
        let t0 = h.now().wall_ms;
        h.submit("s@x.test", &["u@a.test", "bad@b.test"]);
        h.advance(Duration::from_secs(5));
        h.submit("s@x.test", &["v@a.test"]);
        h.run();
        let rows = h.engine.summary();
        let a = rows.iter().find(|r| r.name == "a.test").expect("a.test row");
        assert_eq!((a.queued, a.oldest_arrival_ms), (2, t0));
        assert!(a.last_reply.is_some_and(|r| r.code == 451), "{a:?}");
        assert!(!rows.iter().any(|r| r.name == "b.test"), "b.test's one recipient failed: {rows:?}");
    }
}
