//! The PROXY protocol header the relay writes at the start of a backend connection
//! (`outbound.proxy_protocol`), so the backend learns who the client is although the TCP
//! connection comes from the relay. The framing is the `ppp` crate's; this module decides what
//! goes in it.
//!
//! - v1: `PROXY TCP4|TCP6 <client> <destination> <client port> <destination port>\r\n`.
//! - v2: the same addresses in binary, and for TLS inbound these TLVs:
//!   - `PP2_TYPE_AUTHORITY` (0x02): the SNI the client sent.
//!   - `PP2_TYPE_SSL` (0x20): client flags (SSL; certificate presented on this connection or
//!     in the resumed session), verify result 0 (the relay only relays verified clients), and
//!     the sub-TLVs `SSL_VERSION` ("TLSv1.3"), `SSL_CIPHER` (IANA name), `SSL_CN` (the client
//!     certificate's subject CN).
//!   - `0xE0` (first of the custom range): the client identity the relay authorised, with its
//!     kind (`uri:spiffe://…`, `dns:…` or `cn:…`): the name an `allow` rule matched, or without
//!     `allow` rules the client's principal (first URI SAN, else DNS SAN, else CN). The
//!     standard TLVs carry only the CN, and SPIFFE IDs live in URI SANs.
//!
//! The destination is the address the client connected to: in transparent mode the server and
//! front port, in explicit mode the relay's listen address.

use std::net::SocketAddr;

use ppp::v2::{self, Builder, Command, Protocol, Type, Version};

use crate::{config::ProxyProtocol, tls::facts::TlsFacts};

/// PP2_TYPE_MIN_CUSTOM: the relay's verified client identity.
pub const TLV_IDENTITY: u8 = 0xE0;

const CLIENT_SSL: u8 = 0x01;
const CLIENT_CERT_CONN: u8 = 0x02;
const CLIENT_CERT_SESS: u8 = 0x04;

/// The header to send before anything else on the backend connection; empty for `none`.
pub fn header(
    kind: ProxyProtocol,
    client: SocketAddr,
    destination: SocketAddr,
    tls: Option<&TlsFacts>,
) -> std::io::Result<Vec<u8>> {
    let client = canonical(client);
    let destination = canonical(destination);
    match kind {
        ProxyProtocol::None => Ok(Vec::new()),
        ProxyProtocol::V1 => Ok(ppp::v1::Addresses::from((client, destination))
            .to_string()
            .into_bytes()),
        ProxyProtocol::V2 => v2_header(client, destination, tls),
    }
}

fn v2_header(
    client: SocketAddr,
    destination: SocketAddr,
    tls: Option<&TlsFacts>,
) -> std::io::Result<Vec<u8>> {
    let addresses = v2::Addresses::from((client, destination));
    let mut b = Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses);
    let Some(tls) = tls else {
        return b.build();
    };
    if let Some(sni) = &tls.sni {
        b = b.write_tlv(Type::Authority, sni.as_bytes())?;
    }
    let mut flags = CLIENT_SSL;
    if tls.client.is_some() {
        flags |= if tls.resumed {
            CLIENT_CERT_SESS
        } else {
            CLIENT_CERT_CONN
        };
    }
    let mut ssl = vec![flags, 0, 0, 0, 0];
    push_tlv(&mut ssl, Type::SSLVersion.into(), tls.version.as_bytes());
    if !tls.cipher.is_empty() {
        push_tlv(&mut ssl, Type::SSLCipher.into(), tls.cipher.as_bytes());
    }
    if let Some(cn) = tls.client.as_ref().and_then(|c| c.cn.as_ref()) {
        push_tlv(&mut ssl, Type::SSLCommonName.into(), cn.as_bytes());
    }
    b = b.write_tlv(Type::SSL, &ssl)?;
    if let Some(identity) = tls.identity() {
        b = b.write_tlv(TLV_IDENTITY, identity.as_bytes())?;
    }
    b.build()
}

/// A sub-TLV inside PP2_TYPE_SSL (values here are short names, far below 64 KiB).
fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&value[..usize::from(len)]);
}

