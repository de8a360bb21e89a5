//! Counters per service, updated lock-free on the connection path.
//!
//! Every way a connection can end has a reason label (`Outcome`), so an operator can tell
//! clients speaking the wrong protocol from a backend that is down. The Prometheus exposition
//! reads these counters; today they are also summarised in the log at shutdown.

use std::sync::atomic::{AtomicU64, Ordering};

/// How a connection ended. The label is what logs and metrics show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished.
    Closed,
    IdleTimeout,
    /// The client did not complete the inbound TLS handshake in time.
    HandshakeTimeout,
    /// The inbound TLS handshake failed: not TLS, a bad or missing client certificate, ...
    HandshakeFailed,
    ConnectTimeout,
    ConnectFailed,
    /// The TLS handshake toward the backend failed or timed out.
    BackendHandshakeFailed,
    /// An I/O error while relaying (a reset, ...).
    IoError,
    /// Closed right after accept: the service or the relay is at its connection limit.
    LimitReached,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Closed,
        Outcome::IdleTimeout,
        Outcome::HandshakeTimeout,
        Outcome::HandshakeFailed,
        Outcome::ConnectTimeout,
        Outcome::ConnectFailed,
        Outcome::BackendHandshakeFailed,
        Outcome::IoError,
        Outcome::LimitReached,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::HandshakeTimeout => "handshake_timeout",
            Outcome::HandshakeFailed => "handshake_failed",
            Outcome::ConnectTimeout => "connect_timeout",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::BackendHandshakeFailed => "backend_handshake_failed",
            Outcome::IoError => "io_error",
            Outcome::LimitReached => "limit_reached",
        }
    }
}

#[derive(Debug, Default)]
pub struct ServiceMetrics {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    outcomes: [AtomicU64; Outcome::ALL.len()],
}

impl ServiceMetrics {
    pub fn opened(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self, outcome: Outcome, up: u64, down: u64) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.count(outcome);
        self.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.bytes_down.fetch_add(down, Ordering::Relaxed);
    }

    /// Counts an outcome for a connection that never became active (e.g. over the limit).
    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize].load(Ordering::Relaxed)
    }

    /// A snapshot for `relay status`.
    pub fn snapshot(&self, service: &str) -> ServiceStatus {
        ServiceStatus {
            service: service.to_string(),
            accepted: self.accepted.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| (o.label().to_string(), self.outcome(*o)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }

    /// `accepted=3 active=0 closed=2 handshake_failed=1 ...`, zero outcomes left out.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "accepted={} active={} bytes_up={} bytes_down={}",
            self.accepted.load(Ordering::Relaxed),
            self.active.load(Ordering::Relaxed),
            self.bytes_up.load(Ordering::Relaxed),
            self.bytes_down.load(Ordering::Relaxed),
        );
        for o in Outcome::ALL {
            let n = self.outcome(o);
            if n > 0 {
                s.push_str(&format!(" {}={n}", o.label()));
            }
        }
        s
    }
}

/// Connection counters of one service, as a worker reports them.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub accepted: u64,
    pub active: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub outcomes: std::collections::BTreeMap<String, u64>,
}
