//! sluice: a single-threaded, high-throughput SMTP relay with a durable memory-mapped spool.
//!
//! # Architecture
//! One `mio` event loop ([`reactor`]) owns every socket and reads the clock once per turn; it
//! only dispatches. The decisions are made by pure, sans-IO machines (events in, actions or
//! bytes out, time as an argument): [`smtp::server`] and [`smtp::client`] speak SMTP,
//! [`dns::resolver`] looks names up, [`delivery::Engine`] decides routes, connections,
//! retries and bounces, [`queue`] files recipients by destination. Thin drivers do the I/O:
//! [`net::inbound`] and [`net::outbound`] move bytes through one plain-or-TLS
//! [`net::transport`], [`net::dns`] owns the resolver's sockets, [`spool`] owns the files. All
//! timers of the loop live in one [`net::deadline`] table. Once per loop turn the spool is
//! committed (group commit: the sync thread, `reactor::syncer`, runs one `msync` per dirty
//! segment for every message that finished in that turn) and only when it returns are the
//! `250` replies released.
//!
//! # One message, from socket to outcome
//! 1. **Inbound.** The loop ([`reactor`]) gets a readiness event for an inbound token
//!    ([`net::token`]); [`net::inbound`] reads the bytes into pooled buffers ([`buf`]) and feeds
//!    them to the pure [`smtp::server::ServerSession`], which parses the commands, answers them
//!    and scans DATA (or BDAT chunks) into one body.
//! 2. **Spool.** At the end of the data (after its DKIM signature, computed on a
//!    `reactor::dkimwork` thread when keys are configured: [`dkim`]) the message is appended
//!    to the active segment
//!    ([`spool::Spool::append_message`]; record framing in [`spool::format`], plain types in
//!    [`spool::record`]) and its `250` waits.
//! 3. **Group commit.** Once per turn every append of the turn goes to the sync thread in one
//!    batch ([`reactor::syncer`]); only when the sync returns are the `250`s written, and each
//!    message, now durable, becomes a [`spool::StoredMessage`] handed to delivery.
//! 4. **Queue.** [`net::outbound::Outbound`] reports it to the pure [`delivery::Engine`]
//!    (`handle_committed`), which files its recipients by destination in [`queue::Queue`].
//! 5. **Route and connect.** Each turn the engine serves destinations with ready work: it asks
//!    for a lookup (`Action::Lookup`, answered through [`net::dns`] and the pure
//!    [`dns::resolver`]), then for connections (`Action::Connect`); the driver opens them
//!    ([`net::socket`]) and drives a pure [`smtp::client::ClientSession`] over each.
//! 6. **Transaction.** A ready connection takes a job (`Action::Start`): the driver renders the
//!    envelope and sends the body straight from the spool map; the session's result comes back
//!    as `handle_tx_done` (or `handle_conn_failed`).
//! 7. **Outcome.** The engine decides every recipient ([`delivery::settle`]); a failure that
//!    must be reported gets a DSN first (`Action::Bounce`, text from [`delivery::bounce`]), then
//!    `Action::Settle` has the driver append one outcome record per recipient
//!    ([`spool::Spool::append_outcome`]) and log `event=delivery`. A finished message's
//!    [`spool::Pins`] go back to the spool ([`spool::Spool::release_message`]), which deletes
//!    a segment once nothing in it is needed and the records that finished it are durable.
//!    Deferred recipients wait in the queue's due heap for their retry time.
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
//! | `dkim` | pure | | DKIM signing: keys, relaxed canonicalization, signature fields |
//! | `spool::record` | pure | `message` | plain types the spool hands out |
//! | `spool::format` | pure | `message`, `spool::record` | record codec |
//! | `queue` | pure | `dsn`, `message`, `spool::record` | queue and retry schedule |
//! | `shaping` | pure | | traffic shaping rules: sites, limits, rates, automation, scopes |
//! | `delivery` | pure | `dns`, `dsn`, `message`, `queue`, `shaping`, `smtp`, `spool::format`, `spool::record` | the delivery engine: routes, retries, bounces, TLS policy |
//! | `control` | pure | | the control socket's protocol (`sluice queue` <-> relay) |
//! | `cli` | pure | `delivery`, `dkim`, `shaping`, `smtp` | clap flags and value parsers |
//! | `log` | io: clock | | event lines on stderr |
//! | `spool` | io: fs | `message` | the mmap'd segments and recovery |
//! | `spool::segment` | io: fs, libc, unsafe | `spool::format`, `sys` | one segment file: mmap, msync, fdatasync |
//! | `spool::spare` | io: fs, thread | `spool::segment`, `sys` | spare segment files written ahead of need on their own thread |
//! | `spool::reaper` | io: fs, thread | `spool::segment`, `sys` | finished segments deleted on their own thread |
//! | `net` | io: mio, net, clock, fs, libc | `buf`, `control`, `delivery`, `dkim`, `dns`, `log`, `message`, `queue`, `shaping`, `smtp`, `spool` | socket drivers (inbound, outbound, DNS, control socket), the transport, TLS, the deadline table |
//! | `net::socket` | io: mio, net, libc, unsafe | `sys` | the socket syscalls |
//! | `config` | io: fs | `cli`, `delivery`, `dkim`, `log`, `net`, `shaping`, `smtp` | flags -> `Config`, reads cert, auth, DKIM key and shaping files |
//! | `reactor` | io: mio, net, thread, clock | `buf`, `config`, `control`, `delivery`, `dkim`, `log`, `message`, `net`, `queue`, `shaping`, `smtp`, `spool`, `sys` | the event loop |
//! | `reactor::signal` | io: mio, libc, unsafe | `sys` | signals as loop events, `kill` |
//! | `sys` | io: libc, unsafe | | the `syscall!` macro, the helper threads' scheduling policy |
//! | `admin` | io: clock, fs | `control`, `queue`, `reactor`, `spool` | `sluice queue`: spool reader, control-socket client |

pub mod admin;
pub mod buf;
pub mod cli;
pub mod config;
pub mod control;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod dsn;
pub mod log;
pub mod message;
pub mod net;
pub mod queue;
pub mod reactor;
pub mod shaping;
pub mod smtp;
pub mod spool;
pub mod sys;
