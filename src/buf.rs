//! Pooled fixed-size byte buffers for socket input and output.
//!
//! A [`BufPool`] hands out [`Buf`]s of one fixed capacity and takes them back for reuse, up to
//! a bound. `checkout` returns `None` when the bound is reached: callers then stop reading or
//! accepting instead of allocating (backpressure, not memory growth).
//!
//! Both pools give memory back after a spike: the loop calls `trim(now)` every turn, and once
//! per [`TRIM_PERIOD`] the free items that were not used during the whole period (the free
//! list's low-water mark) are released, down to a small floor kept for the next burst. Time
//! comes in as an argument.

use std::time::{Duration, Instant};

/// How long free buffers must sit unused before a pool releases them.
pub const TRIM_PERIOD: Duration = Duration::from_secs(10);
/// Free [`BufPool`] chunks always kept (1 MiB of 16 KiB chunks).
const BUF_FLOOR: usize = 64;
/// Free [`VecPool`] vectors always kept.
const VEC_FLOOR: usize = 16;

/// The low-water mark of a free list over one period: that many items sat unused throughout.
#[derive(Debug, Default)]
struct IdleTrim {
    /// Fewest free items seen since `since`.
    low: usize,
    /// Start of the current period (`None` until the first `trim`).
    since: Option<Instant>,
}

impl IdleTrim {
    /// After an item was taken from a free list now `free` long.
    #[inline]
    fn note(&mut self, free: usize) {
        self.low = self.low.min(free);
    }

    /// At the end of a period: how many of `free` items to release (those idle all period,
    /// above `floor`); then a new period starts. `None` before the period ends.
    fn due(&mut self, now: Instant, free: usize, floor: usize) -> Option<usize> {
        let since = *self.since.get_or_insert_with(|| {
            self.low = free;
            now
        });
        if now.saturating_duration_since(since) < TRIM_PERIOD {
            return None;
        }
        let release = self.low.min(free).min(free.saturating_sub(floor));
        self.low = free - release;
        self.since = Some(now);
        Some(release)
    }

    /// When `due` may next release something, if the list is above its floor.
    fn next(&self, free: usize, floor: usize) -> Option<Instant> {
        self.since.filter(|_| free > floor).map(|s| s + TRIM_PERIOD)
    }
}

/// A fixed-capacity buffer with a readable window `data()` and writable tail `space()`.
#[derive(Debug)]
pub struct Buf {
    mem: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    /// Bytes filled and not yet consumed.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.mem[self.start..self.end]
    }

    /// Free space after the data. Compacts first when the tail is under a quarter of the
    /// capacity and consumed bytes at the front would give more: a read then never gets a
    /// sliver of a buffer that is mostly free.
    #[inline]
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 && self.mem.len() - self.end < self.mem.len() / 4 {
            self.compact();
        }
        &mut self.mem[self.end..]
    }

    /// Marks `n` bytes of `space()` as filled.
    #[inline]
    pub fn fill(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.mem.len());
        self.end = (self.end + n).min(self.mem.len());
    }

    /// Drops `n` bytes from the front of `data()`.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            // Empty: rewind for free so the next fill starts at the beginning.
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends as much of `bytes` as fits (compacting when that makes it fit); returns how
    /// many were copied. Callers check [`Buf::room`] first so that replies are never cut.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        if self.start > 0 && self.mem.len() - self.end < bytes.len() {
            self.compact();
        }
        let space = &mut self.mem[self.end..];
        let n = bytes.len().min(space.len());
        space[..n].copy_from_slice(&bytes[..n]);
        self.end += n;
        n
    }

    /// Free bytes available to `space()` after compaction.
    #[inline]
    pub fn room(&self) -> usize {
        self.mem.len() - (self.end - self.start)
    }

    /// True when no data is held.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Total capacity.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.mem.len()
    }

    fn compact(&mut self) {
        self.mem.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }
}

/// A pool of equally sized [`Buf`]s.
#[derive(Debug)]
pub struct BufPool {
    free: Vec<Box<[u8]>>,
    chunk: usize,
    outstanding: usize,
    limit: usize,
    idle: IdleTrim,
}

