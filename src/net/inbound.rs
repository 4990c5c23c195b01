//! `InboundConn`: one accepted socket, its pooled buffers and its [`ServerSession`].
//!
//! The connection keeps mio readiness as two flags (edge-triggered: a flag stays set until a
//! read or write returns `WouldBlock`). Idle connections hold no buffers: input and output
//! chunks are checked out when bytes arrive or replies are produced, and returned when empty.
//!
//! With TLS a [`TlsSession`] sits between the socket and the buffers: `input` and `output`
//! always hold plaintext, so the session and the DATA scanner never see a record. After
//! STARTTLS the first `clear_out` bytes of `output` (the replies up to and including the
//! `220`) still go out in the clear; everything after them goes through TLS.

use std::net::SocketAddr;
use std::time::Instant;

use crate::buf::{Buf, BufPool};
use crate::message::QueueId;
use crate::net::socket::{self, IoResult};
use crate::net::tls::{TlsFlush, TlsRead, TlsSession};
use crate::smtp::auth::Credentials;
use crate::smtp::pace::Pace;
use crate::smtp::server::AuthOutcome;
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
    /// Due time of this connection's one live timer entry (entries at other times are stale);
    /// `None` once it has popped and nothing was armed again.
    pub timer_at: Option<Instant>,
    /// What the client's progress has earned it: the command and data deadlines.
    pub pace: Pace,
    /// Counted by the per-client connection limits (not exempt): uncount on close.
    pub limited: bool,
    /// Time of the end of data of the waiting message (for the latency log).
    pub eod_at: Option<Instant>,
    /// TLS, once STARTTLS was accepted or from the first byte on an implicit-TLS listener.
    pub tls: Option<TlsSession>,
    /// Leading bytes of `output` still to be written in the clear (the STARTTLS `220`).
    pub clear_out: usize,
    /// An AUTH verdict held back (failures are answered slowly), given at `deadline`.
    pub auth_delayed: Option<(AuthOutcome, Credentials)>,
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

    /// Puts the connection on the turn's list of connections to flush (once).
    pub fn mark_dirty(&mut self, key: usize, list: &mut Vec<(usize, u32)>) {
        if !self.dirty {
            self.dirty = true;
            list.push((key, self.generation));
        }
    }

    /// Unsent output bytes (plaintext; plus one when TLS has records to write).
    pub fn pending_output(&self) -> usize {
        let tls = self.tls.as_ref().is_some_and(|t| t.wants_write());
        self.output.as_ref().map_or(0, |b| b.data().len()) + usize::from(tls)
    }

    /// Reads plaintext into `dst`: from the socket, or through TLS when it is on. A short
    /// plain read means the socket is drained; through TLS only `WouldBlock` says so.
    /// (Takes the fields, not `self`, so `dst` may be the connection's own input buffer.)
    pub fn read(sock: &mut mio::net::TcpStream, tls: &mut Option<TlsSession>, dst: &mut [u8]) -> IoResult {
        let Some(tls) = tls.as_mut() else { return socket::read(sock, dst) };
        match tls.read(sock, dst) {
            TlsRead::Data(n) => IoResult::Done(n),
            TlsRead::WouldBlock => IoResult::WouldBlock,
            TlsRead::Closed => IoResult::Closed,
            TlsRead::Failed(e) => IoResult::Error(std::io::Error::other(e)),
        }
    }

    /// Writes as much output as the socket takes; returns the buffer to the pool when empty.
    pub fn flush(&mut self, pool: &mut BufPool) -> Flush {
        loop {
            if !self.writable {
                return if self.pending_output() > 0 { Flush::Partial } else { Flush::Done };
            }
            let Some(tls) = self.tls.as_mut().filter(|_| self.clear_out == 0) else {
                // A plain connection, or the clear-text prefix before the switch to TLS.
                let Some(out) = self.output.as_mut() else { return Flush::Done };
                if out.is_empty() {
                    pool.release(&mut self.output);
                    return Flush::Done;
                }
                let len = if self.tls.is_some() { self.clear_out } else { out.data().len() };
                match socket::write(&mut self.sock, &out.data()[..len]) {
                    IoResult::Done(n) => {
                        out.consume(n);
                        self.clear_out -= n.min(self.clear_out);
                    }
                    IoResult::WouldBlock => self.writable = false,
                    IoResult::Closed | IoResult::Error(_) => return Flush::Failed,
                }
                continue;
            };
            let mut took = 0;
            if let Some(out) = self.output.as_mut().filter(|b| !b.is_empty()) {
                took = tls.write(out.data());
                out.consume(took);
            }
            match tls.flush(&mut self.sock) {
                TlsFlush::Done => {}
                TlsFlush::WouldBlock => self.writable = false,
                TlsFlush::Failed(_) => return Flush::Failed,
            }
            let plain_left = self.output.as_ref().is_some_and(|b| !b.is_empty());
            if !plain_left && !tls.wants_write() {
                pool.release(&mut self.output);
                return Flush::Done;
            }
            if took == 0 && !tls.wants_write() {
                // TLS holds all it will take until the handshake finishes.
                return Flush::Partial;
            }
        }
    }

    /// Gives both buffers back.
    pub fn release_buffers(&mut self, pool: &mut BufPool) {
        pool.release(&mut self.input);
        pool.release(&mut self.output);
    }
}
