//! Pure: egress sources and pools — which local address (and EHLO name) a message leaves
//! from (SPEC "Egress sources, DKIM, authenticated smarthost").
//!
//! Owns: the validated `--source`, `--pool` and `--user-pool` tables ([`Sources::build`]),
//! the pool a message uses ([`Sources::resolve`]: its `X-Sluice-Pool:` header, else its AUTH
//! user's pool, else pool `default`, else every source by equal weight), the weighted choice
//! of one source per message ([`Pool::choose`], a function of the queue id, so every recipient
//! and every retry of a message gets the same source), and finding and cutting the
//! `X-Sluice-Pool:` header out of a message ([`take_pool_header`]). Must never: touch a socket
//! (binding the address is `net::socket`'s), read the clock, or allocate per command.
//!
//! Source and pool indexes are `u16`: index `0` with no source configured means "no source"
//! (the kernel picks the address, EHLO says `--hostname`), exactly the behaviour without
//! `--source`.

use std::net::IpAddr;

/// The header that names a message's pool. Removed before signing and delivery.
pub const POOL_HEADER: &[u8] = b"x-sluice-pool";

/// Index of a source in [`Sources`].
pub type SourceId = u16;

/// One `--source NAME=IP[,ehlo=HOST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Its name (log lines say `source=NAME`; the spool records it).
    pub name: Box<str>,
    /// The local address outbound sockets bind before connecting.
    pub ip: IpAddr,
    /// EHLO name; `None`: `--hostname`.
    pub ehlo: Option<Box<str>>,
}

impl Source {
    /// Whether a connection bound to this source can reach `ip`: only an address of the
    /// source's own family can (a socket bound to an IPv4 address cannot connect to an IPv6
    /// one, nor the other way round: the connect fails with EAFNOSUPPORT or EINVAL).
    pub fn reaches(&self, ip: IpAddr) -> bool {
        self.ip.is_ipv4() == ip.is_ipv4()
    }

    /// `IPv4` or `IPv6`, the source's address family, for reply texts and log lines.
    pub fn family(&self) -> &'static str {
        if self.ip.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        }
    }
}

/// One `--pool NAME=SRC[:WEIGHT],…` with its sources resolved to indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Its name, as `X-Sluice-Pool:` and `--user-pool` give it.
    pub name: Box<str>,
    /// (source, weight), weights ≥ 1.
    pub members: Vec<(SourceId, u32)>,
    /// Sum of the weights.
    total: u64,
}

impl Pool {
    fn new(name: &str, members: Vec<(SourceId, u32)>) -> Pool {
        let total = members.iter().map(|&(_, w)| u64::from(w)).sum();
        Pool { name: name.into(), members, total }
    }

    /// The source of the message with queue id `id`: weighted, and a pure function of the id,
    /// so every recipient, retry and restart of the message agrees. The id is mixed first
    /// (splitmix64 finaliser): queue ids are near-sequential, and their low bits alone would
    /// stripe the pool.
    pub fn choose(&self, id: u64) -> SourceId {
        if self.total == 0 {
            return 0;
        }
        let mut z = id.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Multiply-shift: uniform in 0..total without a modulo bias worth the name.
        let mut pick = ((u128::from(z) * u128::from(self.total)) >> 64) as u64;
        for &(s, w) in &self.members {
            if pick < u64::from(w) {
                return s;
            }
            pick -= u64::from(w);
        }
        self.members.last().map_or(0, |&(s, _)| s)
    }
}

/// Why the sources, pools or user pools given on the command line do not fit together: the
/// flag and the message (exit 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcesError {
    /// The flag at fault.
    pub flag: &'static str,
    /// What is wrong, naming the value.
    pub message: String,
}

/// A message names a pool that is not configured: refused at the end of data (`550 5.7.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownPool<'a>(pub &'a [u8]);

/// `--pool NAME=SRC[:WEIGHT],…` as parsed by the command line, sources still by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// The pool's name.
    pub name: String,
    /// (source name, weight ≥ 1).
    pub members: Vec<(String, u32)>,
}

