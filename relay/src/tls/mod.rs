//! TLS material and rustls configurations for each side of a service.
//!
//! rustls with its default safe settings: TLS 1.2 and 1.3, its default cipher suites, no
//! renegotiation. Certificates and keys are PEM (RSA, ECDSA or Ed25519 keys). The relay is
//! protocol-agnostic, so it negotiates no ALPN: clients fall back to their default protocol
//! (HTTP/1.1 for curl), which the backend then sees unchanged.
//!
//! Errors say which config key they belong to (`field`), so the config module can point at the
//! right line.
//!
//! The handshakes themselves run in [`handshake`]; the records after them in [`record`]; who
//! may connect to an `mtls` service, on every connection, is [`verify`]'s.
//!
//! Certificate, key and CA files are read through [`Material`]: from disk where the relay may
//! read them (config check, supervisor), from the bytes the supervisor sent where it may not
//! (a worker after dropping privileges).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::Resumption as ClientResumption,
    pki_types::{
        CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName,
        pem::PemObject as _,
    },
    server::{
        NoServerSessionStorage, ProducesTickets, ServerSessionMemoryCache, WebPkiClientVerifier,
        danger::ClientCertVerifier,
    },
};

pub mod handshake;
pub mod record;
#[cfg(test)]
pub mod testing;
pub mod verify;

use crate::{
    access::{Allow, dns_matches},
    config::{CrlExpired, Inbound, Outbound, Service},
};
use verify::{ClientPolicy, GuardedSessions, GuardedTickets, PolicyVerifier, Resumable};

/// Where PEM files come from.
pub trait Material {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
}

/// Files on disk.
pub struct Disk;

/// Largest certificate, key, CA or CRL file read: far above any real PEM bundle, and a bound
/// on what a mistaken path (a log file, `/dev/zero`) can make the relay read.
const MAX_FILE: u64 = 16 << 20;

impl Material for Disk {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        use std::io::Read as _;
        let mut bytes = Vec::new();
        std::fs::File::open(path)?
            .take(MAX_FILE + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_FILE {
            return Err(io::Error::other(format!(
                "larger than {} MiB: not a PEM file",
                MAX_FILE >> 20
            )));
        }
        Ok(bytes)
    }
}

/// Files read earlier, by path.
pub type Files = HashMap<PathBuf, Vec<u8>>;

impl Material for Files {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.get(path).cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "not among the files the supervisor sent",
            )
        })
    }
}

/// Every file a service's TLS configuration reads.
pub fn files_of(s: &Service) -> Vec<&Path> {
    let mut files: Vec<&Path> = [
        &s.inbound.cert,
        &s.inbound.key,
        &s.inbound.client_ca,
        &s.inbound.crl,
        &s.outbound.ca,
        &s.outbound.cert,
        &s.outbound.key,
    ]
    .into_iter()
    .filter_map(|p| p.as_deref())
    .collect();
    for e in &s.inbound.sni {
        files.extend([e.cert.as_path(), e.key.as_path()]);
    }
    files
}

/// A warning for every private key of `s` that every user of this machine may read: a leaked
/// key lets anyone impersonate the service. Owner- and group-only keys pass (a group such as
/// `ssl-cert` is a common way to share them).
pub fn key_warnings(s: &Service) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut keys = vec![("inbound.key", s.inbound.key.as_deref())];
    keys.push(("outbound.key", s.outbound.key.as_deref()));
    keys.extend(
        s.inbound
            .sni
            .iter()
            .map(|e| ("inbound.sni.key", Some(e.key.as_path()))),
    );
    keys.into_iter()
        .filter_map(|(key, path)| {
            let path = path?;
            let mode = std::fs::metadata(path).ok()?.permissions().mode();
            (mode & 0o004 != 0).then(|| {
                format!(
                    "service {}: {key} {} is readable by every user (mode {:o}); chmod o-r it",
                    s.name,
                    path.display(),
                    mode & 0o777
                )
            })
        })
        .collect()
}

