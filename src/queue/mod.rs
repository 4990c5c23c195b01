//! Pure: the in-memory delivery queue — messages × recipients grouped by destination.
//!
//! Bodies and envelopes stay in the spool; the queue keeps, per message, its spool location and
//! one small entry per recipient (status, attempts, next attempt, destination index), so a
//! backlog of a million recipients costs tens of megabytes, not gigabytes. Each destination has
//! a FIFO of messages ready for it; deferred work waits in a [`schedule::DueQueue`] until its
//! retry time. Nothing here does I/O or reads the clock.

pub mod schedule;

use std::collections::{HashMap, VecDeque};

use slab::Slab;

use crate::message::{Envelope, QueueId};
use crate::spool::{MessageLoc, Pending, Pins, RcptStatus, StoredMessage};
use schedule::DueQueue;

/// Index of a message in the queue.
pub type MsgKey = u32;
/// Index of a destination.
pub type DestId = u32;

/// One recipient's delivery state (16 bytes).
#[derive(Debug, Clone, Copy)]
pub struct QRcpt {
    /// Next attempt, Unix ms (0: now).
    pub next_ms: u64,
    /// Destination it belongs to.
    pub dest: DestId,
    /// Attempts made.
    pub attempts: u16,
    /// Latest status.
    pub status: RcptStatus,
    /// [`IN_FLIGHT`] and the recipient's `NOTIFY=` bits ([`crate::message::notify`]), which
    /// decide whether its failure is reported in a DSN.
    flags: u8,
}

/// Flag of a recipient that is part of a transaction under way.
const IN_FLIGHT: u8 = 0x80;

impl QRcpt {
    fn open(&self) -> bool {
        matches!(self.status, RcptStatus::Queued | RcptStatus::Deferred)
    }

    /// Not final yet (queued or deferred).
    pub fn is_open(&self) -> bool {
        self.open()
    }

    /// Part of a transaction under way.
    pub fn in_flight(&self) -> bool {
        self.flags & IN_FLIGHT != 0
    }

    fn set_in_flight(&mut self, on: bool) {
        self.flags = if on { self.flags | IN_FLIGHT } else { self.flags & !IN_FLIGHT };
    }

    /// The recipient's `NOTIFY=` bits (RFC 3461 §4.1; 0: not given).
    pub fn notify(&self) -> u8 {
        self.flags & !IN_FLIGHT
    }
}

/// One queued message.
#[derive(Debug)]
pub struct QMsg {
    /// Queue id.
    pub id: QueueId,
    /// Where its record is.
    pub loc: MessageLoc,
    /// Arrival, Unix ms.
    pub arrival_ms: u64,
    /// Recipients in envelope order.
    pub rcpts: Box<[QRcpt]>,
    /// Spool segments its outcome records keep (handed back to the spool when it is done).
    pub pins: Pins,
    /// Recipients not yet final.
    pub open: u32,
    /// The reverse path is null (`<>`): its failures are never bounced (RFC 5321 §4.5.5).
    pub null_sender: bool,
}

/// A destination: a recipient domain (or the relay host) as reached from one egress source.
/// With several sources a domain has one destination per source: a connection then carries
/// only messages of its own source.
#[derive(Debug)]
pub struct Dest {
    /// Domain, lowercased (or the relay host name).
    pub name: Box<str>,
    /// The egress source its connections leave from (`delivery::sources`; 0 without sources).
    pub source: u16,
    /// Messages with recipients ready for this destination.
    pub ready: VecDeque<(MsgKey, QueueId)>,
}

/// Work for one transaction: recipients of one message for one destination.
#[derive(Debug, Clone)]
pub struct Job {
    /// The message.
    pub msg: MsgKey,
    /// Its id (guards against a reused key).
    pub id: QueueId,
    /// The destination.
    pub dest: DestId,
    /// Recipient indexes (envelope order).
    pub rcpts: Vec<u32>,
}

