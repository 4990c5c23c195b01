//! Small shared pieces: value parsers for flags (durations, sizes, probabilities), a seeded
//! PRNG for fault and size draws, CPU-time readers from `/proc`, and the `listening` log line
//! that tests and `bench` use to learn a port chosen by the kernel.
//!
//! Nothing here runs on a per-byte path.

use std::time::Duration;

/// Parses `250ms`, `2s`, `1m`, `1h`, `1d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul_ms): (&str, f64) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e3)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600e3)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86400e3)
    } else {
        (s, 1e3)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("invalid duration `{s}` (use e.g. 500ms, 10s, 2m)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("invalid duration `{s}`"));
    }
    Ok(Duration::from_micros((v * mul_ms * 1e3) as u64))
}

/// Parses a byte count with an optional `k`, `m` or `g` suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mul) = match t.as_bytes().last() {
        Some(b'k') => (&t[..t.len() - 1], 1usize << 10),
        Some(b'm') => (&t[..t.len() - 1], 1 << 20),
        Some(b'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("invalid size `{s}` (use e.g. 1024, 10k, 1m)"))
}

/// Parses a probability in `[0, 1]`; `5%` is accepted too.
pub fn parse_probability(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("invalid probability `{s}` (use 0.05 or 5%)"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("probability `{s}` is outside 0..1"))
    }
}

/// xorshift64*: fast, seedable, good enough for picking sizes and injecting faults. Not for
/// anything secret.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is remapped: xorshift must not start at zero).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A uniform float in `[0, 1)`.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (never for 0, always for 1).
    #[inline]
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (p >= 1.0 || self.unit() < p)
    }
}

/// Nanoseconds the calling thread has spent on a CPU, from `/proc/thread-self/schedstat`
/// (nanosecond resolution, unlike the 10 ms ticks of `/proc/self/stat`). 0 if unavailable.
pub fn thread_cpu_ns() -> u64 {
    read_schedstat("/proc/thread-self/schedstat")
}

/// Nanoseconds all live threads of process `pid` have spent on a CPU.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    dir.flatten().map(|e| read_schedstat(&format!("{}/schedstat", e.path().display()))).sum()
}

fn read_schedstat(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU time of this process's waited-for children (`cutime + cstime` of `/proc/self/stat`), in
/// microseconds. Read it before and after waiting for one child to get that child's CPU time
/// even after it has exited. Resolution is one clock tick (10 ms on Linux).
pub fn children_cpu_us() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0 };
    // The command name may contain spaces; fields are counted after its closing parenthesis.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so cutime (16) is index 13 and cstime (17) 14.
    let ticks: u64 = [13, 14].iter().filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok())).sum();
    // USER_HZ is 100 on every Linux ABI that Rust targets.
    ticks * 10_000
}

/// The fields of one `/proc/PID/stat` line that `bench` accounts with.
#[derive(Debug, Clone, Default)]
pub struct ProcStat {
    /// The parent's PID (field 4).
    pub ppid: u32,
    /// The command name (field 2, without the parentheses).
    pub comm: String,
    /// Single-letter state (field 3); `Z` is a zombie: exited, not yet reaped.
    pub state: char,
    /// `utime + stime` (fields 14 and 15): every thread of the process, living or exited, in µs.
    pub cpu_us: u64,
    /// `cutime + cstime` (fields 16 and 17): children it has waited for, in µs.
    pub reaped_children_cpu_us: u64,
}

/// Reads `/proc/PID/stat`; `None` when the process is gone. Resolution is one clock tick
/// (USER_HZ = 100 on every Linux ABI Rust targets, so 10 ms).
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<ProcStat> {
    // The command name may contain spaces and parentheses: it ends at the *last* ')'.
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, ppid (4) is 1, utime (14) is 11, stime 12,
    // cutime 13, cstime 14.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(ProcStat {
        ppid: n(1) as u32,
        comm,
        state: f.first().and_then(|s| s.chars().next()).unwrap_or('?'),
        cpu_us: (n(11) + n(12)) * 10_000,
        reaped_children_cpu_us: (n(13) + n(14)) * 10_000,
    })
}

/// Every live process: (PID, its stat line). A process that exits between the directory listing
/// and the read is skipped.
pub fn all_procs() -> Vec<(u32, ProcStat)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter_map(|pid| proc_stat(pid).map(|s| (pid, s)))
        .collect()
}

/// `root` and everything below it in the process tree of `procs`.
pub fn descendants(root: u32, procs: &[(u32, ProcStat)]) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    // Breadth-first over parent links; bounded by the number of processes.
    while i < out.len() && out.len() <= procs.len() {
        let parent = out[i];
        out.extend(procs.iter().filter(|(p, s)| s.ppid == parent && *p != parent).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// Resident set size now and at its peak (`VmRSS`, `VmHWM`), in KiB, of process `pid`.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return (0, 0) };
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Logs `event=listening addr=IP:PORT` on stderr, in the relay's format, so that a parent that
/// asked for port 0 can learn the port.
pub fn log_listening(what: &str, addr: std::net::SocketAddr) {
    eprintln!("event=listening service={what} addr={addr}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("x").is_err());
        assert_eq!(parse_bytes("10k").unwrap(), 10240);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("1M").unwrap(), 1 << 20);
        assert!(parse_bytes("k").is_err());
        assert_eq!(parse_probability("5%").unwrap(), 0.05);
        assert!(parse_probability("1.5").is_err());
    }

    #[test]
    fn stat_line() {
        let s = parse_stat("42 (a (b) c) S 7 42 42 0 -1 4194560 1 0 0 0 150 25 3 4 20 0 1 0 1 2 3").unwrap();
        assert_eq!((s.ppid, s.comm.as_str(), s.state), (7, "a (b) c", 'S'));
        assert_eq!((s.cpu_us, s.reaped_children_cpu_us), (1_750_000, 70_000));
        let procs =
            vec![(1, ProcStat { ppid: 0, ..s.clone() }), (7, ProcStat { ppid: 1, ..s.clone() }), (42, s.clone())];
        assert_eq!(descendants(7, &procs), vec![7, 42]);
    }

    #[test]
    fn rng_chance_extremes() {
        let mut r = Rng::new(0);
        assert!((0..1000).all(|_| !r.chance(0.0)));
        assert!((0..1000).all(|_| r.chance(1.0)));
        let hits = (0..10_000).filter(|_| r.chance(0.5)).count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
    }
}
