//! TLS handshakes on the relay's sockets, with rustls' unbuffered API.
//!
//! The unbuffered API leaves every byte buffer to the caller, so a connection keeps none once
//! its handshake is over: the keys move to the relay's record layer ([`super::record`]) and
//! the handshake's buffers are freed. On the server side the ClientHello is first read whole
//! and shown to rustls' `Acceptor`, so its server name can choose the configuration (the
//! certificate of an `inbound.sni` entry, or a refusal for an unknown name); the connection
//! then starts from those same bytes. Every alert rustls queues for a failed handshake reaches
//! the peer before the socket closes.
//!
//! An `mtls` service's client policy ([`super::verify`]) is asked once more when the handshake
//! is done; a client it refuses then (a session resumed across a policy change, an instant
//! before) gets the fatal alert for its reason under the new traffic keys.

use std::{io, net::SocketAddr, ops::DerefMut, sync::Arc};

use rustls::{
    ClientConfig,
    client::{ClientConnectionData, UnbufferedClientConnection},
    pki_types::ServerName,
    server::{Acceptor, ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{
        ConnectionState, EncodeError, EncodeTlsData, UnbufferedConnectionCommon, UnbufferedStatus,
    },
};
use tokio::net::TcpStream;

use super::{
    ServerSide,
    challenge::{ACME_TLS_ALPN, Challenges},
    record::{Keys, Opener, RecordError, Sealer, Session, record_len},
    verify::{self, Refusal},
};
use crate::{
    net::io::{read_drained, write_all},
    tls::facts::TlsFacts,
};

/// The most handshake bytes held at once: rustls accepts handshake messages up to 64 KiB, and a
/// record more may be in flight behind them.
const MAX_HANDSHAKE_BUFFER: usize = (64 << 10) + super::record::MAX_RECORD;
/// Bytes read per receive during a handshake.
const READ_CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("closed before its ClientHello was complete")]
    ClosedBeforeHello,
    #[error("closed during the handshake")]
    Closed,
    #[error("ClientHello: {0}")]
    Hello(rustls::Error),
    #[error("no certificate for server name {0:?}")]
    UnknownSni(Option<String>),
    /// `cert = "acme"` and none issued yet.
    #[error("the service has no certificate yet: its ACME order has not completed")]
    NoCertificate,
    /// An ACME tls-alpn-01 validation, answered: the connection ends here (RFC 8737 3).
    #[error("ACME tls-alpn-01 validation of {0:?} answered")]
    AcmeAnswered(String),
    /// A ClientHello asking for `acme-tls/1` for a name with no pending challenge.
    #[error("ACME tls-alpn-01 validation of {0:?}, but no challenge is pending for it")]
    NoChallenge(Option<String>),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    /// The client policy refused the client (`mtls`).
    #[error("{0}")]
    Refused(Refusal),
    #[error("handshake larger than {} KiB", MAX_HANDSHAKE_BUFFER >> 10)]
    TooLarge,
    #[error("{0}")]
    Record(#[from] RecordError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl HandshakeError {
    /// The rustls error behind the failure, if rustls refused something.
    pub fn rustls(&self) -> Option<&rustls::Error> {
        match self {
            HandshakeError::Hello(e) | HandshakeError::Tls(e) => Some(e),
            HandshakeError::Refused(r) => Some(&r.error),
            HandshakeError::Record(RecordError::Rustls(e)) => Some(e),
            _ => None,
        }
    }
}

/// A TLS side whose handshake is done: its keys, and the bytes that followed the handshake.
/// It lives in a box for the connection's lifetime, so what both directions share sits here
/// rather than in the connection's task: the session, and the sending half behind the lock
/// that orders every record toward the peer.
pub struct Established {
    pub session: Session,
    pub opener: Opener,
    pub sealer: tokio::sync::Mutex<Sealer>,
    /// Bytes received after the handshake and not processed yet (the start of a record).
    pub incoming: Vec<u8>,
}

impl Established {
    fn new(keys: Keys, mut incoming: Vec<u8>) -> Established {
        // The handshake buffer's capacity is not kept for the connection's lifetime.
        incoming.shrink_to_fit();
        let Keys {
            session,
            opener,
            sealer,
        } = keys;
        Established {
            session,
            opener,
            sealer: tokio::sync::Mutex::new(sealer),
            incoming,
        }
    }
}

/// An inbound TLS connection, accepted.
pub struct Accepted {
    pub established: Established,
    pub facts: TlsFacts,
    /// The backend of the `inbound.sni` entry the server name chose, if it has its own.
    pub backend: Option<SocketAddr>,
}

