//! Counters per service, updated lock-free on the connection path, exported in the Prometheus
//! exposition format and summarised by `relay status`.
//!
//! The worker owns the connection metrics (it is where connections live); the supervisor adds
//! its own (worker restarts) and the data path's per-CPU counters, read from the maps at scrape
//! time, and serves the whole on `[relay] metrics` at `/metrics`. A worker restart resets the
//! worker's counters, which Prometheus treats as the counter reset it is.
//!
//! Every way a connection can end has a reason label ([`Outcome`]), so an operator can tell
//! clients speaking the wrong protocol from a backend that is down.

use std::collections::BTreeMap;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use crate::{copy::PlainCopy, tls::verify::Reason};

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
    /// A TLS peer broke the record protocol after the handshake (a bad record, an unexpected
    /// message, its own fatal alert); the other side was reset.
    TlsError,
    /// A TLS peer closed without close_notify: the other side was reset, so that it cannot take
    /// a truncated stream for a complete one.
    Truncated,
    /// Closed right after accept: the service or the relay is at its connection limit.
    LimitReached,
    /// mtls: a verified client whose identity matches no `allow` rule.
    Denied,
    /// Plaintext on a TLS front port whose `plaintext` policy is `reject`.
    PlaintextRejected,
    /// Plaintext HTTP on a TLS front port, answered with a redirect to https.
    Redirected,
    /// A ClientHello for a server name the service has no certificate for.
    UnknownSni,
    /// An ACME server's tls-alpn-01 validation, answered (`cert = "acme"`).
    AcmeValidation,
    /// `cert = "acme"` and no certificate issued yet.
    NoCertificate,
    /// `outbound.level = "ipsec"` and no SA up toward the backend: the client was reset.
    IpsecUnavailable,
}

impl Outcome {
    pub const ALL: [Outcome; 18] = [
        Outcome::Closed,
        Outcome::IdleTimeout,
        Outcome::HandshakeTimeout,
        Outcome::HandshakeFailed,
        Outcome::ConnectTimeout,
        Outcome::ConnectFailed,
        Outcome::BackendHandshakeFailed,
        Outcome::IoError,
        Outcome::TlsError,
        Outcome::Truncated,
        Outcome::LimitReached,
        Outcome::Denied,
        Outcome::PlaintextRejected,
        Outcome::Redirected,
        Outcome::UnknownSni,
        Outcome::AcmeValidation,
        Outcome::NoCertificate,
        Outcome::IpsecUnavailable,
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
            Outcome::TlsError => "tls_error",
            Outcome::Truncated => "truncated",
            Outcome::LimitReached => "limit_reached",
            Outcome::Denied => "denied",
            Outcome::PlaintextRejected => "plaintext_rejected",
            Outcome::Redirected => "redirected",
            Outcome::UnknownSni => "unknown_sni",
            Outcome::AcmeValidation => "acme_validation",
            Outcome::IpsecUnavailable => "ipsec_unavailable",
            Outcome::NoCertificate => "no_certificate",
        }
    }

    /// Whether the connection ended as the relay meant it to (logged at info, not warn). A
    /// truncation is common (clients that skip close_notify) and handled as designed.
    pub fn is_normal(self) -> bool {
        matches!(
            self,
            Outcome::Closed | Outcome::Redirected | Outcome::Truncated | Outcome::AcmeValidation
        )
    }

    /// Outcomes that are failed handshakes, by the side that failed.
    fn handshake_failure(self) -> Option<&'static str> {
        match self {
            Outcome::HandshakeFailed
            | Outcome::HandshakeTimeout
            | Outcome::Denied
            | Outcome::PlaintextRejected
            | Outcome::NoCertificate
            | Outcome::UnknownSni => Some("inbound"),
            Outcome::BackendHandshakeFailed => Some("outbound"),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    service: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    service: String,
    /// `allowed` or `denied`.
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    service: String,
    /// A `tls::verify::Reason` label: `not_allowed`, `revoked`, `expired`, …
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    service: String,
    /// `up`: client to backend; `down`: backend to client.
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    service: String,
    /// `kernel` (the verdict program) or `splice`.
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    service: String,
    /// `inbound` (client side) or `outbound` (backend side).
    side: String,
    reason: String,
}

