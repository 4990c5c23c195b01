//! DKIM signing (RFC 6376, RFC 8301, RFC 8463): which keys sign a message, and the
//! `DKIM-Signature` fields they produce.
//!
//! Owns: choosing the signing domain (the From: header's domain, or its nearest parent with
//! keys), the signed header list (SPEC "Egress sources, DKIM": From oversigned), relaxed/
//! relaxed hashing ([`canon`]), and assembling one signature field per key. Must never: do
//! I/O (keys come in parsed, time and randomness as arguments: the worker thread in
//! `reactor::dkimwork` calls it), copy the body (it is hashed where it lies), or panic on a
//! message (any bytes the client sent).

pub mod canon;
pub mod key;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::digest::{Context, SHA256};

use canon::Field;
pub use key::{Algorithm, KeyError, KeyTable, SigningKey};

/// The header fields signed when present, in `h=` order (SPEC "Egress sources, DKIM"). From
/// is listed once more than it appears (oversigning, RFC 6376 §8.15): a From: added on the way
/// breaks the signature.
pub const SIGNED_HEADERS: [&str; 16] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
];

/// Why a message goes out without a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsigned {
    /// No domain of the From: address has keys (the usual case for a relay's foreign mail).
    NoKey,
    /// No From: header (RFC 5322 §3.6 requires exactly one).
    NoFrom,
    /// More than one From: header: which domain would sign is ambiguous.
    SeveralFrom,
    /// A From: header without an address whose domain can be read.
    BadFrom,
    /// The signer failed.
    Failed,
}

impl Unsigned {
    /// The log value (`dkim=`).
    pub fn as_str(self) -> &'static str {
        match self {
            Unsigned::NoKey => "none",
            Unsigned::NoFrom => "unsigned:no-from",
            Unsigned::SeveralFrom => "unsigned:several-from",
            Unsigned::BadFrom => "unsigned:bad-from",
            Unsigned::Failed => "unsigned:sign-failed",
        }
    }
}

/// What signing did to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Signed: `domain:selector` of each signature, comma-separated (the `dkim=` log value).
    Signed(String),
    /// Not signed, and why.
    Unsigned(Unsigned),
}

impl Outcome {
    /// The `dkim=` log value.
    pub fn as_str(&self) -> &str {
        match self {
            Outcome::Signed(s) => s,
            Outcome::Unsigned(u) => u.as_str(),
        }
    }
}

/// Scratch space for signing, kept by each worker so that a message costs no allocation for
/// its field list or hash input once the buffers have grown.
#[derive(Debug, Default)]
pub struct Signer {
    fields: Vec<Field>,
    data: Vec<u8>,
    sig: Vec<u8>,
}

impl Signer {
    /// A signer with empty scratch space.
    pub fn new() -> Signer {
        Signer::default()
    }

    /// Signs `msg` (header and body, CRLF lines, as stored) with every key of its From:
    /// domain (or nearest parent with keys) and appends one `DKIM-Signature` field per key to
    /// `out`, each ending in CRLF, to go before the message. `unix_s` is the `t=` tag.
    pub fn sign(
        &mut self,
        keys: &KeyTable,
        msg: &[u8],
        unix_s: u64,
        rng: &dyn aws_lc_rs::rand::SecureRandom,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let body_start = canon::split_header(msg, &mut self.fields);
        let mut froms = self.fields.iter().filter(|f| f.name(msg).eq_ignore_ascii_case(b"From"));
        let from = match (froms.next(), froms.next()) {
            (None, _) => return Outcome::Unsigned(Unsigned::NoFrom),
            (Some(_), Some(_)) => return Outcome::Unsigned(Unsigned::SeveralFrom),
            (Some(f), None) => *f,
        };
        let mut domain_buf = String::new();
        if !from_domain(from.value(msg), &mut domain_buf) {
            return Outcome::Unsigned(Unsigned::BadFrom);
        }
        let Some((domain, domain_keys)) = keys.lookup(&domain_buf) else {
            return Outcome::Unsigned(Unsigned::NoKey);
        };
        // One body hash serves every key.
        let mut body_hash = Context::new(&SHA256);
        canon::relaxed_body(&msg[body_start..], |s| body_hash.update(s));
        let bh = B64.encode(body_hash.finish());
        let names = self.signed_names(msg);

        let start = out.len();
        let mut label = String::new();
        for k in domain_keys {
            let field_start = out.len();
            signature_field(k.algorithm(), domain, &k.selector, unix_s, &names, &bh, out);
            self.data.clear();
            hash_input(msg, &self.fields, &names, &out[field_start..], &mut self.data);
            self.sig.clear();
            if k.sign(&self.data, rng, &mut self.sig).is_err() {
                out.truncate(start);
                return Outcome::Unsigned(Unsigned::Failed);
            }
            fold_b64(&B64.encode(&self.sig), out);
            out.extend_from_slice(b"\r\n");
            if !label.is_empty() {
                label.push(',');
            }
            label.push_str(domain);
            label.push(':');
            label.push_str(&k.selector);
        }
        Outcome::Signed(label)
    }

