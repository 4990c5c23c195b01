//! Fuzz target: the inbound SMTP session (`smtp::server::ServerSession`).
//!
//! Two modes, picked by the first input byte:
//! - raw (even): the rest is a byte stream from the client. It is fed once whole and once cut
//!   into reads at fuzzer-chosen places; both runs must give the same replies and the same
//!   stored messages (as the `split_invariance` proptest, but over any bytes).
//! - structured (odd): an `Arbitrary` script of commands drawn from a small alphabet (verbs,
//!   addresses, parameters, DATA lines with dots and bare CR/LF, BDAT chunks, AUTH), with raw
//!   bytes, timeouts, shutdowns, spool failures and AUTH verdicts between them, so that deep
//!   states (inside DATA, BDAT, an AUTH exchange, a pending spool write) are reached quickly.
//!
//! Either way: no panic, `consumed <= input.len()`, and the output is whole replies: lines of
//! a 3-digit code, then SP or `-`, text without CR or LF, ended by CRLF, a multi-line reply
//! keeping one code, nothing after the session closed.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sluice::buf::{Buf, BufPool, VecPool};
use sluice::message::IdGen;
use sluice::smtp::server::{AuthOutcome, Ctx, Event, ServerSession, SessionConfig};

/// The reactor's buffer size (`reactor::CHUNK`).
const CHUNK: usize = 16 * 1024;
/// Wall clock handed to the session (fixed: the session must not care).
const NOW_US: u64 = 1_700_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        raw(mode, rest);
    } else {
        let mut u = Unstructured::new(rest);
        if let Ok(script) = Script::arbitrary(&mut u) {
            structured(&script);
        }
    }
});

/// Everything a session needs around it.
struct World {
    cfg: SessionConfig,
    bodies: VecPool,
    ids: IdGen,
    out: Buf,
    s: ServerSession,
    /// Every reply written, in order.
    replies: Vec<u8>,
    /// Every message handed to the spool.
    stored: Vec<Vec<u8>>,
    closed: bool,
    /// STARTTLS was answered: what follows would be TLS records, so the stream ends here.
    tls_switch: bool,
    /// On STARTTLS, go on as if the handshake succeeded instead of ending the stream.
    handshake: bool,
}

impl World {
    fn new(cfg: SessionConfig, relay: bool, implicit_tls: bool) -> World {
        let mut s = ServerSession::new("192.0.2.1".parse().unwrap(), relay);
        if implicit_tls {
            s.tls_started();
        }
        let mut out = BufPool::new(CHUNK, 1).checkout().unwrap();
        s.greeting(&cfg, &mut out);
        let mut w = World {
            cfg,
            bodies: VecPool::new(1 << 20),
            ids: IdGen::default(),
            out,
            s,
            replies: Vec::new(),
            stored: Vec::new(),
            closed: false,
            tls_switch: false,
            handshake: false,
        };
        w.collect();
        w
    }

    /// Moves what the session wrote into `replies`, as the driver flushes it to the socket.
    fn collect(&mut self) {
        let n = self.out.data().len();
        assert!(!self.closed || n == 0, "output after close: {:?}", String::from_utf8_lossy(self.out.data()));
        self.replies.extend_from_slice(self.out.data());
        self.out.consume(n);
    }

