//! End to end, explicit mode: the relay binary between real clients (curl, openssl s_client,
//! rustls) and real backends (Python's http.server, a rustls data backend), over loopback.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use relay_tests::{
    backend::{Backend, BackendTls},
    client::{self, ClientLevel},
    config::{inbound, outbound, service},
    env::TestDir,
    free_port,
    http::HttpServer,
    pattern,
    pki::KeyKind,
    relay::{Relay, binary},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PAGE: &str = "hello through the relay\n";

/// A test directory with a `www/hello.txt` for the HTTP backend.
struct Env(TestDir);

fn env() -> Env {
    let t = TestDir::new();
    std::fs::create_dir_all(t.path().join("www")).unwrap();
    std::fs::write(t.path().join("www/hello.txt"), PAGE).unwrap();
    Env(t)
}

impl std::ops::Deref for Env {
    type Target = TestDir;

    fn deref(&self) -> &TestDir {
        &self.0
    }
}

impl Env {
    fn http_backend(&self) -> HttpServer {
        HttpServer::start(
            &self.path().join("www"),
            "127.0.0.1".parse().unwrap(),
            free_port(),
            &[],
        )
        .unwrap()
    }

    async fn backend(&self, level: &str) -> Backend {
        let tls = (level != "plain").then(|| BackendTls {
            cert: self.pki.server(),
            client_ca: (level == "mtls").then_some(self.pki.client_ca.as_path()),
        });
        Backend::start("127.0.0.1:0".parse().unwrap(), tls)
            .await
            .unwrap()
    }

    fn client_level(&self, level: &str) -> ClientLevel<'_> {
        match level {
            "plain" => ClientLevel::Plain,
            "tls" => ClientLevel::Tls { ca: &self.pki.ca },
            _ => ClientLevel::Mtls {
                ca: &self.pki.ca,
                cert: &self.pki.client,
            },
        }
    }
}

fn listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (`cargo xtask setup`)")
}

fn https_url(addr: SocketAddr) -> String {
    format!("https://localhost:{}/hello.txt", addr.port())
}

fn resolve(addr: SocketAddr) -> String {
    format!("localhost:{}:127.0.0.1", addr.port())
}