/// The queue.
#[derive(Debug, Default)]
pub struct Queue {
    msgs: Slab<QMsg>,
    dests: Vec<Dest>,
    /// Destinations by name, one per source.
    by_name: HashMap<Box<str>, Vec<DestId>>,
    /// Destinations whose ready list may be non-empty (deduplicated by `wanted`).
    wanting: Vec<DestId>,
    wanted: Vec<bool>,
    due: DueQueue<(MsgKey, QueueId, DestId)>,
    /// Route every recipient to this one destination name (relay host mode).
    single: Option<Box<str>>,
    /// Destination name of an address without a domain (`<postmaster>`, RFC 5321 §4.5.1):
    /// this relay's host name, whose mail exchanger's postmaster is ours.
    local: Box<str>,
}

/// The destination name of a recipient address: its domain lowercased (`postmaster` without a
/// domain has none).
pub fn domain_of(addr: &[u8]) -> Option<&[u8]> {
    memchr::memrchr(b'@', addr).map(|at| &addr[at + 1..])
}

impl Queue {
    /// An empty queue; with `single`, every recipient goes to that one destination. An address
    /// without a domain goes to `hostname` (ours).
    pub fn new(single: Option<&str>, hostname: &str) -> Queue {
        let mut q = Queue::default();
        q.single = single.map(|name| {
            q.dest_id(0, name.as_bytes());
            name.to_ascii_lowercase().into()
        });
        q.dest_id(0, hostname.as_bytes());
        q.local = hostname.to_ascii_lowercase().into();
        q
    }

    /// Interns a destination: `name` as reached from egress source `source`.
    pub fn dest_id(&mut self, source: u16, name: &[u8]) -> DestId {
        let dests = &self.dests;
        let of_source = |ids: &Vec<DestId>| ids.iter().copied().find(|&d| dests[d as usize].source == source);
        // Domains are compared case-insensitively (RFC 5321 §2.4). The common case, an ASCII
        // name already in lower case and already known, is looked up without allocating.
        if !name.iter().any(|b| b.is_ascii_uppercase()) {
            if let Some(id) = std::str::from_utf8(name).ok().and_then(|n| self.by_name.get(n)).and_then(of_source) {
                return id;
            }
        }
        let lower = String::from_utf8_lossy(name).to_lowercase().into_boxed_str();
        if let Some(id) = self.by_name.get(&lower).and_then(of_source) {
            return id;
        }
        let id = self.dests.len() as DestId;
        self.dests.push(Dest { name: lower.clone(), source, ready: VecDeque::new() });
        self.wanted.push(false);
        self.by_name.entry(lower).or_default().push(id);
        id
    }

    /// The destination.
    pub fn dest(&self, id: DestId) -> &Dest {
        &self.dests[id as usize]
    }

    /// Number of destinations known.
    pub fn dest_count(&self) -> usize {
        self.dests.len()
    }

    /// A message.
    pub fn msg(&self, key: MsgKey) -> Option<&QMsg> {
        self.msgs.get(key as usize)
    }

    /// Messages queued.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Adds a message: its id, location, arrival and (when recovered) recipient states and
    /// outcome segments come from `rec`; an empty `rec.rcpts` means every recipient is new.
    /// Every recipient goes to a destination of egress source `source`. Recipients already
    /// final stay so; due ones go to their destination's ready list, later ones to the due
    /// queue. Returns `None` when nothing is left to deliver.
    pub fn insert(&mut self, rec: &StoredMessage, env: &Envelope, source: u16, now_ms: u64) -> Option<MsgKey> {
        let states = if rec.rcpts.is_empty() { None } else { Some(&rec.rcpts[..]) };
        let mut rcpts = Vec::with_capacity(env.rcpt_count());
        let mut open = 0;
        // The names are moved out and back (not cloned) while they are interned.
        let (single_name, local_name) = (self.single.take(), std::mem::take(&mut self.local));
        let single = single_name.as_deref().map(|n| self.dest_id(source, n.as_bytes()));
        let local = self.dest_id(source, local_name.as_bytes());
        (self.single, self.local) = (single_name, local_name);
        for (i, r) in env.rcpts().enumerate() {
            let dest = match single {
                Some(d) => d,
                None => match domain_of(r.addr) {
                    Some(name) => self.dest_id(source, name),
                    None => local,
                },
            };
            let (status, attempts, next_ms) = match states.and_then(|s| s.get(i)) {
                Some(s) => (s.status, s.attempts, s.next_attempt_ms),
                None => (RcptStatus::Queued, 0, 0),
            };
            let q = QRcpt { next_ms, dest, attempts, status, flags: r.notify & !IN_FLIGHT };
            if q.open() {
                open += 1;
            }
            rcpts.push(q);
        }
        if open == 0 {
            return None;
        }
        let key = self.msgs.insert(QMsg {
            id: rec.id,
            loc: rec.loc,
            arrival_ms: rec.arrival_ms,
            rcpts: rcpts.into_boxed_slice(),
            pins: rec.pins.clone(),
            open,
            null_sender: !crate::dsn::should_bounce(&env.sender),
        }) as MsgKey;
        self.schedule_open(key, None, now_ms);
        Some(key)
    }

