//! Pure: one destination's state — how to reach it (its route), its connections, which
//! address is next, and the backoff after every address failed.

use std::net::SocketAddr;

use super::sources::Source;
use crate::smtp::reply::Reply;

/// Backoff after every address of a destination failed to connect (capped by the first retry
/// delay).
pub(super) const DEST_BACKOFF_MS: u64 = 30_000;
/// How long a looked-up route is used before it is looked up again.
pub(super) const ROUTE_TTL_MS: u64 = 300_000;
/// How long a failed lookup stands before it is tried again.
pub(super) const FAILED_ROUTE_TTL_MS: u64 = 60_000;

/// How to reach a destination.
#[derive(Debug, Clone)]
pub(super) enum Route {
    /// Not looked up yet.
    Unknown,
    /// A lookup is under way.
    Resolving,
    /// Addresses in the order to try, with their host names.
    Ready { addrs: Vec<(Box<str>, SocketAddr)>, until_ms: u64 },
    /// The lookup failed: every ready job gets `reply` (a bounce when `permanent`).
    Failed { reply: Reply, permanent: bool, until_ms: u64 },
}

impl Route {
    /// The route as a destination reached from egress source `source` sees it: only the
    /// addresses of the source's family, in their order (a socket bound to the source cannot
    /// reach the others). Without a source the kernel picks the local address, and every
    /// address stays. `Err` with the mail exchangers' names when none is left: there is no
    /// way to the destination from this source.
    pub fn seen_from(&self, source: Option<&Source>) -> Result<Route, String> {
        let (Route::Ready { addrs, until_ms }, Some(src)) = (self, source) else { return Ok(self.clone()) };
        let kept: Vec<(Box<str>, SocketAddr)> = addrs.iter().filter(|(_, a)| src.reaches(a.ip())).cloned().collect();
        if !kept.is_empty() || addrs.is_empty() {
            return Ok(Route::Ready { addrs: kept, until_ms: *until_ms });
        }
        let mut hosts: Vec<&str> = addrs.iter().map(|(h, _)| &**h).collect();
        hosts.dedup();
        Err(hosts.join(", "))
    }
}

/// What a failed connection attempt means for the destination.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ConnectFailed {
    /// Not the current address any more (several connections to one address fail together),
    /// or another address is left to try: serve the destination again.
    TryAgain,
    /// Every address failed in turn: the destination is down until the backoff ends.
    Down,
}

/// One destination.
#[derive(Debug)]
pub(super) struct DestState {
    pub route: Route,
    /// Its shaping site, once the route is known.
    pub site: Option<super::sites::SiteId>,
    /// Connections open or opening.
    pub conns: u32,
    /// Of those, connections not ready yet (connecting, greeting, EHLO, STARTTLS): each will
    /// take a ready job, so they count against the jobs that still need a connection.
    pub opening: u32,
    /// Connections ready and without work (slab key, generation).
    pub idle: Vec<(u32, u32)>,
    /// Address to connect to next: the first (most preferred) until it fails, then the next
    /// one (RFC 5321 §5.1: backup MX hosts only when the better ones do not answer).
    pub next_addr: usize,
    /// Consecutive connect failures.
    pub failures: usize,
    /// No new connection before this time (Unix ms): every address just failed.
    pub backoff_until_ms: u64,
    /// Why (the last connection failure), given to work that arrives meanwhile.
    pub backoff_reply: Option<Reply>,
    /// The reply of the last settled job, for `sluice queue summary`.
    pub last_reply: Option<Reply>,
    /// It was down: one connection probes it before others follow (cleared by a greeting).
    pub probing: bool,
    /// The engine's wake-up for it still pending, if any (one at a time: see `Engine::wake`).
    pub wake_at: Option<std::time::Instant>,
}

impl DestState {
    pub fn new() -> DestState {
        DestState {
            route: Route::Unknown,
            site: None,
            conns: 0,
            opening: 0,
            idle: Vec::new(),
            next_addr: 0,
            failures: 0,
            backoff_until_ms: 0,
            backoff_reply: None,
            last_reply: None,
            probing: false,
            wake_at: None,
        }
    }

    /// A new route: addresses are tried from the first again.
    pub fn set_route(&mut self, route: Route) {
        self.route = route;
        self.next_addr = 0;
        self.failures = 0;
    }

    /// Forgets a route whose time is up (looked up again on the next serve; open connections
    /// go on, new ones wait for the answer).
    pub fn expire_route(&mut self, now_ms: u64) {
        match self.route {
            Route::Ready { until_ms, .. } | Route::Failed { until_ms, .. } if until_ms <= now_ms => {
                self.route = Route::Unknown;
            }
            _ => {}
        }
    }

    /// The address to open next: (index in the route, host name, address).
    pub fn next_address(&self) -> Option<(usize, &str, SocketAddr)> {
        let Route::Ready { addrs, .. } = &self.route else { return None };
        if addrs.is_empty() {
            return None;
        }
        let index = self.next_addr % addrs.len();
        let (host, addr) = &addrs[index];
        Some((index, host, *addr))
    }

