//! The TLS seam: the only file that names `rustls` types (STYLE.md rule 8).
//!
//! A [`TlsSession`] sits between a non-blocking socket and a connection's plaintext buffers.
//! The loop feeds it ciphertext from the socket and takes plaintext out
//! ([`TlsSession::read`]), hands it plaintext to send ([`TlsSession::write`]) and lets it
//! write ciphertext out ([`TlsSession::flush`]). It never blocks and never reads the clock;
//! the handshake advances as a side effect of reading and flushing.
//!
//! Certificates: [`ServerTls::load`] reads a PEM chain and key (PKCS#8, PKCS#1 RSA or SEC1
//! EC), checks that they match, and names the flag at fault. Outbound, [`ClientTls`] either
//! skips certificate checks (opportunistic TLS to port-25 MX hosts, as Postfix's `may` level
//! does; the handshake signature is still checked) or verifies against a CA bundle.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedConnectionCommon, UnbufferedStatus,
    WriteTraffic,
};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig};

/// Most plaintext a session holds for sending during the handshake before
/// [`TlsSession::write`] takes less than it is offered (backpressure, like a full socket).
const SEND_LIMIT: usize = 64 * 1024;

/// What went wrong with TLS, naming the file or the stage.
#[derive(Debug)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    Pem(&'static str, PathBuf, String),
    /// The certificate file (of the flag named) holds no certificate.
    NoCertificate(&'static str, PathBuf),
    /// The certificate and key do not go together (or the key is unusable).
    BadPair(String),
    /// The peer broke the protocol or the handshake failed.
    Protocol(String),
    /// The peer closed the TCP connection without `close_notify` (a truncation).
    Truncated,
    /// The socket failed.
    Io(io::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Pem(flag, path, e) => write!(f, "{flag} {}: {e}", path.display()),
            TlsError::NoCertificate(flag, path) => write!(f, "{flag} {}: no certificate in the file", path.display()),
            TlsError::BadPair(e) => write!(f, "--tls-cert/--tls-key: {e}"),
            TlsError::Protocol(e) => write!(f, "{e}"),
            TlsError::Truncated => f.write_str("peer closed without close_notify"),
            TlsError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TlsError {}

impl TlsError {
    /// The command-line flag a loading error is about.
    pub fn flag(&self) -> &'static str {
        match self {
            TlsError::Pem(flag, ..) | TlsError::NoCertificate(flag, _) => flag,
            _ => "--tls-cert/--tls-key",
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A loaded server certificate and key, cheap to clone; each session keeps the one it started
/// with, so a reload only affects new sessions.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Reads and checks `--tls-cert` and `--tls-key`.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let chain = read_certs(cert, "--tls-cert")?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| TlsError::Pem("--tls-key", key.to_path_buf(), pem_error(e)))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadPair(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::BadPair(e.to_string()))?;
        Ok(ServerTls { config: Arc::new(config) })
    }
}

fn read_certs(path: &Path, flag: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem(flag, path.to_path_buf(), pem_error(e)))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(flag, path.to_path_buf()));
    }
    Ok(chain)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind in the file".to_owned(),
        other => format!("not a usable PEM file ({other:?})"),
    }
}

/// Outbound TLS settings: with or without certificate verification.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    verified: bool,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientTls {{ verified: {} }}", self.verified)
    }
}

impl ClientTls {
    /// Opportunistic TLS: any certificate is accepted (the handshake signature is checked).
    pub fn unverified() -> ClientTls {
        let provider = provider();
        let verifier = Arc::new(AnyCert { provider: provider.clone() });
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        ClientTls { config: Arc::new(config), verified: false }
    }

    /// Verified TLS: the server's chain must lead to a certificate in `ca_file` (PEM bundle)
    /// and name the host connected to.
    pub fn verified(ca_file: &Path) -> Result<ClientTls, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca_file, "--tls-ca-file")? {
            // Bundles carry the odd certificate rustls cannot parse; skip those, as browsers do.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(TlsError::NoCertificate("--tls-ca-file", ca_file.to_path_buf()));
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadPair(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ClientTls { config: Arc::new(config), verified: true })
    }

    /// Whether certificates are checked.
    pub fn is_verified(&self) -> bool {
        self.verified
    }
}

/// Accepts any server certificate but still checks the handshake signature with the key in
/// it (so the peer holds that key).
#[derive(Debug)]
struct AnyCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Result of [`TlsSession::read`].
#[derive(Debug)]
pub enum TlsRead {
    /// This many plaintext bytes were written to the buffer.
    Data(usize),
    /// No plaintext now and the socket is drained (the handshake may have advanced: flush).
    WouldBlock,
    /// The peer sent `close_notify` and nothing is left to read.
    Closed,
    /// The session is over: a protocol error (an alert is queued: flush it), a truncation or
    /// a socket error.
    Failed(TlsError),
}

/// Result of [`TlsSession::flush`].
#[derive(Debug)]
pub enum TlsFlush {
    /// Nothing left to send.
    Done,
    /// The socket is full.
    WouldBlock,
    /// The socket failed.
    Failed(io::Error),
}

/// Negotiated protocol version and cipher suite, for logs and the `Received:` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsInfo {
    /// E.g. `TLSv1.3`.
    pub version: &'static str,
    /// E.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: &'static str,
}

/// One TLS connection, server or client side.
///
/// Built on rustls' unbuffered API: the session owns its ciphertext buffers (allocated once,
/// at their working size, when the session starts; see [`Incoming`] and [`Outgoing`]) and
/// rustls decrypts incoming records in place in them. rustls 0.23 still allocates one `Vec`
/// per record inside itself (a sealed record when sending, a record's plaintext when
/// receiving); this file adds none in steady state (a test counts).
pub struct TlsSession {
    conn: Conn,
    bufs: Buffers,
}

enum Conn {
    Server(Box<UnbufferedServerConnection>),
    Client(Box<UnbufferedClientConnection>),
}

/// Runs `$body` with `$c` bound to the connection, whichever side it is.
macro_rules! with_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            Conn::Server($c) => $body,
            Conn::Client($c) => $body,
        }
    };
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsSession {{ handshaking: {} }}", self.is_handshaking())
    }
}

impl TlsSession {
    /// A server session with the given certificate.
    pub fn server(tls: &ServerTls) -> Result<TlsSession, TlsError> {
        let conn =
            UnbufferedServerConnection::new(tls.config.clone()).map_err(|e| TlsError::Protocol(e.to_string()))?;
        Ok(TlsSession { conn: Conn::Server(Box::new(conn)), bufs: Buffers::new() })
    }

    /// A client session to `host` (a DNS name for SNI and verification, or an IP address).
    pub fn client(tls: &ClientTls, host: &str) -> Result<TlsSession, TlsError> {
        let name = ServerName::try_from(host.trim_end_matches('.').to_owned())
            .map_err(|_| TlsError::Protocol(format!("{host:?} is not a valid TLS server name")))?;
        let conn =
            UnbufferedClientConnection::new(tls.config.clone(), name).map_err(|e| TlsError::Protocol(e.to_string()))?;
        let mut session = TlsSession { conn: Conn::Client(Box::new(conn)), bufs: Buffers::new() };
        // The ClientHello goes out with the first flush: it must be in the outgoing buffer.
        let _ = with_conn!(&mut session.conn, c => drive(&mut ***c, &mut session.bufs, Job::Write(&[])));
        debug_assert!(session.wants_write());
        Ok(session)
    }

