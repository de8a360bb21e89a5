//! The process model (SPEC §4): a worker killed under load, reloads, services added and removed
//! at run time, TLS resumption across worker generations, and a control socket that shrugs off
//! bad requests. Explicit mode over loopback: the supervisor behaves the same in both modes.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use relay_tests::{
    backend::Backend,
    client::{self, ClientLevel},
    config::{outbound, service},
    env::TestDir,
    free_port,
    pki::KeyKind,
    relay::{Relay, binary},
    wait_until,
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

type Env = TestDir;

fn listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A relay with one service `shop` on a fresh loopback port in front of a plain backend.
async fn one_service(globals: &str, levels: (&str, &str)) -> (Env, Backend, SocketAddr, Relay) {
    let env = Env::new();
    let backend = Backend::plain().await;
    let front = listen();
    env.write_config(
        globals,
        &[env.service("shop", front, backend.addr, levels, ("", ""))],
    );
    let relay = env.start();
    (env, backend, front, relay)
}

/// One raw line to the control socket; the raw answer line (empty if the relay hung up).
fn control_raw(socket: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let _ = BufReader::new(s).read_line(&mut answer);
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_worker_under_load_refuses_no_connection() {
    let (env, _backend, front, relay) = one_service("", ("plain", "plain")).await;

    // 200 connections per second for 10 seconds, each a full request; the worker is killed
    // twice meanwhile.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..2000u64 {
        let due = start + Duration::from_millis(i * 5);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            let begun = start.elapsed();
            let data = relay_tests::pattern(i, 2048);
            let r = async {
                let s = client::connect(front, &ClientLevel::Plain).await?;
                client::sink(s, &data).await
            };
            let r = tokio::time::timeout(Duration::from_secs(10), r).await;
            (begun, start.elapsed(), matches!(r, Ok(Ok(()))))
        }));
    }
    let env = Arc::new(env);
    let killer = {
        let env = Arc::clone(&env);
        tokio::task::spawn_blocking(move || {
            let mut kills = Vec::new();
            for at in [3, 6] {
                std::thread::sleep(
                    Duration::from_secs(at)
                        - Duration::from_secs(if kills.is_empty() { 0 } else { 3 }),
                );
                let (pid, at, took) = env.kill_worker();
                let t = at - start;
                eprintln!("killed worker {pid} at {t:?}; a new one was reported after {took:?}");
                kills.push(t);
            }
            kills
        })
    };
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let kills = killer.await.unwrap();
    let failed: Vec<_> = results.iter().filter(|r| !r.2).collect();
    // A request in flight inside the killed worker dies with it; every other one must succeed:
    // those that arrived during the restart waited in the accept queue.
    let in_flight = |(begun, ended, _): &&(Duration, Duration, bool)| {
        kills.iter().any(|k| begun <= k && k <= ended)
    };
    let unexplained: Vec<_> = failed.iter().filter(|r| !in_flight(r)).collect();
    eprintln!(
        "kill test: {} requests, {} failed, all of them in flight at a kill: {}",
        results.len(),
        failed.len(),
        unexplained.is_empty()
    );
    assert!(
        unexplained.is_empty(),
        "requests failed outside the kill instants: {unexplained:?}"
    );
    assert!(failed.len() <= 4, "{} requests failed", failed.len());
    assert_eq!(env.status().worker_restarts, 2);
    assert!(relay.has_log("worker died"));
    assert!(relay.has_log("new worker accepting"));
}

/// Connects over TLS trusting `ca`; returns the stream and the server's end-entity certificate.
async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client::tls_config(ca, None));
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (tls, cert)
}

