//! Pure: traffic shaping rules (SPEC "Traffic shaping") — which *site* a destination belongs
//! to, the limits of each site, the automation that reacts to replies, and the scopes of
//! suspensions. The delivery engine keeps the live state (connections, buckets, overrides);
//! this module only answers questions about the rules.
//!
//! - A site is a provider whose `mx` patterns match one of the destination's MX host names;
//!   otherwise the destination's own MX host set (domains with the same MX hosts share one
//!   site); with `--relay-host`, the relay host. A `[domain]` entry makes each domain it matches
//!   a site of its own.
//! - Limits resolve as `domain` > `provider` > `default` (key by key); a running automation
//!   overrides on top (the engine applies that).
//! - Automation rules are checked in order (the file's first, then the built-in ones) against
//!   every failure reply of a site (code ≥ 400: `421 4.7.28 text`); the first match wins.

pub mod file;
pub mod rate;

use std::fmt;
use std::str::FromStr;

use regex::{Regex, RegexSet, RegexSetBuilder};

pub use file::{ShapingError, BUILTIN};
pub use rate::{Bucket, Rate};

/// How delivery uses STARTTLS (`--outbound-tls`, and a site's `tls` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundTls {
    /// Never (`disabled`).
    None,
    /// When offered, any certificate; a failed handshake is retried at once in plaintext on
    /// the same address (Postfix's `may`; `opportunistic`).
    May,
    /// Required, any certificate: no STARTTLS, a refusal or a failed handshake is a 4.7.x
    /// failure of the host (`required`).
    Encrypt,
    /// Required, with the certificate verified for the host name (`verify`).
    Verify,
    /// TLS from the first byte (RFC 8314 §3.3), the certificate verified as under `Verify`:
    /// `--relay-tls implicit` only, no site key.
    Implicit,
}

/// A site's limits; `None`: not set at this level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once.
    pub connection_limit: Option<u32>,
    /// Transactions on one connection before QUIT.
    pub max_deliveries_per_connection: Option<u32>,
    /// Messages (transactions, not recipients) over all connections of the site.
    pub max_message_rate: Option<Rate>,
    /// New connections.
    pub max_connection_rate: Option<Rate>,
    /// STARTTLS policy.
    pub tls: Option<OutboundTls>,
}

impl Limits {
    /// These limits with `base`'s where these are not set.
    pub fn over(&self, base: &Limits) -> Limits {
        Limits {
            connection_limit: self.connection_limit.or(base.connection_limit),
            max_deliveries_per_connection: self.max_deliveries_per_connection.or(base.max_deliveries_per_connection),
            max_message_rate: self.max_message_rate.or(base.max_message_rate),
            max_connection_rate: self.max_connection_rate.or(base.max_connection_rate),
            tls: self.tls.or(base.tls),
        }
    }
}

/// A host name or a `*.domain` pattern (any name below the domain), lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// The domain (after `*.` for a wildcard).
    name: Box<str>,
    wildcard: bool,
}

impl HostPattern {
    /// `None` for something that is not a host name.
    pub fn parse(s: &str) -> Option<HostPattern> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        ok.then(|| HostPattern { name: name.into(), wildcard })
    }

    /// Whether `host` (any case, with or without the final dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        if !self.wildcard {
            return host.eq_ignore_ascii_case(&self.name);
        }
        host.len() > self.name.len() + 1 && {
            let (head, tail) = host.split_at(host.len() - self.name.len());
            head.ends_with('.') && tail.eq_ignore_ascii_case(&self.name)
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

/// A provider: an MX roll-up.
#[derive(Debug, Clone)]
pub struct Provider {
    /// Its name (`[provider.NAME]`).
    pub name: Box<str>,
    /// MX host patterns.
    pub mx: Vec<HostPattern>,
    /// Its limits.
    pub limits: Limits,
}

/// What an automation rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoAction {
    /// Override these limits of the site.
    Throttle(Limits),
    /// Stop the site.
    Suspend,
}

/// An `[[automation]]` rule.
#[derive(Debug, Clone)]
pub struct Automation {
    /// The regex as written (for logs).
    pub pattern: Box<str>,
    regex: Regex,
    /// Only for sites of this provider.
    pub provider: Option<Box<str>>,
    /// Only for replies about this domain.
    pub domain: Option<HostPattern>,
    /// Throttle or suspend.
    pub action: AutoAction,
    /// For how long; renewed by every further match.
    pub duration_ms: u64,
}

/// What a site is, as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SiteKey {
    /// A domain with a `[domain]` entry of its own.
    Domain(Box<str>),
    /// A provider's MX roll-up.
    Provider(Box<str>),
    /// The MX host set (sorted, comma separated).
    Hosts(Box<str>),
    /// `--relay-host`.
    Relay(Box<str>),
}

impl SiteKey {
    /// The name logs and `sluice queue` show.
    pub fn name(&self) -> &str {
        match self {
            SiteKey::Domain(n) | SiteKey::Provider(n) | SiteKey::Hosts(n) | SiteKey::Relay(n) => n,
        }
    }

