//! The TLS record layer of an established connection, working in the relay's own buffers.
//!
//! rustls runs every handshake (see [`super::handshake`]) and then hands over the traffic keys
//! together with a [`KernelConnection`], the interface rustls offers for kTLS. This machine's
//! kernel has no kTLS, so the relay protects records itself, as the kernel would:
//!
//! - **opening** happens in place, in the buffer the record was received into, with rustls' own
//!   `MessageDecrypter` for the negotiated suite (nonces, additional data and TLS 1.3 padding
//!   stay rustls' code); the plaintext is written to the other side from where it lies;
//! - **sealing** happens in place, in the buffer the plaintext was received into, with
//!   aws-lc-rs (the AEAD rustls itself uses); the record goes to the socket from there.
//!
//! What follows the handshake stays rustls' job through the [`KernelConnection`]: new traffic
//! secrets for a TLS 1.3 KeyUpdate, and session tickets a backend sends (outbound resumption).
//!
//! The relay answers its peers the way RFC 8446 (§5, §6) and RFC 5246 ask, and the way the
//! tlsfuzzer conformance suite checks them: every error the peer caused is answered with the
//! fatal alert [`RecordError::alert`] names before the connection closes (`bad_record_mac`,
//! `record_overflow`, `unexpected_message`, `decode_error`, `illegal_parameter`); a peer's own
//! error alert is answered with nothing. Post-handshake handshake messages may be fragmented
//! over records ([`Opener`] joins them, up to [`MAX_MESSAGE`]) but nothing else may come
//! between the fragments, and a KeyUpdate must end its record. A KeyUpdate that asks for one
//! back is answered at once ([`Content::KeyUpdateRequested`]); a TLS 1.2 peer that tries to
//! renegotiate gets a `no_renegotiation` warning and the connection goes on
//! ([`Content::Renegotiation`]).

use std::{
    ops::Range,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, ExtractedSecrets, HandshakeType,
    PeerMisbehaved, ProtocolVersion, SupportedCipherSuite,
    client::{ClientConnectionData, UnbufferedClientConnection},
    crypto::cipher::{InboundOpaqueMessage, MessageDecrypter},
    kernel::KernelConnection,
    server::{ServerConnectionData, UnbufferedServerConnection},
};

/// Bytes of a record header: content type, legacy version, length.
pub const HEADER: usize = 5;
/// The most plaintext one record carries (2^14).
pub const MAX_PLAINTEXT: usize = 16384;
/// The longest TLS 1.2 record body (2^14 + 2048, RFC 5246 §6.2.3); the framing bound.
const MAX_BODY: usize = MAX_PLAINTEXT + 2048;
/// The longest TLS 1.3 record body (2^14 + 256, RFC 8446 §5.2).
const MAX_BODY_TLS13: usize = MAX_PLAINTEXT + 256;
/// The longest whole record accepted from a peer.
pub const MAX_RECORD: usize = HEADER + MAX_BODY;
/// The longest post-handshake handshake message joined from fragments (rustls' own bound): a
/// NewSessionTicket with its extensions, a TLS 1.2 renegotiation ClientHello.
pub const MAX_MESSAGE: usize = 0xffff;
/// Every suite rustls negotiates (AES-GCM, ChaCha20-Poly1305) has a 16-byte tag.
const TAG: usize = 16;
/// TLS 1.2 AES-GCM records carry the per-record part of their nonce in clear.
const EXPLICIT_NONCE: usize = 8;
/// Records sealed per batch are far fewer: renewing the key this many records before the
/// suite's confidentiality limit keeps every batch under it.
const LIMIT_MARGIN: u64 = 1024;
/// Records in a row that carry no application data (empty records, warnings, KeyUpdates,
/// tickets) a peer may send: each costs work, none moves the connection forward. OpenSSL and
/// rustls allow 32.
const MAX_RECORDS_WITHOUT_DATA: u8 = 32;

const WARNING: u8 = 1;
const FATAL: u8 = 2;

