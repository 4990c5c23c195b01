//! `OutboundConn`: one delivery connection — a [`Transport`] (socket, optional TLS, pooled
//! buffers, readiness) and the pure [`ClientSession`] — and the glue that feeds the session
//! what the transport reads and flushes what the session says.
//!
//! After the server's `220` to STARTTLS ([`ClientEvent::StartTls`]) [`OutboundConn::start_tls`]
//! puts a client TLS session on the transport, or [`OutboundConn::start_implicit_tls`] does on
//! connect (RFC 8314); the session only ever sees plaintext. Readiness
//! is edge-triggered, so both directions run until the socket itself says `WouldBlock`, and
//! every [`OutboundConn::write`] also flushes ciphertext the TLS layer queued while reading
//! (handshake messages, alerts), so nothing waits for an event that never comes.
//!
//! [`ClientEvent::StartTls`]: crate::smtp::client::ClientEvent::StartTls

use std::net::SocketAddr;
use std::time::Instant;

use crate::buf::BufPool;
use crate::net::tls::{ClientTls, TlsError, TlsInfo, TlsSession};
use crate::net::transport::{Flush, Read, Transport};
use crate::smtp::client::ClientSession;
use crate::spool::BodyLoc;

/// Bodies at least this large that go out alone by BDAT are written straight from the map
/// (one `send` of the body instead of a copy into the output buffer and a `send` per buffer).
/// Below it the copy costs less than the extra `send` it saves.
const DIRECT_BODY_MIN: usize = 16 * 1024;

/// One outbound connection.
///
/// The socket, buffers and readiness flags live in [`OutboundConn::io`]; the connection
/// derefs to it, so a driver still writes `conn.sock`, `conn.readable`, `conn.hup`.
pub struct OutboundConn {
    /// Socket, optional TLS, pooled buffers, readiness.
    pub io: Transport,
    /// Remote address.
    pub peer: SocketAddr,
    /// Remote host name (MX name or relay host): the TLS server name.
    pub host: Box<str>,
    /// Token generation (the engine's `ConnId::generation`).
    pub generation: u32,
    /// Protocol state.
    pub session: ClientSession,
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
    /// TLS settings for STARTTLS (None when the session never asks for it).
    pub tls_config: Option<ClientTls>,
    /// Version and cipher once the handshake finished.
    pub tls_info: Option<TlsInfo>,
    /// The handshake finished and the driver has not been told yet (see
    /// [`OutboundConn::take_tls_established`]).
    tls_news: bool,
    /// Why TLS failed (handshake, certificate, truncation), for the log and the deferral.
    pub tls_error: Option<String>,
}