/// The server side: reads the ClientHello, lets its server name choose the configuration, and
/// completes the handshake (client certificate verification included). A ClientHello for ACME
/// validation (ALPN `acme-tls/1`) is answered from `challenges` and goes no further.
pub async fn accept(
    socket: &TcpStream,
    server: &ServerSide,
    challenges: &Challenges,
) -> Result<Accepted, HandshakeError> {
    let mut incoming = Vec::with_capacity(READ_CHUNK);
    let mut acceptor = Acceptor::default();
    let hello = loop {
        let fed = incoming.len();
        if !receive(socket, &mut incoming).await? {
            return Err(HandshakeError::ClosedBeforeHello);
        }
        // The acceptor reads copies: `incoming` keeps the ClientHello for the connection.
        let mut new = &incoming[fed..];
        while !new.is_empty() {
            if acceptor.read_tls(&mut new)? == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(hello)) => break hello,
            Ok(None) => {}
            Err((e, mut alert)) => {
                let mut bytes = Vec::new();
                let _ = alert.write_all(&mut bytes);
                let _ = write_all(socket, &[&bytes]).await;
                return Err(HandshakeError::Hello(e));
            }
        }
    };
    let sni = hello.client_hello().server_name().map(str::to_owned);
    // A validator offers acme-tls/1 alone (RFC 8737 3), for one of this service's names.
    let validation = hello
        .client_hello()
        .alpn()
        .is_some_and(|offered| offered.eq([ACME_TLS_ALPN]));
    drop(hello);
    if validation {
        let ours = |n: &&str| server.acme_names.iter().any(|a| a.eq_ignore_ascii_case(n));
        let Some(config) = sni.as_deref().filter(ours).and_then(|n| challenges.get(n)) else {
            let _ = write_all(
                socket,
                &[&alert(rustls::AlertDescription::NoApplicationProtocol)],
            )
            .await;
            return Err(HandshakeError::NoChallenge(sni));
        };
        let mut conn = UnbufferedServerConnection::new(config)?;
        drive(&mut conn, socket, &mut incoming).await?;
        return Err(HandshakeError::AcmeAnswered(sni.unwrap_or_default()));
    }
    let Some((config, backend)) = server.select(sni.as_deref()) else {
        return Err(HandshakeError::UnknownSni(sni));
    };
    // Waiting for its ACME certificate; `sni` entries have theirs.
    if server.pending && Arc::ptr_eq(config, &server.default) {
        let _ = write_all(
            socket,
            &[&alert(rustls::AlertDescription::HandshakeFailure)],
        )
        .await;
        return Err(HandshakeError::NoCertificate);
    }
    let mut conn = UnbufferedServerConnection::new(Arc::clone(config))?;
    drive(&mut conn, socket, &mut incoming).await?;
    let mut facts = TlsFacts::of(&conn, sni);
    let admitted = server
        .policy
        .as_ref()
        .map(|p| p.after_handshake(conn.peer_certificates(), facts.resumed));
    let mut keys = Keys::server(conn)?;
    match admitted {
        None => {}
        Some(Ok(admitted)) => {
            facts.authorised = admitted.authorised;
            facts.ask_directory = admitted.ask_directory;
        }
        Some(Err(refusal)) => {
            let alert = rustls::AlertDescription::from(match &refusal.error {
                rustls::Error::InvalidCertificate(e) => e.clone(),
                _ => rustls::CertificateError::ApplicationVerificationFailure,
            });
            if let Ok(record) = keys.sealer.fatal(alert) {
                let _ = write_all(socket, &[&record]).await;
            }
            return Err(HandshakeError::Refused(refusal));
        }
    }
    Ok(Accepted {
        established: Established::new(keys, incoming),
        facts,
        backend,
    })
}

/// A fatal alert record, in clear (before any key is agreed).
fn alert(description: rustls::AlertDescription) -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, u8::from(description)]
}

/// The client side, toward a backend.
pub async fn connect(
    socket: &TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<Established, HandshakeError> {
    let mut conn = UnbufferedClientConnection::new(config, name)?;
    let mut incoming = Vec::new();
    drive(&mut conn, socket, &mut incoming).await?;
    Ok(Established::new(Keys::client(conn)?, incoming))
}

/// What the server and the client connection share for [`drive`].
trait Unbuffered: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
}

enum Step {
    Next,
    Send,
    Receive,
    Done,
    Failed(HandshakeError),
}

