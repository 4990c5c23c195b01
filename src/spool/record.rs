//! Pure: the plain data the spool stores and hands out — where records lie, a recipient's
//! state, an outcome to append, a stored message, a decoded message view and the pins that keep
//! its segments. No file, map or clock here; `spool/mod.rs` does the I/O.

use crate::message::{Envelope, QueueId};

/// Where a message record lies: segment sequence number, byte offset of its record, record length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageLoc {
    /// Segment sequence number.
    pub segment: u64,
    /// Offset of the record header in the segment.
    pub offset: u64,
    /// Whole record length including header and padding.
    pub len: u64,
}

/// Where a message body lies inside a segment map (see [`Spool::message_with_body`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLoc {
    /// Segment sequence number.
    pub segment: u64,
    /// Offset of the first body byte in the segment.
    pub start: usize,
    /// Body length.
    pub len: usize,
}

/// A ticket for an append not yet known durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pending {
    /// Segment the record went to.
    pub segment: u64,
    /// End offset of the record in that segment.
    pub end: u64,
}

/// Final or temporary state of one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RcptStatus {
    /// No outcome recorded yet.
    Queued = 0,
    /// Accepted by the destination (final).
    Delivered = 1,
    /// Permanently failed (final).
    Failed = 2,
    /// Temporarily failed; retry at `next_attempt_ms`.
    Deferred = 3,
}

/// One delivery outcome for one recipient, as the delivery side records it.
#[derive(Clone, Copy, Debug)]
pub struct Outcome<'a> {
    /// Delivered, Failed or Deferred.
    pub status: RcptStatus,
    /// Attempts made so far, including this one.
    pub attempts: u16,
    /// Next attempt (Unix ms) for Deferred; 0 otherwise.
    pub next_attempt_ms: u64,
    /// When this outcome happened (Unix ms).
    pub at_ms: u64,
    /// The reply that decided it, e.g. `250 2.0.0 Ok` or `451 4.3.0 try later`.
    pub reply: &'a [u8],
    /// Remote host (name and address) that answered, empty if none.
    pub remote: &'a [u8],
    /// For `Failed`: the DSN stored for it (appended before this record), if one was due.
    /// Recovery treats a failure whose DSN record is missing as not final, so that a power loss
    /// that kept the failure but not its DSN retries (and bounces) again instead of dropping
    /// the message silently.
    pub bounce: Option<QueueId>,
}

/// State of one recipient after recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptState {
    /// Latest status.
    pub status: RcptStatus,
    /// Attempts so far.
    pub attempts: u16,
    /// Next attempt (Unix ms) when Deferred.
    pub next_attempt_ms: u64,
    /// Last reply text, empty if none.
    pub last_reply: Vec<u8>,
}

/// A message in the spool with its recipient states: found by recovery, or just committed
/// (every recipient queued, no pins).
#[derive(Clone, Debug)]
pub struct StoredMessage {
    /// Queue id.
    pub id: QueueId,
    /// Where its record is.
    pub loc: MessageLoc,
    /// Arrival time, Unix ms.
    pub arrival_ms: u64,
    /// One state per recipient, in envelope order.
    pub rcpts: Vec<RcptState>,
    /// What the message holds in the spool until [`Spool`](super::Spool) releases it.
    pub pins: Pins,
}

/// The spool segments a queued message keeps alive besides its own record's: one entry per
/// outcome record written for it. Opaque outside the spool: the queue carries it, adds each
/// outcome's [`Pending`] ticket, and hands it back to `Spool::release_message`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins(pub(in crate::spool) Vec<u64>);

impl Pins {
    /// Records that an outcome record of the message went where `ticket` says.
    pub fn add(&mut self, ticket: Pending) {
        self.0.push(ticket.segment);
    }
}

/// A decoded message record borrowed from the spool map.
#[derive(Debug)]
pub struct MessageView<'a> {
    /// Queue id.
    pub id: QueueId,
    /// Arrival, Unix ms.
    pub arrival_ms: u64,
    /// Envelope (owned copy of the small fields).
    pub envelope: Envelope,
    /// The body exactly as it will be sent (the DKIM-Signature fields the relay added, then
    /// the Received header, first), dot-unstuffed.
    pub body: &'a [u8],
}