    /// The provider, for a provider's site.
    pub fn provider(&self) -> Option<&str> {
        match self {
            SiteKey::Provider(p) => Some(p),
            _ => None,
        }
    }
}

/// The scope of a suspension: what `sluice queue suspend` names, or the site an automation
/// suspended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One recipient domain.
    Domain(Box<str>),
    /// Every site of a provider.
    Provider(Box<str>),
    /// One site (automation).
    Site(Box<str>),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Domain(d) => write!(f, "domain:{d}"),
            Scope::Provider(p) => write!(f, "provider:{p}"),
            Scope::Site(s) => write!(f, "site:{s}"),
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        match s.split_once(':') {
            Some(("domain", d)) if !d.is_empty() => Ok(Scope::Domain(d.to_ascii_lowercase().into())),
            Some(("provider", p)) if !p.is_empty() => Ok(Scope::Provider(p.into())),
            Some(("site", n)) if !n.is_empty() => Ok(Scope::Site(n.into())),
            _ => Err(format!("`{s}` is not a scope (domain:D, provider:P or site:S)")),
        }
    }
}

/// A suspension in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspension {
    /// What is suspended.
    pub scope: Scope,
    /// The site it stops (for a domain not routed yet: the domain).
    pub site: String,
    /// Why.
    pub reason: String,
    /// Until (Unix ms).
    pub until_ms: u64,
    /// Set by an operator (kept in the spool), not by automation.
    pub manual: bool,
}

/// The shaping rules in force.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// `[default]`.
    pub default: Limits,
    /// Providers, built-in first.
    pub providers: Vec<Provider>,
    /// `[domain]` entries.
    pub domains: Vec<(HostPattern, Limits)>,
    /// Automation rules in the order they are checked.
    pub automation: Vec<Automation>,
    /// `[[classify]]` rules (for the bounce classes of the event log).
    pub classify: Vec<(Regex, Box<str>)>,
    /// Every automation regex, to test a reply once.
    set: Option<RegexSet>,
}

impl Rules {
    /// Builds the one-pass matcher of the automation rules.
    fn compile(&mut self) {
        let set = RegexSetBuilder::new(self.automation.iter().map(|a| a.regex.as_str())).case_insensitive(true).build();
        // Each pattern compiled alone already; a set of them compiles too (or the limits of
        // the set were hit: fall back to one regex at a time).
        self.set = set.ok();
    }

    /// Whether some site may use `tls = "verify"` (the CA bundle must load then).
    pub fn uses_verify(&self) -> bool {
        let all = std::iter::once(&self.default)
            .chain(self.providers.iter().map(|p| &p.limits))
            .chain(self.domains.iter().map(|(_, l)| l));
        all.chain(self.automation.iter().filter_map(|a| match &a.action {
            AutoAction::Throttle(l) => Some(l),
            AutoAction::Suspend => None,
        }))
        .any(|l| l.tls == Some(OutboundTls::Verify))
    }

    /// Whether a provider of this name exists.
    pub fn has_provider(&self, name: &str) -> bool {
        self.providers.iter().any(|p| &*p.name == name)
    }

    /// The site of recipient domain `domain` whose MX hosts are `mx` (preference order), or
    /// of the relay host `relay`.
    pub fn site_key(&self, domain: &str, mx: &[&str], relay: Option<&str>) -> SiteKey {
        if let Some(relay) = relay {
            return SiteKey::Relay(relay.to_ascii_lowercase().into());
        }
        if self.domains.iter().any(|(p, _)| p.matches(domain)) {
            return SiteKey::Domain(domain.to_ascii_lowercase().into());
        }
        for host in mx {
            if let Some(p) = self.providers.iter().find(|p| p.mx.iter().any(|m| m.matches(host))) {
                return SiteKey::Provider(p.name.clone());
            }
        }
        let mut hosts: Vec<String> = mx.iter().map(|h| h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase()).collect();
        hosts.sort();
        hosts.dedup();
        if hosts.is_empty() {
            return SiteKey::Domain(domain.to_ascii_lowercase().into());
        }
        SiteKey::Hosts(hosts.join(",").into())
    }

    /// The limits of a site (`domain` > `provider` > `default`), not counting automation.
    pub fn limits(&self, site: &SiteKey) -> Limits {
        let own = match site {
            SiteKey::Domain(d) => self.domains.iter().find(|(p, _)| p.matches(d)).map(|(_, l)| *l).unwrap_or_default(),
            SiteKey::Provider(name) => {
                self.providers.iter().find(|p| p.name == *name).map(|p| p.limits).unwrap_or_default()
            }
            SiteKey::Hosts(_) | SiteKey::Relay(_) => Limits::default(),
        };
        own.over(&self.default)
    }

