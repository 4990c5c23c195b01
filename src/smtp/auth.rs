//! Pure: SMTP AUTH building blocks (RFC 4954) for the PLAIN (RFC 4616) and LOGIN mechanisms,
//! the `--auth-file` parser and password verification (the cold path).
//!
//! Decoding is allocation-free once the caller's [`Credentials`] buffers have grown: the base64
//! is decoded straight into them and the password bytes are overwritten before a buffer is
//! reused. Faults come back as [`AuthFault`]; the caller picks the reply. Verification
//! ([`AuthFile::verify`]) costs an Argon2 run (milliseconds, by design) and belongs on a worker
//! thread, never on the event loop.
//!
//! The file format is one `user:PHC-hash` per line, as printed by `sluice passwd USER`:
//!
//! ```text
//! # comment
//! alice:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$...
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{self, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

use super::line::MAX_AUTH_LINE;

/// Cap on a base64 client response: what fits on an AUTH line of [`MAX_AUTH_LINE`] octets
/// with its CRLF (RFC 4954 §4).
pub const MAX_RESPONSE: usize = MAX_AUTH_LINE - 2;

/// Cap on a decoded client response (a PLAIN message, a LOGIN user name or password): the
/// decoded length of [`MAX_RESPONSE`] base64 octets.
pub const MAX_CREDENTIALS: usize = MAX_RESPONSE * 3 / 4;

/// LOGIN's first challenge, `Username:` in base64.
pub const LOGIN_USER_PROMPT: &[u8] = b"334 VXNlcm5hbWU6\r\n";

/// LOGIN's second challenge, `Password:` in base64.
pub const LOGIN_PASS_PROMPT: &[u8] = b"334 UGFzc3dvcmQ6\r\n";

/// The empty challenge sent when PLAIN comes without an initial response.
pub const PLAIN_PROMPT: &[u8] = b"334 \r\n";

/// Standard alphabet; padding accepted but not required (some clients drop it).
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A SASL mechanism this server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616: one message `authzid NUL authcid NUL passwd`.
    Plain,
    /// The de-facto LOGIN mechanism: user name and password in two base64 lines.
    Login,
}

impl Mechanism {
    /// The name as advertised in the EHLO `AUTH` line.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// Why an AUTH exchange failed before any password was checked. The caller maps each to a
/// reply; the reply named on each variant is the one RFC 4954 asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFault {
    /// `AUTH` without a mechanism, or with more than one word after it: `501 5.5.4`.
    Syntax,
    /// A mechanism other than PLAIN or LOGIN: `504 5.5.4`.
    UnknownMechanism,
    /// The response is not valid base64: `501 5.5.2`.
    BadBase64,
    /// The client answered a challenge with `*`: `501 5.0.0`.
    Cancelled,
    /// A PLAIN message without exactly two NULs, with an authzid other than the authcid, or
    /// with an empty user or password: `501 5.5.2`.
    Malformed,
    /// A response over [`MAX_RESPONSE`] base64 octets or [`MAX_CREDENTIALS`] decoded:
    /// `500 5.5.6`.
    TooLong,
}

/// Splits the argument of `AUTH` (everything after `AUTH `) into the mechanism and the
/// initial response, still base64. An initial response of `=` (RFC 4954: present but empty)
/// comes back as `Some(b"")`; `None` means there was none and the caller sends a challenge.
pub fn parse_auth(arg: &[u8]) -> Result<(Mechanism, Option<&[u8]>), AuthFault> {
    let arg = arg.trim_ascii();
    let (name, rest) = match arg.iter().position(|&b| b == b' ') {
        Some(sp) => (&arg[..sp], Some(arg[sp + 1..].trim_ascii_start())),
        None => (arg, None),
    };
    if name.is_empty() {
        return Err(AuthFault::Syntax);
    }
    let mechanism = if name.eq_ignore_ascii_case(b"PLAIN") {
        Mechanism::Plain
    } else if name.eq_ignore_ascii_case(b"LOGIN") {
        Mechanism::Login
    } else {
        return Err(AuthFault::UnknownMechanism);
    };
    let initial = match rest {
        None => None,
        Some(r) if r.iter().any(|b| b.is_ascii_whitespace()) => return Err(AuthFault::Syntax),
        Some(r) if r.len() > MAX_RESPONSE => return Err(AuthFault::TooLong),
        Some(b"=") => Some(&b""[..]),
        Some(r) => Some(r),
    };
    Ok((mechanism, initial))
}

