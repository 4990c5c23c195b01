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
    fn rng_chance_extremes() {
        let mut r = Rng::new(0);
        assert!((0..1000).all(|_| !r.chance(0.0)));
        assert!((0..1000).all(|_| r.chance(1.0)));
        let hits = (0..10_000).filter(|_| r.chance(0.5)).count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
    }
}
