//! Who may use an `mtls` service, decided the same way on every connection: a full handshake,
//! a resumed TLS 1.3 session, a TLS 1.2 ticket or session id.
//!
//! [`ClientPolicy`] verifies a client's certificate chain — to `client_ca`, currently valid,
//! not revoked by the service's CRLs, the CRLs themselves fresh unless `crl_expired = "accept"`
//! — then matches its identity against `allow`. Revocation covers the whole chain: the end
//! entity must have a known status (a CRL from its issuer), an intermediate may not (no CRL
//! supplied for it: accepted), and a revoked intermediate refuses everything below it. rustls
//! asks the policy during every full handshake ([`PolicyVerifier`]).
//!
//! rustls does not ask again when a session is resumed: it restores the chain that was
//! verified when the session began, under the policy of that day. So the relay stands between
//! rustls and its session stores ([`GuardedTickets`], [`GuardedSessions`]): before a stored
//! session can be resumed, its chain is decided again under the current policy at the current
//! time. A session that fails is not resumed; the client falls back to a full handshake in the
//! same connection, where it is refused with the alert for its reason (or admitted, if only
//! the policy's wording changed and it is still allowed). Tickets are bound to their service
//! too: services share the ticket keys, and a ticket from one (a `tls` service, say, whose
//! sessions carry no client certificate at all) opens at no other. After a resumed handshake
//! the relay decides the restored chain once more ([`ClientPolicy::after_handshake`]), so a
//! policy that changed between ClientHello and Finished still holds.
//!
//! Why the stored chain is read from rustls' session encoding: rustls offers no hook on
//! resumption. The reader is strict and cross-checked by rustls' own decoder; whatever it
//! cannot read is not resumed (a full handshake, never an unchecked session), and a unit test
//! resumes a real session to prove it reads what rustls wrote.
//!
//! A refusal is rustls' handshake error, which carries no more than an alert. The identity it
//! refused travels beside it: the verifier leaves a [`Refusal`] note for the handshake, which
//! takes it ([`take_refusal`]) right after the rustls call that failed, on the same thread and
//! without an await in between, so a note never meets another connection.

use std::{cell::RefCell, fmt, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::{
        ProducesTickets, StoresServerSessions,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use crate::access::{Allow, Authorised, Identity};

/// Why a client was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Its identity matches no `allow` rule.
    NotAllowed,
    /// Its certificate, or one above it, is on a CRL.
    Revoked,
    /// Its certificate, or one above it, has expired or is not valid yet.
    Expired,
    /// A CRL needed to decide is past its nextUpdate (`crl_expired = "reject"`).
    CrlExpired,
    /// No CRL from the issuer of its certificate.
    RevocationUnknown,
    /// Its chain does not verify: unknown issuer, bad signature, bad encoding, no certificate.
    Untrusted,
    /// The directory that decides its `group:`/`attr:` rules did not answer, and no cached
    /// decision may stand in (fail closed).
    DirectoryUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::NotAllowed,
        Reason::Revoked,
        Reason::Expired,
        Reason::CrlExpired,
        Reason::RevocationUnknown,
        Reason::Untrusted,
        Reason::DirectoryUnavailable,
    ];

    /// The label in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Reason::NotAllowed => "not_allowed",
            Reason::Revoked => "revoked",
            Reason::Expired => "expired",
            Reason::CrlExpired => "crl_expired",
            Reason::RevocationUnknown => "revocation_unknown",
            Reason::Untrusted => "untrusted",
            Reason::DirectoryUnavailable => "directory_unavailable",
        }
    }

    /// Every reason but [`Reason::Untrusted`] refuses a client the CA vouched for: an access
    /// decision (outcome `denied`), not a broken handshake.
    pub fn is_access_decision(self) -> bool {
        self != Reason::Untrusted
    }

    fn of(e: &Error) -> Reason {
        use CertificateError as C;
        match e {
            Error::InvalidCertificate(C::Revoked) => Reason::Revoked,
            Error::InvalidCertificate(
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. },
            ) => Reason::Expired,
            Error::InvalidCertificate(
                C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. },
            ) => Reason::CrlExpired,
            Error::InvalidCertificate(C::UnknownRevocationStatus) => Reason::RevocationUnknown,
            Error::InvalidCertificate(C::ApplicationVerificationFailure) => Reason::NotAllowed,
            _ => Reason::Untrusted,
        }
    }
}

