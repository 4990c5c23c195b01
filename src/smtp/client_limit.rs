//! Pure: per-client inbound connection limits, like Postfix anvil's
//! `smtpd_client_connection_count_limit` and `smtpd_client_connection_rate_limit`.
//!
//! # Driving it
//! Call [`ConnectionLimiter::admit`] for each accepted connection that is subject to limits
//! (the driver exempts its `--allow` networks unless told otherwise) and, when it says
//! [`Admission::Admit`], [`ConnectionLimiter::close`] once that connection ends. A refused
//! connection is not counted.
//!
//! The rate is a GCRA (a token bucket kept as one "theoretical arrival time" per client): a
//! client may open `rate` connections at once, then one every `60 s / rate`.
//!
//! Owns: open-connection counts and rate state per [`ClientKey`]. Must never: read the clock
//! (time comes in as `now`), touch sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::client_key::ClientKey;

/// The limits; zero turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientLimits {
    /// Connections open at once from one client (`--max-connections-per-ip`).
    pub max_open: u32,
    /// New connections per minute from one client (`--max-connection-rate-per-ip`).
    pub per_minute: u32,
}

/// Whether a new connection may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Counted; call [`ConnectionLimiter::close`] when it ends.
    Admit,
    /// The client has `max_open` connections open already.
    TooMany,
    /// The client opened connections faster than `per_minute`.
    TooFast,
}

#[derive(Debug, Clone, Copy)]
struct Client {
    open: u32,
    /// GCRA: when the client's bucket is full again; `None` when the rate is off.
    tat: Option<Instant>,
}

/// Per-client counts.
#[derive(Debug)]
pub struct ConnectionLimiter {
    limits: ClientLimits,
    clients: HashMap<ClientKey, Client>,
    /// Size of `clients` at which stale entries are swept next.
    sweep_at: usize,
}

impl ConnectionLimiter {
    /// A limiter with nothing counted.
    pub fn new(limits: ClientLimits) -> ConnectionLimiter {
        ConnectionLimiter { limits, clients: HashMap::new(), sweep_at: 1024 }
    }

    /// Whether limits are on at all (the driver can skip the calls when not).
    pub fn enabled(&self) -> bool {
        self.limits.max_open > 0 || self.limits.per_minute > 0
    }

    /// A new connection from `ip` at `now`.
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Admission {
        if !self.enabled() {
            return Admission::Admit;
        }
        if self.clients.len() >= self.sweep_at {
            self.sweep(now);
        }
        let l = self.limits;
        let c = self.clients.entry(ClientKey::of(ip)).or_insert(Client { open: 0, tat: None });
        if l.max_open > 0 && c.open >= l.max_open {
            return Admission::TooMany;
        }
        if l.per_minute > 0 {
            let interval = Duration::from_secs(60) / l.per_minute;
            // The bucket holds a minute's worth: `per_minute` connections back to back.
            let burst = Duration::from_secs(60) - interval;
            let tat = c.tat.map_or(now, |t| t.max(now));
            if tat.saturating_duration_since(now) > burst {
                return Admission::TooFast;
            }
            c.tat = Some(tat + interval);
        }
        c.open += 1;
        Admission::Admit
    }

    /// A connection admitted from `ip` has ended.
    pub fn close(&mut self, ip: IpAddr) {
        if !self.enabled() {
            return;
        }
        let key = ClientKey::of(ip);
        if let Some(c) = self.clients.get_mut(&key) {
            c.open = c.open.saturating_sub(1);
            if c.open == 0 && c.tat.is_none() {
                self.clients.remove(&key);
            }
        }
    }

    /// Connections open from `ip`'s group.
    pub fn open(&self, ip: IpAddr) -> u32 {
        self.clients.get(&ClientKey::of(ip)).map_or(0, |c| c.open)
    }

