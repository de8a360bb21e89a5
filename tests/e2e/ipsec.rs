//! IPsec ESP as a level, end to end: three network namespaces, a strongSwan charon in each
//! namespace that needs one (the gateway's driven by the relay over VICI, the backend's and
//! the client's loaded by the test), real curl and a rustls client in the client namespace,
//! tshark on the gateway's server-facing link. Needs root; fails loudly without it.
//!
//! ```text
//!  cli  192.0.2.2 ── gw 192.0.2.1 (relay: explicit listeners; or XDP on gw-cli)
//!                    gw 198.51.100.1 ── srv 198.51.100.10 (IPsec only)
//!
//! The plain service's backend is in the client namespace: the backend's charon routes all
//! its traffic toward the gateway into its tunnel, so a second address there would not do.
//! ```

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use relay::control::{ServiceInfo, Status};
use relay_tests::{
    backend::Backend,
    charon::{Charon, Conn},
    client::{self, ClientLevel},
    http::HttpServer,
    netns::{GW_CLIENT_IF, Topology, in_ns, require_root},
    pki::{CertFiles, Pki},
    relay::{Relay, cli_on_gateway, start_on_gateway},
    wait_until,
};

const PAGE: &str = "served over ESP\n";
/// The backend host every `ipsec` service reaches, and the host a plain service reaches.
const SRV: &str = "198.51.100.10";
const PLAIN: &str = "192.0.2.2";
/// The gateway's client-facing address, where explicit services listen.
const GW: &str = "192.0.2.1";

/// The namespaces, the PKI, the backends; charons and the relay are started per test.
struct Site {
    dir: tempfile::TempDir,
    pki: Pki,
    /// The backend's IKE certificate: `srv.test`, from the CA the gateway trusts (`pki.ca`).
    srv_cert: CertFiles,
    _http: HttpServer,
    _plain_http: HttpServer,
    data: Backend,
    pin_path: PathBuf,
    config: PathBuf,
    // Dropped last: the namespaces go after every process in them.
    topo: Topology,
}

impl Site {
    fn new(tag: &str) -> Site {
        require_root();
        let topo = Topology::create(tag).expect("create namespaces");
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(&dir.path().join("pki")).unwrap();
        let srv_cert = pki.server_for("ike-srv", &["srv.test"]).unwrap();
        std::fs::create_dir_all(dir.path().join("www")).unwrap();
        std::fs::write(dir.path().join("www/index.html"), PAGE).unwrap();
        let http = HttpServer::start(
            &dir.path().join("www"),
            "0.0.0.0".parse().unwrap(),
            8080,
            &["ip", "netns", "exec", &topo.srv],
        )
        .unwrap();
        let plain_http = HttpServer::start(
            &dir.path().join("www"),
            PLAIN.parse().unwrap(),
            8080,
            &["ip", "netns", "exec", &topo.cli],
        )
        .unwrap();
        let listener = in_ns(&topo.srv, || {
            std::net::TcpListener::bind((SRV, 9000)).expect("data backend listens in srv")
        });
        let data = Backend::serve_on(listener, None).unwrap();
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/relay-test-{}", topo.prefix));
        let config = dir.path().join("relay.toml");
        Site {
            dir,
            pki,
            srv_cert,
            _http: http,
            _plain_http: plain_http,
            data,
            pin_path,
            config,
            topo,
        }
    }

    /// charon in `ns`, its files under `<dir>/<name>`.
    fn charon(&self, ns: &str, name: &str) -> Charon {
        Charon::start(ns, &self.dir.path().join(name)).expect("charon starts")
    }

    /// The backend's charon: answers any peer whose certificate `ca` signed, for TCP to
    /// itself, proving `id` with `cert`.
    fn backend_charon(&self, cert: &CertFiles, id: &str, ca: &Path) -> Charon {
        let charon = self.charon(&self.topo.srv, "charon-srv");
        load_backend(&charon, cert, id, ca);
        charon
    }

