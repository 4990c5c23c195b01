//! The command line (clap) and its value parsers: durations, sizes, CIDRs, host:port.
//!
//! A bad value makes clap exit with status 2 and a message naming the flag (SPEC "Command
//! line"). The value parsers are pure functions, unit-tested below.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `sluice`: a single-threaded, high-throughput SMTP relay.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the relay.
    Serve(Box<ServeArgs>),
    /// Read a password on stdin and print a `USER:HASH` line for --auth-file.
    Passwd {
        /// User name.
        user: String,
    },
    /// Show what is queued in a spool (safe while the relay runs).
    Queue(QueueArgs),
    /// Make a DKIM key and print the DNS record to publish.
    DkimKeygen(KeygenArgs),
}

/// `--fsync` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FsyncMode {
    /// Durable before every `250` (group commit).
    Always,
    /// No sync at all: for benchmarks only.
    Never,
}

/// `--outbound-tls` levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutboundTlsMode {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered; no certificate check; plaintext if the handshake fails.
    May,
    /// TLS required; any certificate.
    Encrypt,
    /// TLS required with a verified certificate.
    Verify,
}

/// `--relay-tls` modes: how the connection to `--relay-host` is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RelayTlsMode {
    /// STARTTLS after EHLO (RFC 3207), required.
    Starttls,
    /// TLS from the first byte (RFC 8314 §3.3, "submissions", usually port 465).
    Implicit,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `key=value` text lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `sluice serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Plain SMTP listener address (repeatable).
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:2525")]
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listener address (repeatable); needs --tls-cert and --tls-key.
    #[arg(long = "listen-tls", value_name = "ADDR")]
    pub listen_tls: Vec<SocketAddr>,
    /// Set SO_REUSEPORT on the listeners, so that several relays (one per core, each with its
    /// own spool) share the port. Off by default: a second relay on the same port then fails
    /// at start instead of silently taking a share of the mail.
    #[arg(long = "reuse-port")]
    pub reuse_port: bool,
    /// Server certificate chain (PEM).
    #[arg(long = "tls-cert", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long = "tls-key", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Name used in the greeting, EHLO, Received and bounces [default: the system host name].
    #[arg(long, value_name = "NAME", value_parser = parse_hostname)]
    pub hostname: Option<String>,
    /// Spool directory (created if missing).
    #[arg(long, value_name = "DIR", default_value = "./sluice-spool")]
    pub spool: PathBuf,
    /// `always`: durable before 250 (group commit); `never`: benchmarks only.
    #[arg(long, value_enum, default_value = "always")]
    pub fsync: FsyncMode,
    /// Client network allowed to relay without AUTH (repeatable).
    #[arg(long = "allow", value_name = "CIDR", value_parser = parse_cidr, default_values = ["127.0.0.0/8", "::1/128"])]
    pub allow: Vec<Cidr>,
    /// File of `user:PHC-hash` lines; enables AUTH PLAIN and LOGIN inside TLS.
    #[arg(long = "auth-file", value_name = "FILE")]
    pub auth_file: Option<PathBuf>,
    /// DNS server (ip:port) for MX/A/AAAA lookups [default: first nameserver in /etc/resolv.conf].
    #[arg(long, value_name = "ADDR", value_parser = parse_dns_addr)]
    pub dns: Option<SocketAddr>,
    /// TCP port used when connecting to an MX host.
    #[arg(long = "smtp-port", value_name = "PORT", default_value_t = 25, value_parser = clap::value_parser!(u16).range(1..))]
    pub smtp_port: u16,
    /// Send everything to this smarthost instead of looking up MX records.
    #[arg(long = "relay-host", value_name = "HOST[:PORT]", value_parser = parse_host_port)]
    pub relay_host: Option<HostPort>,
    /// File with one `user:password` line: AUTH to --relay-host (PLAIN, or LOGIN when only
    /// that is offered), only inside TLS (see --relay-tls), never in the clear. Keep it
    /// `chmod 600`: a group- or world-readable file is used with a warning, as Postfix does
    /// with smtp_sasl_password_maps.
    #[arg(long = "relay-auth-file", value_name = "FILE")]
    pub relay_auth_file: Option<PathBuf>,
    /// TLS to --relay-host, required, its certificate verified against --tls-ca-file for the
    /// relay host's name or IP address (this replaces --outbound-tls): `starttls` (the
    /// default with --relay-auth-file) or `implicit` (TLS from the first byte, RFC 8314).
    #[arg(long = "relay-tls", value_enum, value_name = "MODE")]
    pub relay_tls: Option<RelayTlsMode>,
    /// Largest message accepted, advertised in SIZE (suffixes k, M, G allowed).
    #[arg(long = "max-message-size", value_name = "BYTES", default_value = "52428800", value_parser = parse_size)]
    pub max_message_size: u64,
    /// Recipients per transaction (`452 4.5.3` past it).
    #[arg(long = "max-recipients", value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_recipients: u32,
    /// Inbound connections at once (`421 4.3.2` past it).
    #[arg(long = "max-connections", value_name = "N", default_value_t = 10000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Inbound connections at once from one client address (IPv6: one /64), `421 4.7.0` past
    /// it, as Postfix's smtpd_client_connection_count_limit; 0 turns it off. Clients in
    /// --allow are exempt unless --limit-allowed-clients.
    #[arg(long = "max-connections-per-ip", value_name = "N", default_value_t = 50)]
    pub max_connections_per_ip: u32,
    /// New inbound connections per minute from one client address (`N/min`, `N/s` or `N`
    /// per minute; IPv6: one /64), `421 4.7.0` past it, as Postfix's
    /// smtpd_client_connection_rate_limit; 0 (the default, as in Postfix) turns it off.
    #[arg(long = "max-connection-rate-per-ip", value_name = "RATE", default_value = "0", value_parser = parse_rate_per_minute)]
    pub max_connection_rate_per_ip: u32,
    /// Apply the per-client connection limits to --allow networks too (by default they are
    /// exempt, like Postfix's smtpd_client_event_limit_exceptions = $mynetworks).
    #[arg(long = "limit-allowed-clients")]
    pub limit_allowed_clients: bool,
    /// Least average rate, in bytes per second (`N` or `N/s`), at which DATA and BDAT content
    /// must arrive once --data-timeout has passed since it started (as Postfix's
    /// smtpd_min_data_rate); a slower client gets `421 4.4.2`. 0 turns it off.
    #[arg(long = "min-data-rate", value_name = "BYTES/s", default_value = "256", value_parser = parse_data_rate)]
    pub min_data_rate: u32,
    /// Outbound connections at once to one destination.
    #[arg(long = "domain-concurrency", value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub domain_concurrency: u32,
    /// Delays between delivery attempts after a temporary failure; the last repeats.
    #[arg(long = "retry-schedule", value_name = "LIST", default_value = "1m,5m,15m,30m,1h,2h,4h", value_parser = parse_schedule)]
    pub retry_schedule: Schedule,
    /// Age after which an undelivered message bounces.
    #[arg(long = "max-queue-lifetime", value_name = "DUR", default_value = "5d", value_parser = parse_duration)]
    pub max_queue_lifetime: Duration,
    /// Log line format on stderr.
    #[arg(long = "log-format", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Idle time allowed while waiting for a command (RFC 5321 §4.5.3.2: 5 minutes).
    #[arg(long = "command-timeout", value_name = "DUR", default_value = "5m", value_parser = parse_duration)]
    pub command_timeout: Duration,
    /// Idle time allowed inside DATA or a BDAT chunk (RFC 5321 §4.5.3.2: 3 minutes).
    #[arg(long = "data-timeout", value_name = "DUR", default_value = "3m", value_parser = parse_duration)]
    pub data_timeout: Duration,
    /// On SIGTERM, how long sessions in the middle of a message may take to finish it.
    #[arg(long = "shutdown-grace", value_name = "DUR", default_value = "3s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Delivery: time allowed for a TCP connect to an MX host before the next one is tried.
    #[arg(long = "connect-timeout", value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Delivery: cap on every SMTP client timeout (RFC 5321 §4.5.3.1: 5 min per command,
    /// 10 min for the end of data); shorten it for tests or impatient operators.
    #[arg(long = "smtp-timeout", value_name = "DUR", default_value = "10m", value_parser = parse_duration)]
    pub smtp_timeout: Duration,
    /// Accept and queue, but deliver nothing (maintenance; benchmarks of the accept path).
    /// Queued mail goes out once the relay runs without it.
    #[arg(long)]
    pub hold: bool,
    /// Time a client has to finish a TLS handshake (after STARTTLS or on a --listen-tls port),
    /// and a destination has to finish one after its 220 to our STARTTLS.
    #[arg(long = "tls-handshake-timeout", value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Delivery TLS policy, as Postfix's smtp_tls_security_level: `none`; `may` (STARTTLS when
    /// offered, no certificate check, plaintext retry when the handshake fails); `encrypt`
    /// (TLS required, failures are temporary); `verify` (TLS with a certificate valid for the
    /// MX host name, checked against --tls-ca-file).
    #[arg(long = "outbound-tls", value_enum, default_value = "may")]
    pub outbound_tls: OutboundTlsMode,
    /// Traffic shaping rules (TOML: `[default]`, `[provider.NAME]`, `[domain."D"]`,
    /// `[[automation]]`), merged over the built-in provider profiles; SIGHUP reloads it, and a
    /// file that does not load keeps the rules in force.
    #[arg(long = "shaping", value_name = "FILE")]
    pub shaping: Option<PathBuf>,
    /// Leave out the built-in provider profiles and automation rules.
    #[arg(long = "no-builtin-shaping")]
    pub no_builtin_shaping: bool,
    /// CA bundle (PEM) for --outbound-tls verify.
    #[arg(long = "tls-ca-file", value_name = "PEM", default_value = "/etc/ssl/certs/ca-certificates.crt")]
    pub tls_ca_file: PathBuf,
    /// Preallocated size of each spool segment file.
    #[arg(long = "spool-segment-size", value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    pub spool_segment_size: u64,
    /// Free space on the spool's filesystem that new mail never takes (Postfix's
    /// queue_minfree); below it MAIL gets 452 4.3.1 while delivery goes on. Default: 1.5 x
    /// --max-message-size.
    #[arg(long = "min-free-space", value_name = "BYTES", value_parser = parse_size)]
    pub min_free_space: Option<u64>,
    /// DKIM signing key (repeatable): mail whose From: domain (or its nearest parent with
    /// keys) is DOMAIN is signed with the PEM private key (RSA >= 1024 bits or Ed25519) and
    /// published under SELECTOR; several keys of one domain each add a signature.
    #[arg(long = "dkim-key", value_name = "DOMAIN:SELECTOR:PEM", value_parser = parse_dkim_key)]
    pub dkim_key: Vec<DkimKeyArg>,
    /// Directory of DKIM keys: every DIR/DOMAIN/SELECTOR.pem is a key, as with --dkim-key.
    /// Read at start and again on SIGHUP.
    #[arg(long = "dkim-dir", value_name = "DIR")]
    pub dkim_dir: Option<PathBuf>,
    /// Threads that compute DKIM signatures (only when keys are configured).
    #[arg(long = "dkim-threads", value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub dkim_threads: u32,
    /// An egress source (repeatable): outbound connections of its messages bind IP before
    /// connecting and say EHLO HOST (default: --hostname). IP must be assigned to this host.
    #[arg(long = "source", value_name = "NAME=IP[,ehlo=HOST]", value_parser = parse_source)]
    pub source: Vec<Source>,
    /// A pool of sources with weights (repeatable; weight 1 when left out). A message uses
    /// the pool its `X-Sluice-Pool:` header names, else its AUTH user's (--user-pool), else
    /// pool `default`, else every source by equal weight; one source per message.
    #[arg(long = "pool", value_name = "NAME=SRC[:WEIGHT][,SRC[:WEIGHT]...]", value_parser = parse_pool)]
    pub pool: Vec<PoolSpec>,
    /// The pool of an authenticated user's messages that name none (repeatable).
    #[arg(long = "user-pool", value_name = "USER=POOL", value_parser = parse_user_pool)]
    pub user_pool: Vec<UserPool>,
    /// Refuse to start when a source's IP fails forward-confirmed reverse DNS (its PTR name,
    /// looked up through --dns, must resolve back to the IP); without it a failure is logged.
    #[arg(long = "require-fcrdns")]
    pub require_fcrdns: bool,
}

pub use crate::delivery::sources::{PoolSpec, Source};

/// One `--user-pool USER=POOL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPool {
    /// The AUTH user name.
    pub user: String,
    /// The pool's name.
    pub pool: String,
}

