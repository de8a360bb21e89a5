//! PROXY headers from arbitrary addresses and TLS facts: always decodable by another
//! implementation (ppp), with the same addresses, or a clean error.
#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use relay::{
    access::{Authorised, Identity},
    config::ProxyProtocol,
    proxy_protocol::header,
    tls::facts::TlsFacts,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 36 {
        return;
    }
    let addr = |b: &[u8]| {
        let ip: [u8; 16] = b[..16].try_into().unwrap();
        let ip = Ipv6Addr::from(ip);
        // Half of the cases IPv4 (as a mapped address, as a dual-stack listener reports it).
        let ip = if b[16] & 1 == 0 {
            IpAddr::V6(ip)
        } else {
            IpAddr::V4(ip.to_ipv4_mapped().unwrap_or([192, 0, 2, 1].into()))
        };
        SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
    };
    let (client, destination) = (addr(&data[..18]), addr(&data[18..36]));
    let text = String::from_utf8_lossy(&data[36..]);
    let mut parts = text.split('\n');
    // Every other case, a name an `allow` rule authorised (any text a certificate may hold).
    let authorised = (data[1] & 1 == 1).then(|| Authorised {
        name: format!("dns:{}", parts.next().unwrap_or_default()),
        rule: "dns:*".into(),
    });
    let facts = TlsFacts {
        version: "TLSv1.3",
        cipher: parts.next().unwrap_or_default().to_owned(),
        sni: parts.next().map(str::to_owned),
        resumed: data[0] & 1 == 1,
        client: parts.next().map(|cn| Identity {
            cn: Some(cn.to_owned()),
            dns: vec![],
            uris: parts.map(str::to_owned).collect(),
        }),
        authorised,
        ask_directory: false,
    };
    if let Ok(bytes) = header(ProxyProtocol::V2, client, destination, Some(&facts)) {
        let parsed = ppp::v2::Header::try_from(bytes.as_slice()).expect("decodable");
        for tlv in parsed.tlvs() {
            tlv.expect("well-formed TLVs");
        }
    }
    if client.ip().to_canonical().is_ipv4() == destination.ip().to_canonical().is_ipv4() {
        let v1 = header(ProxyProtocol::V1, client, destination, None).unwrap();
        let line = String::from_utf8(v1).unwrap();
        assert!(
            line.starts_with("PROXY TCP") && line.ends_with("\r\n"),
            "{line:?}"
        );
    }
});