impl BufPool {
    /// A pool of `chunk`-byte buffers, at most `limit` checked out at once.
    pub fn new(chunk: usize, limit: usize) -> BufPool {
        BufPool { free: Vec::new(), chunk, outstanding: 0, limit, idle: IdleTrim::default() }
    }

    /// A buffer, or `None` when `limit` buffers are already out.
    pub fn checkout(&mut self) -> Option<Buf> {
        if self.outstanding >= self.limit {
            return None;
        }
        self.outstanding += 1;
        let mem = self.free.pop().unwrap_or_else(|| vec![0u8; self.chunk].into_boxed_slice());
        self.idle.note(self.free.len());
        Some(Buf { mem, start: 0, end: 0 })
    }

    /// Returns a buffer to the pool (its contents are discarded).
    pub fn checkin(&mut self, buf: Buf) {
        self.outstanding = self.outstanding.saturating_sub(1);
        // Keep a bounded number of free chunks so a burst does not pin memory forever.
        if self.free.len() < 1024 {
            self.free.push(buf.mem);
        }
    }

    /// Returns the buffer held in `slot`, if any, leaving `None` (a connection giving up its
    /// input or output chunk).
    pub fn release(&mut self, slot: &mut Option<Buf>) {
        if let Some(b) = slot.take() {
            self.checkin(b);
        }
    }

    /// Like [`BufPool::release`], but only when the buffer holds no data: idle connections keep
    /// no buffer.
    pub fn release_if_empty(&mut self, slot: &mut Option<Buf>) {
        if slot.as_ref().is_some_and(Buf::is_empty) {
            self.release(slot);
        }
    }

    /// Buffers currently checked out.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Chunk size.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Free chunks held for reuse.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Call once per loop turn: at the end of each [`TRIM_PERIOD`], frees the chunks that sat
    /// unused all period (above a small floor). Returns how many were freed.
    pub fn trim(&mut self, now: Instant) -> usize {
        let Some(n) = self.idle.due(now, self.free.len(), BUF_FLOOR) else { return 0 };
        if n > 0 {
            self.free.truncate(self.free.len() - n);
            self.free.shrink_to_fit();
        }
        n
    }

    /// When [`BufPool::trim`] may free something next (for the loop's poll timeout: an idle
    /// relay must still wake to give a spike's memory back); `None` when nothing is to free.
    pub fn next_trim(&self) -> Option<Instant> {
        self.idle.next(self.free.len(), BUF_FLOOR)
    }
}

/// A pool of growable byte vectors for message bodies: capacity is kept between messages up to
/// `keep` bytes, so steady-state traffic does not allocate per message.
#[derive(Debug)]
pub struct VecPool {
    free: Vec<Vec<u8>>,
    keep: usize,
    idle: IdleTrim,
}

impl VecPool {
    /// A pool retaining vectors of at most `keep` bytes capacity.
    pub fn new(keep: usize) -> VecPool {
        VecPool { free: Vec::new(), keep, idle: IdleTrim::default() }
    }

    /// An empty vector, reused when one is free.
    pub fn take(&mut self) -> Vec<u8> {
        let v = self.free.pop().unwrap_or_default();
        self.idle.note(self.free.len());
        v
    }

    /// Gives a vector back.
    pub fn give(&mut self, mut v: Vec<u8>) {
        v.clear();
        if v.capacity() > self.keep {
            v.shrink_to(self.keep);
        }
        if self.free.len() < 4096 {
            self.free.push(v);
        }
    }

    /// Like [`BufPool::trim`]: frees the vectors unused for a whole [`TRIM_PERIOD`].
    pub fn trim(&mut self, now: Instant) -> usize {
        let Some(n) = self.idle.due(now, self.free.len(), VEC_FLOOR) else { return 0 };
        if n > 0 {
            self.free.truncate(self.free.len() - n);
            self.free.shrink_to_fit();
        }
        n
    }

