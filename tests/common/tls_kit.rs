//! What `tests/alloc.rs` and `benches/tls_auth.rs` (through `#[path]`) need to drive TLS
//! sessions without sockets: an in-memory pipe end, and a server certificate for
//! `mx.example.test`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use sluice::net::tls::ServerTls;

/// Server settings with a fresh self-signed certificate for `mx.example.test` (written to a
/// scratch directory named after `tag`, loaded, and removed again).
pub fn server_tls(tag: &str) -> ServerTls {
    let dir = std::env::temp_dir().join(format!("sluice-tls-kit-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["mx.example.test".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let tls = ServerTls::load(&cert, &key).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    tls
}

/// One direction of an in-memory connection: reads from `rx` (`WouldBlock` when empty),
/// writes to `tx`.
#[derive(Default)]
pub struct Pipe {
    pub rx: VecDeque<u8>,
    pub tx: Vec<u8>,
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
