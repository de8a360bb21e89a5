//! Hostile input and faults: the relay keeps serving well-behaved clients and loses nothing.
//!
//! Each test throws one kind of trouble at a running relay — malformed and truncated
//! handshakes, a thousand slowloris connections, too few file descriptors, backends that reset,
//! black-hole or close early — and checks three things: every bad connection ends promptly with
//! the expected outcome counted, well-behaved clients are served meanwhile and afterwards, and
//! nothing leaks (the worker's file descriptors return to their baseline). Sizes are set for CI;
//! `cargo xtask test --soak` (env `RELAY_SOAK=1`) runs the heavy variants.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use relay_tests::{
    backend::Backend,
    client::{self, ClientLevel},
    env::TestDir,
    fd_count, free_port,
    metrics::{closed, sample},
    pattern,
    relay::{Relay, binary},
    wait_until,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
};

fn soak() -> bool {
    std::env::var_os("RELAY_SOAK").is_some()
}

struct Env {
    t: TestDir,
    metrics: SocketAddr,
}

fn env() -> Env {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    Env {
        t: TestDir::new(),
        metrics,
    }
}

impl std::ops::Deref for Env {
    type Target = TestDir;

    fn deref(&self) -> &TestDir {
        &self.t
    }
}

impl Env {
    /// Writes the config, with the metrics listener every test here reads.
    fn config(&self, relay_extra: &str, services: &[String]) -> std::path::PathBuf {
        let extra = format!("metrics = \"{}\"\n{relay_extra}", self.metrics);
        self.write_config(&extra, services)
    }

    fn start_relay(&self, relay_extra: &str, services: &[String]) -> Relay {
        Relay::start(&self.config(relay_extra, services)).unwrap()
    }

    fn tls(&self) -> ClientLevel<'_> {
        ClientLevel::Tls { ca: &self.pki.ca }
    }

    fn closed(&self, service: &str, reason: &str) -> f64 {
        closed(self.metrics, service, reason)
    }

    fn active(&self, service: &str) -> f64 {
        sample(
            self.metrics,
            &format!("relay_connections_active{{service=\"{service}\"}}"),
        )
    }

    /// Waits until `service` has counted `n` connections closed for `reason`.
    fn wait_closed(&self, service: &str, reason: &str, n: f64, limit: Duration) {
        let reached = wait_until(limit, || self.closed(service, reason) >= n);
        assert!(
            reached,
            "{service}: {} of {n} connections closed as {reason} within {limit:?}",
            self.closed(service, reason)
        );
    }
}

