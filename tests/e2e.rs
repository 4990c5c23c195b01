//! End-to-end tests: the real `sluice` binary driven over real TCP sockets, by our own line
//! client and by third-party peers (Python smtplib, swaks, Postfix's smtp-source).

mod e2e {
    pub mod cli;
    pub mod control;
    pub mod delivery;
    pub mod dkim;
    pub mod durability;
    pub mod peers;
    pub mod session;
    pub mod shaping;
    pub mod smarthost;
    pub mod smuggling;
    pub mod sources;
    pub mod support;
    pub mod tls;
    pub mod tls_out;
}