/// A client the policy refused, with what the relay may say about who it was.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub reason: Reason,
    /// The client's principal (`uri:…`, `dns:…`, `cn:…`) where its chain verified far enough
    /// to trust the names: refused by `allow`, or revoked.
    pub identity: Option<String>,
    /// What rustls was told, and so which alert the client got.
    pub error: Error,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = self.identity.as_deref().unwrap_or("client");
        match self.reason {
            Reason::NotAllowed => write!(f, "client identity {who} matches no allow rule"),
            Reason::Revoked => write!(f, "{who}: certificate revoked by the CRL"),
            Reason::Expired => write!(
                f,
                "client certificate expired or not yet valid ({})",
                self.error
            ),
            Reason::CrlExpired => write!(
                f,
                "a CRL is past its nextUpdate: clients are refused until it is renewed \
                 (crl_expired = \"reject\")"
            ),
            Reason::RevocationUnknown => write!(
                f,
                "no CRL from the issuer of the client certificate: revocation status unknown"
            ),
            Reason::Untrusted => write!(f, "client certificate not trusted: {}", self.error),
            Reason::DirectoryUnavailable => {
                write!(
                    f,
                    "the directory is unreachable: clients are refused (fail closed)"
                )
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// A client the policy let in: its names, and the one that matched an `allow` rule.
#[derive(Clone, Debug, Default)]
pub struct Admitted {
    pub identity: Option<Identity>,
    /// The name the matching rule accepted, and the rule; `None` without `allow` rules.
    pub authorised: Option<Authorised>,
    /// No static rule matched, and the service has directory rules: the directory decides,
    /// once the handshake is done (it may take a lookup; see `directory`).
    pub ask_directory: bool,
}

/// An `mtls` service's decision on client certificates (see the module doc).
#[derive(Debug)]
pub struct ClientPolicy {
    /// Chain to `client_ca`, validity, and the end entity's revocation (unknown status
    /// refused); CRL freshness per `crl_expired`.
    end_entity: Arc<dyn ClientCertVerifier>,
    /// With CRLs: revocation of every certificate of the chain, unknown status allowed.
    whole_chain: Option<Arc<dyn ClientCertVerifier>>,
    allow: Allow,
    /// The `allow` rules the directory decides.
    pub directory_rules: Vec<crate::directory::Rule>,
}

impl ClientPolicy {
    pub fn new(
        end_entity: Arc<dyn ClientCertVerifier>,
        whole_chain: Option<Arc<dyn ClientCertVerifier>>,
        allow: Allow,
    ) -> ClientPolicy {
        ClientPolicy {
            end_entity,
            whole_chain,
            directory_rules: allow.directory_rules(),
            allow,
        }
    }

    /// The whole decision on a chain at `now`.
    pub fn decide(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Admitted, Refusal> {
        let refused = |error: Error| {
            let reason = Reason::of(&error);
            Refusal {
                reason,
                identity: (reason == Reason::Revoked)
                    .then(|| Identity::from_der(end_entity).map(|id| id.principal()))
                    .flatten(),
                error,
            }
        };
        self.end_entity
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(refused)?;
        if let Some(chain) = &self.whole_chain
            && !intermediates.is_empty()
        {
            chain
                .verify_client_cert(end_entity, intermediates, now)
                .map_err(refused)?;
        }
        let identity = Identity::from_der(end_entity)
            .ok_or_else(|| refused(Error::InvalidCertificate(CertificateError::BadEncoding)))?;
        self.authorise(identity)
    }

    /// The `allow` rules alone, for a chain already verified.
    fn authorise(&self, identity: Identity) -> Result<Admitted, Refusal> {
        if self.allow.is_empty() {
            return Ok(Admitted {
                identity: Some(identity),
                authorised: None,
                ask_directory: false,
            });
        }
        match self.allow.decide(&identity) {
            Ok(authorised) => Ok(Admitted {
                authorised: Some(authorised),
                identity: Some(identity),
                ask_directory: false,
            }),
            Err(_) if !self.directory_rules.is_empty() => Ok(Admitted {
                authorised: None,
                identity: Some(identity),
                ask_directory: true,
            }),
            Err(denied) => Err(Refusal {
                reason: Reason::NotAllowed,
                identity: Some(denied.identity),
                error: Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
            }),
        }
    }

    /// The decision once a handshake is done, on the chain rustls holds: decided in full after
    /// a resumption (rustls restored the chain without asking), only by `allow` after a full
    /// handshake (the verifier has just checked the chain), to name what was authorised.
    pub fn after_handshake(
        &self,
        chain: Option<&[CertificateDer<'_>]>,
        resumed: bool,
    ) -> Result<Admitted, Refusal> {
        let Some((end_entity, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return Err(Refusal {
                reason: Reason::Untrusted,
                identity: None,
                error: Error::NoCertificatesPresented,
            });
        };
        if resumed {
            return self.decide(end_entity, intermediates, UnixTime::now());
        }
        let identity = Identity::from_der(end_entity).ok_or(Refusal {
            reason: Reason::Untrusted,
            identity: None,
            error: Error::InvalidCertificate(CertificateError::BadEncoding),
        })?;
        self.authorise(identity)
    }
}

thread_local! {
    static NOTE: RefCell<Option<Refusal>> = const { RefCell::new(None) };
}

/// The refusal the verifier noted during the last rustls call on this thread, if any.
pub fn take_refusal() -> Option<Refusal> {
    NOTE.with(|n| n.borrow_mut().take())
}

/// The [`ClientPolicy`] as rustls' client certificate verifier.
#[derive(Debug)]
pub struct PolicyVerifier(pub Arc<ClientPolicy>);

impl ClientCertVerifier for PolicyVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.end_entity.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.end_entity.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.end_entity.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        match self.0.decide(end_entity, intermediates, now) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(refusal) => {
                let error = refusal.error.clone();
                NOTE.with(|n| *n.borrow_mut() = Some(refusal));
                Err(error)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.end_entity.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.end_entity.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.end_entity.supported_verify_schemes()
    }
}

/// What a stored session must satisfy to be resumed at one service.
#[derive(Clone)]
pub struct Resumable {
    /// `mtls`: the chain is decided again; `tls`: a session must carry no client chain.
    pub policy: Option<Arc<ClientPolicy>>,
    /// Told of every session that is not resumed, with why (for the log and a counter).
    pub declined: Arc<dyn Fn(&Refusal) + Send + Sync>,
}

impl fmt::Debug for Resumable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resumable")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Resumable {
    /// Whether the stored session `value` (rustls' encoding) may be resumed now.
    fn admits(&self, value: &[u8]) -> bool {
        let decision = match (stored_chain(value), &self.policy) {
            (None, _) => Err(Refusal {
                reason: Reason::Untrusted,
                identity: None,
                error: Error::General("stored session not understood".into()),
            }),
            (Some(None), None) => Ok(()),
            (Some(chain), Some(policy)) => {
                policy.after_handshake(chain.as_deref(), true).map(|_| ())
            }
            (Some(Some(_)), None) => Err(Refusal {
                reason: Reason::Untrusted,
                identity: None,
                error: Error::General("stored session has a client certificate".into()),
            }),
        };
        match decision {
            Ok(()) => true,
            Err(refusal) => {
                (self.declined)(&refusal);
                false
            }
        }
    }
}

/// A service's view of the shared ticket keys: its tickets name it (inside the encryption,
/// so they open at no other service), and a ticket opens only if [`Resumable`] admits its
/// session now.
#[derive(Debug)]
pub struct GuardedTickets {
    pub inner: Arc<dyn ProducesTickets>,
    /// The service's binding: a digest of its name.
    pub context: [u8; 16],
    pub resumable: Resumable,
}

impl GuardedTickets {
    pub fn new(
        inner: Arc<dyn ProducesTickets>,
        service: &str,
        resumable: Resumable,
    ) -> GuardedTickets {
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            format!("relay ticket context\0{service}").as_bytes(),
        );
        let mut context = [0; 16];
        context.copy_from_slice(&digest.as_ref()[..16]);
        GuardedTickets {
            inner,
            context,
            resumable,
        }
    }
}

impl ProducesTickets for GuardedTickets {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut bound = Vec::with_capacity(self.context.len() + plain.len());
        bound.extend_from_slice(&self.context);
        bound.extend_from_slice(plain);
        self.inner.encrypt(&bound)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let mut plain = self.inner.decrypt(cipher)?;
        if plain.get(..self.context.len()) != Some(&self.context[..]) {
            return None;
        }
        plain.drain(..self.context.len());
        self.resumable.admits(&plain).then_some(plain)
    }
}

/// A service's TLS 1.2 session-id cache, guarded like its tickets.
#[derive(Debug)]
pub struct GuardedSessions {
    pub inner: Arc<dyn StoresServerSessions>,
    pub resumable: Resumable,
}

impl StoresServerSessions for GuardedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let value = self.inner.get(key)?;
        if self.resumable.admits(&value) {
            return Some(value);
        }
        self.inner.take(key);
        None
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let value = self.inner.take(key)?;
        self.resumable.admits(&value).then_some(value)
    }

    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