/// Runs `conn`'s handshake over `socket`, starting with the bytes already in `incoming`;
/// `incoming` keeps what follows the handshake.
async fn drive<C: Unbuffered>(
    conn: &mut C,
    socket: &TcpStream,
    incoming: &mut Vec<u8>,
) -> Result<(), HandshakeError> {
    let mut outgoing = Vec::new();
    // rustls is shown whole records, one more each time it needs more, so it never reads past
    // the end of the handshake: what follows is the record layer's (a KeyUpdate or a ticket
    // that rustls took in would be lost on the way to it). Application data or a close_notify
    // can therefore only reach rustls in the middle of a handshake, where they end it.
    let mut fed = 0;
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..fed]);
        let step = match state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                match encode(&mut data, &mut outgoing) {
                    Ok(()) => Step::Next,
                    Err(e) => Step::Failed(e),
                }
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                // Marked sent now; the bytes go out below, before rustls is asked again.
                data.done();
                Step::Send
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Receive,
            Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                Step::Failed(HandshakeError::Closed)
            }
            Ok(other) => Step::Failed(HandshakeError::Tls(rustls::Error::General(format!(
                "unexpected state during the handshake: {other:?}"
            )))),
            // The policy's note on the refused client, taken on the thread that just failed.
            Err(e) => Step::Failed(match verify::take_refusal() {
                Some(refusal) => HandshakeError::Refused(refusal),
                None => e.into(),
            }),
        };
        incoming.drain(..discard);
        fed -= discard;
        match step {
            Step::Next => {}
            Step::Send => {
                write_all(socket, &[&outgoing]).await?;
                outgoing.clear();
            }
            Step::Receive => loop {
                if let Some(len) = next_record(&incoming[fed..]) {
                    fed += len;
                    break;
                }
                if !receive(socket, incoming).await? {
                    return Err(HandshakeError::Closed);
                }
            },
            Step::Done => {
                write_all(socket, &[&outgoing]).await?;
                // Bytes rustls saw but kept (part of a message it was still joining) are not
                // records for the record layer.
                incoming.drain(..fed);
                return Ok(());
            }
            Step::Failed(e) => {
                send_alert(conn, socket, &mut incoming[..fed]).await;
                return Err(e);
            }
        }
    }
}

/// The length of the whole record at the start of `buf`, once it has arrived; all of `buf` if
/// its header is malformed, so that rustls refuses it with the right alert.
fn next_record(buf: &[u8]) -> Option<usize> {
    match record_len(buf) {
        Ok(Some(len)) if len <= buf.len() => Some(len),
        Ok(_) => None,
        Err(_) => Some(buf.len()),
    }
}

fn encode<D>(
    data: &mut EncodeTlsData<'_, D>,
    outgoing: &mut Vec<u8>,
) -> Result<(), HandshakeError> {
    let start = outgoing.len();
    outgoing.resize(start + READ_CHUNK, 0);
    loop {
        match data.encode(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(e)) => outgoing.resize(start + e.required_size, 0),
            Err(e) => {
                return Err(HandshakeError::Tls(rustls::Error::General(e.to_string())));
            }
        }
    }
}