    /// Like [`BufPool::next_trim`].
    pub fn next_trim(&self) -> Option<Instant> {
        self.idle.next(self.free.len(), VEC_FLOOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_consume_compact() {
        let mut pool = BufPool::new(8, 2);
        let mut b = pool.checkout().unwrap();
        assert_eq!(b.push(b"abcdefghij"), 8);
        b.consume(6);
        assert_eq!(b.data(), b"gh");
        assert_eq!(b.room(), 6);
        assert_eq!(b.push(b"1234"), 4);
        assert_eq!(b.data(), b"gh1234");
        b.consume(6);
        assert!(b.is_empty());
        pool.checkin(b);
    }

    #[test]
    fn push_uses_room_freed_at_the_front() {
        let mut pool = BufPool::new(16, 1);
        let mut b = pool.checkout().unwrap();
        assert_eq!(b.push(b"0123456789abcd"), 14);
        b.consume(12);
        // Two bytes of tail space, fourteen free in all: the push must compact, not cut.
        assert_eq!(b.room(), 14);
        assert_eq!(b.push(b"250 2.0.0 Ok\r\n"), 14);
        assert_eq!(b.data(), b"cd250 2.0.0 Ok\r\n");
    }

    #[test]
    fn pool_limit() {
        let mut pool = BufPool::new(8, 1);
        let a = pool.checkout().unwrap();
        assert!(pool.checkout().is_none());
        pool.checkin(a);
        assert!(pool.checkout().is_some());
    }

    #[test]
    fn a_spike_is_given_back_after_a_quiet_period() {
        let t0 = Instant::now();
        let mut pool = BufPool::new(16, 10_000);
        assert_eq!(pool.trim(t0), 0);
        // 5,000 sessions at once, then all gone.
        let spike: Vec<Buf> = (0..5000).map(|_| pool.checkout().unwrap()).collect();
        spike.into_iter().for_each(|b| pool.checkin(b));
        assert_eq!(pool.free(), 1024, "the free list is capped");
        // The period that saw the spike keeps everything: the chunks were in use.
        assert_eq!(pool.trim(t0 + TRIM_PERIOD / 2), 0);
        assert_eq!(pool.trim(t0 + TRIM_PERIOD), 0);
        assert_eq!(pool.next_trim(), Some(t0 + 2 * TRIM_PERIOD));
        // A whole quiet period: all but the floor go back.
        assert_eq!(pool.trim(t0 + 2 * TRIM_PERIOD), 1024 - BUF_FLOOR);
        assert_eq!(pool.free(), BUF_FLOOR);
        assert_eq!(pool.next_trim(), None, "nothing left to free: no wake-up needed");
    }

    #[test]
    fn steady_demand_keeps_its_buffers() {
        let t0 = Instant::now();
        let mut pool = BufPool::new(16, 10_000);
        pool.trim(t0);
        // 200 buffers out and back every turn: none sits idle for a period.
        for turn in 1..=30u32 {
            let held: Vec<Buf> = (0..200).map(|_| pool.checkout().unwrap()).collect();
            held.into_iter().for_each(|b| pool.checkin(b));
            assert_eq!(pool.trim(t0 + TRIM_PERIOD * turn / 2), 0, "turn {turn}");
        }
        assert_eq!(pool.free(), 200);
        // Demand falls to 100: the 100 unused ones go after a period without them.
        for turn in 31..=34u32 {
            let held: Vec<Buf> = (0..100).map(|_| pool.checkout().unwrap()).collect();
            held.into_iter().for_each(|b| pool.checkin(b));
            pool.trim(t0 + TRIM_PERIOD * turn / 2);
        }
        assert_eq!(pool.free(), 100);
    }

    #[test]
    fn body_vectors_are_trimmed_too() {
        let t0 = Instant::now();
        let mut pool = VecPool::new(1 << 20);
        pool.trim(t0);
        let spike: Vec<Vec<u8>> = (0..500).map(|_| pool.take()).collect();
        spike.into_iter().for_each(|mut v| {
            v.resize(4096, 0);
            pool.give(v)
        });
        assert_eq!(pool.trim(t0 + TRIM_PERIOD), 0);
        assert_eq!(pool.trim(t0 + 2 * TRIM_PERIOD), 500 - VEC_FLOOR);
        assert_eq!(pool.next_trim(), None);
    }
}
