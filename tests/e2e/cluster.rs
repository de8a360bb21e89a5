//! Gateways as a cluster (etcd): services added on one serve on every gateway, sessions
//! resume across gateways and ticket rotations, gateways keep serving while etcd is down and
//! catch up when it returns, a new leader takes over rotation.
//!
//! Real peers throughout: Debian's etcd with TLS and client certificates, two relays in their
//! own namespaces, curl and `openssl s_client` from a client namespace, Python's http.server as
//! the backend. Topology and etcd: `relay_tests::cluster`.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use relay::{cluster::ClusterStatus, control::Status};
use relay_tests::{
    cluster::{Etcd, GW_A, GW_B, Lan, SERVER},
    env::TestDir,
    http::HttpServer,
    netns::require_root,
    relay::{Relay, binary},
    wait_until,
};

const FRONT: u16 = 8443;
const BACKEND: u16 = 8080;
const PAGE: &str = "served through the cluster\n";

struct Cluster {
    t: TestDir,
    lan: Lan,
    etcd: Etcd,
    kek: PathBuf,
    _backend: HttpServer,
}

/// One gateway: its relay and where its control socket is.
struct Gateway {
    relay: Relay,
    name: String,
    addr: &'static str,
    socket: PathBuf,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        require_root();
        let t = TestDir::new();
        let lan = Lan::create(tag).expect("cluster topology");
        let etcd = Etcd::start(&lan, &t.pki, t.path()).expect("etcd starts");
        let kek = t.path().join("cluster.kek");
        std::fs::write(&kek, format!("{}\n", "5e".repeat(32))).unwrap();
        let www = t.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), PAGE).unwrap();
        let wrap = ["ip", "netns", "exec", &lan.ns("srv")];
        let backend = HttpServer::start(&www, SERVER.parse().unwrap(), BACKEND, &wrap)
            .expect("backend starts");
        Cluster {
            t,
            lan,
            etcd,
            kek,
            _backend: backend,
        }
    }

    /// Starts gateway `name` ("gwa" or "gwb") with `extra` lines in `[cluster]` and `relay`
    /// lines in `[relay]`, and waits until it is connected to etcd.
    fn gateway(&self, name: &str, relay: &str, extra: &str) -> Gateway {
        self.gateway_with(name, relay, extra, "")
    }

    /// As [`Cluster::gateway`], with `services` (TOML tables) in its own file.
    fn gateway_with(&self, name: &str, relay: &str, extra: &str, services: &str) -> Gateway {
        let g = self.launch_with(name, relay, extra, services);
        assert!(
            g.relay
                .wait_logs(&["cluster: connected to etcd"], 1, Duration::from_secs(20)),
            "{name} did not connect to etcd"
        );
        g
    }

    fn launch(&self, name: &str, relay: &str, extra: &str) -> Gateway {
        self.launch_with(name, relay, extra, "")
    }

    fn launch_with(&self, name: &str, relay: &str, extra: &str, services: &str) -> Gateway {
        let dir = self.t.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("control.sock");
        let config = dir.join("relay.toml");
        let text = format!(
            "[relay]\ncontrol_socket = \"{}\"\n{relay}\n{}\n{services}",
            socket.display(),
            self.etcd
                .cluster_section(name, self.t.path(), &self.kek, extra)
        );
        std::fs::write(&config, text).unwrap();
        let mut cmd = self.lan.exec(name, binary());
        cmd.arg("run").arg("--config").arg(&config);
        let relay = Relay::start_with(&mut cmd).expect("gateway starts");
        let addr = if name == "gwa" { GW_A } else { GW_B };
        Gateway {
            relay,
            name: name.into(),
            addr,
            socket,
        }
    }

    /// `relay service add --cluster` on `g`: a TLS service on `port` of every gateway.
    fn add_web(&self, g: &Gateway, name: &str, port: u16) -> Output {
        let c = self.t.pki.server();
        g.cli(&[
            "service",
            "add",
            "--cluster",
            "--name",
            name,
            "--server",
            SERVER,
            "--port",
            &port.to_string(),
            "--backend-port",
            &BACKEND.to_string(),
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--inbound-level",
            "tls",
            "--cert",
            c.cert.to_str().unwrap(),
            "--key",
            c.key.to_str().unwrap(),
        ])
    }

    /// curl through gateway `g` on `port`: the page, or why not.
    fn get(&self, g: &Gateway, port: u16) -> Result<String, String> {
        let out = self
            .lan
            .curl_tls(g.addr, port, "index.html", &self.t.pki.ca);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && body == PAGE {
            Ok(body)
        } else {
            Err(format!(
                "{}: {:?} {}",
                g.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn serves(&self, g: &Gateway, port: u16) -> bool {
        self.get(g, port).is_ok()
    }

    /// A series of `g`'s metrics (its `[relay] metrics` is 127.0.0.1:9464 in its namespace).
    fn metric(&self, g: &Gateway, series: &str) -> f64 {
        let out = self
            .lan
            .exec(&g.name, "curl")
            .args([
                "--silent",
                "--max-time",
                "5",
                "http://127.0.0.1:9464/metrics",
            ])
            .output()
            .expect("curl the metrics");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {}'s metrics:\n{text}", g.name))
    }
}

const METRICS: &str = "metrics = \"127.0.0.1:9464\"";

impl Gateway {
    fn cli(&self, args: &[&str]) -> Output {
        std::process::Command::new(binary())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run the relay CLI")
    }

    fn status(&self) -> Status {
        relay::control::call(&self.socket, &relay::control::Request::Status {})
            .expect("relay status")
    }

    fn cluster_status(&self) -> ClusterStatus {
        relay::control::call(&self.socket, &relay::control::Request::ClusterStatus {})
            .expect("relay status --cluster")
    }

    fn refused(&self) -> u64 {
        self.status().cluster.expect("a cluster member").refused
    }

    fn count(&self, needle: &str) -> usize {
        self.relay.count_logs(&[needle])
    }

    fn wait_count(&self, needle: &str, n: usize) -> bool {
        self.relay.wait_logs(&[needle], n, Duration::from_secs(20))
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_service_added_on_one_gateway_serves_on_both_and_a_bad_entry_is_refused_on_both() {
    let c = Cluster::new("cs");
    let a = c.gateway("gwa", METRICS, "");
    assert!(a.wait_count("this gateway leads", 1));
    let b = c.gateway("gwb", METRICS, "");
    assert!(
        !c.serves(&b, FRONT),
        "nothing is served before the service exists"
    );

    let written = Instant::now();
    let said = ok(&c.add_web(&a, "web", FRONT));
    assert!(said.contains("/relay-test/services/web"), "{said}");
    assert!(
        b.wait_count("cluster: service applied", 1),
        "B applied the service"
    );
    let on_b = written.elapsed();
    assert!(
        wait_until(Duration::from_secs(10), || c.serves(&b, FRONT)),
        "{:?}",
        c.get(&b, FRONT)
    );
    assert!(
        wait_until(Duration::from_secs(10), || c.serves(&a, FRONT)),
        "{:?}",
        c.get(&a, FRONT)
    );
    eprintln!("propagation: written on A → applied on B in {on_b:?}");

    // A service the gateways would refuse is refused before it is written.
    let c2 = c.t.pki.server();
    let refused = a.cli(&[
        "service",
        "add",
        "--cluster",
        "--name",
        "same-port",
        "--server",
        SERVER,
        "--port",
        "9000",
        "--backend-port",
        "9000",
        "--listen",
        "0.0.0.0:9000",
        "--inbound-level",
        "tls",
        "--cert",
        c2.cert.to_str().unwrap(),
        "--key",
        c2.key.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not written to the cluster"));

    // Bad entries written behind the relays' backs: each gateway refuses them by key, counts
    // them, and keeps serving the rest.
    let bad = r#"{"name":"bad","server":"203.0.113.20","port":9100,"backend_port":9100,
        "listen":"0.0.0.0:9100","inbound":{"level":"plain"},"outbound":{"level":"plain"}}"#;
    ok(&c.etcd.ctl(&["put", "/relay-test/services/bad", bad]));
    ok(&c
        .etcd
        .ctl(&["put", "/relay-test/services/junk", "{not json"]));
    // A file outside `[cluster] material`: whoever writes to etcd must not make a gateway
    // present another file it can read (here, the client certificate it shows etcd).
    let client = &c.t.pki.client;
    let stolen = format!(
        r#"{{"name":"stolen","server":"203.0.113.20","port":9200,"backend_port":8080,
        "listen":"0.0.0.0:9200","inbound":{{"level":"tls","cert":"{}","key":"/etc/shadow"}},
        "outbound":{{"level":"plain"}}}}"#,
        client.cert.display()
    );
    let written = ok(&c
        .etcd
        .ctl(&["put", "/relay-test/services/stolen", &stolen, "-w", "json"]));
    let last: serde_json::Value = serde_json::from_str(&written).unwrap();
    let last = last["header"]["revision"].as_i64().unwrap();
    for g in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(10), || g.refused() == 3),
            "{} refused {} entries",
            g.name,
            g.refused()
        );
        assert!(
            g.relay.has_log("/relay-test/services/bad"),
            "the key is named"
        );
        assert!(g.relay.has_log("/relay-test/services/junk"));
        assert!(g.relay.has_log("not under [cluster] material"));
        assert!(
            c.serves(g, FRONT),
            "{} still serves web: {:?}",
            g.name,
            c.get(g, FRONT)
        );
        assert_eq!(
            g.status().cluster.unwrap().services,
            vec!["web".to_string()]
        );
        assert_eq!(
            c.metric(g, "relay_cluster_changes_total{result=\"refused\"}"),
            3.0
        );
        assert_eq!(
            c.metric(g, "relay_cluster_changes_total{result=\"applied\"}"),
            1.0
        );
        assert_eq!(c.metric(g, "relay_cluster_connected"), 1.0);
        let revision = g.status().cluster.unwrap().revision;
        assert!(
            revision >= last,
            "the last entry's revision ({last}) was seen: {revision}"
        );
        assert_eq!(c.metric(g, "relay_cluster_revision"), revision as f64);
    }
    assert_eq!(c.metric(&a, "relay_cluster_leader"), 1.0);
    assert_eq!(c.metric(&b, "relay_cluster_leader"), 0.0);

    // Both members are listed and agree on the revision.
    let agreed = wait_until(Duration::from_secs(10), || {
        let s = a.cluster_status();
        s.members.len() == 2 && s.agree
    });
    let s = a.cluster_status();
    assert!(agreed, "{s:?}");
    assert_eq!(
        s.leader.as_deref(),
        Some("gwa"),
        "the first gateway up leads"
    );
    let text = ok(&b.cli(&["status", "--cluster"]));
    assert!(
        text.contains("gwa") && text.contains("gwb") && text.contains("all members serve the same"),
        "{text}"
    );

    // A gateway that refuses what the others apply (here: B has a service of that name of its
    // own) shows as a disagreement.
    ok(&b.cli(&[
        "service",
        "add",
        "--name",
        "clash",
        "--server",
        SERVER,
        "--port",
        "9300",
        "--backend-port",
        "8080",
        "--listen",
        "0.0.0.0:9300",
    ]));
    ok(&c.add_web(&a, "clash", 9301));
    assert!(
        wait_until(Duration::from_secs(10), || b.refused() == 4),
        "B refused it"
    );
    let split = wait_until(Duration::from_secs(10), || {
        let s = a.cluster_status();
        s.members.len() == 2 && !s.agree
    });
    assert!(split, "{:?}", a.cluster_status());
    assert!(ok(&a.cli(&["status", "--cluster"])).contains("DISAGREE"));
    assert!(
        wait_until(Duration::from_secs(10), || c.serves(&a, 9301)),
        "A serves it"
    );
    ok(&a.cli(&["service", "remove", "--cluster", "clash"]));
    let healed = wait_until(Duration::from_secs(10), || a.cluster_status().agree);
    assert!(
        healed,
        "agree again once the entry is gone: {:?}",
        a.cluster_status()
    );

    // A service from the cluster is removed through the cluster, not behind its back.
    let local = b.cli(&["service", "remove", "web"]);
    assert!(!local.status.success());
    assert!(String::from_utf8_lossy(&local.stderr).contains("comes from the cluster"));

    // Removed on B: both stop taking connections.
    ok(&b.cli(&["service", "remove", "--cluster", "web"]));
    for g in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(10), || !c.serves(g, FRONT)),
            "{} stopped",
            g.name
        );
        assert!(g.status().cluster.unwrap().services.is_empty());
    }
    let gone = b.cli(&["service", "remove", "--cluster", "web"]);
    assert!(!gone.status.success(), "removing it twice is an error");
}

