//! What the TLS record layer parses from peers before any key is involved: record headers
//! over a stream of bytes (`record_len`, as `copy::Received` frames its buffer) and the
//! post-handshake messages inside a record (`split_message`). Neither may panic, loop, or point
//! outside its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::tls::record::{HEADER, MAX_RECORD, record_len, split_message};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(len)) = record_len(rest) {
        assert!((HEADER..=MAX_RECORD).contains(&len), "record length {len}");
        let Some((record, tail)) = rest.split_at_checked(len) else {
            break;
        };
        let mut messages = &record[HEADER..];
        while !messages.is_empty() {
            match split_message(messages) {
                Ok((_, body, more)) => {
                    assert_eq!(4 + body.len() + more.len(), messages.len());
                    messages = more;
                }
                Err(_) => break,
            }
        }
        rest = tail;
    }
});
