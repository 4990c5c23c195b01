//! Socket drivers: the only code (with `reactor`) that does network I/O.

pub mod inbound;
pub mod socket;
