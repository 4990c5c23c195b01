//! Connection deadlines in a min-heap with lazy re-arming.
//!
//! A connection's deadline moves on every read; pushing a heap entry each time would grow the
//! heap per command. Instead each connection has at most one entry: when it pops, the owner
//! compares it with the connection's current deadline and either fires or re-arms once.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// One armed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// When it is due.
    pub at: Instant,
    /// Slab key.
    pub key: usize,
    /// Generation of the connection that armed it.
    pub generation: u32,
}

/// The heap.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<Entry>>,
}

impl Timers {
    /// Arms an entry.
    pub fn arm(&mut self, at: Instant, key: usize, generation: u32) {
        self.heap.push(Reverse(Entry { at, key, generation }));
    }

    /// The earliest due time.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|e| e.0.at)
    }

    /// Pops one entry due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Entry> {
        if self.heap.peek()?.0.at <= now {
            self.heap.pop().map(|e| e.0)
        } else {
            None
        }
    }

    /// Entries held (for tests and stats).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}
