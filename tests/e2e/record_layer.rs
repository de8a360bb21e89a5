//! RFC 8446 and RFC 5246 after the handshake, from the attacker's side, on both sides of the
//! relay: a scripted TLS client against a `tls → plain` service (inbound), and a scripted TLS
//! server behind a `plain → tls` service (outbound; the relay is its client). Each test is one
//! rule, named after its section: the peer sends the offending record, and the test asserts
//! the exact alert that comes back, then the close, then — an abort stays an abort — that the
//! relay's other side was reset rather than ended. The expected answers are the RFC's, as the
//! tlsfuzzer conformance suite checks them.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use relay_tests::{
    env::TestDir,
    free_port,
    metrics::closed,
    relay::Relay,
    tlspeer::{
        ALERT, APPLICATION_DATA, CHANGE_CIPHER_SPEC, HANDSHAKE, KEY_UPDATE, Received, TlsPeer,
        Version,
    },
};
use rustls::AlertDescription as A;

const TLS13: Version = Version::Tls13;
const TLS12: Version = Version::Tls12;

/// One relay with both services, and the test's ends of them.
struct Rig {
    env: TestDir,
    relay: Relay,
    metrics: SocketAddr,
    /// `tls → plain`: the scripted client connects here; the relay connects to `plain_backend`.
    inbound: SocketAddr,
    plain_backend: TcpListener,
    /// `plain → tls`: a plain client connects here; the relay connects to `tls_backend`, where
    /// the scripted server answers.
    outbound: SocketAddr,
    tls_backend: TcpListener,
}

fn rig() -> Rig {
    let env = TestDir::new();
    let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (inbound, outbound, metrics) = (at(free_port()), at(free_port()), at(free_port()));
    let plain_backend = TcpListener::bind(at(0)).unwrap();
    let tls_backend = TcpListener::bind(at(0)).unwrap();
    let services = [
        env.service(
            "in",
            inbound,
            plain_backend.local_addr().unwrap(),
            ("tls", "plain"),
            ("", ""),
        ),
        env.service(
            "out",
            outbound,
            tls_backend.local_addr().unwrap(),
            ("plain", "tls"),
            ("", ""),
        ),
    ];
    let relay = env.start_relay(&format!("metrics = \"{metrics}\""), &services);
    for l in [&plain_backend, &tls_backend] {
        l.set_nonblocking(true).unwrap();
    }
    Rig {
        env,
        relay,
        metrics,
        inbound,
        plain_backend,
        outbound,
        tls_backend,
    }
}

/// Which side of the relay the scripted peer plays.
#[derive(Clone, Copy, Debug)]
enum Side {
    /// The client of a `tls → plain` service.
    Inbound,
    /// The backend of a `plain → tls` service.
    Outbound,
}

const SIDES: [Side; 2] = [Side::Inbound, Side::Outbound];

impl Rig {
    /// The scripted peer on `side`, after its handshake with the relay, and the plain socket at
    /// the relay's other side.
    fn peer(&self, side: Side, version: Version) -> (TlsPeer, TcpStream) {
        match side {
            Side::Inbound => {
                let peer = TlsPeer::connect(self.inbound, &self.env.pki.ca, version)
                    .expect("handshake with the relay");
                (peer, accept(&self.plain_backend))
            }
            Side::Outbound => {
                let client = TcpStream::connect(self.outbound).unwrap();
                let stream = accept(&self.tls_backend);
                let server = self.env.pki.server();
                let peer = TlsPeer::accept(stream, &server.cert, &server.key, version)
                    .expect("handshake with the relay");
                (peer, client)
            }
        }
    }

    /// On every side and version given: the peer does `attack`, gets the fatal alert
    /// `expected` and the close, and the relay's other side sees a reset after nothing.
    fn refused(
        &self,
        versions: &[Version],
        expected: A,
        attack: impl Fn(&mut TlsPeer) -> std::io::Result<()>,
    ) {
        for &version in versions {
            for side in SIDES {
                let (mut peer, mut other) = self.peer(side, version);
                attack(&mut peer).unwrap();
                peer.expect_fatal(expected);
                let (got, end) = read_to_end(&mut other);
                assert!(got.is_empty(), "{side:?} {version:?}: {got:?} passed on");
                assert_eq!(
                    end,
                    Some(ErrorKind::ConnectionReset),
                    "{side:?} {version:?}: the other side is reset, not ended"
                );
            }
        }
        let counted =
            || closed(self.metrics, "in", "tls_error") + closed(self.metrics, "out", "tls_error");
        assert!(
            relay_tests::wait_until(Duration::from_secs(5), || counted()
                >= (versions.len() * SIDES.len()) as f64),
            "counted as tls_error: {}",
            counted()
        );
    }

