//! Pure: how a reply or a failure is classed (RFC 5321 §4.2.1, RFC 3463), and the synthetic
//! replies the relay writes into outcomes when no server said anything, and which mail
//! exchangers are this relay itself.

use std::net::IpAddr;

use crate::dns::resolver::MxPlan;
use crate::smtp::reply::Reply;
use crate::spool::RcptStatus;

/// What happens to a recipient after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: done.
    Delivered,
    /// 4xx, connection trouble, timeout: retry later.
    Deferred,
    /// 5xx: bounce.
    Failed,
}

impl Verdict {
    /// The spool status recorded for this verdict.
    pub fn status(self) -> RcptStatus {
        match self {
            Verdict::Delivered => RcptStatus::Delivered,
            Verdict::Deferred => RcptStatus::Deferred,
            Verdict::Failed => RcptStatus::Failed,
        }
    }
}

/// Classes a reply code.
pub fn verdict(code: u16) -> Verdict {
    match code / 100 {
        2 => Verdict::Delivered,
        5 => Verdict::Failed,
        // 4xx, and anything odd (1xx/3xx where a final reply was due) is not final.
        _ => Verdict::Deferred,
    }
}

/// The verdict a reply to one RCPT settles by itself: `None` when the recipient was accepted
/// (the reply to the data decides). A `552` before any data reply is "too many recipients" from
/// an old server (RFC 5321 §4.5.3.1.10): deferred, like `452`, not failed.
pub fn rcpt_outcome(reply: &Reply, data_answered: bool) -> Option<(Verdict, Reply)> {
    if reply.is_positive_completion() {
        None
    } else if reply.code == 552 && !data_answered {
        Some((Verdict::Deferred, reply.clone()))
    } else {
        Some((verdict(reply.code), reply.clone()))
    }
}

/// The enhanced status code of a reply, or the class default (RFC 3463 §3: X.0.0).
pub fn status_code(reply: &Reply) -> (u8, u16, u16) {
    match reply.enhanced {
        Some(e) => e,
        None => ((reply.code / 100) as u8, 0, 0),
    }
}

/// A reply line made up by the relay (for DNS failures, connection failures, expiry).
pub fn synthetic(code: u16, enhanced: (u8, u16, u16), text: &str) -> Reply {
    Reply { code, enhanced: Some(enhanced), text: text.to_owned() }
}

/// The plan without this relay and every host it must not hand mail to (RFC 5321 §5.1): when
/// one of the hosts is us (our host name, or an address `is_self` names), only hosts with a
/// strictly lower preference may be tried; `None` when none is left (the mail would loop back
/// to us). A plan without us comes back unchanged.
pub fn without_self(mut plan: MxPlan, hostname: &str, is_self: impl Fn(IpAddr) -> bool) -> Option<MxPlan> {
    let hostname = hostname.trim_end_matches('.');
    let ours = plan
        .hosts
        .iter()
        .filter(|h| h.name.trim_end_matches('.').eq_ignore_ascii_case(hostname) || h.addrs.iter().any(|&a| is_self(a)))
        .map(|h| h.preference)
        .min();
    if let Some(pref) = ours {
        plan.hosts.retain(|h| h.preference < pref);
    }
    (!plan.hosts.is_empty()).then_some(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::resolver::MxHost;

    fn plan(hosts: &[(&str, u16, [u8; 4])]) -> MxPlan {
        MxPlan {
            hosts: hosts
                .iter()
                .map(|&(n, p, a)| MxHost { name: n.into(), preference: p, addrs: vec![IpAddr::from(a)] })
                .collect(),
        }
    }

    #[test]
    fn our_own_mx_and_everything_after_it_is_dropped() {
        let us = |a: IpAddr| a == IpAddr::from([192, 0, 2, 1]);
        let p =
            plan(&[("a.test", 10, [192, 0, 2, 9]), ("relay.test", 20, [192, 0, 2, 8]), ("c.test", 30, [192, 0, 2, 7])]);
        // By name (case and a trailing dot do not matter): only the better MX is left.
        let left = without_self(p.clone(), "RELAY.test.", us).unwrap();
        assert_eq!(left.hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["a.test"]);
        // Not us at all: unchanged.
        assert_eq!(without_self(p.clone(), "other.test", us), Some(p));
        // By address, and we are the best MX: nothing to try, the mail would loop.
        let p = plan(&[("mx1.test", 10, [192, 0, 2, 1]), ("mx2.test", 20, [192, 0, 2, 2])]);
        assert_eq!(without_self(p, "relay.test", us), None);
        // Equal preference with us is not better than us either.
        let p = plan(&[("mx1.test", 10, [192, 0, 2, 5]), ("mx2.test", 10, [192, 0, 2, 1])]);
        assert_eq!(without_self(p, "relay.test", us), None);
    }

    #[test]
    fn rcpt_replies_settle_refusals_only() {
        let ok = synthetic(250, (2, 1, 5), "ok");
        let gone = synthetic(550, (5, 1, 1), "no such user");
        let full = synthetic(552, (5, 5, 3), "too many recipients");
        assert_eq!(rcpt_outcome(&ok, true), None);
        assert_eq!(rcpt_outcome(&gone, false).map(|o| o.0), Some(Verdict::Failed));
        assert_eq!(rcpt_outcome(&full, false).map(|o| o.0), Some(Verdict::Deferred));
        assert_eq!(rcpt_outcome(&full, true).map(|o| o.0), Some(Verdict::Failed));
        assert_eq!(rcpt_outcome(&synthetic(450, (4, 2, 1), "later"), false).map(|o| o.0), Some(Verdict::Deferred));
    }

    #[test]
    fn classes() {
        assert_eq!(verdict(250), Verdict::Delivered);
        assert_eq!(verdict(251), Verdict::Delivered);
        assert_eq!(verdict(451), Verdict::Deferred);
        assert_eq!(verdict(421), Verdict::Deferred);
        assert_eq!(verdict(550), Verdict::Failed);
        assert_eq!(verdict(354), Verdict::Deferred);
        let r = synthetic(451, (4, 4, 1), "connection refused");
        assert_eq!(status_code(&r), (4, 4, 1));
        assert_eq!(status_code(&Reply { code: 550, enhanced: None, text: String::new() }), (5, 0, 0));
    }
}