type HistogramFamily = Family<ServiceLabel, Histogram, fn() -> Histogram>;

fn handshake_histogram() -> Histogram {
    // 0.5 ms … ~8 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// The worker's metrics registry.
pub struct WorkerMetrics {
    registry: Registry,
    accepted: Family<ServiceLabel, Counter>,
    active: Family<ServiceLabel, Gauge>,
    closed: Family<ReasonLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    handshake_failures: Family<SideLabels, Counter>,
    handshake_seconds: HistogramFamily,
    resumed: Family<ServiceLabel, Counter>,
    access: Family<DecisionLabels, Counter>,
    denials: Family<RefusalLabels, Counter>,
    declined: Family<RefusalLabels, Counter>,
    plain_copies: Family<PathLabels, Counter>,
    copied: Counter,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("relay");
        let m = WorkerMetrics {
            accepted: Family::default(),
            active: Family::default(),
            closed: Family::default(),
            bytes: Family::default(),
            handshake_failures: Family::default(),
            handshake_seconds: Family::new_with_constructor(handshake_histogram),
            resumed: Family::default(),
            access: Family::default(),
            denials: Family::default(),
            declined: Family::default(),
            plain_copies: Family::default(),
            copied: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections_accepted",
            "Connections accepted",
            m.accepted.clone(),
        );
        registry.register(
            "connections_active",
            "Connections open now",
            m.active.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections ended, by reason",
            m.closed.clone(),
        );
        registry.register("bytes", "Bytes relayed, by direction", m.bytes.clone());
        registry.register(
            "handshake_failures",
            "TLS handshakes that failed, by side and reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "handshake_duration_seconds",
            "Inbound TLS handshake duration",
            m.handshake_seconds.clone(),
        );
        registry.register(
            "tls_resumed",
            "Inbound TLS handshakes that resumed a session",
            m.resumed.clone(),
        );
        registry.register(
            "access_decisions",
            "mtls clients checked against the service's allow rules, by decision",
            m.access.clone(),
        );
        registry.register(
            "access_denials",
            "mtls clients refused by the service's policy, by reason (not_allowed, revoked, \
             expired, crl_expired, revocation_unknown, untrusted, directory_unavailable)",
            m.denials.clone(),
        );
        registry.register(
            "resumptions_declined",
            "Stored TLS sessions not resumed because the client policy no longer admits them \
             (the client falls back to a full handshake), by reason",
            m.declined.clone(),
        );
        registry.register(
            "plain_copies",
            "plain ↔ plain connections, by how their bytes were copied: `kernel` (the verdict \
             program, no byte wakes the worker) or `splice` (the fallback)",
            m.plain_copies.clone(),
        );
        registry.register(
            "copied_bytes",
            "Payload bytes copied in user space after handshakes (relay_copied_bytes_total / \
             relay_bytes_total: copies per byte)",
            m.copied.clone(),
        );
        WorkerMetrics { registry, ..m }
    }
}

/// The label sets of one service's series, built in one place so that `service` and `remove`
/// always name the same series.
fn service_label(name: &str) -> ServiceLabel {
    ServiceLabel {
        service: name.to_string(),
    }
}

fn direction_labels(name: &str, direction: &str) -> DirectionLabels {
    DirectionLabels {
        service: name.to_string(),
        direction: direction.to_string(),
    }
}

fn path_labels(name: &str, path: PlainCopy) -> PathLabels {
    PathLabels {
        service: name.to_string(),
        path: path.label().to_string(),
    }
}

fn decision_labels(name: &str, decision: &str) -> DecisionLabels {
    DecisionLabels {
        service: name.to_string(),
        decision: decision.to_string(),
    }
}

fn refusal_labels(name: &str, reason: Reason) -> RefusalLabels {
    RefusalLabels {
        service: name.to_string(),
        reason: reason.label().to_string(),
    }
}

fn reason_labels(name: &str, o: Outcome) -> ReasonLabels {
    ReasonLabels {
        service: name.to_string(),
        reason: o.label().to_string(),
    }
}

fn side_labels(name: &str, o: Outcome) -> Option<SideLabels> {
    o.handshake_failure().map(|side| SideLabels {
        service: name.to_string(),
        side: side.to_string(),
        reason: o.label().to_string(),
    })
}

