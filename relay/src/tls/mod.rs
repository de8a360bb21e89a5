//! TLS material and rustls configurations for each side of a service.
//!
//! rustls with its default safe settings: TLS 1.2 and 1.3, its default cipher suites, no
//! renegotiation. Certificates and keys are PEM (RSA, ECDSA or Ed25519 keys). The relay is
//! protocol-agnostic, so it negotiates no ALPN: clients fall back to their default protocol
//! (HTTP/1.1 for curl), which the backend then sees unchanged.
//!
//! Configurations are built from the bytes of the files ([`material`]), never from the disk:
//! the supervisor reads each file once per change and builds (to validate), the worker builds
//! again from the same bytes. Errors say which config key they belong to.
//!
//! The handshakes themselves run in [`handshake`], and say what they learnt in [`facts`]; the
//! records after them are [`record`]'s; who may connect to an `mtls` service, on every
//! connection, is [`verify`]'s.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::Resumption as ClientResumption,
    pki_types::ServerName,
    server::{
        NoServerSessionStorage, ProducesTickets, ServerSessionMemoryCache, WebPkiClientVerifier,
        danger::ClientCertVerifier,
    },
};

pub mod challenge;
pub mod facts;
pub mod handshake;
pub mod material;
pub mod record;
#[cfg(test)]
pub mod testing;
pub mod verify;

use crate::{
    access::{Allow, dns_matches},
    config::{CrlExpired, Inbound, Outbound, Service},
};
pub use material::{Files, TlsError};
use material::{certs, crls, key, required, roots};
use verify::{ClientPolicy, GuardedSessions, GuardedTickets, PolicyVerifier, Resumable};

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

/// The TLS server side of a service (inbound `tls` or `mtls`): the default configuration, and
/// one per `sni` entry, chosen by the server name of each ClientHello.
pub struct ServerSide {
    pub default: Arc<ServerConfig>,
    by_name: Vec<(String, Arc<ServerConfig>, Option<SocketAddr>)>,
    /// The DNS names of the default certificate: known names even with `unknown_sni = "reject"`.
    default_names: Vec<String>,
    reject_unknown: bool,
    /// `cert = "acme"` with no certificate issued yet: every handshake but an ACME
    /// validation's (or one an `sni` entry serves) is refused.
    pub pending: bool,
    /// `cert = "acme"`: the names an ACME validation may ask this service for.
    pub acme_names: Vec<String>,
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
            pending: false,
            acme_names: Vec::new(),
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

/// Builds the server side of service `service`'s `inb`.
pub fn server_side(
    service: &str,
    inb: &Inbound,
    files: &Files,
    resumption: &Resumption,
    declined: OnDeclined,
) -> Result<ServerSide, TlsError> {
    let policy = client_policy(inb, files)?.map(Arc::new);
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
        (None, true) => {
            Some(rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| {
                TlsError::new("inbound.resumption", format!("session tickets: {e}"))
            })?)
        }
    }
    .map(|inner| {
        Arc::new(GuardedTickets::new(inner, service, resumable.clone())) as Arc<dyn ProducesTickets>
    });
    // The keys of an `sni` entry's files are its own (`inbound.sni[N].cert`).
    let build = |cert: &Path, key_path: &Path, sni: bool| -> Result<Arc<ServerConfig>, TlsError> {
        let (cert_field, key_field) = if sni {
            ("cert", "key")
        } else {
            ("inbound.cert", "inbound.key")
        };
        let chain = certs(files, cert_field, cert)?;
        let key = key(files, key_field, key_path)?;
        let builder = ServerConfig::builder();
        let builder = match &verifier {
            Some(v) => builder.with_client_cert_verifier(Arc::clone(v)),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            TlsError::new(key_field, format!("key does not fit the certificate: {e}"))
        })?;
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
    let (cert, key_path) = if inb.is_acme() {
        let both = material::acme_file(service);
        (both.clone(), both)
    } else {
        let cert = required("inbound.cert", &inb.cert)?;
        let key = required("inbound.key", &inb.key)?;
        (cert.to_path_buf(), key.to_path_buf())
    };
    let pending = inb.is_acme() && !(files.contains_key(&cert) && files.contains_key(&key_path));
    let (default, default_names) = if pending {
        // Its names are known names (`unknown_sni = "reject"` refuses them as pending, not as
        // unknown).
        let names = inb.names.iter().map(|n| n.to_ascii_lowercase()).collect();
        (no_certificate(), names)
    } else {
        let default = build(&cert, &key_path, false)?;
        let names = certs(files, "inbound.cert", &cert)?
            .first()
            .and_then(|der| crate::access::Identity::from_der(der))
            .map(|id| id.dns.iter().map(|d| d.to_ascii_lowercase()).collect())
            .unwrap_or_default();
        (default, names)
    };
    let mut by_name = Vec::with_capacity(inb.sni.len());
    for (n, e) in inb.sni.iter().enumerate() {
        let config = build(&e.cert, &e.key, true).map_err(|err| err.in_sni(n))?;
        by_name.push((e.name.to_ascii_lowercase(), config, e.backend));
    }
    Ok(ServerSide {
        default,
        by_name,
        default_names,
        reject_unknown: inb.unknown_sni == crate::config::UnknownSni::Reject,
        pending,
        acme_names: if inb.is_acme() {
            inb.names.clone()
        } else {
            Vec::new()
        },
        policy,
    })
}

