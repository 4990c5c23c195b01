//! Pure: the STARTTLS policy of each connection (`--outbound-tls`, RFC 3207) and the memory
//! of addresses whose handshake failed under `may`.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::smtp::client::TlsPolicy;

/// How long an address whose TLS handshake failed under `may` is spoken to in plaintext only.
pub const TLS_BROKEN_MS: u64 = 10 * 60_000;
/// Addresses remembered with a broken handshake, at most.
const TLS_BROKEN_MAX: usize = 10_000;

pub use crate::shaping::OutboundTls;

/// Addresses whose handshake failed under `may`, until (Unix ms): plaintext only.
#[derive(Debug, Default)]
pub struct TlsMemory {
    broken: HashMap<SocketAddr, u64>,
}

impl TlsMemory {
    /// The policy of a new connection to `addr`: a host whose handshake just failed gets
    /// plaintext at once (no doomed handshake before every delivery).
    pub fn policy(&self, mode: OutboundTls, addr: SocketAddr, now_ms: u64) -> TlsPolicy {
        match mode {
            OutboundTls::None => TlsPolicy::Off,
            OutboundTls::May if self.broken.get(&addr).is_some_and(|&t| t > now_ms) => TlsPolicy::Off,
            OutboundTls::May => TlsPolicy::Opportunistic,
            OutboundTls::Encrypt | OutboundTls::Verify => TlsPolicy::Required,
            OutboundTls::Implicit => TlsPolicy::Implicit,
        }
    }

    /// Remembers that the handshake with `addr` failed; bounded (expired entries go first,
    /// then new ones are not remembered).
    pub fn remember(&mut self, addr: SocketAddr, now_ms: u64) {
        if self.broken.len() >= TLS_BROKEN_MAX {
            self.broken.retain(|_, until| *until > now_ms);
        }
        if self.broken.len() < TLS_BROKEN_MAX {
            self.broken.insert(addr, now_ms + TLS_BROKEN_MS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_handshake_means_plaintext_for_a_while_and_is_bounded() {
        let a = SocketAddr::from(([192, 0, 2, 1], 25));
        let mut m = TlsMemory::default();
        assert_eq!(m.policy(OutboundTls::May, a, 0), TlsPolicy::Opportunistic);
        m.remember(a, 0);
        assert_eq!(m.policy(OutboundTls::May, a, 1), TlsPolicy::Off);
        assert_eq!(m.policy(OutboundTls::Encrypt, a, 1), TlsPolicy::Required);
        assert_eq!(m.policy(OutboundTls::May, a, TLS_BROKEN_MS), TlsPolicy::Opportunistic);
        for i in 0..TLS_BROKEN_MAX as u32 + 5 {
            m.remember(SocketAddr::from((std::net::Ipv4Addr::from(i), 25)), 0);
        }
        assert_eq!(m.broken.len(), TLS_BROKEN_MAX);
        // Once the old ones expired, room is made.
        m.remember(a, TLS_BROKEN_MS + 1);
        assert_eq!(m.broken.len(), 1);
    }
}
