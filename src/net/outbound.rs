//! `OutboundConn`: one delivery connection — a non-blocking socket, pooled buffers and the pure
//! [`ClientSession`] — and the I/O that moves bytes between them.
//!
//! Opportunistic STARTTLS (a later issue) plugs in here: a TLS stage between the socket and the
//! session's byte streams, as `net/inbound` will have for the server side.

use std::net::SocketAddr;
use std::time::Instant;

use crate::buf::{Buf, BufPool};
use crate::net::socket::{self, IoResult};
use crate::queue::{DestId, Job};
use crate::smtp::client::ClientSession;
use crate::spool::BodyLoc;

/// The transaction a connection is carrying.
#[derive(Debug)]
pub struct ActiveJob {
    /// Recipients and message.
    pub job: Job,
    /// Where the body lies in the spool map.
    pub body: BodyLoc,
    /// Attempt number per recipient of the job (same order as `job.rcpts`).
    pub attempts: Vec<u16>,
}

/// One outbound connection.
pub struct OutboundConn {
    /// The socket.
    pub sock: mio::net::TcpStream,
    /// Remote address.
    pub peer: SocketAddr,
    /// Remote host name (MX name or relay host).
    pub host: Box<str>,
    /// Destination served.
    pub dest: DestId,
    /// Token generation.
    pub generation: u32,
    /// Protocol state.
    pub session: ClientSession,
    /// Unparsed input.
    pub input: Option<Buf>,
    /// Unsent output.
    pub output: Option<Buf>,
    /// Readable since the last `WouldBlock`.
    pub readable: bool,
    /// Writable since the last `WouldBlock`.
    pub writable: bool,
    /// The TCP connect has completed.
    pub connected: bool,
    /// The transaction in progress.
    pub active: Option<ActiveJob>,
    /// Transactions completed on this connection.
    pub transactions: u32,
    /// Idle (Ready, no job) since.
    pub idle_since: Option<Instant>,
    /// Index of the address used in the destination's address list.
    pub addr_index: usize,
    /// When the connect started (for the connect timeout).
    pub created: Instant,
    /// The server greeted and accepted EHLO/HELO at least once.
    pub greeted: bool,
}

/// What moving bytes achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Io {
    /// Fine; maybe more later.
    Ok,
    /// The peer closed its side.
    Closed,
    /// The connection failed.
    Failed,
}

impl OutboundConn {
    /// Reads everything available into the input buffer (edge-triggered: until `WouldBlock`,
    /// or a short read), feeding the session as it goes.
    pub fn read(&mut self, pool: &mut BufPool, now: Instant) -> Io {
        while self.readable {
            if self.input.is_none() {
                self.input = pool.checkout();
            }
            let Some(inb) = self.input.as_mut() else { return Io::Ok };
            let space = inb.space();
            if space.is_empty() {
                // A reply larger than the buffer: the session rejects such replies as malformed
                // once it sees enough; feed what we have.
                let n = self.session.handle_input(inb.data(), now);
                inb.consume(n);
                if n == 0 {
                    return Io::Failed;
                }
                continue;
            }
            let asked = space.len();
            match socket::read(&mut self.sock, space) {
                IoResult::Done(n) => {
                    inb.fill(n);
                    let used = self.session.handle_input(inb.data(), now);
                    inb.consume(used);
                    if n < asked {
                        self.readable = false;
                    }
                }
                IoResult::WouldBlock => self.readable = false,
                IoResult::Closed => return Io::Closed,
                IoResult::Error(_) => return Io::Failed,
            }
        }
        pool.release_if_empty(&mut self.input);
        Io::Ok
    }

    /// Lets the session fill the output buffer (commands, and body pieces from `body`) and
    /// writes it, until the socket is full or the session has nothing more to say.
    pub fn write(&mut self, pool: &mut BufPool, body: &[u8]) -> Io {
        loop {
            if self.output.is_none() {
                self.output = pool.checkout();
            }
            let Some(out) = self.output.as_mut() else { return Io::Ok };
            self.session.poll_transmit(body, out);
            if out.is_empty() {
                pool.release(&mut self.output);
                return Io::Ok;
            }
            if !self.writable {
                return Io::Ok;
            }
            match socket::write(&mut self.sock, out.data()) {
                IoResult::Done(n) => out.consume(n),
                IoResult::WouldBlock => {
                    self.writable = false;
                    return Io::Ok;
                }
                IoResult::Closed | IoResult::Error(_) => return Io::Failed,
            }
        }
    }

    /// Gives both buffers back.
    pub fn release_buffers(&mut self, pool: &mut BufPool) {
        pool.release(&mut self.input);
        pool.release(&mut self.output);
    }
}
