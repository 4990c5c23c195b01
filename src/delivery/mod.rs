//! Pure: outbound delivery's decisions — per-destination routes and connections, domain
//! concurrency, connection reuse, retries, expiry and bounces — as a sans-IO [`Engine`].
//!
//! The engine ([`engine`]) takes events (a message committed, a lookup answered, a connection
//! ready, a transaction done, a connection failed, time passed) and hands out actions; the
//! socket side that executes them is `net::outbound`. Split by concern: `dest` (one
//! destination's route, addresses and backoff), [`settle`] (verdicts, expiry, what a bounce
//! that cannot be stored means), [`bounce`] (the DSN's text and envelope), [`tls`] (the
//! STARTTLS policy and the broken-TLS memory), [`route`] (reply classes and loop detection),
//! [`sources`] (egress sources and pools: which address and EHLO name a message leaves with).
//!
//! # Egress sources (`--source`, `--pool`)
//! A destination is a domain *as reached from one source*: with two sources a domain has two
//! destinations, each with its own connections (a connection only ever carries messages of
//! its source) and its own shaping site (limits per (source, site)). A message's source is
//! chosen at reception and stored with it; [`Engine::handle_committed`] files it under it.
//!
//! # TLS (`--outbound-tls`, RFC 3207)
//! Each connection gets a `TlsPolicy`: `none` never asks; `may` uses STARTTLS when offered
//! without checking the certificate, and when the handshake fails reconnects at once in
//! plaintext to the same address (Postfix's `may`), remembering the address for a while;
//! `encrypt` and `verify` (certificate checked against `--tls-ca-file` for the MX host name)
//! treat a missing STARTTLS, a refusal or a failed handshake as a 4.7.x failure of that host.

pub mod bounce;
mod dest;
pub mod engine;
pub mod route;
pub mod settle;
pub mod sites;
pub mod sources;
pub mod tls;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod harness;
#[cfg(test)]
mod shaping_tests;

use std::time::Duration;

pub use engine::{Action, ConnFailure, ConnId, Engine, Note, Now, StartFailure};
pub use tls::OutboundTls;

use crate::queue::schedule::RetryPolicy;

/// Delivery settings from the command line.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// `--relay-host`: (host, port).
    pub relay_host: Option<(String, u16)>,
    /// `--smtp-port`.
    pub smtp_port: u16,
    /// `--domain-concurrency`.
    pub domain_concurrency: u32,
    /// Retry schedule and lifetime.
    pub policy: RetryPolicy,
    /// Our name in EHLO, DSNs; a mail exchanger of that name is us.
    pub hostname: String,
    /// Time allowed for a TCP connect.
    pub connect_timeout: Duration,
    /// `--outbound-tls`.
    pub tls_mode: OutboundTls,
    /// `--relay-tls` (implied by `--relay-auth-file`): the mode of every connection, above
    /// `--outbound-tls` and any shaping rule (`Verify` or `Implicit`).
    pub relay_tls: Option<OutboundTls>,
    /// `--shaping` over the built-in profiles.
    pub shaping: crate::shaping::Rules,
    /// `--source`, `--pool`, `--user-pool` (empty: the kernel picks the address).
    pub sources: std::sync::Arc<sources::Sources>,
}