/// A source or pool name: letters, digits, `-`, `_`, `.` (it goes into log lines, headers
/// and the spool).
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Parses `NAME=IP[,ehlo=HOST]` for --source.
pub fn parse_source(s: &str) -> Result<Source, String> {
    let (name, rest) = s.split_once('=').ok_or_else(|| format!("'{s}' is not NAME=IP[,ehlo=HOST]"))?;
    if !is_name(name) {
        return Err(format!("'{name}' in '{s}' is not a source name (letters, digits, '-', '_', '.')"));
    }
    let mut parts = rest.split(',');
    let ip = parts.next().unwrap_or_default();
    let ip: IpAddr = ip.parse().map_err(|_| format!("'{ip}' in '{s}' is not an IP address"))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("'{ip}' in '{s}' is not a unicast address"));
    }
    let mut ehlo = None;
    for opt in parts {
        match opt.split_once('=') {
            Some(("ehlo", host)) => ehlo = Some(parse_hostname(host).map_err(|e| format!("{e} in '{s}'"))?.into()),
            _ => return Err(format!("'{opt}' in '{s}' is not ehlo=HOST")),
        }
    }
    Ok(Source { name: name.into(), ip, ehlo })
}

/// Parses `NAME=SRC[:WEIGHT][,SRC[:WEIGHT]...]` for --pool (weights are whole numbers ≥ 1).
pub fn parse_pool(s: &str) -> Result<PoolSpec, String> {
    let (name, rest) = s.split_once('=').ok_or_else(|| format!("'{s}' is not NAME=SRC[:WEIGHT],..."))?;
    if !is_name(name) {
        return Err(format!("'{name}' in '{s}' is not a pool name (letters, digits, '-', '_', '.')"));
    }
    let mut members = Vec::new();
    for m in rest.split(',') {
        let (src, weight) = match m.split_once(':') {
            Some((src, w)) => {
                let w = w.parse::<u32>().ok().filter(|&w| w > 0);
                (src, w.ok_or_else(|| format!("weight of '{m}' in '{s}' is not a whole number of at least 1"))?)
            }
            None => (m, 1),
        };
        if !is_name(src) {
            return Err(format!("'{src}' in '{s}' is not a source name"));
        }
        members.push((src.to_owned(), weight));
    }
    Ok(PoolSpec { name: name.to_owned(), members })
}