/// `openssl s_client` through `g` with `-sess_out`/`-sess_in` `session`: whether the
/// session was new or resumed.
fn tls13(c: &Cluster, g: &Gateway, session: &Path, resume: bool) -> &'static str {
    let flag = if resume { "-sess_in" } else { "-sess_out" };
    let out = c.lan.openssl_get(
        g.addr,
        FRONT,
        &c.t.pki.ca,
        &[flag, session.to_str().unwrap()],
    );
    assert!(out.contains(PAGE.trim()), "{}: no page: {out}", g.name);
    assert!(out.contains("TLSv1.3"), "{out}");
    if out.contains("Reused, TLSv1.3") {
        "reused"
    } else if out.contains("New, TLSv1.3") {
        "new"
    } else {
        panic!("neither new nor reused: {out}")
    }
}

#[test]
fn sessions_from_one_gateway_resume_on_the_other_until_their_key_ages_out() {
    let c = Cluster::new("cr");
    // The service is in each gateway's own file: only the ticket keys come from the cluster
    // (and reach a worker that was still starting when they came).
    let pki = &c.t.pki;
    let web = relay_tests::config::service(
        "web",
        format!("0.0.0.0:{FRONT}").parse().unwrap(),
        format!("{SERVER}:{BACKEND}").parse().unwrap(),
        &relay_tests::config::inbound("tls", pki),
        &relay_tests::config::outbound("plain", pki),
    );
    let a = c.gateway_with("gwa", "", "", &web);
    assert!(a.wait_count("this gateway leads", 1));
    let b = c.gateway_with("gwb", "", "", &web);
    for g in [&a, &b] {
        assert!(
            g.wait_count("session ticket keys from the cluster", 1),
            "{} has the keys",
            g.name
        );
        assert!(wait_until(Duration::from_secs(10), || c.serves(g, FRONT)));
    }

    // Many sessions from A, each resumed on B.
    let tries = 10;
    let mut reused = 0;
    for i in 0..tries {
        let session = c.t.path().join(format!("session-{i}"));
        assert_eq!(tls13(&c, &a, &session, false), "new");
        if tls13(&c, &b, &session, true) == "reused" {
            reused += 1;
        }
    }
    eprintln!("resumption across gateways: {reused}/{tries}");
    assert_eq!(reused, tries, "every session from A resumes on B");

    // One rotation (from B: any member may rotate): the session's key is the previous one,
    // still accepted everywhere.
    let session = c.t.path().join("session-0");
    let before = (
        a.count("session ticket keys from"),
        b.count("session ticket keys from"),
    );
    ok(&b.cli(&["tickets", "rotate"]));
    assert!(a.wait_count("session ticket keys from", before.0 + 1));
    assert!(b.wait_count("session ticket keys from", before.1 + 1));
    assert_eq!(
        tls13(&c, &b, &session, true),
        "reused",
        "after one rotation"
    );
    assert_eq!(
        tls13(&c, &a, &session, true),
        "reused",
        "after one rotation"
    );

    // A second rotation: the key that sealed the session is gone on every gateway.
    ok(&a.cli(&["tickets", "rotate"]));
    assert!(a.wait_count("session ticket keys from", before.0 + 2));
    assert!(b.wait_count("session ticket keys from", before.1 + 2));
    assert_eq!(tls13(&c, &b, &session, true), "new", "two rotations later");
    assert_eq!(tls13(&c, &a, &session, true), "new", "two rotations later");

    // Nothing of the keys is in etcd in clear: the stored value opens with the gateways' KEK
    // only, and its JSON is not in it.
    let stored = c
        .etcd
        .ctl(&["get", "/relay-test/tickets", "--print-value-only"]);
    ok(&stored);
    let value = stored.stdout.strip_suffix(b"\n").unwrap_or(&stored.stdout);
    assert!(
        !value.windows(6).any(|w| w == b"secret"),
        "sealed, not JSON in clear"
    );
    let kek = relay::cluster::sealed::Kek::read(&c.kek).unwrap();
    let opened = kek
        .open(value)
        .expect("the gateways' KEK opens the stored keys");
    assert_eq!(opened.keys.len(), 2, "current and previous");
    let other = relay::cluster::sealed::Kek::parse(&[1u8; 32]).unwrap();
    assert!(other.open(value).is_err(), "another KEK does not");
}

