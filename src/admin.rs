//! `sluice queue --spool DIR VERB`: a read-only view of a spool, safe beside a running relay
//! (it never truncates, deletes or locks anything), the flush request (SIGUSR1) to the relay
//! holding the spool's lock, and the client of the relay's control socket
//! (`suspend|resume|suspensions|bounce|summary`, protocol in [`crate::control`]).
//!
//! `suspensions` and `summary` also answer with no relay running, from the spool (the
//! manual suspensions file; the spool scan, per domain); the other control verbs need the
//! relay and fail naming the spool.

use std::io::{self, Read as _, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::control::{Answer, GroupBy, Request, SummaryRow, SuspensionRow};
use crate::spool::RcptStatus;

/// How long the client waits for the relay's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the control socket gave no answer.
enum Ask {
    /// Nothing listens there (no socket file, or a stale one).
    NoRelay(io::Error),
    /// Anything else (permissions, a cut or garbled answer).
    Failed(String),
}

/// Sends `req` to the relay listening on `DIR/control.sock` and reads its answer.
fn ask(spool: &Path, req: &Request) -> Result<Answer, Ask> {
    let path = spool.join(crate::control::SOCKET_NAME);
    let mut sock = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Err(Ask::NoRelay(e))
        }
        Err(e) => return Err(Ask::Failed(format!("{}: {e}", path.display()))),
    };
    let io_err = |e: io::Error| Ask::Failed(format!("{}: {e}", path.display()));
    sock.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io_err)?;
    sock.set_write_timeout(Some(ANSWER_TIMEOUT)).map_err(io_err)?;
    sock.write_all(req.encode().as_bytes()).map_err(io_err)?;
    let mut text = String::new();
    sock.read_to_string(&mut text).map_err(io_err)?;
    Answer::decode(&text).ok_or_else(|| Ask::Failed(format!("{}: no answer from the relay", path.display())))
}

/// A control verb: asked of the relay, or answered from the spool when none runs (only the
/// listing verbs).
fn control(args: &Query, req: &Request, out: &mut dyn Write) -> Result<(), Box<dyn std::error::Error>> {
    let answer = match ask(&args.spool, req) {
        Ok(a) => a,
        Err(Ask::Failed(e)) => return Err(e.into()),
        Err(Ask::NoRelay(e)) => {
            let none = format!("no relay is running on {} ({e})", args.spool.display());
            match req {
                Request::Suspensions => return offline_suspensions(args, out),
                Request::Summary { by: GroupBy::Domain } => return offline_summary(args, out),
                Request::Summary { by: GroupBy::Site } => {
                    return Err(format!("{none}: summary --by site needs it (sites are the relay's)").into())
                }
                _ => return Err(none.into()),
            }
        }
    };
    match answer {
        Answer::Failed(e) => return Err(e.into()),
        Answer::Done(m) if args.json => writeln!(out, "{{\"ok\":true,\"message\":{}}}", json_str(m.as_bytes()))?,
        Answer::Done(m) => writeln!(out, "{m}")?,
        Answer::Suspensions(rows) => write_suspensions(&rows, args.json, None, out)?,
        Answer::Summary(rows) => {
            let by = if matches!(req, Request::Summary { by: GroupBy::Site }) { "site" } else { "domain" };
            write_summary(&rows, by, args.json, out)?
        }
    }
    out.flush().map_err(|e: io::Error| e.into())
}

/// `suspensions` with no relay: the manual ones from `DIR/suspensions` (automatic ones live
/// only in a running relay).
fn offline_suspensions(args: &Query, out: &mut dyn Write) -> Result<(), Box<dyn std::error::Error>> {
    let now_ms = now_ms();
    let (list, warnings) = crate::spool::suspensions::load(&args.spool, now_ms)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let rows: Vec<SuspensionRow> = list
        .into_iter()
        .map(|s| SuspensionRow {
            scope: s.scope,
            site: String::new(),
            reason: s.reason,
            left_s: s.until_ms.saturating_sub(now_ms).div_ceil(1000),
            manual: true,
        })
        .collect();
    write_suspensions(&rows, args.json, Some(&args.spool), out)?;
    out.flush().map_err(|e: io::Error| e.into())
}

