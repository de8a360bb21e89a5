//! Privileges from a directory: `group:` and `attr:` allow rules decided by a real OpenLDAP
//! (`relay_tests::ldap`), for clients authenticated by their certificate (curl with a client
//! certificate, through the relay, to Python's http.server).

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use relay_tests::{
    env::TestDir,
    free_port,
    http::HttpServer,
    ldap::{BASE, RELAY_DN, RELAY_PASSWORD, Slapd},
    pki::{CertFiles, Names},
    relay::Relay,
    wait_until,
};

const PAGE: &str = "behind the directory\n";
const STAFF: &str = "group:cn=staff,ou=groups,dc=example,dc=org";
const FILTER: &str = "(&(objectClass=person)(|(labeledURI={uri})(cn={cn})))";

struct Setup {
    t: TestDir,
    slapd: Slapd,
    _backend: HttpServer,
    backend: SocketAddr,
}

impl Setup {
    fn new() -> Setup {
        let t = TestDir::new();
        let slapd = Slapd::start(&t.path().join("ldap"), &t.pki).expect("slapd starts");
        let www = t.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), PAGE).unwrap();
        let backend = HttpServer::start(&www, "127.0.0.1".parse().unwrap(), free_port(), &[])
            .expect("backend");
        let addr = backend.addr;
        Setup {
            t,
            slapd,
            _backend: backend,
            backend: addr,
        }
    }

    /// `[directory]` over ldaps with the relay's simple bind; `extra` lines added.
    fn directory(&self, extra: &str) -> String {
        let password = self.t.path().join("ldap-password");
        std::fs::write(&password, format!("{RELAY_PASSWORD}\n")).unwrap();
        format!(
            "[directory]\nurl = \"{}\"\nca = \"{}\"\nbind_dn = \"{RELAY_DN}\"\n\
             bind_password_file = \"{}\"\nbase = \"{BASE}\"\nfilter = \"{FILTER}\"\n{extra}\n",
            self.slapd.ldaps,
            self.t.pki.ca.display(),
            password.display()
        )
    }

    /// An mtls service on a port of its own allowing `allow`.
    fn service(&self, name: &str, port: u16, allow: &[&str]) -> String {
        let rules: Vec<String> = allow.iter().map(|r| format!("{r:?}")).collect();
        self.t.service(
            name,
            SocketAddr::from(([127, 0, 0, 1], port)),
            self.backend,
            ("mtls", "plain"),
            (&format!("allow = [{}]\n", rules.join(", ")), ""),
        )
    }

    fn start(&self, directory: &str, services: &[String]) -> Relay {
        let relay_extra = format!("handshake_timeout = \"5s\"\n\n{directory}");
        self.t.start_relay(&relay_extra, services)
    }

    /// A client certificate with these names.
    fn client(&self, stem: &str, names: &Names, serial: u64) -> CertFiles {
        self.t.pki.client_with(stem, names, serial).unwrap()
    }

    /// curl with `client`'s certificate to the service on `port`: the page, or why not.
    fn get(&self, port: u16, client: &CertFiles) -> Result<String, String> {
        let out = curl(port, &self.t.pki.ca, client);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && body == PAGE {
            Ok(body)
        } else {
            Err(format!(
                "{:?}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn served(&self, port: u16, client: &CertFiles) -> bool {
        self.get(port, client).is_ok()
    }

    fn directory_status(&self) -> relay::directory::Status {
        self.t.status().directory.expect("the directory's state")
    }
}

fn curl(port: u16, ca: &Path, client: &CertFiles) -> Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--cert")
        .arg(&client.cert)
        .arg("--key")
        .arg(&client.key)
        .arg(format!("https://localhost:{port}/index.html"))
        .output()
        .expect("curl is installed (`cargo xtask setup`)")
}

fn cn<'a>(name: &'a str) -> Names<'a> {
    Names {
        cn: Some(name),
        ..Names::default()
    }
}

#[test]
fn group_members_are_served_others_refused_and_a_move_takes_effect_within_the_ttl() {
    let s = Setup::new();
    let (by_group, by_attr) = (free_port(), free_port());
    let relay = s.start(
        &s.directory("cache_ttl = \"1s\"\nnegative_ttl = \"1s\""),
        &[
            s.service("staff-only", by_group, &[STAFF]),
            s.service("by-attr", by_attr, &["attr:employeeType=staff"]),
        ],
    );
    let alice = s.client("alice", &cn("alice"), 101);
    let bob = s.client("bob", &cn("bob"), 102);
    // alice is in `staff` through the nested group `ops`.
    assert_eq!(s.get(by_group, &alice).as_deref(), Ok(PAGE));
    assert!(!s.served(by_group, &bob), "bob is not in staff");
    assert!(relay.wait_logs(
        &["matches no allow rule", "uid=bob"],
        1,
        Duration::from_secs(5)
    ));
    assert!(
        relay.has_log("ldap:uid=alice,ou=people,dc=example,dc=org"),
        "the entry is logged as the identity"
    );
    assert_eq!(s.get(by_attr, &alice).as_deref(), Ok(PAGE));
    assert!(!s.served(by_attr, &bob), "bob is a contractor");
    // Mapped by URI SAN too: a certificate naming alice's SPIFFE ID, no CN.
    let spiffe = Names {
        uris: &["spiffe://example.org/ns/prod/sa/alice"],
        ..Names::default()
    };
    assert!(s.served(by_group, &s.client("alice-uri", &spiffe, 103)));

    // bob joins ops, alice leaves: once the cached decisions expire, they swap.
    s.slapd
        .modify(
            "dn: cn=ops,ou=groups,dc=example,dc=org\nchangetype: modify\n\
             add: member\nmember: uid=bob,ou=people,dc=example,dc=org\n-\n\
             delete: member\nmember: uid=alice,ou=people,dc=example,dc=org\n",
        )
        .unwrap();
    let moved = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || s.served(by_group, &bob)),
        "bob is let in once the cache expires"
    );
    assert!(!s.served(by_group, &alice), "alice is out");
    eprintln!(
        "group change effective after {:?} (cache_ttl 1 s)",
        moved.elapsed()
    );
    let d = s.directory_status();
    assert!(d.reachable && d.lookups >= 4, "{d:?}");
}