    /// Reads plaintext into `dst` (which must not be empty), pulling ciphertext from `sock`
    /// as needed. Returns [`TlsRead::WouldBlock`] only once the socket itself would block.
    pub fn read(&mut self, sock: &mut impl Read, dst: &mut [u8]) -> TlsRead {
        debug_assert!(!dst.is_empty());
        loop {
            // Plaintext from records authenticated before a failure (or decrypted by a write
            // that then met bad input) is handed out first, as rustls' own reader does.
            let n = self.bufs.spill.take(dst);
            if n > 0 {
                return TlsRead::Data(n);
            }
            if let Some(e) = &self.bufs.failed {
                return TlsRead::Failed(TlsError::Protocol(e.clone()));
            }
            if self.bufs.peer_closed {
                return TlsRead::Closed;
            }
            match with_conn!(&mut self.conn, c => drive(&mut ***c, &mut self.bufs, Job::Read(dst))) {
                Drive::Data(n) => return TlsRead::Data(n),
                Drive::Failed(e) => return TlsRead::Failed(e),
                Drive::Idle(_) | Drive::Again if self.bufs.peer_closed => continue,
                Drive::Idle(_) | Drive::Again => {}
            }
            if self.bufs.eof {
                // No close_notify before EOF (or a handshake cut short).
                return TlsRead::Failed(TlsError::Truncated);
            }
            let room = match self.bufs.inc.room() {
                Ok(room) => room,
                Err(e) => return self.fail(e),
            };
            match sock.read(room) {
                Ok(0) => self.bufs.eof = true,
                Ok(n) => self.bufs.inc.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return TlsRead::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return TlsRead::Failed(TlsError::Io(e)),
            }
        }
    }

    /// A read that returns plaintext stops before rustls shows its `WriteTraffic` state, so
    /// the handshake may have ended (a client's Finished and first command in one read)
    /// without `traffic` being set: then data must be encrypted now, not held.
    fn note_handshake_done(&mut self) {
        if !self.bufs.traffic && !self.is_handshaking() {
            self.bufs.traffic = true;
        }
    }

    fn fail(&mut self, e: String) -> TlsRead {
        self.bufs.failed = Some(e.clone());
        TlsRead::Failed(TlsError::Protocol(e))
    }

    /// Takes plaintext to send (encrypted at once after the handshake, buffered before it);
    /// returns how many bytes it took, fewer than offered when its buffer is full.
    pub fn write(&mut self, src: &[u8]) -> usize {
        self.note_handshake_done();
        let b = &mut self.bufs;
        if src.is_empty() || b.failed.is_some() || b.close != CloseNotify::No {
            return 0;
        }
        if !b.traffic {
            // Before the handshake lets data out: held as plaintext, up to a cap.
            let n = src.len().min(SEND_LIMIT.saturating_sub(b.early.len()));
            b.early.extend_from_slice(&src[..n]);
            return n;
        }
        match with_conn!(&mut self.conn, c => drive(&mut ***c, &mut self.bufs, Job::Write(src))) {
            Drive::Idle(n) => n,
            Drive::Data(_) | Drive::Failed(_) | Drive::Again => 0,
        }
    }

    /// Writes queued ciphertext (handshake messages, records, alerts) to `sock`.
    pub fn flush(&mut self, sock: &mut impl Write) -> TlsFlush {
        loop {
            let out = &mut self.bufs.out;
            while out.start < out.end {
                match sock.write(&out.buf[out.start..out.end]) {
                    Ok(0) => return TlsFlush::Failed(io::ErrorKind::WriteZero.into()),
                    Ok(n) => out.start += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return TlsFlush::WouldBlock,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return TlsFlush::Failed(e),
                }
            }
            out.clear();
            // Plaintext held during the handshake (or a close_notify) may now follow.
            self.note_handshake_done();
            if !self.bufs.has_queued_work() {
                return TlsFlush::Done;
            }
            let _ = with_conn!(&mut self.conn, c => drive(&mut ***c, &mut self.bufs, Job::Write(&[])));
            if self.bufs.out.is_empty() {
                return TlsFlush::Done;
            }
        }
    }

    /// Ciphertext is waiting to be written.
    pub fn wants_write(&self) -> bool {
        !self.bufs.out.is_empty()
    }

    /// The handshake has not finished.
    pub fn is_handshaking(&self) -> bool {
        with_conn!(&self.conn, c => c.is_handshaking())
    }

    /// Version and cipher once negotiated.
    pub fn info(&self) -> Option<TlsInfo> {
        let (version, suite) = with_conn!(&self.conn, c => (c.protocol_version()?, c.negotiated_cipher_suite()?));
        let version = match version {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            other => other.as_str()?,
        };
        let cipher = suite.suite().as_str()?;
        Some(TlsInfo { version, cipher })
    }

    /// Queues `close_notify`; flush to send it.
    pub fn close(&mut self) {
        if self.bufs.close == CloseNotify::No {
            self.bufs.close = CloseNotify::Wanted;
        }
        self.note_handshake_done();
        if self.bufs.has_queued_work() {
            let _ = with_conn!(&mut self.conn, c => drive(&mut ***c, &mut self.bufs, Job::Write(&[])));
        }
    }
}

/// Ciphertext in: room for the largest record a peer may send (a TLS 1.2 ciphertext of
/// 2^14 + 2048 bytes plus its header) and part of the next.
const INCOMING: usize = 18 * 1024 + 512;
/// The largest TLS record on the wire.
const MAX_RECORD: usize = 5 + 16_384 + 2048;
/// The receive buffer grows past [`INCOMING`] only for a handshake message spread over
/// several records (a long certificate chain), up to this.
const INCOMING_MAX: usize = 128 * 1024;
/// Ciphertext out: a full record and then some.
const OUTGOING: usize = 18 * 1024 + 512;
/// Room [`TlsSession::write`] leaves free in the outgoing buffer for records rustls makes on
/// its own while reading (alerts, key updates, session tickets).
const OUTGOING_RESERVE: usize = 1024;
/// Most a record adds to its plaintext: header, TLS 1.2 explicit nonce, tag, TLS 1.3 type.
const RECORD_OVERHEAD: usize = 5 + 8 + 16 + 1;
/// Most plaintext in one record.
const MAX_FRAGMENT: usize = 16_384;

const _: () = assert!(INCOMING >= MAX_RECORD && OUTGOING >= MAX_RECORD);

/// The session's buffers and the state that is not rustls'.
struct Buffers {
    inc: Incoming,
    out: Outgoing,
    /// Plaintext of a record that did not fit the reader's buffer, handed out next.
    spill: Spill,
    /// Plaintext written before rustls would encrypt it (during the handshake).
    early: Vec<u8>,
    /// Application data may be sent (rustls has been seen in its `WriteTraffic` state, or
    /// the handshake is over).
    traffic: bool,
    close: CloseNotify,
    /// The peer sent `close_notify`.
    peer_closed: bool,
    /// The socket reported EOF.
    eof: bool,
    /// Why the session failed, for reads after the first failure.
    failed: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseNotify {
    No,
    /// Asked for; goes out after the plaintext written before it.
    Wanted,
    /// Handed to rustls.
    Queued,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            inc: Incoming { buf: vec![0; INCOMING].into_boxed_slice(), start: 0, end: 0 },
            out: Outgoing { buf: vec![0; OUTGOING].into_boxed_slice(), start: 0, end: 0 },
            spill: Spill::default(),
            early: Vec::new(),
            traffic: false,
            close: CloseNotify::No,
            peer_closed: false,
            eof: false,
            failed: None,
        }
    }

    /// Plaintext or a `close_notify` waits for rustls' `WriteTraffic` state.
    fn has_queued_work(&self) -> bool {
        self.traffic && self.failed.is_none() && (!self.early.is_empty() || self.close == CloseNotify::Wanted)
    }
}