fn der(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_changes_the_certificate_for_new_connections_only() {
    let env = Env::new();
    let backend = Backend::plain().await;
    let front = listen();
    let svc = |kind: KeyKind| {
        let c = env.pki.server_of(kind);
        let inb = format!(
            "[service.inbound]\nlevel = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        );
        service(
            "shop",
            front,
            backend.addr,
            &inb,
            &outbound("plain", &env.pki),
        )
    };
    env.write_config("", &[svc(KeyKind::EcdsaP256)]);
    let relay = env.start();
    let (mut long, cert) = tls_connect(front, &env.pki.ca).await;
    assert_eq!(cert, der(&env.pki.server_of(KeyKind::EcdsaP256).cert));
    long.write_all(b"ECHO\n").await.unwrap();

    // A long transfer runs across the reload: 4 MiB echoed in pieces, the first half before
    // the reload, the second after it (each side waits for the other, no timing involved).
    let (half_done_tx, half_done_rx) = tokio::sync::oneshot::channel::<()>();
    let (reloaded_tx, reloaded_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let data = relay_tests::pattern(9, 4 << 20);
        let mut got = vec![0u8; data.len()];
        let pieces = data.chunks(256 << 10).zip(got.chunks_mut(256 << 10));
        let (mut half_done, mut reloaded) = (Some(half_done_tx), Some(reloaded_rx));
        for (i, (chunk, back)) in pieces.enumerate() {
            if i == 8 {
                let _ = half_done.take().unwrap().send(());
                reloaded.take().unwrap().await.unwrap();
            }
            long.write_all(chunk).await.unwrap();
            long.read_exact(back).await.unwrap();
        }
        long.shutdown().await.unwrap();
        let mut rest = Vec::new();
        long.read_to_end(&mut rest).await.unwrap();
        (data == got, rest.is_empty())
    });
    half_done_rx.await.unwrap();
    env.write_config("", &[svc(KeyKind::Rsa2048)]);
    let out = env.cli(&["reload"]);
    assert!(
        out.status.success(),
        "reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reloaded_tx.send(()).unwrap();
    let (_new, cert) = tls_connect(front, &env.pki.ca).await;
    assert_eq!(
        cert,
        der(&env.pki.server_of(KeyKind::Rsa2048).cert),
        "new connections get the new certificate"
    );
    let (intact, clean_end) = writer.await.unwrap();
    assert!(
        intact && clean_end,
        "the established transfer finished intact across the reload"
    );

    // An invalid config is refused, and the running one stays.
    std::fs::write(env.config_path(), "[[service]]\nname = 3\n").unwrap();
    let bad = env.cli(&["reload"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("relay.toml:2"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let (_s, cert) = tls_connect(front, &env.pki.ca).await;
    assert_eq!(cert, der(&env.pki.server_of(KeyKind::Rsa2048).cert));
    // SIGHUP does the same as `relay reload`.
    env.write_config("", &[svc(KeyKind::Ed25519)]);
    relay.signal(libc::SIGHUP);
    assert!(relay.wait_logs(
        &["SIGHUP: configuration reloaded"],
        1,
        Duration::from_secs(5)
    ));
    let (_s, cert) = tls_connect(front, &env.pki.ca).await;
    assert_eq!(cert, der(&env.pki.server_of(KeyKind::Ed25519).cert));
}

#[tokio::test(flavor = "multi_thread")]
async fn services_are_added_and_removed_at_run_time() {
    let env = Env::new();
    let backend = Backend::plain().await;
    let first = listen();
    env.write_config(
        "",
        &[env.service("first", first, backend.addr, ("plain", "plain"), ("", ""))],
    );
    let _relay = env.start();
    let second = listen();
    let c = env.pki.server();
    let out = env.cli(&[
        "service",
        "add",
        "--name",
        "second",
        "--server",
        "127.0.0.1",
        "--port",
        &second.port().to_string(),
        "--backend-port",
        &backend.addr.port().to_string(),
        "--listen",
        &second.to_string(),
        "--inbound-level",
        "tls",
        "--cert",
        c.cert.to_str().unwrap(),
        "--key",
        c.key.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = client::connect(second, &ClientLevel::Tls { ca: &env.pki.ca })
        .await
        .unwrap();
    client::sink(s, b"through the added service").await.unwrap();
    let list = env.cli(&["service", "list"]);
    let names = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        names.contains("\"first\"") && names.contains("\"second\""),
        "{names}"
    );

    // An established connection outlives the removal of its service.
    let mut held = tokio::net::TcpStream::connect(first).await.unwrap();
    held.write_all(b"ECHO\nbefore").await.unwrap();
    let mut buf = [0u8; 6];
    held.read_exact(&mut buf).await.unwrap();
    let out = env.cli(&["service", "remove", "first"]);
    assert!(
        out.status.success(),
        "remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(3), || std::net::TcpStream::connect(
            first
        )
        .is_err()),
        "removed service still accepts"
    );
    held.write_all(b"after").await.unwrap();
    let mut buf = [0u8; 5];
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after");

    // Bad requests are refused with a reason; nothing changes.
    let dup = env.cli(&[
        "service",
        "add",
        "--name",
        "second",
        "--server",
        "127.0.0.1",
        "--port",
        "1",
        "--backend-port",
        "2",
        "--listen",
        &listen().to_string(),
    ]);
    assert!(!dup.status.success());
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("duplicate service name"),
        "{}",
        String::from_utf8_lossy(&dup.stderr)
    );
    let missing = env.cli(&["service", "remove", "nope"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no service named"));
    let no_cert = env.cli(&[
        "service",
        "add",
        "--name",
        "third",
        "--server",
        "127.0.0.1",
        "--port",
        "3",
        "--backend-port",
        "4",
        "--listen",
        &listen().to_string(),
        "--inbound-level",
        "tls",
    ]);
    assert!(
        String::from_utf8_lossy(&no_cert.stderr).contains("cert: required"),
        "{}",
        String::from_utf8_lossy(&no_cert.stderr)
    );
    let s = client::connect(second, &ClientLevel::Tls { ca: &env.pki.ca })
        .await
        .unwrap();
    client::sink(s, b"still serving").await.unwrap();
}

/// Runs `openssl s_client` to `addr`: with `-sess_out` on the first run, `-sess_in` after.
/// Returns whether the session was resumed.
fn s_client(addr: SocketAddr, ca: &Path, session: &Path, resume: bool) -> bool {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        "localhost",
        "-tls1_3",
    ])
    .arg("-CAfile")
    .arg(ca)
    .arg(if resume { "-sess_in" } else { "-sess_out" })
    .arg(session)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ECHO\nping\n").unwrap();
    // The echo comes after the session tickets (sent right after a TLS 1.3 handshake): once
    // it is back, the session is saved and s_client may go.
    let mut out = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        out.push_str(&line);
        out.push('\n');
        if line == "ping" {
            break;
        }
    }
    drop(stdin);
    let _ = child.wait();
    out.contains("Reused, TLSv1.3")
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_resumption_survives_a_worker_restart() {
    let (env, _backend, front, _relay) = one_service("", ("tls", "plain")).await;
    let session = env.dir.path().join("session.pem");
    let (ca, sess) = (env.pki.ca.clone(), session.clone());
    let rate = move |n: usize| {
        let (ca, sess) = (ca.clone(), sess.clone());
        (0..n).filter(|_| s_client(front, &ca, &sess, true)).count()
    };
    let ca = env.pki.ca.clone();
    let first = tokio::task::spawn_blocking({
        let sess = session.clone();
        move || s_client(front, &ca, &sess, false)
    })
    .await
    .unwrap();
    assert!(!first, "a first connection cannot be resumed");
    let rate2 = rate.clone();
    let before = tokio::task::spawn_blocking(move || rate2(5)).await.unwrap();
    let (_, _, took) = env.kill_worker();
    let after = tokio::task::spawn_blocking(move || rate(5)).await.unwrap();
    eprintln!(
        "resumption: {before}/5 before the worker restart, {after}/5 after (restart reported in {took:?})"
    );
    assert_eq!(before, 5, "resumed before the restart");
    assert_eq!(
        after, 5,
        "tickets from the old worker are accepted by the new one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_socket_is_root_only_and_survives_bad_requests() {
    let (env, _backend, front, relay) = one_service("", ("plain", "plain")).await;
    let mode = std::fs::metadata(env.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    for bad in [
        &b"garbage\n"[..],
        b"{\"op\":\"explode\"}\n",
        b"{\"op\":\"status\",\"extra\":true}\n",
        b"{\"op\":\"service_add\",\"service\":{\"name\":\"x\"}}\n",
        b"{\"op\":\"service_remove\"}\n",
        b"\xff\xfe\x00\n",
        b"{\"op\":\"status\"",
    ] {
        let answer = control_raw(&env.socket(), bad);
        let v: serde_json::Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{bad:?}: {e}: {answer:?}"));
        assert_eq!(v["ok"], false, "{bad:?} → {answer}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{answer}"
        );
    }
    // Oversized: the relay reads at most 1 MiB of a request.
    let huge = vec![b'x'; 3 << 20];
    let answer = control_raw(&env.socket(), &huge);
    assert!(
        answer.is_empty() || answer.contains("\"ok\":false"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    let s = client::connect(front, &ClientLevel::Plain).await.unwrap();
    client::sink(s, b"serving all along").await.unwrap();
    assert!(!relay.has_log("panicked"));
}

/// `relay status` answers within a second, five times over, and SIGTERM stops the relay
/// within two: whatever the supervisor has to deal with meanwhile.
fn answers_and_stops(env: &Env, mut relay: Relay, situation: &str) {
    for _ in 0..5 {
        let t = Instant::now();
        let status = env.try_status();
        let took = t.elapsed();
        assert!(status.is_ok(), "{situation}: status: {status:?}");
        assert!(
            took < Duration::from_secs(1),
            "{situation}: status took {took:?}"
        );
    }
    let t = Instant::now();
    let exit = relay.terminate(Duration::from_secs(10));
    assert!(exit.is_some(), "{situation}: no exit after SIGTERM");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{situation}: SIGTERM took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_control_client_holds_up_nothing() {
    let (env, _backend, _front, relay) = one_service("", ("plain", "plain")).await;
    // Connected, and never a byte: the old loop waited up to 5 s on such a client.
    let _silent: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(env.socket()).unwrap())
        .collect();
    answers_and_stops(&env, relay, "silent control clients");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_dies_at_every_start_holds_up_nothing() {
    let env = Env::new();
    let backend = Backend::plain().await;
    let svc = env.service("shop", listen(), backend.addr, ("plain", "plain"), ("", ""));
    env.write_config("", &[svc]);
    // A debug build's worker exits at once when this is set: a crash loop.
    let relay = Relay::launch(
        Command::new(binary())
            .args(["run", "--config"])
            .arg(env.config_path())
            .env("RELAY_DEBUG_WORKER_EXITS", "1"),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || env
            .try_status()
            .is_ok_and(|s| s.worker_restarts >= 3)),
        "the worker keeps being restarted: {:?}\n{}",
        env.try_status(),
        relay.logs().join("\n")
    );
    assert!(env.status().worker.is_none(), "no worker is serving");
    answers_and_stops(&env, relay, "a worker that dies at every start");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_removed_after_start_does_not_stop_a_new_worker() {
    let (env, _backend, front, relay) = one_service("", ("tls", "plain")).await;
    std::fs::remove_file(&env.pki.server().cert).unwrap();
    // The next worker gets the bytes the supervisor read when the configuration was checked.
    env.kill_worker();
    let s = client::connect(front, &ClientLevel::Tls { ca: &env.pki.ca })
        .await
        .unwrap();
    client::sink(s, b"served by the new worker").await.unwrap();
    answers_and_stops(&env, relay, "a removed certificate file");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_worker_answer_is_never_taken_for_the_next_one() {
    let metrics = listen();
    let (env, _backend, front, relay) =
        one_service(&format!("metrics = \"{metrics}\""), ("plain", "plain")).await;
    let s = client::connect(front, &ClientLevel::Plain).await.unwrap();
    client::sink(s, b"one connection").await.unwrap();
    // The worker's next answer comes 1.5 s late, after the status that asked gave up.
    env.debug(relay::handoff::DebugOp::StallNext(1500));
    let t = Instant::now();
    let first = env.status();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(
        first.connections.is_none(),
        "the worker did not answer in time"
    );
    // Its late answer arrives and is dropped (nothing else asks the worker meanwhile: it
    // answers in order, so a scrape now would be late too)...
    assert!(
        relay.wait_logs(
            &["late answer from the worker dropped"],
            1,
            Duration::from_secs(5)
        ),
        "{}",
        relay.logs().join("\n")
    );
    // ...and the next status gets its own answer, not that one.
    let second = env.status();
    let counters = second.connections.expect("an answer this time");
    assert_eq!(counters[0].accepted, 1, "{counters:?}");
    let late = relay_tests::metrics::sample(metrics, "relay_worker_late_answers_total");
    assert_eq!(late, 1.0, "counted");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_can_neither_read_a_file_nor_run_a_program() {
    let (env, _backend, _front, _relay) = one_service("", ("plain", "plain")).await;
    let report = env.debug(relay::handoff::DebugOp::Escape);
    // Landlock refuses the open (EACCES); seccomp refuses the fork, the exec and a UNIX socket
    // (EPERM).
    assert!(
        report.contains("read /etc/hostname: Err")
            && report.contains("exec /bin/true: Err")
            && report.contains("unix socket: Err"),
        "{report}"
    );
    assert!(report.contains("PermissionDenied"), "{report}");
    let worker = env.worker_pid();
    let proc_status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("Seccomp"), "2", "seccomp filter mode:\n{proc_status}");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("CapEff"), "0000000000000000", "no capability left");
    // As root, the worker is `relay.user` (nobody by default), not root.
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let uid: u32 = field("Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_ne!(uid, 0, "the worker runs as root");
    }
}

/// A connection through the echo backend, held open.
async fn hold(front: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(front).await.unwrap();
    s.write_all(b"ECHO\nping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    s
}

/// A connection the relay closes at once, over its total limit (`refused` such closes so far).
async fn refused(front: SocketAddr, relay: &Relay, refused: usize) {
    let s = tokio::net::TcpStream::connect(front).await.unwrap();
    client::read_until_closed(s, Duration::from_secs(2), "connection over the limit").await;
    assert!(
        relay.wait_logs(
            &["connection limit reached"],
            refused,
            Duration::from_secs(2)
        ),
        "{}",
        relay.logs().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_changes_the_total_connection_limit() {
    let (env, backend, front, relay) = one_service("max_connections = 1", ("plain", "plain")).await;
    let svc = env.service("shop", front, backend.addr, ("plain", "plain"), ("", ""));
    let reload = |limit: usize| {
        env.write_config(
            &format!("max_connections = {limit}"),
            std::slice::from_ref(&svc),
        );
        let out = env.cli(&["reload"]);
        assert!(out.status.success(), "{out:?}");
    };
    let first = hold(front).await;
    refused(front, &relay, 1).await;

    // Raised: a second connection is served, a third is not.
    reload(2);
    let second = hold(front).await;
    refused(front, &relay, 2).await;

    // Lowered below what is open: nothing open is cut, nothing new comes in until the open
    // connections are under the new limit.
    reload(1);
    refused(front, &relay, 3).await;
    drop(first);
    assert!(relay.wait_logs(&["outcome=\"closed\""], 1, Duration::from_secs(5)));
    refused(front, &relay, 4).await;
    drop(second);
    assert!(relay.wait_logs(&["outcome=\"closed\""], 2, Duration::from_secs(5)));
    let _third = hold(front).await;
    refused(front, &relay, 5).await;
}
