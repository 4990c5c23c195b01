//! Pure: the live state of traffic shaping — each site's effective limits (rules plus a
//! running automation), its connections, its message and connection buckets, and the
//! suspensions in force (manual by domain or provider, automatic by site).
//!
//! The engine asks before it acts: may this site open a connection now, may it start a
//! transaction now, is this destination suspended; and when not, until when. It tells this
//! module about replies ([`Sites::on_reply`]: automation) and connections opened and closed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::queue::DestId;
use crate::shaping::{AutoAction, Bucket, Limits, OutboundTls, Rules, Scope, SiteKey, Suspension};

/// A site's index.
pub type SiteId = u32;

/// Transactions per connection when no rule sets `max_deliveries_per_connection`.
pub const DEFAULT_MAX_DELIVERIES: u32 = 1000;
/// Connections a site gets before its first delivery, and again after automation acted on it
/// (a slow start, as Postfix's `initial_destination_concurrency`): a receiver that refuses
/// everything sees a couple of transactions, not one per allowed connection. Each delivery
/// allows one more, up to the site's limit.
pub const INITIAL_CONNECTIONS: u32 = 2;

/// What the command line gives shaping.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// `--domain-concurrency`: the connection limit no rule sets.
    pub connection_limit: u32,
    /// `--outbound-tls`: the TLS mode no rule sets.
    pub tls: OutboundTls,
}

/// Limits in force, every key resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    /// Connections at once.
    pub connection_limit: u32,
    /// Transactions per connection.
    pub max_deliveries: u32,
    /// STARTTLS policy.
    pub tls: OutboundTls,
}

/// A suspension or throttle with its end.
#[derive(Debug, Clone)]
struct Hold {
    until_ms: u64,
    reason: String,
    manual: bool,
}

/// An automation throttle in force.
#[derive(Debug, Clone)]
struct Throttle {
    limits: Limits,
    until_ms: u64,
    reason: String,
}

/// One site.
#[derive(Debug)]
struct Site {
    key: SiteKey,
    /// The egress source it is reached from (`0` also without sources).
    source: u16,
    eff: Effective,
    conns: u32,
    /// Connections allowed by the slow start (see [`INITIAL_CONNECTIONS`]).
    ramp: u32,
    msgs: Option<Bucket>,
    connects: Option<Bucket>,
    throttle: Option<Throttle>,
    suspended: Option<Hold>,
    /// Destinations with ready work that waited for this site (a limit, a token, a
    /// suspension): served again when it frees up.
    waiting: Vec<DestId>,
}

/// A change of shaping state, for the log (`event=suspend|throttle|resume`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `suspend`, `throttle` or `resume`.
    pub event: &'static str,
    /// The site (or the scope of a manual suspension).
    pub site: String,
    /// Why.
    pub reason: String,
    /// Until (Unix ms); 0 for a resume.
    pub until_ms: u64,
    /// The egress source of the site it is about (sites are per (source, site), and the
    /// lines say `source=NAME`); `None` for an operator's scope, which covers every source.
    pub source: Option<u16>,
}

/// Why a destination cannot be served now, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    /// Suspended (the reason for logs and expiry bounces).
    Suspended {
        /// Until (Unix ms).
        until_ms: u64,
        /// The site or scope.
        site: String,
        /// Why.
        reason: String,
    },
}

/// Every site and suspension.
#[derive(Debug)]
pub struct Sites {
    rules: Rules,
    defaults: Defaults,
    sites: Vec<Site>,
    /// Sites by (egress source, key): limits, buckets and automation are per source, as
    /// receivers judge each sending address on its own.
    by_key: HashMap<(u16, SiteKey), SiteId>,
    domains: HashMap<Box<str>, Hold>,
    providers: HashMap<Box<str>, Hold>,
    /// The earliest end of a throttle or suspension (Unix ms), kept current on every change.
    next_end: Option<u64>,
}

impl Sites {
    /// No sites yet.
    pub fn new(rules: Rules, defaults: Defaults) -> Sites {
        Sites {
            rules,
            defaults,
            sites: Vec::new(),
            by_key: HashMap::new(),
            domains: HashMap::new(),
            providers: HashMap::new(),
            next_end: None,
        }
    }

