//! Pure: retry timing for queued messages, and the heap of what is due when.
//!
//! [`RetryPolicy`] answers one question after a temporary failure (RFC 5321 §4.5.4.1): when is
//! the next attempt, or has the message been queued too long and must bounce? [`DueQueue`] holds
//! every waiting item keyed by its due time, so the loop can ask what is due now and how long it
//! may sleep.
//!
//! Time is always an argument in milliseconds since the Unix epoch (wall clock, because arrival
//! times are stored in the spool and must survive a restart); nothing here reads a clock, sleeps
//! or knows what the items are.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

/// Enhanced status of the failure reported when a message expires (RFC 3463 §3.5 `X.4.7`
/// "Delivery time expired"); the DSN's `Action` is `failed`.
pub const EXPIRED_STATUS: (u8, u16, u16) = (4, 4, 7);
/// Text of the expiry failure, for the DSN diagnostic and the log.
pub const EXPIRED_TEXT: &str = "delivery time expired";

/// When to retry after a temporary failure, and how long a message may stay queued
/// (`--retry-schedule`, `--max-queue-lifetime`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delays between attempts: after the Nth failed attempt the next one is
    /// `schedule[min(N - 1, len - 1)]` later, so the last delay repeats. Empty means no retries.
    pub schedule: Vec<Duration>,
    /// Time since arrival after which a temporary failure becomes final.
    pub max_lifetime: Duration,
}

impl Default for RetryPolicy {
    /// The SPEC defaults: `1m,5m,15m,30m,1h,2h,4h` and `5d`.
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        RetryPolicy {
            schedule: vec![min(1), min(5), min(15), min(30), min(60), min(120), min(240)],
            max_lifetime: Duration::from_secs(5 * 86_400),
        }
    }
}

/// What to do with a message after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// Try again at this time (milliseconds since the epoch).
    RetryAt(u64),
    /// Give up: report every still-undelivered recipient as failed with [`EXPIRED_STATUS`].
    Expire,
}

/// Saturating `Duration` to milliseconds (a lifetime of `Duration::MAX` means "forever").
fn as_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RetryPolicy {
    /// The delay after the `attempts_made`-th failed attempt; `None` when the schedule is empty
    /// or nothing was attempted yet.
    pub fn delay_after(&self, attempts_made: u16) -> Option<Duration> {
        let last = self.schedule.len().checked_sub(1)?;
        let n = usize::from(attempts_made).checked_sub(1)?;
        Some(self.schedule[n.min(last)])
    }

    /// When a message that arrived at `arrival_ms` stops being retried.
    pub fn expires_at_ms(&self, arrival_ms: u64) -> u64 {
        arrival_ms.saturating_add(as_ms(self.max_lifetime))
    }

    /// The step after `attempts_made` failed attempts, the last of which ended at `now_ms`, for
    /// a message that arrived at `arrival_ms`.
    ///
    /// The rule, like Postfix's `maximal_queue_lifetime`: a message bounces at the first failed
    /// attempt made at or after `arrival + max_lifetime`, never earlier (an attempt is always
    /// made before giving up, even for a message recovered from a spool that sat idle past its
    /// lifetime). Unlike Postfix, a retry that would fall after that deadline is moved *to* the
    /// deadline, so the final attempt, and the bounce, come when the lifetime ends and not up to
    /// one full schedule step later.
    ///
    /// * `attempts_made == 0`: nothing was tried yet, due at once (`RetryAt(now_ms)`).
    /// * `now_ms >= arrival_ms + max_lifetime`: [`NextStep::Expire`].
    /// * an empty schedule: [`NextStep::Expire`] (no retries configured).
    /// * otherwise `RetryAt(min(now + delay_after(attempts_made), deadline))`.
    pub fn next_attempt(&self, attempts_made: u16, arrival_ms: u64, now_ms: u64) -> NextStep {
        if attempts_made == 0 {
            return NextStep::RetryAt(now_ms);
        }
        let deadline = self.expires_at_ms(arrival_ms);
        if now_ms >= deadline {
            return NextStep::Expire;
        }
        match self.delay_after(attempts_made) {
            Some(delay) => NextStep::RetryAt(now_ms.saturating_add(as_ms(delay)).min(deadline)),
            None => NextStep::Expire,
        }
    }
}

/// One heap slot: the due time and the caller's item, nothing else (16 bytes for a `u32` item).
struct Entry<T> {
    due_ms: u64,
    item: T,
}

// Ordered by due time only and reversed, so `BinaryHeap` (a max-heap) pops the earliest first.
// Items with equal due times come out in an unspecified (but deterministic) order.
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        other.due_ms.cmp(&self.due_ms)
    }
}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.due_ms == other.due_ms
    }
}
impl<T> Eq for Entry<T> {}