fn s_client(addr: SocketAddr, ca: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["-verify_return_error"];
    args.extend(extra);
    client::openssl_get(addr, ca, "/hello.txt", &args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_over_tls_reaches_a_real_http_backend() {
    let env = env();
    let http = env.http_backend();
    let front = listen();
    let relay = env.start_relay(
        "",
        &[env.service("web", front, http.addr, ("tls", "plain"), ("", ""))],
    );
    let out = curl(&[
        "--cacert",
        env.pki.ca.to_str().unwrap(),
        "--resolve",
        &resolve(front),
        &https_url(front),
    ]);
    assert!(out.status.success(), "curl failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), PAGE);
    assert!(
        relay.wait_logs(
            &["connection closed", "service=web", "outcome=\"closed\""],
            1,
            Duration::from_secs(5)
        ),
        "one close line per connection with its outcome:\n{}",
        relay.logs().join("\n")
    );
    let line = relay
        .logs()
        .into_iter()
        .find(|l| l.contains("connection closed"))
        .unwrap();
    for field in [
        "peer=127.0.0.1:",
        "inbound=tls",
        "outbound=plain",
        "bytes_up=",
        "bytes_down=",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "close line lacks {field}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_s_client_with_tls12_and_tls13_and_every_key_type() {
    let env = env();
    let http = env.http_backend();
    let mut services = Vec::new();
    let mut fronts = Vec::new();
    for kind in [KeyKind::EcdsaP256, KeyKind::Rsa2048, KeyKind::Ed25519] {
        let front = listen();
        let c = env.pki.server_of(kind);
        let inb = format!(
            "[service.inbound]\nlevel = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        );
        services.push(service(
            kind.label(),
            front,
            http.addr,
            &inb,
            &outbound("plain", &env.pki),
        ));
        fronts.push((kind, front));
    }
    let _relay = env.start_relay("", &services);
    for (kind, front) in fronts {
        for version in ["-tls1_2", "-tls1_3"] {
            let out = s_client(front, &env.pki.ca, &[version]);
            let stdout = text(&out.stdout);
            assert!(
                out.status.success(),
                "{kind:?} {version}: {}",
                text(&out.stderr)
            );
            assert!(
                stdout.contains("Verify return code: 0 (ok)"),
                "{kind:?} {version}: {stdout}"
            );
            assert!(
                stdout.contains(PAGE.trim()),
                "{kind:?} {version}: page missing:\n{stdout}"
            );
            let proto = if version == "-tls1_2" {
                "TLSv1.2"
            } else {
                "TLSv1.3"
            };
            assert!(
                stdout.contains(proto),
                "{kind:?}: negotiated {proto}?\n{stdout}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn all_nine_level_pairs_move_data_both_ways() {
    let env = env();
    let levels = ["plain", "tls", "mtls"];
    let mut backends = Vec::new();
    for l in levels {
        backends.push(env.backend(l).await);
    }
    let mut services = Vec::new();
    let mut cases = Vec::new();
    for inb in levels {
        for (out, backend) in levels.iter().zip(&backends) {
            let front = listen();
            let name = format!("{inb}-to-{out}");
            services.push(service(
                &name,
                front,
                backend.addr,
                &inbound(inb, &env.pki),
                &outbound(out, &env.pki),
            ));
            cases.push((name, inb, front));
        }
    }
    let relay = env.start_relay("", &services);
    for (i, (name, inb, front)) in cases.iter().enumerate() {
        let level = env.client_level(inb);
        let up = pattern(i as u64, 300_000);
        let s = client::connect(*front, &level).await.unwrap();
        client::sink(s, &up)
            .await
            .unwrap_or_else(|e| panic!("{name} client->backend: {e:#}"));
        let s = client::connect(*front, &level).await.unwrap();
        client::source(s, 300_000, 100 + i as u64)
            .await
            .unwrap_or_else(|e| panic!("{name} backend->client: {e:#}"));
    }
    for (b, l) in backends.iter().zip(levels) {
        assert_eq!(
            b.served.load(std::sync::atomic::Ordering::SeqCst),
            6,
            "{l} backend"
        );
    }
    assert!(relay.wait_logs(
        &["connection closed", "outcome=\"closed\""],
        18,
        Duration::from_secs(5)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_mib_each_way_with_half_close() {
    let env = env();
    let plain_backend = env.backend("plain").await;
    let tls_backend = env.backend("tls").await;
    let (tls_in, tls_out) = (listen(), listen());
    let _relay = env.start_relay(
        "",
        &[
            env.service(
                "tls-in",
                tls_in,
                plain_backend.addr,
                ("tls", "plain"),
                ("", ""),
            ),
            env.service(
                "tls-out",
                tls_out,
                tls_backend.addr,
                ("plain", "tls"),
                ("", ""),
            ),
        ],
    );
    const MIB64: usize = 64 << 20;
    let data = pattern(7, MIB64);
    for (front, level) in [
        (tls_in, env.client_level("tls")),
        (tls_out, ClientLevel::Plain),
    ] {
        let s = client::connect(front, &level).await.unwrap();
        client::sink(s, &data)
            .await
            .expect("64 MiB client->backend, SHA-256 equal");
        let s = client::connect(front, &level).await.unwrap();
        client::source(s, MIB64, 8)
            .await
            .expect("64 MiB backend->client, SHA-256 equal");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_accepts_the_client_ca_and_rejects_others() {
    let env = env();
    let http = env.http_backend();
    let front = listen();
    let relay = env.start_relay(
        "",
        &[env.service("api", front, http.addr, ("mtls", "plain"), ("", ""))],
    );
    let ca = env.pki.ca.to_str().unwrap();
    let (url, res) = (https_url(front), resolve(front));
    let base = ["--cacert", ca, "--resolve", &res];
    let with_cert = |c: &relay_tests::pki::CertFiles| {
        let mut a: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--cert".into(),
            c.cert.display().to_string(),
            "--key".into(),
            c.key.display().to_string(),
            url.clone(),
        ]);
        a
    };
    let args = with_cert(&env.pki.client);
    let ok = curl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        ok.status.success(),
        "trusted client cert: {}",
        text(&ok.stderr)
    );
    assert_eq!(text(&ok.stdout), PAGE);

    let mut no_cert: Vec<&str> = base.to_vec();
    no_cert.push(&url);
    let denied = curl(&no_cert);
    assert!(!denied.status.success(), "no client cert must be refused");
    let args = with_cert(&env.pki.stranger);
    let stranger = curl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !stranger.status.success(),
        "a cert from an unknown CA must be refused"
    );
    assert!(
        relay.wait_logs(
            &["service=api", "outcome=\"handshake_failed\""],
            2,
            Duration::from_secs(5)
        ),
        "{}",
        relay.logs().join("\n")
    );
    // The relay keeps serving.
    let args = with_cert(&env.pki.client);
    let again = curl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(again.status.success(), "{}", text(&again.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_protocol_on_a_tls_port_is_closed_and_the_relay_keeps_serving() {
    let env = env();
    let backend = env.backend("plain").await;
    let front = listen();
    let relay = env.start_relay(
        "handshake_timeout = \"1s\"",
        &[env.service("shop", front, backend.addr, ("tls", "plain"), ("", ""))],
    );
    let attempts: [(&str, Vec<u8>, bool); 4] = [
        ("random bytes", pattern(1, 2000), true),
        (
            "plaintext HTTP",
            b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n".to_vec(),
            true,
        ),
        // A TLS handshake record header announcing 512 bytes, then only 9 of them, then FIN.
        (
            "truncated ClientHello",
            vec![0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3, 0, 0, 0],
            true,
        ),
        // The same, but the client stays silent: the handshake timeout must close it.
        ("stalled ClientHello", vec![0x16, 3, 1, 2, 0, 1], false),
    ];
    for (what, bytes, half_close) in attempts {
        let mut s = tokio::net::TcpStream::connect(front).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        if half_close {
            s.shutdown().await.unwrap();
        }
        let took = client::read_until_closed(s, Duration::from_secs(5), "connection")
            .await
            .1;
        eprintln!("{what}: closed after {took:?}");
    }
    // Random bytes and HTTP are recognised as plaintext before any TLS parsing.
    assert!(
        relay.wait_logs(
            &["outcome=\"plaintext_rejected\""],
            2,
            Duration::from_secs(5)
        ),
        "{}",
        relay.logs().join("\n")
    );
    assert!(
        relay.wait_logs(&["outcome=\"handshake_failed\""], 1, Duration::from_secs(5)),
        "{}",
        relay.logs().join("\n")
    );
    assert!(relay.wait_logs(
        &["outcome=\"handshake_timeout\""],
        1,
        Duration::from_secs(5)
    ));
    let s = client::connect(front, &env.client_level("tls"))
        .await
        .unwrap();
    client::sink(s, b"still serving").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_down_closes_the_client_promptly() {
    let env = env();
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port())); // nothing listens here
    let live = env.backend("plain").await;
    let (f_dead, f_tls_dead, f_live) = (listen(), listen(), listen());
    let relay = env.start_relay(
        "",
        &[
            env.service("dead", f_dead, dead, ("plain", "plain"), ("", "")),
            env.service("dead-tls", f_tls_dead, dead, ("plain", "tls"), ("", "")),
            env.service("live", f_live, live.addr, ("plain", "plain"), ("", "")),
        ],
    );
    for front in [f_dead, f_tls_dead] {
        let s = tokio::net::TcpStream::connect(front).await.unwrap();
        let took = client::read_until_closed(s, Duration::from_secs(3), "connection")
            .await
            .1;
        assert!(took < Duration::from_secs(3));
    }
    assert!(
        relay.wait_logs(&["outcome=\"connect_failed\""], 2, Duration::from_secs(5)),
        "{}",
        relay.logs().join("\n")
    );
    let s = client::connect(f_live, &ClientLevel::Plain).await.unwrap();
    client::sink(s, b"other services unaffected").await.unwrap();
}

/// `relay run` on `env`'s config, with the system CA store (as OpenSSL finds it) being `store`.
fn start_with_system_store(env: &Env, store: &Path) -> Relay {
    Relay::start_with(
        Command::new(binary())
            .args(["run", "--config"])
            .arg(env.config_path())
            .env("SSL_CERT_FILE", store)
            .env_remove("SSL_CERT_DIR"),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_without_ca_is_trusted_through_the_system_store() {
    // No `ca` toward the backend: the relay trusts the system's CA store. The worker cannot
    // read it (it reads no file): the supervisor reads it with the other files.
    let env = env();
    let backend = env.backend("tls").await;
    let no_ca = |env: &Env, front| {
        env.service("public", front, backend.addr, ("plain", "tls"), ("", ""))
            .replace(&format!("ca = \"{}\"\n", env.pki.ca.display()), "")
    };
    let front = listen();
    let svc = no_ca(&env, front);
    assert!(!svc.contains("ca ="), "{svc}");
    env.write_config("", &[svc]);
    let _relay = start_with_system_store(&env, &env.pki.ca);
    let s = client::connect(front, &ClientLevel::Plain).await.unwrap();
    client::sink(s, b"trusted through the system store")
        .await
        .unwrap();

    // A store without the backend's CA: the backend is not trusted, nothing reaches it.
    let other = self::env();
    let front = listen();
    other.write_config("", &[no_ca(&other, front)]);
    let relay = start_with_system_store(&other, &other.pki.ca);
    let served = backend.served.load(std::sync::atomic::Ordering::SeqCst);
    let s = client::connect(front, &ClientLevel::Plain).await.unwrap();
    assert!(client::sink(s, b"untrusted").await.is_err());
    assert!(
        relay.wait_logs(&["backend_handshake_failed"], 1, Duration::from_secs(5)),
        "{}",
        relay.logs().join("\n")
    );
    assert_eq!(
        backend.served.load(std::sync::atomic::Ordering::SeqCst),
        served,
        "nothing was served through an untrusted backend"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_and_connection_limit() {
    let env = env();
    let backend = env.backend("plain").await;
    let front = listen();
    let svc = env
        .service("small", front, backend.addr, ("plain", "plain"), ("", ""))
        .replace("listen =", "max_connections = 2\nlisten =");
    let relay = env.start_relay("idle_timeout = \"1s\"", &[svc]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(front).await.unwrap();
        s.write_all(b"ECHO\nping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        held.push(s);
    }
    // Third connection: over the service's limit, closed at once.
    let third = tokio::net::TcpStream::connect(front).await.unwrap();
    client::read_until_closed(third, Duration::from_secs(2), "connection").await;
    assert!(relay.wait_logs(
        &["connection limit reached", "service=small"],
        1,
        Duration::from_secs(2)
    ));
    // The two idle ones are closed by the idle timeout.
    for s in held {
        let took = client::read_until_closed(s, Duration::from_secs(5), "connection")
            .await
            .1;
        assert!(took < Duration::from_secs(4), "idle close took {took:?}");
    }
    assert!(relay.wait_logs(&["outcome=\"idle_timeout\""], 2, Duration::from_secs(3)));
    // Permits are back: a new connection is served.
    let s = client::connect(front, &ClientLevel::Plain).await.unwrap();
    client::sink(s, b"served again").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_accepting_and_lets_connections_finish() {
    let env = env();
    let backend = env.backend("plain").await;
    let front = listen();
    let mut relay = env.start_relay(
        "shutdown_grace = \"20s\"",
        &[env.service("echo", front, backend.addr, ("plain", "plain"), ("", ""))],
    );
    let mut s = tokio::net::TcpStream::connect(front).await.unwrap();
    s.write_all(b"ECHO\nbefore").await.unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).await.unwrap();
    relay.signal(libc::SIGTERM);
    assert!(relay.wait_logs(&["stopping"], 1, Duration::from_secs(5)));
    // New connections are refused once the listener is closed.
    assert!(
        relay_tests::wait_until(Duration::from_secs(3), || std::net::TcpStream::connect(
            front
        )
        .is_err()),
        "listener still accepting after SIGTERM"
    );
    // The established connection still works, then finishes.
    s.write_all(b"after").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    let status = relay
        .terminate(Duration::from_secs(10))
        .expect("relay exits");
    assert!(status.success(), "{status:?}");
    assert!(relay.has_log("relay stopped"));
}

/// One plain ↔ plain exchange of each kind through `front`: 64 MiB to a SINK (more than the
/// kernel copy's window: on loopback the worker copies part of it), 1 MiB echoed (the client
/// half-closes only after reading the echo back).
async fn plain_exchanges(front: SocketAddr) {
    let s = client::connect(front, &ClientLevel::Plain).await.unwrap();
    client::sink(s, &pattern(3, 64 << 20))
        .await
        .expect("64 MiB to the sink, SHA-256 equal");
    let mut s = tokio::net::TcpStream::connect(front).await.unwrap();
    let data = pattern(5, 1 << 20);
    s.write_all(b"ECHO\n").await.unwrap();
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; data.len()];
    let (sent, got) = tokio::join!(w.write_all(&data), r.read_exact(&mut back));
    sent.unwrap();
    got.unwrap();
    assert!(back == data, "1 MiB echoed intact");
    w.shutdown().await.unwrap();
    assert_eq!(
        r.read(&mut [0u8; 1]).await.unwrap(),
        0,
        "the echo ends cleanly"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_to_plain_moves_in_the_kernel_and_counts_what_splice_counts() {
    let env = env();
    let backend = env.backend("plain").await;
    let mut totals = Vec::new();
    // The same exchanges, through the kernel copy and through splice (the default).
    for (relay_extra, path) in [("kernel_copy = true", "kernel"), ("", "splice")] {
        let front = listen();
        let metrics = listen();
        let config = env.write_config(
            &format!("metrics = \"{metrics}\"\n{relay_extra}"),
            &[env.service("p", front, backend.addr, ("plain", "plain"), ("", ""))],
        );
        let relay = Relay::start(&config).unwrap();
        plain_exchanges(front).await;
        assert!(relay.wait_logs(
            &["connection closed", "outcome=\"closed\""],
            2,
            Duration::from_secs(10)
        ));
        let sample = |series: &str| relay_tests::metrics::sample(metrics, series);
        let copies = |p: &str| {
            sample(&format!(
                "relay_plain_copies_total{{service=\"p\",path=\"{p}\"}}"
            ))
        };
        // Through the kernel copy, a connection the worker helped with counts as
        // `kernel_lagged`: both count as the kernel path here.
        let kernel = copies("kernel") + copies("kernel_lagged");
        let expected = if path == "kernel" {
            (2.0, 0.0)
        } else {
            (0.0, 2.0)
        };
        assert_eq!((kernel, copies("splice")), expected, "connections by path");
        let up = sample("relay_bytes_total{service=\"p\",direction=\"up\"}");
        let down = sample("relay_bytes_total{service=\"p\",direction=\"down\"}");
        // Up: both command lines, 64 MiB and 1 MiB; down: the sink's answer and 1 MiB.
        assert_eq!(
            up,
            (5 + (64 << 20) + 5 + (1 << 20)) as f64,
            "{path}: bytes up"
        );
        totals.push((path, down));
        drop(relay);
    }
    assert_eq!(
        totals[0].1, totals[1].1,
        "bytes down counted alike by both paths: {totals:?}"
    );
    assert!(totals[0].1 > (1 << 20) as f64);
}
