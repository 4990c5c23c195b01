//! `sluice-load send`: an SMTP load generator on one mio loop per thread.
//!
//! Owns: N client connections per thread, each a small reply-driven state machine; message
//! bodies rendered (and dot-stuffed) once at start and shared by every transaction; envelopes
//! rendered into a per-connection output vector that is reused, so steady state allocates
//! nothing per message. Must never: block, loop per byte over message data, or retry a lost
//! transaction (a load generator that hides failures measures nothing).
//!
//! With PIPELINING (RFC 2920) a transaction is one group `MAIL RCPT.. DATA`, and after the `354`
//! the body, its end-of-data line and the next transaction's envelope go out in one write (RFC
//! 2920 §3.1 allows message content to start a group), so a message costs one round trip. With
//! `--bdat` (RFC 3030) the whole transaction is one write: `MAIL RCPT.. BDAT n LAST` + octets.
//! Without PIPELINING the commands go one at a time (RFC 5321 §4.1.4 lockstep).
//!
//! TLS goes through the relay's seam (`sluice::net::tls`), certificates unverified:
//! `--starttls` does EHLO, STARTTLS (RFC 3207), the handshake and EHLO again before the first
//! transaction; `--tls` starts the handshake on connect (implicit TLS). `--auth` sends one
//! `AUTH PLAIN` with an initial response (RFC 4954 §4, rendered once) after the last EHLO.
//! Until the session is open, any failure (refused STARTTLS or AUTH, failed handshake) fails
//! the connection with the reply in the report and counts against the slot like a connect
//! error, so a target that always refuses ends the run instead of spinning.
//!
//! Latency: "end of data" runs from the last octet of the message written to its final reply;
//! "transaction" from the MAIL command written (or, under `--rate`, from the time the message
//! was *scheduled*, so that a stalled target cannot hide its stall by slowing the sender down —
//! coordinated omission) to the final reply. "handshake" runs from the TLS session's start
//! (the `220` to STARTTLS, or the TCP connect for `--tls`) to the end of the handshake.

use crate::report::{self, Progress, Stats};
use crate::util::{thread_cpu_ns, Rng};
use hdrhistogram::Histogram;
use memchr::{memchr, memmem};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll};
use sluice::buf::{Buf, BufPool};
use sluice::net::socket::{read, IoResult};
use sluice::net::tls::{ClientTls, TlsError, TlsFlush, TlsRead, TlsSession};
use sluice::net::token::{self, Kind};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How a connection gets TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain SMTP.
    Plain,
    /// STARTTLS after the first EHLO (RFC 3207).
    StartTls,
    /// TLS from the first byte (RFC 8314 implicit TLS).
    Implicit,
}

/// Everything `send` needs, validated.
#[derive(Debug, Clone)]
pub struct SendOpts {
    /// Target address.
    pub to: SocketAddr,
    /// Concurrent connections (over all threads).
    pub connections: usize,
    /// Total messages, or `None` with `duration`.
    pub messages: Option<u64>,
    /// Stop starting messages after this long.
    pub duration: Option<Duration>,
    /// Message bodies to send, each with a weight (a size distribution).
    pub bodies: Vec<(Body, u32)>,
    /// Recipients per message.
    pub rcpts: usize,
    /// Recipient domains, spread round-robin.
    pub domains: Vec<String>,
    /// Recipient local part prefix (the recipient index follows it).
    pub rcpt_prefix: String,
    /// Envelope sender.
    pub from: String,
    /// EHLO name.
    pub helo: String,
    /// Messages per connection before QUIT and reconnect.
    pub per_connection: u64,
    /// Open-loop arrival rate in messages/s (over all threads).
    pub rate: Option<f64>,
    /// Use PIPELINING when the server advertises it.
    pub pipelining: bool,
    /// Use BDAT when the server advertises CHUNKING.
    pub bdat: bool,
    /// STARTTLS, implicit TLS or neither.
    pub tls: TlsMode,
    /// The `AUTH PLAIN ...` command line (with CRLF) to send after the last EHLO.
    pub auth: Option<Vec<u8>>,
    /// Worker threads, one mio loop each.
    pub threads: usize,
    /// No reply for this long: the connection is dropped and its transactions counted lost.
    pub timeout: Duration,
    /// PRNG seed (size draws).
    pub seed: u64,
}

/// One message body, rendered once: raw octets (for BDAT and byte accounting) and the
/// dot-stuffed form with the end-of-data line (for DATA).
#[derive(Debug, Clone)]
pub struct Body {
    /// The message as the recipient sees it; ends with CRLF.
    pub raw: Vec<u8>,
    /// Dot-stuffed (RFC 5321 §4.5.2) and followed by `.` CRLF.
    pub stuffed: Vec<u8>,
}