    /// New rules (a reload): limits of every site apply at once; a site keeps its connections,
    /// buckets (at the new rate) and automation state.
    pub fn set_rules(&mut self, rules: Rules, now: Instant) {
        self.rules = rules;
        for id in 0..self.sites.len() as SiteId {
            self.recompute(id, now);
        }
    }

    /// The site of a destination reached from egress source `source`, made on first use.
    pub fn site_for(&mut self, source: u16, domain: &str, mx: &[&str], relay: Option<&str>, now: Instant) -> SiteId {
        let key = self.rules.site_key(domain, mx, relay);
        if let Some(&id) = self.by_key.get(&(source, key.clone())) {
            return id;
        }
        let id = self.sites.len() as SiteId;
        self.sites.push(Site {
            key: key.clone(),
            source,
            eff: Effective { connection_limit: 1, max_deliveries: 1, tls: OutboundTls::None },
            conns: 0,
            ramp: INITIAL_CONNECTIONS,
            msgs: None,
            connects: None,
            throttle: None,
            suspended: None,
            waiting: Vec::new(),
        });
        self.by_key.insert((source, key), id);
        self.recompute(id, now);
        id
    }

    /// The site's name.
    pub fn name(&self, id: SiteId) -> &str {
        self.sites[id as usize].key.name()
    }

    /// The site's limits in force.
    pub fn effective(&self, id: SiteId) -> Effective {
        self.sites[id as usize].eff
    }

    /// Resolves a site's limits: rules, then its throttle on top; buckets follow.
    fn recompute(&mut self, id: SiteId, now: Instant) {
        let s = &mut self.sites[id as usize];
        let mut limits = self.rules.limits(&s.key);
        if let Some(t) = &s.throttle {
            limits = t.limits.over(&limits);
        }
        s.eff = Effective {
            connection_limit: limits.connection_limit.unwrap_or(self.defaults.connection_limit).max(1),
            max_deliveries: limits.max_deliveries_per_connection.unwrap_or(DEFAULT_MAX_DELIVERIES).max(1),
            tls: limits.tls.unwrap_or(self.defaults.tls),
        };
        for (bucket, rate) in [(&mut s.msgs, limits.max_message_rate), (&mut s.connects, limits.max_connection_rate)] {
            match (bucket.as_mut(), rate) {
                (_, None) => *bucket = None,
                (Some(b), Some(r)) if b.rate() != r => b.set_rate(r, now),
                (Some(_), Some(_)) => {}
                (None, Some(r)) => *bucket = Some(Bucket::new(r, now)),
            }
        }
    }

    /// A connection of the site opened (it takes a connection token).
    pub fn opened(&mut self, id: SiteId, now: Instant) {
        let s = &mut self.sites[id as usize];
        s.conns += 1;
        if let Some(b) = s.connects.as_mut() {
            b.take(now);
        }
    }

    /// A connection of the site closed: destinations that waited for a slot are returned.
    pub fn closed(&mut self, id: SiteId) -> Vec<DestId> {
        let s = &mut self.sites[id as usize];
        s.conns = s.conns.saturating_sub(1);
        std::mem::take(&mut s.waiting)
    }

    /// A transaction of the site delivered: the slow start allows one more connection (true
    /// when it did).
    pub fn delivered(&mut self, id: SiteId) -> bool {
        let s = &mut self.sites[id as usize];
        let ramp = s.ramp.saturating_add(1).min(s.eff.connection_limit.max(INITIAL_CONNECTIONS));
        std::mem::replace(&mut s.ramp, ramp) != ramp
    }

    /// Connections open or opening.
    pub fn conns(&self, id: SiteId) -> u32 {
        self.sites[id as usize].conns
    }

    /// `dest` waits for the site.
    pub fn wait(&mut self, id: SiteId, dest: DestId) {
        let w = &mut self.sites[id as usize].waiting;
        if !w.contains(&dest) {
            w.push(dest);
        }
    }

    /// Destinations that waited for the site (at a wake-up).
    pub fn take_waiting(&mut self, id: SiteId) -> Vec<DestId> {
        std::mem::take(&mut self.sites[id as usize].waiting)
    }

