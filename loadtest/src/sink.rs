//! `sluice-load sink`: an SMTP server that accepts, counts and (on request) misbehaves.
//!
//! Owns: listeners and inbound sessions on one mio loop, a sink-specific session machine built
//! on the relay's pure framing (`smtp::line`), command parser (`smtp::command`) and DATA
//! scanner (`smtp::data`), fault injection, and the counters and summary. Must never: refuse
//! bytes the relay's strict session would take (it is lenient on purpose: it measures, it does
//! not police), allocate per message on the counting path, or block the loop (only `--save`
//! writes files, synchronously, as a test aid).
//!
//! Faults, by flag: `--tempfail-rate`/`--permfail-rate` (at RCPT or after DATA, `--fail-at`),
//! `--delay` before the reply to the end of data, `--drop-rate` (close mid-DATA or mid-BDAT
//! chunk without a reply to the message; replies already given go out first), `--max-rcpts`. By recipient local part, so a test can script one message's fate:
//!
//! | prefix | effect |
//! |---|---|
//! | `rej-` | `550 5.1.1` at RCPT |
//! | `tf<K>-` | `451 4.7.1` at RCPT for the first K attempts of that address (then accepted) |
//! | `full-` | `452 4.2.2` at RCPT |
//! | `datafail-` | accepted at RCPT, `554 5.6.0` after the data |
//! | `datatf-` | accepted at RCPT, `451 4.3.0` after the data |
//! | `drop-` | accepted at RCPT, connection closed mid-DATA |
//!
//! TLS (RFC 3207) through the relay's seam `sluice::net::tls`: STARTTLS is offered when the
//! sink has a certificate (`--tls-cert`/`--tls-key`, or one generated with `--starttls`);
//! bytes pipelined behind STARTTLS are discarded, the session starts over after the handshake
//! and STARTTLS is no longer offered. `--listen-tls` ports speak TLS from the first byte.
//! `--tls-fail` answers `220` to STARTTLS and then sends garbage instead of a handshake, so
//! that a client's plaintext fallback can be tested. AUTH (RFC 4954) PLAIN and LOGIN accept
//! any credentials with `--auth-any` and are refused with `503` otherwise.
//!
//! Receiver limits (`crate::limits`, pure): `--rate-limit` per client address over all its
//! connections and `--defer-all-for` answer MAIL with a scripted reply (`--rate-reply`,
//! `--defer-reply`), `--max-messages-per-connection` and `--max-connections-per-ip` with
//! `421 4.7.0`; a `421` closes the connection once written (RFC 5321 §3.8). Each connection is
//! recorded when it ends, for the report.

use crate::limits::{self, ConnLog, ConnRecord, Limits, Peer, PerSecond, Rate, Refusals};
use crate::util::{log_listening, Rng};
use anyhow::{Context, Result};
use base64::Engine as _;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use sluice::buf::{Buf, BufPool};
use sluice::net::socket::{listener, read, write, IoResult};
use sluice::net::tls::{ServerTls, TlsSession};
use sluice::net::transport::{Flush, Read, Transport};
use sluice::smtp::auth;
use sluice::smtp::command::{parse, Command};
use sluice::smtp::data::{bdat_take, DataScanner};
use sluice::smtp::line::{next_line, skip_line, Framed};
use sluice::smtp::reply;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where `--tempfail-rate`/`--permfail-rate` strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailAt {
    /// Per recipient, at RCPT.
    Rcpt,
    /// Per message, as the reply to the end of data.
    Data,
}

/// Validated `sink` options.
#[derive(Debug, Clone)]
pub struct SinkOpts {
    /// Listening addresses (plain SMTP, STARTTLS when `tls` is set).
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listening addresses (the port-465 style); need `tls`.
    pub listen_tls: Vec<SocketAddr>,
    /// Server certificate: STARTTLS is offered when set.
    pub tls: Option<ServerTls>,
    /// Offer STARTTLS, answer `220`, then break the handshake (garbage, then close).
    pub tls_fail: bool,
    /// Accept AUTH PLAIN and LOGIN with any credentials (refused with `503` otherwise).
    pub auth_any: bool,
    /// Name in the greeting and EHLO reply.
    pub hostname: String,
    /// Share of 4xx (per recipient or per message, see `fail_at`).
    pub tempfail_rate: f64,
    /// Share of 5xx.
    pub permfail_rate: f64,
    /// Where the rates apply.
    pub fail_at: FailAt,
    /// Delay before the reply to the end of data.
    pub delay: Duration,
    /// Share of transactions whose connection is closed mid-DATA.
    pub drop_rate: f64,
    /// Recipients per transaction before `452 4.5.3`.
    pub max_rcpts: usize,
    /// Save each accepted message here.
    pub save: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    pub json: bool,
    /// Period of the rate line on stderr (zero: none).
    pub interval: Duration,
    /// Exit by itself after this long.
    pub duration: Option<Duration>,
    /// Advertise PIPELINING.
    pub pipelining: bool,
    /// Advertise CHUNKING (BDAT).
    pub chunking: bool,
    /// PRNG seed for the fault draws.
    pub seed: u64,
    /// Log `event=expected` on stderr the moment this many recipients have been accepted.
    pub expect_recipients: Option<u64>,
    /// MAILs per client address (token bucket), answered `rate_reply` past it.
    pub rate_limit: Option<Rate>,
    /// Reply past the rate (`{ip}`: the client's address).
    pub rate_reply: String,
    /// Every MAIL is answered `defer_reply` for this long from the start.
    pub defer_all_for: Option<Duration>,
    /// Reply inside the deferral window.
    pub defer_reply: String,
    /// Accepted messages per connection before `421 4.7.0` at MAIL.
    pub max_messages_per_connection: Option<u64>,
    /// Open connections per client address before `421 4.7.0` at the greeting.
    pub max_connections_per_ip: Option<u32>,
}

const SIGNAL: Token = Token(usize::MAX - 1);
/// Listener tokens are `LISTENER_BASE + index`; connection tokens are slab keys below it.
const LISTENER_BASE: usize = usize::MAX - 1024;

