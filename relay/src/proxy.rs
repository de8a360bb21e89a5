//! One service at work: accepting client connections and relaying each of them.
//!
//! Per connection, in order: the inbound level is established — on a TLS front port the first
//! byte tells TLS from plaintext (`recognise`), the ClientHello's SNI picks the certificate,
//! client certificates are verified and checked against `allow` for `mtls` — then the relay
//! connects to the backend, writes the PROXY header if configured and establishes the outbound
//! level, then bytes are copied both ways until both sides are done (see `copy`). Each step has
//! its own timeout; every end is logged in one line and counted by outcome. A failing
//! connection never affects another one.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    access,
    config::{Level, Plaintext, ProxyProtocol, RelaySection, Service},
    copy::{self, CopyError, Side},
    metrics::{Outcome, ServiceMetrics},
    proxy_protocol,
    recognise::{self, Protocol},
    service::Compiled,
    tls::{
        self,
        challenge::Challenges,
        facts::TlsFacts,
        handshake::{self, HandshakeError},
    },
};

/// What every listener of a worker shares: the total limit and the connection tasks.
pub struct Shared {
    /// One permit per open connection, over all services.
    pub total: Arc<Semaphore>,
    pub tracker: TaskTracker,
}

/// The services a worker serves now. A reload swaps in a new snapshot: new connections get the
/// new one, established connections keep the `Arc<ServiceRuntime>` they started with.
pub struct Services {
    pub timeouts: Timeouts,
    pub by_name: HashMap<String, Arc<ServiceRuntime>>,
    /// Transparent services by (server, front port): the original destination.
    pub by_destination: HashMap<(IpAddr, u16), Arc<ServiceRuntime>>,
}

pub type Table = Arc<RwLock<Arc<Services>>>;

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub handshake: Duration,
    pub connect: Duration,
    pub idle: Duration,
    /// Not timeouts, but set from the same section for every connection alike.
    pub max_buffer: usize,
    /// The worker's kernel copy, when it has one and `[relay] kernel_copy` is on.
    pub kernel_copy: Option<&'static copy::KernelCopy>,
}

impl From<&RelaySection> for Timeouts {
    fn from(r: &RelaySection) -> Self {
        Self {
            handshake: r.handshake_timeout,
            connect: r.connect_timeout,
            idle: r.idle_timeout,
            max_buffer: r.max_buffer,
            kernel_copy: None,
        }
    }
}

/// A service at work in the worker: compiled (see `service`), with its limit and counters.
pub struct ServiceRuntime {
    pub config: Service,
    server_side: Option<tls::ServerSide>,
    connector: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    limit: Option<Arc<Semaphore>>,
    /// Kept across reloads of the same service, so counters do not restart.
    pub metrics: Arc<ServiceMetrics>,
    /// `[directory]`, for services with `group:` or `attr:` rules.
    directory: Option<Arc<crate::directory::Directory>>,
    /// The worker's ACME validation answers (`tls::challenge`).
    challenges: Arc<Challenges>,
    /// Whether the SA of each `ipsec` service is up, and who the inbound ones' clients are
    /// (`crate::ipsec`).
    ipsec: Arc<crate::ipsec::Paths>,
    /// Inbound `ipsec`: the `allow` rules, matched against the IKE identity.
    ike_allow: access::Allow,
}

