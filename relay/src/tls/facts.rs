//! What an inbound TLS handshake established, as the relay logs it and tells the backend (the
//! PROXY v2 TLVs): version, suite, server name, resumption, and who the client is.

use crate::access::{Authorised, Identity};

/// What the inbound TLS handshake established.
#[derive(Clone, Debug, Default)]
pub struct TlsFacts {
    /// "TLSv1.2" or "TLSv1.3".
    pub version: &'static str,
    pub cipher: String,
    pub sni: Option<String>,
    /// The session was resumed (its client certificate was verified on an earlier connection).
    pub resumed: bool,
    /// The names of the verified client certificate (mtls).
    pub client: Option<Identity>,
    /// The name an `allow` rule accepted, and the rule (mtls with `allow`).
    pub authorised: Option<Authorised>,
    /// No static rule accepted the client: the directory decides (see `directory`).
    pub ask_directory: bool,
}

impl TlsFacts {
    /// From a rustls server connection whose handshake is done, and the ClientHello's SNI.
    pub fn of(conn: &rustls::CommonState, sni: Option<String>) -> TlsFacts {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLSv1.3",
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            // rustls says TLS13_AES_256_GCM_SHA384 where the registry says TLS_AES_256_GCM_SHA384.
            .map(|name| match name.strip_prefix("TLS13_") {
                Some(rest) => format!("TLS_{rest}"),
                None => name.to_owned(),
            })
            .unwrap_or_default();
        TlsFacts {
            version,
            cipher,
            sni,
            resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            client: conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| Identity::from_der(der)),
            authorised: None,
            ask_directory: false,
        }
    }

    /// The identity handed to the backend: what was authorised, else the client's principal.
    pub fn identity(&self) -> Option<String> {
        self.authorised
            .as_ref()
            .map(|a| a.name.clone())
            .or_else(|| self.client.as_ref().map(Identity::principal))
    }
}