const OK: &[u8] = b"250 2.0.0 Ok\r\n";
const SENDER_OK: &[u8] = b"250 2.1.0 Sender ok\r\n";
const RCPT_OK: &[u8] = b"250 2.1.5 Recipient ok\r\n";
const QUEUED: &[u8] = b"250 2.0.0 Ok: queued by sluice-load sink\r\n";
const CHUNK_OK: &[u8] = b"250 2.0.0 Chunk ok\r\n";
const START_DATA: &[u8] = b"354 End data with <CR><LF>.<CR><LF>\r\n";
const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
const NEED_EHLO: &[u8] = b"503 5.5.1 Error: send HELO/EHLO first\r\n";
const NESTED_MAIL: &[u8] = b"503 5.5.1 Error: nested MAIL command\r\n";
const NEED_MAIL: &[u8] = b"503 5.5.1 Error: need MAIL command\r\n";
const NO_RCPTS: &[u8] = b"554 5.5.1 Error: no valid recipients\r\n";
const TOO_MANY_RCPTS: &[u8] = b"452 4.5.3 Error: too many recipients\r\n";
const USER_UNKNOWN: &[u8] = b"550 5.1.1 Recipient address rejected: User unknown\r\n";
const TRY_LATER: &[u8] = b"451 4.7.1 Recipient temporarily refused, try again later\r\n";
const MAILBOX_FULL: &[u8] = b"452 4.2.2 Mailbox full\r\n";
const INJECTED_TEMP: &[u8] = b"451 4.3.0 Temporary failure (injected by sluice-load sink)\r\n";
const INJECTED_PERM_RCPT: &[u8] = b"550 5.7.1 Recipient refused (injected by sluice-load sink)\r\n";
const INJECTED_PERM_DATA: &[u8] = b"554 5.6.0 Message refused (injected by sluice-load sink)\r\n";
const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Error: line too long\r\n";
const VRFY: &[u8] = b"252 2.1.5 Cannot VRFY user\r\n";
const NOT_IMPLEMENTED: &[u8] = b"502 5.5.1 Error: command not implemented\r\n";
const READY_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
const TLS_ACTIVE: &[u8] = b"503 5.5.1 Error: TLS already active\r\n";
const STARTTLS_SYNTAX: &[u8] = b"501 5.5.4 Syntax: STARTTLS\r\n";
/// What `--tls-fail` sends instead of a ServerHello: not a TLS record.
const TLS_GARBAGE: &[u8] = b"sluice-load sink --tls-fail: no TLS here\r\n";
const AUTH_DISABLED: &[u8] = b"503 5.5.1 Error: authentication not enabled\r\n";
const AUTH_AGAIN: &[u8] = b"503 5.5.1 Error: already authenticated\r\n";
const AUTH_IN_TXN: &[u8] = b"503 5.5.1 Error: MAIL transaction in progress\r\n";
const AUTH_MECH: &[u8] = b"504 5.5.4 Unrecognized authentication type\r\n";
const AUTH_BAD: &[u8] = b"501 5.5.2 Error: malformed authentication response\r\n";
const AUTH_CANCELLED: &[u8] = b"501 5.7.0 Authentication cancelled\r\n";

/// Which line of an AUTH exchange (RFC 4954 §4) the client owes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthStep {
    /// The PLAIN response (`authzid NUL authcid NUL passwd`, base64).
    Plain,
    /// The LOGIN user name.
    LoginUser,
    /// The LOGIN password.
    LoginPass,
}

/// A STARTTLS accepted (`220` queued) and waiting for the reply to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    None,
    /// Start the server handshake once the `220` is out.
    Handshake,
    /// `--tls-fail`: once the `220` is out, wait for the ClientHello.
    Break,
    /// `--tls-fail`, `220` written: the client's first handshake bytes get garbage and a close.
    Broken,
}

#[derive(Debug)]
enum Phase {
    Command,
    /// Discarding the rest of an overlong command line.
    SkipLine,
    Data(DataScanner),
    /// Reading a line of an AUTH exchange.
    Auth(AuthStep),
    /// Reading a BDAT chunk: octets left, LAST, and the reply if the transaction is refused.
    Bdat {
        remaining: u64,
        last: bool,
        refuse: Option<&'static [u8]>,
    },
}

/// How long a connection that was answered its last reply waits for the client's FIN.
const LINGER: Duration = Duration::from_secs(5);

struct Conn {
    /// Unique for the process lifetime (slab keys are reused; delayed replies check this).
    id: u64,
    /// When it was accepted, since the sink started (for the report's `opened_ms`).
    opened: Duration,
    /// Socket, readiness, input buffer, and TLS after STARTTLS or on a `--listen-tls` port
    /// (then all I/O goes through it).
    io: Transport,
    /// The handshake finished and was counted.
    tls_up: bool,
    upgrade: Upgrade,
    /// AUTH succeeded on this session.
    authed: bool,
    /// The authenticated user name, for `--save` (empty when not authenticated).
    user: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    phase: Phase,
    helo: bool,
    mail: bool,
    rcpts: u32,
    /// Reply forced after the data by a recipient's local part.
    data_reply: Option<&'static [u8]>,
    drop: bool,
    bdat_size: u64,
    /// A message ended in the bytes of the last read (for `mail_after_data`).
    eod_in_batch: bool,
    /// `MAIL FROM`/`RCPT TO` lines of the transaction, for `--save`.
    env: Vec<u8>,
    body: Vec<u8>,
    /// Waiting for a delayed reply: no input is processed meanwhile.
    paused: bool,
    /// Close once the output is written.
    closing: bool,
    /// The output is written and FIN sent: what the client still sends is read and dropped
    /// until its own FIN (or [`LINGER`]), then the socket is closed.
    lingering: bool,
    /// Client address: index into `Sink::peers`.
    peer: usize,
    /// Counted in the address's open connections (not when refused at connect).
    holds_slot: bool,
    /// The last EHLO/HELO name, for the report (the buffer is reused).
    ehlo: Vec<u8>,
    /// Messages accepted on this connection.
    accepted: u64,
    /// MAILs (or the connection) refused by the limits.
    refusals: Refusals,
}

