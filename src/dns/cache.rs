//! Pure: the DNS answer cache shared by every delivery (RFC 1035 §7.4, RFC 2308 negative
//! caching).
//!
//! Owns: positive answers (an MX set, an address set) and negative ones (NXDOMAIN, NODATA, and
//! briefly a server failure) keyed by (canonical name, type), each with an expiry computed from
//! the answer's TTL clamped to a floor and a ceiling. Must never: read the clock (`now` is an
//! argument), grow without bound (it holds at most `capacity` names), or hand out an expired
//! entry.
//!
//! The floor keeps a bulk relay from re-asking a name with TTL 0 for every message; the
//! ceilings bound how long a mistake in someone's zone (or a spoofed answer) can stick.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::resolver::DnsError;
use super::wire::QType;

/// Shortest time any answer is kept, seconds (a TTL of 0 still serves one burst of mail).
pub const TTL_FLOOR_S: u32 = 5;
/// Longest time a positive answer is kept, seconds (one day, as Unbound's `cache-max-ttl`).
pub const TTL_CEILING_S: u32 = 86_400;
/// Longest time a negative answer is kept, seconds (RFC 2308 §5 suggests one to three hours).
pub const NEGATIVE_TTL_CEILING_S: u32 = 3_600;
/// Negative TTL when the answer carries no SOA (RFC 2308 §5 says not to cache at all; the
/// floor is the least caching that still absorbs a burst).
pub const NEGATIVE_TTL_DEFAULT_S: u32 = TTL_FLOOR_S;
/// How long a server failure or timeout is remembered, seconds (RFC 2308 §7.1 allows up to
/// five minutes; short, so the next retry of a deferred message asks again).
pub const FAILURE_TTL_S: u32 = TTL_FLOOR_S;
/// Default number of names held.
pub const DEFAULT_CAPACITY: usize = 65_536;

/// The outcome of one question (after following CNAMEs), as cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// The MX set: (preference, canonical exchange); an empty exchange is a null MX.
    Mx(Vec<(u16, String)>),
    /// The A or AAAA set.
    Addrs(Vec<IpAddr>),
    /// The name exists but has no records of this type (RFC 2308 §2.2).
    NoData,
    /// The name does not exist (RFC 2308 §2.1).
    NxDomain,
    /// A temporary failure: SERVFAIL, REFUSED, timeout, or an unusable answer.
    Failed(DnsError),
}

impl Cached {
    /// The TTL actually applied for an answer whose records said `ttl_s` seconds.
    pub fn clamp_ttl(&self, ttl_s: u32) -> u32 {
        match self {
            Cached::Mx(_) | Cached::Addrs(_) => ttl_s.clamp(TTL_FLOOR_S, TTL_CEILING_S),
            Cached::NoData | Cached::NxDomain => ttl_s.clamp(TTL_FLOOR_S, NEGATIVE_TTL_CEILING_S),
            Cached::Failed(_) => FAILURE_TTL_S,
        }
    }
}

#[derive(Debug, Default)]
struct Slots([Option<(Instant, Cached)>; 3]);

impl Slots {
    fn latest_expiry(&self) -> Option<Instant> {
        self.0.iter().flatten().map(|(t, _)| *t).max()
    }
}

/// A bounded TTL cache of [`Cached`] answers keyed by (canonical name, [`QType`]).
#[derive(Debug)]
pub struct Cache {
    names: HashMap<String, Slots>,
    capacity: usize,
}

impl Default for Cache {
    fn default() -> Cache {
        Cache::new(DEFAULT_CAPACITY)
    }
}

impl Cache {
    /// An empty cache holding at most `capacity` names (0 disables caching).
    pub fn new(capacity: usize) -> Cache {
        Cache { names: HashMap::with_capacity(capacity.min(1024)), capacity }
    }

    /// The live entry for `name` (canonical) and `qtype`, if any.
    pub fn get(&self, now: Instant, name: &str, qtype: QType) -> Option<&Cached> {
        match self.names.get(name)?.0[qtype.index()].as_ref() {
            Some((expires, v)) if *expires > now => Some(v),
            _ => None,
        }
    }

    /// Stores `value` for `name` (canonical) and `qtype`; `ttl_s` is clamped by
    /// [`Cached::clamp_ttl`]. Returns the expiry.
    pub fn put(&mut self, now: Instant, name: &str, qtype: QType, value: Cached, ttl_s: u32) -> Instant {
        let expires = now + Duration::from_secs(u64::from(value.clamp_ttl(ttl_s)));
        if self.capacity == 0 {
            return expires;
        }
        if !self.names.contains_key(name) && self.names.len() >= self.capacity {
            self.evict(now);
        }
        self.names.entry(name.to_owned()).or_default().0[qtype.index()] = Some((expires, value));
        expires
    }