    /// Feeds `pending` the way `net/inbound.rs` does, storing each message at once when
    /// `spool_ok`, else answering it with a spool failure; returns the bytes consumed.
    fn feed(&mut self, pending: &[u8], spool_ok: bool, auth: AuthOutcome) -> usize {
        let mut used = 0;
        // Every round consumes input or ends on an event the driver answers; a session that
        // loops without doing either would spin the reactor.
        for _ in 0..=pending.len() + 8 {
            if self.closed || self.tls_switch {
                return pending.len();
            }
            let input = &pending[used..];
            let mut ctx = Ctx { cfg: &self.cfg, bodies: &mut self.bodies, ids: &mut self.ids, now_unix_us: NOW_US, accepting: true };
            let p = self.s.handle_input(&mut ctx, input, &mut self.out);
            assert!(p.consumed <= input.len(), "consumed {} of {}", p.consumed, input.len());
            used += p.consumed;
            match p.event {
                None => {
                    self.collect();
                    return used;
                }
                Some(Event::Message) => {
                    let (_, env, body) = self.s.message();
                    assert!(env.rcpt_count() > 0, "a message without recipients");
                    assert!(body.starts_with(b"Received: "), "no Received header");
                    self.stored.push(body.to_vec());
                    self.s.release_body(&mut self.bodies);
                    let mut ctx =
                        Ctx { cfg: &self.cfg, bodies: &mut self.bodies, ids: &mut self.ids, now_unix_us: NOW_US, accepting: true };
                    let result = if spool_ok { Ok(()) } else { Err(sluice::smtp::reply::SPOOL_FAILED) };
                    self.s.message_result(&mut ctx, result, &mut self.out);
                }
                Some(Event::Close) => {
                    assert!(self.s.is_closed(), "Close from an open session");
                    self.collect();
                    self.closed = true;
                }
                Some(Event::StartTls) => {
                    // The rest of the read was discarded with the event (RFC 3207 §4.2).
                    assert_eq!(used, pending.len(), "bytes kept behind STARTTLS");
                    self.collect();
                    if self.handshake {
                        self.s.tls_started();
                        self.s.set_tls_info("TLSv1.3", "TLS13_AES_128_GCM_SHA256");
                    } else {
                        self.tls_switch = true;
                    }
                    return used;
                }
                Some(Event::Auth) => {
                    let creds = self.s.take_credentials();
                    let closed = self.s.auth_result(auth, creds, &mut self.out);
                    assert_eq!(closed, auth == AuthOutcome::Blocked);
                }
            }
            self.collect();
        }
        panic!("handle_input made no progress");
    }

    fn timeout(&mut self) {
        if self.closed || self.tls_switch {
            return;
        }
        let mut ctx = Ctx { cfg: &self.cfg, bodies: &mut self.bodies, ids: &mut self.ids, now_unix_us: NOW_US, accepting: true };
        self.s.handle_timeout(&mut ctx, &mut self.out);
        assert!(self.s.is_closed());
        self.collect();
        self.closed = true;
    }

    fn shutdown(&mut self, force: bool) {
        if self.closed || self.tls_switch {
            return;
        }
        let mut ctx = Ctx { cfg: &self.cfg, bodies: &mut self.bodies, ids: &mut self.ids, now_unix_us: NOW_US, accepting: true };
        let closed = self.s.handle_shutdown(&mut ctx, force, &mut self.out);
        assert_eq!(closed, self.s.is_closed());
        self.collect();
        self.closed = closed;
    }
}

/// Checks that `out` is a sequence of whole, well-formed replies (RFC 5321 §4.2).
fn check_replies(out: &[u8]) {
    let show = || String::from_utf8_lossy(out).into_owned();
    assert!(out.is_empty() || out.ends_with(b"\r\n"), "output not CRLF-terminated: {:?}", show());
    let mut open: Option<&[u8]> = None;
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_suffix(b"\r").unwrap_or_else(|| panic!("bare LF in {:?}", show()));
        assert!(!line.contains(&b'\r'), "bare CR in {:?}", show());
        assert!(line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit), "no code: {:?}", show());
        assert!(matches!(line[0], b'2'..=b'5'), "bad code: {:?}", show());
        if let Some(code) = open {
            assert_eq!(code, &line[..3], "code changed inside a reply: {:?}", show());
        }
        open = match line.get(3) {
            None | Some(b' ') => None,
            Some(b'-') => Some(&line[..3]),
            Some(_) => panic!("no SP or - after the code: {:?}", show()),
        };
    }
    assert!(open.is_none(), "output ends inside a multi-line reply: {:?}", show());
}

fn config(max_size: u64, max_rcpts: usize, starttls: bool, auth: bool) -> SessionConfig {
    SessionConfig::new("mx.fuzz.test", max_size, max_rcpts).with_features(starttls, auth)
}