/// Parses `USER=POOL` for --user-pool.
pub fn parse_user_pool(s: &str) -> Result<UserPool, String> {
    match s.split_once('=') {
        Some((user, pool)) if !user.is_empty() && is_name(pool) => {
            Ok(UserPool { user: user.to_owned(), pool: pool.to_owned() })
        }
        _ => Err(format!("'{s}' is not USER=POOL")),
    }
}

/// One `--dkim-key DOMAIN:SELECTOR:PEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKeyArg {
    /// The signing domain (`d=`), lower case, without a trailing dot.
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    /// The PEM private key file.
    pub pem: PathBuf,
}

impl std::fmt::Display for DkimKeyArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.domain, self.selector, self.pem.display())
    }
}

/// Parses `DOMAIN:SELECTOR:PEM` for --dkim-key (the path may itself hold colons).
pub fn parse_dkim_key(s: &str) -> Result<DkimKeyArg, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(domain), Some(selector), Some(pem)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("'{s}' is not DOMAIN:SELECTOR:PEM"));
    };
    if !crate::dkim::key::is_domain(domain) {
        return Err(format!("'{domain}' in '{s}' is not a domain name"));
    }
    if !crate::dkim::key::is_selector(selector) {
        return Err(format!("'{selector}' in '{s}' is not a DKIM selector"));
    }
    if pem.is_empty() {
        return Err(format!("'{s}' names no PEM file"));
    }
    Ok(DkimKeyArg {
        domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        selector: selector.to_owned(),
        pem: PathBuf::from(pem),
    })
}

