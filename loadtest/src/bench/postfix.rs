//! A throw-away Postfix instance for `bench --compare-postfix` and for `sluice-load postfix`
//! (the bench scripts' handle on one, see [`serve`]): Debian's binaries, run from a
//! configuration, queue and log in one temporary directory, relaying everything to one loopback
//! address (`relayhost = [127.0.0.1]:PORT`, no DNS).
//!
//! Owns: that directory (`conf/main.cf`, `conf/master.cf`, `queue/`, `data/`, `maillog`), the
//! master daemon it starts and every process below it. Must never: start, signal or configure the
//! system instance (`/etc/postfix` is only *read*, to copy `postfix-files`, which `postfix check`
//! needs), listen anywhere but 127.0.0.1, wait without a deadline, or outlive the bench: `Drop`
//! runs `postfix -c DIR stop`, then kills by PID whatever of the instance is still alive.
//!
//! CPU accounting ([`Postfix::cpu_us`]): Postfix is a dozen processes that come and go (smtpd per
//! client connection, cleanup, qmgr, trivial-rewrite, smtp per outbound connection, postlogd,
//! scache, anvil), none of which names the configuration directory in its command line; they
//! are all children of the instance's master (whose PID is in `queue/pid/master.pid`). One
//! sample is: the master's `utime+stime` plus `cutime+cstime` (children it has already reaped)
//! plus `utime+stime+cutime+cstime` of every live process below it. A child that exits between
//! two samples moves from "live" to the master's `cutime`, so the difference of two samples is
//! the CPU the whole instance spent in between.

use super::{is_root, TempDir};
use crate::util::{all_procs, descendants, proc_stat, rss_kib};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's `postfix` control command.
pub(super) const POSTFIX: &str = "/usr/sbin/postfix";

/// The services of Debian's `master.cf` that relaying needs, all with `chroot = n` (the
/// temporary queue has no chroot skeleton: no `etc/`, `lib/`, `dev/log` under it).
const MASTER_CF_SERVICES: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// One running instance; stopped and removed on drop.
pub(super) struct Postfix {
    /// The configuration directory (`postfix -c`).
    conf: PathBuf,
    /// The master daemon's PID, once started (`None` again after [`Postfix::stop`]).
    master: Option<u32>,
    /// Where smtpd listens (127.0.0.1, a port that was free).
    pub addr: SocketAddr,
    /// Everything of the instance; removed after `Drop` has stopped it.
    dir: TempDir,
}