    /// The `h=` list: each of [`SIGNED_HEADERS`] as often as it is present, From once more.
    fn signed_names(&self, msg: &[u8]) -> Vec<&'static str> {
        let mut names = Vec::with_capacity(SIGNED_HEADERS.len() + 1);
        for name in SIGNED_HEADERS {
            let n = self.fields.iter().filter(|f| f.name(msg).eq_ignore_ascii_case(name.as_bytes())).count();
            let n = if name == "From" { n + 1 } else { n };
            names.extend(std::iter::repeat_n(name, n));
        }
        names
    }
}

/// Writes a `DKIM-Signature` field up to and including `b=` (the value is added once
/// signed). Lines are folded with CRLF TAB, which the relaxed form turns into one space.
fn signature_field(
    alg: Algorithm,
    domain: &str,
    selector: &str,
    unix_s: u64,
    names: &[&str],
    bh: &str,
    out: &mut Vec<u8>,
) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "DKIM-Signature: v=1; a={}; c=relaxed/relaxed;\r\n\td={domain}; s={selector}; t={unix_s};\r\n\th=",
        alg.tag()
    );
    let mut col = 3;
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            out.push(b':');
            col += 1;
        }
        if col + n.len() > 76 {
            out.extend_from_slice(b"\r\n\t");
            col = 1;
        }
        out.extend(n.bytes().map(|b| b.to_ascii_lowercase()));
        col += n.len();
    }
    let _ = write!(out, ";\r\n\tbh={bh};\r\n\tb=");
}

/// The signature's base64 after `b=`, folded every 72 characters (FWS is allowed inside the
/// value, RFC 6376 §3.5, and verifiers remove it).
fn fold_b64(b64: &str, out: &mut Vec<u8>) {
    for (i, chunk) in b64.as_bytes().chunks(72).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n\t");
        }
        out.extend_from_slice(chunk);
    }
}

/// The data a signature covers (RFC 6376 §3.7, §5.4.2): for each name of `names`, the next
/// instance of that field from the bottom of the header (none once they run out), in relaxed
/// form; then the signature field itself (`sig_field`, its `b=` value empty) in relaxed form
/// without the final CRLF.
pub fn hash_input(msg: &[u8], fields: &[Field], names: &[&str], sig_field: &[u8], data: &mut Vec<u8>) {
    for (i, name) in names.iter().enumerate() {
        // The how-manyth use of this name in the list picks the how-manyth field from the
        // bottom.
        let nth = names[..i].iter().filter(|n| n.eq_ignore_ascii_case(name)).count();
        let f = fields.iter().rev().filter(|f| f.name(msg).eq_ignore_ascii_case(name.as_bytes())).nth(nth);
        if let Some(f) = f {
            canon::relaxed_header(f.name(msg), f.value(msg), data);
        }
    }
    let colon = memchr::memchr(b':', sig_field).unwrap_or(0);
    canon::relaxed_header(&sig_field[..colon], &sig_field[colon + 1..], data);
    data.truncate(data.len() - 2);
}

