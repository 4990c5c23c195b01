//! Receiver-side limits of `sluice-load sink`, shaped like those of the big mailbox providers:
//! a per-client-address message rate (Gmail's `421 4.7.28`), a scripted window in which every
//! MAIL is deferred (Gmail's or Yahoo's `TSS04` deferrals), a cap on messages per connection
//! and one on connections per address (Microsoft's `421 4.7.0`), and the counters that show
//! what a sender did against them.
//!
//! Owns: the `--rate-limit` syntax, the token bucket, the decision at connect and at MAIL, the
//! refusal replies (one table: [`Refusal::reply`]), and the bounded per-connection, per-address
//! and per-second records with their JSON. Must never: read a clock (time is an argument, so
//! the tests run on fake time), do I/O, or allocate per MAIL (replies that name the client's
//! address are rendered once per address).
//!
//! Why a token bucket and not a sliding window: Gmail lets a sender that has been quiet send a
//! burst and then meters it, which is what a bucket does. The bucket holds one second of the
//! rate (at least one token) and refills continuously, so in any interval of `t` seconds at
//! most `bucket + rate × t` MAILs pass; e.g. `10/s` gives at most 20 in any one second after a
//! quiet spell and 10 per second sustained. Arithmetic is in integers, so a limit is honoured
//! exactly over any number of seconds.

use serde_json::{json, Map, Value};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How many per-connection records the report keeps; later connections are only counted.
pub const CONN_LOG_CAP: usize = 100_000;

/// The default `--rate-reply` and `--defer-reply`: Gmail's rate-limit text (`{ip}` is replaced
/// by the client's address). RFC 5321 §3.8: a `421` ends the session after it is sent.
pub const GMAIL_RATE_REPLY: &str = "421 4.7.28 [{ip}] Our system has detected an unusual rate of unsolicited mail \
originating from your IP address. To protect our users from spam, mail sent from your IP address has been \
temporarily rate limited.";

/// `--max-messages-per-connection`: the MAIL after the cap (Microsoft-like).
const TOO_MANY_MESSAGES: &[u8] = b"421 4.7.0 Too many messages on this connection\r\n";
/// `--max-connections-per-ip`: the greeting of a connection past the cap.
const TOO_MANY_CONNECTIONS: &[u8] = b"421 4.7.0 Too many connections from your IP\r\n";

/// A message rate: `n` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Messages per period (at least 1).
    pub n: u64,
    /// The period: one second, minute or hour.
    pub period: Duration,
}

impl Rate {
    /// Messages per second, for the report.
    pub fn per_second(self) -> f64 {
        self.n as f64 / self.period.as_secs_f64()
    }

    /// Tokens of a full bucket: one second of the rate, at least one.
    pub fn bucket(self) -> u64 {
        let per_s = u128::from(self.n) * 1_000_000_000 / self.period.as_nanos().max(1);
        per_s.clamp(1, u128::from(u64::MAX)) as u64
    }
}

/// Parses `--rate-limit`: `N/s`, `N/min` or `N/h`, `N` at least 1.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    let bad = || format!("`{s}` is not a rate (use e.g. 10/s, 100/min, 3600/h)");
    let (num, unit) = t.split_once('/').ok_or_else(bad)?;
    let period = match unit.trim() {
        "s" => Duration::from_secs(1),
        "min" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(format!("`{s}`: the rate must be at least 1 (use --defer-all-for to refuse everything)"));
    }
    Ok(Rate { n, period })
}

/// Parses `--rate-reply`/`--defer-reply`: one reply line starting with a 4xx or 5xx code
/// (RFC 5321 §4.2), without CR or LF; `{ip}` stands for the client's address.
pub fn parse_reply(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let code_ok = b.len() >= 3
        && matches!(b[0], b'4' | b'5')
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && (b.len() == 3 || b[3] == b' ');
    if !code_ok {
        return Err(format!("`{s}` does not start with a 4xx or 5xx reply code and a space"));
    }
    if b.iter().any(|&c| c == b'\r' || c == b'\n') {
        return Err("a reply is one line (no CR or LF)".into());
    }
    Ok(s.to_string())
}

