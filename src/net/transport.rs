//! `Transport`: one non-blocking TCP socket, its optional [`TlsSession`], its pooled plaintext
//! buffers and its readiness flags — the one place that knows whether a connection is plain
//! or TLS.
//!
//! Owns: moving bytes socket → [TLS →] `input` ([`Transport::read`]) and `output` → [TLS →]
//! socket ([`Transport::flush`], [`Transport::write_parts`]); the switch to TLS on either side
//! ([`Transport::start_tls`]); `close_notify` ([`Transport::close_tls`]); the readiness flags
//! mio's edge-triggered events set (STYLE rule 3: both directions run until the socket says
//! `WouldBlock`). Every driver — inbound, outbound, and `sluice-load send`/`sink` — reads and
//! writes through it, and sees one result vocabulary: [`Read`] for a read, [`Flush`] for a
//! write, [`Fault`] for what broke.
//!
//! Must never: parse SMTP, read the clock, allocate per read or write (buffers come from the
//! caller's [`BufPool`]; TLS buffers are the session's own), or block.
//!
//! The buffers always hold plaintext: protocol sessions and the DATA scanner never see a TLS
//! record. After a switch to TLS, output already buffered (the server's `220` to STARTTLS,
//! RFC 3207 §4) still goes out in the clear; everything written after it goes through TLS, and
//! input left from before the switch is dropped (RFC 3207 §5: it was not protected).

use std::fmt;
use std::io::{self, IoSlice, Write as _};

use crate::buf::{Buf, BufPool};
use crate::net::socket::{self, IoResult};
use crate::net::tls::{TlsError, TlsFlush, TlsInfo, TlsRead, TlsSession};

/// Most slices one [`Transport::write_parts`] takes (commands, a body, commands after it).
pub const MAX_PARTS: usize = 4;

/// What one [`Transport::read`] did.
#[derive(Debug)]
pub enum Read {
    /// This many plaintext bytes were appended to `input`.
    Data(usize),
    /// Nothing more now: the socket is drained (or no readiness was reported). A new edge
    /// brings more.
    WouldBlock,
    /// The input buffer is full: consume some of it first.
    Full,
    /// The pool has no buffer to read into: try again later (backpressure, STYLE rule 5).
    NoBuffer,
    /// Orderly end: EOF on a plain socket, or `close_notify` through TLS.
    Closed,
    /// The connection is unusable. Through TLS an alert for the peer has been sent, best effort.
    Failed(Fault),
}

/// What one [`Transport::flush`] did.
#[derive(Debug)]
pub enum Flush {
    /// Everything buffered (plaintext and TLS records) is on the socket.
    Done,
    /// Output remains: the socket is full, or TLS holds plaintext until its handshake ends.
    /// A later writable edge (or read) moves it on.
    Blocked,
    /// The connection is unusable.
    Failed(Fault),
}

/// Why a connection broke.
#[derive(Debug)]
pub enum Fault {
    /// The socket failed (reset, refused, `EPIPE`...).
    Socket(io::Error),
    /// TLS failed: a protocol error, a truncation (EOF without `close_notify`), or the socket
    /// under it.
    Tls(TlsError),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Socket(e) => write!(f, "{e}"),
            Fault::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

impl Fault {
    /// The peer closed the TCP connection inside TLS without `close_notify`.
    pub fn is_truncation(&self) -> bool {
        matches!(self, Fault::Tls(TlsError::Truncated))
    }
}

/// One connection's socket and the state its I/O needs. See the module doc.
pub struct Transport {
    /// The socket (registered with mio by the driver).
    pub sock: mio::net::TcpStream,
    /// Unparsed plaintext input, checked out when bytes arrive.
    pub input: Option<Buf>,
    /// Unsent plaintext output, checked out when there is something to say.
    pub output: Option<Buf>,
    /// Readable since the last `WouldBlock` (set from mio events).
    pub readable: bool,
    /// Writable since the last `WouldBlock` (set from mio events).
    pub writable: bool,
    /// The peer's FIN (or a socket error) was reported: read on to EOF, even after a short
    /// read (no further edge will come).
    pub hup: bool,
    /// TLS from the switch on; boxed so that plain connections stay small.
    tls: Option<Box<TlsSession>>,
    /// Leading bytes of `output` still to write in the clear (buffered before the switch).
    clear_out: usize,
    /// The handshake has finished.
    tls_up: bool,
    /// The handshake finished and [`Transport::take_handshake_done`] has not said so yet.
    tls_news: bool,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Transport {{ tls: {}, pending: {} }}", self.tls.is_some(), self.pending_output())
    }
}