    /// The relay config: `web` (tls → ipsec, HTTP on 8080) and `data` (tls → ipsec, the data
    /// backend on 9000) toward SRV; `plain` (tls → plain) toward PLAIN.
    fn write_config(&self, gw_charon: &Path, identity: &str) {
        let (server, client) = (self.pki.server(), &self.pki.client);
        let mut text = format!(
            "[relay]\ncontrol_socket = \"{dir}/control.sock\"\nconnect_timeout = \"3s\"\n\
             metrics = \"127.0.0.1:9464\"\n\n\
             [ipsec]\nvici = \"{vici}\"\n\n",
            dir = self.dir.path().display(),
            vici = gw_charon.join("charon.vici").display(),
        );
        for (name, port, backend, level) in [
            ("web", 443, format!("{SRV}:8080"), "ipsec"),
            ("data", 444, format!("{SRV}:9000"), "ipsec"),
            ("plain", 445, format!("{PLAIN}:8080"), "plain"),
        ] {
            let server_ip = backend.split(':').next().unwrap().to_string();
            text += &format!(
                "[[service]]\nname = \"{name}\"\nserver = \"{server_ip}\"\nport = {port}\n\
                 backend_port = {}\nlisten = \"{GW}:{port}\"\n\
                 [service.inbound]\nlevel = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n\
                 [service.outbound]\nlevel = \"{level}\"\n",
                backend.rsplit(':').next().unwrap(),
                server.cert.display(),
                server.key.display(),
            );
            if level == "ipsec" {
                text += &format!(
                    "cert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nidentity = \"{identity}\"\n",
                    client.cert.display(),
                    client.key.display(),
                    self.pki.ca.display(),
                );
            }
            text += "\n";
        }
        std::fs::write(&self.config, text).unwrap();
    }

    fn start_relay(&self) -> Relay {
        start_on_gateway(&self.topo, &self.config)
    }

    fn relay_cli(&self, args: &[&str]) -> Output {
        cli_on_gateway(&self.topo, &self.config, args)
    }

    fn status(&self) -> Status {
        let out = self.relay_cli(&["status", "--json"]);
        assert!(out.status.success(), "relay status: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn sa(&self, service: &str) -> relay::ipsec::SaInfo {
        let status = self.status();
        let info: &ServiceInfo = status
            .services
            .iter()
            .find(|s| s.name == service)
            .unwrap_or_else(|| panic!("no service {service}"));
        info.ipsec.clone().unwrap_or_default()
    }

    fn outcome(&self, service: &str, outcome: &str) -> u64 {
        self.status()
            .connections
            .unwrap_or_default()
            .iter()
            .find(|c| c.service == service)
            .and_then(|c| c.outcomes.get(outcome).copied())
            .unwrap_or(0)
    }

    /// Waits until `service`'s SA is reported up (or `up = false`: down).
    fn wait_sa(&self, service: &str, up: bool, limit: Duration) {
        let ok = wait_until(limit, || self.sa(service).up == up);
        assert!(
            ok,
            "{service}: SA never {}: {:?}",
            if up { "up" } else { "down" },
            self.sa(service)
        );
    }

    /// curl from the client to service port `port` on the gateway.
    fn curl(&self, port: u16) -> Output {
        self.topo.curl(&[
            "--max-time",
            "10",
            "--cacert",
            self.pki.ca.to_str().unwrap(),
            "--resolve",
            &format!("localhost:{port}:{GW}"),
            &format!("https://localhost:{port}/index.html"),
        ])
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if self.pin_path.exists() {
            let _ = self.relay_cli(&["detach"]);
        }
    }
}

fn load_backend(charon: &Charon, cert: &CertFiles, id: &str, ca: &Path) {
    let conf = Conn {
        name: "gw",
        local_addrs: SRV,
        remote_addrs: "%any",
        cert: &cert.cert,
        id,
        remote_id: "%any",
        cacert: ca,
        local_ts: &format!("{SRV}/32[tcp]"),
        remote_ts: "0.0.0.0/0[tcp]",
    };
    charon
        .load(&conf.render(), &cert.key)
        .expect("backend conf loads");
}

/// Whether charon lists the `web` service's CHILD_SA as installed.
fn installed(charon: &Charon) -> bool {
    let out = charon.swanctl(&["--list-sas"]).expect("swanctl --list-sas");
    text(&out.stdout)
        .lines()
        .any(|l| l.contains("relay-out-web:") && l.contains("INSTALLED"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_served(out: &Output, what: &str) {
    assert!(
        out.status.success() && text(&out.stdout) == PAGE,
        "{what}: expected the page, got {:?} / {}",
        out.status,
        text(&out.stderr)
    );
}

/// tshark on an interface of a namespace, writing to a file; ready when it says it captures.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &str, interface: &str, file: PathBuf) -> Capture {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tshark", "-i", interface, "-s", "128", "-w",
            ])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tshark (apt install tshark: `cargo xtask setup`)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("Capturing on") => break,
                Some(Ok(l)) => seen.push(l),
                _ => panic!("tshark did not start capturing: {seen:?}"),
            }
        }
        // Keep draining its stderr so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Capture { child, file }
    }

    /// Stops the capture (SIGINT, so that the file is complete) and counts the packets each
    /// display filter matches.
    fn stop_and_count(mut self, filters: &[&str]) -> Vec<usize> {
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        filters
            .iter()
            .map(|f| {
                let out = Command::new("tshark")
                    .arg("-r")
                    .arg(&self.file)
                    .args(["-Y", f, "-T", "fields", "-e", "frame.number"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "tshark -r: {}", text(&out.stderr));
                text(&out.stdout).lines().count()
            })
            .collect()
    }
}

