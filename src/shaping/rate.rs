//! Pure: rates (`"100/s"`, `"10/min"`, `"500/h"`), durations (`"90m"`) and the token bucket
//! that enforces a rate on fake or real time.

use std::fmt;
use std::time::{Duration, Instant};

/// `N` events per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events per period (at least 1).
    pub count: u32,
    /// The period in ms.
    pub per_ms: u64,
}

impl Rate {
    /// Parses `N/s`, `N/min` or `N/h` (also `N/sec`, `N/m`, `N/hour`, `N/d`).
    pub fn parse(s: &str) -> Result<Rate, String> {
        let (n, unit) = s.split_once('/').ok_or_else(|| format!("`{s}` is not a rate: write N/s, N/min or N/h"))?;
        let count: u32 = n.trim().parse().map_err(|_| format!("`{s}`: `{n}` is not a whole number"))?;
        if count == 0 {
            return Err(format!("`{s}`: the count must be at least 1"));
        }
        let per_ms = match unit.trim() {
            "s" | "sec" | "second" => 1_000,
            "m" | "min" | "minute" => 60_000,
            "h" | "hour" => 3_600_000,
            "d" | "day" => 86_400_000,
            u => return Err(format!("`{s}`: unknown period `{u}` (s, min, h or d)")),
        };
        Ok(Rate { count, per_ms })
    }

    /// Tokens a bucket of this rate holds at most: one second of the rate, at least 1.
    pub fn capacity(self) -> u64 {
        (u64::from(self.count) * 1000 / self.per_ms).max(1)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per_ms {
            1_000 => "s",
            60_000 => "min",
            3_600_000 => "h",
            _ => "d",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Parses a duration: a whole number followed by `ms`, `s`, `m`/`min`, `h` or `d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{s}` is not a duration: write e.g. 30s, 90m, 2h or 1d"))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" | "sec" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        u => return Err(format!("`{s}`: unknown unit `{u}` (ms, s, m, h or d)")),
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

/// A token bucket: refills at its rate, holds at most [`Rate::capacity`] tokens, starts full.
/// Tokens are kept in thousandths so that slow rates (1/min) refill smoothly.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: Rate,
    /// Thousandths of a token.
    milli: u64,
    /// The time up to which refill has been counted.
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Bucket {
        Bucket { rate, milli: rate.capacity() * 1000, last: now }
    }

    /// The bucket's rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// A new rate: the tokens held are kept, up to the new capacity.
    pub fn set_rate(&mut self, rate: Rate, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.milli = self.milli.min(rate.capacity() * 1000);
    }

    fn refill(&mut self, now: Instant) {
        let cap = self.rate.capacity() * 1000;
        if self.milli >= cap {
            self.milli = cap;
            self.last = self.last.max(now);
            return;
        }
        let elapsed_us = now.saturating_duration_since(self.last).as_micros() as u64;
        // Thousandths of a token per µs = count / per_ms.
        let add = elapsed_us.saturating_mul(u64::from(self.rate.count)) / self.rate.per_ms;
        if add == 0 {
            return;
        }
        // Advance by exactly the time those thousandths took, keeping the remainder.
        let used_us = add * self.rate.per_ms / u64::from(self.rate.count);
        self.last += Duration::from_micros(used_us);
        self.milli = (self.milli + add).min(cap);
        if self.milli == cap {
            self.last = now;
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// Gives back a token taken for nothing.
    pub fn put_back(&mut self) {
        self.milli = (self.milli + 1000).min(self.rate.capacity() * 1000);
    }

    /// Whole tokens available now.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.milli / 1000
    }

    /// When the next token will be there (now, if one is).
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.milli >= 1000 {
            return now;
        }
        let need = 1000 - self.milli;
        let us = (need * self.rate.per_ms).div_ceil(u64::from(self.rate.count));
        self.last + Duration::from_micros(us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_durations_parse_and_name_what_is_wrong() {
        assert_eq!(Rate::parse("100/s"), Ok(Rate { count: 100, per_ms: 1000 }));
        assert_eq!(Rate::parse("10/min"), Ok(Rate { count: 10, per_ms: 60_000 }));
        assert_eq!(Rate::parse(" 5 / h"), Ok(Rate { count: 5, per_ms: 3_600_000 }));
        assert!(Rate::parse("0/s").unwrap_err().contains("at least 1"));
        assert!(Rate::parse("ten/s").unwrap_err().contains("whole number"));
        assert!(Rate::parse("10/fortnight").unwrap_err().contains("fortnight"));
        assert!(Rate::parse("10").unwrap_err().contains("not a rate"));
        assert_eq!(Rate::parse("600/min").unwrap().to_string(), "600/min");
        assert_eq!(Rate::parse("600/min").unwrap().capacity(), 10);
        assert_eq!(Rate::parse("10/min").unwrap().capacity(), 1);
        assert_eq!(Rate::parse("50/s").unwrap().capacity(), 50);
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 weeks").is_err());
    }

    /// Over simulated time, a bucket lets through its rate plus one bucket, never more, and
    /// `ready_at` names the moment the next token comes.
    #[test]
    fn a_bucket_holds_its_rate_exactly_on_fake_time() {
        let t0 = Instant::now();
        for (rate, secs) in [("50/s", 30u64), ("600/min", 30), ("7/s", 10), ("1/min", 600)] {
            let rate = Rate::parse(rate).unwrap();
            let mut b = Bucket::new(rate, t0);
            let mut taken = 0u64;
            let mut per_second = vec![0u64; secs as usize];
            // Ask every millisecond: a greedy sender.
            for ms in 0..secs * 1000 {
                let now = t0 + Duration::from_millis(ms);
                while b.take(now) {
                    taken += 1;
                    per_second[(ms / 1000) as usize] += 1;
                }
            }
            let expected = u64::from(rate.count) * secs * 1000 / rate.per_ms + rate.capacity();
            assert!(taken.abs_diff(expected) <= 1, "{rate}: {taken} taken, {expected} expected");
            let per_sec_max = (u64::from(rate.count) * 1000).div_ceil(rate.per_ms) + rate.capacity();
            assert!(per_second.iter().all(|&n| n <= per_sec_max), "{rate}: {per_second:?}");
        }
    }

    #[test]
    fn ready_at_is_exact_and_a_new_rate_keeps_at_most_its_capacity() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Rate::parse("1/min").unwrap(), t0);
        assert!(b.take(t0));
        assert!(!b.take(t0));
        assert_eq!(b.ready_at(t0), t0 + Duration::from_secs(60));
        assert!(!b.take(t0 + Duration::from_millis(59_999)));
        assert!(b.take(t0 + Duration::from_secs(60)));
        let mut b = Bucket::new(Rate::parse("100/s").unwrap(), t0);
        assert_eq!(b.available(t0), 100);
        b.set_rate(Rate::parse("1/min").unwrap(), t0);
        assert_eq!(b.available(t0), 1);
        assert!(b.take(t0));
        assert!(!b.take(t0 + Duration::from_secs(30)));
    }
}
