//! Test support: spawn `sluice serve` on 127.0.0.1 with a port chosen by the kernel and a
//! temporary spool, a line-oriented SMTP client, and helpers to inspect the spool.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the built `sluice` binary.
pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "sluice-e2e-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running relay.
pub struct Relay {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every listener in flag order: the --listen ones, then the --listen-tls ones.
    pub addrs: Vec<SocketAddr>,
    pub spool: PathBuf,
    pub log: Arc<Mutex<String>>,
    _dir: Option<TempDir>,
}

impl Relay {
    /// Starts a relay with its own temporary spool and the given extra flags.
    pub fn start(extra: &[&str]) -> Relay {
        let dir = TempDir::new("spool");
        let spool = dir.path().join("spool");
        let mut r = Relay::start_on(&spool, extra);
        r._dir = Some(dir);
        r
    }

    /// Starts a relay on an existing spool directory (for restarts).
    pub fn start_on(spool: &Path, extra: &[&str]) -> Relay {
        Relay::start_on_env(spool, extra, &[])
    }

    /// As [`Relay::start_on`], with extra environment variables (failpoints).
    pub fn start_on_env(spool: &Path, extra: &[&str], env: &[(&str, &str)]) -> Relay {
        let mut cmd = Command::new(sluice_bin());
        cmd.envs(env.iter().copied());
        cmd.arg("serve").arg("--spool").arg(spool).args(["--hostname", "mx.test"]);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        // Never let a test relay use the system resolver or leave loopback: a test that does
        // not route mail itself (--dns/--relay-host) holds the queue, so accepted messages stay
        // queued for it to inspect.
        if !extra.contains(&"--dns") && !extra.contains(&"--relay-host") {
            cmd.args(["--hold", "--dns", "127.0.0.1:1"]);
        }
        cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sluice");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let listening = line.split("event=listening addr=").nth(1).or_else(|| {
                    line.split("\"event\":\"listening\",\"addr\":\"").nth(1).map(|r| r.trim_end_matches("\"}"))
                });
                if let Some(rest) = listening {
                    let addr = rest.split([' ', '"']).next().unwrap_or("").to_string();
                    if tx.as_ref().is_some_and(|tx| tx.send(addr).is_err()) {
                        tx = None;
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let listeners = extra.iter().filter(|a| **a == "--listen" || **a == "--listen-tls").count()
            + usize::from(!extra.contains(&"--listen"));
        let mut addrs = Vec::new();
        while addrs.len() < listeners {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(a) => addrs.push(a.parse().unwrap()),
                Err(_) => {
                    let _ = child.kill();
                    panic!("relay did not start; log:\n{}", log.lock().unwrap());
                }
            }
        }
        Relay { child, addr: addrs[0], addrs, spool: spool.to_path_buf(), log, _dir: None }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (bounded) until the relay's log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        let t0 = Instant::now();
        while !self.log().contains(needle) {
            assert!(t0.elapsed() < Duration::from_secs(10), "log never showed {needle:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(st.success());
    }

    /// Waits for exit (bounded).
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > within {
                let _ = self.child.kill();
                panic!("relay did not exit within {within:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes the temp dir so it outlives this relay (for restarts on the same spool).
    pub fn take_dir(&mut self) -> Option<TempDir> {
        self._dir.take()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking SMTP client that reads whole (multi-line) replies.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one reply (all its lines); "" on EOF.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return all,
                Ok(_) => {}
                Err(e) => panic!("reading reply: {e}; so far: {all:?}"),
            }
            let last = line.len() < 4 || line.as_bytes()[3] == b' ';
            all.push_str(&line);
            if last {
                return all;
            }
        }
    }

    /// Sends a command and returns its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Asserts that the next reply starts with `prefix`.
    pub fn expect(&mut self, prefix: &str) -> String {
        let r = self.reply();
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    /// True when the server has closed the connection (EOF within the read timeout).
    /// A signal to this test process (another test's child exiting) may interrupt the read:
    /// that is retried, not taken for an open connection.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match self.reader.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return matches!(r, Ok(0)),
            }
        }
    }

    /// EHLO + MAIL + RCPT + DATA + body; returns the final reply.
    pub fn send_message(&mut self, from: &str, to: &[&str], body: &[u8]) -> String {
        self.expect_ok(&format!("MAIL FROM:<{from}>"), "250");
        for t in to {
            self.expect_ok(&format!("RCPT TO:<{t}>"), "250");
        }
        self.expect_ok("DATA", "354");
        self.send(body);
        self.send(b".\r\n");
        self.reply()
    }

    pub fn expect_ok(&mut self, line: &str, code: &str) -> String {
        let r = self.cmd(line);
        assert!(r.starts_with(code), "{line:?} -> {r:?}");
        r
    }
}