/// Received ciphertext: `buf[start..end]` is not yet consumed by rustls (which decrypts
/// records in place there).
struct Incoming {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Incoming {
    /// Where the next socket read goes: moves unconsumed bytes to the front when the tail is
    /// short, and grows only when a handshake message needs more than the whole buffer.
    fn room(&mut self) -> Result<&mut [u8], String> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > INCOMING {
                // Back to the working size after a long handshake message.
                self.buf = vec![0; INCOMING].into_boxed_slice();
            }
        } else if self.start > 0 && self.buf.len() - self.end < MAX_RECORD.min(self.buf.len() / 4) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            if self.buf.len() >= INCOMING_MAX {
                return Err(format!("TLS handshake message larger than {INCOMING_MAX} bytes"));
            }
            let mut bigger = vec![0; (self.buf.len() * 2).min(INCOMING_MAX)].into_boxed_slice();
            bigger[..self.end - self.start].copy_from_slice(&self.buf[self.start..self.end]);
            self.end -= self.start;
            self.start = 0;
            self.buf = bigger;
        }
        Ok(&mut self.buf[self.end..])
    }
}

/// Ciphertext to send: `buf[start..end]`.
struct Outgoing {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Outgoing {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Everything was sent: start from the front again (back at the working size).
    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        if self.buf.len() > OUTGOING {
            self.buf = vec![0; OUTGOING].into_boxed_slice();
        }
    }

    /// Free bytes after the pending ones, moving those to the front if that makes more.
    fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Makes `need` bytes free, growing the buffer if it must (only when rustls has records
    /// of its own to queue while the socket lags: an unusual handshake or alerts).
    fn make_room(&mut self, need: usize) {
        if self.spare().len() < need {
            let mut bigger = vec![0; self.end + need].into_boxed_slice();
            bigger[..self.end].copy_from_slice(&self.buf[..self.end]);
            self.buf = bigger;
        }
    }
}

/// Plaintext decrypted but not yet handed out: `buf[pos..]`. Used when the reader's buffer is
/// shorter than a record (or a record was decrypted while writing); it keeps its capacity.
#[derive(Default)]
struct Spill {
    buf: Vec<u8>,
    pos: usize,
}

impl Spill {
    fn take(&mut self, dst: &mut [u8]) -> usize {
        let left = &self.buf[self.pos..];
        let n = left.len().min(dst.len());
        dst[..n].copy_from_slice(&left[..n]);
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        n
    }

    fn put(&mut self, data: &[u8]) {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(MAX_FRAGMENT);
        }
        self.buf.extend_from_slice(data);
    }
}

/// The side-specific entry point of rustls' unbuffered API, so [`drive`] can serve both.
trait Process {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// rustls holds records of its own to encode (offered as `EncodeTlsData` next).
    fn has_records(&self) -> bool;
}

impl Process for UnbufferedConnectionCommon<ServerConnectionData> {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn has_records(&self) -> bool {
        self.wants_write()
    }
}

impl Process for UnbufferedConnectionCommon<ClientConnectionData> {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn has_records(&self) -> bool {
        self.wants_write()
    }
}

/// What [`drive`] is asked to do besides advancing the connection.
enum Job<'a> {
    /// Decrypt the next record into this buffer.
    Read(&'a mut [u8]),
    /// Encrypt (part of) this once application data may be sent.
    Write(&'a [u8]),
}

enum Drive {
    /// Plaintext was put in the [`Job::Read`] buffer.
    Data(usize),
    /// rustls needs more ciphertext; this many bytes of [`Job::Write`] were taken.
    Idle(usize),
    Failed(TlsError),
    /// Step rustls again (it has a record of its own to hand over first).
    Again,
}

/// Steps rustls over the received ciphertext until it needs more: queues the records it makes
/// (handshake messages, alerts, tickets) in the outgoing buffer, hands one record's plaintext
/// to a read, and once application data may flow, encrypts held plaintext, a wanted
/// `close_notify` and the write's data (in that order).
fn drive<C: Process>(conn: &mut C, b: &mut Buffers, mut job: Job<'_>) -> Drive {
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut b.inc.buf[b.inc.start..b.inc.end]);
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                b.inc.start += discard;
                return Drive::Failed(TlsError::Protocol(failed(conn, b, e)));
            }
        };
        let mut extra = 0;
        let mut done = None;
        match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = match record {
                        Ok(record) => record,
                        Err(e) => {
                            done = Some(Drive::Failed(TlsError::Protocol(e.to_string())));
                            break;
                        }
                    };
                    extra += record.discard;
                    let mut payload = record.payload;
                    if let (Job::Read(dst), None) = (&mut job, &done) {
                        if !payload.is_empty() {
                            let n = payload.len().min(dst.len());
                            dst[..n].copy_from_slice(&payload[..n]);
                            payload = &payload[n..];
                            done = Some(Drive::Data(n));
                        }
                    }
                    b.spill.put(payload);
                }
            }
            ConnectionState::EncodeTlsData(mut encode) => loop {
                match encode.encode(b.out.spare()) {
                    Ok(n) => {
                        b.out.end += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        b.out.make_room(required_size);
                    }
                    Err(e @ EncodeError::AlreadyEncoded) => {
                        done = Some(Drive::Failed(TlsError::Protocol(e.to_string())));
                        break;
                    }
                }
            },
            // The records are in the outgoing buffer; `flush` sends them.
            ConnectionState::TransmitTlsData(transmit) => transmit.done(),
            ConnectionState::WriteTraffic(mut traffic) => {
                b.traffic = true;
                done = Some(write_traffic(&mut traffic, b, &job));
            }
            ConnectionState::BlockedHandshake => done = Some(Drive::Idle(0)),
            ConnectionState::PeerClosed => b.peer_closed = true,
            ConnectionState::Closed => {
                b.peer_closed = true;
                done = Some(Drive::Idle(0));
            }
            // Early data is not enabled (`max_early_data_size` is 0).
            ConnectionState::ReadEarlyData(_) => {
                done = Some(Drive::Failed(TlsError::Protocol("unexpected early data".to_owned())));
            }
            other => done = Some(Drive::Failed(TlsError::Protocol(format!("unexpected TLS state {other:?}")))),
        }
        b.inc.start += discard + extra;
        match done {
            Some(Drive::Failed(e)) => {
                b.failed = Some(e.to_string());
                return Drive::Failed(e);
            }
            Some(Drive::Again) | None => {}
            Some(done) => return done,
        }
    }
}

/// In rustls' `WriteTraffic` state: encrypts held plaintext, then a wanted `close_notify`,
/// then the write's data.
fn write_traffic<D>(traffic: &mut WriteTraffic<'_, D>, b: &mut Buffers, job: &Job<'_>) -> Drive {
    if !b.early.is_empty() {
        match encrypt(traffic, &mut b.out, &b.early) {
            Ok(n) => {
                b.early.drain(..n);
            }
            Err(e) => return Drive::Failed(e),
        }
        if !b.early.is_empty() {
            return Drive::Idle(0);
        }
        // Held only during the handshake: give the memory back.
        b.early = Vec::new();
    }
    match b.close {
        CloseNotify::No => {}
        CloseNotify::Wanted => {
            b.close = CloseNotify::Queued;
            return match traffic.queue_close_notify(b.out.spare()) {
                Ok(n) => {
                    b.out.end += n;
                    Drive::Idle(0)
                }
                // rustls keeps the alert queued and offers it as `EncodeTlsData` next.
                Err(EncryptError::InsufficientSize(_)) => Drive::Again,
                Err(e @ EncryptError::EncryptExhausted) => Drive::Failed(TlsError::Protocol(e.to_string())),
            };
        }
        CloseNotify::Queued => return Drive::Idle(0),
    }
    match job {
        Job::Write(src) => match encrypt(traffic, &mut b.out, src) {
            Ok(n) => Drive::Idle(n),
            Err(e) => Drive::Failed(e),
        },
        Job::Read(_) => Drive::Idle(0),
    }
}

