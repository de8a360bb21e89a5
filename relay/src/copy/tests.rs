use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, Interest};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::net::pool;
use crate::tls::{
    ServerSide, handshake,
    testing::{SUITES, Tls, name, tcp_pair},
};

/// A TLS client (tokio-rustls) connected to the relay's TLS server side.
async fn inbound(tls: &Tls) -> (tokio_rustls::client::TlsStream<TcpStream>, Side) {
    let (peer, ours) = tcp_pair().await;
    let server = ServerSide::with_config(tls.server(true));
    let (peer, accepted) = tokio::join!(
        TlsConnector::from(tls.client(false)).connect(name(), peer),
        handshake::accept(&ours, &server, crate::tls::testing::no_challenges())
    );
    let accepted = accepted.unwrap();
    (
        peer.unwrap(),
        Side::Tls(ours, Box::new(accepted.established)),
    )
}

/// The relay's TLS client side connected to a TLS server (tokio-rustls).
async fn outbound(
    tls: &Tls,
    config: Arc<rustls::ClientConfig>,
) -> (tokio_rustls::server::TlsStream<TcpStream>, Side) {
    let (ours, peer) = tcp_pair().await;
    let (established, peer) = tokio::join!(
        handshake::connect(&ours, config, name()),
        TlsAcceptor::from(tls.server(false)).accept(peer)
    );
    (
        peer.unwrap(),
        Side::Tls(ours, Box::new(established.unwrap())),
    )
}

/// Sends `up` from the client, half-closes, checks the backend got exactly that, then sends
/// `down` from the backend after the half-close and checks the client got exactly that.
async fn exchange(
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    mut backend: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    relay: tokio::task::JoinHandle<(Transfer, Result<(), CopyError>)>,
    up: usize,
    down: usize,
) {
    let request: Vec<u8> = (0..up).map(|i| (i * 7 + i / 251) as u8).collect();
    let answer: Vec<u8> = (0..down).map(|i| (i * 13 + i / 241) as u8).collect();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.map(|_| (backend, got))
    });
    client.write_all(&request).await.unwrap();
    client.shutdown().await.unwrap();
    let (mut backend, got) = reader.await.unwrap().unwrap();
    assert!(
        got == request,
        "client → backend: {} of {up} bytes, or different",
        got.len()
    );
    backend.write_all(&answer).await.unwrap();
    backend.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert!(
        got == answer,
        "backend → client: {} of {down} bytes, or different",
        got.len()
    );
    let (transfer, result) = relay.await.unwrap();
    result.unwrap();
    assert_eq!(
        (transfer.up, transfer.down),
        (up as u64, down as u64),
        "bytes counted"
    );
}

fn spawn_relay(
    client: Side,
    backend: Side,
) -> tokio::task::JoinHandle<(Transfer, Result<(), CopyError>)> {
    tokio::spawn(relay(
        client,
        backend,
        Limits::idle(Duration::from_secs(10)),
    ))
}

#[tokio::test]
async fn tls_to_plain_keeps_every_byte_with_every_suite() {
    for suite in SUITES {
        let tls = Tls::new(suite);
        let (client, client_side) = inbound(&tls).await;
        let (backend_side, backend) = tcp_pair().await;
        let relay = spawn_relay(client_side, Side::Plain(backend_side));
        exchange(client, backend, relay, 3_000_000, 1_000_000).await;
    }
}

#[tokio::test]
async fn plain_to_tls_keeps_every_byte_with_every_suite() {
    for suite in SUITES {
        let tls = Tls::new(suite);
        let (client, client_side) = tcp_pair().await;
        let (backend, backend_side) = outbound(&tls, tls.client(true)).await;
        let relay = spawn_relay(Side::Plain(client_side), backend_side);
        exchange(client, backend, relay, 1_000_000, 3_000_000).await;
    }
}

#[tokio::test]
async fn tls_to_tls_keeps_every_byte_across_versions() {
    // TLS 1.3 toward the client, TLS 1.2 toward the backend, and the other way round.
    for (front, back) in [(SUITES[1], SUITES[3]), (SUITES[5], SUITES[2])] {
        let (front, back) = (Tls::new(front), Tls::new(back));
        let (client, client_side) = inbound(&front).await;
        let (backend, backend_side) = outbound(&back, back.client(true)).await;
        let relay = spawn_relay(client_side, backend_side);
        exchange(client, backend, relay, 2_000_000, 2_000_000).await;
    }
}

