//! Shared helpers for sluice-load's integration tests: start `sluice-load` subcommands on
//! 127.0.0.1 with kernel-chosen ports, stop them by PID, and decide what to do when a
//! third-party tool is missing (fail on CI, skip locally).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice-load")
}

/// True when the tool exists; false (skip) locally; panics on CI, where it must be installed.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        assert!(std::env::var("CI").map(|v| v != "true").unwrap_or(true), "{tool} is required on CI but missing");
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// A running `sluice-load` subcommand, killed by PID when dropped.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Daemon {
    /// Starts `sluice-load ARGS` and waits (at most 10 s) for its listening line.
    pub fn start(args: &[&str]) -> Daemon {
        let mut child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice-load");
        let err = child.stderr.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let log2 = log.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.split("event=listening").nth(1).and_then(|r| r.split("addr=").nth(1)) {
                    let _ = tx.send(a.trim().parse::<SocketAddr>().unwrap());
                }
                log2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sluice-load {args:?} did not start: {}", log.lock().unwrap());
            }
        };
        Daemon { child, addr, log, stdout: Some(stdout) }
    }

    /// SIGTERM by PID, bounded wait (then SIGKILL); returns stdout (the JSON summary).
    pub fn stop(mut self) -> String {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        self.stdout.take().unwrap().join().unwrap()
    }

    pub fn stop_json(self) -> serde_json::Value {
        let out = self.stop();
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad summary {out:?}: {e}"))
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to completion with a time limit (killed past it).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait().unwrap() {
            Some(s) => break s,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => {
                let _ = child.kill();
                let s = child.wait().unwrap();
                panic!("command timed out after {limit:?}: {cmd:?} ({s})");
            }
        }
    };
    Output { status, stdout: to.join().unwrap(), stderr: te.join().unwrap() }
}

/// `sluice-load send ARGS --json` against `to`, bounded to 60 s: (exit code, report, stderr).
pub fn send(to: SocketAddr, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = run_bounded(
        Command::new(bin()).args(["send", "--to", &to.to_string(), "--json", "--quiet"]).args(args),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v, String::from_utf8_lossy(&out.stderr).to_string())
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "sluice-load-test-{tag}-{}-{}",
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

/// A loopback port that nothing listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
