//! The redirect's reading of a plaintext request head: any bytes give a Location that cannot
//! split the response (no CR, LF or space) or a clean refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|head: &[u8]| {
    let ip = std::net::IpAddr::from([192, 0, 2, 1]);
    if let Ok(location) = relay::recognise::location(head, ip, 8443) {
        assert!(location.starts_with("https://"), "{location}");
        assert!(
            !location
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control()),
            "{location:?}"
        );
    }
});
