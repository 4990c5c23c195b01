//! Pure: the control protocol between `sluice queue` and the running relay (SPEC "Runtime
//! control"), spoken over the Unix socket `DIR/control.sock` of the spool directory.
//!
//! Owns: the request line and the answer text, both plain tab-separated lines, and their
//! codecs. A request is one line of at most [`MAX_REQUEST`] bytes; the relay answers with one
//! status line and, for the listing requests, one line per row, then closes the connection.
//! Must never: do I/O, read the clock, or trust a decoded field beyond its type (every field
//! of a request comes from a local user, but a malformed one is an error, never a panic).
//!
//! ```text
//! Format (request):  VERB [TAB FIELD]* LF
//!   suspend  TAB scope TAB for_ms TAB reason     scope: `domain:D`, `provider:P` or `site:S`
//!   resume   TAB scope
//!   suspensions
//!   bounce   TAB (id:QUEUEID | domain:D) TAB reason
//!   summary  TAB (domain | site)
//! Format (answer):   ok TAB message LF | error TAB message LF
//!                  | suspensions TAB n LF (scope TAB site TAB reason TAB left_s TAB manual(0|1) LF)*n
//!                  | summary TAB n LF (key TAB queued TAB oldest_s TAB last_reply TAB suspended(0|1) LF)*n
//! ```
//! Text fields never hold a TAB or a line break: [`clean`] turns every control character
//! into a space before encoding.

use std::fmt::Write as _;

/// The socket's file name inside the spool directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Longest request line, LF included; a longer one is refused.
pub const MAX_REQUEST: usize = 4096;

/// What a bounce request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BounceTarget {
    /// One message by queue id (its text form).
    Id(String),
    /// Every queued recipient of one destination domain.
    Domain(String),
}

/// How `summary` groups its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// One row per destination domain.
    Domain,
    /// One row per site (a provider, or the destinations sharing their MX hosts).
    Site,
}

/// One request of `sluice queue` to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Suspend deliveries to a scope (`domain:D`, `provider:P`, `site:S`) for `for_ms`.
    Suspend {
        /// `domain:D` or `provider:P`.
        scope: String,
        /// How long, ms.
        for_ms: u64,
        /// Why (logged and shown).
        reason: String,
    },
    /// Lift a manual or automatic suspension.
    Resume {
        /// `domain:D` or `provider:P`.
        scope: String,
    },
    /// The suspensions in force.
    Suspensions,
    /// Bounce what is queued now for a message or a domain (a DSN to each sender).
    Bounce {
        /// Which.
        target: BounceTarget,
        /// Why (goes into the DSN).
        reason: String,
    },
    /// Queued recipients per domain or site.
    Summary {
        /// Row key.
        by: GroupBy,
    },
}

/// A request line that is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// Longer than [`MAX_REQUEST`].
    TooLong,
    /// Not UTF-8.
    NotText,
    /// An unknown verb.
    UnknownVerb,
    /// A field missing or malformed; names it.
    BadField(&'static str),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::TooLong => write!(f, "request longer than {MAX_REQUEST} bytes"),
            ProtoError::NotText => f.write_str("request is not UTF-8"),
            ProtoError::UnknownVerb => f.write_str("unknown request"),
            ProtoError::BadField(name) => write!(f, "bad or missing field: {name}"),
        }
    }
}

/// A text field made safe for a tab-separated line: control characters become spaces.
pub fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

impl Request {
    /// The request line, LF included.
    pub fn encode(&self) -> String {
        match self {
            Request::Suspend { scope, for_ms, reason } => {
                format!("suspend\t{}\t{for_ms}\t{}\n", clean(scope), clean(reason))
            }
            Request::Resume { scope } => format!("resume\t{}\n", clean(scope)),
            Request::Suspensions => "suspensions\n".into(),
            Request::Bounce { target, reason } => {
                let t = match target {
                    BounceTarget::Id(id) => format!("id:{}", clean(id)),
                    BounceTarget::Domain(d) => format!("domain:{}", clean(d)),
                };
                format!("bounce\t{t}\t{}\n", clean(reason))
            }
            Request::Summary { by: GroupBy::Domain } => "summary\tdomain\n".into(),
            Request::Summary { by: GroupBy::Site } => "summary\tsite\n".into(),
        }
    }

