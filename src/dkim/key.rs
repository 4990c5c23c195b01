//! DKIM signing keys: parsing a PEM private key (RFC 8301 RSA, RFC 8463 Ed25519), the public
//! key record to publish, and the table of keys by signing domain.
//!
//! Owns: what counts as a usable key (RSA of 1024 to 8192 bits, PKCS#8 or PKCS#1; Ed25519 in
//! PKCS#8), the `v=DKIM1` TXT record (RFC 6376 §3.6.1), and finding the keys of a domain or its
//! nearest parent. Must never: read files (the caller hands the PEM bytes in), or keep a key
//! it could not sign with.

use std::collections::HashMap;
use std::fmt;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::PrivateKeyDer;

use sluice_smallrsa::{SmallRsa, SmallRsaError};

/// The signing algorithm of a key (the `a=` tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `rsa-sha256` (RFC 6376 §3.3.1; RFC 8301 keeps it as the only RSA one).
    RsaSha256,
    /// `ed25519-sha256` (RFC 8463 §3).
    Ed25519Sha256,
}

impl Algorithm {
    /// The `a=` tag value.
    pub fn tag(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa-sha256",
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }

    /// The `k=` value of the key record.
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa",
            Algorithm::Ed25519Sha256 => "ed25519",
        }
    }
}

/// Why a PEM file is not a usable signing key. Each variant is one fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// No `PRIVATE KEY` / `RSA PRIVATE KEY` section.
    NoPrivateKey,
    /// An EC (SEC1) key: DKIM signs with RSA or Ed25519 only.
    Unsupported,
    /// A PKCS#8 or PKCS#1 key that neither RSA nor Ed25519 accepts.
    Invalid(String),
    /// An RSA key under 1024 bits (RFC 8301 §3.2: verifiers must reject it).
    RsaTooSmall(usize),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::NoPrivateKey => f.write_str("no PEM private key in it"),
            KeyError::Unsupported => f.write_str("an EC key: DKIM keys are RSA or Ed25519"),
            KeyError::Invalid(why) => write!(f, "not a usable RSA or Ed25519 private key ({why})"),
            KeyError::RsaTooSmall(bits) => write!(f, "RSA key of {bits} bits, under the 1024 of RFC 8301"),
        }
    }
}

impl std::error::Error for KeyError {}

enum Pair {
    Rsa(RsaKeyPair),
    /// 1024 to 2047 bits, which aws-lc-rs refuses: AWS-LC's C API signs them.
    SmallRsa(SmallRsa),
    Ed25519(Ed25519KeyPair),
}

/// One key: the selector it is published under and the private key.
pub struct SigningKey {
    /// The `s=` tag.
    pub selector: String,
    pair: Pair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("selector", &self.selector).field("alg", &self.algorithm()).finish()
    }
}