/// A user name and password taken from an AUTH exchange. The buffers are meant to be reused
/// from one exchange to the next; [`Credentials::clear`] overwrites them first, and so does
/// dropping them. `Debug` never shows the password.
#[derive(Default)]
pub struct Credentials {
    /// The authentication identity (PLAIN authcid, LOGIN user name).
    pub user: Vec<u8>,
    /// The password.
    pub pass: Vec<u8>,
}

impl Credentials {
    /// Empty credentials with room for typical names and passwords.
    pub fn new() -> Credentials {
        Credentials { user: Vec::with_capacity(64), pass: Vec::with_capacity(64) }
    }

    /// Overwrites both buffers with zeros and empties them, keeping their capacity.
    pub fn clear(&mut self) {
        wipe(&mut self.user);
        wipe(&mut self.pass);
    }

    /// Overwrites and empties the password only (the user name stays for logging).
    pub fn clear_pass(&mut self) {
        wipe(&mut self.pass);
    }
}

impl Drop for Credentials {
    fn drop(&mut self) {
        self.clear();
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &String::from_utf8_lossy(&self.user))
            .field("pass", &"<redacted>")
            .finish()
    }
}

/// Zeroes `v` and empties it. `black_box` keeps the stores from being optimised away as dead.
fn wipe(v: &mut Vec<u8>) {
    v.fill(0);
    std::hint::black_box(v.as_slice());
    v.clear();
}

/// Decodes base64 `b64` into `out` (wiped first; wiped again on error).
fn decode_into(b64: &[u8], out: &mut Vec<u8>) -> Result<(), AuthFault> {
    wipe(out);
    if b64.len() > MAX_RESPONSE {
        return Err(AuthFault::TooLong);
    }
    if B64.decode_vec(b64, out).is_err() {
        wipe(out);
        return Err(AuthFault::BadBase64);
    }
    if out.len() > MAX_CREDENTIALS {
        wipe(out);
        return Err(AuthFault::TooLong);
    }
    Ok(())
}

/// Decodes a PLAIN message (`[authzid] NUL authcid NUL passwd`, base64) into `out`. The
/// authzid must be empty or equal to the authcid (no acting as another user); user and
/// password must be non-empty. On error `out` is left empty.
pub fn decode_plain(b64: &[u8], out: &mut Credentials) -> Result<(), AuthFault> {
    out.clear();
    // Decode into the password buffer, then move the parts into place.
    decode_into(b64, &mut out.pass)?;
    let r = split_plain(out);
    if r.is_err() {
        out.clear();
    }
    r
}

fn split_plain(out: &mut Credentials) -> Result<(), AuthFault> {
    let msg = &out.pass;
    let Some(first) = msg.iter().position(|&b| b == 0) else { return Err(AuthFault::Malformed) };
    let Some(second) = msg[first + 1..].iter().position(|&b| b == 0).map(|i| first + 1 + i) else {
        return Err(AuthFault::Malformed);
    };
    let (authzid, authcid, passwd) = (&msg[..first], &msg[first + 1..second], &msg[second + 1..]);
    if passwd.contains(&0) || authcid.is_empty() || passwd.is_empty() {
        return Err(AuthFault::Malformed);
    }
    if !authzid.is_empty() && authzid != authcid {
        return Err(AuthFault::Malformed);
    }
    out.user.extend_from_slice(authcid);
    // Shift the password to the front and zero the bytes it leaves behind.
    let start = second + 1;
    let len = out.pass.len() - start;
    out.pass.copy_within(start.., 0);
    out.pass[len..].fill(0);
    std::hint::black_box(out.pass.as_slice());
    out.pass.truncate(len);
    Ok(())
}