/// Prints suspension rows; `offline`: read from that spool with no relay running.
fn write_suspensions(
    rows: &[SuspensionRow],
    json: bool,
    offline: Option<&Path>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let source = if offline.is_some() { "spool" } else { "relay" };
    if let (Some(dir), false) = (offline, json) {
        writeln!(
            out,
            "# no relay is running on {}: manual suspensions only, from its suspensions file",
            dir.display()
        )?;
    }
    if rows.is_empty() && !json {
        writeln!(out, "no suspensions")?;
    }
    for r in rows {
        if json {
            writeln!(
                out,
                "{{\"scope\":{},\"site\":{},\"reason\":{},\"seconds_left\":{},\"manual\":{},\"source\":\"{source}\"}}",
                json_str(r.scope.as_bytes()),
                json_str(r.site.as_bytes()),
                json_str(r.reason.as_bytes()),
                r.left_s,
                r.manual
            )?;
        } else {
            let site = if r.site.is_empty() { "-" } else { &r.site };
            let kind = if r.manual { "manual" } else { "automatic" };
            writeln!(out, "{}  site={site}  left={}s  {kind}  reason={:?}", r.scope, r.left_s, r.reason)?;
        }
    }
    Ok(())
}

/// `summary` with no relay: per recipient domain, from the spool scan; a domain is shown
/// suspended when the suspensions file names it (providers need the relay's routes).
fn offline_summary(args: &Query, out: &mut dyn Write) -> Result<(), Box<dyn std::error::Error>> {
    let now_ms = now_ms();
    let (rec, envelopes) = crate::spool::queue_listing(&args.spool)?;
    let (suspended, _) = crate::spool::suspensions::load(&args.spool, now_ms)?;
    let mut rows: Vec<(SummaryRow, u64)> = Vec::new();
    for (m, env) in rec.messages.iter().zip(&envelopes) {
        for (r, addr) in m.rcpts.iter().zip(env.rcpts()) {
            if !matches!(r.status, RcptStatus::Queued | RcptStatus::Deferred) {
                continue;
            }
            let domain = crate::queue::domain_of(addr.addr)
                .map_or_else(String::new, |d| String::from_utf8_lossy(d).to_lowercase());
            let i = match rows.iter().position(|(row, _)| row.key == domain) {
                Some(i) => i,
                None => {
                    let scope = format!("domain:{domain}");
                    let suspended = suspended.iter().any(|s| s.scope == scope);
                    let row = SummaryRow { key: domain, queued: 0, oldest_s: 0, last_reply: String::new(), suspended };
                    rows.push((row, m.arrival_ms));
                    rows.len() - 1
                }
            };
            let (row, oldest) = &mut rows[i];
            row.queued += 1;
            *oldest = (*oldest).min(m.arrival_ms);
            // The spool scan goes in arrival order: the last reply seen is the latest known.
            if !r.last_reply.is_empty() {
                row.last_reply = String::from_utf8_lossy(&r.last_reply).into_owned();
            }
        }
    }
    let rows: Vec<SummaryRow> = rows
        .into_iter()
        .map(|(mut r, oldest)| {
            r.oldest_s = now_ms.saturating_sub(oldest) / 1000;
            r
        })
        .collect();
    if !args.json {
        writeln!(out, "# no relay is running on {}: from the spool", args.spool.display())?;
    }
    write_summary(&rows, "domain", args.json, out)?;
    for w in &rec.warnings {
        eprintln!("warning: {w}");
    }
    out.flush().map_err(|e: io::Error| e.into())
}

