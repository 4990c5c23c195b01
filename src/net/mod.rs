//! Socket drivers: the only code (with `reactor`) that does network I/O.

pub mod control;
pub mod deadline;
pub mod dns;
pub mod inbound;
pub mod outbound;
pub mod socket;
pub mod tls;
pub mod token;
pub mod transport;