impl SigningKey {
    /// Parses a PEM private key: PKCS#8 (RSA or Ed25519) or PKCS#1 (RSA).
    pub fn from_pem(selector: &str, pem: &[u8]) -> Result<SigningKey, KeyError> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| KeyError::NoPrivateKey)?;
        let pair = match &der {
            PrivateKeyDer::Pkcs8(k) => {
                let der = k.secret_pkcs8_der();
                // OpenSSL writes Ed25519 keys as PKCS#8 v1 (no public key inside).
                match Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                    Ok(ed) => Pair::Ed25519(ed),
                    Err(_) => rsa(RsaKeyPair::from_pkcs8(der), der, true)?,
                }
            }
            PrivateKeyDer::Pkcs1(k) => rsa(RsaKeyPair::from_der(k.secret_pkcs1_der()), k.secret_pkcs1_der(), false)?,
            _ => return Err(KeyError::Unsupported),
        };
        Ok(SigningKey { selector: selector.to_owned(), pair })
    }

    /// An Ed25519 key from its 32-byte seed (RFC 8032 §5.1.5), as RFC 8463's example gives it.
    pub fn ed25519_from_seed(selector: &str, seed: &[u8]) -> Result<SigningKey, KeyError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| KeyError::Invalid("Ed25519 seed".into()))?;
        Ok(SigningKey { selector: selector.to_owned(), pair: Pair::Ed25519(pair) })
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        match self.pair {
            Pair::Rsa(_) | Pair::SmallRsa(_) => Algorithm::RsaSha256,
            Pair::Ed25519(_) => Algorithm::Ed25519Sha256,
        }
    }

    /// Signs the hash input of RFC 6376 §3.7 (`data`: the canonical header fields and the
    /// signature field without its `b=` value) and appends the raw signature to `sig`. RSA
    /// signs with RSASSA-PKCS1-v1_5 over SHA-256 of the data; Ed25519 signs the SHA-256 hash
    /// of the data itself (RFC 8463 §3: PureEdDSA over the hash).
    pub fn sign(
        &self,
        data: &[u8],
        rng: &dyn aws_lc_rs::rand::SecureRandom,
        sig: &mut Vec<u8>,
    ) -> Result<(), SignError> {
        match &self.pair {
            Pair::Rsa(k) => {
                let start = sig.len();
                sig.resize(start + k.public_modulus_len(), 0);
                k.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, rng, data, &mut sig[start..]).map_err(|_| SignError)
            }
            Pair::SmallRsa(k) => k.sign(data, sig).map_err(|_| SignError),
            Pair::Ed25519(k) => {
                let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
                sig.extend_from_slice(k.sign(hash.as_ref()).as_ref());
                Ok(())
            }
        }
    }

    /// The `p=` value: base64 of the SubjectPublicKeyInfo for RSA (what verifiers and
    /// `opendkim-genkey` use), of the raw 32-byte key for Ed25519 (RFC 8463 §4.2).
    pub fn public_b64(&self) -> String {
        match &self.pair {
            Pair::Rsa(k) => B64.encode(rsa_spki(k.public_key().as_ref())),
            Pair::SmallRsa(k) => B64.encode(rsa_spki(&k.public_pkcs1())),
            Pair::Ed25519(k) => B64.encode(k.public_key().as_ref()),
        }
    }

    /// The TXT record value to publish at `SELECTOR._domainkey.DOMAIN` (RFC 6376 §3.6.1).
    pub fn record(&self) -> String {
        format!("v=DKIM1; k={}; p={}", self.algorithm().key_type(), self.public_b64())
    }
}

/// The signer failed (aws-lc-rs reports no detail; it does not happen with a key that parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignError;