fn listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A real ClientHello, as rustls sends it for `name`.
fn client_hello(ca: &Path, name: &str) -> Vec<u8> {
    let config = client::tls_config(ca, None);
    let mut conn = rustls::ClientConnection::new(
        config,
        rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Keeps TLS clients going against `front` until `stop`, each one checked end to end.
fn keep_serving(
    front: SocketAddr,
    ca: std::path::PathBuf,
    stop: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut served = 0;
        loop {
            let level = ClientLevel::Tls { ca: &ca };
            let once = async {
                let s = client::connect(front, &level).await?;
                client::sink(s, &pattern(served as u64, 10_000)).await
            };
            tokio::select! {
                () = stop.notified() => return served,
                r = tokio::time::timeout(Duration::from_secs(5), once) => {
                    r.expect("a well-behaved client waited over 5 s").expect("a well-behaved client failed");
                    served += 1;
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_closed_promptly_counted_and_others_are_served() {
    let env = env();
    let backend = Backend::plain().await;
    let tls_front = listen();
    let mtls_front = listen();
    let api = env.pki.server_for("api", &["api.example.org"]).unwrap();
    let sni = "unknown_sni = \"reject\"\n".to_string()
        + &format!(
            "[[service.inbound.sni]]\nname = \"api.example.org\"\ncert = \"{}\"\nkey = \"{}\"\n",
            api.cert.display(),
            api.key.display()
        );
    let relay = env.start_relay(
        "handshake_timeout = \"2s\"",
        &[
            env.service(
                "shop",
                tls_front,
                backend.addr,
                ("tls", "plain"),
                (&sni, ""),
            ),
            env.service(
                "vault",
                mtls_front,
                backend.addr,
                ("mtls", "plain"),
                ("", ""),
            ),
        ],
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    let good = keep_serving(tls_front, env.pki.ca.clone(), Arc::clone(&stop));

    // 1. A real ClientHello cut at every length, all sent and half-closed, 64 at a time.
    let hello = client_hello(&env.pki.ca, "localhost");
    let lengths: Vec<usize> = (1..hello.len()).collect();
    let started = Instant::now();
    for batch in lengths.chunks(64) {
        let mut set = JoinSet::new();
        for &n in batch {
            let prefix = hello[..n].to_vec();
            set.spawn(async move {
                let mut s = TcpStream::connect(tls_front).await.unwrap();
                s.write_all(&prefix).await.unwrap();
                s.shutdown().await.unwrap();
                client::read_until_closed(
                    s,
                    Duration::from_secs(2),
                    &format!("ClientHello cut at {n}"),
                )
                .await
                .0
            });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap(), 0, "a truncated ClientHello got an answer");
        }
    }
    let truncations = lengths.len() as f64;
    env.wait_closed(
        "shop",
        "handshake_failed",
        truncations,
        Duration::from_secs(10),
    );
    eprintln!(
        "{} truncated ClientHellos closed in {:?}",
        lengths.len(),
        started.elapsed()
    );

    // 2. A record announcing 65535 bytes (more than TLS allows) is refused without waiting.
    let mut s = TcpStream::connect(tls_front).await.unwrap();
    s.write_all(&[0x16, 3, 3, 0xff, 0xff]).await.unwrap();
    s.write_all(&[0u8; 100]).await.unwrap();
    client::read_until_closed(s, Duration::from_secs(2), "oversized record").await;
    env.wait_closed(
        "shop",
        "handshake_failed",
        truncations + 1.0,
        Duration::from_secs(5),
    );

    // 3. Not TLS at all: recognised from the first byte, closed without waiting.
    let mut random = pattern(9, 3000);
    random[0] = 0x42;
    let not_tls: [(&str, Vec<u8>); 4] = [
        ("random bytes", random),
        (
            "plaintext HTTP",
            b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n".to_vec(),
        ),
        (
            "PROXY v1 header",
            b"PROXY TCP4 192.0.2.9 192.0.2.1 40000 443\r\n".to_vec(),
        ),
        (
            "PROXY v2 header",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c\xc0\0\x02\x09\xc0\0\x02\x01\x9c\x40\x01\xbb"
                .to_vec(),
        ),
    ];
    for (what, bytes) in &not_tls {
        let mut s = TcpStream::connect(tls_front).await.unwrap();
        s.write_all(bytes).await.unwrap();
        client::read_until_closed(s, Duration::from_secs(2), what).await;
    }
    env.wait_closed("shop", "plaintext_rejected", 4.0, Duration::from_secs(5));

    // 4. A handshake that stalls halfway: the handshake timeout (2 s) closes it.
    let mut s = TcpStream::connect(tls_front).await.unwrap();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let t = Instant::now();
    client::read_until_closed(s, Duration::from_secs(5), "stalled handshake").await;
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "closed before the timeout"
    );
    env.wait_closed("shop", "handshake_timeout", 1.0, Duration::from_secs(5));

    // 5. A server name the service has no certificate for.
    let unknown = client::connect_named(tls_front, &env.tls(), "unknown.example.org").await;
    assert!(
        unknown.is_err(),
        "unknown SNI must not complete a handshake"
    );
    env.wait_closed("shop", "unknown_sni", 1.0, Duration::from_secs(5));
    let known = client::connect_named(tls_front, &env.tls(), "api.example.org")
        .await
        .unwrap();
    client::sink(known, b"via the api certificate")
        .await
        .unwrap();

    // 6. A client certificate from a CA the service does not trust.
    let stranger = ClientLevel::Mtls {
        ca: &env.pki.ca,
        cert: &env.pki.stranger,
    };
    let refused = async {
        let s = client::connect(mtls_front, &stranger).await?;
        client::sink(s, b"x").await
    };
    assert!(
        refused.await.is_err(),
        "a stranger's certificate must be refused"
    );
    env.wait_closed("vault", "handshake_failed", 1.0, Duration::from_secs(5));

    stop.notify_one();
    let served = good.await.unwrap();
    assert!(served > 0, "well-behaved clients were served throughout");
    let s = client::connect(tls_front, &env.tls()).await.unwrap();
    client::sink(s, b"still serving").await.unwrap();
    for reason in [
        "handshake_failed",
        "plaintext_rejected",
        "handshake_timeout",
        "unknown_sni",
    ] {
        assert!(
            relay.has_log(&format!("outcome=\"{reason}\"")),
            "a log line for {reason}"
        );
    }
    eprintln!("served {served} well-behaved clients meanwhile");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_slowloris_connections_do_not_starve_clients() {
    relay_tests::raise_fd_limit();
    let env = env();
    let backend = Backend::plain().await;
    let front = listen();
    let _relay = env.start_relay(
        "handshake_timeout = \"3s\"",
        &[env.service("shop", front, backend.addr, ("tls", "plain"), ("", ""))],
    );
    let count = if soak() { 5000 } else { 1000 };
    let hello = Arc::new(client_hello(&env.pki.ca, "localhost"));
    let mut slow = JoinSet::new();
    for _ in 0..count {
        let s = TcpStream::connect(front).await.unwrap();
        let hello = Arc::clone(&hello);
        // One byte per second of a real ClientHello, until the relay gives up on it.
        slow.spawn(async move {
            let mut s = s;
            for b in hello.iter() {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                let mut probe = [0u8; 1];
                let waited = tokio::time::timeout(Duration::from_secs(1), s.read(&mut probe)).await;
                if let Ok(Ok(0) | Err(_)) = waited {
                    return;
                }
            }
        });
    }
    // While they dribble, ordinary clients are served one after another.
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        let s = client::connect(front, &env.tls()).await.unwrap();
        client::sink(s, &pattern(served, 20_000)).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a client waited {:?}",
            t.elapsed()
        );
        served += 1;
    }
    assert!(served > 0);
    env.wait_closed(
        "shop",
        "handshake_timeout",
        count as f64,
        Duration::from_secs(20),
    );
    while slow.join_next().await.is_some() {}
    assert!(wait_until(Duration::from_secs(5), || env.active("shop") == 0.0));
    eprintln!(
        "{count} slowloris connections closed by the handshake timeout; {served} clients served meanwhile"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn total_and_per_service_limits_close_the_excess_cleanly() {
    let env = env();
    let backend = Backend::plain().await;
    let (a, b) = (listen(), listen());
    let svc = |name, front| env.service(name, front, backend.addr, ("plain", "plain"), ("", ""));
    let _relay = env.start_relay("max_connections = 3", &[svc("a", a), svc("b", b)]);
    // Three held connections (ECHO keeps them open) fill the total limit.
    let mut held = Vec::new();
    for front in [a, a, b] {
        let mut s = TcpStream::connect(front).await.unwrap();
        s.write_all(b"ECHO\nping").await.unwrap();
        let mut pong = [0u8; 4];
        s.read_exact(&mut pong).await.unwrap();
        held.push(s);
    }
    for front in [a, b] {
        let mut s = TcpStream::connect(front).await.unwrap();
        let _ = s.write_all(b"ECHO\nping").await;
        assert_eq!(
            client::read_until_closed(s, Duration::from_secs(2), "over the total limit")
                .await
                .0,
            0
        );
    }
    assert_eq!(
        env.closed("a", "limit_reached") + env.closed("b", "limit_reached"),
        2.0
    );
    // Room again once one closes.
    drop(held.pop());
    assert!(wait_until(Duration::from_secs(5), || env.active("b") == 0.0));
    let mut s = TcpStream::connect(b).await.unwrap();
    s.write_all(b"ECHO\nagain").await.unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"again");
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_file_descriptors_degrades_then_recovers() {
    relay_tests::raise_fd_limit();
    let env = env();
    let backend = Backend::plain().await;
    let front = listen();
    let config = env.config(
        "",
        &[env.service("shop", front, backend.addr, ("plain", "plain"), ("", ""))],
    );
    // Started under a hard limit of 64 open files: the relay cannot raise it.
    let relay = Relay::start_with(
        Command::new("prlimit")
            .args(["--nofile=64:64", "--"])
            .arg(binary())
            .args(["run", "--config"])
            .arg(&config),
    )
    .unwrap();
    let worker = relay.worker_pid().expect("a worker");
    let mut held = Vec::new();
    for _ in 0..80 {
        let mut s = TcpStream::connect(front).await.unwrap();
        let _ = s.write_all(b"ECHO\nping").await;
        held.push(s);
    }
    assert!(
        relay.wait_logs(&["accept failed"], 1, Duration::from_secs(10))
            || relay.has_log("Too many open files"),
        "running out of descriptors is logged:\n{}",
        relay.logs().join("\n")
    );
    let refusals = relay.count_logs(&["accept failed"]);
    let peak_fds = fd_count(worker);
    drop(held);
    let freed = Instant::now();
    // The same worker (no crash, no restart) serves again once descriptors are free.
    let recovered = async {
        loop {
            let attempt = async {
                let mut s = TcpStream::connect(front).await?;
                s.write_all(b"ECHO\nback").await?;
                let mut back = [0u8; 4];
                s.read_exact(&mut back).await?;
                anyhow::ensure!(&back == b"back");
                Ok(())
            };
            if tokio::time::timeout(Duration::from_secs(2), attempt)
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), recovered)
        .await
        .expect("service resumes after descriptors are freed");
    assert_eq!(
        relay.worker_pid(),
        Some(worker),
        "the worker did not restart"
    );
    assert!(!relay.has_log("panicked"), "{}", relay.logs().join("\n"));
    eprintln!(
        "80 connections against a limit of 64 fds: worker at {peak_fds} fds, {refusals} accept \
         failures logged (with backoff), serving again {:?} after the clients closed",
        freed.elapsed()
    );
}

/// A backend that misbehaves in one way, on a loopback port.
async fn faulty_backend(kind: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                match kind {
                    // 1 MiB, then a reset instead of a FIN.
                    "reset" => {
                        let _ = s.write_all(&pattern(1, 1 << 20)).await;
                        let _ = s.set_zero_linger();
                        drop(s);
                    }
                    // Closes its write side at once, then reads everything the client sends
                    // and answers with the count on a second connection's absence: the count
                    // is checked through the relay's byte counters instead.
                    "early_close" => {
                        let _ = s.shutdown().await;
                        let mut sink = Vec::new();
                        let _ = s.read_to_end(&mut sink).await;
                    }
                    _ => unreachable!(),
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_faults_end_promptly_and_leak_nothing() {
    let env = env();
    let (reset, _r) = faulty_backend("reset").await;
    let (early, _e) = faulty_backend("early_close").await;
    let refusing = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // A black hole on loopback: a listener with a full accept queue that never accepts drops
    // further SYNs, so connecting to it hangs until the relay's connect timeout.
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    hole.listen(0).unwrap();
    let black_hole = hole.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..2 {
        fillers.push(std::net::TcpStream::connect_timeout(
            &black_hole,
            Duration::from_millis(300),
        ));
    }
    let good = Backend::plain().await;
    let mut services = Vec::new();
    let mut fronts = Vec::new();
    for (name, backend) in [
        ("reset", reset),
        ("early", early),
        ("refusing", refusing),
        ("hole", black_hole),
        ("good", good.addr),
    ] {
        for level in ["plain", "tls"] {
            let front = listen();
            let svc = format!("{name}-{level}");
            services.push(env.service(&svc, front, backend, (level, "plain"), ("", "")));
            fronts.push((name, level, svc, front));
        }
    }
    // One worker thread: one per-thread pool of buffers and pipes, so its settled size is
    // reached in the warm-up round and the descriptor count is exact afterwards.
    let relay = Relay::start_with(
        Command::new(binary())
            .args(["run", "--config"])
            .arg(env.config("connect_timeout = \"1s\"", &services))
            .env("TOKIO_WORKER_THREADS", "1"),
    )
    .unwrap();
    let worker = relay.worker_pid().unwrap();
    let front_of = |n: &str, l: &str| fronts.iter().find(|f| f.0 == n && f.1 == l).unwrap().3;
    let level = |l: &str| {
        if l == "tls" {
            env.tls()
        } else {
            ClientLevel::Plain
        }
    };

    let rounds = if soak() { 50 } else { 5 };
    let mut baseline = 0;
    for round in 0..=rounds {
        if round == 1 {
            // Round 0 warmed up the pools (buffers, splice pipes): what they keep now is the
            // baseline every later round must come back to.
            assert!(wait_until(Duration::from_secs(5), || {
                fronts.iter().all(|f| env.active(&f.2) == 0.0)
            }));
            baseline = fd_count(worker);
        }
        for l in ["plain", "tls"] {
            // A good transfer each way among the faults.
            let s = client::connect(front_of("good", l), &level(l))
                .await
                .unwrap();
            client::sink(s, &pattern(3, 1 << 20)).await.unwrap();
            let s = client::connect(front_of("good", l), &level(l))
                .await
                .unwrap();
            client::source(s, 1 << 20, 4).await.unwrap();

            // Reset mid-transfer: the client gets part of the data, then the end, promptly.
            let mut s = client::connect(front_of("reset", l), &level(l))
                .await
                .unwrap();
            let _ = s.write_all(b"hello").await;
            let got = client::read_until_closed(s, Duration::from_secs(3), "backend reset")
                .await
                .0;
            assert!(got <= 1 << 20, "{l}: more than the backend sent");

            // Early close: EOF reaches the client while its own direction stays open.
            let mut s = client::connect(front_of("early", l), &level(l))
                .await
                .unwrap();
            let mut byte = [0u8; 1];
            let eof = tokio::time::timeout(Duration::from_secs(3), s.read(&mut byte)).await;
            assert!(
                matches!(eof, Ok(Ok(0))),
                "{l}: the backend's FIN reaches the client: {eof:?}"
            );
            s.write_all(&pattern(5, 100_000))
                .await
                .expect("the client may still send");
            s.shutdown().await.unwrap();
            drop(s);

            // Refused and black-holed backends: the client is closed, without an answer.
            for (name, limit) in [("refusing", 2), ("hole", 4)] {
                let started = Instant::now();
                let r = client::connect(front_of(name, l), &level(l)).await;
                if let Ok(mut s) = r {
                    let _ = s.write_all(b"x").await;
                    assert_eq!(
                        client::read_until_closed(s, Duration::from_secs(limit), name)
                            .await
                            .0,
                        0
                    );
                }
                assert!(started.elapsed() < Duration::from_secs(limit), "{name} {l}");
            }
        }
    }
    for l in ["plain", "tls"] {
        env.wait_closed(
            &format!("refusing-{l}"),
            "connect_failed",
            (rounds + 1) as f64,
            Duration::from_secs(5),
        );
        env.wait_closed(
            &format!("hole-{l}"),
            "connect_timeout",
            (rounds + 1) as f64,
            Duration::from_secs(5),
        );
        env.wait_closed(
            &format!("reset-{l}"),
            "io_error",
            1.0,
            Duration::from_secs(5),
        );
        // Every byte the client sent after the backend's early FIN reached the backend.
        let up = sample(
            env.metrics,
            &format!("relay_bytes_total{{service=\"early-{l}\",direction=\"up\"}}"),
        );
        assert_eq!(
            up,
            ((rounds + 1) * 100_000) as f64,
            "early-{l}: bytes relayed upward"
        );
    }
    let settled = wait_until(Duration::from_secs(10), || {
        fronts.iter().all(|f| env.active(&f.2) == 0.0) && fd_count(worker) == baseline
    });
    assert!(
        settled,
        "file descriptors back to {baseline}: now {}",
        fd_count(worker)
    );
    eprintln!(
        "{} fault rounds after a warm-up: worker fds {baseline} before, {} after",
        rounds,
        fd_count(worker)
    );
    drop(fillers);
}

#[tokio::test(flavor = "multi_thread")]
async fn gibibytes_each_way_arrive_intact_and_concurrent_streams_do_not_mix() {
    let env = env();
    let plain_backend = Backend::plain().await;
    let tls_backend = Backend::start(
        "127.0.0.1:0".parse().unwrap(),
        Some(relay_tests::backend::BackendTls {
            cert: env.pki.server(),
            client_ca: None,
        }),
    )
    .await
    .unwrap();
    let (tls_in, plain_in) = (listen(), listen());
    let _relay = env.start_relay(
        "",
        &[
            env.service(
                "tls-to-plain",
                tls_in,
                plain_backend.addr,
                ("tls", "plain"),
                ("", ""),
            ),
            env.service(
                "plain-to-tls",
                plain_in,
                tls_backend.addr,
                ("plain", "tls"),
                ("", ""),
            ),
        ],
    );
    let size: u64 = if soak() { 4 << 30 } else { 1 << 30 };
    for (front, level) in [(tls_in, env.tls()), (plain_in, ClientLevel::Plain)] {
        let t = Instant::now();
        let s = client::connect(front, &level).await.unwrap();
        client::sink_stream(s, size, 11).await.unwrap();
        let s = client::connect(front, &level).await.unwrap();
        client::source_stream(s, size, 12).await.unwrap();
        eprintln!("{front}: {size} bytes each way intact in {:?}", t.elapsed());
    }
    // Many transfers at once, each with its own content: any mix-up changes a hash.
    let mut set = JoinSet::new();
    for i in 0..32u64 {
        let ca = env.pki.ca.clone();
        set.spawn(async move {
            let level = ClientLevel::Tls { ca: &ca };
            let len = (1 << 20) + i as usize * 65_537;
            let s = client::connect(tls_in, &level).await?;
            if i % 2 == 0 {
                client::sink(s, &pattern(100 + i, len)).await
            } else {
                client::source(s, len, 100 + i).await
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().expect("a concurrent transfer");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn control_socket_refuses_other_users_and_open_keys_are_warned_about() {
    let env = env();
    let backend = Backend::plain().await;
    let config = env.config(
        "",
        &[env.service("shop", listen(), backend.addr, ("tls", "plain"), ("", ""))],
    );
    let relay = Relay::start(&config).unwrap();
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary())
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(as_nobody.status.code(), Some(1), "{as_nobody:?}");
    let err = String::from_utf8_lossy(&as_nobody.stderr);
    assert!(err.contains("ermission denied"), "{err}");
    let as_root = Command::new(binary())
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(as_root.status.success(), "{as_root:?}");
    drop(relay);

    // The PKI writes keys 0644 (rcgen/fs defaults): `relay check` warns; 0600 passes quietly.
    use std::os::unix::fs::PermissionsExt as _;
    let key = &env.pki.server().key;
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let check = Command::new(binary())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success());
    let warned = String::from_utf8_lossy(&check.stderr);
    assert!(
        warned.contains("readable by every user") && warned.contains(&key.display().to_string()),
        "{warned}"
    );
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let check = Command::new(binary())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success());
    assert!(
        check.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Peak resident memory of a process (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_stays_bounded_under_a_flood_of_handshakes() {
    relay_tests::raise_fd_limit();
    let env = env();
    let backend = Backend::plain().await;
    let front = listen();
    // No resumption: every handshake is a full one, the expensive kind.
    let no_resumption = ("resumption = false\n", "");
    let relay = env.start_relay(
        "",
        &[env.service("shop", front, backend.addr, ("tls", "plain"), no_resumption)],
    );
    let worker = relay.worker_pid().unwrap();
    let before = peak_rss_kib(worker);
    let (waves, per_wave) = if soak() { (50, 500) } else { (10, 300) };
    let started = Instant::now();
    for wave in 0..waves {
        let mut set = JoinSet::new();
        for i in 0..per_wave {
            let ca = env.pki.ca.clone();
            set.spawn(async move {
                let s = client::connect(front, &ClientLevel::Tls { ca: &ca }).await?;
                client::sink(s, &pattern((wave * per_wave + i) as u64, 1000)).await
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().expect("a handshake in the flood");
        }
    }
    let total = waves * per_wave;
    env.wait_closed("shop", "closed", total as f64, Duration::from_secs(10));
    let peak = peak_rss_kib(worker);
    eprintln!(
        "{total} full handshakes, {per_wave} at a time, in {:?}: worker peak RSS {before} KiB \
         before, {peak} KiB after",
        started.elapsed()
    );
    // Bounded by the concurrency, not by the total: under 256 KiB per connection in flight.
    assert!(
        peak < before + 256 * per_wave as u64,
        "peak RSS {peak} KiB grew past {before} KiB + 256 KiB × {per_wave}"
    );
}