/// Session resumption state shared by the services of one process.
#[derive(Clone, Default)]
pub struct Resumption {
    /// Ticket keys from the supervisor; `None`: a ticketer of this process's own.
    pub ticketer: Option<Arc<dyn ProducesTickets>>,
}

/// Told of each stored session a service declines to resume (see [`verify`]).
pub type OnDeclined = Arc<dyn Fn(&verify::Refusal) + Send + Sync>;

/// Sessions remembered per service for TLS 1.2 session-id resumption (TLS 1.3 uses tickets).
const SERVER_SESSION_CACHE: usize = 4096;
/// Backend sessions remembered per service for outbound resumption.
const CLIENT_SESSION_CACHE: usize = 1024;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    field: &'static str,
    /// Set when the error is about entry N of `inbound.sni`.
    sni: Option<usize>,
    message: String,
}

impl TlsError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            sni: None,
            message: message.into(),
        }
    }

    /// The config key (inside `inbound`, `outbound` or `inbound.sni[N]`) the error is about.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Which `inbound.sni` entry the error is about, if any.
    pub fn sni(&self) -> Option<usize> {
        self.sni
    }
}

fn read(m: &dyn Material, field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    m.read(path)
        .map_err(|e| TlsError::new(field, format!("{}: cannot read: {e}", path.display())))
}

fn certs(
    m: &dyn Material,
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(m, field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(field, format!("{}: {}", path.display(), pem_error(e))))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            field,
            format!("{}: no CERTIFICATE in PEM file", path.display()),
        ));
    }
    Ok(certs)
}

fn key(
    m: &dyn Material,
    field: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(m, field, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| TlsError::new(field, format!("{}: {}", path.display(), pem_error(e))))
}

fn roots(m: &dyn Material, field: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(m, field, path)? {
        store
            .add(cert)
            .map_err(|e| TlsError::new(field, format!("{}: {e}", path.display())))?;
    }
    Ok(store)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => format!("cannot read: {e}"),
        Error::NoItemsFound => "no matching PEM section (expected a certificate or a private \
                                key in PEM format)"
            .into(),
        other => format!("invalid PEM: {other:?}"),
    }
}

fn required<'a>(
    field: &'static str,
    p: &'a Option<std::path::PathBuf>,
) -> Result<&'a Path, TlsError> {
    p.as_deref()
        .ok_or_else(|| TlsError::new(field, "required for this level"))
}

/// The TLS server side of a service (inbound `tls` or `mtls`): the default configuration, and
/// one per `sni` entry, chosen by the server name of each ClientHello.
pub struct ServerSide {
    pub default: Arc<ServerConfig>,
    by_name: Vec<(String, Arc<ServerConfig>, Option<SocketAddr>)>,
    /// The DNS names of the default certificate: known names even with `unknown_sni = "reject"`.
    default_names: Vec<String>,
    reject_unknown: bool,
    /// `mtls`: who may connect, asked again after every handshake (see [`verify`]).
    pub policy: Option<Arc<ClientPolicy>>,
}

impl ServerSide {
    /// One configuration for every server name (tests).
    #[cfg(test)]
    pub fn with_config(config: Arc<ServerConfig>) -> ServerSide {
        ServerSide {
            default: config,
            by_name: Vec::new(),
            default_names: Vec::new(),
            reject_unknown: false,
            policy: None,
        }
    }

    /// The configuration for a ClientHello's server name, and that name's own backend if set.
    /// Exact names win over `*.` patterns; no match gets the default, or `None` with
    /// `unknown_sni = "reject"`; no SNI always gets the default.
    pub fn select(&self, sni: Option<&str>) -> Option<(&Arc<ServerConfig>, Option<SocketAddr>)> {
        let Some(sni) = sni.map(str::to_ascii_lowercase) else {
            return Some((&self.default, None));
        };
        let exact = self.by_name.iter().find(|(n, ..)| *n == sni);
        let wildcard = || {
            self.by_name
                .iter()
                .find(|(n, ..)| n.starts_with("*.") && dns_matches(n, &sni))
        };
        match exact.or_else(wildcard) {
            Some((_, config, backend)) => Some((config, *backend)),
            None if self.reject_unknown
                && !self.default_names.iter().any(|n| dns_matches(n, &sni)) =>
            {
                None
            }
            None => Some((&self.default, None)),
        }
    }
}

