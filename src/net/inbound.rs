//! `InboundConn`: one accepted socket, its pooled buffers and its [`ServerSession`].
//!
//! The connection keeps mio readiness as two flags (edge-triggered: a flag stays set until a
//! read or write returns `WouldBlock`). Idle connections hold no buffers: input and output
//! chunks are checked out when bytes arrive or replies are produced, and returned when empty.

use std::net::SocketAddr;
use std::time::Instant;

use crate::buf::{Buf, BufPool};
use crate::message::QueueId;
use crate::net::socket::{self, IoResult};
use crate::smtp::server::{ServerSession, REPLY_ROOM};

/// One inbound connection.
pub struct InboundConn {
    /// The socket.
    pub sock: mio::net::TcpStream,
    /// Peer address.
    pub peer: SocketAddr,
    /// Protocol state.
    pub session: ServerSession,
    /// Token generation.
    pub generation: u32,
    /// Unparsed input, when any.
    pub input: Option<Buf>,
    /// Unsent output, when any.
    pub output: Option<Buf>,
    /// Readable since the last `WouldBlock`.
    pub readable: bool,
    /// The peer's FIN (or an error) was reported: keep reading until EOF is seen.
    pub hup: bool,
    /// Writable since the last `WouldBlock`.
    pub writable: bool,
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
    /// Time of the end of data of the waiting message (for the latency log).
    pub eod_at: Option<Instant>,
}

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// Everything written.
    Done,
    /// Some output remains (the socket is full).
    Partial,
    /// The connection failed.
    Failed,
}

impl InboundConn {
    /// Output buffer, checked out on demand; `None` when the pool is exhausted.
    pub fn output<'a>(output: &'a mut Option<Buf>, pool: &mut BufPool) -> Option<&'a mut Buf> {
        if output.is_none() {
            *output = pool.checkout();
        }
        output.as_mut()
    }

    /// Makes sure the output buffer exists and has room for one more reply, flushing first if
    /// it is nearly full. False when the client is not reading or the pool is empty; when true,
    /// `self.output` is `Some` with at least [`REPLY_ROOM`] free.
    pub fn make_reply_room(&mut self, pool: &mut BufPool) -> bool {
        if self.output.as_ref().is_some_and(|b| b.room() < REPLY_ROOM) && self.flush(pool) == Flush::Failed {
            return false;
        }
        Self::output(&mut self.output, pool).is_some_and(|b| b.room() >= REPLY_ROOM)
    }

    /// Unsent output bytes.
    pub fn pending_output(&self) -> usize {
        self.output.as_ref().map_or(0, |b| b.data().len())
    }

    /// Writes as much output as the socket takes; returns the buffer to the pool when empty.
    pub fn flush(&mut self, pool: &mut BufPool) -> Flush {
        loop {
            let Some(out) = self.output.as_mut() else { return Flush::Done };
            if out.is_empty() {
                pool.release(&mut self.output);
                return Flush::Done;
            }
            if !self.writable {
                return Flush::Partial;
            }
            match socket::write(&mut self.sock, out.data()) {
                IoResult::Done(n) => out.consume(n),
                IoResult::WouldBlock => {
                    self.writable = false;
                    return Flush::Partial;
                }
                IoResult::Closed | IoResult::Error(_) => return Flush::Failed,
            }
        }
    }

    /// Gives both buffers back.
    pub fn release_buffers(&mut self, pool: &mut BufPool) {
        pool.release(&mut self.input);
        pool.release(&mut self.output);
    }
}
