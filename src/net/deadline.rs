//! `Deadlines`: one table of timers for every kind of socket the loop drives — inbound
//! sessions today; outbound connections and DNS queries can key theirs by token too.
//!
//! Owns: at most one live deadline per key (a `mio::Token`, whose generation makes a reused
//! slab slot a different key), the earliest of them for the poll timeout ([`Deadlines::next`]),
//! and handing out the expired ones ([`Deadlines::expired`]). Must never: read the clock (time
//! comes in as `now`), or know what a key's owner does when it fires.
//!
//! A session's deadline moves on nearly every read; pushing a heap entry each time would grow
//! the heap per command. So a later deadline only updates the key's slot, and the heap keeps
//! the earlier entry: when that pops, the key is pushed again at its real time (lazy
//! re-arming). An earlier deadline pushes a new entry; the older one is then stale and
//! skipped when it pops, as is the entry of a cancelled key.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;
use std::time::Instant;

/// The live deadline of one key.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// When the key is due.
    at: Instant,
    /// The time of the key's live heap entry (`<= at`); entries at other times are stale.
    queued: Instant,
}

/// Deadlines keyed by `K`; see the module doc.
#[derive(Debug)]
pub struct Deadlines<K> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
    live: HashMap<K, Slot>,
}

impl<K> Default for Deadlines<K> {
    fn default() -> Self {
        Deadlines { heap: BinaryHeap::new(), live: HashMap::new() }
    }
}

impl<K: Copy + Eq + Hash + Ord> Deadlines<K> {
    /// Sets `key`'s deadline to `at` (earlier or later than before).
    pub fn arm(&mut self, key: K, at: Instant) {
        match self.live.get_mut(&key) {
            // The live entry comes first: it pops, sees `at`, and re-arms once.
            Some(slot) if slot.queued <= at => slot.at = at,
            Some(slot) => {
                *slot = Slot { at, queued: at };
                self.heap.push(Reverse((at, key)));
            }
            None => {
                self.live.insert(key, Slot { at, queued: at });
                self.heap.push(Reverse((at, key)));
            }
        }
    }

    /// Forgets `key`'s deadline (its heap entry is skipped when it pops).
    pub fn cancel(&mut self, key: K) {
        self.live.remove(&key);
    }

    /// `key`'s deadline, if one is armed.
    pub fn get(&self, key: K) -> Option<Instant> {
        self.live.get(&key).map(|s| s.at)
    }

    /// The earliest time anything may be due, for the poll timeout. May be earlier than the
    /// true earliest deadline (a lazily re-armed key): the loop then wakes once for nothing.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|e| e.0 .0)
    }

    /// One key whose deadline is at or before `now`, disarmed; `None` when none is due. Call
    /// until `None`.
    pub fn expired(&mut self, now: Instant) -> Option<K> {
        while let Some(&Reverse((at, key))) = self.heap.peek() {
            if at > now {
                return None;
            }
            self.heap.pop();
            let Some(slot) = self.live.get_mut(&key) else { continue };
            if slot.queued != at {
                continue; // Superseded by an earlier entry pushed since.
            }
            if slot.at > now {
                // Moved later while this entry waited: push it at its real time.
                slot.queued = slot.at;
                self.heap.push(Reverse((slot.at, key)));
                continue;
            }
            self.live.remove(&key);
            return Some(key);
        }
        None
    }

    /// Keys armed.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True when nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn all_expired(d: &mut Deadlines<u64>, now: Instant) -> Vec<u64> {
        std::iter::from_fn(|| d.expired(now)).collect()
    }

    #[test]
    fn fires_in_order_once() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.arm(2, t0 + ms(20));
        d.arm(1, t0 + ms(10));
        d.arm(3, t0 + ms(30));
        assert_eq!(d.next(), Some(t0 + ms(10)));
        assert_eq!(all_expired(&mut d, t0 + ms(5)), Vec::<u64>::new());
        assert_eq!(all_expired(&mut d, t0 + ms(20)), vec![1, 2]);
        assert_eq!(d.len(), 1);
        assert_eq!(all_expired(&mut d, t0 + ms(100)), vec![3]);
        assert!(d.is_empty());
        assert_eq!(d.next(), None);
        assert_eq!(all_expired(&mut d, t0 + ms(200)), Vec::<u64>::new(), "each fires once");
    }

    /// A deadline moved later on every command does not grow the heap, and fires at its
    /// last time only.
    #[test]
    fn later_deadlines_rearm_lazily() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        for i in 0..1000 {
            d.arm(7, t0 + ms(10 + i));
        }
        assert_eq!(d.heap.len(), 1, "a later deadline pushes nothing");
        assert_eq!(d.get(7), Some(t0 + ms(1009)));
        // The early entry pops and is pushed again at the real time: nothing fires yet.
        assert_eq!(all_expired(&mut d, t0 + ms(500)), Vec::<u64>::new());
        assert_eq!(d.next(), Some(t0 + ms(1009)));
        assert_eq!(all_expired(&mut d, t0 + ms(1009)), vec![7]);
    }

    /// An earlier deadline wins at once; the older entry is stale and does not fire again.
    #[test]
    fn earlier_deadline_supersedes() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.arm(1, t0 + ms(100));
        d.arm(1, t0 + ms(10));
        assert_eq!(d.next(), Some(t0 + ms(10)));
        assert_eq!(all_expired(&mut d, t0 + ms(10)), vec![1]);
        assert_eq!(all_expired(&mut d, t0 + ms(1000)), Vec::<u64>::new(), "the stale entry is skipped");
        // Re-armed after firing: a new deadline, fires again.
        d.arm(1, t0 + ms(2000));
        assert_eq!(all_expired(&mut d, t0 + ms(2000)), vec![1]);
    }

    #[test]
    fn cancel_and_reuse() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.arm(1, t0 + ms(10));
        d.arm(2, t0 + ms(10));
        d.cancel(1);
        assert_eq!(d.get(1), None);
        assert_eq!(all_expired(&mut d, t0 + ms(10)), vec![2]);
        // Cancelled, then armed again later: only the new deadline counts.
        d.arm(3, t0 + ms(10));
        d.cancel(3);
        d.arm(3, t0 + ms(50));
        assert_eq!(all_expired(&mut d, t0 + ms(20)), Vec::<u64>::new());
        assert_eq!(all_expired(&mut d, t0 + ms(50)), vec![3]);
        assert!(d.is_empty());
    }
}