/// Renders a scripted reply for one client: `{ip}` replaced by its address, CRLF appended.
pub fn render_reply(template: &str, ip: IpAddr) -> Vec<u8> {
    let mut out = template.replace("{ip}", &ip.to_string()).into_bytes();
    out.extend_from_slice(b"\r\n");
    out
}

/// True when a reply ends the session once written (`421`, RFC 5321 §3.8).
pub fn closes(reply: &[u8]) -> bool {
    reply.starts_with(b"421")
}

/// A token bucket in integer units: one token is `unit` (the rate's period in nanoseconds)
/// and `n` units arrive per nanosecond, so refill never rounds.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    level: u128,
    cap: u128,
    n: u128,
    unit: u128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket holding one second of `rate`, at least one token.
    pub fn new(rate: Rate, now: Instant) -> TokenBucket {
        let unit = rate.period.as_nanos().max(1);
        let n = u128::from(rate.n);
        let cap = u128::from(rate.bucket()).saturating_mul(unit);
        TokenBucket { level: cap, cap, n, unit, last: now }
    }

    /// Takes one token if there is one at `now`. A `now` before the last call counts as no
    /// time passing.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        self.level = self.level.saturating_add(self.n.saturating_mul(dt)).min(self.cap);
        if self.level >= self.unit {
            self.level -= self.unit;
            true
        } else {
            false
        }
    }
}

/// Why the sink refused a MAIL or a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--rate-limit`: the client's bucket was empty.
    RateLimit,
    /// `--defer-all-for`: inside the deferral window.
    Window,
    /// `--max-messages-per-connection`: the connection had its share.
    MessagesPerConnection,
    /// `--max-connections-per-ip`: too many open connections from the address.
    ConnectionsPerIp,
}

impl Refusal {
    const ALL: [Refusal; 4] =
        [Refusal::RateLimit, Refusal::Window, Refusal::MessagesPerConnection, Refusal::ConnectionsPerIp];

    /// The name in the JSON report.
    pub fn key(self) -> &'static str {
        match self {
            Refusal::RateLimit => "rate_limit",
            Refusal::Window => "window",
            Refusal::MessagesPerConnection => "messages_per_connection",
            Refusal::ConnectionsPerIp => "connections_per_ip",
        }
    }

    /// The reply: scripted for the rate limit and the window, fixed for the caps.
    pub fn reply(self, scripted: &ScriptedReplies) -> &[u8] {
        match self {
            Refusal::RateLimit => &scripted.rate,
            Refusal::Window => &scripted.defer,
            Refusal::MessagesPerConnection => TOO_MANY_MESSAGES,
            Refusal::ConnectionsPerIp => TOO_MANY_CONNECTIONS,
        }
    }
}

/// Refusals counted by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refusals([u64; 4]);

impl Refusals {
    /// Counts one refusal.
    pub fn count(&mut self, r: Refusal) {
        self.0[r as usize] += 1;
    }

    /// How many of one kind.
    pub fn get(&self, r: Refusal) -> u64 {
        self.0[r as usize]
    }

    /// Adds another set of counts.
    pub fn add(&mut self, o: &Refusals) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }

    /// `{"rate_limit": n, "window": n, ...}`.
    pub fn json(&self) -> Value {
        let m: Map<String, Value> = Refusal::ALL.iter().map(|&r| (r.key().to_string(), json!(self.get(r)))).collect();
        Value::Object(m)
    }
}

/// The `--rate-reply` and `--defer-reply` texts rendered for one client address.
#[derive(Debug, Clone)]
pub struct ScriptedReplies {
    rate: Vec<u8>,
    defer: Vec<u8>,
}

/// The limits in force, from the flags.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `--rate-limit`, per client address over all its connections.
    pub rate: Option<Rate>,
    /// `--defer-all-for`, as the instant the window ends.
    pub defer_until: Option<Instant>,
    /// `--max-messages-per-connection`.
    pub max_messages_per_connection: Option<u64>,
    /// `--max-connections-per-ip`.
    pub max_connections_per_ip: Option<u32>,
    /// `--rate-reply` (`{ip}` for the address).
    pub rate_reply: String,
    /// `--defer-reply`.
    pub defer_reply: String,
}

