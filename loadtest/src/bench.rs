//! `sluice-load bench`: one command that starts the instruments and the relay on loopback,
//! runs each scenario, and prints one report (text or `--json`).
//!
//! Owns: child processes (this binary's `sink`, `dns` and `send`, the relay from the same
//! build, Postfix's `smtp-source`/`smtp-sink` and a throw-away Postfix instance with
//! `--compare-postfix`, see [`postfix`]), their CPU time and memory from `/proc`, and the
//! report. Must never: run longer than its bounds (every wait has a deadline), leave a child
//! running (each is stopped by PID, on every path, by [`Proc`]'s and [`postfix::Postfix`]'s
//! `Drop`), listen anywhere but loopback (127.0.0.1, and 127.0.0.2.. for the MX sinks), let a
//! relay use the system resolver (always `--dns` at our own server or a dead port), or print a
//! number it did not measure.
//!
//! Scenarios ([`Scenario`]): the sender into the sink (what the instruments can do), the sender
//! into the relay (accept only: `--hold`, spool, then `250`), and end to end: sender → relay →
//! sink, by `--route relay-host` (`--relay-host 127.0.0.1:SINK`) or `--route mx` (our `dns`
//! serves d1..dN.bench.test with MX hosts 127.0.0.2.., where one sink process listens on one
//! shared port; the relay gets `--dns` and `--smtp-port`), and the same through Postfix.
//!
//! TLS: with `--tls` every run of our sender uses STARTTLS (the relay gets a certificate
//! generated with rcgen into a temporary directory, our sinks `--starttls`); `--compare-tls`
//! runs the accept scenarios both ways in one bench and reports STARTTLS / plaintext against
//! the SLA ([`TLS_SLA`]: STARTTLS accept rate at least half the plaintext one, with many
//! messages per connection, which is what the sender does unless told otherwise).
//!
//! End-to-end timing: the clock starts when the sender is spawned and stops when the sink logs
//! `event=expected` (it was started with `--expect-recipients messages×rcpts`, and logs the
//! line from the code path that counts the last recipient), so neither side polls. Relay CPU is
//! `utime+stime` from `/proc/PID/stat` (the whole process, all threads, exited ones included),
//! sampled before the sender starts and when the sink has everything.

pub mod postfix;

use crate::report::fmt_us;
use crate::util::{children_cpu_us, proc_stat, process_cpu_ns, rss_kib};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
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
    /// How the relay routes in the end-to-end scenario: `mx` (via the test DNS to N sinks) or
    /// `relay-host` (one sink); `mx,relay-host` runs both.
    #[arg(long, default_value = "mx", value_delimiter = ',', value_parser = ["mx", "relay-host"])]
    route: Vec<String>,
    /// Recipient domains of the end-to-end runs (d1.bench.test..dN), one MX host each.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=200))]
    mx_domains: u8,
    /// Skip the end-to-end scenarios.
    #[arg(long)]
    no_end_to_end: bool,
    /// The end-to-end sink does not offer CHUNKING: the relay sends by DATA (as to most MTAs).
    #[arg(long)]
    sink_no_chunking: bool,
    /// The relay binary (default: `sluice` next to this binary).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Skip the relay scenarios (instruments only).
    #[arg(long)]
    no_relay: bool,
    /// STARTTLS between our sender and its target (sink or relay; the relay gets a generated
    /// certificate), and our end-to-end sink offers it to the relay.
    #[arg(long, conflicts_with = "compare_postfix")]
    tls: bool,
    /// Run the accept scenarios (sender -> sink, sender -> relay) both plaintext and with
    /// STARTTLS, and report the ratio against the SLA.
    #[arg(long)]
    compare_tls: bool,
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

/// The SLA of `--compare-tls`: the relay's accept rate with STARTTLS over plaintext.
pub const TLS_SLA: f64 = 0.5;

/// How our sender talks to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Plain,
    /// `send --starttls`; the target has a certificate.
    StartTls,
}

/// One row of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// `sluice-load send` → `sluice-load sink`.
    LoadToSink(Wire),
    /// `sluice-load send` → relay (accept and spool only).
    LoadToRelay(Wire),
    /// `smtp-source` → `smtp-sink`.
    PostfixToSink,
    /// `smtp-source` → relay (accept only).
    PostfixToRelay,
    /// `sluice-load send` → sluice → `sluice-load sink`, delivering by the route.
    EndToEnd(Route, Wire),
    /// `sluice-load send` → Postfix (`relayhost`) → `sluice-load sink`.
    PostfixEndToEnd,
}

