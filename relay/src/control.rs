//! The control protocol: how `relay status`, `relay service ...` and `relay reload` talk to a
//! running relay.
//!
//! A Unix stream socket (mode 0600 in a 0700 directory: root only), one request per connection,
//! each a single line of JSON, answered by a single line of JSON:
//!
//! ```text
//! → {"op":"status"}
//! ← {"ok":true,"result":{...}}
//! → {"op":"service_remove","name":"shop"}
//! ← {"ok":false,"error":"no service named \"shop\""}
//! ```
//!
//! Requests: `status`, `service_list`, `service_add` (`service`: a service table as in the
//! config file, paths absolute; `cluster`: write it to etcd), `service_remove` (`name`,
//! `cluster`), `reload`, `cluster_status`, `rotate_tickets`, and for tests of debug
//! builds `debug` (`what`: see `handoff::DebugOp`). A request that cannot be
//! parsed gets an error answer; nothing a client sends can stop the relay. Every result is one
//! of the typed replies below ([`Status`], the services, [`ChangeSummary`]), shared by the
//! server, the CLI and the tests.

use std::{
    fmt,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    config::Service,
    datapath::{Attachment, ServiceCounters},
    metrics::ServiceStatus,
};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 1 << 20;
/// A client that sends nothing for this long is disconnected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Empty braces rather than unit variants: serde then rejects unknown fields here too.
    Status {},
    ServiceList {},
    /// `cluster`: write it to etcd (every gateway applies it) instead of adding it here.
    ServiceAdd {
        service: Box<Service>,
        #[serde(default)]
        cluster: bool,
    },
    ServiceRemove {
        name: String,
        #[serde(default)]
        cluster: bool,
    },
    Reload {},
    /// The members of this gateway's cluster (`relay status --cluster`).
    ClusterStatus {},
    /// New TLS session ticket keys now: this gateway's, or with `[cluster]` every gateway's.
    RotateTickets {},
    /// Order a new ACME certificate for a service with `cert = "acme"` now.
    RenewCertificate {
        service: String,
    },
    /// Tests only (refused by release builds): make the worker misbehave on purpose.
    Debug {
        what: crate::handoff::DebugOp,
    },
}

/// One answer line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    /// A typed reply.
    pub fn ok(result: &impl Serialize) -> Response {
        match serde_json::to_value(result) {
            Ok(v) => Response {
                ok: true,
                error: None,
                result: Some(v),
            },
            Err(e) => Response::error(format!("unencodable reply: {e}")),
        }
    }

    pub fn error(e: impl fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            result: None,
        }
    }
}

/// The answer to `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub supervisor_pid: u32,
    pub uptime_s: u64,
    /// The worker serving now; `None` while one is being (re)started.
    pub worker: Option<WorkerInfo>,
    pub worker_restarts: u64,
    pub services: Vec<ServiceInfo>,
    /// The worker's counters; `None` when it did not answer in time.
    pub connections: Option<Vec<ServiceStatus>>,
    pub datapath: Option<DatapathStatus>,
    /// This gateway's view of its cluster; `None` without `[cluster]`.
    #[serde(default)]
    pub cluster: Option<ClusterInfo>,
    /// The directory as the worker sees it; `None` without `[directory]` (or no answer).
    #[serde(default)]
    pub directory: Option<crate::directory::Status>,
}

/// The cluster as this gateway sees it, without asking etcd.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub connected: bool,
    pub leader: bool,
    /// The etcd revision of the service set applied.
    pub revision: i64,
    /// Cluster changes applied and refused since start.
    pub applied: u64,
    pub refused: u64,
    /// Services that came from the cluster.
    pub services: Vec<String>,
    /// Digest of those services and their revisions (equal on members serving the same set).
    pub digest: String,
    /// Age of the cluster's current ticket key; past `ticket_rotation` while rotation pauses
    /// (etcd unreachable, no leader). `None`: none from the cluster yet.
    pub tickets_age_s: Option<u64>,
}

/// What a write to the cluster (`--cluster`, `rotate_tickets`) did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterWrite {
    pub key: String,
    /// The etcd revision of the write; every gateway applies it from its watch.
    pub revision: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub pid: u32,
    pub uptime_s: u64,
}

/// A service as `relay status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    /// `explicit` or `transparent`.
    pub mode: String,
    pub front: String,
    pub backend: String,
    pub inbound: String,
    pub outbound: String,
    /// The inbound certificates in force (the default one, then the `sni` entries').
    #[serde(default)]
    pub certificates: Vec<CertificateInfo>,
    /// `cert = "acme"`: its orders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<crate::acme::State>,
    /// `outbound.level = "ipsec"`: its SA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec: Option<crate::ipsec::SaInfo>,
    /// `inbound.level = "ipsec"`: its clients' SAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec_clients: Option<crate::ipsec::ClientsInfo>,
}

/// A certificate a service serves.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// The key it comes from: `inbound.cert`, `inbound.sni[N].cert`.
    pub key: String,
    /// `file` (a path, watched) or `acme`.
    pub source: String,
    pub path: String,
    /// Unix seconds; `None`: none yet (ACME), or it does not parse.
    pub not_after: Option<u64>,
    pub names: Vec<String>,
}

impl From<&Service> for ServiceInfo {
    fn from(s: &Service) -> Self {
        ServiceInfo {
            name: s.name.clone(),
            mode: if s.listen.is_some() {
                "explicit"
            } else {
                "transparent"
            }
            .into(),
            front: s.listen.map_or_else(
                || std::net::SocketAddr::new(s.server, s.port).to_string(),
                |l| l.to_string(),
            ),
            backend: s.backend_addr().to_string(),
            inbound: s.inbound.level.to_string(),
            outbound: s.outbound.level.to_string(),
            certificates: Vec::new(),
            acme: None,
            ipsec: None,
            ipsec_clients: None,
        }
    }
}

/// The pinned data path: where, on which interfaces, and its counters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatapathStatus {
    pub pin_path: PathBuf,
    pub attachments: Vec<Attachment>,
    pub counters: Vec<ServiceCounters>,
}

/// What a change (reload, service add or remove) did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSummary {
    pub services: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl fmt::Display for ChangeSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} service(s); added {:?}; removed {:?}",
            self.services, self.added, self.removed
        )
    }
}

/// Parses one request line; the error is what the client is told.
pub fn parse(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// Sends `request` to the relay listening on `socket`, returns its typed result.
pub fn call<T: DeserializeOwned>(socket: &Path, request: &Request) -> anyhow::Result<T> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the relay at {} (is it running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("reading the relay's answer")?;
    let response: Response =
        serde_json::from_str(&answer).with_context(|| format!("unexpected answer {answer:?}"))?;
    if !response.ok {
        bail!(
            "{}",
            response.error.unwrap_or_else(|| "request failed".into())
        );
    }
    let result = response.result.unwrap_or(serde_json::Value::Null);
    serde_json::from_value(result).context("the relay's answer has an unexpected shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_garbage_is_an_error() {
        assert!(matches!(
            parse(r#"{"op":"status"}"#),
            Ok(Request::Status {})
        ));
        assert!(matches!(
            parse(r#"{"op":"service_remove","name":"shop"}"#),
            Ok(Request::ServiceRemove { name, cluster: false }) if name == "shop"
        ));
        for bad in [
            "",
            "null",
            "{",
            r#"{"op":"explode"}"#,
            r#"{"op":"status","x":1}"#,
            "\u{0}\u{1}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