impl ServiceRuntime {
    pub fn new(
        compiled: Compiled,
        metrics: Arc<ServiceMetrics>,
        directory: Option<Arc<crate::directory::Directory>>,
        challenges: Arc<Challenges>,
        ipsec: Arc<crate::ipsec::Paths>,
    ) -> Self {
        let Compiled {
            config,
            server_side,
            connector,
        } = compiled;
        let limit = config.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        let ike_allow = if config.inbound.level == Level::Ipsec {
            // Checked with the configuration.
            access::Allow::parse(&config.inbound.allow).unwrap_or_default()
        } else {
            access::Allow::default()
        };
        Self {
            config,
            server_side,
            connector,
            limit,
            metrics,
            ike_allow,
            directory,
            challenges,
            ipsec,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// What a service tells of the stored sessions it declines to resume: a log line and a
/// counter.
pub fn declined(name: &str, metrics: Arc<ServiceMetrics>) -> tls::OnDeclined {
    let name = name.to_string();
    Arc::new(move |refusal: &tls::verify::Refusal| {
        metrics.resumption_declined(refusal.reason);
        info!(service = %name, reason = refusal.reason.label(), detail = %refusal,
              "stored session not resumed: a full handshake decides");
    })
}

/// Which service an accepted connection belongs to.
#[derive(Clone, Debug)]
pub enum Route {
    /// Explicit mode: the listener belongs to the service of this name.
    Named(String),
    /// Transparent mode: the connection's local address is the client's original destination
    /// (server, front port), which names the service.
    ByDestination,
}

impl Route {
    fn service_for(&self, services: &Services, socket: &TcpStream) -> Option<Arc<ServiceRuntime>> {
        match self {
            Route::Named(name) => services.by_name.get(name).cloned(),
            Route::ByDestination => {
                let dst = socket.local_addr().ok()?;
                services
                    .by_destination
                    .get(&(dst.ip().to_canonical(), dst.port()))
                    .cloned()
            }
        }
    }
}

/// Accepts connections until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    route: Route,
    table: Table,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (socket, peer) = match accepted {
            Ok((socket, peer)) => {
                backoff = Duration::from_millis(10);
                // IPv4 clients of a dual-stack listener are named as IPv4 in logs.
                (
                    socket,
                    SocketAddr::new(peer.ip().to_canonical(), peer.port()),
                )
            }
            Err(e) => {
                // Out of file descriptors or memory: keep the queue, wait, try again. Errors that
                // belong to one aborted connection (ECONNABORTED) need no pause.
                if is_resource_exhaustion(&e) {
                    warn!(error = %e, "accept failed, retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                continue;
            }
        };
        let services = Arc::clone(&table.read().unwrap_or_else(|e| e.into_inner()));
        let Some(service) = route.service_for(&services, &socket) else {
            // Steered here by a policy entry this relay does not know (e.g. one left by another
            // config): nothing to relay to.
            warn!(%peer, destination = ?socket.local_addr().ok(), "no service for this destination, closing");
            continue;
        };
        let Some(permits) = admit(&service, &shared) else {
            service.metrics.count(Outcome::LimitReached);
            warn!(service = %service.name(), %peer, "connection limit reached, closing");
            drop(socket);
            continue;
        };
        let timeouts = services.timeouts;
        shared
            .tracker
            .spawn(handle(socket, peer, service, timeouts, permits));
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A connection's place under the total limit and under its service's own.
type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

/// Takes a permit from the total limit and from the service's own, or none at all.
fn admit(service: &ServiceRuntime, shared: &Shared) -> Option<Permits> {
    let total = Arc::clone(&shared.total).try_acquire_owned().ok()?;
    let own = match &service.limit {
        Some(limit) => Some(Arc::clone(limit).try_acquire_owned().ok()?),
        None => None,
    };
    Some((total, own))
}

/// Why a connection ended early, with the detail for the log line.
struct Failure {
    outcome: Outcome,
    detail: String,
}

impl Failure {
    fn new(outcome: Outcome, detail: impl ToString) -> Self {
        Self {
            outcome,
            detail: detail.to_string(),
        }
    }
}

/// The whole life of one connection; what it holds is held for as long as the connection
/// lives, so it is an `async move` block (arguments stored once) rather than an `async fn`.
#[allow(clippy::manual_async_fn)]
fn handle(
    socket: TcpStream,
    peer: SocketAddr,
    service: Arc<ServiceRuntime>,
    t: Timeouts,
    permits: Permits,
) -> impl Future<Output = ()> {
    async move {
        let service = &*service;
        let started = Instant::now();
        service.metrics.opened();
        let _ = socket.set_nodelay(true);
        // What the client connected to: the server and front port in transparent mode.
        let destination = socket.local_addr();
        let mut transfer = copy::Transfer::default();
        let mut identity = None;
        let result = async {
            // The handshakes' state is large and short-lived; only what the copy needs stays in
            // the connection's task, which lives as long as the connection.
            let (inbound, outbound) = {
                let accepted = Box::pin(accept_inbound(socket, service, t.handshake)).await?;
                identity = accepted
                    .ike
                    .clone()
                    .or_else(|| accepted.tls.as_ref().and_then(TlsFacts::identity));
                let header = match service.config.outbound.proxy_protocol {
                    ProxyProtocol::None => Vec::new(),
                    kind => destination
                        .and_then(|d| proxy_protocol::header(kind, peer, d, accepted.tls.as_ref()))
                        .map_err(|e| {
                            Failure::new(Outcome::IoError, format!("PROXY header: {e}"))
                        })?,
                };
                let outbound =
                    Box::pin(connect_outbound(service, accepted.backend, &header, t)).await?;
                (accepted.conn, outbound)
            };
            let limits = copy::Limits {
                idle: t.idle,
                max_buffer: t.max_buffer,
                kernel: t.kernel_copy,
            };
            let (moved, result) = copy::relay(inbound, outbound, limits).await;
            transfer = moved;
            if let Some(path) = moved.path {
                service.metrics.plain_copy(path);
            }
            result.map_err(|e| {
                let outcome = match e {
                    CopyError::Idle(_) => Outcome::IdleTimeout,
                    CopyError::Io { .. } => Outcome::IoError,
                    CopyError::Tls { .. } => Outcome::TlsError,
                    CopyError::Truncated { .. } => Outcome::Truncated,
                };
                Failure::new(outcome, e)
            })
        }
        .await;
        let outcome = result.as_ref().err().map_or(Outcome::Closed, |f| f.outcome);
        service
            .metrics
            .finished(outcome, transfer.up, transfer.down);
        let c = &service.config;
        let duration_ms = started.elapsed().as_millis() as u64;
        let identity = identity.as_deref().unwrap_or("-");
        match result {
            Ok(()) => info!(
                service = %c.name, %peer, inbound = %c.inbound.level, outbound = %c.outbound.level,
                %identity, bytes_up = transfer.up, bytes_down = transfer.down, duration_ms,
                outcome = outcome.label(), "connection closed"
            ),
            Err(f) if outcome.is_normal() => info!(
                service = %c.name, %peer, inbound = %c.inbound.level, outbound = %c.outbound.level,
                %identity, bytes_up = transfer.up, bytes_down = transfer.down, duration_ms,
                outcome = outcome.label(), detail = %f.detail, "connection closed"
            ),
            Err(f) => warn!(
                service = %c.name, %peer, inbound = %c.inbound.level, outbound = %c.outbound.level,
                %identity, bytes_up = transfer.up, bytes_down = transfer.down, duration_ms,
                outcome = outcome.label(), error = %f.detail, "connection closed"
            ),
        }
        drop(permits);
    }
}

/// The client side, established: the connection at its level, what TLS negotiated, and the
/// backend its SNI entry names (if any).
struct Accepted {
    conn: Side,
    tls: Option<TlsFacts>,
    backend: Option<SocketAddr>,
    /// Inbound `ipsec`: the IKE identity the client proved.
    ike: Option<String>,
}

impl Accepted {
    /// A client relayed at plain level, to the service's own backend.
    fn plain(socket: TcpStream) -> Accepted {
        Accepted {
            conn: Side::Plain(socket),
            tls: None,
            backend: None,
            ike: None,
        }
    }
}

async fn accept_inbound(
    socket: TcpStream,
    service: &ServiceRuntime,
    limit: Duration,
) -> Result<Accepted, Failure> {
    if service.config.inbound.level == Level::Ipsec {
        return ipsec_client(socket, service, limit).await;
    }
    let Some(server) = &service.server_side else {
        if service.config.inbound.answer_http01 && service.challenges.awaits_http() {
            return acme_http(socket, service, limit).await;
        }
        return Ok(Accepted::plain(socket));
    };
    // A directory lookup inside must end a little before the handshake's time does, so its
    // own failure (and the stale fallback) decides rather than the timeout.
    let directory_by = Instant::now() + limit.saturating_sub(Duration::from_millis(200));
    match timeout(limit, establish_tls(socket, service, server, directory_by)).await {
        Err(_) => Err(Failure::new(
            Outcome::HandshakeTimeout,
            format!("no TLS handshake within {limit:?}"),
        )),
        Ok(r) => r,
    }
}

/// Inbound `ipsec`: the client is known by the IKE identity of the one SA whose traffic
/// selectors cover its address, and `allow` decides on that identity.
///
/// The address alone would not prove much on a network where addresses can be forged, but
/// the gateway's answers to an address an SA covers leave through that SA: a forger never sees
/// the SYN-ACK it would need to complete the connection.
async fn ipsec_client(
    socket: TcpStream,
    service: &ServiceRuntime,
    limit: Duration,
) -> Result<Accepted, Failure> {
    let peer = socket
        .peer_addr()
        .map_err(|e| Failure::new(Outcome::IoError, e))?
        .ip();
    let wait = limit.min(IPSEC_PEER_WAIT);
    let Some(ike) = service.ipsec.wait_peer(service.name(), peer, wait).await else {
        return Err(Failure::new(
            Outcome::Denied,
            format!("no IPsec SA covers {peer}: clients of this service come over ESP"),
        ));
    };
    if !service.ike_allow.is_empty() {
        match service.ike_allow.decide(&access::Identity::from_ike(&ike)) {
            Ok(a) => info!(
                service = %service.name(), identity = %ike, rule = %a.rule, "client allowed"
            ),
            Err(_) => {
                return Err(Failure::new(
                    Outcome::Denied,
                    format!("IKE identity {ike:?} matches no allow rule"),
                ));
            }
        }
    }
    Ok(Accepted {
        conn: Side::Plain(socket),
        tls: None,
        backend: None,
        ike: Some(ike),
    })
}

/// How long a client's first connection may wait for the report of its SA.
const IPSEC_PEER_WAIT: Duration = Duration::from_secs(3);

/// A plain service with `answer_http01`, while an http-01 validation is awaited: the ACME
/// server's request is answered; anything else (another token too: the backend may run an
/// ACME client of its own) is relayed untouched.
async fn acme_http(
    socket: TcpStream,
    service: &ServiceRuntime,
    limit: Duration,
) -> Result<Accepted, Failure> {
    // A client that sends nothing for a while (one that waits for the server to speak) is
    // relayed all the same.
    let token = match timeout(limit, recognise::acme_http_token(&socket)).await {
        Ok(Ok(token)) => token,
        Ok(Err(e)) => {
            return Err(Failure::new(
                Outcome::IoError,
                format!("before relaying: {e}"),
            ));
        }
        Err(_) => None,
    };
    let Some((token, answer)) = token.and_then(|t| service.challenges.http(&t).map(|a| (t, a)))
    else {
        return Ok(Accepted::plain(socket));
    };
    match timeout(limit, recognise::answer_acme_http(socket, &answer)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Failure::new(
                Outcome::IoError,
                format!("ACME http-01 answer: {e}"),
            ));
        }
        Err(_) => {
            return Err(Failure::new(
                Outcome::HandshakeTimeout,
                format!("ACME http-01 request not complete within {limit:?}"),
            ));
        }
    }
    Err(Failure::new(
        Outcome::AcmeValidation,
        format!("ACME http-01 validation of token {token} answered"),
    ))
}

/// Recognition, then the TLS handshake with the configuration the SNI selects.
async fn establish_tls(
    socket: TcpStream,
    service: &ServiceRuntime,
    server: &tls::ServerSide,
    directory_by: Instant,
) -> Result<Accepted, Failure> {
    let started = Instant::now();
    let recognised = recognise::recognise(&socket)
        .await
        .map_err(|e| Failure::new(Outcome::HandshakeFailed, format!("before TLS: {e}")))?;
    match recognised {
        None => {
            return Err(Failure::new(
                Outcome::HandshakeFailed,
                "closed before sending a ClientHello",
            ));
        }
        Some(Protocol::Tls) => {}
        Some(Protocol::Plain) => {
            return plaintext(socket, service.config.inbound.plaintext()).await;
        }
    }
    let accepted = handshake::accept(&socket, server, &service.challenges)
        .await
        .map_err(|e| match &e {
            HandshakeError::AcmeAnswered(_) => Failure::new(Outcome::AcmeValidation, &e),
            HandshakeError::NoCertificate => Failure::new(Outcome::NoCertificate, &e),
            HandshakeError::UnknownSni(_) => Failure::new(
                Outcome::UnknownSni,
                format!("{e} (unknown_sni = \"reject\")"),
            ),
            HandshakeError::Hello(_) => Failure::new(Outcome::HandshakeFailed, format!("TLS {e}")),
            HandshakeError::Refused(refusal) if refusal.reason.is_access_decision() => {
                service.metrics.access_denied(refusal.reason);
                Failure::new(Outcome::Denied, refusal)
            }
            _ => Failure::new(Outcome::HandshakeFailed, format!("TLS handshake: {e}")),
        })?;
    let mut facts = accepted.facts;
    service
        .metrics
        .handshake(started.elapsed().as_secs_f64(), facts.resumed);
    if facts.ask_directory {
        let established = &accepted.established;
        let decided = ask_directory(service, server, &facts, directory_by).await;
        match decided {
            Ok(authorised) => facts.authorised = Some(authorised),
            Err((reason, why)) => {
                service.metrics.access_denied(reason);
                let alert = established
                    .sealer
                    .lock()
                    .await
                    .fatal(rustls::AlertDescription::AccessDenied);
                if let Ok(record) = alert {
                    let _ = crate::net::io::write_all(&socket, &[&record]).await;
                }
                return Err(Failure::new(Outcome::Denied, why));
            }
        }
    }
    if let Some(authorised) = &facts.authorised {
        // The policy let this client in (again, if it resumed); say which name passed, for
        // the audit trail.
        service.metrics.access_allowed();
        info!(
            service = %service.name(), identity = %authorised.name, rule = %authorised.rule,
            resumed = facts.resumed, "client allowed"
        );
    }
    Ok(Accepted {
        conn: Side::Tls(socket, Box::new(accepted.established)),
        tls: Some(facts),
        backend: accepted.backend,
        ike: None,
    })
}

/// The directory's decision on a client no static rule let in, by `not_after`; a refusal
/// comes with its reason and what to log.
async fn ask_directory(
    service: &ServiceRuntime,
    server: &tls::ServerSide,
    facts: &TlsFacts,
    not_after: Instant,
) -> Result<crate::access::Authorised, (tls::verify::Reason, String)> {
    use crate::directory::Verdict;
    use tls::verify::Reason;
    let (Some(directory), Some(policy), Some(id)) =
        (&service.directory, &server.policy, &facts.client)
    else {
        return Err((
            Reason::DirectoryUnavailable,
            "no directory to decide the group:/attr: rules".into(),
        ));
    };
    let verdict = directory
        .decide(id, &policy.directory_rules, not_after)
        .await;
    let (reason, why) = match verdict {
        Verdict::Allowed(authorised) => return Ok(authorised),
        Verdict::Denied(why) => (Reason::NotAllowed, why),
        Verdict::Unavailable(why) => (Reason::DirectoryUnavailable, why),
    };
    Err((reason, format!("{}: {why}", id.principal())))
}

/// A client that spoke plaintext to a TLS front port, handled by the service's policy.
async fn plaintext(socket: TcpStream, policy: Plaintext) -> Result<Accepted, Failure> {
    match policy {
        Plaintext::Reject => Err(Failure::new(
            Outcome::PlaintextRejected,
            "plaintext on a TLS port (inbound.plaintext = \"reject\")",
        )),
        Plaintext::Relay => Ok(Accepted::plain(socket)),
        Plaintext::Redirect => match recognise::redirect(socket).await {
            Ok(location) => Err(Failure::new(
                Outcome::Redirected,
                format!("301 to {location}"),
            )),
            Err(e) => Err(Failure::new(
                Outcome::PlaintextRejected,
                format!("plaintext on a TLS port, no redirect: {e}"),
            )),
        },
    }
}

async fn connect_outbound(
    service: &ServiceRuntime,
    backend: Option<SocketAddr>,
    proxy_header: &[u8],
    t: Timeouts,
) -> Result<Side, Failure> {
    let addr = backend.unwrap_or_else(|| service.config.backend_addr());
    let ipsec = service.config.outbound.level == Level::Ipsec;
    if ipsec && let Err(why) = service.ipsec.check(&service.config.name, addr) {
        // Never in clear: without an SA the client is reset.
        return Err(Failure::new(
            Outcome::IpsecUnavailable,
            format!("backend {addr}: {why}"),
        ));
    }
    let mut socket = match timeout(t.connect, TcpStream::connect(addr)).await {
        // The fail-closed route refused the packet: the SA went away since it was reported up.
        Ok(Err(e)) if ipsec && e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Failure::new(
                Outcome::IpsecUnavailable,
                format!("backend {addr}: no IPsec SA (the fail-closed route refused: {e})"),
            ));
        }
        Err(_) => {
            return Err(Failure::new(
                Outcome::ConnectTimeout,
                format!("backend {addr}: no answer within {:?}", t.connect),
            ));
        }
        Ok(Err(e)) => {
            return Err(Failure::new(
                Outcome::ConnectFailed,
                format!("backend {addr}: {e}"),
            ));
        }
        Ok(Ok(s)) => s,
    };
    let _ = socket.set_nodelay(true);
    if !proxy_header.is_empty() {
        // The header goes first, in clear, before any TLS toward the backend.
        match timeout(t.connect, socket.write_all(proxy_header)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Failure::new(
                    Outcome::ConnectFailed,
                    format!("backend {addr}: PROXY header: {e}"),
                ));
            }
            Err(_) => {
                return Err(Failure::new(
                    Outcome::ConnectTimeout,
                    format!(
                        "backend {addr}: PROXY header not taken within {:?}",
                        t.connect
                    ),
                ));
            }
        }
    }
    let Some((config, name)) = &service.connector else {
        return Ok(Side::Plain(socket));
    };
    let handshake = Box::pin(handshake::connect(
        &socket,
        Arc::clone(config),
        name.clone(),
    ));
    match timeout(t.handshake, handshake).await {
        Err(_) => Err(Failure::new(
            Outcome::BackendHandshakeFailed,
            format!("backend {addr}: no TLS handshake within {:?}", t.handshake),
        )),
        Ok(Err(e)) => Err(Failure::new(
            Outcome::BackendHandshakeFailed,
            format!("backend {addr}: TLS handshake: {e}"),
        )),
        Ok(Ok(established)) => Ok(Side::Tls(socket, Box::new(established))),
    }
}
