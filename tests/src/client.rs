//! Clients at each security level (rustls), and the data-backend protocol from the client side.

use std::{net::SocketAddr, path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};
use tokio::{
    io::{
        AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
        BufReader,
    },
    net::TcpStream,
};

use crate::{pki::CertFiles, sha256_hex};

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How the client side connects: plaintext, TLS trusting `ca`, or TLS with a client certificate.
#[derive(Clone)]
pub enum ClientLevel<'a> {
    Plain,
    Tls { ca: &'a Path },
    Mtls { ca: &'a Path, cert: &'a CertFiles },
}

pub fn tls_config(ca: &Path, cert: Option<&CertFiles>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    Arc::new(match cert {
        Some(c) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&c.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&c.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

pub async fn connect(
    addr: SocketAddr,
    level: &ClientLevel<'_>,
) -> std::io::Result<Box<dyn Stream>> {
    connect_named(addr, level, "localhost").await
}

/// [`connect`] with another server name (SNI, and the name the certificate must carry).
pub async fn connect_named(
    addr: SocketAddr,
    level: &ClientLevel<'_>,
    server_name: &str,
) -> std::io::Result<Box<dyn Stream>> {
    over(TcpStream::connect(addr).await?, level, server_name).await
}

/// [`connect_named`] over a connection made elsewhere (from another network namespace, say).
pub async fn over(
    tcp: TcpStream,
    level: &ClientLevel<'_>,
    server_name: &str,
) -> std::io::Result<Box<dyn Stream>> {
    let config = match level {
        ClientLevel::Plain => return Ok(Box::new(tcp)),
        ClientLevel::Tls { ca } => tls_config(ca, None),
        ClientLevel::Mtls { ca, cert } => tls_config(ca, Some(cert)),
    };
    let name = ServerName::try_from(server_name.to_string()).map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(Box::new(tls))
}

/// Sends `data` to a SINK backend, half-closes, and returns the backend's `<length> <sha256>`
/// after checking it matches what was sent.
pub async fn sink(mut s: Box<dyn Stream>, data: &[u8]) -> anyhow::Result<()> {
    s.write_all(b"SINK\n").await?;
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).await?;
    let expected = format!("{} {}", data.len(), sha256_hex(data));
    anyhow::ensure!(
        answer.trim() == expected,
        "backend saw {answer:?}, sent {expected:?}"
    );
    Ok(())
}

/// Asks a SOURCE backend for `len` bytes of `seed` after half-closing, and checks them.
pub async fn source(mut s: Box<dyn Stream>, len: usize, seed: u64) -> anyhow::Result<()> {
    s.write_all(format!("SOURCE {len} {seed}\n").as_bytes())
        .await?;
    s.shutdown().await?;
    let mut got = Vec::with_capacity(len);
    s.read_to_end(&mut got).await?;
    anyhow::ensure!(got.len() == len, "received {} of {len} bytes", got.len());
    let expected = sha256_hex(&crate::pattern(seed, len));
    anyhow::ensure!(
        sha256_hex(&got) == expected,
        "content differs from what the backend sent"
    );
    Ok(())
}

/// [`sink`] for `len` bytes of `pattern(seed)`, generated while sending (no buffer of `len`).
pub async fn sink_stream(mut s: Box<dyn Stream>, len: u64, seed: u64) -> anyhow::Result<()> {
    use sha2::Digest as _;
    s.write_all(b"SINK\n").await?;
    let mut p = crate::Pattern::new(seed);
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).await?;
    let expected = format!("{len} {}", crate::hex(&hasher.finalize()));
    anyhow::ensure!(
        answer.trim() == expected,
        "backend saw {answer:?}, sent {expected:?}"
    );
    Ok(())
}

/// [`source`] for `len` bytes, compared piece by piece with `pattern(seed)` as they arrive;
/// the error names the first offset that differs.
pub async fn source_stream(mut s: Box<dyn Stream>, len: u64, seed: u64) -> anyhow::Result<()> {
    s.write_all(format!("SOURCE {len} {seed}\n").as_bytes())
        .await?;
    s.shutdown().await?;
    let mut p = crate::Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut expected = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        anyhow::ensure!(got + n as u64 <= len, "more than the {len} bytes sent");
        p.fill(&mut expected[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != expected[i]) {
            anyhow::bail!("content differs at offset {}", got + i as u64);
        }
        got += n as u64;
    }
    anyhow::ensure!(got == len, "received {got} of {len} bytes");
    Ok(())
}

/// Reads until the peer closes (EOF or an error such as a reset), discarding what arrives;
/// panics if the close takes longer than `limit`. Returns the bytes read and the time taken.
pub async fn read_until_closed(
    mut s: impl AsyncRead + Unpin,
    limit: std::time::Duration,
    what: &str,
) -> (usize, std::time::Duration) {
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match tokio::time::timeout_at((started + limit).into(), s.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return (total, started.elapsed()),
            // e.g. a TLS alert before the close: keep reading.
            Ok(Ok(n)) => total += n,
        }
    }
}

/// `openssl s_client` to `addr` (server name `localhost`, trusting `ca`), asking for `path` in
/// HTTP/1.0 and reading until the relay ends the connection (`-ign_eof`): the backend closes
/// after its answer, and a TLS 1.3 session's tickets arrive before it. `extra` are more
/// s_client arguments (`-tls1_2`, `-cert …`, `-sess_out …`).
pub fn openssl_get<S: AsRef<std::ffi::OsStr>>(
    addr: SocketAddr,
    ca: &Path,
    path: &str,
    extra: &[S],
) -> std::process::Output {
    let openssl = std::process::Command::new("openssl");
    openssl_get_with(openssl, &addr.to_string(), ca, path, extra)
}

/// [`openssl_get`] with a prepared `openssl` command (e.g. `ip netns exec NS openssl`) and
/// `host:port` as s_client takes it.
pub fn openssl_get_with<S: AsRef<std::ffi::OsStr>>(
    mut openssl: std::process::Command,
    connect: &str,
    ca: &Path,
    path: &str,
    extra: &[S],
) -> std::process::Output {
    use std::{io::Write as _, process::Stdio};
    let mut child = openssl
        .args(["s_client", "-connect", connect])
        .args(["-servername", "localhost", "-ign_eof", "-CAfile"])
        .arg(ca)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed (`cargo xtask setup`)");
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
