//! The validated, immutable configuration of `sluice serve`, built once from the flags, with
//! the fixed protocol replies rendered to bytes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use crate::cli::{self, Cidr, DkimKeyArg, FsyncMode, OutboundTlsMode, RelayTlsMode, ServeArgs};
use crate::delivery::sources::Sources;
use crate::dkim::{KeyTable, SigningKey};
use crate::log::LogFormat;
use crate::net::inbound::InboundConfig;
use crate::net::tls::{ClientTls, ServerTls, TlsError};
use crate::shaping::Rules;
use crate::smtp::auth::{AuthFile, AuthFileError, AuthFileErrorKind};
use crate::smtp::client_auth::RelayCredentials;
use crate::smtp::client_limit::ClientLimits;
use crate::smtp::server::SessionConfig;

/// Everything the relay needs to run, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Plain listeners.
    pub listen: Vec<SocketAddr>,
    /// Listeners set SO_REUSEPORT (`--reuse-port`): several processes share the port.
    pub reuse_port: bool,
    /// Host name used on the wire.
    pub hostname: String,
    /// Spool directory.
    pub spool: PathBuf,
    /// Sync before 250.
    pub fsync: bool,
    /// Networks allowed to relay.
    pub allow: Vec<Cidr>,
    /// Inbound connection cap.
    pub max_connections: usize,
    /// `--max-connections-per-ip` and `--max-connection-rate-per-ip`.
    pub client_limits: ClientLimits,
    /// `--limit-allowed-clients`: the per-client limits apply to `--allow` networks too.
    pub limit_allowed_clients: bool,
    /// `--min-data-rate`, bytes per second (0: off).
    pub min_data_rate: u32,
    /// Command-phase idle timeout.
    pub command_timeout: Duration,
    /// DATA/BDAT idle timeout.
    pub data_timeout: Duration,
    /// SIGTERM grace for sessions mid-message.
    pub shutdown_grace: Duration,
    /// Spool segment size.
    pub segment_size: u64,
    /// Filesystem space new mail never takes (`--min-free-space`).
    pub min_free_space: u64,
    /// Log format.
    pub log_format: LogFormat,
    /// Session constants and rendered replies.
    pub session: SessionConfig,
    /// `--relay-host` as (host, port).
    pub relay_host: Option<(String, u16)>,
    /// `--smtp-port`.
    pub smtp_port: u16,
    /// `--domain-concurrency`.
    pub domain_concurrency: u32,
    /// `--retry-schedule`.
    pub retry_schedule: Vec<Duration>,
    /// `--max-queue-lifetime`.
    pub max_queue_lifetime: Duration,
    /// `--dns`, or the first nameserver of /etc/resolv.conf (None: no resolver available).
    pub dns: Option<SocketAddr>,
    /// `--hold`: no deliveries.
    pub hold: bool,
    /// `--connect-timeout`.
    pub connect_timeout: Duration,
    /// `--smtp-timeout`: cap on each client phase timeout.
    pub smtp_timeout: Duration,
    /// Implicit-TLS listeners.
    pub listen_tls: Vec<SocketAddr>,
    /// `--tls-cert` and `--tls-key` (paths kept for SIGHUP reloads) and the pair loaded at start.
    pub tls: Option<(PathBuf, PathBuf, ServerTls)>,
    /// `--tls-handshake-timeout`.
    pub tls_handshake_timeout: Duration,
    /// `--auth-file`, parsed.
    pub auth: Option<Arc<AuthFile>>,
    /// `--outbound-tls`.
    pub outbound_tls: OutboundTlsMode,
    /// The TLS client settings for deliveries (STARTTLS without a certificate check).
    pub client_tls: ClientTls,
    /// The same with the certificate checked against `--tls-ca-file` (when `verify` is used
    /// by `--outbound-tls` or a shaping rule).
    pub client_tls_verified: Option<ClientTls>,
    /// `--shaping`, `--no-builtin-shaping`: the file (kept for SIGHUP) and the rules loaded.
    pub shaping_file: Option<PathBuf>,
    /// Whether the built-in profiles are loaded.
    pub builtin_shaping: bool,
    /// The rules in force at start.
    pub shaping: Rules,
    /// DKIM signing: where the keys came from and the table loaded from them (`None`: no
    /// key configured, nothing is signed).
    pub dkim: Option<DkimConfig>,
    /// `--relay-tls`, or `starttls` when `--relay-auth-file` is given: replaces
    /// `--outbound-tls` and any shaping rule for the relay host.
    pub relay_tls: Option<RelayTlsMode>,
    /// `--relay-auth-file`, parsed.
    pub relay_auth: Option<Arc<RelayCredentials>>,
    /// `--source`, `--pool`, `--user-pool`, checked against each other.
    pub sources: Arc<Sources>,
    /// `--require-fcrdns`: a source failing its start-up FCrDNS check stops the relay.
    pub require_fcrdns: bool,
    /// Problems worth a `warning` line at start that do not stop it: (flag, detail).
    pub warnings: Vec<(&'static str, String)>,
}