/// What a peer did wrong, or what went wrong on the relay's side of a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record of content type {0}, not allowed here")]
    UnexpectedType(u8),
    #[error("record overflow: {0}")]
    Overflow(&'static str),
    #[error("record failed to decrypt (bad_record_mac)")]
    Decrypt,
    #[error("unexpected {0}")]
    Unexpected(&'static str),
    #[error("malformed {0}")]
    Decode(&'static str),
    #[error("illegal parameter: {0}")]
    Illegal(&'static str),
    #[error("peer sent the alert {0:?}")]
    Alert(AlertDescription),
    #[error("more than {MAX_RECORDS_WITHOUT_DATA} records in a row without application data")]
    NoData,
    #[error("the key is used up and TLS 1.2 cannot renew it")]
    Exhausted,
    #[error("unsupported cipher suite {0:?}")]
    Unsupported(String),
    #[error("sealing a record failed")]
    Seal,
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

impl RecordError {
    /// The fatal alert the peer is owed for this error (RFC 8446 §6.2), if any: none for the
    /// peer's own alert, nor where the peer cannot be answered.
    pub fn alert(&self) -> Option<AlertDescription> {
        use AlertDescription as A;
        Some(match self {
            RecordError::UnexpectedType(_) | RecordError::Unexpected(_) | RecordError::NoData => {
                A::UnexpectedMessage
            }
            RecordError::Overflow(_) => A::RecordOverflow,
            RecordError::Decrypt => A::BadRecordMac,
            RecordError::Decode(_) => A::DecodeError,
            RecordError::Illegal(_) => A::IllegalParameter,
            RecordError::Alert(_) | RecordError::Exhausted => return None,
            RecordError::Unsupported(_) | RecordError::Seal => A::InternalError,
            RecordError::Rustls(rustls::Error::InvalidMessage(_)) => A::DecodeError,
            RecordError::Rustls(rustls::Error::PeerMisbehaved(_)) => A::UnexpectedMessage,
            RecordError::Rustls(_) => A::InternalError,
        })
    }

    /// Whether the peer broke the protocol (rather than the relay failing on its own side).
    pub fn is_peer(&self) -> bool {
        !matches!(
            self,
            RecordError::Exhausted | RecordError::Unsupported(_) | RecordError::Seal
        )
    }
}

impl From<RecordError> for std::io::Error {
    fn from(e: RecordError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// The length of the whole record at the start of `buf`, once its header has arrived.
///
/// The legacy version field is not judged: RFC 8446 §5.1 says to ignore it, and it is part of
/// every record's authenticated data, so a changed one fails to open anyway.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(h) = buf.get(..HEADER) else {
        return Ok(None);
    };
    if !(20..=23).contains(&h[0]) {
        return Err(RecordError::UnexpectedType(h[0]));
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len > MAX_BODY {
        return Err(RecordError::Overflow(
            "record longer than 2^14 + 2048 bytes",
        ));
    }
    Ok(Some(HEADER + len))
}

/// What rustls keeps of one TLS side after its handshake, shared by the two directions of a
/// connection: the receiving one renews the peer's key and stores tickets, the sending one
/// renews the relay's key.
pub struct Session {
    kernel: Mutex<Kernel>,
    suite: SupportedCipherSuite,
    tls13: bool,
    /// The relay is the client of this side (toward a backend).
    client: bool,
    /// The receiving direction owes the peer an answer the sending direction has not sent
    /// yet: a KeyUpdate (TLS 1.3) or a `no_renegotiation` warning (TLS 1.2). One answers any
    /// number of requests (RFC 8446 §4.6.3 asks for one before the next data), so a peer's
    /// requests cannot pile up work.
    owed: AtomicBool,
    layout: (usize, usize),
}

enum Kernel {
    Server(KernelConnection<ServerConnectionData>),
    Client(KernelConnection<ClientConnectionData>),
}

impl Session {
    fn kernel(&self) -> std::sync::MutexGuard<'_, Kernel> {
        // Nothing panics while holding it; a poisoned lock still holds a consistent value.
        self.kernel.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_secrets(&self, receive: bool) -> Result<(u64, ConnectionTrafficSecrets), RecordError> {
        let mut kernel = self.kernel();
        Ok(match (&mut *kernel, receive) {
            (Kernel::Server(k), true) => k.update_rx_secret()?,
            (Kernel::Server(k), false) => k.update_tx_secret()?,
            (Kernel::Client(k), true) => k.update_rx_secret()?,
            (Kernel::Client(k), false) => k.update_tx_secret()?,
        })
    }

    pub fn is_tls13(&self) -> bool {
        self.tls13
    }

    /// The receiving direction owes the peer an answer (see [`Sealer::answers`]).
    pub fn owe_answer(&self) {
        self.owed.store(true, Ordering::Release);
    }

    /// Where a record's payload starts, and what a record adds to its payload: fixed for the
    /// suite ([`Sealer::payload_offset`], [`Sealer::overhead`]), known without the sealer.
    pub fn layout(&self) -> (usize, usize) {
        self.layout
    }
}

/// Both directions of one TLS side, ready to relay.
pub struct Keys {
    pub session: Session,
    pub opener: Opener,
    pub sealer: Sealer,
}

impl Keys {
    /// Takes over a server connection whose handshake is complete and whose output is sent.
    pub fn server(conn: UnbufferedServerConnection) -> Result<Keys, RecordError> {
        let (secrets, kernel) = conn.dangerous_into_kernel_connection()?;
        Keys::new(Kernel::Server(kernel), secrets)
    }

    /// Takes over a client connection whose handshake is complete and whose output is sent.
    pub fn client(conn: UnbufferedClientConnection) -> Result<Keys, RecordError> {
        let (secrets, kernel) = conn.dangerous_into_kernel_connection()?;
        Keys::new(Kernel::Client(kernel), secrets)
    }

    fn new(kernel: Kernel, secrets: ExtractedSecrets) -> Result<Keys, RecordError> {
        let (suite, version) = match &kernel {
            Kernel::Server(k) => (k.negotiated_cipher_suite(), k.protocol_version()),
            Kernel::Client(k) => (k.negotiated_cipher_suite(), k.protocol_version()),
        };
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        let mut session = Session {
            client: matches!(kernel, Kernel::Client(_)),
            kernel: Mutex::new(kernel),
            suite,
            tls13: version == ProtocolVersion::TLSv1_3,
            owed: AtomicBool::new(false),
            layout: (0, 0),
        };
        let sealer = Sealer::new(&session, tx_seq, tx)?;
        session.layout = (sealer.payload_offset(), sealer.overhead());
        Ok(Keys {
            opener: Opener::new(&session, rx_seq, rx)?,
            sealer,
            session,
        })
    }
}

/// What an opened record carried.
#[derive(Debug, PartialEq, Eq)]
pub enum Content {
    /// Application data: where its plaintext lies in the record (possibly empty).
    Data(Range<usize>),
    /// A message for the record layer itself (a KeyUpdate, a ticket, a warning), handled.
    Control,
    /// A TLS 1.3 KeyUpdate that asks for one back: send [`Sealer::key_update`] now.
    KeyUpdateRequested,
    /// A TLS 1.2 renegotiation attempt (HelloRequest or ClientHello): answer
    /// [`Sealer::no_renegotiation`] and go on.
    Renegotiation,
    /// The peer's close_notify: it sends nothing more.
    CloseNotify,
}

/// The receiving direction of a TLS side: the peer's key and the next sequence number.
pub struct Opener {
    decrypter: Box<dyn MessageDecrypter>,
    seq: u64,
    without_data: u8,
    /// The start of a handshake message whose rest is in the next records.
    joiner: Joiner,
}

impl Opener {
    fn new(
        session: &Session,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> Result<Opener, RecordError> {
        let (key, iv, gcm) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (key, iv, true),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv, false),
            _ => return Err(RecordError::Unsupported(format!("{:?}", session.suite))),
        };
        let decrypter = match session.suite {
            SupportedCipherSuite::Tls13(s) => s.aead_alg.decrypter(key, iv),
            // TLS 1.2 AES-GCM keys take the 4-byte implicit part of the nonce (the rest comes
            // with each record); ChaCha20-Poly1305 takes the whole 12-byte IV.
            SupportedCipherSuite::Tls12(s) => {
                let iv = iv.as_ref();
                s.aead_alg.decrypter(key, if gcm { &iv[..4] } else { iv })
            }
        };
        Ok(Opener {
            decrypter,
            seq,
            without_data: 0,
            joiner: Joiner::default(),
        })
    }

    /// Opens `record` (one whole record, header included, as [`record_len`] measured it) in
    /// place, and handles what is not application data.
    pub fn open(&mut self, session: &Session, record: &mut [u8]) -> Result<Content, RecordError> {
        let typ = ContentType::from(record[0]);
        if session.tls13 {
            // Everything after the handshake is protected (RFC 8446 §5): a change_cipher_spec
            // or any other outer type is out of place.
            if typ != ContentType::ApplicationData {
                return Err(RecordError::UnexpectedType(record[0]));
            }
            // Judged before decryption, as RFC 8446 §5.2 and tlsfuzzer expect.
            if record.len() - HEADER > MAX_BODY_TLS13 {
                return Err(RecordError::Overflow("record longer than 2^14 + 256 bytes"));
            }
        } else if typ == ContentType::ChangeCipherSpec {
            return Err(RecordError::UnexpectedType(record[0]));
        }
        let version = ProtocolVersion::from(u16::from_be_bytes([record[1], record[2]]));
        let base = record.as_ptr() as usize;
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        let message = InboundOpaqueMessage::new(typ, version, &mut record[HEADER..]);
        let plain = self.decrypter.decrypt(message, seq).map_err(|e| match e {
            rustls::Error::DecryptError => RecordError::Decrypt,
            rustls::Error::PeerSentOversizedRecord => {
                RecordError::Overflow("plaintext longer than 2^14 bytes")
            }
            rustls::Error::PeerMisbehaved(PeerMisbehaved::IllegalTlsInnerPlaintext) => {
                RecordError::Unexpected("record with no content type (all zeros)")
            }
            rustls::Error::PeerMisbehaved(PeerMisbehaved::IllegalMiddleboxChangeCipherSpec) => {
                RecordError::Unexpected("protected change_cipher_spec")
            }
            other => RecordError::Rustls(other),
        })?;
        if plain.payload.len() > MAX_PLAINTEXT {
            return Err(RecordError::Overflow("plaintext longer than 2^14 bytes"));
        }
        // RFC 8446 §5.1: handshake messages must not be interleaved with other record types.
        if self.joiner.is_pending() && plain.typ != ContentType::Handshake {
            return Err(RecordError::Unexpected(
                "record between the fragments of a handshake message",
            ));
        }
        if plain.typ == ContentType::ApplicationData && !plain.payload.is_empty() {
            self.without_data = 0;
        } else {
            self.without_data += 1;
            if self.without_data > MAX_RECORDS_WITHOUT_DATA {
                return Err(RecordError::NoData);
            }
        }
        match plain.typ {
            ContentType::ApplicationData => {
                let start = plain.payload.as_ptr() as usize - base;
                Ok(Content::Data(start..start + plain.payload.len()))
            }
            ContentType::Alert => alert(session, plain.payload),
            ContentType::Handshake => self.handshake(session, plain.payload),
            ContentType::ChangeCipherSpec => Err(RecordError::Unexpected(
                "change_cipher_spec after the handshake",
            )),
            _ => Err(RecordError::Unexpected("content type")),
        }
    }

    /// The handshake messages of one record, joined with the fragment the records before left.
    fn handshake(&mut self, session: &Session, payload: &[u8]) -> Result<Content, RecordError> {
        let mut joiner = std::mem::take(&mut self.joiner);
        let mut content = Content::Control;
        let result = joiner.join(payload, |typ, body, last| {
            content = self.message(session, typ, body, last)?;
            Ok(())
        });
        // A KeyUpdate renews `self` (a fresh Opener): the joiner is put back after it.
        self.joiner = joiner;
        result.map(|()| content)
    }

    /// One whole post-handshake handshake message; `last`: it ends its record.
    fn message(
        &mut self,
        session: &Session,
        typ: HandshakeType,
        body: &[u8],
        last: bool,
    ) -> Result<Content, RecordError> {
        let client = session.client;
        match typ {
            HandshakeType::KeyUpdate if session.tls13 => {
                // RFC 8446 §5.1: later records use the new key, so nothing may follow the
                // KeyUpdate in its record.
                if !last {
                    return Err(RecordError::Unexpected(
                        "message after a KeyUpdate in its record",
                    ));
                }
                let requested = match body {
                    [0] => false,
                    [1] => true,
                    [_] => return Err(RecordError::Illegal("KeyUpdate request_update value")),
                    _ => return Err(RecordError::Decode("KeyUpdate")),
                };
                let (seq, secrets) = session.new_secrets(true)?;
                let without_data = self.without_data;
                *self = Opener::new(session, seq, secrets)?;
                self.without_data = without_data;
                Ok(if requested {
                    Content::KeyUpdateRequested
                } else {
                    Content::Control
                })
            }
            HandshakeType::NewSessionTicket if session.tls13 && client => {
                match &mut *session.kernel() {
                    Kernel::Client(k) => k.handle_new_session_ticket(body)?,
                    Kernel::Server(_) => unreachable!("checked: a client session"),
                }
                Ok(Content::Control)
            }
            // RFC 5246 §7.4.1.1: a client may decline a server's HelloRequest with a
            // no_renegotiation warning; a server likewise a client's new ClientHello (RFC 5746
            // §4.4). The relay never renegotiates.
            HandshakeType::HelloRequest if !session.tls13 && client => {
                if !body.is_empty() {
                    return Err(RecordError::Decode("HelloRequest"));
                }
                Ok(Content::Renegotiation)
            }
            HandshakeType::ClientHello if !session.tls13 && !client => Ok(Content::Renegotiation),
            _ => Err(RecordError::Unexpected(
                "handshake message after the handshake",
            )),
        }
    }
}

/// Post-handshake handshake messages, joined across the records they were fragmented over
/// (RFC 8446 §5.1 allows it); at most [`MAX_MESSAGE`] bytes each. Holds memory only while a
/// message is incomplete.
#[derive(Debug, Default)]
pub struct Joiner {
    fragment: Vec<u8>,
}

impl Joiner {
    /// A message has begun and not ended: only handshake records may come next.
    pub fn is_pending(&self) -> bool {
        !self.fragment.is_empty()
    }

    /// Hands `each` the whole messages `payload` (one record's) completes, in order: type,
    /// body, and whether it ends the record. An incomplete last message is kept for the next
    /// record. An empty payload is refused (RFC 8446 §5.1: no zero-length handshake
    /// fragments), as is a message announced longer than the bound.
    pub fn join(
        &mut self,
        payload: &[u8],
        mut each: impl FnMut(HandshakeType, &[u8], bool) -> Result<(), RecordError>,
    ) -> Result<(), RecordError> {
        if payload.is_empty() {
            return Err(RecordError::Unexpected("empty handshake record"));
        }
        let joined;
        let mut messages = if self.fragment.is_empty() {
            payload
        } else {
            self.fragment.extend_from_slice(payload);
            joined = std::mem::take(&mut self.fragment);
            &joined[..]
        };
        while !messages.is_empty() {
            let Some((typ, body, rest)) = split_message(messages)? else {
                // The rest of this message comes in the next records.
                self.fragment = messages.to_vec();
                return Ok(());
            };
            messages = rest;
            each(typ, body, messages.is_empty())?;
        }
        Ok(())
    }
}

/// A handshake message's type and body, and the bytes after it.
type Split<'a> = (HandshakeType, &'a [u8], &'a [u8]);

/// The first handshake message of `messages` and what follows it; `None` when the message is
/// not whole yet (the rest comes in later records).
fn split_message(messages: &[u8]) -> Result<Option<Split<'_>>, RecordError> {
    let [typ, a, b, c, rest @ ..] = messages else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
    if len > MAX_MESSAGE {
        return Err(RecordError::Decode("handshake message longer than 64 KiB"));
    }
    Ok(rest
        .split_at_checked(len)
        .map(|(body, rest)| (HandshakeType::from(*typ), body, rest)))
}

/// One alert record, judged as rustls and RFC 8446 §6 do: close_notify ends the peer's
/// sending; user_canceled and TLS 1.2 warnings are informational; anything else is the peer's
/// error, which ends the connection without an answer.
fn alert(session: &Session, payload: &[u8]) -> Result<Content, RecordError> {
    let [level, description] = payload else {
        // tlsfuzzer (test-tls13-empty-alert) expects unexpected_message for an empty one.
        return Err(if payload.is_empty() {
            RecordError::Unexpected("empty alert record")
        } else {
            RecordError::Decode("alert")
        });
    };
    match (*level, AlertDescription::from(*description)) {
        (WARNING | FATAL, AlertDescription::CloseNotify) => Ok(Content::CloseNotify),
        (WARNING, AlertDescription::UserCanceled) => Ok(Content::Control),
        (WARNING, _) if !session.tls13 => Ok(Content::Control),
        (WARNING | FATAL, other) => Err(RecordError::Alert(other)),
        _ => Err(RecordError::Illegal("alert level")),
    }
}

/// The sending direction of a TLS side: the relay's key and the next sequence number.
pub struct Sealer {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    tls13: bool,
    /// TLS 1.2 AES-GCM: the nonce's per-record part travels in the record.
    explicit_nonce: bool,
    /// Renew the key (TLS 1.3) or end (TLS 1.2) from this many records on.
    renew_at: u64,
    /// The suite's confidentiality limit: never this many records under one key.
    limit: u64,
}

impl Sealer {
    fn new(
        session: &Session,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> Result<Sealer, RecordError> {
        let (algorithm, key, iv, gcm) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, true),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, true),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, false)
            }
            _ => return Err(RecordError::Unsupported(format!("{:?}", session.suite))),
        };
        let key = UnboundKey::new(algorithm, key.as_ref()).map_err(|_| RecordError::Seal)?;
        let limit = match session.suite {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        Ok(Sealer {
            key: LessSafeKey::new(key),
            iv: iv.as_ref().try_into().map_err(|_| RecordError::Seal)?,
            seq,
            tls13: session.tls13,
            explicit_nonce: gcm && !session.tls13,
            renew_at: limit - LIMIT_MARGIN.min(limit / 2),
            limit,
        })
    }

    /// Where a record's plaintext starts, from the start of the record.
    pub fn payload_offset(&self) -> usize {
        HEADER
            + if self.explicit_nonce {
                EXPLICIT_NONCE
            } else {
                0
            }
    }

    /// Bytes a record adds to its plaintext.
    pub fn overhead(&self) -> usize {
        self.payload_offset() + usize::from(self.tls13) + TAG
    }

    /// Seals the `len` plaintext bytes at `record[payload_offset()..]` as one record of type
    /// `typ`, in place; `record` has room for [`Sealer::overhead`] more. Returns the record's
    /// length.
    pub fn seal(
        &mut self,
        typ: ContentType,
        record: &mut [u8],
        len: usize,
    ) -> Result<usize, RecordError> {
        debug_assert!(len <= MAX_PLAINTEXT && record.len() >= len + self.overhead());
        if self.seq >= self.limit {
            return Err(RecordError::Exhausted);
        }
        let seq = self.seq;
        self.seq += 1;
        // The nonce is the IV with the sequence number XORed into its last 8 bytes (TLS 1.3,
        // ChaCha20-Poly1305, and rustls' choice for TLS 1.2 AES-GCM's explicit part).
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        let start = self.payload_offset();
        let (outer, sealed_len) = if self.tls13 {
            record[start + len] = u8::from(typ);
            (ContentType::ApplicationData, len + 1)
        } else {
            (typ, len)
        };
        let body_len = start - HEADER + sealed_len + TAG;
        let [hi, lo] = (body_len as u16).to_be_bytes();
        record[..HEADER].copy_from_slice(&[u8::from(outer), 3, 3, hi, lo]);
        if self.explicit_nonce {
            record[HEADER..start].copy_from_slice(&nonce[4..]);
        }
        let mut aad = [0u8; 13];
        let aad: &[u8] = if self.tls13 {
            aad[..HEADER].copy_from_slice(&record[..HEADER]);
            &aad[..HEADER]
        } else {
            // TLS 1.2: sequence number, type, version and plaintext length.
            let [lh, ll] = (len as u16).to_be_bytes();
            aad[..8].copy_from_slice(&seq.to_be_bytes());
            aad[8..].copy_from_slice(&[u8::from(typ), 3, 3, lh, ll]);
            &aad
        };
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut record[start..start + sealed_len],
            )
            .map_err(|_| RecordError::Seal)?;
        record[start + sealed_len..start + sealed_len + TAG].copy_from_slice(tag.as_ref());
        Ok(HEADER + body_len)
    }

    /// The record due before the next application data when the key nears its
    /// confidentiality limit: the relay's KeyUpdate (TLS 1.3). TLS 1.2 cannot renew its key:
    /// [`RecordError::Exhausted`] says to end the connection (with [`Sealer::close_notify`],
    /// which the margin leaves room for).
    pub fn before_data(&mut self, session: &Session) -> Result<Option<Vec<u8>>, RecordError> {
        if self.seq < self.renew_at {
            return Ok(None);
        }
        if !session.tls13 {
            return Err(RecordError::Exhausted);
        }
        self.key_update(session).map(Some)
    }

    /// KeyUpdate(update_not_requested), sealed under the current key; the key is renewed
    /// right after, so every later record uses the new one.
    pub fn key_update(&mut self, session: &Session) -> Result<Vec<u8>, RecordError> {
        let key_update = [u8::from(HandshakeType::KeyUpdate), 0, 0, 1, 0];
        let record = self.message(ContentType::Handshake, &key_update)?;
        let (seq, secrets) = session.new_secrets(false)?;
        *self = Sealer::new(session, seq, secrets)?;
        Ok(record)
    }

    /// The answer the session owes the peer, sealed: a KeyUpdate (which renews the key the
    /// next record is sealed under) or a `no_renegotiation` warning; nothing when none is owed.
    pub fn answers(&mut self, session: &Session) -> Result<Vec<u8>, RecordError> {
        if !session.owed.swap(false, Ordering::AcqRel) {
            return Ok(Vec::new());
        }
        if session.tls13 {
            self.key_update(session)
        } else {
            self.no_renegotiation()
        }
    }

    /// A close_notify alert, sealed: the relay sends nothing more on this side.
    pub fn close_notify(&mut self) -> Result<Vec<u8>, RecordError> {
        self.alert(WARNING, AlertDescription::CloseNotify)
    }

    /// A fatal alert, sealed: the last record of this side.
    pub fn fatal(&mut self, description: AlertDescription) -> Result<Vec<u8>, RecordError> {
        self.alert(FATAL, description)
    }

    /// The warning that declines a renegotiation.
    pub fn no_renegotiation(&mut self) -> Result<Vec<u8>, RecordError> {
        self.alert(WARNING, AlertDescription::NoRenegotiation)
    }

    fn alert(&mut self, level: u8, description: AlertDescription) -> Result<Vec<u8>, RecordError> {
        self.message(ContentType::Alert, &[level, u8::from(description)])
    }

    fn message(&mut self, typ: ContentType, body: &[u8]) -> Result<Vec<u8>, RecordError> {
        let start = self.payload_offset();
        let mut record = vec![0; body.len() + self.overhead()];
        record[start..start + body.len()].copy_from_slice(body);
        let len = self.seal(typ, &mut record, body.len())?;
        record.truncate(len);
        Ok(record)
    }

    /// Tests: a key that wears out after `records` more records.
    #[cfg(test)]
    pub fn wear_out_after(&mut self, records: u64) {
        self.renew_at = self.seq + records;
    }
}