/// Every source and pool, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    sources: Vec<Source>,
    pools: Vec<Pool>,
    /// (AUTH user, pool index).
    user_pools: Vec<(Box<[u8]>, u16)>,
    /// Every source by equal weight: the pool when none applies and there is no `default`.
    all: Option<Pool>,
}

impl Sources {
    /// Checks the flags against each other: unique source and pool names, pools naming known
    /// sources (once each), user pools naming known pools, one pool per user.
    pub fn build(
        sources: Vec<Source>,
        pools: &[PoolSpec],
        user_pools: &[(String, String)],
    ) -> Result<Sources, SourcesError> {
        let err = |flag, message: String| Err(SourcesError { flag, message });
        if sources.len() > usize::from(u16::MAX) {
            return err("--source", "too many sources".into());
        }
        for (i, s) in sources.iter().enumerate() {
            if sources[..i].iter().any(|o| o.name == s.name) {
                return err("--source", format!("'{}' is given twice", s.name));
            }
        }
        let mut built: Vec<Pool> = Vec::with_capacity(pools.len());
        for p in pools {
            if built.iter().any(|o| *o.name == *p.name) {
                return err("--pool", format!("pool '{}' is given twice", p.name));
            }
            let mut members: Vec<(SourceId, u32)> = Vec::with_capacity(p.members.len());
            for (src, weight) in &p.members {
                let Some(i) = sources.iter().position(|s| *s.name == **src) else {
                    return err("--pool", format!("pool '{}' names unknown source '{src}'", p.name));
                };
                if members.iter().any(|&(m, _)| usize::from(m) == i) {
                    return err("--pool", format!("pool '{}' names source '{src}' twice", p.name));
                }
                members.push((i as SourceId, *weight));
            }
            built.push(Pool::new(&p.name, members));
        }
        let mut users: Vec<(Box<[u8]>, u16)> = Vec::with_capacity(user_pools.len());
        for (user, pool) in user_pools {
            let Some(i) = built.iter().position(|p| *p.name == **pool) else {
                return err("--user-pool", format!("'{user}={pool}' names unknown pool '{pool}'"));
            };
            if users.iter().any(|(u, _)| **u == *user.as_bytes()) {
                return err("--user-pool", format!("user '{user}' is given twice"));
            }
            users.push((user.as_bytes().into(), i as u16));
        }
        let all = (!sources.is_empty()).then(|| {
            let members = (0..sources.len()).map(|i| (i as SourceId, 1)).collect();
            Pool::new("*", members)
        });
        Ok(Sources { sources, pools: built, user_pools: users, all })
    }

    /// No `--source`: the kernel picks the address.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Every source, by index.
    pub fn list(&self) -> &[Source] {
        &self.sources
    }

    /// A source by index (`None` without sources).
    pub fn get(&self, id: SourceId) -> Option<&Source> {
        self.sources.get(usize::from(id))
    }

    /// A source by name.
    pub fn find(&self, name: &[u8]) -> Option<SourceId> {
        self.sources.iter().position(|s| s.name.as_bytes() == name).map(|i| i as SourceId)
    }

    /// The pool of a message: the `X-Sluice-Pool:` value when given (`header`, trusted
    /// clients only: the caller passes `None` for others), else the pool of its AUTH user,
    /// else pool `default`, else every source by equal weight. `Ok(None)` without sources.
    /// A header naming no pool is an error: the message is refused, not sent from a guess.
    pub fn resolve<'a>(&self, header: Option<&'a [u8]>, user: Option<&[u8]>) -> Result<Option<&Pool>, UnknownPool<'a>> {
        if self.sources.is_empty() {
            return match header {
                Some(name) => Err(UnknownPool(name)),
                None => Ok(None),
            };
        }
        if let Some(name) = header {
            return self.pools.iter().find(|p| p.name.as_bytes() == name).map(Some).ok_or(UnknownPool(name));
        }
        if let Some(&(_, i)) = user.and_then(|u| self.user_pools.iter().find(|(n, _)| **n == *u)) {
            return Ok(self.pools.get(usize::from(i)));
        }
        Ok(self.pools.iter().find(|p| &*p.name == "default").or(self.all.as_ref()))
    }

    /// The source of a message handed to delivery: the one its record names when that still
    /// exists, else (no name: a bounce, or a record from before sources; or a source removed
    /// since) a fresh choice from pool `default` or every source. `0` without sources.
    pub fn for_stored(&self, name: &[u8], id: u64) -> SourceId {
        if let Some(i) = (!name.is_empty()).then(|| self.find(name)).flatten() {
            return i;
        }
        match self.resolve(None, None) {
            Ok(Some(pool)) => pool.choose(id),
            _ => 0,
        }
    }
}