/// The client certificate chain in a session rustls stored (`ServerSessionValue`'s encoding):
/// `Some(None)` without one, `None` when the value cannot be read — also when rustls' own
/// decoder refuses it, so a misreading here can only cost a full handshake.
fn stored_chain(value: &[u8]) -> Option<Option<Vec<CertificateDer<'static>>>> {
    use rustls::internal::msgs::{codec::Codec as _, persist::ServerSessionValue};
    ServerSessionValue::read_bytes(value).ok()?;
    let mut r = Bytes(value);
    if r.flag()? {
        let sni = r.u8()?;
        r.take(usize::from(sni))?;
    }
    r.take(2 + 2)?; // version, cipher suite
    let secret = r.u8()?;
    r.take(usize::from(secret))?;
    r.u8()?; // extended master secret
    let chain = if r.flag()? {
        let len = r.u24()?;
        let mut list = Bytes(r.take(len)?);
        let mut certs = Vec::new();
        while !list.0.is_empty() {
            let len = list.u24()?;
            certs.push(CertificateDer::from(list.take(len)?.to_vec()));
        }
        Some(certs)
    } else {
        None
    };
    if r.flag()? {
        let alpn = r.u8()?;
        r.take(usize::from(alpn))?;
    }
    let data = r.take(2)?;
    r.take(usize::from(u16::from_be_bytes([data[0], data[1]])))?;
    r.take(8 + 4)?; // creation time, age obfuscation
    r.0.is_empty().then_some(chain)
}

