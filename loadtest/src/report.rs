//! Measurement and reporting for `send`: latency histograms (hdrhistogram, microseconds),
//! totals by reply code, the progress line on stderr and the final text or JSON report.
//!
//! Worker threads record into their own [`Stats`] (no locks on the hot path) and publish a
//! snapshot into [`Progress`] a few times a second; the progress line reads only that.

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Highest latency recorded exactly: one minute, in microseconds. Longer ones are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

/// A latency histogram in microseconds, 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
}

/// Records `d` (clamped to the histogram's range).
#[inline]
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, MAX_LATENCY_US);
    // Cannot fail: the value is clamped into the histogram's bounds.
    let _ = h.record(us);
}

/// What one worker thread measured.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Transactions started (MAIL written).
    pub sent: u64,
    /// Transactions whose final reply was 2xx.
    pub accepted: u64,
    /// Final reply 4xx.
    pub tempfailed: u64,
    /// Final reply 5xx.
    pub rejected: u64,
    /// Transactions lost to a dropped connection or a timeout.
    pub errors: u64,
    /// Recipients refused at RCPT.
    pub rcpt_refused: u64,
    /// Recipients accepted in accepted transactions.
    pub rcpts_accepted: u64,
    /// Message octets (before dot-stuffing) of accepted transactions.
    pub bytes_accepted: u64,
    /// Connections established.
    pub connections: u64,
    /// Connection attempts that failed.
    pub connect_errors: u64,
    /// Connections that failed before carrying mail: greeting, STARTTLS, TLS handshake, AUTH.
    pub session_errors: u64,
    /// TLS handshakes completed.
    pub tls_sessions: u64,
    /// The last connection error, for the final message.
    pub last_error: Option<String>,
    /// Final replies by code (index = code, 0..600).
    pub codes: Vec<u64>,
    /// End of data (last octet written) to final reply.
    pub eod: Histogram<u64>,
    /// Whole transaction: MAIL written (or its scheduled time under `--rate`) to final reply.
    pub txn: Histogram<u64>,
    /// TLS handshake: session start (STARTTLS's 220, or the connect) to handshake done.
    pub handshake: Histogram<u64>,
    /// CPU time of the thread, nanoseconds.
    pub cpu_ns: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            sent: 0,
            accepted: 0,
            tempfailed: 0,
            rejected: 0,
            errors: 0,
            rcpt_refused: 0,
            rcpts_accepted: 0,
            bytes_accepted: 0,
            connections: 0,
            connect_errors: 0,
            session_errors: 0,
            tls_sessions: 0,
            last_error: None,
            codes: vec![0; 600],
            eod: new_histogram(),
            txn: new_histogram(),
            handshake: new_histogram(),
            cpu_ns: 0,
        }
    }
}

impl Stats {
    /// Counts a final reply code.
    #[inline]
    pub fn final_code(&mut self, code: u16) {
        match code {
            200..=399 => self.accepted += 1,
            400..=499 => self.tempfailed += 1,
            _ => self.rejected += 1,
        }
        if let Some(c) = self.codes.get_mut(code as usize) {
            *c += 1;
        }
    }

    /// Adds another thread's figures.
    pub fn merge(&mut self, o: &Stats) {
        self.sent += o.sent;
        self.accepted += o.accepted;
        self.tempfailed += o.tempfailed;
        self.rejected += o.rejected;
        self.errors += o.errors;
        self.rcpt_refused += o.rcpt_refused;
        self.rcpts_accepted += o.rcpts_accepted;
        self.bytes_accepted += o.bytes_accepted;
        self.connections += o.connections;
        self.connect_errors += o.connect_errors;
        self.session_errors += o.session_errors;
        self.tls_sessions += o.tls_sessions;
        if o.last_error.is_some() {
            self.last_error.clone_from(&o.last_error);
        }
        for (a, b) in self.codes.iter_mut().zip(&o.codes) {
            *a += b;
        }
        let _ = self.eod.add(&o.eod);
        let _ = self.txn.add(&o.txn);
        let _ = self.handshake.add(&o.handshake);
        self.cpu_ns += o.cpu_ns;
    }
}

/// Counters the workers publish for the progress line.
#[derive(Debug)]
pub struct Progress {
    /// Transactions started.
    pub sent: AtomicU64,
    /// Accepted.
    pub accepted: AtomicU64,
    /// 4xx or 5xx final replies.
    pub refused: AtomicU64,
    /// Transaction latencies so far (workers add their recent samples in batches).
    pub txn: Mutex<Histogram<u64>>,
    /// Set when all workers are done.
    pub done: AtomicBool,
}

