//! sluice: a single-threaded, high-throughput SMTP relay with a durable memory-mapped spool.
//!
//! # Architecture
//! One `mio` event loop ([`reactor`]) owns every socket. Inbound connections are driven by
//! [`net::inbound`], which feeds bytes to the pure protocol machine [`smtp::server`] and appends
//! each finished message to the [`spool`]. Once per loop turn the spool is committed (group
//! commit: the sync thread, `reactor::syncer`, runs one `msync` per dirty segment for every
//! message that finished in that turn) and only when it returns are the `250` replies released.
//!
//! # Layering rule
//! A **pure** module never does I/O: no `mio`, no sockets, no `std::fs` or `std::thread`, no
//! `libc`, and no clock (`Instant::now`, `SystemTime::now`): time comes in as an argument. It
//! imports only pure modules. An **io** module names the kinds of I/O it may use. Every edge
//! between the rows below must be listed under "may use" (a row may always use the rows inside
//! it and the rows it is inside), and the top-level modules, and the rows, form no cycle.
//! `unsafe` lives only in `spool/segment.rs` and `net/socket.rs` (plus the `kill` in
//! `reactor/signal.rs`); every libc call goes through `sys::syscall!` with a `// SAFETY:` note.
//!
//! `tests/module_graph.rs` reads this table and checks every `src/**/*.rs` against it (CI runs
//! it; `#[cfg(test)]` code is exempt). Adding a module is one row; a row inherits the modules
//! under its path unless they have a row of their own. I/O kinds: `mio`, `net` (socket types),
//! `fs`, `thread`, `clock`, `libc`, `unsafe`. A note `allow-cycle: x` lets the row's edge to
//! `x` close a cycle; each one is a TODO.
//!
//! # Module graph
//! | module | kind | may use | notes |
//! |---|---|---|---|
//! | `buf` | pure | | pooled byte buffers |
//! | `message` | pure | | queue ids, envelope, `Received:`, dates |
//! | `smtp` | pure | `buf`, `dns`, `message` | SMTP sessions, parsers, AUTH decoding |
//! | `dns` | pure | | DNS codec, resolver machine, cache |
//! | `dsn` | pure | `message` | bounce reports |
//! | `spool::record` | pure | `message` | plain types the spool hands out |
//! | `spool::format` | pure | `message`, `spool::record` | record codec |
//! | `queue` | pure | `dsn`, `message`, `spool::record` | queue and retry schedule |
//! | `delivery` | pure | `dns`, `dsn`, `message`, `queue`, `smtp`, `spool::format`, `spool::record` | the delivery engine: routes, retries, bounces, TLS policy |
//! | `cli` | pure | `delivery`, `smtp` | clap flags and value parsers |
//! | `log` | io: clock | | event lines on stderr |
//! | `spool` | io: fs | `message` | the mmap'd segments and recovery |
//! | `spool::segment` | io: fs, libc, unsafe | `spool::format`, `sys` | one segment file: mmap, msync, fdatasync |
//! | `net` | io: mio, net, clock, fs, libc | `buf`, `delivery`, `dns`, `log`, `message`, `queue`, `smtp`, `spool` | socket drivers (inbound, outbound, DNS), the transport, TLS, the deadline table |
//! | `net::socket` | io: mio, net, libc, unsafe | `sys` | the socket syscalls |
//! | `config` | io: fs | `cli`, `log`, `net`, `smtp` | flags -> `Config`, reads cert and auth files |
//! | `reactor` | io: mio, net, thread, clock | `buf`, `config`, `delivery`, `log`, `message`, `net`, `queue`, `smtp`, `spool` | the event loop |
//! | `reactor::signal` | io: mio, libc, unsafe | `sys` | signals as loop events, `kill` |
//! | `sys` | io: libc, unsafe | | the `syscall!` macro |
//! | `admin` | io: clock | `reactor`, `spool` | `sluice queue` |

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
pub mod sys;