/// Appends to `out` the `domain:selector` of each `DKIM-Signature` field at the very top of a
/// stored message (the ones this relay put there), comma-separated, or `none`: the `dkim=`
/// value of the delivery log lines, read from the stored bytes so that it needs no state
/// beside the message.
pub fn signed_by(msg: &[u8], out: &mut String) {
    let start = out.len();
    let mut pos = 0;
    while msg.len() - pos > 15 && msg[pos..pos + 15].eq_ignore_ascii_case(b"DKIM-Signature:") {
        // The field runs over its continuation lines.
        let mut end = pos;
        loop {
            end = memchr::memchr(b'\n', &msg[end..]).map_or(msg.len(), |i| end + i + 1);
            if !matches!(msg.get(end), Some(b' ' | b'\t')) {
                break;
            }
        }
        let (mut d, mut sel) = (&b""[..], &b""[..]);
        for tag in msg[pos + 15..end].split(|&b| b == b';') {
            let tag = tag.trim_ascii();
            if let Some(v) = tag.strip_prefix(b"d=") {
                d = v.trim_ascii();
            } else if let Some(v) = tag.strip_prefix(b"s=") {
                sel = v.trim_ascii();
            }
        }
        if out.len() > start {
            out.push(',');
        }
        out.push_str(&String::from_utf8_lossy(d));
        out.push(':');
        out.push_str(&String::from_utf8_lossy(sel));
        pos = end;
    }
    if out.len() == start {
        out.push_str("none");
    }
}

/// Reads the domain of the one address of a From: value (RFC 5322 §3.6.2) into `out`, in
/// lower case: the `<addr-spec>` of a name-addr, else the bare addr-spec; comments and the
/// display name are skipped. False when there is no `local@domain` to read.
pub fn from_domain(value: &[u8], out: &mut String) -> bool {
    out.clear();
    let mut relaxed = Vec::with_capacity(value.len());
    canon::relaxed_value(value, &mut relaxed);
    let v = relaxed.as_slice();
    // The angle-bracketed address wins; a '<' inside a quoted display name is skipped by
    // taking the last one.
    let addr = match (memchr::memrchr(b'<', v), memchr::memrchr(b'>', v)) {
        (Some(l), Some(r)) if l < r => &v[l + 1..r],
        _ => strip_comments(v),
    };
    let Some(at) = memchr::memrchr(b'@', addr) else { return false };
    let domain = addr[at + 1..].trim_ascii();
    let domain = domain.strip_prefix(b"[").map_or(domain, |_| &[][..]);
    match std::str::from_utf8(domain) {
        Ok(d) if key::is_domain(d) => {
            out.push_str(&d.trim_end_matches('.').to_ascii_lowercase());
            true
        }
        _ => false,
    }
}