/// A cursor over bytes that never reads past their end.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn flag(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        sync::{Arc, Mutex},
    };

    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
        KeyIdMethod, KeyPair, RevokedCertParams, SerialNumber,
    };
    use rustls::{
        ClientConfig, RootCertStore,
        pki_types::{PrivateKeyDer, pem::PemObject as _},
    };
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::{
        config::{Inbound, Level, UnknownSni},
        tls::{self, Files, handshake, testing::tcp_pair},
    };

    /// A client CA, a server certificate it also signs, and a client certificate (serial 7)
    /// for `client.test`, as PEM files in memory.
    struct Pki {
        files: Files,
        client_chain: Vec<CertificateDer<'static>>,
        client_key: PrivateKeyDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Pki {
        fn new() -> Pki {
            let ca_key = KeyPair::generate().unwrap();
            let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca.distinguished_name.push(DnType::CommonName, "test CA");
            let ca_cert = ca.self_signed(&ca_key).unwrap();
            let issuer = Issuer::new(ca, ca_key);
            let leaf = |name: &str, serial: u64| {
                let key = KeyPair::generate().unwrap();
                let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
                p.serial_number = Some(SerialNumber::from(serial));
                (p.signed_by(&key, &issuer).unwrap(), key)
            };
            let (server, server_key) = leaf("relay.test", 1);
            let (client, client_key) = leaf("client.test", 7);
            let mut files = Files::new();
            files.insert("ca.pem".into(), ca_cert.pem().into_bytes());
            files.insert("server.pem".into(), server.pem().into_bytes());
            files.insert("server.key".into(), server_key.serialize_pem().into_bytes());
            let client_key =
                PrivateKeyDer::from_pem_slice(client_key.serialize_pem().as_bytes()).unwrap();
            Pki {
                files,
                client_chain: vec![client.der().clone()],
                client_key,
                issuer,
            }
        }

        /// Writes `crl.pem` revoking these serial numbers.
        fn crl(&mut self, revoked: &[u64]) {
            let crl = CertificateRevocationListParams {
                this_update: rcgen::date_time_ymd(2025, 1, 1),
                next_update: rcgen::date_time_ymd(2099, 1, 1),
                crl_number: SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: revoked
                    .iter()
                    .map(|&s| RevokedCertParams {
                        serial_number: SerialNumber::from(s),
                        revocation_time: rcgen::date_time_ymd(2025, 1, 2),
                        reason_code: None,
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: KeyIdMethod::Sha256,
            };
            let pem = crl.signed_by(&self.issuer).unwrap().pem().unwrap();
            self.files.insert("crl.pem".into(), pem.into_bytes());
        }

        fn inbound(&self, level: Level, allow: &[&str]) -> Inbound {
            let path = |p: &str| Some(PathBuf::from(p));
            Inbound {
                level,
                cert: path("server.pem"),
                key: path("server.key"),
                names: Vec::new(),
                answer_http01: false,
                client_ca: (level == Level::Mtls).then(|| "ca.pem".into()),
                allow: allow.iter().map(|s| s.to_string()).collect(),
                crl: self
                    .files
                    .contains_key(&PathBuf::from("crl.pem"))
                    .then(|| "crl.pem".into()),
                crl_expired: None,
                plaintext: None,
                sni: Vec::new(),
                unknown_sni: UnknownSni::Default,
                resumption: true,
            }
        }

        fn client(&self, version: &'static rustls::SupportedProtocolVersion) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            let ca = &self.files[&PathBuf::from("ca.pem")];
            roots
                .add(CertificateDer::from_pem_slice(ca).unwrap())
                .unwrap();
            Arc::new(
                ClientConfig::builder_with_protocol_versions(&[version])
                    .with_root_certificates(roots)
                    .with_client_auth_cert(self.client_chain.clone(), self.client_key.clone_key())
                    .unwrap(),
            )
        }
    }

    /// Ticket keys that remember the last plaintext they sealed.
    #[derive(Debug)]
    struct Recording {
        inner: Arc<dyn ProducesTickets>,
        last: Mutex<Vec<u8>>,
    }

    impl ProducesTickets for Recording {
        fn enabled(&self) -> bool {
            true
        }
        fn lifetime(&self) -> u32 {
            self.inner.lifetime()
        }
        fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
            *self.last.lock().unwrap() = plain.to_vec();
            self.inner.encrypt(plain)
        }
        fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
            self.inner.decrypt(cipher)
        }
    }

    fn quiet() -> tls::OnDeclined {
        Arc::new(|_| {})
    }

    #[tokio::test]
    async fn a_stored_session_is_read_as_rustls_wrote_it() {
        let pki = Pki::new();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let recording = Arc::new(Recording {
                inner: rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
                last: Mutex::default(),
            });
            let resumption = tls::Resumption {
                ticketer: Some(recording.clone()),
            };
            let inbound = pki.inbound(Level::Mtls, &[]);
            let server =
                tls::server_side("svc", &inbound, &pki.files, &resumption, quiet()).unwrap();
            let (peer, ours) = tcp_pair().await;
            let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
            let (client, accepted) = tokio::join!(
                TlsConnector::from(pki.client(version)).connect(name, peer),
                handshake::accept(&ours, &server, crate::tls::testing::no_challenges())
            );
            client.unwrap();
            accepted.unwrap();
            let sealed = recording.last.lock().unwrap().clone();
            assert!(!sealed.is_empty(), "{version:?}: no ticket issued");
            // The service's binding first, then rustls' session.
            let value = &sealed[16..];
            assert_eq!(
                stored_chain(value),
                Some(Some(pki.client_chain.clone())),
                "{version:?}"
            );
            // Whatever does not read whole is not resumed, never misread.
            for cut in [1, value.len() / 2, value.len() - 1] {
                assert_eq!(
                    stored_chain(&value[..cut]),
                    None,
                    "{version:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn a_stored_session_is_decided_again_under_the_policy_of_today() {
        let mut pki = Pki::new();
        pki.crl(&[]);
        let declined = Arc::new(Mutex::new(Vec::new()));
        let resumable = |pki: &Pki, allow: &[&str]| {
            let inbound = pki.inbound(Level::Mtls, allow);
            let policy =
                tls::server_side("svc", &inbound, &pki.files, &Default::default(), quiet())
                    .unwrap()
                    .policy;
            let seen = Arc::clone(&declined);
            Resumable {
                policy,
                declined: Arc::new(move |r: &Refusal| seen.lock().unwrap().push(r.reason)),
            }
        };
        // A session as rustls stores it, with the client's chain.
        let mut value = vec![0, 3, 4, 0x13, 0x01, 2, 0xaa, 0xbb, 0];
        let cert = pki.client_chain[0].as_ref();
        let entry = cert.len() + 3;
        value.push(1);
        value.extend(&(entry as u32).to_be_bytes()[1..]);
        value.extend(&(cert.len() as u32).to_be_bytes()[1..]);
        value.extend(cert);
        value.extend([0, 0, 0]);
        value.extend([0; 12]);
        if stored_chain(&value).is_none() {
            // rustls' decoder is the judge of the layout; this test only needs one it accepts.
            panic!("hand-made session value not accepted by rustls");
        }
        assert!(resumable(&pki, &["dns:client.test"]).admits(&value));
        assert!(!resumable(&pki, &["dns:other.test"]).admits(&value));
        pki.crl(&[7]);
        assert!(!resumable(&pki, &["dns:client.test"]).admits(&value));
        assert_eq!(
            *declined.lock().unwrap(),
            [Reason::NotAllowed, Reason::Revoked]
        );
        // A `tls` service resumes no session with a client chain.
        let open = Resumable {
            policy: None,
            declined: quiet(),
        };
        assert!(!open.admits(&value));
    }

    #[test]
    fn tickets_open_only_at_the_service_that_issued_them() {
        let keys: Arc<dyn ProducesTickets> = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
        let resumable = Resumable {
            policy: None,
            declined: quiet(),
        };
        let a = GuardedTickets::new(Arc::clone(&keys), "a", resumable.clone());
        let b = GuardedTickets::new(keys, "b", resumable);
        // Not a session rustls wrote: judged only by its binding here.
        let ticket = a.encrypt(b"session").unwrap();
        assert_eq!(b.inner.decrypt(&ticket).map(|p| p.len()), Some(16 + 7));
        assert_eq!(b.decrypt(&ticket), None, "another service's ticket");
        assert_eq!(a.decrypt(&ticket), None, "not a session: never resumed");
    }
}