/// Result of [`DueQueue::pop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pop<T> {
    /// This item is due (its time is at or before `now`).
    Ready(T),
    /// Nothing is due; the earliest item is due this much later (a poll timeout).
    Sleep(Duration),
    /// The queue is empty.
    Empty,
}

/// A min-heap of items keyed by due time (milliseconds since the epoch).
///
/// Built to hold millions of entries: one flat `Vec` of `(due, item)` slots, no per-entry
/// allocation beyond what `T` owns, so with a `u32` index as `T` an entry is 16 bytes.
/// `push` and `pop_due` are O(log n); `next_due` is O(1). There is no removal by key: a caller
/// that cancels an item leaves it in place and ignores it when it comes out (lazy deletion),
/// which keeps entries this small.
pub struct DueQueue<T> {
    heap: BinaryHeap<Entry<T>>,
}

impl<T> Default for DueQueue<T> {
    fn default() -> Self {
        DueQueue::new()
    }
}

impl<T> std::fmt::Debug for DueQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DueQueue").field("len", &self.len()).field("next_due", &self.next_due()).finish()
    }
}

impl<T> DueQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        DueQueue { heap: BinaryHeap::new() }
    }

    /// An empty queue with room for `n` entries (e.g. the count found by spool recovery).
    pub fn with_capacity(n: usize) -> Self {
        DueQueue { heap: BinaryHeap::with_capacity(n) }
    }

    /// Adds `item`, due at `due_ms`.
    pub fn push(&mut self, due_ms: u64, item: T) {
        self.heap.push(Entry { due_ms, item });
    }

    /// Removes and returns an item due at or before `now_ms` (the earliest one), if any.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<T> {
        if self.heap.peek()?.due_ms > now_ms {
            return None;
        }
        self.heap.pop().map(|e| e.item)
    }

    /// [`DueQueue::pop_due`], and when nothing is due, how long until something is.
    pub fn pop(&mut self, now_ms: u64) -> Pop<T> {
        match self.heap.peek() {
            None => Pop::Empty,
            Some(e) if e.due_ms > now_ms => Pop::Sleep(Duration::from_millis(e.due_ms - now_ms)),
            Some(_) => self.heap.pop().map_or(Pop::Empty, |e| Pop::Ready(e.item)),
        }
    }

    /// The earliest due time, if any.
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|e| e.due_ms)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Gives back memory after a large queue drained.
    pub fn shrink_to_fit(&mut self) {
        self.heap.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: u64 = 60_000;

    fn policy(schedule_min: &[u64], lifetime_min: u64) -> RetryPolicy {
        RetryPolicy {
            schedule: schedule_min.iter().map(|&m| Duration::from_millis(m * MIN)).collect(),
            max_lifetime: Duration::from_millis(lifetime_min * MIN),
        }
    }

    #[test]
    fn next_attempt_table() {
        use NextStep::*;
        let p = policy(&[1, 5, 15], 600);
        let t0 = 1_700_000_000_000u64;
        // (attempts made, now - arrival in minutes, expected)
        let table: &[(u16, u64, NextStep)] = &[
            (0, 0, RetryAt(t0)),
            (1, 0, RetryAt(t0 + MIN)),
            (2, 1, RetryAt(t0 + MIN + 5 * MIN)),
            (3, 6, RetryAt(t0 + 6 * MIN + 15 * MIN)),
            // The last delay repeats.
            (4, 21, RetryAt(t0 + 36 * MIN)),
            (40, 300, RetryAt(t0 + 315 * MIN)),
            (u16::MAX, 400, RetryAt(t0 + 415 * MIN)),
            // A retry past the deadline is moved to the deadline...
            (9, 590, RetryAt(t0 + 600 * MIN)),
            // ...and a failure at or after it expires.
            (10, 600, Expire),
            (10, 601, Expire),
            (1, 10_000, Expire),
            // Never attempted (e.g. recovered late): try once first.
            (0, 10_000, RetryAt(t0 + 10_000 * MIN)),
        ];
        for &(n, age_min, want) in table {
            assert_eq!(p.next_attempt(n, t0, t0 + age_min * MIN), want, "attempts {n}, age {age_min}m");
        }
    }

    #[test]
    fn default_matches_spec() {
        let p = RetryPolicy::default();
        let mins: Vec<u64> = p.schedule.iter().map(|d| d.as_secs() / 60).collect();
        assert_eq!(mins, [1, 5, 15, 30, 60, 120, 240]);
        assert_eq!(p.max_lifetime, Duration::from_secs(432_000));
        assert_eq!(p.delay_after(7), Some(Duration::from_secs(4 * 3600)));
        assert_eq!(p.delay_after(100), Some(Duration::from_secs(4 * 3600)));
        assert_eq!(p.delay_after(0), None);
    }

    #[test]
    fn empty_schedule_and_edges() {
        let none = policy(&[], 60);
        assert_eq!(none.next_attempt(1, 0, 0), NextStep::Expire);
        assert_eq!(none.next_attempt(0, 0, 5), NextStep::RetryAt(5));
        let zero_life = policy(&[1], 0);
        assert_eq!(zero_life.next_attempt(1, 1000, 1000), NextStep::Expire);
        // Clock went backwards: the age is negative, still retried.
        let p = policy(&[1], 10);
        assert_eq!(p.next_attempt(1, 10 * MIN, 0), NextStep::RetryAt(MIN));
        // No overflow near the end of time, and an endless lifetime.
        let forever = RetryPolicy { schedule: vec![Duration::MAX], max_lifetime: Duration::MAX };
        assert_eq!(forever.next_attempt(3, u64::MAX - 5, u64::MAX - 1), NextStep::RetryAt(u64::MAX));
        assert_eq!(forever.expires_at_ms(7), u64::MAX);
    }

    #[test]
    fn expired_status_is_4_4_7() {
        assert_eq!(EXPIRED_STATUS, (4, 4, 7));
        assert_eq!(EXPIRED_TEXT, "delivery time expired");
    }

    #[test]
    fn due_queue_order_and_pop() {
        let mut q = DueQueue::new();
        assert_eq!(q.pop(0), Pop::Empty);
        assert_eq!(q.next_due(), None);
        for (due, item) in [(50u64, 5u32), (10, 1), (30, 3), (20, 2), (40, 4)] {
            q.push(due, item);
        }
        assert_eq!(q.len(), 5);
        assert_eq!(q.next_due(), Some(10));
        assert_eq!(q.pop_due(9), None);
        assert_eq!(q.pop(5), Pop::Sleep(Duration::from_millis(5)));
        assert_eq!(q.pop_due(10), Some(1));
        assert_eq!(q.pop(35), Pop::Ready(2));
        assert_eq!(q.pop_due(35), Some(3));
        assert_eq!(q.pop_due(35), None);
        assert_eq!(q.pop_due(u64::MAX), Some(4));
        assert_eq!(q.pop(u64::MAX), Pop::Ready(5));
        assert!(q.is_empty());
    }

    #[test]
    fn due_queue_entry_is_compact() {
        assert_eq!(std::mem::size_of::<Entry<u32>>(), 16);
        assert_eq!(std::mem::size_of::<Entry<u64>>(), 16);
    }

    proptest! {
        /// Against a sorted model: pop_due yields exactly the items due at `now`, earliest first,
        /// and next_due is the model's minimum.
        #[test]
        fn due_queue_matches_model(ops in proptest::collection::vec((any::<bool>(), 0u64..1000), 0..300)) {
            let mut q = DueQueue::new();
            let mut model: Vec<(u64, u32)> = Vec::new();
            for (i, (is_push, t)) in ops.into_iter().enumerate() {
                if is_push {
                    q.push(t, i as u32);
                    model.push((t, i as u32));
                } else {
                    let min = model.iter().map(|e| e.0).min();
                    match q.pop_due(t) {
                        Some(item) => {
                            let pos = model.iter().position(|e| e.1 == item).expect("popped an unknown item");
                            prop_assert!(model[pos].0 <= t);
                            prop_assert_eq!(Some(model[pos].0), min);
                            model.swap_remove(pos);
                        }
                        None => prop_assert!(!matches!(min, Some(m) if m <= t)),
                    }
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(q.next_due(), model.iter().map(|e| e.0).min());
            }
            // Draining gives nondecreasing due times.
            let mut last = 0;
            while let Some(d) = q.next_due() {
                prop_assert!(d >= last);
                last = d;
                prop_assert!(q.pop_due(d).is_some());
            }
        }

        /// The retry time is always after now, never after the deadline, and expiry happens
        /// exactly when the deadline has passed.
        #[test]
        fn next_attempt_invariants(n in 1u16..100, age in 0u64..600_000_000, arrival in 0u64..1u64 << 50) {
            let p = RetryPolicy::default();
            let now = arrival + age;
            let deadline = p.expires_at_ms(arrival);
            match p.next_attempt(n, arrival, now) {
                NextStep::Expire => prop_assert!(now >= deadline),
                NextStep::RetryAt(t) => {
                    prop_assert!(now < deadline);
                    prop_assert!(t > now && t <= deadline);
                }
            }
        }
    }
}