/// Finds every `X-Sluice-Pool:` field in the header section of `msg` (RFC 5322 §2.2: name
/// case-insensitive, folded continuation lines belong to the field), cuts them out in place,
/// and returns the first one's value, trimmed, copied into `value` (cleared first). True when
/// one was found. The body after the header section is never looked at; a message without
/// the field costs one scan of its header lines and no copy.
pub fn take_pool_header(msg: &mut Vec<u8>, value: &mut Vec<u8>) -> bool {
    value.clear();
    let mut found = false;
    let mut pos = 0;
    while pos < msg.len() {
        let line_end = memchr::memchr(b'\n', &msg[pos..]).map_or(msg.len(), |i| pos + i + 1);
        let line = &msg[pos..line_end];
        // The empty line that ends the header section.
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let is_pool = line.len() > POOL_HEADER.len()
            && line[..POOL_HEADER.len()].eq_ignore_ascii_case(POOL_HEADER)
            && line[POOL_HEADER.len()..].iter().find(|b| !matches!(b, b' ' | b'\t')) == Some(&b':');
        if !is_pool {
            pos = line_end;
            continue;
        }
        // The field goes on over the continuation lines (starting with white space).
        let mut end = line_end;
        while end < msg.len() && matches!(msg[end], b' ' | b'\t') {
            end = memchr::memchr(b'\n', &msg[end..]).map_or(msg.len(), |i| end + i + 1);
        }
        if !found {
            let colon = pos + memchr::memchr(b':', &msg[pos..end]).unwrap_or(0);
            let raw = &msg[colon + 1..end];
            value.extend(raw.iter().copied().filter(|b| !matches!(b, b'\r' | b'\n')));
            let start = value.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(value.len());
            let end = value.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
            value.truncate(end);
            value.drain(..start);
            found = true;
        }
        msg.drain(pos..end);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, ip: &str) -> Source {
        Source { name: name.into(), ip: ip.parse().unwrap(), ehlo: None }
    }

    fn pool(name: &str, members: &[(&str, u32)]) -> PoolSpec {
        PoolSpec { name: name.into(), members: members.iter().map(|(s, w)| (s.to_string(), *w)).collect() }
    }

    fn two() -> Vec<Source> {
        vec![src("a", "192.0.2.1"), src("b", "192.0.2.2")]
    }

    #[test]
    fn bad_combinations_name_the_flag_and_value() {
        let e = Sources::build(vec![src("a", "192.0.2.1"), src("a", "192.0.2.2")], &[], &[]).unwrap_err();
        assert_eq!(e.flag, "--source");
        assert!(e.message.contains("'a'"), "{e:?}");
        let e = Sources::build(two(), &[pool("p", &[("a", 1), ("zz", 2)])], &[]).unwrap_err();
        assert_eq!(e.flag, "--pool");
        assert!(e.message.contains("'zz'"), "{e:?}");
        let e = Sources::build(two(), &[pool("p", &[("a", 1)]), pool("p", &[("b", 1)])], &[]).unwrap_err();
        assert!(e.message.contains("twice"), "{e:?}");
        let e = Sources::build(two(), &[pool("p", &[("a", 1), ("a", 2)])], &[]).unwrap_err();
        assert!(e.message.contains("twice"), "{e:?}");
        let e = Sources::build(two(), &[pool("p", &[("a", 1)])], &[("u".into(), "q".into())]).unwrap_err();
        assert_eq!(e.flag, "--user-pool");
        assert!(e.message.contains("'q'"), "{e:?}");
        let users = [("u".into(), "p".into()), ("u".into(), "p".into())];
        assert!(Sources::build(two(), &[pool("p", &[("a", 1)])], &users).is_err());
    }

    #[test]
    fn pool_resolution_order() {
        let pools = [pool("bulk", &[("a", 1)]), pool("default", &[("b", 1)])];
        let s = Sources::build(two(), &pools, &[("alice".into(), "bulk".into())]).unwrap();
        let name = |r: Result<Option<&Pool>, UnknownPool<'_>>| r.unwrap().map(|p| p.name.to_string());
        // The header first, then the AUTH user's pool, then `default`.
        assert_eq!(name(s.resolve(Some(b"default"), Some(b"alice"))), Some("default".into()));
        assert_eq!(name(s.resolve(None, Some(b"alice"))), Some("bulk".into()));
        assert_eq!(name(s.resolve(None, Some(b"bob"))), Some("default".into()));
        assert_eq!(name(s.resolve(None, None)), Some("default".into()));
        assert_eq!(s.resolve(Some(b"nope"), None), Err(UnknownPool(b"nope")));
        // No `default` pool: every source by equal weight.
        let s = Sources::build(two(), &[pool("bulk", &[("a", 1)])], &[]).unwrap();
        let all = s.resolve(None, None).unwrap().unwrap();
        assert_eq!(all.members, vec![(0, 1), (1, 1)]);
        // No sources at all: nothing to choose, and a header names an unknown pool.
        let none = Sources::default();
        assert_eq!(none.resolve(None, Some(b"alice")), Ok(None));
        assert!(none.resolve(Some(b"x"), None).is_err());
        assert_eq!(none.for_stored(b"", 7), 0);
    }

    #[test]
    fn weighted_choice_is_stable_and_near_its_weights() {
        let s = Sources::build(two(), &[pool("p", &[("a", 3), ("b", 1)])], &[]).unwrap();
        let p = s.resolve(Some(b"p"), None).unwrap().unwrap();
        let mut counts = [0u32; 2];
        for id in 1_000u64..5_000 {
            let c = p.choose(id);
            assert_eq!(c, p.choose(id), "not a function of the id");
            counts[usize::from(c)] += 1;
        }
        // 3:1 of 4000 is 3000:1000; a fair mix stays well inside ±5 %.
        assert!((2800..3200).contains(&counts[0]), "{counts:?}");
        // A stored name wins; a name no longer configured is chosen afresh.
        assert_eq!(s.for_stored(b"b", 1), 1);
        assert!(s.for_stored(b"gone", 1) < 2);
    }

    #[test]
    fn the_pool_header_is_found_cut_and_trimmed() {
        let mut v = Vec::new();
        let mut m = b"Received: x\r\nX-Sluice-Pool:  bulk \r\nSubject: s\r\n\r\nX-Sluice-Pool: body\r\n".to_vec();
        assert!(take_pool_header(&mut m, &mut v));
        assert_eq!(v, b"bulk");
        assert_eq!(m, b"Received: x\r\nSubject: s\r\n\r\nX-Sluice-Pool: body\r\n");
        // Folded, in another case, twice: the first value, every field removed.
        let mut m = b"x-sluice-pool :\r\n\tp1\r\nA: b\r\nX-SLUICE-POOL: p2\r\n\r\nbody".to_vec();
        assert!(take_pool_header(&mut m, &mut v));
        assert_eq!(v, b"p1");
        assert_eq!(m, b"A: b\r\n\r\nbody");
        // Similar names are other fields.
        let mut m = b"X-Sluice-Pools: a\r\nX-Sluice-Pool-X: b\r\n\r\n".to_vec();
        assert!(!take_pool_header(&mut m, &mut v));
        assert_eq!(m.len(), 41);
    }
}