#[test]
fn gateways_serve_while_etcd_is_down_and_take_changes_after_it_returns() {
    let mut c = Cluster::new("cf");
    let a = c.gateway("gwa", METRICS, "");
    let b = c.gateway("gwb", METRICS, "");
    ok(&c.add_web(&a, "web", FRONT));
    for g in [&a, &b] {
        assert!(g.wait_count("cluster: service applied", 1));
        assert!(wait_until(Duration::from_secs(10), || c.serves(g, FRONT)));
    }

    c.etcd.kill();
    for g in [&a, &b] {
        assert!(g.wait_count("lost etcd", 1), "{} noticed", g.name);
        assert!(!g.status().cluster.unwrap().connected);
        assert_eq!(c.metric(g, "relay_cluster_connected"), 0.0);
        assert!(
            c.serves(g, FRONT),
            "{} serves with etcd down: {:?}",
            g.name,
            c.get(g, FRONT)
        );
    }
    let refused = a.cli(&[
        "service",
        "add",
        "--cluster",
        "--name",
        "x",
        "--server",
        SERVER,
        "--port",
        "9001",
        "--backend-port",
        "9002",
        "--listen",
        "0.0.0.0:9001",
    ]);
    assert!(!refused.status.success(), "writes need etcd");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("etcd is unreachable"));

    // B restarts with etcd still down: it serves from its cache, and says so.
    drop(b);
    let b = c.launch("gwb", METRICS, "");
    assert!(b.relay.has_log("starting from the local cache"));
    assert!(b.wait_count("cluster: service applied", 1));
    assert!(
        wait_until(Duration::from_secs(10), || c.serves(&b, FRONT)),
        "{:?}",
        c.get(&b, FRONT)
    );

    // etcd returns: both reconnect, and a change made now reaches both.
    c.etcd.restart().expect("etcd restarts");
    assert!(a.wait_count("cluster: connected to etcd", 2));
    assert!(b.wait_count("cluster: connected to etcd", 1));
    ok(&c.add_web(&b, "web2", 9443));
    for g in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(10), || c.serves(g, 9443)),
            "{}: {:?}",
            g.name,
            c.get(g, 9443)
        );
        assert!(c.serves(g, FRONT));
        assert!(g.status().cluster.unwrap().connected);
    }
}

