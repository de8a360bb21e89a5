//! The config parser and validator on arbitrary text: errors, never panics or hangs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    // A directory that does not exist: relative certificate paths fail to read, cleanly.
    let file = std::path::Path::new("/nonexistent/relay-fuzz/relay.toml");
    if let Err(e) = relay::config::Config::parse(file, text) {
        // Every error names the file (the operator must know where to look).
        assert!(e.to_string().contains("relay.toml"), "{e}");
    }
});
