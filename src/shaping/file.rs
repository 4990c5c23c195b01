//! Pure: the shaping file (TOML, SPEC "Traffic shaping") and the built-in provider profiles,
//! read into [`Rules`]. Every error names the file, the line and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use toml::Spanned;

use super::rate::{parse_duration, Rate};
use super::{AutoAction, Automation, HostPattern, Limits, OutboundTls, Provider, Rules};

/// The built-in provider profiles and automation (`--no-builtin-shaping` drops them). Limits
/// follow what the providers publish or what large senders use; the automation is SPEC's.
pub const BUILTIN: &str = r#"
[provider.google]
mx = ["*.google.com", "*.googlemail.com"]
connection_limit = 5
max_deliveries_per_connection = 50
tls = "required"

[provider.yahoo]
mx = ["*.yahoodns.net"]
max_deliveries_per_connection = 20

[provider.microsoft]
mx = ["*.outlook.com", "*.protection.outlook.com", "*.mx.microsoft"]
max_deliveries_per_connection = 50

[provider.apple]
mx = ["*.icloud.com"]
connection_limit = 10
max_deliveries_per_connection = 50

[provider.comcast]
mx = ["*.comcast.net"]
connection_limit = 5
max_deliveries_per_connection = 25

[provider.orange]
mx = ["*.orange.fr", "*.wanadoo.fr"]
connection_limit = 2

[[automation]]
match = 'TSS04|TS04'
action = "suspend"
duration = "2h"

[[automation]]
match = '4\.7\.28|rate limit|temporarily deferred|too many connections|too many messages'
action = "throttle"
duration = "90m"
connection_limit = 1
max_message_rate = "1/min"
"#;

/// A shaping file that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapingError {
    /// The file.
    pub file: String,
    /// The line (1-based), when known.
    pub line: Option<usize>,
    /// The key or table, when known.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ShapingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ": line {line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ShapingError {}

/// One table of the file: every key any table may have (each table's own set is checked after
/// reading, so that a key in the wrong table is named as such).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    connection_limit: Option<Spanned<i64>>,
    max_deliveries_per_connection: Option<Spanned<i64>>,
    max_message_rate: Option<Spanned<String>>,
    max_connection_rate: Option<Spanned<String>>,
    tls: Option<Spanned<String>>,
    mx: Option<Spanned<Vec<String>>>,
    #[serde(rename = "match")]
    pattern: Option<Spanned<String>>,
    provider: Option<Spanned<String>>,
    domain: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    duration: Option<Spanned<String>>,
    class: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    default: Option<Spanned<Entry>>,
    #[serde(default)]
    provider: BTreeMap<String, Spanned<Entry>>,
    #[serde(default)]
    domain: BTreeMap<String, Spanned<Entry>>,
    #[serde(default)]
    automation: Vec<Spanned<Entry>>,
    #[serde(default)]
    classify: Vec<Spanned<Entry>>,
}

/// Reads files into rules, keeping the text for line numbers.
struct Reader<'a> {
    file: &'a str,
    text: &'a str,
}