    /// How many new connections the site may open now (limit and connection rate), and, when
    /// the rate is what stops it, when the next may.
    pub fn may_open(&mut self, id: SiteId, now: Instant) -> (u32, Option<Instant>) {
        let s = &mut self.sites[id as usize];
        let free = s.eff.connection_limit.min(s.ramp).saturating_sub(s.conns);
        match s.connects.as_mut() {
            Some(b) if free > 0 => {
                let n = free.min(b.available(now) as u32);
                (n, (n == 0).then(|| b.ready_at(now)))
            }
            _ => (free, None),
        }
    }

    /// Takes a message token: `Err(when)` if there is none before then.
    pub fn take_message(&mut self, id: SiteId, now: Instant) -> Result<(), Instant> {
        match self.sites[id as usize].msgs.as_mut() {
            Some(b) => match b.take(now) {
                true => Ok(()),
                false => Err(b.ready_at(now)),
            },
            None => Ok(()),
        }
    }

    /// Gives back a message token taken for a job that was not there.
    pub fn refund_message(&mut self, id: SiteId) {
        if let Some(b) = self.sites[id as usize].msgs.as_mut() {
            b.put_back();
        }
    }

    /// Whole message tokens there now (`u64::MAX`: no rate).
    pub fn message_tokens(&mut self, id: SiteId, now: Instant) -> u64 {
        self.sites[id as usize].msgs.as_mut().map_or(u64::MAX, |b| b.available(now))
    }

    /// A destination other than `dest` waits for the site.
    pub fn has_waiting_except(&self, id: SiteId, dest: DestId) -> bool {
        self.sites[id as usize].waiting.iter().any(|&d| d != dest)
    }