    /// Decodes one request line (with or without its LF).
    pub fn decode(line: &[u8]) -> Result<Request, ProtoError> {
        if line.len() > MAX_REQUEST {
            return Err(ProtoError::TooLong);
        }
        let line = std::str::from_utf8(line).map_err(|_| ProtoError::NotText)?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut f = line.split('\t');
        let verb = f.next().unwrap_or("");
        let mut field = |name: &'static str| f.next().ok_or(ProtoError::BadField(name));
        let scope = |s: &str| -> Result<String, ProtoError> {
            let ok =
                s.split_once(':').is_some_and(|(k, v)| matches!(k, "domain" | "provider" | "site") && !v.is_empty());
            if ok {
                Ok(s.to_owned())
            } else {
                Err(ProtoError::BadField("scope"))
            }
        };
        Ok(match verb {
            "suspend" => {
                let sc = scope(field("scope")?)?;
                let for_ms = field("for_ms")?.parse().map_err(|_| ProtoError::BadField("for_ms"))?;
                Request::Suspend { scope: sc, for_ms, reason: field("reason").unwrap_or("").to_owned() }
            }
            "resume" => Request::Resume { scope: scope(field("scope")?)? },
            "suspensions" => Request::Suspensions,
            "bounce" => {
                let target = match field("target")?.split_once(':') {
                    Some(("id", id)) if !id.is_empty() => BounceTarget::Id(id.to_owned()),
                    Some(("domain", d)) if !d.is_empty() => BounceTarget::Domain(d.to_owned()),
                    _ => return Err(ProtoError::BadField("target")),
                };
                Request::Bounce { target, reason: field("reason").unwrap_or("").to_owned() }
            }
            "summary" => match field("by")? {
                "domain" => Request::Summary { by: GroupBy::Domain },
                "site" => Request::Summary { by: GroupBy::Site },
                _ => return Err(ProtoError::BadField("by")),
            },
            _ => return Err(ProtoError::UnknownVerb),
        })
    }
}

/// One suspension in force, as `suspensions` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuspensionRow {
    /// `domain:D` or `provider:P`.
    pub scope: String,
    /// The site it covers (empty when not known yet).
    pub site: String,
    /// Why.
    pub reason: String,
    /// Seconds left.
    pub left_s: u64,
    /// Set by an operator (else by an `[[automation]]` rule).
    pub manual: bool,
}

/// One row of `summary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryRow {
    /// The domain or site.
    pub key: String,
    /// Recipients not final.
    pub queued: u64,
    /// Age of the oldest of their messages, seconds.
    pub oldest_s: u64,
    /// The last reply of an attempt there (empty when none is known).
    pub last_reply: String,
    /// Deliveries there are suspended.
    pub suspended: bool,
}

/// The relay's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Done; what was done.
    Done(String),
    /// Refused; why (exit status 1 for the client).
    Failed(String),
    /// The suspensions in force.
    Suspensions(Vec<SuspensionRow>),
    /// The summary rows.
    Summary(Vec<SummaryRow>),
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

impl Answer {
    /// The answer's text.
    pub fn encode(&self) -> String {
        let mut o = String::new();
        match self {
            Answer::Done(m) => {
                let _ = writeln!(o, "ok\t{}", clean(m));
            }
            Answer::Failed(m) => {
                let _ = writeln!(o, "error\t{}", clean(m));
            }
            Answer::Suspensions(rows) => {
                let _ = writeln!(o, "suspensions\t{}", rows.len());
                for r in rows {
                    let (scope, site, reason) = (clean(&r.scope), clean(&r.site), clean(&r.reason));
                    let _ = writeln!(o, "{scope}\t{site}\t{reason}\t{}\t{}", r.left_s, flag(r.manual));
                }
            }
            Answer::Summary(rows) => {
                let _ = writeln!(o, "summary\t{}", rows.len());
                for r in rows {
                    let (key, reply) = (clean(&r.key), clean(&r.last_reply));
                    let _ = writeln!(o, "{key}\t{}\t{}\t{reply}\t{}", r.queued, r.oldest_s, flag(r.suspended));
                }
            }
        }
        o
    }

