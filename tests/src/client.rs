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
    let tcp = TcpStream::connect(addr).await?;
    let config = match level {
        ClientLevel::Plain => return Ok(Box::new(tcp)),
        ClientLevel::Tls { ca } => tls_config(ca, None),
        ClientLevel::Mtls { ca, cert } => tls_config(ca, Some(cert)),
    };
    let name = ServerName::try_from("localhost").unwrap();
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
