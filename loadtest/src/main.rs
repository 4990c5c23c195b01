//! `sluice-load`: the load generator, fault-injecting SMTP sink, test DNS server and one-command
//! benchmark for sluice (SPEC "sluice-load").
//!
//! Owns: the command line (clap) and the dispatch to [`send`], [`sink`], [`dns`], [`bench`]
//! (and its `postfix` instance), [`disk`] and [`noop`];
//! the only place that exits the process. Exit status: 0 on success, 1 when a run failed
//! (target unreachable, nothing accepted), 2 for a bad flag.

mod bench;
mod disk;
mod dns;
mod limits;
mod noop;
mod report;
mod send;
mod sink;
mod tls;
mod util;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use util::{parse_bytes, parse_duration, parse_probability};

#[derive(Parser, Debug)]
#[command(name = "sluice-load", version, about = "Load generator, SMTP sink, test DNS and benchmark for sluice")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Send mail to an SMTP server as fast as it takes it (or at a fixed rate).
    Send(SendArgs),
    /// An SMTP server that accepts and counts, with fault knobs.
    Sink(SinkArgs),
    /// An authoritative DNS responder for test domains.
    Dns(DnsArgs),
    /// Start sink, relay and sender on loopback and print one report.
    Bench(bench::BenchArgs),
    /// The device's flush latency: pwrite + fdatasync of one size into a scratch file.
    Disk(disk::DiskArgs),
    /// One session timing NOOP round trips at a steady pace (p50/p99/max), e.g. while
    /// another client keeps the server busy.
    Noop(noop::NoopArgs),
    /// A throw-away Postfix instance relaying to one loopback address, until SIGTERM (root).
    Postfix(bench::postfix::PostfixArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct SendArgs {
    /// Target SMTP server, IP:PORT.
    #[arg(long)]
    to: SocketAddr,
    /// Concurrent connections.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Messages to send in total (default 10000 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    messages: Option<u64>,
    /// Send for this long instead (e.g. 30s), then finish what is in flight.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Message size in bytes, or a distribution `SIZE:WEIGHT,...` (e.g. `1k:70,10k:25,1m:5`).
    #[arg(long, default_value = "1024")]
    size: String,
    /// Send this file's exact bytes as every message instead of a generated one.
    #[arg(long, conflicts_with = "size")]
    body: Option<PathBuf>,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    rcpts: usize,
    /// Recipient domains, comma-separated; recipients are spread over them.
    #[arg(long, default_value = "example.test", value_delimiter = ',')]
    domains: Vec<String>,
    /// Recipient local-part prefix (the recipient's index follows), e.g. `rej-` for the sink.
    #[arg(long, default_value = "user")]
    rcpt_prefix: String,
    /// Envelope sender.
    #[arg(long, default_value = "load@sluice-load.test")]
    from: String,
    /// Name sent in EHLO.
    #[arg(long, default_value = "sluice-load.test")]
    helo: String,
    /// Messages per connection before QUIT and reconnect.
    #[arg(long, default_value_t = u64::MAX, hide_default_value = true)]
    per_connection: u64,
    /// Open loop: start messages at this fixed rate (msg/s); latency counts from the schedule.
    #[arg(long)]
    rate: Option<f64>,
    /// Do not pipeline even when the server offers PIPELINING.
    #[arg(long)]
    no_pipelining: bool,
    /// Use BDAT (CHUNKING) instead of DATA when offered.
    #[arg(long)]
    bdat: bool,
    /// EHLO, STARTTLS (RFC 3207), TLS handshake, EHLO again, then the transactions. The
    /// server's certificate is not verified.
    #[arg(long, conflicts_with = "tls")]
    starttls: bool,
    /// Implicit TLS from the first byte (a --listen-tls / port-465 style server); the
    /// certificate is not verified.
    #[arg(long)]
    tls: bool,
    /// AUTH PLAIN (RFC 4954, initial response) as USER:PASS after the (post-TLS) EHLO; a 235
    /// is required, any other reply fails the connection.
    #[arg(long, value_name = "USER:PASS")]
    auth: Option<String>,
    /// Sender threads, one event loop each.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Give up on a connection that has not answered for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Seed for the size draw.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args, Debug)]
struct SinkArgs {
    /// Listening address (repeatable; 127.0.0.1:2526 when neither this nor --listen-tls is
    /// given); port 0 picks a free port, logged on stderr.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Implicit-TLS listening address (repeatable; the port-465 style), with --tls-cert or a
    /// generated certificate.
    #[arg(long, value_name = "ADDR")]
    listen_tls: Vec<SocketAddr>,
    /// Server certificate chain (PEM); STARTTLS is offered when given.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name in the greeting.
    #[arg(long, default_value = "sink.sluice-load.test")]
    hostname: String,
    /// Share of 4xx replies (0..1 or N%).
    #[arg(long, default_value = "0", value_parser = parse_probability)]
    tempfail_rate: f64,
    /// Share of 5xx replies.
    #[arg(long, default_value = "0", value_parser = parse_probability)]
    permfail_rate: f64,
    /// Where the fail rates apply.
    #[arg(long, value_enum, default_value = "data")]
    fail_at: sink::FailAt,
    /// Delay before the reply to the end of data (e.g. 200ms).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    delay: Duration,
    /// Share of transactions whose connection is closed mid-DATA.
    #[arg(long, default_value = "0", value_parser = parse_probability)]
    drop_rate: f64,
    /// Recipients per transaction before 452 4.5.3.
    #[arg(long, default_value_t = 1000)]
    max_rcpts: usize,
    /// Save each accepted message as NNNNNNNN.env (envelope: `MAIL FROM:<..>` and `RCPT TO:<..>`
    /// lines, then `TRANSFER: DATA|BDAT`, `TLS: VERSION CIPHER` when it came over TLS and
    /// `AUTH: USER` when the session authenticated, then `PEER: IP` and `EHLO: NAME` of the
    /// client) and NNNNNNNN.msg (exact bytes).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print the summary as JSON on stdout at exit.
    #[arg(long)]
    json: bool,
    /// Period of the rate line on stderr; 0 for none.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    interval: Duration,
    /// Exit by itself after this long.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Do not advertise PIPELINING.
    #[arg(long)]
    no_pipelining: bool,
    /// Do not advertise CHUNKING.
    #[arg(long)]
    no_chunking: bool,
    /// Offer STARTTLS; without --tls-cert, with a self-signed certificate generated at start
    /// for localhost, 127.0.0.1, ::1 and --hostname.
    #[arg(long)]
    starttls: bool,
    /// Offer STARTTLS and answer 220, then break the handshake (garbage bytes, close), to test
    /// a client's plaintext fallback.
    #[arg(long)]
    tls_fail: bool,
    /// Accept AUTH PLAIN and LOGIN with any credentials (AUTH is refused with 503 otherwise).
    #[arg(long)]
    auth_any: bool,
    /// Seed for the fault draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Log `event=expected recipients=N messages=M` on stderr once N recipients have been
    /// accepted (lets a parent stop an end-to-end clock without polling).
    #[arg(long)]
    expect_recipients: Option<u64>,
    /// MAILs per client address over all its connections (`N/s`, `N/min`, `N/h`): a token
    /// bucket holding one second of the rate (at least 1); past it MAIL gets --rate-reply.
    #[arg(long, value_name = "RATE", value_parser = limits::parse_rate)]
    rate_limit: Option<limits::Rate>,
    /// Reply past --rate-limit; `{ip}` is the client's address. A 421 closes the connection.
    #[arg(long, value_name = "TEXT", default_value = limits::GMAIL_RATE_REPLY, value_parser = limits::parse_reply)]
    rate_reply: String,
    /// Answer every MAIL with --defer-reply for this long from the start (e.g. 60s).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    defer_all_for: Option<Duration>,
    /// Reply inside --defer-all-for (e.g. Yahoo's `421 4.7.0 [TSS04] Messages from {ip}
    /// temporarily deferred ...`); `{ip}` is the client's address.
    #[arg(long, value_name = "TEXT", default_value = limits::GMAIL_RATE_REPLY, value_parser = limits::parse_reply)]
    defer_reply: String,
    /// Accepted messages per connection; the next MAIL gets `421 4.7.0` and the connection
    /// closes.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_messages_per_connection: Option<u64>,
    /// Open connections per client address; one more is greeted `421 4.7.0` and closed.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_ip: Option<u32>,
}

#[derive(Args, Debug)]
struct DnsArgs {
    /// UDP and TCP address; port 0 picks a free port, logged on stderr.
    #[arg(long, default_value = "127.0.0.1:5353")]
    listen: SocketAddr,
    /// DOMAIN=IP: MX 10 mx.DOMAIN, and mx.DOMAIN A (or AAAA) IP. Repeatable.
    #[arg(long)]
    zone: Vec<String>,
    /// DOMAIN=PREF:HOST: an MX record. Repeatable.
    #[arg(long)]
    mx: Vec<String>,
    /// HOST=IP: an A (or AAAA) record. Repeatable.
    #[arg(long)]
    a: Vec<String>,
    /// NAME=VALUE: a TXT record (long values split into 255-octet strings). Repeatable.
    #[arg(long)]
    txt: Vec<String>,
    /// DOMAIN: a null MX (RFC 7505). Repeatable.
    #[arg(long)]
    nullmx: Vec<String>,
    /// IP=NAME: a PTR record for the address (reverse DNS). Repeatable.
    #[arg(long)]
    ptr: Vec<String>,
    /// DOMAIN: SERVFAIL for it and everything under it. Repeatable.
    #[arg(long)]
    servfail: Vec<String>,
    /// Truncate every UDP answer (TC set, sections empty): clients must ask over TCP.
    #[arg(long)]
    truncate_udp: bool,
    /// Time to live of every record, seconds.
    #[arg(long, default_value_t = 300)]
    ttl: u32,
    /// Exit by itself after this long.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
}

/// `1024` or `1k:70,10k:25,...` → [(size, weight)].
fn parse_size_spec(spec: &str) -> Result<Vec<(usize, u32)>> {
    let mut out = Vec::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (size, weight) = match part.split_once(':') {
            Some((s, w)) => (s, w.trim().parse::<u32>().with_context(|| format!("--size {spec}: bad weight"))?),
            None => (part, 1),
        };
        let size = parse_bytes(size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
        if weight > 0 {
            out.push((size, weight));
        }
    }
    if out.is_empty() {
        bail!("--size {spec}: no size with a positive weight");
    }
    Ok(out)
}

/// `USER:PASS` → the whole `AUTH PLAIN <base64(NUL user NUL pass)>` command line (RFC 4616),
/// rendered once.
fn auth_plain_line(spec: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let Some((user, pass)) = spec.split_once(':') else { bail!("--auth: expected USER:PASS") };
    if user.is_empty() {
        bail!("--auth: the user name is empty");
    }
    let mut raw = Vec::with_capacity(spec.len() + 2);
    raw.push(0);
    raw.extend_from_slice(user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(pass.as_bytes());
    Ok(format!("AUTH PLAIN {}\r\n", base64::engine::general_purpose::STANDARD.encode(raw)).into_bytes())
}

fn send_opts(a: &SendArgs) -> Result<send::SendOpts> {
    if a.connections == 0 || a.rcpts == 0 || a.threads == 0 || a.per_connection == 0 {
        bail!("--connections, --rcpts, --threads and --per-connection must be at least 1");
    }
    if a.domains.iter().all(|d| d.trim().is_empty()) {
        bail!("--domains needs at least one domain");
    }
    if let Some(r) = a.rate {
        if !(r.is_finite() && r > 0.0) {
            bail!("--rate must be a positive number of messages per second");
        }
    }
    let bodies = match &a.body {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("--body {}", p.display()))?;
            vec![(send::Body::from_bytes(bytes), 1)]
        }
        None => parse_size_spec(&a.size)?.into_iter().map(|(s, w)| (send::Body::synthetic(s, &a.from), w)).collect(),
    };
    Ok(send::SendOpts {
        to: a.to,
        connections: a.connections,
        messages: if a.duration.is_some() { a.messages } else { Some(a.messages.unwrap_or(10_000)) },
        duration: a.duration,
        bodies,
        rcpts: a.rcpts,
        domains: a.domains.iter().map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect(),
        rcpt_prefix: a.rcpt_prefix.clone(),
        from: a.from.clone(),
        helo: a.helo.clone(),
        per_connection: a.per_connection,
        rate: a.rate,
        pipelining: !a.no_pipelining,
        bdat: a.bdat,
        tls: if a.tls {
            send::TlsMode::Implicit
        } else if a.starttls {
            send::TlsMode::StartTls
        } else {
            send::TlsMode::Plain
        },
        auth: a.auth.as_deref().map(auth_plain_line).transpose()?,
        threads: a.threads,
        timeout: a.timeout,
        seed: a.seed,
    })
}

fn cmd_send(a: &SendArgs) -> Result<i32> {
    let opts = send_opts(a)?;
    let _ = sluice::net::socket::raise_nofile_limit();
    let (stats, elapsed, samples) = send::run(&opts, a.quiet);
    let target = a.to.to_string();
    if a.json {
        report::print_stdout(&report::send_json(&stats, elapsed, &target, &samples).to_string());
    } else {
        report::print_stdout(&report::send_text(&stats, elapsed, &target));
    }
    if stats.accepted > 0 {
        return Ok(0);
    }
    let why = stats.last_error.as_deref().unwrap_or("no error recorded");
    if stats.connections == 0 {
        eprintln!("sluice-load send: could not reach {target}: {why}");
    } else {
        eprintln!("sluice-load send: {target} accepted no message ({} sent; last error: {why})", stats.sent);
    }
    Ok(1)
}

fn cmd_sink(a: SinkArgs) -> Result<i32> {
    let tls = match (&a.tls_cert, &a.tls_key) {
        // The seam's errors name the flag at fault (`--tls-cert ...`): they exit 2.
        (Some(cert), Some(key)) => {
            Some(sluice::net::tls::ServerTls::load(cert, key).map_err(|e| anyhow::anyhow!("{e}"))?)
        }
        _ if a.starttls || !a.listen_tls.is_empty() => Some(tls::self_signed_server(&[&a.hostname])?),
        _ => None,
    };
    let listen = if a.listen.is_empty() && a.listen_tls.is_empty() {
        vec![SocketAddr::from(([127, 0, 0, 1], 2526))]
    } else {
        a.listen
    };
    sink::run(sink::SinkOpts {
        listen,
        listen_tls: a.listen_tls,
        tls,
        tls_fail: a.tls_fail,
        auth_any: a.auth_any,
        hostname: a.hostname,
        tempfail_rate: a.tempfail_rate,
        permfail_rate: a.permfail_rate,
        fail_at: a.fail_at,
        delay: a.delay,
        drop_rate: a.drop_rate,
        max_rcpts: a.max_rcpts,
        save: a.save,
        json: a.json,
        interval: a.interval,
        duration: a.duration,
        pipelining: !a.no_pipelining,
        chunking: !a.no_chunking,
        seed: a.seed,
        expect_recipients: a.expect_recipients,
        rate_limit: a.rate_limit,
        rate_reply: a.rate_reply,
        defer_all_for: a.defer_all_for,
        defer_reply: a.defer_reply,
        max_messages_per_connection: a.max_messages_per_connection,
        max_connections_per_ip: a.max_connections_per_ip,
    })?;
    Ok(0)
}

fn cmd_dns(a: DnsArgs) -> Result<i32> {
    let mut zone = dns::Zone::new(a.ttl);
    for z in &a.zone {
        zone.add_zone(z)?;
    }
    for m in &a.mx {
        zone.add_mx(m)?;
    }
    for x in &a.a {
        zone.add_a(x)?;
    }
    for t in &a.txt {
        zone.add_txt(t)?;
    }
    for p in &a.ptr {
        zone.add_ptr(p)?;
    }
    for n in &a.nullmx {
        zone.add_nullmx(n);
    }
    for s in &a.servfail {
        zone.add_servfail(s);
    }
    if a.truncate_udp {
        zone.truncate_udp();
    }
    dns::run(a.listen, zone, a.duration)?;
    Ok(0)
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Send(a) => cmd_send(&a),
        Cmd::Sink(a) => cmd_sink(a),
        Cmd::Dns(a) => cmd_dns(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Disk(a) => disk::run(&a),
        Cmd::Noop(a) => noop::run(&a),
        Cmd::Postfix(a) => bench::postfix::serve(&a),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("sluice-load: {e:#}");
            // Flag-shaped errors (validation before anything ran) exit 2 like clap's own.
            let msg = format!("{e:#}");
            std::process::exit(if msg.starts_with("--") { 2 } else { 1 });
        }
    }
}
