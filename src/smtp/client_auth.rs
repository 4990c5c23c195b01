//! Pure: the credentials this relay gives its smarthost (`--relay-auth-file`), for the client
//! side of SMTP AUTH (RFC 4954) with PLAIN (RFC 4616) or LOGIN.
//!
//! Owns: parsing the file's text (one `user:password` line), rendering once, at start, the
//! base64 responses the client session sends, and scrubbing them out of a server's reply
//! before anything logs it. Must never: read the file (`config` does, and checks its mode),
//! print a password or a response in `Debug`, in an error or in a reply it hands out.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::reply::Reply;

/// Text put in place of a secret found in a server's reply.
const REDACTED: &str = "[redacted]";

/// The relay host credentials, with the AUTH responses rendered once (no allocation per
/// connection: sessions share them through an `Arc`). `Debug` shows the user only.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayCredentials {
    user: String,
    password: String,
    /// `base64(NUL user NUL password)`: the PLAIN initial response (RFC 4616 §2, empty authzid).
    plain: String,
    /// `base64(user)`: LOGIN's answer to `Username:`.
    login_user: String,
    /// `base64(password)`: LOGIN's answer to `Password:`.
    login_pass: String,
}

impl fmt::Debug for RelayCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayCredentials {{ user: {:?}, password: .. }}", self.user)
    }
}

/// Why a `--relay-auth-file` text is refused. Never holds any of the file's text: a line that
/// is not `user:password` may be a password alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsError {
    /// No `user:password` line (only blank lines and `#` comments, or nothing).
    Empty,
    /// More than one `user:password` line; the 1-based number of the second.
    SeveralLines(usize),
    /// A line without `:`; its number.
    NoColon(usize),
    /// Nothing before the `:`; the line's number.
    EmptyUser(usize),
    /// Nothing after the `:`; the line's number.
    EmptyPassword(usize),
    /// A NUL or another control character (PLAIN separates its fields with NUL); the line's
    /// number.
    ControlChar(usize),
}

impl fmt::Display for CredentialsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CredentialsError::Empty => f.write_str("no user:password line"),
            CredentialsError::SeveralLines(n) => write!(f, "line {n}: more than one user:password line"),
            CredentialsError::NoColon(n) => write!(f, "line {n}: expected user:password, found no ':'"),
            CredentialsError::EmptyUser(n) => write!(f, "line {n}: empty user name before ':'"),
            CredentialsError::EmptyPassword(n) => write!(f, "line {n}: empty password after ':'"),
            CredentialsError::ControlChar(n) => write!(f, "line {n}: control character in user or password"),
        }
    }
}

impl std::error::Error for CredentialsError {}

impl RelayCredentials {
    /// Parses the file's text: exactly one `user:password` line, split at the first `:` (a
    /// password may hold `:`), taken as it is but for the line end (CRLF or LF); blank lines
    /// and lines starting with `#` are skipped. Postfix's `smtp_sasl_password_maps` value
    /// without the map key: the relay host is `--relay-host`.
    pub fn parse(text: &str) -> Result<RelayCredentials, CredentialsError> {
        let mut found: Option<(&str, &str)> = None;
        for (i, raw) in text.split('\n').enumerate() {
            let n = i + 1;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            if found.is_some() {
                return Err(CredentialsError::SeveralLines(n));
            }
            let (user, password) = line.split_once(':').ok_or(CredentialsError::NoColon(n))?;
            if user.is_empty() {
                return Err(CredentialsError::EmptyUser(n));
            }
            if password.is_empty() {
                return Err(CredentialsError::EmptyPassword(n));
            }
            if line.chars().any(char::is_control) {
                return Err(CredentialsError::ControlChar(n));
            }
            found = Some((user, password));
        }
        let (user, password) = found.ok_or(CredentialsError::Empty)?;
        Ok(RelayCredentials::new(user, password))
    }

