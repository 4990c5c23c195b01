//! Fuzz target: what a destination server says to the outbound side.
//!
//! - even first byte: the rest is parsed with `smtp::reply::parse_reply` reply after reply,
//!   as `ClientSession::handle_input` does, and every complete reply goes through
//!   `Capabilities::from_ehlo` and `Display`. Checks: every step makes progress within the
//!   input, a complete reply re-parses alone to itself, and without its last octet it is never
//!   complete.
//! - odd first byte: an `Arbitrary` script drives `smtp::client::ClientSession` the way
//!   `net/outbound.rs` does (transactions only after `Ready`, `queue_next` only when
//!   `can_queue_next`), with replies drawn from a small alphabet (codes, EHLO keywords,
//!   continuation lines) or raw bytes, fed in any split, plus timeouts, closes and TLS
//!   outcomes. Checks: no panic, `handle_input` consumes at most its input, every transaction
//!   ends with one reply per recipient, and a driver that follows the contract never gets the
//!   "Internal error" refusals meant for driver bugs.
#![no_main]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sluice::buf::BufPool;
use sluice::message::{notify, BodyType, Ret};
use sluice::smtp::client::{ClientConfig, ClientEvent, ClientSession, ClientTimeouts, TlsPolicy, TxRcpt, TxSpec};
use sluice::smtp::client_auth::RelayCredentials;
use sluice::smtp::reply::{parse_reply, Capabilities, ReplyParse};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        replies(rest);
    } else if let Ok(script) = Script::arbitrary(&mut Unstructured::new(rest)) {
        session(&script);
    }
});

