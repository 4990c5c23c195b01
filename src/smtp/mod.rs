//! Pure SMTP protocol code (RFC 5321 and extensions): framing, command parsing, the DATA
//! scanner, replies and the inbound session state machine.
//!
//! Nothing here touches sockets, `mio` or the clock: bytes and time come in as arguments, bytes
//! and events go out. The drivers in `crate::net` do the I/O.

pub mod auth;
pub mod auth_throttle;
pub mod client;
pub mod client_auth;
pub mod client_key;
pub mod client_limit;
pub mod command;
pub mod data;
pub mod line;
pub mod pace;
pub mod reply;
pub mod server;

pub use reply::{Fault, LocalFault};
