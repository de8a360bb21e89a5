//! TLS material and rustls configurations for each side of a service.
//!
//! rustls with its default safe settings: TLS 1.2 and 1.3, its default cipher suites, no
//! renegotiation. Certificates and keys are PEM (RSA, ECDSA or Ed25519 keys). The relay is
//! protocol-agnostic, so it negotiates no ALPN: clients fall back to their default protocol
//! (HTTP/1.1 for curl), which the backend then sees unchanged.
//!
//! Errors say which config key they belong to (`field`), so the config module can point at the
//! right line.

use std::{net::IpAddr, path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::Resumption,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::{NoServerSessionStorage, ServerSessionMemoryCache, WebPkiClientVerifier},
};

use crate::config::{Inbound, Outbound, Service};

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

fn certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::new(field, format!("{}: {}", path.display(), pem_error(e))))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            field,
            format!("{}: no CERTIFICATE in PEM file", path.display()),
        ));
    }
    Ok(certs)
}

fn key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::new(field, format!("{}: {}", path.display(), pem_error(e))))
}

fn roots(field: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(field, path)? {
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
pub fn server_config(inb: &Inbound) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs("cert", required("cert", &inb.cert)?)?;
    let key = key("key", required("key", &inb.key)?)?;
    let builder = ServerConfig::builder();
    let builder = match &inb.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots("client_ca", ca)?))
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
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| TlsError::new("resumption", format!("session tickets: {e}")))?;
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// The TLS client side of a service (outbound `tls` or `mtls`).
pub fn client_config(out: &Outbound) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &out.ca {
        Some(ca) => roots("ca", ca)?,
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
            .with_client_auth_cert(certs("cert", cert)?, key("key", k)?)
            .map_err(|e| TlsError::new("key", format!("key does not fit the certificate: {e}")))?,
        _ => builder.with_no_client_auth(),
    };
    config.resumption = if out.resumption {
        Resumption::in_memory_sessions(CLIENT_SESSION_CACHE)
    } else {
        Resumption::disabled()
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