/// A bare addr-spec up to its first comment: `user@example.com (Joe)` -> `user@example.com`.
fn strip_comments(v: &[u8]) -> &[u8] {
    let end = memchr::memchr(b'(', v).unwrap_or(v.len());
    v[..end].trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;

    fn ed_key(sel: &str) -> SigningKey {
        let seed = B64.decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=").unwrap();
        SigningKey::ed25519_from_seed(sel, &seed).unwrap()
    }

    /// RFC 8463 Appendix A: the example message.
    const RFC8463_MSG: &[u8] = b"From: Joe SixPack <joe@football.example.com>\r\n\
To: Suzie Q <suzie@shopping.example.net>\r\n\
Subject: Is dinner ready?\r\n\
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n\
Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n\
\r\n\
Hi.\r\n\
\r\n\
We lost the game.  Are you hungry yet?\r\n\
\r\n\
Joe.\r\n";

    /// RFC 8463 §A.3: the Ed25519 signature of the example, reproduced from its own tags
    /// (Ed25519 is deterministic, so the `b=` value must match to the bit).
    #[test]
    fn rfc8463_ed25519_vector() {
        let mut fields = Vec::new();
        let body_start = canon::split_header(RFC8463_MSG, &mut fields);
        let mut bh = Context::new(&SHA256);
        canon::relaxed_body(&RFC8463_MSG[body_start..], |s| bh.update(s));
        assert_eq!(B64.encode(bh.finish()), "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=");

        let sig_field = b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n \
d=football.example.com; i=@football.example.com;\r\n \
q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n \
subject : date : message-id : from : subject : date;\r\n \
bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n \
b=";
        let names = ["from", "to", "subject", "date", "message-id", "from", "subject", "date"];
        let mut data = Vec::new();
        hash_input(RFC8463_MSG, &fields, &names, sig_field, &mut data);
        let mut sig = Vec::new();
        ed_key("brisbane").sign(&data, &SystemRandom::new(), &mut sig).unwrap();
        assert_eq!(
            B64.encode(&sig),
            "/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11BusFa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw=="
        );
    }

    fn table(domain: &str, keys: Vec<SigningKey>) -> KeyTable {
        let mut t = KeyTable::new();
        for k in keys {
            t.insert(domain, k);
        }
        t
    }

    #[test]
    fn signs_once_per_key_with_from_oversigned() {
        let keys = table("football.example.com", vec![ed_key("s1"), ed_key("s2")]);
        let mut out = Vec::new();
        let outcome = Signer::new().sign(&keys, RFC8463_MSG, 1_700_000_000, &SystemRandom::new(), &mut out);
        assert_eq!(outcome.as_str(), "football.example.com:s1,football.example.com:s2");
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;").count(), 2);
        assert!(text.contains("h=from:from:subject:date:to:message-id;"), "{text}");
        assert!(text.contains("t=1700000000;"));
        assert!(text.contains("bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;"));
        assert!(text.ends_with("\r\n") && !text.contains("\r\n\r\n"));
        // Every line of the fields is short enough for any MTA.
        assert!(text.split("\r\n").all(|l| l.len() <= 78), "{text}");
    }

    #[test]
    fn unsigned_cases() {
        let keys = table("example.com", vec![ed_key("s1")]);
        let cases: [(&[u8], Unsigned); 4] = [
            (b"To: a@b\r\n\r\nhi\r\n", Unsigned::NoFrom),
            (b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nhi\r\n", Unsigned::SeveralFrom),
            (b"From: undisclosed\r\n\r\nhi\r\n", Unsigned::BadFrom),
            (b"From: a@example.org\r\n\r\nhi\r\n", Unsigned::NoKey),
        ];
        for (msg, want) in cases {
            let mut out = Vec::new();
            let got = Signer::new().sign(&keys, msg, 0, &SystemRandom::new(), &mut out);
            assert_eq!(got, Outcome::Unsigned(want));
            assert!(out.is_empty());
        }
    }

    #[test]
    fn signed_by_reads_the_fields_it_wrote() {
        let keys = table("football.example.com", vec![ed_key("s1"), ed_key("s2")]);
        let mut msg = Vec::new();
        Signer::new().sign(&keys, RFC8463_MSG, 5, &SystemRandom::new(), &mut msg);
        msg.extend_from_slice(RFC8463_MSG);
        let mut out = String::new();
        signed_by(&msg, &mut out);
        assert_eq!(out, "football.example.com:s1,football.example.com:s2");
        out.clear();
        signed_by(RFC8463_MSG, &mut out);
        assert_eq!(out, "none");
        out.clear();
        signed_by(b"DKIM-Signature: x", &mut out);
        assert_eq!(out, ":");
    }

    #[test]
    fn from_domain_table() {
        let cases: [(&[u8], Option<&str>); 9] = [
            (b" joe@Example.COM\r\n", Some("example.com")),
            (b" Joe <joe@a.example.com>\r\n", Some("a.example.com")),
            (b" \"Doe, <x@evil.org>\" <joe@example.com>\r\n", Some("example.com")),
            (b" joe@example.com (Joe)\r\n", Some("example.com")),
            (b" Joe\r\n <joe@example.com>\r\n", Some("example.com")),
            (b" <joe@[192.0.2.1]>\r\n", None),
            (b" nobody\r\n", None),
            (b" <>\r\n", None),
            (b" joe@exa mple.com\r\n", None),
        ];
        let mut d = String::new();
        for (v, want) in cases {
            let ok = from_domain(v, &mut d);
            assert_eq!(ok.then_some(d.as_str()), want, "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn signature_verifies_with_ring() {
        // The signature (made by aws-lc-rs) checks, with another implementation (ring), against
        // the public key over the data hash_input rebuilds from the signed output: what a
        // verifier does.
        let keys = table("football.example.com", vec![ed_key("s1")]);
        let mut out = Vec::new();
        Signer::new().sign(&keys, RFC8463_MSG, 5, &SystemRandom::new(), &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        let b_at = text.find("\tb=").unwrap() + 3;
        let b: String = text[b_at..].chars().filter(|c| !c.is_whitespace()).collect();
        let sig = B64.decode(b).unwrap();
        let mut fields = Vec::new();
        canon::split_header(RFC8463_MSG, &mut fields);
        let names = ["from", "from", "subject", "date", "to", "message-id"];
        let mut data = Vec::new();
        hash_input(RFC8463_MSG, &fields, &names, &out[..b_at], &mut data);
        let hash = ring::digest::digest(&SHA256, &data);
        let public = B64.decode("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=").unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public).verify(hash.as_ref(), &sig).unwrap();
    }
}
