//! Certificates for the instruments: a self-signed server certificate generated with rcgen,
//! for `sink --starttls`/`--listen-tls` without `--tls-cert`, and for `bench --tls` (the relay
//! under test reads it from files).
//!
//! Owns: generating the pair and writing it as PEM files. Must never: name rustls types (the
//! relay's `sluice::net::tls` is the one seam, and it loads PEM files), or run after start-up.

use anyhow::{Context, Result};
use sluice::net::tls::ServerTls;
use std::path::{Path, PathBuf};

/// Host names (and addresses) every generated certificate is valid for, beside the caller's.
const NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Writes a fresh self-signed certificate for `localhost`, the loopback addresses and
/// `extra` names into `dir` as `cert.pem` and `key.pem`; returns (cert, key) paths.
pub fn write_self_signed(dir: &Path, extra: &[&str]) -> Result<(PathBuf, PathBuf)> {
    let mut names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    names.extend(extra.iter().filter(|n| !n.is_empty() && !NAMES.contains(n)).map(|n| n.to_string()));
    let ck = rcgen::generate_simple_self_signed(names).context("generating a self-signed certificate")?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).with_context(|| format!("writing {}", cert.display()))?;
    std::fs::write(&key, ck.key_pair.serialize_pem()).with_context(|| format!("writing {}", key.display()))?;
    Ok((cert, key))
}

/// A generated self-signed server certificate, loaded. The PEM files go through a private
/// temporary directory (the seam loads files), removed before returning.
pub fn self_signed_server(extra: &[&str]) -> Result<ServerTls> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sluice-load-cert-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let loaded = write_self_signed(&dir, extra)
        .and_then(|(cert, key)| ServerTls::load(&cert, &key).map_err(|e| anyhow::anyhow!("{e}")));
    let _ = std::fs::remove_dir_all(&dir);
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_loads() {
        assert!(self_signed_server(&["sink.example.test"]).is_ok());
    }
}
