//! `InboundConn`: one accepted connection — a [`Transport`] (socket, optional TLS, pooled
//! buffers, readiness) and its [`ServerSession`].
//!
//! Idle connections hold no buffers: input and output chunks are checked out when bytes arrive
//! or replies are produced, and returned when empty. With TLS, `input` and `output` still hold
//! plaintext, so the session and the DATA scanner never see a record; after STARTTLS the
//! replies up to and including the `220` still go out in the clear (the transport's switch).

use std::net::SocketAddr;
use std::time::Instant;

use crate::buf::BufPool;
use crate::message::QueueId;
use crate::net::transport::{Flush, Transport};
use crate::smtp::auth::Credentials;
use crate::smtp::pace::Pace;
use crate::smtp::server::AuthOutcome;
use crate::smtp::server::{ServerSession, REPLY_ROOM};

/// One inbound connection.
pub struct InboundConn {
    /// Socket, optional TLS, pooled buffers, readiness.
    pub io: Transport,
    /// Peer address.
    pub peer: SocketAddr,
    /// Protocol state.
    pub session: ServerSession,
    /// Token generation.
    pub generation: u32,
    /// The peer closed its side.
    pub eof: bool,
    /// Close once the output is flushed.
    pub closing: bool,
    /// A message is appended and waits for the group commit.
    pub waiting: Option<QueueId>,
    /// In the per-turn list of connections with output to flush.
    pub dirty: bool,
    /// Current deadline.
    pub deadline: Instant,
    /// Due time of this connection's one live timer entry (entries at other times are stale);
    /// `None` once it has popped and nothing was armed again.
    pub timer_at: Option<Instant>,
    /// What the client's progress has earned it: the command and data deadlines.
    pub pace: Pace,
    /// Counted by the per-client connection limits (not exempt): uncount on close.
    pub limited: bool,
    /// Time of the end of data of the waiting message (for the latency log).
    pub eod_at: Option<Instant>,
    /// An AUTH verdict held back (failures are answered slowly), given at `deadline`.
    pub auth_delayed: Option<(AuthOutcome, Credentials)>,
}

impl InboundConn {
    /// Makes sure the output buffer exists and has room for one more reply, flushing first if
    /// it is nearly full. False when the client is not reading or the pool is empty; when true,
    /// `self.io.output` is `Some` with at least [`REPLY_ROOM`] free.
    pub fn make_reply_room(&mut self, pool: &mut BufPool) -> bool {
        if self.io.output.as_ref().is_some_and(|b| b.room() < REPLY_ROOM)
            && matches!(self.io.flush(pool), Flush::Failed(_))
        {
            return false;
        }
        self.io.output_buf(pool).is_some_and(|b| b.room() >= REPLY_ROOM)
    }

    /// Puts the connection on the turn's list of connections to flush (once).
    pub fn mark_dirty(&mut self, key: usize, list: &mut Vec<(usize, u32)>) {
        if !self.dirty {
            self.dirty = true;
            list.push((key, self.generation));
        }
    }
}
