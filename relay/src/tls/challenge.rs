//! ACME validation answers, served by the worker while an order waits for them.
//!
//! The ACME server proves that whoever asked for a certificate controls the name. With
//! tls-alpn-01 (RFC 8737) it connects to the name's port 443 (here: the service's own front
//! port, transparent or explicit), offers only the ALPN protocol `acme-tls/1`, and expects a
//! self-signed certificate for that name carrying the digest of the order's key authorization.
//! The supervisor makes those certificates ([`answer`]); the worker holds the ones in force
//! ([`Challenges`]) and serves them to a ClientHello that asks for `acme-tls/1` and names one.
//! Nothing else is ever served with them, and a validation connection carries no data: it ends
//! after its handshake. With http-01 (RFC 8555 8.3) it asks `GET
//! /.well-known/acme-challenge/<token>` on port 80, which a plain service with
//! `answer_http01 = true` answers with the key authorization (see `proxy`).

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

/// The answer to one name's challenge.
#[derive(Clone, Serialize, Deserialize)]
pub enum Answer {
    /// tls-alpn-01: a self-signed certificate and its key (DER).
    TlsAlpn {
        name: String,
        cert: Vec<u8>,
        key: Vec<u8>,
    },
    /// http-01: the body of the answer to `/.well-known/acme-challenge/<token>`.
    Http {
        name: String,
        token: String,
        key_authorization: String,
    },
}

/// Every answer in force, and which change of the set this is: sets are handed to the worker
/// by tasks that may overtake one another, and it keeps the newest.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AnswerSet {
    pub generation: u64,
    pub answers: Vec<Answer>,
}

impl Answer {
    /// The name it proves control of.
    pub fn name(&self) -> &str {
        match self {
            Answer::TlsAlpn { name, .. } | Answer::Http { name, .. } => name,
        }
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("name", &self.name())
            .finish()
    }
}

/// The certificate answering `name`'s challenge whose key authorization has `digest` (its
/// SHA-256): the name as its only SAN, the digest in the critical acmeIdentifier extension.
pub fn answer(name: &str, digest: &[u8]) -> Result<Answer, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    Ok(Answer::TlsAlpn {
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
    /// http-01: key authorizations by token.
    by_token: RwLock<HashMap<String, String>>,
    /// The generation of the set in force.
    generation: std::sync::atomic::AtomicU64,
}

impl Challenges {
    /// Serves exactly `set` from now on, unless a newer set is in force already.
    pub fn set(&self, set: &AnswerSet) -> Result<(), rustls::Error> {
        use std::sync::atomic::Ordering::SeqCst;
        // One writer at a time (the worker's message loop): the check here and the swap below
        // do not race with another set.
        if set.generation < self.generation.load(SeqCst) {
            return Ok(());
        }
        let mut next = HashMap::new();
        let mut tokens = HashMap::new();
        for a in &set.answers {
            let (name, cert, key) = match a {
                Answer::TlsAlpn { name, cert, key } => (name, cert, key),
                Answer::Http {
                    token,
                    key_authorization,
                    ..
                } => {
                    tokens.insert(token.clone(), key_authorization.clone());
                    continue;
                }
            };
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone()));
            let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)?;
            // Not `with_single_cert`: it parses the certificate as a web PKI end entity, which
            // refuses the critical acmeIdentifier extension this one exists to carry.
            let certified = CertifiedKey::new(vec![CertificateDer::from(cert.clone())], key);
            let mut config = ServerConfig::builder()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
            config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
            config.send_tls13_tickets = 0;
            next.insert(name.clone(), Arc::new(config));
        }
        self.generation.store(set.generation, SeqCst);
        *self.by_name.write().unwrap_or_else(|e| e.into_inner()) = next;
        *self.by_token.write().unwrap_or_else(|e| e.into_inner()) = tokens;
        Ok(())
    }

    /// Whether an http-01 validation is awaited (only then does a plain service look at
    /// requests before relaying them).
    pub fn awaits_http(&self) -> bool {
        !self
            .by_token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The key authorization answering http-01 `token`, if one is pending.
    pub fn http(&self, token: &str) -> Option<String> {
        let by_token = self.by_token.read().unwrap_or_else(|e| e.into_inner());
        by_token.get(token).cloned()
    }

    /// The configuration answering `name`'s challenge, if one is pending.
    pub fn get(&self, name: &str) -> Option<Arc<ServerConfig>> {
        let by_name = self.by_name.read().unwrap_or_else(|e| e.into_inner());
        by_name.get(&name.to_ascii_lowercase()).cloned()
    }
}
