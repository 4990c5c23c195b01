//! Pure: DNS for outbound delivery (MX, implicit MX, null MX, A/AAAA), as a sans-IO core.
//!
//! Owns: the DNS message codec ([`wire`], the only place that names `hickory-proto` types), the
//! lookup state machine ([`resolver`]: query ids, retries, truncation → TCP, MX ordering, CNAME
//! chasing, coalescing) and the TTL cache ([`cache`]). Must never: open sockets, import `mio`,
//! `crate::reactor` or `crate::net`, or read the clock — `now: Instant` always comes in as an
//! argument. The socket driver is `crate::net::dns::DnsConn`.
//!
//! Only MX, A, AAAA and CNAME matter to delivery (RFC 5321 §5.1, RFC 7505, RFC 2308); PTR
//! serves the start-up FCrDNS check of the egress sources ([`fcrdns`]).

pub mod cache;
pub mod fcrdns;
pub mod resolver;
pub mod wire;

pub use resolver::{DnsError, Handled, MxHost, MxPlan, Resolver, ResolverOptions, Transmit};
pub use wire::QType;
