//! End to end, transparent mode: three network namespaces, the relay on the gateway with its
//! XDP and TC programs on the client-facing veth, real curl in the client namespace, Python's
//! http.server in the server namespace. Needs root; fails loudly without it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

// Every test here builds its own namespaces and pin directory, so they run in parallel.

use relay::control::DatapathStatus;
use relay_tests::{
    http::HttpServer,
    netns::{CLIENT4, CLIENT6, GW_CLIENT_IF, SERVER4, SERVER6, Topology, require_root},
    pebble::{Pebble, Place},
    pki::Pki,
    relay::{Relay, binary, cli_on_gateway, start_on_gateway},
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
        self.write_services(xdp_mode, servers, 8080, "");
    }

    /// Like `write_config`, with another backend port and more `[service.outbound]` lines.
    fn write_services(
        &self,
        xdp_mode: &str,
        servers: &[(&str, &str)],
        backend_port: u16,
        outbound_extra: &str,
    ) {
        let c = self.pki.server();
        let mut text = format!(
            "[relay]\ncontrol_socket = \"{}/control.sock\"\nconnect_timeout = \"2s\"\nmetrics = \"127.0.0.1:9464\"\n\n\
             [datapath]\ninterfaces = [\"{GW_CLIENT_IF}\"]\nxdp_mode = \"{xdp_mode}\"\npin_path = \"{}\"\n\n",
            self.dir.path().display(),
            self.pin_path.display()
        );
        for (name, server) in servers {
            text += &format!(
                "[[service]]\nname = \"{name}\"\nserver = \"{server}\"\nport = 443\nbackend_port = {backend_port}\n\
                 [service.inbound]\nlevel = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n\
                 [service.outbound]\nlevel = \"plain\"\n{outbound_extra}\n",
                c.cert.display(),
                c.key.display()
            );
        }
        std::fs::write(&self.config, text).unwrap();
    }

    fn start_relay(&self) -> Relay {
        start_on_gateway(&self.topo, &self.config)
    }

    /// `relay <args> --config <config>` on the gateway.
    fn relay_cli(&self, args: &[&str]) -> Output {
        cli_on_gateway(&self.topo, &self.config, args)
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

    /// The data path as `relay status --json` reports it (the relay running or not).
    fn datapath(&self) -> DatapathStatus {
        #[derive(serde::Deserialize)]
        struct Reported {
            datapath: Option<DatapathStatus>,
        }
        let out = self.relay_cli(&["status", "--json"]);
        assert!(out.status.success(), "relay status: {}", text(&out.stderr));
        let reported: Reported = serde_json::from_slice(&out.stdout).unwrap();
        reported.datapath.expect("a data path")
    }

    fn counter(&self, service: &str, counter: &str) -> u64 {
        let d = self.datapath();
        let c = d
            .counters
            .iter()
            .find(|c| c.service == service)
            .unwrap_or_else(|| panic!("no counters for {service}: {d:?}"));
        match counter {
            "steered" => c.steered,
            "dropped" => c.dropped,
            "passed" => c.passed,
            "malformed" => c.malformed,
            "no_listener" => c.no_listener,
            other => panic!("no counter {other}"),
        }
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
    let attachment = &gw.datapath().attachments[0];
    assert_eq!(attachment.interface, GW_CLIENT_IF);
    assert!(["native", "generic"].contains(&attachment.xdp_mode.as_str()));
}

#[test]
fn acme_validates_through_the_steered_front_port() {
    // pebble sits on the client side, as a public CA does: its tls-alpn-01 connection to
    // shop.test (the server's address) port 443 is steered into the relay like any client's.
    let gw = Gateway::new("acme");
    let place = Place {
        wrap: ["ip", "netns", "exec", &gw.topo.cli]
            .map(String::from)
            .to_vec(),
        ip: CLIENT4.parse().unwrap(),
        names_to: SERVER4.parse().unwrap(),
    };
    let pebble_dir = gw.dir.path().join("pebble");
    let mut pebble = Pebble::at(place, &pebble_dir, &gw.pki, 443, 80).unwrap();
    pebble.start().unwrap();
    let text = format!(
        "[relay]\ncontrol_socket = \"{dir}/control.sock\"\n\n\
         [datapath]\ninterfaces = [\"{GW_CLIENT_IF}\"]\npin_path = \"{pins}\"\n\n\
         [acme]\ndirectory = \"{directory}\"\nca = \"{ca}\"\nstorage = \"{dir}/acme\"\n\n\
         [[service]]\nname = \"shop\"\nserver = \"{SERVER4}\"\nport = 443\nbackend_port = 8080\n\
         [service.inbound]\nlevel = \"tls\"\ncert = \"acme\"\nnames = [\"shop.test\"]\n\
         [service.outbound]\nlevel = \"plain\"\n",
        dir = gw.dir.path().display(),
        pins = gw.pin_path.display(),
        directory = pebble.directory(),
        ca = pebble.ca.display(),
    );
    std::fs::write(&gw.config, text).unwrap();
    let relay = gw.start_relay();
    assert!(
        relay.wait_logs(&["changed files applied"], 1, Duration::from_secs(60)),
        "no certificate from pebble:\n{}\n{}",
        relay.logs().join("\n"),
        pebble.log()
    );
    assert!(relay.has_log("outcome=\"acme_validation\""));
    let root = pebble.root().unwrap();
    let out = gw.topo.curl(&[
        "--max-time",
        "10",
        "--cacert",
        root.to_str().unwrap(),
        "--resolve",
        &format!("shop.test:443:{SERVER4}"),
        "https://shop.test/index.html",
    ]);
    assert_served(&out, "shop.test with pebble's certificate");
    assert_dropped(&gw.direct(SERVER4), "direct hit on the backend port");
    assert!(gw.counter("shop", "steered") > 0);
}

/// `ip netns exec <gw> bpftool net show dev gw-cli`: the XDP program on the client side
/// (`driver id N` or `generic id N`). Debian 12's bpftool predates tcx, so TC attachments are
/// checked through their links instead ([`link_id`], [`link_exists`]).
fn attached(gw: &Gateway) -> String {
    let out = gw
        .topo
        .exec(&gw.topo.gw, "bpftool")
        .args(["net", "show", "dev", GW_CLIENT_IF])
        .output()
        .expect("bpftool is installed (`cargo xtask setup`)");
    assert!(out.status.success(), "bpftool: {}", text(&out.stderr));
    text(&out.stdout)
}

fn link_exists(id: &str) -> bool {
    Command::new("bpftool")
        .args(["link", "show", "id", id])
        .output()
        .unwrap()
        .status
        .success()
}

/// The id of a pinned link (`bpftool link show pinned PATH`).
fn link_id(pin: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool link show pinned {}: {}",
        pin.display(),
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["id"].to_string()
}

fn xdp_pin(gw: &Gateway) -> PathBuf {
    let mode = gw.datapath().attachments[0].xdp_mode.clone();
    gw.pin_path.join(format!("xdp_{mode}_{GW_CLIENT_IF}"))
}

#[test]
fn native_and_generic_xdp_modes_are_used_and_reported() {
    for mode in ["native", "generic"] {
        let gw = Gateway::new(&mode[..3]);
        gw.write_config(mode, &[("shop4", SERVER4)]);
        let relay = gw.start_relay();
        assert!(
            relay.has_log(&format!("xdp_mode={mode}")),
            "{}",
            relay.logs().join("\n")
        );
        assert_eq!(gw.datapath().attachments[0].xdp_mode, mode);
        let on_nic = attached(&gw);
        let expected = if mode == "native" {
            "driver id"
        } else {
            "generic id"
        };
        assert!(on_nic.contains(expected), "{mode}: {on_nic}");
        assert!(link_exists(&link_id(
            &gw.pin_path.join(format!("tc_{GW_CLIENT_IF}"))
        )));
        assert_served(&gw.fetch(SERVER4), mode);
        assert_dropped(&gw.direct(SERVER4), mode);
    }
}

#[test]
fn restart_keeps_the_drop_and_fails_closed_meanwhile() {
    let gw = Gateway::new("rs");
    gw.write_config("auto", &[("shop4", SERVER4)]);
    let mut relay = gw.start_relay();
    assert_served(&gw.fetch(SERVER4), "before the restart");
    let xdp_link = link_id(&xdp_pin(&gw));
    let status = relay
        .terminate(Duration::from_secs(10))
        .expect("relay stops");
    assert!(status.success());
    assert!(relay.has_log("data path stays attached"));

    // Relay down: the backend port stays dropped, the front port answers nothing.
    let dropped = gw.counter("shop4", "dropped");
    assert_dropped(&gw.direct(SERVER4), "backend port while the relay is down");
    assert!(
        gw.counter("shop4", "dropped") > dropped,
        "drops counted while down"
    );
    let refused = gw.topo.curl(&[
        "--connect-timeout",
        "2",
        "--cacert",
        gw.pki.ca.to_str().unwrap(),
        &format!("https://{SERVER4}/"),
    ]);
    assert_dropped(
        &refused,
        "front port while the relay is down (steered SYNs dropped)",
    );
    assert!(gw.counter("shop4", "no_listener") > 0);
    assert!(attached(&gw).contains(" id "), "XDP still attached");
    assert!(
        link_exists(&link_id(&gw.pin_path.join(format!("tc_{GW_CLIENT_IF}")))),
        "TC still attached"
    );

    // Restarted: same link, counters kept, service back.
    let _relay = gw.start_relay();
    assert_eq!(
        link_id(&xdp_pin(&gw)),
        xdp_link,
        "the pinned XDP link is taken over, not re-created"
    );
    assert!(
        gw.counter("shop4", "dropped") > dropped,
        "counters survive the restart"
    );
    assert_served(&gw.fetch(SERVER4), "after the restart");
}

#[test]
fn services_change_by_map_updates_without_reattaching() {
    let gw = Gateway::new("sv");
    gw.write_config("auto", &[("shop4", SERVER4)]);
    let mut relay = gw.start_relay();
    let pin = xdp_pin(&gw);
    let link = link_id(&pin);
    let tc_link = link_id(&gw.pin_path.join(format!("tc_{GW_CLIENT_IF}")));
    // Not yet a service: the IPv6 server's backend port is open, its port 443 has no listener.
    let open6 = gw.topo.curl(&[
        "--max-time",
        "5",
        &format!("http://[{SERVER6}]:8080/index.html"),
    ]);
    assert_served(&open6, "IPv6 backend port before it is protected");

    // Add shop6.
    relay.terminate(Duration::from_secs(10));
    gw.write_config("auto", &[("shop4", SERVER4), ("shop6", SERVER6)]);
    relay = gw.start_relay();
    assert_served(&gw.fetch(SERVER6), "added service is steered");
    assert_dropped(
        &gw.direct(SERVER6),
        "added service's backend port is dropped",
    );

    // Remove shop4.
    relay.terminate(Duration::from_secs(10));
    gw.write_config("auto", &[("shop6", SERVER6)]);
    let _relay = gw.start_relay();
    let open4 = gw.topo.curl(&[
        "--max-time",
        "5",
        &format!("http://{SERVER4}:8080/index.html"),
    ]);
    assert_served(
        &open4,
        "removed service's backend port is no longer dropped",
    );
    let not_steered = gw.topo.curl(&[
        "--max-time",
        "5",
        "--cacert",
        gw.pki.ca.to_str().unwrap(),
        &format!("https://{SERVER4}/"),
    ]);
    assert_eq!(
        not_steered.status.code(),
        Some(7),
        "removed service's port 443 reaches the server itself (nothing listens)"
    );
    assert_served(&gw.fetch(SERVER6), "remaining service");

    assert_eq!(link_id(&pin), link, "XDP link unchanged");
    assert_eq!(
        link_id(&gw.pin_path.join(format!("tc_{GW_CLIENT_IF}"))),
        tc_link,
        "TC link unchanged"
    );
    let names: Vec<String> = gw
        .datapath()
        .counters
        .iter()
        .map(|c| c.service.clone())
        .collect();
    assert!(
        names.contains(&"shop6".to_string()) && !names.contains(&"shop4".to_string()),
        "{names:?}"
    );
}

#[test]
fn detach_removes_everything_it_created_and_nothing_else() {
    let gw = Gateway::new("dt");
    gw.write_config("auto", &[("shop4", SERVER4), ("shop6", SERVER6)]);
    // Something of the operator's in the same places: must survive the detach.
    let gw_ns = gw.topo.gw.clone();
    let keep_rule = [
        "-n", &gw_ns, "rule", "add", "fwmark", "0x1", "lookup", "100",
    ];
    assert!(
        Command::new("ip")
            .args(keep_rule)
            .status()
            .unwrap()
            .success()
    );
    let mut relay = gw.start_relay();
    assert_served(&gw.fetch(SERVER4), "attached");
    let links = [
        link_id(&xdp_pin(&gw)),
        link_id(&gw.pin_path.join(format!("tc_{GW_CLIENT_IF}"))),
    ];
    relay.terminate(Duration::from_secs(10));
    let route_table = "24090";
    let rules = |family: &str| {
        text(
            &Command::new("ip")
                .args([family, "-n", &gw_ns, "rule"])
                .output()
                .unwrap()
                .stdout,
        )
    };
    let routes = |family: &str| {
        text(
            &Command::new("ip")
                .args([family, "-n", &gw_ns, "route", "show", "table", route_table])
                .output()
                .unwrap()
                .stdout,
        )
    };
    assert!(rules("-4").contains("lookup 24090") && rules("-6").contains("lookup 24090"));
    assert!(!routes("-4").is_empty() && !routes("-6").is_empty());

    let out = gw.relay_cli(&["detach"]);
    assert!(out.status.success(), "detach: {}", text(&out.stderr));
    let said = text(&out.stdout);
    for item in [
        "xdp_",
        "tc_",
        "POLICY",
        "COUNTERS_MAP",
        "rule fwmark",
        "route local",
    ] {
        assert!(said.contains(item), "detach reports {item}: {said}");
    }
    assert!(!gw.pin_path.exists(), "pin directory removed");
    let on_nic = attached(&gw);
    assert!(!on_nic.contains(" id "), "XDP detached: {on_nic}");
    for id in &links {
        assert!(!link_exists(id), "link {id} destroyed");
    }
    assert!(
        !rules("-4").contains("24090") && !rules("-6").contains("24090"),
        "rules removed"
    );
    assert!(
        routes("-4").trim().is_empty() && routes("-6").trim().is_empty(),
        "routes removed"
    );
    assert!(
        rules("-4").contains("fwmark 0x1 lookup 100"),
        "the operator's rule is untouched"
    );
    // Detached means unprotected: the backend port answers directly again.
    let open = gw.topo.curl(&[
        "--max-time",
        "5",
        &format!("http://{SERVER4}:8080/index.html"),
    ]);
    assert_served(&open, "backend after detach");
    let again = gw.relay_cli(&["detach"]);
    assert!(again.status.success());
    assert!(text(&again.stdout).contains("nothing to detach"));
}

/// Sends `packets` (complete IPv4 headers) from the client namespace through a raw socket.
fn send_raw_v4(gw: &Gateway, dst: std::net::Ipv4Addr, packets: Vec<Vec<u8>>) {
    let ns = format!("/var/run/netns/{}", gw.topo.cli);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        let f = std::fs::File::open(&ns).unwrap();
        // SAFETY: setns on this thread only; raw socket calls with valid buffers.
        unsafe {
            assert_eq!(libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET), 0);
            let s = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(s >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.octets()),
                },
                sin_zero: [0; 8],
            };
            for p in &packets {
                let n = libc::sendto(
                    s,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    std::ptr::from_ref(&addr).cast(),
                    std::mem::size_of_val(&addr) as u32,
                );
                assert_eq!(
                    n,
                    p.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(s);
        }
    })
    .join()
    .unwrap();
}