    /// Number of names held (live or not yet purged).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Makes room: drops every expired entry, and if that frees nothing, the eighth of the
    /// names that expire soonest. O(n), but it runs once per n/8 insertions at most.
    fn evict(&mut self, now: Instant) {
        self.names.retain(|_, s| {
            for slot in &mut s.0 {
                if slot.as_ref().is_some_and(|(t, _)| *t <= now) {
                    *slot = None;
                }
            }
            s.latest_expiry().is_some()
        });
        if self.names.len() < self.capacity {
            return;
        }
        let mut expiries: Vec<Instant> = self.names.values().filter_map(Slots::latest_expiry).collect();
        let nth = expiries.len() / 8;
        let (_, cut, _) = expiries.select_nth_unstable(nth);
        let cut = *cut;
        self.names.retain(|_, s| s.latest_expiry().is_some_and(|t| t > cut));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // Fake time needs one real base instant; the code under test never reads the clock.
    use std::time::Instant;

    fn t0() -> Instant {
        Instant::now()
    }

    fn addrs(s: &str) -> Cached {
        Cached::Addrs(vec![s.parse().unwrap()])
    }

    #[test]
    fn honours_ttl_between_floor_and_ceiling() {
        let t0 = t0();
        let mut c = Cache::new(16);
        c.put(t0, "a.example", QType::A, addrs("192.0.2.1"), 60);
        assert_eq!(c.get(t0, "a.example", QType::A), Some(&addrs("192.0.2.1")));
        assert_eq!(c.get(t0, "a.example", QType::Aaaa), None);
        assert_eq!(c.get(t0, "b.example", QType::A), None);
        assert!(c.get(t0 + Duration::from_secs(59), "a.example", QType::A).is_some());
        assert!(c.get(t0 + Duration::from_secs(60), "a.example", QType::A).is_none());

        // TTL 0 still lives for the floor; a week is cut to a day.
        c.put(t0, "zero.example", QType::Mx, Cached::Mx(vec![(10, "mx.zero.example".into())]), 0);
        assert!(c.get(t0 + Duration::from_secs(4), "zero.example", QType::Mx).is_some());
        assert!(c.get(t0 + Duration::from_secs(5), "zero.example", QType::Mx).is_none());
        let e = c.put(t0, "long.example", QType::A, addrs("192.0.2.2"), 7 * 86_400);
        assert_eq!(e, t0 + Duration::from_secs(86_400));
    }

    #[test]
    fn negative_and_failure_ttls() {
        let t0 = t0();
        let mut c = Cache::new(16);
        let e = c.put(t0, "nx.example", QType::Mx, Cached::NxDomain, 86_400);
        assert_eq!(e, t0 + Duration::from_secs(u64::from(NEGATIVE_TTL_CEILING_S)));
        let e = c.put(t0, "nodata.example", QType::Aaaa, Cached::NoData, 30);
        assert_eq!(e, t0 + Duration::from_secs(30));
        assert_eq!(c.get(t0 + Duration::from_secs(29), "nodata.example", QType::Aaaa), Some(&Cached::NoData));
        let e = c.put(t0, "broken.example", QType::Mx, Cached::Failed(DnsError::ServFail), 86_400);
        assert_eq!(e, t0 + Duration::from_secs(u64::from(FAILURE_TTL_S)));
    }

    #[test]
    fn bounded_with_eviction() {
        let t0 = t0();
        let mut c = Cache::new(8);
        for i in 0..8u32 {
            c.put(t0, &format!("h{i}.example"), QType::A, addrs("192.0.2.1"), 100 + i);
        }
        assert_eq!(c.len(), 8);
        // Full of live entries: the soonest to expire goes.
        c.put(t0, "new.example", QType::A, addrs("192.0.2.9"), 300);
        assert!(c.len() <= 8);
        assert!(c.get(t0, "h0.example", QType::A).is_none());
        assert!(c.get(t0, "h7.example", QType::A).is_some());
        assert!(c.get(t0, "new.example", QType::A).is_some());
        // Expired entries are purged first.
        let later = t0 + Duration::from_secs(200);
        for i in 0..20u32 {
            c.put(later, &format!("x{i}.example"), QType::A, addrs("192.0.2.3"), 60);
            assert!(c.len() <= 8);
        }
        assert!(c.get(later, "x19.example", QType::A).is_some());
        // A second type for a held name needs no room.
        let mut c = Cache::new(1);
        c.put(t0, "one.example", QType::A, addrs("192.0.2.1"), 60);
        c.put(t0, "one.example", QType::Aaaa, Cached::NoData, 60);
        assert_eq!(c.len(), 1);
        assert!(c.get(t0, "one.example", QType::A).is_some());
        // Capacity 0 caches nothing.
        let mut c = Cache::new(0);
        c.put(t0, "a.example", QType::A, addrs("192.0.2.1"), 60);
        assert!(c.is_empty());
    }
}