    /// Clients remembered.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// True when no client is remembered.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Forgets clients with nothing open whose bucket is full again.
    fn sweep(&mut self, now: Instant) {
        self.clients.retain(|_, c| c.open > 0 || c.tat.is_some_and(|t| t > now));
        self.sweep_at = (self.clients.len() * 2).max(1024);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn open_connections_per_client() {
        let t0 = Instant::now();
        let mut l = ConnectionLimiter::new(ClientLimits { max_open: 2, per_minute: 0 });
        assert_eq!(l.admit(ip("192.0.2.1"), t0), Admission::Admit);
        assert_eq!(l.admit(ip("192.0.2.1"), t0), Admission::Admit);
        assert_eq!(l.admit(ip("192.0.2.1"), t0), Admission::TooMany);
        assert_eq!(l.admit(ip("::ffff:192.0.2.1"), t0), Admission::TooMany);
        assert_eq!(l.admit(ip("192.0.2.2"), t0), Admission::Admit);
        l.close(ip("192.0.2.1"));
        assert_eq!(l.open(ip("192.0.2.1")), 1);
        assert_eq!(l.admit(ip("192.0.2.1"), t0), Admission::Admit);
        // IPv6 counts per /64.
        assert_eq!(l.admit(ip("2001:db8::1"), t0), Admission::Admit);
        assert_eq!(l.admit(ip("2001:db8::2"), t0), Admission::Admit);
        assert_eq!(l.admit(ip("2001:db8::3"), t0), Admission::TooMany);
        assert_eq!(l.admit(ip("2001:db8:0:1::3"), t0), Admission::Admit);
        // Closed down to nothing: forgotten.
        for a in ["192.0.2.1", "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2", "2001:db8:0:1::3"] {
            l.close(ip(a));
        }
        assert!(l.is_empty());
        // A close for a client never admitted is harmless.
        l.close(ip("192.0.2.9"));
        assert!(l.is_empty());
    }

    #[test]
    fn connection_rate_per_client() {
        let t0 = Instant::now();
        let mut l = ConnectionLimiter::new(ClientLimits { max_open: 0, per_minute: 6 });
        let a = ip("192.0.2.1");
        // A minute's worth at once, then one per 10 s.
        for _ in 0..6 {
            assert_eq!(l.admit(a, t0), Admission::Admit);
            l.close(a);
        }
        assert_eq!(l.admit(a, t0), Admission::TooFast);
        assert_eq!(l.admit(a, t0 + Duration::from_secs(9)), Admission::TooFast);
        assert_eq!(l.admit(a, t0 + Duration::from_secs(10)), Admission::Admit);
        assert_eq!(l.admit(a, t0 + Duration::from_secs(11)), Admission::TooFast);
        assert_eq!(l.admit(ip("192.0.2.2"), t0), Admission::Admit);
        // Refusals are not counted: after a quiet minute the bucket is full again.
        let later = t0 + Duration::from_secs(80);
        for _ in 0..6 {
            assert_eq!(l.admit(a, later), Admission::Admit);
        }
        assert_eq!(l.admit(a, later), Admission::TooFast);
    }

    #[test]
    fn off_and_sweep() {
        let t0 = Instant::now();
        let mut off = ConnectionLimiter::new(ClientLimits::default());
        assert!(!off.enabled());
        for _ in 0..1000 {
            assert_eq!(off.admit(ip("192.0.2.1"), t0), Admission::Admit);
        }
        assert!(off.is_empty());
        let mut l = ConnectionLimiter::new(ClientLimits { max_open: 0, per_minute: 60 });
        // Clients whose bucket is not full yet are remembered, then swept once it is.
        let later = t0 + Duration::from_secs(61);
        for i in 0..2600u32 {
            let a = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            assert_eq!(l.admit(a, if i < 1500 { t0 } else { later }), Admission::Admit);
            l.close(a);
        }
        assert!(l.len() < 1500, "{}", l.len());
    }
}