impl Limits {
    /// True when a MAIL decision needs the time.
    pub fn timed(&self) -> bool {
        self.rate.is_some() || self.defer_until.is_some()
    }

    /// The state for a client address seen for the first time.
    pub fn new_peer(&self, ip: IpAddr, now: Instant) -> Peer {
        Peer {
            ip,
            open: 0,
            bucket: self.rate.map(|r| TokenBucket::new(r, now)),
            replies: ScriptedReplies {
                rate: render_reply(&self.rate_reply, ip),
                defer: render_reply(&self.defer_reply, ip),
            },
            connections: 0,
            messages: 0,
            refusals: Refusals::default(),
        }
    }

    /// A new connection from `peer`, which has `peer.open` others open.
    pub fn at_connect(&self, peer: &Peer) -> Option<Refusal> {
        match self.max_connections_per_ip {
            Some(max) if peer.open >= max => Some(Refusal::ConnectionsPerIp),
            _ => None,
        }
    }

    /// A MAIL at `now` on a connection that has had `accepted` messages accepted. In order:
    /// the window, the per-connection cap, then the rate (a refused MAIL takes no token).
    pub fn at_mail(&self, now: Instant, accepted: u64, peer: &mut Peer) -> Option<Refusal> {
        if self.defer_until.is_some_and(|end| now < end) {
            return Some(Refusal::Window);
        }
        if self.max_messages_per_connection.is_some_and(|max| accepted >= max) {
            return Some(Refusal::MessagesPerConnection);
        }
        match &mut peer.bucket {
            Some(b) => (!b.try_take(now)).then_some(Refusal::RateLimit),
            None => None,
        }
    }
}

/// What the sink knows about one client address.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The address.
    pub ip: IpAddr,
    /// Connections open now that hold a slot (those refused at connect do not).
    pub open: u32,
    /// `--rate-limit` bucket, shared by all the address's connections.
    pub bucket: Option<TokenBucket>,
    /// Its scripted replies.
    pub replies: ScriptedReplies,
    /// Connections accepted from it (including refused ones).
    pub connections: u64,
    /// Messages accepted from it (added when a connection ends).
    pub messages: u64,
    /// Refusals (added when a connection ends).
    pub refusals: Refusals,
}

/// One finished connection.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    /// When the sink accepted it, since the sink started.
    pub opened: Duration,
    /// Client address.
    pub peer: IpAddr,
    /// The last EHLO/HELO name (empty when none was given).
    pub ehlo: Vec<u8>,
    /// Messages accepted on it.
    pub messages: u64,
    /// Refusals on it.
    pub refusals: Refusals,
}

/// Finished connections, at most [`CONN_LOG_CAP`]; the rest are counted.
#[derive(Debug, Default)]
pub struct ConnLog {
    entries: Vec<ConnRecord>,
    omitted: u64,
}

impl ConnLog {
    /// Records one connection (or counts it past the cap).
    pub fn push(&mut self, rec: ConnRecord) {
        if self.entries.len() < CONN_LOG_CAP {
            self.entries.push(rec);
        } else {
            self.omitted += 1;
        }
    }
}

/// Messages accepted in each whole second since the start.
#[derive(Debug, Default)]
pub struct PerSecond(Vec<u64>);

impl PerSecond {
    /// One message accepted `since_start`.
    pub fn record(&mut self, since_start: Duration) {
        let i = since_start.as_secs() as usize;
        if self.0.len() <= i {
            self.0.resize(i + 1, 0);
        }
        self.0[i] += 1;
    }

    /// Pads with zeros up to the second the run ended in.
    pub fn finish(&mut self, elapsed: Duration) {
        let n = elapsed.as_secs() as usize + 1;
        if self.0.len() < n {
            self.0.resize(n, 0);
        }
    }

