//! End to end, certificates that take care of themselves: a certificate from a real ACME
//! server (Debian's pebble) through tls-alpn-01 answered on the service's own front port,
//! renewed while a long transfer runs on the old one; pebble unreachable at start; and
//! certificate files replaced on disk (by rename, as tools do) while connections run, with a
//! truncated file refused.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use relay_tests::{
    client::tls_config,
    env::TestDir,
    free_port,
    http::HttpServer,
    metrics::sample,
    pebble::{Pebble, Place},
    pki::CertFiles,
    relay::Relay,
    replace_file, sha256_hex, wait_until,
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const NAME: &str = "shop.test";
/// The file the long transfers download.
const BIG: usize = 32 << 20;

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A real HTTP server with `big.bin` (32 MiB) and `hello.txt`.
fn http_backend(env: &TestDir) -> (HttpServer, String) {
    let www = env.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let big = relay_tests::pattern(7, BIG);
    std::fs::write(www.join("big.bin"), &big).unwrap();
    std::fs::write(www.join("hello.txt"), "hello through the relay\n").unwrap();
    let server = HttpServer::start(&www, "127.0.0.1".parse().unwrap(), free_port(), &[]).unwrap();
    (server, sha256_hex(&big))
}

/// A TLS connection to `front` for [`NAME`], trusting `ca`: the certificate it was served.
async fn connect(
    front: SocketAddr,
    ca: &Path,
) -> anyhow::Result<(tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>)> {
    let tcp = TcpStream::connect(front).await?;
    let tls = tokio_rustls::TlsConnector::from(tls_config(ca, None))
        .connect(ServerName::try_from(NAME)?, tcp)
        .await?;
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok((tls, served))
}

/// The certificate `front` serves for [`NAME`] now.
async fn served(front: SocketAddr, ca: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(connect(front, ca).await?.1)
}

/// A download of `big.bin` that the test reads at its own pace: it stalls (TCP backpressure)
/// while the test does something else, so the certificate changes in its middle.
struct Download {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    body: Vec<u8>,
    served: Vec<u8>,
}

impl Download {
    async fn start(front: SocketAddr, ca: &Path) -> Download {
        let (mut tls, served) = connect(front, ca).await.unwrap();
        let request = format!("GET /big.bin HTTP/1.0\r\nHost: {NAME}\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut d = Download {
            tls,
            body: Vec::new(),
            served,
        };
        d.read(BIG / 4).await;
        d
    }

    /// Reads until `n` bytes (headers included) came, or the end.
    async fn read(&mut self, n: usize) {
        let mut buf = vec![0u8; 64 << 10];
        while self.body.len() < n {
            let got = self.tls.read(&mut buf).await.unwrap();
            if got == 0 {
                break;
            }
            self.body.extend_from_slice(&buf[..got]);
        }
    }

    /// The rest, then the body's SHA-256.
    async fn finish(mut self) -> String {
        self.read(usize::MAX).await;
        let split = self
            .body
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("HTTP headers");
        let body = &self.body[split + 4..];
        assert_eq!(body.len(), BIG, "the whole file came");
        sha256_hex(body)
    }
}

/// `curl https://shop.test:<port>/hello.txt` trusting `ca`: the body, or curl's error.
fn curl(front: SocketAddr, ca: &Path) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{NAME}:{}:127.0.0.1", front.port())])
        .arg(format!("https://{NAME}:{}/hello.txt", front.port()))
        .output()
        .expect("run curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn acme_config(env: &TestDir, pebble: &Pebble, metrics: SocketAddr) -> String {
    format!(
        "metrics = \"{metrics}\"\n\n[acme]\ndirectory = \"{}\"\nca = \"{}\"\nstorage = \"{}\"\n\
         contact = [\"mailto:ops@example.org\"]\n",
        pebble.directory(),
        pebble.ca.display(),
        storage(env).display()
    )
}

fn storage(env: &TestDir) -> PathBuf {
    env.path().join("acme")
}