impl WorkerMetrics {
    /// The handles one service updates; the same series whenever asked for the same name.
    pub fn service(&self, name: &str) -> ServiceMetrics {
        let l = service_label(name);
        let bytes = |d| self.bytes.get_or_create(&direction_labels(name, d)).clone();
        // Through closures: a family's guard must be gone before the next get_or_create on the
        // same family, or the second one waits for the first forever.
        let access = |d| self.access.get_or_create(&decision_labels(name, d)).clone();
        let path = |p: PlainCopy| {
            self.plain_copies
                .get_or_create(&path_labels(name, p))
                .clone()
        };
        ServiceMetrics {
            accepted: self.accepted.get_or_create(&l).clone(),
            active: self.active.get_or_create(&l).clone(),
            bytes_up: bytes("up"),
            bytes_down: bytes("down"),
            outcomes: Outcome::ALL
                .map(|o| self.closed.get_or_create(&reason_labels(name, o)).clone()),
            handshake_failures: Outcome::ALL.map(|o| {
                side_labels(name, o).map(|l| self.handshake_failures.get_or_create(&l).clone())
            }),
            handshake_seconds: self.handshake_seconds.get_or_create(&l).clone(),
            resumed: self.resumed.get_or_create(&l).clone(),
            allowed: access("allowed"),
            denied: access("denied"),
            denials: Reason::ALL
                .map(|r| self.denials.get_or_create(&refusal_labels(name, r)).clone()),
            declined: Reason::ALL.map(|r| {
                self.declined
                    .get_or_create(&refusal_labels(name, r))
                    .clone()
            }),
            plain_copies: PlainCopy::ALL.map(path),
        }
    }

    /// Drops the series of a removed service.
    pub fn remove(&self, name: &str) {
        let l = service_label(name);
        self.accepted.remove(&l);
        self.active.remove(&l);
        self.handshake_seconds.remove(&l);
        self.resumed.remove(&l);
        for d in ["up", "down"] {
            self.bytes.remove(&direction_labels(name, d));
        }
        for d in ["allowed", "denied"] {
            self.access.remove(&decision_labels(name, d));
        }
        for p in PlainCopy::ALL {
            self.plain_copies.remove(&path_labels(name, p));
        }
        for r in Reason::ALL {
            self.denials.remove(&refusal_labels(name, r));
            self.declined.remove(&refusal_labels(name, r));
        }
        for o in Outcome::ALL {
            self.closed.remove(&reason_labels(name, o));
            if let Some(l) = side_labels(name, o) {
                self.handshake_failures.remove(&l);
            }
        }
    }

    /// OpenMetrics text, ending with `# EOF`.
    pub fn encode(&self) -> String {
        // The copy module counts in a plain atomic; the counter catches up when scraped.
        let copied = crate::copy::copied_bytes();
        self.copied.inc_by(copied.saturating_sub(self.copied.get()));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// One service's metric handles (shared series; clones update the same values).
pub struct ServiceMetrics {
    accepted: Counter,
    active: Gauge,
    bytes_up: Counter,
    bytes_down: Counter,
    outcomes: [Counter; Outcome::ALL.len()],
    handshake_failures: [Option<Counter>; Outcome::ALL.len()],
    handshake_seconds: Histogram,
    resumed: Counter,
    allowed: Counter,
    denied: Counter,
    denials: [Counter; Reason::ALL.len()],
    declined: [Counter; Reason::ALL.len()],
    plain_copies: [Counter; PlainCopy::ALL.len()],
}

impl ServiceMetrics {
    /// A plain ↔ plain connection copied by `path`.
    pub fn plain_copy(&self, path: PlainCopy) {
        self.plain_copies[path as usize].inc();
    }

    pub fn opened(&self) {
        self.accepted.inc();
        self.active.inc();
    }

    pub fn finished(&self, outcome: Outcome, up: u64, down: u64) {
        self.active.dec();
        self.count(outcome);
        self.bytes_up.inc_by(up);
        self.bytes_down.inc_by(down);
    }

    /// Counts an outcome (for a connection that never became active too, e.g. over the limit).
    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].inc();
        if let Some(c) = &self.handshake_failures[outcome as usize] {
            c.inc();
        }
    }

    /// A client the policy admitted by an `allow` rule.
    pub fn access_allowed(&self) {
        self.allowed.inc();
    }