    /// Whether a message token is there (without taking it).
    pub fn message_ready(&mut self, id: SiteId, now: Instant) -> Result<(), Instant> {
        match self.sites[id as usize].msgs.as_mut() {
            Some(b) => match b.available(now) {
                0 => Err(b.ready_at(now)),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Whether recipient domain `domain` of site `site` (if routed) is suspended at `now_ms`:
    /// the latest end of the suspensions that apply.
    pub fn blocked(&self, site: Option<SiteId>, domain: &str, now_ms: u64) -> Option<Blocked> {
        let mut best: Option<(u64, String, String)> = None;
        let mut consider = |h: &Hold, site: String| {
            if h.until_ms > now_ms && best.as_ref().is_none_or(|(u, _, _)| h.until_ms > *u) {
                best = Some((h.until_ms, site, h.reason.clone()));
            }
        };
        // Asked before every transaction: no allocation unless a domain is suspended and the
        // name is not in lower case already.
        let held = match self.domains.is_empty() {
            true => None,
            false if domain.bytes().any(|b| b.is_ascii_uppercase()) => self.domains.get(&*domain.to_ascii_lowercase()),
            false => self.domains.get(domain),
        };
        if let Some(h) = held {
            consider(h, domain.to_owned());
        }
        if let Some(s) = site.map(|id| &self.sites[id as usize]) {
            if let Some(h) = &s.suspended {
                consider(h, s.key.name().to_owned());
            }
            if let Some(h) = s.key.provider().and_then(|p| self.providers.get(p)) {
                consider(h, s.key.name().to_owned());
            }
        }
        best.map(|(until_ms, site, reason)| Blocked::Suspended { until_ms, site, reason })
    }

    /// A failure reply (`code ≥ 400`, the whole reply as text) from site `id` about `domain`:
    /// the first automation rule that matches throttles or suspends the site, renewing what a
    /// match before it set. Returns the change to log (a renewal is not logged again).
    pub fn on_reply(&mut self, id: SiteId, domain: &str, reply: &str, now: Instant, now_ms: u64) -> Option<Change> {
        let s = &self.sites[id as usize];
        let rule = self.rules.automation_match(s.key.provider(), domain, reply)?;
        let until_ms = now_ms + rule.duration_ms;
        let reason = format!("{} (rule '{}')", reply.trim_end(), rule.pattern);
        let (site, source) = (s.key.name().to_owned(), Some(s.source));
        self.sites[id as usize].ramp = INITIAL_CONNECTIONS;
        match rule.action.clone() {
            AutoAction::Suspend => {
                let s = &mut self.sites[id as usize];
                let renewed = s.suspended.as_ref().is_some_and(|h| h.until_ms > now_ms);
                s.suspended = Some(Hold { until_ms, reason: reason.clone(), manual: false });
                self.refresh();
                (!renewed).then_some(Change { event: "suspend", site, reason, until_ms, source })
            }
            AutoAction::Throttle(limits) => {
                let s = &mut self.sites[id as usize];
                let renewed = s.throttle.as_ref().is_some_and(|t| t.until_ms > now_ms && t.limits == limits);
                s.throttle = Some(Throttle { limits, until_ms, reason: reason.clone() });
                self.recompute(id, now);
                self.refresh();
                (!renewed).then_some(Change { event: "throttle", site, reason, until_ms, source })
            }
        }
    }

    /// Ends the throttles and automatic suspensions whose time is up. Returns the changes, and
    /// the sites to serve again.
    pub fn expire(&mut self, now: Instant, now_ms: u64) -> Vec<(SiteId, Change)> {
        let mut out = Vec::new();
        for id in 0..self.sites.len() as SiteId {
            let s = &mut self.sites[id as usize];
            let (site, source) = (s.key.name().to_owned(), Some(s.source));
            if s.suspended.as_ref().is_some_and(|h| h.until_ms <= now_ms) {
                let h = s.suspended.take().unwrap_or_else(|| unreachable!());
                out.push((
                    id,
                    Change {
                        event: "resume",
                        site: site.clone(),
                        reason: format!("suspension ended: {}", h.reason),
                        until_ms: 0,
                        source,
                    },
                ));
            }
            if s.throttle.as_ref().is_some_and(|t| t.until_ms <= now_ms) {
                let t = s.throttle.take().unwrap_or_else(|| unreachable!());
                self.recompute(id, now);
                out.push((
                    id,
                    Change {
                        event: "resume",
                        site,
                        reason: format!("throttle ended: {}", t.reason),
                        until_ms: 0,
                        source,
                    },
                ));
            }
        }
        self.domains.retain(|_, h| h.until_ms > now_ms);
        self.providers.retain(|_, h| h.until_ms > now_ms);
        self.refresh();
        out
    }

    /// The earliest end of a throttle or suspension (Unix ms).
    pub fn next_end_ms(&self) -> Option<u64> {
        self.next_end
    }

    fn refresh(&mut self) {
        let sites = self.sites.iter().flat_map(|s| {
            [s.suspended.as_ref().map(|h| h.until_ms), s.throttle.as_ref().map(|t| t.until_ms)].into_iter().flatten()
        });
        let manual = self.domains.values().chain(self.providers.values()).map(|h| h.until_ms);
        self.next_end = sites.chain(manual).min();
    }

    /// A suspension by an operator (or re-applied from the spool at start); `Err` names an
    /// unknown provider. Returns the change to log.
    pub fn suspend(&mut self, scope: Scope, until_ms: u64, reason: &str, manual: bool) -> Result<Change, String> {
        let hold = Hold { until_ms, reason: reason.to_owned(), manual };
        let site = scope.to_string();
        match scope {
            Scope::Domain(d) => {
                self.domains.insert(d.to_ascii_lowercase().into(), hold);
            }
            Scope::Provider(p) if !self.rules.has_provider(&p) => return Err(format!("unknown provider `{p}`")),
            Scope::Provider(p) => {
                self.providers.insert(p, hold);
            }
            Scope::Site(name) => {
                // The site from every egress source.
                let mut found = false;
                for s in self.sites.iter_mut().filter(|s| s.key.name() == &*name) {
                    s.suspended = Some(hold.clone());
                    found = true;
                }
                if !found {
                    return Err(format!("unknown site `{name}`"));
                }
            }
        }
        self.refresh();
        Ok(Change { event: "suspend", site, reason: reason.to_owned(), until_ms, source: None })
    }

    /// Lifts a suspension: of the scope, and the automatic one of the site it names (`site`:
    /// a domain's site, when routed; a provider's own site). `None` when there was none.
    pub fn resume(&mut self, scope: &Scope, site: Option<SiteId>) -> Option<Change> {
        let auto = match scope {
            Scope::Domain(_) => site.and_then(|id| self.sites[id as usize].suspended.take()),
            // Every egress source's site of the provider, or of that name.
            Scope::Provider(p) => self
                .sites
                .iter_mut()
                .filter(|s| s.key.provider() == Some(&**p))
                .filter_map(|s| s.suspended.take())
                .last(),
            Scope::Site(name) => {
                self.sites.iter_mut().filter(|s| s.key.name() == &**name).filter_map(|s| s.suspended.take()).last()
            }
        };
        let manual = match scope {
            Scope::Domain(d) => self.domains.remove(&*d.to_ascii_lowercase()),
            Scope::Provider(p) => self.providers.remove(p),
            Scope::Site(_) => None,
        };
        let held = manual.or(auto)?;
        self.refresh();
        Some(Change {
            event: "resume",
            site: scope.to_string(),
            reason: format!("lifted: {}", held.reason),
            until_ms: 0,
            source: None,
        })
    }

    /// Every suspension in force.
    pub fn suspensions(&self, now_ms: u64) -> Vec<Suspension> {
        let mut out = Vec::new();
        let mut push = |scope: Scope, site: String, h: &Hold| {
            if h.until_ms > now_ms {
                out.push(Suspension { scope, site, reason: h.reason.clone(), until_ms: h.until_ms, manual: h.manual });
            }
        };
        for (d, h) in &self.domains {
            push(Scope::Domain(d.clone()), d.to_string(), h);
        }
        for (p, h) in &self.providers {
            push(Scope::Provider(p.clone()), p.to_string(), h);
        }
        for (i, s) in self.sites.iter().enumerate() {
            // One line per site name, however many egress sources reach it.
            let listed = self.sites[..i].iter().any(|o| o.key.name() == s.key.name() && o.suspended.is_some());
            if let (Some(h), false) = (&s.suspended, listed) {
                push(Scope::Site(s.key.name().into()), s.key.name().to_owned(), h);
            }
        }
        out.sort_by_key(|s| s.scope.to_string());
        out
    }
}

/// `until_ms` as a monotonic deadline.
pub fn at_ms(now: Instant, now_ms: u64, until_ms: u64) -> Instant {
    now + Duration::from_millis(until_ms.saturating_sub(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites(file: &str) -> Sites {
        let rules = Rules::load(Some(("f", file)), true).unwrap();
        Sites::new(rules, Defaults { connection_limit: 10, tls: OutboundTls::May })
    }

    #[test]
    fn limits_resolve_with_the_command_line_defaults_and_a_throttle_on_top() {
        let t0 = Instant::now();
        let mut s = sites("[default]\nmax_message_rate = \"100/s\"\n");
        let g = s.site_for(0, "gmail.com", &["aspmx.l.google.com"], None, t0);
        let o = s.site_for(0, "other.test", &["mx.other.test"], None, t0);
        assert_eq!(s.effective(g), Effective { connection_limit: 5, max_deliveries: 50, tls: OutboundTls::Encrypt });
        assert_eq!(
            s.effective(o),
            Effective { connection_limit: 10, max_deliveries: DEFAULT_MAX_DELIVERIES, tls: OutboundTls::May }
        );
        // Same site for a Google-hosted domain.
        assert_eq!(s.site_for(0, "customer.test", &["alt1.aspmx.l.google.com"], None, t0), g);
        // Another egress source reaches it as a site of its own: its own connections, buckets
        // and automation (throttling one source's address leaves the other alone).
        let g2 = s.site_for(1, "gmail.com", &["aspmx.l.google.com"], None, t0);
        assert_ne!(g2, g);
        assert_eq!((s.name(g2), s.effective(g2)), (s.name(g), s.effective(g)));
        let c = s.on_reply(g, "gmail.com", "421 4.7.28 unusual rate", t0, 1_000).unwrap();
        assert_eq!((c.event, c.site.as_str(), c.until_ms), ("throttle", "google", 1_000 + 90 * 60_000));
        assert_eq!(c.source, Some(0), "the line names the site's source");
        // The other source's site is throttled on its own, and its line names that source.
        let c2 = s.on_reply(g2, "gmail.com", "421 4.7.28 unusual rate", t0, 2_000).unwrap();
        assert_eq!((c2.event, c2.source), ("throttle", Some(1)));
        assert_eq!(s.effective(g).connection_limit, 1);
        // A renewal extends it without a second log line.
        assert_eq!(s.on_reply(g, "gmail.com", "421 4.7.28 unusual rate", t0, 2_000), None);
        // The throttle's rate (1/min) replaces the default's (100/s): one token, then a minute.
        assert_eq!(s.take_message(g, t0), Ok(()));
        assert_eq!(s.take_message(g, t0), Err(t0 + Duration::from_secs(60)));
        assert_eq!(s.next_end_ms(), Some(2_000 + 90 * 60_000));
        let ended = s.expire(t0, 2_000 + 90 * 60_000);
        assert_eq!(ended.len(), 2);
        assert_eq!(
            ended.iter().map(|(_, c)| (c.event, c.source)).collect::<Vec<_>>(),
            [("resume", Some(0)), ("resume", Some(1))]
        );
        assert_eq!(s.effective(g).connection_limit, 5);
        // Back to 100/s with what the bucket held.
        assert!(s.take_message(g, t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn connection_limits_and_rates_say_how_many_may_open_and_when() {
        let t0 = Instant::now();
        let mut s = sites("[domain.\"slow.test\"]\nconnection_limit = 3\nmax_connection_rate = \"2/s\"\n");
        let id = s.site_for(0, "slow.test", &["mx.slow.test"], None, t0);
        // The slow start: two until a delivery, then one more per delivery.
        assert_eq!(s.may_open(id, t0), (2, None));
        s.delivered(id);
        s.opened(id, t0);
        s.opened(id, t0);
        assert_eq!(s.may_open(id, t0), (0, Some(t0 + Duration::from_millis(500))));
        assert_eq!(s.may_open(id, t0 + Duration::from_millis(500)), (1, None));
        s.opened(id, t0);
        assert_eq!(s.may_open(id, t0 + Duration::from_secs(5)), (0, None));
        s.wait(id, 7);
        s.wait(id, 7);
        assert_eq!(s.closed(id), vec![7]);
        assert_eq!(s.may_open(id, t0 + Duration::from_secs(5)), (1, None));
    }

    #[test]
    fn suspensions_by_domain_provider_and_automation() {
        let t0 = Instant::now();
        let mut s = sites("");
        let y = s.site_for(0, "yahoo.com", &["mta5.am0.yahoodns.net"], None, t0);
        let o = s.site_for(0, "o.test", &["mx.o.test"], None, t0);
        assert_eq!(s.blocked(Some(y), "yahoo.com", 0), None);
        assert!(s
            .suspend(Scope::Provider("nobody".into()), 10, "x", true)
            .unwrap_err()
            .contains("unknown provider `nobody`"));
        // An operator's scope covers every source: its lines name none.
        assert_eq!(s.suspend(Scope::Provider("yahoo".into()), 5_000, "complaints", true).unwrap().source, None);
        s.suspend(Scope::Domain("O.test".into()), 3_000, "maintenance", true).unwrap();
        assert!(matches!(s.blocked(Some(y), "yahoo.com", 0), Some(Blocked::Suspended { until_ms: 5_000, .. })));
        assert!(matches!(s.blocked(Some(o), "o.test", 0), Some(Blocked::Suspended { until_ms: 3_000, .. })));
        // Another domain on the same MX set is not suspended by a domain suspension.
        assert_eq!(s.blocked(Some(o), "p.test", 0), None);
        // Yahoo's TSS04 suspends the site for two hours; the longer hold wins.
        let c = s.on_reply(y, "yahoo.com", "421 4.7.0 [TSS04] Messages temporarily deferred", t0, 1_000).unwrap();
        assert_eq!((c.event, c.until_ms, c.source), ("suspend", 1_000 + 7_200_000, Some(0)));
        assert!(matches!(s.blocked(Some(y), "yahoo.com", 6_000), Some(Blocked::Suspended { until_ms: 7_201_000, .. })));
        let list = s.suspensions(0);
        assert_eq!(list.len(), 3);
        assert_eq!(list.iter().filter(|x| x.manual).count(), 2);
        // Resuming the provider lifts its manual suspension and the automatic one of its site.
        assert_eq!(s.resume(&Scope::Provider("yahoo".into()), None).unwrap().event, "resume");
        assert_eq!(s.blocked(Some(y), "yahoo.com", 6_000), None);
        assert_eq!(s.resume(&Scope::Provider("yahoo".into()), None), None);
        s.expire(t0, 3_000);
        assert_eq!(s.blocked(Some(o), "o.test", 3_000), None);
    }
}
