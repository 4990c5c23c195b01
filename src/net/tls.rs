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
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, Connection, DigitallySignedStruct, ServerConfig, ServerConnection};

/// Most plaintext a session buffers for sending before [`TlsSession::write`] takes less than
/// it is offered (backpressure, like a full socket).
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
pub struct TlsSession {
    conn: Connection,
    /// The socket reported EOF.
    eof: bool,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsSession {{ handshaking: {} }}", self.conn.is_handshaking())
    }
}

impl TlsSession {
    /// A server session with the given certificate.
    pub fn server(tls: &ServerTls) -> Result<TlsSession, TlsError> {
        let mut conn = ServerConnection::new(tls.config.clone()).map_err(|e| TlsError::Protocol(e.to_string()))?;
        conn.set_buffer_limit(Some(SEND_LIMIT));
        Ok(TlsSession { conn: Connection::Server(conn), eof: false })
    }

    /// A client session to `host` (a DNS name for SNI and verification, or an IP address).
    pub fn client(tls: &ClientTls, host: &str) -> Result<TlsSession, TlsError> {
        let name = ServerName::try_from(host.trim_end_matches('.').to_owned())
            .map_err(|_| TlsError::Protocol(format!("{host:?} is not a valid TLS server name")))?;
        let mut conn =
            ClientConnection::new(tls.config.clone(), name).map_err(|e| TlsError::Protocol(e.to_string()))?;
        conn.set_buffer_limit(Some(SEND_LIMIT));
        Ok(TlsSession { conn: Connection::Client(conn), eof: false })
    }

    /// Reads plaintext into `dst` (which must not be empty), pulling ciphertext from `sock`
    /// as needed. Returns [`TlsRead::WouldBlock`] only once the socket itself would block.
    pub fn read(&mut self, sock: &mut impl Read, dst: &mut [u8]) -> TlsRead {
        debug_assert!(!dst.is_empty());
        loop {
            match self.conn.reader().read(dst) {
                Ok(0) => return TlsRead::Closed,
                Ok(n) => return TlsRead::Data(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return TlsRead::Failed(TlsError::Truncated),
                Err(e) => return TlsRead::Failed(TlsError::Io(e)),
            }
            if self.eof {
                // EOF seen and no plaintext: the reader reports close_notify or truncation
                // above; a handshake cut short ends here.
                return TlsRead::Failed(TlsError::Truncated);
            }
            match self.conn.read_tls(sock) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return TlsRead::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return TlsRead::Failed(TlsError::Io(e)),
            }
            if let Err(e) = self.conn.process_new_packets() {
                return TlsRead::Failed(TlsError::Protocol(e.to_string()));
            }
        }
    }

    /// Takes plaintext to send (encrypted at once after the handshake, buffered before it);
    /// returns how many bytes it took, fewer than offered when its buffer is full.
    pub fn write(&mut self, src: &[u8]) -> usize {
        self.conn.writer().write(src).unwrap_or(0)
    }

    /// Writes queued ciphertext (handshake messages, records, alerts) to `sock`.
    pub fn flush(&mut self, sock: &mut impl Write) -> TlsFlush {
        while self.conn.wants_write() {
            match self.conn.write_tls(sock) {
                Ok(0) => return TlsFlush::Failed(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return TlsFlush::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return TlsFlush::Failed(e),
            }
        }
        TlsFlush::Done
    }

    /// Ciphertext is waiting to be written.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// The handshake has not finished.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Version and cipher once negotiated.
    pub fn info(&self) -> Option<TlsInfo> {
        let version = match self.conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            other => other.as_str()?,
        };
        let cipher = self.conn.negotiated_cipher_suite()?.suite().as_str()?;
        Some(TlsInfo { version, cipher })
    }

    /// Queues `close_notify`; flush to send it.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// An in-memory pipe end: reads from `rx`, writes to `tx`, `WouldBlock` when empty.
    #[derive(Default)]
    struct Pipe {
        rx: VecDeque<u8>,
        tx: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.rx.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.rx.len());
            for (d, s) in buf.iter_mut().zip(self.rx.drain(..n)) {
                *d = s;
            }
            Ok(n)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.tx.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn pair_files(dir: &Path) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec!["mx.example.test".into()]).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    fn tempdir(name: &str) -> PathBuf {
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

    #[test]
    fn handshake_and_data_both_ways() {
        let dir = tempdir("hs");
        let (cert, key) = pair_files(&dir);
        let server_tls = ServerTls::load(&cert, &key).unwrap();
        let mut server = TlsSession::server(&server_tls).unwrap();
        let mut client = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
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
    }

    #[test]
    fn truncation_is_reported() {
        let dir = tempdir("trunc");
        let (cert, key) = pair_files(&dir);
        let mut server = TlsSession::server(&ServerTls::load(&cert, &key).unwrap()).unwrap();
        let mut client = TlsSession::client(&ClientTls::unverified(), "mx.example.test").unwrap();
        let (mut sp, mut cp) = (Pipe::default(), Pipe::default());
        let (mut s_got, mut c_got) = (Vec::new(), Vec::new());
        pump(&mut client, &mut cp, &mut server, &mut sp, &mut c_got, &mut s_got);
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
}