/// `--dkim-key`, `--dkim-dir`, `--dkim-threads`, and the keys they gave at start.
#[derive(Debug, Clone)]
pub struct DkimConfig {
    /// `--dkim-key` (repeatable).
    pub keys: Vec<DkimKeyArg>,
    /// `--dkim-dir`.
    pub dir: Option<PathBuf>,
    /// `--dkim-threads`.
    pub threads: usize,
    /// The keys, parsed once (again on SIGHUP: [`load_dkim`]).
    pub table: Arc<KeyTable>,
}

/// A configuration problem, naming the flag.
#[derive(Debug)]
pub struct ConfigError {
    /// The flag at fault.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid value for '{}': {}", self.flag, self.message)
    }
}

impl ConfigError {
    /// A certificate or key problem: the error names its flag (`--tls-cert ...: ...`).
    fn tls(e: &TlsError) -> ConfigError {
        let flag = e.flag();
        let text = e.to_string();
        let message = text.strip_prefix(flag).unwrap_or(&text).trim_start_matches(':').trim().to_owned();
        ConfigError { flag, message }
    }
}

impl Config {
    /// What the inbound driver needs.
    pub fn inbound(&self) -> InboundConfig {
        InboundConfig {
            session: self.session.clone(),
            command_timeout: self.command_timeout,
            data_timeout: self.data_timeout,
            min_data_rate: self.min_data_rate,
            tls_handshake_timeout: self.tls_handshake_timeout,
            max_connections: self.max_connections,
            allow: self.allow.clone(),
            limit_allowed_clients: self.limit_allowed_clients,
            sources: Arc::clone(&self.sources),
        }
    }
    /// Validates the flags into a configuration.
    pub fn from_args(a: &ServeArgs) -> Result<Config, ConfigError> {
        let err = |flag, message: &str| Err(ConfigError { flag, message: message.to_owned() });
        if a.tls_cert.is_some() != a.tls_key.is_some() {
            return err("--tls-cert", "--tls-cert and --tls-key must be given together");
        }
        if !a.listen_tls.is_empty() && a.tls_cert.is_none() {
            return err("--listen-tls", "an implicit-TLS listener needs --tls-cert and --tls-key");
        }
        let tls = match (&a.tls_cert, &a.tls_key) {
            (Some(cert), Some(key)) => {
                let loaded = ServerTls::load(cert, key).map_err(|e| ConfigError::tls(&e))?;
                Some((cert.clone(), key.clone(), loaded))
            }
            _ => None,
        };
        if a.auth_file.is_some() && tls.is_none() {
            return err("--auth-file", "AUTH is only offered inside TLS: give --tls-cert and --tls-key too");
        }
        let auth = match &a.auth_file {
            Some(path) => Some(Arc::new(
                load_auth_file(path).map_err(|e| ConfigError { flag: "--auth-file", message: e.to_string() })?,
            )),
            None => None,
        };
        let mut warnings = Vec::new();
        let relay_auth = match &a.relay_auth_file {
            Some(_) if a.relay_host.is_none() => {
                return err("--relay-auth-file", "credentials are for a smarthost: give --relay-host too")
            }
            Some(path) => {
                let (creds, warning) =
                    load_relay_auth_file(path).map_err(|message| ConfigError { flag: "--relay-auth-file", message })?;
                warnings.extend(warning.map(|w| ("--relay-auth-file", w)));
                Some(Arc::new(creds))
            }
            None => None,
        };
        if a.relay_tls.is_some() && a.relay_host.is_none() {
            return err("--relay-tls", "TLS to a smarthost: give --relay-host too");
        }
        let relay_tls = a.relay_tls.or(relay_auth.as_ref().map(|_| RelayTlsMode::Starttls));
        let shaping = load_shaping(a.shaping.as_deref(), !a.no_builtin_shaping)?;
        let verified = a.outbound_tls == OutboundTlsMode::Verify || shaping.uses_verify() || relay_tls.is_some();
        let client_tls_verified =
            if verified { Some(ClientTls::verified(&a.tls_ca_file).map_err(|e| ConfigError::tls(&e))?) } else { None };
        let hostname = match &a.hostname {
            Some(h) => h.clone(),
            None => system_hostname(),
        };
        let segment_size = a.spool_segment_size.max(64 * 1024);
        let dkim = if a.dkim_key.is_empty() && a.dkim_dir.is_none() {
            None
        } else {
            let table = load_dkim(&a.dkim_key, a.dkim_dir.as_deref())?;
            Some(DkimConfig {
                keys: a.dkim_key.clone(),
                dir: a.dkim_dir.clone(),
                threads: a.dkim_threads as usize,
                table: Arc::new(table),
            })
        };
        let users: Vec<(String, String)> = a.user_pool.iter().map(|u| (u.user.clone(), u.pool.clone())).collect();
        let sources = Sources::build(a.source.clone(), &a.pool, &users)
            .map_err(|e| ConfigError { flag: e.flag, message: e.message })?;
        if a.require_fcrdns && sources.is_empty() {
            return err("--require-fcrdns", "there is no --source to check");
        }
        Ok(Config {
            listen: a.listen.clone(),
            reuse_port: a.reuse_port,
            hostname: hostname.clone(),
            spool: a.spool.clone(),
            fsync: a.fsync == FsyncMode::Always,
            allow: a.allow.clone(),
            max_connections: a.max_connections as usize,
            client_limits: ClientLimits {
                max_open: a.max_connections_per_ip,
                per_minute: a.max_connection_rate_per_ip,
            },
            limit_allowed_clients: a.limit_allowed_clients,
            min_data_rate: a.min_data_rate,
            command_timeout: a.command_timeout,
            data_timeout: a.data_timeout,
            shutdown_grace: a.shutdown_grace,
            segment_size,
            // As Postfix refuses mail below 1.5 x message_size_limit of free space.
            min_free_space: a.min_free_space.unwrap_or(a.max_message_size.saturating_mul(3) / 2),
            log_format: a.log_format.into(),
            session: SessionConfig::new(&hostname, a.max_message_size, a.max_recipients as usize)
                .with_features(tls.is_some(), auth.is_some()),
            relay_host: a.relay_host.as_ref().map(|h| (h.host.clone(), h.port.unwrap_or(25))),
            smtp_port: a.smtp_port,
            domain_concurrency: a.domain_concurrency,
            retry_schedule: a.retry_schedule.0.clone(),
            max_queue_lifetime: a.max_queue_lifetime,
            dns: a.dns.or_else(crate::net::dns::system_nameserver),
            hold: a.hold,
            connect_timeout: a.connect_timeout,
            smtp_timeout: a.smtp_timeout,
            listen_tls: a.listen_tls.clone(),
            tls,
            tls_handshake_timeout: a.tls_handshake_timeout,
            auth,
            outbound_tls: a.outbound_tls,
            client_tls: ClientTls::unverified(),
            client_tls_verified,
            shaping_file: a.shaping.clone(),
            builtin_shaping: !a.no_builtin_shaping,
            shaping,
            dkim,
            relay_tls,
            relay_auth,
            sources: Arc::new(sources),
            require_fcrdns: a.require_fcrdns,
            warnings,
        })
    }
}