/// A TCP SYN to `dport` split into two IPv4 fragments: 8 bytes (ports, sequence number), then
/// the other 12 bytes of the TCP header.
fn fragmented_syn(dst: std::net::Ipv4Addr, dport: u16, id: u16) -> Vec<Vec<u8>> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40001u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    let header = |frag: u16, len: usize| {
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + len) as u16).to_be_bytes());
        ip.extend_from_slice(&id.to_be_bytes());
        ip.extend_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[64, 6, 0, 0, 192, 0, 2, 2]);
        ip.extend_from_slice(&dst.octets());
        ip
    };
    let mut first = header(0x2000, 8);
    first.extend_from_slice(&tcp[..8]);
    let mut second = header(1, 12);
    second.extend_from_slice(&tcp[8..]);
    vec![first, second]
}

/// IPv4 counters of the server namespace (`Ip:` lines of /proc/net/snmp).
fn server_ip_counters(gw: &Gateway) -> std::collections::HashMap<String, u64> {
    let out = gw
        .topo
        .exec(&gw.topo.srv, "cat")
        .arg("/proc/net/snmp")
        .output()
        .unwrap();
    let snmp = text(&out.stdout);
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(n, v)| (n.to_string(), v.parse().unwrap()))
        .collect()
}

#[test]
fn fragments_never_carry_a_segment_to_the_backend_port() {
    let gw = Gateway::new("fr");
    gw.write_config("auto", &[("shop4", SERVER4)]);
    let _relay = gw.start_relay();
    let server: std::net::Ipv4Addr = SERVER4.parse().unwrap();
    // Control: the same fragments to an unprotected address of the server are reassembled by
    // it, so the crafted packets are valid and the measurement can see them. (Non-first
    // fragments to a protected address are dropped whatever their port.)
    let unprotected: std::net::Ipv4Addr = "198.51.100.20".parse().unwrap();
    let srv = gw.topo.srv.clone();
    assert!(
        Command::new("ip")
            .args(["-n", &srv, "addr", "add", "198.51.100.20/24", "dev", "srv0"])
            .status()
            .unwrap()
            .success()
    );
    let before = server_ip_counters(&gw);
    send_raw_v4(&gw, unprotected, fragmented_syn(unprotected, 8080, 0x4242));
    assert!(
        relay_tests::wait_until(
            Duration::from_secs(3),
            || server_ip_counters(&gw)["ReasmOKs"] > before["ReasmOKs"]
        ),
        "control fragments to port 9090 were not reassembled by the server"
    );
    // Attack: the backend port, first fragment with the ports, then a non-first fragment alone.
    let dropped = gw.counter("shop4", "dropped");
    let before = server_ip_counters(&gw);
    send_raw_v4(&gw, server, fragmented_syn(server, 8080, 0x4343));
    send_raw_v4(
        &gw,
        server,
        vec![fragmented_syn(server, 8080, 0x4444).remove(1)],
    );
    // The event: XDP counted all three fragments; whatever passed would be at the server now.
    assert!(
        relay_tests::wait_until(Duration::from_secs(5), || gw.counter("shop4", "dropped")
            >= dropped + 3),
        "all three fragments dropped at XDP: {} → {}",
        dropped,
        gw.counter("shop4", "dropped")
    );
    assert_eq!(
        gw.counter("shop4", "dropped"),
        dropped + 3,
        "exactly the three fragments dropped"
    );
    let after = server_ip_counters(&gw);
    assert_eq!(
        after["InReceives"], before["InReceives"],
        "no fragment reached the server"
    );
    assert_eq!(after["ReasmOKs"], before["ReasmOKs"]);
}

