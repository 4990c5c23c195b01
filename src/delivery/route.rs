//! Pure: how a reply or a failure is classed (RFC 5321 §4.2.1, RFC 3463), and the synthetic
//! replies the relay writes into outcomes when no server said anything.

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

#[cfg(test)]
mod tests {
    use super::*;

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