// The clap enums stay in `cli`; the modules that act on a choice own a plain enum of their own.
impl From<cli::LogFormat> for LogFormat {
    fn from(f: cli::LogFormat) -> LogFormat {
        match f {
            cli::LogFormat::Text => LogFormat::Text,
            cli::LogFormat::Json => LogFormat::Json,
        }
    }
}

/// Reads `--shaping` (if given) over the built-in profiles (if `builtin`); errors name the
/// flag, the file, the line and the key.
pub fn load_shaping(path: Option<&Path>, builtin: bool) -> Result<Rules, ConfigError> {
    let text = match path {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| ConfigError { flag: "--shaping", message: format!("{}: {e}", p.display()) })?,
        ),
        None => None,
    };
    let name = path.map(|p| p.display().to_string()).unwrap_or_default();
    Rules::load(text.as_deref().map(|t| (name.as_str(), t)), builtin)
        .map_err(|e| ConfigError { flag: "--shaping", message: e.to_string() })
}

/// Reads and parses `--auth-file` (the parser in `smtp::auth` is pure: it sees only the text);
/// errors name the path.
pub fn load_auth_file(path: &Path) -> Result<AuthFile, AuthFileError> {
    let content = std::fs::read_to_string(path).map_err(|e| AuthFileError {
        path: Some(path.to_owned()),
        line: 0,
        kind: AuthFileErrorKind::Unreadable(e),
    })?;
    AuthFile::parse(&content).map_err(|e| AuthFileError { path: Some(path.to_owned()), ..e })
}

