//! The socket side of delivery: outbound connections and the I/O that moves their bytes.

mod conn;

pub use conn::{new_conn, ActiveJob, Io, OutboundConn};