/// Decodes one base64 client line (a LOGIN answer, or the PLAIN message sent after an empty
/// challenge) into `out`, which is wiped first and left empty on error. A line of exactly `*`
/// cancels the exchange. An empty line decodes to nothing; the caller decides whether that
/// is acceptable.
pub fn decode_line(b64: &[u8], out: &mut Vec<u8>) -> Result<(), AuthFault> {
    if b64 == b"*" {
        wipe(out);
        return Err(AuthFault::Cancelled);
    }
    decode_into(b64, out)
}

/// Hashes `pass` with Argon2id, the library's default cost parameters and a random salt from
/// the OS, returning the PHC string for an `--auth-file` line.
pub fn hash_password(pass: &[u8]) -> Result<String, password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default().hash_password(pass, &salt)?.to_string())
}

/// The PHC string verified for unknown users: the parameters [`hash_password`] uses, a fixed
/// salt and an all-zero output no password produces.
fn dummy_hash() -> String {
    format!(
        "$argon2id$v={}$m={},t={},p={}$c2x1aWNlLWR1bW15LXNhbHQ${}",
        Version::default() as u32,
        Params::DEFAULT_M_COST,
        Params::DEFAULT_T_COST,
        Params::DEFAULT_P_COST,
        base64::engine::general_purpose::STANDARD_NO_PAD.encode([0u8; Params::DEFAULT_OUTPUT_LEN]),
    )
}

/// The users allowed to AUTH, from `--auth-file`. Every hash is parsed and checked when the
/// file is loaded, so a bad file stops the relay at start rather than at the first login.
pub struct AuthFile {
    /// User name to PHC string, both already validated.
    users: HashMap<Box<[u8]>, Box<str>>,
    /// Verified for unknown users so they cost as much time as known ones.
    dummy: Box<str>,
}

impl fmt::Debug for AuthFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthFile").field("users", &self.users.len()).finish()
    }
}

/// What is wrong with an auth file.
#[derive(Debug)]
pub enum AuthFileErrorKind {
    /// The file could not be read.
    Unreadable(std::io::Error),
    /// A line without the `:` between user and hash.
    NoColon,
    /// Nothing before the `:`.
    EmptyUser,
    /// Whitespace inside the user name.
    UserWhitespace,
    /// The hash is not a well-formed PHC string (or its Argon2 parameters are invalid).
    BadHash(password_hash::Error),
    /// A PHC string for an algorithm other than argon2id, argon2i or argon2d.
    UnsupportedAlgorithm(String),
    /// The same user twice; the first was on the given line.
    DuplicateUser(String, usize),
}

/// A fault in an auth file: where it is and what is wrong.
#[derive(Debug)]
pub struct AuthFileError {
    /// The file, when the caller read it from one (`config::load_auth_file`).
    pub path: Option<PathBuf>,
    /// 1-based line number; 0 when the fault is not about one line (an unreadable file).
    pub line: usize,
    /// What is wrong.
    pub kind: AuthFileErrorKind,
}

impl fmt::Display for AuthFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("auth file")?;
        if let Some(p) = &self.path {
            write!(f, " {}", p.display())?;
        }
        if self.line > 0 {
            write!(f, " line {}", self.line)?;
        }
        f.write_str(": ")?;
        match &self.kind {
            AuthFileErrorKind::Unreadable(e) => write!(f, "cannot read: {e}"),
            AuthFileErrorKind::NoColon => f.write_str("expected user:hash, found no ':'"),
            AuthFileErrorKind::EmptyUser => f.write_str("empty user name before ':'"),
            AuthFileErrorKind::UserWhitespace => f.write_str("user name contains whitespace"),
            AuthFileErrorKind::BadHash(e) => write!(f, "hash is not a valid PHC string: {e}"),
            AuthFileErrorKind::UnsupportedAlgorithm(a) => {
                write!(f, "unsupported hash algorithm {a:?} (expected argon2id, argon2i or argon2d)")
            }
            AuthFileErrorKind::DuplicateUser(u, first) => {
                write!(f, "duplicate user {u:?} (first on line {first})")
            }
        }
    }
}

impl std::error::Error for AuthFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            AuthFileErrorKind::Unreadable(e) => Some(e),
            AuthFileErrorKind::BadHash(e) => Some(e),
            _ => None,
        }
    }
}