#[test]
fn proxy_header_names_the_client_and_its_original_destination() {
    let gw = Gateway::new("pp");
    let srv = gw.topo.srv.clone();
    let consumer = relay_tests::haproxy::ProxyConsumer::start_in(
        gw.dir.path(),
        "[::]:8081".parse().unwrap(),
        &["ip", "netns", "exec", &srv],
    )
    .unwrap();
    gw.write_services(
        "auto",
        &[("pp4", SERVER4), ("pp6", SERVER6)],
        8081,
        "proxy_protocol = \"v2\"\n",
    );
    let _relay = gw.start_relay();
    for (client, server) in [(CLIENT4, SERVER4), (CLIENT6, SERVER6)] {
        let out = gw.topo.curl(&[
            "--max-time",
            "10",
            "--cacert",
            gw.pki.ca.to_str().unwrap(),
            "-w",
            "\n%{local_port}",
            &format!("https://{}/", Topology::host(server)),
        ]);
        assert!(out.status.success(), "{server}: {}", text(&out.stderr));
        let body = text(&out.stdout);
        let (seen, local_port) = body.rsplit_once('\n').unwrap();
        // The backend connection comes from the gateway, but the header names the client and
        // the (server, front port) it believes it talks to.
        let expected = format!("src={client}:{local_port} dst={server}:443 ");
        assert!(
            seen.starts_with(&expected),
            "HAProxy saw {seen:?}, expected {expected:?}…\n{}",
            consumer.log_text()
        );
    }
    assert_eq!(consumer.log_text().matches("pp-received").count(), 2);
}

