//! `sluice queue --spool DIR list|stats|flush`: a read-only view of a spool, safe beside a
//! running relay (it never truncates, deletes or locks anything), and the flush request
//! (SIGUSR1) to the relay holding the spool's lock.

use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::spool::RcptStatus;

/// Asks the relay holding the spool's lock to flush its queue (SIGUSR1).
fn flush(spool: &std::path::Path, out: &mut dyn Write) -> Result<(), Box<dyn std::error::Error>> {
    let Some(pid) = crate::spool::relay_pid(spool)? else {
        return Err(format!("no relay is running on {}", spool.display()).into());
    };
    crate::reactor::signal::request_flush(pid).map_err(|e| format!("signal relay process {pid}: {e}"))?;
    writeln!(out, "flush requested from the relay (process {pid}); it logs event=flush")?;
    Ok(())
}

/// What `sluice queue` does (config converts the clap value into this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// One entry per queued message with its recipients.
    List,
    /// Totals.
    Stats,
    /// Ask the running relay to retry every deferred recipient now (SIGUSR1).
    Flush,
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
    if args.action == Action::Flush {
        return flush(&args.spool, out);
    }
    let (rec, envelopes) = crate::spool::queue_listing(&args.spool)?;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    match args.action {
        // Answered above, without reading the spool.
        Action::Flush => {}
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
