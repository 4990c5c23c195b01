//! `sluice-load noop`: one SMTP session that times NOOP round trips (RFC 5321 §4.1.1.9) at a
//! steady pace, to show whether a server's event loop keeps answering while something else
//! keeps it busy (for sluice: the DKIM signing workers saturated by another client, issue 16).
//!
//! Owns: the one connection (greeting, EHLO, NOOPs, QUIT), the pacing ([`Pacer`], pure, time
//! as an argument) and the report (p50/p90/p99/p99.9/max in microseconds, text or `--json`).
//! Must never: open a second connection, send anything but EHLO, NOOP and QUIT, pipeline (a
//! round trip is one command and its reply), or wait on the server without `--timeout`.

use crate::report::{new_histogram, percentiles_json, percentiles_text, print_stdout, record};
use crate::util::parse_duration;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use sluice::smtp::reply::{parse_reply, Reply, ReplyParse};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Flags of `noop`.
#[derive(Args, Debug, Clone)]
pub struct NoopArgs {
    /// Target SMTP server, IP:PORT.
    #[arg(long)]
    to: SocketAddr,
    /// Time between the starts of two NOOPs (e.g. 10ms); a round trip that takes longer
    /// delays the next one, never sends two at once.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    interval: Duration,
    /// How long to keep probing (e.g. 10s); the session then says QUIT.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Name sent in EHLO.
    #[arg(long, default_value = "noop-probe.sluice-load.test")]
    helo: String,
    /// Give up when the server has not answered one command for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// When each NOOP starts: on the grid `k × interval` from the start. A round trip that runs
/// over one or more grid points skips them (the next NOOP goes at once, then the grid
/// resumes), so a stall is measured once, not followed by a burst that would hide it.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    interval: Duration,
    duration: Duration,
    next: u64,
}

/// What the [`Pacer`] says to do at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Send the next NOOP now.
    Send,
    /// Sleep this long, then ask again.
    Wait(Duration),
    /// The probing time is over.
    Done,
}

impl Pacer {
    /// A pacer for NOOPs every `interval` during `duration`.
    pub fn new(interval: Duration, duration: Duration) -> Pacer {
        Pacer { interval, duration, next: 0 }
    }

    /// What to do at `elapsed` since the start. Returns [`Pace::Send`] at most once per grid
    /// point; the caller sends then and asks again after the reply.
    pub fn poll(&mut self, elapsed: Duration) -> Pace {
        if elapsed >= self.duration {
            return Pace::Done;
        }
        let due = self.interval.saturating_mul(self.next.min(u32::MAX as u64) as u32);
        if elapsed < due {
            return Pace::Wait(due - elapsed);
        }
        // The grid point after `elapsed`: points already behind are skipped.
        let nanos = self.interval.as_nanos().max(1);
        self.next = (elapsed.as_nanos() / nanos) as u64 + 1;
        Pace::Send
    }
}

/// Bytes read from the server, framed into replies.
#[derive(Debug, Default)]
struct Replies {
    buf: Vec<u8>,
}

impl Replies {
    /// The next whole reply, `None` when more bytes are needed, an error on bytes that are no
    /// SMTP reply.
    fn next(&mut self) -> Result<Option<Reply>> {
        match parse_reply(&self.buf) {
            ReplyParse::Complete { reply, consumed } => {
                self.buf.drain(..consumed);
                Ok(Some(reply))
            }
            ReplyParse::Partial => Ok(None),
            ReplyParse::Malformed { .. } => bail!("the server sent something that is not an SMTP reply"),
        }
    }
}

/// The session: a blocking socket with a read timeout, and its reply framing.
struct Session {
    stream: TcpStream,
    replies: Replies,
    timeout: Duration,
}