/// Flags of `sluice dkim-keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The signing domain the record is for.
    #[arg(value_parser = parse_dkim_domain)]
    pub domain: String,
    /// The selector the key is published under.
    #[arg(value_parser = parse_dkim_selector)]
    pub selector: String,
    /// Make an Ed25519 key (RFC 8463) instead of RSA.
    #[arg(long, conflicts_with = "bits")]
    pub ed25519: bool,
    /// RSA modulus size: 2048, 3072 or 4096 (the sizes aws-lc-rs generates; RFC 8301 §3.2
    /// allows 1024 and sluice signs with such keys, but receivers expect 2048).
    #[arg(long, value_name = "N", default_value_t = 2048, value_parser = parse_rsa_bits)]
    pub bits: u32,
    /// Where to write the private key (PEM, PKCS#8, mode 0600); an existing file is kept.
    #[arg(long, value_name = "PEM")]
    pub out: PathBuf,
}

fn parse_rsa_bits(s: &str) -> Result<u32, String> {
    match s.parse() {
        Ok(n @ (2048 | 3072 | 4096)) => Ok(n),
        _ => Err(format!("'{s}' is not one of 2048, 3072, 4096")),
    }
}

fn parse_dkim_domain(s: &str) -> Result<String, String> {
    if crate::dkim::key::is_domain(s) {
        Ok(s.trim_end_matches('.').to_ascii_lowercase())
    } else {
        Err(format!("'{s}' is not a domain name"))
    }
}