/// Checks that `phc` is a PHC string Argon2 can verify against.
fn check_phc(phc: &str) -> Result<(), AuthFileErrorKind> {
    let hash = PasswordHash::new(phc).map_err(AuthFileErrorKind::BadHash)?;
    if Algorithm::try_from(hash.algorithm).is_err() {
        return Err(AuthFileErrorKind::UnsupportedAlgorithm(hash.algorithm.as_str().to_owned()));
    }
    let bad = AuthFileErrorKind::BadHash;
    if let Some(v) = hash.version {
        Version::try_from(v).map_err(|_| bad(password_hash::Error::Version))?;
    }
    Params::try_from(&hash).map_err(bad)?;
    let (Some(salt), Some(_)) = (hash.salt, &hash.hash) else {
        return Err(bad(password_hash::Error::PhcStringField));
    };
    let mut buf = [0u8; 64];
    let salt = salt.decode_b64(&mut buf).map_err(bad)?;
    if salt.len() < argon2::MIN_SALT_LEN {
        return Err(bad(password_hash::Error::SaltInvalid(password_hash::errors::InvalidValue::TooShort)));
    }
    Ok(())
}

/// Runs Argon2 for `pass` against `phc`.
fn verify_phc(phc: &str, pass: &[u8]) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default().verify_password(pass, &hash).is_ok(),
        Err(_) => false,
    }
}