/// A name for `inbound.sni`: a DNS name, or `*.` and a DNS name.
pub fn valid_sni_pattern(name: &str) -> bool {
    let rest = name.strip_prefix("*.").unwrap_or(name);
    !rest.contains('*')
        && rest.contains('.')
        && matches!(ServerName::try_from(rest), Ok(ServerName::DnsName(_)))
}

/// Builds the server side of service `service`'s `inb`.
pub fn server_side(
    service: &str,
    inb: &Inbound,
    m: &dyn Material,
    resumption: &Resumption,
    declined: OnDeclined,
) -> Result<ServerSide, TlsError> {
    let policy = client_policy(inb, m)?.map(Arc::new);
    let verifier = policy
        .as_ref()
        .map(|p| Arc::new(PolicyVerifier(Arc::clone(p))) as Arc<dyn ClientCertVerifier>);
    let resumable = Resumable {
        policy: policy.clone(),
        declined,
    };
    // One ticketer for all of the service's configurations: a ticket issued under one name's
    // certificate stays readable whichever configuration the next ClientHello selects. Its
    // tickets are the service's own, and resume only what the policy admits today.
    let ticketer = match (&resumption.ticketer, inb.resumption) {
        (_, false) => None,
        (Some(shared), true) => Some(Arc::clone(shared)),
        (None, true) => Some(
            rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| TlsError::new("resumption", format!("session tickets: {e}")))?,
        ),
    }
    .map(|inner| {
        Arc::new(GuardedTickets::new(inner, service, resumable.clone())) as Arc<dyn ProducesTickets>
    });
    let build = |cert: &Path, key_path: &Path| -> Result<Arc<ServerConfig>, TlsError> {
        let chain = certs(m, "cert", cert)?;
        let key = key(m, "key", key_path)?;
        let builder = ServerConfig::builder();
        let builder = match &verifier {
            Some(v) => builder.with_client_cert_verifier(Arc::clone(v)),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::new("key", format!("key does not fit the certificate: {e}")))?;
        // The relay's record layer takes over the keys after each handshake (see `record`).
        config.enable_secret_extraction = true;
        match &ticketer {
            Some(t) => {
                config.session_storage = Arc::new(GuardedSessions {
                    inner: ServerSessionMemoryCache::new(SERVER_SESSION_CACHE),
                    resumable: resumable.clone(),
                });
                config.ticketer = Arc::clone(t);
            }
            None => {
                config.session_storage = Arc::new(NoServerSessionStorage {});
                config.send_tls13_tickets = 0;
            }
        }
        Ok(Arc::new(config))
    };
    let default = build(required("cert", &inb.cert)?, required("key", &inb.key)?)?;
    let default_names = certs(m, "cert", required("cert", &inb.cert)?)?
        .first()
        .and_then(|der| crate::access::Identity::from_der(der))
        .map(|id| id.dns.iter().map(|d| d.to_ascii_lowercase()).collect())
        .unwrap_or_default();
    let mut by_name = Vec::with_capacity(inb.sni.len());
    for (n, e) in inb.sni.iter().enumerate() {
        let config = build(&e.cert, &e.key).map_err(|mut err| {
            err.sni = Some(n);
            err
        })?;
        by_name.push((e.name.to_ascii_lowercase(), config, e.backend));
    }
    Ok(ServerSide {
        default,
        by_name,
        default_names,
        reject_unknown: inb.unknown_sni == crate::config::UnknownSni::Reject,
        policy,
    })
}