#[test]
fn when_the_leader_dies_another_gateway_takes_over_rotation_within_the_lease() {
    let c = Cluster::new("cl");
    let relay = "ticket_rotation = \"3s\"";
    let a = c.gateway("gwa", relay, "lease_ttl = \"2s\"");
    assert!(a.wait_count("this gateway leads", 1));
    let b = c.gateway("gwb", relay, "lease_ttl = \"2s\"");
    assert!(
        a.wait_count("ticket keys rotated (leader)", 1),
        "the leader rotates on schedule"
    );
    assert_eq!(b.count("this gateway leads"), 0);

    let killed = Instant::now();
    a.relay.signal(libc::SIGKILL);
    assert!(b.wait_count("this gateway leads", 1), "B took over");
    let took_over = killed.elapsed();
    // The promise is "within the lease TTL" (2 s) from when the lease stops being renewed;
    // the margin covers the renewal period and scheduling on a loaded machine.
    assert!(
        took_over < Duration::from_secs(6),
        "took over after {took_over:?}"
    );
    let rotations = b.count("ticket keys rotated (leader)");
    assert!(b.relay.wait_logs(
        &["ticket keys rotated (leader)"],
        rotations + 1,
        Duration::from_secs(10)
    ));
    eprintln!("leader killed → B leads after {took_over:?} (lease TTL 2 s)");
    let s = b.cluster_status();
    assert_eq!(s.leader.as_deref(), Some("gwb"));
    assert!(
        wait_until(Duration::from_secs(10), || b.cluster_status().members.len()
            == 1),
        "A's member key expired with its lease"
    );
    drop(a);
}