#[test]
fn a_crafted_certificate_name_cannot_change_the_search() {
    let s = Setup::new();
    let port = free_port();
    let relay = s.start(&s.directory(""), &[s.service("staff-only", port, &[STAFF])]);
    // Unescaped, the first would match every entry; the second exactly alice. The third is a
    // group's name: a group entry is never taken for a client (the filter asks for a person).
    for (n, name) in ["*)(cn=*", "nobody)(cn=alice", "ops"].iter().enumerate() {
        let crafted = s.client(&format!("crafted{n}"), &cn(name), 200 + n as u64);
        assert!(!s.served(port, &crafted), "{name:?} is refused");
    }
    assert!(
        relay.wait_logs(&["no entry matches"], 3, Duration::from_secs(5)),
        "the searches found nothing"
    );
    assert!(
        relay.has_log("\\2a\\29\\28cn=\\2a"),
        "the filter carried the name escaped"
    );
    // "No entry" is remembered (negative_ttl): the same name again is decided from the cache.
    let lookups = s.directory_status().lookups;
    let again = s.client("crafted-again", &cn("*)(cn=*"), 210);
    assert!(!s.served(port, &again));
    let d = s.directory_status();
    assert_eq!(d.lookups, lookups, "no new lookup: {d:?}");
    assert!(d.cache_hits >= 1, "{d:?}");
}

#[test]
fn with_the_directory_down_cached_decisions_hold_until_stale_for_then_clients_are_refused() {
    let mut s = Setup::new();
    let port = free_port();
    let relay = s.start(
        &s.directory("cache_ttl = \"1s\"\nstale_for = \"3s\"\ntimeout = \"1s\""),
        &[s.service("staff-only", port, &[STAFF])],
    );
    let alice = s.client("alice", &cn("alice"), 101);
    assert!(s.served(port, &alice));

    s.slapd.stop();
    let stopped = Instant::now();
    // Past the TTL the directory is asked, does not answer, and the stale entry decides.
    assert!(
        wait_until(Duration::from_secs(10), || {
            s.served(port, &alice) && s.directory_status().stale >= 1
        }),
        "a stale decision admitted alice"
    );
    assert!(!s.directory_status().reachable);
    // Nothing cached for bob: refused at once, fail closed.
    let bob = s.client("bob", &cn("bob"), 102);
    assert!(!s.served(port, &bob));
    assert!(
        relay.wait_logs(
            &["nothing cached within stale_for", "cn:bob"],
            1,
            Duration::from_secs(5)
        ),
        "refused as directory_unavailable"
    );
    // Past stale_for: fail closed.
    assert!(
        wait_until(Duration::from_secs(15), || !s.served(port, &alice)),
        "refused once stale_for has passed"
    );
    eprintln!(
        "refused {:?} after the directory stopped (ttl 1 s + stale_for 3 s)",
        stopped.elapsed()
    );
    let denied = s.t.status();
    let refusals: u64 = denied
        .connections
        .iter()
        .flatten()
        .map(|c| c.outcomes.get("denied").copied().unwrap_or(0))
        .sum();
    assert!(refusals >= 1, "counted as denied: {:?}", denied.connections);

    // Back: decisions resume without a restart.
    s.slapd.restart().expect("slapd restarts");
    assert!(
        wait_until(Duration::from_secs(20), || s.served(port, &alice)),
        "served again"
    );
    assert!(s.directory_status().reachable);
}

#[test]
fn ldap_in_clear_is_refused_at_config_check() {
    let s = Setup::new();
    let dir = s.t.path();
    let config = dir.join("clear.toml");
    let directory = s.directory("").replace(&s.slapd.ldaps, &s.slapd.ldap);
    std::fs::write(
        &config,
        format!(
            "[relay]\ncontrol_socket = \"{}/c.sock\"\n\n{directory}\n{}",
            dir.display(),
            s.service("staff-only", free_port(), &[STAFF])
        ),
    )
    .unwrap();
    let out = relay_tests::relay::cli(&["check", "--config", config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("directory.url") && err.contains("StartTLS"),
        "{err}"
    );

    // StartTLS on the same port is accepted, and works.
    let starttls = directory.replace("[directory]\n", "[directory]\nstarttls = true\n");
    let port = free_port();
    let _relay = s.start(&starttls, &[s.service("staff-only", port, &[STAFF])]);
    assert!(s.served(port, &s.client("alice", &cn("alice"), 101)));

    // group: rules without a directory are a configuration error naming the key.
    std::fs::write(
        &config,
        format!(
            "[relay]\ncontrol_socket = \"{}/c.sock\"\n\n{}",
            dir.display(),
            s.service("staff-only", free_port(), &[STAFF])
        ),
    )
    .unwrap();
    let out = relay_tests::relay::cli(&["check", "--config", config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("inbound.allow") && err.contains("[directory]"),
        "{err}"
    );
}