/// Encrypts as much of `src` as fits in the outgoing buffer (less [`OUTGOING_RESERVE`]), one
/// record per call to rustls; returns how much it took.
fn encrypt<D>(traffic: &mut WriteTraffic<'_, D>, out: &mut Outgoing, src: &[u8]) -> Result<usize, TlsError> {
    let mut taken = 0;
    while taken < src.len() {
        let spare = out.spare();
        let fits = spare.len().saturating_sub(OUTGOING_RESERVE + RECORD_OVERHEAD);
        let n = (src.len() - taken).min(MAX_FRAGMENT).min(fits);
        if n == 0 {
            break;
        }
        match traffic.encrypt(&src[taken..taken + n], spare) {
            Ok(len) => {
                out.end += len;
                taken += n;
            }
            // Records rustls queued itself (a key update) go first and take the room.
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                if !out.is_empty() {
                    break;
                }
                out.make_room(required_size);
            }
            Err(e @ EncryptError::EncryptExhausted) => return Err(TlsError::Protocol(e.to_string())),
        }
    }
    Ok(taken)
}

/// After a fatal error: queues the alert rustls made for the peer (if any) and returns the
/// error's text.
///
/// Only while rustls holds records: it offers those before it looks at the input again, and
/// looking again would meet the same bad bytes and raise a second fatal alert (which rustls
/// asserts never happens: a debug build would panic on peer input).
fn failed<C: Process>(conn: &mut C, b: &mut Buffers, e: rustls::Error) -> String {
    let msg = e.to_string();
    b.failed = Some(msg.clone());
    while conn.has_records() {
        let status = conn.process(&mut b.inc.buf[b.inc.start..b.inc.end]);
        let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state else { break };
        let need = match encode.encode(b.out.spare()) {
            Ok(n) => {
                b.out.end += n;
                continue;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => required_size,
            Err(EncodeError::AlreadyEncoded) => break,
        };
        b.out.make_room(need);
        if let Ok(n) = encode.encode(b.out.spare()) {
            b.out.end += n;
        }
    }
    msg
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// An in-memory pipe end: reads from `rx`, writes to `tx`, `WouldBlock` when empty (or
    /// EOF once `eof` is set). `chunk` (when not 0) caps the bytes one read or write moves;
    /// `sizes` (when not empty) caps them call after call in turn, 0 being a `WouldBlock`;
    /// and `tx_cap` (when not 0) makes writes block once `tx` holds that much, like a full
    /// socket.
    #[derive(Default)]
    struct Pipe {
        rx: VecDeque<u8>,
        tx: Vec<u8>,
        chunk: usize,
        tx_cap: usize,
        sizes: Vec<usize>,
        turn: usize,
        eof: bool,
    }

    impl Pipe {
        fn cap(&mut self, n: usize) -> usize {
            let mut n = if self.chunk == 0 { n } else { n.min(self.chunk) };
            if !self.sizes.is_empty() {
                n = n.min(self.sizes[self.turn % self.sizes.len()]);
                self.turn += 1;
            }
            n
        }
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.rx.is_empty() {
                return if self.eof { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
            }
            let n = self.cap(buf.len().min(self.rx.len()));
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            for (d, s) in buf.iter_mut().zip(self.rx.drain(..n)) {
                *d = s;
            }
            Ok(n)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = if self.tx_cap == 0 { buf.len() } else { self.tx_cap.saturating_sub(self.tx.len()) };
            let n = self.cap(buf.len().min(room));
            if n == 0 && !buf.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.tx.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A fresh self-signed certificate and key for `mx.example.test`, written into `dir`.
    pub(crate) fn pair_files(dir: &Path) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec!["mx.example.test".into()]).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    /// An empty scratch directory of this process, named after the test.
    pub(crate) fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Moves bytes both ways until neither side has anything to say.
    fn pump(
        a: &mut TlsSession,
        ap: &mut Pipe,
        b: &mut TlsSession,
        bp: &mut Pipe,
        a_got: &mut Vec<u8>,
        b_got: &mut Vec<u8>,
    ) {
        let mut buf = [0u8; 4096];
        for _ in 0..50 {
            let _ = a.flush(ap);
            bp.rx.extend(ap.tx.drain(..));
            let _ = b.flush(bp);
            ap.rx.extend(bp.tx.drain(..));
            while let TlsRead::Data(n) = a.read(ap, &mut buf) {
                a_got.extend_from_slice(&buf[..n]);
            }
            while let TlsRead::Data(n) = b.read(bp, &mut buf) {
                b_got.extend_from_slice(&buf[..n]);
            }
            if !a.wants_write() && !b.wants_write() && ap.rx.is_empty() && bp.rx.is_empty() {
                break;
            }
        }
    }

    /// A server and an unverifying client, in files under a temp dir named after `tag`, with
    /// the handshake done over two pipes: (server, client, server's pipe, client's pipe).
    fn handshaken(tag: &str) -> (TlsSession, TlsSession, Pipe, Pipe) {
        let dir = tempdir(tag);
        let (cert, key) = pair_files(&dir);
        let mut server = TlsSession::server(&ServerTls::load(&cert, &key).unwrap()).unwrap();
        let mut client = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
        let (mut sp, mut cp) = (Pipe::default(), Pipe::default());
        pump(&mut client, &mut cp, &mut server, &mut sp, &mut Vec::new(), &mut Vec::new());
        (server, client, sp, cp)
    }

    #[test]
    fn handshake_and_data_both_ways() {
        let dir = tempdir("hs");
        let (cert, key) = pair_files(&dir);
        let server_tls = ServerTls::load(&cert, &key).unwrap();
        let mut server = TlsSession::server(&server_tls).unwrap();
        let mut client = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
        // The ClientHello is ready to go at once.
        assert!(client.wants_write() && !server.wants_write());
        let (mut sp, mut cp) = (Pipe::default(), Pipe::default());
        // Written before the handshake: buffered, sent after it.
        assert_eq!(server.write(b"220 hello\r\n"), 11);
        let (mut s_got, mut c_got) = (Vec::new(), Vec::new());
        client.write(b"EHLO x\r\n");
        pump(&mut client, &mut cp, &mut server, &mut sp, &mut c_got, &mut s_got);
        assert!(!server.is_handshaking() && !client.is_handshaking());
        assert_eq!(c_got, b"220 hello\r\n");
        assert_eq!(s_got, b"EHLO x\r\n");
        let info = server.info().unwrap();
        assert!(info.version.starts_with("TLSv1."), "{info:?}");
        assert_eq!(client.info(), Some(info));
        // close_notify is a clean close.
        client.close();
        let _ = client.flush(&mut cp);
        sp.rx.extend(cp.tx.drain(..));
        let mut buf = [0u8; 64];
        assert!(matches!(server.read(&mut sp, &mut buf), TlsRead::Closed));
    }

    #[test]
    fn verified_client_accepts_the_right_name_only() {
        let dir = tempdir("verify");
        let (cert, key) = pair_files(&dir);
        let server_tls = ServerTls::load(&cert, &key).unwrap();
        let verified = ClientTls::verified(&cert).unwrap();
        for (name, ok) in [("mx.example.test", true), ("other.example.test", false)] {
            let mut server = TlsSession::server(&server_tls).unwrap();
            let mut client = TlsSession::client(&verified, name).unwrap();
            let (mut sp, mut cp) = (Pipe::default(), Pipe::default());
            let (mut s_got, mut c_got) = (Vec::new(), Vec::new());
            pump(&mut client, &mut cp, &mut server, &mut sp, &mut c_got, &mut s_got);
            assert_eq!(!client.is_handshaking(), ok, "{name}");
        }
    }

    #[test]
    fn garbage_fails_the_handshake_without_panic() {
        let dir = tempdir("garbage");
        let (cert, key) = pair_files(&dir);
        let mut server = TlsSession::server(&ServerTls::load(&cert, &key).unwrap()).unwrap();
        let mut sp = Pipe::default();
        sp.rx.extend(b"EHLO plaintext.example\r\n".iter());
        let mut buf = [0u8; 64];
        assert!(matches!(server.read(&mut sp, &mut buf), TlsRead::Failed(TlsError::Protocol(_))));
        // The alert for the peer is queued, and the session stays failed.
        assert!(server.wants_write());
        assert!(matches!(server.flush(&mut sp), TlsFlush::Done));
        assert_eq!(sp.tx[0], 21, "an alert record: {:?}", sp.tx);
        assert!(matches!(server.read(&mut sp, &mut buf), TlsRead::Failed(TlsError::Protocol(_))));
    }

    #[test]
    fn truncation_is_reported() {
        let (mut server, ..) = handshaken("trunc");
        // EOF without close_notify.
        let mut eof = io::empty();
        let mut buf = [0u8; 64];
        assert!(matches!(server.read(&mut eof, &mut buf), TlsRead::Failed(TlsError::Truncated)));
    }

    #[test]
    fn load_names_the_flag_at_fault() {
        let dir = tempdir("load");
        let (cert, key) = pair_files(&dir);
        let other = rcgen::generate_simple_self_signed(vec!["x.test".into()]).unwrap();
        let other_key = dir.join("other.pem");
        std::fs::write(&other_key, other.key_pair.serialize_pem()).unwrap();
        let missing = dir.join("missing.pem");
        let e = ServerTls::load(&missing, &key).unwrap_err().to_string();
        assert!(e.starts_with("--tls-cert"), "{e}");
        let e = ServerTls::load(&cert, &missing).unwrap_err().to_string();
        assert!(e.starts_with("--tls-key"), "{e}");
        let e = ServerTls::load(&key, &key).unwrap_err().to_string();
        assert!(e.starts_with("--tls-cert"), "{e}");
        let e = ServerTls::load(&cert, &cert).unwrap_err().to_string();
        assert!(e.starts_with("--tls-key"), "{e}");
        let e = ServerTls::load(&cert, &other_key).unwrap_err().to_string();
        assert!(e.starts_with("--tls-cert/--tls-key"), "{e}");
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Sends `a_out` (of which `a` has taken the first `a_sent` bytes already) from `a` to `b`
    /// and `b_out` from `b` to `a` through pipes that move little per call and fill up,
    /// reading with an odd-sized buffer; checks what each got, then both closes.
    fn bulk(a: &mut TlsSession, b: &mut TlsSession, a_out: &[u8], a_sent: usize, b_out: &[u8]) {
        let ap = Pipe { chunk: 1000, tx_cap: 5000, ..Pipe::default() };
        let bp = Pipe { chunk: 1000, tx_cap: 5000, ..Pipe::default() };
        bulk_through(a, b, a_out, a_sent, b_out, ap, bp, 777);
    }

    /// [`bulk`] through the given pipes (`ap` is `a`'s socket), reading `read_len` bytes at most
    /// per call.
    #[allow(clippy::too_many_arguments)]
    fn bulk_through(
        a: &mut TlsSession,
        b: &mut TlsSession,
        a_out: &[u8],
        mut a_sent: usize,
        b_out: &[u8],
        mut ap: Pipe,
        mut bp: Pipe,
        read_len: usize,
    ) {
        let mut b_sent = 0;
        let (mut a_got, mut b_got) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; read_len];
        let (mut a_closed, mut b_closed) = (false, false);
        for _ in 0..100_000 {
            a_sent += a.write(&a_out[a_sent..]);
            b_sent += b.write(&b_out[b_sent..]);
            if a_sent == a_out.len() && !a_closed && !a.is_handshaking() {
                a.close();
                a_closed = true;
            }
            let _ = a.flush(&mut ap);
            let _ = b.flush(&mut bp);
            bp.rx.extend(ap.tx.drain(..));
            ap.rx.extend(bp.tx.drain(..));
            loop {
                match b.read(&mut bp, &mut buf) {
                    TlsRead::Data(n) => b_got.extend_from_slice(&buf[..n]),
                    TlsRead::WouldBlock => break,
                    TlsRead::Closed => {
                        if !b_closed && b_sent == b_out.len() {
                            b.close();
                            b_closed = true;
                        }
                        break;
                    }
                    TlsRead::Failed(e) => panic!("b: {e}"),
                }
            }
            loop {
                match a.read(&mut ap, &mut buf) {
                    TlsRead::Data(n) => a_got.extend_from_slice(&buf[..n]),
                    TlsRead::WouldBlock => break,
                    TlsRead::Closed => {
                        assert!(a_closed && b_closed);
                        assert!(b_got == a_out, "a to b: {} of {} bytes", b_got.len(), a_out.len());
                        assert!(a_got == b_out, "b to a: {} of {} bytes", a_got.len(), b_out.len());
                        return;
                    }
                    TlsRead::Failed(e) => panic!("a: {e}"),
                }
            }
        }
        panic!("stuck: a sent {a_sent}, b sent {b_sent}, a got {}, b got {}", a_got.len(), b_got.len());
    }

    #[test]
    fn bulk_data_through_short_reads_and_full_sockets() {
        let dir = tempdir("bulk");
        let (cert, key) = pair_files(&dir);
        let mut server = TlsSession::server(&ServerTls::load(&cert, &key).unwrap()).unwrap();
        let mut client = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
        // More than the outgoing buffer holds is written before the handshake.
        let to_server = pattern(300 * 1024, 0);
        assert_eq!(client.write(&to_server), SEND_LIMIT);
        let to_client = pattern(200 * 1024 + 3, 0x55);
        bulk(&mut client, &mut server, &to_server, SEND_LIMIT, &to_client);
    }

    #[test]
    fn tls12_works_too() {
        let dir = tempdir("tls12");
        let (cert, key) = pair_files(&dir);
        let server_tls = ServerTls::load(&cert, &key).unwrap();
        let tls12 = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert { provider: provider() }))
            .with_no_client_auth();
        let client_tls = ClientTls { config: Arc::new(tls12), verified: false };
        let mut server = TlsSession::server(&server_tls).unwrap();
        let mut client = TlsSession::client(&client_tls, "mx.example.test").unwrap();
        bulk(&mut client, &mut server, &pattern(70_000, 1), 0, &pattern(40_000, 2));
        assert_eq!(server.info().unwrap().version, "TLSv1.2");
    }

    #[test]
    fn a_certificate_longer_than_the_receive_buffer() {
        let dir = tempdir("bigcert");
        // Some 1500 names make a certificate message of several records.
        let names: Vec<String> =
            (0..1500).map(|i| format!("host-{i}.mx.example.test")).chain(["mx.example.test".to_owned()]).collect();
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        assert!(ck.cert.der().len() > 2 * INCOMING, "{}", ck.cert.der().len());
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let mut server = TlsSession::server(&ServerTls::load(&cert, &key).unwrap()).unwrap();
        let mut client = TlsSession::client(&ClientTls::verified(&cert).unwrap(), "mx.example.test").unwrap();
        bulk(&mut client, &mut server, &pattern(50_000, 3), 0, &pattern(1000, 4));
        // Back at the working size once the handshake is over.
        assert_eq!(client.bufs.inc.buf.len(), INCOMING);
        assert_eq!(client.bufs.out.buf.len(), OUTGOING);
        assert_eq!(server.bufs.out.buf.len(), OUTGOING);
    }

    #[test]
    fn session_tickets_resume_the_next_handshake() {
        let dir = tempdir("resume");
        let (cert, key) = pair_files(&dir);
        let server_tls = ServerTls::load(&cert, &key).unwrap();
        let client_tls = ClientTls::unverified();
        let kind = |s: &TlsSession| with_conn!(&s.conn, c => c.handshake_kind());
        for want in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
            let mut server = TlsSession::server(&server_tls).unwrap();
            let mut client = TlsSession::client(&client_tls, "mx.example.test").unwrap();
            bulk(&mut client, &mut server, b"EHLO x\r\n", 0, b"250 ok\r\n");
            assert_eq!(kind(&client), Some(want));
            assert_eq!(kind(&server), Some(want));
        }
    }

    // --- Against rustls' buffered API as the peer: it does what our sessions never do (key
    // updates, records of a few bytes, many tickets) and checks our records independently.

    fn server_tls(name: &str) -> (ServerTls, PathBuf, PathBuf) {
        let dir = tempdir(name);
        let (cert, key) = pair_files(&dir);
        (ServerTls::load(&cert, &key).unwrap(), cert, key)
    }

    /// A buffered rustls client (TLS 1.3 unless `tls12`) sending records of at most
    /// `max_fragment` bytes.
    fn peer_client(tls12: bool, max_fragment: Option<usize>) -> rustls::Connection {
        let versions: &[&rustls::SupportedProtocolVersion] =
            if tls12 { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert { provider: provider() }))
            .with_no_client_auth();
        cfg.max_fragment_size = max_fragment;
        let name = ServerName::try_from("mx.example.test").unwrap();
        rustls::ClientConnection::new(Arc::new(cfg), name).unwrap().into()
    }

    /// A buffered rustls server sending `tickets` TLS 1.3 session tickets after the handshake,
    /// in records of at most `max_fragment` bytes.
    fn peer_server(cert: &Path, key: &Path, tickets: usize, max_fragment: Option<usize>) -> rustls::Connection {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(read_certs(cert, "--tls-cert").unwrap(), PrivateKeyDer::from_pem_file(key).unwrap())
            .unwrap();
        cfg.send_tls13_tickets = tickets;
        cfg.max_fragment_size = max_fragment;
        rustls::ServerConnection::new(Arc::new(cfg)).unwrap().into()
    }

    /// Hands `bytes` to the peer, which must take them without error.
    fn peer_takes(peer: &mut rustls::Connection, bytes: &mut Vec<u8>) {
        let mut rd = &bytes[..];
        while !rd.is_empty() {
            peer.read_tls(&mut rd).unwrap();
            peer.process_new_packets().unwrap();
        }
        bytes.clear();
    }

    /// Everything the peer has to send.
    fn peer_sends(peer: &mut rustls::Connection) -> Vec<u8> {
        let mut out = Vec::new();
        while peer.wants_write() {
            peer.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Plaintext the peer has received so far.
    fn peer_reads(peer: &mut rustls::Connection) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = peer.reader().read_to_end(&mut got);
        got
    }

    /// Handshake between `ours` (on socket `p`) and `peer`; no application data expected.
    fn peer_handshake(ours: &mut TlsSession, p: &mut Pipe, peer: &mut rustls::Connection) {
        let mut buf = [0u8; 64];
        for _ in 0..20 {
            let _ = ours.flush(p);
            peer_takes(peer, &mut p.tx);
            p.rx.extend(peer_sends(peer));
            match ours.read(p, &mut buf) {
                TlsRead::WouldBlock => {}
                other => panic!("{other:?}"),
            }
            if !ours.is_handshaking() && !peer.is_handshaking() && !ours.wants_write() && !peer.wants_write() {
                return;
            }
        }
        panic!("handshake stuck");
    }

    /// How many TLS records `wire` holds.
    fn records(mut wire: &[u8]) -> usize {
        let mut n = 0;
        while wire.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
            wire = &wire[(5 + len).min(wire.len())..];
            n += 1;
        }
        n
    }

    /// Reads with a `len`-byte buffer until something other than data comes back.
    fn read_all(s: &mut TlsSession, p: &mut Pipe, len: usize) -> (Vec<u8>, TlsRead) {
        let mut buf = vec![0u8; len];
        let mut got = Vec::new();
        loop {
            match s.read(p, &mut buf) {
                TlsRead::Data(n) => got.extend_from_slice(&buf[..n]),
                other => return (got, other),
            }
        }
    }

    #[test]
    fn many_records_in_one_read_records_split_over_reads_and_close_notify_behind_data() {
        for tls12 in [false, true] {
            let (tls, ..) = server_tls("records");
            let mut server = TlsSession::server(&tls).unwrap();
            let mut peer = peer_client(tls12, Some(32));
            let mut sp = Pipe::default();
            peer_handshake(&mut server, &mut sp, &mut peer);
            // Some 20 KB in records of a few bytes each, all in the socket at once.
            let data = pattern(20_000, 7);
            peer.writer().write_all(&data).unwrap();
            sp.rx.extend(peer_sends(&mut peer));
            let wire: Vec<u8> = sp.rx.iter().copied().collect();
            assert!(records(&wire) > 500, "{} records", records(&wire));
            let (got, end) = read_all(&mut server, &mut sp, 100);
            assert!(got == data && matches!(end, TlsRead::WouldBlock), "tls12 {tls12}: {} bytes, {end:?}", got.len());
            // Full-size records, one byte per socket read.
            let mut peer_big = peer_client(tls12, None);
            let mut server = TlsSession::server(&tls).unwrap();
            let mut sp = Pipe::default();
            peer_handshake(&mut server, &mut sp, &mut peer_big);
            let data = pattern(40_000, 8);
            peer_big.writer().write_all(&data).unwrap();
            sp.rx.extend(peer_sends(&mut peer_big));
            sp.chunk = 1;
            let (got, end) = read_all(&mut server, &mut sp, 4096);
            assert!(got == data && matches!(end, TlsRead::WouldBlock), "tls12 {tls12}: {} bytes, {end:?}", got.len());
            // Data and close_notify in one read: all of the data, then the clean close.
            sp.chunk = 0;
            peer_big.writer().write_all(b"QUIT\r\n").unwrap();
            peer_big.send_close_notify();
            sp.rx.extend(peer_sends(&mut peer_big));
            let (got, end) = read_all(&mut server, &mut sp, 3);
            assert_eq!(got, b"QUIT\r\n");
            assert!(matches!(end, TlsRead::Closed), "{end:?}");
            assert!(matches!(server.read(&mut sp, &mut [0; 8]), TlsRead::Closed));
            // We may still answer, then close in turn.
            assert_eq!(server.write(b"221 bye\r\n"), 9);
            server.close();
            assert!(matches!(server.flush(&mut sp), TlsFlush::Done));
            peer_takes(&mut peer_big, &mut sp.tx);
            assert_eq!(peer_reads(&mut peer_big), b"221 bye\r\n");
            assert_eq!(server.write(b"late"), 0);
        }
    }

    #[test]
    fn key_updates_from_the_peer_are_answered_before_our_next_record() {
        let (tls, cert, key) = server_tls("keyupdate");
        let mut server = TlsSession::server(&tls).unwrap();
        let mut peer = peer_client(false, None);
        let mut sp = Pipe::default();
        peer_handshake(&mut server, &mut sp, &mut peer);
        key_updates(&mut server, &mut sp, &mut peer);
        // The same with us as the client.
        let mut client = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
        let mut peer = peer_server(&cert, &key, 2, None);
        let mut cp = Pipe::default();
        peer_handshake(&mut client, &mut cp, &mut peer);
        key_updates(&mut client, &mut cp, &mut peer);
    }

    /// The peer asks for key updates, sends data and reads our replies; then asks once more
    /// and gets only our close_notify.
    fn key_updates(ours: &mut TlsSession, p: &mut Pipe, peer: &mut rustls::Connection) {
        // More updates than rustls allows without data in between (32): data resets its count.
        for i in 0..40 {
            peer.refresh_traffic_keys().unwrap();
            if i % 4 == 0 {
                // A second request before we answered the first: one answer does for both.
                peer.refresh_traffic_keys().unwrap();
            }
            let msg = format!("NOOP {i}\r\n");
            peer.writer().write_all(msg.as_bytes()).unwrap();
            p.rx.extend(peer_sends(peer));
            let (got, end) = read_all(ours, p, 4096);
            assert!(got == msg.as_bytes() && matches!(end, TlsRead::WouldBlock), "{i}: {got:?} {end:?}");
            // Our reply goes out under the new keys, after the key update the peer asked for
            // (the peer fails to decrypt otherwise).
            let reply = format!("250 {i}\r\n");
            assert_eq!(ours.write(reply.as_bytes()), reply.len());
            assert!(matches!(ours.flush(p), TlsFlush::Done));
            peer_takes(peer, &mut p.tx);
            assert_eq!(peer_reads(peer), reply.as_bytes());
        }
        // An update, then nothing but our close_notify: the answer goes first there too.
        peer.refresh_traffic_keys().unwrap();
        p.rx.extend(peer_sends(peer));
        assert!(matches!(ours.read(p, &mut [0; 64]), TlsRead::WouldBlock));
        ours.close();
        assert!(matches!(ours.flush(p), TlsFlush::Done));
        peer_takes(peer, &mut p.tx);
        let mut rest = Vec::new();
        assert_eq!(peer.reader().read_to_end(&mut rest).unwrap(), 0, "close_notify seen");
    }

    #[test]
    fn session_tickets_and_data_in_one_read() {
        let (_, cert, key) = server_tls("tickets");
        // Whole records (rustls packs the eight tickets into one), then records of 40 bytes
        // (each ticket split over several of them).
        for (max_fragment, min_records) in [(None, 2), (Some(40), 20)] {
            let mut peer = peer_server(&cert, &key, 8, max_fragment);
            // Written before the handshake ends: goes out right behind the eight tickets.
            peer.writer().write_all(b"220 mx.example.test ESMTP\r\n").unwrap();
            let mut client = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
            let mut cp = Pipe::default();
            let mut got = Vec::new();
            let mut last_records = 0;
            for _ in 0..10 {
                let _ = client.flush(&mut cp);
                peer_takes(&mut peer, &mut cp.tx);
                let bytes = peer_sends(&mut peer);
                last_records = records(&bytes);
                cp.rx.extend(bytes);
                let (data, end) = read_all(&mut client, &mut cp, 5);
                assert!(matches!(end, TlsRead::WouldBlock), "{end:?}");
                got.extend(data);
                if !got.is_empty() {
                    break;
                }
            }
            assert_eq!(got, b"220 mx.example.test ESMTP\r\n");
            let Conn::Client(c) = &client.conn else { unreachable!() };
            assert_eq!(c.tls13_tickets_received(), 8);
            assert!(last_records >= min_records, "tickets and data came in one read of {last_records} records");
            // And the session carries on.
            assert_eq!(client.write(b"EHLO x\r\n"), 8);
            assert!(matches!(client.flush(&mut cp), TlsFlush::Done));
            peer_takes(&mut peer, &mut cp.tx);
            assert_eq!(peer_reads(&mut peer), b"EHLO x\r\n");
        }
    }

    #[test]
    fn a_reply_to_data_that_came_with_the_finished_message_goes_out_at_once() {
        for tls12 in [false, true] {
            let (tls, ..) = server_tls("finished");
            let mut server = TlsSession::server(&tls).unwrap();
            let mut peer = peer_client(tls12, None);
            // Sent with the client's Finished, in one read.
            peer.writer().write_all(b"EHLO client.example.test\r\n").unwrap();
            let mut sp = Pipe::default();
            let mut buf = [0u8; 256];
            let n = loop {
                let _ = server.flush(&mut sp);
                peer_takes(&mut peer, &mut sp.tx);
                sp.rx.extend(peer_sends(&mut peer));
                match server.read(&mut sp, &mut buf) {
                    TlsRead::Data(n) => break n,
                    TlsRead::WouldBlock => {}
                    other => panic!("{other:?}"),
                }
            };
            assert_eq!(&buf[..n], b"EHLO client.example.test\r\n");
            assert!(!server.is_handshaking());
            // No further read (the socket is drained): the reply is encrypted and sent now.
            assert_eq!(server.write(b"250 mx.example.test\r\n"), 21);
            assert!(server.wants_write(), "tls12 {tls12}");
            assert!(matches!(server.flush(&mut sp), TlsFlush::Done));
            assert!(!server.wants_write());
            peer_takes(&mut peer, &mut sp.tx);
            assert_eq!(peer_reads(&mut peer), b"250 mx.example.test\r\n", "tls12 {tls12}");
        }
    }

    #[test]
    fn data_before_eof_mid_record_is_delivered_then_the_truncation() {
        let (tls, ..) = server_tls("eofmid");
        let mut server = TlsSession::server(&tls).unwrap();
        let mut peer = peer_client(false, None);
        let mut sp = Pipe::default();
        peer_handshake(&mut server, &mut sp, &mut peer);
        peer.writer().write_all(b"MAIL FROM:<a@example.test>\r\n").unwrap();
        let first = peer_sends(&mut peer);
        peer.writer().write_all(b"RCPT TO:<b@example.test>\r\n").unwrap();
        let second = peer_sends(&mut peer);
        sp.rx.extend(&first);
        sp.rx.extend(&second[..second.len() / 2]);
        sp.eof = true;
        let (got, end) = read_all(&mut server, &mut sp, 4096);
        assert_eq!(got, b"MAIL FROM:<a@example.test>\r\n");
        assert!(matches!(end, TlsRead::Failed(TlsError::Truncated)), "{end:?}");
        // EOF within a record header, and during the handshake, too.
        for cut in [3, 0] {
            let mut server = TlsSession::server(&tls).unwrap();
            let mut sp = Pipe::default();
            if cut > 0 {
                let mut peer = peer_client(false, None);
                peer_handshake(&mut server, &mut sp, &mut peer);
                peer.writer().write_all(b"QUIT\r\n").unwrap();
                sp.rx.extend(&peer_sends(&mut peer)[..cut]);
            } else {
                let mut peer = peer_client(false, None);
                sp.rx.extend(&peer_sends(&mut peer)[..100]);
            }
            sp.eof = true;
            let (got, end) = read_all(&mut server, &mut sp, 4096);
            assert!(got.is_empty() && matches!(end, TlsRead::Failed(TlsError::Truncated)), "{cut}: {end:?}");
        }
    }

    #[test]
    fn data_authenticated_before_bad_input_is_delivered_then_the_failure() {
        let (tls, ..) = server_tls("badtail");
        let mut server = TlsSession::server(&tls).unwrap();
        let mut peer = peer_client(false, None);
        let mut sp = Pipe::default();
        peer_handshake(&mut server, &mut sp, &mut peer);
        peer.writer().write_all(b"RSET\r\n").unwrap();
        sp.rx.extend(peer_sends(&mut peer));
        peer.writer().write_all(b"NOOP\r\n").unwrap();
        sp.rx.extend(peer_sends(&mut peer));
        // A record that does not authenticate.
        sp.rx.extend([0x17, 3, 3, 0, 32]);
        sp.rx.extend([0xa5; 32]);
        let mut buf = [0u8; 64];
        assert!(matches!(server.read(&mut sp, &mut buf), TlsRead::Data(6)));
        // Our reply makes rustls go on through the received records: NOOP, then the bad one.
        assert_eq!(server.write(b"250 reset\r\n"), 0, "the session failed");
        let (got, end) = read_all(&mut server, &mut sp, 4096);
        assert_eq!(got, b"NOOP\r\n");
        assert!(matches!(end, TlsRead::Failed(TlsError::Protocol(_))), "{end:?}");
        // A bad_record_mac alert is queued for the peer.
        assert!(server.wants_write());
        assert!(matches!(server.flush(&mut sp), TlsFlush::Done));
        let mut rd = &sp.tx[..];
        peer.read_tls(&mut rd).unwrap();
        let e = peer.process_new_packets().unwrap_err();
        assert_eq!(e, rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac));
    }

    #[test]
    fn oversized_records_and_endless_handshake_messages_are_refused_with_bounded_buffers() {
        let (tls, ..) = server_tls("oversized");
        // After the handshake: a record announcing more than TLS allows.
        let mut server = TlsSession::server(&tls).unwrap();
        let mut peer = peer_client(false, None);
        let mut sp = Pipe::default();
        peer_handshake(&mut server, &mut sp, &mut peer);
        sp.rx.extend([0x17, 3, 3, 0x48, 0x01]);
        sp.rx.extend([0u8; 20_000]);
        let (got, end) = read_all(&mut server, &mut sp, 4096);
        assert!(got.is_empty() && matches!(end, TlsRead::Failed(TlsError::Protocol(_))), "{end:?}");
        assert_eq!(server.bufs.inc.buf.len(), INCOMING);
        // During the handshake: a 64 KiB ClientHello in records of one byte each, which takes
        // six times its size in the receive buffer.
        let mut server = TlsSession::server(&tls).unwrap();
        let mut sp = Pipe::default();
        let mut hello = vec![1u8, 0x00, 0xff, 0xff];
        hello.resize(4 + 0xffff, 0);
        for b in hello {
            sp.rx.extend([0x16, 3, 1, 0, 1, b]);
        }
        let (got, end) = read_all(&mut server, &mut sp, 4096);
        assert!(got.is_empty() && matches!(end, TlsRead::Failed(TlsError::Protocol(_))), "{end:?}");
        assert!(server.bufs.inc.buf.len() <= INCOMING_MAX);
        assert!(matches!(server.read(&mut sp, &mut [0; 8]), TlsRead::Failed(_)));
        // A handshake message above rustls' own limit is refused as soon as its header is in.
        let mut server = TlsSession::server(&tls).unwrap();
        let mut sp = Pipe::default();
        sp.rx.extend([0x16, 3, 1, 0x40, 0, 1, 0x01, 0, 0]);
        sp.rx.extend([0u8; 0x4000 - 4]);
        let (_, end) = read_all(&mut server, &mut sp, 4096);
        assert!(matches!(end, TlsRead::Failed(TlsError::Protocol(_))), "{end:?}");
        assert_eq!(server.bufs.inc.buf.len(), INCOMING);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]

            /// Whatever sizes the sockets move per call (including none: `WouldBlock`) and
            /// however little each read asks for, both streams arrive whole and in order, and
            /// both sides close cleanly.
            #[test]
            fn any_socket_split_delivers_both_streams(
                mut a_sizes in proptest::collection::vec(0usize..3000, 0..6),
                mut b_sizes in proptest::collection::vec(0usize..3000, 0..6),
                read_len in 1usize..3000,
                a_len in 0usize..60_000,
                b_len in 0usize..30_000,
                tls12 in any::<bool>(),
            ) {
                a_sizes.push(1);
                b_sizes.push(4096);
                let (server_tls, ..) = server_tls("split");
                let client_tls = if tls12 {
                    let cfg = ClientConfig::builder_with_provider(provider())
                        .with_protocol_versions(&[&rustls::version::TLS12])
                        .unwrap()
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(AnyCert { provider: provider() }))
                        .with_no_client_auth();
                    ClientTls { config: Arc::new(cfg), verified: false }
                } else {
                    ClientTls::unverified()
                };
                let mut server = TlsSession::server(&server_tls).unwrap();
                let mut client = TlsSession::client(&client_tls, "mx.example.test").unwrap();
                let ap = Pipe { sizes: a_sizes, ..Pipe::default() };
                let bp = Pipe { sizes: b_sizes, tx_cap: 20_000, ..Pipe::default() };
                bulk_through(&mut client, &mut server, &pattern(a_len, 1), 0, &pattern(b_len, 2), ap, bp, read_len);
            }

            /// A byte of the peer's stream changed, or bytes dropped or added: never a panic,
            /// never plaintext that was not sent (what comes out is a prefix of what was sent).
            #[test]
            fn damaged_streams_fail_cleanly(
                at in any::<prop::sample::Index>(),
                xor in 1u8..=255,
                how in 0u8..3,
                junk in proptest::collection::vec(any::<u8>(), 0..64),
                during_handshake in any::<bool>(),
                client_side in any::<bool>(),
            ) {
                let (tls, cert, key) = server_tls("damage");
                // `server` is our session, either side.
                let (mut server, mut peer) = if client_side {
                    let client = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
                    (client, peer_server(&cert, &key, 2, Some(512)))
                } else {
                    (TlsSession::server(&tls).unwrap(), peer_client(false, Some(512)))
                };
                let mut sp = Pipe::default();
                let sent = pattern(3000, 9);
                let mut stream = if during_handshake {
                    if client_side {
                        // The server's first flight, in answer to our ClientHello.
                        let _ = server.flush(&mut sp);
                        peer_takes(&mut peer, &mut sp.tx);
                    }
                    peer_sends(&mut peer)
                } else {
                    peer_handshake(&mut server, &mut sp, &mut peer);
                    peer.writer().write_all(&sent).unwrap();
                    peer_sends(&mut peer)
                };
                let i = at.index(stream.len());
                match how {
                    0 => stream[i] ^= xor,
                    1 => stream.truncate(i),
                    _ => {
                        stream.splice(i..i, junk.iter().copied());
                    }
                }
                sp.rx.extend(stream);
                sp.eof = how == 1;
                let mut got = Vec::new();
                let mut buf = [0u8; 700];
                for _ in 0..100 {
                    match server.read(&mut sp, &mut buf) {
                        TlsRead::Data(n) => got.extend_from_slice(&buf[..n]),
                        TlsRead::WouldBlock => {
                            let _ = server.flush(&mut sp);
                            if during_handshake {
                                break;
                            }
                            let _ = server.write(b"250 ok\r\n");
                        }
                        TlsRead::Closed | TlsRead::Failed(_) => break,
                    }
                }
                let _ = server.flush(&mut sp);
                prop_assert!(sent.starts_with(&got), "{} bytes out, not a prefix of what was sent", got.len());
                prop_assert!(server.bufs.inc.buf.len() <= INCOMING_MAX);
            }
        }
    }
}
