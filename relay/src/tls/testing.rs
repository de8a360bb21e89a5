//! TLS peers and configurations for unit tests: real rustls on both ends, over loopback TCP.

use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig, SupportedCipherSuite,
    crypto::aws_lc_rs::cipher_suite as suites,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use tokio::net::TcpStream;

/// Every suite rustls negotiates with aws-lc-rs: TLS 1.3's three, and TLS 1.2's three for
/// ECDSA certificates.
pub const SUITES: [SupportedCipherSuite; 6] = [
    suites::TLS13_AES_128_GCM_SHA256,
    suites::TLS13_AES_256_GCM_SHA384,
    suites::TLS13_CHACHA20_POLY1305_SHA256,
    suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// A certificate for "relay.test", and TLS configurations around it restricted to one
/// suite: the relay's own (secret extraction on, as `tls` builds them) and a peer's.
pub struct Tls {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    suite: SupportedCipherSuite,
}

impl Tls {
    pub fn new(suite: SupportedCipherSuite) -> Tls {
        let c = rcgen::generate_simple_self_signed(vec!["relay.test".into()]).unwrap();
        Tls {
            cert: c.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(c.signing_key.serialize_der()),
            suite,
        }
    }

    fn provider(&self) -> Arc<rustls::crypto::CryptoProvider> {
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.cipher_suites = vec![self.suite];
        Arc::new(p)
    }

    pub fn server(&self, relay: bool) -> Arc<ServerConfig> {
        let mut c = ServerConfig::builder_with_provider(self.provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .unwrap();
        c.enable_secret_extraction = relay;
        Arc::new(c)
    }

    pub fn client(&self, relay: bool) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let mut c = ClientConfig::builder_with_provider(self.provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.enable_secret_extraction = relay;
        Arc::new(c)
    }
}

pub fn name() -> ServerName<'static> {
    ServerName::try_from("relay.test").unwrap()
}

impl Tls {
    /// A server configuration of the relay's that asks for client certificates and trusts only
    /// `trusted`'s certificate as their issuer.
    pub fn mtls_server(&self, trusted: &Tls) -> Arc<ServerConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.cert.clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider(),
        )
        .build()
        .unwrap();
        let mut c = ServerConfig::builder_with_provider(self.provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .unwrap();
        c.enable_secret_extraction = true;
        Arc::new(c)
    }

    /// A peer's client configuration that presents `identity`'s certificate.
    pub fn client_presenting(&self, identity: &Tls) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let c = ClientConfig::builder_with_provider(self.provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![identity.cert.clone()],
                PrivateKeyDer::Pkcs8(identity.key.clone_key()),
            )
            .unwrap();
        Arc::new(c)
    }
}

/// No ACME validation pending (`handshake::accept` in tests).
pub fn no_challenges() -> &'static crate::tls::challenge::Challenges {
    static NONE: std::sync::LazyLock<crate::tls::challenge::Challenges> =
        std::sync::LazyLock::new(Default::default);
    &NONE
}
