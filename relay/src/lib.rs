//! `relay`: a security relay for a gateway between a client network and a server network.
//!
//! For each configured service it makes clients reach the server at the security level the
//! client network needs (plain, TLS or mutual TLS) while the backend sees the connection at the
//! level the server network needs. Modules, roughly in the order a change and then a
//! connection meet them:
//! - [`cli`], [`config`]: the command line and the TOML contract (schema and the checks that
//!   need no other file), errors naming file, line and key.
//! - [`service`]: compile once — a configuration and the bytes of its files become services
//!   (rustls configurations, client policies), checked in full.
//! - [`supervisor`]: `relay run`: data path, listeners, ticket keys, control socket, changes,
//!   and the worker's life; [`handoff`] is its channel to the worker, [`control`] the control
//!   protocol, [`watch`] the files that apply without a reload (CRLs).
//! - [`worker`]: the process that relays, in its [`sandbox`]; restarted if it dies.
//! - [`proxy`]: per service, accepts and relays connections (limits, timeouts, outcomes);
//!   [`recognise`] tells TLS from plaintext on a TLS port; [`proxy_protocol`] writes PROXY
//!   headers.
//! - [`tls`]: material, rustls configurations, handshakes, the record layer and the client
//!   policy; [`access`]: identities and `allow` rules; [`tickets`]: session ticket keys shared
//!   across worker generations.
//! - [`copy`]: moves bytes both ways with half-close and idle timeout, over [`net`] (writes,
//!   readiness, buffer and pipe pools).
//! - [`metrics`]: counters per service and outcome.
//! - [`datapath`]: the embedded eBPF object (transparent mode).
//! - [`sys`]: users, privileges, limits, signals, mounts — through nix.

pub mod access;
pub mod acme;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod copy;
pub mod datapath;
pub mod directory;
pub mod handoff;
pub mod ipsec;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod proxy_protocol;
pub mod recognise;
pub mod sandbox;
pub mod service;
pub mod sockmap;
pub mod supervisor;
pub mod sys;
pub mod tickets;
pub mod tls;
pub mod watch;
pub mod worker;