    /// Puts every open, idle recipient group of `key` (of `only` that destination, when given)
    /// on its destination's ready list (if due) or in the due queue.
    fn schedule_open(&mut self, key: MsgKey, only: Option<DestId>, now_ms: u64) {
        let Some(m) = self.msgs.get(key as usize) else { return };
        let id = m.id;
        // Earliest time per destination among open, idle recipients.
        let mut per_dest: Vec<(DestId, u64)> = Vec::new();
        for r in m.rcpts.iter().filter(|r| r.open() && !r.in_flight() && only.is_none_or(|d| d == r.dest)) {
            match per_dest.iter_mut().find(|(d, _)| *d == r.dest) {
                Some((_, t)) => *t = (*t).min(r.next_ms),
                None => per_dest.push((r.dest, r.next_ms)),
            }
        }
        for (dest, at) in per_dest {
            if at <= now_ms {
                self.make_ready(dest, key, id);
            } else {
                self.due.push(at, (key, id, dest));
            }
        }
    }

    fn make_ready(&mut self, dest: DestId, key: MsgKey, id: QueueId) {
        self.dests[dest as usize].ready.push_back((key, id));
        if !self.wanted[dest as usize] {
            self.wanted[dest as usize] = true;
            self.wanting.push(dest);
        }
    }

    /// Moves work whose retry time has come to the ready lists; returns how many (message,
    /// destination) jobs moved.
    pub fn promote_due(&mut self, now_ms: u64) -> usize {
        let mut moved = 0;
        while let Some((key, id, dest)) = self.due.pop_due(now_ms) {
            if self.msgs.get(key as usize).is_some_and(|m| m.id == id) {
                self.make_ready(dest, key, id);
                moved += 1;
            }
        }
        moved
    }

    /// A queue flush: every waiting recipient is due now (`next_ms` 0, so a clock stepping
    /// back cannot strand it) and its message goes on its destination's ready list — also one
    /// whose sibling for the same destination is in flight (it has no due entry: it is
    /// scheduled again, now at once, when that job settles). Returns how many (message,
    /// destination) jobs were waiting.
    pub fn flush(&mut self) -> usize {
        for (_, m) in self.msgs.iter_mut() {
            for r in m.rcpts.iter_mut().filter(|r| r.open() && !r.in_flight()) {
                r.next_ms = 0;
            }
        }
        self.promote_due(u64::MAX)
    }

    /// When the next deferred work is due (Unix ms).
    pub fn next_due(&self) -> Option<u64> {
        self.due.next_due()
    }

    /// Takes the list of destinations that may have ready work (the caller serves them and
    /// calls [`Queue::want`] again for those it could not finish).
    pub fn take_wanting(&mut self) -> Vec<DestId> {
        for &d in &self.wanting {
            self.wanted[d as usize] = false;
        }
        std::mem::take(&mut self.wanting)
    }

    /// True when some destination may have ready work.
    pub fn has_wanting(&self) -> bool {
        !self.wanting.is_empty()
    }

    /// Marks a destination as having ready work to look at.
    pub fn want(&mut self, dest: DestId) {
        if !self.wanted[dest as usize] {
            self.wanted[dest as usize] = true;
            self.wanting.push(dest);
        }
    }

