//! A scripted TLS peer: the attacker's side of the record-layer tests.
//!
//! rustls performs the handshake (its unbuffered API, shown one whole record at a time so it
//! never reads past the handshake's end); then the peer holds the traffic keys (rustls' kernel
//! interface, which also renews them for KeyUpdates) and writes records of its own with
//! aws-lc-rs — well-formed ones and every malformed kind RFC 8446 and RFC 5246 tell a receiver
//! how to answer — and reads what comes back record by record. Nothing here shares code with
//! the relay's record layer: it is an independent reading of the RFCs.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{
    AlertDescription, ClientConfig, ConnectionTrafficSecrets, RootCertStore, ServerConfig,
    client::{ClientConnectionData, UnbufferedClientConnection},
    kernel::KernelConnection,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{ConnectionState, EncodeError, UnbufferedStatus},
};

pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;
pub const ALERT: u8 = 21;
pub const CHANGE_CIPHER_SPEC: u8 = 20;
pub const KEY_UPDATE: u8 = 24;

/// Which protocol version the peer insists on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

impl Version {
    fn rustls(self) -> &'static rustls::SupportedProtocolVersion {
        match self {
            Version::Tls12 => &rustls::version::TLS12,
            Version::Tls13 => &rustls::version::TLS13,
        }
    }
}

/// A client configuration trusting `ca`, one version only, secrets extractable.
pub fn client_config(ca: &Path, version: Version) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let mut c = ClientConfig::builder_with_protocol_versions(&[version.rustls()])
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.enable_secret_extraction = true;
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

/// A server configuration with this certificate, one version only, no tickets.
pub fn server_config(cert: &Path, key: &Path, version: Version) -> Arc<ServerConfig> {
    let chain = CertificateDer::pem_file_iter(cert)
        .expect("certificate file")
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_file(key).expect("key PEM");
    let mut c = ServerConfig::builder_with_protocol_versions(&[version.rustls()])
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("key fits the certificate");
    c.enable_secret_extraction = true;
    c.send_tls13_tickets = 0;
    Arc::new(c)
}

/// What the peer received next.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Data(Vec<u8>),
    Alert {
        fatal: bool,
        description: AlertDescription,
    },
    /// A post-handshake handshake message (type, body); a KeyUpdate has renewed the keys.
    Handshake(u8, Vec<u8>),
    /// The relay closed the connection (a FIN).
    Closed,
    /// The relay reset the connection.
    Reset,
    /// Nothing within the time limit.
    Nothing,
}

enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn renew(&mut self, transmit: bool) -> (u64, ConnectionTrafficSecrets) {
        let renewed = match (self, transmit) {
            (Kernel::Client(k), true) => k.update_tx_secret(),
            (Kernel::Client(k), false) => k.update_rx_secret(),
            (Kernel::Server(k), true) => k.update_tx_secret(),
            (Kernel::Server(k), false) => k.update_rx_secret(),
        };
        renewed.expect("rustls renews the traffic secret")
    }
}

/// One direction's key.
struct Key {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    /// TLS 1.2 AES-GCM: 4 bytes of the nonce are fixed, 8 travel with each record.
    explicit: bool,
}

impl Key {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets), version: Version) -> Key {
        let (alg, key, iv, gcm) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, true),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, true),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, false)
            }
            _ => panic!("a suite the peer does not know"),
        };
        Key {
            key: LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).expect("AEAD key")),
            iv: iv.as_ref().try_into().expect("12-byte IV"),
            seq,
            explicit: gcm && version == Version::Tls12,
        }
    }

    fn nonce(&self) -> [u8; 12] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }
}

pub struct TlsPeer {
    stream: TcpStream,
    version: Version,
    kernel: Kernel,
    tx: Key,
    rx: Key,
    inbox: Vec<u8>,
}

