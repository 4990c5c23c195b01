//! Pure: when an inbound session has been too slow, as Postfix's `smtpd_per_request_deadline`
//! with `smtpd_min_data_rate` does it (RFC 5321 §4.5.3.2 gives the timeouts themselves).
//!
//! A byte does not buy more time, a finished command does:
//! - waiting for a command, the whole line must arrive within the command timeout of the end
//!   of the previous one (or of the greeting), however the bytes trickle in;
//! - inside DATA or a BDAT chunk, the client may be idle for the data timeout at most, and it
//!   must also keep an average rate: the deadline is the start of the transfer plus the data
//!   timeout plus one second per `min_data_rate` bytes received.
//!
//! # Driving it
//! After every read and every parse call [`Pace::observe`] with the session's
//! [`TimeoutKind`] and its count of finished command lines, then [`Pace::deadline`] gives the
//! instant at which the session is cut (`421 4.4.2`) and why.
//!
//! Owns: the start of the current phase, bytes and last read in it. Must never: read the
//! clock (time comes in as `now`), touch sockets.

use std::time::{Duration, Instant};

use super::server::TimeoutKind;

/// The limits (from the flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaceLimits {
    /// `--command-timeout`: for a whole command line, idle time before it included.
    pub command: Duration,
    /// `--data-timeout`: idle time inside DATA/BDAT, and the grace before the rate counts.
    pub data: Duration,
    /// `--min-data-rate` in bytes per second; 0 turns the rate check off.
    pub min_data_rate: u32,
}

/// Why a deadline passed (for the log line; the reply is the same `421 4.4.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slow {
    /// A command line (with the wait before it) took longer than the command timeout.
    Command,
    /// Nothing arrived inside DATA/BDAT for the data timeout.
    DataIdle,
    /// DATA/BDAT arrived slower than the minimum rate.
    DataRate,
}

impl Slow {
    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Slow::Command => "command_deadline",
            Slow::DataIdle => "data_idle",
            Slow::DataRate => "data_rate",
        }
    }
}

/// One session's pace.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    kind: TimeoutKind,
    /// Finished command lines, as last seen.
    lines: u32,
    /// Start of the current phase (a command wait or a transfer).
    since: Instant,
    last_read: Instant,
    /// Bytes read in the current transfer.
    bytes: u64,
}

impl Pace {
    /// A session that starts waiting for a command at `now`.
    pub fn new(now: Instant) -> Pace {
        Pace { kind: TimeoutKind::Command, lines: 0, since: now, last_read: now, bytes: 0 }
    }

    /// Starts a command wait afresh at `now` (after a TLS handshake or an AUTH verdict).
    pub fn restart(&mut self, now: Instant) {
        self.kind = TimeoutKind::Command;
        self.since = now;
        self.last_read = now;
        self.bytes = 0;
    }

    /// `read` new bytes came in (0 after a parse alone); the session is now in `kind` and has
    /// finished `lines` command lines in all.
    pub fn observe(&mut self, kind: TimeoutKind, lines: u32, read: usize, now: Instant) {
        if kind != self.kind || lines != self.lines {
            // A new phase, or a command finished: the clock starts again from here. Bytes
            // read in the same call belong to what came before (a whole line, or the end of
            // the transfer), so the new phase starts empty.
            self.kind = kind;
            self.lines = lines;
            self.since = now;
            self.last_read = now;
            self.bytes = 0;
            return;
        }
        if read > 0 {
            self.last_read = now;
            self.bytes += read as u64;
        }
    }

    /// When the session is cut, and why; `None` while it waits for the relay (spool, AUTH).
    pub fn deadline(&self, l: &PaceLimits) -> Option<(Instant, Slow)> {
        match self.kind {
            TimeoutKind::None => None,
            TimeoutKind::Command => Some((self.since + l.command, Slow::Command)),
            TimeoutKind::Data => {
                let idle = (self.last_read + l.data, Slow::DataIdle);
                if l.min_data_rate == 0 {
                    return Some(idle);
                }
                let earned = Duration::from_secs_f64(self.bytes as f64 / f64::from(l.min_data_rate));
                let rate = (self.since + l.data + earned, Slow::DataRate);
                Some(if rate.0 < idle.0 { rate } else { idle })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: PaceLimits =
        PaceLimits { command: Duration::from_secs(2), data: Duration::from_secs(3), min_data_rate: 100 };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn bytes_of_an_unfinished_line_buy_no_time() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0);
        assert_eq!(p.deadline(&L), Some((t0 + secs(2), Slow::Command)));
        // One byte a second of a line: the deadline stays.
        for i in 1..5 {
            p.observe(TimeoutKind::Command, 0, 1, t0 + secs(i));
            assert_eq!(p.deadline(&L), Some((t0 + secs(2), Slow::Command)));
        }
        // A finished line starts the clock again.
        p.observe(TimeoutKind::Command, 1, 6, t0 + secs(1));
        assert_eq!(p.deadline(&L), Some((t0 + secs(3), Slow::Command)));
        // Waiting for the spool or an AUTH check: no deadline.
        p.observe(TimeoutKind::None, 2, 0, t0 + secs(2));
        assert_eq!(p.deadline(&L), None);
        p.restart(t0 + secs(9));
        assert_eq!(p.deadline(&L), Some((t0 + secs(11), Slow::Command)));
    }

    #[test]
    fn data_must_keep_a_minimum_rate() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0);
        p.observe(TimeoutKind::Data, 1, 6, t0);
        // Grace: the data timeout.
        assert_eq!(p.deadline(&L), Some((t0 + secs(3), Slow::DataIdle)));
        // 100 bytes a second, every second: the idle deadline moves, the rate one keeps up.
        for i in 1..=10 {
            p.observe(TimeoutKind::Data, 1, 100, t0 + secs(i));
            assert_eq!(p.deadline(&L).unwrap().0, t0 + secs(i + 3));
        }
        // A trickle of 10 bytes a second: the rate deadline (t0 + 3 + 10 + n/10) comes first.
        let mut t = t0 + secs(10);
        loop {
            t += secs(1);
            p.observe(TimeoutKind::Data, 1, 10, t);
            let (at, why) = p.deadline(&L).unwrap();
            if at <= t {
                assert_eq!(why, Slow::DataRate);
                break;
            }
            assert!(t < t0 + secs(30), "never cut");
        }
        // Off: only idleness counts.
        let off = PaceLimits { min_data_rate: 0, ..L };
        assert_eq!(p.deadline(&off), Some((t + secs(3), Slow::DataIdle)));
        // The end of the transfer is a new phase.
        p.observe(TimeoutKind::Command, 2, 5, t);
        assert_eq!(p.deadline(&L), Some((t + secs(2), Slow::Command)));
    }
}