impl Transport {
    /// A plain transport over `sock`, with no buffers and no readiness yet.
    pub fn new(sock: mio::net::TcpStream) -> Transport {
        Transport {
            sock,
            input: None,
            output: None,
            readable: false,
            writable: false,
            hup: false,
            tls: None,
            clear_out: 0,
            tls_up: false,
            tls_news: false,
        }
    }

    /// Records a mio event: readable (or read-closed, or an error: reading reports it),
    /// writable (or write-closed, or an error).
    pub fn on_event(&mut self, ev: &mio::event::Event) {
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.readable = true;
        }
        if ev.is_read_closed() || ev.is_error() {
            self.hup = true;
        }
        if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
            self.writable = true;
        }
    }

    /// The output buffer, checked out on demand; `None` when the pool is exhausted.
    pub fn output_buf(&mut self, pool: &mut BufPool) -> Option<&mut Buf> {
        if self.output.is_none() {
            self.output = pool.checkout();
        }
        self.output.as_mut()
    }

    /// Reads once into `input` (checked out from `pool` when missing): plaintext from the
    /// socket, or through TLS when it is on. Call while it returns [`Read::Data`].
    ///
    /// A short plain read clears `readable`: the socket is drained, and with edge-triggered
    /// epoll new bytes raise a new event, so the extra read that would return `EAGAIN` is
    /// skipped (as tokio does). Not once a FIN was reported: no edge follows it, so reading
    /// goes on to see EOF. Through TLS a short read says nothing about the socket: only
    /// `WouldBlock` clears the flag.
    pub fn read(&mut self, pool: &mut BufPool) -> Read {
        if !self.readable {
            return Read::WouldBlock;
        }
        if self.input.is_none() {
            self.input = pool.checkout();
        }
        let Some(inb) = self.input.as_mut() else { return Read::NoBuffer };
        let space = inb.space();
        let asked = space.len();
        if asked == 0 {
            return Read::Full;
        }
        let Some(tls) = self.tls.as_mut() else {
            return match socket::read(&mut self.sock, space) {
                IoResult::Done(n) => {
                    inb.fill(n);
                    if n < asked && !self.hup {
                        self.readable = false;
                    }
                    Read::Data(n)
                }
                IoResult::WouldBlock => {
                    self.readable = false;
                    Read::WouldBlock
                }
                IoResult::Closed => Read::Closed,
                IoResult::Error(e) => Read::Failed(Fault::Socket(e)),
            };
        };
        let got = tls.read(&mut self.sock, space);
        if !self.tls_up && !tls.is_handshaking() {
            self.tls_up = true;
            self.tls_news = true;
        }
        match got {
            TlsRead::Data(n) => {
                inb.fill(n);
                Read::Data(n)
            }
            TlsRead::WouldBlock => {
                self.readable = false;
                Read::WouldBlock
            }
            TlsRead::Closed => Read::Closed,
            TlsRead::Failed(e) => {
                // An alert may be queued: it tells the peer why, if the socket takes it now.
                if let TlsFlush::WouldBlock = tls.flush(&mut self.sock) {
                    self.writable = false;
                }
                Read::Failed(Fault::Tls(e))
            }
        }
    }

    /// Writes `output` — through TLS when it is on, with the records TLS queued on its own
    /// (handshake messages, alerts) — until it is empty or the socket is full. The buffer goes
    /// back to `pool` once empty.
    pub fn flush(&mut self, pool: &mut BufPool) -> Flush {
        loop {
            if !self.writable {
                return if self.pending_output() > 0 { Flush::Blocked } else { self.flushed(pool) };
            }
            if self.tls.is_some() && self.clear_out == 0 {
                break;
            }
            // A plain connection, or the clear-text prefix before the switch to TLS.
            let Some(out) = self.output.as_mut().filter(|b| !b.is_empty()) else { return self.flushed(pool) };
            let len = if self.tls.is_some() { self.clear_out } else { out.data().len() };
            match write_sock(&mut self.sock, &mut self.writable, &out.data()[..len]) {
                Ok(n) => {
                    out.consume(n);
                    self.clear_out -= n.min(self.clear_out);
                }
                Err(f) => return Flush::Failed(f),
            }
        }
        loop {
            let mut took = 0;
            let Some(tls) = self.tls.as_mut() else { return Flush::Done };
            if let Some(out) = self.output.as_mut().filter(|b| !b.is_empty()) {
                took = tls.write(out.data());
                out.consume(took);
            }
            match tls.flush(&mut self.sock) {
                TlsFlush::Done => {}
                TlsFlush::WouldBlock => self.writable = false,
                TlsFlush::Failed(e) => return Flush::Failed(Fault::Tls(TlsError::Io(e))),
            }
            let wants_write = tls.wants_write();
            let plain_left = self.output.as_ref().is_some_and(|b| !b.is_empty());
            if !plain_left && !wants_write {
                return self.flushed(pool);
            }
            if !self.writable || (took == 0 && !wants_write) {
                // The socket is full, or TLS holds all it takes until the handshake ends.
                return Flush::Blocked;
            }
        }
    }

    fn flushed(&mut self, pool: &mut BufPool) -> Flush {
        pool.release_if_empty(&mut self.output);
        Flush::Done
    }

    /// Writes from the caller's own slices (in order, as one stream) instead of `output`:
    /// one vectored write on a plain socket, or as much as TLS takes (then its records go out).
    /// Returns how many bytes were taken; 0 with `writable` cleared when the socket is full,
    /// 0 with `writable` still set when TLS holds all it takes until its handshake ends.
    /// For drivers whose bytes lie elsewhere (the load generator's rendered messages); call
    /// only with `output` empty, and with at most [`MAX_PARTS`] parts.
    pub fn write_parts(&mut self, parts: &[&[u8]]) -> Result<usize, Fault> {
        debug_assert!(self.output.as_ref().is_none_or(Buf::is_empty));
        debug_assert!(parts.len() <= MAX_PARTS);
        if !self.writable {
            return Ok(0);
        }
        let Some(tls) = self.tls.as_mut() else {
            let mut slices = [IoSlice::new(&[]); MAX_PARTS];
            let k = parts.len().min(slices.len());
            for (s, p) in slices.iter_mut().zip(parts) {
                *s = IoSlice::new(p);
            }
            loop {
                return match self.sock.write_vectored(&slices[..k]) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.writable = false;
                        Ok(0)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => Err(Fault::Socket(e)),
                };
            }
        };
        // Records handed over earlier go first, then what TLS takes of the new bytes.
        let mut taken = 0;
        for part in parts {
            let took = tls.write(part);
            taken += took;
            if took < part.len() {
                break;
            }
        }
        match tls.flush(&mut self.sock) {
            TlsFlush::Done => {}
            TlsFlush::WouldBlock => self.writable = false,
            TlsFlush::Failed(e) => return Err(Fault::Tls(TlsError::Io(e))),
        }
        Ok(taken)
    }

    /// Writes TLS records queued while reading or by earlier writes (no-op on a plain socket).
    pub fn flush_tls(&mut self) -> Flush {
        let Some(tls) = self.tls.as_mut() else { return Flush::Done };
        if !self.writable {
            return if tls.wants_write() { Flush::Blocked } else { Flush::Done };
        }
        match tls.flush(&mut self.sock) {
            TlsFlush::Done => Flush::Done,
            TlsFlush::WouldBlock => {
                self.writable = false;
                Flush::Blocked
            }
            TlsFlush::Failed(e) => Flush::Failed(Fault::Tls(TlsError::Io(e))),
        }
    }

    /// Puts `session` on the connection: a server session after STARTTLS's `220` was
    /// buffered (it still goes out in the clear), or a client one after the server's `220`
    /// was read (its ClientHello goes out with the next flush), or either from the first byte
    /// (implicit TLS). Input left from before is dropped: it was not protected.
    pub fn start_tls(&mut self, session: TlsSession, pool: &mut BufPool) {
        pool.release(&mut self.input);
        self.clear_out = self.output.as_ref().map_or(0, |b| b.data().len());
        self.tls = Some(Box::new(session));
        self.tls_up = false;
        self.tls_news = false;
    }

    /// TLS is on (handshaking or done).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// TLS is on and its handshake has not finished.
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Once, after the read that finished the handshake: the negotiated version and cipher.
    pub fn take_handshake_done(&mut self) -> Option<TlsInfo> {
        if !std::mem::take(&mut self.tls_news) {
            return None;
        }
        self.tls.as_ref().and_then(|t| t.info())
    }

    /// Version and cipher once the handshake has finished.
    pub fn tls_info(&self) -> Option<TlsInfo> {
        self.tls.as_ref().filter(|_| self.tls_up).and_then(|t| t.info())
    }

    /// Unsent output bytes: plaintext, plus one when TLS has records to write.
    pub fn pending_output(&self) -> usize {
        let tls = self.tls.as_ref().is_some_and(|t| t.wants_write());
        self.output.as_ref().map_or(0, |b| b.data().len()) + usize::from(tls)
    }

    /// Writes `data` straight to a plain socket, past the output buffer (which must be empty,
    /// or the bytes would overtake it): a large message body from the spool's map, without a
    /// copy. Returns the bytes the socket took (0 when it is full; a writable edge says when
    /// to go on).
    pub fn write_plain(&mut self, data: &[u8]) -> Result<usize, Fault> {
        if self.tls.is_some() || self.pending_output() > 0 {
            return Err(Fault::Socket(io::Error::other("direct write behind buffered output or through TLS")));
        }
        if !self.writable || data.is_empty() {
            return Ok(0);
        }
        write_sock(&mut self.sock, &mut self.writable, data)
    }

    /// Queues `close_notify` (once the handshake is over) and writes what the socket takes
    /// now, best effort: the socket is about to be closed.
    pub fn close_tls(&mut self) {
        if let Some(tls) = self.tls.as_mut().filter(|t| !t.is_handshaking()) {
            tls.close();
            let _ = tls.flush(&mut self.sock);
        }
    }

    /// Gives both buffers back.
    pub fn release_buffers(&mut self, pool: &mut BufPool) {
        pool.release(&mut self.input);
        pool.release(&mut self.output);
    }
}