/// What moving bytes achieved, for the connection as a whole (the transport's [`Read`] and
/// [`Flush`] folded with what the session made of them).
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
        while self.io.readable {
            if self.session.awaiting_tls() && !self.io.is_tls() {
                // The rest of the socket's bytes are TLS: wait for `start_tls`.
                break;
            }
            let got = self.io.read(pool);
            if let Some(info) = self.io.take_handshake_done() {
                // Before any decrypted byte reaches the session: it queues EHLO again.
                self.tls_news = true;
                self.tls_info = Some(info);
                self.session.handle_tls_established(now);
            }
            match got {
                Read::Data(_) => {
                    let Some(inb) = self.io.input.as_mut() else { continue };
                    let used = self.session.handle_input(inb.data(), now);
                    inb.consume(used);
                }
                Read::Full => {
                    // A reply longer than the buffer (a long multi-line EHLO): the session
                    // holds it itself, up to its own limit, past which it fails with "reply
                    // too long".
                    let Some(inb) = self.io.input.as_mut() else { continue };
                    let n = self.session.handle_long_input(inb.data(), now);
                    inb.consume(n);
                    if n == 0 {
                        return Io::Failed;
                    }
                }
                Read::WouldBlock => break,
                Read::NoBuffer => return Io::Ok,
                Read::Closed => return Io::Closed,
                Read::Failed(e) if self.io.is_tls() => {
                    self.tls_failed(&e.to_string());
                    return Io::Ok;
                }
                Read::Failed(_) => return Io::Failed,
            }
        }
        pool.release_if_empty(&mut self.io.input);
        Io::Ok
    }

    /// Lets the session fill the output buffer (commands, and body pieces from `body`, a
    /// slice of the spool map) and writes it — through TLS when it is on, flushing TLS's own
    /// records too — until the socket is full or nothing is left to say.
    ///
    /// A large body that goes out alone by BDAT on a plain socket is written straight from
    /// `body` (the map), not copied into the output buffer first (see
    /// [`ClientSession::set_direct_body`]).
    pub fn write(&mut self, pool: &mut BufPool, body: &[u8]) -> Io {
        self.session.set_direct_body(!self.io.is_tls() && body.len() >= DIRECT_BODY_MIN);
        loop {
            let Some(out) = self.io.output_buf(pool) else { return Io::Ok };
            self.session.poll_transmit(body, out);
            if self.io.pending_output() == 0 {
                pool.release(&mut self.io.output);
                let Some((from, to)) = self.session.raw_body_due(body.len()) else { return Io::Ok };
                match self.io.write_plain(&body[from..to]) {
                    Ok(0) => return Io::Ok,
                    Ok(n) => {
                        self.session.raw_body_sent(n);
                        continue;
                    }
                    Err(_) => return Io::Failed,
                }
            }
            match self.io.flush(pool) {
                Flush::Done => {}
                Flush::Blocked => return Io::Ok,
                Flush::Failed(_) => return Io::Failed,
            }
        }
    }

    /// Puts a client TLS session on the socket after the server's `220` to STARTTLS: plaintext
    /// still unread is dropped (RFC 3207 §5: it was not protected), and the ClientHello goes
    /// out with the next [`OutboundConn::write`]. On failure (no settings, a host name TLS
    /// cannot use) the session is told and reports it.
    pub fn start_tls(&mut self, pool: &mut BufPool) {
        if !self.session.awaiting_tls() || self.io.is_tls() {
            return;
        }
        if self.io.output.as_ref().is_some_and(|b| !b.is_empty()) {
            // Cannot happen (nothing is pipelined behind STARTTLS), and must not go out in the
            // clear after the switch.
            pool.release(&mut self.io.input);
            self.tls_failed("plaintext left to send at STARTTLS");
            return;
        }
        self.begin_tls(pool);
    }

    /// Under implicit TLS (RFC 8314 §3.3, `--relay-tls implicit`): a client TLS session on the
    /// socket from the first byte, before the greeting; the ClientHello goes out with the
    /// first [`OutboundConn::write`] once connected. A failure is given to the session.
    pub fn start_implicit_tls(&mut self, pool: &mut BufPool) {
        if !self.io.is_tls() {
            self.begin_tls(pool);
        }
    }

    /// A client TLS session for the host on the transport, or the failure to the session.
    fn begin_tls(&mut self, pool: &mut BufPool) {
        let started = match &self.tls_config {
            Some(cfg) => TlsSession::client(cfg, &self.host),
            None => Err(TlsError::Protocol("no TLS client settings".to_owned())),
        };
        match started {
            Ok(tls) => self.io.start_tls(tls, pool),
            Err(e) => {
                pool.release(&mut self.io.input);
                self.tls_failed(&e.to_string());
            }
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
        self.io.close_tls();
    }

    fn tls_failed(&mut self, e: &str) {
        if self.tls_error.is_none() {
            self.tls_error = Some(e.to_owned());
        }
        self.session.handle_tls_failed();
    }

    /// Gives both buffers back.
    pub fn release_buffers(&mut self, pool: &mut BufPool) {
        self.io.release_buffers(pool);
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
        io: Transport::new(sock),
        peer,
        host,
        generation,
        session,
        connected: false,
        body: None,
        next_body: None,
        greeted: false,
        tls_config,
        tls_info: None,
        tls_news: false,
        tls_error: None,
    }
}