/// How the relay finds the sink in an end-to-end run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `--relay-host 127.0.0.1:PORT`.
    RelayHost,
    /// MX lookup at our `dns`, one MX host (127.0.0.2..) per recipient domain.
    Mx,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::LoadToSink(Wire::Plain) => "sluice-load send -> sluice-load sink",
            Scenario::LoadToSink(Wire::StartTls) => "sluice-load send -> sink (STARTTLS)",
            Scenario::LoadToRelay(Wire::Plain) => "sluice-load send -> sluice (accept)",
            Scenario::LoadToRelay(Wire::StartTls) => "sluice-load send -> sluice (STARTTLS)",
            Scenario::PostfixToSink => "smtp-source -> smtp-sink",
            Scenario::PostfixToRelay => "smtp-source -> sluice (accept)",
            Scenario::EndToEnd(Route::RelayHost, Wire::Plain) => "send -> sluice (relay-host) -> sink",
            Scenario::EndToEnd(Route::Mx, Wire::Plain) => "send -> sluice (mx) -> sinks",
            Scenario::EndToEnd(Route::RelayHost, Wire::StartTls) => "send -> sluice (relay-host, TLS) -> sink",
            Scenario::EndToEnd(Route::Mx, Wire::StartTls) => "send -> sluice (mx, TLS) -> sinks",
            Scenario::PostfixEndToEnd => "send -> Postfix (relayhost) -> sink",
        }
    }

    fn end_to_end(self) -> bool {
        matches!(self, Scenario::EndToEnd(..) | Scenario::PostfixEndToEnd)
    }

    /// How our sender talks in this scenario (`None`: smtp-source drives it).
    fn wire(self) -> Option<Wire> {
        match self {
            Scenario::LoadToSink(w) | Scenario::LoadToRelay(w) | Scenario::EndToEnd(_, w) => Some(w),
            Scenario::PostfixEndToEnd => Some(Wire::Plain),
            Scenario::PostfixToSink | Scenario::PostfixToRelay => None,
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
    /// (p50, p99) of the sender's TLS handshakes, µs, when it used TLS.
    handshake: Option<[u64; 2]>,
    throughput: Vec<(f64, u64)>,
    /// End to end only: the sender's own rate (accept msg/s), while `rate` is end to end.
    accept_rate: f64,
    /// End to end only: (p50, p90, p99, max) of arrival → delivered per recipient, ms, from
    /// the relay's log (`delay_ms` of sluice, `delay=` of Postfix).
    delivery_ms: Option<[u64; 4]>,
    /// End to end only: delivery attempts that were deferred (4xx or connection trouble).
    deferred: u64,
    /// End to end, sluice only: what `sluice queue stats` still counts once the sink has all.
    queued_after: Option<u64>,
}

/// What a relay's `event=delivery` log lines said, tallied as they arrive.
#[derive(Debug, Default)]
struct Deliveries {
    delivered: u64,
    deferred: u64,
    failed: u64,
    /// `delay_ms` of every delivered recipient.
    delays_ms: Vec<u64>,
}

impl Deliveries {
    /// Tallies one `event=delivery ... delay_ms=N attempt=N outcome=X` line. The reply field
    /// before them is quoted free text, so the fields are looked up from the end.
    fn record(&mut self, line: &str) {
        let field = |k: &str| line.rsplit_once(k).and_then(|(_, r)| r.split_whitespace().next());
        match field(" outcome=") {
            Some("delivered") => {
                self.delivered += 1;
                if let Some(d) = field(" delay_ms=").and_then(|d| d.parse().ok()) {
                    self.delays_ms.push(d);
                }
            }
            Some("deferred") => self.deferred += 1,
            Some("failed") => self.failed += 1,
            _ => {}
        }
    }
}

/// A child process that is stopped (by PID) when dropped, with its stderr collected and the
/// `event=listening ... addr=` line it logs passed on.
struct Proc {
    child: Child,
    name: String,
    stderr: Arc<Mutex<String>>,
    stdout: Option<std::thread::JoinHandle<String>>,
    listening: mpsc::Receiver<SocketAddr>,
    /// When each `event=expected` line (the sink's "all recipients are here") was read.
    expected: mpsc::Receiver<Instant>,
    /// The relay's delivery lines, tallied (they are not copied into `stderr`).
    deliveries: Arc<Mutex<Deliveries>>,
}

impl Proc {
    fn spawn(mut cmd: Command, name: &str) -> Result<Proc> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        let err = child.stderr.take().context("stderr")?;
        let mut out = child.stdout.take().context("stdout")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let (etx, erx) = mpsc::channel();
        let deliveries = Arc::new(Mutex::new(Deliveries::default()));
        let log = stderr.clone();
        let dl = deliveries.clone();
        // Drain stderr for the child's whole life: a full pipe would block it mid-benchmark.
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if line.contains("event=expected") {
                    let _ = etx.send(Instant::now());
                }
                if line.contains("event=delivery") {
                    if let Ok(mut d) = dl.lock() {
                        d.record(&line);
                    }
                    // One line per recipient: keep the log for what went wrong.
                    if line.contains("outcome=delivered") {
                        continue;
                    }
                }
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
        Ok(Proc {
            child,
            name: name.to_string(),
            stderr,
            stdout: Some(stdout),
            listening: rx,
            expected: erx,
            deliveries,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_listening(&self, timeout: Duration) -> Result<SocketAddr> {
        self.listening.recv_timeout(timeout).map_err(|_| {
            anyhow::anyhow!("{} did not start listening within {timeout:?}; its log:\n{}", self.name, self.log())
        })
    }

    /// Waits for `n` listening lines (a sink with several `--listen`); bounded by `timeout`.
    fn wait_listening_n(&self, n: usize, timeout: Duration) -> Result<Vec<SocketAddr>> {
        let deadline = Instant::now() + timeout;
        (0..n).map(|_| self.wait_listening(deadline.saturating_duration_since(Instant::now()))).collect()
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
    /// The relay's generated `--tls-cert`, `--tls-key` (and the directory holding them).
    cert: Option<(TempDir, PathBuf, PathBuf)>,
}

/// Runs `bench`. Exit status 1 when a scenario that could run failed.
pub fn run(a: BenchArgs) -> Result<i32> {
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
        let found =
            ["/usr/sbin/smtp-source", "/usr/sbin/smtp-sink", postfix::POSTFIX].iter().all(|p| Path::new(p).exists());
        if !found {
            eprintln!(
                "bench: --compare-postfix: /usr/sbin/postfix, smtp-source or smtp-sink not found (apt install postfix)"
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                bail!("--compare-postfix needs Postfix (postfix, smtp-source and smtp-sink)");
            }
        }
        found
    };
    let mut routes: Vec<Route> = a.route.iter().map(|r| if r == "mx" { Route::Mx } else { Route::RelayHost }).collect();
    routes.dedup();
    let cert = if (a.tls || a.compare_tls) && relay_bin.is_some() {
        let dir = TempDir::new("cert")?;
        let (cert, key) = crate::tls::write_self_signed(&dir.0, &["bench.sluice.test"])?;
        Some((dir, cert, key))
    } else {
        None
    };
    let b = Bench { a, me, relay_bin, cert };
    let e2e = b.relay_bin.is_some() && !b.a.no_end_to_end;
    let main = if b.a.tls { Wire::StartTls } else { Wire::Plain };
    let accept_wires = if b.a.compare_tls { vec![Wire::Plain, Wire::StartTls] } else { vec![main] };
    let mut scenarios: Vec<Scenario> = accept_wires.iter().map(|&w| Scenario::LoadToSink(w)).collect();
    if b.relay_bin.is_some() {
        scenarios.extend(accept_wires.iter().map(|&w| Scenario::LoadToRelay(w)));
    }
    if e2e {
        scenarios.extend(routes.iter().map(|&r| Scenario::EndToEnd(r, main)));
    }
    if postfix {
        scenarios.push(Scenario::PostfixToSink);
        if b.relay_bin.is_some() {
            scenarios.push(Scenario::PostfixToRelay);
        }
        if e2e {
            scenarios.push(Scenario::PostfixEndToEnd);
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
    fn sink(&self, wire: Wire) -> Result<(Proc, SocketAddr)> {
        let mut cmd = Command::new(&self.me);
        cmd.args(["sink", "--listen", "127.0.0.1:0", "--json", "--interval", "0"]);
        if wire == Wire::StartTls {
            cmd.arg("--starttls");
        }
        let p = Proc::spawn(cmd, "sluice-load sink")?;
        let addr = p.wait_listening(Duration::from_secs(10))?;
        Ok((p, addr))
    }

    /// The relay on a free port with a fresh spool. `deliver`: `None` for the accept-path
    /// scenarios (`--hold`, and a dead DNS port so that nothing can reach the system resolver),
    /// otherwise the routing flags of an end-to-end run. With `Wire::StartTls` it gets the
    /// generated certificate (and offers STARTTLS).
    fn relay(&self, spool: &Path, deliver: Option<&[String]>, wire: Wire) -> Result<(Proc, SocketAddr)> {
        let bin = self.relay_bin.as_ref().context("no relay binary")?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--hostname", "bench.sluice.test", "--fsync", &self.a.fsync])
            .arg("--spool")
            .arg(spool);
        if wire == Wire::StartTls {
            let (_, cert, key) = self.cert.as_ref().context("no generated certificate")?;
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        match deliver {
            None => cmd.args(["--hold", "--dns", "127.0.0.1:1"]),
            // A deferral should not happen against our sink; if one does, a retry within the
            // run's bounds beats waiting out the default first retry of a minute.
            Some(route) => cmd.args(route).args(["--retry-schedule", "1s"]),
        };
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

    /// Runs our sender against `to` (recipients spread over `domains`, if given); returns its
    /// parsed JSON report.
    fn load_send(&self, to: SocketAddr, domains: Option<&str>, wire: Wire) -> Result<Value> {
        let mut cmd = Command::new(&self.me);
        if wire == Wire::StartTls {
            cmd.arg("send").arg("--starttls");
        } else {
            cmd.arg("send");
        }
        cmd.args(["--to", &to.to_string(), "--json", "--quiet"])
            .args(["--connections", &self.a.connections.to_string()])
            .args(["--messages", &self.a.messages.to_string()])
            .args(["--size", &self.a.size])
            .args(["--rcpts", &self.a.rcpts.to_string()])
            .args(["--threads", &self.a.threads.to_string()]);
        if let Some(d) = domains {
            cmd.args(["--domains", d]);
        }
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
            Scenario::LoadToSink(wire) | Scenario::LoadToRelay(wire) => {
                let spool = TempDir::new("spool")?;
                let to_sink = matches!(s, Scenario::LoadToSink(_));
                let (mut target, addr) =
                    if to_sink { self.sink(wire)? } else { self.relay(&spool.0.join("spool"), None, wire)? };
                let cpu0 = process_cpu_ns(target.pid());
                let v = self.load_send(addr, None, wire)?;
                let cpu = process_cpu_ns(target.pid()) - cpu0;
                let (_, hwm) = rss_kib(target.pid());
                let summary = target.stop(Duration::from_secs(10));
                let accepted = v["accepted"].as_u64().unwrap_or(0);
                if accepted != self.a.messages {
                    bail!("{} of {} messages accepted (report: {v})", accepted, self.a.messages);
                }
                if to_sink {
                    // Cross-check: the sink counted exactly what the sender says was accepted.
                    let sv: Value = serde_json::from_str(summary.trim()).unwrap_or(Value::Null);
                    if sv["messages"].as_u64() != Some(accepted) {
                        bail!("sink counted {} messages, sender {accepted}", sv["messages"]);
                    }
                    if wire == Wire::StartTls && sv["tls_messages"].as_u64() != Some(accepted) {
                        bail!("sink counted {} messages inside TLS of {accepted}", sv["tls_messages"]);
                    }
                }
                Ok(Measure {
                    accepted,
                    secs: v["elapsed_s"].as_f64().unwrap_or(0.0),
                    rate: v["msgs_per_s"].as_f64().unwrap_or(0.0),
                    sender_cpu_us: v["cpu_us_per_msg"].as_f64().unwrap_or(0.0),
                    target_cpu_us: cpu as f64 / 1e3 / n,
                    target_rss_kib: hwm,
                    latency: Some(send_latency(&v)),
                    handshake: send_handshake(&v),
                    throughput: send_throughput(&v),
                    ..Measure::default()
                })
            }
            Scenario::PostfixToSink | Scenario::PostfixToRelay => {
                let spool = TempDir::new("spool")?;
                let (mut target, addr) = if s == Scenario::PostfixToSink {
                    self.smtp_sink()?
                } else {
                    self.relay(&spool.0.join("spool"), None, Wire::Plain)?
                };
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
                    ..Measure::default()
                })
            }
            Scenario::EndToEnd(route, wire) => self.end_to_end(Some(route), wire),
            Scenario::PostfixEndToEnd => self.end_to_end(None, Wire::Plain),
        }
    }

    /// The end-to-end sink: one `sluice-load sink` that logs `event=expected` once `expected`
    /// recipients are in; returns it and its port. For the MX route it listens on
    /// 127.0.0.2..=127.0.0.(N+1) at one shared port (the relay has one `--smtp-port` for every
    /// MX host). One process serves all N addresses so that the instrument costs the same on
    /// both routes and `mx` vs `relay-host` compares the relay's routing, not the sinks.
    fn e2e_sink(&self, route: Option<Route>, expected: u64, wire: Wire) -> Result<(Proc, u16)> {
        let mx = route == Some(Route::Mx);
        let hosts: Vec<Ipv4Addr> = if mx {
            (0..self.a.mx_domains).map(|i| Ipv4Addr::new(127, 0, 0, 2 + i)).collect()
        } else {
            vec![Ipv4Addr::LOCALHOST]
        };
        let mut last = None;
        for _ in 0..10 {
            // The kernel picks a port that is free on the first address; the others may (rarely)
            // have it taken, then the sink exits and another port is tried.
            let port = if mx { TcpListener::bind((hosts[0], 0))?.local_addr()?.port() } else { 0 };
            let mut cmd = Command::new(&self.me);
            cmd.args(["sink", "--json", "--interval", "0", "--expect-recipients", &expected.to_string()]);
            if wire == Wire::StartTls {
                cmd.arg("--starttls");
            }
            if self.a.sink_no_chunking {
                cmd.arg("--no-chunking");
            }
            for h in &hosts {
                cmd.arg("--listen").arg(SocketAddr::from((*h, port)).to_string());
            }
            let p = Proc::spawn(cmd, "sluice-load sink")?;
            match p.wait_listening_n(hosts.len(), Duration::from_secs(10)) {
                Ok(addrs) => return Ok((p, addrs[0].port())),
                Err(e) if mx => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("sink did not start")))
    }

    /// Our DNS, serving `dK.bench.test` MX `mx.dK.bench.test` A 127.0.0.(K+1).
    fn dns(&self, domains: &[String]) -> Result<(Proc, SocketAddr)> {
        let mut cmd = Command::new(&self.me);
        cmd.args(["dns", "--listen", "127.0.0.1:0"]);
        for (i, d) in domains.iter().enumerate() {
            cmd.arg("--zone").arg(format!("{d}={}", Ipv4Addr::new(127, 0, 0, 2 + i as u8)));
        }
        let p = Proc::spawn(cmd, "sluice-load dns")?;
        let addr = p.wait_listening(Duration::from_secs(10))?;
        Ok((p, addr))
    }

    /// Messages still in the relay's spool (`sluice queue --spool DIR stats --json`).
    fn queued(&self, spool: &Path) -> Option<u64> {
        let out = Command::new(self.relay_bin.as_ref()?)
            .arg("queue")
            .arg("--spool")
            .arg(spool)
            .args(["stats", "--json"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        serde_json::from_slice::<Value>(&out.stdout).ok()?["messages"].as_u64()
    }

    /// One end-to-end run: `sluice-load send` → relay → `sluice-load sink`. The relay is
    /// sluice routing by `route`, or Postfix (relayhost) for `None`. With `Wire::StartTls` the
    /// sender uses STARTTLS into the relay and the sink offers it to the relay.
    fn end_to_end(&self, route: Option<Route>, wire: Wire) -> Result<Measure> {
        let n = self.a.messages as f64;
        let expected = self.a.messages * self.a.rcpts as u64;
        let domains: Vec<String> = (1..=self.a.mx_domains).map(|i| format!("d{i}.bench.test")).collect();
        let (mut sink, port) = self.e2e_sink(route, expected, wire)?;
        let sink_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let spool_dir = TempDir::new("spool")?;
        let spool = spool_dir.0.join("spool");
        let mut dns = None;
        let (mut relay, mut pf, addr) = match route {
            Some(Route::RelayHost) => {
                // --dns at a dead port: a relay host given as an IP needs no resolver, and this
                // makes sure the system one is never asked.
                let flags = ["--relay-host", &sink_addr.to_string(), "--dns", "127.0.0.1:1"].map(String::from);
                let (p, a) = self.relay(&spool, Some(&flags), wire)?;
                (Some(p), None, a)
            }
            Some(Route::Mx) => {
                let (d, dns_addr) = self.dns(&domains)?;
                dns = Some(d);
                let flags = ["--dns", &dns_addr.to_string(), "--smtp-port", &port.to_string()].map(String::from);
                let (p, a) = self.relay(&spool, Some(&flags), wire)?;
                (Some(p), None, a)
            }
            None => {
                let pf =
                    postfix::Postfix::start(sink_addr, &[]).context("cannot run Postfix from a temporary directory")?;
                let a = pf.addr;
                (None, Some(pf), a)
            }
        };
        let cpu = |relay: &Option<Proc>, pf: &Option<postfix::Postfix>| match (relay, pf) {
            (Some(r), _) => proc_stat(r.pid()).map_or(0, |s| s.cpu_us),
            (None, Some(p)) => p.cpu_us(),
            (None, None) => 0,
        };
        let cpu0 = cpu(&relay, &pf);
        let t0 = Instant::now();
        let v = self.load_send(addr, Some(&domains.join(",")), wire)?;
        let accepted = v["accepted"].as_u64().unwrap_or(0);
        if accepted != self.a.messages {
            bail!("{} of {} messages accepted (report: {v})", accepted, self.a.messages);
        }
        let done = sink.expected.recv_timeout(self.a.timeout.saturating_sub(t0.elapsed()));
        let why = |relay: &Option<Proc>, pf: &Option<postfix::Postfix>| match (relay, pf) {
            (Some(r), _) => {
                let d = r.deliveries.lock().map(|d| (d.delivered, d.deferred, d.failed)).unwrap_or_default();
                format!("relay delivered {}, deferred {}, failed {}; its log:\n{}", d.0, d.1, d.2, r.log())
            }
            (None, Some(p)) => format!("Postfix's log:\n{}", p.maillog_tail()),
            (None, None) => String::new(),
        };
        let Ok(t1) = done else {
            let summary = sink.stop(Duration::from_secs(5));
            bail!(
                "the sink did not get all {expected} recipients within {:?} (its summary: {}); {}",
                self.a.timeout,
                summary.trim(),
                why(&relay, &pf)
            );
        };
        let secs = (t1 - t0).as_secs_f64();
        // The relay's bookkeeping after the last delivery (outcome records, queue file removal)
        // is part of relaying: wait (bounded) until its queue is empty, then take the CPU sample.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut queued_after;
        loop {
            queued_after = match &pf {
                Some(p) => Some(p.queued()),
                None => self.queued(&spool),
            };
            if queued_after == Some(0) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let cpu1 = cpu(&relay, &pf);
        let (rss, delays, deferred) = match (&relay, &pf) {
            (Some(r), _) => {
                let d = r.deliveries.lock().map(|d| (d.delays_ms.clone(), d.deferred)).unwrap_or_default();
                (rss_kib(r.pid()).1, d.0, d.1)
            }
            (None, Some(p)) => (p.rss_kib(), p.delivery_delays_ms(), p.deferred()),
            (None, None) => (0, Vec::new(), 0),
        };
        if let Some(r) = relay.as_mut() {
            r.stop(Duration::from_secs(10));
        }
        if let Some(p) = pf.as_mut() {
            p.stop();
        }
        if let Some(d) = dns.as_mut() {
            d.stop(Duration::from_secs(2));
        }
        let summary = sink.stop(Duration::from_secs(10));
        // Cross-check: the sink's own count, not just its "expected" line.
        let sv: Value = serde_json::from_str(summary.trim()).unwrap_or(Value::Null);
        let got = sv["recipients"].as_u64().unwrap_or(0);
        if got < expected {
            bail!("sink counted {got} of {expected} recipients (summary: {})", summary.trim());
        }
        Ok(Measure {
            accepted,
            secs,
            rate: n / secs.max(1e-9),
            sender_cpu_us: v["cpu_us_per_msg"].as_f64().unwrap_or(0.0),
            target_cpu_us: cpu1.saturating_sub(cpu0) as f64 / n,
            target_rss_kib: rss,
            latency: Some(send_latency(&v)),
            handshake: send_handshake(&v),
            throughput: send_throughput(&v),
            accept_rate: v["msgs_per_s"].as_f64().unwrap_or(0.0),
            delivery_ms: percentiles(delays),
            deferred,
            queued_after,
        })
    }

    /// The wire of the scenarios that run once (end to end, and accept without --compare-tls).
    fn main_wire(&self) -> Wire {
        if self.a.tls {
            Wire::StartTls
        } else {
            Wire::Plain
        }
    }

    fn report(&self, results: &[(Scenario, Vec<Measure>)]) -> Value {
        let rows: Vec<Value> = results
            .iter()
            .map(|(s, ms)| {
                let (rate, lo, hi) = median(ms.iter().map(|m| m.rate).collect());
                let last = ms.last().cloned().unwrap_or_default();
                let mut row = json!({
                    "scenario": s.name(),
                    "runs": ms.len(),
                    "accepted": last.accepted, "elapsed_s": last.secs,
                    "msgs_per_s": rate, "msgs_per_s_min": lo, "msgs_per_s_max": hi,
                    "sender_cpu_us_per_msg": median(ms.iter().map(|m| m.sender_cpu_us).collect()).0,
                    "target_cpu_us_per_msg": median(ms.iter().map(|m| m.target_cpu_us).collect()).0,
                    "target_peak_rss_kib": last.target_rss_kib,
                    "latency_end_of_data_us": median_each(ms, |m| m.latency).map(|l| json!({
                        "p50": l[0], "p90": l[1], "p99": l[2], "p99.9": l[3], "max": l[4]})),
                    "tls": s.wire() == Some(Wire::StartTls),
                    "latency_handshake_us": median_each(ms, |m| m.handshake).map(|h| json!({"p50": h[0], "p99": h[1]})),
                });
                if s.end_to_end() {
                    let (relay, route) = match s {
                        Scenario::EndToEnd(Route::Mx, _) => ("sluice", "mx"),
                        Scenario::EndToEnd(Route::RelayHost, _) => ("sluice", "relay-host"),
                        _ => ("postfix", "relay-host"),
                    };
                    let extra = json!({
                        "end_to_end": true, "relay": relay, "route": route,
                        "accept_msgs_per_s": median(ms.iter().map(|m| m.accept_rate).collect()).0,
                        "delivery_delay_ms": median_each(ms, |m| m.delivery_ms).map(|d| json!({
                            "p50": d[0], "p90": d[1], "p99": d[2], "max": d[3]})),
                        "deferred": ms.iter().map(|m| m.deferred).sum::<u64>(),
                        "queued_after": last.queued_after,
                    });
                    if let (Some(r), Value::Object(e)) = (row.as_object_mut(), extra) {
                        r.extend(e);
                    }
                }
                row
            })
            .collect();
        json!({
            "messages": self.a.messages, "connections": self.a.connections, "size": self.a.size,
            "rcpts": self.a.rcpts, "fsync": self.a.fsync, "route": self.a.route, "mx_domains": self.a.mx_domains,
            "tls": self.a.tls, "compare_tls": self.a.compare_tls,
            "results": rows,
            "ratios": ratios(results, self.main_wire()).into_iter().map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<_, _>>(),
            "tls_sla": tls_sla(results).map(|r| json!({"ratio": r, "min": TLS_SLA, "met": r >= TLS_SLA})),
        })
    }

    fn text(&self, results: &[(Scenario, Vec<Measure>)]) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "bench: {} messages x {} B, {} rcpt(s), {} connections, relay --fsync {}, {} run(s){}",
            self.a.messages,
            self.a.size,
            self.a.rcpts,
            self.a.connections,
            self.a.fsync,
            self.a.runs,
            match (self.a.tls, self.a.compare_tls) {
                (true, _) => ", STARTTLS",
                (false, true) => ", accept plaintext and STARTTLS",
                (false, false) => "",
            }
        );
        let _ = writeln!(
            o,
            "{:<40} {:>10} {:>19} {:>10} {:>10} {:>9}  latency eod->reply p50/p99/p99.9",
            "scenario", "msg/s", "range", "send µs/m", "recv µs/m", "recv RSS"
        );
        let failed = |o: &mut String, s: &Scenario| {
            let _ = writeln!(o, "{:<40} failed (see above)", s.name());
        };
        for (s, ms) in results.iter().filter(|(s, _)| !s.end_to_end()) {
            if ms.is_empty() {
                failed(&mut o, s);
                continue;
            }
            let (rate, lo, hi) = median(ms.iter().map(|m| m.rate).collect());
            let mut lat = median_each(ms, |m| m.latency)
                .map_or("-".to_string(), |l| format!("{} / {} / {}", fmt_us(l[0]), fmt_us(l[2]), fmt_us(l[3])));
            if let Some(h) = median_each(ms, |m| m.handshake) {
                let _ = write!(lat, "  (handshake p50/p99 {} / {})", fmt_us(h[0]), fmt_us(h[1]));
            }
            let _ = writeln!(
                o,
                "{:<40} {:>10.0} {:>19} {:>10.2} {:>10.2} {:>7}MB  {}",
                s.name(),
                rate,
                format!("{lo:.0}-{hi:.0}"),
                median(ms.iter().map(|m| m.sender_cpu_us).collect()).0,
                median(ms.iter().map(|m| m.target_cpu_us).collect()).0,
                ms[ms.len() - 1].target_rss_kib / 1024,
                lat
            );
        }
        if results.iter().any(|(s, _)| s.end_to_end()) {
            let _ = writeln!(o, "end to end: msg/s from the first message sent until the sink has every recipient");
            let _ = writeln!(
                o,
                "{:<40} {:>10} {:>15} {:>10} {:>10} {:>9}  {:<17} delivery p50/p99/max",
                "scenario", "e2e msg/s", "range", "accept/s", "relay µs/m", "relay RSS", "accept p50/p99"
            );
        }
        for (s, ms) in results.iter().filter(|(s, _)| s.end_to_end()) {
            if ms.is_empty() {
                failed(&mut o, s);
                continue;
            }
            let (rate, lo, hi) = median(ms.iter().map(|m| m.rate).collect());
            let lat = median_each(ms, |m| m.latency)
                .map_or("-".to_string(), |l| format!("{} / {}", fmt_us(l[0]), fmt_us(l[2])));
            let del = median_each(ms, |m| m.delivery_ms).map_or("-".to_string(), |d| {
                format!("{} / {} / {}", fmt_us(d[0] * 1000), fmt_us(d[2] * 1000), fmt_us(d[3] * 1000))
            });
            let deferred: u64 = ms.iter().map(|m| m.deferred).sum();
            let _ = writeln!(
                o,
                "{:<40} {:>10.0} {:>15} {:>10.0} {:>10.2} {:>7}MB  {:<17} {}{}",
                s.name(),
                rate,
                format!("{lo:.0}-{hi:.0}"),
                median(ms.iter().map(|m| m.accept_rate).collect()).0,
                median(ms.iter().map(|m| m.target_cpu_us).collect()).0,
                ms[ms.len() - 1].target_rss_kib / 1024,
                lat,
                del,
                if deferred > 0 { format!(" ({deferred} deferred attempts)") } else { String::new() }
            );
        }
        for (k, v) in ratios(results, self.main_wire()) {
            let _ = writeln!(o, "{k}: {v:.2}x");
        }
        if let Some(r) = tls_sla(results) {
            let verdict = if r >= TLS_SLA { "met" } else { "MISSED" };
            let _ = writeln!(o, "SLA: STARTTLS accept rate >= {TLS_SLA:.2}x plaintext: {verdict} ({r:.2}x)");
        }
        o.pop();
        o
    }
}

/// Element-wise median over the runs that have the array (latency percentiles).
fn median_each<const N: usize>(ms: &[Measure], f: impl Fn(&Measure) -> Option<[u64; N]>) -> Option<[u64; N]> {
    let all: Vec<[u64; N]> = ms.iter().filter_map(f).collect();
    if all.is_empty() {
        return None;
    }
    Some(std::array::from_fn(|i| median(all.iter().map(|a| a[i] as f64).collect()).0 as u64))
}

/// (p50, p90, p99, max) of `v`, nearest rank; `None` when empty.
fn percentiles(mut v: Vec<u64>) -> Option<[u64; 4]> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Some([at(0.50), at(0.90), at(0.99), v[v.len() - 1]])
}

/// (p50, p90, p99, p99.9, max) of end of data → reply from a `send --json` report, µs.
fn send_latency(v: &Value) -> [u64; 5] {
    let lat = &v["latency_end_of_data"];
    ["p50_us", "p90_us", "p99_us", "p99.9_us", "max_us"].map(|k| lat[k].as_u64().unwrap_or(0))
}

/// (p50, p99) of the TLS handshakes from a `send --json` report, µs; `None` without TLS.
fn send_handshake(v: &Value) -> Option<[u64; 2]> {
    let h = &v["latency_handshake"];
    (h["count"].as_u64().unwrap_or(0) > 0).then(|| ["p50_us", "p99_us"].map(|k| h[k].as_u64().unwrap_or(0)))
}

/// STARTTLS over plaintext accept rate of the relay, when `--compare-tls` ran both.
fn tls_sla(results: &[(Scenario, Vec<Measure>)]) -> Option<f64> {
    let rate = |s: Scenario| {
        results
            .iter()
            .find(|(x, ms)| *x == s && !ms.is_empty())
            .map(|(_, ms)| median(ms.iter().map(|m| m.rate).collect()).0)
    };
    let (tls, plain) = (rate(Scenario::LoadToRelay(Wire::StartTls))?, rate(Scenario::LoadToRelay(Wire::Plain))?);
    (plain > 0.0).then(|| tls / plain)
}

/// (seconds, messages so far) samples from a `send --json` report.
fn send_throughput(v: &Value) -> Vec<(f64, u64)> {
    v["throughput"]
        .as_array()
        .map(|a| a.iter().map(|p| (p[0].as_f64().unwrap_or(0.0), p[1].as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

/// The side-by-side ratios the report prints (only for pairs that both ran).
fn ratios(results: &[(Scenario, Vec<Measure>)], main: Wire) -> Vec<(String, f64)> {
    let get = |s: Scenario, f: fn(&Measure) -> f64| {
        results.iter().find(|(x, ms)| *x == s && !ms.is_empty()).map(|(_, ms)| median(ms.iter().map(f).collect()).0)
    };
    let rate = |m: &Measure| m.rate;
    let cpu = |m: &Measure| m.target_cpu_us;
    let mut out = Vec::new();
    let mut push = |k: &str, v: f64| out.push((k.to_string(), v));
    let (sink_plain, sink_tls) = (Scenario::LoadToSink(Wire::Plain), Scenario::LoadToSink(Wire::StartTls));
    let (relay_plain, relay_tls) = (Scenario::LoadToRelay(Wire::Plain), Scenario::LoadToRelay(Wire::StartTls));
    if let (Some(a), Some(b)) = (get(sink_tls, rate), get(sink_plain, rate)) {
        push("instrument rate, STARTTLS / plaintext", a / b);
    }
    if let (Some(a), Some(b)) = (get(relay_tls, rate), get(relay_plain, rate)) {
        push("relay accept rate, STARTTLS / plaintext", a / b);
    }
    if let (Some(a), Some(b)) = (get(sink_plain, rate), get(Scenario::PostfixToSink, rate)) {
        push("instrument rate, sluice-load / smtp-source+smtp-sink", a / b);
    }
    if let (Some(a), Some(b)) =
        (get(sink_plain, |m| m.sender_cpu_us), get(Scenario::PostfixToSink, |m| m.sender_cpu_us))
    {
        if a > 0.0 {
            push("sender CPU per message, smtp-source / sluice-load", b / a);
        }
    }
    if let (Some(a), Some(b)) = (get(relay_plain, rate), get(Scenario::PostfixToRelay, rate)) {
        push("relay accept rate, driven by sluice-load / by smtp-source", a / b);
    }
    let direct = get(Scenario::LoadToSink(main), rate);
    let rh = get(Scenario::EndToEnd(Route::RelayHost, main), rate);
    let mx = get(Scenario::EndToEnd(Route::Mx, main), rate);
    for (name, e) in [("relay-host", rh), ("mx", mx)] {
        if let (Some(e), Some(d)) = (e, direct) {
            push(&format!("end-to-end rate ({name}) / direct sender->sink rate"), e / d);
        }
    }
    if let (Some(m), Some(r)) = (mx, rh) {
        push("end-to-end rate, mx / relay-host", m / r);
    }
    // Postfix relays by relayhost: compare with the same route when it ran.
    let (route, ours) = if rh.is_some() { (Route::RelayHost, rh) } else { (Route::Mx, mx) };
    let name = if route == Route::Mx { "mx" } else { "relay-host" };
    if let (Some(a), Some(b)) = (ours, get(Scenario::PostfixEndToEnd, rate)) {
        push(&format!("end-to-end rate, sluice ({name}) / Postfix"), a / b);
    }
    if let (Some(a), Some(b)) = (get(Scenario::EndToEnd(route, main), cpu), get(Scenario::PostfixEndToEnd, cpu)) {
        if a > 0.0 {
            push(&format!("relay CPU per message, Postfix / sluice ({name})"), b / a);
        }
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