impl Body {
    /// Wraps exact message bytes (a CRLF is appended when they do not end with one: DATA needs it).
    pub fn from_bytes(mut raw: Vec<u8>) -> Body {
        if !raw.is_empty() && !raw.ends_with(b"\r\n") {
            raw.extend_from_slice(b"\r\n");
        }
        let mut stuffed = Vec::with_capacity(raw.len() + raw.len() / 64 + 3);
        let mut last = 0;
        if raw.first() == Some(&b'.') {
            stuffed.push(b'.');
        }
        // Every line that starts with a dot gets one more (found in bulk with memmem).
        for pos in memmem::find_iter(&raw, b"\n.") {
            stuffed.extend_from_slice(&raw[last..=pos]);
            stuffed.push(b'.');
            last = pos + 1;
        }
        stuffed.extend_from_slice(&raw[last..]);
        stuffed.extend_from_slice(b".\r\n");
        Body { raw, stuffed }
    }

    /// A synthetic message of exactly `size` octets (at least 2): a few headers, then 78-octet
    /// text lines, every 16th starting with a dot so that the target's unstuffing is exercised.
    pub fn synthetic(size: usize, from: &str) -> Body {
        let size = size.max(2);
        let mut raw = Vec::with_capacity(size + 80);
        raw.extend_from_slice(
            format!(
                "From: <{from}>\r\nTo: <undisclosed-recipients:;>\r\nSubject: sluice-load test message\r\n\
                 Message-ID: <load@sluice-load.test>\r\nMIME-Version: 1.0\r\n\
                 Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            )
            .as_bytes(),
        );
        let text = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.";
        let mut n = 0;
        while raw.len() < size {
            if n % 16 == 15 {
                raw.push(b'.');
            }
            raw.extend_from_slice(&text[..76]);
            raw.extend_from_slice(b"\r\n");
            n += 1;
        }
        raw.truncate(size);
        // Keep the exact size and a CRLF at the end.
        let len = raw.len();
        raw[len - 2] = b'\r';
        raw[len - 1] = b'\n';
        if len >= 3 && raw[len - 3] == b'\r' {
            raw[len - 3] = b' ';
        }
        Body::from_bytes(raw)
    }
}

/// What reply a connection is waiting for; the `u8` names a transaction slot (0 or 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    Mail(u8),
    Rcpt(u8),
    Data(u8),
    EndData(u8),
    Bdat(u8),
    Rset,
    StartTls,
    Auth,
    Quit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No socket; (re)connect when `retry_at` passes and work remains.
    Idle,
    Connecting,
    /// Greeting/EHLO (/STARTTLS/handshake/AUTH) exchange.
    Opening,
    /// Session open; transactions run.
    Open,
    /// QUIT sent.
    Quitting,
    /// This slot will not connect again.
    Finished,
}

#[derive(Debug, Clone, Copy)]
struct Txn {
    start: Instant,
    eod: Instant,
    body: usize,
    /// First failure code before the final reply (MAIL or RCPT refused), 0 if none.
    fail: u16,
    rcpt_ok: u32,
}

/// An outstanding octet range of one body (by index) still to write.
#[derive(Debug, Clone, Copy)]
struct BodyWrite {
    body: usize,
    off: usize,
    stuffed: bool,
    slot: u8,
}

struct Conn {
    sock: Option<TcpStream>,
    /// The TLS session once STARTTLS succeeded (or from the connect, for `--tls`); boxed so
    /// that plaintext connections stay small.
    tls: Option<Box<TlsSession>>,
    /// When the handshake in progress started; taken when it ends.
    hs_start: Option<Instant>,
    /// The last EHLO reply listed STARTTLS.
    offers_starttls: bool,
    gen: u32,
    state: State,
    input: Option<Buf>,
    /// Command octets; `out[..split]` go before `body`, the rest after it.
    out: Vec<u8>,
    out_pos: usize,
    split: usize,
    body: Option<BodyWrite>,
    /// Commands rendered but not yet released (lockstep mode releases one per reply).
    held: Vec<u8>,
    held_pos: usize,
    held_kinds: VecDeque<Expect>,
    expect: VecDeque<Expect>,
    pipelining: bool,
    chunking: bool,
    on_conn: u64,
    txns: [Txn; 2],
    next_slot: u8,
    in_flight: u32,
    need_rset: bool,
    last_io: Instant,
    retry_at: Instant,
    /// Consecutive failures before a session opened (connect, greeting, TLS, AUTH); reset when
    /// one opens.
    connect_failures: u32,
}

/// Runs `send` with `opts`; returns the merged statistics, the wall time and throughput samples.
pub fn run(opts: &SendOpts, quiet: bool) -> (Stats, Duration, Vec<(f64, u64)>) {
    let progress = Progress::new();
    let start = Instant::now();
    let threads = opts.threads.clamp(1, opts.connections.max(1));
    let mut merged = Stats::default();
    let mut samples = Vec::new();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for t in 0..threads {
            let share = |n: u64| n / threads as u64 + u64::from((t as u64) < n % threads as u64);
            let conns = share(opts.connections as u64) as usize;
            let msgs = opts.messages.map(share);
            let rate = opts.rate.map(|r| r * conns as f64 / opts.connections as f64);
            let progress = &progress;
            handles.push(s.spawn(move || {
                let mut w = Worker::new(opts, conns, msgs, rate, progress, opts.seed.wrapping_add(t as u64));
                w.run(start);
                w.stats.cpu_ns = thread_cpu_ns();
                w.stats
            }));
        }
        let reporter = s.spawn(|| report::progress_loop(&progress, start, quiet));
        for h in handles {
            match h.join() {
                Ok(st) => merged.merge(&st),
                Err(_) => merged.last_error = Some("a sender thread panicked".into()),
            }
        }
        progress.done.store(true, Ordering::Release);
        samples = reporter.join().unwrap_or_default();
    });
    (merged, start.elapsed(), samples)
}