impl Reader<'_> {
    fn error(&self, span: Option<Range<usize>>, key: &str, message: impl Into<String>) -> ShapingError {
        let line = span
            .map(|s| 1 + self.text.as_bytes()[..s.start.min(self.text.len())].iter().filter(|&&b| b == b'\n').count());
        ShapingError { file: self.file.to_owned(), line, key: key.to_owned(), message: message.into() }
    }

    fn parse(&self) -> Result<Doc, ShapingError> {
        toml::from_str(self.text).map_err(|e| self.error(e.span(), "", e.message().trim().to_owned()))
    }

    /// The limit keys of `e` (`table` names it in errors).
    fn limits(&self, table: &str, e: &Entry) -> Result<Limits, ShapingError> {
        let count = |v: &Option<Spanned<i64>>, key: &str| -> Result<Option<u32>, ShapingError> {
            match v {
                None => Ok(None),
                Some(s) => match u32::try_from(*s.get_ref()) {
                    Ok(n) if n >= 1 => Ok(Some(n)),
                    _ => Err(self.error(
                        Some(s.span()),
                        &format!("{table}.{key}"),
                        "must be a whole number of at least 1",
                    )),
                },
            }
        };
        let rate = |v: &Option<Spanned<String>>, key: &str| -> Result<Option<Rate>, ShapingError> {
            match v {
                None => Ok(None),
                Some(s) => Rate::parse(s.get_ref())
                    .map(Some)
                    .map_err(|m| self.error(Some(s.span()), &format!("{table}.{key}"), m)),
            }
        };
        let tls = match &e.tls {
            None => None,
            Some(s) => Some(match s.get_ref().as_str() {
                "opportunistic" => OutboundTls::May,
                "required" => OutboundTls::Encrypt,
                "verify" => OutboundTls::Verify,
                "disabled" => OutboundTls::None,
                other => {
                    return Err(self.error(
                        Some(s.span()),
                        &format!("{table}.tls"),
                        format!("unknown TLS mode `{other}` (opportunistic, required, verify or disabled)"),
                    ))
                }
            }),
        };
        Ok(Limits {
            connection_limit: count(&e.connection_limit, "connection_limit")?,
            max_deliveries_per_connection: count(&e.max_deliveries_per_connection, "max_deliveries_per_connection")?,
            max_message_rate: rate(&e.max_message_rate, "max_message_rate")?,
            max_connection_rate: rate(&e.max_connection_rate, "max_connection_rate")?,
            tls,
        })
    }

    /// Refuses the keys of `e` that `table` does not take.
    fn only(&self, table: &str, e: &Entry, allowed: &[&str]) -> Result<(), ShapingError> {
        let present: [(&str, Option<Range<usize>>); 7] = [
            ("mx", e.mx.as_ref().map(Spanned::span)),
            ("match", e.pattern.as_ref().map(Spanned::span)),
            ("provider", e.provider.as_ref().map(Spanned::span)),
            ("domain", e.domain.as_ref().map(Spanned::span)),
            ("action", e.action.as_ref().map(Spanned::span)),
            ("duration", e.duration.as_ref().map(Spanned::span)),
            ("class", e.class.as_ref().map(Spanned::span)),
        ];
        for (key, span) in present {
            if let Some(span) = span {
                if !allowed.contains(&key) {
                    return Err(self.error(
                        Some(span),
                        &format!("{table}.{key}"),
                        format!("`{key}` does not belong in {table}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn regex(&self, table: &str, s: &Spanned<String>) -> Result<Regex, ShapingError> {
        RegexBuilder::new(s.get_ref())
            .case_insensitive(true)
            .build()
            .map_err(|e| self.error(Some(s.span()), &format!("{table}.match"), format!("bad regex: {e}")))
    }

    /// Merges the file into `rules`.
    fn merge_into(&self, rules: &mut Rules) -> Result<(), ShapingError> {
        let doc = self.parse()?;
        if let Some(d) = &doc.default {
            self.only("[default]", d.get_ref(), &[])?;
            rules.default = self.limits("[default]", d.get_ref())?.over(&rules.default);
        }
        for (name, e) in &doc.provider {
            let table = format!("[provider.{name}]");
            let entry = e.get_ref();
            self.only(&table, entry, &["mx"])?;
            let limits = self.limits(&table, entry)?;
            let mx = match &entry.mx {
                Some(list) => {
                    let mut pats = Vec::new();
                    for p in list.get_ref() {
                        pats.push(HostPattern::parse(p).ok_or_else(|| {
                            self.error(
                                Some(list.span()),
                                &format!("{table}.mx"),
                                format!("`{p}` is not a host name or *.domain pattern"),
                            )
                        })?);
                    }
                    Some(pats)
                }
                None => None,
            };
            match rules.providers.iter_mut().find(|p| *p.name == **name) {
                Some(p) => {
                    p.limits = limits.over(&p.limits);
                    if let Some(mx) = mx {
                        p.mx = mx;
                    }
                }
                None => {
                    let mx = mx.ok_or_else(|| {
                        self.error(Some(e.span()), &format!("{table}.mx"), "a new provider needs its `mx` patterns")
                    })?;
                    rules.providers.push(Provider { name: name.as_str().into(), mx, limits });
                }
            }
        }
        for (name, e) in &doc.domain {
            let table = format!("[domain.\"{name}\"]");
            self.only(&table, e.get_ref(), &[])?;
            let pattern = HostPattern::parse(name).ok_or_else(|| {
                self.error(Some(e.span()), &table, format!("`{name}` is not a domain or *.domain pattern"))
            })?;
            let limits = self.limits(&table, e.get_ref())?;
            match rules.domains.iter_mut().find(|(p, _)| *p == pattern) {
                Some((_, l)) => *l = limits.over(l),
                None => rules.domains.push((pattern, limits)),
            }
        }
        let mut automation = Vec::new();
        for (i, e) in doc.automation.iter().enumerate() {
            let table = format!("[[automation]] #{}", i + 1);
            let entry = e.get_ref();
            self.only(&table, entry, &["match", "provider", "domain", "action", "duration"])?;
            let missing =
                |key: &str| self.error(Some(e.span()), &format!("{table}.{key}"), format!("`{key}` is required"));
            let pattern = entry.pattern.as_ref().ok_or_else(|| missing("match"))?;
            let regex = self.regex(&table, pattern)?;
            let action = entry.action.as_ref().ok_or_else(|| missing("action"))?;
            let duration = entry.duration.as_ref().ok_or_else(|| missing("duration"))?;
            let duration = parse_duration(duration.get_ref())
                .map_err(|m| self.error(Some(duration.span()), &format!("{table}.duration"), m))?;
            let limits = self.limits(&table, entry)?;
            let action = match action.get_ref().as_str() {
                "throttle" if limits == Limits::default() => {
                    return Err(self.error(
                        Some(action.span()),
                        &format!("{table}.action"),
                        "a throttle needs at least one limit key",
                    ))
                }
                "throttle" => AutoAction::Throttle(limits),
                "suspend" if limits == Limits::default() => AutoAction::Suspend,
                "suspend" => {
                    return Err(self.error(
                        Some(action.span()),
                        &format!("{table}.action"),
                        "a suspension takes no limit keys",
                    ))
                }
                other => {
                    return Err(self.error(
                        Some(action.span()),
                        &format!("{table}.action"),
                        format!("unknown action `{other}` (throttle or suspend)"),
                    ))
                }
            };
            if entry.provider.is_some() && entry.domain.is_some() {
                return Err(self.error(Some(e.span()), &table, "give `provider` or `domain`, not both"));
            }
            let domain = match &entry.domain {
                Some(d) => Some(HostPattern::parse(d.get_ref()).ok_or_else(|| {
                    self.error(Some(d.span()), &format!("{table}.domain"), format!("`{}` is not a domain", d.get_ref()))
                })?),
                None => None,
            };
            automation.push(Automation {
                pattern: pattern.get_ref().as_str().into(),
                regex,
                provider: entry.provider.as_ref().map(|p| p.get_ref().as_str().into()),
                domain,
                action,
                duration_ms: duration.as_millis() as u64,
            });
        }
        // The file's rules come first (first match wins).
        automation.append(&mut rules.automation);
        rules.automation = automation;
        for (i, e) in doc.classify.iter().enumerate() {
            let table = format!("[[classify]] #{}", i + 1);
            let entry = e.get_ref();
            self.only(&table, entry, &["match", "class"])?;
            if entry.limits_given() {
                return Err(self.error(Some(e.span()), &table, "a classify rule takes `match` and `class` only"));
            }
            let missing =
                |key: &str| self.error(Some(e.span()), &format!("{table}.{key}"), format!("`{key}` is required"));
            let regex = self.regex(&table, entry.pattern.as_ref().ok_or_else(|| missing("match"))?)?;
            let class = entry.class.as_ref().ok_or_else(|| missing("class"))?;
            rules.classify.push((regex, class.get_ref().as_str().into()));
        }
        // Provider names an automation rule scopes to must exist.
        for a in &rules.automation {
            if let Some(p) = &a.provider {
                if !rules.providers.iter().any(|q| q.name == *p) {
                    return Err(self.error(None, "[[automation]].provider", format!("unknown provider `{p}`")));
                }
            }
        }
        Ok(())
    }
}

impl Entry {
    fn limits_given(&self) -> bool {
        self.connection_limit.is_some()
            || self.max_deliveries_per_connection.is_some()
            || self.max_message_rate.is_some()
            || self.max_connection_rate.is_some()
            || self.tls.is_some()
    }
}

impl Rules {
    /// The rules of a start or reload: the built-in profiles (unless `builtin` is false), then
    /// the file (`(name, text)`) merged over them.
    pub fn load(file: Option<(&str, &str)>, builtin: bool) -> Result<Rules, ShapingError> {
        let mut rules = Rules::default();
        if builtin {
            Reader { file: "built-in shaping", text: BUILTIN }.merge_into(&mut rules)?;
        }
        if let Some((file, text)) = file {
            Reader { file, text }.merge_into(&mut rules)?;
        }
        rules.compile();
        Ok(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Rules, ShapingError> {
        Rules::load(Some(("shaping.toml", text)), true)
    }

    #[test]
    fn the_builtin_profiles_load_and_the_file_merges_over_them() {
        let r = Rules::load(None, true).unwrap();
        assert_eq!(r.providers.len(), 6);
        let google = r.providers.iter().find(|p| &*p.name == "google").unwrap();
        assert_eq!(google.limits.connection_limit, Some(5));
        assert_eq!(google.limits.tls, Some(OutboundTls::Encrypt));
        assert_eq!(r.automation.len(), 2);
        let r = load(
            "[default]\nconnection_limit = 3\n[provider.google]\nconnection_limit = 2\n[provider.acme]\nmx = [\"*.acme.test\"]\n\
             [domain.\"example.com\"]\nmax_message_rate = \"10/min\"\n[[automation]]\nmatch = 'slow down'\naction = \"suspend\"\nduration = \"5m\"\n",
        )
        .unwrap();
        let google = r.providers.iter().find(|p| &*p.name == "google").unwrap();
        // Same provider: its keys override, the others stay.
        assert_eq!(google.limits.connection_limit, Some(2));
        assert_eq!(google.limits.max_deliveries_per_connection, Some(50));
        assert_eq!(r.default.connection_limit, Some(3));
        assert_eq!(r.providers.len(), 7);
        // The file's rule comes first.
        assert_eq!(&*r.automation[0].pattern, "slow down");
        assert_eq!(r.automation.len(), 3);
        assert_eq!(r.domains[0].1.max_message_rate, Some(Rate { count: 10, per_ms: 60_000 }));
        // Without the built-ins only the file is there.
        let r = Rules::load(Some(("f", "[default]\nconnection_limit = 1\n")), false).unwrap();
        assert!(r.providers.is_empty() && r.automation.is_empty());
    }

    #[test]
    fn a_bad_file_names_the_line_and_the_key() {
        let cases = [
            ("[default]\nconection_limit = 3\n", 2, "conection_limit"),
            ("[default]\nconnection_limit = 0\n", 2, "[default].connection_limit"),
            ("\n[domain.\"a.test\"]\nmax_message_rate = \"fast\"\n", 3, "[domain.\"a.test\"].max_message_rate"),
            ("[provider.google]\ntls = \"sometimes\"\n", 2, "[provider.google].tls"),
            (
                "[[automation]]\nmatch = '(unclosed'\naction = \"suspend\"\nduration = \"1h\"\n",
                2,
                "[[automation]] #1.match",
            ),
            ("[[automation]]\nmatch = 'x'\naction = \"explode\"\nduration = \"1h\"\n", 3, "[[automation]] #1.action"),
            ("[[automation]]\nmatch = 'x'\naction = \"throttle\"\nduration = \"1h\"\n", 3, "[[automation]] #1.action"),
            (
                "[[automation]]\nmatch = 'x'\naction = \"suspend\"\nduration = \"soon\"\n",
                4,
                "[[automation]] #1.duration",
            ),
            ("[default]\nmx = [\"a\"]\n", 2, "[default].mx"),
            ("[provider.new]\nconnection_limit = 1\n", 1, "[provider.new].mx"),
            ("[default\n", 1, ""),
        ];
        for (text, line, key) in cases {
            let e = load(text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text:?}: {e}");
            assert!(e.to_string().contains(key), "{text:?}: {e}");
            assert!(e.to_string().starts_with("shaping.toml: line"), "{e}");
        }
        let e = load("[[automation]]\nmatch = 'x'\nprovider = \"nobody\"\naction = \"suspend\"\nduration = \"1h\"\n")
            .unwrap_err();
        assert!(e.message.contains("unknown provider `nobody`"), "{e}");
    }
}