fn parse_dkim_selector(s: &str) -> Result<String, String> {
    if crate::dkim::key::is_selector(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("'{s}' is not a DKIM selector"))
    }
}

/// Flags of `sluice queue`.
#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Spool directory of the relay (its control socket is `DIR/control.sock`).
    #[arg(long, value_name = "DIR", default_value = "./sluice-spool", global = true)]
    pub spool: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub action: QueueAction,
}

/// `sluice queue` actions.
#[derive(Debug, Clone, Subcommand)]
pub enum QueueAction {
    /// One entry per queued message with its recipients.
    List,
    /// Totals.
    Stats,
    /// Ask the relay running on this spool (SIGUSR1) to retry every deferred recipient now
    /// and to forget which destinations it found down.
    Flush,
    /// Stop deliveries to a domain or a provider's sites for a while (kept in the spool:
    /// survives a restart). Needs the running relay.
    Suspend {
        /// What to suspend.
        #[command(flatten)]
        scope: ScopeArgs,
        /// How long.
        #[arg(long = "for", value_name = "DUR", default_value = "1h", value_parser = parse_duration)]
        duration: Duration,
        /// Why (logged, shown by `suspensions`).
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// Lift a suspension (manual or automatic). Needs the running relay.
    Resume {
        /// What to resume.
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// The suspensions in force, manual and automatic (with no relay running: the manual ones
    /// kept in the spool).
    Suspensions,
    /// Bounce what is queued now (a DSN to each sender); recipients in the middle of a
    /// delivery are left to it. Needs the running relay.
    Bounce {
        /// Which messages.
        #[command(flatten)]
        target: BounceArgs,
        /// Why (goes into the DSN: `554 5.0.0 Bounced by the operator: TEXT`).
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// Queued recipients, oldest age, last reply and suspension per domain or site (with no
    /// relay running: per domain, from the spool).
    Summary {
        /// Row key.
        #[arg(long, value_enum, default_value = "domain")]
        by: SummaryBy,
    },
}

/// `--domain D | --provider P | --site S` of `suspend` and `resume`.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct ScopeArgs {
    /// A recipient domain.
    #[arg(long, value_name = "DOMAIN", value_parser = parse_hostname)]
    pub domain: Option<String>,
    /// A provider profile (built in or from --shaping).
    #[arg(long, value_name = "NAME")]
    pub provider: Option<String>,
    /// A site by the name `suspensions` and the log show (an MX host set, or the relay host),
    /// e.g. to lift what automation suspended.
    #[arg(long, value_name = "NAME")]
    pub site: Option<String>,
}

/// `--id ID | --domain D` of `bounce`.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct BounceArgs {
    /// One message by queue id.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Every message queued for a recipient domain.
    #[arg(long, value_name = "DOMAIN", value_parser = parse_hostname)]
    pub domain: Option<String>,
}

/// `summary --by` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SummaryBy {
    /// Recipient domain.
    Domain,
    /// Site (provider, or destinations sharing MX hosts).
    Site,
}