    /// The first automation rule that matches `reply` (the whole reply: `421 4.7.28 text`)
    /// from a site of `provider` about recipient domain `domain`.
    pub fn automation_match(&self, provider: Option<&str>, domain: &str, reply: &str) -> Option<&Automation> {
        let applies = |a: &Automation| {
            a.provider.as_deref().is_none_or(|p| Some(p) == provider)
                && a.domain.as_ref().is_none_or(|d| d.matches(domain))
        };
        match &self.set {
            Some(set) => set.matches(reply).iter().map(|i| &self.automation[i]).find(|a| applies(a)),
            None => self.automation.iter().find(|a| applies(a) && a.regex.is_match(reply)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_names_below_their_domain() {
        let p = HostPattern::parse("*.Google.com").unwrap();
        assert!(p.matches("aspmx.l.google.com"));
        assert!(p.matches("ALT1.ASPMX.L.GOOGLE.COM."));
        assert!(!p.matches("google.com"));
        assert!(!p.matches("notgoogle.com"));
        assert!(!p.matches("evilgoogle.com"));
        let e = HostPattern::parse("mx.example.test.").unwrap();
        assert!(e.matches("MX.example.test"));
        assert!(!e.matches("a.mx.example.test"));
        assert!(HostPattern::parse("bad host").is_none());
        assert!(HostPattern::parse("*.").is_none());
        assert!(HostPattern::parse("a..b").is_none());
    }

    #[test]
    fn sites_roll_up_by_provider_then_by_mx_set_and_domains_stand_alone() {
        let r = Rules::load(Some(("f", "[domain.\"vip.test\"]\nconnection_limit = 1\n")), true).unwrap();
        let google = ["aspmx.l.google.com", "alt1.aspmx.l.google.com"];
        assert_eq!(r.site_key("gmail.com", &google, None), SiteKey::Provider("google".into()));
        assert_eq!(r.site_key("customer.test", &["alt2.aspmx.l.google.com"], None), SiteKey::Provider("google".into()));
        // Same MX hosts in another order: one site.
        let a = r.site_key("a.test", &["mx2.host.test", "mx1.host.test."], None);
        let b = r.site_key("b.test", &["MX1.host.test", "mx2.host.test"], None);
        assert_eq!(a, b);
        assert_eq!(a.name(), "mx1.host.test,mx2.host.test");
        assert_eq!(r.site_key("vip.test", &google, None), SiteKey::Domain("vip.test".into()));
        assert_eq!(r.site_key("gmail.com", &google, Some("Relay.test")), SiteKey::Relay("relay.test".into()));
        // Limits: domain > provider > default.
        let r = Rules::load(
            Some(("f", "[default]\nconnection_limit = 9\nmax_message_rate = \"5/s\"\n[domain.\"vip.test\"]\nconnection_limit = 1\n")),
            true,
        )
        .unwrap();
        let g = r.limits(&SiteKey::Provider("google".into()));
        assert_eq!((g.connection_limit, g.max_message_rate), (Some(5), Some(Rate { count: 5, per_ms: 1000 })));
        assert_eq!(r.limits(&SiteKey::Domain("vip.test".into())).connection_limit, Some(1));
        assert_eq!(r.limits(&SiteKey::Hosts("x".into())).connection_limit, Some(9));
    }

    #[test]
    fn automation_takes_the_first_rule_that_matches_in_scope() {
        let file = "[[automation]]\nmatch = 'slow'\nprovider = \"yahoo\"\naction = \"suspend\"\nduration = \"1m\"\n\
                    [[automation]]\nmatch = 'unusual rate'\ndomain = \"only.test\"\naction = \"suspend\"\nduration = \"2m\"\n";
        let r = Rules::load(Some(("f", file)), true).unwrap();
        let m = |p: Option<&str>, d: &str, reply: &str| r.automation_match(p, d, reply).map(|a| a.duration_ms);
        // Yahoo's TSS04 suspends for 2 h even though "temporarily deferred" matches the throttle.
        let tss04 = "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume";
        assert_eq!(m(Some("yahoo"), "yahoo.com", tss04), Some(7_200_000));
        assert!(matches!(r.automation_match(None, "x.test", tss04).unwrap().action, AutoAction::Suspend));
        let gmail = "421 4.7.28 Our system has detected an unusual rate of unsolicited mail";
        let a = r.automation_match(Some("google"), "gmail.com", gmail).unwrap();
        assert_eq!(a.duration_ms, 90 * 60_000);
        assert_eq!(
            a.action,
            AutoAction::Throttle(Limits {
                connection_limit: Some(1),
                max_message_rate: Some(Rate { count: 1, per_ms: 60_000 }),
                ..Limits::default()
            })
        );
        // The scoped rules apply only in scope; case does not matter.
        assert_eq!(m(Some("yahoo"), "y.test", "450 SLOW down"), Some(60_000));
        assert_eq!(m(Some("google"), "y.test", "450 slow down"), None);
        assert_eq!(m(None, "only.test", "451 unusual rate"), Some(120_000));
        // Greylisting is an ordinary deferral.
        assert_eq!(m(None, "x.test", "451 4.7.1 Greylisted, try again later"), None);
    }

    #[test]
    fn scopes_read_back_what_they_print() {
        for s in [Scope::Domain("a.test".into()), Scope::Provider("google".into()), Scope::Site("mx.test".into())] {
            assert_eq!(s.to_string().parse::<Scope>(), Ok(s));
        }
        assert!("google".parse::<Scope>().is_err());
        assert!("domain:".parse::<Scope>().is_err());
    }
}
