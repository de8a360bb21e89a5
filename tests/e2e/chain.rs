//! Two unmodified plaintext applications — curl and Python's http.server — talk through two
//! chained relays: relay A (client namespace, plain → mtls) and relay B (server namespace,
//! mtls → plain, allowing only relay A's identity). The gateway between them captures the link
//! with tshark, and the test shows that only mutually authenticated TLS crossed it, over IPv4
//! and IPv6.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use relay_tests::{
    config::{inbound, outbound, relay_section, service},
    http::HttpServer,
    netns::{CLIENT4, CLIENT6, SERVER4, SERVER6, Topology, require_root},
    pki::Pki,
    relay::{Relay, binary},
    wait_until,
};

const GW_SERVER_IF: &str = "gw-srv";
const RELAY_B_PORT: u16 = 8443;
const HTTP_PORT: u16 = 8000;

/// tshark writing every packet of one interface of a namespace to a pcap file.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(topo: &Topology, ns: &str, interface: &str, dir: &Path) -> Capture {
        let file = dir.join("link.pcap");
        let log = dir.join("tshark.log");
        let child = topo
            .exec(ns, "tshark")
            .args(["-i", interface, "-q", "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("tshark is installed (`cargo xtask setup`)");
        let capturing = wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Capturing on"))
        });
        assert!(
            capturing,
            "tshark did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Capture { child, file }
    }

    /// Stops the capture (SIGINT, so tshark flushes) and returns the pcap file. Waits first
    /// until the file holds `at_least` bytes: the kernel hands packets to dumpcap in blocks, up
    /// to a second late, and a stop before that would lose them.
    fn stop(mut self, at_least: u64) -> std::path::PathBuf {
        wait_until(Duration::from_secs(10), || {
            std::fs::metadata(&self.file).is_ok_and(|m| m.len() >= at_least)
        });
        // SAFETY: kill(2) on the tshark this capture started (`ip netns exec` execs in place).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let stopped = wait_until(Duration::from_secs(10), || {
            self.child.try_wait().unwrap().is_some()
        });
        assert!(stopped, "tshark did not stop within 10 s");
        self.file.clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tshark -r <pcap> -Y <filter>`: one line per matching packet with the given fields.
fn packets(pcap: &Path, filter: &str, fields: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(pcap).args([
        "-d",
        &format!("tcp.port=={RELAY_B_PORT},tls"),
        "-Y",
        filter,
        "-T",
        "fields",
    ]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().expect("run tshark");
    assert!(
        out.status.success(),
        "tshark -Y {filter}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn chained_relays_carry_plaintext_apps_over_mutual_tls_only() {
    require_root();
    let topo = Topology::create("chain").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki")).unwrap();
    // Markers that exist only at the two plaintext ends: in the request path and in the page.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let tag = format!("{:x}-{nanos:x}", std::process::id());
    let path_marker = format!("request-path-{tag}");
    let page_marker = format!("page-body-{tag}");
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(
        www.join(format!("{path_marker}.txt")),
        format!("{page_marker}\n"),
    )
    .unwrap();
    let _http = HttpServer::start(
        &www,
        "127.0.0.1".parse().unwrap(),
        HTTP_PORT,
        &["ip", "netns", "exec", &topo.srv],
    )
    .unwrap();

    // Relay B: one dual-stack socket for both families; only relay A's certificate may pass.
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let b_inbound = inbound("mtls", &pki) + "allow = [\"dns:client.test\"]\n";
    let b_config = relay_section(&b_dir, "")
        + &service(
            "from-a",
            format!("[::]:{RELAY_B_PORT}").parse().unwrap(),
            format!("127.0.0.1:{HTTP_PORT}").parse().unwrap(),
            &b_inbound,
            &outbound("plain", &pki),
        );
    std::fs::write(b_dir.join("relay.toml"), b_config).unwrap();
    let relay_b = Relay::start_with(
        topo.enter(&topo.srv, &binary())
            .args(["run", "--config"])
            .arg(b_dir.join("relay.toml")),
    )
    .expect("relay B starts in the server namespace");

    // Relay A: a local port per family of the link; it presents the client certificate.
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let a_config = relay_section(&a_dir, "")
        + &service(
            "to-b4",
            "127.0.0.1:8080".parse().unwrap(),
            format!("{SERVER4}:{RELAY_B_PORT}").parse().unwrap(),
            &inbound("plain", &pki),
            &outbound("mtls", &pki),
        )
        + &service(
            "to-b6",
            "127.0.0.1:8081".parse().unwrap(),
            format!("[{SERVER6}]:{RELAY_B_PORT}").parse().unwrap(),
            &inbound("plain", &pki),
            &outbound("mtls", &pki),
        );
    std::fs::write(a_dir.join("relay.toml"), a_config).unwrap();
    let relay_a = Relay::start_with(
        topo.enter(&topo.cli, &binary())
            .args(["run", "--config"])
            .arg(a_dir.join("relay.toml")),
    )
    .expect("relay A starts in the client namespace");

    let capture = Capture::start(&topo, &topo.gw, GW_SERVER_IF, dir.path());
    for port in [8080, 8081] {
        let out = topo.curl(&[
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{port}/{path_marker}.txt"),
        ]);
        assert!(
            out.status.success(),
            "plain curl through A:{port} and B: {}\nA:\n{}\nB:\n{}",
            String::from_utf8_lossy(&out.stderr),
            relay_a.logs().join("\n"),
            relay_b.logs().join("\n")
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{page_marker}\n")
        );
    }
    // Both requests are closed on both relays before the capture ends.
    assert!(relay_a.wait_logs(&["outcome=\"closed\""], 2, Duration::from_secs(5)));
    assert!(relay_b.wait_logs(&["outcome=\"closed\""], 2, Duration::from_secs(5)));
    // Two TLS handshakes with certificate chains both ways: well over 8 KB of packets.
    let pcap = capture.stop(8 << 10);

    let raw = std::fs::read(&pcap).unwrap();
    let contains = |m: &str| raw.windows(m.len()).any(|w| w == m.as_bytes());
    let tcp_packets = packets(&pcap, "tcp", &["frame.number"]).len();
    assert!(
        tcp_packets >= 20,
        "the capture saw the traffic: {tcp_packets} TCP packets in {} bytes of pcap; tshark said: {}",
        raw.len(),
        std::fs::read_to_string(dir.path().join("tshark.log")).unwrap_or_default()
    );
    assert!(
        !contains(&path_marker),
        "the request path crossed the link in clear"
    );
    assert!(
        !contains(&page_marker),
        "the page crossed the link in clear"
    );
    assert!(
        packets(&pcap, "http", &["frame.number"]).is_empty(),
        "HTTP seen on the link"
    );
    assert!(
        packets(
            &pcap,
            &format!("tcp && tcp.port != {RELAY_B_PORT}"),
            &["frame.number"]
        )
        .is_empty(),
        "only relay B's TLS port is used on the link"
    );
    let hellos = packets(
        &pcap,
        "tls.handshake.type == 1",
        &["ip.src", "ipv6.src", "tls.handshake.extensions_server_name"],
    );
    assert!(
        hellos.iter().any(|l| l.starts_with(CLIENT4)) && hellos.iter().any(|l| l.contains(CLIENT6)),
        "a ClientHello from relay A over each family: {hellos:?}"
    );
    // TLS 1.3 hides the real content type: every protected record is "opaque type" 23.
    let app_data = packets(
        &pcap,
        "tls.record.opaque_type == 23 || tls.record.content_type == 23",
        &["frame.number"],
    );
    assert!(
        app_data.len() >= 4,
        "application data only as TLS records: {app_data:?}"
    );
    // Mutual: relay B verified relay A's certificate and let its identity in, once per family.
    assert_eq!(
        relay_b.count_logs(&["client allowed", "identity=dns:client.test"]),
        2,
        "{}",
        relay_b.logs().join("\n")
    );
}