pub use crate::smtp::client_key::Cidr;

/// A host name or address with an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port, when given.
    pub port: Option<u16>,
}

/// A retry schedule: delays between attempts, the last one repeating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

/// Parses `10ms`, `30s`, `5m`, `2h`, `5d` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration (e.g. 30s, 5m, 2h, 5d)"))?;
    let ms = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("'{s}' has an unknown unit (use ms, s, m, h or d)")),
    };
    let total = n.checked_mul(ms).ok_or_else(|| format!("'{s}' is too long"))?;
    if total == 0 {
        return Err("a duration must be greater than zero".into());
    }
    Ok(Duration::from_millis(total))
}

/// Parses a connection rate as connections per minute: `N/min`, `N/m`, `N/s` or a bare `N`
/// (per minute); `0` is allowed (off).
pub fn parse_rate_per_minute(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let bad = || format!("'{s}' is not a rate (e.g. 60/min, 2/s, 0 for none)");
    let (num, per_unit) = match s.split_once('/') {
        Some((n, "min" | "m")) => (n, 1),
        Some((n, "s")) => (n, 60),
        Some(_) => return Err(bad()),
        None => (s, 1),
    };
    let n: u32 = num.parse().map_err(|_| bad())?;
    n.checked_mul(per_unit).ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses a data rate in bytes per second: `N` or `N/s`; `0` is allowed (off).
pub fn parse_data_rate(s: &str) -> Result<u32, String> {
    let s = s.trim();
    s.strip_suffix("/s")
        .unwrap_or(s)
        .parse()
        .map_err(|_| format!("'{s}' is not a rate in bytes per second (e.g. 256, 1000/s, 0 for none)"))
}

/// Parses a comma-separated list of durations.
pub fn parse_schedule(s: &str) -> Result<Schedule, String> {
    let list = s.split(',').map(parse_duration).collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() {
        return Err("the schedule is empty".into());
    }
    Ok(Schedule(list))
}

/// Parses a byte count with an optional `k`, `M` or `G` suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size in bytes (e.g. 52428800, 50M)"))?;
    let v = n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))?;
    if v == 0 {
        return Err("the size must be greater than zero".into());
    }
    Ok(v)
}

/// Parses `a.b.c.d/n`, `x::y/n` or a bare address (a host route).
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| format!("'{s}' is not an IP network (e.g. 10.0.0.0/8)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => {
            p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| format!("'{s}' has a bad prefix length"))?
        }
    };
    Ok(Cidr { addr, prefix })
}

/// Parses `ip:port`, or a bare IP (port 53).
pub fn parse_dns_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)).map_err(|_| format!("'{s}' is not an ip:port"))
}

/// Parses `host`, `host:port`, `[v6]:port` or `v4:port`.
pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let bad = || format!("'{s}' is not HOST[:PORT]");
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(HostPort { host: sa.ip().to_string(), port: Some(sa.port()) });
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once(']').ok_or_else(bad)?;
        let port = match port.strip_prefix(':') {
            Some(p) => Some(p.parse().map_err(|_| bad())?),
            None if port.is_empty() => None,
            None => return Err(bad()),
        };
        return Ok(HostPort { host: host.to_owned(), port });
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
        _ => (s, None),
    };
    if host.is_empty() || !crate::smtp::command::valid_domain(host.as_bytes()) && host.parse::<IpAddr>().is_err() {
        return Err(bad());
    }
    Ok(HostPort { host: host.to_owned(), port })
}

/// Validates a host name for --hostname.
pub fn parse_hostname(s: &str) -> Result<String, String> {
    if crate::smtp::command::valid_domain(s.as_bytes()) && s.is_ascii() {
        Ok(s.to_owned())
    } else {
        Err(format!("'{s}' is not a valid host name"))
    }
}

/// TLS to the relay host is always verified: `starttls` is `--outbound-tls verify`.
impl From<RelayTlsMode> for crate::delivery::OutboundTls {
    fn from(m: RelayTlsMode) -> Self {
        match m {
            RelayTlsMode::Starttls => Self::Verify,
            RelayTlsMode::Implicit => Self::Implicit,
        }
    }
}