fn replies(mut input: &[u8]) {
    while !input.is_empty() {
        match parse_reply(input) {
            ReplyParse::Partial => return,
            ReplyParse::Malformed { consumed } => {
                assert!(consumed > 0 && consumed <= input.len(), "malformed consumed {consumed} of {}", input.len());
                input = &input[consumed..];
            }
            ReplyParse::Complete { reply, consumed } => {
                assert!(consumed > 0 && consumed <= input.len(), "complete consumed {consumed} of {}", input.len());
                assert!((200..600).contains(&reply.code), "code {}", reply.code);
                if let Some((class, _, _)) = reply.enhanced {
                    assert_eq!(u16::from(class), reply.code / 100, "enhanced class differs from the code");
                }
                let _ = Capabilities::from_ehlo(&reply);
                // Lines are joined by a space; a stray CR inside a line stays (log and DSN
                // writers escape or replace control characters themselves).
                let shown = reply.to_string();
                assert!(!shown.contains('\n'), "Display spans lines: {shown:?}");
                let alone = parse_reply(&input[..consumed]);
                assert_eq!(alone, ReplyParse::Complete { reply, consumed }, "re-parse differs");
                assert!(
                    !matches!(parse_reply(&input[..consumed - 1]), ReplyParse::Complete { .. }),
                    "complete without its last octet"
                );
                input = &input[consumed..];
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Script {
    tls: Tls,
    /// Credentials for AUTH (`--relay-auth-file`): never sent outside TLS.
    auth: bool,
    out_cap: OutCap,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Tls {
    Off,
    Opportunistic,
    Required,
    Implicit,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum OutCap {
    Tiny,
    Small,
    Chunk,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Replies from the alphabet, sent in reads of `split` bytes (0: one read).
    Replies {
        replies: Vec<R>,
        split: u8,
    },
    /// Bytes as they are.
    Raw(Vec<u8>),
    /// The driver writes what the session has (as much as `out` takes).
    Transmit,
    /// After `Ready`: a transaction (else ignored, as a driver would).
    Start(Tx),
    /// When `can_queue_next`: a transaction behind the current one.
    Queue(Tx),
    Quit,
    /// Time passes; the timer fires when a deadline is reached.
    Wait(u16),
    Closed,
    TlsDone(bool),
}

/// One reply from the server.
#[derive(Arbitrary, Debug)]
enum R {
    Simple(Code, Text),
    /// A multi-line reply (EHLO style) with these keyword lines.
    Ehlo(Code, Vec<Kw>),
    /// Continuation lines with a different code (malformed).
    Mixed(Code, Code),
    /// A bare-LF line end.
    BareLf(Code),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Code {
    Ok220,
    Ok221,
    Ok250,
    Ok251,
    Ok235,
    Go334,
    Go354,
    Temp421,
    Temp450,
    Temp451,
    Temp452,
    Perm500,
    Perm501,
    Perm502,
    Perm503,
    Perm550,
    Perm552,
    Perm554,
    Odd199,
    Odd600,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Text {
    Empty,
    Enhanced,
    WrongClass,
    Plain,
    Long,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kw {
    Pipelining,
    Size(u32),
    SizeBare,
    EightBit,
    SmtpUtf8,
    Chunking,
    BinaryMime,
    Dsn,
    StartTls,
    Enhanced,
    Auth,
    Junk,
}

#[derive(Arbitrary, Debug, Clone)]
struct Tx {
    null_sender: bool,
    rcpts: u8,
    body: Vec<BodyPiece>,
    body_type: u8,
    smtputf8: bool,
    ret: u8,
    dsn: bool,
    /// Claim a `body_len` other than the real one (SIZE only; must not matter).
    size_lie: Option<u16>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum BodyPiece {
    Line,
    Crlf,
    Dot,
    LfDot,
    Bin,
    Big(u16),
}

fn code(c: Code) -> u16 {
    match c {
        Code::Ok220 => 220,
        Code::Ok221 => 221,
        Code::Ok250 => 250,
        Code::Ok251 => 251,
        Code::Ok235 => 235,
        Code::Go334 => 334,
        Code::Go354 => 354,
        Code::Temp421 => 421,
        Code::Temp450 => 450,
        Code::Temp451 => 451,
        Code::Temp452 => 452,
        Code::Perm500 => 500,
        Code::Perm501 => 501,
        Code::Perm502 => 502,
        Code::Perm503 => 503,
        Code::Perm550 => 550,
        Code::Perm552 => 552,
        Code::Perm554 => 554,
        Code::Odd199 => 199,
        Code::Odd600 => 600,
    }
}

fn render(r: &R, out: &mut Vec<u8>) {
    match r {
        R::Simple(c, t) => {
            let c = code(*c);
            let text = match t {
                Text::Empty => String::new(),
                Text::Enhanced => format!(" {}.1.0 fine", c / 100),
                Text::WrongClass => " 2.0.0 what".to_owned(),
                Text::Plain => " mx.test says hi".to_owned(),
                Text::Long => format!(" {}", "z".repeat(3000)),
            };
            out.extend_from_slice(format!("{c}{text}\r\n").as_bytes());
        }
        R::Ehlo(c, kws) => {
            let c = code(*c);
            out.extend_from_slice(format!("{c}-mx.test\r\n").as_bytes());
            for k in kws.iter().take(16) {
                let kw = match k {
                    Kw::Pipelining => "PIPELINING".to_owned(),
                    Kw::Size(n) => format!("SIZE {n}"),
                    Kw::SizeBare => "SIZE".to_owned(),
                    Kw::EightBit => "8BITMIME".to_owned(),
                    Kw::SmtpUtf8 => "SMTPUTF8".to_owned(),
                    Kw::Chunking => "CHUNKING".to_owned(),
                    Kw::BinaryMime => "BINARYMIME".to_owned(),
                    Kw::Dsn => "DSN".to_owned(),
                    Kw::StartTls => "STARTTLS".to_owned(),
                    Kw::Enhanced => "ENHANCEDSTATUSCODES".to_owned(),
                    Kw::Auth => "AUTH=PLAIN LOGIN".to_owned(),
                    Kw::Junk => "X-\u{fc}NKNOWN  ".to_owned(),
                };
                out.extend_from_slice(format!("{c}-{kw}\r\n").as_bytes());
            }
            out.extend_from_slice(format!("{c} HELP\r\n").as_bytes());
        }
        R::Mixed(a, b) => out.extend_from_slice(format!("{}-one\r\n{} two\r\n", code(*a), code(*b)).as_bytes()),
        R::BareLf(c) => out.extend_from_slice(format!("{} ok\n", code(*c)).as_bytes()),
    }
}

fn body(pieces: &[BodyPiece]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in pieces.iter().take(64) {
        match p {
            BodyPiece::Line => b.extend_from_slice(b"Subject: x"),
            BodyPiece::Crlf => b.extend_from_slice(b"\r\n"),
            BodyPiece::Dot => b.push(b'.'),
            BodyPiece::LfDot => b.extend_from_slice(b"\n."),
            BodyPiece::Bin => b.extend_from_slice(&[0, 0xff, b'\r']),
            BodyPiece::Big(n) => b.resize(b.len() + usize::from(*n) * 4, b'q'),
        }
    }
    b
}

/// The addresses a transaction's recipients use (borrowed by `TxSpec`).
const RCPTS: [&[u8]; 4] = [b"a@y.test", b"b@y.test", "\u{fc}@y.test".as_bytes(), b"c@y.test"];

fn spec<'a>(tx: &Tx, body: &[u8]) -> TxSpec<'a> {
    let n = usize::from(tx.rcpts % 6);
    let rcpts = (0..n)
        .map(|i| TxRcpt {
            addr: RCPTS[i % RCPTS.len()],
            notify: if tx.dsn { notify::SUCCESS | notify::FAILURE } else { 0 },
            orcpt: if tx.dsn { b"rfc822;a+40y.test" } else { b"" },
        })
        .collect();
    TxSpec {
        sender: if tx.null_sender { b"" } else { b"s@x.test" },
        rcpts,
        body_len: tx.size_lie.map_or(body.len() as u64, u64::from),
        body_type: BodyType::from_u8(tx.body_type % 4),
        smtputf8: tx.smtputf8,
        ret: Ret::from_u8(tx.ret % 3),
        envid: if tx.dsn { b"id+2B1" } else { b"" },
    }
}

/// What a driver knows: may a transaction start; recipient counts and bodies of the
/// transactions in flight (current first, then the queued one); the session is over.
struct Driver {
    ready: bool,
    flight: VecDeque<(usize, Vec<u8>)>,
    dead: bool,
}

impl Driver {
    fn drain(&mut self, s: &mut ClientSession) {
        while let Some(ev) = s.poll_event() {
            assert!(!self.dead, "event after the end: {ev:?}");
            match ev {
                ClientEvent::Ready => self.ready = true,
                ClientEvent::TransactionDone(r) => {
                    let (n, _) = self.flight.pop_front().expect("TransactionDone without a transaction");
                    assert_eq!(r.rcpt_replies.len(), n, "one reply per recipient");
                    for reply in r.rcpt_replies.iter().chain([&r.mail_reply]).chain(r.data_reply.as_ref()) {
                        assert!(!reply.text.starts_with("Internal error"), "driver-bug refusal: {reply:?}");
                    }
                    for i in 0..n {
                        let _ = r.outcome(i);
                    }
                }
                ClientEvent::StartTls => assert!(s.awaiting_tls()),
                ClientEvent::Failed(f) => {
                    let _ = (f.to_string(), f.is_permanent(), f.tls_status());
                    self.dead = true;
                }
                ClientEvent::Closed => self.dead = true,
            }
        }
    }
}

fn session(script: &Script) {
    let tls = match script.tls {
        Tls::Off => TlsPolicy::Off,
        Tls::Opportunistic => TlsPolicy::Opportunistic,
        Tls::Required => TlsPolicy::Required,
        Tls::Implicit => TlsPolicy::Implicit,
    };
    let creds = RelayCredentials::new("fuzz-user", "fuzz-password");
    let secrets = [creds.plain_response().to_owned(), creds.login_user().to_owned(), creds.login_password().to_owned()];
    let auth = script.auth.then(|| Arc::new(creds));
    let timeouts = ClientTimeouts {
        greeting: Duration::from_secs(10),
        command: Duration::from_secs(20),
        data_init: Duration::from_secs(30),
        data_block: Duration::from_secs(40),
        data_end: Duration::from_secs(50),
        tls_handshake: Duration::from_secs(5),
    };
    let cap = match script.out_cap {
        OutCap::Tiny => 64,
        OutCap::Small => 300,
        OutCap::Chunk => 16 * 1024,
    };
    let mut now = Instant::now();
    let cfg = ClientConfig { helo_name: "relay.test".into(), timeouts, tls, auth };
    let mut s = ClientSession::new(cfg, now);
    let mut out = BufPool::new(cap, 1).checkout().unwrap();
    let mut pending: Vec<u8> = Vec::new();
    let mut d = Driver { ready: false, flight: VecDeque::new(), dead: false };
    for step in script.steps.iter().take(128) {
        match step {
            Step::Replies { replies, split } => {
                let mut bytes = Vec::new();
                for r in replies.iter().take(32) {
                    render(r, &mut bytes);
                }
                let step = if *split == 0 { bytes.len().max(1) } else { usize::from(*split) };
                for part in bytes.chunks(step) {
                    pending.extend_from_slice(part);
                    now += Duration::from_millis(1);
                    let n = s.handle_input(&pending, now);
                    assert!(n <= pending.len(), "consumed {n} of {}", pending.len());
                    pending.drain(..n);
                    d.drain(&mut s);
                }
            }
            Step::Raw(bytes) => {
                pending.extend_from_slice(bytes);
                let n = s.handle_input(&pending, now);
                assert!(n <= pending.len(), "consumed {n} of {}", pending.len());
                pending.drain(..n);
                d.drain(&mut s);
            }
            Step::Transmit => {
                let body = d.flight.front().map_or(&[][..], |(_, b)| b.as_slice());
                s.poll_transmit(body, &mut out);
                if !s.is_tls() {
                    // RFC 4954 over TLS only: no AUTH line, no response in the clear.
                    let clear = String::from_utf8_lossy(out.data());
                    assert!(!clear.contains("AUTH ") && secrets.iter().all(|x| !clear.contains(x.as_str())), "{clear}");
                }
                let n = out.data().len();
                out.consume(n);
                d.drain(&mut s);
            }
            Step::Start(tx) => {
                if d.ready && !d.dead {
                    d.ready = false;
                    let b = body(&tx.body);
                    let sp = spec(tx, &b);
                    d.flight.push_back((sp.rcpts.len(), b.clone()));
                    s.start_transaction(sp);
                    d.drain(&mut s);
                }
            }
            Step::Queue(tx) => {
                if s.can_queue_next() {
                    let b = body(&tx.body);
                    let sp = spec(tx, &b);
                    let n = sp.rcpts.len();
                    match s.queue_next(sp) {
                        Ok(()) => d.flight.push_back((n, b)),
                        Err(r) => assert!(!r.text.starts_with("Internal error"), "queue_next refused: {r:?}"),
                    }
                }
            }
            Step::Quit => {
                if d.ready && !d.dead {
                    d.ready = false;
                    s.quit();
                    d.drain(&mut s);
                }
            }
            Step::Wait(ms) => {
                now += Duration::from_millis(u64::from(*ms) * 16);
                if s.next_deadline().is_some_and(|due| now >= due) {
                    s.handle_timeout(now);
                    d.drain(&mut s);
                }
            }
            Step::Closed => {
                s.handle_closed();
                d.drain(&mut s);
                pending.clear();
            }
            Step::TlsDone(ok) => {
                // After STARTTLS's 220, or on connect under implicit TLS until it is up.
                if s.awaiting_tls() || (tls == TlsPolicy::Implicit && !s.is_tls()) {
                    pending.clear();
                    if *ok {
                        s.handle_tls_established(now);
                    } else {
                        s.handle_tls_failed();
                    }
                    d.drain(&mut s);
                }
            }
        }
    }
}
