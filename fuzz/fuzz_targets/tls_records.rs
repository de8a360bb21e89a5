//! What the TLS record layer parses from peers before any key is involved: record headers
//! over a stream of bytes (`record_len`, as `copy::Received` frames its buffer), and the
//! post-handshake handshake messages those records carry, joined across records (`Joiner`)
//! as a peer may fragment them. Neither may panic, loop, point outside its input, lose or
//! invent a byte, or hold more than one message's worth.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::tls::record::{HEADER, Joiner, MAX_MESSAGE, MAX_RECORD, record_len};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut joiner = Joiner::default();
    // Bytes fed to the joiner, and bytes it handed back as whole messages.
    let (mut fed, mut joined) = (0usize, 0usize);
    while let Ok(Some(len)) = record_len(rest) {
        assert!((HEADER..=MAX_RECORD).contains(&len), "record length {len}");
        let Some((record, tail)) = rest.split_at_checked(len) else {
            break;
        };
        rest = tail;
        // Each record's body is one handshake record's payload.
        let payload = &record[HEADER..];
        let result = joiner.join(payload, |_, body, _| {
            assert!(body.len() <= MAX_MESSAGE, "message of {} bytes", body.len());
            joined += 4 + body.len();
            Ok(())
        });
        match result {
            Ok(()) => fed += payload.len(),
            // A refused record ends the connection: nothing to check after it.
            Err(_) => return,
        }
        // What is not joined yet is exactly what is held, and never more than one message.
        let held = fed - joined;
        assert_eq!(joiner.is_pending(), held > 0);
        assert!(held < 4 + MAX_MESSAGE, "held {held} bytes");
    }
});