/// One plain `write` of `data`: the bytes the socket took, 0 when it is full (and `writable`
/// is cleared until the next edge), or why the connection is unusable.
fn write_sock(sock: &mut mio::net::TcpStream, writable: &mut bool, data: &[u8]) -> Result<usize, Fault> {
    match socket::write(sock, data) {
        IoResult::Done(0) => Err(Fault::Socket(io::ErrorKind::WriteZero.into())),
        IoResult::Done(n) => Ok(n),
        IoResult::WouldBlock => {
            *writable = false;
            Ok(0)
        }
        IoResult::Closed => Err(Fault::Socket(io::ErrorKind::BrokenPipe.into())),
        IoResult::Error(e) => Err(Fault::Socket(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tls::tests::{pair_files, tempdir};
    use crate::net::tls::{ClientTls, ServerTls};
    use std::io::Read as _;

    /// A connected pair of non-blocking loopback sockets.
    fn pair() -> (mio::net::TcpStream, mio::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (mio::net::TcpStream::from_std(a), mio::net::TcpStream::from_std(b))
    }

    /// Readiness as if every event had just fired (no poller in these tests).
    fn ready(t: &mut Transport) {
        t.readable = true;
        t.writable = true;
    }

    fn server_tls(tag: &str) -> ServerTls {
        let dir = tempdir(&format!("transport-{tag}"));
        let (cert, key) = pair_files(&dir);
        let tls = ServerTls::load(&cert, &key).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        tls
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Reads everything available into `got`, emptying the input buffer as it goes.
    fn drain(t: &mut Transport, pool: &mut BufPool, got: &mut Vec<u8>) -> Option<Read> {
        loop {
            match t.read(pool) {
                Read::Data(_) => {
                    let inb = t.input.as_mut().unwrap();
                    got.extend_from_slice(inb.data());
                    let n = inb.data().len();
                    inb.consume(n);
                }
                Read::WouldBlock => return None,
                other => return Some(other),
            }
        }
    }

    /// Moves `data` from `a`'s output to `b`'s input across partial writes: the receiver
    /// reads only when the sender is blocked, and the data is larger than the socket buffers,
    /// so the socket fills (`WouldBlock`) again and again.
    fn push_through(a: &mut Transport, b: &mut Transport, pool: &mut BufPool, data: &[u8]) -> (Vec<u8>, usize) {
        let (mut sent, mut got, mut blocked) = (0, Vec::new(), 0);
        for _ in 0..1_000_000 {
            ready(a);
            ready(b);
            if sent < data.len() {
                let out = a.output_buf(pool).unwrap();
                let n = out.push(&data[sent..]);
                sent += n;
            }
            match a.flush(pool) {
                Flush::Done if sent < data.len() => continue,
                Flush::Done => {}
                Flush::Blocked => blocked += 1,
                Flush::Failed(e) => panic!("flush failed: {e}"),
            }
            // The receiver reads only once the sender is stuck (or done): the socket fills.
            assert!(drain(b, pool, &mut got).is_none());
            let _ = drain(a, pool, &mut Vec::new());
            let _ = b.flush(pool);
            if got.len() == data.len() {
                break;
            }
        }
        (got, blocked)
    }

    /// Plain: bytes arrive intact across many partial writes, and a short read clears
    /// `readable` (the socket is drained) unless a hang-up was reported.
    #[test]
    fn plain_bytes_across_partial_writes() {
        let (a, b) = pair();
        let (mut a, mut b) = (Transport::new(a), Transport::new(b));
        let mut pool = BufPool::new(4096, 16);
        let data = pattern(32 << 20);
        let (got, blocked) = push_through(&mut a, &mut b, &mut pool, &data);
        assert!(got == data, "{} of {} bytes, not the same", got.len(), data.len());
        assert!(blocked > 0, "the socket never filled: the test proves nothing about partial writes");
        assert!(a.output.is_none(), "an empty output buffer goes back to the pool");

        b.readable = true;
        assert!(matches!(b.read(&mut pool), Read::WouldBlock));
        assert!(!b.readable);
        a.sock.write_all(b"220 hi\r\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        b.readable = true;
        assert!(matches!(b.read(&mut pool), Read::Data(8)));
        assert!(!b.readable, "a short read drained the socket");
        b.input.as_mut().unwrap().consume(8);
        drop(a);
        std::thread::sleep(std::time::Duration::from_millis(20));
        b.readable = true;
        b.hup = true;
        assert!(matches!(b.read(&mut pool), Read::Closed));
    }

    /// Nothing is read without readiness, and a full input buffer says so instead of reading.
    #[test]
    fn readiness_and_backpressure() {
        let (mut a, b) = pair();
        let mut b = Transport::new(b);
        let mut pool = BufPool::new(16, 1);
        a.write_all(&[b'x'; 64]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(matches!(b.read(&mut pool), Read::WouldBlock), "read without a readable event");
        b.readable = true;
        assert!(matches!(b.read(&mut pool), Read::Data(16)));
        assert!(b.readable, "a full read leaves the flag set: more may wait");
        assert!(matches!(b.read(&mut pool), Read::Full));
        let mut c = Transport::new(pair().0);
        c.readable = true;
        assert!(matches!(c.read(&mut pool), Read::NoBuffer), "the pool's one buffer is out");
    }

    /// STARTTLS on both sides over one socket pair: the server's `220` goes out in the
    /// clear after its switch, the client switches after reading it, the handshake runs
    /// through `read`/`flush` alone, then 32 MiB cross each way inside TLS with the
    /// socket filling; `close_tls` ends it with `close_notify`.
    #[test]
    fn starttls_switch_and_bulk() {
        let (c, s) = pair();
        let (mut client, mut server) = (Transport::new(c), Transport::new(s));
        let mut pool = BufPool::new(16 * 1024, 64);
        let stls = server_tls("starttls");
        // Server: the 220 is buffered, then TLS starts; the 220 must still go out in the clear.
        server.output_buf(&mut pool).unwrap().push(b"220 2.0.0 Ready to start TLS\r\n");
        server.start_tls(TlsSession::server(&stls).unwrap(), &mut pool);
        ready(&mut server);
        assert!(matches!(server.flush(&mut pool), Flush::Done));
        std::thread::sleep(std::time::Duration::from_millis(20));
        ready(&mut client);
        let mut got = Vec::new();
        assert!(drain(&mut client, &mut pool, &mut got).is_none());
        assert_eq!(got, b"220 2.0.0 Ready to start TLS\r\n");
        let ctls = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
        client.start_tls(ctls, &mut pool);
        assert!(client.input.is_none(), "plaintext from before the switch is dropped");
        // First command inside TLS, written before the handshake is over: held, then sent.
        client.output_buf(&mut pool).unwrap().push(b"EHLO client.test\r\n");
        let (mut at_server, mut done) = (Vec::new(), (None, None));
        for _ in 0..1000 {
            ready(&mut client);
            ready(&mut server);
            assert!(!matches!(client.flush(&mut pool), Flush::Failed(_)));
            assert!(drain(&mut server, &mut pool, &mut at_server).is_none());
            done.0 = done.0.or(server.take_handshake_done());
            assert!(!matches!(server.flush(&mut pool), Flush::Failed(_)));
            assert!(drain(&mut client, &mut pool, &mut Vec::new()).is_none());
            done.1 = done.1.or(client.take_handshake_done());
            if at_server.ends_with(b"\r\n") && done.1.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(at_server, b"EHLO client.test\r\n");
        let (s_info, c_info) = (done.0.expect("server handshake"), done.1.expect("client handshake"));
        assert_eq!(s_info, c_info);
        assert_eq!(client.tls_info(), Some(c_info));
        assert!(client.take_handshake_done().is_none(), "said once");

        let data = pattern(32 << 20);
        let (got, blocked) = push_through(&mut client, &mut server, &mut pool, &data);
        assert!(got == data, "client to server: {} of {} bytes", got.len(), data.len());
        assert!(blocked > 0, "the socket never filled");
        let (got, _) = push_through(&mut server, &mut client, &mut pool, &data);
        assert!(got == data, "server to client: {} of {} bytes", got.len(), data.len());

        client.close_tls();
        std::thread::sleep(std::time::Duration::from_millis(20));
        ready(&mut server);
        assert!(matches!(drain(&mut server, &mut pool, &mut Vec::new()), Some(Read::Closed)));
        client.release_buffers(&mut pool);
        server.release_buffers(&mut pool);
        assert_eq!(pool.outstanding(), 0);
    }

    /// A peer that answers the ClientHello with something that is not TLS: the read fails
    /// with a TLS fault, not a panic and not a hang; a bare EOF inside TLS is a truncation.
    #[test]
    fn tls_failures_are_faults() {
        let (c, mut s) = pair();
        let mut client = Transport::new(c);
        let mut pool = BufPool::new(16 * 1024, 8);
        let ctls = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
        client.start_tls(ctls, &mut pool);
        ready(&mut client);
        assert!(matches!(client.flush(&mut pool), Flush::Done), "the ClientHello goes out");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut hello = [0u8; 4096];
        assert!(s.read(&mut hello).unwrap() > 0);
        s.write_all(b"220 not TLS at all\r\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        ready(&mut client);
        match drain(&mut client, &mut pool, &mut Vec::new()) {
            Some(Read::Failed(f @ Fault::Tls(_))) => assert!(!f.is_truncation()),
            other => panic!("expected a TLS fault, got {other:?}"),
        }

        let (c, s) = pair();
        let mut client = Transport::new(c);
        let ctls = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
        client.start_tls(ctls, &mut pool);
        drop(s);
        std::thread::sleep(std::time::Duration::from_millis(20));
        ready(&mut client);
        client.hup = true;
        let _ = client.flush(&mut pool);
        match drain(&mut client, &mut pool, &mut Vec::new()) {
            Some(Read::Failed(f)) => assert!(f.is_truncation() || matches!(f, Fault::Tls(TlsError::Io(_))), "{f}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// `write_parts` sends the caller's slices as one stream, plain and through TLS.
    #[test]
    fn write_parts_from_caller_slices() {
        let (a, b) = pair();
        let (mut a, mut b) = (Transport::new(a), Transport::new(b));
        let mut pool = BufPool::new(4096, 8);
        let body = pattern(3 << 20);
        let parts: [&[u8]; 3] = [b"DATA-ish\r\n", &body, b"\r\n.\r\n"];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let (mut off, mut got) = (0, Vec::new());
        while got.len() < total {
            ready(&mut a);
            ready(&mut b);
            // Skip what was taken already, across the parts.
            let mut skip = off;
            let mut rest: Vec<&[u8]> = Vec::new();
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                } else {
                    rest.push(&p[skip..]);
                    skip = 0;
                }
            }
            off += a.write_parts(&rest).unwrap();
            assert!(drain(&mut b, &mut pool, &mut got).is_none());
        }
        assert!(got == parts.concat());
    }
}
