//! Protocol recognition on a TLS front port: TLS or plaintext, told from the first byte the
//! client sends, and the HTTP redirect for plaintext when the service asks for it
//! (`inbound.plaintext = "redirect"`). On a plain port with `answer_http01`, ACME http-01
//! validation requests, recognised the same way: peeked, so anything else is relayed whole.
//!
//! Every TLS connection starts with a handshake record, content type 22 (0x16). No text
//! protocol starts with that control character, so one peeked byte decides, without consuming
//! anything the TLS stack or the backend still needs.

use std::{
    io,
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The most the relay reads of a plaintext request before it gives up on redirecting it.
const MAX_REQUEST_HEAD: usize = 8192;

/// How every ACME http-01 validation request starts (RFC 8555 8.3).
const ACME_HTTP: &[u8] = b"GET /.well-known/acme-challenge/";
/// How long a request that starts like a validation may take to show its whole first line.
const ACME_LINE_WAIT: Duration = Duration::from_millis(500);

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

/// The token of the ACME http-01 validation request the client's first bytes are, peeked
/// (nothing is consumed); `None` for anything else, which is then relayed untouched.
pub async fn acme_http_token(s: &TcpStream) -> io::Result<Option<String>> {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + ACME_LINE_WAIT;
    loop {
        let n = s.peek(&mut buf).await?;
        let seen = &buf[..n];
        let common = n.min(ACME_HTTP.len());
        if n == 0 || seen[..common] != ACME_HTTP[..common] {
            return Ok(None);
        }
        if let Some(end) = seen.iter().position(|b| *b == b'\r' || *b == b'\n') {
            return Ok(acme_token(&seen[..end]));
        }
        // The line so far starts like a validation: wait for the rest of it, a little.
        if n == buf.len() || Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `GET /.well-known/acme-challenge/<token> HTTP/1.x` → the token (base64url, as ACME makes
/// them).
fn acme_token(line: &[u8]) -> Option<String> {
    let rest = line.strip_prefix(ACME_HTTP)?;
    let space = rest.iter().position(|b| *b == b' ')?;
    let (token, version) = (&rest[..space], &rest[space + 1..]);
    let base64url = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
    (!token.is_empty() && token.iter().all(base64url) && version.starts_with(b"HTTP/1."))
        .then(|| String::from_utf8_lossy(token).into_owned())
}

/// Answers the validation request at the start of `s` with its key authorization.
pub async fn answer_acme_http(mut s: TcpStream, key_authorization: &str) -> io::Result<()> {
    // The request is read whole first: a close with unread bytes would reset the answer. A
    // head cut short or too long is answered all the same (its first line was a validation).
    if let Err(RedirectError::Io(e)) = read_head(&mut s).await {
        return Err(e);
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{key_authorization}",
        key_authorization.len()
    );
    s.write_all(response.as_bytes()).await?;
    s.shutdown().await
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
    let head = read_head(&mut s).await?;
    let location = location(&head, local.ip().to_canonical(), local.port())?;
    let response = format!(
        "HTTP/1.1 301 Moved Permanently\r\nLocation: {location}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(response.as_bytes()).await?;
    s.shutdown().await?;
    Ok(location)
}

/// Reads a plaintext HTTP request head, up to its empty line.
async fn read_head(s: &mut TcpStream) -> Result<Vec<u8>, RedirectError> {
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
    Ok(head)
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
    fn only_a_well_formed_validation_request_line_is_taken_for_one() {
        let token = |l: &str| acme_token(l.as_bytes());
        assert_eq!(
            token("GET /.well-known/acme-challenge/Ab-_9z HTTP/1.1").as_deref(),
            Some("Ab-_9z")
        );
        for other in [
            "GET /.well-known/acme-challenge/ HTTP/1.1",
            "GET /.well-known/acme-challenge/a/../b HTTP/1.1",
            "GET /.well-known/acme-challenge/abc",
            "GET /.well-known/acme-challenge/abc SSH-2.0",
            "POST /.well-known/acme-challenge/abc HTTP/1.1",
            "GET /index.html HTTP/1.1",
        ] {
            assert_eq!(token(other), None, "{other}");
        }
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
