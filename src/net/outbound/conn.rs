//! `OutboundConn`: one delivery connection — a non-blocking socket, pooled buffers, an optional
//! [`TlsSession`] and the pure [`ClientSession`] — and the I/O that moves bytes between them.
//!
//! The buffers always hold plaintext. Before STARTTLS the socket feeds `input` and drains
//! `output` directly; after the server's `220` ([`ClientEvent::StartTls`]) a client
//! [`TlsSession`] sits in between: reads go socket → TLS → `input`, writes go `output` → TLS →
//! socket. Readiness is edge-triggered, so both directions run until the socket itself says
//! `WouldBlock`, and every [`OutboundConn::write`] also flushes ciphertext the TLS layer queued
//! while reading (handshake messages, alerts), so nothing waits for an event that never comes.
//!
//! [`ClientEvent::StartTls`]: crate::smtp::client::ClientEvent::StartTls

use std::net::SocketAddr;
use std::time::Instant;

use crate::buf::{Buf, BufPool};
use crate::net::socket::{self, IoResult};
use crate::net::tls::{ClientTls, TlsError, TlsFlush, TlsInfo, TlsRead, TlsSession};
use crate::smtp::client::ClientSession;
use crate::spool::BodyLoc;

/// One outbound connection.
pub struct OutboundConn {
    /// The socket.
    pub sock: mio::net::TcpStream,
    /// Remote address.
    pub peer: SocketAddr,
    /// Remote host name (MX name or relay host): the TLS server name.
    pub host: Box<str>,
    /// Token generation (the engine's `ConnId::generation`).
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
    /// The peer's FIN (or a socket error) was reported: read on to EOF, even after a short read.
    pub hup: bool,
    /// The TCP connect has completed.
    pub connected: bool,
    /// Body of the transaction in progress, in the spool map.
    pub body: Option<BodyLoc>,
    /// Body of the transaction queued behind it (RFC 2920 §3.1, `ClientSession::queue_next`);
    /// it becomes `body` at the current one's `TransactionDone`.
    pub next_body: Option<BodyLoc>,
    /// The server greeted and accepted EHLO/HELO at least once: before that, a reset counts
    /// like a refused connect.
    pub greeted: bool,
    /// The session timer entry that is current for this connection.
    pub armed: Option<Instant>,
    /// TLS settings for STARTTLS (None when the session never asks for it).
    pub tls_config: Option<ClientTls>,
    /// TLS, from the server's `220` to STARTTLS on.
    pub tls: Option<TlsSession>,
    /// Version and cipher once the handshake finished.
    pub tls_info: Option<TlsInfo>,
    /// The handshake finished and the session was told.
    tls_up: bool,
    /// The handshake finished and the driver has not been told yet (see
    /// [`OutboundConn::take_tls_established`]).
    tls_news: bool,
    /// Why TLS failed (handshake, certificate, truncation), for the log and the deferral.
    pub tls_error: Option<String>,
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
    /// or a short plain read), feeding the session as it goes. Stops reading plaintext as soon
    /// as the session waits for TLS. A TLS failure is given to the session
    /// ([`ClientSession::handle_tls_failed`]) and returns [`Io::Ok`]: the session reports it.
    pub fn read(&mut self, pool: &mut BufPool, now: Instant) -> Io {
        while self.readable {
            if self.session.awaiting_tls() && self.tls.is_none() {
                // The rest of the socket's bytes are TLS: wait for `start_tls`.
                break;
            }
            if self.input.is_none() {
                self.input = pool.checkout();
            }
            let Some(inb) = self.input.as_mut() else { return Io::Ok };
            let space = inb.space();
            if space.is_empty() {
                // A reply longer than the buffer (a long multi-line EHLO): the session holds
                // it itself, up to its own limit, past which it fails with "reply too long".
                let n = self.session.handle_long_input(inb.data(), now);
                inb.consume(n);
                if n == 0 {
                    return Io::Failed;
                }
                continue;
            }
            let asked = space.len();
            let Some(tls) = self.tls.as_mut() else {
                match socket::read(&mut self.sock, space) {
                    IoResult::Done(n) => {
                        inb.fill(n);
                        let used = self.session.handle_input(inb.data(), now);
                        inb.consume(used);
                        // A short read drained the socket: new bytes raise a new edge. Not after
                        // a FIN was reported with them (replies then close, in one event): no
                        // edge follows, so read on to see EOF.
                        if n < asked && !self.hup {
                            self.readable = false;
                        }
                    }
                    IoResult::WouldBlock => self.readable = false,
                    IoResult::Closed => return Io::Closed,
                    IoResult::Error(_) => return Io::Failed,
                }
                continue;
            };
            // Through TLS a short read says nothing about the socket: only `WouldBlock` does.
            let got = tls.read(&mut self.sock, space);
            if !self.tls_up && !tls.is_handshaking() {
                // Before any decrypted byte reaches the session: it queues EHLO again.
                self.tls_up = true;
                self.tls_news = true;
                self.tls_info = tls.info();
                self.session.handle_tls_established(now);
            }
            match got {
                TlsRead::Data(n) => {
                    inb.fill(n);
                    let used = self.session.handle_input(inb.data(), now);
                    inb.consume(used);
                }
                TlsRead::WouldBlock => self.readable = false,
                TlsRead::Closed => return Io::Closed,
                TlsRead::Failed(e) => {
                    // An alert may be queued: let it go out, best effort.
                    let _ = tls.flush(&mut self.sock);
                    self.tls_failed(&e);
                    return Io::Ok;
                }
            }
        }
        pool.release_if_empty(&mut self.input);
        Io::Ok
    }