/// What the sink counted.
#[derive(Debug, Default, Clone)]
pub struct SinkStats {
    /// Connections accepted.
    pub connections: u64,
    /// Messages accepted (2xx after the data).
    pub messages: u64,
    /// Recipients of accepted messages.
    pub recipients: u64,
    /// Message octets (unstuffed) of accepted messages.
    pub bytes: u64,
    /// Messages answered 4xx after the data.
    pub tempfailed: u64,
    /// Messages answered 5xx after the data.
    pub rejected: u64,
    /// Connections closed mid-DATA on purpose.
    pub dropped: u64,
    /// Recipients refused at RCPT.
    pub rcpts_refused: u64,
    /// Messages accepted inside TLS.
    pub tls_messages: u64,
    /// TLS handshakes completed (STARTTLS or implicit).
    pub tls_connections: u64,
    /// TLS handshakes that failed (including every `--tls-fail` one).
    pub tls_failed: u64,
    /// Successful AUTH exchanges.
    pub authenticated: u64,
    /// MAIL commands read in the same batch of input as the end of the previous message: the
    /// client pipelined the next transaction behind the message (RFC 2920 §3.1).
    pub mail_after_data: u64,
}

struct Sink {
    opts: SinkOpts,
    ehlo_reply: Vec<u8>,
    /// The EHLO reply inside TLS: STARTTLS is no longer offered (RFC 3207 §4.2).
    ehlo_reply_tls: Vec<u8>,
    greeting: Vec<u8>,
    helo_reply: Vec<u8>,
    poll: Poll,
    /// Listeners and whether each speaks implicit TLS.
    listeners: Vec<(TcpListener, bool)>,
    conns: Slab<Conn>,
    pool: BufPool,
    rng: Rng,
    stats: SinkStats,
    /// `tf<K>-` addresses: attempts seen so far.
    attempts: HashMap<Vec<u8>, u32>,
    /// Delayed replies: (due, connection key, reply).
    timers: BinaryHeap<Reverse<(Instant, usize, usize)>>,
    delayed: Slab<(u64, &'static [u8])>,
    saved: u64,
    next_id: u64,
    /// Scratch body for DATA when not saving (never grows: the scanner's limit is 0).
    scratch: Vec<u8>,
    /// When the sink started (the deferral window and the per-second series count from it).
    started: Instant,
    limits: Limits,
    /// Per client address: open connections, rate bucket, scripted replies, totals. Found
    /// by `peer_index` at accept; a connection keeps the index, so MAIL does no lookup.
    peers: Vec<Peer>,
    peer_index: HashMap<IpAddr, usize>,
    /// Refusals by kind, all connections.
    refusals: Refusals,
    /// Ended connections, bounded.
    conn_log: ConnLog,
    per_second: PerSecond,
}

/// Runs the sink until SIGTERM/SIGINT or `--duration`; prints the summary.
pub fn run(opts: SinkOpts) -> Result<SinkStats> {
    let _ = sluice::net::socket::raise_nofile_limit();
    let poll = Poll::new().context("epoll")?;
    let mut listeners = Vec::new();
    let all = opts.listen.iter().map(|a| (a, false)).chain(opts.listen_tls.iter().map(|a| (a, true)));
    for (i, (addr, implicit)) in all.enumerate() {
        let flag = if implicit { "--listen-tls" } else { "--listen" };
        let mut l = listener(*addr, false).with_context(|| format!("{flag} {addr}"))?;
        poll.registry().register(&mut l, Token(LISTENER_BASE + i), Interest::READABLE)?;
        log_listening(if implicit { "sink-tls" } else { "sink" }, l.local_addr()?);
        listeners.push((l, implicit));
    }
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("signal handler")?;
    poll.registry().register(&mut signals, SIGNAL, Interest::READABLE)?;
    if let Some(dir) = &opts.save {
        std::fs::create_dir_all(dir).with_context(|| format!("--save {}", dir.display()))?;
    }
    let mut caps = String::new();
    if opts.pipelining {
        caps.push_str("250-PIPELINING\r\n");
    }
    caps.push_str("250-SIZE 0\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n");
    if opts.chunking {
        caps.push_str("250-CHUNKING\r\n");
    }
    if opts.auth_any {
        caps.push_str("250-AUTH PLAIN LOGIN\r\n");
    }
    let starttls = if opts.tls.is_some() || opts.tls_fail { "250-STARTTLS\r\n" } else { "" };
    let start = Instant::now();
    let limits = Limits {
        rate: opts.rate_limit,
        defer_until: opts.defer_all_for.map(|d| start + d),
        max_messages_per_connection: opts.max_messages_per_connection,
        max_connections_per_ip: opts.max_connections_per_ip,
        rate_reply: opts.rate_reply.clone(),
        defer_reply: opts.defer_reply.clone(),
    };
    let mut sink = Sink {
        ehlo_reply: format!("250-{}\r\n{caps}{starttls}250 HELP\r\n", opts.hostname).into_bytes(),
        ehlo_reply_tls: format!("250-{}\r\n{caps}250 HELP\r\n", opts.hostname).into_bytes(),
        greeting: format!("220 {} ESMTP sluice-load sink\r\n", opts.hostname).into_bytes(),
        helo_reply: format!("250 {}\r\n", opts.hostname).into_bytes(),
        rng: Rng::new(opts.seed),
        opts,
        poll,
        listeners,
        conns: Slab::with_capacity(1024),
        pool: BufPool::new(64 * 1024, usize::MAX),
        stats: SinkStats::default(),
        attempts: HashMap::new(),
        timers: BinaryHeap::new(),
        delayed: Slab::new(),
        saved: 0,
        next_id: 0,
        scratch: Vec::new(),
        started: start,
        limits,
        peers: Vec::new(),
        peer_index: HashMap::new(),
        refusals: Refusals::default(),
        conn_log: ConnLog::default(),
        per_second: PerSecond::default(),
    };
    let cpu0 = crate::util::thread_cpu_ns();
    sink.run(&mut signals, start)?;
    let elapsed = start.elapsed();
    // Connections still open are recorded as they stand.
    let open: Vec<usize> = sink.conns.iter().map(|(k, _)| k).collect();
    for key in open {
        sink.close(key);
    }
    sink.per_second.finish(elapsed);
    let cpu_s = (crate::util::thread_cpu_ns() - cpu0) as f64 / 1e9;
    let st = &sink.stats;
    let secs = elapsed.as_secs_f64().max(1e-9);
    if sink.opts.json {
        let mut v = json!({
            "connections": st.connections, "messages": st.messages, "recipients": st.recipients,
            "bytes": st.bytes, "tempfailed": st.tempfailed, "rejected": st.rejected,
            "dropped": st.dropped, "rcpts_refused": st.rcpts_refused, "tls_messages": st.tls_messages,
            "tls_connections": st.tls_connections, "tls_failed": st.tls_failed,
            "authenticated": st.authenticated, "mail_after_data": st.mail_after_data, "elapsed_s": secs,
            "msgs_per_s": st.messages as f64 / secs, "cpu_s": cpu_s,
        });
        if let Some(m) = v.as_object_mut() {
            m.extend(limits::report(&sink.limits, &sink.refusals, &sink.per_second, &sink.conn_log, &sink.peers));
        }
        crate::report::print_stdout(&v.to_string());
    }
    eprintln!(
        "sink summary: {} connections, {} messages, {} recipients, {} bytes, {} tempfailed, {} rejected, \
         {} dropped, {} recipients refused, TLS {} connections ({} failed) {} messages, {} authenticated, \
         {:.3}s, CPU {:.3}s",
        st.connections,
        st.messages,
        st.recipients,
        st.bytes,
        st.tempfailed,
        st.rejected,
        st.dropped,
        st.rcpts_refused,
        st.tls_connections,
        st.tls_failed,
        st.tls_messages,
        st.authenticated,
        secs,
        cpu_s
    );
    if sink.refusals != Refusals::default() {
        eprintln!("sink refusals: {}", sink.refusals.json());
    }
    Ok(sink.stats)
}

impl Sink {
    fn run(&mut self, signals: &mut Signals, start: Instant) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        let deadline = self.opts.duration.map(|d| start + d);
        let mut next_line = start + self.opts.interval;
        let mut last_msgs = 0;
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
            if !self.opts.interval.is_zero() && now >= next_line {
                let secs = self.opts.interval.as_secs_f64();
                eprintln!(
                    "sink: {} connections, {} messages ({:.0}/s), {} recipients, {} bytes",
                    self.stats.connections,
                    self.stats.messages,
                    (self.stats.messages - last_msgs) as f64 / secs,
                    self.stats.recipients,
                    self.stats.bytes
                );
                last_msgs = self.stats.messages;
                next_line = now + self.opts.interval;
            }
            self.fire_timers(now);
            let mut wake = if self.opts.interval.is_zero() { now + Duration::from_secs(3600) } else { next_line };
            if let Some(Reverse((t, _, _))) = self.timers.peek() {
                wake = wake.min(*t);
            }
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            if let Err(e) = self.poll.poll(&mut events, Some(wake.saturating_duration_since(now))) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("poll");
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNAL => {
                        if signals.pending().next().is_some() {
                            return Ok(());
                        }
                    }
                    Token(t) if t >= LISTENER_BASE => self.accept(t - LISTENER_BASE),
                    Token(key) => {
                        if let Some(c) = self.conns.get_mut(key) {
                            c.io.on_event(ev);
                        }
                        self.drive(key)
                    }
                }
            }
        }
    }

    fn accept(&mut self, li: usize) {
        // Bounded: the listener's backlog is finite and each accept consumes one entry.
        loop {
            let Some((l, implicit)) = self.listeners.get(li) else { return };
            let implicit = *implicit;
            match l.accept() {
                Ok((sock, addr)) => {
                    let _ = sock.set_nodelay(true);
                    let mut io = Transport::new(sock);
                    // Implicit TLS: the session exists from the first byte; the greeting waits
                    // in it until the handshake is done.
                    let tls = match (implicit, &self.opts.tls) {
                        (false, _) => None,
                        (true, Some(cfg)) => match TlsSession::server(cfg) {
                            Ok(t) => Some(t),
                            Err(_) => continue,
                        },
                        (true, None) => continue,
                    };
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if key >= LISTENER_BASE
                        || self
                            .poll
                            .registry()
                            .register(&mut io.sock, Token(key), Interest::READABLE | Interest::WRITABLE)
                            .is_err()
                    {
                        continue;
                    }
                    self.stats.connections += 1;
                    let ip = addr.ip();
                    let limits = &self.limits;
                    let pi = *self.peer_index.entry(ip).or_insert_with(|| {
                        self.peers.push(limits.new_peer(ip, Instant::now()));
                        self.peers.len() - 1
                    });
                    let peer = &mut self.peers[pi];
                    peer.connections += 1;
                    let mut out = Vec::with_capacity(1024);
                    let mut refusals = Refusals::default();
                    // Past --max-connections-per-ip the greeting is the refusal, and the
                    // connection closes once it is written; it takes no slot.
                    let refused = limits.at_connect(peer);
                    match refused {
                        Some(r) => {
                            out.extend_from_slice(r.reply(&peer.replies));
                            refusals.count(r);
                            self.refusals.count(r);
                        }
                        None => {
                            peer.open += 1;
                            out.extend_from_slice(&self.greeting);
                        }
                    }
                    self.next_id += 1;
                    if let Some(t) = tls {
                        io.start_tls(t, &mut self.pool);
                    }
                    io.input = self.pool.checkout();
                    io.writable = true;
                    entry.insert(Conn {
                        id: self.next_id,
                        opened: self.started.elapsed(),
                        io,
                        tls_up: false,
                        upgrade: Upgrade::None,
                        authed: false,
                        user: Vec::new(),
                        out,
                        out_pos: 0,
                        phase: Phase::Command,
                        helo: false,
                        mail: false,
                        rcpts: 0,
                        data_reply: None,
                        drop: false,
                        bdat_size: 0,
                        eod_in_batch: false,
                        env: Vec::new(),
                        body: Vec::new(),
                        paused: false,
                        closing: refused.is_some(),
                        lingering: false,
                        peer: pi,
                        holds_slot: refused.is_none(),
                        ehlo: Vec::new(),
                        accepted: 0,
                        refusals,
                    });
                    self.flush(key);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // EMFILE and friends: drop this batch and try again on the next event.
                Err(_) => return,
            }
        }
    }

    fn close(&mut self, key: usize) {
        if self.conns.contains(key) {
            let mut c = self.conns.remove(key);
            let _ = self.poll.registry().deregister(&mut c.io.sock);
            c.io.release_buffers(&mut self.pool);
            let Some(p) = self.peers.get_mut(c.peer) else { return };
            p.open -= u32::from(c.holds_slot);
            p.messages += c.accepted;
            p.refusals.add(&c.refusals);
            self.conn_log.push(ConnRecord {
                opened: c.opened,
                peer: p.ip,
                ehlo: std::mem::take(&mut c.ehlo),
                messages: c.accepted,
                refusals: c.refusals,
            });
        }
    }

    /// Ends a connection whose last reply is written: FIN now, the close once the client's
    /// FIN is read. Closing at once would find the input the client pipelined behind the
    /// reply (and is still sending) unread, and a close with unread input resets the
    /// connection: the client may then lose the reply (RFC 5321 §3.8 wants it read).
    fn start_linger(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else { return };
        if c.io.sock.shutdown(std::net::Shutdown::Write).is_err() {
            return self.close(key);
        }
        c.lingering = true;
        // A client that never closes is closed after LINGER.
        let d = self.delayed.insert((c.id, b""));
        self.timers.push(Reverse((Instant::now() + LINGER, key, d)));
        self.linger(key);
    }

    /// Reads and drops what a lingering connection's client sends; closes at its FIN.
    fn linger(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let mut scratch = [0u8; 16 * 1024];
        loop {
            match read(&mut c.io.sock, &mut scratch) {
                IoResult::Done(_) => {}
                IoResult::WouldBlock => return,
                IoResult::Closed | IoResult::Error(_) => return self.close(key),
            }
        }
    }

    /// Reads to WouldBlock, processes what arrived, writes the replies.
    fn drive(&mut self, key: usize) {
        loop {
            let Some(c) = self.conns.get_mut(key) else { return };
            if c.lingering {
                return self.linger(key);
            }
            if c.upgrade == Upgrade::Broken {
                return self.break_handshake(key);
            }
            if c.upgrade != Upgrade::None {
                // STARTTLS accepted: nothing more is read in plaintext. The handshake starts
                // (in `flush`) once the 220 is written; then reading goes on through TLS.
                self.flush(key);
                match self.conns.get(key) {
                    Some(c) if matches!(c.upgrade, Upgrade::None | Upgrade::Broken) => continue,
                    _ => return,
                }
            }
            if c.out.len() > 256 * 1024 {
                // A client that pipelines without reading its replies: stop reading until they
                // drain (the kernel buffer then pushes back on the client).
                self.flush(key);
                match self.conns.get(key) {
                    Some(c) if c.out.is_empty() => continue,
                    _ => return,
                }
            }
            if c.paused {
                // A delayed reply is pending; `fire_timers` resumes reading.
                break;
            }
            let got = c.io.read(&mut self.pool);
            if !c.tls_up && c.io.take_handshake_done().is_some() {
                c.tls_up = true;
                self.stats.tls_connections += 1;
            }
            match got {
                Read::Data(_) => {
                    // Bytes of a new read: a MAIL in them did not come with an end of data
                    // processed before (a delayed reply's pause resumes on the old bytes).
                    c.eod_in_batch = false;
                    if !self.process(key) {
                        return;
                    }
                }
                Read::WouldBlock | Read::Full | Read::NoBuffer => break,
                Read::Closed => return self.close(key),
                Read::Failed(_) => {
                    if c.io.is_tls() && !c.tls_up {
                        self.stats.tls_failed += 1;
                    }
                    // The transport sent the alert a protocol error queued, if it could.
                    return self.close(key);
                }
            }
        }
        self.flush(key);
    }

    /// Writes the replies (through TLS when on), then acts on what waited for them: a close
    /// after QUIT, or the switch to TLS after STARTTLS's `220`.
    fn flush(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else { return };
        // Plaintext goes to the transport (which takes less when TLS's buffer is full), and
        // the records TLS queued (handshake messages) go out too.
        loop {
            let took = match c.io.write_parts(&[&c.out[c.out_pos..]]) {
                Ok(n) => n,
                Err(_) => return self.close(key),
            };
            c.out_pos += took;
            if c.out_pos >= c.out.len() {
                match c.io.flush_tls() {
                    Flush::Done => break,
                    Flush::Blocked => return,
                    Flush::Failed(_) => return self.close(key),
                }
            }
            if took == 0 {
                // The socket is full, or TLS holds plaintext until its handshake ends (the
                // next read moves it on).
                return;
            }
        }
        c.out.clear();
        c.out_pos = 0;
        if c.closing {
            c.io.close_tls();
            return self.start_linger(key);
        }
        match c.upgrade {
            Upgrade::None => {}
            Upgrade::Handshake => {
                let Some(cfg) = &self.opts.tls else { return self.close(key) };
                match TlsSession::server(cfg) {
                    Ok(t) => c.io.start_tls(t, &mut self.pool),
                    Err(_) => return self.close(key),
                }
                // RFC 3207 §4.2: the session starts over; the server forgets what the client said.
                c.upgrade = Upgrade::None;
                c.helo = false;
                c.authed = false;
                c.user.clear();
                self.reset_txn(key);
            }
            Upgrade::Break => c.upgrade = Upgrade::Broken,
            Upgrade::Broken => {}
        }
    }

    /// `--tls-fail`: answers the client's first handshake bytes with garbage (not a TLS record)
    /// and closes, as a broken TLS stack would. Waiting for the ClientHello keeps the garbage
    /// out of the segment that carries the `220`.
    fn break_handshake(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else { return };
        // Raw socket I/O on purpose: this answer must not be TLS.
        let Some(input) = c.io.input.as_mut() else { return self.close(key) };
        match read(&mut c.io.sock, input.space()) {
            IoResult::WouldBlock => return,
            IoResult::Done(_) => {
                // Best effort: the connection ends right after either way.
                let _ = write(&mut c.io.sock, TLS_GARBAGE);
            }
            IoResult::Closed | IoResult::Error(_) => {}
        }
        self.stats.tls_failed += 1;
        self.close(key);
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, key, d))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let (id, reply) = self.delayed.remove(d);
            let Some(c) = self.conns.get_mut(key).filter(|c| c.id == id) else { continue };
            if c.lingering {
                // The linger's time is up (see `start_linger`).
                self.close(key);
                continue;
            }
            c.out.extend_from_slice(reply);
            c.paused = false;
            // Commands pipelined behind the delayed reply are waiting in the input buffer.
            if self.process(key) {
                self.drive(key);
            }
        }
    }

    /// Acts on buffered input. Returns false if the connection was closed.
    fn process(&mut self, key: usize) -> bool {
        let Some(c) = self.conns.get_mut(key) else { return false };
        let Some(mut input) = c.io.input.take() else { return false };
        let alive = self.process_buf(key, &mut input);
        match self.conns.get_mut(key) {
            Some(c) => {
                c.io.input = Some(input);
                alive
            }
            None => {
                self.pool.checkin(input);
                false
            }
        }
    }

    fn process_buf(&mut self, key: usize, input: &mut Buf) -> bool {
        loop {
            let Some(c) = self.conns.get_mut(key) else { return false };
            if c.closing {
                // Nothing more is answered (after QUIT or a 421). What the client pipelined
                // behind is read and dropped, so that the close finds no unread input and
                // ends the stream with FIN: unread input makes the kernel reset the
                // connection, and a client still writing may then miss the reply.
                input.consume(input.data().len());
                return true;
            }
            if c.paused || c.upgrade != Upgrade::None {
                return true;
            }
            match &mut c.phase {
                Phase::Command | Phase::Auth(_) => match next_line(input.data()) {
                    Framed::Line(line, n) => {
                        // Commands are short: copy the line so that the handler may borrow
                        // everything else mutably. Bounded by MAX_LINE, on the stack.
                        let mut buf = [0u8; sluice::smtp::line::MAX_LINE];
                        buf[..line.len()].copy_from_slice(line);
                        let len = line.len();
                        input.consume(n);
                        match c.phase {
                            Phase::Auth(step) => self.auth_line(key, step, &buf[..len]),
                            _ => self.command(key, &buf[..len]),
                        }
                        if self.conns.get(key).is_some_and(|c| c.upgrade != Upgrade::None) {
                            // Whatever was pipelined behind STARTTLS is plaintext that would
                            // otherwise be read as if it came over TLS: discarded (CVE-2011-0411).
                            input.consume(input.data().len());
                            return true;
                        }
                    }
                    Framed::Partial => return true,
                    Framed::Overlong { consumed, ended } => {
                        input.consume(consumed);
                        c.out.extend_from_slice(LINE_TOO_LONG);
                        c.phase = if ended { Phase::Command } else { Phase::SkipLine };
                    }
                },
                Phase::SkipLine => {
                    let (n, ended) = skip_line(input.data());
                    if n == 0 {
                        return true;
                    }
                    input.consume(n);
                    if ended {
                        c.phase = Phase::Command;
                    }
                }
                Phase::Data(scanner) => {
                    if c.drop && !input.is_empty() {
                        self.drop_mid_message(key);
                        return false;
                    }
                    let body = if self.opts.save.is_some() { &mut c.body } else { &mut self.scratch };
                    let r = scanner.scan(input.data(), body);
                    input.consume(r.consumed);
                    if !r.done {
                        return true;
                    }
                    let size = scanner.size();
                    c.phase = Phase::Command;
                    c.eod_in_batch = true;
                    self.end_of_message(key, size, "DATA");
                }
                Phase::Bdat { remaining, last, refuse } => {
                    if c.drop && !input.is_empty() {
                        self.drop_mid_message(key);
                        return false;
                    }
                    let keep = self.opts.save.is_some() && refuse.is_none();
                    let body = if keep { &mut c.body } else { &mut self.scratch };
                    // A limit of 0 with the scratch vector counts without copying.
                    let n = bdat_take(input.data(), remaining, &mut c.bdat_size, if keep { u64::MAX } else { 0 }, body);
                    input.consume(n);
                    if *remaining > 0 {
                        return true;
                    }
                    let (last, refuse) = (*last, *refuse);
                    c.phase = Phase::Command;
                    c.eod_in_batch = last;
                    if let Some(r) = refuse {
                        c.out.extend_from_slice(r);
                        self.reset_txn(key);
                    } else if last {
                        let size = c.bdat_size;
                        self.end_of_message(key, size, "BDAT");
                    } else {
                        c.out.extend_from_slice(CHUNK_OK);
                    }
                }
            }
        }
    }

    /// `--drop-rate`/`drop-`: the connection dies in the middle of the message, which gets no
    /// reply. The replies already given (to an envelope pipelined ahead of a BDAT chunk) are
    /// written first, so the client learns the RCPT outcomes it would have had before DATA.
    fn drop_mid_message(&mut self, key: usize) {
        self.stats.dropped += 1;
        if let Some(c) = self.conns.get_mut(key) {
            c.closing = true;
        }
        self.flush(key);
    }

    fn reset_txn(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            c.mail = false;
            c.rcpts = 0;
            c.data_reply = None;
            c.drop = false;
            c.bdat_size = 0;
            c.env.clear();
            c.body.clear();
        }
    }

    fn command(&mut self, key: usize, line: &[u8]) {
        let opts = &self.opts;
        let Some(c) = self.conns.get_mut(key) else { return };
        let cmd = match parse(line) {
            Ok(cmd) => cmd,
            Err(fault) => {
                c.out.extend_from_slice(fault.reply());
                return;
            }
        };
        match cmd {
            Command::Ehlo(name) => {
                c.helo = true;
                remember_name(&mut c.ehlo, name);
                c.out.extend_from_slice(if c.io.is_tls() { &self.ehlo_reply_tls } else { &self.ehlo_reply });
                self.reset_txn(key);
            }
            Command::Helo(name) => {
                c.helo = true;
                remember_name(&mut c.ehlo, name);
                c.out.extend_from_slice(&self.helo_reply);
                self.reset_txn(key);
            }
            Command::Mail(path, _) => {
                if c.eod_in_batch {
                    self.stats.mail_after_data += 1;
                }
                // The limits need the time only when a rate or a window is set.
                let now = if self.limits.timed() { Instant::now() } else { self.started };
                let refusal = match self.peers.get_mut(c.peer) {
                    Some(peer) if c.helo && !c.mail => self.limits.at_mail(now, c.accepted, peer).map(|r| (r, peer)),
                    _ => None,
                };
                let reply = if !c.helo {
                    NEED_EHLO
                } else if c.mail {
                    NESTED_MAIL
                } else if let Some((r, peer)) = refusal {
                    let reply = r.reply(&peer.replies);
                    c.refusals.count(r);
                    self.refusals.count(r);
                    c.closing = limits::closes(reply);
                    c.out.extend_from_slice(reply);
                    return;
                } else {
                    c.mail = true;
                    if opts.save.is_some() {
                        c.env.extend_from_slice(b"MAIL FROM:<");
                        c.env.extend_from_slice(path.addr);
                        c.env.extend_from_slice(b">\n");
                    }
                    SENDER_OK
                };
                c.out.extend_from_slice(reply);
            }
            Command::Rcpt(path, _) => {
                let reply = self.rcpt(key, path.addr);
                if let Some(c) = self.conns.get_mut(key) {
                    c.out.extend_from_slice(reply);
                }
            }
            Command::Data => {
                if !c.mail {
                    c.out.extend_from_slice(NEED_MAIL);
                } else if c.rcpts == 0 {
                    c.out.extend_from_slice(NO_RCPTS);
                } else {
                    c.out.extend_from_slice(START_DATA);
                    c.drop |= self.rng.chance(opts.drop_rate);
                    // Not saving: a limit of 0 makes the scanner count octets without copying.
                    let limit = if opts.save.is_some() { u64::MAX } else { 0 };
                    c.phase = Phase::Data(DataScanner::new(limit));
                }
            }
            Command::Bdat(size, last) => {
                let refuse = if !c.mail {
                    Some(NEED_MAIL)
                } else if c.rcpts == 0 {
                    Some(NO_RCPTS)
                } else {
                    None
                };
                if refuse.is_none() && c.bdat_size == 0 {
                    c.drop |= self.rng.chance(opts.drop_rate);
                }
                c.phase = Phase::Bdat { remaining: size, last, refuse };
            }
            Command::Rset => {
                c.out.extend_from_slice(OK);
                self.reset_txn(key);
            }
            Command::Noop | Command::Help => c.out.extend_from_slice(OK),
            Command::Vrfy => c.out.extend_from_slice(VRFY),
            Command::Quit => {
                c.out.extend_from_slice(BYE);
                c.closing = true;
            }
            Command::StartTls(arg) => {
                let reply = if opts.tls.is_none() && !opts.tls_fail {
                    NOT_IMPLEMENTED
                } else if c.io.is_tls() {
                    TLS_ACTIVE
                } else if !arg.is_empty() {
                    STARTTLS_SYNTAX
                } else {
                    c.upgrade = if opts.tls_fail { Upgrade::Break } else { Upgrade::Handshake };
                    READY_TLS
                };
                c.out.extend_from_slice(reply);
            }
            Command::Auth(arg) => self.auth(key, arg),
            Command::Expn => c.out.extend_from_slice(NOT_IMPLEMENTED),
        }
    }

    /// `AUTH mechanism [initial-response]` (RFC 4954 §4): PLAIN (RFC 4616) and LOGIN, any
    /// credentials, with `--auth-any`.
    fn auth(&mut self, key: usize, arg: &[u8]) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let reply = if !self.opts.auth_any {
            AUTH_DISABLED
        } else if c.authed {
            AUTH_AGAIN
        } else if c.mail {
            AUTH_IN_TXN
        } else {
            let (mech, initial) = match memchr::memchr(b' ', arg) {
                Some(sp) => (&arg[..sp], Some(arg[sp + 1..].trim_ascii())),
                None => (arg, None),
            };
            match (mech.to_ascii_uppercase().as_slice(), initial) {
                (b"PLAIN", None) => {
                    c.phase = Phase::Auth(AuthStep::Plain);
                    auth::PLAIN_PROMPT
                }
                (b"PLAIN", Some(resp)) => return self.auth_line(key, AuthStep::Plain, resp),
                (b"LOGIN", None) => {
                    c.phase = Phase::Auth(AuthStep::LoginUser);
                    auth::LOGIN_USER_PROMPT
                }
                (b"LOGIN", Some(resp)) => return self.auth_line(key, AuthStep::LoginUser, resp),
                _ => AUTH_MECH,
            }
        };
        c.out.extend_from_slice(reply);
    }

    /// One client line of an AUTH exchange: decodes it and answers (any credentials pass).
    fn auth_line(&mut self, key: usize, step: AuthStep, line: &[u8]) {
        let Some(c) = self.conns.get_mut(key) else { return };
        c.phase = Phase::Command;
        if line == b"*" {
            c.out.extend_from_slice(AUTH_CANCELLED);
            return;
        }
        // `=` is an empty response (RFC 4954 §4).
        let decoded =
            if line == b"=" { Ok(Vec::new()) } else { base64::engine::general_purpose::STANDARD.decode(line) };
        let Ok(decoded) = decoded else {
            c.out.extend_from_slice(AUTH_BAD);
            return;
        };
        let user = match step {
            AuthStep::LoginUser => {
                c.user = decoded;
                c.phase = Phase::Auth(AuthStep::LoginPass);
                c.out.extend_from_slice(auth::LOGIN_PASS_PROMPT);
                return;
            }
            AuthStep::LoginPass => std::mem::take(&mut c.user),
            // authzid NUL authcid NUL passwd (RFC 4616 §2).
            AuthStep::Plain => {
                let mut parts = decoded.split(|&b| b == 0);
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(_), Some(authcid), Some(_), None) => authcid.to_vec(),
                    _ => {
                        c.out.extend_from_slice(AUTH_BAD);
                        return;
                    }
                }
            }
        };
        c.user = user;
        c.authed = true;
        self.stats.authenticated += 1;
        c.out.extend_from_slice(reply::AUTH_OK);
    }

    /// Decides one RCPT: sequencing, `--max-rcpts`, local-part rules, then injected faults.
    fn rcpt(&mut self, key: usize, addr: &[u8]) -> &'static [u8] {
        let Some(c) = self.conns.get_mut(key) else { return OK };
        if !c.mail {
            return NEED_MAIL;
        }
        if c.rcpts as usize >= self.opts.max_rcpts {
            self.stats.rcpts_refused += 1;
            return TOO_MANY_RCPTS;
        }
        let local = match memchr::memrchr(b'@', addr) {
            Some(at) => &addr[..at],
            None => addr,
        };
        let refused = if local.starts_with(b"rej-") {
            Some(USER_UNKNOWN)
        } else if local.starts_with(b"full-") {
            Some(MAILBOX_FULL)
        } else if let Some(k) = tf_count(local) {
            let n = self.attempts.entry(addr.to_ascii_lowercase()).or_insert(0);
            *n += 1;
            (*n <= k).then_some(TRY_LATER)
        } else if self.opts.fail_at == FailAt::Rcpt && self.rng.chance(self.opts.permfail_rate) {
            Some(INJECTED_PERM_RCPT)
        } else if self.opts.fail_at == FailAt::Rcpt && self.rng.chance(self.opts.tempfail_rate) {
            Some(INJECTED_TEMP)
        } else {
            None
        };
        if let Some(r) = refused {
            self.stats.rcpts_refused += 1;
            return r;
        }
        if local.starts_with(b"datafail-") {
            c.data_reply = Some(INJECTED_PERM_DATA);
        } else if local.starts_with(b"datatf-") {
            c.data_reply.get_or_insert(INJECTED_TEMP);
        } else if local.starts_with(b"drop-") {
            c.drop = true;
        }
        c.rcpts += 1;
        if self.opts.save.is_some() {
            c.env.extend_from_slice(b"RCPT TO:<");
            c.env.extend_from_slice(addr);
            c.env.extend_from_slice(b">\n");
        }
        RCPT_OK
    }

    /// The reply to a complete message that came by `transfer` (DATA or BDAT): forced,
    /// injected, or accepted (and saved); delayed by `--delay`.
    fn end_of_message(&mut self, key: usize, size: u64, transfer: &str) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let reply = if let Some(r) = c.data_reply {
            r
        } else if self.opts.fail_at == FailAt::Data && self.rng.chance(self.opts.permfail_rate) {
            INJECTED_PERM_DATA
        } else if self.opts.fail_at == FailAt::Data && self.rng.chance(self.opts.tempfail_rate) {
            INJECTED_TEMP
        } else {
            QUEUED
        };
        match reply[0] {
            b'2' => {
                self.stats.messages += 1;
                c.accepted += 1;
                self.per_second.record(self.started.elapsed());
                if c.io.is_tls() {
                    self.stats.tls_messages += 1;
                }
                let before = self.stats.recipients;
                self.stats.recipients += u64::from(c.rcpts);
                self.stats.bytes += size;
                // Logged from here, not from the periodic line, so that a parent timing a run
                // (`bench` end to end) sees the moment the last recipient arrived, once.
                if let Some(n) = self.opts.expect_recipients {
                    if before < n && self.stats.recipients >= n {
                        eprintln!(
                            "event=expected recipients={} messages={}",
                            self.stats.recipients, self.stats.messages
                        );
                    }
                }
                if let Some(dir) = &self.opts.save {
                    self.saved += 1;
                    let base = dir.join(format!("{:08}", self.saved));
                    // After the envelope: how the message came in.
                    let _ = writeln!(c.env, "TRANSFER: {transfer}");
                    if let Some(info) = c.io.tls_info() {
                        let _ = writeln!(c.env, "TLS: {} {}", info.version, info.cipher);
                    }
                    if c.authed {
                        c.env.extend_from_slice(b"AUTH: ");
                        c.env.extend_from_slice(&c.user);
                        c.env.push(b'\n');
                    }
                    // Who sent it: the client's address and EHLO name (egress sources).
                    if let Some(p) = self.peers.get(c.peer) {
                        let _ = writeln!(c.env, "PEER: {}", p.ip);
                    }
                    c.env.extend_from_slice(b"EHLO: ");
                    c.env.extend_from_slice(&c.ehlo);
                    c.env.push(b'\n');
                    // The message is written under a temporary name and renamed, so a reader
                    // polling for `.msg` files never sees a partial one.
                    let tmp = base.with_extension("part");
                    let ok = std::fs::write(base.with_extension("env"), &c.env).is_ok()
                        && std::fs::File::create(&tmp).and_then(|mut f| f.write_all(&c.body)).is_ok()
                        && std::fs::rename(&tmp, base.with_extension("msg")).is_ok();
                    if !ok {
                        eprintln!("sink: cannot save message to {}", dir.display());
                    }
                }
            }
            b'4' => self.stats.tempfailed += 1,
            _ => self.stats.rejected += 1,
        }
        if self.opts.delay.is_zero() {
            c.out.extend_from_slice(reply);
        } else {
            c.paused = true;
            let d = self.delayed.insert((c.id, reply));
            self.timers.push(Reverse((Instant::now() + self.opts.delay, key, d)));
        }
        self.reset_txn(key);
    }
}

/// Keeps the EHLO/HELO name for the report, at most 255 octets (a domain name's length, RFC
/// 1035 §2.3.4), so the bounded connection log stays bounded in bytes too.
fn remember_name(dst: &mut Vec<u8>, name: &[u8]) {
    dst.clear();
    dst.extend_from_slice(&name[..name.len().min(255)]);
}

/// `tf<K>-` → `Some(K)`.
fn tf_count(local: &[u8]) -> Option<u32> {
    let rest = local.strip_prefix(b"tf")?;
    let dash = memchr::memchr(b'-', rest)?;
    sluice::smtp::command::parse_u64(&rest[..dash]).map(|k| k.min(u64::from(u32::MAX)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_prefix() {
        assert_eq!(tf_count(b"tf2-x"), Some(2));
        assert_eq!(tf_count(b"tf10-"), Some(10));
        assert_eq!(tf_count(b"tfx-"), None);
        assert_eq!(tf_count(b"user"), None);
    }
}
