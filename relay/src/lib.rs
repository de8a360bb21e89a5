//! `relay`: a security relay for a gateway between a client network and a server network.
//!
//! For each configured service it makes clients reach the server at the security level the
//! client network needs (plain, TLS or mutual TLS) while the backend sees the connection at the
//! level the server network needs. Modules, in the order a connection meets them:
//! - [`config`]: the TOML contract, validated with errors that name file, line and key.
//! - [`supervisor`]: `relay run`: data path, listeners, ticket keys, control socket, and the
//!   worker's life; [`handoff`] is its channel to the worker, [`control`] the control protocol.
//! - [`worker`]: the process that relays; restarted by the supervisor if it dies.
//! - [`proxy`]: per service, accepts and relays connections (limits, timeouts, outcomes).
//! - [`tls`]: rustls configurations built from a service's config; [`tickets`]: session ticket
//!   keys shared across worker generations.
//! - [`copy`]: moves bytes both ways with half-close and idle timeout.
//! - [`metrics`]: counters per service and outcome.
//! - [`datapath`]: the embedded eBPF object (transparent mode).
//! - [`watch`]: files whose changes apply without a reload (CRLs).

pub mod access;
pub mod cli;
pub mod config;
pub mod control;
pub mod copy;
pub mod datapath;
pub mod handoff;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod recognise;
pub mod supervisor;
pub mod tickets;
pub mod tls;
pub mod watch;
pub mod worker;