    /// Decodes a whole answer; `None` when it is not one (a relay of another version, a cut
    /// connection).
    pub fn decode(text: &str) -> Option<Answer> {
        let mut lines = text.lines();
        let (head, arg) = lines.next()?.split_once('\t')?;
        let mut rows = |n: &str| -> Option<Vec<Vec<&str>>> {
            let n: usize = n.parse().ok()?;
            let rows: Vec<Vec<&str>> = lines.by_ref().take(n).map(|l| l.split('\t').collect()).collect();
            (rows.len() == n && rows.iter().all(|r| r.len() == 5)).then_some(rows)
        };
        Some(match head {
            "ok" => Answer::Done(arg.to_owned()),
            "error" => Answer::Failed(arg.to_owned()),
            "suspensions" => Answer::Suspensions(
                rows(arg)?
                    .into_iter()
                    .map(|r| {
                        Some(SuspensionRow {
                            scope: r[0].to_owned(),
                            site: r[1].to_owned(),
                            reason: r[2].to_owned(),
                            left_s: r[3].parse().ok()?,
                            manual: r[4] == "1",
                        })
                    })
                    .collect::<Option<_>>()?,
            ),
            "summary" => Answer::Summary(
                rows(arg)?
                    .into_iter()
                    .map(|r| {
                        Some(SummaryRow {
                            key: r[0].to_owned(),
                            queued: r[1].parse().ok()?,
                            oldest_s: r[2].parse().ok()?,
                            last_reply: r[3].to_owned(),
                            suspended: r[4] == "1",
                        })
                    })
                    .collect::<Option<_>>()?,
            ),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Suspend { scope: "domain:a.test".into(), for_ms: 3_600_000, reason: "abuse desk".into() },
            Request::Suspend { scope: "provider:google".into(), for_ms: 1, reason: String::new() },
            Request::Resume { scope: "provider:google".into() },
            Request::Suspensions,
            Request::Bounce { target: BounceTarget::Id("0123abcd".into()), reason: "spam run".into() },
            Request::Bounce { target: BounceTarget::Domain("b.test".into()), reason: String::new() },
            Request::Summary { by: GroupBy::Domain },
            Request::Summary { by: GroupBy::Site },
        ];
        for r in reqs {
            let line = r.encode();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line:?}");
            assert_eq!(Request::decode(line.as_bytes()), Ok(r));
        }
    }

    #[test]
    fn text_fields_cannot_split_a_line() {
        let r = Request::Suspend { scope: "domain:a.test".into(), for_ms: 5, reason: "two\nlines\tand tab".into() };
        let line = r.encode();
        assert_eq!(line.matches('\n').count(), 1);
        let Ok(Request::Suspend { reason, .. }) = Request::decode(line.as_bytes()) else { panic!("{line}") };
        assert_eq!(reason, "two lines and tab");
    }

    #[test]
    fn bad_requests_are_named_errors() {
        let cases: [(&[u8], ProtoError); 9] = [
            (b"", ProtoError::UnknownVerb),
            (b"shutdown\n", ProtoError::UnknownVerb),
            (b"suspend\n", ProtoError::BadField("scope")),
            (b"suspend\tplanet:x\t5\tr\n", ProtoError::BadField("scope")),
            (b"suspend\tdomain:\t5\tr\n", ProtoError::BadField("scope")),
            (b"suspend\tdomain:a\tsoon\tr\n", ProtoError::BadField("for_ms")),
            (b"bounce\tqueue:x\tr\n", ProtoError::BadField("target")),
            (b"summary\tplanet\n", ProtoError::BadField("by")),
            (b"resume\t\xff\n", ProtoError::NotText),
        ];
        for (line, want) in cases {
            assert_eq!(Request::decode(line), Err(want), "{:?}", String::from_utf8_lossy(line));
        }
        let long = vec![b'a'; MAX_REQUEST + 1];
        assert_eq!(Request::decode(&long), Err(ProtoError::TooLong));
    }

    #[test]
    fn answers_round_trip() {
        let answers = [
            Answer::Done("suspended domain:a.test".into()),
            Answer::Failed("unknown provider: nope".into()),
            Answer::Suspensions(vec![]),
            Answer::Suspensions(vec![
                SuspensionRow {
                    scope: "domain:a.test".into(),
                    site: "mx.a.test".into(),
                    reason: "r".into(),
                    left_s: 3599,
                    manual: true,
                },
                SuspensionRow {
                    scope: "provider:google".into(),
                    site: String::new(),
                    reason: String::new(),
                    left_s: 0,
                    manual: false,
                },
            ]),
            Answer::Summary(vec![SummaryRow {
                key: "a.test".into(),
                queued: 3,
                oldest_s: 12,
                last_reply: "451 4.4.1 connect to x[1.2.3.4:25]: refused".into(),
                suspended: true,
            }]),
        ];
        for a in answers {
            assert_eq!(Answer::decode(&a.encode()), Some(a));
        }
    }

    #[test]
    fn a_cut_answer_is_not_taken_for_a_short_one() {
        let full = Answer::Summary(vec![
            SummaryRow {
                key: "a".into(),
                queued: 1,
                oldest_s: 1,
                last_reply: String::new(),
                suspended: false
            };
            2
        ])
        .encode();
        let cut = &full[..full.rfind("a\t").unwrap()];
        assert_eq!(Answer::decode(cut), None);
        assert_eq!(Answer::decode("garbage"), None);
        assert_eq!(Answer::decode("summary\tmany\n"), None);
    }
}