/// The configuration of a service waiting for its first ACME certificate: it has none to
/// offer (handshakes are refused before it is used; see `handshake::accept`).
fn no_certificate() -> Arc<ServerConfig> {
    #[derive(Debug)]
    struct NoCertificate;
    impl rustls::server::ResolvesServerCert for NoCertificate {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    Arc::new(config)
}

/// The client policy of an `mtls` inbound side (CA, CRLs, `allow`), `None` for `tls`.
fn client_policy(inb: &Inbound, files: &Files) -> Result<Option<ClientPolicy>, TlsError> {
    let Some(ca) = &inb.client_ca else {
        return Ok(None);
    };
    let roots = Arc::new(roots(files, "inbound.client_ca", ca)?);
    let allow = Allow::parse(&inb.allow).map_err(|(_, e)| TlsError::new("inbound.allow", e))?;
    let crls = match &inb.crl {
        Some(path) => crls(files, path)?,
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
            .map_err(|e| TlsError::new("inbound.client_ca", format!("{}: {e}", ca.display())))
    };
    let whole_chain = if crls.is_empty() {
        None
    } else {
        Some(build(true)?)
    };
    Ok(Some(ClientPolicy::new(build(false)?, whole_chain, allow)))
}

/// The TLS client side of a service (outbound `tls` or `mtls`).
pub fn client_config(out: &Outbound, files: &Files) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &out.ca {
        Some(ca) => roots(files, "outbound.ca", ca)?,
        None => {
            // The system's store (read with the files): a bundle may hold certificates
            // webpki cannot use, which are passed over as any system client would.
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(certs(
                files,
                "outbound.ca",
                Path::new(material::SYSTEM_ROOTS),
            )?);
            store
        }
    };
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let mut config = match (&out.cert, &out.key) {
        (Some(cert), Some(k)) => {
            let chain = certs(files, "outbound.cert", cert)?;
            builder
                .with_client_auth_cert(chain, key(files, "outbound.key", k)?)
                .map_err(|e| {
                    TlsError::new(
                        "outbound.key",
                        format!("key does not fit the certificate: {e}"),
                    )
                })?
        }
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
pub fn server_name(s: &Service) -> Result<ServerName<'static>, TlsError> {
    match &s.outbound.server_name {
        Some(name) => ServerName::try_from(name.clone()).map_err(|e| {
            TlsError::new(
                "outbound.server_name",
                format!("{name:?} is not a valid DNS name or IP address: {e}"),
            )
        }),
        None => Ok(ServerName::IpAddress(match s.backend_addr().ip() {
            IpAddr::V4(a) => a.into(),
            IpAddr::V6(a) => a.into(),
        })),
    }
}