#[test]
fn an_interface_re_created_while_the_relay_was_down_is_attached_anew() {
    // A VLAN or veth re-created, a container restarted: the pinned links are severed.
    let gw = Gateway::new("rc");
    gw.write_config("auto", &[("shop4", SERVER4)]);
    let relay = gw.start_relay();
    assert_served(&gw.fetch(SERVER4), "before");
    drop(relay);
    gw.topo.delete_client_link().unwrap();
    gw.topo.client_link().unwrap();
    let relay = gw.start_relay();
    assert!(
        relay.has_log("pinned XDP link severed") && relay.has_log("pinned TC link severed"),
        "{}",
        relay.logs().join("\n")
    );
    assert_served(&gw.fetch(SERVER4), "steered over the new interface");
    assert_dropped(
        &gw.direct(SERVER4),
        "backend port dropped on the new interface",
    );
    assert!(gw.counter("shop4", "dropped") > 0);
}

#[test]
fn a_relay_in_a_private_mount_namespace_says_its_pins_will_not_outlive_it() {
    // `ip netns exec` gives the relay its own mount namespace, where /sys is remounted and no
    // bpffs is: the relay mounts one there, which vanishes with it.
    let gw = Gateway::new("pm");
    gw.write_config("auto", &[("shop4", SERVER4)]);
    let relay = Relay::start_with(
        gw.topo
            .exec(&gw.topo.gw, binary().to_str().unwrap())
            .args(["run", "--config"])
            .arg(&gw.config),
    )
    .expect("relay starts in ip netns exec");
    assert!(
        relay.has_log("PRIVATE mount namespace"),
        "{}",
        relay.logs().join("\n")
    );
}