/// Raw mode: the whole stream at once, then in reads cut where `cuts` says.
fn raw(mode: u8, data: &[u8]) {
    // The low bits of the mode byte pick the features; the next 8 bytes pick the cut points.
    let (starttls, auth, relay) = (mode & 2 != 0, mode & 4 != 0, mode & 8 != 0);
    let (seeds, stream) = data.split_at(data.len().min(8));
    let run = |cuts: &[usize]| {
        let mut w = World::new(config(4096, 8, starttls, auth), relay, auth);
        let mut pending = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            pending.extend_from_slice(&stream[at..cut]);
            at = cut;
            let n = w.feed(&pending, true, AuthOutcome::Accepted);
            pending.drain(..n);
            if w.closed || w.tls_switch {
                break;
            }
        }
        check_replies(&w.replies);
        (w.replies, w.stored, w.closed)
    };
    let whole = run(&[]);
    let mut cuts: Vec<usize> = seeds.iter().map(|&b| usize::from(b) * stream.len() / 256).collect();
    cuts.sort_unstable();
    let split = run(&cuts);
    assert!(
        whole == split,
        "replies differ between one read and reads cut at {cuts:?}:\n{:?}\n{:?}",
        String::from_utf8_lossy(&whole.0),
        String::from_utf8_lossy(&split.0)
    );
}