impl From<OutboundTlsMode> for crate::delivery::OutboundTls {
    fn from(m: OutboundTlsMode) -> Self {
        match m {
            OutboundTlsMode::None => Self::None,
            OutboundTlsMode::May => Self::May,
            OutboundTlsMode::Encrypt => Self::Encrypt,
            OutboundTlsMode::Verify => Self::Verify,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dkim_key_values() {
        let k = parse_dkim_key("Example.COM.:s1:/k/a:b.pem").unwrap();
        assert_eq!((k.domain.as_str(), k.selector.as_str()), ("example.com", "s1"));
        assert_eq!(k.pem, PathBuf::from("/k/a:b.pem"));
        for bad in ["example.com:s1", "exa_mple.com:s1:/k.pem", ":s1:/k.pem", "example.com::/k.pem", "example.com:s1:"]
        {
            assert!(parse_dkim_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn source_pool_and_user_pool_values() {
        let s = parse_source("ip1=192.0.2.1,ehlo=out1.example.com").unwrap();
        assert_eq!(
            (&*s.name, s.ip.to_string(), s.ehlo.as_deref()),
            ("ip1", "192.0.2.1".into(), Some("out1.example.com"))
        );
        assert_eq!(parse_source("v6=2001:db8::1").unwrap().ehlo, None);
        for bad in ["ip1", "=192.0.2.1", "ip1=300.1.1.1", "ip1=0.0.0.0", "ip1=192.0.2.1,helo=x", "a b=192.0.2.1"] {
            assert!(parse_source(bad).is_err(), "{bad}");
        }
        assert!(parse_source("ip1=192.0.2.1,ehlo=bad host").unwrap_err().contains("bad host"));
        let p = parse_pool("bulk=ip1:3,ip2").unwrap();
        assert_eq!(p.members, vec![("ip1".to_owned(), 3), ("ip2".to_owned(), 1)]);
        for bad in ["bulk", "bulk=ip1:0", "bulk=ip1:x", "bulk=ip1:-1", "bulk=", "bulk=ip1,,ip2"] {
            assert!(parse_pool(bad).is_err(), "{bad}");
        }
        assert!(parse_pool("bulk=ip1:0").unwrap_err().contains("ip1:0"));
        assert_eq!(parse_user_pool("alice=bulk").unwrap().pool, "bulk");
        assert!(parse_user_pool("alice").is_err() && parse_user_pool("=bulk").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(432_000)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_schedule("1s,1s,2s").unwrap().0.len(), 3);
    }

    #[test]
    fn sizes_and_cidrs() {
        assert_eq!(parse_size("50M"), Ok(50 << 20));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("-1").is_err());
        let c = parse_cidr("127.0.0.0/8").unwrap();
        assert!(c.contains("127.9.9.9".parse().unwrap()));
        assert!(c.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.contains("10.0.0.1".parse().unwrap()));
        assert!(parse_cidr("::1/128").unwrap().contains("::1".parse().unwrap()));
        assert!(parse_cidr("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(parse_cidr("1.2.3.4/33").is_err());
        assert!(parse_cidr("nope").is_err());
    }

    #[test]
    fn host_ports() {
        assert_eq!(parse_host_port("smtp.example:2525").unwrap().port, Some(2525));
        assert_eq!(parse_host_port("127.0.0.1:25").unwrap().host, "127.0.0.1");
        assert_eq!(parse_host_port("[::1]:25").unwrap().host, "::1");
        assert_eq!(parse_host_port("relay.example").unwrap().port, None);
        assert!(parse_host_port("bad host:25").is_err());
        assert!(parse_dns_addr("127.0.0.1:5353").is_ok());
        assert!(parse_dns_addr("x").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate_per_minute("60/min"), Ok(60));
        assert_eq!(parse_rate_per_minute("2/s"), Ok(120));
        assert_eq!(parse_rate_per_minute("30"), Ok(30));
        assert_eq!(parse_rate_per_minute("0"), Ok(0));
        for bad in ["", "x", "5/h", "-1/min", "99999999999/s", "1/"] {
            assert!(parse_rate_per_minute(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_data_rate("256"), Ok(256));
        assert_eq!(parse_data_rate("1000/s"), Ok(1000));
        assert_eq!(parse_data_rate("0"), Ok(0));
        assert!(parse_data_rate("fast").is_err());
        assert!(parse_data_rate("10/min").is_err());
    }
}