impl Session {
    /// Waits for one whole reply, at most the timeout.
    fn reply(&mut self, what: &str) -> Result<Reply> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(r) = self.replies.next()? {
                return Ok(r);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("the server closed the connection before its reply to {what}"),
                Ok(n) => self.replies.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no reply to {what} within {:?}", self.timeout)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("reading the reply to {what}")),
            }
        }
    }

    /// Sends `line` and requires a 2xx reply.
    fn command(&mut self, what: &str, line: &[u8]) -> Result<()> {
        self.stream.write_all(line).with_context(|| format!("sending {what}"))?;
        let r = self.reply(what)?;
        if !r.is_positive_completion() {
            bail!("{what} got {r}");
        }
        Ok(())
    }
}

/// Runs the probe; exit status 0, or an error (exit 1) when the session could not be held.
pub fn run(a: &NoopArgs) -> Result<i32> {
    if a.interval.is_zero() || a.duration.is_zero() || a.timeout.is_zero() {
        bail!("--interval, --duration and --timeout must be more than zero");
    }
    let stream = TcpStream::connect_timeout(&a.to, a.timeout).with_context(|| format!("connecting to {}", a.to))?;
    stream.set_read_timeout(Some(a.timeout))?;
    stream.set_nodelay(true)?;
    let mut s = Session { stream, replies: Replies::default(), timeout: a.timeout };
    let greeting = s.reply("the greeting")?;
    if !greeting.is_positive_completion() {
        bail!("{} greeted with {greeting}", a.to);
    }
    s.command("EHLO", format!("EHLO {}\r\n", a.helo).as_bytes())?;

    let mut h = new_histogram();
    let mut pacer = Pacer::new(a.interval, a.duration);
    let start = Instant::now();
    loop {
        match pacer.poll(start.elapsed()) {
            Pace::Done => break,
            Pace::Wait(d) => std::thread::sleep(d),
            Pace::Send => {
                let t = Instant::now();
                s.command("NOOP", b"NOOP\r\n")?;
                record(&mut h, t.elapsed());
            }
        }
    }
    let elapsed = start.elapsed();
    // The figures are in; a QUIT that goes wrong does not undo them.
    let _ = s.command("QUIT", b"QUIT\r\n");
    if a.json {
        let v = json!({
            "target": a.to.to_string(),
            "interval_us": a.interval.as_micros() as u64,
            "elapsed_s": elapsed.as_secs_f64(),
            "noops": h.len(),
            "round_trip": percentiles_json(&h),
        });
        print_stdout(&v.to_string());
    } else {
        print_stdout(&format!(
            "noop {}: {} round trips in {:.1}s\n  round trip: {}\n",
            a.to,
            h.len(),
            elapsed.as_secs_f64(),
            percentiles_text(&h)
        ));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pacer_keeps_the_grid_and_skips_missed_points() {
        let mut p = Pacer::new(10 * MS, 100 * MS);
        assert_eq!(p.poll(Duration::ZERO), Pace::Send);
        // A 1 ms round trip: wait for the 10 ms point.
        assert_eq!(p.poll(MS), Pace::Wait(9 * MS));
        assert_eq!(p.poll(10 * MS), Pace::Send);
        // A 35 ms stall: one NOOP at once (the 20 and 30 ms points are gone), then 50 ms.
        assert_eq!(p.poll(45 * MS), Pace::Send);
        assert_eq!(p.poll(46 * MS), Pace::Wait(4 * MS));
        assert_eq!(p.poll(50 * MS), Pace::Send);
        assert_eq!(p.poll(100 * MS), Pace::Done);
    }

    #[test]
    fn replies_are_framed_across_reads() {
        let mut r = Replies::default();
        r.buf.extend_from_slice(b"250-first\r\n250 la");
        assert!(r.next().unwrap().is_none());
        r.buf.extend_from_slice(b"st\r\n250 2.0.0 OK\r\n");
        assert_eq!(r.next().unwrap().unwrap().code, 250);
        assert_eq!(r.next().unwrap().unwrap().code, 250);
        assert!(r.next().unwrap().is_none());
        r.buf.extend_from_slice(b"garbage\r\n");
        assert!(r.next().is_err());
    }
}