impl TlsPeer {
    /// Connects to `addr` as a TLS client and completes the handshake.
    pub fn connect(addr: SocketAddr, ca: &Path, version: Version) -> io::Result<TlsPeer> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        let name = ServerName::try_from("localhost").expect("a DNS name");
        let mut conn =
            UnbufferedClientConnection::new(client_config(ca, version), name).map_err(other)?;
        let mut inbox = Vec::new();
        handshake(&mut stream, &mut inbox, &mut conn)?;
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(other)?;
        Ok(TlsPeer::new(
            stream,
            version,
            Kernel::Client(kernel),
            secrets,
            inbox,
        ))
    }

    /// Accepts the relay's connection as a TLS server with this certificate.
    pub fn accept(
        mut stream: TcpStream,
        cert: &Path,
        key: &Path,
        version: Version,
    ) -> io::Result<TlsPeer> {
        let mut conn =
            UnbufferedServerConnection::new(server_config(cert, key, version)).map_err(other)?;
        let mut inbox = Vec::new();
        handshake(&mut stream, &mut inbox, &mut conn)?;
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(other)?;
        Ok(TlsPeer::new(
            stream,
            version,
            Kernel::Server(kernel),
            secrets,
            inbox,
        ))
    }

    fn new(
        stream: TcpStream,
        version: Version,
        kernel: Kernel,
        secrets: rustls::ExtractedSecrets,
        inbox: Vec<u8>,
    ) -> TlsPeer {
        TlsPeer {
            stream,
            version,
            kernel,
            tx: Key::new(secrets.tx, version),
            rx: Key::new(secrets.rx, version),
            inbox,
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// One record of type `typ` (the inner type in TLS 1.3) around `payload`, sealed under the
    /// current key, with `padding` zero bytes after the inner type (TLS 1.3).
    pub fn seal(&mut self, typ: u8, payload: &[u8], padding: usize) -> Vec<u8> {
        let (seq, nonce) = (self.tx.seq, self.tx.nonce());
        self.tx.seq += 1;
        let tls13 = self.version == Version::Tls13;
        let mut body = payload.to_vec();
        let outer = if tls13 {
            body.push(typ);
            body.resize(body.len() + padding, 0);
            APPLICATION_DATA
        } else {
            typ
        };
        let explicit = if self.tx.explicit { 8 } else { 0 };
        let length = explicit + body.len() + 16;
        let header = [outer, 3, 3, (length >> 8) as u8, length as u8];
        let aad = if tls13 {
            header.to_vec()
        } else {
            let mut aad = seq.to_be_bytes().to_vec();
            aad.extend([typ, 3, 3]);
            aad.extend((payload.len() as u16).to_be_bytes());
            aad
        };
        let nonce = if self.tx.explicit {
            // The fixed 4 bytes, then the explicit part this record carries.
            let mut n = [0; 12];
            n[..4].copy_from_slice(&self.tx.iv[..4]);
            n[4..].copy_from_slice(&nonce[4..]);
            n
        } else {
            nonce
        };
        self.tx
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .expect("seal");
        let mut record = header.to_vec();
        if self.tx.explicit {
            record.extend_from_slice(&nonce[4..]);
        }
        record.extend(body);
        record
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Seals and sends one record.
    pub fn send(&mut self, typ: u8, payload: &[u8]) -> io::Result<()> {
        let record = self.seal(typ, payload, 0);
        self.send_raw(&record)
    }

    pub fn send_data(&mut self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(16384) {
            self.send(APPLICATION_DATA, chunk)?;
        }
        Ok(())
    }

    /// A KeyUpdate (TLS 1.3), under the current key; the key is renewed right after.
    pub fn key_update(&mut self, requested: bool) -> io::Result<()> {
        self.send(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, u8::from(requested)])?;
        self.renew_tx();
        Ok(())
    }

    /// Renews the sending key (after sending a KeyUpdate some other way).
    pub fn renew_tx(&mut self) {
        self.tx = Key::new(self.kernel.renew(true), self.version);
    }

    /// A warning or fatal alert, sealed.
    pub fn alert(&mut self, fatal: bool, description: AlertDescription) -> io::Result<()> {
        self.send(ALERT, &[if fatal { 2 } else { 1 }, u8::from(description)])
    }

    pub fn close_notify(&mut self) -> io::Result<()> {
        self.alert(false, AlertDescription::CloseNotify)
    }

    /// Half-closes the TCP connection (a FIN), with no close_notify before it.
    pub fn fin(&mut self) -> io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Write)
    }

    /// The next record, opened; session tickets are taken in silently, a KeyUpdate renews
    /// the receiving key.
    pub fn recv(&mut self, limit: Duration) -> Received {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(len) = whole_record(&self.inbox) {
                let record: Vec<u8> = self.inbox.drain(..len).collect();
                let (typ, plain) = self.open(&record);
                match typ {
                    APPLICATION_DATA => return Received::Data(plain),
                    ALERT => {
                        assert_eq!(plain.len(), 2, "an alert is two bytes: {plain:?}");
                        return Received::Alert {
                            fatal: plain[0] == 2,
                            description: AlertDescription::from(plain[1]),
                        };
                    }
                    HANDSHAKE => {
                        assert!(plain.len() >= 4, "a whole handshake message: {plain:?}");
                        let (kind, body) = (plain[0], plain[4..].to_vec());
                        match kind {
                            // NewSessionTicket (TLS 1.3): not this peer's business.
                            4 => continue,
                            KEY_UPDATE => {
                                self.rx = Key::new(self.kernel.renew(false), self.version);
                            }
                            _ => {}
                        }
                        return Received::Handshake(kind, body);
                    }
                    other => panic!("record of type {other} from the relay"),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Received::Nothing;
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("read timeout");
            let mut buf = [0u8; 32 << 10];
            match self.stream.read(&mut buf) {
                Ok(0) if self.inbox.is_empty() => return Received::Closed,
                Ok(0) => panic!("closed in the middle of a record"),
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Received::Reset,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Received::Nothing;
                }
                Err(e) => panic!("reading from the relay: {e}"),
            }
        }
    }

    /// The relay's answer to a protocol violation: the fatal alert `expected`, then the end of
    /// the connection, and nothing else.
    pub fn expect_fatal(&mut self, expected: AlertDescription) {
        let got = self.recv(Duration::from_secs(5));
        assert_eq!(
            got,
            Received::Alert {
                fatal: true,
                description: expected
            },
            "the relay's answer"
        );
        let after = self.recv(Duration::from_secs(5));
        assert!(
            matches!(after, Received::Closed | Received::Reset),
            "after a fatal alert the relay closes; got {after:?}"
        );
    }

    /// Reads application data until `n` bytes have arrived.
    pub fn recv_data(&mut self, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.recv(Duration::from_secs(5)) {
                Received::Data(d) => got.extend(d),
                other => panic!("waiting for data ({} of {n} bytes): {other:?}", got.len()),
            }
        }
        got
    }

    /// Opens one whole record.
    fn open(&mut self, record: &[u8]) -> (u8, Vec<u8>) {
        let (seq, nonce) = (self.rx.seq, self.rx.nonce());
        self.rx.seq += 1;
        let tls13 = self.version == Version::Tls13;
        let (header, body) = record.split_at(5);
        let (nonce, mut body) = if self.rx.explicit {
            let mut n = [0; 12];
            n[..4].copy_from_slice(&self.rx.iv[..4]);
            n[4..].copy_from_slice(&body[..8]);
            (n, body[8..].to_vec())
        } else {
            (nonce, body.to_vec())
        };
        let aad = if tls13 {
            header.to_vec()
        } else {
            let mut aad = seq.to_be_bytes().to_vec();
            aad.extend([header[0], 3, 3]);
            aad.extend(((body.len() - 16) as u16).to_be_bytes());
            aad
        };
        let plain = self
            .rx
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .expect("the relay's record opens")
            .to_vec();
        if !tls13 {
            return (header[0], plain);
        }
        let mut plain = plain;
        while plain.last() == Some(&0) {
            plain.pop();
        }
        let typ = plain.pop().expect("an inner content type");
        (typ, plain)
    }
}