impl Progress {
    /// Empty counters.
    pub fn new() -> Progress {
        Progress {
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            txn: Mutex::new(new_histogram()),
            done: AtomicBool::new(false),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// Prints the progress line until `progress.done`: redrawn in place on a terminal (every
/// second), one line every five seconds otherwise (logs and CI). Returns (elapsed, accepted)
/// samples, every 100 ms and at the end, for the throughput-over-time plot.
pub fn progress_loop(progress: &Progress, start: Instant, quiet: bool) -> Vec<(f64, u64)> {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(5) };
    let mut samples = Vec::new();
    let mut last_print = start;
    let mut last_accepted = 0u64;
    let mut last_sample = start;
    while !progress.done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        if now.duration_since(last_sample) >= Duration::from_millis(100) {
            last_sample = now;
            samples.push((now.duration_since(start).as_secs_f64(), progress.accepted.load(Ordering::Relaxed)));
        }
        if quiet || now.duration_since(last_print) < every {
            continue;
        }
        let secs = now.duration_since(last_print).as_secs_f64();
        last_print = now;
        let accepted = progress.accepted.load(Ordering::Relaxed);
        let p99 = progress.txn.lock().map(|h| h.value_at_quantile(0.99)).unwrap_or(0);
        let line = format!(
            "sent {} accepted {} refused {} rate {:.0}/s p99 {}",
            progress.sent.load(Ordering::Relaxed),
            accepted,
            progress.refused.load(Ordering::Relaxed),
            (accepted - last_accepted) as f64 / secs,
            fmt_us(p99)
        );
        last_accepted = accepted;
        if tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
    if tty && !quiet {
        eprintln!();
    }
    // The last point: short runs end before the first 100 ms sample.
    samples.push((start.elapsed().as_secs_f64(), progress.accepted.load(Ordering::Relaxed)));
    samples
}

/// Formats microseconds for people.
pub fn fmt_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else if us >= 1_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

/// The quantiles every report shows.
pub const QUANTILES: [(&str, f64); 4] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];

/// The [`QUANTILES`], the maximum and the count of `h` as a JSON object (`p50_us`, ...).
pub fn percentiles_json(h: &Histogram<u64>) -> Value {
    let mut m = serde_json::Map::new();
    for (name, q) in QUANTILES {
        m.insert(format!("{name}_us"), json!(if h.is_empty() { 0 } else { h.value_at_quantile(q) }));
    }
    m.insert("max_us".into(), json!(h.max()));
    m.insert("count".into(), json!(h.len()));
    Value::Object(m)
}

/// The [`QUANTILES`] and the maximum of `h` on one line for people.
pub fn percentiles_text(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "(none)".into();
    }
    let mut s = String::new();
    for (name, q) in QUANTILES {
        s.push_str(&format!("{name} {}  ", fmt_us(h.value_at_quantile(q))));
    }
    s.push_str(&format!("max {}", fmt_us(h.max())));
    s
}

/// The final report of `send` as one JSON object.
pub fn send_json(st: &Stats, elapsed: Duration, target: &str, throughput: &[(f64, u64)]) -> Value {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let codes: serde_json::Map<String, Value> =
        st.codes.iter().enumerate().filter(|(_, &n)| n > 0).map(|(c, &n)| (c.to_string(), json!(n))).collect();
    json!({
        "target": target,
        "elapsed_s": secs,
        "sent": st.sent,
        "accepted": st.accepted,
        "tempfailed": st.tempfailed,
        "rejected": st.rejected,
        "errors": st.errors,
        "rcpts_accepted": st.rcpts_accepted,
        "rcpts_refused": st.rcpt_refused,
        "bytes_accepted": st.bytes_accepted,
        "connections": st.connections,
        "connect_errors": st.connect_errors,
        "session_errors": st.session_errors,
        "tls_sessions": st.tls_sessions,
        "last_error": st.last_error,
        "codes": codes,
        "msgs_per_s": st.accepted as f64 / secs,
        "cpu_us_per_msg": if st.sent > 0 { st.cpu_ns as f64 / 1e3 / st.sent as f64 } else { 0.0 },
        "cpu_s": st.cpu_ns as f64 / 1e9,
        "latency_end_of_data": percentiles_json(&st.eod),
        "latency_transaction": percentiles_json(&st.txn),
        "latency_handshake": percentiles_json(&st.handshake),
        "throughput": throughput.iter().map(|(t, n)| json!([t, n])).collect::<Vec<_>>(),
    })
}

/// The final report of `send` for people.
pub fn send_text(st: &Stats, elapsed: Duration, target: &str) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut codes = String::new();
    for (c, &n) in st.codes.iter().enumerate().filter(|(_, &n)| n > 0) {
        codes.push_str(&format!("{c}: {n}  "));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "target {target}: {} sent, {} accepted, {} tempfailed, {} rejected, {} lost in {:.3}s",
        st.sent, st.accepted, st.tempfailed, st.rejected, st.errors, secs
    );
    let _ = writeln!(out, "final replies: {}", if codes.is_empty() { "(none)".into() } else { codes });
    let _ = writeln!(
        out,
        "rate {:.0} msg/s, {:.1} MB/s, sender CPU {:.2} µs/msg; connections {} (failed {})",
        st.accepted as f64 / secs,
        st.bytes_accepted as f64 / secs / 1e6,
        if st.sent > 0 { st.cpu_ns as f64 / 1e3 / st.sent as f64 } else { 0.0 },
        st.connections,
        st.connect_errors
    );
    if st.tls_sessions > 0 || st.session_errors > 0 {
        let _ = writeln!(out, "TLS sessions {}, session setup failures {}", st.tls_sessions, st.session_errors);
    }
    if st.session_errors > 0 || st.connect_errors > 0 {
        let _ = writeln!(out, "last error: {}", st.last_error.as_deref().unwrap_or("(none)"));
    }
    let _ = writeln!(out, "latency end-of-data -> reply: {}", percentiles_text(&st.eod));
    let _ = write!(out, "latency transaction:          {}", percentiles_text(&st.txn));
    if !st.handshake.is_empty() {
        let _ = write!(out, "\nlatency TLS handshake:        {}", percentiles_text(&st.handshake));
    }
    out
}

/// Flushes stdout after printing a report (the process may exit right after).
pub fn print_stdout(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}");
    let _ = o.flush();
}