    /// Lets the session fill the output buffer (commands, and body pieces from `body`) and
    /// writes it — through TLS when it is on, flushing TLS's own records too — until the socket
    /// is full or nothing is left to say.
    pub fn write(&mut self, pool: &mut BufPool, body: &[u8]) -> Io {
        loop {
            if self.output.is_none() {
                self.output = pool.checkout();
            }
            let Some(out) = self.output.as_mut() else { return Io::Ok };
            self.session.poll_transmit(body, out);
            let Some(tls) = self.tls.as_mut() else {
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
                continue;
            };
            let took = if out.is_empty() { 0 } else { tls.write(out.data()) };
            out.consume(took);
            if !tls.wants_write() {
                if out.is_empty() {
                    pool.release(&mut self.output);
                    return Io::Ok;
                }
                if took == 0 {
                    // TLS holds all it takes until its records go out (or the handshake ends).
                    return Io::Ok;
                }
                continue;
            }
            if !self.writable {
                return Io::Ok;
            }
            match tls.flush(&mut self.sock) {
                TlsFlush::Done => {}
                TlsFlush::WouldBlock => {
                    self.writable = false;
                    return Io::Ok;
                }
                TlsFlush::Failed(_) => return Io::Failed,
            }
        }
    }

    /// Puts a client TLS session on the socket after the server's `220` to STARTTLS: plaintext
    /// still unread is dropped (RFC 3207 §5: it was not protected), and the ClientHello goes
    /// out with the next [`OutboundConn::write`]. On failure (no settings, a host name TLS
    /// cannot use) the session is told and reports it.
    pub fn start_tls(&mut self, pool: &mut BufPool) {
        if !self.session.awaiting_tls() || self.tls.is_some() {
            return;
        }
        pool.release(&mut self.input);
        if self.output.as_ref().is_some_and(|b| !b.is_empty()) {
            // Cannot happen (nothing is pipelined behind STARTTLS), and must not go out in the
            // clear after the switch.
            self.tls_error = Some("plaintext left to send at STARTTLS".to_owned());
            self.session.handle_tls_failed();
            return;
        }
        let started = match &self.tls_config {
            Some(cfg) => TlsSession::client(cfg, &self.host),
            None => Err(TlsError::Protocol("no TLS client settings".to_owned())),
        };
        match started {
            Ok(tls) => self.tls = Some(tls),
            Err(e) => self.tls_failed(&e),
        }
    }

    /// Once, after the handshake finished: the negotiated version and cipher, for the log.
    pub fn take_tls_established(&mut self) -> Option<TlsInfo> {
        if !self.tls_news {
            return None;
        }
        self.tls_news = false;
        self.tls_info
    }

    /// `TLSv1.3` or the like once TLS is up, else `none` (for attempt log lines).
    pub fn tls_version(&self) -> &'static str {
        self.tls_info.map_or("none", |i| i.version)
    }

    /// Queues `close_notify` and writes what the socket takes now, best effort (the socket is
    /// about to be closed).
    pub fn close_tls(&mut self) {
        if let Some(tls) = self.tls.as_mut().filter(|t| !t.is_handshaking()) {
            tls.close();
            let _ = tls.flush(&mut self.sock);
        }
    }

    fn tls_failed(&mut self, e: &TlsError) {
        if self.tls_error.is_none() {
            self.tls_error = Some(e.to_string());
        }
        self.session.handle_tls_failed();
    }

    /// Gives both buffers back.
    pub fn release_buffers(&mut self, pool: &mut BufPool) {
        pool.release(&mut self.input);
        pool.release(&mut self.output);
    }
}

/// Builds a connection record for a socket whose connect is under way.
pub fn new_conn(
    sock: mio::net::TcpStream,
    peer: SocketAddr,
    host: Box<str>,
    generation: u32,
    session: ClientSession,
    tls_config: Option<ClientTls>,
) -> OutboundConn {
    OutboundConn {
        sock,
        peer,
        host,
        generation,
        session,
        input: None,
        output: None,
        readable: false,
        writable: false,
        hup: false,
        connected: false,
        body: None,
        next_body: None,
        greeted: false,
        armed: None,
        tls_config,
        tls: None,
        tls_info: None,
        tls_up: false,
        tls_news: false,
        tls_error: None,
    }
}