fn acme_service(front: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "[[service]]\nname = \"shop\"\nserver = \"127.0.0.1\"\nport = {}\nbackend_port = {}\n\
         listen = \"{front}\"\n[service.inbound]\nlevel = \"tls\"\ncert = \"acme\"\n\
         names = [\"{NAME}\"]\n[service.outbound]\nlevel = \"plain\"\n",
        front.port(),
        backend.port()
    )
}

/// A certificate issued and applied: the relay said so, and `relay status` shows its end.
fn wait_issued(relay: &Relay, env: &TestDir, n: usize) {
    assert!(
        relay.wait_logs(&["ACME certificate issued"], n, Duration::from_secs(60)),
        "no certificate from pebble:\n{}",
        relay.logs().join("\n")
    );
    assert!(
        relay.wait_logs(&["changed files applied"], n, Duration::from_secs(10)),
        "the certificate was not applied:\n{}",
        relay.logs().join("\n")
    );
    let status = env.status();
    let cert = &status.services[0].certificates[0];
    assert_eq!(cert.source, "acme");
    assert!(cert.not_after.is_some(), "{cert:?}");
    assert_eq!(cert.names, [NAME]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_issues_through_tls_alpn_and_renews_under_a_long_transfer() {
    let env = TestDir::new();
    let (http, sha) = http_backend(&env);
    let front = at(free_port());
    let metrics = at(free_port());
    let mut pebble = Pebble::new(&env.path().join("pebble"), &env.pki, front.port()).unwrap();
    pebble.start().unwrap();
    env.write_config(
        &acme_config(&env, &pebble, metrics),
        &[acme_service(front, http.addr)],
    );
    let relay = env.start();
    wait_issued(&relay, &env, 1);
    let root = pebble.root().unwrap();
    assert_eq!(
        curl(front, &root).unwrap(),
        "hello through the relay\n",
        "curl trusting only pebble's root"
    );
    // Stored for the owner only, key and chain together.
    let stored = storage(&env).join("shop.pem");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", stored.display());
    assert!(
        relay.has_log("outcome=\"acme_validation\""),
        "pebble validated through the front port"
    );

    // A long transfer starts on the first certificate; a renewal is forced meanwhile.
    let download = Download::start(front, &root).await;
    let first = download.served.clone();
    let renew = env.cli(&["cert", "renew", "shop"]);
    assert!(renew.status.success(), "{renew:?}");
    wait_issued(&relay, &env, 2);
    assert_eq!(
        sample(metrics, "relay_acme_renewals_total{service=\"shop\"}"),
        1.0
    );
    let second = served(front, &root).await.unwrap();
    assert_ne!(first, second, "new connections get the renewed certificate");
    assert_eq!(curl(front, &root).unwrap(), "hello through the relay\n");
    // The old connection finishes on its certificate, every byte intact.
    assert_eq!(download.finish().await, sha);

    let expiry = sample(
        metrics,
        "relay_certificate_expiry_seconds{service=\"shop\",certificate=\"inbound.cert\",source=\"acme\"}",
    );
    assert!(expiry > 86_400.0, "{expiry}");
    assert_eq!(
        sample(metrics, "relay_acme_orders_total{service=\"shop\"}"),
        2.0
    );
    assert_eq!(
        sample(metrics, "relay_acme_failures_total{service=\"shop\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_http01_is_answered_by_a_plain_port_that_keeps_relaying() {
    // "www" is the site's plain port (80 in production); pebble asks it for the token.
    let env = TestDir::new();
    let (http, _) = http_backend(&env);
    let front = at(free_port());
    let www = at(free_port());
    let metrics = at(free_port());
    let mut pebble = Pebble::at(
        Place::loopback(),
        &env.path().join("pebble"),
        &env.pki,
        free_port(),
        www.port(),
    )
    .unwrap();
    pebble.start().unwrap();
    let plain = format!(
        "[[service]]\nname = \"www\"\nserver = \"127.0.0.1\"\nport = {}\nbackend_port = {}\n\
         listen = \"{www}\"\n[service.inbound]\nlevel = \"plain\"\nanswer_http01 = true\n\
         [service.outbound]\nlevel = \"plain\"\n",
        www.port(),
        http.addr.port()
    );
    env.write_config(
        &(acme_config(&env, &pebble, metrics) + "challenge = \"http-01\"\n"),
        &[acme_service(front, http.addr), plain],
    );
    let relay = env.start();
    wait_issued(&relay, &env, 1);
    assert!(
        relay.has_log("ACME http-01 validation of token"),
        "pebble's request was answered on the plain port:\n{}",
        relay.logs().join("\n")
    );
    let root = pebble.root().unwrap();
    assert_eq!(curl(front, &root).unwrap(), "hello through the relay\n");
    // The plain port relays everything else, also a validation path it has no token for.
    let get = |path: &str| {
        Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg(format!("http://{www}{path}"))
            .output()
            .unwrap()
    };
    let hello = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{www}/hello.txt"))
        .output()
        .unwrap();
    assert_eq!(text(&hello.stdout), "hello through the relay\n");
    let unknown = get("/.well-known/acme-challenge/not-a-pending-token");
    assert_eq!(text(&unknown.stdout), "404", "the backend answered it");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_unreachable_at_start_refuses_tls_then_retries_and_a_restart_serves_the_stored_one() {
    let env = TestDir::new();
    let (http, _) = http_backend(&env);
    let front = at(free_port());
    let metrics = at(free_port());
    let mut pebble = Pebble::new(&env.path().join("pebble"), &env.pki, front.port()).unwrap();
    env.write_config(
        &acme_config(&env, &pebble, metrics),
        &[acme_service(front, http.addr)],
    );
    let mut relay = env.start();
    assert!(
        relay.wait_logs(
            &[
                "ACME order failed",
                "TLS clients are refused until one is issued"
            ],
            1,
            Duration::from_secs(10)
        ),
        "{}",
        relay.logs().join("\n")
    );
    // No certificate: a client is refused, with a reason of its own.
    let refused = served(front, &env.pki.ca).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(wait_until(Duration::from_secs(5), || sample(
        metrics,
        "relay_connections_closed_total{service=\"shop\",reason=\"no_certificate\"}"
    ) >= 1.0));
    let status = env.status();
    assert_eq!(status.services[0].certificates[0].not_after, None);
    let acme = status.services[0].acme.clone().unwrap();
    assert!(acme.failures >= 1, "{acme:?}");
    assert!(
        acme.last_error
            .is_some_and(|e| e.contains("Connection refused"))
    );

    // pebble comes up: the next try (backoff) gets the certificate.
    pebble.start().unwrap();
    wait_issued(&relay, &env, 1);
    let root = pebble.root().unwrap();
    assert_eq!(curl(front, &root).unwrap(), "hello through the relay\n");

    // pebble goes away again; a restarted relay serves the stored certificate at once.
    pebble.stop();
    relay.terminate(Duration::from_secs(10));
    let relay = env.start();
    assert_eq!(curl(front, &root).unwrap(), "hello through the relay\n");
    let scheduled = || {
        env.status().services[0]
            .acme
            .clone()
            .filter(|a| a.next_order.is_some())
    };
    assert!(wait_until(Duration::from_secs(5), || scheduled().is_some()));
    let acme = scheduled().unwrap();
    assert_eq!(acme.orders, 0, "a good stored certificate orders nothing");
    // Its task read the stored certificate: the next order is at its renewal time, years
    // away (pebble issues for 5 years), not now.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let next = acme.next_order.expect("a renewal scheduled");
    assert!(next > now + 86_400 * 30, "next order at {next}, now {now}");
    assert!(!relay.has_log("ACME order failed"));
}

fn der_of(cert: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// A relay serving `live.pem`/`live.key` (copies of `first`) for [`NAME`].
struct FileGate {
    env: TestDir,
    relay: Relay,
    metrics: SocketAddr,
    front: SocketAddr,
    live: CertFiles,
    sha: String,
    _http: HttpServer,
}

impl FileGate {
    fn start() -> FileGate {
        let env = TestDir::new();
        let (http, sha) = http_backend(&env);
        let first = env.pki.server_for("first", &[NAME]).unwrap();
        let live = CertFiles {
            cert: env.path().join("live.pem"),
            key: env.path().join("live.key"),
        };
        std::fs::copy(&first.cert, &live.cert).unwrap();
        std::fs::copy(&first.key, &live.key).unwrap();
        let front = at(free_port());
        let metrics = at(free_port());
        let service = format!(
            "[[service]]\nname = \"shop\"\nserver = \"127.0.0.1\"\nport = {}\nbackend_port = {}\n\
             listen = \"{front}\"\n[service.inbound]\nlevel = \"tls\"\ncert = \"{}\"\n\
             key = \"{}\"\n[service.outbound]\nlevel = \"plain\"\n",
            front.port(),
            http.addr.port(),
            live.cert.display(),
            live.key.display()
        );
        let relay = env.start_relay(&format!("metrics = \"{metrics}\"\n"), &[service]);
        FileGate {
            env,
            relay,
            metrics,
            front,
            live,
            sha,
            _http: http,
        }
    }

    fn reloads(&self, result: &str) -> f64 {
        sample(
            self.metrics,
            &format!("relay_file_reloads_total{{result=\"{result}\"}}"),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_by_rename_reaches_new_connections_within_2s() {
    let gate = FileGate::start();
    let ca = gate.env.pki.ca.clone();
    let download = Download::start(gate.front, &ca).await;
    assert_eq!(download.served, der_of(&gate.live.cert));

    // Renewed by a tool: the key, then the certificate, each written and renamed into place.
    let second = gate.env.pki.server_for("second", &[NAME]).unwrap();
    let applied = gate.reloads("applied");
    replace_file(&gate.live.key, std::fs::read(&second.key).unwrap());
    replace_file(&gate.live.cert, std::fs::read(&second.cert).unwrap());
    let new = der_of(&second.cert);
    let mut seen = Vec::new();
    let within = wait_until(Duration::from_secs(2), || {
        seen = futures_block(served(gate.front, &ca)).unwrap_or_default();
        seen == new
    });
    assert!(
        within,
        "new connections did not get the new certificate within 2 s:\n{}",
        gate.relay.logs().join("\n")
    );
    assert!(gate.reloads("applied") > applied);
    assert!(gate.relay.has_log("changed files applied"));
    // The connection that started before finishes intact on the old certificate.
    assert_eq!(download.finish().await, gate.sha);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_empty_certificate_does_not_replace_a_good_one() {
    let gate = FileGate::start();
    let ca = gate.env.pki.ca.clone();
    let good = der_of(&gate.live.cert);
    let pem = std::fs::read(&gate.live.cert).unwrap();
    for (n, broken) in [&pem[..pem.len() / 2], &b""[..]].into_iter().enumerate() {
        let refused = gate.reloads("refused");
        replace_file(&gate.live.cert, broken);
        assert!(
            wait_until(Duration::from_secs(5), || gate.reloads("refused") > refused),
            "not refused:\n{}",
            gate.relay.logs().join("\n")
        );
        assert!(gate.relay.wait_logs(
            &["changed files NOT applied"],
            n + 1,
            Duration::from_secs(5)
        ));
        assert_eq!(served(gate.front, &ca).await.unwrap(), good);
    }
    let logs = gate.relay.logs().join("\n");
    assert!(
        logs.contains("live.pem: line 1: the CERTIFICATE section begun here has no END line"),
        "the half-written file is pointed at:\n{logs}"
    );
    assert!(
        logs.contains("live.pem: no CERTIFICATE in PEM file"),
        "{logs}"
    );

    // A good file again is taken.
    let third = gate.env.pki.server_for("third", &[NAME]).unwrap();
    replace_file(&gate.live.key, std::fs::read(&third.key).unwrap());
    replace_file(&gate.live.cert, std::fs::read(&third.cert).unwrap());
    let new = der_of(&third.cert);
    assert!(wait_until(Duration::from_secs(5), || futures_block(
        served(gate.front, &ca)
    )
    .is_ok_and(|d| d == new)));
}

/// Runs `f` to completion from a synchronous closure inside the test's runtime.
fn futures_block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