/// etcd's current revision (from a write of a marker key).
fn current_revision(c: &Cluster) -> i64 {
    let out = c
        .etcd
        .ctl(&["put", "/relay-test/marker", "x", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).expect("etcdctl json");
    v["header"]["revision"].as_i64().expect("a revision")
}

#[test]
fn a_gateway_away_while_history_was_compacted_catches_up_exactly() {
    let c = Cluster::new("cc");
    let a = c.gateway("gwa", "", "");
    let b = c.gateway("gwb", "", "");
    ok(&c.add_web(&a, "web", FRONT));
    assert!(b.wait_count("cluster: service applied", 1));
    let cached_at = b.status().cluster.unwrap().revision;
    drop(b);

    // While B is away the service set changes and etcd forgets the history B would need.
    ok(&a.cli(&["service", "remove", "--cluster", "web"]));
    ok(&c.add_web(&a, "web2", 9443));
    assert!(a.wait_count("cluster: service applied", 2));
    let now = current_revision(&c);
    ok(&c.etcd.ctl(&["compact", &now.to_string()]));

    let b = c.gateway("gwb", "", "");
    assert!(b.relay.has_log("starting from the local cache"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            b.status().cluster.unwrap().services == vec!["web2".to_string()]
        }),
        "B has exactly the cluster's services: {:?}",
        b.status().cluster
    );
    assert!(b.status().cluster.unwrap().revision > cached_at);
    assert!(wait_until(Duration::from_secs(10), || c.serves(&b, 9443)));
    assert!(
        !c.serves(&b, FRONT),
        "the service removed meanwhile is gone on B too"
    );
}