    /// Credentials from their parts (neither may hold NUL; [`RelayCredentials::parse`] checks).
    pub fn new(user: &str, password: &str) -> RelayCredentials {
        let mut plain = Vec::with_capacity(user.len() + password.len() + 2);
        plain.push(0);
        plain.extend_from_slice(user.as_bytes());
        plain.push(0);
        plain.extend_from_slice(password.as_bytes());
        let rendered = B64.encode(&plain);
        // The clear copy goes before the buffer is freed.
        plain.fill(0);
        std::hint::black_box(&plain);
        RelayCredentials {
            user: user.to_owned(),
            password: password.to_owned(),
            plain: rendered,
            login_user: B64.encode(user),
            login_pass: B64.encode(password),
        }
    }

    /// The user name (not secret: it may be logged).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The PLAIN initial response, `base64(NUL user NUL password)` (RFC 4616 §2).
    pub fn plain_response(&self) -> &str {
        &self.plain
    }

    /// LOGIN's answer to the `Username:` challenge.
    pub fn login_user(&self) -> &str {
        &self.login_user
    }

    /// LOGIN's answer to the `Password:` challenge.
    pub fn login_password(&self) -> &str {
        &self.login_pass
    }

    /// `reply` with the password and every response that carries it replaced by
    /// `[redacted]`: a server may echo what it got, and the reply ends up in log lines, outcome
    /// records and DSNs.
    pub fn scrub(&self, mut reply: Reply) -> Reply {
        for secret in [&self.plain, &self.login_pass, &self.password] {
            if reply.text.contains(secret.as_str()) {
                reply.text = reply.text.replace(secret.as_str(), REDACTED);
            }
        }
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        type Row = (&'static str, Result<(&'static str, &'static str), CredentialsError>);
        let table: &[Row] = &[
            ("alice:s3cret\n", Ok(("alice", "s3cret"))),
            ("alice:s3cret", Ok(("alice", "s3cret"))),
            ("# relay\r\n\r\nalice@x.test:pa:ss word \r\n", Ok(("alice@x.test", "pa:ss word "))),
            ("", Err(CredentialsError::Empty)),
            ("\n# only a comment\n  \n", Err(CredentialsError::Empty)),
            ("justapassword\n", Err(CredentialsError::NoColon(1))),
            ("\n:pw\n", Err(CredentialsError::EmptyUser(2))),
            ("alice:\n", Err(CredentialsError::EmptyPassword(1))),
            ("alice:p\0w\n", Err(CredentialsError::ControlChar(1))),
            ("a:b\nc:d\n", Err(CredentialsError::SeveralLines(2))),
        ];
        for (text, want) in table {
            let got = RelayCredentials::parse(text);
            match (got, want) {
                (Ok(c), Ok((u, p))) => {
                    assert_eq!((c.user(), c.password.as_str()), (*u, *p), "{text:?}");
                }
                (Err(e), Err(w)) => assert_eq!(e, *w, "{text:?}"),
                (got, want) => panic!("{text:?}: {got:?} != {want:?}"),
            }
        }
    }

    #[test]
    fn errors_and_debug_never_show_the_file() {
        let e = RelayCredentials::parse("hunter2\n").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let c = RelayCredentials::parse("bob:hunter2\n").unwrap();
        let dbg = format!("{c:?}");
        assert!(dbg.contains("bob") && !dbg.contains("hunter2") && !dbg.contains(c.plain_response()), "{dbg}");
    }

    #[test]
    fn responses_and_scrubbing() {
        // RFC 4616 §4's example: authcid "tim", password "tanstaaftanstaaf".
        let c = RelayCredentials::new("tim", "tanstaaftanstaaf");
        assert_eq!(c.plain_response(), "AHRpbQB0YW5zdGFhZnRhbnN0YWFm");
        assert_eq!(c.login_user(), "dGlt");
        assert_eq!(c.login_password(), "dGFuc3RhYWZ0YW5zdGFhZg==");
        let echoed = Reply::new(
            535,
            Some((5, 7, 8)),
            "bad AHRpbQB0YW5zdGFhZnRhbnN0YWFm\nor dGFuc3RhYWZ0YW5zdGFhZg== (tanstaaftanstaaf)",
        );
        let clean = c.scrub(echoed);
        assert!(!clean.text.contains("tanstaaf") && !clean.text.contains("AHRpbQ"), "{clean}");
        assert_eq!(clean.text.matches(REDACTED).count(), 3, "{clean}");
        assert_eq!(clean.code, 535);
    }
}
