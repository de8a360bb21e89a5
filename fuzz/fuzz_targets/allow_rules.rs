//! `allow` rules and identities from arbitrary text: parse, match, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::access::{Allow, Identity};

fuzz_target!(|text: &str| {
    // First half: rules, one per line; second half: the names of a client.
    let mid = (0..=text.len() / 2)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let (rules, names) = text.split_at(mid);
    let rules: Vec<String> = rules.lines().map(str::to_owned).collect();
    let Ok(allow) = Allow::parse(&rules) else {
        return;
    };
    let mut lines = names.lines();
    let id = Identity {
        cn: lines.next().map(str::to_owned),
        dns: lines.next().into_iter().map(str::to_owned).collect(),
        uris: lines.map(str::to_owned).collect(),
    };
    if let Ok(authorised) = allow.decide(&id) {
        // The rule that matched is one of the configured ones.
        assert!(
            rules
                .iter()
                .any(|r| r.to_ascii_lowercase() == authorised.rule.to_ascii_lowercase())
        );
        // What was authorised is one of the client's own names, with its kind.
        let name = &authorised.name;
        let (kind, value) = name.split_once(':').expect("kind:name");
        let own = match kind {
            "dns" => id.dns.iter().any(|d| d == value),
            "uri" => id.uris.iter().any(|u| u == value),
            "cn" => id.cn.as_deref() == Some(value),
            other => panic!("unknown kind {other}"),
        };
        assert!(own, "{name} is not a name of {id:?}");
    }
});