/// A TLS connection from the client namespace to the gateway's `port`.
async fn connect_from_client(site: &Site, port: u16) -> Box<dyn client::Stream> {
    let tcp = in_ns(&site.topo.cli, || {
        std::net::TcpStream::connect((GW, port)).expect("connect from the client namespace")
    });
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    client::over(tcp, &ClientLevel::Tls { ca: &site.pki.ca }, "localhost")
        .await
        .expect("TLS to the relay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_ipsec_carries_only_esp_on_the_server_link() {
    let site = Site::new("esp");
    let _srv = site.backend_charon(&site.srv_cert, "srv.test", &site.pki.client_ca);
    let gw = site.charon(&site.topo.gw, "charon-gw");
    site.write_config(&gw.dir, "srv.test");
    let _relay = site.start_relay();
    site.wait_sa("web", true, Duration::from_secs(20));
    site.wait_sa("data", true, Duration::from_secs(20));

    let capture = Capture::start(
        &site.topo.gw,
        "gw-srv",
        site.dir.path().join("srv-link.pcap"),
    );
    assert_served(&site.curl(443), "curl over tls → ipsec");
    // 64 MiB each way, each direction half-closed by its sender first.
    const SIZE: u64 = 64 << 20;
    let up = connect_from_client(&site, 444).await;
    client::sink_stream(up, SIZE, 21)
        .await
        .expect("64 MiB up, intact");
    let down = connect_from_client(&site, 444).await;
    client::source_stream(down, SIZE, 22)
        .await
        .expect("64 MiB down, intact");
    let counts = capture.stop_and_count(&["tcp", "esp"]);
    assert_eq!(counts[0], 0, "no TCP in clear on the server link");
    // 128 MiB in ESP packets of at most 1500 bytes.
    assert!(counts[1] > 90_000, "the bytes went as ESP: {counts:?}");

    let web = site.sa("web");
    assert!(web.up && web.failures == 0, "{web:?}");
    assert_eq!(web.identity, "srv.test", "{web:?}");
    assert!(site.data.served.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    // The same from the metrics endpoint.
    let metrics = site
        .topo
        .exec(&site.topo.gw, "curl")
        .args(["-s", "http://127.0.0.1:9464/metrics"])
        .output()
        .unwrap();
    let metrics = text(&metrics.stdout);
    assert!(
        metrics.contains("relay_ipsec_sa_up{service=\"web\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_with_the_wrong_identity_or_from_another_ca_gets_nothing() {
    let site = Site::new("ike");
    // The backend proves `other.test`, from the right CA; the gateway wants `srv.test`.
    let other = site.pki.server_for("ike-other", &["other.test"]).unwrap();
    let mut srv = site.backend_charon(&other, "other.test", &site.pki.client_ca);
    let gw = site.charon(&site.topo.gw, "charon-gw");
    site.write_config(&gw.dir, "srv.test");
    let relay = site.start_relay();
    let failed = wait_until(Duration::from_secs(20), || site.sa("web").failures >= 1);
    let web = site.sa("web");
    assert!(failed && !web.up, "no SA with the wrong identity: {web:?}");
    assert!(!site.curl(443).status.success(), "the client is refused");
    assert!(site.outcome("web", "ipsec_unavailable") >= 1);
    assert!(relay.has_log("SA not established"), "the relay says why");

    // `srv.test`, but from a CA the gateway does not trust.
    let foreign = Pki::generate(&site.dir.path().join("foreign")).unwrap();
    let forged = foreign.server_for("ike-forged", &["srv.test"]).unwrap();
    srv.kill();
    drop(srv);
    let srv = site.backend_charon(&forged, "srv.test", &site.pki.client_ca);
    let before = site.sa("web").failures;
    let failed = wait_until(Duration::from_secs(30), || site.sa("web").failures > before);
    let web = site.sa("web");
    assert!(failed && !web.up, "no SA with an untrusted CA: {web:?}");
    let refused = site.outcome("web", "ipsec_unavailable");
    assert!(!site.curl(443).status.success(), "the client is refused");
    assert_eq!(site.outcome("web", "ipsec_unavailable"), refused + 1);
    assert!(
        srv.log().contains("received AUTHENTICATION_FAILED")
            || gw.log().contains("no trusted")
            || gw.log().contains("constraint"),
        "charon tells the certificate was refused"
    );
    drop(srv);

    // The right certificate: the relay's retries bring the SA up, and the client is served.
    let _srv = site.backend_charon(&site.srv_cert, "srv.test", &site.pki.client_ca);
    site.wait_sa("web", true, Duration::from_secs(30));
    assert_served(&site.curl(443), "served once the backend proves srv.test");

    assert!(
        installed(&gw),
        "charon lists the CHILD_SA (so that its absence below means it)"
    );
    // The operator now wants another identity: the SA authenticated as srv.test is not
    // trusted a moment longer, though it is up and its peer still answers.
    site.write_config(&gw.dir, "db.test");
    let out = site.relay_cli(&["reload"]);
    assert!(out.status.success(), "reload: {}", text(&out.stderr));
    let down = wait_until(Duration::from_secs(10), || {
        let web = site.sa("web");
        !web.up && web.identity == "db.test"
    });
    assert!(down, "the old SA is not trusted: {:?}", site.sa("web"));
    let refused = site.outcome("web", "ipsec_unavailable");
    assert!(!site.curl(443).status.success(), "the client is refused");
    assert_eq!(site.outcome("web", "ipsec_unavailable"), refused + 1);
    assert!(!installed(&gw), "charon ended the old CHILD_SA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charon_gone_fails_closed_and_back_serves_again() {
    let site = Site::new("gone");
    let _srv = site.backend_charon(&site.srv_cert, "srv.test", &site.pki.client_ca);
    let mut gw = site.charon(&site.topo.gw, "charon-gw");
    site.write_config(&gw.dir, "srv.test");
    let relay = site.start_relay();
    site.wait_sa("web", true, Duration::from_secs(20));
    assert_served(&site.curl(443), "ipsec service");
    assert_served(&site.curl(445), "plain service");

    gw.kill();
    site.wait_sa("web", false, Duration::from_secs(10));
    let capture = Capture::start(&site.topo.gw, "gw-srv", site.dir.path().join("gone.pcap"));
    let refused = site.outcome("web", "ipsec_unavailable");
    assert!(!site.curl(443).status.success(), "ipsec service refuses");
    assert_eq!(site.outcome("web", "ipsec_unavailable"), refused + 1);
    assert_served(&site.curl(445), "plain service keeps working");
    // From the attacker's side of the guard: anything on the gateway that connects to the
    // backend in clear (not only the relay) is refused by the fail-closed route at once.
    let direct = site
        .topo
        .exec(&site.topo.gw, "curl")
        .args(["-s", "--max-time", "5", &format!("http://{SRV}:8080/")])
        .output()
        .unwrap();
    assert!(
        !direct.status.success(),
        "a cleartext connection from the gateway is refused"
    );
    let counts = capture.stop_and_count(&[&format!("ip.dst == {SRV} && tcp")]);
    assert_eq!(counts[0], 0, "nothing went to the ipsec backend in clear");
    assert!(relay.has_log("ipsec services refuse connections"));

    let gw = site.charon(&site.topo.gw, "charon-gw");
    site.wait_sa("web", true, Duration::from_secs(30));
    assert_served(&site.curl(443), "served again once charon is back");
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_requires_esp_gets_only_ipsec_through_the_gateway() {
    let site = Site::new("req");
    std::fs::write(
        &site.config,
        format!(
            "[relay]\ncontrol_socket = \"{}/control.sock\"\n\n\
             [datapath]\ninterfaces = [\"{GW_CLIENT_IF}\"]\nxdp_mode = \"generic\"\npin_path = \"{}\"\n\n\
             [[server]]\naddress = \"{SRV}\"\nrequire = \"esp\"\n",
            site.dir.path().display(),
            site.pin_path.display()
        ),
    )
    .unwrap();
    let _relay = site.start_relay();
    let slot = format!("esp:{SRV}");
    let counter = |name: &str| {
        let d = site.status().datapath.expect("a data path");
        let c = d
            .counters
            .iter()
            .find(|c| c.service == slot)
            .unwrap_or_else(|| panic!("no counters for {slot}: {d:?}"))
            .clone();
        match name {
            "dropped" => c.dropped,
            "passed" => c.passed,
            _ => unreachable!(),
        }
    };
    // Plaintext TCP and UDP from the client side never reach the server.
    let out = site.topo.curl(&[
        "--connect-timeout",
        "2",
        &format!("http://{SRV}:8080/index.html"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(28),
        "plaintext TCP is dropped: {}",
        text(&out.stderr)
    );
    let dropped = counter("dropped");
    assert!(dropped >= 1, "counted");
    run(site.topo.exec(&site.topo.cli, "python3").args([
        "-c",
        &format!(
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{SRV}', 53))"
        ),
    ]));
    assert!(
        wait_until(Duration::from_secs(5), || counter("dropped") == dropped + 1),
        "the UDP datagram is dropped and counted once"
    );

    // An end-to-end IPsec pair through the gateway: IKE and ESP pass, the page arrives.
    let _srv = site.backend_charon(&site.srv_cert, "srv.test", &site.pki.client_ca);
    let cli = site.charon(&site.topo.cli, "charon-cli");
    let conf = Conn {
        name: "srv",
        local_addrs: "192.0.2.2",
        remote_addrs: SRV,
        cert: &site.pki.client.cert,
        id: "client.test",
        remote_id: "srv.test",
        cacert: &site.pki.ca,
        local_ts: "192.0.2.2/32[tcp]",
        remote_ts: &format!("{SRV}/32[tcp/8080]"),
    };
    cli.load(&conf.render(), &site.pki.client.key).unwrap();
    let passed = counter("passed");
    cli.initiate("srv").expect("IKE passes the gateway");
    let out = site
        .topo
        .curl(&["--max-time", "10", &format!("http://{SRV}:8080/index.html")]);
    assert_served(&out, "the page over the client's own SA");
    assert!(counter("passed") > passed, "IKE and ESP counted as passed");
    assert_eq!(
        counter("dropped"),
        dropped + 1,
        "nothing of the IPsec pair was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipsec_clients_are_known_by_their_ike_identity() {
    let site = Site::new("in");
    let gw = site.charon(&site.topo.gw, "charon-gw");
    let (server, pki) = (site.pki.server(), &site.pki);
    std::fs::write(
        &site.config,
        format!(
            "[relay]\ncontrol_socket = \"{dir}/control.sock\"\n\n\
             [ipsec]\nvici = \"{vici}\"\n\n\
             [[service]]\nname = \"app\"\nserver = \"{SRV}\"\nport = 8000\nbackend_port = 8080\n\
             listen = \"{GW}:8000\"\n\
             [service.inbound]\nlevel = \"ipsec\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             client_ca = \"{ca}\"\nallow = [\"dns:client.test\"]\n\
             [service.outbound]\nlevel = \"plain\"\n",
            dir = site.dir.path().display(),
            vici = gw.vici.display(),
            cert = server.cert.display(),
            key = server.key.display(),
            ca = pki.client_ca.display(),
        ),
    )
    .unwrap();
    let relay = site.start_relay();
    let clients = || {
        site.status().services[0]
            .ipsec_clients
            .clone()
            .unwrap_or_default()
    };
    let loaded = wait_until(Duration::from_secs(20), || clients().loaded);
    assert!(
        loaded,
        "the responder connection is loaded: {:?}",
        clients()
    );
    let fetch = || {
        site.topo.curl(&[
            "--connect-timeout",
            "3",
            "--max-time",
            "10",
            &format!("http://{GW}:8000/index.html"),
        ])
    };

    // A client without an SA does not even complete the TCP handshake, though its address and
    // port are right: the listener's SYN-ACK may leave only through an SA.
    let out = fetch();
    assert_eq!(
        out.status.code(),
        Some(28),
        "plaintext client: {}",
        text(&out.stderr)
    );
    assert_eq!(
        site.outcome("app", "denied"),
        0,
        "nothing reached the worker"
    );

    // Over its own SA, the client is served and known by the identity it proved.
    let client_conf = |cert: &CertFiles, id: &str| {
        Conn {
            name: "gw",
            local_addrs: "192.0.2.2",
            remote_addrs: GW,
            cert: &cert.cert,
            id,
            remote_id: "CN=localhost",
            cacert: &pki.ca,
            local_ts: "192.0.2.2/32[tcp]",
            remote_ts: &format!("{GW}/32[tcp/8000]"),
        }
        .render()
    };
    let cli = site.charon(&site.topo.cli, "charon-cli");
    cli.load(&client_conf(&pki.client, "client.test"), &pki.client.key)
        .unwrap();
    cli.initiate("gw")
        .expect("the client's SA with the gateway");
    assert_served(&fetch(), "ipsec → plain");
    assert!(
        relay.has_log("identity=client.test"),
        "logged by its IKE identity"
    );

    // A certificate from the same CA for another name: its SA comes up, `allow` refuses it.
    let swanctl = cli.swanctl(&["--terminate", "--ike", "gw"]).unwrap();
    assert!(swanctl.status.success(), "{}", text(&swanctl.stdout));
    let gone = wait_until(Duration::from_secs(10), || clients().clients.is_empty());
    assert!(gone, "the gateway saw the SA go: {:?}", clients());
    let intruder = pki
        .client_with(
            "intruder",
            &relay_tests::pki::Names {
                cn: Some("intruder.test"),
                dns: &["intruder.test"],
                uris: &[],
            },
            77,
        )
        .unwrap();
    cli.load(&client_conf(&intruder, "intruder.test"), &intruder.key)
        .unwrap();
    cli.initiate("gw").expect("the intruder's SA comes up");
    let seen = wait_until(Duration::from_secs(10), || {
        clients().clients == ["intruder.test".to_string()]
    });
    assert!(seen, "{:?}", clients());
    assert!(
        !fetch().status.success(),
        "an identity no rule allows is refused"
    );
    assert_eq!(site.outcome("app", "denied"), 1);
    assert!(relay.has_log("\"intruder.test\" matches no allow rule"));
    drop(gw);
}