#[tokio::test]
async fn a_client_that_half_closes_right_after_resuming_gets_its_answer() {
    let tls = Tls::new(SUITES[0]);
    let client_config = tls.client(false);
    let server = Arc::new(ServerSide::with_config(tls.server(true)));
    for round in 0..3 {
        let (peer, ours) = tcp_pair().await;
        let server = Arc::clone(&server);
        let accept = tokio::spawn(async move {
            let accepted =
                handshake::accept(&ours, &server, crate::tls::testing::no_challenges()).await;
            (ours, accepted)
        });
        let mut client = TlsConnector::from(Arc::clone(&client_config))
            .connect(name(), peer)
            .await
            .unwrap();
        // close_notify right behind the Finished, often in the same read of the relay's.
        client.shutdown().await.unwrap();
        let (ours, accepted) = accept.await.unwrap();
        let accepted = accepted.unwrap();
        assert_eq!(accepted.facts.resumed, round > 0, "connection {round}");
        let (backend_side, backend) = tcp_pair().await;
        let relay = spawn_relay(
            Side::Tls(ours, Box::new(accepted.established)),
            Side::Plain(backend_side),
        );
        exchange(client, backend, relay, 0, 70_000).await;
    }
}

#[tokio::test]
async fn small_messages_cross_one_by_one() {
    // Interactive traffic: each message must arrive before the next is sent.
    let tls = Tls::new(SUITES[0]);
    let (mut client, client_side) = inbound(&tls).await;
    let (backend_side, mut backend) = tcp_pair().await;
    let relay = spawn_relay(client_side, Side::Plain(backend_side));
    for i in 0..50u8 {
        let message = vec![i; 1 + usize::from(i) * 37];
        client.write_all(&message).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0; message.len()];
        backend.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message);
        backend.write_all(&message).await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message);
    }
    drop((client, backend));
    let _ = relay.await;
}

#[tokio::test]
async fn key_updates_are_followed_both_ways() {
    let tls = Tls::new(SUITES[0]);
    let (mut client, client_side) = inbound(&tls).await;
    let (mut backend, backend_side) = outbound(&tls, tls.client(true)).await;
    let relay = spawn_relay(client_side, backend_side);
    for round in 0..4u8 {
        // Each peer asks for a KeyUpdate: the relay must renew its receiving key, and its
        // sending key before its next record, or the peer fails to decrypt.
        if round % 2 == 0 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
        } else {
            backend.get_mut().1.refresh_traffic_keys().unwrap();
        }
        let message = vec![round; 100_000];
        client.write_all(&message).await.unwrap();
        let mut got = vec![0; message.len()];
        backend.read_exact(&mut got).await.unwrap();
        assert!(got == message, "round {round}: client → backend");
        backend.write_all(&message).await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert!(got == message, "round {round}: backend → client");
    }
    client.shutdown().await.unwrap();
    backend.shutdown().await.unwrap();
    let (_, result) = relay.await.unwrap();
    result.unwrap();
}

#[tokio::test]
async fn tickets_from_the_backend_resume_the_next_connection() {
    let tls = Tls::new(SUITES[0]);
    let config = tls.client(true);
    let server = tls.server(false);
    for round in 0..2 {
        let (ours, peer) = tcp_pair().await;
        let (established, peer) = tokio::join!(
            handshake::connect(&ours, Arc::clone(&config), name()),
            TlsAcceptor::from(Arc::clone(&server)).accept(peer)
        );
        let mut backend = peer.unwrap();
        let kind = backend.get_ref().1.handshake_kind();
        let expected = [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed][round];
        assert_eq!(kind, Some(expected), "connection {round}");
        let (mut client, client_side) = tcp_pair().await;
        let relay = spawn_relay(
            Side::Plain(client_side),
            Side::Tls(ours, Box::new(established.unwrap())),
        );
        // The tickets travel ahead of this answer: the relay hands them to rustls.
        backend.write_all(b"hello").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.shutdown().await.unwrap();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        relay.await.unwrap().1.unwrap();
    }
}

