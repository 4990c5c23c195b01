//! Pure: the DSN (RFC 3464) that reports a job's failed recipients to the sender, and the
//! envelope it travels in. The engine decides whether one is due ([`super::engine`]); the
//! driver reads the original from the spool, calls [`build`], and stores the result.

use std::net::IpAddr;

use super::engine::BounceRequest;
use super::route::status_code;
use crate::dsn::{self, Action, DsnInput, DsnRecipient};
use crate::message::{Envelope, QueueId, Ret};

/// The DSN for `req`: its envelope (from the null sender to the failed message's sender) and
/// its text. `env` and `body` are the failed message's; only the header section of `body`
/// is returned unless the sender asked for `RET=FULL`.
pub fn build(
    hostname: &str,
    req: &BounceRequest,
    env: &Envelope,
    body: &[u8],
    bounce_id: QueueId,
    now_ms: u64,
) -> (Envelope, Vec<u8>) {
    let remote = req.remote.as_deref().unwrap_or("");
    let diags: Vec<String> = req.failed.iter().map(|(_, r)| format!("smtp; {r}")).collect();
    let remote_mta = if remote.is_empty() { String::new() } else { format!("dns; {remote}") };
    let recipients: Vec<DsnRecipient<'_>> = req
        .failed
        .iter()
        .zip(&diags)
        .filter(|((i, _), _)| (*i as usize) < env.rcpt_count())
        .map(|((i, r), diag)| {
            let rv = env.rcpt(*i as usize);
            DsnRecipient {
                final_recipient: rv.addr,
                original_recipient: rv.orcpt,
                action: Action::Failed,
                status: status_code(r),
                remote_mta: remote_mta.as_bytes(),
                diagnostic: diag.as_bytes(),
                last_attempt_unix: now_ms / 1000,
            }
        })
        .collect();
    let end = if env.ret == Ret::Full {
        body.len()
    } else {
        memchr::memmem::find(body, b"\r\n\r\n").map_or(body.len(), |i| i + 4)
    };
    let original = &body[..end];
    let mut text = Vec::with_capacity(original.len().min(1 << 20) + 2048);
    dsn::build_dsn(
        &DsnInput {
            reporting_mta: hostname,
            original_envelope_id: &env.envid,
            arrival_unix: req.arrival_ms / 1000,
            now_unix: now_ms / 1000,
            sender: &env.sender,
            queue_id: req.id,
            recipients: &recipients,
            original,
            ret: env.ret,
            boundary_seed: bounce_id.0,
        },
        &mut text,
    );
    let mut benv = Envelope::default();
    benv.helo.extend_from_slice(hostname.as_bytes());
    benv.push_rcpt(&env.sender, b"", 0);
    benv.client_ip = IpAddr::from([127, 0, 0, 1]);
    (benv, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::Reply;
    use crate::spool::MessageLoc;

    #[test]
    fn the_dsn_goes_to_the_sender_with_the_headers_only_unless_ret_full() {
        let mut env = Envelope::default();
        env.sender.extend_from_slice(b"s@x.test");
        env.push_rcpt(b"bad@a.test", b"", 0);
        let failed = vec![(0, Reply::new(550, Some((5, 1, 1)), "no such user"))];
        let req = BounceRequest {
            token: 0,
            id: QueueId(7),
            loc: MessageLoc { segment: 1, offset: 0, len: 0 },
            arrival_ms: 0,
            failed,
            remote: Some("mx.a.test[192.0.2.1]".into()),
            room: 0,
        };
        let body = b"Subject: hi\r\n\r\nsecret body\r\n";
        let (benv, text) = build("relay.test", &req, &env, body, QueueId(8), 1_000);
        assert!(benv.sender.is_empty());
        assert_eq!(benv.rcpt(0).addr, b"s@x.test");
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("Final-Recipient: rfc822; bad@a.test"), "{text}");
        assert!(text.contains("Status: 5.1.1") && text.contains("Remote-MTA: dns; mx.a.test[192.0.2.1]"), "{text}");
        assert!(text.contains("Subject: hi") && !text.contains("secret body"));
        env.ret = Ret::Full;
        let (_, text) = build("relay.test", &req, &env, body, QueueId(8), 1_000);
        assert!(String::from_utf8_lossy(&text).contains("secret body"));
    }
}