/// The client policy of an `mtls` inbound side (CA, CRLs, `allow`), `None` for `tls`.
fn client_policy(inb: &Inbound, m: &dyn Material) -> Result<Option<ClientPolicy>, TlsError> {
    let Some(ca) = &inb.client_ca else {
        return Ok(None);
    };
    let roots = Arc::new(roots(m, "client_ca", ca)?);
    let allow = Allow::parse(&inb.allow).map_err(|(_, e)| TlsError::new("allow", e))?;
    let crls = match &inb.crl {
        Some(path) => crls(m, path)?,
        None => Vec::new(),
    };
    let build = |whole_chain: bool| {
        let mut builder = WebPkiClientVerifier::builder(Arc::clone(&roots));
        if !crls.is_empty() {
            builder = builder.with_crls(crls.iter().cloned());
            // The end entity needs a known status; an intermediate whose CA published no CRL
            // here is not refused for it (its revocation, when listed, refuses its clients).
            builder = if whole_chain {
                builder.allow_unknown_revocation_status()
            } else {
                builder.only_check_end_entity_revocation()
            };
            if inb.crl_expired.unwrap_or_default() == CrlExpired::Reject {
                builder = builder.enforce_revocation_expiration();
            }
        }
        builder
            .build()
            .map_err(|e| TlsError::new("client_ca", format!("{}: {e}", ca.display())))
    };
    let whole_chain = if crls.is_empty() {
        None
    } else {
        Some(build(true)?)
    };
    Ok(Some(ClientPolicy::new(build(false)?, whole_chain, allow)))
}

/// The CRLs of a PEM file; at least one.
fn crls(
    m: &dyn Material,
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let pem = read(m, "crl", path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new("crl", format!("{}: {}", path.display(), pem_error(e))))?;
    if crls.is_empty() {
        return Err(TlsError::new(
            "crl",
            format!("{}: no X509 CRL in PEM file", path.display()),
        ));
    }
    Ok(crls)
}

/// A warning for every CRL of `s` (in `pem`, the bytes of `inbound.crl`) past its nextUpdate:
/// with `crl_expired = "reject"` its clients are refused until it is renewed.
pub fn crl_warnings(s: &Service, pem: &[u8]) -> Vec<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let policy = match s.inbound.crl_expired.unwrap_or_default() {
        CrlExpired::Reject => "its clients are refused until it is renewed",
        CrlExpired::Accept => "accepted anyway (crl_expired = \"accept\")",
    };
    CertificateRevocationListDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .filter_map(|der| {
            use x509_parser::prelude::FromDer as _;
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&der).ok()?;
            let next = crl.next_update()?;
            (next.timestamp() < now).then(|| {
                format!(
                    "service {}: the CRL of {} in {} was due for renewal at {next}: {policy}",
                    s.name,
                    crl.issuer(),
                    s.inbound.crl.as_deref().unwrap_or(Path::new("?")).display(),
                )
            })
        })
        .collect()
}

/// The TLS client side of a service (outbound `tls` or `mtls`).
pub fn client_config(out: &Outbound, m: &dyn Material) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &out.ca {
        Some(ca) => roots(m, "ca", ca)?,
        None => {
            // No `ca`: trust the system's roots, as any TLS client on this host would.
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::new(
                    "ca",
                    "not set and the system has no CA certificates: set `ca` to the backend's CA",
                ));
            }
            store
        }
    };
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let mut config = match (&out.cert, &out.key) {
        (Some(cert), Some(k)) => builder
            .with_client_auth_cert(certs(m, "cert", cert)?, key(m, "key", k)?)
            .map_err(|e| TlsError::new("key", format!("key does not fit the certificate: {e}")))?,
        _ => builder.with_no_client_auth(),
    };
    config.enable_secret_extraction = true;
    config.resumption = if out.resumption {
        ClientResumption::in_memory_sessions(CLIENT_SESSION_CACHE)
    } else {
        ClientResumption::disabled()
    };
    Ok(Arc::new(config))
}

/// The name the relay verifies the backend's certificate against: `server_name` if set, else the
/// backend's IP address.
pub fn server_name(s: &Service) -> Result<ServerName<'static>, String> {
    match &s.outbound.server_name {
        Some(name) => ServerName::try_from(name.clone())
            .map_err(|e| format!("{name:?} is not a valid DNS name or IP address: {e}")),
        None => Ok(ServerName::IpAddress(match s.backend_addr().ip() {
            IpAddr::V4(a) => a.into(),
            IpAddr::V6(a) => a.into(),
        })),
    }
}