    /// A connection to address `addr_index` failed before the session was ready: move on to
    /// the next address, and when every address failed in a row, back off for `backoff_ms`
    /// remembering `reply`.
    pub fn connect_failed(&mut self, addr_index: usize, reply: &Reply, now_ms: u64, backoff_ms: u64) -> ConnectFailed {
        let n = match &self.route {
            Route::Ready { addrs, .. } => addrs.len().max(1),
            _ => 1,
        };
        // Several connections to one address fail together: count the address once, and only
        // while it is still the current one.
        if addr_index % n != self.next_addr % n {
            return ConnectFailed::TryAgain;
        }
        self.failures += 1;
        self.next_addr = self.next_addr.wrapping_add(1);
        if self.failures < n {
            return ConnectFailed::TryAgain;
        }
        self.failures = 0;
        self.backoff_until_ms = now_ms + backoff_ms;
        self.backoff_reply = Some(reply.clone());
        self.probing = true;
        ConnectFailed::Down
    }

    /// The host talked SMTP: the failure count starts over.
    pub fn greeted(&mut self) {
        self.failures = 0;
        self.probing = false;
        self.opening = self.opening.saturating_sub(1);
    }

    /// A queue flush: the backoff, failure count and a failed route are forgotten. True when
    /// something was held back.
    pub fn reset(&mut self) -> bool {
        let failed_route = matches!(self.route, Route::Failed { .. });
        let held = self.backoff_until_ms > 0 || self.failures > 0 || failed_route;
        self.backoff_until_ms = 0;
        self.backoff_reply = None;
        self.failures = 0;
        self.next_addr = 0;
        if failed_route {
            self.route = Route::Unknown;
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::LocalFault;

    fn ready(n: usize) -> Route {
        let addrs = (0..n).map(|i| (Box::from(format!("mx{i}.test")), SocketAddr::from(([192, 0, 2, i as u8], 25))));
        Route::Ready { addrs: addrs.collect(), until_ms: 1_000 }
    }

    #[test]
    fn a_source_sees_only_the_addresses_of_its_family() {
        let v4 = |i: u8| SocketAddr::from(([192, 0, 2, i], 25));
        let v6 = |i: u16| SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, i], 25));
        let route = |addrs: &[(&str, SocketAddr)]| Route::Ready {
            addrs: addrs.iter().map(|&(h, a)| (Box::from(h), a)).collect(),
            until_ms: 7,
        };
        let addrs = |r: Result<Route, String>| match r {
            Ok(Route::Ready { addrs, until_ms: 7 }) => Ok(addrs.into_iter().map(|(_, a)| a).collect::<Vec<_>>()),
            Ok(other) => panic!("{other:?}"),
            Err(hosts) => Err(hosts),
        };
        let src = |ip: &str| Source { name: "s".into(), ip: ip.parse().unwrap(), ehlo: None };
        let (s4, s6) = (src("198.51.100.1"), src("2001:db8::1"));
        let mixed = route(&[("mx1.test", v6(1)), ("mx1.test", v4(1)), ("mx2.test", v4(2)), ("mx2.test", v6(2))]);
        // In order, each family its own.
        assert_eq!(addrs(mixed.seen_from(Some(&s4))), Ok(vec![v4(1), v4(2)]));
        assert_eq!(addrs(mixed.seen_from(Some(&s6))), Ok(vec![v6(1), v6(2)]));
        // No source: the kernel picks, both families are tried as they come.
        assert_eq!(addrs(mixed.seen_from(None)), Ok(vec![v6(1), v4(1), v4(2), v6(2)]));
        // Nothing of the source's family: the hosts, for the reply.
        let only6 = route(&[("mx1.test", v6(1)), ("mx1.test", v6(3)), ("mx2.test", v6(2))]);
        assert_eq!(addrs(only6.seen_from(Some(&s4))), Err("mx1.test, mx2.test".into()));
        // A route that is not ready is left as it is.
        assert!(matches!(Route::Resolving.seen_from(Some(&s4)), Ok(Route::Resolving)));
    }

    #[test]
    fn every_address_fails_once_before_the_destination_is_down() {
        let mut d = DestState::new();
        d.set_route(ready(2));
        let why = LocalFault::DestinationDown.reply();
        assert_eq!(d.next_address().map(|a| a.0), Some(0));
        assert_eq!(d.connect_failed(0, &why, 10, 500), ConnectFailed::TryAgain);
        assert_eq!(d.next_address().map(|a| a.0), Some(1));
        // A second connection to the first address failing late does not count again.
        assert_eq!(d.connect_failed(0, &why, 10, 500), ConnectFailed::TryAgain);
        assert_eq!(d.connect_failed(1, &why, 10, 500), ConnectFailed::Down);
        assert_eq!((d.backoff_until_ms, d.backoff_reply.as_ref()), (510, Some(&why)));
        assert!(d.reset());
        assert_eq!((d.backoff_until_ms, d.failures, d.next_addr), (0, 0, 0));
        d.expire_route(1_000);
        assert!(matches!(d.route, Route::Unknown));
    }
}