    /// A client the policy refused (outcome `denied`), and why.
    pub fn access_denied(&self, reason: Reason) {
        self.denied.inc();
        self.denials[reason as usize].inc();
    }

    /// A stored session the policy no longer admits, and why.
    pub fn resumption_declined(&self, reason: Reason) {
        self.declined[reason as usize].inc();
    }

    pub fn handshake(&self, seconds: f64, resumed: bool) {
        self.handshake_seconds.observe(seconds);
        if resumed {
            self.resumed.inc();
        }
    }

    /// A snapshot for `relay status`.
    pub fn snapshot(&self, service: &str) -> ServiceStatus {
        ServiceStatus {
            service: service.to_string(),
            accepted: self.accepted.get(),
            active: self.active.get().max(0) as u64,
            bytes_up: self.bytes_up.get(),
            bytes_down: self.bytes_down.get(),
            resumed: self.resumed.get(),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| (o.label().to_string(), self.outcomes[*o as usize].get()))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }
}

/// Connection counters of one service, as a worker reports them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub accepted: u64,
    pub active: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub resumed: u64,
    pub outcomes: BTreeMap<String, u64>,
}

/// `[directory]`: lookups, cache hits, failures, stale decisions, reachability; OpenMetrics text
/// without its `# EOF` (it goes inside the worker's).
pub fn encode_directory(d: &crate::directory::Status) -> String {
    let mut registry = Registry::with_prefix("relay_directory");
    for (name, help, n) in [
        (
            "lookups",
            "Identities looked up in the directory (cache misses)",
            d.lookups,
        ),
        (
            "cache_hits",
            "Directory decisions taken from the cache",
            d.cache_hits,
        ),
        (
            "failures",
            "Directory lookups that failed (unreachable, timeout, error)",
            d.failures,
        ),
        (
            "stale_decisions",
            "Decisions taken from a cached entry past its TTL because the directory did not \
             answer (within stale_for)",
            d.stale,
        ),
    ] {
        let c = Counter::<u64>::default();
        c.inc_by(n);
        registry.register(name, help, c);
    }
    let reachable = Gauge::<i64>::default();
    reachable.set(i64::from(d.reachable));
    registry.register(
        "reachable",
        "1 when the last lookup reached the directory",
        reachable,
    );
    let mut out = String::new();
    let _ = encode(&mut out, &registry);
    out.strip_suffix("# EOF\n").unwrap_or(&out).to_string()
}

/// `[cluster]`: connected, revision applied, changes, leadership.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    service: String,
    certificate: String,
    source: String,
}

/// Each certificate's time left, and the ACME orders.
fn register_certificates(registry: &mut Registry, services: &[crate::control::ServiceInfo]) {
    let now = crate::acme::unix(std::time::SystemTime::now()) as i64;
    let expiry = Family::<CertificateLabels, Gauge>::default();
    let [orders, failures, renewals] = [(); 3].map(|()| Family::<ServiceLabel, Counter>::default());
    for s in services {
        for c in &s.certificates {
            if let Some(end) = c.not_after {
                expiry
                    .get_or_create(&CertificateLabels {
                        service: s.name.clone(),
                        certificate: c.key.clone(),
                        source: c.source.clone(),
                    })
                    .set(end as i64 - now);
            }
        }
        if let Some(a) = &s.acme {
            let label = ServiceLabel {
                service: s.name.clone(),
            };
            orders.get_or_create(&label).inc_by(a.orders);
            failures.get_or_create(&label).inc_by(a.failures);
            renewals.get_or_create(&label).inc_by(a.renewals);
        }
    }
    registry.register(
        "certificate_expiry_seconds",
        "Seconds until each served certificate's notAfter (negative: expired)",
        expiry,
    );
    registry.register("acme_orders", "ACME certificate orders started", orders);
    registry.register(
        "acme_failures",
        "ACME orders that failed (retried with backoff)",
        failures,
    );
    registry.register(
        "acme_renewals",
        "ACME certificates issued in place of an earlier one",
        renewals,
    );
}