    /// On every side and version given: after `then`, data still flows both ways.
    fn goes_on(
        &self,
        versions: &[Version],
        then: impl Fn(&mut TlsPeer) -> std::io::Result<()>,
        answer: impl Fn(&mut TlsPeer, Side),
    ) {
        for &version in versions {
            for side in SIDES {
                let (mut peer, mut other) = self.peer(side, version);
                then(&mut peer).unwrap();
                answer(&mut peer, side);
                peer.send_data(b"still here").unwrap();
                let mut got = [0; 10];
                other.read_exact(&mut got).unwrap();
                assert_eq!(&got, b"still here", "{side:?} {version:?}");
                other.write_all(b"and back").unwrap();
                assert_eq!(peer.recv_data(8), b"and back", "{side:?} {version:?}");
            }
        }
    }
}

/// The relay's connection to a backend listener, within a time limit.
fn accept(listener: &TcpListener) -> TcpStream {
    let mut stream = None;
    relay_tests::wait_until(Duration::from_secs(10), || {
        stream = listener.accept().ok().map(|(s, _)| s);
        stream.is_some()
    });
    let stream = stream.expect("the relay connects to its backend");
    stream.set_nonblocking(false).unwrap();
    stream
}

/// Everything `s` delivers until it ends, and how it ended: `None` for an EOF, else the
/// error's kind.
fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 16 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e.kind())),
        }
    }
}

/// Nothing to check before the data: an alert the relay sent instead would arrive first and
/// fail the exchange.
fn nothing_more(_: &mut TlsPeer, _: Side) {}

#[test]
fn rfc8446_5_2_a_record_that_does_not_authenticate_gets_bad_record_mac() {
    rig().refused(&[TLS13, TLS12], A::BadRecordMac, |peer| {
        let mut record = peer.seal(APPLICATION_DATA, b"attack at dawn", 0);
        let last = record.len() - 1;
        record[last] ^= 1;
        peer.send_raw(&record)
    });
}

#[test]
fn rfc8446_5_2_a_ciphertext_longer_than_2_14_plus_256_gets_record_overflow() {
    // Judged on the header, before any decryption: the body need not be a ciphertext at all.
    rig().refused(&[TLS13], A::RecordOverflow, |peer| {
        let len = 16384 + 256 + 1;
        let mut record = vec![APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        record.resize(5 + len, 0x5a);
        peer.send_raw(&record)
    });
}

#[test]
fn rfc5246_6_2_3_a_ciphertext_longer_than_2_14_plus_2048_gets_record_overflow() {
    rig().refused(&[TLS12], A::RecordOverflow, |peer| {
        let len = 16384 + 2048 + 1;
        peer.send_raw(&[APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8])
    });
}

#[test]
fn rfc8446_5_4_a_plaintext_longer_than_2_14_gets_record_overflow() {
    let rig = rig();
    rig.refused(&[TLS13, TLS12], A::RecordOverflow, |peer| {
        peer.send(APPLICATION_DATA, &[7; 16385])
    });
    // Padding counts: 2^14 - 8 bytes of data and 9 of padding make 2^14 + 2 inner bytes.
    rig.refused(&[TLS13], A::RecordOverflow, |peer| {
        let record = peer.seal(APPLICATION_DATA, &[7; 16384 - 8], 9);
        peer.send_raw(&record)
    });
}

#[test]
fn rfc8446_5_4_a_record_of_only_zeros_gets_unexpected_message() {
    let rig = rig();
    for padding in [0, 42] {
        rig.refused(&[TLS13], A::UnexpectedMessage, |peer| {
            let record = peer.seal(0, &[], padding);
            peer.send_raw(&record)
        });
    }
}

#[test]
fn rfc8446_5_a_record_of_an_unknown_content_type_gets_unexpected_message() {
    let rig = rig();
    // Inside the encryption...
    rig.refused(&[TLS13], A::UnexpectedMessage, |peer| {
        peer.send(99, b"what is this")
    });
    // ...and outside it.
    rig.refused(&[TLS13, TLS12], A::UnexpectedMessage, |peer| {
        peer.send_raw(&[25, 3, 3, 0, 2, 1, 1])
    });
}

#[test]
fn rfc8446_5_a_change_cipher_spec_after_the_handshake_gets_unexpected_message() {
    rig().refused(&[TLS13, TLS12], A::UnexpectedMessage, |peer| {
        peer.send_raw(&[CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1])
    });
}

#[test]
fn rfc8446_5_1_zero_length_application_data_is_accepted() {
    rig().goes_on(
        &[TLS13, TLS12],
        |peer| {
            for padding in [0, 30] {
                let empty = peer.seal(APPLICATION_DATA, &[], padding);
                peer.send_raw(&empty)?;
            }
            peer.send(APPLICATION_DATA, &[])
        },
        nothing_more,
    );
}

#[test]
fn rfc8446_5_1_an_empty_handshake_record_gets_unexpected_message() {
    rig().refused(&[TLS13, TLS12], A::UnexpectedMessage, |peer| {
        peer.send(HANDSHAKE, &[])
    });
}

#[test]
fn rfc8446_5_1_a_record_between_handshake_fragments_gets_unexpected_message() {
    let rig = rig();
    for split in 1..5 {
        rig.refused(&[TLS13], A::UnexpectedMessage, |peer| {
            let key_update = [KEY_UPDATE, 0, 0, 1, 0];
            peer.send(HANDSHAKE, &key_update[..split])?;
            peer.send(APPLICATION_DATA, b"GET / HTTP/1.1\r\n")
        });
    }
}

#[test]
fn rfc8446_5_1_a_key_update_split_over_records_is_accepted() {
    rig().goes_on(
        &[TLS13],
        |peer| {
            peer.send(HANDSHAKE, &[KEY_UPDATE, 0])?;
            peer.send(HANDSHAKE, &[0, 1, 0])?;
            peer.renew_tx();
            Ok(())
        },
        nothing_more,
    );
}

#[test]
fn rfc8446_5_1_a_key_update_must_end_its_record() {
    rig().refused(&[TLS13], A::UnexpectedMessage, |peer| {
        peer.send(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE, 0, 0, 1, 0])
    });
}