/// Reads `--relay-auth-file` (the parser in `smtp::client_auth` is pure): the credentials,
/// and a warning when the file is readable by its group or by everyone. Postfix reads its
/// `smtp_sasl_password_maps` whatever the mode and only documents `chmod 600`; so does this,
/// rather than refusing a file that works with Postfix. Errors name the path, never a line
/// of the file.
pub fn load_relay_auth_file(path: &Path) -> Result<(RelayCredentials, Option<String>), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let creds = RelayCredentials::parse(&text).map_err(|e| format!("{shown}: {e}"))?;
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0o600);
    let warning = (mode & 0o077 != 0).then(|| {
        format!("{shown} holds a password and is readable by group or others (mode {:03o}): chmod 600 it", mode & 0o777)
    });
    Ok((creds, warning))
}

/// The kernel's host name (Linux), or `localhost` when it cannot be read or is not a domain.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && crate::smtp::command::valid_domain(s.as_bytes()))
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Reads and parses every DKIM key: each `--dkim-key`, then every `DIR/DOMAIN/SELECTOR.pem`
/// of `--dkim-dir` (directories whose name is no domain, and files not ending in `.pem`, are
/// skipped). Any key that cannot be read or used is an error naming the flag and the key, at
/// start (exit 2) and on SIGHUP (the old keys stay).
pub fn load_dkim(keys: &[DkimKeyArg], dir: Option<&Path>) -> Result<KeyTable, ConfigError> {
    let mut table = KeyTable::new();
    for k in keys {
        let key = read_key(&k.selector, &k.pem)
            .map_err(|why| ConfigError { flag: "--dkim-key", message: format!("{k}: {why}") })?;
        table.insert(&k.domain, key);
    }
    let Some(dir) = dir else { return Ok(table) };
    let err = |path: &Path, why: &dyn std::fmt::Display| ConfigError {
        flag: "--dkim-dir",
        message: format!("{}: {why}", path.display()),
    };
    let mut domains: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, &e))?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .collect();
    // Sorted, so that a domain's keys sign in a stable order.
    domains.sort_by_key(|e| e.file_name());
    for d in domains {
        let Some(domain) = d.file_name().to_str().filter(|n| crate::dkim::key::is_domain(n)).map(str::to_owned) else {
            continue;
        };
        let mut files: Vec<_> =
            std::fs::read_dir(d.path()).map_err(|e| err(&d.path(), &e))?.filter_map(Result::ok).collect();
        files.sort_by_key(|e| e.file_name());
        for f in files {
            let path = f.path();
            let Some(selector) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".pem")) else {
                continue;
            };
            if !crate::dkim::key::is_selector(selector) {
                return Err(err(&path, &"the file name is not SELECTOR.pem"));
            }
            let key = read_key(selector, &path).map_err(|why| err(&path, &why))?;
            table.insert(&domain, key);
        }
    }
    Ok(table)
}

fn read_key(selector: &str, path: &Path) -> Result<SigningKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    SigningKey::from_pem(selector, &pem).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::auth::tests::cheap_hash;

    #[test]
    fn auth_file_load_names_the_path() {
        let dir = std::env::temp_dir().join(format!("sluice-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users");
        let e = load_auth_file(&path).unwrap_err();
        assert!(matches!(e.kind, AuthFileErrorKind::Unreadable(_)));
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        std::fs::write(&path, "x\n").unwrap();
        let e = load_auth_file(&path).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains("line 1"), "{msg}");
        std::fs::write(&path, format!("# users\n carol:{} \r\n", cheap_hash(b"pw"))).unwrap();
        let f = load_auth_file(&path).unwrap();
        assert_eq!(f.len(), 1);
        assert!(f.contains(b"carol"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
