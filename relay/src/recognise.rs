//! Protocol recognition on a TLS front port: TLS or plaintext, told from the first byte the
//! client sends, and the HTTP redirect for plaintext when the service asks for it
//! (`inbound.plaintext = "redirect"`).
//!
//! Every TLS connection starts with a handshake record, content type 22 (0x16). No text
//! protocol starts with that control character, so one peeked byte decides, without consuming
//! anything the TLS stack or the backend still needs.

use std::{io, net::IpAddr};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The most the relay reads of a plaintext request before it gives up on redirecting it.
const MAX_REQUEST_HEAD: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tls,
    Plain,
}

/// Waits for the client's first byte and tells what it speaks; `None` if it closed first.
pub async fn recognise(s: &TcpStream) -> io::Result<Option<Protocol>> {
    let mut first = [0u8; 1];
    Ok(match s.peek(&mut first).await? {
        0 => None,
        _ if first[0] == TLS_HANDSHAKE_RECORD => Some(Protocol::Tls),
        _ => Some(Protocol::Plain),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("not an HTTP request: {0}")]
    NotHttp(&'static str),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads a plaintext HTTP request head and answers `301 Moved Permanently` to the same path
/// over https on this port. Returns the Location sent.
pub async fn redirect(mut s: TcpStream) -> Result<String, RedirectError> {
    let local = s.local_addr()?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(RedirectError::NotHttp("request head larger than 8 KiB"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(RedirectError::NotHttp("closed before the end of the head"));
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let location = location(&head, local.ip().to_canonical(), local.port())?;
    let response = format!(
        "HTTP/1.1 301 Moved Permanently\r\nLocation: {location}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(response.as_bytes()).await?;
    s.shutdown().await?;
    Ok(location)
}

/// `https://<host>[:port]<path>` for a request head: the host from the Host header (without
/// its port), else this relay's address; the port only when it is not 443.
pub fn location(head: &[u8], local_ip: IpAddr, port: u16) -> Result<String, RedirectError> {
    let text = std::str::from_utf8(head).map_err(|_| RedirectError::NotHttp("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(RedirectError::NotHttp("no request line"));
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !version.starts_with("HTTP/1.")
    {
        return Err(RedirectError::NotHttp("no request line"));
    }
    // Only origin-form targets are echoed; anything else (absolute-form, `*`, odd bytes) goes
    // to the root, so nothing the client sent can split the response header.
    let path = if target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic()) {
        target
    } else {
        "/"
    };
    let host = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("host"))
        .map(|(_, value)| strip_port(value.trim()))
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    let host = match host {
        Some(h) => h.to_owned(),
        None => match local_ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        },
    };
    Ok(match port {
        443 => format!("https://{host}{path}"),
        p => format!("https://{host}:{p}{path}"),
    })
}

/// `example.org:80` → `example.org`; `[2001:db8::1]:80` → `[2001:db8::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(head: &str, port: u16) -> Result<String, RedirectError> {
        location(head.as_bytes(), "192.0.2.1".parse().unwrap(), port)
    }

    #[test]
    fn redirects_keep_path_and_host_and_add_the_port() {
        let head = "GET /a/b?c=1 HTTP/1.1\r\nHost: shop.example.org:8080\r\n\r\n";
        assert_eq!(loc(head, 443).unwrap(), "https://shop.example.org/a/b?c=1");
        assert_eq!(
            loc(head, 8443).unwrap(),
            "https://shop.example.org:8443/a/b?c=1"
        );
        let v6 = "GET / HTTP/1.1\r\nhost: [2001:db8::1]:80\r\n\r\n";
        assert_eq!(loc(v6, 443).unwrap(), "https://[2001:db8::1]/");
    }

    #[test]
    fn odd_requests_go_to_the_root_of_this_address() {
        let no_host = "GET /x HTTP/1.0\r\n\r\n";
        assert_eq!(loc(no_host, 443).unwrap(), "https://192.0.2.1/x");
        let absolute = "GET http://evil/ HTTP/1.1\r\nHost: a.example\r\n\r\n";
        assert_eq!(loc(absolute, 443).unwrap(), "https://a.example/");
        let bad_host = "GET / HTTP/1.1\r\nHost: a b\r\n\r\n";
        assert_eq!(loc(bad_host, 443).unwrap(), "https://192.0.2.1/");
        assert!(matches!(
            loc("hello\r\n\r\n", 443),
            Err(RedirectError::NotHttp(_))
        ));
        assert!(matches!(
            loc("SSH-2.0-OpenSSH\r\n\r\n", 443),
            Err(RedirectError::NotHttp(_))
        ));
    }
}