#[tokio::test]
async fn a_forged_record_is_answered_with_bad_record_mac_and_the_backend_is_reset() {
    let tls = Tls::new(SUITES[0]);
    let (mut client, client_side) = inbound(&tls).await;
    let (backend_side, mut backend) = tcp_pair().await;
    let relay = spawn_relay(client_side, Side::Plain(backend_side));
    client.write_all(b"genuine").await.unwrap();
    client.flush().await.unwrap();
    let mut got = [0; 7];
    backend.read_exact(&mut got).await.unwrap();
    // A well-formed record whose tag cannot verify.
    let mut forged = vec![23, 3, 3, 0, 40];
    forged.extend([0x5a; 40]);
    client.get_mut().0.write_all(&forged).await.unwrap();
    let (_, result) = relay.await.unwrap();
    let error = result.unwrap_err();
    assert!(
        matches!(
            &error,
            CopyError::Tls {
                peer: Peer::Client,
                error,
                answered: Some(AlertDescription::BadRecordMac),
            } if matches!(**error, RecordError::Decrypt)
        ),
        "{error}"
    );
    // The client was told, under the relay's current key.
    let told = client.read(&mut [0; 16]).await.unwrap_err().to_string();
    assert!(told.contains("BadRecordMac"), "{told}");
    // Nothing of the forged record reached the backend, and it sees an abort, not an end.
    let mut rest = Vec::new();
    let end = backend.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn a_tls_client_that_closes_without_close_notify_gets_the_backend_reset() {
    let tls = Tls::new(SUITES[3]);
    let (mut client, client_side) = inbound(&tls).await;
    let (backend_side, mut backend) = tcp_pair().await;
    let relay = spawn_relay(client_side, Side::Plain(backend_side));
    // Half a request, then a FIN that an attacker on the path could have forged.
    let half = b"POST /transfer HTTP/1.1\r\nContent-Le";
    client.write_all(half).await.unwrap();
    client.flush().await.unwrap();
    client.get_mut().0.shutdown().await.unwrap();
    let mut got = Vec::new();
    let end = backend.read_to_end(&mut got).await;
    // Every byte forwarded arrives (the relay waits for the backend's acknowledgement)...
    assert_eq!(got, half);
    // ...and then a reset, never the EOF a complete request would end with.
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    let (transfer, result) = relay.await.unwrap();
    assert!(
        matches!(
            result,
            Err(CopyError::Truncated {
                peer: Peer::Client,
                mid_record: false
            })
        ),
        "{result:?}"
    );
    assert_eq!(transfer.up, half.len() as u64);
}

#[tokio::test]
async fn a_backend_reset_resets_the_client_after_what_was_sent() {
    let tls = Tls::new(SUITES[0]);
    let (mut client, client_side) = tcp_pair().await;
    let (mut backend, backend_side) = outbound(&tls, tls.client(true)).await;
    let relay = spawn_relay(Side::Plain(client_side), backend_side);
    backend.write_all(&[9; 100_000]).await.unwrap();
    backend.flush().await.unwrap();
    // The backend's TLS ends without close_notify: a truncation toward a plain client.
    backend.get_mut().0.shutdown().await.unwrap();
    let mut got = Vec::new();
    let end = client.read_to_end(&mut got).await;
    assert_eq!(got.len(), 100_000, "every byte before the abort arrives");
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    let (_, result) = relay.await.unwrap();
    assert!(
        matches!(
            result,
            Err(CopyError::Truncated {
                peer: Peer::Backend,
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_worn_tls12_key_ends_the_connection_with_close_notify() {
    let tls = Tls::new(SUITES[4]);
    let (mut client, client_side) = inbound(&tls).await;
    let Side::Tls(socket, mut established) = client_side else {
        unreachable!()
    };
    established.sealer.get_mut().wear_out_after(3);
    let (backend_side, mut backend) = tcp_pair().await;
    let relay = spawn_relay(Side::Tls(socket, established), Side::Plain(backend_side));
    // One record per chunk, each read before the next is sent: three arrive...
    for i in 0..3u8 {
        backend.write_all(&[i; 100]).await.unwrap();
        let mut got = [0; 100];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [i; 100]);
    }
    // ...then the key may not seal another: a close_notify instead.
    backend.write_all(&[3; 100]).await.unwrap();
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .await
        .expect("a clean close_notify");
    assert!(rest.is_empty(), "{} bytes after the limit", rest.len());
    let (_, result) = relay.await.unwrap();
    assert!(
        matches!(
            &result,
            Err(CopyError::Tls {
                error,
                answered: Some(AlertDescription::CloseNotify),
                ..
            }) if matches!(**error, RecordError::Exhausted)
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_quiet_tls_connection_holds_no_buffer() {
    let tls = Tls::new(SUITES[0]);
    let (mut client, client_side) = inbound(&tls).await;
    let (mut backend, backend_side) = outbound(&tls, tls.client(true)).await;
    let relay = spawn_relay(client_side, backend_side);
    let chunk = vec![7u8; 300_000];
    client.write_all(&chunk).await.unwrap();
    let mut got = vec![0u8; chunk.len()];
    backend.read_exact(&mut got).await.unwrap();
    backend.write_all(&chunk).await.unwrap();
    client.read_exact(&mut got).await.unwrap();
    // Both directions now wait for data: neither may keep a buffer meanwhile.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(pool::in_use(), 0, "buffers held by an idle connection");
    drop((client, backend));
    let _ = relay.await.unwrap();
    assert_eq!(pool::in_use(), 0);
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let (_client, client_side) = tcp_pair().await;
    let (backend_side, _backend) = tcp_pair().await;
    let (transfer, result) = relay(
        Side::Plain(client_side),
        Side::Plain(backend_side),
        Limits::idle(Duration::from_millis(200)),
    )
    .await;
    assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
    assert_eq!((transfer.up, transfer.down), (0, 0));
    assert_eq!(transfer.path, Some(PlainCopy::Splice));
}

#[tokio::test]
async fn splice_keeps_every_byte_and_half_closes_both_ways() {
    let (client, client_side) = tcp_pair().await;
    let (backend_side, backend) = tcp_pair().await;
    let relay = spawn_relay(Side::Plain(client_side), Side::Plain(backend_side));
    exchange(client, backend, relay, 5_000_000, 11).await;
}

#[tokio::test]
async fn splice_reports_a_reset() {
    let (client, client_side) = tcp_pair().await;
    let (backend_side, backend) = tcp_pair().await;
    let task = spawn_relay(Side::Plain(client_side), Side::Plain(backend_side));
    reset(backend);
    let (_, result) = task.await.unwrap();
    assert_aborted_by(&result, Peer::Backend);
    // The backend's abort reaches the client as an abort.
    let mut client = client;
    let end = client.read(&mut [0; 16]).await;
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
}

// ---------------------------------------------------------------- plain ↔ plain in the kernel
//
// These load the verdict program: they need CAP_BPF (CI runs as root) and fail, saying so,
// without it.

/// The worker's kernel copy, as a worker gets it: the maps by descriptor. One for all tests,
/// as in a worker: the program's notices have one reader.
fn kernel_copy() -> &'static KernelCopy {
    static PROGRAM: std::sync::OnceLock<crate::sockmap::Program> = std::sync::OnceLock::new();
    static COPY: std::sync::OnceLock<&'static KernelCopy> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let program = PROGRAM.get_or_init(|| {
            crate::sockmap::Program::load(64).expect(
                "loading the kernel copy program needs CAP_BPF (run the tests as root, as CI does)",
            )
        });
        let fds = program
            .map_fds()
            .unwrap()
            .map(|fd| fd.try_clone_to_owned().unwrap());
        KernelCopy::new(crate::sockmap::Pairs::inherited(fds).unwrap()).unwrap()
    })
}

/// Relays `client_side` and `backend_side` through the kernel copy, in a task.
fn spawn_in_kernel(client_side: TcpStream, backend_side: TcpStream, idle: Duration) -> RelayTask {
    tokio::spawn(relay(
        Side::Plain(client_side),
        Side::Plain(backend_side),
        in_kernel(idle),
    ))
}

fn in_kernel(idle: Duration) -> Limits {
    Limits {
        kernel: Some(kernel_copy()),
        ..Limits::idle(idle)
    }
}

#[tokio::test]
async fn the_kernel_copies_every_byte_and_half_closes_client_first() {
    let (client, client_side) = tcp_pair().await;
    let (backend_side, backend) = tcp_pair().await;
    let relay = spawn_in_kernel(client_side, backend_side, Duration::from_secs(10));
    let (path_check, relay) = watch_path(relay);
    exchange(client, backend, relay, 5_000_000, 11).await;
    assert_eq!(path_check.await.unwrap(), Some(PlainCopy::Kernel));
}

#[tokio::test]
async fn the_kernel_copies_every_byte_and_half_closes_backend_first() {
    let (client, client_side) = tcp_pair().await;
    let (backend_side, backend) = tcp_pair().await;
    let relay = spawn_in_kernel(client_side, backend_side, Duration::from_secs(10));
    let (path_check, relay) = watch_path(relay);
    // The same exchange seen from the other end: the backend speaks and half-closes first.
    exchange(backend, client, swap(relay), 3_000_000, 7).await;
    assert_eq!(path_check.await.unwrap(), Some(PlainCopy::Kernel));
}

#[tokio::test]
async fn bytes_sent_before_the_kernel_takes_over_arrive_first_and_are_counted() {
    let (mut client, client_side) = tcp_pair().await;
    let (backend_side, mut backend) = tcp_pair().await;
    // Both peers speak before the pair is installed: a request, and a server's greeting.
    client.write_all(b"request before; ").await.unwrap();
    backend.write_all(b"greeting before; ").await.unwrap();
    // Let the bytes land in the relay's receive queues (an event: the sockets say so).
    client_side.readable().await.unwrap();
    backend_side.readable().await.unwrap();
    let relay = spawn_in_kernel(client_side, backend_side, Duration::from_secs(10));
    // What was queued arrives without any further byte to push it.
    let (mut up, mut down) = (vec![0; 16], vec![0; 17]);
    backend.read_exact(&mut up).await.unwrap();
    client.read_exact(&mut down).await.unwrap();
    client.write_all(b"request after").await.unwrap();
    client.shutdown().await.unwrap();
    backend.write_all(b"greeting after").await.unwrap();
    backend.shutdown().await.unwrap();
    backend.read_to_end(&mut up).await.unwrap();
    client.read_to_end(&mut down).await.unwrap();
    assert_eq!(up, b"request before; request after");
    assert_eq!(down, b"greeting before; greeting after");
    let (transfer, result) = relay.await.unwrap();
    result.unwrap();
    assert_eq!((transfer.up, transfer.down), (29, 31));
    assert_eq!(transfer.path, Some(PlainCopy::Kernel));
}

#[tokio::test]
async fn peers_that_ended_before_the_kernel_could_take_over_are_spliced() {
    let (mut client, client_side) = tcp_pair().await;
    let (backend_side, mut backend) = tcp_pair().await;
    // A request sent and half-closed before the relay got to it: the socket is no longer
    // established, which is all a SOCKHASH takes.
    client.write_all(b"whole request").await.unwrap();
    client.shutdown().await.unwrap();
    backend.write_all(b"banner").await.unwrap();
    backend.shutdown().await.unwrap();
    for s in [&client_side, &backend_side] {
        // Until the FIN is there (not just the bytes before it).
        while !s.ready(Interest::READABLE).await.unwrap().is_read_closed() {
            tokio::task::yield_now().await;
        }
    }
    let relay = spawn_in_kernel(client_side, backend_side, Duration::from_secs(10));
    let (mut up, mut down) = (Vec::new(), Vec::new());
    backend.read_to_end(&mut up).await.unwrap();
    client.read_to_end(&mut down).await.unwrap();
    assert_eq!(
        (&up[..], &down[..]),
        (&b"whole request"[..], &b"banner"[..])
    );
    let (transfer, result) = relay.await.unwrap();
    result.unwrap();
    assert_eq!((transfer.up, transfer.down), (13, 6));
    assert_eq!(transfer.path, Some(PlainCopy::Splice));
}

#[tokio::test]
async fn a_reset_crosses_the_kernel_copy_as_a_reset_after_the_bytes_before_it() {
    let (mut client, client_side) = tcp_pair().await;
    let (backend_side, mut backend) = tcp_pair().await;
    let task = spawn_in_kernel(client_side, backend_side, Duration::from_secs(10));
    backend.write_all(b"last words").await.unwrap();
    let mut got = [0u8; 10];
    client.read_exact(&mut got).await.unwrap();
    reset(backend);
    let (transfer, result) = task.await.unwrap();
    assert_aborted_by(&result, Peer::Backend);
    assert_eq!(transfer.down, 10);
    let end = client.read(&mut [0; 16]).await;
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn a_client_reset_resets_the_backend_through_the_kernel_copy() {
    let (client, client_side) = tcp_pair().await;
    let (backend_side, mut backend) = tcp_pair().await;
    let task = spawn_in_kernel(client_side, backend_side, Duration::from_secs(10));
    reset(client);
    let (_, result) = task.await.unwrap();
    assert_aborted_by(&result, Peer::Client);
    let end = backend.read(&mut [0; 16]).await;
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn an_idle_kernel_copied_connection_is_closed() {
    let (_client, client_side) = tcp_pair().await;
    let (backend_side, _backend) = tcp_pair().await;
    let (transfer, result) = relay(
        Side::Plain(client_side),
        Side::Plain(backend_side),
        in_kernel(Duration::from_millis(200)),
    )
    .await;
    assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
    assert_eq!((transfer.up, transfer.down), (0, 0));
    assert_eq!(transfer.path, Some(PlainCopy::Kernel));
}

#[tokio::test]
async fn a_backend_that_does_not_read_holds_the_client_back_then_gets_every_byte_in_order() {
    let (client, client_side) = tcp_pair().await;
    let (backend_side, mut backend) = tcp_pair().await;
    let cookie = crate::net::io::socket_cookie(&client_side).unwrap();
    let relay = spawn_in_kernel(client_side, backend_side, Duration::from_secs(60));
    let (from_relay, mut to_relay) = client.into_split();
    let sent = held_back(&mut to_relay).await;
    // What TCP alone lets a sender queue toward a peer that does not read (send and receive
    // buffers on both hops), plus one window of the kernel copy: well under 64 MiB here.
    assert!(
        sent < 64 << 20,
        "{sent} bytes sent before the client was held back"
    );
    let lagging = kernel_copy().pairs.ledger(cookie).unwrap();
    assert_eq!(lagging.lagging, 1, "{lagging:?}");
    // The backend now reads it all, in order.
    let mut got = 0u64;
    read_pattern(&mut backend, &mut got, sent).await;
    // Once the worker says it copied everything left with the socket (a counter), the
    // program moves bytes again: the next ones go through the kernel.
    let copied_all = async {
        loop {
            let allowance = kernel_copy().pairs.allowance(cookie).unwrap();
            if allowance.copied == kernel_copy().pairs.ledger(cookie).unwrap().passed {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), copied_all)
        .await
        .expect("the worker never caught up");
    let before = kernel_copy().pairs.ledger(cookie).unwrap();
    let more = 1u64 << 20;
    to_relay
        .write_all(&pattern(sent, more as usize))
        .await
        .unwrap();
    to_relay.shutdown().await.unwrap();
    read_pattern(&mut backend, &mut got, sent + more).await;
    let after = kernel_copy().pairs.ledger(cookie).unwrap();
    assert_eq!(after.lagging, 0, "{after:?}");
    assert_eq!(after.moved, before.moved + more, "{before:?} → {after:?}");
    assert_eq!(after.passed, before.passed, "{before:?} → {after:?}");
    let mut end = [0u8; 1];
    assert_eq!(backend.read(&mut end).await.unwrap(), 0, "the client's end");
    // The other direction still works.
    answer_and_end(backend, from_relay, relay, b"thanks", sent + more).await;
}

#[tokio::test]
async fn a_client_that_ends_while_lagging_gets_every_byte_and_its_end_through() {
    let (client, client_side) = tcp_pair().await;
    let (backend_side, mut backend) = tcp_pair().await;
    let relay = spawn_in_kernel(client_side, backend_side, Duration::from_secs(60));
    let (from_relay, mut to_relay) = client.into_split();
    let sent = held_back(&mut to_relay).await;
    // The client ends while its bytes wait in the relay's socket for the worker.
    to_relay.shutdown().await.unwrap();
    let mut got = 0u64;
    read_pattern(&mut backend, &mut got, sent).await;
    assert_eq!(
        backend.read(&mut [0u8; 1]).await.unwrap(),
        0,
        "the client's end"
    );
    answer_and_end(backend, from_relay, relay, b"bye", sent).await;
}

/// The backend sends `answer` and ends; the client gets exactly that; the relay ends cleanly,
/// having counted `up` bytes up and the answer down, and the worker copied some of them.
async fn answer_and_end(
    mut backend: TcpStream,
    mut from_relay: impl AsyncRead + Unpin,
    relay: RelayTask,
    answer: &[u8],
    up: u64,
) {
    backend.write_all(answer).await.unwrap();
    backend.shutdown().await.unwrap();
    let mut got = Vec::new();
    from_relay.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, answer);
    let (transfer, result) = relay.await.unwrap();
    result.unwrap();
    assert_eq!((transfer.up, transfer.down), (up, answer.len() as u64));
    assert_eq!(transfer.path, Some(PlainCopy::Lagged));
}

#[tokio::test]
async fn peers_that_both_stop_reading_while_the_client_floods_are_reset_not_buffered() {
    let (client, client_side) = tcp_pair().await;
    let (backend_side, backend) = tcp_pair().await;
    let relay = spawn_in_kernel(client_side, backend_side, Duration::from_secs(60));
    let (client_in, mut client_out) = client.into_split();
    let (mut backend_in, mut backend_out) = backend.into_split();
    // The backend answers until it is held back: its bytes wait in the kernel to leave
    // through the client's socket, which the client never drains.
    let Filled::HeldBack(_) = fill(&mut backend_out).await else {
        panic!("the backend's writes failed");
    };
    // Then the client floods and never reads. Its bytes left for the worker queue behind the
    // backend's, where no receive buffer is charged for them: the relay must cut it off.
    match fill(&mut client_out).await {
        Filled::Failed(sent, e) => {
            // The reset, seen by the writer (reported once: a read after it sees the end).
            let reset = [io::ErrorKind::ConnectionReset, io::ErrorKind::BrokenPipe];
            assert!(reset.contains(&e.kind()), "{e}");
            // The bound: the window, the room left for the worker (twice the most TCP lets a
            // receive buffer grow to, and 4 MiB), the sockets' own buffers on both sides.
            let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
                .ok()
                .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
                .unwrap_or(32 << 20);
            let bound = 4 * rmem_max + (64 << 20);
            assert!(
                sent < bound,
                "{sent} bytes taken before the reset, more than {bound} ({e})"
            );
            eprintln!("reset after {sent} bytes");
        }
        Filled::HeldBack(sent) => panic!("held back after {sent} bytes: no reset"),
    }
    let (_, result) = relay.await.unwrap();
    match result {
        Err(CopyError::Io { peer, error }) => {
            assert_eq!(peer, Peer::Client);
            assert!(error.to_string().contains("kernel copy limit"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    // The backend sees a reset too, not a clean end.
    assert_eq!(
        drain(&mut backend_in).await.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset)
    );
    drop(client_in);
}

#[tokio::test]
async fn a_client_that_speaks_after_the_relays_fin_gets_its_last_bytes_and_end_through() {
    let (mut client, client_side) = tcp_pair().await;
    let (backend_side, mut backend) = tcp_pair().await;
    let relay = spawn_in_kernel(client_side, backend_side, Duration::from_secs(10));
    // The backend speaks and ends first: the relay's FIN goes to the client.
    backend.write_all(b"hello").await.unwrap();
    backend.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello");
    // Then the client's last bytes and its FIN, corked so that they may share a segment: with
    // both FINs through, the relay's socket leaves the maps, and bytes that arrive with the
    // FIN are the worker's to copy (`End::LeftTheMaps`; loopback does not always send them
    // together, so this checks the outcome, not that path).
    socket2::SockRef::from(&client).set_tcp_cork(true).unwrap();
    client.write_all(b"last words").await.unwrap();
    client.shutdown().await.unwrap();
    let mut up = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), backend.read_to_end(&mut up))
        .await
        .expect("the client's last segment never arrived")
        .unwrap();
    assert_eq!(up, b"last words");
    let (transfer, result) = relay.await.unwrap();
    result.unwrap();
    assert_eq!((transfer.up, transfer.down), (10, 5));
}

/// Reads until the end: `Ok(())` for a clean one.
async fn drain(from: &mut (impl AsyncRead + Unpin)) -> io::Result<()> {
    let mut sink = vec![0u8; 1 << 20];
    while from.read(&mut sink).await? > 0 {}
    Ok(())
}

/// How [`fill`] stopped.
enum Filled {
    /// A write made no progress for a second: TCP holds the writer back.
    HeldBack(u64),
    /// A write failed.
    Failed(u64, io::Error),
}

/// [`fill`], where TCP must hold the writer back: the bytes it sent.
async fn held_back(to: &mut (impl AsyncWrite + Unpin)) -> u64 {
    match fill(to).await {
        Filled::HeldBack(sent) => sent,
        Filled::Failed(sent, e) => panic!("write failed after {sent} bytes: {e}"),
    }
}

/// Writes the bound tests' stream until TCP holds the writer back or a write fails. Without
/// the bound, the kernel takes everything (gigabytes within seconds): a cap of 512 MiB keeps
/// the test finite if the bound is broken.
async fn fill(to: &mut (impl AsyncWrite + Unpin)) -> Filled {
    const CAP: u64 = 512 << 20;
    let mut sent = 0u64;
    loop {
        let chunk = pattern(sent, 64 << 10);
        match tokio::time::timeout(Duration::from_secs(1), to.write(&chunk)).await {
            Ok(Ok(n)) => sent += n as u64,
            Ok(Err(e)) => return Filled::Failed(sent, e),
            Err(_) => return Filled::HeldBack(sent),
        }
        assert!(
            sent < CAP,
            "{sent} bytes sent toward a peer that reads nothing"
        );
    }
}

/// `len` bytes of the bound tests' stream, from `offset` on.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect()
}

/// Reads the bound tests' stream from `got` up to `until`, checking every byte.
async fn read_pattern(from: &mut TcpStream, got: &mut u64, until: u64) {
    let mut buf = vec![0u8; 256 << 10];
    while *got < until {
        let want = buf.len().min((until - *got) as usize);
        let n = from.read(&mut buf[..want]).await.unwrap();
        assert!(n > 0, "the stream ended after {got} of {until} bytes");
        assert!(
            buf[..n] == pattern(*got, n)[..],
            "bytes {got}..{} out of order or lost",
            *got + n as u64
        );
        *got += n as u64;
    }
}

// Two threads, so that the reader reads all along (on one, the writer starves it whenever
// the kernel takes its bytes without blocking it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_transfers_keep_every_byte_in_order_whoever_copies_them() {
    // Four windows each way. On loopback the sender outruns the kernel's own sender now and
    // then; the relay copies until it catches up, then the kernel moves bytes again.
    // (`exchange` reads the answer only once it is all sent, so each direction gets its own
    // connection.)
    let bytes = 4 * relay_common::COPY_WINDOW;
    for direction in ["client → backend", "backend → client"] {
        let (client, client_side) = tcp_pair().await;
        let (backend_side, backend) = tcp_pair().await;
        let relay = spawn_in_kernel(client_side, backend_side, Duration::from_secs(10));
        let (done, relay) = watch_transfer(relay);
        if direction == "client → backend" {
            exchange(client, backend, relay, bytes as usize, 11).await;
        } else {
            exchange(backend, client, swap(relay), bytes as usize, 11).await;
        }
        let transfer = done.await.unwrap();
        // How the bytes went varies from run to run; that every one arrived does not.
        eprintln!("{direction}: {transfer:?}");
        assert!(transfer.in_kernel > 0, "{direction}: {transfer:?}");
    }
}

type RelayTask = tokio::task::JoinHandle<(Transfer, Result<(), CopyError>)>;

/// Splits off the path a relay task took, for a check after `exchange` consumed the task.
fn watch_path(relay: RelayTask) -> (tokio::sync::oneshot::Receiver<Option<PlainCopy>>, RelayTask) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (transfer, relay) = watch_transfer(relay);
    tokio::spawn(async move {
        if let Ok(t) = transfer.await {
            let _ = tx.send(t.path);
        }
    });
    (rx, relay)
}

/// Splits off what a relay task counted, for a check after `exchange` consumed the task.
fn watch_transfer(relay: RelayTask) -> (tokio::sync::oneshot::Receiver<Transfer>, RelayTask) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let relay = tokio::spawn(async move {
        let done = relay.await.unwrap();
        let _ = tx.send(done.0);
        done
    });
    (rx, relay)
}

/// The relay task with its directions swapped, for an exchange driven from the backend.
fn swap(relay: RelayTask) -> RelayTask {
    tokio::spawn(async move {
        let (t, r) = relay.await.unwrap();
        (
            Transfer {
                up: t.down,
                down: t.up,
                path: t.path,
                in_kernel: t.in_kernel,
            },
            r,
        )
    })
}

/// Closes `s` with a reset instead of a FIN (`SO_LINGER` 0).
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// The relay ended because `peer`'s socket failed.
fn assert_aborted_by(result: &Result<(), CopyError>, peer: Peer) {
    assert!(
        matches!(result, Err(CopyError::Io { peer: p, .. }) if *p == peer),
        "{result:?}"
    );
}