/// The RSA key aws-lc-rs parsed, or for one it found too small, the same DER through
/// [`SmallRsa`] when it has at least 1024 bits (`pkcs8`: the DER's form).
fn rsa(r: Result<RsaKeyPair, aws_lc_rs::error::KeyRejected>, der: &[u8], pkcs8: bool) -> Result<Pair, KeyError> {
    match r {
        Ok(k) => Ok(Pair::Rsa(k)),
        Err(e) if e.description_() == "TooSmall" => match SmallRsa::parse(der, pkcs8) {
            Ok(k) => Ok(Pair::SmallRsa(k)),
            Err(SmallRsaError::Size(bits)) => Err(KeyError::RsaTooSmall(bits)),
            Err(SmallRsaError::Invalid) => Err(KeyError::Invalid("an RSA key whose values do not agree".into())),
        },
        Err(e) => Err(KeyError::Invalid(e.description_().to_owned())),
    }
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (RFC 5280 §4.1, rsaEncryption).
fn rsa_spki(rsa_public_key: &[u8]) -> Vec<u8> {
    const ALG: &[u8] = &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let mut bits = Vec::with_capacity(rsa_public_key.len() + 8);
    der_header(0x03, rsa_public_key.len() + 1, &mut bits);
    bits.push(0);
    bits.extend_from_slice(rsa_public_key);
    let mut out = Vec::with_capacity(bits.len() + ALG.len() + 8);
    der_header(0x30, ALG.len() + bits.len(), &mut out);
    out.extend_from_slice(ALG);
    out.extend_from_slice(&bits);
    out
}

fn der_header(tag: u8, len: usize, out: &mut Vec<u8>) {
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Every key, by signing domain (lower case, no trailing dot).
#[derive(Debug, Default)]
pub struct KeyTable {
    by_domain: HashMap<String, Vec<SigningKey>>,
    keys: usize,
}

impl KeyTable {
    /// No keys.
    pub fn new() -> KeyTable {
        KeyTable::default()
    }

    /// Adds a key for `domain`; a domain's keys sign in the order they were added.
    pub fn insert(&mut self, domain: &str, key: SigningKey) {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.by_domain.entry(domain).or_default().push(key);
        self.keys += 1;
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys
    }

    /// No keys at all.
    pub fn is_empty(&self) -> bool {
        self.keys == 0
    }

    /// How many domains have keys.
    pub fn domains(&self) -> usize {
        self.by_domain.len()
    }

    /// The keys for `domain` (lower case): its own, or those of the nearest parent domain that
    /// has some, with that domain (the `d=` tag).
    pub fn lookup<'a>(&'a self, mut domain: &'a str) -> Option<(&'a str, &'a [SigningKey])> {
        loop {
            if let Some((d, keys)) = self.by_domain.get_key_value(domain) {
                return Some((d.as_str(), keys.as_slice()));
            }
            domain = &domain[domain.find('.')? + 1..];
        }
    }
}

/// The zone-file line publishing `record` at `SELECTOR._domainkey.DOMAIN.`, the value split
/// into quoted strings of at most 255 octets (RFC 1035 §3.3.14; verifiers join them, RFC
/// 6376 §3.6.2.2), as an RSA-2048 record is longer than one.
pub fn zone_line(domain: &str, selector: &str, record: &str) -> String {
    let mut line = format!("{selector}._domainkey.{}. IN TXT", domain.trim_end_matches('.'));
    // The record is ASCII (tags and base64), so any byte boundary is a char boundary.
    for chunk in record.as_bytes().chunks(255) {
        line.push_str(" \"");
        line.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        line.push('"');
    }
    line
}

/// A DKIM domain as `--dkim-key` takes it: dot-separated labels of letters, digits and
/// hyphens (RFC 1035 §2.3.1; RFC 5890 A-labels fit), at most 253 octets, not starting or
/// ending a label with a hyphen.
pub fn is_domain(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A selector: like a domain (RFC 6376 §3.1: `sub-domain *( "." sub-domain )`).
pub fn is_selector(s: &str) -> bool {
    is_domain(s) && !s.ends_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8463 §A.2's key: the seed and the public key it gives.
    #[test]
    fn ed25519_seed_gives_rfc8463_public_key() {
        let seed = B64.decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=").unwrap();
        let k = SigningKey::ed25519_from_seed("brisbane", &seed).unwrap();
        assert_eq!(k.public_b64(), "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=");
        assert_eq!(k.record(), "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=");
    }

    #[test]
    fn lookup_walks_up_to_the_nearest_parent() {
        let seed = [7u8; 32];
        let mut t = KeyTable::new();
        t.insert("Example.COM.", SigningKey::ed25519_from_seed("a", &seed).unwrap());
        t.insert("example.com", SigningKey::ed25519_from_seed("b", &seed).unwrap());
        t.insert("deep.sub.example.com", SigningKey::ed25519_from_seed("c", &seed).unwrap());
        assert_eq!((t.len(), t.domains()), (3, 2));
        let (d, keys) = t.lookup("mail.example.com").unwrap();
        assert_eq!(d, "example.com");
        assert_eq!(keys.iter().map(|k| k.selector.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(t.lookup("x.deep.sub.example.com").unwrap().0, "deep.sub.example.com");
        assert!(t.lookup("example.org").is_none());
        assert!(t.lookup("com").is_none());
    }

    #[test]
    fn bad_pem_is_named() {
        assert_eq!(SigningKey::from_pem("s", b"hello").unwrap_err(), KeyError::NoPrivateKey);
        let junk = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(SigningKey::from_pem("s", junk).unwrap_err(), KeyError::Invalid(_)));
    }

    #[test]
    fn zone_line_splits_long_records() {
        let short = zone_line("example.com.", "s1", "v=DKIM1; k=ed25519; p=abc");
        assert_eq!(short, "s1._domainkey.example.com. IN TXT \"v=DKIM1; k=ed25519; p=abc\"");
        let long = format!("v=DKIM1; k=rsa; p={}", "A".repeat(392));
        let line = zone_line("example.com", "s1", &long);
        let parts: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len(), 255);
        assert_eq!(parts.concat(), long);
    }

    #[test]
    fn domain_syntax() {
        for ok in ["example.com", "a.b-c.d", "x", "example.com.", "xn--bcher-kva.example"] {
            assert!(is_domain(ok), "{ok}");
        }
        for bad in ["", ".", "a..b", "-a.b", "a-.b", "a b", "a_b.c", "exa:mple", &"a".repeat(64)] {
            assert!(!is_domain(bad), "{bad}");
        }
    }

    /// An RSA-2048 key made and written as `sluice dkim-keygen` does signs RSASSA-PKCS1-v1_5
    /// over SHA-256 (RFC 8301), checked by another implementation (ring); `p=` is the SPKI.
    #[test]
    fn rsa_2048_signs_and_another_implementation_verifies() {
        use aws_lc_rs::encoding::AsDer as _;
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let b64 = B64.encode(pair.as_der().unwrap().as_ref());
        let body: Vec<&str> = b64.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap()).collect();
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", body.join("\n"));
        let k = SigningKey::from_pem("s", pem.as_bytes()).unwrap();
        assert_eq!(k.algorithm(), Algorithm::RsaSha256);
        let mut sig = b"prefix".to_vec();
        k.sign(b"the data", &aws_lc_rs::rand::SystemRandom::new(), &mut sig).unwrap();
        assert_eq!((&sig[..6], sig.len()), (&b"prefix"[..], 6 + 256));
        let public = pair.public_key().as_ref();
        let key = ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, public);
        key.verify(b"the data", &sig[6..]).unwrap();
        assert_eq!(B64.decode(k.public_b64()).unwrap(), rsa_spki(public));
        assert!(k.record().starts_with("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A"));
    }

    /// RFC 8301 allows RSA keys from 1024 bits, which aws-lc-rs refuses: a 1024-bit key signs
    /// through `SmallRsa`, and aws-lc-rs's verifier takes the signature and the `p=` key.
    #[test]
    fn rsa_1024_signs_and_verifies() {
        let k = SigningKey::from_pem("s", RSA_1024.as_bytes()).unwrap();
        assert_eq!(k.algorithm(), Algorithm::RsaSha256);
        let mut sig = b"prefix".to_vec();
        k.sign(b"the data", &aws_lc_rs::rand::SystemRandom::new(), &mut sig).unwrap();
        assert_eq!((&sig[..6], sig.len()), (&b"prefix"[..], 6 + 128));
        let spki = B64.decode(k.public_b64()).unwrap();
        assert!(k.record().starts_with("v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQ"));
        // The SPKI's BIT STRING holds the PKCS#1 RSAPublicKey the verifier takes.
        let public = &spki[spki.len() - 140..];
        use aws_lc_rs::signature::{UnparsedPublicKey, RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY as ALG};
        UnparsedPublicKey::new(&ALG, public).verify(b"the data", &sig[6..]).unwrap();
        assert!(UnparsedPublicKey::new(&ALG, public).verify(b"other data", &sig[6..]).is_err());
    }

    /// Under RFC 8301's 1024 bits: refused with the size.
    #[test]
    fn rsa_512_is_refused_with_its_size() {
        assert_eq!(SigningKey::from_pem("s", RSA_512.as_bytes()).unwrap_err(), KeyError::RsaTooSmall(512));
    }

    /// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:512`, a test key.
    const RSA_512: &str = "-----BEGIN PRIVATE KEY-----\n\
MIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEAzuZwh+fvj1tY4u3S\n\
F6SVqdbxdny8Cb0pVZGUbcfEl6+zKgJMTaJzbTnCVREsucXtbcstUk0RqAcFXyT4\n\
GVPv6wIDAQABAkEAk+vO0muxK1YMs5mCFiM2WUnyMls1eOUD00iUzPQBCsxp0h9N\n\
Up3/93QLafIyd4KUTHyYS0AhpaXCS5aMFU8lIQIhAPpv+iitecWHBhRpO+xYA42D\n\
eFjzry963nVQ9da44JaxAiEA037nQaNSEwSsM/0Zrn+H0O+zTBcbIK0s4+eEw6HK\n\
D1sCIQDRM51LQa7JXMOtZUMTaWp+Wma8F8Qt63vNkHXsir/B4QIhAKtPxshPH2MS\n\
TN5LrGrBGGUwU95VdP7R52Ovm8XPHlmzAiA+Q/SEITf2KG3v9lQdhFPsqNE1D6sp\n\
4sYR+RkD2HhEnA==\n\
-----END PRIVATE KEY-----\n";

    /// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024` (PKCS#8), a test key.
    const RSA_1024: &str = "-----BEGIN PRIVATE KEY-----\n\
MIICdQIBADANBgkqhkiG9w0BAQEFAASCAl8wggJbAgEAAoGBAKuXyjEANTJJRhTy\n\
FDJVcj4q/6312BDJPiHuOplMtjOkwVJU2FZcKjalTa+YD6uFvM5wod9Ho9CU6KS9\n\
lJZAz3clPkS596JLhFNtSUUFQD1MPh4ECOON4vIoqkqiaZvza+NxVWFaKFpJZswA\n\
Y+qBYgNJln1G41oKUnDuFcnPscJ/AgMBAAECgYAH548l4LeSoHN9BYXOp8cCfCKZ\n\
FeklJNAa6gmDBFikWmOZclUg7U/4gnbort2R7jA7Zk7epUMzmZh59k3A+i1UYWeE\n\
JPT2uALETC7YnQmq9DQxDcii+bXXsr/odVp36PLY/O3+PVA3ZBSs16m5svQTO5HD\n\
F/Qnw9ZPhauiV5AAqQJBAN6VQzI/gjhIRf9Zrkg9KXEPPfwo7n4ANXA+78FmU/O5\n\
KND0inwgQ/VjvKjAPwL5IjnYJ9mcDr5WCG3jH52lmBsCQQDFWsb7CHRzGRcZuJLD\n\
Q1qWUPD9+tuttP9R7xxcpupu4vvE15/ksRx+PCJkkKUTlePj0cfXVmlmb52rbkaL\n\
De1tAkA9ayqTnvqr1SWbhH+W52mcDPyprBHDKwOT6Yn27+mSgzFEF3ZvMegOumrA\n\
levNQjmzhHXakjlvRAYnbFi5A4ypAkACWIji9P/FWnf+00XTUlqiTMYAjtnLn8ol\n\
JC13IHjK5qHNfi6lXkGTco2KGnoL2I1D6PtyINHR6OO75OyrvHelAkAOJxDtTSbx\n\
5VyK6Y9j2hjpGXxtJKQSUlRGcPDBTAmbD+EFbSLkgv3N4W+V+bfnULs7Xum7RuJn\n\
FKkOfmLLQ/kH\n\
-----END PRIVATE KEY-----\n";

    #[test]
    fn spki_length_encoding() {
        let mut v = Vec::new();
        der_header(0x30, 0x10, &mut v);
        der_header(0x30, 0x80, &mut v);
        der_header(0x30, 0x10e, &mut v);
        assert_eq!(v, [0x30, 0x10, 0x30, 0x81, 0x80, 0x30, 0x82, 0x01, 0x0e]);
    }
}