#[test]
fn pins_of_another_layout_are_refused_and_retired_ones_removed() {
    let gw = Gateway::new("up");
    gw.write_config("auto", &[("shop4", SERVER4)]);
    std::fs::create_dir_all(&gw.pin_path).unwrap();
    let pin = |name: &str| {
        // The layout of the one policy map for both address families that earlier versions
        // pinned as POLICY: (16-byte address, family, port) → (action, slot).
        let out = Command::new("bpftool")
            .args(["map", "create"])
            .arg(gw.pin_path.join(name))
            .args(["type", "hash", "key", "24", "value", "8", "entries", "4096"])
            .args(["name", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "bpftool: {}", text(&out.stderr));
    };
    pin("POLICY");
    // This version's name with the earlier layout: aya would reuse it as it is.
    pin("POLICY_V6");
    let refused = Relay::start_with(
        gw.topo
            .enter(&gw.topo.gw, &binary())
            .args(["run", "--config"])
            .arg(&gw.config),
    )
    .err()
    .expect("a pin of another layout is refused");
    assert!(
        refused.to_string().contains("has another layout"),
        "{refused:#}"
    );
    assert!(
        gw.pin_path.join("POLICY").exists(),
        "a refusal changes nothing"
    );

    std::fs::remove_file(gw.pin_path.join("POLICY_V6")).unwrap();
    let relay = gw.start_relay();
    assert!(
        relay.has_log("pin of a map earlier versions used removed"),
        "{}",
        relay.logs().join("\n")
    );
    assert!(!gw.pin_path.join("POLICY").exists(), "retired pin removed");
    assert!(gw.pin_path.join("POLICY_V6").exists(), "re-created, pinned");
    assert_served(&gw.fetch(SERVER4), "steered");
    assert_dropped(&gw.direct(SERVER4), "backend port");
}