    /// Arrival (Unix ms) of the first live message on `dest`'s ready list (stale entries at
    /// the front are dropped).
    pub fn ready_front_arrival(&mut self, dest: DestId) -> Option<u64> {
        let ready = &mut self.dests[dest as usize].ready;
        while let Some(&(key, id)) = ready.front() {
            match self.msgs.get(key as usize).filter(|m| m.id == id) {
                Some(m) => return Some(m.arrival_ms),
                None => {
                    ready.pop_front();
                }
            }
        }
        None
    }

    /// Marks every destination with ready work as wanting service (after a resume or reload).
    pub fn want_all_ready(&mut self) {
        for d in 0..self.dests.len() {
            if !self.dests[d].ready.is_empty() {
                self.want(d as DestId);
            }
        }
    }

    /// True when `dest` has messages on its ready list.
    pub fn has_ready(&self, dest: DestId) -> bool {
        !self.dests[dest as usize].ready.is_empty()
    }

    /// The next job for `dest`: every open, idle, due recipient of the first ready message.
    /// Marks them in flight.
    pub fn pop_job(&mut self, dest: DestId, now_ms: u64) -> Option<Job> {
        while let Some((key, id)) = self.dests[dest as usize].ready.pop_front() {
            let Some(m) = self.msgs.get_mut(key as usize).filter(|m| m.id == id) else { continue };
            let mut rcpts = Vec::new();
            for (i, r) in m.rcpts.iter_mut().enumerate() {
                if r.dest == dest && r.open() && !r.in_flight() && r.next_ms <= now_ms {
                    r.set_in_flight(true);
                    rcpts.push(i as u32);
                }
            }
            if !rcpts.is_empty() {
                return Some(Job { msg: key, id, dest, rcpts });
            }
        }
        None
    }

    /// Every open recipient of `key` for `dest` that is not in flight, whether due or not, as
    /// a job (marked in flight), for an operator's bounce; `None` when there is none. Its
    /// stale ready-list and due entries are skipped when they come up (nothing idle is left).
    pub fn take_idle(&mut self, key: MsgKey, dest: DestId) -> Option<Job> {
        let m = self.msgs.get_mut(key as usize)?;
        let mut rcpts = Vec::new();
        for (i, r) in m.rcpts.iter_mut().enumerate() {
            if r.dest == dest && r.open() && !r.in_flight() {
                r.set_in_flight(true);
                rcpts.push(i as u32);
            }
        }
        (!rcpts.is_empty()).then_some(Job { msg: key, id: m.id, dest, rcpts })
    }

    /// The destinations of a name, one per egress source, without interning it (empty:
    /// never seen).
    pub fn find_dests(&self, name: &str) -> &[DestId] {
        self.by_name.get(name.to_ascii_lowercase().as_str()).map_or(&[], Vec::as_slice)
    }