/// A structured session: settings, then steps.
#[derive(Arbitrary, Debug)]
struct Script {
    relay: bool,
    implicit_tls: bool,
    starttls: bool,
    auth: bool,
    max_size: u16,
    max_rcpts: u8,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Commands rendered to bytes and sent in reads of `split` bytes (0: one read).
    Send { cmds: Vec<Cmd>, split: u8 },
    /// Bytes as they are.
    Raw(Vec<u8>),
    /// The command or data timeout fires.
    Timeout,
    /// SIGTERM (force: the grace period ended).
    Shutdown(bool),
    /// The next messages fail to be stored.
    SpoolFails(bool),
    /// The verdict on the next AUTH.
    AuthVerdict(Verdict),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Verdict {
    Accepted,
    Rejected,
    Blocked,
}

#[derive(Arbitrary, Debug)]
enum Cmd {
    Ehlo(Word),
    Helo(Word),
    Mail(Addr, Vec<MailParam>),
    Rcpt(Addr, Vec<RcptParam>),
    Data(Vec<Piece>),
    Bdat {
        size: u16,
        last: bool,
        pieces: Vec<Piece>,
    },
    BdatBad(Word),
    Rset,
    Noop,
    Quit,
    Vrfy(Word),
    Expn,
    Help,
    StartTls,
    AuthPlain(Option<Vec<u8>>),
    AuthLogin(Option<Word>),
    /// A line of base64 (or not) for an AUTH exchange.
    AuthResponse(Vec<u8>),
    /// Lower-case verb, extra spaces.
    Sloppy(Box<Cmd>),
    /// A line longer than 512 octets.
    Long(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Word {
    Host,
    Empty,
    Literal,
    Utf8,
    Junk,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Plain,
    Null,
    Postmaster,
    NoBrackets,
    Utf8,
    Quoted,
    SourceRoute,
    Literal,
    Long,
    Broken,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum MailParam {
    Size(u32),
    Body7,
    Body8,
    Binary,
    SmtpUtf8,
    RetFull,
    RetHdrs,
    EnvId,
    Auth,
    Unknown,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum RcptParam {
    NotifyNever,
    NotifySuccessFailure,
    NotifyBad,
    Orcpt,
    OrcptBad,
    Unknown,
}

/// A piece of message content: line ends, dots and bare CR/LF are what the scanner cares about.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Piece {
    Text,
    Crlf,
    Dot,
    DotDot,
    BareCr,
    BareLf,
    EndOfData,
    Header,
    Long(u16),
    Nul,
}

fn word(w: Word) -> &'static [u8] {
    match w {
        Word::Host => b"client.example",
        Word::Empty => b"",
        Word::Literal => b"[192.0.2.9]",
        Word::Utf8 => "ünï.example".as_bytes(),
        Word::Junk => b"a b\x00\xff",
    }
}

fn addr(a: Addr, out: &mut Vec<u8>) {
    let s: &[u8] = match a {
        Addr::Plain => b"<user@example.com>",
        Addr::Null => b"<>",
        Addr::Postmaster => b"<Postmaster>",
        Addr::NoBrackets => b"user@example.com",
        Addr::Utf8 => "<ü@exämple.com>".as_bytes(),
        Addr::Quoted => b"<\"a b\\\"c\"@example.com>",
        Addr::SourceRoute => b"<@relay.example:user@example.com>",
        Addr::Literal => b"<user@[IPv6:2001:db8::1]>",
        Addr::Long => {
            out.push(b'<');
            out.extend(std::iter::repeat_n(b'a', 300));
            out.extend_from_slice(b"@example.com>");
            return;
        }
        Addr::Broken => b"<user@@example..com",
    };
    out.extend_from_slice(s);
}

fn render(cmd: &Cmd, out: &mut Vec<u8>) {
    match cmd {
        Cmd::Ehlo(w) => line(out, &[b"EHLO ", word(*w)]),
        Cmd::Helo(w) => line(out, &[b"HELO ", word(*w)]),
        Cmd::Mail(a, params) => {
            out.extend_from_slice(b"MAIL FROM:");
            addr(*a, out);
            for p in params.iter().take(8) {
                let s = match p {
                    MailParam::Size(n) => {
                        out.extend_from_slice(format!(" SIZE={n}").as_bytes());
                        continue;
                    }
                    MailParam::Body7 => " BODY=7BIT",
                    MailParam::Body8 => " BODY=8BITMIME",
                    MailParam::Binary => " BODY=BINARYMIME",
                    MailParam::SmtpUtf8 => " SMTPUTF8",
                    MailParam::RetFull => " RET=FULL",
                    MailParam::RetHdrs => " RET=HDRS",
                    MailParam::EnvId => " ENVID=abc+2Bdef",
                    MailParam::Auth => " AUTH=<>",
                    MailParam::Unknown => " FOO=bar",
                };
                out.extend_from_slice(s.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        Cmd::Rcpt(a, params) => {
            out.extend_from_slice(b"RCPT TO:");
            addr(*a, out);
            for p in params.iter().take(8) {
                out.extend_from_slice(match p {
                    RcptParam::NotifyNever => b" NOTIFY=NEVER".as_slice(),
                    RcptParam::NotifySuccessFailure => b" NOTIFY=SUCCESS,FAILURE",
                    RcptParam::NotifyBad => b" NOTIFY=NEVER,DELAY",
                    RcptParam::Orcpt => b" ORCPT=rfc822;user+40example.com",
                    RcptParam::OrcptBad => b" ORCPT=rfc822;bad+zz",
                    RcptParam::Unknown => b" XYZ",
                });
            }
            out.extend_from_slice(b"\r\n");
        }
        Cmd::Data(pieces) => {
            out.extend_from_slice(b"DATA\r\n");
            content(pieces, out);
        }
        Cmd::Bdat { size, last, pieces } => {
            let mut chunk = Vec::new();
            content(pieces, &mut chunk);
            // Mostly the true size, sometimes a lie (the fuzzer picks `size`).
            let n = if size % 4 == 0 { usize::from(*size) } else { chunk.len() };
            out.extend_from_slice(format!("BDAT {n}{}\r\n", if *last { " LAST" } else { "" }).as_bytes());
            out.extend_from_slice(&chunk);
        }
        Cmd::BdatBad(w) => line(out, &[b"BDAT ", word(*w)]),
        Cmd::Rset => line(out, &[b"RSET"]),
        Cmd::Noop => line(out, &[b"NOOP"]),
        Cmd::Quit => line(out, &[b"QUIT"]),
        Cmd::Vrfy(w) => line(out, &[b"VRFY ", word(*w)]),
        Cmd::Expn => line(out, &[b"EXPN list"]),
        Cmd::Help => line(out, &[b"HELP"]),
        Cmd::StartTls => line(out, &[b"STARTTLS"]),
        Cmd::AuthPlain(None) => line(out, &[b"AUTH PLAIN"]),
        Cmd::AuthPlain(Some(creds)) => line(out, &[b"AUTH PLAIN ", &b64(creds)]),
        Cmd::AuthLogin(None) => line(out, &[b"AUTH LOGIN"]),
        Cmd::AuthLogin(Some(w)) => line(out, &[b"AUTH LOGIN ", &b64(word(*w))]),
        Cmd::AuthResponse(bytes) => {
            let enc = if bytes.first().is_some_and(|b| b & 1 == 0) { b64(bytes) } else { bytes.clone() };
            line(out, &[&enc]);
        }
        Cmd::Sloppy(inner) => {
            let mut v = Vec::new();
            render(inner, &mut v);
            let verb = v.iter().position(|&b| b == b' ' || b == b'\r').unwrap_or(v.len());
            v[..verb].make_ascii_lowercase();
            v.splice(verb..verb, *b"  ");
            out.extend_from_slice(&v);
        }
        Cmd::Long(n) => {
            out.extend_from_slice(b"NOOP ");
            out.extend(std::iter::repeat_n(b'x', 500 + usize::from(*n % 13_000)));
            out.extend_from_slice(b"\r\n");
        }
    }
}

fn line(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\n");
}

fn content(pieces: &[Piece], out: &mut Vec<u8>) {
    for p in pieces {
        match p {
            Piece::Text => out.extend_from_slice(b"text"),
            Piece::Crlf => out.extend_from_slice(b"\r\n"),
            Piece::Dot => out.push(b'.'),
            Piece::DotDot => out.extend_from_slice(b"\r\n.."),
            Piece::BareCr => out.push(b'\r'),
            Piece::BareLf => out.push(b'\n'),
            Piece::EndOfData => out.extend_from_slice(b"\r\n.\r\n"),
            Piece::Header => out.extend_from_slice(b"Subject: hi\r\n"),
            Piece::Long(n) => out.extend(std::iter::repeat_n(b'y', usize::from(*n % 5000))),
            Piece::Nul => out.push(0),
        }
    }
}

fn b64(bytes: &[u8]) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize]);
        }
        out.extend(std::iter::repeat_n(b'=', 3 - c.len()));
    }
    out
}

fn structured(script: &Script) {
    let max_size = u64::from(script.max_size) * 4;
    let cfg = config(max_size, usize::from(script.max_rcpts), script.starttls, script.auth);
    let mut w = World::new(cfg, script.relay, script.implicit_tls);
    w.handshake = true;
    let (mut spool_ok, mut verdict) = (true, AuthOutcome::Accepted);
    let mut pending = Vec::new();
    for step in script.steps.iter().take(64) {
        match step {
            Step::Send { cmds, split } => {
                let mut bytes = Vec::new();
                for c in cmds.iter().take(64) {
                    render(c, &mut bytes);
                }
                let step = if *split == 0 { bytes.len().max(1) } else { usize::from(*split) };
                for part in bytes.chunks(step) {
                    pending.extend_from_slice(part);
                    let n = w.feed(&pending, spool_ok, verdict);
                    pending.drain(..n);
                }
            }
            Step::Raw(bytes) => {
                pending.extend_from_slice(bytes);
                let n = w.feed(&pending, spool_ok, verdict);
                pending.drain(..n);
            }
            Step::Timeout => w.timeout(),
            Step::Shutdown(force) => w.shutdown(*force),
            Step::SpoolFails(fails) => spool_ok = !fails,
            Step::AuthVerdict(v) => {
                verdict = match v {
                    Verdict::Accepted => AuthOutcome::Accepted,
                    Verdict::Rejected => AuthOutcome::Rejected,
                    Verdict::Blocked => AuthOutcome::Blocked,
                }
            }
        }
        if w.closed || w.tls_switch {
            break;
        }
    }
    check_replies(&w.replies);
}