#[test]
fn rfc8446_4_6_3_a_key_update_of_the_wrong_length_gets_decode_error() {
    let rig = rig();
    for body in [&[][..], &[0, 0]] {
        rig.refused(&[TLS13], A::DecodeError, |peer| {
            let mut message = vec![KEY_UPDATE, 0, 0, body.len() as u8];
            message.extend_from_slice(body);
            peer.send(HANDSHAKE, &message)
        });
    }
}

#[test]
fn rfc8446_4_6_3_a_key_update_request_other_than_0_or_1_gets_illegal_parameter() {
    let rig = rig();
    for value in [2, 255] {
        rig.refused(&[TLS13], A::IllegalParameter, |peer| {
            peer.send(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, value])
        });
    }
}

#[test]
fn rfc8446_4_6_3_a_requested_key_update_is_answered_before_more_data() {
    rig().goes_on(
        &[TLS13],
        |peer| peer.key_update(true),
        |peer, side| {
            // The relay's own KeyUpdate, not requesting one back; the peer renews its
            // receiving key as it reads it, so the data after it opens only if it came first.
            assert_eq!(
                peer.recv(Duration::from_secs(5)),
                Received::Handshake(KEY_UPDATE, vec![0]),
                "{side:?}"
            );
        },
    );
}

#[test]
fn rfc8446_6_an_empty_alert_gets_unexpected_message() {
    rig().refused(&[TLS13, TLS12], A::UnexpectedMessage, |peer| {
        peer.send(ALERT, &[])
    });
}

#[test]
fn rfc8446_6_an_alert_of_the_wrong_length_gets_decode_error() {
    let rig = rig();
    for alert in [&[2][..], &[2, 10, 0]] {
        rig.refused(&[TLS13, TLS12], A::DecodeError, |peer| {
            peer.send(ALERT, alert)
        });
    }
}

#[test]
fn rfc8446_6_an_alert_of_an_unknown_level_gets_illegal_parameter() {
    rig().refused(&[TLS13, TLS12], A::IllegalParameter, |peer| {
        peer.send(ALERT, &[3, 10])
    });
}

#[test]
fn rfc8446_6_2_a_fatal_alert_from_the_peer_is_not_answered() {
    let rig = rig();
    for version in [TLS13, TLS12] {
        for side in SIDES {
            let (mut peer, mut other) = rig.peer(side, version);
            peer.alert(true, A::InternalError).unwrap();
            let answer = peer.recv(Duration::from_secs(5));
            assert!(
                matches!(answer, Received::Closed | Received::Reset),
                "{side:?} {version:?}: nothing but the close: {answer:?}"
            );
            assert_eq!(read_to_end(&mut other).1, Some(ErrorKind::ConnectionReset));
        }
    }
}