impl AuthFile {
    /// Parses auth-file contents: `user:PHC-hash` lines; blank lines and lines starting with
    /// `#` are skipped, surrounding whitespace is ignored.
    pub fn parse(content: &str) -> Result<AuthFile, AuthFileError> {
        let mut users: HashMap<Box<[u8]>, Box<str>> = HashMap::new();
        let mut first_line: HashMap<Box<[u8]>, usize> = HashMap::new();
        for (i, raw) in content.lines().enumerate() {
            let line_no = i + 1;
            let err = |kind| AuthFileError { path: None, line: line_no, kind };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, phc)) = line.split_once(':') else { return Err(err(AuthFileErrorKind::NoColon)) };
            if user.is_empty() {
                return Err(err(AuthFileErrorKind::EmptyUser));
            }
            if user.chars().any(char::is_whitespace) {
                return Err(err(AuthFileErrorKind::UserWhitespace));
            }
            check_phc(phc).map_err(err)?;
            let key: Box<[u8]> = user.as_bytes().into();
            if let Some(&first) = first_line.get(&key) {
                return Err(err(AuthFileErrorKind::DuplicateUser(user.to_owned(), first)));
            }
            first_line.insert(key.clone(), line_no);
            users.insert(key, phc.into());
        }
        Ok(AuthFile { users, dummy: dummy_hash().into() })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when the file lists no users (every AUTH will fail).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True when `user` is listed.
    pub fn contains(&self, user: &[u8]) -> bool {
        self.users.contains_key(user)
    }

    /// Checks `pass` for `user` (Argon2: milliseconds; call it off the event loop). An unknown
    /// user still costs one verification, against a fixed hash with [`hash_password`]'s
    /// parameters, so response time does not reveal which users exist.
    pub fn verify(&self, user: &[u8], pass: &[u8]) -> bool {
        match self.users.get(user) {
            Some(phc) => verify_phc(phc, pass),
            None => {
                let _ = std::hint::black_box(verify_phc(&self.dummy, pass));
                false
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn b64(s: &[u8]) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.encode(s).into_bytes()
    }

    /// A valid hash with the smallest Argon2 costs, so tests stay quick.
    pub(crate) fn cheap_hash(pass: &[u8]) -> String {
        let params = Params::new(8, 1, 1, None).unwrap();
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params).hash_password(pass, &salt).unwrap().to_string()
    }

    #[test]
    fn parse_auth_table() {
        use Mechanism::*;
        type Parsed<'a> = (&'a [u8], Mechanism, Option<&'a [u8]>);
        let ok: &[Parsed] = &[
            (b"PLAIN", Plain, None),
            (b"plain", Plain, None),
            (b"Login", Login, None),
            (b"LOGIN dXNlcg==", Login, Some(b"dXNlcg==")),
            (b"PLAIN dGVzdAB0ZXN0AHBhc3M=", Plain, Some(b"dGVzdAB0ZXN0AHBhc3M=")),
            (b"PLAIN =", Plain, Some(b"")),
            (b"PLAIN  abc ", Plain, Some(b"abc")),
        ];
        for &(arg, mech, initial) in ok {
            assert_eq!(parse_auth(arg), Ok((mech, initial)), "{}", String::from_utf8_lossy(arg));
        }
        let long = [b"PLAIN ".as_slice(), &vec![b'A'; MAX_RESPONSE + 1]].concat();
        let bad: &[(&[u8], AuthFault)] = &[
            (b"", AuthFault::Syntax),
            (b"   ", AuthFault::Syntax),
            (b"CRAM-MD5", AuthFault::UnknownMechanism),
            (b"PLAINX abc", AuthFault::UnknownMechanism),
            (b"XOAUTH2 abc", AuthFault::UnknownMechanism),
            (b"PLAIN abc def", AuthFault::Syntax),
            (&long, AuthFault::TooLong),
        ];
        for &(arg, fault) in bad {
            assert_eq!(parse_auth(arg), Err(fault), "{}", String::from_utf8_lossy(arg));
        }
    }

    #[test]
    fn decode_plain_table() {
        type UserPass<'a> = Result<(&'a [u8], &'a [u8]), AuthFault>;
        let cases: &[(&[u8], UserPass)] = &[
            (b"\0test\0pass", Ok((b"test", b"pass"))),
            (b"test\0test\0pass", Ok((b"test", b"pass"))),
            (b"\0user@example.com\0p a:ss\xff", Ok((b"user@example.com", b"p a:ss\xff"))),
            (b"admin\0test\0pass", Err(AuthFault::Malformed)),
            (b"test\0pass", Err(AuthFault::Malformed)),
            (b"testpass", Err(AuthFault::Malformed)),
            (b"\0\0pass", Err(AuthFault::Malformed)),
            (b"\0test\0", Err(AuthFault::Malformed)),
            (b"\0test\0pa\0ss", Err(AuthFault::Malformed)),
            (b"", Err(AuthFault::Malformed)),
        ];
        let mut creds = Credentials::new();
        for &(msg, want) in cases {
            creds.user.extend_from_slice(b"stale");
            creds.pass.extend_from_slice(b"stale");
            let got = decode_plain(&b64(msg), &mut creds);
            let label = String::from_utf8_lossy(msg);
            match want {
                Ok((user, pass)) => {
                    assert_eq!(got, Ok(()), "{label:?}");
                    assert_eq!(creds.user, user, "{label:?}");
                    assert_eq!(creds.pass, pass, "{label:?}");
                }
                Err(fault) => {
                    assert_eq!(got, Err(fault), "{label:?}");
                    assert!(creds.user.is_empty() && creds.pass.is_empty(), "{label:?}");
                }
            }
        }
        assert_eq!(decode_plain(b"AHRlc3QAcGFzcw", &mut creds), Ok(()), "unpadded base64 accepted");
        assert_eq!(creds.pass, b"pass");
        for bad in [&b"!!!!"[..], b"AHRlc3Q AcGFzcw==", b"=", b"A"] {
            assert_eq!(decode_plain(bad, &mut creds), Err(AuthFault::BadBase64), "{bad:?}");
            assert!(creds.user.is_empty() && creds.pass.is_empty());
        }
        let big = [b"\0u\0".as_slice(), &vec![b'p'; MAX_CREDENTIALS]].concat();
        assert_eq!(decode_plain(&b64(&big), &mut creds), Err(AuthFault::TooLong));
        assert_eq!(decode_plain(&vec![b'A'; MAX_RESPONSE + 4], &mut creds), Err(AuthFault::TooLong));
    }

    #[test]
    fn decode_line_table() {
        let mut out = b"old".to_vec();
        assert_eq!(decode_line(b"*", &mut out), Err(AuthFault::Cancelled));
        assert!(out.is_empty());
        assert_eq!(decode_line(b"VXNlcm5hbWU6", &mut out), Ok(()));
        assert_eq!(out, b"Username:");
        assert_eq!(decode_line(b"dXNlcg==", &mut out), Ok(()));
        assert_eq!(out, b"user", "previous contents replaced");
        assert_eq!(decode_line(b"", &mut out), Ok(()));
        assert!(out.is_empty());
        assert_eq!(decode_line(b"**", &mut out), Err(AuthFault::BadBase64));
        assert_eq!(decode_line(b"dXN lcg==", &mut out), Err(AuthFault::BadBase64));
        assert!(out.is_empty());
        assert_eq!(decode_line(&vec![b'A'; MAX_RESPONSE + 4], &mut out), Err(AuthFault::TooLong));
    }

    #[test]
    fn prompts_decode_to_their_words() {
        let mut out = Vec::new();
        decode_line(&LOGIN_USER_PROMPT[4..LOGIN_USER_PROMPT.len() - 2], &mut out).unwrap();
        assert_eq!(out, b"Username:");
        decode_line(&LOGIN_PASS_PROMPT[4..LOGIN_PASS_PROMPT.len() - 2], &mut out).unwrap();
        assert_eq!(out, b"Password:");
    }

    #[test]
    fn credentials_clear_and_debug() {
        let mut c = Credentials::new();
        c.user.extend_from_slice(b"alice");
        c.pass.extend_from_slice(b"hunter2");
        let shown = format!("{c:?}");
        assert!(shown.contains("alice") && !shown.contains("hunter2"), "{shown}");
        let cap = c.pass.capacity();
        c.clear_pass();
        assert!(c.pass.is_empty() && c.user == b"alice");
        c.clear();
        assert!(c.user.is_empty() && c.pass.capacity() == cap);
    }

    #[test]
    fn auth_file_parse_errors_name_the_line() {
        let good = cheap_hash(b"pw");
        let cases: Vec<(String, usize, &str)> = vec![
            ("alice".into(), 1, "no ':'"),
            (format!("# c\n\n:{good}"), 3, "empty user"),
            (format!("bob smith:{good}"), 1, "whitespace"),
            ("bob:nothash".into(), 1, "not a valid PHC"),
            ("bob:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA".into(), 1, "not a valid PHC"),
            ("bob:$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA".into(), 1, "PHC"),
            ("bob:$argon2id$v=19$m=8,t=1,p=1$c2FsdA$AAAAAAAAAAAAAAAAAAAAAA".into(), 1, "salt"),
            ("bob:$scrypt$ln=15,r=8,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA".into(), 1, "unsupported"),
            (format!("alice:{good}\n\n  # x\nalice:{good}"), 4, "duplicate user \"alice\" (first on line 1)"),
        ];
        for (content, line, what) in cases {
            let e = AuthFile::parse(&content).expect_err(&content);
            assert_eq!(e.line, line, "{content}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("line {line}")) && msg.contains(what), "{content}: {msg}");
        }
    }

    #[test]
    fn hash_then_verify_round_trip() {
        let phc = hash_password(b"correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        let f = AuthFile::parse(&format!("alice:{phc}\nbob:{}\n", cheap_hash(b"b0b"))).unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.verify(b"alice", b"correct horse"));
        assert!(!f.verify(b"alice", b"correct horsE"));
        assert!(!f.verify(b"alice", b""));
        assert!(f.verify(b"bob", b"b0b"));
        assert!(!f.verify(b"bob", b"correct horse"));
        assert!(!f.verify(b"Alice", b"correct horse"), "user names are case-sensitive");
        assert!(!f.verify(b"mallory", b"correct horse"));
    }

    #[test]
    fn dummy_hash_matches_hash_password_parameters() {
        let dummy = dummy_hash();
        check_phc(&dummy).unwrap();
        let real = hash_password(b"x").unwrap();
        let params = |s: &str| s.split('$').take(4).collect::<Vec<_>>().join("$");
        assert_eq!(params(&dummy), params(&real));
        let f = AuthFile::parse("").unwrap();
        assert!(f.is_empty());
        assert!(!f.verify(b"nobody", b"x"));
        assert!(!f.verify(b"", b""));
    }
}
