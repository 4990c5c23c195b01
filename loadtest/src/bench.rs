//! `sluice-load bench`: one command that starts the instruments and the relay on loopback,
//! runs each scenario, and prints one report (text or `--json`).
//!
//! Owns: child processes (this binary's `sink` and `send`, the relay from the same build,
//! Postfix's `smtp-source`/`smtp-sink` with `--compare-postfix`), their CPU time and memory from
//! `/proc`, and the report. Must never: run longer than its bounds (every wait has a deadline),
//! leave a child running (each is stopped by PID, on every path, by [`Proc`]'s `Drop`), listen
//! anywhere but 127.0.0.1, or print a number it did not measure.
//!
//! Scenarios ([`Scenario`]): the sender into the sink (what the instruments can do), the sender
//! into the relay (accept only: spool, then `250`), and — once the relay delivers — end to end
//! (relay with `--dns`/`--relay-host` pointing at the test DNS and sinks); until then that row
//! says so instead of showing a number.

use crate::util::{children_cpu_us, process_cpu_ns, rss_kib};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Flags of `bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Messages per scenario.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Concurrent connections of the sender.
    #[arg(long, default_value_t = 20)]
    connections: usize,
    /// Message size in bytes.
    #[arg(long, default_value = "1024")]
    size: String,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    rcpts: usize,
    /// The relay's --fsync.
    #[arg(long, default_value = "always", value_parser = ["always", "never"])]
    fsync: String,
    /// Sender threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Repeat every scenario N times; the report shows median and range.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Also run Postfix's smtp-source into smtp-sink and into the relay.
    #[arg(long)]
    compare_postfix: bool,
    /// How the relay routes in the end-to-end scenario (`mx` via the test DNS, or `relay-host`).
    #[arg(long, default_value = "mx", value_parser = ["mx", "relay-host"])]
    route: String,
    /// The relay binary (default: `sluice` next to this binary).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Skip the relay scenarios (instruments only).
    #[arg(long)]
    no_relay: bool,
    /// TLS between sender and relay (not yet supported).
    #[arg(long)]
    tls: bool,
    /// Give up on any one scenario after this long.
    #[arg(long, default_value = "300s", value_parser = crate::util::parse_duration)]
    timeout: Duration,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Draw throughput over time and latency percentiles per target into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// One row of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// `sluice-load send` → `sluice-load sink`.
    LoadToSink,
    /// `sluice-load send` → relay (accept and spool only).
    LoadToRelay,
    /// `smtp-source` → `smtp-sink`.
    PostfixToSink,
    /// `smtp-source` → relay (accept only).
    PostfixToRelay,
    /// Sender → relay → DNS + sinks. Needs outbound delivery.
    EndToEnd,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::LoadToSink => "sluice-load send -> sluice-load sink",
            Scenario::LoadToRelay => "sluice-load send -> sluice (accept)",
            Scenario::PostfixToSink => "smtp-source -> smtp-sink",
            Scenario::PostfixToRelay => "smtp-source -> sluice (accept)",
            Scenario::EndToEnd => "end-to-end (send -> sluice -> sink)",
        }
    }
}

/// What one scenario run measured.
#[derive(Debug, Clone, Default)]
struct Measure {
    accepted: u64,
    secs: f64,
    rate: f64,
    /// Sender CPU per message, µs (from the sender's own report, or from its rusage).
    sender_cpu_us: f64,
    /// Receiving side (sink or relay) CPU per message, µs.
    target_cpu_us: f64,
    /// Receiving side peak RSS, KiB.
    target_rss_kib: u64,
    /// (p50, p90, p99, p99.9, max) of end of data → reply, µs; only `sluice-load send` has it.
    latency: Option<[u64; 5]>,
    throughput: Vec<(f64, u64)>,
}

/// A child process that is stopped (by PID) when dropped, with its stderr collected and the
/// `event=listening ... addr=` line it logs passed on.
struct Proc {
    child: Child,
    name: String,
    stderr: Arc<Mutex<String>>,
    stdout: Option<std::thread::JoinHandle<String>>,
    listening: mpsc::Receiver<SocketAddr>,
}

impl Proc {
    fn spawn(mut cmd: Command, name: &str) -> Result<Proc> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        let err = child.stderr.take().context("stderr")?;
        let mut out = child.stdout.take().context("stdout")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log = stderr.clone();
        // Drain stderr for the child's whole life: a full pipe would block it mid-benchmark.
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if line.contains("event=listening") {
                    if let Some(a) = line.split("addr=").nth(1).and_then(|r| r.split_whitespace().next()) {
                        if let Ok(a) = a.parse() {
                            let _ = tx.send(a);
                        }
                    }
                }
                if let Ok(mut l) = log.lock() {
                    if l.len() < 1 << 20 {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            }
        });
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Ok(Proc { child, name: name.to_string(), stderr, stdout: Some(stdout), listening: rx })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_listening(&self, timeout: Duration) -> Result<SocketAddr> {
        self.listening.recv_timeout(timeout).map_err(|_| {
            anyhow::anyhow!("{} did not start listening within {timeout:?}; its log:\n{}", self.name, self.log())
        })
    }

    fn log(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for exit up to `timeout` (polling, bounded); kills it past that. Returns stdout
    /// and whether it exited successfully by itself.
    fn wait(&mut self, timeout: Duration) -> (String, bool) {
        let deadline = Instant::now() + timeout;
        let mut ok = false;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    ok = st.success();
                    break;
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        let out = self.stdout.take().and_then(|h| h.join().ok()).unwrap_or_default();
        (out, ok)
    }

    /// SIGTERM (by PID), then wait up to `grace`, then SIGKILL.
    fn stop(&mut self, grace: Duration) -> String {
        if let Ok(None) = self.child.try_wait() {
            sigterm(self.pid());
        }
        self.wait(grace).0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("sluice-bench-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Bench {
    a: BenchArgs,
    me: PathBuf,
    relay_bin: Option<PathBuf>,
}

/// Runs `bench`. Exit status 1 when a scenario that could run failed.
pub fn run(a: BenchArgs) -> Result<i32> {
    if a.tls {
        eprintln!("sluice-load: --tls is not yet supported (TLS comes with the TLS issue)");
        std::process::exit(2);
    }
    if a.runs == 0 || a.messages == 0 || a.connections == 0 {
        bail!("--runs, --messages and --connections must be at least 1");
    }
    crate::parse_size_spec(&a.size)?;
    let me = std::env::current_exe().context("cannot find this binary")?;
    let relay_bin = if a.no_relay {
        None
    } else {
        let p = a.relay_bin.clone().unwrap_or_else(|| me.with_file_name("sluice"));
        if !p.exists() {
            bail!(
                "relay binary {} not found: build it (cargo build --release --bin sluice), pass --relay-bin, or use --no-relay",
                p.display()
            );
        }
        Some(p)
    };
    let postfix = a.compare_postfix && {
        let found = Path::new("/usr/sbin/smtp-source").exists() && Path::new("/usr/sbin/smtp-sink").exists();
        if !found {
            eprintln!("bench: --compare-postfix: /usr/sbin/smtp-source or smtp-sink not found (apt install postfix)");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                bail!("--compare-postfix needs Postfix's smtp-source and smtp-sink");
            }
        }
        found
    };
    let b = Bench { a, me, relay_bin };
    let mut scenarios = vec![Scenario::LoadToSink];
    if b.relay_bin.is_some() {
        scenarios.push(Scenario::LoadToRelay);
    }
    if postfix {
        scenarios.push(Scenario::PostfixToSink);
        if b.relay_bin.is_some() {
            scenarios.push(Scenario::PostfixToRelay);
        }
    }
    let mut results: Vec<(Scenario, Vec<Measure>)> = scenarios.iter().map(|&s| (s, Vec::new())).collect();
    let mut failed = false;
    for run in 0..b.a.runs {
        for (s, ms) in results.iter_mut() {
            if !b.a.json {
                eprintln!("bench: run {}/{}: {}", run + 1, b.a.runs, s.name());
            }
            match b.scenario(*s) {
                Ok(m) => ms.push(m),
                Err(e) => {
                    eprintln!("bench: {}: {e:#}", s.name());
                    failed = true;
                }
            }
        }
    }
    let report = b.report(&results);
    if b.a.json {
        crate::report::print_stdout(&report.to_string());
    } else {
        crate::report::print_stdout(&b.text(&results));
    }
    if let Some(path) = &b.a.plot {
        std::fs::write(path, plot_svg(&results)).with_context(|| format!("--plot {}", path.display()))?;
    }
    Ok(i32::from(failed))
}

/// Sends SIGTERM to one process (ours, not yet reaped, so the PID cannot have been reused).
fn sigterm(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|u| u.split_whitespace().next() == Some("0")))
        .unwrap_or(false)
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    (med, v[0], v[n - 1])
}

impl Bench {
    fn sink(&self) -> Result<(Proc, SocketAddr)> {
        let mut cmd = Command::new(&self.me);
        cmd.args(["sink", "--listen", "127.0.0.1:0", "--json", "--interval", "0"]);
        let p = Proc::spawn(cmd, "sluice-load sink")?;
        let addr = p.wait_listening(Duration::from_secs(10))?;
        Ok((p, addr))
    }

    fn relay(&self, spool: &Path) -> Result<(Proc, SocketAddr)> {
        let bin = self.relay_bin.as_ref().context("no relay binary")?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--hostname", "bench.sluice.test", "--fsync", &self.a.fsync])
            // Accept-path scenarios: queue, never deliver, never touch the system resolver.
            .args(["--hold", "--dns", "127.0.0.1:1"])
            .arg("--spool")
            .arg(spool);
        let p = Proc::spawn(cmd, "sluice serve")?;
        let addr = p.wait_listening(Duration::from_secs(10))?;
        Ok((p, addr))
    }

    /// Postfix's smtp-sink on a free loopback port (it cannot pick one itself).
    fn smtp_sink(&self) -> Result<(Proc, SocketAddr)> {
        for _ in 0..10 {
            let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let mut cmd = Command::new("/usr/sbin/smtp-sink");
            if is_root() {
                // smtp-sink refuses to run as root without a user to drop privileges to.
                cmd.args(["-u", "nobody"]);
            }
            cmd.arg(addr.to_string()).arg("1000");
            let mut p = Proc::spawn(cmd, "smtp-sink")?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break; // lost the port race: try another
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok((p, addr));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            p.stop(Duration::from_secs(1));
        }
        bail!("smtp-sink did not start")
    }

    /// Runs our sender against `to`; returns its parsed JSON report.
    fn load_send(&self, to: SocketAddr) -> Result<Value> {
        let mut cmd = Command::new(&self.me);
        cmd.args(["send", "--to", &to.to_string(), "--json", "--quiet"])
            .args(["--connections", &self.a.connections.to_string()])
            .args(["--messages", &self.a.messages.to_string()])
            .args(["--size", &self.a.size])
            .args(["--rcpts", &self.a.rcpts.to_string()])
            .args(["--threads", &self.a.threads.to_string()]);
        let mut p = Proc::spawn(cmd, "sluice-load send")?;
        let (out, ok) = p.wait(self.a.timeout);
        let v: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("sluice-load send gave no report; its log:\n{}", p.log()))?;
        if !ok {
            bail!("sluice-load send failed: {}", p.log().trim());
        }
        Ok(v)
    }

    /// Runs smtp-source against `to`: (wall seconds, CPU µs of smtp-source).
    fn postfix_send(&self, to: SocketAddr) -> Result<(f64, u64)> {
        let size = crate::parse_size_spec(&self.a.size)?[0].0;
        let mut cmd = Command::new("/usr/sbin/smtp-source");
        cmd.args(["-s", &self.a.connections.to_string(), "-m", &self.a.messages.to_string()])
            .args(["-l", &size.to_string(), "-r", &self.a.rcpts.to_string(), "-d"])
            .args(["-f", "load@sluice-load.test", "-t", "user@example.test"])
            .arg(to.to_string());
        let cpu0 = children_cpu_us();
        let t0 = Instant::now();
        let mut p = Proc::spawn(cmd, "smtp-source")?;
        let (_, ok) = p.wait(self.a.timeout);
        let secs = t0.elapsed().as_secs_f64();
        let cpu = children_cpu_us() - cpu0;
        if !ok {
            bail!("smtp-source failed: {}", p.log().trim());
        }
        Ok((secs, cpu))
    }

    fn scenario(&self, s: Scenario) -> Result<Measure> {
        let n = self.a.messages as f64;
        match s {
            Scenario::LoadToSink | Scenario::LoadToRelay => {
                let spool = TempDir::new("spool")?;
                let (mut target, addr) =
                    if s == Scenario::LoadToSink { self.sink()? } else { self.relay(&spool.0.join("spool"))? };
                let cpu0 = process_cpu_ns(target.pid());
                let v = self.load_send(addr)?;
                let cpu = process_cpu_ns(target.pid()) - cpu0;
                let (_, hwm) = rss_kib(target.pid());
                let summary = target.stop(Duration::from_secs(10));
                let accepted = v["accepted"].as_u64().unwrap_or(0);
                if accepted != self.a.messages {
                    bail!("{} of {} messages accepted (report: {v})", accepted, self.a.messages);
                }
                if s == Scenario::LoadToSink {
                    // Cross-check: the sink counted exactly what the sender says was accepted.
                    let sv: Value = serde_json::from_str(summary.trim()).unwrap_or(Value::Null);
                    if sv["messages"].as_u64() != Some(accepted) {
                        bail!("sink counted {} messages, sender {accepted}", sv["messages"]);
                    }
                }
                let lat = &v["latency_end_of_data"];
                let q = |k: &str| lat[k].as_u64().unwrap_or(0);
                Ok(Measure {
                    accepted,
                    secs: v["elapsed_s"].as_f64().unwrap_or(0.0),
                    rate: v["msgs_per_s"].as_f64().unwrap_or(0.0),
                    sender_cpu_us: v["cpu_us_per_msg"].as_f64().unwrap_or(0.0),
                    target_cpu_us: cpu as f64 / 1e3 / n,
                    target_rss_kib: hwm,
                    latency: Some([q("p50_us"), q("p90_us"), q("p99_us"), q("p99.9_us"), q("max_us")]),
                    throughput: v["throughput"]
                        .as_array()
                        .map(|a| a.iter().map(|p| (p[0].as_f64().unwrap_or(0.0), p[1].as_u64().unwrap_or(0))).collect())
                        .unwrap_or_default(),
                })
            }
            Scenario::PostfixToSink | Scenario::PostfixToRelay => {
                let spool = TempDir::new("spool")?;
                let (mut target, addr) =
                    if s == Scenario::PostfixToSink { self.smtp_sink()? } else { self.relay(&spool.0.join("spool"))? };
                let cpu0 = process_cpu_ns(target.pid());
                let (secs, sender_cpu) = self.postfix_send(addr)?;
                let cpu = process_cpu_ns(target.pid()) - cpu0;
                let (_, hwm) = rss_kib(target.pid());
                target.stop(Duration::from_secs(10));
                Ok(Measure {
                    accepted: self.a.messages,
                    secs,
                    rate: n / secs.max(1e-9),
                    sender_cpu_us: sender_cpu as f64 / n,
                    target_cpu_us: cpu as f64 / 1e3 / n,
                    target_rss_kib: hwm,
                    latency: None,
                    throughput: Vec::new(),
                })
            }
            Scenario::EndToEnd => bail!("end-to-end: not available until the relay delivers"),
        }
    }

    fn report(&self, results: &[(Scenario, Vec<Measure>)]) -> Value {
        let rows: Vec<Value> = results
            .iter()
            .map(|(s, ms)| {
                let (rate, lo, hi) = median(ms.iter().map(|m| m.rate).collect());
                let last = ms.last().cloned().unwrap_or_default();
                json!({
                    "scenario": s.name(),
                    "runs": ms.len(),
                    "accepted": last.accepted, "elapsed_s": last.secs,
                    "msgs_per_s": rate, "msgs_per_s_min": lo, "msgs_per_s_max": hi,
                    "sender_cpu_us_per_msg": median(ms.iter().map(|m| m.sender_cpu_us).collect()).0,
                    "target_cpu_us_per_msg": median(ms.iter().map(|m| m.target_cpu_us).collect()).0,
                    "target_peak_rss_kib": last.target_rss_kib,
                    "latency_end_of_data_us": last.latency.map(|l| json!({
                        "p50": l[0], "p90": l[1], "p99": l[2], "p99.9": l[3], "max": l[4]})),
                })
            })
            .collect();
        json!({
            "messages": self.a.messages, "connections": self.a.connections, "size": self.a.size,
            "rcpts": self.a.rcpts, "fsync": self.a.fsync, "route": self.a.route,
            "results": rows,
            "ratios": ratios(results).into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "end_to_end": "not available until the relay delivers",
        })
    }

    fn text(&self, results: &[(Scenario, Vec<Measure>)]) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "bench: {} messages x {} B, {} rcpt(s), {} connections, relay --fsync {}, {} run(s)",
            self.a.messages, self.a.size, self.a.rcpts, self.a.connections, self.a.fsync, self.a.runs
        );
        let _ = writeln!(
            o,
            "{:<40} {:>10} {:>19} {:>10} {:>10} {:>9}  latency eod->reply p50/p99/p99.9",
            "scenario", "msg/s", "range", "send µs/m", "recv µs/m", "recv RSS"
        );
        for (s, ms) in results {
            if ms.is_empty() {
                let _ = writeln!(o, "{:<40} failed (see above)", s.name());
                continue;
            }
            let (rate, lo, hi) = median(ms.iter().map(|m| m.rate).collect());
            let last = &ms[ms.len() - 1];
            let lat = last.latency.map_or("-".to_string(), |l| {
                format!(
                    "{} / {} / {}",
                    crate::report::fmt_us(l[0]),
                    crate::report::fmt_us(l[2]),
                    crate::report::fmt_us(l[3])
                )
            });
            let _ = writeln!(
                o,
                "{:<40} {:>10.0} {:>19} {:>10.2} {:>10.2} {:>7}MB  {}",
                s.name(),
                rate,
                format!("{lo:.0}-{hi:.0}"),
                median(ms.iter().map(|m| m.sender_cpu_us).collect()).0,
                median(ms.iter().map(|m| m.target_cpu_us).collect()).0,
                last.target_rss_kib / 1024,
                lat
            );
        }
        let _ = writeln!(o, "{:<40} not available until the relay delivers", Scenario::EndToEnd.name());
        for (k, v) in ratios(results) {
            let _ = writeln!(o, "{k}: {v:.2}x");
        }
        o.pop();
        o
    }
}

/// The side-by-side ratios the report prints (only for pairs that both ran).
fn ratios(results: &[(Scenario, Vec<Measure>)]) -> Vec<(&'static str, f64)> {
    let get = |s: Scenario, f: fn(&Measure) -> f64| {
        results.iter().find(|(x, ms)| *x == s && !ms.is_empty()).map(|(_, ms)| median(ms.iter().map(f).collect()).0)
    };
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (get(Scenario::LoadToSink, |m| m.rate), get(Scenario::PostfixToSink, |m| m.rate)) {
        out.push(("instrument rate, sluice-load / smtp-source+smtp-sink", a / b));
    }
    if let (Some(a), Some(b)) =
        (get(Scenario::LoadToSink, |m| m.sender_cpu_us), get(Scenario::PostfixToSink, |m| m.sender_cpu_us))
    {
        if a > 0.0 {
            out.push(("sender CPU per message, smtp-source / sluice-load", b / a));
        }
    }
    if let (Some(a), Some(b)) = (get(Scenario::LoadToRelay, |m| m.rate), get(Scenario::PostfixToRelay, |m| m.rate)) {
        out.push(("relay accept rate, driven by sluice-load / by smtp-source", a / b));
    }
    out
}

/// A small hand-drawn SVG: throughput per second over time (left) and end-of-data latency
/// percentiles on a log scale (right), one colour per scenario that has the data.
fn plot_svg(results: &[(Scenario, Vec<Measure>)]) -> String {
    const COLORS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    let (w, h, pad) = (420.0, 260.0, 40.0);
    let mut s = String::from(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"320\" font-family=\"sans-serif\" font-size=\"11\">\n",
    );
    let _ = writeln!(s, "<text x=\"{pad}\" y=\"20\">throughput (msg/s) over time (s)</text>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"20\">end-of-data latency (µs, log) at p50 p90 p99 p99.9 max</text>",
        w + 2.0 * pad
    );
    let series: Vec<(usize, Vec<(f64, f64)>)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, (_, ms))| {
            let m = ms.last()?;
            let mut pts = Vec::new();
            let (mut pt, mut pn) = (0.0, 0u64);
            for &(t, n) in &m.throughput {
                if t > pt {
                    pts.push((t, (n.saturating_sub(pn)) as f64 / (t - pt)));
                }
                (pt, pn) = (t, n);
            }
            (!pts.is_empty()).then_some((i, pts))
        })
        .collect();
    let tmax = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).fold(1.0, f64::max);
    let rmax = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)).fold(1.0, f64::max);
    for (i, pts) in &series {
        let poly: Vec<String> =
            pts.iter().map(|(t, r)| format!("{:.1},{:.1}", pad + t / tmax * w, 30.0 + h - r / rmax * h)).collect();
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{}\" points=\"{}\"/>", COLORS[i % 5], poly.join(" "));
    }
    let _ = writeln!(s, "<text x=\"{pad}\" y=\"{}\">max {rmax:.0}/s, {tmax:.0}s</text>", h + 45.0);
    let x0 = w + 2.0 * pad;
    for (i, (sc, ms)) in results.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{x0}\" y=\"{}\" fill=\"{}\">{}</text>",
            300.0 - 12.0 * i as f64,
            COLORS[i % 5],
            sc.name()
        );
        let Some(l) = ms.last().and_then(|m| m.latency) else { continue };
        let y = |us: u64| 30.0 + h - ((us.max(1) as f64).log10() / 7.0) * h;
        let poly: Vec<String> =
            l.iter().enumerate().map(|(k, &v)| format!("{:.1},{:.1}", x0 + k as f64 * 90.0, y(v))).collect();
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{}\" points=\"{}\"/>", COLORS[i % 5], poly.join(" "));
    }
    s.push_str("</svg>\n");
    s
}