#[test]
fn rfc8446_4_a_handshake_message_out_of_place_gets_unexpected_message() {
    let rig = rig();
    // A Finished, a ClientHello: no handshake message but KeyUpdate and (toward a client)
    // NewSessionTicket belongs after a TLS 1.3 handshake; the relay offers no post-handshake
    // authentication, so a CertificateRequest is out of place too.
    for message in [&[20, 0, 0, 1, 0][..], &[1, 0, 0, 0], &[13, 0, 0, 0]] {
        rig.refused(&[TLS13], A::UnexpectedMessage, |peer| {
            peer.send(HANDSHAKE, message)
        });
    }
    // TLS 1.2: a ClientKeyExchange after the handshake (tlsfuzzer's message duplication).
    rig.refused(&[TLS12], A::UnexpectedMessage, |peer| {
        peer.send(HANDSHAKE, &[16, 0, 0, 0])
    });
}

#[test]
fn more_than_32_records_without_data_get_unexpected_message() {
    // OpenSSL and rustls both stop a peer there: each record costs work, none moves data.
    let rig = rig();
    rig.goes_on(
        &[TLS13, TLS12],
        |peer| {
            for _ in 0..32 {
                peer.send(APPLICATION_DATA, &[])?;
            }
            Ok(())
        },
        nothing_more,
    );
    rig.refused(&[TLS13, TLS12], A::UnexpectedMessage, |peer| {
        for _ in 0..33 {
            peer.send(APPLICATION_DATA, &[])?;
        }
        Ok(())
    });
}

#[test]
fn rfc5246_7_4_1_renegotiation_is_declined_with_a_no_renegotiation_warning() {
    // A client's new ClientHello (the relay as server) and a server's HelloRequest (the relay
    // as client): both get the warning, and the connection goes on.
    let rig = rig();
    for side in SIDES {
        let (mut peer, mut other) = rig.peer(side, TLS12);
        let request: &[u8] = match side {
            Side::Inbound => &[1, 0, 0, 4, 3, 3, 0, 0],
            Side::Outbound => &[0, 0, 0, 0],
        };
        peer.send(HANDSHAKE, request).unwrap();
        assert_eq!(
            peer.recv(Duration::from_secs(5)),
            Received::Alert {
                fatal: false,
                description: A::NoRenegotiation
            },
            "{side:?}"
        );
        peer.send_data(b"still here").unwrap();
        let mut got = [0; 10];
        other.read_exact(&mut got).unwrap();
        other.write_all(b"and back").unwrap();
        assert_eq!(peer.recv_data(8), b"and back");
    }
}

#[test]
fn rfc5246_7_2_a_tls12_warning_alert_is_taken_as_information() {
    rig().goes_on(
        &[TLS12],
        |peer| peer.alert(false, A::UserCanceled),
        nothing_more,
    );
}

#[test]
fn rfc8446_6_1_a_peer_that_closes_without_close_notify_has_the_other_side_reset() {
    let rig = rig();
    for version in [TLS13, TLS12] {
        for side in SIDES {
            // Half a request, then a FIN an attacker on the path could have forged.
            let (mut peer, mut other) = rig.peer(side, version);
            peer.send_data(b"POST /transfer HTTP/1.1\r\nContent-Le")
                .unwrap();
            peer.fin().unwrap();
            let (got, end) = read_to_end(&mut other);
            assert_eq!(
                got, b"POST /transfer HTTP/1.1\r\nContent-Le",
                "{side:?} {version:?}"
            );
            assert_eq!(
                end,
                Some(ErrorKind::ConnectionReset),
                "{side:?} {version:?}: a truncated stream must not look complete"
            );

            // The same with close_notify: a clean end, which the other side sees as one.
            let (mut peer, mut other) = rig.peer(side, version);
            peer.send_data(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            peer.close_notify().unwrap();
            peer.fin().unwrap();
            let (got, end) = read_to_end(&mut other);
            assert_eq!(got, b"GET / HTTP/1.0\r\n\r\n");
            assert_eq!(end, None, "{side:?} {version:?}: close_notify ends cleanly");
        }
    }
    assert!(
        relay_tests::wait_until(Duration::from_secs(5), || {
            closed(rig.metrics, "in", "truncated") == 2.0
                && closed(rig.metrics, "out", "truncated") == 2.0
        }),
        "truncations counted: in {}, out {}",
        closed(rig.metrics, "in", "truncated"),
        closed(rig.metrics, "out", "truncated")
    );
    assert_eq!(
        rig.relay
            .count_logs(&["outcome=\"truncated\"", "without close_notify"]),
        4
    );
}