#[test]
fn a_service_from_the_cluster_is_steered_and_its_backend_port_dropped_in_transparent_mode() {
    use relay_tests::netns::{GW_CLIENT_IF, SERVER4, Topology};
    require_root();
    let t = TestDir::new();
    let topo = Topology::create("ct").expect("namespaces");
    let etcd = Etcd::start_at(&topo.srv, SERVER4, &t.pki, t.path()).expect("etcd starts");
    let www = t.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), PAGE).unwrap();
    let srv_ns = topo.srv.clone();
    let _http = HttpServer::start(
        &www,
        "::".parse().unwrap(),
        BACKEND,
        &["ip", "netns", "exec", &srv_ns],
    )
    .expect("backend");
    let kek = t.path().join("cluster.kek");
    std::fs::write(&kek, "ab".repeat(32)).unwrap();
    let pin_path = format!("/sys/fs/bpf/relay-test-{}", topo.prefix);
    let config = t.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[relay]\ncontrol_socket = \"{}\"\n[datapath]\ninterfaces = [\"{GW_CLIENT_IF}\"]\n\
             pin_path = \"{pin_path}\"\n{}",
            t.socket().display(),
            etcd.cluster_section("gw", t.path(), &kek, "")
        ),
    )
    .unwrap();
    struct Detach<'a>(&'a Topology, &'a Path);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            let _ = self
                .0
                .enter(&self.0.gw, &binary())
                .args(["detach", "--config"])
                .arg(self.1)
                .output();
        }
    }
    let _detach = Detach(&topo, &config);
    let relay = Relay::start_with(
        topo.enter(&topo.gw, &binary())
            .args(["run", "--config"])
            .arg(&config),
    )
    .expect("gateway starts");
    assert!(relay.wait_logs(&["cluster: connected to etcd"], 1, Duration::from_secs(20)));
    let fetch = || {
        topo.curl(&[
            "--max-time",
            "5",
            "--cacert",
            t.pki.ca.to_str().unwrap(),
            &format!("https://{SERVER4}/index.html"),
        ])
    };
    let direct = || {
        topo.curl(&[
            "--connect-timeout",
            "2",
            &format!("http://{SERVER4}:{BACKEND}/index.html"),
        ])
    };
    assert!(
        direct().status.success(),
        "unprotected before the service exists"
    );

    let cert = t.pki.server();
    ok(&t.cli(&[
        "service",
        "add",
        "--cluster",
        "--name",
        "shop",
        "--server",
        SERVER4,
        "--port",
        "443",
        "--backend-port",
        &BACKEND.to_string(),
        "--inbound-level",
        "tls",
        "--cert",
        cert.cert.to_str().unwrap(),
        "--key",
        cert.key.to_str().unwrap(),
    ]));
    assert!(relay.wait_logs(&["cluster: service applied"], 1, Duration::from_secs(10)));
    let page = fetch();
    assert_eq!(
        String::from_utf8_lossy(&page.stdout),
        PAGE,
        "steered through the relay: {page:?}"
    );
    assert_eq!(
        direct().status.code(),
        Some(28),
        "the backend port is dropped at the NIC"
    );

    ok(&t.cli(&["service", "remove", "--cluster", "shop"]));
    assert!(relay.wait_logs(&["cluster: service removed"], 1, Duration::from_secs(10)));
    assert!(direct().status.success(), "the drop left with the service");
    assert!(
        !fetch().status.success(),
        "no longer steered: nothing serves :443 on the server"
    );
}
