//! ACME tls-alpn-01 answers (RFC 8737), on the front port of the service being validated.
//!
//! The ACME server proves that whoever asked for a certificate controls the name: it connects
//! to the name's port 443 (here: the service's own front port, transparent or explicit), offers
//! only the ALPN protocol `acme-tls/1`, and expects a self-signed certificate for that name
//! carrying the digest of the order's key authorization. The supervisor makes those
//! certificates ([`answer`]); the worker holds the ones in force ([`Challenges`]) and serves
//! them to a ClientHello that asks for `acme-tls/1` and names one. Nothing else is ever served
//! with them, and a validation connection carries no data: it ends after its handshake.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};

/// The ALPN protocol of tls-alpn-01 validation.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The answer to one name's challenge: a self-signed certificate and its key (DER).
#[derive(Clone, Serialize, Deserialize)]
pub struct Answer {
    pub name: String,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer").field("name", &self.name).finish()
    }
}

/// The certificate answering `name`'s challenge whose key authorization has `digest` (its
/// SHA-256): the name as its only SAN, the digest in the critical acmeIdentifier extension.
pub fn answer(name: &str, digest: &[u8]) -> Result<Answer, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    Ok(Answer {
        name: name.to_ascii_lowercase(),
        cert: cert.der().to_vec(),
        key: key.serialize_der(),
    })
}

/// One certificate for every ClientHello.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The challenge answers a worker serves now, by name.
#[derive(Default)]
pub struct Challenges {
    by_name: RwLock<HashMap<String, Arc<ServerConfig>>>,
}

impl Challenges {
    /// Serves exactly `answers` from now on.
    pub fn set(&self, answers: &[Answer]) -> Result<(), rustls::Error> {
        let mut next = HashMap::new();
        for a in answers {
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(a.key.clone()));
            let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)?;
            // Not `with_single_cert`: it parses the certificate as a web PKI end entity, which
            // refuses the critical acmeIdentifier extension this one exists to carry.
            let certified = CertifiedKey::new(vec![CertificateDer::from(a.cert.clone())], key);
            let mut config = ServerConfig::builder()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
            config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
            config.send_tls13_tickets = 0;
            next.insert(a.name.clone(), Arc::new(config));
        }
        *self.by_name.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// The configuration answering `name`'s challenge, if one is pending.
    pub fn get(&self, name: &str) -> Option<Arc<ServerConfig>> {
        let by_name = self.by_name.read().unwrap_or_else(|e| e.into_inner());
        by_name.get(&name.to_ascii_lowercase()).cloned()
    }
}
