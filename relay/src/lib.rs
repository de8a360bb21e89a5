//! `relay`: a security relay for a gateway between a client network and a server network.
//!
//! For each configured service it makes clients reach the server at the security level the
//! client network needs (plain, TLS or mutual TLS) while the backend sees the connection at the
//! level the server network needs. Modules, in the order a connection meets them:
//! - [`config`]: the TOML contract, validated with errors that name file, line and key.
//! - [`run`]: brings services up, stops gracefully.
//! - [`proxy`]: per service, accepts and relays connections (limits, timeouts, outcomes).
//! - [`tls`]: rustls configurations built from a service's config.
//! - [`copy`]: moves bytes both ways with half-close and idle timeout.
//! - [`metrics`]: counters per service and outcome.
//! - [`datapath`]: the embedded eBPF object (transparent mode).

pub mod cli;
pub mod config;
pub mod copy;
pub mod datapath;
pub mod metrics;
pub mod proxy;
pub mod run;
pub mod tls;
