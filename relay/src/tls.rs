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
//! Certificate, key and CA files are read through [`Material`]: from disk where the relay may
//! read them (config check, supervisor), from the bytes the supervisor sent where it may not
//! (a worker after dropping privileges).

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::Resumption as ClientResumption,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::{NoServerSessionStorage, ServerSessionMemoryCache, WebPkiClientVerifier},
};

use crate::config::{Inbound, Outbound, Service};

/// Where PEM files come from.
pub trait Material {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
}

/// Files on disk.
pub struct Disk;

impl Material for Disk {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
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
    [
        &s.inbound.cert,
        &s.inbound.key,
        &s.inbound.client_ca,
        &s.outbound.ca,
        &s.outbound.cert,
        &s.outbound.key,
    ]
    .into_iter()
    .filter_map(|p| p.as_deref())
    .collect()
}

/// Session resumption state shared by the services of one process.
#[derive(Clone, Default)]
pub struct Resumption {
    /// Ticket keys from the supervisor; `None`: a ticketer of this process's own.
    pub ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
}

/// Sessions remembered per service for TLS 1.2 session-id resumption (TLS 1.3 uses tickets).
const SERVER_SESSION_CACHE: usize = 4096;
/// Backend sessions remembered per service for outbound resumption.
const CLIENT_SESSION_CACHE: usize = 1024;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    field: &'static str,
    message: String,
}

impl TlsError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }

    /// The config key (inside `inbound` or `outbound`) the error is about.
    pub fn field(&self) -> &'static str {
        self.field
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

/// The TLS server side of a service (inbound `tls` or `mtls`).
pub fn server_config(
    inb: &Inbound,
    m: &dyn Material,
    resumption: &Resumption,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(m, "cert", required("cert", &inb.cert)?)?;
    let key = key(m, "key", required("key", &inb.key)?)?;
    let builder = ServerConfig::builder();
    let builder = match &inb.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots(m, "client_ca", ca)?))
                .build()
                .map_err(|e| TlsError::new("client_ca", format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::new("key", format!("key does not fit the certificate: {e}")))?;
    if inb.resumption {
        config.session_storage = ServerSessionMemoryCache::new(SERVER_SESSION_CACHE);
        config.ticketer = match &resumption.ticketer {
            Some(shared) => Arc::clone(shared),
            None => rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| TlsError::new("resumption", format!("session tickets: {e}")))?,
        };
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
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