/// After a failure rustls has queued an alert for the peer: send it, as a courtesy.
async fn send_alert<C: Unbuffered>(conn: &mut C, socket: &TcpStream, incoming: &mut [u8]) {
    let mut outgoing = Vec::new();
    // rustls emits what it has queued before it looks at the input again; the input must still
    // be the one it saw (it may hold places in it), though nothing more is read.
    for _ in 0..4 {
        match conn.process(incoming).state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                if encode(&mut data, &mut outgoing).is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = write_all(socket, &[&outgoing]).await;
}

/// Appends what the peer sent next to `incoming`; `false` when it closed.
async fn receive(socket: &TcpStream, incoming: &mut Vec<u8>) -> Result<bool, HandshakeError> {
    if incoming.len() >= MAX_HANDSHAKE_BUFFER {
        return Err(HandshakeError::TooLarge);
    }
    incoming.reserve(READ_CHUNK);
    loop {
        socket.readable().await?;
        let spare = incoming.spare_capacity_mut().len();
        let before = incoming.len();
        let read = read_drained(socket, spare, || {
            // Through tokio's own call, which fills the spare capacity without initialising it.
            match socket.try_read_buf(incoming) {
                Ok(_) => Ok(incoming.len() - before),
                Err(e) => Err(e),
            }
        });
        match read {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::tls::testing::{Tls, name, tcp_pair};

    #[tokio::test]
    async fn a_client_certificate_from_an_untrusted_issuer_is_refused() {
        let tls = Tls::new(TLS13_AES_128_GCM_SHA256);
        let (trusted, stranger) = (
            Tls::new(TLS13_AES_128_GCM_SHA256),
            Tls::new(TLS13_AES_128_GCM_SHA256),
        );
        let server = ServerSide::with_config(tls.mtls_server(&trusted));
        let (peer, ours) = tcp_pair().await;
        let client = async {
            let mut s = TlsConnector::from(tls.client_presenting(&stranger))
                .connect(name(), peer)
                .await?;
            s.write_all(b"let me in").await?;
            s.flush().await?;
            s.read(&mut [0; 16]).await
        };
        let (client, accepted) = tokio::join!(
            client,
            accept(&ours, &server, crate::tls::testing::no_challenges())
        );
        let Err(e) = accepted else {
            panic!("accepted a certificate from an untrusted issuer");
        };
        assert!(
            matches!(e.rustls(), Some(rustls::Error::InvalidCertificate(_))),
            "{e}"
        );
        // rustls' alert reached the client.
        let error = client.expect_err("the client was not told").to_string();
        assert!(error.contains("alert"), "{error}");
    }

    /// What an ACME validator does: offers only `acme-tls/1` for `sni`, takes any certificate
    /// (it checks the acmeIdentifier itself).
    fn validator() -> Arc<ClientConfig> {
        offering(&[ACME_TLS_ALPN])
    }

    /// A client offering `alpn` that takes any certificate.
    fn offering(alpn: &[&[u8]]) -> Arc<ClientConfig> {
        #[derive(Debug)]
        struct AnyCertificate;
        impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
            fn verify_server_cert(
                &self,
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &[rustls::pki_types::CertificateDer<'_>],
                _: &ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                rustls::crypto::aws_lc_rs::default_provider()
                    .signature_verification_algorithms
                    .supported_schemes()
            }
        }
        let mut config = ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    #[tokio::test]
    async fn acme_validation_is_answered_only_for_a_pending_name_and_only_to_acme_tls() {
        use crate::tls::challenge::{Challenges, answer};
        let tls = Tls::new(TLS13_AES_128_GCM_SHA256);
        let mut server = ServerSide::with_config(tls.server(true));
        server.acme_names = vec!["shop.example".into()];
        let challenges = Challenges::default();
        let pending = answer("shop.example", &[7; 32]).unwrap();
        let crate::tls::challenge::Answer::TlsAlpn {
            cert: pending_cert, ..
        } = pending.clone()
        else {
            unreachable!("a tls-alpn-01 answer")
        };
        let set = crate::tls::challenge::AnswerSet {
            generation: 1,
            answers: vec![pending.clone()],
        };
        challenges.set(&set).unwrap();
        let sni = |n: &str| ServerName::try_from(n.to_string()).unwrap();

        // The validator gets the answer: negotiated acme-tls/1, the answer's certificate with
        // the digest in the critical acmeIdentifier extension (1.3.6.1.5.5.7.1.31).
        let (peer, ours) = tcp_pair().await;
        let (client, accepted) = tokio::join!(
            TlsConnector::from(validator()).connect(sni("shop.example"), peer),
            accept(&ours, &server, &challenges)
        );
        assert!(
            matches!(accepted, Err(HandshakeError::AcmeAnswered(ref n)) if n == "shop.example")
        );
        let client = client.unwrap();
        let (_, conn) = client.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ACME_TLS_ALPN));
        let served = conn.peer_certificates().unwrap()[0].to_vec();
        assert_eq!(served, pending_cert);
        use x509_parser::prelude::FromDer as _;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&served).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        assert!(ext.value.ends_with(&[7; 32]));

        // A name with no pending challenge: refused, no certificate at all.
        let (peer, ours) = tcp_pair().await;
        let (client, accepted) = tokio::join!(
            TlsConnector::from(validator()).connect(sni("other.example"), peer),
            accept(&ours, &server, &challenges)
        );
        assert!(
            matches!(accepted, Err(HandshakeError::NoChallenge(Some(ref n))) if n == "other.example")
        );
        let error = client.expect_err("refused").to_string();
        assert!(error.contains("NoApplicationProtocol"), "{error}");

        // Another service (not ordering for the name) does not answer for it.
        let other_service = ServerSide::with_config(tls.server(true));
        let (peer, ours) = tcp_pair().await;
        let (client, accepted) = tokio::join!(
            TlsConnector::from(validator()).connect(sni("shop.example"), peer),
            accept(&ours, &other_service, &challenges)
        );
        assert!(matches!(accepted, Err(HandshakeError::NoChallenge(_))));
        assert!(client.is_err());

        // Ordinary clients for the pending name, without ALPN or offering acme-tls/1 among
        // others, get the service's certificate.
        for alpn in [&[][..], &[ACME_TLS_ALPN, b"h2"][..]] {
            let (peer, ours) = tcp_pair().await;
            let (client, accepted) = tokio::join!(
                TlsConnector::from(offering(alpn)).connect(sni("shop.example"), peer),
                accept(&ours, &server, &challenges)
            );
            assert!(accepted.is_ok(), "{alpn:?}");
            let client = client.unwrap();
            assert_ne!(
                client.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
                pending_cert,
                "{alpn:?}"
            );
            assert_eq!(client.get_ref().1.alpn_protocol(), None);
        }

        // An older set arriving late does not replace the newer one.
        let stale = crate::tls::challenge::AnswerSet {
            generation: 0,
            answers: Vec::new(),
        };
        challenges.set(&stale).unwrap();
        assert!(challenges.get("shop.example").is_some());
    }

    #[tokio::test]
    async fn a_service_without_its_certificate_yet_refuses_with_handshake_failure() {
        let tls = Tls::new(TLS13_AES_128_GCM_SHA256);
        let mut server = ServerSide::with_config(tls.server(true));
        server.pending = true;
        let (peer, ours) = tcp_pair().await;
        let (client, accepted) = tokio::join!(
            TlsConnector::from(tls.client(false)).connect(name(), peer),
            accept(&ours, &server, crate::tls::testing::no_challenges())
        );
        assert!(matches!(accepted, Err(HandshakeError::NoCertificate)));
        let error = client.expect_err("refused").to_string();
        assert!(error.contains("HandshakeFailure"), "{error}");
    }

    #[tokio::test]
    async fn every_alert_rustls_produces_reaches_the_client_before_the_close() {
        use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
        // No suite in common: rustls refuses the ClientHello with handshake_failure.
        let server = ServerSide::with_config(Tls::new(TLS13_AES_128_GCM_SHA256).server(true));
        let other = Tls::new(TLS13_CHACHA20_POLY1305_SHA256);
        let (peer, ours) = tcp_pair().await;
        let (client, accepted) = tokio::join!(
            TlsConnector::from(other.client(false)).connect(name(), peer),
            accept(&ours, &server, crate::tls::testing::no_challenges())
        );
        assert!(accepted.is_err());
        let error = client.expect_err("no common suite").to_string();
        assert!(error.contains("HandshakeFailure"), "{error}");
        // A client certificate required and not sent: certificate_required, in TLS 1.3 under
        // the handshake keys.
        let tls = Tls::new(TLS13_AES_128_GCM_SHA256);
        let server = ServerSide::with_config(tls.mtls_server(&tls));
        let (peer, ours) = tcp_pair().await;
        let client = async {
            let mut s = TlsConnector::from(tls.client(false))
                .connect(name(), peer)
                .await?;
            s.write_all(b"no certificate").await?;
            s.flush().await?;
            s.read(&mut [0; 16]).await
        };
        let (client, accepted) = tokio::join!(
            client,
            accept(&ours, &server, crate::tls::testing::no_challenges())
        );
        assert!(accepted.is_err());
        let error = client.expect_err("a certificate is required").to_string();
        assert!(error.contains("CertificateRequired"), "{error}");
    }

    #[tokio::test]
    async fn a_client_hello_split_over_two_records_is_accepted() {
        let tls = Tls::new(TLS13_AES_128_GCM_SHA256);
        let server = ServerSide::with_config(tls.server(true));
        let (mut peer, ours) = tcp_pair().await;
        let accept = tokio::spawn(async move {
            accept(&ours, &server, crate::tls::testing::no_challenges())
                .await
                .map(|_| ())
        });
        let mut conn = rustls::ClientConnection::new(tls.client(false), name()).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        // The one handshake message, cut in two records, each sent on its own.
        let (a, b) = hello[5..].split_at((hello.len() - 5) / 2);
        for part in [a, b] {
            let [hi, lo] = (part.len() as u16).to_be_bytes();
            peer.write_all(&[22, 3, 1, hi, lo]).await.unwrap();
            peer.write_all(part).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The rest of the handshake, the plain way.
        let mut buf = vec![0; 16384];
        while conn.is_handshaking() {
            if conn.wants_write() {
                let mut out = Vec::new();
                conn.write_tls(&mut out).unwrap();
                peer.write_all(&out).await.unwrap();
                continue;
            }
            let n = peer.read(&mut buf).await.unwrap();
            assert!(n > 0, "the relay closed during the handshake");
            conn.read_tls(&mut &buf[..n]).unwrap();
            conn.process_new_packets().unwrap();
        }
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        peer.write_all(&out).await.unwrap();
        accept.await.unwrap().unwrap();
    }
}