    /// The counts, second 0 first.
    pub fn counts(&self) -> &[u64] {
        &self.0
    }
}

/// The report's limit fields: totals of each refusal, the per-second series, the bounded
/// per-connection list and the per-address totals.
pub fn report(
    limits: &Limits,
    totals: &Refusals,
    per_second: &PerSecond,
    log: &ConnLog,
    peers: &[Peer],
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("refusals".into(), totals.json());
    m.insert(
        "rate_limit".into(),
        match limits.rate {
            Some(r) => json!({"per_second": r.per_second(), "bucket": r.bucket()}),
            None => Value::Null,
        },
    );
    m.insert("accepted_per_second".into(), json!(per_second.counts()));
    let conns: Vec<Value> = log
        .entries
        .iter()
        .map(|c| {
            json!({"peer": c.peer.to_string(), "ehlo": String::from_utf8_lossy(&c.ehlo), "messages": c.messages,
                   "refusals": c.refusals.json(), "opened_ms": c.opened.as_millis() as u64})
        })
        .collect();
    m.insert("per_connection".into(), Value::Array(conns));
    m.insert("per_connection_omitted".into(), json!(log.omitted));
    let per_peer: Map<String, Value> = peers
        .iter()
        .map(|p| {
            (
                p.ip.to_string(),
                json!({"connections": p.connections, "messages": p.messages, "refusals": p.refusals.json()}),
            )
        })
        .collect();
    m.insert("per_peer".into(), Value::Object(per_peer));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limits() -> Limits {
        Limits {
            rate: None,
            defer_until: None,
            max_messages_per_connection: None,
            max_connections_per_ip: None,
            rate_reply: GMAIL_RATE_REPLY.into(),
            defer_reply: "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred".into(),
        }
    }

    #[test]
    fn rate_syntax() {
        assert_eq!(parse_rate("10/s"), Ok(Rate { n: 10, period: Duration::from_secs(1) }));
        assert_eq!(parse_rate(" 100/min "), Ok(Rate { n: 100, period: Duration::from_secs(60) }));
        assert_eq!(parse_rate("3600/h"), Ok(Rate { n: 3600, period: Duration::from_secs(3600) }));
        for bad in ["10", "10/d", "0/s", "x/s", "-1/s", "/s", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reply_syntax_and_rendering() {
        assert!(parse_reply("421 4.7.28 slow down").is_ok());
        assert!(parse_reply("550").is_ok());
        for bad in ["250 ok", "42 x", "421x", "ok", "421 a\r\nb"] {
            assert!(parse_reply(bad).is_err(), "{bad}");
        }
        let r = render_reply(GMAIL_RATE_REPLY, LOCAL);
        assert!(r.starts_with(b"421 4.7.28 [127.0.0.1] Our system has detected"));
        assert!(r.ends_with(b"temporarily rate limited.\r\n"));
        assert!(closes(&r));
        assert!(!closes(&render_reply("450 4.7.1 later", LOCAL)));
    }

    #[test]
    fn bucket_holds_one_second_at_least_one_token() {
        let cap = |s| parse_rate(s).unwrap().bucket();
        assert_eq!(cap("10/s"), 10);
        assert_eq!(cap("600/min"), 10);
        assert_eq!(cap("30/min"), 1);
        assert_eq!(cap("1/h"), 1);
    }

    /// Tries a MAIL every millisecond for `secs` simulated seconds; returns those let through
    /// in each second.
    fn drive(rate: &str, secs: u64) -> Vec<u64> {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(parse_rate(rate).unwrap(), t0);
        (0..secs).map(|s| (0..1000).filter(|m| b.try_take(t0 + ms(s * 1000 + m))).count() as u64).collect()
    }

    #[test]
    fn limit_is_exact_over_simulated_seconds() {
        // A full bucket (10), then 10 per second: refill is continuous, so exactly one token
        // every 100 ms.
        let got = drive("10/s", 10);
        assert_eq!(got[0], 10 + 9, "{got:?}"); // the burst, and refills at 100..900 ms
        assert_eq!(got.iter().sum::<u64>(), 10 + 99, "{got:?}"); // refills up to 9.9 s
        assert!(got[1..].iter().all(|&n| n == 10), "{got:?}");
        // 120/min: two a second, two tokens in the bucket.
        assert_eq!(drive("120/min", 5), [2 + 1, 2, 2, 2, 2]);
        // 30/min: one every two seconds, and the bucket holds one.
        assert_eq!(drive("30/min", 6), [1, 0, 1, 0, 1, 0]);
    }

    #[test]
    fn bucket_refills_after_a_quiet_spell_but_not_beyond_its_size() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(parse_rate("5/s").unwrap(), t0);
        assert_eq!((0..10).filter(|_| b.try_take(t0)).count(), 5);
        // 199 ms: not yet one token (one per 200 ms); 200 ms: exactly one.
        assert!(!b.try_take(t0 + ms(199)));
        assert!(b.try_take(t0 + ms(200)));
        assert!(!b.try_take(t0 + ms(200)));
        // An hour later: full again, and only full.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| b.try_take(later)).count(), 5);
        // Time going backwards takes nothing and gives nothing.
        assert!(!b.try_take(t0));
    }

    #[test]
    fn hourly_rate_waits_for_the_whole_period() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(parse_rate("2/h").unwrap(), t0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_secs(1799)));
        assert!(b.try_take(t0 + Duration::from_secs(1800)));
    }

    #[test]
    fn window_then_caps_then_rate() {
        let t0 = Instant::now();
        let mut l = limits();
        l.defer_until = Some(t0 + Duration::from_secs(60));
        l.max_messages_per_connection = Some(2);
        l.rate = Some(parse_rate("1/s").unwrap());
        let mut p = l.new_peer(LOCAL, t0);
        // Inside the window every MAIL is deferred, and none takes a token.
        assert_eq!(l.at_mail(t0, 0, &mut p), Some(Refusal::Window));
        assert_eq!(l.at_mail(t0 + ms(59_999), 0, &mut p), Some(Refusal::Window));
        let end = t0 + Duration::from_secs(60);
        assert_eq!(l.at_mail(end, 0, &mut p), None);
        // The bucket (one token, refilled long ago) is now empty.
        assert_eq!(l.at_mail(end, 1, &mut p), Some(Refusal::RateLimit));
        // The per-connection cap is checked before the rate.
        assert_eq!(l.at_mail(end, 2, &mut p), Some(Refusal::MessagesPerConnection));
        assert_eq!(l.at_mail(end + ms(1000), 1, &mut p), None);
        assert_eq!(
            Refusal::Window.reply(&p.replies),
            b"421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred\r\n"
        );
    }

    #[test]
    fn connection_cap_counts_open_connections() {
        let mut l = limits();
        let mut p = l.new_peer(LOCAL, Instant::now());
        assert_eq!(l.at_connect(&p), None);
        l.max_connections_per_ip = Some(2);
        p.open = 1;
        assert_eq!(l.at_connect(&p), None);
        p.open = 2;
        assert_eq!(l.at_connect(&p), Some(Refusal::ConnectionsPerIp));
        assert!(closes(Refusal::ConnectionsPerIp.reply(&p.replies)));
        assert!(closes(Refusal::MessagesPerConnection.reply(&p.replies)));
    }

    #[test]
    fn per_second_series_and_bounded_log() {
        let mut s = PerSecond::default();
        s.record(ms(10));
        s.record(ms(999));
        s.record(ms(2500));
        s.finish(ms(4100));
        assert_eq!(s.counts(), [2, 0, 1, 0, 0]);
        let mut log = ConnLog::default();
        let rec = ConnRecord {
            opened: Duration::ZERO,
            peer: LOCAL,
            ehlo: b"a".to_vec(),
            messages: 1,
            refusals: Refusals::default(),
        };
        for _ in 0..CONN_LOG_CAP + 3 {
            log.push(rec.clone());
        }
        assert_eq!((log.entries.len(), log.omitted), (CONN_LOG_CAP, 3));
    }
}
