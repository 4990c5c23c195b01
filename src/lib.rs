//! sluice: a single-threaded, high-throughput SMTP relay with a durable memory-mapped spool.
//!
//! # Architecture
//! One `mio` event loop ([`reactor`]) owns every socket. Inbound connections are driven by
//! [`net::inbound`], which feeds bytes to the pure protocol machine [`smtp::server`] and appends
//! each finished message to the [`spool`]. Once per loop turn the spool is committed (group
//! commit: one msync + fdatasync for every message that finished in that turn) and only then are
//! the `250` replies released.
//!
//! # Layering rule
//! Modules documented as **pure** (`smtp`, `message`, `spool::format`, `cli` value parsers) never
//! import `mio`, `crate::reactor`, `crate::net`, sockets or read the clock: time comes in as an
//! argument. `unsafe` lives only in `spool/segment.rs` and `net/socket.rs`.

pub mod admin;
pub mod buf;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod dns;
pub mod dsn;
pub mod log;
pub mod message;
pub mod net;
pub mod queue;
pub mod reactor;
pub mod smtp;
pub mod spool;
