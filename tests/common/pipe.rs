//! An in-memory pipe end for driving TLS sessions without sockets (shared by `tests/alloc.rs`
//! and `benches/tls_auth.rs` through `#[path]`): reads from `rx` (`WouldBlock` when empty),
//! writes to `tx`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

/// One direction of an in-memory connection.
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
