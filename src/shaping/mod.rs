//! TEMPORARY stand-in for the lead's `shaping` module (its announced types only), so that the
//! control socket builds before it lands; removed when main is merged.

use std::fmt;
use std::str::FromStr;

/// What a suspension covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One recipient domain.
    Domain(Box<str>),
    /// A provider profile.
    Provider(Box<str>),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Domain(d) => write!(f, "domain:{d}"),
            Scope::Provider(p) => write!(f, "provider:{p}"),
        }
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        match s.split_once(':') {
            Some(("domain", d)) if !d.is_empty() => Ok(Scope::Domain(d.to_ascii_lowercase().into())),
            Some(("provider", p)) if !p.is_empty() => Ok(Scope::Provider(p.into())),
            _ => Err(format!("{s:?} is not domain:D or provider:P")),
        }
    }
}

/// A suspension in force.
#[derive(Debug, Clone)]
pub struct Suspension {
    /// What it covers.
    pub scope: Scope,
    /// The site.
    pub site: String,
    /// Why.
    pub reason: String,
    /// End, Unix ms.
    pub until_ms: u64,
    /// Set by an operator.
    pub manual: bool,
}