/// One read from the connection, plain or through TLS, classified.
enum Got {
    Data(usize),
    WouldBlock,
    /// Orderly close (FIN, or close_notify, or a truncation once the session is up).
    Closed,
    Failed(String),
}

enum Claim {
    Go(Instant),
    Wait(Instant),
    Done,
}

struct Worker<'a> {
    opts: &'a SendOpts,
    /// Cumulative weights for the size draw.
    cum: Vec<u32>,
    poll: Poll,
    conns: Vec<Conn>,
    pool: BufPool,
    stats: Stats,
    remaining: u64,
    stop_at: Option<Instant>,
    rate: Option<f64>,
    rate_start: Instant,
    issued: u64,
    rng: Rng,
    counter: u64,
    progress: &'a Progress,
    recent: Histogram<u64>,
    published: Stats,
    /// Earliest rate-scheduled start some connection waits for (found outside `scan`).
    wake: Instant,
    /// Client TLS settings (no certificate check), made once, for `--starttls`/`--tls`.
    client_tls: Option<ClientTls>,
    /// The name sessions are opened for: the target's IP address (no SNI is sent for it).
    server_name: String,
}

impl<'a> Worker<'a> {
    fn new(
        opts: &'a SendOpts,
        conns: usize,
        msgs: Option<u64>,
        rate: Option<f64>,
        progress: &'a Progress,
        seed: u64,
    ) -> Worker<'a> {
        let now = Instant::now();
        let mut cum = Vec::new();
        let mut acc = 0;
        for (_, w) in &opts.bodies {
            acc += w;
            cum.push(acc);
        }
        let conns = (0..conns)
            .map(|_| Conn {
                sock: None,
                tls: None,
                hs_start: None,
                offers_starttls: false,
                gen: 0,
                state: State::Idle,
                input: None,
                out: Vec::with_capacity(4096),
                out_pos: 0,
                split: 0,
                body: None,
                held: Vec::with_capacity(1024),
                held_pos: 0,
                held_kinds: VecDeque::with_capacity(16),
                expect: VecDeque::with_capacity(opts.rcpts * 2 + 8),
                pipelining: false,
                chunking: false,
                on_conn: 0,
                txns: [Txn { start: now, eod: now, body: 0, fail: 0, rcpt_ok: 0 }; 2],
                next_slot: 0,
                in_flight: 0,
                need_rset: false,
                last_io: now,
                retry_at: now,
                connect_failures: 0,
            })
            .collect();
        Worker {
            opts,
            cum,
            poll: Poll::new().expect("epoll_create"),
            conns,
            pool: BufPool::new(16 * 1024, usize::MAX),
            stats: Stats::default(),
            remaining: msgs.unwrap_or(u64::MAX),
            stop_at: opts.duration.map(|d| now + d),
            rate,
            rate_start: now,
            issued: 0,
            rng: Rng::new(seed),
            counter: seed.wrapping_mul(1_000_003),
            progress,
            recent: report::new_histogram(),
            published: Stats::default(),
            wake: now + Duration::from_secs(3600),
            client_tls: (opts.tls != TlsMode::Plain).then(ClientTls::unverified),
            server_name: opts.to.ip().to_string(),
        }
    }

    fn run(&mut self, start: Instant) {
        self.rate_start = start;
        let mut events = Events::with_capacity(1024);
        let mut next_scan = Instant::now();
        let mut next_publish = Instant::now() + Duration::from_millis(200);
        loop {
            let now = Instant::now();
            if now >= next_scan {
                self.wake = now + Duration::from_secs(3600);
                next_scan = self.scan(now);
                if self.conns.iter().all(|c| c.state == State::Finished) {
                    break;
                }
            }
            if now >= next_publish {
                self.publish();
                next_publish = now + Duration::from_millis(200);
            }
            next_scan = next_scan.min(self.wake);
            let wait = next_scan.min(next_publish).saturating_duration_since(now);
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.stats.last_error = Some(format!("poll: {e}"));
                    break;
                }
            }
            for ev in events.iter() {
                let Some((Kind::Outbound, gen, ci)) = token::split(ev.token()) else { continue };
                if ci >= self.conns.len() || self.conns[ci].gen != gen {
                    continue; // a stale event for a closed connection
                }
                self.drive(ci);
                // Some state changes (end of work, reconnect) are handled by the scan.
                if self.conns[ci].state == State::Idle {
                    next_scan = Instant::now();
                }
            }
        }
        self.publish();
    }

    /// Timers: reconnects, rate-scheduled starts and I/O timeouts. Returns when to scan again.
    fn scan(&mut self, now: Instant) -> Instant {
        let mut next = now + Duration::from_millis(100);
        for ci in 0..self.conns.len() {
            let c = &self.conns[ci];
            match c.state {
                State::Idle => {
                    if !self.has_work(now) {
                        self.conns[ci].state = State::Finished;
                    } else if c.retry_at <= now {
                        self.connect(ci, now);
                    } else {
                        next = next.min(c.retry_at);
                    }
                }
                State::Open if c.expect.is_empty() && c.body.is_none() && c.held_kinds.is_empty() => {
                    // Idle on an open session: waiting for the rate schedule (or for work to end).
                    if let Some(at) = self.next_txn(ci, now) {
                        next = next.min(at);
                    }
                    self.flush(ci);
                }
                State::Finished => {}
                _ => {
                    if now.duration_since(c.last_io) >= self.opts.timeout {
                        let what = if c.state == State::Connecting { "connect" } else { "reply" };
                        self.fail_conn(ci, format!("{what} timeout after {:?}", self.opts.timeout));
                    }
                }
            }
        }
        next
    }

    fn has_work(&self, now: Instant) -> bool {
        self.remaining > 0
            && match self.stop_at {
                Some(t) => now < t,
                None => true,
            }
    }

    fn claim(&mut self, now: Instant) -> Claim {
        if !self.has_work(now) {
            return Claim::Done;
        }
        let start = match self.rate {
            Some(r) => {
                let due = self.rate_start + Duration::from_secs_f64(self.issued as f64 / r);
                if due > now {
                    return Claim::Wait(due);
                }
                due
            }
            None => now,
        };
        self.issued += 1;
        self.remaining -= 1;
        Claim::Go(start)
    }

    fn connect(&mut self, ci: usize, now: Instant) {
        let c = &mut self.conns[ci];
        c.gen = token::next_generation(c.gen);
        // TCP_NODELAY from the first byte (the relay's outbound sockets do the same).
        match sluice::net::socket::connect(self.opts.to) {
            Ok(mut s) => {
                let tok = token::make(Kind::Outbound, c.gen, ci);
                if let Err(e) = self.poll.registry().register(&mut s, tok, Interest::READABLE | Interest::WRITABLE) {
                    self.stats.last_error = Some(format!("register: {e}"));
                    c.state = State::Finished;
                    return;
                }
                c.sock = Some(s);
                c.state = State::Connecting;
                c.last_io = now;
            }
            Err(e) => {
                c.state = State::Connecting;
                self.fail_conn(ci, format!("connect {}: {e}", self.opts.to));
            }
        }
    }

    /// Closes a connection after an error; its open transactions are counted lost.
    fn fail_conn(&mut self, ci: usize, why: String) {
        let was_connecting = self.conns[ci].state == State::Connecting;
        let in_setup = self.conns[ci].state == State::Opening;
        let lost = u64::from(self.conns[ci].in_flight);
        self.stats.errors += lost;
        self.stats.last_error = Some(why);
        let c = &mut self.conns[ci];
        if was_connecting {
            self.stats.connect_errors += 1;
            c.connect_failures += 1;
        } else if in_setup {
            // Greeting, STARTTLS, handshake or AUTH failed: the connection never carried mail.
            self.stats.session_errors += 1;
            c.connect_failures += 1;
        }
        self.close(ci);
        let c = &mut self.conns[ci];
        // Back off on repeated connect failures; a target that never answers ends the slot.
        if c.connect_failures >= 5 {
            c.state = State::Finished;
        } else if c.connect_failures == 0 {
            c.retry_at = Instant::now();
        } else {
            c.retry_at = Instant::now() + Duration::from_millis(20 << c.connect_failures.min(5));
        }
    }

    fn close(&mut self, ci: usize) {
        let c = &mut self.conns[ci];
        if let Some(mut s) = c.sock.take() {
            if let Some(tls) = c.tls.as_mut() {
                // Best effort close_notify: the socket is closed right after either way.
                tls.close();
                let _ = tls.flush(&mut s);
            }
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.tls = None;
        c.hs_start = None;
        if let Some(b) = c.input.take() {
            self.pool.checkin(b);
        }
        c.gen = token::next_generation(c.gen);
        c.out.clear();
        c.out_pos = 0;
        c.split = 0;
        c.body = None;
        c.held.clear();
        c.held_pos = 0;
        c.held_kinds.clear();
        c.expect.clear();
        c.in_flight = 0;
        c.need_rset = false;
        c.on_conn = 0;
        c.state = State::Idle;
    }

    /// Handles readiness: finish a connect, read and act on replies, write what is pending.
    fn drive(&mut self, ci: usize) {
        let now = Instant::now();
        if self.conns[ci].state == State::Connecting {
            let c = &mut self.conns[ci];
            let Some(s) = c.sock.as_ref() else { return };
            match s.take_error() {
                Ok(Some(e)) | Err(e) => return self.fail_conn(ci, format!("connect {}: {e}", self.opts.to)),
                Ok(None) => {}
            }
            match s.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail_conn(ci, format!("connect {}: {e}", self.opts.to)),
            }
            c.state = State::Opening;
            c.last_io = now;
            c.expect.push_back(Expect::Greeting);
            c.input = self.pool.checkout();
            self.stats.connections += 1;
            if self.opts.tls == TlsMode::Implicit {
                // The client speaks first: its ClientHello goes out with the flush below.
                if let Err(e) = self.start_tls(ci, now) {
                    return self.fail_conn(ci, e);
                }
            }
        }
        // Read to WouldBlock (mio is edge-triggered), acting on each batch of replies.
        loop {
            let c = &mut self.conns[ci];
            let (Some(sock), Some(input)) = (c.sock.as_mut(), c.input.as_mut()) else { return };
            if input.room() == 0 {
                return self.fail_conn(ci, "reply longer than the input buffer".into());
            }
            let got = match c.tls.as_mut() {
                None => match read(sock, input.space()) {
                    IoResult::Done(n) => Got::Data(n),
                    IoResult::WouldBlock => Got::WouldBlock,
                    IoResult::Closed => Got::Closed,
                    IoResult::Error(e) => Got::Failed(format!("read: {e}")),
                },
                Some(tls) => {
                    let r = tls.read(sock, input.space());
                    if !tls.is_handshaking() {
                        if let Some(t0) = c.hs_start.take() {
                            report::record(&mut self.stats.handshake, t0.elapsed());
                            self.stats.tls_sessions += 1;
                        }
                    }
                    match r {
                        TlsRead::Data(n) => Got::Data(n),
                        TlsRead::WouldBlock => Got::WouldBlock,
                        TlsRead::Closed => Got::Closed,
                        TlsRead::Failed(e) => {
                            // An alert may be queued: let the server know, if the socket takes it.
                            let _ = tls.flush(sock);
                            // `hs_start` is taken when the handshake ends.
                            match (c.hs_start.is_some(), e) {
                                (true, TlsError::Truncated) => {
                                    Got::Failed("TLS handshake failed: the server closed the connection".into())
                                }
                                (true, e) => Got::Failed(format!("TLS handshake failed: {e}")),
                                // A server that closes after 221 without close_notify is common.
                                (false, TlsError::Truncated) => Got::Closed,
                                (false, e) => Got::Failed(format!("TLS: {e}")),
                            }
                        }
                    }
                }
            };
            match got {
                Got::Data(n) => {
                    input.fill(n);
                    c.last_io = now;
                    if !self.on_input(ci, now) {
                        return;
                    }
                }
                Got::WouldBlock => break,
                Got::Closed => {
                    if self.conns[ci].state == State::Quitting {
                        return self.after_quit(ci);
                    }
                    return self.fail_conn(ci, "connection closed by the server".into());
                }
                Got::Failed(why) => return self.fail_conn(ci, why),
            }
        }
        self.flush(ci);
    }

    /// Starts the client side of TLS on the connection (after STARTTLS's 220, or at connect).
    fn start_tls(&mut self, ci: usize, now: Instant) -> Result<(), String> {
        let Some(cfg) = &self.client_tls else { return Err("TLS is not configured".into()) };
        let tls = TlsSession::client(cfg, &self.server_name).map_err(|e| format!("TLS: {e}"))?;
        let c = &mut self.conns[ci];
        c.tls = Some(Box::new(tls));
        c.hs_start = Some(now);
        Ok(())
    }

    /// After a successful EHLO: STARTTLS or AUTH when still due, else the session is open.
    fn after_ehlo(&mut self, ci: usize, now: Instant) -> bool {
        let c = &mut self.conns[ci];
        if self.opts.tls == TlsMode::StartTls && c.tls.is_none() {
            if !c.offers_starttls {
                self.fail_conn(ci, "the server does not offer STARTTLS".into());
                return false;
            }
            c.out.extend_from_slice(b"STARTTLS\r\n");
            c.expect.push_back(Expect::StartTls);
            return true;
        }
        if let Some(line) = &self.opts.auth {
            c.out.extend_from_slice(line);
            c.expect.push_back(Expect::Auth);
            return true;
        }
        self.open(ci, now);
        true
    }

    /// The session is ready for mail: transactions start.
    fn open(&mut self, ci: usize, now: Instant) {
        let c = &mut self.conns[ci];
        c.state = State::Open;
        c.connect_failures = 0;
        self.next_txn(ci, now);
    }

    /// Frames replies in the input and acts on each. Returns false if the connection closed.
    fn on_input(&mut self, ci: usize, now: Instant) -> bool {
        loop {
            let c = &mut self.conns[ci];
            let Some(input) = c.input.as_mut() else { return false };
            let data = input.data();
            let Some(lf) = memchr(b'\n', data) else { return true };
            let line = &data[..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let code = match line {
                [a, b, d, ..] if a.is_ascii_digit() && b.is_ascii_digit() && d.is_ascii_digit() => {
                    u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(d - b'0')
                }
                _ => {
                    let msg = format!("malformed reply {:?}", String::from_utf8_lossy(line));
                    self.fail_conn(ci, msg);
                    return false;
                }
            };
            let more = line.get(3) == Some(&b'-');
            if c.expect.front() == Some(&Expect::Ehlo) && code == 250 && line.len() > 4 {
                // EHLO keywords are case-insensitive (RFC 5321 §4.1.1.1).
                let kw = &line[4..];
                let is = |k: &[u8]| kw.len() >= k.len() && kw[..k.len()].eq_ignore_ascii_case(k);
                if is(b"PIPELINING") {
                    c.pipelining = self.opts.pipelining;
                } else if is(b"CHUNKING") {
                    c.chunking = self.opts.bdat;
                } else if is(b"STARTTLS") {
                    c.offers_starttls = true;
                }
            }
            if !more {
                // Setup replies that end the connection are reported with their text.
                let fail = match c.expect.front() {
                    Some(Expect::Greeting) if code != 220 => Some("greeting"),
                    Some(Expect::Helo) if !(200..300).contains(&code) => Some("HELO refused"),
                    Some(Expect::StartTls) if code != 220 => Some("STARTTLS refused"),
                    Some(Expect::Auth) if code != 235 => Some("AUTH refused"),
                    _ => None,
                };
                if let Some(what) = fail {
                    let msg = format!("{what}: {}", String::from_utf8_lossy(line));
                    self.fail_conn(ci, msg);
                    return false;
                }
            }
            input.consume(lf + 1);
            if more {
                continue;
            }
            let Some(exp) = c.expect.pop_front() else {
                self.fail_conn(ci, format!("unexpected reply {code}"));
                return false;
            };
            if !self.on_reply(ci, exp, code, now) {
                return false;
            }
        }
    }

    /// Acts on one complete reply. Returns false if the connection closed.
    fn on_reply(&mut self, ci: usize, exp: Expect, code: u16, now: Instant) -> bool {
        let ok = (200..300).contains(&code);
        match exp {
            Expect::Greeting => {
                let c = &mut self.conns[ci];
                c.pipelining = false;
                c.chunking = false;
                c.offers_starttls = false;
                let _ = write!(c.out, "EHLO {}\r\n", self.opts.helo);
                c.expect.push_back(Expect::Ehlo);
            }
            Expect::Ehlo if ok => return self.after_ehlo(ci, now),
            Expect::Ehlo => {
                if self.opts.tls == TlsMode::StartTls || self.opts.auth.is_some() {
                    self.fail_conn(ci, format!("EHLO refused with {code}; STARTTLS and AUTH need it"));
                    return false;
                }
                let c = &mut self.conns[ci];
                let _ = write!(c.out, "HELO {}\r\n", self.opts.helo);
                c.expect.push_back(Expect::Helo);
            }
            Expect::Helo => self.open(ci, now),
            Expect::StartTls => {
                // Nothing may follow the 220 in plaintext: it would be read as if it came over TLS
                // (the injection of CVE-2011-0411, mirrored on the client side).
                if self.conns[ci].input.as_ref().is_some_and(|b| !b.is_empty()) {
                    self.fail_conn(ci, "the server sent data after its 220 to STARTTLS".into());
                    return false;
                }
                if let Err(e) = self.start_tls(ci, now) {
                    self.fail_conn(ci, e);
                    return false;
                }
                // The session starts over: capabilities are learnt again (RFC 3207 §4.2).
                let c = &mut self.conns[ci];
                c.out.clear();
                c.out_pos = 0;
                c.split = 0;
                c.pipelining = false;
                c.chunking = false;
                c.offers_starttls = false;
                let _ = write!(c.out, "EHLO {}\r\n", self.opts.helo);
                c.expect.push_back(Expect::Ehlo);
            }
            Expect::Auth => self.open(ci, now),
            Expect::Mail(s) => {
                if !ok {
                    let c = &mut self.conns[ci];
                    c.txns[s as usize].fail = code;
                    if !c.pipelining {
                        // Lockstep: nothing more of this transaction is sent.
                        c.held.clear();
                        c.held_pos = 0;
                        c.held_kinds.clear();
                        self.finish(ci, s, code, now, true);
                        return true;
                    }
                }
                self.release(ci);
            }
            Expect::Rcpt(s) => {
                let t = &mut self.conns[ci].txns[s as usize];
                if ok {
                    t.rcpt_ok += 1;
                } else {
                    self.stats.rcpt_refused += 1;
                    if t.fail == 0 {
                        t.fail = code;
                    }
                }
                let c = &mut self.conns[ci];
                if !c.pipelining
                    && c.held_kinds.front().is_some_and(|k| matches!(k, Expect::Data(_) | Expect::Bdat(_)))
                    && c.txns[s as usize].rcpt_ok == 0
                {
                    // Lockstep and every recipient refused: do not send DATA.
                    let fail = c.txns[s as usize].fail;
                    c.held.clear();
                    c.held_pos = 0;
                    c.held_kinds.clear();
                    self.finish(ci, s, fail, now, true);
                    return true;
                }
                self.release(ci);
            }
            Expect::Data(s) => {
                if code != 354 {
                    let fail = self.conns[ci].txns[s as usize].fail;
                    self.finish(ci, s, if fail != 0 { fail } else { code }, now, true);
                    return true;
                }
                let c = &mut self.conns[ci];
                // The DATA command was written in full before its reply could come back.
                c.out.clear();
                c.out_pos = 0;
                c.split = 0;
                c.body = Some(BodyWrite { body: c.txns[s as usize].body, off: 0, stuffed: true, slot: s });
                c.expect.push_back(Expect::EndData(s));
                // Pipelining: the next envelope rides in the same write as this body.
                if c.pipelining && !c.chunking {
                    self.next_txn(ci, now);
                }
            }
            Expect::EndData(s) | Expect::Bdat(s) => {
                let t = self.conns[ci].txns[s as usize];
                let code = if t.fail != 0 && t.rcpt_ok == 0 { t.fail } else { code };
                self.finish(ci, s, code, now, false);
            }
            Expect::Rset => self.release(ci),
            Expect::Quit => {
                self.after_quit(ci);
                return false;
            }
        }
        true
    }

    /// Records a transaction's final reply and starts the next one when the connection is free.
    fn finish(&mut self, ci: usize, s: u8, code: u16, now: Instant, before_data: bool) {
        let t = self.conns[ci].txns[s as usize];
        self.stats.final_code(code);
        report::record(&mut self.stats.txn, now.duration_since(t.start));
        report::record(&mut self.recent, now.duration_since(t.start));
        if !before_data {
            report::record(&mut self.stats.eod, now.duration_since(t.eod));
        }
        if (200..300).contains(&code) {
            self.stats.rcpts_accepted += u64::from(t.rcpt_ok);
            self.stats.bytes_accepted += self.opts.bodies[t.body].0.raw.len() as u64;
        }
        let c = &mut self.conns[ci];
        c.in_flight = c.in_flight.saturating_sub(1);
        // A transaction refused before its data leaves the server mid-transaction: reset it.
        c.need_rset |= before_data && code != 0;
        if c.in_flight == 0 && c.expect.is_empty() {
            self.next_txn(ci, now);
        }
    }

    /// Starts the next transaction on an open connection if one is due, or QUITs when the
    /// connection has done its share. Returns when to look again under `--rate`.
    fn next_txn(&mut self, ci: usize, now: Instant) -> Option<Instant> {
        let per_conn = self.opts.per_connection;
        if self.conns[ci].state != State::Open || self.conns[ci].on_conn >= per_conn {
            if self.conns[ci].in_flight == 0 && self.conns[ci].state == State::Open {
                self.quit(ci);
            }
            return None;
        }
        let start = match self.claim(now) {
            Claim::Go(t) => t,
            Claim::Wait(t) => {
                self.wake = self.wake.min(t);
                return Some(t);
            }
            Claim::Done => {
                if self.conns[ci].in_flight == 0 {
                    self.quit(ci);
                }
                return None;
            }
        };
        let body = self.draw_body();
        let opts = self.opts;
        self.counter += 1;
        let n = self.counter;
        let c = &mut self.conns[ci];
        let s = c.next_slot;
        c.next_slot ^= 1;
        c.txns[s as usize] = Txn { start, eod: start, body, fail: 0, rcpt_ok: 0 };
        c.on_conn += 1;
        c.in_flight += 1;
        if c.need_rset {
            c.need_rset = false;
            c.held.extend_from_slice(b"RSET\r\n");
            c.held_kinds.push_back(Expect::Rset);
        }
        let _ = write!(c.held, "MAIL FROM:<{}>\r\n", opts.from);
        c.held_kinds.push_back(Expect::Mail(s));
        for j in 0..opts.rcpts {
            let d = &opts.domains[(n as usize * opts.rcpts + j) % opts.domains.len()];
            let _ = write!(c.held, "RCPT TO:<{}{}@{}>\r\n", opts.rcpt_prefix, j, d);
            c.held_kinds.push_back(Expect::Rcpt(s));
        }
        if c.chunking {
            let _ = write!(c.held, "BDAT {} LAST\r\n", opts.bodies[body].0.raw.len());
            c.held_kinds.push_back(Expect::Bdat(s));
        } else {
            c.held.extend_from_slice(b"DATA\r\n");
            c.held_kinds.push_back(Expect::Data(s));
        }
        self.stats.sent += 1;
        self.release(ci);
        None
    }

    /// Moves rendered commands to the output: all of them with PIPELINING, else the next one
    /// once every earlier reply is in.
    fn release(&mut self, ci: usize) {
        let c = &mut self.conns[ci];
        while let Some(&kind) = c.held_kinds.front() {
            if !c.pipelining && !c.expect.is_empty() {
                break;
            }
            let rest = &c.held[c.held_pos..];
            let end = memchr(b'\n', rest).map_or(rest.len(), |p| p + 1);
            if c.body.is_none() {
                // Nothing is waiting in front: these octets go out as soon as possible.
                c.split = c.out.len() + end;
            }
            c.out.extend_from_slice(&rest[..end]);
            c.held_pos += end;
            c.held_kinds.pop_front();
            c.expect.push_back(kind);
            if let Expect::Bdat(s) = kind {
                // BDAT's octets follow its command line directly (RFC 3030 §2).
                c.split = c.out.len();
                c.body = Some(BodyWrite { body: c.txns[s as usize].body, off: 0, stuffed: false, slot: s });
            }
            if !c.pipelining {
                break;
            }
        }
        if c.held_kinds.is_empty() {
            c.held.clear();
            c.held_pos = 0;
        }
    }

    fn quit(&mut self, ci: usize) {
        let c = &mut self.conns[ci];
        c.out.extend_from_slice(b"QUIT\r\n");
        c.expect.push_back(Expect::Quit);
        c.state = State::Quitting;
    }

    fn after_quit(&mut self, ci: usize) {
        self.close(ci);
        self.conns[ci].retry_at = Instant::now();
    }

    fn draw_body(&mut self) -> usize {
        if self.cum.len() == 1 {
            return 0;
        }
        let total = *self.cum.last().unwrap_or(&1);
        let x = (self.rng.next_u64() % u64::from(total)) as u32;
        self.cum.iter().position(|&c| x < c).unwrap_or(0)
    }

    /// Writes pending output (commands before the body, the body, commands after it) with
    /// one vectored write per turn, until done or WouldBlock.
    fn flush(&mut self, ci: usize) {
        loop {
            let c = &mut self.conns[ci];
            let Some(sock) = c.sock.as_mut() else { return };
            if let Some(tls) = c.tls.as_mut() {
                // Ciphertext first: handshake messages, then records of what was handed over.
                match tls.flush(sock) {
                    TlsFlush::Done => {}
                    TlsFlush::WouldBlock => return,
                    TlsFlush::Failed(e) => return self.fail_conn(ci, format!("write: {e}")),
                }
            }
            let body_bytes: &[u8] = match c.body {
                Some(b) => {
                    let body = &self.opts.bodies[b.body].0;
                    if b.stuffed {
                        &body.stuffed[b.off..]
                    } else {
                        &body.raw[b.off..]
                    }
                }
                None => &[],
            };
            let split = if c.body.is_some() { c.split } else { c.out.len() };
            let pre = &c.out[c.out_pos.min(split)..split];
            let post = if c.body.is_some() { &c.out[split.max(c.out_pos)..] } else { &[][..] };
            if pre.is_empty() && body_bytes.is_empty() && post.is_empty() {
                c.out.clear();
                c.out_pos = 0;
                c.split = 0;
                c.body = None;
                return;
            }
            let n = match c.tls.as_mut() {
                None => {
                    let slices = [IoSlice::new(pre), IoSlice::new(body_bytes), IoSlice::new(post)];
                    match sock.write_vectored(&slices) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return self.fail_conn(ci, format!("write: {e}")),
                    }
                }
                Some(tls) => {
                    // The session encrypts what it takes, up to its buffer limit; the loop's
                    // next turn writes the records out.
                    let mut n = 0;
                    for part in [pre, body_bytes, post] {
                        let took = tls.write(part);
                        n += took;
                        if took < part.len() {
                            break;
                        }
                    }
                    if n == 0 {
                        // Buffer full before the handshake ended: reading moves it on.
                        return;
                    }
                    n
                }
            };
            let (pre_len, body_len) = (pre.len(), body_bytes.len());
            let mut left = n;
            let take = left.min(pre_len);
            c.out_pos += take;
            left -= take;
            if let Some(b) = c.body.as_mut() {
                let take = left.min(body_len);
                b.off += take;
                left -= take;
                if take == body_len {
                    let slot = b.slot as usize;
                    c.body = None;
                    c.txns[slot].eod = Instant::now();
                    // The rest of `out` is now simply "after": keep writing from `split`.
                    c.out_pos = split;
                }
            }
            c.out_pos += left;
            if c.out_pos >= c.out.len() && c.body.is_none() {
                c.out.clear();
                c.out_pos = 0;
                c.split = 0;
                if c.tls.is_none() {
                    return;
                }
                // Handed to TLS, not yet written: the next turn flushes the records.
            }
        }
    }

    /// Adds what happened since the last call to the shared progress counters.
    fn publish(&mut self) {
        let p = self.progress;
        p.sent.fetch_add(self.stats.sent - self.published.sent, Ordering::Relaxed);
        p.accepted.fetch_add(self.stats.accepted - self.published.accepted, Ordering::Relaxed);
        let refused = self.stats.tempfailed + self.stats.rejected;
        p.refused.fetch_add(refused - self.published.tempfailed - self.published.rejected, Ordering::Relaxed);
        self.published.sent = self.stats.sent;
        self.published.accepted = self.stats.accepted;
        self.published.tempfailed = self.stats.tempfailed;
        self.published.rejected = self.stats.rejected;
        if !self.recent.is_empty() {
            if let Ok(mut h) = p.txn.lock() {
                let _ = h.add(&self.recent);
            }
            self.recent.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffing() {
        let b = Body::from_bytes(b".a\r\nb\r\n.\r\n..c\r\n".to_vec());
        assert_eq!(b.stuffed, b"..a\r\nb\r\n..\r\n...c\r\n.\r\n");
        let b = Body::from_bytes(b"x".to_vec());
        assert_eq!(b.raw, b"x\r\n");
    }

    #[test]
    fn synthetic_exact_size() {
        for size in [2, 3, 10, 100, 1024, 10_000] {
            let b = Body::synthetic(size, "a@b");
            assert_eq!(b.raw.len(), size);
            assert!(b.raw.ends_with(b"\r\n"));
            // Unstuffing the stuffed form gives the raw bytes back.
            let mut scanner = sluice::smtp::data::DataScanner::new(u64::MAX);
            let mut out = Vec::new();
            let r = scanner.scan(&b.stuffed, &mut out);
            assert!(r.done && r.consumed == b.stuffed.len());
            assert_eq!(out, b.raw);
            assert!(scanner.taint().is_none(), "size {size}");
        }
    }
}
