//! End to end, transparent mode: three network namespaces, the relay on the gateway with its
//! XDP and TC programs on the client-facing veth, real curl in the client namespace, Python's
//! http.server in the server namespace. Needs root; fails loudly without it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use relay_tests::{
    http::HttpServer,
    netns::{GW_CLIENT_IF, SERVER4, SERVER6, Topology, require_root},
    pki::Pki,
    relay::{Relay, binary},
};

const PAGE: &str = "protected page, served in plaintext on the backend port\n";

/// A topology with a backend on the server's port 8080 and a PKI; the relay is started per test.
struct Gateway {
    dir: tempfile::TempDir,
    pki: Pki,
    _http: HttpServer,
    pin_path: PathBuf,
    config: PathBuf,
    // Dropped last: namespaces go after the relay and the detach.
    topo: Topology,
}

impl Gateway {
    fn new(tag: &str) -> Gateway {
        require_root();
        let topo = Topology::create(tag).expect("create namespaces");
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(&dir.path().join("pki")).unwrap();
        std::fs::create_dir_all(dir.path().join("www")).unwrap();
        std::fs::write(dir.path().join("www/index.html"), PAGE).unwrap();
        let srv_ns = topo.srv.clone();
        let http = HttpServer::start(
            &dir.path().join("www"),
            "::".parse().unwrap(),
            8080,
            &["ip", "netns", "exec", &srv_ns],
        )
        .unwrap();
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/relay-test-{}", topo.prefix));
        let config = dir.path().join("relay.toml");
        Gateway {
            dir,
            pki,
            _http: http,
            pin_path,
            config,
            topo,
        }
    }

    /// Writes the relay config: one TLS→plain service per server address in `servers`.
    fn write_config(&self, xdp_mode: &str, servers: &[(&str, &str)]) {
        let c = self.pki.server();
        let mut text = format!(
            "[relay]\ncontrol_socket = \"{}/control.sock\"\nconnect_timeout = \"2s\"\n\n\
             [datapath]\ninterfaces = [\"{GW_CLIENT_IF}\"]\nxdp_mode = \"{xdp_mode}\"\npin_path = \"{}\"\n\n",
            self.dir.path().display(),
            self.pin_path.display()
        );
        for (name, server) in servers {
            text += &format!(
                "[[service]]\nname = \"{name}\"\nserver = \"{server}\"\nport = 443\nbackend_port = 8080\n\
                 [service.inbound]\nlevel = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n\
                 [service.outbound]\nlevel = \"plain\"\n\n",
                c.cert.display(),
                c.key.display()
            );
        }
        std::fs::write(&self.config, text).unwrap();
    }

    fn start_relay(&self) -> Relay {
        Relay::start_with(
            self.topo
                .enter(&self.topo.gw, &binary())
                .args(["run", "--config"])
                .arg(&self.config),
        )
        .expect("relay starts on the gateway")
    }

    /// `relay <args> --config <config>` on the gateway.
    fn relay_cli(&self, args: &[&str]) -> Output {
        self.topo
            .enter(&self.topo.gw, &binary())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// TLS request from the client to (server, 443): the steered path.
    fn fetch(&self, server: &str) -> Output {
        self.topo.curl(&[
            "--max-time",
            "10",
            "--cacert",
            self.pki.ca.to_str().unwrap(),
            &format!("https://{}/index.html", Topology::host(server)),
        ])
    }

    /// Direct plaintext request from the client to (server, 8080): must be dropped.
    fn direct(&self, server: &str) -> Output {
        self.topo.curl(&[
            "--connect-timeout",
            "2",
            &format!("http://{}:8080/index.html", Topology::host(server)),
        ])
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.relay_cli(&["status", "--json"]);
        assert!(out.status.success(), "relay status: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn counter(&self, service: &str, counter: &str) -> u64 {
        let status = self.status_json();
        status["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["service"] == service)
            .unwrap_or_else(|| panic!("no counters for {service}: {status}"))[counter]
            .as_u64()
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Pins are global (bpffs), unlike the namespaces: remove them even when a test failed.
        if self.pin_path.exists() {
            let _ = self.relay_cli(&["detach"]);
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_served(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: curl failed: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), PAGE, "{what}");
}

fn assert_dropped(out: &Output, what: &str) {
    // curl exit code 28: connect timed out (the SYN vanished), as opposed to 7 (refused).
    assert_eq!(
        out.status.code(),
        Some(28),
        "{what}: expected a timeout, got {out:?}"
    );
}

#[test]
fn steers_tls_and_drops_the_backend_port_over_ipv4_and_ipv6() {
    let gw = Gateway::new("st");
    gw.write_config("auto", &[("shop4", SERVER4), ("shop6", SERVER6)]);
    let relay = gw.start_relay();
    for server in [SERVER4, SERVER6] {
        assert_served(&gw.fetch(server), &format!("steered TLS to {server}:443"));
        assert_dropped(&gw.direct(server), &format!("direct hit on {server}:8080"));
        // The gateway itself (not client-facing) still reaches the backend port.
        let from_gw = gw
            .topo
            .exec(&gw.topo.gw, "curl")
            .args(["--silent", "--max-time", "5"])
            .arg(format!("http://{}:8080/index.html", Topology::host(server)))
            .output()
            .unwrap();
        assert_served(&from_gw, &format!("gateway to {server}:8080"));
    }
    assert!(relay.wait_logs(
        &["connection closed", "outcome=\"closed\""],
        2,
        Duration::from_secs(5)
    ));
    for service in ["shop4", "shop6"] {
        assert!(gw.counter(service, "steered") > 0, "{service} steered");
        assert!(gw.counter(service, "dropped") > 0, "{service} dropped");
    }
    let status = gw.status_json();
    assert_eq!(status["attachments"][0]["interface"], GW_CLIENT_IF);
    assert!(
        status["attachments"][0]["xdp_mode"] == "native"
            || status["attachments"][0]["xdp_mode"] == "generic"
    );
}

#[allow(dead_code)]
fn unused(_: &Path, _: Command) {}
