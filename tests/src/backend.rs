//! A data backend for integrity tests, plain or TLS (rustls), optionally requiring a client
//! certificate. Each connection starts with one command line:
//! - `SINK`: read to EOF, answer `<length> <sha256>` and close.
//! - `SOURCE <length> <seed>`: send `pattern(seed, length)`, half-close, then read to EOF.
//! - `ECHO`: send back everything until EOF, then close.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use sha2::Digest as _;
use tokio::{
    io::{
        AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
        BufReader,
    },
    net::TcpListener,
};

use crate::{Pattern, hex, pki::CertFiles};

pub struct Backend {
    pub addr: SocketAddr,
    /// Connections that completed their command.
    pub served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// TLS settings of a backend: its certificate, and the CA its clients must be signed by (mtls).
pub struct BackendTls<'a> {
    pub cert: &'a CertFiles,
    pub client_ca: Option<&'a Path>,
}

impl Backend {
    /// A plaintext backend on an ephemeral loopback port.
    pub async fn plain() -> Backend {
        Backend::start("127.0.0.1:0".parse().unwrap(), None)
            .await
            .expect("start a plain backend on loopback")
    }

    pub async fn start(bind: SocketAddr, tls: Option<BackendTls<'_>>) -> anyhow::Result<Backend> {
        Backend::serve_on(std::net::TcpListener::bind(bind)?, tls)
    }

    /// A backend on a listener made elsewhere (in another network namespace, say).
    pub fn serve_on(
        listener: std::net::TcpListener,
        tls: Option<BackendTls<'_>>,
    ) -> anyhow::Result<Backend> {
        let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(server_config(&t)));
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&served);
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let ok = match acceptor {
                        Some(a) => match a.accept(socket).await {
                            Ok(tls) => serve(tls).await.is_ok(),
                            Err(_) => false,
                        },
                        None => serve(socket).await.is_ok(),
                    };
                    if ok {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Ok(Backend { addr, served, task })
    }
}

fn server_config(t: &BackendTls<'_>) -> Arc<ServerConfig> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(&t.cert.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&t.cert.key).unwrap();
    let builder = ServerConfig::builder();
    let builder = match t.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .unwrap(),
            )
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(builder.with_single_cert(chain, key).unwrap())
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["SINK"] => {
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut len = 0u64;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                len += n as u64;
                hasher.update(&buf[..n]);
            }
            let answer = format!("{len} {}\n", hex(&hasher.finalize()));
            stream.write_all(answer.as_bytes()).await?;
            stream.shutdown().await?;
        }
        ["SOURCE", len, seed] => {
            let len: usize = len.parse().map_err(std::io::Error::other)?;
            let seed: u64 = seed.parse().map_err(std::io::Error::other)?;
            // Streamed: a SOURCE may be far larger than memory should hold.
            let mut p = Pattern::new(seed);
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len());
                p.fill(&mut buf[..n]);
                stream.write_all(&buf[..n]).await?;
                left -= n;
            }
            stream.shutdown().await?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await?;
        }
        ["ECHO"] => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n]).await?;
            }
            stream.shutdown().await?;
        }
        _ => return Err(std::io::Error::other(format!("unknown command {line:?}"))),
    }
    Ok(())
}