    /// Every queued message with its key.
    pub fn messages(&self) -> impl Iterator<Item = (MsgKey, &QMsg)> + '_ {
        self.msgs.iter().map(|(k, m)| (k as MsgKey, m))
    }

    /// Records the outcome of one recipient of a job. Returns true when the message has no
    /// open recipient left (the caller then releases it with [`Queue::remove`]).
    pub fn settle(&mut self, key: MsgKey, rcpt: u32, status: RcptStatus, attempts: u16, next_ms: u64) -> bool {
        let Some(m) = self.msgs.get_mut(key as usize) else { return false };
        let Some(r) = m.rcpts.get_mut(rcpt as usize) else { return false };
        let was_open = r.open();
        r.set_in_flight(false);
        r.status = status;
        r.attempts = attempts;
        r.next_ms = next_ms;
        if was_open && !r.open() {
            m.open -= 1;
        }
        m.open == 0
    }

    /// After a job's recipients are settled: schedules what is still open for that job's
    /// destination (the other destinations' recipients are already scheduled).
    pub fn reschedule(&mut self, key: MsgKey, dest: DestId, now_ms: u64) {
        self.schedule_open(key, Some(dest), now_ms);
    }

    /// Returns a job's recipients to the ready list untouched (e.g. the connection could not be
    /// used and another will take them).
    pub fn requeue(&mut self, job: &Job) {
        let Some(m) = self.msgs.get_mut(job.msg as usize).filter(|m| m.id == job.id) else { return };
        for &i in &job.rcpts {
            if let Some(r) = m.rcpts.get_mut(i as usize) {
                r.set_in_flight(false);
            }
        }
        self.make_ready(job.dest, job.msg, job.id);
    }

    /// Records where an outcome record of `key` went (it pins that spool segment).
    pub fn add_outcome(&mut self, key: MsgKey, ticket: Pending) {
        if let Some(m) = self.msgs.get_mut(key as usize) {
            m.pins.add(ticket);
        }
    }

    /// Removes a finished message, returning it (for spool release).
    pub fn remove(&mut self, key: MsgKey) -> Option<QMsg> {
        self.msgs.try_remove(key as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::RcptState;

    fn msg(id: u64, rcpts: &[(&str, u64)]) -> (StoredMessage, Envelope) {
        let mut env = Envelope::default();
        for (addr, _) in rcpts {
            env.push_rcpt(addr.as_bytes(), b"", 0);
        }
        let states = rcpts
            .iter()
            .map(|&(_, next)| RcptState {
                status: RcptStatus::Deferred,
                attempts: 1,
                next_attempt_ms: next,
                last_reply: Vec::new(),
            })
            .collect();
        let rec = StoredMessage {
            id: QueueId(id),
            loc: MessageLoc { segment: 1, offset: 0, len: 0 },
            arrival_ms: 0,
            rcpts: states,
            pins: Default::default(),
        };
        (rec, env)
    }

    #[test]
    fn a_flush_makes_every_waiting_recipient_due_at_once() {
        let now = 1_000;
        let hour = now + 3_600_000;
        let mut q = Queue::new(None, "mx.test");
        let (a, env_a) = msg(1, &[("x@a.test", hour), ("y@b.test", hour)]);
        let ka = q.insert(&a, &env_a, 0, now).unwrap();
        let (dest_a, dest_b) = (q.dest_id(0, b"a.test"), q.dest_id(0, b"b.test"));
        assert!(q.pop_job(dest_a, now).is_none(), "nothing is due for an hour");
        assert_eq!(q.flush(), 2, "one job per destination was waiting");
        assert_eq!(q.pop_job(dest_a, now).map(|j| (j.msg, j.rcpts)), Some((ka, vec![0])));
        assert_eq!(q.pop_job(dest_b, now).map(|j| (j.msg, j.rcpts)), Some((ka, vec![1])));
        assert_eq!(q.flush(), 0, "both in flight: nothing waits");
    }

    #[test]
    fn a_recipient_costs_16_bytes_and_keeps_its_notify_bits() {
        assert_eq!(std::mem::size_of::<QRcpt>(), 16);
        let mut r = QRcpt { next_ms: 0, dest: 0, attempts: 0, status: RcptStatus::Queued, flags: 0x0f & !IN_FLIGHT };
        r.set_in_flight(true);
        assert!(r.in_flight());
        assert_eq!(r.notify(), 0x0f);
        r.set_in_flight(false);
        assert_eq!((r.in_flight(), r.notify()), (false, 0x0f));
    }

    #[test]
    fn a_flush_reaches_a_recipient_whose_sibling_is_in_flight() {
        let now = 1_000;
        let hour = now + 3_600_000;
        let mut q = Queue::new(None, "mx.test");
        // Same destination: r0 due now, r1 in an hour. The job takes r0 only, and r1 has no due
        // entry of its own (it is scheduled again when r0's job settles).
        let (m, env) = msg(1, &[("x@a.test", 0), ("y@a.test", hour)]);
        let key = q.insert(&m, &env, 0, now).unwrap();
        let dest = q.dest_id(0, b"a.test");
        assert_eq!(q.pop_job(dest, now).map(|j| j.rcpts), Some(vec![0]));
        assert_eq!(q.flush(), 0);
        // r0 is deferred for an hour; r1, flushed meanwhile, is due at once.
        q.settle(key, 0, RcptStatus::Deferred, 1, hour);
        q.reschedule(key, dest, now);
        assert_eq!(q.pop_job(dest, now).map(|j| j.rcpts), Some(vec![1]));
    }
}