/// A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`; the header names them as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{Authorised, Identity};

    fn addrs(c: &str, d: &str) -> (SocketAddr, SocketAddr) {
        (c.parse().unwrap(), d.parse().unwrap())
    }

    #[test]
    fn v1_names_both_families_and_unmaps_ipv4() {
        let (c, d) = addrs("[::ffff:192.0.2.2]:40000", "[::ffff:203.0.113.10]:443");
        let h = header(ProxyProtocol::V1, c, d, None).unwrap();
        assert_eq!(h, b"PROXY TCP4 192.0.2.2 203.0.113.10 40000 443\r\n");
        let (c, d) = addrs("[2001:db8:a::2]:40000", "[2001:db8:b::10]:443");
        let h = header(ProxyProtocol::V1, c, d, None).unwrap();
        assert_eq!(h, b"PROXY TCP6 2001:db8:a::2 2001:db8:b::10 40000 443\r\n");
        assert!(header(ProxyProtocol::None, c, d, None).unwrap().is_empty());
    }

    #[test]
    fn v2_carries_addresses_and_tls_tlvs() {
        let (c, d) = addrs("[2001:db8:a::2]:40000", "[2001:db8:b::10]:443");
        let facts = TlsFacts {
            version: "TLSv1.3",
            cipher: "TLS_AES_256_GCM_SHA384".into(),
            sni: Some("api.example.org".into()),
            resumed: false,
            client: Some(Identity {
                cn: Some("web".into()),
                dns: vec!["web.example.org".into()],
                uris: vec!["spiffe://example.org/web".into()],
            }),
            authorised: None,
            ask_directory: false,
        };
        let bytes = header(ProxyProtocol::V2, c, d, Some(&facts)).unwrap();
        let parsed = v2::Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(parsed.addresses, v2::Addresses::from((c, d)));
        let tlvs: Vec<_> = parsed.tlvs().map(Result::unwrap).collect();
        assert_eq!(tlvs[0].kind, 0x02);
        assert_eq!(&*tlvs[0].value, b"api.example.org");
        assert_eq!(tlvs[1].kind, 0x20);
        let ssl = &tlvs[1].value;
        assert_eq!(ssl[0], CLIENT_SSL | CLIENT_CERT_CONN);
        assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verified");
        let mut subs = Vec::new();
        let mut rest = &ssl[5..];
        while !rest.is_empty() {
            let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
            subs.push((
                rest[0],
                String::from_utf8(rest[3..3 + len].to_vec()).unwrap(),
            ));
            rest = &rest[3 + len..];
        }
        assert_eq!(
            subs,
            [
                (0x21, "TLSv1.3".to_string()),
                (0x23, "TLS_AES_256_GCM_SHA384".to_string()),
                (0x22, "web".to_string()),
            ]
        );
        assert_eq!(tlvs[2].kind, TLV_IDENTITY);
        assert_eq!(&*tlvs[2].value, b"uri:spiffe://example.org/web");
    }

    #[test]
    fn v2_identity_is_the_name_that_was_authorised() {
        let (c, d) = addrs("192.0.2.2:1234", "198.51.100.10:443");
        let facts = TlsFacts {
            version: "TLSv1.3",
            client: Some(Identity {
                cn: Some("web".into()),
                dns: vec!["api.example.org".into()],
                uris: vec!["spiffe://example.org/web".into()],
            }),
            // An allow rule `dns:api.example.org` let it in, not its URI.
            authorised: Some(Authorised {
                name: "dns:api.example.org".into(),
                rule: "dns:*.example.org".into(),
            }),
            ..TlsFacts::default()
        };
        let bytes = header(ProxyProtocol::V2, c, d, Some(&facts)).unwrap();
        let parsed = v2::Header::try_from(bytes.as_slice()).unwrap();
        let identity = parsed
            .tlvs()
            .map(Result::unwrap)
            .find(|t| t.kind == TLV_IDENTITY)
            .unwrap();
        assert_eq!(&*identity.value, b"dns:api.example.org");
    }

    #[test]
    fn v2_without_tls_has_addresses_only() {
        let (c, d) = addrs("192.0.2.2:1234", "198.51.100.10:80");
        let bytes = header(ProxyProtocol::V2, c, d, None).unwrap();
        let parsed = v2::Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(parsed.addresses, v2::Addresses::from((c, d)));
        assert_eq!(parsed.tlvs().count(), 0);
        assert_eq!(bytes.len(), 16 + 12);
    }
}