fn write_summary(rows: &[SummaryRow], by: &str, json: bool, out: &mut dyn Write) -> io::Result<()> {
    if rows.is_empty() && !json {
        writeln!(out, "nothing queued")?;
    }
    for r in rows {
        if json {
            writeln!(
                out,
                "{{\"{by}\":{},\"queued\":{},\"oldest_age_s\":{},\"last_reply\":{},\"suspended\":{}}}",
                json_str(r.key.as_bytes()),
                r.queued,
                r.oldest_s,
                json_str(r.last_reply.as_bytes()),
                r.suspended
            )?;
        } else {
            let suspended = if r.suspended { "yes" } else { "no" };
            writeln!(
                out,
                "{}  queued={}  oldest={}s  suspended={suspended}  last_reply={:?}",
                r.key, r.queued, r.oldest_s, r.last_reply
            )?;
        }
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Asks the relay holding the spool's lock to flush its queue (SIGUSR1).
fn flush(spool: &std::path::Path, out: &mut dyn Write) -> Result<(), Box<dyn std::error::Error>> {
    let Some(pid) = crate::spool::relay_pid(spool)? else {
        return Err(format!("no relay is running on {}", spool.display()).into());
    };
    crate::reactor::signal::request_flush(pid).map_err(|e| format!("signal relay process {pid}: {e}"))?;
    writeln!(out, "flush requested from the relay (process {pid}); it logs event=flush")?;
    Ok(())
}

/// What `sluice queue` does (main converts the clap value into this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// One entry per queued message with its recipients.
    List,
    /// Totals.
    Stats,
    /// Ask the running relay to retry every deferred recipient now (SIGUSR1).
    Flush,
    /// A request to the relay's control socket.
    Control(Request),
}

/// What to show and where: `sluice queue --spool DIR [--json] ACTION`.
#[derive(Debug, Clone)]
pub struct Query {
    /// The spool directory.
    pub spool: std::path::PathBuf,
    /// JSON lines instead of text.
    pub json: bool,
    /// The action.
    pub action: Action,
}

/// Runs the `queue` subcommand, writing to `out`.
pub fn run(args: &Query, out: &mut dyn Write) -> Result<(), Box<dyn std::error::Error>> {
    if !args.spool.is_dir() {
        return Err(format!("{}: no such spool directory", args.spool.display()).into());
    }
    match &args.action {
        Action::Flush => return flush(&args.spool, out),
        Action::Control(req) => return control(args, req, out),
        Action::List | Action::Stats => {}
    }
    let (rec, envelopes) = crate::spool::queue_listing(&args.spool)?;
    let now_ms = now_ms();
    match args.action {
        // Answered above, without reading the spool.
        Action::Flush | Action::Control(_) => {}
        Action::Stats => {
            let rcpts: usize = rec.messages.iter().map(|m| m.rcpts.len()).sum();
            let pending: usize = rec
                .messages
                .iter()
                .flat_map(|m| m.rcpts.iter())
                .filter(|r| matches!(r.status, RcptStatus::Queued | RcptStatus::Deferred))
                .count();
            let deferred: usize =
                rec.messages.iter().flat_map(|m| m.rcpts.iter()).filter(|r| r.status == RcptStatus::Deferred).count();
            let bytes: u64 = rec.messages.iter().map(|m| m.loc.len).sum();
            if args.json {
                writeln!(out, "{{\"messages\":{},\"recipients\":{rcpts},\"pending_recipients\":{pending},\"deferred_recipients\":{deferred},\"bytes\":{bytes}}}", rec.messages.len())?;
            } else {
                writeln!(out, "messages: {}\nrecipients: {rcpts}\npending recipients: {pending}\ndeferred recipients: {deferred}\nbytes: {bytes}", rec.messages.len())?;
            }
        }
        Action::List => {
            for (m, env) in rec.messages.iter().zip(&envelopes) {
                let age_s = now_ms.saturating_sub(m.arrival_ms) / 1000;
                let sender = if env.sender.is_empty() { "<>".into() } else { String::from_utf8_lossy(&env.sender) };
                if args.json {
                    write!(
                        out,
                        "{{\"id\":\"{}\",\"sender\":{},\"size\":{},\"age_s\":{age_s},\"recipients\":[",
                        m.id,
                        json_str(sender.as_bytes()),
                        m.loc.len
                    )?;
                    for (i, (r, addr)) in m.rcpts.iter().zip(env.rcpts()).enumerate() {
                        let sep = if i > 0 { "," } else { "" };
                        write!(
                            out,
                            "{sep}{{\"address\":{},\"status\":\"{}\",\"attempts\":{},\"next_attempt_ms\":{},\"last_reply\":{}}}",
                            json_str(addr.addr),
                            status(r.status),
                            r.attempts,
                            r.next_attempt_ms,
                            json_str(&r.last_reply)
                        )?;
                    }
                    writeln!(out, "]}}")?;
                } else {
                    writeln!(
                        out,
                        "{}  from={sender}  size={}  age={age_s}s  recipients={}",
                        m.id,
                        m.loc.len,
                        m.rcpts.len()
                    )?;
                    for (r, addr) in m.rcpts.iter().zip(env.rcpts()) {
                        let next =
                            if r.status == RcptStatus::Deferred { r.next_attempt_ms.to_string() } else { "-".into() };
                        writeln!(
                            out,
                            "    {} {} attempts={} next_attempt_ms={next} last_reply={:?}",
                            String::from_utf8_lossy(addr.addr),
                            status(r.status),
                            r.attempts,
                            String::from_utf8_lossy(&r.last_reply)
                        )?;
                    }
                }
            }
        }
    }
    for w in &rec.warnings {
        eprintln!("warning: {w}");
    }
    out.flush().map_err(|e: io::Error| e.into())
}

fn status(s: RcptStatus) -> &'static str {
    match s {
        RcptStatus::Queued => "queued",
        RcptStatus::Delivered => "delivered",
        RcptStatus::Failed => "failed",
        RcptStatus::Deferred => "deferred",
    }
}

fn json_str(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}