#[cfg(test)]
mod tests {
    use rustls::SupportedCipherSuite;

    use super::*;
    use crate::tls::{
        ServerSide,
        handshake::{accept, connect},
        testing::{SUITES, Tls, name, tcp_pair},
    };

    /// The keys of both ends of one real handshake: (server, client).
    async fn pair(suite: SupportedCipherSuite) -> (Keys, Keys) {
        let tls = Tls::new(suite);
        let (a, b) = tcp_pair().await;
        let server = ServerSide::with_config(tls.server(true));
        let (server, client) = tokio::join!(
            accept(&b, &server, crate::tls::testing::no_challenges()),
            connect(&a, tls.client(true), name())
        );
        let keys = |e: crate::tls::handshake::Established| Keys {
            session: e.session,
            opener: e.opener,
            sealer: e.sealer.into_inner(),
        };
        let (server, client) = (server.unwrap().established, client.unwrap());
        let mut pending = client.incoming.clone();
        let mut client_keys = keys(client);
        // A TLS 1.3 server's session tickets follow its handshake: the client takes them in
        // first, or its sequence numbers lag behind the server's.
        let quiet = std::time::Duration::from_millis(100);
        while let Ok(ready) = tokio::time::timeout(quiet, a.readable()).await {
            ready.unwrap();
            let mut buf = [0; 4096];
            match a.try_read(&mut buf) {
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        while let Some(len) = record_len(&pending).unwrap() {
            let record: Vec<u8> = pending.drain(..len).collect();
            assert_eq!(open(&mut client_keys, record).unwrap().0, Content::Control);
        }
        (keys(server), client_keys)
    }

    fn open(keys: &mut Keys, mut record: Vec<u8>) -> Result<(Content, Vec<u8>), RecordError> {
        assert_eq!(record_len(&record).unwrap(), Some(record.len()));
        let content = keys.opener.open(&keys.session, &mut record)?;
        let data = match &content {
            Content::Data(r) => record[r.clone()].to_vec(),
            _ => Vec::new(),
        };
        Ok((content, data))
    }

    fn data(keys: &mut Keys, body: &[u8]) -> Vec<u8> {
        keys.sealer
            .message(ContentType::ApplicationData, body)
            .unwrap()
    }

    #[tokio::test]
    async fn records_sealed_on_one_end_open_on_the_other_with_every_suite() {
        for suite in SUITES {
            let (mut server, mut client) = pair(suite).await;
            for len in [0, 1, 1000, MAX_PLAINTEXT] {
                let body: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
                let record = data(&mut client, &body);
                let (content, got) = open(&mut server, record).unwrap();
                assert!(matches!(content, Content::Data(_)), "{suite:?} {len}");
                assert!(got == body, "{suite:?}: client → server, {len} bytes");
                let record = data(&mut server, &body);
                let (_, got) = open(&mut client, record).unwrap();
                assert!(got == body, "{suite:?}: server → client, {len} bytes");
            }
        }
    }

    #[tokio::test]
    async fn a_record_out_of_sequence_or_altered_fails() {
        let (mut server, mut client) = pair(SUITES[0]).await;
        let first = data(&mut client, b"first");
        let second = data(&mut client, b"second");
        // Skipping a record changes the nonce.
        assert!(matches!(
            open(&mut server, second),
            Err(RecordError::Decrypt)
        ));
        let (mut server, mut client) = pair(SUITES[3]).await;
        let mut altered = data(&mut client, b"attack at dawn");
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(matches!(
            open(&mut server, altered),
            Err(RecordError::Decrypt)
        ));
        drop(first);
    }

    #[tokio::test]
    async fn alerts_are_judged_by_level_and_version() {
        for (suite, tls13) in [(SUITES[0], true), (SUITES[3], false)] {
            let cases: [(&[u8], &str); 6] = [
                (&[1, 0], "close"),
                (&[2, 0], "close"),
                (&[1, 90], "control"),
                (&[2, 90], "error"),
                (&[3, 0], "error"),
                (&[1, 100], if tls13 { "error" } else { "control" }),
            ];
            for (alert, expected) in cases {
                let (mut server, mut client) = pair(suite).await;
                let record = client.sealer.message(ContentType::Alert, alert).unwrap();
                let got = match open(&mut server, record) {
                    Ok((Content::CloseNotify, _)) => "close",
                    Ok((Content::Control, _)) => "control",
                    Ok((_, _)) => "other",
                    Err(_) => "error",
                };
                assert_eq!(got, expected, "{suite:?}: alert {alert:?}");
            }
        }
    }

    #[tokio::test]
    async fn records_without_data_are_limited() {
        let (mut server, mut client) = pair(SUITES[0]).await;
        for round in 0..3 {
            for _ in 0..MAX_RECORDS_WITHOUT_DATA {
                open(&mut server, data(&mut client, b"")).unwrap();
            }
            if round < 2 {
                // Data in between starts the count again.
                open(&mut server, data(&mut client, b"x")).unwrap();
            }
        }
        assert!(matches!(
            open(&mut server, data(&mut client, b"")),
            Err(RecordError::NoData)
        ));
    }

    #[tokio::test]
    async fn key_updates_renew_both_directions() {
        let (mut server, mut client) = pair(SUITES[2]).await;
        // The client asks for an update and renews its own sending key, as a peer would.
        let request = client
            .sealer
            .message(ContentType::Handshake, &[24, 0, 0, 1, 1])
            .unwrap();
        let (seq, secrets) = client.session.new_secrets(false).unwrap();
        client.sealer = Sealer::new(&client.session, seq, secrets).unwrap();
        assert_eq!(
            open(&mut server, request).unwrap().0,
            Content::KeyUpdateRequested
        );
        let (_, got) = open(&mut server, data(&mut client, b"under the new key")).unwrap();
        assert_eq!(got, b"under the new key");
        // The server's answer, then its records under its new key.
        let update = server.sealer.key_update(&server.session).unwrap();
        assert_eq!(open(&mut client, update).unwrap().0, Content::Control);
        let (_, got) = open(&mut client, data(&mut server, b"answer")).unwrap();
        assert_eq!(got, b"answer");
    }

    /// Seals `message` split into records of `sizes` bytes (the rest in a last one).
    fn fragments(keys: &mut Keys, message: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut rest = message;
        let mut records = Vec::new();
        for &n in sizes {
            let (part, more) = rest.split_at(n);
            records.push(keys.sealer.message(ContentType::Handshake, part).unwrap());
            rest = more;
        }
        if !rest.is_empty() {
            records.push(keys.sealer.message(ContentType::Handshake, rest).unwrap());
        }
        records
    }

    #[tokio::test]
    async fn a_handshake_message_split_over_records_is_joined() {
        // A KeyUpdate a byte per record (RFC 8446 §5.1 allows fragmenting it), then data
        // under the key it asked for.
        let (mut server, mut client) = pair(SUITES[0]).await;
        let records = fragments(&mut client, &[24, 0, 0, 1, 0], &[1, 1, 1, 1]);
        assert_eq!(records.len(), 5);
        for (i, record) in records.into_iter().enumerate() {
            assert_eq!(
                open(&mut server, record).unwrap().0,
                Content::Control,
                "{i}"
            );
        }
        let (seq, secrets) = client.session.new_secrets(false).unwrap();
        client.sealer = Sealer::new(&client.session, seq, secrets).unwrap();
        let (_, got) = open(&mut server, data(&mut client, b"after")).unwrap();
        assert_eq!(got, b"after");
        // A TLS 1.3 server's ticket, split, reaches rustls on the client side whole.
        let (mut server, mut client) = pair(SUITES[1]).await;
        let mut ticket = vec![4, 0, 0, 0];
        ticket.extend([0, 0, 0, 60, 1, 2, 3, 4, 0, 0, 2, 7, 7, 0, 0]);
        let len = ticket.len() - 4;
        ticket[3] = len as u8;
        for record in fragments(&mut server, &ticket, &[2, 5]) {
            assert_eq!(open(&mut client, record).unwrap().0, Content::Control);
        }
    }

    #[tokio::test]
    async fn nothing_may_come_between_fragments_nor_after_a_key_update() {
        let (mut server, mut client) = pair(SUITES[0]).await;
        let first = client
            .sealer
            .message(ContentType::Handshake, &[24, 0])
            .unwrap();
        open(&mut server, first).unwrap();
        let e = open(&mut server, data(&mut client, b"between")).unwrap_err();
        assert_eq!(e.alert(), Some(AlertDescription::UnexpectedMessage), "{e}");

        let (mut server, mut client) = pair(SUITES[0]).await;
        let both = [24, 0, 0, 1, 0, 24, 0, 0, 1, 0];
        let record = client
            .sealer
            .message(ContentType::Handshake, &both)
            .unwrap();
        let e = open(&mut server, record).unwrap_err();
        assert_eq!(e.alert(), Some(AlertDescription::UnexpectedMessage), "{e}");
    }

    #[tokio::test]
    async fn a_handshake_message_longer_than_the_bound_is_refused_at_its_header() {
        let (mut server, mut client) = pair(SUITES[0]).await;
        let record = client
            .sealer
            .message(ContentType::Handshake, &[4, 1, 0, 0])
            .unwrap();
        let e = open(&mut server, record).unwrap_err();
        assert_eq!(e.alert(), Some(AlertDescription::DecodeError), "{e}");
    }

    #[tokio::test]
    async fn a_tls12_key_that_wears_out_ends_with_close_notify() {
        let (server, mut client) = pair(SUITES[3]).await;
        let mut sealer = server.sealer;
        sealer.wear_out_after(2);
        for _ in 0..2 {
            assert!(sealer.before_data(&server.session).unwrap().is_none());
            let record = sealer.message(ContentType::ApplicationData, b"x").unwrap();
            assert!(matches!(
                open(&mut client, record).unwrap().0,
                Content::Data(_)
            ));
        }
        assert!(matches!(
            sealer.before_data(&server.session),
            Err(RecordError::Exhausted)
        ));
        let goodbye = sealer.close_notify().unwrap();
        assert_eq!(open(&mut client, goodbye).unwrap().0, Content::CloseNotify);
    }

    #[test]
    fn record_headers_are_checked_before_anything_else() {
        assert!(record_len(&[23, 3, 3, 0]).unwrap().is_none());
        assert_eq!(record_len(&[23, 3, 3, 0, 40]).unwrap(), Some(45));
        assert_eq!(record_len(&[22, 3, 1, 0x48, 0]).unwrap(), Some(5 + 0x4800));
        for (bad, alert) in [
            ([24, 3, 3, 0, 1], AlertDescription::UnexpectedMessage),
            ([0, 3, 3, 0, 1], AlertDescription::UnexpectedMessage),
            ([23, 3, 3, 0x48, 1], AlertDescription::RecordOverflow),
        ] {
            let e = record_len(&bad).unwrap_err();
            assert_eq!(e.alert(), Some(alert), "{bad:?}: {e}");
        }
        // The legacy version is not judged (RFC 8446 §5.1): it is authenticated anyway.
        assert_eq!(record_len(&[23, 2, 0, 0, 1]).unwrap(), Some(6));
    }
}