/// `outbound.level = "ipsec"`: each service's SA.
fn register_ipsec(registry: &mut Registry, services: &[crate::control::ServiceInfo]) {
    let up = Family::<ServiceLabel, Gauge>::default();
    let [initiations, failures, rekeys] =
        [(); 3].map(|()| Family::<ServiceLabel, Counter>::default());
    for s in services {
        let Some(sa) = &s.ipsec else { continue };
        let label = ServiceLabel {
            service: s.name.clone(),
        };
        up.get_or_create(&label).set(i64::from(sa.up));
        initiations.get_or_create(&label).inc_by(sa.initiations);
        failures.get_or_create(&label).inc_by(sa.failures);
        rekeys.get_or_create(&label).inc_by(sa.rekeys);
    }
    registry.register(
        "ipsec_sa_up",
        "1 while the IPsec SA toward the service's backend is up (connections are forwarded)",
        up,
    );
    registry.register(
        "ipsec_initiations",
        "IPsec SAs the relay asked charon to bring up",
        initiations,
    );
    registry.register(
        "ipsec_failures",
        "IPsec SAs that could not be brought up (peer unreachable, refused, not trusted)",
        failures,
    );
    registry.register("ipsec_rekeys", "IPsec CHILD_SAs rekeyed", rekeys);
}

fn register_cluster(registry: &mut Registry, c: &crate::control::ClusterInfo) {
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    registry.register(
        "cluster_connected",
        "1 while this gateway is connected to etcd; 0: it serves the last state applied",
        gauge(i64::from(c.connected)),
    );
    registry.register(
        "cluster_revision",
        "The etcd revision of the service set this gateway applied",
        gauge(c.revision),
    );
    registry.register(
        "cluster_leader",
        "1 while this gateway leads the cluster (it rotates the ticket keys)",
        gauge(i64::from(c.leader)),
    );
    if let Some(age) = c.tickets_age_s {
        registry.register(
            "cluster_ticket_key_age_seconds",
            "Age of the cluster's current session ticket key: it grows past the rotation \
             period while rotation pauses (etcd unreachable, no leader)",
            gauge(age as i64),
        );
    }
    let changes = Family::<ResultLabel, Counter>::default();
    for (result, n) in [("applied", c.applied), ("refused", c.refused)] {
        changes
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc_by(n);
    }
    registry.register(
        "cluster_changes",
        "Service entries from the cluster, by whether they were applied or refused",
        changes,
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    service: String,
    action: String,
}

/// The supervisor's part of a scrape: worker restarts and the data path counters (absolute
/// values read from the maps), without the closing `# EOF`.
pub fn encode_supervisor(
    restarts: u64,
    (applied, refused): (u64, u64),
    late_answers: u64,
    datapath: &[crate::datapath::ServiceCounters],
    cluster: Option<&crate::control::ClusterInfo>,
    services: &[crate::control::ServiceInfo],
) -> String {
    let mut registry = Registry::with_prefix("relay");
    let r = Counter::<u64>::default();
    r.inc_by(restarts);
    registry.register("worker_restarts", "Workers started again after dying", r);
    let late = Counter::<u64>::default();
    late.inc_by(late_answers);
    registry.register(
        "worker_late_answers",
        "Answers of the worker that came after their request gave up (dropped)",
        late,
    );
    let reloads = Family::<ResultLabel, Counter>::default();
    for (result, n) in [("applied", applied), ("refused", refused)] {
        reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc_by(n);
    }
    registry.register(
        "file_reloads",
        "Watched files (certificates, keys, CAs, CRLs) and ACME certificates changed, by \
         whether the change was applied or refused",
        reloads,
    );
    let packets = Family::<ActionLabels, Counter>::default();
    for c in datapath {
        for (action, n) in [
            ("steered", c.steered),
            ("dropped", c.dropped),
            ("passed", c.passed),
            ("malformed", c.malformed),
            ("no_listener", c.no_listener),
        ] {
            packets
                .get_or_create(&ActionLabels {
                    service: c.service.clone(),
                    action: action.to_string(),
                })
                .inc_by(n);
        }
    }
    registry.register(
        "xdp_packets",
        "Packets seen by the data path, by service and action",
        packets,
    );
    if let Some(c) = cluster {
        register_cluster(&mut registry, c);
    }
    register_certificates(&mut registry, services);
    register_ipsec(&mut registry, services);
    let mut out = String::new();
    let _ = encode(&mut out, &registry);
    out.strip_suffix("# EOF\n").unwrap_or(&out).to_string()
}