/// The queue id out of a `250 2.0.0 Ok: queued as ID` reply.
pub fn queue_id(reply: &str) -> String {
    reply.trim_end().rsplit(' ').next().unwrap().to_string()
}

/// Runs `sluice queue --spool DIR ARGS...` and returns (status, stdout, stderr).
pub fn queue_cmd(spool: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(sluice_bin()).arg("queue").arg("--spool").arg(spool).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every message in the spool as (queue id, body bytes), via the library's read-only scan.
pub fn spool_messages(spool: &Path) -> Vec<(String, Vec<u8>)> {
    sluice::spool::read_messages(spool)
        .expect("read spool")
        .into_iter()
        .map(|(id, body)| (id.to_string(), body))
        .collect()
}

/// Path of the `sluice-load` binary, built beside `sluice` by `cargo test --workspace`; on CI
/// its absence fails the test, elsewhere the test skips.
pub fn load_bin() -> Option<PathBuf> {
    let p = Path::new(sluice_bin()).with_file_name("sluice-load");
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("sluice-load is not built beside sluice: run `cargo test --workspace`");
    }
    eprintln!("skipping: sluice-load not built (run cargo test --workspace)");
    None
}

/// Whether a command exists on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd} >/dev/null 2>&1")).status().is_ok_and(|s| s.success())
}

/// Requires a third-party tool: on CI (CI=true) its absence fails the test, elsewhere it skips.
pub fn require(cmd: &str) -> bool {
    if have(cmd) {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{cmd} is required on CI (.ci/run installs it)");
    }
    eprintln!("skipping: {cmd} not installed");
    false
}

/// Runs `sluice passwd USER` with `stdin` piped in: (exit code, stdout, stderr).
pub fn passwd(user: &str, stdin: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = Command::new(sluice_bin())
        .args(["passwd", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The child may exit before reading (bad user name): a broken pipe is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A small tmpfs mounted for a full-disk test, unmounted (lazily) and removed on drop.
pub struct Tmpfs {
    pub mnt: PathBuf,
    _dir: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `4m`). Needs root: on CI (CI=true) failing to mount fails
    /// the test, elsewhere it skips (`None`).
    pub fn mount(tag: &str, size: &str) -> Option<Tmpfs> {
        let dir = TempDir::new(tag);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("cannot mount a tmpfs for a full-disk test (CI runs as root)");
            }
            eprintln!("skipping: cannot mount tmpfs (needs root)");
            return None;
        }
        Some(Tmpfs { mnt, _dir: dir })
    }

    /// Fills the device to the last byte with a file named `filler`; returns its path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.mnt.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4k"])
            .arg(format!("of={}", filler.display()))
            .stderr(Stdio::null())
            .status();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Sends one message and returns the first reply that is not a success (MAIL, RCPT or DATA),
/// or the reply to the end of data.
pub fn try_send(c: &mut Client, from: &str, to: &str, body: &[u8]) -> String {
    for line in [format!("MAIL FROM:<{from}>"), format!("RCPT TO:<{to}>"), "DATA".to_owned()] {
        let r = c.cmd(&line);
        if !(r.starts_with('2') || r.starts_with('3')) {
            if !line.starts_with("MAIL") {
                c.cmd("RSET");
            }
            return r;
        }
    }
    c.send(body);
    c.send(b".\r\n");
    c.reply()
}