impl Postfix {
    /// Creates the directory, writes the configuration (`extra` lines are appended to
    /// `main.cf`, where a later line overrides an earlier one), runs `postfix check` and
    /// `postfix start`, and waits (bounded) until smtpd's port answers. The error says which
    /// step failed and why (not root, no `postfix` user, `postfix check` output, ...).
    pub fn start(relayhost: SocketAddr, extra: &[(String, String)]) -> Result<Postfix> {
        if !Path::new(POSTFIX).exists() {
            bail!("{POSTFIX} not found (apt install postfix)");
        }
        if !is_root() {
            // `postfix start` itself refuses ("the postfix command is reserved for the
            // superuser"): master binds and then runs its daemons as mail_owner.
            bail!("Postfix's master can only be started as root (it runs its daemons as mail_owner=postfix)");
        }
        let uid = passwd_uid("postfix").context("no `postfix` user to be mail_owner (apt install postfix adds it)")?;
        if !group_exists("postdrop") {
            bail!("no `postdrop` group (setgid_group; apt install postfix adds it)");
        }
        let dir = TempDir::new("postfix")?;
        let conf = dir.0.join("conf");
        let (queue, data) = (dir.0.join("queue"), dir.0.join("data"));
        for d in [&conf, &queue, &data, &conf.join("postfix-files.d"), &conf.join("dynamicmaps.cf.d")] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        // Postfix warns about (and its daemons cannot write) a data directory it does not own.
        std::os::unix::fs::chown(&data, Some(uid), None).context("chown the Postfix data directory")?;
        // `postfix check` reads the file list from $meta_directory; a copy keeps it off /etc.
        let files = ["/etc/postfix/postfix-files", "/usr/share/postfix/postfix-files"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("postfix-files not found in /etc/postfix (postfix check needs it)")?;
        std::fs::copy(files, conf.join("postfix-files")).context("copy postfix-files")?;
        for dm in ["/etc/postfix/dynamicmaps.cf", "/usr/share/postfix/dynamicmaps.cf"] {
            if std::fs::copy(dm, conf.join("dynamicmaps.cf")).is_ok() {
                break;
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cf = main_cf(&dir.0, &conf, relayhost);
        for (k, v) in extra {
            cf.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(conf.join("main.cf"), cf)?;
        std::fs::write(conf.join("master.cf"), format!("{addr} inet n - n - - smtpd\n{MASTER_CF_SERVICES}"))?;
        let mut pf = Postfix { conf, master: None, addr, dir };
        pf.control("check", Duration::from_secs(30))?;
        pf.control("start", Duration::from_secs(30))?;
        let pid_file = queue.join("pid/master.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        // `start` returns once master reports its initialisation (master -w), so the PID file
        // and the listener exist; the loop only covers a slow disk.
        while pf.master.is_none() && Instant::now() < deadline {
            pf.master = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok());
            if pf.master.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if pf.master.is_none() {
            bail!("Postfix started but wrote no {}; its log:\n{}", pid_file.display(), pf.maillog_tail());
        }
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() >= deadline {
                bail!("Postfix's smtpd does not answer on {addr}; its log:\n{}", pf.maillog_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(pf)
    }

    /// CPU time the whole instance has used so far, µs (see the module doc for how).
    pub fn cpu_us(&self) -> u64 {
        let Some(master) = self.master else { return 0 };
        let procs = all_procs();
        let tree = descendants(master, &procs);
        procs.iter().filter(|(p, _)| tree.contains(p)).map(|(_, s)| s.cpu_us + s.reaped_children_cpu_us).sum()
    }

    /// Sum of the peak RSS (`VmHWM`) of the instance's live processes, KiB. Processes share
    /// the text of their binaries and libraries, so this overstates the memory used.
    pub fn rss_kib(&self) -> u64 {
        let Some(master) = self.master else { return 0 };
        descendants(master, &all_procs()).into_iter().map(|p| rss_kib(p).1).sum()
    }

    /// Delays of delivered recipients, ms, from `delay=S.SS` of the `status=sent` log lines
    /// (time from arrival to delivery, Postfix's 10 ms resolution).
    pub fn delivery_delays_ms(&self) -> Vec<u64> {
        let log = std::fs::read_to_string(self.dir.0.join("maillog")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(" status=sent "))
            .filter_map(|l| l.split(" delay=").nth(1)?.split(',').next()?.parse::<f64>().ok())
            .map(|s| (s * 1e3).round() as u64)
            .collect()
    }

    /// Recipients deferred so far (`status=deferred` log lines).
    pub fn deferred(&self) -> u64 {
        self.log_count(" status=deferred ")
    }

    /// Log lines containing `needle`.
    fn log_count(&self, needle: &str) -> u64 {
        let log = std::fs::read_to_string(self.dir.0.join("maillog")).unwrap_or_default();
        log.lines().filter(|l| l.contains(needle)).count() as u64
    }

    /// Messages still in the instance's queue: files under `incoming`, `active`, `deferred`,
    /// `hold` and `maildrop` (hashed subdirectories included).
    pub fn queued(&self) -> u64 {
        fn count(d: &Path, depth: u32) -> u64 {
            let Ok(rd) = std::fs::read_dir(d) else { return 0 };
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() && depth < 4 => count(&e.path(), depth + 1),
                    Ok(t) if t.is_file() => 1,
                    _ => 0,
                })
                .sum()
        }
        let q = self.dir.0.join("queue");
        ["incoming", "active", "deferred", "hold", "maildrop"].iter().map(|d| count(&q.join(d), 0)).sum()
    }

    /// The last lines of the instance's log, for error messages.
    pub fn maillog_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.0.join("maillog")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Runs `postfix -c CONF VERB` with output to a file (not a pipe: the master it forks
    /// would hold a pipe open for its whole life), bounded by `timeout`.
    fn control(&self, verb: &str, timeout: Duration) -> Result<()> {
        let out_path = self.dir.0.join(format!("postfix-{verb}.out"));
        let out = File::create(&out_path)?;
        let mut child = Command::new(POSTFIX)
            .arg("-c")
            .arg(&self.conf)
            .arg(verb)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot run {POSTFIX}"))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("postfix -c {} {verb} did not finish within {timeout:?}", self.conf.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            let said = std::fs::read_to_string(&out_path).unwrap_or_default();
            bail!(
                "postfix -c {} {verb} failed ({status}):\n{}{}",
                self.conf.display(),
                said.trim_end(),
                self.maillog_tail()
            );
        }
        Ok(())
    }

    /// `postfix stop`, then a bounded wait for the master to go, then SIGKILL (by PID) to any
    /// process of the instance still alive. Idempotent.
    pub fn stop(&mut self) {
        let Some(master) = self.master else { return };
        // The tree is taken before the stop: once the master is gone its children are
        // re-parented and no longer recognisable as ours.
        let tree: Vec<(u32, String)> = {
            let procs = all_procs();
            let t = descendants(master, &procs);
            procs.into_iter().filter(|(p, _)| t.contains(p)).map(|(p, s)| (p, s.comm)).collect()
        };
        if let Err(e) = self.control("stop", Duration::from_secs(30)) {
            eprintln!("bench: {e:#}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while tree.iter().any(|(p, c)| alive(*p, c)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for (pid, comm) in &tree {
            // Same PID *and* same command name: a recycled PID is not ours to kill.
            if alive(*pid, comm) {
                eprintln!("bench: Postfix process {pid} ({comm}) survived `postfix stop`: killing it");
                if let Some(p) = rustix::process::Pid::from_raw(*pid as i32) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
        }
        if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
            eprintln!("bench: something still listens on {} after stopping Postfix", self.addr);
        }
        self.master = None;
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Flags of `sluice-load postfix`.
#[derive(clap::Args, Debug, Clone)]
pub struct PostfixArgs {
    /// Where the instance relays everything (`relayhost = [IP]:PORT`), a loopback IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    relay_host: SocketAddr,
    /// KEY=VALUE appended to `main.cf` (repeatable), e.g. `minimal_backoff_time=5s`.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
    set: Vec<(String, String)>,
    /// Stop by itself after this long (the instance never outlives a bench that forgot it).
    #[arg(long, default_value = "1h", value_parser = crate::util::parse_duration)]
    duration: Duration,
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !k.contains(char::is_whitespace) && !v.contains('\n') => {
            Ok((k.trim().to_string(), v.trim().to_string()))
        }
        _ => Err(format!("expected KEY=VALUE on one line, got {s:?}")),
    }
}

/// Runs `sluice-load postfix`: starts an instance, logs `event=listening service=postfix
/// addr=IP:PORT dir=DIR` on stderr (`DIR/conf` is the `-c` directory for `postsuper`,
/// `postqueue` and `postconf`; `DIR/maillog` its log), then waits for SIGTERM/SIGINT or
/// `--duration`, prints `{"sent": N, "deferred": N, "queued": N}` (recipients `status=sent`,
/// `status=deferred` in its log; messages left in its queue) on stdout, stops the instance and
/// removes the directory.
pub fn serve(a: &PostfixArgs) -> Result<i32> {
    if !a.relay_host.ip().is_loopback() {
        bail!("--relay-host {}: only a loopback address", a.relay_host);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&stop)).context("signal handler")?;
    }
    let mut pf = Postfix::start(a.relay_host, &a.set)?;
    eprintln!("event=listening service=postfix addr={} dir={}", pf.addr, pf.dir.0.display());
    let deadline = Instant::now() + a.duration;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{}",
        serde_json::json!({"sent": pf.log_count(" status=sent "), "deferred": pf.deferred(), "queued": pf.queued()})
    );
    pf.stop();
    Ok(0)
}

/// Running (not a zombie) and still the process we saw.
fn alive(pid: u32, comm: &str) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z' && s.comm == comm)
}

fn main_cf(top: &Path, conf: &Path, relayhost: SocketAddr) -> String {
    let t = top.display();
    format!(
        "# sluice-load bench --compare-postfix: a throw-away instance (removed after the run).
compatibility_level = 3.6
meta_directory = {conf}
queue_directory = {t}/queue
data_directory = {t}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.postfix.test
mydomain = postfix.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
relayhost = [{ip}]:{port}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
# Loopback only and no resolver: the relay host is an IP literal, and clients are not looked up
# (sluice does not look them up either).
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
maillog_file = {t}/maillog
maillog_file_prefixes = {t}
biff = no
append_dot_mydomain = no
",
        conf = conf.display(),
        ip = relayhost.ip(),
        port = relayhost.port(),
    )
}

fn passwd_uid(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user)).then(|| f.get(2)?.parse().ok()).flatten()
    })
}

fn group_exists(group: &str) -> bool {
    std::fs::read_to_string("/etc/group").is_ok_and(|g| g.lines().any(|l| l.split(':').next() == Some(group)))
}