fn whole_record(buf: &[u8]) -> Option<usize> {
    let len = HEADER_LEN + usize::from(u16::from_be_bytes([*buf.get(3)?, *buf.get(4)?]));
    (buf.len() >= len).then_some(len)
}

const HEADER_LEN: usize = 5;

fn other(e: rustls::Error) -> io::Error {
    io::Error::other(e)
}

/// What the client and the server connection share for [`handshake`].
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
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

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
}

/// Runs `conn`'s handshake over blocking `stream`. rustls sees whole records, one more each
/// time it asks, so what follows the handshake stays in `inbox`.
fn handshake<C: Unbuffered>(
    stream: &mut TcpStream,
    inbox: &mut Vec<u8>,
    conn: &mut C,
) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut fed = 0;
    loop {
        let mut outgoing = Vec::new();
        let (discard, next) = {
            let UnbufferedStatus { discard, state } = conn.process(&mut inbox[..fed]);
            let next = match state.map_err(other)? {
                ConnectionState::EncodeTlsData(mut data) => {
                    let mut buf = vec![0; 16 << 10];
                    loop {
                        match data.encode(&mut buf) {
                            Ok(n) => {
                                outgoing.extend_from_slice(&buf[..n]);
                                break;
                            }
                            Err(EncodeError::InsufficientSize(e)) => {
                                buf.resize(e.required_size, 0);
                            }
                            Err(e) => return Err(io::Error::other(e.to_string())),
                        }
                    }
                    Step::Send
                }
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    Step::Send
                }
                ConnectionState::BlockedHandshake => Step::Receive,
                ConnectionState::WriteTraffic(_) => Step::Done,
                other => return Err(io::Error::other(format!("handshake: {other:?}"))),
            };
            (discard, next)
        };
        inbox.drain(..discard);
        fed -= discard;
        stream.write_all(&outgoing)?;
        match next {
            Step::Send => {}
            Step::Done => {
                inbox.drain(..fed);
                return Ok(());
            }
            Step::Receive => loop {
                if let Some(len) = whole_record(&inbox[fed..]) {
                    fed += len;
                    break;
                }
                let mut buf = [0u8; 16 << 10];
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                inbox.extend_from_slice(&buf[..n]);
            },
        }
    }
}

enum Step {
    Send,
    Receive,
    Done,
}
