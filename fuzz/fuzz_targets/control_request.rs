//! A line on the control socket: parsed, and a service it adds validated like a config file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::control::{Request, parse};

fuzz_target!(|line: &str| {
    if let Ok(Request::ServiceAdd { service, .. }) = parse(line) {
        let config = relay::config::Config {
            relay: Default::default(),
            datapath: None,
            cluster: None,
            directory: None,
            acme: None,
            ipsec: None,
            servers: Vec::new(),
            services: vec![*service],
        };
        let _ = config.check();
    }
});
